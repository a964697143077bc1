"""The conformance check against a real vLLM server (CPU build 0.32.0) serving our model.

Uses the ``vllm_server`` fixture (tests/peers/vllm.py; started once a session, about 2 minutes;
skips without vLLM's venv). Each deviation issue 16 lists for vLLM is asserted with the evidence
the check recorded, and every check it passes is asserted ok: our server is the all-ok reference
(tests/test_conformance.py), llama-cpp-python the other peer (tests/test_llamacpp_conformance.py).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from peers.vllm import VllmServer

from nbcompletions import Client, ConformanceReport

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEVIATIONS = {"best_of", "stop_in_logprobs", "text_offset", "max_tokens_0", "suffix"}


class Counting(httpx.AsyncHTTPTransport):
    """The real HTTP transport, counting what goes out."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append(f"{request.method} {request.url.path}")
        return await super().handle_async_request(request)


@pytest.fixture(scope="module")
def counted(vllm_server: VllmServer) -> Iterator[tuple[ConformanceReport, list[str]]]:
    transport = Counting()
    # No model named: the check asks GET /models once and names the model itself.
    client = Client(vllm_server.base_url, transport=transport, max_retries=0)
    try:
        report = client.conformance()
        print(f"\nvLLM conformance: {report.requests} requests, {report.seconds:.2f} s\n{report!r}")
        yield report, transport.sent
    finally:
        client.close()


@pytest.fixture(scope="module")
def report(counted: tuple[ConformanceReport, list[str]]) -> ConformanceReport:
    return counted[0]


def test_it_is_detected_as_vllm_in_at_most_25_requests(
    counted: tuple[ConformanceReport, list[str]],
) -> None:
    report, sent = counted
    assert report.profile.name == "vllm"
    assert len(sent) == report.requests <= 25
    assert sent.count("GET /v1/models") == 1


def test_every_other_check_is_ok(report: ConformanceReport) -> None:
    others = {name: c.status for name, c in report.checks.items() if name not in DEVIATIONS}
    assert others == dict.fromkeys(others, "ok")


def test_best_of_is_ignored(report: ConformanceReport) -> None:
    check = report.checks["best_of"]
    assert check.status == "fails"
    assert check.evidence == {"choices": 1, "completion_tokens": 2}  # one candidate, not three


def test_the_stop_token_stays_in_the_logprobs(report: ConformanceReport) -> None:
    check = report.checks["stop_in_logprobs"]
    assert check.status == "fails"
    assert "".join(check.evidence["tokens"]).startswith(check.evidence["text"])
    assert len("".join(check.evidence["tokens"])) > len(check.evidence["text"])


def test_generated_text_offset_counts_from_0(report: ConformanceReport) -> None:
    assert report.evidence("text_offset") == {"origin": "completion"}


def test_max_tokens_0_and_an_echoed_suffix_are_refused_400(report: ConformanceReport) -> None:
    check = report.checks["max_tokens_0"]
    assert (check.status, check.evidence["http"]) == ("unsupported", 400)
    assert "must be at least 1" in check.detail
    assert report.evidence("suffix")["http"] == 400


def test_context_from_the_card_vocabulary_from_our_tokenizer(report: ConformanceReport) -> None:
    assert report.evidence("context_length") == {"context_length": 256, "source": "card"}
    # GET /v1/models has max_model_len but no vocabulary size.
    assert "tokenizer" in report.checks["model_info"].detail
    assert (report.context_length, report.vocab_size) == (256, 4096)


def test_the_new_checks_see_openai_behaviour_with_evidence(report: ConformanceReport) -> None:
    assert report.evidence("penalty_window")["window_tokens"] is None
    order = report.evidence("sampler_order")
    assert (order["order"], order["outside"] > 0) == ("temperature_first", True)
    assert report.evidence("end_of_text")["in_logprobs"] is True
    assert report.evidence("end_of_text")["in_usage"] is True
    assert report.evidence("echo_generated")["missing_last"] is False
    assert report.evidence("stream_finish")["finish_reason"] == "length"
    # A character's first byte token is '' and the next carries the whole character.
    assert report.evidence("byte_tokens")["empty_tokens"] is True
