"""An in-process httpx transport that delivers response bodies as the app sends them.

httpx's own ``ASGITransport`` runs the app to completion and only then hands back the response,
so an in-process stream arrives all at once. This transport runs the app in a task beside the
caller and passes each ``http.response.body`` message on as it comes: tokens show up while they
are generated, as they do over real HTTP. Closing the response early tells the app the client
disconnected. asyncio only (the client's event loop is asyncio).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
from starlette.types import ASGIApp

__all__ = ["StreamingASGITransport"]

_END = object()
_DISCONNECT_GRACE_S = 5.0


class _BodyStream(httpx.AsyncByteStream):
    def __init__(
        self, queue: asyncio.Queue[Any], task: asyncio.Task[None], disconnected: asyncio.Event
    ) -> None:
        self._queue = queue
        self._task = task
        self._disconnected = disconnected

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            item = await self._queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                # What a client sees when a real server dies mid-response: a protocol error,
                # which the client's retry and stream logic already know how to treat.
                raise httpx.RemoteProtocolError(
                    f"the in-process server failed mid-response: {item!r}"
                ) from item
            yield item

    async def aclose(self) -> None:
        # Like a closed connection: the app's receive() reports a disconnect, which our app
        # answers by stopping the stream and closing the engine's generator. An app that ignores
        # disconnects is cancelled after a grace period rather than left generating for nobody.
        self._disconnected.set()
        if not self._task.done():
            await asyncio.wait({self._task}, timeout=_DISCONNECT_GRACE_S)
        if not self._task.done():
            self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


class StreamingASGITransport(httpx.AsyncBaseTransport):
    """``httpx.ASGITransport`` with incremental response bodies (for server-sent events).

    Exceptions the app raises before it starts a response are raised by the request; later ones by
    the body iteration.
    """

    def __init__(
        self, app: ASGIApp, *, root_path: str = "", client: tuple[str, int] = ("127.0.0.1", 123)
    ) -> None:
        self.app = app
        self.root_path = root_path
        self.client = client

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not isinstance(request.stream, httpx.AsyncByteStream):
            raise TypeError("StreamingASGITransport needs an httpx.AsyncClient")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": request.method,
            "headers": [(key.lower(), value) for key, value in request.headers.raw],
            "scheme": request.url.scheme,
            "path": request.url.path,
            "raw_path": request.url.raw_path.split(b"?")[0],
            "query_string": request.url.query,
            "server": (request.url.host, request.url.port),
            "client": self.client,
            "root_path": self.root_path,
        }
        loop = asyncio.get_running_loop()
        started: asyncio.Future[tuple[int, list[tuple[bytes, bytes]]]] = loop.create_future()
        body: asyncio.Queue[Any] = asyncio.Queue()
        disconnected = asyncio.Event()
        request_chunks = request.stream.__aiter__()
        request_read = False

        async def receive() -> dict[str, Any]:
            nonlocal request_read
            if request_read:
                await disconnected.wait()
                return {"type": "http.disconnect"}
            try:
                chunk = await request_chunks.__anext__()
            except StopAsyncIteration:
                request_read = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return {"type": "http.request", "body": chunk, "more_body": True}

        async def send(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                if not started.done():
                    started.set_result((message["status"], list(message.get("headers", []))))
            elif message["type"] == "http.response.body":
                chunk = message.get("body", b"")
                if chunk and request.method != "HEAD":
                    body.put_nowait(bytes(chunk))
                if not message.get("more_body", False):
                    body.put_nowait(_END)
                    # The response is complete: from here on the app would see a closed connection.
                    disconnected.set()

        async def run() -> None:
            try:
                await self.app(scope, receive, send)
            except Exception as exc:
                if started.done():
                    body.put_nowait(exc)
                else:
                    started.set_exception(exc)
            finally:
                if not started.done():
                    started.set_exception(RuntimeError("the ASGI app returned without a response"))
                body.put_nowait(_END)

        task = loop.create_task(run())
        try:
            status, headers = await started
        except BaseException:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise
        return httpx.Response(status, headers=headers, stream=_BodyStream(body, task, disconnected))
