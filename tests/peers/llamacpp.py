"""A real llama.cpp peer for the tests: llama-cpp-python's server serving our model as GGUF.

The server lives in its own venv (``.venv-llamacpp``, made by ``.ci/run``) because
llama-cpp-python[server] pins its own fastapi/starlette stack. Its interpreter comes from
``NBC_LLAMACPP_PYTHON``, else ``<repo>/.venv-llamacpp/bin/python``. Without it the tests that need
the peer skip, saying how to get it, unless ``NBC_REQUIRE_LLAMACPP=1`` (CI), where they fail.

The model is converted at test time (``to_gguf.py``, once per session) and the server is started
with the model's trained context (``--n_ctx 256``): a longer context lets ``max_tokens=0``, which
this server reads as "until the context is full", run past the position embeddings and crash it.
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

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "nbcompletions" / "model" / "files"
TO_GGUF = Path(__file__).resolve().parent / "to_gguf.py"
#: The version whose behaviour tests/test_llamacpp_peer.py characterises.
LLAMACPP_VERSION = "0.3.36"
GGUF_VERSION = "0.19.0"
#: The model name the peer serves (``--model_alias``): the embedded model's id.
MODEL_NAME = "nbc-shakespeare"
N_CTX = 256
HOW_TO_GET = (
    "the llama.cpp peer needs llama-cpp-python[server] in its own venv: run .ci/run, or "
    "`python3 -m venv .venv-llamacpp && .venv-llamacpp/bin/pip install "
    f"'llama-cpp-python[server]=={LLAMACPP_VERSION}' 'gguf=={GGUF_VERSION}'` "
    "(builds from source, 10-17 min), or point NBC_LLAMACPP_PYTHON at a python that has both"
)


class LlamaCppServer(NamedTuple):
    """A running peer: ``base_url`` ends in /v1; ``model`` is the name to send."""

    base_url: str
    model: str
    log: Path
    #: The server process (None for a peer started elsewhere): tests check it is still alive.
    process: subprocess.Popen[str] | None = None


def peer_python() -> Path | None:
    """The interpreter with llama-cpp-python, or None when this machine has none."""
    configured = os.environ.get("NBC_LLAMACPP_PYTHON")
    if configured:
        return Path(configured)
    default = ROOT / ".venv-llamacpp" / "bin" / "python"
    return default if default.exists() else None


def _unavailable(reason: str) -> None:
    if os.environ.get("NBC_REQUIRE_LLAMACPP") == "1":
        pytest.fail(f"NBC_REQUIRE_LLAMACPP=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_peer_python() -> Path:
    """The peer's interpreter; skips (or fails under NBC_REQUIRE_LLAMACPP=1) when it is missing."""
    python = peer_python()
    if python is None:
        _unavailable(HOW_TO_GET)
        raise AssertionError("unreachable")
    if not python.exists():
        _unavailable(f"NBC_LLAMACPP_PYTHON={python} does not exist; {HOW_TO_GET}")
    probe = subprocess.run(
        [str(python), "-c", "import llama_cpp, gguf, fastapi; print(llama_cpp.__version__)"],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        _unavailable(f"{python} cannot import llama_cpp, gguf and fastapi ({last}); {HOW_TO_GET}")
    if probe.stdout.strip() != LLAMACPP_VERSION:
        _unavailable(
            f"{python} has llama-cpp-python {probe.stdout.strip()}; these tests characterise "
            f"{LLAMACPP_VERSION}"
        )
    return python


def convert_model(python: Path, out: Path) -> Path:
    """Convert the embedded model to GGUF at ``out`` with the peer venv's gguf package."""
    result = subprocess.run(
        [str(python), str(TO_GGUF), str(MODEL_DIR), str(out)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"GGUF conversion failed ({result.returncode}):\n{result.stderr}")
    return out


def start_server(
    python: Path, gguf_path: Path, log_path: Path
) -> tuple[subprocess.Popen[str], str]:
    """Start the peer on a free loopback port; returns the process and its base URL (…/v1)."""
    port = free_port()
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            str(python),
            "-m",
            "llama_cpp.server",
            "--model",
            str(gguf_path),
            "--model_alias",
            MODEL_NAME,
            "--n_ctx",
            str(N_CTX),
            "--logits_all",
            "true",
            # One thread each: the test machine is small and shared; speed is not measured here.
            "--n_threads",
            "1",
            "--n_threads_batch",
            "1",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        # A file, not a pipe: an unread pipe fills up and stalls the server.
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log.close()
    base = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"llama_cpp.server exited early ({proc.returncode}):\n{log_path.read_text()}"
            )
        try:
            if httpx.get(f"{base}/models", timeout=2.0).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop_server(proc)
            raise RuntimeError(
                f"llama_cpp.server did not answer within 120 s:\n{log_path.read_text()}"
            )
        time.sleep(0.2)


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def llamacpp_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded model converted to GGUF (f16) with llama.cpp's gguf package, once a session."""
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip("the embedded model's weights are not built yet")
    python = require_peer_python()
    return convert_model(python, tmp_path_factory.mktemp("llamacpp") / "nbc-shakespeare.gguf")


@pytest.fixture(scope="session")
def llamacpp_server(
    llamacpp_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaCppServer]:
    """A real llama-cpp-python server on loopback serving the embedded model as ``MODEL_NAME``."""
    python = require_peer_python()
    log_path = tmp_path_factory.mktemp("llamacpp_server") / "server.log"
    proc, base = start_server(python, llamacpp_gguf, log_path)
    try:
        yield LlamaCppServer(base, MODEL_NAME, log_path, proc)
    finally:
        stop_server(proc)
