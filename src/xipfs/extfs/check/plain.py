"""Pass 1's whole-piece check of plain regular files: no per-inode Python work for most files.

A *plain* file is a regular file in use whose every field pass 1 reads says "nothing to see":
no xattrs (block or in-inode), no odd flag or field, and either a block map of direct blocks
without holes (ext2, and ext4 files without extents) or an extent root in the inode holding at
most one extent that starts the file (ext4); its ``i_blocks`` and ``i_size`` agree with its
blocks. For such a file pass 1 has nothing to report, only blocks to claim. Which inodes of a
piece are plain is decided with whole-column operations (a strided slice of one byte of every
inode, ``translate``, big-integer masks, C-level ``map``/``compress`` over ``memoryview``
columns); their blocks are claimed in bulk. Every other inode in use goes through
:func:`.pass1.scan_used` as before, so this only decides *who is checked where*, never *what*
is a problem: an inode in doubt is simply not plain.
"""

from __future__ import annotations

import sys
from array import array
from itertools import compress, repeat
from operator import add, lt, mul, ne, sub

from .. import layout as L
from .context import NONZERO, Context
from .walk import is_run
from .xattrs import XATTR_MAGIC

_SIZE_AT = L.INODE.offsets["i_size"]
_BLOCKS_AT = L.INODE.offsets["i_blocks"]
_FLAGS_AT = L.INODE.offsets["i_flags"]
_BLOCK_AT = L.INODE.offsets["i_block"]
_ACL_AT = L.INODE.offsets["i_file_acl"]
_SIZE_HIGH_AT = L.INODE.offsets["i_size_high"]
_FADDR_AT = L.INODE.offsets["i_faddr"]
#: i_blocks_hi and i_file_acl_high, the two 16-bit fields after i_faddr
_HIGHS_AT = L.INODE.offsets["i_blocks_hi"]
_EXTRA_AT = L.INODE.size
#: the low byte of each extra time field whose epoch bits pass 1 looks at
_EXTRA_TIMES_AT = tuple(L.INODE_LARGE.offsets[k] for k in ("i_ctime_extra", "i_mtime_extra",
                                                          "i_atime_extra", "i_crtime_extra"))
#: flags that send a regular file to the per-inode checks (extents are looked at apart where
#: the filesystem has them; elsewhere the flag itself is pass 1's problem)
_REJECT_FLAGS = L.FL_IMAGIC | L.FL_INLINE_DATA | L.FL_EA_INODE | L.FL_INDEX
_EXT_MAGIC = 0xF30A
_IS_REG = bytes([b == L.FT_REG for b in range(256)])
_ONE = bytes([b == 1 for b in range(256)])
_ABOVE_ONE = bytes([b > 1 for b in range(256)])
_HIGH_BIT = bytes([b >= 0x80 for b in range(256)])
_ANY_BITS: dict[int, bytes] = {}
_NOT: dict[int, bytes] = {}


def any_bits(mask: int) -> bytes:
    """The ``translate`` table: byte -> 1 when it has any bit of ``mask``."""
    t = _ANY_BITS.get(mask)
    if t is None:
        t = _ANY_BITS[mask] = bytes([b & mask != 0 for b in range(256)])
    return t


def differs(value: int) -> bytes:
    """The ``translate`` table: byte -> 1 when it is not ``value``."""
    t = _NOT.get(value)
    if t is None:
        t = _NOT[value] = bytes([b != value for b in range(256)])
    return t


class Columns:
    """The records ``[lo, hi)`` of a piece of inode table, read a column (one byte, or one
    aligned 16- or 32-bit field, of every record) at a time; masks are ints, byte ``i`` for
    record ``lo + i``."""

    __slots__ = ("table", "isize", "m", "start", "stop", "ones")

    def __init__(self, table: bytearray, isize: int, lo: int, hi: int) -> None:
        self.table = table
        self.isize = isize
        self.m = hi - lo
        self.start, self.stop = lo * isize, hi * isize
        #: every record
        self.ones = int.from_bytes(b"\1" * self.m, "little")

    def byte(self, at: int) -> bytearray:
        """Byte ``at`` of every record."""
        return self.table[self.start + at:self.stop:self.isize]

    def mask(self, at: int, tab: bytes) -> int:
        """Byte ``at`` of every record through ``tab`` (a 0/1 ``translate`` table), as a mask."""
        return int.from_bytes(self.byte(at).translate(tab), "little")

    def nonzero(self, at: int, size: int) -> int:
        """The records whose ``size`` bytes at ``at`` are not all zero."""
        out = 0
        for k in range(at, at + size):
            out |= int.from_bytes(self.byte(k).translate(NONZERO), "little")
        return out

    def equals(self, at: int, value: int, size: int) -> int:
        """The records whose little-endian ``size``-byte field at ``at`` is ``value``."""
        out = 0
        for k in range(size):
            out |= self.mask(at + k, differs(value >> 8 * k & 0xFF))
        return self.ones & ~out

    def words(self, at: int, code: str) -> memoryview:
        """The aligned field at ``at`` of every record, as a memoryview of ``code`` ("H", "I")."""
        width = 2 if code == "H" else 4
        step = self.isize // width
        return memoryview(self.table).cast(code)[(self.start + at) // width:self.stop // width:step]

    def to_bytes(self, mask: int) -> bytes:
        """A mask as a 0/1 byte per record."""
        return mask.to_bytes(self.m, "little")


def plain_files(c: Context, table: bytearray, used: bytearray | bytes, types: bytes) -> bytes:
    """Check the plain regular files among the inodes in use of a piece (``used``, ``types``:
    a byte per inode) and claim their blocks; a 0/1 byte per inode, 1 for those done here."""
    n = len(used)
    lo = used.find(1)
    if lo < 0 or c.ratio != 1 or sys.byteorder != "little" or c.isize & 3:
        return bytes(n)
    hi = used.rfind(1) + 1
    col = Columns(table, c.isize, lo, hi)
    cand = int.from_bytes(bytes(types[lo:hi]).translate(_IS_REG), "little") & \
        int.from_bytes(bytes(used[lo:hi]), "little")
    if not cand:
        return bytes(n)
    cand &= ~(col.nonzero(_ACL_AT, 4) | col.nonzero(_SIZE_HIGH_AT, 4) | col.nonzero(_FADDR_AT, 8))
    reject = _REJECT_FLAGS | (0 if c.extents else L.FL_EXTENTS)   # extents without the feature: pass 1
    for k in range(4):
        fl = reject >> 8 * k & 0xFF
        if fl:
            cand &= ~col.mask(_FLAGS_AT + k, any_bits(fl))
    if c.isize > 128:
        cand &= in_inode_plain(col)
    if not cand:
        return bytes(n)
    extents = col.mask(_FLAGS_AT + 2, any_bits(L.FL_EXTENTS >> 16)) if c.extents else 0
    done = 0
    if cand & ~extents:
        done |= block_mapped(c, col, cand & ~extents)
    if cand & extents:
        done |= one_extent(c, col, cand & extents)
    out = bytearray(n)
    out[lo:hi] = col.to_bytes(done)
    return bytes(out)


def in_inode_plain(col: Columns) -> int:
    """Large inodes: those whose ``i_extra_isize`` is the first record's (the first in use, as
    pass 1 picks it), with no xattrs in the inode and no epoch bits in the extra time fields."""
    table = col.table
    at = col.start + _EXTRA_AT
    extra = table[at] | table[at + 1] << 8
    if not (24 <= extra < col.isize - 128 - 4 and not extra & 3):
        return 0
    ok = col.equals(_EXTRA_AT, extra, 2)
    ok &= ~col.equals(_EXTRA_AT + extra, XATTR_MAGIC, 4)
    for at in _EXTRA_TIMES_AT:
        ok &= ~col.mask(at, any_bits(3))
    return ok


def block_mapped(c: Context, col: Columns, cand: int) -> int:
    """Plain files with a block map and no hole: direct blocks only, or twelve direct blocks and
    one indirect block mapping a contiguous run; ``i_blocks`` and ``i_size`` right. Claims their
    blocks; the mask of those done."""
    sectors = c.bs // 512
    if 12 * sectors > 255:
        return 0
    nz = [col.nonzero(_BLOCK_AT + 4 * k, 4) for k in range(L.N_DIRECT)]
    for k in range(L.N_DIRECT - 1):
        cand &= ~(nz[k + 1] & ~nz[k])                    # a hole before a block
    cand &= ~col.nonzero(_BLOCK_AT + 4 * (L.N_DIRECT + 1), 8)   # double or triple indirect
    ind = col.nonzero(_BLOCK_AT + 4 * L.N_DIRECT, 4)
    ok = direct_only(c, col, cand & ~ind, nz, sectors)
    full = cand & ind & nz[-1]                           # twelve direct blocks and an indirect one
    if not (ok or full):
        return 0
    claims, runs = c.claims, c.runs
    before, runs_before = len(claims), len(runs)
    done, blocks = one_indirect(c, col, full) if full else (0, [])
    ok |= done
    claim_direct(col, nz, ok, claims)
    if len(claims) > before and max(claims[before:]) >= c.nblocks:   # a block past the end: in doubt
        del claims[before:], runs[runs_before:]
        return 0
    claims.extend(blocks)
    return ok


def direct_only(c: Context, col: Columns, cand: int, nz: list[int], sectors: int) -> int:
    """Those of ``cand`` whose ``i_blocks`` and ``i_size`` agree with their direct blocks."""
    if not cand:
        return 0
    count = col.to_bytes(sum(nz))                        # direct blocks of each record (<= 12)
    # i_blocks: its low byte is count * sectors, the others zero
    expect = count.translate(bytes([min(k * sectors, 255) for k in range(256)]))
    diff = int.from_bytes(col.byte(_BLOCKS_AT), "little") ^ int.from_bytes(expect, "little")
    cand &= ~int.from_bytes(col.to_bytes(diff).translate(NONZERO), "little")
    cand &= ~col.nonzero(_BLOCKS_AT + 1, 3)
    # i_size (its high word is zero): not below the start of the last block
    low = tuple(max(k - 1, 0) * c.bs for k in range(256))
    with col.words(_SIZE_AT, "I") as sizes:
        cand &= ~int.from_bytes(bytes(map(lt, sizes, map(low.__getitem__, count))), "little")
    return cand


def claim_direct(col: Columns, nz: list[int], which: int, claims: array) -> None:
    """Claim the direct blocks of the records in ``which``."""
    for k in range(L.N_DIRECT):
        sel = nz[k] & which
        if sel:
            with col.words(_BLOCK_AT + 4 * k, "I") as ptrs:
                claims.extend(compress(ptrs, col.to_bytes(sel)))


def one_indirect(c: Context, col: Columns, full: int) -> tuple[int, list[int]]:
    """Those of ``full`` (twelve direct blocks and an indirect one) whose indirect block maps one
    contiguous run of as many blocks as ``i_blocks`` says, and whose ``i_size`` reaches its last
    block (one read and one comparison each): their mask, and their indirect blocks to claim
    (their runs are claimed here; the caller takes them back if a direct block is illegal)."""
    sectors, bs, apb = c.bs // 512, c.bs, c.apb
    meta, fdb, nblocks = c.meta, c.fdb, c.nblocks
    block, runs = c.block, c.runs
    claims: list[int] = []
    done = bytearray(col.m)
    with col.words(_BLOCK_AT + 4 * L.N_DIRECT, "I") as inds, col.words(_BLOCKS_AT, "I") as iblocks, \
            col.words(_SIZE_AT, "I") as sizes:
        for r in compress(range(col.m), col.to_bytes(full)):
            b, ib = inds[r], iblocks[r]
            k = ib // sectors - L.N_DIRECT - 1             # the run i_blocks implies
            if not fdb <= b < nblocks or meta[b] or ib % sectors or not 0 < k <= apb \
                    or sizes[r] < (L.N_DIRECT - 1 + k) * bs:
                continue
            raw = bytes(block(b))
            a = int.from_bytes(raw[:4], "little")
            if not fdb <= a or not a or not is_run(c, raw, a, k):
                continue
            claims.append(b)
            runs.append((a, k))
            done[r] = 1
    return int.from_bytes(done, "little"), claims


def one_extent(c: Context, col: Columns, cand: int) -> int:
    """Plain ext4 files: an extent root in the inode (depth 0, room for 4) holding no extent, or
    one initialized extent from file block 0 inside the filesystem; ``i_blocks`` and ``i_size``
    right. Claims their runs; the mask of those done."""
    ok = cand & col.equals(_BLOCK_AT, _EXT_MAGIC, 2) & col.equals(_BLOCK_AT + 3, 0, 1) \
        & col.equals(_BLOCK_AT + 4, 4, 4)                # eh_max 4, eh_depth 0
    ok &= ~col.mask(_BLOCK_AT + 2, _ABOVE_ONE)           # eh_entries 0 or 1
    one = col.mask(_BLOCK_AT + 2, _ONE)
    entry = _BLOCK_AT + 12
    # the one extent: ee_block 0, ee_start_hi 0, ee_len 1..32767 (initialized)
    ok &= ~(one & (col.nonzero(entry, 4) | col.nonzero(entry + 6, 2) | col.mask(entry + 5, _HIGH_BIT)
                   | ~col.nonzero(entry + 4, 2)))
    if not ok:
        return 0
    entries = col.to_bytes(one)
    sectors, bs = c.bs // 512, c.bs
    with col.words(entry + 4, "H") as raw_lens:
        lens = list(map(mul, raw_lens, entries))        # 0 for an empty root
    with col.words(_BLOCKS_AT, "I") as iblocks:
        ok &= ~int.from_bytes(bytes(map(ne, iblocks, map(mul, lens, repeat(sectors)))), "little")
    with col.words(_SIZE_AT, "I") as sizes:
        lows = map(mul, map(sub, lens, repeat(1)), repeat(bs))
        ok &= ~int.from_bytes(bytes(map(lt, sizes, lows)), "little")
    if not ok:
        return 0
    sel = col.to_bytes(ok & one)
    with col.words(entry + 8, "I") as starts:
        pblks = list(compress(starts, sel))
    counts = list(compress(lens, sel))
    if pblks and (min(pblks) <= c.fdb or max(map(add, pblks, counts)) > c.nblocks):
        return 0                                         # an extent outside the filesystem: in doubt
    c.runs.extend(zip(pblks, counts, strict=True))
    return ok
