"""The official `openai` SDK as the client of a real `nbcompletions serve` process.

Everything here goes over HTTP to the subprocess the `live_server` fixture starts, serving the real
embedded model. Answers are checked against each other (a batched request against the same prompt
alone, a stream against the same request unstreamed), never against hard-coded model text.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from helpers import free_port
from openai.types.chat import ChatCompletionMessageParam

MODEL = "nbc-shakespeare"
PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def sdk(live_server: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=live_server, api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def _greedy(sdk: openai.OpenAI, prompt: Any, **fields: Any) -> Any:
    return sdk.completions.create(model=MODEL, prompt=prompt, temperature=0, **fields)


# -- models ---------------------------------------------------------------------------------------
def test_models_list_and_retrieve(sdk: openai.OpenAI) -> None:
    listed = sdk.models.list()
    assert [model.id for model in listed.data] == [MODEL]
    model = sdk.models.retrieve(MODEL)
    assert model.id == MODEL
    assert model.object == "model"
    assert model.owned_by == "nbcompletions"
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("gpt-4")
    assert info.value.code == "model_not_found"


# -- completions ----------------------------------------------------------------------------------
def test_logprobs_cover_every_generated_token(sdk: openai.OpenAI) -> None:
    result = _greedy(sdk, PROMPT, max_tokens=5, logprobs=3)
    assert result.object == "text_completion"
    assert result.model == MODEL
    (choice,) = result.choices
    logprobs = choice.logprobs
    assert logprobs is not None
    assert result.usage is not None
    count = result.usage.completion_tokens
    assert count == len(logprobs.tokens) == len(logprobs.token_logprobs)
    assert len(logprobs.top_logprobs) == len(logprobs.text_offset) == count
    assert logprobs.text_offset[0] == len(PROMPT)  # OpenAI counts offsets from the prompt's start
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert 3 <= len(top) <= 4  # the 3 most likely, plus the sampled token when not among them
        assert top[token] == logprob  # the sampled token is always included
        assert logprob <= 0.0
        # Greedy: nothing listed is more likely than the token chosen.
        assert max(top.values()) == pytest.approx(logprob, abs=1e-6)


def test_echo_with_max_tokens_zero_scores_the_prompt(sdk: openai.OpenAI) -> None:
    result = _greedy(sdk, PROMPT, max_tokens=0, echo=True, logprobs=1)
    (choice,) = result.choices
    assert choice.text == PROMPT
    assert choice.logprobs is not None
    assert choice.logprobs.token_logprobs[0] is None
    assert choice.logprobs.top_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert result.usage is not None
    assert result.usage.completion_tokens == 0
    assert len(choice.logprobs.tokens) == result.usage.prompt_tokens


def test_n_returns_n_indexed_choices(sdk: openai.OpenAI) -> None:
    result = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, n=3, seed=1)
    assert [choice.index for choice in result.choices] == [0, 1, 2]
    assert all(choice.finish_reason in ("stop", "length") for choice in result.choices)


def test_best_of_returns_n_choices(sdk: openai.OpenAI) -> None:
    result = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, n=2, best_of=3, seed=2, logprobs=0
    )
    assert [choice.index for choice in result.choices] == [0, 1]


def test_several_prompts_match_each_prompt_alone(sdk: openai.OpenAI) -> None:
    prompts = [PROMPT, "My lord, the king", "O Romeo"]
    batched = _greedy(sdk, prompts, max_tokens=4, n=2)
    assert [choice.index for choice in batched.choices] == list(range(6))
    for number, prompt in enumerate(prompts):
        alone = _greedy(sdk, prompt, max_tokens=4).choices[0].text
        assert [batched.choices[number * 2 + k].text for k in range(2)] == [alone, alone]


def test_token_id_prompt_matches_the_text_prompt(sdk: openai.OpenAI, embedded_engine: Any) -> None:
    ids = embedded_engine.encode(PROMPT)
    assert (
        _greedy(sdk, ids, max_tokens=4).choices[0].text
        == _greedy(sdk, PROMPT, max_tokens=4).choices[0].text
    )


def test_stop_cuts_the_text_before_the_stop_sequence(sdk: openai.OpenAI) -> None:
    full = _greedy(sdk, PROMPT, max_tokens=12).choices[0].text
    assert len(full) >= 4, f"greedy text too short to pick a stop sequence from: {full!r}"
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    cut = _greedy(sdk, PROMPT, max_tokens=12, stop=[stop, "\u2603never"])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_stream_with_usage_matches_the_unstreamed_answer(sdk: openai.OpenAI) -> None:
    plain = _greedy(sdk, PROMPT, max_tokens=8)
    stream = _greedy(sdk, PROMPT, max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    *deltas, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert plain.usage is not None
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert all(chunk.usage is None for chunk in deltas)
    assert "".join(chunk.choices[0].text for chunk in deltas) == plain.choices[0].text
    assert deltas[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_stream_with_n_and_logprobs(sdk: openai.OpenAI) -> None:
    stream = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, n=2, seed=3, logprobs=2, stream=True
    )
    texts: dict[int, str] = {0: "", 1: ""}
    finished: dict[int, str | None] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason is not None:
                finished[choice.index] = choice.finish_reason
    assert set(finished) == {0, 1}
    # The same seed unstreamed gives the same two texts.
    again = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, n=2, seed=3, logprobs=2
    )
    assert [texts[0], texts[1]] == [choice.text for choice in again.choices]


def test_same_seed_same_text(sdk: openai.OpenAI) -> None:
    def sample(seed: int) -> list[str]:
        result = sdk.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, n=2, seed=seed
        )
        return [choice.text for choice in result.choices]

    first = sample(1234)
    assert sample(1234) == first
    # A server that ignored the seed (or always said the same) would pass the line above.
    assert any(sample(seed) != first for seed in (1235, 1236))


# -- errors ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"logprobs": 6}, "logprobs"),
        ({"n": 0}, "n"),
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"presence_penalty": -2.5}, "presence_penalty"),
        ({"suffix": " the end"}, "suffix"),  # the model cannot insert: the engine says so
        ({"max_tokens": 1000}, "max_tokens"),  # past the model's context
        ({"max_tokens": 100_000}, "max_tokens"),  # past the server's cap
        ({"logit_bias": {"999999": 5}}, "logit_bias"),  # not in the vocabulary
        ({"prompt": [999_999]}, "prompt"),  # a token id outside the vocabulary
        ({"extra_body": {"top_k": 5}}, "top_k"),  # not an OpenAI field
    ],
)
def test_bad_fields_raise_bad_request_with_the_param(
    sdk: openai.OpenAI, fields: dict[str, Any], param: str
) -> None:
    request = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(**request)
    assert info.value.status_code == 400
    assert info.value.param == param
    assert info.value.type == "invalid_request_error"


def test_unknown_model_raises_not_found(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        sdk.completions.create(model="gpt-3.5-turbo-instruct", prompt=PROMPT, max_tokens=2)
    assert info.value.code == "model_not_found"
    assert info.value.param == "model"


def test_malformed_json_over_http_is_400(live_server: str) -> None:
    response = httpx.post(
        f"{live_server}/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] is None


def test_body_over_the_limit_over_http_is_413(live_server: str) -> None:
    response = httpx.post(
        f"{live_server}/completions", json={"model": MODEL, "prompt": "x" * 1_100_000}
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"


def test_a_stream_closed_early_leaves_the_server_serving(sdk: openai.OpenAI) -> None:
    stream = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=200, stream=True)
    first = next(iter(stream))
    assert first.choices
    stream.close()
    assert _greedy(sdk, PROMPT, max_tokens=2).choices[0].finish_reason is not None


# -- a key-protected server -----------------------------------------------------------------------
KEY = "sk-nbc-test-4f1d2c"


@pytest.fixture(scope="module")
def keyed_server(
    tmp_path_factory: pytest.TempPathFactory, embedded_engine: Any
) -> Iterator[tuple[str, Path]]:
    """`nbcompletions serve` with the key in NBCOMPLETIONS_API_KEY; yields (base URL, log file).

    Depends on `embedded_engine` only to skip, as it does, while the weights are missing.
    """
    port = free_port()
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    env = {**os.environ, "NBCOMPLETIONS_API_KEY": KEY}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbcompletions", "serve", "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"serve exited early:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"serve never answered:\n{log.read_text()}"
            time.sleep(0.1)
        yield f"{base}/v1", log
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_wrong_or_missing_key_raises_authentication_error(keyed_server: tuple[str, Path]) -> None:
    base, log = keyed_server
    client = openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2)
    assert info.value.code == "invalid_api_key"
    assert KEY not in str(info.value.body)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
    # The SDK refuses to send no key at all; plain HTTP can.
    missing = httpx.post(f"{base}/completions", json={"model": MODEL, "prompt": PROMPT})
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{base.removesuffix('/v1')}/health").status_code == 200
    good = openai.OpenAI(base_url=base, api_key=KEY, max_retries=0)
    assert good.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices
    text = log.read_text()
    assert "bearer key required" in text
    assert KEY not in text


# -- issue 9: a faithful peer, safe by default ---------------------------------------------------
def test_an_empty_stop_list_is_no_stop(sdk: openai.OpenAI) -> None:
    # lm-evaluation-harness sends stop=[] for tasks without stop strings; vLLM reads it as none.
    with_empty = _greedy(sdk, PROMPT, max_tokens=6, stop=[])
    without = _greedy(sdk, PROMPT, max_tokens=6)
    assert with_empty.choices[0].text == without.choices[0].text


def test_models_report_the_context_length(live_server: str, embedded_engine: Any) -> None:
    card = httpx.get(f"{live_server}/models/{MODEL}").json()
    assert card["max_model_len"] == embedded_engine.context_length
    assert {"id", "object", "created", "owned_by"} <= set(card)


def test_scoring_a_continuation_that_is_end_of_text(
    sdk: openai.OpenAI, embedded_engine: Any
) -> None:
    """What lm-evaluation-harness's local-completions sends for loglikelihood.

    It echoes the context plus continuation, asks for one token, and keeps token_logprobs[n:-1]:
    the last entry is the token generated, which must be there even when it is <|endoftext|>.
    """
    ids = embedded_engine.encode(PROMPT)
    forced = {str(embedded_engine.eot_token_id): 100}
    result = sdk.completions.create(
        model=MODEL,
        prompt=[ids],
        echo=True,
        logprobs=1,
        max_tokens=1,
        temperature=0,
        seed=1234,
        logit_bias=forced,
    )
    scored = sdk.completions.create(
        model=MODEL, prompt=[ids], echo=True, logprobs=1, max_tokens=0, temperature=0
    )
    lp = result.choices[0].logprobs
    scored_lp = scored.choices[0].logprobs
    assert lp is not None
    assert lp.tokens is not None
    assert lp.text_offset is not None
    assert lp.token_logprobs is not None
    assert scored_lp is not None
    assert lp.tokens[-1] == "<|endoftext|>"
    assert lp.text_offset[-1] == len(PROMPT)
    assert result.choices[0].text == PROMPT
    assert lp.token_logprobs[:-1] == scored_lp.token_logprobs


# -- chat -----------------------------------------------------------------------------------------
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Who art thou?"}]


def test_chat_with_logprobs_plain_and_streamed(sdk: openai.OpenAI) -> None:
    result = sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_completion_tokens=6, seed=4, logprobs=True, top_logprobs=5
    )
    assert result.object == "chat.completion"
    (choice,) = result.choices
    assert choice.message.role == "assistant"
    assert choice.message.refusal is None
    assert choice.logprobs is not None
    content = choice.logprobs.content
    assert content is not None
    assert content
    for entry in content:
        assert len(entry.top_logprobs) == 5
        assert entry.bytes is not None
        assert entry.logprob <= 0.0
    spelled = b"".join(bytes(entry.bytes or []) for entry in content)
    assert spelled.decode("utf-8", errors="replace") == choice.message.content
    stream = sdk.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_completion_tokens=6,
        seed=4,
        logprobs=True,
        top_logprobs=5,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[-1].usage == result.usage
    deltas = [c.choices[0] for c in chunks if c.choices]
    assert "".join(d.delta.content or "" for d in deltas) == choice.message.content
    streamed = [e for d in deltas if d.logprobs and d.logprobs.content for e in d.logprobs.content]
    assert streamed == content
    assert deltas[-1].finish_reason == choice.finish_reason


def test_responses_with_logprobs(sdk: openai.OpenAI) -> None:
    result = sdk.responses.create(
        model=MODEL,
        input="Who art thou?",
        include=["message.output_text.logprobs"],
        top_logprobs=3,
        max_output_tokens=6,
        temperature=0,
    )
    assert result.object == "response"
    (message,) = result.output
    assert message.type == "message"
    (part,) = message.content
    assert part.type == "output_text"
    assert part.text == result.output_text
    assert part.logprobs
    assert all(len(entry.top_logprobs) == 3 for entry in part.logprobs)
    assert result.usage is not None
    assert result.usage.output_tokens == 6
    chat = sdk.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3
    )
    assert chat.choices[0].message.content == result.output_text
    assert chat.choices[0].logprobs is not None
    assert [e.logprob for e in chat.choices[0].logprobs.content or []] == [
        e.logprob for e in part.logprobs
    ]
    stream = sdk.responses.create(
        model=MODEL,
        input="Who art thou?",
        include=["message.output_text.logprobs"],
        top_logprobs=3,
        max_output_tokens=6,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == result.output_text
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == result.output_text


def test_a_trailing_slash_is_404_not_a_redirect(live_server: str) -> None:
    response = httpx.post(f"{live_server}/completions/", json={"model": MODEL, "prompt": "x"})
    assert response.status_code == 404
    assert "location" not in response.headers


# -- a strict, vLLM-compatible server ------------------------------------------------------------
BODY_TIMEOUT_S = 1.0
#: Guards socket reads, so a server that never answers fails the test instead of hanging it.
SOCKET_GUARD_S = 30.0


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[Any, int]:
    port = free_port()
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbcompletions", "serve", "--port", str(port), *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, f"serve exited early:\n{log.read_text()}"
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1.0).status_code == 200:
                return proc, port
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"serve never answered:\n{log.read_text()}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, embedded_engine: Any) -> Iterator[int]:
    """`nbcompletions serve --compat vllm --body-timeout 1`; yields its port."""
    log = tmp_path_factory.mktemp("vllm") / "serve.log"
    proc, port = _start(["--compat", "vllm", "--body-timeout", str(BODY_TIMEOUT_S)], log)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _raw(port: int, request: bytes, *, then: bytes | None = None) -> bytes:
    """Send raw bytes over a real socket; read until the server answers and closes, or the guard."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_GUARD_S) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within {SOCKET_GUARD_S} s") from None
            if not chunk:
                break
            chunks.append(chunk)
            if then is not None:
                sock.sendall(then)
                then = None
    return b"".join(chunks)


@pytest.mark.slow
def test_a_body_that_stalls_is_408_and_closed(vllm_server: int) -> None:
    body = b'{"model": "nbc-shakespeare", "prompt": "To be", "max_tokens": 2}'
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    # Half the body, then nothing: the server must give up after its body timeout, not wait on.
    answer = _raw(vllm_server, head + body[: len(body) // 2])
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"request_timeout" in answer
    # ... and it still serves everyone else.
    ok = httpx.post(
        f"http://127.0.0.1:{vllm_server}/v1/completions",
        json={"model": MODEL, "prompt": "x", "max_tokens": 1},
    )
    assert ok.status_code == 200


def test_a_cross_origin_text_plain_post_is_refused(vllm_server: int) -> None:
    # What any web page can send without a preflight; with a rebinding Host, too.
    body = b'{"model": "nbc-shakespeare", "prompt": "To be", "max_tokens": 2}'

    def post(host: bytes, extra: bytes) -> bytes:
        request = (
            b"POST /v1/completions HTTP/1.1\r\nHost: "
            + host
            + b"\r\n"
            + extra
            + b"Content-Type: text/plain;charset=UTF-8\r\nConnection: close\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        return _raw(vllm_server, request)

    rebound = post(b"rebound.example:8000", b"Origin: http://rebound.example:8000\r\n")
    assert rebound.startswith(b"HTTP/1.1 403 "), rebound[:200]
    assert b"host_not_allowed" in rebound
    foreign = post(b"127.0.0.1", b"Origin: https://evil.example\r\n")
    assert foreign.startswith(b"HTTP/1.1 403 "), foreign[:200]
    assert b"origin_not_allowed" in foreign
    plain = post(b"127.0.0.1", b"")
    assert plain.startswith(b"HTTP/1.1 415 "), plain[:200]


def test_vllm_mode_takes_vllm_fields_through_the_sdk(vllm_server: int) -> None:
    sdk = openai.OpenAI(
        base_url=f"http://127.0.0.1:{vllm_server}/v1", api_key="unused", max_retries=0, timeout=60
    )
    greedy = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=0)
    top_1 = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.5, seed=3, extra_body={"top_k": 1}
    )
    assert top_1.choices[0].text == greedy.choices[0].text
    # Five stop strings (a harness task's four plus its end-of-text) and vLLM's 20 logprobs.
    stops = ["\n\n", "Q:", "A:", "###", "<|endoftext|>"]
    many = sdk.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, stop=stops, logprobs=20
    )
    many_lp = many.choices[0].logprobs
    assert many_lp is not None
    assert many_lp.top_logprobs is not None
    assert len(many_lp.top_logprobs[0]) >= 20
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2, extra_body={"repetition_penalty": 0}
        )
    assert info.value.param == "repetition_penalty"
    sdk.close()


def test_the_client_under_the_vllm_profile_sweeps_the_samplers(vllm_server: int) -> None:
    from nbcompletions import Client, Limits, RequestError

    with Client(
        base_url=f"http://127.0.0.1:{vllm_server}/v1",
        api_key="unused",
        model=MODEL,
        limits=Limits.vllm(),
    ) as client:
        with pytest.raises(RequestError) as info:
            client.complete(PROMPT, max_tokens=2, extra={"min_p": 2.0})
        assert info.value.param == "min_p"
        greedy = client.complete(PROMPT, max_tokens=6, temperature=0)
        top_1 = client.complete(PROMPT, max_tokens=6, temperature=1.0, extra={"top_k": 1})
    assert top_1.text == greedy.text
