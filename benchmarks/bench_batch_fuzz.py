"""The Batch API fuzzer at scale: 5,000 fuzzed input files (tests/batch_fuzz.py) through upload,
create, wait and download on the in-process app; counts every outcome. Target: 0 responses and 0
lines with status 500 (an AssertionError stops the run at the first).

Run: ``python benchmarks/bench_batch_fuzz.py`` (``--files 500`` for a quick look).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from batch_fuzz import run_files

from nbcompletions.model import load_engine
from nbcompletions.server import StreamingASGITransport, create_app


async def main(files: int, seed: int, compat: str) -> None:
    app = create_app(load_engine(), compat=compat)
    start = time.perf_counter()
    async with httpx.AsyncClient(
        transport=StreamingASGITransport(app), base_url="http://embedded", timeout=300
    ) as http:
        outcomes = await run_files(http, files, seed=seed, concurrency=32)
    took = time.perf_counter() - start
    print(f"{outcomes['files']} fuzzed batch files ({compat}, seed {seed}) in {took:.0f} s")
    for key, count in sorted(outcomes.items()):
        if key != "files":
            print(f"  {key:28} {count}")
    fives = sum(count for key, count in outcomes.items() if "500" in key)
    print(f"responses or lines with status 500: {fives}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--compat", choices=["openai", "vllm"], default="vllm")
    options = parser.parse_args()
    asyncio.run(main(options.files, options.seed, options.compat))
