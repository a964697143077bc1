"""score_reply and chat_conformance against a real vLLM (CPU build 0.32) serving our model with its
chat template (tokenizer_config.json), next to our server (fixtures in tests/peers/vllm.py; skipped
without the peer's venv; NBC_VLLM_URL names one already running)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import nbcompletions as nbc

MESSAGES = [
    {"role": "system", "content": "Speak as a guard."},
    {"role": "user", "content": "Who is there?"},
]
REPLY = "Nay, answer me: stand, and unfold yourself."

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def vllm(vllm_url: str) -> Iterator[nbc.Client]:
    client = nbc.Client(vllm_url, model="nbc-shakespeare", limits=nbc.Limits.vllm())
    yield client
    client.close()


def test_vllm_scores_a_reply_both_ways_as_our_server_does(
    vllm: nbc.Client, embedded_client: nbc.Client
) -> None:
    served = vllm.score_reply(MESSAGES, REPLY)
    assert (served.method, served.summary["template"]) == ("prompt_logprobs", "server")
    # The echo way on vLLM's own rendering (/v1/chat/completions/render, --enable-scale-out).
    echoed = vllm.score_reply(MESSAGES, REPLY, method="echo")
    assert (echoed.summary["template"], echoed.summary["verified"]) == ("render", True)
    ours = embedded_client.score_reply(MESSAGES, REPLY)
    for other in (echoed, ours):
        assert served.tokens["token"].tolist() == other.tokens["token"].tolist()
        assert served.tokens["token_id"].tolist() == other.tokens["token_id"].tolist()
    # Measured: 0.0 between vLLM's two ways, 3.8e-6 at most from ours (float32 on both).
    assert served.tokens["logprob"].tolist() == pytest.approx(
        echoed.tokens["logprob"].tolist(), abs=1e-6
    )
    assert served.tokens["logprob"].tolist() == pytest.approx(
        ours.tokens["logprob"].tolist(), abs=1e-4
    )


def test_vllm_renders_a_chat_as_our_server_does(vllm: nbc.Client, embedded_engine: Any) -> None:
    from nbcompletions.model import render_chat

    reply = [*MESSAGES, {"role": "assistant", "content": REPLY}]
    body = {"model": "nbc-shakespeare", "messages": reply, "add_generation_prompt": False}
    answer = vllm.request("POST", "/chat/completions/render", json=body)
    ours = embedded_engine.encode(render_chat(reply, False))
    tokenized = vllm.request("POST", "/../tokenize", json=body)
    assert answer["token_ids"] == tokenized["tokens"] == ours


def test_a_reply_with_split_characters_is_scored_both_ways_alike(vllm: nbc.Client) -> None:
    reply = "Grüße, café — “quoted”"  # characters that span several byte tokens
    served = vllm.score_reply(MESSAGES, reply)
    echoed = vllm.score_reply(MESSAGES, reply, method="echo")
    assert echoed.summary["template"] == "render"
    assert served.tokens["token_id"].tolist() == echoed.tokens["token_id"].tolist()
    assert served.sum_logprob == pytest.approx(echoed.sum_logprob, abs=1e-6)


def test_vllm_chat_conformance(vllm: nbc.Client) -> None:
    report = vllm.chat_conformance()
    assert report.ok, report
    assert report.evidence("chat_logprobs_mode")["mode"] == "raw"  # vLLM's default logprobs-mode
    assert report.evidence("chat_top_logprobs_cap") == {
        "returned": 20,
        "over_cap": "refused",  # --max-logprobs 20
        "over_cap_returned": None,
    }
    assert report.status("chat_reply_span") == "ok"
