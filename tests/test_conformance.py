"""The conformance check: all ok on our server; each llama.cpp deviation detected with evidence.

The reference is the real embedded app. The deviations are injected with httpx.MockTransport in
front of that same app, rewriting requests and responses the way llama-cpp-python 0.3.36 was
measured to (COMPAT.md, "Measured on real peers"); tests/test_llamacpp_conformance.py runs the
same check against the real server.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from nbcompletions import (
    AsyncClient,
    Client,
    ConformanceError,
    ConformanceReport,
    sweep,
)
from nbcompletions._conformance import CHECKS, check_sweep, token_bytes
from nbcompletions._request import CompletionRequest
from nbcompletions._retry import is_validation_error, should_retry
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"
ALL = {
    "echo_shift",
    "max_tokens_0",
    "n",
    "stream_echo",
    "usage",
    "lists",
    "defaults",
    "stop_token",
    "bytes",
    "models",
}


class LlamaLike:
    """A transport that behaves like llama-cpp-python in front of the real app (fault injection).

    ``faults`` picks which deviations are on; ``bodies`` records every completion body sent.
    """

    def __init__(self, app: Any, faults: set[str] = ALL) -> None:
        self.real = StreamingASGITransport(app)
        self.faults = faults
        self.bodies: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        on = self.faults
        if request.url.path.endswith("/models") and "models" in on:
            card = {"id": MODEL, "object": "model", "owned_by": "me", "permissions": []}
            return httpx.Response(200, json={"object": "list", "data": [card]})
        if not request.url.path.endswith("/completions"):
            return await self.real.handle_async_request(request)
        body = json.loads(request.content)
        self.bodies.append(body)
        prompt = body.get("prompt")
        if "lists" in on and isinstance(prompt, list):
            if all(isinstance(p, str) for p in prompt):  # `assert len(body.prompt) <= 1`
                error = {"message": "", "type": "internal_server_error", "param": None}
            else:
                error = {
                    "message": "[{'type': 'string_type', 'loc': ('body', 'prompt', 'str'), "
                    "'msg': 'Input should be a valid string', 'input': [100, 101, 102]}]",
                    "type": "internal_server_error",
                    "param": None,
                }
            return httpx.Response(500, json={"error": {**error, "code": None}})
        if "n" in on:
            body.pop("n", None)
            body.pop("best_of", None)
        if "max_tokens_0" in on and body.get("max_tokens") == 0:
            body["max_tokens"] = 12  # "until the context is full", kept short here
        if "defaults" in on:
            body.setdefault("temperature", 0.8)
            body.setdefault("top_p", 0.95)
        stream = bool(body.get("stream"))
        if stream:
            if "stream_echo" in on:
                body.pop("echo", None)
            if "usage" in on:
                body.pop("stream_options", None)
        forwarded = httpx.Request(
            request.method, request.url, headers=request.headers, content=json.dumps(body)
        )
        response = await self.real.handle_async_request(forwarded)
        if stream:
            return response
        await response.aread()
        data = json.loads(response.content)
        for choice in data.get("choices", []):
            self._rewrite(choice, body)
        return httpx.Response(response.status_code, json=data)

    def _rewrite(self, choice: dict[str, Any], body: dict[str, Any]) -> None:
        lp = choice.get("logprobs")
        if not isinstance(lp, dict):
            return
        on = self.faults
        if body.get("echo") and "echo_shift" in on:
            # Each entry holds the next position's distribution (llama.py's all_logprobs[idx]).
            tops = lp["top_logprobs"]
            lp["top_logprobs"] = [*tops[1:], None]
            lp["token_logprobs"] = [None] + [
                (t or {}).get(tok, -20.0)
                for t, tok in zip(tops[1:], lp["tokens"][:-1], strict=False)
            ]
            lp["token_logprobs"][0] = None
        if "stop_token" in on and choice.get("finish_reason") == "stop" and body.get("stop"):
            stop = body["stop"] if isinstance(body["stop"], str) else body["stop"][0]
            lp["tokens"].append(stop)
            lp["token_logprobs"].append(-1.0)
            lp["top_logprobs"].append({stop: -1.0})
            lp["text_offset"].append(len(choice["text"]))
        if "bytes" in on:
            lp["tokens"] = ["" if t.startswith("bytes:") else t for t in lp["tokens"]]


def llama_like(app: Any, faults: set[str] = ALL, **kwargs: Any) -> tuple[AsyncClient, LlamaLike]:
    transport = LlamaLike(app, faults)
    client = AsyncClient(
        "http://llamacpp.test/v1", model=MODEL, transport=httpx.MockTransport(transport), **kwargs
    )
    return client, transport


# -- the reference: our own server -----------------------------------------------------------------


def test_every_check_is_ok_on_the_embedded_server(embedded_client: Client) -> None:
    report = embedded_client.conformance(refresh=True)
    frame = report.frame
    assert frame.columns.tolist() == ["check", "status", "detail"]
    assert frame["check"].tolist() == list(CHECKS)
    # The embedded model cannot insert text: it refuses suffix openly (400, param suffix).
    expected = {**dict.fromkeys(CHECKS, "ok"), "suffix": "unsupported"}
    assert dict(zip(frame["check"], frame["status"], strict=True)) == expected
    assert "suffix" in report.checks["suffix"].detail
    assert report.ok
    assert report.profile.name == "nbcompletions"
    assert (report.context_length, report.vocab_size) == (256, 4096)
    assert report.requests <= 25
    # Evidence, not verdicts: the two numbers the echo check compared are in the detail.
    assert "generated" in report.checks["echo_alignment"].detail
    assert report.evidence("echo_alignment")["kind"] == "aligned"
    # Cached per client: asking again is the same report, and a sync call matches the async one.
    assert embedded_client.conformance() is report
    text = repr(report)
    assert "echo_alignment" in text
    assert "ok=True" in text
    html = report._repr_html_()
    assert html.count("<tr>") == len(CHECKS) + 1
    assert "all ok" in html


class InFlight(LlamaLike):
    """LlamaLike that notes, for each stream request, how many other completions were in flight
    when it was sent (its own answer's time counts for the non-stream ones only)."""

    def __init__(self, app: Any, faults: set[str]) -> None:
        super().__init__(app, faults)
        self.busy = 0
        self.streams: list[tuple[int | None, int]] = []  # (max_tokens, others in flight)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.url.path.endswith("/completions") else {}
        if body.get("stream"):
            self.streams.append((body.get("max_tokens"), self.busy))
            return await super().__call__(request)
        self.busy += 1
        try:
            return await super().__call__(request)
        finally:
            self.busy -= 1


@pytest.mark.parametrize(("owner", "together"), [("me", False), ("nbcompletions", True)])
async def test_streams_go_alone_unless_the_card_names_a_server_that_batches(
    app: Any, owner: str, together: bool
) -> None:
    transport = InFlight(app, faults=set() if together else {"models"})
    client = AsyncClient(
        "http://llamacpp.test/v1", model=MODEL, transport=httpx.MockTransport(transport)
    )
    try:
        report = await client.conformance()
    finally:
        await client.aclose()
    assert report.profile_name == ("nbcompletions" if together else "llamacpp")
    finish = report.evidence("stream_finish")
    assert finish["overlapped"] is True
    # max_tokens=0, echo in a stream, usage in a stream: the probes llama.cpp would cut short.
    probes = [others for max_tokens, others in transport.streams if max_tokens in (0, 1)]
    assert len(probes) == 3
    if together:  # everything at once: the stream probes go out beside the first round
        assert max(others for _, others in transport.streams) > 0
        assert finish["chunks"] <= 16  # short: its company is in flight from its first token
    else:  # llama.cpp cuts a stream when a request arrives: each goes out alone
        assert probes == [0, 0, 0], transport.streams


async def test_a_probe_that_could_not_reach_the_server_is_sent_once_more(app: Any) -> None:
    # A pooled connection the server closed as the probe went out (seen against vLLM with
    # max_retries=0: "ReadError"): no answer, so no verdict; the probe is sent again once.
    real = StreamingASGITransport(app)
    dropped: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        if body.get("n") == 2 and not dropped:
            dropped.append(body)
            raise httpx.ReadError("connection closed", request=request)
        return await real.handle_async_request(request)

    client = AsyncClient(
        "http://embedded/v1", model=MODEL, transport=httpx.MockTransport(handler), max_retries=0
    )
    try:
        report = await client.conformance()
    finally:
        await client.aclose()
    assert len(dropped) == 1
    assert report.status("n") == "ok", report.checks["n"].detail
    assert report.ok, report


@pytest.mark.slow
async def test_the_check_is_cached_per_client_and_sends_nothing_again(app: Any) -> None:
    client, transport = llama_like(app, faults=set())
    try:
        report = await client.conformance()
        sent = len(transport.bodies)
        assert sent == report.requests - 1  # all but GET /models are completions
        assert report.ok, report
        assert await client.conformance() is report
        assert len(transport.bodies) == sent
        again = await client.conformance(refresh=True)
        assert again is not report
        assert len(transport.bodies) == 2 * sent
    finally:
        await client.close()


def test_a_report_round_trips_through_its_dict(embedded_client: Client) -> None:
    report = embedded_client.conformance()
    data = json.loads(json.dumps(report.to_dict()))
    back = ConformanceReport.from_dict(data)
    assert back is not None
    assert back.to_dict() == report.to_dict()
    assert ConformanceReport.from_dict({"echo_logprobs": "honoured"}) is None  # an older note


# -- a llama.cpp-like endpoint: every deviation detected, with evidence ----------------------------


async def test_each_llamacpp_deviation_is_detected_with_evidence(app: Any) -> None:
    client, _ = llama_like(app)
    try:
        report = await client.conformance()
    finally:
        await client.close()
    status = {c.name: c.status for c in report.checks.values()}
    assert not report.ok
    assert report.profile.name == "llamacpp"
    echo = report.checks["echo_alignment"]
    assert echo.status == "fails"
    assert echo.evidence["kind"] == "shifted"
    assert "shifted by one" in echo.detail
    assert "generated" in echo.detail
    assert echo.evidence["found"] == pytest.approx(echo.evidence["generated"], abs=1e-4)
    assert status["max_tokens_0"] == "fails"
    assert "no limit" in report.checks["max_tokens_0"].detail
    assert status["n"] == "fails"
    assert report.evidence("n") == {"choices": 1}
    assert status["best_of"] == "fails"
    assert status["stream_echo"] == "fails"
    assert status["include_usage"] == "fails"
    assert status["stop_in_logprobs"] == "fails"
    assert "longer than the text" in report.checks["stop_in_logprobs"].detail
    assert status["multiple_prompts"] == "unsupported"
    assert "HTTP 500" in report.checks["multiple_prompts"].detail
    assert status["token_id_prompts"] == "unsupported"
    assert status["seed"] == "ok"
    assert status["default_sampling"] == "fails"
    assert "omitted fields do not mean" in report.checks["default_sampling"].detail
    assert status["byte_tokens"] == "fails"
    assert status["model_info"] == "unsupported"
    assert status["logprobs_cap"] == "ok"
    assert status["text_offset"] == "ok"


async def test_a_validation_500_is_answered_once_not_retried(app: Any) -> None:
    client, transport = llama_like(app, max_retries=2)
    try:
        report = await client.conformance()
    finally:
        await client.close()
    lists = [b for b in transport.bodies if isinstance(b.get("prompt"), list)]
    assert len(lists) == 2  # one list of strings, one of token ids: each sent once
    assert report.status("multiple_prompts") == "unsupported"


def test_the_validation_rule() -> None:
    pydantic = "[{'type': 'string_type', 'loc': ('body', 'prompt'), 'msg': 'Input should be'}]"
    fastapi = "1 validation error:\n  {'type': 'missing', 'loc': ('body', 'prompt')}"
    for message in (pydantic, fastapi, "Field required"):
        assert is_validation_error(message, {"error": {"message": message}})
    assert is_validation_error("", {"error": {"message": "", "type": "internal_server_error"}})
    # Outages are still retried: an HTML page, a plain crash message, no JSON error at all.
    assert not is_validation_error("<html>502</html>", "<html>502</html>")
    assert not is_validation_error(
        "CUDA out of memory", {"error": {"message": "CUDA out of memory"}}
    )
    assert not is_validation_error("", None)
    from nbcompletions._retry import error_from_body

    error = error_from_body({"error": {"message": fastapi}}, status=500)
    assert should_retry(500, {}, error) is False
    assert should_retry(500, {}, error_from_body({"error": {"message": "boom"}}, status=500))
    assert should_retry(500, {"x-should-retry": "true"}, error) is True


# -- consequences: score() and sweeps --------------------------------------------------------------


async def test_score_without_max_tokens_0_uses_one_token_and_is_right(
    app: Any, embedded_client: Client
) -> None:
    texts = ["To be, or not to be, that is the question:", "My lord, I"]
    expected = embedded_client.score(texts)
    client, transport = llama_like(app, faults={"max_tokens_0"})
    try:
        report = await client.conformance()
        assert report.status("max_tokens_0") == "fails"
        assert report.status("echo_alignment") == "ok"
        before = len(transport.bodies)
        got = await client.score(texts)
    finally:
        await client.close()
    scoring = transport.bodies[before:]
    assert [b["max_tokens"] for b in scoring] == [1, 1]  # never 0 here
    # Not bit-identical: the engine batches the two requests differently (BLAS picks kernels by
    # batch size), so float32 rounding differs; the bar is 1e-3.
    assert got["sum_logprob"].tolist() == pytest.approx(expected["sum_logprob"].tolist(), abs=1e-4)
    assert got["n_tokens"].tolist() == expected["n_tokens"].tolist()


def test_a_sweep_over_an_ignored_axis_is_refused_before_spending(app: Any) -> None:
    client, transport = llama_like(app)  # sweep() runs an AsyncClient on its own loop
    with pytest.raises(ConformanceError, match="'n'") as info:
        sweep(client, "To be", n=[1, 2], max_tokens=2, progress=False)
    assert "nothing was sent" in str(info.value)
    report = ConformanceReport.from_dict(json.loads(json.dumps(aclient_report(client))))
    assert report is not None
    assert len(transport.bodies) == report.requests - 1  # only the probes
    # probe=False sends anyway, knowingly.
    result = sweep(client, "To be", n=[1, 2], max_tokens=2, progress=False, probe=False)
    assert len(result.requests) == 2


def aclient_report(aclient: AsyncClient) -> dict[str, Any]:
    from nbcompletions._conformance import cached_report

    report = cached_report(aclient)
    assert report is not None
    return report.to_dict()


def test_check_sweep_names_each_ignored_field(embedded_client: Client) -> None:
    ok = embedded_client.conformance()
    requests = [
        CompletionRequest(prompt="a", n=2, best_of=3),
        CompletionRequest(prompt="a", stream=True, echo=True),
        CompletionRequest(prompt="a", presence_penalty=1.0),
    ]
    assert check_sweep(ok, requests) == []
    data = ok.to_dict()
    for name in ("n", "best_of", "stream_echo", "penalties"):
        data["checks"][name]["status"] = "fails"
    data["checks"]["default_sampling"]["status"] = "fails"
    data["profile"] = "llamacpp"
    bad = ConformanceReport.from_dict(data)
    assert bad is not None
    problems = check_sweep(bad, requests)
    text = "\n".join(problems)
    for name in ("'n'", "'best_of'", "'stream_echo'", "'penalties'", "repeat_penalty"):
        assert name in text
    # Requests that carry the neutral fields and greedy requests raise nothing about defaults.
    fixed = [CompletionRequest(prompt="a", temperature=0.0)]
    neutral = [CompletionRequest(prompt="a", extra=dict(bad.profile.neutral_fields))]
    assert check_sweep(bad, fixed) == []
    assert check_sweep(bad, neutral) == []


def test_byte_tokens_decode() -> None:
    assert token_bytes("bytes:\\xc3\\xbc") == "ü".encode()
    assert token_bytes("caf") == b"caf"
    assert token_bytes("bytes:nothex") == b"bytes:nothex"


# -- what the check sends ------------------------------------------------------------------------


class Counting:
    """Forwards every request to the real app unchanged and counts them by method and path."""

    def __init__(self, app: Any) -> None:
        self.real = StreamingASGITransport(app)
        self.sent: list[tuple[str, str]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        return await self.real.handle_async_request(request)


async def test_without_a_model_the_check_asks_get_models_once(app: Any) -> None:
    counting = Counting(app)
    client = AsyncClient("http://ours.test/v1", transport=httpx.MockTransport(counting))
    try:
        report = await client.conformance()
        assert counting.sent.count(("GET", "/v1/models")) == 1, counting.sent
        assert len(counting.sent) == report.requests <= 25
        assert report.model == MODEL
        assert report.status("model_info") == "ok"
        # The client's own first request finds the model later; the report is still the cached one.
        await client.complete("To be", max_tokens=1)
        assert await client.conformance() is report
    finally:
        await client.close()


class LlamaServerLike:
    """ggml's llama-server in front of the real app (fault injection, from its source and the
    measurements in COMPAT.md): its model card, echo ignored, chat-shaped logprobs with bytes."""

    def __init__(self, app: Any) -> None:
        self.real = StreamingASGITransport(app)

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/models"):
            meta = {"vocab_type": 2, "n_vocab": 4096, "n_ctx": 256, "n_ctx_train": 256}
            card = {"id": MODEL, "object": "model", "owned_by": "llamacpp", "meta": meta}
            return httpx.Response(200, json={"object": "list", "data": [card]})
        if not request.url.path.endswith("/completions"):
            return await self.real.handle_async_request(request)
        body = json.loads(request.content)
        body.pop("echo", None)
        for own in ("top_k", "min_p", "repeat_penalty"):  # its own samplers, set neutral
            body.pop(own, None)
        forwarded = httpx.Request(
            request.method, request.url, headers=request.headers, content=json.dumps(body)
        )
        response = await self.real.handle_async_request(forwarded)
        if body.get("stream"):
            return response
        await response.aread()
        data = json.loads(response.content)
        for choice in data.get("choices", []):
            lp = choice.get("logprobs")
            if isinstance(lp, dict):
                choice["logprobs"] = {"content": chat_shaped(lp)}
        return httpx.Response(response.status_code, json=data)


def chat_shaped(lp: dict[str, Any]) -> list[dict[str, Any]]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token_bytes(token))}

    return [
        {**entry(t, x), "top_logprobs": [entry(k, v) for k, v in (top or {}).items()]}
        for t, x, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True)
    ]


async def test_a_llama_server_like_endpoint_is_told_apart_by_its_card_and_echo(app: Any) -> None:
    client = AsyncClient(
        "http://llama-server.test/v1", transport=httpx.MockTransport(LlamaServerLike(app))
    )
    try:
        report = await client.conformance()
    finally:
        await client.close()
    assert report.profile.name == "llama-server"
    assert report.requests <= 25
    echo = report.checks["echo_alignment"]
    assert (echo.status, echo.evidence["kind"]) == ("fails", "ignored")
    assert not echo.evidence["text"].startswith("To be")
    assert report.evidence("echo_generated") == {"missing_last": None, "echo_ignored": True}
    byte_tokens = report.checks["byte_tokens"]
    assert (byte_tokens.status, byte_tokens.evidence["bytes_field"]) == ("unsupported", True)
    assert report.evidence("context_length") == {"context_length": 256, "source": "card"}
    assert (report.context_length, report.vocab_size) == (256, 4096)
    # The chat shape is read: generated logprobs, penalties and sampling are judged as on ours.
    for name in ("logprobs_cap", "penalty_window", "sampler_order", "end_of_text"):
        assert report.status(name) == "ok", report.checks[name]
