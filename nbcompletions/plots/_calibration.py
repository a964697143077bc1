"""Reliability diagrams: reported probability against how often it came true, with intervals."""

from __future__ import annotations

import html as _html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from ..metrics import reliability
from ._checks import require_frame
from ._style import PALETTE, apply_layout, count_of, figure_title, group_label, split_groups

__all__ = ["calibration"]

#: What a `metrics.calibration` (or `metrics.reliability`) frame holds, and what is drawn from it.
BINNED_COLUMNS = ("mean_prob", "observed", "observed_low", "observed_high", "count")

_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross")


def calibration(
    frame: pd.DataFrame,
    *,
    prob: str | None = None,
    correct: str | None = None,
    color: str | None = None,
    bins: int = 10,
    ci: float = 0.95,
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """A reliability diagram: reported probability (x) against how often it came true (y).

    Two kinds of frame:

    - the output of `metrics.calibration` (token level: the probability the endpoint reported
      for each top-k alternative against whether it was sampled), drawn as it is;
    - with ``prob`` and ``correct``, one row per answer (answer level: the probability of the
      label token the model answered against whether the answer was right), binned here by
      `metrics.reliability` into ``bins`` bins.

    Each bin is a point at its mean reported probability with a Wilson interval at level ``ci``
    on the observed frequency (inside [0, 1], also for a bin of 0 or n hits), sized by its count;
    the diagonal is perfect calibration. ``color`` draws one line per value of a column (a sweep
    axis such as ``temperature``, present in the frame), with its expected calibration error
    (ECE: the count-weighted mean distance from the diagonal) in the legend. A bar chart of the
    counts per bin sits below: a bin of 3 events says little.
    """
    function = "calibration"
    if (prob is None) != (correct is None):
        raise ValueError(
            f"{function}(): pass both prob= and correct= (one row per answer), or neither (a "
            f"metrics.calibration frame); got prob={prob!r}, correct={correct!r}"
        )
    level = ci
    if prob is not None and correct is not None:
        require_frame(frame, [prob, correct, color], function=function, frame_name="answers")
        binned = reliability(frame, prob=prob, correct=correct, by=color, bins=bins, ci=ci)
        what, x_title, y_title = "answers", f"probability given the answer ({prob})", "share right"
    else:
        require_frame(frame, [*BINNED_COLUMNS, color], function=function, frame_name="calibration")
        binned = frame
        level = float(frame.attrs.get("ci", ci))
        what, x_title = "events", "reported probability"
        y_title = "share sampled" if "n_chosen" in frame.columns else "observed frequency"
    fig = _diagram(x_title, y_title, what)
    groups = split_groups(binned, color)
    for number, (value, group) in enumerate(groups):
        _add_group(fig, group.sort_values("mean_prob"), number, group_label(color, value), what)
    counts = binned["count"].to_numpy(dtype=float)
    notes = [
        f"points: share ± {level * 100:.4g}% CI (Wilson score) per probability bin",
        f"{count_of(int(counts.sum()), what[:-1])}",
    ]
    if prob is not None and binned.attrs.get("n_missing"):
        notes.append(
            f"{count_of(binned.attrs['n_missing'], 'row')} without prob or verdict left out"
        )
    apply_layout(
        fig,
        title=figure_title("Calibration: reported probability against outcome", title, notes),
        height=height if height is not None else 620,
        width=width,
    )
    fig.update_layout(legend_title_text=color or "", barmode="group")
    return fig


def _diagram(x_title: str, y_title: str, what: str) -> go.Figure:
    """The empty reliability diagram: the diagonal above, the count bars' row below."""
    fig = make_subplots(
        rows=2, cols=1, shared_xaxes=True, row_heights=[0.75, 0.25], vertical_spacing=0.05
    )
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            line={"color": "#888888", "dash": "dash", "width": 1},
            name="calibrated",
            hoverinfo="skip",
        ),
        row=1,
        col=1,
    )
    fig.update_xaxes(range=[-0.02, 1.02], row=1, col=1)
    fig.update_xaxes(range=[-0.02, 1.02], title_text=x_title, row=2, col=1)
    fig.update_yaxes(range=[-0.02, 1.02], title_text=y_title, row=1, col=1)
    fig.update_yaxes(title_text=what, rangemode="tozero", row=2, col=1)
    return fig


def expected_calibration_error(group: pd.DataFrame) -> float:
    """Count-weighted mean of |observed - mean reported probability| over the bins."""
    counts = group["count"].to_numpy(dtype=float)
    gaps = np.abs(
        group["observed"].to_numpy(dtype=float) - group["mean_prob"].to_numpy(dtype=float)
    )
    return float((counts * gaps).sum() / counts.sum()) if counts.sum() else float("nan")


def _add_group(fig: go.Figure, group: pd.DataFrame, number: int, label: str, what: str) -> None:
    color = PALETTE[number % len(PALETTE)]
    observed = group["observed"].to_numpy(dtype=float)
    low = group["observed_low"].to_numpy(dtype=float)
    high = group["observed_high"].to_numpy(dtype=float)
    counts = group["count"].to_numpy(dtype=float)
    ece = expected_calibration_error(group)
    name = f"{label} (ECE {ece:.3f})" if label != "all" else f"ECE {ece:.3f}"
    sizes = 6 + 14 * np.sqrt(counts / counts.max()) if counts.size and counts.max() else 8
    fig.add_trace(
        go.Scatter(
            x=group["mean_prob"].to_numpy(dtype=float),
            y=observed,
            error_y={"type": "data", "array": high - observed, "arrayminus": observed - low},
            mode="lines+markers",
            line={"color": color, "width": 1},
            marker={"color": color, "size": sizes, "symbol": _SYMBOLS[number % len(_SYMBOLS)]},
            name=name,
            legendgroup=label,
            customdata=np.column_stack([low, high, counts]),
            hovertemplate=(
                "reported %{x:.3f}<br>observed %{y:.3f} (%{customdata[0]:.3f} to "
                f"%{{customdata[1]:.3f}})<br>%{{customdata[2]:,}} {what}"
                f"<extra>{_html.escape(label)}</extra>"
            ),
        ),
        row=1,
        col=1,
    )
    centres = group["mean_prob"].to_numpy(dtype=float)
    if {"prob_low", "prob_high"} <= set(group.columns):
        centres = (
            group["prob_low"].to_numpy(dtype=float) + group["prob_high"].to_numpy(dtype=float)
        ) / 2
    fig.add_trace(
        go.Bar(
            x=centres,
            y=counts,
            marker_color=color,
            name=f"{label} count",
            legendgroup=label,
            showlegend=False,
            hovertemplate=f"%{{y:,}} {what}<extra>{_html.escape(label)}</extra>",
        ),
        row=2,
        col=1,
    )
