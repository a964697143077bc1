"""Checks every plot runs before drawing, and the frame selections they share (no plotly)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .._columns import require_columns

#: The plots' ``render_mode`` values (see :data:`WEBGL_THRESHOLD`).
RENDER_MODES = ("auto", "svg", "webgl")


# What to pass instead of an empty frame, by the frame's name.
_EMPTY_FRAME_ADVICE = {
    "tokens": (
        "A completion has token rows only when logprobs were requested: pass completion.tokens "
        "of e.g. client.complete(prompt, max_tokens=20, logprobs=5)."
    ),
    "alternatives": (
        "A completion has alternatives only when logprobs >= 1 were requested: pass "
        "completion.alternatives of e.g. client.complete(prompt, max_tokens=20, logprobs=5)."
    ),
    "choices": (
        "Pass a sweep's choices (result.choices, or metrics.per_choice(result.choices)) with "
        "at least one row."
    ),
}


def require_frame(
    frame: Any, columns: Sequence[str | None], *, function: str, frame_name: str
) -> None:
    """The checks every plot runs first: the columns exist, there are rows, not all failed."""
    require_columns(
        frame,
        columns,
        function=function,
        frame_name=frame_name,
        hint=(
            f"Pass the {frame_name} frame (e.g. completion.{frame_name}) or name your columns "
            "with the keyword arguments."
        ),
    )
    if isinstance(frame, pd.DataFrame) and frame.empty:
        # An empty figure (axes and nothing else) looked like a plotting bug.
        raise ValueError(
            f"{function}(): the {frame_name} frame is empty (0 rows), so there is nothing to "
            f"draw. {_EMPTY_FRAME_ADVICE.get(frame_name, '')}".rstrip()
        )
    # A sweep against a dead endpoint leaves only failed rows: an empty figure would hide that.
    failed = frame.get("error") if isinstance(frame, pd.DataFrame) else None
    if failed is not None and len(frame) and failed.notna().all():
        raise ValueError(
            f"{function}(): every row of the {frame_name} frame is a failed request (its error "
            f"column is set), so there is nothing to draw. The first error: {failed.iloc[0]}"
        )


def check_option(function: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{function}(): {name} must be one of {list(allowed)}, got {value!r}")


def check_positive_int(function: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{function}(): {name} must be an integer >= 1, got {value!r}")


def select_index(
    frame: pd.DataFrame, index: int | Sequence[int] | None, *, function: str, frame_name: str
) -> pd.DataFrame:
    """Rows of the chosen choice(s); selecting nothing is an error, not an empty plot."""
    if index is None:
        return frame
    wanted = [index] if isinstance(index, int | np.integer) else list(index)
    selected: pd.DataFrame = frame[frame["index"].isin(wanted)]
    if selected.empty and not frame.empty:
        present = sorted(pd.unique(frame["index"].dropna()).tolist())
        shown = present[:20] + (["..."] if len(present) > 20 else [])
        raise ValueError(
            f"{function}(): index {index!r} is not in the {frame_name} frame; "
            f"indices present: {shown}"
        )
    return selected


def drop_echo(frame: pd.DataFrame, echo: bool, *, function: str) -> pd.DataFrame:
    if echo or "echo" not in frame.columns:
        return frame
    generated: pd.DataFrame = frame[~echo_mask(frame)]
    if generated.empty and not frame.empty:
        raise ValueError(
            f"{function}(): every token of the frame is an echoed prompt token (echo column "
            "True), and echo=False leaves them out: nothing is left to draw. Pass echo=True to "
            "draw the prompt, or a completion with generated tokens (max_tokens >= 1)."
        )
    return generated


def echo_mask(frame: pd.DataFrame) -> np.ndarray:
    if "echo" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return bool_flags(frame["echo"])


def bool_flags(series: pd.Series) -> np.ndarray:
    """A bool column with missing values read as False.

    Through the nullable "boolean" dtype: ``fillna(False)`` on an object column warns about
    downcasting on pandas 2.2, and warnings are errors in our tests.
    """
    return series.astype("boolean").fillna(False).to_numpy(dtype=bool)


def check_one_completion(
    frame: pd.DataFrame, keys: list[str], *, function: str, frame_name: str, advice: str = ""
) -> None:
    """Per-position views break silently (zigzag lines, lost cells) on several completions."""
    duplicated = frame.duplicated(keys)
    if duplicated.any():
        first = frame.loc[duplicated, keys].iloc[0].to_dict()
        hint = (
            " Sweep frames hold one completion per request: select one first, e.g. "
            "frame[frame.request_id == ...]."
            if "request_id" in frame.columns
            else ""
        )
        raise ValueError(
            f"{function}(): the {frame_name} frame has several rows for {first}: it holds "
            f"more than one completion {advice or 'for this index'}.{hint}"
        )


def as_floats(series: pd.Series) -> np.ndarray:
    """Float array with NaN for missing values (nullable Int64/boolean columns included)."""
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)
