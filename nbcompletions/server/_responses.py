"""The Responses API on our server (``POST /v1/responses``): a chat by another name.

``input`` (a string, or a list of messages) and ``instructions`` (a system message) become the
chat's messages; the answer is the chat's completion (`._chat`) written as OpenAI's ``response``
object: one ``message`` output whose ``output_text`` part carries the text and, with
``include=["message.output_text.logprobs"]``, its logprobs (``top_logprobs`` 0-20 alternatives,
``bytes`` on every entry). With ``stream``, the Responses API's events (`ResponseEvents`).
"""

from __future__ import annotations

import collections
import dataclasses
import secrets
from collections.abc import Mapping
from typing import Any

from .._checks import check_int, invalid, shown
from .._errors import RequestError
from ._chat import MAX_TOP_LOGPROBS, ChatCall, TokenBytes, chat_logprobs
from ._scheduler import CompletionStream

__all__ = [
    "LOGPROBS_INCLUDE",
    "RESPONSES_FIELDS",
    "ResponseEvents",
    "chat_body",
    "response_object",
]

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
    if body.get("stream"):
        chat.update(stream=True, stream_options={"include_usage": True})
    chat.update(
        (name, body[name])
        for name in ("model", "temperature", "top_p", "user")
        if body.get(name) is not None
    )
    return chat


@dataclasses.dataclass
class _Reply:
    """What a response says, gathered whole or chunk by chunk."""

    body: Mapping[str, Any]
    created: Any = None
    model: Any = None
    text: str = ""
    logprobs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    usage: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    response_id: str = dataclasses.field(default_factory=lambda: "resp_" + secrets.token_hex(24))
    message_id: str = dataclasses.field(default_factory=lambda: "msg_" + secrets.token_hex(24))

    def part(self) -> dict[str, Any]:
        return {
            "type": "output_text",
            "text": self.text,
            "annotations": [],
            "logprobs": self.logprobs,
        }

    def item(self, status: str) -> dict[str, Any]:
        content = [self.part()] if status != "in_progress" else []
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, status: str) -> dict[str, Any]:
        body, usage = self.body, self.usage
        return {
            "id": self.response_id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"}
            if status == "incomplete"
            else None,
            "instructions": body.get("instructions"),
            "max_output_tokens": body.get("max_output_tokens"),
            "model": self.model,
            "output": [] if status == "in_progress" else [self.item(status)],
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
            "usage": None
            if status == "in_progress"
            else {
                "input_tokens": usage.get("prompt_tokens", 0),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": usage.get("completion_tokens", 0),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": usage.get("total_tokens", 0),
            },
        }

    @property
    def status(self) -> str:
        return "incomplete" if self.finish_reason == "length" else "completed"


def response_object(
    answer: Mapping[str, Any], call: ChatCall, token_bytes: TokenBytes, body: Mapping[str, Any]
) -> dict[str, Any]:
    """A ``text_completion`` answer as OpenAI's ``response`` object."""
    (choice,) = answer["choices"]
    reply = _Reply(
        body,
        created=answer.get("created"),
        model=answer.get("model"),
        text=choice["text"],
        finish_reason=choice["finish_reason"],
        usage=answer.get("usage") or {},
    )
    if call.top_logprobs is not None:
        reply.logprobs = chat_logprobs(choice.get("logprobs"), call.top_logprobs, token_bytes)
    return reply.response(reply.status)


class ResponseEvents:
    """A completion stream read as the Responses API's events: ``response.created``,
    ``response.in_progress``, the message item and its text part opened, one
    ``response.output_text.delta`` (with its logprobs) per chunk of text, then the part, the
    item and the response done (``response.completed``, or ``response.incomplete`` at
    max_output_tokens). Each is sent as ``event: {type}`` and ``data: {json}``, as OpenAI
    sends them."""

    def __init__(
        self,
        stream: CompletionStream,
        call: ChatCall,
        token_bytes: TokenBytes,
        body: Mapping[str, Any],
    ) -> None:
        self._stream = stream
        self._call = call
        self._token_bytes = token_bytes
        self._reply = _Reply(body)
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._sequence = 0
        self._state = "new"  # new -> open -> done

    async def next(self) -> dict[str, Any] | None:
        while not self._pending:
            if self._state == "done":
                return None
            chunk = await self._stream.next()
            if chunk is None:
                self._close()
            else:
                self._read(chunk)
        return self._pending.popleft()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _emit(self, kind: str, **fields: Any) -> None:
        self._pending.append({"type": kind, "sequence_number": self._sequence, **fields})
        self._sequence += 1

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._reply.message_id, "output_index": 0, "content_index": 0}

    def _read(self, chunk: Mapping[str, Any]) -> None:
        reply = self._reply
        if self._state == "new":
            self._state = "open"
            reply.created, reply.model = chunk.get("created"), chunk.get("model")
            self._emit("response.created", response=reply.response("in_progress"))
            self._emit("response.in_progress", response=reply.response("in_progress"))
            self._emit("response.output_item.added", output_index=0, item=reply.item("in_progress"))
            part = {**reply.part(), "text": "", "logprobs": []}
            self._emit("response.content_part.added", part=part, **self._where())
        if chunk.get("usage"):
            reply.usage = chunk["usage"]
        for choice in chunk.get("choices", []):
            entries: list[dict[str, Any]] = []
            if self._call.top_logprobs is not None:
                entries = chat_logprobs(
                    choice.get("logprobs"), self._call.top_logprobs, self._token_bytes
                )
            reply.text += choice["text"]
            reply.logprobs.extend(entries)
            reply.finish_reason = choice["finish_reason"] or reply.finish_reason
            if choice["text"] or entries:
                self._emit(
                    "response.output_text.delta",
                    delta=choice["text"],
                    logprobs=entries,
                    **self._where(),
                )

    def _close(self) -> None:
        reply, status = self._reply, self._reply.status
        self._state = "done"
        where = self._where()
        self._emit("response.output_text.done", text=reply.text, logprobs=reply.logprobs, **where)
        self._emit("response.content_part.done", part=reply.part(), **where)
        self._emit("response.output_item.done", output_index=0, item=reply.item(status))
        self._emit(f"response.{status}", response=reply.response(status))
