"""Inode allocation: Linux ext2's group choice (files near their directory, directories spread).

Files go to their parent's group when it has room, else to a group found by the quadratic
hash Linux uses, else to any group. Directories go to a group with at least the average number
of free inodes and blocks and the fewest directories (a simple Orlov), so trees spread out.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from ..errors import CorruptImageError, fs_error
from . import bitmap
from . import layout as L

if TYPE_CHECKING:
    from .volume import Volume


class InodeAllocator:
    """Allocates and frees inode numbers of one writable volume (callers hold its lock)."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.ipg = volume.sb.s_inodes_per_group
        #: Per group, an index below which every inode is known to be in use.
        self._low = [0] * len(volume.groups)

    def alloc(self, parent: int, is_dir: bool) -> int:
        """A free inode number for a new inode under directory ``parent``; ENOSPC if none."""
        vol = self.volume
        groups = vol.groups
        pg = (parent - 1) // self.ipg
        if not is_dir and groups[pg].free_inodes and groups[pg].free_blocks:
            g = pg                                   # the usual case: a file near its directory
        else:
            g = self._dir_group(pg) if is_dir else self._file_group(pg)
        if g < 0:
            raise fs_error(errno.ENOSPC)
        for step in range(len(groups)):
            gg = (g + step) % len(groups)
            if groups[gg].free_inodes:
                ino = self._take(gg, is_dir)
                if ino:
                    return ino
        raise fs_error(errno.ENOSPC)

    def _file_group(self, pg: int) -> int:
        groups = self.volume.groups
        n = len(groups)
        if groups[pg].free_inodes and groups[pg].free_blocks:
            return pg
        g = pg
        i = 1
        while i < n:                      # quadratic hash, as ext2_find_group_other
            g = (g + i) % n
            if groups[g].free_inodes and groups[g].free_blocks:
                return g
            i <<= 1
        for g in range(n):
            if groups[g].free_inodes:
                return g
        return -1

    def _dir_group(self, pg: int) -> int:
        groups = self.volume.groups
        n = len(groups)
        free_i = sum(gd.free_inodes for gd in groups)
        free_b = sum(gd.free_blocks for gd in groups)
        avg_i, avg_b = free_i // n, free_b // n
        best, best_dirs = -1, None
        for step in range(n):
            g = (pg + step) % n
            gd = groups[g]
            roomy = gd.free_inodes and gd.free_inodes >= avg_i and gd.free_blocks >= avg_b
            if roomy and (best_dirs is None or gd.used_dirs < best_dirs):
                best, best_dirs = g, gd.used_dirs
        if best >= 0:
            return best
        return self._file_group(pg)

    def _take(self, g: int, is_dir: bool) -> int:
        vol = self.volume
        gd = vol.groups[g]
        sb = vol.sb
        uninit_ok = sb.metadata_csum or sb.gdt_csum
        if uninit_ok and gd.flags & L.BG_INODE_UNINIT:
            # ext4 never wrote this group's inode bitmap: make it (all free, padding set), as
            # __ext4_new_inode does, before the first inode is taken here
            bits = bytearray(vol.bs)
            for bit in range(self.ipg, 8 * vol.bs):
                bits[bit >> 3] |= 1 << (bit & 7)
            vol.device.write(bytes(bits), gd.inode_bitmap * vol.bs)
            gd.flags &= ~L.BG_INODE_UNINIT
            gd.itable_unused = self.ipg
            vol.itable_used[g] = 0
        bm_off = gd.inode_bitmap * vol.bs
        bm = vol.device.view(bm_off, (self.ipg + 7) >> 3)
        start = max(self._low[g], vol.sb.first_ino - 1 if g == 0 else 0)
        bit = bitmap.find_zero(bm, start, self.ipg)
        if bit < 0:
            return 0
        self._low[g] = bit + 1
        byte = bit >> 3
        vol.device.write(bytes((bm[byte] | (1 << (bit & 7)),)), bm_off + byte)
        if uninit_ok and bit + 1 > vol.itable_used[g]:     # past the used part of the table
            gd.itable_unused = self.ipg - (bit + 1)
            vol.itable_used[g] = bit + 1
        gd.free_inodes -= 1
        if is_dir:
            gd.used_dirs += 1
        vol.write_group_desc(g)
        return g * self.ipg + bit + 1

    def free(self, ino: int, is_dir: bool) -> None:
        vol = self.volume
        g, bit = divmod(ino - 1, self.ipg)
        gd = vol.groups[g]
        bm_off = gd.inode_bitmap * vol.bs
        bm = vol.device.view(bm_off, (self.ipg + 7) >> 3)
        if not bitmap.test_bit(bm, bit):
            raise CorruptImageError(f"freeing inode {ino}, which is already free",
                                    f"inode bitmap of group {g}")
        first, data = bitmap.set_range(bm, bit, 1, False)
        vol.device.write(data, bm_off + first)
        gd.free_inodes += 1
        self._low[g] = min(self._low[g], bit)
        if is_dir and gd.used_dirs:
            gd.used_dirs -= 1
        vol.write_group_desc(g)
