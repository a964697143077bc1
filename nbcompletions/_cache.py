"""A persistent response cache for sweeps: one SQLite file, one row per finished request.

Why SQLite: it ships with Python, a committed row survives a kernel interrupt or a crash, and WAL
mode lets a notebook read the file while a sweep writes to it. Every response is committed as soon
as it arrives, so an interrupted sweep loses nothing that had finished; re-running it sends only
what is missing. Failed requests are never stored: a retry later should get a real answer.

The key is the SHA-256 of canonical JSON of everything that determines a response: the endpoint,
the model, every request field that is set (``CompletionRequest.to_body()``, which includes
``extra``) and the repeat number. Two requests that differ only in how their JSON was written get
the same key. Sweeps add a fingerprint of the weights to the endpoint for the embedded model,
whose id stays the same when it is retrained.
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

__all__ = ["Cache", "CachedResponse", "cache_key", "cache_keys"]

# The usage numbers and id are kept in their own columns so that reading a finished sweep back
# needs no JSON parsing until its frames are asked for.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    response TEXT NOT NULL,
    latency REAL,
    created REAL NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    total_tokens INTEGER,
    response_id TEXT
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
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _key_body(request: CompletionRequest | Mapping[str, Any], model: str | None) -> dict[str, Any]:
    body = request.to_body() if isinstance(request, CompletionRequest) else dict(request)
    body.setdefault("model", model)
    # stream changes the transport, not the answer: a streamed and a plain request share a response.
    body.pop("stream", None)
    body.pop("stream_options", None)
    return body


def cache_key(
    endpoint: str, model: str | None, request: CompletionRequest | Mapping[str, Any], repeat: int
) -> str:
    """The cache key of one request: sha256 hex of canonical JSON of what determines its response.

    The JSON is ``{"body": <request body>, "endpoint": <base URL>, "repeat": <n>}`` with sorted keys
    and no spaces. ``model`` is the model the client sends when the request names none; a request's
    own ``model`` wins, as on the wire.
    """
    payload = {
        "endpoint": endpoint.rstrip("/"),
        "body": _key_body(request, model),
        "repeat": int(repeat),
    }
    return hashlib.sha256(_canonical(payload).encode("utf-8")).hexdigest()


def cache_keys(
    endpoint: str, model: str | None, request: CompletionRequest | Mapping[str, Any], repeats: int
) -> list[str]:
    """``[cache_key(endpoint, model, request, r) for r in range(repeats)]``, computed faster.

    "repeat" sorts last in the canonical JSON, so every repeat's text shares the prefix up to
    ``"repeat":``; it is serialised and hashed once and the hash state copied per repeat.
    """
    prefix = {"body": _key_body(request, model), "endpoint": endpoint.rstrip("/")}
    head = _canonical(prefix)[:-1] + ',"repeat":'
    state = hashlib.sha256(head.encode("utf-8"))
    keys = []
    for repeat in range(repeats):
        one = state.copy()
        one.update(f"{repeat}}}".encode())
        keys.append(one.hexdigest())
    return keys


_USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens")


class CachedResponse:
    """One stored response: its JSON (parsed on first access of ``response``), usage numbers,
    response id and how long the request took when it was sent."""

    __slots__ = ("_parsed", "created", "latency", "response_id", "text", "usage")

    def __init__(
        self,
        text: str,
        latency: float | None,
        created: float,
        usage: dict[str, int] | None = None,
        response_id: str | None = None,
    ) -> None:
        self.text = text
        self.latency = latency
        self.created = created
        self.usage = usage or {}
        self.response_id = response_id
        self._parsed: dict[str, Any] | None = None

    @property
    def response(self) -> dict[str, Any]:
        if self._parsed is None:
            self._parsed = json.loads(self.text)
        return self._parsed

    def __repr__(self) -> str:
        return f"CachedResponse(id={self.response_id!r}, latency={self.latency!r})"


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
            str(self.path), check_same_thread=False, isolation_level=None
        )
        # WAL: readers never block the writer; NORMAL sync is durable against a process crash (the
        # case that matters for a kernel interrupt) without an fsync per response.
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.executescript(_SCHEMA)
        present = {row[1] for row in self._conn.execute("PRAGMA table_info(responses)")}
        for column, kind in (
            ("prompt_tokens", "INTEGER"),
            ("completion_tokens", "INTEGER"),
            ("total_tokens", "INTEGER"),
            ("response_id", "TEXT"),
        ):
            if column not in present:  # a file written by an earlier version
                self._conn.execute(f"ALTER TABLE responses ADD COLUMN {column} {kind}")

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
                "SELECT 1 FROM responses WHERE key = ?", (key,)
            ).fetchone()
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
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._connection.execute(
                    "SELECT key, response, latency, created, prompt_tokens, completion_tokens, "
                    f"total_tokens, response_id FROM responses WHERE key IN ({marks})",
                    chunk,
                ).fetchall()
                for key, text, latency, created, prompt, completion, total, rid in rows:
                    usage = {
                        name: value
                        for name, value in zip(
                            _USAGE_FIELDS, (prompt, completion, total), strict=True
                        )
                        if value is not None
                    }
                    found[key] = CachedResponse(text, latency, created, usage, rid)
        return found

    def put(self, key: str, response: Mapping[str, Any], *, latency: float | None = None) -> None:
        """Store one response and commit at once (autocommit), so an interrupt cannot lose it."""
        # Not _canonical: a server may have sent -Infinity (Python's json reads it), and the
        # stored text must round-trip whatever was received.
        text = json.dumps(dict(response), separators=(",", ":"), ensure_ascii=False)
        usage = response.get("usage")
        usage = usage if isinstance(usage, Mapping) else {}
        numbers = [
            usage.get(name) if isinstance(usage.get(name), int) else None for name in _USAGE_FIELDS
        ]
        rid = response.get("id")
        with self._lock:
            self._connection.execute(
                "INSERT OR REPLACE INTO responses (key, response, latency, created, prompt_tokens, "
                "completion_tokens, total_tokens, response_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, text, latency, time.time(), *numbers, rid if isinstance(rid, str) else None),
            )

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
            row = self._connection.execute(
                "SELECT value FROM meta WHERE key = ?", (key,)
            ).fetchone()
        return None if row is None else json.loads(row[0])

    def set_meta(self, key: str, value: Any) -> None:
        text = _canonical(value)
        with self._lock:
            self._connection.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text)
            )

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Cache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
