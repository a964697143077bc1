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

import json
import logging
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .._request import shown
from ._app import _JSON, _CompletionsServer, _Failure

__all__ = [
    "BATCH_ENDPOINTS",
    "BatchLimits",
    "BatchStore",
    "batch_routes",
]

from ._batch_store import (
    _MAX_METADATA_PAIRS,
    _MULTIPART_OVERHEAD,
    BATCH_ENDPOINTS,
    COMPLETION_WINDOWS,
    MAX_BATCHES_LIMIT,
    MAX_FILES_LIMIT,
    BatchLimits,
    BatchStore,
)

logger = logging.getLogger("nbcompletions.server")
_CHUNK_BYTES = 256 * 1024


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
        params = request.query_params
        limit = _page_limit(params.get("limit"), default=MAX_FILES_LIMIT, most=MAX_FILES_LIMIT)
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise _Failure(
                400, f"order must be 'asc' or 'desc'; got {shown(order, 20)}.", param="order"
            )
        page, more = self.store.list_files(
            params.get("after"), limit, newest_first=order == "desc", purpose=params.get("purpose")
        )
        return _list_page([r.card() for r in page], more)

    async def content(self, request: Request, request_id: str) -> Response:
        record = self.store.file(request.path_params["file_id"])
        try:
            # Opened before the response starts: a delete landing now unlinks the name, and the
            # open file still reads whole (a FileResponse opened it later: a 500, or a body cut
            # short of its Content-Length, 3 in 64 tries).
            handle = await anyio.to_thread.run_sync(record.path.open, "rb")
        except FileNotFoundError:
            raise self.store.no_such_file(record.id) from None
        size = os.fstat(handle.fileno()).st_size
        return StreamingResponse(
            _chunks(handle),
            media_type="application/octet-stream",
            headers={"content-length": str(size)},
        )

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
        limit = _page_limit(params.get("limit"), default=20, most=MAX_BATCHES_LIMIT)
        page, more = self.store.list_batches(params.get("after"), limit)
        return _list_page([b.card() for b in page], more)


async def _chunks(handle: BinaryIO) -> AsyncIterator[bytes]:
    try:
        while chunk := await anyio.to_thread.run_sync(handle.read, _CHUNK_BYTES):
            yield chunk
    finally:
        handle.close()


def _page_limit(given: str | None, *, default: int, most: int) -> int:
    """The ``limit`` query parameter: ASCII digits from 1 to ``most`` (``"²"`` passed
    ``str.isdigit`` and failed ``int``; 5,000 digits passed it too and failed ``int``)."""
    if given is None:
        return default
    if not (given.isascii() and given.isdigit() and len(given) <= 6 and 1 <= int(given) <= most):
        raise _Failure(
            400,
            f"limit must be an integer from 1 to {most}; got {shown(given, 20)}.",
            param="limit",
        )
    return int(given)


def _list_page(data: list[dict[str, Any]], has_more: bool) -> Response:
    return _JSON(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
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
