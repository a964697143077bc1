"""The plan of a sweep: which requests it covers and which it still has to send, decided once.

`plan_sweep` expands and validates the grid, opens the cache, takes this run's shard of the
grid, counts what is not in the cache yet and checks the budget, all before a single request;
`check_endpoint` then applies the endpoint's conformance report. Duplicates are decided one way,
by the grid (`GridPoints.original`): a point that sends the same request as an earlier one is
never sent, it shares that point's outcome (`Plan.copies`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .._cache import Cache
from .._checks import is_int, is_number
from .._errors import BudgetError, ConformanceError, RequestError
from .._grid import Grid, GridPoint, completion_budget, estimate_tokens, expand_grid
from .._request import CompletionRequest, check_optional_count
from .._secrets import redact_exception_text, secrets_of
from .._types import AsyncCompletionsClient

__all__ = [
    "CHUNK",
    "Plan",
    "check_endpoint",
    "check_shard",
    "failure_types",
    "plan_sweep",
    "probe_endpoint",
    "refuse_ignored",
]

#: Grid points looked up in the cache per query (and claimed per transaction: `source`).
CHUNK = 1000


def failure_types() -> tuple[type[BaseException], ...]:
    """Failures that become error rows; anything else (a bug, a cancellation) stops the sweep."""
    import asyncio

    import httpx

    from .._errors import NBCompletionsError

    return (NBCompletionsError, httpx.HTTPError, OSError, TimeoutError, asyncio.TimeoutError)


@dataclass
class Plan:
    """What a sweep covers (``members``: request ids in grid order, all of them or one shard's)
    and what it still has to send (``n_pending`` distinct requests not in the cache)."""

    grid: Grid
    cache: Cache | None
    owns_cache: bool
    members: Sequence[int]
    n_pending: int
    estimate: int
    estimate_method: str
    results: Path | None = None
    shard: tuple[int, int] | None = None
    pending_points: int = 0  # grid points without an answer: the pending and their copies

    @property
    def total(self) -> int:
        """Grid points this run covers (the progress bar's total)."""
        return len(self.members)

    def originals(self) -> Iterator[list[GridPoint]]:
        """The points that send a request (no copies), ``CHUNK`` at a time, in grid order."""
        points = self.grid.points
        chunk: list[GridPoint] = []
        for i in self.members:
            if points.original(i) == i:
                chunk.append(points[i])
                if len(chunk) == CHUNK:
                    yield chunk
                    chunk = []
        if chunk:
            yield chunk

    def copies(self, point: GridPoint) -> list[GridPoint]:
        """The later points that send ``point``'s request (in this run's shard, as it is)."""
        points = self.grid.points
        return [points[j] for j in points.copies(point.request_id)]

    def close_cache(self) -> None:
        """Close the cache if the sweep opened it (from a path)."""
        if self.owns_cache and self.cache is not None:
            self.cache.close()


def _check_budget(value: Any) -> None:
    if value is None:
        return
    if not is_number(value) or not value >= 0:
        raise RequestError(
            "budget",
            f"budget must be a number of tokens >= 0 or None; got {value!r}",
            allowed="a number >= 0 or None",
            value=value,
        )


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
    from .dataset import require_pyarrow

    require_pyarrow()
    return path


def check_shard(value: Any) -> tuple[int, int] | None:
    """``shard=(i, k)``: this run's slice, i in 0..k-1 (None: the whole grid)."""
    if value is None:
        return None
    ok = (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(is_int(v) for v in value)
        and value[1] >= 1
        and 0 <= value[0] < value[1]
    )
    if not ok:
        raise RequestError(
            "shard",
            f"shard must be (index, count) with 0 <= index < count, e.g. shard=(0, 4) for the "
            f"first of 4 slices; got {value!r}",
            allowed="(i, k) with integers 0 <= i < k",
            value=value,
        )
    return int(value[0]), int(value[1])


def _open_cache(cache: Any) -> tuple[Cache | None, bool]:
    if cache is None or isinstance(cache, Cache):
        return cache, False
    if isinstance(cache, str | os.PathLike):
        return Cache(cache), True
    raise RequestError(
        "cache",
        f"cache must be a file path, a Cache or None; got {cache!r}",
        allowed="a path or a Cache",
        value=cache,
    )


def _check_chat_client(client: AsyncCompletionsClient, grid: Grid) -> None:
    if grid.api == "chat" and not callable(getattr(client, "chat_request", None)):
        raise RequestError(
            "messages",
            f"a chat sweep (messages=) needs a client that sends chat requests (chat_request); "
            f"{type(client).__name__} has none",
            allowed="an nbcompletions Client or AsyncClient",
            value=type(client).__name__,
        )


def _check_chat_budget(plan: Plan, budget: Any) -> None:
    """A budget needs a bound on every chat request's completion: a chat request without
    max_completion_tokens (or max_tokens) may fill the model's context."""
    if budget is None or plan.grid.api != "chat":
        return
    for chunk in plan.originals():
        for point in chunk:
            if completion_budget(point.request) is None:
                raise RequestError(
                    "max_completion_tokens",
                    "budget= needs max_completion_tokens (or max_tokens) on every chat request: "
                    "without one a chat completion may run to the end of the model's context, "
                    "so no estimate bounds it",
                    allowed="an integer >= 0 with budget=",
                    value=None,
                )


def plan_sweep(
    client: AsyncCompletionsClient,
    prompt: Any,
    fields: dict[str, Any],
    *,
    repeats: int = 1,
    cache: Any = None,
    max_concurrency: Any = None,
    budget: Any = None,
    results: Any = None,
    shard: Any = None,
    fail_fast: Any = None,
) -> Plan:
    """Check every argument (``fail_fast`` too, which the sender uses), expand and validate the
    grid, take the shard, count what the cache lacks and check the budget."""
    check_optional_count("max_concurrency", max_concurrency)
    check_optional_count("fail_fast", fail_fast)
    _check_budget(budget)
    directory = _check_results(results)
    chosen = check_shard(shard)
    grid = expand_grid(client, prompt, repeats=repeats, **fields)
    _check_chat_client(client, grid)
    points = grid.points
    members: Sequence[int] = range(len(points))
    if chosen is not None:
        index, count = chosen
        members = [i for i in members if points.shard_of(i, count) == index]
    store, owns = _open_cache(cache)
    plan = Plan(grid, store, owns, members, 0, 0, "", directory, chosen)
    try:
        _check_chat_budget(plan, budget)
        _count_pending(plan)
        if budget is not None and plan.estimate > budget:
            raise BudgetError(
                f"this sweep can use up to ~{plan.estimate:,} tokens ({plan.n_pending} requests "
                f"to send; prompt tokens counted by {plan.estimate_method}, completions as "
                f"{_completion_part(plan.grid)}), more than budget={budget:,}; lower max_tokens, "
                "repeats or the grid, or raise the budget",
                estimate=plan.estimate,
                budget=int(budget),
            )
    except BaseException:
        plan.close_cache()
        raise
    return plan


def _completion_part(grid: Grid) -> str:
    if grid.api == "chat":
        return "max_completion_tokens x n"
    return "max_tokens x max(n, best_of)"


def _count_pending(plan: Plan) -> None:
    """The requests not in the cache yet and their token estimate, a chunk at a time (nothing
    per request is kept, so a 200,000-point plan costs no more memory than a small one)."""
    store, model, points = plan.cache, plan.grid.model, plan.grid.points
    method = estimate_tokens([], model=model)[1]
    for chunk in plan.originals():
        present = store.keys_present(p.key for p in chunk) if store is not None else set()
        todo = [p for p in chunk if p.key not in present]
        part, method = estimate_tokens([p.request for p in todo], model=model)
        plan.estimate += part
        plan.n_pending += len(todo)
        plan.pending_points += sum(1 + len(points.copies(p.request_id)) for p in todo)
    plan.estimate_method = method


async def check_endpoint(aclient: AsyncCompletionsClient, plan: Plan) -> dict[str, Any] | None:
    """The endpoint's report (`probe_endpoint`), applied: `refuse_ignored`."""
    capabilities = await probe_endpoint(aclient, plan.grid, plan.cache)
    refuse_ignored(capabilities, plan.grid, path="sweep-live")
    return capabilities


async def probe_endpoint(
    aclient: AsyncCompletionsClient, grid: Grid, cache: Cache | None
) -> dict[str, Any] | None:
    """What the endpoint supports, measured once and remembered by the client and the cache
    (``{"error": ...}`` when it cannot be measured)."""
    from .._scoring import acapabilities, cached_capabilities

    meta_key = f"capabilities:{grid.endpoint}:{grid.model}"
    known = cached_capabilities(aclient)
    if known is None and cache is not None:
        known = cache.get_meta(meta_key)
    if known is None:
        try:
            known = await acapabilities(aclient)
        except failure_types() as exc:
            return {"error": redact_exception_text(exc, secrets_of(aclient))}
    if cache is not None:
        cache.set_meta(meta_key, known)
    return known


def refuse_ignored(
    capabilities: Mapping[str, Any] | None, grid: Grid, *, path: str = "sweep-batch"
) -> None:
    """Raise `ConformanceError` when the grid asks for what ``capabilities`` says is ignored, or
    what the report refuses for any of its requests (`nbcompletions._governance.decide`).
    The report measures ``/v1/completions``: a chat grid is not judged by it.

    A live sweep (``path="sweep-live"``) sends each request as the report decides, with the
    detected profile's neutral sampling fields; a Batch sweep's requests go as they are."""
    if grid.api != "completions":
        return
    from .._conformance import ConformanceReport, check_sweep
    from .._governance import decide

    report = ConformanceReport.from_dict(capabilities) if capabilities else None
    if report is None:
        return
    requests = [p.request for p in grid.points if isinstance(p.request, CompletionRequest)]
    problems = check_sweep(report, requests, corrects_sampling=path == "sweep-live")
    refused: dict[str, tuple[int, str]] = {}
    for request in requests:
        error = decide(report, request, path=path).error
        # Past the context is one request's fault: a live sweep's error row, sent nowhere.
        if error is None or error.check == "context_length":
            continue
        if not any(f"{error.check!r}" in p for p in problems):
            count, message = refused.get(str(error.check), (0, str(error)))
            refused[str(error.check)] = (count + 1, message)
    problems += [f"{count} request(s): {message}" for count, message in refused.values()]
    if problems:
        raise ConformanceError(
            "this sweep asks for what the endpoint was measured not to do, so its results would "
            "be wrong; nothing was sent (probe=False sends anyway):\n- " + "\n- ".join(problems),
            check="sweep",
            detail="; ".join(problems),
        )
