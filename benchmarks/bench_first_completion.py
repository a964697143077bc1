"""A fresh process's first embedded completion: how long until it prints something, and until done.

    python benchmarks/bench_first_completion.py [--runs 1]

Each measurement is a new Python process running the README's quick start
(``Client(embedded=True).complete(...)``), timed from the moment its imports are done (it prints
``ready``) to its first line of output (stdout or stderr: the compile notice, or the text) and to
its exit. Three settings, side by side:

- ``numpy``: numba blocked (``sys.modules["numba"] = None``), as without the ``fast`` extra;
- ``numba, cold``: numba with an empty cache folder (``NUMBA_CACHE_DIR``): the first process on a
  machine, which compiles the decode step;
- ``numba, cached``: numba again with that folder, now filled: every later process.

Target (issue 20): first output within 2 s in every setting.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import sys
if {block!r}:
    sys.modules["numba"] = None
import nbcompletions as nbc
print("ready", flush=True)
client = nbc.Client(embedded=True)
done = client.complete("To be, or not to be", max_tokens=24, logprobs=5, seed=1)
print(repr(done.text), flush=True)
"""


def _measure(block_numba: bool, cache_dir: str) -> tuple[float, float, str]:
    """(seconds to first output, seconds to done, first line), timed from ``ready``."""
    env = {**os.environ, "NUMBA_CACHE_DIR": cache_dir, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, "-u", "-c", CHILD.format(block=block_numba)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert child.stdout is not None
    with child:
        line = child.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(
                f"the child failed before its completion: {line}{child.stdout.read()}"
            )
        ready = time.perf_counter()
        first_line = child.stdout.readline()
        first = time.perf_counter() - ready
        rest = child.stdout.read()
        child.wait()
        done = time.perf_counter() - ready
    if child.returncode != 0:
        raise RuntimeError(f"the child failed: {first_line}{rest}")
    return first, done, first_line.strip()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1, help="measurements per setting (best kept)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nbc-numba-cache-") as cache:
        settings = [("numpy (no numba)", True, False), ("numba, cold cache", False, True)]
        settings.append(("numba, cached", False, False))
        for name, block, cold in settings:
            best: tuple[float, float, str] | None = None
            for _ in range(args.runs):
                if cold:  # every cold run starts from an empty cache folder
                    for item in Path(cache).rglob("*"):
                        if item.is_file():
                            item.unlink()
                result = _measure(block, cache)
                best = result if best is None or result[1] < best[1] else best
            assert best is not None
            rows.append((name, *best))
    print(f"{'setting':<20} {'first output s':>14} {'done s':>8}  first line")
    for name, first, done, line in rows:
        print(f"{name:<20} {first:>14.2f} {done:>8.2f}  {line[:70]}")
    numpy_done = rows[0][2]
    print(
        f"done, numba cold / numpy: {rows[1][2] / numpy_done:.2f}x; "
        f"numba cached / numpy: {rows[2][2] / numpy_done:.2f}x"
    )
    worst_first = max(first for _, first, _, _ in rows)
    print(f"target: first output within 2 s in every setting: worst {worst_first:.2f} s")


if __name__ == "__main__":
    main()
