"""The conformance check's detection logic, fed llama.cpp's own recorded bytes (no peer needed).

``check/conformance.json`` holds every exchange of one check against llama-cpp-python 0.3.36
(recorded by tests/peers/record_conformance.py); the other fixtures in tests/fixtures/llamacpp/ are
single requests (tests/peers/record_llamacpp.py). An `httpx.MockTransport` serves them back keyed
by the request (method, path, body), which is fault injection with a foreign server's exact
answers; tests/test_llamacpp_conformance.py runs the same against the live server.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from nbcompletions import APIError, Client, ConformanceError, RequestError, sweep
from nbcompletions._conformance import CHECKS, score_max_tokens
from nbcompletions._grid import expand_grid

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "llamacpp"
BASE = "http://llamacpp.test/v1"
MODEL = "nbc-shakespeare"

Key = tuple[str, str, str]
Answer = tuple[int, str, str]  # status, content type, body text


def key(method: str, path: str, body: Any) -> Key:
    return (method, path, json.dumps(body, sort_keys=True))


def fixture(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text(encoding="utf-8"))
    return data


def recorded_check() -> dict[Key, Answer]:
    exchanges = fixture("check/conformance")["exchanges"]
    return {
        key(e["method"], e["path"], e["request"]): (e["status"], e["content_type"], e["body"])
        for e in exchanges
    }


def single(name: str) -> Answer:
    """A single-request fixture as the bytes the server sent."""
    data = fixture(name)
    response = data["response"]
    if isinstance(response, Mapping) and "sse" in response:
        return data["status"], data["headers"]["content-type"], response["sse"]
    return data["status"], data["headers"]["content-type"], json.dumps(response)


class Replay:
    """Serves recorded answers by request; a request without one fails the test loudly."""

    def __init__(self, answers: Mapping[Key, Answer]) -> None:
        self.answers = dict(answers)
        self.sent: list[Key] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        found = key(request.method, request.url.path, body)
        self.sent.append(found)
        if found not in self.answers:
            pytest.fail(
                f"no recording for {found}: record again (tests/peers/record_conformance.py)"
            )
        status, content_type, text = self.answers[found]
        return httpx.Response(status, headers={"content-type": content_type}, content=text)

    def completions(self) -> int:
        return sum(1 for k in self.sent if k[1].endswith("/completions"))

    def override(self, match: Callable[[dict[str, Any]], bool], answer: Answer) -> None:
        """Answer every recorded completion request that ``match``es with ``answer`` instead."""
        for k in list(self.answers):
            if k[1].endswith("/completions") and match(json.loads(k[2])):
                self.answers[k] = answer


def client(replay: Replay, **kwargs: Any) -> Client:
    kwargs.setdefault("max_retries", 0)
    return Client(BASE, model=MODEL, transport=httpx.MockTransport(replay), **kwargs)


def is_max0(body: dict[str, Any]) -> bool:
    return body.get("max_tokens") == 0


def test_the_replayed_check_reports_every_deviation() -> None:
    replay = Replay(recorded_check())
    with client(replay) as c:
        report = c.conformance()
    assert report.requests == len(replay.sent) == 23
    statuses = {name: report.status(name) for name in CHECKS}
    assert statuses == {
        "echo_alignment": "fails",
        "max_tokens_0": "fails",
        "n": "fails",
        "best_of": "fails",
        "stream_echo": "fails",
        "include_usage": "fails",
        "logprobs_cap": "ok",
        "stop_in_logprobs": "fails",
        "multiple_prompts": "unsupported",
        "token_id_prompts": "unsupported",
        "seed": "ok",
        "default_sampling": "fails",
        "penalties": "ok",
        "text_offset": "ok",
        "byte_tokens": "fails",
        "suffix": "fails",
        "penalty_window": "fails",
        "sampler_order": "fails",
        "end_of_text": "fails",
        "echo_generated": "fails",
        "context_length": "fails",
        "stream_finish": "fails",
        "model_info": "unsupported",
    }
    assert report.profile.name == "llamacpp"
    # No context in the card and max_tokens past it accepted: the model's trained positions.
    assert (report.context_length, report.vocab_size) == (256, 4096)
    assert report.evidence("context_length")["source"] == "model"
    assert report.evidence("penalty_window")["window_tokens"] == 64
    assert report.evidence("sampler_order")["order"] == "top_p_first"
    eot = report.evidence("end_of_text")
    assert (eot["in_logprobs"], eot["in_usage"]) == (False, False)
    assert report.evidence("echo_generated")["missing_last"] is True
    assert report.evidence("stream_finish")["finish_reason"] is None
    assert report.evidence("byte_tokens")["empty_tokens"] is True
    echo = report.evidence("echo_alignment")
    assert (echo["kind"], echo["shift"]) == ("shifted", -1)
    assert echo["found"] == pytest.approx(echo["generated"], abs=0.02)
    assert report.evidence("max_tokens_0")["finish_reason"] == "stop"
    assert report.evidence("n")["choices"] == 1
    assert report.evidence("best_of")["completion_tokens"] == 2
    assert report.evidence("include_usage")["usage"] is None
    assert "" in report.evidence("byte_tokens")["tokens"]
    assert " end" in report.evidence("suffix")["tokens"]
    assert report.evidence("multiple_prompts")["http"] == 500
    # And what follows: score() refuses (a shifted echo has no right numbers), naming the check.
    with pytest.raises(ConformanceError) as info:
        score_max_tokens(report)
    assert info.value.check == "echo_alignment"


def test_score_is_corrected_and_an_n_sweep_refused_before_spending() -> None:
    from nbcompletions._governance import decide
    from nbcompletions._request import CompletionRequest

    replay = Replay(recorded_check())
    with client(replay) as c:
        report = c.conformance()
        probes = len(replay.sent)
        # A shifted echo is realigned from the whole distribution (tests/test_llamacpp_governance.py
        # scores against the live peer): sent with logprobs = the vocabulary, max_tokens=1.
        scoring = CompletionRequest(prompt="To be", echo=True, logprobs=1, max_tokens=0)
        decision = decide(report, scoring, path="score")
        assert decision.action == "correct"
        assert decision.fixes == ("unshift_echo", "drop_generated")
        assert (decision.request.logprobs, decision.request.max_tokens) == (4096, 1)
        with pytest.raises(ConformanceError, match="'n'"):
            sweep(c, "To be", n=[1, 2], max_tokens=2, progress=False)
        assert len(replay.sent) == probes


def test_max_tokens_0_answered_with_text_without_streaming_fails() -> None:
    # llama.cpp's recorded non-stream answer to max_tokens=0 (243 tokens, the context filled),
    # served to the probe's stream request: a server that ignores stream=True.
    replay = Replay(recorded_check())
    replay.override(is_max0, single("max_tokens_zero"))
    with client(replay) as c:
        check = c.conformance().checks["max_tokens_0"]
    assert check.status == "fails"
    assert check.evidence["text"].startswith("To be, or not to be")


def test_max_tokens_0_cut_short_is_inconclusive_not_ok() -> None:
    # What llama.cpp sends when another request arrives mid-stream: an empty chunk, then [DONE]
    # with no finish_reason. Read as "honoured" before: nothing proves that.
    status, content_type, sse = single("stream_echo")
    first = sse.split("\n\n")[0].replace('"\\n"', '""')
    replay = Replay(recorded_check())
    replay.override(is_max0, (status, content_type, f"{first}\n\ndata: [DONE]\n\n"))
    with client(replay) as c:
        check = c.conformance().checks["max_tokens_0"]
    assert check.status == "error"
    assert "inconclusive" in check.detail
    assert check.evidence["finish_reason"] is None


def test_max_tokens_0_honoured_needs_finish_reason_length() -> None:
    honoured = (
        'data: {"object": "text_completion", "choices": [{"text": "", "index": 0, '
        '"logprobs": null, "finish_reason": "length"}]}\n\ndata: [DONE]\n\n'
    )
    replay = Replay(recorded_check())
    replay.override(is_max0, (200, "text/event-stream", honoured))
    with client(replay) as c:
        report = c.conformance()
    assert report.status("max_tokens_0") == "ok"
    assert report.evidence("max_tokens_0")["finish_reason"] == "length"


def test_a_cut_stream_echo_is_inconclusive() -> None:
    status, content_type, sse = single("stream_echo")
    first = sse.split("\n\n")[0]
    replay = Replay(recorded_check())
    replay.override(
        lambda b: bool(b.get("stream") and b.get("echo")),
        (status, content_type, f"{first}\n\ndata: [DONE]\n\n"),
    )
    with client(replay) as c:
        check = c.conformance().checks["stream_echo"]
    assert check.status == "error"


@pytest.mark.parametrize("name", ["list_of_two_prompts", "token_id_prompt"])
def test_its_validation_500s_are_not_retried(name: str) -> None:
    recorded = fixture(name)
    replay = Replay({key("POST", "/v1/completions", recorded["request"]): single(name)})
    with client(replay, max_retries=2) as c, pytest.raises(APIError) as info:
        c.complete_request(c.build_request(recorded["request"]["prompt"], **_fields(recorded)))
    assert info.value.status == 500
    assert replay.completions() == 1


def _fields(recorded: Mapping[str, Any]) -> dict[str, Any]:
    body = dict(recorded["request"])
    body.pop("prompt")
    body.pop("model")
    standard = {k: v for k, v in body.items() if k not in ("top_k", "min_p", "repeat_penalty")}
    extra = {k: v for k, v in body.items() if k in ("top_k", "min_p", "repeat_penalty")}
    return {**standard, "extra": extra} if extra else standard


def test_the_llamacpp_profile_refuses_suffix_before_sending() -> None:
    replay = Replay({})
    with client(replay, profile="llamacpp") as c, pytest.raises(RequestError) as info:
        c.complete("To be", suffix=" the end", max_tokens=1)
    assert info.value.param == "suffix"
    assert "splices" in str(info.value)
    assert replay.sent == []


def test_a_sweep_grid_carries_the_profiles_neutral_fields() -> None:
    with client(Replay({}), profile="llamacpp") as c:
        grid = expand_grid(c, "To be", temperature=[0.5, 1.0], max_tokens=2)
    bodies = [p.request.to_body() for p in grid.points]
    assert [b["temperature"] for b in bodies] == [0.5, 1.0]
    assert all(
        (b["top_p"], b["top_k"], b["min_p"], b["repeat_penalty"]) == (1, 0, 0, 1) for b in bodies
    )


def test_frames_take_the_vocabulary_size_the_check_found() -> None:
    replay = Replay(recorded_check())
    recorded = fixture("greedy_logprobs")
    replay.answers[key("POST", "/v1/completions", recorded["request"])] = single("greedy_logprobs")
    with client(replay) as c:
        c.conformance()
        # As recorded (complete_request would add the detected profile's neutral fields).
        completion = c.complete_as_is(
            c.build_request(recorded["request"]["prompt"], **_fields(recorded))
        )
    assert completion.tokens.attrs["vocab_size"] == 4096
