"""Pass 5: the bitmaps and the free and directory counts against what passes 1 and 1b found in
use, as e2fsck's pass5.c. Bitmaps are compared as expanded byte strings."""

from __future__ import annotations

from .. import layout as L
from . import problems as P
from .context import Context, expand_bits, ranges, tail_unset


def run(c: Context) -> None:
    """The block bitmaps, then the inode bitmaps."""
    check_block_bitmaps(c)
    check_inode_bitmaps(c)


def check_block_bitmaps(c: Context) -> None:
    """Each group's block bitmap, free count and padding; the superblock's free count."""
    used = c.used
    sb = c.sb
    total_free = 0
    minus: list[int] = []
    plus: list[int] = []
    for g in range(c.ngroups):
        first, last = sb.group_first_block(g), sb.group_last_block(g)
        n = last - first + 1
        if not c.bb_ok[g]:
            continue
        d = c.gd[g]
        bitmap = c.block(d.bg_block_bitmap)
        bits = expand_bits(bitmap, c.bpg)
        ondisk = bits[:n]
        computed = bytes(used[first:last + 1])
        if ondisk != computed:
            for k in range(n):
                if ondisk[k] != computed[k]:
                    (minus if ondisk[k] else plus).append(first + k)
        free = ondisk.count(0)
        total_free += free
        if free != d.bg_free_blocks_count:
            c.report(P.GROUP_FREE_BLOCKS, group=g, value=d.bg_free_blocks_count, counted=free)
        if (n < c.bpg and bits[n:].count(0)) or tail_unset(bitmap, c.bpg):
            c.report(P.BLOCK_BITMAP_PADDING, block=d.bg_block_bitmap, group=g)
    if minus:
        c.report(P.BLOCKS_MARKED_NOT_USED, block=minus[0], numbers=ranges(minus))
    if plus:
        c.report(P.BLOCKS_USED_NOT_MARKED, block=plus[0], numbers=ranges(plus))
    value = c.f["s_free_blocks_count"]
    if all(c.bb_ok) and total_free != value:
        c.report(P.SB_FREE_BLOCKS, value=value, counted=total_free)


def check_inode_bitmaps(c: Context) -> None:
    """Each group's inode bitmap, free and directory counts, padding; the superblock's free count."""
    iused, itype = c.iused, c.itype
    ipg = c.ipg
    total_free = 0
    minus: list[int] = []
    plus: list[int] = []
    for g in range(c.ngroups):
        if not c.ib_ok[g]:
            continue
        d = c.gd[g]
        base = g * ipg
        bitmap = c.block(d.bg_inode_bitmap)
        if tail_unset(bitmap, ipg):
            c.report(P.INODE_BITMAP_PADDING, block=d.bg_inode_bitmap, group=g)
        ondisk = expand_bits(bitmap, ipg)
        computed = bytes(iused[base + 1:base + ipg + 1])
        types = itype[base + 1:base + ipg + 1]
        if ondisk != computed:
            for k in range(ipg):
                if ondisk[k] != computed[k]:
                    (minus if ondisk[k] else plus).append(base + k + 1)
            dirs = sum(1 for k in range(ipg) if ondisk[k] and computed[k] and types[k] == L.FT_DIR)
        else:
            dirs = types.count(L.FT_DIR)
        free = ondisk.count(0)
        total_free += free
        if free != d.bg_free_inodes_count:
            c.report(P.GROUP_FREE_INODES, group=g, value=d.bg_free_inodes_count, counted=free)
        if dirs != d.bg_used_dirs_count:
            c.report(P.GROUP_DIRS, group=g, value=d.bg_used_dirs_count, counted=dirs)
    if minus:
        c.report(P.INODES_MARKED_NOT_USED, minus[0], numbers=ranges(minus))
    if plus:
        c.report(P.INODES_USED_NOT_MARKED, plus[0], numbers=ranges(plus))
    value = c.f["s_free_inodes_count"]
    if all(c.ib_ok) and total_free != value:
        c.report(P.SB_FREE_INODES, value=value, counted=total_free)
