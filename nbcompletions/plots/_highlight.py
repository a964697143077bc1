"""Tokens coloured by probability as self-contained HTML: no plotly, no script tags, no URLs.

Each token is a ``<details>`` element: its ``<summary>`` is the coloured token, and its body is a
popup card (inline styles only) with the token's probability, rank and the alternatives at that
position. A click (or a tap, or Enter) opens it and another closes it, with no JavaScript:
``<details>``, ``<summary>`` and the inline styles used here are all on the allow-lists of
JupyterLab's HTML sanitizer (which drops ``<style>`` blocks, ``:hover`` rules and scripts), and
GitHub and nbviewer keep them too. Native ``title`` tooltips, used before, were slow to appear, set
in a proportional font, not selectable and unreachable on a touch screen.

The popup floats over the text under its token (``position:absolute``): it neither splits the
line nor pushes the lines below down, and the text reserves room under its last line for the
tallest popup, so an output area that scrolls its overflow does not cut one off. The tokens of
one highlight share a ``<details name=...>`` group, so the browser keeps one popup open at a
time (an exclusive accordion). Where the output is trusted (a notebook run in this session,
VS Code, a saved HTML page), one ``onclick`` on the text also closes the open popup on a click
elsewhere or on Escape; a sanitizer drops that attribute, and the popups still open and close.
"""

from __future__ import annotations

import hashlib
import html as _html
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from .._visible import visible_token
from ._checks import (
    as_floats,
    bool_flags,
    check_one_completion,
    check_option,
    check_positive_int,
    drop_echo,
    echo_mask,
    require_frame,
    select_index,
)
from ._colors import LOG10_FLOOR, MISSING_PROB_COLOR, prob_color

__all__ = ["HIGHLIGHT_SCALES", "HighlightedText", "highlight"]

#: What the colour of a token can stand for; see :func:`highlight`.
HIGHLIGHT_SCALES = ("logprob", "rank", "prob")


class HighlightedText:
    """Tokens coloured by probability as self-contained HTML (inline CSS, no script tags, no URLs).

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


def _running_text(token: str) -> str:
    """HTML for a token in running text: escaped, controls visible, newlines as ↵."""
    return _html.escape(visible_token(token, spaces=False) or "", quote=False)


# Inline styles, repeated on every token (a sanitizer keeps no <style> block), so kept short.
# inline-block, not inline: a <details> lays out its (closed) body as a block, which would put
# every token on its own line. So a newline's line break goes after its token, outside the box.
# The popup is position:absolute under its token (relative to the <details>), so it floats over
# the text instead of taking a place in it; the text reserves room below for it (see _reserve).
_DETAILS = "display:inline-block;vertical-align:top;position:relative"
_SUMMARY = "display:inline;list-style:none;cursor:pointer"
_POPUP_FONT_PX, _POPUP_LINE_HEIGHT = 12, 1.4
_POPUP = (
    "position:absolute;top:100%;left:0;z-index:1000;margin-top:2px;padding:3px 6px;"
    "background:#fff;color:#000;border:1px solid #888;border-radius:3px;"
    "box-shadow:0 2px 6px rgba(0,0,0,0.25);white-space:pre;font-style:normal;"
    f"font-size:{_POPUP_FONT_PX}px;line-height:{_POPUP_LINE_HEIGHT};text-align:left;"
    "font-weight:normal"
)

# Where scripts run (trusted output), the first click in a highlight installs three listeners for
# the page: a click outside an open popup's token, or Escape, closes it, and a popup that would
# run past the right edge of the text (or the window) opens leftwards from its token's right
# edge instead. One attribute on the text, not per token; a sanitizer drops it and the <details>
# still open and close on their own. ("toggle" does not bubble; a capturing listener sees it.)
POPUP_HANDLER = (
    "if(!window.nbcPopups){window.nbcPopups=1;"
    "var c=function(t){document.querySelectorAll('.nbc-highlight details[open]')"
    ".forEach(function(d){if(!t||!d.contains(t))d.open=false})};"
    "document.addEventListener('click',function(e){c(e.target)},true);"
    "document.addEventListener('keydown',function(e){if(e.key==='Escape')c(null)},true);"
    "document.addEventListener('toggle',function(e){var d=e.target;"
    "if(!d.open||!d.closest||!d.closest('.nbc-highlight'))return;"
    "var p=d.querySelector('.nbc-popup');if(!p)return;p.style.left='0';p.style.right='auto';"
    "var r=p.getBoundingClientRect(),t=d.closest('.nbc-highlight').getBoundingClientRect();"
    "if(r.right>Math.min(t.right,document.documentElement.clientWidth))"
    "{p.style.left='auto';p.style.right='0'}},true)}"
)


def _scale_position(
    scale: str, prob: np.ndarray, ranks: np.ndarray | None, top_k: int
) -> np.ndarray:
    """Where each token sits on the colour scale, 0 (red) to 1 (green); NaN where unknown."""
    if scale == "prob":
        return prob
    if scale == "logprob":
        with np.errstate(divide="ignore", invalid="ignore"):
            log10 = np.log10(prob)
        on_scale: np.ndarray = np.clip((log10 - LOG10_FLOOR) / -LOG10_FLOOR, 0.0, 1.0)
        return on_scale
    assert ranks is not None  # checked by the caller: scale="rank" needs the rank column
    # Rank 1 is green and "beyond the top k" red, in k even steps.
    by_rank: np.ndarray = 1.0 - (np.minimum(ranks, top_k + 1) - 1.0) / top_k
    return by_rank


def _legend_scale(scale: str, top_k: int, ranks_known: bool) -> str:
    def swatch(position: float, label: str) -> str:
        return (
            f'<span style="background:{prob_color(position)};padding:0 0.4em">'
            f"{_html.escape(label)}</span>"
        )

    if scale == "logprob":
        levels = [(-4.0, "≤0.0001"), (-3.0, "0.001"), (-2.0, "0.01"), (-1.0, "0.1"), (0.0, "1")]
        swatches = "".join(swatch((lg - LOG10_FLOOR) / -LOG10_FLOOR, lab) for lg, lab in levels)
        return f"colour: probability, log scale (scale=&quot;logprob&quot;) {swatches}"
    if scale == "prob":
        swatches = "".join(swatch(v, f"{v:g}") for v in (0.0, 0.25, 0.5, 0.75, 1.0))
        return f"colour: probability, linear scale (scale=&quot;prob&quot;) {swatches}"
    steps = [swatch(1.0 - (r - 1) / top_k, str(r)) for r in range(1, top_k + 1)]
    steps.append(swatch(0.0, f">{top_k}" if ranks_known else str(top_k + 1)))
    return (
        "colour: rank among the alternatives, 1 = the model&#x27;s first choice "
        f"(scale=&quot;rank&quot;) {''.join(steps)}"
    )


def highlight(
    tokens: pd.DataFrame,
    *,
    alternatives: pd.DataFrame | None = None,
    index: int = 0,
    position: str = "position",
    token: str = "token",
    prob: str = "prob",
    scale: str = "logprob",
    echo: bool = True,
    max_positions: int = 5000,
    title: str | None = None,
    popup_room: bool = True,
) -> HighlightedText:
    """The text of one choice with each token's background coloured by how likely it was.

    ``scale`` says what the colour shows; a legend under the text names it and its colours:

    - ``"logprob"`` (default): the probability on a log scale, log10 p from -4 (p <= 0.0001, red)
      through -2 (p = 0.01, yellow) to 0 (p = 1, green). A linear scale paints everything below
      p = 0.1 the same red, and most tokens of a sampled text are there.
    - ``"rank"``: the token's rank among the alternatives (needs a ``rank`` column): 1 green,
      then even steps to red for a token outside the top k (without the ``alternatives`` frame,
      k is unknown and red is the largest rank present).
    - ``"prob"``: the probability on a linear scale, 0 red, 0.5 yellow, 1 green.

    Tokens without a logprob are grey. Clicking a token opens a popup floating under it with its
    text (whitespace visible), probability, logprob, rank and, given ``alternatives``, the top
    alternatives there, as selectable fixed-width text; one popup is open at a time (see the
    module's notes); ``popup_room=False`` drops the room kept under the text for it, where
    content below may be covered. Echoed prompt tokens are in italics (``echo=False`` leaves them
    out); at most ``max_positions`` tokens show, and the legend says when the text was cut.
    """
    function = "highlight"
    check_option(function, "scale", scale, HIGHLIGHT_SCALES)
    columns = ["index", position, token, prob, "rank" if scale == "rank" else None]
    require_frame(tokens, columns, function=function, frame_name="tokens")
    if alternatives is not None:
        columns = ["index", "position", "rank", "token", "prob"]
        require_frame(alternatives, columns, function=function, frame_name="alternatives")
    check_positive_int(function, "max_positions", max_positions)
    selected = select_index(tokens, index, function=function, frame_name="tokens")
    frame = drop_echo(selected, echo, function=function).sort_values(position, kind="stable")
    check_one_completion(frame, [position], function=function, frame_name="tokens")
    total, frame = len(frame), frame.iloc[:max_positions]

    popups = _popup_alternatives(alternatives, index, frame[position])
    probs = as_floats(frame[prob])
    ranks = as_floats(frame["rank"]) if "rank" in frame.columns else None
    # A rank past the k returned alternatives only says "not in the top k". Where the sampled
    # token is outside the top k it comes as an extra (k+1-th) entry, so k is the fewest entries
    # at any position, not the count at this one.
    top_k = min((len(entries) for entries in popups.values()), default=0)
    scale_k = _scale_k(scale, top_k, ranks)
    colors = [prob_color(p) for p in _scale_position(scale, probs, ranks, scale_k)]
    logprobs = as_floats(frame["logprob"]) if "logprob" in frame.columns else None
    texts = [_token_text(t) for t in frame[token].tolist()]
    positions = frame[position].tolist()
    rows = _TokenRows(position, positions, texts, probs, logprobs, ranks, echo_mask(frame), top_k)
    group = (
        "nbc-"
        + hashlib.sha1(
            repr((rows.positions, rows.texts)).encode(), usedforsecurity=False
        ).hexdigest()[:10]
    )
    parts, popup_lines = [], 3
    for row in range(len(frame)):
        lines = _popup_lines(rows, row, popups.get(rows.positions[row], []))
        popup_lines = max(popup_lines, len(lines))
        parts.append(_token_html(rows, row, lines, colors[row], group))
    legend = _legend(scale, scale_k, top_k > 0, bool(rows.prompt.any()))
    if total > len(frame):
        legend.append(
            f"showing the first {len(frame):,} of {total:,} tokens (max_positions={max_positions})"
        )
    body = _page(parts, legend, title, _reserve(popup_lines) if popup_room else 0)
    return HighlightedText(body, n_tokens=len(frame), title=title)


def _scale_k(scale: str, top_k: int, ranks: np.ndarray | None) -> int:
    """The k of the rank scale; without the alternatives k is unknown: green for rank 1 to red
    for the largest rank present."""
    if scale != "rank" or top_k > 0:
        return top_k
    finite = ranks[np.isfinite(ranks)] if ranks is not None else np.array([])
    return max(int(finite.max()) - 1 if finite.size else 1, 1)


def _token_text(token: Any) -> str:
    return "" if token is None or (isinstance(token, float) and math.isnan(token)) else str(token)


def _popup_alternatives(
    alternatives: pd.DataFrame | None, index: int, positions: pd.Series[Any]
) -> dict[Any, list[str]]:
    """The popup's lines of alternatives, by position: ``" 12.34%  ·the  ◀ chosen"``."""
    popups: dict[Any, list[str]] = {}
    if alternatives is None:
        return popups
    alt = alternatives[alternatives["index"] == index]
    alt = alt[alt["position"].isin(positions)].sort_values(["position", "rank"])
    has_chosen = "chosen" in alt.columns
    for pos, alt_token, alt_prob, is_chosen in zip(
        alt["position"].tolist(),
        alt["token"].tolist(),
        as_floats(alt["prob"]),
        bool_flags(alt["chosen"]).tolist() if has_chosen else [False] * len(alt),
        strict=True,
    ):
        popups.setdefault(pos, []).append(
            f"{alt_prob:7.2%}  {visible_token(alt_token) or ''}{'  ◀ chosen' if is_chosen else ''}"
        )
    return popups


class _TokenRows(NamedTuple):
    """What each token's summary and popup are made of, one entry per token."""

    position: str
    positions: list[Any]
    texts: list[str]
    probs: np.ndarray
    logprobs: np.ndarray | None
    ranks: np.ndarray | None
    prompt: np.ndarray
    top_k: int


def _popup_lines(rows: _TokenRows, row: int, alternatives: list[str]) -> list[str]:
    p = rows.probs[row]
    facts = [f"p {p:.4f}" if math.isfinite(p) else "no logprob"]
    if rows.logprobs is not None and math.isfinite(rows.logprobs[row]):
        facts.append(f"logprob {rows.logprobs[row]:.3f}")
    if rows.ranks is not None and math.isfinite(rows.ranks[row]):
        rank = rows.ranks[row]
        facts.append(f"rank >{rows.top_k}" if 0 < rows.top_k < rank else f"rank {int(rank)}")
    lines = [
        f"{visible_token(rows.texts[row])}",
        "  ".join(facts),
        f"{rows.position} {rows.positions[row]}{' (prompt)' if rows.prompt[row] else ''}",
    ]
    if alternatives:
        lines += ["alternatives:", *alternatives]
    return lines


def _token_html(rows: _TokenRows, row: int, lines: list[str], color: str, group: str) -> str:
    text, p = rows.texts[row], rows.probs[row]
    style = f"{_SUMMARY};background:{color}"
    if rows.prompt[row]:
        style += ";font-style:italic"
    data_prob = f"{p:.6g}" if math.isfinite(p) else ""
    return (
        f'<details name="{group}" style="{_DETAILS}">'
        f'<summary style="{style}" data-prob="{data_prob}">{_running_text(text)}</summary>'
        f'<div class="nbc-popup" style="{_POPUP}">'
        f"{_html.escape(chr(10).join(lines), quote=False)}</div></details>"
        + "<br>"
        * text.count("\n")
    )


def _reserve(popup_lines: int) -> int:
    """Pixels under the text for the tallest popup of its last line (less the legend's line)."""
    popup_px = popup_lines * _POPUP_FONT_PX * _POPUP_LINE_HEIGHT + 12
    return max(0, math.ceil(popup_px) - 20)


def _legend(scale: str, scale_k: int, ranks_known: bool, has_prompt: bool) -> list[str]:
    legend = [_legend_scale(scale, scale_k, ranks_known=ranks_known)]
    legend.append(
        f'<span style="background:{MISSING_PROB_COLOR};padding:0 0.4em">grey</span> no logprob'
    )
    if has_prompt:
        legend.append("<i>italic</i>: prompt (echo)")
    # True with or without scripts (a sanitized notebook has no Escape or click-elsewhere).
    legend.append("↵: newline · click a token for details, again to close them")
    return legend


def _page(parts: list[str], legend: list[str], title: str | None, reserve_px: int) -> str:
    heading = (
        f'<div style="font-weight:bold;margin-bottom:4px">{_html.escape(title)}</div>'
        if title
        else ""
    )
    return (
        f'<div class="nbc-highlight" onclick="{POPUP_HANDLER}" '
        'style="font-family:ui-monospace,SFMono-Regular,Menlo,'
        "Consolas,monospace;font-size:13px;line-height:1.8;color:#000;"
        f'padding-bottom:{reserve_px}px">'
        f"{heading}"
        '<div style="white-space:pre-wrap;word-break:break-word">' + "".join(parts) + "</div>"
        '<div style="margin-top:6px;font-size:11px;color:#444;white-space:normal">'
        + " · ".join(legend)
        + "</div></div>"
    )
