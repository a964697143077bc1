"""Scoring text and probing capabilities, on the embedded model; faults via httpx.MockTransport."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from helpers import mock_client

from nbcompletions import APIError, AsyncClient, Client, RequestError
from nbcompletions._conformance import aconformance
from nbcompletions._scoring import acapabilities, ascore
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"


def faulty_client(
    app: Any, fault: Callable[[dict[str, Any]], httpx.Response | None]
) -> AsyncClient:
    """An AsyncClient on the real app, with ``fault(body)`` able to answer instead of it."""
    real = StreamingASGITransport(app)

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        answer = fault(body)
        if answer is not None:
            return answer
        response = await real.handle_async_request(request)
        if (
            body.get("echo")
            and not body.get("stream")
            and getattr(fault, "strip_prompt_logprobs", False)
        ):
            await response.aread()
            data = json.loads(response.content)
            for choice in data.get("choices", []):  # the suffix probe is a 400
                choice["logprobs"] = None
            return httpx.Response(200, json=data)
        return response

    return mock_client(
        handler, cls=AsyncClient, base_url="http://embedded/v1", model=MODEL, max_retries=0
    )


def test_score_matches_the_echoed_logprobs(embedded_client: Client) -> None:
    text = "To be, or not to be, that is the question"
    scores = embedded_client.score([text, "My lord"])
    assert scores.columns.tolist() == [
        "text",
        "context",
        "n_tokens",
        "sum_logprob",
        "mean_logprob",
        "perplexity",
        "n_unscored",
        "straddles",
    ]
    direct = embedded_client.complete(text, echo=True, logprobs=1, max_tokens=0)
    logprobs = direct.tokens["logprob"]
    row = scores.iloc[0]
    # The first token has no logprob (nothing precedes it): scored tokens are the rest.
    assert row["n_tokens"] == len(logprobs) - 1
    assert row["n_unscored"] == 1
    assert row["sum_logprob"] == pytest.approx(logprobs.iloc[1:].sum(), rel=1e-9)
    assert row["mean_logprob"] == pytest.approx(row["sum_logprob"] / row["n_tokens"])
    assert row["perplexity"] == pytest.approx(math.exp(-row["mean_logprob"]))
    assert row["context"] is None
    assert not row["straddles"]


def test_continuation_scores_add_up(embedded_client: Client) -> None:
    context = "Good morrow, my lord."
    text = " How fares the king?"
    whole = embedded_client.score(context + text).iloc[0]
    head = embedded_client.score(context).iloc[0]
    tail = embedded_client.score(text, context=context).iloc[0]
    assert not tail["straddles"]
    assert tail["context"] == context
    assert tail["n_unscored"] == 0
    # log P(context + text) = log P(context) + log P(text | context), token for token.
    assert head["n_tokens"] + tail["n_tokens"] == whole["n_tokens"]
    assert head["sum_logprob"] + tail["sum_logprob"] == pytest.approx(
        whole["sum_logprob"], rel=1e-4
    )


def test_straddling_token_is_flagged(embedded_client: Client) -> None:
    # GPT-2's tokenizer merges "cat" + "s" into one token "cats": it spans the boundary.
    scores = embedded_client.score(["s sat", " sat"], context=["The cat", "The cat"])
    assert scores["straddles"].tolist() == [True, False]
    assert (scores["n_tokens"] >= 1).all()


def test_context_ending_in_a_space_scores_as_lm_eval_does(embedded_client: Client) -> None:
    # lm-evaluation-harness moves a context's trailing space into the continuation; the token
    # " How" then belongs to the text, and only that space of the context is in it: no straddle
    # worth a warning, and the same score as writing the space at the start of the text.
    moved = embedded_client.score("How fares the king?", context="Good morrow, my lord. ")
    plain = embedded_client.score(" How fares the king?", context="Good morrow, my lord.")
    assert not moved["straddles"].item()
    assert moved["n_tokens"].item() == plain["n_tokens"].item()
    assert moved["sum_logprob"].item() == pytest.approx(plain["sum_logprob"].item(), rel=1e-6)


def test_score_validates(embedded_client: Client) -> None:
    with pytest.raises(RequestError, match="context must be None, a string, or a list of 2"):
        embedded_client.score(["a", "b"], context=["x"])
    with pytest.raises(RequestError, match=r"texts\[1\] is empty"):
        embedded_client.score(["a", ""])
    with pytest.raises(RequestError, match="texts must be a string"):
        embedded_client.score(3)  # type: ignore[arg-type]  # the refusal under test


async def test_server_refusing_echo_with_logprobs_says_so(app: Any) -> None:
    def refuse(body: dict[str, Any]) -> httpx.Response | None:
        if body.get("echo") and body.get("logprobs") is not None:
            return httpx.Response(
                400,
                json={
                    "error": {
                        "message": "echo is not supported together with logprobs",
                        "type": "invalid_request_error",
                        "param": "echo",
                        "code": None,
                    }
                },
            )
        return None

    aclient = faulty_client(app, refuse)
    try:
        with pytest.raises(APIError, match="refused echo with logprobs") as info:
            await ascore(aclient, "To be")
        assert info.value.type == "echo_logprobs_unsupported"
        assert info.value.status == 400
        checks = (await acapabilities(aclient))["checks"]
        assert checks["echo_alignment"]["status"] == "unsupported"
        assert "echo is not supported" in checks["echo_alignment"]["detail"]
        assert checks["logprobs_cap"]["status"] == "ok"  # the rest came from the real app
    finally:
        await aclient.close()


async def test_server_dropping_prompt_logprobs_says_so(app: Any) -> None:
    def passthrough(body: dict[str, Any]) -> None:
        return None

    # A flag on the function itself, which faulty_client reads with getattr.
    passthrough.strip_prompt_logprobs = True  # type: ignore[attr-defined]
    aclient = faulty_client(app, passthrough)
    try:
        with pytest.raises(APIError, match="dropped them silently"):
            await ascore(aclient, "To be")
        echo = (await acapabilities(aclient))["checks"]["echo_alignment"]
        assert echo["status"] == "fails"
        assert echo["evidence"]["kind"] == "dropped"
    finally:
        await aclient.close()


async def test_capabilities_of_the_embedded_server(app: Any) -> None:
    aclient = AsyncClient("http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app))
    try:
        capabilities = await acapabilities(aclient)
        # It is the conformance report (tests/test_conformance.py checks it in detail).
        assert capabilities["ok"] is True
        assert capabilities["checks"]["echo_alignment"]["status"] == "ok"
        assert capabilities["checks"]["logprobs_cap"]["evidence"] == {"asked": 5, "returned": 5}
        assert capabilities["checks"]["text_offset"]["evidence"] == {"origin": "prompt"}
        # Cached on the client: asking again sends nothing and gives the same answer.
        assert await acapabilities(aclient) == capabilities
        assert await aclient.capabilities() == capabilities
    finally:
        await aclient.close()


def _llamacpp_like(body: dict[str, Any]) -> httpx.Response:
    """llama.cpp's shape: echo refused, chat-shaped logprobs whose non-ASCII byte tokens all come
    back as "" (one position can list "" twice) and whose top entries may hold a null logprob."""
    if body.get("echo"):
        return httpx.Response(400, json={"error": {"message": "echo is not supported"}})
    asked = body.get("logprobs") or 0
    top = [{"token": "", "logprob": -1.0 - k} for k in range(2)]
    top += [{"token": f"t{k}", "logprob": None if k == 0 else -3.0 - k} for k in range(asked - 2)]
    content = [{"token": "", "logprob": -1.0, "bytes": [226], "top_logprobs": top}]
    return httpx.Response(
        200,
        json={
            "choices": [
                {
                    "text": "",
                    "index": 0,
                    "finish_reason": "length",
                    "logprobs": {"content": content},
                }
            ]
        },
    )


async def test_conformance_counts_duplicate_byte_tokens_and_null_logprobs() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return httpx.Response(200, json={"object": "list", "data": [{"id": MODEL}]})
        return _llamacpp_like(json.loads(request.content))

    aclient = AsyncClient(
        "http://llama/v1", model=MODEL, transport=httpx.MockTransport(handler), max_retries=0
    )
    try:
        report = await aconformance(aclient)
    finally:
        await aclient.close()
    assert report.status("echo_alignment") != "ok"
    # Each listed alternative counts, even two byte tokens rendered alike or one without a logprob
    # (a dict keyed by token would have merged the two "" entries and counted 4).
    cap = report.checks["logprobs_cap"]
    assert "got up to 5" in cap.detail, cap.detail


def test_scoring_reads_logprobs_with_the_shared_parser() -> None:
    from nbcompletions._scoring import echo_columns

    raw = _llamacpp_like({"logprobs": 3}).json()
    columns = echo_columns(raw)
    assert columns is not None
    # A null top logprob stays null (it was read as 0.0, "certain"); duplicates stay apart.
    assert columns.tops == [[("", -1.0), ("", -2.0), ("t0", None)]]
    # The chosen token is read from its bytes (issue 16 case 13): a partial character, not "".
    assert columns.tokens == ["bytes:\\xe2"]
    assert columns.logprobs == [-1.0]
