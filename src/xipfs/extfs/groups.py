"""Block groups: their descriptors, and the blocks that hold metadata (which no file may own)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L
from .csum import crc16, crc32c_raw

if TYPE_CHECKING:
    from ..device import Device
    from .super import Superblock
    from .volume import Volume

_GD_HEAD = L.GROUP_DESC.span("bg_block_bitmap", "bg_flags")
_GD_ITABLE_UNUSED = L.GROUP_DESC.codes["bg_itable_unused"]
_GD_HI = L.GROUP_DESC_HI.select("bg_block_bitmap_hi", "bg_inode_bitmap_hi", "bg_inode_table_hi",
                                "bg_free_blocks_count_hi", "bg_free_inodes_count_hi",
                                "bg_used_dirs_count_hi", "bg_itable_unused_hi")
_CSUM_AT = L.GROUP_DESC.offsets["bg_checksum"]
_GD_CSUM = L.GROUP_DESC.codes["bg_checksum"]


class GroupDesc:
    """One decoded group descriptor (the fields xipfs uses; the rest kept as it was)."""

    __slots__ = ("block_bitmap", "inode_bitmap", "inode_table", "free_blocks", "free_inodes",
                 "used_dirs", "flags", "itable_unused", "raw")

    def __init__(self, raw: bytes) -> None:
        (self.block_bitmap, self.inode_bitmap, self.inode_table, self.free_blocks, self.free_inodes,
         self.used_dirs, self.flags) = _GD_HEAD.unpack_from(raw, 0)
        self.itable_unused = _GD_ITABLE_UNUSED.unpack_from(raw, L.GROUP_DESC.offsets["bg_itable_unused"])[0]
        if len(raw) >= 64:                          # 64bit: the high halves
            bb, ib, it, fb, fi, ud, iu = _GD_HI.unpack_from(raw, L.GROUP_DESC.size)
            self.block_bitmap |= bb << 32
            self.inode_bitmap |= ib << 32
            self.inode_table |= it << 32
            self.free_blocks |= fb << 16
            self.free_inodes |= fi << 16
            self.used_dirs |= ud << 16
            self.itable_unused |= iu << 16
        self.raw = raw

    def encode(self) -> bytes:
        """The on-disk bytes: the fields above in their low halves (and, in a 64-byte
        descriptor, their high halves), every other byte kept as it was."""
        m16, m32 = 0xFFFF, 0xFFFFFFFF
        raw = bytearray(self.raw)
        _GD_HEAD.pack_into(raw, 0, self.block_bitmap & m32, self.inode_bitmap & m32, self.inode_table & m32,
                           self.free_blocks & m16, self.free_inodes & m16, self.used_dirs & m16, self.flags)
        _GD_ITABLE_UNUSED.pack_into(raw, L.GROUP_DESC.offsets["bg_itable_unused"], self.itable_unused & m16)
        if len(raw) >= 64:
            _GD_HI.pack_into(raw, L.GROUP_DESC.size, self.block_bitmap >> 32, self.inode_bitmap >> 32,
                             self.inode_table >> 32, self.free_blocks >> 16, self.free_inodes >> 16,
                             self.used_dirs >> 16, self.itable_unused >> 16)
        self.raw = bytes(raw)
        return self.raw


def flex_groups(sb: Superblock) -> int:
    """Groups per flex group (``ext4_flex_bg_size``): 1 without flex_bg or below two."""
    log = sb.s_log_groups_per_flex if sb.has_incompat(L.INCOMPAT_FLEX_BG) else 0
    return 1 << log if 1 <= log < 32 else 1


def desc_checksum(sb: Superblock, g: int, raw: bytes | memoryview) -> int:
    """What group ``g``'s descriptor checksum should be: crc32c (metadata_csum) or the crc16 of
    uninit_bg, over the descriptor with its checksum field left out."""
    n = len(raw)
    if sb.metadata_csum:
        crc = crc32c_raw(sb.csum_seed, g.to_bytes(4, "little"))
        crc = crc32c_raw(crc, raw[:_CSUM_AT])
        crc = crc32c_raw(crc, b"\0\0")
        if n > _CSUM_AT + 2:
            crc = crc32c_raw(crc, raw[_CSUM_AT + 2:])
        return crc & 0xFFFF
    crc = crc16(0xFFFF, sb.fields["s_uuid"])
    crc = crc16(crc, g.to_bytes(4, "little"))
    crc = crc16(crc, raw[:_CSUM_AT])
    if n > _CSUM_AT + 2:
        crc = crc16(crc, raw[_CSUM_AT + 2:])
    return crc


def desc_block(sb: Superblock, i: int) -> int:
    """Where descriptor block ``i`` lives (``ext2fs_descriptor_block_loc2``): after the primary
    superblock, or with meta_bg from ``s_first_meta_bg`` on, in the first group of its metagroup
    (after that group's superblock copy, if any)."""
    first = sb.s_first_data_block
    if first == 0 and sb.block_size == 1024:     # 1 KiB blocks with bigalloc: the superblock is block 1
        first = 1
    if not sb.has_incompat(L.INCOMPAT_META_BG) or i < sb.s_first_meta_bg:
        return first + 1 + i
    g = i * (sb.block_size // sb.desc_size)
    return sb.group_first_block(g) + (1 if sb.group_has_super(g) else 0)


def read_group_descriptors(device: Device, sb: Superblock, verify: bool = True) -> list[GroupDesc]:
    """Every group's descriptor, each checked against the filesystem (its own group without
    flex_bg) and its checksum before anything trusts it."""
    bs = sb.block_size
    size = sb.desc_size
    per_block = bs // size
    flex = sb.has_incompat(L.INCOMPAT_FLEX_BG)
    csum = verify and (sb.metadata_csum or sb.gdt_csum)
    uninit_ok = sb.metadata_csum or sb.gdt_csum
    blocks = sb.s_blocks_count
    groups = []
    raw = b""
    for g in range(sb.groups):
        i, k = divmod(g, per_block)
        if k == 0:
            blk = desc_block(sb, i)
            if blk >= blocks:
                raise CorruptImageError(f"descriptor block {i} at {blk} is past the end",
                                        "group descriptors")
            raw = bytes(device.view(blk * bs, bs))
        desc = raw[k * size:(k + 1) * size]
        gd = GroupDesc(desc)
        where = f"group descriptor {g}"
        if csum and desc_checksum(sb, g, desc) != _GD_CSUM.unpack_from(desc, _CSUM_AT)[0]:
            raise CorruptImageError("group descriptor checksum does not match", where)
        first, last = sb.group_first_block(g), sb.group_last_block(g)
        if flex:
            first, last = sb.s_first_data_block + 1, blocks - 1
        for what, blk, n in (("block bitmap", gd.block_bitmap, 1),
                             ("inode bitmap", gd.inode_bitmap, 1),
                             ("inode table", gd.inode_table, sb.itable_blocks)):
            if not (first <= blk and blk + n - 1 <= last):
                raise CorruptImageError(
                    f"{what} at block {blk} is outside "
                    + ("the filesystem" if flex else f"group {g}") + f" (blocks {first}..{last})", where)
        if gd.free_blocks > sb.s_blocks_per_group or gd.free_inodes > sb.s_inodes_per_group:
            raise CorruptImageError("free counts exceed the group size", where)
        if uninit_ok and gd.itable_unused > sb.s_inodes_per_group:
            raise CorruptImageError(f"{gd.itable_unused} unused inodes exceed the group's", where)
        groups.append(gd)
    return groups


def super_and_gdt(sb: Superblock, g: int, reserved: bool = True) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of group ``g``'s superblock copy, descriptor blocks (classic or
    meta_bg) and (``reserved``) reserved GDT blocks (``ext2fs_super_and_bgd_loc2``); empty when
    it holds none."""
    first = sb.group_first_block(g)
    if first == 0 and sb.block_size == 1024:     # 1 KiB blocks with bigalloc: the boot block
        first = 1
    has_super = sb.group_has_super(g)
    meta_bg = sb.has_incompat(L.INCOMPAT_META_BG)
    out = []
    if has_super:
        classic = (sb.s_first_meta_bg if meta_bg
                   else sb.desc_blocks + (sb.s_reserved_gdt_blocks if reserved else 0))
        out.append((first, first + 1))
    per_block = sb.block_size // sb.desc_size
    m, k = divmod(g, per_block)
    if not meta_bg or m < sb.s_first_meta_bg:
        if has_super and classic:
            out.append((first + 1, first + 1 + classic))
    elif k in (0, 1, per_block - 1):
        at = first + has_super
        out.append((at, at + 1))
    return out


def metadata_zones(sb: Superblock, groups: list[GroupDesc]) -> tuple[list[int], list[int]]:
    """Sorted, merged ``[start, end)`` block ranges that hold metadata, never file data."""
    zones = [(0, sb.s_first_data_block + 1)]
    resize = sb.has_compat(L.COMPAT_RESIZE_INODE)
    for g, gd in enumerate(groups):
        zones.extend(super_and_gdt(sb, g, reserved=resize))
        zones.append((gd.block_bitmap, gd.block_bitmap + 1))
        zones.append((gd.inode_bitmap, gd.inode_bitmap + 1))
        zones.append((gd.inode_table, gd.inode_table + sb.itable_blocks))
    zones.sort()
    starts: list[int] = []
    ends: list[int] = []
    for a, b in zones:
        if starts and a <= ends[-1]:
            ends[-1] = max(ends[-1], b)
        else:
            starts.append(a)
            ends.append(b)
    return starts, ends


def flush_group_descs(vol: Volume) -> None:
    """Store the descriptors whose counts changed since the last sync (``write_group_desc``),
    each with its bitmaps' checksums and its own (metadata_csum, uninit_bg) redone."""
    for g in sorted(vol.dirty_groups):
        store_group_desc(vol, g)
    vol.dirty_groups.clear()


def store_group_desc(vol: Volume, g: int) -> None:
    """Store group ``g``'s descriptor in its place in the descriptor table, now."""
    sb = vol.sb
    i, k = divmod(g, vol.bs // sb.desc_size)
    vol.device.write(encode_desc(vol, g), desc_block(sb, i) * vol.bs + k * sb.desc_size)


_BB_CSUM = (L.GROUP_DESC.offsets["bg_block_bitmap_csum_lo"],
            L.GROUP_DESC.size + L.GROUP_DESC_HI.offsets["bg_block_bitmap_csum_hi"])
_IB_CSUM = (L.GROUP_DESC.offsets["bg_inode_bitmap_csum_lo"],
            L.GROUP_DESC.size + L.GROUP_DESC_HI.offsets["bg_inode_bitmap_csum_hi"])


def encode_desc(vol: Volume, g: int) -> bytes:
    """Group ``g``'s descriptor as it is to be stored: its fields, then (metadata_csum) the
    checksums of its two bitmaps as they are now, then its own checksum."""
    sb = vol.sb
    gd = vol.groups[g]
    raw = bytearray(gd.encode())
    if sb.metadata_csum:
        for flag, blk, nbytes, (lo, hi) in (
                (L.BG_BLOCK_UNINIT, gd.block_bitmap, sb.s_blocks_per_group // sb.cluster_ratio // 8,
                 _BB_CSUM),
                (L.BG_INODE_UNINIT, gd.inode_bitmap, sb.s_inodes_per_group // 8, _IB_CSUM)):
            if gd.flags & flag:
                continue
            crc = crc32c_raw(sb.csum_seed, vol.device.view(blk * vol.bs, nbytes))
            raw[lo:lo + 2] = (crc & 0xFFFF).to_bytes(2, "little")
            if len(raw) >= hi + 2:
                raw[hi:hi + 2] = (crc >> 16).to_bytes(2, "little")
    if sb.metadata_csum or sb.gdt_csum:
        raw[_CSUM_AT:_CSUM_AT + 2] = desc_checksum(sb, g, bytes(raw)).to_bytes(2, "little")
    gd.raw = bytes(raw)
    return gd.raw


def statfs_overhead(vol: Volume) -> tuple[int, int]:
    """``(metadata blocks, blocks held back from users)`` as Linux's ext4 driver counts them in
    statfs, which mounts ext2 and ext3 too (ext3's own driver is gone since 4.3, ext2's is
    deprecated and most kernels serve ext2 with ext4): ``ext4_calculate_overhead`` (superblock
    copies, descriptors, reserved GDT blocks, bitmaps, inode tables and the journal, or
    ``s_overhead_clusters`` when mke2fs stored it) and, with extents only, the reserved clusters
    (2 % of them, at most 4096)."""
    sb = vol.sb
    ratio = sb.cluster_ratio
    reserve = min(sb.s_blocks_count // ratio // 50, 4096) * ratio if vol.extents else 0
    if sb.s_overhead_clusters:
        return sb.s_overhead_clusters * ratio, reserve
    overhead = sb.s_first_data_block + sb.groups * (2 + sb.itable_blocks)
    for g in range(sb.groups):
        overhead += sum(b - a for a, b in super_and_gdt(sb, g))
    if sb.has_compat(L.COMPAT_HAS_JOURNAL) and sb.s_journal_inum:
        overhead += -(-vol.inode(sb.s_journal_inum).size // vol.bs)
    return overhead, reserve
