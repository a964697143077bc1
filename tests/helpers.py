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
    """Ctrl-C as Jupyter's "interrupt kernel" sends it (`_thread.interrupt_main`), sent again
    every second until the test says it arrived (`arrived`), as a user presses it again.

    CPython loses a signal whose handler runs while the main thread is inside a finalizer or a
    weakref callback (the KeyboardInterrupt raised there is "ignored"); under load that happened
    to a single interrupt in CI, and the test then waited forever for it. ``start`` may be called
    from any thread (a transport on the event loop's, say); the first interrupt goes at once."""

    def __init__(self) -> None:
        import threading

        self._arrived = threading.Event()
        self._thread: Any = None

    def start(self) -> None:
        import _thread
        import threading

        def send() -> None:
            for _ in range(30):
                _thread.interrupt_main()
                if self._arrived.wait(1.0):
                    return

        self._thread = threading.Thread(target=send, daemon=True)
        self._thread.start()

    def arrived(self) -> None:
        """The test caught its KeyboardInterrupt: send no more."""
        self._arrived.set()
        if self._thread is not None:
            self._thread.join(10)
