"""Pack benchmark: ``xipfs.pack`` of the standard library tree against ``mke2fs -d``.

Both build an image of the same size from the same tree on tmpfs into a new file in /dev/shm;
the file is removed (untimed) after each sample. Both images pass e2fsck -fn (checked once).
"""

from __future__ import annotations

import os
import subprocess
from typing import Any

from bench_read import Config
from common import Case, Row, Section, measure
from stdlib_tree import image_size, mke2fs, stdlib_tree

import xipfs


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

    for build, img in ((lambda: xipfs.pack(src, ours_img, size=size), ours_img),
                       (lambda: mke2fs(src, base_img, size), base_img)):
        build()
        fsck = subprocess.run(["e2fsck", "-fn", img], capture_output=True, text=True)
        if fsck.returncode:
            raise RuntimeError(f"e2fsck -fn {img}: {fsck.stdout[-500:]}")
        os.unlink(img)
    auto = xipfs.pack(src, ours_img)
    section.notes.append(f"pack with size=None (the tree plus 10 %) makes {auto.size >> 20} MiB; "
                         f"{auto.files} files, {auto.dirs} directories, {auto.symlinks} symlinks.")
    os.unlink(ours_img)
    repeat = max(3, cfg.repeat // 2)
    cases = [
        Case("xipfs.pack", lambda _: xipfs.pack(src, ours_img, size=size), data, "MiB/s", None,
             gone(ours_img)),
        Case("mke2fs -t ext2 -b 4096 -d", lambda _: mke2fs(src, base_img, size), data, "MiB/s", None,
             gone(base_img)),
    ]
    m = measure(cases, repeat, warmup=1)
    section.rows.append(Row("xipfs.pack (same tree, same size)", m["xipfs.pack"],
                            m["mke2fs -t ext2 -b 4096 -d"], 1.0))
    section.raw += list(m.values())
    return section


BENCHMARKS = {"pack": bench_pack}

if __name__ == "__main__":
    import sys

    from run import main

    sys.exit(main(["--only", "pack", *sys.argv[1:]]))
