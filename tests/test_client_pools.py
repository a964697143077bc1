"""The client's connection pools against a real HTTP server on 127.0.0.1: one pool per request in
flight, connections kept alive and reused, requests built as httpx builds them, cookies kept."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from nbcompletions import AsyncClient

BODY = json.dumps(
    {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"text": "ok", "index": 0, "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()


class Server:
    """Canned completions over HTTP/1.1 keep-alive; records connections and request heads.
    ``cookie`` is set (Set-Cookie) on the first response."""

    def __init__(self, cookie: str | None = None, delay: float = 0.0) -> None:
        self.cookie = cookie
        self.delay = delay
        self.connections = 0
        self.heads: list[bytes] = []
        self.server: asyncio.AbstractServer | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                await asyncio.sleep(self.delay)
                extra = b""
                if self.cookie is not None and len(self.heads) == 1:
                    extra = b"set-cookie: " + self.cookie.encode() + b"; Path=/\r\n"
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    + extra
                    + b"content-length: "
                    + str(len(BODY)).encode()
                    + b"\r\n\r\n"
                    + BODY
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/v1"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


def header(head: bytes, name: str) -> str | None:
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == name.encode():
            return value.strip().decode()
    return None


def test_requests_in_flight_each_keep_one_connection_alive() -> None:
    """8 in flight for 64 requests: 8 connections, each reused (none opened per request)."""
    server = Server(delay=0.005)

    async def run() -> int:
        async with server as url:
            client = AsyncClient(url, api_key="sk-test", model="m", max_concurrency=8)
            results = await asyncio.gather(*(client.complete("x", max_tokens=1) for _ in range(64)))
            await client.close()
            return len(results)

    assert asyncio.run(run()) == 64
    assert len(server.heads) == 64
    assert server.connections == 8


def test_a_pool_serves_one_request_at_a_time() -> None:
    async def run() -> None:
        client = AsyncClient("http://127.0.0.1:9/v1", api_key="sk-test", model="m")
        state = client._state()
        first, second = state.take(), state.take()
        assert first is not second  # both in flight: a pool each
        state.give_back(first)
        assert state.take() is first  # the warm one is handed out again
        state.give_back(first)
        state.give_back(second)
        await client.close()

    asyncio.run(run())


@pytest.mark.slow
def test_without_a_concurrency_limit_requests_share_a_few_pools() -> None:
    """Unlimited: a pool per request would keep as many connections as the most ever in flight."""
    server = Server(delay=0.005)

    async def run() -> tuple[int, int]:
        async with server as url:
            client = AsyncClient(url, api_key="sk-test", model="m", max_concurrency=None)
            await asyncio.gather(*(client.complete("x", max_tokens=1) for _ in range(100)))
            pools = len(client._state().https)
            await client.close()
            return pools, len(server.heads)

    pools, answered = asyncio.run(run())
    assert answered == 100
    assert pools == 8  # 64 connections' worth, 8 to a pool, made up front and shared


def test_requests_are_built_as_httpx_builds_them() -> None:
    url = "http://127.0.0.1:9/v1/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test", "X-A": "1"}

    async def run() -> list[tuple[httpx.Request, httpx.Request]]:
        client = AsyncClient("http://127.0.0.1:9/v1", api_key="sk-test", model="m", timeout=7)
        state = client._state()
        http = state.take()
        pairs = []
        for content in (b'{"a":1}', b'{"b":22}', None):  # the second and third reuse the parts
            method = "POST" if content is not None else "GET"
            ours = state.build(http, method, url, content, headers)
            theirs = http.build_request(method, url, content=content, headers=headers)
            pairs.append((ours, theirs))
        await client.close()
        return pairs

    for ours, theirs in asyncio.run(run()):
        assert ours.method == theirs.method
        assert ours.url == theirs.url
        assert ours.headers.multi_items() == theirs.headers.multi_items()
        assert ours.extensions == theirs.extensions
        assert ours.read() == theirs.read()


def test_a_cookie_the_server_sets_is_sent_back_from_every_pool() -> None:
    server = Server(cookie="session=abc123", delay=0.005)

    async def run() -> None:
        async with server as url:
            client = AsyncClient(url, api_key="sk-test", model="m", max_concurrency=4)
            await client.complete("x", max_tokens=1)
            # Four in flight at once: four pools, one jar.
            await asyncio.gather(*(client.complete("x", max_tokens=1) for _ in range(4)))
            await client.close()

    asyncio.run(run())
    assert server.connections == 4
    cookies: list[Any] = [header(head, "cookie") for head in server.heads]
    assert cookies == [None] + ["session=abc123"] * 4
