"""The one reader of a response's ``usage``: token counts as the server sent them.

Live sweeps, Batch sweeps, the cache and the frames count tokens the same way: a count is an
integer >= 0 by the package's integer rule (`nbcompletions._checks.is_int`); anything else
(``true``, ``1.5``, ``"3"``, a negative number) is not one and counts as missing, not as a token.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._checks import is_int

__all__ = ["USAGE_FIELDS", "add_usage", "token_counts"]

#: The counts a completion's ``usage`` carries.
USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


def token_counts(response: Any) -> dict[str, int]:
    """The counts ``response["usage"]`` holds as integers >= 0, by field name (missing ones left
    out): ``{"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11}``."""
    usage = response.get("usage") if isinstance(response, Mapping) else None
    if not isinstance(usage, Mapping):
        return {}
    counts = {}
    for name in USAGE_FIELDS:
        value = usage.get(name)
        if is_int(value) and value >= 0:
            counts[name] = int(value)
    return counts


def add_usage(totals: dict[str, int], response: Any) -> None:
    """Add ``response``'s token counts to ``totals`` (the fields ``totals`` holds)."""
    for name, value in token_counts(response).items():
        if name in totals:
            totals[name] += value
