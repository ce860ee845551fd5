"""ext2 on-disk structures, declared once (little-endian), apart from the logic that uses them.

Each structure is a list of ``(field, struct code)`` pairs in on-disk order; ``_`` fields are
padding or fields xipfs does not interpret. Offsets and meanings follow e2fsprogs
``lib/ext2fs/ext2_fs.h`` (see ``docs`` in the shared folder, ext2-spec.md).
"""

from __future__ import annotations

import struct
from typing import Any


class Layout:
    """A fixed-size little-endian record: decode to a dict or to attributes, encode back."""

    def __init__(self, name: str, fields: list[tuple[str, str]]) -> None:
        self.name = name
        self.fields = [f for f, _ in fields]
        self.struct = struct.Struct("<" + "".join(code for _, code in fields))
        self.size = self.struct.size
        self.offsets: dict[str, int] = {}
        self.codes: dict[str, struct.Struct] = {}
        pos = 0
        for field, code in fields:
            self.offsets[field] = pos
            self.codes[field] = struct.Struct("<" + code)
            pos += struct.calcsize("<" + code)

    def unpack(self, buf: Any, offset: int = 0) -> dict[str, Any]:
        """The record at ``offset`` of ``buf`` as ``{field: value}`` (padding dropped)."""
        values = self.struct.unpack_from(buf, offset)
        return {f: v for f, v in zip(self.fields, values, strict=True) if f != "_"}

    def pack_field(self, buf: bytearray, field: str, value: Any, offset: int = 0) -> None:
        """Store one field of the record at ``offset`` of ``buf``."""
        self.codes[field].pack_into(buf, offset + self.offsets[field], value)

    def pack(self, values: dict[str, Any], base: bytes | None = None) -> bytes:
        """The record with ``values`` stored over ``base`` (zeros by default)."""
        buf = bytearray(base if base is not None else bytes(self.size))
        for field, value in values.items():
            self.pack_field(buf, field, value)
        return bytes(buf)


SUPERBLOCK_OFFSET = 1024
SUPERBLOCK_SIZE = 1024
EXT2_MAGIC = 0xEF53

SUPERBLOCK = Layout("superblock", [
    ("s_inodes_count", "I"), ("s_blocks_count", "I"), ("s_r_blocks_count", "I"),
    ("s_free_blocks_count", "I"), ("s_free_inodes_count", "I"), ("s_first_data_block", "I"),
    ("s_log_block_size", "I"), ("s_log_frag_size", "I"), ("s_blocks_per_group", "I"),
    ("s_frags_per_group", "I"), ("s_inodes_per_group", "I"), ("s_mtime", "I"), ("s_wtime", "I"),
    ("s_mnt_count", "H"), ("s_max_mnt_count", "h"), ("s_magic", "H"), ("s_state", "H"),
    ("s_errors", "H"), ("s_minor_rev_level", "H"), ("s_lastcheck", "I"), ("s_checkinterval", "I"),
    ("s_creator_os", "I"), ("s_rev_level", "I"), ("s_def_resuid", "H"), ("s_def_resgid", "H"),
    # 0x54: revision 1 (dynamic) fields
    ("s_first_ino", "I"), ("s_inode_size", "H"), ("s_block_group_nr", "H"),
    ("s_feature_compat", "I"), ("s_feature_incompat", "I"), ("s_feature_ro_compat", "I"),
    ("s_uuid", "16s"), ("s_volume_name", "16s"), ("s_last_mounted", "64s"),
    ("s_algorithm_usage_bitmap", "I"), ("s_prealloc_blocks", "B"), ("s_prealloc_dir_blocks", "B"),
    ("s_reserved_gdt_blocks", "H"),
    # 0xD0: ext3 journal fields
    ("s_journal_uuid", "16s"), ("s_journal_inum", "I"), ("s_journal_dev", "I"),
    ("s_last_orphan", "I"), ("s_hash_seed", "16s"), ("s_def_hash_version", "B"),
    ("s_jnl_backup_type", "B"), ("s_desc_size", "H"), ("s_default_mount_opts", "I"),
    ("s_first_meta_bg", "I"), ("s_mkfs_time", "I"), ("s_jnl_blocks", "68s"),
    # 0x150: ext4 fields xipfs reads (everything after is preserved, never interpreted)
    ("s_blocks_count_hi", "I"), ("s_r_blocks_count_hi", "I"), ("s_free_blocks_hi", "I"),
    ("s_min_extra_isize", "H"), ("s_want_extra_isize", "H"), ("s_flags", "I"),
])

GROUP_DESC = Layout("group descriptor", [
    ("bg_block_bitmap", "I"), ("bg_inode_bitmap", "I"), ("bg_inode_table", "I"),
    ("bg_free_blocks_count", "H"), ("bg_free_inodes_count", "H"), ("bg_used_dirs_count", "H"),
    ("bg_flags", "H"), ("bg_exclude_bitmap_lo", "I"), ("bg_block_bitmap_csum_lo", "H"),
    ("bg_inode_bitmap_csum_lo", "H"), ("bg_itable_unused", "H"), ("bg_checksum", "H"),
])
assert GROUP_DESC.size == 32

#: The 128-byte inode, then the fields of large inodes (i_extra_isize and what it covers).
INODE = Layout("inode", [
    ("i_mode", "H"), ("i_uid", "H"), ("i_size", "I"), ("i_atime", "i"), ("i_ctime", "i"),
    ("i_mtime", "i"), ("i_dtime", "I"), ("i_gid", "H"), ("i_links_count", "H"),
    ("i_blocks", "I"), ("i_flags", "I"), ("i_osd1", "I"), ("i_block", "60s"),
    ("i_generation", "I"), ("i_file_acl", "I"), ("i_size_high", "I"), ("i_faddr", "I"),
    ("i_blocks_hi", "H"), ("i_file_acl_high", "H"), ("i_uid_high", "H"), ("i_gid_high", "H"),
    ("i_checksum_lo", "H"), ("_", "H"),
])
assert INODE.size == 128
INODE_EXTRA = Layout("inode extra", [
    ("i_extra_isize", "H"), ("i_checksum_hi", "H"), ("i_ctime_extra", "I"), ("i_mtime_extra", "I"),
    ("i_atime_extra", "I"), ("i_crtime", "i"), ("i_crtime_extra", "I"), ("i_version_hi", "I"),
    ("i_projid", "I"),
])
N_BLOCKS = 15
N_DIRECT = 12
IND_BLOCK, DIND_BLOCK, TIND_BLOCK = 12, 13, 14

DIRENT = Layout("directory entry", [
    ("inode", "I"), ("rec_len", "H"), ("name_len", "B"), ("file_type", "B"),
])
DIRENT_HEADER = DIRENT.size  # 8 bytes, then the name

XATTR_HEADER = Layout("xattr block header", [
    ("h_magic", "I"), ("h_refcount", "I"), ("h_blocks", "I"), ("h_hash", "I"),
    ("h_checksum", "I"), ("_", "12s"),
])
assert XATTR_HEADER.size == 32
XATTR_ENTRY = Layout("xattr entry", [
    ("e_name_len", "B"), ("e_name_index", "B"), ("e_value_offs", "H"), ("e_value_inum", "I"),
    ("e_value_size", "I"), ("e_hash", "I"),
])
XATTR_MAGIC = 0xEA020000
XATTR_MAGIC_V1 = 0xEA010000

# -- feature flags (names as dumpe2fs prints them) ---------------------------------------------
COMPAT_FEATURES = {
    0x1: "dir_prealloc", 0x2: "imagic_inodes", 0x4: "has_journal", 0x8: "ext_attr",
    0x10: "resize_inode", 0x20: "dir_index", 0x40: "lazy_bg", 0x100: "snapshot_bitmap",
    0x200: "sparse_super2", 0x400: "fast_commit", 0x800: "stable_inodes", 0x1000: "orphan_file",
}
INCOMPAT_FEATURES = {
    0x1: "compression", 0x2: "filetype", 0x4: "needs_recovery", 0x8: "journal_dev",
    0x10: "meta_bg", 0x40: "extent", 0x80: "64bit", 0x100: "mmp", 0x200: "flex_bg",
    0x400: "ea_inode", 0x1000: "dirdata", 0x2000: "metadata_csum_seed", 0x4000: "large_dir",
    0x8000: "inline_data", 0x10000: "encrypt", 0x20000: "casefold",
}
RO_COMPAT_FEATURES = {
    0x1: "sparse_super", 0x2: "large_file", 0x4: "btree_dir", 0x8: "huge_file",
    0x10: "uninit_bg", 0x20: "dir_nlink", 0x40: "extra_isize", 0x80: "has_snapshot",
    0x100: "quota", 0x200: "bigalloc", 0x400: "metadata_csum", 0x800: "replica",
    0x1000: "read-only", 0x2000: "project", 0x4000: "shared_blocks", 0x8000: "verity",
    0x10000: "orphan_present",
}
COMPAT_HAS_JOURNAL = 0x4
COMPAT_EXT_ATTR = 0x8
COMPAT_RESIZE_INODE = 0x10
COMPAT_DIR_INDEX = 0x20
COMPAT_SPARSE_SUPER2 = 0x200
#: Compatible features xipfs keeps right when it writes: dir_prealloc, imagic_inodes, ext_attr,
#: resize_inode, dir_index, sparse_super2, stable_inodes (has_journal makes an image read-only).
#: Others (lazy_bg, exclude_inode, snapshot_bitmap, fast_commit, orphan_file) name structures
#: xipfs would not update, so their images are opened read-only.
COMPAT_WRITABLE = 0x1 | 0x2 | COMPAT_HAS_JOURNAL | 0x8 | 0x10 | 0x20 | COMPAT_SPARSE_SUPER2 | 0x800
#: Where sparse_super2 keeps its two backup groups (``s_backup_bgs``, past the fields decoded above).
BACKUP_BGS_OFFSET = 0x24C
INCOMPAT_FILETYPE = 0x2
INCOMPAT_META_BG = 0x10
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4

#: What xipfs reads: any other incompat bit refuses the image. (Linux's ext2 also reads
#: meta_bg; xipfs does not, yet.)
INCOMPAT_SUPPORTED = INCOMPAT_FILETYPE
#: What xipfs may write: any other ro_compat bit allows read-only use only.
RO_COMPAT_SUPPORTED = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR

# -- inode fields -----------------------------------------------------------------------------
ROOT_INO = 2
RESIZE_INO = 7
JOURNAL_INO = 8
GOOD_OLD_FIRST_INO = 11
GOOD_OLD_INODE_SIZE = 128

# i_flags that change how i_block is read (ext4 formats): an ext2 reader must not follow them.
FL_INDEX = 0x1000
FL_EXTENTS = 0x80000
FL_INLINE_DATA = 0x10000000
FL_FOREIGN_FORMAT = 0x80000 | 0x10000000 | 0x800 | 0x200000 | 0x100000 | 0x40000000
FOREIGN_FLAG_NAMES = {
    0x80000: "extents", 0x10000000: "inline_data", 0x800: "encrypt", 0x200000: "ea_inode",
    0x100000: "verity", 0x40000000: "casefold",
}

# directory entry file types (filetype feature)
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
#: S_IFMT value for each directory entry file type.
FT_TO_IFMT = {1: 0o100000, 2: 0o040000, 3: 0o020000, 4: 0o060000, 5: 0o010000, 6: 0o140000,
              7: 0o120000}
IFMT_TO_FT = {v: k for k, v in FT_TO_IFMT.items()}

# xattr name indexes -> prefixes
XATTR_PREFIXES = {
    1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.",
    6: "security.", 7: "system.", 8: "system.richacl", 10: "gnu.",
}
