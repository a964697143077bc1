"""`Completion` (cheap display, lazy frames) and the streaming in-process ASGI transport."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from nbcompletions import APIError, AsyncClient, Completion, CompletionRequest
from nbcompletions.server import StreamingASGITransport

RAW = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m",
    "choices": [
        {"text": " second", "index": 1, "logprobs": None, "finish_reason": "length"},
        {
            "text": " <first> & more " + "x" * 80,
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
        },
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10},
}


def test_completion_fields_follow_choice_index_order() -> None:
    completion = Completion(RAW, CompletionRequest(prompt="p", n=2))
    assert completion.text.startswith(" <first>")
    assert completion.texts[1] == " second"
    assert completion.finish_reason == "stop"
    assert completion.usage == RAW["usage"]
    assert (completion.id, completion.model) == ("cmpl-1", "m")


def test_completion_copes_with_missing_fields() -> None:
    completion = Completion({"choices": None})
    assert (completion.text, completion.finish_reason, completion.usage) == ("", None, {})
    assert "0 choices" in repr(completion)


def test_repr_and_html_are_short_and_build_no_frames() -> None:
    completion = Completion(RAW)
    text = repr(completion)
    assert text.startswith("<Completion ' <first> & more xxx")
    assert "finish_reason='stop'" in text
    assert "2 choices, 3+7 tokens" in text
    assert len(text) < 150
    html = completion._repr_html_()
    assert "&lt;first&gt; &amp; more" in html
    assert "finish_reason=stop" in html
    assert completion._frames is None


def test_frames_are_built_once_with_the_request_and_vocab_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nbcompletions._frames as frames

    calls: list[Any] = []
    # Stand-ins for the three frames, typed Any: they only need to come back unchanged.
    built: tuple[Any, Any, Any] = ("choices", "tokens", "alternatives")

    def fake_to_frames(raw: Any, request: Any = None, *, vocab_size: Any = None) -> Any:
        calls.append((raw, request, vocab_size))
        return built

    monkeypatch.setattr(frames, "to_frames", fake_to_frames)
    request = CompletionRequest(prompt="p")
    completion = Completion(RAW, request, vocab_size=4096)
    assert (completion.choices, completion.tokens, completion.alternatives) == built
    assert completion.frames() == built
    assert calls == [(RAW, request, 4096)]


def test_real_frames_from_a_completion() -> None:
    pytest.importorskip("pandas")
    completion = Completion(RAW, CompletionRequest(prompt="p", n=2))
    assert list(completion.choices["index"]) == [0, 1]
    assert completion.tokens.empty


def test_the_raw_response_is_copied() -> None:
    raw = dict(RAW)
    completion = Completion(raw)
    raw["model"] = "changed"
    assert completion.model == "m"


# -- the in-process transport streams -------------------------------------------------------------
def _app(
    body_parts: list[bytes],
    gate: asyncio.Event | None = None,
    fail_after: int | None = None,
    seen: list[Any] | None = None,
) -> Callable[..., Any]:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = b""
        while True:  # an ASGI app reads the request until more_body is false
            request = await receive()
            body += request.get("body", b"")
            if not request.get("more_body", False):
                break
        if seen is not None:
            seen.append(body)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for i, part in enumerate(body_parts):
            if fail_after is not None and i == fail_after:
                raise RuntimeError("engine exploded")
            await send({"type": "http.response.body", "body": part, "more_body": True})
            if gate is not None and i == 0:
                await gate.wait()  # the rest is only produced once the client has the first part
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if seen is not None:
            seen.append(await receive())

    return app


def _event(text: str, finish: str | None = None) -> bytes:
    import json

    chunk = {"choices": [{"text": text, "index": 0, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def test_embedded_transport_delivers_events_as_they_are_made() -> None:
    gate = asyncio.Event()
    seen: list[Any] = []
    app = _app([_event("a"), _event("b", "stop"), b"data: [DONE]\n\n"], gate=gate, seen=seen)
    client = AsyncClient("http://embedded/v1", model="m", transport=StreamingASGITransport(app))
    async with client:
        pieces = []
        stream = client.stream("x")
        # With a buffering transport this would wait forever: the app holds the rest back.
        first = await asyncio.wait_for(stream.__anext__(), timeout=30)
        pieces.append(first.text)
        gate.set()
        pieces.extend([p.text async for p in stream])
    assert pieces == ["a", "b"]
    assert b'"stream":true' in seen[0]


async def test_embedded_transport_reports_a_failure_mid_stream() -> None:
    app = _app([_event("a"), _event("b")], fail_after=1)
    client = AsyncClient(
        "http://embedded/v1", model="m", max_retries=0, transport=StreamingASGITransport(app)
    )
    async with client:
        with pytest.raises(APIError, match="broke after data"):
            await client.complete("x", stream=True)


async def test_embedded_transport_tells_the_app_when_the_client_leaves() -> None:
    seen: list[Any] = []
    gate = asyncio.Event()
    app = _app([_event("a"), _event("b", "stop")], gate=gate, seen=seen)

    async def app_that_waits_for_disconnect(scope: Any, receive: Any, send: Any) -> None:
        await app(scope, receive, send)

    transport = StreamingASGITransport(app_that_waits_for_disconnect)
    async with AsyncClient("http://embedded/v1", model="m", transport=transport) as client:
        stream = client.stream("x")
        assert (await stream.__anext__()).text == "a"
        gate.set()
        await stream.aclose()
    assert seen[-1] == {"type": "http.disconnect"}


async def test_embedded_transport_raises_app_errors_before_the_response() -> None:
    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise LookupError("no engine")

    transport = StreamingASGITransport(broken)
    async with httpx.AsyncClient(transport=transport) as http:
        with pytest.raises(LookupError, match="no engine"):
            await http.get("http://embedded/v1/models")


def test_pandas_is_not_needed_to_make_a_completion() -> None:
    import subprocess

    code = (
        "import sys\nfrom nbcompletions import Completion\n"
        "c = Completion({'choices': [{'text': 'hi', 'index': 0}]})\n"
        "repr(c); c._repr_html_(); c.text\n"
        "assert 'pandas' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
