"""Where a sweep's finished requests go: memory, or a Parquet dataset on disk.

Both take each finished point with `finished` (a point that sends a request brings the points
that copy it, `Plan.copies`), count it the same way (`SinkCounts`), and make the `SweepResult`
with `result`. `DatasetSink` writes parts as points finish, so memory stays flat; its writer owns
its directory (`nbcompletions.sweeps.dataset.DatasetWriter`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .._grid import GridPoint
from .._sweep_result import SweepResult
from .frames import build_frames, requests_frame
from .outcome import Outcome
from .plan import Plan

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from .._types import AsyncCompletionsClient

__all__ = [
    "DatasetSink",
    "MemorySink",
    "Sink",
    "SinkCounts",
    "client_vocab_size",
    "open_sink",
]


def client_vocab_size(client: AsyncCompletionsClient | None) -> int | None:
    """The client's vocabulary size, when it knows one (frames use it for entropy bounds)."""
    value = client.vocab_size if client is not None else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


@dataclass
class SinkCounts:
    """Grid points finished, found in the cache and failed, and the tokens the cache saved."""

    finished: int = 0
    cached: int = 0
    failed: int = 0
    cached_tokens: int = 0

    def add(self, outcome: Outcome) -> None:
        self.finished += 1
        if outcome.error is not None:
            self.failed += 1
        elif outcome.cached:
            self.cached += 1
            self.cached_tokens += outcome.usage["total_tokens"] or 0


class Sink(Protocol):
    """Takes finished grid points and makes the result."""

    counts: SinkCounts

    def finished(self, point: GridPoint, outcome: Outcome) -> None:
        """``point`` (and each point that copies it) has ``outcome``."""

    def result(self, usage: dict[str, Any], capabilities: dict[str, Any] | None) -> SweepResult:
        """The result, once every point has finished."""

    def abort(self) -> None:
        """The sweep stopped early: keep what can be kept."""


def _each(plan: Plan, point: GridPoint, outcome: Outcome) -> list[tuple[GridPoint, Outcome]]:
    return [(point, outcome), *((copy, outcome.copy()) for copy in plan.copies(point))]


class MemorySink:
    """Holds every outcome; frames are built on first access of the result."""

    def __init__(self, plan: Plan, vocab_size: Callable[[], int | None]) -> None:
        self.plan = plan
        self.counts = SinkCounts()
        self.outcomes: dict[int, Outcome] = {}
        self._vocab_size = vocab_size

    def finished(self, point: GridPoint, outcome: Outcome) -> None:
        for each, its_outcome in _each(self.plan, point, outcome):
            self.outcomes[each.request_id] = its_outcome
            self.counts.add(its_outcome)

    def result(self, usage: dict[str, Any], capabilities: dict[str, Any] | None) -> SweepResult:
        grid = self.plan.grid
        points = [grid.points[i] for i in self.plan.members]
        outcomes = [self.outcomes.get(i) or Outcome() for i in self.plan.members]
        requests = requests_frame(grid, points, outcomes)
        vocab_size = self._vocab_size

        def frames() -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
            return build_frames(grid, points, outcomes, requests, vocab_size())

        return SweepResult(requests, usage=usage, capabilities=capabilities, builder=frames)

    def abort(self) -> None:
        pass  # the cache holds what was answered


class DatasetSink:
    """Writes finished points to a Parquet dataset, a part every ``FLUSH_EVERY`` points; only
    points not written yet are held."""

    def __init__(self, plan: Plan, vocab_size: int | None) -> None:
        from .dataset import DatasetWriter

        assert plan.results is not None
        self.plan = plan
        self.counts = SinkCounts()
        grid = plan.grid

        def build(part: Sequence[GridPoint], done: Sequence[Outcome]) -> Any:
            requests = requests_frame(grid, part, done)
            return (requests, *build_frames(grid, part, done, requests, vocab_size))

        self.writer = DatasetWriter(plan.results, grid, vocab_size, build)

    def finished(self, point: GridPoint, outcome: Outcome) -> None:
        for each, its_outcome in _each(self.plan, point, outcome):
            self.writer.add(each, its_outcome)
            self.counts.add(its_outcome)

    async def own_directory(self) -> None:
        """Wait until this sink's writer owns the results directory (see `DatasetWriter`)."""
        # Another process's lock: no event to wait on, so poll (cancellable, unlike a thread
        # blocked in the lock call).
        while not self.writer.try_own():  # noqa: ASYNC110
            await asyncio.sleep(0.2)

    def result(self, usage: dict[str, Any], capabilities: dict[str, Any] | None) -> SweepResult:
        self.writer.close(usage, capabilities)
        return SweepResult(
            dataset=self.writer.directory,
            usage=usage,
            capabilities=capabilities,
            vocab_size=self.writer.vocab_size,
        )

    def abort(self) -> None:
        self.writer.abort()


def open_sink(plan: Plan, vocab_size: Callable[[], int | None]) -> MemorySink | DatasetSink:
    """A dataset sink when the plan has a results directory, else a memory sink."""
    if plan.results is not None:
        return DatasetSink(plan, vocab_size())
    return MemorySink(plan, vocab_size)
