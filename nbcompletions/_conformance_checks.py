"""Judging what a server answered: pure functions from a probe's outcome to a `Check`.

Each takes the raw response (or the `APIError` it raised) and returns the verdict with its
evidence; nothing here sends a request (`nbcompletions._conformance` does). Every logprobs field
may be missing or null, and llama.cpp's chat-shaped logprobs are read too.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ._checks import finite_float, is_int, positive_int
from ._conformance_report import Check, Status
from ._errors import APIError
from ._parse import choice_index, parse_logprobs, sorted_choices, top_items
from ._types import AsyncCompletionsClient

__all__ = [
    "ANY_TEXT_STOPS",
    "ASKED_LOGPROBS",
    "BYTES_PROMPT",
    "PROMPT",
    "REPEAT_PROMPT",
    "SECOND_PROMPT",
    "SEED",
    "SUFFIX",
    "SUFFIX_PROMPT",
    "TOKEN_IDS",
    "BoundedStream",
    "MaxZeroStream",
    "ProbeOutcome",
    "best_of_check",
    "bytes_check",
    "card_limits",
    "card_profile",
    "defaults_check",
    "detect_profile",
    "echo_alignment",
    "failure",
    "gen_checks",
    "logprob_rows",
    "max_tokens_zero_check",
    "model_info",
    "multiple_check",
    "n_check",
    "penalty_check",
    "probe_choice",
    "seed_check",
    "stop_check",
    "stream_echo_check",
    "suffix_check",
    "token_bytes",
    "token_ids_check",
    "usage_check",
]

PROMPT = "To be, or not to be, that is the"
SECOND_PROMPT = "ROMEO:"
REPEAT_PROMPT = "ROMEO:\nO"
BYTES_PROMPT = "Grüße, café"
SUFFIX_PROMPT, SUFFIX = "To be", " the end"
TOKEN_IDS = [100, 101, 102]
# Stops that almost any text hits within a token or two: the bound of the max_tokens=0 probe.
ANY_TEXT_STOPS = ["\n", " ", ".", "e"]
SEED = 1234
ASKED_LOGPROBS = 5

#: What one probe got: the response body, or the error (one of the two is None).
ProbeOutcome = tuple[dict[str, Any] | None, APIError | None]


@dataclasses.dataclass
class BoundedStream:
    """What a probe's stream showed before it ended or the probe hung up (the max_tokens=0,
    context-length and stream_finish probes)."""

    text: str = ""
    finish: str | None = None
    chunks: int = 0
    error: APIError | None = None
    #: Whether another request was sent while this stream was still open.
    overlapped: bool = False


#: The max_tokens=0 probe's stream (its older name).
MaxZeroStream = BoundedStream


# -- reading responses -----------------------------------------------------------------------------


@dataclasses.dataclass
class _Rows:
    tokens: list[str]
    logprobs: list[float | None]
    offsets: list[int | None]
    tops: list[list[tuple[str, float | None]] | None]  # (token, logprob) pairs, as sent


def _choices(raw: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    return sorted_choices(raw) if isinstance(raw, Mapping) else []


def logprob_rows(choice: Mapping[str, Any] | None) -> _Rows | None:
    """The logprobs of a choice in either shape, read by the shared parser (`_parse`): a null
    stays None, and alternatives that render alike (byte tokens as "") stay apart."""
    lp = choice.get("logprobs") if isinstance(choice, Mapping) else None
    if not isinstance(lp, Mapping):
        return None
    try:
        tokens, logprobs, tops, offsets = parse_logprobs(lp)
        pairs = [None if top is None else top_items(top) for top in tops]
    except ValueError:
        return None
    n = len(tokens)
    return _Rows(
        ["" if t is None else str(t) for t in tokens],
        [finite_float(v) for v in logprobs],
        [int(v) if is_int(v) else None for v in (offsets if offsets is not None else [None] * n)],
        [None if top is None else [(str(t), finite_float(x)) for t, x in top] for top in pairs],
    )


_BYTE_TOKEN = re.compile(r"^bytes:((?:\\x[0-9a-fA-F]{2})+)$")


def token_bytes(token: str) -> bytes:
    """The bytes a token string stands for (``bytes:\\xe2\\x80`` tokens are partial characters)."""
    match = _BYTE_TOKEN.match(token)
    if match:
        return bytes(int(h, 16) for h in match.group(1).split("\\x")[1:])
    return token.encode("utf-8")


def _close(a: float, b: float) -> bool:
    # Same server, same numbers, computed once incrementally and once in a batch (f16 on llama.cpp).
    return abs(a - b) <= max(0.02, 0.01 * abs(b))


def _short(value: Any, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _refused(error: APIError) -> str:
    return f"refused: {_short(str(error), 200)}"


def failure(name: str, error: APIError) -> Check:
    """The check's row when its probe raised: unsupported when the server refused openly."""
    # A 4xx, or a 500 that says it is a validation error, is the server openly refusing.
    status = error.status
    refused = status is not None and (400 <= status < 500 or _is_validation_500(error))
    return Check(name, "unsupported" if refused else "error", _refused(error), {"http": status})


def _is_validation_500(error: APIError) -> bool:
    from ._retry import is_validation_error

    return error.status == 500 and is_validation_error(error.message, error.body)


def _lookup(top: list[tuple[str, float | None]] | None, token: str) -> float | None:
    """The logprob listed for ``token`` among one position's alternatives; None when absent or
    when several alternatives render as that token (which one is meant cannot be known)."""
    found = [x for t, x in top or [] if t == token]
    return found[0] if len(found) == 1 else None


def probe_choice(raw: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
    choices = _choices(raw)
    return choices[0] if choices else None


def gen_checks(gen: ProbeOutcome) -> list[Check]:
    raw, error = gen
    if error is not None:
        return [failure(name, error) for name in ("logprobs_cap", "text_offset")]
    rows = logprob_rows(probe_choice(raw))
    if rows is None or not rows.tokens:
        return [
            Check("logprobs_cap", "fails", f"asked logprobs={ASKED_LOGPROBS}, got none"),
            Check("text_offset", "unsupported", "no logprobs, so no text_offset"),
        ]
    counts = [len(t) for t in rows.tops if t is not None]
    most = max(counts) if counts else 0
    cap = Check(
        "logprobs_cap",
        "ok" if most >= ASKED_LOGPROBS else "fails",
        f"asked {ASKED_LOGPROBS} alternatives, got up to {most} per token",
        {"asked": ASKED_LOGPROBS, "returned": most},
    )
    first = rows.offsets[0]
    if first == len(PROMPT):
        offset = Check(
            "text_offset",
            "ok",
            f"generated offsets start at len(prompt) = {first}",
            {"origin": "prompt"},
        )
    elif first == 0:
        offset = Check(
            "text_offset",
            "fails",
            f"generated offsets start at 0, not at len(prompt) = {len(PROMPT)} (vLLM's convention)",
            {"origin": "completion"},
        )
    elif first is None:
        offset = Check("text_offset", "unsupported", "no text_offset in the logprobs")
    else:
        offset = Check(
            "text_offset",
            "fails",
            f"generated offsets start at {first}; expected len(prompt) = {len(PROMPT)}",
            {"origin": None},
        )
    return [cap, offset]


def echo_alignment(gen: ProbeOutcome, echo: ProbeOutcome | None, k: int) -> Check:
    name = "echo_alignment"
    if gen[1] is not None:
        return failure(name, gen[1])
    if echo is None:
        return Check(name, "error", "no tokens were generated to compare with")
    raw, error = echo
    if error is not None:
        check = failure(name, error)
        return dataclasses.replace(check, evidence={**check.evidence, "kind": "refused"})
    gen_rows = logprob_rows(probe_choice(gen[0]))
    echo_choice = probe_choice(raw)
    rows = logprob_rows(echo_choice)
    assert gen_rows is not None
    text = str(echo_choice.get("text") or "") if echo_choice is not None else ""
    if not text.startswith(PROMPT):
        return Check(
            name,
            "fails",
            f"echo is ignored: the text {_short(text, 60)} does not start with the prompt, and "
            f"only {len(rows.tokens) if rows else 0} generated token(s) have logprobs, so no "
            "prompt can be scored here",
            {"kind": "ignored", "text": text},
        )
    wanted = gen_rows.tokens[:k]
    expected = gen_rows.logprobs[:k]
    if rows is None or not rows.tokens or all(v is None for v in rows.logprobs):
        return Check(
            name, "fails", "echo returned no log-probabilities for the prompt", {"kind": "dropped"}
        )
    start = None
    for i in range(len(rows.tokens) - k, 0, -1):
        if rows.tokens[i : i + k] == wanted:
            start = i
            break
    if start is None:
        return Check(
            name,
            "error",
            f"the echo did not tokenize the generated tokens {wanted!r} the same way",
            {"kind": "unknown"},
        )
    at = [rows.logprobs[start + j] for j in range(k)]
    pairs = ", ".join(
        f"{wanted[j]!r}: generated {_fmt(expected[j])}, echoed {_fmt(at[j])}" for j in range(k)
    )
    evidence: dict[str, Any] = {"tokens": wanted, "generated": expected, "echoed": at}
    if _all_close(at, expected):
        return Check(
            name,
            "ok",
            f"echoed logprobs equal the generated ones ({pairs})",
            {**evidence, "kind": "aligned"},
        )
    return _misplaced(name, rows, start, wanted, expected, pairs, evidence)


def _all_close(found: list[float | None], expected: list[float | None]) -> bool:
    return all(
        f is not None and e is not None and _close(f, e)
        for f, e in zip(found, expected, strict=True)
    )


def _misplaced(
    name: str,
    rows: _Rows,
    start: int,
    wanted: list[str],
    expected: list[float | None],
    pairs: str,
    evidence: dict[str, Any],
) -> Check:
    """Echoed logprobs that disagree with the generated ones: where the server put them instead,
    the previous entry's alternatives (llama.cpp: each entry holds the next position's
    distribution), or the next/previous entry's token_logprobs."""
    k = len(wanted)
    in_previous = [
        _lookup(rows.tops[start + j - 1], wanted[j]) if start + j - 1 >= 0 else None
        for j in range(k)
    ]
    if _all_close(in_previous, expected):
        shown = ", ".join(_fmt(p) for p in in_previous)
        return Check(
            name,
            "fails",
            f"echo logprobs are shifted by one: {pairs}; the generated values sit in the "
            f"previous position's top_logprobs ({shown})",
            {**evidence, "kind": "shifted", "shift": -1, "found": in_previous},
        )
    for shift in (1, -1):
        moved = [
            rows.logprobs[start + j + shift]
            if 0 <= start + j + shift < len(rows.logprobs)
            else None
            for j in range(k)
        ]
        if _all_close(moved, expected):
            return Check(
                name,
                "fails",
                f"echo logprobs are shifted by {shift:+d}: {pairs}",
                {**evidence, "kind": "shifted", "shift": shift, "found": moved},
            )
    return Check(
        name,
        "fails",
        f"echo logprobs disagree with generation: {pairs}",
        {**evidence, "kind": "misaligned"},
    )


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def max_tokens_zero_check(seen: MaxZeroStream) -> Check:
    """Honoured means proven: no text, and the server said it stopped for length (0 tokens)."""
    name = "max_tokens_0"
    if seen.error is not None:
        check = failure(name, seen.error)
        return dataclasses.replace(check, detail=check.detail + "; score() uses max_tokens=1")
    evidence = {"text": seen.text, "finish_reason": seen.finish, "chunks": seen.chunks}
    if seen.text:
        return Check(
            name,
            "fails",
            f"max_tokens=0 generated text {seen.text!r} (the probe hung up at once): the server "
            "reads 0 as 'no limit'; score() uses max_tokens=1 and drops that token",
            evidence,
        )
    if seen.finish == "stop":
        return Check(
            name,
            "fails",
            "max_tokens=0 ended with finish_reason 'stop' and no text: it generated up to one of "
            f"the stop strings {ANY_TEXT_STOPS!r}, so the server reads 0 as 'no limit'; "
            "score() uses max_tokens=1 and drops that token",
            evidence,
        )
    if seen.finish == "length":
        return Check(name, "ok", "no text, finish_reason 'length' (0 tokens generated)", evidence)
    return Check(
        name,
        "error",
        f"inconclusive: the stream ended after {seen.chunks} chunk(s) with no text and "
        f"finish_reason {seen.finish!r} (cut short?); score() uses max_tokens=1",
        evidence,
    )


def n_check(outcome: ProbeOutcome) -> Check:
    raw, error = outcome
    if error is not None:
        return failure("n", error)
    got = len(_choices(raw))
    if got == 2:
        return Check("n", "ok", "n=2 gave 2 choices", {"choices": got})
    return Check("n", "fails", f"n=2 gave {got} choice(s): n is ignored", {"choices": got})


def best_of_check(outcome: ProbeOutcome, max_tokens: int, best_of: int) -> Check:
    raw, error = outcome
    if error is not None:
        return failure("best_of", error)
    got = len(_choices(raw))
    usage = raw.get("usage") if isinstance(raw, Mapping) else None
    spent = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    detail = (
        f"best_of={best_of}, n=1, max_tokens={max_tokens}: {got} choice(s), "
        f"{spent} completion tokens"
    )
    evidence = {"choices": got, "completion_tokens": spent}
    if got != 1:
        return Check("best_of", "fails", detail + " (expected 1 choice)", evidence)
    if not is_int(spent):
        return Check(
            "best_of", "unsupported", detail + ": no usage, so it cannot be told", evidence
        )
    if spent > max_tokens:
        return Check("best_of", "ok", detail + " (the candidates were generated)", evidence)
    return Check(
        "best_of", "fails", detail + ": one candidate's worth, best_of is ignored", evidence
    )


def stream_echo_check(outcome: ProbeOutcome) -> Check:
    raw, error = outcome
    if error is not None:
        return failure("stream_echo", error)
    choice = probe_choice(raw)
    text = str(choice.get("text") or "") if choice else ""
    if text.startswith(PROMPT):
        return Check("stream_echo", "ok", "the streamed text starts with the prompt")
    cut = _cut_short("stream_echo", raw)
    if cut is not None:
        return cut
    return Check(
        "stream_echo",
        "fails",
        f"stream=True with echo=True returned {text!r}: the prompt was dropped",
        {"text": text},
    )


def _cut_short(name: str, raw: Mapping[str, Any] | None) -> Check | None:
    """An ``error`` Check when a stream ended without a finish_reason: it proves nothing."""
    choice = probe_choice(raw)
    if choice is not None and choice.get("finish_reason") is not None:
        return None
    return Check(
        name,
        "error",
        "inconclusive: the stream ended without a finish_reason (cut short?)",
        {"choice": dict(choice) if choice is not None else None},
    )


def usage_check(outcome: ProbeOutcome) -> Check:
    raw, error = outcome
    if error is not None:
        return failure("include_usage", error)
    usage = raw.get("usage") if isinstance(raw, Mapping) else None
    if isinstance(usage, Mapping) and is_int(usage.get("prompt_tokens")):
        return Check("include_usage", "ok", f"usage arrived: {dict(usage)}")
    cut = _cut_short("include_usage", raw)
    if cut is not None:
        return cut
    return Check(
        "include_usage",
        "fails",
        f"stream_options.include_usage gave no usage chunk (usage={_short(usage)})",
        {"usage": dict(usage) if isinstance(usage, Mapping) else None},
    )


def multiple_check(outcome: ProbeOutcome) -> Check:
    raw, error = outcome
    if error is not None:
        return failure("multiple_prompts", error)
    indexes = [choice_index(c) for c in _choices(raw)]
    if indexes == [0, 1]:
        return Check("multiple_prompts", "ok", "2 prompts gave choices 0 and 1")
    return Check("multiple_prompts", "fails", f"2 prompts gave choice indexes {indexes}")


def token_ids_check(outcome: ProbeOutcome) -> Check:
    raw, error = outcome
    if error is not None:
        return failure("token_id_prompts", error)
    rows = logprob_rows(probe_choice(raw))
    echoed = len(rows.tokens) if rows is not None else None
    if echoed is not None and echoed >= len(TOKEN_IDS):
        return Check(
            "token_id_prompts",
            "ok",
            f"a prompt of {len(TOKEN_IDS)} token ids echoed {echoed} tokens (prompt + generated)",
        )
    return Check(
        "token_id_prompts",
        "fails",
        f"a prompt of {len(TOKEN_IDS)} token ids echoed {echoed} tokens",
        {"echoed": echoed},
    )


def _text(outcome: ProbeOutcome) -> str | None:
    choice = probe_choice(outcome[0])
    return str(choice.get("text") or "") if choice is not None and outcome[1] is None else None


def seed_check(same: ProbeOutcome, again: ProbeOutcome, other: ProbeOutcome) -> Check:
    for outcome in (same, again, other):
        if outcome[1] is not None:
            return failure("seed", outcome[1])
    a, b, c = _text(same), _text(again), _text(other)
    evidence = {"seed": a, "same_seed": b, "other_seed": c}
    if a != b:
        return Check("seed", "fails", f"the same seed gave {a!r} and {b!r}", evidence)
    if a == c:
        return Check(
            "seed",
            "fails",
            f"seeds {SEED} and {SEED + 1} gave the same text {a!r} at temperature 1 "
            "(seed or temperature ignored)",
            evidence,
        )
    return Check("seed", "ok", "the same seed repeats, another seed differs", evidence)


def defaults_check(seed: Check, explicit: ProbeOutcome, omitted: ProbeOutcome) -> Check:
    name = "default_sampling"
    if omitted[1] is not None:
        return failure(name, omitted[1])
    if seed.status != "ok":
        return Check(name, "unsupported", "needs a working seed to compare (see the seed check)")
    a, b = _text(explicit), _text(omitted)
    if a == b:
        return Check(
            name, "ok", "fields left out sample like temperature=1, top_p=1 (same seed, same text)"
        )
    return Check(
        name,
        "fails",
        f"with the same seed, temperature=1, top_p=1 gave {a!r} but leaving them out gave {b!r}: "
        "omitted fields do not mean OpenAI's defaults here",
        {"explicit": a, "omitted": b},
    )


def penalty_check(plain: ProbeOutcome, penalised: ProbeOutcome) -> Check:
    for outcome in (plain, penalised):
        if outcome[1] is not None:
            return failure("penalties", outcome[1])
    a, b = _text(plain), _text(penalised)
    # The penalised probe runs longer (it feeds penalty_window too): compare its start.
    if a is None or b is None or not b.startswith(a):
        return Check(
            "penalties", "ok", f"penalties changed the greedy text ({a!r} -> {_short(b, 60)})"
        )
    words = (a or "").split()
    if len(words) != len(set(words)):
        return Check(
            "penalties",
            "fails",
            f"frequency and presence penalty 2 left the greedy text {a!r} unchanged, "
            "repeats and all",
            {"text": a},
        )
    return Check("penalties", "unsupported", f"inconclusive: the greedy text {a!r} repeats nothing")


def stop_check(stop: str | None, outcome: ProbeOutcome | None) -> Check:
    name = "stop_in_logprobs"
    if outcome is None or stop is None:
        return Check(name, "error", "no generated token made a usable stop string")
    raw, error = outcome
    if error is not None:
        return failure(name, error)
    choice = probe_choice(raw)
    rows = logprob_rows(choice)
    text = str(choice.get("text") or "") if choice else ""
    if choice is None or choice.get("finish_reason") != "stop" or rows is None:
        return Check(name, "error", f"the stop {stop!r} was not hit (text {text!r})")
    spelled = b"".join(token_bytes(t) for t in rows.tokens).decode("utf-8", "replace")
    if spelled == text:
        return Check(name, "ok", f"stop {stop!r}: the tokens spell the text {text!r}")
    return Check(
        name,
        "fails",
        f"stop {stop!r}: the tokens {rows.tokens!r} spell {spelled!r} but the text is {text!r} "
        "(the stop token stays in the logprobs: the tokens frame is longer than the text)",
        {"tokens": rows.tokens, "text": text},
    )


def bytes_check(outcome: ProbeOutcome) -> Check:
    """Byte-level tokens must say their bytes: ``bytes:\\xc3`` strings, or a ``bytes`` field
    (llama-server's chat-shaped logprobs) beside them. Evidence: ``empty_tokens`` (some came
    back as ""), ``bytes_field`` (the logprobs carry ``bytes``)."""
    name = "byte_tokens"
    raw, error = outcome
    if error is not None:
        return failure(name, error)
    choice = probe_choice(raw)
    rows = logprob_rows(choice)
    lp = choice.get("logprobs") if choice is not None else None
    content = lp.get("content") if isinstance(lp, Mapping) else None
    bytes_field = isinstance(content, list) and any(
        isinstance(e, Mapping) and isinstance(e.get("bytes"), list) for e in content
    )
    text = str(choice.get("text") or "") if choice is not None else ""
    if rows is None or not rows.tokens:
        return Check(name, "unsupported", "echo returned no tokens", {"bytes_field": bytes_field})
    evidence = {
        "tokens": rows.tokens,
        "empty_tokens": "" in rows.tokens,
        "bytes_field": bytes_field,
    }
    if not text.startswith(BYTES_PROMPT):
        return Check(
            name,
            "unsupported",
            f"echo is ignored (text {_short(text, 60)}), so the prompt's byte tokens are not seen"
            + ("; the logprobs carry a bytes field" if bytes_field else ""),
            evidence,
        )
    joined = b"".join(token_bytes(t) for t in rows.tokens).decode("utf-8", "replace")
    empty = " (byte tokens came back as '')" if evidence["empty_tokens"] else ""
    if joined.startswith(BYTES_PROMPT):
        # vLLM: '' for a character's first byte token, the whole character on its last one.
        return Check(name, "ok", f"the echoed tokens decode to {BYTES_PROMPT!r}{empty}", evidence)
    return Check(
        name,
        "fails",
        f"the echoed tokens {rows.tokens!r} decode to {joined!r}, not {BYTES_PROMPT!r} "
        f"(partial characters lost){empty}",
        evidence,
    )


def suffix_check(outcome: ProbeOutcome) -> Check:
    """The echoed tokens must spell the prompt and the completion, not the suffix too."""
    raw, error = outcome
    if error is not None:
        return failure("suffix", error)
    choice = probe_choice(raw)
    rows = logprob_rows(choice)
    text = str(choice.get("text") or "") if choice else ""
    if rows is None or not rows.tokens:
        return Check("suffix", "error", f"echo with a suffix returned no tokens (text {text!r})")
    spelled = b"".join(token_bytes(t) for t in rows.tokens).decode("utf-8", "replace")
    if spelled == text and not text.startswith(SUFFIX_PROMPT):
        # ggml's llama-server: echo ignored, only the generated token comes back.
        return Check(
            "suffix",
            "error",
            f"echo is ignored (text {text!r}), so where the suffix {SUFFIX!r} went cannot be seen",
            {"echo_ignored": True},
        )
    if spelled == text and text.startswith(SUFFIX_PROMPT) and SUFFIX not in spelled:
        return Check("suffix", "ok", f"suffix {SUFFIX!r} left the echoed prompt intact ({text!r})")
    return Check(
        "suffix",
        "fails",
        f"suffix {SUFFIX!r} went into the prompt {SUFFIX_PROMPT!r}: the echoed tokens "
        f"{rows.tokens!r} spell {spelled!r}, the text is {text!r}",
        {"tokens": rows.tokens, "text": text},
    )


def card_limits(card: Mapping[str, Any] | None) -> tuple[int | None, int | None]:
    """(context length, vocabulary size) as the model card says them, else None each.

    vLLM: ``max_model_len``; ggml's llama-server: ``meta.n_ctx`` (one slot's context) and
    ``meta.n_ctx_train`` (the trained positions, past which it crashes), of which the smaller
    bounds a request, and ``meta.n_vocab``.
    """
    if card is None:
        return None, None
    found = card.get("meta")
    meta: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
    contexts = [
        positive_int(v)
        for v in (card.get("max_model_len"), meta.get("n_ctx"), meta.get("n_ctx_train"))
    ]
    known = [c for c in contexts if c is not None]
    vocab = positive_int(card.get("vocab_size")) or positive_int(meta.get("n_vocab"))
    return (min(known) if known else None), vocab


def model_info(
    card: Mapping[str, Any] | None, aclient: AsyncCompletionsClient, byte_echo: ProbeOutcome
) -> tuple[Check, int | None, int | None]:
    """The card's context length and vocabulary size; a vocabulary size it leaves out (vLLM's,
    llama-cpp-python's) comes from the embedded tokenizer when the model is ours."""
    context, vocab = card_limits(card)
    evidence: dict[str, Any] = {"context_length": context, "vocab_size": vocab}
    detail = f"context length {context}, vocabulary size {vocab} (from GET /models)"
    if vocab is None:
        model = card.get("id") if card is not None else getattr(aclient, "model", None)
        known = _embedded_vocab(model if isinstance(model, str) else None, byte_echo)
        if known is not None:
            vocab, why = known
            evidence["vocab_size"] = vocab
            detail = (
                f"context length {context} (from GET /models)"
                if context is not None
                else "GET /models tells neither context length nor vocabulary size"
            ) + f"; vocabulary size {vocab}: {why}"
        elif context is not None:
            detail = f"context length {context} (from GET /models); vocabulary size unknown"
    if context is None and evidence["vocab_size"] is None:
        detail = "GET /models tells neither context length nor vocabulary size"
    status: Status = "ok" if context is not None else "unsupported"
    return Check("model_info", status, detail, evidence), context, vocab


def _embedded_vocab(model: str | None, byte_echo: ProbeOutcome) -> tuple[int, str] | None:
    """Our embedded model served elsewhere (converted to GGUF, say): its vocabulary size, when
    the server's echo of the byte-tokens prompt has the embedded tokenizer's token count."""
    from .model import count_tokens, vocab_size

    size = vocab_size(model)
    rows = logprob_rows(probe_choice(byte_echo[0])) if byte_echo[1] is None else None
    if size is None or rows is None:
        return None
    try:
        ours = count_tokens(model, BYTES_PROMPT)
    except ImportError:  # the tokenizers package is not installed: nothing to confirm with
        return None
    if ours is None or len(rows.tokens) not in (ours, ours + 1):
        return None
    return size, (
        f"the model is the embedded {model!r}, whose tokenizer makes {ours} tokens of "
        f"{BYTES_PROMPT!r}; the server echoed {len(rows.tokens)}"
    )


#: The profile each model card's ``owned_by`` names. ggml's llama-server says "llamacpp" and lists
#: its context in "meta"; llama-cpp-python's server says "me" (its card has id, object, owned_by
#: and permissions only).
_PROFILE_BY_OWNER = {
    "vllm": "vllm",
    "llamacpp": "llama-server",
    "me": "llamacpp",
    "nbcompletions": "nbcompletions",
    "openai": "openai",
    "system": "openai",
    "openai-internal": "openai",
}


def card_profile(card: Mapping[str, Any] | None) -> str | None:
    """The profile the model card's ``owned_by`` names, or None when it names none we know."""
    owner = str(card.get("owned_by", "")).lower() if card is not None else ""
    return _PROFILE_BY_OWNER.get(owner)


def detect_profile(card: Mapping[str, Any] | None, checks: Mapping[str, Check]) -> str:
    named = card_profile(card)
    if named is not None:
        return named
    kind = checks["echo_alignment"].evidence.get("kind") if "echo_alignment" in checks else None
    if kind == "ignored":
        return "llama-server"
    if kind == "shifted" or checks.get("max_tokens_0", Check("", "ok", "")).status == "fails":
        return "llamacpp"
    if checks.get("text_offset", Check("", "ok", "")).evidence.get("origin") == "completion":
        return "vllm"
    return "openai"
