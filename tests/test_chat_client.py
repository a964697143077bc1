"""Client.chat, chat_stream and respond against our embedded server's chat routes (issue 17).

The real client and the real server (in process): the chat answer's frames are checked against
the completion of the same text that the model's chat template makes of the messages.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from nbcompletions import AsyncClient, Client, RequestError
from nbcompletions.model import render_chat

MESSAGES = [
    {"role": "system", "content": "You speak as a Shakespearean player."},
    {"role": "user", "content": "What news, good sir?"},
]


def test_a_greedy_chat_is_the_completion_of_the_rendered_template(embedded_client: Client) -> None:
    fields: dict[str, Any] = {"max_tokens": 6, "temperature": 0.0, "seed": 1}
    chat = embedded_client.chat(MESSAGES, logprobs=True, top_logprobs=3, **fields)
    completion = embedded_client.complete(render_chat(MESSAGES), logprobs=3, **fields)
    assert chat.api == "chat"
    assert chat.text == completion.text
    ours, theirs = chat.tokens, completion.tokens
    assert ours["token"].tolist() == theirs["token"].tolist()
    np.testing.assert_allclose(ours["logprob"], theirs["logprob"], atol=1e-4)
    np.testing.assert_allclose(ours["entropy_high"], theirs["entropy_high"], atol=1e-3)
    assert chat.alternatives.groupby("position").size().eq(3).all()
    assert chat.choices.loc[0, "n_tokens"] == chat.usage["completion_tokens"]
    assert set(chat.tokens["role"]) == {"assistant"}
    assert not chat.tokens["below_cap"].any()


def test_stream_true_merges_into_the_unstreamed_answer(embedded_client: Client) -> None:
    fields: dict[str, Any] = {"max_tokens": 6, "seed": 7, "logprobs": True, "top_logprobs": 2}
    whole = embedded_client.chat(MESSAGES, **fields)
    merged = embedded_client.chat(MESSAGES, stream=True, **fields)
    with embedded_client.chat_stream(MESSAGES, **fields) as stream:
        pieces = [piece.text for piece in stream]
        streamed = stream.completion()
    assert merged.text == whole.text == "".join(pieces) == streamed.text
    assert merged.tokens.equals(whole.tokens)
    assert merged.choices["role"].tolist() == ["assistant"]


def test_n_choices_each_have_their_rows(embedded_client: Client) -> None:
    chat = embedded_client.chat(MESSAGES, n=3, max_tokens=4, seed=3, logprobs=True)
    assert chat.choices["choice"].tolist() == [0, 1, 2]
    assert chat.tokens.groupby("choice").size().tolist() == [4, 4, 4]
    assert len(chat.texts) == 3


def test_respond_gives_the_chat_frames_with_api_responses(embedded_client: Client) -> None:
    fields: dict[str, Any] = {"temperature": 0.0, "top_logprobs": 2}
    response = embedded_client.respond(MESSAGES, max_output_tokens=5, **fields)
    chat = embedded_client.chat(MESSAGES, max_tokens=5, logprobs=True, **fields)
    assert response.api == "responses"
    assert response.text == chat.text
    assert set(response.tokens["api"]) == {"responses"}
    assert response.tokens.drop(columns="api").equals(chat.tokens.drop(columns="api"))
    assert response.finish_reason == "length"


def test_the_async_client_chats(embedded_client: Client) -> None:
    async def run() -> tuple[str, str]:
        client = AsyncClient(embedded=True)
        try:
            chat = await client.chat(MESSAGES, max_tokens=4, temperature=0.0)
            response = await client.respond("What news?", max_output_tokens=4, temperature=0.0)
        finally:
            await client.close()
        return chat.text, response.text

    chat, response = asyncio.run(run())
    assert chat == embedded_client.chat(MESSAGES, max_tokens=4, temperature=0.0).text
    assert response


def test_a_bad_field_is_refused_before_sending(embedded_client: Client) -> None:
    with pytest.raises(RequestError) as info:
        embedded_client.chat(MESSAGES, logprobs=True, top_logprobs=21)
    assert info.value.param == "top_logprobs"
    assert "from 0 to 20" in str(info.value)
    assert "21" in str(info.value)
