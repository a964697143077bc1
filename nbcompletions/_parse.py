"""The protocol's response side: how one choice, one chunk, one logprobs object is read.

Parsing is pure and defensive (STYLE.md): every field may be missing or null, unknown fields are
ignored, and the same rule applies wherever a response is read (frames, streams, scoring, sweeps).
A field of the wrong kind (``tokens: 5``) is a `ValueError` naming where it was.

Logprobs come in two shapes, and `parse_logprobs` reads both into the same four columns:

- Completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob} | null],
  "text_offset"}``, lists that may be missing, null or short (padded with null);
- llama.cpp's chat shape: ``{"content": [{"token", "logprob", "bytes", "top_logprobs":
  [{"token", "logprob"}]}]}``. Its top entries stay lists: two byte tokens can render as the same
  string, and a dict would merge them. A null logprob stays null (never 0.0).

Where a chat-shaped entry (chosen or alternative) has a ``bytes`` list, the token is read from it
(`bytes_token`): llama-server and llama-cpp-python send a byte-level token as ``""`` (decoded with
errors ignored), so ``token`` alone makes every partial character the same empty string. Whole
UTF-8 reads as its text; a partial character as OpenAI's ``bytes:\\xe2\\x80`` form (the form our
server sends and `nbcompletions.visible_token` shows as ``<0xE2><0x80>``).
"""

from __future__ import annotations

import json
import re
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from itertools import accumulate
from operator import itemgetter
from typing import Any

from ._gc_pause import paused_gc
from ._usage import token_counts

__all__ = [
    "JSON_PARSER",
    "NEG_INF_LOGPROB",
    "FinishedChoices",
    "LogprobColumns",
    "bytes_token",
    "chat_token",
    "choice_index",
    "choice_text",
    "first_choice",
    "loads",
    "parse_logprobs",
    "prompt_tokens",
    "read_chat_tokens",
    "responses_as_chat",
    "sorted_choices",
    "token_bytes",
    "top_items",
]

#: What a -inf logprob is written as (vLLM's stand-in; JSON has no -Infinity).
NEG_INF_LOGPROB = -9999.0

_orjson: Any
try:  # pragma: no cover - which branch runs depends on the environment
    import orjson as _orjson
except ImportError:  # pragma: no cover
    _orjson = None

#: The parser `loads` uses first: "orjson" where it is installed, else "json" (the stdlib).
JSON_PARSER = "orjson" if _orjson is not None else "json"


def loads(data: bytes | bytearray | str) -> Any:
    """Parse a response body (or a stream event, or a cached row): orjson where installed.

    Parsing is most of the time from bytes to frames, and orjson takes a fraction of the stdlib's
    time. It is strict where the stdlib is lenient: it refuses ``NaN``/``-Infinity`` (which some
    servers send for a -inf logprob) and integers beyond 64 bits, so whatever it refuses is
    handed to the stdlib, which either reads it or raises its usual `ValueError`. A lone UTF-16
    surrogate escaped in a string (``"\\ud83d"``: half an emoji) becomes U+FFFD.

    A body of `PAUSE_GC_BYTES` or more is parsed with the garbage collector held off (`paused_gc`):
    a chat answer with logprobs is mostly containers, and the collector going over them while
    they are built took more than half of orjson's time.
    """
    if len(data) >= PAUSE_GC_BYTES:
        with paused_gc():
            return _loads(data)
    return _loads(data)


#: From this size on `loads` parses with the garbage collector held off (a 20-token chat answer
#: with five alternatives is about 10 kB: smaller bodies make too few containers to matter).
PAUSE_GC_BYTES = 32_768


def _loads(data: bytes | bytearray | str) -> Any:
    if _orjson is not None:
        try:
            return _orjson.loads(data)
        except _orjson.JSONDecodeError:
            pass
    try:
        parsed = json.loads(data)
        if _has_surrogate_escape(data):
            parsed = _without_lone_surrogates(parsed)
    except RecursionError:
        # A body nested deeper than any parser goes (a hostile or broken server): the ValueError
        # every caller already handles, not an error nobody catches.
        raise ValueError("the JSON is nested too deeply to parse") from None
    return parsed


# A \uD800-\uDFFF escape, in bytes or text. A server that counts in UTF-16 (or splits an emoji
# over two tokens) escapes each half alone; the stdlib reads that as a lone surrogate, a str no
# UTF-8 writer (Parquet, a notebook's output, print) can encode. orjson refuses it outright.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE_ESCAPE_BYTES = re.compile(rb"\\u[dD][89a-fA-F]")


def _has_surrogate_escape(data: bytes | bytearray | str) -> bool:
    if isinstance(data, str):
        return _SURROGATE_ESCAPE.search(data) is not None
    return _SURROGATE_ESCAPE_BYTES.search(data) is not None


def _without_lone_surrogates(value: Any) -> Any:
    """``value`` with every str made encodable: surrogate pairs joined, lone halves replaced by
    U+FFFD (as bytes that are not UTF-8 are everywhere else)."""
    if isinstance(value, str):
        if value.isascii():
            return value
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        return value
    if isinstance(value, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_lone_surrogates(item) for item in value]
    return value


#: ``(tokens, token_logprobs, top_logprobs, text_offset)`` of equal length; offsets None: unsent.
LogprobColumns = tuple[list[Any], list[Any], list[Any], list[Any] | None]


def choice_index(choice: Mapping[str, Any], position: int = 0) -> int:
    """The choice's ``index``; `position` (its place in the list) when that is missing or not an
    integer (a bool is not an index)."""
    index = choice.get("index")
    return index if isinstance(index, int) and not isinstance(index, bool) else position


def choice_text(choice: Mapping[str, Any]) -> str | None:
    """The choice's text: ``text``, else the chat shapes' ``delta.content``/``message.content``
    (chat-shaped chunks come from proxies and the seed document's sample)."""
    text = choice.get("text")
    if text is None:
        for key in ("delta", "message"):
            inner = choice.get(key)
            if isinstance(inner, Mapping) and inner.get("content") is not None:
                text = inner.get("content")
                break
    return text if isinstance(text, str) else None


def sorted_choices(response: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The response's choice objects in index order (entries that are not objects skipped)."""
    choices = response.get("choices")
    if not isinstance(choices, Sequence) or isinstance(choices, str):
        return []
    return sorted((c for c in choices if isinstance(c, Mapping)), key=choice_index)


def first_choice(response: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The choice with the lowest index, or None."""
    choices = sorted_choices(response)
    return choices[0] if choices else None


def prompt_tokens(response: Mapping[str, Any]) -> int | None:
    """``usage.prompt_tokens`` when the server sent it as an integer."""
    return token_counts(response).get("prompt_tokens")


# -- logprobs ------------------------------------------------------------------------------------


def _list_or_none(value: Any, where: str) -> list[Any] | None:
    if value is None or isinstance(value, list):
        return value
    if isinstance(value, tuple):
        return list(value)
    raise ValueError(f"{where} must be a list or null; got {type(value).__name__}")


def _padded(values: list[Any] | None, length: int) -> list[Any]:
    if values is None:
        return [None] * length
    if len(values) == length:
        return values
    return list(values) + [None] * (length - len(values))


def parse_logprobs(logprobs: Mapping[str, Any], where: str = "logprobs") -> LogprobColumns:
    """The four columns of a choice's logprobs object, either shape (see the module docstring).

    Values are passed through as sent (a null stays None); lists are not copied when they already
    line up, which keeps a million-token response cheap.
    """
    tokens = _list_or_none(logprobs.get("tokens"), f"{where}.tokens")
    token_logprobs = _list_or_none(logprobs.get("token_logprobs"), f"{where}.token_logprobs")
    tops = _list_or_none(logprobs.get("top_logprobs"), f"{where}.top_logprobs")
    offsets = _list_or_none(logprobs.get("text_offset"), f"{where}.text_offset")
    if tokens is None and token_logprobs is None and tops is None and offsets is None:
        content = _list_or_none(logprobs.get("content"), f"{where}.content")
        if content is None:
            return [], [], [], None
        return _parse_chat_content(content, f"{where}.content")
    length = max(len(part) for part in (tokens, token_logprobs, tops, offsets) if part is not None)
    return (
        _padded(tokens, length),
        _padded(token_logprobs, length),
        _padded(tops, length),
        None if offsets is None else _padded(offsets, length),
    )


def chat_token(entry: Mapping[str, Any]) -> Any:
    """A chat-shaped entry's token, read from its ``bytes`` where the ``token`` string does not
    hold them whole: a part of a UTF-8 character shown as U+FFFD, as nothing, or as ``\\xNN``
    escapes (OpenAI's chat). Bytes that are not whole UTF-8 become OpenAI's ``bytes:\\xNN``
    form, which the frames and `visible_token` read."""
    token = entry.get("token")
    if isinstance(token, str) and token and not _MAY_LACK_BYTES.search(token):
        return token
    raw = entry.get("bytes")
    if not isinstance(raw, list) or not raw:
        return token
    try:
        data = bytes(raw)
    except (TypeError, ValueError):
        return token
    return bytes_token(data)


#: What a token string shows where it may have lost bytes (see `chat_token`).
_MAY_LACK_BYTES = re.compile(r"\ufffd|\\x[0-9a-fA-F]{2}")


def read_chat_tokens(entries: list[Any], tokens: list[Any]) -> list[Any]:
    """``tokens`` (the ``token`` of each chat-shaped entry), with those that may have lost bytes
    read again by `chat_token`. One scan of them all finds which: usually none."""
    try:
        joined = "".join(tokens)
    except TypeError:  # a null or non-string token
        return [chat_token(entry) for entry in entries]
    found = [match.start() for match in _MAY_LACK_BYTES.finditer(joined)]
    if not found and all(tokens):  # all strings here: falsy is "" (faster than `"" in`)
        return tokens
    lengths = list(map(len, tokens))
    ends = list(accumulate(lengths))
    suspects = {bisect_right(ends, start) for start in found}
    suspects.update(i for i, length in enumerate(lengths) if not length)
    tokens = list(tokens)
    for i in suspects:
        tokens[i] = chat_token(entries[i])
    return tokens


def _parse_chat_content(content: list[Any], where: str) -> LogprobColumns:
    if not set(map(type, content)) <= {dict}:  # the usual case checked at C speed
        for i, entry in enumerate(content):
            if not isinstance(entry, Mapping):
                raise ValueError(
                    f"{where}[{i}] must be an object with token and logprob; "
                    f"got {type(entry).__name__}"
                )
    try:  # every entry has all three (what servers send): read at C speed
        tokens = list(map(_TOKEN, content))
        logprobs = list(map(_LOGPROB, content))
        tops = list(map(_TOP_LOGPROBS, content))
    except KeyError:
        tokens = [e.get("token") for e in content]
        logprobs = [e.get("logprob") for e in content]
        tops = [e.get("top_logprobs") for e in content]
    return read_chat_tokens(content, tokens), logprobs, tops, None


_TOKEN = itemgetter("token")
_LOGPROB = itemgetter("logprob")
_TOP_LOGPROBS = itemgetter("top_logprobs")


def top_items(entry: Any) -> list[tuple[Any, Any]]:
    """``(token, logprob)`` pairs of one position's top_logprobs entry, in the server's order.

    The entry is a dict ``{token: logprob}`` (Completions), a list of ``{"token", "logprob"}``
    objects (chat shape: duplicate tokens kept apart), or null (no pairs).
    """
    if entry is None:
        return []
    if isinstance(entry, Mapping):
        return list(entry.items())
    if isinstance(entry, list | tuple):
        pairs = []
        for item in entry:
            if not isinstance(item, Mapping):
                raise ValueError(
                    "top_logprobs list entries must be objects with token and "
                    f"logprob; got {type(item).__name__}: {item!r}"
                )
            pairs.append((chat_token(item), item.get("logprob")))
        return pairs
    raise ValueError(
        "each top_logprobs entry must be an object {token: logprob}, a list of "
        f"{{token, logprob}} objects, or null; got {type(entry).__name__}: {entry!r}"
    )


def bytes_token(raw: bytes) -> str:
    """A token's string from its bytes: the text when it is whole UTF-8, else OpenAI's
    ``bytes:`` form, each byte outside printable ASCII (and the backslash) as ``\\xNN``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(
            chr(b) if 0x20 <= b < 0x7F and b != 0x5C else f"\\x{b:02x}" for b in raw
        )


def token_bytes(token: str) -> bytes:
    """The bytes a token string stands for (`bytes_token`'s inverse for ``bytes:`` tokens)."""
    if token.startswith("bytes:"):
        try:
            return token[6:].encode("latin-1").decode("unicode_escape").encode("latin-1")
        except (UnicodeError, ValueError):  # not the bytes: form after all: the text itself
            pass
    return token.encode("utf-8", "surrogatepass")


# -- streams --------------------------------------------------------------------------------------


class FinishedChoices:
    """Which choices of a stream have sent their ``finish_reason``: a stream that ends without
    ``[DONE]`` is complete only if every choice it started has finished."""

    __slots__ = ("_finished",)

    def __init__(self) -> None:
        self._finished: dict[int, bool] = {}

    def add(self, chunk: Mapping[str, Any]) -> None:
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, Mapping):
                index = choice_index(choice)
                finished = choice.get("finish_reason") is not None
                self._finished[index] = self._finished.get(index, False) or finished

    @property
    def unfinished(self) -> bool:
        """True when no choice was seen or some choice has no finish_reason yet."""
        return not self._finished or not all(self._finished.values())

    @property
    def cut(self) -> list[int]:
        """The indexes of the choices seen that have no finish_reason (in index order)."""
        return sorted(index for index, done in self._finished.items() if not done)


# -- the Responses API ----------------------------------------------------------------------------

#: Responses API status -> the finish_reason a chat completion would give.
_FINISH = {"completed": "stop", "incomplete": "length"}


def _output_texts(body: Mapping[str, Any]) -> tuple[str | None, list[Any], str | None, bool]:
    """(text, logprob entries, refusal, has logprobs) of a Responses answer's message outputs."""
    texts: list[str] = []
    entries: list[Any] = []
    refusals: list[str] = []
    has_logprobs = False
    output = body.get("output")
    for item in output if isinstance(output, list) else ():
        if not isinstance(item, Mapping) or item.get("type") != "message":
            continue  # reasoning items, tool calls
        content = item.get("content")
        for part in content if isinstance(content, list) else ():
            if not isinstance(part, Mapping):
                continue
            if part.get("type") == "output_text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
                logprobs = part.get("logprobs")
                if isinstance(logprobs, list):
                    has_logprobs = True
                    entries.extend(logprobs)
            elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
                refusals.append(part["refusal"])
    text = "".join(texts) if texts or not refusals else None
    return text, entries, "".join(refusals) if refusals else None, has_logprobs


def responses_as_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses API answer (``output[].content[]`` of type ``output_text``, with
    ``logprobs``) read as a chat completion (one choice; usage renamed), so that one code path
    makes the frames, and ``Completion.text`` and ``.usage`` work alike for all three APIs."""
    text, entries, refusal, has_logprobs = _output_texts(body)
    status = body.get("status")
    details = body.get("incomplete_details")
    reason = details.get("reason") if isinstance(details, Mapping) else None
    finish = "length" if reason == "max_output_tokens" else _FINISH.get(str(status), status)
    usage = body.get("usage")
    counts: dict[str, Any] | None = None
    if isinstance(usage, Mapping):
        counts = {
            "prompt_tokens": usage.get("input_tokens"),
            "completion_tokens": usage.get("output_tokens"),
            "total_tokens": usage.get("total_tokens"),
        }
    return {
        "id": body.get("id"),
        "object": "chat.completion",
        "created": body.get("created_at"),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": refusal},
                "logprobs": {"content": entries, "refusal": None} if has_logprobs else None,
                "finish_reason": finish,
            }
        ],
        "usage": counts,
    }
