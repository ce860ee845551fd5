"""Pack as ext4 benchmark: ``xipfs.pack(..., fs_type="ext4")`` of the standard library tree against
``mke2fs -t ext4 -d``.

Both build an image of the same size (4 KiB blocks) from the same tree on tmpfs into a new file
in /dev/shm; the file is removed (untimed) after each sample. Both make the same filesystem:
e2fsprogs 1.47's ext4 defaults (``-O orphan_file,metadata_csum_seed`` is passed to mke2fs, which
some distributions' mke2fs.conf leave out) with ``-m 0`` as pack makes it, so the same geometry,
journal and orphan file. Both images pass e2fsck -fn (checked once).

Rows: the library call against the mke2fs process (target: at least as fast), and the command
``xipfs pack -t ext4`` in a fresh process (interpreter start-up and imports from cached bytecode
included, as a user's shell runs it) against the same mke2fs command; measured round-robin.

Standalone: ``.venv/bin/python benchmarks/bench_pack4.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from common import Case, Row, Section, machine_speed, measure
from stdlib_tree import command_env, image_size, stdlib_tree, xipfs_command

import xipfs

TARGET = 1.0
MKE2FS = ["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0", "-O", "orphan_file,metadata_csum_seed"]


def bench_pack4(root: str, cfg: Any) -> Section:
    src, entries, data = stdlib_tree(root)
    size = image_size(data, entries)
    ours_img = os.path.join(root, "pack4-xipfs.ext4")
    base_img = os.path.join(root, "pack4-mke2fs.ext4")
    section = Section(f"22. Pack the standard library ({entries} entries, {data >> 20} MiB) as ext4 into a "
                      f"{size >> 20} MiB image on /dev/shm")

    def gone(path: str) -> Any:
        def teardown(_: Any) -> None:
            if os.path.exists(path):
                os.unlink(path)
        return teardown

    def mke2fs(_: Any = None) -> None:
        subprocess.run([*MKE2FS, "-d", src, base_img, f"{size >> 10}k"], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def ours(_: Any = None) -> None:
        xipfs.pack(src, ours_img, size=size, fs_type="ext4")

    command = [*xipfs_command(), "-q", "pack", "-t", "ext4", "--size", f"{size >> 10}K", src, ours_img]
    env = command_env(root)

    def ours_command(_: Any = None) -> None:
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)

    for build, img in ((ours, ours_img), (mke2fs, base_img), (ours_command, ours_img)):
        build()
        fsck = subprocess.run(["e2fsck", "-fn", img], capture_output=True, text=True)
        if fsck.returncode:
            raise RuntimeError(f"e2fsck -fn {img}: {fsck.stdout[-500:]}")
        os.unlink(img)
    auto = xipfs.pack(src, ours_img, fs_type="ext4")
    section.notes.append(f"pack -t ext4 with size=None (the tree plus 10 %) makes {auto.size >> 20} MiB; "
                         f"{auto.files} files, {auto.dirs} "
                         f"directories, {auto.symlinks} symlinks.")
    os.unlink(ours_img)
    repeat = max(5, cfg.repeat // 2)
    cases = [
        Case("xipfs.pack ext4", ours, data, "MiB/s", None, gone(ours_img)),
        Case("xipfs pack -t ext4 (command)", ours_command, data, "MiB/s", None, gone(ours_img)),
        Case("mke2fs -t ext4 -b 4096 -d", mke2fs, data, "MiB/s", None, gone(base_img)),
    ]
    m = measure(cases, repeat, warmup=1)
    base = m["mke2fs -t ext4 -b 4096 -d"]
    section.rows.append(Row("xipfs.pack(fs_type='ext4') (same tree, same size)", m["xipfs.pack ext4"], base,
                            TARGET))
    section.rows.append(Row("xipfs pack -t ext4, the command (a fresh process)",
                            m["xipfs pack -t ext4 (command)"], base, TARGET))
    section.raw += list(m.values())
    section.notes.append("same features, geometry, journal and orphan file on both sides; the library call "
                         "pays no process start-up, the command row does (bytecode cached, as in a user's "
                         "shell).")
    section.notes.append(f"machine: {machine_speed()}")
    return section


BENCHMARKS = {"pack4": bench_pack4}


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
        print_section(bench_pack4(scratch, config(args.quick, args.repeat)))
    sys.exit(0)
