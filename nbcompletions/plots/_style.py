"""What every figure shares: colours, titles, layout, WebGL switching, hover text."""

from __future__ import annotations

import html as _html
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

from .._visible import visible_token
from ._checks import as_floats

#: Above this many points in one figure, ``render_mode="auto"`` draws with WebGL (``go.Scattergl``):
#: SVG keeps one DOM node per marker, which is what freezes a browser on a 10,000-token completion.
WEBGL_THRESHOLD = 2000

PALETTE = qualitative.Plotly

#: Axis and hover titles for the contract's columns; any other column is named as it is.
READABLE_NAMES = {
    "position": "position in the text",
    "prob": "probability of the chosen token",
    "logprob": "logprob",
    "rank": "rank",
    "top_mass": "top-k probability mass",
    "entropy_low": "entropy, lower bound (nats)",
    "entropy_high": "entropy, upper bound (nats)",
    "index": "choice",
}

#: At most this many tokens are named along an x axis; past it, every n-th token is.
MAX_TOKEN_TICKS = 60


def readable(column: str) -> str:
    """A column's axis title: words for the contract's columns, the name itself for any other."""
    return READABLE_NAMES.get(column, column)


def token_ticks(frame: pd.DataFrame, x: str, token: str) -> dict[str, Any] | None:
    """x-axis ticks that name the token at each position (whitespace visible), or None where
    the completions drawn hold different tokens at one position."""
    per_x = frame[[x, token]].drop_duplicates().sort_values(x, kind="stable")
    if per_x.empty or per_x[x].duplicated().any():
        return None
    step = -(-len(per_x) // MAX_TOKEN_TICKS)
    named = per_x.iloc[::step]
    return {
        "tickmode": "array",
        "tickvals": named[x].tolist(),
        "ticktext": [cell_token(t, limit=12) or "∅" for t in named[token].tolist()],
        "tickangle": -60 if len(named) > 12 else 0,
    }


def rank_labels(ranks: np.ndarray, top_k: Any) -> np.ndarray:
    """Ranks as the popup and the heat map write them: ``"3"``, ``">5"`` for a token outside the
    top k (k + 1 is only a lower bound there), ``"none"`` where unknown. ``top_k`` is one k or
    one per rank; NaN or None where unknown."""
    ks = np.broadcast_to(np.asarray(np.nan if top_k is None else top_k, dtype=float), ranks.shape)
    known = np.isfinite(ranks)
    whole = np.where(known, ranks, 0).astype(np.int64).astype(str).astype(object)
    with np.errstate(invalid="ignore"):
        outside = known & np.isfinite(ks) & (ks > 0) & (ranks > ks)
    beyond = np.char.add(">", np.where(np.isfinite(ks), ks, 0).astype(np.int64).astype(str))
    labels: np.ndarray = np.where(outside, beyond.astype(object), whole)
    labels[~known] = "none"
    return labels


def compact_positions(series: pd.Series) -> np.ndarray:
    """Positions as int32 when they fit: the figure JSON carries them base64, 4 bytes each."""
    values = series.to_numpy()
    if (
        values.dtype.kind in "iu"
        and values.size
        and np.iinfo(np.int32).min <= values.min()
        and values.max() <= np.iinfo(np.int32).max
    ):
        return values.astype(np.int32)
    return values


def use_webgl(render_mode: str, n_points: int) -> bool:
    return render_mode == "webgl" or (render_mode == "auto" and n_points > WEBGL_THRESHOLD)


def figure_title(default: str, title: str | None, notes: Sequence[str]) -> str:
    text = default if title is None else title
    notes = [n for n in notes if n]
    if notes:
        text += "<br><sup>" + " · ".join(_html.escape(n, quote=False) for n in notes) + "</sup>"
    return text


def apply_layout(fig: go.Figure, *, title: str, height: int | None, width: int | None) -> None:
    fig.update_layout(title_text=title, height=height, width=width, hovermode="closest")


def count_of(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def group_label(color: str | None, value: Any) -> str:
    """A legend entry: the value alone (the legend's title names the column), "choice 2" for the
    ``index`` column, whose bare numbers would say nothing."""
    if color is None:
        return "all"
    if color == "index":
        return f"choice {value}"
    return str(value)


def legend_title(color: str | None) -> str:
    return "" if color in (None, "index") else str(color)


def split_groups(frame: pd.DataFrame, color: str | None) -> list[tuple[Any, pd.DataFrame]]:
    if color is None:
        return [(None, frame)]
    return [
        (key[0] if isinstance(key, tuple) else key, group)
        for key, group in frame.groupby([color], sort=True, dropna=False)
    ]


def rgba_color(hex_color: str, alpha: float) -> str:
    hex_color = hex_color.lstrip("#")
    red, green, blue = (int(hex_color[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({red},{green},{blue},{alpha})"


# --------------------------------------------------------------------------------------------
# Token text as it appears in hover labels and heat-map cells


def hover_token(token: Any) -> str:
    """A token as a hover label shows it: whitespace visible (plotly reads ``<br>``, ``&``)."""
    shown = visible_token(token)
    return "(none)" if shown is None else _html.escape(shown, quote=False)


def cell_token(token: Any, limit: int = 14) -> str:
    """Short visible form for a heat-map cell, cut to ``limit`` characters."""
    text = visible_token(token) or ""
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _html.escape(text, quote=False)


def _hover_format(is_number: bool, is_integer: bool) -> str:
    # d3's ".4g" writes 6 as "6.000"; a whole-number column reads "6".
    if not is_number:
        return ""
    return ":d" if is_integer else ":.4g"


def hover_columns(
    frame: pd.DataFrame, columns: Sequence[str]
) -> tuple[np.ndarray | None, list[str]]:
    """customdata plus hovertemplate lines; numeric columns travel as compact binary arrays."""
    if not columns:
        return None, []
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in columns]
    if all(numeric):
        # float32 is plenty for a 4-digit hover label and halves the base64 payload.
        data = np.column_stack([as_floats(frame[c]) for c in columns]).astype(np.float32)
    else:
        data = np.empty((len(frame), len(columns)), dtype=object)
        for j, (column, is_number) in enumerate(zip(columns, numeric, strict=True)):
            data[:, j] = (
                as_floats(frame[column]) if is_number else frame[column].astype(str).to_numpy()
            )
    integer = [pd.api.types.is_integer_dtype(frame[c]) for c in columns]
    lines = [
        f"{readable(column)} %{{customdata[{j}]{_hover_format(is_number, is_int)}}}"
        for j, (column, is_number, is_int) in enumerate(zip(columns, numeric, integer, strict=True))
    ]
    return data, lines
