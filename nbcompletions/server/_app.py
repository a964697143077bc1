"""The OpenAI-compatible Completions app: Starlette routes over the embedded engine.

Requests are validated by the same `CompletionRequest` code the client uses, so both sides agree
on every range. Routes hand every completion to the scheduler (`._scheduler`: continuous batching,
the work budget, cancellation when the client leaves) and never call the engine themselves, so a
long completion never blocks other requests. The same app runs in-process behind
``httpx.ASGITransport`` (possibly from several event loops over its lifetime) and under uvicorn for
``nbcompletions serve``; nothing here is bound to one loop.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, Protocol, TypeVar

import anyio
import anyio.to_thread
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from .._errors import RequestError
from .._request import (
    DEFAULT_MAX_TOKENS,
    FIELDS,
    CompletionRequest,
    Limits,
    chat_field_hint,
    shown,
)
from ._chat import (
    CHAT_FIELDS,
    ChatCall,
    ChatStream,
    TokenBytes,
    chat_call,
    chat_response,
    small_chat,
    token_bytes_of,
)
from ._http import (
    BearerAuth,
    EventStream,
    Failure,
    JSONResponse,
    disconnected,
    json_kind,
    read_json_body,
    request_error,
    server_error,
)
from ._responses import RESPONSES_FIELDS, ResponseEvents, chat_body, response_object
from ._scheduler import Overloaded, Scheduler, WorkBudget, scheduler_for
from ._tokenize import (
    DETOKENIZE_FIELDS,
    RENDER_FIELDS,
    TOKENIZE_FIELDS,
    detokenize,
    needs_tokenizer,
    render,
    tokenize,
)

__all__ = [
    "COMPAT_MODES",
    "DEFAULT_BODY_TIMEOUT_S",
    "DEFAULT_MAX_BODY_BYTES",
    "CompletionEngine",
    "CompletionsServer",
]

logger = logging.getLogger("nbcompletions.server")
_Answer = TypeVar("_Answer")

DEFAULT_MAX_BODY_BYTES = 1_000_000
#: Seconds a client has to send its whole request body (a body that trickles in ties up a
#: connection and a buffer for as long as the client likes).
DEFAULT_BODY_TIMEOUT_S = 30.0
#: ``openai``: OpenAI's limits, unknown fields refused. ``vllm``: vLLM's limits (20 logprobs, no
#: stop cap) and its extra sampling fields top_k, min_p, repetition_penalty.
COMPAT_MODES = ("openai", "vllm")
_OWNED_BY = "nbcompletions"
#: vLLM's request fields served under ``compat="vllm"`` besides its samplers.
VLLM_FIELDS = ("prompt_logprobs",)
#: The deepest a field nests: prompt as a list of token-id lists.
_MAX_NESTING = 2
#: messages: a list of messages, each with a list of content parts (objects).
_MAX_MESSAGE_NESTING = 4


def _utf8_token_bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="surrogatepass"))


async def _overload_is_503(work: Awaitable[_Answer]) -> _Answer:
    """``await work``, with the scheduler's `Overloaded` as a 503 with Retry-After."""
    try:
        return await work
    except Overloaded as exc:
        raise Failure(
            503,
            exc.message,
            type="server_error",
            code="server_overloaded",
            headers={"retry-after": str(exc.retry_after)},
        ) from None


class CompletionEngine(Protocol):
    """What the server needs from a model engine to answer completions
    (`nbcompletions.model.Engine` provides it; a stand-in needs only these)."""

    @property
    def model_id(self) -> str: ...

    def complete(self, request: CompletionRequest) -> dict[str, Any]: ...

    def stream(self, request: CompletionRequest) -> Iterator[dict[str, Any]]: ...


# -- the app ------------------------------------------------------------------------------------
Handler = Callable[[Request, str], Awaitable[Response]]


class CompletionsServer:
    """State and handlers behind one app. Holds the API key: its repr never shows it."""

    def __init__(
        self,
        engine: CompletionEngine | None,
        *,
        api_key: str | None,
        max_tokens_cap: int | None,
        max_body_bytes: int,
        limits: Limits,
        max_concurrency: int,
        budget: WorkBudget,
        body_timeout_s: float,
        compat: str = "openai",
    ) -> None:
        self._engine = engine
        self.compat = compat
        #: Fields beyond OpenAI's that requests may carry: vLLM's samplers and prompt_logprobs.
        self.extra_fields = (*sorted(limits.samplers), *(VLLM_FIELDS if compat == "vllm" else ()))
        self.auth = BearerAuth(api_key)
        self.max_tokens_cap = max_tokens_cap
        self.max_body_bytes = max_body_bytes
        self.limits = limits
        self.max_concurrency = max_concurrency
        self.budget = budget
        self.body_timeout_s = body_timeout_s
        self._load_lock = threading.Lock()
        self._scheduler: Scheduler | None = None
        self._started = int(time.time())
        #: A token string's bytes, for Chat's logprobs (the engine's vocabulary once loaded).
        self.token_bytes: TokenBytes = _utf8_token_bytes

    def __repr__(self) -> str:
        key = "set" if self.auth.required else "none"
        return (
            f"<nbcompletions server: engine_loaded={self._engine is not None}, api_key={key}, "
            f"max_tokens_cap={self.max_tokens_cap}>"
        )

    # -- engine ----------------------------------------------------------------------------------
    @property
    def engine_loaded(self) -> bool:
        return self._engine is not None

    def _load(self) -> CompletionEngine:
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

    async def engine(self) -> CompletionEngine:
        if self._engine is not None:
            return self._engine
        try:
            return await anyio.to_thread.run_sync(self._load)
        except Exception as exc:
            logger.exception("loading the model failed")
            raise Failure(
                500,
                f"The model could not be loaded ({type(exc).__name__}: {exc}).",
                type="server_error",
            ) from exc

    def load_engine_now(self) -> CompletionEngine:
        """Load the engine in this thread (``serve`` does it before accepting connections)."""
        return self._load()

    @property
    def scheduler(self) -> Scheduler | None:
        """The scheduler that runs every completion (None until the engine is loaded)."""
        return self._scheduler

    def _scheduler_for(self, engine: CompletionEngine) -> Scheduler:
        with self._load_lock:
            if self._scheduler is None:
                self._scheduler = scheduler_for(engine, self.budget, self.max_concurrency)
            return self._scheduler

    # -- request plumbing ------------------------------------------------------------------------
    async def read_json(self, request: Request) -> Any:
        """The request's JSON body, held to this server's size limit and body timeout."""
        return await read_json_body(request, self.max_body_bytes, self.body_timeout_s)

    def _check_model(self, engine: CompletionEngine, model: str | None) -> None:
        if model != engine.model_id:
            raise Failure(
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
            raise Failure(
                400,
                f"max_tokens must be an integer from 0 to {cap} on this server; "
                f"got {request.max_tokens}",
                param="max_tokens",
            )
        return request

    def _model_card(self, engine: CompletionEngine) -> dict[str, Any]:
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
                    self.auth.check(request)
                response = await handler(request, request_id)
            except Failure as failure:
                response = JSONResponse(
                    failure.body(), status_code=failure.status, headers=failure.headers
                )
            except RequestError as exc:
                response = JSONResponse(request_error(exc).body(), status_code=400)
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
                response = JSONResponse(server_error(request_id).body(), status_code=500)
            response.headers.setdefault("x-request-id", request_id)
            return response

        return run

    async def completions(self, request: Request, request_id: str) -> Response:
        body = await self.read_json(request)
        completion, scheduler = await self.accept(body)
        if completion.stream:
            return EventStream(await _overload_is_503(scheduler.stream(completion)), request_id)
        return JSONResponse(await self._complete(scheduler, completion, request))

    async def _complete(
        self, scheduler: Scheduler, completion: CompletionRequest, request: Request
    ) -> dict[str, Any]:
        result = await _overload_is_503(
            scheduler.complete(completion, disconnected=disconnected(request))
        )
        if result is None:
            raise ClientDisconnect()  # the client left; its work stopped
        return result

    async def chat_completions(self, request: Request, request_id: str) -> Response:
        body = await self.read_json(request)
        call, scheduler = await self.accept_chat(body)
        completion = call.completion
        if completion.stream:
            stream = await _overload_is_503(scheduler.stream(completion))
            return EventStream(ChatStream(stream, call, self.token_bytes), request_id)
        answer = await self._complete(scheduler, completion, request)
        return JSONResponse(chat_response(answer, call, self.token_bytes))

    async def responses(self, request: Request, request_id: str) -> Response:
        body = await self.read_json(request)
        self._refuse_unknown(body, RESPONSES_FIELDS)
        _refuse_deep_nesting(body, deeper={"input": _MAX_MESSAGE_NESTING})
        call, scheduler = await self.accept_chat(chat_body(body))
        if call.completion.stream:
            stream = await _overload_is_503(scheduler.stream(call.completion))
            events = ResponseEvents(stream, call, self.token_bytes, body)
            return EventStream(events, request_id, named_events=True)
        answer = await self._complete(scheduler, call.completion, request)
        return JSONResponse(response_object(answer, call, self.token_bytes, body))

    async def tokenize_text(self, request: Request, request_id: str) -> Response:
        body = await self.read_json(request)
        self._refuse_unknown(body, TOKENIZE_FIELDS)
        _refuse_deep_nesting(body, deeper={"messages": _MAX_MESSAGE_NESTING})
        engine = await self._tokenizer_engine(body)
        return JSONResponse(await anyio.to_thread.run_sync(tokenize, body, engine))

    async def detokenize_ids(self, request: Request, request_id: str) -> Response:
        body = await self.read_json(request)
        self._refuse_unknown(body, DETOKENIZE_FIELDS)
        _refuse_deep_nesting(body)
        engine = await self._tokenizer_engine(body)
        return JSONResponse(await anyio.to_thread.run_sync(detokenize, body, engine))

    async def render_chat_ids(self, request: Request, request_id: str) -> Response:
        body = await self.read_json(request)
        self._refuse_unknown(body, RENDER_FIELDS)
        _refuse_deep_nesting(body, deeper={"messages": _MAX_MESSAGE_NESTING})
        engine = await self._tokenizer_engine(body)
        answer = functools.partial(render, body, engine, request_id, engine.model_id)
        return JSONResponse(await anyio.to_thread.run_sync(answer))

    async def _tokenizer_engine(self, body: dict[str, Any]) -> CompletionEngine:
        engine = await self.engine()
        needs_tokenizer(engine)
        if body.get("model") is not None:
            self._check_model(engine, body["model"])
        return engine

    async def accept_chat(self, body: Any) -> tuple[ChatCall, Scheduler]:
        """Validate a chat body as ``POST /v1/chat/completions`` does (the Batch API's lines
        too): the completion that answers it and the scheduler to run it."""
        self._refuse_unknown(body, (*CHAT_FIELDS, *self.extra_fields))
        _refuse_deep_nesting(body, deeper={"messages": _MAX_MESSAGE_NESTING})
        engine = await self.engine()
        encode = getattr(engine, "encode", None)
        context_length = getattr(engine, "context_length", None)
        make_call = functools.partial(
            chat_call,
            body,
            limits=self.limits,
            extra_fields=self.extra_fields,
            encode=encode if callable(encode) else None,
            context_length=context_length if isinstance(context_length, int) else None,
            max_tokens_cap=self.max_tokens_cap,
        )
        # A few short turns on the loop (as a short prompt is planned there); in a worker thread
        # otherwise: rendering and tokenizing a megabyte of messages would stall the loop.
        call = make_call() if small_chat(body) else await anyio.to_thread.run_sync(make_call)
        self._check_model(engine, call.completion.model)
        given, cap = call.completion.max_tokens, self.max_tokens_cap
        if cap is not None and given is not None and given > cap:
            name = (
                "max_tokens"
                if body.get("max_completion_tokens") is None
                else "max_completion_tokens"
            )
            raise Failure(
                400,
                f"{name} must be an integer from 0 to {cap} on this server; got {given}",
                param=name,
            )
        if self.token_bytes is _utf8_token_bytes:
            self.token_bytes = token_bytes_of(getattr(engine, "vocab", None))
        return call, self._scheduler_for(engine)

    async def accept(self, body: Any) -> tuple[CompletionRequest, Scheduler]:
        """Validate a completion body as ``POST /v1/completions`` does (the Batch API's lines
        too): the request and the scheduler to run it, or `Failure`/`RequestError`."""
        self._refuse_unknown(body, (*FIELDS, *self.extra_fields), chat_hints=True)
        _refuse_deep_nesting(body)
        completion = CompletionRequest.from_body(body, limits=self.limits, require_model=True)
        engine = await self.engine()
        self._check_model(engine, completion.model)
        completion = self._apply_cap(completion)
        return completion, self._scheduler_for(engine)

    @staticmethod
    def _refuse_unknown(body: Any, accepted: tuple[str, ...], *, chat_hints: bool = False) -> None:
        """400 unless ``body`` is an object of ``accepted`` fields; ``chat_hints``: name the
        Completions field to use for a Chat field (``messages``, ``top_logprobs``...)."""
        if not isinstance(body, dict):
            raise Failure(
                400, f"The request body must be a JSON object; got a JSON {json_kind(body)}."
            )
        unknown = [key for key in body if key not in accepted]
        if unknown:
            name = unknown[0] if len(unknown[0]) <= 100 else unknown[0][:100] + "..."
            chat = chat_field_hint(name) if chat_hints else None
            raise Failure(
                400,
                f"Unrecognized request argument supplied: {name}. "
                + (f"{chat[0].upper()}{chat[1:]}. " if chat else "")
                + f"The fields are: {', '.join(accepted)}.",
                param=name,
            )

    async def models(self, request: Request, request_id: str) -> Response:
        engine = await self.engine()
        return JSONResponse({"object": "list", "data": [self._model_card(engine)]})

    async def model(self, request: Request, request_id: str) -> Response:
        engine = await self.engine()
        model_id = request.path_params["model_id"]
        self._check_model(engine, model_id)
        return JSONResponse(self._model_card(engine))

    async def health(self, request: Request, request_id: str) -> Response:
        return JSONResponse({"status": "ok", "engine_loaded": self.engine_loaded})


def _refuse_deep_nesting(body: dict[str, Any], deeper: Mapping[str, int] | None = None) -> None:
    """400 for a field nested deeper than any field may be: the value checks recurse, so a
    prompt nested 985 lists deep (in a batch line, whose JSON had parsed) answered 500.
    ``deeper``: fields allowed more levels (a chat's messages hold lists of content parts)."""
    for field, value in body.items():
        deepest = (deeper or {}).get(field, _MAX_NESTING)
        pending = [(value, 0)]  # (value, how many lists and objects hold it)
        while pending:
            item, depth = pending.pop()
            if isinstance(item, list | dict):
                if depth >= deepest:
                    raise Failure(
                        400,
                        f"{field} is nested more than {deepest} levels deep (lists or "
                        "objects within each other); the deepest fields are messages (a list "
                        "of messages whose content is a list of parts) and prompt (a list of "
                        "token-id lists).",
                        param=field,
                    )
                pending.extend(
                    (x, depth + 1) for x in (item.values() if isinstance(item, dict) else item)
                )
