"""Streaming: a server-sent-events parser, the pieces a stream yields, and merging them back.

The parser follows the SSE specification rather than assuming ``data: {json}\\n\\n``: it takes
bytes in chunks split anywhere (even inside a UTF-8 sequence or between ``\\r`` and ``\\n``),
accepts LF, CRLF and CR line ends, skips ``:`` comment lines (llama.cpp's keep-alive pings), joins
multi-line ``data:`` fields with ``\\n``, and ignores ``event:``/``id:``/``retry:``. We wrote it
instead of depending on ``httpx-sse``, which dispatches nothing at a truncated end and is one more
dependency for some 80 lines; every case above is tested against arbitrary splits.

`merge_chunks` turns chunk objects back into one response shaped like a non-streamed one.
"""

from __future__ import annotations

import codecs
import dataclasses
import re
from collections.abc import (
    AsyncIterable,
    AsyncIterator,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Mapping,
)
from typing import TYPE_CHECKING, Any

from ._errors import APIError
from ._parse import FinishedChoices, choice_index, choice_text, loads
from ._retry import error_from_body

if TYPE_CHECKING:  # pragma: no cover
    from ._chat import ChatRequest
    from ._completion import Completion
    from ._request import CompletionRequest

__all__ = [
    "AsyncStream",
    "SSEDecoder",
    "ServerSentEvent",
    "Stream",
    "StreamChunk",
    "StreamMerger",
    "aiter_chunks",
    "chunk_pieces",
    "decode_event",
    "merge_chunks",
]

_EOL = re.compile(r"\r\n|\r|\n")
_LOGPROB_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@dataclasses.dataclass(frozen=True)
class ServerSentEvent:
    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Incremental SSE parser: ``feed(bytes)`` returns the events completed so far, ``close()`` the
    rest.

    At the end of the stream a last event without its blank line is still dispatched (the spec
    would drop it): servers that forget the final blank line then still work, and a stream cut
    inside a JSON object surfaces as an unparseable event, which the caller reports as broken.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._buffer = ""
        self._data: list[str] = []
        self._event = ""
        self._id: str | None = None
        self._started = False

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        return self._process(self._decoder.decode(chunk), final=False)

    def close(self) -> list[ServerSentEvent]:
        events = self._process(self._decoder.decode(b"", final=True), final=True)
        if self._buffer:
            events.extend(self._line(self._buffer))
            self._buffer = ""
        if self._data:
            events.append(self._dispatch())
        return events

    @property
    def pending(self) -> bool:
        """True when bytes of an unfinished event are buffered."""
        return bool(self._buffer or self._data)

    def _process(self, text: str, *, final: bool) -> list[ServerSentEvent]:
        if not self._started and text:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        buffer = self._buffer + text
        events: list[ServerSentEvent] = []
        start = 0
        end = len(buffer)
        for match in _EOL.finditer(buffer):
            if match.end() == end and match.group() == "\r" and not final:
                break  # may be the first half of a CRLF split across chunks
            events.extend(self._line(buffer[start : match.start()]))
            start = match.end()
        self._buffer = buffer[start:]
        return events

    def _line(self, line: str) -> list[ServerSentEvent]:
        if not line:
            return [self._dispatch()] if self._data else self._reset()
        if line.startswith(":"):
            return []
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id" and "\0" not in value:
            self._id = value or None
        return []

    def _reset(self) -> list[ServerSentEvent]:
        self._event = ""
        return []

    def _dispatch(self) -> ServerSentEvent:
        event = ServerSentEvent("\n".join(self._data), self._event or "message", self._id)
        self._data = []
        self._event = ""
        return event


def iter_events(chunks: Iterable[bytes]) -> Iterator[ServerSentEvent]:
    """Every event in a byte stream given as chunks (for tests and offline replay)."""
    decoder = SSEDecoder()
    for chunk in chunks:
        yield from decoder.feed(chunk)
    yield from decoder.close()


DONE = object()


def decode_event(event: ServerSentEvent) -> dict[str, Any] | object:
    """The chunk object an event carries, `DONE` for ``[DONE]``; `APIError` for error events."""
    data = event.data
    if data.strip() == "[DONE]":
        return DONE
    try:
        obj = loads(data)
    except ValueError:
        raise APIError(
            f"the stream carried an event that is not JSON (the stream may have been "
            f"cut off): {data[:200]!r}",
            type="invalid_response",
            body=data,
        ) from None
    if not isinstance(obj, dict):
        raise APIError(
            f"the stream carried a JSON event that is not an object: {data[:200]!r}",
            type="invalid_response",
            body=obj,
        )
    if "error" in obj or obj.get("object") == "error" or event.event == "error":
        raise error_from_body(obj, default_message="the server reported an error during the stream")
    return obj


async def aiter_chunks(data: AsyncIterable[bytes]) -> AsyncIterator[dict[str, Any]]:
    """The chunk objects of a streamed response body, up to ``[DONE]``.

    A body that ends without ``[DONE]`` is complete only when every choice it started has
    finished (some servers omit it); otherwise the connection was cut and this raises `APIError`
    with ``type="stream_broken"``. A ``[DONE]`` that comes while a choice it started has no
    ``finish_reason`` raises `APIError` with ``type="stream_unfinished"`` after the last chunk
    (llama-cpp-python 0.3.36 cuts concurrent streams so: one token, then ``[DONE]``); a choice
    without ``finish_reason`` is a cut choice, never a finished one. Error events raise the
    server's `APIError`.
    """
    decoder = SSEDecoder()
    finished = FinishedChoices()
    pieces = aiter(data)
    ended = False
    while not ended:
        try:
            events = decoder.feed(await anext(pieces))
        except StopAsyncIteration:
            events = decoder.close()
            ended = True
        for event in events:
            chunk = decode_event(event)
            if chunk is DONE:
                if finished.cut:
                    raise _unfinished(finished.cut)
                return
            assert isinstance(chunk, dict)
            finished.add(chunk)
            yield chunk
    if finished.unfinished:
        raise APIError(
            "the stream ended before [DONE] with unfinished choices (the connection was "
            "probably cut)",
            type="stream_broken",
        )


def _unfinished(cut: list[int]) -> APIError:
    shown = ", ".join(map(str, cut[:10])) + (", ..." if len(cut) > 10 else "")
    return APIError(
        f"the stream ended ([DONE]) before choice(s) {shown} had a finish_reason: the server "
        "cut them short (llama-cpp-python does under concurrent streams); send the request "
        "again, or with stream=False",
        type="stream_unfinished",
    )


@dataclasses.dataclass(frozen=True)
class StreamChunk:
    """One choice's piece of a streamed completion: ``text`` is the delta for choice ``index``."""

    index: int
    text: str
    raw: Mapping[str, Any] = dataclasses.field(repr=False)
    finish_reason: str | None = None
    logprobs: Any = dataclasses.field(default=None, repr=False)


def chunk_pieces(chunk: Mapping[str, Any]) -> list[StreamChunk]:
    """The `StreamChunk` of every choice in one chunk object (none for the usage-only chunk)."""
    choices = chunk.get("choices") or []
    return [
        StreamChunk(
            choice_index(c), choice_text(c) or "", chunk, c.get("finish_reason"), c.get("logprobs")
        )
        for c in choices
        if isinstance(c, Mapping)
    ]


class _ChoiceAccumulator:
    __slots__ = ("finish_reason", "logprobs", "refusal", "role", "text")

    def __init__(self) -> None:
        self.text: list[str] = []
        self.finish_reason: str | None = None
        self.logprobs: dict[str, list[Any]] | None = None
        self.role: str | None = None  # a chat delta's role, once sent
        self.refusal: list[str] | None = None  # a chat delta's refusal pieces

    def add_delta(self, choice: Mapping[str, Any]) -> None:
        """What a chat chunk's ``delta`` adds besides the text: the role and refusal pieces."""
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            return
        role = delta.get("role")
        if isinstance(role, str) and self.role is None:
            self.role = role
        refusal = delta.get("refusal")
        if isinstance(refusal, str):
            self.refusal = [*(self.refusal or []), refusal]

    def add_logprobs(self, logprobs: Any) -> None:
        if not isinstance(logprobs, Mapping):
            return
        if self.logprobs is None:
            self.logprobs = {}
        acc = self.logprobs
        if not any(k in logprobs for k in _LOGPROB_LISTS) and (
            "content" in logprobs or "refusal" in logprobs
        ):
            for key in ("content", "refusal"):
                part = logprobs.get(key)
                if isinstance(part, list):
                    acc.setdefault(key, []).extend(part)
            return
        tokens = logprobs.get("tokens")
        count = len(tokens) if isinstance(tokens, list) else 0
        filled = len(acc.get("tokens", []))
        for key in _LOGPROB_LISTS:
            value = logprobs.get(key)
            if isinstance(value, list):
                # Lists shorter than the chunk's tokens, or missing from earlier chunks, are padded
                # with null so that position i means the same token in every list.
                target = acc.setdefault(key, [None] * (filled if key != "tokens" else 0))
                target.extend(value)
                if key != "tokens" and len(value) < count:
                    target.extend([None] * (count - len(value)))
            elif key in acc:
                acc[key].extend([None] * count)

    def result(self, index: int, chat: bool) -> dict[str, Any]:
        if chat:  # shaped like a non-streamed chat choice
            message = {
                "role": self.role or "assistant",
                "content": "".join(self.text) if self.text or self.refusal is None else None,
                "refusal": None if self.refusal is None else "".join(self.refusal),
            }
            return {
                "index": index,
                "message": message,
                "logprobs": self.logprobs,
                "finish_reason": self.finish_reason,
            }
        return {
            "text": "".join(self.text),
            "index": index,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason,
        }


class StreamMerger:
    """Accumulates chunk objects into one response shaped like a non-streamed one."""

    def __init__(self) -> None:
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _ChoiceAccumulator] = {}
        self.usage: dict[str, Any] | None = None
        self.done = False
        self.chat = False  # chunks of the Chat Completions API (object chat.completion.chunk)

    def add(self, chunk: Mapping[str, Any]) -> list[StreamChunk]:
        for key in ("id", "created", "model", "system_fingerprint"):
            if key not in self._head and chunk.get(key) is not None:
                self._head[key] = chunk[key]
        usage = chunk.get("usage")
        if isinstance(usage, Mapping):
            self.usage = dict(usage)
        chat = self.chat = self.chat or chunk.get("object") == "chat.completion.chunk"
        pieces = chunk_pieces(chunk)
        for piece in pieces:
            acc = self._choices.get(piece.index)
            if acc is None:
                acc = self._choices[piece.index] = _ChoiceAccumulator()
            acc.text.append(piece.text)
            acc.add_logprobs(piece.logprobs)
            if piece.finish_reason is not None:
                acc.finish_reason = piece.finish_reason
        if chat:
            choices = chunk.get("choices")
            for choice in choices if isinstance(choices, list) else ():
                if isinstance(choice, Mapping):
                    self._choices[choice_index(choice)].add_delta(choice)
        return pieces

    def result(self) -> dict[str, Any]:
        response: dict[str, Any] = {
            "id": self._head.get("id"),
            "object": "chat.completion" if self.chat else "text_completion",
            "created": self._head.get("created"),
            "model": self._head.get("model"),
        }
        if "system_fingerprint" in self._head:
            response["system_fingerprint"] = self._head["system_fingerprint"]
        response["choices"] = [self._choices[i].result(i, self.chat) for i in sorted(self._choices)]
        response["usage"] = self.usage
        return response


def merge_chunks(chunks: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One response from a sequence of chunk objects (choices merged by index)."""
    merger = StreamMerger()
    for chunk in chunks:
        merger.add(chunk)
    return merger.result()


class AsyncStream:
    """A streamed completion, iterated with ``async for``: yields `StreamChunk` pieces.

    After (or instead of) iterating, ``await stream.completion()`` gives the merged `Completion`;
    ``stream.usage`` holds the include_usage chunk's usage once it arrived. Close it (``aclose`` or
    ``async with``) when leaving early, to release the connection.
    """

    def __init__(
        self,
        chunks: AsyncIterator[dict[str, Any]],
        request: CompletionRequest | ChatRequest | None,
        *,
        vocab_size: int | Callable[[], int | None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._merger = StreamMerger()
        self._pending: list[StreamChunk] = []
        self.request = request
        self.vocab_size = vocab_size

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._merger.usage

    @property
    def done(self) -> bool:
        return self._merger.done

    def __aiter__(self) -> AsyncStream:
        return self

    async def __anext__(self) -> StreamChunk:
        while not self._pending:
            if self._merger.done:
                raise StopAsyncIteration
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                self._merger.done = True
                raise
            self._pending.extend(self._merger.add(chunk))
        return self._pending.pop(0)

    async def completion(self) -> Completion:
        """Read whatever is left and return the merged `Completion`."""
        from ._completion import Completion

        async for _ in self:
            pass
        vocab_size = self.vocab_size() if callable(self.vocab_size) else self.vocab_size
        return Completion(self._merger.result(), self.request, vocab_size=vocab_size)

    async def aclose(self) -> None:
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:
            await aclose()

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<AsyncStream {'done' if self.done else 'open'}>"


class Stream:
    """The synchronous twin of `AsyncStream`: a plain iterator of `StreamChunk` pieces."""

    def __init__(self, stream: AsyncStream) -> None:
        from ._loop import iter_sync

        self._stream = stream
        self._iterator: Generator[StreamChunk, None, None] = iter_sync(stream)

    @property
    def usage(self) -> dict[str, Any] | None:
        return self._stream.usage

    @property
    def request(self) -> CompletionRequest | ChatRequest | None:
        return self._stream.request

    @property
    def done(self) -> bool:
        return self._stream.done

    def __iter__(self) -> Stream:
        return self

    def __next__(self) -> StreamChunk:
        return next(self._iterator)

    def completion(self) -> Completion:
        """Read whatever is left and return the merged `Completion`."""
        from ._loop import run_sync

        return run_sync(self._stream.completion())

    def close(self) -> None:
        from ._loop import run_sync

        self._iterator.close()
        run_sync(self._stream.aclose())

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Stream {'done' if self.done else 'open'}>"
