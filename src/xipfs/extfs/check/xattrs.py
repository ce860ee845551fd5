"""Pass 1's checks of extended attributes: the entries in an inode body (e2fsck's
``check_ea_in_inode``) and xattr blocks (``check_ext_attr``), and the entry hash they verify."""

from __future__ import annotations

from .. import layout as L
from ..xattr import entry_hash, entry_hash_signed
from . import problems as P
from .context import Context, XattrRef, u32

#: e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash
_XENTRY = L.XATTR_ENTRY.struct.unpack_from
_XENTRY_SIZE = L.XATTR_ENTRY.size
_XHEADER = L.XATTR_HEADER.select("h_magic", "h_refcount", "h_blocks").unpack_from
_XHEADER_SIZE = L.XATTR_HEADER.size
XATTR_MAGIC = L.XATTR_MAGIC


def xattr_hash(name: bytes, value: bytes | memoryview, signed: bool) -> int:
    """The hash e2fsprogs stores in an xattr entry (name bytes as ``char``, then value words)."""
    value = bytes(value)
    return entry_hash_signed(name, value) if signed else entry_hash(name, value)


def hash_ok(h: int, name: bytes, value: bytes | memoryview) -> bool:
    """Whether ``h`` is the entry hash of ``name`` and ``value``, either way e2fsck accepts."""
    value = bytes(value)
    return h == entry_hash(name, value) or h == entry_hash_signed(name, value)


class Region:
    """Byte ranges allocated within ``[0, size)``: ``allocate`` says whether a range collides
    with one already taken or leaves the region (e2fsck's region.c)."""

    __slots__ = ("size", "taken")

    def __init__(self, size: int) -> None:
        self.size = size
        self.taken: list[tuple[int, int]] = []

    def allocate(self, start: int, n: int) -> bool:
        end = start + n
        if start < 0 or end > self.size:
            return True
        for a, b in self.taken:
            if start < b and a < end:
                return True
        self.taken.append((start, end))
        return False


def inode_xattrs(c: Context, ino: int, body: memoryview | bytes | bytearray) -> None:
    """The xattr entries in an inode body (from its magic word to the inode's end)."""
    found = ibody_problem(body)
    if found is not None:
        kind, fields = found
        c.report(kind, ino, **fields)


def ibody_problem(body: memoryview | bytes | bytearray) -> tuple[P.ProblemKind, dict[str, int]] | None:
    """The first thing wrong with the entries of an inode body, and its message's fields."""
    size = len(body)
    region = Region(size)
    region.allocate(0, 4)
    remain = size - 4
    pos = 4
    while remain >= _XENTRY_SIZE and u32(body, pos):
        name_len, _index, offs, inum, vsize, h = _XENTRY(body, pos)
        elen = (name_len + _XENTRY_SIZE + 3) & ~3
        if region.allocate(pos, elen):
            return P.INODE_XATTR_OVERLAP, {}
        remain -= _XENTRY_SIZE
        if ((name_len + 3) & ~3) > remain:
            return P.INODE_XATTR_NAME_LEN, {"name_len": name_len}
        remain -= (name_len + 3) & ~3
        if inum:
            return P.INODE_XATTR_EA_INODE, {}
        if vsize > remain:
            return P.INODE_XATTR_VALUE_SIZE, {"size": vsize}
        if vsize and region.allocate(4 + offs, (vsize + 3) & ~3):
            return P.INODE_XATTR_VALUE_OVERLAP, {}
        if h:
            name = bytes(body[pos + _XENTRY_SIZE:pos + _XENTRY_SIZE + name_len])
            if not hash_ok(h, name, body[4 + offs:4 + offs + vsize]):
                return P.INODE_XATTR_HASH, {"hash": h}
        remain -= vsize
        pos += elen
        if pos + 4 > size:
            break
    if region.allocate(pos, 4):
        return P.INODE_XATTR_OVERRUN, {}
    return None


def xattr_block(c: Context, ino: int, blk: int) -> int:
    """Account for inode ``ino``'s xattr block: 1 when it counts in i_blocks, else 0."""
    inside = c.fdb <= blk < c.nblocks
    if not c.sb.has_compat(L.COMPAT_EXT_ATTR) or not inside:
        c.mark_bad(P.XATTR_BLOCK_NO_FEATURE if inside else P.XATTR_BLOCK_OUTSIDE, ino, block=blk)
        return 0
    ref = c.ea_refs.get(blk)
    if ref is not None:
        ref.seen += 1
        return 1
    buf = c.block(blk)
    magic, refcount, nblk = _XHEADER(buf, 0)
    c.ea_refs[blk] = XattrRef(refcount)
    found = block_problem(c, buf, magic, nblk)
    if found is not None:
        kind, fields = found
        c.report(kind, ino, blk, **fields)
    c.claims.append(blk)
    return 1


def block_problem(c: Context, buf: memoryview, magic: int,
                  nblk: int) -> tuple[P.ProblemKind, dict[str, int]] | None:
    """The first thing wrong with an xattr block's header and entries, and its message's fields."""
    bs = c.bs
    if magic != XATTR_MAGIC:
        return P.XATTR_BLOCK_MAGIC, {"magic": magic}
    if nblk != 1:
        return P.XATTR_BLOCK_H_BLOCKS, {"value": nblk}
    region = Region(bs)
    region.allocate(0, _XHEADER_SIZE)
    pos = _XHEADER_SIZE
    while pos + 4 <= bs and u32(buf, pos):
        if pos + _XENTRY_SIZE > bs:
            return P.XATTR_BLOCK_ENTRY_PAST, {}
        name_len, index, offs, inum, vsize, h = _XENTRY(buf, pos)
        elen = (name_len + _XENTRY_SIZE + 3) & ~3
        if region.allocate(pos, elen):
            return P.XATTR_BLOCK_OVERLAP, {}
        if index == 0:
            return P.XATTR_BLOCK_INDEX0, {}
        if inum:
            return P.XATTR_BLOCK_EA_INODE, {}
        if offs + vsize > bs:
            return P.XATTR_BLOCK_VALUE_PAST, {"size": vsize, "offset": offs}
        if vsize and region.allocate(offs, (vsize + 3) & ~3):
            return P.XATTR_BLOCK_VALUE_OVERLAP, {}
        name = bytes(buf[pos + _XENTRY_SIZE:pos + _XENTRY_SIZE + name_len])
        if not hash_ok(h, name, buf[offs:offs + vsize]):
            return P.XATTR_BLOCK_HASH, {"hash": h}
        pos += elen
    if region.allocate(pos, 4):
        return P.XATTR_BLOCK_OVERRUN, {}
    return None


def check_refcounts(c: Context) -> None:
    """Every xattr block's reference count against the inodes that named it."""
    for blk, ref in c.ea_refs.items():
        if ref.refcount != ref.seen:
            c.report(P.XATTR_REFCOUNT, block=blk, refcount=ref.refcount, seen=ref.seen)
