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
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["paused_gc"]


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
