"""Widgets, tested by setting their state in Python (no browser; tests/test_browser.py renders them)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nbcompletions import CompletionRequest, Limits, RequestError
from nbcompletions.widgets import (
    parse_logit_bias,
    parse_stop,
    parse_values,
    playground_request,
)

FAKE_KEY = "sk-nbc-test-NEVER-SYNC-THIS-KEY-1234567890"


def _state(**changes: Any) -> dict[str, Any]:
    state: dict[str, Any] = {
        "prompt": "To be", "model": "nbc-shakespeare", "temperature": 1.0, "top_p": 1.0,
        "frequency_penalty": 0.0, "presence_penalty": 0.0, "logprobs": 5, "max_tokens": 16,
        "n": 1, "best_of": 1, "seed": "", "suffix": "", "echo": False, "stream": False,
        "stop": ["", "", "", ""], "logit_bias": "",
    }
    state.update(changes)
    return state


# -- pure state -> request ----------------------------------------------------------------------------

def test_default_state_sends_only_the_core_fields() -> None:
    request = playground_request(_state())
    assert request.to_body() == {"model": "nbc-shakespeare", "prompt": "To be", "logprobs": 5,
                                 "max_tokens": 16, "temperature": 1.0, "top_p": 1.0}


def test_every_control_reaches_its_field() -> None:
    request = playground_request(_state(
        temperature=0.7, top_p=0.9, frequency_penalty=0.5, presence_penalty=-1.5, logprobs=None,
        max_tokens=3, n=2, best_of=3, seed=" 42 ", suffix="END", echo=True,
        stop=["\\n", "", "the end", ""], logit_bias="50256: -100\n7: 2.5"))
    assert request == CompletionRequest(
        prompt="To be", model="nbc-shakespeare", temperature=0.7, top_p=0.9, frequency_penalty=0.5,
        presence_penalty=-1.5, max_tokens=3, n=2, best_of=3, seed=42, suffix="END", echo=True,
        stop=["\n", "the end"], logit_bias={"50256": -100, "7": 2.5})
    assert request.logprobs is None


def test_stream_asks_for_usage() -> None:
    request = playground_request(_state(stream=True))
    assert request.stream is True
    assert request.stream_options == {"include_usage": True}


@pytest.mark.parametrize(("changes", "param"), [
    ({"max_tokens": -1}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"),
    ({"stream": True, "best_of": 2}, "best_of"),
    ({"seed": "forty-two"}, "seed"),
    ({"logit_bias": "50256 -100"}, "logit_bias"),
    ({"logit_bias": "50256: -101"}, "logit_bias"),
    ({"logit_bias": "50256: lots"}, "logit_bias"),
    ({"logprobs": 6}, "logprobs"),
])
def test_invalid_state_names_the_field(changes: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        playground_request(_state(**changes))
    assert info.value.param == param
    assert param in str(info.value)


def test_logprobs_cap_follows_the_limits() -> None:
    assert playground_request(_state(logprobs=20), limits=Limits.vllm()).logprobs == 20
    with pytest.raises(RequestError, match="logprobs"):
        playground_request(_state(logprobs=21), limits=Limits.vllm())


def test_stop_escapes_and_blanks() -> None:
    assert parse_stop(["", "", ""]) is None
    assert parse_stop(["\\n\\n", "a\\tb", "back\\\\n", "é"]) == ["\n\n", "a\tb", "back\\n", "é"]


def test_logit_bias_text_keys_use_the_tokenizer() -> None:
    vocabulary = {" the": [262], "the": [1169], "\n": [198], "hello world": [31373, 995]}
    calls: list[str] = []

    def encode(text: str) -> list[int]:
        calls.append(text)
        return vocabulary[text]

    bias = parse_logit_bias('" the": -100\nthe: 5\n"\\n": 1\n# a comment\n\n'
                            'hello world: -3\n42: 0', encode)
    assert bias == {"262": -100, "1169": 5, "198": 1, "31373": -3, "995": -3, "42": 0}
    assert calls == [" the", "the", "\n", "hello world"]


def test_logit_bias_text_without_a_tokenizer_asks_for_ids() -> None:
    assert parse_logit_bias("42: 1") == {"42": 1}
    with pytest.raises(RequestError, match="token ids") as info:
        parse_logit_bias('" the": 1')
    assert info.value.param == "logit_bias"


def test_logit_bias_bad_quoted_text() -> None:
    with pytest.raises(RequestError, match="line 2"):
        parse_logit_bias('1: 1\n"\\x": 1', lambda text: [1])


def test_parse_values_types_and_errors() -> None:
    assert parse_values("temperature", "0, 0.5,1 ,") == [0.0, 0.5, 1.0]
    assert parse_values("max_tokens", "1,2") == [1, 2]
    assert parse_values("stop", "\\n, .") == ["\n", "."]
    with pytest.raises(RequestError, match="max_tokens values must each be an integer"):
        parse_values("max_tokens", "1, 2.5")
    with pytest.raises(RequestError, match="temperature: give at least one value"):
        parse_values("temperature", " , ")


def test_request_body_is_json() -> None:
    body = playground_request(_state(stop=["\\n", "", "", ""], logit_bias="1: 1")).to_body()
    assert json.loads(json.dumps(body)) == body
