"""OpenAI's Chat Completions and Responses answers, recorded from the openai SDK's own types
(tests/fixtures/openai/record.py), read by the real client into frames (issue 17).

httpx.MockTransport serves only these recorded bodies: no network, and the client above the
transport (encoding, retries, errors, streaming, frames) is the real one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers import mock_client

from nbcompletions import APIError, AsyncClient, RequestError
from nbcompletions._chat_frames import chat_frames

RECORDED = Path(__file__).parent / "fixtures" / "openai"
HELLO = [{"role": "user", "content": "Say hi with an emoji"}]


def recorded(name: str) -> Any:
    return json.loads((RECORDED / name).read_text(encoding="utf-8"))


class Server:
    """Answers each request with a recorded body, and keeps what was sent."""

    def __init__(self, name: str, status: int = 200) -> None:
        self.answer = recorded(name)
        self.status = status
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.url.path, json.loads(request.content)))
        if isinstance(self.answer, list):  # a stream's chunks
            events = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in self.answer)
            return httpx.Response(
                200,
                content=(events + "data: [DONE]\n\n").encode(),
                headers={"content-type": "text/event-stream"},
            )
        return httpx.Response(self.status, json=self.answer)


def test_the_sdk_types_still_read_the_recorded_bodies() -> None:
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.responses import Response

    ChatCompletion.model_validate(recorded("chat_logprobs.json"))
    ChatCompletion.model_validate(recorded("chat_refusal.json"))
    for chunk in recorded("chat_stream.json"):
        ChatCompletionChunk.model_validate(chunk)
    Response.model_validate(recorded("responses_logprobs.json"))


def test_chat_sends_the_chat_fields_to_chat_completions() -> None:
    server = Server("chat_logprobs.json")
    with mock_client(server) as client:
        completion = client.chat(HELLO, logprobs=True, top_logprobs=2, seed=1, temperature=0)
    path, body = server.sent[0]
    assert path == "/v1/chat/completions"
    assert body == {
        "model": "m",
        "messages": HELLO,
        "logprobs": True,
        "seed": 1,
        "temperature": 0,
        "top_logprobs": 2,
    }
    assert completion.text == "Hi 😀!"
    assert completion.api == "chat"
    assert completion.usage["completion_tokens"] == 4


def test_chat_frames_have_the_completion_columns_and_chats() -> None:
    from nbcompletions import to_frames

    server = Server("chat_logprobs.json")
    with mock_client(server) as client:
        completion = client.chat(HELLO, logprobs=True, top_logprobs=2)
    plain = to_frames({"choices": [{"index": 0, "text": "x"}]})
    for frame, columns in zip(completion.frames(), plain, strict=True):
        assert list(frame.columns[: len(columns.columns)]) == list(columns.columns)
        assert {"role", "refusal", "api"} <= set(frame.columns)
    choices, tokens, alternatives = completion.frames()
    assert choices.loc[0, "role"] == "assistant"
    assert choices.loc[0, "refusal"] is None
    assert set(tokens["api"]) == {"chat"}
    assert set(alternatives["api"]) == {"chat"}
    assert not tokens["refusal"].any()


def test_a_character_split_over_two_tokens_keeps_its_bytes() -> None:
    _, tokens, alternatives = chat_frames(recorded("chat_logprobs.json"))
    assert list(tokens["token"]) == ["Hi", "bytes: \\xf0\\x9f", "bytes:\\x98\\x80", "!"]
    assert tokens["token_display"][1].endswith("<0xF0><0x9F>")
    assert tokens["token_display"][2] == "<0x98><0x80>"
    # The two halves' bytes make the emoji again.
    halves = [
        t[6:].encode().decode("unicode_escape").encode("latin-1") for t in tokens["token"][1:3]
    ]
    assert b"".join(halves).decode() == " 😀"
    assert alternatives.loc[alternatives["position"] == 1, "chosen"].tolist() == [True, False]


def test_minus_9999_is_below_the_cap_not_a_probability() -> None:
    _, tokens, alternatives = chat_frames(recorded("chat_logprobs.json"), None)
    assert tokens["below_cap"].tolist() == [False, False, False, True]
    assert math.isnan(tokens["logprob"].iloc[3])
    assert math.isnan(tokens["prob"].iloc[3])
    below = alternatives[alternatives["below_cap"]]
    assert below[["position", "token"]].values.tolist() == [[2, ""]]
    assert math.isnan(below["logprob"].iloc[0])
    assert not (tokens["logprob"] == -9999.0).any()
    assert not (alternatives["logprob"] == -9999.0).any()


def test_the_entropy_bounds_count_a_below_cap_entry_as_an_unseen_token() -> None:
    body = recorded("chat_logprobs.json")
    _, tokens, _ = chat_frames(body)
    # The same answer without the -9999 entry: that token is then unseen, each unseen token at
    # most the smallest listed probability: the bounds must not change.
    without = json.loads(json.dumps(body))
    content = without["choices"][0]["logprobs"]["content"]
    content[2]["top_logprobs"] = content[2]["top_logprobs"][:1]
    _, dropped, _ = chat_frames(without)
    for column in ("top_mass", "entropy_low", "entropy_high"):
        assert tokens.loc[2, column] == pytest.approx(dropped.loc[2, column])
    assert tokens["entropy_low"].iloc[2] <= tokens["entropy_high"].iloc[2]


def flat_answer(third: float | None) -> dict[str, Any]:
    """One token whose listed alternatives leave most of the mass unseen (so the cap binds)."""
    tops = [("a", -2.0), ("b", -2.1), ("c", third)]
    entry = {
        "token": "a",
        "logprob": -2.0,
        "top_logprobs": [{"token": t, "logprob": lp} for t, lp in tops],
    }
    logprobs = {"content": [entry]}
    return {"choices": [{"index": 0, "message": {"content": "a"}, "logprobs": logprobs}]}


def test_below_the_cap_keeps_the_cap_where_a_null_lifts_it() -> None:
    _, below, _ = chat_frames(flat_answer(-9999.0))
    _, unseen, _ = chat_frames(flat_answer(None))
    dropped = flat_answer(None)
    dropped["choices"][0]["logprobs"]["content"][0]["top_logprobs"].pop()
    _, without, _ = chat_frames(dropped)
    for column in ("top_mass", "entropy_low", "entropy_high"):
        assert below.loc[0, column] == pytest.approx(without.loc[0, column])
    # A null logprob is an unknown entry: it may hold any part of the rest, so no cap is known
    # there and the lower bound falls.
    assert unseen["entropy_low"].iloc[0] < below["entropy_low"].iloc[0]


def test_a_stream_merges_into_the_same_frames_as_the_whole_answer() -> None:
    whole = chat_frames(recorded("chat_logprobs.json"))
    with mock_client(Server("chat_stream.json")) as client:
        merged = client.chat(HELLO, logprobs=True, stream=True)
        pieces = list(client.chat_stream(HELLO, logprobs=True))
    assert merged.text == "Hi 😀!"
    assert "".join(piece.text for piece in pieces) == "Hi 😀!"
    for ours, theirs in zip(merged.frames(), whole, strict=True):
        assert ours.drop(columns="text", errors="ignore").equals(
            theirs.drop(columns="text", errors="ignore")
        )
    assert merged.choices.loc[0, "role"] == "assistant"


def test_chat_stream_refuses_stream_false() -> None:
    with mock_client(Server("chat_stream.json")) as client, pytest.raises(RequestError) as info:
        client.chat_stream(HELLO, stream=False)
    assert info.value.param == "stream"


def test_a_refusal_has_its_text_and_its_tokens_flagged() -> None:
    with mock_client(Server("chat_refusal.json")) as client:
        completion = client.chat(HELLO, logprobs=True, top_logprobs=2)
    choices, tokens, alternatives = completion.frames()
    assert choices.loc[0, "refusal"] == "I'm sorry"
    assert completion.text == ""
    assert tokens["token"].tolist() == ["I'm", " sorry"]
    assert tokens["refusal"].tolist() == [True, True]
    assert alternatives["refusal"].all()
    assert choices.loc[0, "sum_logprob"] == pytest.approx(-0.3)


def test_respond_asks_for_the_output_texts_logprobs_and_gives_the_same_frames() -> None:
    server = Server("responses_logprobs.json")
    with mock_client(server) as client:
        completion = client.respond("Say hi with an emoji", top_logprobs=2)
    path, body = server.sent[0]
    assert path == "/v1/responses"
    assert body["include"] == ["message.output_text.logprobs"]
    assert body["top_logprobs"] == 2
    assert completion.text == "Hi 😀!"
    assert completion.api == "responses"
    assert completion.usage["prompt_tokens"] == 9
    assert completion.finish_reason == "stop"
    chat = chat_frames(recorded("chat_logprobs.json"))
    for ours, theirs in zip(completion.frames(), chat, strict=True):
        assert set(ours["api"]) <= {"responses"}
        assert ours.drop(columns="api").equals(theirs.drop(columns="api"))


@pytest.mark.parametrize("call", ["chat", "respond"])
def test_a_reasoning_models_refusal_of_logprobs_says_which_model_and_why(call: str) -> None:
    server = Server("reasoning_logprobs_400.json", status=400)
    fields: dict[str, Any] = {"top_logprobs": 5}
    with mock_client(server, model="o3-mini") as client:
        if call == "chat":
            fields["logprobs"] = True
        send = client.chat if call == "chat" else client.respond
        with pytest.raises(APIError) as info:
            send(HELLO, **fields)
    error = info.value
    assert error.status == 400
    assert error.param == "logprobs"
    assert error.hint is not None
    assert "'o3-mini'" in error.hint
    assert "reasoning" in error.hint
    assert "o3-mini" in str(error)
    assert len(server.sent) == 1  # a 400 is not retried


def test_the_async_client_chats_and_responds() -> None:
    import asyncio

    async def run() -> tuple[str, str, str]:
        async with mock_client(Server("chat_logprobs.json"), cls=AsyncClient) as client:
            chat = await client.chat(HELLO, logprobs=True)
        async with mock_client(Server("responses_logprobs.json"), cls=AsyncClient) as client:
            response = await client.respond(HELLO)
        async with mock_client(Server("chat_stream.json"), cls=AsyncClient) as client:
            stream = client.chat_stream(HELLO)
            texts = [piece.text async for piece in stream]
        return chat.text, response.text, "".join(texts)

    assert asyncio.run(run()) == ("Hi 😀!", "Hi 😀!", "Hi 😀!")


def test_an_unknown_chat_field_is_a_type_error_with_a_suggestion() -> None:
    with mock_client(Server("chat_logprobs.json")) as client, pytest.raises(TypeError) as info:
        client.chat(HELLO, top_logprob=3)  # type: ignore[call-arg]
    assert "did you mean 'top_logprobs'" in str(info.value)


def test_below_cap_values_are_numbers_nowhere() -> None:
    _, tokens, alternatives = chat_frames(recorded("chat_logprobs.json"))
    for frame in (tokens, alternatives):
        assert frame["below_cap"].dtype == np.bool_
        assert frame.loc[frame["below_cap"], "prob"].isna().all()


KEY = "sk-test-0123456789abcdefSECRET"


def test_chat_goes_through_the_same_retries_auth_and_redaction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from nbcompletions import _retry

    delays: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        delays.append(seconds)

    monkeypatch.setattr(_retry, "sleep", fake_sleep)
    answers = [
        httpx.Response(503, json={"error": {"message": "busy", "type": "server_error"}}),
        httpx.Response(200, json=recorded("chat_logprobs.json")),
    ]
    seen: list[httpx.Request] = []

    def server(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers[len(seen) - 1]

    with mock_client(server, api_key=KEY) as client:
        assert client.chat(HELLO, logprobs=True).text == "Hi 😀!"
    assert len(seen) == 2
    assert len(delays) == 1
    assert seen[0].headers["authorization"] == f"Bearer {KEY}"

    def rejects(request: httpx.Request) -> httpx.Response:
        message = f"Incorrect API key provided: {KEY}"
        return httpx.Response(401, json={"error": {"message": message, "type": "auth"}})

    with mock_client(rejects, api_key=KEY) as client, pytest.raises(APIError) as info:
        client.chat(HELLO)
    assert KEY not in str(info.value)
    assert info.value.status == 401


def test_a_completion_answered_in_chats_shape_stays_a_completion() -> None:
    # A proxy that streams chat chunks for a completion request: the text merges, and the frames
    # are a completion's (no chat columns).
    with mock_client(Server("chat_stream.json")) as client:
        completion = client.complete("Say hi", stream=True)
    assert completion.text == "Hi 😀!"
    assert completion.api == "completions"
    assert "api" not in completion.tokens.columns


def test_a_clamped_minus_9999_logprob_gives_an_infinite_perplexity_without_a_warning() -> None:
    from nbcompletions import to_frames

    logprobs = {"tokens": ["a"], "token_logprobs": [-9999.0], "top_logprobs": [None]}
    choices, _, _ = to_frames({"choices": [{"index": 0, "text": "a", "logprobs": logprobs}]})
    assert choices.loc[0, "perplexity"] == math.inf
