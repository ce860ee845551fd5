"""The walk over an inode's indirect block map, as pass 1 makes it (e2fsck's check_blocks with
process_block): every legal block found, illegal ones and loops reported, contiguous runs of
blocks recognised whole.

Unlike the read path's :class:`~xipfs.extfs.indirect.BlockMap`, the walk trusts nothing: a pointer
outside the filesystem is noted and skipped, indirect blocks are followed only to their fixed
depth, and the blocks one inode may claim are capped, so a looping map ends as a problem.
"""

from __future__ import annotations

import functools
import sys
from array import array
from typing import Any

from .. import layout as L
from . import problems as P
from .context import Context, ranges, u32

#: What a walk does with the blocks it finds (see :class:`Walk`).
CLAIM, COUNT, COLLECT = 0, 1, 2
#: Blocks per piece of the table of contiguous runs (see :func:`run_table`): small, so that the
#: first piece (made at each check, by a loop in C over its numbers) costs little.
RUN_CHUNK = 1 << 13


def _quiet(*_args: Any, **_kw: Any) -> None:
    """The report of a walk that only collects blocks (pass 1b: pass 1 reported already)."""


class Walk:
    """The walk over one inode's block map.

    ``mode`` says what becomes of the legal blocks found: ``CLAIM`` adds them to the context's
    claims (single blocks) and runs (contiguous ranges), ``COUNT`` only counts them, ``COLLECT``
    lists them in ``blocks``. After the walk: ``count`` legal blocks (data and indirect), ``last``
    the last logical block mapped, ``pairs`` the ``(logical, physical)`` data blocks of a directory
    or symlink.
    """

    __slots__ = ("c", "ino", "ft", "report", "claims", "runs", "blocks", "count", "last", "pairs",
                 "illegal", "stopped", "dir_max")

    def __init__(self, c: Context, ino: int, ft: int, mode: int) -> None:
        self.c = c
        self.ino = ino
        self.ft = ft
        self.report = c.report if mode != COLLECT else _quiet
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
            self.report(P.SYMLINK_TOO_BIG, self.ino, pblk, lblk=lblk)
            return
        if self.ft == L.FT_DIR and lblk > self.dir_max:
            self.report(P.DIR_TOO_BIG, self.ino, pblk, lblk=lblk)
            return
        self.take(pblk)
        self.last = lblk
        if self.pairs is not None:
            self.pairs.append((lblk, pblk))

    def direct(self, entries: tuple[int, ...]) -> None:
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
            a, k = leaf_run(c, raw)
            if k:
                self.count += k
                self.last = lstart + k - 1
                if self.runs is not None:
                    self.runs.append((a, k))
                elif self.blocks is not None:
                    self.blocks.extend(range(a, a + k))
                return
        if self.pairs is None and self.count_legal(raw, lstart):
            return
        for i, b in enumerate(c.unpack_map(raw)):
            if b:
                self.data_block(lstart + i, b)

    def count_legal(self, raw: bytes, lstart: int) -> bool:
        """A leaf of a regular file whose blocks are all legal, taken whole (no loop per
        block); False (nothing done) when one is not."""
        c = self.c
        blocks = list(filter(None, c.unpack_map(raw)))
        if not blocks or min(blocks) < c.fdb or max(blocks) >= c.nblocks:
            return False
        self.count += len(blocks)
        last = len(blocks) - 1                # the blocks are first, the zeros after: most leaves
        if not raw.endswith(bytes(len(raw) - 4 * len(blocks))):
            words = c.unpack_map(raw)
            last = len(words) - 1
            while not words[last]:
                last -= 1
        self.last = lstart + last
        if self.claims is not None:
            self.claims.extend(blocks)
        elif self.blocks is not None:
            self.blocks.extend(blocks)
        return True

    def indirect(self, blk: int, level: int, lstart: int) -> None:
        """An indirect block of ``level`` (1 single, 2 double, 3 triple) mapping from ``lstart``."""
        c = self.c
        if blk >= c.nblocks or blk < c.fdb:
            self.illegal.append(blk)
            return
        if self.ino != L.RESIZE_INO and c.meta[blk]:
            self.report(P.INDIRECT_ON_METADATA, self.ino, blk)
        if self.count >= c.nblocks or len(c.claims) > c.claim_budget:
            self.report(P.TOO_MANY_BLOCKS, self.ino, blk)
            self.stopped = True
            return
        self.take(blk)
        if level == 1:
            self.leaf(c.block(blk), lstart)
            return
        span = c.apb ** (level - 1)
        for i, b in enumerate(c.unpack_map(c.block(blk))):
            if b:
                self.indirect(b, level - 1, lstart + i * span)
                if self.stopped:
                    return

    def finish(self) -> None:
        if self.illegal:
            self.report(P.BAD_BLOCKS, self.ino, self.illegal[0], blocks=ranges(sorted(set(self.illegal))))


def walk(c: Context, ino: int, blk: tuple[int, ...], ft: int, mode: int = CLAIM) -> Walk:
    """Follow inode ``ino``'s block map ``blk`` (its 15 ``i_block`` pointers; ``mode``: see
    :class:`Walk`); the walk done. Illegal blocks and indirect blocks on metadata are reported.
    """
    w = Walk(c, ino, ft, mode)
    direct = blk[:L.N_DIRECT]
    if w.pairs is None and 0 not in direct and max(direct) < c.nblocks:
        w.count = L.N_DIRECT
        w.last = L.N_DIRECT - 1
        if w.claims is not None:
            w.claims.extend(direct)
        elif w.blocks is not None:
            w.blocks.extend(direct)
    else:
        w.direct(direct)
    apb = c.apb
    starts = (L.N_DIRECT, L.N_DIRECT + apb, L.N_DIRECT + apb + apb * apb)
    for level in range(3):
        b = blk[L.IND_BLOCK + level]
        if b and not w.stopped:
            w.indirect(b, level + 1, starts[level])
    w.finish()
    return w


@functools.lru_cache(maxsize=4)
def _run_base(n: int) -> tuple[int, int]:
    """The words ``0, 1, ..., n-1`` and ``1, 1, ..., 1`` as little-endian integers: adding a
    multiple of the second to the first gives the words of any run of n consecutive numbers."""
    words = array("I", range(n))
    if sys.byteorder != "little":
        words.byteswap()
    return int.from_bytes(words.tobytes(), "little"), int.from_bytes(b"\1\0\0\0" * n, "little")


def run_table(c: Context, a: int) -> tuple[bytes, int]:
    """The table of consecutive block numbers holding ``a``, and where ``a`` is in it (in words):
    tables of ``RUN_CHUNK + apb`` words, each the first one plus a constant (one big-integer sum),
    made on demand; ``(b"", 0)`` past the largest block number."""
    chunk, off = divmod(a, RUN_CHUNK)
    table = c.run_chunks.get(chunk)
    if table is None:
        n = RUN_CHUNK + c.apb
        base, ones = _run_base(n)
        start = chunk * RUN_CHUNK
        if start + n >= 1 << 32:
            return b"", 0                    # past the largest block number: no run here
        table = (base + start * ones).to_bytes(4 * n, "little")
        c.run_chunks[chunk] = table
    return table, off


def leaf_run(c: Context, raw: bytes, want: int = 0) -> tuple[int, int]:
    """``(a, k)`` when the block map ``raw`` holds exactly the run ``a .. a+k-1`` of legal
    blocks followed by zeros; ``(0, 0)`` otherwise (the caller walks it entry by entry).

    Compared in place with the table of consecutive numbers (``memcmp``), for ``want`` numbers
    first when the caller knows how many to expect (from ``i_blocks``; else a full block), and
    only when that fails after a search for the first zero word.
    """
    a = u32(raw, 0)
    if not a or a < c.fdb:
        return 0, 0
    n = len(raw) >> 2
    k = want if 0 < want <= n else n
    if not is_run(c, raw, a, k):
        z = first_zero_word(raw)
        if z == k or not is_run(c, raw, a, z):
            return 0, 0
        k = z
    return a, k


def is_run(c: Context, raw: bytes, a: int, k: int) -> bool:
    """Whether ``raw`` is the ``k`` legal numbers ``a, a+1, ...`` then zeros."""
    if not k or a + k > c.nblocks:
        return False
    table, off = run_table(c, a)
    if 4 * k == len(raw):
        return table.startswith(raw, 4 * off)
    return table.startswith(raw[:4 * k], 4 * off) and raw.endswith(bytes(len(raw) - 4 * k))


def first_zero_word(raw: bytes) -> int:
    """The index of the first 32-bit word of ``raw`` that is zero (its length in words if none)."""
    p = raw.find(b"\0\0\0\0")
    while p & 3 and p >= 0:                   # four zero bytes across two words: look further
        p = raw.find(b"\0\0\0\0", (p | 3) + 1)
    return len(raw) >> 2 if p < 0 else p >> 2
