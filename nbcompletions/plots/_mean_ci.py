"""A metric against a swept parameter: the mean over repeats with its confidence interval."""

from __future__ import annotations

import html as _html
import math
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .._visible import visible_token
from ..metrics import BOOTSTRAP_RESAMPLES, INTERVALS, summarize
from ._checks import check_option, require_frame
from ._style import PALETTE, apply_layout, count_of, figure_title, rgba_color

__all__ = ["mean_ci"]


#: How each interval is named in the subtitle, by `metrics.summarize`'s ``interval``.
_INTERVAL_NAMES = {
    "wilson": "Wilson score",
    "bootstrap": f"percentile bootstrap, {BOOTSTRAP_RESAMPLES:,} resamples",
}

#: Markers and dashes per colour: lines that coincide (distinct_2 at 1.0 everywhere) stay told
#: apart where they overlap.
_SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "cross", "star", "hexagon")
_DASHES = ("solid", "dash", "dot", "dashdot", "longdash", "longdashdot")


def mean_ci(
    choices: pd.DataFrame,
    *,
    x: str,
    y: str,
    color: str | None = None,
    facet_col: str | None = None,
    ci: float | None = 0.95,
    interval: str = "bars",
    ci_method: str = "auto",
    error: str | None = "error",
    title: str | None = None,
    height: int | None = None,
    width: int | None = None,
) -> go.Figure:
    """A metric against a swept parameter: the mean over repeats with its confidence interval.

    Rows are grouped by ``x`` (and ``color``, ``facet_col``); each group's mean of ``y`` is drawn
    with an interval at level ``ci`` (``None``: no interval) as error bars (``interval="bars"``)
    or a shaded band (``"band"``). The interval is `metrics.summarize`'s, picked by ``ci_method``
    so that it stays inside the metric's range: ``"auto"`` takes Wilson for a bool column and a
    seeded percentile bootstrap for any other (a group of one has none); the subtitle names it.
    A numeric ``x`` is drawn as lines; any other as categories. Lines of different ``color``
    get their own marker and dash and are set slightly apart along a numeric ``x``, so lines
    that coincide stay visible. Rows whose ``error`` column is set (failed requests) and rows
    without a ``y`` value are left out, and the title says how many.
    """
    function = "mean_ci"
    require_frame(choices, [x, y, color, facet_col], function=function, frame_name="choices")
    check_option(function, "interval", interval, ("bars", "band"))
    check_option(function, "ci_method", ci_method, INTERVALS)
    if ci is not None and (
        isinstance(ci, bool) or not isinstance(ci, float | int) or not 0 < ci < 1
    ):
        raise ValueError(f"{function}(): ci must be a level in (0, 1) or None, got {ci!r}")
    if not pd.api.types.is_numeric_dtype(choices[y]):
        raise ValueError(
            f"{function}(): column {y!r} must be numeric (or bool) to average, it holds "
            f"{choices[y].dtype}"
        )
    keys = list(dict.fromkeys(c for c in (facet_col, color, x) if c is not None))
    stats = summarize(
        choices,
        by=keys,
        value=y,
        ci=0.95 if ci is None else ci,
        error=error if error is not None and error in choices.columns else None,
        interval=ci_method,
    ).rename(columns={"n": "count", "ci_low": "low", "ci_high": "high"})
    x_numeric = pd.api.types.is_numeric_dtype(choices[x]) and not pd.api.types.is_bool_dtype(
        choices[x]
    )
    plan = _Plan(x, y, color, ci, interval, x_numeric, _dodge_step(stats[x], x_numeric))
    fig, facets = _facet_figure(stats, facet_col)
    colors = _sorted_values(stats, color)
    for column, facet in enumerate(facets, start=1):
        in_facet = stats if facet_col is None else stats[_equal(stats[facet_col], facet)]
        for number, value in enumerate(colors):
            series = in_facet if color is None else in_facet[_equal(in_facet[color], value)]
            if not series.empty:
                _add_series(fig, plan, series, number, len(colors), value, column)
        fig.update_xaxes(title_text=x, row=1, col=column)
        if not x_numeric:
            fig.update_xaxes(type="category", row=1, col=column)
    _finish_layout(fig, plan, stats, title=title, height=height, width=width)
    return fig


class _Plan(NamedTuple):
    """What every series of one `mean_ci` figure shares."""

    x: str
    y: str
    color: str | None
    ci: float | None
    interval: str
    x_numeric: bool
    dodge: float


def _dodge_step(xs: pd.Series[Any], x_numeric: bool) -> float:
    """How far apart along x the lines of different colours are set: 1/40 of the smallest gap
    between x values, too little to misread and enough to see two lines that coincide."""
    if not x_numeric:
        return 0.0
    values = np.unique(pd.to_numeric(xs, errors="coerce").to_numpy(dtype=float))
    values = values[np.isfinite(values)]
    return float(np.diff(values).min()) / 40 if values.size > 1 else 0.0


def _sorted_values(stats: pd.DataFrame, column: str | None) -> list[Any]:
    if column is None:
        return [None]
    return sorted(pd.unique(stats[column]), key=_sort_key)


def _facet_figure(stats: pd.DataFrame, facet_col: str | None) -> tuple[go.Figure, list[Any]]:
    facets = _sorted_values(stats, facet_col)
    if facet_col is None:
        return make_subplots(rows=1, cols=1), facets
    fig = make_subplots(
        rows=1,
        cols=len(facets),
        shared_yaxes=True,
        subplot_titles=[f"{facet_col}={_category(value)}" for value in facets],
    )
    return fig, facets


def _level(plan: _Plan) -> str:
    return f"{plan.ci * 100:.4g}% CI" if plan.ci is not None else ""


def _add_series(
    fig: go.Figure,
    plan: _Plan,
    series: pd.DataFrame,
    number: int,
    n_colors: int,
    value: Any,
    column: int,
) -> None:
    """One colour's means (and its band or error bars) in one facet."""
    x, y, color = plan.x, plan.y, plan.color
    series = (
        series.sort_values(x)
        if plan.x_numeric
        else series.sort_values(x, key=lambda s: s.map(_sort_key))
    )
    line_color = PALETTE[number % len(PALETTE)]
    # The legend's title names the column; each entry is the value alone.
    label = y if color is None else _category(value)
    xs = series[x].to_numpy() if plan.x_numeric else series[x].map(_category).to_numpy()
    if plan.x_numeric and n_colors > 1:
        xs = xs.astype(float) + (number - (n_colors - 1) / 2) * plan.dodge
    means = series["mean"].to_numpy(dtype=float)
    lows, highs = series["low"].to_numpy(dtype=float), series["high"].to_numpy(dtype=float)
    has_interval = plan.ci is not None and bool(np.isfinite(highs).any())
    if plan.interval == "band" and has_interval and plan.x_numeric:
        band = np.isfinite(highs)
        fig.add_trace(
            go.Scatter(
                x=np.concatenate([xs[band], xs[band][::-1]]),
                y=np.concatenate([highs[band], lows[band][::-1]]),
                fill="toself",
                fillcolor=rgba_color(line_color, 0.2),
                line={"width": 0},
                hoverinfo="skip",
                showlegend=False,
                legendgroup=label,
                name=f"{label} {_level(plan)}",
            ),
            row=1,
            col=column,
        )
    error_y = None
    if (plan.interval == "bars" or not plan.x_numeric) and has_interval:
        error_y = {"type": "data", "array": highs - means, "arrayminus": means - lows}
        error_y["visible"] = True
    # The hover shows the group's own x, not the x it was set apart to.
    shown_x = series[x].astype(str) if plan.x_numeric else series[x].map(_category)
    customdata = np.column_stack(
        [lows, highs, series["count"].to_numpy(dtype=float), shown_x.to_numpy()]
    )
    in_legend = {trace.name for trace in fig.data if trace.showlegend is not False}
    fig.add_trace(
        go.Scatter(
            x=xs,
            y=means,
            mode="lines+markers" if plan.x_numeric else "markers",
            line={"color": line_color, "dash": _DASHES[number % len(_DASHES)]},
            marker={
                "color": line_color,
                "size": 8,
                "symbol": _SYMBOLS[number % len(_SYMBOLS)],
                "line": {"color": "white", "width": 1},
            },
            error_y=error_y,
            name=label,
            legendgroup=label,
            showlegend=label not in in_legend,
            customdata=customdata,
            hovertemplate=_hovertemplate(plan, label),
        ),
        row=1,
        col=column,
    )


def _hovertemplate(plan: _Plan, label: str) -> str:
    color = plan.color
    return (
        (f"{_html.escape(color)} {_html.escape(label)}<br>" if color else "")
        + f"{plan.x} %{{customdata[3]}}<br>mean {plan.y} %{{y:.4g}}"
        + (
            f"<br>{_level(plan)} %{{customdata[0]:.4g}} to %{{customdata[1]:.4g}}"
            if plan.ci is not None
            else ""
        )
        + f"<br>n %{{customdata[2]}}<extra>{_html.escape(label)}</extra>"
    )


def _finish_layout(
    fig: go.Figure,
    plan: _Plan,
    stats: pd.DataFrame,
    *,
    title: str | None,
    height: int | None,
    width: int | None,
) -> None:
    """Axes, legend and the title, whose subtitle names the interval and what was left out."""
    y = plan.y
    # The title says these are means; "mean mean_logprob" on the axis said it twice.
    fig.update_yaxes(title_text=y, row=1, col=1)
    finite = stats[["mean", "low", "high"]].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size and finite.min() >= 0:
        # Rates and counts: the axis starts at 0 (not at -1 when every mean is 0).
        fig.update_yaxes(rangemode="tozero")
    what = "mean over repeats"
    if plan.ci is not None:
        method = _INTERVAL_NAMES[stats.attrs["interval"][y]]
        what = f"mean ± {_level(plan)} ({method}) over repeats"
    notes = [what]
    if stats.attrs["n_failed"]:
        notes.append(f"{count_of(stats.attrs['n_failed'], 'failed request')} left out")
    if stats.attrs["n_missing"][y]:
        notes.append(f"{count_of(stats.attrs['n_missing'][y], 'row')} without {y} left out")
    means = stats["mean"].to_numpy(dtype=float)
    if plan.color is not None and len(stats) > 1 and np.ptp(means) == 0:
        notes.append(f"every mean is {means[0]:.4g}: the lines lie on top of one another")
    apply_layout(
        fig, title=figure_title(f"{y} by {plan.x}", title, notes), height=height, width=width
    )
    fig.update_layout(showlegend=plan.color is not None, legend_title_text=plan.color or "")


def _sort_key(value: Any) -> tuple[int, Any]:
    """Sort numbers numerically, then everything else by its text; missing values last."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return (2, "")
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool):
        return (0, float(value))
    return (1, str(value))


def _category(value: Any) -> str:
    """Axis label of a category; a missing request field was unset (the server default).

    Text shows its newlines and tabs (``ROMEO.↵``): two prompts that differ only there would
    otherwise get the same label.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "None"
    if isinstance(value, str):
        return visible_token(value, spaces=False) or ""
    return str(value)


def _equal(series: pd.Series[Any], value: Any) -> pd.Series[bool]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        missing: pd.Series[bool] = series.isna()
        return missing
    equal: pd.Series[bool] = series == value
    return equal
