"""Which endpoint a client talks to, where that choice came from, and what to try when it fails.

A client sends to one base URL or to replicas of one model (an `_Endpoint` each). The URL comes
from the ``base_url`` argument, ``OPENAI_BASE_URL``, the embedded model or OpenAI's default, and
`Target` keeps which: every connection error and 404 names it, because an exported
``OPENAI_API_KEY`` silently choosing OpenAI is the commonest surprise (`env_key_hint`).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from typing import Any

import httpx

from ._errors import APIError, NBCompletionsError, RequestError
from ._secrets import Secret, redact_url

__all__ = [
    "EMBEDDED_BASE_URL",
    "EMBEDDED_MODEL",
    "OPENAI_BASE_URL",
    "Target",
    "check_embedded",
    "env_key_hint",
]

OPENAI_BASE_URL = "https://api.openai.com/v1"
EMBEDDED_BASE_URL = "http://embedded/v1"
EMBEDDED_MODEL = "nbc-shakespeare"


class _Endpoint:
    """One base URL. Credentials in it (``http://user:pw@host/v1``) are kept apart, as a Basic
    auth header: httpx logs each request's URL, and the URL must not carry them."""

    __slots__ = ("auth", "in_flight", "url")

    def __init__(self, url: str) -> None:
        parsed = httpx.URL(url)
        self.auth: Secret[str] | None = None
        if parsed.userinfo:
            pair = f"{parsed.username}:{parsed.password}".encode()
            self.auth = Secret("Basic " + base64.b64encode(pair).decode("ascii"))
            url = str(parsed.copy_with(username=None, password=None)).rstrip("/")
        self.url = url
        self.in_flight = 0

    def headers(self, headers: dict[str, str]) -> dict[str, str]:
        if self.auth is None:
            return headers
        return {**headers, "Authorization": self.auth.get()}


def _normalise_url(url: Any) -> str:
    if not isinstance(url, str | httpx.URL) or not str(url).strip():
        raise RequestError(
            "base_url",
            f"base_url must be a non-empty URL string; got {url!r}",
            allowed="a URL such as http://127.0.0.1:8000/v1",
            value=url,
        )
    text = str(url).strip().rstrip("/")
    if not re.match(r"^https?://", text):
        raise RequestError(
            "base_url",
            f"base_url must start with http:// or https://; got {text!r}",
            allowed="a URL such as http://127.0.0.1:8000/v1",
            value=text,
        )
    # Parsed now, as httpx parses it for every request: a URL it cannot read (a bad port, an
    # unclosed IPv6 bracket) is this field's error, not an exception from the first request.
    try:
        parsed = httpx.URL(text)
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise httpx.InvalidURL(f"port {parsed.port} is outside 1-65535")
        if not parsed.host:
            raise httpx.InvalidURL("no host")
    except httpx.InvalidURL as exc:
        raise RequestError(
            "base_url",
            f"base_url is not a usable URL ({exc}); got {text!r}",
            allowed="a URL such as http://127.0.0.1:8000/v1 (port 1-65535)",
            value=text,
        ) from None
    return text


def _embedded_transport() -> httpx.AsyncBaseTransport:
    hint = "Pass base_url=... (or set OPENAI_BASE_URL / OPENAI_API_KEY) to use another server."
    try:
        from .model import FILES_DIR
        from .server import StreamingASGITransport, create_app
    except ImportError as exc:
        raise NBCompletionsError(
            f"the embedded model is not available: importing its server failed ({exc}). {hint}"
        ) from exc
    weights = FILES_DIR / "model.safetensors"
    if not weights.exists():
        raise NBCompletionsError(f"the embedded model's weights are missing ({weights}). {hint}")
    # httpx.ASGITransport would hold a streamed body until the app finishes; this one streams.
    return StreamingASGITransport(create_app())


def check_embedded(
    embedded: object,
    *,
    base_url: object,
    api_key: object,
    transport: object,
) -> None:
    """Refuse an ``embedded`` that is not a bool or None, and ``embedded=True`` with an endpoint."""
    if embedded is not None and not isinstance(embedded, bool):
        raise RequestError(
            "embedded",
            f"embedded must be True, False or None; got {embedded!r}",
            allowed="True, False or None",
            value=embedded,
        )
    if not embedded:
        return
    given = [
        name
        for name, value in (("base_url", base_url), ("api_key", api_key), ("transport", transport))
        if value is not None
    ]
    if given:
        names = " and ".join(given)
        raise RequestError(
            given[0],
            f"embedded=True talks to the in-process embedded model, so it cannot be combined with "
            f"{names}; pass either embedded=True or {names}",
            allowed=f"embedded=True without {names}",
            value=given,  # the names only: an api_key must not reach an error
        )


def env_key_hint() -> str:
    """What to do when an exported ``OPENAI_API_KEY`` made a client target OpenAI."""
    return (
        "OPENAI_API_KEY is set in the environment, so a client given no base_url talks to OpenAI "
        f"({OPENAI_BASE_URL}); for the offline embedded model use Client(embedded=True) "
        "(or AsyncClient(embedded=True))"
    )


class Target:
    """Where a client's requests go (its endpoints, through which transport), which endpoint the
    next attempt takes, and where the choice came from, for the errors that name it.

    ``base_url`` and ``api_key`` are the values after the environment was read (``*_given``: they
    were arguments); ``embedded`` is the argument (None: embedded only when nothing else is set).
    Choosing the embedded model loads it, so a client checks its other settings first. A `Client`
    and the `AsyncClient` it wraps share one, with its in-flight counts.
    """

    __slots__ = ("_next", "embedded", "endpoints", "env_key_chose_openai", "origin", "transport")

    def __init__(
        self,
        base_url: str | Sequence[str] | None,
        api_key: str | None,
        transport: httpx.AsyncBaseTransport | None,
        embedded: bool | None,
        *,
        base_url_given: bool,
        api_key_given: bool,
    ) -> None:
        explicit = embedded is True
        if embedded is None:
            embedded = base_url is None and api_key is None and transport is None
        self.embedded = embedded
        self.env_key_chose_openai = False
        if embedded:
            transport = _embedded_transport()
            base_url = EMBEDDED_BASE_URL
            self.origin = "embedded=True" if explicit else "the embedded default (none set)"
        elif base_url is not None:
            self.origin = (
                "the base_url argument" if base_url_given else "OPENAI_BASE_URL in the environment"
            )
        else:
            base_url = OPENAI_BASE_URL
            self.origin = "the default (OpenAI)"
            self.env_key_chose_openai = api_key is not None and not api_key_given
        urls = [base_url] if isinstance(base_url, str | httpx.URL) else list(base_url)
        if not urls:
            raise RequestError(
                "base_url",
                "base_url must be a URL or a non-empty list of URLs; got []",
                allowed="a URL or a non-empty list of URLs",
                value=base_url,
            )
        self.endpoints = [_Endpoint(_normalise_url(u)) for u in urls]
        self.transport = transport
        self._next = 0

    def pick(self, avoid: _Endpoint | None = None) -> _Endpoint:
        """The endpoint for the next attempt: the least busy, not ``avoid`` (the one that just
        failed) where there is another, round robin among equals."""
        endpoints = self.endpoints
        if len(endpoints) == 1:
            return endpoints[0]
        start = self._next
        self._next = (start + 1) % len(endpoints)
        ordered = endpoints[start:] + endpoints[:start]
        candidates = [e for e in ordered if e is not avoid] or ordered
        return min(candidates, key=lambda e: e.in_flight)  # first minimum: round robin on ties

    def hint(self, endpoint: _Endpoint, status: int, error: APIError | None = None) -> str | None:
        """What to try after a connection error (status 0) or an HTTP error."""
        hints = []
        if status == 404:
            model_missing = error is not None and error.code == "model_not_found"
            if not model_missing and not httpx.URL(endpoint.url).path.endswith("/v1"):
                hints.append(
                    f"the base URL {redact_url(endpoint.url)} does not end in /v1 (from "
                    f"{self.origin}): did you mean {redact_url(endpoint.url)}/v1?"
                )
            else:
                hints.append(f"base URL from {self.origin}")
        if status in (0, 404) and self.env_key_chose_openai:
            hints.append(env_key_hint())
        return "; ".join(hints) or None

    def transport_error(
        self,
        exc: Exception,
        endpoint: _Endpoint,
        method: str,
        path: str,
        *,
        broken: bool = False,
    ) -> APIError:
        """The `APIError` for a request to ``endpoint`` that failed below HTTP (``broken``: a
        stream that broke after data arrived, which is not retried)."""
        url = f"{method} {redact_url(endpoint.url + path)}"
        if broken:
            message = (
                f"the stream from {url} broke after data arrived (not retried): "
                f"{type(exc).__name__}: {exc}"
            )
            return APIError(message, type="stream_broken", url=url)
        origin = f"base URL from {self.origin}"
        hint = self.hint(endpoint, 0)
        if isinstance(exc, httpx.TimeoutException):
            return APIError(
                f"request to {url} timed out ({type(exc).__name__}; {origin})",
                type="timeout",
                url=url,
                hint=hint,
            )
        return APIError(
            f"could not reach {url} ({origin}): {type(exc).__name__}: {exc}",
            type="connection_error",
            url=url,
            hint=hint,
        )
