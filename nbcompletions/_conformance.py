"""Checking an endpoint: probes that measure what it does, and the report they make.

`aconformance` sends at most 25 small requests (22 to our server and vLLM, 23 to llama-cpp-python;
most a few tokens; the penalty, sampler-order and stream-finish probes 96, 48 and 96 tokens,
sent together; the stream 16 on servers that batch) and compares what comes back with what
OpenAI's Completions API promises. Each check is a row of `ConformanceReport.frame` with a
status (``ok``, ``fails``, ``unsupported``: the server refused the feature, ``error``: the probe
itself failed) and the evidence, e.g. the two numbers that disagree. Nothing is taken on trust
from what a server says about itself, except the context length and vocabulary size it lists.

Every probe is bounded: each sends an explicit small ``max_tokens``. The two that cannot (is
``max_tokens=0`` honoured? is ``max_tokens`` past any context refused?) stream, stop at any of
four common characters, and hang up at the first generated text, so a server that reads 0 as
"unlimited" (llama.cpp) or accepts a million tokens generates a token or two, not its whole
context (which crashed one). Honoured means proven: no text and ``finish_reason`` "length".
Those streams run one at a time with nothing else in flight, because llama.cpp cuts a stream
short when another request arrives (and a cut stream proves nothing); the stream_finish probe
measures exactly that, with two probes sent beside its stream. Where the model card names a
server that batches whatever is in flight (vLLM, ours, OpenAI), every probe goes out at once
instead and the check takes about as long as its longest probe (vLLM CPU: 96 greedy steps, plus
the kernel it compiles for the first request with logprobs after it starts).

GET /models is asked once, first: its card names the model for every probe (concurrent probes
would each make the client discover it), tells the context length where it can, and names the
server whose neutral sampling fields the penalty and sampler-order probes carry.

This module sends the probes and caches the report per client. The rest, one concept each:
`nbcompletions._conformance_report` (`Check`, `ConformanceReport`), `._conformance_checks` (pure
judging of each answer), `._conformance_sampling` (penalty window, sampler order),
`._conformance_accounting` (end-of-text, echo with generated tokens, stream finish, context
length), `._conformance_consequences` (`score_max_tokens`, `check_sweep`: what ``score()`` and
sweeps do about a report); the names stay importable from here.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
import weakref
from collections.abc import Awaitable, Iterable, Mapping
from typing import Any

from ._checks import positive_int
from ._conformance_accounting import (
    CONTEXT_PROBE_MAX_TOKENS,
    context_length_check,
    echo_generated_check,
    end_of_text_check,
    stream_finish_check,
)
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
    BoundedStream,
    ProbeOutcome,
    best_of_check,
    bytes_check,
    card_limits,
    card_profile,
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
from ._conformance_sampling import (
    ORDER_PROMPT,
    ORDER_TEMPERATURE,
    ORDER_TOKENS,
    ORDER_TOP_P,
    PENALTY,
    WINDOW_TOKENS,
    penalty_window_check,
    sampler_order_check,
)
from ._errors import APIError
from ._model_card import known_limits, read_card
from ._profiles import PROFILES, ServerProfile
from ._request import CompletionRequest, Limits
from ._secrets import redact_url
from ._types import AsyncCompletionsClient, HasAsyncClient, as_async
from .model import end_of_text_id, trained_positions

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
        #: The model every probe names: the client's, else the one GET /models lists. Named on
        #: each probe, so that concurrent probes do not each ask the server (issue 16, case 15).
        self.model: str | None = getattr(aclient, "model", None)

    def request(self, prompt: Any, **fields: Any) -> CompletionRequest:
        return CompletionRequest(prompt=prompt, model=self.model, limits=_PROBE_LIMITS, **fields)

    async def send(self, prompt: Any, **fields: Any) -> ProbeOutcome:
        request = self.request(prompt, **fields)
        self.requests += 1
        for attempt in range(2):
            try:
                completion = await asyncio.wait_for(
                    self.aclient.complete_as_is(request), _PROBE_TIMEOUT
                )
            except APIError as exc:
                if exc.status in (401, 403, 404, 429):
                    raise  # the key, the model or rate limits: not a question about conformance
                if exc.type == "connection_error" and attempt == 0:
                    # Not an answer: a pooled connection the server had just closed (uvicorn
                    # closes idle ones after 5 s; seen with max_retries=0 on vLLM). Once more.
                    self.requests += 1
                    continue
                return None, exc
            except asyncio.TimeoutError:
                return None, APIError(f"no answer within {_PROBE_TIMEOUT:g} s", type="timeout")
            return dict(completion.raw), None
        raise AssertionError("unreachable")  # pragma: no cover

    async def tokenize(self, text: str) -> list[str] | None:
        """``text``'s token pieces from ggml llama-server's /tokenize (beside /v1), or None."""
        self.requests += 1
        path = (
            "/../tokenize"
            if str(self.aclient.endpoint).rstrip("/").endswith("/v1")
            else "/tokenize"
        )
        body = {"content": text, "add_special": False, "with_pieces": True}
        try:
            answer = await self.aclient.request("POST", path, json=body)
        except APIError:
            return None
        tokens = answer.get("tokens") if isinstance(answer, Mapping) else None
        if not isinstance(tokens, list):
            return None
        pieces = [t.get("piece") for t in tokens if isinstance(t, Mapping)]
        return [p for p in pieces if isinstance(p, str)] if len(pieces) == len(tokens) else None

    async def bounded_stream(self, max_tokens: int) -> BoundedStream:
        """Stream ``max_tokens`` with stops any text hits; hang up at the first generated text.

        The max_tokens=0 probe (is 0 honoured?) and the context probe (is max_tokens past any
        context refused?): a server that says yes generates a token or two, never its whole
        context (which crashed one). Run alone: llama.cpp cuts a stream short (``[DONE]``, no
        finish_reason) when another request arrives, and a cut stream proves nothing either way.
        """
        request = self.request(
            PROMPT, max_tokens=max_tokens, stream=True, temperature=0.0, stop=list(ANY_TEXT_STOPS)
        )
        seen = BoundedStream()

        async def read(piece: Any) -> bool:
            if piece.finish_reason is not None:
                seen.finish = piece.finish_reason
            if piece.text:
                seen.text += piece.text
                return True  # it generates: hang up now (llama.cpp stops when the client goes)
            return seen.finish is not None

        await self._read_stream(request, seen, read)
        return seen

    async def stream_with_company(
        self, company: Mapping[str, Awaitable[ProbeOutcome]], *, at_once: bool = False
    ) -> tuple[BoundedStream, dict[str, ProbeOutcome]]:
        """The stream_finish probe: a greedy stream, and once its first chunk is in, the
        ``company`` probes sent beside it (llama-cpp-python cuts a stream when a request
        arrives while it streams). ``at_once``: the company is sent with the stream, not after
        its first chunk (a server that batches: they then need not wait for it); it overlapped
        the stream when a company probe was still in flight at the first chunk.
        Returns what the stream showed and the company's outcomes."""
        # Sent with its company, the stream is overlapped from its first token: a short one
        # proves as much, and each streamed token costs a server that batches CPU time.
        length = FINISH_TOKENS_AT_ONCE if at_once else FINISH_TOKENS
        request = self.request(PROMPT, max_tokens=length, stream=True, temperature=0.0)
        seen = BoundedStream()
        started: dict[str, asyncio.Future[ProbeOutcome]] = {}
        if at_once:
            started.update({k: asyncio.ensure_future(job) for k, job in company.items()})
        first_chunk = True

        async def read(piece: Any) -> bool:
            nonlocal first_chunk
            seen.text += piece.text or ""
            if piece.finish_reason is not None:
                seen.finish = piece.finish_reason
            if first_chunk and company:
                if not started:
                    started.update({k: asyncio.ensure_future(job) for k, job in company.items()})
                in_flight = any(not future.done() for future in started.values())
                seen.overlapped = seen.finish is None and in_flight
            first_chunk = False
            return False

        try:
            await self._read_stream(request, seen, read)
        except BaseException:
            # The key, the model or rate limits (re-raised): what was started is cancelled (the
            # caller closes what was never sent), so no probe is left running.
            for future in started.values():
                future.cancel()
            raise
        if not started:  # the stream failed before its first chunk: send them now
            started.update({k: asyncio.ensure_future(job) for k, job in company.items()})
        names = list(started)
        outcomes = await asyncio.gather(*(started[k] for k in names))
        return seen, dict(zip(names, outcomes, strict=True))

    async def _read_stream(
        self, request: CompletionRequest, seen: BoundedStream, read: Any
    ) -> None:
        """Feed each piece of ``request``'s stream to ``read`` until it returns True or the
        stream ends; errors and timeouts land in ``seen.error``."""
        self.requests += 1
        stream = self.aclient.stream_as_is(request)

        async def pieces() -> None:
            async for piece in stream:
                seen.chunks += 1
                if await read(piece):
                    break

        try:
            await asyncio.wait_for(pieces(), _PROBE_TIMEOUT)
        except APIError as exc:
            if exc.status in (401, 403, 404, 429):
                raise
            if exc.type != "stream_unfinished":  # cut short ([DONE] first): proves nothing
                seen.error = exc
        except asyncio.TimeoutError:
            seen.error = APIError(f"no answer within {_PROBE_TIMEOUT:g} s", type="timeout")
        finally:
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def models_card(self) -> Mapping[str, Any] | None:
        """The model's card from the one GET /models the check sends (shared with the client's
        own read of the card); it also names the model when the client names none."""
        if known_limits(self.aclient, self.model) is None:
            self.requests += 1
        card = await read_card(self.aclient, self.model)
        if self.model is None and card is not None and isinstance(card.get("id"), str):
            self.model = card["id"]
        return card


#: Generated tokens the echo probe compares; max_tokens and best_of of the best_of probe.
_ECHO_TOKENS = 3
_BEST_OF_MAX_TOKENS = 2
_BEST_OF = 3
#: The stream_finish probe's length: long enough that the requests sent beside it arrive while
#: it still generates. llama-cpp-python on 2 busy cores cut it after 5-70 chunks: at 48 tokens
#: 5 streams of 6 were cut, at 80 all 6; as long as the penalty probe, so it costs nothing more
#: on servers that batch.
FINISH_TOKENS = WINDOW_TOKENS
#: Its length when the long probes are sent with it (servers that batch): they are in flight from
#: its first token to its last.
FINISH_TOKENS_AT_ONCE = 16


async def aconformance(client: HasAsyncClient, *, refresh: bool = False) -> ConformanceReport:
    """Measure what ``client``'s endpoint and model do (at most 25 small requests); cached."""
    aclient = as_async(client)
    if not refresh:
        known = cached_report(aclient)
        if known is not None:
            return known
    started = time.perf_counter()
    probe = _Prober(aclient)
    # First and alone: the one GET /models, which names the model for every probe after it.
    card = await probe.models_card()
    if card_profile(card) in _STREAMS_BESIDE_OTHERS:
        results = await _measure_together(probe, card)
    else:
        results = await _measure_in_turn(probe, card)
    if detect_profile(card, {}) == "llama-server":  # its penalties may count the prompt too
        results["repeat_prompt_tokens"] = await probe.tokenize(REPEAT_PROMPT)
    checks = _judge(results, probe.model)
    info, _, vocab = model_info(card, aclient, results["bytes"])
    checks["model_info"] = info
    endpoint = getattr(aclient, "endpoint", None)
    report = ConformanceReport(
        [checks[name] for name in CHECKS],
        # Kept with results and written to files: credentials in the URL must not travel with it.
        endpoint=redact_url(endpoint) if isinstance(endpoint, str) else None,
        model=probe.model or _key(aclient)[1],  # from GET /models when the client named none
        requests=probe.requests,
        seconds=time.perf_counter() - started,
        profile_name=detect_profile(card, checks),
        context_length=positive_int(checks["context_length"].evidence.get("context_length")),
        vocab_size=vocab,
    )
    remember(aclient, report)
    return report


#: Servers (as their model card names them) that keep streaming while other requests arrive: they
#: batch whatever is in flight. Their probes all go out at once, the streams among them; vLLM CPU's
#: first check after start-up took 7.5 s one round after another (issue 16's target: under 3 s).
_STREAMS_BESIDE_OTHERS = frozenset({"vllm", "nbcompletions", "openai"})


async def _measure_in_turn(probe: _Prober, card: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every probe's outcome, the streams one at a time with nothing else in flight: llama.cpp
    ends a stream early ("[DONE]" without a finish_reason) when another request arrives."""
    jobs = _first_round(probe, card)
    # The two long probes go beside the stream_finish probe's stream, later.
    long = {name: jobs.pop(name) for name in ("penalised", "order")}
    streams = _stream_probes(probe, card)
    try:
        first = dict(zip(jobs, await asyncio.gather(*jobs.values()), strict=True))
        results: dict[str, Any] = {**first, "card": card, "eot_id": end_of_text_id(probe.model)}
        for name, job in streams.items():
            results[name] = await job
        # The stream_finish probe's stream, with the two long probes sent beside it: they arrive
        # while it streams (llama-cpp-python then cuts it), and hide its length on servers that
        # batch. With the whole first round beside it instead, it was never cut (3 of 3 tries).
        results["finish"], done = await probe.stream_with_company(long)
    finally:
        _close_unsent([*long.values(), *streams.values()])
    results.update(done)
    results.update(await _second_round(probe, results["gen"], card))
    return results


async def _measure_together(probe: _Prober, card: Mapping[str, Any] | None) -> dict[str, Any]:
    """Every probe's outcome on a server that batches: all sent at once, the second round as soon
    as the generation it is built from is in. The two long probes are the stream_finish probe's
    company: sent with its stream, they are in flight while it streams."""
    jobs: dict[str, Awaitable[Any]] = {**_first_round(probe, card), **_stream_probes(probe, card)}
    long = {name: jobs.pop(name) for name in ("penalised", "order")}
    generation = jobs.pop("gen")

    async def generation_then_second() -> dict[str, Any]:
        gen = await generation
        return {"gen": gen, **(await _second_round(probe, gen, card))}

    async def finish() -> dict[str, Any]:
        seen, done = await probe.stream_with_company(long, at_once=True)
        return {"finish": seen, **done}

    try:
        found = await asyncio.gather(generation_then_second(), finish(), *jobs.values())
    finally:
        _close_unsent([generation, *long.values(), *jobs.values()])
    chained, finished, *rest = found
    return {
        **dict(zip(jobs, rest, strict=True)),
        **chained,
        **finished,
        "card": card,
        "eot_id": end_of_text_id(probe.model),
    }


def _stream_probes(
    probe: _Prober, card: Mapping[str, Any] | None
) -> dict[str, Awaitable[ProbeOutcome | BoundedStream]]:
    """The stream probes but stream_finish's: is max_tokens=0 honoured, echo in a stream, usage in
    a stream, and (when the card does not say) is max_tokens past any context refused."""
    streams: dict[str, Awaitable[ProbeOutcome | BoundedStream]] = {
        "max0": probe.bounded_stream(0),
        "stream_echo": probe.send(PROMPT, echo=True, stream=True, max_tokens=1, temperature=0.0),
        "usage": probe.send(
            PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            max_tokens=1,
            temperature=0.0,
        ),
    }
    if card_limits(card)[0] is None:  # the card does not say: ask past any context
        streams["context"] = probe.bounded_stream(CONTEXT_PROBE_MAX_TOKENS)
    return streams


def _close_unsent(jobs: Iterable[Awaitable[Any]]) -> None:
    """Close the probes built but never sent (an error came first), so none is left unawaited."""
    for job in jobs:
        if inspect.iscoroutine(job) and inspect.getcoroutinestate(job) == inspect.CORO_CREATED:
            job.close()


def _sampling_extra(card: Mapping[str, Any] | None) -> dict[str, Any]:
    """The neutral fields of the server the card names (llama.cpp's repeat_penalty 1.1 and
    min_p 0.05 otherwise confound the penalty and sampler-order probes); none for others."""
    named = PROFILES.get(detect_profile(card, {}))
    return dict(named.neutral_fields) if named is not None else {}


def _listed_logprobs(card: Mapping[str, Any] | None) -> int:
    """``logprobs`` that lists each chosen token: 0 does everywhere but on ggml's llama-server,
    which reads 0 as "no logprobs" (null), so the stop and byte probes there ask for 1."""
    return 1 if detect_profile(card, {}) == "llama-server" else 0


def _first_round(
    probe: _Prober, card: Mapping[str, Any] | None
) -> dict[str, Awaitable[ProbeOutcome]]:
    """The probes that need nothing from another's answer, to be sent together."""
    k = _ECHO_TOKENS
    neutral = _sampling_extra(card)
    listed = _listed_logprobs(card)
    jobs: dict[str, Awaitable[ProbeOutcome]] = {
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
        "plain": probe.send(REPEAT_PROMPT, max_tokens=8, temperature=0.0, extra=neutral),
        # Long, with logprobs: it feeds the penalties check and the penalty_window check.
        "penalised": probe.send(
            REPEAT_PROMPT,
            max_tokens=WINDOW_TOKENS,
            temperature=0.0,
            logprobs=ASKED_LOGPROBS,
            frequency_penalty=PENALTY,
            presence_penalty=PENALTY,
            extra=neutral,
        ),
        "order": probe.send(
            ORDER_PROMPT,
            max_tokens=ORDER_TOKENS,
            temperature=ORDER_TEMPERATURE,
            top_p=ORDER_TOP_P,
            seed=SEED,
            logprobs=ASKED_LOGPROBS,
            extra=neutral,
        ),
        "bytes": probe.send(
            BYTES_PROMPT, echo=True, logprobs=listed, max_tokens=1, temperature=0.0
        ),
        "suffix": probe.send(
            SUFFIX_PROMPT, suffix=SUFFIX, echo=True, logprobs=listed, max_tokens=1, temperature=0.0
        ),
    }
    eot = end_of_text_id(probe.model)
    if eot is not None:  # forced at once: is a generated end-of-text listed and counted?
        jobs["eot"] = probe.send(
            PROMPT, max_tokens=2, temperature=0.0, logprobs=1, logit_bias={str(eot): 100}
        )
    return jobs


async def _second_round(
    probe: _Prober, gen: ProbeOutcome, card: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The probes built from the generation's tokens: the echo of the prompt plus them, and a
    stop string one of them starts."""
    k = _ECHO_TOKENS
    gen_rows = logprob_rows(probe_choice(gen[0])) if gen[1] is None else None
    second: dict[str, Awaitable[ProbeOutcome]] = {}
    found: dict[str, Any] = {"echo": None, "echo_prompt": None, "stop": None, "stop_outcome": None}
    usable = gen_rows is not None and len(gen_rows.tokens) >= k
    if gen_rows is not None and usable:
        usable = not any(t.startswith("bytes:") for t in gen_rows.tokens[:k])
    if gen_rows is not None and usable:
        found["echo_prompt"] = PROMPT + "".join(gen_rows.tokens[:k])
        second["echo"] = probe.send(
            found["echo_prompt"], echo=True, logprobs=ASKED_LOGPROBS, max_tokens=1, temperature=0.0
        )
        found["stop"] = _stop_string(gen_rows.tokens[:k])
        if found["stop"] is not None:
            second["stop_outcome"] = probe.send(
                PROMPT,
                max_tokens=k + 2,
                temperature=0.0,
                logprobs=_listed_logprobs(card),
                stop=found["stop"],
            )
    done = dict(zip(second, await asyncio.gather(*second.values()), strict=True))
    return {**found, **done}


def _stop_string(tokens: list[str]) -> str | None:
    """A generated token (not the first) whose text first appears there: a stop it hits."""
    before = tokens[0]
    for candidate in tokens[1:]:
        if candidate.strip() and candidate not in before + candidate[:-1]:
            return candidate
        before += candidate
    return None


def _judge(results: dict[str, Any], model: str | None) -> dict[str, Check]:
    """Every check but model_info, from the probes' outcomes."""
    gen: ProbeOutcome = results["gen"]
    checks: dict[str, Check] = {}
    checks["echo_alignment"] = echo_alignment(gen, results["echo"], _ECHO_TOKENS)
    checks["max_tokens_0"] = max_tokens_zero_check(results["max0"])
    checks["n"] = n_check(results["n"])
    checks["best_of"] = best_of_check(results["best_of"], _BEST_OF_MAX_TOKENS, _BEST_OF)
    checks["stream_echo"] = stream_echo_check(results["stream_echo"])
    checks["include_usage"] = usage_check(results["usage"])
    for check in gen_checks(gen):
        checks[check.name] = check
    checks["stop_in_logprobs"] = stop_check(results["stop"], results["stop_outcome"])
    checks["multiple_prompts"] = multiple_check(results["multi"])
    checks["token_id_prompts"] = token_ids_check(results["ids"])
    checks["seed"] = seed_check(results["seed_a"], results["seed_b"], results["seed_c"])
    checks["default_sampling"] = defaults_check(
        checks["seed"], results["seed_a"], results["omitted"]
    )
    checks["penalties"] = penalty_check(results["plain"], results["penalised"])
    checks["byte_tokens"] = bytes_check(results["bytes"])
    checks["suffix"] = suffix_check(results["suffix"])
    checks["penalty_window"] = penalty_window_check(
        results["penalised"], results.get("repeat_prompt_tokens")
    )
    checks["sampler_order"] = sampler_order_check(results["order"])
    checks["end_of_text"] = end_of_text_check(results.get("eot"), results["eot_id"])
    checks["echo_generated"] = echo_generated_check(results["echo"], results["echo_prompt"] or "")
    checks["context_length"] = context_length_check(
        card_limits(results["card"])[0], results.get("context"), trained_positions(model)
    )
    checks["stream_finish"] = stream_finish_check(results["finish"])
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
    endpoint, model = _key(aclient)
    with contextlib.suppress(TypeError):  # not weak-referenceable: measured again next time
        known = _reports.setdefault(aclient, {})
        known[(endpoint, model)] = report
        # A client that names no model finds the report again once its requests name one.
        if model is None and report.model is not None:
            known[(endpoint, report.model)] = report


def known_vocab_size(client: HasAsyncClient) -> int | None:
    """The vocabulary size the check found, else the model card's (`nbcompletions._model_card`,
    read before the first request that needs it), else the client's profile's; None (no I/O)."""
    report = cached_report(client)
    if report is not None and report.vocab_size is not None:
        return report.vocab_size
    card = known_limits(client)
    if card is not None and card.vocab_size is not None:
        return card.vocab_size
    profile = getattr(getattr(client, "async_client", client), "profile", None)
    return profile.vocab_size if isinstance(profile, ServerProfile) else None
