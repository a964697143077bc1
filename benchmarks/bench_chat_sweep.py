"""A chat sweep next to the same completions sweep on our server, side by side in one run.

Run: ``python benchmarks/bench_chat_sweep.py`` (2,000 requests per sweep; ``--requests 200`` for a
quick look on a busy machine).

Both sweeps go through `nbcompletions.sweep` (grid, validation, workers, and the frames, built on
first access and timed with the sweep), the real client
and our server's app in-process (``StreamingASGITransport``), with no cache and no probe:

1. ``sweep(client, messages=CONVERSATIONS, seed=range(k), max_completion_tokens=T, logprobs=True,
   top_logprobs=5)``: ``POST /v1/chat/completions``;
2. ``sweep(client, prompt=[render_chat(c) for c in CONVERSATIONS], seed=range(k), max_tokens=T,
   logprobs=5)``: ``POST /v1/completions`` with the same rendered prompts, so the model does the
   same work.

Each request has its own seed (no two are the same request). The rounds alternate (completions,
chat, completions, ...) so a busy machine slows both alike; the ratio of the medians is what a chat
sweep adds. Both wall time and process CPU time (every thread of this process: the client, the
server and the engine run in it) are shown; on a shared machine the CPU time is the steadier of
the two. Issue 17's target: at most 1.1x.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

from nbcompletions import Client, sweep
from nbcompletions.model import MODEL_ID, load_engine, render_chat
from nbcompletions.server import StreamingASGITransport, create_app

CONVERSATIONS = [
    [{"role": "user", "content": "Who art thou?"}],
    [
        {"role": "system", "content": "Thou art a player."},
        {"role": "user", "content": "What news from the court?"},
    ],
    [
        {"role": "user", "content": "Good morrow."},
        {"role": "assistant", "content": "Good morrow, my lord."},
        {"role": "user", "content": "How fares the king?"},
    ],
    [{"role": "user", "content": "Speak of love."}],
]


def _grids(requests: int, max_tokens: int) -> dict[str, dict[str, Any]]:
    seeds = range(max(1, requests // len(CONVERSATIONS)))
    return {
        "completions": {
            "prompt": [render_chat(conversation) for conversation in CONVERSATIONS],
            "seed": seeds,
            "max_tokens": max_tokens,
            "logprobs": 5,
        },
        "chat": {
            "messages": CONVERSATIONS,
            "seed": seeds,
            "max_completion_tokens": max_tokens,
            "logprobs": True,
            "top_logprobs": 5,
        },
    }


def main(requests: int, concurrency: int, max_tokens: int, rounds: int) -> None:
    app = create_app(load_engine())
    client = Client(
        "http://embedded/v1",
        model=MODEL_ID,
        transport=StreamingASGITransport(app),
        max_concurrency=concurrency,
        timeout=600,
    )
    grids = _grids(requests, max_tokens)
    times: dict[str, list[float]] = {kind: [] for kind in grids}
    cpu: dict[str, list[float]] = {kind: [] for kind in grids}
    rows: dict[str, int] = {}
    common: dict[str, Any] = {"progress": False, "probe": False, "manifest": False}
    with client:
        sweep(client, **{**grids["chat"], "seed": [0, 1]}, **common)  # warm up both paths
        sweep(client, **{**grids["completions"], "seed": [0, 1]}, **common)
        for _ in range(rounds):
            for kind, grid in grids.items():
                started, cpu_started = time.perf_counter(), time.process_time()
                result = sweep(client, **grid, **common)
                rows[kind] = len(result.tokens)  # the frames are built on first access
                times[kind].append(time.perf_counter() - started)
                cpu[kind].append(time.process_time() - cpu_started)
                if result.n_failed:
                    raise SystemExit(f"{kind}: {result.n_failed} requests failed")
    count = len(grids["chat"]["seed"]) * len(CONVERSATIONS)
    base = statistics.median(times["completions"])
    cpu_base = statistics.median(cpu["completions"])
    print(
        f"{count} requests per sweep x {rounds} rounds, {concurrency} at once, "
        f"max_tokens={max_tokens}, 5 logprobs (medians; token rows: {rows})"
    )
    for kind in grids:
        median = statistics.median(times[kind])
        print(
            f"  {kind:12s} {median:7.2f} s  {count / median:7.1f} req/s  "
            f"ratio to completions {median / base:5.2f}x  (rounds: "
            + ", ".join(f"{t:.2f}" for t in times[kind])
            + f")  CPU {statistics.median(cpu[kind]):6.2f} s, "
            f"ratio {statistics.median(cpu[kind]) / cpu_base:5.2f}x"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    main(args.requests, args.concurrency, args.max_tokens, args.rounds)
