"""Reading a large Batch output file: peak memory of the whole-body read against the line stream.

    python benchmarks/bench_batch_output.py [--mb 300]

Writes a Batch output file of about ``--mb`` megabytes (completions of 256 tokens), serves it from
disk through the client's transport in 64 KiB pieces, and reads it into a fresh response cache
twice, each in its own process so that each peak RSS is its own (about 3 minutes at 300 MB):

- ``whole``: how the client read it before: the whole body in memory, split into lines, every
  line's result kept until all are stored (`read_batch_results` on the body's bytes);
- ``stream``: how it reads now: `iter_batch_output`, one line at a time, stored in chunks.

Prints each peak RSS and their ratio. The results a sweep keeps in memory (``SweepResult`` without
``results=``) are on top of either; this measures reading the file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx

PIECE = 64 * 1024


def write_output(path: Path, megabytes: int) -> int:
    """A Batch output file of about ``megabytes``; its line count."""
    # A long completion without logprobs (max_tokens=256): mostly text, as many sweeps ask.
    body = {
        "id": "cmpl-x",
        "object": "text_completion",
        "created": 1,
        "model": "nbc-shakespeare",
        "choices": [
            {"index": 0, "text": " the" * 256, "finish_reason": "length", "logprobs": None}
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 256, "total_tokens": 261},
    }
    template = {"id": "batch_req", "custom_id": "", "response": {"status_code": 200, "body": body}}
    line_bytes = len(json.dumps(template)) + 1
    lines = megabytes * 1_000_000 // line_bytes
    with path.open("w") as handle:
        for i in range(lines):
            template["custom_id"] = f"req-{i:08d}"
            handle.write(json.dumps(template) + "\n")
    return lines


class FileBody(httpx.AsyncByteStream):
    def __init__(self, path: Path) -> None:
        self.path = path

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with self.path.open("rb") as handle:
            while piece := handle.read(PIECE):
                yield piece


def read(mode: str, output: Path, cache_path: Path) -> None:
    """One reading, in this process; prints ``<peak RSS MB> <lines> <seconds>``."""
    from nbcompletions import AsyncClient, Cache
    from nbcompletions._batch import iter_batch_output, read_batch_results

    def serve(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, stream=FileBody(output))

    async def main() -> int:
        transport = httpx.MockTransport(serve)
        cache = Cache(cache_path)
        stored = 0
        async with AsyncClient("http://batch/v1", model="m", transport=transport) as aclient:
            if mode == "whole":
                async with aclient.open("GET", "/files/out/content") as body:
                    data = b"".join([piece async for piece in body.aiter_bytes()])
                results = read_batch_results(data)
                for key, line in results.items():
                    if line.response is not None:
                        cache.put(key, line.response)
                        stored += 1
            else:
                chunk: list[tuple[str, dict[str, object], float | None, bytes | None]] = []
                async for key, line in iter_batch_output(aclient, "out"):
                    if line.response is not None:
                        chunk.append((key, line.response, None, None))
                        stored += 1
                    if len(chunk) >= 500:
                        cache.put_many(chunk)
                        chunk.clear()
                cache.put_many(chunk)
        cache.close()
        return stored

    started = time.perf_counter()
    stored = asyncio.run(main())
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"{peak_mb:.0f} {stored} {seconds:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=300)
    parser.add_argument("--mode", choices=["whole", "stream"], help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        read(args.mode, args.output, args.cache)
        return
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "output.jsonl"
        lines = write_output(output, args.mb)
        size = output.stat().st_size / 1e6
        print(f"output file: {size:.0f} MB, {lines} lines")
        peaks = {}
        for mode in ("whole", "stream"):
            cache = Path(tmp) / f"{mode}.sqlite"
            command = [sys.executable, __file__, "--mode", mode, "--output", str(output)]
            done = subprocess.run(
                [*command, "--cache", str(cache)], capture_output=True, text=True, check=True
            )
            peak, stored, seconds = done.stdout.split()
            peaks[mode] = float(peak)
            print(f"{mode:>6}: peak RSS {peak} MB, {stored} responses stored in {seconds} s")
        print(f"stream / whole peak RSS: {peaks['stream'] / peaks['whole']:.2f}x")


if __name__ == "__main__":
    main()
