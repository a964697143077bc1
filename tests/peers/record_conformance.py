"""Record every exchange of one conformance check against the llama.cpp peer, byte for byte.

Usage (from the repository root, in the dev venv):
    python tests/peers/record_conformance.py [--base-url http://127.0.0.1:PORT/v1] [--out FILE]

Without ``--base-url`` it converts the embedded model and starts its own peer. It writes
tests/fixtures/llamacpp/check/conformance.json: ``{"server", "exchanges": [...]}``, one exchange per
HTTP request the check sent, ``{"method", "path", "request", "status", "content_type", "body"}``
with ``body`` the response text exactly as it came (an event stream too).
tests/test_llamacpp_replay.py serves them back, keyed by the request, so the check's detection
logic runs without the peer.
Record again when the probes change (the replay test says which request has no recording).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "fixtures" / "llamacpp" / "check" / "conformance.json"
SERVER = "llama-cpp-python 0.3.36"


class RecordingTransport(httpx.AsyncHTTPTransport):
    """The real transport; keeps each request body and the whole response text.

    The response passes through as it arrives (a stream is not read ahead), so the probes see
    the server's timing: the stream_finish probe sends a request while a stream is open, and
    llama-cpp-python cuts that stream, which the recording then holds.
    """

    def __init__(self) -> None:
        super().__init__()
        self.exchanges: list[dict[str, Any]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await super().handle_async_request(request)
        exchange = {
            "method": request.method,
            "path": request.url.path,
            "request": json.loads(request.content) if request.content else None,
            "status": response.status_code,
            "content_type": response.headers.get("content-type", ""),
            "body": "",
        }
        self.exchanges.append(exchange)
        return httpx.Response(
            response.status_code,
            headers={"content-type": response.headers.get("content-type", "")},
            stream=_Passing(response, exchange),
        )


class _Passing(httpx.AsyncByteStream):
    """A response's bytes, handed on as they come and kept in ``exchange["body"]``."""

    def __init__(self, response: httpx.Response, exchange: dict[str, Any]) -> None:
        self.response = response
        self.exchange = exchange
        self.parts: list[bytes] = []

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self.response.aiter_raw():
            self.parts.append(chunk)
            self.exchange["body"] = b"".join(self.parts).decode("utf-8", "replace")
            yield chunk

    async def aclose(self) -> None:
        await self.response.aclose()


def record(base_url: str, model: str, out: Path) -> int:
    from nbcompletions import Client

    transport = RecordingTransport()
    with Client(base_url, model=model, transport=transport, max_retries=0) as client:
        report = client.conformance()
    print(repr(report))
    out.write_text(
        json.dumps({"server": SERVER, "exchanges": transport.exchanges}, indent=1) + "\n",
        encoding="utf-8",
    )
    print(f"{len(transport.exchanges)} exchanges -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from peers.llamacpp import MODEL_NAME, convert_model, peer_python, start_server, stop_server

    if args.base_url:
        return record(args.base_url, MODEL_NAME, args.out)
    python = peer_python()
    if python is None:
        raise SystemExit("no llama.cpp peer python (see tests/peers/llamacpp.py)")
    with tempfile.TemporaryDirectory() as tmp:
        gguf = convert_model(python, Path(tmp) / "model.gguf")
        proc, base = start_server(python, gguf, Path(tmp) / "server.log")
        try:
            return record(base, MODEL_NAME, args.out)
        finally:
            stop_server(proc)


if __name__ == "__main__":
    raise SystemExit(main())
