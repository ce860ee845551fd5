"""The indirect block map of ext2 (and of ext4 files without extents): ``i_block`` holds 12
direct pointers and the roots of a single, a double and a triple indirect tree.

:class:`BlockMap` is this scheme behind the seam of :mod:`.bmap` (Linux's
``ext4_ind_map_blocks``): runs for reads, cached per indirect block; ``assign`` and
``truncate`` for writes, ordered so that a killed writer leaves an image e2fsck repairs;
:func:`build_tree` encodes a whole map at once (pack). The check walks the same tree its own
way (:mod:`.check.walk`): it must go on past every bad pointer and report it, where a reader
stops at the first.
"""

from __future__ import annotations

import bisect
import errno
import functools
import sys
from array import array
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from . import layout as L

if TYPE_CHECKING:
    from ..device import Device
    from .bmap import Run
    from .inode import Inode

_SWAP = sys.byteorder != "little"
_I_BLOCK = L.I_BLOCK.unpack
#: Ranges longer than this many indirect blocks' worth are served from the whole file's runs.
_WHOLE_FILE_RUNS_FROM = 4



#: The unit of a huge-page mapping (x86-64's PMD): runs of a file aligned to it, in the file and
#: in the image, can be mapped by Linux's DAX (and by a huge-page tmpfs) one 2 MiB page at a time.
HUGE_PAGE = 2 << 20


def huge_align(vol: object, lblk: int) -> int:
    """Blocks per 2 MiB when file block ``lblk`` starts a 2 MiB piece of the file, else 0 (no
    alignment asked of the allocator)."""
    per = HUGE_PAGE // vol.bs                      # type: ignore[attr-defined]
    return per if lblk % per == 0 else 0


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
                    runs = vol.balloc.alloc(self._goal(lblk), count, align=huge_align(vol, lblk))
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


# -- encoding a whole tree at once (pack) --------------------------------------------------------
def indirect_blocks_needed(ranges: list[tuple[int, int]], p: int) -> int:
    """How many indirect blocks the map of file blocks ``ranges`` (``(first, count)`` sorted) needs,
    ``p`` pointers a block: what :func:`build_tree` takes from its ``meta``."""
    if not ranges or ranges[-1][0] + ranges[-1][1] <= 12:
        return 0                                       # direct blocks only: most files
    if len(ranges) == 1 and ranges[0][0] == 0:
        n = ranges[0][1]
        if n <= 12 + p:
            return 1
        if n <= 12 + p + p * p:
            return 2 + -(-(n - 12 - p) // p)
    count = 0
    for level_first, span, unit in ((12, p, p), (12 + p, p * p, p), (12 + p + p * p, p * p * p, p * p)):
        level_end = level_first + span
        hit_top = False
        leaves: set[int] = set()
        mids: set[int] = set()
        for first, n in ranges:
            lo, hi = max(first, level_first), min(first + n, level_end)
            if lo >= hi:
                continue
            hit_top = True
            if unit == p and span == p:                # the single indirect block itself
                continue
            leaves.update(range((lo - level_first) // p, (hi - 1 - level_first) // p + 1))
            if span == p * p * p:
                mids.update(range((lo - level_first) // (p * p), (hi - 1 - level_first) // (p * p) + 1))
        count += hit_top + len(leaves) + len(mids)
    return count


def build_tree(dev: Device, pmap: array, meta: Iterator[int], bs: int) -> bytes:
    """The 15 ``i_block`` words for block map ``pmap`` (0 = hole), writing the indirect blocks
    it needs (``dev.write_new``) from ``meta``, as many as :func:`indirect_blocks_needed` counts."""
    p = bs // 4
    words = list(pmap[:12]) + [0] * (12 - min(12, len(pmap))) + [0, 0, 0]

    def level(first: int, depth: int) -> int:
        """Block for the subtree of ``depth`` (1 = leaf) covering file blocks from ``first``."""
        span = p ** depth
        if not any(pmap[first:first + span]):
            return 0
        blk = next(meta)
        if depth == 1:
            ptrs = pmap[first:first + p]
        else:
            child = p ** (depth - 1)
            ptrs = array("I", [level(first + i * child, depth - 1) for i in range(p)
                               if first + i * child < len(pmap)])
        dev.write_new(ptrs.tobytes().ljust(bs, b"\0"), blk * bs)
        return blk

    words[12] = level(12, 1)
    words[13] = level(12 + p, 2)
    words[14] = level(12 + p + p * p, 3)
    return L.I_BLOCK.pack(*words)
