"""Where a sweep's work comes from and its answers go back to: the cache.

`PendingSource` walks the plan's requests in grid order: those the cache answers go straight to
the sink, the rest are claimed (`Cache.claim`) before they are handed out, so that processes
sharing one cache file do not both pay; what another process claimed is read when its answer
lands, or taken over when its claim expires. `CacheCommits` stores the answers a step of the
event loop at a time.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from .._cache import Cache
from .._grid import GridPoint
from .outcome import Outcome
from .plan import Plan

__all__ = ["CacheCommits", "PendingSource"]


class PendingSource:
    """The requests still to send, in grid order, claimed in the cache first (without a cache it
    only hands them out). ``on_hit`` receives each point the cache answers, as it is found."""

    #: Requests claimed per transaction: one write for many requests.
    CLAIM_CHUNK = 64

    def __init__(self, plan: Plan, on_hit: Callable[[GridPoint, Outcome], None]) -> None:
        self.store: Cache | None = plan.cache
        self._on_hit = on_hit
        self._source: Iterator[GridPoint] = self._misses(plan)
        self._ready: collections.deque[GridPoint] = collections.deque()
        self.elsewhere: list[GridPoint] = []  # claimed by another process, answer not seen yet
        self.poll_interval = 0.2 if self.store is None else min(1.0, self.store.lease / 10)

    def _misses(self, plan: Plan) -> Iterator[GridPoint]:
        for chunk in plan.originals():
            hits = self.store.get_many(p.key for p in chunk) if self.store is not None else {}
            for point in chunk:
                hit = hits.get(point.key)
                if hit is None:
                    yield point
                else:
                    self._on_hit(point, Outcome.hit(hit))

    def next(self) -> GridPoint | None:
        """The next request this process sends, or None when none is left to claim."""
        while not self._ready:
            chunk = list(itertools.islice(self._source, self.CLAIM_CHUNK))
            if not chunk:
                return None
            if self.store is None:
                self._ready.extend(chunk)
                break
            held = set(self.store.claim(point.key for point in chunk))
            for point in chunk:
                (self._ready if point.key in held else self.elsewhere).append(point)
        return self._ready.popleft()

    def failed(self, key: str) -> None:
        """A request failed: let another process (or a re-run) try it."""
        if self.store is not None:
            self.store.release([key])

    def answered_elsewhere(self) -> list[tuple[GridPoint, Outcome]]:
        """The requests another process claimed whose answers are in the cache now."""
        assert self.store is not None
        hits = self.store.get_many(point.key for point in self.elsewhere)
        done = [(p, Outcome.hit(hits[p.key])) for p in self.elsewhere if p.key in hits]
        self.elsewhere = [point for point in self.elsewhere if point.key not in hits]
        return done

    def take_over(self) -> bool:
        """Claim what another process had claimed but let expire; True if any is now ours."""
        assert self.store is not None
        held = set(self.store.claim(point.key for point in self.elsewhere))
        mine = [point for point in self.elsewhere if point.key in held]
        self.elsewhere = [point for point in self.elsewhere if point.key not in held]
        self._source = iter(mine)
        return bool(mine)

    async def keep_alive(self) -> None:
        """Renew this process's claims while it runs (cancel it when the sweep ends)."""
        assert self.store is not None
        while True:
            await asyncio.sleep(self.store.lease / 3)
            self.store.renew()


class CacheCommits:
    """Stores a sweep's responses in the cache a step of the event loop at a time: those that
    arrive in one step go in one transaction (a commit per response was most of what storing one
    cost). `put` returns once its response is committed, and only then does the request count as
    finished (rows, progress), so a crash loses nothing reported finished; a commit still pending
    when the sweep stops (cancelled, interrupted, failed) is made by `flush` before the cache
    closes, so no response that arrived is paid for twice."""

    def __init__(self, store: Cache) -> None:
        self.store = store
        self._items: list[tuple[str, Mapping[str, Any], float | None, bytes | None]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._handle: asyncio.Handle | None = None

    async def put(
        self,
        key: str,
        response: Mapping[str, Any],
        latency: float | None,
        text: bytes | None = None,
    ) -> None:
        """Store ``response`` (``text``: its JSON as received); returns once it is committed."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._items.append((key, response, latency, text))
        self._waiters.append(waiter)
        if self._handle is None:
            self._handle = loop.call_soon(self._commit)
        await waiter

    def _commit(self) -> None:
        self._handle = None
        waiters = self._waiters
        try:
            self.flush()
        except Exception as exc:  # a CacheError: each request whose response it held raises it
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(exc)
                    # Retrieved here: a waiter cancelled before it wakes would leave it unread.
                    waiter.exception()

    def flush(self) -> None:
        """Commit what is pending now (raises what the cache raises)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        items, waiters = self._items, self._waiters
        self._items, self._waiters = [], []
        if items:
            self.store.put_many(items)
        for waiter in waiters:
            if not waiter.done():  # one whose request was cancelled meanwhile
                waiter.set_result(None)
