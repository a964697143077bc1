"""`StreamingASGITransport`: the in-process transport that delivers streams as they are generated.

Also pins down what httpx's own ``ASGITransport`` does (buffers the whole body), which is why the
streaming transport exists.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from nbcompletions import CompletionRequest
from nbcompletions.server import StreamingASGITransport, create_app

MODEL = "held"
HANG_GUARD_S = 60


class _HeldStreamEngine:
    """Streams chunk 0, then waits inside the engine until released; records closing."""

    model_id = MODEL

    def __init__(self, *, endless: bool = False) -> None:
        self.release = threading.Event()
        self.holding = threading.Event()
        self.closed = threading.Event()
        self.endless = endless
        self.streams: list[Iterator[dict[str, Any]]] = []

    def complete(self, request: CompletionRequest) -> dict[str, Any]:
        return {
            "id": "cmpl-held",
            "object": "text_completion",
            "created": 1,
            "model": MODEL,
            "choices": [{"text": "!", "index": 0, "logprobs": None, "finish_reason": "length"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        }

    def stream(self, request: CompletionRequest) -> Iterator[dict[str, Any]]:
        chunks = self._chunks()
        self.streams.append(chunks)  # only an explicit close() can end it, not garbage collection
        return chunks

    def _chunks(self) -> Iterator[dict[str, Any]]:
        try:
            index = 0
            while True:
                if index == 1:
                    self.holding.set()
                    if not self.release.wait(HANG_GUARD_S):
                        raise RuntimeError("never released")
                yield {
                    "id": "cmpl-held",
                    "object": "text_completion",
                    "created": 1,
                    "model": MODEL,
                    "choices": [
                        {"text": f"<{index}>", "index": 0, "logprobs": None, "finish_reason": None}
                    ],
                }
                index += 1
                if not self.endless and index == 3:
                    return
        finally:
            self.closed.set()


STREAM_BODY = {"model": MODEL, "prompt": "x", "stream": True}


async def test_events_arrive_while_the_engine_is_still_generating() -> None:
    engine = _HeldStreamEngine()
    transport = StreamingASGITransport(create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as client:
        with anyio.fail_after(HANG_GUARD_S):  # a buffering transport would wait here forever
            async with client.stream("POST", "/v1/completions", json=STREAM_BODY) as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                first = await lines.__anext__()
                # The engine is held before its second chunk, yet the first one is here.
                assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == "<0>"
                assert not engine.closed.is_set()
                engine.release.set()
                rest = [line async for line in lines if line]
    assert [
        json.loads(line.removeprefix("data: "))["choices"][0]["text"] for line in rest[:-1]
    ] == ["<1>", "<2>"]
    assert rest[-1] == "data: [DONE]"
    assert engine.closed.is_set()


async def test_httpx_asgi_transport_buffers_the_whole_stream() -> None:
    """Why the streaming transport exists: httpx's returns only once the app has finished."""
    engine = _HeldStreamEngine()
    app = create_app(engine)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://embedded"
    ) as client:
        async with anyio.create_task_group() as group:
            got: dict[str, httpx.Response] = {}

            async def request() -> None:
                got["response"] = await client.send(
                    client.build_request("POST", "/v1/completions", json=STREAM_BODY), stream=True
                )

            group.start_soon(request)
            # Chunk 0 has gone to the transport once the engine holds before chunk 1 ...
            assert await anyio.to_thread.run_sync(engine.holding.wait, HANG_GUARD_S)
            await anyio.wait_all_tasks_blocked()
            assert "response" not in got  # ... yet the caller has no response at all
            engine.release.set()
        # ... and once the app is done, everything is there at once.
        body = await got["response"].aread()
    assert body.decode().count("data: ") == 4


async def test_closing_a_stream_early_closes_the_engine_generator() -> None:
    engine = _HeldStreamEngine(endless=True)
    engine.release.set()
    transport = StreamingASGITransport(create_app(engine))
    async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as client:
        with anyio.fail_after(HANG_GUARD_S):
            async with client.stream("POST", "/v1/completions", json=STREAM_BODY) as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: "):
                        break
    # Closing the response reported a disconnect; the app stopped and closed the generator.
    assert engine.closed.is_set()


async def test_plain_requests_and_errors_behave_as_with_httpx_transport() -> None:
    app = create_app(_HeldStreamEngine(), max_body_bytes=300)
    bodies = [
        {"model": MODEL, "prompt": "x"},
        {"model": MODEL, "prompt": "x", "top_p": 2},
        {"model": "nope", "prompt": "x"},
        {"model": MODEL, "prompt": "x" * 400},
    ]
    answers = []
    for transport in (httpx.ASGITransport(app=app), StreamingASGITransport(app)):
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as client:
            responses = [await client.post("/v1/completions", json=body) for body in bodies]
            responses.append(await client.get("/v1/models"))
            answers.append([(r.status_code, r.json()) for r in responses])
    buffered, streamed = answers
    assert [status for status, _ in streamed] == [200, 400, 404, 413, 200]
    assert streamed == buffered


async def test_app_exceptions_before_the_response_are_raised() -> None:
    async def broken_app(scope: Any, receive: Any, send: Any) -> None:
        raise LookupError("broken before responding")

    async with httpx.AsyncClient(
        transport=StreamingASGITransport(broken_app), base_url="http://embedded"
    ) as client:
        with pytest.raises(LookupError, match="broken before responding"):
            await client.get("/")


async def test_real_engine_stream_in_process_matches_the_plain_answer(embedded_engine: Any) -> None:
    app = create_app(embedded_engine)
    body = {"model": embedded_engine.model_id, "prompt": "To be", "max_tokens": 6, "temperature": 0}
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded"
    ) as client:
        plain = (await client.post("/v1/completions", json=body)).json()
        async with client.stream(
            "POST", "/v1/completions", json={**body, "stream": True}
        ) as response:
            events = [line async for line in response.aiter_lines() if line]
    assert events[-1] == "data: [DONE]"
    text = "".join(
        json.loads(event.removeprefix("data: "))["choices"][0]["text"] for event in events[:-1]
    )
    assert text == plain["choices"][0]["text"]
