"""Parameter sweeps: a grid of requests, sent concurrently, cached on disk, returned as tidy frames.

``sweep(client, prompt=["To be", "Once"], temperature=[0.2, 0.7, 1.2], repeats=20,
cache="study.sqlite")`` sends 2 x 3 x 20 = 120 requests and returns a `SweepResult` whose frames
carry every request field as a column, so a study is a ``groupby`` away.

Building the grid is `nbcompletions._grid`, the result `nbcompletions._sweep_result`; this module
runs a grid live. Responses are written to the cache as they arrive; a re-run sends only what is
missing. Grid points that are the same request (one prompt under two names, a value listed twice)
are sent once per repeat and share the response, with or without a cache, so a run and its re-run
from the cache agree. A request that still fails after the client's retries becomes rows with
``error`` set; the sweep goes on.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cache import Cache, CachedResponse
from ._errors import APIError, BudgetError, ConformanceError, NBCompletionsError, RequestError
from ._grid import Grid, GridPoint, estimate_tokens, expand_grid
from ._request import check_optional_count
from ._results import ResultsWriter
from ._secrets import redact_exception_text, secrets_of
from ._sweep_result import SweepResult, _build_frames, _Outcome, _requests_frame
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

__all__ = ["asweep", "sweep"]

#: Requests in flight when neither the sweep nor the client sets a limit.
_UNLIMITED_WORKERS = 16


def _error_fields(exc: BaseException, secrets: list[str]) -> dict[str, Any]:
    # Redacted again here whatever the client did: a client of another kind, or an error raised
    # outside its request path, may still carry a key the server echoed.
    message = redact_exception_text(exc, secrets)
    if isinstance(exc, APIError):
        kind = exc.type or exc.code or type(exc).__name__
        return {"error_type": kind, "error_status": exc.status, "error_message": exc.message}
    return {"error_type": type(exc).__name__, "error_status": None, "error_message": message}


def _progress_bar(total: int, enabled: bool, initial: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="sweep", unit="req", dynamic_ncols=True)


def _client_concurrency(client: AsyncCompletionsClient) -> int:
    """The worker count: the client's own limit (`AsyncClient.max_concurrency`), if it has one."""
    value = client.max_concurrency
    return value if isinstance(value, int) and value > 0 else _UNLIMITED_WORKERS


def _check_budget(value: Any) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise RequestError(
            "budget",
            f"budget must be a number of tokens >= 0 or None; got {value!r}",
            allowed="a number >= 0 or None",
            value=value,
        )


# Failures that become error rows. Anything else (a bug, a cancellation) stops the sweep.
def _failure_types() -> tuple[type[BaseException], ...]:
    import httpx

    return (NBCompletionsError, httpx.HTTPError, OSError, TimeoutError, asyncio.TimeoutError)


class _Claims:
    """The order requests are sent in, claimed in the cache first so that two processes sharing
    one cache file do not both pay (see `Cache.claim`); without a cache it only hands out indices.
    """

    #: Requests claimed per transaction: one write for many requests.
    CHUNK = 64

    def __init__(self, store: Cache | None, grid: Grid, pending: Iterable[int]) -> None:
        self.store, self.grid = store, grid
        self._source = iter(pending)
        self._ready: collections.deque[int] = collections.deque()
        self.elsewhere: list[int] = []  # claimed by another process, answer not seen yet
        self.poll_interval = 0.2 if store is None else min(1.0, store.lease / 10)

    def next(self) -> int | None:
        while not self._ready:
            chunk = list(itertools.islice(self._source, self.CHUNK))
            if not chunk:
                return None
            if self.store is None:
                self._ready.extend(chunk)
                break
            keys = [self.grid.points[i].key for i in chunk]  # points are made on access
            held = set(self.store.claim(keys))
            for i, key in zip(chunk, keys, strict=True):
                (self._ready if key in held else self.elsewhere).append(i)
        return self._ready.popleft()

    def failed(self, key: str) -> None:
        if self.store is not None:  # let another process (or a re-run) try it
            self.store.release([key])

    def answered_elsewhere(self) -> list[tuple[int, CachedResponse]]:
        assert self.store is not None
        hits = self.store.get_many(self.grid.points[i].key for i in self.elsewhere)
        done = [
            (i, hits[self.grid.points[i].key])
            for i in self.elsewhere
            if self.grid.points[i].key in hits
        ]
        self.elsewhere = [i for i in self.elsewhere if self.grid.points[i].key not in hits]
        return done

    def take_over(self) -> bool:
        """Claim what another process had claimed but let expire; True if any is now ours."""
        assert self.store is not None
        held = set(self.store.claim(self.grid.points[i].key for i in self.elsewhere))
        mine = [i for i in self.elsewhere if self.grid.points[i].key in held]
        self.elsewhere = [i for i in self.elsewhere if self.grid.points[i].key not in held]
        self._source = iter(mine)
        return bool(mine)

    async def keep_alive(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(self.store.lease / 3)
            self.store.renew()


@dataclass
class _Prepared:
    grid: Grid
    outcomes: list[_Outcome] | None  # None when results stream to disk
    cache: Cache | None
    owns_cache: bool
    estimate: int
    estimate_method: str
    pending: list[int] | None  # None when results stream to disk: found chunk by chunk
    n_pending: int
    same_as: list[tuple[int, int]] = field(default_factory=list)  # (duplicate, point it copies)
    results: Path | None = None


#: Grid points read from the cache per query when results stream to disk.
_CHUNK = 1000


def _chunks(total: int) -> Iterator[range]:
    for start in range(0, total, _CHUNK):
        yield range(start, min(total, start + _CHUNK))


def _check_results(value: Any) -> Path | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | os.PathLike):
        raise RequestError(
            "results",
            f"results must be a directory path (for the sweep's Parquet dataset) or None; "
            f"got {value!r}",
            allowed="a directory path or None",
            value=value,
        )
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise RequestError(
            "results",
            f"results must be a directory for the sweep's Parquet dataset; {str(path)!r} is a file",
            allowed="a directory path or None",
            value=value,
        )
    return path


def _prepare(
    client: AsyncCompletionsClient,
    prompt: Any,
    repeats: int,
    cache: Any,
    max_concurrency: Any,
    budget: Any,
    fields: dict[str, Any],
    results: Any = None,
) -> _Prepared:
    """Expand, validate, read the cache and check the budget: all before a single request."""
    check_optional_count("max_concurrency", max_concurrency)
    _check_budget(budget)
    directory = _check_results(results)
    grid = expand_grid(client, prompt, repeats=repeats, **fields)
    owns = False
    store: Cache | None
    if cache is None or isinstance(cache, Cache):
        store = cache
    elif isinstance(cache, str | os.PathLike):
        store, owns = Cache(cache), True
    else:
        raise RequestError(
            "cache",
            f"cache must be a file path, a Cache or None; got {cache!r}",
            allowed="a path or a Cache",
            value=cache,
        )
    points = grid.points
    outcomes: list[_Outcome] | None = None
    pending: list[int] | None = None
    same_as: list[tuple[int, int]] = []
    if directory is None:
        outcomes = [_Outcome() for _ in points]
        if store is not None:
            hits = store.get_many(point.key for point in points)
            for point, outcome in zip(points, outcomes, strict=True):
                hit = hits.get(point.key)
                if hit is not None:
                    outcome.entry, outcome.latency, outcome.cached = hit, hit.latency, True
        # Grid points that are the same request (a prompt listed twice, a repeated axis value)
        # are sent once: their rows share its response, as they would on a re-run from the cache.
        pending = []
        for i, outcome in enumerate(outcomes):
            if outcome.cached:
                continue
            original = points.original(i)
            if original != i:
                same_as.append((i, original))
            else:
                pending.append(i)
        estimate, method = estimate_tokens([points[i].request for i in pending], model=grid.model)
        n_pending = len(pending)
    else:
        # Streaming to disk: nothing per request is kept; the cache is asked chunk by chunk now
        # for the estimate, and again while sending.
        estimate, n_pending, method = 0, 0, ""
        for chunk in _chunks(len(points)):
            originals = [points[i] for i in chunk if points.original(i) == i]
            present = store.keys_present(p.key for p in originals) if store is not None else set()
            todo = [p.request for p in originals if p.key not in present]
            part, method = estimate_tokens(todo, model=grid.model)
            estimate += part
            n_pending += len(todo)
    if budget is not None and estimate > budget:
        if owns and store is not None:
            store.close()
        raise BudgetError(
            f"this sweep can use up to ~{estimate:,} tokens ({n_pending} requests to send; "
            f"prompt tokens counted by {method}, completions as max_tokens x max(n, best_of)), "
            f"more than budget={budget:,}; lower max_tokens, repeats or the grid, or raise the "
            "budget",
            estimate=estimate,
            budget=int(budget),
        )
    return _Prepared(
        grid, outcomes, store, owns, estimate, method, pending, n_pending, same_as, directory
    )


async def _probe(aclient: Any, prepared: _Prepared) -> dict[str, Any] | None:
    from ._scoring import acapabilities, cached_capabilities

    meta_key = f"capabilities:{prepared.grid.endpoint}:{prepared.grid.model}"
    known = cached_capabilities(aclient)
    if known is None and prepared.cache is not None:
        known = prepared.cache.get_meta(meta_key)
    if known is None:
        try:
            known = await acapabilities(aclient)
        except _failure_types() as exc:
            return {"error": redact_exception_text(exc, secrets_of(aclient))}
    if prepared.cache is not None:
        prepared.cache.set_meta(meta_key, known)
    return known


def _refuse_ignored(capabilities: Mapping[str, Any] | None, grid: Grid) -> None:
    from ._conformance import ConformanceReport, check_sweep

    report = ConformanceReport.from_dict(capabilities) if capabilities else None
    problems = check_sweep(report, [p.request for p in grid.points]) if report else []
    if problems:
        raise ConformanceError(
            "this sweep asks for what the endpoint was measured not to do, so its results would "
            "be wrong; nothing was sent (probe=False sends anyway):\n- " + "\n- ".join(problems),
            check="sweep",
            detail="; ".join(problems),
        )


async def _execute(
    aclient: Any, prepared: _Prepared, *, max_concurrency: int | None, bar: Any, probe: bool
) -> SweepResult:
    grid, store = prepared.grid, prepared.cache
    points = grid.points
    failures = _failure_types()
    secrets = secrets_of(aclient)
    spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    n_failed = n_sent = 0
    capabilities: dict[str, Any] | None = None
    writer: ResultsWriter | None = None
    # In memory: every point's outcome. Streaming: only those not yet handed to the writer.
    outcomes: list[_Outcome] | dict[int, _Outcome]
    if prepared.outcomes is not None:
        outcomes = prepared.outcomes
    else:
        outcomes = {}
        assert prepared.results is not None
        vocab = _vocab_size(aclient)

        def build(part: Sequence[GridPoint], done: Sequence[_Outcome]) -> Any:
            requests = _requests_frame(grid, done, part)
            return (requests, *_build_frames(grid, done, requests, vocab, part))

        writer = ResultsWriter(prepared.results, grid, vocab, build)

    def outcome_of(i: int) -> _Outcome:
        if isinstance(outcomes, dict):
            return outcomes.setdefault(i, _Outcome())
        return outcomes[i]

    def finished(i: int) -> None:
        """Streaming: hand point ``i`` (and the points that share its request) to the writer."""
        if writer is None or not isinstance(outcomes, dict):
            return
        outcome = outcomes.pop(i)
        writer.add(i, outcome)
        for j in points.copies(i):
            writer.add(
                j,
                _Outcome(
                    outcome.response, outcome.latency, outcome.cached, outcome.error, outcome.entry
                ),
            )

    def streamed_pending() -> Iterator[int]:
        # Cache hits go straight to the writer; only misses are handed out to send.
        for chunk in _chunks(len(points)):
            originals = [points[i] for i in chunk if points.original(i) == i]
            hits = store.get_many(p.key for p in originals) if store is not None else {}
            for point in originals:
                hit = hits.get(point.key)
                if hit is None:
                    yield point.request_id
                else:
                    outcome = outcome_of(point.request_id)
                    outcome.entry, outcome.latency, outcome.cached = hit, hit.latency, True
                    finished(point.request_id)

    try:
        if probe:
            capabilities = await _probe(aclient, prepared)
            _refuse_ignored(capabilities, prepared.grid)
        pending: Iterable[int] = (
            prepared.pending if prepared.pending is not None else streamed_pending()
        )
        claims = _Claims(store, grid, pending)
        workers = min(max_concurrency or _client_concurrency(aclient), max(prepared.n_pending, 1))

        async def send(i: int) -> None:
            nonlocal n_failed, n_sent
            n_sent += 1
            point, outcome = points[i], outcome_of(i)
            started = time.perf_counter()
            try:
                completion = await aclient.complete_request(point.request)
            except failures as exc:
                outcome.error = _error_fields(exc, secrets)
                outcome.latency = time.perf_counter() - started
                n_failed += 1
                claims.failed(point.key)
            else:
                outcome.latency = time.perf_counter() - started
                outcome.response = completion.raw
                if store is not None:
                    store.put(point.key, completion.raw, latency=outcome.latency)
                usage = completion.raw.get("usage") or {}
                for name in spent:
                    value = usage.get(name) if isinstance(usage, Mapping) else None
                    if isinstance(value, int):
                        spent[name] += value
            finished(i)
            if bar is not None:
                bar.set_postfix(failed=n_failed, tokens=spent["total_tokens"], refresh=False)
                bar.update(1)

        async def worker() -> None:
            # Workers share one source of indices: no task per request.
            while (i := claims.next()) is not None:
                await send(i)

        async def run_workers() -> None:
            tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # A bug or a cancellation: stop every worker before the cache is closed below.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise

        renewing = asyncio.ensure_future(claims.keep_alive()) if store is not None else None
        try:
            await run_workers()
            # Requests another process claimed: read its answers as they land; send those
            # whose claim expired (a crashed process) ourselves.
            while claims.elsewhere:
                for i, hit in claims.answered_elsewhere():
                    outcome = outcome_of(i)
                    outcome.entry, outcome.latency, outcome.cached = hit, hit.latency, True
                    finished(i)
                    if bar is not None:
                        bar.update(1)
                if claims.take_over():
                    await run_workers()
                elif claims.elsewhere:
                    await asyncio.sleep(claims.poll_interval)
        finally:
            if renewing is not None:
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)
    finally:
        if bar is not None:
            bar.close()
        if prepared.owns_cache and store is not None:
            store.close()
        if writer is not None:
            writer.flush()  # what finished is on disk, even after an interrupt

    usage: dict[str, Any] = {
        **spent,
        "requests": len(points),
        "sent": n_sent,
        "estimate": prepared.estimate,
        "estimate_method": prepared.estimate_method,
        "axes": grid.axes,
    }
    if writer is not None:
        usage.update(
            cached_requests=writer.cached,
            failed_requests=writer.failed,
            cached_tokens=writer.cached_tokens,
        )
        writer.close(usage, capabilities)
        result = SweepResult(dataset=writer.directory, usage=usage, capabilities=capabilities)
        result._vocab_size = writer.vocab_size
        return result

    assert isinstance(outcomes, list)
    memory = outcomes
    for duplicate, original in prepared.same_as:
        source, target = memory[original], memory[duplicate]
        target.response, target.error, target.latency = (
            source.response,
            source.error,
            source.latency,
        )
        if source.error:
            n_failed += 1
    requests = _requests_frame(grid, memory)
    cached = requests[requests["status"] == "cached"]
    usage.update(
        cached_requests=len(cached),
        failed_requests=n_failed,
        cached_tokens=int(cached["total_tokens"].fillna(0).sum()),
    )
    return SweepResult(
        requests,
        usage=usage,
        capabilities=capabilities,
        builder=lambda: _build_frames(grid, memory, requests, _vocab_size(aclient)),
    )


def _vocab_size(client: AsyncCompletionsClient) -> int | None:
    value = client.vocab_size
    return value if isinstance(value, int) and not isinstance(value, bool) else None


async def asweep(
    client: AsyncCompletionsClient,
    prompt: Any = None,
    *,
    repeats: int = 1,
    cache: Any = None,
    max_concurrency: int | None = None,
    budget: float | None = None,
    progress: bool = True,
    probe: bool = True,
    results: str | os.PathLike[str] | None = None,
    **fields: Any,
) -> SweepResult:
    """The async twin of `sweep`, for an `AsyncClient`: ``await asweep(aclient, ...)``.

    Cancelling the task stops the sweep; what finished is in the cache.
    """
    if as_async(client) is not client:
        raise TypeError(
            "asweep() needs an AsyncClient; for a Client call "
            "nbcompletions.sweep(...), which works in Jupyter without await"
        )
    prepared = _prepare(client, prompt, repeats, cache, max_concurrency, budget, fields, results)
    bar = _progress_bar(
        len(prepared.grid.points), progress, len(prepared.grid.points) - prepared.n_pending
    )
    return await _execute(client, prepared, max_concurrency=max_concurrency, bar=bar, probe=probe)


def sweep(
    client: HasAsyncClient,
    prompt: Any = None,
    *,
    repeats: int = 1,
    cache: Any = None,
    max_concurrency: int | None = None,
    budget: float | None = None,
    progress: bool = True,
    probe: bool = True,
    results: str | os.PathLike[str] | None = None,
    **fields: Any,
) -> SweepResult:
    """Send every combination of the listed field values, ``repeats`` times each.

    ``sweep(client, prompt={"hamlet": "To be", "tale": "Once upon"}, temperature=[0.2, 0.7, 1.2],
    max_tokens=32, repeats=20, cache="study.sqlite")``: lists are axes, scalars fixed (see the
    module docstring for ``prompt`` and ``stop``). Every request is validated before the first is
    sent; ``budget`` (tokens) refuses a sweep whose estimate exceeds it (`BudgetError`). ``cache``
    (a path or a `Cache`) stores each response as it arrives, so after an interrupt the same call
    resumes and sends only what is missing. ``max_concurrency`` caps requests in flight (default:
    the client's limit, which also applies). ``probe`` asks the endpoint once what it supports
    (``result.capabilities``; remembered by the client and the cache). ``progress`` shows a tqdm
    bar. ``results`` (a directory) streams the frames to disk as a Parquet dataset while the sweep
    runs, so memory stays flat however big the grid; the result then reads its frames from the
    files on first access (see `nbcompletions._results`; query them with pandas or DuckDB).

    Works from plain code and from a Jupyter cell (no await); a kernel interrupt stops it cleanly.
    """
    from ._loop import run_sync

    aclient = as_async(client)
    prepared = _prepare(aclient, prompt, repeats, cache, max_concurrency, budget, fields, results)
    # The bar is made here, in the caller's thread, so Jupyter displays it under the calling cell.
    bar = _progress_bar(
        len(prepared.grid.points), progress, len(prepared.grid.points) - prepared.n_pending
    )
    try:
        return run_sync(
            _execute(aclient, prepared, max_concurrency=max_concurrency, bar=bar, probe=probe)
        )
    finally:
        # _execute closes these itself; this covers an interrupt that lands before it started.
        if bar is not None:
            bar.close()
        if prepared.owns_cache and prepared.cache is not None:
            prepared.cache.close()
