"""The OpenAI-compatible Completions app: Starlette routes over the embedded engine.

Requests are validated by the same `CompletionRequest` code the client uses, so both sides agree
on every range. Routes hand every completion to the scheduler (`._scheduler`: continuous batching,
the work budget, cancellation when the client leaves) and never call the engine themselves, so a
long completion never blocks other requests. The same app runs in-process behind
``httpx.ASGITransport`` (possibly from several event loops over its lifetime) and under uvicorn for
``nbcompletions serve``; nothing here is bound to one loop.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol

import anyio
import anyio.to_thread
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .._errors import RequestError
from .._parse import NEG_INF_LOGPROB
from .._request import (
    DEFAULT_MAX_TOKENS,
    FIELDS,
    CompletionRequest,
    Limits,
    chat_field_hint,
    shown,
)
from ._scheduler import CompletionStream, Overloaded, Scheduler, WorkBudget, scheduler_for

__all__ = [
    "COMPAT_MODES",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "Engine",
    "render_json",
]

logger = logging.getLogger("nbcompletions.server")

DEFAULT_MAX_BODY_BYTES = 1_000_000
#: Seconds a client has to send its whole request body (a body that trickles in ties up a
#: connection and a buffer for as long as the client likes).
DEFAULT_BODY_TIMEOUT_S = 30.0
#: ``openai``: OpenAI's limits, unknown fields refused. ``vllm``: vLLM's limits (20 logprobs, no
#: stop cap) and its extra sampling fields top_k, min_p, repetition_penalty.
COMPAT_MODES = ("openai", "vllm")
#: An error message longer than this is shortened (head and tail kept): a message may quote what
#: the client sent, and must not send a huge body back.
_MAX_MESSAGE_CHARS = 2_000
_OWNED_BY = "nbcompletions"
_FLOAT_MAX = sys.float_info.max
#: The deepest a field nests: prompt as a list of token-id lists.
_MAX_NESTING = 2


class Engine(Protocol):
    """What the server needs from a model engine (`nbcompletions.model.Engine` provides it)."""

    @property
    def model_id(self) -> str: ...

    def complete(self, request: CompletionRequest) -> dict[str, Any]: ...

    def stream(self, request: CompletionRequest) -> Iterator[dict[str, Any]]: ...


class _Failure(Exception):
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


def _request_error(exc: RequestError) -> _Failure:
    return _Failure(400, exc.message, param=exc.param)


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


class _JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return render_json(content)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


# -- streaming ----------------------------------------------------------------------------------
class _EventStream(Response):
    """Server-sent events for one stream: ``data: {json}`` per chunk, then ``data: [DONE]``.

    The scheduler delivers the chunks; the stream is closed in every case (done, error, client
    gone), which stops its work within one decode step; an error after the first chunk becomes an
    error event, since the 200 status is already sent.
    """

    media_type = "text/event-stream"

    def __init__(self, stream: CompletionStream, request_id: str) -> None:
        self._stream = stream
        self._request_id = request_id
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
                await self._send_error(send, _request_error(exc))
                break
            except Exception:
                logger.exception("the engine failed mid-stream (request %s)", self._request_id)
                await self._send_error(send, _server_error(self._request_id))
                break
            if chunk is None:
                break
            try:
                data = b"data: " + render_json(chunk) + b"\n\n"
            except Exception:
                logger.exception("could not render a stream chunk (request %s)", self._request_id)
                await self._send_error(send, _server_error(self._request_id))
                break
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    @staticmethod
    def _error_event(failure: _Failure) -> bytes:
        return b"data: " + render_json(failure.body()) + b"\n\n"

    async def _send_error(self, send: Send, failure: _Failure) -> None:
        await send(
            {"type": "http.response.body", "body": self._error_event(failure), "more_body": True}
        )

    async def _close(self) -> None:
        try:
            await self._stream.aclose()
        except Exception:
            logger.exception("closing the engine stream failed (request %s)", self._request_id)


def _server_error(request_id: str) -> _Failure:
    return _Failure(
        500,
        f"The server had an error while processing your request (request id "
        f"{request_id}); the server log has the details.",
        type="server_error",
    )


# -- the app ------------------------------------------------------------------------------------
Handler = Callable[[Request, str], Awaitable[Response]]


class _CompletionsServer:
    """State and handlers behind one app. Holds the API key: its repr never shows it."""

    def __init__(
        self,
        engine: Engine | None,
        *,
        api_key: str | None,
        max_tokens_cap: int | None,
        max_body_bytes: int,
        limits: Limits,
        max_concurrency: int,
        budget: WorkBudget,
        body_timeout_s: float,
    ) -> None:
        self._engine = engine
        self._api_key = api_key.encode("utf-8") if api_key is not None else None
        self.max_tokens_cap = max_tokens_cap
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.max_concurrency = max_concurrency
        self.budget = budget
        self.body_timeout_s = body_timeout_s
        self._load_lock = threading.Lock()
        self._scheduler: Scheduler | None = None
        self._started = int(time.time())

    def __repr__(self) -> str:
        key = "set" if self._api_key else "none"
        return (
            f"<nbcompletions server: engine_loaded={self._engine is not None}, api_key={key}, "
            f"max_tokens_cap={self.max_tokens_cap}>"
        )

    # -- engine ----------------------------------------------------------------------------------
    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    def _load(self) -> Engine:
        with self._load_lock:
            if self._engine is None:
                from ..model import load_engine  # weights load on first use, never at import

                started = time.perf_counter()
                self._engine = load_engine()
                logger.info(
                    "loaded model %s in %.2f s",
                    self._engine.model_id,
                    time.perf_counter() - started,
                )
            return self._engine

    async def engine(self) -> Engine:
        if self._engine is not None:
            return self._engine
        try:
            return await anyio.to_thread.run_sync(self._load)
        except Exception as exc:
            logger.exception("loading the model failed")
            raise _Failure(
                500,
                f"The model could not be loaded ({type(exc).__name__}: {exc}).",
                type="server_error",
            ) from exc

    def load_engine_now(self) -> Engine:
        """Load the engine in this thread (``serve`` does it before accepting connections)."""
        return self._load()

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler that runs every completion (None until the engine is loaded)."""
        return self._scheduler

    def _scheduler_for(self, engine: Engine) -> Scheduler:
        with self._load_lock:
            if self._scheduler is None:
                self._scheduler = scheduler_for(engine, self.budget, self.max_concurrency)
            return self._scheduler

    # -- request plumbing ------------------------------------------------------------------------
    def authorize(self, request: Request) -> None:
        if self._api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        challenge = {"www-authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not token.strip():
            raise _Failure(
                401,
                "You didn't provide an API key. Send it as a bearer token: "
                "'Authorization: Bearer YOUR_KEY'.",
                code="invalid_api_key",
                headers=challenge,
            )
        if not hmac.compare_digest(token.strip().encode("utf-8"), self._api_key):
            raise _Failure(
                401, "Incorrect API key provided.", code="invalid_api_key", headers=challenge
            )

    def _too_large(self, size: int | None) -> _Failure:
        given = f"{size} bytes" if size is not None else "more"
        return _Failure(
            413,
            f"The request body must be at most {self.max_body_bytes} bytes; got {given}.",
            code="request_too_large",
        )

    @staticmethod
    def _require_json_content_type(request: Request) -> None:
        # A browser sends text/plain, form or multipart bodies (or none) cross-origin without a
        # CORS preflight; a JSON content type forces the preflight, which this server never grants.
        given = request.headers.get("content-type")
        media = (given or "").split(";", 1)[0].strip().lower()
        if media != "application/json" and not (
            media.startswith("application/") and media.endswith("+json")
        ):
            raise _Failure(
                415,
                "The request body must be JSON sent with 'Content-Type: application/json'; got "
                + (f"Content-Type {shown(given, 80)}" if given is not None else "no Content-Type"),
                code="unsupported_media_type",
            )

    async def _read_json(self, request: Request) -> Any:
        self._require_json_content_type(request)
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                raise _Failure(400, f"Invalid Content-Length header: {declared[:40]!r}") from None
            if size > self.max_body_bytes:
                raise self._too_large(size)
        parts: list[bytes] = []
        received = 0
        try:
            with anyio.fail_after(self.body_timeout_s):
                async for part in request.stream():
                    received += len(part)
                    if received > self.max_body_bytes:
                        raise self._too_large(None)
                    parts.append(part)
        except TimeoutError:
            raise _Failure(
                408,
                f"The request body did not arrive within {self.body_timeout_s:g} seconds "
                f"({received} bytes received).",
                code="request_timeout",
                # The rest of the body may still come; the connection cannot be reused.
                headers={"connection": "close"},
            ) from None
        raw = b"".join(parts)
        try:
            return json.loads(raw, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise _Failure(
                400,
                f"We could not parse the JSON body of your request ({exc}). The "
                'API expects a JSON object such as {"model": "...", "prompt": "..."}.',
            ) from None

    def _check_model(self, engine: Engine, model: str | None) -> None:
        if model != engine.model_id:
            raise _Failure(
                404,
                f"The model {shown(model, 120)} does not exist; this server serves "
                f"`{engine.model_id}` (see GET /v1/models).",
                param="model",
                code="model_not_found",
            )

    def _apply_cap(self, request: CompletionRequest) -> CompletionRequest:
        cap = self.max_tokens_cap
        if cap is None:
            return request
        if request.max_tokens is None:
            return request if cap >= DEFAULT_MAX_TOKENS else request.replace(max_tokens=cap)
        if request.max_tokens > cap:
            raise _Failure(
                400,
                f"max_tokens must be an integer from 0 to {cap} on this server; "
                f"got {request.max_tokens}",
                param="max_tokens",
            )
        return request

    def _model_card(self, engine: Engine) -> dict[str, Any]:
        created = getattr(engine, "created", None)
        card: dict[str, Any] = {
            "id": engine.model_id,
            "object": "model",
            "created": int(created) if isinstance(created, int | float) else self._started,
            "owned_by": _OWNED_BY,
        }
        # vLLM's name for the context length, and the vocabulary size: the conformance check reads
        # them (frames need the vocabulary size for their entropy bounds).
        for name, attribute in (("max_model_len", "context_length"), ("vocab_size", "vocab_size")):
            value = getattr(engine, attribute, None)
            if isinstance(value, int):
                card[name] = value
        return card

    # -- endpoints -------------------------------------------------------------------------------
    def endpoint(
        self, handler: Handler, *, auth: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a handler: request id, bearer check, and every failure as an OpenAI error body."""

        async def run(request: Request) -> Response:
            request_id = f"req_{uuid.uuid4().hex}"
            try:
                if auth:
                    self.authorize(request)
                response = await handler(request, request_id)
            except _Failure as failure:
                response = _JSON(
                    failure.body(), status_code=failure.status, headers=failure.headers
                )
            except RequestError as exc:
                response = _JSON(_request_error(exc).body(), status_code=400)
            except ClientDisconnect:
                return Response(status_code=499)  # nobody is listening; uvicorn drops it
            except Exception:
                # Logged with the method and path only: headers (the key) and bodies stay out.
                logger.exception(
                    "unexpected error in %s %s (request %s)",
                    request.method,
                    request.url.path,
                    request_id,
                )
                response = _JSON(_server_error(request_id).body(), status_code=500)
            response.headers.setdefault("x-request-id", request_id)
            return response

        return run

    async def completions(self, request: Request, request_id: str) -> Response:
        body = await self._read_json(request)
        completion, scheduler = await self.accept(body)
        try:
            if completion.stream:
                return _EventStream(await scheduler.stream(completion), request_id)
            result = await scheduler.complete(completion, disconnected=_disconnected(request))
        except Overloaded as exc:
            raise _Failure(
                503,
                exc.message,
                type="server_error",
                code="server_overloaded",
                headers={"retry-after": str(exc.retry_after)},
            ) from None
        if result is None:
            raise ClientDisconnect()  # the client left; its work stopped
        return _JSON(result)

    async def accept(self, body: Any) -> tuple[CompletionRequest, Scheduler]:
        """Validate a completion body as ``POST /v1/completions`` does (the Batch API's lines
        too): the request and the scheduler to run it, or `_Failure`/`RequestError`."""
        if not isinstance(body, dict):
            raise _Failure(
                400, f"The request body must be a JSON object; got a JSON {_json_kind(body)}."
            )
        accepted = (*FIELDS, *sorted(self.limits.samplers))
        unknown = [key for key in body if key not in accepted]
        if unknown:
            name = unknown[0] if len(unknown[0]) <= 100 else unknown[0][:100] + "..."
            chat = chat_field_hint(name)
            raise _Failure(
                400,
                f"Unrecognized request argument supplied: {name}. "
                + (f"{chat[0].upper()}{chat[1:]}. " if chat else "")
                + f"The fields are: {', '.join(accepted)}.",
                param=name,
            )
        _refuse_odd_values(body)
        completion = CompletionRequest.from_body(body, limits=self.limits, require_model=True)
        engine = await self.engine()
        self._check_model(engine, completion.model)
        completion = _greedy_when_tiny(self._apply_cap(completion))
        return completion, self._scheduler_for(engine)

    async def models(self, request: Request, request_id: str) -> Response:
        engine = await self.engine()
        return _JSON({"object": "list", "data": [self._model_card(engine)]})

    async def model(self, request: Request, request_id: str) -> Response:
        engine = await self.engine()
        model_id = request.path_params["model_id"]
        self._check_model(engine, model_id)
        return _JSON(self._model_card(engine))

    async def health(self, request: Request, request_id: str) -> Response:
        return _JSON({"status": "ok", "engine_loaded": self.engine_loaded})


def _refuse_odd_values(body: dict[str, Any]) -> None:
    """400 for a field nested deeper than any field may be, or holding an integer too large for
    a float: the range checks recurse and compare as floats, so a prompt nested 985 lists deep
    (in a batch line, whose JSON had parsed) and a 400-digit integer each answered 500."""
    for field, value in body.items():
        pending = [(value, 0)]  # (value, how many lists and objects hold it)
        while pending:
            item, depth = pending.pop()
            if isinstance(item, list | dict):
                if depth >= _MAX_NESTING:
                    raise _Failure(
                        400,
                        f"{field} is nested more than {_MAX_NESTING} levels deep (lists or "
                        "objects within each other); the deepest field, prompt, is a list of "
                        "token-id lists.",
                        param=field,
                    )
                pending.extend(
                    (x, depth + 1) for x in (item.values() if isinstance(item, dict) else item)
                )
            elif isinstance(item, int) and not isinstance(item, bool) and abs(item) > _FLOAT_MAX:
                raise _Failure(
                    400,
                    f"{field} is out of range: it holds an integer of {item.bit_length()} bits, "
                    "larger than any number a field allows.",
                    param=field,
                )


def _greedy_when_tiny(completion: CompletionRequest) -> CompletionRequest:
    """A temperature too small to divide logits by (below ``GREEDY_BELOW``, 1e-100) is 0: the
    engine's compiled sampler divides by it (2e-308 overflowed to the vocabulary's last token)."""
    from ..model._sampling import GREEDY_BELOW  # the model's own bound; numpy loads on first use

    temperature = completion.temperature
    if temperature is not None and 0 < temperature < GREEDY_BELOW:
        return completion.replace(temperature=0.0)
    return completion


def _disconnected(request: Request) -> Callable[[], Awaitable[None]]:
    """A coroutine function that returns once the client of ``request`` (body read) has gone."""

    async def wait() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    return wait


def _json_kind(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Unknown routes (404) and wrong methods (405) answer with OpenAI error bodies too.

    Under /v1 a keyed server checks the key first, as OpenAI does: without it, nothing is said
    about which routes exist.
    """
    assert isinstance(exc, HTTPException)
    server = getattr(request.app.state, "nbcompletions", None)
    if isinstance(server, _CompletionsServer) and request.url.path.startswith("/v1/"):
        try:
            server.authorize(request)
        except _Failure as refused:
            return _JSON(refused.body(), status_code=refused.status, headers=refused.headers)
    if exc.status_code == 404:
        message = f"Unknown request URL: {request.method} {request.url.path}."
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed for {request.url.path}."
    else:
        message = str(exc.detail)
    failure = _Failure(exc.status_code, message, headers=exc.headers)
    return _JSON(failure.body(), status_code=exc.status_code, headers=failure.headers)
