"""Plots of completion frames: tidy frames in, ``plotly.graph_objects.Figure`` out.

Every function takes a frame from :func:`nbcompletions.to_frames` (or a sweep's frames) first and
column names as keyword-only arguments whose defaults are the contract columns, so
``plots.token_probabilities(completion.tokens)`` just works and any other tidy frame works by naming
its columns. The functions check the columns up front, never mutate the frame, and never call
``.show()``: Jupyter displays the returned figure.

Shared parameter names: ``index`` selects choices (by the ``index`` column), ``color`` splits traces
by a column, ``echo`` keeps (True) or drops (False) echoed prompt tokens, ``render_mode`` picks
SVG or WebGL (``"auto"``: WebGL above :data:`WEBGL_THRESHOLD` points), ``max_positions`` caps what
a position-by-position view shows, and ``title``/``height``/``width`` set the layout.

:func:`highlight` needs no plotly: it returns self-contained HTML (CSS only, no JavaScript, no URLs)
that renders the same on GitHub, nbviewer, VS Code and in exported HTML.
"""

from __future__ import annotations

import html as _html
import itertools
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from .metrics import summarize

__all__ = [
    "PROB_COLORSCALE",
    "WEBGL_THRESHOLD",
    "HighlightedText",
    "alternatives",
    "entropy",
    "highlight",
    "rank_histogram",
    "sweep",
    "token_probabilities",
]

#: Above this many points in one figure, ``render_mode="auto"`` draws with WebGL (``go.Scattergl``):
#: SVG keeps one DOM node per marker, which is what freezes a browser on a 10,000-token completion.
WEBGL_THRESHOLD = 2000

#: Probability 0 -> red, 0.5 -> yellow, 1 -> green (the spreadsheet "traffic light" scale); light
#: enough that black text stays readable on it, shared by the heat map and :func:`highlight`.
PROB_COLORSCALE: tuple[tuple[float, str], ...] = (
    (0.0, "#f8696b"),
    (0.5, "#ffeb84"),
    (1.0, "#63be7b"),
)

_MISSING_PROB_COLOR = "#e0e0e0"
_PALETTE = qualitative.Plotly
_RENDER_MODES = ("auto", "svg", "webgl")


# --------------------------------------------------------------------------------------------
# Checks shared by every function


def _require(frame: Any, columns: Iterable[str | None], *, function: str, frame_name: str) -> None:
    """Raise before any work if ``frame`` is not a DataFrame or lacks a column it must use."""
    if not isinstance(frame, pd.DataFrame):
        raise TypeError(
            f"{function}() takes the {frame_name} DataFrame first, got {type(frame).__name__}"
        )
    wanted = [c for c in dict.fromkeys(columns) if c is not None]
    missing = [c for c in wanted if c not in frame.columns]
    if missing:
        names = ", ".join(repr(c) for c in missing)
        raise ValueError(
            f"{function}(): column{'s' if len(missing) > 1 else ''} {names} not in the "
            f"{frame_name} frame; columns present: {list(frame.columns)}. Pass the "
            f"{frame_name} frame (e.g. completion.{frame_name}) or name your columns with the "
            "keyword arguments."
        )


def _check_option(function: str, name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{function}(): {name} must be one of {list(allowed)}, got {value!r}")


def _check_positive_int(function: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{function}(): {name} must be an integer >= 1, got {value!r}")


def _select_index(
    frame: pd.DataFrame, index: int | Sequence[int] | None, *, function: str, frame_name: str
) -> pd.DataFrame:
    """Rows of the chosen choice(s); selecting nothing is an error, not an empty plot."""
    if index is None:
        return frame
    wanted = [index] if isinstance(index, int | np.integer) else list(index)
    selected = frame[frame["index"].isin(wanted)]
    if selected.empty and not frame.empty:
        present = sorted(pd.unique(frame["index"].dropna()).tolist())
        shown = present[:20] + (["..."] if len(present) > 20 else [])
        raise ValueError(
            f"{function}(): index {index!r} is not in the {frame_name} frame; "
            f"indices present: {shown}"
        )
    return selected


def _drop_echo(frame: pd.DataFrame, echo: bool) -> pd.DataFrame:
    if echo or "echo" not in frame.columns:
        return frame
    return frame[~_echo_mask(frame)]


def _echo_mask(frame: pd.DataFrame) -> np.ndarray:
    if "echo" not in frame.columns:
        return np.zeros(len(frame), dtype=bool)
    return _flags(frame["echo"])


def _flags(series: pd.Series) -> np.ndarray:
    """A bool column with missing values read as False.

    Through the nullable "boolean" dtype: ``fillna(False)`` on an object column warns about
    downcasting on pandas 2.2, and warnings are errors in our tests.
    """
    return series.astype("boolean").fillna(False).to_numpy(dtype=bool)


def _check_one_completion(
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


def _numeric(series: pd.Series) -> np.ndarray:
    """Float array with NaN for missing values (nullable Int64/boolean columns included)."""
    return pd.to_numeric(series, errors="coerce").to_numpy(dtype=float, na_value=np.nan)


def _compact(series: pd.Series) -> np.ndarray:
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


def _use_webgl(render_mode: str, n_points: int) -> bool:
    return render_mode == "webgl" or (render_mode == "auto" and n_points > WEBGL_THRESHOLD)


def _title(default: str, title: str | None, notes: Sequence[str]) -> str:
    text = default if title is None else title
    notes = [n for n in notes if n]
    if notes:
        text += "<br><sup>" + " · ".join(_html.escape(n, quote=False) for n in notes) + "</sup>"
    return text


def _layout(fig: go.Figure, *, title: str, height: int | None, width: int | None) -> None:
    fig.update_layout(title_text=title, height=height, width=width, hovermode="closest")


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _group_label(color: str | None, value: Any) -> str:
    if color is None:
        return "all"
    return f"{color} {value}"


def _groups(frame: pd.DataFrame, color: str | None) -> list[tuple[Any, pd.DataFrame]]:
    if color is None:
        return [(None, frame)]
    return [
        (key[0] if isinstance(key, tuple) else key, group)
        for key, group in frame.groupby([color], sort=True, dropna=False)
    ]


def _rgba(hex_color: str, alpha: float) -> str:
    hex_color = hex_color.lstrip("#")
    red, green, blue = (int(hex_color[i : i + 2], 16) for i in (0, 2, 4))
    return f"rgba({red},{green},{blue},{alpha})"


# --------------------------------------------------------------------------------------------
# Token text as it appears in hover labels and heat-map cells


def _hover_token(token: Any) -> str:
    """``repr`` shows spaces and escapes newlines; plotly reads ``<br>`` and ``&`` as markup."""
    if token is None or (isinstance(token, float) and math.isnan(token)):
        return "(none)"
    return _html.escape(repr(str(token)), quote=False)


def _cell_token(token: Any, limit: int = 14) -> str:
    """Short visible form for a heat-map cell: spaces as ␣, newlines and tabs as \\n and \\t."""
    if token is None or (isinstance(token, float) and math.isnan(token)):
        return ""
    text = str(token).replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")
    text = text.replace("\r", "\\r")
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return _html.escape(text, quote=False)


def _hover_columns(
    frame: pd.DataFrame, columns: Sequence[str]
) -> tuple[np.ndarray | None, list[str]]:
    """customdata plus hovertemplate lines; numeric columns travel as compact binary arrays."""
    if not columns:
        return None, []
    numeric = [pd.api.types.is_numeric_dtype(frame[c]) for c in columns]
    if all(numeric):
        # float32 is plenty for a 4-digit hover label and halves the base64 payload.
        data = np.column_stack([_numeric(frame[c]) for c in columns]).astype(np.float32)
    else:
        data = np.empty((len(frame), len(columns)), dtype=object)
        for j, (column, is_number) in enumerate(zip(columns, numeric, strict=True)):
            data[:, j] = (
                _numeric(frame[column]) if is_number else frame[column].astype(str).to_numpy()
            )
    lines = [
        f"{column} %{{customdata[{j}]{':.4g' if is_number else ''}}}"
        for j, (column, is_number) in enumerate(zip(columns, numeric, strict=True))
    ]
    return data, lines


# --------------------------------------------------------------------------------------------
# token_probabilities


def token_probabilities(
    tokens: pd.DataFrame,
    *,
    x: str = "position",
    y: str = "prob",
    color: str | None = "index",
    token: str = "token",
    hover_data: Sequence[str] = ("logprob", "rank"),
    index: int | Sequence[int] | None = None,
    echo: bool = True,
    render_mode: str = "auto",
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """The probability of each chosen token along the text, one line per choice.

    Hovering a point shows the token (``repr``, so whitespace is visible) and the ``hover_data``
    columns. Echoed prompt tokens (``echo`` column True) are drawn as hollow markers on a dotted
    line in their own legend entry; ``echo=False`` leaves them out. ``index`` keeps only those
    choices; ``color=None`` draws everything as one trace.
    """
    function = "token_probabilities"
    _require(
        tokens,
        [x, y, color, token, *hover_data, "index" if index is not None else None],
        function=function,
        frame_name="tokens",
    )
    _check_option(function, "render_mode", render_mode, _RENDER_MODES)
    frame = _drop_echo(_select_index(tokens, index, function=function, frame_name="tokens"), echo)
    _check_one_completion(
        frame,
        [c for c in (color, x) if c is not None],
        function=function,
        frame_name="tokens",
        advice="per line; pick one with index=, or one line each with color= (e.g. 'request_id')",
    )

    webgl = _use_webgl(render_mode, len(frame))
    scatter = go.Scattergl if webgl else go.Scatter
    fig = go.Figure()
    for number, (value, group) in enumerate(_groups(frame, color)):
        group = group.sort_values(x, kind="stable")
        line_color = _PALETTE[number % len(_PALETTE)]
        label = _group_label(color, value)
        prompt = _echo_mask(group)
        for part, is_prompt in ((group[prompt], True), (group[~prompt], False)):
            if part.empty:
                continue
            customdata, extra = _hover_columns(part, hover_data)
            hovertemplate = (
                "<br>".join(["%{text}", f"{x} %{{x}}", f"{y} %{{y:.4g}}", *extra])
                + f"<extra>{_html.escape(label)}{' prompt' if is_prompt else ''}</extra>"
            )
            fig.add_trace(
                scatter(
                    x=_compact(part[x]),
                    y=_numeric(part[y]),
                    text=[_hover_token(t) for t in part[token].tolist()],
                    customdata=customdata,
                    hovertemplate=hovertemplate,
                    mode="lines+markers",
                    name=f"{label} (prompt)" if is_prompt else label,
                    legendgroup=label,
                    line={"color": line_color, "width": 1, "dash": "dot" if is_prompt else None},
                    marker={
                        "color": line_color,
                        "size": 4 if webgl else 6,
                        "symbol": "circle-open" if is_prompt else "circle",
                    },
                )
            )
    values = _numeric(frame[y]) if not frame.empty else np.array([])
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        fig.update_yaxes(range=[-0.02, 1.02])
    notes = [_count(len(frame), "token") + (", WebGL" if webgl else "")]
    if frame.empty:
        notes = ["no tokens to plot"]
    _layout(
        fig,
        title=_title("Probability of each chosen token", title, notes),
        height=height,
        width=width,
    )
    fig.update_layout(xaxis_title=x, yaxis_title=y, legend_title_text=color or "")
    return fig


# --------------------------------------------------------------------------------------------
# entropy


def entropy(
    tokens: pd.DataFrame,
    *,
    x: str = "position",
    low: str = "entropy_low",
    high: str = "entropy_high",
    coverage: str | None = "top_mass",
    color: str | None = "index",
    index: int | Sequence[int] | None = None,
    echo: bool = True,
    render_mode: str = "auto",
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """Entropy of the next-token distribution at each position, drawn as the band between bounds.

    With only the top-k logprobs returned the full entropy is not known; the frames carry a lower
    and an upper bound (nats) given the top-k and the vocabulary size, and this draws the band
    between them. ``coverage`` (the top-k's probability mass) goes in a second row below, sharing
    the x axis; ``coverage=None`` leaves it out. Echoed prompt tokens are shaded as "prompt".
    """
    function = "entropy"
    _require(
        tokens,
        [x, low, high, coverage, color, "index" if index is not None else None],
        function=function,
        frame_name="tokens",
    )
    _check_option(function, "render_mode", render_mode, _RENDER_MODES)
    frame = _drop_echo(_select_index(tokens, index, function=function, frame_name="tokens"), echo)
    _check_one_completion(
        frame,
        [c for c in (color, x) if c is not None],
        function=function,
        frame_name="tokens",
        advice="per line; pick one with index=, or one line each with color= (e.g. 'request_id')",
    )

    webgl = _use_webgl(render_mode, len(frame) * (3 if coverage else 2))
    scatter = go.Scattergl if webgl else go.Scatter
    rows = 2 if coverage is not None else 1
    if rows == 2:
        fig = make_subplots(
            rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.05
        )
    else:
        fig = make_subplots(rows=1, cols=1)
    groups = _groups(frame, color)
    # All band pairs first: fill="tonexty" fills to the trace added just before, so each upper
    # bound must directly follow its own lower bound.
    for number, (value, group) in enumerate(groups):
        group = group.sort_values(x, kind="stable")
        line_color = _PALETTE[number % len(_PALETTE)]
        label = _group_label(color, value)
        xs = group[x].to_numpy()
        lows, highs = _numeric(group[low]), _numeric(group[high])
        fig.add_trace(
            scatter(
                x=xs,
                y=lows,
                mode="lines",
                line={"color": line_color, "width": 1},
                name=f"{label} lower bound",
                legendgroup=label,
                showlegend=False,
                hoverinfo="skip",
            ),
            row=1,
            col=1,
        )
        fig.add_trace(
            scatter(
                x=xs,
                y=highs,
                mode="lines",
                line={"color": line_color, "width": 1},
                fill="tonexty",
                fillcolor=_rgba(line_color, 0.3),
                name=label,
                legendgroup=label,
                customdata=lows,
                hovertemplate=(
                    f"{x} %{{x}}<br>entropy %{{customdata:.3f}} to %{{y:.3f}} nats"
                    f"<extra>{_html.escape(label)}</extra>"
                ),
            ),
            row=1,
            col=1,
        )
    if coverage is not None:
        for number, (value, group) in enumerate(groups):
            group = group.sort_values(x, kind="stable")
            line_color = _PALETTE[number % len(_PALETTE)]
            label = _group_label(color, value)
            fig.add_trace(
                scatter(
                    x=group[x].to_numpy(),
                    y=_numeric(group[coverage]),
                    mode="lines",
                    line={"color": line_color, "width": 1},
                    name=f"{label} {coverage}",
                    legendgroup=label,
                    showlegend=False,
                    hovertemplate=(
                        f"{x} %{{x}}<br>{coverage} %{{y:.3f}}<extra>{_html.escape(label)}</extra>"
                    ),
                ),
                row=2,
                col=1,
            )
        fig.update_yaxes(title_text=f"top-k mass ({coverage})", range=[0, 1.02], row=2, col=1)
        fig.update_xaxes(title_text=x, row=2, col=1)
    else:
        fig.update_xaxes(title_text=x, row=1, col=1)
    fig.update_yaxes(title_text="entropy (nats)", rangemode="tozero", row=1, col=1)

    prompt = frame[_echo_mask(frame)]
    if not prompt.empty:
        positions = _numeric(prompt[x])
        start = float(np.nanmin(positions)) - 0.5
        fig.add_vrect(
            x0=start,
            x1=float(np.nanmax(positions)) + 0.5,
            row="all",
            col=1,
            fillcolor="#888888",
            opacity=0.12,
            line_width=0,
            layer="below",
        )
        # Labelled once, in the top row (add_vrect's own label repeats in every row).
        fig.add_annotation(
            x=start,
            y=1,
            xref="x",
            yref="y domain",
            text="prompt",
            showarrow=False,
            xanchor="left",
            yanchor="top",
        )
    notes = ["band: bounds from the top-k logprobs and the vocabulary size"]
    if frame.empty:
        notes = ["no tokens to plot"]
    _layout(fig, title=_title("Entropy per position", title, notes), height=height, width=width)
    fig.update_layout(legend_title_text=color or "")
    return fig


# --------------------------------------------------------------------------------------------
# alternatives


def alternatives(
    alternatives: pd.DataFrame,
    *,
    index: int = 0,
    position: str = "position",
    rank: str = "rank",
    prob: str = "prob",
    token: str = "token",
    chosen: str | None = "chosen",
    start: int | None = None,
    max_positions: int = 100,
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """The top alternatives at each position of one choice as a heat map with the tokens written in.

    One row per position (read top to bottom like the text), one column per rank; the colour is
    the probability (:data:`PROB_COLORSCALE`, 0 to 1). The sampled token is written in bold with a
    ✓ and outlined. At most ``max_positions`` positions from ``start`` (default: the first) are
    drawn, and the title says so when that cuts the completion short: thousands of rows of text
    cells make a figure no browser wants to lay out.
    """
    function = "alternatives"
    _require(
        alternatives,
        ["index", position, rank, prob, token, chosen],
        function=function,
        frame_name="alternatives",
    )
    _check_positive_int(function, "max_positions", max_positions)
    frame = _select_index(alternatives, index, function=function, frame_name="alternatives")
    _check_one_completion(frame, [position, rank], function=function, frame_name="alternatives")

    all_positions = np.sort(frame[position].dropna().unique())
    first = all_positions[0] if start is None and len(all_positions) else start
    window = all_positions[all_positions >= first] if first is not None else all_positions
    window = window[:max_positions]
    frame = frame[frame[position].isin(window)]

    ranks: list[int] = sorted(int(r) for r in frame[rank].dropna().unique())
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
    chosen_values = (
        _flags(frame[chosen]) if chosen is not None else np.zeros(len(frame), dtype=bool)
    )
    for (pos, rk, p, tok), is_chosen in zip(
        frame[[position, rank, prob, token]].itertuples(index=False, name=None),
        chosen_values,
        strict=True,
    ):
        i, j = row_of[pos], col_of[int(rk)]
        z[i, j] = p
        cell = _cell_token(tok)
        text[i, j] = f"<b>{cell} ✓</b>" if is_chosen else cell
        hover[i, j] = (
            f"{position} {pos} · {rank} {rank_label[int(rk)]}{' · chosen' if is_chosen else ''}"
            f"<br>{_hover_token(tok)}"
        )
        if is_chosen:
            marks.append((i, j))

    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(ranks),
            y=list(range(len(window))),
            text=text,
            texttemplate="%{text}",
            customdata=hover,
            hovertemplate="%{customdata}<br>prob %{z:.4f}<extra></extra>",
            colorscale=[list(stop) for stop in PROB_COLORSCALE],
            zmin=0.0,
            zmax=1.0,
            xgap=1,
            ygap=1,
            colorbar={"title": {"text": prob}},
        )
    )
    # One assignment: fig.add_shape per cell re-validates every shape so far (quadratic).
    fig.update_layout(
        shapes=[
            {
                "type": "rect",
                "x0": ranks[j] - 0.5,
                "x1": ranks[j] + 0.5,
                "y0": i - 0.5,
                "y1": i + 0.5,
                "line": {"color": "black", "width": 2},
                "fillcolor": "rgba(0,0,0,0)",
            }
            for i, j in marks
        ]
    )
    notes = []
    if len(window) < len(all_positions):
        notes.append(
            f"{position}s {window[0]}–{window[-1]} of {len(all_positions):,} shown "
            f"(max_positions={max_positions})"
        )
    if not len(window):
        notes.append("no alternatives to plot (was the request sent with logprobs?)")
    fig.update_yaxes(
        tickvals=list(range(len(window))),
        ticktext=[str(p) for p in window],
        autorange="reversed",
        title_text=position,
    )
    fig.update_xaxes(
        tickvals=list(ranks), ticktext=[rank_label[r] for r in ranks], title_text=rank, side="top"
    )
    _layout(
        fig,
        title=_title(f"Top alternatives at each position (index {index})", title, notes),
        height=height if height is not None else 160 + 24 * max(len(window), 4),
        width=width,
    )
    return fig


# --------------------------------------------------------------------------------------------
# rank_histogram

# GLTR's colours: top bucket green, then yellow, red, purple.
_BUCKET_COLORS = ("#5cb85c", "#f0ad4e", "#d9534f", "#9b59b6", "#5bc0de", "#777777")


def _bucket_labels(edges: Sequence[int]) -> list[str]:
    labels, previous = [], 0
    for edge in edges:
        labels.append(str(edge) if edge == previous + 1 else f"{previous + 1}–{edge}")
        previous = edge
    return [*labels, f">{edges[-1]}"]


def rank_histogram(
    tokens: pd.DataFrame,
    *,
    rank: str = "rank",
    buckets: Sequence[int] = (1, 5),
    color: str | None = None,
    index: int | Sequence[int] | None = None,
    echo: bool = True,
    normalize: bool = True,
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """How often the chosen token was ranked first, in the top 5, or beyond (as GLTR shows it).

    ``buckets`` are inclusive upper rank edges: ``(1, 5)`` gives the bars "1", "2–5", ">5". A rank
    is exact only up to the number of logprobs requested (k); beyond that the frames say k+1, so
    keep the last edge <= k. ``color`` splits the bars (e.g. ``"index"`` for one group per choice);
    ``normalize=False`` plots counts instead of shares. Tokens without a rank are left out and
    counted in the title.
    """
    function = "rank_histogram"
    _require(
        tokens,
        [rank, color, "index" if index is not None else None],
        function=function,
        frame_name="tokens",
    )
    edges = list(buckets)
    if (
        not edges
        or any(isinstance(e, bool) or not isinstance(e, int | np.integer) or e < 1 for e in edges)
        or any(b <= a for a, b in itertools.pairwise(edges))
    ):
        raise ValueError(
            f"{function}(): buckets must be increasing integers >= 1 (upper rank edges, e.g. "
            f"(1, 5)), got {buckets!r}"
        )
    frame = _drop_echo(_select_index(tokens, index, function=function, frame_name="tokens"), echo)
    ranks = _numeric(frame[rank])
    has_rank = ~np.isnan(ranks)
    labels = _bucket_labels(edges)
    bucket = np.searchsorted(np.asarray(edges, dtype=float), ranks[has_rank], side="left")
    ranked = frame[has_rank].assign(_bucket=bucket)

    fig = go.Figure()
    groups = _groups(ranked, color)
    for number, (value, group) in enumerate(groups):
        counts = np.bincount(group["_bucket"].to_numpy(dtype=int), minlength=len(labels))
        total = counts.sum()
        heights = counts / total if normalize and total else counts
        marker_color: Any = (
            [_BUCKET_COLORS[i % len(_BUCKET_COLORS)] for i in range(len(labels))]
            if color is None
            else _PALETTE[number % len(_PALETTE)]
        )
        fig.add_trace(
            go.Bar(
                x=labels,
                y=heights,
                text=[f"{c:,}" for c in counts],
                textposition="auto",
                customdata=counts,
                name=_group_label(color, value),
                marker_color=marker_color,
                hovertemplate=(
                    f"{rank} %{{x}}: %{{y:{'.1%' if normalize else ','}}} "
                    f"(%{{customdata:,}} tokens)<extra>{_html.escape(_group_label(color, value))}"
                    "</extra>"
                ),
            )
        )
    notes = [_count(int(has_rank.sum()), "token")]
    if (~has_rank).any():
        notes.append(f"{_count(int((~has_rank).sum()), 'token')} without a {rank} left out")
    _layout(
        fig,
        title=_title("Rank of the chosen token among the alternatives", title, notes),
        height=height,
        width=width,
    )
    fig.update_layout(
        barmode="group",
        showlegend=color is not None,
        xaxis_title=f"{rank} of the chosen token",
        yaxis_title="share of tokens" if normalize else "tokens",
        legend_title_text=color or "",
    )
    if normalize:
        fig.update_yaxes(tickformat=".0%")
    return fig


# --------------------------------------------------------------------------------------------
# sweep


def _hashable(value: Any) -> Any:
    """Request fields such as ``stop`` or ``logit_bias`` hold lists or dicts: group by repr."""
    if isinstance(value, list | dict | tuple | set | np.ndarray):
        return repr(value.tolist() if isinstance(value, np.ndarray) else value)
    return value


def sweep(
    choices: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str | None = None,
    facet_col: str | None = None,
    ci: float | None = 0.95,
    interval: str = "bars",
    error: str | None = "error",
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """A metric against a swept parameter: the mean over repeats with its confidence interval.

    Rows are grouped by ``x`` (and ``color``, ``facet_col``); each group's mean of ``y`` is drawn
    with a Student-t interval at level ``ci`` (``None``: no interval; a group of one has none) as
    error bars (``interval="bars"``) or a shaded band (``"band"``). A numeric ``x`` is drawn as
    lines; any other as categories. Rows whose ``error`` column is set (failed requests) and rows
    without a ``y`` value are left out, and the title says how many.
    """
    function = "sweep"
    _require(choices, [x, y, color, facet_col], function=function, frame_name="choices")
    _check_option(function, "interval", interval, ("bars", "band"))
    if ci is not None and (
        isinstance(ci, bool) or not isinstance(ci, float | int) or not 0 < ci < 1
    ):
        raise ValueError(f"{function}(): ci must be a level in (0, 1) or None, got {ci!r}")
    if not pd.api.types.is_numeric_dtype(choices[y]) or pd.api.types.is_bool_dtype(choices[y]):
        raise ValueError(
            f"{function}(): column {y!r} must be numeric to average, it holds {choices[y].dtype}"
        )

    keys = list(dict.fromkeys(c for c in (facet_col, color, x) if c is not None))
    data = choices[[*keys, y]].copy()
    for key in keys:
        if data[key].dtype == object:
            data[key] = data[key].map(_hashable)
    notes: list[str] = []
    if error is not None and error in choices.columns:
        errors = choices[error]
        failed = errors.notna().to_numpy() & (errors.astype(str) != "").to_numpy()
        if failed.any():
            notes.append(f"{_count(int(failed.sum()), 'failed request')} left out")
        data = data[~failed]
    no_value = ~np.isfinite(_numeric(data[y]))
    if no_value.any():
        notes.append(f"{_count(int(no_value.sum()), 'row')} without {y} left out")
    data = data[~no_value]

    # One implementation of the interval for the whole package: metrics.summarize (Student t).
    stats = summarize(data, by=keys, value=y, ci=0.95 if ci is None else ci).rename(
        columns={"n": "count", "ci_low": "low", "ci_high": "high"}
    )
    x_numeric = pd.api.types.is_numeric_dtype(choices[x]) and not pd.api.types.is_bool_dtype(
        choices[x]
    )
    facets = list(pd.unique(stats[facet_col])) if facet_col is not None else [None]
    if facet_col is not None:
        facets = sorted(facets, key=_sort_key)
        fig = make_subplots(
            rows=1,
            cols=len(facets),
            shared_yaxes=True,
            subplot_titles=[f"{facet_col}={_category(value)}" for value in facets],
        )
    else:
        fig = make_subplots(rows=1, cols=1)
    colors = list(pd.unique(stats[color])) if color is not None else [None]
    if color is not None:
        colors = sorted(colors, key=_sort_key)
    shown: set[str] = set()
    level = f"{ci * 100:.4g}% CI" if ci is not None else ""
    for column, facet in enumerate(facets, start=1):
        in_facet = stats if facet_col is None else stats[_equal(stats[facet_col], facet)]
        for number, value in enumerate(colors):
            series = in_facet if color is None else in_facet[_equal(in_facet[color], value)]
            if series.empty:
                continue
            series = (
                series.sort_values(x, key=lambda s: s.map(_sort_key))
                if not x_numeric
                else series.sort_values(x)
            )
            line_color = _PALETTE[number % len(_PALETTE)]
            label = y if color is None else f"{color}={_category(value)}"
            xs = series[x].to_numpy() if x_numeric else series[x].map(_category).to_numpy()
            means = series["mean"].to_numpy(dtype=float)
            lows = series["low"].to_numpy(dtype=float)
            highs = series["high"].to_numpy(dtype=float)
            has_interval = ci is not None and bool(np.isfinite(highs).any())
            if interval == "band" and has_interval and x_numeric:
                band = np.isfinite(highs)
                fig.add_trace(
                    go.Scatter(
                        x=np.concatenate([xs[band], xs[band][::-1]]),
                        y=np.concatenate([highs[band], lows[band][::-1]]),
                        fill="toself",
                        fillcolor=_rgba(line_color, 0.2),
                        line={"width": 0},
                        hoverinfo="skip",
                        showlegend=False,
                        legendgroup=label,
                        name=f"{label} {level}",
                    ),
                    row=1,
                    col=column,
                )
            error_y = None
            if (interval == "bars" or not x_numeric) and has_interval:
                error_y = {
                    "type": "data",
                    "array": highs - means,
                    "arrayminus": means - lows,
                    "visible": True,
                }
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=means,
                    mode="lines+markers" if x_numeric else "markers",
                    line={"color": line_color},
                    marker={"color": line_color, "size": 7},
                    error_y=error_y,
                    name=label,
                    legendgroup=label,
                    showlegend=label not in shown,
                    customdata=np.column_stack(
                        [lows, highs, series["count"].to_numpy(dtype=float)]
                    ),
                    hovertemplate=(
                        f"{x} %{{x}}<br>mean {y} %{{y:.4g}}"
                        + (
                            f"<br>{level} %{{customdata[0]:.4g}} to %{{customdata[1]:.4g}}"
                            if ci is not None
                            else ""
                        )
                        + f"<br>n %{{customdata[2]}}<extra>{_html.escape(label)}</extra>"
                    ),
                ),
                row=1,
                col=column,
            )
            shown.add(label)
        fig.update_xaxes(title_text=x, row=1, col=column)
        if not x_numeric:
            fig.update_xaxes(type="category", row=1, col=column)
    fig.update_yaxes(title_text=f"mean {y}", row=1, col=1)
    what = f"mean ± {level} (Student t) over repeats" if ci is not None else "mean over repeats"
    _layout(
        fig,
        title=_title(f"{y} by {x}", title, [what, *notes]),
        height=height,
        width=width,
    )
    fig.update_layout(showlegend=color is not None, legend_title_text=color or "")
    return fig


def _sort_key(value: Any) -> tuple[int, Any]:
    """Sort numbers numerically, then everything else by its text; missing values last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, "")
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def _category(value: Any) -> str:
    """Axis label of a category; a missing request field was unset (the server default)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    return str(value)


def _equal(series: pd.Series, value: Any) -> pd.Series:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return series.isna()
    return series == value


# --------------------------------------------------------------------------------------------
# highlight


class HighlightedText:
    """Tokens coloured by probability as self-contained HTML (CSS only: no scripts, no URLs).

    Jupyter displays it through ``_repr_html_``; ``.html`` is the fragment, ``.save(path)`` writes
    a standalone page.
    """

    def __init__(self, html: str, *, n_tokens: int, title: str | None = None) -> None:
        self.html = html
        self.n_tokens = n_tokens
        self.title = title

    def _repr_html_(self) -> str:
        return self.html

    def save(self, path: str | Path) -> Path:
        """Write a standalone UTF-8 HTML page and return its path."""
        target = Path(path)
        page_title = _html.escape(self.title or "nbcompletions highlight")
        target.write_text(
            '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
            f"<title>{page_title}</title></head>\n<body>\n{self.html}\n</body></html>\n",
            encoding="utf-8",
        )
        return target

    def __repr__(self) -> str:
        return f"HighlightedText({self.n_tokens} tokens, {len(self.html):,} characters of HTML)"


def _prob_color(prob: float) -> str:
    if not math.isfinite(prob):
        return _MISSING_PROB_COLOR
    prob = min(max(prob, 0.0), 1.0)
    for (left, left_color), (right, right_color) in itertools.pairwise(PROB_COLORSCALE):
        if prob <= right:
            share = (prob - left) / (right - left) if right > left else 0.0
            channels = [
                round(
                    int(left_color[i : i + 2], 16) * (1 - share)
                    + int(right_color[i : i + 2], 16) * share
                )
                for i in (1, 3, 5)
            ]
            return "#{:02x}{:02x}{:02x}".format(*channels)
    return PROB_COLORSCALE[-1][1]


_CONTROL = {i: f"\\x{i:02x}" for i in range(32) if chr(i) not in "\n\t"}
_CONTROL[0x7F] = "\\x7f"


def _display_token(token: str) -> str:
    """HTML for a token's text: escaped, newlines as ↵ plus a line break, other controls visible."""
    text = _html.escape(token.translate(_CONTROL), quote=True)
    return text.replace("\n", "↵<br>")


def _attribute(text: str) -> str:
    """Escape for a double-quoted attribute; &#10; is a line break inside a title tooltip.

    Single quotes stay as they are (the attribute is double-quoted): tooltips repeat ``repr``
    strings, and six-byte entities for their quotes made up a third of the page.
    """
    escaped = _html.escape(text, quote=False).replace('"', "&quot;")
    return escaped.replace("\n", "&#10;").replace("\r", "&#13;")


def highlight(
    tokens: pd.DataFrame,
    *,
    alternatives: pd.DataFrame | None = None,
    index: int = 0,
    position: str = "position",
    token: str = "token",
    prob: str = "prob",
    echo: bool = True,
    max_positions: int = 5000,
    title: str | None = None,
) -> HighlightedText:
    """The text of one choice with each token's background coloured by its probability.

    Hovering a token shows (as a native ``title`` tooltip) its text, probability, logprob and rank
    and, with the ``alternatives`` frame, the top alternatives at that position. The HTML uses
    inline CSS only, so it survives the sanitizers of GitHub, nbviewer, VS Code and JupyterLab.
    Echoed prompt tokens are set in italics (``echo=False`` leaves them out); at most
    ``max_positions`` tokens are shown, and the legend says when the text was cut.
    """
    function = "highlight"
    _require(tokens, ["index", position, token, prob], function=function, frame_name="tokens")
    if alternatives is not None:
        _require(
            alternatives,
            ["index", "position", "rank", "token", "prob"],
            function=function,
            frame_name="alternatives",
        )
    _check_positive_int(function, "max_positions", max_positions)
    frame = _drop_echo(_select_index(tokens, index, function=function, frame_name="tokens"), echo)
    _check_one_completion(frame, [position], function=function, frame_name="tokens")
    frame = frame.sort_values(position, kind="stable")
    total = len(frame)
    frame = frame.iloc[:max_positions]

    tooltips_alternatives: dict[Any, list[str]] = {}
    if alternatives is not None:
        alt = alternatives[alternatives["index"] == index]
        alt = alt[alt["position"].isin(frame[position])].sort_values(["position", "rank"])
        has_chosen = "chosen" in alt.columns
        for pos, alt_token, alt_prob, is_chosen in zip(
            alt["position"].tolist(),
            alt["token"].tolist(),
            _numeric(alt["prob"]),
            _flags(alt["chosen"]).tolist() if has_chosen else [False] * len(alt),
            strict=True,
        ):
            tooltips_alternatives.setdefault(pos, []).append(
                f"{alt_prob:7.2%}  {alt_token!r}{'  ◀ chosen' if is_chosen else ''}"
            )

    top_k = min((len(entries) for entries in tooltips_alternatives.values()), default=0)
    probs = _numeric(frame[prob])
    prompt = _echo_mask(frame)
    logprobs = _numeric(frame["logprob"]) if "logprob" in frame.columns else None
    ranks = _numeric(frame["rank"]) if "rank" in frame.columns else None
    spans = []
    for row, (pos, tok) in enumerate(
        zip(frame[position].tolist(), frame[token].tolist(), strict=True)
    ):
        text = "" if tok is None or (isinstance(tok, float) and math.isnan(tok)) else str(tok)
        p = probs[row]
        facts = [f"p = {p:.4f}" if math.isfinite(p) else "no logprob"]
        if logprobs is not None and math.isfinite(logprobs[row]):
            facts.append(f"logprob {logprobs[row]:.3f}")
        if ranks is not None and math.isfinite(ranks[row]):
            # A rank past the k returned alternatives only says "not in the top k". Where the
            # sampled token is outside the top k it comes as an extra (k+1-th) entry, so k is the
            # fewest entries at any position, not the count at this one.
            facts.append(f"rank >{top_k}" if 0 < top_k < ranks[row] else f"rank {int(ranks[row])}")
        tip = f"{text!r}  {' · '.join(facts)}\n{position} {pos}{' (prompt)' if prompt[row] else ''}"
        if pos in tooltips_alternatives:
            tip += "\nalternatives:\n" + "\n".join(tooltips_alternatives[pos])
        style = f"background:{_prob_color(p)}"
        if prompt[row]:
            style += ";font-style:italic"
        data_prob = f"{p:.6g}" if math.isfinite(p) else ""
        spans.append(
            f'<span style="{style}" data-prob="{data_prob}" title="{_attribute(tip)}">'
            f"{_display_token(text)}</span>"
        )

    swatches = "".join(
        f'<span style="background:{_prob_color(level)};padding:0 0.4em">{level:g}</span>'
        for level in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    legend = [f"probability {swatches}"]
    legend.append(
        f'<span style="background:{_MISSING_PROB_COLOR};padding:0 0.4em">grey</span> no logprob'
    )
    if prompt.any():
        legend.append("<i>italic</i>: prompt (echo)")
    legend.append("↵: newline; hover a token for details")
    if total > len(frame):
        legend.append(
            f"showing the first {len(frame):,} of {total:,} tokens (max_positions={max_positions})"
        )
    heading = (
        f'<div style="font-weight:bold;margin-bottom:4px">{_html.escape(title)}</div>'
        if title
        else ""
    )
    body = (
        '<div class="nbc-highlight" style="font-family:ui-monospace,SFMono-Regular,Menlo,'
        'Consolas,monospace;font-size:13px;line-height:1.8;color:#000">'
        f"{heading}"
        '<div style="white-space:pre-wrap;word-break:break-word">' + "".join(spans) + "</div>"
        '<div style="margin-top:6px;font-size:11px;color:#444">'
        + " · ".join(legend)
        + "</div></div>"
    )
    return HighlightedText(body, n_tokens=len(frame), title=title)
