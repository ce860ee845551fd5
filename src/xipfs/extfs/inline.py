"""Inline data (ext4 ``inline_data``): a small file or directory kept in its inode.

The first 60 bytes live in ``i_block``, the rest in the value of the in-inode xattr
``system.data``; such an inode has no blocks at all. :class:`InlineMap` stands behind the
block-mapping seam with no runs, and hands out the two byte ranges of the inode table instead
(:meth:`InlineMap.segments`), so an inline file is still read in place.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L

if TYPE_CHECKING:
    from .bmap import Run
    from .inode import Inode
    from .volume import Volume

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
        raise OSError(errno.EROFS, f"inode {self.inode.ino} keeps its data inline: it moves into a "
                      "block before it is written (inline.move_out)")

    def truncate(self, keep: int) -> list[tuple[int, int]]:
        return []                        # no blocks to give back (a shorter size moves it out first)

    def resize(self, nblocks: int) -> None:
        self.size = self.inode.size


# -- moving data out of the inode (writes) --------------------------------------------------------
def _ibody_without_data(raw: bytes, isize: int, extra_isize: int) -> bytes:
    """The inode's bytes with ``system.data`` gone from its in-inode attributes (the others kept,
    their values packed again at the end of the region)."""
    start = L.INODE.size + extra_isize
    first = start + _MAGIC.size
    if not extra_isize or first > isize or _MAGIC.unpack_from(raw, start)[0] != L.XATTR_MAGIC:
        return raw
    kept = []
    pos = first
    while pos + 4 <= isize and raw[pos:pos + 4] != b"\0\0\0\0" and pos + _ENTRY_SIZE <= isize:
        name_len, index, offs, inum, size, h = _ENTRY.unpack_from(raw, pos)
        name = bytes(raw[pos + _ENTRY_SIZE:pos + _ENTRY_SIZE + name_len])
        if not (index == DATA_INDEX and name == DATA_NAME):
            kept.append((name_len, index, inum, h, name, bytes(raw[first + offs:first + offs + size])))
        pos = (pos + _ENTRY_SIZE + name_len + 3) & ~3
    region = bytearray(isize - start)
    if not kept:
        return raw[:start] + bytes(region)
    _MAGIC.pack_into(region, 0, L.XATTR_MAGIC)
    at = _MAGIC.size
    vend = len(region)
    for name_len, index, inum, h, name, value in kept:
        vend -= (len(value) + 3) & ~3
        region[vend:vend + len(value)] = value
        _ENTRY.pack_into(region, at, name_len, index, vend - _MAGIC.size if value else 0, inum, len(value), h)
        region[at + _ENTRY_SIZE:at + _ENTRY_SIZE + name_len] = name
        at = (at + _ENTRY_SIZE + name_len + 3) & ~3
    return raw[:start] + bytes(region)


def move_out(vol: Volume, node: Inode) -> None:
    """Move an inline regular file's bytes into a block of its own, as Linux's
    ``ext4_convert_inline_data`` does before a write: the block written first, then the inode
    (extent root, flags, ``system.data`` gone) in one store. A kill in between leaves a block
    marked used that nothing points to, which e2fsck -p gives back."""
    from .data import read_bytes
    from .extent import inode_root

    bs = vol.bs
    m = node.map
    stored = min(node.size, IBLOCK_BYTES + m.pieces[1][1])
    content = read_bytes(vol, node, 0, stored)
    flags = node.flags & ~L.FL_INLINE_DATA
    if stored:
        pblk = vol.balloc.alloc(vol.inode_group_goal(node.ino), 1)[0][0]
        vol.device.write_new(content.ljust(bs, b"\0"), pblk * bs)
        node.blocks += bs // 512
    if vol.extents:
        node.i_block = inode_root([(0, 1, pblk)] if stored else [])
        flags |= L.FL_EXTENTS
    else:
        node.i_block = (pblk.to_bytes(4, "little") if stored else b"").ljust(60, b"\0")
    node.flags = flags
    node._raw = _ibody_without_data(node._raw, vol.isize, node.extra_isize)
    node.reset_map()
    vol.write_inode(node)


def move_out_dir(vol: Volume, d: Inode) -> None:
    """Move an inline directory's entries into a block of its own before it changes, as
    Linux's ``ext4_convert_inline_data_nolock`` does for a directory: ``.`` and ``..`` (from
    the parent ``i_block`` keeps), then every entry, the last one running to the block's end
    (its checksum tail under metadata_csum); the block first, then the inode in one store."""
    from .dir import dir_end, encode_entry, rec_len_of, seal_leaf
    from .extent import inode_root

    index = vol.dir_index(d)                   # validates the inline entries first
    bs = vol.bs
    end = dir_end(vol)
    block = bytearray(bs)
    ft_dir = L.FT_DIR if vol.filetype else 0
    items = [(b".", d.ino, ft_dir), (b"..", index.parent, ft_dir)]
    items += [(os.fsencode(name), ino, ft) for name, (ino, ft) in index.entries.items()]
    pos = last = 0
    for name, ino, ft in items:
        need = rec_len_of(len(name))
        if pos + need > end:
            raise OSError(errno.ENOSPC, f"inline directory inode {d.ino} does not fit a block")
        block[pos:pos + need] = encode_entry(ino, need, name, ft).ljust(need, b"\0")
        last = pos
        pos += need
    L.DIRENT.pack_field(block, "rec_len", end - last, last)
    pblk = vol.balloc.alloc(vol.inode_group_goal(d.ino), 1)[0][0]
    vol.device.write_new(bytes(seal_leaf(vol, d, block)), pblk * bs)
    flags = d.flags & ~L.FL_INLINE_DATA
    if vol.extents:
        d.i_block = inode_root([(0, 1, pblk)])
        flags |= L.FL_EXTENTS
    else:
        d.i_block = pblk.to_bytes(4, "little").ljust(60, b"\0")
    d.flags = flags
    d.blocks += bs // 512
    d.size = bs
    d._raw = _ibody_without_data(d._raw, vol.isize, d.extra_isize)
    d.reset_map()
    d._dir = None
    d._dx = None
    vol.spaces.pop(d.ino, None)
    vol.write_inode(d)
