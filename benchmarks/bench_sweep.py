"""Sweep speed and memory, side by side with a plain `openai.AsyncOpenAI` + `asyncio.gather`.

Run: ``python benchmarks/bench_sweep.py`` (``--requests 2000`` for a quick look).

A local uvicorn server (a subprocess on 127.0.0.1) answers every ``POST /v1/completions`` with the
same canned completion, so what is measured is the client side. In one run it measures:

1. wall time of ``nbcompletions.sweep`` (10 prompts x 10 temperatures x repeats = N requests, with
   the SQLite cache written as responses arrive) against ``asyncio.gather`` of
   ``AsyncOpenAI.completions.create`` calls bounded by a semaphore at the same concurrency;
2. re-running the same sweep from the cache (nothing is sent);
3. building the sweep's frames (done lazily, on first access of ``result.choices``);
4. tracemalloc peak while sweeping 1/4, 1/2 and all of N requests (no cache), to show growth is
   linear in the number of requests.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import socket
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from nbcompletions import Client, SweepResult

CANNED = json.dumps(
    {
        "id": "cmpl-canned",
        "object": "text_completion",
        "created": 1700000000,
        "model": "canned-model",
        "choices": [
            {
                "text": " the quick brown fox jumps over the lazy dog",
                "index": 0,
                "logprobs": None,
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14},
    }
).encode()
MODELS = json.dumps(
    {"object": "list", "data": [{"id": "canned-model", "object": "model"}]}
).encode()


async def canned_app(
    scope: dict[str, Any],
    receive: Callable[[], Awaitable[dict[str, Any]]],
    send: Callable[[dict[str, Any]], Awaitable[None]],
) -> None:
    """The smallest ASGI app that speaks enough of the protocol: canned answers, no parsing."""
    if scope["type"] != "http":
        return
    more = True
    while more:  # drain the body so the connection can be reused
        message = await receive()
        more = message.get("more_body", False)
    body = MODELS if scope["path"].endswith("/models") else CANNED
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(canned_app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{base}/v1/models", timeout=1.0)
            return proc, f"{base}/v1"
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("the canned server did not start")


def grid(requests: int) -> tuple[list[str], list[float], int]:
    prompts = [f"Prompt number {i}:" for i in range(10)]
    temperatures = [round(0.2 * i, 1) for i in range(10)]
    repeats = max(1, requests // (len(prompts) * len(temperatures)))
    return prompts, temperatures, repeats


async def openai_gather(base_url: str, requests: int, concurrency: int) -> float:
    from openai import AsyncOpenAI

    prompts, temperatures, repeats = grid(requests)
    client = AsyncOpenAI(base_url=base_url, api_key="sk-bench", max_retries=2)
    limit = asyncio.Semaphore(concurrency)

    async def one(prompt: str, temperature: float) -> object:
        async with limit:
            return await client.completions.create(
                model="canned-model", prompt=prompt, temperature=temperature, max_tokens=16
            )

    started = time.perf_counter()
    results = await asyncio.gather(
        *(one(p, t) for p in prompts for t in temperatures for _ in range(repeats))
    )
    elapsed = time.perf_counter() - started
    assert len(results) == len(prompts) * len(temperatures) * repeats
    await client.close()
    return elapsed


def ours(
    client: Client, requests: int, concurrency: int, cache: Path | None
) -> tuple[float, SweepResult]:
    from nbcompletions import sweep

    prompts, temperatures, repeats = grid(requests)
    started = time.perf_counter()
    result = sweep(
        client,
        prompt=prompts,
        temperature=temperatures,
        max_tokens=16,
        repeats=repeats,
        cache=cache,
        max_concurrency=concurrency,
        progress=False,
        probe=False,
    )
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return

    from nbcompletions import Client

    n, conc = args.requests, args.concurrency
    proc, base_url = start_server()
    tmp = Path(tempfile.mkdtemp(prefix="bench_sweep_"))
    try:
        client = Client(base_url, api_key="sk-bench", model="canned-model", max_concurrency=conc)
        # Warm both paths up (imports, connection pools) so neither pays first-use costs below.
        ours(client, 200, conc, None)
        asyncio.run(openai_gather(base_url, 200, conc))

        print(f"{n:,} requests at concurrency {conc} against a canned local server")
        theirs_all, ours_all = [], []
        for round_number in range(args.rounds):
            # Alternating rounds, each side timed in every round: a shared, busy machine drifts.
            theirs_s = asyncio.run(openai_gather(base_url, n, conc))
            cache_path = tmp / f"cache{round_number}.sqlite"
            ours_s, result = ours(client, n, conc, cache_path)
            assert result.usage["sent"] == n, result.usage
            theirs_all.append(theirs_s)
            ours_all.append(ours_s)
            print(
                f"  round {round_number + 1}: openai.AsyncOpenAI + asyncio.gather "
                f"{theirs_s:7.2f} s | nbcompletions.sweep (cache written) {ours_s:7.2f} s"
                f" | ratio {ours_s / theirs_s:5.2f}"
            )
        best_ratio = min(ours_all) / min(theirs_all)
        print(f"  ratio of best times ours / openai   : {best_ratio:7.2f}  (target <= 1)")
        rerun_s, again = ours(client, n, conc, cache_path)
        assert again.usage["sent"] == 0, again.usage
        started = time.perf_counter()
        choices = result.choices
        frames_s = time.perf_counter() - started
        assert len(choices) == n
        print(f"  re-run from the cache (0 sent)      : {rerun_s:7.2f} s  (target < 2 s)")
        print(f"  building result.choices (lazy)      : {frames_s:7.2f} s")

        del result, again, choices
        print("memory: tracemalloc peak during a sweep (no cache)")
        peaks = []
        for size in (n // 4, n // 2, n):
            gc.collect()
            tracemalloc.start()
            _, kept = ours(client, size, conc, None)
            _ = kept.choices
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del kept, _
            peaks.append((size, peak))
            print(
                f"  {size:>7,} requests: peak {peak / 2**20:7.1f} MiB "
                f"({peak / size / 1024:5.1f} KiB per request)"
            )
        (small, small_peak), (big, big_peak) = peaks[0], peaks[-1]
        print(
            f"  growth ratio peak({big:,}) / peak({small:,}) = {big_peak / small_peak:.2f} "
            f"for {big / small:.0f}x the requests (linear: ~{big / small:.0f})"
        )
        client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)


if __name__ == "__main__":
    main()
