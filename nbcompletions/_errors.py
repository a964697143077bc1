"""Exceptions shared by every layer.

`RequestError` and `BudgetError` are ValueErrors: they describe bad input and are raised before
anything is sent. `APIError` is what a server answered with, normalised across OpenAI, vLLM and
llama.cpp.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

_T = TypeVar("_T")

__all__ = [
    "APIError",
    "BudgetError",
    "CacheError",
    "ConformanceError",
    "ConformanceWarning",
    "NBCompletionsError",
    "RequestError",
    "SweepError",
    "SweepWarning",
]


class NBCompletionsError(Exception):
    """Base class of every exception nbcompletions raises on purpose."""


class RequestError(NBCompletionsError, ValueError):
    """A request field is invalid.

    The message names the field, the allowed range and the value given, for example
    ``temperature must be a number from 0 to 2; got 3.5``. The same facts are kept as attributes so
    that the server can answer with an OpenAI error body whose ``param`` is the field.
    """

    def __init__(
        self, param: str | None, message: str, *, allowed: str | None = None, value: Any = None
    ) -> None:
        super().__init__(message)
        self.param = param
        self.message = message
        self.allowed = allowed
        self.value = value


class BudgetError(NBCompletionsError, ValueError):
    """A sweep's estimated token use exceeds the budget it was given."""

    def __init__(self, message: str, *, estimate: int, budget: int) -> None:
        super().__init__(message)
        self.estimate = estimate
        self.budget = budget


class APIError(NBCompletionsError):
    """The server answered with an error (or a stream carried an error event).

    Attributes follow OpenAI's error body: ``status`` (HTTP status, or None for an error event
    inside a stream), ``type``, ``param``, ``code`` (always a string or None, whatever the server
    sent) and ``message``. ``body`` keeps what the server sent, parsed where it was JSON.
    ``url`` is the request that failed (``POST http://host/v1/completions``, credentials redacted)
    and ``hint`` what to try, where the client could tell (a base URL without ``/v1``, a key in
    the environment that chose OpenAI); both are part of ``str(error)``.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
        url: str | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.url = url
        self.hint = hint
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.body = body
        self.headers = headers or {}

    def __str__(self) -> str:
        parts = []
        if self.status is not None:
            parts.append(f"HTTP {self.status}")
        if self.type:
            parts.append(self.type)
        if self.param:
            parts.append(f"param={self.param}")
        if self.code:
            parts.append(f"code={self.code}")
        head = " ".join(parts)
        text = f"{head}: {self.message}" if head else self.message
        # A connection error's message already names the URL it could not reach.
        if self.url and self.url.rsplit(" ", 1)[-1] not in text:
            text += f" [{self.url}]"
        if self.hint:
            text += f"; {self.hint}"
        return text

    def __repr__(self) -> str:
        return (
            f"APIError(status={self.status!r}, type={self.type!r}, param={self.param!r}, "
            f"code={self.code!r}, message={self.message!r})"
        )


class CacheError(NBCompletionsError):
    """A sweep cache file is damaged, holds a bad row, or cannot be opened.

    The message names the file (``path``), the row (``key``, where one row is at fault) and what to
    do about it.
    """

    def __init__(self, message: str, *, path: Any = None, key: str | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.key = key


class ConformanceError(NBCompletionsError):
    """The endpoint was measured not to do what a call needs (``check`` names the failed check of
    `Client.conformance()`, ``detail`` its evidence), so nbcompletions refuses rather than return
    wrong numbers."""

    def __init__(
        self, message: str, *, check: str | None = None, detail: str | None = None
    ) -> None:
        super().__init__(message)
        self.check = check
        self.detail = detail


class ConformanceWarning(UserWarning):
    """A result depends on something the endpoint was measured to do differently from OpenAI, and
    nbcompletions could neither correct it nor refuse it: the numbers may be off. Emitted once per
    endpoint and check; the result carries the check's name in its flags (``completion.flags``,
    frames' ``.attrs["conformance_flags"]``)."""


class SweepError(APIError):
    """A sweep stopped because its requests all failed the same way (a dead server, a wrong URL or
    key): sending the rest would fail too.

    ``first`` is the first failure (also ``__cause__``); ``status``, ``type``, ``code``, ``param``,
    ``url`` and ``hint`` are copied from it when it is an `APIError`. ``failed``, ``sent`` and
    ``total`` count requests; what finished before the stop is in the sweep's cache, so running the
    same call again once the endpoint answers sends only what is missing.
    """

    def __init__(
        self, message: str, *, first: BaseException, failed: int, sent: int, total: int
    ) -> None:
        if isinstance(first, APIError):
            super().__init__(
                message,
                status=first.status,
                type=first.type,
                param=first.param,
                code=first.code,
                body=first.body,
                headers=first.headers,
                url=first.url,
                hint=first.hint,
            )
        else:
            super().__init__(message, type=type(first).__name__)
        self.first = first
        self.failed = failed
        self.sent = sent
        self.total = total


class SweepWarning(UserWarning):
    """Some of a sweep's requests failed; their rows carry the error and the rest is usable."""


def answered_field(
    answer: Any, name: str, kind: type[_T], request: str, what: str, *, status: int | None = None
) -> _T:
    """``answer[name]`` where the server's JSON ``answer`` to ``request`` has it as a ``kind``;
    else an `APIError` (``invalid_response``) naming ``what`` was missing and showing the start of
    what came instead."""
    value = answer.get(name) if isinstance(answer, Mapping) else None
    if not isinstance(value, kind):
        raise APIError(
            f"{request} answered without {what}: {str(answer)[:200]}",
            status=status,
            type="invalid_response",
            body=answer,
        )
    return value
