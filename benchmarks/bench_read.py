"""Read-path benchmarks: one big read, many small files, stat and listdir.

Each benchmark builds its source tree and its ext2 image (``mke2fs -d``) under the run's scratch
directory in /dev/shm, times ours against the kernel (or plain memcpy) side by side, and returns
a :class:`common.Section`. "Ours" is ``xipfs.open(image)`` on tmpfs, which maps the image (XIP);
the ``[file device]`` rows open the same image with ``xip=False`` (pread + the library's page
cache), the classic path, for comparison.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
from common import GIB, MIB, Case, Row, Section, faster, measure

import xipfs

BLOCK_SIZE = 4096
INODE_SIZE = 256
PATTERN = 16 * MIB  # the big file is one random 16 MiB block, tiled


@dataclass
class Config:
    big_bytes: int
    small_files: int
    small_size: int
    stat_files: int
    repeat_big: int
    repeat: int
    repeat_cold: int


def config(quick: bool, repeat: int | None = None) -> Config:
    if quick:
        cfg = Config(big_bytes=256 * MIB, small_files=500, small_size=4096, stat_files=2000,
                     repeat_big=5, repeat=7, repeat_cold=5)
    else:
        cfg = Config(big_bytes=GIB, small_files=2000, small_size=4096, stat_files=10_000,
                     repeat_big=7, repeat=15, repeat_cold=11)
    if repeat is not None:
        cfg.repeat_big = cfg.repeat = cfg.repeat_cold = repeat
    return cfg


# -- images ------------------------------------------------------------------------------------
def make_image(src: str, img: str, nfiles: int, data_blocks: int) -> None:
    """``mke2fs -t ext2 -b 4096 -d SRC IMG`` with room for ``nfiles`` files of ``data_blocks`` blocks."""
    inodes = nfiles + 64
    indirect = data_blocks // (BLOCK_SIZE // 4) + 16
    itable = inodes * INODE_SIZE // BLOCK_SIZE + 16
    dirs = nfiles * 32 // BLOCK_SIZE + 16
    blocks = int((data_blocks + indirect + itable + dirs) * 1.03) + 2048
    subprocess.run(
        ["mke2fs", "-q", "-F", "-t", "ext2", "-b", str(BLOCK_SIZE), "-I", str(INODE_SIZE),
         "-N", str(inodes), "-m", "0", "-d", src, img, str(blocks)],
        check=True, stdout=subprocess.DEVNULL)


def write_files(directory: str, contents: list[bytes]) -> list[str]:
    """Files ``f00000``, ``f00001``... in ``directory`` (created); their names."""
    os.makedirs(directory)
    names = [f"f{i:05d}" for i in range(len(contents))]
    for name, data in zip(names, contents, strict=True):
        fd = os.open(os.path.join(directory, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return names


def _close(fs: Any) -> None:
    fs.close()


# -- 1. big read -------------------------------------------------------------------------------
def bench_big(root: str, cfg: Config) -> Section:
    size = cfg.big_bytes
    assert size % PATTERN == 0
    src = os.path.join(root, "big-src")
    os.makedirs(src)
    path = os.path.join(src, "big.bin")
    img = os.path.join(root, "big.ext2")
    pattern = np.frombuffer(os.urandom(PATTERN), dtype=np.uint8)
    with open(path, "wb") as f:
        for _ in range(size // PATTERN):
            f.write(pattern)
    make_image(src, img, 1, size // BLOCK_SIZE)

    section = Section(f"1. Big read: one {size // MIB} MiB file of random data, warm")
    # Preallocated, pre-faulted buffers: every copy below writes into memory that is already mapped.
    dst = np.empty(size, dtype=np.uint8)
    dst.fill(0)
    msrc = np.empty(size, dtype=np.uint8)
    msrc.fill(1)
    chunk = np.empty(MIB, dtype=np.uint8)
    chunk.fill(0)
    mv_dst, mv_src = memoryview(dst), memoryview(msrc)

    def mv_copy(_: Any) -> None:
        mv_dst[:] = mv_src

    fsx = xipfs.open(img)
    fsf = xipfs.open(img, xip=False)
    # The floor for XIP without the library: one slice copy out of our own mapping of the image.
    img_fd = os.open(img, os.O_RDONLY)
    img_map = mmap.mmap(img_fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    mv_img = memoryview(img_map)[:size]

    def raw_map_copy(_: Any) -> None:
        mv_dst[:] = mv_img

    try:
        if not fsx.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP ({fsx!r}): 'ours' is not XIP here.")
        ipath = "/big.bin"
        runs = fsx.block_runs(ipath)

        def verify(what: str) -> None:
            for o in range(0, size, MIB):
                p = o % PATTERN
                if not np.array_equal(dst[o:o + MIB], pattern[p:p + MIB]):
                    raise AssertionError(f"{what}: wrong data at offset {o}")

        def readinto_one(fs: Any) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                with fs.open(ipath, "rb", buffering=0) as f:
                    if f.readinto(dst) != size:
                        raise AssertionError("short readinto")
            return run

        def kernel_one(_: Any) -> None:
            with open(path, "rb", buffering=0) as f:
                if f.readinto(dst) != size:
                    raise AssertionError("short readinto")

        def chunked(opener: Callable[[], Any]) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                total = 0
                with opener() as f:
                    readinto = f.readinto
                    while True:
                        n = readinto(chunk)
                        if not n:
                            break
                        total += n
                if total != size:
                    raise AssertionError(f"chunked read got {total} bytes")
            return run

        # Correctness first (untimed): each path must deliver the file's bytes.
        for name, fn in (("xip", readinto_one(fsx)), ("file device", readinto_one(fsf)),
                         ("kernel", kernel_one)):
            dst.fill(0)
            fn(None)
            verify(name)

        cases = [
            Case("numpy.copyto", lambda _: np.copyto(dst, msrc), size, "GiB/s"),
            Case("memoryview dst[:] = src", mv_copy, size, "GiB/s"),
            Case("raw mmap of the image, one slice copy", raw_map_copy, size, "GiB/s"),
            Case("xip readinto", readinto_one(fsx), size, "GiB/s"),
            Case("kernel readinto (tmpfs)", kernel_one, size, "GiB/s"),
            Case("file-device readinto", readinto_one(fsf), size, "GiB/s"),
            Case("xip 1 MiB chunks", chunked(lambda: fsx.open(ipath, "rb", buffering=0)), size, "GiB/s"),
            Case("kernel 1 MiB chunks (tmpfs)", chunked(partial(open, path, "rb", buffering=0)), size,
                 "GiB/s"),
            Case("file-device 1 MiB chunks", chunked(lambda: fsf.open(ipath, "rb", buffering=0)), size,
                 "GiB/s"),
        ]
        m = measure(cases, cfg.repeat_big, warmup=1)
        memcpy = faster(m["numpy.copyto"], m["memoryview dst[:] = src"])
        section.rows += [
            Row("readinto, whole file in one call (XIP) vs memcpy", m["xip readinto"], memcpy, 0.9),
            Row("readinto, whole file in one call (XIP) vs kernel", m["xip readinto"],
                m["kernel readinto (tmpfs)"], 1.0),
            Row("[file device] readinto, whole file in one call", m["file-device readinto"],
                m["kernel readinto (tmpfs)"]),
            Row(f"readinto (XIP: {len(runs)} run copies) vs one slice copy out of a raw mmap of the image",
                m["xip readinto"], m["raw mmap of the image, one slice copy"]),
            Row("readinto, 1 MiB chunks into a reused 1 MiB buffer (XIP)", m["xip 1 MiB chunks"],
                m["kernel 1 MiB chunks (tmpfs)"], 1.0),
            Row("[file device] readinto, 1 MiB chunks", m["file-device 1 MiB chunks"],
                m["kernel 1 MiB chunks (tmpfs)"]),
        ]
        section.raw += list(m.values())
        section.notes.append(
            f"The file is {len(runs)} run(s) of contiguous blocks in the image (mke2fs -d layout); "
            f"memcpy baseline = the faster median of numpy.copyto and memoryview slice assignment "
            f"({memcpy.name}). Kernel rows read {path} (the tmpfs source file).")
    finally:
        mv_img.release()
        img_map.close()
        os.close(img_fd)
        fsx.close()
        fsf.close()
        os.unlink(img)
        shutil.rmtree(src)
    return section


#: Issue 16's target for the first touch after xipfs.open (the kernel has no cold state on tmpfs).
FIRST_TOUCH = 0.8

# -- 2. small files ----------------------------------------------------------------------------
def bench_small(root: str, cfg: Config) -> Section:
    n, fsize = cfg.small_files, cfg.small_size
    src = os.path.join(root, "small-src")
    img = os.path.join(root, "small.ext2")
    contents = [os.urandom(fsize) for _ in range(n)]
    names = write_files(os.path.join(src, "small"), contents)
    make_image(src, img, n, n * -(-fsize // BLOCK_SIZE))
    ipaths = [f"/small/{name}" for name in names]
    spaths = [os.path.join(src, "small", name) for name in names]

    section = Section(f"2. Small files: {n} files of {fsize} bytes in one directory")
    fsx = xipfs.open(img)
    fsf = xipfs.open(img, xip=False)
    try:
        if not fsx.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP ({fsx!r}).")
        for fs in (fsx, fsf):  # correctness (untimed), and the warm-up pass for the warm rows
            for p, data in zip(ipaths, contents, strict=True):
                with fs.open(p, "rb", buffering=0) as f:
                    if f.read() != data:
                        raise AssertionError(f"{p}: wrong content")
                if fs.read_bytes(p) != data:
                    raise AssertionError(f"{p}: wrong content (read_bytes)")

        def open_read_close(fs: Any) -> None:
            fs_open = fs.open
            for p in ipaths:
                f = fs_open(p, "rb", buffering=0)
                f.read()
                f.close()

        def read_bytes(fs: Any) -> None:
            rb = fs.read_bytes
            for p in ipaths:
                rb(p)

        def kernel(_: Any) -> None:
            o, r, c, flags = os.open, os.read, os.close, os.O_RDONLY
            for p in spaths:
                fd = o(p, flags)
                r(fd, fsize)
                c(fd)

        warm = [
            Case("xip open/read/close", lambda _: open_read_close(fsx), n, "us/file"),
            Case("xip read_bytes", lambda _: read_bytes(fsx), n, "us/file"),
            Case("file-device open/read/close", lambda _: open_read_close(fsf), n, "us/file"),
            Case("file-device read_bytes", lambda _: read_bytes(fsf), n, "us/file"),
            Case("os.open/os.read/os.close (tmpfs)", kernel, n, "us/file"),
        ]
        w = measure(warm, cfg.repeat, warmup=1)

        def fresh(xip: bool | None) -> Callable[[], Any]:
            return lambda: xipfs.open(img, xip=xip)

        cold = [
            Case("cold xip open/read/close", open_read_close, n, "us/file", fresh(None), _close),
            Case("cold xip read_bytes", read_bytes, n, "us/file", fresh(None), _close),
            Case("cold file-device open/read/close", open_read_close, n, "us/file", fresh(False), _close),
            Case("cold file-device read_bytes", read_bytes, n, "us/file", fresh(False), _close),
            Case("os.open/os.read/os.close (tmpfs), same rounds", kernel, n, "us/file"),
            Case("xipfs.open() + close (XIP)", lambda _: xipfs.open(img).close(), 1, "us/call"),
            Case("xipfs.open() + close (file device)", lambda _: xipfs.open(img, xip=False).close(), 1,
                 "us/call"),
        ]
        c = measure(cold, cfg.repeat_cold, warmup=1)
        kw, kc = w["os.open/os.read/os.close (tmpfs)"], c["os.open/os.read/os.close (tmpfs), same rounds"]
        section.rows += [
            Row("warm: fs.open(p, 'rb', buffering=0); f.read(); f.close() (XIP)", w["xip open/read/close"],
                kw, 1.0),
            Row("warm: fs.read_bytes(p) (XIP)", w["xip read_bytes"], kw, 1.0),
            Row("[file device] warm: open/read/close", w["file-device open/read/close"], kw),
            Row("[file device] warm: read_bytes", w["file-device read_bytes"], kw),
            Row("cold (first pass, fresh fs): open/read/close (XIP)", c["cold xip open/read/close"], kc,
                FIRST_TOUCH),
            Row("cold (first pass, fresh fs): read_bytes (XIP)", c["cold xip read_bytes"], kc, FIRST_TOUCH),
            Row("[file device] cold: open/read/close", c["cold file-device open/read/close"], kc),
            Row("[file device] cold: read_bytes", c["cold file-device read_bytes"], kc),
        ]
        section.raw += list(w.values()) + list(c.values())
        section.notes.append(
            "Cold = the first pass over the files on a Filesystem opened just before (the open is not "
            "timed; its cost is in the raw figures). The kernel baseline has no cold state on tmpfs "
            "(dentries and pages never leave memory), so cold rows compare with the kernel pass "
            "timed in the same rounds.")
    finally:
        fsx.close()
        fsf.close()
        os.unlink(img)
        shutil.rmtree(src)
    return section


# -- 3. stat and listdir -----------------------------------------------------------------------
def bench_stat(root: str, cfg: Config) -> Section:
    n = cfg.stat_files
    src = os.path.join(root, "stat-src")
    img = os.path.join(root, "stat.ext2")
    sdir = os.path.join(src, "many")
    names = write_files(sdir, [os.urandom(64) for _ in range(n)])
    make_image(src, img, n, n)
    ipaths = [f"/many/{name}" for name in names]
    spaths = [os.path.join(sdir, name) for name in names]

    section = Section(f"3. stat and listdir: {n} files in one directory")
    fsx = xipfs.open(img)
    fsf = xipfs.open(img, xip=False)
    try:
        if not fsx.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP ({fsx!r}).")
        for fs in (fsx, fsf):  # correctness (untimed), and the warm-up for the warm rows
            if sorted(fs.listdir("/many")) != names:
                raise AssertionError("listdir differs from the source directory")
            for p in ipaths:
                st = fs.stat(p)
                if st.st_size != 64 or not (st.st_mode & 0o100000):
                    raise AssertionError(f"{p}: wrong stat {st}")

        def stat_all(fs: Any) -> None:
            st = fs.stat
            for p in ipaths:
                st(p)

        def os_stat_all(_: Any) -> None:
            st = os.stat
            for p in spaths:
                st(p)

        def fresh(xip: bool | None) -> Callable[[], Any]:
            return lambda: xipfs.open(img, xip=xip)

        calls = 10  # listdir calls per warm sample
        warm = [
            Case("xip fs.stat", lambda _: stat_all(fsx), n, "us/file"),
            Case("file-device fs.stat", lambda _: stat_all(fsf), n, "us/file"),
            Case("os.stat (tmpfs)", os_stat_all, n, "us/file"),
            Case("xip fs.listdir", lambda _: fsx.listdir("/many"), 1, "ms/call", number=calls),
            Case("file-device fs.listdir", lambda _: fsf.listdir("/many"), 1, "ms/call", number=calls),
            Case("os.listdir (tmpfs)", lambda _: os.listdir(sdir), 1, "ms/call", number=calls),
        ]
        w = measure(warm, cfg.repeat, warmup=1)
        cold = [
            Case("cold xip fs.stat", stat_all, n, "us/file", fresh(None), _close),
            Case("cold file-device fs.stat", stat_all, n, "us/file", fresh(False), _close),
            Case("os.stat (tmpfs), same rounds", os_stat_all, n, "us/file"),
            Case("cold xip fs.listdir", lambda fs: fs.listdir("/many"), 1, "ms/call", fresh(None), _close),
            Case("cold file-device fs.listdir", lambda fs: fs.listdir("/many"), 1, "ms/call", fresh(False),
                 _close),
            Case("os.listdir (tmpfs), same rounds", lambda _: os.listdir(sdir), 1, "ms/call"),
        ]
        c = measure(cold, cfg.repeat_cold, warmup=1)
        section.rows += [
            Row("warm: fs.stat(p) (XIP)", w["xip fs.stat"], w["os.stat (tmpfs)"], 2.0),
            Row("[file device] warm: fs.stat(p)", w["file-device fs.stat"], w["os.stat (tmpfs)"]),
            Row("cold (first call, fresh fs): fs.stat(p) (XIP)", c["cold xip fs.stat"],
                c["os.stat (tmpfs), same rounds"], FIRST_TOUCH),
            Row("[file device] cold: fs.stat(p)", c["cold file-device fs.stat"],
                c["os.stat (tmpfs), same rounds"]),
            Row(f"warm: fs.listdir of {n} entries (XIP)", w["xip fs.listdir"], w["os.listdir (tmpfs)"], 1.0),
            Row("[file device] warm: fs.listdir", w["file-device fs.listdir"], w["os.listdir (tmpfs)"]),
            Row("cold (first call, fresh fs): fs.listdir (XIP)", c["cold xip fs.listdir"],
                c["os.listdir (tmpfs), same rounds"], FIRST_TOUCH),
            Row("[file device] cold: fs.listdir", c["cold file-device fs.listdir"],
                c["os.listdir (tmpfs), same rounds"]),
        ]
        section.raw += list(w.values()) + list(c.values())
        section.notes.append(
            "Cold stat = the first fs.stat of every file on a fresh Filesystem (includes indexing the "
            "directory and decoding each inode); cold listdir = the first call on a fresh Filesystem. "
            "tmpfs has no cold state, so the kernel figures come from the same rounds.")
    finally:
        fsx.close()
        fsf.close()
        os.unlink(img)
        shutil.rmtree(src)
    return section


BENCHMARKS: dict[str, Callable[[str, Config], Section]] = {
    "big": bench_big,
    "small": bench_small,
    "stat": bench_stat,
}
