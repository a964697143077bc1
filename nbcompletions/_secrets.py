"""Secrets and redaction: the one module that decides how a credential is held and hidden.

Everything that shows text a credential could reach (a client's repr, an exception, a log line, a
sweep's files, the cache, widget state) goes through here, so there is one rule to audit:

- `Secret` holds a credential so that ``repr``, ``str``, ``vars()`` and pickling never show it.
- `redact_url` hides the userinfo of a URL (``http://user:key@host`` -> ``http://***@host``).
- `redact_error` replaces every occurrence of the client's secrets in an `APIError`'s message and
  body (servers sometimes echo the key they rejected).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, Generic, TypeVar

from ._errors import APIError

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
