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
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._errors import RequestError
from ._sweep_prepare import (
    _client_concurrency,
    _error_fields,
    _failure_types,
    _prepare,
    _Prepared,
    _probe,
    _progress_bar,
    _refuse_ignored,
    _result,
)
from ._sweep_result import SweepResult
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

if TYPE_CHECKING:  # pragma: no cover
    from ._batch import BatchOptions

__all__ = ["asweep", "sweep"]


async def _execute(
    aclient: Any, prepared: _Prepared, *, max_concurrency: int | None, bar: Any, probe: bool
) -> SweepResult:
    grid, outcomes, store = prepared.grid, prepared.outcomes, prepared.cache
    failures = _failure_types()
    spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    n_failed = 0
    capabilities: dict[str, Any] | None = None
    try:
        if probe:
            capabilities = await _probe(aclient, prepared)
            _refuse_ignored(capabilities, prepared.grid)
        queue = iter(prepared.pending)
        workers = min(
            max_concurrency or _client_concurrency(aclient), max(len(prepared.pending), 1)
        )

        async def send(i: int) -> None:
            nonlocal n_failed
            point, outcome = grid.points[i], outcomes[i]
            started = time.perf_counter()
            try:
                completion = await aclient.complete_request(point.request)
            except failures as exc:
                outcome.error = _error_fields(exc)
                outcome.latency = time.perf_counter() - started
                n_failed += 1
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
            if bar is not None:
                bar.set_postfix(failed=n_failed, tokens=spent["total_tokens"], refresh=False)
                bar.update(1)

        async def worker() -> None:
            # One shared iterator: each worker takes the next pending request; no task per request.
            for i in queue:
                await send(i)

        if prepared.pending:
            tasks = [asyncio.ensure_future(worker()) for _ in range(workers)]
            try:
                await asyncio.gather(*tasks)
            except BaseException:
                # A bug or a cancellation: stop every worker before the cache is closed below.
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
    finally:
        if bar is not None:
            bar.close()
        if prepared.owns_cache and store is not None:
            store.close()

    return _result(aclient, prepared, spent, n_failed, capabilities)


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
    batch: bool | BatchOptions = False,
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
    options = _batch_options(batch)
    prepared = _prepare(client, prompt, repeats, cache, max_concurrency, budget, fields)
    bar = _progress_bar(
        len(prepared.grid.points), progress, len(prepared.grid.points) - len(prepared.pending)
    )
    if options is not None:
        from ._batch import run_batches

        return await run_batches(client, prepared, options, bar=bar, probe=probe)
    return await _execute(client, prepared, max_concurrency=max_concurrency, bar=bar, probe=probe)


def _batch_options(batch: Any) -> BatchOptions | None:
    if batch is False or batch is None:
        return None
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
    batch: bool | BatchOptions = False,
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
    bar.

    ``batch=True`` (or a `BatchOptions`) sends the grid through the Batch API instead of live
    requests (``/v1/files`` and ``/v1/batches``: half the price on OpenAI, hours instead of
    seconds) and returns the same result; with a ``cache`` an interrupted call reattaches to its
    running batches on the next call instead of paying twice (see `nbcompletions._batch`).

    Works from plain code and from a Jupyter cell (no await); a kernel interrupt stops it cleanly.
    """
    from ._loop import run_sync

    aclient = as_async(client)
    options = _batch_options(batch)
    prepared = _prepare(aclient, prompt, repeats, cache, max_concurrency, budget, fields)
    # The bar is made here, in the caller's thread, so Jupyter displays it under the calling cell.
    bar = _progress_bar(
        len(prepared.grid.points), progress, len(prepared.grid.points) - len(prepared.pending)
    )
    try:
        if options is not None:
            from ._batch import run_batches

            return run_sync(run_batches(aclient, prepared, options, bar=bar, probe=probe))
        return run_sync(
            _execute(aclient, prepared, max_concurrency=max_concurrency, bar=bar, probe=probe)
        )
    finally:
        # _execute closes these itself; this covers an interrupt that lands before it started.
        if bar is not None:
            bar.close()
        if prepared.owns_cache and prepared.cache is not None:
            prepared.cache.close()
