"""An opened ext2 filesystem (read side): group descriptors, inodes, directories, names, data.

Knows a device and the format, nothing of file objects or users: the facade in ``xipfs.fs``
turns what this returns into ``os``-shaped results.
"""

from __future__ import annotations

import errno
import os
import threading
from bisect import bisect_right
from collections.abc import Iterator
from typing import Any

from ..device import Device
from ..errors import CorruptImageError, fs_error
from . import layout as L
from .data import zero_blocks
from .dir import DirIndex, DirSpace, index_directory
from .groups import metadata_zones, read_group_descriptors
from .inode import Inode
from .mount import mount, unmount
from .super import Superblock, parse_superblock
from .watch import STAMP_LEN, STAMP_OFFSET, TRIES, WriterWatch
from .xattr import block_xattrs, inode_xattrs

#: Symlinks followed while resolving one path before ELOOP (Linux: 40).
MAX_SYMLINKS = 40
#: Inodes kept decoded; the cache is simply emptied when it grows past this.
INODE_CACHE_MAX = 1 << 17
NAME_MAX = 255
PATH_MAX = 4096

_ZEROS = memoryview(bytes(1 << 20))


def zero_fill(dst: memoryview) -> None:
    """Fill ``dst`` with zeros without allocating a buffer of its size."""
    n = len(dst)
    step = len(_ZEROS)
    for i in range(0, n, step):
        j = min(n, i + step)
        dst[i:j] = _ZEROS[:j - i]


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
        self.groups = read_group_descriptors(device, self.sb)
        self._zone_starts, self._zone_ends = metadata_zones(self.sb, self.groups)
        self._inodes: dict[int, Inode] = {}
        self._paths: dict[tuple[str, bool], int] = {}
        #: Serialises every change of metadata (reads of file data need no lock).
        self.lock = threading.RLock()
        #: Mounted for writing (by ``mount.mount``; the superblock says "not clean" meanwhile).
        self.mounted = False
        self.orig_state = self.sb.s_state
        #: A reader of shared memory watches the superblock for writers elsewhere.
        self.watch: WriterWatch | None = WriterWatch(self) if readonly and device.is_xip else None
        self._spaces: dict[int, DirSpace] = {}     # directories being written: where entries fit
        self.dirty_groups: set[int] = set()        # descriptors whose counts changed since sync
        self.dirty_inodes: dict[int, Inode] = {}   # inodes whose times changed since sync
        #: Inode -> users that keep it past its last name (``orphans.opened``/``closed``).
        self.open_counts: dict[int, int] = {}
        #: Inodes unlinked while in use: freed when their last user lets go.
        self.orphans: set[int] = set()
        #: Inode -> its live mappings in this process (``check_shrink(size)``, ``shrink(size)``).
        self.mappings: dict[int, list[Any]] = {}
        if not readonly:
            mount(self)

    def write_group_desc(self, g: int) -> None:
        """Note that group ``g``'s counts changed; they reach the image at the next sync.

        Only free counts change while mounted, and counts that lag behind the bitmaps are
        exactly what ``e2fsck -p`` recomputes on its own, so a killed writer loses nothing.
        """
        self.dirty_groups.add(g)

    def write_inode(self, node: Inode) -> None:
        """Store ``node`` in the inode table."""
        self.device.write(node.encode(), self.inode_offset(node.ino))
        node._stat = None
        self.dirty_inodes.pop(node.ino, None)

    def write_links(self, node: Inode) -> None:
        """Store only ``node``'s link count: one 2-byte store, nothing else changes."""
        node._raw = node._raw[:26] + node.links.to_bytes(2, "little") + node._raw[28:]
        self.device.write(node._raw[26:28], self.inode_offset(node.ino) + 26)
        node._stat = None

    def touch(self, node: Inode) -> None:
        """Only ``node``'s times changed: store it at the next sync (times are not structure)."""
        node.clip_times()
        node._stat = None
        self.dirty_inodes[node.ino] = node

    def inode_group_goal(self, ino: int) -> int:
        """The first block of inode ``ino``'s group: where its data should start looking."""
        return self.first_data_block + (ino - 1) // self.ipg * self.bpg

    # -- metadata zones -----------------------------------------------------------------------
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
        keep = {ino: n for ino, n in self._inodes.items()
                if ino in self.open_counts or ino in self.dirty_inodes}
        self._inodes = keep

    def name_moved(self, path: str, node: Inode) -> bool:
        """After a read through ``path`` by a reader of shared memory: True if a writer elsewhere
        may have changed the image meanwhile and ``path``, read again from storage, no longer
        names ``node`` (a name read torn or stale). Raises FileNotFoundError when it names
        nothing now."""
        if self.watch is None or not self.watch.busy():
            return False
        self.forget_cached()
        return self.resolve(path, True).ino != node.ino

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
        self.dirty_inodes.pop(ino, None)

    def names_changed(self) -> None:
        """A name went away or moved: resolved paths may now be wrong."""
        self._paths.clear()

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
        watch = self.watch
        if watch is None or not watch.busy():
            return n
        return watch.copy_again_while_changing(node, lambda: self._read_into(node, dst, pos), n)

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
        watch = self.watch
        if watch is None or not watch.busy():
            return data
        return watch.copy_again_while_changing(node, lambda: self._read_bytes(node, pos, n), data)

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
        watch = self.watch
        if watch is None:
            return self._index(node)
        for _ in range(TRIES):
            try:
                return self._index(node)
            except CorruptImageError:
                if not watch.busy():
                    raise
            watch.reload(node)         # read while a writer elsewhere changed it: as it is now
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
        watch = self.watch                     # inline: this is every lookup's first step
        if watch is not None and (watch.peek(STAMP_OFFSET, STAMP_LEN) != watch.stamp or not watch.quiet):
            return self._resolve_following(path, follow, watch)
        key = (path, follow)
        ino = self._paths.get(key)
        if ino is not None:
            return self.inode(ino)
        return self._resolve(path, follow)

    def _resolve_following(self, path: str, follow: bool, watch: WriterWatch) -> Inode:
        """``resolve`` while a writer in another process is mounted, or after one was."""
        for _ in range(TRIES):
            watch.follow()
            try:
                return self._resolve(path, follow)
            except CorruptImageError:
                if not watch.busy():
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
        watch = self.watch
        if watch is None:
            return self._xattrs(node)
        for _ in range(TRIES):
            try:
                return self._xattrs(node)
            except CorruptImageError:
                if not watch.busy():
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
            unmount(self)
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
