"""fsspec benchmark: the ``ext2`` filesystem against fsspec's LocalFileSystem on the same tree.

One source tree on /dev/shm (a big file of random data and many small files) is packed with
``mke2fs -d`` into an image next to it. "Ours" is ``fsspec.filesystem("ext2", fo=image)``
(the image on tmpfs: XIP); the baseline is ``fsspec.filesystem("file")`` reading the source
tree itself from tmpfs. Both go through fsspec's public API, so each row includes fsspec's
own per-call work (path handling, file objects). Warm: the caches of both sides are filled by
an untimed round. Every target is "info": this shows what an fsspec user gets, nothing gates.

Standalone: ``.venv/bin/python benchmarks/bench_fsspec.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

import fsspec
from bench_read import BLOCK_SIZE, Config, make_image, write_files
from common import MIB, Case, Row, Section, measure

#: The big file is capped here: the image and the tree both live in /dev/shm, which is shared.
BIG_MAX = 256 * MIB


def bench_fsspec(root: str, cfg: Config) -> Section:
    size = min(cfg.big_bytes, BIG_MAX)
    nsmall = cfg.small_files
    src = os.path.join(root, "fsspec-src")
    os.makedirs(src)
    big = os.urandom(16 * MIB) * (size // (16 * MIB)) + os.urandom(size % (16 * MIB))
    with open(os.path.join(src, "big.bin"), "wb") as f:
        f.write(big)
    contents = [os.urandom(cfg.small_size) for _ in range(nsmall)]
    names = write_files(os.path.join(src, "small"), contents)
    img = os.path.join(root, "fsspec.ext2")
    per_file = -(-cfg.small_size // BLOCK_SIZE)
    make_image(src, img, nsmall + 1, size // BLOCK_SIZE + nsmall * per_file)

    section = Section(f"13. fsspec: ext2 filesystem vs LocalFileSystem (one {size // MIB} MiB file, "
                      f"{nsmall} files of {cfg.small_size} B), warm")
    ext2 = fsspec.filesystem("ext2", fo=img, skip_instance_cache=True)
    local = fsspec.filesystem("file")
    try:
        if not ext2.xipfs.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP: 'ours' is not XIP here.")
        sides: dict[str, tuple[Any, str]] = {"ext2": (ext2, ""), "local": (local, src + "/")}
        small = [f"small/{n}" for n in names]

        # Correctness first (untimed): each side delivers the tree's bytes.
        for fs, base in sides.values():
            if fs.cat_file(base + "big.bin") != big or fs.cat_file(base + small[-1]) != contents[-1]:
                raise AssertionError(f"{fs!r}: wrong data")

        def cat_big(fs: Any, base: str) -> Callable[[Any], None]:
            path = base + "big.bin"
            return lambda _: fs.cat_file(path)

        def read_big(fs: Any, base: str) -> Callable[[Any], None]:
            path = base + "big.bin"

            def run(_: Any) -> None:
                with fs.open(path, "rb") as f:
                    f.read()
            return run

        def cat_small(fs: Any, base: str) -> Callable[[Any], None]:
            paths = [base + p for p in small]

            def run(_: Any) -> None:
                cat = fs.cat_file
                for p in paths:
                    cat(p)
            return run

        def read_small(fs: Any, base: str) -> Callable[[Any], None]:
            paths = [base + p for p in small]

            def run(_: Any) -> None:
                for p in paths:
                    with fs.open(p, "rb") as f:
                        f.read()
            return run

        def ls_small(fs: Any, base: str) -> Callable[[Any], None]:
            path = base + "small"
            return lambda _: fs.ls(path, detail=True)

        kinds = {
            "cat_file big": (cat_big, size, "GiB/s", cfg.repeat_big),
            "open().read big": (read_big, size, "GiB/s", cfg.repeat_big),
            "cat_file small": (cat_small, nsmall, "us/file", cfg.repeat),
            "open().read small": (read_small, nsmall, "us/file", cfg.repeat),
            "ls(detail=True) small": (ls_small, nsmall, "us/file", cfg.repeat),
        }
        for kind, (make, work, unit, repeat) in kinds.items():
            cases = [Case(f"{side}: {kind}", make(fs, base), work, unit)
                     for side, (fs, base) in sides.items()]
            m = measure(cases, repeat, warmup=1)
            section.rows.append(Row(f"{kind} (ext2 XIP vs local tmpfs)", m[f"ext2: {kind}"],
                                    m[f"local: {kind}"]))
            section.raw += list(m.values())
        section.notes.append(
            "cat_file copies once on both sides (ours: storage -> the returned bytes; local: the "
            "kernel's read into it); open().read goes through fsspec's file object on both sides "
            "(ours: an io.BufferedReader over xipfs's file, whole reads bypass its buffer). "
            "Small-file rows include fsspec's path handling and one file object per file.")
    finally:
        ext2.close()
    return section


BENCHMARKS: dict[str, Callable[[str, Config], Section]] = {"fsspec": bench_fsspec}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "fsspec", *sys.argv[1:]]))
