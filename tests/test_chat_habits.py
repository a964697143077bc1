"""Chat API habits meet the Completions endpoint with a hint, not a bare error (issue 10, 8)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import needs_weights
from helpers import mock_client

from nbcompletions import AsyncClient, CompletionRequest, Limits, RequestError

CHAT = [{"role": "user", "content": "Hello"}]


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError("nothing may be sent")


@pytest.mark.parametrize("value", [True, False])
def test_boolean_logprobs_says_completions_takes_a_count(value: bool) -> None:
    with pytest.raises(RequestError) as info:
        CompletionRequest(prompt="x", logprobs=value)
    message = str(info.value)
    assert info.value.param == "logprobs"
    assert "integer count from 0 to 5" in message
    assert "Chat API's boolean logprobs does not apply" in message
    assert f"got {value!r}" in message


def test_boolean_logprobs_names_the_servers_cap() -> None:
    with pytest.raises(RequestError, match="from 0 to 20"):
        CompletionRequest(prompt="x", logprobs=True, limits=Limits.vllm())


def test_logprobs_true_through_the_client_sends_nothing() -> None:
    with mock_client(never) as client, pytest.raises(RequestError, match="integer count"):
        client.complete("x", logprobs=True)


@pytest.mark.parametrize("cls", ["sync", "async"])
def test_messages_says_this_is_completions_and_how_to_make_a_prompt(cls: str) -> None:
    kind: Any = None if cls == "sync" else AsyncClient
    client = mock_client(never, cls=kind)
    with pytest.raises(TypeError) as info:
        client.build_request(messages=CHAT)
    message = str(info.value)
    assert "client.chat(messages" in message
    assert "Completions endpoint (POST /v1/completions)" in message
    assert "prompt=" in message
    assert "Assistant:" in message
    assert "apply_chat_template" in message


def test_complete_with_messages_and_no_prompt_gets_the_hint() -> None:
    with mock_client(never) as client, pytest.raises(TypeError, match="Chat Completions API"):
        client.complete(messages=CHAT)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("field", "instead"), [("top_logprobs", "logprobs=N"), ("max_completion_tokens", "max_tokens")]
)
def test_other_chat_fields_name_their_completions_twin(field: str, instead: str) -> None:
    fields: dict[str, Any] = {field: 3}
    with mock_client(never) as client, pytest.raises(TypeError, match=instead):
        client.complete("x", **fields)


def test_a_body_with_messages_is_refused_naming_messages() -> None:
    with pytest.raises(RequestError) as info:
        CompletionRequest.from_body({"model": "m", "messages": CHAT})
    assert info.value.param == "messages"
    assert "prompt=" in str(info.value)


def test_the_embedded_server_answers_a_chat_body_with_the_hint() -> None:
    needs_weights()
    from nbcompletions.server import create_app

    transport = httpx.ASGITransport(create_app())

    async def post() -> httpx.Response:
        async with httpx.AsyncClient(transport=transport, base_url="http://embedded") as http:
            return await http.post(
                "/v1/completions", json={"model": "nbc-shakespeare", "messages": CHAT}
            )

    import asyncio

    response = asyncio.run(post())
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages"
    assert "Completions endpoint" in error["message"]
