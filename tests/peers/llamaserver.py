"""A real ggml llama-server peer for the tests: llama.cpp's C++ server serving our model as GGUF.

The binary is built from the llama.cpp sources vendored in the llama-cpp-python 0.3.36 sdist
(issue 16 says how) and kept outside the clone, keyed by version:
``~/.cache/nbcompletions-peers/llama-server-0.3.36/llama-server`` with its .so files beside it, or
``NBC_LLAMASERVER`` naming the binary. The GGUF comes from tests/peers/to_gguf.py, run by the
llama-cpp-python peer's interpreter (it has the ``gguf`` package). Without either, the tests that
need the peer skip, saying why, unless ``NBC_REQUIRE_LLAMASERVER=1`` (CI), where they fail.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import httpx
import pytest
from helpers import free_port

from peers.llamacpp import MODEL_DIR, MODEL_NAME, convert_model, peer_python, stop_server

LLAMASERVER_VERSION = "0.3.36"
DEFAULT_BINARY = (
    Path.home()
    / ".cache"
    / "nbcompletions-peers"
    / f"llama-server-{LLAMASERVER_VERSION}"
    / "llama-server"
)
#: The model's trained context, per slot: ``-np N -c N_CTX*N``.
N_CTX = 256


class LlamaServer(NamedTuple):
    """A running peer: ``base_url`` ends in /v1; ``model`` is the name to send."""

    base_url: str
    model: str
    log: Path
    process: subprocess.Popen[str]


def _unavailable(reason: str) -> None:
    if os.environ.get("NBC_REQUIRE_LLAMASERVER") == "1":
        pytest.fail(f"NBC_REQUIRE_LLAMASERVER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def server_binary() -> Path:
    """The llama-server binary; skips (or fails under NBC_REQUIRE_LLAMASERVER=1) without it."""
    binary = Path(os.environ.get("NBC_LLAMASERVER") or DEFAULT_BINARY)
    if not binary.exists():
        _unavailable(
            f"no llama-server binary at {binary}: build it from the llama-cpp-python "
            f"{LLAMASERVER_VERSION} sdist's vendor/llama.cpp (issue 16) or set NBC_LLAMASERVER"
        )
    return binary


def start_llama_server(
    binary: Path, gguf_path: Path, log_path: Path, *, slots: int = 1
) -> tuple[subprocess.Popen[str], str]:
    """Start llama-server on a free loopback port with ``slots`` slots of N_CTX tokens each."""
    port = free_port()
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    command = [str(binary), "-m", str(gguf_path), "-a", MODEL_NAME, "--no-webui"]
    command += ["-c", str(N_CTX * slots), "-np", str(slots), "-t", "1"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/models", timeout=2.0).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    stop_server(proc)
    raise RuntimeError(f"llama-server did not start ({proc.returncode}):\n{log_path.read_text()}")


@pytest.fixture(scope="session")
def llamaserver_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model as GGUF, converted by the llama-cpp-python peer's interpreter."""
    server_binary()
    python = peer_python()
    if python is None or not python.exists():
        _unavailable("the GGUF conversion needs the gguf package: set NBC_LLAMACPP_PYTHON")
        raise AssertionError("unreachable")
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip("the embedded model's weights are not built yet")
    return convert_model(python, tmp_path_factory.mktemp("llamaserver") / "nbc-shakespeare.gguf")


@pytest.fixture(scope="session")
def llamaserver(
    llamaserver_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """A real ggml llama-server (one slot, -c 256) serving the embedded model as MODEL_NAME."""
    log_path = tmp_path_factory.mktemp("llamaserver_log") / "server.log"
    proc, base = start_llama_server(server_binary(), llamaserver_gguf, log_path)
    try:
        yield LlamaServer(base, MODEL_NAME, log_path, proc)
    finally:
        stop_server(proc)


@pytest.fixture(scope="session")
def llamaserver_url(llamaserver: LlamaServer) -> str:
    return llamaserver.base_url
