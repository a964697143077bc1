"""Helpers shared by the test files: one copy each (``from helpers import ...``)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, overload

import httpx

if TYPE_CHECKING:
    from nbcompletions import AsyncClient, Client

#: A MockTransport handler: sync or async, request in, response out.
Handler = (
    Callable[[httpx.Request], httpx.Response]
    | Callable[[httpx.Request], Coroutine[Any, Any, httpx.Response]]
)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a server under test)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@overload
def mock_client(
    handler: Handler,
    *,
    cls: type[Client] | None = None,
    base_url: str | Sequence[str] = ...,
    model: str | None = ...,
    **kwargs: Any,
) -> Client: ...


@overload
def mock_client(
    handler: Handler,
    *,
    cls: type[AsyncClient],
    base_url: str | Sequence[str] = ...,
    model: str | None = ...,
    **kwargs: Any,
) -> AsyncClient: ...


def mock_client(
    handler: Handler,
    *,
    cls: type[Client] | type[AsyncClient] | None = None,
    base_url: str | Sequence[str] = "http://test/v1",
    model: str | None = "m",
    **kwargs: Any,
) -> Client | AsyncClient:
    """A real `Client` (or ``cls=AsyncClient``) whose transport is ``httpx.MockTransport(handler)``.

    The transport is the one seam for injecting faults: everything above it (retries, parsing,
    errors, redaction) is the real code. nbcompletions is imported here, not at the top, so that
    importing this module (conftest does) loads no client.
    """
    if cls is None:
        from nbcompletions import Client

        cls = Client
    return cls(base_url, model=model, transport=httpx.MockTransport(handler), **kwargs)


class Interrupts:
    """Ctrl-C as Jupyter's "interrupt kernel" sends it (`_thread.interrupt_main`), with Python's
    own SIGINT handler in place until `arrived`: create it in the main thread.

    `interrupt_main` does nothing while SIGINT is ignored, and a Python started by a background
    job of a non-interactive shell (``cmd &``) starts with it ignored and installs no handler: a
    CI run launched that way left two interrupt tests waiting for their 300 s timeout. ``start``
    may be called from any thread (a transport on the event loop's, say)."""

    def __init__(self) -> None:
        import signal

        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def start(self) -> None:
        import _thread

        _thread.interrupt_main()

    def arrived(self) -> None:
        """The test caught its KeyboardInterrupt: the handler found before is put back."""
        import signal

        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
