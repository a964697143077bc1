"""Typed seams: what scoring, sweeps and widgets need from a client.

They depend on these Protocols, not on `_client`, so the layers import one way and a test (or
another client) can stand in for `AsyncClient` by having the same members. The conformance check
(`nbcompletions._conformance`) takes them too: `_client` imports it, so it cannot import `_client`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

from ._request import CompletionRequest, Limits

__all__ = [
    "AsyncCompletionsClient",
    "CompletionResult",
    "HasAsyncClient",
    "PieceStream",
    "StreamedPiece",
    "as_async",
]


class CompletionResult(Protocol):
    """One answered request (`Completion` is one): the response body as sent."""

    @property
    def raw(self) -> dict[str, Any]: ...


class StreamedPiece(Protocol):
    """One choice's piece of a streamed completion (`StreamChunk` is one)."""

    @property
    def text(self) -> str: ...

    @property
    def finish_reason(self) -> str | None: ...


class PieceStream(Protocol):
    """A streamed completion (`AsyncStream` is one): its pieces, and hanging up early."""

    def __aiter__(self) -> AsyncIterator[StreamedPiece]: ...

    async def aclose(self) -> None: ...


class AsyncCompletionsClient(Protocol):
    """The async client that scoring and sweeps talk to (`AsyncClient` is one)."""

    @property
    def async_client(self) -> AsyncCompletionsClient: ...

    @property
    def endpoint(self) -> str: ...

    @property
    def model(self) -> str | None: ...

    @property
    def limits(self) -> Limits: ...

    @property
    def vocab_size(self) -> int | None: ...

    @property
    def max_concurrency(self) -> int | None: ...

    async def complete_request(
        self, request: CompletionRequest, *, path: str = "complete"
    ) -> CompletionResult: ...

    def stream_request(
        self, request: CompletionRequest, *, path: str = "stream"
    ) -> PieceStream: ...

    # The same, sent exactly as they are: what the conformance probes send.
    async def complete_as_is(self, request: CompletionRequest) -> CompletionResult: ...

    def stream_as_is(self, request: CompletionRequest) -> PieceStream: ...

    async def models(self) -> list[str]: ...

    # Any request's JSON answer through the retry loop (`AsyncClient.request`): the conformance
    # check reads the whole ``GET /models`` card (context length, vocabulary size), which
    # `models` reduces to ids.
    async def request(self, method: str, path: str, *, json: Any = None) -> Any: ...


class HasAsyncClient(Protocol):
    """A `Client` or an `AsyncClient`: either answers ``.async_client``."""

    @property
    def async_client(self) -> AsyncCompletionsClient: ...


def as_async(client: HasAsyncClient) -> AsyncCompletionsClient:
    """The async client behind ``client`` (an `AsyncClient` is its own)."""
    try:
        return client.async_client
    except AttributeError:
        raise TypeError(
            f"expected an nbcompletions Client or AsyncClient; got {type(client).__name__}"
        ) from None
