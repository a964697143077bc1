"""Tokens coloured by probability as self-contained HTML: no plotly, no scripts, no URLs."""

from __future__ import annotations

import html as _html
import math
from pathlib import Path
from typing import Any

import pandas as pd

from ._checks import (
    _check_one_completion,
    _check_positive_int,
    _drop_echo,
    _echo_mask,
    _flags,
    _numeric,
    _require,
    _select_index,
)
from ._colors import _MISSING_PROB_COLOR, _prob_color

__all__ = ["HighlightedText", "highlight"]


class HighlightedText:
    """Tokens coloured by probability as self-contained HTML (CSS only: no scripts, no URLs).

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


_CONTROL = {i: f"\\x{i:02x}" for i in range(32) if chr(i) not in "\n\t"}
_CONTROL[0x7F] = "\\x7f"


def _display_token(token: str) -> str:
    """HTML for a token's text: escaped, newlines as ↵ plus a line break, other controls visible."""
    text = _html.escape(token.translate(_CONTROL), quote=True)
    return text.replace("\n", "↵<br>")


def _attribute(text: str) -> str:
    """Escape for a double-quoted attribute; &#10; is a line break inside a title tooltip.

    Single quotes stay as they are (the attribute is double-quoted): tooltips repeat ``repr``
    strings, and six-byte entities for their quotes made up a third of the page.
    """
    escaped = _html.escape(text, quote=False).replace('"', "&quot;")
    return escaped.replace("\n", "&#10;").replace("\r", "&#13;")


def highlight(
    tokens: pd.DataFrame,
    *,
    alternatives: pd.DataFrame | None = None,
    index: int = 0,
    position: str = "position",
    token: str = "token",
    prob: str = "prob",
    echo: bool = True,
    max_positions: int = 5000,
    title: str | None = None,
) -> HighlightedText:
    """The text of one choice with each token's background coloured by its probability.

    Hovering a token shows (as a native ``title`` tooltip) its text, probability, logprob and rank
    and, with the ``alternatives`` frame, the top alternatives at that position. The HTML uses
    inline CSS only, so it survives the sanitizers of GitHub, nbviewer, VS Code and JupyterLab.
    Echoed prompt tokens are set in italics (``echo=False`` leaves them out); at most
    ``max_positions`` tokens are shown, and the legend says when the text was cut.
    """
    function = "highlight"
    _require(tokens, ["index", position, token, prob], function=function, frame_name="tokens")
    if alternatives is not None:
        _require(
            alternatives,
            ["index", "position", "rank", "token", "prob"],
            function=function,
            frame_name="alternatives",
        )
    _check_positive_int(function, "max_positions", max_positions)
    frame = _drop_echo(_select_index(tokens, index, function=function, frame_name="tokens"), echo)
    _check_one_completion(frame, [position], function=function, frame_name="tokens")
    frame = frame.sort_values(position, kind="stable")
    total = len(frame)
    frame = frame.iloc[:max_positions]

    tooltips_alternatives: dict[Any, list[str]] = {}
    if alternatives is not None:
        alt = alternatives[alternatives["index"] == index]
        alt = alt[alt["position"].isin(frame[position])].sort_values(["position", "rank"])
        has_chosen = "chosen" in alt.columns
        for pos, alt_token, alt_prob, is_chosen in zip(
            alt["position"].tolist(),
            alt["token"].tolist(),
            _numeric(alt["prob"]),
            _flags(alt["chosen"]).tolist() if has_chosen else [False] * len(alt),
            strict=True,
        ):
            tooltips_alternatives.setdefault(pos, []).append(
                f"{alt_prob:7.2%}  {alt_token!r}{'  ◀ chosen' if is_chosen else ''}"
            )

    top_k = min((len(entries) for entries in tooltips_alternatives.values()), default=0)
    probs = _numeric(frame[prob])
    prompt = _echo_mask(frame)
    logprobs = _numeric(frame["logprob"]) if "logprob" in frame.columns else None
    ranks = _numeric(frame["rank"]) if "rank" in frame.columns else None
    spans = []
    for row, (pos, tok) in enumerate(
        zip(frame[position].tolist(), frame[token].tolist(), strict=True)
    ):
        text = "" if tok is None or (isinstance(tok, float) and math.isnan(tok)) else str(tok)
        p = probs[row]
        facts = [f"p = {p:.4f}" if math.isfinite(p) else "no logprob"]
        if logprobs is not None and math.isfinite(logprobs[row]):
            facts.append(f"logprob {logprobs[row]:.3f}")
        if ranks is not None and math.isfinite(ranks[row]):
            # A rank past the k returned alternatives only says "not in the top k". Where the
            # sampled token is outside the top k it comes as an extra (k+1-th) entry, so k is the
            # fewest entries at any position, not the count at this one.
            facts.append(f"rank >{top_k}" if 0 < top_k < ranks[row] else f"rank {int(ranks[row])}")
        tip = f"{text!r}  {' · '.join(facts)}\n{position} {pos}{' (prompt)' if prompt[row] else ''}"
        if pos in tooltips_alternatives:
            tip += "\nalternatives:\n" + "\n".join(tooltips_alternatives[pos])
        style = f"background:{_prob_color(p)}"
        if prompt[row]:
            style += ";font-style:italic"
        data_prob = f"{p:.6g}" if math.isfinite(p) else ""
        spans.append(
            f'<span style="{style}" data-prob="{data_prob}" title="{_attribute(tip)}">'
            f"{_display_token(text)}</span>"
        )

    swatches = "".join(
        f'<span style="background:{_prob_color(level)};padding:0 0.4em">{level:g}</span>'
        for level in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    legend = [f"probability {swatches}"]
    legend.append(
        f'<span style="background:{_MISSING_PROB_COLOR};padding:0 0.4em">grey</span> no logprob'
    )
    if prompt.any():
        legend.append("<i>italic</i>: prompt (echo)")
    legend.append("↵: newline; hover a token for details")
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
        '<div style="white-space:pre-wrap;word-break:break-word">' + "".join(spans) + "</div>"
        '<div style="margin-top:6px;font-size:11px;color:#444">'
        + " · ".join(legend)
        + "</div></div>"
    )
    return HighlightedText(body, n_tokens=len(frame), title=title)
