"""Tokens as a reader can see them: whitespace, control characters and raw bytes made visible.

``' other'``, ``'other'``, ``'\\n'``, ``'\\n\\n'`` and ``' \\n'`` look alike in a table, a hover
label or a heat-map cell. :func:`visible_token` is the one rendering every view uses (the frames'
``token_display`` column, the plots' hover labels and cells, the highlighted text's popups):

- a space is ``·``, a newline ``↵``, a tab ``→``, a carriage return ``␍``;
- other control characters and invisible Unicode (no-break and zero-width spaces, the byte-order
  mark) are ``<0x07>`` / ``<U+200B>``;
- OpenAI's ``bytes:\\xe2\\x80`` (part of a UTF-8 character) is ``<0xE2><0x80>``;
- a missing token (None, NaN) stays None.

A literal ``·`` or ``↵`` in a token is shown as itself, so the rendering is for reading; the
``token`` column keeps the exact string for computing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import numpy as np

__all__ = ["visible_token", "visible_tokens"]

_INVISIBLE = {i: f"<0x{i:02X}>" for i in range(32)}
_INVISIBLE.update({0x7F: "<0x7F>", 0x0A: "↵", 0x09: "→", 0x0D: "␍"})
_INVISIBLE.update(
    {code: f"<U+{code:04X}>" for code in (0x00A0, 0x200B, 0x200C, 0x200D, 0x2028, 0x2029, 0xFEFF)}
)
_SPACE = {0x20: "·"}
_BYTE_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def visible_token(token: object, *, spaces: bool = True) -> str | None:
    """``token`` with whitespace, control characters and raw bytes made visible (module doc).

    ``spaces=False`` keeps spaces as they are (for running text, where the gaps show them).
    """
    if token is None or (isinstance(token, float) and math.isnan(token)):
        return None
    text = str(token)
    if text.startswith("bytes:"):
        # OpenAI's form for a token that is not whole UTF-8: "bytes:" + \xNN escapes.
        raw = text[len("bytes:") :]
        return _BYTE_ESCAPE.sub(lambda m: f"<0x{m.group(1).upper()}>", raw)
    text = text.translate(_INVISIBLE)
    return text.translate(_SPACE) if spaces else text


def visible_tokens(tokens: Iterable[object]) -> np.ndarray:
    """:func:`visible_token` of each token, as an object array (each distinct token done once)."""
    import pandas as pd

    values = tokens if isinstance(tokens, np.ndarray) else np.fromiter(tokens, dtype=object)
    # A vocabulary has thousands of tokens and a frame may have millions of rows: render each
    # distinct one once. Missing tokens get code -1, which picks the None appended last.
    codes, uniques = pd.factorize(pd.Series(values, dtype=object, copy=False))
    shown = np.fromiter(
        [*(visible_token(u) for u in uniques), None], dtype=object, count=len(uniques) + 1
    )
    result: np.ndarray = shown[codes]
    return result
