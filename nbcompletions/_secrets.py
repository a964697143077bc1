"""Secrets and redaction: the one module that decides how a credential is held and hidden.

Everything that shows text a credential could reach (a client's repr, an exception, a log line, a
sweep's files, the cache, widget state) goes through here, so there is one rule to audit:

- `Secret` holds a credential so that ``repr``, ``str``, ``vars()`` and pickling never show it.
- `redact_url` hides the userinfo of a URL (``http://user:key@host`` -> ``http://***@host``).
- `redact_text` / `redact_value` / `redact_error` mask the client's secrets in text, in JSON-like
  values and in every field of an `APIError` (servers sometimes echo the key they rejected, even
  escaped, percent-encoded, in fullwidth letters or in headers). `redact_exception_text` is what
  sweeps write into their ``error`` column; `secrets_of` asks a client for what to mask.
- `check_api_key` refuses a key that an HTTP header cannot carry, without showing it.
- `SecretLogFilter` (`LOG_REDACTION`) masks every live `Secret` in the log records of httpx and
  httpcore: at DEBUG, httpcore logs response headers, and a server may echo the key in one.
"""

from __future__ import annotations

import html
import logging
import re
import unicodedata
import urllib.parse
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

from ._errors import APIError, RequestError

MASK = "***"

T = TypeVar("T")

_USERINFO = re.compile(r"//[^/@]*@")


class Secret(Generic[T]):
    """Holds a credential so that repr, str, vars() and pickling do not show it.

    While it lives, httpx's and httpcore's own log records mask it (`SecretLogFilter`): a client
    holds its key in a Secret, so making the client installs the filter.
    """

    __slots__ = ("__weakref__", "_value")

    def __init__(self, value: T) -> None:
        self._value = value
        if _secret_strings(value):
            LOG_REDACTION.watch(self)

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


# Ways a server can spell a key it echoes: JSON \uXXXX / \xXX escapes, percent-encoding (a URL
# or form echoed back), HTML character references, and compatibility forms (fullwidth letters),
# which NFKC folds back to ASCII.
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|\\/")


def _unescape(text: str) -> str:
    def one(match: re.Match[str]) -> str:
        digits = match.group(1) or match.group(2)
        return chr(int(digits, 16)) if digits else "/"

    return _ESCAPE.sub(one, text)


def _decodings(text: str) -> list[str]:
    views = []
    if "\\" in text:
        views.append(_unescape(text))
    if "%" in text:
        views.append(
            urllib.parse.unquote_plus(text) if "+" not in text else urllib.parse.unquote(text)
        )
    if "&" in text:
        views.append(html.unescape(text))
    if not text.isascii():
        views.append(unicodedata.normalize("NFKC", text))
    return views


def redact_text(text: str, secrets: Iterable[str | None]) -> str:
    """`text` with every non-empty secret replaced by the mask, in any spelling of it.

    Besides the secret itself this finds it JSON-escaped, percent-encoded, as HTML character
    references and in compatibility forms (fullwidth letters), however they are nested; where an
    encoded form is found, the text is returned decoded with the secret masked (it is an error
    message: readable beats byte-exact).
    """
    present = [s for s in secrets if s]
    if not present:
        return text
    for _ in range(4):  # nesting depth: a key JSON-escaped inside a URL-encoded one, say
        for secret in present:
            text = text.replace(secret, MASK)
        decoded = next(
            (v for v in _decodings(text) if v != text and any(s in v for s in present)), None
        )
        if decoded is None:
            return text
        text = decoded
    for secret in present:
        text = text.replace(secret, MASK)
    return text


def redact_value(value: Any, secrets: Iterable[str | None]) -> Any:
    """A copy of JSON-like ``value`` (dicts, lists, strings, numbers) with secrets masked in every
    string, dict keys included."""
    present = [s for s in secrets if s]
    if not present:
        return value
    if isinstance(value, str):
        return redact_text(value, present)
    if isinstance(value, Mapping):
        return {
            (redact_text(k, present) if isinstance(k, str) else k): redact_value(v, present)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return type(value)(redact_value(v, present) for v in value)
    return value


def redact_error(error: APIError, secrets: Iterable[str | None]) -> APIError:
    """Remove the secrets from every field of an error, in place; returns the error.

    Message, type, param, code, body (recursively, keys and values) and headers (names and values)
    all pass through `redact_text`, so ``str(e)``, ``repr(e)``, ``e.body`` and ``e.headers`` never
    show a key the server echoed, in whatever spelling.
    """
    present = [s for s in secrets if s]
    if not present:
        return error
    error.message = redact_text(error.message, present)
    error.args = (error.message,)
    for name in ("type", "param", "code"):
        value = getattr(error, name)
        if isinstance(value, str):
            setattr(error, name, redact_text(value, present))
    error.body = redact_value(error.body, present)
    error.headers = {
        redact_text(k, present): redact_text(v, present) for k, v in error.headers.items()
    }
    return error


def redact_exception_text(exc: BaseException, secrets: Iterable[str | None]) -> str:
    """``str(exc)`` with the secrets masked (an `APIError` is redacted in place first)."""
    if isinstance(exc, APIError):
        redact_error(exc, secrets)
    return redact_text(str(exc), secrets)


def secrets_of(client: Any) -> list[str]:
    """The credentials a client holds (its API key), for redacting what it reports; [] if none.

    Clients expose them only through the private ``_secret_values()``, so nothing public returns
    a key.
    """
    get = getattr(client, "_secret_values", None)
    if not callable(get):
        return []
    return [s for s in get() if isinstance(s, str) and s]


#: The loggers of the HTTP stack the client uses (a logger's filter sees only its own records,
#: not those of its children, so each is named).
HTTP_LOGGERS = (
    "httpx",
    "httpcore",
    "httpcore.connection",
    "httpcore.http11",
    "httpcore.http2",
    "httpcore.proxy",
    "httpcore.socks",
    # The network transport (`nbcompletions._transport`) is aiohttp's; its client logs little, but
    # what it logs is watched all the same.
    "aiohttp",
    "aiohttp.client",
    "aiohttp.internal",
)
#: Header names whose values a `Secret` of headers holds as credentials.
_CREDENTIAL_HEADER = re.compile(r"auth|key|token|secret|cookie|signature", re.IGNORECASE)


def _secret_strings(value: Any) -> list[str]:
    """The credentials in what a `Secret` holds: a string, or the credential headers of a
    mapping of headers."""
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, Mapping):
        return [
            v
            for k, v in value.items()
            if isinstance(k, str) and isinstance(v, str) and v and _CREDENTIAL_HEADER.search(k)
        ]
    return []


class SecretLogFilter(logging.Filter):
    """Masks the credentials of every live `Secret` in a log record's message (any spelling that
    `redact_text` finds); records without one pass untouched. Installed on `HTTP_LOGGERS` when
    the first Secret is made; costs nothing while those loggers are not enabled."""

    def __init__(self) -> None:
        super().__init__("nbcompletions.secrets")
        self._secrets: weakref.WeakSet[Secret[Any]] = weakref.WeakSet()
        self._installed = False

    def watch(self, secret: Secret[Any]) -> None:
        self._secrets.add(secret)
        if not self._installed:
            self._installed = True
            for name in HTTP_LOGGERS:
                logging.getLogger(name).addFilter(self)

    def secrets(self) -> list[str]:
        return [text for secret in list(self._secrets) for text in _secret_strings(secret.get())]

    def filter(self, record: logging.LogRecord) -> bool:
        secrets = self.secrets()
        if not secrets:
            return True
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: logging reports it itself
            return True
        masked = redact_text(message, secrets)
        if masked != message:
            record.msg, record.args = masked, None
        return True


LOG_REDACTION = SecretLogFilter()
