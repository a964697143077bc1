"""The transport under the client for endpoints over the network: httpx's API on aiohttp's
connection pool (`httpx_aiohttp.AiohttpTransport`, the one the official ``openai`` SDK offers for
many concurrent requests).

Decision: httpx stays the client's API (requests, responses, its exceptions, `MockTransport` and
`ASGITransport` for faults and the embedded server); only the sockets change. httpx's own transport,
httpcore on anyio, wraps every read and write in a cancel scope and a checkpoint, asks the library
sniffer for each lock and event, and polls every idle connection's socket when a request takes one:
in a 20,000-request sweep against a canned local server that was ~65% of the client's CPU. On
aiohttp's pool (its HTTP parser in C), ``benchmarks/bench_scale.py``'s 20,000-request streamed
sweep used 1.11-1.29 ms of client CPU per request where the tree before this module (cf49fe2) used
1.88-2.03 ms, and ran at 741-862 requests/s instead of 479-519 (three rounds each, alternating).

What this module adds to `AiohttpTransport`: errors as precise as httpcore's. Its map turns a
refused connection and a server that hung up into `httpx.ConnectTimeout`, and lets others (a
malformed response, whose exception holds the request's headers, the API key among them) escape as
aiohttp's own. Here every aiohttp error becomes the httpx error of the same meaning, with aiohttp's
words but none of its objects: nothing that carries the request's headers is chained to it. And a
transport dropped without ``aclose()`` (a notebook's client usually is; httpx's is silent then)
closes its connections quietly instead of aiohttp's "Unclosed client session" error log.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import weakref
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

__all__ = ["NetworkTransport"]

# Most specific first: the first class the error is an instance of decides.
_KINDS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (asyncio.TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientProxyConnectionError, httpx.ProxyError),
    (aiohttp.ClientHttpProxyError, httpx.ProxyError),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientPayloadError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpx.ReadError),
    (aiohttp.ClientConnectionError, httpx.ReadError),
    (aiohttp.ClientError, httpx.TransportError),
)


def _words(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientResponseError):
        # Its str() names the URL (a key can sit in a query string); the status and message
        # are what went wrong.
        words = f"invalid HTTP response ({error.status}, {error.message})"
    else:
        words = str(error) or type(error).__name__
    return " ".join(words.split())  # aiohttp's parser errors span lines


def translated(error: BaseException, request: httpx.Request) -> httpx.TransportError | None:
    """The httpx error for an aiohttp error (or the aiohttp error behind httpx_aiohttp's
    translation); None when ``error`` is neither."""
    cause = error
    if isinstance(error, httpx.TransportError) and error.__cause__ is not None:
        cause = error.__cause__
    for kind, httpx_kind in _KINDS:
        if isinstance(cause, kind):
            return httpx_kind(f"{type(cause).__name__}: {_words(cause)}", request=request)
    if isinstance(error, httpx.TransportError):
        return error  # httpx's own, with no aiohttp error behind it
    return None


class _Body(httpx.AsyncByteStream):
    """The response body, with the same translation while it is read."""

    def __init__(self, stream: Any, request: httpx.Request) -> None:
        self._stream = stream
        self._request = request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        iterator = self._stream.__aiter__()
        while True:
            problem: httpx.TransportError | None = None
            try:
                chunk = await iterator.__anext__()
            except StopAsyncIteration:
                return
            except (aiohttp.ClientError, asyncio.TimeoutError, httpx.TransportError) as exc:
                problem = translated(exc, self._request)
                if problem is None:  # pragma: no cover - translated covers these classes
                    raise
            if problem is not None:
                # Raised outside the except clause: no aiohttp object chained to it.
                raise problem
            yield chunk

    async def aclose(self) -> None:
        await self._stream.aclose()


def _let_go(session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop, wait: float) -> None:
    """Close the connections of a session left unclosed, without a word (``wait``: seconds to
    wait for that when its loop runs in another thread, at exit; 0: do not wait)."""
    connector = session.connector
    session.detach()  # closed, as far as its __del__ is concerned
    if connector is None or connector.closed:
        return
    if loop.is_running() and not _in_thread_of(loop):
        # On its loop, from whichever thread the collector ran in.
        closing = asyncio.run_coroutine_threadsafe(_close(connector), loop)
        if wait:
            with contextlib.suppress(Exception):
                closing.result(wait)
        return
    # Here and now (on the loop's own thread, or a loop that has ended): the first step of
    # close() closes every connection; what it then waits for, if anything, is a task of the
    # loop already. Waiting for the loop to run a task of ours instead would miss an
    # ``asyncio.run`` that is about to end.
    steps = connector.close().__await__()
    with contextlib.suppress(StopIteration):
        next(steps)
    steps.close()


async def _close(connector: aiohttp.BaseConnector) -> None:
    await connector.close()


#: Sessions not closed yet, and their loops: at exit, each is let go as above.
_OPEN: weakref.WeakKeyDictionary[aiohttp.ClientSession, asyncio.AbstractEventLoop] = (
    weakref.WeakKeyDictionary()
)


@atexit.register
def _at_exit() -> None:
    for session, loop in list(_OPEN.items()):
        if not session.closed:
            _let_go(session, loop, wait=1.0)


def _in_thread_of(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


class NetworkTransport(AiohttpTransport):
    """`AiohttpTransport` with precise httpx errors and a quiet end (see the module's
    docstring)."""

    def get_client(self) -> aiohttp.ClientSession:
        session = super().get_client()
        loop = asyncio.get_running_loop()
        # Dropped unclosed: let go when collected (at exit, `_at_exit` does, waiting for it).
        weakref.finalize(self, _let_go, session, loop, 0.0).atexit = False
        _OPEN[session] = loop
        return session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        problem: httpx.TransportError | None = None
        try:
            response = await super().handle_async_request(request)
        except (aiohttp.ClientError, asyncio.TimeoutError, httpx.TransportError) as exc:
            problem = translated(exc, request)
            if problem is None:  # pragma: no cover - translated covers these classes
                raise
        if problem is not None:
            raise problem
        response.stream = _Body(response.stream, request)
        return response
