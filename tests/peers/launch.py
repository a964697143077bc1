"""Starting and stopping a real peer server for the tests: one place for what every peer needs.

A peer is a subprocess on a free loopback port whose output goes to a log file (a file, not a
pipe: an unread pipe fills up and stalls the server). It is ready when ``ready_url`` answers 200;
if it exits or stays silent past its deadline, the error carries the end of its log.
When a peer is missing, :func:`unavailable` skips the test saying how to get it, or fails it
when the peer's ``NBC_REQUIRE_*`` variable is ``1`` (CI).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import httpx
import pytest

#: Where .ci/run keeps the peers it builds, outside the clone, keyed by name and version.
PEER_CACHE = Path(
    os.environ.get("NBC_PEER_CACHE") or Path.home() / ".cache" / "nbcompletions-peers"
)
LOG_TAIL_LINES = 60


def cached_peer(pattern: str) -> Path | None:
    """The newest path in the peer cache matching ``pattern``, or None.

    ``.ci/peers`` names each entry ``<name>-<version>-<key>``, the key hashing the recipe that
    built it, so the tests look the entry up by name and version.
    """
    found = sorted(PEER_CACHE.glob(pattern), key=lambda path: path.stat().st_mtime)
    return found[-1] if found else None


def unavailable(require_var: str, reason: str) -> None:
    """Skip with ``reason``, or fail when ``require_var`` is set to 1 (the peer must run)."""
    if os.environ.get(require_var) == "1":
        pytest.fail(f"{require_var}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a peer's log (what a failure message shows)."""
    try:
        text = log_path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {log_path})"
    return "\n".join(text.splitlines()[-lines:])


def launch(
    argv: Sequence[str],
    *,
    name: str,
    log_path: Path,
    ready_url: str,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Start ``argv``, wait until ``ready_url`` answers 200; raise with the log's end otherwise."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **(env or {})},
            # Its own process group: stop() ends the workers it forks (vLLM's engine core) too.
            start_new_session=True,
        )
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{name} exited early ({proc.returncode}); log {log_path}:\n{log_tail(log_path)}"
            )
        try:
            if httpx.get(ready_url, timeout=2.0).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise RuntimeError(
                f"{name} did not answer {ready_url} within {timeout_s:.0f} s; "
                f"log {log_path}:\n{log_tail(log_path)}"
            )
        time.sleep(0.5)


def stop(proc: subprocess.Popen[str], grace_s: float = 15.0) -> None:
    """Terminate the peer's process group, then kill it if it has not exited within ``grace_s``."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # what is left of the group: forked workers
    proc.wait()
