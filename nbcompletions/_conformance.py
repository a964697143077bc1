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
    _ANY_TEXT_STOPS,
    _ASKED_LOGPROBS,
    _BYTES_PROMPT,
    _PROMPT,
    _REPEAT_PROMPT,
    _SECOND_PROMPT,
    _SEED,
    _SUFFIX,
    _SUFFIX_PROMPT,
    _TOKEN_IDS,
    _best_of_check,
    _bytes_check,
    _defaults_check,
    _detect,
    _echo_alignment,
    _first,
    _gen_checks,
    _max_tokens_zero,
    _MaxZero,
    _model_info,
    _multiple_check,
    _n_check,
    _Outcome,
    _penalty_check,
    _rows,
    _seed_check,
    _stop_check,
    _stream_echo_check,
    _suffix_check,
    _token_ids_check,
    _usage_check,
    token_bytes,
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

    async def send(self, prompt: Any, **fields: Any) -> _Outcome:
        request = self.request(prompt, **fields)
        self.requests += 1
        try:
            completion = await asyncio.wait_for(
                self.aclient.complete_request(request), _PROBE_TIMEOUT
            )
        except APIError as exc:
            if exc.status in (401, 403, 404, 429):
                raise  # the key, the model or rate limits: not a question about conformance
            return None, exc
        except asyncio.TimeoutError:
            return None, APIError(f"no answer within {_PROBE_TIMEOUT:g} s", type="timeout")
        return dict(completion.raw), None

    async def max_tokens_zero(self) -> _MaxZero:
        """Stream max_tokens=0 with stops any text hits; hang up at the first generated text.

        Run alone: llama.cpp cuts a stream short (``[DONE]``, no finish_reason) when another
        request arrives, and a cut stream proves nothing either way.
        """
        request = self.request(
            _PROMPT, max_tokens=0, stream=True, temperature=0.0, stop=list(_ANY_TEXT_STOPS)
        )
        self.requests += 1
        seen = _MaxZero()
        stream = self.aclient.stream_request(request)

        async def read() -> None:
            async for piece in stream:
                seen.chunks += 1
                if piece.finish_reason is not None:
                    seen.finish = piece.finish_reason
                if piece.text:
                    seen.text += piece.text
                    # It generates: hang up now (llama.cpp stops when the client goes).
                    seen.hung_up = True
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


async def aconformance(client: HasAsyncClient, *, refresh: bool = False) -> ConformanceReport:
    """Measure what ``client``'s endpoint and model do (19 small requests); cached."""
    aclient = as_async(client)
    if not refresh:
        known = cached_report(aclient)
        if known is not None:
            return known
    started = time.perf_counter()
    probe = _Prober(aclient)
    k = 3  # generated tokens compared by the echo probe
    max_tokens = 2
    best_of = 3

    jobs: dict[str, Awaitable[Any]] = {
        "card": probe.models_card(),
        "gen": probe.send(_PROMPT, max_tokens=k + 1, temperature=0.0, logprobs=_ASKED_LOGPROBS),
        "n": probe.send(_PROMPT, n=2, max_tokens=1, temperature=1.0, seed=_SEED),
        "best_of": probe.send(
            _PROMPT, n=1, best_of=best_of, max_tokens=max_tokens, temperature=1.0, seed=_SEED
        ),
        "multi": probe.send([_PROMPT, _SECOND_PROMPT], max_tokens=1, temperature=0.0),
        "ids": probe.send(list(_TOKEN_IDS), echo=True, logprobs=0, max_tokens=1, temperature=0.0),
        "seed_a": probe.send(_SECOND_PROMPT, max_tokens=8, temperature=1.0, top_p=1.0, seed=_SEED),
        "seed_b": probe.send(_SECOND_PROMPT, max_tokens=8, temperature=1.0, top_p=1.0, seed=_SEED),
        "seed_c": probe.send(
            _SECOND_PROMPT, max_tokens=8, temperature=1.0, top_p=1.0, seed=_SEED + 1
        ),
        "omitted": probe.send(_SECOND_PROMPT, max_tokens=8, seed=_SEED),
        "plain": probe.send(_REPEAT_PROMPT, max_tokens=8, temperature=0.0),
        "penalised": probe.send(
            _REPEAT_PROMPT,
            max_tokens=8,
            temperature=0.0,
            frequency_penalty=2.0,
            presence_penalty=2.0,
        ),
        "bytes": probe.send(_BYTES_PROMPT, echo=True, logprobs=0, max_tokens=1, temperature=0.0),
        "suffix": probe.send(
            _SUFFIX_PROMPT, suffix=_SUFFIX, echo=True, logprobs=0, max_tokens=1, temperature=0.0
        ),
    }
    results = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
    # Streams one at a time, with nothing else in flight: llama.cpp ends a stream early
    # ("[DONE]" without a finish_reason) when another request arrives.
    max0 = await probe.max_tokens_zero()
    results["stream_echo"] = await probe.send(
        _PROMPT, echo=True, stream=True, max_tokens=1, temperature=0.0
    )
    results["usage"] = await probe.send(
        _PROMPT, stream=True, stream_options={"include_usage": True}, max_tokens=1, temperature=0.0
    )

    gen: _Outcome = results["gen"]
    gen_rows = _rows(_first(gen[0])) if gen[1] is None else None
    echo: _Outcome | None = None
    stop_outcome: _Outcome | None = None
    stop: str | None = None
    second: dict[str, Awaitable[_Outcome]] = {}
    if (
        gen_rows is not None
        and len(gen_rows.tokens) >= k
        and all(not t.startswith("bytes:") for t in gen_rows.tokens[:k])
    ):
        generated = "".join(gen_rows.tokens[:k])
        second["echo"] = probe.send(
            _PROMPT + generated, echo=True, logprobs=_ASKED_LOGPROBS, max_tokens=1, temperature=0.0
        )
        before = gen_rows.tokens[0]
        for candidate in gen_rows.tokens[1:k]:
            if candidate.strip() and candidate not in before + candidate[:-1]:
                stop = candidate
                break
            before += candidate
        if stop is not None:
            second["stop"] = probe.send(
                _PROMPT, max_tokens=k + 2, temperature=0.0, logprobs=0, stop=stop
            )
    done = dict(zip(second, await asyncio.gather(*second.values()), strict=True))
    echo = done.get("echo")
    stop_outcome = done.get("stop")

    checks: dict[str, Check] = {}
    checks["echo_alignment"] = _echo_alignment(gen, echo, k)
    checks["max_tokens_0"] = _max_tokens_zero(max0)
    checks["n"] = _n_check(results["n"])
    checks["best_of"] = _best_of_check(results["best_of"], max_tokens, best_of)
    checks["stream_echo"] = _stream_echo_check(results["stream_echo"])
    checks["include_usage"] = _usage_check(results["usage"])
    for check in _gen_checks(gen):
        checks[check.name] = check
    checks["stop_in_logprobs"] = _stop_check(stop, stop_outcome)
    checks["multiple_prompts"] = _multiple_check(results["multi"])
    checks["token_id_prompts"] = _token_ids_check(results["ids"])
    checks["seed"] = _seed_check(results["seed_a"], results["seed_b"], results["seed_c"])
    checks["default_sampling"] = _defaults_check(
        checks["seed"], results["seed_a"], results["omitted"]
    )
    checks["penalties"] = _penalty_check(results["plain"], results["penalised"])
    checks["byte_tokens"] = _bytes_check(results["bytes"])
    checks["suffix"] = _suffix_check(results["suffix"])
    info, context, vocab = _model_info(results["card"], aclient, results["bytes"])
    checks["model_info"] = info

    endpoint = getattr(aclient, "endpoint", None)
    report = ConformanceReport(
        [checks[name] for name in CHECKS],
        # Kept with results and written to files: credentials in the URL must not travel with it.
        endpoint=redact_url(endpoint) if isinstance(endpoint, str) else None,
        model=_key(aclient)[1],  # discovered by the probes when the client named none
        requests=probe.requests,
        seconds=time.perf_counter() - started,
        profile_name=_detect(results["card"], checks),
        context_length=context,
        vocab_size=vocab,
    )
    remember(aclient, report)
    return report


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
