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
from . import layout as L
from .csum import crc32c_raw, inode_seed
from .indirect import huge_align as _align

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


def inode_root(runs: list[tuple[int, int, int]] = ()) -> bytes:  # type: ignore[assignment]
    """A depth-0 extent root for ``i_block`` holding ``runs`` ``(first file block, count, first
    device block)``, at most 4 of at most 32768 blocks each: what a new file starts with."""
    n = len(runs)
    if n > ROOT_MAX_ENTRIES:
        raise ValueError(f"{n} extents do not fit the inode's root")
    values = [EXT_MAGIC, n, ROOT_MAX_ENTRIES, 0, 0]
    for lblk, count, pblk in runs:
        values += (lblk, count, pblk >> 32, pblk & 0xFFFFFFFF)
    return _ROOTS[n].pack(*values)


#: A whole 60-byte root with 0 to 4 leaf entries, one Struct each (a new file's, in one call).
_ROOTS = [struct.Struct("<HHHHI" + "IHHI" * k + f"{60 - 12 - 12 * k}x") for k in range(ROOT_MAX_ENTRIES + 1)]


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


class _Node:
    """One node of a tree being changed: the root (``blk`` 0, in ``i_block``) or a block."""

    __slots__ = ("blk", "depth", "emax", "ents", "kids")

    def __init__(self, blk: int, depth: int, emax: int, ents: list, kids: list[_Node] | None) -> None:
        self.blk = blk
        self.depth = depth
        self.emax = emax
        #: A leaf's extents, or an index node's first file blocks (``ei_block``).
        self.ents = ents
        #: An index node's children (None: a leaf).
        self.kids = kids


def _first(node: _Node) -> int:
    """The first file block under ``node`` (not empty)."""
    return node.ents[0] if node.kids is not None else node.ents[0].lblk


def _collect(node: _Node, extents: list[Extent], blocks: list[int]) -> None:
    """Append the extents and the tree blocks below ``node``, in file order."""
    if node.kids is None:
        extents.extend(node.ents)
        return
    for kid in node.kids:
        blocks.append(kid.blk)
        _collect(kid, extents, blocks)


def _drop(node: _Node, freed: list[tuple[int, int]]) -> None:
    """Add every data block and the node blocks of the subtree ``node`` to ``freed``."""
    if node.kids is None:
        freed.extend((e.pblk, e.count) for e in node.ents)
    else:
        for kid in node.kids:
            _drop(kid, freed)
    freed.append((node.blk, 1))


def _mergeable(a: Extent, b: Extent) -> bool:
    """``ext4_can_extents_be_merged``: ``b`` continues ``a`` in the file and on the device, both
    written or both unwritten, and the two fit one extent."""
    return (a.unwritten == b.unwritten and a.lblk + a.count == b.lblk and a.pblk + a.count == b.pblk
            and a.count + b.count <= (EXT_UNWRITTEN_MAX_LEN if a.unwritten else EXT_INIT_MAX_LEN))


def _merged(ents: list[Extent]) -> list[Extent]:
    """``ents`` with every extent that continues the one before merged into it."""
    out: list[Extent] = []
    for e in ents:
        if out and _mergeable(out[-1], e):
            p = out[-1]
            out[-1] = Extent(p.lblk, p.count + e.count, p.pblk, p.unwritten)
        else:
            out.append(e)
    return out


def _add_run(runs: list[tuple[int, int]], pblk: int, n: int) -> None:
    """Append a ``(device block, count)`` run, merged with the last when it continues it."""
    if runs and runs[-1][0] + runs[-1][1] == pblk:
        runs[-1] = (runs[-1][0], runs[-1][1] + n)
    else:
        runs.append((pblk, n))


def _LBLK(e: Extent) -> int:  # noqa: N802 (a key function, named like the constant it stands for)
    """Sort key: an extent's first file block."""
    return e.lblk


class ExtentMap:
    """File block -> device block for an extent-mapped inode: the read side of the seam.

    The tree is walked once (nothing read for a depth-0 tree, the common case) into the whole
    file's runs; ``runs`` and ``bmap`` bisect them. The write side (``assign``, ``truncate``)
    reads the tree's nodes on its first change and keeps them, and the runs, up to date.
    """

    __slots__ = ("inode", "volume", "bs", "nblocks", "whole", "depth", "extents", "tree_blocks",
                 "_runs", "_starts", "_root", "_wseed", "_block_emax", "_bump", "_bump_stored")

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
        # the write side: the tree as nodes (read on the first change), the extent blocks'
        # checksum seed, entries of a new block, the size stored while ``assign`` links
        self._root: _Node | None = None
        self._wseed: int | None = None
        self._block_emax = max_entries(bs)
        self._bump = 0
        self._bump_stored = True

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

    # -- the write side (Linux ext4_ext_map_blocks with CREATE, ext4_ext_truncate) ----------
    def assign(self, first: int, last: int, fill: Callable[[int, int, int], None]) -> int:
        """Give every hole in file blocks ``[first, last)`` blocks and turn every unwritten block
        there into initialized data; how many blocks from ``first`` on are mapped afterwards.

        ``fill(file block, count, device block)`` writes each run's content before the tree
        points to it as data (for an unwritten run: into its own blocks). New blocks extend the
        extent before them when they continue it; a full leaf splits, a full root moves into a
        new block (the tree grows a level). Every change reaches the image in one store that
        leaves a valid tree: new nodes are written whole (checksummed) before their parent
        points to them, a node that changes in more than its tail is copied and switched in the
        parent, and a node it replaced is freed only after. Fewer blocks than asked when space
        ran out (the tree stays valid, blocks not linked are freed). The caller writes the inode.
        """
        self._writable()
        if first >= last:
            return 0
        self._tree()
        bs = self.bs
        # e2fsck refuses initialized extents past i_size below an index: the stored size must
        # cover them before a deeper tree links them (the caller sets the exact size after).
        self._bump = last * bs if last * bs > self.inode.size else 0
        self._bump_stored = not self._bump
        try:
            for lblk, count, ext in self._gaps(first, last):
                if ext is not None:                  # unwritten: fill in place, then mark written
                    fill(lblk, count, ext.pblk + (lblk - ext.lblk))
                    if not self._convert(lblk, count):
                        return lblk - first
                    continue
                done = self._allocate(lblk, count, fill)
                if done < count:
                    return lblk + done - first
            return last - first
        finally:
            self._bump = 0
            self._changed()

    def preallocate(self, first: int, last: int) -> int:
        """Give every hole in file blocks ``[first, last)`` blocks as *unwritten* extents
        (``fallocate``, Linux ``EXT4_GET_BLOCKS_CREATE_UNWRIT_EXT``): nothing is written to
        them, they read as zeros, and :meth:`assign` turns them into data as they are written.
        Blocks already mapped stay as they are. How many blocks from ``first`` on are mapped
        afterwards (fewer when space ran out; the caller writes the inode). No size bump is
        needed: e2fsck accepts unwritten extents past i_size."""
        self._writable()
        if first >= last:
            return 0
        self._tree()
        try:
            for lblk, count, ext in self._gaps(first, last):
                if ext is None:
                    done = self._allocate(lblk, count, None)
                    if done < count:
                        return lblk + done - first
            return last - first
        finally:
            self._changed()

    def truncate(self, keep: int) -> list[tuple[int, int]]:
        """Unmap every block from file block ``keep`` on (Linux ``ext4_ext_remove_space``).

        Extents are cut or dropped from the right, emptied nodes leave their parent, and a tree
        whose next level fits in the inode again moves back into it. Returns the ``(device
        block, count)`` runs (data and tree blocks) to free once the inode is written.
        """
        self._writable()
        root = self._tree()
        freed: list[tuple[int, int]] = []
        self._cut(root, keep, freed)
        if not freed:
            return freed
        self._collapse(freed)
        self._store(root)
        freed.sort()
        out: list[tuple[int, int]] = []
        for pblk, n in freed:
            _add_run(out, pblk, n)
        node = self.inode
        node.blocks = max(0, node.blocks - sum(n for _, n in out) * (self.bs // 512))
        self._changed()
        return out

    def resize(self, nblocks: int) -> None:
        """Follow a new i_size (in blocks): the runs are cut again from the cached extents."""
        if nblocks != self.nblocks:
            self.nblocks = nblocks
            self._set_runs()

    # -- internals: the tree in memory --------------------------------------------------------
    def _writable(self) -> None:
        """Refuse a volume not open for writing, and bigalloc (clusters, not blocks, are mapped)."""
        if getattr(self.volume, "readonly", True):
            raise OSError(errno.EROFS, "the filesystem is open read-only", f"inode {self.inode.ino}")
        if self.volume.sb.cluster_ratio > 1:
            raise OSError(errno.EROFS, "writing extent trees on a bigalloc filesystem is not supported",
                          f"inode {self.inode.ino}")

    def _tree(self) -> _Node:
        """The whole tree as nodes (read on the first change; the read side needs only extents)."""
        root = self._root
        if root is None:
            inode = self.inode
            sb = self.volume.sb
            self._wseed = inode_seed(sb.csum_seed, inode.ino, inode.generation) if sb.metadata_csum else None
            root = self._parse(inode.i_block, 0)
            if root.kids is not None and not root.ents:          # an empty index: an empty leaf
                root = _Node(0, 0, ROOT_MAX_ENTRIES, [], None)
            self._root = root
        return root

    def _parse(self, buf: bytes | bytearray | memoryview, blk: int) -> _Node:
        """Node ``blk`` (0: the root) and everything below it, from validated bytes."""
        _magic, entries, emax, depth, _gen = _HEADER_FROM(buf, 0)
        body = bytes(memoryview(buf)[ENTRY_SIZE:ENTRY_SIZE * (entries + 1)])
        if depth == 0:
            ents = [Extent(lblk, n - EXT_INIT_MAX_LEN, hi << 32 | lo, True) if n > EXT_INIT_MAX_LEN
                    else Extent(lblk, n, hi << 32 | lo, False) for lblk, n, hi, lo in LEAF.iter_unpack(body)]
            return _Node(blk, 0, emax, ents, None)
        keys: list[int] = []
        kids: list[_Node] = []
        for lblk, lo, hi, _unused in INDEX.iter_unpack(body):
            child = hi << 32 | lo
            keys.append(lblk)
            kids.append(self._parse(bytes(self._read_node(child)), child))
        return _Node(blk, depth, emax, keys, kids)

    def _changed(self) -> None:
        """Make the read side's caches (extents, tree blocks, depth, runs) follow the tree."""
        root = self._root
        if root is None:
            return
        extents: list[Extent] = []
        blocks: list[int] = []
        _collect(root, extents, blocks)
        self.extents = extents
        self.tree_blocks = blocks
        self.depth = root.depth
        self._set_runs()

    def _path(self, lblk: int) -> tuple[list[tuple[_Node, int]], _Node]:
        """The index nodes from the root down with the entry taken in each, and the leaf for ``lblk``."""
        node = self._tree()
        path: list[tuple[_Node, int]] = []
        while node.kids is not None:
            i = max(bisect.bisect_right(node.ents, lblk) - 1, 0)
            path.append((node, i))
            node = node.kids[i]
        return path, node

    def _gaps(self, first: int, last: int) -> list[tuple[int, int, Extent | None]]:
        """``(file block, count, unwritten extent or None for a hole)`` to fill in ``[first, last)``."""
        out: list[tuple[int, int, Extent | None]] = []
        extents = self.extents
        pos = first
        i = max(bisect.bisect_right(extents, first, key=_LBLK) - 1, 0)
        for e in extents[i:]:
            if e.lblk >= last:
                break
            end = e.lblk + e.count
            if end <= pos:
                continue
            if e.lblk > pos:
                out.append((pos, e.lblk - pos, None))
                pos = e.lblk
            hi = min(end, last)
            if e.unwritten:
                out.append((pos, hi - pos, e))
            pos = hi
        if pos < last:
            out.append((pos, last - pos, None))
        return out

    def _goal(self, lblk: int) -> int:
        """Where file block ``lblk`` should go (``ext4_ext_find_goal``): in line with the nearest
        extent of its leaf, else at the start of the inode's group."""
        _path, leaf = self._path(lblk)
        ents = leaf.ents
        pos = bisect.bisect_right(ents, lblk, key=_LBLK)
        goal = 0
        if pos:
            e = ents[pos - 1]
            goal = e.pblk + (lblk - e.lblk)
        elif ents:
            goal = ents[0].pblk - (ents[0].lblk - lblk)
        vol = self.volume
        if not vol.first_data_block < goal < vol.blocks_count:
            goal = vol.inode_group_goal(self.inode.ino, self.inode.is_reg)
        return goal

    # -- internals: changing the tree ---------------------------------------------------------
    def _allocate(self, lblk: int, count: int, fill: Callable[[int, int, int], None] | None) -> int:
        """Allocate and link file blocks ``[lblk, lblk+count)`` of a hole, 2 MiB-aligned where
        the file is: as data, each run filled first, or (``fill`` None) as unwritten extents.
        How many were linked (fewer when space ran out; blocks not linked are freed)."""
        vol = self.volume
        start = lblk
        while count:
            try:
                runs = vol.balloc.alloc(self._goal(lblk), count, align=_align(vol, lblk))
            except OSError as err:
                if err.errno == errno.ENOSPC:
                    return lblk - start
                raise
            for i, (pblk, n) in enumerate(runs):
                if fill is not None:
                    fill(lblk, n, pblk)
                done = self._link(lblk, n, pblk, fill is None)
                if done < n:                         # no block left for the tree
                    vol.balloc.free(pblk + done, n - done)
                    for rest, m in runs[i + 1:]:
                        vol.balloc.free(rest, m)
                    return lblk + done - start
                lblk += n
                count -= n
        return lblk - start

    def _link(self, lblk: int, n: int, pblk: int, unwritten: bool = False) -> int:
        """Map file blocks ``[lblk, lblk+n)`` to device blocks from ``pblk``, as data or as
        unwritten extents; how many were linked (fewer when no block was left for a tree node)."""
        done = 0
        per = self.bs // 512
        most = EXT_UNWRITTEN_MAX_LEN if unwritten else EXT_INIT_MAX_LEN
        while done < n:
            k = min(n - done, most)
            if not self._update([Extent(lblk + done, k, pblk + done, unwritten)], False):
                break
            self.inode.blocks += k * per
            done += k
        return done

    def _convert(self, lblk: int, n: int) -> bool:
        """Mark file blocks ``[lblk, lblk+n)``, inside one unwritten extent, initialized (the
        extent splits in up to three); False when the leaf had to split and no block was left."""
        _path, leaf = self._path(lblk)
        e = leaf.ents[bisect.bisect_right(leaf.ents, lblk, key=_LBLK) - 1]
        end = e.lblk + e.count
        pieces = [Extent(lblk, n, e.pblk + (lblk - e.lblk), False)]
        if lblk > e.lblk:
            pieces.insert(0, Extent(e.lblk, lblk - e.lblk, e.pblk, True))
        if lblk + n < end:
            pieces.append(Extent(lblk + n, end - lblk - n, e.pblk + (lblk + n - e.lblk), True))
        return self._update(pieces, True)

    def _update(self, pieces: list[Extent], replace: bool) -> bool:
        """Put ``pieces`` into their leaf (in place of the extent at ``pieces[0].lblk`` when
        ``replace``), merged with their neighbours; a full leaf makes room first. False when a
        tree block was needed and none was left (nothing changed then)."""
        key = pieces[0].lblk
        while True:
            self._before_store()
            path, leaf = self._path(key)
            ents = leaf.ents
            pos = bisect.bisect_right(ents, key, key=_LBLK)
            if replace:
                pos -= 1
            new = ents[:pos] + pieces + ents[pos + int(replace):]
            lo = max(pos - 1, 0)
            hi = min(pos + len(pieces) + 1, len(new))
            new[lo:hi] = _merged(new[lo:hi])
            if len(new) <= leaf.emax:
                if path and new[0].lblk != ents[0].lblk:      # the leaf's first block changes
                    done = self._copy_front(path, leaf, new)
                else:
                    leaf.ents = new
                    self._store(leaf)
                    done = True
                if done:
                    self._merge_up()
                return done
            at = len(path) - 1                           # the lowest index node with room
            while at >= 0 and len(path[at][0].ents) >= path[at][0].emax:
                at -= 1
            near = pieces[0].pblk
            if at < 0:
                if not self._grow(near):
                    return False
                continue
            n = len(ents)
            if not replace and pos == n:                 # past the leaf's last extent: a new leaf
                return self._split(path, at, leaf, n, list(pieces), near)
            if not self._split(path, at, leaf, pos + 1 if pos < n // 2 else max(pos, 1), [], near):
                return False

    def _merge_up(self) -> None:
        """A root indexing one leaf that fits in the inode takes its extents back and the leaf
        is freed (Linux ``ext4_ext_try_to_merge_up``, after every insertion and conversion):
        the inode is written before the block is freed."""
        root = self._tree()
        kids = root.kids
        if root.depth != 1 or kids is None or len(kids) != 1 or len(kids[0].ents) > ROOT_MAX_ENTRIES:
            return
        leaf = kids[0]
        root.ents, root.kids, root.depth, root.emax = leaf.ents, None, 0, ROOT_MAX_ENTRIES
        self.inode.blocks -= self.bs // 512
        self.inode.i_block = self._encode(root)
        self._store_inode()
        self.volume.balloc.free(leaf.blk, 1)

    def _before_store(self) -> None:
        """Store the inode with a size covering the blocks being linked, once, before a tree
        with index nodes changes (see :meth:`assign`)."""
        if not self._bump_stored and self._tree().depth:
            self._store_inode()

    def _store_inode(self) -> None:
        """Write the inode now (its root, i_blocks; during :meth:`assign` a size covering the range)."""
        node = self.inode
        size = node.size
        bump = self._bump
        if bump > size and (bump < 1 << 31 or self.volume.sb.has_ro_compat(L.RO_COMPAT_LARGE_FILE)):
            node.size = bump
        try:
            self.volume.write_inode(node)
        finally:
            node.size = size
        self._bump_stored = True

    def _store(self, node: _Node) -> None:
        """Write a changed node in place: a block, or the root (stored with the inode at once when
        it indexes blocks; a root of extents only waits for the caller's inode write)."""
        data = self._encode(node)
        if node.blk:
            self.volume.device.write(data, node.blk * self.bs)
            return
        self.inode.i_block = data
        if node.depth:
            self._store_inode()

    def _write_new(self, node: _Node) -> None:
        """Write a new node's whole block (nothing points to it yet)."""
        self.volume.device.write_new(self._encode(node).ljust(self.bs, b"\0"), node.blk * self.bs)

    def _encode(self, node: _Node) -> bytes:
        """The bytes of ``node``: header, entries, zeros to ``eh_max`` (then the checksum tail)."""
        ents = node.ents
        head = HEADER.pack(EXT_MAGIC, len(ents), node.emax, node.depth, 0)
        if node.kids is None:
            body = b"".join([LEAF.pack(e.lblk, e.count + EXT_INIT_MAX_LEN if e.unwritten else e.count,
                                       e.pblk >> 32, e.pblk & 0xFFFFFFFF) for e in ents])
        else:
            body = b"".join([INDEX.pack(k, c.blk & 0xFFFFFFFF, c.blk >> 32, 0)
                             for k, c in zip(ents, node.kids, strict=True)])
        data = (head + body).ljust(ENTRY_SIZE * (node.emax + 1), b"\0")
        if not node.blk:
            return data.ljust(60, b"\0")
        if self._wseed is not None:
            data += _LE32.pack(crc32c_raw(self._wseed, data))
        return data

    def _new_blocks(self, count: int, near: int) -> list[int]:
        """``count`` blocks for tree nodes, near ``near`` (all or none: ENOSPC frees those taken)."""
        balloc = self.volume.balloc
        got: list[int] = []
        try:
            for _ in range(count):
                got.append(balloc.alloc_meta(near))
        except BaseException:
            for blk in got:
                balloc.free(blk, 1)
            raise
        return got

    def _try_new_blocks(self, count: int, near: int) -> list[int] | None:
        """:meth:`_new_blocks`, None when space ran out."""
        try:
            return self._new_blocks(count, near)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                return None
            raise

    def _grow(self, near: int) -> bool:
        """The root is full: its entries move into a new block, the root indexes it (Linux
        ``ext4_ext_grow_indepth``); False when no block was left."""
        root = self._tree()
        if root.depth >= EXT_MAX_DEPTH:
            raise OSError(errno.EFBIG, f"extent tree deeper than {EXT_MAX_DEPTH}", f"inode {self.inode.ino}")
        blocks = self._try_new_blocks(1, near)
        if blocks is None:
            return False
        child = _Node(blocks[0], root.depth, self._block_emax, root.ents, root.kids)
        self._write_new(child)
        root.ents = [_first(child)]
        root.kids = [child]
        root.depth += 1
        self.inode.blocks += self.bs // 512
        self._store(root)
        return True

    def _split(self, path: list[tuple[_Node, int]], at: int, leaf: _Node, m: int, extra: list[Extent],
               near: int) -> bool:
        """Split the path below ``path[at]`` (which has room) at the leaf's entry ``m``: the
        leaf's entries from ``m`` on plus ``extra`` go to a new leaf, each index level between
        gets a new node for its entries after the path, and ``path[at]`` takes the new branch in
        one store. A node that loses entries is replaced by a shortened copy in that same store
        (the old one freed after), so no store ever leaves entries unreachable."""
        levels = range(len(path) - 1, at, -1)
        copy = m < len(leaf.ents)
        count = 1 + copy
        for level in levels:                             # count the blocks first: all or none
            node, idx = path[level]
            copy = copy or idx + 1 < len(node.ents)
            count += 1 + copy
        blocks = self._try_new_blocks(count, near)
        if blocks is None:
            return False
        take = iter(blocks).__next__
        emax = self._block_emax
        moved = leaf.ents[m:] + extra
        border = moved[0].lblk
        right = _Node(take(), 0, emax, moved, None)
        left = _Node(take(), 0, emax, leaf.ents[:m], None) if m < len(leaf.ents) else leaf
        new = [right] if left is leaf else [right, left]
        olds = [] if left is leaf else [leaf.blk]
        for level in levels:
            node, idx = path[level]
            right = _Node(take(), node.depth, emax, [border] + node.ents[idx + 1:],
                          [right] + node.kids[idx + 1:])
            new.append(right)
            if left is not node.kids[idx] or idx + 1 < len(node.ents):
                left = _Node(take(), node.depth, emax, node.ents[:idx + 1], node.kids[:idx] + [left])
                new.append(left)
                olds.append(node.blk)
            else:
                left = node
        for n in new:
            self._write_new(n)
        node, idx = path[at]
        node.kids[idx] = left
        node.ents.insert(idx + 1, border)
        node.kids.insert(idx + 1, right)
        self.inode.blocks += (len(new) - len(olds)) * (self.bs // 512)
        self._store(node)
        for blk in olds:
            self.volume.balloc.free(blk, 1)
        return True

    def _copy_front(self, path: list[tuple[_Node, int]], leaf: _Node, ents: list[Extent]) -> bool:
        """Give the leftmost leaf ``ents``, which start before it did: every index above it
        names its first block, so the leaf and the index nodes down to it are copied and the
        root switches to the copies in one store (then the old nodes are freed)."""
        blocks = self._try_new_blocks(len(path), ents[0].pblk)
        if blocks is None:
            return False
        first = ents[0].lblk
        emax = self._block_emax
        child = _Node(blocks[0], 0, emax, ents, None)
        new = [child]
        olds = [leaf.blk]
        for level in range(len(path) - 1, 0, -1):
            node, _idx = path[level]
            child = _Node(blocks[len(new)], node.depth, emax, [first] + node.ents[1:],
                          [child] + node.kids[1:])
            new.append(child)
            olds.append(node.blk)
        for n in new:
            self._write_new(n)
        root = path[0][0]
        root.ents[0] = first
        root.kids[0] = child
        self._store(root)
        for blk in olds:
            self.volume.balloc.free(blk, 1)
        return True

    def _cut(self, node: _Node, keep: int, freed: list[tuple[int, int]]) -> None:
        """Drop everything from file block ``keep`` on below ``node`` (stored if it is a block),
        adding what it mapped to ``freed``."""
        ents = node.ents
        changed = False
        if node.kids is None:
            while ents and ents[-1].lblk >= keep:
                e = ents.pop()
                freed.append((e.pblk, e.count))
                changed = True
            if ents and ents[-1].lblk + ents[-1].count > keep:
                e = ents[-1]
                n = keep - e.lblk
                ents[-1] = Extent(e.lblk, n, e.pblk, e.unwritten)
                freed.append((e.pblk + n, e.count - n))
                changed = True
        else:
            kids = node.kids
            while ents and ents[-1] >= keep:
                ents.pop()
                _drop(kids.pop(), freed)
                changed = True
            if ents:          # the last child left starts below ``keep``: it keeps something
                self._cut(kids[-1], keep, freed)
        if changed and node.blk:
            self._store(node)

    def _collapse(self, freed: list[tuple[int, int]]) -> None:
        """While the root's children hold no more entries than the root can, move them into it."""
        root = self._tree()
        while root.kids is not None:
            kids = root.kids
            if sum(len(k.ents) for k in kids) > ROOT_MAX_ENTRIES:
                break
            ents: list = []
            grand: list[_Node] = []
            for k in kids:
                ents += k.ents
                if k.kids is not None:
                    grand += k.kids
                freed.append((k.blk, 1))
            root.ents = ents
            root.kids = grand if kids and kids[0].kids is not None else None
            root.depth -= 1
            root.emax = ROOT_MAX_ENTRIES
            if not kids:
                root.depth = 0
                root.kids = None

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
