"""What pass 1 checks of the ext4 formats (e2fsck's check_blocks_extents, check_blocks_inline_data,
the inode checksum and the journal superblock), on top of the read side's validating walkers.

An extent tree is walked by :func:`~xipfs.extfs.extent.walk_extents` without checksums (its first
breach of the format becomes one ``bad_extent`` problem), then each tree block's checksum is
checked on its own, so a block with a wrong checksum still counts as the file's.
"""

from __future__ import annotations

import struct
from stat import S_IFMT, S_IFREG
from typing import NamedTuple

from ...errors import CorruptImageError
from .. import layout as L
from ..csum import crc32c_raw, inode_seed
from ..extent import ENTRY_SIZE, EXT_MAGIC, walk_extents
from ..inline import IBLOCK_BYTES, data_value
from . import problems as P
from .context import Context, u32

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
    """Report the inodes among ``candidates`` (a 0/1 byte per inode) whose checksum is wrong."""
    isize = c.isize
    i = candidates.find(1)
    while i >= 0:
        off = i * isize
        raw = bytes(table[off:off + isize])
        if not inode_csum_ok(c, base + i + 1, raw):
            c.report(P.INODE_CSUM, base + i + 1)
        i = candidates.find(1, i + 1)


def extent_map(c: Context, ino: int, raw: bytes | memoryview, ft: int, claim: bool = True,
               report: bool = True) -> Mapped:
    """Walk inode ``ino``'s extent tree: problems reported, blocks claimed (``claim``)."""
    root = bytes(raw[_BLOCK_AT:_BLOCK_AT + 60])
    want_pairs = ft in (L.FT_DIR, L.FT_SYMLINK)
    try:
        tree = walk_extents(root, c.block, nblocks_device=c.nblocks, first_data_block=c.fdb)
    except CorruptImageError as e:
        if report:
            c.report(P.EXTENT_BAD, ino, why=e.what)
        return Mapped(0, -1, -1, [] if want_pairs else None, False)
    if report and c.csum and tree.blocks:
        s = seed(c, ino, raw)
        for b in tree.blocks:
            buf = c.block(b)
            emax = _HEADER(buf, 0)[2]
            tail = ENTRY_SIZE + ENTRY_SIZE * emax
            if tail + 4 > c.bs or crc32c_raw(s, buf[:tail]) != u32(buf, tail):
                c.report(P.EXTENT_CSUM, ino, b)
    last = last_init = -1
    pairs: list[tuple[int, int]] | None = [] if want_pairs else None
    dir_max = 1 << (21 - c.log_bs)
    runs = c.runs
    for e in tree.extents:
        end = e.lblk + e.count - 1
        if report and ft == L.FT_DIR:
            if e.unwritten:
                c.report(P.EXTENT_UNINIT_DIR, ino, e.pblk, lblk=e.lblk)
            if end >= dir_max and not c.sb.has_incompat(L.INCOMPAT_LARGEDIR):
                c.report(P.DIR_TOO_BIG, ino, e.pblk, lblk=end)
        last = max(last, end)
        if not e.unwritten:
            last_init = max(last_init, end)
        if claim:
            runs.append((e.pblk, e.count))
        if pairs is not None and len(pairs) <= dir_max:
            pairs.extend((e.lblk + k, e.pblk + k) for k in range(min(e.count, dir_max + 1)))
    if claim:
        c.claims.extend(tree.blocks)
    if c.ratio > 1:
        r = c.ratio
        clusters: set[int] = set()
        for e in tree.extents:
            clusters.update(range(e.pblk // r, (e.pblk + e.count - 1) // r + 1))
        count = (len(clusters) + len({b // r for b in tree.blocks})) * r
    else:
        count = sum(e.count for e in tree.extents) + len(tree.blocks)
    return Mapped(count, last, last_init, pairs, True)


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
