"""Value checks every layer shares: what counts as an integer, what as a number, and the error a
bad value raises.

One rule, used by requests, frames, scoring, endpoint checks and the embedded model alike:

- An integer is a Python ``int`` or a numpy integer (``np.int64(5)`` from a grid or a frame).
  ``True``/``False`` are not integers here, though Python counts them as such: ``n=True`` is a
  mistake, not ``n=1``.
- A number is an integer or a float (numpy's included), never a bool.
- A value read from a response (a logprob, say) is a finite number or ``None``: NaN and the
  infinities read as ``None`` (unknown). JSON has no infinities; a server that writes
  ``-Infinity`` anyway is not telling a probability of zero we could trust (vLLM writes the
  finite -9999), and a report holding one could not be written back as JSON.
- Checks hand back the value as a plain ``int``/``float``, so numpy scalars never reach JSON.
"""

from __future__ import annotations

import math
from typing import Any, TypeGuard

import numpy as np

from ._errors import RequestError

__all__ = [
    "check_int",
    "check_number",
    "check_optional_count",
    "finite_float",
    "invalid",
    "is_int",
    "is_number",
    "positive_int",
    "shown",
]

#: Longest repr of a given value quoted in an error message: a 600 KB prompt must not come back
#: as a 600 KB error (servers echo these messages to every client).
SHOWN_CHARS = 200


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, shortened to about ``limit`` characters, saying how long it was."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}...{text[-20:]} (shortened: {len(text):,} characters in all)"


#: The types `is_int` and `is_number` accept (and their subclasses but bool); a tuple built once
#: (an ``int | np.integer`` union was built anew on every call, and these run per token count).
_INTEGERS = (int, np.integer)
_NUMBERS = (int, float, np.integer, np.floating)


def is_int(value: Any) -> TypeGuard[int]:
    """An ``int`` or a numpy integer; never a bool."""
    return type(value) is int or (isinstance(value, _INTEGERS) and not isinstance(value, bool))


def is_number(value: Any) -> bool:
    """An integer or a float (Python's or numpy's); never a bool. NaN and inf are numbers here:
    range checks refuse them (`check_number`), readers drop them (`finite_float`)."""
    kind = type(value)
    if kind is int or kind is float:
        return True
    return isinstance(value, _NUMBERS) and not isinstance(value, bool)


def finite_float(value: Any) -> float | None:
    """A number read from a response as a ``float``; ``None`` for anything else, NaN and the
    infinities included (see the module docstring)."""
    if not is_number(value):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer beyond float's range
        return None
    return number if math.isfinite(number) else None


def positive_int(value: Any) -> int | None:
    """An integer > 0 read from a response (a context length, a vocabulary size) as an ``int``;
    ``None`` for anything else."""
    return int(value) if is_int(value) and value > 0 else None


def invalid(field: str, allowed: str, value: Any) -> RequestError:
    """The error for a bad ``value`` of ``field``: ``"{field} must be {allowed}; got {value}"``."""
    return RequestError(
        field, f"{field} must be {allowed}; got {shown(value)}", allowed=allowed, value=value
    )


def check_int(field: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer from ``low`` to ``high`` (None: unbounded);
    else `RequestError` naming the field, the range and the value."""
    if low is not None and high is not None:
        allowed = f"an integer from {low} to {high}"
    elif low is not None:
        allowed = f"an integer >= {low}"
    elif high is not None:
        allowed = f"an integer <= {high}"
    else:
        allowed = "an integer"
    if not is_int(value):
        raise invalid(field, allowed, value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(field, allowed, value)
    return int(value)


def check_number(field: str, value: Any, low: float, high: float) -> float:
    """``value`` as a ``float`` if it is a finite number from ``low`` to ``high``; else
    `RequestError` naming the field, the range and the value."""
    allowed = f"a number from {low:g} to {high:g}"
    number = finite_float(value)
    if number is None or not low <= number <= high:
        raise invalid(field, allowed, value)
    return number


def check_optional_count(field: str, value: object) -> int | None:
    """An integer >= 1, or None; the check of settings such as ``max_concurrency`` (clients and
    sweeps), ``vocab_size`` and the embedded model's ``threads``."""
    if value is None:
        return None
    if not is_int(value) or value < 1:
        raise invalid(field, "an integer >= 1 or None", value)
    return int(value)
