"""How the client treats failures: which ones to retry, how long to wait, and what error to raise.

The rules match the official ``openai`` SDK (see COMPAT.md): connection errors, timeouts, 408, 409,
429 and >= 500 are retried (``x-should-retry: true|false`` overrides the status rule); the wait is
``retry-after-ms``, else ``retry-after`` (seconds or an HTTP date) when it is between 0 and 60 s,
else ``min(0.5 * 2**k, 8)`` seconds less up to 25 % jitter. Error bodies from OpenAI, vLLM (integer
``code``, and its old flat shape), llama.cpp and plain-text or HTML proxies all become `APIError`.
"""

from __future__ import annotations

import asyncio
import email.utils
import html
import json
import math
import random
import re
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ._errors import APIError
from ._parse import sorted_choices
from ._secrets import redact_error, redact_exception_text

__all__ = [
    "api_error",
    "completion_error",
    "error_fields",
    "error_from_body",
    "is_validation_error",
    "parse_retry_after",
    "retry_delay",
    "should_retry",
    "sleep",
    "text_message",
]

INITIAL_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 8.0
MAX_RETRY_AFTER = 60.0
RETRY_STATUSES = frozenset({408, 409, 429})

#: What the client awaits between attempts; tests replace it to run instantly and record delays.
sleep = asyncio.sleep


def should_retry(status: int, headers: Mapping[str, str], error: APIError | None = None) -> bool:
    """Whether a response with this status is worth another attempt.

    A 500 whose body says the request was invalid (llama.cpp answers its validation errors so)
    would fail the same way again: it is not retried.
    """
    override = headers.get("x-should-retry")
    if override == "true":
        return True
    if override == "false":
        return False
    if status == 500 and error is not None and is_validation_error(error.message, error.body):
        return False
    return status in RETRY_STATUSES or status >= 500


# What a request-validation failure says when a server wraps it as a 500: pydantic v2 and v1
# messages ("1 validation error for ...", "Input should be ...", "field required"), FastAPI's
# error list ("'loc': ('body', ...)"), and Python assertions on the request (llama.cpp's
# "assert len(body.prompt) <= 1" is a 500 whose message is empty).
_VALIDATION = re.compile(
    r"validation errors? |Input should be |Field required|field required|value is not a valid"
    r"|['\"]loc['\"]\s*:|AssertionError",
)


def is_validation_error(message: str | None, body: Any = None) -> bool:
    """Whether an error body says the request itself was invalid (so retrying cannot help).

    Only JSON error objects count: an empty message in ``{"error": {"message": ""}}`` is a failed
    assertion on the request (llama.cpp), while an empty or HTML proxy page is not.
    """
    if not isinstance(body, Mapping) or not isinstance(body.get("error"), Mapping):
        return False
    raw = body["error"].get("message")
    if isinstance(raw, str) and not raw.strip():
        return True
    return bool(message and _VALIDATION.search(message))


def parse_retry_after(
    headers: Mapping[str, str] | None, *, now: float | None = None
) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, then ``retry-after``), or None."""
    if not headers:
        return None
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            continue
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(value)
        if parsed is None:
            return None
        moment = email.utils.mktime_tz(parsed)
    except (TypeError, ValueError, OverflowError):
        return None
    return float(moment - (time.time() if now is None else now))


def retry_delay(
    retries_done: int, headers: Mapping[str, str] | None = None, *, rand: float | None = None
) -> float:
    """Seconds to wait before retry number ``retries_done + 1``."""
    asked = parse_retry_after(headers)
    if asked is not None and math.isfinite(asked) and 0 < asked <= MAX_RETRY_AFTER:
        return asked
    base = min(INITIAL_RETRY_DELAY * 2.0 ** min(retries_done, 1000), MAX_RETRY_DELAY)
    jitter = 1 - 0.25 * (random.random() if rand is None else rand)
    return max(base * jitter, 0.0)


_TAG = re.compile(r"<(script|style)\b.*?</\1\s*>|<[^>]+>", re.IGNORECASE | re.DOTALL)
_SPACE = re.compile(r"\s+")
_MAX_TEXT = 500


def text_message(text: str) -> str:
    """An error body's text as a message: the words of an HTML page (a 502 from nginx) without
    its markup, whitespace collapsed, at most 500 characters."""
    if "<" in text and ">" in text:
        text = html.unescape(_TAG.sub(" ", text))
    text = _SPACE.sub(" ", text).strip()
    return text if len(text) <= _MAX_TEXT else text[:_MAX_TEXT] + "..."


def _str_or_none(value: Any) -> str | None:
    if value is None:
        return None
    return value if isinstance(value, str) else str(value)


def error_from_body(
    body: Any,
    *,
    status: int | None = None,
    text: str | None = None,
    headers: Mapping[str, str] | None = None,
    default_message: str = "the server returned an error",
) -> APIError:
    """Normalise any error body (already parsed JSON, or None with ``text``) into an `APIError`."""
    fields: Mapping[str, Any] | None = None
    message: str | None = None
    if isinstance(body, Mapping):
        error = body.get("error")
        if isinstance(error, Mapping):  # OpenAI, vLLM, llama.cpp
            fields = error
        elif isinstance(error, str):  # {"error": "text"} (several proxies)
            message = error
            fields = body
        elif body.get("object") == "error" or "message" in body:  # old flat vLLM
            fields = body
        elif "detail" in body:  # FastAPI-style servers
            detail = body["detail"]
            message = detail if isinstance(detail, str) else json.dumps(detail)
    if fields is not None:
        if message is None:
            raw_message = fields.get("message")
            message = raw_message if isinstance(raw_message, str) else _str_or_none(raw_message)
        error_type = _str_or_none(fields.get("type"))
        param = _str_or_none(fields.get("param"))
        code = _str_or_none(fields.get("code"))
    else:
        error_type = param = code = None
    if not message:
        message = text_message(text) if text else None
    if not message:
        if body is not None and not isinstance(body, Mapping):
            message = text_message(json.dumps(body))
        else:
            message = default_message
    return APIError(
        message,
        status=status,
        type=error_type,
        param=param,
        code=code,
        body=body if body is not None else text,
        headers=dict(headers or {}),
    )


def completion_error(body: Any, *, status: int = 200) -> APIError | None:
    """Why a successful answer to a completion request is not a completion (an `APIError`), or
    None when it is one. The live client and Batch output lines decide with this, so a body
    counts as an error row the same way on both paths.

    Not a completion: JSON that is not an object; an error body sent with a 2xx status (some
    proxies do); an object without one usable choice (``{}``, ``{"choices": "x"}``).
    """
    if not isinstance(body, dict):
        return APIError(
            f"the server answered with JSON that is not an object: {str(body)[:200]}",
            status=status,
            type="invalid_response",
            body=body,
        )
    if "choices" not in body and ("error" in body or body.get("object") == "error"):
        return error_from_body(body, status=status)
    if not sorted_choices(body):
        return APIError(
            "the server answered without a usable choice (choices must be a list of objects): "
            f"{json.dumps(body)[:200]}",
            status=status,
            type="invalid_response",
            body=body,
        )
    return None


def error_fields(exc: BaseException, secrets: Iterable[str | None] = ()) -> dict[str, Any]:
    """A failed request as a sweep's error columns (``error_type``, ``error_status``,
    ``error_message``), with ``secrets`` redacted from the message."""
    if isinstance(exc, APIError):
        exc = redact_error(exc, secrets)
        kind = exc.type or exc.code or type(exc).__name__
        return {"error_type": kind, "error_status": exc.status, "error_message": exc.message}
    message = redact_exception_text(exc, secrets)
    return {"error_type": type(exc).__name__, "error_status": None, "error_message": message}


def api_error(
    status: int, content: bytes, headers: Mapping[str, str], reason: str = ""
) -> APIError:
    """The `APIError` for an HTTP error response."""
    text = content.decode("utf-8", errors="replace")
    body: Any = None
    try:
        body = json.loads(text) if text.strip() else None
    except ValueError:
        body = None
    return error_from_body(
        body,
        status=status,
        text=text,
        headers=headers,
        default_message=reason or "the server returned an error",
    )
