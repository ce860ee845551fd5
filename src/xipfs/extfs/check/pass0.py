"""Pass 0: the superblock's fields, the group descriptors, the metadata blocks they place, and
the resize inode (what e2fsck checks in ``check_super_block`` and ``check_resize_inode`` before
its pass 1)."""

from __future__ import annotations

from stat import S_IFREG

from .. import layout as L
from ..csum import crc32c_raw
from ..groups import GroupDesc as ReadDesc
from ..groups import desc_block, desc_checksum, super_and_gdt
from . import problems as P
from .context import (
    BG_BLOCK_UNINIT,
    BG_INODE_UNINIT,
    I_BLOCK,
    I_DIND,
    I_LINKS_COUNT,
    I_MODE,
    INODE,
    Context,
    GroupDesc,
)

_CSUM_AT = L.GROUP_DESC.offsets["bg_checksum"]
_SB_CSUM_AT = 0x3FC


def u16(buf: bytes, offset: int) -> int:
    """The little-endian 16-bit word at ``offset`` of ``buf``."""
    return buf[offset] | buf[offset + 1] << 8


def run(c: Context) -> None:
    """Check the superblock, read the descriptors, mark the metadata, check the resize inode."""
    check_superblock(c)
    read_group_descriptors(c)
    mark_metadata(c)
    check_resize_inode(c)


def check_superblock(c: Context) -> None:
    """Fields of the superblock that ``parse_superblock`` lets through but e2fsck rejects."""
    f, sb = c.f, c.sb
    if c.csum:
        raw = bytes(sb.raw)
        want = crc32c_raw(0xFFFFFFFF, raw[:_SB_CSUM_AT])
        if f["s_checksum"] != want:
            c.report(P.SB_CSUM, value=f["s_checksum"], expect=want)
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
    """Decode the descriptors (32 or 64 bytes, classic or meta_bg blocks); note bad checksums and
    uninit flags, and leave aside the structures outside their group (or, with flex_bg, outside
    the filesystem)."""
    sb, n, bs = c.sb, c.ngroups, c.bs
    size = getattr(sb, "desc_size", L.GROUP_DESC.size) or L.GROUP_DESC.size
    per_block = bs // size
    c.bb_ok = [True] * n
    c.ib_ok = [True] * n
    c.it_ok = [True] * n
    c.gd = []
    csum = c.gdt_csum
    flex = sb.has_incompat(L.INCOMPAT_FLEX_BG)
    itb = c.itable_blocks
    raw = b""
    for g in range(n):
        i, k = divmod(g, per_block)
        if k == 0:
            blk = desc_block(sb, i)
            if blk >= c.nblocks:
                c.report(P.DESC_BLOCK_OUTSIDE, block=blk, index=i)
                raw = bytes(bs)
            else:
                raw = bytes(c.view(blk * bs, bs))
        desc = raw[k * size:(k + 1) * size]
        d = ReadDesc(desc)
        flags, unused = d.flags, d.itable_unused
        if csum:
            stored = u16(desc, _CSUM_AT)
            want = desc_checksum(sb, g, desc)
            if stored != want:
                c.report(P.GDT_CSUM, group=g, value=stored, expect=want)
            if g == n - 1 and flags & BG_BLOCK_UNINIT:
                c.report(P.BB_UNINIT_LAST, group=g)
            if unused > d.free_inodes or unused > c.ipg:
                c.report(P.ITABLE_UNUSED, group=g, value=unused, free=d.free_inodes)
        elif flags & (BG_INODE_UNINIT | BG_BLOCK_UNINIT) or unused:
            c.report(P.GROUP_UNINIT, group=g)
            flags &= ~(BG_INODE_UNINIT | BG_BLOCK_UNINIT)   # meaningless without a checksum
            unused = 0
        c.gd.append(GroupDesc(d.block_bitmap, d.inode_bitmap, d.inode_table, d.free_blocks,
                              d.free_inodes, d.used_dirs, flags, min(unused, c.ipg)))
        first, last = sb.group_first_block(g), sb.group_last_block(g)
        where = f"group {g} (blocks {first}-{last})"
        if flex:
            first, last = c.fdb, c.nblocks - 1
            where = f"the filesystem (blocks {first}-{last})"
        if not first <= d.block_bitmap <= last:
            c.report(P.BLOCK_BITMAP_OUTSIDE, block=d.block_bitmap, where=where)
            c.bb_ok[g] = False
        if not first <= d.inode_bitmap <= last:
            c.report(P.INODE_BITMAP_OUTSIDE, block=d.inode_bitmap, where=where)
            c.ib_ok[g] = False
        if not (first <= d.inode_table and d.inode_table + itb - 1 <= last):
            c.report(P.INODE_TABLE_OUTSIDE, block=d.inode_table, where=where)
            c.it_ok[g] = False


def mark_metadata(c: Context) -> None:
    """Mark every metadata block as used (e2fsck's mark_table_blocks); overlaps are problems."""
    used = bytearray(c.nblocks)
    for g in range(c.ngroups):
        for a, b in super_and_gdt(c.sb, g):
            b = min(b, c.nblocks)
            used[a:b] = bytes([1]) * max(0, b - a)
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
    mmp = c.f["s_mmp_block"]                  # the multi-mount protection block (e2fsck pass 1)
    if c.f["s_feature_incompat"] & L.INCOMPAT_MMP and c.f["s_first_data_block"] < mmp < c.nblocks:
        used[mmp] = 1
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
        pblk = c.fdb + 1 + c.desc_blocks + (c.bs == 1024 and c.ratio > 1)
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
