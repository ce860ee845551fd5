"""ext2 on-disk structures, declared once (little-endian), apart from the logic that uses them.

Each structure is a list of ``(field, struct code)`` pairs in on-disk order; ``_`` fields are
padding or fields xipfs does not interpret. Offsets and meanings follow e2fsprogs
``lib/ext2fs/ext2_fs.h`` (see ``docs`` in the shared folder, ext2-spec.md). The fast
``struct.Struct``s of the hot paths are derived from these declarations (:meth:`Layout.span`,
:meth:`Layout.select`), never written out by hand beside them.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Any


class Layout:
    """A fixed-size little-endian record: decode to a dict, encode back, derive fast Structs.

    ``struct`` covers the whole record, ``_`` fields as pad bytes: it unpacks to the values of
    ``fields`` in order (so ``fields.index(name)`` is a value's position in the tuple).
    """

    def __init__(self, name: str, fields: list[tuple[str, str]]) -> None:
        self.name = name
        self._declared = list(fields)
        #: ``(field, code, offset, size)`` of every declared field, padding included.
        self._slots: list[tuple[str, str, int, int]] = []
        self.offsets: dict[str, int] = {}
        self.codes: dict[str, struct.Struct] = {}
        pos = 0
        for field, code in fields:
            size = struct.calcsize("<" + code)
            self._slots.append((field, code, pos, size))
            if field != "_":
                self.offsets[field] = pos
                self.codes[field] = struct.Struct("<" + code)
            pos += size
        self.size = pos
        self.fields = list(self.offsets)
        self.struct = self.span()

    def span(self, first: str | None = None, last: str | None = None) -> struct.Struct:
        """A Struct for every field from ``first`` through ``last`` (default: the whole record),
        padding as pad bytes; it belongs at ``offsets[first]`` of the record."""
        lo = self.offsets[first] if first is not None else 0
        hi = self.offsets[last] + self.codes[last].size if last is not None else self.size
        return self._derive([f for f, _, pos, _ in self._slots if f != "_" and lo <= pos < hi], lo, hi)

    def select(self, *names: str, expand: dict[str, str] | None = None,
               end: int | None = None) -> struct.Struct:
        """A Struct for just ``names`` (in on-disk order), from the first to the end of the last
        (or to byte ``end`` of the record), at ``offsets[names[0]]``; the fields between them are
        pad bytes (zeros when packed). ``expand`` decodes a field as another code (``i_block``
        as its 15 words)."""
        if sorted(names, key=self.offsets.__getitem__) != list(names):
            raise ValueError(f"{self.name}: fields {names} not in on-disk order")
        last = self.offsets[names[-1]] + self.codes[names[-1]].size
        return self._derive(list(names), self.offsets[names[0]], max(last, end or 0), expand or {})

    def _derive(self, names: list[str], lo: int, hi: int,
                expand: dict[str, str] | None = None) -> struct.Struct:
        want = set(names)
        expand = expand or {}
        fmt = ["<"]
        gap = 0
        for field, code, pos, size in self._slots:
            if pos < lo or pos >= hi:
                continue
            if field in want:
                if gap:
                    fmt.append(f"{gap}x")
                    gap = 0
                fmt.append(expand.get(field, code))
            else:
                gap += size
        if gap:
            fmt.append(f"{gap}x")
        return struct.Struct("".join(fmt))

    def unpack(self, buf: Any, offset: int = 0) -> dict[str, Any]:
        """The record at ``offset`` of ``buf`` as ``{field: value}`` (padding dropped)."""
        return dict(zip(self.fields, self.struct.unpack_from(buf, offset), strict=True))

    def pack_field(self, buf: bytearray, field: str, value: Any, offset: int = 0) -> None:
        """Store one field of the record at ``offset`` of ``buf``."""
        self.codes[field].pack_into(buf, offset + self.offsets[field], value)

    def pack(self, values: dict[str, Any], base: bytes | None = None) -> bytes:
        """The record with ``values`` stored over ``base`` (zeros by default)."""
        buf = bytearray(base if base is not None else bytes(self.size))
        for field, value in values.items():
            self.pack_field(buf, field, value)
        return bytes(buf)


def pointers(count: int, size: int | None = None) -> struct.Struct:
    """``count`` 32-bit block pointers (``i_block`` words, an indirect block's entries), then
    zero padding up to ``size`` bytes."""
    pad = (size - 4 * count) if size is not None else 0
    return struct.Struct(f"<{count}I{pad}x" if pad else f"<{count}I")


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
    # 0x150: ext4 (the _hi words count only with 64bit)
    ("s_blocks_count_hi", "I"), ("s_r_blocks_count_hi", "I"), ("s_free_blocks_hi", "I"),
    ("s_min_extra_isize", "H"), ("s_want_extra_isize", "H"), ("s_flags", "I"),
    ("s_raid_stride", "H"), ("s_mmp_update_interval", "H"), ("s_mmp_block", "Q"),
    ("s_raid_stripe_width", "I"), ("s_log_groups_per_flex", "B"), ("s_checksum_type", "B"),
    ("s_encryption_level", "B"), ("_", "B"), ("s_kbytes_written", "Q"),
    ("s_snapshot_inum", "I"), ("s_snapshot_id", "I"), ("s_snapshot_r_blocks_count", "Q"),
    ("s_snapshot_list", "I"), ("s_error_count", "I"), ("s_first_error_time", "I"),
    ("s_first_error_ino", "I"), ("s_first_error_block", "Q"), ("s_first_error_func", "32s"),
    ("s_first_error_line", "I"), ("s_last_error_time", "I"), ("s_last_error_ino", "I"),
    ("s_last_error_line", "I"), ("s_last_error_block", "Q"), ("s_last_error_func", "32s"),
    ("s_mount_opts", "64s"),
    # 0x240
    ("s_usr_quota_inum", "I"), ("s_grp_quota_inum", "I"), ("s_overhead_clusters", "I"),
    ("s_backup_bgs0", "I"), ("s_backup_bgs1", "I"), ("s_encrypt_algos", "4s"),
    ("s_encrypt_pw_salt", "16s"), ("s_lpf_ino", "I"), ("s_prj_quota_inum", "I"),
    ("s_checksum_seed", "I"), ("s_wtime_hi", "B"), ("s_mtime_hi", "B"), ("s_mkfs_time_hi", "B"),
    ("s_lastcheck_hi", "B"), ("s_first_error_time_hi", "B"), ("s_last_error_time_hi", "B"),
    ("s_first_error_errcode", "B"), ("s_last_error_errcode", "B"), ("s_encoding", "H"),
    ("s_encoding_flags", "H"), ("s_orphan_file_inum", "I"), ("_", "376s"),
    # 0x3FC: crc32c of everything before (metadata_csum)
    ("s_checksum", "I"),
])
assert SUPERBLOCK.size == SUPERBLOCK_SIZE and SUPERBLOCK.offsets["s_checksum_seed"] == 0x270
assert SUPERBLOCK.offsets["s_orphan_file_inum"] == 0x280
assert SUPERBLOCK.offsets["s_log_groups_per_flex"] == 0x174

GROUP_DESC = Layout("group descriptor", [
    ("bg_block_bitmap", "I"), ("bg_inode_bitmap", "I"), ("bg_inode_table", "I"),
    ("bg_free_blocks_count", "H"), ("bg_free_inodes_count", "H"), ("bg_used_dirs_count", "H"),
    ("bg_flags", "H"), ("bg_exclude_bitmap_lo", "I"), ("bg_block_bitmap_csum_lo", "H"),
    ("bg_inode_bitmap_csum_lo", "H"), ("bg_itable_unused", "H"), ("bg_checksum", "H"),
])
assert GROUP_DESC.size == 32
#: With 64bit, descriptors of ``s_desc_size`` (64) bytes: the high halves after the 32 above.
GROUP_DESC_HI = Layout("group descriptor (64bit half)", [
    ("bg_block_bitmap_hi", "I"), ("bg_inode_bitmap_hi", "I"), ("bg_inode_table_hi", "I"),
    ("bg_free_blocks_count_hi", "H"), ("bg_free_inodes_count_hi", "H"),
    ("bg_used_dirs_count_hi", "H"), ("bg_itable_unused_hi", "H"), ("bg_exclude_bitmap_hi", "I"),
    ("bg_block_bitmap_csum_hi", "H"), ("bg_inode_bitmap_csum_hi", "H"), ("bg_reserved", "I"),
])
assert GROUP_DESC_HI.size == 32
GROUP_DESC_64 = Layout("group descriptor (64bit)", GROUP_DESC._declared + GROUP_DESC_HI._declared)

#: The 128-byte inode (every inode) ...
_INODE_BASE = [
    ("i_mode", "H"), ("i_uid", "H"), ("i_size", "I"), ("i_atime", "i"), ("i_ctime", "i"),
    ("i_mtime", "i"), ("i_dtime", "I"), ("i_gid", "H"), ("i_links_count", "H"),
    ("i_blocks", "I"), ("i_flags", "I"), ("i_osd1", "I"), ("i_block", "60s"),
    ("i_generation", "I"), ("i_file_acl", "I"), ("i_size_high", "I"), ("i_faddr", "I"),
    ("i_blocks_hi", "H"), ("i_file_acl_high", "H"), ("i_uid_high", "H"), ("i_gid_high", "H"),
    ("i_checksum_lo", "H"), ("_", "H"),
]
#: ... then, in a large inode, i_extra_isize and the fields it covers (at offset 128).
_INODE_EXTRA = [
    ("i_extra_isize", "H"), ("i_checksum_hi", "H"), ("i_ctime_extra", "I"), ("i_mtime_extra", "I"),
    ("i_atime_extra", "I"), ("i_crtime", "i"), ("i_crtime_extra", "I"), ("i_version_hi", "I"),
    ("i_projid", "I"),
]
INODE = Layout("inode", _INODE_BASE)
assert INODE.size == 128
INODE_EXTRA = Layout("inode extra", _INODE_EXTRA)
#: Both together, offsets from the inode's start (``ext2_inode_large``).
INODE_LARGE = Layout("large inode", _INODE_BASE + _INODE_EXTRA)
N_BLOCKS = 15
N_DIRECT = 12
IND_BLOCK, DIND_BLOCK, TIND_BLOCK = 12, 13, 14
#: ``i_block`` of a block-mapped inode as its 15 pointers (direct, then single, double, triple).
I_BLOCK = pointers(N_BLOCKS)
assert I_BLOCK.size == INODE.codes["i_block"].size

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
#: In-inode attributes: this magic at ``128 + i_extra_isize``, then the entries.
XATTR_IBODY_HEADER = Layout("xattr in-inode header", [("h_magic", "I")])

#: A POSIX ACL as ext2 stores it in its xattr value: a header, then entries, short (tag and
#: permissions) for the owner, group, mask and other, full (with an id) for named users and groups.
ACL_HEADER = Layout("ext2 ACL header", [("a_version", "I")])
ACL_ENTRY = Layout("ext2 ACL entry", [("e_tag", "H"), ("e_perm", "H"), ("e_id", "I")])
ACL_ENTRY_SHORT = Layout("ext2 ACL short entry", [("e_tag", "H"), ("e_perm", "H")])
EXT2_ACL_VERSION = 1

#: An htree (dir_index) directory's first block: ``.`` and ``..``, then this root information
#: (at offset 24), then a count/limit header and the index entries (Linux ``struct dx_root``).
DX_ROOT_INFO = Layout("htree root info", [
    ("reserved_zero", "I"), ("hash_version", "B"), ("info_length", "B"),
    ("indirect_levels", "B"), ("unused_flags", "B"),
])
#: The start of every index block's entries: how many there are and how many fit.
DX_COUNTLIMIT = Layout("htree count/limit", [("limit", "H"), ("count", "H")])
DX_ENTRY = Layout("htree index entry", [("hash", "I"), ("block", "I")])

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
COMPAT_FAST_COMMIT = 0x400
#: Compatible features xipfs keeps right when it writes: dir_prealloc, imagic_inodes, ext_attr,
#: resize_inode, dir_index, sparse_super2, stable_inodes, has_journal while the journal is empty
#: (a pending one is replayed into the image first; xipfs itself does not journal), and
#: orphan_file (left empty: xipfs keeps its orphans on the superblock's list, which e2fsck and
#: Linux also read; orphan_present, a file in use, is a read-only-compatible bit).
#: Others (lazy_bg, exclude_inode, snapshot_bitmap, fast_commit) name structures xipfs would
#: not update, so their images are opened read-only.
COMPAT_ORPHAN_FILE = 0x1000
COMPAT_WRITABLE = (0x1 | 0x2 | COMPAT_HAS_JOURNAL | 0x8 | 0x10 | 0x20 | COMPAT_SPARSE_SUPER2 | 0x800
                   | COMPAT_ORPHAN_FILE)
INCOMPAT_COMPRESSION = 0x1
INCOMPAT_FILETYPE = 0x2
INCOMPAT_RECOVER = 0x4
INCOMPAT_JOURNAL_DEV = 0x8
INCOMPAT_META_BG = 0x10
INCOMPAT_EXTENTS = 0x40
INCOMPAT_64BIT = 0x80
INCOMPAT_MMP = 0x100
INCOMPAT_FLEX_BG = 0x200
INCOMPAT_EA_INODE = 0x400
INCOMPAT_DIRDATA = 0x1000
INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
INCOMPAT_INLINE_DATA = 0x8000
INCOMPAT_ENCRYPT = 0x10000
INCOMPAT_CASEFOLD = 0x20000
COMPAT_IMAGIC = 0x2
RO_COMPAT_SPARSE_SUPER = 0x1
RO_COMPAT_LARGE_FILE = 0x2
RO_COMPAT_BTREE_DIR = 0x4
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_EXTRA_ISIZE = 0x40
RO_COMPAT_QUOTA = 0x100
RO_COMPAT_BIGALLOC = 0x200
RO_COMPAT_METADATA_CSUM = 0x400
RO_COMPAT_SHARED_BLOCKS = 0x4000
RO_COMPAT_VERITY = 0x8000
RO_COMPAT_ORPHAN_PRESENT = 0x10000

#: What xipfs reads: any other incompat bit refuses the image (compression, journal_dev,
#: dirdata). A journal that needs recovery is replayed in memory (see journal.py).
INCOMPAT_SUPPORTED = (INCOMPAT_FILETYPE | INCOMPAT_RECOVER | INCOMPAT_META_BG | INCOMPAT_EXTENTS
                      | INCOMPAT_64BIT | INCOMPAT_MMP | INCOMPAT_FLEX_BG | INCOMPAT_EA_INODE
                      | INCOMPAT_CSUM_SEED | INCOMPAT_LARGEDIR | INCOMPAT_INLINE_DATA
                      | INCOMPAT_ENCRYPT | INCOMPAT_CASEFOLD)
#: What xipfs writes: any other incompat bit allows read-only use (ext4's are added below).
INCOMPAT_WRITABLE = INCOMPAT_FILETYPE
#: What xipfs may write: any other ro_compat bit allows read-only use only.
RO_COMPAT_SUPPORTED = RO_COMPAT_SPARSE_SUPER | RO_COMPAT_LARGE_FILE | RO_COMPAT_BTREE_DIR

# -- inode fields -----------------------------------------------------------------------------
ROOT_INO = 2
RESIZE_INO = 7
JOURNAL_INO = 8
GOOD_OLD_FIRST_INO = 11
GOOD_OLD_INODE_SIZE = 128

# i_flags that change how i_block is read (ext4 formats): an ext2 reader must not follow them.
FL_IMMUTABLE = 0x10
FL_APPEND = 0x20
FL_INDEX = 0x1000
FL_IMAGIC = 0x2000
FL_HUGE_FILE = 0x40000
FL_EXTENTS = 0x80000
FL_INLINE_DATA = 0x10000000
FL_ENCRYPT = 0x800
FL_EA_INODE = 0x200000
FL_VERITY = 0x100000
FL_CASEFOLD = 0x40000000
#: ext4's per-inode DAX flag (``FS_XFLAG_DAX``): a mount with ``dax=inode`` maps the file in place.
FL_DAX = 0x02000000
#: Group descriptor flags (ext4): inode table or block bitmap not initialised.
BG_INODE_UNINIT = 0x1
BG_BLOCK_UNINIT = 0x2
FL_FOREIGN_FORMAT = 0x80000 | 0x10000000 | 0x800 | 0x200000 | 0x100000 | 0x40000000
FOREIGN_FLAG_NAMES = {
    0x80000: "extents", 0x10000000: "inline_data", 0x800: "encrypt", 0x200000: "ea_inode",
    0x100000: "verity", 0x40000000: "casefold",
}

# directory entry file types (filetype feature)
FT_UNKNOWN, FT_REG, FT_DIR, FT_CHR, FT_BLK, FT_FIFO, FT_SOCK, FT_SYMLINK = range(8)
#: S_IFMT value for each directory entry file type.
FT_TO_IFMT = {FT_REG: stat.S_IFREG, FT_DIR: stat.S_IFDIR, FT_CHR: stat.S_IFCHR,
              FT_BLK: stat.S_IFBLK, FT_FIFO: stat.S_IFIFO, FT_SOCK: stat.S_IFSOCK,
              FT_SYMLINK: stat.S_IFLNK}
IFMT_TO_FT = {v: k for k, v in FT_TO_IFMT.items()}

# xattr name indexes -> prefixes
XATTR_PREFIXES = {
    1: "user.", 2: "system.posix_acl_access", 3: "system.posix_acl_default", 4: "trusted.",
    6: "security.", 7: "system.", 8: "system.richacl", 10: "gnu.",
}


# -- ext4 writing (issue 15) -------------------------------------------------------------------
#: The ext4 features xipfs writes as Linux does: extent trees, 64-bit descriptors, flex_bg,
#: checksums everywhere, uninit groups, inline data (moved out when changed), values in inodes of
#: their own, casefolded directories (names hashed and matched as folded). ``XIPFS_EXT4_WRITE=0``
#: in the environment opens every image with one of them read-only, as xipfs did before it
#: wrote ext4.
EXT4_WRITE_ENV = "XIPFS_EXT4_WRITE"
EXT4_INCOMPAT_WRITABLE = (INCOMPAT_EXTENTS | INCOMPAT_64BIT | INCOMPAT_FLEX_BG | INCOMPAT_CSUM_SEED
                          | INCOMPAT_INLINE_DATA | INCOMPAT_EA_INODE | INCOMPAT_LARGEDIR
                          | INCOMPAT_CASEFOLD)
EXT4_RO_COMPAT_WRITABLE = (RO_COMPAT_HUGE_FILE | RO_COMPAT_GDT_CSUM | RO_COMPAT_DIR_NLINK
                           | RO_COMPAT_EXTRA_ISIZE | RO_COMPAT_METADATA_CSUM)
if os.environ.get(EXT4_WRITE_ENV) != "0":
    INCOMPAT_WRITABLE |= EXT4_INCOMPAT_WRITABLE
    RO_COMPAT_SUPPORTED |= EXT4_RO_COMPAT_WRITABLE
