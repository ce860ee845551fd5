"""Pass 0: the superblock's fields, the group descriptors, the metadata blocks they place, and
the resize inode (what e2fsck checks in ``check_super_block`` and ``check_resize_inode`` before
its pass 1)."""

from __future__ import annotations

from stat import S_IFREG

from .. import layout as L
from . import problems as P
from .context import (
    BG_BLOCK_UNINIT,
    BG_INODE_UNINIT,
    GROUP_DESC,
    I_BLOCK,
    I_DIND,
    I_LINKS_COUNT,
    I_MODE,
    INODE,
    RO_COMPAT_GDT_CSUM,
    RO_COMPAT_METADATA_CSUM,
    Context,
    GroupDesc,
)


def run(c: Context) -> None:
    """Check the superblock, read the descriptors, mark the metadata, check the resize inode."""
    check_superblock(c)
    read_group_descriptors(c)
    mark_metadata(c)
    check_resize_inode(c)


def check_superblock(c: Context) -> None:
    """Fields of the superblock that ``parse_superblock`` lets through but e2fsck rejects."""
    f, sb = c.f, c.sb
    if f["s_r_blocks_count"] > c.nblocks // 2:
        c.report(P.RESERVED_BLOCKS_COUNT, count=f["s_r_blocks_count"], blocks=c.nblocks)
    reserved = f["s_reserved_gdt_blocks"]
    if reserved > c.bs // 4:
        c.report(P.RESERVED_GDT_TOO_MANY, count=reserved, most=c.bs // 4)
    if not sb.has_compat(L.COMPAT_RESIZE_INODE) and reserved:
        c.report(P.RESERVED_GDT_NO_RESIZE, count=reserved)
    if c.isize > 128:
        top = c.isize - 128
        for name in ("s_min_extra_isize", "s_want_extra_isize"):
            v = f[name]
            if v and (v < 4 or v > top or v & 3):
                c.report(P.EXTRA_ISIZE_FIELD, name=name[2:], value=v)
    if not sb.has_compat(L.COMPAT_HAS_JOURNAL) and not f["s_journal_inum"] and any(f["s_journal_uuid"]):
        c.report(P.EXTERNAL_JOURNAL, uuid=bytes(f["s_journal_uuid"]).hex())


def read_group_descriptors(c: Context) -> None:
    """Decode the descriptors; note (and leave aside) the structures outside their group."""
    n = c.ngroups
    size = L.GROUP_DESC.size
    raw = bytes(c.view((c.fdb + 1) * c.bs, n * size))
    c.gd = [GroupDesc._make(GROUP_DESC.unpack_from(raw, g * size)) for g in range(n)]
    c.bb_ok = [True] * n
    c.ib_ok = [True] * n
    c.it_ok = [True] * n
    csum = c.sb.has_ro_compat(RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)
    itb = c.itable_blocks
    for g, d in enumerate(c.gd):
        first, last = c.sb.group_first_block(g), c.sb.group_last_block(g)
        where = f"group {g} (blocks {first}-{last})"
        bb, ib, it = d.bg_block_bitmap, d.bg_inode_bitmap, d.bg_inode_table
        if not first <= bb <= last:
            c.report(P.BLOCK_BITMAP_OUTSIDE, block=bb, where=where)
            c.bb_ok[g] = False
        if not first <= ib <= last:
            c.report(P.INODE_BITMAP_OUTSIDE, block=ib, where=where)
            c.ib_ok[g] = False
        if not (first <= it and it + itb - 1 <= last):
            c.report(P.INODE_TABLE_OUTSIDE, block=it, where=where)
            c.it_ok[g] = False
        if not csum and (d.bg_flags & (BG_INODE_UNINIT | BG_BLOCK_UNINIT) or d.bg_itable_unused):
            c.report(P.GROUP_UNINIT, group=g)


def super_and_gdt(c: Context, g: int) -> tuple[int, int]:
    """``[start, end)`` of group ``g``'s superblock copy, descriptors and reserved GDT blocks
    (empty when the group holds no backup)."""
    if not c.sb.group_has_super(g):
        return 0, 0
    start = c.sb.group_first_block(g)
    end = start + 1 + c.desc_blocks + c.f["s_reserved_gdt_blocks"]
    return start, min(end, c.nblocks)


def mark_metadata(c: Context) -> None:
    """Mark every metadata block as used (e2fsck's mark_table_blocks); overlaps are problems."""
    used = bytearray(c.nblocks)
    for g in range(c.ngroups):
        a, b = super_and_gdt(c, g)
        used[a:b] = bytes([1]) * (b - a)
    itb = c.itable_blocks
    for g, d in enumerate(c.gd):
        it = d.bg_inode_table
        if c.it_ok[g]:
            if used.find(1, it, it + itb) >= 0:
                c.report(P.INODE_TABLE_CONFLICT, block=it, group=g)
                c.it_ok[g] = False
            used[it:it + itb] = bytes([1]) * itb
        for ok, blk, what in ((c.bb_ok, d.bg_block_bitmap, "block bitmap"),
                              (c.ib_ok, d.bg_inode_bitmap, "inode bitmap")):
            if ok[g]:
                if used[blk]:
                    c.report(P.BITMAP_CONFLICT, block=blk, group=g, what=what)
                    ok[g] = False
                used[blk] = 1
    c.meta = bytes(used)
    c.used = used


def check_resize_inode(c: Context) -> None:
    """The resize inode maps exactly the reserved GDT blocks and their backups."""
    sb = c.sb
    t = c.inode_view(L.RESIZE_INO)
    if t is None:
        return
    v = INODE.unpack_from(t, 0)
    iblock = v[I_BLOCK]
    if not sb.has_compat(L.COMPAT_RESIZE_INODE):
        if any(iblock):
            c.report(P.RESIZE_INODE_NOT_CLEAR, L.RESIZE_INO)
        return
    dind = v[I_DIND]
    bad = (any(iblock[:L.DIND_BLOCK]) or iblock[L.TIND_BLOCK] or not dind or not v[I_LINKS_COUNT]
           or not v[I_MODE] & S_IFREG or not c.fdb <= dind < c.nblocks)
    if not bad:
        entries = c.unpack_map(c.block(dind))
        gdt_off = c.desc_blocks
        pblk = c.fdb + 1 + c.desc_blocks
        for _ in range(c.f["s_reserved_gdt_blocks"] // 4):
            gdt_off %= c.apb
            if entries[gdt_off] != pblk or pblk >= c.nblocks:
                bad = True
                break
            ind = c.unpack_map(c.block(pblk))
            k = 0
            for g in range(1, c.ngroups):
                if not sb.group_has_super(g):
                    continue
                if k >= c.apb or ind[k] != pblk + g * c.bpg:
                    bad = True
                    break
                k += 1
            if bad:
                break
            gdt_off += 1
            pblk += 1
    if bad:
        c.report(P.RESIZE_INODE_INVALID, L.RESIZE_INO)
