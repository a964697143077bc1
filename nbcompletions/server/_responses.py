"""The Responses API on our server (``POST /v1/responses``): a chat by another name.

``input`` (a string, or a list of messages) and ``instructions`` (a system message) become the
chat's messages; the answer is the chat's completion (`._chat`) written as OpenAI's ``response``
object: one ``message`` output whose ``output_text`` part carries the text and, with
``include=["message.output_text.logprobs"]``, its logprobs (``top_logprobs`` 0-20 alternatives,
``bytes`` on every entry). Streaming is not offered here (400 naming ``stream``): stream a chat.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from typing import Any

from .._checks import check_int, invalid, shown
from .._errors import RequestError
from ._chat import MAX_TOP_LOGPROBS, ChatCall, TokenBytes, chat_logprobs

__all__ = ["LOGPROBS_INCLUDE", "RESPONSES_FIELDS", "chat_body", "response_object"]

RESPONSES_FIELDS = (
    "model",
    "input",
    "include",
    "instructions",
    "max_output_tokens",
    "store",
    "stream",
    "temperature",
    "top_logprobs",
    "top_p",
    "user",
)
#: The one ``include`` value this server reads (and the only one it accepts).
LOGPROBS_INCLUDE = "message.output_text.logprobs"
_TEXT_PARTS = ("input_text", "output_text", "text")
_ALLOWED_INPUT = (
    'a string, or a non-empty list of messages {"role": user, assistant, system or developer, '
    '"content": a string or a list of input_text/output_text parts}'
)


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for index, part in enumerate(content):
            if (
                not isinstance(part, Mapping)
                or part.get("type") not in _TEXT_PARTS
                or not isinstance(part.get("text"), str)
            ):
                raise invalid(
                    f"{where}[{index}]",
                    "a text part {'type': 'input_text', 'text': string} (this model reads text)",
                    part,
                )
            texts.append(part["text"])
        return "\n".join(texts)
    raise invalid(where, "a string or a non-empty list of input_text parts", content)


def _messages(value: Any) -> list[dict[str, Any]]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise invalid("input", _ALLOWED_INPUT, value)
    messages = []
    for index, item in enumerate(value):
        where = f"input[{index}]"
        if not isinstance(item, Mapping) or item.get("type", "message") != "message":
            raise invalid(where, "a message (type message, with role and content)", item)
        role = item.get("role")
        if role not in ("user", "assistant", "system", "developer"):
            raise invalid(f"{where}.role", "one of user, assistant, system, developer", role)
        messages.append(
            {"role": role, "content": _content(item.get("content"), f"{where}.content")}
        )
    return messages


def _logprobs_count(body: Mapping[str, Any]) -> int | None:
    include = body.get("include")
    if include is not None and (
        not isinstance(include, list) or any(item != LOGPROBS_INCLUDE for item in include)
    ):
        raise RequestError(
            "include",
            f"include may only list {LOGPROBS_INCLUDE!r} on this server; got {shown(include)}",
            allowed=f"[{LOGPROBS_INCLUDE!r}] or unset",
            value=include,
        )
    top = body.get("top_logprobs")
    if top is not None:
        check_int("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
    return (top or 0) if include else None


def chat_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """The chat body that answers a Responses ``body`` (fields known to be `RESPONSES_FIELDS`).
    Raises `RequestError` naming the Responses field."""
    if body.get("stream"):
        raise RequestError(
            "stream",
            "stream is not offered on /v1/responses by this server; got stream=true: "
            "stream a POST /v1/chat/completions instead",
            allowed="false or unset",
            value=body.get("stream"),
        )
    for flag in ("stream", "store"):
        if body.get(flag) is not None and not isinstance(body[flag], bool):
            raise invalid(flag, "true or false", body[flag])
    messages = _messages(body.get("input"))
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise invalid("instructions", "a string (a system message)", instructions)
        messages.insert(0, {"role": "system", "content": instructions})
    top = _logprobs_count(body)
    chat: dict[str, Any] = {"messages": messages}
    if body.get("max_output_tokens") is not None:
        chat["max_completion_tokens"] = check_int(
            "max_output_tokens", body["max_output_tokens"], 1, None
        )
    if top is not None:
        chat.update(logprobs=True, top_logprobs=top)
    chat.update(
        (name, body[name])
        for name in ("model", "temperature", "top_p", "user")
        if body.get(name) is not None
    )
    return chat


def response_object(
    answer: Mapping[str, Any], call: ChatCall, token_bytes: TokenBytes, body: Mapping[str, Any]
) -> dict[str, Any]:
    """A ``text_completion`` answer as OpenAI's ``response`` object."""
    (choice,) = answer["choices"]
    complete = choice["finish_reason"] != "length"
    logprobs = []
    if call.top_logprobs is not None:
        logprobs = chat_logprobs(choice.get("logprobs"), call.top_logprobs, token_bytes)
    text = {"type": "output_text", "text": choice["text"], "annotations": [], "logprobs": logprobs}
    usage = answer.get("usage") or {}
    return {
        "id": "resp_" + secrets.token_hex(24),
        "object": "response",
        "created_at": answer.get("created"),
        "status": "completed" if complete else "incomplete",
        "error": None,
        "incomplete_details": None if complete else {"reason": "max_output_tokens"},
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": answer.get("model"),
        "output": [
            {
                "type": "message",
                "id": "msg_" + secrets.token_hex(24),
                "status": "completed" if complete else "incomplete",
                "role": "assistant",
                "content": [text],
            }
        ],
        "parallel_tool_calls": False,
        "temperature": body.get("temperature"),
        "tool_choice": "none",
        "tools": [],
        "top_logprobs": body.get("top_logprobs"),
        "top_p": body.get("top_p"),
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
        "store": False,
        "metadata": {},
        "usage": {
            "input_tokens": usage.get("prompt_tokens", 0),
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage.get("completion_tokens", 0),
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage.get("total_tokens", 0),
        },
    }
