"""`AsyncClient` and `Client`: ``POST /v1/completions`` to OpenAI, compatible servers, or our model.

The async client does the work; the sync `Client` wraps one and runs its coroutines on the
background loop of `nbcompletions._loop` (so a plain call works inside Jupyter). Requests are
validated (`CompletionRequest`) before any network I/O. Failures are retried like the official SDK
does (`nbcompletions._retry`); a per-client semaphore caps concurrent requests, and sweeps share it.
Which endpoint requests go to, and what an error says about it, is `nbcompletions._endpoint`.
"""

from __future__ import annotations

import asyncio
import difflib
import json
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import httpx

from . import _retry
from ._completion import Completion
from ._endpoint import _Endpoint, env_key_hint
from ._errors import APIError, RequestError, answered_field
from ._loop import run_sync
from ._parse import loads
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
from ._settings import DEFAULT_TIMEOUT, _Settings, check_limits, check_model, check_retries
from ._streaming import AsyncStream, Stream, aiter_chunks

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    from typing_extensions import Unpack  # typing has it from 3.11 only

    from ._conformance import ConformanceReport

__all__ = ["AsyncClient", "Client"]

log = logging.getLogger("nbcompletions")

_REQUEST_FIELDS = (*(f for f in FIELDS if f != "prompt"), "extra")


#: Connections per pool at most, where requests share pools (see `_LoopState`): httpcore 1.0's
#: pool does work quadratic in its connection count on every request and response.
_POOL_SIZE = 8


class _Cookies(httpx.Cookies):
    """httpx's cookie jar, that reads a response only when it sets a cookie: httpx runs every
    response through urllib's cookie machinery, ~5% of a request's CPU, to find none."""

    def extract_cookies(self, response: httpx.Response) -> None:
        headers = response.headers
        if "set-cookie" in headers or "set-cookie2" in headers:
            super().extract_cookies(response)


class _Pool(httpx.AsyncClient):
    """An httpx client whose cookies are a jar shared with the client's other pools, so a cookie
    a server set is sent from whichever pool the next request takes."""

    def __init__(self, *, jar: _Cookies, **options: Any) -> None:
        super().__init__(**options)
        self._jar = jar

    @property
    def cookies(self) -> httpx.Cookies:
        return self._jar

    @cookies.setter
    def cookies(self, cookies: httpx._types.CookieTypes) -> None:
        self._jar = _Cookies(cookies)


class _LoopState:
    """What is bound to one event loop: the HTTP connection pools and the concurrency semaphore.

    Each request in flight has a small httpx client (a pool) to itself: `take` hands out an idle
    one (making one when none is), `give_back` returns it once the response is closed. httpcore
    1.0's pool rescans all its connections for each idle one on every request and response
    (quadratic in its size), and while a request it handed an idle connection to waits for that
    connection's locks, hands the same connection to a request that starts meanwhile; one of them
    then fails over and scans again (at 32 in flight, one to two extra scans per request). A pool
    that serves one request at a time does neither. The pools share one SSL context (making one
    per pool, httpx's default, would cost ~50 ms each) and one cookie jar.

    With ``fixed`` pools instead, requests take them in turn, several per pool: for a client
    without a concurrency limit (a pool per request would keep as many connections open as the
    most requests ever in flight) and for a given transport (in-process, mock: one pool, it has
    no connections to split).
    """

    __slots__ = ("_idle", "_made", "_make", "_next", "fixed", "https", "semaphore")

    def __init__(
        self,
        make: Callable[[], httpx.AsyncClient],
        semaphore: asyncio.Semaphore | None,
        *,
        fixed: int = 0,
    ) -> None:
        self._make = make
        self.semaphore = semaphore
        self.fixed = fixed
        self.https: list[httpx.AsyncClient] = [make() for _ in range(fixed)]  # all, to close
        self._next = 0
        self._idle: list[httpx.AsyncClient] = []
        # (url, *headers) -> what `build` reuses; bounded in case headers keep changing.
        self._made: dict[
            tuple[str, ...], tuple[httpx.URL, httpx.Headers, dict[str, float | None]]
        ] = {}

    def take(self) -> httpx.AsyncClient:
        """A pool for one request: the most recently used idle one (its connection is warm)."""
        if self.fixed:
            self._next = (self._next + 1) % self.fixed
            return self.https[self._next]
        if self._idle:
            return self._idle.pop()
        http = self._make()
        self.https.append(http)
        return http

    def build(
        self,
        http: httpx.AsyncClient,
        method: str,
        url: str,
        content: bytes | None,
        headers: dict[str, str],
    ) -> httpx.Request:
        """``http.build_request(method, url, content=content, headers=headers)``, the same
        request, with what depends only on the URL and headers (parsing the URL, merging the
        headers with httpx's defaults: a quarter of a request's CPU in httpx) made once."""
        if http.cookies or http.params or str(http.base_url):
            # Cookies a server set on this pool (or anything else httpx would merge) go in as
            # httpx adds them.
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

    def give_back(self, http: httpx.AsyncClient) -> None:
        if not self.fixed:
            self._idle.append(http)

    async def aclose(self) -> None:
        for http in self.https:
            await http.aclose()


class _NoLimit:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


_NO_LIMIT = _NoLimit()


def _suggest(name: str) -> str:
    close = difflib.get_close_matches(name, _REQUEST_FIELDS, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


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

    async def complete_request(self, request: CompletionRequest) -> Completion:
        """Send an already validated request (retries and the concurrency limit apply)."""
        request = await self._with_model(request)
        if request.stream:
            stream = AsyncStream(
                self._stream_chunks(request), request, vocab_size=lambda: self.vocab_size
            )
            try:
                return await stream.completion()
            finally:
                await stream.aclose()
        raw, body = await self._request_json(
            "POST", "/completions", request.to_body(), with_body=True
        )
        if not isinstance(raw, dict):
            raise APIError(
                f"the server answered with JSON that is not an object: {str(raw)[:200]}",
                status=200,
                type="invalid_response",
                body=raw,
            )
        if "choices" not in raw and ("error" in raw or raw.get("object") == "error"):
            # Some proxies answer 200 with an error body.
            raise self._scrub(_retry.error_from_body(raw, status=200))
        completion = Completion(raw, request, vocab_size=self.vocab_size)
        completion._body = body
        return completion

    def stream(
        self, prompt: Prompt | None = None, **fields: Unpack[CompletionFields]
    ) -> AsyncStream:
        """Stream a completion: ``async for piece in client.stream(...)`` yields `StreamChunk`."""
        return self.stream_request(self._stream_request(prompt, fields))

    def stream_request(self, request: CompletionRequest) -> AsyncStream:
        if not request.stream:
            request = request.replace(stream=True)
        # vocab_size is read when the stream is merged: for the embedded model that is after the
        # server has loaded it, so asking here would load the weights on the caller's thread.
        return AsyncStream(
            self._stream_after_model(request), request, vocab_size=lambda: self.vocab_size
        )

    async def models(self) -> list[str]:
        """The model ids the server lists (``GET /models``)."""
        body = await self._request_json("GET", "/models", None)
        data = answered_field(body, "data", list, "GET /models", "a data list", status=200)
        return [str(item.get("id")) for item in data if isinstance(item, Mapping)]

    async def score(
        self, texts: str | Sequence[str], *, context: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Log-probability of each text (optionally after ``context``); see `_scoring.ascore`."""
        from ._scoring import ascore

        return await ascore(self, texts, context=context)

    async def capabilities(self) -> dict[str, Any]:
        """The conformance report as a dict (`conformance().to_dict()`), kept for sweeps' files."""
        from ._scoring import acapabilities

        return await acapabilities(self)

    async def conformance(self, *, refresh: bool = False) -> ConformanceReport:
        """Measure what this endpoint and model do (see `nbcompletions._conformance`); cached."""
        from ._conformance import aconformance

        return await aconformance(self, refresh=refresh)

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
            endpoints = len(target.endpoints)
            if self.max_concurrency and target.transport is None:
                # A pool per request in flight: to each endpoint, one connection at a time.
                fixed, keep = 0, max(20, endpoints)
            else:
                # Pools of at most _POOL_SIZE connections each (see _LoopState).
                connections = (self.max_concurrency or 64) * endpoints
                fixed = 1 if target.transport is not None else -(-connections // _POOL_SIZE)
                keep = max(20, -(-connections // fixed))
            limits = httpx.Limits(max_connections=1000, max_keepalive_connections=keep)
            timeout = self._settings.timeout
            jar = _Cookies()
            if target.transport is not None:

                def make() -> httpx.AsyncClient:
                    return _Pool(
                        jar=jar,
                        transport=target.transport,
                        timeout=timeout,
                        follow_redirects=False,
                        limits=limits,
                    )

            else:
                # What httpx makes for each client by default (certifi, or SSL_CERT_FILE/DIR),
                # made once for all the pools.
                ssl_context = httpx.create_ssl_context()

                def make() -> httpx.AsyncClient:
                    return _Pool(
                        jar=jar,
                        verify=ssl_context,
                        timeout=timeout,
                        follow_redirects=False,
                        limits=limits,
                    )

            semaphore = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency else None
            state = self._states[loop] = _LoopState(make, semaphore, fixed=fixed)
        return state

    def _secret_values(self) -> list[str]:
        """What redaction must hide (see `nbcompletions._secrets.secrets_of`)."""
        key = self._settings.key.get()
        return [key] if isinstance(key, str) and key else []

    def _scrub(self, error: APIError) -> APIError:
        # Servers sometimes echo the key they rejected ("Incorrect API key provided: sk-...").
        return redact_error(error, [self._settings.key.get()])

    async def _with_model(self, request: CompletionRequest) -> CompletionRequest:
        if request.model is not None:
            return request
        if self.model is not None:
            return request.replace(model=self.model)
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
        return request.replace(model=self._discovered_model)

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
        body: dict[str, Any] | None,
        *,
        upload: tuple[bytes, str] | None = None,
        raw: bool = False,
        with_body: bool = False,
        retry: bool = True,
    ) -> Any:
        """One request through the retry loop: the JSON answer (``raw``: its bytes;
        ``with_body``: the answer and its bytes). ``upload`` sends ``(content, content type)``
        instead of a JSON body (the Batch API's files). ``retry=False`` makes one attempt: for a
        POST that must not run twice, whose caller checks what happened before it tries again
        (the Batch API's create)."""
        responses = self._send(
            method, path, body, upload=upload, raw=raw, with_body=with_body, retry=retry
        )
        try:
            return await anext(responses)
        finally:
            await responses.aclose()

    async def _stream_after_model(
        self,
        request: CompletionRequest,
    ) -> AsyncIterator[dict[str, Any]]:
        request = await self._with_model(request)
        chunks = self._stream_chunks(request)
        try:
            async for chunk in chunks:
                yield chunk
        finally:
            # Closing this generator must close the HTTP response now, not when the inner
            # generator happens to be garbage collected.
            await chunks.aclose()

    def _stream_chunks(self, request: CompletionRequest) -> AsyncGenerator[dict[str, Any], None]:
        """Chunk objects of one streamed request; retried only until the first data arrives."""
        return self._send("POST", "/completions", request.to_body(), stream=True)

    async def _send(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None,
        *,
        stream: bool = False,
        upload: tuple[bytes, str] | None = None,
        raw: bool = False,
        with_body: bool = False,
        retry: bool = True,
    ) -> AsyncGenerator[Any, None]:
        """The one retry loop: yields the JSON body once or, with ``stream``, each chunk object.

        Each attempt goes to the least busy endpoint (another one after a failure) and holds a
        concurrency slot until the consumer closes this generator. Failures are retried as
        `_retry` decides; a stream only until its first chunk has arrived.
        """
        state = self._state()
        target = self._settings.target
        limit = state.semaphore or _NO_LIMIT
        content = _encode_body(body) if body is not None else None
        headers = self._settings.headers.get()
        if content is not None:
            headers = {**headers, "Content-Type": "application/json"}
        elif upload is not None:
            content, content_type = upload
            headers = {**headers, "Content-Type": content_type}
        if stream:
            headers = {**headers, "Accept": "text/event-stream"}
        retries = 0
        last: _Endpoint | None = None
        while True:
            endpoint = last = target.pick(avoid=last)
            received = False
            error_headers: Mapping[str, str] | None = None
            retryable = True
            async with limit:
                endpoint.in_flight += 1
                http = state.take()
                try:
                    http_request = state.build(
                        http, method, endpoint.url + path, content, endpoint.headers(headers)
                    )
                    response = await http.send(http_request, stream=True)
                    try:
                        if response.status_code >= 400:
                            await response.aread()
                            error = _retry.api_error(
                                response.status_code,
                                response.content,
                                response.headers,
                                response.reason_phrase,
                            )
                            error.url = f"{method} {redact_url(endpoint.url + path)}"
                            error.hint = target.hint(endpoint, response.status_code, error)
                            error_headers = response.headers
                            retryable = _retry.should_retry(
                                response.status_code, response.headers, error
                            )
                        elif stream and response.headers.get("content-type", "").startswith(
                            "application/json"
                        ):
                            # A server that ignored stream=True sent it whole: one chunk.
                            await response.aread()
                            body = _json_body(response)
                            if isinstance(body, dict):
                                received = True
                                yield body
                            return
                        elif stream:
                            async for chunk in aiter_chunks(response.aiter_bytes()):
                                received = True
                                yield chunk
                            return
                        else:
                            await response.aread()
                            if raw:
                                yield response.content
                            elif with_body:
                                yield _json_body(response), response.content
                            else:
                                yield _json_body(response)
                            return
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
                    retryable = True
                finally:
                    endpoint.in_flight -= 1
                    state.give_back(http)
            await self._retry_or_raise(error, retries, error_headers, retryable and retry)
            retries += 1


def _json_body(response: httpx.Response) -> Any:
    try:
        return loads(response.content)
    except ValueError:
        text = response.content.decode("utf-8", errors="replace")
        raise APIError(
            f"the server answered HTTP {response.status_code} with a body "
            f"that is not JSON: {_retry._text_message(text)[:200]!r}",
            status=response.status_code,
            type="invalid_response",
            body=text,
            headers=dict(response.headers),
        ) from None


def _encode_body(body: Mapping[str, Any]) -> bytes:
    """The JSON request body as UTF-8; text that UTF-8 cannot carry is a `RequestError`."""
    try:
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except UnicodeEncodeError:
        # A lone surrogate ("\ud800", from JSON or a bad decode): no server could tokenize it.
        for name, value in body.items():
            try:
                json.dumps(value, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError as exc:
                raise RequestError(
                    name,
                    f"{name} must be valid Unicode text; it holds a lone surrogate "
                    f"{exc.object[exc.start]!r}",
                    allowed="text without lone surrogates (U+D800..U+DFFF)",
                    value=value,
                ) from None
        raise


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

    def complete_request(self, request: CompletionRequest) -> Completion:
        """Send an already validated request (retries and the concurrency limit apply)."""
        return run_sync(self._async.complete_request(request))

    def stream(self, prompt: Prompt | None = None, **fields: Unpack[CompletionFields]) -> Stream:
        """Stream a completion: ``for piece in client.stream(...)`` yields `StreamChunk`."""
        return Stream(self._async.stream_request(self._stream_request(prompt, fields)))

    def stream_request(self, request: CompletionRequest) -> Stream:
        return Stream(self._async.stream_request(request))

    def models(self) -> list[str]:
        """The model ids the server lists (``GET /models``)."""
        return run_sync(self._async.models())

    def score(
        self, texts: str | Sequence[str], *, context: str | Sequence[str] | None = None
    ) -> pd.DataFrame:
        """Log-probability of each text (optionally after ``context``); see `_scoring.ascore`."""
        return run_sync(self._async.score(texts, context=context))

    def capabilities(self) -> dict[str, Any]:
        """The conformance report as a dict (`conformance().to_dict()`), kept for sweeps' files."""
        return run_sync(self._async.capabilities())

    def conformance(self, *, refresh: bool = False) -> ConformanceReport:
        """Measure what this endpoint and model do (see `nbcompletions._conformance`); cached."""
        return run_sync(self._async.conformance(refresh=refresh))

    def close(self) -> None:
        """Close the connection pools."""
        run_sync(self._async.close())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
