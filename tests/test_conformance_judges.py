"""The new conformance judges on small answer bodies: each verdict and its evidence, including
the edges the live servers do not show (refusals, inconclusive probes, another server's words).

The live verdicts are in tests/test_conformance.py (our server, all ok),
tests/test_llamacpp_conformance.py (the real llama-cpp-python) and tests/test_llamacpp_replay.py
(its recorded bytes).
"""

from __future__ import annotations

import math
from typing import Any

from nbcompletions import APIError
from nbcompletions._conformance_accounting import (
    context_length_check,
    echo_generated_check,
    end_of_text_check,
    stream_finish_check,
)
from nbcompletions._conformance_checks import BoundedStream, bytes_check
from nbcompletions._conformance_sampling import penalty_window_check, sampler_order_check


def body(
    tokens: list[str], logprobs: list[float], tops: list[dict[str, float]], **choice: Any
) -> dict[str, Any]:
    """A one-choice answer with logprobs in the Completions shape."""
    lp = {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops}
    return {"choices": [{"index": 0, "logprobs": lp, **choice}]}


def test_a_refused_probe_is_unsupported_and_a_failed_one_an_error() -> None:
    refused = APIError("HTTP 400 bad", status=400)
    assert penalty_window_check((None, refused)).status == "unsupported"
    broken = APIError("HTTP 503 down", status=503)
    assert sampler_order_check((None, broken)).status == "error"


def test_the_penalty_window_is_found_from_a_token_chosen_again() -> None:
    # "a" is generated at step 0 and chosen again at step 3 although "b" is listed higher once
    # "a" pays its penalty (2 + 2): only a window of 1-2 tokens lets "a" through.
    tokens = ["a", "x", "y", "a"]
    tops = [{"a": -0.1}, {"x": -0.1}, {"y": -0.1}, {"a": -0.5, "b": -1.0}]
    check = penalty_window_check((body(tokens, [-0.1, -0.1, -0.1, -0.5], tops), None))
    assert check.status == "fails"
    assert check.evidence["first_contradiction"] == 3
    assert check.evidence["windows"] == [1, 2]
    assert check.evidence["window_tokens"] == 1
    # Under OpenAI's rule the same steps choose "b": every token counted, all ok.
    tokens[3], tops[3] = "b", {"a": -0.5, "b": -1.0}
    check = penalty_window_check((body(tokens, [-0.1, -0.1, -0.1, -1.0], tops), None))
    assert (check.status, check.evidence["window_tokens"]) == ("ok", None)


def test_penalties_that_count_the_prompt_are_told_apart() -> None:
    # ggml's llama-server: "p" (a prompt token, never generated) listed above the chosen "b"
    # is explained only if the prompt's tokens pay the penalty too.
    tokens, tops = ["x", "b"], [{"x": -0.1}, {"p": -0.5, "b": -1.0}]
    answer = body(tokens, [-0.1, -1.0], tops)
    assert penalty_window_check((answer, None)).status == "error"  # nothing explains it
    check = penalty_window_check((answer, None), prompt_tokens=["p"])
    assert check.status == "fails"
    assert check.evidence == {"window_tokens": 16, "counts_prompt": True, "steps": 2}
    assert penalty_window_check((answer, None), prompt_tokens=["q"]).status == "error"


def test_the_sampler_order_needs_enough_steps_with_a_known_nucleus() -> None:
    sure = {"a": math.log(0.9), "b": math.log(0.05)}
    inside = body(["a"] * 8, [math.log(0.9)] * 8, [sure] * 8)
    check = sampler_order_check((inside, None))
    assert (check.status, check.evidence["order"], check.evidence["steps"]) == (
        "fails",
        "top_p_first",
        8,
    )
    short = body(["a"] * 3, [math.log(0.9)] * 3, [sure] * 3)
    assert sampler_order_check((short, None)).status == "error"
    outside = body(["a", "b"], [math.log(0.9), math.log(0.05)], [sure, sure])
    check = sampler_order_check((outside, None))
    assert (check.status, check.evidence["order"], check.evidence["outside"]) == (
        "ok",
        "temperature_first",
        1,
    )


def test_end_of_text_needs_a_known_token_and_a_stop_at_once() -> None:
    assert end_of_text_check(None, None).status == "unsupported"
    went_on = body([" the"], [-1.0], [{" the": -1.0}], text=" the", finish_reason="length")
    assert end_of_text_check((went_on, None), 0).status == "error"
    counted = {
        **body(["<|endoftext|>"], [-9.0], [{}], text="", finish_reason="stop"),
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
    check = end_of_text_check((counted, None), 0)
    assert (check.status, check.evidence["in_logprobs"], check.evidence["in_usage"]) == (
        "ok",
        True,
        True,
    )


def test_echo_generated_tells_a_missing_last_token_from_an_ignored_echo() -> None:
    prompt = "To be"
    whole = body(["To", " be", ","], [0.0, -1.0, -2.0], [{}, {}, {}], text="To be,")
    assert echo_generated_check((whole, None), prompt).evidence["missing_last"] is False
    short = body(["To", " be"], [0.0, -1.0], [{}, {}], text="To be,")
    check = echo_generated_check((short, None), prompt)
    assert (check.status, check.evidence["missing"]) == ("fails", ",")
    ignored = body([","], [-2.0], [{}], text=",")
    assert echo_generated_check((ignored, None), prompt).status == "unsupported"


def test_the_context_length_comes_from_the_card_the_refusal_or_the_model() -> None:
    assert context_length_check(256, None, None).evidence == {
        "context_length": 256,
        "source": "card",
    }
    vllm = APIError(
        "This model's maximum context length is 256 tokens. However, you requested 1000011 "
        "tokens (11 in the messages, 1000000 in the completion).",
        status=400,
    )
    check = context_length_check(None, BoundedStream(error=vllm), None)
    assert (check.status, check.evidence["context_length"]) == ("ok", 256)
    llama = APIError("Requested tokens (300) exceed context window of 256", status=400)
    assert context_length_check(None, BoundedStream(error=llama), None).evidence == {
        "context_length": 256,
        "source": "probe",
    }
    quiet = APIError("max_tokens too large", status=400)
    assert context_length_check(None, BoundedStream(error=quiet), 256).status == "unsupported"
    accepted = context_length_check(None, BoundedStream(text=" the"), None)
    assert (accepted.status, accepted.evidence["context_length"]) == ("fails", None)


def test_a_stream_without_finish_reason_fails() -> None:
    cut = stream_finish_check(BoundedStream(text=" world", chunks=3, overlapped=True))
    assert (cut.status, cut.evidence["finish_reason"]) == ("fails", None)
    whole = stream_finish_check(BoundedStream(text=" world", finish="length", chunks=17))
    assert whole.status == "ok"
    assert "nothing overlapped" in whole.detail


def test_byte_tokens_record_empty_strings_and_a_bytes_field() -> None:
    prompt = "Grüße, café"
    empty = body(["Gr", "", "", "e"], [0.0] * 4, [{}] * 4, text=prompt + "!")
    check = bytes_check((empty, None))
    assert check.status == "fails"
    assert (check.evidence["empty_tokens"], check.evidence["bytes_field"]) == (True, False)
    content = [{"token": "!", "logprob": -1.0, "bytes": [33], "top_logprobs": []}]
    chat = {"choices": [{"index": 0, "text": "!", "logprobs": {"content": content}}]}
    check = bytes_check((chat, None))
    assert (check.status, check.evidence["bytes_field"]) == ("unsupported", True)
