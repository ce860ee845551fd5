"""mkfs: a revision-1 ext2 filesystem, laid out the way mke2fs lays it out (without e2fsprogs).

Geometry follows ``ext2fs_initialize``: 8 x block-size blocks per group, an inode ratio by
filesystem size, inode tables filled whole, a last group too small for its own metadata
dropped. Group 0 then holds the root directory and a pre-expanded ``lost+found``, as mke2fs
makes them. Inode tables are assumed zero (a fresh file or shared-memory object is); on a
device that may hold old data they are zeroed explicitly.
"""

from __future__ import annotations

import errno
import os
import platform
import stat
import time
import uuid as uuidlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..device import Device
from . import layout as L
from .dir import empty_dir_block, encode_entry
from .inode import encode_direct_run, encode_new_inode
from .super import group_has_super, write_seconds

DEFAULT_FEATURES = ("sparse_super", "large_file", "filetype", "ext_attr", "dir_index")
#: Features this mkfs can make (resize_inode needs the reserved descriptor tree: not made here).
MKFS_FEATURES = {
    "sparse_super": ("ro", L.RO_COMPAT_SPARSE_SUPER), "large_file": ("ro", L.RO_COMPAT_LARGE_FILE),
    "filetype": ("in", L.INCOMPAT_FILETYPE), "ext_attr": ("co", L.COMPAT_EXT_ATTR),
    "dir_index": ("co", L.COMPAT_DIR_INDEX),
}
LOST_FOUND_INO = 11


@dataclass
class Geometry:
    bs: int
    blocks: int
    first_data_block: int
    bpg: int
    groups: int
    ipg: int
    isize: int
    desc_blocks: int
    itable_blocks: int
    sparse: bool

    def group_start(self, g: int) -> int:
        return self.first_data_block + g * self.bpg

    def group_blocks(self, g: int) -> int:
        return min(self.bpg, self.blocks - self.group_start(g))

    def overhead(self, g: int) -> int:
        """Metadata blocks at the start of group ``g``."""
        return self._head(g) + 2 + self.itable_blocks

    def _head(self, g: int) -> int:
        return 1 + self.desc_blocks if group_has_super(g, self.sparse) else 0

    def block_bitmap(self, g: int) -> int:
        """Where group ``g``'s block bitmap is (its inode bitmap follows, then its inode table)."""
        return self.group_start(g) + self._head(g)

    def inode_table(self, g: int) -> int:
        return self.group_start(g) + self._head(g) + 2


def inode_ratio(size: int) -> int:
    """Bytes per inode by filesystem size, as mke2fs.conf's types floppy / small / default / big."""
    if size < 3 << 20:
        return 8192
    if size < 512 << 20:
        return 4096
    if size < 4 << 40:
        return 16384
    return 32768 if size < 16 << 40 else 65536


def plan(size: int, bs: int, isize: int, inodes: int | None, sparse: bool) -> Geometry:
    """Work out the geometry for ``size`` bytes (ValueError when it cannot hold a filesystem)."""
    if bs not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
        raise ValueError(f"block size {bs}: must be a power of two from 1024 to 65536")
    if isize < 128 or isize > bs or isize & (isize - 1):
        raise ValueError(f"inode size {isize}: must be a power of two from 128 to the block size")
    fdb = 1 if bs == 1024 else 0
    blocks = min(size // bs, 0xFFFFFFFF)
    bpg = min(8 * bs, 65528)
    ipb = bs // isize
    step = ipb * 8 // _gcd(ipb, 8)                        # inode tables full, bitmaps whole bytes
    total = inodes if inodes is not None else max(16, size // inode_ratio(size))
    for _ in range(4):
        groups = -(-(blocks - fdb) // bpg)
        if groups <= 0:
            break
        ipg = -(-total // groups)
        ipg = min(max(-(-ipg // step) * step, step, 16), 8 * bs, 65536 - ipb)
        ipg -= ipg % step
        itb = ipg * isize // bs
        desc = -(-groups * 32 // bs)
        geo = Geometry(bs, blocks, fdb, bpg, groups, ipg, isize, desc, itb, sparse)
        last = geo.group_blocks(groups - 1)
        if groups > 1 and last < geo.overhead(groups - 1) + 50:
            blocks -= last                                 # mke2fs drops a runt last group
            continue
        if geo.overhead(0) + 3 + 16384 // bs > geo.group_blocks(0) or itb + 3 > bpg:
            break
        if groups * ipg >= 1 << 32:
            raise ValueError("too many inodes")
        return geo
    raise ValueError(f"{size} bytes is too small for an ext2 filesystem with {bs}-byte blocks")


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def feature_words(features: Iterable[str] | None) -> tuple[int, int, int]:
    """``(compat, incompat, ro_compat)`` for feature names ("^name" removes from the default)."""
    names = set(DEFAULT_FEATURES)
    if features is not None:
        given = [features] if isinstance(features, str) else list(features)
        if any(not f.startswith("^") for f in given if f != "none"):
            names = set()
        for f in given:
            if f == "none":
                names = set()
            elif f.startswith("^"):
                names.discard(f[1:])
            else:
                names.add(f)
    words = {"co": 0, "in": 0, "ro": 0}
    for name in sorted(names):
        if name not in MKFS_FEATURES:
            raise ValueError(f"feature {name!r}: xipfs mkfs makes only " + ", ".join(sorted(MKFS_FEATURES)))
        kind, bit = MKFS_FEATURES[name]
        words[kind] |= bit
    return words["co"], words["in"], words["ro"]


#: What a populated group holds beyond its own metadata: (data blocks, inodes, directories), all
#: taken from the front of the group (bitmaps are written as prefixes), or an explicit block
#: bitmap of the group when ``blocks_bitmap`` is given.
@dataclass
class GroupUse:
    blocks: int = 0
    inodes: int = 0
    dirs: int = 0
    blocks_bitmap: bytes | None = None


#: ``populate(device, geometry, filetype) -> [GroupUse per group]``: writes the tree.
Populate = Callable[[Device, Geometry, bool], list[GroupUse]]


def format_device(dev: Device, *, block_size: int = 4096, inode_size: int = 256,
                  inodes: int | None = None, label: str | None = None, uuid: str | None = None,
                  features: Iterable[str] | None = None, zeroed: bool = False,
                  reserved_percent: float = 5.0, populate: Populate | None = None) -> Geometry:
    """Write a new ext2 filesystem over all of ``dev``. ``zeroed``: the device is known all zeros.

    ``populate`` writes the root directory and whatever else the filesystem starts with (the
    default: an empty root and lost+found, as mke2fs makes them; :func:`xipfs.pack` gives a
    whole tree) into zeroed inode tables, and says what it used; the bitmaps, descriptors and
    superblock written afterwards account for exactly that.
    """
    compat, incompat, ro = feature_words(features)
    sparse = bool(ro & L.RO_COMPAT_SPARSE_SUPER)
    geo = plan(dev.size, block_size, inode_size, inodes, sparse)
    bs = geo.bs
    now = time.time_ns()
    sec = now // 1_000_000_000
    fs_uuid = uuidlib.UUID(uuid) if uuid else uuidlib.uuid4()
    if not zeroed:
        for g in range(geo.groups):
            _zero(dev, geo.inode_table(g) * bs, geo.itable_blocks * bs)
    filetype = bool(incompat & L.INCOMPAT_FILETYPE)
    use = (populate or root_and_lost_found)(dev, geo, filetype)
    gds: list[bytes] = []
    free_blocks_total = free_inodes_total = 0
    for g in range(geo.groups):
        u = use[g]
        bb, ib, it = geo.block_bitmap(g), geo.block_bitmap(g) + 1, geo.inode_table(g)
        nblocks = geo.group_blocks(g)
        if u.blocks_bitmap is not None:
            dev.write(u.blocks_bitmap, bb * bs)
        else:
            dev.write(prefix_bitmap(geo.overhead(g) + u.blocks, nblocks, bs), bb * bs)
        dev.write(prefix_bitmap(u.inodes, geo.ipg, bs), ib * bs)
        free_b, free_i = nblocks - geo.overhead(g) - u.blocks, geo.ipg - u.inodes
        free_blocks_total += free_b
        free_inodes_total += free_i
        gds.append(L.GROUP_DESC.pack({
            "bg_block_bitmap": bb, "bg_inode_bitmap": ib, "bg_inode_table": it,
            "bg_free_blocks_count": free_b, "bg_free_inodes_count": free_i,
            "bg_used_dirs_count": u.dirs, "bg_flags": 0x4}))
    gdt = b"".join(gds).ljust(geo.desc_blocks * bs, b"\0")
    # superblock (primary at byte 1024; backups at the start of their groups)
    f = {
        "s_inodes_count": geo.groups * geo.ipg, "s_blocks_count": geo.blocks,
        "s_r_blocks_count": int(geo.blocks * reserved_percent / 100),
        "s_free_blocks_count": free_blocks_total,
        "s_free_inodes_count": free_inodes_total, "s_first_data_block": geo.first_data_block,
        "s_log_block_size": bs.bit_length() - 11, "s_log_frag_size": bs.bit_length() - 11,
        "s_blocks_per_group": geo.bpg, "s_frags_per_group": geo.bpg,
        "s_inodes_per_group": geo.ipg, "s_mtime": 0, "s_wtime": min(sec, write_seconds()) & 0xFFFFFFFF,
        "s_mnt_count": 0, "s_max_mnt_count": -1, "s_magic": L.EXT2_MAGIC, "s_state": 1,
        "s_errors": 1, "s_minor_rev_level": 0, "s_lastcheck": sec & 0xFFFFFFFF,
        "s_checkinterval": 0, "s_creator_os": 0, "s_rev_level": 1, "s_def_resuid": 0,
        "s_def_resgid": 0, "s_first_ino": L.GOOD_OLD_FIRST_INO, "s_inode_size": geo.isize,
        "s_block_group_nr": 0, "s_feature_compat": compat, "s_feature_incompat": incompat,
        "s_feature_ro_compat": ro, "s_uuid": fs_uuid.bytes,
        "s_volume_name": (label or "").encode("utf-8")[:16],
        "s_hash_seed": uuidlib.uuid4().bytes,
        "s_def_hash_version": 1 if compat & L.COMPAT_DIR_INDEX else 0,
        "s_default_mount_opts": 0x0C if compat & L.COMPAT_EXT_ATTR else 0,
        "s_mkfs_time": sec & 0xFFFFFFFF,
        "s_min_extra_isize": 32 if geo.isize >= 160 else 0,
        "s_want_extra_isize": 32 if geo.isize >= 160 else 0,
        "s_flags": 0x1 if platform.machine() in ("x86_64", "i386", "i686", "AMD64") else 0x2,
    }
    sb = bytearray(L.SUPERBLOCK.pack(f).ljust(L.SUPERBLOCK_SIZE, b"\0"))
    dev.write(bytes(sb), L.SUPERBLOCK_OFFSET)
    dev.write(gdt, (geo.first_data_block + 1) * bs)
    backup = bytearray(sb)
    L.SUPERBLOCK.pack_field(backup, "s_state", 0)
    for g in range(1, geo.groups):
        if group_has_super(g, sparse):
            L.SUPERBLOCK.pack_field(backup, "s_block_group_nr", min(g, 0xFFFF))
            dev.write(bytes(backup), geo.group_start(g) * bs)
            dev.write(gdt, (geo.group_start(g) + 1) * bs)
    if not zeroed and geo.first_data_block == 0:
        dev.write(bytes(1024), 0)                        # the boot area before the superblock
    dev.flush()
    return geo


def lost_found_blocks(bs: int) -> int:
    """Blocks of a new lost+found: 16 KiB as mke2fs makes it (2 to 12 blocks)."""
    return min(12, max(2, 16384 // bs))


def root_and_lost_found(dev: Device, geo: Geometry, filetype: bool) -> list[GroupUse]:
    """The contents of a new filesystem: an empty root and a pre-expanded lost+found in group 0."""
    bs = geo.bs
    now = time.time_ns()
    nlf = lost_found_blocks(bs)
    root_blk = geo.first_data_block + geo.overhead(0)
    lf_blk = root_blk + 1
    t = L.FT_DIR if filetype else 0
    root = (encode_entry(2, 12, b".", t).ljust(12, b"\0") + encode_entry(2, 12, b"..", t).ljust(12, b"\0")
            + encode_entry(LOST_FOUND_INO, bs - 24, b"lost+found", t).ljust(bs - 24, b"\0"))
    dev.write(root, root_blk * bs)
    dev.write(empty_dir_block(bs, LOST_FOUND_INO, 2, filetype), lf_blk * bs)
    for i in range(1, nlf):
        dev.write(empty_block(bs), (lf_blk + i) * bs)
    _write_dir_inode(dev, geo, L.ROOT_INO, stat.S_IFDIR | 0o755, 3, root_blk, 1, now)
    _write_dir_inode(dev, geo, LOST_FOUND_INO, stat.S_IFDIR | 0o700, 2, lf_blk, nlf, now)
    return [GroupUse(1 + nlf, LOST_FOUND_INO, 2)] + [GroupUse() for _ in range(1, geo.groups)]


def empty_block(bs: int) -> bytes:
    """A directory block with no entries: one unused record spanning the block."""
    return L.DIRENT.struct.pack(0, bs if bs < 65536 else 0, 0, 0).ljust(bs, b"\0")


def prefix_bitmap(used: int, nbits: int, bs: int) -> bytes:
    """A bitmap block: the first ``used`` bits set, bits ``nbits``.. (padding) set, rest clear."""
    bits = bytearray(bs)
    full, rest = divmod(used, 8)
    bits[:full] = b"\xff" * full
    if rest:
        bits[full] = (1 << rest) - 1
    pad_byte, pad_bit = divmod(nbits, 8)
    if pad_bit:
        bits[pad_byte] |= 0xFF << pad_bit & 0xFF
        pad_byte += 1
    bits[pad_byte:] = b"\xff" * (bs - pad_byte)
    return bytes(bits)


def _zero(dev: Device, offset: int, length: int) -> None:
    chunk = bytes(min(length, 1 << 20))
    for pos in range(0, length, len(chunk)):
        n = min(len(chunk), length - pos)
        dev.write(chunk[:n], offset + pos)


def _write_dir_inode(dev: Device, geo: Geometry, ino: int, mode: int, links: int, first: int,
                     count: int, now: int) -> None:
    """Write group 0's new directory inode ``ino``, owned by root, of ``count`` blocks from
    ``first`` on (the root and lost+found, as mke2fs makes them)."""
    raw = encode_new_inode(geo.isize, mode, 0, 0, count * geo.bs, count * (geo.bs // 512),
                           encode_direct_run(first, count), now, 0, links)
    dev.write(raw, geo.inode_table(0) * geo.bs + (ino - 1) * geo.isize)


def mkfs(target: str | os.PathLike[str] | Device, size: int | None = None, *, block_size: int | None = None,
         inode_size: int | None = None, inodes: int | None = None, label: str | None = None,
         uuid: str | None = None, features: Iterable[str] | None = None,
         preallocate: bool = False, fs_type: str = "ext2", **ext4: Any) -> None:
    """Create an ext2 (or, with ``fs_type="ext4"``, ext4) filesystem on ``target``.

    ``target`` is a path (a file, created or resized to ``size``; a block device), a POSIX
    shared-memory name (``"/name"`` where no such path exists; created with ``size``), or an
    open :class:`~xipfs.device.Device` (its whole size).

    Defaults: 4096-byte blocks, 256-byte inodes, sparse_super, large_file, filetype, ext_attr,
    dir_index; ``features`` lists others ("^name" drops one from the default, "none" all).

    ``preallocate`` (a new file or shared-memory object) reserves all its memory now, as
    ``posix_fallocate``: the image is sparse otherwise, and tmpfs allocates a page on each first
    write. Preallocated, writes are plain copies into memory that is already there (as on pmem
    or a DAX device), and a full tmpfs shows as ENOSPC here, never as SIGBUS on a mapping later.

    ``fs_type="ext4"`` makes what ``mke2fs -t ext4`` makes (:func:`.mkfs4.format_device4`: block
    and inode sizes by filesystem size unless given; ``ext4`` takes its other options, such as
    ``journal_size``, ``hash_seed``, ``reserved_percent``).
    """
    from ..device import MemoryDevice
    from ..device.detect import looks_like_shm_name, open_device

    formatter: Callable[..., object]
    if fs_type == "ext4":
        from .mkfs4 import format_device4, plan4
        opts: dict[str, Any] = dict(block_size=block_size, inode_size=inode_size, inodes=inodes, label=label,
                                    uuid=uuid, features=features, **ext4)
        formatter = format_device4
        if size is not None:                    # refuse bad parameters before touching anything
            plan4(size, block_size=block_size, inode_size=inode_size, inodes=inodes, features=features,
                  inode_ratio=ext4.get("inode_ratio"), reserved_percent=ext4.get("reserved_percent", 5.0),
                  flex_bg_size=ext4.get("flex_bg_size", 16))
    elif fs_type == "ext2":
        if ext4:
            raise TypeError("mkfs of ext2 takes no " + ", ".join(sorted(ext4)))
        block_size = 4096 if block_size is None else block_size
        inode_size = 256 if inode_size is None else inode_size
        opts = dict(block_size=block_size, inode_size=inode_size, inodes=inodes, label=label, uuid=uuid,
                    features=features)
        formatter = format_device
        _, _, ro = feature_words(features)          # refuse bad parameters before touching anything
        if size is not None:
            plan(size, block_size, inode_size, inodes, bool(ro & L.RO_COMPAT_SPARSE_SUPER))
    else:
        raise ValueError(f"filesystem type {fs_type!r}: xipfs makes ext2 and ext4")
    if isinstance(target, Device):
        formatter(target, **opts)
        return
    path = os.fsdecode(os.fspath(target))
    if looks_like_shm_name(path, bare=False) and not os.path.exists(path):
        if size is None:
            raise ValueError("mkfs of a new shared-memory object needs a size")
        dev = MemoryDevice.from_shm(path, create_size=size)
        try:
            if preallocate:
                _preallocate(dev.fileno(), size, path)
            formatter(dev, zeroed=True, **opts)
        finally:
            dev.close()
        return
    st = os.stat(path) if os.path.exists(path) else None
    zeroed = False
    if st is None or os.path.isfile(path):
        if size is None:
            if st is None or st.st_size == 0:
                raise ValueError(f"mkfs of {path}: give a size")
            size = st.st_size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, 0)                 # a fresh, all-zero (sparse) file
            os.ftruncate(fd, size)
            if preallocate:
                _preallocate(fd, size, path)
        finally:
            os.close(fd)
        zeroed = True
    dev = open_device(path, readonly=False)
    try:
        formatter(dev, zeroed=zeroed, **opts)
    finally:
        dev.close()


def _preallocate(fd: int, size: int, path: str) -> None:
    """Reserve the whole image now (tmpfs allocates its zeroed pages); ENOSPC names the image.

    A size the filesystem cannot hold is refused before any page is taken: on tmpfs, which is
    memory, filling it up to find out would starve every process on the machine first.
    """
    st = os.fstatvfs(fd)
    have = os.fstat(fd).st_blocks * 512 + st.f_bavail * st.f_frsize
    if st.f_blocks and size > have:
        raise OSError(errno.ENOSPC, f"cannot preallocate {size} bytes: {have} available", path)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        raise OSError(err.errno, f"cannot preallocate {size} bytes: {err.strerror}", path) from None
