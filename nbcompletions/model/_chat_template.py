"""The embedded model's chat template, in Jinja (for transformers and vLLM) and in Python.

The Shakespeare model was never tuned on chats; the template only gives a conversation one fixed,
documented text form, so that ``/v1/chat/completions`` on our server, ``apply_chat_template`` in
transformers and vLLM's ``--chat-template`` all score and continue the same text::

    SYSTEM: {content}\\n                      (system and developer turns)
    USER: {content}\\n
    ASSISTANT: {content}<|endoftext|>\\n
    ASSISTANT:                                (the generation prompt)

`CHAT_TEMPLATE` is the Jinja source kept in ``files/tokenizer_config.json``; `render_chat` gives
the same text without Jinja. Both take a message's content as a string; `chat_messages` (which
`render_chat` calls) also reads OpenAI's list of text parts, joined with newlines (as vLLM does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .._checks import shown
from .._errors import RequestError

__all__ = ["CHAT_ROLES", "CHAT_TEMPLATE", "chat_messages", "render_chat"]

EOT = "<|endoftext|>"

#: Roles a message may have, and the prefix each is written with.
CHAT_ROLES: dict[str, str] = {
    "system": "SYSTEM: ",
    "developer": "SYSTEM: ",
    "user": "USER: ",
    "assistant": "ASSISTANT: ",
}
GENERATION_PROMPT = "ASSISTANT:"

#: The Jinja source of the template (``chat_template`` in tokenizer_config.json). Written with
#: expressions only, so transformers' trim_blocks/lstrip_blocks change nothing.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ 'ASSISTANT: ' + message['content'] + '" + EOT + "' + '\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + '\\n' }}"
    "{% else %}"
    "{{ 'SYSTEM: ' + message['content'] + '\\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + GENERATION_PROMPT + "' }}{% endif %}"
)

_ALLOWED_MESSAGES = (
    'a non-empty list of messages, each {"role": one of system, developer, user, assistant, '
    '"content": a string or a list of {"type": "text", "text": ...} parts}'
)


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    allowed = 'a string or a list of {"type": "text", "text": string} parts'
    if not isinstance(content, list) or not content:
        raise RequestError(
            where,
            f"{where} must be {allowed}; got {shown(content)}",
            allowed=allowed,
            value=content,
        )
    texts = []
    for index, part in enumerate(content):
        if (
            not isinstance(part, Mapping)
            or part.get("type") != "text"
            or not isinstance(part.get("text"), str)
        ):
            raise RequestError(
                f"{where}[{index}]",
                f"{where}[{index}] must be a text part {{'type': 'text', 'text': string}} "
                f"(this model reads text only); got {shown(part)}",
                allowed=allowed,
                value=part,
            )
        texts.append(part["text"])
    return "\n".join(texts)


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise RequestError(
            where,
            f"{where} must be valid Unicode text; got a lone surrogate "
            f"{text[exc.start]!r} at character {exc.start}",
            allowed="text without lone surrogates (U+D800..U+DFFF)",
            value=text[max(0, exc.start - 20) : exc.start + 20],
        ) from None


def chat_messages(messages: Any) -> list[dict[str, str]]:
    """``messages`` checked and normalised to ``{"role", "content"}`` dicts of strings.

    Raises `RequestError` naming the message and field (``messages[2].role``), what is allowed
    and the value given.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes) or not messages:
        raise RequestError(
            "messages",
            f"messages must be {_ALLOWED_MESSAGES}; got {shown(messages)}",
            allowed=_ALLOWED_MESSAGES,
            value=messages,
        )
    checked = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise RequestError(
                where,
                f"{where} must be an object with role and content; got {shown(message)}",
                allowed=_ALLOWED_MESSAGES,
                value=message,
            )
        role = message.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:  # a list or dict is unhashable
            raise RequestError(
                f"{where}.role",
                f"{where}.role must be one of {', '.join(CHAT_ROLES)}; got {shown(role)}",
                allowed=", ".join(CHAT_ROLES),
                value=role,
            )
        content = _content_text(message.get("content"), f"{where}.content")
        _check_text(content, f"{where}.content")
        checked.append({"role": str(role), "content": content})
    return checked


def _check_flag(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise RequestError(
            name,
            f"{name} must be true or false; got {shown(value)}",
            allowed="true or false",
            value=value,
        )


def render_chat(
    messages: Any, add_generation_prompt: bool = True, *, continue_final_message: bool = False
) -> str:
    """The prompt text of ``messages`` under the embedded model's chat template.

    The same text as transformers' ``tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=..., continue_final_message=...)`` with the shipped
    tokenizer_config.json. ``continue_final_message``: the text ends where the last message's
    content ends (as transformers 5 cuts it), so that the model continues that message. Raises
    `RequestError` for a malformed message (see `chat_messages`).
    """
    _check_flag("add_generation_prompt", add_generation_prompt)
    _check_flag("continue_final_message", continue_final_message)
    if add_generation_prompt and continue_final_message:
        raise RequestError(
            "continue_final_message",
            "continue_final_message and add_generation_prompt cannot both be true",
            allowed="false when add_generation_prompt is true",
            value=True,
        )
    parts = []
    for message in chat_messages(messages):
        parts.append(CHAT_ROLES[message["role"]] + message["content"])
        parts.append(EOT + "\n" if message["role"] == "assistant" else "\n")
    if add_generation_prompt:
        parts.append(GENERATION_PROMPT)
    if continue_final_message:
        parts.pop()  # the open turn ends with its content: no end-of-text, no newline
    return "".join(parts)
