"""Secrets and redaction: the one module that decides how a credential is held and hidden.

Everything that shows text a credential could reach (a client's repr, an exception, a log line, a
sweep's files, the cache, widget state) goes through here, so there is one rule to audit:

- `Secret` holds a credential so that ``repr``, ``str``, ``vars()`` and pickling never show it.
- `redact_url` hides the userinfo of a URL (``http://user:key@host`` -> ``http://***@host``).
- `redact_error` replaces every occurrence of the client's secrets in an `APIError`'s message and
  body (servers sometimes echo the key they rejected).
- `check_api_key` refuses a key that an HTTP header cannot carry, without showing it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from ._errors import APIError, RequestError

MASK = "***"

T = TypeVar("T")

_USERINFO = re.compile(r"//[^/@]*@")


class Secret(Generic[T]):
    """Holds a credential so that repr, str, vars() and pickling do not show it."""

    __slots__ = ("_value",)

    def __init__(self, value: T) -> None:
        self._value = value

    def get(self) -> T:
        return self._value

    def __repr__(self) -> str:
        return f"'{MASK}'"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("nbcompletions does not pickle API keys or auth headers")


def check_api_key(value: str) -> None:
    """Raise `RequestError` (param ``api_key``) unless ``value`` is printable ASCII.

    A header is sent as bytes: httpx refuses non-ASCII text (UnicodeEncodeError quoting the key, on
    every call), and a server may decode it as latin-1 and compare it with the UTF-8 bytes of its
    own key, so such a key could never authenticate. Neither the message nor the error's ``value``
    shows the key.
    """
    bad = sum(1 for ch in value if not " " <= ch <= "~")
    if bad:
        raise RequestError(
            "api_key",
            f"api_key must be printable ASCII text (an HTTP header cannot carry anything else "
            f"faithfully); the key given holds {bad} other character{'s' if bad > 1 else ''} "
            f"(not shown)",
            allowed="printable ASCII characters",
        )


def redact_url(url: str) -> str:
    """The URL with any ``user:password@`` part replaced by ``***@``."""
    return _USERINFO.sub(f"//{MASK}@", url)


def redact_text(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every non-empty secret replaced by the mask."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text


def redact_error(error: APIError, secrets: Iterable[str | None]) -> APIError:
    """Remove the secrets from an error's message and body, in place; returns the error."""
    present = [s for s in secrets if s]
    if not present:
        return error
    body_text = json.dumps(error.body)
    if any(s in error.message or s in body_text for s in present):
        error.message = redact_text(error.message, present)
        error.args = (error.message,)
        error.body = json.loads(redact_text(body_text, present))
    return error
