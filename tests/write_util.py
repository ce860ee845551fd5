"""Helpers for the write-path tests: private directories, calling xipfs and os side by side, and
comparing an image with a real tree (e2fsprogs are in ``e2fs.py``).

Everything here is independent of ``conftest.py``: the write tests make their own images in
their own directory under /dev/shm and remove it when they finish.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

from e2fs import SHM

IS_ROOT = os.geteuid() == 0
CHUNK = 1 << 20


@contextlib.contextmanager
def shm_dir(prefix: str) -> Iterator[str]:
    """A private directory under /dev/shm, removed afterwards whatever happened."""
    path = tempfile.mkdtemp(prefix=prefix, dir=SHM)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


# -- calling xipfs and os side by side ----------------------------------------------------------
def err_key(err: BaseException | None) -> tuple[str, int | None] | None:
    """What must match between xipfs and os for a failed call: the builtin class and errno."""
    if err is None:
        return None
    cls = type(err)
    for base in cls.__mro__:
        if base.__module__ == "builtins":
            cls = base
            break
    return cls.__name__, getattr(err, "errno", None)


def attempt(call: Callable[[], Any]) -> tuple[Any, OSError | None]:
    try:
        return call(), None
    except OSError as err:
        return None, err


def is_enospc(err: BaseException | None) -> bool:
    return isinstance(err, OSError) and err.errno == errno.ENOSPC


# -- reading a file sparsely --------------------------------------------------------------------
def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(r for r in ranges if r[1] > r[0]):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def os_data_ranges(path: str) -> list[tuple[int, int]]:
    """Byte ranges of a real file that may hold data (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        size = os.fstat(fd).st_size
        out = []
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, min(end, size)))
            pos = end
        return out
    finally:
        os.close(fd)


def xip_data_ranges(fs: Any, path: str, size: int) -> list[tuple[int, int]]:
    """Byte ranges of an image file that are mapped to blocks (``fs.block_runs``)."""
    bs = fs.block_size
    return [(lb * bs, min(size, (lb + n) * bs)) for lb, n, pb in fs.block_runs(path) if pb]


def compare_file_data(fs: Any, path: str, ref: str, size: int) -> None:
    """Contents equal, reading only where either side has data (holes are zeros on both)."""
    ranges = merge_ranges(os_data_ranges(ref) + xip_data_ranges(fs, path, size))
    fd = os.open(ref, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        with fs.open(path, "rb", buffering=0) as f:
            for a, b in ranges:
                for off in range(a, b, CHUNK):
                    n = min(CHUNK, b - off)
                    mine = f.pread(n, off)
                    theirs = os.pread(fd, n, off)
                    if mine != theirs:
                        i = next((k for k in range(min(len(mine), len(theirs)))
                                  if mine[k] != theirs[k]), min(len(mine), len(theirs)))
                        raise AssertionError(
                            f"{path}: contents differ at byte {off + i} (xipfs {mine[i:i + 16]!r}, "
                            f"os {theirs[i:i + 16]!r}; xipfs read {len(mine)} of {n})")
    finally:
        os.close(fd)


def read_xip_sparse(fs: Any, path: str) -> tuple[int, list[tuple[int, bytes]]]:
    """(size, [(offset, data) of the mapped ranges]) of an image file."""
    size = fs.stat(path).st_size
    out = []
    with fs.open(path, "rb", buffering=0) as f:
        for a, b in xip_data_ranges(fs, path, size):
            out.append((a, f.pread(b - a, a)))
    return size, out


def copy_to_ref(fs: Any, path: str, ref: str) -> None:
    """Make the real file ``ref`` hold what the image file ``path`` holds (after ENOSPC)."""
    size, parts = read_xip_sparse(fs, path)
    fd = os.open(ref, os.O_WRONLY)
    try:
        os.ftruncate(fd, 0)
        for off, data in parts:
            os.pwrite(fd, data, off)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


# -- whole trees --------------------------------------------------------------------------------
def user_xattrs_os(path: str, follow: bool) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError as err:
        if err.errno in (errno.ENOTSUP, errno.EPERM):
            return {}
        raise
    return {n: os.getxattr(path, n, follow_symlinks=follow) for n in names if n.startswith("user.")}


def user_xattrs_xip(fs: Any, path: str, follow: bool) -> dict[str, bytes]:
    names = fs.listxattr(path, follow_symlinks=follow)
    return {n: fs.getxattr(path, n, follow_symlinks=follow) for n in names if n.startswith("user.")}


def compare_trees(fs: Any, ref: str, *, times: bool = False, ns: bool = True,
                  xattrs: bool = True) -> int:
    """Assert the image tree equals the real tree ``ref``; returns the number of entries.

    Names, types, permission bits, link counts, owners, sizes of non-directories, contents,
    symlink targets and user.* xattrs. ``times`` adds atime/mtime (to the second unless ``ns``).
    """
    count = 0
    stack = [""]
    while stack:
        rel = stack.pop()
        ipath = rel or "/"
        rpath = os.path.join(ref, rel.lstrip("/")) if rel else ref
        mine = sorted(fs.listdir(ipath))
        theirs = sorted(n for n in os.listdir(rpath) if not (rel == "" and n == "lost+found"))
        mine = [n for n in mine if not (rel == "" and n == "lost+found")]
        assert mine == theirs, f"directory {ipath}: xipfs {mine} != os {theirs}"
        for name in theirs:
            count += 1
            ip = f"{rel}/{name}"
            rp = os.path.join(rpath, name)
            a = fs.lstat(ip)
            b = os.lstat(rp)
            what = f"{ip}: xipfs {stat.filemode(a.st_mode)} nlink={a.st_nlink} uid={a.st_uid} " \
                   f"gid={a.st_gid} size={a.st_size}; os {stat.filemode(b.st_mode)} " \
                   f"nlink={b.st_nlink} uid={b.st_uid} gid={b.st_gid} size={b.st_size}"
            assert stat.S_IFMT(a.st_mode) == stat.S_IFMT(b.st_mode), what
            assert stat.S_IMODE(a.st_mode) == stat.S_IMODE(b.st_mode), what
            assert a.st_nlink == b.st_nlink, what
            assert (a.st_uid, a.st_gid) == (b.st_uid, b.st_gid), what
            if times:
                for field in ("st_atime_ns", "st_mtime_ns"):
                    x, y = getattr(a, field), getattr(b, field)
                    if not ns:
                        y = y // 1_000_000_000 * 1_000_000_000
                    assert x == y, f"{ip}: {field} xipfs {x} != os {y}"
            fmt = stat.S_IFMT(b.st_mode)
            if fmt == stat.S_IFDIR:
                stack.append(ip)
            else:
                assert a.st_size == b.st_size, what
            if fmt == stat.S_IFLNK:
                assert fs.readlink(ip) == os.readlink(rp), ip
            elif fmt == stat.S_IFREG:
                compare_file_data(fs, ip, rp, b.st_size)
            if xattrs and fmt in (stat.S_IFREG, stat.S_IFDIR):
                assert user_xattrs_xip(fs, ip, False) == user_xattrs_os(rp, False), f"{ip}: xattrs"
    return count


def snapshot_xip(fs: Any, top: str = "/") -> dict[str, tuple]:
    """{path: (mode, nlink, uid, gid, size, content-or-target, xattrs)} of an image tree."""
    out: dict[str, tuple] = {}
    for d, dirs, files in fs.walk(top):
        for name in dirs + files:
            p = (d.rstrip("/") + "/" + name)
            st = fs.lstat(p)
            fmt = stat.S_IFMT(st.st_mode)
            body: Any = None
            if fmt == stat.S_IFREG:
                body = fs.read_bytes(p)
            elif fmt == stat.S_IFLNK:
                body = fs.readlink(p)
            out[p] = (st.st_mode, st.st_nlink, st.st_uid, st.st_gid,
                      st.st_size if fmt != stat.S_IFDIR else None, body,
                      user_xattrs_xip(fs, p, False) if fmt in (stat.S_IFREG, stat.S_IFDIR) else {})
    return out
