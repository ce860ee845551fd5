"""Pack benchmark: ``xipfs.pack`` of the standard library tree against ``mke2fs -d``.

Both build an image of the same size from the same tree on tmpfs into a new file in /dev/shm;
the file is removed (untimed) after each sample. Both images pass e2fsck -fn (checked once).

Rows: the library call against the mke2fs process, and the command ``xipfs pack`` in a fresh
process (interpreter start-up and imports from cached bytecode included, as a user's shell
runs it) against the same mke2fs command; all three measured round-robin in one run.

Standalone: ``.venv/bin/python benchmarks/bench_pack.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from bench_read import Config
from common import Case, Row, Section, machine_speed, measure
from stdlib_tree import command_env, image_size, mke2fs, stdlib_tree, xipfs_command

import xipfs

TARGET = 1.0


def bench_pack(root: str, cfg: Config) -> Section:
    src, entries, data = stdlib_tree(root)
    size = image_size(data, entries)
    ours_img = os.path.join(root, "pack-xipfs.extfs")
    base_img = os.path.join(root, "pack-mke2fs.ext2")
    section = Section(f"12. Pack the standard library ({entries} entries, {data >> 20} MiB) into a "
                      f"{size >> 20} MiB image on /dev/shm")

    def gone(path: str) -> Any:
        def teardown(_: Any) -> None:
            if os.path.exists(path):
                os.unlink(path)
        return teardown

    command = [*xipfs_command(), "-q", "pack", "--size", f"{size >> 10}K", src, ours_img]
    env = command_env(root)

    def ours_command(_: Any = None) -> None:
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)

    for build, img in ((lambda: xipfs.pack(src, ours_img, size=size), ours_img),
                       (lambda: mke2fs(src, base_img, size), base_img),
                       (ours_command, ours_img)):
        build()
        fsck = subprocess.run(["e2fsck", "-fn", img], capture_output=True, text=True)
        if fsck.returncode:
            raise RuntimeError(f"e2fsck -fn {img}: {fsck.stdout[-500:]}")
        os.unlink(img)
    auto = xipfs.pack(src, ours_img)
    section.notes.append(f"pack with size=None (the tree plus 10 %) makes {auto.size >> 20} MiB; "
                         f"{auto.files} files, {auto.dirs} directories, {auto.symlinks} symlinks.")
    os.unlink(ours_img)
    repeat = max(5, cfg.repeat // 2)
    cases = [
        Case("xipfs.pack", lambda _: xipfs.pack(src, ours_img, size=size), data, "MiB/s", None,
             gone(ours_img)),
        Case("xipfs pack (command)", ours_command, data, "MiB/s", None, gone(ours_img)),
        Case("mke2fs -t ext2 -b 4096 -d", lambda _: mke2fs(src, base_img, size), data, "MiB/s", None,
             gone(base_img)),
    ]
    m = measure(cases, repeat, warmup=1)
    base = m["mke2fs -t ext2 -b 4096 -d"]
    section.rows.append(Row("xipfs.pack (same tree, same size)", m["xipfs.pack"], base, TARGET))
    section.rows.append(Row("xipfs pack, the command (a fresh process)", m["xipfs pack (command)"], base,
                            TARGET))
    section.raw += list(m.values())
    section.notes.append(f"command: xipfs -q pack --size {size >> 10}K SRC IMG (bytecode cached, as in a "
                         "user's shell)")
    section.notes.append(f"machine: {machine_speed()}")
    return section


BENCHMARKS = {"pack": bench_pack}

if __name__ == "__main__":
    import sys

    from run import main

    sys.exit(main(["--only", "pack", *sys.argv[1:]]))
