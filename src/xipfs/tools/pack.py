"""pack: build an ext2 image from a directory tree in one pass over the tree (``mke2fs -d``).

The tree is scanned first (names, stat, symlink targets, xattrs, the data extents of sparse
files), then laid out whole before a byte is written: inode numbers in tree order, and each
directory's blocks followed by its files' data, every file contiguous (its indirect blocks just
before its data), so that every file maps as one run. Then the image is formatted and written
in large pieces: inode tables, directory blocks and block maps from memory, file data copied by
the kernel from the source file straight into the image (``copy_file_range``) when both are
files. A file that changes or vanishes while it is copied is packed empty and reported.

The files' data is copied first, then every inode is encoded straight into an inode table built
whole in memory (the few files that changed or vanished are made empty after). The garbage
collector is off meanwhile (a tree's worth of nodes, none in a cycle, would start it every few
hundred entries).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat as st_
import time
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

from ..device import Device, MemoryDevice
from ..extfs import layout as L
from ..extfs.dir import rec_len_of
from ..extfs.indirect import build_tree, indirect_blocks_needed
from ..extfs.inode import encode_direct_run, encode_fresh_into, encode_rdev
from ..extfs.mkfs import (
    LOST_FOUND_INO,
    Geometry,
    GroupUse,
    empty_block,
    feature_words,
    format_device,
    inode_ratio,
    lost_found_blocks,
    plan,
    prefix_bitmap,
)
from ..extfs.xattr import build_block, split_name
from ..progress import ProgressArg, progress_bar
from . import no_gc

ROOT_INO = L.ROOT_INO
_DIRENT = L.DIRENT.struct
_HEADER = L.DIRENT_HEADER
_REC_LEN_AT = L.DIRENT.offsets["rec_len"]
_REC_LEN = L.DIRENT.codes["rec_len"]
_SEEK_DATA = getattr(os, "SEEK_DATA", 3)
_SEEK_HOLE = getattr(os, "SEEK_HOLE", 4)
#: Linux ext2 shares one xattr block among at most this many inodes (EXT2_XATTR_REFCOUNT_MAX).
_XATTR_SHARE_MAX = 1024
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_NONBLOCK", 0)


@dataclass
class PackResult:
    """What :func:`pack` put in the image, and what it left out (with why)."""

    image: str
    size: int = 0                   #: image bytes
    files: int = 0                  #: regular files (inodes)
    dirs: int = 0                   #: directories, the root included
    symlinks: int = 0
    others: int = 0                 #: FIFOs, sockets, character and block devices
    hardlinks: int = 0              #: names beyond an inode's first (hard links)
    bytes: int = 0                  #: file data copied
    skipped: list[tuple[str, str]] = field(default_factory=list)   #: (path, reason)


class _Node:
    """One inode to be: its source, what it holds, and where it goes."""

    __slots__ = ("path", "st", "fmt", "ino", "children", "xattrs", "target", "data", "extents",
                 "links", "meta", "runs", "xattr_block", "nblocks", "parent", "blocks")

    def __init__(self, path: bytes | None, st: Any, fmt: int) -> None:
        self.path = path                #: source path (None: made by pack, e.g. a .pyc)
        self.st = st
        self.fmt = fmt
        self.ino = 0
        self.children: list[tuple[bytes, _Node]] | None = [] if fmt == st_.S_IFDIR else None
        self.xattrs: tuple[tuple[str, bytes], ...] = ()
        self.target = b""               #: symlink target
        self.parent = 0                 #: a directory's parent inode
        self.blocks: list[bytes] = []   #: a directory's encoded blocks
        self.data: bytes | None = None  #: content made by pack (no source file)
        self.extents: list[tuple[int, int]] | None = None   #: sparse files: byte ranges of data
        self.links = 1
        self.meta: list[int] = []       #: indirect blocks, in build order
        self.runs: list[tuple[int, int, int]] = []  #: (file block, device block, count)
        self.xattr_block = 0
        self.nblocks = 0                #: data blocks (directory, file or long symlink)


class _Stat:
    """The stat fields pack uses, for entries pack makes itself."""

    def __init__(self, mode: int, uid: int, gid: int, size: int, ns: int) -> None:
        self.st_mode, self.st_uid, self.st_gid, self.st_size = mode, uid, gid, size
        self.st_atime_ns = self.st_mtime_ns = self.st_ctime_ns = ns
        self.st_mtime = ns // 1_000_000_000
        self.st_nlink, self.st_ino, self.st_dev, self.st_rdev, self.st_blocks = 1, 0, 0, 0, 0


def pack(src_dir: str | os.PathLike[str], image: str | os.PathLike[str] | Device, *,
         size: int | None = None, block_size: int = 4096, inode_size: int = 256,
         extra: float | int = 0.1, label: str | None = None, uuid: str | None = None,
         exclude: Iterable[str] = (), progress: ProgressArg = None,
         compile: bool = False, fs_type: str = "ext2",  # noqa: A002 - as compileall
         features: Iterable[str] | str | None = None, dax: bool = False) -> PackResult:
    """Build an ext2 image of the tree at ``src_dir`` in ``image`` (created, or replaced whole:
    an existing image file is renamed over only when the new one is complete).

    ``image`` is a path, a POSIX shared-memory name or an open device. ``size=None`` makes the
    image as large as the tree needs plus ``extra`` free space: a float is a fraction of what
    the tree needs (0.1 = 10 %), an int a number of bytes. With an explicit ``size`` the inode
    count is mke2fs's default for that size; ENOSPC if the tree does not fit (checked before the
    image is touched). The image has no root-reserved blocks (``mke2fs -m 0``).

    Kept: regular files (sparse ones stay sparse), directories, symlinks, hard links (as
    links), FIFOs, sockets and device nodes, modes, owners, nanosecond times and xattrs.
    ``exclude`` lists glob patterns (``fnmatch``) of entries to leave out: a pattern matches
    an entry's name, or its path from the top of the tree (``"site-packages"``, ``"*.o"``,
    ``"build/tmp"``). ``compile=True`` adds a valid ``__pycache__/*.pyc`` beside every ``.py``
    file, as ``compileall`` would, so that imports from the image need not compile.

    ``fs_type="ext4"`` makes an ext4 image instead (:func:`.pack4.pack4`: mke2fs -t ext4's
    features, changed by ``features`` as ``-O`` changes them, and its journal); there every file
    that holds a whole 2 MiB piece starts 2 MiB-aligned, and ``dax=True`` also sets the per-file
    DAX flag (``EXT4_DAX_FL``, ``chattr +x``) on every directory and regular file, for a
    ``dax=inode`` mount (ext4 only: ext2 has no such flag).
    """
    if dax and fs_type != "ext4":
        raise ValueError(f"dax: only with fs_type='ext4' (the DAX flag is ext4's; {fs_type} has none)")
    if fs_type != "ext2":
        if fs_type != "ext4":
            raise ValueError(f"filesystem type {fs_type!r}: pack makes ext2 or ext4")
        from .pack4 import pack4

        with no_gc():
            return pack4(src_dir, image, size=size, block_size=block_size, inode_size=inode_size,
                         extra=extra, label=label, uuid=uuid, exclude=exclude, progress=progress,
                         compile=compile, features=features, dax=dax)
    if features is not None:
        raise ValueError("features: only with fs_type='ext4'")
    with no_gc():
        return _pack2(src_dir, image, size, block_size, inode_size, extra, label, uuid, exclude, progress,
                      compile)


def _pack2(src_dir: str | os.PathLike[str], image: str | os.PathLike[str] | Device, size: int | None,
           block_size: int, inode_size: int, extra: float | int, label: str | None, uuid: str | None,
           exclude: Iterable[str], progress: ProgressArg, compile: bool) -> PackResult:  # noqa: A002
    """:func:`pack` of an ext2 image, its arguments checked."""
    src = os.fsencode(os.fspath(src_dir))
    target = image if isinstance(image, Device) else os.fsdecode(os.fspath(image))
    result = PackResult(image=target.name if isinstance(target, Device) else target)
    root = _scan(src, result, _image_identity(target), _excluder(exclude))
    if compile:
        _add_bytecode(root, result)
    nodes = _number(root, result)
    geo = _geometry(nodes, size if not isinstance(target, Device) else target.size,
                    block_size, inode_size, extra)
    layout = _Layout(geo, nodes)               # ENOSPC here leaves the target untouched
    def build(dev: Device, zeroed: bool, bar: Any) -> None:
        format_device(dev, block_size=geo.bs, inode_size=geo.isize, inodes=geo.groups * geo.ipg,
                      label=label, uuid=uuid, zeroed=zeroed, reserved_percent=0.0,
                      populate=lambda d, g, ft: layout.write(d, g, ft, zeroed, result, bar))

    write_image(target, geo.blocks * geo.bs if size is None else size, result, progress, build)
    result.size = geo.blocks * geo.bs
    return result


def write_image(target: str | Device, size: int, result: PackResult, progress: ProgressArg,
                build: Callable[[Device, bool, Any], None]) -> None:
    """Open ``target`` for an image of ``size`` bytes (a new file beside an existing one, renamed
    over it only when done), run ``build(device, known_zero, progress_bar)``, close it all."""
    dev, zeroed, temp = _open_target(target, size)
    done = False
    try:
        bar = progress_bar(progress, result.bytes, "pack", "B")
        try:
            build(dev, zeroed, bar)
        finally:
            bar.close()
        done = True
    finally:
        if dev is not target:
            dev.close()
        if temp is not None:
            if done:
                os.replace(temp, target)
            else:
                os.unlink(temp)


# -- scanning --------------------------------------------------------------------------------

def _image_identity(target: str | Device) -> tuple[int, int] | None:
    if isinstance(target, Device):
        return None
    try:
        st = os.stat(target)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _excluder(patterns: Iterable[str]) -> Callable[[bytes, bytes], bool] | None:
    """``excluded(name, path from the top)`` for ``patterns``, or None when there are none."""
    pats = [os.fsencode(p).strip(b"/") for p in ([patterns] if isinstance(patterns, str) else patterns)]
    if not pats:
        return None
    from fnmatch import fnmatchcase  # (only with patterns: the command imports no more than it needs)

    return lambda name, rel: any(fnmatchcase(name, p) or fnmatchcase(rel, p) for p in pats)


def _scan(src: bytes, result: PackResult, image_id: tuple[int, int] | None,
          excluded: Callable[[bytes, bytes], bool] | None) -> _Node:
    """The tree under ``src`` as nodes (directories' children sorted by name)."""
    try:
        st = os.stat(src)
    except OSError as err:
        raise OSError(err.errno, err.strerror, os.fsdecode(src)) from None
    if not st_.S_ISDIR(st.st_mode):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), os.fsdecode(src))
    root = _Node(src, st, st_.S_IFDIR)
    root.xattrs = _xattrs(src, result)
    seen: dict[tuple[int, int], _Node] = {}
    image_dev, image_ino = image_id if image_id is not None else (-1, -1)
    by_name = attrgetter("name")
    listxattr = os.listxattr
    ifmt, ifdir, ifreg, iflnk = 0o170000, st_.S_IFDIR, st_.S_IFREG, st_.S_IFLNK
    node_of = _Node
    stack = [root]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d.path) as it:
                entries = sorted(it, key=by_name)
        except OSError as err:
            result.skipped.append((os.fsdecode(d.path), f"cannot list: {err.strerror}"))
            continue
        subdirs = []
        add = d.children.append
        for e in entries:
            name = e.name
            if excluded is not None and excluded(name, e.path[len(src):].strip(b"/")):
                continue
            try:
                est = e.stat(follow_symlinks=False)
            except OSError as err:
                result.skipped.append((os.fsdecode(e.path), _vanished(err)))
                continue
            path = e.path
            if len(name) > 255:
                result.skipped.append((os.fsdecode(path), "name longer than 255 bytes"))
                continue
            if est.st_ino == image_ino and est.st_dev == image_dev:
                result.skipped.append((os.fsdecode(path), "the image being written"))
                continue
            fmt = est.st_mode & ifmt
            if fmt == ifreg and est.st_nlink == 1:           # the usual entry: a plain file
                node = node_of(path, est, ifreg)
                if est.st_blocks * 512 < est.st_size:
                    node.extents = _data_extents(path)     # sparse: byte ranges for now
            else:
                if fmt != ifdir and est.st_nlink > 1:
                    first = seen.get((est.st_dev, est.st_ino))
                    if first is not None:
                        first.links += 1
                        add((name, first))
                        continue
                node = node_of(path, est, fmt)
                if fmt != ifdir and est.st_nlink > 1:
                    seen[(est.st_dev, est.st_ino)] = node
                if fmt == iflnk:
                    try:
                        node.target = os.readlink(path)
                    except OSError as err:
                        result.skipped.append((os.fsdecode(path), _vanished(err)))
                        continue
                elif fmt == ifreg and est.st_blocks * 512 < est.st_size:
                    node.extents = _data_extents(path)
                elif fmt == ifdir:
                    subdirs.append(node)
            try:
                names = listxattr(path, follow_symlinks=False)
            except OSError:
                names = None
            if names:
                node.xattrs = _xattrs(path, result, names)
            add((name, node))
        stack.extend(reversed(subdirs))
    return root


def _vanished(err: OSError) -> str:
    return "vanished while packing" if err.errno == errno.ENOENT else f"cannot read: {err.strerror}"


def _xattrs(path: bytes, result: PackResult, names: list[str] | None = None) -> tuple[tuple[str, bytes], ...]:
    """The extended attributes ext2 can hold, sorted; the others reported (``names``: listed already)."""
    if names is None:
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError:
            return ()
    if not names:
        return ()
    out = []
    for name in sorted(names):
        try:
            split_name(name)
            out.append((name, os.getxattr(path, name, follow_symlinks=False)))
        except OSError as err:
            result.skipped.append((f"{os.fsdecode(path)} [{name}]", f"xattr not kept: {err.strerror}"))
    return tuple(out)


def _data_extents(path: bytes) -> list[tuple[int, int]]:
    """Byte ranges ``(start, end)`` holding data in a sparse file (SEEK_DATA / SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    try:
        fd = os.open(path, _READ_FLAGS)
    except OSError:
        return out
    try:
        end = os.fstat(fd).st_size
        pos = 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, _SEEK_DATA)
            except OSError as err:
                if err.errno == errno.ENXIO:           # only a hole from here on
                    break
                return [(0, end)]                      # no SEEK_DATA: treat as all data
            stop = os.lseek(fd, start, _SEEK_HOLE)
            out.append((start, min(stop, end)))
            pos = stop
    finally:
        os.close(fd)
    return out


def _add_bytecode(root: _Node, result: PackResult) -> None:
    """A ``__pycache__/NAME.TAG.pyc`` for every ``.py`` file, timestamp-checked as importlib
    expects (source mtime and size as the image will store them)."""
    from importlib.util import cache_from_source

    tag = cache_from_source("x.py")
    suffix = os.fsencode(tag[tag.index("x.") + 1:])      # b".cpython-311.pyc"
    stack = [(root, b"")]
    while stack:
        d, where = stack.pop()
        pycs: list[tuple[bytes, _Node]] = []
        for name, node in d.children:
            if node.fmt == st_.S_IFDIR:
                stack.append((node, where + b"/" + name))
            elif node.fmt == st_.S_IFREG and name.endswith(b".py") and node.path is not None:
                pyc = _compile_one(node, os.fsdecode(where + b"/" + name), result)
                if pyc is not None:
                    pst = _Stat(st_.S_IFREG | 0o644, node.st.st_uid, node.st.st_gid, len(pyc),
                                node.st.st_mtime_ns)
                    made = _Node(None, pst, st_.S_IFREG)
                    made.data = pyc
                    pycs.append((name[:-3] + suffix, made))
        if not pycs:
            continue
        cache = next((n for name, n in d.children if name == b"__pycache__"), None)
        if cache is None or cache.fmt != st_.S_IFDIR:
            if cache is not None:
                result.skipped.append((os.fsdecode(cache.path or b"__pycache__"),
                                       "not a directory: no bytecode"))
                continue
            cst = _Stat(st_.S_IFDIR | 0o755, d.st.st_uid, d.st.st_gid, 0, time.time_ns())
            cache = _Node(None, cst, st_.S_IFDIR)
            d.children.append((b"__pycache__", cache))
            d.children.sort(key=lambda c: c[0])
        names = {name for name, _ in pycs}
        cache.children = [c for c in cache.children if c[0] not in names] + pycs
        cache.children.sort(key=lambda c: c[0])


def _compile_one(node: _Node, inner: str, result: PackResult) -> bytes | None:
    """Bytecode of one source file, named by its path inside the image; None if it does not compile."""
    from importlib._bootstrap_external import _code_to_timestamp_pyc

    path = node.path
    assert path is not None
    try:
        with open(path, "rb") as f:
            source = f.read()
        code = compile(source, inner, "exec", dont_inherit=True)
    except (OSError, SyntaxError, ValueError) as err:
        result.skipped.append((os.fsdecode(path) + " (bytecode)", f"not compiled: {err}"))
        return None
    return bytes(_code_to_timestamp_pyc(code, node.st.st_mtime, len(source)))


def _number(root: _Node, result: PackResult) -> list[_Node]:
    """Inode numbers in tree order (root 2, lost+found 11, the rest from 12); every node once."""
    root.ino = root.parent = ROOT_INO
    lost = next((n for name, n in root.children if name == b"lost+found"), None)
    if lost is not None and lost.fmt != st_.S_IFDIR:
        result.skipped.append((os.fsdecode(lost.path or b"lost+found"), "lost+found must be a directory"))
        root.children = [c for c in root.children if c[0] != b"lost+found"]
        lost = None
    if lost is None:
        now = time.time_ns()
        lost = _Node(None, _Stat(st_.S_IFDIR | 0o700, 0, 0, 0, now), st_.S_IFDIR)
        root.children.append((b"lost+found", lost))
        root.children.sort(key=lambda c: c[0])
    nodes = [root]
    ino = LOST_FOUND_INO + 1
    stack = [root]
    while stack:
        d = stack.pop()
        for _, node in d.children:
            if node.ino:
                result.hardlinks += 1                      # a further name of a file
                continue
            if node is lost:
                node.ino = LOST_FOUND_INO
            else:
                node.ino = ino
                ino += 1
            node.parent = d.ino
            nodes.append(node)
        stack.extend(reversed([n for _, n in d.children if n.fmt == st_.S_IFDIR]))
    for node in nodes:
        fmt = node.fmt
        if fmt == st_.S_IFDIR:
            result.dirs += 1
        elif fmt == st_.S_IFREG:
            result.files += 1
            result.bytes += len(node.data) if node.data is not None else _data_bytes(node)
        elif fmt == st_.S_IFLNK:
            result.symlinks += 1
        else:
            result.others += 1
    return nodes


def _data_bytes(node: _Node) -> int:
    if node.extents is not None:
        return sum(end - start for start, end in node.extents)
    return node.st.st_size


# -- sizing ----------------------------------------------------------------------------------

def _dir_blocks(node: _Node, bs: int) -> list[bytes]:
    """A directory's blocks: '.', '..' then its entries in name order, packed, each block's last
    entry running to the block's end (lost+found keeps mke2fs's 16 KiB)."""
    blocks: list[bytes] = []
    buf = bytearray(bs)
    pos = 0
    last = 0
    fts = L.IFMT_TO_FT
    entries = [(b".", node.ino, st_.S_IFDIR), (b"..", node.parent, st_.S_IFDIR)]
    entries += [(name, child.ino, child.fmt) for name, child in node.children]
    for name, ino, fmt in entries:
        need = rec_len_of(len(name))
        if pos + need > bs:
            _REC_LEN.pack_into(buf, last + _REC_LEN_AT, _last_rec_len(bs, last))
            blocks.append(bytes(buf))
            buf = bytearray(bs)
            pos = 0
        _DIRENT.pack_into(buf, pos, ino, need, len(name), fts[fmt])
        buf[pos + _HEADER:pos + _HEADER + len(name)] = name
        last = pos
        pos += need
    _REC_LEN.pack_into(buf, last + _REC_LEN_AT, _last_rec_len(bs, last))
    blocks.append(bytes(buf))
    if node.ino == LOST_FOUND_INO:
        blocks.extend([empty_block(bs)] * (lost_found_blocks(bs) - len(blocks)))
    return blocks


def _last_rec_len(bs: int, last: int) -> int:
    """The rec_len of a block's last entry, at ``last``, running to the block's end: 65536 (a
    whole 64 KiB block) is stored as 0, as Linux's ``ext2_rec_len_to_disk``; only an entry at 0
    can be that long."""
    n = bs - last
    return 0 if n == 65536 else n


def _file_blocks(node: _Node, bs: int) -> list[tuple[int, int]]:
    """``(first file block, count)`` ranges a regular file's data occupies."""
    if node.data is not None:
        n = -(-len(node.data) // bs)
        return [(0, n)] if n else []
    if node.extents is None:
        n = -(-node.st.st_size // bs)
        return [(0, n)] if n else []
    out: list[tuple[int, int]] = []
    for start, end in node.extents:
        first, stop = start // bs, -(-end // bs)
        if out and first <= out[-1][0] + out[-1][1]:
            f0, c0 = out.pop()
            first, stop = f0, max(stop, f0 + c0)
        out.append((first, stop - first))
    return out


def _geometry(nodes: list[_Node], size: int | None, bs: int, isize: int, extra: float | int) -> Geometry:
    """The geometry of the image: ``size`` given, or what the tree needs plus ``extra``."""
    _, _, ro = feature_words(None)
    sparse = bool(ro & L.RO_COMPAT_SPARSE_SUPER)
    need_inodes = max(n.ino for n in nodes)
    need = _blocks_needed(nodes, bs)
    if isinstance(extra, float):
        spare_blocks, spare_inodes = int(need * extra), int(need_inodes * extra)
    else:
        spare_blocks, spare_inodes = -(-int(extra) // bs), int(extra) // inode_ratio(int(extra) or 1)
    if size is not None:
        default = max(16, size // inode_ratio(size))
        try:
            return plan(size, bs, isize, max(default, need_inodes + 16), sparse)
        except ValueError as err:
            raise OSError(errno.ENOSPC, f"the tree needs more than {size} bytes ({err})") from None
    inodes = need_inodes + spare_inodes + 16
    want = need + spare_blocks
    blocks = want + want // 32 + 64
    for _ in range(64):
        try:
            geo = plan(blocks * bs, bs, isize, inodes, sparse)
        except ValueError:
            blocks += max(64, blocks // 8)
            continue
        room = sum(geo.group_blocks(g) - geo.overhead(g) for g in range(geo.groups))
        if room >= want:
            return geo
        blocks += want - room + 16
    raise OSError(errno.EFBIG, "cannot size an image for this tree")


def _blocks_needed(nodes: list[_Node], bs: int) -> int:
    p = bs // 4
    total = 0
    shared: dict[tuple, int] = {}
    for node in nodes:
        fmt = node.fmt
        if fmt == st_.S_IFDIR:
            node.blocks = _dir_blocks(node, bs)
            n = len(node.blocks)
            total += n + indirect_blocks_needed([(0, n)], p)
        elif fmt == st_.S_IFREG:
            if node.extents is None and node.data is None:     # the usual file: one run
                n = -(-node.st.st_size // bs)
                total += n + (indirect_blocks_needed([(0, n)], p) if n > 12 else 0)
            else:
                ranges = _file_blocks(node, bs)
                total += sum(n for _, n in ranges) + indirect_blocks_needed(ranges, p)
        elif fmt == st_.S_IFLNK and len(node.target) >= 60:
            total += 1
        if node.xattrs:
            shared[node.xattrs] = shared.get(node.xattrs, 0) + 1
    total += sum(-(-users // _XATTR_SHARE_MAX) for users in shared.values())
    return total


# -- layout and writing --------------------------------------------------------------------

class _Cursor:
    """Hands out blocks in order, group by group, skipping each group's metadata."""

    def __init__(self, geo: Geometry) -> None:
        self.geo = geo
        self.group = 0
        self.next = geo.group_start(0) + geo.overhead(0)
        self.end = geo.group_start(0) + geo.group_blocks(0)
        self.used = [0] * geo.groups

    def take(self, n: int) -> list[tuple[int, int]]:
        """``n`` blocks as runs ``(first, count)``; ENOSPC when the image is full."""
        first = self.next
        if first + n <= self.end:                        # the usual case: room in this group
            self.next = first + n
            self.used[self.group] += n
            return [(first, n)]
        geo = self.geo
        runs: list[tuple[int, int]] = []
        while n:
            end = self.end
            if self.next >= end:
                if self.group + 1 >= geo.groups:
                    raise OSError(errno.ENOSPC, "the tree does not fit in the image")
                self.group += 1
                self.next = geo.group_start(self.group) + geo.overhead(self.group)
                self.end = geo.group_start(self.group) + geo.group_blocks(self.group)
                continue
            k = min(n, end - self.next)
            runs.append((self.next, k))
            self.used[self.group] += k
            self.next += k
            n -= k
        return runs


class _Layout:
    """Where every node's blocks go; computed whole before the image is touched."""

    def __init__(self, geo: Geometry, nodes: list[_Node]) -> None:
        self.geo = geo
        self.nodes = nodes
        bs = geo.bs
        if max(n.ino for n in nodes) > geo.groups * geo.ipg:
            raise OSError(errno.ENOSPC, "the tree has more entries than the image has inodes")
        cur = _Cursor(geo)
        p = bs // 4
        reg = st_.S_IFREG
        xblocks: dict[tuple, list] = {}              # xattr set -> its block being filled
        #: Shared xattr blocks: [block, attributes, inodes using it (its refcount)].
        self.xattr_blocks: list[list] = []
        for node in nodes:
            if node.xattrs:
                slot = xblocks.get(node.xattrs)
                if slot is None or slot[2] >= _XATTR_SHARE_MAX:
                    slot = xblocks[node.xattrs] = [cur.take(1)[0][0], node.xattrs, 0]
                    self.xattr_blocks.append(slot)
                slot[2] += 1
                node.xattr_block = slot[0]
            fmt = node.fmt
            if fmt == reg and node.extents is None and node.data is None:
                n = -(-node.st.st_size // bs)
                first = cur.next
                if 0 < n <= 12 and first + n <= cur.end:    # the usual file: direct blocks, room here
                    cur.next = first + n
                    cur.used[cur.group] += n
                    node.runs = [(0, first, n)]
                    node.nblocks = n
                    continue
                if not n:
                    continue
                ranges = [(0, n)]
            elif fmt == st_.S_IFDIR:
                ranges = [(0, len(node.blocks))]
            elif fmt == reg:
                ranges = _file_blocks(node, bs)
            elif fmt == st_.S_IFLNK and len(node.target) >= 60:
                ranges = [(0, 1)]
            else:
                continue
            m = indirect_blocks_needed(ranges, p)
            if m:
                node.meta = [b for first, k in cur.take(m) for b in range(first, first + k)]
            for first, n in ranges:
                for pblk, k in cur.take(n):
                    node.runs.append((first, pblk, k))
                    first += k
                node.nblocks += n
        self.used = cur.used

    def write(self, dev: Device, geo: Geometry, filetype: bool, zeroed: bool, result: PackResult,
              bar: Any) -> list[GroupUse]:
        """Write everything into the freshly formatted ``dev``; what each group now holds.

        The files' data is copied first; then the inode table is built whole in memory, every
        inode as if its copy succeeded, and the few that did not (changed or vanished) are made
        empty and their blocks freed after."""
        assert (geo.blocks, geo.ipg, filetype) == (self.geo.blocks, self.geo.ipg, True)
        bs, isize = geo.bs, geo.isize
        nodes = self.nodes
        files = [n for n in nodes if n.fmt == st_.S_IFREG]
        failed = copy_files(_Copier(dev, zeroed), files, bs, result, bar)
        for blk, attrs, users in self.xattr_blocks:
            block = bytearray(build_block(list(attrs), bs))
            L.XATTR_HEADER.pack_field(block, "h_refcount", users)
            dev.write_new(block, blk * bs)
        last_ino = max(n.ino for n in nodes)
        table = bytearray(last_ino * isize)
        dirs = [0] * geo.groups
        put = _inode_writer(table, isize)
        direct = encode_direct_run
        sectors = bs // 512
        reg = st_.S_IFREG
        for node in nodes:
            fmt = node.fmt
            runs = node.runs
            if fmt == reg:
                size = len(node.data) if node.data is not None else node.st.st_size
                if len(runs) == 1 and not node.meta and runs[0][0] == 0:    # the usual small file
                    i_block = direct(runs[0][1], runs[0][2])
                else:
                    i_block = self._block_map(dev, node, bs)
                put(node, fmt, size, node.links, (node.nblocks + len(node.meta)
                                                  + (1 if node.xattr_block else 0)) * sectors, i_block)
                continue
            if fmt == st_.S_IFDIR:
                dirs[(node.ino - 1) // geo.ipg] += 1
                data = b"".join(node.blocks)
                for lblk, pblk, k in runs:
                    dev.write_new(data[lblk * bs:(lblk + k) * bs], pblk * bs)
                size = len(data)
            elif fmt == st_.S_IFLNK:
                size = len(node.target)
                if runs:
                    dev.write_new(node.target.ljust(bs, b"\0"), runs[0][1] * bs)
            else:
                size = 0
            links = node.links + (1 + sum(1 for _, c in node.children if c.fmt == st_.S_IFDIR)
                                  if fmt == st_.S_IFDIR else 0)
            blocks = (node.nblocks + len(node.meta) + (1 if node.xattr_block else 0)) * sectors
            put(node, fmt, size, links, blocks, self._block_map(dev, node, bs))
        freed: list[tuple[int, int]] = []
        for node in failed:                             # changed or vanished: packed empty
            freed.extend((pblk, k) for _, pblk, k in node.runs)
            freed.extend((b, 1) for b in node.meta)
            node.runs, node.meta, node.nblocks = [], [], 0
            put(node, node.fmt, 0, node.links, (1 if node.xattr_block else 0) * sectors, bytes(60))
        per_group = geo.ipg * isize
        for g in range(-(-last_ino // geo.ipg)):
            dev.write_new(table[g * per_group:(g + 1) * per_group], geo.inode_table(g) * bs)
        use = [GroupUse(self.used[g], min(geo.ipg, max(0, last_ino - g * geo.ipg)), dirs[g])
               for g in range(geo.groups)]
        for pblk, k in freed:
            _free_run(geo, use, pblk, k)
        return use

    def _block_map(self, dev: Device, node: _Node, bs: int) -> bytes:
        """``i_block`` for ``node``; its indirect blocks written."""
        fmt = node.fmt
        if fmt in (st_.S_IFCHR, st_.S_IFBLK):
            r = node.st.st_rdev
            return encode_rdev(os.major(r), os.minor(r))
        if fmt == st_.S_IFLNK and not node.runs:
            return node.target.ljust(60, b"\0")
        if not node.runs:
            return bytes(60)
        last = max(lblk + k for lblk, _, k in node.runs)
        if last <= 12 and len(node.runs) == 1 and node.runs[0][0] == 0:     # the usual small file
            first = node.runs[0][1]
            return encode_direct_run(first, last)
        pmap = array("I", bytes(4 * last))
        for lblk, pblk, k in node.runs:
            pmap[lblk:lblk + k] = array("I", range(pblk, pblk + k))
        return build_tree(dev, pmap, iter(node.meta), bs)


def _free_run(geo: Geometry, use: list[GroupUse], pblk: int, k: int) -> None:
    """Give back blocks laid out for a file that could not be copied (its group's bitmap
    becomes explicit)."""
    while k:
        g = (pblk - geo.first_data_block) // geo.bpg
        u = use[g]
        base = geo.group_start(g)
        if u.blocks_bitmap is None:
            used = geo.overhead(g) + u.blocks
            u.blocks_bitmap = bytearray(prefix_bitmap(used, geo.group_blocks(g), geo.bs))
        n = min(k, base + geo.group_blocks(g) - pblk)
        bits = u.blocks_bitmap
        assert isinstance(bits, bytearray)
        for i in range(pblk - base, pblk - base + n):
            bits[i >> 3] &= ~(1 << (i & 7))
        u.blocks -= n
        pblk += n
        k -= n


def _inode_writer(table: bytearray, isize: int) -> Callable[[_Node, int, int, int, int, bytes], None]:
    """``put(node, fmt, size, links, blocks, i_block)``: ``node``'s new inode stored into
    ``table`` (zeros) in place (:func:`~xipfs.extfs.inode.encode_fresh_into`)."""
    def put(node: _Node, fmt: int, size: int, links: int, blocks: int, i_block: bytes) -> None:
        s = node.st
        encode_fresh_into(table, (node.ino - 1) * isize, isize, st_.S_IMODE(s.st_mode) | fmt, s.st_uid,
                          s.st_gid, size, links, blocks, i_block, node.xattr_block, s.st_atime_ns,
                          s.st_ctime_ns, s.st_mtime_ns)

    return put


class _Copier:
    """Copies a file's data from its source into the image, by the cheapest path the device has:
    ``copy_file_range`` within one filesystem, ``sendfile`` from another (both copy in the
    kernel, page cache to page cache), or a read straight into the mapped image."""

    def __init__(self, dev: Device, zeroed: bool) -> None:
        self.dev = dev
        self.zeroed = zeroed
        self.fd = dev.fileno() if isinstance(dev, MemoryDevice) and getattr(dev, "_pwrite_ok", False) else -1
        self.kernel_copy = self.fd >= 0

    def copy(self, node: _Node, bs: int, result: PackResult) -> int:
        """The file's size, its data in place; -1 (reported) when it changed or vanished.

        One ``fstat`` after the copy checks the file against its scan (the same inode, size and
        mtime: a write during the copy moves the mtime), so a change at any time is caught."""
        if node.data is not None:
            if node.runs:
                self._write_runs(node, node.data, bs)
            return len(node.data)
        path = node.path
        assert path is not None
        try:
            fd = os.open(path, _READ_FLAGS)
        except OSError as err:
            result.skipped.append((os.fsdecode(path), _vanished(err) + ": packed empty"))
            return -1
        expect = node.st
        size = expect.st_size
        try:
            runs = node.runs
            short = False
            for lblk, pblk, k in runs:
                start = lblk * bs
                n = min(k * bs, size - start)
                if n > 0 and self._copy_range(fd, start, n, pblk * bs) < n:
                    short = True
                    break
            if short:
                result.skipped.append((os.fsdecode(path), "shrank while packing: packed empty"))
                return -1
            after = os.fstat(fd)
            if (after.st_ino, after.st_size, after.st_mtime_ns) != (expect.st_ino, size, expect.st_mtime_ns):
                result.skipped.append((os.fsdecode(path), "changed while packing: packed empty"))
                return -1
            lblk, pblk, k = runs[-1] if runs else (0, 0, 0)
            if not self.zeroed and size % bs and lblk + k == -(-size // bs):
                tail = bs - size % bs                          # no old bytes past the end
                self.dev.write(bytes(tail), (pblk + k) * bs - tail)
            return size
        except OSError as err:
            result.skipped.append((os.fsdecode(path), f"cannot read: {err.strerror}: packed empty"))
            return -1
        finally:
            os.close(fd)

    def _copy_range(self, fd: int, src: int, n: int, dst: int) -> int:
        """Copy ``n`` bytes at ``src`` of ``fd`` to image offset ``dst``; bytes copied."""
        done = 0
        if self.kernel_copy:
            try:
                while done < n:
                    k = os.copy_file_range(fd, self.fd, n - done, src + done, dst + done)
                    if k == 0:
                        return done
                    done += k
                return done
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                if not st_.S_ISREG(os.fstat(fd).st_mode):
                    raise                               # not a file any more: this one is reported
                self.kernel_copy = False            # another filesystem: sendfile from here on
        if self.fd >= 0:
            os.lseek(self.fd, dst, os.SEEK_SET)     # the image's descriptor is ours alone while packing
            while done < n:
                k = os.sendfile(self.fd, fd, src + done, n - done)
                if k == 0:
                    break
                done += k
            return done
        dev = self.dev
        if isinstance(dev, MemoryDevice):
            while done < n:                          # straight into the mapped image: one copy
                k = os.preadv(fd, [dev.view(dst + done, n - done)], src + done)
                if k == 0:
                    break
                done += k
            return done
        while done < n:
            chunk = os.pread(fd, min(n - done, 8 << 20), src + done)
            if not chunk:
                break
            dev.write(chunk, dst + done)
            done += len(chunk)
        return done

    def _write_runs(self, node: _Node, data: bytes, bs: int) -> None:
        for lblk, pblk, k in node.runs:
            self.dev.write_new(data[lblk * bs:(lblk + k) * bs].ljust(k * bs, b"\0"), pblk * bs)


def copy_files(copier: _Copier, files: list[_Node], bs: int, result: PackResult, bar: Any) -> list[_Node]:
    """Copy every file's data into the image, in order; the files that could not be copied
    (changed or vanished: reported in ``result``, to be packed empty)."""
    failed = []
    copy = copier.copy
    for node in files:
        if copy(node, bs, result) < 0:
            failed.append(node)
        bar.update(len(node.data) if node.data is not None else _data_bytes(node))
    return failed


# -- the target ------------------------------------------------------------------------------

def _open_target(target: str | Device, size: int) -> tuple[Device, bool, str | None]:
    """``(device, known all zeros, file to rename over the target when done)`` for the image,
    made ``size`` bytes. A file target is built as a new file beside it: the old image (and
    every mapping of it in other processes) stays whole until the new one replaces it, and a
    pack that fails leaves it as it was."""
    from ..device.detect import looks_like_shm_name, open_device

    if isinstance(target, Device):
        return target, False, None
    if looks_like_shm_name(target, bare=False) and not os.path.exists(target):
        return MemoryDevice.from_shm(target, create_size=size), True, None
    if os.path.exists(target) and not os.path.isfile(target):
        return open_device(target, readonly=False), False, None      # a block or DAX device
    head, _, tail = target.rpartition("/")
    temp = f"{head}/.{tail}.xipfs-pack-{os.getpid()}" if head or target.startswith("/") \
        else f".{tail}.xipfs-pack-{os.getpid()}"
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, os.stat(target).st_mode & 0o7777)        # keep the old image's mode
        os.ftruncate(fd, size)
    except BaseException:
        os.close(fd)
        os.unlink(temp)
        raise
    os.close(fd)
    try:
        return open_device(temp, readonly=False), True, temp
    except BaseException:
        os.unlink(temp)
        raise
