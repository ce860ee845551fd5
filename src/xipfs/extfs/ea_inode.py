"""Values in inodes of their own (ext4 ``ea_inode``): making, counting and freeing EA inodes.

Linux (``ext4_xattr_inode_*`` in fs/ext4/xattr.c) keeps a value too large for the inode body
or an xattr block in a regular file of its own: mode 0100600, ``EXT4_EA_INODE_FL``, one link,
named by no directory, its data the value (``i_size`` its length, no holes). ``i_atime`` holds
``crc32c(S, value)`` (S: the filesystem's checksum seed, also without metadata_csum), and
``i_ctime << 32 | l_i_version`` a 64-bit reference count: one reference per in-inode entry
and per xattr block (not per inode sharing it) that names it. The entry says
``e_value_inum``, ``e_value_offs`` 0, ``e_value_size``, and its ``e_hash`` hashes the name and
then that crc instead of the value. The owner's ``i_blocks`` is charged with the value's
clusters, as Linux charges them to its quota (e2fsck checks the sum).

xipfs makes one EA inode per entry, with reference count 1 (Linux shares one between equal
values it finds in its mbcache); the shared ones Linux made are counted down, and freed at 0.

Order, for a writer killed at any store: an EA inode is written whole before an entry names
it and freed only after no entry does. e2fsck counts an EA inode that nothing names as an
unattached inode, which ``e2fsck -p`` (1.47) does not repair by itself: a kill between the two
stores leaves one for ``e2fsck -y`` (it goes to lost+found; nothing is lost). Before its last
store a new EA inode has no link, so a kill earlier only leaks what pass 5 gives back.
"""

from __future__ import annotations

import errno
import struct
import time
from stat import S_IFREG, S_ISREG
from typing import TYPE_CHECKING

from ..errors import CorruptImageError, fs_error
from . import layout as L
from .csum import crc32c_raw

if TYPE_CHECKING:
    from .inode import Inode
    from .volume import Volume

#: Longest value ``setxattr(2)`` takes (XATTR_SIZE_MAX): E2BIG beyond.
XATTR_SIZE_MAX = 65536
#: ``EXT4_XATTR_MIN_LARGE_EA_SIZE(bs)`` is ``bs`` less this: an entry named by 3 bytes (20),
#: the block header (32) and the 4-byte end of the entry list.
_LARGE_MARGIN = 20 + 32 + 4
_U32 = struct.Struct("<I")
_ATIME_AT = L.INODE.offsets["i_atime"]
_CTIME_AT = L.INODE.offsets["i_ctime"]
_VERSION_AT = L.INODE.offsets["i_osd1"]          # l_i_version: the count's low half
EA_INODE_MODE = S_IFREG | 0o600


def straight_to_inode(vol: Volume, size: int) -> bool:
    """Whether a value of ``size`` bytes goes to an EA inode without trying the inode body
    and the block first: ``EXT4_XATTR_SIZE(size) > EXT4_XATTR_MIN_LARGE_EA_SIZE(bs)``."""
    return vol.ea_inode and (size + 3) & ~3 > vol.bs - _LARGE_MARGIN


def checksum_seed(vol: Volume) -> int:
    """The seed S of the value hash: the metadata_csum seed, or with ea_inode alone
    ``crc32c(~0, s_uuid)`` all the same (``ext2fs_init_csum_seed``)."""
    sb = vol.sb
    if sb.metadata_csum:
        return sb.csum_seed
    return crc32c_raw(0xFFFFFFFF, sb.fields["s_uuid"])


def value_hash(vol: Volume, value: bytes) -> int:
    """``ext4_xattr_inode_hash``: crc32c of the value, seeded with S."""
    return crc32c_raw(checksum_seed(vol), value)


def quota_sectors(vol: Volume, size: int) -> int:
    """What an entry whose value is in an EA inode adds to its owner's ``i_blocks``: the
    value's size in whole clusters, in 512-byte units (``ext4_xattr_inode_alloc_quota``)."""
    cluster = vol.bs * vol.sb.cluster_ratio
    return -(-size // cluster) * (cluster // 512)


def stored_hash(raw: bytes | memoryview) -> int:
    """The value hash an EA inode keeps in ``i_atime`` (its raw 32 bits)."""
    return _U32.unpack_from(raw, _ATIME_AT)[0]


def refcount(raw: bytes | memoryview) -> int:
    """An EA inode's reference count: ``i_ctime << 32 | l_i_version``."""
    return _U32.unpack_from(raw, _CTIME_AT)[0] << 32 | _U32.unpack_from(raw, _VERSION_AT)[0]


def _set_refcount(node: Inode, count: int) -> None:
    """Put ``count`` in ``node``'s ctime and l_i_version (stored with the next inode write)."""
    node.ctime_ns = (count >> 32) * 1_000_000_000
    raw = bytearray(node._raw)
    _U32.pack_into(raw, _VERSION_AT, count & 0xFFFFFFFF)
    node._raw = bytes(raw)


def ea_inode(vol: Volume, owner: int, ino: int) -> Inode:
    """EA inode ``ino`` named by an entry of inode ``owner``; CorruptImageError if it is none."""
    where = f"xattr of inode {owner}"
    if ino == owner or not vol.sb.first_ino <= ino <= vol.inodes_count:
        raise CorruptImageError(f"xattr value in inode {ino}, which cannot hold one", where)
    node = vol.inode(ino)
    if not node.flags & L.FL_EA_INODE or not S_ISREG(node.mode) or node.links == 0:
        raise CorruptImageError(f"xattr value in inode {ino}, which is not an xattr inode", where)
    return node


def create(vol: Volume, owner: Inode, value: bytes) -> tuple[int, int]:
    """Store ``value`` in a new EA inode near ``owner``: ``(its number, its value hash)``.

    The inode is allocated with no link and written with its data (a kill meanwhile leaves a
    deleted inode whose bits e2fsck -p gives back); its last store gives it the link, the hash
    and reference count 1, after which an entry may name it. ENOSPC gives everything back.
    """
    from . import data as D
    from .namei import inherited_flags, new_inode

    node = new_inode(vol, owner, EA_INODE_MODE, owner.uid, owner.gid)   # near its owner, but
    try:                                       # with the flags the root hands down, as Linux
        node.flags = (inherited_flags(vol, vol.root, EA_INODE_MODE) | L.FL_EA_INODE
                      | node.flags & L.FL_EXTENTS)
        if D.write(vol, node, memoryview(value), 0) < len(value):
            raise fs_error(errno.ENOSPC)
    except BaseException:
        _discard(vol, node)
        raise
    h = value_hash(vol, value)
    node.links = 1
    node.atime_ns = h * 1_000_000_000          # i_atime: the hash, no nanoseconds (as Linux)
    _set_refcount(node, 1)
    vol.write_inode(node)
    _store_group_desc(vol, (node.ino - 1) // vol.ipg)
    return node.ino, h


def _store_group_desc(vol: Volume, g: int) -> None:
    """Store group ``g``'s descriptor now rather than at the next sync: e2fsck skips the inodes
    past its ``itable_unused`` (and all of an INODE_UNINIT group), and unlike a directory entry
    an xattr entry naming one does not make it look again, so it would free the EA inode."""
    from .groups import store_group_desc

    sb = vol.sb
    if g not in vol.dirty_groups or not (sb.metadata_csum or sb.gdt_csum):
        return
    store_group_desc(vol, g)
    vol.dirty_groups.discard(g)


def _discard(vol: Volume, node: Inode) -> None:
    """Undo a half-made EA inode that nothing names: its blocks, then its bit."""
    from . import data as D

    node.dtime = int(time.time()) & 0xFFFFFFFF
    if node.blocks:
        D.drop_blocks(vol, node, 0)
    node.mode = 0
    vol.write_inode(node)
    vol.ialloc.free(node.ino, False)
    vol.forget(node.ino)


def change_refs(vol: Volume, owner: int, deltas: dict[int, int]) -> None:
    """Add ``deltas[ino]`` to each EA inode's reference count; those that reach 0 are freed:
    all of them marked free first (one store each: no link, a dtime; a kill after it leaves a
    deleted inode pass 5 gives back), then their blocks and bits given back."""
    dead = []
    for ino, delta in deltas.items():
        if not delta:
            continue
        node = ea_inode(vol, owner, ino)
        count = refcount(node._raw) + delta
        if count > 0:
            _set_refcount(node, count)
        else:
            node.links = 0
            node.dtime = int(time.time()) & 0xFFFFFFFF
            _set_refcount(node, 0)
            dead.append(node)
        vol.write_inode(node)
    for node in dead:
        _reclaim(vol, node)


def free(vol: Volume, node: Inode) -> None:
    """Free an EA inode no entry names (one just made, when what was to name it failed)."""
    change_refs(vol, 0, {node.ino: -refcount(node._raw)})


def _reclaim(vol: Volume, node: Inode) -> None:
    """Give back a dead EA inode's blocks, then its bit."""
    from . import data as D

    if node.blocks:
        D.drop_blocks(vol, node, 0)
    vol.ialloc.free(node.ino, False)
    vol.forget(node.ino)
