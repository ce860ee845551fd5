"""What the passes of the check share (e2fsck's ``e2fsck_t``): the device and its geometry, the
maps each pass fills for the next, the problems found; and the decoded shapes they read.

One :class:`Context` per run. Pass 0 fills the group descriptors and the metadata map, pass 1 the
per-inode maps (in use, type, links), the claimed blocks and the directories, pass 2 the
references, parents and names; passes 3 to 5 only read. Every field is declared in ``__slots__``
and set in ``__init__``, so what a pass may rely on is written in one place.
"""

from __future__ import annotations

import os
import struct
from array import array
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

from .. import layout as L
from . import problems as P

if TYPE_CHECKING:
    from ...device import Device
    from ..super import Superblock

# -- format constants the checks use (ext4 flags and features ext2 must not have) ----------------
#: File type code (directory entry ``file_type``) for each ``mode >> 12``; 0 for invalid types.
FT_OF_TYPE = bytes([0, L.FT_FIFO, L.FT_CHR, 0, L.FT_DIR, 0, L.FT_BLK, 0, L.FT_REG, 0, L.FT_SYMLINK,
                    0, L.FT_SOCK, 0, 0, 0])
FT_NAMES = {0: "unknown", 1: "regular file", 2: "directory", 3: "character device",
            4: "block device", 5: "fifo", 6: "socket", 7: "symlink"}
# (the flag and feature bits are layout's; these names are what the passes import)
FL_IMMUTABLE, FL_APPEND, FL_INDEX, FL_IMAGIC = L.FL_IMMUTABLE, L.FL_APPEND, L.FL_INDEX, L.FL_IMAGIC
FL_HUGE_FILE, FL_EXTENTS, FL_INLINE_DATA = L.FL_HUGE_FILE, L.FL_EXTENTS, L.FL_INLINE_DATA
COMPAT_IMAGIC, INCOMPAT_LARGEDIR, INCOMPAT_64BIT = L.COMPAT_IMAGIC, L.INCOMPAT_LARGEDIR, L.INCOMPAT_64BIT
RO_COMPAT_HUGE_FILE, RO_COMPAT_GDT_CSUM = L.RO_COMPAT_HUGE_FILE, L.RO_COMPAT_GDT_CSUM
RO_COMPAT_DIR_NLINK, RO_COMPAT_METADATA_CSUM = L.RO_COMPAT_DIR_NLINK, L.RO_COMPAT_METADATA_CSUM
BG_INODE_UNINIT, BG_BLOCK_UNINIT = L.BG_INODE_UNINIT, L.BG_BLOCK_UNINIT
LINK_MAX = 65000
QUOTA_INOS = (3, 4)
#: Blocks listed in one problem's message, at most.
LIST_MAX = 16

_U32 = struct.Struct("<I").unpack_from


# -- the inode as the checks decode it -------------------------------------------------------------
#: The fields of the 128-byte inode the checks read, in on-disk order.
_INODE_NAMES = ("i_mode", "i_size", "i_atime", "i_ctime", "i_mtime", "i_dtime", "i_links_count",
                "i_blocks", "i_flags", "i_block", "i_file_acl", "i_size_high", "i_faddr",
                "i_blocks_hi", "i_file_acl_high")
#: Then, in large inodes, these (the times' high bits and the creation time).
_EXTRA_NAMES = ("i_extra_isize", "i_checksum_hi", "i_ctime_extra", "i_mtime_extra", "i_atime_extra",
                "i_crtime", "i_crtime_extra")
#: The 128-byte inode, what the checks read; it decodes to a tuple indexed by the ``I_*`` below.
INODE = L.INODE.select(*_INODE_NAMES, expand={"i_block": f"{L.N_BLOCKS}I"}, end=L.INODE.size)
#: The same, then the fields of a large inode (``INODE_LARGE`` values from index ``I_EXTRA_ISIZE``).
INODE_LARGE = L.INODE_LARGE.select(*_INODE_NAMES, *_EXTRA_NAMES, expand={"i_block": f"{L.N_BLOCKS}I"})

# positions in the tuples INODE and INODE_LARGE decode to (one per field; i_block is 15)
(I_MODE, I_SIZE, I_ATIME, I_CTIME, I_MTIME, I_DTIME, I_LINKS_COUNT, I_BLOCKS, I_FLAGS) = range(9)
I_BLOCK = slice(9, 9 + L.N_BLOCKS)                  # the 15 block pointers
I_DIRECT = slice(9, 9 + L.N_DIRECT)                 # the 12 direct ones
I_BLOCK0 = 9
I_IND, I_DIND, I_TIND = 9 + L.IND_BLOCK, 9 + L.DIND_BLOCK, 9 + L.TIND_BLOCK
(I_FILE_ACL, I_SIZE_HIGH, I_FADDR, I_BLOCKS_HI, I_FILE_ACL_HIGH, I_EXTRA_ISIZE, I_CHECKSUM_HI,
 I_CTIME_EXTRA, I_MTIME_EXTRA, I_ATIME_EXTRA, I_CRTIME, I_CRTIME_EXTRA,
 #: the word at 128 + i_extra_isize (the in-inode xattr magic), in the structs of inode_struct()
 I_XATTR_MAGIC) = range(24, 37)
assert len(INODE.unpack(bytes(INODE.size))) == I_EXTRA_ISIZE
assert len(INODE_LARGE.unpack(bytes(INODE_LARGE.size))) == I_XATTR_MAGIC


class GroupDesc(NamedTuple):
    """A group descriptor, the fields the checks read (names as in ``layout.GROUP_DESC``)."""

    bg_block_bitmap: int
    bg_inode_bitmap: int
    bg_inode_table: int
    bg_free_blocks_count: int
    bg_free_inodes_count: int
    bg_used_dirs_count: int
    bg_flags: int
    bg_itable_unused: int


GROUP_DESC = L.GROUP_DESC.select(*GroupDesc._fields, end=L.GROUP_DESC.size)


class DirInfo(NamedTuple):
    """A directory found in pass 1, for pass 2."""

    ino: int
    #: ``(logical, physical)`` of each block mapped
    blocks: list[tuple[int, int]]
    #: logical blocks up to the last one mapped (holes between are reported in pass 2)
    nblocks: int
    htree: bool
    #: its entries are in the inode (inline_data), not in blocks
    inline: bool = False


class XattrRef:
    """An xattr block's reference count as stored, the references pass 1 saw, and the clusters
    of the values it keeps in EA inodes (charged to every inode that shares the block)."""

    __slots__ = ("refcount", "seen", "quota")

    def __init__(self, refcount: int) -> None:
        self.refcount = refcount
        self.seen = 1
        self.quota = 0


class EaInode:
    """An inode in use with EXT4_EA_INODE_FL, as pass 4 needs it: its stored reference count
    (``i_ctime << 32 | l_i_version``) and whether it is a legacy Lustre EA inode (``i_ctime ==
    i_atime``, no reference count kept)."""

    __slots__ = ("refcount", "lustre")

    def __init__(self, refcount: int, lustre: bool) -> None:
        self.refcount = refcount
        self.lustre = lustre


class Context:
    """One run of the check over one device: geometry, shared maps, the problems found."""

    __slots__ = (
        # the device and its geometry (set here)
        "dev", "sb", "f", "bs", "log_bs", "bpg", "ipg", "isize", "ngroups", "nblocks", "ninodes",
        "fdb", "first_ino", "desc_blocks", "itable_blocks", "apb", "unpack_map", "filetype",
        "piece_bytes", "problems", "run_chunks", "_buffer", "_fd",
        # ext4: formats in use, checksums, clusters, inodes with their own rules
        "extents", "inline", "csum", "gdt_csum", "csum_seed", "ratio", "special", "ea_inode",
        # pass 0
        "gd", "bb_ok", "ib_ok", "it_ok", "meta", "used",
        # pass 1
        "iused", "itype", "bad", "links", "inode_structs", "runs", "dirs", "claims", "ea_refs",
        "claim_budget", "low_dtime_check", "ea_inodes", "ea_inode_refs",
        # pass 2
        "refs", "more_refs", "parent", "dotdot", "names", "expected",
    )

    def __init__(self, device: Device, sb: Superblock, piece_bytes: int) -> None:
        self.dev = device
        self.sb = sb
        f = sb.fields
        self.f: dict[str, Any] = f
        self.bs: int = sb.block_size
        self.log_bs: int = f["s_log_block_size"]
        self.bpg: int = f["s_blocks_per_group"]
        self.ipg: int = f["s_inodes_per_group"]
        self.isize: int = sb.inode_size
        self.ngroups: int = sb.groups
        self.nblocks: int = f["s_blocks_count"]
        self.ninodes: int = f["s_inodes_count"]
        self.fdb: int = f["s_first_data_block"]
        self.first_ino: int = sb.first_ino
        self.desc_blocks: int = sb.desc_blocks
        self.itable_blocks: int = sb.itable_blocks
        #: block pointers per indirect block, and the struct that decodes them
        self.apb: int = self.bs // 4
        self.unpack_map = struct.Struct(f"<{self.apb}I").unpack_from
        self.filetype: bool = sb.has_incompat(L.INCOMPAT_FILETYPE)
        #: ext4: extent trees and inline data allowed; metadata_csum, uninit_bg; blocks per cluster
        self.extents: bool = sb.has_incompat(L.INCOMPAT_EXTENTS)
        self.inline: bool = sb.has_incompat(L.INCOMPAT_INLINE_DATA)
        self.csum: bool = bool(getattr(sb, "metadata_csum", False))
        self.gdt_csum: bool = self.csum or bool(getattr(sb, "gdt_csum", False))
        self.csum_seed: int = getattr(sb, "csum_seed", 0) if self.csum else 0
        self.ratio: int = getattr(sb, "cluster_ratio", 1) or 1
        #: ext4 ea_inode: xattr values may live in inodes of their own
        self.ea_inode: bool = sb.has_incompat(L.INCOMPAT_EA_INODE)
        #: inodes past s_first_ino that no directory names (orphan file, quota files)
        self.special: set[int] = {f.get(k, 0) for k in ("s_orphan_file_inum", "s_usr_quota_inum",
                                                       "s_grp_quota_inum", "s_prj_quota_inum")} - {0}
        #: bytes of inode table read and scanned at a time (pass 1)
        self.piece_bytes = piece_bytes
        self.problems: list[P.Problem] = []
        #: tables of consecutive block numbers (see walk.run_table)
        self.run_chunks: dict[int, bytes] = {}
        buffer = getattr(device, "buffer", None)
        self._buffer = buffer if isinstance(buffer, memoryview) else None
        try:
            self._fd = device.fileno()
        except (OSError, ValueError):
            self._fd = -1
        # pass 0
        self.gd: list[GroupDesc] = []
        #: per group: whether its block bitmap, inode bitmap, inode table can be used
        self.bb_ok: list[bool] = []
        self.ib_ok: list[bool] = []
        self.it_ok: list[bool] = []
        #: per block: 1 for filesystem metadata (superblocks, descriptors, bitmaps, tables)
        self.meta = b""
        #: per block: 1 when in use (metadata, then, after pass 1b, every block claimed)
        self.used = bytearray()
        # pass 1
        n = self.ninodes + 1
        #: per inode: 1 when in use (as e2fsck's inode_used_map)
        self.iused = bytearray(n)
        #: per inode in use: its file type code (FT_*), 0 for an invalid mode
        self.itype = bytearray(n)
        #: inodes with bad fields (e2fsck's inode_bad_map): their entries should have type 0
        self.bad: set[int] = set()
        #: per inode: i_links_count
        self.links = array("H", bytes(2 * n))
        #: i_extra_isize -> the struct decoding a large inode with it (see pass1.inode_struct)
        self.inode_structs: dict[int, struct.Struct] = {}
        #: contiguous ranges of claimed blocks: (first, count)
        self.runs: list[tuple[int, int]] = []
        self.dirs: list[DirInfo] = []
        #: the blocks claimed by inodes one by one (runs of blocks are in ``runs``)
        self.claims = array("I")
        self.ea_refs: dict[int, XattrRef] = {}
        self.claim_budget = 4 * self.nblocks + 64
        self.low_dtime_check = False
        #: inodes in use with EXT4_EA_INODE_FL (see EaInode)
        self.ea_inodes: dict[int, EaInode] = {}
        #: per inode an xattr entry names as its value's (e_value_inum): the references counted,
        #: one per entry in an inode body and one per entry of each distinct xattr block
        self.ea_inode_refs: dict[int, int] = {}
        # pass 2
        #: per inode: directory entries naming it (past 65535 the count goes on in ``more_refs``)
        self.refs = array("H")
        self.more_refs: dict[int, int] = {}
        #: per directory: the directory whose entry names it, and what its '..' says
        self.parent = array("I")
        self.dotdot = array("I")
        #: per directory: the name its parent gives it
        self.names: dict[int, bytes] = {}
        #: per inode: what an entry naming it should say (see pass2)
        self.expected = bytearray()

    # -- reading --------------------------------------------------------------------------------
    def view(self, offset: int, length: int) -> memoryview:
        """``length`` bytes of the device at ``offset``, without a copy where it is mapped."""
        if self._buffer is not None and offset >= 0 and offset + length <= len(self._buffer):
            return self._buffer[offset:offset + length]
        return self.dev.view(offset, length)

    def read_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Copy ``len(buf)`` bytes from ``offset`` into ``buf``: ``preadv`` when there is a
        descriptor (a large inode table then costs one copy into a buffer used again and again,
        not a page fault per page of a fresh mapping), else from the device."""
        if self._fd >= 0 and _preadv is not None:
            try:
                if _preadv(self._fd, [buf], offset + self.dev.base_offset) == len(buf):
                    return
            except OSError:                      # a DAX device, say: it is only mapped
                pass
        buf[:] = self.view(offset, len(buf))

    def block(self, blk: int) -> bytes | memoryview:
        """Block ``blk`` (the caller has checked that it is inside the filesystem): ``pread``
        when there is a descriptor (the check touches each block once or twice; a page fault
        of the fresh mapping, and its unmapping, cost more than the system call), else a view."""
        if self._fd >= 0:
            try:
                buf = _pread(self._fd, self.bs, blk * self.bs + self.dev.base_offset)
                if len(buf) == self.bs:
                    return buf
            except OSError:
                pass
        return self.view(blk * self.bs, self.bs)

    def inode_view(self, ino: int) -> memoryview | None:
        """The raw inode ``ino``, or None when its group's inode table is unusable."""
        g, i = divmod(ino - 1, self.ipg)
        if not self.it_ok[g]:
            return None
        return self.view(self.gd[g].bg_inode_table * self.bs + i * self.isize, self.isize)

    # -- geometry ---------------------------------------------------------------------------------
    def max_file_size(self) -> int:
        """The largest size e2fsck accepts for a block-mapped file at this block size."""
        a = self.apb
        return (12 + a + a * a + a * a * a) * self.bs

    # -- problems ---------------------------------------------------------------------------------
    def report(self, kind: P.ProblemKind, ino: int | None = None, block: int | None = None,
               **fields: Any) -> None:
        """Note a problem of ``kind`` (its message from ``fields``)."""
        self.problems.append(kind(ino, block, **fields))

    def mark_bad(self, kind: P.ProblemKind, ino: int, **fields: Any) -> None:
        """Note a problem with inode ``ino``'s fields: entries naming it should say type 0."""
        self.bad.add(ino)
        self.report(kind, ino, **fields)


_preadv = getattr(os, "preadv", None)
_pread = os.pread

# -- helpers over bitmaps and byte tables ---------------------------------------------------------
#: byte -> 1 if nonzero (for ``bytes.translate``).
NONZERO = bytes([0] + [1] * 255)
#: byte of a bitmap -> its 8 bits as 8 bytes of 0/1 (least significant bit first).
_EXPAND2 = [bytes((i & 1, i >> 1)) for i in range(4)]
_EXPAND4 = [_EXPAND2[i & 3] + _EXPAND2[i >> 2] for i in range(16)]
_EXPAND = [_EXPAND4[i & 15] + _EXPAND4[i >> 4] for i in range(256)]
del _EXPAND2, _EXPAND4


def nonzero_mask(table: bytes | bytearray, offsets: Iterable[int], stride: int, n: int) -> int:
    """An int whose byte ``i`` is 1 when any byte at ``offsets`` of record ``i`` is nonzero."""
    mask = 0
    for off in offsets:
        mask |= int.from_bytes(table[off::stride][:n].translate(NONZERO), "little")
    return mask


def tail_unset(bitmap: bytes | memoryview, nbits: int) -> bool:
    """Whether the bytes of a bitmap block past its ``nbits`` bits are not all ones (mke2fs sets
    them, and e2fsck checks them: ``bitmap_tail_verify``)."""
    return bool(bytes(bitmap[(nbits + 7) >> 3:]).strip(b"\xff"))


def expand_bits(bitmap: bytes | memoryview, nbits: int) -> bytes:
    """A bitmap as one byte (0 or 1) per bit, ``nbits`` of them."""
    nbytes = (nbits + 7) >> 3
    return b"".join(map(_EXPAND.__getitem__, bytes(bitmap[:nbytes])))[:nbits]


def ranges(numbers: Iterable[int]) -> str:
    """``1-3, 7`` for sorted numbers (as e2fsck lists bitmap differences), shortened."""
    out: list[str] = []
    start = prev = None
    for n in numbers:
        if prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            out.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    if start is not None:
        out.append(str(start) if start == prev else f"{start}-{prev}")
    if len(out) > LIST_MAX:
        out = out[:LIST_MAX] + [f"... ({len(out) - LIST_MAX} more)"]
    return ", ".join(out)


def u32(buf: Any, offset: int) -> int:
    """The little-endian 32-bit word at ``offset`` of ``buf``."""
    return _U32(buf, offset)[0]
