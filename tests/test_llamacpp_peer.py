"""What a real llama.cpp server (llama-cpp-python 0.3.36) does with Completions requests.

Raw httpx against the `llamacpp_server` fixture (tests/peers/llamacpp.py), serving the embedded
model converted to GGUF. First the conversion is checked against our own model (same token ids,
same generated logprobs), then each way this server departs from OpenAI's protocol is pinned down
with its evidence, so that the conformance check has a known-bad peer to detect. The recorded
fixtures (tests/fixtures/llamacpp/) are checked too, without the server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from peers.llamacpp import N_CTX, LlamaCppServer

from nbcompletions import CompletionRequest

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llamacpp"
PROMPT = "To be, or not to be, that is the question:"
# Greedy with llama.cpp's own samplers off: what OpenAI's temperature 0 means.
GREEDY: dict[str, Any] = {"temperature": 0, "top_k": 0, "min_p": 0, "repeat_penalty": 1}
OPENAI_MEANING: dict[str, Any] = {
    "temperature": 1,
    "top_p": 1,
    "top_k": 0,
    "min_p": 0,
    "repeat_penalty": 1,
}
LLAMACPP_DEFAULTS: dict[str, Any] = {
    "temperature": 0.8,
    "top_p": 0.95,
    "top_k": 40,
    "min_p": 0.05,
    "repeat_penalty": 1.1,
}
TOL = 0.01  # f16 weights in both; llama.cpp accumulates differently


@pytest.fixture(scope="module")
def peer(llamacpp_server: LlamaCppServer) -> LlamaCppServer:
    return llamacpp_server


@pytest.fixture(scope="module")
def http(llamacpp_server: LlamaCppServer) -> Any:
    # The extras live at the server root, the protocol under /v1.
    with httpx.Client(base_url=llamacpp_server.base_url.removesuffix("/v1"), timeout=120) as c:
        yield c


def complete(http: httpx.Client, peer: LlamaCppServer, **fields: Any) -> dict[str, Any]:
    response = http.post("/v1/completions", json={"model": peer.model, **fields})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def stream_events(http: httpx.Client, peer: LlamaCppServer, **fields: Any) -> list[dict[str, Any]]:
    response = http.post("/v1/completions", json={"model": peer.model, "stream": True, **fields})
    assert response.status_code == 200, response.text
    events: list[dict[str, Any]] = []
    done = False
    for line in response.text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
            else:
                events.append(json.loads(payload))
    assert done, response.text
    return events


def ours(engine: Any, **fields: Any) -> dict[str, Any]:
    """The same request on our embedded engine, the reference."""
    result: dict[str, Any] = engine.complete(CompletionRequest(**fields))
    return result


def logprob_matrix(engine: Any, ids: list[int]) -> np.ndarray:
    """Our model's log-softmax at every position of ``ids``: row i predicts token i + 1."""
    from nbcompletions.model._gpt2 import forward_full, log_softmax

    logits = forward_full(engine.weights, np.asarray([ids], np.int64))[0]
    return np.asarray(log_softmax(logits))


def peer_alive(http: httpx.Client) -> bool:
    return http.get("/v1/models").status_code == 200


# --- the conversion is faithful -------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        PROMPT,
        "  ROMEO:\nBut, soft! what light through yonder window breaks?\n\n",
        "日本 café naïve – “quotes” €",
        "1234567 $%&*() \t tabs",
    ],
)
def test_conversion_has_our_token_ids(http: httpx.Client, embedded_engine: Any, text: str) -> None:
    response = http.post("/extras/tokenize", json={"input": text})
    assert response.status_code == 200, response.text
    assert response.json()["tokens"] == embedded_engine.encode(text)


def test_conversion_generates_our_tokens_and_logprobs(
    http: httpx.Client, peer: LlamaCppServer, embedded_engine: Any
) -> None:
    theirs = complete(http, peer, prompt=PROMPT, max_tokens=8, logprobs=1, **GREEDY)["choices"][0]
    mine = ours(embedded_engine, prompt=PROMPT, max_tokens=8, logprobs=1, temperature=0)
    mine = mine["choices"][0]
    assert theirs["text"] == mine["text"]
    assert theirs["logprobs"]["tokens"] == mine["logprobs"]["tokens"]
    np.testing.assert_allclose(
        theirs["logprobs"]["token_logprobs"], mine["logprobs"]["token_logprobs"], atol=TOL
    )


# --- how this server departs from the protocol ----------------------------------------------


def test_echo_logprobs_are_shifted_by_one_position(
    http: httpx.Client, peer: LlamaCppServer, embedded_engine: Any
) -> None:
    ids = embedded_engine.encode(PROMPT)
    body = complete(http, peer, prompt=PROMPT, echo=True, logprobs=1, max_tokens=1, **GREEDY)
    choice = body["choices"][0]
    got = choice["logprobs"]["token_logprobs"]
    lp = logprob_matrix(embedded_engine, ids)
    true = [lp[i - 1, ids[i]] for i in range(1, len(ids))]  # token i given tokens < i
    shifted = [lp[i, ids[i]] for i in range(1, len(ids))]  # token i under position i+1's odds
    assert got[0] is None
    np.testing.assert_allclose(got[1 : len(ids)], shifted, atol=TOL)
    assert max(abs(g - t) for g, t in zip(got[1 : len(ids)], true, strict=True)) > 1.0
    # The generated token is in the text but has no logprobs entry at all.
    assert choice["text"].startswith(PROMPT)
    assert len(choice["text"]) > len(PROMPT)
    assert body["usage"]["completion_tokens"] == 1
    assert len(choice["logprobs"]["tokens"]) == len(ids)


def test_max_tokens_zero_generates_until_the_context_is_full(
    http: httpx.Client, peer: LlamaCppServer
) -> None:
    # Bounded by --n_ctx 256, the model's trained positions: it cannot run past them.
    body = complete(http, peer, prompt=PROMPT, echo=True, max_tokens=0, **GREEDY)
    usage = body["usage"]
    assert usage["completion_tokens"] > 0
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= N_CTX
    assert len(body["choices"][0]["text"]) > len(PROMPT)


@pytest.mark.parametrize("field", ["n", "best_of"])
def test_n_and_best_of_are_ignored(http: httpx.Client, peer: LlamaCppServer, field: str) -> None:
    body = complete(http, peer, prompt=PROMPT, max_tokens=3, seed=1, **{field: 2}, **OPENAI_MEANING)
    assert len(body["choices"]) == 1
    assert body["usage"]["completion_tokens"] == 3


def test_stream_drops_echo(http: httpx.Client, peer: LlamaCppServer) -> None:
    plain = complete(http, peer, prompt=PROMPT, echo=True, max_tokens=3, **GREEDY)
    assert plain["choices"][0]["text"].startswith(PROMPT)
    events = stream_events(http, peer, prompt=PROMPT, echo=True, max_tokens=3, **GREEDY)
    streamed = "".join(c["text"] for e in events for c in e["choices"])
    assert streamed == plain["choices"][0]["text"].removeprefix(PROMPT)


def test_stream_options_include_usage_is_ignored(http: httpx.Client, peer: LlamaCppServer) -> None:
    events = stream_events(
        http,
        peer,
        prompt=PROMPT,
        max_tokens=3,
        stream_options={"include_usage": True},
        **GREEDY,
    )
    assert events
    assert all(e.get("usage") is None for e in events)
    assert all(e["choices"] for e in events)  # no usage-only chunk with choices: []


def test_stop_token_stays_in_the_logprobs(http: httpx.Client, peer: LlamaCppServer) -> None:
    free = complete(http, peer, prompt=PROMPT, max_tokens=6, logprobs=0, **GREEDY)["choices"][0]
    tokens = free["logprobs"]["tokens"]
    stop = tokens[2]  # a token the model does generate, greedy
    assert stop.strip()
    assert stop not in "".join(tokens[:2])
    cut = complete(http, peer, prompt=PROMPT, max_tokens=6, logprobs=0, stop=[stop], **GREEDY)
    choice = cut["choices"][0]
    assert choice["text"] == "".join(tokens[:2])
    assert choice["finish_reason"] == "stop"
    assert choice["logprobs"]["tokens"] == tokens[:3]  # one token longer than the text


def test_non_ascii_byte_tokens_come_back_empty(
    http: httpx.Client, peer: LlamaCppServer, embedded_engine: Any
) -> None:
    text = "日本 café"
    ids = embedded_engine.encode(text)
    body = complete(http, peer, prompt=text, echo=True, logprobs=0, max_tokens=1, **GREEDY)
    tokens = body["choices"][0]["logprobs"]["tokens"][: len(ids)]
    ours_ = [embedded_engine.token_str(i) for i in ids]
    assert [t for t, o in zip(tokens, ours_, strict=True) if o.startswith("bytes:")] == [""] * 8
    assert [t for t, o in zip(tokens, ours_, strict=True) if not o.startswith("bytes:")] == [
        " c",
        "af",
    ]


def test_a_list_of_two_prompts_is_a_500(http: httpx.Client, peer: LlamaCppServer) -> None:
    response = http.post(
        "/v1/completions",
        json={"model": peer.model, "prompt": [PROMPT, "Hello"], "max_tokens": 1, **GREEDY},
    )
    assert response.status_code == 500
    # A one-element list is unwrapped and served.
    one = complete(http, peer, prompt=[PROMPT], max_tokens=1, **GREEDY)
    assert len(one["choices"]) == 1


def test_token_id_prompts_are_refused(http: httpx.Client, peer: LlamaCppServer) -> None:
    for prompt in ([429, 310, 12], [[429, 310, 12]]):
        response = http.post(
            "/v1/completions",
            json={"model": peer.model, "prompt": prompt, "max_tokens": 1, **GREEDY},
        )
        assert response.status_code == 500, (prompt, response.text)
        error = response.json()["error"]
        assert error["param"] is None
        assert "prompt" in error["message"]


def test_omitted_sampling_fields_mean_llamacpp_defaults(
    http: httpx.Client, peer: LlamaCppServer
) -> None:
    def text(seed: int, **fields: Any) -> str:
        body = complete(http, peer, prompt=PROMPT, max_tokens=12, seed=seed, **fields)
        return str(body["choices"][0]["text"])

    seeds = range(1, 6)
    omitted = [text(s) for s in seeds]
    assert omitted == [text(s, **LLAMACPP_DEFAULTS) for s in seeds]
    assert omitted != [text(s, **OPENAI_MEANING) for s in seeds]
    # The server says so itself.
    schema = http.get("/openapi.json").json()["components"]["schemas"]["CreateCompletionRequest"]
    defaults = {k: schema["properties"][k].get("default") for k in LLAMACPP_DEFAULTS}
    assert defaults == LLAMACPP_DEFAULTS


def test_seed_is_deterministic(http: httpx.Client, peer: LlamaCppServer) -> None:
    first, second = (
        complete(http, peer, prompt=PROMPT, max_tokens=12, seed=3, **OPENAI_MEANING)
        for _ in range(2)
    )
    assert first["choices"][0]["text"] == second["choices"][0]["text"]


def test_logprobs_above_openai_cap_are_returned(http: httpx.Client, peer: LlamaCppServer) -> None:
    body = complete(http, peer, prompt=PROMPT, max_tokens=1, logprobs=10, **GREEDY)
    assert len(body["choices"][0]["logprobs"]["top_logprobs"][0]) >= 10


def test_text_offset_counts_from_the_prompt_start(http: httpx.Client, peer: LlamaCppServer) -> None:
    body = complete(http, peer, prompt=PROMPT, max_tokens=3, logprobs=0, **GREEDY)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["text_offset"][0] == len(PROMPT)
    lengths = [len(t) for t in logprobs["tokens"][:-1]]
    assert logprobs["text_offset"] == [len(PROMPT) + sum(lengths[:i]) for i in range(3)]


def test_an_unknown_model_is_served_anyway(http: httpx.Client, peer: LlamaCppServer) -> None:
    response = http.post(
        "/v1/completions",
        json={"model": "no-such-model", "prompt": PROMPT, "max_tokens": 1, **GREEDY},
    )
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "no-such-model"  # the name asked for, not the one served


def test_models_do_not_tell_context_or_vocabulary(http: httpx.Client, peer: LlamaCppServer) -> None:
    body = http.get("/v1/models").json()
    (model,) = body["data"]
    assert model["id"] == peer.model
    flat = json.dumps(model)
    assert "256" not in flat
    assert "4096" not in flat


def test_no_request_of_ours_crashes_it(
    http: httpx.Client, peer: LlamaCppServer, embedded_engine: Any
) -> None:
    # max_tokens=0 (unbounded there) after a prompt that nearly fills the context: n_ctx caps it
    # at the model's trained positions, so generation stops at 256 instead of running past them.
    long_prompt = "To be, or not to be. " * 31
    assert len(embedded_engine.encode(long_prompt)) == 249
    body = complete(http, peer, prompt=long_prompt, max_tokens=0, **GREEDY)
    assert body["usage"]["prompt_tokens"] == 249
    assert body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"] <= N_CTX
    assert peer_alive(http)


def test_a_prompt_longer_than_the_context_is_a_400_naming_messages(
    http: httpx.Client, peer: LlamaCppServer
) -> None:
    response = http.post(
        "/v1/completions",
        json={"model": peer.model, "prompt": PROMPT * 30, "max_tokens": 1, **GREEDY},
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"  # the chat field, even on /v1/completions
    assert "maximum context length is 256 tokens" in error["message"]
    assert peer_alive(http)


def test_suffix_is_spliced_into_the_prompt(http: httpx.Client, peer: LlamaCppServer) -> None:
    # Not ignored: a fill-in-the-middle hack with token 0 (our end-of-text) as prefix, suffix and
    # middle markers, plus one stray byte of a "☺" it prepends, goes into the prompt; the suffix
    # never reaches the text.
    plain = complete(http, peer, prompt="To be", max_tokens=3, **GREEDY)
    body = complete(
        http,
        peer,
        prompt="To be",
        suffix=" the end",
        echo=True,
        logprobs=0,
        max_tokens=3,
        **GREEDY,
    )
    assert plain["usage"]["prompt_tokens"] == 2
    assert body["usage"]["prompt_tokens"] == 8
    choice = body["choices"][0]
    assert choice["logprobs"]["tokens"][:5] == ["To", " be", "", " the", " end"]
    assert not choice["text"].endswith(" the end")
    assert choice["text"].removeprefix("To be") != plain["choices"][0]["text"]


def test_an_empty_prompt_is_a_500_with_an_empty_message(
    http: httpx.Client, peer: LlamaCppServer
) -> None:
    response = http.post(
        "/v1/completions", json={"model": peer.model, "prompt": "", "max_tokens": 3, **GREEDY}
    )
    assert response.status_code == 500
    assert response.json()["error"] == {
        "message": "",
        "type": "internal_server_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    ("field", "value"), [("logprobs", -1), ("max_tokens", -1), ("temperature", "hot")]
)
def test_validation_errors_are_500s_without_param(
    http: httpx.Client, peer: LlamaCppServer, field: str, value: Any
) -> None:
    response = http.post(
        "/v1/completions",
        json={"model": peer.model, "prompt": PROMPT, "max_tokens": 1, field: value},
    )
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "internal_server_error"
    assert error["param"] is None
    assert error["message"].startswith("1 validation error")
    assert f"('body', '{field}')" in error["message"]  # the field is only in the message


def test_malformed_json_is_a_plain_text_500(http: httpx.Client, peer: LlamaCppServer) -> None:
    # An unhandled exception in uvicorn: it also drops the keep-alive connection without saying
    # so, and the next request on it is reset; so a connection of its own here.
    with httpx.Client(base_url=peer.base_url, timeout=60) as own:
        response = own.post(
            "/completions", content=b"not json", headers={"content-type": "application/json"}
        )
    assert response.status_code == 500
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Internal Server Error"
    assert peer_alive(http)


def test_more_than_four_stop_strings_are_accepted(http: httpx.Client, peer: LlamaCppServer) -> None:
    stop = ["x1", "x2", "x3", "x4", "x5"]
    body = complete(http, peer, prompt=PROMPT, max_tokens=2, stop=stop, **GREEDY)
    assert body["choices"][0]["finish_reason"] == "length"


# --- the recorded fixtures say the same, without the server ---------------------------------


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text("utf-8"))
    return data


def test_recorded_fixtures_are_complete() -> None:
    files = sorted(FIXTURES.glob("*.json"))
    assert len(files) >= 12
    for path in files:
        data = json.loads(path.read_text("utf-8"))
        assert data["name"] == path.stem
        assert data["server"] == "llama-cpp-python 0.3.36"
        assert {"method", "path", "request", "status", "response", "shows"} <= data.keys()


def test_recorded_fixtures_show_the_deviations() -> None:
    assert len(fixture("n_2")["response"]["choices"]) == 1
    assert len(fixture("best_of_2")["response"]["choices"]) == 1
    assert fixture("max_tokens_zero")["response"]["usage"]["completion_tokens"] > 0
    assert fixture("list_of_two_prompts")["status"] == 500
    events = fixture("stream_include_usage")["response"]["events"]
    assert events[-1] == "[DONE]"
    assert all(e.get("usage") is None for e in events[:-1])
    echo = fixture("echo_logprobs_shifted")["response"]["choices"][0]
    assert echo["logprobs"]["token_logprobs"][0] is None
    stop = fixture("stop_token_in_logprobs")["response"]["choices"][0]
    assert len("".join(stop["logprobs"]["tokens"])) > len(stop["text"])
