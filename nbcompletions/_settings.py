"""A client's settings, checked before anything is sent or loaded: one `_Settings` object that a
`Client` and the `AsyncClient` it wraps share (the endpoint, the key, the model, limits, timeouts,
retries and headers)."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._endpoint import EMBEDDED_MODEL, Target, check_embedded
from ._errors import RequestError
from ._profiles import ServerProfile, get_profile
from ._request import Limits, check_optional_count
from ._secrets import Secret, check_api_key
from ._version import __version__

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "TRUSTED_HOSTS",
    "USER_AGENT",
    "_Settings",
    "check_limits",
    "check_model",
    "check_retries",
    "check_verify",
    "in_process_transport",
    "make_timeout",
    "measures_by_default",
]

DEFAULT_TIMEOUT = 600.0
DEFAULT_CONNECT_TIMEOUT = 5.0

USER_AGENT = f"nbcompletions/{__version__}"


def make_timeout(timeout: Any) -> httpx.Timeout:
    if isinstance(timeout, httpx.Timeout):
        return timeout
    if timeout is None:
        return httpx.Timeout(None, connect=DEFAULT_CONNECT_TIMEOUT)
    if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
        return httpx.Timeout(float(timeout), connect=min(DEFAULT_CONNECT_TIMEOUT, float(timeout)))
    raise RequestError(
        "timeout",
        f"timeout must be a number of seconds > 0, None or an httpx.Timeout; got {timeout!r}",
        allowed="seconds > 0",
        value=timeout,
    )


def check_model(model: object) -> str | None:
    if model is not None and (not isinstance(model, str) or not model):
        raise RequestError(
            "model",
            f"model must be a non-empty string or None; got {model!r}",
            allowed="a non-empty string or None",
            value=model,
        )
    return model


def check_retries(max_retries: object) -> int:
    if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
        raise RequestError(
            "max_retries",
            f"max_retries must be an integer >= 0; got {max_retries!r}",
            allowed="an integer >= 0",
            value=max_retries,
        )
    return max_retries


def check_limits(limits: object) -> Limits:
    if not isinstance(limits, Limits):
        raise RequestError(
            "limits",
            f"limits must be an nbcompletions.Limits; got {limits!r}",
            allowed="Limits(), Limits.vllm(), Limits.llamacpp()",
            value=limits,
        )
    return limits


class _Settings:
    """Everything a client was configured with. A `Client` and the `AsyncClient` it wraps hold the
    same object, so a change made through either is seen by both."""

    __slots__ = (
        "headers",
        "key",
        "limits",
        "max_concurrency",
        "max_retries",
        "measures",
        "model",
        "profile",
        "target",
        "timeout",
        "verify",
        "vocab_size",
    )

    def __init__(
        self,
        base_url: str | Sequence[str] | None,
        api_key: str | None,
        *,
        model: str | None,
        timeout: float | httpx.Timeout | None,
        max_retries: int,
        transport: httpx.AsyncBaseTransport | None,
        max_concurrency: int | None,
        limits: Limits | None,
        headers: Mapping[str, str] | None,
        vocab_size: int | None,
        profile: str | ServerProfile | None = None,
        embedded: bool | None = None,
        verify: bool | None = None,
    ) -> None:
        check_embedded(embedded, base_url=base_url, api_key=api_key, transport=transport)
        self.profile = get_profile(profile)
        self.verify = check_verify(verify)
        if limits is None and self.profile is not None:
            limits = self.profile.limits
        base_url_given, api_key_given = base_url is not None, api_key is not None
        if base_url is None and not embedded:
            base_url = os.environ.get("OPENAI_BASE_URL") or None
        if api_key is None and not embedded:
            api_key = os.environ.get("OPENAI_API_KEY") or None
        if api_key is not None and not isinstance(api_key, str):
            raise RequestError(
                "api_key",
                "api_key must be a string",
                allowed="a string",
                value=type(api_key).__name__,
            )
        if api_key is not None:
            check_api_key(api_key)
        self.model = check_model(model)
        self.max_retries = check_retries(max_retries)
        self.max_concurrency = check_optional_count("max_concurrency", max_concurrency)
        self.vocab_size = check_optional_count("vocab_size", vocab_size)
        self.limits = Limits() if limits is None else check_limits(limits)
        self.timeout = make_timeout(timeout)
        # Settings are checked first, so a mistake is reported before the embedded model loads.
        self.target = Target(
            base_url,
            api_key,
            transport,
            embedded,
            base_url_given=base_url_given,
            api_key_given=api_key_given,
        )
        if self.target.embedded and self.model is None:
            self.model = EMBEDDED_MODEL
        request_headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        request_headers.update(headers or {})
        if api_key:
            request_headers["Authorization"] = f"Bearer {api_key}"
        self.headers = Secret(request_headers)
        self.key = Secret(api_key)
        self.measures = measures_by_default(self.target) if verify is None else verify


#: Hosts whose behaviour is the reference the conformance checks compare with: not measured unless
#: ``verify=True`` (probing them costs money and tells nothing new).
TRUSTED_HOSTS = frozenset({"api.openai.com"})


def check_verify(verify: object) -> bool | None:
    """``verify``: True measures the endpoint's conformance when a request depends on it, False
    sends every request as it is (`nbcompletions._governance`), None decides from the endpoint
    (`measures_by_default`)."""
    if verify is not None and not isinstance(verify, bool):
        raise RequestError(
            "verify",
            f"verify must be True, False or None (decide from the endpoint); got {verify!r}",
            allowed="True, False or None",
            value=verify,
        )
    return verify


def in_process_transport(transport: object) -> bool:
    """A transport given to the constructor that is not one of the network transports (httpx's
    own, httpx_aiohttp's, or subclasses): an in-process app (ASGI) or a test double, with no
    server of unknown make behind it."""
    if transport is None or isinstance(transport, httpx.AsyncHTTPTransport):
        return False
    # Not imported here for this check: a transport of a module not yet imported is none of its.
    aiohttp_transport = getattr(sys.modules.get("httpx_aiohttp"), "AiohttpTransport", None)
    return aiohttp_transport is None or not isinstance(transport, aiohttp_transport)


def measures_by_default(target: Target) -> bool:
    """Not for the embedded model, a client with an injected transport (an in-process app or a
    test double) or a `TRUSTED_HOSTS` endpoint; yes for every other endpoint. A report measured
    on request (``client.conformance()``) governs their requests all the same."""
    if target.embedded or in_process_transport(target.transport):
        return False
    hosts = {urlsplit(e.url).hostname or "" for e in target.endpoints}
    return not hosts <= TRUSTED_HOSTS
