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

:func:`highlight` needs no plotly: it returns self-contained HTML (inline CSS, no script tags, no
URLs; its popups work without JavaScript, and where scripts run one ``onclick`` also closes them
on Escape or a click elsewhere) that renders the same on GitHub, nbviewer, VS Code and in
exported HTML.

Each family has its own module (``_tokens``, ``_alternatives``, ``_mean_ci``, ``_highlight``,
``_calibration``, ``_compare``);
they load on first use, so ``plots.highlight`` runs without importing plotly at all.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = [
    "PROB_COLORSCALE",
    "WEBGL_THRESHOLD",
    "HighlightedText",
    "alternatives",
    "calibration",
    "compare",
    "entropy",
    "highlight",
    "mean_ci",
    "rank_histogram",
    "token_probabilities",
]

# name -> module that defines it; resolved lazily by __getattr__ below.
_LAZY: dict[str, str] = {
    "PROB_COLORSCALE": "._colors",
    "WEBGL_THRESHOLD": "._style",
    "HighlightedText": "._highlight",
    "highlight": "._highlight",
    "alternatives": "._alternatives",
    "calibration": "._calibration",
    "compare": "._compare",
    "entropy": "._tokens",
    "rank_histogram": "._tokens",
    "token_probabilities": "._tokens",
    "mean_ci": "._mean_ci",
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from ._alternatives import alternatives
    from ._calibration import calibration
    from ._colors import PROB_COLORSCALE
    from ._compare import compare
    from ._highlight import HighlightedText, highlight
    from ._mean_ci import mean_ci
    from ._style import WEBGL_THRESHOLD
    from ._tokens import entropy, rank_histogram, token_probabilities


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'nbcompletions.plots' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
