"""Corrupt and hostile ext2 images: xipfs must raise CorruptImageError naming what is wrong.

Each test takes a real image built by e2fsprogs (block size 1024 and 4096, see ``corrupt_util``),
damages one structure by patching bytes, and opens it on the memory device (``xip=True``) and on
the file device behind the page cache (``xip=False``). Then everything in it is exercised: the
whole tree, every stat, every file (``read_bytes``, ``pread``, ``readinto``, buffered reads), every
symlink, every xattr, and ``fs.walk``. The damage must raise :class:`xipfs.CorruptImageError`
(at open or at the first access that touches it) whose message names the structure; no other
exception type may escape (IndexError, struct.error, ValueError, RecursionError, MemoryError...),
nothing may hang (every image is exercised under a SIGALRM bound), and nothing may be read from
outside the image.

Cases marked *tolerated* (``expect=None``) are damage that the format does not let a reader detect
cheaply (or that Linux reads without complaint): they only have to end, in bounded time, with
nothing but the allowed errors.

Tests that failed when they were written, each for a bug in xipfs (kept failing on purpose):

- ``test_directory_cycle``: a directory entry naming an ancestor makes ``fs.walk`` endless;
- ``test_damage[*-de-dotdot-is-a-file|de-dotdot-is-unused-inode|de-root-dotdot-not-root-*]``:
  the on-disk ``..`` is trusted, so ``/dir/..`` resolves to a file, a free inode, or (for the
  root) another directory, with no error;
- ``test_huge_sparse_file_far_ranges[*-1024-*]``: past what the block map can address,
  ``readinto`` returns ``n`` without writing the buffer (and disagrees with ``pread``);
- ``test_direntry_stat_of_deleted_inode``: ``DirEntry.stat()`` reports a deleted inode as live;
- ``test_empty_image[xip]``: a 0-byte image gives ``OSError(EINVAL)``, not CorruptImageError.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import stat
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from corrupt_util import (
    FL_EXTENTS,
    FL_INLINE_DATA,
    XATTR_MAGIC,
    XF_ATTRS,
    BaseImage,
    Hang,
    Patch,
    build_image,
    check_corrupt_error,
    exercise,
    time_limit,
)

import xipfs
from xipfs import CorruptImageError, UnsupportedFeatureError

# The thread method never touches SIGALRM, which corrupt_util.time_limit uses per image.
pytestmark = [
    pytest.mark.timeout(60, method="thread"),
    pytest.mark.skipif(not all(shutil.which(t) for t in ("mke2fs", "debugfs", "dumpe2fs")),
                       reason="needs e2fsprogs (mke2fs, debugfs, dumpe2fs)"),
]

BLOCK_SIZES = (1024, 4096)
XIP = pytest.mark.parametrize("xip", [True, False], ids=["xip", "pagecache"])


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xipfs-corrupt-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


_IMAGES: dict[int, BaseImage] = {}


@pytest.fixture(scope="session")
def images(workdir: str) -> Iterator[Callable[[int], BaseImage]]:
    def get(bs: int) -> BaseImage:
        if bs not in _IMAGES:
            _IMAGES[bs] = build_image(workdir, bs)
        return _IMAGES[bs]

    yield get
    _IMAGES.clear()


@pytest.fixture
def scratch(workdir: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A path for this test's damaged image (in /dev/shm), removed afterwards."""
    name = "".join(c if c.isalnum() else "_" for c in request.node.name)[:150]
    path = os.path.join(workdir, name + ".img")
    yield path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# -- the damage catalogue -----------------------------------------------------------------------
SUPERBLOCK = ("superblock",)
GROUP_DESC = ("group descriptor",)
DIRECTORY = ("directory",)
XATTR = ("xattr",)
SYMLINK = ("symlink",)
INDIRECT = ("indirect",)
ANY: tuple[str, ...] = ()   # any CorruptImageError (it must still name a structure)


@dataclass
class Case:
    name: str
    damage: Callable[[Patch], tuple[str, ...] | None]
    bs: tuple[int, ...] = BLOCK_SIZES
    #: Files that the damage does not touch: they must still read back exactly.
    intact: tuple[str, ...] = ()


CASES: list[Case] = []


def case(name: str, *, bs: tuple[int, ...] = BLOCK_SIZES, intact: tuple[str, ...] = ()) -> Callable:
    def deco(fn: Callable[[Patch], tuple[str, ...] | None]) -> Callable:
        CASES.append(Case(name, fn, bs, intact))
        return fn
    return deco


def simple(name: str, damage: Callable[[Patch], object], expect: tuple[str, ...] | None, *,
           bs: tuple[int, ...] = BLOCK_SIZES, intact: tuple[str, ...] = ()) -> None:
    """A case whose damage is one expression and whose expectation is fixed."""
    def fn(p: Patch) -> tuple[str, ...] | None:
        damage(p)
        return expect
    CASES.append(Case(name, fn, bs, intact))


def ino_words(p: Patch, path: str) -> tuple[str, ...]:
    return (f"inode {p.base.ino[path]}",)


FILES_OK = ("/sparse", "/dir/sub/deep/leaf")   # for damage away from these and their directories
SPARSE_OK = ("/sparse",)

# superblock (ext2-spec sections 1, 2, 14.1) ----------------------------------------------------
simple("sb-magic-bad", lambda p: p.sb("magic", 0x53EF), SUPERBLOCK)
simple("sb-magic-zero", lambda p: p.sb("magic", 0), SUPERBLOCK)
simple("sb-log-block-size-30", lambda p: (p.sb("log_block_size", 30), p.sb("log_frag_size", 30)), SUPERBLOCK)
simple("sb-log-block-size-7", lambda p: (p.sb("log_block_size", 7), p.sb("log_frag_size", 7)), SUPERBLOCK)
simple("sb-log-block-size-huge", lambda p: p.sb("log_block_size", 0xFFFFFFFF), SUPERBLOCK)
simple("sb-log-block-size-plus-1",
       lambda p: (p.sb("log_block_size", p.sb_get("log_block_size") + 1),
                  p.sb("log_frag_size", p.sb_get("log_frag_size") + 1)), SUPERBLOCK)
simple("sb-frag-size-mismatch", lambda p: p.sb("log_frag_size", p.sb_get("log_block_size") + 1), SUPERBLOCK)
simple("sb-frag-size-huge", lambda p: p.sb("log_frag_size", 0xFFFFFFFF), SUPERBLOCK)
simple("sb-bpg-0", lambda p: p.sb("blocks_per_group", 0), SUPERBLOCK)
simple("sb-bpg-7", lambda p: p.sb("blocks_per_group", 7), SUPERBLOCK)
simple("sb-bpg-huge", lambda p: p.sb("blocks_per_group", 0xFFFFFFFF), SUPERBLOCK)
simple("sb-bpg-over-bitmap", lambda p: p.sb("blocks_per_group", 8 * p.base.bs + 8), SUPERBLOCK)
simple("sb-ipg-0", lambda p: p.sb("inodes_per_group", 0), SUPERBLOCK)
simple("sb-ipg-huge", lambda p: p.sb("inodes_per_group", 0xFFFFFFFF), SUPERBLOCK)
simple("sb-ipg-over-bitmap", lambda p: p.sb("inodes_per_group", 8 * p.base.bs + 1), SUPERBLOCK)
simple("sb-inodes-count-plus-1", lambda p: p.sb("inodes_count", p.sb_get("inodes_count") + 1), SUPERBLOCK)
simple("sb-inodes-count-0", lambda p: p.sb("inodes_count", 0), SUPERBLOCK)
simple("sb-blocks-count-double", lambda p: p.sb("blocks_count", 2 * p.sb_get("blocks_count")), SUPERBLOCK)
simple("sb-blocks-count-max", lambda p: p.sb("blocks_count", 0xFFFFFFFF), SUPERBLOCK)
simple("sb-blocks-count-0", lambda p: p.sb("blocks_count", 0), SUPERBLOCK)
simple("sb-blocks-count-1", lambda p: p.sb("blocks_count", 1), SUPERBLOCK)
simple("sb-first-data-block-wrong", lambda p: p.sb("first_data_block", 1 - p.base.fdb), SUPERBLOCK)
simple("sb-first-data-block-huge", lambda p: p.sb("first_data_block", 0xFFFFFFF0), SUPERBLOCK)
simple("sb-inode-size-0", lambda p: p.sb("inode_size", 0), SUPERBLOCK)
simple("sb-inode-size-100", lambda p: p.sb("inode_size", 100), SUPERBLOCK)
simple("sb-inode-size-384", lambda p: p.sb("inode_size", 384), SUPERBLOCK)
simple("sb-inode-size-over-block", lambda p: p.sb("inode_size", 2 * p.base.bs), SUPERBLOCK)
simple("sb-inode-size-0xffff", lambda p: p.sb("inode_size", 0xFFFF), SUPERBLOCK)
simple("sb-first-ino-0", lambda p: p.sb("first_ino", 0), SUPERBLOCK)
simple("sb-first-ino-10", lambda p: p.sb("first_ino", 10), SUPERBLOCK)
simple("sb-first-ino-beyond-count", lambda p: p.sb("first_ino", p.sb_get("inodes_count") + 5), SUPERBLOCK)


@case("sb-bpg-tiny-counts-consistent")
def _(p: Patch) -> tuple[str, ...]:
    """8 blocks per group with a matching inode count: the inode table cannot fit a group."""
    p.sb("blocks_per_group", 8)
    groups = -(-(p.sb_get("blocks_count") - p.base.fdb) // 8)
    p.sb("inodes_count", groups * p.sb_get("inodes_per_group"))
    return SUPERBLOCK


@case("sb-bpg-half-counts-consistent")
def _(p: Patch) -> tuple[str, ...]:
    """Half the groups' size, counts consistent: the descriptors no longer match their groups."""
    bpg = p.sb_get("blocks_per_group") // 2
    p.sb("blocks_per_group", bpg)
    p.sb("frags_per_group", bpg)
    groups = -(-(p.sb_get("blocks_count") - p.base.fdb) // bpg)
    p.sb("inodes_count", groups * p.sb_get("inodes_per_group"))
    return GROUP_DESC


@case("sb-ipg-double-counts-consistent")
def _(p: Patch) -> tuple[str, ...]:
    """Twice the inodes per group: the bigger inode tables run over file data."""
    p.sb("inodes_per_group", 2 * p.sb_get("inodes_per_group"))
    p.sb("inodes_count", 2 * p.sb_get("inodes_count"))
    return ANY


@case("sb-rev0-with-256-byte-inodes")
def _(p: Patch) -> None:
    """Revision 0 means 128-byte inodes: every inode is read at the wrong place (tolerated)."""
    p.sb("rev_level", 0)
    return None


def truncate_to(size: Callable[[Patch], int]) -> Callable[[Patch], None]:
    def fn(p: Patch) -> None:
        p.size = size(p)
    return fn


simple("truncated-one-block-short", truncate_to(lambda p: len(p.buf) - p.base.bs), SUPERBLOCK)
simple("truncated-one-byte-short", truncate_to(lambda p: len(p.buf) - 1), SUPERBLOCK)
simple("truncated-half", truncate_to(lambda p: len(p.buf) // 2), SUPERBLOCK)
simple("truncated-2047", truncate_to(lambda p: 2047), SUPERBLOCK)
simple("truncated-1500", truncate_to(lambda p: 1500), SUPERBLOCK)
simple("truncated-1024", truncate_to(lambda p: 1024), SUPERBLOCK)
simple("truncated-1", truncate_to(lambda p: 1), SUPERBLOCK)


# group descriptors (ext2-spec section 4) -------------------------------------------------------
def gd_zero(p: Patch, field_: str) -> tuple[str, ...] | None:
    """Block 0: outside group 0 at 1 KiB blocks (the group starts at 1). At 4 KiB it is inside
    group 0 but is the superblock's block; Linux's ext2_check_descriptors only checks the group
    range too, so there a bitmap at 0 is tolerated (bitmaps are not read) and an inode table at 0
    must fail somewhere (the root inode is then read from the superblock)."""
    p.gd(0, field_, 0)
    if p.base.bs == 1024:
        return GROUP_DESC
    return ANY if field_ == "inode_table" else None


def gd_cases() -> None:
    for field_ in ("block_bitmap", "inode_bitmap", "inode_table"):
        short = field_.replace("_", "-")
        CASES.append(Case(f"gd0-{short}-0", lambda p, f=field_: gd_zero(p, f)))
        simple(f"gd0-{short}-in-group-1",
               lambda p, f=field_: p.gd(0, f, getattr(p.base.groups[1], f)), GROUP_DESC)
        simple(f"gd0-{short}-past-device",
               lambda p, f=field_: p.gd(0, f, p.sb_get("blocks_count") + 5), GROUP_DESC)
        simple(f"gd0-{short}-ffffffff", lambda p, f=field_: p.gd(0, f, 0xFFFFFFFF), GROUP_DESC)
        simple(f"gd-last-{short}-past-device",
               lambda p, f=field_: p.gd(len(p.base.groups) - 1, f, p.sb_get("blocks_count")), GROUP_DESC)
        simple(f"gd1-{short}-in-group-0",
               lambda p, f=field_: p.gd(1, f, getattr(p.base.groups[0], f)), GROUP_DESC)


gd_cases()
simple("gd0-inode-table-straddles-group-end",
       lambda p: p.gd(0, "inode_table", p.base.groups[0].last - 3), GROUP_DESC)
simple("gd-last-inode-table-straddles-device-end",
       lambda p: p.gd(len(p.base.groups) - 1, "inode_table", p.sb_get("blocks_count") - 3), GROUP_DESC)
simple("gd0-free-blocks-over-group", lambda p: p.gd(0, "free_blocks", 0xFFFF), GROUP_DESC)
simple("gd0-free-inodes-over-group", lambda p: p.gd(0, "free_inodes", 0xFFFF), GROUP_DESC)


# inodes (ext2-spec section 6) ------------------------------------------------------------------
def inode_case(name: str, path: str, damage: Callable[[Patch], object], *,
               intact: tuple[str, ...] = FILES_OK, bs: tuple[int, ...] = BLOCK_SIZES) -> None:
    def fn(p: Patch) -> tuple[str, ...]:
        damage(p)
        return ino_words(p, path)
    CASES.append(Case(name, fn, bs, intact))


inode_case("ino-extra-isize-odd", "/small", lambda p: p.inode("/small", "extra_isize", 33))
inode_case("ino-extra-isize-2", "/small", lambda p: p.inode("/small", "extra_isize", 2))
inode_case("ino-extra-isize-too-large", "/small",
           lambda p: p.inode("/small", "extra_isize", p.base.isize - 128 + 4))
inode_case("ino-extra-isize-0xfffc", "/small", lambda p: p.inode("/small", "extra_isize", 0xFFFC))
inode_case("ino-extra-isize-bad-on-root", "/", lambda p: p.inode("/", "extra_isize", 0x7FFF), intact=())
inode_case("ino-extents-flag-file", "/big",
           lambda p: p.inode("/big", "flags", p.inode_get("/big", "flags") | FL_EXTENTS))
inode_case("ino-inline-data-flag-file", "/small",
           lambda p: p.inode("/small", "flags", FL_INLINE_DATA))
inode_case("ino-extents-flag-dir", "/dir/sub",
           lambda p: p.inode("/dir/sub", "flags", FL_EXTENTS), intact=SPARSE_OK)
inode_case("ino-inline-data-flag-dir", "/dir",
           lambda p: p.inode("/dir", "flags", FL_INLINE_DATA), intact=SPARSE_OK)
inode_case("ino-extents-flag-slow-symlink", "/slow", lambda p: p.inode("/slow", "flags", FL_EXTENTS))
inode_case("ino-extents-flag-root", "/", lambda p: p.inode("/", "flags", FL_EXTENTS), intact=())
simple("root-not-a-directory", lambda p: p.inode("/", "mode", 0o100644), ("inode 2",))
simple("root-mode-0", lambda p: p.inode("/", "mode", 0), ("inode 2",))
simple("dir-size-not-block-multiple", lambda p: p.inode("/dir", "size", p.inode_get("/dir", "size") + 1),
       DIRECTORY, intact=SPARSE_OK)
simple("dir-size-100", lambda p: p.inode("/dir/sub", "size", 100), DIRECTORY, intact=SPARSE_OK)
simple("dir-size-0", lambda p: p.inode("/dir/sub", "size", 0), DIRECTORY, intact=SPARSE_OK)
simple("root-size-0", lambda p: p.inode("/", "size", 0), DIRECTORY)
simple("dir-hole-block-1", lambda p: p.iblock("/dir", 1, 0), DIRECTORY, intact=SPARSE_OK)
simple("dir-hole-last-block", lambda p: p.iblock("/dir", 3, 0), DIRECTORY, intact=SPARSE_OK)
simple("dir-hole-block-0", lambda p: p.iblock("/dir/sub", 0, 0), DIRECTORY, intact=SPARSE_OK)
simple("dir-size-past-its-blocks", lambda p: p.inode("/dir", "size", 20 * p.base.bs), DIRECTORY,
       intact=SPARSE_OK)
simple("dir-size-4g-of-holes", lambda p: p.inode("/dir/sub", "size", 0x100000000 - p.base.bs),
       DIRECTORY, intact=SPARSE_OK)


@case("dir-dind-repeats-block-0", intact=SPARSE_OK)
def _(p: Patch) -> tuple[str, ...]:
    """A directory of tens of MiB whose every block is its block 0: '.' repeats (bounded time)."""
    bs, apb = p.base.bs, p.base.bs // 4
    blk0 = p.base.blocks["/dir/sub"][0]
    ind, dind = p.base.free_blocks(2)
    nblocks = 12 + apb + (apb * apb if bs == 1024 else 16 * apb)
    p.inode("/dir/sub", "size", nblocks * bs)
    for i in range(12):
        p.iblock("/dir/sub", i, blk0)
    p.fill_ind(ind, blk0)
    p.fill_ind(dind, ind)
    p.iblock("/dir/sub", 12, ind)
    p.iblock("/dir/sub", 13, dind)
    return DIRECTORY


@case("dir-dind-repeats-empty-block", intact=SPARSE_OK)
def _(p: Patch) -> None:
    """A directory of tens of MiB of the same empty block (duplicate blocks; tolerated, bounded)."""
    bs, apb = p.base.bs, p.base.bs // 4
    empty, ind, dind = p.base.free_blocks(3)
    p.put_bytes(empty * bs, struct.pack("<IHBB", 0, bs, 0, 0))
    nblocks = 12 + apb + (apb * apb if bs == 1024 else 16 * apb)
    p.inode("/dir/sub", "size", nblocks * bs)
    for i in range(1, 12):
        p.iblock("/dir/sub", i, empty)
    p.fill_ind(ind, empty)
    p.fill_ind(dind, ind)
    p.iblock("/dir/sub", 12, ind)
    p.iblock("/dir/sub", 13, dind)
    return None


# block pointers (ext2-spec section 6, block map) -----------------------------------------------
def metadata_block(p: Patch, which: str) -> int:
    b = p.base
    g0, g1 = b.groups[0], b.groups[1]
    return {
        "superblock": 1 if b.bs == 1024 else g1.first,  # block 0 of a 4K image is a hole pointer
        "backup-superblock": g1.first,
        "gdt": b.fdb + 1,
        "reserved-gdt": b.fdb + 2,
        "block-bitmap": g0.block_bitmap,
        "inode-bitmap": g0.inode_bitmap,
        "inode-table": g0.inode_table + 1,
        "inode-table-group-1": g1.inode_table + 2,
        "block-count": p.sb_get("blocks_count"),
        "out-of-range": p.sb_get("blocks_count") + 100,
        "ffffffff": 0xFFFFFFFF,
    }[which]


TARGETS = ("superblock", "backup-superblock", "gdt", "reserved-gdt", "block-bitmap", "inode-bitmap",
           "inode-table", "inode-table-group-1", "block-count", "out-of-range", "ffffffff")
for _t in TARGETS:
    inode_case(f"ptr-direct-{_t}", "/big", lambda p, t=_t: p.iblock("/big", 3, metadata_block(p, t)))
    inode_case(f"ptr-whole-run-{_t}", "/small", lambda p, t=_t: p.iblock("/small", 0, metadata_block(p, t)))
    simple(f"ptr-ind-{_t}", lambda p, t=_t: p.iblock("/big", 12, metadata_block(p, t)), INDIRECT,
           intact=FILES_OK)
for _t in ("gdt", "inode-table", "block-count", "ffffffff"):
    inode_case(f"ptr-ind-entry-{_t}", "/big",
               lambda p, t=_t: p.ind(p.base.iblock("/big")[12], 5, metadata_block(p, t)))
    inode_case(f"ptr-slow-symlink-{_t}", "/slow", lambda p, t=_t: p.iblock("/slow", 0, metadata_block(p, t)))
    inode_case(f"ptr-sparse-{_t}", "/sparse", lambda p, t=_t: p.iblock("/sparse", 0, metadata_block(p, t)),
               intact=("/dir/sub/deep/leaf",))
    simple(f"ptr-dind-{_t}", lambda p, t=_t: p.iblock("/big", 13, metadata_block(p, t)), INDIRECT,
           bs=(1024,), intact=FILES_OK)
    simple(f"ptr-dind-entry-{_t}",
           lambda p, t=_t: p.ind(p.base.iblock("/big")[13], 0, metadata_block(p, t)), INDIRECT,
           bs=(1024,), intact=FILES_OK)
    inode_case(f"ptr-dind-leaf-{_t}", "/big",
               lambda p, t=_t: p.ind(p.base.ind_entries(p.base.iblock("/big")[13])[0], 3,
                                     metadata_block(p, t)), bs=(1024,))
inode_case("ptr-dir-block-itable", "/dir/sub",
           lambda p: p.iblock("/dir/sub", 0, metadata_block(p, "inode-table")), intact=SPARSE_OK)
simple("ptr-xattr-block-itable", lambda p: p.inode("/xf", "file_acl", metadata_block(p, "inode-table")),
       XATTR, intact=FILES_OK)
simple("ptr-xattr-block-out-of-range",
       lambda p: p.inode("/xf", "file_acl", metadata_block(p, "out-of-range")), XATTR, intact=FILES_OK)
simple("ptr-xattr-block-ffffffff", lambda p: p.inode("/xf", "file_acl", 0xFFFFFFFF), XATTR, intact=FILES_OK)
simple("ptr-xattr-block-superblock", lambda p: p.inode("/xf", "file_acl", metadata_block(p, "superblock")),
       XATTR, intact=FILES_OK)


@case("ptr-ind-points-to-itself", intact=FILES_OK)
def _(p: Patch) -> None:
    """An IND block whose first entry is itself: its own bytes read as data (tolerated, bounded)."""
    ind = p.base.iblock("/big")[12]
    p.ind(ind, 0, ind)
    return None


@case("ptr-dind-points-to-itself", bs=(1024,), intact=FILES_OK)
def _(p: Patch) -> None:
    """A DIND block whose first entry is itself: read as its own IND block (tolerated, bounded)."""
    dind = p.base.iblock("/big")[13]
    p.ind(dind, 0, dind)
    return None


@case("ptr-dind-every-entry-same-ind", bs=(1024,), intact=FILES_OK)
def _(p: Patch) -> None:
    """Every DIND entry is the same IND block, i_size covering all of them (tolerated, bounded)."""
    dind = p.base.iblock("/big")[13]
    p.fill_ind(dind, p.base.ind_entries(dind)[0])
    p.inode("/big", "size", (12 + 256 + 256 * 256) * 1024)
    return None


@case("ptr-tind-every-entry-same-dind", bs=(1024,), intact=FILES_OK)
def _(p: Patch) -> None:
    """A TIND block whose entries all name the file's DIND block, i_size 16 GiB (tolerated, bounded)."""
    dind = p.base.iblock("/big")[13]
    (tind,) = p.base.free_blocks(1)
    p.fill_ind(tind, dind)
    p.iblock("/big", 14, tind)
    p.inode("/big", "size", 0)
    p.inode("/big", "size_high", 4)  # 16 GiB: the whole TIND range
    return None


@case("ptr-ind-chain-ind-is-dind", bs=(1024,), intact=FILES_OK)
def _(p: Patch) -> None:
    """IND and DIND are the same block (tolerated, bounded)."""
    p.iblock("/big", 12, p.base.iblock("/big")[13])
    return None


# directory entries (ext2-spec section 8) -------------------------------------------------------
def dirent_case(name: str, damage: Callable[[Patch, BaseImage], object], expect: tuple[str, ...] | None,
                *, intact: tuple[str, ...] = SPARSE_OK) -> None:
    def fn(p: Patch) -> tuple[str, ...] | None:
        damage(p, p.base)
        return expect
    CASES.append(Case(name, fn, BLOCK_SIZES, intact))


def third(b: BaseImage, path: str = "/dir", block: int = 0) -> int:
    """Image offset of the third entry (the first after '.' and '..') of a directory block."""
    return b.dirents(b.blocks[path][block])[2 if block == 0 else 0][0]


def dot(b: BaseImage, path: str = "/dir") -> int:
    return b.dirents(b.blocks[path][0])[0][0]


def dotdot(b: BaseImage, path: str = "/dir") -> int:
    return b.dirents(b.blocks[path][0])[1][0]


dirent_case("de-rec-len-0", lambda p, b: p.put(third(b) + 4, "H", 0), DIRECTORY)
dirent_case("de-rec-len-8", lambda p, b: p.put(third(b) + 4, "H", 8), DIRECTORY)
dirent_case("de-rec-len-not-multiple-of-4", lambda p, b: p.put(third(b) + 4, "H", 42), DIRECTORY)
dirent_case("de-rec-len-crosses-block-end",
            lambda p, b: p.put(third(b) + 4, "H", b.bs - (third(b) % b.bs) + 4), DIRECTORY)
dirent_case("de-rec-len-0xfffc", lambda p, b: p.put(third(b) + 4, "H", 0xFFFC), DIRECTORY)
dirent_case("de-rec-len-shorter-than-name", lambda p, b: p.put(third(b) + 4, "H", 12), DIRECTORY)
dirent_case("de-rec-len-0-in-block-2", lambda p, b: p.put(third(b, block=2) + 4, "H", 0), DIRECTORY)
dirent_case("de-last-entry-short-of-block-end",
            lambda p, b: p.put(b.dirents(b.blocks["/dir"][0])[-1][0] + 4, "H",
                               b.dirents(b.blocks["/dir"][0])[-1][2] - 4), DIRECTORY)
dirent_case("de-name-len-0", lambda p, b: p.put(third(b) + 6, "B", 0), DIRECTORY)
dirent_case("de-name-len-255", lambda p, b: p.put(third(b) + 6, "B", 255), DIRECTORY)
dirent_case("de-inode-beyond-count",
            lambda p, b: p.put(third(b), "I", b.sb["inodes_count"] + 1), DIRECTORY)
dirent_case("de-inode-ffffffff", lambda p, b: p.put(third(b), "I", 0xFFFFFFFF), DIRECTORY)
dirent_case("de-dot-unused", lambda p, b: p.put(dot(b), "I", 0), DIRECTORY)
dirent_case("de-dot-renamed", lambda p, b: p.put(dot(b) + 8, "B", ord("x")), DIRECTORY)
dirent_case("de-dot-points-to-root", lambda p, b: p.put(dot(b), "I", 2), DIRECTORY)
dirent_case("de-dot-on-root-points-elsewhere", lambda p, b: p.put(dot(b, "/"), "I", 11), DIRECTORY,
            intact=())
dirent_case("de-dotdot-unused", lambda p, b: p.put(dotdot(b), "I", 0), DIRECTORY)
dirent_case("de-dotdot-renamed", lambda p, b: p.put_bytes(dotdot(b) + 8, b"xx"), DIRECTORY)
dirent_case("de-dotdot-beyond-count", lambda p, b: p.put(dotdot(b), "I", b.sb["inodes_count"] + 1),
            DIRECTORY)
dirent_case("de-entries-swapped-dot-second",
            lambda p, b: (p.put_bytes(dot(b) + 8, b"."), p.put(dot(b) + 6, "B", 2),
                          p.put_bytes(dot(b) + 8, b".."), p.put(dotdot(b) + 6, "B", 1),
                          p.put_bytes(dotdot(b) + 8, b".\0")), DIRECTORY)
# '..' naming something that is not a directory, or nothing: "/dir/.." must not resolve to it
dirent_case("de-dotdot-is-a-file", lambda p, b: p.put(dotdot(b), "I", b.ino["/small"]), ANY)
dirent_case("de-dotdot-is-unused-inode", lambda p, b: p.put(dotdot(b), "I", b.unused_inode()), ANY)
dirent_case("de-root-dotdot-not-root", lambda p, b: p.put(dotdot(b, "/"), "I", b.ino["/dir"]), ANY,
            intact=())
dirent_case("de-name-with-slash", lambda p, b: p.put_bytes(third(b) + 8 + 3, b"/"), DIRECTORY)
dirent_case("de-name-with-nul", lambda p, b: p.put_bytes(third(b) + 8 + 3, b"\0"), DIRECTORY)
dirent_case("de-name-is-dot", lambda p, b: (p.put(third(b) + 6, "B", 1), p.put_bytes(third(b) + 8, b".")),
            DIRECTORY)
dirent_case("de-name-is-dotdot", lambda p, b: (p.put(third(b) + 6, "B", 2), p.put_bytes(third(b) + 8, b"..")),
            DIRECTORY)
dirent_case("de-points-to-unused-inode", lambda p, b: p.put(third(b), "I", b.unused_inode()), ("deleted",))
dirent_case("de-points-to-reserved-inode-5", lambda p, b: p.put(third(b), "I", 5), ("deleted",))
simple("ino-deleted-links-0-dtime-set",
       lambda p: (p.inode("/small", "links", 0), p.inode("/small", "dtime", 1700000000)), ("deleted",),
       intact=FILES_OK)

# symlinks (ext2-spec section 6, fast symlinks) -------------------------------------------------
simple("sl-fast-size-0", lambda p: p.inode("/fast", "size", 0), SYMLINK, intact=FILES_OK)
inode_case("sl-fast-size-100-no-blocks", "/fast", lambda p: p.inode("/fast", "size", 100))
inode_case("sl-fast-size-60-no-blocks", "/fast", lambda p: p.inode("/fast", "size", 60))
inode_case("sl-fast-with-i-blocks", "/fast", lambda p: p.inode("/fast", "blocks", p.base.bs // 512))
simple("sl-fast-target-nul", lambda p: p.put(p.base.inode_off["/fast"] + 0x28 + 1, "B", 0), SYMLINK,
       intact=FILES_OK)
simple("sl-slow-size-0", lambda p: p.inode("/slow", "size", 0), SYMLINK, intact=FILES_OK)
simple("sl-slow-size-block-size", lambda p: p.inode("/slow", "size", p.base.bs), SYMLINK, intact=FILES_OK)
simple("sl-slow-size-huge", lambda p: p.inode("/slow", "size", 0xFFFFFFFF), SYMLINK, intact=FILES_OK)
simple("sl-slow-hole", lambda p: p.iblock("/slow", 0, 0), SYMLINK, intact=FILES_OK)
simple("sl-slow-target-nul", lambda p: p.put(p.base.blocks["/slow"][0] * p.base.bs + 5, "B", 0), SYMLINK,
       intact=FILES_OK)


# xattrs (ext2-spec section 9) ------------------------------------------------------------------
def xblock(b: BaseImage) -> int:
    """Image offset of /xf's xattr block."""
    return b.inode_field("/xf", "file_acl") * b.bs


def xentries(b: BaseImage) -> list:
    off = xblock(b)
    return b.xattr_entries(off + 32, off + b.bs)


def in_inode(b: BaseImage, path: str) -> list:
    start = b.inode_xattr_start(path)
    return b.xattr_entries(start + 4, b.inode_off[path] + b.isize)


def acl_value(b: BaseImage) -> int:
    """Image offset of /aclf's ACL value (in-inode: offsets count from the first entry)."""
    (entry,) = in_inode(b, "/aclf")
    return b.inode_xattr_start("/aclf") + 4 + entry[3]


def xattr_case(name: str, damage: Callable[[Patch, BaseImage], object],
               expect: tuple[str, ...] | None = XATTR) -> None:
    def fn(p: Patch) -> tuple[str, ...] | None:
        damage(p, p.base)
        return expect
    CASES.append(Case(name, fn, BLOCK_SIZES, FILES_OK))


def crafted_block_name_past_end(p: Patch, b: BaseImage) -> None:
    """An xattr block packed with 255-byte names and no terminator: the last name runs off the block."""
    off = xblock(b)
    block = bytearray(b.bs)
    struct.pack_into("<III", block, 0, XATTR_MAGIC, 1, 1)
    pos = 32
    while pos + 16 <= b.bs:
        struct.pack_into("<BBHIII", block, pos, 255, 1, 0, 0, 0, 0)
        block[pos + 16:pos + 16 + 255] = b"n" * min(255, max(0, b.bs - pos - 16))
        pos += (16 + 255 + 3) & ~3
    p.put_bytes(off, bytes(block))


xattr_case("xb-bad-magic", lambda p, b: p.put(xblock(b), "I", 0xDEADBEEF))
xattr_case("xb-magic-zero", lambda p, b: p.put(xblock(b), "I", 0))
xattr_case("xb-h-blocks-2", lambda p, b: p.put(xblock(b) + 8, "I", 2))
xattr_case("xb-h-blocks-0", lambda p, b: p.put(xblock(b) + 8, "I", 0))
xattr_case("xb-value-offs-past-block", lambda p, b: p.put(xentries(b)[0][0] + 2, "H", b.bs - 10))
xattr_case("xb-value-offs-0xffff", lambda p, b: p.put(xentries(b)[0][0] + 2, "H", 0xFFFF))
xattr_case("xb-value-size-huge", lambda p, b: p.put(xentries(b)[0][0] + 8, "I", 0xFFFFFFFF))
xattr_case("xb-value-size-past-block", lambda p, b: p.put(xentries(b)[0][0] + 8, "I", b.bs))
xattr_case("xb-value-inum-set", lambda p, b: p.put(xentries(b)[1][0] + 4, "I", b.ino["/small"]))
xattr_case("xb-name-len-0", lambda p, b: p.put(xentries(b)[0][0], "B", 0))
xattr_case("xb-name-past-block-end", crafted_block_name_past_end)
xattr_case("xb-no-terminator", lambda p, b: p.put_bytes(xblock(b) + 32, b"\x01" * (b.bs - 32)))
xattr_case("xi-name-past-inode-end", lambda p, b: p.put(in_inode(b, "/xf")[0][0], "B", 200))
xattr_case("xi-value-offs-past-inode", lambda p, b: p.put(in_inode(b, "/xf")[0][0] + 2, "H", 200))
xattr_case("xi-value-size-huge", lambda p, b: p.put(in_inode(b, "/xf")[0][0] + 8, "I", 0xFFFFFFF0))
xattr_case("xi-value-inum-set", lambda p, b: p.put(in_inode(b, "/xf")[0][0] + 4, "I", 12))
xattr_case("xi-no-terminator",
           lambda p, b: p.put_bytes(in_inode(b, "/xf")[0][0] + 20,
                                    b"\x10" * (b.inode_off["/xf"] + b.isize - in_inode(b, "/xf")[0][0] - 20)))
xattr_case("xi-magic-destroyed", lambda p, b: p.put(b.inode_xattr_start("/xf"), "I", 0x12345678), None)
xattr_case("acl-bad-version", lambda p, b: p.put(acl_value(b), "I", 7))
xattr_case("acl-truncated-entry", lambda p, b: p.put(in_inode(b, "/aclf")[0][0] + 8, "I", 30))
xattr_case("acl-empty-value", lambda p, b: p.put(in_inode(b, "/aclf")[0][0] + 8, "I", 2))


# -- the catalogue, run -------------------------------------------------------------------------
PARAMS = [pytest.param(c, bs, id=f"{bs // 1024}k-{c.name}") for c in CASES for bs in c.bs]


def damaged(images: Callable[[int], BaseImage], c: Case, bs: int, path: str) -> tuple[str, tuple | None]:
    p = Patch(images(bs))
    expect = c.damage(p)
    assert p.buf != bytearray(p.base.data) or p.size is not None, f"{c.name}: the damage changed nothing"
    return p.write(path), expect


@XIP
@pytest.mark.parametrize(("c", "bs"), PARAMS)
def test_damage(images: Callable[[int], BaseImage], scratch: str, c: Case, bs: int, xip: bool) -> None:
    path, expect = damaged(images, c, bs, scratch)
    out = exercise(path, xip)
    if expect is not None:
        out.assert_corrupt(*expect)
    if c.intact:
        base = images(bs)
        assert out.opened, f"open failed: {out.messages()}"
        with xipfs.open(path, xip=xip) as fs:
            for f in c.intact:
                assert fs.read_bytes(f) == base.contents[f], f"{f} no longer reads back"


#: One case per kind of structure, also run on an anonymous MemoryDevice passed to xipfs.open.
DEVICE_CASES = ("sb-magic-bad", "sb-blocks-count-double", "gd0-inode-table-past-device",
                "ino-extra-isize-odd", "dir-hole-block-1", "ptr-direct-inode-table", "ptr-ind-out-of-range",
                "de-rec-len-0", "de-points-to-unused-inode", "sl-slow-size-block-size", "xb-bad-magic",
                "xi-value-offs-past-inode", "ptr-dind-every-entry-same-ind")


@pytest.mark.parametrize(("c", "bs"), [p for p in PARAMS if p.values[0].name in DEVICE_CASES])
def test_damage_on_memory_device(images: Callable[[int], BaseImage], c: Case, bs: int) -> None:
    """The same damage, the image handed over as a :class:`xipfs.MemoryDevice` object."""
    p = Patch(images(bs))
    expect = c.damage(p)
    data = p.buf if p.size is None else p.buf[:p.size]
    device = xipfs.MemoryDevice.anonymous(len(data))
    try:
        device.write(data, 0)
        out = exercise(device, None)
    finally:
        device.close()
    if expect is not None:
        out.assert_corrupt(*expect)


# -- the pristine images ------------------------------------------------------------------------
@XIP
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_pristine_image(images: Callable[[int], BaseImage], bs: int, xip: bool) -> None:
    """The harness itself: an undamaged image gives no error and reads back exactly."""
    base = images(bs)
    out = exercise(base.path, xip)
    out.assert_clean()
    assert out.files_read > 3 * bs // 40
    assert {err.errno for _, err in out.errors} <= {errno.ENODATA, errno.ENXIO, errno.ELOOP}
    with xipfs.open(base.path, xip=xip) as fs:
        for path, data in base.contents.items():
            assert fs.read_bytes(path) == data, path
        for path, target in base.targets.items():
            assert fs.readlink(path) == target.decode()
        assert fs.read_bytes("/fast") == fs.read_bytes("/slow") == base.contents["/big"]
        for name, value in XF_ATTRS.items():
            assert fs.getxattr("/xf", name) == value
        acl = fs.getxattr("/aclf", "system.posix_acl_access")
        assert struct.unpack_from("<I", acl)[0] == 2 and len(acl) == 4 + 5 * 8
        assert len(fs.listdir("/dir")) == 3 * bs // 40 + 1


# -- not corruption: unsupported features -------------------------------------------------------
@XIP
@pytest.mark.parametrize("bits", [0x1, 0x8, 0x1000, 0x80000],
                         ids=["compression", "journal_dev", "dirdata", "bit19"])
def test_unsupported_incompat_feature(images: Callable[[int], BaseImage], scratch: str, bits: int,
                                      xip: bool) -> None:
    p = Patch(images(1024))
    p.sb("feature_incompat", p.sb_get("feature_incompat") | bits)
    p.write(scratch)
    with pytest.raises(UnsupportedFeatureError) as info:
        xipfs.open(scratch, xip=xip)
    assert not isinstance(info.value, CorruptImageError)
    assert info.value.errno == errno.EOPNOTSUPP


@XIP
def test_64bit_without_a_descriptor_size(images: Callable[[int], BaseImage], scratch: str, xip: bool) -> None:
    """64bit set on an image whose s_desc_size is 0: the descriptors cannot be found."""
    p = Patch(images(1024))
    p.sb("feature_incompat", p.sb_get("feature_incompat") | 0x80)
    p.write(scratch)
    with pytest.raises(CorruptImageError) as info:
        xipfs.open(scratch, xip=xip)
    assert "descriptor size" in str(info.value)


@XIP
def test_unknown_ro_compat_feature_still_reads(images: Callable[[int], BaseImage], scratch: str,
                                               xip: bool) -> None:
    p = Patch(images(1024))
    p.sb("feature_ro_compat", p.sb_get("feature_ro_compat") | 0x40000000)
    out = exercise(p.write(scratch), xip)
    out.assert_clean()


# -- empty image --------------------------------------------------------------------------------
@XIP
def test_empty_image(scratch: str, xip: bool) -> None:
    """A 0-byte image is corrupt (too small for a superblock), on either device."""
    open(scratch, "wb").close()
    with pytest.raises(CorruptImageError) as info:
        xipfs.open(scratch, xip=xip)
    check_corrupt_error(info.value)
    assert "superblock" in str(info.value)


# -- a huge sparse file: no hang, no allocation ---------------------------------------------------
HUGE = 1 << 40


def huge_sparse(images: Callable[[int], BaseImage], bs: int, path: str) -> BaseImage:
    """/empty (no blocks) given i_size 2^40."""
    p = Patch(images(bs))
    p.inode("/empty", "size", 0)
    p.inode("/empty", "size_high", HUGE >> 32)
    p.write(path)
    return p.base


@XIP
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_huge_sparse_file_head(images: Callable[[int], BaseImage], scratch: str, bs: int, xip: bool) -> None:
    """i_size 2^40 with no blocks: stat and walk work, a small range reads as zeros, cheaply."""
    huge_sparse(images, bs, scratch)
    start = time.monotonic()
    with time_limit(10, "huge sparse file"), xipfs.open(scratch, xip=xip) as fs:
        tracemalloc.start()
        try:
            assert fs.stat("/empty").st_size == HUGE
            assert fs.stat("/empty").st_blocks == 0
            assert sum(1 for _ in fs.walk("/")) == 5
            with fs.open("/empty", "rb", buffering=0) as f:
                assert f.pread(1 << 20, 0) == bytes(1 << 20)
                assert f.pread(4096, 12 * bs) == bytes(4096)
                buf = bytearray(b"\xa5" * 65536)
                f.seek(1 << 20)
                assert f.readinto(buf) == 65536 and buf == bytes(65536)
                assert f.seek(0, os.SEEK_END) == HUGE
                assert f.read(10) == b""
            with fs.open("/empty", "rb") as f:
                assert f.read(100) == bytes(100)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert peak < 8 << 20, f"reading 1 MiB of a 1 TiB sparse file peaked at {peak} bytes"
    assert time.monotonic() - start < 10


def addressable_bytes(bs: int) -> int:
    """Bytes the 12 direct + IND + DIND + TIND pointers can map (Linux ext2_max_size, roughly)."""
    apb = bs // 4
    return (12 + apb + apb ** 2 + apb ** 3) * bs


@XIP
@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("where", ["tail", "middle", "past-16g", "straddling-map-end"])
def test_huge_sparse_file_far_ranges(images: Callable[[int], BaseImage], scratch: str, bs: int, xip: bool,
                                     where: str) -> None:
    """Far into a 2^40 i_size with no blocks: ``pread`` and ``readinto`` must agree, and what they
    return must be zeros.

    At 1 KiB blocks the block map addresses 12 + 256 + 256^2 + 256^3 blocks (about 16 GiB), less
    than 2^40. Three answers are acceptable past that point: zeros (a hole), CorruptImageError
    (e2fsck calls such an i_size corrupt), or end of file at the addressable limit (what Linux
    does at s_maxbytes). Not acceptable: ``readinto`` returning ``n`` without writing the
    buffer (the caller then sees its own stale bytes as file data), or the two calls disagreeing.
    """
    huge_sparse(images, bs, scratch)
    limit = addressable_bytes(bs)
    off = {"tail": HUGE - 4096, "middle": HUGE // 2, "past-16g": 17 << 30,
           "straddling-map-end": min(limit, HUGE) - 2048}[where]
    with time_limit(10, "huge sparse file"), xipfs.open(scratch, xip=xip) as fs, \
            fs.open("/empty", "rb", buffering=0) as f:
        try:
            data = f.pread(4096, off)
        except CorruptImageError as err:
            check_corrupt_error(err)
            data = None
        buf = bytearray(b"\xa5" * 4096)
        f.seek(off)
        try:
            n = f.readinto(buf)
        except CorruptImageError as err:
            check_corrupt_error(err)
            n = None
    assert (data is None) == (n is None), f"pread gave {data!r:.40}, readinto gave {n}"
    if data is None:
        return
    to_eof = min(4096, HUGE - off)
    assert len(data) in (to_eof, max(0, min(to_eof, limit - off))), f"pread(4096, {off}): {len(data)} bytes"
    assert data == bytes(len(data))
    assert n == len(data), f"readinto at {off} returned {n}, pread returned {len(data)} bytes"
    assert buf[:n] == bytes(n), f"readinto at {off} returned {n} but left stale bytes in the buffer"


# -- a double-indirect chain where every entry is the same indirect block --------------------------
@XIP
def test_dind_every_entry_same_ind_whole_read(images: Callable[[int], BaseImage], scratch: str,
                                              xip: bool) -> None:
    """64 MiB mapped through one IND block 256 times: read all of it, in bounded time and memory."""
    base = images(1024)
    p = Patch(base)
    dind = base.iblock("/big")[13]
    ind0 = base.ind_entries(dind)[0]
    p.fill_ind(dind, ind0)
    size = (12 + 256 + 256 * 256) * 1024
    p.inode("/big", "size", size)
    p.write(scratch)
    # what file blocks 268.. hold: IND block ind0 maps 32 data blocks, then holes
    seg = bytearray(256 * 1024)
    for i, blk in enumerate(base.ind_entries(ind0)):
        if blk:
            seg[i * 1024:(i + 1) * 1024] = base.data[blk * 1024:(blk + 1) * 1024]
    head = base.contents["/big"][:268 * 1024]
    expected = memoryview(head + bytes(seg) * 256)
    assert len(expected) == size
    with time_limit(20, "reading a 64 MiB self-repeating DIND"), xipfs.open(scratch, xip=xip) as fs:
        tracemalloc.start()
        try:
            buf = bytearray(1 << 20)
            done = 0
            with fs.open("/big", "rb", buffering=0) as f:
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    assert buf[:n] == expected[done:done + n], f"wrong data at {done}"
                    done += n
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert done == size
    assert peak < 4 << 20, f"peak {peak} bytes beyond the 1 MiB buffer"


# -- directory cycles ---------------------------------------------------------------------------
CYCLES = {
    "to-root": lambda b: 2,
    "to-grandparent": lambda b: b.ino["/dir"],
    "to-parent": lambda b: b.ino["/dir/sub"],
    "to-itself": lambda b: b.ino["/dir/sub/deep"],
}


@XIP
@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("kind", list(CYCLES))
def test_directory_cycle(images: Callable[[int], BaseImage], scratch: str, kind: str, bs: int,
                         xip: bool) -> None:
    """A directory entry naming an ancestor: walking must end (or raise CorruptImageError).

    ``fs.walk`` goes by name, so "/dir/sub/deep" naming the root makes "/dir/sub/deep/dir/sub/deep/..."
    an endless chain unless xipfs notices the cycle. For "to-itself", a subdirectory of
    /dir/sub/deep is itself.
    """
    base = images(bs)
    p = Patch(base)
    if kind == "to-itself":
        # /dir/sub/deep/leaf becomes a directory entry naming /dir/sub/deep
        off = base.dirent("/dir/sub/deep", b"leaf")[0]
        p.put(off, "I", base.ino["/dir/sub/deep"])
        p.put(off + 7, "B", 2)
    else:
        entry = base.dirent("/dir/sub", b"deep")
        p.put(entry[0], "I", CYCLES[kind](base))
    p.write(scratch)
    out = exercise(scratch, xip, seconds=30)
    for _, err in out.corrupt:
        check_corrupt_error(err)


@XIP
def test_directory_hard_link_is_finite(images: Callable[[int], BaseImage], scratch: str, xip: bool) -> None:
    """A second name for a directory (not a cycle) is walked twice at most: tolerated, finite."""
    base = images(1024)
    p = Patch(base)
    off = base.dirent("/dir", b"entry_000_" + b"x" * 22)[0]
    p.put(off, "I", base.ino["/dir/sub/deep"])
    p.put(off + 7, "B", 2)
    out = exercise(p.write(scratch), xip)
    assert out.opened


# -- symlink loops ------------------------------------------------------------------------------
@XIP
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_symlink_loops(images: Callable[[int], BaseImage], bs: int, xip: bool) -> None:
    """loop1 <-> loop2 and self -> self: ELOOP (an OSError, not CorruptImageError); lstat works."""
    base = images(bs)
    with time_limit(10, "symlink loops"), xipfs.open(base.path, xip=xip) as fs:
        for name in ("/loop1", "/loop2", "/self", "/loop1/x", "/dir/../self/"):
            for op in (fs.stat, fs.read_bytes, fs.listdir, fs.open, fs.listxattr):
                with pytest.raises(OSError) as info:
                    op(name)
                assert not isinstance(info.value, CorruptImageError), (op, name)
                assert info.value.errno == errno.ELOOP, (op, name, info.value)
            assert not fs.exists(name) and not fs.isdir(name) and not fs.isfile(name)
        for name in ("/loop1", "/loop2", "/self"):
            assert stat.S_ISLNK(fs.lstat(name).st_mode)
            assert fs.readlink(name) == base.targets[name].decode()
            assert fs.islink(name) and fs.lexists(name)


# -- a live entry naming a deleted inode, seen through scandir ------------------------------------
@XIP
def test_direntry_stat_of_deleted_inode(images: Callable[[int], BaseImage], scratch: str, xip: bool) -> None:
    """scandir's DirEntry.stat(follow_symlinks=False) must not report a deleted inode as live.

    ``fs.lstat("/small")`` raises CorruptImageError ("points to deleted inode"); the same inode
    reached through ``scandir("/")`` must fail the same way rather than return its stat.
    """
    base = images(1024)
    p = Patch(base)
    p.inode("/small", "links", 0)
    p.inode("/small", "dtime", 1700000000)
    p.write(scratch)
    with xipfs.open(scratch, xip=xip) as fs:
        with pytest.raises(CorruptImageError):
            fs.lstat("/small")
        (entry,) = [e for e in fs.scandir("/") if e.name == "small"]
        with pytest.raises(CorruptImageError) as info:
            entry.stat(follow_symlinks=False)
        check_corrupt_error(info.value)


# -- fuzz ---------------------------------------------------------------------------------------
def metadata_regions(b: BaseImage) -> dict[str, list[tuple[int, int]]]:
    """Byte ranges of the image's metadata, by kind."""
    bs = b.bs
    big = b.iblock("/big")
    ind_blocks = [big[12]] + ([big[13], b.ind_entries(big[13])[0]] if bs == 1024 else [])
    dirs = ("/", "/lost+found", "/dir", "/dir/sub", "/dir/sub/deep")
    return {
        "superblock": [(1024, 1024 + 0x108)],
        "gdt": [(b.gdt_off, b.gdt_off + 32 * len(b.groups))],
        "inode": [(off, off + b.isize) for off in b.inode_off.values()],
        "dir": [(blk * bs, blk * bs + bs) for d in dirs for blk in b.blocks[d][:3]],
        "indirect": [(blk * bs, blk * bs + 64) for blk in ind_blocks],
        "xattr": [(xblock(b), xblock(b) + bs)],
        "symlink": [(b.blocks["/slow"][0] * bs, b.blocks["/slow"][0] * bs + 80)],
    }


FUZZ_BATCHES = [(1024, True, 1), (1024, False, 2), (4096, True, 3), (4096, False, 4), (1024, False, 5),
                (4096, True, 6)]
FUZZ_VARIANTS = 50


FUZZ_IDS = [f"{bs // 1024}k-{'xip' if x else 'pagecache'}-seed{s}" for bs, x, s in FUZZ_BATCHES]


@pytest.mark.parametrize(("bs", "xip", "seed"), FUZZ_BATCHES, ids=FUZZ_IDS)
def test_fuzz_metadata(images: Callable[[int], BaseImage], scratch: str, bs: int, xip: bool,
                       seed: int) -> None:
    """Random bytes in metadata blocks: only CorruptImageError, UnsupportedFeatureError and the
    ordinary os errors may come out, every CorruptImageError names its structure, and no variant
    runs longer than 5 s."""
    base = images(bs)
    regions = metadata_regions(base)
    kinds = sorted(regions)
    rnd = random.Random(seed)
    with open(scratch, "wb") as f:
        f.write(base.data)
    failures: list[str] = []
    corrupt = 0
    fd = os.open(scratch, os.O_RDWR)
    try:
        for i in range(FUZZ_VARIANTS):
            kind = kinds[i % len(kinds)] if i < len(kinds) else rnd.choice(kinds)
            a, b = rnd.choice(regions[kind])
            flips = []
            for _ in range(rnd.choice((1, 1, 2, 3, 6))):
                off = rnd.randrange(a, b)
                old = base.data[off]
                new = rnd.choice((old ^ (1 << rnd.randrange(8)), rnd.randrange(256), 0, 0xFF))
                flips.append((off, new))
            for off, new in flips:
                os.pwrite(fd, bytes([new]), off)
            what = f"variant {i} ({kind}: " + ", ".join(f"byte {o}={v:#04x}" for o, v in flips) + ")"
            try:
                out = exercise(scratch, xip, seconds=5)
                corrupt += bool(out.corrupt)
            except (Hang, AssertionError, Exception) as err:  # noqa: B014 - report every kind
                failures.append(f"{what}: {type(err).__name__}: {err}")
            finally:
                for off, _ in flips:
                    os.pwrite(fd, base.data[off:off + 1], off)
            if len(failures) >= 5:
                break
    finally:
        os.close(fd)
    assert not failures, "\n".join(failures)
    assert corrupt >= FUZZ_VARIANTS // 5, f"only {corrupt} of {FUZZ_VARIANTS} variants were detected"
