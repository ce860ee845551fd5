"""Writes keep ext4's metadata checksums (issue 15, in progress): the superblock and its
backups, the group descriptors with their bitmaps' sums, inodes, xattr blocks and directory
leaves (with their tails) are sealed as they are stored, and groups ext4 left uninitialised
(BLOCK_UNINIT, INODE_UNINIT, itable_unused) are made as Linux makes them before their first
use. Indexed directories and crash ordering under checksums are not done yet, so an image with
metadata_csum still opens read-only; these tests open one for writing by widening the writable
features for themselves, then ask e2fsck."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest
from e2fs import SHM, assert_fsck_clean, mkfs

import xipfs
from xipfs.extfs import layout as L


@pytest.fixture
def csum_image(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"hello\n")
    (src / "b").write_bytes(os.urandom(300_000))
    (src / "c").write_bytes(os.urandom(5000))
    img = os.path.join(SHM, f"xipfs-csum-{os.getpid()}.img")
    mkfs(img, "16M", src=str(src), extra=("-O", "metadata_csum"), bs=1024)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.RO_COMPAT_METADATA_CSUM)
    yield img
    os.unlink(img)


def test_metadata_csum_kept_by_every_write_but_directories(csum_image):
    with xipfs.open(csum_image, "r+") as fs:
        fs.chmod("/a", 0o600)
        fs.utime("/a", ns=(10**18, 10**18))
        with fs.open("/b", "r+b") as f:              # allocation: bitmaps, descriptors, inode
            f.seek(0, 2)
            f.write(b"Z" * 100_000)
        fs.truncate("/c", 100)                       # freeing
        fs.setxattr("/a", "user.k", b"v" * 10)       # an xattr block, then rewritten in place
        fs.setxattr("/b", "user.big", b"w" * 900)
        fs.removexattr("/a", "user.k")
    assert_fsck_clean(csum_image)
    with xipfs.open(csum_image) as fs:               # and every sum verifies on the read side
        assert fs.read_bytes("/b")[-100_000:] == b"Z" * 100_000
        assert fs.getxattr("/b", "user.big") == b"w" * 900


def test_directories_and_uninit_groups_under_metadata_csum(csum_image):
    """New, removed and renamed entries; directories spread over groups ext4 never used."""
    with xipfs.open(csum_image, "r+") as fs:
        fs.mkdir("/d")
        for i in range(300):
            fs.write_bytes(f"/d/f{i}", b"x" * i)
        for i in range(0, 300, 3):
            fs.unlink(f"/d/f{i}")
        fs.rename("/d/f1", "/d/g1")
        fs.rename("/d/f2", "/renamed-to-a-longer-name")
        fs.mkdir("/d/sub")
        fs.rename("/d/sub", "/sub2")
        fs.symlink("/d/f4", "/link")
        fs.rmdir("/sub2")
        for i in range(40):                          # the Orlov spread reaches unused groups
            fs.mkdir(f"/dir{i}")
            fs.write_bytes(f"/dir{i}/x", b"y" * 5000)
    assert_fsck_clean(csum_image)
    with xipfs.open(csum_image) as fs:
        assert len(fs.listdir("/d")) == 199
        assert fs.read_bytes("/dir39/x") == b"y" * 5000


def test_metadata_csum_images_open_for_writing_unless_switched_off(tmp_path):
    """metadata_csum images are written by default; XIPFS_EXT4_WRITE=0 opens them read-only."""
    img = mkfs(os.path.join(SHM, f"xipfs-csum-rw-{os.getpid()}.img"), "8M", extra=("-O", "metadata_csum"))
    try:
        with xipfs.open(img, "r+") as fs:
            fs.write_bytes("/x", b"checked")
        assert_fsck_clean(img)
        code = ("import sys, xipfs\ntry:\n xipfs.open(sys.argv[1], 'r+')\nexcept OSError as e:\n"
                " print(e.errno, e)")
        out = subprocess.run([sys.executable, "-c", code, img], capture_output=True, text=True, check=True,
                             env={**os.environ, "XIPFS_EXT4_WRITE": "0"}).stdout
        assert out.startswith(f"{errno.EROFS} ") and "metadata_csum" in out
    finally:
        os.unlink(img)
