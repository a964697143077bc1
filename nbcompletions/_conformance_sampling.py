"""Judging how a server samples, from one long generation's raw log-probabilities each.

Two checks read every step of a generation against what each hypothesis predicts, with the raw
(pre-sampling) log-probabilities the server lists (ours, vLLM's default ``raw_logprobs``, both
llama.cpp servers):

- ``penalty_window``: greedy with frequency and presence penalty 2. OpenAI's penalties count
  every token generated so far; llama.cpp counts only the last ``last_n_tokens_size`` (64) tokens.
  At each step the chosen token must beat every listed alternative once each is penalised for its
  earlier occurrences; a window of W tokens is consistent when no step contradicts it.
- ``sampler_order``: temperature 2, top_p 0.5, seeded. If top_p cut the raw distribution before
  the temperature flattened it (llama.cpp's sampler chain), every chosen token lies in the raw
  nucleus; temperature first (OpenAI's order), the nucleus of the flattened distribution is much
  larger and chosen tokens often fall outside the raw one.

Nothing here sends a request (`nbcompletions._conformance` does).
"""

from __future__ import annotations

import math
from collections import Counter

from ._conformance_checks import ProbeOutcome, failure, logprob_rows, probe_choice
from ._conformance_report import Check

__all__ = [
    "ORDER_PROMPT",
    "ORDER_TEMPERATURE",
    "ORDER_TOKENS",
    "ORDER_TOP_P",
    "PENALTY",
    "WINDOW_TOKENS",
    "penalty_window_check",
    "sampler_order_check",
]

#: The penalty probe: greedy, both penalties at OpenAI's maximum, long enough to pass a window
#: of 64 (llama.cpp's default) by half as much again (llama-cpp-python first showed it at 65).
PENALTY = 2.0
WINDOW_TOKENS = 96
#: The order probe: a prompt the model continues confidently, so that many steps have a small
#: raw nucleus; the temperature and top_p of issue 16's measurement (17 vs 80 candidates at 1.5).
ORDER_PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
ORDER_TEMPERATURE = 2.0
ORDER_TOP_P = 0.5
ORDER_TOKENS = 48
#: f16 servers list log-probabilities a few 1e-3 off; decisions keep this margin.
_TOLERANCE = 0.05
#: Window sizes servers use, preferred when several sizes explain the choices.
_COMMON_WINDOWS = (16, 32, 64, 128, 256)
#: Steps with a known raw nucleus needed before "never outside it" means top_p first.
_ORDER_MIN_STEPS = 8


def _contradicted(
    tokens: list[str],
    logprobs: list[float | None],
    tops: list[list[tuple[str, float | None]] | None],
    window: int | None,
) -> int | None:
    """The first step whose greedy choice a penalty over the last ``window`` generated tokens
    (None: all of them) cannot explain, or None when every step agrees."""
    for step in range(1, len(tokens)):
        top, chosen_lp = tops[step], logprobs[step]
        if not top or chosen_lp is None:
            continue
        seen = Counter(tokens[max(0, step - window) : step] if window else tokens[:step])

        def penalised(token: str, logprob: float, seen: Counter[str] = seen) -> float:
            count = seen[token]
            return logprob - PENALTY * count - (PENALTY if count else 0.0)

        chosen = penalised(tokens[step], chosen_lp)
        for token, logprob in top:
            beats = logprob is not None and penalised(token, logprob) > chosen + _TOLERANCE
            if token != tokens[step] and beats:
                return step
    return None


def penalty_window_check(outcome: ProbeOutcome, prompt_tokens: list[str] | None = None) -> Check:
    """Do the penalties count every generated token, or only the last W? (evidence window_tokens;
    ``counts_prompt`` where only counting the prompt's ``prompt_tokens`` too explains them)"""
    name = "penalty_window"
    raw, error = outcome
    if error is not None:
        return failure(name, error)
    rows = logprob_rows(probe_choice(raw))
    if rows is None or len(rows.tokens) < 2 or not any(rows.tops):
        return Check(
            name, "unsupported", "no log-probabilities to compare with", {"window_tokens": None}
        )
    n = len(rows.tokens)
    full = _contradicted(rows.tokens, rows.logprobs, rows.tops, None)
    if full is None:
        return Check(
            name,
            "ok",
            f"frequency and presence penalty {PENALTY:g} counted every generated token "
            f"({n} greedy steps agree)",
            {"window_tokens": None, "steps": n},
        )
    fits = [
        w for w in range(1, n) if _contradicted(rows.tokens, rows.logprobs, rows.tops, w) is None
    ]
    evidence = {
        "window_tokens": None,
        "steps": n,
        "first_contradiction": full,
        "token": rows.tokens[full],
    }
    if not fits and prompt_tokens:
        counted = _prompt_counted(rows.tokens, rows.logprobs, rows.tops, prompt_tokens)
        if counted is not None:
            return counted
    if not fits:
        return Check(
            name,
            "error",
            f"inconclusive: greedy step {full} chose {rows.tokens[full]!r}, which neither all "
            "generated tokens nor any window of them explains (processed log-probabilities, or "
            "another sampler at work?)",
            evidence,
        )
    window = next((w for w in _COMMON_WINDOWS if w in fits), fits[0])
    return Check(
        name,
        "fails",
        f"the penalties count only the last ~{window} tokens: at greedy step {full} the server "
        f"chose {rows.tokens[full]!r} again, penalised under OpenAI's rule (it was generated "
        f"earlier); windows of {fits[0]}-{fits[-1]} tokens explain all {n} steps",
        {**evidence, "window_tokens": window, "windows": [fits[0], fits[-1]]},
    )


def _prompt_counted(
    tokens: list[str],
    logprobs: list[float | None],
    tops: list[list[tuple[str, float | None]] | None],
    prompt_tokens: list[str],
) -> Check | None:
    """ggml's llama-server counts the prompt's tokens in the penalties too (its sampler accepts
    them), over the last ``repeat_last_n`` (64) of prompt and generation: the "fails" Check where
    that explains every step, else None."""
    skipped: list[list[tuple[str, float | None]] | None] = [None] * len(prompt_tokens)
    unknown: list[float | None] = [None] * len(prompt_tokens)
    every = [*prompt_tokens, *tokens]
    fits = [
        w
        for w in (*_COMMON_WINDOWS, None)
        if _contradicted(every, unknown + logprobs, skipped + tops, w) is None
    ]
    if not fits:
        return None
    window = fits[0]
    over = f"the last {window} tokens" if window else "all tokens"
    return Check(
        "penalty_window",
        "fails",
        f"the penalties count the prompt's {len(prompt_tokens)} tokens too, over {over} of "
        f"prompt and generation: only that explains all {len(tokens)} greedy steps",
        {"window_tokens": window, "counts_prompt": True, "steps": len(tokens)},
    )


def _raw_nucleus(top: list[tuple[str, float | None]], top_p: float) -> set[str] | None:
    """The raw distribution's nucleus, with the margin, when the listed alternatives reach it."""
    ranked = sorted(((t, lp) for t, lp in top if lp is not None), key=lambda item: -item[1])
    total = 0.0
    nucleus: set[str] = set()
    for token, logprob in ranked:
        nucleus.add(token)
        total += math.exp(logprob)
        if total >= top_p + _TOLERANCE:
            return nucleus
    return None


def sampler_order_check(outcome: ProbeOutcome) -> Check:
    """Is top_p applied before the temperature? (evidence order)"""
    name = "sampler_order"
    raw, error = outcome
    if error is not None:
        return failure(name, error)
    rows = logprob_rows(probe_choice(raw))
    if rows is None or not any(rows.tops):
        return Check(name, "unsupported", "no log-probabilities to compare with", {"order": None})
    steps = outside = 0
    for token, top in zip(rows.tokens, rows.tops, strict=True):
        nucleus = _raw_nucleus(top or [], ORDER_TOP_P)
        if nucleus is None:
            continue
        steps += 1
        outside += token not in nucleus
    evidence = {"steps": steps, "outside": outside, "tokens": len(rows.tokens)}
    asked = f"temperature {ORDER_TEMPERATURE:g}, top_p {ORDER_TOP_P:g}"
    if outside:
        return Check(
            name,
            "ok",
            f"{asked}: {outside} of {steps} sampled tokens lie outside the raw distribution's "
            "nucleus, so the temperature came first (OpenAI's order)",
            {**evidence, "order": "temperature_first"},
        )
    if steps >= _ORDER_MIN_STEPS:
        return Check(
            name,
            "fails",
            f"{asked}: all {steps} sampled tokens whose raw nucleus is known lie inside it: "
            "top_p cuts the raw distribution before the temperature (llama.cpp's order), so "
            "top_p keeps far fewer candidates than OpenAI's",
            {**evidence, "order": "top_p_first"},
        )
    return Check(
        name,
        "error",
        f"inconclusive: only {steps} step(s) had a known raw nucleus, none sampled outside it",
        {**evidence, "order": None},
    )
