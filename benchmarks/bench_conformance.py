"""What ``conformance()`` costs against a real server: the first check after the server starts,
then warm ones (issue 16's target against vLLM CPU: 25 requests or fewer, under 3 s).

Run: ``python benchmarks/bench_conformance.py [--server vllm] [--rounds 3] [--baseline DIR]
[--first ours|baseline] [--url URL]``

The server is started as the tests start it (``scripts/servers_table.py``'s ``running``: vLLM's CPU
build from ``NBC_VLLM_PYTHON`` or the peer cache, llama-cpp-python from ``NBC_LLAMACPP_PYTHON``,
llama-server from ``NBC_LLAMASERVER_BIN``, or ``nbcompletions serve``); when it is not installed
the benchmark says so and exits 0. Each side (this checkout, and with ``--baseline DIR`` another
checkout such as main) runs in its own worker process with one client kept open, as a notebook
keeps one. The ``--first`` side checks first, right after start-up (vLLM compiles its logprobs
kernel on the first request that asks for logprobs, so only one side can see that); then the sides
take turns, ``--rounds`` warm checks each (``conformance(refresh=True)``: measured again, the model
card already read). Printed: requests and seconds of every check, and whether both sides reached
the same verdict on every check.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVERS = ("vllm", "nbcompletions", "llama-cpp-python", "llama-server")
MODEL = "nbc-shakespeare"

# One JSON line in per check; one JSON line out: requests, seconds, each check's status.
_WORKER = """
import json, sys
from nbcompletions import Client
with Client(sys.argv[1], model=sys.argv[2], max_retries=0) as client:
    print(json.dumps({"ready": True}), flush=True)
    for _ in sys.stdin:
        report = client.conformance(refresh=True)
        statuses = {name: c.status for name, c in report.checks.items()}
        errors = {name: c.detail for name, c in report.checks.items() if c.status == "error"}
        print(json.dumps({"requests": report.requests, "seconds": report.seconds,
                          "statuses": statuses, "errors": errors,
                          "profile": report.profile_name}), flush=True)
"""


class Worker:
    """A checkout's nbcompletions in its own process, checking one endpoint when asked."""

    def __init__(self, tree: Path, base_url: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.process = subprocess.Popen(
            [sys.executable, "-c", _WORKER, base_url, MODEL],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tree,
        )
        self.read()  # ready

    def read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the worker exited ({self.process.wait()})")
        found: dict[str, Any] = json.loads(line)
        return found

    def check(self) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


def run(server: str, rounds: int, trees: dict[str, Path], first: str) -> int:
    sys.path.insert(0, str(ROOT / "scripts"))
    from servers_table import running

    with tempfile.TemporaryDirectory(prefix="bench-conformance-") as tmp:
        try:
            server_running = running(server, Path(tmp))
            base_url = server_running.__enter__()
        except SystemExit as missing:  # servers_table: the peer is not installed here
            print(f"bench_conformance: skipped, {server} is not installed ({missing})")
            return 0
        try:
            results = measure(base_url, rounds, trees, first)
        finally:
            server_running.__exit__(None, None, None)
    report(server, results, first)
    return 0


def measure(
    base_url: str, rounds: int, trees: dict[str, Path], first: str
) -> dict[str, list[dict[str, Any]]]:
    """``first``'s check, then ``rounds`` checks per side taking turns; each side's results."""
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in trees}
    workers = {side: Worker(tree, base_url) for side, tree in trees.items()}
    order = [first, *(side for side in trees if side != first)]
    results[first].append(workers[first].check())  # the first check after start-up
    for _ in range(rounds):
        for side in order:
            results[side].append(workers[side].check())
    for worker in workers.values():
        worker.close()
    return results


def report(server: str, results: dict[str, list[dict[str, Any]]], first: str) -> None:
    print(f"conformance() against {server} (first check right after start-up: {first})")
    for side, runs in results.items():
        cells = [f"{r['requests']} req {r['seconds']:.2f} s" for r in runs]
        if side == first:
            cells[0] = "FIRST " + cells[0]
        warm = [r["seconds"] for r in runs[1:] if side == first] or [r["seconds"] for r in runs]
        print(
            f"  {side:9s} "
            + " | ".join(cells)
            + f"  (warm median {sorted(warm)[len(warm) // 2]:.2f} s)"
        )
    verdicts = {side: [run["statuses"] for run in runs] for side, runs in results.items()}
    if len(verdicts) == 2:
        ours, other = verdicts.values()
        differ = {
            k: (sorted({run.get(k) for run in ours}), sorted({run.get(k) for run in other}))
            for k in {*ours[0], *other[0]}
            if {run.get(k) for run in ours} != {run.get(k) for run in other}
        }
        print("  verdicts: " + ("identical on every check" if not differ else f"DIFFER {differ}"))
    for side, runs in results.items():
        print(f"  {side} profile {runs[-1]['profile']}: {runs[-1]['statuses']}")
        for number, run in enumerate(runs):
            for name, detail in run["errors"].items():  # a probe that failed proves nothing
                print(f"  {side} check {number + 1}: {name} error: {detail}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", choices=SERVERS, default="vllm")
    parser.add_argument("--rounds", type=int, default=3, help="warm checks per side")
    parser.add_argument("--baseline", type=Path, help="another checkout to compare (e.g. main)")
    parser.add_argument("--first", choices=("ours", "baseline"), default="ours")
    parser.add_argument("--url", help="check a server already running (its base URL, .../v1)")
    args = parser.parse_args()
    trees = {"ours": ROOT}
    if args.baseline is not None:
        trees["baseline"] = args.baseline.resolve()
    if args.first not in trees:
        parser.error("--first baseline needs --baseline DIR")
    if args.url is not None:  # a server already running: its first check may be long past
        report(args.url, measure(args.url, args.rounds, trees, args.first), args.first)
        return 0
    return run(args.server, args.rounds, trees, args.first)


if __name__ == "__main__":
    raise SystemExit(main())
