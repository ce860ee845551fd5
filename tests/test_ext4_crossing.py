"""Crossing with Linux on ext4 (issue 15): xipfs and a Linux read-write loop mount change the
same image in turns, on images with every default feature of mke2fs -t ext4 (journal,
orphan_file, metadata_csum, 64bit, flex_bg), made by xipfs and made by mke2fs. Each side
reads the other's changes exactly, and e2fsck -fn is clean after every turn."""

from __future__ import annotations

import hashlib
import os
import random

import pytest
from conftest import IS_ROOT, mounted
from e2fs import SHM, assert_fsck_clean, mkfs, run

import xipfs
from xipfs.extfs import layout as L

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="Linux's turns go through a loop mount, which needs root")


@pytest.fixture(autouse=True)
def _ext4_writes(monkeypatch):
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.EXT4_INCOMPAT_WRITABLE)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.EXT4_RO_COMPAT_WRITABLE)


def _xipfs_view(fs) -> dict[str, tuple]:
    out = {}
    for top, dirs, files in fs.walk("/"):
        for name in dirs + files:
            p = top.rstrip("/") + "/" + name
            if p == "/lost+found":
                continue
            st = fs.lstat(p)
            if fs.islink(p):
                body = fs.readlink(p).encode()
            elif name in files:
                body = fs.read_bytes(p)
            else:
                body = b""
            out[p] = (st.st_mode, st.st_size, st.st_nlink if name in files else 0,
                      st.st_mtime_ns, hashlib.sha256(body).hexdigest())
    return out


def _linux_view(root: str) -> dict[str, tuple]:
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(top, name)
            p = "/" + os.path.relpath(full, root)
            if p == "/lost+found":
                continue
            st = os.lstat(full)
            if os.path.islink(full):
                body = os.readlink(full).encode()
            elif name in files:
                with open(full, "rb") as f:
                    body = f.read()
            else:
                body = b""
            out[p] = (st.st_mode, st.st_size, st.st_nlink if name in files else 0,
                      st.st_mtime_ns, hashlib.sha256(body).hexdigest())
    return out


def _source_tree(root: str, rng: random.Random) -> None:
    """Something to copy in: nested directories, small and large files, links of both kinds."""
    for d in range(4):
        sub = os.path.join(root, f"d{d}", "inner")
        os.makedirs(sub)
        for i in range(40):
            with open(os.path.join(root, f"d{d}", f"f{i}"), "wb") as f:
                f.write(rng.randbytes(rng.choice((0, 10, 700, 4096, 20000))))
        with open(os.path.join(sub, "big"), "wb") as f:
            f.write(rng.randbytes(1_500_000 + d))
        os.symlink("../f1", os.path.join(sub, "rel"))
        os.link(os.path.join(root, f"d{d}", "f2"), os.path.join(sub, "hard"))


def _appends_in_turns(write, names: list[str], rounds: int, rng: random.Random) -> None:
    """Append to several files in turns (each extent tree grows beside the others)."""
    for _ in range(rounds):
        for name in names:
            write(name, rng.randbytes(rng.choice((100, 1024, 4096, 9000))))


@pytest.mark.parametrize("made_by", ["xipfs", "mke2fs"])
@pytest.mark.parametrize("bs", [1024, 4096])
def test_xipfs_and_linux_take_turns(made_by, bs, tmp_path):
    rng = random.Random(f"{made_by}-{bs}")
    img = os.path.join(SHM, f"xipfs-cross-{os.getpid()}-{made_by}-{bs}.img")
    src = str(tmp_path / "src")
    _source_tree(src, rng)
    if made_by == "xipfs":
        xipfs.mkfs(img, 96 << 20, fs_type="ext4", block_size=bs)
    else:
        mkfs(img, "96M", bs=bs, fstype="ext4")
    try:
        for turn in range(2):
            # xipfs's turn: a tree, appends in turns, removals, a rename, xattrs
            with xipfs.open(img, "r+") as fs:
                top = f"/x{turn}"
                fs.mkdir(top)
                for i in range(60):
                    fs.write_bytes(f"{top}/f{i}", rng.randbytes(rng.choice((0, 50, 3000, 70000))))
                names = [f"{top}/log{j}" for j in range(3)]
                for n in names:
                    fs.write_bytes(n, b"")

                def append(name, data, fs=fs):
                    with fs.open(name, "ab") as f:
                        f.write(data)
                _appends_in_turns(append, names, 60, rng)
                for i in range(0, 60, 3):
                    fs.unlink(f"{top}/f{i}")
                fs.rename(f"{top}/f1", f"{top}/renamed")
                fs.symlink("renamed", f"{top}/link")
                fs.setxattr(f"{top}/renamed", "user.turn", str(turn).encode() * 100)
                if turn:                                   # Linux's files, changed by xipfs
                    fs.unlink("/l0/d0/f3")
                    append("/l0/d1/f4", b"xipfs was here" * 100)
                    fs.truncate("/l0/d2/inner/big", 123_456)
                ours = _xipfs_view(fs)
            assert_fsck_clean(img)
            # Linux's turn: it reads ours exactly, copies a tree in, removes, appends in turns
            with mounted(img, options="rw") as mnt:
                assert _linux_view(mnt) == ours and len(ours) > 40
                run(["cp", "-a", src, os.path.join(mnt, f"l{turn}")])
                for i in range(0, 40, 4):
                    os.unlink(os.path.join(mnt, f"l{turn}", "d3", f"f{i}"))
                for i in range(0, 60, 5):
                    p = os.path.join(mnt, f"x{turn}", f"f{i + 1}")
                    if os.path.exists(p):
                        os.unlink(p)

                def linux_append(name, data, mnt=mnt):
                    with open(os.path.join(mnt, name.lstrip("/")), "ab") as f:
                        f.write(data)
                _appends_in_turns(linux_append, [f"/x{turn}/log0", f"/x{turn}/log2", f"/l{turn}/d0/f5"],
                                  40, rng)
                os.setxattr(os.path.join(mnt, f"x{turn}", "renamed"), "user.linux", b"L" * 200)
            assert_fsck_clean(img)
            with mounted(img) as mnt:
                theirs = _linux_view(mnt)
            with xipfs.open(img) as fs:
                assert _xipfs_view(fs) == theirs
                assert fs.getxattr(f"/x{turn}/renamed", "user.linux") == b"L" * 200
    finally:
        os.unlink(img)
