"""What a request asks of the model, resolved before anything runs: its prompts as token ids
(`Prompt`) and every sampling choice with its default (`Plan`), checked against the model's
vocabulary and context length. A request that cannot run fails here, with a `RequestError`."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from .._checks import check_int, is_int
from .._errors import RequestError
from .._request import DEFAULT_MAX_TOKENS, SAMPLERS, CompletionRequest, check_sampler
from ._sampling import BAN, GREEDY_BELOW, bias_vector
from ._tokenizer import Vocabulary

__all__ = ["MAX_PROMPT_LOGPROBS", "Plan", "Prompt", "plan_request"]

#: vLLM's default cap (``--max-logprobs``) on prompt_logprobs.
MAX_PROMPT_LOGPROBS = 20


class Prompt:
    """One prompt: the ids the model conditions on, and what echo shows."""

    def __init__(self, ids: list[int], text: str, echo_ids: list[int]) -> None:
        self.ids = ids
        self.text = text
        self.echo_ids = echo_ids


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    """Everything a request asks for, resolved to defaults and checked against the model."""

    prompts: list[Prompt]
    n: int
    best_of: int
    max_tokens: int
    temperature: float
    top_p: float
    frequency_penalty: float
    presence_penalty: float
    bias: np.ndarray | None  # (V,) logit_bias, unspellable tokens banned; None: no bias
    stops: list[str]
    logprobs: int | None
    echo: bool
    seed: int | None
    include_usage: bool
    # vLLM's sampling fields (off: 0, 0.0, 1.0)
    top_k: int
    min_p: float
    repetition_penalty: float
    #: vLLM's prompt_logprobs: alternatives listed per prompt token; None: not asked for.
    prompt_logprobs: int | None = None

    @property
    def prompt_logp(self) -> bool:
        """Whether the prefill keeps every prompt position's logprobs (echo with logprobs, or
        prompt_logprobs)."""
        return (self.echo and self.logprobs is not None) or self.prompt_logprobs is not None


def _temperature(value: float | None) -> float:
    """The request's temperature; one too small to divide logits by (below `GREEDY_BELOW`) is 0,
    greedy, on every sampling path (5e-324 picked the vocabulary's last token over and over)."""
    temperature = 1.0 if value is None else float(value)
    return 0.0 if temperature < GREEDY_BELOW else temperature


def plan_request(
    request: CompletionRequest, vocab: Vocabulary, *, context_length: int, model_id: str
) -> Plan:
    """The `Plan` of a validated ``request`` for a model with ``vocab`` and ``context_length``."""
    if request.suffix:
        raise RequestError(
            "suffix",
            f"{model_id} cannot insert text: suffix is not "
            f"supported by this model; got {request.suffix!r}",
            allowed="unset (null)",
            value=request.suffix,
        )
    prompts = _prompts(request.prompt, vocab, context_length)
    max_tokens = DEFAULT_MAX_TOKENS if request.max_tokens is None else request.max_tokens
    for prompt in prompts:
        if len(prompt.ids) + max_tokens > context_length:
            raise RequestError(
                "max_tokens",
                f"This model's maximum context length is {context_length} "
                f"tokens, however you requested {len(prompt.ids) + max_tokens} tokens "
                f"({len(prompt.ids)} in your prompt; {max_tokens} for the completion). Please "
                "reduce your prompt; or completion length.",
                allowed=f"prompt tokens + max_tokens <= {context_length}",
                value=max_tokens,
            )
    bias = _bias(request, vocab, max_tokens)
    samplers = {name: request.extra[name] for name in SAMPLERS if name in request.extra}
    for name, value in samplers.items():
        check_sampler(name, value)
    n = request.effective_n
    stop = request.stop
    return Plan(
        prompts=prompts,
        n=n,
        best_of=n if request.best_of is None else request.best_of,
        max_tokens=max_tokens,
        temperature=_temperature(request.temperature),
        top_p=1.0 if request.top_p is None else float(request.top_p),
        frequency_penalty=float(request.frequency_penalty or 0.0),
        presence_penalty=float(request.presence_penalty or 0.0),
        bias=bias,
        stops=[stop] if isinstance(stop, str) else list(stop or []),
        logprobs=request.logprobs,
        echo=bool(request.echo),
        seed=request.seed,
        include_usage=bool((request.stream_options or {}).get("include_usage")),
        top_k=max(0, int(samplers.get("top_k", 0))),
        min_p=float(samplers.get("min_p", 0.0)),
        repetition_penalty=float(samplers.get("repetition_penalty", 1.0)),
        prompt_logprobs=_prompt_logprobs(request),
    )


def _prompt_logprobs(request: CompletionRequest) -> int | None:
    """vLLM's ``prompt_logprobs`` (from ``extra``): 0 to `MAX_PROMPT_LOGPROBS`, not streamed."""
    value = request.extra.get("prompt_logprobs")
    if value is None:
        return None
    check_int("prompt_logprobs", value, 0, MAX_PROMPT_LOGPROBS)
    if request.stream and value > 0:
        raise RequestError(
            "prompt_logprobs",
            f"prompt_logprobs are not available when stream=true; got prompt_logprobs={value}",
            allowed="0 or unset when streaming",
            value=value,
        )
    return None if request.stream else int(value)


def _bias(request: CompletionRequest, vocab: Vocabulary, max_tokens: int) -> np.ndarray | None:
    """The request's logit_bias as a (V,) vector, with the tokens the model cannot spell banned;
    refused when it leaves no token to sample."""
    size = vocab.size
    logit_bias: dict[int, float] = {}
    for key, value in (request.logit_bias or {}).items():
        token = int(key)
        if token >= size:
            raise RequestError(
                "logit_bias",
                f"logit_bias keys must be token ids from 0 to {size - 1}; got {key!r}",
                allowed=f"token ids 0..{size - 1}",
                value=dict(request.logit_bias or {}),
            )
        logit_bias[token] = float(value)
    for unspellable in vocab.unspellable.tolist():
        logit_bias[unspellable] = BAN
    bias = bias_vector(logit_bias, size)
    if max_tokens > 0 and bias is not None and not np.isfinite(bias).any():
        # Nothing left to sample: the sampler would emit a banned token (or NaN) instead.
        banned = sum(1 for v in (request.logit_bias or {}).values() if v <= BAN)
        rest = size - banned
        why = f"{banned} by the request" + (f", {rest} the model cannot spell" if rest else "")
        raise RequestError(
            "logit_bias",
            f"logit_bias bans every token of the vocabulary ({why}); at least one of the "
            f"{size} tokens must stay possible",
            allowed=f"a bias above {BAN:g} for at least one token",
            value=f"{banned} tokens at {BAN:g} or below",
        )
    return bias


def _prompts(prompt: Any, vocab: Vocabulary, context_length: int) -> list[Prompt]:
    if isinstance(prompt, str):
        raw: list[Any] = [prompt]
    elif prompt and all(is_int(item) for item in prompt):
        raw = [list(prompt)]
    else:
        raw = list(prompt)
    where = ["prompt"] if len(raw) == 1 else [f"prompt[{i}]" for i in range(len(raw))]
    for item, name in zip(raw, where, strict=True):  # every text before any is tokenized
        if isinstance(item, str):
            _check_text(item, name, vocab, context_length)
    return [
        _text_prompt(item, vocab) if isinstance(item, str) else _ids_prompt(item, name, vocab)
        for item, name in zip(raw, where, strict=True)
    ]


def _check_text(text: str, where: str, vocab: Vocabulary, context_length: int) -> None:
    """Refuse text that cannot be tokenized, or that is longer than the context by its bytes
    alone (before tokenizing it: that costs ~100 bytes a character)."""
    try:
        # JSON can carry a lone surrogate ("\ud800"); UTF-8, and so BPE, cannot.
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise RequestError(
            "prompt",
            f"{where} must be valid Unicode text; it holds a lone surrogate "
            f"{text[exc.start]!r} at character {exc.start}",
            allowed="text without lone surrogates (U+D800..U+DFFF)",
            value=text[max(0, exc.start - 20) : exc.start + 20],
        ) from None
    fewest = vocab.fewest_tokens(size)
    if fewest > context_length:
        raise RequestError(
            "prompt",
            f"This model's maximum context length is {context_length} tokens; {where} is "
            f"{size} bytes of text, at least {fewest} tokens. Please reduce your prompt.",
            allowed=f"prompt tokens + max_tokens <= {context_length}",
            value=f"{size} bytes",
        )


def _text_prompt(text: str, vocab: Vocabulary) -> Prompt:
    ids = vocab.encode(text)
    if not ids:
        return Prompt([vocab.eot_token_id], "", [])
    return Prompt(ids, text, ids)


def _ids_prompt(item: list[Any], where: str, vocab: Vocabulary) -> Prompt:
    ids = [int(t) for t in item]
    size = vocab.size
    bad = [t for t in ids if not 0 <= t < size]
    if bad:
        raise RequestError(
            "prompt",
            f"{where} holds token ids outside the vocabulary (0 to {size - 1}); got {bad[:5]}",
            allowed=f"token ids 0..{size - 1}",
            value=bad[:5],
        )
    return Prompt(ids, vocab.decode(ids), ids)
