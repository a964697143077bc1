"""Typed seams: what scoring, sweeps and widgets need from a client.

They depend on these Protocols, not on `_client`, so the layers import one way and a test (or
another client) can stand in for `AsyncClient` by having the same members.
"""

from __future__ import annotations

from typing import Any, Protocol

from ._request import CompletionRequest, Limits

__all__ = [
    "AsyncCompletionsClient",
    "CompletionResult",
    "HasAsyncClient",
    "as_async",
]


class CompletionResult(Protocol):
    """One answered request (`Completion` is one): the response body as sent."""

    @property
    def raw(self) -> dict[str, Any]: ...


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

    async def complete_request(self, request: CompletionRequest) -> CompletionResult: ...

    async def models(self) -> list[str]: ...


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
