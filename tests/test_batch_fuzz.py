"""The Batch API under fuzzed input files (tests/batch_fuzz.py): no 500 response and no 500 line,
and every batch reaches a terminal state. benchmarks/bench_batch_fuzz.py runs 5,000 files."""

from __future__ import annotations

import random
from typing import Any

import httpx
import pytest
from batch_fuzz import ROUTES, fuzzed_file, run_files, run_routes

from nbcompletions.server import StreamingASGITransport, create_app


@pytest.mark.parametrize(
    "compat", [pytest.param("openai", marks=pytest.mark.slow), "vllm"]
)  # vllm accepts more fields, so more lines reach the engine
async def test_fuzzed_batch_files_never_get_a_500(embedded_engine: Any, compat: str) -> None:
    app = create_app(embedded_engine, compat=compat)
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as http:
        outcomes = await run_files(http, 40, seed=19 if compat == "openai" else 20)
    assert outcomes["files"] == 40
    # The fuzzer reaches every stage: refused uploads, batches run, lines answered both ways.
    assert outcomes["upload 400"] > 0
    assert outcomes["batch completed"] > 0
    assert outcomes["line 200"] > 0
    assert outcomes["line 400"] > 0
    assert not any("500" in key for key in outcomes), outcomes


@pytest.mark.slow
def test_the_fuzzer_makes_the_malformations_it_claims() -> None:
    rng = random.Random(0)
    files = [fuzzed_file(rng) for _ in range(400)]
    assert any(b"\xff\xfe\x80" in f for f in files)  # not UTF-8
    assert any(f.startswith(b"\xef\xbb\xbf") for f in files)  # a byte-order mark
    assert any(len(line) > 1_000_000 for f in files for line in f.splitlines())
    assert any(b"[[[[[[[[[[[[[[[[[[[[" in f for f in files)  # deep nesting
    assert any(b"\r\n" in f for f in files)
    assert b"" in files


async def test_fuzzed_chat_batch_files_never_get_a_500(embedded_engine: Any) -> None:
    app = create_app(embedded_engine, compat="vllm")
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as http:
        outcomes = await run_files(http, 30, seed=21, endpoint="/v1/chat/completions")
    assert outcomes["batch completed"] > 0
    assert outcomes["line 200"] > 0
    assert outcomes["line 400"] > 0
    assert not any("500" in key for key in outcomes), outcomes


@pytest.mark.slow
@pytest.mark.parametrize("compat", ["openai", "vllm"])
async def test_fuzzed_bodies_on_every_route_never_get_a_500(
    embedded_engine: Any, compat: str
) -> None:
    app = create_app(embedded_engine, compat=compat)
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=120
    ) as http:
        outcomes = await run_routes(http, 40, seed=5 if compat == "openai" else 6)
    for route in ROUTES:  # every route answered and refused some
        assert outcomes[f"{route} 200"] > 0, outcomes
        assert outcomes[f"{route} 400"] > 0, outcomes
