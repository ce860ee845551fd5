"""Inodes and their block maps: the address-space step (the seed's ``get_xip_mem``).

An :class:`Inode` is the decoded on-disk inode. Its :class:`BlockMap` turns file blocks into
device blocks through the 12 direct pointers and the single, double and triple indirect blocks,
and hands out *runs*: ``(file block, count, device block)`` with device block 0 for a hole. Runs
of an indirect block are computed once and cached, so a large read is a handful of copies.
"""

from __future__ import annotations

import stat as _stat
import struct
import sys
from array import array
from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L

if TYPE_CHECKING:
    from .volume import Volume

_SWAP = sys.byteorder != "little"
_INODE_UNPACK = L.INODE.struct.unpack_from
_EXTRA_UNPACK = L.INODE_EXTRA.struct.unpack_from

#: A run: (first file block, number of blocks, first device block or 0 for a hole).
Run = tuple[int, int, int]


def decode_time(seconds: int, extra: int | None) -> int:
    """Nanoseconds since the epoch from a 32-bit time and its optional ``_extra`` word."""
    if extra is None:
        return seconds * 1_000_000_000
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


class Inode:
    """One decoded inode. Cheap to build; the block map is made on first use."""

    __slots__ = (
        "volume", "ino", "mode", "uid", "gid", "size", "links", "blocks", "flags", "file_acl",
        "generation", "dtime", "atime_ns", "mtime_ns", "ctime_ns", "crtime_ns", "i_block",
        "extra_isize", "_map", "_stat", "_dir",
    )

    def __init__(self, volume: Volume, ino: int, raw: memoryview | bytes) -> None:
        v = _INODE_UNPACK(raw, 0)
        (mode, uid_lo, size_lo, atime, ctime, mtime, dtime, gid_lo, links, blocks, flags, _osd1,
         i_block, generation, file_acl, size_high, _faddr, _blocks_hi, _acl_high, uid_hi,
         gid_hi, _csum, _pad) = v
        self.volume = volume
        self.ino = ino
        self.mode = mode
        self.uid = uid_lo | (uid_hi << 16)
        self.gid = gid_lo | (gid_hi << 16)
        # Linux ext2 uses i_size_high only for regular files (it was i_dir_acl elsewhere).
        self.size = size_lo | (size_high << 32) if (mode & 0o170000) == 0o100000 else size_lo
        self.links = links
        self.blocks = blocks
        self.flags = flags
        self.file_acl = file_acl
        self.generation = generation
        self.dtime = dtime
        self.i_block = i_block
        self.extra_isize = 0
        a_x = m_x = c_x = None
        self.crtime_ns = None
        isize = volume.sb.inode_size
        if isize > 128 and len(raw) >= 132:
            extra = raw[128] | (raw[129] << 8)
            if extra:
                if extra & 3 or 128 + extra > isize:
                    raise CorruptImageError(f"i_extra_isize {extra} invalid", f"inode {ino}")
                self.extra_isize = extra
                padded = bytes(raw[128:160]) if extra < 32 else raw
                x = _EXTRA_UNPACK(padded, 0 if extra < 32 else 128)
                c_x = x[2] if extra >= 8 else None
                m_x = x[3] if extra >= 12 else None
                a_x = x[4] if extra >= 16 else None
                if extra >= 24:
                    self.crtime_ns = decode_time(x[5], x[6])
        self.atime_ns = decode_time(atime, a_x)
        self.mtime_ns = decode_time(mtime, m_x)
        self.ctime_ns = decode_time(ctime, c_x)
        self._map: BlockMap | None = None
        self._stat = None
        self._dir = None

    # -- type -------------------------------------------------------------------------------
    @property
    def is_dir(self) -> bool:
        return (self.mode & 0o170000) == 0o040000

    @property
    def is_reg(self) -> bool:
        return (self.mode & 0o170000) == 0o100000

    @property
    def is_symlink(self) -> bool:
        return (self.mode & 0o170000) == 0o120000

    @property
    def in_use(self) -> bool:
        """False for a deleted or never-used inode (Linux ``ext2_iget``'s stale test)."""
        return not (self.links == 0 and (self.mode == 0 or self.dtime != 0))

    def pointers(self) -> tuple[int, ...]:
        """The 15 ``i_block`` words."""
        return _I_BLOCK(self.i_block)

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


_I_BLOCK = struct.Struct("<15I").unpack


class BlockMap:
    """File block -> device block for one inode, with runs cached per indirect block."""

    __slots__ = ("inode", "volume", "bs", "apb", "nblocks", "direct", "roots", "_runs", "_ptrs",
                 "whole")

    def __init__(self, inode: Inode) -> None:
        vol = inode.volume
        self.inode = inode
        self.volume = vol
        self.bs = vol.sb.block_size
        self.apb = vol.sb.addr_per_block
        #: Number of file blocks below i_size: nothing past EOF is ever mapped.
        self.nblocks = -(-inode.size // self.bs)
        words = _I_BLOCK(inode.i_block)
        self.direct = words[:L.N_DIRECT]
        self.roots = words[L.N_DIRECT:]
        self._runs: dict[int, list[Run]] = {}   # indirect block -> runs of its entries
        self._ptrs: dict[int, array] = {}       # (double/triple) indirect block -> its entries
        #: Device block of the whole file when it is one contiguous run (the common case), else 0.
        self.whole = self._whole_run()

    # -- the address-space step -------------------------------------------------------------
    def bmap(self, lblk: int) -> int:
        """Device block holding file block ``lblk``, or 0 for a hole (or past EOF)."""
        if lblk < 0 or lblk >= self.nblocks:
            return 0
        runs = self.runs(lblk, lblk + 1)
        return runs[0][2] if runs else 0

    def runs(self, first: int, last: int) -> list[Run]:
        """Runs covering file blocks ``[first, last)`` (clipped to EOF), holes included, merged."""
        last = min(last, self.nblocks)
        out: list[Run] = []
        if first >= last:
            return out
        if self.whole:
            return [(first, last - first, self.whole + first)]
        apb = self.apb
        if first < L.N_DIRECT:
            self._leaf_runs(self._direct_runs(), 0, first, min(last, L.N_DIRECT), out)
        base, span = L.N_DIRECT, apb
        for level, root in enumerate(self.roots, 1):
            if last <= base:
                break
            if first < base + span:
                self._walk(root, level, base, max(first, base), min(last, base + span), out)
            base += span
            span *= apb
        return out

    # -- internals ----------------------------------------------------------------------------
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

    def _direct_runs(self) -> list[Run]:
        runs = self._runs.get(-1)
        if runs is None:
            runs = self._runs[-1] = self._scan(self.direct, min(self.nblocks, L.N_DIRECT))
        return runs

    def _walk(self, ptr: int, level: int, base: int, first: int, last: int, out: list[Run]) -> None:
        """Append runs for ``[first, last)`` below indirect block ``ptr`` covering from ``base``."""
        if ptr == 0:
            _append(out, first, last - first, 0)
            return
        if level == 1:
            runs = self._runs.get(ptr)
            if runs is None:
                entries = self._entries(ptr)
                runs = self._runs[ptr] = self._scan(entries, min(self.apb, self.nblocks - base))
            self._leaf_runs(runs, base, first, last, out)
            return
        entries = self._ptrs.get(ptr)
        if entries is None:
            entries = self._ptrs[ptr] = self._entries(ptr)
        child = self.apb ** (level - 1)
        i = (first - base) // child
        start = base + i * child
        while start < last:
            self._walk(entries[i], level - 1, start, max(first, start), min(last, start + child), out)
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

    def _scan(self, entries: array | tuple[int, ...], n: int) -> list[Run]:
        """Runs (offsets relative to the block) of the first ``n`` entries, validated."""
        runs: list[Run] = []
        if n <= 0:
            return runs
        p0 = entries[0]
        if p0 and entries[n - 1] == p0 + n - 1 and (
                n < 3 or array("I", entries[:n]) == array("I", range(p0, p0 + n))):
            runs.append((0, n, p0))
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


def _append(out: list[Run], lblk: int, count: int, pblk: int) -> None:
    """Append a run, merging it with the previous one when they continue each other."""
    if out:
        plb, pcount, ppb = out[-1]
        if plb + pcount == lblk and ((ppb == 0 and pblk == 0) or (ppb and pblk == ppb + pcount)):
            out[-1] = (plb, pcount + count, ppb)
            return
    out.append((lblk, count, pblk))
