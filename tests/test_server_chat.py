"""POST /v1/chat/completions on our server, through the real app and the real embedded model.

A chat is the completion of its rendered chat template: every answer here is checked against the
same request made as a completion of ``render_chat(messages)`` (or a stream against the same
request unstreamed), never against hard-coded model text.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from nbcompletions.model import render_chat
from nbcompletions.server import StreamingASGITransport, create_app

MODEL = "nbc-shakespeare"
MESSAGES = [
    {"role": "system", "content": "Thou art a player."},
    {"role": "user", "content": "Who art thou?"},
]


@pytest.fixture
async def http(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as client:
        yield client


async def _chat(http: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await http.post(
        "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, **fields}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body, dict)
    return body


async def _events(http: httpx.AsyncClient, **fields: Any) -> list[dict[str, Any]]:
    body = {"model": MODEL, "messages": MESSAGES, "stream": True, **fields}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_chat_logprobs_equal_the_completion_logprobs_of_the_rendered_prompt(
    http: httpx.AsyncClient,
) -> None:
    chat = await _chat(http, logprobs=True, top_logprobs=5, max_tokens=8, temperature=0)
    response = await http.post(
        "/v1/completions",
        json={
            "model": MODEL,
            "prompt": render_chat(MESSAGES),
            "logprobs": 5,
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    (completion,) = response.json()["choices"]
    (choice,) = chat["choices"]
    assert choice["message"]["content"] == completion["text"]
    assert chat["usage"] == response.json()["usage"]
    expected = completion["logprobs"]
    entries = choice["logprobs"]["content"]
    tokens = [t for t in expected["tokens"] if t != "<|endoftext|>"]
    assert [e["token"] for e in entries] == tokens
    # The same numbers up to float32 noise: an engine's first requests can differ from later
    # identical ones by ~1e-6 (batch shapes change the BLAS path), seen when run after other tests.
    assert [e["logprob"] for e in entries] == pytest.approx(
        expected["token_logprobs"][: len(tokens)], abs=1e-5
    )
    for entry, top in zip(entries, expected["top_logprobs"], strict=False):
        # Exactly the five most likely (the completion adds the sampled token when not among them).
        assert len(entry["top_logprobs"]) == 5
        alternatives = {a["token"]: a["logprob"] for a in entry["top_logprobs"]}
        assert alternatives.keys() <= top.keys()
        assert alternatives == pytest.approx({t: top[t] for t in alternatives}, abs=1e-5)
        listed = [a["logprob"] for a in entry["top_logprobs"]]
        assert listed == sorted(listed, reverse=True)


async def test_the_response_has_openais_chat_shape(http: httpx.AsyncClient) -> None:
    chat = await _chat(http, logprobs=True, top_logprobs=2, max_completion_tokens=6, seed=3)
    assert chat["id"].startswith("chatcmpl-")
    assert chat["object"] == "chat.completion"
    assert chat["model"] == MODEL
    assert set(chat) == {
        "id",
        "object",
        "created",
        "model",
        "system_fingerprint",
        "choices",
        "usage",
    }
    (choice,) = chat["choices"]
    assert set(choice) == {"index", "message", "logprobs", "finish_reason"}
    assert choice["message"] == {
        "role": "assistant",
        "content": choice["message"]["content"],
        "refusal": None,
    }
    assert choice["logprobs"]["refusal"] is None
    content = choice["logprobs"]["content"]
    for entry in content:
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        for alternative in entry["top_logprobs"]:
            assert set(alternative) == {"token", "logprob", "bytes"}
    # The bytes spell the reply exactly, a character split over tokens included.
    spelled = b"".join(bytes(entry["bytes"]) for entry in content)
    assert spelled.decode("utf-8", errors="replace") == choice["message"]["content"]
    assert chat["usage"]["completion_tokens"] >= len(content)


async def test_without_logprobs_there_are_none(http: httpx.AsyncClient) -> None:
    chat = await _chat(http, max_tokens=3)
    assert chat["choices"][0]["logprobs"] is None
    chat = await _chat(http, max_tokens=3, top_logprobs=0)
    assert chat["choices"][0]["logprobs"] is None
    chat = await _chat(http, max_tokens=3, logprobs=True)  # top_logprobs unset: none listed
    assert all(e["top_logprobs"] == [] for e in chat["choices"][0]["logprobs"]["content"])


async def test_n_and_seed(http: httpx.AsyncClient) -> None:
    first = await _chat(http, n=3, seed=11, max_tokens=6, logprobs=True)
    again = await _chat(http, n=3, seed=11, max_tokens=6, logprobs=True)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    assert [c["message"] for c in first["choices"]] == [c["message"] for c in again["choices"]]
    assert [c["logprobs"] for c in first["choices"]] == [c["logprobs"] for c in again["choices"]]


async def test_a_stream_says_what_the_same_request_unstreamed_says(
    http: httpx.AsyncClient,
) -> None:
    fields: dict[str, Any] = {"n": 2, "seed": 5, "max_tokens": 7, "logprobs": True}
    fields["top_logprobs"] = 3
    whole = await _chat(http, **fields)
    events = await _events(http, stream_options={"include_usage": True}, **fields)
    assert {e["object"] for e in events} == {"chat.completion.chunk"}
    assert len({e["id"] for e in events}) == 1
    assert events[-1]["choices"] == []
    assert events[-1]["usage"] == whole["usage"]
    for choice in whole["choices"]:
        mine = [c for e in events[:-1] for c in e["choices"] if c["index"] == choice["index"]]
        assert mine[0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
        text = "".join(c["delta"].get("content", "") for c in mine)
        assert text == choice["message"]["content"]
        entries = [x for c in mine if c["logprobs"] for x in c["logprobs"]["content"]]
        assert entries == choice["logprobs"]["content"]
        assert [c["finish_reason"] for c in mine][-1] == choice["finish_reason"]
        assert all(c["finish_reason"] is None for c in mine[:-1])


async def test_unset_max_tokens_fills_the_context(http: httpx.AsyncClient, app: Any) -> None:
    engine = app.state.nbcompletions.load_engine_now()
    long = [{"role": "user", "content": "To be, or not to be. " * 25}]
    room = engine.context_length - len(engine.encode(render_chat(long)))
    assert 0 < room < 60
    response = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": long, "logit_bias": {str(engine.eot_token_id): -100}},
    )
    body = response.json()
    assert body["usage"]["completion_tokens"] == room
    assert body["choices"][0]["finish_reason"] == "length"
    response = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": long, "max_completion_tokens": room + 1},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "max_completion_tokens"
    assert f"at most {room}; got {room + 1}" in response.json()["error"]["message"]
    too_long = [{"role": "user", "content": "To be, or not to be. " * 60}]
    response = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": too_long})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "messages"


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"messages": None}, "messages", "non-empty list"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "robot"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "got 3"),
        ({"logprobs": 5}, "logprobs", "true or false"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "0 to 20"),
        ({"top_logprobs": 2}, "top_logprobs", "logprobs=true"),
        ({"max_completion_tokens": -1}, "max_completion_tokens", "got -1"),
        ({"max_tokens": 3, "max_completion_tokens": 4}, "max_tokens", "differ"),
        ({"temperature": 3}, "temperature", "0 to 2"),
        ({"n": 0}, "n", "got 0"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "stream=True"),
        ({"prompt": "x"}, "prompt", "Unrecognized"),
        ({"echo": True}, "echo", "Unrecognized"),
        ({"model": "gpt-4o"}, "model", "does not exist"),
    ],
)
async def test_bad_fields_are_400_naming_the_field(
    http: httpx.AsyncClient, fields: dict[str, Any], param: str, words: str
) -> None:
    body = {"model": MODEL, "messages": MESSAGES, **fields}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert words in error["message"]


async def test_chat_obeys_the_servers_max_tokens_cap(embedded_engine: Any) -> None:
    app = create_app(embedded_engine, max_tokens_cap=4)
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as http:
        capped = await _chat(http, logit_bias={str(embedded_engine.eot_token_id): -100})
        assert capped["usage"]["completion_tokens"] == 4
        response = await http.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "max_completion_tokens": 5},
        )
        assert response.status_code == 400
        assert response.json()["error"]["param"] == "max_completion_tokens"


async def test_vllm_mode_takes_its_sampling_fields_on_chat(embedded_engine: Any) -> None:
    app = create_app(embedded_engine, compat="vllm")
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as http:
        greedy = await _chat(http, top_k=1, max_tokens=5, seed=1)
        zero = await _chat(http, temperature=0, max_tokens=5)
        assert greedy["choices"][0]["message"] == zero["choices"][0]["message"]
        response = await http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "top_k": -2}
        )
        assert response.json()["error"]["param"] == "top_k"


async def test_the_openai_sdk_reads_chat_and_its_stream(app: Any) -> None:
    import openai

    sdk = openai.AsyncOpenAI(
        base_url="http://embedded/v1",
        api_key="unused",
        max_retries=0,
        # The SDK takes an httpx client at run time; its annotation names only its own types.
        http_client=httpx.AsyncClient(transport=StreamingASGITransport(app)),  # type: ignore[arg-type]
    )
    result = await sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]  # plain dicts, as users write them
        logprobs=True,
        top_logprobs=5,
        max_tokens=6,
        seed=2,
    )
    (choice,) = result.choices
    assert choice.message.role == "assistant"
    assert choice.logprobs is not None
    assert choice.logprobs.content is not None
    assert all(len(entry.top_logprobs) == 5 for entry in choice.logprobs.content)
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=MESSAGES,  # type: ignore[arg-type]
        logprobs=True,
        top_logprobs=5,
        max_tokens=6,
        seed=2,
        stream=True,
    )
    assert isinstance(stream, openai.AsyncStream)
    texts = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert "".join(texts) == choice.message.content
    await sdk.close()


# -- POST /v1/responses ---------------------------------------------------------------------------
async def test_responses_are_the_chat_in_the_responses_shape(http: httpx.AsyncClient) -> None:
    fields: dict[str, Any] = {"temperature": 0, "top_logprobs": 3}
    chat = await _chat(http, max_completion_tokens=6, logprobs=True, **fields)
    response = await http.post(
        "/v1/responses",
        json={
            "model": MODEL,
            "instructions": MESSAGES[0]["content"],
            "input": MESSAGES[1]["content"],
            "include": ["message.output_text.logprobs"],
            "max_output_tokens": 6,
            **fields,
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "response"
    assert body["id"].startswith("resp_")
    assert body["status"] == "incomplete"  # six tokens, cut by max_output_tokens
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    (message,) = body["output"]
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    (part,) = message["content"]
    assert part["type"] == "output_text"
    (choice,) = chat["choices"]
    assert part["text"] == choice["message"]["content"]
    assert part["logprobs"] == choice["logprobs"]["content"]
    assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]


async def test_responses_input_as_messages_with_parts(http: httpx.AsyncClient) -> None:
    parts = [{"type": "input_text", "text": "Who"}, {"type": "input_text", "text": "art thou?"}]
    as_parts = await http.post(
        "/v1/responses",
        json={
            "model": MODEL,
            "input": [
                {"type": "message", "role": "system", "content": "Thou art a player."},
                {"role": "user", "content": parts},
            ],
            "temperature": 0,
            "max_output_tokens": 4,
        },
    )
    joined = [MESSAGES[0], {"role": "user", "content": "Who\nart thou?"}]
    chat = await http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": joined, "temperature": 0, "max_tokens": 4},
    )
    part = as_parts.json()["output"][0]["content"][0]
    assert part["text"] == chat.json()["choices"][0]["message"]["content"]
    assert part["logprobs"] == []  # not included unless asked for


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
            "input[0].content[0]",
        ),
        ({"include": ["reasoning.encrypted_content"]}, "include"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"stream": 1}, "stream"),
        ({"temperature": -1}, "temperature"),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_responses_fields_are_400_naming_the_field(
    http: httpx.AsyncClient, fields: dict[str, Any], param: str
) -> None:
    response = await http.post("/v1/responses", json={"model": MODEL, "input": "x", **fields})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


# -- the Batch API takes chat lines ---------------------------------------------------------------
async def test_a_chat_batch_answers_as_the_chat_route_does(http: httpx.AsyncClient) -> None:
    fields: dict[str, Any] = {"max_tokens": 5, "logprobs": True, "top_logprobs": 2}
    bodies = [{"model": MODEL, "messages": MESSAGES, "seed": i, **fields} for i in range(3)]
    bodies.append({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]})
    content = "".join(
        json.dumps(
            {"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": b}
        )
        + "\n"
        for i, b in enumerate(bodies)
    )
    files = {"file": ("chat.jsonl", content.encode(), "application/jsonl")}
    uploaded = await http.post("/v1/files", files=files, data={"purpose": "batch"})
    assert uploaded.status_code == 200, uploaded.text
    created = await http.post(
        "/v1/batches",
        json={
            "input_file_id": uploaded.json()["id"],
            "endpoint": "/v1/chat/completions",
            "completion_window": "24h",
        },
    )
    assert created.status_code == 200, created.text
    batch = created.json()
    for _ in range(1200):
        batch = (await http.get(f"/v1/batches/{batch['id']}")).json()
        if batch["status"] in ("completed", "failed", "expired", "cancelled"):
            break
        await asyncio.sleep(0.05)
    assert batch["status"] == "completed", batch
    assert batch["request_counts"] == {"total": 4, "completed": 3, "failed": 1}
    output = await http.get(f"/v1/files/{batch['output_file_id']}/content")
    lines = {line["custom_id"]: line for line in map(json.loads, output.text.splitlines())}
    for i in range(3):
        body = lines[f"c{i}"]["response"]["body"]
        live = await _chat(http, seed=i, **fields)
        assert body["object"] == "chat.completion"
        assert body["choices"] == live["choices"]
    errors = await http.get(f"/v1/files/{batch['error_file_id']}/content")
    (failed,) = map(json.loads, errors.text.splitlines())
    assert failed["custom_id"] == "c3"
    assert failed["response"]["status_code"] == 400
    assert failed["response"]["body"]["error"]["param"] == "messages[0].role"


async def test_a_streamed_response_says_what_the_response_says(http: httpx.AsyncClient) -> None:
    body = {
        "model": MODEL,
        "input": "Who art thou?",
        "include": ["message.output_text.logprobs"],
        "top_logprobs": 2,
        "max_output_tokens": 6,
        "temperature": 0,
    }
    whole = (await http.post("/v1/responses", json=body)).json()
    response = await http.post("/v1/responses", json={**body, "stream": True})
    # OpenAI's framing: each event named, no [DONE] after the last.
    blocks = [block.splitlines() for block in response.text.split("\n\n") if block]
    assert all(len(block) == 2 for block in blocks)
    events = [json.loads(data[len("data: ") :]) for _, data in blocks]
    kinds = [event["type"] for event in events]
    assert [name[len("event: ") :] for name, _ in blocks] == kinds
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.incomplete",  # cut at max_output_tokens
    ]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    deltas = [event for event in events if event["type"] == "response.output_text.delta"]
    (part,) = whole["output"][0]["content"]
    assert "".join(delta["delta"] for delta in deltas) == part["text"]
    assert [e for delta in deltas for e in delta["logprobs"]] == part["logprobs"]
    final = events[-1]["response"]
    assert final["output"][0]["content"] == whole["output"][0]["content"]
    assert final["usage"] == whole["usage"]
    assert final["id"] == events[0]["response"]["id"]
