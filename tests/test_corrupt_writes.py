"""Damaged images met by the write path, and things that are not images at all.

A change that would follow a damaged pointer (free a block outside the data area, or one of the
filesystem's own metadata blocks; drop a link an inode does not have) must stop with
:class:`xipfs.CorruptImageError` before it changes anything: e2fsck finds exactly the damage it
found before. Features a change needs are turned on first (ext_attr for an xattr block). What
cannot hold an image (a FIFO, a directory, a character device) is refused at once, by name.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from e2fs import (
    SHM,
    assert_fsck_clean,
    debugfs_r,
    dumpe2fs,
    dumpe2fs_header,
    e2fsck,
    fsck,
    fsck_problems,
    mkfs,
)

import xipfs
from xipfs import CorruptImageError

pytestmark = pytest.mark.skipif(not shutil.which("debugfs"), reason="needs e2fsprogs (debugfs)")


@pytest.fixture
def img(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A 4 MiB image with 1 KiB blocks holding /f (3 blocks) and /g, made by mke2fs and xipfs."""
    d = os.path.join(SHM, f"xipfs-cw-{os.getpid()}-{tmp_path_factory.mktemp('cw').name}")
    os.makedirs(d)
    path = mkfs(os.path.join(d, "img"), "4M", bs=1024)
    with xipfs.open(path, "r+") as fs:
        fs.write_bytes("/f", b"x" * 3000)
        fs.write_bytes("/g", b"y" * 100)
    yield path
    shutil.rmtree(d, ignore_errors=True)


def set_inode_field(img: str, path: str, field: str, value: int) -> None:
    debugfs_r(img, f"sif {path} {field} {value}", write=True)


def problems(img: str) -> list[str]:
    return fsck_problems(fsck(img, "-fn")[1])


def inode_table_block(img: str) -> int:
    out = dumpe2fs(img)
    return int(out.split("Inode table at ")[1].split("-")[0])


CHANGES: dict[str, Callable[[xipfs.Filesystem], object]] = {
    "truncate to 0": lambda fs: fs.truncate("/f", 0),
    "truncate to 1 block": lambda fs: fs.truncate("/f", 1024),
    "unlink": lambda fs: fs.unlink("/f"),
    "rename over it": lambda fs: fs.rename("/g", "/f"),
    "replace its content": lambda fs: fs.write_bytes("/f", b"new"),
}


@pytest.mark.parametrize("change", list(CHANGES))
@pytest.mark.parametrize("pointer", ["past the end", "the superblock", "the inode table"])
def test_damaged_pointer_changes_nothing(img: str, pointer: str, change: str) -> None:
    target = {"past the end": 5000, "the superblock": 1, "the inode table": inode_table_block(img)}[pointer]
    set_inode_field(img, "/f", "block[1]", target)
    before = problems(img)
    assert before                                     # e2fsck sees the damage
    with xipfs.open(img, "r+") as fs:
        with pytest.raises(CorruptImageError, match=f"block {target}") as info:
            CHANGES[change](fs)
        assert "inode" in str(info.value)
        assert fs.read_bytes("/g") == b"y" * 100      # the rest still works
    assert problems(img) == before


def test_unlink_of_a_named_inode_with_no_links(img: str) -> None:
    """e2fsck counts such an inode free (its blocks may be another file's): refuse, change nothing."""
    set_inode_field(img, "/f", "links_count", 0)
    before = problems(img)
    with xipfs.open(img, "r+") as fs:
        with pytest.raises(CorruptImageError, match="link count 0"):
            fs.unlink("/f")
        with pytest.raises(CorruptImageError, match="link count 0"):
            fs.rename("/g", "/f")
    assert problems(img) == before


def test_create_keeps_the_reason_of_a_corrupt_image(img: str) -> None:
    """An allocation that meets a bitmap marking metadata free reports that, not a bare errno."""
    debugfs_r(img, f"freeb {inode_table_block(img)}", write=True)
    with xipfs.open(img, "r+") as fs, pytest.raises(CorruptImageError, match="overlaps filesystem metadata"):
        for i in range(64):
            fs.write_bytes(f"/n{i}", b"z" * 100)


@pytest.mark.parametrize("options", [("-O", "^ext_attr"), ("-r", "0")], ids=["no ext_attr", "revision 0"])
def test_first_xattr_block_turns_ext_attr_on(tmp_path_factory: pytest.TempPathFactory,
                                             options: tuple[str, ...]) -> None:
    d = tmp_path_factory.mktemp("xa")
    path = os.path.join(SHM, f"xipfs-cw-xa-{os.getpid()}-{d.name}")
    try:
        mkfs(path, "4M", bs=1024, extra=options)
        with xipfs.open(path, "r+") as fs:
            fs.write_bytes("/f", b"x")
            fs.setxattr("/f", "user.a", b"v")
        assert_fsck_clean(path)
        header = dumpe2fs_header(path)
        assert "ext_attr" in header["Filesystem features"]
        assert header["Filesystem revision #"].startswith("1")
        with xipfs.open(path) as fs:
            assert fs.getxattr("/f", "user.a") == b"v"
    finally:
        os.unlink(path)


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_what_cannot_hold_an_image(tmp_path: pytest.TempPathFactory, mode: str) -> None:
    """A FIFO (opening it would wait for a writer), a directory, a character device: refused
    at once with the path; a 0-byte pseudo-file: too small, by name."""
    fifo = os.path.join(str(tmp_path), "fifo")
    os.mkfifo(fifo)
    for path, code in ((fifo, errno.ENODEV), (str(tmp_path), errno.EISDIR), ("/dev/null", errno.ENODEV)):
        with pytest.raises(OSError) as info:
            xipfs.open(path, mode)
        assert info.value.errno == code and info.value.filename == path
    with pytest.raises(CorruptImageError, match="/proc/self/status"):
        xipfs.open("/proc/self/status", mode)


def test_cli_refuses_a_fifo_without_waiting(tmp_path: pytest.TempPathFactory) -> None:
    fifo = os.path.join(str(tmp_path), "fifo")
    os.mkfifo(fifo)
    exe = [sys.executable, "-m", "xipfs"]
    for argv in (["ls", f"{fifo}:/"], ["check", fifo], ["info", fifo]):
        proc = subprocess.run(exe + argv, capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert "not an image" in proc.stderr and "Traceback" not in proc.stderr


def test_pointer_past_eof_into_metadata_is_never_freed(img: str) -> None:
    """A pointer beyond i_size (which no read follows) met while freeing: the block is not freed;
    at worst the file's other blocks leak, which ``e2fsck -p`` repairs on its own."""
    set_inode_field(img, "/g", "block[1]", inode_table_block(img))
    with xipfs.open(img, "r+") as fs, pytest.raises(CorruptImageError, match="block to free"):
        fs.unlink("/g")
    assert not any("+" in p for p in problems(img) if "bitmap differences" in p)
    assert e2fsck(img, "-fp")[0] in (0, 1)
