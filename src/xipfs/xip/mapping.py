"""File mappings: the storage itself mapped into the process (the seed's ``xip_file_mmap``).

A :class:`Mapping` is a Python :class:`mmap.mmap` whose address range xipfs fills in. On a
memory device with blocks of at least a page, each run of contiguous file blocks is mapped from
the image's descriptor straight into that range (``mmap`` with ``MAP_FIXED | MAP_SHARED``
through ctypes): no byte is copied, writes land in the image, and every process that maps the
same image sees the same pages. Holes of a read-only mapping stay anonymous zero pages; a
writable mapping gets blocks for its holes first (the seed's ``create``).

Safety comes from the ``mmap`` object owning the range: while any ``memoryview`` (or numpy
array) points into it, ``close()`` raises ``BufferError`` and nothing is unmapped. A read-only
mapping is a read-only ``mmap``, so a write raises ``TypeError`` before it reaches a page.

Every stitched run is one kernel mapping, and a process has about 65,530 (``vm.max_map_count``)
for everything it does. xipfs keeps to a budget (:func:`set_map_budget`) and maps files whose
runs are too many or too short by copying them into private memory instead (``is_xip`` False),
as it does on the file device or with blocks smaller than a page.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any

from .._libc import libc
from ..extfs import data as _data
from ..extfs import orphans
from ..extfs.data import read_into, segments
from ..extfs.indirect import HUGE_PAGE
from ..extfs.namei import name_moved

if TYPE_CHECKING:
    from ..extfs.inode import Inode
    from ..extfs.volume import Volume

PAGE = mmap.PAGESIZE
_MAP_FIXED = 0x10
_MAP_FAILED = ctypes.c_void_p(-1).value

_libc = libc
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int64]
_libc.mprotect.restype = ctypes.c_int
_libc.munmap.restype = ctypes.c_int
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class _PyBuffer(ctypes.Structure):
    _fields_ = [("buf", ctypes.c_void_p), ("obj", ctypes.c_void_p), ("len", ctypes.c_ssize_t),
                ("itemsize", ctypes.c_ssize_t), ("readonly", ctypes.c_int), ("ndim", ctypes.c_int),
                ("format", ctypes.c_char_p), ("shape", ctypes.c_void_p), ("strides", ctypes.c_void_p),
                ("suboffsets", ctypes.c_void_p), ("internal", ctypes.c_void_p)]


# Function objects of our own: ``ctypes.pythonapi.NAME`` is one object shared by the whole
# process, whose argtypes another module (or a second import of this one) may set to its own
# structure class, after which our calls would be refused.
_get_buffer = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.py_object, ctypes.POINTER(_PyBuffer), ctypes.c_int)(
    ("PyObject_GetBuffer", ctypes.pythonapi))
_release_buffer = ctypes.PYFUNCTYPE(None, ctypes.POINTER(_PyBuffer))(("PyBuffer_Release", ctypes.pythonapi))


def _address(obj: Any) -> int:
    """The start address of ``obj``'s buffer (read-only buffers too)."""
    view = _PyBuffer()
    _get_buffer(obj, ctypes.byref(view), 0)
    try:
        return view.buf
    finally:
        _release_buffer(ctypes.byref(view))


def _map_fixed(addr: int, length: int, prot: int, flags: int, fd: int, offset: int) -> None:
    """Replace the pages at ``addr`` with a new mapping (raises the kernel's error)."""
    got = _libc.mmap(addr, length, prot, flags | _MAP_FIXED, fd, offset)
    if got == _MAP_FAILED or got != addr:
        code = ctypes.get_errno() or errno.ENOMEM
        raise OSError(code, f"mmap of {length} bytes at offset {offset}: {os.strerror(code)}")


def _round_up(n: int) -> int:
    return (n + PAGE - 1) & ~(PAGE - 1)


#: A PMD page (``indirect.HUGE_PAGE``): the kernel maps 2 MiB of a huge-page tmpfs (or DAX)
#: file with one page-table entry where the virtual address and the file offset agree modulo this.
HUGE = HUGE_PAGE
_MAP_FIXED_NOREPLACE = 0x100000
_MAP_NORESERVE = 0x4000
_PROT_NONE = 0


def _steer(length: int, phase: int) -> tuple[int, int] | None:
    """Make the next anonymous mapping of ``length`` bytes likely to start at an address that
    is ``phase`` modulo 2 MiB; returns the filler ``(address, size)`` to unmap after it.

    Linux places a mapping at the top of the highest free gap it fits (top down) and aligns
    anonymous mappings to 2 MiB only when their length is a multiple of it. So: find the gap
    with a probe 2 MiB longer, and fill the part of it above the address wanted, so that the
    mapping lands there. Only a hint: the caller maps whatever address it gets."""
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
    probe = _libc.mmap(None, length + HUGE, _PROT_NONE, flags, -1, 0)
    if probe in (None, _MAP_FAILED):
        return None
    top = probe + length + HUGE
    _libc.munmap(probe, length + HUGE)
    want = ((top - length - phase) & ~(HUGE - 1)) + phase
    size = top - (want + length)
    if not size:
        return None
    got = _libc.mmap(want + length, size, _PROT_NONE, flags | _MAP_FIXED_NOREPLACE, -1, 0)
    if got != want + length:
        if got not in (None, _MAP_FAILED):
            _libc.munmap(got, size)
        return None
    return got, size


# -- the budget -----------------------------------------------------------------------------------

def _max_map_count() -> int:
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 65530


class _Budget:
    """Kernel mappings xipfs may hold in this process, and the shortest run worth one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.cap = min(16384, _max_map_count() // 4)
        self.used = 0
        self.min_run = 16 << 10

    def take(self, n: int) -> bool:
        with self.lock:
            if self.used + n > self.cap:
                return False
            self.used += n
            return True

    def give_back(self, n: int) -> None:
        with self.lock:
            self.used -= n


_budget = _Budget()
#: (device, inode) -> live XIP mappings in this process; the pin goes with the last one.
_pins: dict[tuple[int, int], int] = {}


def set_map_budget(max_maps: int | None = None, min_run_bytes: int | None = None) -> None:
    """Tune XIP mappings for this process.

    ``max_maps``: kernel mappings all xipfs mappings together may use (default: a quarter of
    ``vm.max_map_count``, at most 16,384), so the rest of the process never runs out.
    ``min_run_bytes``: the average run length below which a file is copied rather than
    stitched (default 16 KiB: measured, stitching a run costs about 6.5 us and copying 0.6 ns a
    byte plus 2.7 us a run, so they break even near 8 KiB; twice that spares the budget).
    """
    if max_maps is not None:
        if max_maps < 0:
            raise ValueError("max_maps must be >= 0")
        _budget.cap = max_maps
    if min_run_bytes is not None:
        if min_run_bytes < 0:
            raise ValueError("min_run_bytes must be >= 0")
        _budget.min_run = min_run_bytes


def map_budget() -> dict[str, int]:
    """``{"max_maps", "used", "min_run_bytes"}``: the budget and what live mappings use."""
    return {"max_maps": _budget.cap, "used": _budget.used, "min_run_bytes": _budget.min_run}


# -- the mapping object ---------------------------------------------------------------------------

class Mapping(mmap.mmap):
    """A file of an image, mapped: buffer protocol, slicing, ``len``, ``flush``, ``close``.

    ``is_xip``: the pages are the storage itself (False: a private copy, written back by
    ``flush()`` and ``close()`` when writable). ``runs``: kernel mappings it holds.
    """

    is_xip: bool
    runs: int
    path: str
    offset: int
    writable: bool

    def __new__(cls, length: int, writable: bool) -> Mapping:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return super().__new__(cls, -1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot=prot)

    def flush(self, *args: Any) -> None:  # type: ignore[override]
        """Make writes durable: msync for XIP pages, a write-back into the image for a copy."""
        if self.closed:
            raise ValueError("mmap closed or invalid")
        if self.writable and not self.is_xip and not self._state.detached:
            self._state.write_back(self)
        if self.writable:
            super().flush(*args)

    def close(self) -> None:
        """Unmap; ``BufferError`` (and nothing changes) while views of it still exist."""
        if self.closed:
            return
        state = getattr(self, "_state", None)
        if state is not None and self.writable and not self.is_xip and not state.detached:
            state.write_back(self)
        super().close()
        if state is not None:
            self._finalizer()

    def resize(self, newsize: int) -> None:
        raise OSError(errno.EINVAL, "an image file mapping cannot be resized; map the file again")

    def __enter__(self) -> Mapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self)} bytes"
        kind = f"XIP, {self.runs} runs" if self.is_xip else "copy"
        rw = "rw" if self.writable else "ro"
        return f"<xipfs.Mapping {self.path!r} +{self.offset} {state} {rw} {kind}>"


class _State:
    """What a live mapping holds outside itself: budget, pin, open count, shrink hook.

    Kept apart from the :class:`Mapping` so a mapping dropped without ``close()`` still gives
    everything back when it is garbage-collected (``weakref.finalize``).
    """

    def __init__(self, vol: Volume, node: Inode, offset: int, length: int, writable: bool) -> None:
        self.vol = vol
        self.node = node
        self.offset = offset
        self.length = length
        self.writable = writable
        self.maps = 0
        self.pinned = False
        self.tracked = False
        self.addr = 0
        self.xip = False
        self.detached = False                   # the filesystem closed (copies written back)
        self.mapping: weakref.ref[Mapping] | None = None
        self.pid = os.getpid()

    def pin(self) -> None:
        """Pin the inode for every process to see (once per device and inode in a process)."""
        vol, ino = self.vol, self.node.ino
        with _budget.lock:
            key = (id(vol.device), ino)
            if not _pins.get(key):
                vol.device.pin(ino)
            _pins[key] = _pins.get(key, 0) + 1
            self.pinned = True

    def unpin(self) -> None:
        """Undo :meth:`pin` (a forked child leaves the lock to its parent, whose it is)."""
        if not self.pinned:
            return
        self.pinned = False
        if os.getpid() != self.pid:
            return
        vol, ino = self.vol, self.node.ino
        with _budget.lock:
            key = (id(vol.device), ino)
            _pins[key] = _pins.get(key, 1) - 1
            if not _pins[key]:
                del _pins[key]
                vol.device.unpin(ino)

    def register(self) -> None:
        vol = self.vol
        if not vol.readonly:
            orphans.opened(vol, self.node)
            self.tracked = True
        vol.mappings.setdefault(self.node.ino, []).append(self)

    def release(self) -> None:
        vol, ino = self.vol, self.node.ino
        _budget.give_back(self.maps)
        self.maps = 0
        hooks = vol.mappings.get(ino)
        if hooks and self in hooks:
            hooks.remove(self)
            if not hooks:
                del vol.mappings[ino]
        self.unpin()
        if self.tracked:
            self.tracked = False
            orphans.closed(vol, self.node)

    def check_shrink(self, size: int) -> None:
        """Refuse (EBUSY) to let the file shrink under a writable mapping."""
        if self.writable:
            raise OSError(errno.EBUSY, "the file is mapped writable")

    def shrink(self, size: int) -> None:
        """The file shrinks to ``size``: pages past the new end read zeros from now on (the
        blocks behind them are about to be freed). A copy keeps what it copied."""
        if not self.xip or not self.addr:
            return
        start = max(_round_up(size), self.offset) - self.offset
        end = _round_up(self.length)
        if start < end:
            _map_fixed(self.addr + start, end - start, mmap.PROT_READ,
                       mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)

    def write_back(self, m: Mapping) -> None:
        """A writable copy goes back into the file (only as far as the file still reaches)."""
        vol, node = self.vol, self.node
        with vol.lock:
            n = max(0, min(self.length, node.size - self.offset))
            if n:
                with memoryview(m) as view:
                    _data.write(vol, node, view[:n], self.offset)


# -- making one -----------------------------------------------------------------------------------

def map_file(vol: Volume, node: Inode, path: str, access: str = "r", offset: int = 0,
             length: int | None = None) -> Mapping:
    """Map ``length`` bytes of ``node`` from byte ``offset`` (the rules of :func:`mmap.mmap`)."""
    if access not in ("r", "w"):
        raise ValueError(f"access must be 'r' or 'w', not {access!r}")
    writable = access == "w"
    if writable and vol.readonly:
        raise OSError(errno.EROFS, "a writable mapping needs the filesystem opened 'r+'", path)
    if node.is_dir:
        raise OSError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if not node.is_reg:
        raise OSError(errno.ENODEV, "only regular files can be mapped", path)
    if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
        raise ValueError(f"offset must be a non-negative multiple of {mmap.ALLOCATIONGRANULARITY}")
    size = node.size
    if offset > size:
        raise ValueError("mmap offset is greater than file size")
    if length is None:
        length = size - offset
    if length < 0:
        raise ValueError("mmap length must be >= 0")
    if length == 0:
        raise ValueError("cannot mmap an empty file" if size == 0 else "cannot map 0 bytes")
    if offset + length > size:
        raise ValueError("mmap length is greater than file size")
    state = _State(vol, node, offset, length, writable)
    with vol.lock:
        if writable:
            _fill_holes(vol, node, offset, length)
        stitch = _can_stitch(vol)
        if stitch:
            state.pin()                    # before the blocks are looked at: nobody frees them now
            if vol.readonly:
                _check_still_live(vol, node, path, state)
        try:
            m = _try_xip(vol, node, state) if stitch else None
            if m is None:
                m = _copy(vol, node, state)
        except BaseException:
            state.release()
            raise
        if not state.xip:                      # a copy needs no pin
            state.unpin()
        m.is_xip = state.xip
        m.runs = state.maps
        m.path = path
        m.offset = offset
        m.writable = writable
        m._state = state
        state.mapping = weakref.ref(m)
        state.register()
    m._finalizer = weakref.finalize(m, state.release)
    return m


def _check_still_live(vol: Volume, node: Inode, path: str, state: _State) -> None:
    """A read-only attachment may hold an inode a writer elsewhere has since deleted (and its
    blocks reused): read it again from storage, now that it is pinned, and map only if it is
    the same live file."""
    from ..extfs.inode import Inode as _Inode
    fresh = _Inode(vol, node.ino, vol.inode_raw(node.ino))
    if fresh.links == 0 or fresh.dtime or fresh.mode != node.mode or fresh.generation != node.generation:
        state.release()
        vol.forget_cached()
        raise OSError(errno.ENOENT, "the file was deleted by a writer", path)
    try:                                   # the name may have been read torn or stale
        moved = name_moved(vol, path, node)
    except FileNotFoundError:
        moved = True
    if moved:
        state.release()
        raise OSError(errno.ENOENT, "the file was renamed or deleted by a writer", path)
    if (fresh.size, fresh.i_block, fresh.blocks) != (node.size, node.i_block, node.blocks):
        node.size, node.i_block, node.blocks = fresh.size, fresh.i_block, fresh.blocks
        node.reset_map()                   # changed by a writer: map what is there now


def detach(vol: Volume) -> None:
    """The filesystem is closing: write live writable copies back while it still can."""
    for states in list(vol.mappings.values()):
        for state in list(states):
            m = state.mapping() if state.mapping else None
            if m is not None and not m.closed and state.writable and not state.xip:
                state.write_back(m)
            state.detached = True


def _forget_pins_after_fork() -> None:
    _pins.clear()                  # the child holds no pin of its own (the locks are the parent's)


os.register_at_fork(after_in_child=_forget_pins_after_fork)


def _can_stitch(vol: Volume) -> bool:
    dev = vol.device
    return dev.is_xip and dev.fileno() >= 0 and vol.bs >= PAGE and dev.base_offset % PAGE == 0


def _fill_holes(vol: Volume, node: Inode, offset: int, length: int) -> None:
    """A writable mapping must not write into nothing: holes and unwritten extents in range
    get zeroed blocks of data."""
    if any(where < 0 for _, _, where in segments(vol, node, offset, offset + length)):
        _data.fallocate(vol, node, offset, length, zeroed=True)


def _try_xip(vol: Volume, node: Inode, state: _State) -> Mapping | None:
    """The stitched mapping, or None when the runs are too many or too short to pay."""
    offset, length = state.offset, state.length
    end = offset + _round_up(length)
    segs = list(segments(vol, node, offset, min(end, -(-node.size // vol.bs) * vol.bs)))
    data = [s for s in segs if s[2] >= 0]
    pieces = len(data) + sum(1 for s in segs if s[2] < 0)       # holes stay anonymous pieces
    if data and sum(s[1] for s in data) // len(data) < _budget.min_run and len(data) > 1:
        return None
    if not _budget.take(pieces):
        return None
    state.maps = pieces
    filler = None
    shift = vol.device.base_offset                     # a partition: its place in the disk
    big = next((s for s in data if s[1] >= HUGE), None)     # a run a 2 MiB page could map
    if length >= HUGE and big is not None:   # its address and its place in the file agree mod 2 MiB
        filler = _steer(_round_up(length), (big[2] + shift - big[0] + offset) % HUGE)
    try:
        m = Mapping(length, state.writable)
    finally:
        if filler:
            _libc.munmap(*filler)
    try:
        base = _address(m)
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if state.writable else 0)
        fd = vol.device.fileno()
        for pos, n, where in data:
            _map_fixed(base + pos - offset, _round_up(n), prot, mmap.MAP_SHARED, fd, where + shift)
    except OSError:
        mmap.mmap.close(m)                 # the raw unmap: this is not a finished Mapping yet
        _budget.give_back(pieces)
        state.maps = 0
        return None
    state.addr = base
    state.xip = True
    return m


def _copy(vol: Volume, node: Inode, state: _State) -> Mapping:
    """A mapping backed by a private copy (file device, small blocks, or too fragmented)."""
    length = state.length
    m = Mapping(length, state.writable)
    if state.writable:
        with memoryview(m) as view:
            read_into(vol, node, view, state.offset)
        return m
    # Read-only to Python from the start; filled through a private writable mapping of the same
    # pages, then made read-only for the process too.
    base = _address(m)
    span = _round_up(length)
    _map_fixed(base, span, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    with memoryview((ctypes.c_char * length).from_address(base)).cast("B") as view:
        read_into(vol, node, view, state.offset)
    _libc.mprotect(base, span, mmap.PROT_READ)
    return m
