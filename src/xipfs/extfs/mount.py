"""Mounting for writing, syncing and unmounting (what Linux does in ext2_fill_super,
ext2_sync_fs and ext2_put_super): the superblock's state and counts, the backups of the
superblock and the descriptor table, and the flush that makes it all durable.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

from . import layout as L
from . import orphans
from .balloc import BlockAllocator
from .groups import flush_group_descs
from .ialloc import InodeAllocator
from .recovery import journal_is_empty
from .super import STATE_VALID, seal_superblock, write_seconds, write_super

if TYPE_CHECKING:
    from .volume import Volume


def mount(vol: Volume) -> None:
    """Take the writer's lock and mark the image "not clean" while it is mounted, with a new
    mount count and time, as Linux does; set up the allocators."""
    sb = vol.sb
    if sb.readonly_reason:
        raise OSError(errno.EROFS, f"image can only be opened read-only: {sb.readonly_reason}",
                      vol.device.name)
    if vol.device.readonly:
        raise OSError(errno.EROFS, "device is read-only", vol.device.name)
    if sb.has_incompat(L.INCOMPAT_RECOVER):
        raise OSError(errno.EROFS, "the journal needs recovery and was not replayed: read-only",
                      vol.device.name)
    if sb.has_compat(L.COMPAT_HAS_JOURNAL) and sb.s_journal_inum and not journal_is_empty(vol):
        raise OSError(errno.EROFS, "the journal holds transactions but needs_recovery is not set "
                      "(e2fsck decides what they are): read-only", vol.device.name)
    vol.device.lock(exclusive=True)
    vol.balloc = BlockAllocator(vol)
    vol.ialloc = InodeAllocator(vol)
    vol.orig_state = sb.s_state
    f = sb.fields
    f["s_state"] = sb.s_state & ~STATE_VALID
    f["s_mnt_count"] = (sb.s_mnt_count + 1) & 0xFFFF
    f["s_mtime"] = write_seconds() & 0xFFFFFFFF
    if f["s_max_mnt_count"] == 0:
        f["s_max_mnt_count"] = 20
    write_super(vol)
    vol.device.flush()
    vol.mounted = True


def sync(vol: Volume) -> None:
    """Make everything durable: free counts, backups of superblock and descriptors, flush."""
    if not vol.mounted:
        vol.device.flush()
        return
    with vol.lock:
        orphans.release_unused(vol)               # unlinked, and nobody uses them any more
        for node in list(vol.dirty_inodes.values()):
            vol.write_inode(node)
        flush_group_descs(vol)
        f = vol.sb.fields
        f["s_free_blocks_count"] = sum(gd.free_blocks for gd in vol.groups)
        f["s_free_inodes_count"] = sum(gd.free_inodes for gd in vol.groups)
        f["s_wtime"] = write_seconds() & 0xFFFFFFFF
        write_super(vol)
        write_backups(vol)
        vol.device.flush()


def write_backups(vol: Volume) -> None:
    """Copy the superblock and descriptor table into every backup group, as e2fsprogs does."""
    sb = vol.sb
    bs = vol.bs
    gdt = bytes(vol.device.view((sb.s_first_data_block + 1) * bs, sb.desc_blocks * bs))
    backup = bytearray(sb.raw)
    L.SUPERBLOCK.pack_field(backup, "s_state", sb.s_state & ~STATE_VALID)
    for g in range(1, sb.groups):
        if not sb.group_has_super(g):
            continue
        L.SUPERBLOCK.pack_field(backup, "s_block_group_nr", min(g, 0xFFFF))
        seal_superblock(sb, backup)
        first = sb.group_first_block(g)
        vol.device.write(backup, first * bs)
        vol.device.write(gdt, (first + 1) * bs)


def unmount(vol: Volume) -> None:
    """Write everything back and mark the filesystem clean again (if it was); unlock it."""
    if not vol.mounted:
        return
    with vol.lock:
        orphans.settle(vol)                       # unlinked files still in use: freed or kept
        f = vol.sb.fields
        f["s_state"] = (vol.sb.s_state & ~STATE_VALID) | (vol.orig_state & STATE_VALID)
        sync(vol)
        vol.mounted = False
        vol.device.unlock()
