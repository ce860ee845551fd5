"""An opened ext2 filesystem (read side): group descriptors, inodes, directories, names, data.

Knows a device and the format, nothing of file objects or users: the facade in ``xipfs.fs``
turns what this returns into ``os``-shaped results.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..device import Device
from ..errors import CorruptImageError, fs_error
from . import layout as L
from .balloc import BlockAllocator
from .data import zero_blocks
from .dir import DirIndex, DirSpace, index_directory
from .ialloc import InodeAllocator
from .inode import Inode
from .namei import create, link, release
from .super import Superblock, parse_superblock
from .xattr import block_xattrs, inode_xattrs

#: Symlinks followed while resolving one path before ELOOP (Linux: 40).
MAX_SYMLINKS = 40
#: Inodes kept decoded; the cache is simply emptied when it grows past this.
INODE_CACHE_MAX = 1 << 17
NAME_MAX = 255
PATH_MAX = 4096
STATE_VALID = 1
#: Superblock fields a writer changes (everything else is preserved byte for byte).
_SB_MUTABLE = ("s_free_blocks_count", "s_free_inodes_count", "s_mtime", "s_wtime", "s_mnt_count",
               "s_max_mnt_count", "s_state", "s_feature_compat", "s_feature_incompat",
               "s_feature_ro_compat", "s_rev_level", "s_first_ino", "s_inode_size",
               "s_block_group_nr")

_ZEROS = memoryview(bytes(1 << 20))
_STAMP_OFFSET, _STAMP_LEN = L.SUPERBLOCK_OFFSET + 0x2C, 16   # s_mtime .. s_state
#: A reader's attempts at a copy or a lookup that a writer in another process keeps changing.
_TRIES = 8
#: i_mode, i_size, i_dtime, i_links_count, i_blocks, i_block, i_generation, i_size_high.
_INODE_KEY = struct.Struct("<H2xI12xI2xHI8x60sI4xI")
_NO_BLOCK = bytes(4)
_T = TypeVar("_T")


def zero_fill(dst: memoryview) -> None:
    """Fill ``dst`` with zeros without allocating a buffer of its size."""
    n = len(dst)
    step = len(_ZEROS)
    for i in range(0, n, step):
        j = min(n, i + step)
        dst[i:j] = _ZEROS[:j - i]


_GD_HEAD = struct.Struct("<IIIHHHH")


class GroupDesc:
    """One decoded group descriptor (the fields ext2 uses; the rest kept as it was)."""

    __slots__ = ("block_bitmap", "inode_bitmap", "inode_table", "free_blocks", "free_inodes",
                 "used_dirs", "flags", "raw")

    def __init__(self, fields: dict[str, int], raw: bytes) -> None:
        self.block_bitmap = fields["bg_block_bitmap"]
        self.inode_bitmap = fields["bg_inode_bitmap"]
        self.inode_table = fields["bg_inode_table"]
        self.free_blocks = fields["bg_free_blocks_count"]
        self.free_inodes = fields["bg_free_inodes_count"]
        self.used_dirs = fields["bg_used_dirs_count"]
        self.flags = fields["bg_flags"]
        self.raw = raw

    def encode(self) -> bytes:
        """The 32 on-disk bytes, the fields after bg_flags kept as they were."""
        self.raw = _GD_HEAD.pack(self.block_bitmap, self.inode_bitmap, self.inode_table,
                                 self.free_blocks, self.free_inodes, self.used_dirs,
                                 self.flags) + self.raw[_GD_HEAD.size:]
        return self.raw


class Volume:
    """The ext2 filesystem on a device: the layer between blocks and files."""

    def __init__(self, device: Device, readonly: bool = True) -> None:
        self.device = device
        if device.size < L.SUPERBLOCK_OFFSET + L.SUPERBLOCK_SIZE:
            raise CorruptImageError("image too small to hold a superblock",
                                    f"{device.name}: {device.size} bytes")
        raw = bytes(device.view(L.SUPERBLOCK_OFFSET, L.SUPERBLOCK_SIZE))
        self.sb: Superblock = parse_superblock(raw, device.size)
        self.readonly = readonly
        sb = self.sb
        self.bs = sb.block_size
        self.filetype = sb.has_incompat(L.INCOMPAT_FILETYPE)
        # geometry read on hot paths, kept as plain attributes
        self.ipg = sb.s_inodes_per_group
        self.inodes_count = sb.s_inodes_count
        self.isize = sb.inode_size
        self.first_data_block = sb.s_first_data_block
        self.blocks_count = sb.s_blocks_count
        self.bpg = sb.s_blocks_per_group
        self.zero_inode = bytes(self.isize)
        self.groups = self._read_group_descriptors()
        self._zone_starts, self._zone_ends = self._metadata_zones()
        self._inodes: dict[int, Inode] = {}
        self._paths: dict[tuple[str, bool], int] = {}
        #: Serialises every change of metadata (reads of file data need no lock).
        self.lock = threading.RLock()
        self._mounted = False
        #: A reader of shared memory watches the superblock for writers elsewhere (see
        #: ``_follow_writers``); the bytes it saw when it last trusted its caches.
        self._watch = readonly and device.is_xip
        self._peek = device.peek if self._watch else None  # type: ignore[attr-defined]
        self._stamp = self._writer_stamp() if self._watch else b""
        #: No writer was mounted when ``_stamp`` was read (a "not clean" state alone, left by a
        #: writer that was killed, does not make the caches useless).
        self._quiet = self._no_writer(self._stamp) if self._watch else True
        self._spaces: dict[int, DirSpace] = {}     # directories being written: where entries fit
        self._dirty_groups: set[int] = set()       # descriptors whose counts changed since sync
        self._dirty_inodes: dict[int, Inode] = {}  # inodes whose times changed since sync
        self._open: dict[int, int] = {}            # inode -> file objects open on it
        #: Inodes unlinked while open: freed when their last file object closes.
        self.orphans: set[int] = set()
        #: Inode -> its live mappings in this process (``check_shrink(size)``, ``shrink(size)``).
        self.mappings: dict[int, list[Any]] = {}
        if not readonly:
            self._mount()

    # -- mounting for writing (what Linux does in ext2_fill_super / ext2_put_super) -----------
    def _mount(self) -> None:
        sb = self.sb
        if sb.readonly_reason:
            raise OSError(errno.EROFS, f"image can only be opened read-only: {sb.readonly_reason}",
                          self.device.name)
        if self.device.readonly:
            raise OSError(errno.EROFS, "device is read-only", self.device.name)
        self.device.lock(exclusive=True)
        self.balloc = BlockAllocator(self)
        self.ialloc = InodeAllocator(self)
        self._orig_state = sb.s_state
        f = sb.fields
        f["s_state"] = sb.s_state & ~STATE_VALID
        f["s_mnt_count"] = (sb.s_mnt_count + 1) & 0xFFFF
        f["s_mtime"] = int(time.time()) & 0xFFFFFFFF
        if f["s_max_mnt_count"] == 0:
            f["s_max_mnt_count"] = 20
        self.write_super()
        self.device.flush()
        self._mounted = True

    def write_super(self) -> None:
        """Store the superblock fields xipfs changes; every other byte stays as it was."""
        raw = bytearray(self.sb.raw)
        for name in _SB_MUTABLE:
            L.SUPERBLOCK.pack_field(raw, name, self.sb.fields[name])
        self.sb.raw = bytes(raw)
        self.device.write(self.sb.raw, L.SUPERBLOCK_OFFSET)

    def write_group_desc(self, g: int) -> None:
        """Note that group ``g``'s counts changed; they reach the image at the next sync.

        Only free counts change while mounted, and counts that lag behind the bitmaps are
        exactly what ``e2fsck -p`` recomputes on its own, so a killed writer loses nothing.
        """
        self._dirty_groups.add(g)

    def _flush_group_descs(self) -> None:
        base = (self.first_data_block + 1) * self.bs
        for g in sorted(self._dirty_groups):
            self.device.write(self.groups[g].encode(), base + g * L.GROUP_DESC.size)
        self._dirty_groups.clear()

    def write_inode(self, node: Inode) -> None:
        """Store ``node`` in the inode table."""
        self.device.write(node.encode(), self.inode_offset(node.ino))
        node._stat = None
        self._dirty_inodes.pop(node.ino, None)

    def write_links(self, node: Inode) -> None:
        """Store only ``node``'s link count: one 2-byte store, nothing else changes."""
        node._raw = node._raw[:26] + node.links.to_bytes(2, "little") + node._raw[28:]
        self.device.write(node._raw[26:28], self.inode_offset(node.ino) + 26)
        node._stat = None

    def touch(self, node: Inode) -> None:
        """Only ``node``'s times changed: store it at the next sync (times are not structure)."""
        node.clip_times()
        node._stat = None
        self._dirty_inodes[node.ino] = node

    def inode_group_goal(self, ino: int) -> int:
        """The first block of inode ``ino``'s group: where its data should start looking."""
        return self.first_data_block + (ino - 1) // self.ipg * self.bpg

    def set_large_file(self) -> None:
        """Turn on large_file when a file reaches 2 GiB."""
        self._set_feature("s_feature_ro_compat", L.RO_COMPAT_LARGE_FILE)

    def set_ext_attr(self) -> None:
        """Turn on ext_attr before the first xattr block is linked (Linux ext2 does the same)."""
        self._set_feature("s_feature_compat", L.COMPAT_EXT_ATTR)

    def _set_feature(self, field: str, bit: int) -> None:
        """Turn on feature ``bit`` of superblock ``field``, upgrading a revision 0 image first
        (features need revision 1), as Linux's ``ext2_update_dynamic_rev``."""
        f = self.sb.fields
        if f[field] & bit:
            return
        if f["s_rev_level"] == 0:
            f["s_rev_level"] = 1
            f["s_first_ino"] = L.GOOD_OLD_FIRST_INO
            f["s_inode_size"] = L.GOOD_OLD_INODE_SIZE
        f[field] |= bit
        self.write_super()

    def sync(self) -> None:
        """Make everything durable: free counts, backups of superblock and descriptors, flush."""
        if not self._mounted:
            self.device.flush()
            return
        with self.lock:
            for ino in list(self.orphans):       # unlinked, and nobody maps them any more
                if not self.is_open(ino):
                    self.orphans.discard(ino)
                    release(self, self.inode(ino))
            for node in list(self._dirty_inodes.values()):
                self.write_inode(node)
            self._flush_group_descs()
            f = self.sb.fields
            f["s_free_blocks_count"] = sum(gd.free_blocks for gd in self.groups)
            f["s_free_inodes_count"] = sum(gd.free_inodes for gd in self.groups)
            f["s_wtime"] = int(time.time()) & 0xFFFFFFFF
            self.write_super()
            self._write_backups()
            self.device.flush()

    def _write_backups(self) -> None:
        """Copy the superblock and descriptor table into every backup group, as e2fsprogs does."""
        sb = self.sb
        bs = self.bs
        gdt = bytes(self.device.view((sb.s_first_data_block + 1) * bs, sb.desc_blocks * bs))
        backup = bytearray(sb.raw)
        L.SUPERBLOCK.pack_field(backup, "s_state", sb.s_state & ~STATE_VALID)
        for g in range(1, sb.groups):
            if not sb.group_has_super(g):
                continue
            L.SUPERBLOCK.pack_field(backup, "s_block_group_nr", min(g, 0xFFFF))
            first = sb.group_first_block(g)
            self.device.write(backup, first * bs)
            self.device.write(gdt, (first + 1) * bs)

    def unmount(self) -> None:
        """Write everything back and mark the filesystem clean again (if it was)."""
        if not self._mounted:
            return
        with self.lock:
            for ino in list(self.orphans):       # unlinked files still open: free them now
                self._open.pop(ino, None)
                node = self.inode(ino)
                mapped = ino in self.mappings or self.device.pinned_elsewhere(ino)
                if not (mapped and self._adopt(node)):
                    release(self, node, force=True)
            self.orphans.clear()
            f = self.sb.fields
            f["s_state"] = (self.sb.s_state & ~STATE_VALID) | (self._orig_state & STATE_VALID)
            self.sync()
            self._mounted = False
            self.device.unlock()

    def _adopt(self, node: Inode) -> bool:
        """Give an unlinked file that a mapping (here or elsewhere) still uses ``/lost+found/#ino``,
        as e2fsck names what it reconnects: the image is left clean, and its blocks cannot go
        to another file (and so into that process's mapping) in a later writing session."""
        try:
            try:
                found = self.resolve("/lost+found", False)
            except FileNotFoundError:
                found = create(self, self.inode(L.ROOT_INO), b"lost+found", 0o40700, 0, 0)
            if not found.is_dir:
                return False
            names = self.dir_index(found).entries
            name, n = f"#{node.ino}", 0
            while name in names:
                n += 1
                name = f"#{node.ino}.{n}"
            node.dtime = 0
            link(self, node, found, os.fsencode(name))
        except OSError:
            return False
        return True

    # -- group descriptors and metadata zones --------------------------------------------------
    def _read_group_descriptors(self) -> list[GroupDesc]:
        sb = self.sb
        bs = self.bs
        start = (sb.s_first_data_block + 1) * bs
        raw = self.device.view(start, sb.groups * L.GROUP_DESC.size)
        unpack = L.GROUP_DESC.unpack
        groups = []
        for g in range(sb.groups):
            off = g * L.GROUP_DESC.size
            gd = GroupDesc(unpack(raw, off), bytes(raw[off:off + L.GROUP_DESC.size]))
            first, last = sb.group_first_block(g), sb.group_last_block(g)
            where = f"group descriptor {g}"
            for what, blk, n in (("block bitmap", gd.block_bitmap, 1),
                                 ("inode bitmap", gd.inode_bitmap, 1),
                                 ("inode table", gd.inode_table, sb.itable_blocks)):
                if not (first <= blk and blk + n - 1 <= last):
                    raise CorruptImageError(
                        f"{what} at block {blk} is outside group {g} (blocks {first}..{last})", where)
            if gd.free_blocks > sb.s_blocks_per_group or gd.free_inodes > sb.s_inodes_per_group:
                raise CorruptImageError("free counts exceed the group size", where)
            groups.append(gd)
        return groups

    def _metadata_zones(self) -> tuple[list[int], list[int]]:
        """Sorted, merged ``[start, end)`` block ranges that hold metadata, never file data."""
        sb = self.sb
        zones = [(0, sb.s_first_data_block + 1)]
        reserved = sb.s_reserved_gdt_blocks if sb.has_compat(L.COMPAT_RESIZE_INODE) else 0
        for g, gd in enumerate(self.groups):
            if sb.group_has_super(g):
                first = sb.group_first_block(g)
                zones.append((first, first + 1 + sb.desc_blocks + reserved))
            zones.append((gd.block_bitmap, gd.block_bitmap + 1))
            zones.append((gd.inode_bitmap, gd.inode_bitmap + 1))
            zones.append((gd.inode_table, gd.inode_table + sb.itable_blocks))
        zones.sort()
        starts: list[int] = []
        ends: list[int] = []
        for a, b in zones:
            if starts and a <= ends[-1]:
                ends[-1] = max(ends[-1], b)
            else:
                starts.append(a)
                ends.append(b)
        return starts, ends

    def check_data_run(self, pblk: int, count: int, ino: int, what: str = "data block") -> None:
        """Refuse a run of blocks an inode (``ino``; 0: the allocator) points to that lies outside
        the data area."""
        if pblk <= self.first_data_block or pblk + count > self.blocks_count:
            raise CorruptImageError(
                f"{what} {pblk}" + (f"..{pblk + count - 1}" if count > 1 else "")
                + f" outside the filesystem's data area ({self.first_data_block + 1}.."
                f"{self.blocks_count - 1})", f"inode {ino}" if ino else "block bitmap")
        if ino == L.RESIZE_INO:  # its blocks are the reserved descriptor blocks, by design
            return
        i = bisect_right(self._zone_starts, pblk + count - 1) - 1
        if i >= 0 and self._zone_ends[i] > pblk:
            raise CorruptImageError(
                f"{what} {pblk} overlaps filesystem metadata (blocks {self._zone_starts[i]}.."
                f"{self._zone_ends[i] - 1})", f"inode {ino}" if ino else "block bitmap")

    # -- inodes -------------------------------------------------------------------------------
    def inode_offset(self, ino: int) -> int:
        """Byte offset of inode ``ino`` in the device."""
        if not 0 < ino <= self.inodes_count:
            raise CorruptImageError(f"inode number {ino} out of range 1..{self.inodes_count}")
        group, index = divmod(ino - 1, self.ipg)
        return self.groups[group].inode_table * self.bs + index * self.isize

    def inode_raw(self, ino: int) -> memoryview:
        """The on-disk bytes of inode ``ino``."""
        return self.device.view(self.inode_offset(ino), self.isize)

    def inode(self, ino: int) -> Inode:
        """Inode ``ino``, decoded once and cached."""
        node = self._inodes.get(ino)
        if node is None:
            node = Inode(self, ino, self.inode_raw(ino))
            if len(self._inodes) >= INODE_CACHE_MAX:
                self._shrink_cache()
            self._inodes[ino] = node
        return node

    def _shrink_cache(self) -> None:
        """Empty the inode cache, but for inodes with open files or unsaved times: there must
        never be two objects for one inode."""
        keep = {ino: n for ino, n in self._inodes.items() if ino in self._open or ino in self._dirty_inodes}
        self._inodes = keep

    def _writer_stamp(self) -> bytes:
        """s_mtime, s_wtime, s_mnt_count and s_state: a writer mounting, syncing or unmounting
        changes them, and while one is mounted the state says "not clean"."""
        return self._peek(_STAMP_OFFSET, _STAMP_LEN)

    def _follow_writers(self) -> None:
        """Before a read-only attachment of shared memory trusts its cached names and inodes:
        drop them if a writer in another process is mounted now or has been since they were
        read (it may have deleted a file and given its inode and blocks to another)."""
        stamp = self._peek(_STAMP_OFFSET, _STAMP_LEN)
        if stamp != self._stamp or not self._quiet:
            self.forget_cached()
            self._stamp = stamp
            self._quiet = self._no_writer(stamp)

    def _no_writer(self, stamp: bytes) -> bool:
        """Whether no writer is mounted: the state says clean, or nobody holds the writer's lock
        (a writer that mounts later changes the mount count, so the stamp tells)."""
        return bool(stamp[-2] & STATE_VALID) or not self.device.writer_elsewhere()

    def name_moved(self, path: str, node: Inode) -> bool:
        """After a read through ``path`` by a reader of shared memory: True if a writer elsewhere
        may have changed the image meanwhile and ``path``, read again from storage, no longer
        names ``node`` (a name read torn or stale). Raises FileNotFoundError when it names
        nothing now."""
        if not self._watch or not self._writer_busy():
            return False
        self.forget_cached()
        return self.resolve(path, True).ino != node.ino

    def _writer_busy(self) -> bool:
        """Whether a writer in another process is mounted now, or has been since the caches
        were last trusted (then what was just read may be torn)."""
        return self._peek(_STAMP_OFFSET, _STAMP_LEN) != self._stamp or not self._quiet

    def _copy_is_current(self, node: Inode) -> bool:
        """After a reader of shared memory copied data of ``node`` while a writer elsewhere was
        busy: True when its inode shows the writer did not change it. False when its size shrank or
        a block pointer it had changed (``node`` now holds the new ones: copy again). A file a
        writer deleted meanwhile raises FileNotFoundError.

        A writer changes the inode before it frees a block, so blocks copied while the inode
        stayed the same were this file's.
        """
        mode, size, dtime, links, blocks, i_block, gen = self._stored(node)
        if links == 0 or dtime or gen != node.generation or (mode ^ node.mode) & 0o170000:
            self.forget_cached()
            raise OSError(errno.ENOENT, "the file was deleted by a writer in another process")
        old = node.i_block
        if size >= node.size and all(old[i:i + 4] in (_NO_BLOCK, i_block[i:i + 4]) for i in range(0, 60, 4)):
            return True                       # at most grown: what was copied is still the file's
        node.size, node.i_block, node.blocks = size, i_block, blocks
        node.reset_map()
        return False

    def _reload(self, node: Inode) -> None:
        """Take ``node``'s size and block pointers from storage again (a writer changed them)."""
        _mode, node.size, _dtime, _links, node.blocks, node.i_block, _gen = self._stored(node)
        node.reset_map()

    def _stored(self, node: Inode) -> tuple[int, int, int, int, int, bytes, int]:
        """Mode, size, dtime, link count, i_blocks, i_block and generation of ``node`` as
        storage holds them now."""
        mode, size, dtime, links, blocks, i_block, gen, size_high = _INODE_KEY.unpack_from(
            self.inode_raw(node.ino))
        if (mode & 0o170000) == 0o100000:
            size |= size_high << 32
        return mode, size, dtime, links, blocks, i_block, gen

    def forget_cached(self) -> None:
        """Drop resolved paths and decoded inodes (a read-only attachment, before it relies
        on them for something lasting, such as a mapping)."""
        self._paths.clear()
        self._inodes.clear()

    def remember(self, node: Inode) -> None:
        self._inodes[node.ino] = node

    def forget(self, ino: int) -> None:
        self._inodes.pop(ino, None)
        self._spaces.pop(ino, None)
        self._dirty_inodes.pop(ino, None)

    def names_changed(self) -> None:
        """A name went away or moved: resolved paths may now be wrong."""
        self._paths.clear()

    def opened(self, node: Inode) -> None:
        self._open[node.ino] = self._open.get(node.ino, 0) + 1

    def closed(self, node: Inode) -> None:
        """A file object on ``node`` closed; an unlinked inode is freed with its last one."""
        left = self._open.get(node.ino, 1) - 1
        if left > 0:
            self._open[node.ino] = left
            return
        self._open.pop(node.ino, None)
        if node.ino in self.orphans and self._mounted:
            with self.lock:
                self.orphans.discard(node.ino)
                release(self, node)

    def is_open(self, ino: int) -> bool:
        """Whether ``ino`` must outlive its last name for now: a file object or a mapping here
        uses it, or another process (or attachment) maps it."""
        return ino in self._open or self.device.pinned_elsewhere(ino)

    def before_shrink(self, node: Inode, size: int) -> None:
        """``node`` is about to shrink to ``size``: its live mappings agree or refuse (EBUSY)."""
        hooks = list(self.mappings.get(node.ino, ()))
        if self.device.pinned_elsewhere(node.ino):
            raise OSError(errno.EBUSY, "the file is mapped by another process")
        for hook in hooks:                       # every reason to refuse first ...
            hook.check_shrink(size)
        for hook in hooks:                       # ... then the mappings follow the new size
            hook.shrink(size)

    @property
    def root(self) -> Inode:
        node = self.inode(L.ROOT_INO)
        if (node.mode & 0o170000) != 0o040000:
            raise CorruptImageError("root inode is not a directory", "inode 2")
        return node

    # -- data ---------------------------------------------------------------------------------
    def get_xip_mem(self, node: Inode, lblk: int, create: bool = False) -> memoryview | None:
        """The seed's ``get_xip_mem``: file block ``lblk`` of ``node`` in the device, or None (hole).

        On a memory device the view *is* the storage. ``create=True`` gives a hole a zeroed
        block first (a filesystem opened for writing; within the file's size, since ext2 has no
        blocks past EOF).
        """
        if create:
            if self.readonly:
                raise fs_error(errno.EROFS)
            if not 0 <= lblk < node.map.nblocks:
                raise OSError(errno.EINVAL, f"block {lblk} is past the end of the file")
            with self.lock:
                if node.map.assign(lblk, lblk + 1, lambda lb, n, pb: zero_blocks(self, pb, n)) < 1:
                    raise fs_error(errno.ENOSPC)
                self.write_inode(node)
            pblk = node.map.runs(lblk, lblk + 1, lblk + 1)[0][2]
        else:
            pblk = node.map.bmap(lblk)
        if not pblk:
            return None
        view = self.device.view(pblk * self.bs, self.bs)
        # A page-cache page is not the storage: changing it would bypass write-back.
        return view if self.device.is_xip and not self.readonly else view.toreadonly()

    def segments(self, node: Inode, pos: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(offset in the file, length, device offset or -1 for a hole)`` covering ``[pos, end)``."""
        bs = self.bs
        for lblk, count, pblk in node.map.runs(pos // bs, (end - 1) // bs + 1):
            lo = lblk * bs
            a = lo if lo > pos else pos
            b = min(lo + count * bs, end)
            yield a, b - a, pblk * bs + (a - lo) if pblk else -1

    def read_into(self, node: Inode, dst: memoryview, pos: int) -> int:
        """Copy data of ``node`` from byte ``pos`` into ``dst`` (one copy); bytes copied."""
        n = self._read_into(node, dst, pos)
        if not self._watch or not self._writer_busy():
            return n
        return self._copy_again_while_changing(node, lambda: self._read_into(node, dst, pos), n)

    def _copy_again_while_changing(self, node: Inode, copy: Callable[[], _T], done: _T) -> _T:
        """``done``, a copy of ``node``'s data made while a writer in another process was busy,
        or ``copy()`` made again until the inode shows the writer left the file alone."""
        for _ in range(_TRIES):
            if self._copy_is_current(node):
                return done
            done = copy()
        raise OSError(errno.EAGAIN, "the file kept changing under a writer in another process")

    def _read_into(self, node: Inode, dst: memoryview, pos: int) -> int:
        size = node.size
        if pos >= size:
            return 0
        n = min(len(dst), size - pos)
        if n <= 0:
            return 0
        m = node.map
        if m.whole:
            self.device.read_into(dst[:n] if n != len(dst) else dst, m.whole * self.bs + pos)
            return n
        dev = self.device
        for off, length, where in self.segments(node, pos, pos + n):
            piece = dst[off - pos:off - pos + length]
            if where >= 0:
                dev.read_into(piece, where)
            else:
                zero_fill(piece)
        return n

    def read_bytes(self, node: Inode, pos: int, n: int) -> bytes:
        """``n`` bytes (fewer at EOF) of ``node``'s data from ``pos`` as a new ``bytes``: one copy."""
        data = self._read_bytes(node, pos, n)
        if not self._watch or not self._writer_busy():
            return data
        return self._copy_again_while_changing(node, lambda: self._read_bytes(node, pos, n), data)

    def _read_bytes(self, node: Inode, pos: int, n: int) -> bytes:
        size = node.size
        if pos >= size or n <= 0:
            return b""
        if n > size - pos:
            n = size - pos
        m = node.map
        if m.whole:
            return bytes(self.device.view(m.whole * self.bs + pos, n))
        dev = self.device
        parts = [dev.view(where, length) if where >= 0 else bytes(length)
                 for _, length, where in self.segments(node, pos, pos + n)]
        return parts[0] if len(parts) == 1 and isinstance(parts[0], bytes) else b"".join(parts)

    # -- directories --------------------------------------------------------------------------
    def dir_index(self, node: Inode) -> DirIndex:
        """The name index of directory ``node``, built on first use."""
        index = node._dir
        if index is not None:
            return index
        if not self._watch:
            return self._index(node)
        for _ in range(_TRIES):
            try:
                return self._index(node)
            except CorruptImageError:
                if not self._writer_busy():
                    raise
            self._reload(node)         # read while a writer elsewhere changed it: as it is now
        raise OSError(errno.EAGAIN, "a directory kept changing under a writer in another process")

    def _index(self, node: Inode) -> DirIndex:
        bs = self.bs
        where = f"directory inode {node.ino}"
        if node.size == 0 or node.size % bs:
            raise CorruptImageError(f"directory size {node.size} is not a multiple of the block size", where)
        index = index_directory(self._dir_blocks(node), bs, self.inodes_count, self.filetype, node.ino)
        if node.ino == L.ROOT_INO and index.parent != L.ROOT_INO:
            raise CorruptImageError(f"'..' of the root points to inode {index.parent}", where)
        if index.parent != node.ino:
            parent = self.live_inode(index.parent, "..", where)
            if not parent.is_dir:
                raise CorruptImageError(f"'..' points to inode {index.parent}, not a directory", where)
        node._dir = index
        return index

    def _dir_blocks(self, node: Inode) -> Iterator[tuple[int, memoryview]]:
        """``(file block, view)`` for every block of directory ``node``; a hole is corruption."""
        bs = self.bs
        dev = self.device
        for lblk, nblk, pblk in node.map.runs(0, node.size // bs):
            if not pblk:
                raise CorruptImageError(f"hole at block {lblk} of a directory", f"directory inode {node.ino}")
            for i in range(nblk):
                yield lblk + i, dev.view((pblk + i) * bs, bs)

    # -- symlinks and names -------------------------------------------------------------------
    def readlink(self, node: Inode) -> bytes:
        """The target of symlink ``node`` (fast: in ``i_block``; slow: in its first block)."""
        size = node.size
        where = f"symlink inode {node.ino}"
        acl_blocks = self.bs // 512 if node.file_acl else 0
        if 0 < size < 60 and node.blocks - acl_blocks == 0:
            target = node.i_block[:size]
        else:
            node.check_format()
            if size == 0 or size >= self.bs:
                raise CorruptImageError(f"symlink length {size} invalid", where)
            target = self.read_bytes(node, 0, size)
            if node.map.bmap(0) == 0:
                raise CorruptImageError("slow symlink without a data block", where)
        if b"\0" in target:
            raise CorruptImageError("symlink target contains a NUL byte", where)
        return target

    def resolve(self, path: str, follow: bool = True) -> Inode:
        """The inode ``path`` names (absolute from the image root; relative means the same).

        Symlinks in the middle are always followed, the last one only with ``follow``; a
        trailing slash demands a directory. Errors are the ``OSError`` that ``os`` raises.
        Resolved paths are remembered, and a path whose directory was resolved before costs
        one lookup in that directory.
        """
        if self._watch and (self._peek(_STAMP_OFFSET, _STAMP_LEN) != self._stamp or not self._quiet):
            return self._resolve_following(path, follow)
        key = (path, follow)
        ino = self._paths.get(key)
        if ino is not None:
            return self.inode(ino)
        return self._resolve(path, follow)

    def _resolve_following(self, path: str, follow: bool) -> Inode:
        """``resolve`` while a writer in another process is mounted, or after one was."""
        for _ in range(_TRIES):
            self._follow_writers()
            try:
                return self._resolve(path, follow)
            except CorruptImageError:
                if not self._writer_busy():
                    raise
            # a directory or inode read while a writer elsewhere was changing it: read it again
        raise OSError(errno.EAGAIN, "the image kept changing under a writer in another process", path)

    def _resolve(self, path: str, follow: bool) -> Inode:
        key = (path, follow)
        ino = self._paths.get(key)
        if ino is not None:
            return self.inode(ino)
        node = self._child_of_known(path, follow)
        if node is None:
            node = self._walk(path, follow)
        self._paths[key] = node.ino
        return node

    def _child_of_known(self, path: str, follow: bool) -> Inode | None:
        """``path`` looked up in its directory when that directory resolved before, else None."""
        head, sep, tail = path.rpartition("/")
        if not sep or not tail or tail == "." or tail == ".." or head.endswith("/"):
            return None
        pino = self._paths.get((head or "/", True))
        if pino is None:
            if head.count("/") > 64 or not head:
                return None
            try:
                parent = self.resolve(head, True)
            except OSError:
                return None                    # the full walk names the error with the full path
        else:
            parent = self.inode(pino)
        if (parent.mode & 0o170000) != 0o040000:
            return None
        entry = (parent._dir or self.dir_index(parent)).entries.get(tail)
        if entry is None:
            return None
        child = self.live_inode(entry[0], tail, f"directory inode {parent.ino}")
        if follow and (child.mode & 0o170000) == 0o120000:
            return None
        return child

    def _walk(self, path: str, follow: bool) -> Inode:
        if not path:
            raise fs_error(errno.ENOENT, path)
        # No PATH_MAX here: Linux limits the path a caller passes (the facade checks that),
        # not one a door assembled or symlinks built up; NAME_MAX is each lookup's limit.
        root = self.root
        pending = components(path)
        # The directories walked through: ".." goes back one, as in Linux, whatever the
        # on-disk ".." entry says (a damaged one cannot send a lookup elsewhere).
        stack = [root]
        links = 0
        while pending:
            name = pending.pop()
            cur = stack[-1]
            if not cur.is_dir:
                raise fs_error(errno.ENOTDIR, path)
            if name == ".":
                continue
            if name == "..":
                if len(stack) > 1:
                    stack.pop()
                continue
            index = cur._dir or self.dir_index(cur)
            entry = index.entries.get(name)
            if entry is None:
                if len(name) > NAME_MAX // 4 and len(os.fsencode(name)) > NAME_MAX:
                    raise fs_error(errno.ENAMETOOLONG, path)
                raise fs_error(errno.ENOENT, path)
            child = self.live_inode(entry[0], name, f"directory inode {cur.ino}")
            if (child.mode & 0o170000) == 0o120000 and (pending or follow):
                links += 1
                if links > MAX_SYMLINKS:
                    raise fs_error(errno.ELOOP, path)
                target = os.fsdecode(self.readlink(child))
                if target.startswith("/"):
                    del stack[1:]
                pending.extend(components(target))
                continue
            stack.append(child)
        return stack[-1]

    def live_inode(self, ino: int, name: str, where: str) -> Inode:
        """The inode a directory entry names, refusing one that is deleted or never used."""
        child = self.inode(ino)
        if child.links == 0 and (child.mode == 0 or child.dtime):
            raise CorruptImageError(f"entry {name!r} points to deleted inode {ino}", where)
        return child

    # -- extended attributes ------------------------------------------------------------------
    def xattrs(self, node: Inode) -> list[tuple[str, bytes]]:
        """All extended attributes of ``node``: in the inode first, then its xattr block.

        A writer in another process rewrites an unshared xattr block in place: what was read
        half-changed is read again, not reported as corrupt.
        """
        if not self._watch:
            return self._xattrs(node)
        for _ in range(_TRIES):
            try:
                return self._xattrs(node)
            except CorruptImageError:
                if not self._writer_busy():
                    raise
        raise OSError(errno.EAGAIN, "extended attributes kept changing under a writer in another process")

    def _xattrs(self, node: Inode) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        if node.extra_isize:
            out.extend(inode_xattrs(self.inode_raw(node.ino), self.sb.inode_size,
                                    node.extra_isize, node.ino))
        blk = node.file_acl
        if blk:
            self.check_data_run(blk, 1, node.ino, "xattr block")
            out.extend(block_xattrs(self.device.view(blk * self.bs, self.bs), self.bs, blk))
        return out

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        try:
            self.unmount()
        finally:
            self._inodes.clear()
            self._paths.clear()
            self.device.close()


def components(path: str) -> list[str]:
    """The names of ``path`` in reverse order (a stack), ``.`` kept; a trailing slash is a final
    ``.``, which makes the lookup demand a directory and follow a symlink there, as in Linux."""
    names = [c for c in path.split("/") if c]
    if path.endswith("/") and names:
        names.append(".")
    names.reverse()
    return names
