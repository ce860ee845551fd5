"""The lean directory indexer agrees with the careful one, and with debugfs, on real directories.

``dir.index_directory`` indexes a directory as Linux and mke2fs write it with a loop that checks
names in bulk, and hands anything unusual (a non-ASCII or duplicate name, a 64 KiB block, damage)
to the entry-by-entry parser. Both must give the same names, inode numbers and file types, in the
same order, for directories made by mke2fs and changed by debugfs (deleted entries leave gaps).
"""

from __future__ import annotations

import os

import pytest
from e2fs import assert_fsck_clean, debugfs, debugfs_ls, mkfs

import xipfs
from xipfs.extfs.dir import _index_careful, _index_fast, dir_blocks, index_directory

NAMES = ["a", "bb", "ccc", "dddd", "e" * 255, "x.py", "été", "日本語の名前", "tab\tname", "back\\slash",
         "sp ace", "-dash", "%pct", "a" * 100]


def _tree(root: str) -> None:
    os.makedirs(f"{root}/many")
    for i in range(600):
        open(f"{root}/many/f{i:04d}{'x' * (i % 40)}", "wb").close()
    os.makedirs(f"{root}/odd")
    for n in NAMES:
        open(f"{root}/odd/{n}", "wb").close()
    os.makedirs(f"{root}/big")                       # long names: several blocks even of 64 KiB
    for i in range(1500):
        open(f"{root}/big/{'b' * 90}{i:04d}", "wb").close()
    os.symlink("odd", f"{root}/link")


def _both(fs: xipfs.Filesystem, path: str) -> tuple[object, object]:
    vol = fs.volume
    node = fs._inode(path)
    fast = index_directory(dir_blocks(vol, node), vol.bs, vol.inodes_count, vol.filetype, node.ino)
    careful = _index_careful(dir_blocks(vol, node), vol.bs, vol.inodes_count, vol.filetype, node.ino)
    return fast, careful


@pytest.mark.parametrize("fstype,bs", [("ext2", 1024), ("ext2", 4096), ("ext4", 4096), ("ext4", 65536)])
def test_lean_and_careful_indexes_agree(tmp_path, fstype: str, bs: int) -> None:
    src = str(tmp_path / "src")
    _tree(src)
    img = str(tmp_path / "img")
    mkfs(img, "64M", bs=bs, fstype=fstype, src=src, extra=("-N", "4096"))
    # gaps: deleted entries in the middle of blocks, and a block's first entry
    debugfs(img, *[f"rm /many/f{i:04d}{'x' * (i % 40)}" for i in range(0, 600, 7)], "rm /odd/bb",
            write=True)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        for d in ("/", "/many", "/odd", "/big"):
            fast, careful = _both(fs, d)
            assert list(fast.entries.items()) == list(careful.entries.items()), d
            assert fast.parent == careful.parent
            listed = {os.fsdecode(k): v for k, v in debugfs_ls(img, d).items() if k not in (b".", b"..")}
            assert {k: v[0] for k, v in fast.entries.items()} == {k: v[0] for k, v in listed.items()}
        assert sorted(fs.listdir("/odd")) == sorted(n for n in NAMES if n != "bb")
        # which parser took each: the lean one the usual directories, the careful one the rest
        vol = fs.volume
        for d, lean in (("/many", bs != 65536), ("/odd", False)):
            node = fs._inode(d)
            assert (_index_fast(dir_blocks(vol, node), [], vol.inodes_count, node.ino) is not None) == lean
