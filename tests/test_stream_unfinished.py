"""Issue 16 case 5: a stream whose ``[DONE]`` comes before a choice's ``finish_reason`` is cut.

llama-cpp-python 0.3.36 does it to concurrent streams (one token, then ``[DONE]``): the stream is
an error (`APIError` ``stream_unfinished``) from `Client.stream` and ``complete(stream=True)``, and
an error row in a sweep, never an ok result. MockTransport injects the cut stream; the peer test
sends the issue's sweep (8 streamed requests at once) to the real server.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import httpx
import pytest
from helpers import mock_client

from nbcompletions import APIError, SweepWarning, sweep


def _chunk(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": text, "index": index, "logprobs": None, "finish_reason": finish}],
    }


def _sse(*objects: Any) -> bytes:
    out = b"".join(b"data: " + json.dumps(o).encode() + b"\n\n" for o in objects)
    return out + b"data: [DONE]\n\n"


CUT = _sse(_chunk(0, " the"))
WHOLE = _sse(_chunk(0, " the"), _chunk(0, " end", "length"))
HEADERS = {"content-type": "text/event-stream"}


def _answer(body: bytes) -> Any:
    return lambda request: httpx.Response(200, content=body, headers=HEADERS)


def test_complete_stream_cut_before_finish_reason_is_an_error() -> None:
    with mock_client(_answer(CUT)) as client:
        with pytest.raises(APIError, match=r"before choice\(s\) 0 had a finish_reason") as info:
            client.complete("x", stream=True, max_tokens=5)
        assert info.value.type == "stream_unfinished"
        stream = client.stream("x", max_tokens=5)
        pieces = [next(stream).text]  # what came is seen; the cut is said after it
        with pytest.raises(APIError, match="finish_reason"):
            next(stream)
    assert pieces == [" the"]


def test_only_the_cut_choice_is_named() -> None:
    body = _sse(_chunk(0, "a"), _chunk(1, "b"), _chunk(1, "c", "stop"))
    with (
        mock_client(_answer(body)) as client,
        pytest.raises(APIError, match=r"choice\(s\) 0 had") as info,
    ):
        client.complete("x", stream=True, n=2, max_tokens=5)
    assert info.value.type == "stream_unfinished"


def test_finished_streams_are_unchanged() -> None:
    with mock_client(_answer(WHOLE)) as client:
        completion = client.complete("x", stream=True, max_tokens=5)
    assert completion.choices["text"].tolist() == [" the end"]
    assert completion.choices["finish_reason"].tolist() == ["length"]


def test_a_sweep_counts_cut_streams_as_error_rows() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        prompt = json.loads(request.content)["prompt"]
        return httpx.Response(200, content=CUT if prompt == "cut" else WHOLE, headers=HEADERS)

    with (
        mock_client(handler) as client,
        pytest.warns(SweepWarning, match="1 of 2 sweep requests failed"),
    ):
        result = sweep(
            client,
            prompt=["cut", "whole"],
            max_tokens=5,
            stream=True,
            progress=False,
            probe=False,
            fail_fast=None,
            manifest=False,
        )
    requests = result.requests.set_index("prompt")
    assert requests.loc["cut", "status"] == "error"
    assert requests.loc["cut", "error_type"] == "stream_unfinished"
    assert requests.loc["whole", "status"] == "ok"


@pytest.mark.slow
def test_llamacpp_concurrent_cut_streams_are_error_rows(llamacpp_server: Any) -> None:
    """The issue's case: 8 streamed requests at once to llama-cpp-python; before, 7 of 8 were
    one token with no finish_reason, counted ok. Every row is now either finished or an error."""
    from nbcompletions import Client

    client = Client(llamacpp_server.base_url, model=llamacpp_server.model, max_concurrency=8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SweepWarning)
            result = sweep(
                client,
                prompt=[f"ROMEO {i}.\n" for i in range(8)],
                max_tokens=20,
                temperature=0,
                stream=True,
                progress=False,
                probe=False,
                fail_fast=None,
                manifest=False,
            )
    finally:
        client.close()
    requests = result.requests
    ok = requests["status"] == "ok"
    assert (requests.loc[~ok, "error_type"] == "stream_unfinished").all()
    finished = result.choices.loc[result.choices["finish_reason"].notna()]
    assert len(finished) == ok.sum()
    assert ok.sum() < 8  # the server still cuts them: it is the counting that changed
