"""A read-only consistency check of an ext2 image: what ``e2fsck -fn`` checks in its passes.

Pass 0 checks the superblock, the group descriptors and the resize inode; pass 1 every inode in
use (type, flags, block map, block ownership, ``i_blocks``, ``i_size``, symlinks, special files,
extended attributes); pass 2 every directory block (entry lengths, names, inode numbers, file
types, ``.`` and ``..``, htree index structure); pass 3 connectivity (every directory reachable
from the root, ``..`` naming the parent); pass 4 link counts against references; pass 5 the
bitmaps and the free and directory counts against what is in use. The rules, and which of them
count as errors, follow e2fsck (e2fsprogs 1.47) on an ext2 filesystem, so that an image e2fsck
finds clean gives no problem here (a device inode with block pointers, say, is only a problem with
the immutable or append-only flag, as in e2fsck). Not checked: htree hash ranges (the name hashes
themselves), journals and the ext4 formats (extents, inline data, checksums), which ext2 does not
have. Codes in :data:`MINOR_CODES` are reported by e2fsck without counting as errors.

The image is never written. Problems come back as data (:class:`Problem`); only a superblock too
broken to describe a filesystem raises :class:`~xipfs.CorruptImageError`. Work is bounded on any
image: indirect blocks are followed at most to their fixed depth, and the blocks one inode may
claim are capped, so loops in directory trees or block maps end as problems, never as hangs.

Speed (the target is within 3x of e2fsck, which is C): inode tables are read a megabyte at a
time into one buffer and scanned with whole-buffer byte operations (strided slices, ``translate``,
big-integer masks) to find the inodes in use, their types and link counts; only inodes in use are
decoded, one ``struct`` call each. Block ownership lives in one ``bytearray`` (a byte per block),
filled from one array of the blocks claimed one by one and from runs: an indirect block that maps
a contiguous run of blocks (most do) is recognised by one comparison with a table of consecutive
numbers. A directory block is parsed entry by entry, then checked as a whole when it can be
(every inode in use, every file type right). Bitmaps are compared as expanded byte strings, and
link counts against references as two arrays.
"""

from __future__ import annotations

import functools
import os
import struct
import sys
from array import array
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import chain, compress
from typing import TYPE_CHECKING, Any

from ..device import Device
from ..progress import ProgressArg, progress_bar
from . import layout as L
from .super import Superblock, parse_superblock

if TYPE_CHECKING:
    from .volume import Volume

__all__ = ["MINOR_CODES", "Problem", "check_device", "check_volume"]


@dataclass(frozen=True)
class Problem:
    """One inconsistency: a stable ``code``, a sentence for humans, and where it is."""

    code: str
    message: str
    ino: int | None = None
    block: int | None = None
    path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The problem as a plain dict (for JSON)."""
        return {"code": self.code, "message": self.message, "ino": self.ino, "block": self.block,
                "path": self.path}


#: Codes that ``e2fsck -n`` reports but does not count as errors (it exits 0): the superblock's
#: own free counts, which the kernel only keeps up to date lazily.
MINOR_CODES = frozenset({"sb_free_blocks_count", "sb_free_inodes_count"})


def check_volume(vol: Volume, progress: ProgressArg = None) -> list[Problem]:
    """Check the filesystem ``vol`` (a :class:`~xipfs.ext2.volume.Volume`); the problems found.

    A volume opened for writing is synced first, so the check sees what the writer would leave.
    """
    if not vol.readonly:
        vol.sync()
    return _Checker(vol.device, vol.sb, progress).run()


def check_device(device: Device, progress: ProgressArg = None) -> list[Problem]:
    """Check the ext2 image on ``device``, including images whose group descriptors are too
    damaged for :class:`~xipfs.ext2.volume.Volume` to open them.

    Raises :class:`~xipfs.CorruptImageError` when the superblock itself is unusable.
    """
    raw = bytes(device.view(L.SUPERBLOCK_OFFSET, L.SUPERBLOCK_SIZE)) \
        if device.size >= L.SUPERBLOCK_OFFSET + L.SUPERBLOCK_SIZE else b""
    sb = parse_superblock(raw, device.size)
    return _Checker(device, sb, progress).run()


# -- format constants -------------------------------------------------------------------------
S_IFMT = 0o170000
S_IFREG, S_IFDIR = 0o100000, 0o040000
#: File type code (directory entry ``file_type``) for each ``mode >> 12``; 0 for invalid types.
FT_OF_TYPE = bytes([0, L.FT_FIFO, L.FT_CHR, 0, L.FT_DIR, 0, L.FT_BLK, 0, L.FT_REG, 0, L.FT_SYMLINK,
                    0, L.FT_SOCK, 0, 0, 0])
FT_NAMES = {0: "unknown", 1: "regular file", 2: "directory", 3: "character device",
            4: "block device", 5: "fifo", 6: "socket", 7: "symlink"}

FL_IMMUTABLE, FL_APPEND = 0x10, 0x20
FL_INDEX = 0x1000
FL_IMAGIC = 0x2000
FL_HUGE_FILE = 0x40000
FL_EXTENTS = 0x80000
FL_INLINE_DATA = 0x10000000
COMPAT_IMAGIC = 0x2
INCOMPAT_LARGEDIR = 0x4000
RO_COMPAT_HUGE_FILE = 0x8
RO_COMPAT_GDT_CSUM = 0x10
RO_COMPAT_DIR_NLINK = 0x20
RO_COMPAT_METADATA_CSUM = 0x400
INCOMPAT_64BIT = 0x80
BG_INODE_UNINIT, BG_BLOCK_UNINIT = 0x1, 0x2
LINK_MAX = 65000
QUOTA_INOS = (3, 4)

#: mode, size, atime, ctime, mtime, dtime, links, blocks, flags, i_block[15], file_acl,
#: size_high, faddr, blocks_hi, file_acl_high: the 128-byte inode, what the checks read.
_INODE = struct.Struct("<H2xIIIII2xHII4x15I4xIIIHH8x")
#: The same, then i_extra_isize, i_checksum_hi, ctime_extra, mtime_extra, atime_extra, crtime,
#: crtime_extra (indexes 29..35): large inodes.
_INODE_LARGE = struct.Struct(_INODE.format + "HHIIIII")
_U32 = struct.Struct("<I").unpack_from
_DIRENT = struct.Struct("<IHBB").unpack_from
_GD = struct.Struct("<IIIHHHH8xH2x")
_XENTRY = struct.Struct("<BBHIII").unpack_from
XATTR_MAGIC = L.XATTR_MAGIC
_XHEADER = struct.Struct("<III").unpack_from
_DX_ROOT_INFO = struct.Struct("<IBBBB").unpack_from
_DX_COUNTLIMIT = struct.Struct("<HH").unpack_from

#: high byte of i_mode -> file type code.
_FT_OF_MODE_HI = bytes(FT_OF_TYPE[b >> 4] for b in range(256))
#: Markers in the table of what entries should say (pass 2): not a file type code.
UNUSED_INODE, BAD_NUMBER = 0xFF, 0xFE
#: per-inode "in use" byte -> UNUSED_INODE when 0.
_UNUSED_MARK = bytes([UNUSED_INODE]) + bytes(255)
#: byte -> 1 if nonzero (for ``bytes.translate``).
_NONZERO = bytes([0] + [1] * 255)
_preadv = getattr(os, "preadv", None)
#: byte of a bitmap -> its 8 bits as 8 bytes of 0/1 (least significant bit first).
_EXPAND = [bytes((i >> k) & 1 for k in range(8)) for i in range(256)]
#: What a block map walk does with the blocks it finds (see _Walk).
CLAIM, COUNT, COLLECT = 0, 1, 2
#: Bytes of inode table read and scanned at a time.
PIECE_BYTES = 1 << 20
#: Blocks per piece of the table of contiguous runs (see _Checker.run_bytes).
RUN_CHUNK = 1 << 16
#: Blocks listed in one problem's message, at most.
LIST_MAX = 16


def _nonzero_mask(table: bytes | bytearray, offsets: Iterable[int], stride: int, n: int) -> int:
    """An int whose byte ``i`` is 1 when any byte at ``offsets`` of record ``i`` is nonzero."""
    mask = 0
    for off in offsets:
        mask |= int.from_bytes(table[off::stride][:n].translate(_NONZERO), "little")
    return mask


@functools.lru_cache(maxsize=4)
def _run_base(n: int) -> tuple[int, int]:
    """The words ``0, 1, ..., n-1`` and ``1, 1, ..., 1`` as little-endian integers: adding a
    multiple of the second to the first gives the words of any run of n consecutive numbers."""
    words = array("I", range(n))
    if sys.byteorder != "little":
        words.byteswap()
    return int.from_bytes(words.tobytes(), "little"), int.from_bytes(b"\1\0\0\0" * n, "little")


def _tail_unset(bitmap: bytes | memoryview, nbits: int) -> bool:
    """Whether the bytes of a bitmap block past its ``nbits`` bits are not all ones (mke2fs sets
    them, and e2fsck checks them: ``bitmap_tail_verify``)."""
    return bool(bytes(bitmap[(nbits + 7) >> 3:]).strip(b"\xff"))


def _expand_bits(bitmap: bytes | memoryview, nbits: int) -> bytes:
    """A bitmap as one byte (0 or 1) per bit, ``nbits`` of them."""
    nbytes = (nbits + 7) >> 3
    return b"".join(map(_EXPAND.__getitem__, bytes(bitmap[:nbytes])))[:nbits]


def _ranges(numbers: Iterable[int]) -> str:
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


def xattr_hash(name: bytes, value: bytes | memoryview, signed: bool) -> int:
    """The hash e2fsprogs stores in an xattr entry (name bytes as ``char``, then value words)."""
    h = 0
    for c in name:
        if signed and c > 127:
            c -= 256
        h = ((h << 5) ^ (h >> 27) ^ c) & 0xFFFFFFFF
    n = (len(value) + 3) >> 2
    if n:
        padded = bytes(value) + bytes(4 * n - len(value))
        for w in struct.unpack(f"<{n}I", padded):
            h = ((h << 16) ^ (h >> 16) ^ w) & 0xFFFFFFFF
    return h


class _Region:
    """Byte ranges allocated within ``[0, size)``: ``allocate`` says whether a range collides
    with one already taken or leaves the region (e2fsck's region.c)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken: list[tuple[int, int]] = []

    def allocate(self, start: int, n: int) -> bool:
        end = start + n
        if start < 0 or end > self.size:
            return True
        for a, b in self.taken:
            if start < b and a < end:
                return True
        self.taken.append((start, end))
        return False


class _Checker:
    """One run of the check over one device (see the module docstring)."""

    def __init__(self, device: Device, sb: Superblock, progress: ProgressArg) -> None:
        self.dev = device
        self.sb = sb
        self.progress = progress
        f = sb.fields
        self.f = f
        self.bs = sb.block_size
        self.log_bs = f["s_log_block_size"]
        self.bpg = f["s_blocks_per_group"]
        self.ipg = f["s_inodes_per_group"]
        self.isize = sb.inode_size
        self.ngroups = sb.groups
        self.nblocks = f["s_blocks_count"]
        self.ninodes = f["s_inodes_count"]
        self.fdb = f["s_first_data_block"]
        self.first_ino = sb.first_ino
        self.desc_blocks = sb.desc_blocks
        self.itable_blocks = sb.itable_blocks
        self.apb = self.bs // 4
        self._apb_struct = struct.Struct(f"<{self.apb}I").unpack_from
        self.filetype = sb.has_incompat(L.INCOMPAT_FILETYPE)
        self.problems: list[Problem] = []
        self._run_chunks: dict[int, bytes] = {}
        buffer = getattr(device, "buffer", None)
        self._buffer = buffer if isinstance(buffer, memoryview) else None
        try:
            self._fd = device.fileno()
        except (OSError, ValueError):
            self._fd = -1

    # -- reading ------------------------------------------------------------------------------
    def view(self, offset: int, length: int) -> memoryview:
        if self._buffer is not None and offset >= 0 and offset + length <= len(self._buffer):
            return self._buffer[offset:offset + length]
        return self.dev.view(offset, length)

    def read_into(self, buf: bytearray, offset: int) -> None:
        """Copy ``len(buf)`` bytes from ``offset`` into ``buf``: ``preadv`` when there is a
        descriptor (a large inode table then costs one copy into a buffer used again and again,
        not a page fault per page of a fresh mapping), else from the device."""
        if self._fd >= 0 and _preadv is not None:
            try:
                if _preadv(self._fd, [buf], offset) == len(buf):
                    return
            except OSError:                      # a DAX device, say: it is only mapped
                pass
        buf[:] = self.view(offset, len(buf))

    def block(self, blk: int) -> memoryview:
        """Block ``blk`` (the caller has checked that it is inside the filesystem)."""
        return self.view(blk * self.bs, self.bs)

    def report(self, code: str, message: str, ino: int | None = None, block: int | None = None) -> None:
        self.problems.append(Problem(code, message, ino, block))

    # -- the passes ---------------------------------------------------------------------------
    def run(self) -> list[Problem]:
        bar = progress_bar(self.progress, self.ngroups * self.ipg, "check", unit="inode")
        try:
            self.pass0()
            self.pass1(bar)
            self.pass1b()
            self.pass2(bar)
            self.pass3()
            self.pass4()
            self.pass5()
        finally:
            bar.close()
        self.add_paths()
        return self.problems

    # == pass 0: superblock, group descriptors, resize inode ==================================
    def pass0(self) -> None:
        f, sb = self.f, self.sb
        bs = self.bs
        if f["s_r_blocks_count"] > self.nblocks // 2:
            self.report("bad_superblock", f"reserved block count {f['s_r_blocks_count']} is more than "
                        f"half the {self.nblocks} blocks")
        reserved = f["s_reserved_gdt_blocks"]
        if reserved > bs // 4:
            self.report("bad_superblock", f"{reserved} reserved GDT blocks, at most {bs // 4}")
        if not sb.has_compat(L.COMPAT_RESIZE_INODE) and reserved:
            self.report("reserved_gdt_blocks", f"resize_inode is off but {reserved} GDT blocks are reserved")
        if self.isize > 128:
            top = self.isize - 128
            for name in ("s_min_extra_isize", "s_want_extra_isize"):
                v = f[name]
                if v and (v < 4 or v > top or v & 3):
                    self.report("bad_superblock", f"{name[2:]} {v} is invalid")
        if not sb.has_compat(L.COMPAT_HAS_JOURNAL) and not f["s_journal_inum"] and any(f["s_journal_uuid"]):
            self.report("journal", "has_journal is off, but the superblock names an external journal "
                        f"(UUID {bytes(f['s_journal_uuid']).hex()}), which e2fsck cannot find")
        self.read_group_descriptors()
        self.mark_metadata()
        self.check_resize_inode()

    def read_group_descriptors(self) -> None:
        """Decode the descriptors; note (and leave aside) the structures outside their group."""
        n = self.ngroups
        raw = bytes(self.view((self.fdb + 1) * self.bs, n * L.GROUP_DESC.size))
        self.gd = [_GD.unpack_from(raw, g * 32) for g in range(n)]
        self.bb_ok = [True] * n
        self.ib_ok = [True] * n
        self.it_ok = [True] * n
        csum = self.sb.has_ro_compat(RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM)
        itb = self.itable_blocks
        for g, (bb, ib, it, _fb, _fi, _dirs, flags, unused) in enumerate(self.gd):
            first, last = self.group_first(g), self.group_last(g)
            where = f"group {g} (blocks {first}-{last})"
            if not first <= bb <= last:
                self.report("bad_group_descriptor", f"block bitmap at {bb} is outside {where}", block=bb)
                self.bb_ok[g] = False
            if not first <= ib <= last:
                self.report("bad_group_descriptor", f"inode bitmap at {ib} is outside {where}", block=ib)
                self.ib_ok[g] = False
            if not (first <= it and it + itb - 1 <= last):
                self.report("bad_group_descriptor", f"inode table at {it} is outside {where}", block=it)
                self.it_ok[g] = False
            if not csum and (flags & (BG_INODE_UNINIT | BG_BLOCK_UNINIT) or unused):
                self.report("group_desc_uninit", f"group {g} is marked uninitialized without the "
                            "uninit_bg feature")

    def group_first(self, g: int) -> int:
        return self.fdb + g * self.bpg

    def group_last(self, g: int) -> int:
        return min(self.fdb + (g + 1) * self.bpg, self.nblocks) - 1

    def super_and_gdt(self, g: int) -> tuple[int, int]:
        """``[start, end)`` of group ``g``'s superblock copy, descriptors and reserved GDT blocks
        (empty when the group holds no backup)."""
        if not self.sb.group_has_super(g):
            return 0, 0
        start = self.group_first(g)
        end = start + 1 + self.desc_blocks + self.f["s_reserved_gdt_blocks"]
        return start, min(end, self.nblocks)

    def mark_metadata(self) -> None:
        """Mark every metadata block as used (e2fsck's mark_table_blocks); overlaps are problems."""
        used = bytearray(self.nblocks)
        for g in range(self.ngroups):
            a, b = self.super_and_gdt(g)
            used[a:b] = bytes([1]) * (b - a)
        itb = self.itable_blocks
        for g, (bb, ib, it, *_rest) in enumerate(self.gd):
            if self.it_ok[g]:
                if used.find(1, it, it + itb) >= 0:
                    self.report("metadata_conflict", f"group {g}'s inode table at {it} overlaps other "
                                "filesystem metadata", block=it)
                    self.it_ok[g] = False
                used[it:it + itb] = bytes([1]) * itb
            for ok, blk, what in ((self.bb_ok, bb, "block bitmap"), (self.ib_ok, ib, "inode bitmap")):
                if ok[g]:
                    if used[blk]:
                        self.report("metadata_conflict", f"group {g}'s {what} at {blk} overlaps other "
                                    "filesystem metadata", block=blk)
                        ok[g] = False
                    used[blk] = 1
        self.meta = bytes(used)
        self.used = used

    def check_resize_inode(self) -> None:
        """The resize inode maps exactly the reserved GDT blocks and their backups."""
        sb = self.sb
        t = self.inode_view(L.RESIZE_INO)
        if t is None:
            return
        v = _INODE.unpack_from(t, 0)
        iblock = v[9:24]
        if not sb.has_compat(L.COMPAT_RESIZE_INODE):
            if any(iblock):
                self.report("resize_inode", "resize_inode is off but the resize inode has blocks",
                            ino=L.RESIZE_INO)
            return
        dind = iblock[L.DIND_BLOCK]
        bad = (any(iblock[:L.DIND_BLOCK]) or iblock[L.TIND_BLOCK] or not dind or not v[6]
               or not v[0] & S_IFREG or not self.fdb <= dind < self.nblocks)
        if not bad:
            entries = self._apb_struct(self.block(dind))
            gdt_off = self.desc_blocks
            pblk = self.fdb + 1 + self.desc_blocks
            for _ in range(self.f["s_reserved_gdt_blocks"] // 4):
                gdt_off %= self.apb
                if entries[gdt_off] != pblk or pblk >= self.nblocks:
                    bad = True
                    break
                ind = self._apb_struct(self.block(pblk))
                k = 0
                for g in range(1, self.ngroups):
                    if not sb.group_has_super(g):
                        continue
                    if k >= self.apb or ind[k] != pblk + g * self.bpg:
                        bad = True
                        break
                    k += 1
                if bad:
                    break
                gdt_off += 1
                pblk += 1
        if bad:
            self.report("resize_inode", "the resize inode is invalid", ino=L.RESIZE_INO)

    def inode_view(self, ino: int) -> memoryview | None:
        """The raw inode ``ino``, or None when its group's inode table is unusable."""
        g, i = divmod(ino - 1, self.ipg)
        if not self.it_ok[g]:
            return None
        return self.view(self.gd[g][2] * self.bs + i * self.isize, self.isize)

    # == pass 1: inodes ========================================================================
    def pass1(self, bar: Any) -> None:
        ninodes, ipg, isize = self.ninodes, self.ipg, self.isize
        #: per inode: 1 when in use (as e2fsck's inode_used_map)
        self.iused = bytearray(ninodes + 1)
        #: per inode in use: its file type code (FT_*), 0 for an invalid mode
        self.itype = bytearray(ninodes + 1)
        #: inodes with bad fields (e2fsck's inode_bad_map): their entries should have type 0
        self.bad: set[int] = set()
        self.links = array("H", bytes(2 * (ninodes + 1)))
        self._structs: dict[int, struct.Struct] = {}
        #: contiguous ranges of claimed blocks: (first, count)
        self.runs: list[tuple[int, int]] = []
        #: directories: (ino, (logical, physical) of each block mapped, number of logical blocks
        #: up to the last one mapped (holes between are reported in pass 2), htree flag)
        self.dirs: list[tuple[int, list[tuple[int, int]], int, bool]] = []
        #: the blocks claimed by inodes one by one (runs of blocks are in ``runs``)
        self.claims = array("I")
        #: xattr block -> [h_refcount, references seen]
        self.ea_refs: dict[int, list[int]] = {}
        self.claim_budget = 4 * self.nblocks + 64
        f = self.f
        self.low_dtime_check = not any(0 < f[k] < ninodes for k in ("s_wtime", "s_mtime", "s_mkfs_time"))
        # the inode tables are read a piece at a time into one buffer
        step = max(1, min(ipg, PIECE_BYTES // isize))
        table = bytearray(step * isize)
        with memoryview(table) as view:
            for g in range(self.ngroups):
                if self.it_ok[g]:
                    for start in range(0, ipg, step):
                        n = min(step, ipg - start)
                        self.read_into(view[:n * isize], self.gd[g][2] * self.bs + start * isize)
                        self.scan_piece(g * ipg + start, table, n)
                bar.update(ipg)
        for blk, (refcount, seen) in self.ea_refs.items():
            if refcount != seen:
                self.report("xattr_refcount", f"xattr block {blk} has reference count {refcount}, should "
                            f"be {seen}", block=blk)

    def scan_piece(self, base: int, table: bytearray, n: int) -> None:
        """Find the inodes in use among the ``n`` at the start of ``table`` (inodes ``base+1``
        on) and check each."""
        isize = self.isize
        links = _nonzero_mask(table, (26, 27), isize, n)
        used = bytearray(links.to_bytes(n, "little"))
        # file types and link counts of the whole piece, without a loop over the inodes
        types = (int.from_bytes(table[1::isize][:n].translate(_FT_OF_MODE_HI), "little")
                 & links * 255).to_bytes(n, "little")
        self.itype[base + 1:base + n + 1] = types
        with memoryview(table) as mv, mv.cast("H") as words:
            counts = array("H", words[13::isize // 2][:n].tobytes())
        if sys.byteorder != "little":
            counts.byteswap()
        self.links[base + 1:base + n + 1] = counts
        # deleted inodes: zero dtime, or a dtime that looks like an orphan list link
        modes = _nonzero_mask(table, (0, 1), isize, n)
        dtimes = _nonzero_mask(table, (20, 21, 22, 23), isize, n)
        suspects = (modes & ~links) | dtimes
        if suspects:
            self.check_deleted(base, table, suspects.to_bytes(n, "little"))
        reserved = min(self.first_ino - 1 - base, n)      # inodes below s_first_ino here
        if reserved > 0:
            self.scan_reserved(base, table, used, reserved)
        self.iused[base + 1:base + n + 1] = used
        if reserved > 0:
            used = bytearray(used)
            used[:reserved] = bytes(reserved)
            if base < L.ROOT_INO <= base + reserved and self.iused[L.ROOT_INO]:
                used[L.ROOT_INO - 1 - base] = 1
        self.scan_used(base, table, used, types)

    def scan_reserved(self, base: int, table: bytearray, used: bytearray, count: int) -> None:
        """Inodes below s_first_ino: in use by definition, checked by their own rules."""
        for i in range(count):
            ino = base + i + 1
            if ino == L.ROOT_INO:
                continue
            used[i] = 1
            self.links[ino] = 0
            self.itype[ino] = 0
            self.reserved_inode(ino, _INODE.unpack_from(table, i * self.isize))

    def check_deleted(self, base: int, table: bytes | bytearray, suspects: bytes) -> None:
        """Inodes not in use with mode but no dtime, and inodes whose dtime is an orphan link."""
        isize = self.isize
        i = suspects.find(1)
        while i >= 0:
            ino = base + i + 1
            mode, = struct.unpack_from("<H", table, i * isize)
            nlinks, = struct.unpack_from("<H", table, i * isize + 26)
            dtime = _U32(table, i * isize + 20)[0]
            if dtime and self.low_dtime_check and dtime < self.ninodes:
                self.report("orphan_dtime", f"inode {ino} was part of the orphaned inode list", ino=ino)
            elif not nlinks and not dtime and mode and ino >= self.first_ino:
                self.report("zero_dtime", f"deleted inode {ino} has zero dtime", ino=ino)
            if nlinks and dtime and (ino >= self.first_ino or ino == L.ROOT_INO):
                self.report("dtime_set", f"inode {ino} is in use but has dtime set", ino=ino)
            i = suspects.find(1, i + 1)

    def inode_struct(self, extra: int) -> struct.Struct:
        """The struct that decodes a large inode whose i_extra_isize is ``extra``, up to and
        including the word where in-inode xattrs would start (index 36)."""
        s = self._structs.get(extra)
        if s is None:
            s = struct.Struct(_INODE_LARGE.format + f"{extra - 24}xI")
            self._structs[extra] = s
        return s

    def scan_used(self, base: int, table: bytes | bytearray, used: bytearray, types: bytes) -> None:
        """Check every inode in use of one piece of an inode table (the hot loop: the common
        cases inline, the rest in methods)."""
        isize = self.isize
        large = isize > 128
        nblocks = self.nblocks
        claims = self.claims
        extend = claims.extend
        runs = self.runs
        meta = self.meta
        fdb = self.fdb
        dirs = self.dirs
        sectors = self.bs // 512
        bs = self.bs
        max_size = self.max_file_size()
        top = isize - 128
        report = self.report
        REG, DIR = L.FT_REG, L.FT_DIR
        odd_flags = FL_IMAGIC | FL_EXTENTS | FL_INLINE_DATA
        extra_ok = -1
        unpack = (_INODE_LARGE if large else _INODE).unpack_from
        if large:
            # the i_extra_isize of the first inode in use: most inodes share it
            first = used.find(1)
            if first >= 0:
                e = struct.unpack_from("<H", table, first * isize + 128)[0]
                if 24 <= e < top - 4 and not e & 3:
                    extra_ok = e
                    unpack = self.inode_struct(e).unpack_from
        i = used.find(1)
        while i >= 0:
            ino = base + i + 1
            off = i * isize
            v = unpack(table, off)
            ft = types[i]
            flags = v[8]
            if v[26] or v[27] or v[28] or flags & odd_flags:
                self.odd_fields(ino, v, ft)
            if large:
                if v[29] != extra_ok:
                    self.extra_space(ino, table, off)
                else:
                    if v[36] == XATTR_MAGIC:
                        self.inode_xattrs(ino, table[off + 128 + extra_ok:off + isize])
                    if (v[31] | v[32] | v[33] | v[35]) & 3 and self.negative_epoch(v):
                        report("extra_time", f"inode {ino} has a time before 1970 encoded as after 2310",
                               ino=ino)
            acl = v[24]
            nclaimed = self.xattr_block(ino, acl) if acl else 0
            if ft in (REG, DIR):
                blk = v[9:21]
                nz = 12 - blk.count(0)
                ind = v[21]
                pairs = None
                if not (ind or v[22] or v[23]) and (nz == 12 or blk.index(0) == nz) and (
                        not nz or max(blk) < nblocks):
                    # direct blocks only, no holes: most files
                    extend(blk[:nz])
                    last = nz - 1
                    nclaimed += nz
                elif ft == REG and nz == 12 and not v[22] and not v[23] and max(blk) < nblocks and \
                        fdb <= ind < nblocks and not meta[ind] and (
                            run := self.leaf_run(bytes(self.block(ind))))[1]:
                    # twelve direct blocks and one indirect block mapping a contiguous run
                    extend(blk)
                    claims.append(ind)
                    runs.append(run)
                    last = 11 + run[1]
                    nclaimed += 13 + run[1]
                else:
                    w = self.walk(ino, v[9:24], ft)
                    nclaimed += w.count
                    last, pairs = w.last, w.pairs
                size = v[1]
                if ft == DIR:
                    if pairs is None:
                        pairs = list(enumerate(blk[:nz]))
                    dirs.append((ino, pairs, max(last + 1, 1), bool(flags & FL_INDEX)))
                    if not nclaimed:
                        report("dir_empty", f"directory inode {ino} has no blocks", ino=ino)
                    if flags & FL_INDEX:
                        self.htree_root(ino, pairs[0][1] if pairs and pairs[0][0] == 0 else 0)
                    if v[25] and not self.sb.has_incompat(INCOMPAT_LARGEDIR):
                        self.mark_bad(ino, "bad_inode_field", f"directory inode {ino} has i_size_high "
                                      f"{v[25]}")
                    if size & (bs - 1):
                        report("i_size", f"directory inode {ino} has size {size}, not a multiple of the "
                               "block size", ino=ino)
                    else:
                        nblock = size // bs
                        if nblock > last + 1 or last + 1 - nblock > self.f["s_prealloc_dir_blocks"]:
                            report("i_size", f"directory inode {ino} has size {size}, its blocks reach "
                                   f"{(last + 1) * bs}", ino=ino)
                else:
                    if v[25]:
                        size |= v[25] << 32
                    if last >= 0 and size < last * bs:
                        report("i_size", f"inode {ino} has size {size} but block {last} mapped (blocks "
                               "past the end of the file)", ino=ino)
                    elif size > max_size:
                        report("i_size", f"inode {ino} has size {size}, more than a block-mapped file "
                               "can hold", ino=ino)
                    if flags & FL_INDEX:
                        report("bad_flags", f"inode {ino} has the htree flag but is not a directory",
                               ino=ino)
            else:
                nclaimed += self.other_inode(ino, v, ft, table, off, max_size)
            if v[7] != nclaimed * sectors:
                self.check_i_blocks(ino, v, nclaimed)
            i = used.find(1, i + 1)

    def max_file_size(self) -> int:
        """The largest size e2fsck accepts for a block-mapped file at this block size."""
        a = self.apb
        return (12 + a + a * a + a * a * a) * self.bs

    def check_i_blocks(self, ino: int, v: tuple, nclaimed: int) -> None:
        iblocks = v[7]
        expect = nclaimed * (self.bs // 512)
        if self.sb.has_ro_compat(RO_COMPAT_HUGE_FILE):
            iblocks |= v[27] << 32
            if v[8] & FL_HUGE_FILE:
                expect = nclaimed
        if iblocks != expect:
            self.report("i_blocks", f"inode {ino} has i_blocks {iblocks}, should be {expect}", ino=ino)

    def odd_fields(self, ino: int, v: tuple, ft: int) -> None:
        """Fields an ext2 inode must leave zero, and flags of other formats (a directory's
        i_size_high is checked with its size)."""
        sb = self.sb
        flags = v[8]
        if v[26]:
            self.mark_bad(ino, "bad_inode_field", f"inode {ino} has i_faddr {v[26]}, should be zero")
        if v[28] and not sb.has_incompat(INCOMPAT_64BIT):
            self.mark_bad(ino, "bad_inode_field", f"inode {ino} has i_file_acl_high {v[28]}, should be zero")
        if v[27] and not sb.has_ro_compat(RO_COMPAT_HUGE_FILE):
            self.mark_bad(ino, "bad_inode_field", f"inode {ino} has i_blocks_hi {v[27]}, should be zero")
        if flags & FL_IMAGIC and not sb.has_compat(COMPAT_IMAGIC):
            self.report("bad_flags", f"inode {ino} has the imagic flag on a filesystem without imagic "
                        "inodes", ino=ino)
        if flags & FL_EXTENTS:
            self.report("bad_flags", f"inode {ino} has the extents flag on an ext2 filesystem", ino=ino)
        if flags & FL_INLINE_DATA:
            self.report("bad_flags", f"inode {ino} has the inline data flag on an ext2 filesystem", ino=ino)

    def mark_bad(self, ino: int, code: str, message: str) -> None:
        self.bad.add(ino)
        self.report(code, message, ino=ino)

    def extra_space(self, ino: int, table: bytes | bytearray, off: int) -> None:
        """i_extra_isize, the xattrs in the inode body, the extra time fields (one inode)."""
        v = _INODE_LARGE.unpack_from(table, off)
        extra = v[29]
        top = self.isize - 128
        if extra and (extra < 4 or extra > top or extra & 3):
            self.report("extra_isize", f"inode {ino} has i_extra_isize {extra}, invalid", ino=ino)
            return
        if extra < top - 4 and _U32(table, off + 128 + extra)[0] == XATTR_MAGIC:
            self.inode_xattrs(ino, table[off + 128 + extra:off + self.isize])
        if self.negative_epoch(v):
            self.report("extra_time", f"inode {ino} has a time before 1970 encoded as after 2310", ino=ino)

    @staticmethod
    def negative_epoch(v: tuple) -> bool:
        """A time before 1970 stored with the epoch bits of the years 2310..2378 (e2fsck fixes
        these): ctime, mtime, atime, crtime against their extra fields."""
        return any(x & 3 == 3 and t & 0x80000000 for t, x in
                   ((v[3], v[31]), (v[4], v[32]), (v[2], v[33]), (v[34], v[35])))

    def inode_xattrs(self, ino: int, body: memoryview) -> None:
        """The xattr entries in an inode body (e2fsck's check_ea_in_inode)."""
        size = len(body)
        region = _Region(size)
        region.allocate(0, 4)
        remain = size - 4
        pos = 4
        problem = ""
        while remain >= 16 and _U32(body, pos)[0]:
            name_len, index, offs, inum, vsize, h = _XENTRY(body, pos)
            elen = (name_len + 16 + 3) & ~3
            if region.allocate(pos, elen):
                problem = "entries overlap"
                break
            remain -= 16
            if ((name_len + 3) & ~3) > remain:
                problem = f"name length {name_len} too long"
                break
            remain -= (name_len + 3) & ~3
            if inum:
                problem = "value in an inode (ea_inode) on a filesystem without the feature"
                break
            if vsize > remain:
                problem = f"value size {vsize} too large"
                break
            if vsize and region.allocate(4 + offs, (vsize + 3) & ~3):
                problem = "value overlaps other entries"
                break
            if h:
                name = bytes(body[pos + 16:pos + 16 + name_len])
                value = body[4 + offs:4 + offs + vsize]
                if h not in (xattr_hash(name, value, False), xattr_hash(name, value, True)):
                    problem = f"entry hash 0x{h:08x} is wrong"
                    break
            remain -= vsize
            pos += elen
            if pos + 4 > size:
                break
        if not problem and region.allocate(pos, 4):
            problem = "entry list overruns the inode"
        if problem:
            self.report("inode_xattr", f"extended attributes in inode {ino}: {problem}", ino=ino)

    def xattr_block(self, ino: int, blk: int) -> int:
        """Account for inode ``ino``'s xattr block: 1 when it counts in i_blocks, else 0."""
        if not self.sb.has_compat(L.COMPAT_EXT_ATTR) or not self.fdb <= blk < self.nblocks:
            why = "the filesystem has no ext_attr feature" if self.fdb <= blk < self.nblocks \
                else "it is outside the filesystem"
            self.mark_bad(ino, "bad_xattr_block", f"inode {ino} has xattr block {blk}, but {why}")
            return 0
        ref = self.ea_refs.get(blk)
        if ref is not None:
            ref[1] += 1
            return 1
        buf = self.block(blk)
        magic, refcount, nblk = _XHEADER(buf, 0)
        self.ea_refs[blk] = [refcount, 1]
        problem = self.xattr_block_problem(buf, magic, nblk)
        if problem:
            self.report("xattr_block", f"xattr block {blk} of inode {ino}: {problem}", ino=ino, block=blk)
        self.claims.append(blk)
        return 1

    def xattr_block_problem(self, buf: memoryview, magic: int, nblk: int) -> str:
        """What is wrong with an xattr block's header and entries ("" when nothing)."""
        bs = self.bs
        if magic != L.XATTR_MAGIC:
            return f"bad magic 0x{magic:08x}"
        if nblk != 1:
            return f"h_blocks is {nblk}, should be 1"
        region = _Region(bs)
        region.allocate(0, 32)
        pos = 32
        while pos + 4 <= bs and _U32(buf, pos)[0]:
            if pos + 16 > bs:
                return "entry runs past the block"
            name_len, index, offs, inum, vsize, h = _XENTRY(buf, pos)
            elen = (name_len + 16 + 3) & ~3
            if region.allocate(pos, elen):
                return "entries overlap"
            if index == 0:
                return "entry with name index 0"
            if inum:
                return "value in an inode (ea_inode) on a filesystem without the feature"
            if offs + vsize > bs:
                return f"value ({vsize} bytes at {offs}) runs past the block"
            if vsize and region.allocate(offs, (vsize + 3) & ~3):
                return "value overlaps other data"
            name = bytes(buf[pos + 16:pos + 16 + name_len])
            value = buf[offs:offs + vsize]
            if h not in (xattr_hash(name, value, False), xattr_hash(name, value, True)):
                return f"entry hash 0x{h:08x} is wrong"
            pos += elen
        if region.allocate(pos, 4):
            return "entry list overruns the block"
        return ""

    def reserved_inode(self, ino: int, v: tuple) -> None:
        """Inodes below s_first_ino but the root: bad blocks, resize, journal, quota, unused."""
        mode, nlinks = v[0], v[6]
        if ino in QUOTA_INOS or (ino == L.JOURNAL_INO and self.f["s_journal_inum"] != L.JOURNAL_INO):
            if nlinks or v[7] or v[9]:
                what = "quota" if ino in QUOTA_INOS else "journal"
                self.report("reserved_inode", f"reserved {what} inode {ino} is not in use but is not "
                            "clear", ino=ino)
            return
        if ino == L.JOURNAL_INO:
            if mode & S_IFMT != S_IFREG:
                self.report("reserved_inode", "the journal inode is not a regular file", ino=ino)
            self.reserved_blocks(ino, v, regular=True)
            return
        if (ino == L.RESIZE_INO and mode and mode & S_IFMT != S_IFREG) or (
                ino == 5 and mode & S_IFMT == S_IFDIR) or (ino not in (5, L.RESIZE_INO) and mode):
            self.report("reserved_inode", f"reserved inode {ino} has bad mode 0o{mode:o}", ino=ino)
        self.reserved_blocks(ino, v, regular=mode & S_IFMT == S_IFREG)

    def reserved_blocks(self, ino: int, v: tuple, regular: bool) -> None:
        """The blocks of a reserved inode: the bad blocks list, the resize inode, the journal."""
        nclaimed = self.xattr_block(ino, v[24]) if v[24] else 0
        if ino == L.RESIZE_INO:
            w = self.walk(ino, v[9:24], L.FT_REG, COUNT)
            dind = v[9 + L.DIND_BLOCK]
            nclaimed += w.count
            if w.count and self.fdb <= dind < self.nblocks:
                self.claims.append(dind)
        elif regular or ino == 1:
            nclaimed += self.walk(ino, v[9:24], L.FT_REG).count
        if v[7] != nclaimed * (self.bs // 512) and ino != 1:
            self.check_i_blocks(ino, v, nclaimed)
        size = v[1] | v[25] << 32
        if size > self.max_file_size():               # e2fsck checks every inode's size this way
            self.report("i_size", f"reserved inode {ino} has size {size}, more than a block-mapped "
                        "file can hold", ino=ino)

    def other_inode(self, ino: int, v: tuple, ft: int, table: bytes | bytearray, off: int,
                    max_size: int) -> int:
        """Symlinks, devices, fifos, sockets and invalid modes; the blocks claimed."""
        mode, size, flags = v[0], v[1], v[8]
        fsize = size | v[25] << 32
        blk = v[9:24]
        if ft == 0:
            self.mark_bad(ino, "bad_mode", f"inode {ino} has invalid mode 0o{mode:o}")
        elif ft == L.FT_SYMLINK:
            if not self.symlink_ok(v, table, off):
                self.mark_bad(ino, "bad_symlink", f"symlink inode {ino} is invalid (size {fsize})")
            elif flags & (FL_IMMUTABLE | FL_APPEND):
                self.report("bad_flags", f"special inode {ino} has the immutable or append-only flag",
                            ino=ino)
            if self.symlink_maps_blocks(v):
                return self.walk(ino, blk, ft).count
        else:
            if flags & (FL_INDEX | FL_EXTENTS) or (
                    flags & (FL_IMMUTABLE | FL_APPEND) and any(blk[4:])):
                self.mark_bad(ino, "bad_device", f"special inode {ino} ({FT_NAMES[ft]}) is invalid")
            else:
                if flags & (FL_IMMUTABLE | FL_APPEND):
                    self.report("bad_flags", f"special inode {ino} has the immutable or append-only "
                                "flag", ino=ino)
                if fsize:
                    self.report("special_file_size", f"special inode {ino} ({FT_NAMES[ft]}) has size "
                                f"{fsize}, should be 0", ino=ino)
        if fsize > max_size and ft != L.FT_SYMLINK:
            self.report("i_size", f"inode {ino} has size {fsize}, more than a block-mapped file can hold",
                        ino=ino)
        return 0

    @staticmethod
    def symlink_maps_blocks(v: tuple) -> bool:
        """Whether a symlink's i_block holds block numbers (ext2fs_inode_has_valid_blocks2)."""
        if not v[24]:
            return v[7] != 0
        size = v[1] | v[25] << 32
        return size >= 60 or (size > 4 and v[10] == 0)

    def symlink_ok(self, v: tuple, table: bytes | bytearray, off: int) -> bool:
        """e2fsck_pass1_check_symlink: the target's length matches i_size, no NUL inside."""
        size, size_high, flags = v[1], v[25], v[8]
        if size_high or size == 0 or flags & FL_INDEX:
            return False
        if size < 60:                                   # fast symlink: the target in i_block
            if flags & FL_EXTENTS:
                return False
            buf = bytes(table[off + 40:off + 100])
        else:
            blk = v[9]
            if any(v[10:24]) or not self.fdb <= blk < self.nblocks:
                return False
            buf = bytes(self.block(blk))
        n = buf.find(0)
        length = len(buf) if n < 0 else n
        return length < len(buf) and length == size

    def htree_root(self, ino: int, blk: int) -> None:
        """The htree root of an indexed directory (e2fsck's handle_htree)."""
        sb = self.sb
        if not sb.has_compat(L.COMPAT_DIR_INDEX):
            self.report("htree", f"directory inode {ino} has the htree flag but the filesystem has no "
                        "dir_index", ino=ino)
        if not blk or not self.fdb <= blk < self.nblocks:
            self.report("htree", f"directory inode {ino} has an invalid htree root", ino=ino)
            return
        zero, hash_version, info_len, levels, flags = _DX_ROOT_INFO(self.block(blk), 24)
        if zero or info_len < 8:
            self.report("htree", f"directory inode {ino} has an invalid htree root", ino=ino)
        elif hash_version not in (0, 1, 2):
            self.report("htree", f"directory inode {ino} has unsupported hash version {hash_version}",
                        ino=ino)
        elif flags & 1:
            self.report("htree", f"directory inode {ino} uses incompatible htree root flags", ino=ino)
        elif levels > 2 or (levels > 1 and not sb.has_incompat(INCOMPAT_LARGEDIR)):
            self.report("htree", f"directory inode {ino} has an htree of {levels} levels, too deep",
                        ino=ino)

    # -- block maps ---------------------------------------------------------------------------
    def walk(self, ino: int, blk: tuple, ft: int, mode: int = 0) -> _Walk:
        """Follow inode ``ino``'s block map (``mode``: see :class:`_Walk`); the walk done tells
        how many legal blocks (data and indirect) it found, the last logical block mapped, and,
        for directories and symlinks, the ``(logical, physical)`` data pairs. Illegal blocks
        and indirect blocks on metadata are reported.
        """
        w = _Walk(self, ino, ft, mode)
        direct = blk[:12]
        if w.pairs is None and 0 not in direct and max(direct) < self.nblocks:
            w.count = 12
            w.last = 11
            if w.claims is not None:
                w.claims.extend(direct)
            elif w.blocks is not None:
                w.blocks.extend(direct)
        else:
            w.direct(direct)
        apb = self.apb
        starts = (12, 12 + apb, 12 + apb + apb * apb)
        for level in range(3):
            b = blk[12 + level]
            if b and not w.stopped:
                w.indirect(b, level + 1, starts[level])
        w.finish()
        return w

    def run_bytes(self, a: int, k: int) -> bytes:
        """The little-endian words ``a, a+1, ..., a+k-1``: what a block map holding one run of
        contiguous blocks looks like. Cut from tables of ``RUN_CHUNK`` consecutive numbers made on
        demand, each one the first table plus a constant (one big-integer sum)."""
        chunk, off = divmod(a, RUN_CHUNK)
        table = self._run_chunks.get(chunk)
        if table is None:
            n = RUN_CHUNK + self.apb
            base, ones = _run_base(n)
            start = chunk * RUN_CHUNK
            if start + n >= 1 << 32:
                return b""                       # past the largest block number: no run here
            table = (base + start * ones).to_bytes(4 * n, "little")
            self._run_chunks[chunk] = table
        return table[4 * off:4 * (off + k)]

    def leaf_run(self, raw: bytes) -> tuple[int, int]:
        """``(a, k)`` when the block map ``raw`` holds exactly the run ``a .. a+k-1`` of legal
        blocks followed by zeros; ``(0, 0)`` otherwise (the caller walks it entry by entry)."""
        if raw[-4:] != b"\0\0\0\0":
            k = len(raw) >> 2
        else:
            p = raw.find(b"\0\0\0\0")
            k = (p + 3) >> 2
            if not k or raw[4 * k:] != bytes(len(raw) - 4 * k):
                return 0, 0
        a = _U32(raw, 0)[0]
        if a < self.fdb or a + k > self.nblocks or raw[:4 * k] != self.run_bytes(a, k):
            return 0, 0
        return a, k

    # == pass 1b: blocks claimed twice =========================================================
    def pass1b(self) -> None:
        """Mark every claimed block; when some block is claimed twice, say by whom."""
        used = self.used
        claims = self.claims
        expect = used.count(1) + len(claims)
        for b in claims:
            used[b] = 1
        ones = b"\1" * self.apb
        for a, k in self.runs:
            used[a:a + k] = ones[:k]
            expect += k
        if used.count(1) == expect:
            return
        seen = bytearray(self.meta)
        dups = set()
        for b in chain(claims, *(range(a, a + k) for a, k in self.runs)):
            if seen[b]:
                dups.add(b)
            else:
                seen[b] = 1
        meta = self.meta
        for ino in compress(range(len(self.iused)), self.iused):
            mine = sorted({b for b in self.owned_blocks(ino) if b in dups})
            if mine:
                text = f"inode {ino} claims block(s) also claimed elsewhere: {_ranges(mine)}"
                shared = [b for b in mine if meta[b]]
                if shared:
                    text += f" ({_ranges(shared)} filesystem metadata)"
                self.report("dup_block", text, ino=ino, block=mine[0])

    def owned_blocks(self, ino: int) -> list[int]:
        """The blocks pass 1 counted as claimed by inode ``ino`` (walked again, quietly)."""
        t = self.inode_view(ino)
        if t is None:
            return []
        v = _INODE.unpack_from(t, 0)
        out = [v[24]] if v[24] and self.fdb <= v[24] < self.nblocks else []
        if ino == L.RESIZE_INO:
            dind = v[9 + L.DIND_BLOCK]
            return out + ([dind] if dind else [])
        ft = FT_OF_TYPE[v[0] >> 12]
        if ino < self.first_ino and ino != L.ROOT_INO:
            mapped = ft == L.FT_REG or ino == 1
        else:
            mapped = ft in (L.FT_REG, L.FT_DIR) or (ft == L.FT_SYMLINK and self.symlink_maps_blocks(v))
        if mapped:
            out += self.walk(ino, v[9:24], ft or L.FT_REG, COLLECT).blocks or []
        return out

    # == pass 2: directory structure ===========================================================
    def pass2(self, bar: Any) -> None:
        ninodes = self.ninodes
        self.refs = array("H", bytes(2 * (ninodes + 1)))
        #: references past 65535 (the 16-bit counters above stop there)
        self.more_refs: dict[int, int] = {}
        self.parent = array("I", bytes(4 * (ninodes + 1)))
        self.dotdot = array("I", bytes(4 * (ninodes + 1)))
        self.names: dict[int, bytes] = {}
        self.large_files = 0
        # what an entry naming each inode should say: its file type (0 for an inode with bad
        # fields, as e2fsck), UNUSED_INODE for an inode not in use, BAD_NUMBER for reserved ones
        n = ninodes + 1
        unused = int.from_bytes(self.iused.translate(_UNUSED_MARK), "little")
        expected = bytearray((int.from_bytes(self.itype, "little") | unused).to_bytes(n, "little"))
        for ino in self.bad:
            if expected[ino] != UNUSED_INODE:
                expected[ino] = 0
        expected[0] = BAD_NUMBER
        expected[1:min(self.first_ino, n)] = bytes([BAD_NUMBER]) * (min(self.first_ino, n) - 1)
        if self.first_ino > L.ROOT_INO:
            expected[L.ROOT_INO] = UNUSED_INODE if not self.iused[L.ROOT_INO] else self.itype[L.ROOT_INO]
            if L.ROOT_INO in self.bad and self.iused[L.ROOT_INO]:
                expected[L.ROOT_INO] = 0
        self.expected = expected
        bar.add_total(len(self.dirs))
        for ino, pairs, nblocks, htree in self.dirs:
            self.check_dir(ino, pairs, nblocks, htree)
            bar.update(1)

    def check_dir(self, ino: int, pairs: list[tuple[int, int]], nblocks: int, htree: bool) -> None:
        """Every block of directory ``ino``: parse the entries, then check them a block at a
        time (most blocks pass a few whole-block tests; the others are checked entry by entry)."""
        bs = self.bs
        big = bs >= 65536
        report = self.report
        dirent = _DIRENT
        self.dups_reported = False
        dx = _Htree(self, ino, nblocks) if htree else None
        expect = 0
        for lblk, pblk in chain(pairs, ((nblocks, 0),)):
            if lblk > expect:
                holes = f"block {expect}" if lblk == expect + 1 else f"blocks {expect}-{lblk - 1}"
                report("dir_hole", f"directory inode {ino} has a hole at {holes}", ino=ino)
            expect = lblk + 1
            if not pblk:
                break
            buf = bytes(self.block(pblk))
            if dx is not None:
                dx.classify(lblk, buf)
            inos: list[int] = []
            fts = bytearray()
            names: list[bytes] = []
            pos = 0
            state = 0 if lblk == 0 else 2
            while pos < bs:
                if bs - pos < 8:
                    report("bad_dir_entry", f"directory inode {ino} block {lblk}: entry at {pos} "
                           "has no room for its header", ino=ino, block=pblk)
                    break
                d_ino, rec_len, nlen, ft = dirent(buf, pos)
                if big:
                    rec_len = bs if rec_len in (0, 65535) else (rec_len & 65532) | ((rec_len & 3) << 16)
                if pos + rec_len > bs or rec_len < 12 or rec_len & 3 or nlen + 8 > rec_len:
                    report("bad_dir_entry", f"directory inode {ino} block {lblk}: entry at {pos} has "
                           f"rec_len {rec_len} and name_len {nlen}", ino=ino, block=pblk)
                    break
                if state > 1:
                    if d_ino:
                        inos.append(d_ino)
                        fts.append(ft)
                        names.append(buf[pos + 8:pos + 8 + nlen])
                else:
                    name = buf[pos + 8:pos + 8 + nlen]
                    if state == 0:
                        self.check_dot(ino, d_ino, name, buf, pos, rec_len)
                    else:
                        self.check_dotdot(ino, d_ino, name, buf, pos)
                    if d_ino:
                        self.check_entries(ino, pblk, [d_ino], bytearray([ft]), [name], dots=True)
                pos += rec_len
                state += 1
            if inos:
                self.check_entries(ino, pblk, inos, fts, names)
        if dx is not None:
            dx.finish()

    def check_entries(self, ino: int, pblk: int, inos: list[int], fts: bytearray, names: list[bytes],
                      dots: bool = False) -> None:
        """The entries of one directory block that name an inode (``dots``: '.' or '..')."""
        refs = self.refs
        if not dots and max(inos) <= self.ninodes:
            # the whole block at once: every inode in use and not bad, every file type right,
            # no odd name, no duplicate
            should = bytes(map(self.expected.__getitem__, inos))
            if (should == fts if self.filetype else not any(fts)) and UNUSED_INODE not in should \
                    and BAD_NUMBER not in should and 0 not in should and ino not in inos \
                    and L.ROOT_INO not in inos and b"." not in names and b".." not in names \
                    and b"" not in names and not self.bad_chars(names) \
                    and len(set(names)) == len(names):
                parent = self.parent
                i = should.find(L.FT_DIR)
                while i >= 0:
                    d_ino = inos[i]
                    if parent[d_ino]:
                        self.report("dir_hardlink", f"entry {names[i]!r} in directory inode {ino} is a "
                                    f"link to directory inode {d_ino}, already in directory inode "
                                    f"{parent[d_ino]}", ino=ino, block=pblk)
                    else:
                        parent[d_ino] = ino
                        self.names[d_ino] = names[i]
                    i = should.find(L.FT_DIR, i + 1)
                done = 0
                try:
                    for d_ino in inos:
                        refs[d_ino] += 1
                        done += 1
                except OverflowError:
                    for d_ino in inos[done:]:
                        self.count_ref(d_ino)
                return
        for d_ino, ft, name in zip(inos, fts, names, strict=True):
            self.check_entry(ino, pblk, d_ino, ft, name, dots)
        if not dots and not self.dups_reported and len(set(names)) != len(names):
            seen: set[bytes] = set()
            dup = next(n for n in names if n in seen or seen.add(n))
            self.report("dup_entry", f"duplicate entry {dup!r} in directory inode {ino}", ino=ino,
                        block=pblk)
            self.dups_reported = True

    @staticmethod
    def bad_chars(names: list[bytes]) -> bool:
        joined = b"".join(names)
        return b"/" in joined or b"\0" in joined

    def count_ref(self, d_ino: int) -> None:
        """One more entry names ``d_ino`` (past 65535 the count goes on in ``more_refs``)."""
        try:
            self.refs[d_ino] += 1
        except OverflowError:
            self.more_refs[d_ino] = self.more_refs.get(d_ino, 0) + 1

    def check_entry(self, ino: int, pblk: int, d_ino: int, ft: int, name: bytes, dots: bool) -> None:
        """One entry naming inode ``d_ino``, every rule (e2fsck's check_dir_block, per entry)."""
        report = self.report
        should = self.expected[d_ino] if d_ino <= self.ninodes else BAD_NUMBER
        if should == BAD_NUMBER:
            report("bad_inode_number", f"entry {name!r} in directory inode {ino} has bad inode number "
                   f"{d_ino}", ino=ino, block=pblk)
            return
        if not dots:
            if d_ino == ino:
                report("link_to_dot", f"entry {name!r} in directory inode {ino} is a link to '.'", ino=ino)
            if d_ino == L.ROOT_INO or len(name) <= 2:
                self.odd_name(ino, d_ino, name, len(name))
        if should == UNUSED_INODE:
            report("unused_inode", f"entry {name!r} in directory inode {ino} points to unused inode "
                   f"{d_ino}", ino=ino, block=pblk)
            should = self.mode_type(d_ino)
        if b"/" in name or b"\0" in name:
            report("bad_name", f"entry {name!r} in directory inode {ino} has an illegal character in its "
                   "name", ino=ino)
        if self.filetype:
            if ft != should:
                report("file_type", f"entry {name!r} in directory inode {ino} has file type {ft}, should "
                       f"be {should} ({FT_NAMES.get(should, '?')})", ino=ino, block=pblk)
        elif ft:
            report("file_type", f"entry {name!r} in directory inode {ino} has file type {ft} without the "
                   "filetype feature", ino=ino, block=pblk)
        if not dots and self.itype[d_ino] == L.FT_DIR:
            parent = self.parent
            if parent[d_ino]:
                report("dir_hardlink", f"entry {name!r} in directory inode {ino} is a link to directory "
                       f"inode {d_ino}, already in directory inode {parent[d_ino]}", ino=ino, block=pblk)
            else:
                parent[d_ino] = ino
                self.names[d_ino] = name
        self.count_ref(d_ino)

    def check_dot(self, ino: int, d_ino: int, name: bytes, buf: bytes, pos: int, rec_len: int) -> None:
        """The first entry of a directory must be '.', naming the directory itself."""
        if not d_ino:
            self.report("bad_dot", f"directory inode {ino} has no '.' entry", ino=ino)
        elif name != b".":
            self.report("bad_dot", f"first entry {name!r} of directory inode {ino} is not '.'", ino=ino)
        elif buf[pos + 9]:
            self.report("bad_dot", f"'.' in directory inode {ino} is not NUL-terminated", ino=ino)
        if d_ino != ino:
            self.report("bad_dot", f"'.' in directory inode {ino} points to inode {d_ino}", ino=ino)

    def check_dotdot(self, ino: int, d_ino: int, name: bytes, buf: bytes, pos: int) -> None:
        """The second entry of a directory must be '..'; its inode is checked in pass 3."""
        if not d_ino:
            self.report("bad_dotdot", f"directory inode {ino} has no '..' entry", ino=ino)
        elif name != b"..":
            self.report("bad_dotdot", f"second entry {name!r} of directory inode {ino} is not '..'",
                        ino=ino)
        elif buf[pos + 10]:
            self.report("bad_dotdot", f"'..' in directory inode {ino} is not NUL-terminated", ino=ino)
        else:
            self.dotdot[ino] = d_ino

    def odd_name(self, ino: int, d_ino: int, name: bytes, nlen: int) -> None:
        """Entries past the second: no '.', '..', empty names or links to the root."""
        if name == b".":
            self.report("dup_dot", f"directory inode {ino} has a second '.' entry", ino=ino)
        elif name == b"..":
            self.report("dup_dotdot", f"directory inode {ino} has a second '..' entry", ino=ino)
        elif d_ino == L.ROOT_INO:
            self.report("link_to_root", f"entry {name!r} in directory inode {ino} is a link to the root",
                        ino=ino)
        elif nlen == 0:
            self.report("null_name", f"directory inode {ino} has an entry with an empty name", ino=ino)

    def mode_type(self, ino: int) -> int:
        """The file type code of inode ``ino``'s mode as stored (for inodes not in use)."""
        t = self.inode_view(ino)
        return FT_OF_TYPE[struct.unpack_from("<H", t, 0)[0] >> 12] if t is not None else 0

    # == pass 3: connectivity ==================================================================
    def pass3(self) -> None:
        iused, itype, parent, dotdot = self.iused, self.itype, self.parent, self.dotdot
        root = L.ROOT_INO
        if not iused[root] or itype[root] != L.FT_DIR:
            self.report("no_root", "the root inode is not an allocated directory", ino=root)
            return
        parent[root] = root
        dirs = [d[0] for d in self.dirs]
        # 0: not yet known, 1: connected to the root, 2: not connected (reported)
        state = bytearray(self.ninodes + 1)
        state[root] = 1
        for d in dirs:
            if state[d]:
                continue
            path = []
            on_path = set()
            cur = d
            while not state[cur]:
                path.append(cur)
                on_path.add(cur)
                p = parent[cur]
                if not p:
                    self.report("unconnected_dir", f"directory inode {cur} is not connected to the tree "
                                f"('..' points to {dotdot[cur]})", ino=cur)
                    result = 2
                    break
                if p in on_path:
                    self.report("dir_loop", f"directory inode {cur} is in a loop of directories not "
                                "connected to the root", ino=cur)
                    result = 2
                    break
                cur = p
            else:
                result = state[cur]
            for x in path:
                state[x] = result
        for d in dirs:
            if dotdot[d] != parent[d]:
                self.report("dotdot_mismatch", f"'..' in directory inode {d} is {dotdot[d]}, should be "
                            f"{parent[d]}", ino=d)

    # == pass 4: reference counts ==============================================================
    def pass4(self) -> None:
        iused, itype, refs, links = self.iused, self.itype, self.refs, self.links
        # reserved inodes are not counted; neither are inodes not in use
        for ino in range(1, min(self.first_ino, self.ninodes + 1)):
            if ino != L.ROOT_INO:
                refs[ino] = links[ino] = 0
        if not iused[L.ROOT_INO]:
            refs[L.ROOT_INO] = links[L.ROOT_INO] = 0
        if refs == links and not self.more_refs:
            return
        unused = [ino for ino in range(1, self.ninodes + 1) if refs[ino] != links[ino] and not iused[ino]]
        for ino in unused:
            refs[ino] = links[ino] = 0
        for ino in range(self.first_ino, self.ninodes + 1):
            nlinks, counted = links[ino], refs[ino] + self.more_refs.get(ino, 0)
            if counted == nlinks:
                continue
            self.count_problem(ino, nlinks, counted, itype[ino])
        if refs[L.ROOT_INO] != links[L.ROOT_INO]:
            self.count_problem(L.ROOT_INO, links[L.ROOT_INO], refs[L.ROOT_INO], itype[L.ROOT_INO])

    def count_problem(self, ino: int, nlinks: int, counted: int, ft: int) -> None:
        """Inode ``ino`` has ``nlinks`` links and ``counted`` directory entries name it."""
        if counted == 0:
            self.report("unattached_inode", f"inode {ino} ({FT_NAMES.get(ft, '?')}) is in use but no "
                        "directory entry names it", ino=ino)
            return
        if ft == L.FT_DIR and counted > LINK_MAX:
            if not self.sb.has_ro_compat(RO_COMPAT_DIR_NLINK):
                self.report("dir_nlink", f"directory inode {ino} has more than {LINK_MAX} links without "
                            "the dir_nlink feature", ino=ino)
            counted = 1
            if counted == nlinks:
                return
        self.report("link_count", f"inode {ino} has link count {nlinks}, should be {counted}", ino=ino)

    # == pass 5: bitmaps and counts ============================================================
    def pass5(self) -> None:
        self.check_block_bitmaps()
        self.check_inode_bitmaps()

    def check_block_bitmaps(self) -> None:
        used = self.used
        total_free = 0
        differ_minus: list[int] = []
        differ_plus: list[int] = []
        for g in range(self.ngroups):
            first, last = self.group_first(g), self.group_last(g)
            n = last - first + 1
            if not self.bb_ok[g]:
                continue
            bits = _expand_bits(self.block(self.gd[g][0]), self.bpg)
            ondisk = bits[:n]
            computed = bytes(used[first:last + 1])
            if ondisk != computed:
                for k in range(n):
                    if ondisk[k] != computed[k]:
                        (differ_minus if ondisk[k] else differ_plus).append(first + k)
            free = ondisk.count(0)
            total_free += free
            if free != self.gd[g][3]:
                self.report("free_blocks_count", f"group {g} free blocks count is {self.gd[g][3]}, "
                            f"counted {free}")
            if (n < self.bpg and bits[n:].count(0)) or _tail_unset(self.block(self.gd[g][0]), self.bpg):
                self.report("bitmap_padding", f"padding at the end of group {g}'s block bitmap is not set",
                            block=self.gd[g][0])
        self.report_differences("block", differ_minus, differ_plus, all(self.bb_ok), total_free)

    def check_inode_bitmaps(self) -> None:
        iused, itype = self.iused, self.itype
        ipg = self.ipg
        total_free = 0
        differ_minus: list[int] = []
        differ_plus: list[int] = []
        for g in range(self.ngroups):
            if not self.ib_ok[g]:
                continue
            base = g * ipg
            if _tail_unset(self.block(self.gd[g][1]), ipg):
                self.report("bitmap_padding", f"padding at the end of group {g}'s inode bitmap is not set",
                            block=self.gd[g][1])
            ondisk = _expand_bits(self.block(self.gd[g][1]), ipg)
            computed = bytes(iused[base + 1:base + ipg + 1])
            types = itype[base + 1:base + ipg + 1]
            if ondisk != computed:
                for k in range(ipg):
                    if ondisk[k] != computed[k]:
                        (differ_minus if ondisk[k] else differ_plus).append(base + k + 1)
                dirs = sum(1 for k in range(ipg) if ondisk[k] and computed[k] and types[k] == L.FT_DIR)
            else:
                dirs = types.count(L.FT_DIR)
            free = ondisk.count(0)
            total_free += free
            _bb, _ib, _it, _fb, fi, ndirs, *_rest = self.gd[g]
            if free != fi:
                self.report("free_inodes_count", f"group {g} free inodes count is {fi}, counted {free}")
            if dirs != ndirs:
                self.report("dirs_count", f"group {g} directories count is {ndirs}, counted {dirs}")
        self.report_differences("inode", differ_minus, differ_plus, all(self.ib_ok), total_free)

    def report_differences(self, what: str, minus: list[int], plus: list[int], whole: bool,
                           total_free: int) -> None:
        """Bitmap bits that disagree with what pass 1 found (``what``: "block" or "inode"), and,
        when every bitmap could be read, the superblock's free count against the bitmaps'."""
        key = "block" if what == "block" else "ino"
        if minus:
            self.report(f"{what}_bitmap_differs", f"{what}s marked in use but not used: {_ranges(minus)}",
                        **{key: minus[0]})
        if plus:
            self.report(f"{what}_bitmap_differs", f"{what}s used but marked free: {_ranges(plus)}",
                        **{key: plus[0]})
        field = f"s_free_{what}s_count"
        if whole and total_free != self.f[field]:
            self.report(f"sb_free_{what}s_count", f"superblock free {what}s count is {self.f[field]}, "
                        f"counted {total_free}")

    # == paths for the report ==================================================================
    def add_paths(self) -> None:
        """Give each problem about an inode the path of a name it has (when one is found)."""
        wanted = {p.ino for p in self.problems if p.ino is not None and p.path is None}
        if not wanted or not hasattr(self, "names"):
            return
        found: dict[int, str] = {}
        for ino in wanted:
            path = self.dir_path(ino)
            if path is not None:
                found[ino] = path
        rest = wanted - set(found)
        if rest:
            self.find_names(rest, found)
        self.problems = [Problem(p.code, p.message, p.ino, p.block, found.get(p.ino))
                         if p.ino in found else p for p in self.problems]

    def dir_path(self, ino: int) -> str | None:
        """The path of directory ``ino`` through the parents found in pass 2."""
        if ino == L.ROOT_INO:
            return "/"
        parts = []
        seen = set()
        while ino != L.ROOT_INO:
            name = self.names.get(ino)
            if name is None or ino in seen:
                return None
            seen.add(ino)
            parts.append(name.decode("utf-8", "surrogateescape"))
            ino = self.parent[ino]
        return "/" + "/".join(reversed(parts))

    def find_names(self, inos: set[int], found: dict[int, str]) -> None:
        """Look for directory entries naming ``inos`` (one more read of the directories)."""
        bs = self.bs
        for dino, pairs, _n, _h in self.dirs:
            top = self.dir_path(dino)
            if top is None:
                continue
            for _lblk, pblk in pairs:
                buf = bytes(self.block(pblk))
                pos = 0
                while pos <= bs - 8:
                    d_ino, rec_len, nlen, _ft = _DIRENT(buf, pos)
                    if rec_len < 12 or pos + rec_len > bs or nlen + 8 > rec_len:
                        break
                    if d_ino in inos and d_ino not in found:
                        name = buf[pos + 8:pos + 8 + nlen]
                        if name not in (b".", b".."):
                            found[d_ino] = top.rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
                    pos += rec_len
            if len(found) >= len(inos):
                return


class _Walk:
    """The walk over one inode's block map (e2fsck's check_blocks with process_block).

    ``mode`` says what becomes of the legal blocks found: ``CLAIM`` adds them to the checker's
    claims (single blocks) and runs (contiguous ranges), ``COUNT`` only counts them, ``COLLECT``
    lists them in ``blocks``.
    """

    def __init__(self, c: _Checker, ino: int, ft: int, mode: int) -> None:
        self.c = c
        self.ino = ino
        self.ft = ft
        self.report = c.report if mode != COLLECT else (lambda *a, **k: None)
        self.claims = c.claims if mode == CLAIM else None
        self.runs = c.runs if mode == CLAIM else None
        self.blocks: list[int] | None = [] if mode == COLLECT else None
        self.count = 0
        self.last = -1
        self.pairs: list[tuple[int, int]] | None = [] if ft in (L.FT_DIR, L.FT_SYMLINK) else None
        self.illegal: list[int] = []
        self.stopped = False
        self.dir_max = 1 << (21 - c.log_bs)

    def take(self, pblk: int) -> None:
        self.count += 1
        if self.claims is not None:
            self.claims.append(pblk)
        elif self.blocks is not None:
            self.blocks.append(pblk)

    def data_block(self, lblk: int, pblk: int) -> None:
        c = self.c
        if pblk >= c.nblocks or pblk < c.fdb:
            self.illegal.append(pblk)
            return
        if self.ft == L.FT_SYMLINK and lblk > 0:
            self.report("symlink_too_big", f"symlink inode {self.ino} maps block {lblk}", ino=self.ino,
                        block=pblk)
            return
        if self.ft == L.FT_DIR and lblk > self.dir_max:
            self.report("dir_too_big", f"directory inode {self.ino} maps block {lblk}, too far",
                        ino=self.ino, block=pblk)
            return
        self.take(pblk)
        self.last = lblk
        if self.pairs is not None:
            self.pairs.append((lblk, pblk))

    def direct(self, entries: tuple) -> None:
        for i, b in enumerate(entries):
            if b:
                self.data_block(i, b)

    def leaf(self, buf: memoryview, lstart: int) -> None:
        """A last-level indirect block: its entries are data blocks from logical ``lstart``.
        One contiguous run of blocks (most files) is recognised without a loop: the block read
        equals a slice of a table of consecutive numbers."""
        c = self.c
        raw = bytes(buf)
        if self.pairs is None:
            a, k = c.leaf_run(raw)
            if k:
                self.count += k
                self.last = lstart + k - 1
                if self.runs is not None:
                    self.runs.append((a, k))
                elif self.blocks is not None:
                    self.blocks.extend(range(a, a + k))
                return
        for i, b in enumerate(c._apb_struct(raw)):
            if b:
                self.data_block(lstart + i, b)

    def indirect(self, blk: int, level: int, lstart: int) -> None:
        """An indirect block of ``level`` (1 single, 2 double, 3 triple) mapping from ``lstart``."""
        c = self.c
        if blk >= c.nblocks or blk < c.fdb:
            self.illegal.append(blk)
            return
        if self.ino != L.RESIZE_INO and c.meta[blk]:
            self.report("metadata_collision", f"indirect block {blk} of inode {self.ino} is filesystem "
                        "metadata", ino=self.ino, block=blk)
        if self.count >= c.nblocks or len(c.claims) > c.claim_budget:
            self.report("too_many_blocks", f"inode {self.ino} claims more blocks than the filesystem has "
                        "(a loop in its block map?)", ino=self.ino, block=blk)
            self.stopped = True
            return
        self.take(blk)
        if level == 1:
            self.leaf(c.block(blk), lstart)
            return
        span = c.apb ** (level - 1)
        for i, b in enumerate(c._apb_struct(c.block(blk))):
            if b:
                self.indirect(b, level - 1, lstart + i * span)
                if self.stopped:
                    return

    def finish(self) -> None:
        if self.illegal:
            self.report("bad_block", f"inode {self.ino} has illegal block(s) outside the filesystem: "
                        f"{_ranges(sorted(set(self.illegal)))}", ino=self.ino, block=self.illegal[0])


class _Htree:
    """The index of one htree directory: its root and nodes, which blocks they reference."""

    def __init__(self, c: _Checker, ino: int, nblocks: int) -> None:
        self.c = c
        self.ino = ino
        self.n = nblocks
        self.parent: dict[int, int] = {}       # block -> the index block referencing it
        self.nodes: set[int] = set()           # interior index blocks (not the root)
        self.depth = 1
        self.bad = False

    def problem(self, text: str) -> None:
        if not self.bad:
            self.c.report("htree", f"htree directory inode {self.ino}: {text}", ino=self.ino)
        self.bad = True

    def classify(self, lblk: int, buf: bytes) -> None:
        bs = self.c.bs
        d_ino, rec_len, nlen, _ft = _DIRENT(buf, 0)
        if lblk == 0:
            zero, _hv, info_len, levels, _fl = _DX_ROOT_INFO(buf, 24)
            limit_levels = 3 if self.c.sb.has_incompat(INCOMPAT_LARGEDIR) else 2
            if zero or info_len < 8 or levels >= limit_levels:
                self.problem("bad root node")
                return
            self.depth = levels + 1
            self.node(lblk, buf, 24 + info_len)
        elif d_ino == 0 and rec_len == bs and nlen == 0 and _DX_COUNTLIMIT(buf, 8)[0] == (bs - 8) // 8:
            self.nodes.add(lblk)
            self.node(lblk, buf, 8)

    def node(self, lblk: int, buf: bytes, at: int) -> None:
        bs = self.c.bs
        if at + 8 > bs:
            self.problem(f"block {lblk}: index entries outside the block")
            return
        limit, count = _DX_COUNTLIMIT(buf, at)
        expect = (bs - at) // 8
        if limit != expect:
            self.problem(f"block {lblk}: index limit {limit}, should be {expect}")
        if count > expect:
            self.problem(f"block {lblk}: index count {count} is more than {expect}")
            count = expect
        prev = 0
        for i in range(count):
            h, b = struct.unpack_from("<II", buf, at + 8 * i)
            h = (h & ~1) if i else 0
            b &= 0x0FFFFFFF
            if b >= self.n:
                self.problem(f"block {lblk}: index points to block {b}, past the directory's end")
                continue
            if h < prev:
                self.problem(f"block {lblk}: index hashes out of order")
            prev = h
            if b in self.parent or b == 0:
                self.problem(f"block {b} is referenced twice by the index")
            else:
                self.parent[b] = lblk

    def finish(self) -> None:
        if self.bad:
            return
        for b in range(1, self.n):
            p = self.parent.get(b)
            if p is None:
                self.problem(f"block {b} is not referenced by the index")
                return
            if b in self.nodes:
                continue
            depth = 1
            while p != 0 and depth <= self.n:
                p = self.parent.get(p, 0)
                depth += 1
            if depth != self.depth:
                self.problem(f"leaf block {b} is at depth {depth}, should be {self.depth}")
                return
