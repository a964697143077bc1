"""Receiving a Batch API upload: the multipart body spooled to disk as it arrives (bounded by the
store's room and the body timeout), the file part cut out, and every line checked.

Memory stays small whatever the upload: the body goes to disk in chunks, is read back through a
memory map, and each line is held to the request body limit before it is parsed.
"""

from __future__ import annotations

import json
import mmap
import os
import uuid
from pathlib import Path
from typing import IO, NamedTuple, Protocol

import anyio
import anyio.to_thread
from starlette.requests import Request

from .._request import shown
from ._batch_store import BATCH_ENDPOINTS
from ._http import Failure

__all__ = [
    "MULTIPART_OVERHEAD",
    "FilePart",
    "Upload",
    "check_batch_lines",
    "multipart_boundary",
    "parse_multipart",
    "receive_upload",
]

#: Headers and the purpose field around the file part.
MULTIPART_OVERHEAD = 64 * 1024
_WRITE_BYTES = 1024 * 1024  # the body is written to disk in pieces of about this
_MAX_FIELD_BYTES = 1000  # a text field (purpose) is read this far at most
#: A multipart body: in memory, or spooled to disk and mapped.
Body = bytes | mmap.mmap


class FilePart(NamedTuple):
    """The ``file`` part of a multipart body: its file name and where its content lies."""

    filename: str
    start: int
    end: int


class UploadStore(Protocol):
    """What an upload needs of the store (``BatchStore``)."""

    def new_path(self, file_id: str) -> Path: ...

    def reserve(self, size: int) -> bool: ...

    def release(self, size: int) -> None: ...

    def room_failure(self) -> Failure: ...


# -- checking an uploaded file --------------------------------------------------------------------
def check_batch_lines(path: Path, max_requests: int, max_line_bytes: int) -> int:
    """The number of requests in an uploaded batch file; `Failure` naming the line otherwise.

    A line is held to the request body limit (``max_line_bytes``) before it is parsed: a 10 MB
    line took the server to 2.1 GB and stalled every request for 10-30 s.
    """
    seen: set[str] = set()
    count = 0
    with path.open("rb") as handle:
        number = 0
        while raw := handle.readline(max_line_bytes + 2):  # + "\r\n"
            number += 1
            where = f"line {number} of the file"
            if len(raw.rstrip(b"\r\n")) > max_line_bytes:
                raise Failure(
                    400,
                    f"{where} is longer than {max_line_bytes} bytes: a request line may be at "
                    "most the server's request body limit (--max-body-bytes).",
                    param="file",
                    code="line_too_large",
                )
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError) as exc:
                raise Failure(400, f"{where} is not valid JSON ({exc}).", param="file") from None
            if not isinstance(line, dict):
                raise Failure(400, f"{where} must be a JSON object.", param="file")
            custom_id = line.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise Failure(
                    400,
                    f"{where}: custom_id must be a non-empty string; got {shown(custom_id, 60)}.",
                    param="custom_id",
                )
            if custom_id in seen:
                raise Failure(
                    400,
                    f"{where}: custom_id {shown(custom_id, 60)} is not unique; every line needs "
                    "its own custom_id.",
                    param="custom_id",
                )
            seen.add(custom_id)
            if line.get("method") != "POST":
                raise Failure(
                    400,
                    f"{where}: method must be 'POST'; got {shown(line.get('method'), 40)}.",
                    param="method",
                )
            if line.get("url") not in BATCH_ENDPOINTS:
                raise Failure(
                    400,
                    f"{where}: url must be one of {', '.join(BATCH_ENDPOINTS)}; got "
                    f"{shown(line.get('url'), 60)}.",
                    param="url",
                )
            if not isinstance(line.get("body"), dict):
                raise Failure(
                    400, f"{where}: body must be a JSON object (the request).", param="body"
                )
            count += 1
            if count > max_requests:
                raise Failure(
                    400,
                    f"The file holds more than {max_requests} requests; split it into several "
                    "files (one batch each).",
                    param="file",
                )
    if count == 0:
        raise Failure(400, "The file holds no requests (one JSON object per line).", param="file")
    return count


# -- multipart ------------------------------------------------------------------------------------
def multipart_boundary(content_type: str | None) -> bytes:
    media, _, params = (content_type or "").partition(";")
    if media.strip().lower() != "multipart/form-data":
        raise Failure(
            415,
            "Upload files as multipart/form-data (fields 'file' and 'purpose'); got "
            + (f"Content-Type {shown(content_type, 80)}" if content_type else "no Content-Type"),
            code="unsupported_media_type",
        )
    for param in params.split(";"):
        name, _, value = param.strip().partition("=")
        if name.lower() == "boundary" and value:
            return value.strip('"').encode("latin-1")
    raise Failure(400, "The multipart Content-Type has no boundary.", param="file")


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


def parse_multipart(data: Body, boundary: bytes) -> tuple[dict[str, str], FilePart]:
    """The text fields (their first `_MAX_FIELD_BYTES` bytes) and the ``file`` part of a
    multipart/form-data body. Offsets, not views: a view left alive by an error stopped the
    memory map from closing (a 500)."""
    delimiter = b"--" + boundary
    fields: dict[str, str] = {}
    upload: FilePart | None = None
    position = data.find(delimiter)
    if position < 0:
        raise Failure(400, "The multipart body holds no parts.", param="file")
    while True:
        position += len(delimiter)
        if data[position : position + 2] == b"--":
            break
        header_end = data.find(b"\r\n\r\n", position)
        if header_end < 0:
            raise Failure(400, "A multipart part has no end of headers.", param="file")
        following = data.find(b"\r\n" + delimiter, header_end + 4)
        if following < 0:
            raise Failure(400, "The multipart body ends before its closing boundary.")
        disposition = _disposition(data[position:header_end].strip(b"\r\n"))
        name = disposition.get("name")
        if name == "file":
            filename = disposition.get("filename") or "upload.jsonl"
            upload = FilePart(filename, header_end + 4, following)
        elif name is not None:
            end = min(following, header_end + 4 + _MAX_FIELD_BYTES)
            fields[name] = bytes(data[header_end + 4 : end]).decode("utf-8", errors="replace")
        position = following + 2
    if upload is None:
        raise Failure(400, "The upload has no 'file' part.", param="file")
    return fields, upload


class Upload:
    """A checked upload: its file in the store's directory, not yet counted as stored."""

    def __init__(self, filename: str, path: Path, size: int, reserved: int) -> None:
        self.filename = filename
        self.path = path
        self.size = size
        #: Bytes the store counts for it while it arrived (``BatchStore.commit_upload`` settles).
        self.reserved = reserved


async def _spool(
    request: Request, spool: IO[bytes], limit: int, timeout_s: float, store: UploadStore
) -> int:
    """Write the request body to ``spool``; the bytes reserved in the store for it. 413 past
    ``limit``, 408 past ``timeout_s``, 400 when the store has no room (nothing stays reserved)."""
    reserved = received = 0
    pending = bytearray()
    try:
        with anyio.fail_after(timeout_s):
            async for part in request.stream():
                if received + len(part) > limit:
                    raise Failure(
                        413, f"The upload must be at most {limit} bytes.", code="file_too_large"
                    )
                # The multipart headers around the file part are not stored: the first
                # MULTIPART_OVERHEAD bytes are not counted (the file's own size is, on commit).
                more = max(0, received + len(part) - MULTIPART_OVERHEAD) - reserved
                if not store.reserve(more):
                    raise store.room_failure()
                reserved += more
                received += len(part)
                pending += part
                if len(pending) >= _WRITE_BYTES:
                    await anyio.to_thread.run_sync(spool.write, bytes(pending))
                    pending.clear()
    except TimeoutError:
        store.release(reserved)
        raise Failure(
            408,
            f"The upload did not arrive within {timeout_s:g} seconds ({received} bytes "
            "received); --body-timeout sets the limit.",
            code="request_timeout",
            headers={"connection": "close"},
        ) from None
    except BaseException:
        store.release(reserved)
        raise
    await anyio.to_thread.run_sync(spool.write, bytes(pending))
    return reserved


def _cut_file_part(
    spool: Path, boundary: bytes, target: Path, limit: int
) -> tuple[dict[str, str], str, int]:
    """(text fields, file name, file size): the ``file`` part of the spooled body, written to
    ``target``."""
    with spool.open("rb") as handle:
        if os.fstat(handle.fileno()).st_size == 0:
            raise Failure(400, "The multipart body holds no parts.", param="file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            fields, part = parse_multipart(data, boundary)
            size = part.end - part.start
            if size > limit:
                raise Failure(
                    413,
                    f"The file must be at most {limit} bytes; got {size}.",
                    code="file_too_large",
                )
            with target.open("wb") as out:
                for start in range(part.start, part.end, _WRITE_BYTES):
                    out.write(data[start : min(start + _WRITE_BYTES, part.end)])
            return fields, part.filename, size


async def receive_upload(
    request: Request,
    boundary: bytes,
    store: UploadStore,
    *,
    max_file_bytes: int,
    max_requests: int,
    max_line_bytes: int,
    timeout_s: float,
) -> Upload:
    """Receive, cut out and check the uploaded batch file (a `Failure` says what is wrong)."""
    declared = request.headers.get("content-length")
    limit = max_file_bytes + MULTIPART_OVERHEAD
    if (
        declared is not None
        and declared.isascii()
        and declared.isdigit()
        and (len(declared) > 15 or int(declared) > limit)
    ):
        raise Failure(
            413,
            f"The upload must be at most {limit} bytes; got {shown(declared, 20)}.",
            code="file_too_large",
        )
    spool_path = store.new_path(f"upload-{uuid.uuid4().hex}")
    target = store.new_path(f"file-{uuid.uuid4().hex}")
    reserved = 0
    try:
        with await anyio.to_thread.run_sync(spool_path.open, "wb") as spool:
            reserved = await _spool(request, spool, limit, timeout_s, store)

        def cut_and_check() -> Upload:
            fields, filename, size = _cut_file_part(spool_path, boundary, target, max_file_bytes)
            spool_path.unlink()
            purpose = fields.get("purpose")
            if purpose != "batch":
                raise Failure(
                    400,
                    f"purpose must be 'batch' (the only purpose this server accepts); got "
                    f"{shown(purpose, 40)}.",
                    param="purpose",
                )
            check_batch_lines(target, max_requests, max_line_bytes)
            return Upload(os.path.basename(filename), target, size, reserved)

        return await anyio.to_thread.run_sync(cut_and_check)
    except BaseException:
        target.unlink(missing_ok=True)
        store.release(reserved)
        raise
    finally:
        spool_path.unlink(missing_ok=True)
