"""The names the Batch path (`nbcompletions._batch`) takes from the sweep pipeline.

Everything here lives in `nbcompletions.sweeps`; this module only keeps `_batch`'s imports
working until it uses those public names itself (`BatchWork`, `finish_batch`,
`probe_endpoint`, `refuse_ignored`).
"""

from __future__ import annotations

from typing import Any

from ._sweep_result import SweepResult
from ._types import AsyncCompletionsClient
from .sweeps.finish import BatchWork, finish_batch
from .sweeps.plan import probe_endpoint, refuse_ignored
from .sweeps.sink import client_vocab_size

__all__: list[str] = []

_Prepared = BatchWork
_refuse_ignored = refuse_ignored


async def _probe(aclient: AsyncCompletionsClient, work: BatchWork) -> dict[str, Any] | None:
    return await probe_endpoint(aclient, work.grid, work.cache)


def _result(
    aclient: AsyncCompletionsClient | None,
    work: BatchWork,
    spent: dict[str, int],
    n_failed: int,
    capabilities: dict[str, Any] | None,
    vocab_size: int | None = None,
) -> SweepResult:
    """The batch's result (``n_failed`` is recounted from the outcomes, as a live sweep does)."""
    del n_failed
    known = client_vocab_size(aclient) if aclient is not None else vocab_size
    return finish_batch(known, work, spent, capabilities)
