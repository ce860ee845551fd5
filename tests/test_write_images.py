"""The write path on real images: what mke2fs made, xipfs changed, e2fsprogs and Linux check.

* images from ``mke2fs -t ext2`` (its defaults: resize_inode, dir_index, sparse_super) and from
  ``mke2fs -d`` with a real tree, changed by xipfs, stay ``e2fsck -fn`` clean (backup superblock
  included) and ``debugfs`` reads back what xipfs wrote;
* htree-indexed directories lose their index flag when xipfs changes them;
* running out of blocks or inodes: partial writes, ENOSPC, a clean image;
* one writer at a time (EBUSY naming the holder), the superblock state and mount count;
* threads sharing one filesystem object;
* the Linux kernel mounts what xipfs wrote and sees the same tree; xipfs reads what Linux wrote.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator

import pytest
from e2fs import SHM, assert_fsck_clean, debugfs, debugfs_cat, debugfs_r, dumpe2fs_header, e2fsck, mkfs, run
from write_util import IS_ROOT, compare_trees, umask, user_xattrs_os, user_xattrs_xip

import xipfs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")

GiB = 1 << 30
MiB = 1 << 20


@pytest.fixture
def tmp() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xipfs-wimg-", dir=SHM)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def umask0() -> Iterator[None]:
    with umask(0):
        yield


def pattern(seed: int, n: int) -> bytes:
    block = hashlib.sha256(seed.to_bytes(8, "little")).digest() * 8      # 256 bytes
    return (block * (n // 256 + 1))[:n]


def stdlib_tree(dest: str, limit: int = 400) -> str:
    """Copy about ``limit`` files of this Python's standard library to ``dest`` (sorted, so the
    same files every run), plus a symlink, a hard link and an empty directory."""
    lib = os.path.dirname(os.__file__)
    picked = []
    for pkg in ("json", "email", "collections", "concurrent", "xml", "asyncio", "importlib",
                "logging", "urllib", "http", "unittest", "sqlite3", "wsgiref", "html"):
        top = os.path.join(lib, pkg)
        for root, dirs, files in os.walk(top):
            dirs[:] = sorted(d for d in dirs if d != "__pycache__")
            picked += [os.path.join(root, f) for f in sorted(files) if f.endswith(".py")]
    picked += sorted(os.path.join(lib, f) for f in os.listdir(lib) if f.endswith(".py"))
    for src in picked[:limit]:
        rel = os.path.relpath(src, lib)
        os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
        shutil.copyfile(src, os.path.join(dest, rel))
    os.symlink("json/__init__.py", os.path.join(dest, "json-link"))
    os.link(os.path.join(dest, "json/decoder.py"), os.path.join(dest, "decoder-hardlink.py"))
    os.mkdir(os.path.join(dest, "empty"))
    return dest


def all_files(root: str) -> list[str]:
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        out += [os.path.join(d, f) for f in sorted(files)]
    return out


def compare_with_debugfs(img: str, ref: str, skip: tuple[str, ...] = ()) -> int:
    """Every regular file of the real tree ``ref`` reads back the same through debugfs."""
    out = os.path.join(os.path.dirname(img), "debugfs-dump")
    shutil.rmtree(out, ignore_errors=True)
    os.mkdir(out)
    files = [f for f in all_files(ref) if stat.S_ISREG(os.lstat(f).st_mode)
             and "/" + os.path.relpath(f, ref) not in skip]
    cmds = [f'dump "/{os.path.relpath(f, ref)}" "{out}/{i}"' for i, f in enumerate(files)]
    debugfs(img, *cmds)
    for i, f in enumerate(files):
        with open(f, "rb") as a, open(f"{out}/{i}", "rb") as b:
            assert a.read() == b.read(), f"debugfs reads /{os.path.relpath(f, ref)} differently"
    shutil.rmtree(out)
    return len(files)


def debugfs_stat(img: str, path: str) -> str:
    return debugfs_r(img, f'stat "{path}"').decode(errors="replace")


def inode_flags(img: str, path: str) -> int:
    text = debugfs_stat(img, path)
    for part in text.split():
        if part.startswith("0x") and "Flags:" in text.split(part)[0][-20:]:
            return int(part, 16)
    raise AssertionError(f"no Flags in debugfs stat of {path}:\n{text}")


# -- changing real images ---------------------------------------------------------------------
def mutate(fs: xipfs.Filesystem, ref: str, rng: random.Random, bs: int) -> None:
    """The same changes on the image and on the real tree ``ref``: add, delete, rename, overwrite."""
    def both(call: str, *args: str, **kw: object) -> None:
        getattr(fs, call)(*args, **kw)
        os_args = [os.path.join(ref, a.lstrip("/")) if isinstance(a, str) and a.startswith("/") else a
                   for a in args]
        {"mkdir": os.mkdir, "unlink": os.unlink, "rename": os.rename, "rmdir": os.rmdir,
         "symlink": os.symlink, "link": os.link, "truncate": os.truncate}[call](*os_args, **kw)

    def write(path: str, data: bytes, mode: str = "wb", at: int | None = None) -> None:
        with fs.open(path, mode, buffering=0) as f:
            if at is None:
                assert f.write(data) == len(data)
            else:
                assert f.pwrite(data, at) == len(data)
        with open(os.path.join(ref, path.lstrip("/")), mode) as f:
            if at is not None:
                f.seek(at)
            f.write(data)

    existing = sorted("/" + os.path.relpath(f, ref) for f in all_files(ref)
                      if stat.S_ISREG(os.lstat(f).st_mode))
    # add: a new tree with files of every size class
    both("mkdir", "/new")
    both("mkdir", "/new/sub")
    sizes = [0, 1, bs - 1, bs, bs + 1, 12 * bs, 12 * bs + 1, (12 + bs // 4) * bs + 3, 300_000, 1_500_000]
    for i, n in enumerate(sizes):
        write(f"/new/f{i}", pattern(i, n))
        write(f"/new/sub/g{i}", pattern(100 + i, n // 3))
    for i in range(60):                                   # a directory of many entries
        write(f"/new/sub/many-{i:03d}-{'x' * (i % 40)}", pattern(200 + i, i * 37))
    both("symlink", "f1", "/new/short-link")
    both("symlink", "sub/" + "../sub/" * 12 + "g1", "/new/long-link")
    both("link", "/new/f3", "/new/sub/f3-hardlink")
    # delete: every fifth file of what was there, then a directory emptied by it
    for path in existing[::5]:
        both("unlink", path)
    for i in range(0, 60, 3):
        both("unlink", f"/new/sub/many-{i:03d}-{'x' * (i % 40)}")
    both("mkdir", "/gone")
    write("/gone/x", b"x")
    both("unlink", "/gone/x")
    both("rmdir", "/gone")
    # rename: files across directories, over existing files, a whole directory
    left = [p for p in existing if os.path.lexists(os.path.join(ref, p.lstrip("/")))]
    for i, path in enumerate(left[1::7][:20]):
        both("rename", path, f"/new/renamed-{i}")
    both("rename", "/new/f2", "/new/f4")                    # replaces f4
    both("rename", "/new/sub", "/moved-sub")
    # overwrite: in the middle, shorter, longer, truncated
    for i, path in enumerate(left[2::9][:15]):
        if not os.path.lexists(os.path.join(ref, path.lstrip("/"))):
            continue
        size = os.path.getsize(os.path.join(ref, path.lstrip("/")))
        kind = i % 4
        if kind == 0:
            write(path, pattern(300 + i, 100), "r+b", at=size // 2)
        elif kind == 1:
            write(path, pattern(300 + i, size // 3))
        elif kind == 2:
            write(path, pattern(300 + i, 3 * size + 5000), "ab")
        else:
            both("truncate", path, size // 4)
    write("/new/f9", pattern(999, 4000), "r+b", at=rng.randrange(1_500_000))


@pytest.mark.parametrize("xip", [True, False], ids=["xip", "cache"])
def test_default_image(tmp: str, xip: bool, umask0: None) -> None:
    """mke2fs's own defaults for a small ext2 (1 KiB blocks, resize_inode, dir_index)."""
    img = mkfs(os.path.join(tmp, "img"), "64M")
    ref = os.path.join(tmp, "ref")
    os.mkdir(ref)
    with xipfs.open(img, "r+", xip=xip) as fs:
        assert {"resize_inode", "dir_index", "sparse_super"} <= set(fs.features)
        mutate(fs, ref, random.Random(1), fs.block_size)
        compare_trees(fs, ref)
    assert_fsck_clean(img)
    assert compare_with_debugfs(img, ref) > 40
    assert debugfs_cat(img, "/new/f5") == pattern(5, 12 * 1024)
    with xipfs.open(img, xip=xip) as fs:
        compare_trees(fs, ref)


@pytest.mark.slow
@pytest.mark.parametrize("xip", [True, False], ids=["xip", "cache"])
def test_tree_image_4k(tmp: str, xip: bool, umask0: None) -> None:
    """``mke2fs -d`` with part of the stdlib, 4 KiB blocks, five groups: change it, write a
    256 MiB file in 1 MiB pieces (few runs), a sparse file past 4 GiB, check the backups."""
    src = stdlib_tree(os.path.join(tmp, "src"))
    img = mkfs(os.path.join(tmp, "img"), "600M", bs=4096, src=src)
    ref = os.path.join(tmp, "ref")
    os.mkdir(ref)
    run(["cp", "-a", src + "/.", ref])                   # hard links stay hard links
    with xipfs.open(img, "r+", xip=xip) as fs:
        compare_trees(fs, ref, xattrs=False)
        # 256 MiB written sequentially in 1 MiB chunks
        chunk = pattern(7, MiB)
        with fs.open("/big256", "wb", buffering=0) as f, open(f"{ref}/big256", "wb") as g:
            for _ in range(256):
                assert f.write(chunk) == MiB
                g.write(chunk)
        runs = fs.block_runs("/big256")
        assert sum(n for _, n, pb in runs if pb) == 256 * MiB // 4096
        assert len(runs) <= 16, f"256 MiB file in {len(runs)} runs: {runs[:20]}"
        mutate(fs, ref, random.Random(2), fs.block_size)
        # sparse, past 4 GiB (large_file is on by default)
        with fs.open("/sparse", "wb", buffering=0) as f:
            assert f.pwrite(b"head", 0) == 4
            assert f.pwrite(b"tail" * 1000, 4 * GiB + 12345) == 4000
        with open(f"{ref}/sparse", "wb") as g:
            g.write(b"head")
            g.seek(4 * GiB + 12345)
            g.write(b"tail" * 1000)
        assert fs.stat("/sparse").st_size == 4 * GiB + 12345 + 4000
        compare_trees(fs, ref, xattrs=False)
    assert_fsck_clean(img)
    assert_fsck_clean(img, "-b", "32768", "-B", "4096")
    assert_fsck_clean(img, "-b", "98304", "-B", "4096")
    assert compare_with_debugfs(img, ref, skip=("/sparse", "/big256")) > 300
    out = os.path.join(tmp, "big.dump")
    debugfs(img, f"dump /big256 {out}")
    with open(out, "rb") as f, open(f"{ref}/big256", "rb") as g:   # (mutate may have changed it)
        for i in range(257):
            assert f.read(MiB) == g.read(MiB), f"debugfs dump of /big256 differs in MiB {i}"
    os.unlink(out)
    text = debugfs_stat(img, "/sparse")
    assert f"Size: {4 * GiB + 12345 + 4000}" in text, text
    with xipfs.open(img, xip=xip) as fs:
        compare_trees(fs, ref, xattrs=False)
        with fs.open("/sparse", "rb", buffering=0) as f:
            assert f.pread(8, 0) == b"head\0\0\0\0"
            assert f.pread(8, 2 * GiB) == bytes(8)
            assert f.pread(4000, 4 * GiB + 12345) == b"tail" * 1000


@pytest.mark.parametrize("bs", [1024, 4096])
def test_large_file_feature_turned_on(tmp: str, bs: int) -> None:
    """An image made without large_file gets it when a file grows past 2 GiB."""
    # (mke2fs turns large_file back on for a resize inode past 2 GiB, as with 4 KiB blocks)
    img = mkfs(os.path.join(tmp, "img"), "16M", bs=bs, extra=("-O", "^large_file,^resize_inode"))
    assert "large_file" not in dumpe2fs_header(img)["Filesystem features"]
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/small", b"x" * 1000)
        fs.truncate("/small", 2 * GiB - 1)
        assert "large_file" not in fs.features
        with fs.open("/big", "wb", buffering=0) as f:
            f.pwrite(b"past 2 GiB", 2 * GiB + 100)
        assert "large_file" in fs.features
    assert "large_file" in dumpe2fs_header(img)["Filesystem features"].split()
    assert_fsck_clean(img)
    text = debugfs_stat(img, "/big")
    assert f"Size: {2 * GiB + 110}" in text, text
    assert f"Size: {2 * GiB - 1}" in debugfs_stat(img, "/small")
    with xipfs.open(img) as fs, fs.open("/big", "rb", buffering=0) as f:
        assert f.pread(20, 2 * GiB + 95) == bytes(5) + b"past 2 GiB"


def linux_ext2_max_size(bs: int) -> int:
    """fs/ext2/super.c ``ext2_max_size``: the block tree, bounded by i_blocks (in 512-byte units)."""
    bits = bs.bit_length() - 1
    ppb = bs // 4
    upper = ((1 << 32) - 1) >> (bits - 9)
    res = 12 + ppb + ppb * ppb + ppb ** 3
    meta = 1 + (1 + ppb) + (1 + ppb + ppb * ppb)
    if res + meta > upper:
        res = upper
        upper -= 12 + ppb
        meta = 1
        if upper < ppb * ppb:
            meta += 1 + -(-upper // ppb)
        else:
            meta += 1 + ppb
            upper -= ppb * ppb
            meta += 1 + -(-upper // ppb) + -(-upper // (ppb * ppb))
        res -= meta
    return res << bits


@pytest.mark.parametrize("bs", [1024, 2048, 4096])
def test_file_size_limit(tmp: str, bs: int) -> None:
    """The largest file is Linux's (``ext2_max_size``): up to it works, one byte more is EFBIG."""
    img = mkfs(os.path.join(tmp, "img"), "8M", bs=bs)
    limit = linux_ext2_max_size(bs)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", b"data")
        with fs.open("/f", "r+b", buffering=0) as f:
            with pytest.raises(OSError) as err:
                f.pwrite(b"x", limit)
            assert err.value.errno == errno.EFBIG
            assert f.pwrite(b"xy", limit - 1) == 1               # what fits below the limit
            assert f.size == limit
        with pytest.raises(OSError) as err:
            fs.truncate("/f", limit + 1)
        assert err.value.errno == errno.EFBIG
        fs.truncate("/f", limit)
        assert fs.stat("/f").st_size == limit
        fs.truncate("/f", 4)
        assert fs.read_bytes("/f") == b"data"
    assert_fsck_clean(img)


# -- htree directories ------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["add", "remove", "rename", "both"])
def test_htree_directory_loses_index(tmp: str, change: str) -> None:
    src = os.path.join(tmp, "src")
    os.makedirs(os.path.join(src, "big"))
    names = [f"entry-{i:05d}-{'n' * (i % 17)}" for i in range(2000)]
    for n in names:
        with open(os.path.join(src, "big", n), "wb") as f:
            f.write(n.encode())
    img = mkfs(os.path.join(tmp, "img"), "32M", bs=1024, src=src)
    rc, out = e2fsck(img, "-fyD")
    assert rc in (0, 1), out
    assert inode_flags(img, "/big") & 0x1000, "e2fsck -D did not index the directory"
    assert_fsck_clean(img)
    want = set(names)
    with xipfs.open(img, "r+") as fs:
        assert set(fs.listdir("/big")) == want
        if change in ("add", "both"):
            for i in range(50):
                fs.write_bytes(f"/big/added-{i}", b"new")
                want.add(f"added-{i}")
        if change in ("remove", "both"):
            for n in names[::40]:
                fs.unlink(f"/big/{n}")
                want.discard(n)
        if change == "rename":
            fs.rename(f"/big/{names[7]}", "/big/renamed")
            want.discard(names[7])
            want.add("renamed")
        assert set(fs.listdir("/big")) == want
    assert not inode_flags(img, "/big") & 0x1000, "index flag still set after a change"
    assert_fsck_clean(img)
    listing = debugfs_r(img, "ls -p /big").decode()
    # (an entry removed from the start of a block stays with inode 0, as Linux leaves it)
    seen = {line.split("/")[5] for line in listing.splitlines()
            if line.count("/") >= 6 and line.split("/")[1] != "0"}
    assert seen - {".", ".."} == want
    with xipfs.open(img) as fs:
        for n in sorted(want)[::97]:
            assert fs.read_bytes(f"/big/{n}") == (b"new" if n.startswith("added-") else
                                                  n.encode() if n != "renamed" else names[7].encode())


# -- running out of space ---------------------------------------------------------------------
@pytest.mark.parametrize("xip", [True, False], ids=["xip", "cache"])
@pytest.mark.parametrize("bs", [1024, 2048, 4096])
def test_fill_image(tmp: str, bs: int, xip: bool) -> None:
    """Write files until the image is full: the last write is partial and says so, everything
    complete reads back, the image is clean, and space freed can be used again."""
    img = mkfs(os.path.join(tmp, "img"), "8M", bs=bs)
    rng = random.Random(bs)
    written: dict[str, bytes] = {}
    with xipfs.open(img, "r+", xip=xip) as fs:
        for i in range(1000):
            data = pattern(i, rng.choice([rng.randrange(1, 3 * bs), rng.randrange(1, 600_000)]))
            path = f"/d{i % 3}/f{i}"
            fs.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                f = fs.open(path, "wb", buffering=0)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
            with f:
                try:
                    done = f.write(data)
                except OSError as err:
                    assert err.errno == errno.ENOSPC
                    done = 0
            written[path] = data[:done]
            if done < len(data):
                break
        else:
            raise AssertionError("8 MiB never filled")
        for path, data in written.items():
            assert fs.read_bytes(path) == data, path
        fs.sync()
        assert_fsck_clean(img)
        # other calls that need a block fail cleanly too (some may still fit in slack)
        for call in (lambda: fs.symlink("t" * 200, "/long-link"),
                     lambda: fs.setxattr(next(iter(written)), "user.big", b"v" * (bs // 2)),
                     lambda: [fs.mkdir(f"/dir{i}") for i in range(50)]):
            try:
                call()
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
        fs.sync()
        assert_fsck_clean(img)
        # free some space and use it again
        victims = sorted(written)[: len(written) // 2]
        for path in victims:
            fs.unlink(path)
            del written[path]
        fs.write_bytes("/again", pattern(5, 100_000))
        written["/again"] = pattern(5, 100_000)
    assert_fsck_clean(img)
    with xipfs.open(img, xip=xip) as fs:
        for path, data in written.items():
            assert fs.read_bytes(path) == data, path


@pytest.mark.parametrize("bs", [1024, 4096])
def test_fill_one_file_in_big_pieces(tmp: str, bs: int) -> None:
    """Appending 1 MiB at a time until full: the last append reports exactly what fitted."""
    img = mkfs(os.path.join(tmp, "img"), "8M", bs=bs)
    chunk = pattern(3, MiB)
    with xipfs.open(img, "r+") as fs, fs.open("/fill", "ab", buffering=0) as f:
        total = 0
        while True:
            try:
                n = f.write(chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC
                n = 0
            total += n
            assert f.size == total
            if n < len(chunk):
                break
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        data = fs.read_bytes("/fill")
    assert len(data) == total
    assert data == (chunk * (total // MiB + 1))[:total]


@pytest.mark.parametrize("bs", [1024, 4096])
def test_fill_image_with_small_files(tmp: str, bs: int) -> None:
    """``write_bytes`` of new small files (the lean one-pass path) until blocks run out: a file
    that does not fit holds a prefix of its data (as ``pathlib`` leaves it), the others read
    back whole, and the image is clean."""
    img = mkfs(os.path.join(tmp, "img"), "2M", bs=bs)
    rng = random.Random(bs)
    written: dict[str, bytes] = {}
    with xipfs.open(img, "r+") as fs:
        for i in range(5000):
            data = pattern(i, rng.choice([1, bs - 1, bs, bs + 1, 3 * bs + 5, 12 * bs]))
            try:
                fs.write_bytes(f"/f{i}", data)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                if fs.exists(f"/f{i}"):
                    assert data.startswith(fs.read_bytes(f"/f{i}"))
                    fs.unlink(f"/f{i}")
                if len(data) == 1:
                    break
                continue
            written[f"/f{i}"] = data
        else:
            raise AssertionError("2 MiB never filled")
        for path, data in written.items():
            assert fs.read_bytes(path) == data, path
    assert_fsck_clean(img)


def test_small_files_fill_gaps_in_one_run(tmp: str) -> None:
    """Small files land in the first free gap of the bitmap that holds them whole, as one run,
    and never on a block in use: with every other block of a region taken, a one-block file
    takes the first hole, a two-block file skips the one-block holes for the first two free
    blocks in a row (the last hole and the block after it), and the image stays clean."""
    img = mkfs(os.path.join(tmp, "img"), "16M", bs=4096)
    with xipfs.open(img, "r+") as fs:
        for i in range(40):
            fs.write_bytes(f"/a{i}", pattern(i, 4096))
        blocks = [fs.block_runs(f"/a{i}")[0][2] for i in range(40)]
        assert blocks == list(range(blocks[0], blocks[0] + 40))        # one after another
        for i in range(3, 40, 2):                   # holes at every other block from the 4th
            fs.unlink(f"/a{i}")
        holes = blocks[3::2]
        fs.write_bytes("/one", pattern(100, 4096))
        assert fs.block_runs("/one") == [(0, 1, holes[0])]
        fs.write_bytes("/two", pattern(101, 2 * 4096))
        (run_,) = fs.block_runs("/two")
        assert run_[1:] == (2, blocks[-1])
        for n in range(1, 9):                        # every size the fast path handles
            fs.write_bytes(f"/n{n}", pattern(n, n * 4096 - 1))
            runs = fs.block_runs(f"/n{n}")
            assert len(runs) == 1 and runs[0][1] == n
        for i in range(3):
            assert fs.read_bytes(f"/a{i}") == pattern(i, 4096)
        assert fs.read_bytes("/two") == pattern(101, 2 * 4096)
    assert_fsck_clean(img)


def test_append_continues_after_the_last_block(tmp: str) -> None:
    """A file that grows takes the block after its last one, not a free block just before it
    (the goal is where the search starts, even inside one byte of the bitmap)."""
    img = mkfs(os.path.join(tmp, "img"), "16M", bs=4096)
    with xipfs.open(img, "r+") as fs:
        where = {}
        for i in range(16):
            fs.write_bytes(f"/f{i}", pattern(i, 4096))
            where[i] = fs.block_runs(f"/f{i}")[0][2]
        i = next(i for i in range(15) if where[i] % 8 <= 5 and where[i + 1] == where[i] + 1
                 and where[i + 1] + 1 not in where.values())
        fs.unlink(f"/f{i}")                          # a free block just before /f{i+1}'s
        with fs.open(f"/f{i + 1}", "ab") as f:
            f.write(pattern(99, 4096))
        assert fs.block_runs(f"/f{i + 1}") == [(0, 2, where[i + 1])]
    assert_fsck_clean(img)


@pytest.mark.parametrize("xip", [True, False])
def test_new_small_file_hides_old_data_past_eof(tmp: str, xip: bool) -> None:
    """A small file written into blocks another file just freed: the bytes of its last block
    past EOF are zeros (``get_xip_mem`` shows the whole block), never the old file's data."""
    img = mkfs(os.path.join(tmp, "img"), "8M", bs=4096)
    with xipfs.open(img, "r+", xip=xip) as fs:
        fs.write_bytes("/old", b"\xee" * (64 * 4096))
        fs.unlink("/old")
        for i, n in enumerate((1, 100, 4095, 4097, 12 * 4096 - 7)):
            fs.write_bytes(f"/new{i}", b"n" * n)
            last = (n - 1) // 4096
            block = bytes(fs.get_xip_mem(f"/new{i}", last))
            assert block == (b"n" * (n - last * 4096)).ljust(4096, b"\0"), n


def test_consecutive_pointers() -> None:
    """The lane arithmetic that fills indirect blocks gives exactly what an array would."""
    from array import array

    from xipfs.extfs.inode import consecutive_pointers
    for first, count in [(5, 1), (123_456, 256), (2**32 - 1025, 1024), (7, 1000), (99, 16384)]:
        want = array("I", range(first, first + count))
        if sys.byteorder != "little":
            want.byteswap()
        assert consecutive_pointers(first, count) == want.tobytes()


def test_out_of_inodes(tmp: str) -> None:
    img = mkfs(os.path.join(tmp, "img"), "4M", bs=1024, extra=("-N", "32"))
    free = int(dumpe2fs_header(img)["Free inodes"])
    made = []
    with xipfs.open(img, "r+") as fs:
        for i in range(100):
            try:
                fs.write_bytes(f"/f{i}", b"%d" % i)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
                break
            made.append(f"/f{i}")
        assert len(made) == free
        for call in (lambda: fs.mkdir("/d"), lambda: fs.symlink("x", "/l"), lambda: fs.mkfifo("/p"),
                     lambda: fs.open("/new", "wb"), lambda: fs.mknod("/n", stat.S_IFREG | 0o644)):
            with pytest.raises(OSError) as err:
                call()
            assert err.value.errno == errno.ENOSPC
        assert not any(fs.exists(p) for p in ("/d", "/l", "/p", "/new", "/n"))
        fs.link("/f0", "/f0-link")                          # needs no inode
        fs.unlink("/f1")
        fs.mkdir("/d")                                       # the freed inode is used again
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/f0-link") == b"0"
        assert fs.isdir("/d")


# -- one writer at a time ---------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import errno, sys, xipfs
    try:
        fs = xipfs.open(sys.argv[1], sys.argv[2], lock=sys.argv[3] == "1")
    except OSError as err:
        print(err.errno, err)
    else:
        fs.close()
        print("opened")
""")


def child_open(img: str, mode: str, lock: bool = False) -> str:
    proc = subprocess.run([sys.executable, "-c", CHILD, img, mode, "1" if lock else "0"],
                          capture_output=True, timeout=60, text=True)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("xip", [True, False], ids=["xip", "cache"])
def test_one_writer(tmp: str, xip: bool) -> None:
    img = mkfs(os.path.join(tmp, "img"), "8M", bs=1024)
    before = dumpe2fs_header(img)
    assert before["Filesystem state"] == "clean"
    fs = xipfs.open(img, "r+", xip=xip)
    try:
        during = dumpe2fs_header(img)
        assert during["Filesystem state"] == "not clean"
        assert int(during["Mount count"]) == int(before["Mount count"]) + 1
        with pytest.raises(OSError) as err:
            xipfs.open(img, "r+", xip=xip)
        assert err.value.errno == errno.EBUSY
        assert str(os.getpid()) in str(err.value) or "this process" in str(err.value)
        with pytest.raises(OSError) as err:
            xipfs.open(img, "r", lock=True)
        assert err.value.errno == errno.EBUSY
        with xipfs.open(img, "r") as reader:           # an unlocked reader may look
            assert "lost+found" in reader.listdir("/")
        out = child_open(img, "r+")
        assert out.startswith(f"{errno.EBUSY} "), out
        assert str(os.getpid()) in out, f"message does not name the holder: {out}"
        out = child_open(img, "r", lock=True)
        assert out.startswith(f"{errno.EBUSY} "), out
        assert child_open(img, "r") == "opened"
        fs.write_bytes("/x", b"written while locked")
    finally:
        fs.close()
    after = dumpe2fs_header(img)
    assert after["Filesystem state"] == "clean"
    assert int(after["Mount count"]) == int(before["Mount count"]) + 1
    assert child_open(img, "r+") == "opened"
    assert child_open(img, "r", lock=True) == "opened"
    with xipfs.open(img, "r+", xip=xip) as fs:
        assert fs.read_bytes("/x") == b"written while locked"
    assert int(dumpe2fs_header(img)["Mount count"]) == int(before["Mount count"]) + 3
    assert_fsck_clean(img)


def test_readonly_open_refuses_writes(tmp: str) -> None:
    img = mkfs(os.path.join(tmp, "img"), "4M", bs=1024)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", b"x")
    with open(img, "rb") as f:
        before = f.read()
    with xipfs.open(img, "r") as fs:
        for call in (lambda: fs.mkdir("/d"), lambda: fs.unlink("/f"), lambda: fs.open("/f", "r+b"),
                     lambda: fs.write_bytes("/g", b"y"), lambda: fs.rename("/f", "/g"),
                     lambda: fs.chmod("/f", 0o600), lambda: fs.setxattr("/f", "user.a", b"1"),
                     lambda: fs.symlink("f", "/l"), lambda: fs.truncate("/f", 0)):
            with pytest.raises(OSError) as err:
                call()
            assert err.value.errno == errno.EROFS
    with open(img, "rb") as f:
        assert f.read() == before


# -- threads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("xip", [True, False], ids=["xip", "cache"])
def test_threads(tmp: str, xip: bool) -> None:
    """Four threads write their own files and add/remove names in one shared directory."""
    img = mkfs(os.path.join(tmp, "img"), "32M", bs=1024)
    results: dict[int, dict[str, bytes]] = {}
    errors: list[BaseException] = []
    with xipfs.open(img, "r+", xip=xip) as fs:
        fs.mkdir("/shared")
        start = threading.Barrier(4)

        def worker(t: int) -> None:
            try:
                rng = random.Random(t)
                mine: dict[str, bytes] = {}
                fs.mkdir(f"/t{t}")
                start.wait()
                for i in range(150):
                    op = rng.randrange(6)
                    name = f"/t{t}/f{rng.randrange(20)}"
                    shared = f"/shared/t{t}-{rng.randrange(30)}"
                    if op == 0:
                        data = pattern(t * 1000 + i, rng.randrange(0, 40_000))
                        fs.write_bytes(name, data)
                        mine[name] = data
                    elif op == 1 and name in mine:
                        extra = pattern(i, rng.randrange(1, 5000))
                        with fs.open(name, "ab", buffering=0) as f:
                            assert f.write(extra) == len(extra)
                        mine[name] += extra
                    elif op == 2 and name in mine:
                        fs.unlink(name)
                        del mine[name]
                    elif op == 3 and name in mine:
                        new = f"/t{t}/r{rng.randrange(20)}"
                        fs.rename(name, new)
                        mine[new] = mine.pop(name)
                    elif op == 4:
                        if shared in mine:
                            fs.unlink(shared)
                            del mine[shared]
                        else:
                            fs.write_bytes(shared, shared.encode())
                            mine[shared] = shared.encode()
                    elif op == 5:
                        d = f"/t{t}/dir{rng.randrange(3)}"
                        if fs.exists(d):
                            fs.rmdir(d)
                        else:
                            fs.mkdir(d)
                    for path in rng.sample(sorted(mine), min(2, len(mine))):
                        assert fs.read_bytes(path) == mine[path], path
                results[t] = mine
            except BaseException as err:  # noqa: BLE001 - reported by the main thread
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        want = {p: d for m in results.values() for p, d in m.items()}
        for path, data in want.items():
            assert fs.read_bytes(path) == data, path
        assert sorted(fs.listdir("/shared")) == sorted(p.rsplit("/", 1)[1] for p in want
                                                        if p.startswith("/shared/"))
    assert_fsck_clean(img)
    with xipfs.open(img, xip=xip) as fs:
        for path, data in want.items():
            assert fs.read_bytes(path) == data, path


# -- Linux reads what xipfs wrote, xipfs reads what Linux wrote --------------------------------
class LoopMount:
    def __init__(self, img: str, mnt: str, ro: bool) -> None:
        self.img, self.mnt, self.ro = img, mnt, ro

    def __enter__(self) -> str:
        if not IS_ROOT:
            pytest.skip("loop mounts need root")
        os.makedirs(self.mnt, exist_ok=True)
        opts = "loop,ro" if self.ro else "loop"
        proc = run(["mount", "-o", opts, "-t", "ext2", self.img, self.mnt], check=False, timeout=60)
        if proc.returncode != 0:
            pytest.skip(f"mount -t ext2 failed: {proc.stderr.decode(errors='replace').strip()}")
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        run(["umount", self.mnt], timeout=60)


def build_everything(fs: xipfs.Filesystem, ns_times: bool) -> None:
    """An image with every kind of entry xipfs can make."""
    fs.makedirs("/dir/sub/deeper")
    fs.write_bytes("/dir/empty", b"")
    fs.write_bytes("/dir/small", b"hello, kernel\n")
    fs.write_bytes("/dir/sub/blocks", pattern(1, 3 * fs.block_size + 17))
    fs.write_bytes("/dir/sub/indirect", pattern(2, 300_000))
    with fs.open("/holes", "wb", buffering=0) as f:
        f.pwrite(b"A" * 10, 5000)
        f.pwrite(pattern(3, 9000), 70_000)
        f.pwrite(b"Z", 2 * MiB)
        f.truncate(3 * MiB)
    with fs.open("/huge-sparse", "wb", buffering=0) as f:
        f.pwrite(b"start", 0)
        f.pwrite(b"past four GiB", 4 * GiB + 4097)
        f.pwrite(b"end", 6 * GiB)
    fs.link("/dir/small", "/dir/sub/small-link")
    fs.link("/dir/small", "/small-link2")
    fs.symlink("dir/small", "/fast-link")
    fs.symlink("dir/" + "./" * 50 + "sub/blocks", "/slow-link")
    fs.symlink("nowhere/at/all", "/dangling")
    fs.mkfifo("/fifo", 0o640)
    fs.mknod("/chr", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    fs.mknod("/blk", stat.S_IFBLK | 0o660, os.makedev(259, 65541))
    fs.mknod("/sock", stat.S_IFSOCK | 0o755)
    fs.setxattr("/dir/small", "user.small", b"v")
    fs.setxattr("/dir/small", "user.empty", b"")
    fs.setxattr("/dir", "user.on-a-dir", pattern(4, 200))
    fs.setxattr("/dir/sub/blocks", "user.a", b"1")
    fs.setxattr("/dir/sub/blocks", "user.b", pattern(5, 500))
    fs.removexattr("/dir/sub/blocks", "user.a")
    fs.chown("/dir/sub", 1234, 5678)
    fs.chown("/dir/small", 100000, 200000)
    fs.chown("/fast-link", 42, 43, follow_symlinks=False)
    fs.chmod("/dir/sub/blocks", 0o4751)
    fs.chmod("/dir/sub/deeper", 0o3777)
    fs.chmod("/dir/empty", 0o2644)
    fs.rename("/dir/sub/indirect", "/indirect-moved")
    fs.mkdir("/will-go")
    fs.rmdir("/will-go")
    fs.write_bytes("/unlinked", b"gone")
    fs.unlink("/unlinked")
    times = [
        ("/dir/small", 1_234_567_890_123_456_789, 987_654_321_000_000_001),
        ("/dir", 1_000_000_000_999_999_999, 2_000_000_000_000_000_001),
        ("/holes", -1_000_000_000, 0),
        ("/indirect-moved", 1, 10**9 - 1),
    ]
    if ns_times:
        times.append(("/dir/sub/blocks", 3 * 10**18 + 5, (2**33) * 10**9 + 123))   # after 2038, 2242
    for path, a, m in times:
        fs.utime(path, ns=(a, m))


def assert_same_as_linux(fs: xipfs.Filesystem, mnt: str, ns: bool) -> int:
    """The tree the kernel shows under ``mnt`` equals what xipfs shows (lost+found included)."""
    count = 0
    for top, dirs, files in os.walk(mnt):
        rel = "/" + os.path.relpath(top, mnt).lstrip(".")
        rel = "/" if rel == "/" else rel.rstrip("/")
        assert sorted(dirs + files) == sorted(fs.listdir(rel)), rel
        for name in dirs + files:
            count += 1
            p = os.path.join(top, name)
            ip = (rel.rstrip("/") + "/" + name)
            a, b = os.lstat(p), fs.lstat(ip)
            for field in ("st_mode", "st_nlink", "st_uid", "st_gid", "st_rdev", "st_ino", "st_blocks"):
                assert getattr(a, field) == getattr(b, field), f"{ip}: {field} linux {getattr(a, field)} " \
                                                               f"xipfs {getattr(b, field)}"
            unit = 1 if ns else 10**9
            for field in ("st_atime_ns", "st_mtime_ns", "st_ctime_ns"):
                x, y = getattr(a, field), getattr(b, field) // unit * unit
                assert x == y, f"{ip}: {field} linux {x} xipfs {y}"
            fmt = stat.S_IFMT(a.st_mode)
            if fmt != stat.S_IFDIR:
                assert a.st_size == b.st_size, ip
            if fmt == stat.S_IFLNK:
                assert os.readlink(p) == fs.readlink(ip), ip
            elif fmt == stat.S_IFREG:
                compare_content_linux(fs, ip, p, a.st_size)
            if fmt in (stat.S_IFREG, stat.S_IFDIR):
                assert user_xattrs_os(p, False) == user_xattrs_xip(fs, ip, False), ip
    return count


def compare_content_linux(fs: xipfs.Filesystem, ip: str, p: str, size: int) -> None:
    """Contents equal: everywhere xipfs has blocks, and at sample offsets in its holes."""
    bs = fs.block_size
    offsets = {0, max(0, size - 10), size // 2, size // 3}
    with fs.open(ip, "rb", buffering=0) as f, open(p, "rb", buffering=0) as g:
        for lb, n, pb in fs.block_runs(ip):
            offsets.update({lb * bs, (lb + n) * bs - 1})
            if pb:
                for off in range(lb * bs, min(size, (lb + n) * bs), MiB):
                    k = min(MiB, size - off)
                    assert f.pread(k, off) == os.pread(g.fileno(), k, off), f"{ip} at {off}"
        for off in sorted(o for o in offsets if o < size):
            assert f.pread(64, off) == os.pread(g.fileno(), 64, off), f"{ip} at {off}"


@pytest.mark.root
@pytest.mark.parametrize(("bs", "isize"), [(1024, 128), (4096, 256)])
def test_linux_reads_what_xipfs_wrote(tmp: str, bs: int, isize: int, umask0: None) -> None:
    img = mkfs(os.path.join(tmp, "img"), "64M", bs=bs, isize=isize)
    with xipfs.open(img, "r+") as fs:
        build_everything(fs, ns_times=isize > 128)
    assert_fsck_clean(img)
    with LoopMount(img, os.path.join(tmp, "mnt"), ro=True) as mnt, xipfs.open(img) as fs:
        assert assert_same_as_linux(fs, mnt, ns=isize > 128) >= 19
        with open(os.path.join(mnt, "huge-sparse"), "rb") as f:
            f.seek(4 * GiB + 4097)
            assert f.read(13) == b"past four GiB"
        st = fs.stat("/dir/sub/blocks")
        if isize > 128:
            assert (st.st_atime_ns, st.st_mtime_ns) == (3 * 10**18 + 5, (2**33) * 10**9 + 123)


@pytest.mark.root
@pytest.mark.parametrize(("bs", "isize"), [(1024, 256), (4096, 128)])
def test_xipfs_reads_what_linux_wrote(tmp: str, bs: int, isize: int, umask0: None) -> None:
    img = mkfs(os.path.join(tmp, "img"), "64M", bs=bs, isize=isize)
    with xipfs.open(img, "r+") as fs:
        build_everything(fs, ns_times=isize > 128)
    with LoopMount(img, os.path.join(tmp, "mnt"), ro=False) as mnt:
        os.makedirs(os.path.join(mnt, "linux/a/b"))
        for i in range(40):
            with open(os.path.join(mnt, f"linux/a/f{i}"), "wb") as f:
                f.write(pattern(500 + i, i * 3001))
        with open(os.path.join(mnt, "linux/sparse"), "wb") as f:
            f.seek(5 * MiB)
            f.write(b"linux was here")
        os.symlink("a/f3", os.path.join(mnt, "linux/link"))
        os.symlink("a/" + "./" * 100 + "f4", os.path.join(mnt, "linux/slow-link"))
        os.link(os.path.join(mnt, "linux/a/f5"), os.path.join(mnt, "linux/b-hard"))
        os.setxattr(os.path.join(mnt, "linux/a/f6"), "user.linux", b"xattr from linux")
        os.rename(os.path.join(mnt, "dir/small"), os.path.join(mnt, "linux/moved-small"))
        os.unlink(os.path.join(mnt, "indirect-moved"))
        with open(os.path.join(mnt, "dir/sub/blocks"), "ab") as f:
            f.write(b"appended by linux")
        os.utime(os.path.join(mnt, "linux/a/f7"), ns=(1_500_000_000_123_456_789, 1_600_000_000_987_654_321))
        os.rmdir(os.path.join(mnt, "dir/sub/deeper"))
        os.unlink(os.path.join(mnt, "huge-sparse"))     # 6 GiB that cp would read through
        ref = os.path.join(tmp, "ref")
        os.mkdir(ref)
        run(["cp", "-a", mnt + "/.", ref])                # keeps hard links, xattrs, owners, nodes
        want_times = os.stat(os.path.join(mnt, "linux/a/f7"))
        with open(os.path.join(mnt, "dir/sub/blocks"), "rb") as f:
            blocks = f.read()
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        compare_trees(fs, os.path.join(tmp, "ref"), xattrs=True)
        st = fs.stat("/linux/a/f7")
        unit = 1 if isize > 128 else 10**9
        assert (st.st_atime_ns, st.st_mtime_ns) == (want_times.st_atime_ns // unit * unit,
                                                    want_times.st_mtime_ns // unit * unit)
        assert fs.read_bytes("/dir/sub/blocks") == blocks
        assert fs.getxattr("/linux/a/f6", "user.linux") == b"xattr from linux"
    # and xipfs goes on writing where Linux left off
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/linux/a/after", b"xipfs after linux")
        fs.unlink("/linux/a/f0")
        fs.rename("/linux/a", "/linux/b-dir")
        fs.setxattr("/linux/b-dir/f6", "user.more", b"1")
    assert_fsck_clean(img)


@pytest.mark.parametrize("xip", [True, False], ids=["xip", "pagecache"])
def test_whole_file_runs_follow_every_change(tmp: str, xip: bool) -> None:
    """Large reads and mappings use the runs of the whole file, kept once computed: filling a
    hole, truncating and growing again must each show in the next large read."""
    img = mkfs(os.path.join(tmp, "img"), "16M", bs=1024)       # 1 KiB blocks: 256 pointers a block
    size = 3 << 20                                               # past 4 indirect blocks' worth
    with xipfs.open(img, "r+", xip=xip) as fs:
        with fs.open("/f", "wb", buffering=0) as f:
            f.write(b"a" * (1 << 20))
            f.pwrite(b"c" * (1 << 20), 2 << 20)                  # a 1 MiB hole in the middle
        assert fs.read_bytes("/f") == b"a" * (1 << 20) + bytes(1 << 20) + b"c" * (1 << 20)
        with fs.open("/f", "r+b", buffering=0) as f:
            f.pwrite(b"b" * (1 << 20), 1 << 20)                  # the hole gets blocks
        assert fs.read_bytes("/f") == b"a" * (1 << 20) + b"b" * (1 << 20) + b"c" * (1 << 20)
        fs.truncate("/f", 1 << 20)
        fs.truncate("/f", size)                                  # grown again: a hole
        assert fs.read_bytes("/f") == b"a" * (1 << 20) + bytes(2 << 20)
        with fs.open("/f", "r+b", buffering=0) as f:
            f.pwrite(b"d" * (2 << 20), 1 << 20)
        assert fs.read_bytes("/f") == b"a" * (1 << 20) + b"d" * (2 << 20)
        fs.truncate("/f", 4 << 20)                               # grown with nothing freed
        assert fs.read_bytes("/f") == b"a" * (1 << 20) + b"d" * (2 << 20) + bytes(1 << 20)
    assert_fsck_clean(img)


@pytest.mark.parametrize("backups", [0, 1, 2])
def test_sparse_super2_backups_only_where_the_superblock_says(tmp: str, backups: int) -> None:
    """sparse_super2 keeps superblock and descriptor copies only in the (at most two) groups
    ``s_backup_bgs`` names: xipfs must neither write copies into other groups nor keep their
    blocks from files. Filling and thinning eight groups leaves the image clean."""
    img = mkfs(os.path.join(tmp, "img"), "64M", bs=1024,
               extra=("-O", "sparse_super2", "-E", f"num_backup_sb={backups}"))
    assert xipfs.check(img) == []
    with xipfs.open(img, "r+") as fs:
        n = 0
        while True:
            try:
                fs.write_bytes(f"/f{n}", pattern(n, 65536))
            except OSError as err:
                assert err.errno == errno.ENOSPC
                break
            n += 1
        for i in range(0, n, 3):
            fs.unlink(f"/f{i}")
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        for i in range(1, n, 3):
            assert fs.read_bytes(f"/f{i}") == pattern(i, 65536)
    assert xipfs.check(img) == []


@pytest.mark.parametrize(("feature", "writable"), [("stable_inodes", True), ("lazy_bg", False),
                                                  ("orphan_file", True)])
def test_compatible_features_xipfs_does_not_maintain_mean_read_only(tmp: str, feature: str,
                                                                    writable: bool) -> None:
    """A compatible feature names structures an old reader may ignore but a writer must keep
    right: xipfs writes only where it knows them all (an orphan file it leaves empty), and reads
    everything else."""
    if feature == "orphan_file":                 # it needs a journal: ext3 with the orphan file
        img = mkfs(os.path.join(tmp, "img"), "8M", bs=4096, fstype="ext3", extra=("-O", "orphan_file"))
    else:
        img = mkfs(os.path.join(tmp, "img"), "8M", bs=4096)
        debugfs_r(img, f"feature {feature}", write=True)
    with xipfs.open(img) as fs:
        assert fs.listdir("/") == ["lost+found"]
    if writable:
        with xipfs.open(img, "r+") as fs:
            fs.write_bytes("/x", b"x")
        assert_fsck_clean(img)
    else:
        with pytest.raises(OSError, match=f"read-only: compatible feature {feature}") as info:
            xipfs.open(img, "r+")
        assert info.value.errno == errno.EROFS


def _acl(*entries: tuple[int, int, int]) -> bytes:
    """A ``system.posix_acl_access`` value in the wire format ``os.getxattr`` gives."""
    import struct
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ANY_ID = 0xFFFFFFFF
PLAIN_ACL = _acl((1, 6, ANY_ID), (4, 4, ANY_ID), (0x20, 4, ANY_ID))                # u::rw g::r o::r
NAMED_ACL = _acl((1, 6, ANY_ID), (2, 6, 1000), (4, 4, ANY_ID), (0x10, 6, ANY_ID), (0x20, 4, ANY_ID))


@pytest.mark.parametrize("acl", [PLAIN_ACL, NAMED_ACL], ids=["plain", "named user and mask"])
def test_access_acl_and_mode_move_together_as_on_linux(tmp: str, acl: bytes) -> None:
    """Setting an access ACL sets the mode (a plain one is not kept); chmod rewrites the ACL's
    owner, mask (or group) and other entries. The kernel on tmpfs is the oracle."""
    ref = os.path.join(tmp, "ref")
    with open(ref, "wb"):
        pass
    try:
        os.setxattr(ref, "system.posix_acl_access", acl)
    except OSError as err:
        pytest.skip(f"tmpfs here keeps no POSIX ACLs: {err}")
    img = mkfs(os.path.join(tmp, "img"), "8M", bs=4096)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", b"x")
        fs.setxattr("/f", "system.posix_acl_access", acl)
        for mode in (None, 0o640, 0o600, 0o755):
            if mode is not None:
                os.chmod(ref, mode)
                fs.chmod("/f", mode)
            assert oct(fs.stat("/f").st_mode) == oct(os.stat(ref).st_mode)
            assert sorted(fs.listxattr("/f")) == sorted(os.listxattr(ref))
            if "system.posix_acl_access" in os.listxattr(ref):
                assert fs.getxattr("/f", "system.posix_acl_access") == \
                    os.getxattr(ref, "system.posix_acl_access")
    assert_fsck_clean(img)
