"""Tokens coloured by probability as self-contained HTML: no plotly, no scripts, no URLs.

Each token is a ``<details>`` element: its ``<summary>`` is the coloured token, and its body is a
popup card (inline styles only) with the token's probability, rank and the alternatives at that
position, opened in place under the token. A click (or a tap, or Enter) opens it and another closes
it, with no JavaScript: ``<details>``, ``<summary>`` and the inline styles used here are all on
the allow-lists of JupyterLab's HTML sanitizer (which drops ``<style>`` blocks, ``:hover`` rules and
scripts), and GitHub and nbviewer keep them too. Native ``title`` tooltips, used before, were
slow to appear, set in a proportional font, not selectable and unreachable on a touch screen.
"""

from __future__ import annotations

import html as _html
import math
from pathlib import Path
from typing import Any

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
    """Tokens coloured by probability as self-contained HTML (inline CSS only: no scripts, no URLs).

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
# The open popup takes its place in the text (it is not position:absolute): an output area in
# JupyterLab or Notebook 7 scrolls its overflow, which cut a floating popup off at the bottom.
_DETAILS = "display:inline-block;vertical-align:top"
_SUMMARY = "display:inline;list-style:none;cursor:pointer"
_POPUP = (
    "margin:2px 4px 4px 0;padding:3px 6px;background:#fff;color:#000;border:1px solid #888;"
    "border-radius:3px;box-shadow:0 2px 6px rgba(0,0,0,0.25);white-space:pre;"
    "font-style:normal;font-size:12px;line-height:1.4;text-align:left"
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

    Tokens without a logprob are grey. Clicking (or tapping) a token opens a popup with its text
    (whitespace made visible), probability, logprob, rank and, given the ``alternatives`` frame,
    the top alternatives at that position; it is selectable text in a fixed-width font. The HTML
    uses ``<details>`` and inline CSS only (no scripts, no URLs), so it survives the sanitizers
    of JupyterLab, GitHub, nbviewer and VS Code. Echoed prompt tokens are set in italics
    (``echo=False`` leaves them out); at most ``max_positions`` tokens are shown, and the legend
    says when the text was cut.
    """
    function = "highlight"
    check_option(function, "scale", scale, HIGHLIGHT_SCALES)
    require_frame(
        tokens,
        ["index", position, token, prob, "rank" if scale == "rank" else None],
        function=function,
        frame_name="tokens",
    )
    if alternatives is not None:
        require_frame(
            alternatives,
            ["index", "position", "rank", "token", "prob"],
            function=function,
            frame_name="alternatives",
        )
    check_positive_int(function, "max_positions", max_positions)
    frame = drop_echo(
        select_index(tokens, index, function=function, frame_name="tokens"), echo, function=function
    )
    check_one_completion(frame, [position], function=function, frame_name="tokens")
    frame = frame.sort_values(position, kind="stable")
    total = len(frame)
    frame = frame.iloc[:max_positions]

    popup_alternatives: dict[Any, list[str]] = {}
    if alternatives is not None:
        alt = alternatives[alternatives["index"] == index]
        alt = alt[alt["position"].isin(frame[position])].sort_values(["position", "rank"])
        has_chosen = "chosen" in alt.columns
        for pos, alt_token, alt_prob, is_chosen in zip(
            alt["position"].tolist(),
            alt["token"].tolist(),
            as_floats(alt["prob"]),
            bool_flags(alt["chosen"]).tolist() if has_chosen else [False] * len(alt),
            strict=True,
        ):
            popup_alternatives.setdefault(pos, []).append(
                f"{alt_prob:7.2%}  {visible_token(alt_token) or ''}"
                f"{'  ◀ chosen' if is_chosen else ''}"
            )

    probs = as_floats(frame[prob])
    prompt = echo_mask(frame)
    logprobs = as_floats(frame["logprob"]) if "logprob" in frame.columns else None
    ranks = as_floats(frame["rank"]) if "rank" in frame.columns else None
    # A rank past the k returned alternatives only says "not in the top k". Where the sampled
    # token is outside the top k it comes as an extra (k+1-th) entry, so k is the fewest entries
    # at any position, not the count at this one.
    top_k = min((len(entries) for entries in popup_alternatives.values()), default=0)
    scale_k = top_k
    if scale == "rank" and scale_k == 0:
        # Without the alternatives k is unknown: green for rank 1 to red for the largest rank.
        finite = ranks[np.isfinite(ranks)] if ranks is not None else np.array([])
        scale_k = max(int(finite.max()) - 1 if finite.size else 1, 1)
    positions = _scale_position(scale, probs, ranks, scale_k)

    parts = []
    for row, (pos, tok) in enumerate(
        zip(frame[position].tolist(), frame[token].tolist(), strict=True)
    ):
        text = "" if tok is None or (isinstance(tok, float) and math.isnan(tok)) else str(tok)
        p = probs[row]
        facts = [f"p {p:.4f}" if math.isfinite(p) else "no logprob"]
        if logprobs is not None and math.isfinite(logprobs[row]):
            facts.append(f"logprob {logprobs[row]:.3f}")
        if ranks is not None and math.isfinite(ranks[row]):
            facts.append(f"rank >{top_k}" if 0 < top_k < ranks[row] else f"rank {int(ranks[row])}")
        lines = [
            f"{visible_token(text)}",
            "  ".join(facts),
            f"{position} {pos}{' (prompt)' if prompt[row] else ''}",
        ]
        if pos in popup_alternatives:
            lines += ["alternatives:", *popup_alternatives[pos]]
        style = f"{_SUMMARY};background:{prob_color(positions[row])}"
        if prompt[row]:
            style += ";font-style:italic"
        data_prob = f"{p:.6g}" if math.isfinite(p) else ""
        parts.append(
            f'<details style="{_DETAILS}"><summary style="{style}" data-prob="{data_prob}">'
            f"{_running_text(text)}</summary>"
            f'<div class="nbc-popup" style="{_POPUP}">'
            f"{_html.escape(chr(10).join(lines), quote=False)}</div></details>"
            + "<br>"
            * text.count("\n")
        )

    legend = [_legend_scale(scale, scale_k, ranks_known=top_k > 0)]
    legend.append(
        f'<span style="background:{MISSING_PROB_COLOR};padding:0 0.4em">grey</span> no logprob'
    )
    if prompt.any():
        legend.append("<i>italic</i>: prompt (echo)")
    legend.append("↵: newline · click a token for details")
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
        '<div style="white-space:pre-wrap;word-break:break-word">' + "".join(parts) + "</div>"
        '<div style="margin-top:6px;font-size:11px;color:#444;white-space:normal">'
        + " · ".join(legend)
        + "</div></div>"
    )
    return HighlightedText(body, n_tokens=len(frame), title=title)
