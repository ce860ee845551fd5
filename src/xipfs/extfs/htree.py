"""Reading an htree (dir_index) directory's index: which leaf blocks can hold a name.

Pure functions over ``read_block(lblk) -> bytes | memoryview``, which returns the directory's
logical block ``lblk`` (``bs`` bytes), so they know nothing of volumes or inodes.

Layout (ext4-spec.md section 8): logical block 0 is the root, ``.`` (rec_len 12) and ``..``
(rec_len bs-12), then ``dx_root_info`` at 24 and the entries at 32; an interior node is a fake
empty dirent spanning the block with its entries at 8. Entries are ``{hash, block}``, the first
one's hash field holding ``{limit, count}`` instead (its hash is the node's lower bound). With
metadata_csum a ``dx_tail`` follows the ``limit`` entries. A lookup walks root -> nodes -> leaf
as Linux ``dx_probe`` and goes on to the following leaves while the next index hash, bit 0
cleared, equals the name's hash (``ext4_htree_next_block``): the hash collided across a split.

Every rule Linux and e2fsck apply to what a lookup reads is checked, and a break raises
:class:`CorruptImageError` naming the structure and block; walks are bounded by the depth (at
most 3 index levels) and by the entry counts, so a damaged index cannot loop.
"""

from __future__ import annotations

import struct
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from typing import NamedTuple

from ..errors import CorruptImageError, UnsupportedFeatureError
from . import layout as L
from .csum import crc32c_raw
from .dirhash import DX_HASH_SIPHASH, hash_version, hasher

__all__ = [
    "DxNode", "DxTree", "ReadBlock", "root_limit", "node_limit", "max_depth", "parse_root",
    "parse_node", "dx_csum", "verify_dx_csum", "name_hash", "leaves_for_hash", "candidate_blocks",
    "walk", "index_blocks", "dx_leaf_blocks", "is_index_block", "dx_probe", "pack_index", "new_node",
    "rewrite_index", "insert_entry", "split_node", "new_root",
]

ReadBlock = Callable[[int], "bytes | bytearray | memoryview"]

#: Linux ``dx_get_block``: the high 4 bits of an entry's block are reserved and ignored.
DX_BLOCK_MASK = 0x0FFFFFFF
#: Where the root's info and entries sit (after ``.`` and ``..``), and a node's entries.
ROOT_INFO_OFFSET = 24
ROOT_ENTRIES_OFFSET = 32
NODE_ENTRIES_OFFSET = 8
DX_TAIL_SIZE = 8
_DX_ENTRY_SIZE = L.DX_ENTRY.size
_DIRENT = L.DIRENT.struct.unpack_from                      # inode, rec_len, name_len, file_type
_ROOT_INFO = L.DX_ROOT_INFO.struct.unpack_from             # reserved_zero, hash_version, info_length,
#                                                            indirect_levels, unused_flags
_COUNTLIMIT = L.DX_COUNTLIMIT.struct.unpack_from           # limit, count
_U32 = struct.Struct("<I")
_ZERO4 = bytes(4)
#: Root hash versions a directory may carry (Linux ``dx_probe``, e2fsck pass2).
_KNOWN_VERSIONS = (0, 1, 2, DX_HASH_SIPHASH)


@cache
def _entries_struct(count: int) -> struct.Struct:
    """``count`` dx entries as 2*count little-endian words (layout's DX_ENTRY repeated)."""
    return struct.Struct("<" + L.DX_ENTRY.struct.format.lstrip("<@=!>") * count)


def root_limit(bs: int, metadata_csum: bool) -> int:
    """How many entries the root holds: ``(bs - 32) / 8``, one fewer with metadata_csum."""
    return (bs - ROOT_ENTRIES_OFFSET - (DX_TAIL_SIZE if metadata_csum else 0)) // _DX_ENTRY_SIZE


def node_limit(bs: int, metadata_csum: bool) -> int:
    """How many entries an interior node holds: ``(bs - 8) / 8``, one fewer with metadata_csum."""
    return (bs - NODE_ENTRIES_OFFSET - (DX_TAIL_SIZE if metadata_csum else 0)) // _DX_ENTRY_SIZE


def max_depth(large_dir: bool) -> int:
    """The largest ``indirect_levels`` allowed: 1, or 2 with large_dir (``ext4_dir_htree_level`` - 1)."""
    return 2 if large_dir else 1


def _rec_len(raw: int, bs: int) -> int:
    """``ext4_rec_len_from_disk``: 64 KiB blocks keep rec_len's bits 16-17 in its low bits."""
    if bs < 65536:
        return raw
    if raw in (0, 65535):
        return 65536
    return (raw & 65532) | ((raw & 3) << 16)


def _where(lblk: int, ino: int | None) -> str:
    return f"directory block {lblk}" if ino is None else f"inode {ino}, directory block {lblk}"


class DxNode(NamedTuple):
    """One index block, root or interior node: its entries as parallel lists.

    ``hashes[i]`` is the hash of entry ``i + 1`` (entry 0 has none: it covers everything below
    ``hashes[0]`` within the node's range); ``blocks[i]`` is entry ``i``'s block, masked.
    """

    lblk: int
    limit: int
    count: int
    hashes: list[int]
    blocks: list[int]
    #: Where count/limit are (32 in the root, 8 in a node): what the dx tail checksum covers.
    count_offset: int
    #: Root only (-1 in nodes): dx_root_info's hash_version, indirect_levels and unused_flags.
    hash_version: int = -1
    indirect_levels: int = -1
    flags: int = -1

    def child(self, h: int) -> int:
        """Index of the entry whose range holds hash ``h`` (the last with hash <= h), as dx_probe."""
        return bisect_right(self.hashes, h)


def _entries(buf: bytes | bytearray | memoryview, co: int, lblk: int, limit_want: int, nblocks: int | None,
             csum_seed: int | None, what: str, ino: int | None) -> tuple[int, int, list[int], list[int]]:
    """Check and read the count/limit and entries at ``co``: (limit, count, hashes, blocks).

    The checksum (when ``csum_seed`` is given) is checked as soon as count and limit say where
    it is, before the entries are believed, as Linux checks it when it reads the block."""
    limit, count = _COUNTLIMIT(buf, co)
    if limit != limit_want:
        raise CorruptImageError(f"{what}: limit {limit}, should be {limit_want}", _where(lblk, ino))
    if count == 0 or count > limit:
        raise CorruptImageError(f"{what}: count {count} outside 1..limit {limit}", _where(lblk, ino))
    if csum_seed is not None:
        _verify(buf, co, count, limit, csum_seed, what, lblk, ino)
    flat = _entries_struct(count).unpack_from(buf, co)
    hashes = list(flat[2::2])
    blocks = list(flat[1::2])
    if hashes != sorted(hashes):
        raise CorruptImageError(f"{what}: hashes not in ascending order", _where(lblk, ino))
    top = max(blocks)
    if top > DX_BLOCK_MASK:
        blocks = [b & DX_BLOCK_MASK for b in blocks]
        top = max(blocks)
    if nblocks is not None and top >= nblocks:
        raise CorruptImageError(f"{what}: entry points to block {top}, past the directory's {nblocks} blocks",
                                _where(lblk, ino))
    if min(blocks) == 0:
        raise CorruptImageError(f"{what}: entry points to block 0 (the root)", _where(lblk, ino))
    return limit, count, hashes, blocks


def _check_size(buf: bytes | bytearray | memoryview, bs: int, lblk: int, ino: int | None) -> None:
    if len(buf) != bs:
        raise CorruptImageError(f"directory block of {len(buf)} bytes, not {bs}", _where(lblk, ino))


def parse_root(buf: bytes | bytearray | memoryview, *, bs: int, metadata_csum: bool = False,
               large_dir: bool = False, nblocks: int | None = None, csum_seed: int | None = None,
               ino: int | None = None) -> DxNode:
    """Parse and check block 0 of an htree directory (``.``/``..``, dx_root_info, entries; the
    dx tail checksum too when given the inode's ``csum_seed``)."""
    _check_size(buf, bs, 0, ino)
    where = _where(0, ino)
    d_ino, rec1, nlen1, _ = _DIRENT(buf, 0)
    if _rec_len(rec1, bs) != 12 or nlen1 != 1 or buf[8] != 0x2E:
        raise CorruptImageError("htree root: first entry is not '.' of rec_len 12", where)
    _, rec2, nlen2, _ = _DIRENT(buf, 12)
    if _rec_len(rec2, bs) != bs - 12 or nlen2 != 2 or bytes(buf[20:22]) != b"..":
        raise CorruptImageError(f"htree root: second entry is not '..' of rec_len {bs - 12}", where)
    zero, version, info_len, levels, flags = _ROOT_INFO(buf, ROOT_INFO_OFFSET)
    if zero != 0:
        raise CorruptImageError(f"htree root: reserved_zero is {zero:#x}", where)
    if info_len != 8:
        raise CorruptImageError(f"htree root: info_length {info_len}, should be 8", where)
    if version not in _KNOWN_VERSIONS:
        raise CorruptImageError(f"htree root: unknown hash version {version}", where)
    if flags & 1:
        raise CorruptImageError(f"htree root: unknown flags {flags:#x}", where)
    if levels > max_depth(large_dir):
        raise CorruptImageError(f"htree root: {levels} indirect levels, at most {max_depth(large_dir)}"
                                + ("" if large_dir else " without large_dir"), where)
    limit, count, hashes, blocks = _entries(buf, ROOT_ENTRIES_OFFSET, 0, root_limit(bs, metadata_csum),
                                            nblocks, csum_seed, "htree root", ino)
    return DxNode(0, limit, count, hashes, blocks, ROOT_ENTRIES_OFFSET, version, levels, flags)


def parse_node(buf: bytes | bytearray | memoryview, lblk: int, *, bs: int, metadata_csum: bool = False,
               nblocks: int | None = None, csum_seed: int | None = None, ino: int | None = None) -> DxNode:
    """Parse and check an interior index node (a fake empty dirent spanning the block, then
    entries; the dx tail checksum too when given the inode's ``csum_seed``)."""
    _check_size(buf, bs, lblk, ino)
    d_ino, rec, nlen, _ = _DIRENT(buf, 0)
    if d_ino != 0 or nlen != 0 or _rec_len(rec, bs) != bs:
        raise CorruptImageError("htree node: not an empty entry spanning the block", _where(lblk, ino))
    limit, count, hashes, blocks = _entries(buf, NODE_ENTRIES_OFFSET, lblk, node_limit(bs, metadata_csum),
                                            nblocks, csum_seed, "htree node", ino)
    return DxNode(lblk, limit, count, hashes, blocks, NODE_ENTRIES_OFFSET)


def dx_csum(buf: bytes | bytearray | memoryview, count_offset: int, count: int, limit: int,
            csum_seed: int) -> int:
    """The dx tail checksum: crc32c over the block up to the last entry, dt_reserved, then 4 zeros."""
    tail = count_offset + _DX_ENTRY_SIZE * limit
    # bytes: google-crc32c takes no memoryview or bytearray (it wants a buffer without release)
    crc = crc32c_raw(csum_seed, bytes(buf[:count_offset + _DX_ENTRY_SIZE * count]))
    return crc32c_raw(crc, bytes(buf[tail:tail + 4]) + _ZERO4)


def _verify(buf: bytes | bytearray | memoryview, co: int, count: int, limit: int, csum_seed: int,
            what: str, lblk: int, ino: int | None) -> None:
    tail = co + _DX_ENTRY_SIZE * limit
    if tail + DX_TAIL_SIZE > len(buf):
        raise CorruptImageError(f"{what}: no space for the dx tail", _where(lblk, ino))
    (stored,) = _U32.unpack_from(buf, tail + 4)
    want = dx_csum(buf, co, count, limit, csum_seed)
    if stored != want:
        raise CorruptImageError(f"{what}: checksum {stored:#010x}, should be {want:#010x}", _where(lblk, ino))


def verify_dx_csum(buf: bytes | bytearray | memoryview, node: DxNode, csum_seed: int,
                   ino: int | None = None) -> None:
    """Check a parsed index block's dx tail checksum against the inode checksum seed; raise if wrong."""
    _verify(buf, node.count_offset, node.count, node.limit, csum_seed,
            "htree root" if node.lblk == 0 else "htree node", node.lblk, ino)


def name_hash(root: DxNode, name: bytes, hash_seed: bytes | Sequence[int] | None = None,
              s_flags: int = 0) -> int:
    """The major hash a lookup of ``name`` uses in this directory (root version, seed, s_flags)."""
    if root.hash_version == DX_HASH_SIPHASH:
        raise UnsupportedFeatureError("casefolded encrypted directory (siphash htree)",
                                      ("casefold", "encrypt"))
    return hasher(hash_version(root.hash_version, s_flags), hash_seed)(name)[0]


class _Reader:
    """Reads and checks index blocks for one walk, with the directory's geometry."""

    __slots__ = ("read_block", "bs", "nblocks", "metadata_csum", "csum_seed", "ino", "cache")

    def __init__(self, read_block: ReadBlock, bs: int, nblocks: int | None, metadata_csum: bool,
                 csum_seed: int | None, ino: int | None, cache: dict[int, DxNode] | None = None) -> None:
        self.read_block = read_block
        self.bs = bs
        self.nblocks = nblocks
        self.metadata_csum = metadata_csum
        self.csum_seed = csum_seed
        self.ino = ino
        #: Index blocks already read and checked, by block (a reader's, for a directory that
        #: does not change under it): a later lookup reads only its leaf.
        self.cache = cache

    def root(self, large_dir: bool) -> DxNode:
        cache = self.cache
        if cache is not None and 0 in cache:
            return cache[0]
        root = parse_root(self.read_block(0), bs=self.bs, metadata_csum=self.metadata_csum,
                          large_dir=large_dir, nblocks=self.nblocks, csum_seed=self.csum_seed, ino=self.ino)
        if cache is not None:
            cache[0] = root
        return root

    def node(self, lblk: int, lo: int, hi: int) -> DxNode:
        """The node at ``lblk``, whose parent gives it the hash range [lo, hi]."""
        cache = self.cache
        node = cache.get(lblk) if cache is not None else None
        if node is None:
            node = parse_node(self.read_block(lblk), lblk, bs=self.bs, metadata_csum=self.metadata_csum,
                              nblocks=self.nblocks, csum_seed=self.csum_seed, ino=self.ino)
            if cache is not None:
                cache[lblk] = node
        hashes = node.hashes
        if hashes and (hashes[0] < (lo & ~1) or hashes[-1] > (hi | 1)):
            raise CorruptImageError(f"htree node: hashes {hashes[0]:#x}..{hashes[-1]:#x} outside the range "
                                    f"{lo:#x}..{hi:#x} its parent gives", _where(lblk, self.ino))
        return node


def _bounds(node: DxNode, at: int, lo: int, hi: int) -> tuple[int, int]:
    """The hash range of entry ``at`` of ``node``, whose own range is [lo, hi]."""
    return (node.hashes[at - 1] if at else lo), (node.hashes[at] if at < len(node.hashes) else hi)


def leaves_for_hash(read_block: ReadBlock, h: int, *, bs: int, nblocks: int | None = None,
                    metadata_csum: bool = False, large_dir: bool = False, csum_seed: int | None = None,
                    ino: int | None = None, root: DxNode | None = None,
                    cache: dict[int, DxNode] | None = None) -> Iterator[int]:
    """Yield the leaf blocks that can hold names of major hash ``h``: the one dx_probe reaches,
    then the next ones while the next index hash (bit 0 cleared) is ``h``; lazily, so a caller
    that finds its name stops reading the index. ``cache`` keeps the index blocks read."""
    rd = _Reader(read_block, bs, nblocks, metadata_csum, csum_seed, ino, cache)
    if root is None:
        root = rd.root(large_dir)
    depth = root.indirect_levels
    # dx_probe: one frame per index level, each (node, entry taken, node's hash range)
    nodes = [root]
    ats = [root.child(h)]
    ranges = [(0, 0xFFFFFFFF)]
    path = [0]
    for _ in range(depth):
        parent, at = nodes[-1], ats[-1]
        lblk = parent.blocks[at]
        if lblk in path:
            raise CorruptImageError(f"htree: index cycle, entry points back to block {lblk}",
                                    _where(parent.lblk, ino))
        lo, hi = _bounds(parent, at, *ranges[-1])
        node = rd.node(lblk, lo, hi)
        nodes.append(node)
        ats.append(node.child(h))
        ranges.append((lo, hi))
        path.append(lblk)
    leaf = nodes[-1].blocks[ats[-1]]
    if leaf in path:
        raise CorruptImageError(f"htree: leaf entry points back to index block {leaf}",
                                _where(nodes[-1].lblk, ino))
    yield leaf
    while True:
        # ext4_htree_next_block: step the deepest frame that has entries left ...
        p = len(nodes) - 1
        while True:
            ats[p] += 1
            if ats[p] < nodes[p].count:
                break
            if p == 0:
                return
            p -= 1
        # ... go on only if the hash continues there, then come down its first entries
        if (nodes[p].hashes[ats[p] - 1] & ~1) != h:
            return
        for q in range(p + 1, len(nodes)):
            parent, at = nodes[q - 1], ats[q - 1]
            lblk = parent.blocks[at]
            if lblk in path[:q]:
                raise CorruptImageError(f"htree: index cycle, entry points back to block {lblk}",
                                        _where(parent.lblk, ino))
            lo, hi = _bounds(parent, at, *ranges[q - 1])
            nodes[q] = rd.node(lblk, lo, hi)
            ats[q] = 0
            ranges[q] = (lo, hi)
            path[q] = lblk
        leaf = nodes[-1].blocks[ats[-1]]
        if leaf in path:
            raise CorruptImageError(f"htree: leaf entry points back to index block {leaf}",
                                    _where(nodes[-1].lblk, ino))
        yield leaf


def candidate_blocks(read_block: ReadBlock, name: bytes, *, bs: int, nblocks: int | None = None,
                     hash_seed: bytes | Sequence[int] | None = None, s_flags: int = 0,
                     metadata_csum: bool = False, large_dir: bool = False, csum_seed: int | None = None,
                     ino: int | None = None, cache: dict[int, DxNode] | None = None) -> Iterator[int]:
    """Yield the leaf blocks to scan for ``name``, in order (see :func:`leaves_for_hash`):
    hashes ``name`` with the root's version, ``s_hash_seed`` and ``s_flags``' signedness."""
    rd = _Reader(read_block, bs, nblocks, metadata_csum, csum_seed, ino, cache)
    root = rd.root(large_dir)
    h = name_hash(root, name, hash_seed, s_flags)
    yield from leaves_for_hash(read_block, h, bs=bs, nblocks=nblocks, metadata_csum=metadata_csum,
                               large_dir=large_dir, csum_seed=csum_seed, ino=ino, root=root, cache=cache)


class DxTree(NamedTuple):
    """A whole index: the root, every index block (root included) and the leaves in hash order."""

    root: DxNode
    index: frozenset[int]
    leaves: tuple[int, ...]
    #: Per leaf (same order), the hash range [lo, hi] its index entries give it.
    ranges: tuple[tuple[int, int], ...]


def walk(read_block: ReadBlock, *, bs: int, nblocks: int | None = None, metadata_csum: bool = False,
         large_dir: bool = False, csum_seed: int | None = None, ino: int | None = None) -> DxTree:
    """Read and check the whole index, level by level; every block may be referenced once only."""
    rd = _Reader(read_block, bs, nblocks, metadata_csum, csum_seed, ino)
    root = rd.root(large_dir)
    seen = {0}
    level: list[tuple[DxNode, int, int]] = [(root, 0, 0xFFFFFFFF)]
    for _ in range(root.indirect_levels):
        nxt = []
        for node, lo, hi in level:
            for at, lblk in enumerate(node.blocks):
                if lblk in seen:
                    raise CorruptImageError(f"htree: block {lblk} referenced twice", _where(node.lblk, ino))
                seen.add(lblk)
                clo, chi = _bounds(node, at, lo, hi)
                nxt.append((rd.node(lblk, clo, chi), clo, chi))
        level = nxt
    leaves: list[int] = []
    ranges: list[tuple[int, int]] = []
    for node, lo, hi in level:
        for at, lblk in enumerate(node.blocks):
            if lblk in seen:
                raise CorruptImageError(f"htree: block {lblk} referenced twice", _where(node.lblk, ino))
            seen.add(lblk)
            leaves.append(lblk)
            ranges.append(_bounds(node, at, lo, hi))
    return DxTree(root, frozenset(seen.difference(leaves)), tuple(leaves), tuple(ranges))


def index_blocks(read_block: ReadBlock, *, bs: int, nblocks: int | None = None, metadata_csum: bool = False,
                 large_dir: bool = False, csum_seed: int | None = None,
                 ino: int | None = None) -> frozenset[int]:
    """The logical blocks that hold index (root and nodes), for a listing to skip; see :func:`walk`."""
    return walk(read_block, bs=bs, nblocks=nblocks, metadata_csum=metadata_csum, large_dir=large_dir,
                csum_seed=csum_seed, ino=ino).index


def dx_leaf_blocks(read_block: ReadBlock, *, bs: int, nblocks: int | None = None, metadata_csum: bool = False,
                   large_dir: bool = False, csum_seed: int | None = None,
                   ino: int | None = None) -> tuple[int, ...]:
    """The leaf blocks in hash order (what ``ext4_dx_readdir`` visits); see :func:`walk`."""
    return walk(read_block, bs=bs, nblocks=nblocks, metadata_csum=metadata_csum, large_dir=large_dir,
                csum_seed=csum_seed, ino=ino).leaves


def is_index_block(buf: bytes | bytearray | memoryview, lblk: int, bs: int) -> bool:
    """Whether block ``lblk`` of an htree directory is index, by Linux's test in
    ``__ext4_read_dirblock``: block 0, or a first entry spanning the block. (An empty leaf of a
    directory without metadata_csum looks the same; it holds no names either way.)"""
    if lblk == 0:
        return True
    _, rec, _, _ = _DIRENT(buf, 0)
    return _rec_len(rec, bs) == bs


# -- the write side ------------------------------------------------------------------------------
# Linux ext4_dx_add_entry keeps an index up to date as names come: the index blocks are built
# here as whole blocks (checksummed under metadata_csum), and the caller stores them in an order
# that keeps every instant readable (namei._dx_add).

#: Where dx_root_info's indirect_levels byte is in the root.
_LEVELS_AT = ROOT_INFO_OFFSET + L.DX_ROOT_INFO.offsets["indirect_levels"]


def dx_probe(read_block: ReadBlock, h: int, *, bs: int, nblocks: int | None = None,
             metadata_csum: bool = False, large_dir: bool = False, csum_seed: int | None = None,
             ino: int | None = None,
             cache: dict[int, DxNode] | None = None) -> tuple[list[tuple[DxNode, int]], int]:
    """The index path a name of hash ``h`` goes down (Linux ``dx_probe``): ``[(index block,
    entry taken)]`` from the root to the leaf's parent, and the leaf block."""
    rd = _Reader(read_block, bs, nblocks, metadata_csum, csum_seed, ino, cache)
    root = rd.root(large_dir)
    frames = [(root, root.child(h))]
    lo, hi = 0, 0xFFFFFFFF
    path = [0]
    for _ in range(root.indirect_levels):
        parent, at = frames[-1]
        lblk = parent.blocks[at]
        if lblk in path:
            raise CorruptImageError(f"htree: index cycle, entry points back to block {lblk}",
                                    _where(parent.lblk, ino))
        lo, hi = _bounds(parent, at, lo, hi)
        node = rd.node(lblk, lo, hi)
        frames.append((node, node.child(h)))
        path.append(lblk)
    node, at = frames[-1]
    leaf = node.blocks[at]
    if leaf in path:
        raise CorruptImageError(f"htree: leaf entry points back to index block {leaf}",
                                _where(node.lblk, ino))
    return frames, leaf


def pack_index(buf: bytearray, count_offset: int, limit: int, hashes: Sequence[int], blocks: Sequence[int],
               csum_seed: int | None = None) -> bytearray:
    """Write ``{limit, count}`` and the entries (``hashes[i]`` is entry ``i + 1``'s) into index
    block ``buf`` at ``count_offset``, the unused entry slots zeroed; with ``csum_seed`` the dx
    tail and its checksum too. Returns ``buf``."""
    count = len(blocks)
    if not 0 < count <= limit or len(hashes) != count - 1:
        raise ValueError(f"{count} index entries for {len(hashes)} hashes, limit {limit}")
    flat = [limit | count << 16, blocks[0]]
    for hv, blk in zip(hashes, blocks[1:], strict=True):
        flat += (hv, blk)
    _entries_struct(count).pack_into(buf, count_offset, *flat)
    tail = count_offset + _DX_ENTRY_SIZE * limit
    buf[count_offset + _DX_ENTRY_SIZE * count:tail] = bytes(tail - count_offset - _DX_ENTRY_SIZE * count)
    if csum_seed is not None:
        buf[tail:tail + 4] = _ZERO4
        _U32.pack_into(buf, tail + 4, dx_csum(buf, count_offset, count, limit, csum_seed))
    return buf


def new_node(bs: int, limit: int, hashes: Sequence[int], blocks: Sequence[int],
             csum_seed: int | None = None) -> bytes:
    """A whole interior index block: the fake empty dirent spanning it, then the entries."""
    buf = bytearray(bs)
    L.DIRENT.struct.pack_into(buf, 0, 0, min(bs, 65535), 0, 0)   # 65535: a whole 64 KiB block
    return bytes(pack_index(buf, NODE_ENTRIES_OFFSET, limit, hashes, blocks, csum_seed))


def new_root(dots: bytes | bytearray | memoryview, bs: int, hash_version: int, limit: int,
             hashes: Sequence[int], blocks: Sequence[int], csum_seed: int | None = None) -> bytes:
    """A whole root block for a directory being indexed (Linux ``make_indexed_dir``): its ``.``
    and ``..`` entries (the old block's first 24 bytes) kept, ``..`` stretched over the rest,
    dx_root_info of ``hash_version`` with no indirect levels, then the entries (and dx tail)."""
    if len(dots) < ROOT_INFO_OFFSET:
        raise ValueError(f"'.' and '..' take {ROOT_INFO_OFFSET} bytes, not {len(dots)}")
    buf = bytearray(bs)
    buf[:ROOT_INFO_OFFSET] = dots[:ROOT_INFO_OFFSET]
    L.DIRENT.codes["rec_len"].pack_into(buf, 12 + L.DIRENT.offsets["rec_len"], bs - 12)
    L.DX_ROOT_INFO.struct.pack_into(buf, ROOT_INFO_OFFSET, 0, hash_version, 8, 0, 0)
    return bytes(pack_index(buf, ROOT_ENTRIES_OFFSET, limit, hashes, blocks, csum_seed))


def rewrite_index(old: bytes | bytearray | memoryview, node: DxNode, hashes: Sequence[int],
                  blocks: Sequence[int], csum_seed: int | None = None, levels: int | None = None) -> bytes:
    """Index block ``old`` (parsed as ``node``) with new entries (and, for the root, a new
    ``indirect_levels``), as the whole block to store."""
    buf = bytearray(old)
    if levels is not None:
        if node.lblk != 0:
            raise ValueError("only the root has indirect_levels")
        buf[_LEVELS_AT] = levels
    return bytes(pack_index(buf, node.count_offset, node.limit, hashes, blocks, csum_seed))


def insert_entry(node: DxNode, at: int, h: int, block: int) -> tuple[list[int], list[int]]:
    """``node``'s entries with ``{h, block}`` inserted right after entry ``at``
    (``dx_insert_block``): ``(hashes, blocks)``."""
    hashes = list(node.hashes)
    blocks = list(node.blocks)
    hashes.insert(at, h)
    blocks.insert(at + 1, block)
    return hashes, blocks


def split_node(node: DxNode) -> tuple[tuple[list[int], list[int]], tuple[list[int], list[int]], int]:
    """Split a full index block's entries in two as Linux does (``count / 2`` stay): the kept
    ``(hashes, blocks)``, the moved ones, and the hash the parent files the moved half under."""
    keep = node.count // 2
    hash2 = node.hashes[keep - 1]
    return ((node.hashes[:keep - 1], node.blocks[:keep]),
            (node.hashes[keep:], node.blocks[keep:]), hash2)
