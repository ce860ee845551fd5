"""What pass 1 checks of the ext4 formats (e2fsck's check_blocks_extents, check_blocks_inline_data,
the inode checksum and the journal superblock), on top of the read side's validating walkers.

An extent tree is walked by :func:`~xipfs.extfs.extent.walk_extents` without checksums (its first
breach of the format becomes one ``bad_extent`` problem), then each tree block's checksum is
checked on its own, so a block with a wrong checksum still counts as the file's.
"""

from __future__ import annotations

import struct
import sys
from array import array
from itertools import repeat
from operator import add, and_, itemgetter, ne
from stat import S_IFMT, S_IFREG
from typing import NamedTuple

from google_crc32c import extend as _extend

from ...errors import CorruptImageError
from .. import layout as L
from ..csum import crc32c_raw, inode_seed
from ..extent import ENTRY_SIZE, EXT_MAGIC, LBLK_LIMIT, _root_extents, walk_extents
from ..inline import IBLOCK_BYTES, data_value
from . import problems as P
from .context import NONZERO, Context, u32

_BLOCK_AT = L.INODE.offsets["i_block"]
_GENERATION_AT = L.INODE_LARGE.offsets["i_generation"]
_CSUM_LO_AT = L.INODE_LARGE.offsets["i_checksum_lo"]
_CSUM_HI_AT = L.INODE_LARGE.offsets["i_checksum_hi"]
_U16 = struct.Struct("<H").unpack_from
_HEADER = struct.Struct("<HHHH").unpack_from
#: JBD2 superblock: magic, block type (big-endian), then s_blocksize, s_maxlen, s_first
_JSB = struct.Struct(">III").unpack_from
_JSB_GEOMETRY = struct.Struct(">III").unpack_from
JBD2_MAGIC = 0xC03B3998


class Mapped(NamedTuple):
    """What an extent tree maps: blocks counted in i_blocks (clusters times the ratio with
    bigalloc), the last logical block mapped and the last one written, ``(logical, physical)``
    pairs (directories and symlinks only)."""

    count: int
    last: int
    last_init: int
    pairs: list[tuple[int, int]] | None
    ok: bool


def seed(c: Context, ino: int, raw: bytes | memoryview) -> int:
    """The checksum seed of inode ``ino`` (from its generation)."""
    return inode_seed(c.csum_seed, ino, u32(raw, _GENERATION_AT))


def inode_csum_ok(c: Context, ino: int, raw: bytes) -> bool:
    """Whether inode ``ino``'s checksum matches (16 bits in small inodes, else 32)."""
    isize = len(raw)
    stored = _U16(raw, _CSUM_LO_AT)[0]
    has_hi = isize > 128 and _U16(raw, 128)[0] >= 4
    if has_hi:
        stored |= _U16(raw, _CSUM_HI_AT)[0] << 16
        data = (raw[:_CSUM_LO_AT] + b"\0\0" + raw[_CSUM_LO_AT + 2:_CSUM_HI_AT] + b"\0\0"
                + raw[_CSUM_HI_AT + 2:])
    else:
        data = raw[:_CSUM_LO_AT] + b"\0\0" + raw[_CSUM_LO_AT + 2:]
    crc = crc32c_raw(seed(c, ino, raw), data)
    return (crc if has_hi else crc & 0xFFFF) == stored or raw.count(0) == isize


def check_inode_csums(c: Context, base: int, table: bytes | bytearray, candidates: bytes) -> None:
    """Report the inodes among ``candidates`` (a 0/1 byte per inode) whose checksum is wrong.

    The stored checksums are read first, then zeroed in a copy of the whole piece (strided
    slices), so that each inode costs one CRC call over ``ino, generation, inode``: the seed
    chain and the inode in one stream (``crc32c_raw`` chains). When most inodes of the piece are
    candidates, the calls are driven by ``map`` over the piece (no Python per inode) and only
    the inodes whose sum differs are looked at again; inodes whose ``i_extra_isize`` leaves no
    room for the high half are checked one by one.
    """
    isize = c.isize
    n = len(candidates)
    work = table[:n * isize] if isinstance(table, bytearray) else bytearray(table[:n * isize])   # a copy
    stored = _column16(work, _CSUM_LO_AT, isize, n)
    zeros = bytes(n)
    work[_CSUM_LO_AT::isize] = zeros
    work[_CSUM_LO_AT + 1::isize] = zeros
    large = isize > 128
    if large:
        stored_hi = _column16(work, _CSUM_HI_AT, isize, n)
        extra = _column16(work, 128, isize, n)
        work[_CSUM_HI_AT::isize] = zeros
        work[_CSUM_HI_AT + 1::isize] = zeros
    data = work                 # (its slices join bytes: the CRC library takes bytes only)
    seed = c.csum_seed ^ 0xFFFFFFFF
    if 2 * candidates.count(1) >= n and sys.byteorder == "little":
        candidates = differing_csums(c, base, data, candidates, stored, stored_hi if large else None)
    i = candidates.find(1)
    while i >= 0:
        off = i * isize
        ino = base + i + 1
        if large and extra[i] < 4:
            if not inode_csum_ok(c, ino, bytes(table[off:off + isize])):
                c.report(P.INODE_CSUM, ino)
        else:
            gen = off + _GENERATION_AT
            crc = _extend(seed, ino.to_bytes(4, "little") + data[gen:gen + 4] + data[off:off + isize]) \
                ^ 0xFFFFFFFF
            if (crc != (stored_hi[i] << 16 | stored[i]) if large else crc & 0xFFFF != stored[i]) \
                    and bytes(table[off:off + isize]).count(0) != isize:
                c.report(P.INODE_CSUM, ino)
        i = candidates.find(1, i + 1)


def differing_csums(c: Context, base: int, data: bytes | bytearray, candidates: bytes, stored: array,
                    stored_hi: array | None) -> bytes:
    """The candidates whose checksum may be wrong (to be checked one by one): every inode's CRC
    computed by ``map`` (each record ``ino, generation`` then the inode with its sums zeroed),
    compared with the stored sums as arrays. Small ``i_extra_isize`` stays a candidate."""
    isize = c.isize
    n = len(candidates)
    heads = bytearray(8 * n)                              # ino, generation: 8 bytes per record
    inos = array("I", range(base + 1, base + n + 1)).tobytes()
    for k in range(4):
        heads[k::8] = inos[k::4]
        heads[4 + k::8] = data[_GENERATION_AT + k::isize]
    records = map(add, map(itemgetter(0), _HEAD.iter_unpack(heads)),
                  map(itemgetter(0), struct.Struct(f"{isize}s").iter_unpack(data)))
    crcs = array("I", map(_extend, repeat(c.csum_seed ^ 0xFFFFFFFF), records))
    # the library's CRC is the raw sum inverted: compare with the stored sums inverted
    if stored_hi is None:                                 # 16 bits: the low half
        want = array("H", _inverted(stored.tobytes()))
        crcs = map(and_, crcs, repeat(0xFFFF))
    else:
        both = bytearray(4 * n)
        lo, hi = stored.tobytes(), stored_hi.tobytes()
        both[0::4], both[1::4], both[2::4], both[3::4] = lo[0::2], lo[1::2], hi[0::2], hi[1::2]
        want = array("I", _inverted(both))
    differ = int.from_bytes(bytes(map(ne, crcs, want)), "little")
    if stored_hi is not None:
        extra_lo, extra_hi = data[128::isize], data[129::isize]
        small = int.from_bytes(extra_lo.translate(_BELOW_4), "little") & ~int.from_bytes(
            extra_hi.translate(NONZERO), "little")
        differ |= small
    return (differ & int.from_bytes(candidates, "little")).to_bytes(n, "little")


def _inverted(b: bytes | bytearray) -> bytes:
    """Every bit of ``b`` flipped."""
    n = len(b)
    return (int.from_bytes(b, "little") ^ int.from_bytes(b"\xff" * n, "little")).to_bytes(n, "little")


_HEAD = struct.Struct("8s")
_BELOW_4 = bytes([b < 4 for b in range(256)])


def _column16(buf: bytes | bytearray, at: int, stride: int, n: int) -> array:
    """The little-endian 16-bit field at ``at`` (even) of each of ``n`` records of ``stride``
    (even) bytes."""
    with memoryview(buf) as mv, mv.cast("B")[:n * stride] as b, b.cast("H") as words:
        col = array("H", words[at // 2::stride // 2][:n].tobytes())
    if sys.byteorder != "little":
        col.byteswap()
    return col


def extent_map(c: Context, ino: int, raw: bytes | memoryview, ft: int, claim: bool = True,
               report: bool = True) -> Mapped:
    """Walk inode ``ino``'s extent tree: problems reported, blocks claimed (``claim``)."""
    want_pairs = ft in (L.FT_DIR, L.FT_SYMLINK)
    extents = root_extents(c, raw)
    blocks: list[int] = []
    if extents is None:                      # a tree with blocks, or a root that breaks a rule
        try:
            tree = walk_extents(bytes(raw[_BLOCK_AT:_BLOCK_AT + 60]), c.block, nblocks_device=c.nblocks,
                                first_data_block=c.fdb)
        except CorruptImageError as e:
            if report:
                c.report(P.EXTENT_BAD, ino, why=e.what)
            return Mapped(0, -1, -1, [] if want_pairs else None, False)
        extents, blocks = tree.extents, tree.blocks
        if report and c.csum and blocks:
            tree_csums(c, ino, raw, blocks)
    last = last_init = -1
    pairs: list[tuple[int, int]] | None = [] if want_pairs else None
    runs = c.runs
    count = 0
    if ft == L.FT_DIR or pairs is not None:
        dir_max = 1 << (21 - c.log_bs)
        for lblk, n, pblk, unwritten in extents:
            end = lblk + n - 1
            if report and ft == L.FT_DIR:
                if unwritten:
                    c.report(P.EXTENT_UNINIT_DIR, ino, pblk, lblk=lblk)
                if end >= dir_max and not c.sb.has_incompat(L.INCOMPAT_LARGEDIR):
                    c.report(P.DIR_TOO_BIG, ino, pblk, lblk=end)
            if end > last:
                last = end
            if not unwritten and end > last_init:
                last_init = end
            count += n
            if claim:
                runs.append((pblk, n))
            if pairs is not None and len(pairs) <= dir_max:
                k = min(n, dir_max + 1)
                pairs.extend(zip(range(lblk, lblk + k), range(pblk, pblk + k), strict=True))
    else:
        for lblk, n, pblk, unwritten in extents:
            end = lblk + n - 1
            if end > last:
                last = end
            if not unwritten and end > last_init:
                last_init = end
            count += n
            if claim:
                runs.append((pblk, n))
    if claim and blocks:
        c.claims.extend(blocks)
    if c.ratio > 1:
        r = c.ratio
        clusters: set[int] = set()
        for _lblk, n, pblk, _unwritten in extents:
            clusters.update(range(pblk // r, (pblk + n - 1) // r + 1))
        count = (len(clusters) + len({b // r for b in blocks})) * r
    else:
        count += len(blocks)
    return Mapped(count, last, last_init, pairs, True)


#: A root of depth 0 in ``i_block``: the header (magic, entries, max, depth, generation), then
#: four leaf entries (first file block, length, start high, start low).
_INIT_MAX = 1 << 15
#: ``(first file block, count, first device block, unwritten)``, as :class:`~..extent.Extent`.
RootExtent = tuple[int, int, int, bool]


def root_extents(c: Context, raw: bytes | memoryview) -> list[RootExtent] | None:
    """The extents of a depth-0 root that keeps every rule of the walker (most files: no
    walker), as the reader takes them (``extent._root_extents``); None for a deeper tree or any
    breach (the walker then says which)."""
    return _root_extents(bytes(raw[_BLOCK_AT:_BLOCK_AT + IBLOCK_BYTES]), c.fdb, c.nblocks)


def words_extents(v: tuple[int, ...], at: int, fdb: int, limit: int) -> list[RootExtent] | None:
    """:func:`root_extents` from ``i_block`` already decoded as 15 words (``v[at:at + 15]``,
    as pass 1 decodes every inode): the same rules without a second ``struct`` call, for pass
    1's loop over every inode."""
    head, geometry = v[at], v[at + 1]
    entries = head >> 16
    emax = geometry & 0xFFFF
    if head & 0xFFFF != EXT_MAGIC or geometry >> 16 or not 2 <= emax <= 4 or entries > emax:
        return None
    out = []
    cur = 0
    for k in range(at + 3, at + 3 + 3 * entries, 3):
        lblk, word, lo = v[k], v[k + 1], v[k + 2]
        ee_len = word & 0xFFFF
        unwritten = ee_len > _INIT_MAX
        n = ee_len - _INIT_MAX if unwritten else ee_len
        pblk = (word >> 16) << 32 | lo
        end = lblk + n
        if not n or lblk < cur or end > LBLK_LIMIT or fdb >= pblk or pblk + n > limit:
            return None
        cur = end
        out.append((lblk, n, pblk, unwritten))
    return out


def tree_csums(c: Context, ino: int, raw: bytes | memoryview, blocks: list[int]) -> None:
    """Each extent tree block's checksum tail (reported one by one: the block still counts)."""
    s = seed(c, ino, raw)
    for b in blocks:
        buf = c.block(b)
        emax = _HEADER(buf, 0)[2]
        tail = ENTRY_SIZE + ENTRY_SIZE * emax
        if tail + 4 > c.bs or crc32c_raw(s, buf[:tail]) != u32(buf, tail):
            c.report(P.EXTENT_CSUM, ino, b)


def extent_blocks(c: Context, raw: bytes) -> list[int]:
    """Every block inode ``raw``'s extent tree holds (its tree blocks, then its data), quietly."""
    if not has_extent_header(raw):
        return []
    try:
        tree = walk_extents(raw[_BLOCK_AT:_BLOCK_AT + 60], c.block, nblocks_device=c.nblocks,
                            first_data_block=c.fdb)
    except CorruptImageError:
        return []
    out = list(tree.blocks)
    for e in tree.extents:
        out.extend(range(e.pblk, e.pblk + e.count))
    return out


def has_extent_header(raw: bytes | memoryview) -> bool:
    """Whether ``i_block`` starts with an extent header (the inode's tree may be walked)."""
    return _U16(raw, _BLOCK_AT)[0] == EXT_MAGIC


def inline_size(c: Context, ino: int, raw: bytes | memoryview) -> int:
    """The bytes an inline inode holds (60 + its system.data value), or -1 when it has none."""
    extra = _U16(raw, 128)[0] if c.isize > 128 else 0
    try:
        return IBLOCK_BYTES + data_value(raw, c.isize, extra, ino)[1]
    except (CorruptImageError, struct.error):
        return -1


def inline_regions(c: Context, ino: int, raw: bytes | memoryview) -> list[bytes]:
    """The entry regions of an inline directory: ``i_block`` past the parent, then the value."""
    extra = _U16(raw, 128)[0] if c.isize > 128 else 0
    out = [bytes(raw[_BLOCK_AT + 4:_BLOCK_AT + IBLOCK_BYTES])]
    try:
        at, size = data_value(raw, c.isize, extra, ino)
    except (CorruptImageError, struct.error):
        return out
    if size:
        out.append(bytes(raw[at:at + size]))
    return out


def symlink_block(c: Context, raw: bytes | memoryview) -> int:
    """The one block of a slow extent-mapped symlink as e2fsck wants it (one extent of one block
    at logical 0, in the inode), or 0."""
    if not has_extent_header(raw):
        return 0
    _magic, entries, _max, depth = _HEADER(raw, _BLOCK_AT)
    if entries != 1 or depth != 0:
        return 0
    lblk, length, hi, lo = struct.unpack_from("<IHHI", raw, _BLOCK_AT + 12)
    pblk = hi << 32 | lo
    if lblk != 0 or length != 1 or not c.fdb <= pblk < c.nblocks:
        return 0
    return pblk


def check_journal(c: Context) -> None:
    """The internal journal: inode 8 in use, and its first block a JBD2 superblock for this
    block size (e2fsck_check_ext3_journal)."""
    if not c.sb.has_compat(L.COMPAT_HAS_JOURNAL) or c.f["s_journal_inum"] != L.JOURNAL_INO:
        return
    ino = L.JOURNAL_INO
    raw = c.inode_view(ino)
    if raw is None:
        return
    raw = bytes(raw)
    v = struct.unpack_from("<HHIIIIIHH", raw, 0)
    mode, nlinks = v[0], v[8]
    if not nlinks or S_IFMT(mode) != S_IFREG:
        c.report(P.JOURNAL_NOT_IN_USE, ino)
        return
    flags = u32(raw, L.INODE.offsets["i_flags"])
    first = 0
    if flags & L.FL_EXTENTS:
        try:
            tree = walk_extents(raw[_BLOCK_AT:_BLOCK_AT + 60], c.block, nblocks_device=c.nblocks,
                                first_data_block=c.fdb)
        except CorruptImageError:
            return                       # reported with the inode's blocks
        first = next((e.pblk for e in tree.extents if e.lblk == 0 and not e.unwritten), 0)
    else:
        first = u32(raw, _BLOCK_AT)
    if not c.fdb <= first < c.nblocks or not first:
        c.report(P.JOURNAL_BAD_SUPER, ino, why="no block 0")
        return
    buf = c.block(first)
    magic, btype, _seq = _JSB(buf, 0)
    if magic != JBD2_MAGIC:
        c.report(P.JOURNAL_BAD_SUPER, ino, first, why=f"magic 0x{magic:08x}")
    elif btype not in (3, 4):
        c.report(P.JOURNAL_BAD_SUPER, ino, first, why=f"block type {btype}")
    else:
        bsize, _maxlen, _first = _JSB_GEOMETRY(buf, 12)
        if bsize != c.bs:
            c.report(P.JOURNAL_BAD_SUPER, ino, first, why=f"block size {bsize}")
        else:                                 # features, checksum type, the v2/v3 checksum
            from ...errors import UnsupportedFeatureError
            from ..journal import parse_superblock
            try:
                parse_superblock(buf)
            except CorruptImageError as exc:
                c.report(P.JOURNAL_BAD_SUPER, ino, first, why=exc.what)
            except UnsupportedFeatureError as exc:
                c.report(P.JOURNAL_BAD_SUPER, ino, first, why=str(exc))
