"""Sweeps end to end on the embedded model: the real server app, the real client, the real cache.

Request counts come from a transport that wraps the real in-process ASGI transport and counts what
passes through it (a fact about the traffic, not a stand-in for the server). Faults are injected
with `httpx.MockTransport` in front of the real app.
"""

from __future__ import annotations

import asyncio
import json
import threading
import traceback
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest
from helpers import Interrupts, mock_client

from nbcompletions import AsyncClient, Client, SweepInterrupted, SweepWarning, metrics
from nbcompletions._cache import Cache
from nbcompletions._sweep import asweep, sweep
from nbcompletions._sweep_result import load_sweep
from nbcompletions.server import StreamingASGITransport, create_app

MODEL = "nbc-shakespeare"


async def hang() -> None:
    """A request that never finishes (until cancelled): holds a sweep still for an interrupt."""
    await asyncio.Event().wait()


class CountingTransport(httpx.AsyncBaseTransport):
    """Passes every request to the real transport for its host and counts completions per host."""

    def __init__(self, routes: dict[str, httpx.AsyncBaseTransport], on_request: Any = None) -> None:
        self.routes = routes
        self.counts: dict[str, int] = dict.fromkeys(routes, 0)
        self.on_request = on_request

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        host = request.url.host
        if request.url.path.endswith("/completions"):
            self.counts[host] += 1
            if self.on_request is not None:
                pending = self.on_request(self)
                if pending is not None:
                    await pending
        return await self.routes[host].handle_async_request(request)

    async def aclose(self) -> None:
        for transport in self.routes.values():
            await transport.aclose()


def counting_client(
    app: Any, *, cls: Any = Client, on_request: Any = None, **kwargs: Any
) -> tuple[Any, CountingTransport]:
    transport = CountingTransport({"embedded": StreamingASGITransport(app)}, on_request)
    client = cls("http://embedded/v1", model=MODEL, transport=transport, **kwargs)
    return client, transport


GRID: dict[str, Any] = {
    "prompt": {"hamlet": "To be, or not", "king": "My lord,"},
    "temperature": [0.5, 1.2],
    "max_tokens": 3,
    "logprobs": 2,
    "repeats": 2,
}


def test_small_sweep_on_the_embedded_model(embedded_client: Client, capsys: Any) -> None:
    result = sweep(embedded_client, **GRID, probe=False)
    assert len(result) == 8
    requests = result.requests
    assert requests["status"].tolist() == ["ok"] * 8
    assert requests["request_id"].tolist() == list(range(8))
    assert requests["prompt_id"].tolist() == ["hamlet"] * 4 + ["king"] * 4
    assert requests["temperature"].tolist() == [0.5, 0.5, 1.2, 1.2] * 2
    assert requests["repeat"].tolist() == [0, 1] * 4
    choices = result.choices
    assert len(choices) == 8
    for column in (
        "request_id",
        "prompt_id",
        "repeat",
        "prompt",
        "temperature",
        "max_tokens",
        "logprobs",
        "model",
        "text",
        "mean_logprob",
        "cached",
        "error",
    ):
        assert column in choices.columns, column
    assert choices["prompt"].tolist()[:4] == ["To be, or not"] * 4
    assert choices["error"].isna().all()
    assert not choices["cached"].any()
    assert (choices["n_tokens"] <= 3).all()
    tokens = result.tokens
    assert set(tokens["request_id"]) == set(range(8))
    assert tokens.groupby("request_id").size().max() <= 3
    alternatives = result.alternatives
    assert (alternatives.groupby(["request_id", "position"]).size() >= 2).all()
    # The usage reported is what the server said it spent, request by request.
    assert result.usage["total_tokens"] == int(requests["total_tokens"].sum()) > 0
    assert result.usage["cached_tokens"] == 0
    assert result.usage["sent"] == 8
    assert result.usage["estimate"] >= result.usage["completion_tokens"]
    assert result.usage["estimate_method"] == "embedded tokenizer"
    # The progress bar showed failures and tokens spent.
    err = capsys.readouterr().err
    assert "failed=0" in err
    assert f"tokens={result.usage['total_tokens']}" in err
    # A study is a groupby away.
    summary = metrics.summarize(
        metrics.per_choice(choices), by=["prompt_id", "temperature"], value="mean_logprob"
    )
    assert summary["n"].tolist() == [2, 2, 2, 2]


def test_rerun_from_cache_sends_nothing_and_round_trips(app: Any, tmp_path: Path) -> None:
    client, transport = counting_client(app)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        first = sweep(client, **GRID, cache=cache_path, progress=False, probe=False)
        assert transport.total == 8
        with Cache(cache_path) as cache:
            assert len(cache) == 8
        # Cached requests cost nothing: even a budget of 0 tokens lets the re-run through.
        again = sweep(client, **GRID, cache=cache_path, budget=0, progress=False, probe=False)
        assert transport.total == 8  # nothing sent
    finally:
        client.close()
    assert again.usage["sent"] == 0
    assert again.usage["total_tokens"] == 0
    assert again.usage["cached_tokens"] == first.usage["total_tokens"]
    assert again.requests["status"].tolist() == ["cached"] * 8
    assert again.choices["cached"].all()
    pd.testing.assert_frame_equal(
        first.choices.drop(columns="cached"), again.choices.drop(columns="cached")
    )
    pd.testing.assert_frame_equal(
        first.tokens.drop(columns="cached"), again.tokens.drop(columns="cached")
    )

    saved = first.to_parquet(tmp_path / "saved")
    loaded = load_sweep(saved)
    pd.testing.assert_frame_equal(first.requests, loaded.requests)
    pd.testing.assert_frame_equal(first.choices, loaded.choices)
    pd.testing.assert_frame_equal(first.tokens, loaded.tokens)
    pd.testing.assert_frame_equal(first.alternatives, loaded.alternatives)
    assert loaded.usage == json.loads(json.dumps(first.usage))
    with pytest.raises(FileNotFoundError, match="holds no sweep"):
        load_sweep(tmp_path)


def test_retrained_embedded_weights_miss_the_cache(
    app: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import nbcompletions.model as model_package

    client, transport = counting_client(app)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        sweep(client, prompt="To be", max_tokens=2, cache=cache_path, progress=False, probe=False)
        assert transport.total == 1
        # The same model id with other weights (retrained, or a new release of the package): the
        # old answer must not be served for it.
        other = tmp_path / "files"
        other.mkdir()
        (other / "model.safetensors").write_bytes(b"other weights")
        monkeypatch.setattr(model_package, "FILES_DIR", other)
        again = sweep(
            client, prompt="To be", max_tokens=2, cache=cache_path, progress=False, probe=False
        )
        assert transport.total == 2
        assert again.requests["status"].tolist() == ["ok"]
    finally:
        client.close()


def test_identical_grid_points_are_sent_once_and_agree_with_a_rerun(
    app: Any, tmp_path: Path
) -> None:
    # Two names for one prompt: the same request (same key) for every repeat.
    grid: dict[str, Any] = {
        "prompt": {"control": "To be", "treatment": "To be"},
        "temperature": 1.0,
        "max_tokens": 4,
        "repeats": 2,
    }
    client, transport = counting_client(app)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        first = sweep(client, **grid, cache=cache_path, progress=False, probe=False)
        assert transport.total == 2  # paid once per distinct request
        again = sweep(client, **grid, cache=cache_path, progress=False, probe=False)
        assert transport.total == 2
    finally:
        client.close()
    assert first.usage["sent"] == 2
    assert first.requests["status"].tolist() == ["ok"] * 4
    texts = first.choices.set_index(["prompt_id", "repeat"])["text"]
    assert texts["control"].tolist() == texts["treatment"].tolist()
    # What the first run returned is what the cache returns.
    assert first.choices["text"].tolist() == again.choices["text"].tolist()


def test_kernel_interrupt_then_resume_sends_only_what_is_missing(app: Any, tmp_path: Path) -> None:
    """Ctrl-C in a notebook raises KeyboardInterrupt in the thread waiting on the sweep."""
    interrupted = threading.Event()
    interrupts = Interrupts()  # what Jupyter's "interrupt kernel" does

    def interrupt_on_fourth(transport: CountingTransport) -> Any:
        if transport.total == 4 and not interrupted.is_set():
            interrupted.set()
            interrupts.start()
            return hang()  # the fourth request is still in flight when the interrupt lands
        return None

    client, transport = counting_client(app, on_request=interrupt_on_fourth)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        try:
            with pytest.raises(KeyboardInterrupt) as info:
                sweep(
                    client, **GRID, cache=cache_path, max_concurrency=1, progress=False, probe=False
                )
        finally:
            interrupts.arrived()
        with Cache(cache_path) as cache:
            finished = len(cache)
        assert finished == 3  # one at a time: three finished, the fourth was interrupted
        # One line saying what was kept and what to do, not a traceback through the loop code.
        assert isinstance(info.value, SweepInterrupted)
        assert str(info.value) == (
            f"interrupted: 3 of 8 responses saved in {str(cache_path)!r}; "
            "rerun the same call to resume"
        )
        assert info.value._render_traceback_() == [f"SweepInterrupted: {info.value}"]
        assert info.value.__suppress_context__
        frames = traceback.extract_tb(info.value.__traceback__)
        assert [frame.name for frame in frames] == [
            "test_kernel_interrupt_then_resume_sends_only_what_is_missing",
            "sweep",
        ]
        sent_before = transport.total
        resumed = sweep(client, **GRID, cache=cache_path, progress=False, probe=False)
    finally:
        client.close()
    assert transport.total - sent_before == 8 - finished
    assert resumed.usage["sent"] == 8 - finished
    assert resumed.requests["status"].value_counts().to_dict() == (
        {"cached": finished, "ok": 8 - finished} if finished < 8 else {"cached": 8}
    )
    assert len(resumed.choices) == 8
    assert resumed.choices["request_id"].tolist() == list(range(8))


async def test_cancelled_asweep_resumes(app: Any, tmp_path: Path) -> None:
    reached = asyncio.Event()

    def note(transport: CountingTransport) -> Any:
        if transport.total == 3 and not reached.is_set():
            reached.set()
            return hang()
        return None

    aclient, transport = counting_client(app, cls=AsyncClient, on_request=note)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        task = asyncio.create_task(
            asweep(
                aclient, **GRID, cache=cache_path, max_concurrency=1, progress=False, probe=False
            )
        )
        await reached.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with Cache(cache_path) as cache:
            finished = len(cache)
        assert finished == 2
        before = transport.total
        resumed = await asweep(aclient, **GRID, cache=cache_path, progress=False, probe=False)
    finally:
        await aclient.close()
    assert transport.total - before == 8 - finished
    clean = await asweep(aclient, **GRID, progress=False, probe=False)
    assert resumed.choices.columns.tolist() == clean.choices.columns.tolist()
    assert resumed.choices.shape == clean.choices.shape
    assert resumed.requests["request_id"].tolist() == clean.requests["request_id"].tolist()


def test_failed_requests_become_error_rows_and_are_not_cached(app: Any, tmp_path: Path) -> None:
    real = StreamingASGITransport(app)
    attempts: dict[str, int] = {}

    async def faults(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":  # GET /models: the model card, read once
            return await real.handle_async_request(request)
        body = json.loads(request.content)
        prompt = body.get("prompt")
        attempts[prompt] = attempts.get(prompt, 0) + 1
        if prompt == "FAIL":
            return httpx.Response(
                500,
                headers={"retry-after-ms": "1"},
                json={
                    "error": {
                        "message": "the GPU caught fire",
                        "type": "server_error",
                        "param": None,
                        "code": None,
                    }
                },
            )
        if prompt == "LIMIT":
            return httpx.Response(
                429,
                headers={"retry-after-ms": "1"},
                json={
                    "error": {
                        "message": "slow down",
                        "type": "rate_limit_error",
                        "param": None,
                        "code": "rate_limit_exceeded",
                    }
                },
            )
        return await real.handle_async_request(request)

    client = mock_client(faults, base_url="http://embedded/v1", model=MODEL, max_retries=2)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        with pytest.warns(SweepWarning, match="4 of 6 sweep requests failed"):
            result = sweep(
                client,
                prompt=["To be", "FAIL", "LIMIT"],
                temperature=[0.7, 1.0],
                max_tokens=2,
                n=2,
                logprobs=1,
                cache=cache_path,
                progress=False,
                probe=False,
            )
        assert attempts["FAIL"] == 2 * 3  # two grid points, three attempts each (2 retries)
        assert attempts["LIMIT"] == 2 * 3
        requests = result.requests
        assert requests["status"].tolist() == ["ok", "ok", "error", "error", "error", "error"]
        failed = requests[requests["status"] == "error"]
        assert failed["error_status"].tolist() == [500, 500, 429, 429]
        assert failed["error_type"].tolist() == ["server_error"] * 2 + ["rate_limit_error"] * 2
        assert failed["error_message"].iloc[0] == "the GPU caught fire"
        assert failed["error"].iloc[2] == "rate_limit_error (429): slow down"
        assert result.usage["failed_requests"] == 4
        choices = result.choices
        # n=2: two rows per request, failed ones included, in grid order.
        assert choices["request_id"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
        assert choices["error"].notna().tolist() == [False] * 4 + [True] * 8
        assert choices.loc[choices["error"].notna(), "text"].isna().all()
        assert set(result.tokens["request_id"]) == {0, 1}
        with Cache(cache_path) as cache:
            assert len(cache) == 2  # failures are not cached
        # A re-run retries only the failures.
        attempts.clear()
        # The failures differ (500 and 429): error rows and a warning, not a stop.
        with pytest.warns(SweepWarning, match="4 of 6"):
            again = sweep(
                client,
                prompt=["To be", "FAIL", "LIMIT"],
                temperature=[0.7, 1.0],
                max_tokens=2,
                n=2,
                logprobs=1,
                cache=cache_path,
                progress=False,
                probe=False,
            )
        assert attempts == {"FAIL": 6, "LIMIT": 6}
        assert again.requests["status"].tolist()[:2] == ["cached", "cached"]
    finally:
        client.close()


def test_sweep_is_spread_over_two_endpoints(app: Any, embedded_engine: Any) -> None:
    other = create_app(embedded_engine)
    transport = CountingTransport(
        {"replica-a": StreamingASGITransport(app), "replica-b": StreamingASGITransport(other)}
    )
    client = Client(
        ["http://replica-a/v1", "http://replica-b/v1"],
        model=MODEL,
        transport=transport,
        max_concurrency=4,
    )
    try:
        result = sweep(
            client,
            prompt=["To be", "My lord"],
            temperature=[0.3, 0.6, 0.9],
            max_tokens=2,
            repeats=2,
            progress=False,
            probe=False,
        )
    finally:
        client.close()
    assert result.n_failed == 0
    assert transport.total == 12
    assert transport.counts["replica-a"] > 0
    assert transport.counts["replica-b"] > 0


def test_credentials_in_the_base_url_stay_out_of_results_and_files(
    app: Any, tmp_path: Path
) -> None:
    transport = CountingTransport({"embedded": StreamingASGITransport(app)})
    client = Client("http://user:sk-secret-123@embedded/v1", model=MODEL, transport=transport)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        result = sweep(client, "To be", max_tokens=1, cache=cache_path, progress=False)
    finally:
        client.close()
    assert result.capabilities is not None
    assert "sk-secret-123" not in str(result.capabilities)
    assert "embedded/v1" in result.capabilities["endpoint"]
    saved = result.to_parquet(tmp_path / "saved")
    for path in [cache_path, *cache_path.parent.glob("sweep.sqlite*"), *saved.iterdir()]:
        assert b"sk-secret-123" not in path.read_bytes(), path


def test_capabilities_are_probed_once_and_kept(app: Any, tmp_path: Path) -> None:
    client, transport = counting_client(app)
    cache_path = tmp_path / "sweep.sqlite"
    try:
        first = sweep(
            client, "To be", max_tokens=1, cache=cache_path, progress=False, manifest=False
        )
        probes = transport.total - 1
        assert probes >= 3
        capabilities = first.capabilities
        assert capabilities is not None
        assert capabilities["ok"] is True
        assert capabilities["checks"]["echo_alignment"]["status"] == "ok"
        assert capabilities["checks"]["text_offset"]["evidence"] == {"origin": "prompt"}
        again = sweep(
            client, "To be", max_tokens=1, cache=cache_path, progress=False, manifest=False
        )
        assert transport.total == probes + 1  # remembered by the client; the point is cached
        assert again.capabilities == capabilities
    finally:
        client.close()
    # A new client on the same cache finds the capabilities there: still nothing sent.
    fresh, fresh_transport = counting_client(app)
    try:
        third = sweep(
            fresh, "To be", max_tokens=1, cache=cache_path, progress=False, manifest=False
        )
    finally:
        fresh.close()
    assert fresh_transport.total == 0
    assert third.capabilities == capabilities


async def test_async_twin_matches_sync(app: Any, embedded_client: Client) -> None:
    aclient, _ = counting_client(app, cls=AsyncClient)
    try:
        result = await asweep(
            aclient,
            prompt=["To be", "My lord"],
            seed=[1, 2],
            max_tokens=2,
            temperature=0.8,
            progress=False,
            probe=False,
        )
    finally:
        await aclient.close()
    sync_result = await asyncio.to_thread(
        sweep,
        embedded_client,
        prompt=["To be", "My lord"],
        seed=[1, 2],
        max_tokens=2,
        temperature=0.8,
        progress=False,
        probe=False,
    )
    assert result.choices.columns.tolist() == sync_result.choices.columns.tolist()
    # Seeded requests on the same model give the same text either way.
    assert result.choices["text"].tolist() == sync_result.choices["text"].tolist()
    with pytest.raises(TypeError, match="asweep\\(\\) needs an AsyncClient"):
        await asweep(embedded_client, "x", progress=False, manifest=False)  # type: ignore[arg-type]  # under test


def test_rows_keep_grid_order_whatever_order_responses_arrive(
    app: Any, embedded_client: Client
) -> None:
    real = StreamingASGITransport(app)
    arrived: list[int] = []

    async def late_first(request: httpx.Request) -> httpx.Response:
        seed = json.loads(request.content)["seed"]
        await asyncio.sleep(0.05 * (5 - seed))  # seed 1 answers last, seed 4 first
        response = await real.handle_async_request(request)
        arrived.append(seed)
        return response

    client = mock_client(late_first, base_url="http://embedded/v1", model=MODEL)
    try:
        result = sweep(
            client,
            "To be",
            seed=[1, 2, 3, 4],
            temperature=1.0,
            max_tokens=3,
            progress=False,
            probe=False,
        )
    finally:
        client.close()
    assert arrived != [1, 2, 3, 4]  # they did arrive out of order
    assert result.choices["seed"].tolist() == [1, 2, 3, 4]
    # Each row holds its own request's answer: seeded sampling is reproducible on this model.
    expected = [
        embedded_client.complete("To be", seed=s, temperature=1.0, max_tokens=3).text
        for s in (1, 2, 3, 4)
    ]
    assert result.choices["text"].tolist() == expected


def test_echo_axis_keeps_both_echo_columns(embedded_client: Client) -> None:
    result = sweep(
        embedded_client,
        "To be",
        echo=[True, False],
        max_tokens=1,
        logprobs=1,
        progress=False,
        probe=False,
    )
    tokens = result.tokens
    echoed = tokens[tokens["request_echo"]]
    assert echoed["echo"].any()  # the prompt's tokens, marked by the frames layer
    assert not tokens.loc[~tokens["request_echo"], "echo"].any()
    assert result.choices["prompt_n_tokens"].tolist()[1] == 0
