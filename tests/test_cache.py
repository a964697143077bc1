"""The sweep cache: keys, persistence across processes' worth of reopen, WAL, threads."""

from __future__ import annotations

import json
import sqlite3
import threading
import zlib
from pathlib import Path

import pytest

from nbcompletions import CompletionRequest
from nbcompletions._cache import Cache, cache_key, cache_keys


def test_key_covers_everything_that_determines_a_response() -> None:
    base = CompletionRequest(prompt="Hi", temperature=0.5, max_tokens=8)
    key = cache_key("http://h/v1", "m", base, 0)
    assert len(key) == 64
    assert cache_key("http://h/v1", "m", base, 0) == key
    assert cache_key("http://h/v1/", "m", base, 0) == key  # a trailing slash is the same endpoint
    different = [
        cache_key("http://other/v1", "m", base, 0),
        cache_key("http://h/v1", "m2", base, 0),
        cache_key("http://h/v1", "m", base, 1),
        cache_key("http://h/v1", "m", base.replace(temperature=0.6), 0),
        cache_key("http://h/v1", "m", base.replace(max_tokens=9), 0),
        cache_key("http://h/v1", "m", base.replace(seed=1), 0),
        cache_key("http://h/v1", "m", base.replace(logit_bias={"1": 5}), 0),
        cache_key("http://h/v1", "m", base.replace(extra={"top_k": 5}), 0),
        cache_key("http://h/v1", "m", base.replace(prompt="Hi "), 0),
    ]
    assert len(set(different)) == len(different)
    assert key not in different


def test_fast_keys_equal_the_definition() -> None:
    request = CompletionRequest(prompt="Hi", temperature=0.5, stop=["\n"], logit_bias={"3": 1})
    expected = [cache_key("http://h/v1", "m", request, r) for r in range(12)]
    assert cache_keys("http://h/v1", "m", request, 12) == expected


def test_key_ignores_json_spelling_and_streaming() -> None:
    a = CompletionRequest(prompt="x", logit_bias={"5": 1, "7": -1})
    b = CompletionRequest(prompt="x", logit_bias={"7": -1, "5": 1})
    assert cache_key("e", "m", a, 0) == cache_key("e", "m", b, 0)
    streamed = CompletionRequest(
        prompt="x",
        logit_bias={"5": 1, "7": -1},
        stream=True,
        stream_options={"include_usage": True},
    )
    assert cache_key("e", "m", streamed, 0) == cache_key("e", "m", a, 0)
    # The request's own model wins over the client's default, as on the wire.
    named = CompletionRequest(prompt="x", model="m")
    assert cache_key("e", None, named, 0) == cache_key("e", "m", CompletionRequest(prompt="x"), 0)


def test_put_get_persist_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.sqlite"
    response = {
        "id": "cmpl-1",
        "choices": [{"text": "hi", "index": 0}],
        "usage": {"total_tokens": 3},
        "weird": float("-inf"),
    }
    with Cache(path) as cache:
        assert len(cache) == 0
        assert cache.get("k") is None
        cache.put("k", response, latency=0.25)
        assert "k" in cache
        assert len(cache) == 1
        cache.set_meta("capabilities:e:m", {"echo_logprobs": "honoured"})
    # A fresh connection (as after a kernel restart) sees the committed row.
    with Cache(path) as again:
        hit = again.get("k")
        assert hit is not None
        assert hit.usage == {"total_tokens": 3}
        assert hit.response_id == "cmpl-1"
        assert hit.response["choices"][0]["text"] == "hi"
        assert hit.response["weird"] == float("-inf")
        assert hit.latency == 0.25
        assert again.get_meta("capabilities:e:m") == {"echo_logprobs": "honoured"}
        assert again.get_meta("nothing") is None
    raw = sqlite3.connect(str(path))
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        stored = raw.execute("SELECT response FROM responses WHERE key='k'").fetchone()[0]
        assert json.loads(zlib.decompress(stored))["id"] == "cmpl-1"
    finally:
        raw.close()


def test_get_many_beyond_sqlite_parameter_limit(tmp_path: Path) -> None:
    with Cache(tmp_path / "c.sqlite") as cache:
        for i in range(1200):
            cache.put(f"k{i}", {"i": i})
        found = cache.get_many([f"k{i}" for i in range(0, 1300)])
        assert len(found) == 1200
        assert found["k1199"].response == {"i": 1199}


def test_writes_from_several_threads(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.sqlite")

    def write(start: int) -> None:
        for i in range(start, start + 50):
            cache.put(f"k{i}", {"i": i})

    threads = [threading.Thread(target=write, args=(n * 50,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(cache) == 200
    cache.clear()
    assert len(cache) == 0
    cache.close()
    with pytest.raises(RuntimeError, match="closed"):
        cache.get("k0")
    assert "closed" in repr(cache)


def test_bad_path_is_refused() -> None:
    with pytest.raises(TypeError, match="cache must be a file path"):
        Cache(3)  # type: ignore[arg-type]  # the refusal under test


def test_stored_usage_counts_only_what_the_usage_reader_counts(tmp_path: Path) -> None:
    # One usage reader for the cache, the sweeps and the frames: true, 1.5 and -2 are not tokens.
    response = {
        "choices": [{"text": "hi", "index": 0}],
        "usage": {"prompt_tokens": True, "completion_tokens": 1.5, "total_tokens": -2},
    }
    with Cache(tmp_path / "c.sqlite") as cache:
        cache.put("odd", response)
        cache.put("ok", {**response, "usage": {"prompt_tokens": 2, "total_tokens": 3}})
        odd, ok = cache.get("odd"), cache.get("ok")
    assert odd is not None
    assert ok is not None
    assert odd.usage == {}
    assert ok.usage == {"prompt_tokens": 2, "total_tokens": 3}
