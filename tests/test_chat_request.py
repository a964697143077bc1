"""ChatRequest and ResponsesRequest: every chat field validated before sending (issue 17)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from nbcompletions import Limits, RequestError
from nbcompletions._chat import OUTPUT_TEXT_LOGPROBS, ChatRequest, ResponsesRequest

HELLO = [{"role": "user", "content": "Hello"}]


def test_a_valid_request_sends_the_fields_it_was_given() -> None:
    fields: dict[str, Any] = {"stop": ("\n",), "logit_bias": {50256: -100}}
    request = ChatRequest(
        HELLO,
        model="m",
        logprobs=True,
        top_logprobs=20,
        n=2,
        seed=np.int64(3),
        temperature=0.5,
        top_p=0.9,
        max_completion_tokens=5,
        max_tokens=5,
        presence_penalty=1,
        frequency_penalty=-1,
        user="u",
        extra={"top_k": 5},
        **fields,
    )
    body = request.to_body()
    assert body["messages"] == HELLO
    assert body["seed"] == 3
    assert type(body["seed"]) is int
    assert body["stop"] == ["\n"]
    assert body["logit_bias"] == {"50256": -100}
    assert body["top_k"] == 5
    assert ChatRequest.from_body(body) == request


@pytest.mark.parametrize(
    ("fields", "param", "allowed"),
    [
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "from 0 to 20"),
        ({"logprobs": True, "top_logprobs": -1}, "top_logprobs", "from 0 to 20"),
        ({"top_logprobs": 3}, "top_logprobs", "unset or 0 unless logprobs=True"),
        ({"logprobs": 5}, "logprobs", "true or false"),
        ({"temperature": 2.5}, "temperature", "from 0 to 2"),
        ({"top_p": 1.5}, "top_p", "from 0 to 1"),
        ({"n": 0}, "n", "from 1 to 128"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", ">= 0"),
        ({"max_tokens": 1.5}, "max_tokens", ">= 0"),
        ({"presence_penalty": 3}, "presence_penalty", "from -2 to 2"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty", "from -2 to 2"),
        ({"logit_bias": {"x": 1}}, "logit_bias", "ASCII digits"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "up to 4"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream=True"),
        ({"seed": "1"}, "seed", "an integer"),
        ({"user": 5}, "user", "a string"),
        ({"extra": {"messages": []}}, "extra", "non-standard"),
    ],
)
def test_a_bad_field_names_itself_its_range_and_the_value(
    fields: dict[str, Any], param: str, allowed: str
) -> None:
    with pytest.raises(RequestError) as info:
        ChatRequest(HELLO, **fields)
    assert info.value.param == param
    assert allowed in str(info.value.allowed)
    assert "got" in str(info.value)


def test_top_logprobs_0_without_logprobs_asks_for_nothing() -> None:
    assert ChatRequest(HELLO, top_logprobs=0).to_body()["top_logprobs"] == 0


def test_top_logprobs_follows_the_servers_cap() -> None:
    assert ChatRequest(HELLO, logprobs=True, top_logprobs=50, limits=Limits.llamacpp())
    with pytest.raises(RequestError, match="from 0 to 20"):
        ChatRequest(HELLO, logprobs=True, top_logprobs=21, limits=Limits.vllm())


@pytest.mark.parametrize(
    ("messages", "says"),
    [
        (None, "non-empty list"),
        ([], "non-empty list"),
        ("Hello", "non-empty list"),
        (["Hello"], "messages[0] must be an object"),
        ([{"role": "bot", "content": "x"}], "messages[0].role must be one of system"),
        ([{"role": "user"}], "messages[0] must have a content"),
        ([{"role": "user", "content": 5}], "messages[0].content must be a string"),
        ([{"role": "user", "content": "\ud800"}], "lone surrogate"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "text parts"),
    ],
)
def test_bad_messages_say_which_message_and_why(messages: Any, says: str) -> None:
    with pytest.raises(RequestError) as info:
        ChatRequest(messages)
    assert info.value.param == "messages"
    assert says in str(info.value)


def test_every_role_and_content_parts_are_accepted() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "developer", "content": "d"},
        {"role": "user", "content": [{"type": "text", "text": "u"}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "tool", "content": "t", "tool_call_id": "1"},
    ]
    request = ChatRequest(tuple(messages))
    assert request.messages == messages
    assert request.messages[0] is not messages[0]  # the request owns copies


def test_model_is_required_where_the_server_needs_it() -> None:
    with pytest.raises(RequestError) as info:
        ChatRequest.from_body({"messages": HELLO}, require_model=True)
    assert info.value.param == "model"


def test_responses_request_always_asks_for_the_output_texts_logprobs() -> None:
    assert ResponsesRequest("Hi").to_body()["include"] == [OUTPUT_TEXT_LOGPROBS]
    request = ResponsesRequest(HELLO, include=["reasoning.encrypted_content"], top_logprobs=3)
    body = request.to_body()
    assert body["include"] == ["reasoning.encrypted_content", OUTPUT_TEXT_LOGPROBS]
    assert body["input"] == HELLO
    assert body["top_logprobs"] == 3


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": None}, "input"),
        ({"input": [{"role": "x", "content": "y"}]}, "input"),
        ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
        ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "x", "include": "all"}, "include"),
        ({"input": "x", "temperature": -1}, "temperature"),
        ({"input": "x", "instructions": 3}, "instructions"),
    ],
)
def test_responses_request_checks_its_fields(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(RequestError) as info:
        ResponsesRequest(**fields)
    assert info.value.param == param
