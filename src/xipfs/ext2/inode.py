"""Inodes and their block maps: the address-space step (the seed's ``get_xip_mem``).

An :class:`Inode` is the decoded on-disk inode. Its :class:`BlockMap` turns file blocks into
device blocks through the 12 direct pointers and the single, double and triple indirect blocks,
and hands out *runs*: ``(file block, count, device block)`` with device block 0 for a hole. Runs
of an indirect block are computed once and cached, so a large read is a handful of copies.
"""

from __future__ import annotations

import bisect
import errno
import functools
import stat as _stat
import struct
import sys
from array import array
from collections.abc import Callable
from stat import S_IFMT, S_IFREG, S_ISDIR, S_ISLNK, S_ISREG
from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L

if TYPE_CHECKING:
    from .volume import Volume

_SWAP = sys.byteorder != "little"
_BASE_UNPACK = L.INODE.struct.unpack_from
_EXTRA_UNPACK = L.INODE_EXTRA.struct.unpack_from
_LARGE_UNPACK = L.INODE_LARGE.struct.unpack_from
_AT = L.INODE_LARGE.offsets

# Writing over an inode's old bytes: the fields xipfs models, in the pieces between the ones it
# keeps (i_osd1, i_faddr, the high halves of i_blocks and i_file_acl, the checksums).
_HEAD = L.INODE.span("i_mode", "i_flags")
_MIDDLE = L.INODE.span("i_block", "i_size_high")
_MIDDLE_NO_SIZE_HIGH = L.INODE.span("i_block", "i_file_acl")     # i_size_high is i_dir_acl
_IDS_HIGH = L.INODE.span("i_uid_high", "i_gid_high")
_AT_BLOCK, _AT_IDS_HIGH, _AT_EXTRA = _AT["i_block"], _AT["i_uid_high"], _AT["i_extra_isize"]
_EXTRA_TIMES = L.INODE_LARGE.select("i_extra_isize", "i_ctime_extra", "i_mtime_extra", "i_atime_extra")
_CRTIME = L.INODE_LARGE.span("i_crtime", "i_crtime_extra")
_EXTRA_ISIZE = L.INODE_LARGE.codes["i_extra_isize"]
_CTIME_EXTRA = L.INODE_LARGE.codes["i_ctime_extra"]
_MTIME_EXTRA = L.INODE_LARGE.codes["i_mtime_extra"]

# A whole new inode over zeros: every field xipfs models, the others zero.
_FRESH_FIELDS = ("i_mode", "i_uid", "i_size", "i_atime", "i_ctime", "i_mtime", "i_dtime", "i_gid",
                 "i_links_count", "i_blocks", "i_flags", "i_block", "i_generation", "i_file_acl",
                 "i_size_high", "i_uid_high", "i_gid_high")
_FRESH_BASE = L.INODE.select(*_FRESH_FIELDS)
_FRESH_EXTRA = ("i_extra_isize", "i_ctime_extra", "i_mtime_extra", "i_atime_extra", "i_crtime",
                "i_crtime_extra")
#: A new large inode's i_extra_isize, as mke2fs sets it: through i_projid (past i_crtime_extra
#: the fields stay zero).
NEW_EXTRA_ISIZE = 32
#: Per large inode size, a whole new inode in one Struct: base, extra fields, zero padding.
_FRESH_WHOLE: dict[int, struct.Struct] = {}

#: A run: (first file block, number of blocks, first device block or 0 for a hole).
Run = tuple[int, int, int]


def decode_time(seconds: int, extra: int | None) -> int:
    """Nanoseconds since the epoch from a 32-bit time and its optional ``_extra`` word."""
    if extra is None:
        return seconds * 1_000_000_000
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


def encode_time(ns: int) -> tuple[int, int]:
    """``(32-bit seconds as stored, _extra word)`` for a time in nanoseconds (ext4 encoding)."""
    sec, nsec = divmod(ns, 1_000_000_000)
    if 0 <= sec < 0x80000000:                                   # 1970..2038: the common case
        return sec, nsec << 2
    low = ((sec + 0x80000000) & 0xFFFFFFFF) - 0x80000000      # the signed 32-bit part
    epoch = ((sec - low) >> 32) & 3
    if sec < -0x80000000 or sec >= 0x80000000 * 7:             # outside 1901..2446: clamp
        low, epoch, nsec = (-0x80000000, 0, 0) if sec < 0 else (0x7FFFFFFF, 3, 999_999_999)
    return low, epoch | (nsec << 2)


#: Per count, the ``i_block`` of that many direct blocks in a row (the rest zero).
_DIRECT_RUN = [L.pointers(n, L.I_BLOCK.size) for n in range(L.N_DIRECT + 1)]


def encode_direct_run(first: int, count: int) -> bytes:
    """``i_block`` for ``count`` (at most 12) direct blocks from ``first`` on: a small file."""
    return _DIRECT_RUN[count].pack(*range(first, first + count))


def encode_inode(isize: int, mode: int, uid: int, gid: int, size: int, links: int, blocks: int,
                 i_block: bytes, *, atime_ns: int, ctime_ns: int, mtime_ns: int,
                 crtime_ns: int | None, file_acl: int = 0, generation: int = 0, flags: int = 0,
                 dtime: int = 0, base: bytes | None = None, extra_isize: int = 0) -> bytes:
    """The bytes of an inode: the one encoder (pack, mkfs, create and every inode write).

    With ``base`` (the inode's old bytes) the fields xipfs does not model are kept as they
    were, and the ``_extra`` words written are those ``extra_isize`` covers (the crtime only
    when given); without, the inode is new: zeros around the given fields, and a large inode
    gets i_extra_isize 32 with every time's nanoseconds. A 128-byte inode stores whole seconds.
    """
    a_s, a_x = _encode_time(atime_ns)
    c_s, c_x = _encode_time(ctime_ns)
    m_s, m_x = _encode_time(mtime_ns)
    if base is None:
        cr_s, cr_x = _encode_time(crtime_ns) if crtime_ns is not None else (0, 0)
        return _encode_fresh(isize, mode, uid, gid, size, dtime, links, blocks, flags, i_block,
                             generation, file_acl, a_s, a_x, c_s, c_x, m_s, m_x, cr_s, cr_x)
    raw = bytearray(base)
    _HEAD.pack_into(raw, 0, mode, uid & 0xFFFF, size & 0xFFFFFFFF, a_s, c_s, m_s, dtime,
                    gid & 0xFFFF, links, blocks, flags)
    if S_ISREG(mode):
        _MIDDLE.pack_into(raw, _AT_BLOCK, i_block, generation, file_acl, size >> 32)
    else:                                   # i_size_high is i_dir_acl elsewhere: keep it
        _MIDDLE_NO_SIZE_HIGH.pack_into(raw, _AT_BLOCK, i_block, generation, file_acl)
    _IDS_HIGH.pack_into(raw, _AT_IDS_HIGH, (uid >> 16) & 0xFFFF, (gid >> 16) & 0xFFFF)
    extra = extra_isize
    if extra >= 16:
        _EXTRA_TIMES.pack_into(raw, _AT_EXTRA, extra, c_x, m_x, a_x)
        if extra >= 24 and crtime_ns is not None:
            _CRTIME.pack_into(raw, _AT["i_crtime"], *encode_time(crtime_ns))
    elif extra:                             # a short extra area: only the words it covers
        _EXTRA_ISIZE.pack_into(raw, _AT_EXTRA, extra)
        if extra >= 8:
            _CTIME_EXTRA.pack_into(raw, _AT["i_ctime_extra"], c_x)
        if extra >= 12:
            _MTIME_EXTRA.pack_into(raw, _AT["i_mtime_extra"], m_x)
    return bytes(raw)


def encode_new_inode(isize: int, mode: int, uid: int, gid: int, size: int, blocks: int,
                     i_block: bytes, now_ns: int, generation: int, links: int = 0) -> bytes:
    """:func:`encode_inode` of a brand-new inode, all four times ``now_ns`` (the create fast
    path: one time encoding, one struct call, no decoded object until someone looks)."""
    sec, x = encode_time(now_ns)
    return _encode_fresh(isize, mode, uid, gid, size, 0, links, blocks, 0, i_block, generation, 0,
                         sec, x, sec, x, sec, x, sec, x)


def _encode_fresh(isize: int, mode: int, uid: int, gid: int, size: int, dtime: int, links: int,
                  blocks: int, flags: int, i_block: bytes, generation: int, file_acl: int,
                  a_s: int, a_x: int, c_s: int, c_x: int, m_s: int, m_x: int, cr_s: int,
                  cr_x: int) -> bytes:
    """A new inode's bytes from encoded times, in one struct call (:func:`encode_inode`'s own
    path when there is nothing to keep)."""
    head = (mode, uid & 0xFFFF, size & 0xFFFFFFFF, a_s, c_s, m_s, dtime, gid & 0xFFFF, links, blocks,
            flags, i_block, generation, file_acl, size >> 32 if S_IFMT(mode) == S_IFREG else 0,
            (uid >> 16) & 0xFFFF, (gid >> 16) & 0xFFFF)
    if isize < 160:
        return _FRESH_BASE.pack(*head).ljust(isize, b"\0")
    whole = _FRESH_WHOLE.get(isize)
    if whole is None:
        whole = _FRESH_WHOLE[isize] = _fresh_whole(isize)
    return whole.pack(*head, NEW_EXTRA_ISIZE, c_x, m_x, a_x, cr_s, cr_x)


def _fresh_whole(isize: int) -> struct.Struct:
    """The Struct of a whole new inode of ``isize`` bytes: base, extra fields, zero padding."""
    fields = L.INODE_LARGE.select(*_FRESH_FIELDS, *_FRESH_EXTRA)
    return struct.Struct(fields.format + f"{isize - fields.size}x")


def _encode_time(ns: int) -> tuple[int, int]:
    """:func:`encode_time` with the 1970..2038 case inline (packing calls it four times an inode)."""
    if 0 <= ns < 0x80000000 * 1_000_000_000:
        sec, nsec = divmod(ns, 1_000_000_000)
        return sec, nsec << 2
    return encode_time(ns)


def encode_rdev(major: int, minor: int) -> bytes:
    """``i_block`` of a device node: the old 8-bit encoding in word 0 when it fits, else the
    new one in word 1, as Linux ext2 stores it."""
    words = [0] * L.N_BLOCKS
    if major < 256 and minor < 256:
        words[0] = (major << 8) | minor
    else:
        words[1] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    return L.I_BLOCK.pack(*words)


@functools.lru_cache(maxsize=64)
def _lanes(count: int) -> tuple[int, int]:
    """Two integers of ``count`` 32-bit lanes: every lane 1, and lane i holding i."""
    ones = int.from_bytes(b"\1\0\0\0" * count, "little")
    iota = int.from_bytes(b"".join(i.to_bytes(4, "little") for i in range(count)), "little")
    return ones, iota


def consecutive_pointers(first: int, count: int) -> bytes:
    """Little-endian block pointers ``first, first+1, ...`` (``count`` of them) for an indirect
    block: one multiplication over 32-bit lanes (no lane overflows: block numbers are 32-bit),
    about 4x faster than building an array of ``count`` Python ints."""
    ones, iota = _lanes(count)
    return (first * ones + iota).to_bytes(4 * count, "little")


class Inode:
    """One decoded inode. Cheap to build; the block map is made on first use."""

    __slots__ = (
        "volume", "ino", "mode", "uid", "gid", "size", "links", "blocks", "flags", "file_acl",
        "generation", "dtime", "atime_ns", "mtime_ns", "ctime_ns", "crtime_ns", "i_block",
        "extra_isize", "_map", "_stat", "_dir", "_raw",
    )

    def __init__(self, volume: Volume, ino: int, raw: memoryview | bytes) -> None:
        # Kept only where the inode may be written back (fields xipfs does not model survive).
        self._raw = b"" if volume.readonly else bytes(raw)
        big = volume.isize >= 160
        if big:
            (mode, uid_lo, size_lo, atime, ctime, mtime, dtime, gid_lo, links, blocks, flags, _osd1,
             i_block, generation, file_acl, size_high, _faddr, _blocks_hi, _acl_high, uid_hi,
             gid_hi, _csum, extra, _csum_hi, c_x, m_x, a_x, cr, cr_x, _vh, _pid) = _LARGE_UNPACK(raw, 0)
        else:
            (mode, uid_lo, size_lo, atime, ctime, mtime, dtime, gid_lo, links, blocks, flags, _osd1,
             i_block, generation, file_acl, size_high, _faddr, _blocks_hi, _acl_high, uid_hi,
             gid_hi, _csum) = _BASE_UNPACK(raw, 0)
            extra = raw[128] | (raw[129] << 8) if volume.isize > 128 else 0
        self.volume = volume
        self.ino = ino
        self.mode = mode
        self.uid = uid_lo | (uid_hi << 16)
        self.gid = gid_lo | (gid_hi << 16)
        # Linux ext2 uses i_size_high only for regular files (it was i_dir_acl elsewhere).
        self.size = size_lo | (size_high << 32) if S_ISREG(mode) else size_lo
        self.links = links
        self.blocks = blocks
        self.flags = flags
        self.file_acl = file_acl
        self.generation = generation
        self.dtime = dtime
        self.i_block = i_block
        self.extra_isize = extra
        self.crtime_ns = None
        self._map: BlockMap | None = None
        self._stat = None
        self._dir = None
        if extra >= 16 and big:                 # the common large inode: every time has _extra
            if extra & 3 or 128 + extra > volume.isize:
                raise CorruptImageError(f"i_extra_isize {extra} invalid", f"inode {ino}")
            self.atime_ns = (atime + ((a_x & 3) << 32)) * 1_000_000_000 + (a_x >> 2)
            self.mtime_ns = (mtime + ((m_x & 3) << 32)) * 1_000_000_000 + (m_x >> 2)
            self.ctime_ns = (ctime + ((c_x & 3) << 32)) * 1_000_000_000 + (c_x >> 2)
            if extra >= 24:
                self.crtime_ns = (cr + ((cr_x & 3) << 32)) * 1_000_000_000 + (cr_x >> 2)
            return
        a_x = m_x = c_x = None
        if extra:
            if extra & 3 or 128 + extra > volume.isize:
                raise CorruptImageError(f"i_extra_isize {extra} invalid", f"inode {ino}")
            x = _EXTRA_UNPACK(bytes(raw[128:128 + extra]).ljust(32, b"\0"), 0)
            c_x = x[2] if extra >= 8 else None
            m_x = x[3] if extra >= 12 else None
            a_x = x[4] if extra >= 16 else None
        self.atime_ns = decode_time(atime, a_x)
        self.mtime_ns = decode_time(mtime, m_x)
        self.ctime_ns = decode_time(ctime, c_x)

    # -- writing ----------------------------------------------------------------------------
    def clip_times(self) -> None:
        """Drop the nanoseconds the inode cannot store (no ``_extra`` time fields)."""
        extra = self.extra_isize
        if extra < 16:
            if extra < 8:
                self.ctime_ns -= self.ctime_ns % 1_000_000_000
            if extra < 12:
                self.mtime_ns -= self.mtime_ns % 1_000_000_000
            self.atime_ns -= self.atime_ns % 1_000_000_000

    def encode(self) -> bytes:
        """The on-disk bytes of this inode, fields this class does not model kept as they were."""
        self.clip_times()
        self._raw = raw = encode_inode(
            len(self._raw), self.mode, self.uid, self.gid, self.size, self.links, self.blocks,
            self.i_block, atime_ns=self.atime_ns, ctime_ns=self.ctime_ns, mtime_ns=self.mtime_ns,
            crtime_ns=self.crtime_ns, file_acl=self.file_acl, generation=self.generation,
            flags=self.flags, dtime=self.dtime, base=self._raw, extra_isize=self.extra_isize)
        return raw

    def reset_map(self) -> None:
        """Forget the cached block map and stat (after the block tree or the size changed)."""
        self._map = None
        self._stat = None

    # -- type -------------------------------------------------------------------------------
    @property
    def is_dir(self) -> bool:
        return S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return S_ISLNK(self.mode)

    @property
    def rdev(self) -> tuple[int, int]:
        """``(major, minor)`` of a character or block device, in either encoding Linux uses."""
        b0, b1 = _I_BLOCK(self.i_block)[:2]
        if b0:
            return (b0 >> 8) & 0xFF, b0 & 0xFF
        return (b1 >> 8) & 0xFFF, (b1 & 0xFF) | ((b1 >> 12) & 0xFFF00)

    def check_format(self) -> None:
        """Refuse an inode whose flags say its i_block is not an ext2 block map."""
        foreign = self.flags & L.FL_FOREIGN_FORMAT
        if foreign:
            names = [n for bit, n in L.FOREIGN_FLAG_NAMES.items() if foreign & bit]
            raise CorruptImageError(
                f"inode flag {', '.join(names)} is not valid on ext2", f"inode {self.ino}")

    @property
    def map(self) -> BlockMap:
        """The block map (created on first use)."""
        m = self._map
        if m is None:
            self.check_format()
            m = self._map = BlockMap(self)
        return m

    def __repr__(self) -> str:
        return f"<Inode {self.ino} mode={_stat.filemode(self.mode)} size={self.size}>"


_I_BLOCK = L.I_BLOCK.unpack
#: Ranges longer than this many indirect blocks' worth are served from the whole file's runs.
_WHOLE_FILE_RUNS_FROM = 4


class BlockMap:
    """File block -> device block for one inode, with runs cached per indirect block.

    The read side hands out runs; the write side (:meth:`assign`, :meth:`truncate`) allocates
    and frees blocks in the order that keeps a killed process's image repairable: a new block
    is filled before it is linked, a freed block is unlinked before it is released.
    """

    __slots__ = ("inode", "volume", "bs", "apb", "nblocks", "direct", "roots", "_runs", "_ptrs",
                 "whole", "_last", "_all", "_all_starts")

    def __init__(self, inode: Inode) -> None:
        vol = inode.volume
        self.inode = inode
        self.volume = vol
        self.bs = vol.bs
        self.apb = vol.bs >> 2
        #: Number of file blocks below i_size: nothing past EOF is ever mapped.
        self.nblocks = -(-inode.size // self.bs)
        words = _I_BLOCK(inode.i_block)
        self.direct = list(words[:L.N_DIRECT])
        self.roots = list(words[L.N_DIRECT:])
        self._runs: dict[tuple[int, int], list[Run]] = {}   # (indirect block, entries) -> runs
        self._ptrs: dict[int, array] = {}       # (double/triple) indirect block -> its entries
        #: Runs of the whole file, once a large range was asked for; dropped on any change.
        self._all: list[Run] | None = None
        self._all_starts: list[int] = []
        self._last = (-1, 0)                    # (file block, device block) last allocated
        #: Device block of the whole file when it is one contiguous run (the common case), else 0.
        self.whole = self._whole_run()

    # -- the address-space step -------------------------------------------------------------
    def bmap(self, lblk: int) -> int:
        """Device block holding file block ``lblk``, or 0 for a hole (or past EOF)."""
        if lblk < 0 or lblk >= self.nblocks:
            return 0
        runs = self.runs(lblk, lblk + 1)
        return runs[0][2] if runs else 0

    def runs(self, first: int, last: int, limit: int | None = None) -> list[Run]:
        """Runs covering file blocks ``[first, last)``, holes included, merged.

        Clipped to EOF, or to ``limit`` blocks when the write path looks past EOF: ext2 files
        have no blocks past EOF, so that part is one hole, found without reading anything.
        """
        out: list[Run] = []
        if limit is not None and limit > self.nblocks:
            last = min(last, limit)
            out = self.runs(first, last) if first < self.nblocks else []
            start = max(first, self.nblocks)
            if start < last:
                _append(out, start, last - start, 0)
            return out
        last = min(last, self.nblocks)
        if first >= last:
            return out
        if self.whole:
            return [(first, last - first, self.whole + first)]
        if last - first > _WHOLE_FILE_RUNS_FROM * self.apb:
            return self._from_all(first, last)
        return self._walk_range(first, last)

    def _from_all(self, first: int, last: int) -> list[Run]:
        """Runs of ``[first, last)`` cut from the cached runs of the whole file (made once, so
        mapping or reading a large file costs its number of runs, not its number of blocks)."""
        runs = self._all
        if runs is None:
            runs = self._all = self._walk_range(0, self.nblocks)
            self._all_starts = [r[0] for r in runs]
        i = bisect.bisect_right(self._all_starts, first) - 1
        out: list[Run] = []
        for lblk, count, pblk in runs[i:]:
            if lblk >= last:
                break
            lo, hi = max(lblk, first), min(lblk + count, last)
            out.append((lo, hi - lo, pblk + (lo - lblk) if pblk else 0))
        return out

    def _walk_range(self, first: int, last: int) -> list[Run]:
        """Runs of ``[first, last)`` (within EOF) from the block map, leaf by leaf."""
        out: list[Run] = []
        end = self.nblocks
        apb = self.apb
        if first < L.N_DIRECT:
            self._leaf_runs(self._direct_runs(end), 0, first, min(last, L.N_DIRECT), out)
        base, span = L.N_DIRECT, apb
        for level, root in enumerate(self.roots, 1):
            if last <= base:
                break
            if first < base + span:
                self._walk(root, level, base, max(first, base), min(last, base + span), out, end)
            base += span
            span *= apb
        if last > base:             # past what the tree can address (a damaged i_size): a hole
            _append(out, max(first, base), last - max(first, base), 0)
        return out

    # -- the write side ---------------------------------------------------------------------
    def assign(self, first: int, last: int, fill: Callable[[int, int, int], None]) -> int:
        """Give every hole in file blocks ``[first, last)`` a block (the seed's ``create``).

        ``fill(file block, count, device block)`` must write the content of each new run
        (zeros, or the caller's data) before it is linked into the file. Returns how many
        blocks from ``first`` on are mapped afterwards: fewer than asked when space ran out.
        The caller writes the inode (its block pointers and i_blocks changed).
        """
        vol = self.volume
        if self.inode.blocks == 0:                       # nothing mapped yet: one hole
            holes = [(first, last - first)]
        else:
            holes = [(lb, n) for lb, n, pb in self.runs(first, last, max(last, self.nblocks)) if not pb]
        for lblk, count in holes:
            while count:
                try:
                    runs = vol.balloc.alloc(self._goal(lblk), count)
                except OSError as err:
                    if err.errno == errno.ENOSPC:
                        return lblk - first
                    raise
                for i, (pblk, n) in enumerate(runs):
                    fill(lblk, n, pblk)
                    done = self._link(lblk, n, pblk)
                    if done < n:                       # out of space for an indirect block
                        vol.balloc.free(pblk + done, n - done)
                        for rest, m in runs[i + 1:]:
                            vol.balloc.free(rest, m)
                        return lblk + done - first
                    lblk += n
                    count -= n
        return last - first

    def truncate(self, keep: int) -> list[tuple[int, int]]:
        """Unlink every block from file block ``keep`` on; returns the runs to free afterwards.

        Indirect blocks that map nothing any more go too. The caller writes the inode (with
        its new size) and then frees the runs, so no block is ever both linked and free.
        """
        freed: list[tuple[int, int]] = []
        for i in range(keep, L.N_DIRECT):
            if self.direct[i]:
                _add_run(freed, self.direct[i], 1)
                self.direct[i] = 0
        base, span = L.N_DIRECT, self.apb
        for level in (1, 2, 3):
            root = self.roots[level - 1]
            if root:
                if keep <= base:
                    self._free_tree(root, level, freed)
                    self.roots[level - 1] = 0
                elif keep < base + span:
                    self._cut(root, level, base, keep, freed)
            base += span
            span *= self.apb
        node = self.inode
        node.i_block = _PACK_I_BLOCK(*self.direct, *self.roots)
        node.blocks = max(0, node.blocks - sum(n for _, n in freed) * (self.bs // 512))  # damaged
        self._runs.clear()
        self._ptrs.clear()
        self._all = None
        return freed

    def resize(self, nblocks: int) -> None:
        """Follow a new i_size (in blocks): cached runs stay, the whole-file shortcut is redone."""
        if nblocks != self.nblocks:
            self.nblocks = nblocks
            self.whole = self._whole_run()
            self._all = None

    # -- internals: reading -----------------------------------------------------------------
    def _whole_run(self) -> int:
        """If every block of a small file is in one contiguous run, its first device block."""
        n = self.nblocks
        if n == 0 or n > L.N_DIRECT:
            return 0
        first = self.direct[0]
        if not first:
            return 0
        for i in range(1, n):
            if self.direct[i] != first + i:
                return 0
        self.volume.check_data_run(first, n, self.inode.ino)
        return first

    def _direct_runs(self, end: int) -> list[Run]:
        n = min(end, L.N_DIRECT)
        runs = self._runs.get((0, n))
        if runs is None:
            runs = self._runs[0, n] = self._scan(self.direct, n)
        return runs

    def _walk(self, ptr: int, level: int, base: int, first: int, last: int, out: list[Run],
              end: int) -> None:
        """Append runs for ``[first, last)`` below indirect block ``ptr`` covering from ``base``."""
        if ptr == 0:
            _append(out, first, last - first, 0)
            return
        if level == 1:
            n = min(self.apb, end - base)
            runs = self._runs.get((ptr, n))
            if runs is None:
                runs = self._runs[ptr, n] = self._scan(self._entries(ptr), n)
            self._leaf_runs(runs, base, first, last, out)
            return
        entries = self._ptrs.get(ptr)
        if entries is None:
            entries = self._ptrs[ptr] = self._entries(ptr)
        child = self.apb ** (level - 1)
        i = (first - base) // child
        start = base + i * child
        while start < last:
            self._walk(entries[i], level - 1, start, max(first, start), min(last, start + child), out, end)
            i += 1
            start += child

    def _entries(self, ptr: int) -> array:
        """The block numbers stored in indirect block ``ptr`` (validated as metadata of the file)."""
        vol = self.volume
        vol.check_data_run(ptr, 1, self.inode.ino, "indirect block")
        entries = array("I")
        entries.frombytes(vol.device.view(ptr * self.bs, self.bs))
        if _SWAP:
            entries.byteswap()
        return entries

    def _scan(self, entries: array | list[int], n: int) -> list[Run]:
        """Runs (offsets relative to the block) of the first ``n`` entries, validated."""
        runs: list[Run] = []
        if n <= 0:
            return runs
        p0 = entries[0]
        k = n
        if p0 and not entries[n - 1]:                 # a block being filled: data, then zeros
            k = -(-len(array("I", entries[:n]).tobytes().rstrip(b"\0")) // 4)
        if p0 and entries[k - 1] == p0 + k - 1 and (
                k < 3 or array("I", entries[:k]) == array("I", range(p0, p0 + k))):
            runs.append((0, k, p0))
            if k < n:
                runs.append((k, n - k, 0))
        else:
            start, expect, first = 0, -1, p0
            for i in range(n):
                p = entries[i]
                if p != expect or (p == 0) != (first == 0):
                    if i:
                        runs.append((start, i - start, first))
                    start, first = i, p
                expect = p + 1 if p else 0
            runs.append((start, n - start, first))
        check = self.volume.check_data_run
        ino = self.inode.ino
        for _, count, pblk in runs:
            if pblk:
                check(pblk, count, ino)
        return runs

    @staticmethod
    def _leaf_runs(runs: list[Run], base: int, first: int, last: int, out: list[Run]) -> None:
        for off, count, pblk in runs:
            lo = base + off
            hi = lo + count
            if hi <= first:
                continue
            if lo >= last:
                break
            a = max(lo, first)
            b = min(hi, last)
            _append(out, a, b - a, pblk + (a - lo) if pblk else 0)
        # entries past the block's last run (beyond EOF) are never mapped

    # -- internals: writing -----------------------------------------------------------------
    def _goal(self, lblk: int) -> int:
        """Where the block for ``lblk`` should go: after its predecessor, else near the inode."""
        last_l, last_p = self._last
        if last_l >= 0 and last_p:
            return last_p + (lblk - last_l)
        if lblk > 0:
            prev = self.runs(lblk - 1, lblk, lblk)
            if prev and prev[0][2]:
                return prev[0][2] + 1
        return self.volume.inode_group_goal(self.inode.ino)

    def _link(self, lblk: int, n: int, pblk: int) -> int:
        """Point file blocks ``[lblk, lblk+n)`` at device blocks ``[pblk, pblk+n)``.

        Returns how many were linked: fewer than ``n`` when no block was left for an indirect
        block (the caller frees the rest; the linked part belongs to the file now).
        """
        vol = self.volume
        k = 0
        try:
            while k < n:
                lb = lblk + k
                if lb < L.N_DIRECT:
                    m = min(n - k, L.N_DIRECT - lb)
                    self.direct[lb:lb + m] = range(pblk + k, pblk + k + m)
                else:
                    try:
                        ind, idx = self._leaf_slot(lb, pblk + k)
                    except OSError as err:
                        if err.errno == errno.ENOSPC:
                            break
                        raise
                    m = min(n - k, self.apb - idx)
                    vol.device.write(consecutive_pointers(pblk + k, m), ind * self.bs + idx * 4)
                k += m
        finally:
            node = self.inode
            node.i_block = _PACK_I_BLOCK(*self.direct, *self.roots)
            node.blocks += k * (self.bs // 512)
            if k:
                self._last = (lblk + k - 1, pblk + k - 1)
            self.whole = 0
            self._runs.clear()
            self._all = None
        return k

    def _leaf_slot(self, lblk: int, near: int) -> tuple[int, int]:
        """``(indirect block, index)`` holding the pointer of ``lblk``, made on the way if missing."""
        apb = self.apb
        rel = lblk - L.N_DIRECT
        if rel < apb:
            level, path = 1, [rel]
        elif rel - apb < apb * apb:
            rel -= apb
            level, path = 2, [rel // apb, rel % apb]
        else:
            rel -= apb + apb * apb
            level, path = 3, [rel // (apb * apb), (rel // apb) % apb, rel % apb]
        block = self.roots[level - 1]
        if not block:
            block = self.roots[level - 1] = self._new_indirect(near)
        for idx in path[:-1]:
            entries = self._ptrs.get(block)
            if entries is None:
                entries = self._ptrs[block] = self._entries(block)
            child = entries[idx]
            if not child:
                child = self._new_indirect(near)
                self.volume.device.write(child.to_bytes(4, "little"), block * self.bs + idx * 4)
                entries[idx] = child
            block = child
        return block, path[-1]

    def _new_indirect(self, near: int) -> int:
        """A zeroed block for indirect pointers, from the top of the data's group."""
        vol = self.volume
        blk = vol.balloc.alloc_meta(near)
        vol.device.write_new(bytes(self.bs), blk * self.bs)
        self.inode.blocks += self.bs // 512
        return blk

    def _free_tree(self, ptr: int, level: int, freed: list[tuple[int, int]]) -> None:
        """Collect indirect block ``ptr`` and everything below it."""
        entries = self._entries(ptr)
        if level == 1:
            for _, count, pblk in self._scan(entries, self.apb):
                if pblk:
                    _add_run(freed, pblk, count)
        else:
            for child in entries:
                if child:
                    self._free_tree(child, level - 1, freed)
        _add_run(freed, ptr, 1)

    def _cut(self, ptr: int, level: int, base: int, keep: int, freed: list[tuple[int, int]]) -> None:
        """Unlink everything below indirect block ``ptr`` from file block ``keep`` on."""
        entries = self._entries(ptr)
        child_span = self.apb ** (level - 1)
        first = (keep - base) // child_span
        changed = False
        for i in range(first, self.apb):
            child = entries[i]
            if not child:
                continue
            cbase = base + i * child_span
            if level == 1 or keep <= cbase:
                if level == 1:
                    _add_run(freed, child, 1)
                else:
                    self._free_tree(child, level - 1, freed)
                entries[i] = 0
                changed = True
            else:
                self._cut(child, level - 1, cbase, keep, freed)
        if changed:
            out = array("I", entries)
            if _SWAP:
                out.byteswap()
            self.volume.device.write(out.tobytes(), ptr * self.bs)


_PACK_I_BLOCK = L.I_BLOCK.pack


def _add_run(runs: list[tuple[int, int]], pblk: int, n: int) -> None:
    if runs and runs[-1][0] + runs[-1][1] == pblk:
        runs[-1] = (runs[-1][0], runs[-1][1] + n)
    else:
        runs.append((pblk, n))


def _append(out: list[Run], lblk: int, count: int, pblk: int) -> None:
    """Append a run, merging it with the previous one when they continue each other."""
    if out:
        plb, pcount, ppb = out[-1]
        if plb + pcount == lblk and ((ppb == 0 and pblk == 0) or (ppb and pblk == ppb + pcount)):
            out[-1] = (plb, pcount + count, ppb)
            return
    out.append((lblk, count, pblk))
