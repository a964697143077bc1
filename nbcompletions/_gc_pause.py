"""The cyclic garbage collector held off while a large answer is parsed and made into frames.

A chat answer with logprobs is mostly containers: per token an entry dict, its ``bytes`` list and
a ``top_logprobs`` list of more dicts and lists (240,000 containers for 20,000 tokens with five
alternatives). While a parser builds them, the collector runs every 700 new containers and, as
they survive, goes over all of them again in the older generations: more than half of orjson's
time on such a body (benchmarks/bench_chat_frames.py). Those containers hold no cycles, so
nothing is lost by collecting once, after the frames are built, when the body is usually freed.

`paused_gc` holds the collector off for the ``with`` block. Nested and concurrent pauses (threads
of a server or a sweep) are counted: the first one in disables the collector, the last one out
enables it again, and only if it was enabled when the first one came in (a program that disabled
it keeps it disabled).

`spaced_gc` lets the youngest generation grow to `SPACED_THRESHOLD` containers between collections
instead of 700, while a live sweep runs. With 32 requests in flight, the HTTP stack (httpx on
httpcore and anyio when this was measured) makes and drops containers for each one; they die by
reference counting, but the collector counts a container freed only against those made since its
last run, so the churn alone starts a collection every ~11 requests, and each one promotes whatever
is in flight. A 20,000-request sweep against a canned server (benchmarks/bench_scale.py) made 1,831
young, 167 middle and 16 full collections, 2.9 s of its ~45 s; at 10,000: 111, 11 and 1, 1.1-1.2 s
(on the aiohttp transport since: 111, 10 and 1, 1.05 s of 22.9 s). Nested and concurrent blocks are
counted as for `paused_gc`; the last one out puts back the thresholds found by the first one in,
unless something else changed them meanwhile.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["SPACED_THRESHOLD", "paused_gc", "spaced_gc"]

#: The youngest generation's threshold in a `spaced_gc` block (CPython's default is 700).
SPACED_THRESHOLD = 10_000


class _Pauses:
    """How many `paused_gc` blocks are open, and whether the collector was enabled before."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.was_enabled = False


_PAUSES = _Pauses()


@contextmanager
def paused_gc() -> Iterator[None]:
    """The cyclic garbage collector disabled in the block (see the module docstring)."""
    with _PAUSES.lock:
        if _PAUSES.open == 0:
            _PAUSES.was_enabled = gc.isenabled()
            gc.disable()
        _PAUSES.open += 1
    try:
        yield
    finally:
        with _PAUSES.lock:
            _PAUSES.open -= 1
            if _PAUSES.open == 0 and _PAUSES.was_enabled:
                gc.enable()


class _Spacing:
    """How many `spaced_gc` blocks are open, the thresholds before the first, and those it set."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.open = 0
        self.saved: tuple[int, ...] = ()
        self.set: tuple[int, ...] = ()


_SPACING = _Spacing()


@contextmanager
def spaced_gc() -> Iterator[None]:
    """The youngest generation's threshold at least `SPACED_THRESHOLD` in the block (see the
    module docstring); a threshold of 0 (automatic collection off) or above it is left alone."""
    with _SPACING.lock:
        if _SPACING.open == 0:
            _SPACING.saved = _SPACING.set = gc.get_threshold()
            first, *rest = _SPACING.saved
            if 0 < first < SPACED_THRESHOLD:
                gc.set_threshold(SPACED_THRESHOLD, *rest)
                _SPACING.set = gc.get_threshold()
        _SPACING.open += 1
    try:
        yield
    finally:
        with _SPACING.lock:
            _SPACING.open -= 1
            if _SPACING.open == 0 and gc.get_threshold() == _SPACING.set:
                gc.set_threshold(*_SPACING.saved)
