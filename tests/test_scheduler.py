"""The server's scheduling, through the real app and the real embedded model: the work budget,
admission control, cancellation when a client leaves (raw ASGI and a real uvicorn socket), fairness
between streams and plain requests, and batching across requests."""

from __future__ import annotations

import json
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator, MutableMapping
from typing import Any

import anyio
import httpx
import pytest

from nbcompletions import CompletionRequest, RequestError
from nbcompletions.model._job import prefill_bytes
from nbcompletions.server import create_app
from nbcompletions.server._scheduler import BatchScheduler, WorkBudget

#: Guards the waits below, so a broken scheduler fails the test instead of hanging it.
HANG_GUARD_S = 60


@pytest.fixture
def model(embedded_engine: Any) -> str:
    return str(embedded_engine.model_id)


def _no_eot(engine: Any) -> dict[str, int]:
    return {str(engine.eot_token_id): -100}


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://embedded", timeout=HANG_GUARD_S
    )


def _scheduler(app: Any) -> BatchScheduler:
    scheduler = app.state.nbcompletions.scheduler
    assert isinstance(scheduler, BatchScheduler)
    return scheduler


async def _until(condition: Any) -> None:
    with anyio.fail_after(HANG_GUARD_S):
        while not condition():  # noqa: ASYNC110 - the state is the scheduler thread's, no Event
            await anyio.sleep(0.005)


# -- the work budget -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "param"),
    [
        # The hostile bodies: 97 s and 3.2 GB; 3.9 GB; a MemoryError 500.
        ({"prompt": ["O", "O", "O", "O"], "n": 128, "max_tokens": 255, "logprobs": 5}, "n"),
        ({"prompt": ["O"] * 20000, "max_tokens": 1}, "prompt"),
        ({"prompt": ["O"] * 16, "n": 128, "max_tokens": 16}, "n"),
        ({"prompt": ["O"] * 4, "n": 4, "best_of": 20, "max_tokens": 250}, "best_of"),
    ],
)
async def test_a_request_over_the_work_budget_is_400_naming_the_field_and_the_limit(
    embedded_engine: Any, model: str, body: dict[str, Any], param: str
) -> None:
    app = create_app(embedded_engine)
    async with _client(app) as client:
        response = await client.post("/v1/completions", json={"model": model, **body})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == param
    assert str(WorkBudget().max_request_tokens) in error["message"]
    job = embedded_engine.job(CompletionRequest(model=model, **body), stream=False)
    assert f"needs {job.work_tokens} tokens of work" in error["message"]
    assert _scheduler(app).running == 0  # nothing ran


async def test_the_budget_is_configurable_and_checks_memory_too(
    embedded_engine: Any, model: str
) -> None:
    small = WorkBudget(max_request_tokens=100, max_memory_bytes=300_000)
    app = create_app(embedded_engine, budget=small)
    async with _client(app) as client:
        over_tokens = await client.post(
            "/v1/completions", json={"model": model, "prompt": "To be", "max_tokens": 99}
        )
        over_memory = await client.post(
            "/v1/completions", json={"model": model, "prompt": "To be", "max_tokens": 60}
        )
        fits = await client.post(
            "/v1/completions", json={"model": model, "prompt": "To be", "max_tokens": 3}
        )
    assert over_tokens.status_code == 400
    assert over_tokens.json()["error"]["param"] == "max_tokens"
    assert "at most 100 per request" in over_tokens.json()["error"]["message"]
    assert over_memory.status_code == 400
    # A quarter of so small a budget is kept for the server's own buffers.
    assert (
        "at most 0.2 MiB for all requests (of 0.3 MiB, 0.1 MiB kept for its own buffers)"
        in (over_memory.json()["error"]["message"])
    )
    assert fits.status_code == 200


def test_the_budget_keeps_a_reserve_for_the_server_itself() -> None:
    """Under --max-memory-mb 128 the process grew 129 MiB with requests holding all 128 MiB: its
    own buffers, threads and allocator slack come on top. A reserve is kept out of what
    requests may hold: 16 MiB, at most a quarter of a small budget."""
    assert WorkBudget(max_memory_bytes=128 << 20).engine_bytes == 112 << 20
    assert WorkBudget().engine_bytes == (1 << 30) - (16 << 20)
    assert WorkBudget(max_memory_bytes=40 << 20).reserve_bytes == 10 << 20
    budget = WorkBudget(max_memory_bytes=128 << 20)
    assert budget.prefill_limit == budget.engine_bytes // 8


def test_the_default_budget_lets_normal_notebook_requests_through(embedded_engine: Any) -> None:
    budget = WorkBudget()
    ctx = embedded_engine.context_length
    normal = [
        dict(prompt="To be", n=20, max_tokens=64, logprobs=5),  # a sweep cell
        dict(prompt="x" * 200, n=64, max_tokens=ctx - 200),  # n=64 at the full context
        dict(prompt=[[1] * (ctx - 1)] * 64, max_tokens=1, echo=True, logprobs=1),  # scoring
        dict(prompt="KING HENRY:\n", n=128, max_tokens=100),  # OpenAI's largest n
    ]
    for fields in normal:
        budget.check(embedded_engine.job(CompletionRequest(**fields), stream=False))
    with pytest.raises(RequestError):
        budget.check(
            embedded_engine.job(CompletionRequest(prompt="x", n=128, max_tokens=255), stream=False)
        )


def _distinct_prompts(count: int, length: int) -> list[list[int]]:
    return [[(7 * p + 13 * i) % 4000 + 1 for i in range(length)] for p in range(count)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        # At least 8 rows each: the pool's first reservation is 8 slots, whose untouched pages cost
        # no RSS but do count in tracemalloc.
        dict(prompt="To be, or not to be, that is the question. " * 10, n=8, max_tokens=40),
        dict(prompt="To be, or not to be", n=64, max_tokens=8, top_p=0.9, logprobs=5),
        dict(prompt=_distinct_prompts(32, 120), max_tokens=2),
        dict(prompt=_distinct_prompts(16, 250), max_tokens=2),
        dict(prompt=_distinct_prompts(16, 250), max_tokens=0, echo=True, logprobs=1),
        dict(prompt=_distinct_prompts(64, 20), max_tokens=2, echo=True, logprobs=2),
    ],
    ids=["n8", "n64-top_p-logprobs", "32-prompts", "16-long-prompts", "echo-scoring", "echo-64"],
)
@pytest.mark.parametrize("limit", [None, WorkBudget(max_memory_bytes=128 << 20).prefill_limit])
def test_the_memory_estimate_covers_what_the_engine_allocates_for_a_request(
    embedded_engine: Any, fields: dict[str, Any], limit: int | None
) -> None:
    """What the budget counts for a request (its held cache and logits plus its scratch) covers
    what the engine allocates running it (numpy reports its buffers to tracemalloc): the
    prefill's activations and the sampler's float64 copies were not counted, and a batch of
    distinct prompts took RSS ~120 MiB past ``--max-memory-mb``."""
    from nbcompletions.model._engine import DecodeBatch

    job = embedded_engine.job(CompletionRequest(**fields), stream=False)
    job.prefill_limit = limit
    estimate = job.memory_bytes + job.scratch_bytes
    tracemalloc.start()
    try:
        DecodeBatch(embedded_engine).run([job])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert job.done
    assert peak <= estimate, f"allocated {peak} bytes, estimated {estimate}"
    assert estimate <= 3 * peak  # an estimate that wastes the budget refuses work for nothing
    if limit is not None:  # a pass holds to the limit, unless one prompt alone is more
        longest = max(len(prompt.ids) for prompt in job.plan.prompts)
        logprobs = job.plan.echo and job.plan.logprobs is not None
        one = prefill_bytes(embedded_engine, longest, 1, logprobs=logprobs)
        assert job.scratch_bytes <= max(limit, one, 16 << 20)  # 16 MiB: a 64-row sampled chunk


def test_many_rows_leaving_at_once_move_without_a_copy_of_them(embedded_engine: Any) -> None:
    """Rows that finish together leave holes that the last rows fill; moving them all with one
    fancy index copied them first (29 MiB when 44 rows of 92 left), past the budget."""
    from nbcompletions.model._engine import DecodeBatch

    prompt = "To be, or not to be, that is the question. " * 10
    no_eot = _no_eot(embedded_engine)
    short, long = (
        embedded_engine.job(
            CompletionRequest(prompt=prompt, n=32, max_tokens=tokens, logit_bias=no_eot),
            stream=False,
        )
        for tokens in (2, 4)
    )
    batch = DecodeBatch(embedded_engine)
    batch.admit([short, long])  # short's rows take slots 0..31, long's 32..63
    while not short.done:
        tracemalloc.start()
        try:
            batch.step()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
    moved_rows = 32 * embedded_engine.kv_bytes_per_position * (len(long.plan.prompts[0].ids) + 2)
    assert batch.rows == 32
    assert peak < moved_rows // 4, f"the step that moved 32 rows allocated {peak} bytes"


def test_the_batch_counts_pages_of_rows_that_left_and_the_copy_a_growing_pool_makes(
    embedded_engine: Any,
) -> None:
    """The pool keeps the pages of rows that left (the next rows reuse them) until it is replaced,
    and growing it copies the active rows while the old pool is still held: requests arriving
    one by one took RSS 189 MiB past idle under a 128 MiB budget, the doubling pool's copy."""
    from nbcompletions.model._engine import DecodeBatch

    kv = embedded_engine.kv_bytes_per_position
    no_eot = _no_eot(embedded_engine)
    short, long = (
        embedded_engine.job(
            CompletionRequest(prompt="To be, or not", n=8, max_tokens=tokens, logit_bias=no_eot),
            stream=False,
        )
        for tokens in (2, 6)
    )
    prompt = len(short.plan.prompts[0].ids)
    batch = DecodeBatch(embedded_engine)
    assert batch.resident_bytes == 0
    batch.admit([short, long])
    assert batch.resident_bytes == 16 * prompt * kv + 16 * embedded_engine.row_bytes
    while not short.done:
        batch.step()
    assert batch.rows == 8
    written = 8 * (prompt + 1) + 8 * (prompt + 2)  # short's slots as they left, long's now
    assert batch.resident_bytes >= written * kv + 8 * embedded_engine.row_bytes
    assert batch.growth_bytes(16, long.capacity) == 0  # room for 16 rows: no copy
    assert batch.growth_bytes(17, long.capacity) == 8 * (prompt + 2) * kv


@pytest.mark.slow
async def test_requests_beyond_the_memory_bound_wait_then_get_503_with_retry_after(
    embedded_engine: Any, model: str
) -> None:
    long: dict[str, Any] = {
        "model": model,
        "prompt": "To be",
        "max_tokens": 150,
        "logit_bias": _no_eot(embedded_engine),
    }
    job = embedded_engine.job(CompletionRequest(**long), stream=False)
    # Room for one such request at a time, and for one more to wait.
    budget = WorkBudget(max_memory_bytes=job.memory_bytes * 3 // 2, max_waiting=1)
    app = create_app(embedded_engine, budget=budget)
    async with _client(app) as client, anyio.create_task_group() as group:
        first: dict[str, httpx.Response] = {}
        second: dict[str, httpx.Response] = {}

        async def post(into: dict[str, httpx.Response]) -> None:
            into["r"] = await client.post("/v1/completions", json=long)

        group.start_soon(post, first)
        await _until(lambda: app.state.nbcompletions.scheduler is not None)
        scheduler = _scheduler(app)
        await _until(lambda: scheduler.running == 1)
        group.start_soon(post, second)
        await _until(lambda: scheduler.waiting == 1)
        third = await client.post("/v1/completions", json=long)
        assert third.status_code == 503
        assert third.headers["retry-after"] == "1"
        assert third.json()["error"]["code"] == "server_overloaded"
        assert "r" not in second
    assert first["r"].status_code == 200
    assert second["r"].status_code == 200  # it waited for memory, then ran
    assert scheduler.peak_memory <= budget.max_memory_bytes
    assert scheduler.memory_bytes == 0


# -- cancellation ----------------------------------------------------------------------------------
def _scope(body: bytes) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))],
        "client": ("127.0.0.1", 1),
        "server": ("embedded", 80),
    }


@pytest.mark.parametrize("stream", [False, True])
async def test_work_for_a_departed_client_stops_within_one_decode_step(
    embedded_engine: Any, model: str, stream: bool
) -> None:
    """Raw ASGI: the client disconnects after the request has run a few decode steps."""
    max_tokens = 250
    body = json.dumps(
        {
            "model": model,
            "prompt": "O",
            "n": 4,
            "max_tokens": max_tokens,
            "stream": stream,
            "logit_bias": _no_eot(embedded_engine),
        }
    ).encode()
    app = create_app(embedded_engine)
    server = app.state.nbcompletions
    requested = False
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await _until(lambda: server.scheduler is not None and server.scheduler.steps >= 5)
        return {"type": "http.disconnect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(HANG_GUARD_S):
        await app(_scope(body), receive, send)
    scheduler = _scheduler(app)
    await _until(lambda: len(scheduler.cancellations) == 1)
    (stopped,) = scheduler.cancellations
    assert stopped.steps_before >= 5
    assert stopped.steps_after <= 1
    assert stopped.steps_before + stopped.steps_after < max_tokens
    assert scheduler.running == 0
    assert scheduler.memory_bytes == 0
    if not stream:
        assert not any(m["type"] == "http.response.body" and m.get("body") for m in sent)


@pytest.fixture
def uvicorn_app(embedded_engine: Any) -> Iterator[tuple[Any, int]]:
    """The app under a real uvicorn server on 127.0.0.1, in a thread."""
    import uvicorn

    app = create_app(embedded_engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + HANG_GUARD_S
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    yield app, port
    server.should_exit = True
    thread.join(HANG_GUARD_S)
    sock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_closed_connection_stops_the_work_within_one_decode_step(
    uvicorn_app: tuple[Any, int], embedded_engine: Any, model: str, stream: bool
) -> None:
    app, port = uvicorn_app
    max_tokens = 250
    body = json.dumps(
        {
            "model": model,
            "prompt": "O",
            "n": 4,
            "max_tokens": max_tokens,
            "stream": stream,
            "logit_bias": _no_eot(embedded_engine),
        }
    ).encode()
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    )
    deadline = time.monotonic() + HANG_GUARD_S
    with socket.create_connection(("127.0.0.1", port), timeout=HANG_GUARD_S) as conn:
        conn.sendall(head + body)
        if stream:
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")  # the stream has begun
        while (
            app.state.nbcompletions.scheduler is None or app.state.nbcompletions.scheduler.steps < 5
        ):
            assert time.monotonic() < deadline
            time.sleep(0.005)
    scheduler = _scheduler(app)
    while not scheduler.cancellations:
        assert time.monotonic() < deadline, "the work went on after the client left"
        time.sleep(0.005)
    (stopped,) = scheduler.cancellations
    assert stopped.steps_after <= 1
    assert stopped.steps_before + stopped.steps_after < max_tokens


# -- fairness and batching -------------------------------------------------------------------------
@pytest.mark.slow
async def test_a_stream_is_not_starved_by_plain_requests(embedded_engine: Any, model: str) -> None:
    """16 long plain requests first, then a short stream: it finishes while they still run."""
    ban = _no_eot(embedded_engine)
    app = create_app(embedded_engine)
    order: list[str] = []
    async with _client(app) as client, anyio.create_task_group() as group:

        async def plain(i: int) -> None:
            body = {"model": model, "prompt": f"{i}", "max_tokens": 120, "logit_bias": ban}
            response = await client.post("/v1/completions", json=body)
            assert response.status_code == 200
            order.append("plain")

        for i in range(16):
            group.start_soon(plain, i)
        await _until(lambda: app.state.nbcompletions.scheduler is not None)
        await _until(lambda: _scheduler(app).running == 16)
        body = {"model": model, "prompt": "To be", "max_tokens": 10, "stream": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            lines = [line async for line in response.aiter_lines() if line]
        order.append("stream")
        assert lines[-1] == "data: [DONE]"
    assert order[0] == "stream"
    assert _scheduler(app).peak_rows >= 17  # the stream decoded in the same batch


async def test_concurrent_requests_decode_together_and_each_keeps_its_seed(
    embedded_engine: Any, model: str
) -> None:
    bodies: list[dict[str, Any]] = [
        {"model": model, "prompt": p, "max_tokens": 12, "seed": s, "temperature": t, "logprobs": 2}
        for p, s, t in [("To be", 1, 1.0), ("ROMEO:\n", 2, 0.7), ("O", 3, 1.3), ("HAMLET:", 4, 0)]
        * 2
    ]
    alone = [embedded_engine.complete(CompletionRequest(**body)) for body in bodies]
    app = create_app(embedded_engine)
    async with _client(app) as client:
        # Placeholders, each replaced by its response before the list is read.
        responses: list[httpx.Response] = [None] * len(bodies)  # type: ignore[list-item]

        async def post(i: int) -> None:
            responses[i] = await client.post("/v1/completions", json=bodies[i])

        async with anyio.create_task_group() as group:
            for i in range(len(bodies)):
                group.start_soon(post, i)
    assert _scheduler(app).peak_rows >= 2  # requests really shared decode steps
    for response, want in zip(responses, alone, strict=True):
        got = response.json()
        assert [c["text"] for c in got["choices"]] == [c["text"] for c in want["choices"]]
        assert got["usage"] == want["usage"]
