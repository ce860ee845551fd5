"""Extended attributes: in the inode (large inodes), in an xattr block (``i_file_acl``), and
(ext4 ea_inode) large values in inodes of their own (:mod:`.ea_inode`).

Values are returned as the kernel shows them through ``getxattr(2)``; POSIX ACLs are converted
from their on-disk ext2 form to the ``system.posix_acl_*`` wire format.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections import Counter
from collections.abc import Callable, Iterator
from stat import S_IFMT, S_IMODE, S_ISDIR, S_ISLNK, S_ISREG
from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import ea_inode as EA
from . import layout as L
from .csum import crc32c_raw
from .super import set_feature
from .watch import TRIES

if TYPE_CHECKING:
    from .inode import Inode
    from .volume import Volume

_ENTRY = L.XATTR_ENTRY.struct
_HEADER = L.XATTR_HEADER.struct
_IBODY_MAGIC = L.XATTR_IBODY_HEADER.struct.unpack_from
#: An entry list ends with four zero bytes where the next entry would start (IS_LAST_ENTRY).
_LAST_ENTRY = bytes(4)
_REFCOUNT = L.XATTR_HEADER.select("h_refcount")
_REFCOUNT_AT = L.XATTR_HEADER.offsets["h_refcount"]
_ACL_HEADER = L.ACL_HEADER.struct
_ACL_ENTRY = L.ACL_ENTRY.struct
_ACL_ENTRY_SHORT = L.ACL_ENTRY_SHORT.struct
#: ``system.posix_acl_*`` values as ``getxattr(2)`` gives them (the kernel's wire format, not
#: on-disk): a version word, then (tag, permissions, id) for every entry.
_XATTR_ACL_HEADER = struct.Struct("<I")
_XATTR_ACL_ENTRY = struct.Struct("<HHI")

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20
ACCESS_ACL = "system.posix_acl_access"
#: The only "system." names Linux lists (inline data's system.data is hidden, as in Linux).
_ACL_PREFIX = "system.posix_acl_"
DEFAULT_ACL = "system.posix_acl_default"
#: Longest attribute name ``setxattr(2)`` takes, prefix included (XATTR_NAME_MAX): ERANGE beyond.
XATTR_NAME_MAX = 255
ACL_UNDEFINED_ID = 0xFFFFFFFF
POSIX_ACL_XATTR_VERSION = 2
EXT2_ACL_VERSION = L.EXT2_ACL_VERSION


def _walk(buf: memoryview | bytes, start: int, end: int, value_base: int, value_end: int,
          where: str, ea: bool) -> Iterator[tuple[int, bytes, int, int, int, int]]:
    """``(index, name, value start, inode, size, hash)`` of every entry at ``buf[start:end]``,
    checked as Linux checks them: inside the region, names not empty (but ACLs') and without NUL
    bytes (no caller could name them), values inside ``[value_base, value_end)`` or (``ea``,
    ea_inode) in an inode of their own."""
    pos = start
    while True:
        if pos + 4 > end:
            raise CorruptImageError("xattr entry list runs past its region", where)
        if buf[pos:pos + 4] == _LAST_ENTRY:
            return
        if pos + _ENTRY.size > end:
            raise CorruptImageError("xattr entry runs past its region", where)
        name_len, index, offs, inum, size, h = _ENTRY.unpack_from(buf, pos)
        if name_len == 0 and index not in (2, 3):
            raise CorruptImageError("xattr entry with an empty name", f"{where} offset {pos}")
        next_pos = pos + ((_ENTRY.size + name_len + 3) & ~3)
        if next_pos > end:
            raise CorruptImageError("xattr name runs past its region", f"{where} offset {pos}")
        if inum and not ea:
            raise CorruptImageError("xattr value in an inode without the ea_inode feature",
                                    f"{where} offset {pos}")
        vstart = value_base + offs
        if size and not inum and (vstart < value_base or vstart + size > value_end):
            raise CorruptImageError(f"xattr value ({size} bytes at {offs}) outside its region",
                                    f"{where} offset {pos}")
        name = bytes(buf[pos + _ENTRY.size:pos + _ENTRY.size + name_len])
        if b"\0" in name:                     # no name of a program's can hold one (C strings)
            raise CorruptImageError("xattr name with a NUL byte", f"{where} offset {pos}")
        yield index, name, vstart, inum, size, h
        pos = next_pos


def parse_entries(buf: memoryview | bytes, start: int, end: int, value_base: int,
                  value_end: int, where: str,
                  ea_value: Callable[[int, int], bytes] | None = None) -> list[tuple[str, bytes]]:
    """Decode the entry list at ``buf[start:end]``; values at ``value_base + e_value_offs``, or
    (ext4 ea_inode) in an inode of their own, read by ``ea_value(inode, size)``."""
    out: list[tuple[str, bytes]] = []
    for index, name, vstart, inum, size, _h in _walk(buf, start, end, value_base, value_end, where,
                                                     ea_value is not None):
        prefix = L.XATTR_PREFIXES.get(index)
        if prefix is not None:
            value = ea_value(inum, size) if inum and ea_value else bytes(buf[vstart:vstart + size])
            if index in (2, 3):
                value = acl_to_xattr(value, where)
            else:
                prefix += name.decode("utf-8", "surrogateescape")
            out.append((prefix, value))
    return out


def acl_to_xattr(value: bytes, where: str) -> bytes:
    """ext2 on-disk ACL (version 1, short entries) -> ``system.posix_acl_*`` wire format."""
    if len(value) < _ACL_HEADER.size or _ACL_HEADER.unpack_from(value, 0)[0] != EXT2_ACL_VERSION:
        raise CorruptImageError("ACL xattr with a bad version", where)
    out = [_XATTR_ACL_HEADER.pack(POSIX_ACL_XATTR_VERSION)]
    pos = _ACL_HEADER.size
    while pos < len(value):
        if pos + _ACL_ENTRY_SHORT.size > len(value):
            raise CorruptImageError("truncated ACL entry", where)
        tag, perm = _ACL_ENTRY_SHORT.unpack_from(value, pos)
        if tag in (ACL_USER, ACL_GROUP):
            if pos + _ACL_ENTRY.size > len(value):
                raise CorruptImageError("truncated ACL entry", where)
            ident = _ACL_ENTRY.unpack_from(value, pos)[2]
            pos += _ACL_ENTRY.size
        else:
            ident = ACL_UNDEFINED_ID
            pos += _ACL_ENTRY_SHORT.size
        out.append(_XATTR_ACL_ENTRY.pack(tag, perm, ident))
    return b"".join(out)


def inode_xattrs(raw: memoryview | bytes, isize: int, extra_isize: int, ino: int,
                 ea_value: Callable[[int, int], bytes] | None = None) -> list[tuple[str, bytes]]:
    """Attributes stored in the inode body, after ``i_extra_isize`` (empty when there are none)."""
    start = L.INODE.size + extra_isize
    first = start + L.XATTR_IBODY_HEADER.size
    if extra_isize == 0 or first > isize or _IBODY_MAGIC(raw, start)[0] != L.XATTR_MAGIC:
        return []
    return parse_entries(raw, first, isize, first, isize, f"in-inode xattrs of inode {ino}", ea_value)


def block_xattrs(block: memoryview | bytes, bs: int, blk: int,
                 ea_value: Callable[[int, int], bytes] | None = None) -> list[tuple[str, bytes]]:
    """Attributes of an xattr block (header, entries from offset 32, values from the end)."""
    where = f"xattr block {blk}"
    magic, _refcount, nblocks, _hash, _csum = _HEADER.unpack_from(block, 0)
    if magic not in (L.XATTR_MAGIC, L.XATTR_MAGIC_V1):
        raise CorruptImageError(f"bad xattr block magic 0x{magic:08x}", where)
    if nblocks != 1:
        raise CorruptImageError(f"xattr block claims {nblocks} blocks", where)
    return parse_entries(block, _HEADER.size, bs, 0, bs, where, ea_value)


# -- the write side -----------------------------------------------------------------------------

_PREFIX_ORDER = sorted(((p, i) for i, p in L.XATTR_PREFIXES.items() if p.endswith(".")),
                       key=lambda pi: -len(pi[0]))


def split_name(name: str) -> tuple[int, bytes]:
    """``(name index, suffix)`` for a full attribute name; EOPNOTSUPP for unknown namespaces."""
    if name == ACCESS_ACL:
        return 2, b""
    if name == DEFAULT_ACL:
        return 3, b""
    if len(name.encode("utf-8", "surrogateescape")) > XATTR_NAME_MAX:
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE), name)
    for prefix, index in _PREFIX_ORDER:
        if name.startswith(prefix) and index != 7:
            suffix = name[len(prefix):].encode("utf-8", "surrogateescape")
            if not suffix:
                raise OSError(errno.EINVAL, os.strerror(errno.EINVAL), name)
            return index, suffix
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP), name)


def check_access(node: Inode, name: str, write: bool) -> None:
    """Refuse what Linux refuses for every filesystem, before any filesystem is asked.

    ``user.*`` attributes belong to regular files and directories only: on anything else
    changing one is EPERM and reading one ENODATA, even when the image holds one
    (``xattr_permission`` in fs/xattr.c; listing still shows it, as Linux's ext2 does). A
    symlink has no POSIX ACL: EOPNOTSUPP (``vfs_get_acl``/``vfs_set_acl``). ``trusted.*`` and
    ``security.*`` are allowed on every type (xipfs checks no capabilities: root's view).
    """
    mode = node.mode
    if name.startswith("user.") and not (S_ISREG(mode) or S_ISDIR(mode)):
        code = errno.EPERM if write else errno.ENODATA
        raise OSError(code, os.strerror(code))
    if S_ISLNK(mode) and name in (ACCESS_ACL, DEFAULT_ACL):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))


def get_xattr(vol: Volume, node: Inode, name: str) -> bytes:
    """The value of attribute ``name`` of ``node``, as ``getxattr(2)`` gives it: EOPNOTSUPP for
    a namespace ext2 has not, ENODATA when absent or hidden (:func:`check_access`)."""
    split_name(name)
    check_access(node, name, write=False)
    for key, value in read_xattrs(vol, node):
        if key == name:
            return value
    raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))


def set_xattr(vol: Volume, node: Inode, name: str, value: bytes, flags: int = 0) -> None:
    """Set attribute ``name`` of ``node`` as ``setxattr(2)`` does on Linux's ext2 (ERANGE for
    a value longer than a block), or with ext4's ea_inode up to 64 KiB (E2BIG beyond).

    ``flags`` is XATTR_CREATE (EEXIST if present) or XATTR_REPLACE (ENODATA if absent); POSIX
    ACLs go through :func:`set_acl`, which ignores them, as Linux does.
    """
    value = bytes(value)
    if name in (ACCESS_ACL, DEFAULT_ACL):
        set_acl(vol, node, name, value or None)
        return
    split_name(name)
    if vol.ea_inode:                         # ext4 ea_inode: up to what the VFS takes
        if len(value) > EA.XATTR_SIZE_MAX:
            raise OSError(errno.E2BIG, os.strerror(errno.E2BIG))
    elif len(value) > vol.bs:                # ext2_xattr_set: no value outgrows a block
        raise OSError(errno.ERANGE, os.strerror(errno.ERANGE))
    check_access(node, name, write=True)
    attrs = read_xattrs(vol, node)
    present = any(k == name for k, _ in attrs)
    if flags & os.XATTR_CREATE and present:
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))
    if flags & os.XATTR_REPLACE and not present:
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
    store_xattrs(vol, node, [(k, v) for k, v in attrs if k != name] + [(name, value)])


def remove_xattr(vol: Volume, node: Inode, name: str) -> None:
    """Remove attribute ``name`` of ``node`` (ENODATA if absent), as ``removexattr(2)``; an
    absent POSIX ACL is no error (Linux removes it through ``set_acl(NULL)``)."""
    if name in (ACCESS_ACL, DEFAULT_ACL):
        set_acl(vol, node, name, None)
        return
    split_name(name)
    check_access(node, name, write=True)
    attrs = read_xattrs(vol, node)
    rest = [(k, v) for k, v in attrs if k != name]
    if len(rest) == len(attrs):
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
    store_xattrs(vol, node, rest)


def set_acl(vol: Volume, node: Inode, name: str, value: bytes | None) -> None:
    """Set (``value``) or remove (None) a POSIX ACL the way Linux's ``vfs_set_acl`` and
    ``ext2_set_acl`` do: a default ACL exists only on directories (setting one elsewhere is
    EACCES, removing one succeeds), an access ACL sets the mode bits and is not stored when it
    says no more than they do, and removing an absent ACL succeeds."""
    if value is not None:
        _acl_entries(value)                          # a malformed value: EINVAL first
    check_access(node, name, write=True)
    if name == DEFAULT_ACL and not S_ISDIR(node.mode):
        if value is not None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return
    setting = value is not None
    mode = node.mode
    if value is not None:
        new_mode, plain = acl_mode(value, mode)      # also refuses an incomplete ACL (EINVAL)
        if name == ACCESS_ACL:
            mode = new_mode
            if plain:
                value = None
    attrs = read_xattrs(vol, node) if node.file_acl or node.extra_isize else []
    rest = [(k, v) for k, v in attrs if k != name]
    node.mode = mode
    if value is None and len(rest) == len(attrs):    # no ACL stored and none to store
        if setting:                                  # a plain access ACL: the mode only
            node.ctime_ns = time.time_ns()
            vol.write_inode(node)
        return
    store_xattrs(vol, node, rest if value is None else rest + [(name, value)])


def store_xattrs(vol: Volume, node: Inode, attrs: list[tuple[str, bytes]]) -> None:
    """Store ``node``'s complete attribute list and its new ctime (one inode write)."""
    node.ctime_ns = time.time_ns()
    write_xattrs(vol, node, attrs)


def _acl_entries(value: bytes) -> list[list[int]]:
    """The ``[tag, perm, id]`` entries of an ACL in the ``system.posix_acl_*`` wire format."""
    head, size = _XATTR_ACL_HEADER.size, _XATTR_ACL_ENTRY.size
    if (len(value) < head or (len(value) - head) % size
            or _XATTR_ACL_HEADER.unpack_from(value, 0)[0] != POSIX_ACL_XATTR_VERSION):
        raise OSError(errno.EINVAL, "invalid POSIX ACL")
    return [list(e) for e in _XATTR_ACL_ENTRY.iter_unpack(value[head:])]


def acl_chmod(value: bytes, mode: int) -> bytes:
    """An access ACL with its owner, group-or-mask and other entries set from ``mode``
    (Linux's ``posix_acl_chmod``: a chmod must not leave an ACL granting more)."""
    entries = _acl_entries(value)
    has_mask = any(e[0] == ACL_MASK for e in entries)
    for e in entries:
        if e[0] == ACL_USER_OBJ:
            e[1] = (mode >> 6) & 7
        elif e[0] == ACL_MASK or (e[0] == ACL_GROUP_OBJ and not has_mask):
            e[1] = (mode >> 3) & 7
        elif e[0] == ACL_OTHER:
            e[1] = mode & 7
    return value[:_XATTR_ACL_HEADER.size] + b"".join(_XATTR_ACL_ENTRY.pack(*e) for e in entries)


def chmod(vol: Volume, node: Inode, mode: int) -> None:
    """Give ``node`` the permission bits of ``mode`` and store it; a stored access ACL follows
    the new bits, as on Linux (else it would still grant what the mode now refuses)."""
    node.mode = S_IFMT(node.mode) | S_IMODE(mode)
    node.ctime_ns = time.time_ns()
    attrs = read_xattrs(vol, node) if node.file_acl or node.extra_isize else []
    if any(k == ACCESS_ACL for k, _ in attrs):
        write_xattrs(vol, node, [(k, acl_chmod(v, node.mode) if k == ACCESS_ACL else v) for k, v in attrs])
    else:
        vol.write_inode(node)


def acl_mode(value: bytes, mode: int) -> tuple[int, bool]:
    """``(mode with its permission bits from the access ACL, whether the ACL says no more than
    those bits)``, as Linux's ``posix_acl_equiv_mode``: an equivalent ACL is not stored."""
    entries = _acl_entries(value)
    perms = {e[0]: e[1] & 7 for e in entries}
    if ACL_USER_OBJ not in perms or ACL_GROUP_OBJ not in perms or ACL_OTHER not in perms:
        raise OSError(errno.EINVAL, "invalid POSIX ACL: owner, group or other entry missing")
    group = perms.get(ACL_MASK, perms[ACL_GROUP_OBJ])
    new = (mode & ~0o777) | perms[ACL_USER_OBJ] << 6 | group << 3 | perms[ACL_OTHER]
    return new, all(e[0] in (ACL_USER_OBJ, ACL_GROUP_OBJ, ACL_OTHER) for e in entries)


def xattr_to_acl(value: bytes) -> bytes:
    """``system.posix_acl_*`` wire format -> ext2 on-disk ACL (short entries where no id)."""
    head, size = _XATTR_ACL_HEADER.size, _XATTR_ACL_ENTRY.size
    if (len(value) < head or (len(value) - head) % size
            or _XATTR_ACL_HEADER.unpack_from(value, 0)[0] != POSIX_ACL_XATTR_VERSION):
        raise OSError(errno.EINVAL, "invalid POSIX ACL")
    out = [_ACL_HEADER.pack(EXT2_ACL_VERSION)]
    for tag, perm, ident in _XATTR_ACL_ENTRY.iter_unpack(value[head:]):
        out.append(_ACL_ENTRY.pack(tag, perm, ident) if tag in (ACL_USER, ACL_GROUP)
                   else _ACL_ENTRY_SHORT.pack(tag, perm))
    return b"".join(out)


#: The value as the entry hash reads it: little-endian 32-bit words (Linux ``__le32``).
_VALUE_WORDS = struct.Struct("<I")


def entry_hash(name: bytes, value: bytes) -> int:
    """ext2_xattr_hash_entry: the name hashed bytewise, then the value word by word."""
    h = 0
    for c in name:
        h = ((h << 5) & 0xFFFFFFFF) ^ (h >> 27) ^ c
    padded = value + bytes(-len(value) % 4)
    for (word,) in _VALUE_WORDS.iter_unpack(padded):
        h = ((h << 16) & 0xFFFFFFFF) ^ (h >> 16) ^ word
    return h


def entry_hash_signed(name: bytes, value: bytes) -> int:
    """:func:`entry_hash` with the name's bytes as signed ``char``: what
    kernels before 6.2 stored on x86 for names with bytes past 127 (e2fsprogs 1.47's
    ``ext2fs_ext_attr_hash_entry_signed``; e2fsck accepts either)."""
    h = 0
    for c in name:
        if c > 127:
            c -= 256
        h = ((h << 5) ^ (h >> 27) ^ c) & 0xFFFFFFFF
    n = (len(value) + 3) >> 2
    if n:
        for w in struct.unpack(f"<{n}I", value + bytes(4 * n - len(value))):
            h = ((h << 16) ^ (h >> 16) ^ w) & 0xFFFFFFFF
    return h


class _Entry:
    """One on-disk entry as the writer handles it: its value in place (``value``) or in EA
    inode ``inum`` (``size`` bytes; ``inum`` -1 while that inode is still to be made)."""

    __slots__ = ("index", "name", "value", "inum", "size", "hash")

    def __init__(self, index: int, name: bytes, value: bytes, inum: int = 0, size: int | None = None,
                 h: int = 0) -> None:
        self.index, self.name, self.value, self.inum = index, name, value, inum
        self.size = len(value) if size is None else size
        self.hash = h

    @property
    def key(self) -> str | None:
        """The name ``listxattr`` shows, or None for one Linux hides (``system.data``)."""
        prefix = L.XATTR_PREFIXES.get(self.index)
        if prefix is None:
            return None
        if self.index in (2, 3):
            return prefix
        full = prefix + self.name.decode("utf-8", "surrogateescape")
        return None if full.startswith("system.") else full

    @property
    def room(self) -> int:
        """Bytes the entry takes in its region: the entry, its name, its value, each padded."""
        return ((_ENTRY.size + len(self.name) + 3) & ~3) + (0 if self.inum else (self.size + 3) & ~3)

    def same(self) -> tuple:
        """What two entries must share to be one (ext4_xattr_cmp, the hash aside)."""
        return self.index, self.name, self.value, self.inum, self.size


def _raw_entries(buf: memoryview | bytes, start: int, end: int, value_base: int, where: str,
                 ea: bool) -> list[_Entry]:
    """Every entry at ``buf[start:end]``, hidden ones too (:func:`parse_entries`'s checks)."""
    return [_Entry(index, name, b"", inum, size, h) if inum
            else _Entry(index, name, bytes(buf[vstart:vstart + size]), 0, size, h)
            for index, name, vstart, inum, size, h in _walk(buf, start, end, value_base, end, where, ea)]


def _ibody_start(vol: Volume, node: Inode) -> int:
    """Where in-inode attributes start (their magic), 0 when the inode has no room for any."""
    start = L.INODE.size + node.extra_isize
    return start if node.extra_isize and start + L.XATTR_IBODY_HEADER.size + 4 <= vol.isize else 0


def _ibody_entries(vol: Volume, node: Inode) -> list[_Entry]:
    """The entries in ``node``'s body, as the writer last stored them."""
    start = _ibody_start(vol, node)
    raw = node._raw or vol.inode_raw(node.ino)
    if not start or _IBODY_MAGIC(raw, start)[0] != L.XATTR_MAGIC:
        return []
    first = start + L.XATTR_IBODY_HEADER.size
    return _raw_entries(raw, first, vol.isize, first, f"in-inode xattrs of inode {node.ino}", vol.ea_inode)


def _block_entries(vol: Volume, blk: int) -> list[_Entry]:
    """The entries of xattr block ``blk``."""
    block = verified_block(vol, blk)
    where = f"xattr block {blk}"
    magic, _refcount, nblocks, _hash, _csum = _HEADER.unpack_from(block, 0)
    if magic not in (L.XATTR_MAGIC, L.XATTR_MAGIC_V1) or nblocks != 1:
        raise CorruptImageError(f"bad xattr block header (magic 0x{magic:08x}, {nblocks} blocks)", where)
    return _raw_entries(block, _HEADER.size, vol.bs, 0, where, vol.ea_inode)


def _build_ibody(entries: list[_Entry], length: int) -> bytes:
    """The in-inode attribute region (``length`` bytes from the magic): entries in their order,
    values packed from its end; all zeros when there is no entry."""
    region = bytearray(length)
    if not entries:
        return bytes(region)
    L.XATTR_IBODY_HEADER.struct.pack_into(region, 0, L.XATTR_MAGIC)
    first = L.XATTR_IBODY_HEADER.size
    pos, vend = first, length
    for e in entries:
        offs = 0
        if not e.inum and e.size:
            vend -= (e.size + 3) & ~3
            region[vend:vend + e.size] = e.value
            offs = vend - first
        _ENTRY.pack_into(region, pos, len(e.name), e.index, offs, e.inum, e.size, e.hash)
        region[pos + _ENTRY.size:pos + _ENTRY.size + len(e.name)] = e.name
        pos += (_ENTRY.size + len(e.name) + 3) & ~3
    return bytes(region)


def _build_block(entries: list[_Entry], bs: int) -> bytes:
    """An xattr block of ``entries``, sorted as Linux keeps them, values from its end, and the
    block hash over the entry hashes (0 if one is 0, as ``ext4_xattr_rehash``)."""
    block = bytearray(bs)
    pos, vend = _HEADER.size, bs
    bh = 0
    for e in sorted(entries, key=lambda e: (e.index, len(e.name), e.name)):
        offs = 0
        if not e.inum and e.size:
            vend -= (e.size + 3) & ~3
            block[vend:vend + e.size] = e.value
            offs = vend
        _ENTRY.pack_into(block, pos, len(e.name), e.index, offs, e.inum, e.size, e.hash)
        block[pos + _ENTRY.size:pos + _ENTRY.size + len(e.name)] = e.name
        pos += (_ENTRY.size + len(e.name) + 3) & ~3
        if bh is not None:
            bh = None if e.hash == 0 else ((bh << 16) & 0xFFFFFFFF) ^ (bh >> 16) ^ e.hash
    _HEADER.pack_into(block, 0, L.XATTR_MAGIC, 1, 1, bh or 0, 0)
    return bytes(block)


def build_block(attrs: list[tuple[str, bytes]], bs: int) -> bytes:
    """An xattr block holding ``attrs`` (sorted as Linux keeps them); ENOSPC if they do not fit."""
    entries = []
    for name, value in attrs:
        index, suffix = split_name(name)
        if index in (2, 3):
            value = xattr_to_acl(value)
        entries.append(_Entry(index, suffix, value, h=entry_hash(suffix, value)))
    if not _fits(entries, bs - _HEADER.size - 4):
        raise OSError(errno.ENOSPC, "extended attributes do not fit in one block")
    return _build_block(entries, bs)


def _fits(entries: list[_Entry], room: int) -> bool:
    return sum(e.room for e in entries) <= room


#: ext4 with ea_inode keeps this much of an xattr block for names when a value would go there
#: (``EXT4_XATTR_BLOCK_RESERVE``: min(bs/8, 1024)), so one long value cannot take it all.
def _block_reserve(bs: int) -> int:
    return min(bs // 8, 1024)


def _ibody_policy(vol: Volume) -> bool:
    """Whether new attributes go in the inode body first (ext4, as Linux's ext4 driver puts
    them) or all in the block (ext2: Linux's ext2 driver reads no in-inode attributes)."""
    sb = vol.sb
    return bool(sb.s_feature_incompat & ~_EXT2_INCOMPAT or sb.s_feature_ro_compat & ~_EXT2_RO_COMPAT)


_EXT2_INCOMPAT = (L.INCOMPAT_FILETYPE | L.INCOMPAT_META_BG | L.INCOMPAT_RECOVER | L.INCOMPAT_JOURNAL_DEV
                  | L.INCOMPAT_COMPRESSION)
_EXT2_RO_COMPAT = L.RO_COMPAT_SPARSE_SUPER | L.RO_COMPAT_LARGE_FILE | L.RO_COMPAT_BTREE_DIR


def _charge(vol: Volume, ibody: list[_Entry], block: list[_Entry] | None) -> int:
    """What ``node``'s attributes add to its ``i_blocks``: the xattr block, and the clusters of
    every value in an EA inode (those the block names, charged to each inode sharing it)."""
    total = sum(EA.quota_sectors(vol, e.size) for e in ibody if e.inum)
    if block is not None:
        total += vol.bs // 512 + sum(EA.quota_sectors(vol, e.size) for e in block if e.inum)
    return total


def _old_value(vol: Volume, node: Inode, e: _Entry) -> bytes:
    """An existing entry's value as stored (read from its EA inode when it has one)."""
    return _ea_inode_value(vol, node, e.inum, e.size) if e.inum else e.value


def write_xattrs(vol: Volume, node: Inode, attrs: list[tuple[str, bytes]]) -> None:
    """Store the complete visible attribute list of ``node`` (and the inode with it).

    Attributes that keep their value stay where they are, hidden ones (``system.data``) too.
    A new or changed one goes where Linux's ext4 puts it: in the inode body if it fits, else
    in the xattr block; with ea_inode, a value longer than ``bs - 56`` (or one that fits
    neither) goes to an EA inode of its own and its entry to the body or the block. On ext2
    the body holds none (Linux's ext2 driver reads none there): they move to the block.

    An xattr block only ``node`` uses (``h_refcount`` 1) is rewritten in place, as Linux does:
    one store, no free block needed (so a full filesystem can still lose an attribute). A
    shared one is left to its other users: a new block is written before the inode points at
    it, and the old one released (its count lowered) after. When an attribute moves from the
    block into the body, the inode is stored first, else the block: a kill in between shows
    it in both places at worst, never in neither. New EA inodes are made whole before any of
    this; references are dropped, and EA inodes freed, after (:mod:`.ea_inode`).
    """
    bs = vol.bs
    ea = vol.ea_inode
    ibody_ok = _ibody_policy(vol) and _ibody_start(vol, node) > 0
    region = vol.isize - _ibody_start(vol, node) if _ibody_start(vol, node) else 0
    iroom = region - L.XATTR_IBODY_HEADER.size - 4
    broom = bs - _HEADER.size - 4
    old_ibody = _ibody_entries(vol, node)
    old_blk = node.file_acl
    if old_blk:
        vol.check_data_run(old_blk, 1, node.ino, "xattr block")   # never write over metadata
    old_block = _block_entries(vol, old_blk) if old_blk else None

    wanted: dict[str, tuple[int, bytes, bytes]] = {}
    for name, value in attrs:
        index, suffix = split_name(name)
        wanted[name] = (index, suffix, xattr_to_acl(value) if index in (2, 3) else bytes(value))

    # what stays where it is: hidden entries, and the attributes whose value did not change
    kept: set[str] = set()

    def keep(e: _Entry, movable: bool) -> bool:
        key = e.key
        if key is None:
            return True
        w = wanted.get(key)
        if w is None or key in kept or movable or len(w[2]) != e.size or w[2] != _old_value(vol, node, e):
            return False
        kept.add(key)
        return True

    ibody = [e for e in old_ibody if keep(e, not ibody_ok and not e.inum)]
    block = [e for e in old_block or () if keep(e, False)]
    pending: list[tuple[_Entry, bytes]] = []          # entries whose EA inode is still to be made
    allow_ea = ea and not S_ISLNK(node.mode)          # a symlink's i_blocks tells fast from slow

    def place(e: _Entry) -> bool:
        if ibody_ok and _fits([*ibody, e], iroom):
            ibody.append(e)                           # Linux hashes no in-inode value: 0
            return True
        fits = _fits([*block, e], broom)
        if fits and ea and not e.inum and e.size:     # leave room for names (ea_inode)
            values = sum((x.size + 3) & ~3 for x in block if not x.inum) + ((e.size + 3) & ~3)
            fits = bs - values >= _block_reserve(bs)
        if fits:
            if not e.inum:
                e.hash = entry_hash(e.name, e.value)
            block.append(e)
        return fits

    for name, (index, suffix, value) in wanted.items():
        if name in kept:
            continue
        big = allow_ea and EA.straight_to_inode(vol, len(value))
        if not big and place(_Entry(index, suffix, value)):
            continue
        if allow_ea and value:
            e = _Entry(index, suffix, b"", -1, len(value))
            if place(e):
                pending.append((e, value))
                continue
        raise OSError(errno.ENOSPC, "extended attributes do not fit in the inode and one block")
    _store(vol, node, old_ibody, old_block, ibody, block, pending, region)


def _store(vol: Volume, node: Inode, old_ibody: list[_Entry], old_block: list[_Entry] | None,
           ibody: list[_Entry], block: list[_Entry], pending: list[tuple[_Entry, bytes]],
           region: int) -> None:
    """Write what :func:`write_xattrs` decided, in the order its docstring gives."""
    bs = vol.bs
    old_blk = node.file_acl
    same_block = old_block is not None and sorted(e.same() for e in block) == sorted(
        e.same() for e in old_block)
    if not block:
        how = "drop" if old_blk else "none"
    elif same_block:
        how = "keep"
    elif old_blk and refcount(vol, old_blk) == 1:
        how = "in place"
    else:
        how = "new"
    # references: the body's entries, and the block's where its entries change in place or
    # a new block is written; a block freed by release_block drops its own
    gained: Counter[int] = Counter(e.inum for e in ibody if e.inum > 0)
    lost: Counter[int] = Counter(e.inum for e in old_ibody if e.inum)
    if how in ("in place", "new"):
        gained.update(e.inum for e in block if e.inum > 0)
    if how == "in place":
        lost.update(e.inum for e in old_block or () if e.inum)
    delta = gained
    delta.subtract(lost)
    for ino, d in delta.items():                       # refuse a bad reference before any store
        if d:
            EA.ea_inode(vol, node.ino, ino)
    blk = 0
    made: list[int] = []
    try:
        if how == "new":
            blk = vol.balloc.alloc(vol.inode_group_goal(node.ino), 1)[0][0]
        for e, value in pending:
            e.inum, h = EA.create(vol, node, value)
            made.append(e.inum)
            e.hash = entry_hash(e.name, h.to_bytes(4, "little"))
    except BaseException:
        for ino in made:
            EA.free(vol, vol.inode(ino))
        if blk:
            vol.balloc.free(blk, 1)
        raise
    EA.change_refs(vol, node.ino, {ino: d for ino, d in delta.items() if d > 0})   # up first
    node.blocks += _charge(vol, ibody, block or None) - _charge(vol, old_ibody, old_block)
    if ibody or block:
        set_feature(vol, "s_feature_compat", L.COMPAT_EXT_ATTR)
    start = _ibody_start(vol, node)
    if start:
        ibody_bytes = _build_ibody(ibody, region)
        if node._raw[start:] != ibody_bytes:
            node._raw = node._raw[:start] + ibody_bytes
            if node.flags & L.FL_INLINE_DATA:          # system.data's value may have moved
                node.reset_map()
                node._dir = None
                node._dx = None
                vol.spaces.pop(node.ino, None)
    if how == "in place":
        data = seal_block(vol, old_blk, _build_block(block, bs))
        moved_in = {e.key for e in ibody} & {e.key for e in old_block or ()} - {None}
        if moved_in - {e.key for e in old_ibody}:
            vol.write_inode(node)
            vol.device.write(data, old_blk * bs)
        else:
            vol.device.write(data, old_blk * bs)
            vol.write_inode(node)
    elif how == "new":
        vol.device.write(seal_block(vol, blk, _build_block(block, bs)), blk * bs)
        node.file_acl = blk
        vol.write_inode(node)
    else:
        if how == "drop":
            node.file_acl = 0
        vol.write_inode(node)
    if how in ("new", "drop") and old_blk:
        release_block(vol, old_blk)
    EA.change_refs(vol, node.ino, {ino: d for ino, d in delta.items() if d < 0})   # down last


_CSUM_AT = L.XATTR_HEADER.offsets["h_checksum"]


def block_checksum(seed: int, blk: int, block: bytes | memoryview) -> int:
    """An xattr block's checksum (metadata_csum): crc32c from the filesystem's checksum seed of
    the block number and the block, its checksum field as zero."""
    crc = crc32c_raw(seed, blk.to_bytes(8, "little") + bytes(block[:_CSUM_AT]) + b"\0\0\0\0")
    return crc32c_raw(crc, block[_CSUM_AT + 4:])     # chained: the block is not copied twice


def verified_block(vol: Volume, blk: int, ino: int = 0) -> memoryview | bytes:
    """xattr block ``blk``, its checksum verified (metadata_csum), as Linux verifies it before
    it lists or changes one (ext4_xattr_block_csum_verify: EFSBADCRC)."""
    block = vol.device.view(blk * vol.bs, vol.bs)
    if vol.verify and vol.sb.metadata_csum:
        stored = int.from_bytes(block[_CSUM_AT:_CSUM_AT + 4], "little")
        if stored != block_checksum(vol.sb.csum_seed, blk, block):
            raise CorruptImageError("xattr block checksum does not match",
                                    f"xattr block {blk}" + (f" of inode {ino}" if ino else ""))
    return block


def seal_block(vol: Volume, blk: int, block: bytes) -> bytes:
    """xattr block ``block``, to be stored at block ``blk``, with its checksum (metadata_csum:
    crc32c of the block number and the block, the checksum field as zero)."""
    if not vol.sb.metadata_csum:
        return block
    crc = block_checksum(vol.sb.csum_seed, blk, block)
    return block[:_CSUM_AT] + crc.to_bytes(4, "little") + block[_CSUM_AT + 4:]


def drop_block(vol: Volume, node: Inode, ea_refs: bool = True) -> None:
    """Detach ``node``'s xattr block (freeing it, or lowering its count when shared)."""
    old = node.file_acl
    entries = _block_entries(vol, old) if vol.ea_inode else []
    node.file_acl = 0
    node.blocks -= _charge(vol, [], entries)
    vol.write_inode(node)
    release_block(vol, old, ea_refs)


def drop_xattrs(vol: Volume, node: Inode) -> None:
    """A dead inode (no links) gives up its attributes: the references its body's entries and
    its xattr block (when this inode is its last user) hold on EA inodes, then the block. The
    first of what it frees: its EA inodes are named by nothing e2fsck counts from the moment
    the inode died, so they are marked free as soon as can be."""
    blk = node.file_acl
    if vol.ea_inode:
        refs = Counter(e.inum for e in _ibody_entries(vol, node) if e.inum)
        if blk and refcount(vol, blk) <= 1:
            refs.update(e.inum for e in _block_entries(vol, blk) if e.inum)
        if refs:
            EA.change_refs(vol, node.ino, {ino: -n for ino, n in refs.items()})
    if blk:
        drop_block(vol, node, ea_refs=False)


def refcount(vol: Volume, blk: int) -> int:
    """``h_refcount`` of xattr block ``blk``: how many inodes share it."""
    return _REFCOUNT.unpack_from(vol.device.view(blk * vol.bs + _REFCOUNT_AT, _REFCOUNT.size), 0)[0]


def release_block(vol: Volume, blk: int, ea_refs: bool = True) -> None:
    """One inode no longer uses xattr block ``blk``: lower its count, or free it (the last),
    with (``ea_refs``) the references its entries hold on EA inodes."""
    count = refcount(vol, blk)
    if count > 1:
        if vol.sb.metadata_csum:             # the count and the checksum, in one store
            block = bytearray(vol.device.view(blk * vol.bs, vol.bs))
            _REFCOUNT.pack_into(block, _REFCOUNT_AT, count - 1)
            vol.device.write(seal_block(vol, blk, bytes(block)), blk * vol.bs)
        else:
            vol.device.write(_REFCOUNT.pack(count - 1), blk * vol.bs + _REFCOUNT_AT)
        return
    if ea_refs and vol.ea_inode:
        refs = Counter(e.inum for e in _block_entries(vol, blk) if e.inum)
        EA.change_refs(vol, 0, {ino: -n for ino, n in refs.items()})
    vol.balloc.free(blk, 1)


# -- reading an inode's attributes --------------------------------------------------------------
def read_xattrs(vol: Volume, node: Inode) -> list[tuple[str, bytes]]:
    """All extended attributes of ``node``: in the inode first, then its xattr block.

    A writer in another process rewrites an unshared xattr block in place: what was read
    half-changed is read again, not reported as corrupt.
    """
    watch = vol.watch
    if watch is None:
        return _read_xattrs(vol, node)
    for _ in range(TRIES):
        try:
            return _read_xattrs(vol, node)
        except CorruptImageError:
            if not watch.busy():
                raise
    raise OSError(errno.EAGAIN, "extended attributes kept changing under a writer in another process")


def _read_xattrs(vol: Volume, node: Inode) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    ea_value = (lambda inum, size: _ea_inode_value(vol, node, inum, size)) if vol.ea_inode else None
    if node.extra_isize:
        out.extend(inode_xattrs(vol.inode_raw(node.ino), vol.sb.inode_size,
                                node.extra_isize, node.ino, ea_value))
    blk = node.file_acl
    if blk:
        vol.check_data_run(blk, 1, node.ino, "xattr block")
        out.extend(block_xattrs(verified_block(vol, blk, node.ino), vol.bs, blk, ea_value))
    # "system." names other than the ACLs (inline data's system.data, richacl) have no handler
    # in Linux: never listed, never got (EOPNOTSUPP), so never shown here either
    if any(k.startswith("system.") and not k.startswith(_ACL_PREFIX) for k, _ in out):
        out = [(k, v) for k, v in out if not k.startswith("system.") or k.startswith(_ACL_PREFIX)]
    return out


def _ea_inode_value(vol: Volume, node: Inode, inum: int, size: int) -> bytes:
    """A value ext4 keeps in an inode of its own (ea_inode): that inode's data, all of it."""
    ea = EA.ea_inode(vol, node.ino, inum)
    if ea.size != size:
        raise CorruptImageError(f"xattr inode {inum} holds {ea.size} bytes, the entry says {size}",
                                f"xattr of inode {node.ino}")
    from .data import read_bytes

    return read_bytes(vol, ea, 0, size)
