"""Sweeps through the Batch API: the grid as a Batch input file, run by any engine that reads one.

``sweep(client, ..., batch=True, cache="study.sqlite")`` writes every request still missing from
the cache as one line of an OpenAI Batch input file::

    {"custom_id": "<cache key>", "method": "POST", "url": "/v1/completions", "body": {...}}

uploads it (``POST /v1/files``, purpose ``batch``), creates a batch (``POST /v1/batches``,
completion window ``24h``), polls it (``GET /v1/batches/{id}``) with a progress bar of its request
counts, downloads the output and error files, joins them on ``custom_id`` and returns the same
`SweepResult` a live sweep returns. ``custom_id`` is the request's cache key: stable across runs
and unique (grid points that are the same request are sent once, as in a live sweep).

Reattaching: each batch is written to the cache before it is created (an idempotency marker,
sent as its metadata, and its custom ids) and its id as soon as the answer arrives, so a call that
is interrupted (a kernel restart, a closed laptop, a crash even while the batch is being created)
leaves it running, and the same call later polls that batch instead of paying for a second one;
see `nbcompletions._batch_ledger`. A batch that ends ``cancelled``, ``expired`` or ``failed`` keeps
what finished (stored in the cache as it is downloaded); the requests that never ran become error
rows, and the next call sends just those. Without a cache nothing can be reattached.

OpenAI limits one input file to 50,000 requests and 200 MB; a bigger grid becomes several batches
(`BatchOptions` sets the limits). Offline: `Grid.to_batch_file` writes the file for another engine,
and `load_batch_output` turns the output files it produced back into a `SweepResult`.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import _retry
from ._batch_file import (
    BATCH_URL,
    OPENAI_MAX_BATCH_BYTES,
    OPENAI_MAX_BATCH_REQUESTS,
    batch_lines,
    check_batch_limits,
    split_batches,
)
from ._batch_ledger import MARKER_KEY, Entry, Ledger, find_ours, new_marker, run_to_end, settle
from ._cache import Cache
from ._errors import APIError, RequestError, answered_field
from ._grid import Grid, GridPoint, estimate_tokens
from ._types import AsyncCompletionsClient

if TYPE_CHECKING:  # pragma: no cover
    import os

    from ._client import AsyncClient
    from ._sweep_prepare import _Prepared
    from ._sweep_result import SweepResult

__all__ = [
    "BATCH_URL",
    "OPENAI_MAX_BATCH_BYTES",
    "OPENAI_MAX_BATCH_REQUESTS",
    "BatchOptions",
    "arun_batch_file",
    "batch_lines",
    "load_batch_output",
    "run_batches",
    "split_batches",
    "write_batch_files",
]

_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_MAX_METADATA_PAIRS = 16  # OpenAI's limit
_FIRST_POLL_S = 0.25
_MAX_POLL_S = 15.0


@dataclass(frozen=True)
class BatchOptions:
    """How a sweep runs through the Batch API (``sweep(..., batch=BatchOptions(...))``).

    Attributes:
        max_requests: most requests in one batch (OpenAI: 50,000); more make several batches.
        max_bytes: largest input file in bytes (OpenAI: 200 MB).
        poll_interval: seconds between status checks; None: from 0.25 s, growing to 15 s.
        completion_window: the batch's window (OpenAI accepts only ``"24h"``).
        metadata: string pairs attached to each batch (OpenAI: up to 16 pairs, keys up to 64
            characters, values up to 512; one pair, ``nbcompletions_batch``, is the sweep's own).
    """

    max_requests: int = OPENAI_MAX_BATCH_REQUESTS
    max_bytes: int = OPENAI_MAX_BATCH_BYTES
    poll_interval: float | None = None
    completion_window: str = "24h"
    metadata: Mapping[str, str] | None = field(default=None)

    def __post_init__(self) -> None:
        check_batch_limits(self.max_requests, self.max_bytes)
        interval = self.poll_interval
        if interval is not None and (
            isinstance(interval, bool)
            or not isinstance(interval, int | float)
            or not math.isfinite(interval)
            or interval <= 0
        ):
            raise RequestError(
                "poll_interval",
                f"poll_interval must be a number of seconds > 0 or None; got {interval!r}",
                allowed="seconds > 0 or None",
                value=interval,
            )
        if not isinstance(self.completion_window, str) or not self.completion_window:
            raise RequestError(
                "completion_window",
                f"completion_window must be a string such as '24h'; got {self.completion_window!r}",
                allowed="'24h'",
                value=self.completion_window,
            )
        metadata = self.metadata
        if metadata is not None and (
            not isinstance(metadata, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise RequestError(
                "metadata",
                f"metadata must map strings to strings; got {metadata!r}",
                allowed="a dict of str -> str",
                value=metadata,
            )
        if metadata is not None:
            allowed = (
                f"at most {_MAX_METADATA_PAIRS - 1} pairs (one of OpenAI's 16 is the sweep's "
                f"{MARKER_KEY!r}), keys up to 64 characters, values up to 512"
            )
            bad = [k for k, v in metadata.items() if len(k) > 64 or len(v) > 512 or k == MARKER_KEY]
            if len(metadata) > _MAX_METADATA_PAIRS - 1 or bad:
                what = f"{len(metadata)} pairs" if not bad else f"the pair {bad[0][:80]!r}"
                raise RequestError(
                    "metadata",
                    f"metadata must hold {allowed}; got {what}",
                    allowed=allowed,
                    value=metadata,
                )


# -- the input file -------------------------------------------------------------------------------
def _unique_points(grid: Grid, indices: Iterable[int] | None = None) -> list[GridPoint]:
    """Grid points with distinct cache keys (one line each), in grid order."""
    seen: set[str] = set()
    points = []
    for i in range(len(grid.points)) if indices is None else indices:
        point = grid.points[i]
        if point.key not in seen:
            seen.add(point.key)
            points.append(point)
    return points


def write_batch_files(
    grid: Grid,
    path: str | os.PathLike[str],
    *,
    max_requests: int = OPENAI_MAX_BATCH_REQUESTS,
    max_bytes: int = OPENAI_MAX_BATCH_BYTES,
) -> list[Path]:
    """Write ``grid`` as Batch input files; see `Grid.to_batch_file`."""
    BatchOptions(max_requests=max_requests, max_bytes=max_bytes)  # checks both
    return grid.to_batch_file(path, max_requests=max_requests, max_bytes=max_bytes)


# -- the output files -----------------------------------------------------------------------------
@dataclass
class _LineResult:
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # the sweep's error fields


def _line_error(line: Mapping[str, Any]) -> dict[str, Any]:
    """A failed line's error as the sweep's error fields (type, HTTP status, message)."""
    response = line.get("response")
    status = response.get("status_code") if isinstance(response, Mapping) else None
    status = status if isinstance(status, int) and not isinstance(status, bool) else None
    body = response.get("body") if isinstance(response, Mapping) else None
    # OpenAI puts an HTTP error in the response body; vLLM's run-batch puts it (a string or an
    # ErrorResponse) in "error" with a null body; OpenAI's batch-level failures have error.code.
    error: Any = body.get("error") if isinstance(body, Mapping) else None
    if error is None:
        error = line.get("error")
        if isinstance(error, Mapping) and isinstance(error.get("error"), Mapping):
            error = error["error"]
    if isinstance(error, Mapping):
        kind = error.get("type") or error.get("code") or "batch_error"
        message = error.get("message") or json.dumps(error)[:500]
        return {
            "error_type": str(kind),
            "error_status": status,
            "error_message": str(message),
        }
    if isinstance(error, str) or status is not None:
        return {
            "error_type": "api_error",
            "error_status": status,
            "error_message": error if isinstance(error, str) else json.dumps(body)[:500],
        }
    return {
        "error_type": "invalid_response",
        "error_status": None,
        "error_message": f"a Batch output line without a response or an error: "
        f"{json.dumps(line)[:300]}",
    }


def read_batch_results(data: bytes | Iterable[bytes]) -> dict[str, _LineResult]:
    """custom_id -> result, from the bytes (or lines) of Batch output and error files."""
    lines = data.splitlines() if isinstance(data, bytes) else data
    results: dict[str, _LineResult] = {}
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
        except ValueError as exc:
            raise APIError(
                f"line {number} of a Batch output file is not JSON ({exc}): {raw[:200]!r}",
                type="invalid_response",
            ) from None
        if not isinstance(line, Mapping) or not isinstance(line.get("custom_id"), str):
            raise APIError(
                f"line {number} of a Batch output file has no custom_id: {raw[:200]!r}",
                type="invalid_response",
            )
        response = line.get("response")
        body = response.get("body") if isinstance(response, Mapping) else None
        ok = (
            isinstance(response, Mapping)
            and response.get("status_code") == 200
            and isinstance(body, dict)
            and line.get("error") is None
        )
        results[line["custom_id"]] = (
            _LineResult(response=body)
            if ok and isinstance(body, dict)
            else _LineResult(error=_line_error(line))
        )
    return results


def _spend(spent: dict[str, int], response: Mapping[str, Any]) -> None:
    usage = response.get("usage")
    if isinstance(usage, Mapping):
        for name in spent:
            value = usage.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                spent[name] += value


def load_batch_output(
    grid: Grid,
    output: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
    errors: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | None = None,
    *,
    cache: Cache | str | os.PathLike[str] | None = None,
    vocab_size: int | None = None,
) -> SweepResult:
    """The `SweepResult` of ``grid`` from Batch output (and error) files produced elsewhere.

    ``grid`` is the plan the input file was written from (`Grid.to_batch_file`); lines are joined
    on ``custom_id``. Requests with no line in any file become error rows (``batch_missing``).
    With ``cache``, the responses are stored there too, so a later live or batch sweep of the same
    grid finds them.
    """
    from ._sweep_prepare import _Prepared, _result
    from ._sweep_result import _Outcome

    def paths(value: Any) -> list[Path]:
        if value is None:
            return []
        if isinstance(value, str | Path) or hasattr(value, "__fspath__"):
            return [Path(value)]
        return [Path(v) for v in value]

    results: dict[str, _LineResult] = {}
    for where in paths(output) + paths(errors):
        with where.open("rb") as handle:
            results.update(read_batch_results(handle))
    store = cache if cache is None or isinstance(cache, Cache) else Cache(cache)
    outcomes = [_Outcome() for _ in grid.points]
    pending: list[int] = []
    same_as: list[tuple[int, int]] = []
    first_of: dict[str, int] = {}
    spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    n_failed = 0
    try:
        for i, point in enumerate(grid.points):
            if point.key in first_of:
                same_as.append((i, first_of[point.key]))
                continue
            first_of[point.key] = i
            pending.append(i)
            found = results.get(point.key)
            outcome = outcomes[i]
            if found is None:
                outcome.error = {
                    "error_type": "batch_missing",
                    "error_status": None,
                    "error_message": "no line with this custom_id in the Batch output or error "
                    "files",
                }
                n_failed += 1
            elif found.response is not None:
                outcome.response = found.response
                _spend(spent, found.response)
                if store is not None:
                    store.put(point.key, found.response)
            else:
                outcome.error = found.error
                n_failed += 1
    finally:
        if store is not None and store is not cache:
            store.close()
    estimate, method = estimate_tokens([grid.points[i].request for i in pending], model=grid.model)
    prepared = _Prepared(
        grid=grid,
        outcomes=outcomes,
        cache=None,
        owns_cache=False,
        estimate=estimate,
        estimate_method=method,
        pending=pending,
        n_pending=len(pending),
        same_as=same_as,
    )
    return _result(None, prepared, spent, n_failed, None, vocab_size)


# -- running batches ------------------------------------------------------------------------------
async def _upload(aclient: AsyncClient, data: bytes, filename: str) -> Mapping[str, Any]:
    """``POST /v1/files`` with ``purpose=batch``: the file object the server answers."""
    uploaded = await aclient.request(
        "POST",
        "/files",
        files={"file": (filename, data, "application/jsonl")},
        data={"purpose": "batch"},
    )
    answered_field(uploaded, "id", str, "POST /files", "a file id")
    assert isinstance(uploaded, Mapping)  # checked: it has an id
    return uploaded


async def _download(aclient: AsyncClient, file_id: str) -> AsyncIterator[bytes]:
    """The lines of a file on the server (``GET /v1/files/{id}/content``), read as they arrive."""
    async with aclient.open("GET", f"/files/{file_id}/content") as body:
        async for line in body.aiter_lines():
            yield line


@dataclass
class _Tracked:
    """One batch this call waits for: its id and the custom ids (cache keys) it holds."""

    id: str
    keys: list[str]
    entry: Entry
    status: str = "validating"
    done: int = 0  # completed + failed


def _batch_client(aclient: AsyncCompletionsClient) -> AsyncClient:
    """``aclient``, checked to be ours: batches upload files and create batches through it."""
    from ._client import AsyncClient

    if not isinstance(aclient, AsyncClient):
        raise TypeError(
            "batch=True needs an nbcompletions Client or AsyncClient (it uploads files and "
            f"creates batches through it); got {type(aclient).__name__}"
        )
    return aclient


async def _create(
    aclient: AsyncClient,
    ledger: Ledger,
    group: list[tuple[str, bytes]],
    options: BatchOptions,
    number: int,
) -> Entry:
    """Upload one input file and create its batch, written to ``ledger`` before and after the
    create (see `nbcompletions._batch_ledger`): its entry, checked, with the batch id."""
    data = b"".join(line for _, line in group)
    uploaded = await _upload(aclient, data, f"nbcompletions-sweep-{number:03d}.jsonl")
    file_id = str(uploaded["id"])
    uploaded_at = uploaded.get("created_at")
    entry = Entry(
        marker=new_marker(),
        keys=[key for key, _ in group],
        input_file_id=file_id,
        file_created_at=uploaded_at if isinstance(uploaded_at, int) else None,
    )
    ledger.write(entry)  # before the batch exists: a run stopped from here on finds it again
    body: dict[str, Any] = {
        "input_file_id": file_id,
        "endpoint": BATCH_URL,
        "completion_window": options.completion_window,
        "metadata": {**(options.metadata or {}), MARKER_KEY: entry.marker},
    }

    async def create_and_record() -> None:
        created = await _create_once(aclient, entry, body)
        entry.batch_id = answered_field(created, "id", str, "POST /batches", "a batch id")
        ledger.write(entry)

    await run_to_end(create_and_record())
    # A server that cannot list batches may have made a second one on a retry: settle checks.
    [settled] = await settle(aclient, ledger, [entry])
    return settled


async def _create_once(
    aclient: AsyncClient, entry: Entry, body: dict[str, Any]
) -> Mapping[str, Any]:
    """``POST /v1/batches``, retried only once the server's list shows it did not arrive.

    The client's own retry loop would send a create whose answer was lost a second time, and pay
    for two batches. Here each attempt is single; after a failure that may have reached the
    server (a lost connection, a timeout, a 5xx) the batches are listed, and one carrying this
    entry's marker is the answer. A 429 or a 4xx was never created; a server that cannot list
    gets the create again (`settle` then cancels a duplicate it can see).
    """
    retries = 0
    while True:
        try:
            created: Mapping[str, Any] = await aclient.request(
                "POST", "/batches", json=body, retry=False
            )
            return created
        except APIError as exc:
            status = exc.status
            retryable = status is None or _retry.should_retry(status, exc.headers or {}, exc)
            if not retryable or retries >= aclient.max_retries:
                raise
            if status is None or status >= 500:  # it may have been created: look first
                found = await find_ours(aclient, [entry])
                if found is not None and found[0]:
                    return found[0][0]
            await _retry.sleep(_retry.retry_delay(retries, exc.headers))
            retries += 1


def _ended_error(batch_id: str, card: Mapping[str, Any]) -> dict[str, Any]:
    status = str(card.get("status"))
    detail = ""
    errors = card.get("errors")
    data = errors.get("data") if isinstance(errors, Mapping) else None
    if isinstance(data, list) and data and isinstance(data[0], Mapping):
        detail = f": {data[0].get('message')}"
    return {
        "error_type": f"batch_{status}",
        "error_status": None,
        "error_message": f"batch {batch_id} ended {status} before this request ran{detail}; "
        "run the sweep again to send it",
    }


async def run_batches(
    aclient: AsyncCompletionsClient,
    prepared: _Prepared,
    options: BatchOptions,
    *,
    bar: Any,
    probe: bool,
) -> SweepResult:
    """Run ``prepared``'s pending requests as batches (reattaching to open ones) and build the
    result; the Batch twin of `nbcompletions._sweep._execute`."""
    from ._sweep_prepare import _probe, _refuse_ignored, _result

    aclient = _batch_client(aclient)
    grid, store = prepared.grid, prepared.cache
    spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    n_failed = 0
    capabilities: dict[str, Any] | None = None
    ledger = Ledger(store, grid.endpoint)
    assert prepared.pending is not None  # batches keep results in memory (no results=)
    index_of = {grid.points[i].key: i for i in prepared.pending}
    try:
        if bar is not None:
            bar.set_description("batch")
        if probe:
            capabilities = await _probe(aclient, prepared)
            _refuse_ignored(capabilities, grid)
        remaining = dict(index_of)
        tracked: list[_Tracked] = []
        # Interrupted before, perhaps while creating: find those batches, do not pay again.
        ours = [e for e in ledger.entries() if any(key in remaining for key in e.keys)]
        for entry in await settle(aclient, ledger, ours):
            assert entry.batch_id is not None  # settled: found on the server or known
            tracked.append(_Tracked(entry.batch_id, entry.keys, entry))
            for key in entry.keys:
                remaining.pop(key, None)
        model = grid.model
        if remaining and model is None:
            first = grid.points[next(iter(remaining.values()))].request
            model = first.model or (await aclient._with_model(first)).model
        lines = batch_lines((grid.points[i] for i in remaining.values()), model)
        groups = split_batches(lines, options.max_requests, options.max_bytes)
        for number, group in enumerate(groups, start=1):
            entry = await _create(aclient, ledger, group, options, number)
            assert entry.batch_id is not None  # created
            tracked.append(_Tracked(entry.batch_id, entry.keys, entry))

        initial = bar.n if bar is not None else 0
        interval = options.poll_interval or _FIRST_POLL_S
        active = list(tracked)
        while active:
            for batch in list(active):
                card = await aclient.request("GET", f"/batches/{batch.id}")
                if not isinstance(card, Mapping):
                    raise APIError(
                        f"GET /batches/{batch.id} answered with {str(card)[:200]}",
                        type="invalid_response",
                        body=card,
                    )
                counts = card.get("request_counts")
                counts = counts if isinstance(counts, Mapping) else {}
                batch.status = str(card.get("status"))
                batch.done = sum(
                    v for v in (counts.get("completed"), counts.get("failed")) if isinstance(v, int)
                )
                if batch.status in _TERMINAL:
                    n_failed += await _collect(aclient, batch, card, prepared, index_of, spent)
                    ledger.remove(batch.entry)
                    active.remove(batch)
            if bar is not None:
                progress = min(initial + sum(min(b.done, len(b.keys)) for b in tracked), bar.total)
                statuses = sorted({b.status for b in active}) or ["done"]
                bar.set_postfix(
                    batches=f"{len(tracked) - len(active)}/{len(tracked)} done",
                    status=",".join(statuses),
                    failed=n_failed,
                    refresh=False,
                )
                bar.update(progress - bar.n)
            if active:
                await asyncio.sleep(interval)
                if options.poll_interval is None:
                    interval = min(interval * 1.5, _MAX_POLL_S)
    finally:
        if bar is not None:
            bar.close()
        if prepared.owns_cache and store is not None:
            store.close()
    return _result(aclient, prepared, spent, n_failed, capabilities)


async def _collect(
    aclient: AsyncClient,
    batch: _Tracked,
    card: Mapping[str, Any],
    prepared: _Prepared,
    index_of: Mapping[str, int],
    spent: dict[str, int],
) -> int:
    """Download a finished batch's files into the outcomes and the cache; the failures counted."""
    results: dict[str, _LineResult] = {}
    for name in ("output_file_id", "error_file_id"):
        file_id = card.get(name)
        if isinstance(file_id, str) and file_id:
            results.update(read_batch_results([line async for line in _download(aclient, file_id)]))
    store, outcomes = prepared.cache, prepared.outcomes
    assert outcomes is not None  # batches keep results in memory (no results=)
    failed = 0
    for key in batch.keys:
        found = results.get(key)
        if found is not None and found.response is not None and store is not None:
            # Every response is kept, also those of keys another sweep sharing the cache asked for.
            store.put(key, found.response)
        i = index_of.get(key)
        if i is None:
            continue
        outcome = outcomes[i]
        if found is None:
            outcome.error = _ended_error(batch.id, card)
            failed += 1
        elif found.response is not None:
            outcome.response = found.response
            _spend(spent, found.response)
        else:
            outcome.error = found.error
            failed += 1
    return failed


# -- a Batch file, as it is ----------------------------------------------------------------------
async def arun_batch_file(
    aclient: AsyncClient,
    data: bytes,
    filename: str,
    *,
    poll_interval: float | None = None,
    progress: bool = False,
) -> tuple[dict[str, Any], bytes | None, bytes | None]:
    """Run the Batch input file ``data`` on ``aclient``'s server: the finished batch object and
    the contents of its output and error files (None where it has none)."""
    aclient = _batch_client(aclient)
    uploaded = await _upload(aclient, data, filename)
    marker = new_marker()
    body = {
        "input_file_id": uploaded["id"],
        "endpoint": BATCH_URL,
        "completion_window": "24h",
        "metadata": {MARKER_KEY: marker},
    }
    card: dict[str, Any] = await aclient.request("POST", "/batches", json=body)
    # A lost answer that the client retried made a second batch: cancel it, keep the first.
    uploaded_at = uploaded.get("created_at")
    entry = Entry(
        marker,
        [],
        uploaded["id"],
        uploaded_at if isinstance(uploaded_at, int) else None,
        batch_id=card["id"],
    )
    [entry] = await settle(aclient, Ledger(None, ""), [entry])
    if entry.batch_id != card["id"]:
        card = await aclient.request("GET", f"/batches/{entry.batch_id}")
    interval = poll_interval or _FIRST_POLL_S
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="batch", unit="req", dynamic_ncols=True)
    try:
        while card.get("status") not in _TERMINAL:
            await asyncio.sleep(interval)
            if poll_interval is None:
                interval = min(interval * 1.5, _MAX_POLL_S)
            card = await aclient.request("GET", f"/batches/{card['id']}")
            if bar is not None:
                counts = card.get("request_counts") or {}
                bar.total = counts.get("total") or None
                bar.set_postfix(failed=counts.get("failed", 0), refresh=False)
                bar.update(counts.get("completed", 0) + counts.get("failed", 0) - bar.n)
    finally:
        if bar is not None:
            bar.close()
    files: list[bytes | None] = []
    for name in ("output_file_id", "error_file_id"):
        file_id = card.get(name)
        if isinstance(file_id, str) and file_id:
            async with aclient.open("GET", f"/files/{file_id}/content") as content:
                files.append(b"".join([piece async for piece in content.aiter_bytes()]))
        else:
            files.append(None)
    return card, files[0], files[1]
