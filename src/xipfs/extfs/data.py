"""File data on the write side: write, truncate and fallocate over the block map.

The seed's ``__xip_file_write``: data goes straight from the caller's buffer into the storage
(one copy); a hole is first given a block whose parts outside the write are zeroed, and the
block is linked into the file only once its content is in place, so no reader and no crash
can ever see stale data. ``i_size`` grows only after the bytes are there.
"""

from __future__ import annotations

import errno
import functools
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .._fresh import FRESH_MIN, copy_out, join_out
from ..errors import fs_error
from . import layout as L
from . import orphans
from .bmap import whole_start
from .inline import move_out
from .inode import Inode
from .super import set_feature

if TYPE_CHECKING:
    from .volume import Volume

LARGE_FILE_SIZE = 1 << 31


@functools.cache
def max_file_size(bs: int) -> int:
    """Largest ext2 file for block size ``bs``: Linux's ``ext2_max_size``, exactly.

    The block tree bounds it, and so does ``i_blocks`` (32 bits of 512-byte sectors, indirect
    blocks included).
    """
    bits = bs.bit_length() - 1
    ppb = 1 << (bits - 2)
    res = 12 + ppb + ppb * ppb + ppb * ppb * ppb
    upper = ((1 << 32) - 1) >> (bits - 9)
    meta = 1 + (1 + ppb) + (1 + ppb + ppb * ppb)
    if res + meta > upper:
        res = upper
        upper -= 12
        meta = 1
        upper -= ppb
        if upper < ppb * ppb:
            meta += 1 + -(-upper // ppb)
        else:
            meta += 1 + ppb
            upper -= ppb * ppb
            meta += 1 + -(-upper // ppb) + -(-upper // (ppb * ppb))
        res -= meta
    return min(res << bits, (1 << 63) - 1)


def file_size_limit(vol: Volume, node: Inode) -> int:
    """Largest size ``node`` may reach: ext2's limit for a block-mapped file, the 2**32 file
    blocks of an extent tree for one that has it (ext4's ``ext4_max_size``, with huge_file)."""
    if node.flags & L.FL_EXTENTS:
        return min(((1 << 32) - 1) * vol.bs, (1 << 63) - 1)
    return max_file_size(vol.bs)


def _give_back(vol: Volume, node: Inode) -> None:
    """After ENOSPC mid-way: free what the allocation linked past EOF. A block map's pointers
    are stored first (as ever); an extent tree is never stored with extents past i_size, which
    e2fsck -p would not repair under an index (``drop_blocks`` stores the inode after)."""
    if not node.flags & L.FL_EXTENTS:
        vol.write_inode(node)
    trim_past_eof(vol, node)


def write(vol: Volume, node: Inode, data: memoryview, pos: int) -> int:
    """Store ``data`` at byte ``pos`` of ``node``; returns bytes written (fewer when space runs out)."""
    n = len(data)
    if n == 0:
        return 0
    if node.flags & L.FL_INLINE_DATA:           # ext4 inline data: into a block first
        move_out(vol, node)
    bs = vol.bs
    limit = file_size_limit(vol, node)
    if pos + n > limit:
        if pos >= limit:
            raise fs_error(errno.EFBIG)
        n = limit - pos
        data = data[:n]
    end = pos + n
    m = node.map
    if pos > node.size:
        zero_eof_tail(vol, node, pos)
    first, last = pos // bs, (end - 1) // bs + 1
    dev = vol.device
    written_to = pos
    for lblk, count, pblk in m.runs(first, last, max(last, m.nblocks)):
        lo = lblk * bs
        a = max(lo, pos)
        b = min(lo + count * bs, end)
        if pblk:
            dev.write(data[a - pos:b - pos], pblk * bs + (a - lo))
            written_to = b
            continue

        def fill(fl: int, fcount: int, fp: int) -> None:
            blo, bhi = fl * bs, (fl + fcount) * bs
            da, db = max(blo, pos), min(bhi, end)
            if da > blo:
                dev.write_new(bytes(da - blo), fp * bs)
            dev.write_new(data[da - pos:db - pos], fp * bs + (da - blo))
            if bhi > db:
                dev.write_new(bytes(bhi - db), fp * bs + (db - blo))

        got = m.assign(lblk, lblk + count, fill)
        written_to = min(b, (lblk + got) * bs) if got < count else b
        if got < count:
            break
    done = written_to - pos
    if done <= 0:
        _give_back(vol, node)               # blocks may have been linked on the way
        raise fs_error(errno.ENOSPC)
    now = time.time_ns()
    node.mtime_ns = node.ctime_ns = now
    if written_to > node.size:
        set_size(vol, node, written_to)
    vol.write_inode(node)
    return done


def set_size(vol: Volume, node: Inode, size: int) -> None:
    """Record a new ``i_size`` (the caller writes the inode)."""
    node.size = size
    if size >= LARGE_FILE_SIZE and node.is_reg:
        set_feature(vol, "s_feature_ro_compat", L.RO_COMPAT_LARGE_FILE)
    m = node._map
    if m is not None:
        m.resize(-(-size // vol.bs))


def zero_eof_tail(vol: Volume, node: Inode, upto: int) -> None:
    """Zero ``[i_size, upto)`` within the block that holds EOF, so extending never shows garbage."""
    bs = vol.bs
    size = node.size
    if size % bs == 0:
        return
    lblk = size // bs
    pblk = node.map.runs(lblk, lblk + 1, lblk + 1)
    if pblk and pblk[0][2]:
        stop = min(upto, (lblk + 1) * bs)
        vol.device.write(bytes(stop - size), pblk[0][2] * bs + size % bs)


def truncate(vol: Volume, node: Inode, size: int) -> None:
    """Set the size of ``node``: shrinking frees blocks (and indirect blocks), growing leaves a hole."""
    if size < 0:
        raise fs_error(errno.EINVAL)
    if size > file_size_limit(vol, node):
        raise fs_error(errno.EFBIG)
    if node.flags & L.FL_INLINE_DATA:
        move_out(vol, node)
    bs = vol.bs
    old = node.size
    now = time.time_ns()
    if size < old:
        keep = -(-size // bs)
        node.map.runs(keep, max(keep, node.map.nblocks))   # a damaged pointer fails before any change
        orphans.before_shrink(vol, node, size)
        if size % bs:
            tail = node.map.runs(keep - 1, keep)
            if tail and tail[0][2]:
                vol.device.write(bytes(bs - size % bs), tail[0][2] * bs + size % bs)
        set_size(vol, node, size)
        node.mtime_ns = node.ctime_ns = now
        drop_blocks(vol, node, keep)
    elif size > old:
        zero_eof_tail(vol, node, size)
        set_size(vol, node, size)
        node.mtime_ns = node.ctime_ns = now
        vol.write_inode(node)
    else:
        node.mtime_ns = node.ctime_ns = now
        vol.write_inode(node)


def fallocate(vol: Volume, node: Inode, offset: int, length: int, zeroed: bool = False,
              keep_size: bool = False) -> None:
    """Give every hole in ``[offset, offset+length)`` a block, zeroed (ext2) or in an unwritten
    extent that reads as zeros (ext4); extend the size to cover it. ``zeroed``: zeroed blocks
    of data on ext4 too, unwritten extents included (what a writable mapping needs).
    ``keep_size`` (``FALLOC_FL_KEEP_SIZE``, ext4 only): the size stays, blocks past it are
    unwritten extents that later writes use."""
    if offset < 0 or length <= 0:
        raise fs_error(errno.EINVAL)
    if keep_size and not node.flags & L.FL_EXTENTS:
        raise OSError(errno.EOPNOTSUPP, "blocks past the end of the file need an extent tree (ext4)")
    bs = vol.bs
    end = offset + length
    if end > file_size_limit(vol, node):
        raise fs_error(errno.EFBIG)
    if node.flags & L.FL_INLINE_DATA:
        move_out(vol, node)
    if offset > node.size and not keep_size:
        zero_eof_tail(vol, node, offset)
    first, last = offset // bs, (end - 1) // bs + 1
    if node.flags & L.FL_EXTENTS and not zeroed:  # ext4: unwritten extents, nothing written
        got = node.map.preallocate(first, last)
    else:
        got = node.map.assign(first, last, lambda lb, n, pb: zero_blocks(vol, pb, n))
    if got < last - first:
        _give_back(vol, node)
        raise fs_error(errno.ENOSPC)
    if end > node.size and not keep_size:
        set_size(vol, node, end)
    node.ctime_ns = time.time_ns()
    vol.write_inode(node)


def trim_past_eof(vol: Volume, node: Inode) -> None:
    """Free blocks an interrupted allocation left past EOF (ext2 files have none there)."""
    drop_blocks(vol, node, -(-node.size // vol.bs))


def drop_blocks(vol: Volume, node: Inode, keep: int) -> None:
    """Free every block of ``node`` from file block ``keep`` on, in the safe order.

    Unlink them (pointers, then the inode is stored with whatever else changed), then release
    them: no block is ever free while a file still points at it.
    """
    freed = node.map.truncate(keep)
    vol.write_inode(node)
    for pblk, count in freed:
        vol.balloc.free(pblk, count)
    node.reset_map()


def zero_blocks(vol: Volume, pblk: int, count: int) -> None:
    """Fill ``count`` device blocks from ``pblk`` with zeros (in pieces of at most 1 MiB)."""
    bs = vol.bs
    step = max(1, (1 << 20) // bs)
    zeros = bytes(min(count, step) * bs)
    for i in range(0, count, step):
        k = min(step, count - i)
        vol.device.write(zeros[:k * bs] if k < step else zeros, (pblk + i) * bs)


_ZEROS = memoryview(bytes(1 << 20))


def zero_fill(dst: memoryview) -> None:
    """Fill ``dst`` with zeros without allocating a buffer of its size."""
    n = len(dst)
    step = len(_ZEROS)
    for i in range(0, n, step):
        j = min(n, i + step)
        dst[i:j] = _ZEROS[:j - i]


# -- reading (the XIP read path: get_xip_mem and copies run by run) ----------------------------
def get_xip_mem(vol: Volume, node: Inode, lblk: int, create: bool = False) -> memoryview | None:
    """The seed's ``get_xip_mem``: file block ``lblk`` of ``node`` in the device, or None (hole).

    On a memory device the view *is* the storage. ``create=True`` gives a hole a zeroed
    block first (a filesystem opened for writing; within the file's size, since ext2 has no
    blocks past EOF).
    """
    if create:
        if vol.readonly:
            raise fs_error(errno.EROFS)
        if not 0 <= lblk < node.map.nblocks:
            raise OSError(errno.EINVAL, f"block {lblk} is past the end of the file")
        with vol.lock:
            if node.map.assign(lblk, lblk + 1, lambda lb, n, pb: zero_blocks(vol, pb, n)) < 1:
                raise fs_error(errno.ENOSPC)
            vol.write_inode(node)
        pblk = node.map.runs(lblk, lblk + 1, lblk + 1)[0][2]
    else:
        if node.flags & L.FL_INLINE_DATA:
            raise OSError(errno.EOPNOTSUPP, f"inode {node.ino} keeps its data inline, in no block")
        pblk = node.map.bmap(lblk)
    if not pblk:
        return None
    view = vol.device.view(pblk * vol.bs, vol.bs)
    # A page-cache page is not the storage: changing it would bypass write-back.
    return view if vol.device.is_xip and not vol.readonly else view.toreadonly()


def segments(vol: Volume, node: Inode, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
    """``(offset in the file, length, device offset or -1 for a hole)`` covering ``[pos, end)``."""
    bs = vol.bs
    if node.flags & L.FL_INLINE_DATA:                 # bytes in the inode itself, not in blocks
        yield from node.map.segments(pos, end)
        return
    for lblk, count, pblk in node.map.runs(pos // bs, (end - 1) // bs + 1):
        lo = lblk * bs
        a = lo if lo > pos else pos
        b = min(lo + count * bs, end)
        yield a, b - a, pblk * bs + (a - lo) if pblk else -1


def windowed_segments(vol: Volume, node: Inode, pos: int, end: int,
                      window: int) -> Iterator[tuple[int, int, int]]:
    """:func:`segments` of ``[pos, end)``, a ``window`` of bytes at a time, each window's runs
    taken under the lock (a writer here never changes them half-read); a file that shrinks
    meanwhile ends them early. For long sends and copies that give the lock up in between."""
    while pos < end:
        with vol.lock:
            stop = min(end, node.size, pos + window)
            segs = list(segments(vol, node, pos, stop)) if pos < stop else []
        if not segs:
            return
        for seg in segs:
            yield seg
            pos = seg[0] + seg[1]


def read_into(vol: Volume, node: Inode, dst: memoryview, pos: int) -> int:
    """Copy data of ``node`` from byte ``pos`` into ``dst`` (one copy); bytes copied."""
    n = _read_into(vol, node, dst, pos)
    watch = vol.watch
    if watch is None or not watch.busy():
        return n
    return watch.copy_again_while_changing(node, lambda: _read_into(vol, node, dst, pos), n)


def _read_into(vol: Volume, node: Inode, dst: memoryview, pos: int) -> int:
    size = node.size
    if pos >= size:
        return 0
    n = min(len(dst), size - pos)
    if n <= 0:
        return 0
    m = node._map
    whole = m.whole if m is not None else whole_start(node)     # a first read: no map needed
    if whole:
        vol.device.read_into(dst[:n] if n != len(dst) else dst, whole * vol.bs + pos)
        return n
    m = node.map
    dev = vol.device
    for off, length, where in segments(vol, node, pos, pos + n):
        piece = dst[off - pos:off - pos + length]
        if where >= 0:
            dev.read_into(piece, where)
        else:
            zero_fill(piece)
    return n


def read_bytes(vol: Volume, node: Inode, pos: int, n: int) -> bytes:
    """``n`` bytes (fewer at EOF) of ``node``'s data from ``pos`` as a new ``bytes``: one copy."""
    data = _read_bytes(vol, node, pos, n)
    watch = vol.watch
    if watch is None or not watch.busy():
        return data
    return watch.copy_again_while_changing(node, lambda: _read_bytes(vol, node, pos, n), data)


def _read_bytes(vol: Volume, node: Inode, pos: int, n: int) -> bytes:
    size = node.size
    if pos >= size or n <= 0:
        return b""
    if n > size - pos:
        n = size - pos
    m = node._map
    whole = m.whole if m is not None else whole_start(node)     # a first read: no map needed
    if whole:
        view = vol.device.view(whole * vol.bs + pos, n)
        return copy_out(view) if FRESH_MIN and n >= FRESH_MIN else bytes(view)
    m = node.map
    dev = vol.device
    parts = [dev.view(where, length) if where >= 0 else bytes(length)
             for _, length, where in segments(vol, node, pos, pos + n)]
    if len(parts) == 1 and isinstance(parts[0], bytes):
        return parts[0]
    return join_out(parts, n) if FRESH_MIN and n >= FRESH_MIN else b"".join(parts)
