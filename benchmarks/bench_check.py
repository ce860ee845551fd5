"""Check benchmark: ``xipfs check`` against ``e2fsck -fn`` on an image of this Python's stdlib.

The image is the one the pack/unpack benchmarks share (``stdlib_tree.stdlib_image``: this
interpreter's standard library without ``site-packages``, packed by ``mke2fs -t ext2 -b 4096 -d``
into the scratch directory on /dev/shm; untimed). A sample of ours opens the image read-only with
``xipfs.open`` and runs ``check_volume`` on it (the library call ``xipfs check`` makes); a sample
of the baseline runs ``e2fsck -fn`` on the same file. Both are measured round-robin in one run and
compared by their medians; the target is "within 3x of e2fsck" (ratio >= 0.33).

Rows: the library call (target), and, for information, the same call in a new interpreter
(start-up and ``import xipfs`` included, as a command pays them).

Standalone: ``.venv/bin/python benchmarks/bench_check.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from common import MIB, Case, Row, Section, measure
from stdlib_tree import stdlib_image, stdlib_tree

import xipfs
from xipfs.extfs.check import check_volume

TARGET = 1 / 3

CHILD = r"""
import sys, xipfs
from xipfs.extfs.check import check_volume
with xipfs.open(sys.argv[1]) as fs:
    sys.exit(1 if check_volume(fs.volume, progress=False) else 0)
"""


def xipfs_check(img: str) -> list[Any]:
    """What ``xipfs check IMG`` does: open read-only, check, close."""
    with xipfs.open(img) as fs:
        return check_volume(fs.volume, progress=False)


def e2fsck(img: str) -> int:
    return subprocess.run(["e2fsck", "-fn", img], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=False).returncode


def bench_check(root: str, cfg: Any) -> Section:
    _src, entries, nbytes = stdlib_tree(root)
    img, size = stdlib_image(root)
    problems = xipfs_check(img)
    rc = e2fsck(img)
    if problems or rc:
        raise RuntimeError(f"the stdlib image is not clean: xipfs {problems[:3]}, e2fsck exit {rc}")
    repeat = max(7, cfg.repeat)
    section = Section(f"17. Check an image of this Python's stdlib ({entries} entries, "
                      f"{nbytes / MIB:.0f} MiB of data, {size / MIB:.0f} MiB image on /dev/shm): "
                      "xipfs against e2fsck -fn")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    cases = [
        Case("xipfs check", lambda _: xipfs_check(img), 1, "ms/call"),
        Case("e2fsck -fn", lambda _: e2fsck(img), 1, "ms/call"),
        Case("xipfs check (new interpreter)",
             lambda _: subprocess.run([sys.executable, "-c", CHILD, img], env=env, check=True), 1, "ms/call"),
    ]
    ms = measure(cases, repeat)
    ours, base, child = ms["xipfs check"], ms["e2fsck -fn"], ms["xipfs check (new interpreter)"]
    section.rows.append(Row("check (xipfs.open + check_volume) vs e2fsck -fn", ours, base, TARGET,
                            note="within 3x"))
    section.rows.append(Row("check in a new interpreter (start-up, import, check) vs e2fsck -fn", child,
                            base))
    section.raw.extend(ms.values())
    section.notes.append("target: within 3x of e2fsck -fn (ratio >= 0.33); both find the image clean.")
    return section


BENCHMARKS = {"check": bench_check}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "check", *sys.argv[1:]]))
