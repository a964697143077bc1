"""`to_frames` on small hand-written responses; every expected value is worked out by hand here."""

from __future__ import annotations

import copy
import math

import numpy as np
import pandas as pd
import pytest

from nbcompletions import CompletionRequest, to_frames
from nbcompletions._frames import (
    ALTERNATIVE_COLUMNS,
    CHOICE_COLUMNS,
    DEFAULT_VOCAB_SIZE,
    TOKEN_COLUMNS,
)

LN = math.log


def entropy(probabilities: list[float]) -> float:
    """Entropy in nats of an explicit distribution (the bounds are checked against these)."""
    return -sum(p * math.log(p) for p in probabilities if p > 0)


def response(*choices: dict, usage: dict | None = None) -> dict:
    body = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": list(choices),
    }
    if usage is not None:
        body["usage"] = usage
    return body


def lp(tokens, token_logprobs, top_logprobs=None, text_offset=None) -> dict:
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": text_offset,
    }


# --- layout --------------------------------------------------------------------------------------


def test_columns_dtypes_and_attrs():
    body = response(
        {
            "index": 0,
            "text": " a b",
            "finish_reason": "length",
            "logprobs": lp(
                [" a", " b"],
                [-0.5, -1.0],
                [{" a": -0.5, " c": -1.5}, {" d": -0.25, " b": -1.0}],
                [5, 7],
            ),
        }
    )
    choices, tokens, alternatives = to_frames(body, CompletionRequest(prompt="Hello", logprobs=2))
    assert tuple(choices.columns) == CHOICE_COLUMNS
    assert tuple(tokens.columns) == TOKEN_COLUMNS
    assert tuple(alternatives.columns) == ALTERNATIVE_COLUMNS
    assert {name: str(t) for name, t in choices.dtypes.items()} == {
        "index": "int64",
        "prompt_index": "Int64",
        "choice": "Int64",
        "text": "object",
        "finish_reason": "object",
        "n_tokens": "Int64",
        "sum_logprob": "float64",
        "mean_logprob": "float64",
        "perplexity": "float64",
        "prompt_n_tokens": "Int64",
        "prompt_sum_logprob": "float64",
        "prompt_mean_logprob": "float64",
        "prompt_perplexity": "float64",
    }
    assert {name: str(t) for name, t in tokens.dtypes.items()} == {
        "index": "int64",
        "prompt_index": "Int64",
        "choice": "Int64",
        "position": "int64",
        "token": "object",
        "token_display": "object",
        "logprob": "float64",
        "prob": "float64",
        "text_offset": "Int64",
        "echo": "bool",
        "rank": "Int64",
        "top_mass": "float64",
        "entropy_low": "float64",
        "entropy_high": "float64",
    }
    assert {name: str(t) for name, t in alternatives.dtypes.items()} == {
        "index": "int64",
        "position": "int64",
        "rank": "int64",
        "token": "object",
        "token_display": "object",
        "logprob": "float64",
        "prob": "float64",
        "chosen": "bool",
    }
    for frame in (choices, tokens, alternatives):
        assert frame.attrs["vocab_size"] == DEFAULT_VOCAB_SIZE == 50257


def test_plain_response_values():
    body = response(
        {
            "index": 0,
            "text": " a b",
            "finish_reason": "length",
            "logprobs": lp(
                [" a", " b"],
                [-0.5, -1.0],
                [{" a": -0.5, " c": -1.5}, {" d": -0.25, " b": -1.0}],
                [5, 7],
            ),
        }
    )
    choices, tokens, alternatives = to_frames(body, CompletionRequest(prompt="Hello", logprobs=2))
    row = choices.iloc[0]
    assert (row["index"], row["prompt_index"], row["choice"]) == (0, 0, 0)
    assert (row["text"], row["finish_reason"], row["n_tokens"]) == (" a b", "length", 2)
    assert row["sum_logprob"] == pytest.approx(-1.5)
    assert row["mean_logprob"] == pytest.approx(-0.75)
    assert row["perplexity"] == pytest.approx(math.exp(0.75))
    assert row["prompt_n_tokens"] == 0
    assert math.isnan(row["prompt_sum_logprob"])

    assert tokens["token"].tolist() == [" a", " b"]
    assert tokens["position"].tolist() == [0, 1]
    assert tokens["prob"].tolist() == pytest.approx([math.exp(-0.5), math.exp(-1.0)])
    assert tokens["text_offset"].tolist() == [5, 7]  # OpenAI's offsets, kept as sent
    assert tokens["echo"].tolist() == [False, False]
    assert tokens["rank"].tolist() == [1, 2]  # " d" beats " b" at position 1
    assert tokens["top_mass"].tolist() == pytest.approx(
        [math.exp(-0.5) + math.exp(-1.5), math.exp(-0.25) + math.exp(-1.0)]
    )

    # Sorted by rank within each position: " d" first at position 1 although it came second.
    assert alternatives["position"].tolist() == [0, 0, 1, 1]
    assert alternatives["rank"].tolist() == [1, 2, 1, 2]
    assert alternatives["token"].tolist() == [" a", " c", " d", " b"]
    assert alternatives["logprob"].tolist() == [-0.5, -1.5, -0.25, -1.0]
    assert alternatives["chosen"].tolist() == [True, False, False, True]
    assert alternatives["prob"].tolist() == pytest.approx(np.exp([-0.5, -1.5, -0.25, -1.0]))


def test_string_columns_are_object_dtype_on_every_pandas():
    body = response({"index": 0, "text": "x", "logprobs": lp(["x"], [-0.1], [{"x": -0.1}])})
    choices, tokens, alternatives = to_frames(body)
    assert tokens["token"].dtype == object
    assert alternatives["token"].dtype == object
    assert choices["text"].dtype == object
    assert isinstance(tokens["token"].iloc[0], str)


def test_token_display_makes_whitespace_and_bytes_visible():
    # Three different tokens that all print as a newline in a table, a leading space that prints
    # as nothing, a tab, a control character and a partial UTF-8 character in OpenAI's form.
    tokens_sent = ["\n", "\n\n", " \n", " other", "\t", "\x07", "bytes:\\xe2\\x80"]
    body = response(
        {
            "index": 0,
            "text": "",
            "logprobs": lp(
                tokens_sent,
                [-0.1] * len(tokens_sent),
                [{t: -0.1, " x y": -2.0} for t in tokens_sent],
            ),
        }
    )
    _, tokens, alternatives = to_frames(body)
    shown = ["↵", "↵↵", "·↵", "·other", "→", "<0x07>", "<0xE2><0x80>"]
    assert tokens["token_display"].tolist() == shown
    assert tokens["token"].tolist() == tokens_sent  # the exact string stays for computing
    assert len(set(tokens["token_display"])) == len(tokens_sent)
    assert alternatives["token_display"].tolist() == [
        shown_token for s in shown for shown_token in (s, "·x·y")
    ]


def test_visible_token_edge_cases():
    from nbcompletions import visible_token

    assert visible_token(None) is None
    assert visible_token(float("nan")) is None
    assert visible_token("") == ""
    assert visible_token("\r\n") == "␍↵"
    assert visible_token("a\u00a0b\u200b") == "a<U+00A0>b<U+200B>"
    assert visible_token("\x7f") == "<0x7F>"
    assert visible_token("  two") == "··two"
    assert visible_token("  two", spaces=False) == "  two"
    assert visible_token("bytes:\\xf0\\x9f") == "<0xF0><0x9F>"


def test_empty_choices_give_empty_frames_with_columns():
    choices, tokens, alternatives = to_frames(response())
    assert (len(choices), len(tokens), len(alternatives)) == (0, 0, 0)
    assert tuple(tokens.columns) == TOKEN_COLUMNS
    assert tuple(alternatives.columns) == ALTERNATIVE_COLUMNS


# --- odd inputs ----------------------------------------------------------------------------------


def test_choices_out_of_order_are_sorted_and_split_by_n():
    body = response(
        {"index": 3, "text": "d", "logprobs": lp(["d"], [-4.0])},
        {"index": 0, "text": "a", "logprobs": lp(["a"], [-1.0])},
        {"index": 2, "text": "c", "logprobs": lp(["c"], [-3.0])},
        {"index": 1, "text": "b", "logprobs": lp(["b"], [-2.0])},
    )
    request = CompletionRequest(prompt=["p", "q"], n=2, logprobs=0)
    choices, tokens, _ = to_frames(body, request)
    assert choices["index"].tolist() == [0, 1, 2, 3]
    assert choices["text"].tolist() == ["a", "b", "c", "d"]
    assert choices["prompt_index"].tolist() == [0, 0, 1, 1]
    assert choices["choice"].tolist() == [0, 1, 0, 1]
    assert choices["sum_logprob"].tolist() == [-1.0, -2.0, -3.0, -4.0]
    assert tokens["token"].tolist() == ["a", "b", "c", "d"]
    assert tokens["prompt_index"].tolist() == [0, 0, 1, 1]


def test_without_request_prompt_index_and_choice_are_na():
    body = response({"index": 0, "text": "a", "logprobs": lp(["a"], [-1.0])})
    choices, tokens, _ = to_frames(body)
    assert choices["prompt_index"].isna().all()
    assert choices["choice"].isna().all()
    assert tokens["prompt_index"].isna().all()


def test_missing_index_uses_position():
    body = response({"text": "first"}, {"text": "second"})
    choices, _, _ = to_frames(body, CompletionRequest(prompt="p", n=2))
    assert choices["index"].tolist() == [0, 1]
    assert choices["text"].tolist() == ["first", "second"]


def test_choice_without_logprobs():
    body = response(
        {"index": 0, "text": "hi", "finish_reason": "stop", "logprobs": None},
        usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    )
    choices, tokens, alternatives = to_frames(body, CompletionRequest(prompt="p"))
    assert len(tokens) == 0
    assert len(alternatives) == 0
    row = choices.iloc[0]
    assert row["text"] == "hi"
    assert pd.isna(row["n_tokens"])  # usage is not per choice: unknown, not guessed
    assert pd.isna(row["prompt_n_tokens"])
    assert math.isnan(row["sum_logprob"])
    assert math.isnan(row["perplexity"])


def test_every_logprobs_field_may_be_missing_or_null():
    body = response(
        {"index": 0, "logprobs": {"tokens": ["a", "b"]}},  # nothing but the tokens
        {"index": 1, "logprobs": lp(["c", "d"], [None, -1.0], None, None)},
        {"index": 2, "logprobs": {"token_logprobs": [-0.5], "future_field": 1}},
        {"index": 3, "logprobs": {}},
        {"index": 4, "logprobs": lp(["e", "f"], [-1.0, -2.0], [{"e": -1.0}])},  # short list
        {"index": 5},
    )
    choices, tokens, alternatives = to_frames(body)
    assert tokens["index"].tolist() == [0, 0, 1, 1, 2, 4, 4]
    assert tokens["token"].tolist() == ["a", "b", "c", "d", None, "e", "f"]
    assert tokens["logprob"].isna().tolist() == [True, True, True, False, False, False, False]
    assert tokens["text_offset"].isna().all()
    # Only choice 4's first position has alternatives.
    assert tokens["rank"].isna().tolist() == [True] * 5 + [False, True]
    assert tokens["entropy_low"].isna().tolist() == [True] * 5 + [False, True]
    assert len(alternatives) == 1
    assert choices["n_tokens"].tolist() == [2, 2, 1, 0, 2, pd.NA]
    assert math.isnan(choices["sum_logprob"].iloc[0])  # no logprob at all
    assert choices["sum_logprob"].iloc[1] == -1.0
    assert choices["choice"].isna().all()
    assert choices["text"].tolist() == [None] * 6


def test_bytes_tokens_are_kept_as_strings():
    # "é" is \xc3\xa9; OpenAI shows the halves of a split character as bytes: tokens.
    body = response(
        {
            "index": 0,
            "text": "é",
            "logprobs": lp(
                ["bytes:\\xc3", "bytes:\\xa9"],
                [-0.1, -0.2],
                [{"bytes:\\xc3": -0.1, "x": -3.0}, {"bytes:\\xa9": -0.2}],
            ),
        }
    )
    _, tokens, alternatives = to_frames(body)
    assert tokens["token"].tolist() == ["bytes:\\xc3", "bytes:\\xa9"]
    assert alternatives["token"].tolist() == ["bytes:\\xc3", "x", "bytes:\\xa9"]
    assert alternatives["chosen"].tolist() == [True, False, True]


def test_llamacpp_chat_shaped_logprobs():
    content = [
        {
            "id": 1,
            "token": "Hi",
            "logprob": -0.2,
            "bytes": [72, 105],
            "top_logprobs": [
                {"id": 1, "token": "Hi", "logprob": -0.2, "bytes": [72, 105]},
                {"id": 2, "token": "Ho", "logprob": -1.9, "bytes": [72, 111]},
            ],
        },
        {
            "id": 3,
            "token": "!",
            "logprob": -2.5,
            "bytes": [33],
            "top_logprobs": [
                {"id": 4, "token": ".", "logprob": -0.5},
                {"id": 3, "token": "!", "logprob": -2.5},
            ],
        },
    ]
    body = response(
        {"index": 0, "text": "Hi!", "finish_reason": "length", "logprobs": {"content": content}}
    )
    choices, tokens, alternatives = to_frames(body, CompletionRequest(prompt="p", logprobs=2))
    assert tokens["token"].tolist() == ["Hi", "!"]
    assert tokens["logprob"].tolist() == [-0.2, -2.5]
    assert tokens["rank"].tolist() == [1, 2]
    assert tokens["text_offset"].isna().all()
    assert alternatives["token"].tolist() == ["Hi", "Ho", ".", "!"]
    assert alternatives["chosen"].tolist() == [True, False, False, True]
    assert choices["sum_logprob"].iloc[0] == pytest.approx(-2.7)


def test_llamacpp_duplicate_token_strings_stay_separate_rows():
    # Two different byte tokens may both render as "\ufffd"; a dict would merge them.
    content = [
        {
            "token": "\ufffd",
            "logprob": -1.0,
            "top_logprobs": [
                {"token": "\ufffd", "logprob": -1.0},
                {"token": "\ufffd", "logprob": -1.2},
            ],
        }
    ]
    _, tokens, alternatives = to_frames(response({"index": 0, "logprobs": {"content": content}}))
    assert len(alternatives) == 2
    assert tokens["top_mass"].iloc[0] == pytest.approx(math.exp(-1.0) + math.exp(-1.2))


def test_top_logprobs_including_or_excluding_the_chosen_token():
    including = response(
        {
            "index": 0,
            "logprobs": lp(["b"], [LN(0.2)], [{"a": LN(0.5), "c": LN(0.25), "b": LN(0.2)}]),
        }
    )
    excluding = response(
        {"index": 0, "logprobs": lp(["b"], [LN(0.2)], [{"a": LN(0.5), "c": LN(0.25)}])}
    )
    _, tokens_in, alternatives_in = to_frames(including)
    _, tokens_out, alternatives_out = to_frames(excluding)
    assert alternatives_in["chosen"].tolist() == [False, False, True]
    assert alternatives_out["chosen"].tolist() == [False, False]
    # Two alternatives beat it either way.
    assert tokens_in["rank"].iloc[0] == 3
    assert tokens_out["rank"].iloc[0] == 3
    # The chosen token's probability is known in both cases, so it counts in the mass.
    assert tokens_in["top_mass"].iloc[0] == pytest.approx(0.95)
    assert tokens_out["top_mass"].iloc[0] == pytest.approx(0.95)


def test_rank_ignores_the_chosen_tokens_own_entry_and_ties():
    body = response(
        {
            "index": 0,
            "logprobs": lp(
                ["b", "x"],
                [-1.0, -1.0],
                [{"b": -1.0, "a": -1.0, "c": -2.0}, {"y": -0.5, "z": -0.7}],
            ),
        }
    )
    _, tokens, alternatives = to_frames(body)
    assert tokens["rank"].tolist() == [1, 3]  # a tie is not "higher"; x is outside the top 2
    # Ties keep the server's order in the alternatives' rank.
    assert alternatives["token"].tolist() == ["b", "a", "c", "y", "z"]
    assert alternatives["rank"].tolist() == [1, 2, 3, 1, 2]


def test_mixed_list_lengths_rank_alternatives_per_position():
    body = response(
        {
            "index": 0,
            "logprobs": lp(
                ["a", "b", "c"],
                [-1.0, -1.0, -1.0],
                [{"q": -3.0, "a": -1.0}, None, {"r": -2.0, "s": -0.1, "c": -1.0, "t": None}],
            ),
        }
    )
    _, tokens, alternatives = to_frames(body)
    assert alternatives["position"].tolist() == [0, 0, 2, 2, 2, 2]
    assert alternatives["token"].tolist() == ["a", "q", "s", "c", "r", "t"]  # null logprob last
    assert alternatives["rank"].tolist() == [1, 2, 1, 2, 3, 4]
    assert tokens["rank"].isna().tolist() == [False, True, False]
    assert tokens["top_mass"].iloc[2] == pytest.approx(
        math.exp(-2.0) + math.exp(-0.1) + math.exp(-1.0)
    )


def test_vllm_and_openai_text_offsets_are_kept_as_sent():
    openai_style = response({"index": 0, "logprobs": lp([" a", " b"], [-1, -1], None, [5, 7])})
    vllm_style = response({"index": 0, "logprobs": lp([" a", " b"], [-1, -1], None, [0, 2])})
    request = CompletionRequest(prompt="Hello")
    assert to_frames(openai_style, request)[1]["text_offset"].tolist() == [5, 7]
    assert to_frames(vllm_style, request)[1]["text_offset"].tolist() == [0, 2]


def test_clamped_logprobs_give_finite_bounds():
    body = response(
        {"index": 0, "logprobs": lp(["a"], [-0.01], [{"a": -0.01, "b": -9999.0, "c": -9999.0}])}
    )
    _, tokens, alternatives = to_frames(body)
    assert alternatives["prob"].tolist()[1:] == [0.0, 0.0]
    row = tokens.iloc[0]
    assert np.isfinite([row["entropy_low"], row["entropy_high"], row["top_mass"]]).all()
    assert row["entropy_low"] <= row["entropy_high"]


def test_openai_sdk_object_converts_like_its_dict():
    openai_types = pytest.importorskip("openai.types")
    body = response(
        {
            "index": 1,
            "text": " b",
            "finish_reason": "length",
            "logprobs": lp([" b"], [-0.5], [{" b": -0.5, " c": -1.5}], [3]),
        },
        {
            "index": 0,
            "text": " a",
            "finish_reason": "stop",
            "logprobs": lp([" a"], [-0.1], [{" a": -0.1}], [3]),
        },
        usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    )
    sdk_object = openai_types.Completion.model_validate(body)
    request = CompletionRequest(prompt="abc", n=2)
    for expected, got in zip(to_frames(body, request), to_frames(sdk_object, request), strict=True):
        pd.testing.assert_frame_equal(expected, got)


def test_openai_sdk_object_with_llamacpp_logprobs_does_not_warn():
    openai_types = pytest.importorskip("openai.types")
    content = [{"token": "a", "logprob": -0.5, "top_logprobs": [{"token": "a", "logprob": -0.5}]}]
    sdk_object = openai_types.Completion.construct(
        id="x",
        object="text_completion",
        created=1,
        model="m",
        choices=[
            {"index": 0, "text": "a", "finish_reason": "stop", "logprobs": {"content": content}}
        ],
    )
    _, tokens, _ = to_frames(sdk_object)  # warnings are errors in this suite
    assert tokens["token"].tolist() == ["a"]


def test_streamed_pieces_with_one_index_merge_in_order():
    body = response(
        {"index": 0, "text": "He", "logprobs": lp(["He"], [-1.0], [{"He": -1.0}], [0])},
        {"index": 1, "text": "X", "finish_reason": "stop", "logprobs": lp(["X"], [-0.5])},
        {
            "index": 0,
            "text": "llo",
            "finish_reason": "length",
            "logprobs": lp(["llo"], [-2.0], [{"llo": -2.0}], [2]),
        },
    )
    choices, tokens, _ = to_frames(body)
    assert choices["text"].tolist() == ["Hello", "X"]
    assert choices["finish_reason"].tolist() == ["length", "stop"]
    assert tokens["token"].tolist() == ["He", "llo", "X"]
    assert tokens["position"].tolist() == [0, 1, 0]
    assert tokens["text_offset"].tolist() == [0, 2, pd.NA]
    assert choices["sum_logprob"].tolist() == [-3.0, -0.5]


def test_chat_delta_chunks_give_text():
    body = response({"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"})
    choices, _, _ = to_frames(body)
    assert choices["text"].tolist() == ["Hi"]


def test_input_is_not_mutated():
    body = response(
        {"index": 1, "text": "b", "logprobs": lp(["b"], [None], [None], [0])},
        {
            "index": 0,
            "text": "a",
            "logprobs": lp(["a", "c"], [-1.0, -2.0], [{"a": -1.0}, {"c": -2.0}], [0, 1]),
        },
    )
    before = copy.deepcopy(body)
    to_frames(body, CompletionRequest(prompt="a", echo=True, n=2))
    assert body == before


# --- echo ----------------------------------------------------------------------------------------


def test_echo_with_token_id_prompt():
    body = response(
        {
            "index": 0,
            "text": "ABc",
            "finish_reason": "length",
            "logprobs": lp(["A", "B", "c"], [None, -1.0, -2.0], [None, {"B": -1.0}, {"c": -2.0}]),
        }
    )
    request = CompletionRequest(prompt=[17, 18], echo=True, max_tokens=1, logprobs=1)
    choices, tokens, _ = to_frames(body, request)
    assert tokens["echo"].tolist() == [True, True, False]
    row = choices.iloc[0]
    assert (row["prompt_n_tokens"], row["n_tokens"]) == (2, 1)
    assert row["prompt_sum_logprob"] == -1.0  # the first prompt token has no logprob
    assert row["prompt_mean_logprob"] == -1.0
    assert row["prompt_perplexity"] == pytest.approx(math.e)
    assert row["sum_logprob"] == -2.0


def test_echo_with_string_prompt_uses_text_offset():
    # Offsets say the third token starts at 6 == len("Hello,"): two prompt tokens.
    body = response(
        {
            "index": 0,
            "text": "Hello, world",
            "logprobs": lp(["Hello", ",", " world"], [None, -1.0, -0.5], None, [0, 5, 6]),
        }
    )
    request = CompletionRequest(prompt="Hello,", echo=True)
    choices, tokens, _ = to_frames(body, request)
    assert tokens["echo"].tolist() == [True, True, False]
    assert choices["prompt_n_tokens"].tolist() == [2]
    assert choices["n_tokens"].tolist() == [1]


def test_echo_with_string_prompt_and_bytes_tokens_without_offsets():
    # "é!" is 3 UTF-8 bytes: two bytes: tokens and "!" make up the prompt.
    body = response(
        {
            "index": 0,
            "logprobs": lp(["bytes:\\xc3", "bytes:\\xa9", "!", "?"], [None, -0.1, -0.2, -0.3]),
        }
    )
    request = CompletionRequest(prompt="é!", echo=True)
    choices, tokens, _ = to_frames(body, request)
    assert tokens["echo"].tolist() == [True, True, True, False]
    assert choices["prompt_sum_logprob"].iloc[0] == pytest.approx(-0.3)
    assert choices["sum_logprob"].iloc[0] == pytest.approx(-0.3)


def test_echo_with_several_prompts_and_n():
    def choice(index: int, tokens: list[str], offsets: list[int]) -> dict:
        return {
            "index": index,
            "logprobs": lp(tokens, [None] + [-1.0] * (len(tokens) - 1), None, offsets),
        }

    body = response(
        choice(2, ["b", "bb", "x"], [0, 1, 3]),
        choice(0, ["a", "y", "z"], [0, 1, 2]),
        choice(3, ["b", "bb", "w"], [0, 1, 3]),
        choice(1, ["a", "q"], [0, 1]),
    )
    request = CompletionRequest(prompt=["a", "bbb"], n=2, echo=True)
    choices, tokens, _ = to_frames(body, request)
    assert choices["prompt_n_tokens"].tolist() == [1, 1, 2, 2]
    assert choices["n_tokens"].tolist() == [2, 1, 1, 1]
    assert tokens["echo"].tolist() == [
        True,
        False,
        False,
        True,
        False,
        True,
        True,
        False,
        True,
        True,
        False,
    ]


def test_echo_with_max_tokens_zero_scores_the_prompt_only():
    body = response(
        {
            "index": 0,
            "text": "To be",
            "logprobs": lp(["To", " be"], [None, -3.0], [None, {" be": -3.0, ",": -1.0}], [0, 2]),
        }
    )
    request = CompletionRequest(prompt="To be", echo=True, max_tokens=0, logprobs=2)
    choices, tokens, _ = to_frames(body, request)
    assert tokens["echo"].tolist() == [True, True]
    row = choices.iloc[0]
    assert (row["n_tokens"], row["prompt_n_tokens"]) == (0, 2)
    assert row["prompt_sum_logprob"] == -3.0
    assert math.isnan(row["sum_logprob"])


def test_echo_falls_back_to_finish_reason_length_then_usage():
    # "\ufffd" tokens do not add up to the prompt's bytes and there are no offsets.
    def choice(index: int, tokens: list[str], finish: str) -> dict:
        return {
            "index": index,
            "finish_reason": finish,
            "logprobs": lp(tokens, [None] + [-1.0] * (len(tokens) - 1)),
        }

    body = response(
        choice(0, ["\ufffd", "\ufffd", "a"], "stop"),
        choice(1, ["\ufffd", "\ufffd", "b", "c"], "length"),
    )
    request = CompletionRequest(prompt="ab", echo=True, n=2, max_tokens=2)
    choices, _, _ = to_frames(body, request)
    # Choice 1 ran to max_tokens: 4 - 2 = 2 prompt tokens, the same for choice 0.
    assert choices["prompt_n_tokens"].tolist() == [2, 2]
    assert choices["n_tokens"].tolist() == [1, 2]

    body = response(
        choice(0, ["\ufffd", "\ufffd", "a"], "stop"),
        usage={"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
    )
    choices, _, _ = to_frames(body, CompletionRequest(prompt="ab", echo=True))
    assert choices["prompt_n_tokens"].tolist() == [2]


def test_echo_that_cannot_be_split_is_marked_unknown():
    body = response(
        {"index": 0, "finish_reason": "stop", "logprobs": lp(["\ufffd", "a"], [None, -1.0])}
    )
    choices, tokens, _ = to_frames(body, CompletionRequest(prompt=["ab", "cd"], echo=True))
    row = choices.iloc[0]
    assert pd.isna(row["prompt_n_tokens"])
    assert pd.isna(row["n_tokens"])
    assert math.isnan(row["sum_logprob"])
    assert not tokens["echo"].any()
    assert tokens["logprob"].iloc[1] == -1.0  # the tokens themselves are still there


def test_without_request_nothing_is_echo():
    body = response({"index": 0, "logprobs": lp(["a", "b"], [None, -1.0])})
    choices, tokens, _ = to_frames(body)
    assert not tokens["echo"].any()
    assert choices["prompt_n_tokens"].tolist() == [0]
    assert choices["sum_logprob"].tolist() == [-1.0]


def test_request_body_mapping_works_like_a_request():
    body = response({"index": 1, "logprobs": lp(["a", "b"], [None, -1.0])})
    choices, tokens, _ = to_frames(body, {"prompt": [5], "echo": True, "n": 2})
    assert choices["prompt_index"].tolist() == [0]
    assert choices["choice"].tolist() == [1]
    assert tokens["echo"].tolist() == [True, False]


# --- entropy bounds ------------------------------------------------------------------------------


def bounds(
    tops: dict[str, float], chosen: str, chosen_p: float, *, vocab_size: int, logprobs: int | None
) -> tuple[float, float, float]:
    body = response(
        {
            "index": 0,
            "logprobs": lp([chosen], [LN(chosen_p)], [{t: LN(p) for t, p in tops.items()}]),
        }
    )
    request = None if logprobs is None else CompletionRequest(prompt="p", logprobs=logprobs)
    row = to_frames(body, request, vocab_size=vocab_size)[1].iloc[0]
    return row["entropy_low"], row["entropy_high"], row["top_mass"]


def test_entropy_bounds_mass_fits_in_one_token():
    # Known 0.5 and 0.25, 0.25 left for 8 unseen tokens each at most 0.25.
    low, high, mass = bounds({"a": 0.5, "b": 0.25}, "a", 0.5, vocab_size=10, logprobs=2)
    assert mass == pytest.approx(0.75)
    assert low == pytest.approx(entropy([0.5, 0.25, 0.25]))
    assert high == pytest.approx(entropy([0.5, 0.25] + [0.25 / 8] * 8))


def test_entropy_bounds_cap_binds():
    # 0.3 left, each unseen token at most 0.1 (the smallest top-k probability): three at 0.1.
    low, high, _ = bounds({"a": 0.6, "b": 0.1}, "a", 0.6, vocab_size=10, logprobs=2)
    assert low == pytest.approx(entropy([0.6, 0.1, 0.1, 0.1, 0.1]))
    assert high == pytest.approx(entropy([0.6, 0.1] + [0.3 / 8] * 8))


def test_entropy_bounds_when_the_chosen_entry_may_be_an_extra_one():
    tops = {"a": 0.4, "b": 0.3, "c": 0.1}
    # logprobs=3: three entries are the top 3, the cap is 0.1: 0.2 left -> two tokens of 0.1.
    low, _, _ = bounds(tops, "c", 0.1, vocab_size=100, logprobs=3)
    assert low == pytest.approx(entropy([0.4, 0.3, 0.1, 0.1, 0.1]))
    # logprobs=2: "c" is the sampled token added below the top 2; unseen tokens may reach 0.3.
    low, _, _ = bounds(tops, "c", 0.1, vocab_size=100, logprobs=2)
    assert low == pytest.approx(entropy([0.4, 0.3, 0.1, 0.2]))
    # Request unknown: the cautious reading, as with logprobs=2.
    low, high, _ = bounds(tops, "c", 0.1, vocab_size=100, logprobs=None)
    assert low == pytest.approx(entropy([0.4, 0.3, 0.1, 0.2]))
    assert high == pytest.approx(entropy([0.4, 0.3, 0.1] + [0.2 / 97] * 97))


def test_entropy_bounds_chosen_token_missing_from_the_list():
    low, high, mass = bounds({"a": 0.5, "b": 0.3}, "z", 0.1, vocab_size=10, logprobs=2)
    assert mass == pytest.approx(0.9)
    assert low == pytest.approx(entropy([0.5, 0.3, 0.1, 0.1]))
    assert high == pytest.approx(entropy([0.5, 0.3, 0.1] + [0.1 / 7] * 7))


def test_entropy_bounds_full_mass_known_are_exact():
    low, high, mass = bounds({"a": 0.75, "b": 0.25}, "a", 0.75, vocab_size=50, logprobs=2)
    assert mass == pytest.approx(1.0)
    assert low == pytest.approx(entropy([0.75, 0.25]))
    assert high == pytest.approx(entropy([0.75, 0.25]))


def test_default_and_custom_vocab_size():
    body = response({"index": 0, "logprobs": lp(["a"], [LN(0.5)], [{"a": LN(0.5)}])})
    default = to_frames(body)[1]
    small = to_frames(body, vocab_size=3)[1]
    assert default.attrs["vocab_size"] == 50257
    assert small.attrs["vocab_size"] == 3
    assert default["entropy_high"].iloc[0] == pytest.approx(entropy([0.5] + [0.5 / 50256] * 50256))
    assert small["entropy_high"].iloc[0] == pytest.approx(entropy([0.5, 0.25, 0.25]))
    # Only "a" was listed (request unknown: it might be an extra entry), so no cap is known.
    assert small["entropy_low"].iloc[0] == pytest.approx(entropy([0.5, 0.5]))


# --- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "kind", "words"),
    [
        ("not a response", TypeError, "response must be a dict"),
        ({"choices": {"0": {}}}, ValueError, "response['choices'] must be a list; got dict"),
        ({"choices": [3]}, ValueError, "response['choices'][0] must be an object; got int"),
        ({"choices": [{"logprobs": [1]}]}, ValueError, "response['choices'][0].logprobs must be"),
        (
            {"choices": [{"logprobs": {"tokens": "abc"}}]},
            ValueError,
            "response['choices'][0].logprobs.tokens must be a list or null; got str",
        ),
        (
            {"choices": [{"logprobs": {"tokens": ["a"], "token_logprobs": ["x"]}}]},
            ValueError,
            "token_logprobs must hold numbers or nulls; got 'x'",
        ),
        (
            {"choices": [{"logprobs": {"tokens": ["a"], "top_logprobs": [5]}}]},
            ValueError,
            "each top_logprobs entry must be",
        ),
        ({"error": {"message": "boom"}}, ValueError, "response is an error body"),
    ],
)
def test_bad_responses_raise_clear_errors(bad, kind, words):
    with pytest.raises(kind) as info:
        to_frames(bad)
    assert words in str(info.value)


@pytest.mark.parametrize("vocab_size", [0, -5, 2.5, "50257"])
def test_bad_vocab_size(vocab_size):
    with pytest.raises(ValueError, match=r"vocab_size must be an integer >= 1; got"):
        to_frames(response(), vocab_size=vocab_size)


def test_bad_request_type():
    with pytest.raises(TypeError, match="request must be a CompletionRequest"):
        to_frames(response(), request=42)  # type: ignore[arg-type]  # the refusal under test


# --- a real response from the embedded model -----------------------------------------------------


def test_frames_of_a_real_embedded_response(embedded_engine):
    prompt = "To be, or not to be"
    request = CompletionRequest(
        prompt=prompt, model="nbc-shakespeare", logprobs=5, echo=True, max_tokens=8
    )
    body = embedded_engine.complete(request)
    choices, tokens, alternatives = to_frames(body, request, vocab_size=embedded_engine.vocab_size)

    prompt_ids = embedded_engine.encode(prompt)
    raw = body["choices"][0]["logprobs"]
    assert len(tokens) == len(raw["tokens"])
    assert tokens["token"].tolist() == raw["tokens"]
    echoed = tokens[tokens["echo"]]
    assert echoed["token"].tolist() == [embedded_engine.token_str(i) for i in prompt_ids]
    assert echoed["position"].tolist() == list(range(len(prompt_ids)))
    row = choices.iloc[0]
    assert row["prompt_n_tokens"] == len(prompt_ids)
    assert row["n_tokens"] == body["usage"]["completion_tokens"]
    generated = [v for v in raw["token_logprobs"][len(prompt_ids) :] if v is not None]
    assert row["sum_logprob"] == pytest.approx(sum(generated))
    assert row["prompt_sum_logprob"] == pytest.approx(
        sum(raw["token_logprobs"][1 : len(prompt_ids)])
    )

    assert tokens.attrs["vocab_size"] == embedded_engine.vocab_size
    scored = tokens.iloc[1:]  # the first prompt token has no logprob and no alternatives
    assert scored["rank"].notna().all()
    assert (scored["entropy_low"] <= scored["entropy_high"]).all()
    assert scored["top_mass"].between(0, 1 + 1e-6).all()
    assert len(alternatives) == sum(len(d) for d in raw["top_logprobs"] if d)
    assert set(alternatives.groupby("position").size()) <= {5, 6}
    # Like OpenAI today, the engine lists the sampled token at every scored position.
    chosen_rows = alternatives[alternatives["chosen"]].set_index("position")
    assert chosen_rows.index.tolist() == scored["position"].tolist()
    assert chosen_rows["logprob"].to_numpy() == pytest.approx(scored["logprob"].to_numpy())


def test_sdk_choice_objects_inside_a_plain_dict():
    openai_types = pytest.importorskip("openai.types")
    choice = openai_types.CompletionChoice.model_validate(
        {
            "index": 0,
            "text": "a",
            "finish_reason": "stop",
            "logprobs": lp(["a"], [-0.5], [{"a": -0.5}], [0]),
        }
    )
    choices, tokens, _ = to_frames({"choices": [choice]})
    assert choices["text"].tolist() == ["a"]
    assert tokens["logprob"].tolist() == [-0.5]


def test_echo_split_of_real_partial_utf8_tokens(embedded_engine):
    prompt = "日本語 “quotes” €"
    request = CompletionRequest(
        prompt=[prompt, "To be"], model="nbc-shakespeare", logprobs=2, echo=True, max_tokens=3, n=2
    )
    body = embedded_engine.complete(request)
    # Without text_offset (and finish_reason) the split must come from the tokens' bytes.
    stripped = copy.deepcopy(body)
    for choice in stripped["choices"]:
        choice["logprobs"].pop("text_offset", None)
        choice["finish_reason"] = None
    expected = [len(embedded_engine.encode(text)) for text in (prompt, prompt, "To be", "To be")]
    for response_body in (body, stripped):
        choices, tokens, _ = to_frames(response_body, request)
        assert choices["prompt_n_tokens"].tolist() == expected
        assert choices["prompt_index"].tolist() == [0, 0, 1, 1]
        assert choices["n_tokens"].tolist() == [
            len(c["logprobs"]["tokens"]) - e
            for c, e in zip(
                sorted(body["choices"], key=lambda c: c["index"]), expected, strict=True
            )
        ]
        assert tokens.groupby("index")["echo"].sum().tolist() == expected


def test_frames_of_a_merged_streamed_response(embedded_client, embedded_engine):
    prompt = "To be, or not"
    # End-of-text banned (and a seed, so a failure reproduces): unbanned, the model may end a choice
    # before its 4 tokens, and the counts below would not hold.
    no_eot = {str(embedded_engine.eot_token_id): -100}
    completion = embedded_client.complete(
        prompt, logprobs=3, echo=True, max_tokens=4, n=2, stream=True, seed=5, logit_bias=no_eot
    )
    choices, tokens, alternatives = to_frames(
        completion.raw, completion.request, vocab_size=embedded_engine.vocab_size
    )
    n_prompt = len(embedded_engine.encode(prompt))
    assert choices["index"].tolist() == [0, 1]
    assert choices["prompt_n_tokens"].tolist() == [n_prompt, n_prompt]
    assert choices["n_tokens"].tolist() == [4, 4]
    for index in (0, 1):
        rows = tokens[tokens["index"] == index]
        assert rows["position"].tolist() == list(range(n_prompt + 4))
        assert rows["logprob"].isna().tolist() == [True] + [False] * (n_prompt + 3)
        assert rows["text_offset"].is_monotonic_increasing
    assert len(alternatives) == sum(
        len(d or ()) for c in completion.raw["choices"] for d in c["logprobs"]["top_logprobs"]
    )


def test_tokens_frame_carries_the_k_asked_for_so_plots_write_ranks_past_it_as_the_popup_does():
    from nbcompletions import plots

    top = {"a": -0.1, "b": -2.5}
    body = {
        "choices": [
            {
                "index": 0,
                "text": "ac",
                "logprobs": {
                    "tokens": ["a", "c"],
                    "token_logprobs": [-0.1, -6.0],
                    "top_logprobs": [top, top],
                    "text_offset": [0, 1],
                },
                "finish_reason": "length",
            }
        ]
    }
    tokens = to_frames(body, {"prompt": "x", "logprobs": 2})[1]
    assert tokens.attrs["logprobs"] == 2
    assert tokens["rank"].tolist() == [1, 3]  # "c" is outside the top 2: its rank is a bound
    text = list(plots.token_probabilities(tokens).data[0].text)
    assert text[1].endswith("rank >2")
    assert "logprobs" not in to_frames(body, {"prompt": "x"})[1].attrs
