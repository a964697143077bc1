"""Connection hygiene for ``nbcompletions serve``: what uvicorn's HTTP/1.1 protocol lacks.

uvicorn (read in its ``protocols/http/h11_impl.py``) offers ``timeout_keep_alive``, armed only once
a response is complete, and ``limit_concurrency``, checked only once a whole request has arrived
(a plain-text 503 without ``Retry-After``). So a connection that never sends a request, or
trickles its headers, stays open forever, and 20,000 of them used up the file descriptors:
``/health`` hung and asyncio logged 88 MB of accept errors in 25 s. This protocol adds:

- a **header timeout**: a connection must send complete request headers within
  ``header_timeout_s`` of opening, or of its first byte after a keep-alive pause; then it is
  closed;
- a **cap on open connections**: the connection past ``max_connections`` makes room by closing
  the longest-idle one (no request in progress: silent, trickling or kept alive); when every one
  is busy it gets a 503 with ``Retry-After`` and is closed.

The keep-alive idle timeout is uvicorn's own ``timeout_keep_alive``; the body timeout is the
app's (``body_timeout_s``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["GuardedProtocol", "guarded_protocol"]

logger = logging.getLogger("nbcompletions.server")

_RETRY_AFTER_S = 1


def _busy_response() -> bytes:
    error = {
        "message": "The server has as many connections open as it allows, all of them busy; "
        "retry in a moment.",
        "type": "server_error",
        "param": None,
        "code": "server_overloaded",
    }
    body = json.dumps({"error": error}, separators=(",", ":")).encode("ascii")
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n"
        f"retry-after: {_RETRY_AFTER_S}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _Guard:
    """State shared by the connections of one server: the idle ones, longest idle first."""

    def __init__(self, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.idle: OrderedDict[GuardedProtocol, None] = OrderedDict()
        self.open = 0
        self.refused = 0
        self.evicted = 0
        self.timed_out = 0


class GuardedProtocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout and a cap on open connections."""

    guard: _Guard

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted = False

    # -- the cap ---------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        guard = self.guard
        if guard.open >= guard.max_connections and not self._evict_one():
            guard.refused += 1
            if guard.refused == 1 or guard.refused % 1000 == 0:  # a flood must not flood the log
                logger.warning(
                    "%d connections open and busy (--max-connections); refused %d so far with 503",
                    guard.open,
                    guard.refused,
                )
            transport.write(_busy_response())
            transport.close()
            return
        guard.open += 1
        self._counted = True
        super().connection_made(transport)
        self._idle()
        self._start_header_timer()

    def _evict_one(self) -> bool:
        """Close the longest-idle connection to make room; False when none is idle."""
        guard = self.guard
        while guard.idle:
            oldest, _ = guard.idle.popitem(last=False)
            if not oldest.transport.is_closing():
                guard.evicted += 1
                oldest._stop_header_timer()
                oldest.transport.close()
                return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._counted:
            return  # refused before it was set up
        self._counted = False
        self.guard.open -= 1
        self.guard.idle.pop(self, None)
        self._stop_header_timer()
        super().connection_lost(exc)

    def _idle(self) -> None:
        self.guard.idle[self] = None
        self.guard.idle.move_to_end(self)

    # -- the header timeout ----------------------------------------------------------------------
    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _start_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(
                self.guard.header_timeout_s, self._headers_timed_out
            )

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self.guard.timed_out += 1
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if self._between_requests():
            self._start_header_timer()  # the first byte of a request: its headers are due
        super().data_received(data)
        if self.cycle is not cycle and not self._between_requests():
            self._stop_header_timer()  # the request's headers are complete: it is busy
            self.guard.idle.pop(self, None)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        if not self.transport.is_closing() and self._between_requests():
            self._idle()  # kept alive: uvicorn's timeout_keep_alive closes it when idle too long


def guarded_protocol(max_connections: int, header_timeout_s: float) -> type[GuardedProtocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with its own shared `_Guard`."""
    guard = _Guard(max_connections, header_timeout_s)
    return type("GuardedProtocol", (GuardedProtocol,), {"guard": guard})
