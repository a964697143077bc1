"""The one reader of a response's ``usage``: token counts as the server sent them.

Live sweeps, Batch sweeps, the cache and the frames count tokens the same way: a count is an
integer >= 0 by the package's integer rule (`nbcompletions._checks.is_int`); anything else
(``true``, ``1.5``, ``"3"``, a negative number) is not one and counts as missing, not as a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._checks import is_int

__all__ = ["USAGE_FIELDS", "add_usage", "token_counts", "usage_counts"]

#: The counts a completion's ``usage`` carries.
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def _count(value: Any) -> int | None:
    if type(value) is int:  # the usual case, without the general check
        return value if value >= 0 else None
    return int(value) if is_int(value) and value >= 0 else None


def usage_counts(usage: Any) -> dict[str, int | None]:
    """The counts of a ``usage`` object, every field named: an integer >= 0, else None (absent,
    or not a count): ``{"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": None}``."""
    if type(usage) is not dict and not isinstance(usage, Mapping):
        return dict.fromkeys(USAGE_FIELDS)
    get = usage.get
    return {name: _count(get(name)) for name in USAGE_FIELDS}


def token_counts(response: Any) -> dict[str, int]:
    """The counts ``response["usage"]`` holds as integers >= 0, by field name (missing ones left
    out): ``{"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}``."""
    usage = response.get("usage") if isinstance(response, Mapping) else None
    return {name: value for name, value in usage_counts(usage).items() if value is not None}


def add_usage(totals: dict[str, int], response: Any) -> None:
    """Add ``response``'s token counts to ``totals`` (the fields ``totals`` holds)."""
    for name, value in token_counts(response).items():
        if name in totals:
            totals[name] += value
