"""Who may talk to the server: the Host and Origin checks that keep web pages out.

A browser lets any web page send a "simple" cross-origin POST (``Content-Type: text/plain``, no
preflight) to ``http://127.0.0.1:8000``, and a DNS-rebinding page can even read the answers: its
own host name, re-pointed at 127.0.0.1, makes the request look same-origin to the browser. Jupyter
defends its loopback server the same two ways this module does:

- **Host**: a server bound to loopback answers only requests whose ``Host`` names loopback
  (``localhost``, ``127.x.y.z``, ``::1``) or a name allowed explicitly; a rebinding page sends its
  own name, so it gets 403.
- **Origin**: browsers send ``Origin`` on cross-origin requests (and on every POST); a request
  whose Origin is not loopback or allowed explicitly gets 403. Programs (the SDK, curl,
  lm-evaluation-harness) send no Origin and are not affected.

The third defence, refusing request bodies that are not JSON (415), lives with the body reader.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

__all__ = ["ANY", "RequestGuard", "host_name", "is_loopback_name"]

#: In an allow-list: accept every value.
ANY = "*"
_SHOWN = 100


def is_loopback_name(host: str) -> bool:
    """Whether a host name or address (no port) stays on this machine."""
    name = host.strip("[]").lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(host_header: str) -> str:
    """The name in a ``Host`` header, without its port: ``[::1]:8000`` -> ``::1``."""
    value = host_header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.split(":", 1)[0]
    return value


def _origin(value: str) -> str:
    """An origin in canonical form (``scheme://host[:port]``, lower case, no trailing slash)."""
    return value.strip().lower().rstrip("/")


class RequestGuard:
    """ASGI middleware: 403 for a disallowed Host (when ``hosts`` is set) or Origin.

    ``hosts``: None checks no Host; otherwise loopback names plus these names (``*``: any).
    ``origins``: requests without an Origin always pass; others need a loopback origin or one of
    these (``scheme://host[:port]``; ``*``: any).
    """

    def __init__(
        self, app: ASGIApp, *, hosts: Iterable[str] | None, origins: Iterable[str]
    ) -> None:
        self.app = app
        self.hosts = None if hosts is None else frozenset(host_name(h) for h in hosts)
        self.origins = frozenset(_origin(o) for o in origins)

    def _host_allowed(self, host: str | None) -> bool:
        if self.hosts is None or host is None or ANY in self.hosts:
            return True
        name = host_name(host)
        return is_loopback_name(name) or name in self.hosts

    def _origin_allowed(self, origin: str | None) -> bool:
        if origin is None or ANY in self.origins:
            return True
        canonical = _origin(origin)
        if canonical in self.origins:
            return True
        parts = urlsplit(canonical)
        # "null" (sandboxed frames, file:// pages) has no host and is refused.
        return parts.scheme in ("http", "https") and is_loopback_name(parts.hostname or "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        host = _decode(headers.get(b"host"))
        origin = _decode(headers.get(b"origin"))
        if not self._host_allowed(host):
            await _refuse(
                send,
                f"The Host header {_shown(host)} is not allowed: this server is bound to loopback "
                "and answers only requests addressed to localhost, 127.0.0.1 or ::1 (a defence "
                "against DNS rebinding). Start it with --allow-host NAME to accept another name.",
                "host_not_allowed",
            )
            return
        if not self._origin_allowed(origin):
            await _refuse(
                send,
                f"Requests from the web origin {_shown(origin)} are not allowed (web pages may "
                "not drive this server). Start it with --allow-origin ORIGIN to accept one.",
                "origin_not_allowed",
            )
            return
        await self.app(scope, receive, send)


def _decode(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _shown(value: str | None) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 5] + "...'"


async def _refuse(send: Send, message: str, code: str) -> None:
    error = {"message": message, "type": "invalid_request_error", "param": None, "code": code}
    body = json.dumps({"error": error}, separators=(",", ":")).encode("ascii")
    await send(
        {
            "type": "http.response.start",
            "status": 403,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
