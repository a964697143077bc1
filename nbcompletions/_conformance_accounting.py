"""Judging whether a server accounts for every token and bounds every request: end-of-text in
the logprobs and usage, the last generated token of an echo, a stream's finish_reason, and the
context length a client must keep prompt + ``max_tokens`` under.

Pure functions from a probe's outcome to a `Check` (`nbcompletions._conformance` sends them).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any

from ._checks import is_int
from ._conformance_checks import (
    BoundedStream,
    ProbeOutcome,
    failure,
    logprob_rows,
    probe_choice,
    token_bytes,
)
from ._conformance_report import Check

__all__ = [
    "CONTEXT_PROBE_MAX_TOKENS",
    "context_length_check",
    "echo_generated_check",
    "end_of_text_check",
    "stream_finish_check",
]

#: The context probe asks for more tokens than any context holds; it streams and hangs up at the
#: first text, so a server that accepts it generates a token or two, never its whole context.
CONTEXT_PROBE_MAX_TOKENS = 1_000_000


def _spelled(tokens: list[str]) -> str:
    return b"".join(token_bytes(t) for t in tokens).decode("utf-8", "replace")


def end_of_text_check(outcome: ProbeOutcome | None, eot_id: int | None) -> Check:
    """A generated end-of-text (forced with logit_bias) must be listed and counted."""
    name = "end_of_text"
    unknown = {"in_logprobs": None, "in_usage": None}
    if outcome is None or eot_id is None:
        return Check(
            name,
            "unsupported",
            "the model's end-of-text token id is unknown here, so no probe could force it",
            unknown,
        )
    raw, error = outcome
    if error is not None:
        return failure(name, error)
    choice = probe_choice(raw)
    text = str(choice.get("text") or "") if choice else ""
    finish = choice.get("finish_reason") if choice else None
    if finish != "stop" or text:
        return Check(
            name,
            "error",
            f"logit_bias {{{eot_id}: 100}} did not end the text at once (text {text!r}, "
            f"finish_reason {finish!r})",
            unknown,
        )
    rows = logprob_rows(choice)
    in_logprobs = rows is not None and len(rows.tokens) >= 1
    usage = raw.get("usage") if isinstance(raw, Mapping) else None
    spent = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    in_usage = (spent >= 1) if is_int(spent) else None
    evidence: dict[str, Any] = {
        "in_logprobs": in_logprobs,
        "in_usage": in_usage,
        "tokens": rows.tokens if rows is not None else None,
        "completion_tokens": spent,
    }
    if in_logprobs and in_usage is not False:
        return Check(
            name,
            "ok",
            f"the generated end-of-text is listed ({rows.tokens if rows else None!r}) and "
            f"counted (completion_tokens {spent})",
            evidence,
        )
    missing = [w for w, there in (("logprobs", in_logprobs), ("usage", in_usage)) if not there]
    return Check(
        name,
        "fails",
        f"a generated end-of-text is missing from the {' and '.join(missing)} (tokens "
        f"{evidence['tokens']!r}, completion_tokens {spent}): a text that ended is scored and "
        "counted one token short",
        evidence,
    )


def echo_generated_check(outcome: ProbeOutcome | None, prompt: str) -> Check:
    """echo with max_tokens > 0: the tokens must spell the prompt and every generated token."""
    name = "echo_generated"
    if outcome is None:
        return Check(
            name, "error", "no tokens were generated to build the probe", {"missing_last": None}
        )
    raw, error = outcome
    if error is not None:
        check = failure(name, error)
        return dataclasses.replace(check, evidence={**check.evidence, "missing_last": None})
    choice = probe_choice(raw)
    text = str(choice.get("text") or "") if choice else ""
    rows = logprob_rows(choice)
    if not text.startswith(prompt):
        return Check(
            name,
            "unsupported",
            f"echo is ignored: the text {text!r} does not start with the prompt",
            {"missing_last": None, "echo_ignored": True},
        )
    if rows is None or not rows.tokens:
        return Check(name, "fails", "echo returned no logprobs tokens", {"missing_last": None})
    spelled = _spelled(rows.tokens)
    evidence = {"missing_last": False, "text": text, "spelled": spelled}
    if spelled == text:
        return Check(
            name,
            "ok",
            f"echo with a generated token: the {len(rows.tokens)} tokens spell the whole text",
            evidence,
        )
    if text.startswith(spelled) and len(spelled) >= len(prompt):
        return Check(
            name,
            "fails",
            f"echo with generated tokens: the tokens spell {spelled!r} but the text is {text!r}: "
            "the last generated token is missing from the logprobs",
            {**evidence, "missing_last": True, "missing": text[len(spelled) :]},
        )
    return Check(
        name,
        "fails",
        f"echo with generated tokens: the tokens spell {spelled!r}, the text is {text!r}",
        evidence,
    )


def stream_finish_check(seen: BoundedStream) -> Check:
    """A stream must end with a finish_reason, even while another request is in flight."""
    name = "stream_finish"
    if seen.error is not None:
        return failure(name, seen.error)
    evidence = {
        "finish_reason": seen.finish,
        "chunks": seen.chunks,
        "text": seen.text,
        "overlapped": seen.overlapped,
    }
    if seen.finish is None:
        return Check(
            name,
            "fails",
            f"a stream ended after {seen.chunks} chunk(s) (text {seen.text!r}) without a "
            "finish_reason when another request arrived: the server cut it short, and its "
            "text looks complete",
            evidence,
        )
    during = "with another request in flight" if seen.overlapped else "(nothing overlapped it)"
    return Check(
        name, "ok", f"the stream ended with finish_reason {seen.finish!r} {during}", evidence
    )


_CONTEXT_IN_MESSAGE = re.compile(
    r"(?:context length|context window|max_model_len)\D{0,40}?(\d{2,9})", re.IGNORECASE
)


def context_length_check(
    card_context: int | None, probe: BoundedStream | None, trained: int | None
) -> Check:
    """Where the client can learn the bound on prompt + max_tokens: the model card, else the
    probe's refusal of max_tokens past any context (its message names the length), else the
    embedded model's trained positions."""
    name = "context_length"
    if card_context is not None:
        return Check(
            name,
            "ok",
            f"context length {card_context} (from GET /models)",
            {"context_length": card_context, "source": "card"},
        )
    if probe is None:
        return Check(name, "error", "no probe was sent", {"context_length": None, "source": None})
    asked = f"max_tokens={CONTEXT_PROBE_MAX_TOKENS}"
    if probe.error is not None and probe.error.status is not None and probe.error.status < 500:
        found = _CONTEXT_IN_MESSAGE.search(probe.error.message or str(probe.error))
        if found is not None:
            length = int(found.group(1))
            return Check(
                name,
                "ok",
                f"context length {length} (the server refused {asked} and said so)",
                {"context_length": length, "source": "probe"},
            )
        return Check(
            name,
            "unsupported",
            f"the server refused {asked} without naming its context length",
            {"context_length": trained, "source": "model" if trained else None},
        )
    if probe.error is not None:
        check = failure(name, probe.error)
        return dataclasses.replace(check, evidence={"context_length": None, "source": None})
    bound = (
        f"; the model's trained positions ({trained}) bound prompt + max_tokens here"
        if trained
        else "; no bound is known"
    )
    return Check(
        name,
        "fails",
        f"the server accepted {asked} (it streamed {probe.text!r} before the probe hung up): it "
        "does not bound prompt + max_tokens by its context and generates until the context is "
        "full (llama.cpp crashes past the model's trained positions)" + bound,
        {"context_length": trained, "source": "model" if trained else None, "accepted": True},
    )
