"""Extended attributes: in the inode (large inodes) and in an xattr block (``i_file_acl``).

Values are returned as the kernel shows them through ``getxattr(2)``; POSIX ACLs are converted
from their on-disk ext2 form to the ``system.posix_acl_*`` wire format.
"""

from __future__ import annotations

import struct

from ..errors import CorruptImageError
from . import layout as L

_ENTRY = L.XATTR_ENTRY.struct.unpack_from
_U32 = struct.Struct("<I").unpack_from

ACL_USER, ACL_GROUP = 0x02, 0x08
ACL_UNDEFINED_ID = 0xFFFFFFFF
POSIX_ACL_XATTR_VERSION = 2
EXT2_ACL_VERSION = 1


def parse_entries(buf: memoryview | bytes, start: int, end: int, value_base: int,
                  value_end: int, where: str) -> list[tuple[str, bytes]]:
    """Decode the entry list at ``buf[start:end]``; values at ``value_base + e_value_offs``."""
    out: list[tuple[str, bytes]] = []
    pos = start
    while True:
        if pos + 4 > end:
            raise CorruptImageError("xattr entry list runs past its region", where)
        if _U32(buf, pos)[0] == 0:
            return out
        if pos + 16 > end:
            raise CorruptImageError("xattr entry runs past its region", where)
        name_len, index, offs, inum, size, _hash = _ENTRY(buf, pos)
        if name_len == 0 and index not in (2, 3):
            raise CorruptImageError("xattr entry with an empty name", f"{where} offset {pos}")
        next_pos = pos + ((16 + name_len + 3) & ~3)
        if next_pos > end:
            raise CorruptImageError("xattr name runs past its region", f"{where} offset {pos}")
        if inum:
            raise CorruptImageError("xattr value in an inode (ea_inode) is not ext2", f"{where} offset {pos}")
        vstart = value_base + offs
        if size and (vstart < value_base or vstart + size > value_end):
            raise CorruptImageError(f"xattr value ({size} bytes at {offs}) outside its region",
                                    f"{where} offset {pos}")
        name = bytes(buf[pos + 16:pos + 16 + name_len])
        prefix = L.XATTR_PREFIXES.get(index)
        if prefix is not None:
            value = bytes(buf[vstart:vstart + size])
            if index in (2, 3):
                value = acl_to_xattr(value, where)
            else:
                prefix += name.decode("utf-8", "surrogateescape")
            out.append((prefix, value))
        pos = next_pos


def acl_to_xattr(value: bytes, where: str) -> bytes:
    """ext2 on-disk ACL (version 1, short entries) -> ``system.posix_acl_*`` wire format."""
    if len(value) < 4 or _U32(value, 0)[0] != EXT2_ACL_VERSION:
        raise CorruptImageError("ACL xattr with a bad version", where)
    out = [struct.pack("<I", POSIX_ACL_XATTR_VERSION)]
    pos = 4
    while pos < len(value):
        if pos + 4 > len(value):
            raise CorruptImageError("truncated ACL entry", where)
        tag, perm = struct.unpack_from("<HH", value, pos)
        if tag in (ACL_USER, ACL_GROUP):
            if pos + 8 > len(value):
                raise CorruptImageError("truncated ACL entry", where)
            ident = _U32(value, pos + 4)[0]
            pos += 8
        else:
            ident = ACL_UNDEFINED_ID
            pos += 4
        out.append(struct.pack("<HHI", tag, perm, ident))
    return b"".join(out)


def inode_xattrs(raw: memoryview | bytes, isize: int, extra_isize: int, ino: int) -> list[tuple[str, bytes]]:
    """Attributes stored in the inode body, after ``i_extra_isize`` (empty when there are none)."""
    start = 128 + extra_isize
    if extra_isize == 0 or start + 4 > isize or _U32(raw, start)[0] != L.XATTR_MAGIC:
        return []
    first = start + 4
    return parse_entries(raw, first, isize, first, isize, f"in-inode xattrs of inode {ino}")


def block_xattrs(block: memoryview | bytes, bs: int, blk: int) -> list[tuple[str, bytes]]:
    """Attributes of an xattr block (header, entries from offset 32, values from the end)."""
    where = f"xattr block {blk}"
    magic, _refcount, nblocks, _hash, _csum = struct.unpack_from("<5I", block, 0)
    if magic not in (L.XATTR_MAGIC, L.XATTR_MAGIC_V1):
        raise CorruptImageError(f"bad xattr block magic 0x{magic:08x}", where)
    if nblocks != 1:
        raise CorruptImageError(f"xattr block claims {nblocks} blocks", where)
    return parse_entries(block, 32, bs, 0, bs, where)
