"""Two endpoints' scores of the same text, span by span: two token tracks, disagreements marked."""

from __future__ import annotations

import html as _html
import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .._compare import COMPARE_COLUMNS  # the frame nbcompletions.compare makes
from .._visible import visible_token
from ._checks import check_positive_int, require_frame
from ._colors import LOG10_FLOOR, PROB_COLORSCALE
from ._style import apply_layout, cell_token, count_of, figure_title

__all__ = ["compare"]


_DISAGREE_COLOR = "#c0392b"
_AGREE_COLOR = "#9e9e9e"


def compare(
    frame: pd.DataFrame,
    *,
    text_id: Any = None,
    start: int = 0,
    max_spans: int = 80,
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """One text scored by two endpoints (the frame of `nbcompletions.compare`), span by span.

    Top: two token tracks, side a (``frame.attrs["a"]``) above side b, one cell per aligned span,
    coloured by the probability that side gave the span (log scale, as in :func:`highlight`) with
    the side's tokens written in (``|`` between tokens, so differing tokenizations show). Spans
    where the sides disagree (the ``disagree`` column) are outlined in red across both tracks and
    their labels on the x axis are red. Below: the difference of the two log-probabilities
    (a − b, nats) per span, red where they disagree. Hovering a cell shows the span's bytes,
    both sides' tokens, logprobs, ranks, top alternatives and the bounds on KL(a ‖ b).

    ``text_id`` picks the text (default: the first); at most ``max_spans`` spans from span
    ``start`` are drawn, and the title says when the text was cut.
    """
    function = "compare"
    require_frame(frame, COMPARE_COLUMNS, function=function, frame_name="compare")
    check_positive_int(function, "max_spans", max_spans)
    texts = pd.unique(frame["text_id"]).tolist()
    chosen = texts[0] if text_id is None else text_id
    if chosen not in texts:
        raise ValueError(f"{function}(): text_id {text_id!r} is not in the frame; present: {texts}")
    spans = frame[frame["text_id"] == chosen].sort_values("span", kind="stable")
    total = len(spans)
    spans = spans[spans["span"] >= start].iloc[:max_spans]
    if spans.empty:
        raise ValueError(f"{function}(): no span from start={start} (the text has {total})")
    sides = (str(frame.attrs.get("a", "a")), str(frame.attrs.get("b", "b")))
    disagree = spans["disagree"].astype("boolean").fillna(False).to_numpy(dtype=bool)
    xs = list(range(len(spans)))

    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.55, 0.45], vertical_spacing=0.06
    )
    fig.add_trace(_tracks(spans, sides, xs), row=1, col=1)
    fig.add_trace(_difference_bars(spans, sides, xs, disagree), row=2, col=1)
    fig.update_layout(
        shapes=[_outline(int(x)) for x in np.flatnonzero(disagree)],
    )
    fig.update_yaxes(
        tickvals=[0, 1],
        ticktext=[f"a: {sides[0]}", f"b: {sides[1]}"],
        autorange="reversed",
        row=1,
        col=1,
    )
    fig.update_yaxes(title_text="logprob a − b<br>(nats)", row=2, col=1)
    fig.update_xaxes(
        tickvals=xs,
        ticktext=[_span_label(t, d) for t, d in zip(spans["text"].tolist(), disagree, strict=True)],
        tickangle=-60 if len(xs) > 12 else 0,
        row=2,
        col=1,
    )
    fig.update_xaxes(title_text="span of the text (red: the sides disagree)", row=2, col=1)
    notes = [
        f"{count_of(int(disagree.sum()), 'disagreement')} in {count_of(len(spans), 'span')}",
        f"a = {sides[0]}, b = {sides[1]}",
    ]
    if len(texts) > 1:
        notes.append(f"text_id {chosen} of {len(texts)} texts (text_id= picks another)")
    if len(spans) < total:
        notes.append(f"spans {int(spans['span'].iloc[0])}–{int(spans['span'].iloc[-1])} of {total}")
    apply_layout(
        fig,
        title=figure_title("The same text scored by two endpoints", title, notes),
        height=height if height is not None else 460,
        width=width if width is not None else max(700, 60 + 48 * len(xs)),
    )
    fig.update_layout(showlegend=False)
    return fig


def _tracks(spans: pd.DataFrame, sides: tuple[str, str], xs: list[int]) -> go.Heatmap:
    """The two token tracks: one row per side, one cell per span, coloured by probability."""
    z, text, hover = [], [], []
    for side in ("a", "b"):
        logprobs = pd.to_numeric(spans[f"{side}_logprob"], errors="coerce").to_numpy(dtype=float)
        with np.errstate(invalid="ignore"):
            z.append(np.maximum(logprobs / math.log(10), LOG10_FLOOR))
        text.append([_tokens_cell(tokens) for tokens in spans[f"{side}_tokens"].tolist()])
        # k: the fewest alternatives listed at a span (a token outside the top k is listed as
        # an extra, k+1-th entry, and its rank k+1 reads ">k", as in the popup).
        sizes = [len(t) for t in spans[f"{side}_top"].tolist() if isinstance(t, dict) and t]
        top_k = min(sizes, default=0)
        rows = spans.itertuples(index=False)
        hover.append([_hover(row, side, sides, top_k) for row in rows])
    levels = np.arange(LOG10_FLOOR, 0.5)
    return go.Heatmap(
        z=np.array(z),
        x=xs,
        y=[0, 1],
        text=text,
        texttemplate="%{text}",
        customdata=hover,
        hovertemplate="%{customdata}<extra></extra>",
        colorscale=[list(stop) for stop in PROB_COLORSCALE],
        zmin=LOG10_FLOOR,
        zmax=0.0,
        xgap=2,
        ygap=2,
        colorbar={
            "title": {"text": "probability<br>(log scale)"},
            "tickvals": levels.tolist(),
            "ticktext": [f"≤{10**LOG10_FLOOR:g}", *(f"{10**v:g}" for v in levels[1:])],
            "len": 0.55,
            "y": 1.0,
            "yanchor": "top",
        },
    )


def _difference_bars(
    spans: pd.DataFrame, sides: tuple[str, str], xs: list[int], disagree: np.ndarray
) -> go.Bar:
    a = pd.to_numeric(spans["a_logprob"], errors="coerce").to_numpy(dtype=float)
    b = pd.to_numeric(spans["b_logprob"], errors="coerce").to_numpy(dtype=float)
    return go.Bar(
        x=xs,
        y=a - b,
        marker_color=[_DISAGREE_COLOR if d else _AGREE_COLOR for d in disagree],
        customdata=[visible_token(t) or "" for t in spans["text"].tolist()],
        hovertemplate=(
            f"%{{customdata}}<br>logprob {_html.escape(sides[0])} − {_html.escape(sides[1])}"
            " %{y:.3f} nats<extra></extra>"
        ),
    )


def _outline(x: int) -> dict[str, Any]:
    """A red box around a disagreeing span, across both tracks."""
    return {
        "type": "rect",
        "xref": "x",
        "yref": "y",
        "x0": x - 0.5,
        "x1": x + 0.5,
        "y0": -0.5,
        "y1": 1.5,
        "line": {"color": _DISAGREE_COLOR, "width": 3},
        "fillcolor": "rgba(0,0,0,0)",
    }


def _as_list(tokens: Any) -> list[str]:
    if tokens is None or (isinstance(tokens, float) and math.isnan(tokens)):
        return []
    if isinstance(tokens, str):
        return [tokens]
    return [str(t) for t in tokens]


def _tokens_cell(tokens: Any) -> str:
    """A side's tokens in a span as a cell shows them: ``·Rich|ard``."""
    return "|".join(cell_token(t, limit=10) for t in _as_list(tokens))


def _span_label(text: Any, disagree: bool) -> str:
    label = cell_token(text, limit=12) or "∅"
    return f'<span style="color:{_DISAGREE_COLOR}"><b>{label}</b></span>' if disagree else label


def _top_text(top: Any) -> str:
    if not isinstance(top, dict) or not top:
        return "none"
    return ", ".join(
        f"{_html.escape(visible_token(t) or '', quote=False)} {math.exp(lp):.1%}"
        for t, lp in list(top.items())[:5]
    )


def _rank_text(rank: Any, top_k: int) -> str:
    if pd.isna(rank):
        return "rank: none"
    return f"rank >{top_k}" if 0 < top_k < rank else f"rank {int(rank)}"


def _hover(row: Any, side: str, sides: tuple[str, str], top_k: int) -> str:
    """One cell's hover: what this side said about the span, and how the other compares."""
    logprob = float(getattr(row, f"{side}_logprob"))
    rank = getattr(row, f"{side}_rank")
    kl_low, kl_high = float(row.kl_lower), float(row.kl_upper)
    tokens = _as_list(getattr(row, f"{side}_tokens"))
    lines = [
        f"<b>{side}: {_html.escape(sides[0 if side == 'a' else 1])}</b>",
        f"span {row.span}: {_html.escape(visible_token(row.text) or '', quote=False)} "
        f"(bytes {row.start_byte}–{row.end_byte})",
        "tokens: " + " | ".join(cell_token(t, limit=20) for t in tokens),
        (
            f"logprob {logprob:.3f} (p {math.exp(logprob):.4f})"
            if math.isfinite(logprob)
            else "logprob: none (the text's first span)"
        ),
        _rank_text(rank, top_k),
        f"top: {_top_text(getattr(row, f'{side}_top'))}",
    ]
    if math.isfinite(kl_low):
        lines.append(f"KL(a ‖ b) {kl_low:.3f} to {kl_high:.3f} nats")
    if bool(row.disagree):
        lines.append(f"<span style='color:{_DISAGREE_COLOR}'>the sides disagree</span>")
    return "<br>".join(lines)
