"""Shared fixtures: ext2 images built by mke2fs from generated trees, and independent oracles.

Every image lives in one private directory under /dev/shm that is removed at the end of the
session. The oracles that xipfs is compared with are all outside xipfs:

* the source tree itself (``treegen.record_tree``);
* ``debugfs`` (inode numbers per name, i_blocks, link counts, the logical->physical block map);
* ``e2fsck -fn`` (every image the fixtures make must be clean);
* the kernel: path resolution in the source tree under ``chroot`` and the image mounted
  read-only through the ext4 driver (both need root; the tests that use them skip otherwise).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from functools import cached_property

import pytest
import treegen
from e2fs import LS_P_RE, SHM, DInode, MemoryImage, assert_fsck_clean, debugfs, mkfs, parse_stat, run

import xipfs

BLOCK_SIZES = (1024, 2048, 4096)
INODE_SIZES = (128, 256)
IMAGE_PARAMS = [(bs, isize) for bs in BLOCK_SIZES for isize in INODE_SIZES]
#: ext4 images as ``mke2fs -t ext4`` of e2fsprogs 1.47 makes them, and in variants:
#: ``(id, block size, inode size, extra mke2fs options)``.
EXT4_PARAMS = [
    ("ext4", 4096, 256, ()),
    ("ext4-bs1024", 1024, 256, ()),
    ("ext4-i128", 4096, 128, ("-I", "128")),
    ("ext4-no64bit-noflex", 4096, 256, ("-O", "^64bit,^flex_bg")),
    ("ext4-meta_bg", 1024, 256, ("-O", "meta_bg,^resize_inode")),
    ("ext4-bigalloc", 4096, 256, ("-O", "bigalloc", "-C", "16384")),
    ("ext4-inline", 4096, 256, ("-O", "inline_data")),
    ("ext4-uninit_bg", 2048, 256, ("-O", "^metadata_csum,uninit_bg")),
    ("ext4-csum_seed", 4096, 256, ("-O", "metadata_csum_seed")),
]
IS_ROOT = os.geteuid() == 0
TREE_SEED = 20240611
#: Size of the images built from the standard tree (its real data is about 16 MiB).
TREE_IMAGE_SIZE = "40M"


# -- what debugfs says about an image ---------------------------------------------------------
class DebugfsView:
    """An image as debugfs sees it: every name's inode number, every inode's ``stat``."""

    def __init__(self, img: str) -> None:
        self.img = img
        #: directory inode -> [(name, inode)] (without . and ..)
        self.dirs: dict[int, list[tuple[bytes, int]]] = {}
        #: b"/a/b" -> inode number (root: b"/")
        self.paths: dict[bytes, int] = {b"/": 2}
        todo = {2: b"/"}
        while todo:                                   # one debugfs run per directory depth
            cmds = [f"ls -p <{ino}>" for ino in todo]
            out = debugfs(img, *cmds)
            parts = re.split(rb"^debugfs: ls -p <(\d+)>\n", out, flags=re.M)
            nxt: dict[int, bytes] = {}
            for ino_s, body in zip(parts[1::2], parts[2::2], strict=True):
                ino = int(ino_s)
                entries = []
                for m in LS_P_RE.finditer(body):
                    name, child, mode = m[5], int(m[1]), int(m[2], 8)  # uid/gid unused
                    if name in (b".", b"..") or child == 0:     # 0: an empty slot
                        continue
                    entries.append((name, child))
                    path = (todo[ino] if todo[ino] != b"/" else b"") + b"/" + name
                    self.paths[path] = child
                    if mode & 0o170000 == 0o040000:
                        nxt[child] = path
                self.dirs[ino] = entries
            todo = nxt
        inos = sorted(set(self.paths.values()))
        out = debugfs(img, *(f"stat <{i}>" for i in inos))
        parts = re.split(rb"^debugfs: stat <\d+>\n", out, flags=re.M)[1:]
        self.inodes: dict[int, DInode] = {}
        for text in parts:
            node = parse_stat(text)
            self.inodes[node.ino] = node


# -- images -----------------------------------------------------------------------------------
@dataclass
class Image:
    path: str
    bs: int
    isize: int
    src: bytes | None = None
    tree: dict | None = None
    #: "ext2", or the ext4 variant's id (EXT4_PARAMS)
    kind: str = "ext2"

    @property
    def ext4(self) -> bool:
        return self.kind != "ext2"

    @cached_property
    def debugfs(self) -> DebugfsView:
        return DebugfsView(self.path)

    @cached_property
    def kernel(self) -> dict:
        """What the kernel (ext4 driver, read-only mount) shows of every path of the image."""
        with mounted(self.path) as mnt:
            return kernel_snapshot(mnt)

    def __str__(self) -> str:
        return f"bs{self.bs}-i{self.isize}"


@pytest.fixture(scope="session")
def shm_dir():
    """A private directory in /dev/shm for the whole session, removed at the end."""
    path = tempfile.mkdtemp(prefix="xipfs-tests-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def mem_image():
    """``mem_image(bs, size=None)``: a new filesystem on anonymous memory, opened for writing
    (:class:`e2fs.MemoryImage`; 4 MiB at 1 KiB blocks, else 16 MiB); closed after the test."""
    made: list[MemoryImage] = []
    workdir = tempfile.mkdtemp(prefix="xipfs-mem-", dir=SHM)

    def make(bs: int, size: int | None = None) -> MemoryImage:
        made.append(MemoryImage(size or (4 << 20 if bs == 1024 else 16 << 20), bs, workdir=workdir))
        return made[-1]

    yield make
    for img in made:
        img.close()
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def tree_src(shm_dir):
    """The standard generated tree: (source root as bytes, recorded nodes)."""
    root = os.fsencode(os.path.join(shm_dir, "tree"))
    treegen.build_tree(root, TREE_SEED)
    return root, treegen.record_tree(root)


_TREE_PARAMS = [("ext2", bs, isize, ()) for bs, isize in IMAGE_PARAMS] + EXT4_PARAMS


@pytest.fixture(scope="session", params=_TREE_PARAMS,
                ids=[f"bs{b}-i{i}" if k == "ext2" else k for k, b, i, _ in _TREE_PARAMS])
def tree_image(request, tree_src, shm_dir):
    """The standard tree as an ext2 image, for every block size and inode size, and as ext4
    images by mke2fs's defaults and variants (one at a time)."""
    kind, bs, isize, extra = request.param
    src, nodes = tree_src
    path = os.path.join(shm_dir, f"tree-{kind}-{bs}-{isize}.img")
    if kind == "ext2":
        mkfs(path, TREE_IMAGE_SIZE, src=src, bs=bs, isize=isize)
    elif kind == "ext4-inline":
        # mke2fs 1.47.0 -d with inline_data cuts the tail of some sparse files: Linux itself
        # copies the tree in (and decides which files and directories stay inline)
        if not IS_ROOT:
            pytest.skip("the inline_data image is written through a loop mount, which needs root")
        mkfs(path, TREE_IMAGE_SIZE, bs=bs, extra=extra, fstype="ext4")
        with mounted(path, options="rw") as mnt:
            run(["cp", "-a", "--", os.fsdecode(src) + "/.", mnt], timeout=300)
    else:
        mkfs(path, TREE_IMAGE_SIZE, src=src, bs=bs, extra=extra, fstype="ext4")
    assert_fsck_clean(path, exit_only=True)
    yield Image(path, bs, isize, src, nodes, kind)
    os.unlink(path)


@pytest.fixture(params=[True, False], ids=["xip", "pagecache"])
def xip(request):
    """Both devices: the memory (mmap) device and the file device with its page cache."""
    return request.param


def open_image(path: str | os.PathLike, xip: bool | None) -> xipfs.Filesystem:
    fs = xipfs.open(path, xip=xip)
    if xip is not None:
        assert fs.is_xip is xip
    return fs


# -- the kernel as an oracle ------------------------------------------------------------------
@contextlib.contextmanager
def mounted(img: str, fstype: str = "ext4", options: str = "ro"):
    """Loop-mount ``img`` (read-only by default); skips the test when that is not possible."""
    if not IS_ROOT:
        pytest.skip("loop mounts need root")
    mnt = tempfile.mkdtemp(prefix="xipfs-mnt-")
    proc = run(["mount", "-o", f"loop,{options}", "-t", fstype, img, mnt], check=False, timeout=60)
    if proc.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"mount -o loop failed: {proc.stderr.decode(errors='replace').strip()}")
    try:
        yield mnt
    finally:
        run(["umount", mnt], timeout=60)
        os.rmdir(mnt)


def kernel_snapshot(mnt: str) -> dict[bytes, dict]:
    """``{b"/path": {stat, target, xattrs, names, sha256}}`` of everything under ``mnt``."""
    import hashlib

    root = os.fsencode(mnt)
    out: dict[bytes, dict] = {}
    for top, dirs, files in os.walk(root):
        for name in [b""] + dirs + files if top == root else dirs + files:
            full = os.path.join(top, name) if name else top
            rel = full[len(root):] or b"/"
            st = os.lstat(full)
            rec: dict = {"stat": st, "xattrs": {
                n: os.getxattr(full, n, follow_symlinks=False)
                for n in os.listxattr(full, follow_symlinks=False)}}
            if os.path.islink(full):
                rec["target"] = os.readlink(full)
            elif os.path.isdir(full):
                rec["names"] = set(os.listdir(full))
            elif os.path.isfile(full):
                h = hashlib.sha256()
                with open(full, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
                rec["sha256"] = h.hexdigest()
            out[rel] = rec
    return out


_CHROOT_CHILD = r"""
import os, pickle, sys
root, paths = pickle.load(sys.stdin.buffer)
os.chroot(root)
os.chdir("/")
out = {}
for p in paths:
    res = []
    for fn in (os.stat, os.lstat):
        try:
            st = fn(p)
            res.append(("ok", st.st_mode, st.st_ino, st.st_size))
        except OSError as e:
            res.append(("err", e.errno))
    out[p] = tuple(res)
sys.stdout.buffer.write(pickle.dumps(out))
"""


def kernel_resolve(root: bytes, paths: list[bytes]) -> dict[bytes, tuple]:
    """Resolve ``paths`` inside ``root`` with the kernel (chroot): ``{path: (stat, lstat)}``.

    Each result is ``("ok", st_mode, source st_ino, st_size)`` or ``("err", errno)``.
    """
    if not IS_ROOT:
        pytest.skip("chroot needs root")
    proc = run([sys.executable, "-c", _CHROOT_CHILD], input=pickle.dumps((root, paths)))
    return pickle.loads(proc.stdout)
