"""Inode allocation: the group choice of Linux ext2 and, with flex_bg, of ext4.

Without flex_bg (ext2's ``find_group_other``/``find_group_dir``): files go to their parent's
group when it has room, else to a group found by the quadratic hash Linux uses, else to any
group; directories go to a group with at least the average number of free inodes and blocks
and the fewest directories (a simple Orlov), so trees spread out.

With flex_bg (ext4's ``find_group_other``/``find_group_orlov``), whole flex groups are the
units: a file goes to the first group of its parent's flex group with a free inode; a directory
under the root to the flex group with the fewest directories among those with at least average
free inodes and blocks (starting where the name hashes), any other directory to the first flex
group from its parent's with room and not too many directories; inodes are packed at the start
of the flex group's tables.
"""

from __future__ import annotations

import errno
import random
from typing import TYPE_CHECKING

from ..errors import CorruptImageError, fs_error
from . import bitmap
from . import layout as L
from .dirhash import DX_HASH_HALF_MD4, hasher

if TYPE_CHECKING:
    from .volume import Volume


class InodeAllocator:
    """Allocates and frees inode numbers of one writable volume (callers hold its lock)."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.ipg = volume.sb.s_inodes_per_group
        #: Groups per flex group (1: no flex_bg), the unit ext4's choices work in.
        self.flex = volume.flex
        #: Linux spreads top-level directories by the half-MD4 hash of their name.
        self._name_hash = hasher(DX_HASH_HALF_MD4, volume.sb.s_hash_seed)
        #: Per group, an index below which every inode is known to be in use.
        self._low = [0] * len(volume.groups)

    def alloc(self, parent: int, is_dir: bool, name: bytes | None = None) -> int:
        """A free inode number for a new inode under directory ``parent`` (a directory's
        ``name`` spreads top-level directories as Linux's hash of it does); ENOSPC if none."""
        vol = self.volume
        groups = vol.groups
        pg = (parent - 1) // self.ipg
        flex = self.flex
        if flex > 1:
            g = self._orlov(parent, pg, name) if is_dir else self._flex_file_group(parent, pg)
        elif not is_dir and groups[pg].free_inodes and groups[pg].free_blocks:
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

    # -- ext4 with flex_bg ------------------------------------------------------------------
    def _flex_file_group(self, parent: int, pg: int) -> int:
        """``find_group_other`` with flex_bg: the first group of the parent's flex group with a
        free inode, else a new flex group found as for a directory."""
        groups = self.volume.groups
        first = pg & ~(self.flex - 1)
        for g in range(first, min(first + self.flex, len(groups))):
            if groups[g].free_inodes:
                return g
        return self._orlov(parent, pg, None)

    def _flex_stats(self, fg: int) -> tuple[int, int, int]:
        """Free inodes, free blocks and directories of flex group ``fg``."""
        groups = self.volume.groups
        fi = fb = dirs = 0
        for gd in groups[fg * self.flex:(fg + 1) * self.flex]:
            fi += gd.free_inodes
            fb += gd.free_blocks
            dirs += gd.used_dirs
        return fi, fb, dirs

    def _orlov(self, parent: int, pg: int, name: bytes | None) -> int:
        """``find_group_orlov`` over flex groups: a group for a new directory (or for a file
        whose flex group is full); -1 when no group has a free inode."""
        vol = self.volume
        groups = vol.groups
        flex = self.flex
        nflex = -(-len(groups) // flex)
        stats = [self._flex_stats(fg) for fg in range(nflex)]
        avefreei = sum(st[0] for st in stats) // nflex
        avefreeb = sum(st[1] for st in stats) // nflex
        found = -1
        if parent == L.ROOT_INO:                   # spread top-level directories
            start = (self._name_hash(name)[0] if name else random.getrandbits(32)) % nflex
            best = self.ipg
            for i in range(nflex):
                fg = (start + i) % nflex
                fi, fb, dirs = stats[fg]
                if fi and dirs < best and fi >= avefreei and fb >= avefreeb:
                    found, best = fg, dirs
        else:
            ndirs = sum(st[2] for st in stats)
            max_dirs = ndirs // nflex + self.ipg * flex // 16
            min_inodes = max(avefreei - self.ipg * flex // 4, 1)
            min_blocks = max(avefreeb - vol.bpg * flex // 4, 0)
            start = pg // flex
            for i in range(nflex):
                fg = (start + i) % nflex
                fi, fb, dirs = stats[fg]
                if dirs < max_dirs and fi >= min_inodes and fb >= min_blocks:
                    found = fg
                    break
        if found >= 0:                             # pack inodes at the start of the flex group
            for g in range(found * flex, min((found + 1) * flex, len(groups))):
                if groups[g].free_inodes:
                    return g
        avg = sum(gd.free_inodes for gd in groups) // len(groups)
        for floor in (avg, 0):                     # the fallback: any group, from the parent's
            for i in range(len(groups)):
                g = (pg + i) % len(groups)
                free = groups[g].free_inodes
                if free and free >= floor:
                    return g
        return -1

    # -- ext2 ---------------------------------------------------------------------------------
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
