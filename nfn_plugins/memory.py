"""Opt-in: make glibc keep freed memory in the process, so repeated NFN calls on large models reuse pages.

An NFN forward on MiniLM-sized weight spaces allocates layer outputs of hundreds of MB. glibc serves
allocations above 32 MiB with fresh ``mmap`` regions and unmaps them on free, so every call page-faults
all of them in again (about a third of a MiniLM forward). Serving them from the heap and never trimming
it removes that cost, at the price of the process keeping its peak memory (like a caching allocator);
the first few calls still fault while the heap settles. It is process-wide, hence a call the user makes,
never something the library does by itself.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import warnings

_M_TRIM_THRESHOLD = -1  # glibc <malloc.h>: keep up to this much free memory at the top of the heap
_M_MMAP_MAX = -4  # glibc <malloc.h>: at most this many mmap-served allocations (0: none)
_INT_MAX = 2**31 - 1


def keep_freed_memory() -> bool:
    """Serve every allocation from the heap and never give freed memory back to the OS (glibc only).

    Returns whether it took effect; elsewhere (macOS, Windows, musl) it warns and changes nothing.
    Equivalent to starting Python with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647``.
    """
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        warnings.warn(f"keep_freed_memory() needs Linux with glibc; this is {platform.system()} "
                      f"{' '.join(platform.libc_ver()).strip() or 'without glibc'}: nothing changed", stacklevel=2)
        return False
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    trimmed = libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(_INT_MAX))
    unmapped = libc.mallopt(_M_MMAP_MAX, ctypes.c_int(0))
    if not (trimmed and unmapped):
        warnings.warn(f"glibc refused mallopt: M_TRIM_THRESHOLD {'set' if trimmed else 'refused'}, "
                      f"M_MMAP_MAX {'set' if unmapped else 'refused'}", stacklevel=2)
    return bool(trimmed and unmapped)
