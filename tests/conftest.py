"""Shared fixtures: the embedded engine, an in-process client, and a real `nbcompletions serve`."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from helpers import free_port

if TYPE_CHECKING:
    from nbcompletions import Client
    from nbcompletions.model import Engine

ROOT = Path(__file__).resolve().parent.parent
WEIGHTS = ROOT / "nbcompletions" / "model" / "files" / "model.safetensors"

# Tests never talk to a real provider: make sure a developer's key or base URL cannot leak in.
for _var in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "OPENAI_ORG_ID", "OPENAI_PROJECT_ID"):
    os.environ.pop(_var, None)

# Conformance reports measured by tests are kept in a directory of this run, never the user's cache
# (a report from an earlier run would let a test skip the measuring it checks).
_REPORTS = tempfile.mkdtemp(prefix="nbc-test-cache-")
os.environ["NBCOMPLETIONS_CACHE_DIR"] = _REPORTS
atexit.register(shutil.rmtree, _REPORTS, ignore_errors=True)


# The everyday run leaves out the tests marked slow (notebooks, the browser, real kernels, the type
# checker...): `python -m pytest` stays quick. CI and a full check run them all: `.ci/run` sets
# NBC_FULL_TESTS=1, or pass --full.
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--full", action="store_true", help="also run the tests marked slow (as CI does)"
    )


def _full_run(config: pytest.Config) -> bool:
    return bool(config.getoption("--full")) or os.environ.get("NBC_FULL_TESTS") == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _full_run(config):
        return
    skip = pytest.mark.skip(reason="slow: run with --full or NBC_FULL_TESTS=1 (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config: pytest.Config) -> str:
    if _full_run(config):
        return "nbcompletions: full run (slow tests included)"
    return "nbcompletions: quick run; slow tests skipped (--full or NBC_FULL_TESTS=1 runs them)"


@pytest.hookimpl(trylast=True)  # after the terminal plugin has made its reporter
def pytest_configure(config: pytest.Config) -> None:
    """Skips are summarised once per cause (`pytest_terminal_summary` below), not once per test.

    ``-ra`` (pyproject's addopts) would list every skip with its full reason: one llama.cpp
    paragraph repeated for each of forty tests. Failures, errors and xfails are listed as before.
    """
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None and "s" in reporter.reportchars:
        reporter.reportchars = reporter.reportchars.replace("s", "")
        config.stash[_SKIPS_BY_CAUSE] = True


_SKIPS_BY_CAUSE = pytest.StashKey[bool]()


def skip_causes(reports: list[pytest.TestReport]) -> list[tuple[str, int, list[str]]]:
    """(cause, how many tests, their files) per distinct skip reason, the most frequent first."""
    grouped: dict[str, list[str]] = {}
    for report in reports:
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reason = reason.removeprefix("Skipped: ")
        grouped.setdefault(reason, []).append(report.nodeid.split("::")[0])
    causes = [(reason, len(files), sorted(set(files))) for reason, files in grouped.items()]
    return sorted(causes, key=lambda cause: (-cause[1], cause[0]))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if not config.stash.get(_SKIPS_BY_CAUSE, False):
        return
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if r.skipped]
    if not skipped:
        return
    terminalreporter.write_sep("=", "skipped, by cause")
    for reason, count, files in skip_causes(skipped):
        where = ", ".join(Path(f).name for f in files[:3]) + (" ..." if len(files) > 3 else "")
        terminalreporter.write_line(f"{count:>4} skipped ({where}): {reason}")


def needs_weights() -> None:
    if not WEIGHTS.exists():
        pytest.skip("the embedded model's weights are not built yet")


@pytest.fixture(scope="session")
def embedded_engine() -> Engine:
    needs_weights()
    from nbcompletions.model import load_engine

    return load_engine()


@pytest.fixture(scope="module")
def app(embedded_engine: Engine) -> Any:
    """Our server's ASGI app on the shipped model (per module: each module starts its scheduler)."""
    from nbcompletions.server import create_app

    return create_app(embedded_engine)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random GPT-2 in Hugging Face's layout (float16, like the shipped model)."""
    from model_fixture import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_engine(tiny_model_dir: Path) -> Engine:
    from nbcompletions.model import load_engine

    return load_engine(tiny_model_dir)


@pytest.fixture(scope="module", params=["tiny", "shipped"])
def engine(request: pytest.FixtureRequest, tiny_engine: Engine) -> Engine:
    """Each engine test runs on the tiny model (always) and on the shipped one (when built)."""
    if request.param == "tiny":
        return tiny_engine
    return request.getfixturevalue("embedded_engine")  # type: ignore[no-any-return]  # pytest: Any


@pytest.fixture(scope="session")
def embedded_client() -> Iterator[Client]:
    needs_weights()
    from nbcompletions import Client

    client = Client()
    yield client
    client.close()


@pytest.fixture(scope="session")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `nbcompletions serve` on loopback; yields its base URL (…/v1)."""
    needs_weights()
    port = free_port()
    # The server's log goes to a file, not a pipe: an unread pipe fills up and stalls the server.
    log_path = tmp_path_factory.mktemp("live_server") / "serve.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nbcompletions",
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    try:
        while True:
            if proc.poll() is not None:
                out = log_path.read_text()
                raise RuntimeError(f"nbcompletions serve exited early ({proc.returncode}):\n{out}")
            try:
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("nbcompletions serve did not answer /health within 60 s")
            time.sleep(0.1)
        yield f"{base}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# The real llama.cpp peer (its own venv; skips without it): fixtures llamacpp_gguf, llamacpp_server.
from peers.llamacpp import LlamaCppServer, llamacpp_gguf, llamacpp_server  # noqa: E402, F401

# ggml's llama-server and vLLM's CPU build (each skips without its build): fixtures llamaserver,
# llamaserver_url, vllm_server, vllm_url.
from peers.llamaserver import LlamaServer, llamaserver, llamaserver_url  # noqa: E402, F401
from peers.vllm import VllmServer, vllm_server, vllm_url  # noqa: E402, F401
