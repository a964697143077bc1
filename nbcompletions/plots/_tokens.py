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
    rgba_color,
    split_groups,
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
    render_mode: str = "auto",
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """The probability of each chosen token along the text, one line per choice.

    Hovering a point shows the token (whitespace visible: ``·`` space, ``↵`` newline) and the
    ``hover_data`` columns. Echoed prompt tokens (``echo`` column True) are drawn as hollow
    markers on a dotted line in their own legend entry; ``echo=False`` leaves them out.
    ``index`` keeps only those choices; ``color=None`` draws everything as one trace.
    """
    function = "token_probabilities"
    require_frame(
        tokens,
        [x, y, color, token, *hover_data, "index" if index is not None else None],
        function=function,
        frame_name="tokens",
    )
    check_option(function, "render_mode", render_mode, RENDER_MODES)
    frame = drop_echo(
        select_index(tokens, index, function=function, frame_name="tokens"), echo, function=function
    )
    check_one_completion(
        frame,
        [c for c in (color, x) if c is not None],
        function=function,
        frame_name="tokens",
        advice="per line; pick one with index=, or one line each with color= (e.g. 'request_id')",
    )

    webgl = use_webgl(render_mode, len(frame))
    scatter = go.Scattergl if webgl else go.Scatter
    fig = go.Figure()
    groups = split_groups(frame, color)
    for number, (value, group) in enumerate(groups):
        group = group.sort_values(x, kind="stable")
        line_color = PALETTE[number % len(PALETTE)]
        label = group_label(color, value)
        prompt = echo_mask(group)
        for part, is_prompt in ((group[prompt], True), (group[~prompt], False)):
            if part.empty:
                continue
            customdata, extra = hover_columns(part, hover_data)
            if len(groups) == 1:
                # One line: the legend only tells the echoed prompt from the completion.
                name = "prompt" if is_prompt else "completion"
            else:
                name = f"{label} (prompt)" if is_prompt else label
            hovertemplate = (
                "<br>".join(["%{text}", f"{x} %{{x}}", f"{y} %{{y:.4g}}", *extra])
                + f"<extra>{_html.escape(name)}</extra>"
            )
            fig.add_trace(
                scatter(
                    x=compact_positions(part[x]),
                    y=as_floats(part[y]),
                    text=[hover_token(t) for t in part[token].tolist()],
                    customdata=customdata,
                    hovertemplate=hovertemplate,
                    mode="lines+markers",
                    name=name,
                    legendgroup=label,
                    line={"color": line_color, "width": 1, "dash": "dot" if is_prompt else None},
                    marker={
                        "color": line_color,
                        "size": 4 if webgl else 6,
                        "symbol": "circle-open" if is_prompt else "circle",
                    },
                )
            )
    values = as_floats(frame[y]) if not frame.empty else np.array([])
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        fig.update_yaxes(range=[-0.02, 1.02])
    notes = [count_of(len(frame), "token") + (", WebGL" if webgl else "")]
    if frame.empty:
        notes = ["no tokens to plot"]
    apply_layout(
        fig,
        title=figure_title("Probability of each chosen token", title, notes),
        height=height,
        width=width,
    )
    fig.update_layout(
        xaxis_title=x,
        yaxis_title=y,
        legend_title_text=legend_title(color),
        showlegend=len(fig.data) > 1,
    )
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
    require_frame(
        tokens,
        [x, low, high, coverage, color, "index" if index is not None else None],
        function=function,
        frame_name="tokens",
    )
    check_option(function, "render_mode", render_mode, RENDER_MODES)
    frame = drop_echo(
        select_index(tokens, index, function=function, frame_name="tokens"), echo, function=function
    )
    check_one_completion(
        frame,
        [c for c in (color, x) if c is not None],
        function=function,
        frame_name="tokens",
        advice="per line; pick one with index=, or one line each with color= (e.g. 'request_id')",
    )

    webgl = use_webgl(render_mode, len(frame) * (3 if coverage else 2))
    scatter = go.Scattergl if webgl else go.Scatter
    rows = 2 if coverage is not None else 1
    if rows == 2:
        fig = make_subplots(
            rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.05
        )
    else:
        fig = make_subplots(rows=1, cols=1)
    groups = split_groups(frame, color)
    # All band pairs first: fill="tonexty" fills to the trace added just before, so each upper
    # bound must directly follow its own lower bound.
    for number, (value, group) in enumerate(groups):
        group = group.sort_values(x, kind="stable")
        line_color = PALETTE[number % len(PALETTE)]
        label = group_label(color, value)
        xs = group[x].to_numpy()
        lows, highs = as_floats(group[low]), as_floats(group[high])
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
                fillcolor=rgba_color(line_color, 0.3),
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
            line_color = PALETTE[number % len(PALETTE)]
            label = group_label(color, value)
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
                        f"{x} %{{x}}<br>{coverage} %{{y:.3f}}<extra>{_html.escape(label)}</extra>"
                    ),
                ),
                row=2,
                col=1,
            )
        # Short: a title longer than its axis runs into the one above (the row is 30% high).
        fig.update_yaxes(title_text="top-k mass", range=[0, 1.02], row=2, col=1)
        fig.update_xaxes(title_text=x, row=2, col=1)
    else:
        fig.update_xaxes(title_text=x, row=1, col=1)
    fig.update_yaxes(title_text="entropy (nats)", rangemode="tozero", row=1, col=1)

    prompt = frame[echo_mask(frame)]
    if not prompt.empty:
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
    notes = ["band: bounds from the top-k logprobs and the vocabulary size"]
    if frame.empty:
        notes = ["no tokens to plot"]
    apply_layout(
        fig, title=figure_title("Entropy per position", title, notes), height=height, width=width
    )
    fig.update_layout(legend_title_text=legend_title(color), showlegend=len(groups) > 1)
    return fig


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
    require_frame(
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
        total = counts.sum()
        heights = counts / total if normalize and total else counts
        marker_color: Any = (
            [_BUCKET_COLORS[i % len(_BUCKET_COLORS)] for i in range(len(labels))]
            if color is None
            else PALETTE[number % len(PALETTE)]
        )
        fig.add_trace(
            go.Bar(
                x=labels,
                y=heights,
                text=[f"{c:,}" for c in counts],
                textposition="auto",
                customdata=counts,
                name=group_label(color, value),
                marker_color=marker_color,
                hovertemplate=(
                    f"{rank} %{{x}}: %{{y:{'.1%' if normalize else ','}}} "
                    f"(%{{customdata:,}} tokens)<extra>{_html.escape(group_label(color, value))}"
                    "</extra>"
                ),
            )
        )
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
        xaxis_title=f"{rank} of the chosen token",
        yaxis_title="share of tokens" if normalize else "tokens",
        legend_title_text=legend_title(color),
    )
    if normalize:
        fig.update_yaxes(tickformat=".0%")
    return fig
