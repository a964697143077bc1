"""The Batch API end to end: sweeps with batch=True, our server's /v1/files and /v1/batches (also
through the official openai SDK), reattaching, cancelling, splitting, and the batch CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pandas as pd
import pytest

import nbcompletions as nbc
from nbcompletions import AsyncClient, BatchOptions, Cache, Client, SweepWarning, asweep, sweep
from nbcompletions._batch import batch_lines
from nbcompletions._cli import main
from nbcompletions.server import BatchLimits, StreamingASGITransport, create_app

MODEL = "nbc-shakespeare"
GRID: dict[str, Any] = {
    "prompt": {"hamlet": "To be, or not", "king": "My lord,", "tale": "Once upon"},
    "temperature": 0,
    "max_tokens": 6,
    "logprobs": 2,
    "seed": [1, 2],
}
# Response ids, timestamps and the cache flag differ between two runs of the same requests.
_RUN_COLUMNS = {"cached", "id", "created", "response_id", "latency", "status"}


def assert_same_frames(live: nbc.SweepResult, other: nbc.SweepResult) -> None:
    for name in ("choices", "tokens", "alternatives"):
        x, y = getattr(live, name), getattr(other, name)
        assert len(x) > 0
        columns = [c for c in x.columns if c not in _RUN_COLUMNS]
        pd.testing.assert_frame_equal(x[columns], y[columns])


class Recording(httpx.AsyncBaseTransport):
    """The real in-process app, with a log of (method, path) of every request."""

    def __init__(self, app: Any) -> None:
        self.inner = StreamingASGITransport(app)
        self.calls: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.calls.append((request.method, request.url.path))
        return await self.inner.handle_async_request(request)

    def count(self, method: str, path: str) -> int:
        return sum(1 for m, p in self.calls if m == method and p == path)


async def until(condition: Callable[[], bool]) -> None:
    """Wait for state that the server's runner thread (or the transport's log) changes."""
    while not condition():  # noqa: ASYNC110 - another thread's state: no event to wait on
        await asyncio.sleep(0.005)


def recording_client(app: Any, embedded_engine: Any, cls: Any = AsyncClient) -> Any:
    transport = Recording(app)
    client = cls(
        "http://embedded/v1",
        model=MODEL,
        transport=transport,
        vocab_size=int(embedded_engine.vocab_size),
    )
    return client, transport


@pytest.fixture(scope="module")
def live_result(embedded_client: Client) -> nbc.SweepResult:
    return sweep(embedded_client, **GRID, progress=False, probe=False)


# -- sweeps ---------------------------------------------------------------------------------------
def test_batch_sweep_on_the_embedded_client_equals_a_live_sweep(
    embedded_client: Client, live_result: nbc.SweepResult
) -> None:
    batched = sweep(embedded_client, **GRID, batch=True, progress=False, probe=False)
    assert batched.n_failed == 0
    assert len(batched) == 6
    assert_same_frames(live_result, batched)
    assert batched.usage["total_tokens"] == live_result.usage["total_tokens"]


@pytest.mark.slow
def test_batch_sweep_against_nbcompletions_serve_equals_a_live_sweep(live_server: str) -> None:
    with Client(live_server, model=MODEL) as client:
        live = sweep(client, **GRID, progress=False, probe=False)
        batched = sweep(client, **GRID, batch=True, progress=False)
    assert batched.n_failed == 0
    assert batched.capabilities  # probe=True works the same way with batch=True
    assert_same_frames(live, batched)


async def test_asweep_with_batch_splits_by_the_limits(
    app: Any, embedded_engine: Any, live_result: nbc.SweepResult
) -> None:
    aclient, transport = recording_client(app, embedded_engine)
    async with aclient:
        by_count = await asweep(
            aclient, **GRID, batch=BatchOptions(max_requests=4), progress=False, probe=False
        )
        assert transport.count("POST", "/v1/batches") == 2  # 6 requests, 4 per batch
        grid = nbc.expand_grid(aclient, **GRID)
        longest = max(len(line) for _, line in batch_lines(grid.points))
        by_bytes = await asweep(
            aclient,
            **GRID,
            batch=BatchOptions(max_bytes=longest, poll_interval=0.02),
            progress=False,
            probe=False,
        )
        assert transport.count("POST", "/v1/batches") == 2 + 6  # no two lines fit in one file
    assert_same_frames(live_result, by_count)
    assert_same_frames(live_result, by_bytes)


@pytest.mark.slow
def test_duplicates_and_cache_hits_are_not_sent_again(
    embedded_client: Client, tmp_path: Path
) -> None:
    grid = {**GRID, "prompt": ["To be", "To be", "My lord,"]}
    first = sweep(embedded_client, **grid, batch=True, cache=tmp_path / "c.sqlite", progress=False)
    assert first.usage["sent"] == 4  # "To be" twice is one request per seed
    again = sweep(embedded_client, **grid, batch=True, cache=tmp_path / "c.sqlite", progress=False)
    assert again.n_cached == 6
    assert again.usage["sent"] == 0
    assert_same_frames(first, again)


async def test_an_interrupted_batch_sweep_reattaches_instead_of_paying_again(
    app: Any, embedded_engine: Any, tmp_path: Path, live_result: nbc.SweepResult
) -> None:
    aclient, transport = recording_client(app, embedded_engine)
    cache_path = tmp_path / "study.sqlite"
    async with aclient:
        task = asyncio.create_task(
            asweep(aclient, **GRID, batch=True, cache=cache_path, progress=False, probe=False)
        )
        # The first poll comes after the batch id is in the cache: interrupt there.
        await until(
            lambda: any(m == "GET" and p.startswith("/v1/batches/") for m, p in transport.calls)
        )
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        with Cache(cache_path) as cache:
            assert len(cache) == 0  # nothing downloaded yet
            [entry] = cache.meta_items("batch:http://embedded/v1:").values()
            assert entry["batch_id"] is not None
            assert entry["checked"]
        resumed = await asweep(
            aclient, **GRID, batch=True, cache=cache_path, progress=False, probe=False
        )
        assert transport.count("POST", "/v1/batches") == 1  # reattached, not created again
        assert transport.count("POST", "/v1/files") == 1
        assert resumed.n_failed == 0
        assert_same_frames(live_result, resumed)
        with Cache(cache_path) as cache:
            assert len(cache) == 6
            assert cache.meta_items("batch:") == {}
        later = await asweep(
            aclient, **GRID, batch=True, cache=cache_path, progress=False, probe=False
        )
    assert later.n_cached == 6
    assert transport.count("POST", "/v1/batches") == 1


@pytest.mark.slow
async def test_a_cancelled_batch_keeps_what_finished_and_the_rest_is_sent_again(
    embedded_engine: Any, tmp_path: Path
) -> None:
    # Few lines in flight, so the batch is still running when it is cancelled.
    app = create_app(embedded_engine, batch_limits=BatchLimits(max_lines_in_flight=2))
    aclient, transport = recording_client(app, embedded_engine)
    grid = {**GRID, "seed": list(range(6)), "max_tokens": 16}  # 18 requests
    cache_path = tmp_path / "study.sqlite"
    async with aclient:
        task = asyncio.create_task(
            asweep(
                aclient,
                **grid,
                batch=BatchOptions(poll_interval=0.01),
                cache=cache_path,
                progress=False,
                probe=False,
            )
        )
        store = app.state.nbcompletions_batches
        await until(
            lambda: bool(store._batches) and next(iter(store._batches.values())).completed >= 2
        )
        batch_id = next(iter(store._batches))
        http = httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://x")
        cancelled = (await http.post(f"/v1/batches/{batch_id}/cancel")).json()
        assert cancelled["status"] in ("cancelling", "cancelled")
        with pytest.warns(SweepWarning, match="batch_cancelled"):
            partial = await task
        card = (await http.get(f"/v1/batches/{batch_id}")).json()
        await http.aclose()
        assert card["status"] == "cancelled"
        kept = card["request_counts"]["completed"]
        assert 2 <= kept < 18
        errors = partial.requests[partial.requests["status"] == "error"]
        assert len(errors) == 18 - kept
        assert set(errors["error_type"]) == {"batch_cancelled"}
        with Cache(cache_path) as cache:
            assert len(cache) == kept  # what finished was kept
        resumed = await asweep(
            aclient, **grid, batch=True, cache=cache_path, progress=False, probe=False
        )
    assert transport.count("POST", "/v1/batches") == 2
    second = app.state.nbcompletions_batches._batches
    assert [b.total for b in second.values()] == [18, 18 - kept]  # only the rest was re-sent
    assert resumed.n_failed == 0
    assert resumed.n_cached == kept
    with Client() as embedded:
        live = sweep(embedded, **grid, progress=False, probe=False)
    assert_same_frames(live, resumed)


@pytest.mark.slow
async def test_an_expired_batch_gives_error_rows_for_what_never_ran(
    embedded_engine: Any,
) -> None:
    # The window must let the first line start (the runner picks a new batch up within 0.05 s)
    # and end long before the 60 lines can (about 0.1 s each, one at a time): 0.3 s left a loaded
    # machine little room for the first.
    app = create_app(
        embedded_engine,
        batch_limits=BatchLimits(max_lines_in_flight=1, completion_window_s=1.0),
    )
    aclient, _ = recording_client(app, embedded_engine)
    async with aclient:
        with pytest.warns(SweepWarning, match="batch_expired"):
            result = await asweep(
                aclient,
                **{**GRID, "seed": list(range(20)), "max_tokens": 24},  # 60 requests, one at a time
                batch=True,
                progress=False,
                probe=False,
            )
    kinds = result.requests["error_type"].value_counts(dropna=False).to_dict()
    assert kinds.get("batch_expired", 0) > 0
    assert (result.requests["status"] == "ok").sum() >= 1
    card = next(iter(app.state.nbcompletions_batches._batches.values())).card()
    assert card["status"] == "expired"
    assert card["expired_at"] is not None


def test_a_failing_request_becomes_an_error_row(embedded_client: Client) -> None:
    # max_tokens 300 passes the client's checks but not the model's context (256 positions).
    with pytest.warns(SweepWarning, match="1 of 2 sweep requests failed"):
        result = sweep(
            embedded_client, prompt="To be", max_tokens=[4, 300], batch=True, progress=False
        )
    assert result.requests["status"].tolist() == ["ok", "error"]
    failed = result.requests.iloc[1]
    assert failed["error_status"] == 400
    assert failed["error_type"] == "invalid_request_error"
    assert "maximum context length is 256 tokens" in failed["error_message"]


def test_batch_option_is_checked_before_anything_is_sent(embedded_client: Client) -> None:
    with pytest.raises(nbc.RequestError, match="batch must be True, False or"):
        sweep(embedded_client, prompt="x", batch="yes", progress=False)  # type: ignore[arg-type]  # under test
    with pytest.raises(nbc.RequestError, match="max_requests must be an integer >= 1; got 0"):
        BatchOptions(max_requests=0)
    with pytest.raises(nbc.RequestError, match="poll_interval"):
        BatchOptions(poll_interval=-1)


# -- offline: the file out, results in ------------------------------------------------------------
def test_grid_to_batch_file_and_load_batch_output_round_trip_through_the_cli(
    embedded_client: Client, live_result: nbc.SweepResult, tmp_path: Path
) -> None:
    grid = nbc.expand_grid(embedded_client, **GRID)
    [path] = grid.to_batch_file(tmp_path / "requests.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 6
    assert lines[0]["url"] == "/v1/completions"
    assert lines[0]["method"] == "POST"
    assert lines[0]["custom_id"] == grid.points[0].key
    assert lines[0]["body"]["model"] == MODEL
    assert "stream" not in lines[0]["body"]
    assert main(["batch", "-i", str(path), "-o", str(tmp_path / "results.jsonl"), "--quiet"]) == 0
    assert not (tmp_path / "results-errors.jsonl").exists()
    loaded = nbc.load_batch_output(
        grid, tmp_path / "results.jsonl", vocab_size=embedded_client.vocab_size
    )
    assert_same_frames(live_result, loaded)


def test_to_batch_file_splits_at_the_limits(embedded_client: Client, tmp_path: Path) -> None:
    grid = nbc.expand_grid(embedded_client, **GRID)
    paths = grid.to_batch_file(tmp_path / "big.jsonl", max_requests=4)
    assert [p.name for p in paths] == ["big-001.jsonl", "big-002.jsonl"]
    assert [len(p.read_text().splitlines()) for p in paths] == [4, 2]


def test_cli_writes_failures_to_the_error_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    lines = [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
         "body": {"model": MODEL, "prompt": "To be", "max_tokens": 3 if i != 1 else -1}}
        for i in range(3)
    ]  # fmt: skip
    source.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out.jsonl"
    assert main(["batch", "-i", str(source), "-o", str(out), "-e", str(tmp_path / "e.jsonl")]) == 0
    answered = {json.loads(x)["custom_id"] for x in out.read_text().splitlines()}
    failed = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert answered == {"r0", "r2"}
    assert failed[0]["custom_id"] == "r1"
    assert failed[0]["response"]["status_code"] == 400
    assert failed[0]["response"]["body"]["error"]["param"] == "max_tokens"
    assert "3 requests: 2 completed, 1 failed" in capsys.readouterr().err


def test_cli_refuses_a_bad_file_naming_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'
                      "not json\n")  # fmt: skip
    assert main(["batch", "-i", str(source), "-o", str(tmp_path / "o.jsonl"), "--quiet"]) == 1
    assert "line 2 of the file is not valid JSON" in capsys.readouterr().err


# -- the server's routes --------------------------------------------------------------------------
@pytest.fixture
def http(app: Any) -> Iterator[Client]:
    client = Client("http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app))
    yield client
    client.close()


def _upload(client: Client, content: bytes) -> Any:
    files = {"file": ("in.jsonl", content, "application/jsonl")}
    return client.request("POST", "/files", files=files, data={"purpose": "batch"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"custom_id": "a"}\n[1]\n', "line 1 of the file: method must be 'POST'"),
        (b"[1]\n", "line 1 of the file must be a JSON object"),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n' * 2,
            "custom_id 'a' is not unique",
        ),
        (
            b'{"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {}}\n',
            "url must be one of /v1/completions, /v1/chat/completions",
        ),
        (b"\n", "holds no requests"),
    ],
)
def test_uploads_are_checked_line_by_line(http: Client, content: bytes, message: str) -> None:
    with pytest.raises(nbc.APIError, match=message) as info:
        _upload(http, content)
    assert info.value.status == 400


def test_uploads_and_stored_bytes_are_bounded(embedded_engine: Any) -> None:
    app = create_app(
        embedded_engine, batch_limits=BatchLimits(max_file_bytes=200, max_stored_bytes=300)
    )
    with Client("http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app)) as c:
        line = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'
        with pytest.raises(nbc.APIError, match="at most 200 bytes") as info:
            _upload(c, line * 3)
        assert info.value.status == 413
        for _ in range(4):
            _upload(c, line)  # 76 bytes each: the fifth finds 304 bytes stored
        with pytest.raises(nbc.APIError, match="holds at most 300 bytes of batch files"):
            _upload(c, line)


async def test_batch_routes_need_the_key(embedded_engine: Any) -> None:
    app = create_app(embedded_engine, api_key="sk-test-batch-key")
    transport = StreamingASGITransport(app)
    async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as h:
        for method, path in (
            ("POST", "/v1/files"),
            ("GET", "/v1/files/file-x/content"),
            ("POST", "/v1/batches"),
            ("GET", "/v1/batches"),
            ("POST", "/v1/batches/batch_x/cancel"),
        ):
            assert (await h.request(method, path)).status_code == 401, path


# -- the official SDK against `nbcompletions serve` ----------------------------------------------
@pytest.fixture
def sdk(live_server: str) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=live_server, api_key="unused", max_retries=0, timeout=60)
    yield client
    client.close()


def _requests_file(n: int, max_tokens: int) -> bytes:
    return "".join(
        json.dumps(
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": MODEL, "prompt": "To be", "max_tokens": max_tokens, "seed": i},
            }
        )
        + "\n"
        for i in range(n)
    ).encode()


def _wait(sdk: openai.OpenAI, batch_id: str) -> Any:
    deadline = time.monotonic() + 120
    while True:
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        assert time.monotonic() < deadline, batch
        time.sleep(0.05)


def test_the_openai_sdk_runs_a_batch_on_our_server(sdk: openai.OpenAI) -> None:
    uploaded = sdk.files.create(file=("requests.jsonl", _requests_file(5, 4)), purpose="batch")
    assert uploaded.object == "file"
    assert uploaded.purpose == "batch"
    assert uploaded.bytes > 0
    assert sdk.files.retrieve(uploaded.id).filename == "requests.jsonl"
    created = sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/completions",
        completion_window="24h",
        metadata={"study": "sdk"},
    )
    assert created.object == "batch"
    assert created.metadata == {"study": "sdk"}
    assert created.status in ("validating", "in_progress", "finalizing", "completed")
    done = _wait(sdk, created.id)
    assert done.status == "completed"
    assert done.error_file_id is None
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (5, 5)
    assert done.completed_at is not None
    assert done.output_file_id is not None
    lines = [json.loads(x) for x in sdk.files.content(done.output_file_id).text.splitlines()]
    assert sorted(line["custom_id"] for line in lines) == [f"req-{i}" for i in range(5)]
    assert all(line["response"]["status_code"] == 200 for line in lines)
    assert lines[0]["response"]["body"]["object"] == "text_completion"
    with pytest.raises(openai.ConflictError, match="Cannot cancel a batch with status"):
        sdk.batches.cancel(done.id)
    # Listing: newest first, paged with limit and after.
    second = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    page = sdk.batches.list(limit=1)
    assert [b.id for b in page.data] == [second.id]
    assert page.has_more
    after = sdk.batches.list(limit=1, after=second.id)
    assert [b.id for b in after.data] == [created.id]
    _wait(sdk, second.id)
    with pytest.raises(openai.NotFoundError):
        sdk.batches.retrieve("batch_missing")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/completions",
            completion_window="1h",  # type: ignore[arg-type]  # the refusal under test
        )


def test_the_openai_sdk_cancels_a_batch_that_keeps_its_finished_lines(sdk: openai.OpenAI) -> None:
    uploaded = sdk.files.create(file=("big.jsonl", _requests_file(200, 32)), purpose="batch")
    batch = sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
    )
    deadline = time.monotonic() + 120
    while True:
        counts = sdk.batches.retrieve(batch.id).request_counts or batch.request_counts
        assert counts is not None
        if counts.completed >= 1:
            break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    cancelling = sdk.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(sdk, batch.id)
    assert done.status == "cancelled"
    assert done.cancelled_at is not None
    assert done.request_counts is not None
    kept = done.request_counts.completed
    assert 1 <= kept < 200
    assert done.output_file_id is not None
    lines = sdk.files.content(done.output_file_id).text.splitlines()
    assert len(lines) == kept


def test_load_batch_output_reads_openai_and_vllm_error_lines(
    embedded_client: Client, tmp_path: Path
) -> None:
    grid = nbc.expand_grid(embedded_client, prompt=["To be", "Once", "My", "A"], max_tokens=2)
    keys = [point.key for point in grid.points]
    answer = embedded_client.complete("To be", max_tokens=2).raw
    openai_error = {"error": {"message": "bad max_tokens", "type": "invalid_request_error"}}
    lines = [
        {"id": "1", "custom_id": keys[0], "error": None,
         "response": {"status_code": 200, "request_id": "r", "body": answer}},
        {"id": "2", "custom_id": keys[1], "error": None,
         "response": {"status_code": 400, "request_id": "r", "body": openai_error}},
        # vLLM's run-batch: the message in "error", no body.
        {"id": "3", "custom_id": keys[2], "error": "Request must not be sent in stream mode",
         "response": {"status_code": 400, "request_id": "r", "body": None}},
    ]  # fmt: skip
    output = tmp_path / "out.jsonl"
    output.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = nbc.load_batch_output(grid, output)
    rows = result.requests
    assert rows["status"].tolist() == ["ok", "error", "error", "error"]
    assert rows["error_type"].tolist()[1:] == [
        "invalid_request_error",
        "api_error",
        "batch_missing",
    ]
    assert rows["error_status"].tolist()[1:3] == [400, 400]
    assert rows["error_message"].iloc[2] == "Request must not be sent in stream mode"
    assert result.choices["text"].iloc[0] == answer["choices"][0]["text"]


# -- never paid twice: faults at the worst moment ------------------------------------------------
class Crash(BaseException):
    """The process dying: nothing of the sweep's code runs after it (no except clause takes it)."""


class Faulty(Recording):
    """The real app, with one fault right after ``POST /v1/batches`` was served (the batch exists
    and costs money; the client has not seen its id yet)."""

    def __init__(self, app: Any, fault: str, *, listing: bool = True) -> None:
        super().__init__(app)
        self.fault = fault
        self.listing = listing
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "GET" and request.url.path == "/v1/batches" and not self.listing:
            self.calls.append((request.method, request.url.path))
            return httpx.Response(404, json={"error": {"message": "Not Found", "type": "x"}})
        if self.fault == "unsent" and request.url.path == "/v1/batches":
            raise Crash  # the process dies before the create reaches the server
        response = await super().handle_async_request(request)
        if request.method == "POST" and request.url.path == "/v1/batches" and self.fault:
            fault, self.fault = self.fault, ""
            await response.aread()
            if fault == "crash":
                raise Crash
            if fault == "lost":  # the answer never arrives: the client retries the POST
                raise httpx.ReadError("connection lost", request=request)
            self.arrived.set()  # "cancel": the answer is on its way when the task is cancelled
            await self.release.wait()
        return response


def _batches_on(app: Any) -> list[Any]:
    return list(app.state.nbcompletions_batches._batches.values())


@pytest.mark.parametrize("fault", ["crash", "cancel"])
async def test_a_batch_is_never_paid_twice_when_the_sweep_dies_as_it_is_created(
    embedded_engine: Any, tmp_path: Path, live_result: nbc.SweepResult, fault: str
) -> None:
    app = create_app(embedded_engine)
    transport = Faulty(app, fault)
    aclient = AsyncClient(
        "http://embedded/v1",
        model=MODEL,
        transport=transport,
        vocab_size=int(embedded_engine.vocab_size),
    )
    cache_path = tmp_path / "study.sqlite"
    options = BatchOptions(poll_interval=0.01)
    async with aclient:
        task = asyncio.create_task(
            asweep(aclient, **GRID, batch=options, cache=cache_path, progress=False, probe=False)
        )
        if fault == "crash":
            with pytest.raises(Crash):
                await task
        else:
            await transport.arrived.wait()
            task.cancel()
            await asyncio.sleep(0.05)  # the cancel is delivered while the answer is on its way
            transport.release.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            with Cache(cache_path) as cache:  # the answer was waited for: its id is kept
                [entry] = cache.meta_items("batch:http://embedded/v1:").values()
                assert entry["batch_id"] == _batches_on(app)[0].id
        assert len(_batches_on(app)) == 1
        resumed = await asweep(
            aclient, **GRID, batch=options, cache=cache_path, progress=False, probe=False
        )
    assert transport.count("POST", "/v1/batches") == 1  # reattached, not created again
    assert [b.status for b in _batches_on(app)] == ["completed"]
    assert resumed.n_failed == 0
    assert len(resumed) == 6
    assert_same_frames(live_result, resumed)
    with Cache(cache_path) as cache:
        assert len(cache) == 6
        assert cache.meta_items("batch:") == {}  # nothing left open


async def test_a_create_whose_answer_was_lost_is_found_not_sent_again(
    embedded_engine: Any, tmp_path: Path, live_result: nbc.SweepResult
) -> None:
    app = create_app(embedded_engine)
    aclient, transport = faulty_client(app, embedded_engine, "lost")
    async with aclient:
        result = await asweep(
            aclient,
            **GRID,
            batch=BatchOptions(poll_interval=0.01),
            cache=tmp_path / "study.sqlite",
            progress=False,
            probe=False,
        )
    # The answer to the create was lost: the client listed the batches and found its own
    # (by its marker) instead of sending the create again.
    [batch] = _batches_on(app)
    assert transport.count("POST", "/v1/batches") == 1
    assert transport.count("GET", "/v1/batches") >= 1
    assert not [call for call in transport.calls if call[1].endswith("/cancel")]
    assert batch.status == "completed"
    assert result.n_failed == 0
    assert_same_frames(live_result, result)


async def test_a_lost_create_on_a_server_that_cannot_list_is_sent_again(
    embedded_engine: Any, tmp_path: Path, live_result: nbc.SweepResult
) -> None:
    """Without GET /v1/batches nothing can tell a lost create from one that never arrived: the
    create is sent again (as the client's retry loop would) and the rows are all there."""
    app = create_app(embedded_engine)
    aclient, transport = faulty_client(app, embedded_engine, "lost", listing=False)
    async with aclient:
        result = await asweep(
            aclient,
            **GRID,
            batch=BatchOptions(poll_interval=0.01),
            cache=tmp_path / "study.sqlite",
            progress=False,
            probe=False,
        )
    assert transport.count("POST", "/v1/batches") == 2
    assert result.n_failed == 0
    assert_same_frames(live_result, result)


def faulty_client(app: Any, embedded_engine: Any, fault: str, **kwargs: Any) -> Any:
    transport = Faulty(app, fault, **kwargs)
    aclient = AsyncClient(
        "http://embedded/v1",
        model=MODEL,
        transport=transport,
        vocab_size=int(embedded_engine.vocab_size),
    )
    return aclient, transport


@pytest.mark.slow
async def test_a_create_that_never_arrived_is_sent_again_and_its_file_deleted(
    embedded_engine: Any, tmp_path: Path, live_result: nbc.SweepResult
) -> None:
    app = create_app(embedded_engine)
    aclient, transport = faulty_client(app, embedded_engine, "unsent")
    cache_path = tmp_path / "study.sqlite"
    options = BatchOptions(poll_interval=0.01)
    async with aclient:
        with pytest.raises(Crash):
            await asweep(aclient, **GRID, batch=options, cache=cache_path, progress=False)
        store = app.state.nbcompletions_batches
        [orphan] = store._files
        transport.fault = ""
        resumed = await asweep(aclient, **GRID, batch=options, cache=cache_path, progress=False)
    # Looked for it first (found nothing), then checked the new batch had no duplicate.
    assert transport.count("GET", "/v1/batches") == 2
    assert transport.count("DELETE", f"/v1/files/{orphan}") == 1
    assert orphan not in store._files
    assert len(_batches_on(app)) == 1
    assert resumed.n_failed == 0
    assert_same_frames(live_result, resumed)


@pytest.mark.slow
async def test_a_server_that_cannot_list_batches_gets_the_requests_again_with_a_warning(
    embedded_engine: Any, tmp_path: Path, live_result: nbc.SweepResult
) -> None:
    app = create_app(embedded_engine)
    aclient, _ = faulty_client(app, embedded_engine, "crash", listing=False)
    cache_path = tmp_path / "study.sqlite"
    options = BatchOptions(poll_interval=0.01)
    async with aclient:
        with pytest.raises(Crash):
            await asweep(aclient, **GRID, batch=options, cache=cache_path, progress=False)
        with pytest.warns(SweepWarning, match="cannot list batches"):
            resumed = await asweep(aclient, **GRID, batch=options, cache=cache_path, progress=False)
    assert len(_batches_on(app)) == 2  # what no client can avoid without a list to look in
    assert resumed.n_failed == 0
    assert_same_frames(live_result, resumed)


def test_rows_an_earlier_version_wrote_are_still_reattached(tmp_path: Path) -> None:
    from nbcompletions._batch_ledger import Ledger

    with Cache(tmp_path / "old.sqlite") as cache:
        cache.set_meta("batches:http://x/v1", ["batch_1"])
        cache.set_meta("batch:http://x/v1:batch_1", {"keys": ["k1", "k2"], "input_file_id": "f"})
        cache.set_meta("batch:http://x/v1:batch_0", None)  # one it had finished
        ledger = Ledger(cache, "http://x/v1")
        [entry] = ledger.entries()
        assert (entry.batch_id, entry.keys, entry.checked) == ("batch_1", ["k1", "k2"], True)
        ledger.remove(entry)
        assert ledger.entries() == []


def test_batch_metadata_leaves_room_for_the_sweeps_marker() -> None:
    with pytest.raises(nbc.RequestError, match=r"at most 15 pairs.*got 16 pairs") as info:
        BatchOptions(metadata={f"k{i}": "v" for i in range(16)})
    assert info.value.param == "metadata"
    with pytest.raises(nbc.RequestError, match="got the pair 'nbcompletions_batch'"):
        BatchOptions(metadata={"nbcompletions_batch": "mine"})
    with pytest.raises(nbc.RequestError, match="values up to 512"):
        BatchOptions(metadata={"study": "x" * 513})
    assert BatchOptions(metadata={f"k{i}": "v" for i in range(15)}).metadata


_KILL_AFTER_CREATE = """
import os, sys, httpx
import nbcompletions as nbc

class KillAfterCreate(httpx.AsyncHTTPTransport):
    async def handle_async_request(self, request):
        response = await super().handle_async_request(request)
        if request.method == "POST" and request.url.path.endswith("/batches"):
            await response.aread()
            os._exit(17)  # the batch exists; its id is in this process only
        return response

with nbc.Client(sys.argv[1], model="nbc-shakespeare", transport=KillAfterCreate()) as client:
    nbc.sweep(client, prompt=["To be", "My lord,"], max_tokens=3, temperature=0, seed=[1, 2],
              batch=True, cache=sys.argv[2], progress=False, probe=False)
"""


@pytest.mark.slow
def test_a_process_killed_right_after_creating_a_batch_does_not_pay_again(
    live_server: str, tmp_path: Path
) -> None:
    import subprocess
    import sys

    cache_path = tmp_path / "study.sqlite"
    with httpx.Client(base_url=live_server) as http:

        def batch_ids() -> list[str]:
            return [b["id"] for b in http.get("/batches", params={"limit": 100}).json()["data"]]

        before = set(batch_ids())
        killed = subprocess.run(
            [sys.executable, "-c", _KILL_AFTER_CREATE, live_server, str(cache_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert killed.returncode == 17, killed.stderr
        assert len(set(batch_ids()) - before) == 1
        with Client(live_server, model=MODEL) as client:
            resumed = sweep(
                client,
                prompt=["To be", "My lord,"],
                max_tokens=3,
                temperature=0,
                seed=[1, 2],
                batch=True,
                cache=cache_path,
                progress=False,
                probe=False,
            )
        assert len(set(batch_ids()) - before) == 1  # the running batch was found, not paid again
    assert resumed.n_failed == 0
    assert len(resumed) == 4
    assert resumed.n_cached == 0


async def test_a_batch_list_that_never_ends_stops_the_search_instead_of_paging_forever() -> None:
    """A server (or a huge account without creation times) whose list always has more: the
    search gives up after a bounded number of pages with an error naming the files; it neither
    pages forever nor guesses "not found" (which would send, and pay for, the requests again)."""
    from nbcompletions._batch_ledger import _MAX_PAGES, Entry, find_ours

    served = itertools.count()

    def endless(request: httpx.Request) -> httpx.Response:
        cards = [{"id": f"batch_{next(served)}", "metadata": {}} for _ in range(100)]
        return httpx.Response(200, json={"object": "list", "data": cards, "has_more": True})

    entry = Entry(marker="m", keys=["k"], input_file_id="file-ours", file_created_at=None)
    async with AsyncClient(
        "http://x/v1", api_key="k", model=MODEL, transport=httpx.MockTransport(endless)
    ) as aclient:
        with pytest.raises(nbc.APIError, match="file-ours") as caught:
            await find_ours(aclient, [entry])
    assert caught.value.type == "batch_lookup"
    assert next(served) == _MAX_PAGES * 100  # every page it was allowed, and not one more


# -- odd 200 bodies: error rows as live ----------------------------------------------------------
ODD_BODIES: list[Any] = [
    {"error": {"message": "upstream overloaded", "type": "server_error"}},
    {},
    {"choices": "x"},
]
ODD_PROMPTS = ["To be, or not", "My lord,", "Once upon", "ROMEO:"]  # the last one stays as it is


class OddOutput(Recording):
    """The real app, whose Batch output lines for the first prompts get ``ODD_BODIES`` (status
    200), and whose good line's usage says ``"completion_tokens": true``."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        if not request.url.path.endswith("/content"):
            return response
        lines = [json.loads(line) for line in (await response.aread()).splitlines()]
        for line in lines:
            prompt = line["response"]["body"]["choices"][0]["text"]  # echo: the prompt is first
            at = next(i for i, p in enumerate(ODD_PROMPTS) if prompt.startswith(p))
            if at < len(ODD_BODIES):
                line["response"]["body"] = ODD_BODIES[at]
            else:
                line["response"]["body"]["usage"]["completion_tokens"] = True
        content = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        return httpx.Response(200, content=content, headers={"content-type": "application/jsonl"})


def test_200_lines_with_an_error_or_no_usable_choice_are_error_rows_as_live(
    app: Any, embedded_engine: Any
) -> None:
    grid: dict[str, Any] = {"prompt": ODD_PROMPTS, "max_tokens": 2, "echo": True, "seed": 1}
    client = Client("http://embedded/v1", model=MODEL, transport=OddOutput(app))
    with client, pytest.warns(SweepWarning, match="3 of 4"):
        batched = sweep(client, **grid, batch=True, progress=False, probe=False)
    answers = iter([*ODD_BODIES, None])

    def live_answer(request: httpx.Request) -> httpx.Response:
        body = next(answers)
        if body is None:  # the good request: answered by the real app, usage made odd the same way
            return httpx.Response(200, json=good)
        return httpx.Response(200, json=body)

    with Client("http://embedded/v1", model=MODEL, transport=StreamingASGITransport(app)) as real:
        good = real.request(
            "POST", "/completions", json={"model": MODEL, **grid, "prompt": ODD_PROMPTS[-1]}
        )
    good["usage"]["completion_tokens"] = True
    mock = Client("http://e/v1", model=MODEL, transport=httpx.MockTransport(live_answer))
    with mock, pytest.warns(SweepWarning, match="3 of 4"):
        live = sweep(mock, **grid, progress=False, probe=False, max_concurrency=1)
    columns = ["status", "error_type", "error_status", "error_message"]
    assert batched.n_failed == live.n_failed == 3
    pd.testing.assert_frame_equal(batched.requests[columns], live.requests[columns])
    assert list(batched.requests["error_type"][:3]) == [
        "server_error",
        "invalid_response",
        "invalid_response",
    ]
    # A count of `true` is not a token, on either path.
    assert batched.usage["completion_tokens"] == 0
    assert batched.usage["total_tokens"] == good["usage"]["total_tokens"]


# -- a deadline ----------------------------------------------------------------------------------
class NeverEnds(Recording):
    """The real app, except that every batch reads ``in_progress`` however far it got."""

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        path = request.url.path
        if request.method == "GET" and path.startswith("/v1/batches/") and path.count("/") == 3:
            card = json.loads(await response.aread())
            card.update(status="in_progress", output_file_id=None, error_file_id=None)
            return httpx.Response(200, json=card)
        return response


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_a_batch_that_never_ends_is_cancelled_at_the_deadline(
    app: Any, embedded_engine: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "study.sqlite"
    transport = NeverEnds(app)
    options = BatchOptions(deadline=0.5, poll_interval=0.05)
    async with AsyncClient("http://embedded/v1", model=MODEL, transport=transport) as aclient:
        with pytest.warns(SweepWarning, match="6 of 6"):
            stopped = await asweep(
                aclient, **GRID, batch=options, cache=cache, progress=False, probe=False
            )
    assert stopped.n_failed == 6
    assert set(stopped.requests["error_type"]) == {"batch_deadline"}
    message = stopped.requests["error_message"].iloc[0]
    assert "deadline=0.5" in message
    assert "cancelled" in message
    [batch_id] = {p.split("/")[3] for m, p in transport.calls if p.endswith("/cancel")}
    assert transport.count("POST", "/v1/batches") == 1
    # The cancelled batch stays in the ledger: the next run collects it instead of paying again.
    aclient, again = recording_client(app, embedded_engine)
    async with aclient:
        resumed = await asweep(
            aclient, **GRID, batch=BatchOptions(poll_interval=0.05), cache=cache,
            progress=False, probe=False,
        )  # fmt: skip
    assert again.count("GET", f"/v1/batches/{batch_id}") >= 1
    assert len(resumed) == 6


def test_the_deadline_is_checked() -> None:
    for bad in (0, -1.0, float("inf"), True, "10"):
        with pytest.raises(nbc.RequestError, match="deadline must be a number of seconds > 0"):
            BatchOptions(deadline=bad)  # type: ignore[arg-type]  # the wrong types on purpose


# -- K processes, one cache: one batch -----------------------------------------------------------
_ONE_OF_K = """
import pathlib, sys, time
import nbcompletions as nbc

import nbcompletions._batch, nbcompletions._sweep, pandas  # loaded before the start

base_url, cache, ready, go, seeds = sys.argv[1:6]
grid = dict(prompt=["To be", "My lord,", "Once upon"], max_tokens=3, temperature=0,
            seed=list(range(int(seeds))))
with nbc.Client(base_url, model="nbc-shakespeare") as client:
    nbc.sweep(client, **{**grid, "max_tokens": 1}, progress=False, probe=False)  # warm up
    pathlib.Path(ready).touch()
    while not pathlib.Path(go).exists():  # start together: the race is the point
        time.sleep(0.01)
    result = nbc.sweep(client, **grid, batch=nbc.BatchOptions(poll_interval=0.1), cache=cache,
                       progress=False, probe=False)
print(len(result), result.n_failed)
"""


def run_k_processes(base_url: str, cache: Path, k: int, seeds: int = 2) -> list[str]:
    """``k`` processes running the same Batch sweep on one cache, started together: their
    outputs (``"<requests> <failed>"``)."""
    import subprocess
    import sys

    go = cache.with_name("go")
    readies = [cache.with_name(f"ready-{i}") for i in range(k)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _ONE_OF_K, base_url, *map(str, (cache, ready, go, seeds))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for ready in readies
    ]
    deadline = time.monotonic() + 120
    while not all(ready.exists() for ready in readies) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    outputs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outputs.append(out.strip())
    return outputs


@pytest.mark.slow
def test_k_processes_sharing_a_cache_create_one_batch(live_server: str, tmp_path: Path) -> None:
    with httpx.Client(base_url=live_server) as http:

        def batch_ids() -> set[str]:
            return {b["id"] for b in http.get("/batches", params={"limit": 100}).json()["data"]}

        before = batch_ids()
        outputs = run_k_processes(live_server, tmp_path / "study.sqlite", 3)
        created = batch_ids() - before
    assert outputs == ["6 0"] * 3
    assert len(created) == 1  # one batch, paid once, however many processes share the cache


def test_the_usage_reader_counts_only_integers() -> None:
    import numpy as np

    from nbcompletions._usage import USAGE_FIELDS, add_usage, token_counts, usage_counts

    usage = {"prompt_tokens": True, "completion_tokens": np.int64(3), "total_tokens": -1}
    assert token_counts({"usage": usage}) == {"completion_tokens": 3}
    assert token_counts({"usage": {"prompt_tokens": 2.0, "total_tokens": "5"}}) == {}
    assert token_counts({"usage": None}) == token_counts([]) == {}
    assert usage_counts(usage) == {
        "prompt_tokens": None,
        "completion_tokens": 3,
        "total_tokens": None,
    }
    assert type(usage_counts(usage)["completion_tokens"]) is int
    assert usage_counts("x") == usage_counts(None) == dict.fromkeys(USAGE_FIELDS)
    totals = {"prompt_tokens": 1, "completion_tokens": 1}
    add_usage(totals, {"usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}})
    assert totals == {"prompt_tokens": 5, "completion_tokens": 3}
