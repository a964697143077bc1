"""Issue 16's numbered cases against the real llama-cpp-python server: each is refused before
sending, corrected to our server's number (within 1e-3), or flagged (`nbcompletions._governance`).

Uses the `llamacpp_server` fixture (tests/peers/llamacpp.py); skips without it. ``verify=False``
shows what the server answers as is (the "before" of each case); our embedded model is the truth.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest

import nbcompletions as nbc
from nbcompletions import Client, ConformanceError, ConformanceWarning

TEXTS = [
    "To be, or not to be, that is the question:",
    "My lord, I",
    "O Romeo, Romeo, wherefore art thou Romeo?",
]


@pytest.fixture(scope="module")
def governed(llamacpp_server: Any) -> Iterator[Client]:
    client = Client(llamacpp_server.base_url, model=llamacpp_server.model, max_retries=0)
    assert client.measures  # a network endpoint: measured when a request depends on it
    yield client
    client.close()


@pytest.fixture(scope="module")
def as_is(llamacpp_server: Any) -> Iterator[Client]:
    client = Client(
        llamacpp_server.base_url, model=llamacpp_server.model, max_retries=0, verify=False
    )
    yield client
    client.close()


def perplexity(completion: nbc.Completion) -> float:
    values = [v for v in completion.tokens["logprob"].tolist()[1:] if not math.isnan(v)]
    return math.exp(-sum(values) / len(values))


def test_score_is_realigned_to_the_truth(
    governed: Client, as_is: Client, embedded_client: Client
) -> None:
    truth = embedded_client.score(["To be, or not to be"])
    before = as_is.score(["To be, or not to be"])
    after = governed.score(["To be, or not to be"])
    assert before["perplexity"][0] > 5 * truth["perplexity"][0]  # the shifted echo
    assert after["n_tokens"].tolist() == truth["n_tokens"].tolist()
    assert after["sum_logprob"][0] == pytest.approx(truth["sum_logprob"][0], abs=1e-3)


def test_hand_echo_perplexities_are_corrected(
    governed: Client, as_is: Client, embedded_client: Client
) -> None:
    # Case 1: complete(echo=True, logprobs=k, max_tokens=0) by hand, as notebook 02 does.
    fields: dict[str, Any] = {"echo": True, "logprobs": 1, "max_tokens": 0}
    for text in TEXTS:
        truth = embedded_client.complete(text, **fields)
        after = governed.complete(text, **fields)
        assert after.tokens["token"].tolist() == truth.tokens["token"].tolist()
        assert perplexity(after) == pytest.approx(perplexity(truth), rel=1e-3)
        assert abs(perplexity(as_is.complete(text, **fields)) - perplexity(truth)) > 1.0


def test_a_greedy_sweep_from_a_plain_client_matches_ours(
    governed: Client, embedded_client: Client
) -> None:
    # Case 2: the detected profile's neutral fields go with each request (repeat penalty off).
    result = nbc.sweep(governed, TEXTS, temperature=0.0, max_tokens=48, progress=False)
    got = result.choices.sort_values("prompt_id")["text"].tolist()
    truth = [embedded_client.complete(t, temperature=0.0, max_tokens=48).text for t in TEXTS]
    assert got == truth


def test_echo_with_generated_tokens_and_stop_are_corrected(
    governed: Client, embedded_client: Client
) -> None:
    # Case 11: echo + generation (the last generated token restored); case 4: the stop token.
    for fields in (
        {"echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0.0},
        {"logprobs": 1, "max_tokens": 12, "temperature": 0.0, "stop": ","},
    ):
        truth = embedded_client.complete(TEXTS[0], **fields)
        after = governed.complete(TEXTS[0], **fields)
        assert after.tokens["token"].tolist() == truth.tokens["token"].tolist(), fields
        # Each token within 1e-3 (the echo sums 45 of them: float32 on both sides).
        assert after.tokens["logprob"].tolist()[1:] == pytest.approx(
            truth.tokens["logprob"].tolist()[1:], abs=1e-3
        )


def test_what_cannot_be_corrected_is_refused_before_sending(governed: Client) -> None:
    # Cases 10 and 14: max_tokens=0 without echo, n, best_of, echo + stream.
    cases: tuple[tuple[dict[str, Any], str], ...] = (
        ({"max_tokens": 0}, "max_tokens_0"),
        ({"n": 2, "max_tokens": 2}, "n"),
        ({"best_of": 3, "max_tokens": 2}, "best_of"),
        ({"echo": True, "stream": True, "max_tokens": 2}, "stream_echo"),
    )
    for fields, check in cases:
        with pytest.raises(ConformanceError) as info:
            governed.complete(TEXTS[1], **fields)
        assert info.value.check == check


def test_byte_tokens_read_as_empty_are_flagged(governed: Client) -> None:
    # Case 13: llama-cpp-python sends "" for byte-level tokens, without their bytes.
    governed.conformance()
    with pytest.warns(ConformanceWarning, match="byte_tokens"):
        got = governed.complete("Grüße, café", echo=True, logprobs=1, max_tokens=1)
    assert "byte_tokens" in got.flags
    assert "byte_tokens" in got.tokens.attrs["conformance_flags"]


def test_frames_take_the_measured_vocabulary_not_gpt2s(llamacpp_server: Any) -> None:
    # Case 6: llama-cpp-python's GET /models says no vocabulary size. A request for alternatives
    # measures the report (which finds 4096) instead of bounding entropy with GPT-2's 50257.
    fresh = Client(llamacpp_server.base_url, model=llamacpp_server.model, max_retries=0)
    with fresh:
        completion = fresh.complete("To be", max_tokens=2, temperature=1.0, logprobs=2)
        assert completion.vocab_size == 4096
    blind = Client(
        llamacpp_server.base_url, model=llamacpp_server.model, max_retries=0, verify=False
    )
    with blind:
        assert blind.complete("To be", max_tokens=2, logprobs=2).vocab_size is None
