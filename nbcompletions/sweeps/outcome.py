"""What became of one request of a sweep, and how its ``usage`` is read.

Every stage reads tokens through `usage_counts`, the package's one reader (`nbcompletions._usage`),
so live and batch sweeps, the requests frame and the cache-hit tally count the same way: a count is
a non-negative integer, never a bool (``True`` is not 1 token) and never a float or a string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .._errors import APIError
from .._parse import loads
from .._secrets import redact_exception_text
from .._usage import USAGE_FIELDS, usage_counts

if TYPE_CHECKING:  # pragma: no cover
    from .._cache import CachedResponse

__all__ = [
    "TOKEN_FIELDS",
    "Outcome",
    "Tally",
    "error_fields",
    "usable_response",
]

#: The usage fields a sweep adds up (``result.usage``) and keeps per request (``requests``).
TOKEN_FIELDS = USAGE_FIELDS


def error_fields(exc: BaseException, secrets: list[str]) -> dict[str, Any]:
    """An error row's error_type, error_status and error_message, with secrets redacted."""
    # Redacted again here whatever the client did: a client of another kind, or an error raised
    # outside its request path, may still carry a key the server echoed.
    message = redact_exception_text(exc, secrets)
    if isinstance(exc, APIError):
        kind = exc.type or exc.code or type(exc).__name__
        return {"error_type": kind, "error_status": exc.status, "error_message": exc.message}
    return {"error_type": type(exc).__name__, "error_status": None, "error_message": message}


def usable_response(raw: Any) -> dict[str, Any]:
    """``raw`` when it holds at least one choice object; else APIError ``invalid_response``:
    a 200 without choices is no answer, and storing it would serve nothing forever."""
    choices = raw.get("choices") if isinstance(raw, Mapping) else None
    if (
        isinstance(raw, dict)
        and isinstance(choices, list)
        and any(isinstance(choice, Mapping) for choice in choices)
    ):
        return raw
    if isinstance(raw, Mapping) and raw.get("error") is not None:
        shown = f"an error in the body: {str(raw['error'])[:200]}"
    elif isinstance(raw, Mapping) and "choices" in raw:
        shown = f"choices={str(choices)[:100]}"
    else:
        shown = "no 'choices'"
    raise APIError(
        f"the server answered 200 with no usable choices ({shown}): no completion to record",
        status=200,
        type="invalid_response",
        body=raw,
    )


@dataclass
class Outcome:
    """One grid point's result: a response received now (``response``, or ``body``: its bytes,
    parsed only when frames need it), a cache hit (``entry``, its JSON parsed only when frames
    need it) or an error (``error``: error_type, error_status, error_message)."""

    response: dict[str, Any] | None = None
    latency: float | None = None
    cached: bool = False
    error: dict[str, Any] | None = None
    entry: CachedResponse | None = None
    #: A received answer kept as its bytes (see `received`), with its ``usage`` and ``id``.
    body: bytes | None = None
    body_usage: Any = None
    body_id: Any = None
    #: `usage`, read once: the tally and the requests frame both want it.
    _usage: dict[str, int | None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def hit(cls, entry: CachedResponse) -> Outcome:
        """The outcome of a request answered from the cache."""
        return cls(latency=entry.latency, cached=True, entry=entry)

    @classmethod
    def received(cls, raw: dict[str, Any], latency: float, body: bytes | None) -> Outcome:
        """The outcome of an answer received now: kept as ``body`` (its bytes as received, which
        parse to ``raw``) where there are any, else as ``raw``. A parsed chat answer holds ~100
        objects the garbage collector tracks (each token's ``bytes`` list, each alternative),
        and a sweep keeps every answer until its frames are built: kept parsed, every full
        collection walks them all, and a 2,000-request chat sweep spent ~0.3 s more in them."""
        if body is None:
            return cls(response=raw, latency=latency)
        return cls(latency=latency, body=body, body_usage=raw.get("usage"), body_id=raw.get("id"))

    def copy(self) -> Outcome:
        """The same outcome for another grid point that sends the same request."""
        return Outcome(
            self.response,
            self.latency,
            self.cached,
            self.error,
            self.entry,
            self.body,
            self.body_usage,
            self.body_id,
            self._usage,
        )

    @property
    def raw(self) -> dict[str, Any] | None:
        """The answer, parsed (again, on each access, where it is kept as its ``body``)."""
        if self.response is None and self.body is not None:
            parsed: dict[str, Any] = loads(self.body)
            return parsed
        if self.response is None and self.entry is not None:
            return self.entry.response
        return self.response

    @property
    def usage(self) -> dict[str, int | None]:
        """The token counts (`usage_counts`); read once, the same dict every time."""
        if self._usage is None:
            if self.response is None and self.body is not None:
                self._usage = usage_counts(self.body_usage)
            elif self.entry is not None and self.response is None:
                self._usage = usage_counts(self.entry.usage)
            else:
                self._usage = usage_counts((self.response or {}).get("usage"))
        return self._usage

    @property
    def response_id(self) -> Any:
        if self.response is None and self.body is not None:
            return self.body_id
        if self.entry is not None and self.response is None:
            return self.entry.response_id
        return (self.response or {}).get("id")


@dataclass
class Tally:
    """What one run sent: requests, failures, tokens spent (through `usage_counts`), and grid points
    whose answer is now in the cache (for the interrupt message)."""

    sent: int = 0
    failed: int = 0
    saved: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    #: Checks of the endpoint's report that answers were flagged with (`nbcompletions._governance`).
    flags: set[str] = field(default_factory=set)

    def spend(self, usage: Mapping[str, int | None]) -> None:
        """Add a response's token counts (`Outcome.usage`) to the tokens spent."""
        self.prompt_tokens += usage["prompt_tokens"] or 0
        self.completion_tokens += usage["completion_tokens"] or 0
        self.total_tokens += usage["total_tokens"] or 0

    def spent(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in TOKEN_FIELDS}
