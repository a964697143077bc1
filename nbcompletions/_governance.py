"""One place decides what an endpoint's measured behaviour means for each request.

Every request path (`Client.complete` and ``stream``, ``score``, sweeps live and by Batch, the
widgets, which call the client) asks `decide` before sending and `govern_answer` after. Given the
endpoint's `ConformanceReport` (or None) and one request, `decide` returns a `Decision`:

- **send** it as it is;
- **correct** it: the detected profile's neutral sampling fields added (llama.cpp's repeat penalty
  still applies at temperature 0), ``max_tokens=0`` sent as 1 and the generated token dropped
  from the answer, a shifted echo realigned, a kept stop token dropped;
- **refuse** it before sending, with `ConformanceError` naming the check and its evidence (a
  check that errored is not a pass: a request that depends on it is refused with the error);
- **flag** it: sent, and the result carries the check's name (``completion.flags``, the frames'
  ``.attrs["conformance_flags"]``) and a `ConformanceWarning` is shown once per endpoint and check.

Measured once, lazily: the report is measured (`Client.conformance`) the first time a request
depends on it (`depends_on_report`: echo, a stop with logprobs, ``n > 1``, ``best_of``, greedy,
``max_tokens=0``, penalties, ``top_p`` with a temperature), then kept in memory per client and on
disk per endpoint (credentials redacted) and model under `report_directory`, and reused by later
sessions (not for in-process clients: another app may answer at the same URL).
``client.conformance(refresh=True)`` measures again and replaces both.

Trusted without measuring (sent as they are, no probes):
- ``Client(verify=False)``: the user knows the server.
- The embedded model (in-process, our own engine: the ``nbcompletions`` profile is known).
- A client with an injected transport (an in-process app or a test double) unless
  ``verify=True``: there is no server of unknown make behind it.
- ``api.openai.com``: OpenAI's API is the reference the checks compare with, and probing it costs
  money; ``client.conformance()`` still measures it when asked, and a report measured that way
  governs its requests from then on.
``verify=True`` measures whatever the endpoint is.

A request must never be able to kill a server: where the report knows the context length, a
request whose prompt tokens + ``max_tokens`` exceed it is refused before sending. Prompt tokens are
bounded by the prompt's UTF-8 bytes (a byte-level BPE token is at least one byte); past that bound
they are counted with the server's tokenizer route (`TOKENIZE_ROUTES`) and, where there is none,
the request is flagged ``context_length``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ._conformance_report import ConformanceReport
from ._corrections import (
    UncorrectableError,
    drop_stop_token,
    head_request_fields,
    unshift_echo,
    unshift_logprobs,
)
from ._errors import APIError, ConformanceError, ConformanceWarning, RequestError
from ._request import CompletionRequest, Limits
from ._secrets import redact_url

if TYPE_CHECKING:  # pragma: no cover
    from ._completion import Completion
    from ._types import AsyncCompletionsClient

__all__ = [
    "PATHS",
    "TOKENIZE_ROUTES",
    "Decision",
    "acorrect_raw",
    "agovern",
    "agovern_answer",
    "agovern_stream",
    "ameasure",
    "decide",
    "depends_on_report",
    "report_directory",
    "report_for",
    "store_report",
    "unlisted_tokens",
]

PATHS: tuple[str, ...] = ("complete", "stream", "score", "sweep-live", "sweep-batch", "widget")
Action = Literal["send", "correct", "refuse", "flag"]

#: Where each profile's server counts tokens (at its root, beside /v1): (path, the body's text
#: field, the answer's field).
TOKENIZE_ROUTES: Mapping[str, tuple[str, str, str]] = {
    "llamacpp": ("/extras/tokenize", "input", "tokens"),
    "llama-server": ("/tokenize", "content", "tokens"),
    "vllm": ("/tokenize", "prompt", "tokens"),
}


@dataclasses.dataclass(frozen=True)
class Decision:
    """What to do with one request. ``request`` is what to send (corrected where ``action`` is
    "correct"); ``fixes`` the corrections `govern_answer` applies to the answer; ``flags`` the
    checks the result depends on that could be neither corrected nor refused, with ``reasons``
    (check -> evidence in words); ``error`` the refusal."""

    request: CompletionRequest
    action: Action = "send"
    fixes: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    reasons: Mapping[str, str] = dataclasses.field(default_factory=dict)
    error: ConformanceError | None = None
    endpoint: str | None = None
    #: Flags that apply only where the answer ended by itself (an end-of-text token).
    if_natural_end: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: Flags that apply only where the answer's logprobs hold an empty token.
    if_empty_token: Mapping[str, str] = dataclasses.field(default_factory=dict)
    #: The ``logprobs`` asked for, where more are sent (a shifted echo is realigned from the whole
    #: distribution, then cut back to this many alternatives).
    asked_logprobs: int | None = None

    def raise_if_refused(self) -> None:
        if self.error is not None:
            raise self.error


# -- which requests depend on the report ----------------------------------------------------------


def _greedy(request: CompletionRequest) -> bool:
    return request.temperature == 0


def _wants_logprobs(request: CompletionRequest) -> bool:
    return request.logprobs is not None


#: A request asking for this many tokens or more is measured first: it could pass the context
#: (256 tokens on the servers in our CI), which crashes some servers.
LONG_MAX_TOKENS = 128


def depends_on_report(request: CompletionRequest) -> bool:
    """Whether ``request``'s answer means something different on a server that deviates, or
    could harm it: the requests that trigger measuring."""
    return bool(
        request.echo
        or (request.max_tokens or 0) >= LONG_MAX_TOKENS
        or (request.stop and _wants_logprobs(request))
        or (request.n or 1) > 1
        or (request.best_of or 1) > 1
        or _greedy(request)
        or request.max_tokens == 0
        or request.frequency_penalty
        or request.presence_penalty
        or (request.top_p is not None and request.temperature not in (None, 0))
    )


# -- the decision ---------------------------------------------------------------------------------


class _Deciding:
    """The decision being built: corrections to the request, answer fixes, flags."""

    def __init__(self, report: ConformanceReport, request: CompletionRequest, path: str) -> None:
        self.report = report
        self.request = request
        self.path = path
        self.changes: dict[str, Any] = {}
        self.fixes: list[str] = []
        self.flags: dict[str, str] = {}
        self.if_natural_end: dict[str, str] = {}
        self.if_empty_token: dict[str, str] = {}

    def status(self, name: str) -> str | None:
        return self.report.status(name)

    def detail(self, name: str) -> str:
        check = self.report.checks.get(name)
        return check.detail if check is not None else ""

    def refuse(self, name: str, what: str) -> ConformanceError:
        check = self.report.checks.get(name)
        evidence = dict(check.evidence) if check is not None else {}
        status = check.status if check is not None else "not measured"
        return ConformanceError(
            f"{self.path}() refuses this request: {what}; check {name} {status} on "
            f"{self.report.endpoint} ({self.detail(name)}; evidence {evidence}). Nothing was "
            "sent; Client(verify=False) sends it anyway",
            check=name,
            detail=self.detail(name),
        )

    def flag(self, name: str, what: str) -> None:
        self.flags[name] = f"{what} ({self.detail(name)})"


def _echo_rules(d: _Deciding) -> ConformanceError | None:
    request = d.request
    if not request.echo:
        return None
    if request.stream and d.status("stream_echo") not in (None, "ok"):
        return d.refuse("stream_echo", "a streamed echo loses the prompt there")
    if not _wants_logprobs(request):
        return None
    status = d.status("echo_alignment")
    kind = d.report.evidence("echo_alignment").get("kind")
    # "dropped" (no prompt logprobs at all) is left to the caller: nothing wrong can be read.
    if status == "error" or (status == "fails" and kind not in ("shifted", "dropped")):
        return d.refuse(
            "echo_alignment",
            "the echoed prompt's log-probabilities would not be the prompt tokens' own",
        )
    if status == "fails" and kind == "shifted":
        # Realigned from the whole distribution (see nbcompletions._corrections.unshift_echo).
        wanted = unshift_logprobs(d.report.vocab_size, request.logprobs)
        if wanted is not None and wanted != request.logprobs:
            d.changes["logprobs"] = wanted
            d.changes["limits"] = Limits(max_logprobs=None)
        d.fixes.append("unshift_echo")  # it restores the missing last generated token too
    elif (request.max_tokens or 0) != 0 and d.status("echo_generated") == "fails":
        d.flag("echo_generated", "the last generated token is missing from echo + generation")
    return None


def _max_tokens_rules(d: _Deciding) -> ConformanceError | None:
    if d.request.max_tokens != 0 or d.status("max_tokens_0") in (None, "ok"):
        return None
    if not d.request.echo:
        return d.refuse(
            "max_tokens_0",
            "max_tokens=0 without echo asks for nothing, and this server reads it as 'until "
            "the context is full'",
        )
    # The max_tokens_1 approach (lm-evaluation-harness): one generated token, dropped.
    d.changes["max_tokens"] = 1
    d.fixes.append("drop_generated")
    return None


def _count_rules(d: _Deciding) -> ConformanceError | None:
    request = d.request
    needs = {
        "n": (request.n or 1) > 1,
        "best_of": (request.best_of or 1) > 1,
        "include_usage": bool(
            request.stream_options and request.stream_options.get("include_usage")
        ),
        "seed": request.seed is not None and not _greedy(request),
        "suffix": request.suffix is not None,
    }
    for name, needed in needs.items():
        if needed and d.status(name) in ("fails", "error"):
            return d.refuse(name, f"it asks for {name}, which this endpoint does not honour")
    return None


def _sampling_rules(d: _Deciding) -> ConformanceError | None:
    request, profile = d.request, d.report.profile
    missing = {k: v for k, v in profile.neutral_fields.items() if k not in request.extra}
    explicit = profile.explicit_sampling and (request.temperature is None or request.top_p is None)
    # Scoring reads the prompt's logprobs only (any generated token is dropped): sampling is moot.
    if (missing or explicit) and d.path != "score":
        try:
            neutral = profile.neutralize(request)
        except RequestError as exc:
            return ConformanceError(str(exc), check="profile", detail=profile.name)
        for field in ("temperature", "top_p", "extra"):
            if getattr(neutral, field) != getattr(request, field):
                d.changes[field] = getattr(neutral, field)
    if request.stop and _wants_logprobs(request) and d.status("stop_in_logprobs") == "fails":
        d.fixes.append("drop_stop_token")
    penalised = bool(request.frequency_penalty or request.presence_penalty)
    if penalised and d.status("penalties") in ("fails", "error"):
        return d.refuse("penalties", "it asks for penalties, which this endpoint ignores")
    if penalised and d.status("penalty_window") == "error":
        # ggml's llama-server: no window of the generated tokens explains its choices.
        return d.refuse("penalty_window", "no rule of ours explains its penalties")
    if penalised and d.status("penalty_window") == "fails":
        prompt = d.report.evidence("penalty_window").get("counts_prompt")
        d.flag(
            "penalty_window",
            "penalties count the prompt's tokens too"
            if prompt
            else "penalties count only the last tokens",
        )
    top_p_matters = request.top_p not in (None, 1) and request.temperature not in (None, 0, 1)
    if top_p_matters and d.status("sampler_order") == "fails":
        d.flag("sampler_order", "top_p is applied before the temperature")
    end = d.report.evidence("end_of_text")
    lost = (_wants_logprobs(request) and not end.get("in_logprobs", False)) or not end.get(
        "in_usage", True
    )
    if d.status("end_of_text") == "fails" and lost:
        d.if_natural_end["end_of_text"] = (
            "a generated end-of-text is missing from the logprobs or usage "
            f"({d.detail('end_of_text')})"
        )
    byte_tokens = d.report.evidence("byte_tokens")
    # '' for byte-level pieces, with no bytes field to tell them apart: alternatives collide.
    empty = bool(byte_tokens.get("empty_tokens")) and not byte_tokens.get("bytes_field")
    if _wants_logprobs(request) and (d.status("byte_tokens") == "fails" or empty):
        d.if_empty_token["byte_tokens"] = (
            f"byte-level tokens came back as '' ({d.detail('byte_tokens')})"
        )
    return None


def context_length(report: ConformanceReport | None) -> int | None:
    """The context length the report found (its card, or the context_length check)."""
    if report is None:
        return None
    measured = report.evidence("context_length").get("context_length")
    if isinstance(measured, int) and not isinstance(measured, bool) and measured > 0:
        return measured
    return report.context_length


def prompt_byte_bound(request: CompletionRequest) -> int | None:
    """At most how many tokens the prompt holds (its UTF-8 bytes, or its token ids); for several
    prompts, the largest."""
    prompt = request.prompt
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8"))
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return len(prompt)
    if isinstance(prompt, list) and prompt:  # several prompts: each is bounded alone
        bounds = [prompt_byte_bound(request.replace(prompt=one)) for one in prompt]
        known = [b for b in bounds if b is not None]
        return max(known) if len(known) == len(bounds) else None
    return None


def request_has_text(request: CompletionRequest) -> bool:
    """Whether the prompt holds at least one token."""
    return bool(request.prompt) and request.prompt != [""]


def _context_rules(d: _Deciding, prompt_tokens: int | None) -> ConformanceError | None:
    if d.report.profile_name == "nbcompletions":
        return None  # our server refuses past its context itself (HTTP 400, param max_tokens)
    context = context_length(d.report)
    wanted = d.changes.get("max_tokens", d.request.max_tokens)
    if context is None or wanted is None:
        return None
    bound = prompt_tokens if prompt_tokens is not None else prompt_byte_bound(d.request)
    if bound is not None and bound + wanted <= context:
        return None
    fewest = 1 if request_has_text(d.request) else 0
    if prompt_tokens is None and wanted + fewest > context:
        prompt_tokens = fewest  # past the context whatever the prompt's length
    elif prompt_tokens is None:
        d.flags["context_length"] = (
            f"prompt tokens + max_tokens={wanted} may exceed the context ({context}), and the "
            "server offers no tokenizer route to count them"
        )
        return None
    return ConformanceError(
        f"{d.path}() refuses this request: its prompt has at least {prompt_tokens} token(s) and "
        f"max_tokens={wanted}, {prompt_tokens + wanted} in all, past the model's context of "
        f"{context} tokens on {d.report.endpoint} (some servers crash on it); lower max_tokens to "
        f"at most {max(context - prompt_tokens, 0)} or shorten the prompt. Nothing was sent",
        check="context_length",
        detail=f"context_length={context}, prompt_tokens={prompt_tokens}, max_tokens={wanted}",
    )


def decide(
    report: ConformanceReport | None,
    request: CompletionRequest,
    *,
    path: str = "complete",
    prompt_tokens: int | None = None,
) -> Decision:
    """What to do with ``request`` on the endpoint ``report`` describes (None: send as is).

    ``prompt_tokens``: the prompt's token count where it was counted (the context bound)."""
    if path not in PATHS:
        raise RequestError(
            "path", f"path must be one of {PATHS}; got {path!r}", allowed=str(PATHS), value=path
        )
    if report is None:
        return Decision(request)
    d = _Deciding(report, request, path)
    rules: tuple[Callable[[_Deciding], ConformanceError | None], ...] = (
        _echo_rules,
        _max_tokens_rules,
        _count_rules,
        _sampling_rules,
    )
    for rule in rules:
        error = rule(d)
        if error is not None:
            return Decision(request, "refuse", error=error, endpoint=report.endpoint)
    error = _context_rules(d, prompt_tokens)
    if error is not None:
        return Decision(request, "refuse", error=error, endpoint=report.endpoint)
    sent = request.replace(**d.changes) if d.changes else request
    action: Action = "correct" if d.changes or d.fixes else ("flag" if d.flags else "send")
    return Decision(
        sent,
        action,
        fixes=tuple(d.fixes),
        flags=tuple(d.flags),
        reasons=dict(d.flags),
        endpoint=report.endpoint,
        if_natural_end=dict(d.if_natural_end),
        if_empty_token=dict(d.if_empty_token),
        asked_logprobs=request.logprobs,
    )


# -- the answer -----------------------------------------------------------------------------------

_warned: set[tuple[str | None, str]] = set()


def warn_once(endpoint: str | None, check: str, reason: str) -> None:
    """A `ConformanceWarning` for this endpoint and check, the first time only."""
    if (endpoint, check) in _warned:
        return
    _warned.add((endpoint, check))
    warnings.warn(
        f"{endpoint}: check {check}: {reason}; results that depend on it are flagged "
        f"(completion.flags, frames' attrs['conformance_flags'])",
        ConformanceWarning,
        stacklevel=4,
    )


def _drop_generated(raw: dict[str, Any], request: CompletionRequest) -> dict[str, Any]:
    """The answer to a max_tokens=0 echo request sent as max_tokens=1: the generated token gone."""
    prompt = request.prompt if isinstance(request.prompt, str) else None
    n_prompt = (raw.get("usage") or {}).get("prompt_tokens")
    choices = []
    for choice in raw.get("choices") or []:
        choice = dict(choice)
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, Mapping) and isinstance(n_prompt, int):
            choice["logprobs"] = {
                k: (v[:n_prompt] if isinstance(v, list) else v) for k, v in logprobs.items()
            }
        if prompt is not None:
            choice["text"] = prompt
        choice["finish_reason"] = "length"
        choices.append(choice)
    usage = dict(raw.get("usage") or {})
    if usage:
        usage["completion_tokens"] = 0
        usage["total_tokens"] = usage.get("prompt_tokens", 0)
    return {**raw, "choices": choices, **({"usage": usage} if usage else {})}


#: The check each answer correction stands for (flagged where the correction cannot be made).
FIX_CHECKS: Mapping[str, str] = {
    "unshift_echo": "echo_alignment",
    "drop_stop_token": "stop_in_logprobs",
    "drop_generated": "max_tokens_0",
}


def _per_choice(
    raw: Mapping[str, Any], fix: Callable[[Mapping[str, Any]], dict[str, Any]]
) -> dict[str, Any]:
    return {**raw, "choices": [fix(c) for c in raw.get("choices") or []]}


def _top_k(entry: Any, k: int | None) -> Any:
    """A position's alternatives cut back to the ``k`` most likely (what was asked for)."""
    if not isinstance(entry, Mapping) or k is None or len(entry) <= k:
        return entry
    ranked = sorted(entry.items(), key=lambda item: -(item[1] if item[1] is not None else -1e30))
    return dict(ranked[:k])


async def _unshift(
    aclient: AsyncCompletionsClient, decision: Decision, raw: Mapping[str, Any]
) -> dict[str, Any]:
    """Each choice's shifted echo realigned; position 1's distribution asked for separately."""
    request = decision.request
    choices = []
    for choice in raw.get("choices") or []:
        head = None
        with contextlib.suppress(UncorrectableError, APIError):
            fields = head_request_fields(choice, request.logprobs or 1)
            answer = await aclient.complete_as_is(
                CompletionRequest(model=request.model, limits=Limits(max_logprobs=None), **fields)
            )
            answered = answer.raw.get("choices") or [{}]
            tops = (answered[0].get("logprobs") or {}).get("top_logprobs") or [None]
            head = tops[0]
        fixed = unshift_echo(choice, head=head, requested=request.logprobs)
        logprobs = dict(fixed["logprobs"])
        logprobs["top_logprobs"] = [
            _top_k(entry, decision.asked_logprobs) for entry in logprobs["top_logprobs"]
        ]
        choices.append({**fixed, "logprobs": logprobs})
    return {**raw, "choices": choices}


async def acorrect_raw(
    aclient: AsyncCompletionsClient, decision: Decision, raw: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The response body ``raw`` with the decision's corrections applied, and the flags (check ->
    why) for those that could not be made with certainty."""
    fixed = dict(raw)
    flags: dict[str, str] = {}
    stop = decision.request.stop
    for name in decision.fixes:
        try:
            if name == "unshift_echo":
                fixed = await _unshift(aclient, decision, fixed)
            elif name == "drop_stop_token":
                fixed = _per_choice(fixed, lambda choice: drop_stop_token(choice, stop))
            elif name == "drop_generated":
                fixed = _drop_generated(fixed, decision.request)
        except UncorrectableError as exc:
            flags[FIX_CHECKS[name]] = f"{name} could not be applied: {exc}"
    return fixed, flags


def _has_empty_token(raw: Mapping[str, Any]) -> bool:
    for choice in raw.get("choices") or []:
        logprobs = choice.get("logprobs") if isinstance(choice, Mapping) else None
        tokens = logprobs.get("tokens") if isinstance(logprobs, Mapping) else None
        if isinstance(tokens, list) and "" in tokens:
            return True
    return False


def unlisted_tokens(raw: Mapping[str, Any], request: CompletionRequest) -> int:
    """How many generated tokens the one choice's logprobs leave out: ``usage.completion_tokens``
    less the listed entries. ggml's llama-server lists
    a character split over byte-level tokens as one entry and a trailing partial one not at all;
    0 where it cannot tell (echo, several choices or prompts, no usage, no logprobs asked, or a
    stop string ended it: its one or more tokens are counted and not listed)."""
    choices = raw.get("choices") or []
    usage = raw.get("usage")
    generated = usage.get("completion_tokens") if isinstance(usage, Mapping) else None
    if request.echo or not _wants_logprobs(request) or len(choices) != 1:
        return 0
    if not isinstance(generated, int) or not isinstance(choices[0], Mapping):
        return 0
    logprobs = choices[0].get("logprobs")
    if not isinstance(logprobs, Mapping):
        return 0  # none came back at all: not a question of which tokens are listed
    listed = logprobs.get("content", logprobs.get("tokens")) or []
    if request.stop and choices[0].get("finish_reason") == "stop":
        return 0  # the stop string's tokens (one or more) are counted and not listed: no telling
    return max(0, generated - len(listed))


async def agovern_answer(
    aclient: AsyncCompletionsClient, decision: Decision, completion: Completion
) -> Completion:
    """``completion`` with the decision's corrections applied and its flags attached (each flag
    warned once per endpoint and check)."""
    reasons = dict(decision.reasons)
    natural_end = completion.finish_reason == "stop" and not decision.request.stop
    reasons.update(decision.if_natural_end if natural_end else {})
    reasons.update(decision.if_empty_token if _has_empty_token(completion.raw) else {})
    unlisted = unlisted_tokens(completion.raw, decision.request)
    if unlisted:
        reasons["byte_tokens"] = (
            f"the logprobs leave out {unlisted} of the generated tokens (byte-level tokens "
            "merged into one entry per character, or a partial character dropped)"
        )
    if decision.fixes:
        fixed, uncorrected = await acorrect_raw(aclient, decision, completion.raw)
        completion = completion.corrected(fixed)
        reasons.update(uncorrected)
    for name, reason in reasons.items():
        warn_once(decision.endpoint, name, reason)
    if reasons:
        completion.flags = tuple(dict.fromkeys((*completion.flags, *reasons)))
    return completion


# -- where the report comes from ------------------------------------------------------------------


def report_directory() -> Path:
    """Where measured reports are kept: ``$NBCOMPLETIONS_CACHE_DIR/conformance``, else the
    platform's user cache directory (``$XDG_CACHE_HOME`` or ``~/.cache``; ``%LOCALAPPDATA%`` on
    Windows) under ``nbcompletions/conformance``."""
    chosen = os.environ.get("NBCOMPLETIONS_CACHE_DIR")
    if chosen:
        return Path(chosen) / "conformance"
    if os.name == "nt" and os.environ.get("LOCALAPPDATA"):
        base = Path(os.environ["LOCALAPPDATA"])
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "nbcompletions" / "conformance"


def _report_file(endpoint: str | None, model: str | None) -> Path:
    key = json.dumps([redact_url(endpoint) if endpoint else None, model])
    name = hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]
    return report_directory() / f"{name}.json"


def store_report(report: ConformanceReport) -> None:
    """Keep ``report`` on disk for later sessions (a failure to write is not an error)."""
    path = _report_file(report.endpoint, report.model)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(report.to_dict(), allow_nan=False), encoding="utf-8")
        os.replace(tmp, path)
    except (OSError, ValueError):
        return


def load_report(endpoint: str | None, model: str | None) -> ConformanceReport | None:
    """The report kept on disk for this endpoint and model, or None."""
    try:
        data = json.loads(_report_file(endpoint, model).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    report = ConformanceReport.from_dict(data) if isinstance(data, Mapping) else None
    if report is None or report.model != model:
        return None
    return report


def trusted(aclient: AsyncCompletionsClient) -> bool:
    """Whether the endpoint goes unmeasured (``client.measures`` is False; see the module
    docstring and `nbcompletions._settings.measures_by_default`)."""
    return getattr(aclient, "measures", True) is False


_measuring: dict[tuple[int, str, str | None], asyncio.Future[ConformanceReport]] = {}


async def report_for(
    aclient: AsyncCompletionsClient, *, measure: bool = True
) -> ConformanceReport | None:
    """The endpoint's report: kept in memory, else on disk, else measured (once, however many
    requests ask at the same time) when ``measure``; None where the client does not measure
    (``client.measures``) and no report was measured on request."""
    from ._conformance import cached_report

    known = cached_report(aclient)
    if known is not None or trusted(aclient):
        return known
    return await ameasure(aclient) if measure else _from_disk(aclient)


def _from_disk(aclient: AsyncCompletionsClient) -> ConformanceReport | None:
    from ._conformance import remember

    if getattr(aclient, "in_process", False):
        return None  # another app in this process may answer at the same URL

    model = aclient.model or getattr(aclient, "discovered_model", None)
    stored = load_report(redact_url(str(aclient.endpoint)), model)
    if stored is not None:
        remember(aclient, stored)
    return stored


async def ameasure(aclient: AsyncCompletionsClient, *, refresh: bool = False) -> ConformanceReport:
    """`Client.conformance`: the report kept in memory or on disk, else measured and kept in
    both; ``refresh`` measures again. Requests asking at the same time share one measuring."""
    from ._conformance import aconformance, cached_report

    if not refresh:
        known = cached_report(aclient) or _from_disk(aclient)
        if known is not None:
            return known
    key = (id(aclient), str(aclient.endpoint), aclient.model)
    running = _measuring.get(key)
    if running is not None:
        return await asyncio.shield(running)
    future: asyncio.Future[ConformanceReport] = asyncio.get_running_loop().create_future()
    _measuring[key] = future
    try:
        report = await aconformance(aclient, refresh=refresh)
        if not getattr(aclient, "in_process", False):
            store_report(report)
        future.set_result(report)
        return report
    except BaseException as exc:
        future.set_exception(exc)
        future.exception()  # retrieved here: the waiters raise it themselves
        raise
    finally:
        del _measuring[key]


async def count_prompt_tokens(
    aclient: AsyncCompletionsClient, report: ConformanceReport, request: CompletionRequest
) -> int | None:
    """The prompt's tokens counted by the server's tokenizer route, or None where it has none."""
    route = TOKENIZE_ROUTES.get(report.profile_name)
    if route is None or not isinstance(request.prompt, str):
        return None
    path, field, answer_field = route
    # The routes sit at the server's root, beside /v1 (httpx resolves the dot segment).
    if str(aclient.endpoint).rstrip("/").endswith("/v1"):
        path = "/.." + path
    body: dict[str, Any] = {field: request.prompt}
    if report.profile_name == "vllm":
        body["model"] = request.model or aclient.model
    if report.profile_name == "llama-server":
        body["add_special"] = False
    try:
        answer = await aclient.request("POST", path, json=body)
    except APIError:
        return None
    tokens = answer.get(answer_field) if isinstance(answer, Mapping) else None
    count = answer.get("count") if isinstance(answer, Mapping) else None
    if isinstance(count, int):
        return count
    return len(tokens) if isinstance(tokens, list) else None


async def agovern(
    aclient: AsyncCompletionsClient, request: CompletionRequest, *, path: str = "complete"
) -> Decision:
    """The decision for ``request`` on ``aclient``'s endpoint, measuring the report first where
    the request depends on it and none is known."""
    measure = depends_on_report(request) or await _vocabulary_unknown(aclient, request)
    report = await report_for(aclient, measure=measure)
    if report is None:
        return Decision(request)
    prompt_tokens = None
    context = context_length(report)
    bound = prompt_byte_bound(request)
    wanted = request.max_tokens if request.max_tokens != 0 else 1
    if context is not None and wanted is not None and (bound is None or bound + wanted > context):
        prompt_tokens = await count_prompt_tokens(aclient, report, request)
    return decide(report, request, path=path, prompt_tokens=prompt_tokens)


async def _vocabulary_unknown(aclient: AsyncCompletionsClient, request: CompletionRequest) -> bool:
    """Alternatives are asked for and neither the model card (read once, here) nor a profile
    gives the vocabulary size: the report finds it, so frames' entropy bounds do not fall back
    to GPT-2's 50257 (issue 16, case 6: llama-cpp-python's and vLLM's cards give none)."""
    from ._conformance import known_vocab_size
    from ._model_card import needs_limits

    if not needs_limits(request.logprobs) or trusted(aclient):
        return False  # nothing to find, or nothing would be measured
    reader = getattr(aclient, "model_card_limits", None)
    if reader is not None:
        await reader(request.model)
    return known_vocab_size(aclient) is None


async def agovern_stream(
    aclient: AsyncCompletionsClient, request: CompletionRequest, *, path: str = "stream"
) -> CompletionRequest:
    """The request to stream, as `agovern` decides; a refusal raises, and what the pieces cannot
    be corrected for (they go to the caller as they arrive) is warned as a flag."""
    decision = await agovern(aclient, request, path=path)
    decision.raise_if_refused()
    for name in decision.fixes:
        warn_once(decision.endpoint, name, f"a stream's pieces are not corrected ({name})")
    for name in decision.flags:
        warn_once(decision.endpoint, name, decision.reasons.get(name, name))
    return decision.request
