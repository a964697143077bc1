"""Sweeps through the Batch API: the grid as a Batch input file, run by any engine that reads one.

``sweep(client, ..., batch=True, cache="study.sqlite")`` writes every request still missing from
the cache as one line of an OpenAI Batch input file::

    {"custom_id": "<cache key>", "method": "POST", "url": "/v1/completions", "body": {...}}

(a chat sweep's lines have ``"url": "/v1/chat/completions"``, and its batches that endpoint),
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
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._batch_file import (
    BATCH_URL,
    CHAT_BATCH_URL,
    OPENAI_MAX_BATCH_BYTES,
    OPENAI_MAX_BATCH_REQUESTS,
    batch_lines,
    batch_url,
    check_batch_limits,
    split_batches,
)
from ._batch_ledger import MARKER_KEY, Entry, Ledger, find_ours, new_marker, run_to_end, settle
from ._cache import Cache
from ._errors import APIError, RequestError, answered_field
from ._grid import Grid, estimate_tokens
from ._retry import completion_error, error_fields, retry_delay, should_retry, sleep
from ._secrets import secrets_of
from ._types import AsyncCompletionsClient
from ._usage import add_usage

if TYPE_CHECKING:  # pragma: no cover
    import os

    from ._client import AsyncClient
    from ._sweep_result import SweepResult
    from .sweeps.finish import BatchWork

__all__ = [
    "BATCH_URL",
    "CHAT_BATCH_URL",
    "OPENAI_MAX_BATCH_BYTES",
    "OPENAI_MAX_BATCH_REQUESTS",
    "BatchOptions",
    "arun_batch_file",
    "batch_lines",
    "iter_batch_output",
    "load_batch_output",
    "parse_batch_line",
    "run_batches",
    "split_batches",
    "write_batch_files",
]

_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_MAX_METADATA_PAIRS = 16  # OpenAI's limit
_FIRST_POLL_S = 0.25
_MAX_POLL_S = 15.0
_STORE_CHUNK = 500  # responses stored per transaction while an output file is read


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
        deadline: seconds the sweep waits for its batches at most; None: until they end. Past
            it, the batches still running are cancelled (best effort) and their requests become
            error rows naming the deadline; running the sweep again collects what finished.
    """

    max_requests: int = OPENAI_MAX_BATCH_REQUESTS
    max_bytes: int = OPENAI_MAX_BATCH_BYTES
    poll_interval: float | None = None
    completion_window: str = "24h"
    metadata: Mapping[str, str] | None = field(default=None)
    deadline: float | None = None

    def __post_init__(self) -> None:
        check_batch_limits(self.max_requests, self.max_bytes)
        for name in ("poll_interval", "deadline"):
            seconds = getattr(self, name)
            if seconds is not None and (
                isinstance(seconds, bool)
                or not isinstance(seconds, int | float)
                or not math.isfinite(seconds)
                or seconds <= 0
            ):
                raise RequestError(
                    name,
                    f"{name} must be a number of seconds > 0 or None; got {seconds!r}",
                    allowed="seconds > 0 or None",
                    value=seconds,
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


def parse_batch_line(
    raw: bytes | str, number: int, secrets: Sequence[str] = ()
) -> tuple[str, _LineResult] | None:
    """One line of a Batch output or error file as ``(custom_id, result)``; None for a blank line.

    A 200 line is a response only when its body is a completion as the live client decides
    (`nbcompletions._retry.completion_error`): an error body or one without a usable choice is an
    error row, as it is live.
    """
    if not raw.strip():
        return None
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
    status = response.get("status_code") if isinstance(response, Mapping) else None
    if status != 200 or line.get("error") is not None:
        return line["custom_id"], _LineResult(error=_line_error(line))
    body = response.get("body") if isinstance(response, Mapping) else None
    error = completion_error(body)
    if error is not None:
        return line["custom_id"], _LineResult(error=error_fields(error, secrets))
    assert isinstance(body, dict)  # a completion
    return line["custom_id"], _LineResult(response=body)


def read_batch_results(
    data: bytes | Iterable[bytes], secrets: Sequence[str] = ()
) -> dict[str, _LineResult]:
    """custom_id -> result, from the bytes (or lines) of Batch output and error files."""
    lines = data.splitlines() if isinstance(data, bytes) else data
    results: dict[str, _LineResult] = {}
    for number, raw in enumerate(lines, start=1):
        parsed = parse_batch_line(raw, number, secrets)
        if parsed is not None:
            results[parsed[0]] = parsed[1]
    return results


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
    from .sweeps.finish import BatchWork, finish_batch
    from .sweeps.outcome import Outcome

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
    outcomes = [Outcome() for _ in grid.points]
    pending: list[int] = []
    same_as: list[tuple[int, int]] = []
    first_of: dict[str, int] = {}
    spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
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
            elif found.response is not None:
                outcome.response = found.response
                add_usage(spent, found.response)
                if store is not None:
                    store.put(point.key, found.response)
            else:
                outcome.error = found.error
    finally:
        if store is not None and store is not cache:
            store.close()
    estimate, method = estimate_tokens([grid.points[i].request for i in pending], model=grid.model)
    work = BatchWork(
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
    return finish_batch(vocab_size, work, spent, None)


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


async def iter_batch_output(
    aclient: AsyncClient, file_id: str
) -> AsyncIterator[tuple[str, _LineResult]]:
    """``(custom_id, result)`` for each line of a Batch output or error file on the server,
    read line by line as it arrives (``GET /v1/files/{id}/content``): however large the file,
    one line is in memory at a time."""
    secrets = secrets_of(aclient)
    async with aclient.open("GET", f"/files/{file_id}/content") as body:
        number = 0
        async for raw in body.aiter_lines():
            number += 1
            parsed = parse_batch_line(raw, number, secrets)
            if parsed is not None:
                yield parsed


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
    endpoint: str = BATCH_URL,
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
        "endpoint": endpoint,
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
            retryable = status is None or should_retry(status, exc.headers or {}, exc)
            if not retryable or retries >= aclient.max_retries:
                raise
            if status is None or status >= 500:  # it may have been created: look first
                found = await find_ours(aclient, [entry])
                if found is not None and found[0]:
                    return found[0][0]
            await sleep(retry_delay(retries, exc.headers))
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


def _deadline_error(seconds: float, why: str) -> dict[str, Any]:
    return {
        "error_type": "batch_deadline",
        "error_status": None,
        "error_message": f"the sweep's deadline (BatchOptions(deadline={seconds:g}) seconds) "
        f"passed while {why}; run the sweep again to collect it",
    }


class _BatchRun:
    """One call's Batch work: the batches it waits for, the requests another process sharing the
    cache is sending, and the outcomes, usage and failures collected so far.

    Requests are claimed in the cache before anything is created (`Cache.claim`, as live sweeps
    do): K processes running the same sweep on one cache create each batch once; the others wait
    for its answers to land in the cache, and take a batch over (from the ledger, never creating
    it again) only when its owner's claims lapse.
    """

    def __init__(
        self, aclient: AsyncClient, prepared: BatchWork, options: BatchOptions, bar: Any
    ) -> None:
        assert prepared.pending is not None  # batches keep results in memory (no results=)
        assert prepared.outcomes is not None
        self.aclient, self.options, self.bar = aclient, options, bar
        self.grid, self.store, self.outcomes = prepared.grid, prepared.cache, prepared.outcomes
        self.ledger = Ledger(self.store, self.grid.endpoint)
        self.index_of = {self.grid.points[i].key: i for i in prepared.pending}
        self.unplanned = dict(self.index_of)  # in no batch this call waits for, not answered
        self.elsewhere: set[str] = set()  # claimed by another process: waiting for its answer
        self.claimed: set[str] = set()
        self.tracked: list[_Tracked] = []
        self.active: list[_Tracked] = []
        self.spent = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.n_failed = 0
        self.n_elsewhere_done = 0
        self.started = time.monotonic()
        self.initial = bar.n if bar is not None else 0

    # -- outcomes ---------------------------------------------------------------------------------
    def record(
        self, key: str, response: dict[str, Any] | None, error: dict[str, Any] | None
    ) -> None:
        i = self.index_of.get(key)
        if i is None:  # another sweep's request in a batch this one adopted: stored, not ours
            return
        outcome = self.outcomes[i]
        if response is not None:
            outcome.response = response
            add_usage(self.spent, response)
        else:
            outcome.error = error
            self.n_failed += 1

    # -- planning ---------------------------------------------------------------------------------
    def claim(self, keys: Iterable[str]) -> set[str]:
        """The keys of ``keys`` this call now holds (all of them without a cache)."""
        wanted = list(keys)
        if self.store is None:
            return set(wanted)
        held = set(self.store.claim(wanted))
        self.claimed |= held
        return held

    async def plan(self) -> None:
        """Adopt this cache's batches for the requests not yet planned, create batches for the
        rest this call can claim; what another process holds waits in ``elsewhere``."""
        keys = set(self.unplanned)
        entries = [e for e in self.ledger.entries() if not keys.isdisjoint(e.keys)]
        held = self.claim(keys.union(*(e.keys for e in entries)))
        free = [e for e in entries if self._free(e, held)]
        for entry in await settle(self.aclient, self.ledger, free):
            assert entry.batch_id is not None  # settled: found on the server or known
            self.track(_Tracked(entry.batch_id, entry.keys, entry))
        ready = [key for key in self.unplanned if key in held]
        self.elsewhere = {key for key in self.unplanned if key not in held}
        if ready:
            await self.create(ready)

    def _free(self, entry: Entry, held: set[str]) -> bool:
        """Whether ``entry`` is ours to settle and wait for: its batch exists (waiting for it
        creates nothing, whoever else waits too), or no other live process holds its requests
        (one may be creating it: settling would take its batch for one that never arrived)."""
        if entry.batch_id is not None or self.store is None:
            return True
        others = [key for key in entry.keys if key not in held]
        return not others or self.store.keys_present(others) == set(others)

    def track(self, batch: _Tracked) -> None:
        self.tracked.append(batch)
        self.active.append(batch)
        for key in batch.keys:
            self.unplanned.pop(key, None)

    async def create(self, keys: list[str]) -> None:
        points = [self.grid.points[self.index_of[key]] for key in keys]
        model = self.grid.model or points[0].request.model
        if model is None:
            model = (await self.aclient._with_model(points[0].request)).model
        groups = split_batches(batch_lines(points, model), *self.limits)
        for number, group in enumerate(groups, start=1):
            entry = await _create(
                self.aclient, self.ledger, group, self.options, number, batch_url(points[0].request)
            )
            assert entry.batch_id is not None  # created
            self.track(_Tracked(entry.batch_id, entry.keys, entry))

    @property
    def limits(self) -> tuple[int, int]:
        return self.options.max_requests, self.options.max_bytes

    def answered_elsewhere(self) -> None:
        """Take the answers another process stored for requests it claimed."""
        if self.store is None or not self.elsewhere:
            return
        for key, hit in self.store.get_many(self.elsewhere).items():
            outcome = self.outcomes[self.index_of[key]]
            outcome.entry, outcome.latency, outcome.cached = hit, hit.latency, True
            self.elsewhere.discard(key)
            self.unplanned.pop(key, None)
            self.n_elsewhere_done += 1

    # -- polling ----------------------------------------------------------------------------------
    async def poll(self) -> None:
        for batch in list(self.active):
            card = await self.aclient.request("GET", f"/batches/{batch.id}")
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
                await self.collect(batch, card)
                self.ledger.remove(batch.entry)
                self.active.remove(batch)

    async def collect(self, batch: _Tracked, card: Mapping[str, Any]) -> None:
        """Read a finished batch's output and error files line by line into the outcomes and
        the cache (every response is kept, also those another sweep sharing the cache asked for)."""
        keys, seen = set(batch.keys), set()
        for name in ("output_file_id", "error_file_id"):
            file_id = card.get(name)
            if not isinstance(file_id, str) or not file_id:
                continue
            stored: list[tuple[str, Mapping[str, Any], float | None, bytes | None]] = []
            async for key, line in iter_batch_output(self.aclient, file_id):
                if key not in keys or key in seen:
                    continue
                seen.add(key)
                if line.response is not None and self.store is not None:
                    stored.append((key, line.response, None, None))
                    if len(stored) >= _STORE_CHUNK:
                        self.store.put_many(stored)
                        stored.clear()
                self.record(key, line.response, line.error)
            if self.store is not None:
                self.store.put_many(stored)
        for key in batch.keys:
            if key not in seen:
                self.record(key, None, _ended_error(batch.id, card))

    def show(self) -> None:
        bar = self.bar
        if bar is None:
            return
        done = sum(min(b.done, len(b.keys)) for b in self.tracked) + self.n_elsewhere_done
        statuses = sorted({b.status for b in self.active}) or ["done"]
        if self.elsewhere:
            statuses.append("another process")
        bar.set_postfix(
            batches=f"{len(self.tracked) - len(self.active)}/{len(self.tracked)} done",
            status=",".join(statuses),
            failed=self.n_failed,
            refresh=False,
        )
        bar.update(min(self.initial + done, bar.total) - bar.n)

    # -- the whole wait ---------------------------------------------------------------------------
    def left(self) -> float:
        deadline = self.options.deadline
        return math.inf if deadline is None else deadline - (time.monotonic() - self.started)

    async def run(self) -> None:
        """Plan, then poll until every batch has ended and every request claimed elsewhere has
        an answer (taking over what a dead process held), or the deadline passes."""
        await self.plan()
        interval = self.options.poll_interval or _FIRST_POLL_S
        while True:
            await self.poll()
            self.answered_elsewhere()
            if self.elsewhere and self.claim(self.elsewhere):  # their owner let them go
                await self.plan()
            self.show()
            if not self.active and not self.elsewhere:
                return
            if self.left() <= 0:
                await self.stop_at_deadline()
                return
            await asyncio.sleep(min(interval, self.left()))
            if self.options.poll_interval is None:
                interval = min(interval * 1.5, _MAX_POLL_S)

    async def stop_at_deadline(self) -> None:
        """Cancel the batches still running (best effort; their ledger rows stay, so a later run
        collects what finished) and make what has no answer error rows naming the deadline."""
        deadline = self.options.deadline
        assert deadline is not None
        for batch in self.active:
            with contextlib.suppress(APIError):
                await self.aclient.request("POST", f"/batches/{batch.id}/cancel")
            why = f"batch {batch.id} was {batch.status}; it was cancelled"
            for key in batch.keys:
                self.record(key, None, _deadline_error(deadline, why))
        why = "another process sharing the cache was sending this request"
        for key in sorted(self.elsewhere):
            self.record(key, None, _deadline_error(deadline, why))
        self.active.clear()
        self.elsewhere.clear()

    async def keep_claims(self) -> None:
        """Renew this call's claims while it runs (a batch may run for hours)."""
        assert self.store is not None
        while True:
            await asyncio.sleep(self.store.lease / 3)
            self.store.renew()

    def release(self) -> None:
        if self.store is not None and self.claimed:
            self.store.release(self.claimed)


async def run_batches(
    aclient: AsyncCompletionsClient,
    prepared: BatchWork,
    options: BatchOptions,
    *,
    bar: Any,
    probe: bool,
) -> SweepResult:
    """Run ``prepared``'s pending requests as batches (reattaching to open ones) and build the
    result; the Batch twin of `nbcompletions._sweep._execute`."""
    from .sweeps.finish import finish_batch
    from .sweeps.plan import probe_endpoint, refuse_ignored
    from .sweeps.sink import client_vocab_size

    aclient = _batch_client(aclient)
    capabilities: dict[str, Any] | None = None
    run = _BatchRun(aclient, prepared, options, bar)
    renewing = asyncio.ensure_future(run.keep_claims()) if prepared.cache is not None else None
    try:
        if bar is not None:
            bar.set_description("batch")
        if probe:
            capabilities = await probe_endpoint(aclient, prepared.grid, prepared.cache)
            refuse_ignored(capabilities, prepared.grid, path="sweep-batch")
        await run.run()
    finally:
        if renewing is not None:
            renewing.cancel()
            await asyncio.gather(renewing, return_exceptions=True)
        run.release()
        if bar is not None:
            bar.close()
        if prepared.owns_cache and prepared.cache is not None:
            prepared.cache.close()
    return finish_batch(client_vocab_size(aclient), prepared, run.spent, capabilities)


# -- a Batch file, as it is ----------------------------------------------------------------------
def _file_endpoint(data: bytes) -> str:
    """The endpoint a Batch input file's lines name (its first line's ``url``; the server checks
    that every line names the same): ``/v1/completions`` or ``/v1/chat/completions``."""
    first = next((line for line in data.splitlines() if line.strip()), b"")
    try:
        url = json.loads(first).get("url")
    except (ValueError, AttributeError):
        url = None  # the server's upload check names the bad line
    return url if url in (BATCH_URL, CHAT_BATCH_URL) else BATCH_URL


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
        "endpoint": _file_endpoint(data),
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
