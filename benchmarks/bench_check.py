"""Check benchmark: ``xipfs check`` against ``e2fsck -fn`` on images of this Python's stdlib.

Two images of one tree (``stdlib_tree``: this interpreter's standard library without
``site-packages``), both made by mke2fs from the tree on /dev/shm, untimed: the ext2 one the
pack/unpack benchmarks share (``stdlib_tree.stdlib_image``, ``mke2fs -t ext2 -b 4096 -d``) and an
ext4 one of the same size (``mke2fs -t ext4 -b 4096 -d``: extents, metadata_csum, flex_bg, a
journal). On each, measured round-robin in one run and compared by their medians:

- the library call: ``xipfs.open`` read-only, then ``check_volume`` (what the command checks);
- the command as a user runs it: ``xipfs check IMG`` in a fresh process (the console script beside
  this interpreter, bytecode cached: ``PYTHONDONTWRITEBYTECODE`` removed from the child's
  environment), start-up, imports and output included;
- the baseline, ``e2fsck -fn IMG`` (a fresh process too).

The target, for the call and for the command: within 3x of e2fsck (ratio >= 0.33).

Standalone: ``.venv/bin/python benchmarks/bench_check.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

from common import MIB, Case, Row, Section, machine_speed, measure
from stdlib_tree import command_env, stdlib_image, stdlib_tree, xipfs_command

import xipfs
from xipfs.extfs.check import check_volume

TARGET = 1 / 3


def xipfs_check(img: str) -> list[Any]:
    """The library call ``xipfs check IMG`` makes: open read-only, check, close."""
    with xipfs.open(img) as fs:
        return check_volume(fs.volume, progress=False)


def e2fsck(img: str) -> int:
    return subprocess.run(["e2fsck", "-fn", img], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          check=False).returncode


def ext4_image(root: str, size: int) -> str:
    """The stdlib tree packed by ``mke2fs -t ext4 -b 4096 -d`` into an image of ``size`` bytes."""
    src, _entries, _data = stdlib_tree(root)
    img = os.path.join(root, "stdlib-check.ext4")
    if not os.path.exists(img):
        subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", src, img, f"{size >> 10}k"],
                       check=True, stdout=subprocess.DEVNULL)
    return img


def bench_check(root: str, cfg: Any) -> Section:
    _src, entries, nbytes = stdlib_tree(root)
    ext2, size = stdlib_image(root)
    images = {"ext2": ext2, "ext4": ext4_image(root, size)}
    command = xipfs_command()
    env = command_env(root)
    for kind, img in images.items():
        problems = xipfs_check(img)
        rc = e2fsck(img)
        out = subprocess.run([*command, "check", img], env=env, capture_output=True, text=True, check=False)
        if problems or rc or out.returncode or "clean" not in out.stdout:
            raise RuntimeError(f"the stdlib {kind} image is not clean: xipfs {problems[:3]}, "
                               f"e2fsck exit {rc}, xipfs check {out.returncode}: {out.stdout[-300:]}")
    repeat = max(7, cfg.repeat)
    section = Section(f"17. Check images of this Python's stdlib ({entries} entries, "
                      f"{nbytes / MIB:.0f} MiB of data, {size / MIB:.0f} MiB images on /dev/shm, ext2 and "
                      "ext4 made by mke2fs -d): xipfs against e2fsck -fn")
    cases = []
    for kind, img in images.items():
        def run_command(_: Any, img: str = img) -> None:
            subprocess.run([*command, "check", img], env=env, stdout=subprocess.DEVNULL, check=True)

        cases += [
            Case(f"xipfs check_volume ({kind})", lambda _, img=img: xipfs_check(img), 1, "ms/call"),
            Case(f"xipfs check ({kind}, command)", run_command, 1, "ms/call"),
            Case(f"e2fsck -fn ({kind})", lambda _, img=img: e2fsck(img), 1, "ms/call"),
        ]
    ms = measure(cases, repeat)
    for kind in images:
        base = ms[f"e2fsck -fn ({kind})"]
        section.rows.append(Row(f"{kind}: check (xipfs.open + check_volume) vs e2fsck -fn",
                                ms[f"xipfs check_volume ({kind})"], base, TARGET, note="within 3x"))
        section.rows.append(Row(f"{kind}: xipfs check IMG, the command (a fresh process) vs e2fsck -fn",
                                ms[f"xipfs check ({kind}, command)"], base, TARGET, note="within 3x"))
    section.raw.extend(ms.values())
    section.notes.append("target: within 3x of e2fsck -fn (ratio >= 0.33); all find both images clean.")
    section.notes.append(f"command: {' '.join(os.path.basename(a) for a in command)} check IMG "
                         "(bytecode cached, as in a user's shell)")
    section.notes.append(f"machine: {machine_speed()}")
    return section


BENCHMARKS = {"check": bench_check}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "check", *sys.argv[1:]]))
