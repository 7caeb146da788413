"""Freed tensor memory kept for the next step, not handed back to the system and faulted in again.

glibc's malloc serves a block above its mmap threshold (128 KiB at start, raised to the largest
block freed so far, at most 32 MiB) with a fresh mmap, and returns the free top of its heap to the
system once it passes the trim threshold (twice the mmap threshold). A group's tensors are G times
one run's: at G = 12 on the quickstart MLP a step frees and allocates several MiB, and each step
faulted 1,616 fresh pages in (2.6 ms of system time in a 12 ms step, `benchmarks/grouped_gap.py
--faults`), where the same step alone faults none. Pinning both thresholds keeps the freed blocks in
the heap for the next step.

Process-wide and not undone (glibc has no read of these settings to restore): a process that pins
them keeps its heap at its peak until it ends. So dse's own processes pin them (`dse train`,
`dse sweep`, its workers: the same settings for a trial alone and in a group), and the library's
`train` / `train_group` leave a caller's process (a notebook) as it is; such a caller calls
`keep_freed_memory` itself for a group's speed. Addresses are unaffected modulo 64, the alignment
torch's CPU allocator gives every tensor, so no product sums otherwise (dse/train/batched_sums.py;
the quickstart's results are equal either way).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
"""mallopt's parameter numbers (glibc's malloc.h)."""

MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
"""The largest mmap threshold glibc takes on a 64-bit system (DEFAULT_MMAP_THRESHOLD_MAX): blocks up
to it come from the heap."""

TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES
"""The free top of the heap kept before any is returned: twice the mmap threshold, glibc's own ratio
when it raises the threshold itself."""


@functools.cache
def keep_freed_memory() -> bool:
    """Pin glibc's mmap and trim thresholds (`MMAP_THRESHOLD_BYTES`, `TRIM_THRESHOLD_BYTES`) once per
    process; False where the C library is not glibc or refuses (nothing changed)."""
    try:  # none on macOS or Windows; musl's returns 0
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
