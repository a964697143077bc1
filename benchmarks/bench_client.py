"""Client throughput: nbcompletions.AsyncClient vs openai.AsyncOpenAI, side by side in one run.

A local server in a subprocess on 127.0.0.1 answers every ``POST /v1/completions`` with the same
canned completion (a bare asyncio responder by default, so that the clients, not the server, are
measured; ``--server uvicorn`` uses a minimal Starlette app instead). Each client sends the same
requests (default 2,000 at concurrency 32); runs alternate between the two clients (ours first in
odd rounds, openai's first in even ones) and the best of the rounds is reported for each, with the
ratio ours / openai (target: <= 1.0). Client CPU time (this process; the server is another one) is
printed too: on a busy machine it varies less than wall time.

    python benchmarks/bench_client.py [--requests 2000] [--concurrency 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import textwrap
import time

import httpx

# The canned completion every request gets.
BODY = (
    b'{"id":"cmpl-bench","object":"text_completion","created":1700000000,"model":"bench",'
    b'"choices":[{"text":" the quick brown fox","index":0,"logprobs":null,'
    b'"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":5,"completion_tokens":5,"total_tokens":10}}'
)

# Default server: a bare asyncio HTTP/1.1 keep-alive responder. A benchmark of clients needs a
# server much faster than either client, or the ratio measures the server: with uvicorn+Starlette
# on this 2-core machine the server took ~90% of the time and runs varied by 50%.
RAW_SERVER = textwrap.dedent("""
    import asyncio, sys
    BODY = %r
    HEAD = (b"HTTP/1.1 200 OK\\r\\ncontent-type: application/json\\r\\n"
            b"content-length: " + str(len(BODY)).encode() + b"\\r\\n\\r\\n")

    class Answer(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport, self.buffer = transport, b""

        def data_received(self, data):
            self.buffer += data
            while True:
                end = self.buffer.find(b"\\r\\n\\r\\n")
                if end < 0:
                    return
                length = 0
                for line in self.buffer[:end].split(b"\\r\\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if len(self.buffer) < end + 4 + length:
                    return
                first = self.buffer[:self.buffer.find(b"\\r\\n")]
                self.buffer = self.buffer[end + 4 + length:]
                self.transport.write(HEAD + BODY if b"/health" not in first else
                                     b"HTTP/1.1 200 OK\\r\\ncontent-length: 2\\r\\n\\r\\nok")

    async def main():
        server = await asyncio.get_running_loop().create_server(Answer, "127.0.0.1",
                                                                int(sys.argv[1]))
        await server.serve_forever()

    asyncio.run(main())
""") % (BODY,)

# The same answers from uvicorn + Starlette (--server uvicorn): realistic, but server-bound.
UVICORN_SERVER = textwrap.dedent("""
    import sys
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    BODY = %r

    async def completions(request):
        await request.body()
        return Response(BODY, media_type="application/json")

    async def health(request):
        return Response(b"ok")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"]),
                            Route("/health", health)])
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                access_log=False)
""") % (BODY,)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(kind: str = "raw") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    code = RAW_SERVER if kind == "raw" else UVICORN_SERVER
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)])
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                return proc, f"{base}/v1"
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the canned-completion server did not start")
        time.sleep(0.1)


async def run_ours(base_url: str, requests: int, concurrency: int) -> tuple[float, float]:
    from nbcompletions import AsyncClient

    async with AsyncClient(base_url, model="bench", max_concurrency=concurrency) as client:
        await asyncio.gather(
            *(client.complete("Once upon a time", max_tokens=5) for _ in range(concurrency))
        )  # warm the connection pool
        start, cpu = time.perf_counter(), time.process_time()
        results = await asyncio.gather(
            *(client.complete("Once upon a time", max_tokens=5) for _ in range(requests))
        )
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(r.text == " the quick brown fox" for r in results)
    return elapsed, cpu


async def run_openai(base_url: str, requests: int, concurrency: int) -> tuple[float, float]:
    import openai

    semaphore = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="unused") as client:

        async def one() -> str:
            async with semaphore:
                response = await client.completions.create(
                    model="bench", prompt="Once upon a time", max_tokens=5
                )
            return response.choices[0].text

        await asyncio.gather(*(one() for _ in range(concurrency)))
        start, cpu = time.perf_counter(), time.process_time()
        texts = await asyncio.gather(*(one() for _ in range(requests)))
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert all(t == " the quick brown fox" for t in texts)
    return elapsed, cpu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", choices=["raw", "uvicorn"], default="raw")
    args = parser.parse_args(argv)
    proc, base_url = start_server(args.server)
    runners = {"nbcompletions": run_ours, "openai": run_openai}
    times: dict[str, list[float]] = {name: [] for name in runners}
    cpus: dict[str, list[float]] = {name: [] for name in runners}
    try:
        for round_number in range(args.rounds):
            order = list(runners) if round_number % 2 == 0 else list(reversed(runners))
            for name in order:
                elapsed, cpu = asyncio.run(runners[name](base_url, args.requests, args.concurrency))
                times[name].append(elapsed)
                cpus[name].append(cpu)
                print(
                    f"round {round_number + 1} {name:>13}: {elapsed:.3f} s wall, {cpu:.3f} s "
                    f"client CPU ({args.requests / elapsed:,.0f} req/s)",
                    flush=True,
                )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ours, theirs = min(times["nbcompletions"]), min(times["openai"])
    ours_cpu, theirs_cpu = min(cpus["nbcompletions"]), min(cpus["openai"])
    print(
        f"\n{args.requests} requests, concurrency {args.concurrency}, best of {args.rounds}, "
        f"{args.server} server:"
    )
    print(f"  nbcompletions.AsyncClient  {ours:.3f} s wall  {ours_cpu:.3f} s client CPU")
    print(f"  openai.AsyncOpenAI         {theirs:.3f} s wall  {theirs_cpu:.3f} s client CPU")
    print(
        f"  ratio ours/openai: wall {ours / theirs:.2f} (target <= 1.00: "
        f"{'met' if ours <= theirs else 'NOT met'}), client CPU {ours_cpu / theirs_cpu:.2f}"
    )


if __name__ == "__main__":
    main()
