"""The corrections of issue 16 (`nbcompletions._corrections`): pure functions over a raw choice.

Unit tests build a server's deviation from a known truth and check the correction restores it; the
peer tests correct llama-cpp-python's real answers and compare them with our embedded server's.
"""

from __future__ import annotations

import math
from typing import Any

import httpx
import pytest

from nbcompletions._corrections import (
    CardLimits,
    UncorrectableError,
    card_limits,
    correct_choices,
    drop_stop_token,
    head_request_fields,
    unshift_echo,
    unshift_logprobs,
)
from nbcompletions._frames import to_frames
from nbcompletions._request import CompletionRequest

# A four-token prompt and one generated token, each position's whole distribution (5 tokens).
TOKENS = ["To", " be", ",", " or", " not"]
VOCAB = ["To", " be", ",", " or", " not"]


def _distribution(position: int) -> dict[str, float]:
    weights = [1.0 + ((position * 7 + j * 3) % 5) for j in range(len(VOCAB))]
    total = sum(weights)
    return {token: math.log(w / total) for token, w in zip(VOCAB, weights, strict=True)}


#: DISTRIBUTIONS[i]: the distribution that predicts token i (position 0 has none).
DISTRIBUTIONS = {i: _distribution(i) for i in range(1, len(TOKENS))}


def _top(distribution: dict[str, float], k: int) -> dict[str, float]:
    return dict(sorted(distribution.items(), key=lambda item: -item[1])[:k])


def truth_choice(k: int) -> dict[str, Any]:
    """What OpenAI (and our server) answer for echo + max_tokens=1 + logprobs=k."""
    tokens_logprobs: list[float | None] = [None]
    tokens_logprobs += [DISTRIBUTIONS[i][TOKENS[i]] for i in range(1, len(TOKENS))]
    tops: list[dict[str, float] | None] = [None]
    tops += [_top(DISTRIBUTIONS[i], k) for i in range(1, len(TOKENS))]
    return {
        "index": 0,
        "text": "".join(TOKENS),
        "finish_reason": "length",
        "logprobs": {
            "tokens": TOKENS,
            "token_logprobs": tokens_logprobs,
            "top_logprobs": tops,
            "text_offset": [sum(len(t) for t in TOKENS[:i]) for i in range(len(TOKENS))],
        },
    }


def shifted_choice(k: int) -> dict[str, Any]:
    """llama-cpp-python 0.3.36's answer (its llama.py, echo): entry i pairs token i with the
    distribution of position i + 1, entry 0 is nulled, and the last generated token is missing."""
    n = len(TOKENS) - 1
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    for i in range(n):
        after = DISTRIBUTIONS[i + 1]
        tokens.append(TOKENS[i])
        logprobs.append(after[TOKENS[i]])
        tops.append({**_top(after, k), TOKENS[i]: after[TOKENS[i]]})
    logprobs[0], tops[0] = None, None
    return {
        "index": 0,
        "text": "".join(TOKENS),
        "finish_reason": "length",
        "logprobs": {
            "tokens": tokens,
            "token_logprobs": logprobs,
            "top_logprobs": tops,
            "text_offset": [sum(len(t) for t in TOKENS[:i]) for i in range(n)],
        },
    }


def test_unshift_with_the_whole_distribution_and_the_head_gives_the_truth() -> None:
    k = len(VOCAB)
    shifted = shifted_choice(k)
    head = _top(DISTRIBUTIONS[1], k)
    fixed = unshift_echo(shifted, head=head, requested=k)
    assert fixed["logprobs"] == truth_choice(k)["logprobs"]
    assert shifted["logprobs"]["tokens"] == TOKENS[:-1]  # the input is not mutated


def test_unshift_without_the_head_leaves_position_1_unknown_not_wrong() -> None:
    k = len(VOCAB)
    fixed = unshift_echo(shifted_choice(k), requested=k)["logprobs"]
    truth = truth_choice(k)["logprobs"]
    assert fixed["token_logprobs"][:2] == [None, None]
    assert fixed["token_logprobs"][2:] == truth["token_logprobs"][2:]


def test_unshift_with_few_alternatives_gives_none_where_the_token_is_not_listed() -> None:
    fixed = unshift_echo(shifted_choice(1), requested=1)["logprobs"]
    truth = truth_choice(len(VOCAB))["logprobs"]
    for i in range(2, len(TOKENS)):
        found = fixed["token_logprobs"][i]
        assert found is None or found == truth["token_logprobs"][i]
        # each entry holds at most the requested alternative plus the chosen token
        assert len(fixed["top_logprobs"][i]) <= 2
        assert TOKENS[i - 1] not in fixed["top_logprobs"][i] or TOKENS[i - 1] == TOKENS[i]


def test_unshift_reads_the_missing_last_token_from_the_text() -> None:
    fixed = unshift_echo(shifted_choice(len(VOCAB)), requested=len(VOCAB))["logprobs"]
    assert fixed["tokens"][-1] == " not"
    assert fixed["text_offset"][-1] == len("To be, or")
    # frames now split 4 prompt tokens + 1 generated (max_tokens=1) as on OpenAI
    request = CompletionRequest(prompt="To be, or", echo=True, logprobs=5, max_tokens=1)
    body = {"choices": [{"index": 0, "text": "To be, or not", "logprobs": fixed}]}
    choices = to_frames(body, request)[0]
    assert choices["prompt_n_tokens"][0] == 4
    assert choices["n_tokens"][0] == 1


def test_unshift_leaves_byte_tokens_unknown() -> None:
    choice = shifted_choice(len(VOCAB))
    choice["logprobs"]["tokens"][2] = ""
    fixed = unshift_echo(choice, requested=len(VOCAB))["logprobs"]
    assert fixed["token_logprobs"][2] is None
    assert len(fixed["tokens"]) == len(TOKENS) - 1  # "" tokens: the text cannot be matched


def test_unshift_needs_tokens() -> None:
    with pytest.raises(UncorrectableError, match="no logprobs tokens"):
        unshift_echo({"text": "x", "logprobs": None})


def test_unshift_logprobs_and_the_head_request() -> None:
    assert unshift_logprobs(4096, 5) == 4096
    assert unshift_logprobs(4096, 5000) == 5000
    assert unshift_logprobs(None, 5) is None
    fields = head_request_fields(shifted_choice(2), 4096)
    assert fields == {
        "prompt": "To",
        "max_tokens": 1,
        "logprobs": 4096,
        "echo": False,
        "temperature": 0,
    }
    with pytest.raises(UncorrectableError, match="first echoed token"):
        head_request_fields({"logprobs": {"tokens": ["bytes:\\xe2"]}}, 10)


# -- drop_stop_token -------------------------------------------------------------------------------


def stop_choice(tokens: list[str], text: str, with_offsets: bool = True) -> dict[str, Any]:
    n = len(tokens)
    return {
        "index": 0,
        "text": text,
        "finish_reason": "stop",
        "logprobs": {
            "tokens": tokens,
            "token_logprobs": [-1.0 - i for i in range(n)],
            "top_logprobs": [{t: -1.0 - i} for i, t in enumerate(tokens)],
            "text_offset": list(range(n)) if with_offsets else None,
        },
    }


@pytest.mark.parametrize(
    ("tokens", "text", "stop", "kept"),
    [
        # one stop token
        ([" good", " night", "!"], " good night", "!", 2),
        # a stop string spanning two tokens
        ([" good", " night", "\n", "\n"], " good night", "\n\n", 2),
        # a token spanning the cut: part of it is text, so it stays (as on OpenAI)
        ([" good", " night", "!\n"], " good night!", "\n", 3),
        # the token that completes the stop goes on past it
        ([" good", " night", "!\n\nEnter"], " good night", ["x", "!\n"], 2),
        # a partial UTF-8 character in the bytes: form before the stop
        ([" caf", "bytes:\\xc3", "bytes:\\xa9", "."], " café", ".", 3),
        # conforming: nothing after the text
        ([" good", " night"], " good night", "!", 2),
    ],
)
def test_drop_stop_token(tokens: list[str], text: str, stop: Any, kept: int) -> None:
    choice = stop_choice(tokens, text)
    fixed = drop_stop_token(choice, stop)["logprobs"]
    assert fixed["tokens"] == tokens[:kept]
    assert fixed["token_logprobs"] == choice["logprobs"]["token_logprobs"][:kept]
    assert fixed["text_offset"] == list(range(kept))
    assert len(choice["logprobs"]["tokens"]) == len(tokens)  # not mutated


@pytest.mark.parametrize(
    ("tokens", "text", "stop", "message"),
    [
        # end-of-text after the text is not a stop string: kept, as our server lists it
        ([" good", "<|endoftext|>"], " good", "!", "none of the stop strings"),
        # a byte token read as "" makes the tokens spell less than the text
        ([" caf", "", "", "."], " café", ".", "does not start with the text"),
    ],
)
def test_drop_stop_token_refuses_to_guess(
    tokens: list[str], text: str, stop: str, message: str
) -> None:
    with pytest.raises(UncorrectableError, match=message):
        drop_stop_token(stop_choice(tokens, text), stop)


def test_drop_stop_token_gives_frames_the_true_sum() -> None:
    choice = stop_choice([" good", " night", "!"], " good night")
    request = CompletionRequest(prompt="x", logprobs=1, max_tokens=5, stop="!")
    before = to_frames({"choices": [choice]}, request)[0]
    after = to_frames({"choices": [drop_stop_token(choice, "!")]}, request)[0]
    assert (before["n_tokens"][0], before["sum_logprob"][0]) == (3, -6.0)
    assert (after["n_tokens"][0], after["sum_logprob"][0]) == (2, -3.0)


def test_correct_choices_lists_what_it_could_not_correct() -> None:
    good = stop_choice([" good", " night", "!"], " good night")
    bad = stop_choice([" good", "<|endoftext|>"], " good")
    response = {"id": "x", "choices": [good, "junk", bad]}
    fixed, failed = correct_choices(response, lambda choice: drop_stop_token(choice, "!"))
    assert fixed["id"] == "x"
    assert fixed["choices"][0]["logprobs"]["tokens"] == [" good", " night"]
    assert fixed["choices"][1:] == ["junk", bad]
    assert [position for position, _ in failed] == [2]
    assert "none of the stop strings" in failed[0][1]
    assert response["choices"][0] is good  # not mutated
    assert correct_choices({"choices": None}, dict) == ({"choices": None}, [])


# -- card_limits ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("card", "limits"),
    [
        ({"id": "m", "max_model_len": 256}, CardLimits(None, 256)),  # vLLM
        (
            {"id": "m", "meta": {"n_vocab": 4096, "n_ctx": 256, "n_ctx_train": 1024}},
            CardLimits(4096, 256),
        ),  # llama-server, a slot smaller than the trained context
        ({"id": "m", "meta": {"n_vocab": 4096, "n_ctx": 512, "n_ctx_train": 256}}, (4096, 256)),
        ({"id": "m", "owned_by": "me", "permissions": []}, CardLimits(None, None)),  # llama-cpp-py
        ({"id": "m", "vocab_size": 4096, "max_model_len": True}, CardLimits(4096, None)),
        (None, CardLimits(None, None)),
        ({"id": "m", "meta": "junk", "max_model_len": -3}, CardLimits(None, None)),
    ],
)
def test_card_limits(card: Any, limits: tuple[int | None, int | None]) -> None:
    assert card_limits(card) == limits


# -- against the real llama-cpp-python peer --------------------------------------------------------

SCORED = [
    "To be, or not to be",
    "Now is the winter of our discontent made glorious summer by this sun of York.",
    "The quarterly earnings report was uploaded to the shared drive on Tuesday.",
    "summer York. of winter discontent our sun by Now glorious this the made is of",
]


def _post(peer: Any, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(
        f"{peer.base_url}/completions", json={"model": peer.model, **body}, timeout=120
    )
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


@pytest.mark.slow
def test_unshifted_llamacpp_echo_scores_like_our_server(
    llamacpp_server: Any, embedded_client: Any
) -> None:
    """Issue 16 case 1 and the score of "To be, or not to be": within 1e-3 after the correction
    (the peer runs the f16 GGUF: per-token logprobs differ by up to ~1e-3)."""
    from nbcompletions.model import vocab_size

    vocab = vocab_size(llamacpp_server.model)
    assert vocab is not None
    logprobs = unshift_logprobs(vocab, 5)
    assert logprobs is not None
    for text in SCORED:
        truth = embedded_client.complete(text, echo=True, max_tokens=0, logprobs=0).choices
        fields = {"prompt": text, "echo": True, "max_tokens": 1, "temperature": 0}
        raw = _post(llamacpp_server, {**fields, "logprobs": logprobs})
        choice = raw["choices"][0]
        head_answer = _post(llamacpp_server, {**head_request_fields(choice, logprobs)})
        head = head_answer["choices"][0]["logprobs"]["top_logprobs"][0]
        request = CompletionRequest(prompt=text, echo=True, logprobs=5, max_tokens=1)
        before = to_frames(raw, request)[0]
        fixed = unshift_echo(choice, head=head, requested=logprobs)
        after = to_frames({**raw, "choices": [fixed]}, request)[0]
        assert after["prompt_n_tokens"][0] == truth["prompt_n_tokens"][0]
        assert after["n_tokens"][0] == 1  # the generated token the server left out is back
        assert after["prompt_mean_logprob"][0] == pytest.approx(
            truth["prompt_mean_logprob"][0], abs=1e-3
        )
        assert after["prompt_perplexity"][0] == pytest.approx(
            truth["prompt_perplexity"][0], rel=1e-3
        )
        assert before["prompt_perplexity"][0] > 5 * truth["prompt_perplexity"][0]


@pytest.mark.slow
@pytest.mark.parametrize("stop", [",", "\n\n"])  # one token; two ("\n", "\n")
def test_dropping_llamacpp_stop_token_gives_our_servers_sum(
    llamacpp_server: Any, embedded_client: Any, stop: str
) -> None:
    """Issue 16 case 4: the stop token kept in the logprobs, dropped: n_tokens and sum_logprob
    equal our server's (greedy, neutral sampling fields)."""
    prompt = "ROMEO.\n"
    neutral = {"temperature": 0, "top_k": 0, "min_p": 0, "repeat_penalty": 1.0}
    raw = _post(
        llamacpp_server,
        {"prompt": prompt, "max_tokens": 40, "logprobs": 1, "stop": stop, **neutral},
    )
    truth = embedded_client.complete(prompt, max_tokens=40, logprobs=1, stop=stop, temperature=0)
    request = CompletionRequest(prompt=prompt, max_tokens=40, logprobs=1, stop=stop)
    before = to_frames(raw, request)[0]
    fixed = drop_stop_token(raw["choices"][0], stop)
    after = to_frames({**raw, "choices": [fixed]}, request)[0]
    assert before["n_tokens"][0] == truth.choices["n_tokens"][0] + len(stop)
    assert after["n_tokens"][0] == truth.choices["n_tokens"][0]
    assert after["sum_logprob"][0] == pytest.approx(truth.choices["sum_logprob"][0], abs=1e-2)
