"""A persistent response cache for sweeps: one SQLite file, one row per finished request.

Why SQLite: it ships with Python, a committed row survives a kernel interrupt or a crash, and WAL
mode lets a notebook read the file while a sweep writes to it. Every response is committed as soon
as it arrives, so an interrupted sweep loses nothing that had finished; re-running it sends only
what is missing. Failed requests are never stored: a retry later should get a real answer.

The key is the SHA-256 of canonical JSON of everything that determines a response: the endpoint,
the model, every request field that is set (``CompletionRequest.to_body()``, which includes
``extra``) and the repeat number. Two requests that differ only in how their JSON was written get
the same key.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from ._request import CompletionRequest

__all__ = ["Cache", "CachedResponse", "cache_key"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    response TEXT NOT NULL,
    latency REAL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# SQLite caps the number of parameters in one statement (999 on old builds); look keys up in chunks.
_LOOKUP_CHUNK = 500


def _canonical(value: Any) -> str:
    # sort_keys + no spaces: the same request always serialises to the same bytes. allow_nan=False
    # because NaN has no JSON spelling and validated requests never hold one.
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)


def cache_key(endpoint: str, model: str | None, request: CompletionRequest | Mapping[str, Any],
              repeat: int) -> str:
    """The cache key of one request: sha256 hex of canonical JSON of what determines its response.

    ``model`` is the model the client sends when the request names none; a request's own ``model``
    wins, as on the wire.
    """
    body = request.to_body() if isinstance(request, CompletionRequest) else dict(request)
    body.setdefault("model", model)
    # stream changes the transport, not the answer: a streamed and a plain request share a response.
    body.pop("stream", None)
    body.pop("stream_options", None)
    payload = {"endpoint": endpoint.rstrip("/"), "body": body, "repeat": int(repeat)}
    return hashlib.sha256(_canonical(payload).encode("utf-8")).hexdigest()


class CachedResponse:
    """One stored response: the response JSON and how long the request took when it was sent."""

    __slots__ = ("created", "latency", "response")

    def __init__(self, response: dict[str, Any], latency: float | None, created: float) -> None:
        self.response = response
        self.latency = latency
        self.created = created

    def __repr__(self) -> str:
        return f"CachedResponse(id={self.response.get('id')!r}, latency={self.latency!r})"


class Cache:
    """A SQLite file of responses keyed by `cache_key`.

    ``Cache("sweep.sqlite")`` creates the file (and its directory) when missing. Safe to share
    between threads: one connection guarded by a lock, because the sweep writes from the client's
    event-loop thread while the notebook's thread may read.
    Use as a context manager or call `close`.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        if isinstance(path, bool) or not isinstance(path, str | os.PathLike):
            raise TypeError(f"cache must be a file path or a Cache; got {path!r}")
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = sqlite3.connect(
            str(self.path), check_same_thread=False, isolation_level=None)
        # WAL: readers never block the writer; NORMAL sync is durable against a process crash (the
        # case that matters for a kernel interrupt) without an fsync per response.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{len(self)} responses"
        return f"Cache({str(self.path)!r}, {state})"

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the cache {str(self.path)!r} is closed")
        return self._conn

    def __len__(self) -> int:
        with self._lock:
            row = self._connection.execute("SELECT COUNT(*) FROM responses").fetchone()
        return int(row[0])

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._lock:
            row = self._connection.execute(
                "SELECT 1 FROM responses WHERE key = ?", (key,)).fetchone()
        return row is not None

    def get(self, key: str) -> CachedResponse | None:
        """The stored response for ``key``, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedResponse]:
        """Stored responses for those of ``keys`` that are present (one query per 500 keys)."""
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CachedResponse] = {}
        with self._lock:
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start:start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._connection.execute(
                    f"SELECT key, response, latency, created FROM responses WHERE key IN ({marks})",
                    chunk).fetchall()
                for key, text, latency, created in rows:
                    found[key] = CachedResponse(json.loads(text), latency, created)
        return found

    def put(self, key: str, response: Mapping[str, Any], *, latency: float | None = None) -> None:
        """Store one response and commit at once (autocommit), so an interrupt cannot lose it."""
        # Not _canonical: a server may have sent -Infinity (Python's json reads it), and the
        # stored text must round-trip whatever was received.
        text = json.dumps(dict(response), separators=(",", ":"), ensure_ascii=False)
        with self._lock:
            self._connection.execute(
                "INSERT OR REPLACE INTO responses (key, response, latency, created) "
                "VALUES (?, ?, ?, ?)", (key, text, latency, time.time()))

    def delete(self, key: str) -> None:
        with self._lock:
            self._connection.execute("DELETE FROM responses WHERE key = ?", (key,))

    def clear(self) -> None:
        """Remove every stored response and note."""
        with self._lock:
            self._connection.execute("DELETE FROM responses")
            self._connection.execute("DELETE FROM meta")

    def get_meta(self, key: str) -> Any:
        """A JSON value stored with `set_meta` (an endpoint's probed capabilities, say), or None."""
        with self._lock:
            row = self._connection.execute("SELECT value FROM meta WHERE key = ?",
                                           (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        text = _canonical(value)
        with self._lock:
            self._connection.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
                                     (key, text))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
