"""What a chat costs our server next to the same completion, side by side in one run.

Run: ``python benchmarks/bench_server_chat.py`` (``--requests 200`` for a quick look).

In one run, ``--requests`` requests (``--concurrency`` at once, through the app in-process with
``StreamingASGITransport``) of the same work, each a different seed, ``--max-tokens`` tokens and
5 logprobs per token:

1. ``POST /v1/completions`` with ``prompt=render_chat(messages)``;
2. ``POST /v1/chat/completions`` with ``messages`` (top_logprobs=5);
3. ``POST /v1/responses`` with the same conversation as ``input``.

The rounds alternate (completions, chat, responses, completions, ...) so that a busy machine
slows all three alike; the ratios to the completions time are what chat and responses add
(rendering the template, the chat envelope, bytes per token). Issue 17's target for a chat sweep
is at most 1.1x the completions sweep.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import httpx

from nbcompletions.model import MODEL_ID, load_engine, render_chat
from nbcompletions.server import StreamingASGITransport, create_app

MESSAGES = [
    {"role": "system", "content": "Thou art a player."},
    {"role": "user", "content": "Who art thou?"},
]


def _bodies(kind: str, count: int, max_tokens: int) -> list[tuple[str, dict[str, Any]]]:
    if kind == "completions":
        body: dict[str, Any] = {"prompt": render_chat(MESSAGES), "logprobs": 5}
        path = "/v1/completions"
    elif kind == "chat":
        body = {"messages": MESSAGES, "logprobs": True, "top_logprobs": 5}
        path = "/v1/chat/completions"
    else:
        body = {
            "input": MESSAGES,
            "include": ["message.output_text.logprobs"],
            "top_logprobs": 5,
        }
        path = "/v1/responses"
    tokens = "max_output_tokens" if kind == "responses" else "max_tokens"
    seeded = "temperature" if kind == "responses" else "seed"
    return [
        (
            path,
            {
                "model": MODEL_ID,
                tokens: max_tokens,
                # Responses has no seed: a temperature per request keeps the work comparable.
                seeded: (0.5 + i % 50 / 100) if kind == "responses" else i,
                **body,
            },
        )
        for i in range(count)
    ]


async def _round(
    http: httpx.AsyncClient, bodies: list[tuple[str, dict[str, Any]]], concurrency: int
) -> float:
    gate = asyncio.Semaphore(concurrency)

    async def one(path: str, body: dict[str, Any]) -> None:
        async with gate:
            response = await http.post(path, json=body)
            response.raise_for_status()

    started = time.perf_counter()
    await asyncio.gather(*(one(path, body) for path, body in bodies))
    return time.perf_counter() - started


async def main(requests: int, concurrency: int, max_tokens: int, rounds: int) -> None:
    app = create_app(load_engine())
    kinds = ("completions", "chat", "responses")
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=600
    ) as http:
        await _round(http, _bodies("chat", 8, max_tokens), concurrency)  # warm up
        for _ in range(rounds):
            for kind in kinds:
                bodies = _bodies(kind, requests, max_tokens)
                times[kind].append(await _round(http, bodies, concurrency))
    base = statistics.median(times["completions"])
    print(
        f"{requests} requests x {rounds} rounds, {concurrency} at once, "
        f"max_tokens={max_tokens}, 5 logprobs (medians)"
    )
    for kind in kinds:
        median = statistics.median(times[kind])
        print(
            f"  {kind:12s} {median:7.2f} s  {requests / median:7.1f} req/s  "
            f"ratio to completions {median / base:5.2f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.requests, args.concurrency, args.max_tokens, args.rounds))
