"""A real ggml ``llama-server`` (llama.cpp's C++ server) serving our model as GGUF, for the tests.

The binary is built from the llama.cpp sources vendored in the llama-cpp-python sdist
(``LLAMASERVER_VERSION``) by ``.ci/peers`` into ``$NBC_PEER_CACHE/llama.cpp-<version>-<key>/``
(default ``~/.cache/nbcompletions-peers``), with the shared libraries it links beside it (the same
build gives llama-cpp-python its libraries). Its path comes from ``NBC_LLAMASERVER_BIN``, else the
newest such entry. Without it the tests that need it skip, saying how to get it, unless
``NBC_REQUIRE_LLAMASERVER=1`` (CI), where they fail.

It serves the GGUF that ``tests/peers/to_gguf.py`` writes (the ``llamacpp_gguf`` fixture, converted
with the llama.cpp peer venv's gguf package) with the model's trained context: ``-c 256`` per slot
(``-np N -c 256*N`` for N slots), like the llama-cpp-python peer. ``NBC_LLAMASERVER_URL`` names one
already running instead (its base URL, …/v1).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import free_port

from peers.launch import PEER_CACHE, cached_peer, launch, log_tail, stop, unavailable
from peers.llamacpp import LLAMACPP_VERSION, MODEL_DIR, MODEL_NAME, N_CTX

#: llama-server is built from the llama.cpp vendored in this llama-cpp-python release's sdist.
LLAMASERVER_VERSION = LLAMACPP_VERSION
REQUIRE = "NBC_REQUIRE_LLAMASERVER"
CACHED_BIN_PATTERN = f"llama.cpp-{LLAMASERVER_VERSION}-*/llama-server"
HOW_TO_GET = (
    "ggml's llama-server: run .ci/peers llama-server (it builds it into "
    f"{PEER_CACHE}/{CACHED_BIN_PATTERN.split('/')[0]}), or build it from the "
    f"llama-cpp-python=={LLAMASERVER_VERSION} sdist's "
    "vendor/llama.cpp (cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "
    "-DLLAMA_BUILD_SERVER=ON -DLLAMA_CURL=OFF && cmake --build build --target llama-server) and "
    "point NBC_LLAMASERVER_BIN at build/bin/llama-server"
)
START_TIMEOUT_S = 120


class LlamaServer(NamedTuple):
    """A running llama-server: ``base_url`` ends in /v1; ``model`` is the name to send."""

    base_url: str
    model: str
    log: Path
    #: The server process (None for one started elsewhere, named by NBC_LLAMASERVER_URL).
    process: subprocess.Popen[str] | None
    n_slots: int


def server_binary() -> Path | None:
    """The llama-server executable this machine has, or None."""
    configured = os.environ.get("NBC_LLAMASERVER_BIN")
    if configured:
        return Path(configured)
    return cached_peer(CACHED_BIN_PATTERN)


def _library_env(binary: Path) -> dict[str, str]:
    """Its shared libraries (libllama, libggml*) live beside the binary in the cache."""
    inherited = os.environ.get("LD_LIBRARY_PATH", "")
    return {"LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(binary.parent), inherited) if p)}


def require_server_binary() -> Path:
    """The binary, checked to run (``--version``); skips or fails (NBC_REQUIRE_LLAMASERVER=1)."""
    binary = server_binary()
    if binary is None:
        unavailable(REQUIRE, HOW_TO_GET)
        raise AssertionError("unreachable")
    if not binary.exists():
        unavailable(REQUIRE, f"NBC_LLAMASERVER_BIN={binary} does not exist; {HOW_TO_GET}")
    probe = subprocess.run(
        [str(binary), "--version"],
        capture_output=True,
        text=True,
        env={**os.environ, **_library_env(binary)},
    )
    if probe.returncode != 0:
        last = ((probe.stderr + probe.stdout).strip().splitlines() or ["no output"])[-1]
        unavailable(REQUIRE, f"{binary} --version failed ({last}); {HOW_TO_GET}")
    return binary


def chat_template_args(out_dir: Path) -> list[str]:
    """``--jinja --chat-template-file`` with our model's template, when tokenizer_config has one."""
    config = json.loads((MODEL_DIR / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if not isinstance(template, str):
        return []
    path = out_dir / "chat_template.jinja"
    path.write_text(template)
    return ["--jinja", "--chat-template-file", str(path)]


def start_server(
    binary: Path, gguf_path: Path, log_path: Path, n_slots: int = 1
) -> tuple[subprocess.Popen[str], str]:
    """Start llama-server on a free loopback port; returns the process and its base URL (…/v1)."""
    if n_slots < 1:
        raise ValueError(f"n_slots must be at least 1; got {n_slots}")
    port = free_port()
    argv = [
        str(binary),
        "--model",
        str(gguf_path),
        "--alias",
        MODEL_NAME,
        # The trained context per slot: past 256 positions the model has no embeddings.
        "--ctx-size",
        str(N_CTX * n_slots),
        "--parallel",
        str(n_slots),
        # One thread each: the test machine is small and shared; speed is not measured here.
        "--threads",
        "1",
        "--threads-batch",
        "1",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *chat_template_args(log_path.parent),
    ]
    root = f"http://127.0.0.1:{port}"
    proc = launch(
        argv,
        name="llama-server",
        log_path=log_path,
        ready_url=f"{root}/health",  # 503 while the model loads, 200 when it serves
        timeout_s=START_TIMEOUT_S,
        env=_library_env(binary),
    )
    return proc, f"{root}/v1"


def stop_server(proc: subprocess.Popen[str]) -> None:
    stop(proc)


@pytest.fixture(scope="session")
def llamaserver_url(llamaserver: LlamaServer) -> str:
    """The base URL (…/v1) of a real llama-server serving the embedded model as ``MODEL_NAME``."""
    return llamaserver.base_url


@pytest.fixture(scope="session")
def llamaserver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """A real llama-server on loopback, started once a session (1 slot, ``-c 256``)."""
    running = os.environ.get("NBC_LLAMASERVER_URL")
    if running:  # one already serving our model (its base URL, …/v1)
        yield LlamaServer(running.rstrip("/"), MODEL_NAME, Path(os.devnull), None, 1)
        return
    binary = require_server_binary()
    try:
        gguf_path: Path = request.getfixturevalue("llamacpp_gguf")
    except pytest.skip.Exception as skipped:
        unavailable(REQUIRE, f"the GGUF conversion needs the llama.cpp peer venv: {skipped.msg}")
        raise AssertionError("unreachable") from skipped
    log_path = tmp_path_factory.mktemp("llamaserver") / "server.log"
    proc, base = start_server(binary, gguf_path, log_path)
    try:
        yield LlamaServer(base, MODEL_NAME, log_path, proc, 1)
    finally:
        died = proc.poll()
        stop_server(proc)
        if died is not None:
            print(
                f"llama-server had exited ({died}) before the session ended:\n{log_tail(log_path)}"
            )
