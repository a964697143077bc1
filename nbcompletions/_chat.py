"""The request side of ``POST /v1/chat/completions`` and ``POST /v1/responses``, validated up front.

`ChatRequest` is `CompletionRequest`'s twin for the Chat Completions API: the same checks (the
validators of `nbcompletions._request`, shared, not copied), with chat's own fields: ``messages``
(a list of ``{"role", "content"}`` dicts), ``logprobs`` as a switch and ``top_logprobs`` (0-20) as
the count, and ``max_completion_tokens`` beside ``max_tokens``. `ResponsesRequest` is the
Responses API's: ``input`` (text or messages), ``top_logprobs`` and ``max_output_tokens``; it
always asks for the output text's logprobs (``include=["message.output_text.logprobs"]``).

Every bad value is a `RequestError` naming the field, the allowed range and the value given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypedDict

import numpy as np

from ._checks import check_int, check_number, invalid, shown
from ._errors import RequestError
from ._request import (
    Limits,
    StreamOptions,
    check_flag,
    check_logit_bias,
    check_model,
    check_stop,
    check_stream_options,
    check_text,
    check_unicode,
    plain,
    plain_logit_bias,
)

__all__ = [
    "CHAT_FIELDS",
    "CHAT_ROLES",
    "MAX_TOP_LOGPROBS",
    "OUTPUT_TEXT_LOGPROBS",
    "RESPONSES_FIELDS",
    "ChatFields",
    "ChatRequest",
    "Message",
    "ResponsesFields",
    "ResponsesRequest",
    "check_messages",
]

#: The roles a chat message may have (OpenAI's; ``developer`` is the newer ``system``).
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

#: The most alternatives per token the Chat Completions and Responses APIs return (OpenAI, vLLM).
MAX_TOP_LOGPROBS = 20

#: What ``include`` must name for the Responses API to return the output text's logprobs.
OUTPUT_TEXT_LOGPROBS = "message.output_text.logprobs"

#: Every body field of the Chat Completions API that bears on probabilities and sampling.
CHAT_FIELDS: tuple[str, ...] = (
    "model",
    "messages",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_logprobs",
    "top_p",
    "user",
)

#: The body fields of the Responses API that `ResponsesRequest` checks.
RESPONSES_FIELDS: tuple[str, ...] = (
    "model",
    "input",
    "include",
    "instructions",
    "max_output_tokens",
    "stream",
    "temperature",
    "top_logprobs",
    "top_p",
    "user",
)


class Message(TypedDict, total=False):
    role: str
    content: Any
    name: str


class ChatFields(TypedDict, total=False):
    """The keyword fields of ``chat(messages, **fields)``: `CHAT_FIELDS` but ``messages``, plus
    ``extra`` (server-specific fields, sent unchecked). ``None`` leaves a field to the server."""

    model: str | None
    frequency_penalty: float | None
    logit_bias: Mapping[str, float] | None
    logprobs: bool | None
    max_completion_tokens: int | None
    max_tokens: int | None
    n: int | None
    presence_penalty: float | None
    seed: int | None
    stop: str | list[str] | None
    stream: bool | None
    stream_options: StreamOptions | None
    temperature: float | None
    top_logprobs: int | None
    top_p: float | None
    user: str | None
    extra: Mapping[str, Any]


class ResponsesFields(TypedDict, total=False):
    """The keyword fields of ``respond(input, **fields)``."""

    model: str | None
    include: list[str] | None
    instructions: str | None
    max_output_tokens: int | None
    stream: bool | None
    temperature: float | None
    top_logprobs: int | None
    top_p: float | None
    user: str | None
    extra: Mapping[str, Any]


_MESSAGES_ALLOWED = 'a non-empty list of {"role", "content"} objects, role one of ' + ", ".join(
    CHAT_ROLES
)


def _check_text_in(where: str, text: str) -> None:
    """`check_unicode` for text inside ``messages``: the error's param is ``messages``."""
    try:
        check_unicode(where, text)
    except RequestError as exc:
        raise RequestError("messages", exc.message, allowed=exc.allowed, value=text) from None


def _check_content(where: str, content: Any, role: Any) -> None:
    if isinstance(content, str):
        _check_text_in(where, content)
        return
    if content is None and role == "assistant":  # an assistant turn that only calls tools
        return
    allowed = 'a string or a list of content parts ({"type": "text", "text": ...})'
    if not isinstance(content, list) or not all(
        isinstance(part, Mapping) and isinstance(part.get("type"), str) for part in content
    ):
        raise RequestError(
            "messages",
            f"{where} must be {allowed}; got {shown(content)}",
            allowed=allowed,
            value=content,
        )
    for part in content:
        if part.get("type") == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid("messages", f"{where} text parts holding a string", part)
            _check_text_in(where, text)


def check_messages(messages: Any) -> None:
    """``messages``: a non-empty list of ``{"role", "content"}`` objects with known roles."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", _MESSAGES_ALLOWED, messages)
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise RequestError(
                "messages",
                f"messages[{i}] must be an object with role and content; got {shown(message)}",
                allowed=_MESSAGES_ALLOWED,
                value=message,
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise RequestError(
                "messages",
                f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}; got {shown(role)}",
                allowed=f"one of {', '.join(CHAT_ROLES)}",
                value=role,
            )
        if "content" not in message:
            raise RequestError(
                "messages",
                f"messages[{i}] must have a content; got {shown(dict(message))}",
                allowed=_MESSAGES_ALLOWED,
                value=message,
            )
        _check_content(f"messages[{i}].content", message.get("content"), role)


def _plain_messages(messages: Any) -> Any:
    """Messages as a list of plain dicts (tuples and mappings copied, so the request owns them)."""
    if isinstance(messages, list | tuple) and all(isinstance(m, Mapping) for m in messages):
        return [dict(message) for message in messages]
    return messages


def _check_top_logprobs(top_logprobs: Any, logprobs: bool | None, cap: int | None) -> None:
    if top_logprobs is None:
        return
    check_int("top_logprobs", top_logprobs, 0, cap)
    # 0 without logprobs lists nothing, as vLLM and our server read it.
    if top_logprobs > 0 and logprobs is not True:
        raise RequestError(
            "top_logprobs",
            f"top_logprobs needs logprobs=True (it is the number of alternatives per token of "
            f"the logprobs it switches on); got top_logprobs={top_logprobs} with "
            f"logprobs={logprobs!r}",
            allowed="unset or 0 unless logprobs=True",
            value=top_logprobs,
        )


def top_logprobs_cap(limits: Limits) -> int | None:
    """The largest ``top_logprobs`` a chat request may ask for under ``limits`` (None: no cap).

    Limits.max_logprobs is the Completions cap (5 at OpenAI); chat's is 20 wherever the server
    caps at all (llama.cpp does not)."""
    # Limits.max_logprobs is the Completions cap (5 at OpenAI); chat's is 20 wherever the server
    # caps at all (llama.cpp does not).
    return None if limits.max_logprobs is None else max(MAX_TOP_LOGPROBS, limits.max_logprobs)


def _check_extra(extra: Any, standard: Sequence[str]) -> None:
    if not isinstance(extra, Mapping):
        raise invalid("extra", "a mapping of extra body fields", extra)
    clash = set(extra) & set(standard)
    if clash:
        raise RequestError(
            "extra",
            f"extra must not repeat standard fields; got {sorted(clash)}",
            allowed="non-standard field names",
            value=dict(extra),
        )


def _plain_fields(request: Any, names: Sequence[str]) -> None:
    for name in names:
        value = getattr(request, name)
        if isinstance(value, np.generic):
            object.__setattr__(request, name, value.item())
    if isinstance(request.extra, Mapping):
        object.__setattr__(request, "extra", {k: plain(v) for k, v in request.extra.items()})


def _body(request: Any, names: Sequence[str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in names:
        value = getattr(request, name)
        if value is not None:
            body[name] = dict(value) if isinstance(value, Mapping) else value
    body.update(request.extra)
    return body


_CHAT_SCALARS = (
    "frequency_penalty",
    "logprobs",
    "max_completion_tokens",
    "max_tokens",
    "n",
    "presence_penalty",
    "seed",
    "stream",
    "temperature",
    "top_logprobs",
    "top_p",
)

_NUMBER_RANGES = (
    ("frequency_penalty", -2.0, 2.0),
    ("presence_penalty", -2.0, 2.0),
    ("temperature", 0.0, 2.0),
    ("top_p", 0.0, 1.0),
)


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """Every field of a Chat Completions request; ``None`` means "not set, use the server's
    default". Construction validates everything (`RequestError` naming the field, the allowed
    range and the value given); ``extra`` carries other fields (``tools``, vLLM's ``top_k``),
    unchecked."""

    messages: Any = None  # a list of `Message` dicts once validated
    model: str | None = None
    frequency_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None
    logprobs: bool | None = None
    max_completion_tokens: int | None = None
    max_tokens: int | None = None
    n: int | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: StreamOptions | Mapping[str, Any] | None = None
    temperature: float | None = None
    top_logprobs: int | None = None
    top_p: float | None = None
    user: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    limits: Limits = dataclasses.field(default_factory=Limits, compare=False, repr=False)

    #: Which API the request goes to (the frames' ``api`` column).
    api: ClassVar[str] = "chat"

    def __post_init__(self) -> None:
        _plain_fields(self, _CHAT_SCALARS)
        object.__setattr__(self, "messages", _plain_messages(self.messages))
        if isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", list(self.stop))
        if self.logit_bias is not None:
            object.__setattr__(self, "logit_bias", plain_logit_bias(self.logit_bias))
        self.validate()

    def validate(self, *, require_model: bool = False) -> None:
        check_model(self.model, require_model)
        check_messages(self.messages)
        check_flag("logprobs", self.logprobs)
        check_flag("stream", self.stream)
        _check_top_logprobs(self.top_logprobs, self.logprobs, top_logprobs_cap(self.limits))
        if self.n is not None:
            check_int("n", self.n, 1, self.limits.max_n)
        for name in ("max_completion_tokens", "max_tokens"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 0, None)
        if self.seed is not None:
            check_int("seed", self.seed, None, None)
        for name, low, high in _NUMBER_RANGES:
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low, high)
        if self.logit_bias is not None:
            check_logit_bias(self.logit_bias)
        if self.stop is not None:
            check_stop(self.stop, self.limits.max_stop)
        if self.stream_options is not None:
            check_stream_options(self.stream_options, self.stream)
        check_text("user", self.user)
        _check_extra(self.extra, CHAT_FIELDS)

    @classmethod
    def from_body(
        cls, body: Mapping[str, Any], *, limits: Limits | None = None, require_model: bool = False
    ) -> ChatRequest:
        """Build from a JSON body (unknown fields go to ``extra``); validates."""
        if not isinstance(body, Mapping):
            raise RequestError(
                None, f"the request body must be a JSON object; got {type(body).__name__}"
            )
        known = {k: body[k] for k in CHAT_FIELDS if k in body and body[k] is not None}
        extra = {k: v for k, v in body.items() if k not in CHAT_FIELDS}
        request = cls(**known, extra=extra, limits=limits or Limits())
        if require_model:
            request.validate(require_model=True)
        return request

    def to_body(self) -> dict[str, Any]:
        """The JSON body to send: set fields only, plus ``extra``."""
        return _body(self, CHAT_FIELDS)

    def replace(self, **changes: Any) -> ChatRequest:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def n_prompts(self) -> int:
        return 1

    @property
    def effective_n(self) -> int:
        return 1 if self.n is None else self.n


def _check_input(value: Any) -> None:
    if isinstance(value, str):
        check_unicode("input", value)
        return
    try:
        check_messages(value)
    except RequestError as exc:
        raise RequestError(
            "input",
            f"input must be a string or a list of messages: {exc.message}",
            allowed='a string, or a non-empty list of {"role", "content"} objects',
            value=value,
        ) from None


def _check_include(include: Any) -> None:
    if include is None:
        return
    if not isinstance(include, list) or not all(isinstance(item, str) for item in include):
        raise invalid("include", "a list of strings", include)


@dataclasses.dataclass(frozen=True)
class ResponsesRequest:
    """Every field of a Responses request that `Client.respond` checks (others in ``extra``).

    ``include`` always holds ``"message.output_text.logprobs"``: the frames need the logprobs.
    """

    input: Any = None  # a string or a list of `Message` dicts
    model: str | None = None
    include: list[str] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    stream: bool | None = None
    temperature: float | None = None
    top_logprobs: int | None = None
    top_p: float | None = None
    user: str | None = None
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    limits: Limits = dataclasses.field(default_factory=Limits, compare=False, repr=False)

    api: ClassVar[str] = "responses"

    def __post_init__(self) -> None:
        _plain_fields(self, ("max_output_tokens", "stream", "temperature", "top_logprobs", "top_p"))
        object.__setattr__(self, "input", _plain_messages(self.input))
        include = list(self.include) if isinstance(self.include, list | tuple) else self.include
        if isinstance(include, list) and OUTPUT_TEXT_LOGPROBS not in include:
            include.append(OUTPUT_TEXT_LOGPROBS)
        object.__setattr__(self, "include", [OUTPUT_TEXT_LOGPROBS] if include is None else include)
        self.validate()

    def validate(self, *, require_model: bool = False) -> None:
        check_model(self.model, require_model)
        if self.input is None:
            raise invalid("input", "given (a string or a list of messages)", None)
        _check_input(self.input)
        _check_include(self.include)
        check_flag("stream", self.stream)
        if self.top_logprobs is not None:
            check_int("top_logprobs", self.top_logprobs, 0, top_logprobs_cap(self.limits))
        if self.max_output_tokens is not None:
            check_int("max_output_tokens", self.max_output_tokens, 1, None)
        for name, low, high in _NUMBER_RANGES[2:]:
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low, high)
        check_text("instructions", self.instructions)
        check_text("user", self.user)
        _check_extra(self.extra, RESPONSES_FIELDS)

    def to_body(self) -> dict[str, Any]:
        return _body(self, RESPONSES_FIELDS)

    def replace(self, **changes: Any) -> ResponsesRequest:
        return dataclasses.replace(self, **changes)

    @property
    def n_prompts(self) -> int:
        return 1

    @property
    def effective_n(self) -> int:
        return 1
