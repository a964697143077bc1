"""The Batch API on our server: ``/v1/files`` and ``/v1/batches``, and the job store behind them.

A client uploads a JSONL file of requests (``POST /v1/files``, multipart, purpose ``batch``), one
line per request: ``{"custom_id", "method": "POST", "url": "/v1/completions", "body": {...}}``;
creates a batch from it (``POST /v1/batches``); polls it (``GET /v1/batches/{id}``); and downloads
the output and error files (``GET /v1/files/{id}/content``). Shapes are OpenAI's, so the official
SDK's ``files`` and ``batches`` calls work unchanged.

How a batch runs: the store owns one background thread with its own event loop (started with the
first batch, gone when no batch runs), because a batch outlives the request that created it and
the in-process app may be driven from event loops that close. Each line goes through the same
validation as ``POST /v1/completions`` (`_CompletionsServer.accept`) and the same scheduler, so
batch lines are batched with each other and with live requests on the engine; at most
``max_lines_in_flight`` lines (all batches together) wait in the scheduler at once, so live
requests still get their turn. A line the scheduler cannot take yet (503) waits and is retried.

What is held is bounded: files live in a temporary directory (removed with the store), one upload
is at most ``max_file_bytes`` and ``max_file_requests`` lines, and an upload or a new batch is
refused while the stored files total ``max_stored_bytes`` or more (``DELETE /v1/files/{id}`` frees
them).

Cancelling stops a batch within one decode step of its running lines; what finished stays in its
output file (lines that never ran appear in neither file). A batch still running when its
completion window ends is ``expired``: its unfinished lines go to the error file with
``error.code`` ``batch_expired``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from .._errors import RequestError
from .._request import shown
from ._app import _JSON, _CompletionsServer, _Failure, _request_error, _server_error
from ._scheduler import Overloaded

__all__ = [
    "BATCH_ENDPOINTS",
    "BatchLimits",
    "BatchStore",
    "batch_routes",
]

logger = logging.getLogger("nbcompletions.server")

#: The endpoints a batch may target (the only one this server serves).
BATCH_ENDPOINTS = ("/v1/completions",)
#: OpenAI's only completion window.
COMPLETION_WINDOWS = {"24h": 24 * 3600}
_TERMINAL = ("failed", "completed", "expired", "cancelled")
# How often the runner looks for new batches while others run (a new batch waits at most this).
_PICKUP_S = 0.05
_MAX_METADATA_PAIRS = 16
_MAX_LIST_LIMIT = 100
_MULTIPART_OVERHEAD = 64 * 1024  # headers and the purpose field around the file part


@dataclasses.dataclass(frozen=True)
class BatchLimits:
    """What the Batch API may hold and run at once.

    Attributes:
        max_file_bytes: largest upload (OpenAI: 200 MB).
        max_file_requests: most lines in one input file (OpenAI: 50,000).
        max_stored_bytes: uploads and new batches are refused while stored files total this much.
        max_lines_in_flight: batch lines waiting in the scheduler at once, all batches together.
        completion_window_s: seconds a batch may run before it expires (``"24h"`` is the only
            window a client may ask for; a test may shorten what it means).
    """

    max_file_bytes: int = 200 * 1000 * 1000
    max_file_requests: int = 50_000
    max_stored_bytes: int = 2 * 1000 * 1000 * 1000
    max_lines_in_flight: int = 64
    completion_window_s: float = 24 * 3600.0

    def __post_init__(self) -> None:
        for name in ("max_file_bytes", "max_file_requests", "max_stored_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        value = self.max_lines_in_flight
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"max_lines_in_flight must be an integer >= 1; got {value!r}")
        window = self.completion_window_s
        if isinstance(window, bool) or not isinstance(window, int | float) or not window > 0:
            raise ValueError(f"completion_window_s must be a number of seconds > 0; got {window!r}")


@dataclasses.dataclass
class _File:
    id: str
    filename: str
    purpose: str
    path: Path
    bytes: int
    created_at: int

    def card(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
        }


@dataclasses.dataclass
class _Batch:
    id: str
    endpoint: str
    input_file_id: str
    completion_window: str
    created_at: int
    expires_at: int
    deadline: float  # monotonic: when the batch expires
    metadata: dict[str, str] | None
    status: str = "validating"
    errors: dict[str, Any] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    model: str | None = None
    usage: dict[str, int] = dataclasses.field(
        default_factory=lambda: {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    )
    # Set on the runner's loop; the cancel route wakes it through call_soon_threadsafe.
    loop: asyncio.AbstractEventLoop | None = None
    cancel_event: asyncio.Event | None = None

    def card(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": dict(self.usage),
            "metadata": self.metadata,
        }


def _now() -> int:
    return int(time.time())


def _remove_directory(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


class BatchStore:
    """Files and batches of one app, and the background runner that executes the batches."""

    def __init__(self, server: _CompletionsServer, limits: BatchLimits) -> None:
        self._server = server
        self.limits = limits
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}  # in creation order
        self._queue: collections.deque[_Batch] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stored = 0
        self._directory: str | None = None
        self.lines_run = 0  # lines sent to the scheduler, all batches (for tests and logs)

    def __repr__(self) -> str:
        return (
            f"<BatchStore: {len(self._files)} files ({self._stored} bytes), "
            f"{len(self._batches)} batches>"
        )

    # -- files -------------------------------------------------------------------------------------
    def _new_path(self, file_id: str) -> Path:
        with self._lock:
            if self._directory is None:
                self._directory = tempfile.mkdtemp(prefix="nbcompletions-batches-")
                weakref.finalize(self, _remove_directory, self._directory)
            return Path(self._directory) / f"{file_id}.jsonl"

    def _check_room(self) -> None:
        if self._stored >= self.limits.max_stored_bytes:
            raise _Failure(
                400,
                f"This server holds at most {self.limits.max_stored_bytes} bytes of batch files "
                f"and holds {self._stored}; delete files you no longer need "
                "(DELETE /v1/files/{file_id}) and try again.",
                code="storage_limit_exceeded",
            )

    def add_file(self, filename: str, purpose: str, path: Path, size: int) -> _File:
        record = _File(path.stem, filename, purpose, path, size, _now())
        with self._lock:
            self._files[record.id] = record
            self._stored += size
        return record

    def file(self, file_id: str) -> _File:
        with self._lock:
            record = self._files.get(file_id)
        if record is None:
            raise _Failure(
                404, f"No such File object: {shown(file_id, 80)}", param="id", code="not_found"
            )
        return record

    def delete_file(self, file_id: str) -> _File:
        record = self.file(file_id)
        with self._lock:
            if self._files.pop(file_id, None) is not None:
                self._stored -= record.bytes
        record.path.unlink(missing_ok=True)
        return record

    # -- batches -----------------------------------------------------------------------------------
    def create_batch(
        self,
        input_file_id: str,
        endpoint: str,
        completion_window: str,
        metadata: dict[str, str] | None,
    ) -> _Batch:
        source = self.file(input_file_id)
        if source.purpose != "batch":
            raise _Failure(
                400,
                f"The input file {input_file_id} has purpose {source.purpose!r}; a batch needs a "
                "file uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        self._check_room()
        created = _now()
        batch = _Batch(
            id=f"batch_{uuid.uuid4().hex}",
            endpoint=endpoint,
            input_file_id=input_file_id,
            completion_window=completion_window,
            created_at=created,
            expires_at=created + int(COMPLETION_WINDOWS[completion_window]),
            deadline=time.monotonic() + self.limits.completion_window_s,
            metadata=metadata,
        )
        with self._lock:
            self._batches[batch.id] = batch
            self._queue.append(batch)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="nbcompletions-batches", daemon=True
                )
                self._thread.start()
        return batch

    def batch(self, batch_id: str) -> _Batch:
        with self._lock:
            batch = self._batches.get(batch_id)
        if batch is None:
            raise _Failure(
                404, f"No such Batch object: {shown(batch_id, 80)}", param="id", code="not_found"
            )
        return batch

    def list_batches(self, after: str | None, limit: int) -> tuple[list[_Batch], bool]:
        """Newest first, as OpenAI lists them; ``after`` is the last id of the previous page."""
        with self._lock:
            newest_first = list(reversed(self._batches.values()))
        if after is not None:
            ids = [b.id for b in newest_first]
            if after not in ids:
                raise _Failure(
                    400, f"after must be the id of a batch; got {shown(after, 80)}", param="after"
                )
            newest_first = newest_first[ids.index(after) + 1 :]
        return newest_first[:limit], len(newest_first) > limit

    def cancel(self, batch_id: str) -> _Batch:
        batch = self.batch(batch_id)
        with self._lock:
            if batch.status in _TERMINAL or batch.status == "cancelling":
                if batch.status not in ("cancelled", "cancelling"):
                    raise _Failure(
                        409,
                        f"Cannot cancel a batch with status '{batch.status}'.",
                        code="batch_not_cancellable",
                    )
                return batch
            batch.status = "cancelling"
            batch.cancelling_at = _now()
            loop, event = batch.loop, batch.cancel_event
        if loop is not None and event is not None:
            # RuntimeError: the runner's loop has just ended, so the batch is done already.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)
        return batch

    # -- the runner --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:  # pragma: no cover - a bug in the runner itself
            logger.exception("the batch runner failed")
            with self._lock:
                self._thread = None

    async def _main(self) -> None:
        slots = asyncio.Semaphore(self.limits.max_lines_in_flight)
        running: set[asyncio.Task[None]] = set()
        while True:
            with self._lock:
                while self._queue:
                    batch = self._queue.popleft()
                    running.add(asyncio.ensure_future(self._process(batch, slots)))
                if not running:
                    self._thread = None
                    return
            done, running = await asyncio.wait(running, timeout=_PICKUP_S)
            for task in done:
                if task.exception() is not None:  # pragma: no cover - a bug in _process
                    logger.error("a batch failed in the runner", exc_info=task.exception())

    def _fail(self, batch: _Batch, errors: list[dict[str, Any]]) -> None:
        with self._lock:
            batch.status = "failed"
            batch.failed_at = _now()
            batch.errors = {"object": "list", "data": errors}

    def _validate(self, batch: _Batch) -> list[dict[str, Any]] | None:
        """The input's lines, or None after failing the batch (wrong url, several models)."""
        source = self.file(batch.input_file_id)
        lines: list[dict[str, Any]] = []
        models: set[Any] = set()
        errors: list[dict[str, Any]] = []
        for number, line in enumerate(_read_lines(source.path), start=1):
            if line["url"] != batch.endpoint:
                errors.append(
                    {
                        "code": "invalid_url",
                        "message": f"The URL provided for this request does not match the batch "
                        f"endpoint {batch.endpoint}; got {shown(line['url'], 80)}.",
                        "param": "url",
                        "line": number,
                    }
                )
            model = line["body"].get("model")
            if models and model not in models and not errors:
                errors.append(
                    {
                        "code": "mismatched_model",
                        "message": "The provided model differs from the model of earlier lines; "
                        f"a batch file holds one model. Line {number} has "
                        f"{shown(model, 80)}, earlier lines {shown(next(iter(models)), 80)}.",
                        "param": "body.model",
                        "line": number,
                    }
                )
            models.add(model)
            if len(errors) >= 10:
                break
            lines.append(line)
        if errors:
            self._fail(batch, errors)
            return None
        if not lines:
            self._fail(
                batch,
                [
                    {
                        "code": "empty_file",
                        "message": "The input file holds no requests.",
                        "param": None,
                        "line": None,
                    }
                ],
            )
            return None
        batch.model = next(iter(models)) if isinstance(next(iter(models)), str) else None
        return lines

    async def _process(self, batch: _Batch, slots: asyncio.Semaphore) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            batch.loop, batch.cancel_event = loop, asyncio.Event()
            cancelled_early = batch.status == "cancelling"
        if cancelled_early:
            self._finish(batch, None, None)
            return
        try:
            lines = await anyio.to_thread.run_sync(self._validate, batch)
        except _Failure as failure:  # the input file was deleted meanwhile
            self._fail(
                batch,
                [
                    {
                        "code": "invalid_file",
                        "message": failure.message,
                        "param": "input_file_id",
                        "line": None,
                    }
                ],
            )
            return
        if lines is None:
            return
        output_path = self._new_path(f"file-{uuid.uuid4().hex}")
        error_path = self._new_path(f"file-{uuid.uuid4().hex}")
        with self._lock:
            batch.total = len(lines)
            if batch.status == "validating":
                batch.status = "in_progress"
                batch.in_progress_at = _now()
        event = batch.cancel_event
        assert event is not None
        with output_path.open("wb") as output, error_path.open("wb") as errors:

            async def cancelled() -> None:
                await event.wait()

            async def one(line: dict[str, Any]) -> None:
                try:
                    answer = await self._run_line(line["body"], cancelled)
                finally:
                    slots.release()
                if answer is None:
                    return  # cancelled before it finished: in neither file
                status, body = answer
                record = {
                    "id": f"batch_req_{uuid.uuid4().hex}",
                    "custom_id": line["custom_id"],
                    "response": {
                        "status_code": status,
                        "request_id": f"req_{uuid.uuid4().hex}",
                        "body": body,
                    },
                    "error": None,
                }
                data = _render_line(record)
                with self._lock:
                    if status == 200:
                        output.write(data)
                        batch.completed += 1
                        usage = body.get("usage") if isinstance(body, dict) else None
                        if isinstance(usage, dict):
                            for ours, theirs in (
                                ("input_tokens", "prompt_tokens"),
                                ("output_tokens", "completion_tokens"),
                                ("total_tokens", "total_tokens"),
                            ):
                                value = usage.get(theirs)
                                if isinstance(value, int):
                                    batch.usage[ours] += value
                    else:
                        errors.write(data)
                        batch.failed += 1
                    self._stored += len(data)

            tasks: list[asyncio.Task[None]] = []
            expired_from: int | None = None
            for position, line in enumerate(lines):
                # A cancel frees this batch's slots within a decode step (its lines stop).
                await slots.acquire()
                if event.is_set():
                    slots.release()
                    break
                if time.monotonic() >= batch.deadline:
                    slots.release()
                    expired_from = position
                    break
                self.lines_run += 1
                tasks.append(asyncio.ensure_future(one(line)))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if expired_from is not None and not event.is_set():
                for line in lines[expired_from:]:
                    record = {
                        "id": f"batch_req_{uuid.uuid4().hex}",
                        "custom_id": line["custom_id"],
                        "response": None,
                        "error": {
                            "code": "batch_expired",
                            "message": "This request could not be executed before the "
                            "completion window expired.",
                        },
                    }
                    data = _render_line(record)
                    errors.write(data)
                    with self._lock:
                        batch.failed += 1
                        self._stored += len(data)
        self._finish(batch, output_path, error_path, expired=expired_from is not None)

    def _finish(
        self,
        batch: _Batch,
        output_path: Path | None,
        error_path: Path | None,
        *,
        expired: bool = False,
    ) -> None:
        with self._lock:
            if batch.status not in ("cancelling",):
                batch.status = "finalizing"
                batch.finalizing_at = _now()
        for path, attribute, purpose in (
            (output_path, "output_file_id", "batch_output"),
            (error_path, "error_file_id", "batch_output"),
        ):
            if path is None:
                continue
            size = path.stat().st_size
            if size == 0:
                path.unlink(missing_ok=True)
                continue
            with self._lock:
                self._stored -= size  # counted line by line; add_file counts the whole file
            record = self.add_file(f"{batch.id}_{attribute[:-8]}.jsonl", purpose, path, size)
            setattr(batch, attribute, record.id)
        with self._lock:
            now = _now()
            if batch.status == "cancelling":
                batch.status, batch.cancelled_at = "cancelled", now
            elif expired:
                batch.status, batch.expired_at = "expired", now
            else:
                batch.status, batch.completed_at = "completed", now
            batch.loop = batch.cancel_event = None

    async def _run_line(
        self, body: Any, cancelled: Callable[[], Awaitable[None]]
    ) -> tuple[int, Any] | None:
        """(HTTP status, response body) of one line, as ``POST /v1/completions`` would answer it;
        None when the batch was cancelled first."""
        try:
            completion, scheduler = await self._server.accept(body)
            if completion.stream:
                raise _Failure(
                    400, "Streaming is not supported in batches; remove stream.", param="stream"
                )
            while True:
                try:
                    result = await scheduler.complete(completion, disconnected=cancelled)
                except Overloaded as exc:  # live requests fill the queue: wait for room
                    await asyncio.sleep(exc.retry_after)
                    continue
                break
        except _Failure as failure:
            return failure.status, failure.body()
        except RequestError as exc:
            return 400, _request_error(exc).body()
        except Exception:
            request_id = f"req_{uuid.uuid4().hex}"
            logger.exception("a batch line failed (request %s)", request_id)
            return 500, _server_error(request_id).body()
        if result is None:
            return None
        return 200, result


def _render_line(record: dict[str, Any]) -> bytes:
    from ._app import render_json

    return render_json(record) + b"\n"


def _read_lines(path: Path) -> Iterator[dict[str, Any]]:
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                value = json.loads(raw)
                assert isinstance(value, dict)  # checked when the file was uploaded
                yield value


# -- checking an uploaded file --------------------------------------------------------------------
def check_batch_lines(path: Path, max_requests: int) -> int:
    """The number of requests in an uploaded batch file; `_Failure` naming the line otherwise."""
    seen: set[str] = set()
    count = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            where = f"line {number} of the file"
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise _Failure(400, f"{where} is not valid JSON ({exc}).", param="file") from None
            if not isinstance(line, dict):
                raise _Failure(400, f"{where} must be a JSON object.", param="file")
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise _Failure(
                    400,
                    f"{where}: custom_id must be a non-empty string; got {shown(custom_id, 60)}.",
                    param="custom_id",
                )
            if custom_id in seen:
                raise _Failure(
                    400,
                    f"{where}: custom_id {shown(custom_id, 60)} is not unique; every line needs "
                    "its own custom_id.",
                    param="custom_id",
                )
            seen.add(custom_id)
            if line.get("method") != "POST":
                raise _Failure(
                    400,
                    f"{where}: method must be 'POST'; got {shown(line.get('method'), 40)}.",
                    param="method",
                )
            if line.get("url") not in BATCH_ENDPOINTS:
                raise _Failure(
                    400,
                    f"{where}: url must be one of {', '.join(BATCH_ENDPOINTS)}; got "
                    f"{shown(line.get('url'), 60)}.",
                    param="url",
                )
            if not isinstance(line.get("body"), dict):
                raise _Failure(
                    400, f"{where}: body must be a JSON object (the request).", param="body"
                )
            count += 1
            if count > max_requests:
                raise _Failure(
                    400,
                    f"The file holds more than {max_requests} requests; split it into several "
                    "files (one batch each).",
                    param="file",
                )
    if count == 0:
        raise _Failure(400, "The file holds no requests (one JSON object per line).", param="file")
    return count


# -- multipart ------------------------------------------------------------------------------------
def _boundary(content_type: str | None) -> bytes:
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise _Failure(
            415,
            "Upload files as multipart/form-data (fields 'file' and 'purpose'); got "
            + (f"Content-Type {shown(content_type, 80)}" if content_type else "no Content-Type"),
            code="unsupported_media_type",
        )
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    raise _Failure(400, "The multipart Content-Type has no boundary.", param="file")


def _disposition(headers: bytes) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in headers.split(b"\r\n"):
        name, _, value = line.decode("utf-8", errors="replace").partition(":")
        if name.strip().lower() != "content-disposition":
            continue
        for part in value.split(";")[1:]:
            key, _, item = part.strip().partition("=")
            found[key.lower()] = item.strip().strip('"')
    return found


def parse_multipart(data: bytes, boundary: bytes) -> tuple[dict[str, str], tuple[str, memoryview]]:
    """The text fields and the ``file`` part (filename, content) of a multipart/form-data body."""
    view = memoryview(data)
    delimiter = b"--" + boundary
    fields: dict[str, str] = {}
    upload: tuple[str, memoryview] | None = None
    position = data.find(delimiter)
    if position < 0:
        raise _Failure(400, "The multipart body holds no parts.", param="file")
    while True:
        position += len(delimiter)
        if data[position : position + 2] == b"--":
            break
        header_end = data.find(b"\r\n\r\n", position)
        if header_end < 0:
            raise _Failure(400, "A multipart part has no end of headers.", param="file")
        following = data.find(b"\r\n" + delimiter, header_end + 4)
        if following < 0:
            raise _Failure(400, "The multipart body ends before its closing boundary.")
        disposition = _disposition(data[position:header_end].strip(b"\r\n"))
        content = view[header_end + 4 : following]
        name = disposition.get("name")
        if name == "file":
            upload = (disposition.get("filename") or "upload.jsonl", content)
        elif name is not None:
            fields[name] = bytes(content).decode("utf-8", errors="replace")
        position = following + 2
    if upload is None:
        raise _Failure(400, "The upload has no 'file' part.", param="file")
    return fields, upload


# -- routes ---------------------------------------------------------------------------------------
async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _Failure(
            413, f"The upload must be at most {limit} bytes; got {declared}.", code="file_too_large"
        )
    parts: list[bytes] = []
    received = 0
    try:
        with anyio.fail_after(timeout_s):
            async for part in request.stream():
                received += len(part)
                if received > limit:
                    raise _Failure(
                        413, f"The upload must be at most {limit} bytes.", code="file_too_large"
                    )
                parts.append(part)
    except TimeoutError:
        raise _Failure(
            408,
            f"The upload did not arrive within {timeout_s:g} seconds ({received} bytes received).",
            code="request_timeout",
            headers={"connection": "close"},
        ) from None
    return b"".join(parts)


class _Routes:
    def __init__(self, server: _CompletionsServer, store: BatchStore) -> None:
        self.server = server
        self.store = store

    async def upload(self, request: Request, request_id: str) -> Response:
        store = self.store
        boundary = _boundary(request.headers.get("content-type"))
        store._check_room()
        limit = store.limits.max_file_bytes
        # An upload takes longer than a JSON body: allow a slow link 1 MB/s on top of the usual.
        timeout = self.server.body_timeout_s + limit / 1e6
        data = await _read_body(request, limit + _MULTIPART_OVERHEAD, timeout)
        fields, (filename, content) = parse_multipart(data, boundary)
        purpose = fields.get("purpose")
        if purpose != "batch":
            raise _Failure(
                400,
                f"purpose must be 'batch' (the only purpose this server accepts); got "
                f"{shown(purpose, 40)}.",
                param="purpose",
            )
        if len(content) > limit:
            raise _Failure(
                413,
                f"The file must be at most {limit} bytes; got {len(content)}.",
                code="file_too_large",
            )
        file_id = f"file-{uuid.uuid4().hex}"
        path = store._new_path(file_id)

        def write_and_check() -> int:
            path.write_bytes(content)
            try:
                return check_batch_lines(path, store.limits.max_file_requests)
            except BaseException:
                path.unlink(missing_ok=True)
                raise

        await anyio.to_thread.run_sync(write_and_check)
        record = store.add_file(os.path.basename(filename), purpose, path, len(content))
        return _JSON(record.card())

    async def file(self, request: Request, request_id: str) -> Response:
        return _JSON(self.store.file(request.path_params["file_id"]).card())

    async def delete_file(self, request: Request, request_id: str) -> Response:
        record = self.store.delete_file(request.path_params["file_id"])
        return _JSON({"id": record.id, "object": "file", "deleted": True})

    async def files(self, request: Request, request_id: str) -> Response:
        with self.store._lock:
            records = list(self.store._files.values())
        return _JSON({"object": "list", "data": [r.card() for r in records]})

    async def content(self, request: Request, request_id: str) -> Response:
        record = self.store.file(request.path_params["file_id"])
        return FileResponse(record.path, media_type="application/octet-stream")

    async def create(self, request: Request, request_id: str) -> Response:
        body = await self.server._read_json(request)
        if not isinstance(body, dict):
            raise _Failure(400, "The request body must be a JSON object.")
        accepted = ("input_file_id", "endpoint", "completion_window", "metadata")
        unknown = [key for key in body if key not in accepted]
        if unknown:
            raise _Failure(
                400,
                f"Unrecognized request argument supplied: {shown(unknown[0], 60)}. The fields "
                f"are: {', '.join(accepted)}.",
                param=unknown[0][:100],
            )
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise _Failure(
                400,
                f"input_file_id must be the id of an uploaded file; got "
                f"{shown(input_file_id, 60)}.",
                param="input_file_id",
            )
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise _Failure(
                400,
                f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)} on this server; got "
                f"{shown(endpoint, 60)}.",
                param="endpoint",
            )
        window = body.get("completion_window")
        if window not in COMPLETION_WINDOWS:
            raise _Failure(
                400,
                f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}; got "
                f"{shown(window, 40)}.",
                param="completion_window",
            )
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > _MAX_METADATA_PAIRS
            or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise _Failure(
                400,
                f"metadata must be an object of at most {_MAX_METADATA_PAIRS} string pairs "
                "(keys up to 64 characters, values up to 512).",
                param="metadata",
            )
        await self.server.engine()  # the model loads now, not inside the first line
        batch = self.store.create_batch(input_file_id, str(endpoint), str(window), metadata)
        return _JSON(batch.card())

    async def retrieve(self, request: Request, request_id: str) -> Response:
        return _JSON(self.store.batch(request.path_params["batch_id"]).card())

    async def cancel(self, request: Request, request_id: str) -> Response:
        return _JSON(self.store.cancel(request.path_params["batch_id"]).card())

    async def list(self, request: Request, request_id: str) -> Response:
        params = request.query_params
        raw_limit = params.get("limit", "20")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= _MAX_LIST_LIMIT:
            raise _Failure(
                400,
                f"limit must be an integer from 1 to {_MAX_LIST_LIMIT}; got "
                f"{shown(raw_limit, 20)}.",
                param="limit",
            )
        page, more = self.store.list_batches(params.get("after"), int(raw_limit))
        return _JSON(
            {
                "object": "list",
                "data": [b.card() for b in page],
                "first_id": page[0].id if page else None,
                "last_id": page[-1].id if page else None,
                "has_more": more,
            }
        )


def batch_routes(server: _CompletionsServer, store: BatchStore) -> list[Route]:
    """The ``/v1/files`` and ``/v1/batches`` routes, wrapped like every other ``/v1`` route."""
    routes = _Routes(server, store)
    wrap = server.endpoint
    return [
        Route("/v1/files", wrap(routes.upload), methods=["POST"]),
        Route("/v1/files", wrap(routes.files), methods=["GET"]),
        Route("/v1/files/{file_id}", wrap(routes.file), methods=["GET"]),
        Route("/v1/files/{file_id}", wrap(routes.delete_file), methods=["DELETE"]),
        Route("/v1/files/{file_id}/content", wrap(routes.content), methods=["GET"]),
        Route("/v1/batches", wrap(routes.create), methods=["POST"]),
        Route("/v1/batches", wrap(routes.list), methods=["GET"]),
        Route("/v1/batches/{batch_id}", wrap(routes.retrieve), methods=["GET"]),
        Route("/v1/batches/{batch_id}/cancel", wrap(routes.cancel), methods=["POST"]),
    ]
