"""Write-path benchmarks: one big sequential write, many small files created, mkfs.

Each sample starts from a fresh image made untimed by ``xipfs.mkfs`` (and a fresh directory on
tmpfs for the kernel), so every figure includes block and inode allocation, not just copying.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from bench_read import Config
from common import MIB, Case, Row, Section, measure

import xipfs

CHUNK = MIB


def bench_seqwrite(root: str, cfg: Config) -> Section:
    size = cfg.big_bytes
    img = os.path.join(root, "write.ext2")
    out = os.path.join(root, "write-kernel.bin")
    chunk = memoryview(os.urandom(CHUNK))
    whole = memoryview(bytes(chunk) * (size // CHUNK))
    section = Section(f"4. Sequential write of a {size >> 20} MiB file: in one call, and {CHUNK >> 20} MiB "
                      "per call")

    def fresh(xip: bool | None, preallocate: bool = False) -> Any:
        def setup() -> Any:
            xipfs.mkfs(img, size + size // 8 + (64 << 20), preallocate=preallocate)
            return xipfs.open(img, "r+", xip=xip)
        return setup

    def ours(fs: Any) -> None:
        with fs.open("/big", "wb", buffering=0) as f:
            w = f.write
            for _ in range(size // CHUNK):
                w(chunk)

    def ours_one(fs: Any) -> None:
        with fs.open("/big", "wb", buffering=0) as f:
            f.write(whole)

    def done(fs: Any) -> None:
        runs = len(fs.block_runs("/big"))
        section.notes.append(f"runs of /big ({'XIP' if fs.is_xip else 'file device'}): {runs}") \
            if len(section.notes) < 2 else None
        fs.close()
        os.unlink(img)

    def kernel(_: Any) -> None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            w = os.write
            for _ in range(size // CHUNK):
                w(fd, chunk)
        finally:
            os.close(fd)

    def kernel_one(_: Any) -> None:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, whole)
        finally:
            os.close(fd)

    def kernel_done(_: Any) -> None:
        os.unlink(out)

    cases = [
        Case("xip write, one call", ours_one, size, "GiB/s", fresh(None), done),
        Case("os.write, one call, to a new file on tmpfs", kernel_one, size, "GiB/s", None, kernel_done),
        Case("xip write", ours, size, "GiB/s", fresh(None), done),
        Case("xip write, one call, preallocated image", ours_one, size, "GiB/s", fresh(None, True), done),
        Case("xip write, preallocated image", ours, size, "GiB/s", fresh(None, True), done),
        Case("file-device write (+ sync)", lambda fs: (ours(fs), fs.sync()), size, "GiB/s", fresh(False),
             done),
        Case("os.write to a new file on tmpfs", kernel, size, "GiB/s", None, kernel_done),
    ]
    m = measure(cases, cfg.repeat_big, warmup=1)
    base = m["os.write to a new file on tmpfs"]
    section.rows += [
        Row("sequential write, whole file in one call (XIP)", m["xip write, one call"],
            m["os.write, one call, to a new file on tmpfs"], 1.0),
        Row(f"sequential write, {CHUNK >> 20} MiB per call (XIP)", m["xip write"], base, 1.0),
        Row("sequential write, one call, preallocated image (XIP)",
            m["xip write, one call, preallocated image"], m["os.write, one call, to a new file on tmpfs"]),
        Row(f"sequential write, {CHUNK >> 20} MiB per call, preallocated image (XIP)",
            m["xip write, preallocated image"], base),
        Row("[file device] sequential write + sync", m["file-device write (+ sync)"], base),
    ]
    section.raw += list(m.values())
    return section


def bench_create(root: str, cfg: Config) -> Section:
    n = cfg.stat_files
    data = os.urandom(4096)
    img = os.path.join(root, "create.ext2")
    kdir = os.path.join(root, "create-kernel")
    section = Section(f"5. Creating {n} files of 4 KiB in one directory")

    def fresh(xip: bool | None) -> Any:
        def setup() -> Any:
            xipfs.mkfs(img, 256 << 20)
            fs = xipfs.open(img, "r+", xip=xip)
            fs.mkdir("/d")
            return fs
        return setup

    def ours(fs: Any) -> None:
        wb = fs.write_bytes
        for i in range(n):
            wb(f"/d/f{i}", data)

    def done(fs: Any) -> None:
        fs.close()
        os.unlink(img)

    def ksetup() -> None:
        os.mkdir(kdir)

    def kernel(_: Any) -> None:
        o, w, c = os.open, os.write, os.close
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        for i in range(n):
            fd = o(f"{kdir}/f{i}", flags, 0o644)
            w(fd, data)
            c(fd)

    cases = [
        Case("xip create+write+close", ours, n, "us/file", fresh(None), done),
        Case("file-device create+write+close", ours, n, "us/file", fresh(False), done),
        Case("os.open(O_CREAT)/os.write/os.close on tmpfs", kernel, n, "us/file", ksetup,
             lambda _: shutil.rmtree(kdir)),
    ]
    m = measure(cases, max(3, cfg.repeat_cold // 2), warmup=1)
    base = m["os.open(O_CREAT)/os.write/os.close on tmpfs"]
    section.rows += [
        Row("fs.write_bytes of new 4 KiB files (XIP)", m["xip create+write+close"], base, 0.5),
        Row("[file device] fs.write_bytes of new files", m["file-device create+write+close"], base),
    ]
    section.raw += list(m.values())
    return section


def bench_mkfs(root: str, cfg: Config) -> Section:
    size = 4 << 30 if cfg.big_bytes >= (1 << 30) else 1 << 30
    img = os.path.join(root, "mkfs.ext2")
    section = Section(f"6. mkfs of a {size >> 30} GiB image on /dev/shm")

    def gone(_: Any) -> None:
        if os.path.exists(img):
            os.unlink(img)

    def mke2fs(_: Any) -> None:
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-I", "256", "-O", "^resize_inode",
                        img, f"{size >> 20}M"], check=True, stdout=subprocess.DEVNULL)

    cases = [
        Case("xipfs.mkfs", lambda _: xipfs.mkfs(img, size), 1, "ms/call", None, gone),
        Case("mke2fs -t ext2 -b 4096 -I 256 -O ^resize_inode", mke2fs, 1, "ms/call", None, gone),
    ]
    m = measure(cases, cfg.repeat, warmup=1)
    section.rows.append(Row("xipfs.mkfs (same size and features as mke2fs)", m["xipfs.mkfs"],
                            m["mke2fs -t ext2 -b 4096 -I 256 -O ^resize_inode"], 1.0))
    section.raw += list(m.values())
    section.notes.append("xipfs.mkfs leaves inode tables to the fresh (sparse, zero) file; mke2fs "
                         "writes them. Both images pass e2fsck -fn.")
    return section


BENCHMARKS = {"seqwrite": bench_seqwrite, "create": bench_create, "mkfs": bench_mkfs}
