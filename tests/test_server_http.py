"""The server's HTTP layer, in-process through `httpx.ASGITransport`, with raw HTTP.

Most tests here exercise mechanics the model cannot provoke on demand (an engine that fails
mid-stream, returns -inf, or is held inside a request): they use `_ScriptedEngine`, a stand-in whose
behaviour each test sets. Tests of what the real model answers use the `embedded_engine` fixture.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, MutableMapping
from typing import Any

import anyio
import anyio.to_thread
import httpx
import pytest

from nbcompletions import CompletionRequest, RequestError
from nbcompletions.server import CompletionEngine, create_app, render_json

MODEL = "scripted"
#: Guards the safety waits below, so a broken server fails the test instead of hanging it.
HANG_GUARD_S = 60


def _strict_json(text: str | bytes) -> Any:
    """json.loads that refuses NaN/Infinity, as every non-Python JSON parser does."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} in JSON")

    return json.loads(text, parse_constant=refuse)


class _ScriptedEngine:
    """An engine whose answers each test scripts; records every request it is given."""

    model_id = MODEL

    def __init__(self) -> None:
        self.requests: list[CompletionRequest] = []
        self.logprob = -0.5
        self.fail_with: Exception | None = None
        self.stream_texts = ["To", " be", ","]
        self.stream_fail_after: int | None = None
        self.stream_closed = threading.Event()
        self.endless = False
        self.streams: list[Iterator[dict[str, Any]]] = []

    def complete(self, request: CompletionRequest) -> dict[str, Any]:
        self.requests.append(request)
        if self.fail_with is not None:
            raise self.fail_with
        return {
            "id": "cmpl-scripted",
            "object": "text_completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {
                    "text": " or",
                    "index": 0,
                    "finish_reason": "length",
                    "logprobs": {
                        "tokens": [" or"],
                        "token_logprobs": [self.logprob],
                        "top_logprobs": [{" or": self.logprob}],
                        "text_offset": [5],
                    },
                }
            ],
            "usage": {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3},
        }

    def stream(self, request: CompletionRequest) -> Iterator[dict[str, Any]]:
        self.requests.append(request)
        chunks = self._chunks()
        # Kept alive here so that only an explicit close() (not garbage collection) ends it.
        self.streams.append(chunks)
        return chunks

    def _chunks(self) -> Iterator[dict[str, Any]]:
        try:
            if self.fail_with is not None:
                raise self.fail_with
            index = 0
            while True:
                if self.stream_fail_after is not None and index == self.stream_fail_after:
                    raise RuntimeError("the engine broke mid-stream")
                if not self.endless and index == len(self.stream_texts):
                    return
                text = self.stream_texts[index % len(self.stream_texts)]
                yield {
                    "id": "cmpl-scripted",
                    "object": "text_completion",
                    "created": 1,
                    "model": MODEL,
                    "choices": [
                        {"text": text, "index": 0, "logprobs": None, "finish_reason": None}
                    ],
                }
                index += 1
        finally:
            self.stream_closed.set()


@pytest.fixture
def engine() -> _ScriptedEngine:
    return _ScriptedEngine()


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://embedded")


async def _post(app: Any, body: Any = None, **kwargs: Any) -> httpx.Response:
    async with _client(app) as client:
        if body is not None:
            kwargs["json"] = body
        if "content" in kwargs:  # raw bytes: declared JSON, as every real client does
            kwargs.setdefault("headers", {"content-type": "application/json"})
        return await client.post("/v1/completions", **kwargs)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = _strict_json(response.content)
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


# -- models and health ----------------------------------------------------------------------------
async def test_models_lists_the_engine_in_openai_list_shape(engine: _ScriptedEngine) -> None:
    async with _client(create_app(engine)) as client:
        listing = await client.get("/v1/models")
        one = await client.get(f"/v1/models/{MODEL}")
        missing = await client.get("/v1/models/gpt-4")
    assert listing.status_code == 200
    body = listing.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL]
    card = body["data"][0]
    # OpenAI's four fields, plus (when the engine knows them) the context length under vLLM's
    # name and the vocabulary size.
    assert set(card) - {"max_model_len", "vocab_size"} == {"id", "object", "created", "owned_by"}
    assert card["object"] == "model"
    assert isinstance(card["created"], int)
    assert one.json() == card
    assert missing.status_code == 404
    assert _error(missing)["code"] == "model_not_found"


async def test_health_answers_without_loading_the_model() -> None:
    # No engine given: the app would load the embedded model on first use; /health must not.
    app = create_app()
    async with _client(app) as client:
        response = await client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "engine_loaded": False}
    assert app.state.nbcompletions.engine_loaded is False


async def test_unknown_route_and_wrong_method_answer_with_openai_error_bodies(
    engine: _ScriptedEngine,
) -> None:
    async with _client(create_app(engine)) as client:
        missing = await client.get("/v1/chat/nothing")
        wrong_method = await client.get("/v1/completions")
    assert missing.status_code == 404
    assert "/v1/chat/nothing" in _error(missing)["message"]
    assert wrong_method.status_code == 405
    assert _error(wrong_method)["type"] == "invalid_request_error"


# -- request validation ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw",
    [
        b"{bad json",
        b"",
        b'{"model": "scripted", "prompt": "x",}',
        b'{"model": "scripted", "prompt": "x", "temperature": NaN}',
        b'{"model": "scripted", "prompt": "x", "top_p": Infinity}',
        b"\xff\xfe\x00garbage",
    ],
)
async def test_malformed_json_is_400_with_param_null(engine: _ScriptedEngine, raw: bytes) -> None:
    response = await _post(
        create_app(engine), content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] is None
    assert error["type"] == "invalid_request_error"
    assert "JSON" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize(
    ("body", "kind"), [([1, 2], "array"), ("prompt", "string"), (3, "number"), (None, "null")]
)
async def test_a_body_that_is_not_an_object_is_400(
    engine: _ScriptedEngine, body: Any, kind: str
) -> None:
    response = await _post(create_app(engine), content=json.dumps(body).encode())
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] is None
    assert f"JSON {kind}" in error["message"]


@pytest.mark.parametrize(
    ("fields", "param", "given"),
    [
        ({"temperature": 2.5}, "temperature", "2.5"),
        ({"top_p": -0.1}, "top_p", "-0.1"),
        ({"logprobs": 6}, "logprobs", "6"),
        ({"n": 0}, "n", "0"),
        ({"n": 3, "best_of": 2}, "best_of", "2"),
        ({"best_of": 2, "stream": True}, "best_of", "2"),
        ({"max_tokens": -1}, "max_tokens", "-1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "'e'"),
        ({"frequency_penalty": 3}, "frequency_penalty", "3"),
        ({"logit_bias": {"12": 101}}, "logit_bias", "101"),
        ({"stream_options": {"include_usage": True}}, "stream_options", "include_usage"),
        ({"prompt": []}, "prompt", "[]"),
        ({"echo": "yes"}, "echo", "'yes'"),
    ],
)
async def test_invalid_fields_are_400_naming_the_field_and_the_value(
    engine: _ScriptedEngine, fields: dict[str, Any], param: str, given: str
) -> None:
    body = {"model": MODEL, "prompt": "To be", **fields}
    response = await _post(create_app(engine), body)
    assert response.status_code == 400
    error = _error(response)
    assert error == {
        "message": error["message"],
        "type": "invalid_request_error",
        "param": param,
        "code": None,
    }
    assert given in error["message"]
    assert engine.requests == []


async def test_missing_model_is_400_param_model(engine: _ScriptedEngine) -> None:
    response = await _post(create_app(engine), {"prompt": "To be"})
    assert response.status_code == 400
    assert _error(response)["param"] == "model"


async def test_unknown_field_is_400_naming_it(engine: _ScriptedEngine) -> None:
    response = await _post(create_app(engine), {"model": MODEL, "prompt": "x", "temprature": 0})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "temprature"
    assert "temprature" in error["message"]


async def test_unknown_model_is_404_model_not_found(engine: _ScriptedEngine) -> None:
    response = await _post(create_app(engine), {"model": "gpt-3.5-turbo-instruct", "prompt": "x"})
    assert response.status_code == 404
    error = _error(response)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "gpt-3.5-turbo-instruct" in error["message"]


async def test_engine_request_errors_are_400_with_the_engines_param(
    engine: _ScriptedEngine,
) -> None:
    engine.fail_with = RequestError("suffix", "suffix is not supported by this model; got 'x'")
    response = await _post(create_app(engine), {"model": MODEL, "prompt": "a", "suffix": "x"})
    assert response.status_code == 400
    assert _error(response)["param"] == "suffix"


async def test_stream_validation_errors_from_the_engine_are_400_not_a_stream(
    engine: _ScriptedEngine,
) -> None:
    engine.fail_with = RequestError("max_tokens", "max_tokens too large for the context; got 9999")
    response = await _post(
        create_app(engine), {"model": MODEL, "prompt": "a", "stream": True, "max_tokens": 9999}
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == "application/json"
    assert _error(response)["param"] == "max_tokens"
    assert engine.stream_closed.is_set()


# -- limits ---------------------------------------------------------------------------------------
async def test_body_over_the_limit_is_413(engine: _ScriptedEngine) -> None:
    app = create_app(engine, max_body_bytes=200)
    response = await _post(app, {"model": MODEL, "prompt": "x" * 300})
    assert response.status_code == 413
    error = _error(response)
    assert "200" in error["message"]
    assert engine.requests == []
    small = await _post(app, {"model": MODEL, "prompt": "x" * 50})
    assert small.status_code == 200


async def test_chunked_body_over_the_limit_is_413_without_content_length(
    engine: _ScriptedEngine,
) -> None:
    async def chunks() -> Any:
        for _ in range(10):
            yield b" " * 100  # JSON whitespace: the body is valid, only too large

    response = await _post(create_app(engine, max_body_bytes=500), content=chunks())
    assert response.status_code == 413
    assert engine.requests == []


async def test_max_tokens_above_the_cap_is_400(engine: _ScriptedEngine) -> None:
    app = create_app(engine, max_tokens_cap=8)
    over = await _post(app, {"model": MODEL, "prompt": "x", "max_tokens": 9})
    assert over.status_code == 400
    error = _error(over)
    assert error["param"] == "max_tokens"
    assert "8" in error["message"]
    assert "9" in error["message"]
    at_cap = await _post(app, {"model": MODEL, "prompt": "x", "max_tokens": 8})
    assert at_cap.status_code == 200
    # Unset max_tokens means OpenAI's 16, more than this cap allows: the cap applies instead.
    unset = await _post(app, {"model": MODEL, "prompt": "x"})
    assert unset.status_code == 200
    assert [r.max_tokens for r in engine.requests] == [8, 8]


# -- authentication -------------------------------------------------------------------------------
async def test_bearer_key_is_required_and_never_echoed(engine: _ScriptedEngine) -> None:
    key, wrong = "sk-right-key-123", "sk-wrong-key-456"
    app = create_app(engine, api_key=key)
    body = {"model": MODEL, "prompt": "x"}
    async with _client(app) as client:
        missing = await client.post("/v1/completions", json=body)
        bad = await client.post(
            "/v1/completions", json=body, headers={"authorization": f"Bearer {wrong}"}
        )
        models = await client.get("/v1/models", headers={"authorization": f"Bearer {wrong}"})
        basic = await client.get("/v1/models", headers={"authorization": f"Basic {key}"})
        good = await client.post(
            "/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}
        )
        health = await client.get("/health")
    for response in (missing, bad, models, basic):
        assert response.status_code == 401
        assert _error(response)["code"] == "invalid_api_key"
        assert key not in response.text
        assert wrong not in response.text
        assert response.headers["www-authenticate"] == "Bearer"
    assert good.status_code == 200
    assert health.status_code == 200
    assert len(engine.requests) == 1
    assert key not in repr(app.state.nbcompletions)


def test_create_app_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_tokens_cap must be an integer >= 1"):
        create_app(max_tokens_cap=0)
    with pytest.raises(ValueError, match="max_body_bytes"):
        create_app(max_body_bytes=-5)
    with pytest.raises(ValueError, match="api_key"):
        create_app(api_key="")


# -- failures and JSON ----------------------------------------------------------------------------
async def test_unexpected_errors_are_500_json_and_logged_without_the_key(
    engine: _ScriptedEngine, caplog: pytest.LogCaptureFixture
) -> None:
    key = "sk-secret-in-header"
    engine.fail_with = KeyError("an engine bug")
    with caplog.at_level(logging.ERROR, logger="nbcompletions.server"):
        response = await _post(
            create_app(engine, api_key=key),
            {"model": MODEL, "prompt": "x"},
            headers={"authorization": f"Bearer {key}"},
        )
    assert response.status_code == 500
    error = _error(response)
    assert error["type"] == "server_error"
    assert response.headers["x-request-id"] in error["message"]
    assert "an engine bug" in caplog.text  # the traceback reached the log ...
    assert key not in caplog.text  # ... and the key did not


async def test_non_finite_logprobs_never_reach_the_json(engine: _ScriptedEngine) -> None:
    engine.logprob = float("-inf")
    response = await _post(create_app(engine), {"model": MODEL, "prompt": "x", "logprobs": 1})
    assert response.status_code == 200
    assert b"Infinity" not in response.content
    body = _strict_json(response.content)
    assert body["choices"][0]["logprobs"]["token_logprobs"] == [-9999.0]
    assert body["choices"][0]["logprobs"]["top_logprobs"] == [{" or": -9999.0}]


def test_render_json_replaces_every_non_finite_number() -> None:
    value = {"a": [float("nan"), float("inf"), -float("inf"), 1.5], "b": {"c": float("nan")}}
    assert _strict_json(render_json(value)) == {"a": [None, 9999.0, -9999.0, 1.5], "b": {"c": None}}
    assert render_json({"text": "caf\u00e9 \ud83d\ude00"}).isascii()


# -- streaming ------------------------------------------------------------------------------------
async def test_stream_is_sse_with_exact_framing(engine: _ScriptedEngine) -> None:
    response = await _post(create_app(engine), {"model": MODEL, "prompt": "x", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    events = response.text.split("\n\n")
    assert events[-1] == ""  # the body ends with a blank line after the last event
    assert events[-2] == "data: [DONE]"
    chunks = events[:-2]
    assert all(event.startswith("data: {") and "\n" not in event for event in chunks)
    texts = [_strict_json(event[len("data: ") :])["choices"][0]["text"] for event in chunks]
    assert texts == engine.stream_texts
    assert engine.stream_closed.is_set()


async def test_an_error_mid_stream_is_an_error_event_then_done(engine: _ScriptedEngine) -> None:
    engine.stream_fail_after = 2
    response = await _post(create_app(engine), {"model": MODEL, "prompt": "x", "stream": True})
    assert response.status_code == 200
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    payloads = [_strict_json(event[len("data: ") :]) for event in events[:-2]]
    assert [p["choices"][0]["text"] for p in payloads[:2]] == engine.stream_texts[:2]
    assert set(payloads[2]) == {"error"}
    assert payloads[2]["error"]["type"] == "server_error"
    assert len(payloads) == 3


async def test_the_openai_sdk_raises_on_an_error_event_mid_stream(engine: _ScriptedEngine) -> None:
    import openai

    engine.stream_fail_after = 2
    http_client = _client(create_app(engine))
    sdk = openai.AsyncOpenAI(
        base_url="http://embedded/v1",
        api_key="unused",
        max_retries=0,
        # The SDK takes an httpx (not httpx2) client at run time; its annotation names only httpx2.
        http_client=http_client,  # type: ignore[arg-type]
    )
    texts: list[str] = []

    async def read_all() -> None:
        stream = await sdk.completions.create(model=MODEL, prompt="x", stream=True)
        async for chunk in stream:
            texts.append(chunk.choices[0].text)

    with pytest.raises(openai.APIError) as info:
        await read_all()
    assert texts == engine.stream_texts[:2]
    assert info.value.type == "server_error"
    await sdk.close()


async def test_client_disconnect_mid_stream_closes_the_engine_generator(
    engine: _ScriptedEngine,
) -> None:
    """Raw ASGI: the client goes away after the first event of an endless stream."""
    engine.endless = True
    app = create_app(engine)
    first_event_sent = anyio.Event()
    sent: list[MutableMapping[str, Any]] = []
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await first_event_sent.wait()
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_event_sent.set()

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("embedded", 80),
    }
    with anyio.fail_after(HANG_GUARD_S):  # an endless stream that ignored the disconnect would hang
        await app(scope, receive, send)
    assert sent[0]["status"] == 200
    assert engine.stream_closed.is_set()


async def test_a_send_that_fails_mid_stream_ends_it_quietly(engine: _ScriptedEngine) -> None:
    """Servers on ASGI spec 2.4 raise OSError from send() once the client has gone."""
    engine.endless = True
    body = json.dumps({"model": MODEL, "prompt": "x", "stream": True}).encode()
    messages = [{"type": "http.request", "body": body, "more_body": False}]
    sent = 0

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await anyio.sleep_forever()
        raise AssertionError("unreachable")

    async def send(message: MutableMapping[str, Any]) -> None:
        nonlocal sent
        sent += 1
        if sent == 3:
            raise OSError("connection reset")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("embedded", 80),
    }
    with anyio.fail_after(HANG_GUARD_S):
        await create_app(engine)(scope, receive, send)
    assert sent == 3
    assert engine.stream_closed.is_set()


# -- concurrency ----------------------------------------------------------------------------------
class _HeldEngine:
    """Wraps an engine; a request with ``user="hold"`` waits inside the engine until released."""

    def __init__(self, inner: CompletionEngine) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.entered = threading.Event()
        self.release = threading.Event()

    def complete(self, request: CompletionRequest) -> dict[str, Any]:
        if request.user == "hold":
            self.entered.set()
            if not self.release.wait(HANG_GUARD_S):
                raise RuntimeError("never released: the event loop was blocked")
        return self.inner.complete(request)

    def stream(self, request: CompletionRequest) -> Iterator[dict[str, Any]]:
        return self.inner.stream(request)


async def _requests_complete_while_one_is_held(inner: Any, fast_body: dict[str, Any]) -> None:
    held = _HeldEngine(inner)
    app = create_app(held, max_concurrency=2)
    async with _client(app) as client, anyio.create_task_group() as group:
        slow: dict[str, httpx.Response] = {}

        async def run_slow() -> None:
            slow["response"] = await client.post(
                "/v1/completions", json={**fast_body, "user": "hold"}
            )

        group.start_soon(run_slow)
        assert await anyio.to_thread.run_sync(held.entered.wait, HANG_GUARD_S)
        # The held request occupies a worker thread; the loop must still serve everything else.
        fast = [await client.post("/v1/completions", json=fast_body) for _ in range(3)]
        streamed = await client.post("/v1/completions", json={**fast_body, "stream": True})
        models = await client.get("/v1/models")
        assert "response" not in slow
        held.release.set()
    assert [r.status_code for r in fast] == [200, 200, 200]
    assert streamed.text.endswith("data: [DONE]\n\n")
    assert models.status_code == 200
    assert slow["response"].status_code == 200


async def test_requests_complete_while_one_is_held_in_the_engine(engine: _ScriptedEngine) -> None:
    await _requests_complete_while_one_is_held(engine, {"model": MODEL, "prompt": "x"})


# -- the real embedded engine ---------------------------------------------------------------------
async def test_real_engine_requests_complete_while_one_is_held(embedded_engine: Any) -> None:
    await _requests_complete_while_one_is_held(
        embedded_engine, {"model": embedded_engine.model_id, "prompt": "To be", "max_tokens": 3}
    )


async def test_real_engine_lone_surrogate_prompt_is_400_param_prompt(embedded_engine: Any) -> None:
    # "\ud800" is valid JSON for a lone surrogate, which no tokenizer can encode.
    raw = b'{"model": "%s", "prompt": "To \\ud800be", "max_tokens": 2}' % (
        embedded_engine.model_id.encode()
    )
    response = await _post(
        create_app(embedded_engine), content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "prompt"
    assert "surrogate" in error["message"]


async def test_real_engine_json_completion(embedded_engine: Any) -> None:
    body = {
        "model": embedded_engine.model_id,
        "prompt": ["To be", "My lord"],
        "max_tokens": 4,
        "n": 2,
        "logprobs": 2,
        "temperature": 0,
    }
    response = await _post(create_app(embedded_engine), body)
    assert response.status_code == 200
    result = _strict_json(response.content)
    assert result["object"] == "text_completion"
    assert result["model"] == embedded_engine.model_id
    assert [c["index"] for c in result["choices"]] == [0, 1, 2, 3]
    # Greedy: both choices of one prompt agree.
    assert result["choices"][0]["text"] == result["choices"][1]["text"]
    assert result["usage"]["total_tokens"] == (
        result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"]
    )


async def test_real_engine_stream_framing_with_usage(embedded_engine: Any) -> None:
    model = embedded_engine.model_id
    app = create_app(embedded_engine)
    plain = _strict_json(
        (
            await _post(app, {"model": model, "prompt": "To be", "max_tokens": 6, "temperature": 0})
        ).content
    )
    response = await _post(
        app,
        {
            "model": model,
            "prompt": "To be",
            "max_tokens": 6,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = response.text.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [_strict_json(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: ") for event in events[:-2])
    *deltas, last = chunks
    assert last["choices"] == []
    assert last["usage"] == plain["usage"]
    assert all(chunk["usage"] is None for chunk in deltas)
    assert (
        "".join(c["text"] for chunk in deltas for c in chunk["choices"])
        == plain["choices"][0]["text"]
    )
    finishes = [c["finish_reason"] for chunk in deltas for c in chunk["choices"]]
    assert finishes[-1] == plain["choices"][0]["finish_reason"]
    assert all(f is None for f in finishes[:-1])


async def test_a_model_that_fails_to_load_is_a_500_naming_the_cause(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import nbcompletions.model

    def missing(path: Any = None) -> Any:
        raise FileNotFoundError("model files missing in /nowhere: model.safetensors")

    monkeypatch.setattr(nbcompletions.model, "load_engine", missing)
    response = await _post(create_app(), {"model": "nbc-shakespeare", "prompt": "x"})
    assert response.status_code == 500
    error = _error(response)
    assert error["type"] == "server_error"
    assert "model files missing in /nowhere" in error["message"]


async def test_real_engine_loads_lazily_on_first_request(embedded_engine: Any) -> None:
    app = create_app()  # no engine: the embedded model, loaded on demand
    async with _client(app) as client:
        before = (await client.get("/health")).json()
        listing = (await client.get("/v1/models")).json()
        after = (await client.get("/health")).json()
    assert before["engine_loaded"] is False
    assert after["engine_loaded"] is True
    assert [m["id"] for m in listing["data"]] == [embedded_engine.model_id]


# -- safe by default (issue 9) ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonx",
    ],
)
async def test_a_post_that_is_not_declared_json_is_415(
    engine: _ScriptedEngine, content_type: str | None
) -> None:
    # A web page may send these cross-origin without a CORS preflight; JSON needs one.
    headers = {} if content_type is None else {"content-type": content_type}
    raw = json.dumps({"model": MODEL, "prompt": "x"}).encode()
    response = await _post(create_app(engine), content=raw, headers=headers)
    assert response.status_code == 415
    error = _error(response)
    assert error["code"] == "unsupported_media_type"
    assert "application/json" in error["message"]
    assert engine.requests == []


@pytest.mark.parametrize(
    "content_type", ["application/json", "application/json; charset=utf-8", "Application/JSON"]
)
async def test_json_content_types_are_accepted(engine: _ScriptedEngine, content_type: str) -> None:
    raw = json.dumps({"model": MODEL, "prompt": "x"}).encode()
    response = await _post(create_app(engine), content=raw, headers={"content-type": content_type})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost:8000", True),
        ("127.0.0.1:8000", True),
        ("127.0.0.1", True),
        ("[::1]:8000", True),
        ("LOCALHOST", True),
        ("evil.example:8000", False),
        ("attacker.example", False),
        ("192.168.1.5:8000", False),
        ("localhost.evil.example", False),
    ],
)
async def test_a_loopback_server_answers_only_loopback_hosts(
    engine: _ScriptedEngine, host: str, allowed: bool
) -> None:
    # DNS rebinding: the page's own name, re-pointed at 127.0.0.1, arrives in the Host header.
    app = create_app(engine, allowed_hosts=())
    async with _client(app) as client:
        headers = {"host": host}
        responses = [
            await client.post(
                "/v1/completions", json={"model": MODEL, "prompt": "x"}, headers=headers
            ),
            await client.get("/v1/models", headers=headers),
            await client.get("/health", headers=headers),
        ]
    for response in responses:
        if allowed:
            assert response.status_code == 200
        else:
            assert response.status_code == 403
            error = _error(response)
            assert error["code"] == "host_not_allowed"
            assert "--allow-host" in error["message"]
    assert len(engine.requests) == (1 if allowed else 0)


async def test_allowed_hosts_adds_names_and_star_allows_any(engine: _ScriptedEngine) -> None:
    body = {"model": MODEL, "prompt": "x"}
    async with _client(create_app(engine, allowed_hosts=["my.box"])) as client:
        mine = await client.post("/v1/completions", json=body, headers={"host": "my.box:8000"})
        other = await client.post("/v1/completions", json=body, headers={"host": "other.box"})
    async with _client(create_app(engine, allowed_hosts=["*"])) as client:
        anything = await client.post("/v1/completions", json=body, headers={"host": "x.example"})
    assert (mine.status_code, other.status_code, anything.status_code) == (200, 403, 200)


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        ("http://localhost:8888", True),
        ("http://127.0.0.1:3000", True),
        ("https://[::1]", True),
        ("http://evil.example", False),
        ("https://notebooks.example.org", False),
        ("null", False),
        ("http://localhost.evil.example", False),
    ],
)
async def test_requests_from_foreign_web_origins_are_403(
    engine: _ScriptedEngine, origin: str, allowed: bool
) -> None:
    response = await _post(
        create_app(engine), {"model": MODEL, "prompt": "x"}, headers={"origin": origin}
    )
    assert response.status_code == (200 if allowed else 403)
    if not allowed:
        assert _error(response)["code"] == "origin_not_allowed"
        assert engine.requests == []


async def test_allowed_origins_are_accepted(engine: _ScriptedEngine) -> None:
    app = create_app(engine, allowed_origins=["https://Lab.Example.org/"])
    ok = await _post(
        app, {"model": MODEL, "prompt": "x"}, headers={"origin": "https://lab.example.org"}
    )
    other = await _post(app, {"model": MODEL, "prompt": "x"}, headers={"origin": "https://x.org"})
    assert (ok.status_code, other.status_code) == (200, 403)


async def test_a_trailing_slash_is_not_redirected_before_the_key_check(
    engine: _ScriptedEngine,
) -> None:
    body = {"model": MODEL, "prompt": "x"}
    async with _client(create_app(engine, api_key="sk-k")) as client:
        anonymous = await client.post("/v1/completions/", json=body)
        keyed = await client.post(
            "/v1/completions/", json=body, headers={"authorization": "Bearer sk-k"}
        )
    async with _client(create_app(engine)) as client:
        keyless = await client.post("/v1/completions/", json=body)
    assert anonymous.status_code == 401
    assert keyed.status_code == 404
    assert keyless.status_code == 404
    assert "location" not in keyless.headers
    assert engine.requests == []


async def test_a_body_that_stalls_is_408_within_the_body_timeout(engine: _ScriptedEngine) -> None:
    release = anyio.Event()

    async def half_then_stall() -> Any:
        yield b'{"model": "scripted", '
        await release.wait()  # never set: the client stalls
        yield b'"prompt": "x"}'

    app = create_app(engine, body_timeout_s=0.2)
    with anyio.fail_after(HANG_GUARD_S):
        response = await _post(app, content=half_then_stall())
    assert response.status_code == 408
    error = _error(response)
    assert error["code"] == "request_timeout"
    assert "0.2 seconds" in error["message"]
    assert response.headers["connection"] == "close"
    assert engine.requests == []


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": ["x" * 600_000, 3]},
        {"prompt": "x", "stop": ["y" * 150_000] * 5},
        {"prompt": "x", "model": "m" * 600_000},
        {"prompt": "x", "z" * 600_000: 1},
        {"prompt": "x", "logit_bias": {"q" * 600_000: 1}},
    ],
)
async def test_a_huge_invalid_value_is_not_echoed_back(
    engine: _ScriptedEngine, fields: dict[str, Any]
) -> None:
    # Before: a 600 KB prompt of the wrong shape came back as a 600 KB error message.
    response = await _post(create_app(engine), {"model": MODEL, **fields})
    assert response.status_code in (400, 404)
    assert len(response.content) < 5_000
    assert _error(response)["message"]


async def test_a_huge_engine_error_message_is_shortened(engine: _ScriptedEngine) -> None:
    engine.fail_with = RequestError("suffix", "suffix is not supported; got " + "s" * 600_000)
    response = await _post(create_app(engine), {"model": MODEL, "prompt": "x", "suffix": "s"})
    assert response.status_code == 400
    assert len(response.content) < 5_000


def test_create_app_refuses_a_key_that_http_cannot_carry() -> None:
    with pytest.raises(ValueError, match="printable ASCII") as info:
        create_app(api_key="sk-caf\u00e9-secret")
    assert "secret" not in str(info.value)
    with pytest.raises(ValueError, match="compat must be one of openai, vllm; got 'tgi'"):
        create_app(compat="tgi")
    with pytest.raises(ValueError, match="body_timeout_s"):
        create_app(body_timeout_s=0)


# -- input edge cases and vLLM compatibility (issue 9) ---------------------------------------------
async def test_an_empty_stop_list_reaches_the_engine_as_no_stop(engine: _ScriptedEngine) -> None:
    response = await _post(create_app(engine), {"model": MODEL, "prompt": "x", "stop": []})
    assert response.status_code == 200
    assert engine.requests[0].stop == []


async def test_openai_mode_refuses_vllm_fields_and_vllm_mode_checks_them(
    engine: _ScriptedEngine,
) -> None:
    base = {"model": MODEL, "prompt": "x"}
    openai_app, vllm_app = create_app(engine), create_app(engine, compat="vllm")
    refused = await _post(openai_app, {**base, "top_k": 5})
    five_stops = await _post(openai_app, {**base, "stop": list("abcde")})
    assert (refused.status_code, _error(refused)["param"]) == (400, "top_k")
    assert (five_stops.status_code, _error(five_stops)["param"]) == (400, "stop")
    fields = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "stop": list("abcdefg")}
    accepted = await _post(vllm_app, {**base, **fields, "logprobs": 20})
    assert accepted.status_code == 200
    assert engine.requests[-1].extra == {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2}
    assert engine.requests[-1].stop == list("abcdefg")
    for field, value in [("top_k", -2), ("min_p", 2), ("repetition_penalty", 0)]:
        bad = await _post(vllm_app, {**base, field: value})
        assert bad.status_code == 400
        assert _error(bad)["param"] == field
    unknown = await _post(vllm_app, {**base, "use_beam_search": True})
    assert (unknown.status_code, _error(unknown)["param"]) == (400, "use_beam_search")


@pytest.mark.parametrize("key", ["\u00b2", "\u0663", "\uff10", "1\u00b9"])
async def test_real_engine_logit_bias_keys_with_unicode_digits_are_400(
    embedded_engine: Any, key: str
) -> None:
    # Before: "²" passed str.isdigit() and int() raised inside the engine (500); "٣" and "０"
    # were silently read as token ids 3 and 0.
    body = {"model": embedded_engine.model_id, "prompt": "x", "max_tokens": 1}
    response = await _post(create_app(embedded_engine), {**body, "logit_bias": {key: -100}})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "logit_bias"
    assert "ASCII" in error["message"]


async def test_real_engine_models_report_the_context_length(embedded_engine: Any) -> None:
    async with _client(create_app(embedded_engine)) as client:
        card = (await client.get(f"/v1/models/{embedded_engine.model_id}")).json()
        listing = (await client.get("/v1/models")).json()
    # OpenAI's fields, plus vLLM's max_model_len (what lm-evaluation-harness would need).
    assert {"id", "object", "created", "owned_by"} <= set(card)
    assert card["max_model_len"] == embedded_engine.context_length
    assert listing["data"] == [card]
