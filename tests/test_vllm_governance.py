"""Issue 16's cases against the real vLLM (CPU build): refused before sending, corrected to our
server's numbers, or flagged (`nbcompletions._governance`).

Uses the ``vllm_server`` fixture (tests/peers/vllm.py; skips without vLLM's venv). ``verify=False``
shows what vLLM answers as is; our embedded model is the truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from peers.vllm import VllmServer

from nbcompletions import Client, ConformanceError, ConformanceWarning

PROMPT = "To be, or not to be, that is the question:"

# As tests/test_vllm_conformance.py: the peer takes minutes to start, so CI's full run has these.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def governed(vllm_server: VllmServer) -> Iterator[Client]:
    client = Client(vllm_server.base_url, model=vllm_server.model, max_retries=0)
    yield client
    client.close()


def test_the_kept_stop_token_is_dropped(governed: Client, embedded_client: Client) -> None:
    # Case 4: vLLM keeps the stop token in the logprobs (n_tokens 6, sum -12.30 as is).
    fields: dict[str, Any] = {"max_tokens": 12, "temperature": 0.0, "logprobs": 1, "stop": ","}
    truth = embedded_client.complete(PROMPT, **fields)
    got = governed.complete(PROMPT, **fields)
    assert got.tokens["token"].tolist() == truth.tokens["token"].tolist()
    assert got.tokens["logprob"].sum() == pytest.approx(truth.tokens["logprob"].sum(), abs=1e-3)


def test_max_tokens_0_with_echo_is_sent_as_1(governed: Client, embedded_client: Client) -> None:
    # vLLM refuses max_tokens=0 ("must be at least 1"): scored with one token, dropped.
    fields: dict[str, Any] = {"echo": True, "logprobs": 1, "max_tokens": 0}
    truth = embedded_client.complete(PROMPT, **fields)
    got = governed.complete(PROMPT, **fields)
    assert got.text == PROMPT
    assert got.tokens["token"].tolist() == truth.tokens["token"].tolist()
    assert got.tokens["logprob"].tolist()[1:] == pytest.approx(
        truth.tokens["logprob"].tolist()[1:], abs=1e-3
    )
    assert governed.score([PROMPT])["sum_logprob"][0] == pytest.approx(
        embedded_client.score([PROMPT])["sum_logprob"][0], abs=1e-3
    )


def test_what_vllm_ignores_or_cuts_silently_is_refused(governed: Client) -> None:
    # best_of ignored (V1); prompt + max_tokens past the context silently cut at 256 ("length").
    with pytest.raises(ConformanceError) as info:
        governed.complete(PROMPT, best_of=3, max_tokens=2, temperature=1.0)
    assert info.value.check == "best_of"
    with pytest.raises(ConformanceError) as info:
        governed.complete("word " * 150, max_tokens=200, temperature=0.0)
    assert info.value.check == "context_length"
    assert "151" in str(info.value) or "152" in str(info.value)  # counted by vLLM's /tokenize


def test_empty_byte_tokens_are_flagged(governed: Client) -> None:
    # Case 13: vLLM sends '' for the pieces of a split character, with no bytes to tell them apart.
    governed.conformance()
    with pytest.warns(ConformanceWarning, match="byte_tokens"):
        got = governed.complete("Grüße, café", echo=True, logprobs=1, max_tokens=1)
    assert "byte_tokens" in got.flags
