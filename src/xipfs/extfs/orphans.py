"""Inodes that outlive their last name: open counts, orphans, and what becomes of them.

A file unlinked while a file object, a mapping or (for a FUSE mount) the kernel still uses it
keeps its inode and blocks as an *orphan* until the last user lets go; then it is freed. At
unmount an orphan that a mapping here or in another process still uses is kept as
``/lost+found/#ino`` (so no later writer gives its blocks to another file), the rest are freed.
"""

from __future__ import annotations

import errno
import os
from typing import TYPE_CHECKING

from . import layout as L
from . import namei

if TYPE_CHECKING:
    from .inode import Inode
    from .volume import Volume


def opened(vol: Volume, node: Inode) -> None:
    """One more user of ``node`` (a file object, a mapping, the kernel of a FUSE mount)."""
    vol.open_counts[node.ino] = vol.open_counts.get(node.ino, 0) + 1


def closed(vol: Volume, node: Inode) -> None:
    """A user of ``node`` let go; an unlinked inode is freed with its last one."""
    counts = vol.open_counts
    left = counts.get(node.ino, 1) - 1
    if left > 0:
        counts[node.ino] = left
        return
    counts.pop(node.ino, None)
    if node.ino in vol.orphans and vol.mounted:
        with vol.lock:
            vol.orphans.discard(node.ino)
            namei.release(vol, node)


def is_open(vol: Volume, ino: int) -> bool:
    """Whether ``ino`` must outlive its last name for now: a user here has it, or another
    process (or attachment) maps it."""
    return ino in vol.open_counts or vol.device.pinned_elsewhere(ino)


def before_shrink(vol: Volume, node: Inode, size: int) -> None:
    """``node`` is about to shrink to ``size``: its live mappings agree or refuse (EBUSY)."""
    hooks = list(vol.mappings.get(node.ino, ()))
    if vol.device.pinned_elsewhere(node.ino):
        raise OSError(errno.EBUSY, "the file is mapped by another process")
    for hook in hooks:                       # every reason to refuse first ...
        hook.check_shrink(size)
    for hook in hooks:                       # ... then the mappings follow the new size
        hook.shrink(size)


def release_unused(vol: Volume) -> None:
    """Free the orphans nobody uses any more (at a sync)."""
    for ino in list(vol.orphans):
        if not is_open(vol, ino):
            vol.orphans.discard(ino)
            namei.release(vol, vol.inode(ino))


def settle(vol: Volume) -> None:
    """At unmount: free every orphan, but keep one a mapping still uses as ``/lost+found/#ino``."""
    for ino in list(vol.orphans):
        vol.open_counts.pop(ino, None)
        node = vol.inode(ino)
        mapped = ino in vol.mappings or vol.device.pinned_elsewhere(ino)
        if not (mapped and _adopt(vol, node)):
            namei.release(vol, node, force=True)
    vol.orphans.clear()


def _adopt(vol: Volume, node: Inode) -> bool:
    """Give an unlinked file that a mapping (here or elsewhere) still uses ``/lost+found/#ino``,
    as e2fsck names what it reconnects: the image is left clean, and its blocks cannot go to
    another file (and so into that process's mapping) in a later writing session."""
    try:
        try:
            found = namei.resolve(vol, "/lost+found", False)
        except FileNotFoundError:
            found = namei.create(vol, vol.inode(L.ROOT_INO), b"lost+found", 0o40700, 0, 0)
        if not found.is_dir:
            return False
        names = vol.dir_index(found).entries
        name, n = f"#{node.ino}", 0
        while name in names:
            n += 1
            name = f"#{node.ino}.{n}"
        node.dtime = 0
        namei.link(vol, node, found, os.fsencode(name))
    except OSError:
        return False
    return True
