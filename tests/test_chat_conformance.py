"""chat_conformance() on our server (both compat modes), and each check failing on a server made
to misbehave: httpx.MockTransport rewrites the real app's answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from helpers import mock_client

import nbcompletions as nbc
from nbcompletions._chat_conformance import CHAT_CHECKS
from nbcompletions.server import StreamingASGITransport, create_app

MODEL = "nbc-shakespeare"
Rewrite = Callable[[str, dict[str, Any], Any], Any]


@pytest.fixture(scope="module")
def apps(embedded_engine: Any) -> dict[str, Any]:
    return {mode: create_app(embedded_engine, compat=mode) for mode in ("openai", "vllm")}


def rewritten(app: Any, rewrite: Rewrite) -> nbc.Client:
    """A client on the real app whose answers pass through ``rewrite(path, body, answer)``."""
    real = StreamingASGITransport(app)

    async def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else {}
        response = await real.handle_async_request(request)
        await response.aread()
        if response.status_code != 200:
            return httpx.Response(response.status_code, content=response.content)
        answer = rewrite(request.url.path, body, json.loads(response.content))
        if isinstance(answer, httpx.Response):
            return answer
        return httpx.Response(200, json=answer)

    return mock_client(handler, base_url="http://embedded/v1", model=MODEL, max_retries=0)


def as_is(path: str, body: dict[str, Any], answer: Any) -> Any:
    return answer


@pytest.mark.parametrize("mode", ["openai", "vllm"])
def test_our_server_passes_every_chat_check(apps: dict[str, Any], mode: str) -> None:
    report = rewritten(apps[mode], as_is).chat_conformance()
    assert list(report.checks) == list(CHAT_CHECKS)
    assert report.ok, report
    assert all(report.status(name) == "ok" for name in CHAT_CHECKS), report
    assert report.evidence("chat_logprobs_mode")["mode"] == "raw"
    assert report.evidence("chat_top_logprobs_cap")["over_cap"] == "refused"
    assert report.requests == 11


def _entries(answer: Any) -> list[dict[str, Any]]:
    return [
        e for c in answer.get("choices", []) for e in (c.get("logprobs") or {}).get("content") or []
    ]


def _fewer_alternatives(path: str, body: dict[str, Any], answer: Any) -> Any:
    for entry in _entries(answer):
        entry["top_logprobs"] = entry["top_logprobs"][:5]
    return answer


def _one_choice(path: str, body: dict[str, Any], answer: Any) -> Any:
    if "choices" in answer:
        answer["choices"] = answer["choices"][:1]
    return answer


def _seed_ignored(path: str, body: dict[str, Any], answer: Any) -> Any:
    if body.get("seed") == 7:
        _seed_ignored.calls = getattr(_seed_ignored, "calls", 0) + 1  # type: ignore[attr-defined]
        answer["choices"][0]["message"]["content"] += str(_seed_ignored.calls)  # type: ignore[attr-defined]
    return answer


def _no_bytes(path: str, body: dict[str, Any], answer: Any) -> Any:
    for entry in _entries(answer):
        entry.pop("bytes", None)
    return answer


def _processed(path: str, body: dict[str, Any], answer: Any) -> Any:
    if body.get("temperature") == 2.0:
        for entry in _entries(answer):
            for top in entry["top_logprobs"]:
                top["logprob"] /= 2.0
    return answer


def _moves_with_count(path: str, body: dict[str, Any], answer: Any) -> Any:
    if body.get("top_logprobs") == 1:
        for entry in _entries(answer):
            entry["logprob"] -= 0.01
    return answer


def _no_tokenize(path: str, body: dict[str, Any], answer: Any) -> Any:
    if path == "/tokenize":
        return httpx.Response(404, json={"error": {"message": "Not Found"}})
    return answer


def _wrong_detokenize(path: str, body: dict[str, Any], answer: Any) -> Any:
    if path == "/detokenize":
        return {"prompt": " something else"}
    return answer


@pytest.mark.parametrize(
    ("rewrite", "check", "status"),
    [
        (_fewer_alternatives, "chat_top_logprobs_cap", "fails"),
        (_one_choice, "chat_n", "fails"),
        (_seed_ignored, "chat_seed", "fails"),
        (_no_bytes, "chat_bytes", "fails"),
        (_moves_with_count, "chat_logprobs_stable", "fails"),
        (_no_tokenize, "chat_reply_span", "unsupported"),
        (_wrong_detokenize, "chat_reply_span", "fails"),
    ],
)
def test_each_check_sees_its_fault(
    apps: dict[str, Any], rewrite: Rewrite, check: str, status: str
) -> None:
    report = rewritten(apps["openai"], rewrite).chat_conformance()
    assert report.status(check) == status, report
    others = [n for n in CHAT_CHECKS if n != check and report.status(n) != "ok"]
    assert others == [], report


def test_processed_logprobs_are_told_apart(apps: dict[str, Any]) -> None:
    report = rewritten(apps["openai"], _processed).chat_conformance()
    assert report.status("chat_logprobs_mode") == "ok"
    assert report.evidence("chat_logprobs_mode")["mode"] == "processed"
    assert report.evidence("chat_logprobs_mode")["max_difference"] > 0.01


def test_a_server_without_chat_is_unsupported_throughout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, json={"error": {"message": "Not Found"}})

    report = mock_client(handler, model=MODEL, max_retries=0).chat_conformance()
    assert {report.status(n) for n in CHAT_CHECKS} == {"unsupported"}
