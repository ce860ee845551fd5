"""The main job on an embedded default: pack a real tree into /dev/shm, check it, list it, read
and map files from it in place.

``python -m xipfs demo`` packs this Python's standard library (site-packages, the test suite
and bytecode caches left out) with :func:`xipfs.pack` into an image in ``/dev/shm``, checks it
as ``e2fsck -fn`` would, lists the top of it, reads every file back and compares it with the
source, maps the largest file with no copy (showing that the mapping *is* the storage), and
imports a module straight from the image.
"""

from __future__ import annotations

import os
import stat
import sys
import sysconfig
import time

from ..fs import Filesystem
from ..fs import check as xip_check
from ..fs import open as xip_open
from ..tools.pack import pack

DEFAULT_IMAGE = "/dev/shm/xipfs-demo.img"
EXCLUDE = ("site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib", "tkinter",
           "turtledemo", "ensurepip")


def _ls(fs: Filesystem, top: str, limit: int) -> list[str]:
    """``ls -l``-style lines for the first ``limit`` entries of ``top``."""
    lines = []
    for name in sorted(fs.listdir(top))[:limit]:
        path = top.rstrip("/") + "/" + name
        st = fs.lstat(path)
        extra = f" -> {fs.readlink(path)}" if stat.S_ISLNK(st.st_mode) else ""
        lines.append(f"  {stat.filemode(st.st_mode)} {st.st_nlink:3} {st.st_size:>9}  {path}{extra}")
    return lines


def _read_all(fs: Filesystem, src: str) -> tuple[int, int, float]:
    """Read every regular file of the image and compare it with the source: (files, bytes, s)."""
    checked = total = 0
    start = time.perf_counter()
    for top, _dirs, files in fs.walk("/"):
        for name in files:
            path = top.rstrip("/") + "/" + name
            if not fs.isfile(path) or fs.islink(path):
                continue
            data = fs.read_bytes(path)
            with open(os.path.join(src, path.lstrip("/")), "rb") as f:
                if data != f.read():
                    raise SystemExit(f"xipfs demo: {path} differs from its source")
            checked += 1
            total += len(data)
    return checked, total, time.perf_counter() - start


def _largest(fs: Filesystem) -> tuple[str, int]:
    best = ("", -1)
    for top, _dirs, files in fs.walk("/"):
        for name in files:
            path = top.rstrip("/") + "/" + name
            st = fs.lstat(path)
            if stat.S_ISREG(st.st_mode) and st.st_size > best[1]:
                best = (path, st.st_size)
    return best


def _show_mapping(fs: Filesystem, image: str, path: str, size: int) -> None:
    with fs.mmap(path) as m:
        kind = "XIP: the image's own pages, stitched in" if m.is_xip else "a private copy"
        print(f"  fs.mmap({path!r}): {size} bytes in {m.runs} run(s); {kind}")
        _, _, pblk = fs.block_runs(path)[0]
        with open(image, "rb") as raw:                    # the same bytes at the block's offset
            same = os.pread(raw.fileno(), 64, pblk * fs.block_size) == m[:64]
        print(f"  its first bytes are image block {pblk}'s bytes: {same}")
        first = bytes(m[:200]).split(b"\n", 1)[0].decode("utf-8", "replace")
        print(f"  first line: {first[:90]}")


def run(image: str = DEFAULT_IMAGE, keep: bool = False, src: str | None = None) -> int:
    src = src or sysconfig.get_paths()["stdlib"]
    print(f"xipfs demo: packing {src} into {image}\n  (left out: {', '.join(EXCLUDE)})")
    try:
        start = time.perf_counter()
        result = pack(src, image, exclude=EXCLUDE, label="xipfs-demo")
        took = time.perf_counter() - start
        print(f"  {result.files} files, {result.dirs} directories, {result.symlinks} symlinks, "
              f"{result.bytes / 2**20:.1f} MiB of data -> a {result.size / 2**20:.0f} MiB image "
              f"in {took:.2f} s")
        for path, why in result.skipped[:5]:
            print(f"  skipped {path}: {why}")

        start = time.perf_counter()
        problems = xip_check(image)
        took = time.perf_counter() - start
        print(f"\nxipfs check {image}: " + ("clean" if not problems else f"{len(problems)} problem(s)")
              + f" ({took * 1000:.0f} ms)")
        for p in problems[:10]:
            print(f"  {p.code}: {p.message}")
        if problems:
            return 1

        with xip_open(image) as fs:
            print(f"\nopened: ext2, {fs.block_size}-byte blocks, label {fs.label!r}; storage "
                  f"{fs.device.kind}; data path "
                  + ("XIP (in place from the mapped storage, no page cache)" if fs.is_xip
                     else "page cache (the storage is not memory)"))
            print(f"\nls -l / (the first 12 of {len(fs.listdir('/'))}):")
            print("\n".join(_ls(fs, "/", 12)))

            files, total, took = _read_all(fs, src)
            print(f"\nread every file back and compared it with the source: {files} files, "
                  f"{total / 2**20:.1f} MiB, identical ({took:.2f} s)")

            path, size = _largest(fs)
            print("\nmap the largest file:")
            _show_mapping(fs, image, path, size)

        print("\nimport a module straight from the image (no extraction):")
        _import_from(image, "textwrap")
    finally:
        if not keep and os.path.exists(image):
            os.unlink(image)
    print("\nimage kept at " + image if keep else "\ndone (image removed; --keep keeps it)")
    return 0


def _import_from(image: str, name: str) -> None:
    """Import ``name`` afresh with ``image`` first on sys.path, say where it came from and use it."""
    import importlib

    from .. import importer

    importer.install()
    saved = sys.modules.pop(name, None)
    sys.path.insert(0, image)
    try:
        module = importlib.import_module(name)
        print(f"  import {name}: {module.__file__}")
        print(f"  {name}.shorten(...): {module.shorten('execute in place, straight from memory', 24)!r}")
    finally:
        sys.path.remove(image)
        if saved is not None:
            sys.modules[name] = saved
        else:
            sys.modules.pop(name, None)
