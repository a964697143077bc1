"""`AsyncClient` and `Client`: ``POST /v1/completions`` to OpenAI, compatible servers, or our model.

The async client does the work; the sync `Client` wraps one and runs its coroutines on the
background loop of `nbcompletions._loop` (so a plain call works inside Jupyter). Requests are
validated (`CompletionRequest`) before any network I/O. Failures are retried like the official SDK
does (`nbcompletions._retry`); a per-client semaphore caps concurrent requests, and sweeps share it.
Which endpoint requests go to, and what an error says about it, is `nbcompletions._endpoint`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import json
import logging
import weakref
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from typing import TYPE_CHECKING, Any, TypeVar, cast

import httpx

from . import _retry
from ._chat import CHAT_FIELDS, ChatRequest, ResponsesRequest
from ._completion import Completion
from ._corrections import CardLimits
from ._endpoint import _Endpoint, env_key_hint
from ._errors import APIError, RequestError, answered_field
from ._loop import iter_sync, run_sync
from ._model_card import known_card, needs_limits, read_card, read_limits, remember_cards
from ._parse import loads, responses_as_chat
from ._profiles import ServerProfile
from ._request import (
    FIELDS,
    CompletionFields,
    CompletionRequest,
    Limits,
    Prompt,
    chat_field_hint,
    shown,
)
from ._secrets import redact_error, redact_url
from ._settings import (
    DEFAULT_TIMEOUT,
    _Settings,
    check_limits,
    check_model,
    check_retries,
    in_process_transport,
)
from ._streaming import AsyncStream, Stream, aiter_chunks

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from typing_extensions import Unpack  # typing has it from 3.11 only

    from ._chat import ChatFields, ResponsesFields
    from ._conformance import ConformanceReport
    from ._reply_scoring import ReplyScore

__all__ = ["AsyncClient", "AsyncResponseStream", "Client", "ResponseStream"]

T = TypeVar("T")
#: A request of any of the three APIs.
R = TypeVar("R", bound=CompletionRequest | ChatRequest | ResponsesRequest)

log = logging.getLogger("nbcompletions")

_REQUEST_FIELDS = (*(f for f in FIELDS if f != "prompt"), "extra")
_CHAT_REQUEST_FIELDS = (*(f for f in CHAT_FIELDS if f != "messages"), "extra")
_RESPONSES_REQUEST_FIELDS = (
    "model",
    "include",
    "instructions",
    "max_output_tokens",
    "temperature",
    "top_logprobs",
    "top_p",
    "user",
    "extra",
)

#: The path each kind of request is sent to, after the base URL.
_PATHS = {"completions": "/completions", "chat": "/chat/completions", "responses": "/responses"}


def _path(request: CompletionRequest | ChatRequest | ResponsesRequest) -> str:
    return _PATHS[getattr(request, "api", "completions")]


def _refused_logprobs(error: APIError, model: str | None) -> APIError:
    """A reasoning model's refusal of logprobs ("'logprobs' is not supported for this model")
    with a hint that names the model and says why; any other error as it is."""
    message = error.message.lower()
    if error.status == 400 and "logprobs" in message and "not supported" in message:
        error.hint = (
            f"the model {model!r} does not return token logprobs: OpenAI's reasoning models "
            "(o1, o3, o4-mini, gpt-5 and later) refuse logprobs and top_logprobs, because the "
            "visible answer follows hidden reasoning tokens whose probabilities are not "
            "shown; use a model that returns them (gpt-4.1, gpt-4o) or leave logprobs unset"
        )
    return error


class _Cookies(httpx.Cookies):
    """httpx's cookie jar, that reads a response only when it sets a cookie: httpx runs every
    response through urllib's cookie machinery, ~5% of a request's CPU, to find none."""

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


class _HTTP(httpx.AsyncClient):
    """An httpx client with the cookie jar above (httpx copies a jar it is given into a plain
    one)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._jar = _Cookies()

    @property
    def cookies(self) -> httpx.Cookies:
        return self._jar

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        self._jar = _Cookies(cookies)


class _LoopState:
    """What is bound to one event loop: the httpx client (its connection pool) and the
    concurrency semaphore."""

    __slots__ = ("_made", "http", "semaphore")

    def __init__(self, http: httpx.AsyncClient, semaphore: asyncio.Semaphore | None) -> None:
        self.http = http
        self.semaphore = semaphore
        # (url, *headers) -> what `build` reuses; bounded in case headers keep changing.
        self._made: dict[
            tuple[str, ...], tuple[httpx.URL, httpx.Headers, dict[str, float | None]]
        ] = {}

    def build(
        self, method: str, url: str, content: bytes | None, headers: dict[str, str]
    ) -> httpx.Request:
        """``http.build_request(method, url, content=content, headers=headers)``, the same
        request, with what depends only on the URL and headers (parsing the URL, merging the
        headers with httpx's defaults: a quarter of a request's CPU in httpx) made once."""
        http = self.http
        if http.cookies or http.params or str(http.base_url):
            # Cookies a server set (or anything else httpx would merge) go in as httpx adds them.
            return http.build_request(method, url, content=content, headers=headers)
        key = (url, *headers.keys(), *headers.values())
        made = self._made.get(key)
        if made is None:
            merged = httpx.Headers(http.headers)
            merged.update(headers)
            made = (httpx.URL(url), merged, http.timeout.as_dict())
            if len(self._made) < 256:
                self._made[key] = made
        target, merged, timeout = made
        return httpx.Request(
            method, target, content=content, headers=merged, extensions={"timeout": dict(timeout)}
        )

    async def aclose(self) -> None:
        await self.http.aclose()


class _NoLimit:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LIMIT = _NoLimit()


def _suggest(name: str, fields: Sequence[str] = _REQUEST_FIELDS) -> str:
    close = difflib.get_close_matches(name, fields, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _refuse_unknown(fields: Mapping[str, Any], known: Sequence[str], call: str) -> None:
    unknown = [name for name in fields if name not in known]
    if unknown:
        name = unknown[0]
        raise TypeError(
            f"unknown {call} field {name!r}{_suggest(name, known)}; valid fields are "
            f"{', '.join(known)}. Send server-specific fields with extra={{...}}."
        )


class _BaseClient:
    """What `Client` and `AsyncClient` share, as httpx's ``BaseClient``: the constructor, the
    settings and their views, and request building. The twins differ only in how they do I/O."""

    _settings: _Settings

    if TYPE_CHECKING:  # each twin defines it (an AsyncClient answers with itself)

        @property
        def async_client(self) -> AsyncClient: ...

    def __init__(
        self,
        base_url: str | Sequence[str] | None = None,
        api_key: str | None = None,
        *,
        model: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        transport: httpx.AsyncBaseTransport | None = None,
        max_concurrency: int | None = 16,
        limits: Limits | None = None,
        headers: Mapping[str, str] | None = None,
        vocab_size: int | None = None,
        profile: str | ServerProfile | None = None,
        embedded: bool | None = None,
        verify: bool | None = None,
    ) -> None:
        self._settings = _Settings(
            base_url,
            api_key,
            model=model,
            timeout=timeout,
            max_retries=max_retries,
            transport=transport,
            max_concurrency=max_concurrency,
            limits=limits,
            headers=headers,
            vocab_size=vocab_size,
            profile=profile,
            embedded=embedded,
            verify=verify,
        )
        self._start()

    def _start(self) -> None:
        """Set up the I/O side once ``_settings`` is in place."""

    # -- settings ---------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        """The base URL (the first one when there are replicas)."""
        return self._settings.target.endpoints[0].url

    @property
    def endpoints(self) -> list[str]:
        """Every base URL (replicas of one model)."""
        return [e.url for e in self._settings.target.endpoints]

    @property
    def embedded(self) -> bool:
        """True when this client talks to the in-process embedded model."""
        return self._settings.target.embedded

    @property
    def model(self) -> str | None:
        """The model requests name when they name none; None: ask the server (``GET /models``)."""
        return self._settings.model

    @model.setter
    def model(self, value: str | None) -> None:
        self._settings.model = check_model(value)

    @property
    def limits(self) -> Limits:
        """Server-specific caps requests are validated against."""
        return self._settings.limits

    @limits.setter
    def limits(self, value: Limits) -> None:
        self._settings.limits = check_limits(value)

    @property
    def max_retries(self) -> int:
        """Retries after a failed attempt (connection errors, timeouts, 408, 409, 429, 5xx)."""
        return self._settings.max_retries

    @max_retries.setter
    def max_retries(self, value: int) -> None:
        self._settings.max_retries = check_retries(value)

    @property
    def max_concurrency(self) -> int | None:
        """Requests in flight at most (fixed at construction: it sizes the pools)."""
        return self._settings.max_concurrency

    @property
    def timeout(self) -> httpx.Timeout:
        """Per-request timeouts (connect, read, write, pool)."""
        return self._settings.timeout

    @property
    def vocab_size(self) -> int | None:
        """Vocabulary size for entropy bounds: given, or the embedded model's; None if unknown."""
        settings = self._settings
        if settings.vocab_size is None and settings.target.embedded:
            from .model import load_engine

            settings.vocab_size = int(load_engine().vocab_size)
        if settings.vocab_size is None:
            from ._conformance import known_vocab_size

            return known_vocab_size(self)
        return settings.vocab_size

    @property
    def profile(self) -> ServerProfile | None:
        """The server profile requests are adapted to (given, or None); see `_profiles`."""
        return self._settings.profile

    @property
    def verify(self) -> bool | None:
        """As given: True measures the endpoint's conformance when a request depends on it, False
        sends every request as it is, None decides from the endpoint (see `measures`)."""
        return self._settings.verify

    @property
    def discovered_model(self) -> str | None:
        """The model ``GET /models`` named, where the client named none and asked."""
        return self.async_client._discovered_model

    @property
    def in_process(self) -> bool:
        """True when requests do not leave the process: the embedded model, or a transport given
        to the constructor that is not httpx's HTTP one (an in-process app, a test double)."""
        target = self._settings.target
        return target.embedded or in_process_transport(target.transport)

    @property
    def measures(self) -> bool:
        """Whether the first request that depends on the endpoint's conformance report measures
        it (see `nbcompletions._governance`): not for the embedded model, an injected transport
        or api.openai.com unless ``verify=True``."""
        return self._settings.measures

    def __repr__(self) -> str:
        urls = [redact_url(u) for u in self.endpoints]
        where = f"endpoint={urls[0]!r}" if len(urls) == 1 else f"endpoints={urls!r}"
        return f"{type(self).__name__}({where}, model={self.model!r})"

    def __reduce__(self) -> Any:
        raise TypeError(
            f"{type(self).__name__} cannot be pickled (it holds connections and "
            "credentials); pickle its settings and build a new client instead"
        )

    # -- request building -------------------------------------------------------------------------
    def build_request(
        self, prompt: Prompt | None = None, **fields: Unpack[CompletionFields]
    ) -> CompletionRequest:
        """Validate ``prompt`` and ``fields`` into a `CompletionRequest` (no network I/O)."""
        unknown = [name for name in fields if name not in _REQUEST_FIELDS]
        if unknown:
            name = unknown[0]
            chat = chat_field_hint(name)
            if chat is not None:
                raise TypeError(chat)
            raise TypeError(
                f"unknown request field {name!r}{_suggest(name)}; valid fields are "
                f"{', '.join(_REQUEST_FIELDS)}. Send server-specific fields with extra={{...}}."
            )
        if fields.get("model") is None:
            fields["model"] = self.model
        request = CompletionRequest(prompt=prompt, limits=self.limits, **fields)
        # A chosen profile makes omitted sampling fields mean OpenAI's on that server.
        profile = self._settings.profile
        return profile.neutralize(request) if profile is not None else request

    def build_chat_request(self, messages: Any = None, **fields: Unpack[ChatFields]) -> ChatRequest:
        """Validate ``messages`` and ``fields`` into a `ChatRequest` (no network I/O)."""
        _refuse_unknown(fields, _CHAT_REQUEST_FIELDS, "chat")
        if fields.get("model") is None:
            fields["model"] = self.model
        request = ChatRequest(messages, limits=self.limits, **fields)
        # As for complete(): a chosen profile makes omitted sampling fields mean OpenAI's there
        # (llama.cpp's own top_k, min_p and repeat penalty stay on for a chat otherwise).
        profile = self._settings.profile
        return profile.neutralize(request) if profile is not None else request

    def build_responses_request(
        self, input: Any = None, **fields: Unpack[ResponsesFields]
    ) -> ResponsesRequest:
        """Validate ``input`` and ``fields`` into a `ResponsesRequest` (no network I/O)."""
        _refuse_unknown(fields, _RESPONSES_REQUEST_FIELDS, "respond")
        if fields.get("model") is None:
            fields["model"] = self.model
        return ResponsesRequest(input, limits=self.limits, **fields)

    def _chat_stream_request(self, messages: Any, fields: ChatFields) -> ChatRequest:
        if fields.get("stream") is False:
            raise RequestError(
                "stream",
                "chat_stream() always streams; got stream=False (use chat())",
                allowed="True or unset",
                value=False,
            )
        fields["stream"] = True
        return self.build_chat_request(messages, **fields)

    def _stream_request(self, prompt: Prompt | None, fields: CompletionFields) -> CompletionRequest:
        if fields.get("stream") is False:
            raise RequestError(
                "stream",
                "stream() always streams; got stream=False (use complete())",
                allowed="True or unset",
                value=False,
            )
        fields["stream"] = True
        return self.build_request(prompt, **fields)


class AsyncClient(_BaseClient):
    """Async client for ``POST /v1/completions``.

    With no arguments it reads ``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``; with neither set it talks
    to the embedded model in-process (no network, no key). ``embedded=True`` asks for the embedded
    model whatever the environment holds (``embedded=False``: never; the environment or OpenAI).
    ``base_url`` may be a list of replicas of one model: requests go to the least busy. ``limits``
    holds server-specific caps (`Limits.vllm()`).
    """

    def _start(self) -> None:
        self._states: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self._discovered_model: str | None = None

    @classmethod
    def _sharing(cls, settings: _Settings) -> AsyncClient:
        client = cls.__new__(cls)
        client._settings = settings
        client._start()
        return client

    @property
    def async_client(self) -> AsyncClient:
        """This client itself (a `Client` answers with the `AsyncClient` it wraps)."""
        return self

    # -- the primitive ----------------------------------------------------------------------------
    async def complete(
        self, prompt: Prompt | None = None, **fields: Unpack[CompletionFields]
    ) -> Completion:
        """Send one completion request; ``stream=True`` streams and returns the merged result."""
        return await self.complete_request(self.build_request(prompt, **fields))

    async def complete_request(
        self, request: CompletionRequest, *, path: str = "complete"
    ) -> Completion:
        """Send an already validated request (retries and the concurrency limit apply), as the
        endpoint's conformance report decides (`nbcompletions._governance`): as it is,
        corrected, flagged, or refused with `ConformanceError` before sending. ``path`` names
        the caller ("complete", "sweep-live", "widget", ...)."""
        request = await self._with_model(request)
        if self._settings.verify is False:
            return await self.complete_as_is(request)
        from ._governance import agovern, agovern_answer

        decision = await agovern(self, request, path=path)
        decision.raise_if_refused()
        completion = await self.complete_as_is(decision.request)
        return await agovern_answer(self, decision, completion)

    async def complete_as_is(self, request: CompletionRequest) -> Completion:
        """Send ``request`` exactly as it is, whatever the endpoint's conformance report says
        (the conformance probes use it)."""
        request = await self._with_model(request)
        if self._card_unread(request):
            await read_card(self, request.model)
        if request.stream:
            stream = AsyncStream(
                self._stream_chunks(request), request, vocab_size=lambda: self.vocab_size
            )
            try:
                return await stream.completion()
            finally:
                await stream.aclose()
        raw, body = await self._post_json(request)
        error = _retry.completion_error(raw)
        if error is not None:
            raise self._scrub(error)
        completion = Completion(raw, request, vocab_size=self.vocab_size)
        completion._body = body
        return completion

    def stream(
        self, prompt: Prompt | None = None, **fields: Unpack[CompletionFields]
    ) -> AsyncStream:
        """Stream a completion: ``async for piece in client.stream(...)`` yields `StreamChunk`."""
        return self.stream_request(self._stream_request(prompt, fields))

    def stream_request(
        self, request: CompletionRequest | ChatRequest, *, path: str = "stream"
    ) -> AsyncStream:
        """Stream an already validated request, as the endpoint's conformance report decides
        (refused with `ConformanceError` at the first piece; flags are warned)."""
        if not request.stream:
            request = request.replace(stream=True)
        # vocab_size is read when the stream is merged: for the embedded model that is after the
        # server has loaded it, so asking here would load the weights on the caller's thread.
        return AsyncStream(
            self._stream_after_model(request, path=path),
            request,
            vocab_size=lambda: self.vocab_size,
        )

    def stream_as_is(self, request: CompletionRequest) -> AsyncStream:
        """Stream ``request`` exactly as it is, whatever the endpoint's conformance report says."""
        if not request.stream:
            request = request.replace(stream=True)
        return AsyncStream(
            self._stream_after_model(request, path=None),
            request,
            vocab_size=lambda: self.vocab_size,
        )

    # -- Chat Completions and Responses -----------------------------------------------------------
    async def chat(self, messages: Any = None, **fields: Unpack[ChatFields]) -> Completion:
        """Send one Chat Completions request (``POST /chat/completions``): a `Completion` whose
        frames have a completion's columns plus ``role``, ``refusal`` and ``api``.
        ``stream=True`` streams and returns the merged result."""
        return await self.chat_request(self.build_chat_request(messages, **fields))

    async def chat_request(self, request: ChatRequest) -> Completion:
        """Send an already validated `ChatRequest` (retries and the concurrency limit apply)."""
        try:
            request = await self._with_model(request)
            if request.stream:
                stream = AsyncStream(
                    self._stream_chunks(request), request, vocab_size=lambda: self.vocab_size
                )
                try:
                    return await stream.completion()
                finally:
                    await stream.aclose()
            raw, body = await self._post_json(request)
        except APIError as exc:
            raise _refused_logprobs(exc, request.model) from exc.__cause__
        error = _retry.completion_error(raw)
        if error is not None:
            raise self._scrub(error)
        completion = Completion(raw, request, vocab_size=self.vocab_size)
        completion._body = body
        return completion

    def chat_stream(self, messages: Any = None, **fields: Unpack[ChatFields]) -> AsyncStream:
        """Stream a chat completion: ``async for piece in client.chat_stream(...)`` yields
        `StreamChunk`; ``await stream.completion()`` merges them."""
        return self.stream_request(self._chat_stream_request(messages, fields))

    async def respond(self, input: Any = None, **fields: Unpack[ResponsesFields]) -> Completion:
        """Send one Responses API request (``POST /responses``) asking for the output text's
        logprobs (``include=["message.output_text.logprobs"]``, ``top_logprobs``): a
        `Completion` with the frames of `chat` (``api`` "responses"); its ``raw`` is the answer
        read as a chat completion (`responses_as_chat`)."""
        return await self.respond_request(self.build_responses_request(input, **fields))

    async def respond_request(self, request: ResponsesRequest) -> Completion:
        """Send an already validated `ResponsesRequest`."""
        if request.stream:
            raise RequestError(
                "stream",
                "respond() does not stream; got stream=True (use chat_stream())",
                allowed="False or unset",
                value=True,
            )
        try:
            request = await self._with_model(request)
            raw, body = await self._post_json(request)
        except APIError as exc:
            raise _refused_logprobs(exc, request.model) from exc.__cause__
        if isinstance(raw, dict) and raw.get("error") is not None:
            raise self._scrub(_retry.error_from_body(raw, status=200))
        error = _retry.completion_error(raw if not isinstance(raw, dict) else {"choices": [{}]})
        if error is not None:
            raise self._scrub(error)
        completion = Completion(responses_as_chat(raw), request, vocab_size=self.vocab_size)
        completion._body = body
        return completion

    def _post_json(
        self, request: CompletionRequest | ChatRequest | ResponsesRequest
    ) -> Coroutine[Any, Any, tuple[Any, bytes]]:
        # Not a coroutine itself: one frame fewer to resume each time the request waits.
        content = _encode_body(request.to_body())
        return self._request_json("POST", _path(request), content, _JSON_HEADERS)

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        files: Mapping[str, Any] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> Any:
        """Send any request to the server (``path`` after the base URL, such as ``"/files"``)
        and return its JSON answer (None for an empty one).

        The body is ``json`` (encoded as JSON), ``content`` (bytes as they are) or ``files`` and
        ``data`` (multipart form data, as httpx takes them); ``params`` go in the query string.
        Authentication, retries, the concurrency limit, redaction and errors (`APIError`) are
        those of a completion. ``retry=False`` makes one attempt: for a request that must not
        run twice unless you have checked it did not arrive.
        """
        path, body, sent_headers = _encode_request(
            method, path, json=json, params=params, content=content, files=files, data=data
        )
        answer, _ = await self._request_json(
            method, path, body, {**sent_headers, **(headers or {})}, retry=retry
        )
        return answer

    def open(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        files: Mapping[str, Any] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> AsyncResponseStream:
        """`request`, with the answer's body read as it arrives instead of parsed whole: for
        large bodies such as a Batch output file.
        ``async with client.open("GET", f"/files/{id}/content") as body:``, then
        ``async for line in body.aiter_lines()``. Failures before the first bytes are retried."""
        path, body, sent_headers = _encode_request(
            method, path, json=json, params=params, content=content, files=files, data=data
        )
        pieces = self._send(
            method, path, body, {**sent_headers, **(headers or {})}, _read_bytes, retry=retry
        )
        return AsyncResponseStream(pieces)

    async def model_card_limits(self, model: str | None = None) -> CardLimits | None:
        """What ``GET /models`` says of the model (vocabulary size, context length), read once
        per client and model (see `nbcompletions._model_card`); None where the client knows its
        vocabulary already (given, or the embedded model's)."""
        settings = self._settings
        if settings.vocab_size is not None or settings.target.embedded:
            return None
        return await read_limits(self, model)

    async def _read_model_card(self, request: CompletionRequest | ChatRequest) -> None:
        # Before the first request whose frames need the vocabulary size (issue 16, case 6);
        # only read here (`vocab_size` parses it for the answer).
        if self._card_unread(request):
            await read_card(self, request.model)

    def _card_unread(self, request: CompletionRequest | ChatRequest) -> bool:
        """Whether ``request`` needs the model card and none is known yet (not read, or the
        server listed none: `read_card` remembers that and answers at once); asked before each
        request, so without a coroutine when a card is known."""
        asked = request.logprobs if isinstance(request, CompletionRequest) else request.top_logprobs
        settings = self._settings
        return (
            needs_limits(asked)
            and settings.vocab_size is None
            and not settings.target.embedded
            and known_card(self, request.model) is None
        )

    async def models(self) -> list[str]:
        """The model ids the server lists (``GET /models``)."""
        body = await self.request("GET", "/models")
        data = answered_field(body, "data", list, "GET /models", "a data list", status=200)
        remember_cards(self, data)
        return [str(item.get("id")) for item in data if isinstance(item, Mapping)]

    async def score(
        self, texts: str | Sequence[str], *, context: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Log-probability of each text (optionally after ``context``); see `_scoring.ascore`."""
        from ._scoring import ascore

        return await ascore(self, texts, context=context)

    async def score_reply(
        self,
        messages: Any,
        reply: str,
        *,
        template: Any = None,
        method: str = "auto",
    ) -> ReplyScore:
        """Log-probability of ``reply`` as the assistant's turn after ``messages``, under the
        model's chat template: ``.tokens`` (one row per reply token) and ``.summary``
        (``sum_logprob`` and more); see `_reply_scoring.ascore_reply`."""
        from ._reply_scoring import ascore_reply

        return await ascore_reply(self, messages, reply, template=template, method=method)

    async def capabilities(self) -> dict[str, Any]:
        """The conformance report as a dict (`conformance().to_dict()`), kept for sweeps' files."""
        from ._scoring import acapabilities

        return await acapabilities(self)

    async def conformance(self, *, refresh: bool = False) -> ConformanceReport:
        """Measure what this endpoint and model do (see `nbcompletions._conformance`); kept in
        memory and on disk (`nbcompletions._governance`); ``refresh=True`` measures again."""
        from ._governance import ameasure

        return await ameasure(self, refresh=refresh)

    async def chat_conformance(self) -> ConformanceReport:
        """Measure what this endpoint's ``/v1/chat/completions`` does with logprobs (top_logprobs
        cap, n, seed, bytes, raw or processed logprobs, their stability, the reply span of
        ``/tokenize``); see `nbcompletions._chat_conformance`. Not cached."""
        from ._chat_conformance import achat_conformance

        return await achat_conformance(self)

    async def close(self) -> None:
        """Close the connection pools (the client can still be used afterwards: it reopens them)."""
        states = list(self._states.items())
        self._states.clear()
        current = _running_loop()
        for loop, state in states:
            if loop is current:
                await state.aclose()
            elif not loop.is_closed() and loop.is_running():
                asyncio.run_coroutine_threadsafe(state.aclose(), loop)

    aclose = close

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- internals --------------------------------------------------------------------------------
    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._states.get(loop)
        if state is None:
            target = self._settings.target
            connections = (self.max_concurrency or 1000) * len(target.endpoints)
            limits = httpx.Limits(
                max_connections=connections, max_keepalive_connections=connections
            )
            transport = target.transport
            if transport is None:
                from ._transport import NetworkTransport

                transport = NetworkTransport(limits=limits)
            http = _HTTP(
                transport=transport,
                timeout=self._settings.timeout,
                follow_redirects=False,
                limits=limits,
            )
            semaphore = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
            state = self._states[loop] = _LoopState(http, semaphore)
        return state

    def _secret_values(self) -> list[str]:
        """What redaction must hide (see `nbcompletions._secrets.secrets_of`)."""
        key = self._settings.key.get()
        return [key] if isinstance(key, str) and key else []

    def _scrub(self, error: APIError) -> APIError:
        # Servers sometimes echo the key they rejected ("Incorrect API key provided: sk-...").
        return redact_error(error, [self._settings.key.get()])

    async def _with_model(self, request: R) -> R:
        if request.model is not None:
            return request
        if self.model is not None:
            return dataclasses.replace(request, model=self.model)
        if self._discovered_model is None:
            available = await self.models()
            if len(available) != 1:
                hint = f"; {env_key_hint()}" if self._settings.target.env_key_chose_openai else ""
                raise RequestError(
                    "model",
                    "model must be given (Client(model=...) or complete(..., model=...)); "
                    f"the server lists {shown(available)}{hint}",
                    allowed="a model name",
                    value=None,
                )
            self._discovered_model = available[0]
        return dataclasses.replace(request, model=self._discovered_model)

    async def _retry_or_raise(
        self, error: APIError, retries: int, headers: Mapping[str, str] | None, retryable: bool
    ) -> None:
        if not retryable or retries >= self.max_retries:
            raise self._scrub(error)
        delay = _retry.retry_delay(retries, headers)
        log.info(
            "retrying in %.2f s (%d of %d) after: %s",
            delay,
            retries + 1,
            self.max_retries,
            self._scrub(error),
        )
        await _retry.sleep(delay)

    async def _request_json(
        self,
        method: str,
        path: str,
        content: bytes | None,
        headers: Mapping[str, str],
        *,
        retry: bool = True,
    ) -> tuple[Any, bytes]:
        """One request through the retry loop: the JSON answer and its bytes."""
        answers: AsyncGenerator[tuple[Any, bytes], None] = self._send(
            method, path, content, headers, None, retry=retry
        )
        try:
            return await anext(answers)
        finally:
            await answers.aclose()

    async def _stream_after_model(
        self,
        request: CompletionRequest | ChatRequest,
        *,
        path: str | None,
    ) -> AsyncIterator[dict[str, Any]]:
        request = await self._with_model(request)
        await self._read_model_card(request)
        if (
            path is not None
            and self._settings.verify is not False
            and isinstance(request, CompletionRequest)
        ):
            from ._governance import agovern_stream

            request = await agovern_stream(self, request, path=path)
        chunks = self._stream_chunks(request)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            # Closing this generator must close the HTTP response now, not when the inner
            # generator happens to be garbage collected.
            await chunks.aclose()

    def _stream_chunks(
        self, request: CompletionRequest | ChatRequest
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Chunk objects of one streamed request; retried only until the first data arrives."""
        headers = {**_JSON_HEADERS, "Accept": "text/event-stream"}
        content = _encode_body(request.to_body())
        return self._send("POST", _path(request), content, headers, _read_events)

    def _http_error(
        self, response: httpx.Response, endpoint: _Endpoint, method: str, path: str
    ) -> APIError:
        """The `APIError` of an HTTP error answer (its body already read), with a hint."""
        error = _retry.api_error(
            response.status_code, response.content, response.headers, response.reason_phrase
        )
        error.url = f"{method} {redact_url(endpoint.url + path)}"
        error.hint = self._settings.target.hint(endpoint, response.status_code, error)
        return error

    async def _send(
        self,
        method: str,
        path: str,
        content: bytes | None,
        headers: Mapping[str, str],
        read: Callable[[httpx.Response], AsyncGenerator[T, None]] | None,
        *,
        retry: bool = True,
    ) -> AsyncGenerator[T, None]:
        """The one retry loop: yields what ``read`` makes of the first successful answer
        (``read`` None: the whole answer once, as `_json_answer` reads it).

        Each attempt goes to the least busy endpoint (another one after a failure) and holds a
        concurrency slot until the consumer closes this generator. Failures are retried as
        `_retry` decides; a body only until ``read`` has yielded its first item.
        """
        state = self._state()
        target = self._settings.target
        limit = state.semaphore or _NO_LIMIT
        headers = {**self._settings.headers.get(), **headers}
        retries = 0
        last: _Endpoint | None = None
        while True:
            endpoint = last = target.pick(avoid=last)
            received = False
            error_headers: Mapping[str, str] | None = None
            retryable = True
            async with limit:
                endpoint.in_flight += 1
                http = state.http
                try:
                    http_request = state.build(
                        method, endpoint.url + path, content, endpoint.headers(headers)
                    )
                    response = await http.send(http_request, stream=True)
                    try:
                        if response.status_code < 400 and read is None:
                            # The whole answer, read here: a reader generator would be one more
                            # frame to resume each time the body waits for the network.
                            await response.aread()
                            received = True
                            yield cast(T, _json_answer(response))
                            return
                        if response.status_code < 400:
                            assert read is not None
                            # Closed here, not left to the loop once collected (a task each).
                            async with aclosing(read(response)) as items:
                                async for item in items:
                                    received = True
                                    yield item
                            return
                        await response.aread()
                        error = self._http_error(response, endpoint, method, path)
                        error_headers = response.headers
                        retryable = _retry.should_retry(
                            response.status_code, response.headers, error
                        )
                    finally:
                        await response.aclose()
                except APIError as exc:
                    # A stream's error event, a body that is not JSON: the server's words, which
                    # may echo the key.
                    raise self._scrub(exc) from exc.__cause__
                except httpx.TransportError as exc:
                    if received:
                        raise target.transport_error(
                            exc, endpoint, method, path, broken=True
                        ) from exc
                    error = target.transport_error(exc, endpoint, method, path)
                    error.__cause__ = exc
                finally:
                    endpoint.in_flight -= 1
            await self._retry_or_raise(error, retries, error_headers, retryable and retry)
            retries += 1


_JSON_HEADERS = {"Content-Type": "application/json"}


def _json_answer(response: httpx.Response) -> tuple[Any, bytes]:
    """A whole JSON answer, read: the parsed value and its bytes (an empty body: None)."""
    return (_json_body(response) if response.content else None), response.content


async def _read_events(response: httpx.Response) -> AsyncGenerator[dict[str, Any], None]:
    """The chunk objects of a streamed completion (a server that ignored ``stream=True`` and
    sent it whole: that one object)."""
    if response.headers.get("content-type", "").startswith("application/json"):
        await response.aread()
        body = _json_body(response)
        if isinstance(body, dict):
            yield body
        return
    async for chunk in aiter_chunks(response.aiter_bytes()):
        yield chunk


async def _read_bytes(response: httpx.Response) -> AsyncGenerator[bytes, None]:
    """The answer's bytes as they arrive (decoded from any content encoding)."""
    async for piece in response.aiter_bytes():
        if piece:
            yield piece


def _json_body(response: httpx.Response) -> Any:
    try:
        return loads(response.content)
    except ValueError:
        text = response.content.decode("utf-8", errors="replace")
        raise APIError(
            f"the server answered HTTP {response.status_code} with a body "
            f"that is not JSON: {_retry.text_message(text)[:200]!r}",
            status=response.status_code,
            type="invalid_response",
            body=text,
            headers=dict(response.headers),
        ) from None


def _encode_request(
    method: str,
    path: str,
    *,
    json: Any,
    params: Mapping[str, Any] | None,
    content: bytes | None,
    files: Mapping[str, Any] | None,
    data: Mapping[str, str] | None,
) -> tuple[str, bytes | None, dict[str, str]]:
    """``request``'s arguments as the path with its query, the body and its headers."""
    if not isinstance(method, str) or not method.isalpha():
        raise RequestError(
            "method",
            f"method must be an HTTP method such as 'GET' or 'POST'; got {method!r}",
            allowed="an HTTP method name",
            value=method,
        )
    if not isinstance(path, str) or not path.startswith("/"):
        raise RequestError(
            "path",
            f"path must start with '/' (it follows the base URL, as in '/files'); got {path!r}",
            allowed="a path starting with '/'",
            value=path,
        )
    given = [
        n for n, v in (("json", json), ("content", content), ("files", files)) if v is not None
    ]
    if len(given) > 1 or (data is not None and files is None):
        raise RequestError(
            given[-1] if given else "data",
            f"a request has one body: json, content, or files (with data); got {given or ['data']}",
            allowed="one of json, content, files (data only with files)",
            value=given,
        )
    # Text that UTF-8 cannot carry (a lone surrogate) is refused naming the argument, not left
    # to httpx's UnicodeEncodeError on the way out.
    _refuse_surrogates({"path": path, "params": params, "files": files, "data": data})
    if params:
        query = str(httpx.QueryParams(params))
        path = f"{path}{'&' if '?' in path else '?'}{query}"
    if json is not None:
        return path, _encode_body(json), dict(_JSON_HEADERS)
    if files is not None:
        # httpx builds the multipart body; it is read once so that a retry sends it again.
        built = httpx.Request(method, "http://multipart.invalid/", files=files, data=data)
        return path, built.read(), {"Content-Type": built.headers["Content-Type"]}
    return path, content, {}


def _encode_body(body: Any) -> bytes:
    """The JSON request body as UTF-8; text that UTF-8 cannot carry is a `RequestError`."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except ValueError as exc:
        if isinstance(exc, UnicodeEncodeError) and isinstance(body, Mapping):
            _refuse_surrogates(body)
        raise RequestError(
            "json",
            f"the JSON body cannot be encoded: {exc}",
            allowed="JSON values (finite numbers, valid Unicode text)",
            value=body,
        ) from None


def _refuse_surrogates(body: Mapping[str, Any]) -> None:
    """Name the field that holds a lone surrogate (U+D800..U+DFFF, from JSON or a bad decode):
    no server could tokenize it."""
    for name, value in body.items():
        try:
            # default=repr: files hold bytes and file objects; only their text can fail here.
            json.dumps(value, ensure_ascii=False, default=repr).encode("utf-8")
        except UnicodeEncodeError as exc:
            raise RequestError(
                name,
                f"{name} must be valid Unicode text; it holds a lone surrogate "
                f"{exc.object[exc.start]!r}",
                allowed="text without lone surrogates (U+D800..U+DFFF)",
                value=value,
            ) from None
        except (TypeError, ValueError):
            continue  # not JSON-shaped (keys that are not text, cycles): httpx judges it


class AsyncResponseStream:
    """An answer's body as it arrives (`AsyncClient.open`): ``async with`` sends the request
    (retrying failures, raising `APIError` for an error answer); then ``aiter_bytes()`` or
    ``aiter_lines()`` read it once. Leaving the block closes the connection."""

    def __init__(self, pieces: AsyncGenerator[bytes, None]) -> None:
        self._pieces = pieces
        self._first: bytes | None = None
        self._entered = self._started = False

    async def __aenter__(self) -> AsyncResponseStream:
        # The first bytes are read here, so a failure before them is retried and raised now.
        self._first = await anext(self._pieces, None)
        self._entered = True
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._pieces.aclose()

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body in pieces as they arrive (content encoding decoded)."""
        if not self._entered:
            raise RuntimeError(
                "open() sends the request on entering a with block: "
                "`with client.open(...) as body:` (async: `async with`)"
            )
        if self._started:
            raise RuntimeError("the body has already been read; open the request again")
        self._started = True
        if self._first is not None:
            yield self._first
            self._first = None
        async for piece in self._pieces:
            yield piece

    async def aiter_lines(self) -> AsyncIterator[bytes]:
        """The body's lines as bytes, without their line ends (JSON Lines, one at a time)."""
        rest = b""
        async for piece in self.aiter_bytes():
            lines = (rest + piece).split(b"\n")
            rest = lines.pop()
            for line in lines:
                yield line.removesuffix(b"\r")
        if rest:
            yield rest.removesuffix(b"\r")


class ResponseStream:
    """An answer's body as it arrives (`Client.open`): the sync twin of `AsyncResponseStream`,
    used with ``with`` and read with ``iter_bytes()`` or ``iter_lines()``."""

    def __init__(self, stream: AsyncResponseStream) -> None:
        self._stream = stream

    def __enter__(self) -> ResponseStream:
        run_sync(self._stream.__aenter__())
        return self

    def __exit__(self, *exc: object) -> None:
        run_sync(self._stream.__aexit__())

    def iter_bytes(self) -> Iterator[bytes]:
        """The body in pieces as they arrive (content encoding decoded)."""
        return iter_sync(self._stream.aiter_bytes())

    def iter_lines(self) -> Iterator[bytes]:
        """The body's lines as bytes, without their line ends (JSON Lines, one at a time)."""
        return iter_sync(self._stream.aiter_lines())


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class Client(_BaseClient):
    """Synchronous client (the same methods as `AsyncClient`, without await).

    It wraps an `AsyncClient` (``client.async_client``, sharing its settings) whose coroutines run
    on nbcompletions' background event loop, so plain calls work in scripts and inside Jupyter's
    running loop alike.
    """

    def _start(self) -> None:
        self._async = AsyncClient._sharing(self._settings)

    @classmethod
    def _wrapping(cls, aclient: AsyncClient) -> Client:
        """A sync client running an existing `AsyncClient` (the same settings and connections)."""
        client = cls.__new__(cls)
        client._settings = aclient._settings
        client._async = aclient
        return client

    @property
    def async_client(self) -> AsyncClient:
        """The `AsyncClient` this client runs on (the same settings, connections and limit)."""
        return self._async

    def complete(
        self, prompt: Prompt | None = None, **fields: Unpack[CompletionFields]
    ) -> Completion:
        """Send one completion request; ``stream=True`` streams and returns the merged result."""
        return run_sync(self._async.complete_request(self.build_request(prompt, **fields)))

    def complete_request(self, request: CompletionRequest, *, path: str = "complete") -> Completion:
        """Send an already validated request as the endpoint's conformance report decides; see
        `AsyncClient.complete_request`."""
        return run_sync(self._async.complete_request(request, path=path))

    def complete_as_is(self, request: CompletionRequest) -> Completion:
        """Send ``request`` exactly as it is, whatever the endpoint's conformance report says."""
        return run_sync(self._async.complete_as_is(request))

    def stream(self, prompt: Prompt | None = None, **fields: Unpack[CompletionFields]) -> Stream:
        """Stream a completion: ``for piece in client.stream(...)`` yields `StreamChunk`."""
        return Stream(self._async.stream_request(self._stream_request(prompt, fields)))

    def stream_request(
        self, request: CompletionRequest | ChatRequest, *, path: str = "stream"
    ) -> Stream:
        """Stream an already validated request; see `AsyncClient.stream_request`."""
        return Stream(self._async.stream_request(request, path=path))

    def stream_as_is(self, request: CompletionRequest) -> Stream:
        """Stream ``request`` exactly as it is, whatever the endpoint's conformance report says."""
        return Stream(self._async.stream_as_is(request))

    def chat(self, messages: Any = None, **fields: Unpack[ChatFields]) -> Completion:
        """Send one Chat Completions request; see `AsyncClient.chat`."""
        return run_sync(self._async.chat_request(self.build_chat_request(messages, **fields)))

    def chat_request(self, request: ChatRequest) -> Completion:
        """Send an already validated `ChatRequest`."""
        return run_sync(self._async.chat_request(request))

    def chat_stream(self, messages: Any = None, **fields: Unpack[ChatFields]) -> Stream:
        """Stream a chat completion: ``for piece in client.chat_stream(...)`` yields
        `StreamChunk`; ``stream.completion()`` merges them."""
        return Stream(self._async.stream_request(self._chat_stream_request(messages, fields)))

    def respond(self, input: Any = None, **fields: Unpack[ResponsesFields]) -> Completion:
        """Send one Responses API request with logprobs; see `AsyncClient.respond`."""
        return run_sync(self._async.respond_request(self.build_responses_request(input, **fields)))

    def respond_request(self, request: ResponsesRequest) -> Completion:
        """Send an already validated `ResponsesRequest`."""
        return run_sync(self._async.respond_request(request))

    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        files: Mapping[str, Any] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> Any:
        """Send any request to the server and return its JSON answer; see `AsyncClient.request`."""
        return run_sync(
            self._async.request(
                method,
                path,
                json=json,
                params=params,
                content=content,
                files=files,
                data=data,
                headers=headers,
                retry=retry,
            )
        )

    def open(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        content: bytes | None = None,
        files: Mapping[str, Any] | None = None,
        data: Mapping[str, str] | None = None,
        headers: Mapping[str, str] | None = None,
        retry: bool = True,
    ) -> ResponseStream:
        """`request` with the body read as it arrives: ``with client.open("GET", path) as body:``
        then ``for line in body.iter_lines()``; see `AsyncClient.open`."""
        return ResponseStream(
            self._async.open(
                method,
                path,
                json=json,
                params=params,
                content=content,
                files=files,
                data=data,
                headers=headers,
                retry=retry,
            )
        )

    def models(self) -> list[str]:
        """The model ids the server lists (``GET /models``)."""
        return run_sync(self._async.models())

    def model_card_limits(self, model: str | None = None) -> CardLimits | None:
        """What ``GET /models`` says of the model (vocabulary size, context length), read once
        per client and model; None where the client knows its vocabulary already."""
        return run_sync(self._async.model_card_limits(model))

    def score(
        self, texts: str | Sequence[str], *, context: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Log-probability of each text (optionally after ``context``); see `_scoring.ascore`."""
        return run_sync(self._async.score(texts, context=context))

    def score_reply(
        self,
        messages: Any,
        reply: str,
        *,
        template: Any = None,
        method: str = "auto",
    ) -> ReplyScore:
        """Log-probability of ``reply`` as the assistant's turn after ``messages`` (see
        `AsyncClient.score_reply`)."""
        return run_sync(self._async.score_reply(messages, reply, template=template, method=method))

    def capabilities(self) -> dict[str, Any]:
        """The conformance report as a dict (`conformance().to_dict()`), kept for sweeps' files."""
        return run_sync(self._async.capabilities())

    def conformance(self, *, refresh: bool = False) -> ConformanceReport:
        """Measure what this endpoint and model do (see `nbcompletions._conformance`); cached."""
        return run_sync(self._async.conformance(refresh=refresh))

    def chat_conformance(self) -> ConformanceReport:
        """Measure the chat endpoint's logprobs (see `AsyncClient.chat_conformance`)."""
        return run_sync(self._async.chat_conformance())

    def close(self) -> None:
        """Close the connection pools."""
        run_sync(self._async.close())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
