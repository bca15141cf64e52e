"""Keeps a compute process's freed memory for reuse (glibc malloc), so a step's temporaries
come from its heap instead of fresh pages.

Why: glibc serves allocations above its mmap threshold (128 KiB at start, then adjusted by what
the process happens to free) with fresh mmap'd pages and unmaps them on free, so every such
tensor faults in all its pages again, each time it is allocated. A step allocates dozens of
0.1-10 MiB temporaries (activations, norms, attention outputs). Measured on the 2-core CI
machine: F.rms_norm on a [1024, 256] float32 tensor took 70-115 us in some processes and
870-1900 us in others, depending on the threshold the process's history had left (pinning the
threshold low made every run slow); pinned high, every process ran at the fast figure. In the
engine, a 16-prompt tiny-mixtral prefill step took ~100 ms instead of ~70 in 2 of 17 untuned
processes and in none of 27 tuned ones (otherwise the two are equal within the machine's noise).

This is what PyTorch's CPU tuning guide gets by preloading tcmalloc or jemalloc; glibc's own
mallopt needs no extra library or LD_PRELOAD, which a Ray worker cannot be given after start.
The cost is memory the process keeps after a peak instead of returning it (up to the trim
threshold at the heap's top, more where the heap fragments): right for a long-lived engine or
shard, which reaches that peak again soon. It is process-wide, so the Python LLM API applies it
to its caller's process too. Allocations above the mmap threshold (a prompt's logits when
prompt_logprobs are asked for, the weights, the cache pool) are still mapped afresh.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Allocations up to this size come from the heap: the activations and attention temporaries
# of a step; the weights and the cache pool (allocated once) stay mapped.
MMAP_THRESHOLD_BYTES = 32 << 20  # glibc's upper bound for this setting on 64-bit systems
TRIM_THRESHOLD_BYTES = 256 << 20  # free memory at the heap's top before glibc returns any

_done = False


def keep_freed_memory() -> bool:
    """Pins glibc's mmap and trim thresholds for this process; once per process. False where
    the C library is not glibc (nothing to tune, nothing changed)."""
    global _done
    if _done:
        return True
    if not is_glibc():  # musl, macOS: another allocator, other settings
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)):
        log.warning("glibc refused the malloc thresholds; step temporaries may come from fresh pages")
        return False
    _done = True
    return True


def is_glibc() -> bool:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION") is not None
    except (ValueError, OSError, AttributeError):  # no such name here: not glibc
        return False
