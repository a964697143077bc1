"""Issue 16 against ggml's real llama-server (llama.cpp tools/server, built from the sources in the
llama-cpp-python 0.3.36 sdist): what conformance() measures there, with its evidence, and each
numbered case refused before sending, corrected to our server's number (within 1e-3), or flagged.

Uses the `llamaserver` fixture (tests/peers/llamaserver.py); skips without the binary, fails under
NBC_REQUIRE_LLAMASERVER=1. ``verify=False`` is the "before" of each case; the embedded model is the
truth.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

import nbcompletions as nbc
from nbcompletions import Client, ConformanceError

TEXTS = [
    "To be, or not to be, that is the question:",
    "My lord, I",
    "O Romeo, Romeo, wherefore art thou Romeo?",
]


@pytest.fixture(scope="module")
def governed(llamaserver: Any) -> Iterator[Client]:
    client = Client(llamaserver.base_url, model=llamaserver.model, max_retries=0)
    yield client
    client.close()


@pytest.fixture(scope="module")
def as_is(llamaserver: Any) -> Iterator[Client]:
    client = Client(llamaserver.base_url, model=llamaserver.model, max_retries=0, verify=False)
    yield client
    client.close()


def test_conformance_finds_each_deviation_with_its_evidence(governed: Client) -> None:
    report = governed.conformance(refresh=True)
    assert report.profile_name == "llama-server"
    assert report.requests <= 25
    assert report.status("echo_alignment") == "fails"
    assert report.evidence("echo_alignment")["kind"] == "ignored"
    assert report.status("echo_generated") == "unsupported"
    # llama-server drops the stop token from the logprobs (measured with logprobs=1: it reads
    # logprobs=0 as "none").
    assert report.status("stop_in_logprobs") == "ok"
    assert report.status("best_of") == "fails"
    assert report.status("n") == "unsupported"  # HTTP 400 with -np 1
    assert report.status("stream_echo") == "fails"
    assert report.status("default_sampling") == "fails"
    assert report.status("sampler_order") == "fails"
    assert report.evidence("sampler_order")["order"] == "top_p_first"
    assert report.evidence("byte_tokens")["bytes_field"] is True
    assert report.evidence("context_length") == {"context_length": 256, "source": "card"}
    assert (report.context_length, report.vocab_size) == (256, 4096)
    eot = report.evidence("end_of_text")
    assert (eot["in_logprobs"], eot["in_usage"]) == (True, True)
    assert report.status("stream_finish") == "ok"
    # Its penalties count the prompt's tokens too, over the last 64 of prompt and generation.
    assert report.status("penalty_window") == "fails"
    assert report.evidence("penalty_window")["counts_prompt"] is True
    assert report.evidence("penalty_window")["window_tokens"] == 64
    assert report.requests <= 25


def test_score_and_hand_echo_are_refused_before_sending(governed: Client, as_is: Client) -> None:
    before = as_is.score(["To be, or not to be"])
    assert before["n_tokens"][0] == 1  # one generated token's logprob passed off as the text's
    for call in (
        lambda: governed.score(["To be, or not to be"]),
        lambda: governed.complete(TEXTS[0], echo=True, logprobs=1, max_tokens=0),
        lambda: governed.complete(TEXTS[0], echo=True, logprobs=1, max_tokens=3),
    ):
        with pytest.raises(ConformanceError) as info:
            call()
        assert info.value.check == "echo_alignment"


def test_a_greedy_sweep_from_a_plain_client_matches_ours(
    governed: Client, embedded_client: Client
) -> None:
    # The detected profile's neutral fields (top_k 0, min_p 0, repeat_penalty 1) go along.
    result = nbc.sweep(governed, TEXTS, temperature=0.0, max_tokens=48, progress=False)
    got = result.choices.sort_values("prompt_id")["text"].tolist()
    truth = [embedded_client.complete(t, temperature=0.0, max_tokens=48).text for t in TEXTS]
    assert got == truth


def test_stop_with_logprobs_matches_ours(governed: Client, embedded_client: Client) -> None:
    fields: dict[str, Any] = {"logprobs": 1, "max_tokens": 12, "temperature": 0.0, "stop": ","}
    truth = embedded_client.complete(TEXTS[0], **fields)
    after = governed.complete(TEXTS[0], **fields)
    assert after.tokens["token"].tolist() == truth.tokens["token"].tolist()
    # f16 GGUF on ggml's CPU kernels: one token of five measured 1.12e-3 from ours.
    assert after.tokens["logprob"].tolist() == pytest.approx(
        truth.tokens["logprob"].tolist(), abs=2e-3
    )


def test_what_cannot_be_corrected_is_refused_before_sending(governed: Client) -> None:
    cases: tuple[tuple[dict[str, Any], str], ...] = (
        ({"max_tokens": 0}, "max_tokens_0"),
        ({"max_tokens": 300}, "context_length"),  # never sent past -c 256
        ({"best_of": 3, "max_tokens": 2}, "best_of"),
        ({"echo": True, "stream": True, "max_tokens": 2}, "stream_echo"),
    )
    for fields, check in cases:
        with pytest.raises(ConformanceError) as info:
            governed.complete(TEXTS[1], **fields)
        assert info.value.check == check, fields
    # n > 1 with one slot: the server itself refuses it openly (HTTP 400 naming the field).
    with pytest.raises(nbc.APIError, match="Field 'n'"):
        governed.complete(TEXTS[1], n=2, max_tokens=2)


def test_frames_take_the_vocabulary_size_from_the_card(governed: Client) -> None:
    got = governed.complete(TEXTS[1], logprobs=1, max_tokens=2, temperature=0.0)
    assert got.tokens.attrs["vocab_size"] == 4096


def test_a_prompt_past_the_context_is_refused(governed: Client) -> None:
    with pytest.raises(ConformanceError) as info:
        governed.complete("to be " * 100, max_tokens=100, temperature=0.0)
    assert info.value.check == "context_length"


def test_penalised_text_is_flagged(governed: Client, embedded_client: Client) -> None:
    # The greedy text leaves ours at token 2 (also with repeat_last_n 256; -1 is HTTP 400):
    # the prompt's tokens are penalised too, which no field switches off.
    fields: dict[str, Any] = {"frequency_penalty": 0.5, "presence_penalty": 0.5}
    fields.update(temperature=0.0, max_tokens=24)
    with pytest.warns(nbc.ConformanceWarning, match="penalty_window"):
        got = governed.complete(TEXTS[1], **fields)
    assert "penalty_window" in got.flags
    assert got.text != embedded_client.complete(TEXTS[1], **fields).text


def test_byte_tokens_merged_out_of_the_logprobs_are_flagged(
    governed: Client, as_is: Client
) -> None:
    # Forced byte-level tokens (0xc3, 0xa9: "é"): llama-server lists one entry per character,
    # with only its last byte token's logprob, and none for a trailing partial character: 4
    # tokens generated, 1 listed.
    fields: dict[str, Any] = {"max_tokens": 4, "temperature": 0.0, "logprobs": 2}
    fields["logit_bias"] = {"128": 100, "103": 100}
    before = as_is.complete("Grüße, caf", **fields)
    assert (before.usage or {}).get("completion_tokens") == 4
    assert len(before.tokens) == 1
    assert before.flags == ()
    with pytest.warns(nbc.ConformanceWarning, match="byte_tokens"):
        after = governed.complete("Grüße, caf", **fields)
    assert "byte_tokens" in after.flags
