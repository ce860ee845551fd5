"""Unpack benchmark: ``xipfs.unpack`` against ``debugfs -R "rdump / DEST"`` on this Python's stdlib.

The tree is this interpreter's standard library (``sysconfig.get_paths()["stdlib"]``, without
``site-packages``), copied to /dev/shm and packed with ``mke2fs -q -F -t ext2 -b 4096 -d`` into
an image on /dev/shm (both untimed). Each sample extracts the whole image into a fresh
destination directory on /dev/shm; removing it afterwards is not timed. Ours and debugfs are
measured round-robin in one run and compared by their medians.

Rows: the library call (target 1.0x), and the command ``xipfs unpack IMG DEST`` in a fresh
process (interpreter start-up and imports from cached bytecode included, as a user's shell runs
it; target 1.0x); all measured round-robin in one run.

Standalone: ``.venv/bin/python benchmarks/bench_unpack.py [--quick] [--repeat N]``.
The tree and image are the ones ``stdlib_tree.py`` makes for the pack and check benchmarks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from typing import Any

from common import MIB, Case, Row, Section, machine_speed, measure
from stdlib_tree import command_env, stdlib_image, stdlib_tree, xipfs_command

from xipfs.tools.unpack import unpack


def bench_unpack(root: str, cfg: Any) -> Section:
    _tree, entries, nbytes = stdlib_tree(root)
    img, _size = stdlib_image(root)
    repeat = max(5, cfg.repeat_cold)
    section = Section(f"14. Unpack this Python's stdlib ({entries} entries, {nbytes / MIB:.0f} MiB) from an "
                      "image on /dev/shm into a fresh directory on /dev/shm")
    dests: list[str] = []

    def fresh_dest(create: bool) -> Any:
        def setup() -> str:
            dest = tempfile.mkdtemp(prefix="unpack-dest-", dir=root)
            if not create:
                os.rmdir(dest)              # unpack creates it, as a user would call it
            dests.append(dest)
            return dest
        return setup

    def remove(dest: str) -> None:
        shutil.rmtree(dest, ignore_errors=True)

    def ours(dest: str) -> None:
        result = unpack(img, dest, progress=False)
        if result.skipped:
            raise AssertionError(f"unpack skipped entries: {result.skipped[:5]}")

    def debugfs(dest: str) -> None:
        subprocess.run(["debugfs", "-R", f"rdump / {dest}", img], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    command = [*xipfs_command(), "-q", "unpack", img]
    env = command_env(root)

    def ours_command(dest: str) -> None:
        subprocess.run([*command, dest], check=True, env=env, stdout=subprocess.DEVNULL)

    # correctness once, untimed: the same entries as the source (lost+found left out)
    check = fresh_dest(False)()
    ours(check)
    got = sum(len(d) + len(f) for _, d, f in os.walk(check))
    remove(check)
    if got != entries:
        raise AssertionError(f"unpack gave {got} entries, the source has {entries}")

    cases = [
        Case("xipfs.unpack", ours, entries, "us/file", setup=fresh_dest(False), teardown=remove),
        Case("debugfs rdump", debugfs, entries, "us/file", setup=fresh_dest(True), teardown=remove),
        Case("xipfs unpack (command)", ours_command, entries, "us/file", setup=fresh_dest(False),
             teardown=remove),
    ]
    try:
        m = measure(cases, repeat, warmup=1)
    finally:
        for dest in dests:
            remove(dest)
    base = m["debugfs rdump"]
    section.rows += [
        Row("unpack stdlib image -> /dev/shm (library call)", m["xipfs.unpack"], base, target=1.0),
        Row("xipfs unpack, the command (a fresh process)", m["xipfs unpack (command)"], base, target=1.0),
    ]
    section.raw += list(m.values())
    section.notes.append(f"image {os.path.basename(img)} made by mke2fs -d; {entries} entries, "
                         f"{nbytes} bytes of file data; time per entry")
    section.notes.append("command: xipfs -q unpack IMG DEST (bytecode cached, as in a user's shell)")
    section.notes.append(f"machine: {machine_speed()}")
    return section


BENCHMARKS = {"unpack": bench_unpack}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "unpack", *sys.argv[1:]]))
