"""``nbcompletions serve`` with a memory budget below the default fixes glibc's mmap threshold,
so that the engine's freed scratch leaves the process instead of staying in the heap (measured:
the heap 17.7 MiB larger after a batch)."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's allocator only",
)

# In a fresh process: the threshold is process state, and a test must see glibc's own first.
_PROBE = """
import ctypes, sys
from nbcompletions.server._malloc import keep_heap_small

FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print("no mallinfo2"); sys.exit()
libc.mallinfo2.restype = Info
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
made = keep_heap_small() if sys.argv[1] == "tuned" else []
libc.free(libc.malloc(8 << 20))  # a big block freed: glibc's own rule raises the threshold to it
before = libc.mallinfo2().hblkhd
block = libc.malloc(1 << 20)
print(",".join(made) or "-", libc.mallinfo2().hblkhd - before)
libc.free(block)
"""


def _probe(mode: str, **env: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    )
    if done.stdout.strip() == "no mallinfo2":
        pytest.skip("this glibc has no mallinfo2 (before 2.33)")
    made, mapped = done.stdout.split()
    return made, int(mapped)


@pytest.mark.slow
def test_a_block_over_128_kib_is_mapped_even_after_a_bigger_one_was_freed() -> None:
    assert _probe("plain") == ("-", 0)  # glibc's default: 1 MiB now comes from the heap
    made, mapped = _probe("tuned")
    assert made == "MALLOC_MMAP_THRESHOLD_,MALLOC_TRIM_THRESHOLD_"
    assert mapped >= 1 << 20  # its own mapping: unmapped, and out of RSS, when freed


def test_a_threshold_the_user_set_is_left_alone() -> None:
    made, mapped = _probe("tuned", MALLOC_MMAP_THRESHOLD_="16777216")
    assert made == "MALLOC_TRIM_THRESHOLD_"
    assert mapped == 0  # the user's 16 MiB threshold holds


def test_serve_fixes_the_threshold_only_for_a_budget_below_the_default() -> None:
    # The fixed threshold costs decode speed: a tight --max-memory-mb pays it, the default does not.
    from nbcompletions.server import WorkBudget
    from nbcompletions.server._serve import holds_heap_small

    assert not holds_heap_small(None)
    assert not holds_heap_small(WorkBudget())
    assert not holds_heap_small(WorkBudget(max_memory_bytes=4 << 30))
    assert holds_heap_small(WorkBudget(max_memory_bytes=128 << 20))
