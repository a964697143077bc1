"""HTTP plumbing of the server's routes: OpenAI error bodies, JSON in and out, server-sent events
and the bearer-key check. The routes (`._app`, `._batches`) build on these; nothing here knows
about completions or batches.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._errors import RequestError
from .._parse import NEG_INF_LOGPROB
from .._request import shown
from ._scheduler import CompletionStream

__all__ = [
    "BearerAuth",
    "EventStream",
    "Failure",
    "JSONResponse",
    "disconnected",
    "http_error",
    "json_kind",
    "read_json_body",
    "render_json",
    "request_error",
    "require_json_content_type",
    "server_error",
]

logger = logging.getLogger("nbcompletions.server")

#: An error message longer than this is shortened (head and tail kept): a message may quote what
#: the client sent, and must not send a huge body back.
_MAX_MESSAGE_CHARS = 2_000


class Failure(Exception):
    """An error the client gets as an OpenAI error body with this status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        if len(message) > _MAX_MESSAGE_CHARS:
            message = f"{message[:1500]} ... {message[-300:]}"
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


def request_error(exc: RequestError) -> Failure:
    return Failure(400, exc.message, param=exc.param)


# -- JSON that is always valid JSON -------------------------------------------------------------
def _finite(value: Any) -> Any:
    """A copy with non-finite floats replaced: -inf -> -9999.0 (as vLLM does), +inf -> 9999.0,
    NaN -> null."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return NEG_INF_LOGPROB if value < 0 else -NEG_INF_LOGPROB
        return value
    if isinstance(value, Mapping):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    if hasattr(value, "item") and callable(value.item):  # numpy scalars from the engine
        return _finite(value.item())
    return value


def _numpy_default(value: Any) -> Any:
    if hasattr(value, "tolist") and callable(value.tolist):
        return value.tolist()
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def render_json(obj: Any) -> bytes:
    """Compact JSON, never ``NaN``/``Infinity``: a non-finite float is clamped rather than sent."""
    try:
        text = json.dumps(obj, allow_nan=False, separators=(",", ":"), default=_numpy_default)
    except ValueError:
        logger.warning(
            "a response held non-finite numbers; sent them clamped (-inf -> %s)", NEG_INF_LOGPROB
        )
        text = json.dumps(
            _finite(obj), allow_nan=False, separators=(",", ":"), default=_numpy_default
        )
    return text.encode("ascii")


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return render_json(content)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# -- streaming ----------------------------------------------------------------------------------
class EventStream(Response):
    """Server-sent events for one stream: ``data: {json}`` per chunk, then ``data: [DONE]``.

    The scheduler delivers the chunks; the stream is closed in every case (done, error, client
    gone), which stops its work within one decode step; an error after the first chunk becomes an
    error event, since the 200 status is already sent.
    """

    media_type = "text/event-stream"

    def __init__(
        self, stream: CompletionStream, request_id: str, *, named_events: bool = False
    ) -> None:
        self._stream = stream
        self._request_id = request_id
        #: The Responses API's framing: ``event: {type}`` before each ``data:``, and no
        #: ``[DONE]`` at the end (its last event says it is done).
        self._named_events = named_events
        self.status_code = 200
        self.background = None
        self.init_headers(
            {"cache-control": "no-cache", "x-accel-buffering": "no", "x-request-id": request_id}
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._cancel_on_disconnect, receive, group.cancel_scope)
                try:
                    await send(
                        {
                            "type": "http.response.start",
                            "status": self.status_code,
                            "headers": self.raw_headers,
                        }
                    )
                    await self._pump(send)
                except OSError:
                    pass  # the client went away mid-stream: nobody is left to tell
                group.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self._close()

    @staticmethod
    async def _cancel_on_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _pump(self, send: Send) -> None:
        while True:
            try:
                chunk = await self._stream.next()
            except RequestError as exc:
                await self._send_error(send, request_error(exc))
                break
            except Exception:
                logger.exception("the engine failed mid-stream (request %s)", self._request_id)
                await self._send_error(send, server_error(self._request_id))
                break
            if chunk is None:
                break
            try:
                data = b"data: " + render_json(chunk) + b"\n\n"
                if self._named_events:
                    data = b"event: " + str(chunk.get("type")).encode() + b"\n" + data
            except Exception:
                logger.exception("could not render a stream chunk (request %s)", self._request_id)
                await self._send_error(send, server_error(self._request_id))
                break
            await send({"type": "http.response.body", "body": data, "more_body": True})
        done = b"" if self._named_events else b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": done, "more_body": False})

    @staticmethod
    def _error_event(failure: Failure) -> bytes:
        return b"data: " + render_json(failure.body()) + b"\n\n"

    async def _send_error(self, send: Send, failure: Failure) -> None:
        await send(
            {"type": "http.response.body", "body": self._error_event(failure), "more_body": True}
        )

    async def _close(self) -> None:
        try:
            await self._stream.aclose()
        except Exception:
            logger.exception("closing the engine stream failed (request %s)", self._request_id)


def server_error(request_id: str) -> Failure:
    return Failure(
        500,
        f"The server had an error while processing your request (request id "
        f"{request_id}); the server log has the details.",
        type="server_error",
    )


class BearerAuth:
    """The bearer-key check of every ``/v1`` route. Holds the key: its repr never shows it."""

    def __init__(self, api_key: str | None) -> None:
        self._api_key = api_key.encode("utf-8") if api_key is not None else None

    def __repr__(self) -> str:
        return f"<BearerAuth: key {'set' if self._api_key else 'none'}>"

    @property
    def required(self) -> bool:
        return self._api_key is not None

    def check(self, request: Request) -> None:
        """`Failure` 401 unless the request carries the key (or none is set)."""
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        challenge = {"www-authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token.strip():
            raise Failure(
                401,
                "You didn't provide an API key. Send it as a bearer token: "
                "'Authorization: Bearer YOUR_KEY'.",
                code="invalid_api_key",
                headers=challenge,
            )
        if not hmac.compare_digest(token.strip().encode("utf-8"), self._api_key):
            raise Failure(
                401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge
            )


# -- JSON request bodies ------------------------------------------------------------------------
def _too_large(max_bytes: int, size: int | None) -> Failure:
    given = f"{size} bytes" if size is not None else "more"
    return Failure(
        413,
        f"The request body must be at most {max_bytes} bytes; got {given}.",
        code="request_too_large",
    )


def require_json_content_type(request: Request) -> None:
    """415 unless the body is declared JSON.

    A browser sends text/plain, form or multipart bodies (or none) cross-origin without a CORS
    preflight; a JSON content type forces the preflight, which this server never grants.
    """
    given = request.headers.get("content-type")
    media = (given or "").split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        raise Failure(
            415,
            "The request body must be JSON sent with 'Content-Type: application/json'; got "
            + (f"Content-Type {shown(given, 80)}" if given is not None else "no Content-Type"),
            code="unsupported_media_type",
        )


async def _read_body(request: Request, max_bytes: int, timeout_s: float) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise Failure(400, f"Invalid Content-Length header: {declared[:40]!r}") from None
        if size > max_bytes:
            raise _too_large(max_bytes, size)
    parts: list[bytes] = []
    received = 0
    try:
        with anyio.fail_after(timeout_s):
            async for part in request.stream():
                received += len(part)
                if received > max_bytes:
                    raise _too_large(max_bytes, None)
                parts.append(part)
    except TimeoutError:
        raise Failure(
            408,
            f"The request body did not arrive within {timeout_s:g} seconds "
            f"({received} bytes received).",
            code="request_timeout",
            # The rest of the body may still come; the connection cannot be reused.
            headers={"connection": "close"},
        ) from None
    return b"".join(parts)


async def read_json_body(request: Request, max_bytes: int, timeout_s: float) -> Any:
    """The parsed JSON body: 415 unless declared JSON, 413 past ``max_bytes``, 408 past
    ``timeout_s``, 400 unless JSON (``NaN`` and ``Infinity`` are not)."""
    require_json_content_type(request)
    raw = await _read_body(request, max_bytes, timeout_s)
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise Failure(
            400,
            f"We could not parse the JSON body of your request ({exc}). The "
            'API expects a JSON object such as {"model": "...", "prompt": "..."}.',
        ) from None


# -- helpers of the routes ----------------------------------------------------------------------
def disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once the client of ``request`` (body read) has gone."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


def json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


async def http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes (404) and wrong methods (405) answer with OpenAI error bodies too.

    Under /v1 a keyed server checks the key first, as OpenAI does: without it, nothing is said
    about which routes exist.
    """
    assert isinstance(exc, HTTPException)
    auth = getattr(request.app.state, "nbcompletions_auth", None)
    if isinstance(auth, BearerAuth) and request.url.path.startswith("/v1/"):
        try:
            auth.check(request)
        except Failure as refused:
            return JSONResponse(refused.body(), status_code=refused.status, headers=refused.headers)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = str(exc.detail)
    failure = Failure(exc.status_code, message, headers=exc.headers)
    return JSONResponse(failure.body(), status_code=exc.status_code, headers=failure.headers)
