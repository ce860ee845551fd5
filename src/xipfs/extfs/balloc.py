"""Block allocation: bitmaps and free counts kept exact, goal-directed like Linux ext2.

A request names a goal block (the block after the file's last one, or near its inode) and a
count; the allocator takes the longest free runs it finds from the goal onwards, group by group,
so that files come out in few runs. Every allocated block is checked against the metadata zones,
so a damaged bitmap can never hand out an inode table.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from ..errors import CorruptImageError, fs_error
from . import bitmap
from . import layout as L
from .groups import super_and_gdt

if TYPE_CHECKING:
    from .volume import Volume


class BlockAllocator:
    """Allocates and frees blocks of one writable volume (callers hold the volume's lock)."""

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        sb = volume.sb
        self.bpg = sb.s_blocks_per_group
        self.first = sb.s_first_data_block
        self.blocks = sb.s_blocks_count
        self.reserved = sb.s_r_blocks_count
        uid, gids = os.geteuid(), set(os.getgroups()) | {os.getegid()}
        self.may_use_reserved = uid == 0 or uid == sb.s_def_resuid or sb.s_def_resgid in gids
        #: Per group, a bit below which every block is known to be in use (search starts there).
        self._low = [0] * len(volume.groups)
        #: Per group: first block, number of blocks.
        self._span = [(sb.group_first_block(g), sb.group_last_block(g) - sb.group_first_block(g) + 1)
                      for g in range(len(volume.groups))]
        self._free = sum(gd.free_blocks for gd in volume.groups)
        #: Groups whose block bitmap ext4 never wrote (BLOCK_UNINIT, under a checksum feature):
        #: made (:meth:`_init_group`) before the first block is taken there.
        self._uninit = [bool((sb.metadata_csum or sb.gdt_csum) and gd.flags & L.BG_BLOCK_UNINIT)
                        for gd in volume.groups]

    def _init_group(self, g: int) -> None:
        """Write the block bitmap of BLOCK_UNINIT group ``g`` as Linux's ``ext4_init_block_bitmap``
        makes it (its superblock copy, descriptors and reserved GDT blocks; its own bitmaps and
        inode table where they lie in it; the padding past its last block) and clear the flag."""
        vol = self.volume
        sb = vol.sb
        gd = vol.groups[g]
        base, nbits = self._span[g]
        bits = bytearray(vol.bs)
        used = 0

        def mark(first: int, n: int) -> None:
            nonlocal used
            for b in range(max(first, base), min(first + n, base + nbits)):
                if not bits[(b - base) >> 3] & (1 << ((b - base) & 7)):
                    bits[(b - base) >> 3] |= 1 << ((b - base) & 7)
                    used += 1

        for a, b in super_and_gdt(sb, g):
            mark(a, b - a)
        mark(gd.block_bitmap, 1)
        mark(gd.inode_bitmap, 1)
        mark(gd.inode_table, sb.itable_blocks)
        for bit in range(nbits, 8 * vol.bs):          # padding
            bits[bit >> 3] |= 1 << (bit & 7)
        vol.device.write(bytes(bits), gd.block_bitmap * vol.bs)
        self._free += (nbits - used) - gd.free_blocks
        gd.free_blocks = nbits - used
        gd.flags &= ~L.BG_BLOCK_UNINIT
        vol.write_group_desc(g)
        self._uninit[g] = False

    def _ready(self, g: int) -> None:
        if self._uninit[g]:
            self._init_group(g)

    # -- queries ------------------------------------------------------------------------------
    def free_blocks(self) -> int:
        return self._free

    def available(self) -> int:
        """Blocks this process may still take (root-reserved blocks excluded unless allowed)."""
        free = self.free_blocks()
        return free if self.may_use_reserved else max(0, free - self.reserved)

    def group_of(self, block: int) -> int:
        return (block - self.first) // self.bpg

    # -- allocation ---------------------------------------------------------------------------
    def alloc(self, goal: int, count: int, whole: bool = False, align: int = 0) -> list[tuple[int, int]]:
        """Up to ``count`` blocks as runs ``(first, n)``, from ``goal`` on; ENOSPC if none.

        ``whole``: a new small file, better placed in the first gap that holds it in one run
        than spread over the single free blocks nearer the goal. ``align``: a large run for a
        file offset that is a multiple of ``align`` blocks starts, where free space allows, at
        a device block that is one too (2 MiB: what Linux's DAX maps with one huge page).
        """
        avail = self._free if self.may_use_reserved else self._free - self.reserved
        if avail <= 0:
            raise fs_error(errno.ENOSPC)
        want = min(count, avail)
        if align and want >= align:
            run = self._take_aligned(goal, want, align)
            if run:
                return [run]
        if want <= 8:
            pblk = self._take_near(goal, want)
            if pblk:
                return [(pblk, want)]
        if whole and want == count:
            pblk = self._take_fitting(goal, want)
            if pblk:
                return [(pblk, want)]
        vol = self.volume
        ngroups = len(vol.groups)
        if not self.first <= goal < self.blocks:
            goal = self.first
        g0 = self.group_of(goal)
        runs: list[tuple[int, int]] = []
        for step in range(ngroups + 1):
            g = (g0 + step) % ngroups
            gd = vol.groups[g]
            if gd.free_blocks == 0:
                continue
            start = goal - self._span[g][0] if step == 0 else 0
            want -= self._take_from_group(g, start, want, runs)
            if want == 0:
                break
        if not runs:
            raise fs_error(errno.ENOSPC)
        return runs

    def _take_aligned(self, goal: int, count: int, align: int) -> tuple[int, int] | None:
        """A free run starting at a multiple of ``align`` blocks, at least ``align`` long (up to
        ``count``), in ``goal``'s group or the next ones; None when none is free."""
        vol = self.volume
        ngroups = len(vol.groups)
        if not self.first <= goal < self.blocks:
            goal = self.first
        g0 = self.group_of(goal)
        for step in range(ngroups):
            g = (g0 + step) % ngroups
            gd = vol.groups[g]
            if gd.free_blocks < align:
                continue
            self._ready(g)
            base, nbits = self._span[g]
            start = goal if step == 0 else base
            bm = vol.device.view(gd.block_bitmap * vol.bs, (nbits + 7) >> 3)
            at = -(-start // align) * align
            while at + align <= base + nbits:
                bit = at - base
                n = bitmap.zero_run(bm, bit, min(nbits, bit + count)) if not bitmap.test_bit(bm, bit) else 0
                if n >= align:
                    n -= n % align if n < count else 0
                    vol.check_data_run(at, n, 0, "block the bitmap marks free")
                    self._mark(g, bit, n, True)
                    return at, n
                at += align
        return None

    def _take_near(self, goal: int, count: int) -> int:
        """Small files' fast path: ``count`` (at most 8) contiguous free blocks among the 64
        bits of bitmap where the search from ``goal`` starts. Their first block, or 0 (then
        search fully)."""
        if not self.first <= goal < self.blocks:
            return 0
        g = (goal - self.first) // self.bpg
        base, nbits = self._span[g]
        bit = max(goal - base, self._low[g])
        byte = bit >> 3
        if (byte + 8) << 3 > nbits:
            return 0
        vol = self.volume
        self._ready(g)
        gd = vol.groups[g]
        if gd.free_blocks < count:
            return 0
        at = gd.block_bitmap * vol.bs + byte
        old = int.from_bytes(vol.device.view(at, 8), "little")
        free = ~(old | ((1 << (bit & 7)) - 1)) & 0xFFFF_FFFF_FFFF_FFFF   # bits before the start: used
        for _ in range(count - 1):
            free &= free >> 1                  # bit i stays set when bits i..i+count-1 are free
        if not free:
            return 0
        shift = (free & -free).bit_length() - 1
        first = base + (byte << 3) + shift
        vol.check_data_run(first, count, 0, "block the bitmap marks free")
        new = old | (((1 << count) - 1) << shift)
        lo, hi = shift >> 3, (shift + count - 1) >> 3
        vol.device.write(new.to_bytes(8, "little")[lo:hi + 1], at + lo)
        gd.free_blocks -= count
        self._free -= count
        vol.write_group_desc(g)
        return first

    def _take_fitting(self, goal: int, count: int) -> int:
        """``count`` free blocks in one run in ``goal``'s group, from the goal on: the first
        gap that holds them among the next few, else the first free bitmap bytes that do.
        Their first block, or 0 (then the caller takes what it finds)."""
        if not self.first <= goal < self.blocks:
            return 0
        g = (goal - self.first) // self.bpg
        vol = self.volume
        self._ready(g)
        gd = vol.groups[g]
        if gd.free_blocks < count:
            return 0
        base, nbits = self._span[g]
        bm = vol.device.view(gd.block_bitmap * vol.bs, (nbits + 7) >> 3)
        pos = bitmap.find_zero(bm, self._low[g], nbits)
        if pos < 0:
            return 0
        self._low[g] = pos                          # nothing free below ``pos``
        pos = max(pos, goal - base)
        for _ in range(16):                          # first fit, among the nearest gaps
            pos = bitmap.find_zero(bm, pos, nbits)
            if pos < 0:
                return 0
            n = bitmap.zero_run(bm, pos, min(nbits, pos + count))
            if n == count:
                break
            pos += n
        else:                                        # many small gaps: whole free bytes
            byte = bytes(bm[:nbits >> 3]).find(bytes((count + 7) >> 3), (pos + 7) >> 3)
            if byte < 0:
                return 0
            pos = byte << 3
        vol.check_data_run(base + pos, count, 0, "block the bitmap marks free")
        self._mark(g, pos, count, True)
        return base + pos

    def _take_from_group(self, g: int, start: int, want: int, runs: list[tuple[int, int]]) -> int:
        """Take up to ``want`` free blocks of group ``g``, searching from bit ``start`` then from 0."""
        vol = self.volume
        self._ready(g)
        gd = vol.groups[g]
        base, nbits = self._span[g]
        bm_off = gd.block_bitmap * vol.bs
        taken = 0
        low = self._low[g]
        start = max(start, low)
        for lo, hi in ((start, nbits), (low, start)) if start > low else ((low, nbits),):
            pos = lo
            while taken < want and gd.free_blocks:
                bm = vol.device.view(bm_off, (nbits + 7) >> 3)
                bit = bitmap.find_zero(bm, pos, hi)
                if bit < 0:
                    break
                if lo == low and pos == low:
                    self._low[g] = bit                 # nothing free below ``bit``
                n = min(bitmap.zero_run(bm, bit, min(hi, bit + want - taken)), gd.free_blocks)
                vol.check_data_run(base + bit, n, 0, "block the bitmap marks free")
                self._mark(g, bit, n, True)
                if runs and runs[-1][0] + runs[-1][1] == base + bit:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n)
                else:
                    runs.append((base + bit, n))
                taken += n
                pos = bit + n
        return taken

    def alloc_meta(self, near: int) -> int:
        """One block for file metadata (indirect blocks), from the top of ``near``'s group down.

        Data grows upwards from its goal and indirect blocks gather at the top of the group, so
        a file written in pieces stays one contiguous run per group instead of being cut every
        ``block size / 4`` blocks, which keeps XIP mappings to a handful of runs.
        """
        if self.available() <= 0:
            raise fs_error(errno.ENOSPC)
        vol = self.volume
        ngroups = len(vol.groups)
        g0 = self.group_of(near) if self.first <= near < self.blocks else 0
        for step in range(ngroups):
            g = (g0 + step) % ngroups
            gd = vol.groups[g]
            if not gd.free_blocks:
                continue
            self._ready(g)
            base, nbits = self._span[g]
            bm = vol.device.view(gd.block_bitmap * vol.bs, (nbits + 7) >> 3)
            bit = bitmap.find_zero_high(bm, nbits)
            if bit >= 0:
                vol.check_data_run(base + bit, 1, 0, "block the bitmap marks free")
                self._mark(g, bit, 1, True)
                return base + bit
        raise fs_error(errno.ENOSPC)

    def free(self, block: int, count: int) -> None:
        """Return ``count`` blocks from ``block`` to the free pool (may span groups)."""
        vol = self.volume
        vol.check_data_run(block, count, 0, "block to free")   # never free metadata
        while count > 0:
            g = self.group_of(block)
            base, nbits = self._span[g]
            n = min(count, base + nbits - block)
            bm = vol.device.view(vol.groups[g].block_bitmap * vol.bs, vol.bs)
            for i in range(block - base, block - base + n):
                if not bitmap.test_bit(bm, i):
                    raise CorruptImageError(f"freeing block {base + i}, which is already free",
                                            f"block bitmap of group {g}")
            self._mark(g, block - base, n, False)
            self._low[g] = min(self._low[g], block - base)
            block += n
            count -= n

    def _mark(self, g: int, bit: int, n: int, used: bool) -> None:
        vol = self.volume
        gd = vol.groups[g]
        bm_off = gd.block_bitmap * vol.bs
        first, data = bitmap.set_range(vol.device.view(bm_off, vol.bs), bit, n, used)
        vol.device.write(data, bm_off + first)
        gd.free_blocks += -n if used else n
        self._free += -n if used else n
        vol.write_group_desc(g)
