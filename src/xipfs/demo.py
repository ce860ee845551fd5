"""The main job on an embedded default: build an ext2 image in /dev/shm, open it in place, read it.

``python -m xipfs demo`` packs a small tree (generated text and data, plus xipfs's own source)
with ``mke2fs -d``, opens the image with xipfs, lists it, reads every file back and compares it
with the source, and prints which path serves the data (XIP from memory, or the page cache).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .fs import Filesystem
from .fs import open as xip_open

DEFAULT_IMAGE = "/dev/shm/xipfs-demo.img"


def build_tree(root: Path) -> None:
    """A small tree with every common kind of entry, and xipfs's own source as real files."""
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "README.txt").write_text(
        "This image was built by `python -m xipfs demo` with mke2fs -d and read by xipfs.\n")
    (root / "data").mkdir()
    block = hashlib.sha256(b"xipfs").digest() * 2048          # 64 KiB, deterministic
    (root / "data" / "blob.bin").write_bytes(block * 64)       # 4 MiB, one run of blocks
    with open(root / "data" / "sparse.bin", "wb") as f:        # a hole, then data
        f.seek(8 << 20)
        f.write(b"end of a sparse file\n")
    shutil.copytree(Path(__file__).parent, root / "src" / "xipfs",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (root / "bin").mkdir()
    hello = root / "bin" / "hello.py"
    hello.write_text("print('hello from an ext2 image')\n")
    hello.chmod(0o755)
    os.symlink("../docs/README.txt", root / "bin" / "README")
    os.link(root / "data" / "blob.bin", root / "data" / "blob-link.bin")


def make_image(src: Path, image: str, size: str = "32M") -> None:
    mke2fs = shutil.which("mke2fs") or "/sbin/mke2fs"
    subprocess.run([mke2fs, "-q", "-F", "-t", "ext2", "-b", "4096", "-L", "xipfs-demo",
                    "-d", str(src), image, size], check=True, stdout=subprocess.DEVNULL)


def show_tree(fs: Filesystem, out: list[str], top: str = "/") -> None:
    """``ls -l``-style lines for everything below ``top``, depth first, names sorted."""
    for name in sorted(fs.listdir(top)):
        path = top.rstrip("/") + "/" + name
        st = fs.lstat(path)
        extra = f" -> {fs.readlink(path)}" if stat.S_ISLNK(st.st_mode) else ""
        out.append(f"  {stat.filemode(st.st_mode)} {st.st_nlink:2} {st.st_size:>9}  {path}{extra}")
        if stat.S_ISDIR(st.st_mode):
            show_tree(fs, out, path)


def run(image: str = DEFAULT_IMAGE, keep: bool = False) -> int:
    print(f"xipfs demo: building a tree and packing it with mke2fs -d into {image}")
    scratch = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(prefix="xipfs-demo-", dir=scratch) as tmp:
        src = Path(tmp) / "tree"
        build_tree(src)
        make_image(src, image)
        try:
            with xip_open(image) as fs:
                dev = fs.device
                print(f"opened {image}: ext2, {fs.block_size}-byte blocks, label {fs.label!r}, "
                      f"features {' '.join(fs.features)}")
                print(f"storage: {dev.kind}; data path: "
                      + ("XIP (read in place from the mapped storage, no page cache)" if fs.is_xip
                         else "page cache (storage is not memory)"))
                lines: list[str] = []
                show_tree(fs, lines)
                print(f"\n{len(lines)} entries:")
                print("\n".join(lines))
                print("\nreading every file back and comparing with the source:")
                checked = total = 0
                start = time.perf_counter()
                for top, _dirs, files in fs.walk("/"):
                    for name in files:
                        path = top.rstrip("/") + "/" + name
                        if not fs.isfile(path) or fs.islink(path):
                            continue
                        data = fs.read_bytes(path)
                        if data != (src / path.lstrip("/")).read_bytes():
                            print(f"  MISMATCH {path}")
                            return 1
                        checked += 1
                        total += len(data)
                took = time.perf_counter() - start
                print(f"  {checked} files, {total} bytes, identical ({took * 1000:.1f} ms)")
                print("\nwhat is XIP (file blocks -> image blocks; a run is one copy, or one mapping):")
                for path in ("/data/blob.bin", "/data/sparse.bin", "/src/xipfs/fs.py"):
                    runs = fs.block_runs(path)
                    holes = sum(c for _, c, p in runs if not p)
                    view = fs.get_xip_mem(path, 0)
                    where = ("hole (reads as zeros)" if view is None else
                             "a view of the storage itself" if fs.is_xip else "a page-cache page")
                    print(f"  {path}: {len(runs)} run(s), {holes} hole block(s); block 0 is {where}")
                with fs.open("/bin/hello.py") as f:
                    print(f"\n/bin/hello.py says: {f.read().strip()}")
        finally:
            if not keep:
                os.unlink(image)
    print("\nimage kept at " + image if keep else "\ndone (image removed; --keep keeps it)")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="xipfs demo", description=__doc__)
    parser.add_argument("--image", default=DEFAULT_IMAGE, help="where to build the image")
    parser.add_argument("--keep", action="store_true", help="keep the image afterwards")
    args = parser.parse_args(argv)
    return run(args.image, args.keep)


if __name__ == "__main__":
    sys.exit(main())
