"""Large CPU tensors without a page fault per 4 KB.

glibc's malloc maps every block of 32 MB or more afresh from the kernel and unmaps it when it is freed (smaller ones
too until its threshold has grown), so each batch's large temporaries — a wide layer's activations, the forward
pass's intermediates — are zero-filled page by page again, batch after batch. On a CPU collection of four GPT-2 XL
layers that was some 15 % of the process's CPU time, spent in the kernel (bench/README.md). Served from malloc's own heap and kept
there when freed, the same blocks are reused as they are.
"""

from __future__ import annotations

import ctypes
import functools
import sys

#: mallopt's parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
#: Freed memory at the top of the heap beyond this much is given back to the kernel (mallopt takes an int).
_TRIM_ABOVE = (1 << 31) - 1


@functools.cache
def keep_freed_memory() -> bool:
    """From now on in this process, serve large blocks from glibc's heap and keep freed ones for reuse. Once per
    process; False where the C library is not glibc (nothing changes there). The heap then stays as large as its
    peak until `give_back_freed_memory`."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    return mallopt is not None and mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE) == 1


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the kernel (after a collection; what is still in use stays)."""
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    if trim is not None:
        trim(0)


def _glibc(name: str, *argtypes: type):  # type: ignore[no-untyped-def]
    """A glibc function returning an int, or None elsewhere (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):
            return None
        function = getattr(libc, name)
    except (OSError, AttributeError):
        return None
    function.argtypes = list(argtypes)
    function.restype = ctypes.c_int
    return function
