"""A metric against a swept parameter: the mean over repeats with its confidence interval."""

from __future__ import annotations

import html as _html
import math
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from .._visible import visible_token
from ..metrics import summarize
from ._checks import _check_option, _require
from ._style import _PALETTE, _count, _layout, _rgba, _title

__all__ = ["mean_ci"]


def mean_ci(
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
    function = "mean_ci"
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
    # The statistics are metrics.summarize's (Student t), the one implementation in the package.
    stats = summarize(
        choices,
        by=keys,
        value=y,
        ci=0.95 if ci is None else ci,
        error=error if error is not None and error in choices.columns else None,
    ).rename(columns={"n": "count", "ci_low": "low", "ci_high": "high"})
    notes: list[str] = []
    if stats.attrs["n_failed"]:
        notes.append(f"{_count(stats.attrs['n_failed'], 'failed request')} left out")
    if stats.attrs["n_missing"][y]:
        notes.append(f"{_count(stats.attrs['n_missing'][y], 'row')} without {y} left out")
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
            # The legend's title names the column; each entry is the value alone.
            label = y if color is None else _category(value)
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
                        (f"{_html.escape(color)} {_html.escape(label)}<br>" if color else "")
                        + f"{x} %{{x}}<br>mean {y} %{{y:.4g}}"
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
    # The title says these are means; "mean mean_logprob" on the axis said it twice.
    fig.update_yaxes(title_text=y, row=1, col=1)
    finite = stats[["mean", "low", "high"]].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if finite.size and finite.min() >= 0:
        # Rates and counts: the axis starts at 0 (not at -1 when every mean is 0).
        fig.update_yaxes(rangemode="tozero")
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
