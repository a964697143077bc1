"""Sweeps whose requests fail: a dead endpoint stops the sweep, some failures warn (issue 10, 3).

Before, a sweep against a dead server sent all 200 requests (20 s of retries), returned
``SweepResult(200 requests, 0 cached, 200 failed)`` without a word, and its plot was empty.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import free_port, mock_client

from nbcompletions import (
    APIError,
    AsyncClient,
    Cache,
    Client,
    RequestError,
    SweepError,
    SweepWarning,
    asweep,
    plots,
    sweep,
)
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"


def dead_url() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens: connections are refused


def test_dead_server_stops_after_the_first_failures_and_raises_the_first_error(
    tmp_path: Path,
) -> None:
    cache_path = tmp_path / "dead.sqlite"
    with (
        Client(dead_url(), model="m", max_retries=0, max_concurrency=2) as client,
        pytest.raises(SweepError) as info,
    ):
        sweep(
            client,
            prompt=["a", "b"],
            temperature=[0.1, 0.5, 0.9, 1.3],
            repeats=5,
            cache=cache_path,
            progress=False,
            probe=False,
        )
    error = info.value
    assert isinstance(error, APIError)
    assert error.type == "connection_error"
    assert error.failed == 8
    assert error.total == 40
    assert 8 <= error.sent <= 10  # two in flight at most when the eighth failure lands
    assert isinstance(error.first, APIError)
    assert error.__cause__ is error.first
    text = str(error)
    assert "the first 8 requests sent all failed the same way (connection_error)" in text
    assert "of 40 were not sent" in text
    assert "/v1/completions" in text
    assert str(cache_path) in text


def test_every_request_failing_one_way_raises_even_below_the_limit() -> None:
    def unauthorized(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"error": {"message": "bad key", "type": "auth"}})

    with mock_client(unauthorized) as client, pytest.raises(SweepError) as info:
        sweep(client, prompt=["a", "b", "c"], progress=False, probe=False)
    assert info.value.status == 401
    assert (info.value.failed, info.value.sent, info.value.total) == (3, 3, 3)
    assert "every request sent (3 of 3) failed the same way (auth (HTTP 401))" in str(info.value)


async def test_async_sweep_stops_too() -> None:
    async with AsyncClient(dead_url(), model="m", max_retries=0) as client:
        with pytest.raises(SweepError, match="connection_error"):
            await asweep(client, prompt=["a"], temperature=[0.5, 1.0], progress=False, probe=False)


def test_what_finished_stays_in_the_cache_when_the_server_dies(app: Any, tmp_path: Path) -> None:
    cache_path = tmp_path / "study.sqlite"
    with mock_client(StreamingASGITransport(app).handle_async_request, model=MODEL) as live:
        first = sweep(
            live, prompt="ROMEO:", max_tokens=1, repeats=3, cache=cache_path, progress=False
        )
    assert first.n_failed == 0
    with (
        Client(dead_url(), model=MODEL, max_retries=0) as dead,
        pytest.raises(SweepError, match=r"in the cache .*sends only what is missing"),
    ):
        sweep(dead, prompt="ROMEO:", max_tokens=1, repeats=12, cache=cache_path, progress=False)
    with Cache(cache_path) as cache:
        assert len(cache) == 3


def test_some_failures_warn_with_the_count_and_the_commonest_error(app: Any) -> None:
    real = StreamingASGITransport(app)

    async def faults(request: httpx.Request) -> httpx.Response:
        if request.content and json.loads(request.content).get("prompt") == "FAIL":
            return httpx.Response(500, json={"error": {"message": "fire", "type": "server_error"}})
        return await real.handle_async_request(request)

    with (
        mock_client(faults, base_url="http://embedded/v1", model=MODEL, max_retries=0) as client,
        pytest.warns(SweepWarning, match=r"^2 of 6 sweep requests failed") as record,
    ):
        result = sweep(
            client,
            prompt=["ROMEO:", "FAIL", "JULIET:"],
            temperature=[0.5, 1.0],
            max_tokens=1,
            progress=False,
            probe=False,
        )
    assert result.n_failed == 2
    assert "Commonest (2): server_error (500): fire" in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller's line


def test_mixed_failures_do_not_stop_the_sweep() -> None:
    statuses = iter([500, 400] * 10)

    def mixed(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(statuses), json={"error": {"message": "no"}})

    with (
        mock_client(mixed, max_retries=0, max_concurrency=1) as client,
        pytest.warns(SweepWarning, match="10 of 10"),
    ):
        result = sweep(
            client,
            prompt="x",
            temperature=[0.1 * i for i in range(10)],
            progress=False,
            probe=False,
        )
    assert result.n_failed == 10


def test_fail_fast_none_keeps_error_rows_and_plots_refuse_them() -> None:
    with (
        Client(dead_url(), model="m", max_retries=0) as client,
        pytest.warns(SweepWarning, match="4 of 4"),
    ):
        result = sweep(
            client,
            prompt=["a", "b"],
            temperature=[0.5, 1.0],
            progress=False,
            probe=False,
            fail_fast=None,
        )
    with pytest.raises(
        ValueError, match=r"mean_ci\(\): every row of the choices frame is a failed"
    ):
        plots.mean_ci(result.choices, x="temperature", y="mean_logprob")


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8"])
def test_fail_fast_must_be_a_positive_integer(bad: Any) -> None:
    with (
        mock_client(lambda r: httpx.Response(500)) as client,
        pytest.raises(RequestError, match=r"fail_fast must be an integer >= 1 or None"),
    ):
        sweep(client, prompt="x", progress=False, fail_fast=bad)


@pytest.mark.slow
def test_a_stopped_sweep_leaves_no_unclosed_socket_or_file(tmp_path: Path) -> None:
    # Outside pytest nothing turns ResourceWarnings into test failures: run a plain interpreter.
    script = textwrap.dedent(
        f"""
        import gc, nbcompletions as nbc
        client = nbc.Client({dead_url()!r}, model="m", max_retries=1)
        try:
            nbc.sweep(client, prompt=["a", "b"], temperature=[0.1, 0.5, 0.9], repeats=10,
                      cache={str(tmp_path / "c.sqlite")!r}, progress=False)
        except nbc.SweepError as exc:
            print("stopped", exc.sent)
        del client
        gc.collect()
        """
    )
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "stopped" in done.stdout
    assert "ResourceWarning" not in done.stderr, done.stderr
