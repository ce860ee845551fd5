"""ext4 write benchmarks (issue 15): the ext2 write rows on ext4, side by side in one run.

Each sample starts from a fresh image made (untimed) by ``xipfs.mkfs``, as ext2 or as ext4 (what
``mke2fs -t ext4`` makes: extents, 64bit, flex_bg, metadata checksums), both with 4 KiB blocks,
and does the same work on both: a 1 GiB file written in one call, 10,000 files of 4 KiB
created in one directory, and a 1 GiB ``fallocate`` (ext4: unwritten extents, nothing
written; ext2: zeroed blocks), the last also against ``os.posix_fallocate`` of a file on the
same tmpfs.
Writing ext4 is switched on for this process (``XIPFS_EXT4_WRITE``'s masks); the target is
"within 15 % of ext2" (ratio >= 0.87).

Standalone: ``.venv/bin/python benchmarks/bench_ext4write.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from bench_read import Config
from common import Case, Row, Section, measure

import xipfs
from xipfs.extfs import layout as L

TARGET = 1 / 1.15


def _writable_ext4() -> None:
    L.INCOMPAT_WRITABLE |= L.EXT4_INCOMPAT_WRITABLE
    L.RO_COMPAT_SUPPORTED |= L.EXT4_RO_COMPAT_WRITABLE


def bench_ext4write(root: str, cfg: Config) -> Section:
    _writable_ext4()
    size = cfg.big_bytes
    whole = memoryview(os.urandom(1 << 20) * (size >> 20))
    data = os.urandom(4096)
    n = cfg.stat_files
    img = os.path.join(root, "w.img")
    section = Section(f"22. Writing ext4 against ext2: a {size >> 20} MiB file in one call, {n} files "
                      f"of 4 KiB, a {size >> 20} MiB fallocate")

    def fresh(fs_type: str, image_size: int, mkdir: bool = False) -> Any:
        def setup() -> Any:
            xipfs.mkfs(img, image_size, fs_type=fs_type, block_size=4096)
            fs = xipfs.open(img, "r+")
            if mkdir:
                fs.mkdir("/d")
            return fs
        return setup

    def one_call(fs: Any) -> None:
        with fs.open("/big", "wb", buffering=0) as f:
            f.write(whole)

    def create(fs: Any) -> None:
        wb = fs.write_bytes
        for i in range(n):
            wb(f"/d/f{i}", data)

    def falloc(fs: Any) -> None:
        with fs.open("/alloc", "wb", buffering=0) as f:
            f.fallocate(0, size)

    def os_setup() -> int:
        return os.open(os.path.join(root, "alloc"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)

    def os_falloc(fd: int) -> None:
        os.posix_fallocate(fd, 0, size)

    def os_done(fd: int) -> None:
        os.close(fd)
        os.unlink(os.path.join(root, "alloc"))

    def done(fs: Any) -> None:
        fs.close()
        os.unlink(img)

    big = size + size // 8 + (64 << 20)
    cases = [
        Case("ext4: write, one call", one_call, size, "GiB/s", fresh("ext4", big), done),
        Case("ext2: write, one call", one_call, size, "GiB/s", fresh("ext2", big), done),
        Case("ext4: write_bytes of new 4 KiB files", create, n, "us/file", fresh("ext4", 256 << 20, True),
             done),
        Case("ext2: write_bytes of new 4 KiB files", create, n, "us/file", fresh("ext2", 256 << 20, True),
             done),
        Case("ext4: fallocate (unwritten extents)", falloc, size, "GiB/s", fresh("ext4", big), done),
        Case("ext2: fallocate (zeroed blocks)", falloc, size, "GiB/s", fresh("ext2", big), done),
        Case("os.posix_fallocate on tmpfs", os_falloc, size, "GiB/s", os_setup, os_done),
    ]
    m = measure(cases, max(3, cfg.repeat_cold // 2), warmup=1)
    section.rows += [
        Row("sequential write, one call: ext4 vs ext2 (XIP)", m["ext4: write, one call"],
            m["ext2: write, one call"], TARGET),
        Row("fs.write_bytes of new 4 KiB files: ext4 vs ext2 (XIP)",
            m["ext4: write_bytes of new 4 KiB files"], m["ext2: write_bytes of new 4 KiB files"], TARGET),
        Row("f.fallocate of 1 GiB: ext4 (unwritten extents) vs ext2 (zeroed blocks)",
            m["ext4: fallocate (unwritten extents)"], m["ext2: fallocate (zeroed blocks)"]),
        Row("f.fallocate of 1 GiB on ext4 vs os.posix_fallocate on tmpfs",
            m["ext4: fallocate (unwritten extents)"], m["os.posix_fallocate on tmpfs"]),
    ]
    section.raw += list(m.values())
    section.notes.append("target: within 15 % of the same row on ext2 (ratio >= 0.87); ext4 keeps "
                         "checksums of every inode, directory block, descriptor and bitmap it changes.")
    return section


BENCHMARKS = {"ext4write": bench_ext4write}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "ext4write", *sys.argv[1:]]))
