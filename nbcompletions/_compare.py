"""The same texts scored by two endpoints (or models), token against token, across tokenizers.

`compare(a, b, texts)` sends each text to both sides as a scoring request (the text as the prompt,
``echo=True``, ``logprobs=k``, nothing generated: teacher-forced, as `Client.score` does) and lines
the two sides' tokens up on the text's UTF-8 bytes. Two tokenizers cut the same text differently,
so a row is an aligned *span*: the smallest byte range whose start and end are token boundaries on
both sides. Where both tokenizers agree, a span is one token on each side; where they differ it
covers the tokens of each side that overlap (" Richard" against " Rich" + "ard").

Columns (`COMPARE_COLUMNS`), one row per span, in text order:

- ``text_id`` (position of the text in ``texts``), ``span`` (0-based, per text), ``start_byte``,
  ``end_byte`` (the span's UTF-8 byte range in the text), ``text`` (the span's text; a span that
  cuts a character shows U+FFFD for the cut part);
- ``a_tokens``, ``b_tokens``: the side's tokens in the span (a list of token strings);
- ``a_logprob``, ``b_logprob``: the sum of the span's tokens' log-probabilities (nats), the
  probability that side gave the span's bytes after the text before it; NaN for the text's first
  span, which nothing precedes;
- ``a_rank``, ``b_rank``: the worst (largest) rank of the span's tokens, 1 = the side's most likely
  token, k+1 = outside its top k;
- ``a_top``, ``b_top``: the top alternatives at the span's first token, ``{token: logprob}`` with
  the most likely first (empty for the first span);
- ``kl_lower``, ``kl_upper``: bounds in nats on KL(a || b), the divergence of a's next-token
  distribution from b's at the span's start, where the span is one token on each side (both sides
  then predict the same bytes from the same text); NaN elsewhere. Only the top k of each
  distribution is known. ``kl_lower`` is exact whatever the unseen tokens hold: KL of the two
  distributions coarsened to the tokens both sides list plus one "everything else" outcome (the
  data-processing inequality). Without a floor on the unseen probabilities KL has no finite upper
  bound (b may give a's token any tiny probability), so ``kl_upper`` assumes none of b's unlisted
  tokens is less likely than b's unseen mass spread evenly over its unseen vocabulary, and uses
  a's entropy lower bound (``entropy_low`` of the tokens frame);
- ``disagree``: the span's log-probabilities differ by more than ``threshold`` nats, or, where the
  span is one token on each side, the sides' most likely tokens there differ (compared as bytes;
  over a longer span the two tokenizers' first tokens are not the same event).

``frame.attrs["a"]`` and ``["b"]`` hold the sides' labels (``labels=`` or ``model @ endpoint``).

Each side's conformance report (`Client.conformance`) is read first, as `score()` does: a side whose
echoed logprobs are not the prompt tokens' own, or that cannot echo logprobs at all, is refused
with `ConformanceError` naming the side, before any text is sent.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._conformance import aconformance
from ._conformance_checks import token_bytes
from ._conformance_consequences import score_max_tokens
from ._errors import ConformanceError, RequestError
from ._request import CompletionRequest, Limits
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

__all__ = [
    "COMPARE_COLUMNS",
    "SideTokens",
    "acompare",
    "align_spans",
    "compare",
    "kl_bounds",
    "span_rows",
]

COMPARE_COLUMNS = (
    "text_id",
    "span",
    "start_byte",
    "end_byte",
    "text",
    "a_tokens",
    "b_tokens",
    "a_logprob",
    "b_logprob",
    "a_rank",
    "b_rank",
    "a_top",
    "b_top",
    "kl_lower",
    "kl_upper",
    "disagree",
)

# Scoring asks for the logprobs it needs whatever the client's caps say (as `_scoring` does).
_SCORING_LIMITS = Limits(max_logprobs=None)


@dataclass(frozen=True)
class SideTokens:
    """One side's scoring of one text: per token its bytes and what the endpoint said about it."""

    tokens: list[str]
    lengths: list[int]  # UTF-8 bytes per token
    logprobs: list[float]  # NaN where the server gave none (the first token)
    ranks: list[float]
    tops: list[dict[str, float]]  # {token: logprob}, most likely first
    entropy_low: list[float]
    vocab_size: int


def align_spans(a_lengths: Sequence[int], b_lengths: Sequence[int]) -> list[tuple[int, int]]:
    """Byte ranges (start, end) of the aligned spans of two tokenizations of the same bytes.

    Each list holds its tokens' lengths in bytes, in order; both must add up to the same total. A
    span ends at every byte offset that is a token boundary on both sides.
    """
    if sum(a_lengths) != sum(b_lengths):
        raise ValueError(
            f"the two tokenizations cover different byte counts: {sum(a_lengths)} "
            f"and {sum(b_lengths)}; they must spell the same text"
        )
    a_ends = set(_ends(a_lengths))
    common = sorted(end for end in _ends(b_lengths) if end in a_ends)
    starts = [0, *common[:-1]]
    return list(zip(starts, common, strict=True))


def _ends(lengths: Sequence[int]) -> list[int]:
    ends, position = [], 0
    for length in lengths:
        position += length
        ends.append(position)
    return ends


def kl_bounds(
    p_top: dict[bytes, float], q_top: dict[bytes, float], p_entropy_low: float, q_vocab: int
) -> tuple[float, float]:
    """(lower, upper) bounds in nats on KL(p || q) from each side's top-k probabilities.

    ``p_top``/``q_top`` map outcomes to probabilities (the listed top k); the rest of each side's
    mass is unseen. See the module docstring for what each bound assumes.
    """
    shared = [x for x in p_top if x in q_top]
    p_rest = max(0.0, 1.0 - sum(p_top[x] for x in shared))
    q_rest = max(0.0, 1.0 - sum(q_top[x] for x in shared))
    lower = sum(_kl_term(p_top[x], q_top[x]) for x in shared) + _kl_term(p_rest, q_rest)
    q_unseen = max(0.0, 1.0 - sum(q_top.values()))
    q_floor = q_unseen / max(1, q_vocab - len(q_top))
    smallest_q = min([q_floor, *q_top.values()])
    if smallest_q <= 0.0:
        return max(0.0, lower), math.inf
    p_unseen = max(0.0, 1.0 - sum(p_top.values()))
    listed = sum(p * math.log(p / q_top.get(x, smallest_q)) for x, p in p_top.items() if p > 0)
    # Two bounds under the same floor; the smaller holds. (1) each unseen p is at most a's smallest
    # listed one and each unseen q at least the floor; (2) cross-entropy minus a's entropy bound.
    p_smallest = min(p_top.values(), default=1.0)
    upper_ratio = listed + p_unseen * math.log(max(p_smallest, 1e-300) / smallest_q)
    cross = sum(p * -math.log(q_top.get(x, smallest_q)) for x, p in p_top.items())
    upper_cross = cross + p_unseen * -math.log(smallest_q) - p_entropy_low
    return max(0.0, lower), max(min(upper_ratio, upper_cross), lower, 0.0)


def _kl_term(p: float, q: float) -> float:
    if p <= 0.0:
        return 0.0
    if q <= 0.0:
        return math.inf
    return p * math.log(p / q)


def _side_tokens(raw: dict[str, Any], request: CompletionRequest, vocab_size: int) -> SideTokens:
    from ._frames import to_frames

    _, tokens, alternatives = to_frames(raw, request, vocab_size=vocab_size)
    echoed = tokens[tokens["echo"].astype(bool)].sort_values("position")
    tops: dict[int, dict[str, float]] = {}
    if len(alternatives):
        ordered = alternatives.sort_values(["position", "rank"])
        for position, group in ordered.groupby("position", sort=True):
            pairs = zip(group["token"].tolist(), group["logprob"].tolist(), strict=True)
            tops[int(position)] = {str(t): float(lp) for t, lp in pairs}
    token_list = [str(t) for t in echoed["token"].tolist()]
    return SideTokens(
        tokens=token_list,
        lengths=[len(token_bytes(t)) for t in token_list],
        logprobs=[float(v) for v in echoed["logprob"].astype(float).tolist()],
        ranks=[float(v) for v in echoed["rank"].astype("Float64").astype(float).tolist()],
        tops=[tops.get(int(p), {}) for p in echoed["position"].tolist()],
        entropy_low=[float(v) for v in echoed["entropy_low"].astype(float).tolist()],
        vocab_size=int(tokens.attrs.get("vocab_size") or vocab_size),
    )


async def _ready(aclient: AsyncCompletionsClient, side: str) -> int:
    """The ``max_tokens`` a scoring request may send to this side, or `ConformanceError`."""
    report = await aconformance(aclient)
    echo = report.checks.get("echo_alignment")
    # "error" (the probe could not tell) is let through, as score() does; a refusal is not.
    if echo is not None and echo.status == "unsupported":
        raise ConformanceError(
            f"compare() refuses side {side} ({aclient.endpoint}): check echo_alignment is "
            f"{echo.status} ({echo.detail}); scoring needs echoed prompt log-probabilities",
            check="echo_alignment",
            detail=echo.detail,
        )
    try:
        return score_max_tokens(report)
    except ConformanceError as exc:
        raise ConformanceError(
            f"compare() refuses side {side} ({aclient.endpoint}): {exc}",
            check=exc.check,
            detail=exc.detail,
        ) from None


async def _score_side(
    aclient: AsyncCompletionsClient, text: str, top_k: int, max_tokens: int, side: str
) -> SideTokens:
    request = CompletionRequest(
        prompt=text,
        echo=True,
        logprobs=top_k,
        max_tokens=max_tokens,
        model=aclient.model,
        limits=_SCORING_LIMITS,
    )
    # _ready applied the side's report already (as score() did before nbcompletions._governance).
    completion = await aclient.complete_as_is(request)
    scored = _side_tokens(completion.raw, request, aclient.vocab_size or 50257)
    if sum(scored.lengths) != len(text.encode("utf-8")):
        raise ConformanceError(
            f"compare(): side {side} ({aclient.endpoint}) echoed tokens that spell "
            f"{sum(scored.lengths)} bytes for a text of {len(text.encode('utf-8'))}: "
            f"{scored.tokens[:12]!r}; its tokens cannot be lined up with the text",
            check="echo_tokens",
            detail=repr(scored.tokens[:12]),
        )
    return scored


def span_rows(
    text_id: int, text: str, a: SideTokens, b: SideTokens, threshold: float
) -> list[dict[str, Any]]:
    raw = text.encode("utf-8")
    a_starts = [0, *_ends(a.lengths)[:-1]]
    b_starts = [0, *_ends(b.lengths)[:-1]]
    rows = []
    for number, (start, end) in enumerate(align_spans(a.lengths, b.lengths)):
        a_idx = [i for i, s in enumerate(a_starts) if start <= s < end]
        b_idx = [i for i, s in enumerate(b_starts) if start <= s < end]
        a_logprob = math.fsum(a.logprobs[i] for i in a_idx)
        b_logprob = math.fsum(b.logprobs[i] for i in b_idx)
        a_top, b_top = a.tops[a_idx[0]], b.tops[b_idx[0]]
        kl_lower = kl_upper = math.nan
        first_differs = False
        # One token on each side: both sides predicted the same bytes from the same text.
        if len(a_idx) == 1 and len(b_idx) == 1 and a_top and b_top:
            kl_lower, kl_upper = kl_bounds(
                _probabilities(a_top), _probabilities(b_top), a.entropy_low[a_idx[0]], b.vocab_size
            )
            first_differs = _first_bytes(a_top) != _first_bytes(b_top)
        rows.append(
            {
                "text_id": text_id,
                "span": number,
                "start_byte": start,
                "end_byte": end,
                "text": raw[start:end].decode("utf-8", errors="replace"),
                "a_tokens": [a.tokens[i] for i in a_idx],
                "b_tokens": [b.tokens[i] for i in b_idx],
                "a_logprob": a_logprob,
                "b_logprob": b_logprob,
                "a_rank": max(a.ranks[i] for i in a_idx),
                "b_rank": max(b.ranks[i] for i in b_idx),
                "a_top": a_top,
                "b_top": b_top,
                "kl_lower": kl_lower,
                "kl_upper": kl_upper,
                "disagree": first_differs or abs(a_logprob - b_logprob) > threshold,
            }
        )
    return rows


def _probabilities(top: dict[str, float]) -> dict[bytes, float]:
    # Keyed by bytes: two tokenizers may spell the same bytes differently (``bytes:\xe2`` forms).
    out: dict[bytes, float] = {}
    for token, logprob in top.items():
        key = token_bytes(token)
        out[key] = out.get(key, 0.0) + math.exp(logprob)
    return out


def _first_bytes(top: dict[str, float]) -> bytes:
    return token_bytes(next(iter(top)))


def _texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if (
        not isinstance(texts, Sequence)
        or not texts
        or not all(isinstance(t, str) and t for t in texts)
    ):
        raise RequestError(
            "texts",
            f"texts must be a non-empty string or a non-empty list of non-empty strings; "
            f"got {texts!r}"[:300],
            allowed="a non-empty string or list of non-empty strings",
            value=texts,
        )
    return list(texts)


def _label(aclient: AsyncCompletionsClient) -> str:
    return f"{aclient.model} @ {aclient.endpoint}" if aclient.model else aclient.endpoint


async def acompare(
    a: HasAsyncClient,
    b: HasAsyncClient,
    texts: str | Sequence[str],
    *,
    top_logprobs: int = 5,
    threshold: float = 1.0,
    labels: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """`compare`, awaited."""
    import pandas as pd

    items = _texts(texts)
    if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 1:
        raise RequestError(
            "top_logprobs",
            f"top_logprobs must be an integer >= 1; got {top_logprobs!r}",
            allowed="an integer >= 1",
            value=top_logprobs,
        )
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or threshold < 0:
        raise RequestError(
            "threshold",
            f"threshold must be a number of nats >= 0; got {threshold!r}",
            allowed="a number >= 0",
            value=threshold,
        )
    sides = (as_async(a), as_async(b))
    max_tokens = [await _ready(side, name) for side, name in zip(sides, "ab", strict=True)]
    scored = await asyncio.gather(
        *(
            _score_side(side, text, top_logprobs, max_tokens[i], "ab"[i])
            for text in items
            for i, side in enumerate(sides)
        )
    )
    rows = []
    for text_id, text in enumerate(items):
        a_side, b_side = scored[2 * text_id], scored[2 * text_id + 1]
        rows.extend(span_rows(text_id, text, a_side, b_side, float(threshold)))
    frame = pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))
    frame = frame.astype({"text_id": "int64", "span": "int64", "disagree": bool})
    frame = frame.astype({"start_byte": "int64", "end_byte": "int64"})
    a_label, b_label = labels or (_label(sides[0]), _label(sides[1]))
    if a_label == b_label:
        a_label, b_label = f"{a_label} (a)", f"{b_label} (b)"
    frame.attrs["a"], frame.attrs["b"] = a_label, b_label
    result: pd.DataFrame = frame
    return result


def compare(
    a: HasAsyncClient,
    b: HasAsyncClient,
    texts: str | Sequence[str],
    *,
    top_logprobs: int = 5,
    threshold: float = 1.0,
    labels: tuple[str, str] | None = None,
) -> pd.DataFrame:
    """The same texts scored by two clients, one row per aligned span (see the module docstring).

    ``compare(embedded, vllm_client, ["To be, or not to be"])``: each text is sent to both sides
    with ``echo=True`` and ``logprobs=top_logprobs`` (nothing generated), and the two sides'
    tokens are lined up on the text's bytes. ``threshold`` (nats) is the log-probability gap that
    marks a span ``disagree``; ``labels`` names the sides in ``attrs`` (default ``model @
    endpoint``). Works from plain code and from a Jupyter cell.
    """
    from ._loop import run_sync

    return run_sync(
        acompare(a, b, texts, top_logprobs=top_logprobs, threshold=threshold, labels=labels)
    )
