"""A file's first read takes its one run straight off the inode (``bmap.whole_start``), without
building its block map: the answer must be the map's, for every inode of real images, and a
damaged inode must fail as the map fails."""

from __future__ import annotations

import os

import pytest
from e2fs import debugfs, mkfs

import xipfs
from xipfs.errors import CorruptImageError
from xipfs.extfs.bmap import whole_start

SIZES = [0, 1, 1000, 1024, 4096, 4097, 12 * 1024, 12 * 4096, 12 * 4096 + 1, 200_000]


def _tree(root: str) -> None:
    os.makedirs(f"{root}/d")
    for size in SIZES:
        with open(f"{root}/d/f{size}", "wb") as f:
            f.write(os.urandom(size))
    with open(f"{root}/d/sparse", "wb") as f:       # a hole first: no single run
        f.seek(1 << 20)
        f.write(b"tail")


@pytest.mark.parametrize("fstype,bs", [("ext2", 1024), ("ext2", 4096), ("ext4", 1024), ("ext4", 4096)])
def test_whole_start_is_the_maps_whole(tmp_path, fstype: str, bs: int) -> None:
    src = str(tmp_path / "src")
    _tree(src)
    img = mkfs(str(tmp_path / "img"), "32M", bs=bs, fstype=fstype, src=src)
    seen = 0
    with xipfs.open(img) as fs:
        for name in fs.listdir("/d"):
            node = fs._inode(f"/d/{name}")
            start = whole_start(node)
            assert start == node.map.whole, name
            seen += bool(start)
            with open(f"{src}/d/{name}", "rb") as f:
                assert fs.read_bytes(f"/d/{name}") == f.read()
    assert seen >= 6                       # the small files took the shortcut


@pytest.mark.parametrize("fstype", ["ext2", "ext4"])
def test_a_run_into_metadata_fails_as_the_map_does(tmp_path, fstype: str) -> None:
    src = str(tmp_path / "src")
    _tree(src)
    img = mkfs(str(tmp_path / "img"), "32M", bs=4096, fstype=fstype, src=src)
    if fstype == "ext2":
        debugfs(img, "sif /d/f4096 block[0] 1", write=True)              # the group descriptors
    else:
        debugfs(img, "sif /d/f4096 block[5] 1", write=True)              # the extent's start (low)
    with xipfs.open(img, verify=False) as fs:
        with pytest.raises(CorruptImageError, match="metadata|outside"):
            fs.read_bytes("/d/f4096")
        node = fs._inode("/d/f4096")
        node._map = None
        with pytest.raises(CorruptImageError, match="metadata|outside"):
            _ = node.map


@pytest.mark.parametrize("fstype", ["ext2", "ext4"])
def test_a_file_not_in_one_run_is_left_to_its_map(tmp_path, fstype: str) -> None:
    """Blocks out of a row (ext2), an extent shorter than the file (ext4): no single run, so
    no shortcut; the read takes the map's runs (a hole where the extent ends)."""
    src = str(tmp_path / "src")
    _tree(src)
    img = mkfs(str(tmp_path / "img"), "32M", bs=4096, fstype=fstype, src=src)
    path = f"/d/f{12 * 4096}"
    if fstype == "ext2":
        with xipfs.open(img) as fs:
            free = fs.block_runs("/d/f200000")[-1][2] + 100     # past the data: free, not metadata
        debugfs(img, f"sif {path} block[2] {free}", write=True)
    else:
        debugfs(img, f"sif {path} block[4] 1", write=True)       # ee_len 1 of the file's 12 blocks
    with xipfs.open(img, verify=False) as fs:
        node = fs._inode(path)
        assert whole_start(node) == 0 == node.map.whole
        data = fs.read_bytes(path)
        assert len(data) == 12 * 4096
        with open(f"{src}{path}", "rb") as f:
            want = f.read()
        assert data[:4096] == want[:4096] and (fstype == "ext2" or data[4096:] == bytes(11 * 4096))

