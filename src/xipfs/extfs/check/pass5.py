"""Pass 5: the bitmaps and the free and directory counts against what passes 1 and 1b found in
use, as e2fsck's pass5.c. Bitmaps are compared as expanded byte strings."""

from __future__ import annotations

from .. import layout as L
from ..csum import crc32c_raw
from ..groups import desc_block, super_and_gdt
from . import problems as P
from .context import Context, expand_bits, ranges, tail_unset


def run(c: Context) -> None:
    """The block bitmaps, then the inode bitmaps, then (metadata_csum) their checksums."""
    before = len(c.problems)
    check_block_bitmaps(c)
    blocks_differ = any(p.code == "block_bitmap_differs" for p in c.problems[before:])
    before = len(c.problems)
    check_inode_bitmaps(c)
    inodes_differ = any(p.code == "inode_bitmap_differs" for p in c.problems[before:])
    if c.csum:                 # a bitmap that differs is rewritten whole: e2fsck checks no sum
        check_bitmap_checksums(c, blocks=not blocks_differ, inodes=not inodes_differ)


_BB_CSUM_LO = L.GROUP_DESC.offsets["bg_block_bitmap_csum_lo"]
_IB_CSUM_LO = L.GROUP_DESC.offsets["bg_inode_bitmap_csum_lo"]
_BB_CSUM_HI = L.GROUP_DESC.size + L.GROUP_DESC_HI.offsets["bg_block_bitmap_csum_hi"]
_IB_CSUM_HI = L.GROUP_DESC.size + L.GROUP_DESC_HI.offsets["bg_inode_bitmap_csum_hi"]


def check_bitmap_checksums(c: Context, *, blocks: bool = True, inodes: bool = True) -> None:
    """Each initialised bitmap against the checksum its descriptor keeps (e2fsck's
    check_*_bitmap_checksum): crc32c of the bitmap's bits (not its padding), the high 16 bits
    only in descriptors long enough to hold them."""
    sb = c.sb
    size = sb.desc_size
    per_block = c.bs // size
    r = c.ratio
    for g in range(c.ngroups):
        d = c.gd[g]
        i, k = divmod(g, per_block)
        blk = desc_block(sb, i)
        if blk >= c.nblocks:
            continue
        desc = bytes(c.block(blk)[k * size:(k + 1) * size])
        for ok, flag, bitmap_blk, nbytes, lo_at, hi_at, problem in (
                (c.bb_ok[g], L.BG_BLOCK_UNINIT, d.bg_block_bitmap, c.bpg // r // 8, _BB_CSUM_LO, _BB_CSUM_HI,
                 P.BLOCK_BITMAP_CSUM),
                (c.ib_ok[g], L.BG_INODE_UNINIT, d.bg_inode_bitmap, c.ipg // 8, _IB_CSUM_LO, _IB_CSUM_HI,
                 P.INODE_BITMAP_CSUM)):
            if not ok or d.bg_flags & flag or not (blocks if flag == L.BG_BLOCK_UNINIT else inodes):
                continue
            crc = crc32c_raw(c.csum_seed, c.block(bitmap_blk)[:nbytes])
            stored = int.from_bytes(desc[lo_at:lo_at + 2], "little")
            if size >= hi_at + 2:
                stored |= int.from_bytes(desc[hi_at:hi_at + 2], "little") << 16
            else:
                crc &= 0xFFFF
            if crc != stored:
                c.report(problem, group=g, block=bitmap_blk)


def uninit_marks(c: Context) -> bytearray:
    """Per cluster: what e2fsprogs reads for the BLOCK_UNINIT groups (mark_uninit_bg_group_blocks:
    each such group's superblock copy and descriptors, and its own bitmaps and inode table
    wherever they lie); it is also ORed into the bitmaps read from disk."""
    r = c.ratio
    marks = bytearray(-(-c.nblocks // r))
    if not c.gdt_csum:
        return marks
    for g, d in enumerate(c.gd):
        if not d.bg_flags & L.BG_BLOCK_UNINIT:
            continue
        for a, b in super_and_gdt(c.sb, g):
            for k in range(a // r, (min(b, c.nblocks) - 1) // r + 1):
                marks[k] = 1
        for blk, n, ok in ((d.bg_block_bitmap, 1, c.bb_ok[g]), (d.bg_inode_bitmap, 1, c.ib_ok[g]),
                           (d.bg_inode_table, c.itable_blocks, c.it_ok[g])):
            if ok:
                for k in range(blk // r, (blk + n - 1) // r + 1):
                    marks[k] = 1
    return marks


def per_cluster(c: Context, first: int, last: int) -> bytes:
    """The blocks in use from ``first`` to ``last``, one byte per cluster (bigalloc)."""
    r = c.ratio
    used = c.used
    if r == 1:
        return bytes(used[first:last + 1])
    return bytes(1 if used.find(1, k, min(k + r, last + 1)) >= 0 else 0 for k in range(first, last + 1, r))


def check_block_bitmaps(c: Context) -> None:
    """Each group's block bitmap (a bit per cluster), free count and padding; the superblock's
    free count."""
    sb = c.sb
    r = c.ratio
    cpg = c.bpg // r
    marks = uninit_marks(c)
    any_marks = 1 in marks
    total_free = 0
    minus: list[int] = []
    plus: list[int] = []
    for g in range(c.ngroups):
        first, last = sb.group_first_block(g), sb.group_last_block(g)
        n = (last - first) // r + 1
        if not c.bb_ok[g]:
            continue
        d = c.gd[g]
        fc = first // r
        uninit = c.gdt_csum and d.bg_flags & L.BG_BLOCK_UNINIT
        if uninit:
            ondisk = bytes(marks[fc:fc + n])
        else:
            bitmap = c.block(d.bg_block_bitmap)
            bits = expand_bits(bitmap, cpg)
            ondisk = bits[:n]
            if any_marks:
                ondisk = bytes(a | b for a, b in zip(ondisk, marks[fc:fc + n], strict=True))
        computed = per_cluster(c, first, last)
        if ondisk != computed:
            for k in range(n):
                if ondisk[k] != computed[k]:
                    (minus if ondisk[k] else plus).append(first + k * r)
        free = ondisk.count(0)
        total_free += free
        if free != d.bg_free_blocks_count:
            c.report(P.GROUP_FREE_BLOCKS, group=g, value=d.bg_free_blocks_count, counted=free)
        if not uninit and ((n < cpg and bits[n:].count(0)) or tail_unset(bitmap, cpg)):
            c.report(P.BLOCK_BITMAP_PADDING, block=d.bg_block_bitmap, group=g)
    if minus:
        c.report(P.BLOCKS_MARKED_NOT_USED, block=minus[0], numbers=ranges(minus))
    if plus:
        c.report(P.BLOCKS_USED_NOT_MARKED, block=plus[0], numbers=ranges(plus))
    value = c.f["s_free_blocks_count"]
    if all(c.bb_ok) and total_free * r != value:
        c.report(P.SB_FREE_BLOCKS, value=value, counted=total_free * r)


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
        if c.gdt_csum and d.bg_flags & L.BG_INODE_UNINIT:
            ondisk = bytes(ipg)                  # read as all free, as e2fsprogs does
        else:
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
