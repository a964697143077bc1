"""Issue 16 case 6: frames take the vocabulary size (and the governing code the context length)
from ``GET /models``, read once per client and model before the first request that needs it.

Through our real server (its card says ``vocab_size`` 4096 and ``max_model_len`` 256), recorded
on the way; MockTransport only to make the card fail; and against llama-cpp-python, whose card says
neither.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from nbcompletions import AsyncClient
from nbcompletions._model_card import known_limits, needs_limits
from nbcompletions.server import StreamingASGITransport

MODEL = "nbc-shakespeare"


def _recorded(app: Any, paths: list[str], *, card_status: int | None = None) -> Any:
    real = StreamingASGITransport(app)

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(f"{request.method} {request.url.path}")
        if card_status is not None and request.method == "GET":
            return httpx.Response(card_status, json={"error": {"message": "no such route"}})
        return await real.handle_async_request(request)

    return httpx.MockTransport(handler)


async def test_concurrent_first_requests_read_the_card_once(app: Any) -> None:
    paths: list[str] = []
    client = AsyncClient("http://other.test/v1", model=MODEL, transport=_recorded(app, paths))
    try:
        assert known_limits(client) is None
        completions = await asyncio.gather(
            *[client.complete(f"To be {i}", max_tokens=1, logprobs=2) for i in range(8)]
        )
        assert {c.tokens.attrs["vocab_size"] for c in completions} == {4096}
        limits = known_limits(client)
        assert limits is not None
        assert (limits.vocab_size, limits.context_length) == (4096, 256)
        assert client.vocab_size == 4096
    finally:
        await client.close()
    assert paths.count("GET /v1/models") == 1
    assert paths.count("POST /v1/completions") == 8


async def test_requests_without_alternatives_read_no_card(app: Any) -> None:
    paths: list[str] = []
    client = AsyncClient("http://other.test/v1", model=MODEL, transport=_recorded(app, paths))
    try:
        await client.complete("To be", max_tokens=1)
        await client.complete("To be", max_tokens=1, logprobs=0)
    finally:
        await client.close()
    assert paths == ["POST /v1/completions"] * 2


async def test_discovery_reads_the_card_it_lists(app: Any) -> None:
    paths: list[str] = []
    client = AsyncClient("http://other.test/v1", transport=_recorded(app, paths))
    try:
        answer = await client.complete("To be", max_tokens=1, logprobs=2)
    finally:
        await client.close()
    assert answer.tokens.attrs["vocab_size"] == 4096
    assert paths == ["GET /v1/models", "POST /v1/completions"]  # one GET serves both


async def test_a_card_that_cannot_be_read_is_not_asked_again(app: Any) -> None:
    paths: list[str] = []
    transport = _recorded(app, paths, card_status=404)
    client = AsyncClient("http://other.test/v1", model=MODEL, transport=transport)
    try:
        first = await client.complete("To be", max_tokens=1, logprobs=2)
        await client.complete("To be", max_tokens=1, logprobs=2, stream=True)
        assert first.tokens.attrs["vocab_size"] == 50257  # nothing known: GPT-2's
        assert known_limits(client) == (None, None)
    finally:
        await client.close()
    assert paths.count("GET /v1/models") == 1


async def test_a_card_that_failed_in_passing_is_asked_again(app: Any) -> None:
    paths: list[str] = []
    real = StreamingASGITransport(app)

    async def handler(request: httpx.Request) -> httpx.Response:
        paths.append(f"{request.method} {request.url.path}")
        if paths.count("GET /v1/models") == 1 and request.method == "GET":
            return httpx.Response(503, json={"error": {"message": "warming up"}})
        return await real.handle_async_request(request)

    transport = httpx.MockTransport(handler)
    client = AsyncClient("http://other.test/v1", model=MODEL, transport=transport)
    try:
        first = await client.complete("To be", max_tokens=1, logprobs=2)
        second = await client.complete("To be", max_tokens=1, logprobs=2)
    finally:
        await client.close()
    assert first.tokens.attrs["vocab_size"] == 50257
    assert second.tokens.attrs["vocab_size"] == 4096
    # one attempt each (no retries of the card); the completions themselves went through
    assert paths == ["GET /v1/models", "POST /v1/completions"] * 2


async def test_without_a_model_the_only_card_listed_is_read(app: Any) -> None:
    from nbcompletions._model_card import read_card

    paths: list[str] = []
    client = AsyncClient("http://other.test/v1", transport=_recorded(app, paths))
    try:
        card = await read_card(client)
        assert card is not None
        assert card["id"] == MODEL
        assert await read_card(client) is card
    finally:
        await client.close()
    assert paths == ["GET /v1/models"]


def test_needs_limits() -> None:
    assert needs_limits(5)
    assert not needs_limits(0)
    assert not needs_limits(None)
    assert not needs_limits(True)


@pytest.mark.slow
def test_llamacpp_card_says_nothing(llamacpp_server: Any) -> None:
    """llama-cpp-python's GET /models has no vocabulary size or context length: the frames keep
    the default until the conformance check identifies the model, and the card is read once."""
    from nbcompletions import Client

    client = Client(llamacpp_server.base_url, model=llamacpp_server.model)
    try:
        client.complete("To be", max_tokens=1, logprobs=2, temperature=0)
        client.complete("To be", max_tokens=1, logprobs=2, temperature=0)
        assert known_limits(client) == (None, None)
    finally:
        client.close()


async def test_limits_follow_the_cards_as_they_are_read_again(app: Any) -> None:
    from nbcompletions._model_card import remember_cards

    client = AsyncClient("http://other.test/v1", model=MODEL, transport=_recorded(app, []))
    try:
        remember_cards(client, [{"id": MODEL, "vocab_size": 100, "max_model_len": 64}])
        assert known_limits(client) == (100, 64)
        assert known_limits(client) == (100, 64)  # parsed once, the same answer
        remember_cards(client, [{"id": MODEL, "vocab_size": 200}])
        assert known_limits(client) == (200, None)
        assert known_limits(client, "another-model") is None
    finally:
        await client.close()
