"""A Batch sweep against the same live sweep, on the embedded model in-process.

    python benchmarks/bench_batch.py [--requests 200]

Prints the wall time of each and their ratio (batch / live). Both send the same grid (temperature 0,
distinct seeds, so no request repeats), without a cache or probe, one after the other.
"""

from __future__ import annotations

import argparse
import time

import nbcompletions as nbc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    grid = {
        "prompt": {"hamlet": "To be, or not", "king": "My lord,"},
        "temperature": 0,
        "max_tokens": args.max_tokens,
        "logprobs": 5,
        "seed": list(range(args.requests // 2)),
    }
    client = nbc.Client()
    nbc.sweep(client, **{**grid, "seed": [0]}, progress=False, probe=False)  # load the model
    timings = {}
    for name, batch in (("live", False), ("batch", True)):
        started = time.perf_counter()
        result = nbc.sweep(client, **grid, batch=batch, progress=False, probe=False)
        timings[name] = time.perf_counter() - started
        assert result.n_failed == 0, result.requests["error"].dropna().head()
        print(
            f"{name:>5}: {len(result)} requests in {timings[name]:.2f} s "
            f"({len(result) / timings[name]:.0f} req/s)"
        )
    print(f"batch / live: {timings['batch'] / timings['live']:.2f}x")


if __name__ == "__main__":
    main()
