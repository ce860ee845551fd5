"""Every problem the check can report, as a table apart from the passes (e2fsck's problem.c).

Each entry is a :class:`ProblemKind`: the stable ``code`` that ``xipfs check --json`` emits, a
:class:`Severity`, and a message template (``str.format`` fields; ``{ino}`` and ``{block}`` are the
problem's own inode and block). Several kinds may share one code: the code names the rule broken,
the kind the sentence that says how. A pass reports ``ctx.report(KIND, ino=..., block=..., **fields)``.

The codes (stable strings: tests and users rely on them), by pass:

pass 0, superblock and group descriptors
    ``bad_superblock`` (a superblock field out of range), ``reserved_gdt_blocks`` (reserved GDT
    blocks without resize_inode), ``journal`` (an external journal named without has_journal),
    ``bad_group_descriptor`` (a bitmap or inode table outside its group), ``group_desc_uninit``
    (uninit flags without uninit_bg, BLOCK_UNINIT on the last group), ``metadata_conflict``
    (metadata structures overlapping), ``resize_inode`` (the resize inode does not map the reserved
    GDT blocks); ext4: ``superblock_csum``, ``group_desc_csum`` (checksums), ``itable_unused``
    (more unused inodes than free ones).
pass 1, inodes and blocks
    ``orphan_dtime``, ``zero_dtime``, ``dtime_set`` (deletion times), ``bad_inode_field`` (fields
    ext2 leaves zero), ``bad_flags``, ``extra_isize``, ``extra_time`` (pre-1970 times encoded as
    after 2310), ``inode_xattr`` (xattrs in the inode body), ``bad_xattr_block``, ``xattr_block``
    (these two also: a value in an EA inode without the ea_inode feature), ``xattr_refcount``;
    ext4 ea_inode (an entry whose value is in an inode of its own): ``bad_ea_inode`` (the inode
    named cannot hold a value, or is no EA inode), ``ea_inode_flag`` (an EA inode without
    EXT4_EA_INODE_FL), ``ea_inode_hash`` (the entry hash does not match the EA inode's value
    hash, ``i_atime``), ``ea_inode_size`` (the entry's value size is not the EA inode's
    ``i_size``; not checked by e2fsck 1.47.0); ``reserved_inode``, ``bad_mode``, ``bad_symlink``,
    ``bad_device``, ``special_file_size``, ``i_size``, ``i_blocks``, ``dir_empty``, ``htree``
    (also pass 2: the index itself), ``bad_block`` (blocks outside the filesystem),
    ``metadata_collision`` (an indirect block on metadata), ``too_many_blocks`` (a loop in a block
    map), ``symlink_too_big``, ``dir_too_big``; ext4: ``inode_csum``, ``bad_extent`` (an extent
    tree that breaks the format), ``extent_csum``, ``inline_data`` (no system.data), ``journal``
    (the journal inode and its superblock).
pass 1b, blocks claimed twice
    ``dup_block``.
pass 2, directories
    ``dir_hole``, ``bad_dir_entry`` (rec_len or name_len), ``bad_dot``, ``bad_dotdot``, ``dup_dot``,
    ``dup_dotdot``, ``link_to_dot``, ``link_to_root``, ``null_name``, ``bad_name``,
    ``bad_inode_number``, ``unused_inode``, ``file_type``, ``dir_hardlink``, ``dup_entry``; ext4:
    ``dir_csum`` (a leaf's checksum tail), ``htree`` (an index node's checksum too).
pass 3, connectivity
    ``no_root``, ``unconnected_dir``, ``dir_loop``, ``dotdot_mismatch``.
pass 4, link counts
    ``unattached_inode``, ``link_count``, ``dir_nlink``; ext4: ``ea_inode_refcount`` (an EA
    inode's reference count against the xattr entries naming it; an EA inode no entry names is an
    ``unattached_inode``).
pass 5, bitmaps and counts
    ``block_bitmap_differs``, ``inode_bitmap_differs``, ``bitmap_padding``, ``free_blocks_count``,
    ``free_inodes_count``, ``dirs_count``, ``bitmap_csum`` (ext4), and the minor ``sb_free_blocks_count``,
    ``sb_free_inodes_count`` (:data:`MINOR_CODES`).
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

__all__ = ["CODES", "MINOR_CODES", "PROBLEMS", "Problem", "ProblemKind", "Severity"]


class Problem(NamedTuple):
    """One inconsistency: a stable ``code``, a sentence for humans, and where it is (immutable;
    a named tuple, not a dataclass: ``dataclasses`` and ``inspect`` cost a command ~8 ms)."""

    code: str
    message: str
    ino: int | None = None
    block: int | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The problem as a plain dict (for JSON)."""
        return {"code": self.code, "message": self.message, "ino": self.ino, "block": self.block,
                "path": self.path}


class Severity(enum.Enum):
    """How ``e2fsck -n`` counts a problem: an error (exit 4), or reported without counting."""

    ERROR = "error"
    MINOR = "minor"


class ProblemKind:
    """One entry of the table: the code emitted, its severity, the message template. (A plain
    class, not a dataclass: the table is built at import, which a command pays.)"""

    __slots__ = ("code", "severity", "template")

    def __init__(self, code: str, severity: Severity, template: str) -> None:
        self.code = code
        self.severity = severity
        self.template = template

    def __repr__(self) -> str:
        return f"ProblemKind({self.code!r}, {self.severity}, {self.template!r})"

    def __call__(self, ino: int | None = None, block: int | None = None, **fields: Any) -> Problem:
        """The :class:`Problem` this kind describes, its message filled from ``fields``."""
        return Problem(self.code, self.template.format(ino=ino, block=block, **fields), ino, block)


#: Every kind, in the order declared below.
PROBLEMS: list[ProblemKind] = []


def _kind(code: str, template: str, severity: Severity = Severity.ERROR) -> ProblemKind:
    kind = ProblemKind(code, severity, template)
    PROBLEMS.append(kind)
    return kind


# -- pass 0: superblock, group descriptors, resize inode ----------------------------------------
RESERVED_BLOCKS_COUNT = _kind("bad_superblock", "reserved block count {count} is more than half the "
                              "{blocks} blocks")
RESERVED_GDT_TOO_MANY = _kind("bad_superblock", "{count} reserved GDT blocks, at most {most}")
EXTRA_ISIZE_FIELD = _kind("bad_superblock", "{name} {value} is invalid")
RESERVED_GDT_NO_RESIZE = _kind("reserved_gdt_blocks", "resize_inode is off but {count} GDT blocks are "
                               "reserved")
EXTERNAL_JOURNAL = _kind("journal", "has_journal is off, but the superblock names an external journal "
                         "(UUID {uuid}), which e2fsck cannot find")
BLOCK_BITMAP_OUTSIDE = _kind("bad_group_descriptor", "block bitmap at {block} is outside {where}")
INODE_BITMAP_OUTSIDE = _kind("bad_group_descriptor", "inode bitmap at {block} is outside {where}")
INODE_TABLE_OUTSIDE = _kind("bad_group_descriptor", "inode table at {block} is outside {where}")
GROUP_UNINIT = _kind("group_desc_uninit", "group {group} is marked uninitialized without the uninit_bg "
                     "feature")
INODE_TABLE_CONFLICT = _kind("metadata_conflict", "group {group}'s inode table at {block} overlaps other "
                             "filesystem metadata")
BITMAP_CONFLICT = _kind("metadata_conflict", "group {group}'s {what} at {block} overlaps other filesystem "
                        "metadata")
SB_CSUM = _kind("superblock_csum", "superblock checksum 0x{value:08x} does not match its contents "
                "(0x{expect:08x})")
DESC_BLOCK_OUTSIDE = _kind("bad_group_descriptor", "group descriptor block {index} at {block} is past the "
                           "end of the filesystem")
GDT_CSUM = _kind("group_desc_csum", "group {group} descriptor checksum is 0x{value:04x}, should be "
                 "0x{expect:04x}")
BB_UNINIT_LAST = _kind("group_desc_uninit", "the last group ({group}) is marked BLOCK_UNINIT")
ITABLE_UNUSED = _kind("itable_unused", "group {group} has {value} unused inodes at the end of its table, "
                      "more than its {free} free inodes")
RESIZE_INODE_NOT_CLEAR = _kind("resize_inode", "resize_inode is off but the resize inode has blocks")
RESIZE_INODE_INVALID = _kind("resize_inode", "the resize inode is invalid")

# -- pass 1: inodes -------------------------------------------------------------------------------
ORPHAN_DTIME = _kind("orphan_dtime", "inode {ino} was part of the orphaned inode list")
ZERO_DTIME = _kind("zero_dtime", "deleted inode {ino} has zero dtime")
DTIME_SET = _kind("dtime_set", "inode {ino} is in use but has dtime set")
FADDR = _kind("bad_inode_field", "inode {ino} has i_faddr {value}, should be zero")
FILE_ACL_HIGH = _kind("bad_inode_field", "inode {ino} has i_file_acl_high {value}, should be zero")
BLOCKS_HI = _kind("bad_inode_field", "inode {ino} has i_blocks_hi {value}, should be zero")
DIR_SIZE_HIGH = _kind("bad_inode_field", "directory inode {ino} has i_size_high {value}")
IMAGIC_FLAG = _kind("bad_flags", "inode {ino} has the imagic flag on a filesystem without imagic inodes")
EXTENTS_FLAG = _kind("bad_flags", "inode {ino} has the extents flag on an ext2 filesystem")
INLINE_DATA_FLAG = _kind("bad_flags", "inode {ino} has the inline data flag on an ext2 filesystem")
HTREE_FLAG_NOT_DIR = _kind("bad_flags", "inode {ino} has the htree flag but is not a directory")
SPECIAL_IMMUTABLE = _kind("bad_flags", "special inode {ino} has the immutable or append-only flag")
EXTRA_ISIZE = _kind("extra_isize", "inode {ino} has i_extra_isize {value}, invalid")
EXTRA_TIME = _kind("extra_time", "inode {ino} has a time before 1970 encoded as after 2310")
_IX = "extended attributes in inode {ino}: "
INODE_XATTR_OVERLAP = _kind("inode_xattr", _IX + "entries overlap")
INODE_XATTR_NAME_LEN = _kind("inode_xattr", _IX + "name length {name_len} too long")
INODE_XATTR_EA_INODE = _kind("inode_xattr", _IX + "value in an inode (ea_inode) on a filesystem without "
                             "the feature")
INODE_XATTR_VALUE_SIZE = _kind("inode_xattr", _IX + "value size {size} too large")
INODE_XATTR_VALUE_OVERLAP = _kind("inode_xattr", _IX + "value overlaps other entries")
INODE_XATTR_HASH = _kind("inode_xattr", _IX + "entry hash 0x{hash:08x} is wrong")
INODE_XATTR_OVERRUN = _kind("inode_xattr", _IX + "entry list overruns the inode")
XATTR_BLOCK_NO_FEATURE = _kind("bad_xattr_block", "inode {ino} has xattr block {block}, but the "
                               "filesystem has no ext_attr feature")
XATTR_BLOCK_OUTSIDE = _kind("bad_xattr_block", "inode {ino} has xattr block {block}, but it is outside "
                            "the filesystem")
_XB = "xattr block {block} of inode {ino}: "
XATTR_BLOCK_MAGIC = _kind("xattr_block", _XB + "bad magic 0x{magic:08x}")
XATTR_BLOCK_H_BLOCKS = _kind("xattr_block", _XB + "h_blocks is {value}, should be 1")
XATTR_BLOCK_ENTRY_PAST = _kind("xattr_block", _XB + "entry runs past the block")
XATTR_BLOCK_OVERLAP = _kind("xattr_block", _XB + "entries overlap")
XATTR_BLOCK_INDEX0 = _kind("xattr_block", _XB + "entry with name index 0")
XATTR_BLOCK_EA_INODE = _kind("xattr_block", _XB + "value in an inode (ea_inode) on a filesystem without "
                             "the feature")
XATTR_BLOCK_VALUE_PAST = _kind("xattr_block", _XB + "value ({size} bytes at {offset}) runs past the block")
XATTR_BLOCK_VALUE_OVERLAP = _kind("xattr_block", _XB + "value overlaps other data")
XATTR_BLOCK_HASH = _kind("xattr_block", _XB + "entry hash 0x{hash:08x} is wrong")
XATTR_BLOCK_OVERRUN = _kind("xattr_block", _XB + "entry list overruns the block")
XATTR_BLOCK_CSUM = _kind("xattr_block", _XB + "passes checks, but its checksum does not match")
XATTR_REFCOUNT = _kind("xattr_refcount", "xattr block {block} has reference count {refcount}, should be "
                       "{seen}")
# ext4 ea_inode: an entry whose value is in an inode of its own (e2fsck's check_large_ea_inode)
_EA = "xattr {name} of inode {ino}"
EA_INODE_OUTSIDE = _kind("bad_ea_inode", _EA + " has its value in inode {target}, which cannot hold one")
EA_INODE_NOT_EA = _kind("bad_ea_inode", _EA + " has its value in inode {target}, which is not an EA inode "
                        "(no EA_INODE flag, and the entry hash does not match it)")
EA_INODE_NO_FLAG = _kind("ea_inode_flag", _EA + " has its value in EA inode {target}, which lacks the "
                         "EA_INODE flag")
EA_INODE_HASH = _kind("ea_inode_hash", _EA + " has entry hash 0x{hash:08x}, which does not match EA inode "
                      "{target}'s value hash 0x{value_hash:08x}")
EA_INODE_SIZE = _kind("ea_inode_size", _EA + " has value size {size}, but EA inode {target} holds {isize} "
                      "bytes")
RESERVED_NOT_CLEAR = _kind("reserved_inode", "reserved {what} inode {ino} is not in use but is not clear")
JOURNAL_NOT_REGULAR = _kind("reserved_inode", "the journal inode is not a regular file")
RESERVED_BAD_MODE = _kind("reserved_inode", "reserved inode {ino} has bad mode 0o{mode:o}")
BAD_BLOCKS_INODE = _kind("reserved_inode", "the bad blocks inode looks invalid (a mode, owner, links, "
                         "inline data or an xattr block)")
RESERVED_TOO_BIG = _kind("i_size", "reserved inode {ino} has size {size}, more than a block-mapped file "
                         "can hold")
BAD_MODE = _kind("bad_mode", "inode {ino} has invalid mode 0o{mode:o}")
BAD_SYMLINK = _kind("bad_symlink", "symlink inode {ino} is invalid (size {size})")
BAD_DEVICE = _kind("bad_device", "special inode {ino} ({type}) is invalid")
SPECIAL_FILE_SIZE = _kind("special_file_size", "special inode {ino} ({type}) has size {size}, should be 0")
DIR_SIZE_ODD = _kind("i_size", "directory inode {ino} has size {size}, not a multiple of the block size")
DIR_SIZE_BLOCKS = _kind("i_size", "directory inode {ino} has size {size}, its blocks reach {reach}")
SIZE_BELOW_BLOCKS = _kind("i_size", "inode {ino} has size {size} but block {last} mapped (blocks past "
                          "the end of the file)")
SIZE_TOO_BIG = _kind("i_size", "inode {ino} has size {size}, more than a block-mapped file can hold")
I_BLOCKS = _kind("i_blocks", "inode {ino} has i_blocks {value}, should be {expect}")
DIR_EMPTY = _kind("dir_empty", "directory inode {ino} has no blocks")
HTREE_NO_DIR_INDEX = _kind("htree", "directory inode {ino} has the htree flag but the filesystem has no "
                           "dir_index")
HTREE_BAD_ROOT = _kind("htree", "directory inode {ino} has an invalid htree root")
HTREE_HASH_VERSION = _kind("htree", "directory inode {ino} has unsupported hash version {version}")
HTREE_ROOT_FLAGS = _kind("htree", "directory inode {ino} uses incompatible htree root flags")
HTREE_TOO_DEEP = _kind("htree", "directory inode {ino} has an htree of {levels} levels, too deep")
INODE_CSUM = _kind("inode_csum", "inode {ino} checksum does not match")
EXTENT_BAD = _kind("bad_extent", "inode {ino} has an invalid extent tree: {why}")
EXTENT_UNINIT_DIR = _kind("bad_extent", "directory inode {ino} has an unwritten extent at block {lblk}")
EXTENT_CSUM = _kind("extent_csum", "extent block {block} of inode {ino} has a wrong checksum")
INLINE_NO_ATTR = _kind("inline_data", "inode {ino} has inline data but no valid system.data attribute")
INLINE_DIR_SIZE = _kind("i_size", "inline directory inode {ino} has size {size}, should be {expect}")
JOURNAL_NOT_IN_USE = _kind("journal", "has_journal is on but journal inode {ino} is not in use")
JOURNAL_BAD_SUPER = _kind("journal", "journal inode {ino} has an invalid journal superblock ({why})")
# the block map walk
BAD_BLOCKS = _kind("bad_block", "inode {ino} has illegal block(s) outside the filesystem: {blocks}")
SYMLINK_TOO_BIG = _kind("symlink_too_big", "symlink inode {ino} maps block {lblk}")
DIR_TOO_BIG = _kind("dir_too_big", "directory inode {ino} maps block {lblk}, too far")
INDIRECT_ON_METADATA = _kind("metadata_collision", "indirect block {block} of inode {ino} is filesystem "
                             "metadata")
TOO_MANY_BLOCKS = _kind("too_many_blocks", "inode {ino} claims more blocks than the filesystem has (a "
                        "loop in its block map?)")

# -- pass 1b: blocks claimed twice ----------------------------------------------------------------
DUP_BLOCKS = _kind("dup_block", "inode {ino} claims block(s) also claimed elsewhere: {blocks}")
DUP_BLOCKS_METADATA = _kind("dup_block", "inode {ino} claims block(s) also claimed elsewhere: {blocks} "
                            "({metadata} filesystem metadata)")

# -- pass 2: directories --------------------------------------------------------------------------
DIR_HOLE = _kind("dir_hole", "directory inode {ino} has a hole at {holes}")
DIRENT_NO_ROOM = _kind("bad_dir_entry", "directory inode {ino} block {lblk}: entry at {pos} has no room "
                       "for its header")
DIRENT_BAD_LENGTHS = _kind("bad_dir_entry", "directory inode {ino} block {lblk}: entry at {pos} has "
                           "rec_len {rec_len} and name_len {name_len}")
NO_DOT = _kind("bad_dot", "directory inode {ino} has no '.' entry")
FIRST_NOT_DOT = _kind("bad_dot", "first entry {name!r} of directory inode {ino} is not '.'")
DOT_NOT_TERMINATED = _kind("bad_dot", "'.' in directory inode {ino} is not NUL-terminated")
DOT_POINTS_ELSEWHERE = _kind("bad_dot", "'.' in directory inode {ino} points to inode {target}")
NO_DOTDOT = _kind("bad_dotdot", "directory inode {ino} has no '..' entry")
SECOND_NOT_DOTDOT = _kind("bad_dotdot", "second entry {name!r} of directory inode {ino} is not '..'")
DOTDOT_NOT_TERMINATED = _kind("bad_dotdot", "'..' in directory inode {ino} is not NUL-terminated")
DUP_DOT = _kind("dup_dot", "directory inode {ino} has a second '.' entry")
DUP_DOTDOT = _kind("dup_dotdot", "directory inode {ino} has a second '..' entry")
LINK_TO_DOT = _kind("link_to_dot", "entry {name!r} in directory inode {ino} is a link to '.'")
LINK_TO_ROOT = _kind("link_to_root", "entry {name!r} in directory inode {ino} is a link to the root")
NULL_NAME = _kind("null_name", "directory inode {ino} has an entry with an empty name")
BAD_NAME = _kind("bad_name", "entry {name!r} in directory inode {ino} has an illegal character in its name")
BAD_CASEFOLDED_NAME = _kind("bad_name", "entry {name!r} in casefolded directory inode {ino} is not valid "
                            "UTF-8, which the image's strict encoding forbids")
BAD_INODE_NUMBER = _kind("bad_inode_number", "entry {name!r} in directory inode {ino} has bad inode "
                         "number {target}")
UNUSED_INODE = _kind("unused_inode", "entry {name!r} in directory inode {ino} points to unused inode "
                     "{target}")
FILE_TYPE = _kind("file_type", "entry {name!r} in directory inode {ino} has file type {ft}, should be "
                  "{should} ({should_name})")
FILE_TYPE_NO_FEATURE = _kind("file_type", "entry {name!r} in directory inode {ino} has file type {ft} "
                             "without the filetype feature")
DIR_HARDLINK = _kind("dir_hardlink", "entry {name!r} in directory inode {ino} is a link to directory "
                     "inode {target}, already in directory inode {parent}")
DUP_ENTRY = _kind("dup_entry", "duplicate entry {name!r} in directory inode {ino}")
# the htree index (one problem per directory: the first found)
HTREE_ROOT_NODE = _kind("htree", "htree directory inode {ino}: bad root node")
HTREE_ENTRIES_OUTSIDE = _kind("htree", "htree directory inode {ino}: block {lblk}: index entries outside "
                              "the block")
HTREE_LIMIT = _kind("htree", "htree directory inode {ino}: block {lblk}: index limit {limit}, should be "
                    "{expect}")
HTREE_COUNT = _kind("htree", "htree directory inode {ino}: block {lblk}: index count {count} is more than "
                    "{expect}")
HTREE_PAST_END = _kind("htree", "htree directory inode {ino}: block {lblk}: index points to block "
                       "{target}, past the directory's end")
HTREE_HASH_ORDER = _kind("htree", "htree directory inode {ino}: block {lblk}: index hashes out of order")
HTREE_TWICE = _kind("htree", "htree directory inode {ino}: block {target} is referenced twice by the index")
HTREE_UNREFERENCED = _kind("htree", "htree directory inode {ino}: block {target} is not referenced by the "
                           "index")
HTREE_LEAF_DEPTH = _kind("htree", "htree directory inode {ino}: leaf block {target} is at depth {depth}, "
                         "should be {expect}")

DIR_CSUM = _kind("dir_csum", "directory inode {ino} block {lblk}: {why}")
HTREE_CSUM = _kind("htree", "htree directory inode {ino}: block {lblk}: index checksum does not match")

# -- pass 3: connectivity -------------------------------------------------------------------------
NO_ROOT = _kind("no_root", "the root inode is not an allocated directory")
UNCONNECTED_DIR = _kind("unconnected_dir", "directory inode {ino} is not connected to the tree ('..' "
                        "points to {dotdot})")
DIR_LOOP = _kind("dir_loop", "directory inode {ino} is in a loop of directories not connected to the root")
DOTDOT_MISMATCH = _kind("dotdot_mismatch", "'..' in directory inode {ino} is {dotdot}, should be {parent}")

# -- pass 4: link counts --------------------------------------------------------------------------
UNATTACHED_INODE = _kind("unattached_inode", "inode {ino} ({type}) is in use but no directory entry "
                         "names it")
DIR_NLINK = _kind("dir_nlink", "directory inode {ino} has more than {most} links without the dir_nlink "
                  "feature")
LINK_COUNT = _kind("link_count", "inode {ino} has link count {nlinks}, should be {counted}")
EA_INODE_REFCOUNT = _kind("ea_inode_refcount", "EA inode {ino} has reference count {refcount}, but "
                          "{seen} xattr entries name it")

# -- pass 5: bitmaps and counts -------------------------------------------------------------------
BLOCKS_MARKED_NOT_USED = _kind("block_bitmap_differs", "blocks marked in use but not used: {numbers}")
BLOCKS_USED_NOT_MARKED = _kind("block_bitmap_differs", "blocks used but marked free: {numbers}")
INODES_MARKED_NOT_USED = _kind("inode_bitmap_differs", "inodes marked in use but not used: {numbers}")
INODES_USED_NOT_MARKED = _kind("inode_bitmap_differs", "inodes used but marked free: {numbers}")
BLOCK_BITMAP_PADDING = _kind("bitmap_padding", "padding at the end of group {group}'s block bitmap is not "
                             "set")
INODE_BITMAP_PADDING = _kind("bitmap_padding", "padding at the end of group {group}'s inode bitmap is not "
                             "set")
BLOCK_BITMAP_CSUM = _kind("bitmap_csum", "group {group}'s block bitmap checksum does not match")
INODE_BITMAP_CSUM = _kind("bitmap_csum", "group {group}'s inode bitmap checksum does not match")
GROUP_FREE_BLOCKS = _kind("free_blocks_count", "group {group} free blocks count is {value}, counted "
                          "{counted}")
GROUP_FREE_INODES = _kind("free_inodes_count", "group {group} free inodes count is {value}, counted "
                          "{counted}")
GROUP_DIRS = _kind("dirs_count", "group {group} directories count is {value}, counted {counted}")
SB_FREE_BLOCKS = _kind("sb_free_blocks_count", "superblock free blocks count is {value}, counted {counted}",
                       Severity.MINOR)
SB_FREE_INODES = _kind("sb_free_inodes_count", "superblock free inodes count is {value}, counted {counted}",
                       Severity.MINOR)

#: Every code the check emits (the strings of ``xipfs check --json``).
CODES = frozenset(k.code for k in PROBLEMS)
#: Codes that ``e2fsck -n`` reports but does not count as errors (it exits 0): the superblock's
#: own free counts, which the kernel only keeps up to date lazily.
MINOR_CODES = frozenset(k.code for k in PROBLEMS if k.severity is Severity.MINOR)
