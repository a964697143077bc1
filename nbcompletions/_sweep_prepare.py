"""What a sweep does before and after sending, whichever way it sends (live or by Batch).

Before: expand and validate the grid, read the cache, check the budget, measure the endpoint
(`_probe`, `_refuse_ignored`). After: the in-memory `SweepResult` (`_result`). `_sweep` sends live
and `_batch` through the Batch API; both build on this module, so neither imports the other back.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._cache import Cache
from ._errors import APIError, BudgetError, ConformanceError, NBCompletionsError, RequestError
from ._grid import Grid, estimate_tokens, expand_grid
from ._request import check_optional_count
from ._secrets import redact_exception_text, secrets_of
from ._sweep_result import SweepResult, _build_frames, _Outcome, _requests_frame
from ._types import AsyncCompletionsClient

__all__: list[str] = []

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


async def _probe(aclient: AsyncCompletionsClient, prepared: _Prepared) -> dict[str, Any] | None:
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


def _result(
    aclient: AsyncCompletionsClient | None,
    prepared: _Prepared,
    spent: dict[str, int],
    n_failed: int,
    capabilities: dict[str, Any] | None,
    vocab_size: int | None = None,
) -> SweepResult:
    """The `SweepResult` once every pending request has its outcome (live or by Batch);
    ``vocab_size`` is used when there is no client to ask (results loaded from files)."""
    grid, outcomes = prepared.grid, prepared.outcomes
    assert outcomes is not None
    assert prepared.pending is not None
    for duplicate, original in prepared.same_as:
        source, target = outcomes[original], outcomes[duplicate]
        target.response, target.error, target.latency = (
            source.response,
            source.error,
            source.latency,
        )
        if source.error:
            n_failed += 1
    requests = _requests_frame(grid, outcomes)
    cached = requests[requests["status"] == "cached"]
    usage = {
        **spent,
        "requests": len(grid.points),
        "sent": len(prepared.pending),
        "cached_requests": len(cached),
        "failed_requests": n_failed,
        "cached_tokens": int(cached["total_tokens"].fillna(0).sum()),
        "estimate": prepared.estimate,
        "estimate_method": prepared.estimate_method,
        "axes": grid.axes,
    }
    return SweepResult(
        requests,
        usage=usage,
        capabilities=capabilities,
        builder=lambda: _build_frames(
            grid, outcomes, requests, vocab_size if aclient is None else _vocab_size(aclient)
        ),
    )


def _vocab_size(client: AsyncCompletionsClient | None) -> int | None:
    value = client.vocab_size if client is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None
