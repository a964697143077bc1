"""Server profiles: chosen by name, carried by the client, applied to requests; vocab size too."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from nbcompletions import AsyncClient, Client, Limits, RequestError, ServerProfile
from nbcompletions._profiles import PROFILES, get_profile
from nbcompletions._request import CompletionRequest
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"


def test_the_four_profiles_and_their_limits() -> None:
    assert sorted(PROFILES) == ["llama-server", "llamacpp", "nbcompletions", "openai", "vllm"]
    assert PROFILES["vllm"].limits == Limits.vllm()
    assert PROFILES["llamacpp"].limits == Limits.llamacpp()
    assert PROFILES["openai"].limits == Limits()
    assert PROFILES["llamacpp"].max_tokens_zero == "max_tokens_1"
    assert PROFILES["llamacpp"].validation_errors_as_500
    assert PROFILES["vllm"].text_offset_origin == "completion"
    assert get_profile("LlamaCpp") is PROFILES["llamacpp"]
    assert get_profile(None) is None


def test_an_unknown_profile_names_the_field_and_the_choices() -> None:
    with pytest.raises(
        RequestError, match=r"profile must be one of 'llama-server', 'llamacpp'.*got 'ollama'"
    ) as e:
        get_profile("ollama")
    assert e.value.param == "profile"
    with pytest.raises(RequestError, match="profile"):
        Client("http://127.0.0.1:1/v1", profile="ollama")


def test_profiles_are_immutable() -> None:
    profile = PROFILES["llamacpp"]
    with pytest.raises(TypeError):
        profile.neutral_fields["top_k"] = 40  # type: ignore[index]  # read-only: the refusal under test
    assert profile.with_vocab_size(4096).vocab_size == 4096
    assert profile.vocab_size is None


def test_neutral_fields_make_sampling_mean_openais() -> None:
    llamacpp = PROFILES["llamacpp"]
    request = llamacpp.neutralize(CompletionRequest(prompt="a"))
    body = request.to_body()
    assert body == {
        "prompt": "a",
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
    }
    # What the caller set wins, standard fields and extras alike.
    mine = llamacpp.neutralize(CompletionRequest(prompt="a", temperature=0.3, extra={"top_k": 5}))
    assert mine.temperature == 0.3
    assert mine.extra["top_k"] == 5
    assert mine.top_p == 1.0
    vllm = PROFILES["vllm"].neutralize(CompletionRequest(prompt="a")).to_body()
    assert vllm["top_k"] == -1
    assert vllm["repetition_penalty"] == 1.0
    assert vllm["min_p"] == 0.0
    # OpenAI and our own server need nothing.
    plain = CompletionRequest(prompt="a")
    assert PROFILES["openai"].neutralize(plain) is plain


async def test_a_client_with_a_profile_sends_its_neutral_fields(app: Any) -> None:
    bodies: list[dict[str, Any]] = []
    real = StreamingASGITransport(app)

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # GET /models: the model card, read once
            return await real.handle_async_request(request)
        body = json.loads(request.content)
        bodies.append(dict(body))
        # llama.cpp takes these fields; our server, like OpenAI's, refuses unknown ones.
        for name in PROFILES["llamacpp"].neutral_fields:
            body.pop(name)
        forwarded = httpx.Request("POST", request.url, json=body)
        return await real.handle_async_request(forwarded)

    client = AsyncClient(
        "http://llamacpp.test/v1",
        model=MODEL,
        transport=httpx.MockTransport(handler),
        profile="llamacpp",
    )
    try:
        assert isinstance(client.profile, ServerProfile)
        assert client.profile.name == "llamacpp"
        assert client.limits == Limits.llamacpp()
        assert client.build_request("To be", logprobs=8).logprobs == 8  # no cap on llama.cpp
        await client.complete("To be", max_tokens=1, logprobs=5)
    finally:
        await client.close()
    assert bodies[0]["top_k"] == 0
    assert bodies[0]["temperature"] == 1.0


async def test_frames_take_the_vocabulary_size_from_the_model_card(app: Any) -> None:
    """Issue 16 case 6: the first request with alternatives reads GET /models (once), so frames
    use 4096 before any conformance check (they used GPT-2's 50257)."""
    real = StreamingASGITransport(app)
    paths: list[str] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(f"{request.method} {request.url.path}")
        return await real.handle_async_request(request)

    transport = httpx.MockTransport(handler)
    client = AsyncClient("http://other.test/v1", model=MODEL, transport=transport)
    try:
        before = await client.complete("To be", max_tokens=2, logprobs=5)
        assert before.tokens.attrs["vocab_size"] == 4096
        await client.complete("To be", max_tokens=2, logprobs=5, stream=True)
        assert paths == ["GET /v1/models", "POST /v1/completions", "POST /v1/completions"]
        report = await client.conformance()
        assert report.vocab_size == 4096
        assert client.vocab_size == 4096
        after = await client.complete("To be", max_tokens=2, logprobs=5)
        assert after.tokens.attrs["vocab_size"] == 4096
    finally:
        await client.close()


def test_llama_server_is_its_own_profile_and_refuses_echo() -> None:
    server, python = PROFILES["llama-server"], PROFILES["llamacpp"]
    assert get_profile("llama-server") is server
    assert server.neutral_fields == python.neutral_fields
    assert server.max_tokens_zero == "max_tokens_1"
    assert not server.validation_errors_as_500  # its refusals are 400s
    # It ignores echo and returns only the generated tokens: refused before sending.
    with pytest.raises(RequestError, match=r"echo is refused for profile 'llama-server'") as e:
        server.neutralize(CompletionRequest(prompt="a", echo=True))
    assert (e.value.param, e.value.value) == ("echo", True)
    assert server.neutralize(CompletionRequest(prompt="a", echo=False)).extra == dict(
        server.neutral_fields
    )
    assert python.neutralize(CompletionRequest(prompt="a", echo=True)).echo is True
    assert any("best_of is ignored" in line for line in PROFILES["vllm"].differs)
    assert PROFILES["vllm"].max_tokens_zero == "max_tokens_1"  # 0 is refused there


def test_the_model_card_tells_the_two_llama_cpp_servers_apart() -> None:
    from nbcompletions._conformance_checks import card_limits, detect_profile

    # ggml's llama-server (tools/server get_res_model_info) and llama-cpp-python's server.
    meta = {"n_vocab": 4096, "n_ctx": 256, "n_ctx_train": 256, "vocab_type": 2}
    ggml = {"id": "nbc-shakespeare", "object": "model", "owned_by": "llamacpp", "meta": meta}
    python = {"id": "nbc-shakespeare", "object": "model", "owned_by": "me", "permissions": []}
    assert detect_profile(ggml, {}) == "llama-server"
    assert detect_profile(python, {}) == "llamacpp"
    assert card_limits(ggml) == (256, 4096)
    # -np 4 -c 512: each slot has 128 positions, fewer than the model's 256.
    assert card_limits({**ggml, "meta": {**meta, "n_ctx": 128}}) == (128, 4096)
    assert card_limits(python) == (None, None)
    assert card_limits({"id": "m", "owned_by": "vllm", "max_model_len": 256}) == (256, None)


class _RecordingTransport(StreamingASGITransport):
    """Our server's app, unchanged; each POST body it receives is kept."""

    def __init__(self, app: Any) -> None:
        super().__init__(app)
        self.bodies: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            self.bodies.append(json.loads(await request.aread()))
        return await super().handle_async_request(request)


async def test_a_chat_with_a_profile_sends_its_neutral_fields(embedded_engine: Any) -> None:
    """client.chat() gets the profile's neutral sampling fields as complete() does (llama.cpp's
    samplers stayed on for a chat): here vLLM's, which our server takes under compat vllm."""
    from nbcompletions.server import create_app

    transport = _RecordingTransport(create_app(embedded_engine, compat="vllm"))
    client = AsyncClient(
        "http://embedded/v1", model=MODEL, transport=transport, profile="vllm", timeout=120
    )
    messages = [{"role": "user", "content": "Who art thou?"}]
    try:
        neutral = dict(PROFILES["vllm"].neutral_fields)
        assert client.build_chat_request(messages).extra == neutral
        mine = client.build_chat_request(messages, temperature=0.5, extra={"top_k": 3})
        assert (mine.temperature, mine.top_p, mine.extra["top_k"]) == (0.5, 1.0, 3)
        answer = await client.chat(messages, max_completion_tokens=3, logprobs=True, seed=1)
        stream = client.chat_stream(messages, max_completion_tokens=2, logprobs=True, seed=1)
        streamed = await stream.completion()
    finally:
        await client.close()
    assert len(answer.tokens) == 3
    assert len(streamed.tokens) == 2
    for body in transport.bodies:
        assert {k: body[k] for k in neutral} == neutral, body
        assert (body["temperature"], body["top_p"]) == (1.0, 1.0)
    assert len(transport.bodies) == 2


def test_a_chat_sweep_with_a_profile_sends_its_neutral_fields(embedded_engine: Any) -> None:
    from nbcompletions import sweep
    from nbcompletions.server import create_app

    transport = _RecordingTransport(create_app(embedded_engine, compat="vllm"))
    with Client(
        "http://embedded/v1", model=MODEL, transport=transport, profile="vllm", timeout=120
    ) as client:
        result = sweep(
            client,
            messages=[[{"role": "user", "content": "Speak."}]],
            seed=[0, 1],
            max_completion_tokens=1,
            progress=False,
            probe=False,
            manifest=False,
        )
    assert result.n_failed == 0
    neutral = dict(PROFILES["vllm"].neutral_fields)
    assert len(transport.bodies) == 2
    for body in transport.bodies:
        assert {k: body[k] for k in neutral} == neutral, body
