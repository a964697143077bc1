"""What the server adds on top of the embedded engine, side by side in one run.

Run: ``python benchmarks/bench_server.py`` (``--repeats 5 --max-tokens 16`` for a quick look).

In one run, for the same greedy request (``--max-tokens`` tokens, logprobs=5):

1. wall time per request calling ``engine.complete`` directly, through the app in-process
   (``httpx.ASGITransport``), and over HTTP to a real ``nbcompletions serve`` subprocess on
   127.0.0.1; the ratios to the direct call are the server's overhead;
2. time to the first streamed event against the whole stream, in-process through httpx's
   ``ASGITransport`` (which buffers the body), through ``StreamingASGITransport``, and over HTTP;
3. a cheap request (``GET /v1/models``) answered while a long completion is running over HTTP:
   its latency next to the long request's, to show the event loop is not blocked.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from nbcompletions import CompletionRequest
from nbcompletions.model import load_engine
from nbcompletions.server import StreamingASGITransport, create_app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbcompletions",
            "serve",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
        ]
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nbcompletions serve did not start")


async def _median_s(func: Callable[[], Awaitable[Any]], repeats: int) -> float:
    await func()  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        await func()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


async def _first_and_total(
    client: httpx.AsyncClient, url: str, body: dict[str, Any]
) -> tuple[float, float]:
    started = time.perf_counter()
    first = None
    async with client.stream("POST", url, json={**body, "stream": True}) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and first is None:
                first = time.perf_counter() - started
    assert first is not None
    return first, time.perf_counter() - started


async def main(repeats: int, max_tokens: int) -> None:
    engine = load_engine()
    body = {
        "model": engine.model_id,
        "prompt": "To be, or not to be",
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 5,
    }
    request = CompletionRequest.from_body(body)
    proc, base = _start_server()
    try:
        app = create_app(engine)
        buffered = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x")
        streaming = httpx.AsyncClient(transport=StreamingASGITransport(app), base_url="http://x")
        http = httpx.AsyncClient(base_url=base, timeout=120)

        async def direct() -> Any:
            return await asyncio.to_thread(engine.complete, request)

        def post(client: httpx.AsyncClient) -> Callable[[], Awaitable[Any]]:
            async def run() -> Any:
                response = await client.post("/v1/completions", json=body)
                response.raise_for_status()
                return response

            return run

        print(f"1. one request, {max_tokens} tokens, logprobs=5: median of {repeats}")
        base_s = await _median_s(direct, repeats)
        print(f"   engine.complete directly      {base_s * 1000:8.1f} ms  1.00x")
        for name, client in (("in-process (ASGITransport)", buffered), ("HTTP (uvicorn)", http)):
            took = await _median_s(post(client), repeats)
            print(f"   {name:30s}{took * 1000:8.1f} ms  {took / base_s:.2f}x")

        print("2. streaming: first event / whole stream (median of each)")
        for name, client in (
            ("in-process, httpx ASGITransport", buffered),
            ("in-process, StreamingASGITransport", streaming),
            ("HTTP (uvicorn)", http),
        ):
            await _first_and_total(client, "/v1/completions", body)
            runs = [await _first_and_total(client, "/v1/completions", body) for _ in range(repeats)]
            first = statistics.median(r[0] for r in runs)
            total = statistics.median(r[1] for r in runs)
            print(
                f"   {name:36s} first {first * 1000:8.1f} ms  total {total * 1000:8.1f} ms  "
                f"first/total {first / total:.2f}"
            )

        print("3. GET /v1/models while a long completion runs over HTTP")
        long_body = {**body, "max_tokens": max(4 * max_tokens, 64), "logprobs": None}

        async def long_request() -> float:
            started = time.perf_counter()
            (await http.post("/v1/completions", json=long_body)).raise_for_status()
            return time.perf_counter() - started

        async def models_soon_after() -> float:
            await asyncio.sleep(0.05)
            started = time.perf_counter()
            (await http.get("/v1/models")).raise_for_status()
            return time.perf_counter() - started

        long_s, models_s = await asyncio.gather(long_request(), models_soon_after())
        print(
            f"   long completion {long_s * 1000:8.1f} ms; /v1/models during it "
            f"{models_s * 1000:6.1f} ms  ratio {models_s / long_s:.3f}"
        )
        for client in (buffered, streaming, http):
            await client.aclose()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.repeats, args.max_tokens))
