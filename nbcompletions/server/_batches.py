"""The Batch API on our server: ``/v1/files`` and ``/v1/batches``, and the job store behind them.

A client uploads a JSONL file of requests (``POST /v1/files``, multipart, purpose ``batch``), one
line per request: ``{"custom_id", "method": "POST", "url": "/v1/completions", "body": {...}}``
(or ``/v1/chat/completions`` with a chat body: one url per file, the batch's endpoint);
creates a batch from it (``POST /v1/batches``); polls it (``GET /v1/batches/{id}``); and downloads
the output and error files (``GET /v1/files/{id}/content``). Shapes are OpenAI's, so the official
SDK's ``files`` and ``batches`` calls work unchanged.

How a batch runs: the store owns one background thread with its own event loop (started with the
first batch, gone when no batch runs), because a batch outlives the request that created it and
the in-process app may be driven from event loops that close. Each line goes through the same
validation as ``POST /v1/completions`` (`CompletionsServer.accept`, or `accept_chat` for chat
lines) and the same scheduler, so
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

import logging
import os
from collections.abc import AsyncIterator
from typing import Any, BinaryIO

import anyio
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from .._request import shown
from ._app import CompletionsServer
from ._http import Failure, JSONResponse

__all__ = [
    "BATCH_ENDPOINTS",
    "BatchLimits",
    "BatchStore",
    "batch_routes",
]

from ._batch_store import (
    BATCH_ENDPOINTS,
    COMPLETION_WINDOWS,
    MAX_BATCHES_LIMIT,
    MAX_FILES_LIMIT,
    MAX_METADATA_PAIRS,
    BatchLimits,
    BatchStore,
)
from ._uploads import multipart_boundary, receive_upload

logger = logging.getLogger("nbcompletions.server")
_CHUNK_BYTES = 256 * 1024


class _Routes:
    def __init__(self, server: CompletionsServer, store: BatchStore) -> None:
        self.server = server
        self.store = store

    async def upload(self, request: Request, request_id: str) -> Response:
        store = self.store
        boundary = multipart_boundary(request.headers.get("content-type"))
        store.check_room()
        upload = await receive_upload(
            request,
            boundary,
            store,
            max_file_bytes=store.limits.max_file_bytes,
            max_requests=store.limits.max_file_requests,
            max_line_bytes=self.server.max_body_bytes,
            # The documented body timeout, as for every body (it was 30 s + 1 s per MB allowed).
            timeout_s=self.server.body_timeout_s,
        )
        record = store.commit_upload(upload.filename, upload.path, upload.size, upload.reserved)
        return JSONResponse(record.card())

    async def file(self, request: Request, request_id: str) -> Response:
        return JSONResponse(self.store.file(request.path_params["file_id"]).card())

    async def delete_file(self, request: Request, request_id: str) -> Response:
        record = self.store.delete_file(request.path_params["file_id"])
        return JSONResponse({"id": record.id, "object": "file", "deleted": True})

    async def files(self, request: Request, request_id: str) -> Response:
        params = request.query_params
        limit = _page_limit(params.get("limit"), default=MAX_FILES_LIMIT, most=MAX_FILES_LIMIT)
        order = params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise Failure(
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
        body = await self.server.read_json(request)
        if not isinstance(body, dict):
            raise Failure(400, "The request body must be a JSON object.")
        accepted = ("input_file_id", "endpoint", "completion_window", "metadata")
        unknown = [key for key in body if key not in accepted]
        if unknown:
            raise Failure(
                400,
                f"Unrecognized request argument supplied: {shown(unknown[0], 60)}. The fields "
                f"are: {', '.join(accepted)}.",
                param=unknown[0][:100],
            )
        input_file_id = body.get("input_file_id")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise Failure(
                400,
                f"input_file_id must be the id of an uploaded file; got "
                f"{shown(input_file_id, 60)}.",
                param="input_file_id",
            )
        endpoint = body.get("endpoint")
        if endpoint not in BATCH_ENDPOINTS:
            raise Failure(
                400,
                f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)} on this server; got "
                f"{shown(endpoint, 60)}.",
                param="endpoint",
            )
        window = body.get("completion_window")
        if window not in COMPLETION_WINDOWS:
            raise Failure(
                400,
                f"completion_window must be one of {', '.join(COMPLETION_WINDOWS)}; got "
                f"{shown(window, 40)}.",
                param="completion_window",
            )
        metadata = body.get("metadata")
        if metadata is not None and (
            not isinstance(metadata, dict)
            or len(metadata) > MAX_METADATA_PAIRS
            or not all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise Failure(
                400,
                f"metadata must be an object of at most {MAX_METADATA_PAIRS} string pairs "
                "(keys up to 64 characters, values up to 512).",
                param="metadata",
            )
        await self.server.engine()  # the model loads now, not inside the first line
        batch = self.store.create_batch(input_file_id, str(endpoint), str(window), metadata)
        return JSONResponse(batch.card())

    async def retrieve(self, request: Request, request_id: str) -> Response:
        return JSONResponse(self.store.batch(request.path_params["batch_id"]).card())

    async def cancel(self, request: Request, request_id: str) -> Response:
        return JSONResponse(self.store.cancel(request.path_params["batch_id"]).card())

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
        raise Failure(
            400,
            f"limit must be an integer from 1 to {most}; got {shown(given, 20)}.",
            param="limit",
        )
    return int(given)


def _list_page(data: list[dict[str, Any]], has_more: bool) -> Response:
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


def batch_routes(server: CompletionsServer, store: BatchStore) -> list[Route]:
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
