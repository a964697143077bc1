"""The request side of the protocol: every field of ``POST /v1/completions``, validated up front.

Ranges follow OpenAI's (see COMPAT.md). Servers differ on a few caps (vLLM allows 20 logprobs,
llama.cpp has no cap): those live in `Limits`, a client setting whose defaults are OpenAI's.
The server validates incoming bodies with the very same code, so both sides agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypedDict

import numpy as np

from ._checks import (
    check_int,
    check_number,
    check_optional_count,
    finite_float,
    invalid,
    is_int,
    shown,
)
from ._errors import RequestError

__all__ = [
    "CHAT_FIELDS",
    "DEFAULT_MAX_TOKENS",
    "FIELDS",
    "SAMPLERS",
    "CompletionFields",
    "CompletionRequest",
    "Limits",
    "Prompt",
    "StreamOptions",
    "chat_field_hint",
    "check_flag",
    "check_logit_bias",
    "check_model",
    "check_optional_count",
    "check_sampler",
    "check_stop",
    "check_stream_options",
    "check_text",
    "check_unicode",
    "plain",
    "plain_logit_bias",
    "shown",
]

#: OpenAI's max_tokens when a request leaves it unset.
DEFAULT_MAX_TOKENS = 16

#: A prompt: text, several texts, token ids, or several token-id lists (tuples are taken as lists).
Prompt = str | list[str] | list[int] | list[list[int]]

#: Every body field of the Completions API, in the order the reference lists them.
FIELDS: tuple[str, ...] = (
    "model",
    "prompt",
    "best_of",
    "echo",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "suffix",
    "temperature",
    "top_p",
    "user",
)


#: vLLM's extra sampling fields (beyond OpenAI's) that a profile may allow in ``extra``, with the
#: ranges vLLM's SamplingParams accepts. top_k 0 or -1 turns it off; min_p 0 and
#: repetition_penalty 1 are neutral.
SAMPLERS: dict[str, str] = {
    "top_k": "an integer >= -1 (0 or -1: off)",
    "min_p": "a number from 0 to 1",
    "repetition_penalty": "a number > 0 (1: off)",
}


class StreamOptions(TypedDict, total=False):
    include_usage: bool


class CompletionFields(TypedDict, total=False):
    """The keyword fields of ``complete(prompt, **fields)``: `FIELDS` but ``prompt``, plus
    ``extra`` (server-specific fields, sent unchecked). ``None`` leaves a field to the server."""

    model: str | None
    best_of: int | None
    echo: bool | None
    frequency_penalty: float | None
    logit_bias: Mapping[str, float] | None
    logprobs: int | None
    max_tokens: int | None
    n: int | None
    presence_penalty: float | None
    seed: int | None
    stop: str | list[str] | None
    stream: bool | None
    stream_options: StreamOptions | None
    suffix: str | None
    temperature: float | None
    top_p: float | None
    user: str | None
    extra: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps that differ between servers. The defaults are OpenAI's.

    ``max_stop`` None means no cap. ``samplers`` names the extra sampling fields of `SAMPLERS` the
    server implements: requests carrying them in ``extra`` have them range-checked.
    """

    max_logprobs: int | None = 5
    max_n: int = 128
    max_best_of: int = 20
    max_stop: int | None = 4
    samplers: frozenset[str] = frozenset()

    @classmethod
    def openai(cls) -> Limits:
        return cls()

    @classmethod
    def vllm(cls) -> Limits:
        return cls(max_logprobs=20, max_stop=None, samplers=frozenset(SAMPLERS))

    @classmethod
    def llamacpp(cls) -> Limits:
        return cls(max_logprobs=None)


#: How to turn a chat into a prompt, for errors that meet Chat API habits.
CHAT_TO_PROMPT = (
    "format the chat as one text, e.g. prompt='System: ...\\nUser: Hello\\nAssistant:' (or, for an "
    "instruction-tuned model, its chat template: transformers' "
    "tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))"
)

#: Chat Completions fields people bring to the Completions endpoint, and what to use instead.
CHAT_FIELDS: dict[str, str] = {
    "messages": (
        "messages belongs to the Chat Completions API: send it with client.chat(messages, ...) "
        "(POST /v1/chat/completions); this is the Completions endpoint (POST /v1/completions), "
        f"which takes prompt= text: {CHAT_TO_PROMPT}"
    ),
    "top_logprobs": (
        "top_logprobs belongs to the Chat Completions API; the Completions endpoint takes "
        "logprobs=N, the number of alternatives per token (0-5 on OpenAI)"
    ),
    "max_completion_tokens": (
        "max_completion_tokens belongs to the Chat Completions API; the Completions endpoint "
        "takes max_tokens"
    ),
}


def chat_field_hint(name: str) -> str | None:
    """What to use instead of a Chat Completions field (`CHAT_FIELDS`), or None."""
    return CHAT_FIELDS.get(name)


def check_sampler(field: str, value: Any) -> None:
    """Check one of vLLM's extra sampling fields (`SAMPLERS`) against vLLM's range."""
    allowed = SAMPLERS[field]
    if field == "top_k":
        if not is_int(value) or value < -1:
            raise invalid(field, allowed, value)
    elif field == "min_p":
        number = finite_float(value)
        if number is None or not 0 <= number <= 1:
            raise invalid(field, allowed, value)
    elif (number := finite_float(value)) is None or number <= 0:
        raise invalid(field, allowed, value)


def check_unicode(field: str, text: str) -> None:
    # A lone surrogate ("\ud800") is a valid Python str but cannot be sent as UTF-8 JSON.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            field,
            f"{field} must be valid Unicode text; got {shown(text)} (a lone surrogate at "
            f"character {exc.start})",
            allowed="valid Unicode text",
            value=text,
        ) from None


def check_flag(field: str, value: Any) -> None:
    """``value`` must be None, True or False."""
    if value is not None and not isinstance(value, bool):
        raise invalid(field, "true or false", value)


def check_text(field: str, value: Any) -> None:
    """``value`` must be None or a str that UTF-8 can carry."""
    if value is None:
        return
    if not isinstance(value, str):
        raise invalid(field, "a string", value)
    check_unicode(field, value)


def check_model(model: Any, require_model: bool) -> None:
    """``model`` must be a non-empty string (or None unless ``require_model``)."""
    if model is None:
        if require_model:
            raise invalid("model", "a model name (string)", None)
    elif not isinstance(model, str) or not model:
        raise invalid("model", "a non-empty string", model)


def check_stream_options(options: Any, stream: bool | None) -> None:
    """``stream_options`` (not None): an object like ``{"include_usage": true}``, with stream."""
    if not isinstance(options, Mapping):
        raise invalid("stream_options", 'an object like {"include_usage": true}', options)
    if not stream:
        raise RequestError(
            "stream_options",
            f"stream_options is only allowed with stream=True; got {dict(options)!r} without "
            "stream",
            allowed="unset unless stream=True",
            value=options,
        )
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise invalid("stream_options.include_usage", "true or false", include)


def check_logit_bias(logit_bias: Any) -> None:
    """``logit_bias`` (not None): token id (ASCII digits) -> a number from -100 to 100."""
    allowed = "a map of token id (a string of ASCII digits) to a number from -100 to 100"
    if not isinstance(logit_bias, Mapping):
        raise invalid("logit_bias", allowed, logit_bias)
    for key, value in logit_bias.items():
        # str.isdigit() also passes "²" (int() then fails) and "٣" or "０" (which int() reads
        # as 3 and 0): only ASCII 0-9 spell a token id.
        if not isinstance(key, str) or not key or not (key.isascii() and key.isdigit()):
            raise RequestError(
                "logit_bias",
                "logit_bias keys must be token ids written with ASCII digits 0-9; "
                f"got {shown(key)}",
                allowed=allowed,
                value=dict(logit_bias),
            )
        number = finite_float(value)
        if number is None or not -100 <= number <= 100:
            raise RequestError(
                "logit_bias",
                f"logit_bias[{key!r}] must be a number from -100 to 100; got {shown(value)}",
                allowed=allowed,
                value=dict(logit_bias),
            )


def check_stop(stop: Any, cap: int | None) -> None:
    """``stop`` (not None): a non-empty string or a list of up to ``cap`` of them."""
    # [] means no stop strings, as vLLM reads it (lm-evaluation-harness sends it).
    allowed = (
        f"a non-empty string or a list of up to {cap} non-empty strings"
        if cap is not None
        else "a non-empty string or a list of non-empty strings"
    )
    if isinstance(stop, str):
        if not stop:
            raise invalid("stop", allowed, stop)
        check_unicode("stop", stop)
        return
    if (
        not isinstance(stop, list)
        or (cap is not None and len(stop) > cap)
        or not all(isinstance(s, str) and s for s in stop)
    ):
        raise invalid("stop", allowed, stop)
    for item in stop:
        check_unicode("stop", item)


def _check_prompt(value: Any) -> None:
    allowed = (
        "a string, a non-empty list of strings, a non-empty list of token ids "
        "(integers >= 0), or a non-empty list of non-empty token-id lists"
    )
    if isinstance(value, str):
        check_unicode("prompt", value)
        return
    if not isinstance(value, list | tuple) or len(value) == 0:
        raise invalid("prompt", allowed, value)
    if all(isinstance(item, str) for item in value):
        for item in value:
            check_unicode("prompt", item)
        return
    if all(is_int(item) for item in value):
        if any(item < 0 for item in value):
            raise invalid("prompt", allowed, value)
        return
    if all(isinstance(item, list | tuple) for item in value):
        for i, item in enumerate(value):
            if len(item) == 0 or not all(is_int(t) and t >= 0 for t in item):
                raise RequestError(
                    "prompt",
                    f"prompt[{i}] must be a non-empty list of token ids (integers >= 0); "
                    f"got {shown(item)}",
                    allowed=allowed,
                    value=value,
                )
        return
    raise invalid("prompt", allowed, value)


#: Fields that hold one value, which may arrive as a numpy scalar (made Python's on construction).
_SCALAR_FIELDS = (
    "best_of",
    "echo",
    "frequency_penalty",
    "logprobs",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stream",
    "temperature",
    "top_p",
)

#: The number fields and OpenAI's ranges for them.
_NUMBER_RANGES = (
    ("frequency_penalty", -2.0, 2.0),
    ("presence_penalty", -2.0, 2.0),
    ("temperature", 0.0, 2.0),
    ("top_p", 0.0, 1.0),
)


def plain(value: Any) -> Any:
    """A numpy scalar as the Python value it holds; anything else as it is."""
    return value.item() if isinstance(value, np.generic) else value


def plain_logit_bias(logit_bias: Any) -> Any:
    """A logit_bias mapping with integer keys written as strings and numpy values made Python's
    (anything that is not a mapping as it is, for the check to refuse)."""
    if not isinstance(logit_bias, Mapping):
        return logit_bias
    return {str(int(k)) if is_int(k) else k: plain(v) for k, v in logit_bias.items()}


def _plain_prompt_item(item: Any) -> Any:
    # A token-id list may hold numpy integers (list(np.array([...]))): Python ints, a list.
    if isinstance(item, list | tuple):
        return [plain(token) for token in item]
    return plain(item)


def prompt_count(prompt: Any) -> int:
    """How many prompts a valid ``prompt`` holds (a list of strings or of token lists is many)."""
    if isinstance(prompt, str):
        return 1
    if prompt and all(isinstance(item, str | list | tuple) for item in prompt):
        return len(prompt)
    return 1


@dataclasses.dataclass(frozen=True)
class CompletionRequest:
    """Every field of a Completions request; ``None`` means "not set, use the server's default".

    Construction validates everything and raises `RequestError` naming the field, the allowed range
    and the value given. ``extra`` carries server-specific fields (``top_k`` for vLLM, say),
    unchecked.
    """

    prompt: Any = None  # a `Prompt` once validated (tuples become lists)
    model: str | None = None
    best_of: int | None = None
    echo: bool | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None
    logprobs: int | None = None
    max_tokens: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | Mapping[str, Any] | None = None
    suffix: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    user: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    limits: Limits = dataclasses.field(default_factory=Limits, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Normalise containers so requests are hashable-ish, comparable and safe to share, and
        # numpy scalars (a grid from np.arange, a value read from a frame) to Python's, so that
        # the body is JSON and np.int64(5) is the same request as 5.
        for field in _SCALAR_FIELDS:
            value = getattr(self, field)
            if isinstance(value, np.generic):
                object.__setattr__(self, field, value.item())
        if isinstance(self.prompt, list | tuple):
            object.__setattr__(self, "prompt", [_plain_prompt_item(item) for item in self.prompt])
        if isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", list(self.stop))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", plain_logit_bias(self.logit_bias))
        if isinstance(self.extra, Mapping) and any(
            isinstance(v, np.generic) for v in self.extra.values()
        ):
            object.__setattr__(self, "extra", {k: plain(v) for k, v in self.extra.items()})
        self.validate()

    # -- validation -------------------------------------------------------------------------------
    def validate(self, *, require_model: bool = False) -> None:
        self._check_model_and_prompt(require_model)
        check_flag("echo", self.echo)
        check_flag("stream", self.stream)
        self._check_counts()
        for field, low, high in _NUMBER_RANGES:
            value = getattr(self, field)
            if value is not None:
                check_number(field, value, low, high)
        if self.logit_bias is not None:
            check_logit_bias(self.logit_bias)
        if self.stop is not None:
            check_stop(self.stop, self.limits.max_stop)
        if self.stream_options is not None:
            check_stream_options(self.stream_options, self.stream)
        check_text("suffix", self.suffix)
        check_text("user", self.user)
        self._check_extra()

    def _check_model_and_prompt(self, require_model: bool) -> None:
        check_model(self.model, require_model)
        if self.prompt is None:
            if "messages" in self.extra:
                raise RequestError(
                    "messages", CHAT_FIELDS["messages"], allowed="prompt", value=None
                )
            raise invalid(
                "prompt", "given (a string, list of strings, token ids or token-id lists)", None
            )
        _check_prompt(self.prompt)

    def _check_counts(self) -> None:
        lim = self.limits
        n = 1 if self.n is None else self.n
        if self.n is not None:
            check_int("n", self.n, 1, lim.max_n)
        if self.best_of is not None:
            self._check_best_of(n)
        if isinstance(self.logprobs, bool):
            # Chat's logprobs is a switch (with top_logprobs for the count); here it is the count.
            cap = "" if lim.max_logprobs is None else f" to {lim.max_logprobs}"
            raise RequestError(
                "logprobs",
                f"logprobs must be an integer count from 0{cap} on the Completions endpoint "
                f"(the number of alternatives listed per token; the Chat API's boolean logprobs "
                f"does not apply); got {self.logprobs!r}: pass logprobs=1 for the chosen token's "
                "logprob and the top alternative, logprobs=5 for five, or leave it unset for none",
                allowed=f"an integer from 0{cap}" if cap else "an integer >= 0",
                value=self.logprobs,
            )
        if self.logprobs is not None:
            check_int("logprobs", self.logprobs, 0, lim.max_logprobs)
        if self.max_tokens is not None:
            check_int("max_tokens", self.max_tokens, 0, None)
        if self.seed is not None:
            check_int("seed", self.seed, None, None)

    def _check_best_of(self, n: int) -> None:
        lim = self.limits
        assert self.best_of is not None
        check_int("best_of", self.best_of, 1, lim.max_best_of)
        if self.best_of < n:
            raise RequestError(
                "best_of",
                f"best_of must be >= n ({n}); got {self.best_of}",
                allowed=f"an integer from {n} to {lim.max_best_of}",
                value=self.best_of,
            )
        if self.stream and self.best_of > 1:
            raise RequestError(
                "best_of",
                f"best_of cannot be used with stream=True; got best_of={self.best_of}",
                allowed="1 (or unset) when streaming",
                value=self.best_of,
            )

    def _check_extra(self) -> None:
        if not isinstance(self.extra, Mapping):
            raise invalid("extra", "a mapping of extra body fields", self.extra)
        for field in self.limits.samplers & set(self.extra):
            check_sampler(field, self.extra[field])
        clash = set(self.extra) & set(FIELDS)
        if clash:
            raise RequestError(
                "extra",
                f"extra must not repeat standard fields; got {sorted(clash)}",
                allowed="non-standard field names",
                value=dict(self.extra),
            )

    # -- conversion -------------------------------------------------------------------------------
    @classmethod
    def from_body(
        cls, body: Mapping[str, Any], *, limits: Limits | None = None, require_model: bool = False
    ) -> CompletionRequest:
        """Build from a JSON body (unknown fields go to ``extra``); validates."""
        if not isinstance(body, Mapping):
            raise RequestError(
                None, f"the request body must be a JSON object; got {type(body).__name__}"
            )
        known = {k: body[k] for k in FIELDS if k in body and body[k] is not None}
        extra = {k: v for k, v in body.items() if k not in FIELDS}
        request = cls(**known, extra=extra, limits=limits or Limits())
        if require_model:
            request.validate(require_model=True)
        return request

    def to_body(self) -> dict[str, Any]:
        """The JSON body to send: set fields only, plus ``extra``."""
        body: dict[str, Any] = {}
        for field in FIELDS:
            value = getattr(self, field)
            if value is not None:
                body[field] = dict(value) if isinstance(value, Mapping) else value
        body.update(self.extra)
        return body

    def replace(self, **changes: Any) -> CompletionRequest:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def n_prompts(self) -> int:
        return prompt_count(self.prompt)

    @property
    def effective_n(self) -> int:
        return 1 if self.n is None else self.n
