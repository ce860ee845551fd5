"""Helpers for ``test_corrupt.py``: build real ext2 images, find their structures, damage them, and
exercise xipfs over everything in them.

Images are built with e2fsprogs (``mke2fs -d`` from a generated tree, ``debugfs ea_set`` for the
extended attributes) and located with ``debugfs`` (``stat``, ``imap``, ``blocks``) and ``dumpe2fs``.
Offsets of on-disk fields are written out here from the format description
(``/work/shared/docs/ext2-spec.md``), independently of ``xipfs.extfs.layout``, so that a mistake in
xipfs's own layout cannot hide in the tests.

:func:`exercise` opens a (damaged) image and touches everything: the whole tree by hand (scandir,
listdir, stat and lstat of every entry and of ``dir/..``, every file read whole or, when large, at
its head, middle and tail, with ``read_bytes``, ``pread``, ``readinto`` and a buffered reader, every
symlink read, every xattr listed and fetched), then ``fs.walk`` both ways with a bound on its
length. Only :class:`xipfs.CorruptImageError`, :class:`xipfs.UnsupportedFeatureError` and the
ordinary ``os`` errors (ENOENT, ENOTDIR, ELOOP, EISDIR, ENXIO, EINVAL, ENODATA) may come out of an
operation; anything else propagates and fails the test with its own traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import stat
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from e2fs import mkfs, run

import xipfs
from xipfs import CorruptImageError, UnsupportedFeatureError

# -- on-disk offsets (ext2-spec.md sections 2, 4, 6, 8, 9) --------------------------------------
SB_OFF = 1024
SB = {  # superblock field -> (offset in the superblock, struct code)
    "inodes_count": (0x00, "I"), "blocks_count": (0x04, "I"), "r_blocks_count": (0x08, "I"),
    "free_blocks_count": (0x0C, "I"), "free_inodes_count": (0x10, "I"),
    "first_data_block": (0x14, "I"), "log_block_size": (0x18, "I"), "log_frag_size": (0x1C, "I"),
    "blocks_per_group": (0x20, "I"), "frags_per_group": (0x24, "I"), "inodes_per_group": (0x28, "I"),
    "magic": (0x38, "H"), "state": (0x3A, "H"), "rev_level": (0x4C, "I"), "first_ino": (0x54, "I"),
    "inode_size": (0x58, "H"), "feature_compat": (0x5C, "I"), "feature_incompat": (0x60, "I"),
    "feature_ro_compat": (0x64, "I"),
}
GD = {"block_bitmap": (0x00, "I"), "inode_bitmap": (0x04, "I"), "inode_table": (0x08, "I"),
      "free_blocks": (0x0C, "H"), "free_inodes": (0x0E, "H"), "used_dirs": (0x10, "H")}
INODE = {
    "mode": (0x00, "H"), "size": (0x04, "I"), "atime": (0x08, "I"), "ctime": (0x0C, "I"),
    "mtime": (0x10, "I"), "dtime": (0x14, "I"), "links": (0x1A, "H"), "blocks": (0x1C, "I"),
    "flags": (0x20, "I"), "file_acl": (0x68, "I"), "size_high": (0x6C, "I"),
    "extra_isize": (0x80, "H"),
}
I_BLOCK = 0x28
FL_EXTENTS = 0x80000
FL_INLINE_DATA = 0x10000000
XATTR_MAGIC = 0xEA020000

#: Errnos an ordinary (not corrupt) lookup or read may give; the fuzz test lets them through.
ORDINARY_ERRNOS = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EISDIR, errno.ENXIO,
                             errno.EINVAL, errno.ENODATA})
#: A CorruptImageError must say which structure is wrong.
NAMES_A_STRUCTURE = re.compile(
    r"superblock|group descriptor|inode|directory|xattr|indirect|symlink|block map", re.I)

#: Files at most this large are read whole; larger ones at their head, middle and tail.
READ_ALL = 1 << 20
CHUNK = 64 * 1024
#: fs.walk yielding more directories than this on these small images is not terminating.
WALK_LIMIT = 500
#: Entries visited by the hand-made traversal, at most (a bound for fuzzed images).
ENTRY_LIMIT = 5000


# -- building and locating ----------------------------------------------------------------------
def _make_tree(root: str, bs: int) -> dict[str, bytes]:
    """The source tree for ``mke2fs -d``; returns the content of every regular file."""
    rnd = random.Random(20240601 + bs)
    contents: dict[str, bytes] = {}

    def put(rel: str, data: bytes) -> None:
        with open(os.path.join(root, rel), "wb") as f:
            f.write(data)
        contents["/" + rel] = data

    os.makedirs(os.path.join(root, "dir/sub/deep"))
    # a directory of a few blocks: entries of 8 + 32 bytes, 3 blocks' worth
    for i in range(3 * bs // 40):
        put(f"dir/entry_{i:03d}_{'x' * 22}", b"%d\n" % i)
    put("dir/sub/deep/leaf", b"leaf\n")
    # 300 KiB: direct, indirect and (at 1 KiB blocks) double-indirect blocks
    put("big", rnd.randbytes(300 * 1024))
    sparse = bytearray(1024 * 1024)
    sparse[:100] = b"A" * 100
    sparse[200 * 1024:200 * 1024 + 5000] = b"B" * 5000
    sparse[-10:] = b"C" * 10
    with open(os.path.join(root, "sparse"), "wb") as f:
        f.write(sparse[:100])
        f.seek(200 * 1024)
        f.write(sparse[200 * 1024:200 * 1024 + 5000])
        f.seek(len(sparse) - 10)
        f.write(sparse[-10:])
    contents["/sparse"] = bytes(sparse)
    put("small", b"hello world\n")
    put("empty", b"")
    put("xf", b"xattr file\n")
    put("aclf", b"acl file\n")
    os.symlink("big", os.path.join(root, "fast"))
    os.symlink("./" * 30 + "dir/sub/../../big", os.path.join(root, "slow"))
    os.symlink("loop2", os.path.join(root, "loop1"))
    os.symlink("loop1", os.path.join(root, "loop2"))
    os.symlink("self", os.path.join(root, "self"))
    os.mkfifo(os.path.join(root, "fifo"))
    with contextlib.suppress(PermissionError):  # a device node needs root
        os.mknod(os.path.join(root, "chr"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.utime(os.path.join(dirpath, name), (1700000000, 1700000000), follow_symlinks=False)
    return contents


#: The ACL written on /aclf, in the xattr wire format debugfs takes (version 2).
ACL_WIRE = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in
    ((0x01, 6, 0xFFFFFFFF), (0x02, 4, 1000), (0x04, 4, 0xFFFFFFFF), (0x10, 4, 0xFFFFFFFF),
     (0x20, 4, 0xFFFFFFFF)))
#: xattrs set on /xf: one small (fits in the inode), four large (go to the xattr block).
XF_ATTRS = {"user.a": b"small", **{f"user.large{i}": bytes([65 + i]) * 150 for i in range(4)}}


@dataclass
class Group:
    first: int
    last: int
    block_bitmap: int
    inode_bitmap: int
    inode_table: int
    itable_end: int
    has_super: bool
    free: list[tuple[int, int]]


@dataclass
class BaseImage:
    """A pristine image and where its structures are."""

    path: str
    bs: int
    data: bytes
    sb: dict[str, int]
    groups: list[Group]
    ino: dict[str, int] = field(default_factory=dict)
    inode_off: dict[str, int] = field(default_factory=dict)
    blocks: dict[str, list[int]] = field(default_factory=dict)
    contents: dict[str, bytes] = field(default_factory=dict)
    targets: dict[str, bytes] = field(default_factory=dict)

    @property
    def isize(self) -> int:
        return self.sb["inode_size"]

    @property
    def fdb(self) -> int:
        return self.sb["first_data_block"]

    @property
    def gdt_off(self) -> int:
        return (self.fdb + 1) * self.bs

    def u32(self, off: int) -> int:
        return struct.unpack_from("<I", self.data, off)[0]

    def inode_field(self, path: str, name: str) -> int:
        off, code = INODE[name]
        return struct.unpack_from("<" + code, self.data, self.inode_off[path] + off)[0]

    def iblock(self, path: str) -> tuple[int, ...]:
        return struct.unpack_from("<15I", self.data, self.inode_off[path] + I_BLOCK)

    def ind_entries(self, blk: int) -> tuple[int, ...]:
        return struct.unpack_from(f"<{self.bs // 4}I", self.data, blk * self.bs)

    def dirents(self, blk: int) -> list[tuple[int, int, int, int, int, bytes]]:
        """``(offset in the image, inode, rec_len, name_len, type, name)`` of each entry of a block."""
        out = []
        pos = 0
        base = blk * self.bs
        while pos < self.bs:
            ino, rec_len, name_len, ftype = struct.unpack_from("<IHBB", self.data, base + pos)
            out.append((base + pos, ino, rec_len, name_len, ftype,
                        self.data[base + pos + 8:base + pos + 8 + name_len]))
            if rec_len < 8:
                break
            pos += rec_len
        return out

    def dirent(self, dirpath: str, name: bytes) -> tuple[int, int, int, int, int, bytes]:
        for blk in self.blocks[dirpath]:
            for entry in self.dirents(blk):
                if entry[5] == name and entry[1]:
                    return entry
        raise KeyError(f"{dirpath}: no entry {name!r}")

    def xattr_entries(self, start: int, end: int) -> list[tuple[int, int, int, int, int, bytes]]:
        """``(offset in the image, name_len, index, value_offs, value_size, name)`` from ``start``."""
        out = []
        pos = start
        while pos + 4 <= end and self.u32(pos):
            name_len, index, offs, _inum, size, _hash = struct.unpack_from("<BBHIII", self.data, pos)
            out.append((pos, name_len, index, offs, size, self.data[pos + 16:pos + 16 + name_len]))
            pos += (16 + name_len + 3) & ~3
        return out

    def inode_xattr_start(self, path: str) -> int:
        """Image offset of the in-inode xattr magic of ``path``."""
        return self.inode_off[path] + 128 + self.inode_field(path, "extra_isize")

    def free_blocks(self, n: int) -> list[int]:
        """``n`` blocks that nothing uses (from group 1's free range)."""
        a, b = self.groups[1].free[0]
        assert b - a + 1 >= n
        return list(range(a, a + n))

    def unused_inode(self) -> int:
        """An inode number that was never allocated (mode 0, links 0) in group 0."""
        return self.sb["inodes_per_group"] - 1


_GROUP_RE = re.compile(r"^Group (\d+): \(Blocks (\d+)-(\d+)\)", re.M)


def _parse_dumpe2fs(text: str) -> tuple[dict[str, int], list[Group]]:
    def hdr(label: str) -> int:
        m = re.search(rf"^{re.escape(label)}:\s+(\d+)", text, re.M)
        assert m, label
        return int(m.group(1))

    sb = {"blocks_count": hdr("Block count"), "inodes_count": hdr("Inode count"),
          "first_data_block": hdr("First block"), "block_size": hdr("Block size"),
          "blocks_per_group": hdr("Blocks per group"), "inodes_per_group": hdr("Inodes per group"),
          "inode_size": hdr("Inode size"), "first_ino": hdr("First inode"),
          "reserved_gdt": hdr("Reserved GDT blocks")}
    groups = []
    chunks = _GROUP_RE.split(text)[1:]
    for i in range(0, len(chunks), 4):
        body = chunks[i + 3]
        bb = int(re.search(r"Block bitmap at (\d+)", body).group(1))
        ib = int(re.search(r"Inode bitmap at (\d+)", body).group(1))
        m = re.search(r"Inode table at (\d+)-(\d+)", body)
        free = [(int(a), int(b or a)) for a, b in
                re.findall(r"(\d+)(?:-(\d+))?", re.search(r"Free blocks: (.*)", body).group(1))]
        groups.append(Group(int(chunks[i + 1]), int(chunks[i + 2]), bb, ib, int(m.group(1)),
                            int(m.group(2)) + 1, "superblock at" in body, free))
    return sb, groups


def build_image(workdir: str, bs: int) -> BaseImage:
    """Build the base image for block size ``bs`` in ``workdir`` and locate its structures."""
    tree = os.path.join(workdir, f"tree{bs}")
    path = os.path.join(workdir, f"base{bs}.img")
    shutil.rmtree(tree, ignore_errors=True)
    os.makedirs(tree)
    contents = _make_tree(tree, bs)
    env = {"E2FSPROGS_FAKE_TIME": "1700000000"}
    size = "4M" if bs == 1024 else "8M"
    mkfs(path, size, bs=bs, isize=256, src=tree, env=env,
         extra=("-N", "1024", "-g", "1024", "-U", "12345678-1234-5678-1234-567812345678",
                "-E", "hash_seed=87654321-4321-8765-4321-876543218765"))
    cmds = os.path.join(workdir, f"cmds{bs}")
    lines = []
    for i, (name, value) in enumerate(XF_ATTRS.items()):
        vfile = os.path.join(workdir, f"xv{bs}_{i}")
        with open(vfile, "wb") as f:
            f.write(value)
        lines.append(f"ea_set -f {vfile} /xf {name}")
    aclfile = os.path.join(workdir, f"acl{bs}")
    with open(aclfile, "wb") as f:
        f.write(ACL_WIRE)
    lines.append(f"ea_set -f {aclfile} /aclf system.posix_acl_access")
    with open(cmds, "w") as f:
        f.write("\n".join(lines) + "\n")
    run(["debugfs", "-w", "-f", cmds, path], env=env)
    sb, groups = _parse_dumpe2fs(run(["dumpe2fs", path], env=env).stdout.decode())
    assert sb["block_size"] == bs
    with open(path, "rb") as f:
        data = f.read()
    img = BaseImage(path=path, bs=bs, data=data, sb=sb, groups=groups, contents=contents)
    paths = ["/", "/lost+found", "/dir", "/dir/sub", "/dir/sub/deep", "/dir/sub/deep/leaf", "/big",
             "/sparse", "/small", "/empty", "/xf", "/aclf", "/fast", "/slow", "/loop1", "/loop2",
             "/self", "/fifo", "/chr", "/dir/entry_000_" + "x" * 22]
    for p in paths:
        if p == "/chr" and not os.path.lexists(os.path.join(tree, "chr")):
            continue  # not root: no device node
        out = run(["debugfs", "-R", f"imap {p}", path], env=env).stdout.decode()
        m = re.search(r"Inode (\d+) is part of block group \d+\s+"
                      r"located at block (\d+), offset 0x([0-9a-f]+)", out)
        assert m, out
        img.ino[p] = int(m.group(1))
        img.inode_off[p] = int(m.group(2)) * bs + int(m.group(3), 16)
        out = run(["debugfs", "-R", f"blocks {p}", path], env=env).stdout.decode()
        img.blocks[p] = [int(x) for x in out.split()]
    for p in ("/fast", "/slow", "/loop1", "/loop2", "/self"):
        img.targets[p] = os.readlink(os.path.join(tree, p[1:])).encode()
    # sanity: what debugfs says and what the raw inode says agree
    assert img.ino["/"] == 2
    assert img.iblock("/big")[0] == img.blocks["/big"][0]
    assert img.inode_field("/xf", "file_acl") != 0 and img.inode_field("/aclf", "file_acl") == 0
    assert len(img.blocks["/dir"]) >= 3
    return img


# -- damaging -----------------------------------------------------------------------------------
class Patch:
    """A mutable copy of a base image; each test damages one structure of it."""

    def __init__(self, base: BaseImage) -> None:
        self.base = base
        self.buf = bytearray(base.data)
        self.size: int | None = None  # truncate the written image to this many bytes

    # raw
    def put(self, off: int, code: str, value: int) -> None:
        struct.pack_into("<" + code, self.buf, off, value)

    def get(self, off: int, code: str) -> int:
        return struct.unpack_from("<" + code, self.buf, off)[0]

    def put_bytes(self, off: int, data: bytes) -> None:
        self.buf[off:off + len(data)] = data

    # structures
    def sb(self, name: str, value: int) -> None:
        off, code = SB[name]
        self.put(SB_OFF + off, code, value)

    def sb_get(self, name: str) -> int:
        off, code = SB[name]
        return self.get(SB_OFF + off, code)

    def gd(self, group: int, name: str, value: int) -> None:
        off, code = GD[name]
        self.put(self.base.gdt_off + group * 32 + off, code, value)

    def inode(self, path: str, name: str, value: int) -> None:
        off, code = INODE[name]
        self.put(self.base.inode_off[path] + off, code, value)

    def inode_get(self, path: str, name: str) -> int:
        off, code = INODE[name]
        return self.get(self.base.inode_off[path] + off, code)

    def iblock(self, path: str, index: int, value: int) -> None:
        self.put(self.base.inode_off[path] + I_BLOCK + 4 * index, "I", value)

    def ind(self, blk: int, index: int, value: int) -> None:
        self.put(blk * self.base.bs + 4 * index, "I", value)

    def fill_ind(self, blk: int, value: int) -> None:
        self.put_bytes(blk * self.base.bs, struct.pack("<I", value) * (self.base.bs // 4))

    def write(self, path: str) -> str:
        data = self.buf if self.size is None else self.buf[:self.size]
        with open(path, "wb") as f:
            f.write(data)
        return path


# -- bounding time ------------------------------------------------------------------------------
class Hang(AssertionError):
    """An operation on an image did not finish within its time bound."""


@contextlib.contextmanager
def time_limit(seconds: float, what: str) -> Iterator[None]:
    """Raise :class:`Hang` in the main thread if the block runs longer than ``seconds``."""

    def on_alarm(signum: int, frame: Any) -> None:
        raise Hang(f"{what}: still running after {seconds} s (a hang)")

    old = signal.signal(signal.SIGALRM, on_alarm)
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        if old_delay:
            left = max(old_delay - (time.monotonic() - start), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, old_interval)


# -- exercising ---------------------------------------------------------------------------------
@dataclass
class Outcome:
    """What came out of exercising one image."""

    opened: bool = False
    corrupt: list[tuple[str, CorruptImageError]] = field(default_factory=list)
    unsupported: list[tuple[str, UnsupportedFeatureError]] = field(default_factory=list)
    errors: list[tuple[str, OSError]] = field(default_factory=list)
    files_read: int = 0

    def messages(self) -> list[str]:
        return [f"{op}: {err}" for op, err in self.corrupt]

    def assert_corrupt(self, *words: str) -> None:
        """At least one CorruptImageError was raised, and one of them names all of ``words``."""
        if not self.corrupt:
            other = [f"{op}: {err!r}" for op, err in self.errors + self.unsupported
                     if err.errno not in (errno.ENODATA, errno.ELOOP, errno.ENXIO)]
            raise AssertionError(f"no CorruptImageError was raised (opened: {self.opened}); "
                                 f"errors other than ENODATA/ELOOP/ENXIO: {other[:20]}")
        if words:
            for _, err in self.corrupt:
                text = str(err).lower()
                if all(w.lower() in text for w in words):
                    return
            raise AssertionError(f"no CorruptImageError names {words}: {self.messages()}")

    def assert_clean(self) -> None:
        assert not self.corrupt and not self.unsupported, self.messages()


class _Exerciser:
    def __init__(self, fs: xipfs.Filesystem, out: Outcome, allowed: frozenset[int]) -> None:
        self.fs = fs
        self.out = out
        self.allowed = allowed

    def call(self, op: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        """``fn(*args)``; the errors a corrupt image may give are recorded, anything else escapes."""
        try:
            return fn(*args, **kw)
        except CorruptImageError as err:
            check_corrupt_error(err, op)
            self.out.corrupt.append((op, err))
        except UnsupportedFeatureError as err:
            self.out.unsupported.append((op, err))
        except OSError as err:
            if err.errno not in self.allowed:
                raise AssertionError(f"{op}: unexpected {type(err).__name__} {err!r}") from err
            self.out.errors.append((op, err))
        return None

    # -- the tree, by hand ----------------------------------------------------------------------
    def tree(self) -> None:
        fs, call = self.fs, self.call
        call("statvfs", fs.statvfs, "/")
        call("lstat /", fs.lstat, "/")
        self.xattrs("/")
        stack = ["/"]
        visited: set[int] = set()
        seen = 0
        while stack:
            top = stack.pop()
            call(f"listdir {top}", fs.listdir, top)
            call(f"listdir(bytes) {top}", fs.listdir, os.fsencode(top))
            call(f"stat {top}/..", fs.stat, top.rstrip("/") + "/..")
            call(f"exists {top}/.", fs.exists, top.rstrip("/") + "/.")
            entries = call(f"scandir {top}", lambda t=top: list(fs.scandir(t)))
            for entry in entries or ():
                seen += 1
                if seen > ENTRY_LIMIT:
                    return
                ino = self.entry(entry)
                if ino is not None and ino not in visited:
                    visited.add(ino)
                    stack.append(entry.path)

    def entry(self, entry: xipfs.DirEntry) -> int | None:
        """Touch one directory entry; the inode number to descend into when it is a directory."""
        fs, call, p = self.fs, self.call, entry.path
        entry.inode()
        call(f"is_dir {p}", entry.is_dir)
        call(f"is_file {p}", entry.is_file)
        call(f"is_symlink {p}", entry.is_symlink)
        call(f"entry.stat {p}", entry.stat)
        call(f"entry.lstat {p}", entry.stat, follow_symlinks=False)
        for what in ("exists", "lexists", "isdir", "isfile", "islink"):
            call(f"{what} {p}", getattr(fs, what), p)
        call(f"stat {p}", fs.stat, p)
        st = call(f"lstat {p}", fs.lstat, p)
        if st is None:
            return None
        if stat.S_ISLNK(st.st_mode):
            call(f"readlink {p}", fs.readlink, p)
            call(f"readlink(bytes) {p}", fs.readlink, os.fsencode(p))
            call(f"read_bytes via link {p}", self.read_small, p)
        elif stat.S_ISREG(st.st_mode):
            call(f"read {p}", self.read_file, p, st.st_size)
        elif not stat.S_ISDIR(st.st_mode):
            call(f"read_bytes {p}", fs.read_bytes, p)
        self.xattrs(p)
        return st.st_ino if stat.S_ISDIR(st.st_mode) else None

    def xattrs(self, p: str) -> None:
        fs, call = self.fs, self.call
        names = call(f"listxattr {p}", fs.listxattr, p, follow_symlinks=False)
        for name in names or ():
            call(f"getxattr {p} {name}", fs.getxattr, p, name, follow_symlinks=False)
        call(f"getxattr {p} user.absent", fs.getxattr, p, "user.absent", follow_symlinks=False)
        call(f"listxattr(follow) {p}", fs.listxattr, p)

    def read_small(self, p: str) -> None:
        """Read through a path that may be a symlink (the size is that of the target)."""
        st = self.fs.stat(p)
        if stat.S_ISREG(st.st_mode):
            self.read_file(p, st.st_size)

    def read_file(self, p: str, size: int) -> None:
        fs = self.fs
        self.out.files_read += 1
        if size <= READ_ALL:
            data = fs.read_bytes(p)
            assert len(data) == size, f"{p}: read_bytes gave {len(data)} bytes of {size}"
            buf = bytearray(b"\xa5" * size)
            with fs.open(p, "rb", buffering=0) as f:
                n = f.readinto(buf)
            assert n == size and buf == data, f"{p}: readinto differs from read_bytes"
            with fs.open(p, "rb") as f:
                assert f.read() == data, f"{p}: buffered read differs from read_bytes"
            runs = fs.block_runs(p)
            if fs.volume.inode(fs.lstat(p).st_ino).flags & 0x10000000:    # ext4 inline data: no blocks
                assert runs == [], f"{p}: runs {runs} of inline data"
                return
            assert sum(count for _, count, _ in runs) == -(-size // fs.block_size), f"{p}: runs {runs}"
            for lblk in (0, -(-size // fs.block_size) - 1):
                view = fs.get_xip_mem(p, lblk)
                if view is not None:
                    view.release()
            return
        bs = fs.block_size
        with fs.open(p, "rb", buffering=0) as f:
            for off in (0, (size // 2) // bs * bs, size - CHUNK):
                want = min(CHUNK, size - off)
                a = f.pread(CHUNK, off)
                assert len(a) == want, f"{p}: pread({CHUNK}, {off}) gave {len(a)} bytes of {want}"
                buf = bytearray(b"\xa5" * CHUNK)
                f.seek(off)
                n = f.readinto(buf)
                assert n == want and buf[:n] == a, f"{p}: readinto at {off} differs from pread"

    # -- fs.walk --------------------------------------------------------------------------------
    def walks(self) -> None:
        for topdown in (True, False):
            self.call(f"walk(topdown={topdown})", self.walk, topdown)

    def walk(self, topdown: bool) -> None:
        deepest = ""
        for n, (top, _dirs, _files) in enumerate(self.fs.walk("/", topdown=topdown), 1):
            if len(top) > len(deepest):
                deepest = top
            if n > WALK_LIMIT:
                raise Hang(f"fs.walk(topdown={topdown}) yielded more than {WALK_LIMIT} directories "
                           f"(does not terminate); deepest so far: {deepest[:120]}...")


def check_corrupt_error(err: CorruptImageError, op: str = "") -> None:
    """A CorruptImageError is EUCLEAN and names the structure that is wrong."""
    assert isinstance(err, OSError) and err.errno == errno.EUCLEAN, f"{op}: {err!r}"
    text = str(err)
    assert NAMES_A_STRUCTURE.search(text), f"{op}: CorruptImageError names no structure: {text!r}"


def exercise(path: str | xipfs.Device, xip: bool | None, *, seconds: float = 20.0,
             allowed: frozenset[int] = ORDINARY_ERRNOS, walk: bool = True) -> Outcome:
    """Open ``path`` and touch everything in it (see the module docstring); never longer than ``seconds``."""
    out = Outcome()
    with time_limit(seconds, f"exercising {path}"):
        try:
            fs = xipfs.open(path, xip=xip)
        except CorruptImageError as err:
            check_corrupt_error(err, "open")
            out.corrupt.append(("open", err))
            return out
        except UnsupportedFeatureError as err:
            out.unsupported.append(("open", err))
            return out
        out.opened = True
        with fs:
            ex = _Exerciser(fs, out, allowed)
            ex.tree()
            if walk:
                ex.walks()
    return out
