"""Readers of shared memory next to a writer in another process: when to trust the caches.

A read-only attachment of memory storage caches names and inodes. A writer elsewhere marks the
superblock "not clean" while it is mounted and changes the mount count and times when it mounts
and unmounts; :class:`WriterWatch` looks at those 16 bytes (the *stamp*) and tells the readers
(path lookup, data copies, directory and xattr reads) when what they cached or just read may be
stale or torn, and how to read it again.
"""

from __future__ import annotations

import errno
import stat
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from . import layout as L

if TYPE_CHECKING:
    from .inode import Inode
    from .volume import Volume

STATE_VALID = 1
STAMP_OFFSET, STAMP_LEN = L.SUPERBLOCK_OFFSET + 0x2C, 16   # s_mtime .. s_state
#: A reader's attempts at a copy or a lookup that a writer in another process keeps changing.
TRIES = 8
#: i_mode, i_size, i_dtime, i_links_count, i_blocks, i_block, i_generation, i_size_high.
_INODE_KEY = L.INODE.select("i_mode", "i_size", "i_dtime", "i_links_count", "i_blocks", "i_block",
                            "i_generation", "i_size_high")
_NO_BLOCK = bytes(4)
_T = TypeVar("_T")


class WriterWatch:
    """The stamp a read-only attachment last trusted its caches at, and what follows from it."""

    __slots__ = ("vol", "peek", "stamp", "quiet")

    def __init__(self, vol: Volume) -> None:
        self.vol = vol
        self.peek = vol.device.peek                      # type: ignore[attr-defined]
        self.stamp = self.peek(STAMP_OFFSET, STAMP_LEN)
        #: No writer was mounted when ``stamp`` was read (a "not clean" state alone, left by a
        #: writer that was killed, does not make the caches useless).
        self.quiet = self.no_writer(self.stamp)

    def busy(self) -> bool:
        """Whether a writer in another process is mounted now, or has been since the caches
        were last trusted (then what was just read may be torn)."""
        return self.peek(STAMP_OFFSET, STAMP_LEN) != self.stamp or not self.quiet

    def follow(self) -> None:
        """Before the caches are trusted: drop them if a writer in another process is mounted
        now or has been since they were read (it may have deleted a file and given its inode
        and blocks to another)."""
        stamp = self.peek(STAMP_OFFSET, STAMP_LEN)
        if stamp != self.stamp or not self.quiet:
            self.vol.forget_cached()
            self.stamp = stamp
            self.quiet = self.no_writer(stamp)

    def no_writer(self, stamp: bytes) -> bool:
        """Whether no writer is mounted: the state says clean, or nobody holds the writer's lock
        (a writer that mounts later changes the mount count, so the stamp tells)."""
        return bool(stamp[-2] & STATE_VALID) or not self.vol.device.writer_elsewhere()

    def copy_is_current(self, node: Inode) -> bool:
        """After a copy of ``node``'s data made while a writer elsewhere was busy: True when its
        inode shows the writer did not change it. False when its size shrank or a block pointer
        it had changed (``node`` now holds the new ones: copy again). A file a writer deleted
        meanwhile raises FileNotFoundError.

        A writer changes the inode before it frees a block, so blocks copied while the inode
        stayed the same were this file's.
        """
        mode, size, dtime, links, blocks, i_block, gen = self.stored(node)
        if links == 0 or dtime or gen != node.generation or stat.S_IFMT(mode ^ node.mode):
            self.vol.forget_cached()
            raise OSError(errno.ENOENT, "the file was deleted by a writer in another process")
        old = node.i_block
        if size >= node.size and all(old[i:i + 4] in (_NO_BLOCK, i_block[i:i + 4]) for i in range(0, 60, 4)):
            return True                       # at most grown: what was copied is still the file's
        node.size, node.i_block, node.blocks = size, i_block, blocks
        node.reset_map()
        return False

    def copy_again_while_changing(self, node: Inode, copy: Callable[[], _T], done: _T) -> _T:
        """``done``, a copy of ``node``'s data made while a writer in another process was busy,
        or ``copy()`` made again until the inode shows the writer left the file alone."""
        for _ in range(TRIES):
            if self.copy_is_current(node):
                return done
            done = copy()
        raise OSError(errno.EAGAIN, "the file kept changing under a writer in another process")

    def reload(self, node: Inode) -> None:
        """Take ``node``'s size and block pointers from storage again (a writer changed them)."""
        _mode, node.size, _dtime, _links, node.blocks, node.i_block, _gen = self.stored(node)
        node.reset_map()

    def stored(self, node: Inode) -> tuple[int, int, int, int, int, bytes, int]:
        """Mode, size, dtime, link count, i_blocks, i_block and generation of ``node`` as
        storage holds them now."""
        mode, size, dtime, links, blocks, i_block, gen, size_high = _INODE_KEY.unpack_from(
            self.vol.inode_raw(node.ino))
        if stat.S_ISREG(mode):
            size |= size_high << 32
        return mode, size, dtime, links, blocks, i_block, gen
