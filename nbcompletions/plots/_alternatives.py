"""The top alternatives at each position of one choice, as a heat map with the tokens written in."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._checks import (
    bool_flags,
    check_one_completion,
    check_option,
    check_positive_int,
    require_frame,
    select_index,
)
from ._colors import LOG10_FLOOR, PROB_COLORSCALE
from ._style import apply_layout, cell_token, figure_title, hover_token, readable

__all__ = ["alternatives"]


def alternatives(
    alternatives: pd.DataFrame,
    *,
    index: int = 0,
    position: str = "position",
    rank: str = "rank",
    prob: str = "prob",
    token: str = "token",
    chosen: str | None = "chosen",
    scale: str = "logprob",
    start: int | None = None,
    max_positions: int = 100,
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """The top alternatives at each position of one choice as a heat map with the tokens written in.

    One row per position (read top to bottom like the text), one column per rank; the colour is
    the probability, on the scales of :func:`highlight`: ``scale="logprob"`` (default) spans
    log10 p from -4 (p <= 0.0001, red) to 0 (green), ``scale="prob"`` 0 to 1 linearly. The
    sampled token is in bold with a ✓, outlined, and named on its row. At most
    ``max_positions`` positions from ``start`` (default: the first) are drawn, and the title
    says when that cuts the completion short (a browser chokes on thousands of text cells).
    """
    function = "alternatives"
    columns = ["index", position, rank, prob, token, chosen]
    require_frame(alternatives, columns, function=function, frame_name="alternatives")
    check_positive_int(function, "max_positions", max_positions)
    check_option(function, "scale", scale, ("logprob", "prob"))
    frame = select_index(alternatives, index, function=function, frame_name="alternatives")
    check_one_completion(frame, [position, rank], function=function, frame_name="alternatives")

    all_positions = np.sort(frame[position].dropna().unique())
    window = _window(all_positions, start, max_positions)
    frame = frame[frame[position].isin(window)]
    ranks: list[int] = sorted(int(r) for r in frame[rank].dropna().unique())
    cells = _cells(frame, window, ranks, position, rank, prob, token, chosen)
    fig = go.Figure(
        go.Heatmap(
            **_colour(cells.prob, scale, prob),
            x=list(ranks),
            y=list(range(len(window))),
            text=cells.text,
            texttemplate="%{text}",
            customdata=cells.hover,
            hovertemplate="%{customdata}<extra></extra>",
            colorscale=[list(stop) for stop in PROB_COLORSCALE],
            xgap=1,
            ygap=1,
        )
    )
    # One assignment: fig.add_shape per cell re-validates every shape so far (quadratic).
    fig.update_layout(shapes=[_outline(ranks[j], i) for i, j in cells.marks])
    notes = []
    if len(window) < len(all_positions):
        shown = f"{position}s {window[0]}–{window[-1]} of {len(all_positions):,} shown"
        notes.append(f"{shown} (max_positions={max_positions})")
    # Each row is named by its position and the token sampled there.
    fig.update_yaxes(
        tickvals=list(range(len(window))),
        ticktext=[f"{p} {cells.sampled.get(p, '')}".rstrip() for p in window],
        autorange="reversed",
        title_text=f"{readable(position)} and the sampled token",
    )
    fig.update_xaxes(
        tickvals=list(ranks),
        ticktext=[cells.rank_label[r] for r in ranks],
        title_text=f"{readable(rank)} among the alternatives",
        side="top",
    )
    apply_layout(
        fig,
        title=figure_title(f"Top alternatives at each position (choice {index})", title, notes),
        height=height if height is not None else 160 + 24 * max(len(window), 4),
        width=width,
    )
    return fig


def _window(all_positions: np.ndarray, start: int | None, max_positions: int) -> np.ndarray:
    """The positions drawn: ``max_positions`` of them from ``start`` (default: the first)."""
    first = all_positions[0] if start is None and len(all_positions) else start
    window = all_positions[all_positions >= first] if first is not None else all_positions
    return window[:max_positions]


class _Cells(NamedTuple):
    """The heat map's cells: probability, written token and hover text per (position, rank)."""

    prob: np.ndarray
    text: np.ndarray
    hover: np.ndarray
    marks: list[tuple[int, int]]
    rank_label: dict[int, str]
    sampled: dict[Any, str]


def _cells(
    frame: pd.DataFrame,
    window: np.ndarray,
    ranks: list[int],
    position: str,
    rank: str,
    prob: str,
    token: str,
    chosen: str | None,
) -> _Cells:
    # A sampled token outside the top k comes as an extra entry ranked k+1: its true rank is only
    # known to be beyond k (k: the fewest entries at any position).
    per_position = frame.groupby(position)[rank].size()
    top_k = int(per_position.min()) if len(per_position) else 0
    rank_label = {r: (f">{top_k}" if 0 < top_k < r else str(r)) for r in ranks}
    row_of = {p: i for i, p in enumerate(window)}
    col_of = {r: j for j, r in enumerate(ranks)}
    z = np.full((len(window), len(ranks)), np.nan)
    text = np.full(z.shape, "", dtype=object)
    hover = np.full(z.shape, "", dtype=object)
    marks: list[tuple[int, int]] = []
    sampled: dict[Any, str] = {}
    chosen_values = (
        bool_flags(frame[chosen]) if chosen is not None else np.zeros(len(frame), dtype=bool)
    )
    for (pos, rk, p, tok), is_chosen in zip(
        frame[[position, rank, prob, token]].itertuples(index=False, name=None),
        chosen_values,
        strict=True,
    ):
        i, j = row_of[pos], col_of[int(rk)]
        z[i, j] = p
        cell = cell_token(tok)
        text[i, j] = f"<b>{cell} ✓</b>" if is_chosen else cell
        hover[i, j] = (
            f"{position} {pos} · {rank} {rank_label[int(rk)]}{' · chosen' if is_chosen else ''}"
            f"<br>{hover_token(tok)}<br>{prob} {p:.4f}"
        )
        if is_chosen:
            marks.append((i, j))
            sampled[pos] = cell
    return _Cells(z, text, hover, marks, rank_label, sampled)


def _colour(probs: np.ndarray, scale: str, prob: str) -> dict[str, Any]:
    """The heat map's z values, colour bar and range on the chosen scale."""
    if scale != "logprob":
        return {"z": probs, "colorbar": {"title": {"text": prob}}, "zmin": 0.0, "zmax": 1.0}
    # The colour is log10 p, floored at the scale's red end (log10 0 is -inf, not JSON).
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.maximum(np.log10(probs), LOG10_FLOOR)
    levels = np.arange(LOG10_FLOOR, 0.5)
    colorbar = {
        "title": {"text": f"{prob}<br>(log scale)"},
        "tickvals": levels.tolist(),
        "ticktext": [f"≤{10**LOG10_FLOOR:g}", *(f"{10**v:g}" for v in levels[1:])],
    }
    return {"z": z, "colorbar": colorbar, "zmin": LOG10_FLOOR, "zmax": 0.0}


def _outline(rank: int, row: int) -> dict[str, Any]:
    """The black box around a sampled token's cell."""
    return {
        "type": "rect",
        "x0": rank - 0.5,
        "x1": rank + 0.5,
        "y0": row - 0.5,
        "y1": row + 0.5,
        "line": {"color": "black", "width": 2},
        "fillcolor": "rgba(0,0,0,0)",
    }
