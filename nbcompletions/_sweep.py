"""Parameter sweeps: a grid of requests, sent concurrently, cached on disk, returned as tidy frames.

``sweep(client, prompt=["To be", "Once"], temperature=[0.2, 0.7, 1.2], repeats=20,
cache="study.sqlite")`` sends 2 x 3 x 20 = 120 requests and returns a `SweepResult` whose frames
carry every request field as a column, so a study is a ``groupby`` away.

A sweep is the stages of `nbcompletions.sweeps`: a plan (`plan_sweep`), a sender (live workers or
the Batch API) fed from the cache, a sink (memory or a Parquet dataset) and `finish`. Responses
are written to the cache as they arrive; a re-run sends only what is missing. Grid points that
are the same request (one prompt under two names, a value listed twice) are sent once per repeat
and share the response, with or without a cache, so a run and its re-run from the cache agree.
A request that still fails after the client's retries becomes rows with ``error`` set; the
sweep goes on, and warns (`SweepWarning`) with the count and the commonest error. But when the
first ``fail_fast`` requests sent all fail the same way (a dead server, a wrong URL or key), or
every request sent does, the rest would too: the sweep stops and raises `SweepError` with the
first error. What finished is in the cache either way.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import APIError, RequestError
from ._manifest import asweep_manifest
from ._sweep_result import SweepResult
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async
from .sweeps.finish import warn_failures
from .sweeps.plan import Plan, plan_sweep
from .sweeps.sender import FAIL_FAST, BatchSender, LiveSender, Sender

if TYPE_CHECKING:  # pragma: no cover
    from ._batch import BatchOptions

__all__ = ["SweepInterrupted", "asweep", "sweep"]


class SweepInterrupted(KeyboardInterrupt):
    """A sweep stopped by Ctrl-C or a kernel interrupt: one line saying what was kept and how
    to resume, instead of a traceback through the event loop."""

    __module__ = "nbcompletions"  # shown as nbcompletions.SweepInterrupted, where it is exported

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines and nothing else
        return [f"{type(self).__name__}: {self}"]


def _progress_bar(plan: Plan, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    initial = plan.total - plan.n_pending
    return tqdm(total=plan.total, initial=initial, desc="sweep", unit="req", dynamic_ncols=True)


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


def _sender(
    aclient: AsyncCompletionsClient,
    batch: Any,
    results: Any,
    max_concurrency: int | None,
    fail_fast: int | None,
) -> Sender:
    options = _batch_options(batch, results)
    if options is not None:
        return BatchSender(aclient, options)
    return LiveSender(aclient, max_concurrency=max_concurrency, fail_fast=fail_fast)


def _interrupted(plan: Plan, sender: Sender) -> SweepInterrupted:
    """What an interrupt kept, in one line."""
    total = plan.total
    if not isinstance(sender, LiveSender):
        where = f" ({str(plan.cache.path)!r})" if plan.cache is not None else ""
        return SweepInterrupted(
            f"interrupted: the batches keep running on the server; rerun the same call to "
            f"collect them{where}"
        )
    if plan.cache is None:
        got = sender.tally.sent - sender.tally.failed
        return SweepInterrupted(
            f"interrupted: {got:,} of {total:,} responses received and not kept (no cache=); "
            "give cache='study.sqlite' so that a rerun resumes"
        )
    saved = min(total, total - plan.pending_points + sender.tally.saved)
    return SweepInterrupted(
        f"interrupted: {saved:,} of {total:,} responses saved in {str(plan.cache.path)!r}; "
        "rerun the same call to resume"
    )


async def _keep_manifest(
    client: AsyncCompletionsClient, plan: Plan, results: Any, wanted: bool
) -> None:
    """Record the endpoint's manifest beside the sweep's results directory or cache file, or check
    the endpoint against the one recorded (`DriftWarning`). An endpoint that cannot answer the
    probes now is left to the sweep, whose rows say why; the manifest is recorded on a later run.
    """
    if not wanted:
        return
    if results is not None:
        where = Path(results)
    elif plan.cache is not None:
        where = Path(plan.cache.path)
    else:
        return
    try:
        await asweep_manifest(client, where)
    except APIError:
        return


async def asweep(
    client: AsyncCompletionsClient,
    prompt: Any = None,
    *,
    messages: Any = None,
    repeats: int = 1,
    cache: Any = None,
    max_concurrency: int | None = None,
    budget: float | None = None,
    progress: bool = True,
    probe: bool = True,
    results: str | os.PathLike[str] | None = None,
    batch: bool | BatchOptions = False,
    fail_fast: int | None = FAIL_FAST,
    shard: tuple[int, int] | None = None,
    manifest: bool = True,
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
    sender = _sender(client, batch, results, max_concurrency, fail_fast)
    plan = plan_sweep(
        client,
        prompt,
        {**fields, "messages": messages},
        repeats=repeats,
        cache=cache,
        max_concurrency=max_concurrency,
        budget=budget,
        results=results,
        shard=shard,
        fail_fast=fail_fast,
    )
    await _keep_manifest(client, plan, results, manifest and probe)
    result = await sender.run(plan, bar=_progress_bar(plan, progress), probe=probe)
    warn_failures(result)
    return result


def sweep(
    client: HasAsyncClient,
    prompt: Any = None,
    *,
    messages: Any = None,
    repeats: int = 1,
    cache: Any = None,
    max_concurrency: int | None = None,
    budget: float | None = None,
    progress: bool = True,
    probe: bool = True,
    results: str | os.PathLike[str] | None = None,
    batch: bool | BatchOptions = False,
    fail_fast: int | None = FAIL_FAST,
    shard: tuple[int, int] | None = None,
    manifest: bool = True,
    **fields: Any,
) -> SweepResult:
    """Send every combination of the listed field values, ``repeats`` times each.

    ``sweep(client, prompt={"hamlet": "To be", "tale": "Once upon"}, temperature=[0.2, 0.7, 1.2],
    max_tokens=32, repeats=20, cache="study.sqlite")``: lists are axes, scalars fixed (see
    `nbcompletions._grid` for ``prompt`` and ``stop``; ``messages=`` instead of ``prompt=`` sweeps
    Chat Completions, conversations an axis like prompts). Every request is validated before the
    first is sent; ``budget`` (tokens) refuses a sweep whose estimate exceeds it (`BudgetError`).
    ``cache`` (a path or a `Cache`) stores each response as it arrives, so after an interrupt the
    same call resumes and sends only what is missing. ``max_concurrency`` caps requests in flight
    (default: the client's limit, which also applies). ``probe`` asks the endpoint once what it
    supports (``result.capabilities``; remembered by the client and the cache). ``progress`` shows a
    tqdm bar. ``results`` (a directory) streams the frames to disk as a Parquet dataset while the
    sweep runs, so memory stays flat however big the grid; the result then reads its frames from the
    files on first access (see `nbcompletions.sweeps.dataset`; query them with pandas or DuckDB).
    Failed requests become rows with ``error`` set and a `SweepWarning`; but when the first
    ``fail_fast`` requests sent (default 8) all fail the same way, or every request sent does, the
    sweep stops and raises `SweepError` with the first error (``fail_fast=None``: never).

    ``shard=(i, k)`` runs the i-th of k disjoint slices of the grid (by a hash of each request);
    ``load_sweep([dir1, dir2, ...])`` merges their results directories.

    ``batch=True`` (or a `BatchOptions`) sends the grid through the Batch API (half the price on
    OpenAI, hours instead of seconds); with a ``cache`` a rerun reattaches to its running batches.

    ``manifest``: with a ``cache`` or ``results``, record the endpoint beside them on the first run
    and warn (`DriftWarning`) on a later one if it has changed (`nbcompletions._manifest`).
    Works from plain code and from a Jupyter cell (no await); an interrupt stops it with one line
    (`SweepInterrupted`) saying what was saved and that a rerun resumes.
    """
    from ._loop import run_sync

    aclient = as_async(client)
    sender = _sender(aclient, batch, results, max_concurrency, fail_fast)
    plan = plan_sweep(
        aclient,
        prompt,
        {**fields, "messages": messages},
        repeats=repeats,
        cache=cache,
        max_concurrency=max_concurrency,
        budget=budget,
        results=results,
        shard=shard,
        fail_fast=fail_fast,
    )
    # The bar is made here, in the caller's thread, so Jupyter displays it under the calling cell.
    bar = _progress_bar(plan, progress)
    interrupted: SweepInterrupted | None = None
    try:
        run_sync(_keep_manifest(aclient, plan, results, manifest and probe))
        result = run_sync(sender.run(plan, bar=bar, probe=probe))
    except KeyboardInterrupt:
        interrupted = _interrupted(plan, sender)
    finally:
        # The sender closes these itself; this covers an interrupt that lands before it started.
        if bar is not None:
            bar.close()
        plan.close_cache()
    if interrupted is not None:
        raise interrupted from None
    warn_failures(result)
    return result
