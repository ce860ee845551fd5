"""Large copies out of the image into new ``bytes`` whose pages are made present in one call.

glibc serves an allocation at or over its mmap threshold with a fresh ``mmap``; a copy into it
then takes one page fault per 4 KiB (64 for a 256 KiB file), which costs more than the copy.
The threshold is normally dynamic (it rises past the sizes a process frees), but setting any of
glibc's malloc tunables fixes it at 128 KiB: Dask's nanny starts every worker with
``MALLOC_TRIM_THRESHOLD_=65536``, so there every file of 128 KiB or more read as ``bytes`` is
a fresh mapping. Where that is so, :func:`copy_out` asks for the zero-filled ``bytes`` (calloc
leaves a fresh mapping untouched), makes its pages present with one
``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14) and copies into it, as C code fills a new bytes
object before anyone sees it: about 1.5x faster per copy there. Elsewhere it is ``bytes(view)``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

_TUNABLES = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")
_DEFAULT_MMAP_THRESHOLD = 128 * 1024
_MADV_POPULATE_WRITE = 23
_PAGE = 4096


def _fixed_mmap_threshold(environ: Any = os.environ) -> int:
    """glibc's mmap threshold when a malloc tunable in the environment fixed it, else 0
    (dynamic, or not glibc): the size from which a new ``bytes`` is a fresh mapping."""
    if sys.implementation.name != "cpython" or not sys.platform.startswith("linux"):
        return 0
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return 0
    except (ValueError, OSError):
        return 0
    fixed = any(name in environ for name in _TUNABLES)
    threshold = environ.get("MALLOC_MMAP_THRESHOLD_")
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        key, _, value = item.partition("=")
        if key in ("glibc.malloc.trim_threshold", "glibc.malloc.top_pad", "glibc.malloc.mmap_max"):
            fixed = True
        elif key == "glibc.malloc.mmap_threshold":
            fixed, threshold = True, value
    if not fixed:
        return 0
    try:
        value = int(threshold, 0) if threshold is not None else _DEFAULT_MMAP_THRESHOLD
    except ValueError:
        value = _DEFAULT_MMAP_THRESHOLD
    return max(value, _PAGE)


#: Copies of at least this many bytes go through :func:`copy_out`'s one-call path; 0: none do.
FRESH_MIN = _fixed_mmap_threshold()
_tools: tuple[Any, Any, int] | None = None


def _load() -> tuple[Any, Any, int] | None:
    """ctypes' pieces for the fill (madvise, a writable view at an address, where a bytes
    object's data starts), or None when this interpreter's bytes are not laid out as expected."""
    import ctypes

    from ._libc import libc

    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    offset = bytes.__basicsize__ - 1              # PyBytesObject.ob_sval (its NUL is counted)
    probe = b"xipfs: where bytes keep their data"
    if ctypes.string_at(id(probe) + offset, len(probe)) != probe:
        return None
    return madvise, ctypes.c_char, offset


def _fresh(n: int) -> tuple[bytes, Any] | None:
    """A new zero-filled ``bytes`` of ``n`` and a writable byte view of it, its pages present;
    None where the one-call path does not apply (small, dynamic threshold, other layout)."""
    global _tools, FRESH_MIN
    if not FRESH_MIN or n < FRESH_MIN:
        return None
    if _tools is None:
        _tools = _load()
        if _tools is None:
            FRESH_MIN = 0
            return None
    madvise, c_char, offset = _tools
    out = bytes(n)                                  # calloc: a fresh mapping stays untouched
    at = id(out) + offset
    page = at & ~(_PAGE - 1)
    madvise(page, (at + n - page + _PAGE - 1) & ~(_PAGE - 1), _MADV_POPULATE_WRITE)  # may fail: fine
    return out, memoryview((c_char * n).from_address(at)).cast("B")


def copy_out(view: Any) -> bytes:
    """A new ``bytes`` holding ``view`` (a flat byte view): one copy, its pages made present
    first where a large allocation is a fresh mapping (see the module's docstring)."""
    fresh = _fresh(len(view))
    if fresh is None:
        return bytes(view)
    out, into = fresh
    into[:] = view
    return out


def join_out(parts: list[Any], n: int) -> bytes:
    """``b"".join(parts)`` (flat byte views and ``bytes`` of zeros for holes, ``n`` bytes in
    all), filled as :func:`copy_out` fills; holes stay as calloc left them."""
    fresh = _fresh(n)
    if fresh is None:
        return b"".join(parts)
    out, into = fresh
    at = 0
    for part in parts:
        size = len(part)
        if not isinstance(part, bytes):           # bytes are a hole's zeros: calloc's already
            into[at:at + size] = part
        at += size
    return out
