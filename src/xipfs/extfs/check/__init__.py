"""A read-only consistency check of an ext2 or ext4 image: what ``e2fsck -fn`` checks in its passes.

Shaped like e2fsck: the passes are modules, each a function over one shared :class:`Context`
(e2fsck's ``e2fsck_t``); every problem they can report is a row of the table in
:mod:`.problems` (code, severity, message), which also documents the codes of
``xipfs check --json``.

- :mod:`.pass0`: the superblock, the group descriptors, the metadata they place, the resize inode;
- :mod:`.pass1`: every inode in use (type, flags, block map, block ownership, ``i_blocks``,
  ``i_size``, symlinks, special files), with :mod:`.xattrs` (extended attributes) and
  :mod:`.walk` (the block map walk); :mod:`.pass1b`: blocks claimed twice;
- :mod:`.pass2`: every directory block (entry lengths, names, inode numbers, file types, ``.``
  and ``..``, the htree index);
- :mod:`.pass3`: connectivity (every directory reachable from the root, ``..`` naming the parent);
- :mod:`.pass4`: link counts against references;
- :mod:`.pass5`: the bitmaps and the free and directory counts against what is in use;
- :mod:`.paths`: the path of each inode a problem names, for the report.

The rules, and which of them count as errors, follow e2fsck (e2fsprogs 1.47), so that an image
e2fsck finds clean gives no problem here (a device inode with block pointers, say, is only a
problem with the immutable or append-only flag, as in e2fsck). On ext4 (:mod:`.ext4`): 64-byte and
meta_bg descriptors, flex_bg placement, uninit groups and ``itable_unused`` (inodes past it are not
read, as e2fsck), bigalloc clusters, extent trees (walked by the read side's validating walker),
inline data, the checksums of the superblock, descriptors, inodes, extent blocks, directory leaves,
htree nodes and bitmaps, the journal superblock's header, and values in EA inodes (ea_inode: the
inode each entry names, its flag, value hash and size, the value's clusters in its owner's
``i_blocks``, and in pass 4 the reference counts; of these only the size, which Linux requires,
is checked beyond e2fsck 1.47.0). Not checked: htree hash ranges (the name hashes themselves), the
journal's contents, the orphan file's blocks, an EA inode's data against its value hash (e2fsck
does not read it either). Codes in :data:`MINOR_CODES` are reported by e2fsck without counting as
errors.

The image is never written. Problems come back as data (:class:`Problem`); only a superblock too
broken to describe a filesystem raises :class:`~xipfs.CorruptImageError`. Work is bounded on any
image: indirect blocks are followed at most to their fixed depth, and the blocks one inode may
claim are capped, so loops in directory trees or block maps end as problems, never as hangs.

Speed (the target is within 3x of e2fsck, which is C): see :mod:`.pass1` (inode tables scanned
a megabyte at a time with whole-buffer byte operations), :mod:`.plain` (the plain regular files of
a piece, most files, checked and claimed with column operations, no per-inode Python),
:mod:`.walk` (contiguous runs recognised whole), :mod:`.pass2` (directory blocks checked whole)
and :mod:`.pass5` (bitmaps compared as byte strings). Block ownership lives in one ``bytearray``
(a byte per block), link counts and references in two arrays; blocks are read with ``pread``
(a block read once costs less than a page fault of a fresh mapping).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ...device import Device
from ...progress import ProgressArg, progress_bar
from .. import layout as L
from ..super import Superblock, parse_superblock
from . import pass0, pass1, pass1b, pass2, pass3, pass4, pass5
from .context import Context
from .paths import add_paths
from .problems import CODES, MINOR_CODES, PROBLEMS, Problem, ProblemKind, Severity
from .xattrs import xattr_hash

if TYPE_CHECKING:
    from ..volume import Volume

__all__ = ["CODES", "MINOR_CODES", "PROBLEMS", "Context", "Problem", "ProblemKind", "Severity",
           "check_device", "check_image", "check_volume", "xattr_hash"]

#: Bytes of inode table read and scanned at a time (pass 1); read at each check, so a test may
#: set it smaller.
PIECE_BYTES = 1 << 20


def check_volume(vol: Volume, progress: ProgressArg = None) -> list[Problem]:
    """Check the filesystem ``vol`` (a :class:`~xipfs.extfs.volume.Volume`); the problems found.

    A volume opened for writing is synced first, so the check sees what the writer would leave.
    """
    if not vol.readonly:
        from ..mount import sync  # the write side: not imported by a read-only check

        sync(vol)
    return run(vol.device, vol.sb, progress)


def check_device(device: Device, progress: ProgressArg = None) -> list[Problem]:
    """Check the ext2 or ext4 image on ``device``, including images whose group descriptors are too
    damaged for :class:`~xipfs.extfs.volume.Volume` to open them.

    Raises :class:`~xipfs.CorruptImageError` when the superblock itself is unusable (a wrong
    superblock checksum is only a problem: the fields are checked anyway).
    """
    return run(device, _superblock(device), progress)


def check_image(image: str | os.PathLike[str] | Device, *, progress: ProgressArg = None,
                partition: int | None = None, offset: int | None = None) -> tuple[list[Problem], Superblock]:
    """:func:`check_device` on ``image`` opened read-only under the reader's lock (a writer in
    another process is not caught half-way: ``OSError(EBUSY)``); the problems found and the
    superblock checked (its counts, which pass 5 compared with the bitmaps)."""
    from ...device.detect import open_container

    owns = not isinstance(image, Device)
    device = open_container(image, readonly=True, partition=partition, offset=offset)
    owns = owns or device is not image
    try:
        if owns:
            device.lock(exclusive=False)
        sb = _superblock(device)
        return run(device, sb, progress), sb
    finally:
        if owns:
            device.close()


def _superblock(device: Device) -> Superblock:
    raw = bytes(device.view(L.SUPERBLOCK_OFFSET, L.SUPERBLOCK_SIZE)) \
        if device.size >= L.SUPERBLOCK_OFFSET + L.SUPERBLOCK_SIZE else b""
    return parse_superblock(raw, device.size, verify=False)


def run(device: Device, sb: Superblock, progress: ProgressArg = None) -> list[Problem]:
    """Every pass, in e2fsck's order, over one context; the problems found, with paths."""
    c = Context(device, sb, PIECE_BYTES)
    bar = progress_bar(progress, c.ngroups * c.ipg, "check", unit="inode")
    try:
        pass0.run(c)
        pass1.run(c, bar)
        pass1b.run(c)
        pass2.run(c, bar)
        pass3.run(c)
        pass4.run(c)
        pass5.run(c)
    finally:
        bar.close()
    add_paths(c)
    return c.problems
