"""The last step of every sweep, live or by Batch: its ``usage`` and its `SweepResult`.

``usage`` holds the tokens this run spent (cache hits excluded), the requests it covers and
sent, what the cache answered and saved, what failed, the pre-flight estimate and the grid's
axes (and the shard, for a sharded run). Tokens are read by `nbcompletions.sweeps.outcome`
alone, so the live and the batch path count them the same way.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .._cache import Cache
from .._errors import APIError, SweepWarning
from .._grid import Grid
from .._sweep_result import SweepResult
from .outcome import Outcome, Tally, error_fields, usable_response
from .plan import Plan
from .sink import MemorySink, Sink

__all__ = ["BatchWork", "finish", "finish_batch", "warn_failures"]


def finish(
    plan: Plan, sink: Sink, tally: Tally, capabilities: dict[str, Any] | None
) -> SweepResult:
    """The sweep's usage and result, once every point of the plan has finished."""
    usage: dict[str, Any] = {
        **tally.spent(),
        "requests": plan.total,
        "sent": tally.sent,
        "cached_requests": sink.counts.cached,
        "failed_requests": sink.counts.failed,
        "cached_tokens": sink.counts.cached_tokens,
        "estimate": plan.estimate,
        "estimate_method": plan.estimate_method,
        "axes": plan.grid.axes,
    }
    if plan.shard is not None:
        usage["shard"] = list(plan.shard)
    if tally.flags:
        usage["conformance_flags"] = sorted(tally.flags)
    return sink.result(usage, capabilities)


def warn_failures(result: SweepResult) -> None:
    """A `SweepWarning` with the count and the commonest error, when any request failed."""
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


@dataclass
class BatchWork:
    """A plan as the Batch path (`nbcompletions._batch`) reads it: every grid point's outcome
    (cache hits filled in), the request ids to send, and the points that copy one of them."""

    grid: Grid
    outcomes: list[Outcome]
    cache: Cache | None
    owns_cache: bool
    estimate: int
    estimate_method: str
    pending: list[int]
    n_pending: int
    same_as: list[tuple[int, int]] = field(default_factory=list)  # (copy, point it copies)
    results: Path | None = None
    members: Sequence[int] | None = None
    shard: tuple[int, int] | None = None

    def plan(self) -> Plan:
        members = range(len(self.grid.points)) if self.members is None else self.members
        return Plan(
            self.grid,
            self.cache,
            self.owns_cache,
            members,
            self.n_pending,
            self.estimate,
            self.estimate_method,
            self.results,
            self.shard,
        )


def _checked(outcome: Outcome) -> Outcome:
    """A batch answer without a usable choice is an error row, as it is live (`usable_response`)."""
    if outcome.error is None and outcome.response is not None:
        try:
            usable_response(outcome.response)
        except APIError as exc:
            return Outcome(error=error_fields(exc, []), latency=outcome.latency)
    return outcome


def finish_batch(
    vocab_size: int | None,
    work: BatchWork,
    spent: dict[str, int],
    capabilities: dict[str, Any] | None,
) -> SweepResult:
    """`finish` for the Batch path, once its pending requests have outcomes."""
    plan = work.plan()
    sink = MemorySink(plan, lambda: vocab_size)
    points = plan.grid.points
    for i in plan.members:
        if points.original(i) == i:  # its copies take its outcome (MemorySink.finished)
            sink.finished(points[i], _checked(work.outcomes[i]))
    tally = Tally(sent=len(work.pending))
    for name, value in spent.items():
        setattr(tally, name, value)
    return finish(plan, sink, tally, capabilities)
