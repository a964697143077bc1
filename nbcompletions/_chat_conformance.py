"""What an endpoint's ``/v1/chat/completions`` does with logprobs, measured (about 11 requests).

`achat_conformance(client)` returns a `ConformanceReport` (the class `conformance()` returns) of
these checks, kept apart from the completion checks so that those stay within their 25 requests:

``chat_top_logprobs_cap``
    ``top_logprobs=20`` gives 20 alternatives per token, and ``21`` is refused (or how many come).
``chat_n``
    ``n=2`` gives two choices.
``chat_seed``
    two sampled requests with one ``seed`` give one text.
``chat_bytes``
    every logprobs entry has ``bytes`` and they decode to its token.
``chat_logprobs_mode``
    what the logprobs mean: the first token's alternatives at temperature 1 and 2 (evidence
    ``mode``: "raw" where they are equal, the model's own distribution as vLLM's default
    ``--logprobs-mode`` and llama-server give; "processed" where they moved with temperature).
``chat_logprobs_stable``
    the chosen tokens' logprobs with ``top_logprobs=1`` and ``20`` are the same (vLLM #44319
    reported them changing with the number requested).
``chat_reply_span``
    ``POST /tokenize`` with messages finds a reply's tokens and they detokenize to the reply
    (what `Client.score_reply`'s prompt_logprobs way rests on); "unsupported" without
    ``/tokenize``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from ._conformance import cached_report
from ._conformance_report import Check, ConformanceReport, Status
from ._errors import APIError, ConformanceError
from ._reply_scoring import server_reply_span
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

__all__ = ["CHAT_CHECKS", "achat_conformance"]

CHAT_CHECKS = (
    "chat_top_logprobs_cap",
    "chat_n",
    "chat_seed",
    "chat_bytes",
    "chat_logprobs_mode",
    "chat_logprobs_stable",
    "chat_reply_span",
)
MESSAGES = [{"role": "user", "content": "Who is there?"}]
REPLY = "Nay, answer me: stand, and unfold yourself."
SAME = 1e-5  # float32 logprobs of one computation agree far closer than this


class _Prober:
    """Sends the chat probes (raw bodies: the client's own checks would refuse top_logprobs=21)."""

    def __init__(self, aclient: AsyncCompletionsClient, model: str | None) -> None:
        self.aclient = aclient
        self.model = model
        self.sent = 0

    async def chat(self, **fields: Any) -> Mapping[str, Any] | APIError:
        body: dict[str, Any] = {"messages": MESSAGES, "max_tokens": 4, **fields}
        if self.model is not None:
            body["model"] = self.model
        self.sent += 1
        request: Any = self.aclient.request  # the protocol's request() takes no json=
        try:
            answer = await request("POST", "/chat/completions", json=body, retry=False)
        except APIError as exc:
            if exc.status is None or exc.status >= 500:
                raise
            return exc
        return answer if isinstance(answer, Mapping) else {}


def _entries(answer: Mapping[str, Any], index: int = 0) -> list[Mapping[str, Any]]:
    choices = answer.get("choices")
    if not isinstance(choices, list) or len(choices) <= index:
        return []
    logprobs = choices[index].get("logprobs") if isinstance(choices[index], Mapping) else None
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else None
    return [e for e in content if isinstance(e, Mapping)] if isinstance(content, list) else []


def _text(answer: Mapping[str, Any]) -> str | None:
    choices = answer.get("choices")
    first = choices[0] if isinstance(choices, list) and choices else None
    message = first.get("message") if isinstance(first, Mapping) else None
    content = message.get("content") if isinstance(message, Mapping) else None
    return content if isinstance(content, str) else None


def _refused(name: str, error: APIError, what: str) -> Check:
    return Check(name, "unsupported", f"{what} was refused: HTTP {error.status} {error}"[:300])


def _cap(at_cap: Mapping[str, Any] | APIError, over: Mapping[str, Any] | APIError) -> Check:
    name = "chat_top_logprobs_cap"
    if isinstance(at_cap, APIError):
        return _refused(name, at_cap, "logprobs=true with top_logprobs=20")
    counts = [len(e.get("top_logprobs") or []) for e in _entries(at_cap)]
    over_cap = "refused" if isinstance(over, APIError) else "accepted"
    over_counts = (
        []
        if isinstance(over, APIError)
        else [len(e.get("top_logprobs") or []) for e in _entries(over)]
    )
    evidence = {
        "returned": min(counts, default=0),
        "over_cap": over_cap,
        "over_cap_returned": min(over_counts, default=None),
    }
    if not counts or min(counts) != 20 or max(counts) != 20:
        return Check(
            name,
            "fails",
            f"top_logprobs=20 gave {sorted(set(counts))} alternatives per token, not 20",
            evidence,
        )
    return Check(
        name,
        "ok",
        f"20 alternatives per token at top_logprobs=20; 21 {over_cap}"
        + (f" ({min(over_counts, default=0)} returned)" if over_counts else ""),
        evidence,
    )


def _n(answer: Mapping[str, Any] | APIError) -> Check:
    if isinstance(answer, APIError):
        return _refused("chat_n", answer, "n=2")
    choices = answer.get("choices")
    count = len(choices) if isinstance(choices, list) else 0
    status: Status = "ok" if count == 2 else "fails"
    return Check("chat_n", status, f"n=2 gave {count} choice(s)", {"choices": count})


def _seed(first: Mapping[str, Any] | APIError, second: Mapping[str, Any] | APIError) -> Check:
    for answer in (first, second):
        if isinstance(answer, APIError):
            return _refused("chat_seed", answer, "seed=7 at temperature 1")
    texts = [_text(first), _text(second)]  # type: ignore[arg-type]  # not APIError past the loop
    same = texts[0] is not None and texts[0] == texts[1]
    detail = "one seed gave one text twice" if same else f"one seed gave two texts {texts!r}"
    return Check("chat_seed", "ok" if same else "fails", detail[:300], {"same": same})


def _bytes(answer: Mapping[str, Any] | APIError) -> Check:
    if isinstance(answer, APIError):
        return _refused("chat_bytes", answer, "logprobs=true")
    entries = _entries(answer)
    missing = sum(1 for e in entries if not isinstance(e.get("bytes"), list))
    wrong = 0
    for entry in entries:
        raw = entry.get("bytes")
        if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
            decoded = bytes(raw).decode("utf-8", errors="replace")
            wrong += "\ufffd" not in decoded and decoded != entry.get("token")
    evidence = {"entries": len(entries), "missing": missing, "mismatched": wrong}
    if not entries or missing or wrong:
        return Check(
            "chat_bytes",
            "fails",
            f"of {len(entries)} entries, {missing} without "
            f"bytes and {wrong} whose bytes are not the token",
            evidence,
        )
    return Check(
        "chat_bytes", "ok", f"all {len(entries)} entries carry their token's bytes", evidence
    )


def _first_alternatives(answer: Mapping[str, Any]) -> dict[str, float]:
    entries = _entries(answer)
    tops = entries[0].get("top_logprobs") if entries else None
    return {
        str(t.get("token")): float(t["logprob"])
        for t in tops or []
        if isinstance(t, Mapping) and isinstance(t.get("logprob"), (int, float))
    }


def _mode(cold: Mapping[str, Any] | APIError, hot: Mapping[str, Any] | APIError) -> Check:
    name = "chat_logprobs_mode"
    for answer in (cold, hot):
        if isinstance(answer, APIError):
            return _refused(name, answer, "top_logprobs=5 at temperature 1 and 2")
    one, two = _first_alternatives(cold), _first_alternatives(hot)  # type: ignore[arg-type]
    shared = sorted(set(one) & set(two))
    if not shared:
        return Check(name, "error", "no alternative came back at both temperatures")
    difference = max(abs(one[t] - two[t]) for t in shared)
    mode = "raw" if difference < SAME else "processed"
    detail = (
        f"logprobs are {mode}: the first token's {len(shared)} alternatives differ by at most "
        f"{difference:.3g} between temperature 1 and 2"
    )
    return Check(name, "ok", detail, {"mode": mode, "max_difference": difference})


def _stable(one: Mapping[str, Any] | APIError, many: Mapping[str, Any] | APIError) -> Check:
    name = "chat_logprobs_stable"
    for answer in (one, many):
        if isinstance(answer, APIError):
            return _refused(name, answer, "top_logprobs=1 and 20 at temperature 0")
    pairs = list(zip(_entries(one), _entries(many), strict=False))  # type: ignore[arg-type]
    values = [
        (a.get("logprob"), b.get("logprob")) for a, b in pairs if a.get("token") == b.get("token")
    ]
    numbers = [
        (x, y) for x, y in values if isinstance(x, (int, float)) and isinstance(y, (int, float))
    ]
    if not numbers:
        return Check(name, "error", "no token came back the same with top_logprobs 1 and 20")
    difference = max(abs(float(x) - float(y)) for x, y in numbers)
    status: Status = "ok" if difference < SAME else "fails"
    return Check(
        name,
        status,
        f"the chosen tokens' logprobs differ by at most {difference:.3g} "
        "between top_logprobs=1 and 20",
        {"max_difference": difference},
    )


async def _span(aclient: AsyncCompletionsClient) -> Check:
    name = "chat_reply_span"
    try:
        span = await server_reply_span(aclient, list(MESSAGES), REPLY)
    except ConformanceError as exc:
        return Check(name, "fails", str(exc)[:300])
    except APIError as exc:
        return Check(name, "error", f"POST /tokenize failed: {exc}"[:300])
    if span is None:
        return Check(name, "unsupported", "no POST /tokenize with messages")
    evidence = {"start": span.start, "end": span.end, "tokens": len(span.ids)}
    return Check(
        name,
        "ok",
        f"tokens {span.start}-{span.end} of {len(span.ids)} detokenize to "
        f"the reply ({span.text!r})"[:300],
        evidence,
    )


async def achat_conformance(client: HasAsyncClient) -> ConformanceReport:
    """Measure the chat endpoint's logprobs (the checks in the module docstring)."""
    aclient = as_async(client)
    model = aclient.model
    if model is None:
        listed = await aclient.models()
        model = listed[0] if listed else None
    probe = _Prober(aclient, model)
    began = time.perf_counter()
    greedy = {"logprobs": True, "temperature": 0.0}
    sampled = {"temperature": 1.0, "seed": 7, "max_tokens": 8}
    answers = await asyncio.gather(
        probe.chat(**greedy, top_logprobs=20),
        probe.chat(**greedy, top_logprobs=21),
        probe.chat(n=2, max_tokens=2),
        probe.chat(**sampled),
        probe.chat(**sampled),
        probe.chat(logprobs=True, top_logprobs=5, temperature=1.0, seed=1, max_tokens=1),
        probe.chat(logprobs=True, top_logprobs=5, temperature=2.0, seed=1, max_tokens=1),
        probe.chat(**greedy, top_logprobs=1),
    )
    span = await _span(aclient)
    checks = [
        _cap(answers[0], answers[1]),
        _n(answers[2]),
        _seed(answers[3], answers[4]),
        _bytes(answers[0]),
        _mode(answers[5], answers[6]),
        _stable(answers[7], answers[0]),
        span,
    ]
    known = cached_report(aclient)
    return ConformanceReport(
        checks,
        endpoint=str(getattr(aclient, "endpoint", "")) or None,
        model=model,
        requests=probe.sent + 3,  # and /tokenize twice, /detokenize once
        seconds=time.perf_counter() - began,
        profile_name=known.profile_name if known is not None else "openai",
    )
