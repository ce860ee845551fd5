"""The block-mapping seam: file blocks to device blocks, one interface for every scheme.

Linux's ``ext4_map_blocks`` asks the inode which scheme maps it and dispatches to
``ext4_ext_map_blocks`` (an extent tree) or ``ext4_ind_map_blocks`` (the indirect blocks of
ext2); :func:`block_map` does the same here. Every caller (reads, ``get_xip_mem``, mappings,
writes, truncate) uses only :class:`BlockMapping`, so a second scheme plugs in beside
:class:`~.indirect.BlockMap` without them changing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from . import layout as L
from .extent import ExtentMap
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
