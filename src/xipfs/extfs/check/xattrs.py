"""Pass 1's checks of extended attributes: the entries in an inode body (e2fsck's
``check_ea_in_inode``) and xattr blocks (``check_ext_attr``), the entry hash they verify, and
(ext4 ea_inode) the entries whose values are in inodes of their own (``check_large_ea_inode``):
the inode they name, the references to it that pass 4 compares with its count, and the value's
clusters charged to the owner's ``i_blocks``."""

from __future__ import annotations

import struct

from .. import layout as L
from ..xattr import block_checksum, entry_hash, entry_hash_signed
from . import problems as P
from .context import Context, XattrRef, u32

#: e_name_len, e_name_index, e_value_offs, e_value_inum, e_value_size, e_hash
_XENTRY = L.XATTR_ENTRY.struct.unpack_from
_XENTRY_SIZE = L.XATTR_ENTRY.size
_XHEADER = L.XATTR_HEADER.select("h_magic", "h_refcount", "h_blocks").unpack_from
_XHEADER_SIZE = L.XATTR_HEADER.size
_CSUM_AT = L.XATTR_HEADER.offsets["h_checksum"]
_LE32 = struct.Struct("<I").pack
#: where an EA inode keeps what its entries are checked against
_FLAGS_AT = L.INODE.offsets["i_flags"]
_ATIME_AT = L.INODE.offsets["i_atime"]
_MTIME_AT = L.INODE.offsets["i_mtime"]
_GENERATION_AT = L.INODE.offsets["i_generation"]
_SIZE_AT = L.INODE.offsets["i_size"]
_SIZE_HIGH_AT = L.INODE.offsets["i_size_high"]
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


def inode_xattrs(c: Context, ino: int, body: memoryview | bytes | bytearray, gen: int) -> int:
    """The xattr entries in inode ``ino``'s body (from its magic word to the inode's end, ``gen``
    its i_generation): problems reported, references to EA inodes counted; the clusters of the
    values in EA inodes checked before any problem, which e2fsck charges to its ``i_blocks``."""
    size = len(body)
    region = Region(size)
    region.allocate(0, 4)
    remain = size - 4
    pos = 4
    quota = 0
    named = stopped = False
    found: tuple[P.ProblemKind, dict[str, int]] | None = None
    while remain >= _XENTRY_SIZE and u32(body, pos):
        name_len, index, offs, inum, vsize, h = _XENTRY(body, pos)
        elen = (name_len + _XENTRY_SIZE + 3) & ~3
        if region.allocate(pos, elen):
            found = P.INODE_XATTR_OVERLAP, {}
            break
        remain -= _XENTRY_SIZE
        if ((name_len + 3) & ~3) > remain:
            found = P.INODE_XATTR_NAME_LEN, {"name_len": name_len}
            break
        remain -= (name_len + 3) & ~3
        name = body[pos + _XENTRY_SIZE:pos + _XENTRY_SIZE + name_len]
        if inum:                              # the value is in an inode of its own
            if not named and not c.ea_inode:
                c.report(P.INODE_XATTR_EA_INODE, ino)
            named = True
            charged, ok = ea_value(c, ino, gen, index, bytes(name), inum, vsize, h, None)
            if not ok:
                stopped = True
                break
            quota += charged
        else:
            if vsize > remain:
                found = P.INODE_XATTR_VALUE_SIZE, {"size": vsize}
                break
            if vsize and region.allocate(4 + offs, (vsize + 3) & ~3):
                found = P.INODE_XATTR_VALUE_OVERLAP, {}
                break
            if h and not hash_ok(h, name, body[4 + offs:4 + offs + vsize]):
                found = P.INODE_XATTR_HASH, {"hash": h}
                break
            remain -= vsize
        pos += elen
        if pos + 4 > size:
            break
    if found is None and not stopped and region.allocate(pos, 4):
        found = P.INODE_XATTR_OVERRUN, {}
    if found is not None:
        kind, fields = found
        c.report(kind, ino, **fields)
    if named or stopped or found is not None:
        count_ea_refs(c, body, 4, size)
    return quota


def xattr_block(c: Context, ino: int, blk: int, gen: int = 0) -> int:
    """Account for inode ``ino``'s xattr block (``gen`` the inode's i_generation): the clusters
    it charges to i_blocks, its own and those of the values it keeps in EA inodes (0 when it
    counts none)."""
    inside = c.fdb <= blk < c.nblocks
    if not c.sb.has_compat(L.COMPAT_EXT_ATTR) or not inside:
        c.mark_bad(P.XATTR_BLOCK_NO_FEATURE if inside else P.XATTR_BLOCK_OUTSIDE, ino, block=blk)
        return 0
    ref = c.ea_refs.get(blk)
    if ref is not None:
        ref.seen += 1
        return 1 + ref.quota
    buf = c.block(blk)
    magic, refcount, nblk = _XHEADER(buf, 0)
    ref = c.ea_refs[blk] = XattrRef(refcount)
    found, ref.quota, named = block_entries(c, ino, blk, gen, buf, magic, nblk)
    if found is None and c.csum and u32(buf, _CSUM_AT) != block_checksum(c.csum_seed, blk, buf):
        found = P.XATTR_BLOCK_CSUM, {}          # e2fsck: "passes checks, but checksum does not match"
    if found is not None:
        kind, fields = found
        c.report(kind, ino, blk, **fields)
    if named or found is not None:
        count_ea_refs(c, buf, _XHEADER_SIZE, c.bs)
    c.claims.append(blk)
    return 1 + ref.quota


def block_entries(c: Context, ino: int, blk: int, gen: int, buf: memoryview, magic: int,
                  nblk: int) -> tuple[tuple[P.ProblemKind, dict[str, int]] | None, int, bool]:
    """An xattr block's header and entries: the first thing wrong with them and its message's
    fields (entries naming EA inodes report their own problems), the clusters of the values in
    EA inodes, and whether any entry names one."""
    bs = c.bs
    if magic != XATTR_MAGIC:
        return (P.XATTR_BLOCK_MAGIC, {"magic": magic}), 0, False
    if nblk != 1:
        return (P.XATTR_BLOCK_H_BLOCKS, {"value": nblk}), 0, False
    region = Region(bs)
    region.allocate(0, _XHEADER_SIZE)
    pos = _XHEADER_SIZE
    quota = 0
    named = False
    while pos + 4 <= bs and u32(buf, pos):
        if pos + _XENTRY_SIZE > bs:
            return (P.XATTR_BLOCK_ENTRY_PAST, {}), quota, named
        name_len, index, offs, inum, vsize, h = _XENTRY(buf, pos)
        elen = (name_len + _XENTRY_SIZE + 3) & ~3
        if region.allocate(pos, elen):
            return (P.XATTR_BLOCK_OVERLAP, {}), quota, named
        if index == 0:
            return (P.XATTR_BLOCK_INDEX0, {}), quota, named
        name = bytes(buf[pos + _XENTRY_SIZE:pos + _XENTRY_SIZE + name_len])
        if inum:                              # the value is in an inode of its own
            if not named and not c.ea_inode:
                c.report(P.XATTR_BLOCK_EA_INODE, ino, blk)
            named = True
            quota += ea_value(c, ino, gen, index, name, inum, vsize, h, blk)[0]
        else:
            if offs + vsize > bs:
                return (P.XATTR_BLOCK_VALUE_PAST, {"size": vsize, "offset": offs}), quota, named
            if vsize and region.allocate(offs, (vsize + 3) & ~3):
                return (P.XATTR_BLOCK_VALUE_OVERLAP, {}), quota, named
            if not hash_ok(h, name, buf[offs:offs + vsize]):
                return (P.XATTR_BLOCK_HASH, {"hash": h}), quota, named
        pos += elen
    if region.allocate(pos, 4):
        return (P.XATTR_BLOCK_OVERRUN, {}), quota, named
    return None, quota, named


def ea_value(c: Context, owner: int, gen: int, index: int, name: bytes, inum: int, size: int, h: int,
             blk: int | None) -> tuple[int, bool]:
    """An entry of inode ``owner`` (in its body, or in xattr block ``blk``) whose value is in
    inode ``inum`` (e2fsck's check_large_ea_inode): ``(clusters charged, no problem found)``.

    The entry hash must be the name's hashed with the EA inode's value hash (``i_atime``), or
    the inode a legacy Lustre one (``i_mtime`` and ``i_generation`` the owner's: nothing
    charged); an inode that matches neither way and has no EA_INODE flag is no EA inode. One
    whose hash matches must have the flag (the value is still charged, as e2fsck charges it in
    a block), and hold exactly the value: ``i_size`` the entry's nonzero value size, which Linux
    requires and e2fsck 1.47.0 does not check, so this one problem is reported without changing
    what the entry counts for.
    """
    fields = {"name": entry_name(index, name), "target": inum}
    if not c.first_ino <= inum <= c.ninodes:
        c.report(P.EA_INODE_OUTSIDE, owner, blk, **fields)
        return 0, False
    raw = c.inode_view(inum)
    clusters = -(-size // (c.bs * c.ratio))
    if raw is None:                            # its inode table is unusable: nothing to compare
        return clusters, True
    flags = u32(raw, _FLAGS_AT)
    value_hash = u32(raw, _ATIME_AT)
    if hash_ok(h, name, _LE32(value_hash)):
        charged = clusters
    elif u32(raw, _MTIME_AT) == owner and u32(raw, _GENERATION_AT) == gen:
        charged = 0                            # a Lustre EA inode: its owner is in i_mtime
    elif not flags & L.FL_EA_INODE:
        c.report(P.EA_INODE_NOT_EA, owner, blk, **fields)
        return 0, False
    else:
        c.report(P.EA_INODE_HASH, owner, blk, hash=h, value_hash=value_hash, **fields)
        return 0, False
    if not flags & L.FL_EA_INODE:
        c.report(P.EA_INODE_NO_FLAG, owner, blk, **fields)
        return charged, False
    isize = u32(raw, _SIZE_AT) | u32(raw, _SIZE_HIGH_AT) << 32
    if not size or size != isize:           # reported, but the entry is counted as e2fsck 1.47.0
        c.report(P.EA_INODE_SIZE, owner, blk, size=size, isize=isize, **fields)
    return charged, True


def entry_name(index: int, name: bytes) -> str:
    """An entry's full name (``user.big``), for messages."""
    return L.XATTR_PREFIXES.get(index, f"[{index}]") + name.decode("utf-8", "backslashreplace")


def count_ea_refs(c: Context, buf: memoryview | bytes | bytearray, start: int, end: int) -> None:
    """One reference to every inode an entry of the list in ``buf[start:end]`` names as its
    value's (e2fsck's inc_ea_inode_refs: whatever else is wrong with the entries)."""
    refs = c.ea_inode_refs
    pos = start
    while pos + 4 <= end and u32(buf, pos):
        nxt = pos + ((buf[pos] + _XENTRY_SIZE + 3) & ~3)
        if nxt >= end:
            break
        inum = u32(buf, pos + 4)
        if inum:
            refs[inum] = refs.get(inum, 0) + 1
        pos = nxt


def check_refcounts(c: Context) -> None:
    """Every xattr block's reference count against the inodes that named it."""
    for blk, ref in c.ea_refs.items():
        if ref.refcount != ref.seen:
            c.report(P.XATTR_REFCOUNT, block=blk, refcount=ref.refcount, seen=ref.seen)
