"""mkfs -t ext4 benchmark: ``xipfs.mkfs(..., fs_type="ext4")`` against ``mke2fs -t ext4``.

Both make a new image file on /dev/shm (it does not exist before a sample; removed after it,
untimed), with the same features: e2fsprogs 1.47's ext4 default (``-O orphan_file,
metadata_csum_seed`` is passed to mke2fs, which some distributions' mke2fs.conf leave out), the
same size and so the same geometry, journal and orphan file. As bench_write's ext2 mkfs row,
ours is the library call (no interpreter start-up) and the baseline the mke2fs process. Both
skip the zero blocks of the fresh file: mke2fs discards it and lazily skips the inode tables and
the journal, xipfs writes only nonzero blocks. The images are block for block the same (apart
from times, ``s_kbytes_written`` and the checksums over them; tests/test_mkfs_ext4.py).

Rows: a 4 GiB image (target: at least as fast as mke2fs), and for information 256 MiB (1 KiB
blocks, the "small" type) and 1 GiB.

Standalone: ``.venv/bin/python benchmarks/bench_mkfs4.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from common import GIB, MIB, Case, Row, Section, measure

import xipfs

TARGET = 1.0
MKE2FS = ["mke2fs", "-q", "-F", "-t", "ext4", "-O", "orphan_file,metadata_csum_seed"]


def bench_mkfs4(root: str, cfg: Any) -> Section:
    img = os.path.join(root, "mkfs4.img")
    big = 4 * GIB if cfg.big_bytes >= GIB else GIB
    sizes = [big, 256 * MIB] + ([GIB] if big != GIB else [])
    section = Section(f"21. mkfs -t ext4 of a {big >> 30} GiB image on /dev/shm (and smaller): "
                      "xipfs.mkfs against mke2fs -t ext4")

    def gone(_: Any) -> None:
        if os.path.exists(img):
            os.unlink(img)

    def ours(size: int) -> Any:
        return lambda _: xipfs.mkfs(img, size, fs_type="ext4")

    def mke2fs(size: int) -> Any:
        return lambda _: subprocess.run([*MKE2FS, img, f"{size >> 20}M"], check=True,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    cases = []
    for size in sizes:
        cases.append(Case(f"xipfs.mkfs ext4 {size >> 20} MiB", ours(size), 1, "ms/call", None, gone))
        cases.append(Case(f"mke2fs -t ext4 {size >> 20} MiB", mke2fs(size), 1, "ms/call", None, gone))
    m = measure(cases, max(cfg.repeat, 9), warmup=1)
    for size in sizes:
        label = f"xipfs.mkfs(fs_type='ext4') of {size >> 20} MiB vs mke2fs -t ext4"
        section.rows.append(Row(label, m[f"xipfs.mkfs ext4 {size >> 20} MiB"],
                                m[f"mke2fs -t ext4 {size >> 20} MiB"], TARGET if size == big else None))
    section.raw += list(m.values())
    section.notes.append("same features, geometry and layout on both sides; the fresh file's zero blocks are "
                         "written by neither; mke2fs pays its process start-up, the library call does not.")
    return section


BENCHMARKS = {"mkfs4": bench_mkfs4}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    import argparse
    import tempfile

    from bench_read import config
    from common import print_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir="/dev/shm") as scratch:
        print_section(bench_mkfs4(scratch, config(args.quick, args.repeat)))
    sys.exit(0)
