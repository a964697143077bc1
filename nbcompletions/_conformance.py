"""Checking an endpoint: probes that measure what it does, and the report they make.

`aconformance` sends 19 small requests (a few tokens each) and compares what comes back with
what OpenAI's Completions API promises. Each check is a row of `ConformanceReport.frame` with a
status (``ok``, ``fails``, ``unsupported``: the server refused the feature, ``error``: the probe
itself failed) and the evidence, e.g. the two numbers that disagree. Nothing is taken on trust from
what a server says about itself, except the context length and vocabulary size it lists.

Every probe is bounded: each sends an explicit small ``max_tokens``. The one that cannot (is
``max_tokens=0`` honoured?) streams, stops at any of four common characters, and hangs up at the
first generated text, so a server that reads 0 as "unlimited" (llama.cpp) generates a token or
two, not its whole context (which crashed one). Honoured means proven: no text and
``finish_reason`` "length". Streams run one at a time with nothing else in flight, because
llama.cpp cuts a stream short when another request arrives (and a cut stream proves nothing).

This module sends the probes and caches the report per client. The rest, one concept each:
`nbcompletions._conformance_report` (`Check`, `ConformanceReport`), `._conformance_checks` (pure
judging of each answer), `._conformance_consequences` (`score_max_tokens`, `check_sweep`: what
``score()`` and sweeps do about a report); the names stay importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import weakref
from collections.abc import Awaitable, Mapping
from typing import Any

from ._conformance_checks import (
    ANY_TEXT_STOPS,
    ASKED_LOGPROBS,
    BYTES_PROMPT,
    PROMPT,
    REPEAT_PROMPT,
    SECOND_PROMPT,
    SEED,
    SUFFIX,
    SUFFIX_PROMPT,
    TOKEN_IDS,
    MaxZeroStream,
    ProbeOutcome,
    best_of_check,
    bytes_check,
    defaults_check,
    detect_profile,
    echo_alignment,
    gen_checks,
    logprob_rows,
    max_tokens_zero_check,
    model_info,
    multiple_check,
    n_check,
    penalty_check,
    probe_choice,
    seed_check,
    stop_check,
    stream_echo_check,
    suffix_check,
    token_bytes,
    token_ids_check,
    usage_check,
)
from ._conformance_consequences import check_sweep, score_max_tokens
from ._conformance_report import CHECKS, Check, ConformanceReport
from ._errors import APIError
from ._profiles import ServerProfile
from ._request import CompletionRequest, Limits
from ._secrets import redact_url
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async

# The report types and the consequences live beside this module; they are re-exported here, where
# the client, scoring and sweeps have always found them.
__all__ = [
    "CHECKS",
    "Check",
    "ConformanceReport",
    "aconformance",
    "cached_report",
    "check_sweep",
    "known_vocab_size",
    "remember",
    "score_max_tokens",
    "token_bytes",
]

# Probes ask past OpenAI's caps on purpose: the point is to see what the server does.
_PROBE_LIMITS = Limits(max_logprobs=None)
_PROBE_TIMEOUT = 30.0

_reports: weakref.WeakKeyDictionary[
    AsyncCompletionsClient, dict[tuple[str, str | None], ConformanceReport]
] = weakref.WeakKeyDictionary()


# -- sending the probes ----------------------------------------------------------------------------


class _Prober:
    def __init__(self, aclient: AsyncCompletionsClient) -> None:
        self.aclient = aclient
        self.requests = 0

    def request(self, prompt: Any, **fields: Any) -> CompletionRequest:
        return CompletionRequest(
            prompt=prompt,
            model=getattr(self.aclient, "model", None),
            limits=_PROBE_LIMITS,
            **fields,
        )

    async def send(self, prompt: Any, **fields: Any) -> ProbeOutcome:
        request = self.request(prompt, **fields)
        self.requests += 1
        try:
            completion = await asyncio.wait_for(
                self.aclient.complete_as_is(request), _PROBE_TIMEOUT
            )
        except APIError as exc:
            if exc.status in (401, 403, 404, 429):
                raise  # the key, the model or rate limits: not a question about conformance
            return None, exc
        except asyncio.TimeoutError:
            return None, APIError(f"no answer within {_PROBE_TIMEOUT:g} s", type="timeout")
        return dict(completion.raw), None

    async def max_tokens_zero(self) -> MaxZeroStream:
        """Stream max_tokens=0 with stops any text hits; hang up at the first generated text.

        Run alone: llama.cpp cuts a stream short (``[DONE]``, no finish_reason) when another
        request arrives, and a cut stream proves nothing either way.
        """
        request = self.request(
            PROMPT, max_tokens=0, stream=True, temperature=0.0, stop=list(ANY_TEXT_STOPS)
        )
        self.requests += 1
        seen = MaxZeroStream()
        stream = self.aclient.stream_as_is(request)

        async def read() -> None:
            async for piece in stream:
                seen.chunks += 1
                if piece.finish_reason is not None:
                    seen.finish = piece.finish_reason
                if piece.text:
                    seen.text += piece.text
                    # It generates: hang up now (llama.cpp stops when the client goes).
                    break
                if seen.finish is not None:
                    break

        try:
            await asyncio.wait_for(read(), _PROBE_TIMEOUT)
        except APIError as exc:
            if exc.status in (401, 403, 404, 429):
                raise
            seen.error = exc
        except asyncio.TimeoutError:
            seen.error = APIError(f"no answer within {_PROBE_TIMEOUT:g} s", type="timeout")
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()
        return seen

    async def models_card(self) -> Mapping[str, Any] | None:
        self.requests += 1
        try:
            body = await self.aclient.request("GET", "/models")
        except APIError:
            return None
        data = body.get("data") if isinstance(body, Mapping) else None
        if not isinstance(data, list):
            return None
        cards = [c for c in data if isinstance(c, Mapping)]
        model = getattr(self.aclient, "model", None)
        for card in cards:
            if card.get("id") == model:
                return card
        return cards[0] if len(cards) == 1 else None


#: Generated tokens the echo probe compares; max_tokens and best_of of the best_of probe.
_ECHO_TOKENS = 3
_BEST_OF_MAX_TOKENS = 2
_BEST_OF = 3


async def aconformance(client: HasAsyncClient, *, refresh: bool = False) -> ConformanceReport:
    """Measure what ``client``'s endpoint and model do (19 small requests); cached."""
    aclient = as_async(client)
    if not refresh:
        known = cached_report(aclient)
        if known is not None:
            return known
    started = time.perf_counter()
    probe = _Prober(aclient)
    results = await _first_round(probe)
    # Streams one at a time, with nothing else in flight: llama.cpp ends a stream early
    # ("[DONE]" without a finish_reason) when another request arrives.
    max0 = await probe.max_tokens_zero()
    results["stream_echo"] = await probe.send(
        PROMPT, echo=True, stream=True, max_tokens=1, temperature=0.0
    )
    results["usage"] = await probe.send(
        PROMPT, stream=True, stream_options={"include_usage": True}, max_tokens=1, temperature=0.0
    )
    echo, stop, stop_outcome = await _second_round(probe, results["gen"])
    checks = _judge(results, max0, echo, stop, stop_outcome)
    info, context, vocab = model_info(results["card"], aclient, results["bytes"])
    checks["model_info"] = info
    endpoint = getattr(aclient, "endpoint", None)
    report = ConformanceReport(
        [checks[name] for name in CHECKS],
        # Kept with results and written to files: credentials in the URL must not travel with it.
        endpoint=redact_url(endpoint) if isinstance(endpoint, str) else None,
        model=_key(aclient)[1],  # discovered by the probes when the client named none
        requests=probe.requests,
        seconds=time.perf_counter() - started,
        profile_name=detect_profile(results["card"], checks),
        context_length=context,
        vocab_size=vocab,
    )
    remember(aclient, report)
    return report


async def _first_round(probe: _Prober) -> dict[str, Any]:
    """The probes that need nothing from another's answer, sent together."""
    k = _ECHO_TOKENS
    jobs: dict[str, Awaitable[Any]] = {
        "card": probe.models_card(),
        "gen": probe.send(PROMPT, max_tokens=k + 1, temperature=0.0, logprobs=ASKED_LOGPROBS),
        "n": probe.send(PROMPT, n=2, max_tokens=1, temperature=1.0, seed=SEED),
        "best_of": probe.send(
            PROMPT,
            n=1,
            best_of=_BEST_OF,
            max_tokens=_BEST_OF_MAX_TOKENS,
            temperature=1.0,
            seed=SEED,
        ),
        "multi": probe.send([PROMPT, SECOND_PROMPT], max_tokens=1, temperature=0.0),
        "ids": probe.send(list(TOKEN_IDS), echo=True, logprobs=0, max_tokens=1, temperature=0.0),
        "seed_a": probe.send(SECOND_PROMPT, max_tokens=8, temperature=1.0, top_p=1.0, seed=SEED),
        "seed_b": probe.send(SECOND_PROMPT, max_tokens=8, temperature=1.0, top_p=1.0, seed=SEED),
        "seed_c": probe.send(
            SECOND_PROMPT, max_tokens=8, temperature=1.0, top_p=1.0, seed=SEED + 1
        ),
        "omitted": probe.send(SECOND_PROMPT, max_tokens=8, seed=SEED),
        "plain": probe.send(REPEAT_PROMPT, max_tokens=8, temperature=0.0),
        "penalised": probe.send(
            REPEAT_PROMPT,
            max_tokens=8,
            temperature=0.0,
            frequency_penalty=2.0,
            presence_penalty=2.0,
        ),
        "bytes": probe.send(BYTES_PROMPT, echo=True, logprobs=0, max_tokens=1, temperature=0.0),
        "suffix": probe.send(
            SUFFIX_PROMPT, suffix=SUFFIX, echo=True, logprobs=0, max_tokens=1, temperature=0.0
        ),
    }
    return dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))


async def _second_round(
    probe: _Prober, gen: ProbeOutcome
) -> tuple[ProbeOutcome | None, str | None, ProbeOutcome | None]:
    """The probes built from the generation's tokens: the echo of the prompt plus them, and a
    stop string one of them starts. Returns (echo outcome, stop string, stop outcome)."""
    k = _ECHO_TOKENS
    gen_rows = logprob_rows(probe_choice(gen[0])) if gen[1] is None else None
    if (
        gen_rows is None
        or len(gen_rows.tokens) < k
        or any(t.startswith("bytes:") for t in gen_rows.tokens[:k])
    ):
        return None, None, None
    second: dict[str, Awaitable[ProbeOutcome]] = {}
    generated = "".join(gen_rows.tokens[:k])
    second["echo"] = probe.send(
        PROMPT + generated, echo=True, logprobs=ASKED_LOGPROBS, max_tokens=1, temperature=0.0
    )
    stop = None
    before = gen_rows.tokens[0]
    for candidate in gen_rows.tokens[1:k]:
        if candidate.strip() and candidate not in before + candidate[:-1]:
            stop = candidate
            break
        before += candidate
    if stop is not None:
        second["stop"] = probe.send(
            PROMPT, max_tokens=k + 2, temperature=0.0, logprobs=0, stop=stop
        )
    done = dict(zip(second, await asyncio.gather(*second.values()), strict=True))
    return done.get("echo"), stop, done.get("stop")


def _judge(
    results: dict[str, Any],
    max0: MaxZeroStream,
    echo: ProbeOutcome | None,
    stop: str | None,
    stop_outcome: ProbeOutcome | None,
) -> dict[str, Check]:
    """Every check but model_info, from the probes' outcomes."""
    gen: ProbeOutcome = results["gen"]
    checks: dict[str, Check] = {}
    checks["echo_alignment"] = echo_alignment(gen, echo, _ECHO_TOKENS)
    checks["max_tokens_0"] = max_tokens_zero_check(max0)
    checks["n"] = n_check(results["n"])
    checks["best_of"] = best_of_check(results["best_of"], _BEST_OF_MAX_TOKENS, _BEST_OF)
    checks["stream_echo"] = stream_echo_check(results["stream_echo"])
    checks["include_usage"] = usage_check(results["usage"])
    for check in gen_checks(gen):
        checks[check.name] = check
    checks["stop_in_logprobs"] = stop_check(stop, stop_outcome)
    checks["multiple_prompts"] = multiple_check(results["multi"])
    checks["token_id_prompts"] = token_ids_check(results["ids"])
    checks["seed"] = seed_check(results["seed_a"], results["seed_b"], results["seed_c"])
    checks["default_sampling"] = defaults_check(
        checks["seed"], results["seed_a"], results["omitted"]
    )
    checks["penalties"] = penalty_check(results["plain"], results["penalised"])
    checks["byte_tokens"] = bytes_check(results["bytes"])
    checks["suffix"] = suffix_check(results["suffix"])
    return checks


# -- the cache -------------------------------------------------------------------------------------


def _key(aclient: AsyncCompletionsClient) -> tuple[str, str | None]:
    endpoint = getattr(aclient, "endpoint", None)
    model = getattr(aclient, "model", None) or getattr(aclient, "_discovered_model", None)
    return (str(endpoint), model)


def cached_report(client: HasAsyncClient) -> ConformanceReport | None:
    """The report already measured for this client's endpoint and model, or None (no I/O)."""
    aclient = as_async(client)
    try:
        found = _reports.get(aclient)
    except TypeError:  # not weak-referenceable
        return None
    return found.get(_key(aclient)) if found is not None else None


def remember(client: HasAsyncClient, report: ConformanceReport) -> None:
    """Keep ``report`` for this client (a sweep's stored report, say)."""
    aclient = as_async(client)
    with contextlib.suppress(TypeError):  # not weak-referenceable: measured again next time
        _reports.setdefault(aclient, {})[_key(aclient)] = report


def known_vocab_size(client: HasAsyncClient) -> int | None:
    """The vocabulary size the check found, else the client's profile's; None (no I/O)."""
    report = cached_report(client)
    if report is not None and report.vocab_size is not None:
        return report.vocab_size
    profile = getattr(getattr(client, "async_client", client), "profile", None)
    return profile.vocab_size if isinstance(profile, ServerProfile) else None
