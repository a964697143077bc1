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
