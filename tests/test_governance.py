"""One place decides (`nbcompletions._governance`): every request path sends as is, corrects,
refuses or flags as the endpoint's measured report says, measured once, lazily.

The endpoint is our real server behind `LlamaLike` (tests/test_conformance.py), which injects
llama-cpp-python's measured deviations; tests/test_llamacpp_governance.py does the same against
the real llama-cpp-python server.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import httpx
import pytest
from test_conformance import ALL, MODEL, LlamaLike

import nbcompletions as nbc
from nbcompletions import AsyncClient, ConformanceError, ConformanceWarning
from nbcompletions._conformance_report import Check, ConformanceReport
from nbcompletions._governance import (
    decide,
    depends_on_report,
    load_report,
    report_directory,
    store_report,
    unlisted_tokens,
)
from nbcompletions._request import CompletionRequest

PROMPT = "To be, or not to be, that is the question:"
#: What llama-cpp-python takes and our server refuses: the transport strips them, and records them.
NEUTRAL = ("top_k", "min_p", "repeat_penalty")


class Recording:
    """`LlamaLike` in front of our app, taking llama.cpp's own sampling fields as llama.cpp does
    (recorded in ``sent``, not forwarded: our server would refuse them)."""

    def __init__(self, app: Any, faults: set[str] = ALL) -> None:
        self.llama = LlamaLike(app, faults)
        self.sent: list[dict[str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions"):
            body = json.loads(request.content)
            self.sent.append(dict(body))
            for name in NEUTRAL:
                body.pop(name, None)
            request = httpx.Request(
                request.method, request.url, headers=request.headers, content=json.dumps(body)
            )
        return await self.llama(request)


def governed(
    app: Any, faults: set[str] = ALL, url: str = "http://llamacpp.test/v1", **kwargs: Any
) -> tuple[AsyncClient, Recording]:
    transport = Recording(app, faults)
    # An injected transport is not measured by default: verify=True asks for it.
    client = AsyncClient(
        url, model=MODEL, transport=httpx.MockTransport(transport), verify=True, **kwargs
    )
    return client, transport


# -- the decision, a pure function of the report --------------------------------------------------


def report_with(*checks: Check, context_length: int | None = None) -> ConformanceReport:
    return ConformanceReport(
        list(checks),
        endpoint="http://server.test/v1",
        model=MODEL,
        requests=19,
        seconds=1.0,
        profile_name="llamacpp",
        context_length=context_length,
    )


def test_no_report_sends_as_is() -> None:
    request = CompletionRequest(prompt="a", echo=True, logprobs=1, n=2)
    decision = decide(None, request)
    assert (decision.action, decision.request) == ("send", request)


def test_a_check_that_errored_refuses_what_depends_on_it_with_the_error() -> None:
    # ggml's llama-server ignores echo: the echo check errors, and score()/complete() refuse.
    report = report_with(
        Check("echo_alignment", "error", "the echo did not tokenize ...", {"kind": "unknown"})
    )
    request = CompletionRequest(prompt="To be", echo=True, logprobs=1, max_tokens=0)
    for path in ("complete", "score", "sweep-live"):
        decision = decide(report, request, path=path)
        assert decision.action == "refuse"
        assert decision.error is not None
        assert decision.error.check == "echo_alignment"
        assert "did not tokenize" in str(decision.error)
        assert f"{path}() refuses" in str(decision.error)
    # What does not depend on it goes out.
    assert decide(report, CompletionRequest(prompt="To be", max_tokens=2)).error is None


def test_an_inconclusive_penalty_window_refuses_penalised_requests() -> None:
    # ggml's llama-server: no window of the generated tokens explains its penalised greedy
    # choices (penalty_window errors), and its text differs from ours from token 2 on.
    report = report_with(
        Check("penalties", "ok", "penalties changed the greedy text"),
        Check("penalty_window", "error", "inconclusive: greedy step 4 ...", {"steps": 96}),
    )
    penalised = CompletionRequest(prompt="My lord, I", frequency_penalty=0.5, max_tokens=8)
    error = decide(report, penalised).error
    assert error is not None
    assert error.check == "penalty_window"
    assert "inconclusive" in str(error)
    assert decide(report, CompletionRequest(prompt="My lord, I", max_tokens=8)).error is None


def test_generated_tokens_left_out_of_the_logprobs_are_counted() -> None:
    # ggml's llama-server: 4 generated, one chat-shaped entry ("é" over two byte tokens).
    entry = {"id": 103, "token": "é", "bytes": [195, 169], "logprob": -12.4}
    raw = {
        "choices": [{"logprobs": {"content": [entry]}, "finish_reason": "length"}],
        "usage": {"completion_tokens": 4},
    }
    asked = CompletionRequest(prompt="caf", logprobs=2, max_tokens=4)
    assert unlisted_tokens(raw, asked) == 3
    assert unlisted_tokens(raw, CompletionRequest(prompt="caf", max_tokens=4)) == 0
    # A stop token the server dropped is not lost: 2 generated, 1 listed, stopped.
    stopped = {
        "choices": [{"logprobs": {"content": [entry]}, "finish_reason": "stop"}],
        "usage": {"completion_tokens": 2},
    }
    assert unlisted_tokens(stopped, CompletionRequest(prompt="a", logprobs=1, stop=",")) == 0
    assert unlisted_tokens(stopped, CompletionRequest(prompt="a", logprobs=1)) == 1
    # A stop string of two tokens ("\n", "\n"), both counted and neither listed: not flagged.
    two = {**stopped, "usage": {"completion_tokens": 3}}
    assert unlisted_tokens(two, CompletionRequest(prompt="a", logprobs=1, stop="\n\n")) == 0


def test_the_context_bound_refuses_before_any_server_can_crash() -> None:
    report = report_with(context_length=256)
    short = CompletionRequest(prompt="To be", max_tokens=16)
    assert decide(report, short).error is None  # 5 bytes + 16 <= 256: no counting needed
    past = CompletionRequest(prompt="To be", max_tokens=300)
    error = decide(report, past).error
    assert error is not None
    assert error.check == "context_length"
    assert "max_tokens=300" in str(error)
    assert "256" in str(error)
    long_prompt = CompletionRequest(prompt="word " * 100, max_tokens=200)
    # 500 bytes may be past the context: counted when the server can count...
    assert decide(report, long_prompt, prompt_tokens=101).error is not None
    assert decide(report, long_prompt, prompt_tokens=40).action == "correct"  # neutral fields
    # ...flagged where it cannot.
    assert "context_length" in decide(report, long_prompt).flags


def test_which_requests_trigger_measuring() -> None:
    assert not depends_on_report(CompletionRequest(prompt="a", max_tokens=5))
    assert not depends_on_report(CompletionRequest(prompt="a", temperature=0.7, max_tokens=5))
    for fields in (
        {"echo": True},
        {"stop": "\n", "logprobs": 1},
        {"n": 2},
        {"best_of": 2},
        {"temperature": 0.0},
        {"max_tokens": 0},
        {"max_tokens": 300},
        {"presence_penalty": 1.0},
        {"top_p": 0.5, "temperature": 1.5},
    ):
        assert depends_on_report(CompletionRequest(prompt="a", **fields)), fields


def test_reports_are_kept_on_disk_by_endpoint_and_model(tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("NBCOMPLETIONS_CACHE_DIR", str(tmp_path))
    report = report_with(Check("n", "fails", "n=2 gave 1 choice(s)", {"choices": 1}))
    store_report(report)
    assert report_directory() == tmp_path / "conformance"
    back = load_report("http://server.test/v1", MODEL)
    assert back is not None
    assert back.to_dict() == report.to_dict()
    assert load_report("http://server.test/v1", "another-model") is None
    assert load_report("http://other.test/v1", MODEL) is None


# -- through the client: complete(), stream(), score(), sweeps ----------------------------------


async def test_a_plain_request_sends_without_measuring(app: Any) -> None:
    client, transport = governed(app)
    async with client:
        await client.complete(PROMPT, max_tokens=2, temperature=0.7)
    assert len(transport.sent) == 1  # no probes: nothing in it depends on the report


async def test_the_first_dependent_request_measures_once_then_each_is_decided(app: Any) -> None:
    client, transport = governed(app, url="http://once.test/v1")
    async with client:
        # Greedy from a plain client: the detected profile's neutral fields go with it.
        greedy = await client.complete(PROMPT, max_tokens=4, temperature=0.0)
        report = await client.conformance()
        probes = report.requests - 1  # GET /models is not a completion
        assert len(transport.sent) == probes + 1
        sent = transport.sent[-1]
        assert (sent["top_k"], sent["min_p"], sent["repeat_penalty"]) == (0, 0.0, 1.0)
        assert greedy.flags == ()
        # n, best_of, echo + stream in one complete(): refused, nothing sent (issue case 14).
        for fields, check in (
            ({"n": 2}, "n"),
            ({"best_of": 3}, "best_of"),
            ({"echo": True, "stream": True}, "stream_echo"),
            ({"max_tokens": 0}, "max_tokens_0"),  # without echo: nothing to ask for (case 10)
        ):
            with pytest.raises(ConformanceError) as info:
                await client.complete(PROMPT, **fields)
            assert info.value.check == check, fields
        with pytest.raises(ConformanceError, match="stream_echo"):
            async for _ in client.stream(PROMPT, echo=True, max_tokens=2):
                pass
        assert len(transport.sent) == probes + 1  # none of them was sent
    assert (await client.conformance()).requests == report.requests  # measured once


async def test_a_flag_warns_once_and_travels_with_the_frames(app: Any) -> None:
    # Byte tokens read back as "" (case 13) cannot be corrected from this answer: flagged.
    client, _ = governed(app, faults=ALL - {"echo_shift"}, url="http://flags.test/v1")
    text = "Grüße, café"
    async with client:
        await client.conformance()
        with pytest.warns(ConformanceWarning, match="byte_tokens"):
            first = await client.complete(text, echo=True, logprobs=1, max_tokens=1)
        assert first.flags == ("byte_tokens",)
        for frame in first.frames():
            assert frame.attrs["conformance_flags"] == ["byte_tokens"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per endpoint and check
            again = await client.complete(text, echo=True, logprobs=1, max_tokens=1)
            clean = await client.complete(PROMPT, max_tokens=2, logprobs=1)
        assert again.flags == ("byte_tokens",)
        assert clean.flags == ()
        assert "conformance_flags" not in clean.tokens.attrs


async def test_a_kept_stop_token_is_dropped_from_the_answer(
    app: Any, embedded_client: nbc.Client
) -> None:
    # Issue case 4: the stop token stays in the logprobs there; corrected to our server's answer.
    client, _ = governed(app, url="http://stop.test/v1")
    fields: dict[str, Any] = {"max_tokens": 12, "temperature": 0.0, "logprobs": 1, "stop": ","}
    async with client:
        await client.conformance()
        got = await client.complete(PROMPT, **fields)
    truth = embedded_client.complete(PROMPT, **fields)
    assert got.flags == ()
    assert got.tokens["token"].tolist() == truth.tokens["token"].tolist()
    assert got.tokens["logprob"].sum() == pytest.approx(truth.tokens["logprob"].sum(), abs=1e-3)


async def test_max_tokens_0_with_echo_is_sent_as_1_and_the_token_dropped(
    app: Any, embedded_client: nbc.Client
) -> None:
    # The max_tokens_1 approach (lm-evaluation-harness), never "until the context is full".
    client, transport = governed(app, faults=ALL - {"echo_shift"}, url="http://max0.test/v1")
    async with client:
        await client.conformance()
        got = await client.complete(PROMPT, echo=True, logprobs=1, max_tokens=0)
    assert transport.sent[-1]["max_tokens"] == 1
    truth = embedded_client.complete(PROMPT, echo=True, logprobs=1, max_tokens=0)
    assert got.text == truth.text == PROMPT
    assert got.tokens["token"].tolist() == truth.tokens["token"].tolist()
    assert got.tokens["logprob"].tolist()[1:] == pytest.approx(
        truth.tokens["logprob"].tolist()[1:], abs=1e-4
    )


async def test_verify_false_sends_everything_as_is(app: Any) -> None:
    transport = Recording(app)
    client = AsyncClient(
        "http://asis.test/v1", model=MODEL, transport=httpx.MockTransport(transport), verify=False
    )
    async with client:
        got = await client.complete(PROMPT, n=2, max_tokens=1, temperature=0.0)
    assert len(transport.sent) == 1
    assert "top_k" not in transport.sent[0]
    assert len(got.texts) == 1  # the server ignored n: the user asked for it as is
    assert client.measures is False
    assert client.verify is False


def test_verify_is_checked_and_decided_from_the_endpoint() -> None:
    with pytest.raises(nbc.RequestError, match="verify must be True, False or None"):
        nbc.Client("http://localhost:1/v1", verify="yes")  # type: ignore[arg-type]
    assert nbc.Client("http://localhost:1/v1").measures is True
    assert nbc.Client("https://api.openai.com/v1", api_key="sk-test").measures is False
    assert nbc.Client("https://api.openai.com/v1", api_key="sk-test", verify=True).measures


def test_a_live_sweep_sends_the_neutral_fields_and_refuses_what_it_must(app: Any) -> None:
    client, transport = governed(app, url="http://sweep.test/v1")
    with pytest.raises(ConformanceError, match="'n'"):
        nbc.sweep(client, PROMPT, n=[1, 2], max_tokens=2, progress=False)
    before = len(transport.sent)
    result = nbc.sweep(client, PROMPT, temperature=[0.0], max_tokens=2, progress=False)
    assert result.n_failed == 0
    assert len(transport.sent) == before + 1
    assert transport.sent[-1]["repeat_penalty"] == 1.0  # issue case 2, corrected


async def test_a_natural_end_is_flagged_where_the_end_of_text_goes_missing() -> None:
    # Issue case 9: there a generated end-of-text is missing from the logprobs and from usage.
    from nbcompletions._governance import agovern_answer

    evidence = {"in_logprobs": False, "in_usage": False}
    report = report_with(Check("end_of_text", "fails", "no end-of-text token listed", evidence))
    request = CompletionRequest(prompt="a", max_tokens=5, logprobs=1)
    decision = decide(report, request)

    def answer(finish: str) -> nbc.Completion:
        choice = {"text": "b", "index": 0, "finish_reason": finish, "logprobs": None}
        return nbc.Completion({"choices": [choice]}, request)

    no_client: Any = None  # nothing to correct: the client is not used
    with pytest.warns(ConformanceWarning, match="end_of_text"):
        ended = await agovern_answer(no_client, decision, answer("stop"))
    assert ended.flags == ("end_of_text",)
    assert (await agovern_answer(no_client, decision, answer("length"))).flags == ()
