"""Position-by-position views of the tokens frame: probability, entropy, rank histogram."""

from __future__ import annotations

import html as _html
import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ._checks import (
    RENDER_MODES,
    as_floats,
    check_one_completion,
    check_option,
    drop_echo,
    echo_mask,
    require_frame,
    select_index,
)
from ._style import (
    PALETTE,
    apply_layout,
    compact_positions,
    count_of,
    figure_title,
    group_label,
    hover_columns,
    hover_token,
    legend_title,
    rank_labels,
    readable,
    rgba_color,
    split_groups,
    token_ticks,
    use_webgl,
)

__all__ = ["entropy", "rank_histogram", "token_probabilities"]


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
    top_k: int | None = None,
    render_mode: str = "auto",
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """The probability of each chosen token along the text, one line per choice.

    The x axis names the token at each position (whitespace visible: ``·`` space, ``↵``
    newline; every n-th token past 60) where the choices drawn share their tokens. Hovering a
    point shows the token and the ``hover_data`` columns; a ``rank`` reads ``>k`` for a token
    outside the top k, as in :func:`highlight`, where k is known: ``top_k``, else the frame's
    ``logprobs`` column (a sweep's) or ``attrs["logprobs"]``. Echoed prompt tokens (``echo``
    column True) are drawn as hollow markers on a dotted line in their own legend entry;
    ``echo=False`` leaves them out. ``index`` keeps only those choices; ``color=None`` draws
    everything as one trace.
    """
    function = "token_probabilities"
    frame = _line_frame(tokens, [x, y, color, token, *hover_data], locals(), function)
    webgl = use_webgl(render_mode, len(frame))
    fig = go.Figure()
    groups = split_groups(frame, color)
    for number, (value, group) in enumerate(groups):
        group = group.sort_values(x, kind="stable")
        prompt = echo_mask(group)
        for part, is_prompt in ((group[prompt], True), (group[~prompt], False)):
            if part.empty:
                continue
            if len(groups) == 1:
                # One line: the legend only tells the echoed prompt from the completion.
                name = "prompt" if is_prompt else "completion"
            else:
                label = group_label(color, value)
                name = f"{label} (prompt)" if is_prompt else label
            trace = _probability_trace(part, x, y, token, hover_data, top_k, name, webgl)
            trace.update(legendgroup=group_label(color, value))
            trace.line.update(color=PALETTE[number % len(PALETTE)])
            trace.marker.update(color=PALETTE[number % len(PALETTE)])
            trace.line.dash = "dot" if is_prompt else None
            trace.marker.symbol = "circle-open" if is_prompt else "circle"
            fig.add_trace(trace)
    values = as_floats(frame[y])
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        fig.update_yaxes(range=[-0.02, 1.02])
    notes = [count_of(len(frame), "token") + (", WebGL" if webgl else "")]
    apply_layout(
        fig,
        title=figure_title("Probability of each chosen token", title, notes),
        height=height,
        width=width,
    )
    fig.update_layout(
        yaxis_title=readable(y),
        legend_title_text=legend_title(color),
        showlegend=len(fig.data) > 1,
    )
    _name_tokens_on_x(fig, frame, x, token, row=None)
    return fig


def _line_frame(
    tokens: pd.DataFrame, columns: list[str | None], args: dict[str, Any], function: str
) -> pd.DataFrame:
    """The checks the per-position line plots share, and the rows they draw."""
    index, color, x = args["index"], args["color"], args["x"]
    require_frame(
        tokens,
        [*columns, "index" if index is not None else None],
        function=function,
        frame_name="tokens",
    )
    check_option(function, "render_mode", args["render_mode"], RENDER_MODES)
    selected = select_index(tokens, index, function=function, frame_name="tokens")
    frame = drop_echo(selected, args["echo"], function=function)
    check_one_completion(
        frame,
        [c for c in (color, x) if c is not None],
        function=function,
        frame_name="tokens",
        advice="per line; pick one with index=, or one line each with color= (e.g. 'request_id')",
    )
    return frame


def _probability_trace(
    part: pd.DataFrame,
    x: str,
    y: str,
    token: str,
    hover_data: Sequence[str],
    top_k: int | None,
    name: str,
    webgl: bool,
) -> go.Scatter | go.Scattergl:
    """One line of token probabilities; a rank in the hover reads as the popup's (``>5``)."""
    k: Any = top_k if top_k is not None else part.attrs.get("logprobs")
    if k is None and "logprobs" in part.columns:
        k = as_floats(part["logprobs"])
    # k unknown: the rank travels as a number and reads as a whole number ("6", not "6.000");
    # k known: as text in the label, where a rank past k reads ">5" (as in the popup).
    rank_as_text = "rank" in hover_data and k is not None
    numeric_hover = [c for c in hover_data if not (c == "rank" and rank_as_text)]
    customdata, extra = hover_columns(part, numeric_hover)
    text = [hover_token(t) for t in part[token].tolist()]
    if rank_as_text:
        ranks = rank_labels(as_floats(part["rank"]), k)
        text = [f"{shown}<br>rank {rank}" for shown, rank in zip(text, ranks, strict=True)]
    hovertemplate = (
        "<br>".join(["%{text}", f"{readable(x)} %{{x}}", f"{readable(y)} %{{y:.4g}}", *extra])
        + f"<extra>{_html.escape(name)}</extra>"
    )
    scatter = go.Scattergl if webgl else go.Scatter
    return scatter(
        x=compact_positions(part[x]),
        y=as_floats(part[y]),
        text=text,
        customdata=customdata,
        hovertemplate=hovertemplate,
        mode="lines+markers",
        name=name,
        line={"width": 1},
        marker={"size": 4 if webgl else 6},
    )


def _name_tokens_on_x(
    fig: go.Figure, frame: pd.DataFrame, x: str, token: str | None, row: int | None
) -> None:
    """Name the tokens along the x axis, or say that a hover does where choices differ."""
    ticks = token_ticks(frame, x, token) if token is not None and token in frame.columns else None
    if ticks is not None:
        fig.update_xaxes(title_text=f"token ({readable(x)})", row=row, col=1 if row else None)
        fig.update_xaxes(**ticks, row=row, col=1 if row else None)
    else:
        suffix = " (hover for the token)" if token is not None else ""
        fig.update_xaxes(title_text=readable(x) + suffix, row=row, col=1 if row else None)


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
    token: str | None = "token",
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
    The x axis names the tokens (the ``token`` column; ``None``: positions only).
    """
    function = "entropy"
    columns = [x, low, high, coverage, color]
    frame = _line_frame(tokens, columns, locals(), function)
    webgl = use_webgl(render_mode, len(frame) * (3 if coverage else 2))
    scatter = go.Scattergl if webgl else go.Scatter
    if coverage is not None:
        fig = make_subplots(
            rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.05
        )
    else:
        fig = make_subplots(rows=1, cols=1)
    groups = [
        (group_label(color, value), PALETTE[number % len(PALETTE)], g.sort_values(x, kind="stable"))
        for number, (value, g) in enumerate(split_groups(frame, color))
    ]
    # All band pairs first: fill="tonexty" fills to the trace added just before, so each upper
    # bound must directly follow its own lower bound.
    for label, line_color, group in groups:
        for trace in _entropy_band(scatter, group, x, low, high, label, line_color):
            fig.add_trace(trace, row=1, col=1)
    if coverage is not None:
        for label, line_color, group in groups:
            fig.add_trace(
                scatter(
                    x=group[x].to_numpy(),
                    y=as_floats(group[coverage]),
                    mode="lines",
                    line={"color": line_color, "width": 1},
                    name=f"{label} {coverage}",
                    legendgroup=label,
                    showlegend=False,
                    hovertemplate=(
                        f"{readable(x)} %{{x}}<br>{readable(coverage)} %{{y:.3f}}"
                        f"<extra>{_html.escape(label)}</extra>"
                    ),
                ),
                row=2,
                col=1,
            )
        # Short: a title longer than its axis runs into the one above (the row is 30% high).
        fig.update_yaxes(title_text="top-k mass", range=[0, 1.02], row=2, col=1)
    _name_tokens_on_x(fig, frame, x, token, row=2 if coverage is not None else 1)
    fig.update_yaxes(title_text="entropy (nats)", rangemode="tozero", row=1, col=1)
    _shade_prompt(fig, frame, x)
    notes = ["band: bounds from the top-k logprobs and the vocabulary size"]
    apply_layout(
        fig, title=figure_title("Entropy per position", title, notes), height=height, width=width
    )
    fig.update_layout(legend_title_text=legend_title(color), showlegend=len(groups) > 1)
    return fig


def _entropy_band(
    scatter: Any, group: pd.DataFrame, x: str, low: str, high: str, label: str, line_color: str
) -> tuple[Any, Any]:
    """The lower bound, then the upper bound filled down to it."""
    xs = group[x].to_numpy()
    lows, highs = as_floats(group[low]), as_floats(group[high])
    lower = scatter(
        x=xs,
        y=lows,
        mode="lines",
        line={"color": line_color, "width": 1},
        name=f"{label} lower bound",
        legendgroup=label,
        showlegend=False,
        hoverinfo="skip",
    )
    upper = scatter(
        x=xs,
        y=highs,
        mode="lines",
        line={"color": line_color, "width": 1},
        fill="tonexty",
        fillcolor=rgba_color(line_color, 0.3),
        name=label,
        legendgroup=label,
        customdata=lows,
        hovertemplate=(
            f"{readable(x)} %{{x}}<br>entropy %{{customdata:.3f}} to %{{y:.3f}} nats"
            f"<extra>{_html.escape(label)}</extra>"
        ),
    )
    return lower, upper


def _shade_prompt(fig: go.Figure, frame: pd.DataFrame, x: str) -> None:
    """Grey behind the echoed prompt's positions, labelled once in the top row."""
    prompt = frame[echo_mask(frame)]
    if prompt.empty:
        return
    positions = as_floats(prompt[x])
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


# GLTR's colours: top bucket green, then yellow, red, purple.
_BUCKET_COLORS = ("#5cb85c", "#f0ad4e", "#d9534f", "#9b59b6", "#5bc0de", "#777777")


def _bucket_labels(edges: Sequence[int]) -> list[str]:
    labels, previous = [], 0
    for edge in edges:
        labels.append(str(edge) if edge == previous + 1 else f"{previous + 1}–{edge}")
        previous = edge
    return [*labels, f">{edges[-1]}"]


def _bucket_edges(buckets: Sequence[int], function: str) -> list[int]:
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
    return edges


def _rank_bars(
    labels: list[str], counts: np.ndarray, name: str, color: Any, rank: str, normalize: bool
) -> go.Bar:
    total = counts.sum()
    return go.Bar(
        x=labels,
        y=counts / total if normalize and total else counts,
        text=[f"{c:,}" for c in counts],
        textposition="auto",
        customdata=counts,
        name=name,
        marker_color=color,
        hovertemplate=(
            f"{readable(rank)} %{{x}}: %{{y:{'.1%' if normalize else ','}}} "
            f"(%{{customdata:,}} tokens)<extra>{_html.escape(name)}</extra>"
        ),
    )


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
    require_frame(
        tokens,
        [rank, color, "index" if index is not None else None],
        function=function,
        frame_name="tokens",
    )
    edges = _bucket_edges(buckets, function)
    frame = drop_echo(
        select_index(tokens, index, function=function, frame_name="tokens"), echo, function=function
    )
    ranks = as_floats(frame[rank])
    has_rank = ~np.isnan(ranks)
    labels = _bucket_labels(edges)
    bucket = np.searchsorted(np.asarray(edges, dtype=float), ranks[has_rank], side="left")
    ranked = frame[has_rank].assign(_bucket=bucket)

    fig = go.Figure()
    groups = split_groups(ranked, color)
    for number, (value, group) in enumerate(groups):
        counts = np.bincount(group["_bucket"].to_numpy(dtype=int), minlength=len(labels))
        marker_color: Any = (
            [_BUCKET_COLORS[i % len(_BUCKET_COLORS)] for i in range(len(labels))]
            if color is None
            else PALETTE[number % len(PALETTE)]
        )
        label = group_label(color, value)
        fig.add_trace(_rank_bars(labels, counts, label, marker_color, rank, normalize))
    notes = [count_of(int(has_rank.sum()), "token")]
    if (~has_rank).any():
        notes.append(f"{count_of(int((~has_rank).sum()), 'token')} without a {rank} left out")
    apply_layout(
        fig,
        title=figure_title("Rank of the chosen token among the alternatives", title, notes),
        height=height,
        width=width,
    )
    fig.update_layout(
        barmode="group",
        showlegend=color is not None,
        xaxis_title=f"{readable(rank)} of the chosen token among the alternatives",
        yaxis_title="share of tokens" if normalize else "tokens",
        legend_title_text=legend_title(color),
    )
    if normalize:
        fig.update_yaxes(tickformat=".0%")
    return fig
