"""The server's scheduling: one loop between the routes and the engine.

Routes hand every completion to a scheduler and await its output; nothing else calls the engine.

`BatchScheduler` (the embedded model, and any engine with ``job()``) runs continuous batching, as
vLLM does: one thread owns a `DecodeBatch`, and each turn of its loop

1. drops the rows of requests whose client left (a closed stream, a disconnected plain request):
   such work stops within one decode step;
2. admits waiting requests, first come first served, while the memory they imply fits the
   server's bound (their prompts are prefilled; identical prompts once);
3. runs ONE decode step over all rows of all admitted requests, streamed or not, and hands each
   request its new chunks (a stream never queues again for an engine slot between chunks);
4. finishes the requests whose rows are all done.

Each request samples with its own generator over its own rows, so the same seed gives the same
completion whatever else shares the batch (the logits agree to float32 rounding: a row's values come
out of a bigger matrix product when other rows share it).

The work budget (`WorkBudget`) bounds what one request may ask for and what the server holds:

- per request, ``prompts x max(n, best_of) x (prompt + max_tokens)`` tokens (summed per prompt) must
  be at most ``max_request_tokens``, and the memory that implies at most ``engine_bytes``;
  otherwise the request is refused with a 400 naming the field to reduce, the work and the limit;
- overall, the memory of admitted requests (each row's key/value cache: layers x 2 x positions x
  n_embd x 4 bytes, plus its logits), plus the largest scratch one step of theirs allocates (a
  prefill pass's activations, the numpy sampler's float64 copies: `Job.scratch_bytes`), stays
  within ``engine_bytes`` (``max_memory_bytes`` less a reserve for the server's own buffers:
  lines in flight, threads, allocator slack); requests beyond it wait, and when ``max_waiting``
  requests already wait, a new one gets 503 with ``Retry-After``. A prefill pass is held to an
  eighth of ``engine_bytes`` (at least one prompt), so that a request of many prompts is not
  refused for its prefill.

`ThreadScheduler` serves an engine that only has ``complete`` and ``stream`` (a stand-in engine in
tests, a wrapper): each call runs in a worker thread, at most ``max_concurrency`` at once.

The async side is asyncio (uvicorn, and the in-process transport): the loop thread hands output to
each waiting request with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Protocol, cast

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar

from .._errors import RequestError
from .._request import CompletionRequest

if TYPE_CHECKING:  # pragma: no cover
    from ..model._engine import DecodeBatch, Job

__all__ = [
    "DEFAULT_MAX_MEMORY_BYTES",
    "DEFAULT_MAX_REQUEST_TOKENS",
    "DEFAULT_MAX_WAITING",
    "SERVER_RESERVE_BYTES",
    "BatchScheduler",
    "CompletionStream",
    "Overloaded",
    "Scheduler",
    "ThreadScheduler",
    "WorkBudget",
]

logger = logging.getLogger("nbcompletions.server")

#: Per request: prompts x max(n, best_of) x (prompt + max_tokens). 16384 lets through n=64 at the
#: embedded model's full context (256), or 64 prompts of 256 tokens scored with echo.
DEFAULT_MAX_REQUEST_TOKENS = 16384
#: Key/value cache and logits of all admitted requests together: 1 GiB.
DEFAULT_MAX_MEMORY_BYTES = 1 << 30
#: Requests that may wait for memory; one more gets 503 with Retry-After.
DEFAULT_MAX_WAITING = 256
#: A prefill pass may allocate this share of `WorkBudget.engine_bytes` (at least one prompt).
_PREFILL_SHARE = 8
#: Kept out of what requests may hold, for what the process grows by besides the engine's arrays:
#: the batch lines in flight, waiting requests, worker threads, allocator slack. Measured under
#: ``--max-memory-mb 128`` (``benchmarks/bench_server_limits.py --parts rss-distinct``): the
#: process grew 118 MiB while the engine held 111 MiB, 7 MiB besides it; twice that is kept.
SERVER_RESERVE_BYTES = 16 << 20
#: ... but at most this share of a small budget.
_RESERVE_SHARE = 4
#: Seconds a client is told to wait when the queue is full.
RETRY_AFTER_S = 1
#: An idle scheduler thread exits after this long; the next request starts a new one.
_IDLE_EXIT_S = 2.0
#: Cancellations remembered for `BatchScheduler.cancellations`.
_CANCEL_HISTORY = 100


@dataclasses.dataclass(frozen=True)
class WorkBudget:
    """How much work one request may ask for, and how much memory the server may hold.

    Attributes:
        max_request_tokens: largest ``prompts x max(n, best_of) x (prompt + max_tokens)`` of one
            request (400 above it).
        max_memory_bytes: what the process may grow by for requests: `engine_bytes` of it for the
            key/value cache plus logits of all running requests together, plus the largest
            scratch one of their steps allocates (one request needing more is refused with a
            400, others wait for memory), the rest for the server's own buffers.
        max_waiting: requests that may wait for memory at once; one more gets 503 + Retry-After.
    """

    max_request_tokens: int = DEFAULT_MAX_REQUEST_TOKENS
    max_memory_bytes: int = DEFAULT_MAX_MEMORY_BYTES
    max_waiting: int = DEFAULT_MAX_WAITING

    def __post_init__(self) -> None:
        for name in ("max_request_tokens", "max_memory_bytes", "max_waiting"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")

    @property
    def reserve_bytes(self) -> int:
        """What `max_memory_bytes` keeps for the server besides the engine: `SERVER_RESERVE_BYTES`,
        at most a quarter of it."""
        return min(SERVER_RESERVE_BYTES, self.max_memory_bytes // _RESERVE_SHARE)

    @property
    def engine_bytes(self) -> int:
        """What all running requests may hold together (cache, logits and one step's scratch)."""
        return self.max_memory_bytes - self.reserve_bytes

    @property
    def prefill_limit(self) -> int:
        """Bytes one prefill pass may allocate (`Job.prefill_limit`)."""
        return self.engine_bytes // _PREFILL_SHARE

    def check(self, job: Job) -> None:
        """Raise `RequestError` naming the field to reduce when ``job`` is over budget."""
        plan = job.plan
        prompts = len(plan.prompts)
        rows = plan.best_of
        if rows > 1:
            param = "best_of" if plan.best_of > plan.n else "n"
        elif prompts > 1:
            param = "prompt"
        else:
            param = "max_tokens"
        shape = (
            f"{prompts} prompt{'s' if prompts != 1 else ''} x {rows} "
            f"(max(n, best_of)) x (prompt tokens + max_tokens {plan.max_tokens})"
        )
        work = job.work_tokens
        if work > self.max_request_tokens:
            raise RequestError(
                param,
                f"This request needs {work} tokens of work ({shape}); this server allows at "
                f"most {self.max_request_tokens} per request. Reduce n, best_of, the number of "
                "prompts or max_tokens, or split the request.",
                allowed=f"prompts x max(n, best_of) x (prompt + max_tokens) <= "
                f"{self.max_request_tokens}",
                value=work,
            )
        held, scratch = job.memory_bytes, job.scratch_bytes
        memory = held + scratch
        if memory > self.engine_bytes:
            raise RequestError(
                param,
                f"This request would hold {_mib(held)} of key/value cache and logits "
                f"({shape}, {job.n_rows} rows) and {_mib(scratch)} of scratch while it "
                f"prefills or samples; this server holds at most {_mib(self.engine_bytes)} for "
                f"all requests (of {_mib(self.max_memory_bytes)}, {_mib(self.reserve_bytes)} "
                "kept for its own buffers). Reduce n, best_of, the number of prompts or "
                "max_tokens.",
                allowed=f"memory <= {self.engine_bytes} bytes",
                value=memory,
            )


def _mib(size: int) -> str:
    return f"{size / (1 << 20):.1f} MiB"


class Overloaded(Exception):
    """The server cannot take the request now; the client should retry after ``retry_after`` s."""

    def __init__(self, message: str, retry_after: int = RETRY_AFTER_S) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class CompletionStream(Protocol):
    """The chunks of one streamed completion, as the route pulls them."""

    async def next(self) -> dict[str, Any] | None:
        """The next chunk, or None at the end; raises what the engine raised."""
        ...

    async def aclose(self) -> None:
        """Stop generating (the client left or the stream ended); safe to call twice."""
        ...


class Scheduler(Protocol):
    """What the routes call: the only way work reaches the engine."""

    async def complete(
        self, request: CompletionRequest, *, disconnected: Callable[[], Awaitable[None]]
    ) -> dict[str, Any] | None:
        """The whole response; None when ``disconnected()`` returned first (the work stopped)."""
        ...

    async def stream(self, request: CompletionRequest) -> CompletionStream:
        """Start a stream; bad requests raise here, before anything is sent."""
        ...


# -- continuous batching ---------------------------------------------------------------------------
class _Ticket:
    """One request between the event loop that awaits it and the scheduler thread that runs it."""

    def __init__(self, job: Job, loop: asyncio.AbstractEventLoop) -> None:
        self.job = job
        self.scratch = job.scratch_bytes  # computed once: it walks the prompts
        self._loop = loop
        self._lock = threading.Lock()
        self._items: collections.deque[dict[str, Any]] = collections.deque()
        self._wakeup = asyncio.Event()
        self.finished = False
        self.error: BaseException | None = None
        self.cancelled = False  # set by the event loop; read by the scheduler thread
        self.steps_at_cancel = 0

    # -- scheduler thread --------------------------------------------------------------------------
    def deliver(self, items: list[dict[str, Any]], *, finished: bool = False) -> None:
        with self._lock:
            self._items.extend(items)
            self.finished = self.finished or finished
        self._wake()

    def fail(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
            self.finished = True
        self._wake()

    def _wake(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._wakeup.set)
        except RuntimeError:  # the awaiting event loop is closed: nobody is left to tell
            self.cancelled = True

    # -- event loop --------------------------------------------------------------------------------
    def cancel(self) -> None:
        if not self.cancelled:
            self.steps_at_cancel = self.job.steps
            self.cancelled = True

    async def take(self) -> tuple[list[dict[str, Any]], bool]:
        """Wait for output: (chunks so far, whether the job is done); raises the job's error."""
        while True:
            self._wakeup.clear()
            with self._lock:
                items = list(self._items)
                self._items.clear()
                finished, error = self.finished, self.error
            if error is not None:
                raise error
            if items or finished:
                return items, finished
            await self._wakeup.wait()


class _TicketStream:
    def __init__(self, ticket: _Ticket, scheduler: BatchScheduler) -> None:
        self._ticket = ticket
        self._scheduler = scheduler
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._finished = False

    async def next(self) -> dict[str, Any] | None:
        while not self._pending:
            if self._finished:
                return None
            items, self._finished = await self._ticket.take()
            self._pending.extend(items)
        return self._pending.popleft()

    async def aclose(self) -> None:
        self._scheduler.cancel(self._ticket)


@dataclasses.dataclass(frozen=True)
class Cancellation:
    """A request stopped because its client left: its decode steps before and after the scheduler
    was told (``steps_after`` is 0 or 1: the step that was already running)."""

    steps_before: int
    steps_after: int
    n_rows: int
    max_tokens: int


class BatchScheduler:
    """Continuous batching over an engine with ``job()`` (see the module docstring)."""

    def __init__(self, engine: Any, budget: WorkBudget) -> None:
        self.engine = engine
        self.budget = budget
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Ticket] = collections.deque()
        self._running: list[_Ticket] = []
        self._memory = 0  # bytes held by admitted jobs
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode steps run, all batches
        self.peak_memory = 0
        self.peak_rows = 0
        self.cancellations: collections.deque[Cancellation] = collections.deque(
            maxlen=_CANCEL_HISTORY
        )

    def __repr__(self) -> str:
        return (
            f"<BatchScheduler: {len(self._running)} running, {len(self._waiting)} waiting, "
            f"{_mib(self._memory)} of {_mib(self.budget.engine_bytes)}>"
        )

    @property
    def running(self) -> int:
        """Requests in the batch now."""
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests waiting for memory."""
        return len(self._waiting)

    @property
    def memory_bytes(self) -> int:
        """Memory held by the requests running now (their estimate: cache and logits)."""
        return self._memory

    # -- the event loop's side ---------------------------------------------------------------------
    async def _submit(self, request: CompletionRequest, *, stream: bool) -> _Ticket:
        if _small(request):
            job = self.engine.job(request, stream=stream)
        else:  # tokenizing thousands of prompts would stall every other request on this loop
            job = await anyio.to_thread.run_sync(lambda: self.engine.job(request, stream=stream))
        job.prefill_limit = self.budget.prefill_limit
        self.budget.check(job)
        ticket = _Ticket(job, asyncio.get_running_loop())
        with self._cond:
            if len(self._waiting) >= self.budget.max_waiting:
                raise Overloaded(
                    f"The server is busy: {len(self._waiting)} requests are waiting for memory "
                    f"({_mib(self._memory)} of {_mib(self.budget.engine_bytes)} in use). "
                    f"Retry after {RETRY_AFTER_S} s."
                )
            self._waiting.append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="nbcompletions-scheduler", daemon=True
                )
                self._thread.start()
            self._cond.notify()
        return ticket

    def cancel(self, ticket: _Ticket) -> None:
        """Stop ``ticket``'s work: it leaves the batch before the next decode step."""
        if ticket.finished:
            return
        ticket.cancel()
        with self._cond:
            self._cond.notify()

    async def complete(
        self, request: CompletionRequest, *, disconnected: Callable[[], Awaitable[None]]
    ) -> dict[str, Any] | None:
        ticket = await self._submit(request, stream=False)
        done = False

        async def watch(scope: anyio.CancelScope) -> None:
            await disconnected()
            if not done:
                self.cancel(ticket)
                scope.cancel()

        error: BaseException | None = None
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(watch, group.cancel_scope)
                try:
                    while not (await ticket.take())[1]:
                        pass
                except Exception as exc:  # raised below, outside the task group (no grouping)
                    error = exc
                done = True
                group.cancel_scope.cancel()
        finally:
            if not done:
                self.cancel(ticket)  # cancelled from outside (server shutdown) or disconnected
        if error is not None:
            raise error
        if ticket.cancelled and not ticket.finished:
            return None
        return ticket.job.response()

    async def stream(self, request: CompletionRequest) -> CompletionStream:
        return _TicketStream(await self._submit(request, stream=True), self)

    # -- the scheduler thread ----------------------------------------------------------------------
    def _loop(self) -> None:
        from ..model._engine import DecodeBatch

        batch = DecodeBatch(self.engine)
        while True:
            with self._cond:
                while not self._waiting and not self._running:
                    if not self._cond.wait(_IDLE_EXIT_S) and not self._waiting:
                        self._thread = None
                        return
                leaving = [t for t in self._running if t.cancelled]
                for ticket in leaving:
                    self._running.remove(ticket)
                    self._memory -= ticket.job.memory_bytes
                for ticket in [t for t in self._waiting if t.cancelled]:
                    self._waiting.remove(ticket)
                admitted = self._admissible(batch)
            for ticket in leaving:
                batch.remove(ticket.job)
                self.cancellations.append(
                    Cancellation(
                        steps_before=ticket.steps_at_cancel,
                        steps_after=ticket.job.steps - ticket.steps_at_cancel,
                        n_rows=ticket.job.n_rows,
                        max_tokens=ticket.job.plan.max_tokens,
                    )
                )
            try:
                if admitted:
                    batch.admit([ticket.job for ticket in admitted])
                    self._running.extend(admitted)
                if batch.jobs:
                    batch.step()
                    self.steps += 1
                    self.peak_rows = max(self.peak_rows, batch.rows)
            except Exception as exc:  # an engine bug: fail what was in the batch, keep serving
                with self._cond:
                    failed = self._running + [t for t in admitted if t not in self._running]
                logger.exception("the engine failed; failing the %d requests it ran", len(failed))
                with self._cond:
                    self._running = []
                    self._memory = 0
                for ticket in failed:
                    ticket.fail(exc)
                batch = DecodeBatch(self.engine)
                continue
            self._deliver()

    def _admissible(self, batch: DecodeBatch) -> list[_Ticket]:
        """Waiting tickets that fit in memory now, first come first served (caller holds the lock).

        What is held is the larger of the running requests' estimate and what ``batch`` holds
        (pages of rows that left stay in its pool); on top of it come the newcomers' memory and
        the larger of one step's scratch and the copy a growing pool makes.

        A request that alone fits the budget is admitted when nothing else runs, so it never
        waits forever; behind a request that does not fit yet, the others wait their turn too.
        """
        from ..model._job import combined_prefill_limit  # numpy and the model load lazily

        admitted: list[_Ticket] = []
        limit = self.budget.engine_bytes
        held = max(self._memory, batch.resident_bytes)
        # Steps run one at a time: the largest scratch of one job is what a step adds.
        scratch = max((ticket.scratch for ticket in self._running), default=0)
        rows, capacity = batch.rows, 0
        scratches: list[int] = []  # the admitted jobs': their prompts prefill together
        while self._waiting:
            job = self._waiting[0].job
            need = job.memory_bytes
            if job.plan.max_tokens > 0:
                rows, capacity = rows + job.n_rows, max(capacity, job.capacity)
            prefill = combined_prefill_limit(
                [*scratches, self._waiting[0].scratch], self.budget.prefill_limit
            )
            step = max(scratch, prefill, batch.growth_bytes(rows, capacity))
            if (self._running or admitted) and held + need + step > limit:
                break
            admitted.append(self._waiting.popleft())
            self._memory += need
            held += need
            scratch = max(scratch, admitted[-1].scratch)
            scratches.append(admitted[-1].scratch)
            self.peak_memory = max(self.peak_memory, held + step)
        self.peak_memory = max(self.peak_memory, held + scratch)
        return admitted

    def _deliver(self) -> None:
        done = [ticket for ticket in self._running if ticket.job.done]
        if done:
            # Memory is given back before the client hears it is done, so that what the client
            # does next (another request) finds it free.
            with self._cond:
                for ticket in done:
                    self._running.remove(ticket)
                    self._memory -= ticket.job.memory_bytes
        for ticket in self._running + done:
            job = ticket.job
            items = job.take() if job.stream else []
            if items or job.done:
                ticket.deliver(items, finished=job.done)


def _small(request: CompletionRequest) -> bool:
    """Whether planning ``request`` is quick enough to do on the event loop."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return len(prompt) <= 4096
    return isinstance(prompt, list) and len(prompt) <= 16


# -- engines without job(): a worker thread per call -----------------------------------------------
_DONE = object()


def _next_or_done(iterator: Iterator[dict[str, Any]]) -> Any:
    # StopIteration cannot cross a thread boundary through anyio, so end-of-stream is a sentinel.
    return next(iterator, _DONE)


class _ThreadStream:
    def __init__(
        self, scheduler: ThreadScheduler, iterator: Iterator[dict[str, Any]], first: Any
    ) -> None:
        self._scheduler = scheduler
        self._iterator = iterator
        self._first = first
        self._closed = False

    async def next(self) -> dict[str, Any] | None:
        if self._first is not None:
            chunk, self._first = self._first, None
        else:
            chunk = await self._scheduler.run(_next_or_done, self._iterator)
        if chunk is _DONE:
            self._first = _DONE
            return None
        return cast("dict[str, Any]", chunk)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        close = getattr(self._iterator, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(close)


class ThreadScheduler:
    """Runs ``engine.complete`` and each step of ``engine.stream`` in worker threads.

    At most ``max_concurrency`` engine calls run at once per event loop (anyio primitives must not
    be shared between loops, and the in-process app may be driven from several).
    """

    def __init__(self, engine: Any, max_concurrency: int) -> None:
        self.engine = engine
        self.max_concurrency = max_concurrency
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"nbcompletions-engine-{id(self)}")

    async def run(self, func: Callable[..., Any], *args: Any) -> Any:
        limiter = self._limiter.get(None)
        if limiter is None:
            limiter = anyio.CapacityLimiter(self.max_concurrency)
            self._limiter.set(limiter)
        return await anyio.to_thread.run_sync(func, *args, limiter=limiter)

    async def complete(
        self, request: CompletionRequest, *, disconnected: Callable[[], Awaitable[None]]
    ) -> dict[str, Any] | None:
        return cast("dict[str, Any]", await self.run(self.engine.complete, request))

    async def stream(self, request: CompletionRequest) -> CompletionStream:
        def start() -> tuple[Iterator[dict[str, Any]], Any]:
            iterator = iter(self.engine.stream(request))
            # The engine validates before its first chunk: pulling it here turns a bad request
            # into a proper 400 instead of an error event inside a 200 stream.
            return iterator, _next_or_done(iterator)

        iterator, first = await self.run(start)
        return _ThreadStream(self, iterator, first)


def scheduler_for(engine: Any, budget: WorkBudget, max_concurrency: int) -> Scheduler:
    """The scheduler an engine gets: batching when it can make jobs, worker threads otherwise."""
    if callable(getattr(engine, "job", None)):
        return BatchScheduler(engine, budget)
    return ThreadScheduler(engine, max_concurrency)
