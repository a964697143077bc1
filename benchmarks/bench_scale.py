"""Memory and speed of big sweeps that stream their results to disk, side by side with today's.

Run: ``python benchmarks/bench_scale.py`` (sizes 20,000 and 200,000; ``--sizes 2000 20000`` for a
quick look; ``--today /path/to/other/checkout`` measures that checkout's in-memory sweep as the
baseline, default: this one's in-memory sweep; ``--old /path/to/older/checkout`` also measures
that checkout's streamed sweep at the smallest size, run for run alternating with this one's).

A raw asyncio HTTP server (a subprocess on 127.0.0.1; it stops itself once idle) answers every
``POST /v1/completions`` with one canned completion of 16 tokens with logprobs 5, so what is
measured is the client side. Each sweep runs in its own subprocess (10 prompts x 10 temperatures x
repeats, concurrency 32, a SQLite cache written as responses arrive) and reports its peak RSS
(``resource.getrusage``) and requests per second:

1. the baseline: a sweep held in memory (today's ``sweep(...)`` without ``results=``), at the
   smallest size, its frames built (``result.tokens``: what the streamed sweep writes as it goes;
   the in-memory sweep builds them lazily, on first access);
2. ``sweep(..., results=dir)`` at every size: the frames go to a Parquet dataset as they arrive.

Targets: peak RSS at the largest size at most 1.2x that at the smallest; streamed requests per
second no less than the baseline's, and (with ``--old``) no less than the older checkout's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent.parent
TOKENS, LOGPROBS = 16, 5


def canned_body() -> bytes:
    tokens = [f" w{i}" for i in range(TOKENS)]
    top = [
        {f" w{i}": -0.1, **{f" a{j}": -1.0 - j for j in range(LOGPROBS - 1)}} for i in range(TOKENS)
    ]
    offsets = [sum(len(t) for t in tokens[:i]) for i in range(TOKENS)]
    return json.dumps(
        {
            "id": "cmpl-canned",
            "object": "text_completion",
            "created": 1700000000,
            "model": "canned-model",
            "choices": [
                {
                    "text": "".join(tokens),
                    "index": 0,
                    "logprobs": {
                        "tokens": tokens,
                        "token_logprobs": [-0.1] * TOKENS,
                        "top_logprobs": top,
                        "text_offset": offsets,
                    },
                    "finish_reason": "length",
                }
            ],
            "usage": {"prompt_tokens": 5, "completion_tokens": TOKENS, "total_tokens": 5 + TOKENS},
        }
    ).encode()


MODELS = json.dumps(
    {"object": "list", "data": [{"id": "canned-model", "object": "model"}]}
).encode()


async def serve(port: int, idle: float, deadline: float) -> None:
    """Canned answers over HTTP/1.1 keep-alive; returns after ``idle`` seconds without a request
    or ``deadline`` seconds in all, so a crashed benchmark never leaves it running."""
    body = canned_body()
    responses = {
        path: b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(data)).encode()
        + b"\r\n\r\n"
        + data
        for path, data in ((b"models", MODELS), (b"completions", body))
    }
    last = time.monotonic()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal last
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                if length:
                    await reader.readexactly(length)
                path = head.split(b" ", 2)[1]
                writer.write(responses[b"models" if path.endswith(b"/models") else b"completions"])
                last = time.monotonic()
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    started = time.monotonic()
    async with server:
        while True:  # polls two clocks: no event to wait on
            if time.monotonic() - last > idle or time.monotonic() - started > deadline:
                break
            await asyncio.sleep(0.5)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def grid(requests: int) -> tuple[list[str], list[float], int]:
    prompts = [f"Prompt number {i}:" for i in range(10)]
    temperatures = [round(0.2 * i, 1) for i in range(10)]
    return prompts, temperatures, max(1, requests // 100)


def run_one(
    base_url: str, requests: int, mode: str, workdir: Path, concurrency: int
) -> dict[str, Any]:
    """One sweep in this process (a child of main); returns its figures."""
    from nbcompletions import Client, sweep

    prompts, temperatures, repeats = grid(requests)
    client = Client(base_url, api_key="sk-bench", model="canned-model", max_concurrency=concurrency)
    options: dict[str, Any] = {"results": workdir / "study"} if mode == "stream" else {}
    started = time.perf_counter()
    cpu_started = time.process_time()
    result = sweep(
        client,
        prompt=prompts,
        temperature=temperatures,
        max_tokens=TOKENS,
        logprobs=LOGPROBS,
        repeats=repeats,
        cache=workdir / "cache.sqlite",
        max_concurrency=concurrency,
        progress=False,
        probe=False,
        **options,
    )
    if mode == "memory":
        _ = result.tokens  # the frames the streamed sweep writes, built as a researcher reads them
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    sent = result.usage["sent"]
    assert sent == len(prompts) * len(temperatures) * repeats, result.usage
    assert result.usage["failed_requests"] == 0, result.usage
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    disk = sum(f.stat().st_size for f in workdir.rglob("*") if f.is_file())
    client.close()
    return {
        "requests": sent,
        "seconds": elapsed,
        "cpu_seconds": cpu,
        "rss_mib": rss_mib,
        "disk_mib": disk / 2**20,
    }


def child(
    base_url: str, requests: int, mode: str, concurrency: int, pythonpath: Path
) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bench_scale_"))
    try:
        env = {**os.environ, "PYTHONPATH": str(pythonpath)}
        code = (
            "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_scale as b; "
            "from pathlib import Path; "
            "print(json.dumps(b.run_one(sys.argv[2], int(sys.argv[3]), sys.argv[4], "
            "Path(sys.argv[5]), int(sys.argv[6]))))"
        )
        out = subprocess.run(
            [
                sys.executable,
                "-c",
                code,
                str(Path(__file__).parent),
                base_url,
                str(requests),
                mode,
                str(workdir),
                str(concurrency),
            ],
            env=env,
            # `python -c` puts the working directory ahead of PYTHONPATH: start outside any
            # checkout, or --today would measure the checkout this is run from.
            cwd=workdir,
            check=True,
            capture_output=True,
            text=True,
        )
        figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return figures
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def compare_old(base_url: str, size: int, concurrency: int, old: Path, rounds: int) -> None:
    """This checkout's streamed sweep against ``old``'s, alternating, best of ``rounds`` each (the
    machine's load moves; alternating exposes both to it alike)."""
    rates: dict[str, list[float]] = {"new": [], "old": []}
    cpu_ms: dict[str, list[float]] = {"new": [], "old": []}  # the client's CPU per request
    rss: dict[str, list[float]] = {"new": [], "old": []}
    for _ in range(rounds):
        for name, where in (("old", old), ("new", HERE)):
            figures = child(base_url, size, "stream", concurrency, where)
            rates[name].append(figures["requests"] / figures["seconds"])
            cpu_ms[name].append(1000 * figures["cpu_seconds"] / figures["requests"])
            rss[name].append(figures["rss_mib"])
    for name in ("old", "new"):
        shown = ", ".join(f"{r:.0f}" for r in rates[name])
        print(
            f"  {name} streamed {size:>8,} requests: req/s {shown} (best {max(rates[name]):.0f}), "
            f"CPU ms/request {', '.join(f'{c:.2f}' for c in cpu_ms[name])}, "
            f"peak RSS {min(rss[name]):.1f} MiB"
        )
    speed = max(rates["new"]) / max(rates["old"])
    print(
        f"  new / old streamed req/s at {size:,} (best of {rounds}) = {speed:.2f}  "
        f"(target >= 1): {'OK' if speed >= 1 else 'MISSED'}"
    )
    # The best of a few runs follows the luckiest round; the median, the typical one (on a shared
    # machine the same tree's runs differ by 10% and more). Both are printed; the target is read
    # from the best, as above.
    median = statistics.median(rates["new"]) / statistics.median(rates["old"])
    print(f"  new / old streamed req/s at {size:,} (median of {rounds}) = {median:.2f}")
    # On a loaded machine wall time follows the load; CPU time per request much less so.
    cpu = min(cpu_ms["old"]) / min(cpu_ms["new"])
    print(f"  old / new client CPU per request at {size:,} (best of {rounds}) = {cpu:.2f}")


def report_sizes(runs: list[dict[str, Any]], base_rate: float) -> float:
    small, big = runs[0], runs[-1]
    ratio: float = big["rss_mib"] / small["rss_mib"]
    print(
        f"  peak RSS {big['requests']:,} / {small['requests']:,} = {ratio:.2f}  "
        f"(target <= 1.2): {'OK' if ratio <= 1.2 else 'MISSED'}"
    )
    speed = (small["requests"] / small["seconds"]) / base_rate
    print(
        f"  streamed / in-memory req/s at {small['requests']:,} = {speed:.2f}  "
        f"(target >= 1): {'OK' if speed >= 1 else 'MISSED'}"
    )
    per_request = big["disk_mib"] * 2**20 / big["requests"]
    million_s = 1_000_000 / (big["requests"] / big["seconds"])
    print(
        f"  extrapolated to 1,000,000 requests at this rate: {million_s / 60:.0f} min, "
        f"{per_request * 1e6 / 2**30:.1f} GiB on disk ({per_request / 1024:.1f} KiB/request)"
    )
    return ratio


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--today", type=Path, default=HERE, help="checkout for the baseline")
    parser.add_argument("--old", type=Path, help="an older checkout to compare streamed speed")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs with --old")
    parser.add_argument(
        "--streamed-only", action="store_true", help="skip the in-memory baseline and the sizes"
    )
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, idle=60, deadline=4 * 3600))
        return

    port = free_port()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        time.sleep(1.0)
        sizes = sorted(args.sizes)
        print(
            f"canned server: {TOKENS} tokens, logprobs {LOGPROBS}; concurrency "
            f"{args.concurrency}; each sweep in its own process, SQLite cache written"
        )
        child(base_url, 500, "stream", args.concurrency, HERE)  # warm the server and disk caches
        if args.old is not None:
            compare_old(base_url, sizes[0], args.concurrency, args.old, args.rounds)
        if args.streamed_only:
            return
        base = child(base_url, sizes[0], "memory", args.concurrency, args.today)
        base_rate = base["requests"] / base["seconds"]
        print(
            f"  baseline, in memory ({args.today}) {base['requests']:>8,} requests: "
            f"{base_rate:7.0f} req/s, peak RSS {base['rss_mib']:7.1f} MiB"
        )
        runs = []
        for size in sizes:
            figures = child(base_url, size, "stream", args.concurrency, HERE)
            rate = figures["requests"] / figures["seconds"]
            runs.append(figures)
            print(
                f"  results=dir (streamed)   {figures['requests']:>8,} requests: "
                f"{rate:7.0f} req/s, peak RSS {figures['rss_mib']:7.1f} MiB, "
                f"{figures['seconds']:7.1f} s, {figures['disk_mib']:7.1f} MiB on disk"
            )
        if not math.isfinite(report_sizes(runs, base_rate)):
            raise SystemExit(1)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
