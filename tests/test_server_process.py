"""A real `nbcompletions serve` process: what it leaves behind when it ends, and the connections it
keeps open."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from conftest import needs_weights
from helpers import free_port

MODEL = "nbc-shakespeare"
PREFIX = "nbcompletions-batches-"


@contextmanager
def serving(
    tmp: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """`nbcompletions serve` on a free loopback port with ``TMPDIR`` at ``tmp``: (process, URL)."""
    needs_weights()
    port = free_port()
    log = (tmp / f"serve-{port}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbcompletions", "serve", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp), **(env or {})},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp / f"serve-{port}.log").read_text()[-2000:]
            try:
                if httpx.get(f"{base}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "serve did not answer /health within 60 s"
            time.sleep(0.1)
        yield proc, base
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _upload(base: str) -> None:
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "secret prompt", "max_tokens": 1},
    }
    response = httpx.post(
        f"{base}/v1/files",
        files={"file": ("in.jsonl", json.dumps(line).encode() + b"\n", "application/jsonl")},
        data={"purpose": "batch"},
    )
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_batch_files_go_when_the_server_is_stopped(tmp_path: Path, signum: int) -> None:
    with serving(tmp_path) as (proc, base):
        _upload(base)
        assert len(list(tmp_path.glob(f"{PREFIX}*"))) == 1
        proc.send_signal(signum)
        proc.wait(timeout=30)
    assert list(tmp_path.glob(f"{PREFIX}*")) == []


def test_directories_of_ended_servers_are_removed_at_start_and_live_ones_kept(
    tmp_path: Path,
) -> None:
    with serving(tmp_path) as (proc, base):
        _upload(base)
        proc.kill()  # no cleanup at all
        proc.wait()
    (dead,) = tmp_path.glob(f"{PREFIX}*")
    assert (dead / ".owner").exists()
    live = tmp_path / f"{PREFIX}{os.getpid()}-live"
    live.mkdir()
    with (live / ".owner").open("wb") as owner:
        fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running server holds it
        older = tmp_path / f"{PREFIX}abc123"  # an older version's name: left alone
        older.mkdir()
        with serving(tmp_path) as (proc, base):
            _upload(base)
            assert not dead.exists()
            assert live.exists()
            assert older.exists()
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    assert sorted(tmp_path.glob(f"{PREFIX}*")) == sorted([live, older])
