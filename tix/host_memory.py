"""How the host's C allocator treats memory the process frees: kept for reuse, not handed back to the kernel.

XLA:CPU allocates every execution's temporaries afresh and frees them when it ends. glibc serves blocks that large
with `mmap` and unmaps them on free (or trims the heap they came from), so each train step touched tens of megabytes
of new pages and the kernel zeroed every one of them: on the `small` benchmark model at 64 px, 14,500 page faults
and 35-40 ms of kernel time per step of about 0.1 s. With mmap off and trimming off, freed blocks return to the heap
and the next step reuses them already mapped: in alternating runs the faults went from 14,500 to 0-144 per step and
the step from 0.114-0.129 s to 0.090-0.110 s (at SD 1.5 shapes, 256 px: 3.2-3.3 s to 1.9-2.1 s).

The price is that memory once used stays with the process until it exits (its peak resident size, not more), which
suits a process that trains or samples until it is done. `TIX_RETURN_FREED_MEMORY=1` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
# The heap grows this much past each request, so a run's first steps extend it a few times rather than per block.
_TOP_PAD_BYTES = 2**28
# mallopt takes a C int: the largest, 2 GB of free space at the heap's top before it shrinks, is never reached here.
_NEVER_TRIM = 2**31 - 1


def keep_freed_memory() -> bool:
    """Tell glibc to serve large blocks from the heap and never shrink it; True when it took effect, False where
    the C library is not glibc or `TIX_RETURN_FREED_MEMORY` is set. Affects the whole process, from the next
    allocation on, so the program that owns the process (the CLI, a test session) calls it, not the library."""
    if os.environ.get("TIX_RETURN_FREED_MEMORY", "") not in ("", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    # mallopt returns 1 on success; the trim threshold is set first so the heap cannot shrink between the calls.
    return all(libc.mallopt(param, value) == 1 for param, value in (
        (_M_TRIM_THRESHOLD, _NEVER_TRIM), (_M_TOP_PAD, _TOP_PAD_BYTES), (_M_MMAP_MAX, 0)))
