"""The column check every DataFrame-in function runs first (metrics and plots alike).

plotly.express and seaborn fail deep inside with a KeyError when a column is missing; ours raise
before any work, naming the function, the frame, what is missing and what is there.
"""

from __future__ import annotations

from collections.abc import Iterable

import pandas as pd

__all__ = ["require_columns"]


def require_columns(
    frame: object,
    columns: Iterable[str | None],
    *,
    function: str,
    frame_name: str,
    hint: str = "",
) -> pd.DataFrame:
    """``frame`` itself when it is a DataFrame holding every one of ``columns`` (None: skipped).

    Raises TypeError for anything but a DataFrame and ValueError naming the missing columns and
    the columns present; ``hint`` (a sentence) says what to pass instead.
    """
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(
            f"{function}() takes the {frame_name} DataFrame, got {type(frame).__name__}"
        )
    wanted = [c for c in dict.fromkeys(columns) if c is not None]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        advice = f" {hint}" if hint else ""
        raise ValueError(
            f"{function}(): column{'s' if len(missing) > 1 else ''} {names} not in the "
            f"{frame_name} frame; columns present: {list(frame.columns)}.{advice}"
        )
    return frame
