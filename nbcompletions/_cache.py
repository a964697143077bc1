"""A persistent response cache for sweeps: one SQLite file, one row per finished request.

Why SQLite: it ships with Python, a committed row survives a kernel interrupt or a crash, and WAL
mode lets a notebook read the file while a sweep writes to it. Every response is committed as soon
as it arrives (a sweep commits those that arrive in one step of its event loop together,
`Cache.put_many`, before it counts them finished), so an interrupted sweep loses nothing that had
finished; re-running it sends only what is missing. Failed requests are never stored: a retry
later should get a real answer.

What makes a row trustworthy:

- Each response is stored zlib-compressed (plain JSON text from earlier versions still reads)
  with a digest: sha256 of its key and its stored bytes. A row moved to another key, or altered,
  no longer matches and reading it raises `CacheError` instead of answering for the wrong
  request. A row without a digest (written by a version before digests) cannot be tied to its
  request, so it is never served: it reads as missing, is fetched again, and the new answer
  replaces it. `Cache.verify` lists both kinds (and can remove them).
- Every SQLite or file-system failure is a `CacheError` naming the file and what to do; only
  what shows damage (not a database, malformed) is called damage: a full disk or an I/O error
  says so, and the file it names is left as it is.
- Several processes can share one file without paying twice: a sweep claims requests
  (`Cache.claim`) before it sends them; others skip what is claimed and read the answer when it is
  stored. A claim is a lease (``lease`` seconds, renewed while the sweep runs), so the claims of a
  process that crashed expire and are taken over; a claim names its host and process, so on the
  same host the claims of a process that is gone (``kill -9``) are taken over at once.
- Copying: while a cache is open (or after its process was killed) recent rows can sit in the
  ``-wal`` file beside it, so copying the main file alone can lose them. `Cache.close` checkpoints
  them into the main file; to copy a cache at any time use `Cache.backup` (SQLite's backup API).

The key is the SHA-256 of canonical JSON of everything that determines a response: the endpoint,
the model, every request field that is set (``CompletionRequest.to_body()``, which includes
``extra``) and the repeat number. Two requests that differ only in how their JSON was written get
the same key. Sweeps add a fingerprint of the weights to the endpoint for the embedded model,
whose id stays the same when it is retrained.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from time import monotonic as _monotonic
from time import sleep as _sleep
from types import TracebackType
from typing import Any

from ._chat import ChatRequest
from ._checks import finite_float, invalid
from ._errors import CacheError
from ._parse import loads
from ._request import CompletionRequest
from ._usage import USAGE_FIELDS, usage_counts

#: What a cache key is made of: a request, or its JSON body.
KeyedRequest = CompletionRequest | ChatRequest | Mapping[str, Any]

__all__ = [
    "DIRECTORY_FILE",
    "Cache",
    "CachedResponse",
    "cache_key",
    "cache_keys",
    "key_state",
]

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
    response_id TEXT,
    digest TEXT
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS claims (
    key TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    expires REAL NOT NULL
);
"""

#: The file a cache uses when it is given a directory.
DIRECTORY_FILE = "cache.sqlite"

# zlib level 1: responses (logprobs especially) shrink ~5x at a few microseconds each; higher
# levels gain little on short JSON and cost time on every response a sweep stores.
_ZLIB_LEVEL = 1

#: Where a row counts as an answer: its digest ties it to its key (rows without one are refetched).
_TRUSTED = "digest IS NOT NULL"

_DAMAGED_FIX = (
    "the file is damaged or is not an nbcompletions cache: move it aside (responses will be "
    "fetched again) or restore a copy made with Cache.backup()"
)

# SQLite caps the number of parameters in one statement (999 on old builds); look keys up in chunks.
_LOOKUP_CHUNK = 500


def _canonical(value: Any) -> str:
    # sort_keys + no spaces: the same request always serialises to the same bytes. allow_nan=False
    # because NaN has no JSON spelling and validated requests never hold one.
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def _key_body(request: KeyedRequest, model: str | None) -> dict[str, Any]:
    body = (
        request.to_body() if isinstance(request, CompletionRequest | ChatRequest) else dict(request)
    )
    body.setdefault("model", model)
    # stream changes the transport, not the answer: a streamed and a plain request share a response.
    body.pop("stream", None)
    body.pop("stream_options", None)
    return body


def _key_payload(endpoint: str, model: str | None, request: KeyedRequest) -> dict[str, Any]:
    """What a key hashes but the repeat. A request to another API than Completions (a
    `ChatRequest`: ``api`` "chat") adds ``"api"``, so a chat request and a completion request
    never share a key, whatever their bodies; completion keys are as they always were."""
    payload = {"body": _key_body(request, model), "endpoint": endpoint.rstrip("/")}
    api = getattr(request, "api", "completions")
    if api != "completions":
        payload["api"] = api
    return payload


def cache_key(endpoint: str, model: str | None, request: KeyedRequest, repeat: int) -> str:
    """The cache key of one request: sha256 hex of canonical JSON of what determines its response.

    The JSON is ``{"body": <request body>, "endpoint": <base URL>, "repeat": <n>}`` with sorted keys
    and no spaces (and ``"api": "chat"`` for a chat request). ``model`` is the model the client
    sends when the request names none; a request's own ``model`` wins, as on the wire.
    """
    payload = {**_key_payload(endpoint, model, request), "repeat": int(repeat)}
    return hashlib.sha256(_canonical(payload).encode("utf-8")).hexdigest()


def key_state(endpoint: str, model: str | None, request: KeyedRequest) -> Any:
    """A sha256 state holding everything of a request's key but the repeat: ``state.copy()``,
    ``update(f"{repeat}}}".encode())`` and ``hexdigest()`` give `cache_key` for that repeat.

    "repeat" sorts last in the canonical JSON, so every repeat's text shares the prefix up to
    ``"repeat":``; it is serialised and hashed once. Two requests with equal ``hexdigest()`` of
    this state have equal keys for every repeat.
    """
    prefix = _key_payload(endpoint, model, request)
    head = _canonical(prefix)[:-1] + ',"repeat":'
    return hashlib.sha256(head.encode("utf-8"))


def cache_keys(endpoint: str, model: str | None, request: KeyedRequest, repeats: int) -> list[str]:
    """``[cache_key(endpoint, model, request, r) for r in range(repeats)]``, computed faster
    (see `key_state`)."""
    state = key_state(endpoint, model, request)
    keys = []
    for repeat in range(repeats):
        one = state.copy()
        one.update(f"{repeat}}}".encode())
        keys.append(one.hexdigest())
    return keys


def _digest(key: str, stored: bytes | str) -> str:
    """What ties a stored response to its request: sha256 of the key and the stored bytes."""
    data = stored if isinstance(stored, bytes) else stored.encode("utf-8")
    return hashlib.sha256(key.encode("utf-8") + b"\0" + data).hexdigest()[:32]


_INSERT = (
    "INSERT OR REPLACE INTO responses (key, response, latency, created, prompt_tokens, "
    "completion_tokens, total_tokens, response_id, digest) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _as_received(text: bytes | None) -> bytes | None:
    """``text`` when it can be stored as it came: UTF-8 (what `CachedResponse.text` decodes)
    without a byte-order mark; else None, and the parsed response is written out instead."""
    if text is None or text.startswith(b"\xef\xbb\xbf"):
        return None
    try:
        text.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text


def _row(
    key: str, response: Mapping[str, Any], latency: float | None, text: bytes | None = None
) -> tuple[Any, ...]:
    """One response as a row of the ``responses`` table: compressed, with its digest."""
    data = _as_received(text)
    if data is None:
        # Not _canonical: a server may have sent -Infinity (Python's json reads it), and the
        # stored text must round-trip whatever was received.
        data = json.dumps(dict(response), separators=(",", ":"), ensure_ascii=False).encode()
    stored = zlib.compress(data, _ZLIB_LEVEL)
    numbers = usage_counts(response.get("usage")).values()  # in USAGE_FIELDS' order
    rid = response.get("id")
    return (
        key,
        stored,
        latency,
        time.time(),
        *numbers,
        rid if isinstance(rid, str) else None,
        _digest(key, stored),
    )


def _fix_for(exc: sqlite3.Error | OSError) -> str:
    if isinstance(exc, OSError):
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return _fix_for(sqlite3.OperationalError("database or disk is full"))
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT):
            return _fix_for(sqlite3.OperationalError("unable to open"))
        return _fix_for(sqlite3.OperationalError("disk I/O error"))
    text = str(exc).lower()
    if "locked" in text or "busy" in text:
        return (
            "another process holds a write lock on it for too long; wait for it to finish, or "
            "give each process its own cache file"
        )
    if "full" in text:
        return (
            "the disk (or quota) it is on is full: free some space and run again; the file is "
            "not damaged and keeps every response stored so far"
        )
    if "i/o error" in text:
        return (
            "the operating system failed to read or write it (a failing disk, a network file "
            "system that went away): this does not mean the file is damaged, so keep it; check "
            "the disk or mount and run again"
        )
    if "unable to open" in text or "readonly" in text or "read-only" in text:
        return "check that its directory exists and is writable, and that the path is a file"
    if any(sign in text for sign in _DAMAGE_SIGNS):
        return _DAMAGED_FIX
    return "run again; if it persists, copy the file with Cache.backup() and report the message"


#: What SQLite says of a file that is damaged or is not a cache (and nothing else is called so).
_DAMAGE_SIGNS = ("malformed", "not a database", "no such table", "no such column", "corrupt")


def _this_host() -> str:
    """This machine, and on Linux its process namespace (containers on one host that share a
    cache have their own process ids): claims from the same place can be checked by pid."""
    host = socket.gethostname().replace(":", "_") or "host"
    try:
        namespace = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
    except OSError:
        return host
    return host + "#" + "".join(ch for ch in namespace if ch.isdigit())


_HOST = _this_host()


def _owner_may_live(owner: str) -> bool:
    """False only when ``owner`` (``host:pid:nonce``) is a process of this host that is gone.
    Another host's processes cannot be looked up, so their claims hold until they expire; a
    reused pid only makes a claim wait out its lease, as before."""
    host, _, rest = owner.partition(":")
    pid_text = rest.partition(":")[0]
    if host != _HOST or not pid_text.isdigit() or os.name != "posix":
        return True  # (os.kill on Windows would end the process, not probe it)
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's live process; a pid beyond range
        return True
    return True


def _wal(conn: sqlite3.Connection, wait: float = 30.0) -> None:
    """Switch the file to WAL. SQLite answers "database is locked" at once, without waiting the
    connection's timeout, while another process opens the same file: retry until ``wait``."""
    deadline = _monotonic() + wait
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or _monotonic() > deadline:
                raise
            _sleep(0.02)


class CachedResponse:
    """One stored response: its JSON (decompressed and parsed on first access of ``response``),
    usage numbers, response id and how long the request took when it was sent."""

    __slots__ = (
        "_parsed",
        "_source",
        "_stored",
        "created",
        "key",
        "latency",
        "response_id",
        "usage",
    )

    def __init__(
        self,
        stored: bytes | str,
        latency: float | None,
        created: float,
        usage: dict[str, int] | None = None,
        response_id: str | None = None,
        *,
        key: str = "",
        source: str = "",
    ) -> None:
        self._stored = stored
        self.latency = latency
        self.created = created
        self.usage = usage or {}
        self.response_id = response_id
        self.key = key
        self._source = source
        self._parsed: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The response's JSON text, as received."""
        stored = self._stored
        if isinstance(stored, str):  # a row written before responses were compressed
            return stored
        try:
            return zlib.decompress(stored).decode("utf-8")
        except (zlib.error, UnicodeDecodeError) as exc:
            raise self._bad_row(f"its stored response does not decompress ({exc})") from None

    @property
    def response(self) -> dict[str, Any]:
        if self._parsed is None:
            try:
                parsed = loads(self.text)
            except ValueError as exc:
                raise self._bad_row(f"its stored response is not valid JSON ({exc})") from None
            if not isinstance(parsed, dict):
                raise self._bad_row(f"its stored response is not a JSON object: {parsed!r:.80}")
            self._parsed = parsed
        return self._parsed

    def _bad_row(self, what: str) -> CacheError:
        return CacheError(
            f"the cache {self._source!r} holds a bad row for key {self.key!r}: {what}; remove "
            f"the bad rows with Cache({self._source!r}).verify(remove=True) and re-run (they "
            "are fetched again)",
            path=Path(self._source) if self._source else None,
            key=self.key,
        )

    def __repr__(self) -> str:
        return f"CachedResponse(id={self.response_id!r}, latency={self.latency!r})"


def _resolve(path: str | os.PathLike[str]) -> Path:
    """A file path for the cache: a directory (existing, or written with a trailing slash) gets
    a file named `DIRECTORY_FILE` inside it."""
    text = os.fspath(path)
    resolved = Path(text)
    if resolved.is_dir() or text.endswith(("/", os.sep)):
        return resolved / DIRECTORY_FILE
    return resolved


class Cache:
    """A SQLite file of responses keyed by `cache_key`.

    ``Cache("sweep.sqlite")`` creates the file (and its directory) when missing; a directory
    (``Cache("study/")``) gets a file ``cache.sqlite`` inside it. Safe to share between threads
    (one connection guarded by a lock: the sweep writes from the client's event-loop thread while
    the notebook's thread may read) and between processes (see `claim`; ``lease`` is how many
    seconds a claim holds unless renewed). Use as a context manager or call `close`, which also
    folds the write-ahead log into the file; `backup` copies it safely at any time.
    Every SQLite failure is raised as `CacheError`, naming the file and the fix.
    """

    def __init__(self, path: str | os.PathLike[str], *, lease: float = 60.0) -> None:
        if isinstance(path, bool) or not isinstance(path, str | os.PathLike):
            raise TypeError(f"cache must be a file path or a Cache; got {path!r}")
        lease_seconds = finite_float(lease)
        if lease_seconds is None or not lease_seconds > 0:
            raise invalid("lease", "a number of seconds > 0", lease)
        self.path = _resolve(path)
        self.lease = lease_seconds
        # One owner per Cache object: two objects in one process share nothing but the file.
        self.owner = f"{_HOST}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        with self._sqlite():
            if self.path.parent and not self.path.parent.exists():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            # timeout: how long a write waits for another process's write to finish.
            conn = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0
            )
            try:
                # WAL: readers never block the writer; NORMAL sync is durable against a process
                # crash (the case that matters for a kernel interrupt) without an fsync per row.
                _wal(conn)
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
                # One writer at a time reads the columns and adds the missing ones: two processes
                # opening a file of an earlier version at once would both add a column otherwise.
                conn.execute("BEGIN IMMEDIATE")
                try:
                    present = {row[1] for row in conn.execute("PRAGMA table_info(responses)")}
                    for column, kind in (
                        ("prompt_tokens", "INTEGER"),
                        ("completion_tokens", "INTEGER"),
                        ("total_tokens", "INTEGER"),
                        ("response_id", "TEXT"),
                        ("digest", "TEXT"),
                    ):
                        if column not in present:  # a file written by an earlier version
                            conn.execute(f"ALTER TABLE responses ADD COLUMN {column} {kind}")
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except BaseException:
                conn.close()
                raise
            self._conn = conn

    @contextlib.contextmanager
    def _sqlite(self, key: str | None = None) -> Iterator[None]:
        """Turn any SQLite failure into a `CacheError` that names this file and the fix."""
        try:
            yield
        except (sqlite3.Error, OSError) as exc:
            where = "SQLite" if isinstance(exc, sqlite3.Error) else "the operating system"
            raise CacheError(
                f"the cache {str(self.path)!r} could not be used ({where}: {exc}); {_fix_for(exc)}",
                path=self.path,
                key=key,
            ) from exc

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{len(self)} responses"
        return f"Cache({str(self.path)!r}, {state})"

    @property
    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError(f"the cache {str(self.path)!r} is closed")
        return self._conn

    def __len__(self) -> int:
        with self._lock, self._sqlite():
            row = self._connection.execute(
                f"SELECT COUNT(*) FROM responses WHERE {_TRUSTED}"
            ).fetchone()
        return int(row[0])

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        with self._lock, self._sqlite(key):
            row = self._connection.execute(
                f"SELECT 1 FROM responses WHERE key = ? AND {_TRUSTED}", (key,)
            ).fetchone()
        return row is not None

    def get(self, key: str) -> CachedResponse | None:
        """The stored response for ``key``, or None."""
        return self.get_many([key]).get(key)

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedResponse]:
        """Stored responses for those of ``keys`` that are present (one query per 500 keys).

        Raises `CacheError` for a row that does not belong to its key (see the module docstring).
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, CachedResponse] = {}
        source = str(self.path)
        with self._lock, self._sqlite():
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = self._connection.execute(
                    "SELECT key, response, latency, created, prompt_tokens, completion_tokens, "
                    f"total_tokens, response_id, digest FROM responses WHERE key IN ({marks}) "
                    f"AND {_TRUSTED}",
                    chunk,
                ).fetchall()
                for key, stored, latency, created, prompt, completion, total, rid, digest in rows:
                    usage = {
                        name: value
                        for name, value in zip(
                            USAGE_FIELDS, (prompt, completion, total), strict=True
                        )
                        if value is not None
                    }
                    entry = CachedResponse(
                        stored, latency, created, usage, rid, key=key, source=source
                    )
                    if digest != _digest(key, stored):
                        raise entry._bad_row(
                            "its response does not belong to its request (the digest stored "
                            "with it does not match: rows were moved or altered)"
                        )
                    found[key] = entry
        return found

    def keys_present(self, keys: Iterable[str]) -> set[str]:
        """Those of ``keys`` that have a stored response (reads no responses)."""
        wanted = list(dict.fromkeys(keys))
        present: set[str] = set()
        with self._lock, self._sqlite():
            for start in range(0, len(wanted), _LOOKUP_CHUNK):
                chunk = wanted[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                present.update(
                    row[0]
                    for row in self._connection.execute(
                        f"SELECT key FROM responses WHERE key IN ({marks}) AND {_TRUSTED}", chunk
                    )
                )
        return present

    def verify(self, *, remove: bool = False) -> list[str]:
        """The keys of rows that cannot be trusted (no digest, digest mismatch, not
        decompressible, not a JSON object); with ``remove=True`` they are deleted, so a re-run
        fetches them again (rows without a digest are fetched again anyway)."""
        with self._lock, self._sqlite():
            rows = self._connection.execute("SELECT key, response, digest FROM responses")
            bad = []
            for key, stored, digest in rows:
                if digest is None or digest != _digest(key, stored):
                    bad.append(key)
                    continue
                try:
                    CachedResponse(stored, None, 0.0, key=key).response  # noqa: B018
                except CacheError:
                    bad.append(key)
            if remove:
                for key in bad:
                    self._connection.execute("DELETE FROM responses WHERE key = ?", (key,))
        return bad

    def put(
        self,
        key: str,
        response: Mapping[str, Any],
        *,
        latency: float | None = None,
        text: bytes | None = None,
    ) -> None:
        """Store one response and commit at once (autocommit), so an interrupt cannot lose it.
        ``text``, the response's JSON as received (``response`` parsed from it), is stored as it
        came instead of writing ``response`` out again.

        A claim this cache held on ``key`` needs no release: an answered key is never claimed
        again (see `claim`), and `close` drops this cache's claim rows.
        """
        row = _row(key, response, latency, text)
        with self._lock, self._sqlite(key):
            self._connection.execute(_INSERT, row)

    def put_many(
        self, items: Iterable[tuple[str, Mapping[str, Any], float | None, bytes | None]]
    ) -> None:
        """Store several ``(key, response, latency, text)`` as `put` does, in one transaction:
        all are committed when this returns, or none is. A commit per response is most of what
        storing one costs, so a sweep stores those that arrive together this way."""
        rows = [_row(*item) for item in items]
        if not rows:
            return
        with self._lock, self._sqlite(rows[0][0]):
            conn = self._connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(_INSERT, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    # -- claims: several processes, one file -------------------------------------------------------
    def claim(self, keys: Iterable[str]) -> list[str]:
        """Claim ``keys`` for this cache, in one transaction; returns those now held.

        Keys already answered, or claimed by another live owner, are not returned: their
        answer will appear in the file. A claim lasts ``lease`` seconds unless `renew` extends it
        (a sweep renews while it runs), so a crashed owner's claims are taken over; those of an
        owner on this host whose process is gone are taken over at once.
        """
        wanted = list(dict.fromkeys(keys))
        held: list[str] = []
        with self._lock, self._sqlite():
            conn = self._connection
            conn.execute("BEGIN IMMEDIATE")
            try:
                now = time.time()
                # One look-up per owner, not per key, and a fresh one each claim.
                may_live = functools.cache(_owner_may_live)
                for start in range(0, len(wanted), _LOOKUP_CHUNK):
                    chunk = wanted[start : start + _LOOKUP_CHUNK]
                    marks = ",".join("?" * len(chunk))
                    taken = {
                        row[0]
                        for row in conn.execute(
                            f"SELECT key FROM responses WHERE key IN ({marks}) AND {_TRUSTED}",
                            chunk,
                        )
                    }
                    taken.update(
                        key
                        for key, owner in conn.execute(
                            f"SELECT key, owner FROM claims WHERE key IN ({marks}) "
                            "AND owner != ? AND expires > ?",
                            (*chunk, self.owner, now),
                        )
                        if may_live(owner)
                    )
                    mine = [k for k in chunk if k not in taken]
                    conn.executemany(
                        "INSERT OR REPLACE INTO claims (key, owner, expires) VALUES (?, ?, ?)",
                        [(k, self.owner, now + self.lease) for k in mine],
                    )
                    held.extend(mine)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return held

    def renew(self) -> None:
        """Extend every claim this cache holds by ``lease`` seconds from now."""
        with self._lock, self._sqlite():
            self._connection.execute(
                "UPDATE claims SET expires = ? WHERE owner = ?",
                (time.time() + self.lease, self.owner),
            )

    def release(self, keys: Iterable[str] | None = None) -> None:
        """Give up claims (all of this cache's when ``keys`` is None): a failed request, say."""
        with self._lock, self._sqlite():
            if keys is None:
                self._connection.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
            else:
                self._connection.executemany(
                    "DELETE FROM claims WHERE key = ? AND owner = ?",
                    [(k, self.owner) for k in keys],
                )

    def clear(self) -> None:
        """Remove every stored response, note and claim."""
        with self._lock, self._sqlite():
            self._connection.execute("DELETE FROM responses")
            self._connection.execute("DELETE FROM meta")
            self._connection.execute("DELETE FROM claims")

    def get_meta(self, key: str) -> Any:
        """A JSON value stored with `set_meta` (an endpoint's probed capabilities, say), or None."""
        with self._lock, self._sqlite(key):
            row = self._connection.execute(
                "SELECT value FROM meta WHERE key = ?", (key,)
            ).fetchone()
        if row is None:
            return None
        try:
            return json.loads(row[0])
        except ValueError as exc:
            raise CacheError(
                f"the cache {str(self.path)!r} holds a bad note {key!r} ({exc}); {_DAMAGED_FIX}",
                path=self.path,
                key=key,
            ) from None

    def set_meta(self, key: str, value: Any) -> None:
        """Store a JSON value under ``key``, committed at once (one statement: all or nothing);
        None removes the note."""
        if value is None:
            with self._lock, self._sqlite(key):
                self._connection.execute("DELETE FROM meta WHERE key = ?", (key,))
            return
        text = _canonical(value)
        with self._lock, self._sqlite(key):
            self._connection.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, text)
            )

    def meta_items(self, prefix: str) -> dict[str, Any]:
        """Every note whose key starts with ``prefix`` (key -> value, in key order), so that
        records needing no shared index (one row each) can be found again."""
        with self._lock, self._sqlite(prefix):
            rows = self._connection.execute(
                "SELECT key, value FROM meta WHERE substr(key, 1, ?) = ? ORDER BY key",
                (len(prefix), prefix),
            ).fetchall()
        found: dict[str, Any] = {}
        for key, text in rows:
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise CacheError(
                    f"the cache {str(self.path)!r} holds a bad note {key!r} ({exc}); "
                    f"{_DAMAGED_FIX}",
                    path=self.path,
                    key=key,
                ) from None
            if value is not None:  # a note an earlier version removed by storing null
                found[key] = value
        return found

    def backup(self, path: str | os.PathLike[str]) -> Path:
        """Copy the cache to ``path`` (a file, or a directory to hold ``cache.sqlite``), safely
        while it is in use: SQLite's backup API copies committed rows, the ``-wal``'s included,
        into one self-contained file. Returns the file written."""
        target = _resolve(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._lock, self._sqlite():
            destination = sqlite3.connect(str(target))
            try:
                self._connection.backup(destination)
                # The copy is a plain file on its own: no -wal beside it to forget.
                destination.execute("PRAGMA journal_mode=DELETE")
            finally:
                destination.close()
        return target

    def close(self) -> None:
        """Release this cache's claims, fold the write-ahead log into the file, and close."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.execute("DELETE FROM claims WHERE owner = ?", (self.owner,))
                    # Without this a reader still open elsewhere keeps recent rows in the -wal
                    # file only, and copying the main file would silently lose them.
                    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass  # a damaged or locked file: closing must still succeed
                finally:
                    conn.close()

    def __enter__(self) -> Cache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
