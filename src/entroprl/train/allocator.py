"""The C allocator kept from returning memory between the operations of a CPU training step.

A step on the CPU allocates and frees activations and gradients of a few MiB thousands of times.
glibc's malloc hands memory that is freed at the top of its heap back to the system once more
than `M_TRIM_THRESHOLD` is free there (128 KiB at first), and serves large requests with fresh
`mmap` pages; either way the next allocation of that size writes to pages the kernel must fault
in again. Keeping up to `TRIM_THRESHOLD` of freed memory in the heap and serving requests up to
`MMAP_THRESHOLD` from it removes those faults, with the same numbers (only where tensors live
changes, not what is computed; `benchmarks/bench_allocator.py` measures the gain,
docs/benchmarks.md has it). The
cost is resident memory: up to `TRIM_THRESHOLD` of freed memory stays with the process, as a GPU's
caching allocator keeps its blocks. The environment variables `MALLOC_TRIM_THRESHOLD_` and
`MALLOC_MMAP_THRESHOLD_` do the same for any process; this sets them from inside one.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3

TRIM_THRESHOLD = 1 << 30
"""Freed memory (bytes) the heap keeps before it returns any to the system."""

MMAP_THRESHOLD = 32 << 20
"""Requests (bytes) up to this size come from the heap: the largest threshold glibc's own dynamic
adjustment reaches on 64-bit, an adjustment that setting either threshold turns off."""


def keep_freed_memory() -> bool:
    """Set the two thresholds in this process's glibc malloc; False (and nothing changed) where
    the C library is not glibc (macOS, Windows, musl) or refuses a value."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
