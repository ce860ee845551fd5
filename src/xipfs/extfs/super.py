"""The superblock: geometry, features, and the checks made before anything is divided or sized.

Follows ``ext2_fill_super`` (Linux) and ``ext2fs_open2`` (e2fsprogs): validate the numbers first,
then derive the geometry from them, so that a hostile superblock can never make xipfs divide by
zero, allocate without bound or read outside the device.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ..errors import CorruptImageError, UnsupportedFeatureError
from . import layout as L
from .csum import crc32c_raw

if TYPE_CHECKING:
    from .volume import Volume


def feature_names(bits: int, table: dict[int, str], kind: str) -> list[str]:
    """Names of the set bits of a feature word, unknown bits as ``"<kind>_0x..."``."""
    names = []
    bit = 1
    while bit <= bits:
        if bits & bit:
            names.append(table.get(bit, f"FEATURE_{kind}{bit.bit_length() - 1}"))
        bit <<= 1
    return names


def group_has_super(group: int, sparse: bool) -> bool:
    """True if ``group`` holds a backup superblock and descriptor table (sparse_super rule)."""
    if group <= 1 or not sparse:
        return True
    for base in (3, 5, 7):
        n = base
        while n < group:
            n *= base
        if n == group:
            return True
    return False


class Superblock:
    """The decoded primary superblock and the geometry derived from it."""

    # geometry and flags, set by parse_superblock (the class values are the defaults)
    block_size: int = 0
    groups: int = 0
    desc_blocks: int = 0
    inode_size: int = 0
    first_ino: int = 0
    inodes_per_block: int = 0
    itable_blocks: int = 0
    addr_per_block: int = 0
    #: Bytes per group descriptor: 32, or ``s_desc_size`` with 64bit.
    desc_size: int = 32
    #: Blocks per allocation cluster (bigalloc), else 1.
    cluster_ratio: int = 1
    #: metadata_csum: crc32c over every structure, from this seed (``S`` of the spec).
    metadata_csum: bool = False
    csum_seed: int = 0
    #: uninit_bg (gdt_csum): a crc16 over each group descriptor only.
    gdt_csum: bool = False
    #: Why this image may only be opened read-only ("" when it may be written).
    readonly_reason: str = ""
    #: With sparse_super2: the only groups besides 0 that hold backups (0 means none).
    backup_bgs: tuple[int, int] = (0, 0)

    def __init__(self, raw: bytes, fields: dict[str, object]) -> None:
        self.raw = raw
        self.fields = fields
        self.warnings: list[str] = []

    def __repr__(self) -> str:
        return f"<Superblock {self.block_size}-byte blocks, {self.groups} groups>"

    def __getattr__(self, name: str) -> object:
        # s_* fields read as attributes: sb.s_blocks_count
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    # -- features -----------------------------------------------------------------------------
    @property
    def features(self) -> list[str]:
        """Every feature flag set, by the names dumpe2fs prints."""
        f = self.fields
        return (feature_names(f["s_feature_compat"], L.COMPAT_FEATURES, "C")
                + feature_names(f["s_feature_incompat"], L.INCOMPAT_FEATURES, "I")
                + feature_names(f["s_feature_ro_compat"], L.RO_COMPAT_FEATURES, "R"))

    def has_compat(self, bit: int) -> bool:
        return bool(self.fields["s_feature_compat"] & bit)

    def has_incompat(self, bit: int) -> bool:
        return bool(self.fields["s_feature_incompat"] & bit)

    def has_ro_compat(self, bit: int) -> bool:
        return bool(self.fields["s_feature_ro_compat"] & bit)

    @property
    def label(self) -> str:
        return bytes(self.fields["s_volume_name"]).split(b"\0", 1)[0].decode("utf-8", "replace")

    @property
    def uuid(self) -> str:
        import uuid

        return str(uuid.UUID(bytes=bytes(self.fields["s_uuid"])))

    def group_first_block(self, group: int) -> int:
        return self.fields["s_first_data_block"] + group * self.fields["s_blocks_per_group"]

    def group_last_block(self, group: int) -> int:
        """The last block of ``group`` (the last group may be short)."""
        f = self.fields
        return min(self.group_first_block(group) + f["s_blocks_per_group"], f["s_blocks_count"]) - 1

    def group_has_super(self, group: int) -> bool:
        """Whether ``group`` holds a superblock and descriptor copy (e2fsprogs' ext2fs_bg_has_super)."""
        if self.fields["s_feature_compat"] & L.COMPAT_SPARSE_SUPER2:
            return group == 0 or group in self.backup_bgs
        return group_has_super(group, self.has_ro_compat(L.RO_COMPAT_SPARSE_SUPER))


def parse_superblock(raw: bytes, device_size: int, verify: bool = True) -> Superblock:
    """Decode and validate the superblock at byte 1024; raise on anything that breaks the format.

    With 64bit the counts' high words are folded in (``s_blocks_count`` is the whole count);
    ``verify`` checks the superblock's own checksum (metadata_csum)."""
    if len(raw) < L.SUPERBLOCK_SIZE:
        raise CorruptImageError("image too small to hold a superblock", f"{device_size} bytes")
    f = L.SUPERBLOCK.unpack(raw)
    sb = Superblock(raw=bytes(raw), fields=f)
    where = "superblock"
    if f["s_magic"] != L.EXT2_MAGIC:
        raise CorruptImageError(f"bad magic 0x{f['s_magic']:04x}, not an ext2/3/4 filesystem", where)
    _check_features(sb)
    incompat, ro = f["s_feature_incompat"], f["s_feature_ro_compat"]
    if ro & L.RO_COMPAT_METADATA_CSUM:
        if f["s_checksum_type"] != 1:
            raise CorruptImageError(f"checksum type {f['s_checksum_type']} is not crc32c", where)
        if verify and crc32c_raw(0xFFFFFFFF, raw[:0x3FC]) != f["s_checksum"]:
            raise CorruptImageError("superblock checksum does not match", where)
        sb.metadata_csum = True
        sb.csum_seed = (f["s_checksum_seed"] if incompat & L.INCOMPAT_CSUM_SEED
                        else crc32c_raw(0xFFFFFFFF, f["s_uuid"]))
    elif incompat & L.INCOMPAT_CSUM_SEED:
        raise CorruptImageError("metadata_csum_seed without metadata_csum", where)
    elif ro & L.RO_COMPAT_GDT_CSUM:
        sb.gdt_csum = True
    if f["s_log_block_size"] > 6:
        raise CorruptImageError(f"block size log {f['s_log_block_size']} too large", where)
    bs = 1024 << f["s_log_block_size"]
    ratio = 1
    if ro & L.RO_COMPAT_BIGALLOC:
        if not f["s_log_block_size"] <= f["s_log_frag_size"] <= f["s_log_block_size"] + 16:
            raise CorruptImageError(f"cluster size log {f['s_log_frag_size']} invalid", where)
        ratio = 1 << (f["s_log_frag_size"] - f["s_log_block_size"])
    elif f["s_log_frag_size"] != f["s_log_block_size"]:
        raise CorruptImageError("fragment size differs from block size", where)
    sb.cluster_ratio = ratio
    expected_fdb = 1 if bs == 1024 and ratio == 1 else 0
    if f["s_first_data_block"] != expected_fdb:
        raise CorruptImageError(
            f"first data block is {f['s_first_data_block']}, must be {expected_fdb}", where)
    rev = f["s_rev_level"]
    if rev == 0:
        isize, first_ino = L.GOOD_OLD_INODE_SIZE, L.GOOD_OLD_FIRST_INO
    else:
        isize, first_ino = f["s_inode_size"], f["s_first_ino"]
        if rev > 1:
            sb.readonly_reason = f"revision {rev} is newer than ext2 revision 1"
        if isize < 128 or isize > bs or isize & (isize - 1):
            raise CorruptImageError(f"inode size {isize} invalid", where)
        if first_ino < L.GOOD_OLD_FIRST_INO:
            raise CorruptImageError(f"first inode {first_ino} below 11", where)
    if incompat & L.INCOMPAT_64BIT:
        for lo, hi in (("s_blocks_count", "s_blocks_count_hi"), ("s_r_blocks_count", "s_r_blocks_count_hi"),
                       ("s_free_blocks_count", "s_free_blocks_hi")):
            f[lo] |= f[hi] << 32
        desc_size = f["s_desc_size"]
        if not 64 <= desc_size <= 1024 or desc_size & (desc_size - 1):
            raise CorruptImageError(f"group descriptor size {desc_size} invalid", where)
    else:
        desc_size = L.GROUP_DESC.size
    bpg, ipg = f["s_blocks_per_group"], f["s_inodes_per_group"]
    if ratio > 1 and bpg != f["s_frags_per_group"] * ratio:
        raise CorruptImageError(f"{bpg} blocks per group is not {f['s_frags_per_group']} clusters", where)
    if not 8 <= bpg // ratio <= min(8 * bs, 65528) or bpg % 8:
        raise CorruptImageError(f"{bpg} blocks per group out of range", where)
    ipb = bs // isize
    if not ipb <= ipg <= 8 * bs:
        raise CorruptImageError(f"{ipg} inodes per group out of range", where)
    blocks = f["s_blocks_count"]
    if blocks <= f["s_first_data_block"]:
        raise CorruptImageError(f"block count {blocks} too small", where)
    if blocks * bs > device_size:
        raise CorruptImageError(
            f"block count {blocks} exceeds the device ({device_size // bs} blocks of {bs})", where)
    groups = -(-(blocks - f["s_first_data_block"]) // bpg)
    if groups * ipg != f["s_inodes_count"]:
        raise CorruptImageError(
            f"inode count {f['s_inodes_count']} is not {groups} groups x {ipg} inodes", where)
    if first_ino >= f["s_inodes_count"]:
        raise CorruptImageError(f"first inode {first_ino} beyond inode count", where)
    desc_blocks = -(-groups // (bs // desc_size))
    if incompat & L.INCOMPAT_META_BG:
        if f["s_first_meta_bg"] > desc_blocks:
            raise CorruptImageError(
                f"first meta_bg {f['s_first_meta_bg']} past the {desc_blocks} descriptor blocks", where)
    elif f["s_first_data_block"] + 1 + desc_blocks > blocks:
        raise CorruptImageError("group descriptors do not fit in the filesystem", where)
    if f["s_free_blocks_count"] > blocks or f["s_free_inodes_count"] > f["s_inodes_count"]:
        sb.warnings.append("free counts exceed totals")
    itable_blocks = -(-ipg * isize // bs)
    if itable_blocks + 3 > bpg and not incompat & L.INCOMPAT_FLEX_BG:
        raise CorruptImageError(f"inode table ({itable_blocks} blocks) does not fit a group", where)
    if rev == 0 and (f["s_feature_compat"] or incompat or ro):
        sb.warnings.append("feature flags set on a revision 0 filesystem")
    sb.block_size = bs
    sb.groups = groups
    sb.desc_size = desc_size
    sb.desc_blocks = desc_blocks
    sb.inode_size = isize
    sb.first_ino = first_ino
    sb.inodes_per_block = ipb
    sb.itable_blocks = itable_blocks
    sb.addr_per_block = bs // 4
    if f["s_feature_compat"] & L.COMPAT_SPARSE_SUPER2:
        sb.backup_bgs = (f["s_backup_bgs0"], f["s_backup_bgs1"])
    return sb


def _check_features(sb: Superblock) -> None:
    """Refuse incompatible features; note those that only allow reading."""
    f = sb.fields
    unknown_incompat = f["s_feature_incompat"] & ~L.INCOMPAT_SUPPORTED
    if unknown_incompat:
        names = feature_names(unknown_incompat, L.INCOMPAT_FEATURES, "I")
        raise UnsupportedFeatureError(
            "unsupported incompatible feature" + ("s" if len(names) > 1 else "") + ": "
            + ", ".join(names) + " (xipfs reads ext2 and ext4)", tuple(names))
    # needs_recovery is not a reason by itself: a writer replays the journal first (Volume)
    ro_incompat = f["s_feature_incompat"] & ~(L.INCOMPAT_WRITABLE | L.INCOMPAT_RECOVER)
    unknown_ro = f["s_feature_ro_compat"] & ~L.RO_COMPAT_SUPPORTED
    if ro_incompat:
        names = feature_names(ro_incompat, L.INCOMPAT_FEATURES, "I")
        sb.readonly_reason = "feature " + ", ".join(names) + " (xipfs reads it but does not write it)"
    elif unknown_ro:
        names = feature_names(unknown_ro, L.RO_COMPAT_FEATURES, "R")
        sb.readonly_reason = "read-only compatible feature " + ", ".join(names)
    elif f["s_feature_compat"] & ~L.COMPAT_WRITABLE:
        names = feature_names(f["s_feature_compat"] & ~L.COMPAT_WRITABLE, L.COMPAT_FEATURES, "C")
        sb.readonly_reason = "compatible feature " + ", ".join(names) + " that xipfs does not maintain"


# -- writing the superblock ---------------------------------------------------------------------
STATE_VALID = 1
#: Superblock fields a writer changes (everything else is preserved byte for byte).
_SB_MUTABLE = ("s_free_blocks_count", "s_free_inodes_count", "s_mtime", "s_wtime", "s_mnt_count",
               "s_max_mnt_count", "s_state", "s_feature_compat", "s_feature_incompat",
               "s_feature_ro_compat", "s_rev_level", "s_first_ino", "s_inode_size",
               "s_block_group_nr")


def write_super(vol: Volume) -> None:
    """Store the superblock fields xipfs changes; every other byte stays as it was."""
    sb = vol.sb
    raw = bytearray(sb.raw)
    f = sb.fields
    for name in _SB_MUTABLE:
        if name == "s_free_blocks_count":         # 64 bits with 64bit, split in two words
            L.SUPERBLOCK.pack_field(raw, name, f[name] & 0xFFFFFFFF)
            if f["s_feature_incompat"] & L.INCOMPAT_64BIT:
                L.SUPERBLOCK.pack_field(raw, "s_free_blocks_hi", f[name] >> 32)
            continue
        L.SUPERBLOCK.pack_field(raw, name, f[name])
    seal_superblock(sb, raw)
    sb.raw = bytes(raw)
    vol.device.write(sb.raw, L.SUPERBLOCK_OFFSET)


def seal_superblock(sb: Superblock, raw: bytearray) -> None:
    """Set a superblock copy's own checksum (metadata_csum) after its fields changed."""
    if sb.metadata_csum:
        L.SUPERBLOCK.pack_field(raw, "s_checksum", crc32c_raw(0xFFFFFFFF, raw[:_SB_CSUM_AT]))


_SB_CSUM_AT = L.SUPERBLOCK.offsets["s_checksum"]


def set_feature(vol: Volume, field: str, bit: int) -> None:
    """Turn on feature ``bit`` of superblock ``field`` (for example large_file when a file
    reaches 2 GiB, ext_attr before the first xattr block), upgrading a revision 0 image first
    (features need revision 1), as Linux's ``ext2_update_dynamic_rev``."""
    f = vol.sb.fields
    if f[field] & bit:
        return
    if f["s_rev_level"] == 0:
        f["s_rev_level"] = 1
        f["s_first_ino"] = L.GOOD_OLD_FIRST_INO
        f["s_inode_size"] = L.GOOD_OLD_INODE_SIZE
    f[field] |= bit
    write_super(vol)


#: Linux's CLOCK_REALTIME_COARSE (Python names it only from 3.13), where the kernel keeps time(2).
_COARSE_CLOCK = getattr(time, "CLOCK_REALTIME_COARSE", 5)


def write_seconds() -> int:
    """Now in whole seconds as Linux stamps a superblock: from the coarse clock time(2) reads,
    which the precise one runs up to a tick ahead of (stamped from that, e2fsck started just
    after a second boundary finds the last write time in the future)."""
    try:
        return int(time.clock_gettime(_COARSE_CLOCK))
    except OSError:                                   # not Linux
        return int(time.time())
