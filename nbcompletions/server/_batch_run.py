"""One batch's run: its lines, read one at a time from the input file, through the scheduler into
its output and error files.

Memory stays flat whatever the file holds: a line is read and parsed only once a slot is free for
it (``max_lines_in_flight`` lines and `IN_FLIGHT_BYTES` of raw lines at once, all batches
together), and every line was held to the request body limit when the file was uploaded. Disk
stays bounded: each line written reserves its bytes in the store's ``max_stored_bytes`` first; a
batch whose output would pass it stops and fails with ``storage_limit_exceeded``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import IO, Any, Protocol

import anyio.to_thread

__all__ = [
    "IN_FLIGHT_BYTES",
    "BatchRun",
    "LineBudget",
    "RunnableBatch",
    "in_flight_bytes",
    "raw_lines",
]

#: Raw batch lines parsed and waiting in the scheduler at once, all batches together (at least one
#: line always runs, however long: the upload held it to the request body limit).
IN_FLIGHT_BYTES = 16 * 1000 * 1000
#: ... at most this share of the memory kept for the server (`WorkBudget.reserve_bytes`).
_RESERVE_SHARE = 4


def in_flight_bytes(reserve_bytes: int) -> int:
    """Raw lines in flight: `IN_FLIGHT_BYTES`, at most a quarter of ``reserve_bytes``. A line in
    flight holds about three times its bytes (the raw line, its parsed prompt, the UTF-8 copy
    the context check measures): 40 lines of 900 KB, refused for the context, grew the server by
    37 MiB under ``--max-memory-mb 128`` with 16 MB in flight."""
    return min(IN_FLIGHT_BYTES, reserve_bytes // _RESERVE_SHARE)


#: (HTTP status, response body) of one line; None when the batch was cancelled first.
Answer = tuple[int, Any] | None


class RunnableBatch(Protocol):
    """What a run reads of its batch (``_batch_store.Batch``)."""

    id: str
    deadline: float
    cancel_event: asyncio.Event | None


class LineStore(Protocol):
    """What a run needs of the store: paths, disk room, the line runner and the counts."""

    def new_path(self, file_id: str) -> Path: ...

    def reserve(self, size: int) -> bool: ...

    def run_line(
        self, body: Any, cancelled: Callable[[], Awaitable[None]], url: str
    ) -> Awaitable[Answer]: ...

    def count_line(self, batch: Any, ok: bool, body: Any) -> None: ...


class LineBudget:
    """``max_lines_in_flight`` slots and `IN_FLIGHT_BYTES` of raw lines, shared by all batches of
    one runner loop."""

    def __init__(self, lines: int, bytes_: int = IN_FLIGHT_BYTES) -> None:
        self._lines = lines
        self._bytes = bytes_
        self._held_lines = 0
        self._held_bytes = 0
        self._changed = asyncio.Condition()

    async def acquire(self, size: int) -> None:
        async with self._changed:
            await self._changed.wait_for(
                lambda: (
                    self._held_lines < self._lines
                    and (self._held_bytes == 0 or self._held_bytes + size <= self._bytes)
                )
            )
            self._held_lines += 1
            self._held_bytes += size

    async def release(self, size: int) -> None:
        async with self._changed:
            self._held_lines -= 1
            self._held_bytes -= size
            self._changed.notify_all()


def raw_lines(handle: IO[bytes]) -> Iterator[bytes]:
    """The non-blank lines of an (already checked) input file, as bytes."""
    for raw in handle:
        if raw.strip():
            yield raw


def _record(custom_id: Any, response: dict[str, Any] | None, error: Any) -> dict[str, Any]:
    return {
        "id": f"batch_req_{uuid.uuid4().hex}",
        "custom_id": custom_id,
        "response": response,
        "error": error,
    }


_EXPIRED = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


class BatchRun:
    """Runs the lines of ``batch`` from ``handle`` (an open input file) into two new files.

    After `run`: ``expired`` (the window ended first: unrun lines are ``batch_expired`` errors),
    ``out_of_room`` (the output would have passed ``max_stored_bytes``), and the two paths.
    """

    def __init__(
        self,
        store: LineStore,
        batch: RunnableBatch,
        budget: LineBudget,
        render: Callable[[dict[str, Any]], bytes],
    ) -> None:
        self.store = store
        self.batch = batch
        self.budget = budget
        self.render = render
        assert batch.cancel_event is not None
        self.event = batch.cancel_event
        self.output_path = store.new_path(f"file-{uuid.uuid4().hex}")
        self.error_path = store.new_path(f"file-{uuid.uuid4().hex}")
        self.expired = False
        self.out_of_room = False
        self._files: dict[bool, IO[bytes]] = {}

    async def run(self, handle: IO[bytes]) -> None:
        with self.output_path.open("wb") as output, self.error_path.open("wb") as errors:
            self._files = {True: output, False: errors}
            lines = raw_lines(handle)
            tasks: list[asyncio.Task[None]] = []
            for raw in lines:
                # A cancel frees this batch's slots within a decode step (its lines stop).
                await self.budget.acquire(len(raw))
                if self.event.is_set() or self.out_of_room:
                    await self.budget.release(len(raw))
                    break
                if time.monotonic() >= self.batch.deadline:
                    await self.budget.release(len(raw))
                    self.expired = True
                    self._expire([raw], lines)
                    break
                tasks.append(asyncio.ensure_future(self._one(raw)))
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, raw: bytes) -> None:
        try:
            # In a worker thread: its stack is as shallow as the upload check's, which parsed
            # this line (a line nested 985 deep overflows the recursion limit in a deep one).
            line = await anyio.to_thread.run_sync(json.loads, raw)
            answer = await self.store.run_line(line["body"], self._cancelled, line["url"])
        finally:
            await self.budget.release(len(raw))
        if answer is None:
            return  # cancelled before it finished: in neither file
        status, body = answer
        response = {
            "status_code": status,
            "request_id": f"req_{uuid.uuid4().hex}",
            "body": body,
        }
        if self._write(_record(line["custom_id"], response, None), ok=status == 200):
            self.store.count_line(self.batch, status == 200, body)

    async def _cancelled(self) -> None:
        await self.event.wait()

    def _expire(self, first: list[bytes], rest: Iterator[bytes]) -> None:
        if self.event.is_set():
            return
        for raw in (*first, *rest):
            record = _record(json.loads(raw)["custom_id"], None, _EXPIRED)
            if not self._write(record, ok=False):
                return
            self.store.count_line(self.batch, False, None)

    def _write(self, record: dict[str, Any], *, ok: bool) -> bool:
        """Write one line to the output (ok) or error file, if the store has room for it."""
        data = self.render(record)
        if not self.store.reserve(len(data)):
            self.out_of_room = True
            return False
        self._files[ok].write(data)
        return True
