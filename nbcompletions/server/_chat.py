"""Chat Completions on our server: a chat body becomes a completion of the rendered chat template,
and the completion's answer is written back in OpenAI's ``chat.completion`` shapes.

A chat request runs exactly as ``/v1/completions`` with ``prompt=render_chat(messages)`` does (the
same scheduler, budget, limits and sampling), so its logprobs are those of the completion of the
rendered prompt. What differs is only the envelope:

- ``logprobs`` is a switch and ``top_logprobs`` (0-20) the count; each entry of
  ``choices[].logprobs.content`` has ``token``, ``logprob``, ``bytes`` (the token's exact bytes,
  also for part of a UTF-8 character) and exactly ``top_logprobs`` alternatives, most likely first.
- The end-of-text token that ends a reply is counted in ``usage.completion_tokens`` but, as at
  OpenAI, not listed in the logprobs.
- ``max_completion_tokens`` (or ``max_tokens``) unset: the reply may fill the rest of the
  context (vLLM's default), within the server's ``max_tokens`` cap.
"""

from __future__ import annotations

import collections
import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

from .._checks import check_int, invalid
from .._errors import RequestError
from .._request import CompletionRequest, Limits
from ..model import render_chat
from ._http import Failure
from ._scheduler import CompletionStream

__all__ = [
    "CHAT_FIELDS",
    "MAX_TOP_LOGPROBS",
    "ChatCall",
    "ChatStream",
    "TokenBytes",
    "chat_call",
    "chat_logprobs",
    "chat_response",
    "small_chat",
    "token_bytes_of",
]

#: The Chat Completions fields this server reads (vLLM's sampling fields too under compat vllm).
CHAT_FIELDS = (
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
#: OpenAI's and vLLM's cap on ``top_logprobs``.
MAX_TOP_LOGPROBS = 20
#: Fields passed on to the completion unchanged (validated there, under the same names).
_SHARED = (
    "model",
    "frequency_penalty",
    "logit_bias",
    "n",
    "presence_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "temperature",
    "top_p",
    "user",
)
EOT = "<|endoftext|>"

#: A token's string -> its bytes (as a list of ints, OpenAI's ``bytes``).
TokenBytes = Callable[[str], list[int]]


@dataclasses.dataclass(frozen=True)
class ChatCall:
    """A validated chat request: the completion that answers it, and how to write the answer."""

    completion: CompletionRequest
    #: Alternatives per token; None: no logprobs.
    top_logprobs: int | None


def _max_tokens(body: Mapping[str, Any]) -> int | None:
    given = {
        name: check_int(name, body[name], 0, None)
        for name in ("max_completion_tokens", "max_tokens")
        if body.get(name) is not None
    }
    if len(set(given.values())) > 1:
        raise RequestError(
            "max_tokens",
            "max_tokens and max_completion_tokens differ; give one of them (max_tokens is the "
            f"older name of max_completion_tokens); got {given}",
            allowed="one of max_tokens, max_completion_tokens",
            value=given,
        )
    return next(iter(given.values()), None)


def _top_logprobs(body: Mapping[str, Any]) -> int | None:
    logprobs, top = body.get("logprobs"), body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise invalid(
            "logprobs", "true or false (top_logprobs sets how many alternatives)", logprobs
        )
    if top is not None:
        check_int("top_logprobs", top, 0, MAX_TOP_LOGPROBS)
        if top > 0 and not logprobs:  # 0 without logprobs asks for nothing (vLLM lets it pass)
            raise RequestError(
                "top_logprobs",
                f"top_logprobs needs logprobs=true; got top_logprobs={top} with "
                f"logprobs={logprobs!r}",
                allowed="unset unless logprobs is true",
                value=top,
            )
    return (top or 0) if logprobs else None


def small_chat(body: Mapping[str, Any]) -> bool:
    """Whether rendering and tokenizing ``body``'s messages is quick enough for the event loop
    (a few plain-text turns); a large one goes to a worker thread."""
    messages = body.get("messages")
    if not isinstance(messages, list) or len(messages) > 32:
        return False
    size = 0
    for message in messages:
        content = message.get("content") if isinstance(message, Mapping) else None
        if not isinstance(content, str):
            return False
        size += len(content)
    return size <= 4096


def chat_call(
    body: Mapping[str, Any],
    *,
    limits: Limits,
    extra_fields: tuple[str, ...],
    encode: Callable[[str], list[int]] | None,
    context_length: int | None,
    max_tokens_cap: int | None,
) -> ChatCall:
    """The completion that answers a chat ``body`` (fields already known to be `CHAT_FIELDS` or
    ``extra_fields``, vLLM's fields that pass to the completion's ``extra``). Raises
    `RequestError` naming the chat field, or `Failure`.

    ``encode`` (the engine's tokenizer) counts the rendered template's tokens for the context
    check; the engine's tokenizer remembers recent texts, so planning the completion of the same
    text does not tokenize it again."""
    prompt = render_chat(body.get("messages"))
    top = _top_logprobs(body)
    max_tokens = _max_tokens(body)
    if encode is not None and context_length is not None:
        room = context_length - len(encode(prompt))
        if max_tokens is None:
            if room < 1:
                raise Failure(
                    400,
                    f"This model's maximum context length is {context_length} tokens; the "
                    f"messages take {context_length - room} tokens in its chat template, leaving "
                    "no room for a reply. Shorten the messages.",
                    param="messages",
                )
            max_tokens = room if max_tokens_cap is None else min(room, max_tokens_cap)
        elif max_tokens > room:
            name = (
                "max_tokens"
                if body.get("max_completion_tokens") is None
                else ("max_completion_tokens")
            )
            raise RequestError(
                name,
                f"This model's maximum context length is {context_length} tokens; the messages "
                f"take {context_length - room} in its chat template, so {name} can be at most "
                f"{max(room, 0)}; got {max_tokens}",
                allowed=f"an integer from 0 to {max(room, 0)}",
                value=max_tokens,
            )
    fields = {name: body[name] for name in _SHARED if body.get(name) is not None}
    extra = {name: body[name] for name in extra_fields if name in body}
    completion = CompletionRequest(
        prompt=prompt,
        logprobs=top,
        max_tokens=max_tokens,
        extra=extra,
        limits=dataclasses.replace(limits, max_logprobs=MAX_TOP_LOGPROBS),
        **fields,
    )
    completion.validate(require_model=True)
    return ChatCall(completion, top)


# -- answers --------------------------------------------------------------------------------------
class _BytesLists(dict[str, list[int]]):
    """Token string -> its bytes as a list: a vocabulary token's list is made once and kept
    (a plain dict lookup after that); any other string is converted each time."""

    def __init__(self, vocabulary: dict[str, bytes]) -> None:
        super().__init__()
        self.vocabulary = vocabulary

    def __missing__(self, token: str) -> list[int]:
        value = self.vocabulary.get(token)
        if value is not None:
            listed = self[token] = list(value)  # at most one entry per vocabulary token
            return listed
        if token.startswith("bytes:\\x"):
            return list(bytes.fromhex(token[len("bytes:") :].replace("\\x", "")))
        return list(token.encode("utf-8", errors="surrogatepass"))


def token_bytes_of(vocab: Any) -> TokenBytes:
    """A token string's bytes: from the engine's vocabulary where it has one (exact for every
    token), else from the string itself (``bytes:\\xe2\\x80`` for part of a character). The
    lists handed out for vocabulary tokens are shared: read them, never change them."""
    table: dict[str, bytes] = {}
    strings, raw = getattr(vocab, "token_strings", None), getattr(vocab, "token_bytes", None)
    if strings is not None and raw is not None:
        for string, value in zip(strings, raw, strict=False):
            table.setdefault(string, value)
    return _BytesLists(table).__getitem__


_by_logprob = operator.itemgetter(1)


def chat_logprobs(
    logprobs: Mapping[str, Any] | None, top_n: int, token_bytes: TokenBytes
) -> list[dict[str, Any]]:
    """A completion choice's logprobs as Chat's ``logprobs.content`` entries."""
    if not logprobs:
        return []
    content = []
    for token, logprob, top in zip(
        logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"], strict=True
    ):
        if token == EOT:
            continue  # the end of the reply: counted in usage, not listed (OpenAI's shape)
        ranked = sorted((top or {}).items(), key=_by_logprob, reverse=True)[:top_n]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": token_bytes(token),
                "top_logprobs": [
                    {"token": alt, "logprob": value, "bytes": token_bytes(alt)}
                    for alt, value in ranked
                ],
            }
        )
    return content


def _chat_id(completion_id: Any) -> str:
    text = str(completion_id)
    return "chatcmpl-" + (text[len("cmpl-") :] if text.startswith("cmpl-") else text)


def _envelope(answer: Mapping[str, Any], kind: str) -> dict[str, Any]:
    out = {"id": _chat_id(answer.get("id")), "object": kind}
    out.update({k: answer[k] for k in ("created", "model", "system_fingerprint") if k in answer})
    return out


def chat_response(
    answer: Mapping[str, Any], call: ChatCall, token_bytes: TokenBytes
) -> dict[str, Any]:
    """A ``text_completion`` answer as OpenAI's ``chat.completion``."""
    out = _envelope(answer, "chat.completion")
    out["choices"] = [
        {
            "index": choice["index"],
            "message": {"role": "assistant", "content": choice["text"], "refusal": None},
            "logprobs": None
            if call.top_logprobs is None
            else {
                "content": chat_logprobs(choice.get("logprobs"), call.top_logprobs, token_bytes),
                "refusal": None,
            },
            "finish_reason": choice["finish_reason"],
        }
        for choice in answer["choices"]
    ]
    if "usage" in answer:
        out["usage"] = answer["usage"]
    if answer["choices"] and "prompt_logprobs" in answer["choices"][0]:
        out["prompt_logprobs"] = answer["choices"][0]["prompt_logprobs"]  # vLLM's place for it
    return out


class ChatStream:
    """A completion stream read as ``chat.completion.chunk`` events: each choice opens with a
    ``{"role": "assistant"}`` delta, then its text deltas (with their logprobs), the last one
    carrying ``finish_reason``; a usage chunk (no choices) last when asked for."""

    def __init__(self, stream: CompletionStream, call: ChatCall, token_bytes: TokenBytes) -> None:
        self._stream = stream
        self._call = call
        self._token_bytes = token_bytes
        self._pending: collections.deque[dict[str, Any]] = collections.deque()
        self._opened: set[int] = set()

    async def next(self) -> dict[str, Any] | None:
        while not self._pending:
            chunk = await self._stream.next()
            if chunk is None:
                return None
            self._convert(chunk)
        return self._pending.popleft()

    async def aclose(self) -> None:
        await self._stream.aclose()

    def _convert(self, chunk: Mapping[str, Any]) -> None:
        base = _envelope(chunk, "chat.completion.chunk")
        if "usage" in chunk:
            base["usage"] = None
        top_n = self._call.top_logprobs
        for choice in chunk.get("choices", []):
            index = choice["index"]
            if index not in self._opened:
                self._opened.add(index)
                delta = {"role": "assistant", "content": "", "refusal": None}
                self._emit(base, {"index": index, "delta": delta, "logprobs": None})
            logprobs = None
            if top_n is not None:
                entries = chat_logprobs(choice.get("logprobs"), top_n, self._token_bytes)
                logprobs = {"content": entries, "refusal": None}
            self._emit(
                base,
                {
                    "index": index,
                    "delta": {"content": choice["text"]} if choice["text"] else {},
                    "logprobs": logprobs,
                    "finish_reason": choice["finish_reason"],
                },
            )
        if not chunk.get("choices") and chunk.get("usage") is not None:
            self._pending.append({**base, "choices": [], "usage": chunk["usage"]})

    def _emit(self, base: dict[str, Any], choice: dict[str, Any]) -> None:
        choice.setdefault("finish_reason", None)
        self._pending.append({**base, "choices": [choice]})
