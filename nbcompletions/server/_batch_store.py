"""The Batch API's job store: uploaded files, batches, and the background thread that runs them.

See `nbcompletions.server._batches` for the routes and the whole story (how a batch runs, what is
bounded, cancelling and expiry).
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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import IO, Any

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

import anyio

from .._errors import RequestError
from .._request import shown
from ._app import CompletionsServer
from ._batch_run import BatchRun, LineBudget, in_flight_bytes, raw_lines
from ._chat import chat_response
from ._http import Failure, render_json, request_error, server_error
from ._scheduler import Overloaded

__all__ = ["BATCH_ENDPOINTS", "BatchLimits", "BatchStore"]

logger = logging.getLogger("nbcompletions.server")

#: The endpoints a batch may target (vLLM's run_batch takes only chat).
BATCH_ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
#: OpenAI's only completion window.
COMPLETION_WINDOWS = {"24h": 24 * 3600}
_TERMINAL = ("failed", "completed", "expired", "cancelled")
# How often the runner looks for new batches while others run (a new batch waits at most this).
_PICKUP_S = 0.05
MAX_METADATA_PAIRS = 16
#: The most batches one ``GET /v1/batches`` lists (OpenAI's), and files one ``GET /v1/files``.
MAX_BATCHES_LIMIT = 100
MAX_FILES_LIMIT = 10_000


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


_DIRECTORY_PREFIX = "nbcompletions-batches-"
_OWNER_FILE = ".owner"  # held locked (flock) by the live server whose directory it is


def _remove_directory(path: str, owner: IO[bytes] | None = None) -> None:
    shutil.rmtree(path, ignore_errors=True)
    if owner is not None:
        owner.close()


def _owner_is_gone(directory: Path) -> bool:
    """Whether the server that made ``directory`` has ended: its owner file's lock is free, or
    (no owner file yet) the process id in its name runs no longer."""
    try:
        with (directory / _OWNER_FILE).open("rb") as owner:
            try:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return False  # a live server holds it (perhaps in this very process)
            return True
    except FileNotFoundError:
        pid = directory.name[len(_DIRECTORY_PREFIX) :].partition("-")[0]
        if not pid.isdigit():
            return False  # an older server's directory: nothing says whether it still runs
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def remove_stale_directories(parent: str | None = None) -> list[Path]:
    """Remove the batch directories that servers which have ended (kill -9, a crash) left in the
    temporary directory; the ones removed."""
    if fcntl is None:  # pragma: no cover - Windows: no flock to tell a live owner
        return []
    removed = []
    for directory in Path(parent or tempfile.gettempdir()).glob(f"{_DIRECTORY_PREFIX}*"):
        if directory.is_dir() and _owner_is_gone(directory):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    if removed:
        logger.info("removed %d batch directories of servers that have ended", len(removed))
    return removed


def _make_directory() -> tuple[str, IO[bytes] | None]:
    """A new batch directory, locked as this process's (see `remove_stale_directories`)."""
    remove_stale_directories()
    path = tempfile.mkdtemp(prefix=f"{_DIRECTORY_PREFIX}{os.getpid()}-")
    if fcntl is None:  # pragma: no cover - Windows
        return path, None
    owner = (Path(path) / _OWNER_FILE).open("wb")
    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return path, owner


class BatchStore:
    """Files and batches of one app, and the background runner that executes the batches."""

    def __init__(self, server: CompletionsServer, limits: BatchLimits) -> None:
        self._server = server
        self.limits = limits
        self._lock = threading.Lock()
        self._files: dict[str, _File] = {}
        self._batches: dict[str, _Batch] = {}  # in creation order
        self._queue: collections.deque[_Batch] = collections.deque()
        self._thread: threading.Thread | None = None
        self._stored = 0
        self._directory: str | None = None
        self._remove: Callable[[], Any] = lambda: None

    @property
    def stored_bytes(self) -> int:
        """Bytes the stored files hold, with what uploads and running batches have reserved."""
        return self._stored

    def __repr__(self) -> str:
        return (
            f"<BatchStore: {len(self._files)} files ({self._stored} bytes), "
            f"{len(self._batches)} batches>"
        )

    # -- files -------------------------------------------------------------------------------------
    def new_path(self, file_id: str) -> Path:
        with self._lock:
            if self._directory is None:
                self._directory, owner = _make_directory()
                self._remove = weakref.finalize(self, _remove_directory, self._directory, owner)
            return Path(self._directory) / f"{file_id}.jsonl"

    def close(self) -> None:
        """Remove the files (``serve`` calls it on its way out, SIGTERM included)."""
        self._remove()

    def check_room(self) -> None:
        if self._stored >= self.limits.max_stored_bytes:
            raise self.room_failure()

    def room_failure(self) -> Failure:
        """The 400 of an upload or a batch that finds the store full."""
        return Failure(
            400,
            f"This server holds at most {self.limits.max_stored_bytes} bytes of batch files "
            f"(--max-batch-stored-bytes) and holds {self._stored}, uploads in progress "
            "included; delete files you no longer need "
            "(DELETE /v1/files/{file_id}) and try again.",
            code="storage_limit_exceeded",
        )

    def commit_upload(self, filename: str, path: Path, size: int, reserved: int) -> _File:
        """Store a checked upload if it fits, giving back the ``reserved`` bytes counted while it
        arrived (checked under the lock: concurrent uploads reached 1.35x the limit when each
        checked only the room before it started)."""
        with self._lock:
            fits = self._stored - reserved + size <= self.limits.max_stored_bytes
            self._stored -= reserved
            if fits:
                record = _File(path.stem, filename, "batch", path, size, _now())
                self._files[record.id] = record
                self._stored += size
                return record
            failure = self.room_failure()
        path.unlink(missing_ok=True)
        raise failure

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
            raise self.no_such_file(file_id)
        return record

    @staticmethod
    def no_such_file(file_id: str) -> Failure:
        return Failure(
            404, f"No such File object: {shown(file_id, 80)}", param="id", code="not_found"
        )

    def list_files(
        self, after: str | None, limit: int, *, newest_first: bool, purpose: str | None
    ) -> tuple[list[_File], bool]:
        """A page of files as OpenAI lists them; ``after`` is the last id of the previous page."""
        with self._lock:
            records = list(self._files.values())  # in upload order
        if newest_first:
            records.reverse()
        if purpose is not None:
            records = [r for r in records if r.purpose == purpose]
        if after is not None:
            ids = [r.id for r in records]
            if after not in ids:
                raise Failure(
                    400, f"after must be the id of a file; got {shown(after, 80)}", param="after"
                )
            records = records[ids.index(after) + 1 :]
        return records[:limit], len(records) > limit

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
            raise Failure(
                400,
                f"The input file {input_file_id} has purpose {source.purpose!r}; a batch needs a "
                "file uploaded with purpose 'batch'.",
                param="input_file_id",
            )
        self.check_room()
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
            raise Failure(
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
                raise Failure(
                    400, f"after must be the id of a batch; got {shown(after, 80)}", param="after"
                )
            newest_first = newest_first[ids.index(after) + 1 :]
        return newest_first[:limit], len(newest_first) > limit

    def cancel(self, batch_id: str) -> _Batch:
        batch = self.batch(batch_id)
        with self._lock:
            if batch.status in ("cancelled", "cancelling"):
                return batch
            # Finalizing: every line has run and the files are being stored; a cancel landing now
            # turned a completed batch "cancelled" (4 of 100 tries).
            if batch.status in _TERMINAL or batch.status == "finalizing":
                raise Failure(
                    409,
                    f"Cannot cancel a batch with status '{batch.status}'.",
                    code="batch_not_cancellable",
                )
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
        budget = LineBudget(
            self.limits.max_lines_in_flight, in_flight_bytes(self._server.budget.reserve_bytes)
        )
        running: set[asyncio.Task[None]] = set()
        while True:
            with self._lock:
                while self._queue:
                    batch = self._queue.popleft()
                    running.add(asyncio.ensure_future(self._process_to_the_end(batch, budget)))
                if not running:
                    self._thread = None
                    return
            done, running = await asyncio.wait(running, timeout=_PICKUP_S)
            for task in done:
                if task.exception() is not None:  # pragma: no cover - a bug in _process
                    logger.error("a batch failed in the runner", exc_info=task.exception())

    async def _process_to_the_end(self, batch: _Batch, budget: LineBudget) -> None:
        """`_process`, and a terminal state whatever happens: a runner that died left its batch
        "validating" (or "cancelling") forever."""
        try:
            await self._process(batch, budget)
        except Exception:
            request_id = f"req_{uuid.uuid4().hex}"
            logger.exception("batch %s failed in the runner (request %s)", batch.id, request_id)
            with self._lock:
                cancelling = batch.status == "cancelling"
                if cancelling:
                    batch.status, batch.cancelled_at = "cancelled", _now()
            if not cancelling:
                error = server_error(request_id).body()["error"]
                self._fail(batch, [{**error, "code": "server_error", "line": None}])
        finally:
            batch.loop = batch.cancel_event = None

    def _fail(self, batch: _Batch, errors: list[dict[str, Any]]) -> None:
        with self._lock:
            batch.status = "failed"
            batch.failed_at = _now()
            batch.errors = {"object": "list", "data": errors}

    def _validate(self, batch: _Batch) -> IO[bytes] | None:
        """The input file, open and checked (one url, one model), or None after failing the batch.

        The open file reads whole even if it is deleted while the batch runs.
        """
        try:
            handle = self.file(batch.input_file_id).path.open("rb")
        except (Failure, FileNotFoundError):
            error = {
                "code": "invalid_file",
                "message": f"The input file {batch.input_file_id} was deleted before the batch "
                "ran.",
                "param": "input_file_id",
                "line": None,
            }
            self._fail(batch, [error])
            return None
        try:
            errors, total, model = _check_input(handle, batch.endpoint)
            handle.seek(0)
        except BaseException:
            handle.close()
            raise
        if not errors and total == 0:
            errors = [
                {
                    "code": "empty_file",
                    "message": "The input file holds no requests.",
                    "param": None,
                    "line": None,
                }
            ]
        if errors:
            handle.close()
            self._fail(batch, errors)
            return None
        with self._lock:
            batch.total, batch.model = total, model
            if batch.status == "validating":
                batch.status = "in_progress"
                batch.in_progress_at = _now()
        return handle

    async def _process(self, batch: _Batch, budget: LineBudget) -> None:
        with self._lock:
            batch.loop, batch.cancel_event = asyncio.get_running_loop(), asyncio.Event()
            cancelled_early = batch.status == "cancelling"
        if cancelled_early:
            self._finish(batch, None)
            return
        handle = await anyio.to_thread.run_sync(self._validate, batch)
        if handle is None:
            return
        with handle:
            run = BatchRun(self, batch, budget, _render_line)
            await run.run(handle)
        self._finish(batch, run)

    # -- what a run needs (see `._batch_run`) ------------------------------------------------------
    def reserve(self, size: int) -> bool:
        """Count ``size`` more bytes as stored, if they fit under ``max_stored_bytes``."""
        with self._lock:
            if self._stored + size > self.limits.max_stored_bytes:
                return False
            self._stored += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self._stored -= size

    def count_line(self, batch: Any, ok: bool, body: Any) -> None:
        """Count a finished line (with its usage, when it has one)."""
        with self._lock:
            if not ok:
                batch.failed += 1
                return
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

    def _store_outputs(self, batch: _Batch, run: BatchRun) -> None:
        for path, attribute in (
            (run.output_path, "output_file_id"),
            (run.error_path, "error_file_id"),
        ):
            size = path.stat().st_size
            if size == 0:
                path.unlink(missing_ok=True)
                continue
            self.release(size)  # reserved line by line; add_file counts the whole file
            record = self.add_file(f"{batch.id}_{attribute[:-8]}.jsonl", "batch_output", path, size)
            setattr(batch, attribute, record.id)

    def _finish(self, batch: _Batch, run: BatchRun | None) -> None:
        with self._lock:
            if batch.status != "cancelling":
                batch.status = "finalizing"
                batch.finalizing_at = _now()
        if run is not None:
            self._store_outputs(batch, run)
        with self._lock:
            now = _now()
            if batch.status == "cancelling":
                batch.status, batch.cancelled_at = "cancelled", now
            elif run is not None and run.out_of_room:
                batch.status, batch.failed_at = "failed", now
                batch.errors = {"object": "list", "data": [self._out_of_room()]}
            elif run is not None and run.expired:
                batch.status, batch.expired_at = "expired", now
            else:
                batch.status, batch.completed_at = "completed", now
            batch.loop = batch.cancel_event = None

    def _out_of_room(self) -> dict[str, Any]:
        return {
            "code": "storage_limit_exceeded",
            "message": f"The batch's output would pass the {self.limits.max_stored_bytes} bytes "
            "this server stores for batches (--max-batch-stored-bytes, inputs and outputs "
            "together); the lines that finished are in its output and error files. Delete files "
            "you no longer need and run the rest again.",
            "param": None,
            "line": None,
        }

    async def run_line(
        self, body: Any, cancelled: Callable[[], Awaitable[None]], url: str = "/v1/completions"
    ) -> tuple[int, Any] | None:
        """(HTTP status, response body) of one line, as ``POST {url}`` would answer it; None
        when the batch was cancelled first."""
        call = None
        try:
            if url == "/v1/chat/completions":
                call, scheduler = await self._server.accept_chat(body)
                completion = call.completion
            else:
                completion, scheduler = await self._server.accept(body)
            if completion.stream:
                raise Failure(
                    400, "Streaming is not supported in batches; remove stream.", param="stream"
                )
            while True:
                try:
                    result = await scheduler.complete(completion, disconnected=cancelled)
                except Overloaded as exc:  # live requests fill the queue: wait for room
                    await asyncio.sleep(exc.retry_after)
                    continue
                break
        except Failure as failure:
            return failure.status, failure.body()
        except RequestError as exc:
            return 400, request_error(exc).body()
        except Exception:
            request_id = f"req_{uuid.uuid4().hex}"
            logger.exception("a batch line failed (request %s)", request_id)
            return 500, server_error(request_id).body()
        if result is None:
            return None
        if call is not None:
            return 200, chat_response(result, call, self._server.token_bytes)
        return 200, result


def _render_line(record: dict[str, Any]) -> bytes:
    return render_json(record) + b"\n"


def _check_input(handle: IO[bytes], endpoint: str) -> tuple[list[dict[str, Any]], int, str | None]:
    """(errors, number of requests, model) of an input file: every url must be the batch's
    endpoint and every line name one model (a model that is no string, a list or an object, is
    the line's own error: a 400 line naming model, not the batch's)."""
    models: list[str] = []
    errors: list[dict[str, Any]] = []
    total = 0
    for total, raw in enumerate(raw_lines(handle), start=1):
        line = json.loads(raw)
        if line["url"] != endpoint:
            errors.append(
                {
                    "code": "invalid_url",
                    "message": "The URL provided for this request does not match the batch "
                    f"endpoint {endpoint}; got {shown(line['url'], 80)}.",
                    "param": "url",
                    "line": total,
                }
            )
        model = line["body"].get("model")
        if isinstance(model, str) and model not in models:
            if models and not errors:
                errors.append(
                    {
                        "code": "mismatched_model",
                        "message": "The provided model differs from the model of earlier lines; "
                        f"a batch file holds one model. Line {total} has {shown(model, 80)}, "
                        f"earlier lines {shown(models[0], 80)}.",
                        "param": "body.model",
                        "line": total,
                    }
                )
            models.append(model)
        if len(errors) >= 10:
            break
    return errors, total, models[0] if models else None
