"""glibc's allocator told to give freed memory back (``nbcompletions serve`` on glibc only).

glibc raises its mmap threshold every time a large block is freed (up to 32 MiB), so after the
first request the engine's scratch (a prefill pass's activations, the sampler's copies) comes from
the heap, and freed heap pages below the top stay resident. Under ``--max-memory-mb 128`` a batch
of distinct prompts (``benchmarks/bench_server_limits.py --parts rss-distinct``) left the heap
17.7 MiB larger than idle (59 to 77 MiB, 20 MiB of it free): the process grew 129 MiB. With the
threshold fixed at glibc's own default, every block over 128 KiB has its own mapping, unmapped
when freed: the heap grew 0.7 MiB and the process 118 MiB. More arenas (``M_ARENA_MAX``) made
no measurable difference, so they are left alone.

A ``MALLOC_*_`` environment variable the user set wins: glibc read it at start, and nothing here
overrides it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import sys

__all__ = ["MMAP_THRESHOLD_BYTES", "TRIM_THRESHOLD_BYTES", "keep_heap_small"]

#: Blocks above this get their own mapping (glibc's starting value, kept from rising).
MMAP_THRESHOLD_BYTES = 128 * 1024
#: Free memory at the heap's top above this is given back at once (2x the mmap threshold, as
#: glibc's own rule sets it).
TRIM_THRESHOLD_BYTES = 256 * 1024

# mallopt's parameter numbers (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

logger = logging.getLogger("nbcompletions.server")

_SETTINGS = (
    (_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES, "MALLOC_MMAP_THRESHOLD_"),
    (_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES, "MALLOC_TRIM_THRESHOLD_"),
)


def keep_heap_small() -> list[str]:
    """Fix glibc's mmap and trim thresholds (see the module docstring); the names of the
    settings made. Nothing on another C library, or for a setting its environment variable
    already chose."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return []
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # pragma: no cover - a glibc without mallopt
        return []
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    made = []
    for param, value, variable in _SETTINGS:
        if variable in os.environ:
            continue
        if mallopt(param, value) == 1:  # mallopt returns 1 on success
            made.append(variable)
    if made:
        logger.debug("glibc malloc: %s set (freed scratch is unmapped)", ", ".join(made))
    return made
