"""The block-mapping seam: file blocks to device blocks, one interface for every scheme.

Linux's ``ext4_map_blocks`` asks the inode which scheme maps it and dispatches to
``ext4_ext_map_blocks`` (an extent tree) or ``ext4_ind_map_blocks`` (the indirect blocks of
ext2); :func:`block_map` does the same here. Every caller (reads, ``get_xip_mem``, mappings,
writes, truncate) uses only :class:`BlockMapping`, so a second scheme plugs in beside
:class:`~.indirect.BlockMap` without them changing.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from . import layout as L
from .extent import EXT_INIT_MAX_LEN, EXT_MAGIC, ROOT_MAX_ENTRIES, ExtentMap
from .indirect import BlockMap
from .inline import InlineMap

if TYPE_CHECKING:
    from .inode import Inode

#: ``(first file block, count, first device block or 0 for a hole)``
Run = tuple[int, int, int]


class BlockMapping(Protocol):
    """What a block-mapping scheme offers (the indirect tree today; extents next)."""

    #: File blocks below i_size: nothing past EOF is ever mapped.
    nblocks: int
    #: The device block of the whole file when it is one contiguous run, else 0.
    whole: int

    def runs(self, first: int, last: int, limit: int | None = None) -> list[Run]:
        """The runs covering file blocks ``[first, last)`` (holes as device block 0)."""

    def bmap(self, lblk: int) -> int:
        """The device block of file block ``lblk``, 0 for a hole."""

    def assign(self, first: int, last: int, fill: Callable[[int, int, int], None]) -> int:
        """Give the holes in ``[first, last)`` blocks, ``fill``-ed before they are linked; how
        many blocks from ``first`` on are mapped afterwards (fewer when space ran out)."""

    def truncate(self, keep: int) -> list[tuple[int, int]]:
        """Unlink every block from file block ``keep`` on; the ``(device block, count)`` runs
        to free once the inode no longer points to them."""

    def resize(self, nblocks: int) -> None:
        """The file's size changed to ``nblocks`` blocks (nothing is allocated or freed)."""


def block_map(inode: Inode) -> BlockMapping:
    """The block map of ``inode``'s scheme: its extent tree (ext4's EXTENTS flag), its inline
    data (INLINE_DATA: no blocks at all), else the indirect tree."""
    inode.check_format()
    flags = inode.flags
    if flags & L.FL_EXTENTS:
        return ExtentMap(inode, csum_seed=inode.volume.csum_seed)
    if flags & L.FL_INLINE_DATA:
        return InlineMap(inode)
    return BlockMap(inode)


#: An extent root with its first leaf entry: magic, entries, max, depth, generation; file
#: block, length, start (high 16 and low 32 bits).
_ROOT_AND_LEAF = struct.Struct("<HHHHI IHHI").unpack_from
_DIRECT_WORDS = struct.Struct(f"<{L.N_DIRECT}I").unpack_from


def whole_start(inode: Inode) -> int:
    """The first device block of a file whose blocks are one run, read off the inode without
    building its map (a small file's first read), else 0: then ask :attr:`Inode.map`, which
    also names what is wrong with an inode this declines. The run is checked as the map
    checks it (no metadata inside, within the device)."""
    vol = inode.volume
    n = -(-inode.size // vol.bs)
    if n == 0:
        return 0
    kind = inode.flags & L.FL_FOREIGN_FORMAT
    if kind == 0:                                    # ext2's block pointers
        if n > L.N_DIRECT:
            return 0
        words = _DIRECT_WORDS(inode.i_block, 0)
        first = words[0]
        if not first:
            return 0
        for i in range(1, n):
            if words[i] != first + i:
                return 0
        count = n
    elif kind == L.FL_EXTENTS and vol.extents:       # one initialised extent in the root
        magic, entries, emax, depth, _gen, lblk, count, hi, lo = _ROOT_AND_LEAF(inode.i_block, 0)
        if (magic != EXT_MAGIC or depth or entries != 1 or lblk or not n <= count <= EXT_INIT_MAX_LEN
                or not 2 <= emax <= ROOT_MAX_ENTRIES):
            return 0
        first = hi << 32 | lo
        if not vol.first_data_block < first or first + count > vol.blocks_count:
            return 0
    else:
        return 0
    vol.check_data_run(first, count, inode.ino)
    return first
