"""One line on stderr while the embedded model loads slowly, so that a first completion never
sits silent: the first process on a machine compiles the decode step (about 20 s with numba, the
``fast`` extra); later ones load it from numba's cache and, on a quiet machine, say nothing."""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import threading
import time
from collections.abc import Iterator

__all__ = ["COMPILE_NOTICE", "LOAD_NOTICE", "LOAD_NOTICE_AFTER_S", "announced_load"]

#: A load that takes longer than this says so.
LOAD_NOTICE_AFTER_S = 1.0

COMPILE_NOTICE = (
    "nbcompletions: loading the embedded model; its decode step compiles the first time on a "
    "machine (about 20 s, once)..."
)
LOAD_NOTICE = "nbcompletions: loading the embedded model..."

_state = threading.local()


@contextlib.contextmanager
def announced_load(compiling: bool | None = None) -> Iterator[None]:
    """Past `LOAD_NOTICE_AFTER_S`, print what is happening to stderr, and once done how long it
    took. ``compiling``: whether the decode step may compile (None: whether numba is installed,
    found without importing it). Nested uses (`load_engine` around `Engine.from_dir`) say it once.
    """
    if getattr(_state, "active", False):
        yield
        return
    if compiling is None:
        compiling = importlib.util.find_spec("numba") is not None
    said = threading.Event()

    def notice() -> None:
        said.set()
        print(COMPILE_NOTICE if compiling else LOAD_NOTICE, file=sys.stderr, flush=True)

    timer = threading.Timer(LOAD_NOTICE_AFTER_S, notice)
    timer.daemon = True
    start = time.perf_counter()
    _state.active = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        _state.active = False
    if said.is_set():
        seconds = time.perf_counter() - start
        print(f"nbcompletions: the embedded model is ready ({seconds:.1f} s)", file=sys.stderr)
