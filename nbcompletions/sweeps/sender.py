"""How a sweep's requests reach the endpoint: live workers, or the Batch API.

A `Sender` runs a `Plan` to its `SweepResult`. `LiveSender` sends the plan's pending requests
from a pool of workers (``max_concurrency``) fed by `PendingSource`, stores each answer in the
cache before it counts as finished, hands finished points to the sink and ends with
`finish`. `BatchSender` gives the same plan to the Batch path (`nbcompletions._batch`).

A request that still fails after the client's retries becomes an error row, and so does a 200
whose body holds no usable choice (``{}``, ``{"choices": "x"}``): it is not stored, so a re-run
sends it again. When the first ``fail_fast`` requests sent all fail the same way (a dead server,
a wrong URL or key), or every request sent does, the rest would too: the sweep stops and raises
`SweepError` with the first error (`FailureWatch`).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from .._cache import Cache
from .._chat import ChatRequest
from .._errors import SweepError
from .._gc_pause import spaced_gc
from .._grid import GridPoint
from .._model_card import needs_limits
from .._request import CompletionRequest
from .._secrets import secrets_of
from .._sweep_result import SweepResult
from .._types import AsyncCompletionsClient
from .finish import BatchWork, finish
from .outcome import Outcome, Tally, error_fields, usable_response
from .plan import Plan, check_endpoint, failure_types
from .sink import DatasetSink, MemorySink, client_vocab_size, open_sink
from .source import CacheCommits, PendingSource

if TYPE_CHECKING:  # pragma: no cover
    from .._batch import BatchOptions

__all__ = [
    "FAIL_FAST",
    "BatchSender",
    "FailureWatch",
    "LiveSender",
    "Sender",
    "batch_work",
]

#: A sweep stops when its first this-many requests sent all fail the same way.
FAIL_FAST = 8

#: Requests in flight when neither the sweep nor the client sets a limit.
UNLIMITED_WORKERS = 16


class Sender(Protocol):
    """Runs a plan: sends what it lacks, and returns the sweep's result."""

    async def run(self, plan: Plan, *, bar: Any, probe: bool) -> SweepResult: ...


class _Stop(Exception):
    """Raised inside a worker to stop the sweep (see `FailureWatch`)."""


def _kind_text(fields: Mapping[str, Any]) -> str:
    status = fields["error_status"]
    return f"{fields['error_type']} (HTTP {status})" if status is not None else fields["error_type"]


class FailureWatch:
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


async def read_model_card(aclient: AsyncCompletionsClient, plan: Plan) -> None:
    """The model card's vocabulary size for the frames' entropy bounds, read before anything is
    sent (a sweep answered from the cache alone sends nothing, and its frames must be the same)."""
    reader = getattr(aclient, "model_card_limits", None)
    if reader is not None and any(
        needs_limits(
            request.logprobs if isinstance(request, CompletionRequest) else request.top_logprobs
        )
        for request in plan.grid.points.distinct_requests()
    ):
        await reader(plan.grid.model)


class LiveSender:
    """Sends a plan's requests live, ``max_concurrency`` at a time (default: the client's limit).

    ``tally`` holds what this run sent so far, also after an interrupt."""

    def __init__(
        self,
        aclient: AsyncCompletionsClient,
        *,
        max_concurrency: int | None = None,
        fail_fast: int | None = FAIL_FAST,
    ) -> None:
        self.aclient = aclient
        self.max_concurrency = max_concurrency
        self.fail_fast = fail_fast
        self.tally = Tally()

    def workers(self, plan: Plan) -> int:
        limit = self.max_concurrency or self.aclient.max_concurrency
        if not isinstance(limit, int) or limit <= 0:
            limit = UNLIMITED_WORKERS
        return min(limit, max(plan.n_pending, 1))

    async def run(self, plan: Plan, *, bar: Any, probe: bool) -> SweepResult:
        sink: MemorySink | DatasetSink | None = None
        commits = CacheCommits(plan.cache) if plan.cache is not None else None
        try:
            capabilities = await check_endpoint(self.aclient, plan) if probe else None
            await read_model_card(self.aclient, plan)
            sink = open_sink(plan, lambda: client_vocab_size(self.aclient))
            with spaced_gc():  # fewer collections while requests are in flight (see _gc_pause)
                await _LiveRun(self, plan, sink, bar, commits, governed=probe).send_all()
            if isinstance(sink, DatasetSink):
                await sink.own_directory()
        except BaseException:
            if sink is not None:
                sink.abort()  # what finished stays on disk, even after an interrupt
            raise
        finally:
            if bar is not None:
                bar.close()
            try:
                if commits is not None:
                    commits.flush()  # responses that arrived just before the sweep stopped
            finally:
                plan.close_cache()
        return finish(plan, sink, self.tally, capabilities)


class _LiveRun:
    """One live run: workers share one `PendingSource`, so no task is made per request."""

    def __init__(
        self,
        sender: LiveSender,
        plan: Plan,
        sink: MemorySink | DatasetSink,
        bar: Any,
        commits: CacheCommits | None,
        *,
        governed: bool = True,
    ) -> None:
        self.sender, self.plan, self.sink, self.bar, self.commits = sender, plan, sink, bar, commits
        # probe=False sends every request as it is; else the report decides each one.
        self.governed = governed
        self.source = PendingSource(plan, sink.finished)
        self.watch = FailureWatch(sender.fail_fast)
        self.failures = failure_types()
        self.secrets = secrets_of(sender.aclient)
        self.chat_request: Any = getattr(sender.aclient, "chat_request", None)

    async def send_all(self) -> None:
        source = self.source
        renewing = asyncio.ensure_future(source.keep_alive()) if source.store is not None else None
        try:
            await self.run_workers()
            # Requests another process claimed: read its answers as they land; send those
            # whose claim expired (a crashed process) ourselves.
            while source.elsewhere:
                for point, outcome in source.answered_elsewhere():
                    self.sink.finished(point, outcome)
                    self.sender.tally.saved += 1 + len(self.plan.copies(point))
                    self.advance()
                if source.take_over():
                    await self.run_workers()
                elif source.elsewhere:
                    await asyncio.sleep(source.poll_interval)
        finally:
            if renewing is not None:
                renewing.cancel()
                await asyncio.gather(renewing, return_exceptions=True)
        if self.sender.fail_fast is not None and self.watch.dead():
            raise self.failed(stopped=False) from self.watch.first

    def failed(self, *, stopped: bool) -> SweepError:
        tally = self.sender.tally
        return self.watch.error(
            sent=tally.sent, total=self.plan.n_pending, cache=self.plan.cache, stopped=stopped
        )

    async def run_workers(self) -> None:
        count = self.sender.workers(self.plan)
        tasks = [asyncio.ensure_future(self.worker()) for _ in range(count)]
        try:
            await asyncio.gather(*tasks)
        except BaseException as exc:
            # A dead endpoint, a bug or a cancellation: stop every worker before the cache is
            # closed.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if isinstance(exc, _Stop):
                raise self.failed(stopped=True) from self.watch.first
            raise

    async def worker(self) -> None:
        while (point := self.source.next()) is not None:
            await self.send(point)

    async def send_request(self, request: CompletionRequest | ChatRequest) -> Any:
        """Send one request to its API (`ChatRequest` to chat_request: `plan_sweep` checked that
        the client has it)."""
        if isinstance(request, ChatRequest):
            return await self.chat_request(request)
        return await self.sender.aclient.complete_request(request)

    async def send(self, point: GridPoint) -> None:
        tally = self.sender.tally
        tally.sent += 1
        started = time.perf_counter()
        try:
            aclient = self.sender.aclient
            if isinstance(point.request, ChatRequest):
                completion = await self.chat_request(point.request)
            elif self.governed:
                completion = await aclient.complete_request(point.request, path="sweep-live")
                tally.flags.update(getattr(completion, "flags", ()))
            else:
                completion = await aclient.complete_as_is(point.request)
            raw = usable_response(completion.raw)
        except self.failures as exc:
            outcome = Outcome(
                error=error_fields(exc, self.secrets), latency=time.perf_counter() - started
            )
            tally.failed += 1
            self.source.failed(point.key)
            stop = self.watch.failure(exc, outcome.error or {})
            self.sink.finished(point, outcome)
            if stop:
                raise _Stop from None
        else:
            self.watch.success()
            # The body as received, where the client kept it (ours does).
            body = getattr(completion, "_body", None)
            latency = time.perf_counter() - started
            if isinstance(point.request, ChatRequest):
                outcome = Outcome.received(raw, latency, body)
            else:
                # Kept parsed: a completion's answer holds few containers (~20 with logprobs=5),
                # and `spaced_gc` keeps collections few; kept as bytes, each would be parsed
                # twice (20,000 requests: 451-507 req/s as bytes, 497-539 parsed, alternating).
                outcome = Outcome(response=raw, latency=latency)
            if self.commits is not None:
                await self.commits.put(point.key, raw, outcome.latency, body)
                tally.saved += 1 + len(self.plan.grid.points.copies(point.request_id))
            tally.spend(outcome.usage)
            self.sink.finished(point, outcome)
        self.advance()

    def advance(self) -> None:
        if self.bar is not None:
            tally = self.sender.tally
            self.bar.set_postfix(failed=tally.failed, tokens=tally.total_tokens, refresh=False)
            self.bar.update(1)


def batch_work(plan: Plan) -> BatchWork:
    """The plan as the Batch path reads it: every outcome, cache hits read now."""
    points = plan.grid.points
    outcomes = [Outcome() for _ in range(len(points))]
    pending: list[int] = []
    for chunk in plan.originals():
        hits = plan.cache.get_many(p.key for p in chunk) if plan.cache is not None else {}
        for point in chunk:
            hit = hits.get(point.key)
            if hit is None:
                pending.append(point.request_id)
            else:
                outcomes[point.request_id] = Outcome.hit(hit)
    same_as = [(i, points.original(i)) for i in plan.members if points.original(i) != i]
    return BatchWork(
        plan.grid,
        outcomes,
        plan.cache,
        plan.owns_cache,
        plan.estimate,
        plan.estimate_method,
        pending,
        len(pending),
        same_as,
        plan.results,
        plan.members,
        plan.shard,
    )


class BatchSender:
    """Sends a plan through the Batch API (``/v1/files`` and ``/v1/batches``)."""

    def __init__(self, aclient: AsyncCompletionsClient, options: BatchOptions) -> None:
        self.aclient = aclient
        self.options = options

    async def run(self, plan: Plan, *, bar: Any, probe: bool) -> SweepResult:
        from .._batch import run_batches

        return await run_batches(self.aclient, batch_work(plan), self.options, bar=bar, probe=probe)
