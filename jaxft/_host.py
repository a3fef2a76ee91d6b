"""The host process's memory: its resident size and peak, and the allocator's free pages.

No JAX import: benchmark workers of other stacks use it without loading JAX.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys


def rss_bytes() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``), in bytes.

    Not ``ru_maxrss`` where ``/proc`` exists: Linux carries that across ``execve`` from the
    process that started this one, so a worker spawned by a larger parent would report the
    parent's peak.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def release_free_memory() -> str | None:
    """Return the host allocator's free pages to the OS; the allocator's name, or ``None``.

    XLA's compiler frees a few hundred MB of scratch that glibc malloc and tcmalloc keep mapped;
    a training step's workspace does not fit in those holes and is mapped on top, so the process
    would carry both for the whole run. tcmalloc (gperftools, when preloaded):
    ``MallocExtension_ReleaseFreeMemory``; glibc: ``malloc_trim(0)``.
    """
    libc = ctypes.CDLL(None)
    release = getattr(libc, "MallocExtension_ReleaseFreeMemory", None)
    if release is not None:
        release()
        return "tcmalloc"
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim.argtypes = [ctypes.c_size_t]
        trim(0)
        return "glibc"
    return None
