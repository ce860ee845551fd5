"""Block groups: their descriptors, and the blocks that hold metadata (which no file may own)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L

if TYPE_CHECKING:
    from ..device import Device
    from .super import Superblock
    from .volume import Volume

_GD_HEAD = L.GROUP_DESC.span("bg_block_bitmap", "bg_flags")


class GroupDesc:
    """One decoded group descriptor (the fields ext2 uses; the rest kept as it was)."""

    __slots__ = ("block_bitmap", "inode_bitmap", "inode_table", "free_blocks", "free_inodes",
                 "used_dirs", "flags", "raw")

    def __init__(self, fields: dict[str, int], raw: bytes) -> None:
        self.block_bitmap = fields["bg_block_bitmap"]
        self.inode_bitmap = fields["bg_inode_bitmap"]
        self.inode_table = fields["bg_inode_table"]
        self.free_blocks = fields["bg_free_blocks_count"]
        self.free_inodes = fields["bg_free_inodes_count"]
        self.used_dirs = fields["bg_used_dirs_count"]
        self.flags = fields["bg_flags"]
        self.raw = raw

    def encode(self) -> bytes:
        """The on-disk bytes, the fields after bg_flags kept as they were."""
        self.raw = _GD_HEAD.pack(self.block_bitmap, self.inode_bitmap, self.inode_table,
                                 self.free_blocks, self.free_inodes, self.used_dirs,
                                 self.flags) + self.raw[_GD_HEAD.size:]
        return self.raw


def read_group_descriptors(device: Device, sb: Superblock) -> list[GroupDesc]:
    """Every group's descriptor, each checked against its group before anything trusts it."""
    bs = sb.block_size
    size = L.GROUP_DESC.size
    raw = device.view((sb.s_first_data_block + 1) * bs, sb.groups * size)
    unpack = L.GROUP_DESC.unpack
    groups = []
    for g in range(sb.groups):
        off = g * size
        gd = GroupDesc(unpack(raw, off), bytes(raw[off:off + size]))
        first, last = sb.group_first_block(g), sb.group_last_block(g)
        where = f"group descriptor {g}"
        for what, blk, n in (("block bitmap", gd.block_bitmap, 1),
                             ("inode bitmap", gd.inode_bitmap, 1),
                             ("inode table", gd.inode_table, sb.itable_blocks)):
            if not (first <= blk and blk + n - 1 <= last):
                raise CorruptImageError(
                    f"{what} at block {blk} is outside group {g} (blocks {first}..{last})", where)
        if gd.free_blocks > sb.s_blocks_per_group or gd.free_inodes > sb.s_inodes_per_group:
            raise CorruptImageError("free counts exceed the group size", where)
        groups.append(gd)
    return groups


def metadata_zones(sb: Superblock, groups: list[GroupDesc]) -> tuple[list[int], list[int]]:
    """Sorted, merged ``[start, end)`` block ranges that hold metadata, never file data."""
    zones = [(0, sb.s_first_data_block + 1)]
    reserved = sb.s_reserved_gdt_blocks if sb.has_compat(L.COMPAT_RESIZE_INODE) else 0
    for g, gd in enumerate(groups):
        if sb.group_has_super(g):
            first = sb.group_first_block(g)
            zones.append((first, first + 1 + sb.desc_blocks + reserved))
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
    """Store the descriptors whose counts changed since the last sync (``write_group_desc``)."""
    base = (vol.first_data_block + 1) * vol.bs
    for g in sorted(vol.dirty_groups):
        vol.device.write(vol.groups[g].encode(), base + g * L.GROUP_DESC.size)
    vol.dirty_groups.clear()
