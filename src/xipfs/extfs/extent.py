"""The ext4 extent tree, read side: ``i_block`` holds the root of a B-tree of extents.

The root is a 12-byte header and up to 4 entries in the inode; a node of depth > 0 holds index
entries (first file block, child block), a leaf (depth 0) holds extents (first file block,
length, first device block; a length above 32768 marks an *unwritten* extent, which reads as
zeros). :func:`walk_extents` is Linux's ``ext4_ext_check`` applied to every node plus e2fsck's
cross-node rules, decoupled from any volume; :class:`ExtentMap` is the scheme behind the seam
of :mod:`.bmap` (``ext4_ext_map_blocks``): the whole file's runs made once, looked up by bisect.
"""

from __future__ import annotations

import bisect
import errno
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from ..errors import CorruptImageError
from .csum import crc32c_raw, inode_seed

if TYPE_CHECKING:
    from .bmap import Run
    from .inode import Inode

#: ``eh_magic`` of every extent node.
EXT_MAGIC = 0xF30A
#: Longest initialized extent; ``ee_len`` above this is an unwritten extent of ``ee_len - 32768``.
EXT_INIT_MAX_LEN = 1 << 15
#: Longest unwritten extent.
EXT_UNWRITTEN_MAX_LEN = EXT_INIT_MAX_LEN - 1
#: Deepest tree Linux accepts (``EXT4_MAX_EXTENT_DEPTH``).
EXT_MAX_DEPTH = 5
#: Entries of the root in the 60-byte ``i_block``.
ROOT_MAX_ENTRIES = 4
#: First file block past what 32-bit logical block numbers can address.
LBLK_LIMIT = 1 << 32

#: ``eh_magic, eh_entries, eh_max, eh_depth, eh_generation``
HEADER = struct.Struct("<HHHHI")
#: ``ei_block, ei_leaf_lo, ei_leaf_hi, ei_unused``
INDEX = struct.Struct("<IIHH")
#: ``ee_block, ee_len, ee_start_hi, ee_start_lo``
LEAF = struct.Struct("<IHHI")
ENTRY_SIZE = 12
assert HEADER.size == INDEX.size == LEAF.size == ENTRY_SIZE

_HEADER_FROM = HEADER.unpack_from
_ENTRY_IS_LEAF = LEAF.iter_unpack
_ENTRY_IS_INDEX = INDEX.iter_unpack
_LE32 = struct.Struct("<I")
_NEW_EXTENT = tuple.__new__


class Extent(NamedTuple):
    """One leaf entry: file blocks ``[lblk, lblk+count)`` at device blocks ``[pblk, pblk+count)``."""

    lblk: int
    count: int
    pblk: int
    #: Allocated but never written (fallocate): reads as zeros.
    unwritten: bool


class ExtentTree(NamedTuple):
    """What :func:`walk_extents` found: the leaf extents in file order and the tree's own blocks."""

    extents: list[Extent]
    #: ``eh_depth`` of the root (0: the extents are in the inode).
    depth: int
    #: Every non-root node, in the order visited (they count in ``i_blocks``).
    blocks: list[int]


def max_entries(size: int) -> int:
    """Entries a node of ``size`` bytes holds (4 in ``i_block``, ``(bs-12)/12`` in a block)."""
    return (size - ENTRY_SIZE) // ENTRY_SIZE


def extent_block_csum(inode_seed: int, block: bytes | bytearray | memoryview) -> int:
    """The checksum an extent block stores right after its ``eh_max`` entries."""
    (emax,) = struct.unpack_from("<H", block, 4)
    return crc32c_raw(inode_seed, bytes(memoryview(block)[:ENTRY_SIZE + ENTRY_SIZE * emax]))


def walk_extents(root: bytes | bytearray | memoryview, read_block: Callable[[int], bytes | memoryview], *,
                 nblocks_device: int, first_data_block: int = 0, csum_seed: int | None = None,
                 verify: Callable[[int, bytes | memoryview], None] | None = None,
                 where: str = "") -> ExtentTree:
    """Every leaf extent of the tree rooted in ``root`` (the 60-byte ``i_block``), validated.

    ``read_block(n)`` returns device block ``n`` (called only for blocks inside the device);
    ``csum_seed`` is the inode's checksum seed (None: tails not checked); ``verify(n, block)``
    may refuse a node block (metadata zones, say). Any breach of the format raises
    :class:`CorruptImageError` naming the node and ``where``: a bad header, entries out of
    order or overlapping, outside their parent's range or the device, zero length, a depth
    that is not exactly one less than the parent's, a node referenced twice.
    """
    walker = _Walker(read_block, nblocks_device, first_data_block, csum_seed, verify, where or None)
    return walker.walk(root)


def extents_to_runs(extents: list[Extent], end: int | None = None) -> list[Run]:
    """Runs of file blocks ``[0, end)`` (default: to the last extent's end), holes and unwritten
    extents as device block 0, adjacent runs merged, as :meth:`BlockMap.runs` gives them."""
    if end is None:
        end = extents[-1].lblk + extents[-1].count if extents else 0
    runs: list[Run] = []
    append = runs.append
    # the run being built: [r_lblk, pos) at r_pblk (0: a hole)
    r_lblk = pos = r_pblk = 0
    for lblk, count, pblk, unwritten in extents:
        if lblk >= end:
            break
        if lblk + count > end:
            count = end - lblk
        if unwritten:
            pblk = 0
        if lblk > pos:                                   # a hole before this extent
            if r_pblk:
                append((r_lblk, pos - r_lblk, r_pblk))
                r_lblk, r_pblk = pos, 0
            pos = lblk
        if pblk == (r_pblk + (pos - r_lblk) if r_pblk else 0) and (pblk or not r_pblk):
            pos += count                                  # continues the run
            continue
        if pos > r_lblk:
            append((r_lblk, pos - r_lblk, r_pblk))
        r_lblk, r_pblk, pos = pos, pblk, pos + count
    if pos < end:
        if r_pblk:
            append((r_lblk, pos - r_lblk, r_pblk))
            r_lblk, r_pblk = pos, 0
        pos = end
    if pos > r_lblk:
        append((r_lblk, pos - r_lblk, r_pblk))
    return runs


def extent_runs(root: bytes | bytearray | memoryview, read_block: Callable[[int], bytes | memoryview], *,
                nblocks_device: int, first_data_block: int = 0, csum_seed: int | None = None,
                verify: Callable[[int, bytes | memoryview], None] | None = None, where: str = "",
                end: int | None = None) -> list[Run]:
    """The runs of the whole file (:func:`walk_extents`, then :func:`extents_to_runs`)."""
    tree = walk_extents(root, read_block, nblocks_device=nblocks_device,
                        first_data_block=first_data_block, csum_seed=csum_seed, verify=verify,
                        where=where)
    return extents_to_runs(tree.extents, end)


class _Walker:
    """One validated descent of an extent tree (state shared by the recursion)."""

    __slots__ = ("read_block", "limit", "first_data", "seed", "verify", "where", "extents",
                 "blocks", "seen")

    def __init__(self, read_block: Callable[[int], bytes | memoryview], nblocks_device: int,
                 first_data_block: int, csum_seed: int | None,
                 verify: Callable[[int, bytes | memoryview], None] | None, where: str | None) -> None:
        self.read_block = read_block
        self.limit = nblocks_device
        self.first_data = first_data_block
        self.seed = csum_seed
        self.verify = verify
        self.where = where
        self.extents: list[Extent] = []
        self.blocks: list[int] = []
        self.seen: set[int] = set()

    def fail(self, what: str) -> CorruptImageError:
        return CorruptImageError(what, self.where)

    def walk(self, root: bytes | bytearray | memoryview) -> ExtentTree:
        if len(root) < 60:
            raise self.fail(f"extent tree root: i_block is {len(root)} bytes, not 60")
        depth = self.node(root, None, -1, 0, LBLK_LIMIT, "extent tree root")
        if self.blocks and self.extents:
            self.check_tree_blocks()
        return ExtentTree(self.extents, depth, self.blocks)

    def node(self, buf: bytes | bytearray | memoryview, blk: int | None, depth: int, lo: int, hi: int,
             name: str) -> int:
        """Check the node in ``buf`` covering file blocks ``[lo, hi)`` and collect its extents;
        ``depth`` -1 for the root (whose depth is what its header says); returns the depth."""
        size = 60 if blk is None else len(buf)
        if size < 2 * ENTRY_SIZE:
            raise self.fail(f"{name}: {size} bytes, too small for an extent node")
        magic, entries, emax, eh_depth, _gen = _HEADER_FROM(buf, 0)
        if magic != EXT_MAGIC:
            raise self.fail(f"{name}: bad magic 0x{magic:04x} (expected 0x{EXT_MAGIC:04x})")
        if depth < 0:
            if eh_depth > EXT_MAX_DEPTH:
                raise self.fail(f"{name}: depth {eh_depth} deeper than {EXT_MAX_DEPTH}")
            depth = eh_depth
        elif eh_depth != depth:
            raise self.fail(f"{name}: depth {eh_depth}, its parent says {depth}")
        full = max_entries(size)
        if not max(1, full - 2) <= emax <= full:        # e2fsck's tolerance; Linux writes full
            raise self.fail(f"{name}: eh_max {emax}, expected {full}")
        if entries > emax:
            raise self.fail(f"{name}: {entries} entries, more than eh_max {emax}")
        if blk is not None:
            if self.seed is not None:
                tail = ENTRY_SIZE + ENTRY_SIZE * emax
                if tail + 4 > size:
                    raise self.fail(f"{name}: no room for the checksum tail after {emax} entries")
                (stored,) = _LE32.unpack_from(buf, tail)
                want = crc32c_raw(self.seed, bytes(memoryview(buf)[:tail]))   # google-crc32c: bytes only
                if stored != want:
                    raise self.fail(f"{name}: checksum 0x{stored:08x}, expected 0x{want:08x}")
            if self.verify is not None:
                self.verify(blk, buf)
        if not entries:
            return depth
        body = memoryview(buf)[ENTRY_SIZE:ENTRY_SIZE + ENTRY_SIZE * entries]
        if depth == 0:
            self.leaf(body, blk, lo, hi, name)
        else:
            self.index(body, depth, blk, lo, hi, name)
        return depth

    def leaf(self, body: memoryview, blk: int | None, lo: int, hi: int, name: str) -> None:
        out = self.extents
        append = out.append
        cur = lo if blk is None else lo - 1     # below a block, the first extent must start at lo
        first_data, limit = self.first_data, self.limit
        for lblk, ee_len, start_hi, start_lo in _ENTRY_IS_LEAF(body):
            if ee_len > EXT_INIT_MAX_LEN:
                count, unwritten = ee_len - EXT_INIT_MAX_LEN, True
            else:
                count, unwritten = ee_len, False
            pblk = start_hi << 32 | start_lo
            end = lblk + count
            if (count and cur <= lblk and end <= hi and first_data < pblk and pblk + count <= limit
                    and (cur >= lo or lblk == lo)):
                append(_NEW_EXTENT(Extent, (lblk, count, pblk, unwritten)))
                cur = end
                continue
            self.leaf_error(len(out), lblk, count, pblk, cur, lo, hi, name)

    def leaf_error(self, n: int, lblk: int, count: int, pblk: int, cur: int, lo: int, hi: int,
                   name: str) -> None:
        """Raise the error for the leaf entry that failed the combined check in :meth:`leaf`."""
        i = n - sum(1 for e in self.extents if e.lblk < lo)
        if count == 0:
            raise self.fail(f"{name}: extent {i} (file block {lblk}) has length 0")
        if cur < lo and lblk != lo:
            raise self.fail(f"{name}: first extent starts at file block {lblk}, its index says {lo}")
        if lblk < cur:
            raise self.fail(f"{name}: extent {i} (file blocks {lblk}..{lblk + count - 1}) "
                            f"overlaps or precedes the one before (which ends at {cur - 1})")
        if lblk + count > hi:
            raise self.fail(f"{name}: extent {i} (file blocks {lblk}..{lblk + count - 1}) "
                            f"reaches past its index's range (..{hi - 1})")
        raise self.fail(f"{name}: extent {i} (device blocks {pblk}..{pblk + count - 1}) "
                        f"outside the device ({self.first_data + 1}..{self.limit - 1})")

    def index(self, body: memoryview, depth: int, blk: int | None, lo: int, hi: int, name: str) -> None:
        items = list(_ENTRY_IS_INDEX(body))
        first_data, limit = self.first_data, self.limit
        prev = lo - 1
        for i, (lblk, leaf_lo, leaf_hi, _unused) in enumerate(items):
            if i == 0 and blk is not None and lblk != lo:
                raise self.fail(f"{name}: first index starts at file block {lblk}, its parent says {lo}")
            if lblk <= prev:
                raise self.fail(f"{name}: index {i} (file block {lblk}) not after the one before ({prev})")
            if lblk >= hi:
                raise self.fail(f"{name}: index {i} (file block {lblk}) past its parent's range (..{hi - 1})")
            child = leaf_hi << 32 | leaf_lo
            if child <= first_data or child >= limit:
                raise self.fail(f"{name}: index {i} points to block {child}, outside the device "
                                f"({first_data + 1}..{limit - 1})")
            prev = lblk
        for i, (lblk, leaf_lo, leaf_hi, _unused) in enumerate(items):
            child = leaf_hi << 32 | leaf_lo
            if child in self.seen:
                raise self.fail(f"{name}: index {i} points to extent block {child}, already in the tree")
            self.seen.add(child)
            self.blocks.append(child)
            end = items[i + 1][0] if i + 1 < len(items) else hi
            self.node(self.read_block(child), child, depth - 1, lblk, end,
                      f"extent block {child} (depth {depth - 1})")

    def check_tree_blocks(self) -> None:
        """Refuse a tree block that is also one of the file's data blocks (e2fsck: claimed twice)."""
        spans = sorted((e.pblk, e.pblk + e.count) for e in self.extents)
        starts = [s for s, _ in spans]
        for b in self.blocks:
            i = bisect.bisect_right(starts, b) - 1
            if i >= 0 and spans[i][1] > b:
                raise self.fail(f"extent block {b} is also a data block of the file")


def _append(out: list[Run], lblk: int, count: int, pblk: int) -> None:
    """Append a run, merging it with the previous one when they continue each other."""
    if out:
        plb, pcount, ppb = out[-1]
        if plb + pcount == lblk and ((ppb == 0 and pblk == 0) or (ppb and pblk == ppb + pcount)):
            out[-1] = (plb, pcount + count, ppb)
            return
    out.append((lblk, count, pblk))


class ExtentMap:
    """File block -> device block for an extent-mapped inode: the read side of the seam.

    The tree is walked once (nothing read for a depth-0 tree, the common case) into the whole
    file's runs; ``runs`` and ``bmap`` bisect them. Writing comes later: ``assign`` and
    ``truncate`` refuse with EROFS.
    """

    __slots__ = ("inode", "volume", "bs", "nblocks", "whole", "depth", "extents", "tree_blocks",
                 "_runs", "_starts")

    def __init__(self, inode: Inode, *, csum_seed: int | None = None) -> None:
        """``csum_seed``: the filesystem's checksum seed S (default: ``volume.csum_seed`` if the
        volume has one); with it every extent block's tail is verified."""
        vol = inode.volume
        self.inode = inode
        self.volume = vol
        bs = self.bs = vol.bs
        #: Number of file blocks below i_size: runs never reach past it.
        self.nblocks = -(-inode.size // bs)
        root = inode.i_block
        extents = _root_extents(root, vol.first_data_block, vol.blocks_count)
        if extents is not None:             # depth 0, the common case: nothing to read
            tree = ExtentTree(extents, 0, [])
        else:                               # a deeper tree, or a root that breaks a rule
            if csum_seed is None:
                csum_seed = getattr(vol, "csum_seed", None)
            seed = None if csum_seed is None else inode_seed(csum_seed, inode.ino, inode.generation)
            tree = walk_extents(root, self._read_node, nblocks_device=vol.blocks_count,
                                first_data_block=vol.first_data_block, csum_seed=seed,
                                where=f"inode {inode.ino}")
        #: ``eh_depth`` of the root.
        self.depth = tree.depth
        #: Every leaf extent in file order, unclipped (past EOF too): what fiemap and writers see.
        self.extents = tree.extents
        #: The tree's own blocks (not the root): metadata of the file, counted in i_blocks.
        self.tree_blocks = tree.blocks
        check = vol.check_data_run
        ino = inode.ino
        for _, count, pblk, _u in tree.extents:
            check(pblk, count, ino)
        self._runs: list[Run] = []
        self._starts: list[int] = []
        self.whole = 0
        self._set_runs()

    def _read_node(self, blk: int) -> memoryview:
        """Extent block ``blk`` straight from the device (refused where metadata lies)."""
        vol = self.volume
        vol.check_data_run(blk, 1, self.inode.ino, "extent block")
        return vol.device.view(blk * self.bs, self.bs)

    def _set_runs(self) -> None:
        """The cached runs of ``[0, nblocks)`` and the whole-file shortcut, from the extents."""
        n = self.nblocks
        runs = self._runs = extents_to_runs(self.extents, n)
        self._starts = [r[0] for r in runs]
        self.whole = runs[0][2] if len(runs) == 1 else 0

    @property
    def unwritten(self) -> list[Extent]:
        """The unwritten extents (reading as zeros, shown as holes in :meth:`runs`)."""
        return [e for e in self.extents if e.unwritten]

    # -- the address-space step -------------------------------------------------------------
    def bmap(self, lblk: int) -> int:
        """Device block holding file block ``lblk``, or 0 for a hole, an unwritten block or past EOF."""
        if lblk < 0 or lblk >= self.nblocks:
            return 0
        if self.whole:
            return self.whole + lblk
        first, count, pblk = self._runs[bisect.bisect_right(self._starts, lblk) - 1]
        return pblk + (lblk - first) if pblk else 0

    def runs(self, first: int, last: int, limit: int | None = None) -> list[Run]:
        """Runs covering file blocks ``[first, last)``, holes (and unwritten blocks) as device
        block 0, merged; clipped to EOF, or to ``limit`` blocks when the write path looks past
        EOF (that part comes from the extents too: ext4 may keep blocks past EOF)."""
        n = self.nblocks
        if limit is not None and limit > n:
            last = min(last, limit)
            out = self.runs(first, last) if first < n else []
            start = max(first, n)
            if start < last:
                for lblk, count, pblk in self._past_eof(start, last):
                    _append(out, lblk, count, pblk)
            return out
        last = min(last, n)
        if first < 0:
            first = 0
        if first >= last:
            return []
        if self.whole:
            return [(first, last - first, self.whole + first)]
        runs = self._runs
        i = bisect.bisect_right(self._starts, first) - 1
        lblk, count, pblk = runs[i]
        if lblk + count >= last:                         # one run: most reads
            return [(first, last - first, pblk + (first - lblk) if pblk else 0)]
        out: list[Run] = [(first, lblk + count - first, pblk + (first - lblk) if pblk else 0)]
        for j in range(i + 1, len(runs)):
            lblk, count, pblk = run = runs[j]
            if lblk + count >= last:
                out.append((lblk, last - lblk, pblk))
                break
            out.append(run)
        return out

    def _past_eof(self, first: int, last: int) -> list[Run]:
        """Runs of ``[first, last)`` beyond EOF, from the extents (rare: only writes look there)."""
        out: list[Run] = []
        pos = first
        for lblk, count, pblk, unwritten in self.extents:
            end = lblk + count
            if end <= pos:
                continue
            if lblk >= last:
                break
            if lblk > pos:
                _append(out, pos, lblk - pos, 0)
                pos = lblk
            hi = min(end, last)
            _append(out, pos, hi - pos, 0 if unwritten else pblk + (pos - lblk))
            pos = hi
        if pos < last:
            _append(out, pos, last - pos, 0)
        return out

    # -- the write side (a later issue) -----------------------------------------------------
    def assign(self, first: int, last: int, fill: Callable[[int, int, int], None]) -> int:
        """Refused: allocating blocks in an extent tree is not implemented yet."""
        raise OSError(errno.EROFS, "writing extent-mapped files is not supported yet",
                      f"inode {self.inode.ino}")

    def truncate(self, keep: int) -> list[tuple[int, int]]:
        """Refused: removing blocks from an extent tree is not implemented yet."""
        raise OSError(errno.EROFS, "truncating extent-mapped files is not supported yet",
                      f"inode {self.inode.ino}")

    def resize(self, nblocks: int) -> None:
        """Follow a new i_size (in blocks): the runs are cut again from the cached extents."""
        if nblocks != self.nblocks:
            self.nblocks = nblocks
            self._set_runs()


_LEAF_FROM = LEAF.unpack_from


def _root_extents(root: bytes, first_data: int, limit: int) -> list[Extent] | None:
    """The extents of a valid depth-0 root, quickly; None for anything else (a deeper tree, or
    a broken rule, which :func:`walk_extents` then names)."""
    if len(root) < 60:
        return None
    magic, entries, emax, depth, _gen = _HEADER_FROM(root, 0)
    if magic != EXT_MAGIC or depth or entries > emax or not 2 <= emax <= ROOT_MAX_ENTRIES:
        return None
    out: list[Extent] = []
    cur = 0
    for at in range(ENTRY_SIZE, ENTRY_SIZE + ENTRY_SIZE * entries, ENTRY_SIZE):
        lblk, ee_len, start_hi, start_lo = _LEAF_FROM(root, at)
        if ee_len > EXT_INIT_MAX_LEN:
            count, unwritten = ee_len - EXT_INIT_MAX_LEN, True
        else:
            count, unwritten = ee_len, False
        pblk = start_hi << 32 | start_lo
        cur_end = lblk + count
        if not (count and cur <= lblk and cur_end <= LBLK_LIMIT and first_data < pblk
                and pblk + count <= limit):
            return None
        out.append(_NEW_EXTENT(Extent, (lblk, count, pblk, unwritten)))
        cur = cur_end
    return out
