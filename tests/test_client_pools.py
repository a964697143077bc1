"""The client's connections against a real HTTP server on 127.0.0.1: one per request in flight,
kept alive and reused, requests built as httpx builds them and sent as built, cookies kept."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

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


def test_the_request_on_the_wire_is_the_one_httpx_built() -> None:
    """aiohttp sends the headers httpx made, each once, and adds none of its own."""
    server = Server()

    async def run() -> None:
        async with server as url:
            client = AsyncClient(url, api_key="sk-test", model="m", max_concurrency=2)
            await client.complete("x", max_tokens=1)
            await client.close()

    asyncio.run(run())
    [head] = server.heads
    lines = head.split(b"\r\n")
    assert lines[0] == b"POST /v1/completions HTTP/1.1"
    names = [line.partition(b":")[0].strip().lower() for line in lines[1:] if line]
    assert len(names) == len(set(names)), names
    assert header(head, "authorization") == "Bearer sk-test"
    assert header(head, "content-type") == "application/json"
    assert (header(head, "user-agent") or "").startswith("nbcompletions/")
    assert int(header(head, "content-length") or 0) > 0


def test_without_a_concurrency_limit_connections_are_kept_and_reused() -> None:
    """Unlimited: as many connections as requests were in flight at once, then reused."""
    server = Server(delay=0.005)

    async def run() -> int:
        async with server as url:
            client = AsyncClient(url, api_key="sk-test", model="m", max_concurrency=None)
            await asyncio.gather(*(client.complete("x", max_tokens=1) for _ in range(20)))
            for _ in range(5):
                await client.complete("x", max_tokens=1)
            await client.close()
            return len(server.heads)

    assert asyncio.run(run()) == 25
    assert server.connections == 20


def test_requests_are_built_as_httpx_builds_them() -> None:
    url = "http://127.0.0.1:9/v1/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer sk-test", "X-A": "1"}

    async def run() -> list[tuple[httpx.Request, httpx.Request]]:
        client = AsyncClient("http://127.0.0.1:9/v1", api_key="sk-test", model="m", timeout=7)
        state = client._state()
        http = state.http
        pairs = []
        for content in (b'{"a":1}', b'{"b":22}', None):  # the second and third reuse the parts
            method = "POST" if content is not None else "GET"
            ours = state.build(method, url, content, headers)
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


def test_a_cookie_the_server_sets_is_sent_back_on_every_connection() -> None:
    server = Server(cookie="session=abc123", delay=0.005)

    async def run() -> None:
        async with server as url:
            client = AsyncClient(url, api_key="sk-test", model="m", max_concurrency=4)
            await client.complete("x", max_tokens=1)
            # Four in flight at once: four connections, one jar.
            await asyncio.gather(*(client.complete("x", max_tokens=1) for _ in range(4)))
            await client.close()

    asyncio.run(run())
    assert server.connections == 4
    cookies: list[Any] = [header(head, "cookie") for head in server.heads]
    assert cookies == [None] + ["session=abc123"] * 4
