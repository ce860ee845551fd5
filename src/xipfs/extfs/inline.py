"""Inline data (ext4 ``inline_data``): a small file or directory kept in its inode.

The first 60 bytes live in ``i_block``, the rest in the value of the in-inode xattr
``system.data``; such an inode has no blocks at all. :class:`InlineMap` stands behind the
block-mapping seam with no runs, and hands out the two byte ranges of the inode table instead
(:meth:`InlineMap.segments`), so an inline file is still read in place.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L

if TYPE_CHECKING:
    from .bmap import Run
    from .inode import Inode

#: ``i_block`` holds this many bytes of an inline file.
IBLOCK_BYTES = 60
#: ``system.data``: name index 7 ("system."), name "data".
DATA_INDEX, DATA_NAME = 7, b"data"
_ENTRY = L.XATTR_ENTRY.struct
_ENTRY_SIZE = L.XATTR_ENTRY.size
_MAGIC = L.XATTR_IBODY_HEADER.struct


def data_value(raw: bytes | memoryview, isize: int, extra_isize: int, ino: int) -> tuple[int, int]:
    """``(offset in the inode, size)`` of the ``system.data`` value; every inline inode has
    one, if only empty. Corruption if it is missing or runs past the inode."""
    where = f"inline data of inode {ino}"
    start = L.INODE.size + extra_isize
    first = start + _MAGIC.size
    if not extra_isize or first > isize or _MAGIC.unpack_from(raw, start)[0] != L.XATTR_MAGIC:
        raise CorruptImageError("no system.data attribute in the inode", where)
    pos = first
    while pos + 4 <= isize and bytes(raw[pos:pos + 4]) != b"\0\0\0\0":
        if pos + _ENTRY_SIZE > isize:
            break
        name_len, index, offs, inum, size, _hash = _ENTRY.unpack_from(raw, pos)
        name_at = pos + _ENTRY_SIZE
        if index == DATA_INDEX and bytes(raw[name_at:name_at + name_len]) == DATA_NAME:
            if inum or first + offs + size > isize or (size and offs < pos + _ENTRY_SIZE - first):
                raise CorruptImageError(f"system.data value ({size} bytes at {offs}) out of place", where)
            return first + offs, size
        pos = (name_at + name_len + 3) & ~3
    raise CorruptImageError("no system.data attribute in the inode", where)


class InlineMap:
    """The "block map" of an inline inode: no blocks; its bytes are two ranges of its inode."""

    __slots__ = ("inode", "nblocks", "whole", "size", "pieces")

    def __init__(self, inode: Inode) -> None:
        vol = inode.volume
        self.inode = inode
        self.nblocks = 0
        self.whole = 0
        self.size = inode.size
        base = vol.inode_offset(inode.ino)
        raw = vol.inode_raw(inode.ino)
        at, extra = data_value(raw, vol.isize, inode.extra_isize, inode.ino)
        #: ``(offset in the file, length, device offset)`` of the file's two pieces. A file may
        #: be longer than they are (``mke2fs -d`` makes a sparse file so): the rest reads as
        #: zeros, as Linux's ``ext4_readpage_inline`` gives it.
        self.pieces = [(0, IBLOCK_BYTES, base + L.INODE.offsets["i_block"]), (IBLOCK_BYTES, extra, base + at)]

    def segments(self, pos: int, end: int) -> list[tuple[int, int, int]]:
        """``(offset in the file, length, device offset or -1 for zeros)`` covering ``[pos, end)``."""
        out = []
        for off, length, where in self.pieces:
            a, b = max(pos, off), min(end, off + length)
            if a < b:
                out.append((a, b - a, where + a - off))
        tail = IBLOCK_BYTES + self.pieces[1][1]
        if end > tail:
            a = max(pos, tail)
            out.append((a, end - a, -1))
        return out

    def runs(self, first: int, last: int, limit: int | None = None) -> list[Run]:
        return []

    def bmap(self, lblk: int) -> int:
        return 0

    def assign(self, first: int, last: int, fill: object) -> int:
        raise OSError(errno.EROFS, f"writing inline data is not supported yet (inode {self.inode.ino})")

    def truncate(self, keep: int) -> list[tuple[int, int]]:
        raise OSError(errno.EROFS, f"truncating inline data is not supported yet (inode {self.inode.ino})")

    def resize(self, nblocks: int) -> None:
        self.size = self.inode.size
