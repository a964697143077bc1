"""A sweep stores the responses that arrive together in one transaction (`Cache.put_many`,
`nbcompletions.sweeps.source.CacheCommits`): nothing counts as finished before it is
committed, a commit pending when the sweep stops is still made, and a stopped sweep resumes
without paying twice.

The sweeps run on the embedded model through the real server app and the real client; the
transport in front of it only counts requests and holds some of them open.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pandas as pd
import pytest

from nbcompletions import AsyncClient, asweep
from nbcompletions._cache import Cache
from nbcompletions.server import StreamingASGITransport, create_app
from nbcompletions.sweeps.source import CacheCommits

MODEL = "nbc-shakespeare"
GRID: dict[str, Any] = {
    "prompt": {"hamlet": "To be, or not", "king": "My lord,"},
    "temperature": [0.5, 1.2],
    "max_tokens": 3,
    "logprobs": 2,
    "repeats": 2,
}


def response(n: int) -> dict[str, Any]:
    return {
        "id": f"cmpl-{n}",
        "object": "text_completion",
        "choices": [{"text": f"t{n}", "index": 0, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3},
    }


def test_put_many_stores_what_put_stores(tmp_path: Path) -> None:
    with Cache(tmp_path / "one.sqlite") as one, Cache(tmp_path / "many.sqlite") as many:
        for n in range(3):
            one.put(f"k{n}", response(n), latency=0.5 + n)
        many.put_many((f"k{n}", response(n), 0.5 + n, None) for n in range(3))
        many.put_many([])  # nothing to store: no transaction
        assert len(many) == 3
        assert many.verify() == []  # every row carries a digest that matches
        got, want = many.get_many(["k0", "k1", "k2"]), one.get_many(["k0", "k1", "k2"])
        for key in want:
            assert got[key].response == want[key].response
            assert got[key].latency == want[key].latency
            assert got[key].usage == want[key].usage
            assert got[key].response_id == want[key].response_id


def test_put_many_stores_all_or_none(tmp_path: Path) -> None:
    with Cache(tmp_path / "c.sqlite") as cache:
        bad = {"id": "x", "choices": [], "not json": {1, 2}}  # a set: json cannot write it
        with pytest.raises(TypeError):
            cache.put_many([("k0", response(0), None, None), ("k1", bad, None, None)])
        assert len(cache) == 0


def test_a_response_is_stored_as_received(tmp_path: Path) -> None:
    # As a server may write it: spaces, escapes, a -Infinity that json.dumps would respell.
    text = b'{"id": "cmpl-1", "choices": [{"text": "caf\\u00e9", "index": 0}], "x": -Infinity}'
    parsed = json.loads(text)
    with Cache(tmp_path / "c.sqlite") as cache:
        cache.put("k0", parsed, text=text)
        cache.put_many([("k1", parsed, None, text)])
        for key in ("k0", "k1"):
            entry = cache.get(key)
            assert entry is not None
            assert entry.text == text.decode()  # the bytes that came, not a rewrite
            assert entry.response["choices"] == parsed["choices"]
            assert entry.response["x"] == float("-inf")
        assert cache.verify() == []


@pytest.mark.parametrize(
    "text",
    [
        b"\xef\xbb\xbf" + json.dumps(response(0)).encode(),  # a byte-order mark
        json.dumps(response(0)).encode("utf-16"),  # not UTF-8
    ],
)
def test_a_body_that_cannot_be_stored_as_it_came_is_written_out(
    tmp_path: Path, text: bytes
) -> None:
    with Cache(tmp_path / "c.sqlite") as cache:
        cache.put("k", response(0), text=text)
        entry = cache.get("k")
        assert entry is not None
        assert entry.response == response(0)
        assert entry.text == json.dumps(response(0), separators=(",", ":"))


async def test_responses_arriving_together_share_one_commit(tmp_path: Path) -> None:
    with Cache(tmp_path / "c.sqlite") as cache:
        puts = CacheCommits(cache)
        done: list[int] = []

        async def one(n: int) -> None:
            await puts.put(f"k{n}", response(n), 0.1)
            done.append(n)

        tasks = [asyncio.create_task(one(n)) for n in range(5)]
        await asyncio.sleep(0)  # every task has handed its response over; none is committed
        assert len(cache) == 0
        assert done == []
        await asyncio.gather(*tasks)
        assert sorted(done) == list(range(5))
        assert len(cache) == 5


async def test_a_commit_pending_when_the_sweep_stops_is_made(tmp_path: Path) -> None:
    with Cache(tmp_path / "c.sqlite") as cache:
        puts = CacheCommits(cache)
        tasks = [asyncio.create_task(puts.put(f"k{n}", response(n), None)) for n in range(3)]
        await asyncio.sleep(0)
        tasks[1].cancel()  # the sweep is stopped while the commit is pending
        puts.flush()  # what the sweep does before it closes the cache
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert results[0] is None
        assert results[2] is None
        assert isinstance(results[1], asyncio.CancelledError)
        assert len(cache) == 3  # the cancelled request's response arrived: it is kept
        puts.flush()  # nothing left: nothing happens


async def test_a_failed_commit_raises_in_every_request_it_held(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.sqlite")
    puts = CacheCommits(cache)
    cache.close()  # a cache that cannot be written
    results = await asyncio.gather(
        *(puts.put(f"k{n}", response(n), None) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, RuntimeError) and "closed" in str(r) for r in results)


class HoldingTransport(httpx.AsyncBaseTransport):
    """The real in-process transport; completions from the ``hold_from``-th on never finish."""

    def __init__(self, app: Any, hold_from: int | None) -> None:
        self.inner = StreamingASGITransport(app)
        self.hold_from = hold_from
        self.total = 0
        self.all_held = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/completions"):
            self.total += 1
            if self.hold_from is not None and self.total >= self.hold_from:
                if self.total == 8:
                    self.all_held.set()
                await asyncio.Event().wait()
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_stopped_sweep_loses_nothing_it_reported_and_resumes_without_paying_twice(
    embedded_engine: Any, tmp_path: Path
) -> None:
    app = create_app(embedded_engine)
    transport = HoldingTransport(app, hold_from=7)  # 6 answered, the last 2 held open
    aclient = AsyncClient("http://embedded/v1", model=MODEL, transport=transport)
    cache_path, study = tmp_path / "sweep.sqlite", tmp_path / "study"
    try:
        task = asyncio.create_task(
            asweep(
                aclient,
                **GRID,
                cache=cache_path,
                results=study,
                max_concurrency=4,
                progress=False,
                probe=False,
            )
        )
        await transport.all_held.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # What the stopped sweep reported finished (its dataset's rows) is all in the cache;
        # a request still in flight when it stopped may be neither.
        reported = pd.concat(pd.read_parquet(p) for p in sorted(study.glob("requests/*.parquet")))
        with Cache(cache_path) as cache:
            stored = len(cache)
            assert cache.keys_present(reported["cache_key"]) == set(reported["cache_key"])
        assert 1 <= len(reported) <= stored <= 6
        transport.hold_from = None
        before = transport.total
        resumed = await asweep(
            aclient, **GRID, cache=cache_path, results=study, progress=False, probe=False
        )
    finally:
        await aclient.close()
    assert transport.total - before == 8 - stored  # nothing stored was sent again
    assert resumed.usage["cached_requests"] == stored
    assert resumed.requests["status"].value_counts().to_dict() == {
        "cached": stored,
        "ok": 8 - stored,
    }
