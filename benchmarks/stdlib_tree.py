"""The real tree the pack, unpack and check benchmarks share: this Python's standard library.

Copied once per benchmark run into the scratch directory on tmpfs (``site-packages`` left out:
it is whatever this machine installed, not the standard library), and packed once by
``mke2fs -d`` for the benchmarks that start from an image.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig

_TREES: dict[str, tuple[str, int, int]] = {}
_IMAGES: dict[str, tuple[str, int]] = {}


def stdlib_tree(root: str) -> tuple[str, int, int]:
    """``(path, entries, bytes)`` of a copy of the standard library under ``root``."""
    if root not in _TREES:
        src = os.path.join(root, "stdlib")
        shutil.copytree(sysconfig.get_paths()["stdlib"], src, symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages"))
        entries = data = 0
        for top, dirs, files in os.walk(src):
            entries += len(dirs) + len(files)
            data += sum(os.lstat(os.path.join(top, f)).st_size for f in files)
        _TREES[root] = (src, entries, data)
    return _TREES[root]


def image_size(data: int, entries: int) -> int:
    """One size both mke2fs and xipfs get: the data, its block slack and metadata, plus 25 %."""
    need = data + entries * 4096 + (16 << 20)
    return (need + need // 4) >> 20 << 20


def stdlib_image(root: str) -> tuple[str, int]:
    """``(path, size)`` of the standard library packed by ``mke2fs -t ext2 -b 4096 -d``."""
    if root not in _IMAGES:
        src, entries, data = stdlib_tree(root)
        img = os.path.join(root, "stdlib.ext2")
        size = image_size(data, entries)
        mke2fs(src, img, size)
        _IMAGES[root] = (img, size)
    return _IMAGES[root]


def mke2fs(src: str, img: str, size: int) -> None:
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-d", src, img, f"{size >> 10}k"],
                   check=True, stdout=subprocess.DEVNULL)


def xipfs_command() -> list[str]:
    """The ``xipfs`` command as a user runs it: the console script beside this interpreter
    (``.venv/bin/xipfs``), else ``python -m xipfs``."""
    script = os.path.join(os.path.dirname(sys.executable), "xipfs")
    return [script] if os.access(script, os.X_OK) else [sys.executable, "-m", "xipfs"]


def command_env(root: str) -> dict[str, str]:
    """The environment of a timed command: bytecode cached as in a user's shell, whatever
    PYTHONDONTWRITEBYTECODE says here (kept under ``root``; the untimed first round writes it)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = os.path.join(root, "pycache")
    return env
