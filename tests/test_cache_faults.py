"""Faults a cache must survive or name: damaged files, bad rows, swapped rows, two processes,
kill -9, a directory for a path. Each test here failed on the cache before it learnt to cope."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from nbcompletions import Cache, _cache
from nbcompletions._errors import CacheError

RESPONSE = {
    "id": "cmpl-1",
    "object": "text_completion",
    "choices": [{"text": " to be", "index": 0, "logprobs": None, "finish_reason": "length"}],
    "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4},
}


def _raw(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(str(path), isolation_level=None)


def test_garbage_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "study.sqlite"
    path.write_bytes(b"this is not a database, it is a shopping list\n" * 200)
    with pytest.raises(CacheError) as caught:
        Cache(path)
    message = str(caught.value)
    assert str(path) in message
    assert "move it aside" in message
    assert caught.value.path == path


def test_truncated_file_names_the_file_and_the_fix(tmp_path: Path) -> None:
    path = tmp_path / "study.sqlite"
    with Cache(path) as cache:
        for i in range(400):
            cache.put(f"k{i}", {**RESPONSE, "id": f"cmpl-{i}", "pad": "x" * 500})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])

    def read_all() -> None:
        with Cache(path) as cache:
            cache.get_many(f"k{i}" for i in range(400))
            len(cache)

    with pytest.raises(CacheError) as caught:
        read_all()
    assert str(path) in str(caught.value)
    assert "backup" in str(caught.value)


def test_invalid_json_row_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with Cache(path) as cache:
        cache.put("k", RESPONSE)
    raw = _raw(path)
    # A row whose JSON is broken but whose digest matches (written by a buggy tool, say).
    broken = '{"id": "cm'
    raw.execute(
        "UPDATE responses SET response = ?, digest = ? WHERE key = 'k'",
        (broken, _cache._digest("k", broken)),
    )
    raw.close()
    with Cache(path) as cache:
        hit = cache.get("k")
        assert hit is not None
        with pytest.raises(CacheError) as caught:
            hit.response  # noqa: B018
    message = str(caught.value)
    assert str(path) in message
    assert "'k'" in message
    assert "verify(remove=True)" in message
    assert caught.value.key == "k"


def test_swapped_rows_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with Cache(path) as cache:
        cache.put("a", {**RESPONSE, "id": "cmpl-a"})
        cache.put("b", {**RESPONSE, "id": "cmpl-b"})
    raw = _raw(path)
    raw.execute("UPDATE responses SET key = 'tmp' WHERE key = 'a'")
    raw.execute("UPDATE responses SET key = 'a' WHERE key = 'b'")
    raw.execute("UPDATE responses SET key = 'b' WHERE key = 'tmp'")
    raw.close()
    with Cache(path) as cache:
        with pytest.raises(CacheError, match="does not belong to its request"):
            cache.get("a")
        assert sorted(cache.verify()) == ["a", "b"]
        assert sorted(cache.verify(remove=True)) == ["a", "b"]
        assert len(cache) == 0


def test_responses_are_compressed_and_rows_without_a_digest_are_not_served(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.sqlite"
    big = {**RESPONSE, "choices": [{"text": "to be or not to be " * 50, "index": 0}]}
    with Cache(path) as cache:
        cache.put("new", big)
    raw = _raw(path)
    stored = raw.execute("SELECT response FROM responses WHERE key = 'new'").fetchone()[0]
    assert isinstance(stored, bytes)
    assert len(stored) < len(json.dumps(big)) / 4
    assert json.loads(zlib.decompress(stored)) == big
    # A row as an earlier version wrote it: plain JSON text, no digest column.
    raw.execute(
        "INSERT INTO responses (key, response, latency, created) VALUES ('old', ?, 0.5, 0)",
        (json.dumps(RESPONSE),),
    )
    raw.close()
    with Cache(path) as cache:
        assert cache.get("new").response == big  # type: ignore[union-attr]
        # Nothing ties an old row to its request: it is fetched again, never served blind.
        assert cache.get("old") is None
        assert "old" not in cache
        assert cache.keys_present(["new", "old"]) == {"new"}
        assert cache.claim(["old"]) == ["old"]
        assert cache.verify() == ["old"]
        cache.put("old", RESPONSE)  # the refetched answer replaces it, with a digest
        assert cache.get("old").response == RESPONSE  # type: ignore[union-attr]
        assert cache.verify() == []


def test_swapped_rows_with_nulled_digests_are_not_served(tmp_path: Path) -> None:
    """Rows as an earlier version wrote them (no digest), swapped: each would answer for the
    other's request. They are refetched instead."""
    path = tmp_path / "c.sqlite"
    with Cache(path) as cache:
        cache.put("a", {**RESPONSE, "id": "cmpl-a"})
        cache.put("b", {**RESPONSE, "id": "cmpl-b"})
    raw = _raw(path)
    raw.execute("UPDATE responses SET key = 'tmp' WHERE key = 'a'")
    raw.execute("UPDATE responses SET key = 'a' WHERE key = 'b'")
    raw.execute("UPDATE responses SET key = 'b' WHERE key = 'tmp'")
    raw.execute("UPDATE responses SET digest = NULL")
    raw.close()
    with Cache(path) as cache:
        assert cache.get_many(["a", "b"]) == {}
        assert cache.keys_present(["a", "b"]) == set()
        assert sorted(cache.claim(["a", "b"])) == ["a", "b"]  # to be fetched again
        assert sorted(cache.verify(remove=True)) == ["a", "b"]
        assert len(cache) == 0


def test_a_sweep_refetches_swapped_rows_without_a_digest(tmp_path: Path, app: Any) -> None:
    from nbcompletions import Client, sweep
    from nbcompletions.server import StreamingASGITransport

    path = tmp_path / "c.sqlite"
    grid: dict[str, Any] = {"prompt": {"a": "To be", "b": "My lord,"}, "max_tokens": 4, "seed": 3}
    with Client(
        "http://embedded/v1", model="nbc-shakespeare", transport=StreamingASGITransport(app)
    ) as client:
        first = sweep(client, **grid, cache=path, progress=False, probe=False)
        raw = _raw(path)
        keys = [row[0] for row in raw.execute("SELECT key FROM responses ORDER BY key")]
        assert len(keys) == 2
        raw.execute("UPDATE responses SET key = 'tmp' WHERE key = ?", (keys[0],))
        raw.execute("UPDATE responses SET key = ? WHERE key = ?", (keys[0], keys[1]))
        raw.execute("UPDATE responses SET key = ?, digest = NULL WHERE key = 'tmp'", (keys[1],))
        raw.execute("UPDATE responses SET digest = NULL")
        raw.close()
        again = sweep(client, **grid, cache=path, progress=False, probe=False)
    assert again.usage["sent"] == 2  # fetched again, not served from the swapped rows
    texts = {row.prompt_id: row.text for row in first.choices.itertuples()}
    assert {row.prompt_id: row.text for row in again.choices.itertuples()} == texts
    with Cache(path) as cache:
        assert cache.verify() == []  # the refetched rows carry digests


def test_directory_path_uses_a_file_inside(tmp_path: Path) -> None:
    with Cache(tmp_path) as cache:
        cache.put("k", RESPONSE)
        assert cache.path == tmp_path / "cache.sqlite"
    assert (tmp_path / "cache.sqlite").exists()
    with Cache(tmp_path) as again:
        assert "k" in again


def test_close_checkpoints_so_the_file_alone_is_a_copy(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    # A notebook reading the same file keeps SQLite from checkpointing on its own at close.
    reader = sqlite3.connect(str(path))
    cache = Cache(path)
    reader.execute("SELECT COUNT(*) FROM responses").fetchall()
    cache.put("k", RESPONSE)
    cache.close()
    copy = tmp_path / "copy.sqlite"
    shutil.copyfile(path, copy)  # the naive copy: the main file only
    reader.close()
    with Cache(copy) as copied:
        assert "k" in copied


def test_backup_after_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    script = textwrap.dedent(
        f"""
        import os, signal
        from nbcompletions import Cache
        cache = Cache({str(path)!r})
        for i in range(50):
            cache.put(f"k{{i}}", {{"id": f"cmpl-{{i}}", "choices": []}})
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", script], check=False)
    assert done.returncode == -signal.SIGKILL
    assert Path(str(path) + "-wal").exists()  # the rows sit in the write-ahead log
    with Cache(path) as cache:
        copy = cache.backup(tmp_path / "backup.sqlite")
    assert not Path(str(copy) + "-wal").exists()
    with Cache(copy) as copied:
        assert len(copied) == 50
        assert copied.get("k49").response["id"] == "cmpl-49"  # type: ignore[union-attr]


def test_expired_claims_are_taken_over_and_live_ones_are_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The cache's clock is stepped by hand. On the wall clock (a 0.2 s lease, then a sleep) a
    # loaded machine could let the lease run out before the second claim, which then took a and b.
    now = [1_000_000.0]
    monkeypatch.setattr(_cache, "time", SimpleNamespace(time=lambda: now[0]))
    path = tmp_path / "c.sqlite"
    crashed = Cache(path, lease=10)
    other = Cache(path, lease=60)
    assert crashed.claim(["a", "b"]) == ["a", "b"]
    now[0] += 9.9
    assert other.claim(["a", "b", "c"]) == ["c"]  # a and b are someone else's, for now
    crashed._conn = None  # a crashed process: its claims stay in the file, unreleased
    now[0] += 0.2  # past crashed's lease; within other's
    assert other.claim(["a", "b"]) == ["a", "b"]
    other.put("a", RESPONSE)
    assert Cache(path).claim(["a"]) == []  # answered: nothing to claim
    other.close()


# -- two real processes on one cache --------------------------------------------------------------


class _Counting(http.server.ThreadingHTTPServer):
    daemon_threads = True
    hits = 0
    lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._answer({"object": "list", "data": [{"id": "counted", "object": "model"}]})

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        server = self.server
        assert isinstance(server, _Counting)
        with server.lock:
            server.hits += 1
        time.sleep(0.01)  # slow enough that the two sweeps overlap
        self._answer(RESPONSE)

    def _answer(self, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def counting_server() -> Iterator[_Counting]:
    server = _Counting(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_two_processes_on_one_cache_pay_once(tmp_path: Path, counting_server: _Counting) -> None:
    base = f"http://127.0.0.1:{counting_server.server_address[1]}/v1"
    path = tmp_path / "shared.sqlite"
    script = textwrap.dedent(
        f"""
        import sys
        from nbcompletions import Client, sweep
        client = Client({base!r}, api_key="sk-x", model="counted", max_concurrency=4)
        result = sweep(client, prompt=["a", "b"], temperature=[0.5, 1.0], repeats=30,
                       max_tokens=2, cache={str(path)!r}, progress=False, probe=False)
        assert result.n_failed == 0, result.requests["error"].dropna().tolist()
        assert len(result.choices) == 120
        print(result.usage["sent"])
        """
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert counting_server.hits == 120, [o.decode() for o in outs]
    with Cache(path) as cache:
        assert len(cache) == 120


@pytest.mark.slow
def test_processes_opening_an_old_cache_at_once_all_upgrade_it(tmp_path: Path) -> None:
    """A file written before the usage and digest columns: eight processes open it at the same
    moment; each must see the columns added once (it used to fail with 'duplicate column')."""
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:
        conn.execute(
            "CREATE TABLE responses (key TEXT PRIMARY KEY, response TEXT NOT NULL, "
            "latency REAL, created REAL NOT NULL)"
        )
        conn.execute("INSERT INTO responses VALUES ('k', '{}', 0.1, 1.0)")
    start = time.time() + 3.0  # every process waits for this moment, then opens the file
    code = textwrap.dedent(
        f"""
        import time
        from nbcompletions import Cache
        time.sleep(max(0.0, {start!r} - time.time()))
        cache = Cache({str(path)!r})
        cache.close()
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(8)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [e[-1500:] for e in errors if e]
    with sqlite3.connect(path) as conn:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(responses)")]
    assert columns[-5:] == [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "response_id",
        "digest",
    ]


# -- the disk, not the file: errors that must not be called damage --------------------------------


class _FailingConnection:
    """A real connection whose statements fail once ``error`` is set, as a full or failing disk
    makes SQLite fail (with SQLite's own messages)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.error: Exception | None = None

    def execute(self, sql: str, *args: Any) -> Any:
        if self.error is not None:
            raise self.error
        return self._conn.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.mark.parametrize(
    ("error", "said"),
    [
        (sqlite3.OperationalError("database or disk is full"), "full"),
        (sqlite3.OperationalError("disk I/O error"), "I/O error"),
    ],
)
def test_a_full_or_failing_disk_says_so_and_does_not_call_the_file_damaged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, said: str
) -> None:
    path = tmp_path / "c.sqlite"
    with Cache(path) as cache:
        cache.put("k", RESPONSE)
    real_connect = sqlite3.connect
    opened: list[_FailingConnection] = []

    def connect(*args: Any, **kwargs: Any) -> Any:
        opened.append(_FailingConnection(real_connect(*args, **kwargs)))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", connect)
    cache = Cache(path)
    opened[0].error = error  # the disk fills up (or fails) while the sweep writes
    with pytest.raises(CacheError) as caught:
        cache.put("new", RESPONSE)
    message = str(caught.value)
    assert str(path) in message
    assert said in message
    assert _cache._DAMAGED_FIX not in message
    assert "move it aside" not in message
    assert caught.value.path == path
    cache.close()
    monkeypatch.undo()
    with Cache(path) as reopened:  # the advice was right: the file is intact
        assert reopened.get("k").response == RESPONSE  # type: ignore[union-attr]
        assert reopened.verify() == []


def test_an_os_error_opening_the_cache_names_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def connect(*args: Any, **kwargs: Any) -> Any:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sqlite3, "connect", connect)
    path = tmp_path / "c.sqlite"
    with pytest.raises(CacheError) as caught:
        Cache(path)
    message = str(caught.value)
    assert str(path) in message
    assert "No space left on device" in message
    assert "full" in message
    assert "move it aside" not in message


# -- claims of a process that died ----------------------------------------------------------------

_HOLDER = """
import sys, time
from nbcompletions import Cache
cache = Cache(sys.argv[1], lease=float(sys.argv[2]))
print(",".join(cache.claim(["a", "b"])), flush=True)
while True:  # a live sweep renews its claims while it runs
    time.sleep(0.1)
    cache.renew()
"""


@contextlib.contextmanager
def _holder(path: Path, lease: float) -> Iterator[subprocess.Popen[str]]:
    """A real process holding claims on a and b, renewing them until it is killed."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path), str(lease)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "a,b"
            yield holder
        finally:
            holder.kill()
            holder.wait(timeout=30)


def test_a_rerun_after_kill_9_takes_the_dead_claims_at_once(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with _holder(path, lease=600.0) as holder, Cache(path) as cache:
        assert cache.claim(["a", "b", "c"]) == ["c"]  # a live process keeps its claims
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        # Same host, its process gone: its claims are taken now, not in 600 s.
        assert cache.claim(["a", "b"]) == ["a", "b"]


@pytest.mark.slow
def test_a_live_process_renews_its_claims_past_their_lease(tmp_path: Path) -> None:
    path = tmp_path / "c.sqlite"
    with _holder(path, lease=2.0):
        time.sleep(3.0)  # longer than the lease: only renewal keeps the claims
        with Cache(path) as cache:
            assert cache.claim(["a", "b", "c"]) == ["c"]


def test_claims_of_another_host_wait_for_their_lease(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No process of another machine can be looked up: its claims hold until they expire.
    now = [1_000_000.0]
    monkeypatch.setattr(_cache, "time", SimpleNamespace(time=lambda: now[0]))
    path = tmp_path / "c.sqlite"
    with Cache(path, lease=10) as cache:
        raw = _raw(path)
        raw.execute(
            "INSERT INTO claims (key, owner, expires) VALUES ('a', ?, ?)",
            ("elsewhere:999999999:0123456789ab", now[0] + 10),
        )
        raw.close()
        assert cache.claim(["a"]) == []
        now[0] += 10.1
        assert cache.claim(["a"]) == ["a"]
