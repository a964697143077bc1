"""The server's limits under a hostile or heavy client, measured on real ``nbcompletions serve``
processes (issue 19's targets), this checkout next to another (``--baseline PATH``) in one run.

Run: ``python benchmarks/bench_server_limits.py`` (``--baseline /path/to/old/checkout`` adds the
same measurements on that code; ``--parts sockets,line,rss,rss-distinct`` picks some).

1. ``sockets``: N idle sockets (as many as ``ulimit -n`` allows, up to 20,000; the soft limit is
   raised to the hard one) against a server whose own limit is lower (``--server-fds``, 8192),
   then ``GET /health`` on a new connection: its latency, how many of the idle sockets the server
   closed, and how many are closed once the header timeout has passed; the server's log size.
2. ``line``: a batch file with one 10 MB line uploaded while ``/health`` is asked every 10 ms: the
   upload's answer and the slowest ``/health``; the server's peak RSS.
3. ``rss``: a batch of long prompts under ``--max-memory-mb 128``: the server's RSS fresh, after
   one small request, and at its peak while the batch runs (the process holds about 200 MB
   besides the budget after one request: numba, LLVM, the model, its worker threads).
   ``rss-distinct``: the same with a different prompt on every line (no prefill is shared);
   ``rss-long``: distinct prompts of 213 tokens (with 40 tokens, 253 of the 256 of context);
   ``rss-live``: distinct prompts while 4 clients post live requests like them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
MODEL = "nbc-shakespeare"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serving(
    code: Path, *args: str, fd_limit: int | None = None
) -> Iterator[tuple[str, psutil.Process, Path]]:
    """``nbcompletions serve`` from the checkout ``code``: (base URL, process, log path)."""
    port = _free_port()
    workdir = Path(tempfile.mkdtemp(prefix="bench-limits-"))
    log_path = workdir / "serve.log"
    env = {**os.environ, "PYTHONPATH": str(code), "TMPDIR": str(workdir)}
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nbcompletions", "serve", "--port", str(port), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=code,  # python -m puts the working directory first on the path
            preexec_fn=None if fd_limit is None else lambda: _limit_fds(fd_limit),
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None:
                raise RuntimeError(log_path.read_text()[-2000:])
            with suppress(httpx.TransportError):
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("serve did not start")
            time.sleep(0.2)
        yield base, psutil.Process(proc.pid), log_path
    finally:
        proc.kill()
        proc.wait()


def _limit_fds(count: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))


def _health_ms(base: str, timeout: float = 10.0) -> str:
    start = time.perf_counter()
    try:
        status = httpx.get(f"{base}/health", timeout=timeout).status_code
    except httpx.HTTPError as exc:
        return f"no answer ({type(exc).__name__} after {time.perf_counter() - start:.1f} s)"
    return f"{status} in {(time.perf_counter() - start) * 1000:.0f} ms"


def _wait_idle(process: psutil.Process, limit_s: float = 30.0) -> float:
    """Seconds until the server uses under 10% of a CPU (it may still be accepting)."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit_s:
        with suppress(psutil.Error):
            if process.cpu_percent(interval=0.5) < 10:
                break
    return time.perf_counter() - start


def _closed(sockets: list[socket.socket]) -> int:
    closed = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            closed += sock.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
    return closed


def part_sockets(code: Path, count: int, header_timeout: float, server_fds: int) -> dict[str, Any]:
    args = ["--no-access-log"]
    if code == ROOT:
        args += ["--header-timeout", str(header_timeout)]
    with serving(code, *args, fd_limit=server_fds) as (base, process, log_path):
        host, port = base.removeprefix("http://").split(":")
        sockets: list[socket.socket] = []
        start = time.perf_counter()
        for _ in range(count):
            try:
                sockets.append(socket.create_connection((host, int(port)), timeout=30))
            except OSError:
                break
        opened = time.perf_counter() - start
        first = _health_ms(base)  # queued behind the connections not yet accepted
        settled = _wait_idle(process)
        health = ", ".join(_health_ms(base) for _ in range(3))
        closed_early = _closed(sockets)
        time.sleep(header_timeout + 3)
        closed_later = _closed(sockets)
        health_after = _health_ms(base)
        for sock in sockets:
            sock.close()
        return {
            "idle sockets opened": f"{len(sockets)} in {opened:.1f} s",
            "/health right after the last connect": first,
            "server busy accepting, then idle after": f"{settled:.1f} s",
            "/health with them open (3 asks)": health,
            "closed by the server at once (cap)": closed_early,
            f"closed {header_timeout + 3:g} s later": f"{closed_later} of {len(sockets)}",
            "/health afterwards": health_after,
            "server log": f"{log_path.stat().st_size / 1e6:.2f} MB",
        }


# In its own process: the upload's client in this one holds the GIL while it builds 10 MB, which
# would count as the server's delay.
_POLLER = """
import sys, time, httpx
base, stop = sys.argv[1], sys.argv[2]
import os
times = []
with httpx.Client(timeout=60) as client:
    while not os.path.exists(stop):
        start = time.perf_counter()
        try:
            client.get(base + "/health")
        except httpx.HTTPError:
            pass
        times.append(time.perf_counter() - start)
        time.sleep(0.01)
times.sort()
print(len(times), times[-1], times[int(len(times) * 0.99)], sum(t > 0.1 for t in times))
"""


@contextmanager
def polling_health(base: str) -> Iterator[list[float]]:
    """Ask /health every 10 ms from another process; yields [asks, slowest seconds, 99th
    percentile seconds, asks over 100 ms] once done."""
    stop = Path(tempfile.mkdtemp(prefix="bench-poll-")) / "stop"
    poller = subprocess.Popen(
        [sys.executable, "-c", _POLLER, base, str(stop)], stdout=subprocess.PIPE, text=True
    )
    result: list[float] = []
    try:
        time.sleep(1.0)  # the poller's imports
        yield result
    finally:
        stop.touch()
        out, _ = poller.communicate(timeout=120)
        result += [float(value) for value in out.split()]


def _health_summary(health: list[float]) -> str:
    asks, slowest, p99, slow = health
    return (
        f"{slowest * 1000:.0f} ms over {asks:.0f} asks (99th percentile {p99 * 1000:.0f} ms, "
        f"{slow:.0f} over 100 ms)"
    )


def _peak_rss(process: psutil.Process, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        with suppress(psutil.Error):
            peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.02)


def _upload(base: str, content: bytes, timeout: float = 120) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/files",
        files={"file": ("in.jsonl", content, "application/jsonl")},
        data={"purpose": "batch"},
        timeout=timeout,
    )


def part_line(code: Path) -> dict[str, Any]:
    body = {"model": MODEL, "prompt": "x" * 10_000_000, "max_tokens": 1}
    line = {"custom_id": "big", "method": "POST", "url": "/v1/completions", "body": body}
    content = json.dumps(line).encode() + b"\n"
    with serving(code, "--no-access-log") as (base, process, _):
        with polling_health(base) as idle:
            time.sleep(3)  # the same asks with nothing else to do: the machine's own noise
        uploading = _upload_line_watched(base, process, content)
    return {
        "slowest /health, server idle": _health_summary(idle),
        **uploading,
    }


def _upload_line_watched(base: str, process: psutil.Process, content: bytes) -> dict[str, Any]:
    with polling_health(base) as health:
        stop = threading.Event()
        peak = [process.memory_info().rss]
        watcher = threading.Thread(target=_peak_rss, args=(process, stop, peak))
        watcher.start()
        start = time.perf_counter()
        answer = _upload(base, content)
        took = time.perf_counter() - start
        outcome = answer.json().get("error", {}).get("message", "accepted")[:90]
        if answer.status_code == 200:  # the old server accepts it: run it as a batch too
            file_id = answer.json()["id"]
            created = httpx.post(
                f"{base}/v1/batches",
                json={
                    "input_file_id": file_id,
                    "endpoint": "/v1/completions",
                    "completion_window": "24h",
                },
            ).json()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                card = httpx.get(f"{base}/v1/batches/{created['id']}", timeout=60).json()
                if card["status"] in ("completed", "failed", "expired", "cancelled"):
                    break
                time.sleep(0.2)
            took = time.perf_counter() - start
            outcome += f"; batch {card['status']}"
        time.sleep(0.3)
        stop.set()
        watcher.join()
    return {
        "upload of a 10 MB line": f"{answer.status_code} in {took:.2f} s ({outcome})",
        "slowest /health meanwhile": _health_summary(health),
        "server peak RSS": f"{peak[0] / 2**20:.0f} MiB",
    }


#: The ``rss`` workloads: (repeats of a 13-token line in the prompt, distinct prompts, live
#: requests too).
RSS_WORKLOADS = {
    "rss": (10, False, False),  # one 135-token prompt on every line
    "rss-distinct": (10, True, False),  # a different prompt on every line: no prefill is shared
    "rss-long": (16, True, False),  # distinct prompts of 213 tokens: with 40, 253 of 256
    "rss-live": (10, True, True),  # distinct prompts, and 4 clients' live requests meanwhile
}


def _rss_batch(lines: int, repeats: int, distinct: bool) -> bytes:
    prompt = "To be, or not to be, that is the question. " * repeats
    rows = [
        {
            "custom_id": f"r{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": MODEL,
                "prompt": f"{i:04d} {prompt}" if distinct else prompt,
                "max_tokens": 40,
                "n": 4,
                "seed": i,
            },
        }
        for i in range(lines)
    ]
    return b"".join(json.dumps(row).encode() + b"\n" for row in rows)


def _live_clients(base: str, stop: threading.Event, answers: list[int]) -> list[threading.Thread]:
    """Four clients posting live completions like the batch's lines until ``stop``."""

    def client(index: int) -> None:
        prompt = "To be, or not to be, that is the question. " * 10
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                body = {"model": MODEL, "prompt": f"live {index} {len(answers)} {prompt}"}
                answer = http.post(f"{base}/v1/completions", json=body | {"max_tokens": 40, "n": 4})
                answers.append(answer.status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    return threads


def _run_batch(base: str, content: bytes) -> dict[str, Any]:
    file_id = _upload(base, content).json()["id"]
    created = httpx.post(
        f"{base}/v1/batches",
        json={"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"},
    ).json()
    while True:
        card: dict[str, Any] = httpx.get(f"{base}/v1/batches/{created['id']}", timeout=30).json()
        if card["status"] in ("completed", "failed", "expired", "cancelled"):
            return card
        time.sleep(0.2)


def part_rss(code: Path, lines: int, workload: str) -> dict[str, Any]:
    repeats, distinct, live = RSS_WORKLOADS[workload]
    content = _rss_batch(lines, repeats, distinct)
    with serving(code, "--no-access-log", "--max-memory-mb", "128") as (base, process, _):
        started = process.memory_info().rss
        # One small request first: the first one costs the process memory the budget does not
        # cover (worker threads and their malloc arenas, lazily built tables); the README's
        # "about 200 MB besides the budget" is the process after one request.
        httpx.post(
            f"{base}/v1/completions",
            json={"model": MODEL, "prompt": "To be", "max_tokens": 2},
            timeout=60,
        ).raise_for_status()
        time.sleep(0.5)
        before = process.memory_info().rss
        stop = threading.Event()
        peak = [before]
        watchers = [threading.Thread(target=_peak_rss, args=(process, stop, peak))]
        answers: list[int] = []
        if live:
            watchers += _live_clients(base, stop, answers)
        watchers[0].start()
        with polling_health(base) as health:
            start = time.perf_counter()
            card = _run_batch(base, content)
            took = time.perf_counter() - start
        stop.set()
        for watcher in watchers:
            watcher.join()
    shape = f"{repeats * 13 + 5}-token prompts ({'distinct' if distinct else 'one'}"
    shape += ", 4 live clients too)" if live else ")"
    return {
        "slowest /health while it ran": _health_summary(health),
        "batch": f"{lines} lines (n=4, {shape}, 40 tokens) {card['status']} in {took:.1f} s, "
        f"{card['request_counts']}"
        + (f"; live: {len(answers)} answers, {answers.count(200)} ok" if live else ""),
        "RSS started / after one request / peak": f"{started / 2**20:.0f} / "
        f"{before / 2**20:.0f} / {peak[0] / 2**20:.0f} MiB",
        "peak above the process after one request": f"{(peak[0] - before) / 2**20:.0f} MiB "
        f"(--max-memory-mb 128; {(peak[0] - started) / 2**20:.0f} MiB above the fresh one)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, default=None, help="another checkout to compare")
    parser.add_argument("--parts", default="sockets,line,rss")
    parser.add_argument("--sockets", type=int, default=20_000)
    parser.add_argument("--header-timeout", type=float, default=30.0)
    parser.add_argument(
        "--server-fds",
        type=int,
        default=8192,
        help="the server's ulimit -n (below the sockets opened, as on a machine whose limit is "
        "lower than the clients' sockets)",
    )
    parser.add_argument("--rss-lines", type=int, default=200)
    options = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the server inherits it too
    count = min(options.sockets, hard - 200)
    codes = [("this checkout", ROOT)]
    if options.baseline is not None:
        codes.append((f"baseline {options.baseline}", options.baseline.resolve()))
    parts = options.parts.split(",")
    print(f"ulimit -n {hard} (was {soft}); {os.cpu_count()} CPUs")
    for name, code in codes:
        print(f"\n== {name}")
        results: dict[str, Any] = {}
        if "sockets" in parts:
            results |= part_sockets(code, count, options.header_timeout, options.server_fds)
        if "line" in parts:
            results |= part_line(code)
        for workload in RSS_WORKLOADS:
            if workload in parts:
                suffix = "" if workload == "rss" else f" ({workload})"
                results |= {
                    f"{key}{suffix}": value
                    for key, value in part_rss(code, options.rss_lines, workload).items()
                }
        for key, value in results.items():
            print(f"  {key:40} {value}")


if __name__ == "__main__":
    main()
