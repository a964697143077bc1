"""A real `nbcompletions serve` process: what it leaves behind when it ends, and the connections it
keeps open."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
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


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_batch_files_go_when_the_server_is_stopped(tmp_path: Path, signum: int) -> None:
    with serving(tmp_path) as (proc, base):
        _upload(base)
        assert len(list(tmp_path.glob(f"{PREFIX}*"))) == 1
        proc.send_signal(signum)
        proc.wait(timeout=30)
    assert list(tmp_path.glob(f"{PREFIX}*")) == []


@pytest.mark.slow  # real serve processes, about 10 s each; CI runs it
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


# -- connections ----------------------------------------------------------------------------------
def _connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=20)
    return sock


def _closed_by_server(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (a 20 s socket timeout fails)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


@pytest.mark.slow
def test_silent_trickling_and_idle_connections_are_closed(tmp_path: Path) -> None:
    args = ("--header-timeout", "1", "--keep-alive-timeout", "1", "--no-access-log")
    with serving(tmp_path, *args) as (_, base):
        silent = _connect(base)
        trickling = _connect(base)
        trickling.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        kept_alive = _connect(base)
        kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        start = time.monotonic()
        for _ in range(6):  # a byte every 0.3 s does not keep it open past the header timeout
            time.sleep(0.3)
            with contextlib.suppress(OSError):
                trickling.sendall(b"X")
        assert _closed_by_server(silent) == b""
        assert _closed_by_server(trickling) == b""
        answer = _closed_by_server(kept_alive)
        assert answer.startswith(b"HTTP/1.1 200")  # answered, then closed when idle
        assert time.monotonic() - start < 15
        assert httpx.get(f"{base}/health").status_code == 200
        for sock in (silent, trickling, kept_alive):
            sock.close()


@pytest.mark.slow  # real serve processes, about 10 s each; CI runs it
def test_past_the_connection_cap_idle_ones_make_room_and_busy_ones_get_503(
    tmp_path: Path,
) -> None:
    with serving(tmp_path, "--max-connections", "3", "--no-access-log") as (_, base):
        idle = [_connect(base) for _ in range(3)]
        time.sleep(0.2)
        assert httpx.get(f"{base}/health").status_code == 200  # closed an idle one for room
        assert _closed_by_server(idle[0]) == b""  # the longest idle
        # Three connections busy with a request whose body has not arrived:
        busy = [_connect(base) for _ in range(3)]
        for sock in busy:
            sock.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
        time.sleep(0.3)
        refused = httpx.get(f"{base}/health")
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_overloaded"
        for sock in idle + busy:
            sock.close()
        time.sleep(0.3)
        assert httpx.get(f"{base}/health").status_code == 200


@pytest.mark.slow  # real serve processes, about 10 s each; CI runs it
def test_an_upload_gets_the_documented_body_timeout(tmp_path: Path) -> None:
    with serving(tmp_path, "--body-timeout", "1", "--no-access-log") as (_, base):
        sock = _connect(base)
        sock.sendall(
            b"POST /v1/files HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 100000\r\n\r\n--b"
        )
        start = time.monotonic()
        answer = _closed_by_server(sock)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"within 1 seconds" in answer
        assert time.monotonic() - start < 15  # was 30 s + 1 s per MB of --max-batch-file-bytes
        sock.close()
