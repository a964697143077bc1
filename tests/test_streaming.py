"""SSE parsing, chunk merging, and streaming through the client with byte streams split anywhere."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from helpers import Interrupts, mock_client
from hypothesis import given, settings
from hypothesis import strategies as st

from nbcompletions import APIError, AsyncClient, StreamChunk
from nbcompletions._streaming import (
    DONE,
    ServerSentEvent,
    SSEDecoder,
    decode_event,
    iter_events,
    merge_chunks,
)


def events_of(*chunks: bytes) -> list[ServerSentEvent]:
    return list(iter_events(chunks))


# -- the SSE parser --------------------------------------------------------------------------------
def test_lf_and_crlf_and_cr_line_ends() -> None:
    for eol in (b"\n", b"\r\n", b"\r"):
        stream = b"data: a" + eol + eol + b"data: b" + eol + eol
        assert [e.data for e in events_of(stream)] == ["a", "b"], eol


def test_comment_lines_are_skipped() -> None:
    stream = b": ping\n\n:\n\ndata: x\n: inside an event\n\n: ping - 2024\n\n"
    assert [e.data for e in events_of(stream)] == ["x"]


def test_multi_line_data_is_joined_with_newlines() -> None:
    stream = b'data: {"a":\ndata: 1}\n\n'
    assert [e.data for e in events_of(stream)] == ['{"a":\n1}']
    assert json.loads(events_of(stream)[0].data) == {"a": 1}


def test_event_id_and_retry_fields_do_not_change_data() -> None:
    stream = b"event: completion\nid: 7\nretry: 1000\ndata: x\n\ndata: y\n\n"
    events = events_of(stream)
    assert [(e.event, e.data) for e in events] == [("completion", "x"), ("message", "y")]
    assert events[0].id == "7"


def test_field_without_space_and_field_without_colon() -> None:
    assert [e.data for e in events_of(b"data:x\n\ndata\n\n")] == ["x", ""]


def test_byte_order_mark_and_utf8_split_inside_a_character() -> None:
    text = "data: héllo ☃\n\n".encode()
    split = text.index("☃".encode()) + 1
    assert [e.data for e in events_of(b"\xef\xbb\xbf" + text[:split], text[split:])] == ["héllo ☃"]


def test_crlf_split_between_cr_and_lf_is_one_line_end() -> None:
    # "\r" ends one chunk and "\n" starts the next: that is one line end, not an empty line.
    assert [e.data for e in events_of(b"data: a\r", b"\ndata: b\r\n\r\n")] == ["a\nb"]


def test_last_event_without_blank_line_is_dispatched_at_the_end() -> None:
    assert [e.data for e in events_of(b"data: x\n\ndata: [DONE]")] == ["x", "[DONE]"]
    assert [e.data for e in events_of(b"data: x\n\ndata: [DONE]\n")] == ["x", "[DONE]"]


def test_pending_reports_an_unfinished_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b'data: {"a"') == []
    assert decoder.pending


_SAMPLE = (
    ": ping\r\n\r\n"
    'data: {"id":"c1","choices":[{"text":"Hé","index":0,"finish_reason":null}]}\r\n\r\n'
    'event: message\nid: 2\ndata: {"id":"c1","choices":[{"text":"llo",\ndata: "index":0}]}\n\n'
    'data: {"id":"c1","choices":[{"delta":{"content":" ☃"},"index":1,"finish_reason":"stop"}]}\r\r'
    'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":1,"completion_tokens":3,'
    '"total_tokens":4}}\n\n'
    "data: [DONE]\n\n"
).encode()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(_SAMPLE)), max_size=12))
def test_any_split_of_the_byte_stream_gives_the_same_events(cuts: list[int]) -> None:
    points = sorted(set(cuts))
    chunks = [_SAMPLE[a:b] for a, b in zip([0, *points], [*points, len(_SAMPLE)], strict=True)]
    assert events_of(*chunks) == events_of(_SAMPLE)


_line_text = st.text(
    alphabet=st.characters(exclude_characters="\r\n", exclude_categories=["Cs"]), max_size=20
)


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(st.lists(_line_text, min_size=1, max_size=3), min_size=1, max_size=5),
    eol=st.sampled_from(["\n", "\r\n", "\r"]),
    comments=st.booleans(),
    data=st.data(),
)
def test_round_trip_of_generated_events(
    events: list[list[str]], eol: str, comments: bool, data: st.DataObject
) -> None:
    text = ""
    for lines in events:
        if comments:
            text += ": keep-alive" + eol
        text += "".join(f"data: {line}{eol}" for line in lines) + eol
    raw = text.encode()
    cuts = data.draw(st.lists(st.integers(0, len(raw)), max_size=6))
    points = sorted(set(cuts))
    chunks = [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]
    assert [e.data for e in events_of(*chunks)] == ["\n".join(lines) for lines in events]


# -- event decoding and merging --------------------------------------------------------------------
def test_done_and_error_events() -> None:
    assert decode_event(ServerSentEvent("[DONE]")) is DONE
    with pytest.raises(APIError) as info:
        decode_event(
            ServerSentEvent(
                json.dumps(
                    {"error": {"message": "overloaded", "type": "server_error", "code": 503}}
                )
            )
        )
    assert info.value.message == "overloaded"
    assert info.value.code == "503"
    assert info.value.status is None
    with pytest.raises(APIError, match="flat"):
        decode_event(
            ServerSentEvent(
                json.dumps(
                    {"object": "error", "message": "flat", "type": "BadRequestError", "code": 400}
                )
            )
        )
    with pytest.raises(APIError, match="not JSON"):
        decode_event(ServerSentEvent('{"choices": [{"te'))
    with pytest.raises(APIError, match="upstream timed out"):
        decode_event(ServerSentEvent('{"message": "upstream timed out"}', event="error"))
    with pytest.raises(APIError, match="not an object"):
        decode_event(ServerSentEvent("[1, 2]"))


def test_merge_matches_the_non_streamed_shape() -> None:
    lp = {
        "tokens": ["A"],
        "token_logprobs": [-0.5],
        "top_logprobs": [{"A": -0.5}],
        "text_offset": [3],
    }
    lp2 = {
        "tokens": ["B", "C"],
        "token_logprobs": [-1.0, -2.0],
        "top_logprobs": [{"B": -1.0}, {"C": -2.0}],
        "text_offset": [4, 5],
    }
    chunks: list[dict[str, Any]] = [
        {
            "id": "c",
            "object": "text_completion",
            "created": 5,
            "model": "m",
            "choices": [{"text": "B", "index": 1, "logprobs": lp, "finish_reason": None}],
            "usage": None,
        },
        {
            "id": "c",
            "object": "text_completion",
            "created": 5,
            "model": "m",
            "choices": [{"text": "A", "index": 0, "logprobs": lp, "finish_reason": None}],
            "usage": None,
        },
        {
            "id": "c",
            "choices": [
                {"text": "BC", "index": 0, "logprobs": lp2, "finish_reason": "length"},
                {"text": "x", "index": 1, "logprobs": lp2, "finish_reason": "stop"},
            ],
            "usage": None,
        },
        {
            "id": "c",
            "choices": [],
            "usage": {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8},
        },
    ]
    merged = merge_chunks(chunks)
    assert (merged["id"], merged["model"], merged["created"]) == ("c", "m", 5)
    assert merged["object"] == "text_completion"
    assert [c["index"] for c in merged["choices"]] == [0, 1]
    first = merged["choices"][0]
    assert first["text"] == "ABC"
    assert first["finish_reason"] == "length"
    assert first["logprobs"] == {
        "tokens": ["A", "B", "C"],
        "token_logprobs": [-0.5, -1.0, -2.0],
        "top_logprobs": [{"A": -0.5}, {"B": -1.0}, {"C": -2.0}],
        "text_offset": [3, 4, 5],
    }
    assert merged["choices"][1]["text"] == "Bx"
    assert merged["usage"] == {"prompt_tokens": 2, "completion_tokens": 6, "total_tokens": 8}


def test_merge_of_chat_shaped_chunks_and_logprobs() -> None:
    chunks = [
        {
            "choices": [
                {
                    "delta": {"role": "assistant", "content": "Hi"},
                    "index": 0,
                    "logprobs": {"content": [{"token": "Hi", "logprob": -0.1, "top_logprobs": []}]},
                }
            ]
        },
        {
            "choices": [
                {
                    "delta": {"content": " there"},
                    "index": 0,
                    "finish_reason": "stop",
                    "logprobs": {
                        "content": [{"token": " there", "logprob": -0.2, "top_logprobs": []}]
                    },
                }
            ]
        },
    ]
    merged = merge_chunks(chunks)
    assert merged["choices"][0]["text"] == "Hi there"
    assert [t["token"] for t in merged["choices"][0]["logprobs"]["content"]] == ["Hi", " there"]


def test_merge_without_logprobs_keeps_null() -> None:
    merged = merge_chunks(
        [{"choices": [{"text": "a", "index": 0, "logprobs": None, "finish_reason": "stop"}]}]
    )
    assert merged["choices"] == [
        {"text": "a", "index": 0, "logprobs": None, "finish_reason": "stop"}
    ]
    assert merged["usage"] is None


# -- streaming through the client, with MockTransport byte streams ---------------------------------
def _chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
    }


def _sse(*objects: Any, done: bool = True) -> bytes:
    out = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objects)
    return out + (b"data: [DONE]\n\n" if done else b"")


class _Pieces(httpx.AsyncByteStream):
    """A response body delivered in the given pieces, optionally failing after some of them."""

    def __init__(self, pieces: list[bytes], fail_after: int | None = None) -> None:
        self.pieces = pieces
        self.fail_after = fail_after

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i, piece in enumerate(self.pieces):
            if self.fail_after is not None and i == self.fail_after:
                raise httpx.RemoteProtocolError("peer closed connection")
            yield piece


@pytest.fixture
def delays(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    recorded: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        recorded.append(seconds)

    monkeypatch.setattr("nbcompletions._retry.sleep", fake_sleep)
    return recorded


def test_stream_yields_pieces_in_order_from_awkward_splits() -> None:
    body = _sse(
        _chunk(0, "Hel"), _chunk(1, "Wor"), _chunk(0, "lo", "stop"), _chunk(1, "ld", "length")
    )
    pieces = [body[i : i + 7] for i in range(0, len(body), 7)]
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(
            200, stream=_Pieces(pieces), headers={"content-type": "text/event-stream"}
        )

    with mock_client(handler) as client:
        stream = client.stream("Hi", n=2)
        chunks = list(stream)
        assert all(isinstance(c, StreamChunk) for c in chunks)
        assert [(c.index, c.text, c.finish_reason) for c in chunks] == [
            (0, "Hel", None),
            (1, "Wor", None),
            (0, "lo", "stop"),
            (1, "ld", "length"),
        ]
        assert json.loads(seen[0].content)["stream"] is True
        merged = stream.completion()
        assert merged.raw["choices"][1]["text"] == "World"
        completion = client.complete("Hi", n=2, stream=True)
        assert [c["text"] for c in completion.raw["choices"]] == ["Hello", "World"]
        assert completion.text == "Hello"
        assert completion.request is not None
        assert completion.request.stream is True


def test_stream_usage_chunk_is_kept() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    body = _sse(
        {**_chunk(0, "a", "stop"), "usage": None}, {"id": "cmpl-1", "choices": [], "usage": usage}
    )

    with mock_client(lambda request: httpx.Response(200, content=body)) as client:
        stream = client.stream("x", stream_options={"include_usage": True})
        assert [c.text for c in stream] == ["a"]
        assert stream.usage == usage
        assert (
            client.complete("x", stream=True, stream_options={"include_usage": True}).usage == usage
        )


def test_error_event_mid_stream_raises_api_error() -> None:
    body = (
        _sse(_chunk(0, "partial"), done=False)
        + b'data: {"error": {"message": "engine died", "type": "server_error", '
        b'"param": null, "code": null}}\n\ndata: [DONE]\n\n'
    )
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        return httpx.Response(200, content=body)

    with mock_client(handler) as client:
        stream = client.stream("x")
        assert next(stream).text == "partial"
        with pytest.raises(APIError, match="engine died") as info:
            next(stream)
        assert info.value.type == "server_error"
        with pytest.raises(APIError, match="engine died"):
            client.complete("x", stream=True)
    assert len(calls) == 2


def test_broken_stream_after_data_is_not_retried(delays: list[float]) -> None:
    first = _sse(_chunk(0, "a"), done=False)
    body = _sse(_chunk(0, "a"), _chunk(0, "b", "stop"))
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        # The first event arrives whole, then the connection drops in the middle of the second.
        return httpx.Response(
            200, stream=_Pieces([first, body[len(first) : len(first) + 10]], fail_after=1)
        )

    with mock_client(handler) as client, pytest.raises(APIError, match="broke after data") as info:
        client.complete("x", stream=True)
    assert info.value.type == "stream_broken"
    assert len(calls) == 1
    assert delays == []


def test_stream_failing_before_any_data_is_retried(delays: list[float]) -> None:
    body = _sse(_chunk(0, "ok", "stop"))
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(1)
        if len(calls) == 1:
            return httpx.Response(200, stream=_Pieces([body], fail_after=0))
        if len(calls) == 2:
            return httpx.Response(
                429, json={"error": {"message": "slow down"}}, headers={"retry-after": "3"}
            )
        return httpx.Response(200, content=body)

    with mock_client(handler) as client:
        assert client.complete("x", stream=True).text == "ok"
    assert len(calls) == 3
    assert delays[1] == 3.0


def test_stream_cut_without_done_raises() -> None:
    body = _sse(_chunk(0, "a"), done=False)
    with (
        mock_client(lambda request: httpx.Response(200, content=body)) as client,
        pytest.raises(APIError, match="before \\[DONE\\]"),
    ):
        client.complete("x", stream=True)


def test_stream_cut_inside_json_raises() -> None:
    body = _sse(_chunk(0, "a"), done=False) + b'data: {"choices": [{"te'
    with (
        mock_client(lambda request: httpx.Response(200, content=body)) as client,
        pytest.raises(APIError, match="not JSON"),
    ):
        client.complete("x", stream=True)


def test_stream_without_done_but_finished_is_accepted() -> None:
    body = _sse(_chunk(0, "a", "stop"), done=False)
    with mock_client(lambda request: httpx.Response(200, content=body)) as client:
        assert client.complete("x", stream=True).text == "a"


def test_stream_http_error_before_data() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(
            400,
            json={
                "error": {
                    "message": "bad n",
                    "type": "invalid_request_error",
                    "param": "n",
                    "code": None,
                }
            },
        )

    with mock_client(handler) as client, pytest.raises(APIError) as info:
        list(client.stream("x"))
    assert (info.value.status, info.value.param) == (400, "n")


def test_stream_closed_early_releases_the_response() -> None:
    closed = []

    class Tracking(_Pieces):
        async def aclose(self) -> None:
            closed.append(True)

    body = _sse(*[_chunk(0, str(i)) for i in range(50)], _chunk(0, "!", "stop"))

    with mock_client(
        lambda request: httpx.Response(200, stream=Tracking([body[:200], body[200:]]))
    ) as client:
        with client.stream("x") as stream:
            assert next(stream).text == "0"
        assert closed == [True]


def test_stream_false_is_refused_by_stream() -> None:
    with (
        mock_client(lambda request: httpx.Response(500)) as client,
        pytest.raises(ValueError, match="stream"),
    ):
        client.stream("x", stream=False)


async def test_async_stream_iterates_with_async_for() -> None:
    body = _sse(_chunk(0, "a"), _chunk(0, "b", "stop"))
    client = AsyncClient(
        "http://test/v1",
        model="m",
        transport=httpx.MockTransport(lambda r: httpx.Response(200, content=body)),
    )
    async with client:
        texts = [piece.text async for piece in client.stream("x")]
        assert texts == ["a", "b"]
        async with client.stream("x") as stream:
            completion = await stream.completion()
        assert completion.text == "ab"


def test_interrupting_a_sync_stream_closes_the_response() -> None:
    # Jupyter's "interrupt kernel" while a cell iterates a stream: KeyboardInterrupt reaches the
    # caller, the pending read is cancelled and the HTTP response is closed.
    import asyncio
    import threading

    first_sent = threading.Event()
    closed = threading.Event()

    class Stalling(httpx.AsyncByteStream):
        async def __aiter__(self) -> AsyncIterator[bytes]:
            yield _sse(_chunk(0, "a"), done=False)
            first_sent.set()
            await asyncio.Event().wait()  # the server goes quiet
            yield b""

        async def aclose(self) -> None:
            closed.set()

    interrupts = Interrupts()

    def interrupt() -> None:
        first_sent.wait(10)
        interrupts.start()

    with mock_client(lambda request: httpx.Response(200, stream=Stalling())) as client:
        stream = client.stream("x")
        assert next(stream).text == "a"
        interrupter = threading.Thread(target=interrupt)
        interrupter.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                next(stream)
        finally:
            interrupts.arrived()
            interrupter.join()
        assert closed.wait(10)


def test_breaking_out_of_a_stream_without_closing_it_releases_the_response() -> None:
    closed = []

    class Tracking(_Pieces):
        async def aclose(self) -> None:
            closed.append(True)

    body = _sse(*[_chunk(0, str(i)) for i in range(50)], _chunk(0, "!", "stop"))
    with mock_client(
        lambda request: httpx.Response(200, stream=Tracking([body[:200], body[200:]]))
    ) as client:
        for piece in client.stream("x"):
            assert piece.text == "0"
            break
        assert closed == [True]
