"""vLLM's extras on our server: ``prompt_logprobs`` (under ``compat="vllm"``, completions and chat)
and ``POST /tokenize`` / ``/detokenize`` / ``/v1/chat/completions/render`` (every mode), through
the real app and embedded model.
Checked against the engine's own echo scoring and tokenizer, never hard-coded model output."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest

from nbcompletions.model import render_chat
from nbcompletions.model._gpt2 import forward_full, log_softmax
from nbcompletions.server import StreamingASGITransport, create_app

MODEL = "nbc-shakespeare"
PROMPT = "To be, or not to be"
MESSAGES = [{"role": "user", "content": "Who art thou?"}]


@pytest.fixture
async def vllm_http(embedded_engine: Any) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(embedded_engine, compat="vllm")
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as client:
        yield client


@pytest.fixture
async def http(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as client:
        yield client


async def _post(http: httpx.AsyncClient, path: str, **body: Any) -> dict[str, Any]:
    response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert isinstance(answer, dict)
    return answer


async def test_prompt_logprobs_have_vllms_shape_and_the_models_values(
    vllm_http: httpx.AsyncClient, embedded_engine: Any
) -> None:
    answer = await _post(
        vllm_http, "/v1/completions", model=MODEL, prompt=PROMPT, max_tokens=2, prompt_logprobs=3
    )
    (choice,) = answer["choices"]
    listed = choice["prompt_logprobs"]
    ids = embedded_engine.encode(PROMPT)
    assert len(listed) == len(ids)
    assert listed[0] is None
    logp = log_softmax(forward_full(embedded_engine.weights, np.array([ids]))[0])
    for position, entry in enumerate(listed[1:], start=1):
        token = ids[position]
        first_key = next(iter(entry))
        assert first_key == str(token)  # the prompt's own token comes first, as in vLLM
        own = entry[str(token)]
        assert set(own) == {"logprob", "rank", "decoded_token"}
        assert own["logprob"] == pytest.approx(float(logp[position - 1, token]), abs=1e-4)
        assert own["rank"] == int((logp[position - 1] >= logp[position - 1, token]).sum())
        assert own["decoded_token"] == embedded_engine.token_str(token)
        assert sorted(v["rank"] for v in entry.values())[:3] == [1, 2, 3]  # the top 3
        assert 3 <= len(entry) <= 4
    # The same numbers as the echo scoring of the prompt.
    echoed = await _post(
        vllm_http,
        "/v1/completions",
        model=MODEL,
        prompt=PROMPT,
        max_tokens=0,
        echo=True,
        logprobs=0,
    )
    echo_lp = echoed["choices"][0]["logprobs"]["token_logprobs"]
    assert [None, *(e[str(t)]["logprob"] for e, t in zip(listed[1:], ids[1:], strict=True))] == (
        echo_lp
    )


async def test_chat_prompt_logprobs_score_the_rendered_template(
    vllm_http: httpx.AsyncClient,
) -> None:
    chat = await _post(
        vllm_http,
        "/v1/chat/completions",
        model=MODEL,
        messages=MESSAGES,
        max_tokens=1,
        prompt_logprobs=0,
    )
    plain = await _post(
        vllm_http,
        "/v1/completions",
        model=MODEL,
        prompt=render_chat(MESSAGES),
        max_tokens=1,
        prompt_logprobs=0,
    )
    assert chat["prompt_logprobs"] == plain["choices"][0]["prompt_logprobs"]
    assert "prompt_logprobs" not in chat["choices"][0]
    assert all(len(entry) == 1 for entry in chat["prompt_logprobs"][1:])  # 0: the token alone


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"prompt_logprobs": 21}, "0 to 20"),
        ({"prompt_logprobs": -1}, "0 to 20"),
        ({"prompt_logprobs": "3"}, "got '3'"),
        ({"prompt_logprobs": 2, "stream": True}, "stream"),
    ],
)
async def test_bad_prompt_logprobs_are_400(
    vllm_http: httpx.AsyncClient, fields: dict[str, Any], words: str
) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1, **fields}
    response = await vllm_http.post("/v1/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "prompt_logprobs"
    assert words in error["message"]


async def test_openai_mode_refuses_prompt_logprobs(http: httpx.AsyncClient) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": PROMPT}),
        ("/v1/chat/completions", {"messages": MESSAGES}),
    ):
        response = await http.post(path, json={"model": MODEL, "prompt_logprobs": 1, **body})
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "prompt_logprobs"


async def test_tokenize_prompt_and_messages_like_vllm(
    http: httpx.AsyncClient, embedded_engine: Any
) -> None:
    answer = await _post(http, "/tokenize", model=MODEL, prompt=PROMPT)
    assert answer == {
        "count": len(embedded_engine.encode(PROMPT)),
        "max_model_len": embedded_engine.context_length,
        "tokens": embedded_engine.encode(PROMPT),
        "token_strs": None,
    }
    chat = await _post(http, "/tokenize", messages=MESSAGES, return_token_strs=True)
    assert chat["tokens"] == embedded_engine.encode(render_chat(MESSAGES))
    names = chat["token_strs"]
    assert names == [embedded_engine.tokenizer.id_to_token(t) for t in chat["tokens"]]
    bare = await _post(http, "/tokenize", messages=MESSAGES, add_generation_prompt=False)
    assert bare["tokens"] == embedded_engine.encode(render_chat(MESSAGES, False))
    reply = [*MESSAGES, {"role": "assistant", "content": " I am"}]
    open_turn = await _post(http, "/tokenize", messages=reply, continue_final_message=True)
    assert open_turn["tokens"] == embedded_engine.encode(
        render_chat(reply, False, continue_final_message=True)
    )
    back = await _post(http, "/detokenize", tokens=chat["tokens"])
    assert back == {"prompt": render_chat(MESSAGES)}


async def test_render_gives_the_chats_ids_like_vllm(
    http: httpx.AsyncClient, embedded_engine: Any
) -> None:
    render = "/v1/chat/completions/render"
    answer = await _post(http, render, model=MODEL, messages=MESSAGES)
    assert answer["token_ids"] == embedded_engine.encode(render_chat(MESSAGES))
    assert answer["request_id"].startswith("chatcmpl-")
    assert (answer["model"], answer["token_offsets"]) == (MODEL, None)
    reply = [*MESSAGES, {"role": "assistant", "content": "A poor player."}]
    closed = await _post(http, render, messages=reply, add_generation_prompt=False)
    assert closed["token_ids"] == embedded_engine.encode(render_chat(reply, False))
    # The same ids as /tokenize gives for the same chat.
    tokenized = await _post(http, "/tokenize", messages=reply, add_generation_prompt=False)
    assert closed["token_ids"] == tokenized["tokens"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions/render", {}, "messages"),
        ("/v1/chat/completions/render", {"messages": MESSAGES, "max_tokens": 3}, "max_tokens"),
        ("/v1/chat/completions/render", {"messages": "hi"}, "messages"),
        (
            "/v1/chat/completions/render",
            {"messages": MESSAGES, "return_token_offsets": "yes"},
            "return_token_offsets",
        ),
        ("/v1/chat/completions/render", {"messages": MESSAGES, "model": "gpt-4"}, "model"),
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": MESSAGES}, "prompt"),
        ("/tokenize", {"prompt": 3}, "prompt"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
        ("/tokenize", {"messages": [{"role": "x", "content": "a"}]}, "messages[0].role"),
        # An unhashable role (a list, a dict) is a 400 naming it, not a 500 (TypeError).
        (
            "/v1/chat/completions/render",
            {"messages": [{"role": ["user"], "content": "a"}]},
            "messages[0].role",
        ),
        ("/tokenize", {"messages": [{"role": {"r": 1}, "content": "a"}]}, "messages[0].role"),
        ("/tokenize", {"messages": MESSAGES, "return_token_strs": 1}, "return_token_strs"),
        ("/tokenize", {"prompt": "a", "model": "gpt-4"}, "model"),
        ("/tokenize", {"prompt": "a", "text": "b"}, "text"),
        ("/detokenize", {"tokens": [1, 99999]}, "tokens[1]"),
        ("/detokenize", {"tokens": "1"}, "tokens"),
    ],
)
async def test_bad_tokenize_bodies_are_4xx_naming_the_field(
    http: httpx.AsyncClient, path: str, body: dict[str, Any], param: str
) -> None:
    response = await http.post(path, json=body)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


async def test_tokenize_needs_the_key_when_one_is_set(embedded_engine: Any) -> None:
    app = create_app(embedded_engine, api_key="sk-test-key-123456")
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded"
    ) as client:
        response = await client.post("/tokenize", json={"prompt": "a"})
        assert response.status_code == 401
        render = {"messages": MESSAGES}
        response = await client.post("/v1/chat/completions/render", json=render)
        assert response.status_code == 401
