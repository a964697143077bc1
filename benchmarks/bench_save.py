"""Saving a streamed sweep (``results=dir``) with ``SweepResult.to_parquet``: memory and time of
the row-group merge, side by side with loading the frames and writing them from pandas.

Run: ``python benchmarks/bench_save.py`` (20,000 requests; ``--requests 5000`` for a quick look).

The study is made once by a real ``sweep(..., results=dir)`` against the canned server of
``benchmarks/bench_scale.py`` (16 tokens, logprobs 5 per request: about 16 token rows and 80
alternative rows per request). Then each way of saving runs in its own subprocess, so each peak
RSS (``resource.getrusage``) is its own:

1. streamed: ``load_sweep(dir).to_parquet(out)``: the parts are merged into one file per frame,
   a row group at a time (`nbcompletions.sweeps.dataset.write_frame_file`);
2. loaded: the same after reading the frames (``result.frames(); result.requests``), which is
   what ``to_parquet`` did for a streamed result before.

Printed: peak RSS, its growth above the process's peak before saving (imports and the lazy
result), pyarrow's peak allocation, seconds, and the ratios loaded / streamed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def save_one(study: Path, out: Path, mode: str) -> dict[str, Any]:
    """Save ``study`` to ``out`` in this process (a child of main); returns its figures."""
    import pandas  # noqa: F401  # imported before the baseline: both ways need them
    import pyarrow as pa
    import pyarrow.compute
    import pyarrow.dataset
    import pyarrow.parquet

    from nbcompletions import load_sweep

    result = load_sweep(study)
    before_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if mode == "loaded":
        result.frames()
        _ = result.requests
    result.to_parquet(out)
    seconds = time.perf_counter() - started
    rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "rss_mib": rss_mib,
        "growth_mib": rss_mib - before_mib,
        "arrow_peak_mib": pa.default_memory_pool().max_memory() / 2**20,
        "out_mib": sum(f.stat().st_size for f in out.iterdir()) / 2**20,
    }


def _child(code: str, *args: str) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(HERE.parent)}
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE), *args],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    figures: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    import bench_scale

    port = bench_scale.free_port()
    server = subprocess.Popen([sys.executable, str(HERE / "bench_scale.py"), "--serve", str(port)])
    workdir = Path(tempfile.mkdtemp(prefix="bench_save_"))
    try:
        time.sleep(1.0)
        swept = _child(
            "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_scale as b; "
            "from pathlib import Path; print(json.dumps(b.run_one(sys.argv[2], int(sys.argv[3]), "
            "'stream', Path(sys.argv[4]), int(sys.argv[5]))))",
            f"http://127.0.0.1:{port}/v1",
            str(args.requests),
            str(workdir),
            str(args.concurrency),
        )
        study = workdir / "study"
        parts = len(list((study / "tokens").glob("part-*.parquet")))
        print(
            f"study: {swept['requests']:,} requests streamed to {parts} parts per frame, "
            f"{swept['disk_mib']:.1f} MiB on disk with the cache"
        )
        figures = {}
        for mode in ("streamed", "loaded"):
            figures[mode] = _child(
                "import json, sys; sys.path.insert(0, sys.argv[1]); import bench_save as b; "
                "from pathlib import Path; "
                "print(json.dumps(b.save_one(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])))",
                str(study),
                str(workdir / f"saved-{mode}"),
                mode,
            )
            f = figures[mode]
            print(
                f"  {mode:<9} peak RSS {f['rss_mib']:7.1f} MiB (+{f['growth_mib']:6.1f} saving), "
                f"pyarrow peak {f['arrow_peak_mib']:6.1f} MiB, {f['seconds']:5.1f} s, "
                f"{f['out_mib']:.1f} MiB written"
            )
        streamed, loaded = figures["streamed"], figures["loaded"]
        print(
            f"  loaded / streamed: peak RSS {loaded['rss_mib'] / streamed['rss_mib']:.2f}x, "
            f"growth {loaded['growth_mib'] / max(streamed['growth_mib'], 1.0):.1f}x, "
            f"pyarrow peak {loaded['arrow_peak_mib'] / max(streamed['arrow_peak_mib'], 1e-3):.1f}x"
            f", time {loaded['seconds'] / streamed['seconds']:.2f}x"
        )
    finally:
        server.terminate()
        server.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
