"""An opened ext2 filesystem: the state every operation shares, in one place.

:class:`Volume` is Linux's ``ext2_sb_info`` with its caches: the superblock and group
descriptors, the decoded inodes and directory indexes, resolved paths, where directories have
room, what changed since the last sync, the lock, the allocators, the inodes in use. Its
methods only read and write that state (the inode cache and table, dirty counts, the metadata
zones). Every operation is a function of the module of its concern, taking the volume first,
as in ``fs/ext2``: ``namei`` (names and path lookup), ``data`` (reading and writing file data,
``get_xip_mem``), ``dir`` (directory blocks), ``xattr``, ``mount`` (mount, sync, unmount),
``orphans`` (inodes in use past their last name), ``groups``, ``watch`` (readers next to a
writer in another process).
"""

from __future__ import annotations

import errno
import threading
from bisect import bisect_right
from stat import S_ISDIR
from typing import Any

from ..device import Device
from ..errors import CorruptImageError
from . import layout as L
from .dir import DirIndex, DirSpace, build_index
from .groups import flex_groups, metadata_zones, read_group_descriptors
from .inode import Inode, seal_inode, verify_inode
from .recovery import needs_recovery, recover_in_place, replay_journal
from .super import Superblock, parse_superblock
from .watch import TRIES, WriterWatch

#: Inodes kept decoded; the cache is simply emptied when it grows past this.
INODE_CACHE_MAX = 1 << 17


class Volume:
    """The ext2 filesystem on a device: the layer between blocks and files."""

    def __init__(self, device: Device, readonly: bool = True, verify: bool = True,
                 recover: bool = True) -> None:
        if device.size < L.SUPERBLOCK_OFFSET + L.SUPERBLOCK_SIZE:
            raise CorruptImageError("image too small to hold a superblock",
                                    f"{device.name}: {device.size} bytes")
        raw = bytes(device.view(L.SUPERBLOCK_OFFSET, L.SUPERBLOCK_SIZE))
        #: The journal was replayed (in memory, over the image: ``recovery.replay_journal``).
        self.replayed = False
        if recover and needs_recovery(raw):
            if readonly:                         # in memory, the image untouched
                replayed = replay_journal(device, verify)
                self.replayed = replayed is not device
                device = replayed
            elif (parse_superblock(raw, device.size, verify).readonly_reason or device.readonly):
                pass                             # it may not write: mount() says why, nothing written
            else:                                # a writer replays into the image, as Linux
                device.lock(exclusive=True)
                try:
                    recover_in_place(device, verify)
                finally:
                    device.unlock()
                self.replayed = True
            raw = bytes(device.view(L.SUPERBLOCK_OFFSET, L.SUPERBLOCK_SIZE))
        self.device = device
        self.sb: Superblock = parse_superblock(raw, device.size, verify)
        self.readonly = readonly
        sb = self.sb
        #: metadata_csum checksums are checked as structures are read (``verify=False``: not).
        self.verify = verify and sb.metadata_csum
        #: The filesystem's checksum seed (``S``), None when checksums are not verified.
        self.csum_seed: int | None = sb.csum_seed if self.verify else None
        #: ext4 formats in use (the per-inode ones are also flagged in each inode).
        self.extents = sb.has_incompat(L.INCOMPAT_EXTENTS)
        self.large_dir = sb.has_incompat(L.INCOMPAT_LARGEDIR)
        self.huge_file = sb.has_ro_compat(L.RO_COMPAT_HUGE_FILE)
        self.is64 = sb.has_incompat(L.INCOMPAT_64BIT)
        self.ea_inode = sb.has_incompat(L.INCOMPAT_EA_INODE)
        #: The inode flags that may name a format here (``Inode.check_format``).
        self.inode_formats = (
            (L.FL_EXTENTS if self.extents else 0)
            | (L.FL_INLINE_DATA if sb.has_incompat(L.INCOMPAT_INLINE_DATA) else 0)
            | (L.FL_ENCRYPT if sb.has_incompat(L.INCOMPAT_ENCRYPT) else 0)
            | (L.FL_EA_INODE if sb.has_incompat(L.INCOMPAT_EA_INODE) else 0)
            | (L.FL_VERITY if sb.has_ro_compat(L.RO_COMPAT_VERITY) else 0)
            | (L.FL_CASEFOLD if sb.has_incompat(L.INCOMPAT_CASEFOLD) else 0))
        self.bs = sb.block_size
        self.filetype = sb.has_incompat(L.INCOMPAT_FILETYPE)
        # geometry read on hot paths, kept as plain attributes
        self.ipg = sb.s_inodes_per_group
        self.inodes_count = sb.s_inodes_count
        self.isize = sb.inode_size
        self.first_data_block = sb.s_first_data_block
        self.blocks_count = sb.s_blocks_count    # 64 bits with 64bit
        self.bpg = sb.s_blocks_per_group
        self.zero_inode = bytes(self.isize)
        self.groups = read_group_descriptors(device, self.sb, verify)
        #: Per group, the inodes past which the table is unused (INODE_UNINIT, itable_unused):
        #: ext4 may leave those slots uninitialised, so they read as free inodes.
        #: (The flags and the count mean something only under a checksum feature.)
        uninit_ok = sb.metadata_csum or sb.gdt_csum
        self.itable_used = [self.ipg if not uninit_ok else 0 if gd.flags & L.BG_INODE_UNINIT
                            else self.ipg - gd.itable_unused for gd in self.groups]
        #: Byte offset of each group's inode table (read on every inode's first use).
        self.itable_at = [gd.inode_table * self.bs for gd in self.groups]
        self._zone_starts, self._zone_ends = metadata_zones(self.sb, self.groups)
        #: Groups per flex group (1: no flex_bg).
        self.flex = flex_groups(self.sb)
        self._inodes: dict[int, Inode] = {}
        #: Resolved paths, ``(path, follow) -> inode`` (``namei.resolve``).
        self.paths: dict[tuple[str, bool], int] = {}
        #: Serialises every change of metadata (reads of file data need no lock).
        self.lock = threading.RLock()
        #: Mounted for writing (by ``mount.mount``; the superblock says "not clean" meanwhile).
        self.mounted = False
        self.orig_state = self.sb.s_state
        #: A reader of shared memory watches the superblock for writers elsewhere.
        self.watch: WriterWatch | None = WriterWatch(self) if readonly and device.is_xip else None
        self.spaces: dict[int, DirSpace] = {}     # directories being written: where entries fit
        self.dirty_groups: set[int] = set()        # descriptors whose counts changed since sync
        self.dirty_inodes: dict[int, Inode] = {}   # inodes whose times changed since sync
        #: Inode -> users that keep it past its last name (``orphans.opened``/``closed``).
        self.open_counts: dict[int, int] = {}
        #: Inodes unlinked while in use: freed when their last user lets go.
        self.orphans: set[int] = set()
        #: Inode -> its live mappings in this process (``check_shrink(size)``, ``shrink(size)``).
        self.mappings: dict[int, list[Any]] = {}
        if not readonly:
            from .mount import mount  # writers only: the allocators come with it

            mount(self)

    def write_group_desc(self, g: int) -> None:
        """Note that group ``g``'s counts changed; they reach the image at the next sync.

        Only free counts change while mounted, and counts that lag behind the bitmaps are
        exactly what ``e2fsck -p`` recomputes on its own, so a killed writer loses nothing.
        """
        self.dirty_groups.add(g)

    def write_inode(self, node: Inode) -> None:
        """Store ``node`` in the inode table."""
        raw = node.encode()
        if self.sb.metadata_csum:
            raw = node._raw = seal_inode(self, node.ino, raw)
        self.device.write(raw, self.inode_offset(node.ino))
        node._stat = None
        self.dirty_inodes.pop(node.ino, None)

    def write_links(self, node: Inode) -> None:
        """Store only ``node``'s link count: one 2-byte store, nothing else changes (with
        metadata_csum the whole inode, its checksum with it, in one store)."""
        if self.sb.metadata_csum:
            self.write_inode(node)
            return
        node._raw = node._raw[:26] + node.links.to_bytes(2, "little") + node._raw[28:]
        self.device.write(node._raw[26:28], self.inode_offset(node.ino) + 26)
        node._stat = None

    def touch(self, node: Inode) -> None:
        """Only ``node``'s times changed: store it at the next sync (times are not structure)."""
        node.clip_times()
        node._stat = None
        self.dirty_inodes[node.ino] = node

    def inode_group_goal(self, ino: int, regular: bool = False) -> int:
        """Where inode ``ino``'s data should start looking: the first block of its group, or
        with flex groups of 4 or more that of its flex group, the group after it for a
        regular file (Linux ``ext4_inode_to_goal_block``: the first group is left to the
        directories and the flex group's metadata)."""
        g = (ino - 1) // self.ipg
        flex = self.flex
        if flex >= 4:
            g &= ~(flex - 1)
            if regular and g + 1 < len(self.groups):
                g += 1
        return self.first_data_block + g * self.bpg

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

    def inode_raw(self, ino: int) -> memoryview | bytes:
        """The on-disk bytes of inode ``ino`` (zeros for a slot ext4 has not initialised),
        their checksum verified (metadata_csum)."""
        if not 0 < ino <= self.inodes_count:
            raise CorruptImageError(f"inode number {ino} out of range 1..{self.inodes_count}")
        group, index = divmod(ino - 1, self.ipg)
        if index >= self.itable_used[group]:
            return self.zero_inode
        isize = self.isize
        raw = self.device.view(self.itable_at[group] + index * isize, isize)
        if self.verify:
            verify_inode(self, ino, raw)
        return raw

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

    def forget_cached(self) -> None:
        """Drop resolved paths and decoded inodes (a read-only attachment, before it relies
        on them for something lasting, such as a mapping)."""
        self.paths.clear()
        self._inodes.clear()

    def remember(self, node: Inode) -> None:
        self._inodes[node.ino] = node

    def forget(self, ino: int) -> None:
        self._inodes.pop(ino, None)
        self.spaces.pop(ino, None)
        self.dirty_inodes.pop(ino, None)

    def names_changed(self) -> None:
        """A name went away or moved: resolved paths may now be wrong."""
        self.paths.clear()

    @property
    def root(self) -> Inode:
        node = self.inode(L.ROOT_INO)
        if not S_ISDIR(node.mode):
            raise CorruptImageError("root inode is not a directory", "inode 2")
        return node

    # -- directories --------------------------------------------------------------------------
    def dir_index(self, node: Inode) -> DirIndex:
        """The name index of directory ``node``, built on first use."""
        index = node._dir
        if index is not None:
            return index
        watch = self.watch
        if watch is None:
            return build_index(self, node)
        for _ in range(TRIES):
            try:
                return build_index(self, node)
            except CorruptImageError:
                if not watch.busy():
                    raise
            watch.reload(node)         # read while a writer elsewhere changed it: as it is now
        raise OSError(errno.EAGAIN, "a directory kept changing under a writer in another process")

    def live_inode(self, ino: int, name: str, where: str) -> Inode:
        """The inode a directory entry names, refusing one that is deleted or never used."""
        child = self.inode(ino)
        if child.links == 0 and (child.mode == 0 or child.dtime):
            raise CorruptImageError(f"entry {name!r} points to deleted inode {ino}", where)
        return child

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        try:
            if self.mounted:                      # a writer: write back, mark clean, unlock
                from .mount import unmount

                unmount(self)
        finally:
            self._inodes.clear()
            self.paths.clear()
            self.device.close()

