"""The probability colour scale, shared by the heat map and the highlighted text (no plotly)."""

from __future__ import annotations

import itertools
import math

#: Probability 0 -> red, 0.5 -> yellow, 1 -> green (the spreadsheet "traffic light" scale); light
#: enough that black text stays readable on it, shared by the heat map and :func:`highlight`.
PROB_COLORSCALE: tuple[tuple[float, str], ...] = (
    (0.0, "#f8696b"),
    (0.5, "#ffeb84"),
    (1.0, "#63be7b"),
)

MISSING_PROB_COLOR = "#e0e0e0"

#: The log scales (``scale="logprob"``) span log10 p from this floor (red) to 0 (green): one in
#: 10,000 to certain. Most tokens of a sampled text lie below p = 0.1, where a linear scale is red.
LOG10_FLOOR = -4.0


def prob_color(prob: float) -> str:
    """The colour of a position ``prob`` in [0, 1] on :data:`PROB_COLORSCALE` (NaN: grey)."""
    if not math.isfinite(prob):
        return MISSING_PROB_COLOR
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
