"""Parameter sweeps: a grid of requests, sent concurrently, cached on disk, returned as tidy frames.

``sweep(client, prompt=["To be", "Once"], temperature=[0.2, 0.7, 1.2], repeats=20,
cache="study.sqlite")`` sends 2 x 3 x 20 = 120 requests and returns a `SweepResult` whose frames
carry every request field as a column, so a study is a ``groupby`` away.

Building the grid is `nbcompletions._grid`, the result `nbcompletions._sweep_result`; this module
runs a grid live. Responses are written to the cache as they arrive; a re-run sends only what is
missing. Grid points that are the same request (one prompt under two names, a value listed twice)
are sent once per repeat and share the response, with or without a cache, so a run and its re-run
from the cache agree. A request that still fails after the client's retries becomes rows with
``error`` set; the sweep goes on, and warns (`SweepWarning`) with the count and the commonest error.
But when the first ``fail_fast`` requests sent all fail the same way (a dead server, a wrong URL or
key), or every request sent does, the rest would too: the sweep stops and raises `SweepError` with
the first error. What finished is in the cache either way.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import time
import warnings
from collections import Counter
from collections.abc import Coroutine, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._cache import Cache, CachedResponse
from ._errors import RequestError, SweepError, SweepWarning
from ._grid import GridPoint
from ._request import check_optional_count
from ._results import ResultsWriter
from ._secrets import secrets_of
from ._sweep_prepare import (
    _chunks,
    _client_concurrency,
    _error_fields,
    _failure_types,
    _prepare,
    _Prepared,
    _probe,
    _progress_bar,
    _refuse_ignored,
    _vocab_size,
)
from ._sweep_result import SweepResult, _build_frames, _Outcome, _requests_frame
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

if TYPE_CHECKING:  # pragma: no cover
    from ._batch import BatchOptions

__all__ = ["asweep", "sweep"]


#: A sweep stops when its first this-many requests sent all fail the same way.
FAIL_FAST = 8


class _Stop(Exception):
    """Raised inside a worker to stop the sweep (see `_FailureWatch`)."""


class _FailureWatch:
    """Tells a dead endpoint from a few failed requests.

    Failures are compared by kind (error type and HTTP status). Until a request succeeds, a run of
    `limit` failures of one kind stops the sweep; so does a sweep whose every request sent failed
    one way, however few.
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.first: BaseException | None = None
        self.first_kind: tuple[Any, Any] | None = None
        self.kinds: Counter[str] = Counter()
        self.same = 0
        self.mixed = False
        self.succeeded = False

    def success(self) -> None:
        self.succeeded = True

    def failure(self, exc: BaseException, fields: Mapping[str, Any]) -> bool:
        """Record one failure; True when the sweep should stop now."""
        kind = (fields["error_type"], fields["error_status"])
        self.kinds[_kind_text(fields)] += 1
        if self.first is None:
            self.first, self.first_kind = exc, kind
        if kind == self.first_kind:
            self.same += 1
        else:
            self.mixed = True
        return self.dead() and self.limit is not None and self.same >= self.limit

    def dead(self) -> bool:
        """Every request so far failed, and the same way."""
        return self.first is not None and not self.succeeded and not self.mixed

    def error(self, *, sent: int, total: int, cache: Cache | None, stopped: bool) -> SweepError:
        assert self.first is not None
        kind = self.kinds.most_common(1)[0][0]
        if stopped:
            what = (
                f"the first {self.same} requests sent all failed the same way ({kind}), so the "
                f"sweep stopped: {total - sent} of {total} were not sent"
            )
        else:
            what = f"every request sent ({self.same} of {total}) failed the same way ({kind})"
        kept = (
            f"; what finished is in the cache {str(cache.path)!r} and the same call sends only "
            "what is missing"
            if cache is not None
            else ""
        )
        message = (
            f"{what}{kept}. Check the endpoint (fail_fast=None turns failures into error rows "
            f"instead). The first error: {self.first}"
        )
        error = SweepError(message, first=self.first, failed=self.same, sent=sent, total=total)
        error.__cause__ = self.first
        return error


def _kind_text(fields: Mapping[str, Any]) -> str:
    status = fields["error_status"]
    return f"{fields['error_type']} (HTTP {status})" if status is not None else fields["error_type"]


def _warn_failures(result: SweepResult) -> None:
    failed = result.n_failed
    if not failed:
        return
    requests = result.requests[result.requests["status"] == "error"]
    commonest = requests["error"].value_counts()
    text, count = str(commonest.index[0]), int(commonest.iloc[0])
    warnings.warn(
        f"{failed} of {len(result.requests)} sweep requests failed; their rows carry the error "
        f"(result.requests['error']). Commonest ({count}): {text[:300]}",
        SweepWarning,
        stacklevel=3,
    )


class _Puts:
    """Stores a sweep's responses in the cache a step of the event loop at a time: those that
    arrive in one step go in one transaction (a commit per response was most of what storing one
    cost). `put` returns once its response is committed, and only then does the request count as
    finished (rows, progress), so a crash loses nothing reported finished; a commit still pending
    when the sweep stops (cancelled, interrupted, failed) is made by `flush` before the cache
    closes, so no response that arrived is paid for twice."""

    def __init__(self, store: Cache) -> None:
        self.store = store
        self._items: list[tuple[str, Mapping[str, Any], float | None, bytes | None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._handle: asyncio.Handle | None = None

    async def put(
        self,
        key: str,
        response: Mapping[str, Any],
        latency: float | None,
        text: bytes | None = None,
    ) -> None:
        """Store ``response`` (``text``: its JSON as received); returns once it is committed."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._items.append((key, response, latency, text))
        self._waiters.append(waiter)
        if self._handle is None:
            self._handle = loop.call_soon(self._commit)
        await waiter

    def _commit(self) -> None:
        self._handle = None
        waiters = self._waiters
        try:
            self.flush()
        except Exception as exc:  # a CacheError: each request whose response it held raises it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
                    # Retrieved here: a waiter cancelled before it wakes would leave it unread.
                    waiter.exception()

    def flush(self) -> None:
        """Commit what is pending now (raises what the cache raises)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        if items:
            self.store.put_many(items)
        for waiter in waiters:
            if not waiter.done():  # one whose request was cancelled meanwhile
                waiter.set_result(None)


class _Claims:
    """The order requests are sent in, claimed in the cache first so that two processes sharing
    one cache file do not both pay (see `Cache.claim`); without a cache it only hands them out.
    Each grid point is made once, here, and travels with its request until it is written.
    """

    #: Requests claimed per transaction: one write for many requests.
    CHUNK = 64

    def __init__(self, store: Cache | None, pending: Iterable[GridPoint]) -> None:
        self.store = store
        self._source = iter(pending)
        self._ready: collections.deque[GridPoint] = collections.deque()
        self.elsewhere: list[GridPoint] = []  # claimed by another process, answer not seen yet
        self.poll_interval = 0.2 if store is None else min(1.0, store.lease / 10)

    def next(self) -> GridPoint | None:
        while not self._ready:
            chunk = list(itertools.islice(self._source, self.CHUNK))
            if not chunk:
                return None
            if self.store is None:
                self._ready.extend(chunk)
                break
            held = set(self.store.claim(point.key for point in chunk))
            for point in chunk:
                (self._ready if point.key in held else self.elsewhere).append(point)
        return self._ready.popleft()

    def failed(self, key: str) -> None:
        if self.store is not None:  # let another process (or a re-run) try it
            self.store.release([key])

    def answered_elsewhere(self) -> list[tuple[GridPoint, CachedResponse]]:
        assert self.store is not None
        hits = self.store.get_many(point.key for point in self.elsewhere)
        done = [(point, hits[point.key]) for point in self.elsewhere if point.key in hits]
        self.elsewhere = [point for point in self.elsewhere if point.key not in hits]
        return done

    def take_over(self) -> bool:
        """Claim what another process had claimed but let expire; True if any is now ours."""
        assert self.store is not None
        held = set(self.store.claim(point.key for point in self.elsewhere))
        mine = [point for point in self.elsewhere if point.key in held]
        self.elsewhere = [point for point in self.elsewhere if point.key not in held]
        self._source = iter(mine)
        return bool(mine)

    async def keep_alive(self) -> None:
        assert self.store is not None
        while True:
            await asyncio.sleep(self.store.lease / 3)
            self.store.renew()


async def _execute(
    aclient: AsyncCompletionsClient,
    prepared: _Prepared,
    *,
    max_concurrency: int | None,
    bar: Any,
    probe: bool,
    fail_fast: int | None = FAIL_FAST,
) -> SweepResult:
    grid, store = prepared.grid, prepared.cache
    points = grid.points
    failures = _failure_types()
    secrets = secrets_of(aclient)
    spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    n_failed = n_sent = 0
    watch = _FailureWatch(fail_fast)
    capabilities: dict[str, Any] | None = None
    writer: ResultsWriter | None = None
    puts: _Puts | None = None
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

    def finished(point: GridPoint) -> None:
        """Streaming: hand ``point`` (and the points that share its request) to the writer."""
        if writer is None or not isinstance(outcomes, dict):
            return
        i = point.request_id
        outcome = outcomes.pop(i)
        writer.add(point, outcome)
        for j in points.copies(i):
            writer.add(
                points[j],
                _Outcome(
                    outcome.response, outcome.latency, outcome.cached, outcome.error, outcome.entry
                ),
            )

    def streamed_pending() -> Iterator[GridPoint]:
        # Cache hits go straight to the writer; only misses are handed out to send.
        for chunk in _chunks(len(points)):
            originals = [points[i] for i in chunk if points.original(i) == i]
            hits = store.get_many(p.key for p in originals) if store is not None else {}
            for point in originals:
                hit = hits.get(point.key)
                if hit is None:
                    yield point
                else:
                    outcome = outcome_of(point.request_id)
                    outcome.entry, outcome.latency, outcome.cached = hit, hit.latency, True
                    finished(point)

    try:
        if probe:
            capabilities = await _probe(aclient, prepared)
            _refuse_ignored(capabilities, prepared.grid)
        pending: Iterable[GridPoint] = (
            (points[i] for i in prepared.pending)
            if prepared.pending is not None
            else streamed_pending()
        )
        claims = _Claims(store, pending)
        puts = _Puts(store) if store is not None else None
        workers = min(max_concurrency or _client_concurrency(aclient), max(prepared.n_pending, 1))

        async def send(point: GridPoint) -> None:
            nonlocal n_failed, n_sent
            n_sent += 1
            outcome = outcome_of(point.request_id)
            started = time.perf_counter()
            try:
                completion = await aclient.complete_request(point.request)
            except failures as exc:
                outcome.error = _error_fields(exc, secrets)
                outcome.latency = time.perf_counter() - started
                n_failed += 1
                claims.failed(point.key)
                if watch.failure(exc, outcome.error):
                    finished(point)
                    raise _Stop from None
            else:
                watch.success()
                outcome.latency = time.perf_counter() - started
                outcome.response = completion.raw
                if puts is not None:
                    # The body as received, where the client kept it (ours does).
                    body = getattr(completion, "_body", None)
                    await puts.put(point.key, completion.raw, outcome.latency, body)
                usage = completion.raw.get("usage") or {}
                for name in spent:
                    value = usage.get(name) if isinstance(usage, Mapping) else None
                    if isinstance(value, int):
                        spent[name] += value
            finished(point)
            if bar is not None:
                bar.set_postfix(failed=n_failed, tokens=spent["total_tokens"], refresh=False)
                bar.update(1)

        async def worker() -> None:
            # Workers share one source of indices: no task per request.
            while (point := claims.next()) is not None:
                await send(point)

        async def run_workers() -> None:
            tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
            try:
                await asyncio.gather(*tasks)
            except BaseException as exc:
                # A dead endpoint, a bug or a cancellation: stop every worker before the cache is
                # closed below.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if isinstance(exc, _Stop):
                    raise watch.error(
                        sent=n_sent, total=prepared.n_pending, cache=store, stopped=True
                    ) from watch.first
                raise

        renewing = asyncio.ensure_future(claims.keep_alive()) if store is not None else None
        try:
            await run_workers()
            # Requests another process claimed: read its answers as they land; send those
            # whose claim expired (a crashed process) ourselves.
            while claims.elsewhere:
                for point, hit in claims.answered_elsewhere():
                    outcome = outcome_of(point.request_id)
                    outcome.entry, outcome.latency, outcome.cached = hit, hit.latency, True
                    finished(point)
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
        if fail_fast is not None and watch.dead():
            raise watch.error(
                sent=n_sent, total=prepared.n_pending, cache=store, stopped=False
            ) from watch.first
    finally:
        if bar is not None:
            bar.close()
        try:
            if puts is not None:
                puts.flush()  # responses that arrived just before the sweep stopped
        finally:
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
    batch: bool | BatchOptions = False,
    fail_fast: int | None = FAIL_FAST,
    **fields: Any,
) -> SweepResult:
    """The async twin of `sweep`, for an `AsyncClient`: ``await asweep(aclient, ...)``.

    Cancelling the task stops the sweep; what finished is in the cache (with ``batch``, the
    batches keep running and the next call reattaches to them).
    """
    if as_async(client) is not client:
        raise TypeError(
            "asweep() needs an AsyncClient; for a Client call "
            "nbcompletions.sweep(...), which works in Jupyter without await"
        )
    options = _batch_options(batch, results)
    check_optional_count("fail_fast", fail_fast)
    prepared = _prepare(client, prompt, repeats, cache, max_concurrency, budget, fields, results)
    bar = _progress_bar(
        len(prepared.grid.points), progress, len(prepared.grid.points) - prepared.n_pending
    )
    result = await _run(client, prepared, options, max_concurrency, bar, probe, fail_fast)
    _warn_failures(result)
    return result


def _run(
    aclient: AsyncCompletionsClient,
    prepared: _Prepared,
    options: BatchOptions | None,
    max_concurrency: int | None,
    bar: Any,
    probe: bool,
    fail_fast: int | None,
) -> Coroutine[Any, Any, SweepResult]:
    """The coroutine that sends a prepared grid: through the Batch API, or live."""
    if options is not None:
        from ._batch import run_batches

        return run_batches(aclient, prepared, options, bar=bar, probe=probe)
    return _execute(
        aclient,
        prepared,
        max_concurrency=max_concurrency,
        bar=bar,
        probe=probe,
        fail_fast=fail_fast,
    )


def _batch_options(batch: Any, results: Any = None) -> BatchOptions | None:
    if batch is False or batch is None:
        return None
    if results is not None:
        raise RequestError(
            "results",
            "results= (streaming to disk) is for live sweeps; a batch sweep keeps its results in "
            "memory and in the cache: drop results= or batch=",
            allowed="None with batch",
            value=results,
        )
    from ._batch import BatchOptions

    if batch is True:
        return BatchOptions()
    if isinstance(batch, BatchOptions):
        return batch
    raise RequestError(
        "batch",
        f"batch must be True, False or an nbcompletions.BatchOptions; got {batch!r}",
        allowed="True, False or BatchOptions(...)",
        value=batch,
    )


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
    batch: bool | BatchOptions = False,
    fail_fast: int | None = FAIL_FAST,
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
    Failed requests become rows with ``error`` set and a `SweepWarning`; but when the first
    ``fail_fast`` requests sent (default 8) all fail the same way, or every request sent does, the
    sweep stops and raises `SweepError` with the first error (``fail_fast=None``: never).

    ``batch=True`` (or a `BatchOptions`) sends the grid through the Batch API instead of live
    requests (``/v1/files`` and ``/v1/batches``: half the price on OpenAI, hours instead of
    seconds) and returns the same result; with a ``cache`` an interrupted call reattaches to its
    running batches on the next call instead of paying twice (see `nbcompletions._batch`).

    Works from plain code and from a Jupyter cell (no await); a kernel interrupt stops it cleanly.
    """
    from ._loop import run_sync

    aclient = as_async(client)
    options = _batch_options(batch, results)
    check_optional_count("fail_fast", fail_fast)
    prepared = _prepare(aclient, prompt, repeats, cache, max_concurrency, budget, fields, results)
    # The bar is made here, in the caller's thread, so Jupyter displays it under the calling cell.
    bar = _progress_bar(
        len(prepared.grid.points), progress, len(prepared.grid.points) - prepared.n_pending
    )
    try:
        result = run_sync(_run(aclient, prepared, options, max_concurrency, bar, probe, fail_fast))
    finally:
        # _execute closes these itself; this covers an interrupt that lands before it started.
        if bar is not None:
            bar.close()
        if prepared.owns_cache and prepared.cache is not None:
            prepared.cache.close()
    _warn_failures(result)
    return result
