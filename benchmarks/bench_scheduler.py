"""The server's scheduling under load: batching across requests, a sweep, 64 clients, memory.

Run: ``python benchmarks/bench_scheduler.py [--baseline /path/to/other/checkout] [--parts ...]``

Every part runs in its own subprocess with ``PYTHONPATH`` set to the checkout measured, so with
``--baseline`` the same code measures this checkout and another one (today's main) side by side in
one run, and prints the ratios:

- ``batching``: CPU of 8 concurrent n=1 requests over CPU of one n=8 request (target <= 1.3), and
  wall time of one n=8 request over one n=1 request (target <= 2); through the app in-process,
  same prompt, end-of-text banned so every completion has ``--max-tokens`` tokens; alternating,
  median of ``--repeats``. Then the compiled decode step alone: 1 row, 4 rows on one thread, and
  2 threads of 4 rows at once (an n=8 step on two cores), which bounds the wall ratio from below;
- ``sweep``: a 200-request sweep on the embedded model as in notebook 03 (2 prompts x 5
  temperatures x 20 repeats, max_tokens 24, logprobs 5) with ``nbcompletions.Client()``: wall and
  CPU time
  (target: at least 2x faster than the baseline);
- ``clients``: 64 concurrent clients over HTTP against ``nbcompletions serve`` on 127.0.0.1, half
  streaming, each sending ``--client-requests`` requests in turn: p50/p99 latency of streamed and
  plain requests (target: streamed p99 <= 2x plain p99) and the errors (target: none);
- ``memory``: the server's resident memory (VmHWM, the peak) after the hostile bodies of the issue
  and under 6 concurrent heavy requests that together would need more than ``--max-memory-mb``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPT = "HAMLET:\nTo be, or not to be,"


# -- workers (each runs in a subprocess and prints one JSON line) ----------------------------------
async def _batching(repeats: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    from nbcompletions.model import load_engine
    from nbcompletions.server import create_app

    engine = load_engine()
    app = create_app(engine)
    ban = {str(engine.eot_token_id): -100}
    body = {"model": engine.model_id, "prompt": PROMPT, "max_tokens": max_tokens, "logit_bias": ban}
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://x", timeout=600
    ) as client:

        async def one(**fields: Any) -> None:
            response = await client.post("/v1/completions", json={**body, **fields})
            response.raise_for_status()

        async def eight_n1() -> None:
            await asyncio.gather(*(one(seed=i) for i in range(8)))

        async def measure(run: Any) -> tuple[float, float]:
            wall, cpu = time.perf_counter(), time.process_time()
            await run()
            return time.perf_counter() - wall, time.process_time() - cpu

        cases = {
            "n1": lambda: one(seed=0),
            "n8": lambda: one(seed=0, n=8),
            "eight_n1": eight_n1,
        }
        for run in cases.values():
            await run()  # warm-up
        samples: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
        for _ in range(repeats):
            for name, run in cases.items():
                samples[name].append(await measure(run))
    med = {
        name: (statistics.median(w for w, _ in s), statistics.median(c for _, c in s))
        for name, s in samples.items()
    }
    return {
        **_step_floor(engine),
        "n1_wall": med["n1"][0],
        "n8_wall": med["n8"][0],
        "n8_cpu": med["n8"][1],
        "eight_n1_cpu": med["eight_n1"][1],
        "eight_n1_wall": med["eight_n1"][0],
    }


def _step_floor(engine: Any) -> dict[str, float]:
    """The compiled decode step alone at position 75 (about mid-way through 128 tokens): one row,
    four rows on one thread (each thread's share of an n=8 step on two cores) and two threads
    running four rows each at once. The fastest quarter of interleaved rounds, in ms. Empty where
    the checkout has no compiled step."""
    import concurrent.futures

    import numpy as np

    try:
        from nbcompletions.model import _kernels
    except ImportError:
        return {}
    packed = getattr(engine, "packed", None)
    if packed is None:
        return {}
    layers, heads, dim = packed.ln1.shape[0], packed.n_head, packed.wte.shape[1]
    vocab = packed.head_w.shape[1]

    def state(rows: int) -> tuple[Any, ...]:
        rng = np.random.default_rng(rows)
        k = (rng.standard_normal((layers, rows, heads, 256, dim // heads)) * 0.5).astype("f4")
        logits = np.empty((rows, vocab), np.float32)
        return rng.integers(0, vocab, rows), k, k.copy(), np.full(rows, 75), logits

    one, four, four_b = state(1), state(4), state(4)
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def run(s: tuple[Any, ...]) -> None:
        _kernels.decode(packed, s[0], s[1], s[2], s[3], s[4], 0, len(s[0]))

    def both() -> None:
        other = pool.submit(run, four_b)
        run(four)
        other.result()

    cases = {"floor_1row": lambda: run(one), "floor_4rows": lambda: run(four), "floor_2x4": both}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(40):
        for name, case in cases.items():
            start = time.perf_counter()
            for _ in range(10):
                case()
            times[name].append((time.perf_counter() - start) / 10 * 1e3)
    pool.shutdown()
    quarter = 10
    return {name: sum(sorted(t)[:quarter]) / quarter for name, t in times.items()}


def _sweep() -> dict[str, Any]:
    import nbcompletions as nbc

    client = nbc.Client()
    prompts = {"hamlet": "HAMLET:\nTo be, or not to be,", "romeo": "ROMEO:\n"}
    temperatures = [0.0, 0.5, 1.0, 1.5, 2.0]
    client.complete("To be", max_tokens=2)  # load the model outside the timing
    wall, cpu = time.perf_counter(), time.process_time()
    result = nbc.sweep(
        client,
        prompt=prompts,
        temperature=temperatures,
        repeats=20,
        max_tokens=24,
        logprobs=5,
        progress=False,
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    client.close()
    return {"requests": len(result), "wall": wall, "cpu": cpu}


# -- a real server ---------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(pythonpath: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONPATH": pythonpath}
    command = [sys.executable, "-m", "nbcompletions", "serve", "--port", str(port)]
    command += ["--no-access-log", "--log-level", "warning", *extra]
    # `python -m` puts the working directory first on sys.path: start in the checkout measured.
    proc = subprocess.Popen(command, env=env, cwd=pythonpath)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("nbcompletions serve did not start")


def _memory_mb(pid: int) -> dict[str, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


async def _clients(pythonpath: str, clients: int, per_client: int) -> dict[str, Any]:
    import httpx

    proc, base = _serve(pythonpath)
    latencies: dict[str, list[float]] = {"stream": [], "plain": []}
    errors: list[str] = []
    prompts = ["HAMLET:\n", "ROMEO:\n", "To be, or not", "O", "KING HENRY:\nOnce more"]
    try:
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]

            async def client(i: int) -> None:
                stream = i % 2 == 1
                for k in range(per_client):
                    body = {
                        "model": model,
                        "prompt": prompts[(i + k) % len(prompts)],
                        "max_tokens": 16,
                        "logprobs": 1,
                        "stream": stream,
                    }
                    started = time.perf_counter()
                    try:
                        if stream:
                            async with http.stream("POST", "/v1/completions", json=body) as r:
                                r.raise_for_status()
                                lines = [line async for line in r.aiter_lines() if line]
                            if lines[-1] != "data: [DONE]" or any('"error"' in x for x in lines):
                                raise RuntimeError(f"bad stream end {lines[-1]!r}")
                        else:
                            (await http.post("/v1/completions", json=body)).raise_for_status()
                    except Exception as exc:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        continue
                    latencies["stream" if stream else "plain"].append(time.perf_counter() - started)

            started = time.perf_counter()
            await asyncio.gather(*(client(i) for i in range(clients)))
            elapsed = time.perf_counter() - started
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    def pct(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {
        "elapsed": elapsed,
        "errors": errors[:5],
        "n_errors": len(errors),
        **{f"{kind}_p50": pct(v, 0.5) for kind, v in latencies.items()},
        **{f"{kind}_p99": pct(v, 0.99) for kind, v in latencies.items()},
        **{f"{kind}_n": len(v) for kind, v in latencies.items()},
    }


async def _memory(pythonpath: str, max_memory_mb: int) -> dict[str, Any]:
    import httpx

    proc, base = _serve(pythonpath, "--max-memory-mb", str(max_memory_mb))
    rows: list[dict[str, Any]] = []
    try:
        async with httpx.AsyncClient(base_url=base, timeout=600) as http:
            model = (await http.get("/v1/models")).json()["data"][0]["id"]
            ban = {"0": -100}  # the embedded model's end-of-text
            (
                await http.post("/v1/completions", json={"model": model, "prompt": "O"})
            ).raise_for_status()
            rows.append({"case": "after one small request", **_memory_mb(proc.pid)})
            hostile = {
                '["O"]*4, n=128, max_tokens=255, logprobs=5': {
                    "prompt": ["O"] * 4,
                    "n": 128,
                    "max_tokens": 255,
                    "logprobs": 5,
                },
                '["O"]*20000, max_tokens=1': {"prompt": ["O"] * 20000, "max_tokens": 1},
                '["O"]*16, n=128, max_tokens=16': {
                    "prompt": ["O"] * 16,
                    "n": 128,
                    "max_tokens": 16,
                },
            }
            for name, body in hostile.items():
                started = time.perf_counter()
                r = await http.post("/v1/completions", json={"model": model, **body})
                rows.append(
                    {
                        "case": name,
                        "status": r.status_code,
                        "seconds": time.perf_counter() - started,
                        "param": r.json().get("error", {}).get("param"),
                        **_memory_mb(proc.pid),
                    }
                )
            heavy = {"model": model, "prompt": "O", "n": 64, "max_tokens": 120, "logit_bias": ban}
            started = time.perf_counter()
            done = await asyncio.gather(
                *(http.post("/v1/completions", json={**heavy, "seed": i}) for i in range(6))
            )
            rows.append(
                {
                    "case": "6 concurrent n=64, max_tokens=120 (each ~62 MiB of cache)",
                    "status": sorted({r.status_code for r in done}),
                    "seconds": time.perf_counter() - started,
                    **_memory_mb(proc.pid),
                }
            )
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"rows": rows}


def _worker(args: argparse.Namespace) -> None:
    if args.worker == "batching":
        out = asyncio.run(_batching(args.repeats, args.max_tokens))
    elif args.worker == "sweep":
        out = _sweep()
    elif args.worker == "clients":
        out = asyncio.run(_clients(os.environ["PYTHONPATH"], args.clients, args.client_requests))
    else:
        out = asyncio.run(_memory(os.environ["PYTHONPATH"], args.max_memory_mb))
    print(json.dumps(out))


# -- the driver ------------------------------------------------------------------------------------
def _run(checkout: str, worker: str, args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": checkout}
    command = [sys.executable, __file__, "--worker", worker, "--repeats", str(args.repeats)]
    command += ["--max-tokens", str(args.max_tokens), "--clients", str(args.clients)]
    command += ["--client-requests", str(args.client_requests)]
    command += ["--max-memory-mb", str(args.max_memory_mb)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{worker} worker failed ({checkout}):\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline", help="another checkout to measure side by side (e.g. main)")
    parser.add_argument(
        "--parts", default="batching,sweep,clients,memory", help="comma-separated parts to run"
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--client-requests", type=int, default=3)
    parser.add_argument("--max-memory-mb", type=int, default=128)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    parts = args.parts.split(",")
    checkouts = {"this": str(ROOT)}
    if args.baseline:
        checkouts["baseline"] = str(Path(args.baseline).resolve())
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    if "batching" in parts:
        print(f"batching: {args.max_tokens} tokens each, median of {args.repeats}, in-process app")
        for name, checkout in checkouts.items():
            r = _run(checkout, "batching", args)
            print(
                f"  {name:8s} CPU 8 x n=1 / n=8 = {r['eight_n1_cpu']:.3f} / {r['n8_cpu']:.3f} s "
                f"= {r['eight_n1_cpu'] / r['n8_cpu']:.2f}x (target <= 1.3)   wall n=8 / n=1 = "
                f"{r['n8_wall']:.3f} / {r['n1_wall']:.3f} s = {r['n8_wall'] / r['n1_wall']:.2f}x "
                "(target <= 2)"
            )
            if "floor_1row" in r:
                print(
                    f"           the compiled step alone at position 75: 1 row "
                    f"{r['floor_1row']:.3f} ms,"
                    f" 4 rows {r['floor_4rows']:.3f} ms ({r['floor_4rows'] / r['floor_1row']:.2f}x"
                    f"), 2 threads x 4 rows at once {r['floor_2x4']:.3f} ms "
                    f"({r['floor_2x4'] / r['floor_1row']:.2f}x: an n=8 step on two cores costs at "
                    "least this over an n=1 step)"
                )
    if "sweep" in parts:
        print("sweep: 2 prompts x 5 temperatures x 20 repeats, max_tokens 24, logprobs 5, Client()")
        results = {name: _run(checkout, "sweep", args) for name, checkout in checkouts.items()}
        for name, r in results.items():
            print(
                f"  {name:8s} {r['requests']} requests: wall {r['wall']:.2f} s, "
                f"CPU {r['cpu']:.2f} s"
            )
        if "baseline" in results:
            speedup = results["baseline"]["wall"] / results["this"]["wall"]
            print(f"  speed-up this vs baseline: {speedup:.2f}x (target >= 2)")
    if "clients" in parts:
        print(
            f"clients: {args.clients} concurrent over HTTP (half streaming), "
            f"{args.client_requests} requests each, max_tokens 16"
        )
        r = _run(checkouts["this"], "clients", args)
        ratio = r["stream_p99"] / r["plain_p99"]
        print(
            f"  this     plain p50 {r['plain_p50']:.2f} s p99 {r['plain_p99']:.2f} s; stream p50 "
            f"{r['stream_p50']:.2f} s p99 {r['stream_p99']:.2f} s; stream/plain p99 {ratio:.2f}x "
            f"(target <= 2); errors {r['n_errors']} (target 0); all done in {r['elapsed']:.1f} s"
        )
        for error in r["errors"]:
            print(f"    error: {error}")
    if "memory" in parts:
        print(f"memory: nbcompletions serve --max-memory-mb {args.max_memory_mb}; resident MiB")
        r = _run(checkouts["this"], "memory", args)
        for row in r["rows"]:
            extra = ""
            if "status" in row:
                extra = f" -> {row['status']} in {row['seconds']:.2f} s"
                if row.get("param"):
                    extra += f" (param {row['param']})"
            print(f"  {row['case']:60s}{extra}; RSS {row['VmRSS']:.0f}, peak {row['VmHWM']:.0f}")


if __name__ == "__main__":
    main()
