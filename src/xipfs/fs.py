"""The filesystem facade: ``xipfs.open()`` and an ``os``-like API over an ext2 image.

Names, arguments, return types and errors follow the ``os`` module, so code written for a
directory tree works on an image: ``fs.listdir``, ``fs.scandir``, ``fs.stat``, ``fs.walk``,
``fs.open`` and so on. Paths are absolute inside the image; a relative path is taken from the
image root.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterator
from typing import IO, Any

from .device import Device, open_device
from .errors import fs_error
from .ext2 import layout as L
from .ext2.inode import Inode, Run
from .ext2.volume import Volume
from .file import XipFile

PathArg = str | bytes | os.PathLike

_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)


def _fspath(path: PathArg) -> tuple[str, bool]:
    """``(path as str, whether the caller used bytes)``."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        return os.fsdecode(p), True
    return p, False


def _join(top: str, name: str) -> str:
    return top + name if top.endswith("/") else top + "/" + name


class Filesystem:
    """An ext2 image opened with :func:`xipfs.open`. Use it as a context manager."""

    def __init__(self, device: Device, mode: str = "r", *, owns_device: bool = True) -> None:
        self.device = device
        self.mode = mode
        self._owns_device = owns_device
        try:
            self.volume = Volume(device, readonly=True)
        except BaseException:
            if owns_device:
                device.close()
            raise
        self._dev_id = int.from_bytes(bytes(self.volume.sb.s_uuid[:4]), "little")

    # -- what this is -------------------------------------------------------------------------
    @property
    def is_xip(self) -> bool:
        """True when file data is read in place from memory storage (no page cache)."""
        return self.device.is_xip

    @property
    def readonly(self) -> bool:
        return True

    @property
    def block_size(self) -> int:
        return self.volume.bs

    @property
    def label(self) -> str:
        return self.volume.sb.label

    @property
    def uuid(self) -> str:
        return self.volume.sb.uuid

    @property
    def features(self) -> list[str]:
        return self.volume.sb.features

    # -- names --------------------------------------------------------------------------------
    def _inode(self, path: PathArg, follow: bool = True) -> Inode:
        p, _ = _fspath(path)
        return self.volume.resolve(p, follow)

    def _dir(self, path: PathArg) -> Inode:
        node = self._inode(path)
        if not node.is_dir:
            raise fs_error(errno.ENOTDIR, os.fspath(path))
        return node

    def listdir(self, path: PathArg = "/") -> list[Any]:
        """Names in directory ``path`` (not ``.`` and ``..``), in on-disk order, like ``os.listdir``."""
        names = self.volume.dir_index(self._dir(path)).names()
        if _fspath(path)[1]:
            return [os.fsencode(n) for n in names]
        return names

    def scandir(self, path: PathArg = "/") -> ScandirIterator:
        """Entries of directory ``path`` as :class:`DirEntry` objects, like ``os.scandir``."""
        p, as_bytes = _fspath(path)
        node = self._dir(p)
        return ScandirIterator(self, p, as_bytes, list(self.volume.dir_index(node).entries.items()))

    def walk(self, top: PathArg = "/", topdown: bool = True, onerror: Any = None,
             followlinks: bool = False) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        """Directory tree generator, like ``os.walk``."""
        stack: list[Any] = [top]
        while stack:
            top = stack.pop()
            if isinstance(top, tuple):  # bottom-up: the entry to yield after its children
                yield top
                continue
            dirs, nondirs, walk_into = [], [], []
            try:
                with self.scandir(top) as it:
                    for entry in it:
                        try:
                            is_dir = entry.is_dir()
                        except OSError:
                            is_dir = False
                        (dirs if is_dir else nondirs).append(entry.name)
                        if is_dir and not topdown and (followlinks or not entry.is_symlink()):
                            walk_into.append(entry.path)
            except OSError as err:
                if onerror is not None:
                    onerror(err)
                continue
            if topdown:
                yield top, dirs, nondirs
                for name in reversed(dirs):
                    new = _join(top, name) if isinstance(top, str) else os.path.join(top, name)
                    if followlinks or not self.islink(new):
                        stack.append(new)
            else:
                stack.append((top, dirs, nondirs))
                stack.extend(reversed(walk_into))

    # -- metadata -----------------------------------------------------------------------------
    def stat(self, path: PathArg, *, follow_symlinks: bool = True) -> os.stat_result:
        """``os.stat_result`` of ``path`` (nanosecond times in ``st_*_ns``), like ``os.stat``."""
        return self.stat_inode(self._inode(path, follow_symlinks))

    def lstat(self, path: PathArg) -> os.stat_result:
        """Like :meth:`stat` without following a final symlink."""
        return self.stat_inode(self._inode(path, False))

    def stat_inode(self, node: Inode) -> os.stat_result:
        """The ``os.stat_result`` of an inode (cached: the read-only image never changes)."""
        st = node._stat
        if st is None:
            rdev = 0
            fmt = node.mode & 0o170000
            if fmt == 0o020000 or fmt == 0o060000:
                rdev = os.makedev(*node.rdev)
            a, m, c = node.atime_ns, node.mtime_ns, node.ctime_ns
            st = node._stat = os.stat_result((
                node.mode, node.ino, self._dev_id, node.links, node.uid, node.gid, node.size,
                a // 1_000_000_000, m // 1_000_000_000, c // 1_000_000_000,
                a / 1e9, m / 1e9, c / 1e9, a, m, c, self.volume.bs, node.blocks, rdev))
        return st

    def exists(self, path: PathArg) -> bool:
        """True if ``path`` names something (following symlinks), like ``os.path.exists``."""
        try:
            self._inode(path)
        except OSError as err:
            if err.errno in _MISSING:
                return False
            raise
        return True

    def lexists(self, path: PathArg) -> bool:
        try:
            self._inode(path, False)
        except OSError as err:
            if err.errno in _MISSING:
                return False
            raise
        return True

    def _is(self, path: PathArg, fmt: int, follow: bool = True) -> bool:
        try:
            node = self._inode(path, follow)
        except OSError as err:
            if err.errno in _MISSING:
                return False
            raise
        return (node.mode & 0o170000) == fmt

    def isdir(self, path: PathArg) -> bool:
        return self._is(path, 0o040000)

    def isfile(self, path: PathArg) -> bool:
        return self._is(path, 0o100000)

    def islink(self, path: PathArg) -> bool:
        return self._is(path, 0o120000, follow=False)

    def readlink(self, path: PathArg) -> Any:
        """The target of symlink ``path``, like ``os.readlink``."""
        p, as_bytes = _fspath(path)
        node = self.volume.resolve(p, False)
        if not node.is_symlink:
            raise fs_error(errno.EINVAL, p)
        target = self.volume.readlink(node)
        return target if as_bytes else os.fsdecode(target)

    def getxattr(self, path: PathArg, attribute: str | bytes, *, follow_symlinks: bool = True) -> bytes:
        """The value of extended attribute ``attribute``, like ``os.getxattr`` (ENODATA if absent)."""
        name = os.fsdecode(attribute)
        for key, value in self.volume.xattrs(self._inode(path, follow_symlinks)):
            if key == name:
                return value
        raise OSError(errno.ENODATA, os.strerror(errno.ENODATA), _fspath(path)[0])

    def listxattr(self, path: PathArg = "/", *, follow_symlinks: bool = True) -> list[str]:
        """Names of the extended attributes of ``path``, like ``os.listxattr``."""
        return [key for key, _ in self.volume.xattrs(self._inode(path, follow_symlinks))]

    def statvfs(self, path: PathArg = "/") -> os.statvfs_result:
        """Filesystem totals, like ``os.statvfs`` (counted the way Linux ext2 counts them)."""
        self._inode(path)
        sb = self.volume.sb
        overhead = sb.s_first_data_block + sum(
            (1 + sb.desc_blocks if sb.group_has_super(g) else 0) + 2 + sb.itable_blocks
            for g in range(sb.groups))
        bfree = sb.s_free_blocks_count
        bavail = max(0, bfree - sb.s_r_blocks_count)
        uuid = bytes(sb.s_uuid)
        fsid = int.from_bytes(uuid[:8], "little") ^ int.from_bytes(uuid[8:], "little")
        return os.statvfs_result((
            sb.block_size, sb.block_size, sb.s_blocks_count - overhead, bfree, bavail,
            sb.s_inodes_count, sb.s_free_inodes_count, sb.s_free_inodes_count,
            os.ST_RDONLY | os.ST_NOSUID, 255, fsid))

    # -- data ---------------------------------------------------------------------------------
    def open(self, path: PathArg, mode: str = "r", buffering: int = -1, encoding: str | None = None,
             errors: str | None = None, newline: str | None = None) -> IO[Any]:
        """Open a file of the image, like the built-in ``open`` (read modes)."""
        if mode == "rb" and buffering == 0:
            return self._open_raw(path)
        chars = set(mode)
        if not mode or len(chars) != len(mode) or chars - set("rwaxbt+") or "t" in chars and "b" in chars:
            raise ValueError(f"invalid mode: {mode!r}")
        if chars & set("wax+"):
            raise fs_error(errno.EROFS, _fspath(path)[0])
        binary = "b" in chars
        if binary and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        raw = self._open_raw(path)
        if buffering == 0:
            if not binary:
                raise ValueError("can't have unbuffered text I/O")
            return raw
        line_buffering = buffering == 1 and not binary
        size = buffering if buffering > 1 else max(io.DEFAULT_BUFFER_SIZE, self.volume.bs)
        buffered = io.BufferedReader(raw, size)
        if binary:
            return buffered
        text = io.TextIOWrapper(buffered, io.text_encoding(encoding), errors, newline,
                                line_buffering=line_buffering)
        text.mode = mode  # type: ignore[misc]
        return text

    def _open_raw(self, path: PathArg) -> XipFile:
        p, _ = _fspath(path)
        node = self.volume.resolve(p, True)
        if not node.is_reg:
            if node.is_dir:
                raise fs_error(errno.EISDIR, p)
            raise fs_error(errno.ENXIO, p)
        return XipFile(self.volume, node, p)

    def read_bytes(self, path: PathArg) -> bytes:
        """The whole content of file ``path`` (one copy)."""
        p, _ = _fspath(path)
        node = self.volume.resolve(p, True)
        if not node.is_reg:
            raise fs_error(errno.EISDIR if node.is_dir else errno.ENXIO, p)
        return self.volume.read_bytes(node, 0, node.size)

    def read_text(self, path: PathArg, encoding: str | None = None, errors: str | None = None) -> str:
        """The content of file ``path`` decoded as text (universal newlines, like ``pathlib``)."""
        with self.open(path, "r", encoding=encoding, errors=errors) as f:
            return f.read()

    # -- the XIP layer, visible ---------------------------------------------------------------
    def get_xip_mem(self, path: PathArg, pgoff: int, create: bool = False) -> memoryview | None:
        """The seed's ``get_xip_mem``: block ``pgoff`` of file ``path`` as a view of the storage.

        Returns None for a hole. On a memory device the view is the storage itself (no copy);
        on a file device it is a page of the page cache.
        """
        return self.volume.get_xip_mem(self._inode(path), pgoff, create)

    def block_runs(self, path: PathArg) -> list[Run]:
        """The runs of file ``path``: ``(file block, count, device block or 0 for a hole)``."""
        node = self._inode(path)
        if not node.is_reg and not node.is_dir:
            return []
        return node.map.runs(0, node.map.nblocks)

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the image. Views handed out stay valid until they are released."""
        if self._owns_device:
            self.volume.close()

    def __enter__(self) -> Filesystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        path = "XIP" if self.is_xip else "page cache"
        return f"<xipfs.Filesystem {self.device.name!r} {self.mode} {path}>"


class DirEntry:
    """One entry of :meth:`Filesystem.scandir`, like ``os.DirEntry``."""

    __slots__ = ("name", "path", "_fs", "_ino", "_ftype", "_node", "_stat")

    def __init__(self, fs: Filesystem, name: Any, path: Any, ino: int, ftype: int) -> None:
        self._fs = fs
        self.name = name
        self.path = path
        self._ino = ino
        self._ftype = ftype
        self._node: Inode | None = None

    def inode(self) -> int:
        return self._ino

    def _mode(self) -> int:
        fmt = L.FT_TO_IFMT.get(self._ftype)
        if fmt is None:
            if self._node is None:
                self._node = self._fs.volume.inode(self._ino)
            return self._node.mode & 0o170000
        return fmt

    def is_symlink(self) -> bool:
        return self._mode() == 0o120000

    def is_dir(self, *, follow_symlinks: bool = True) -> bool:
        fmt = self._mode()
        if fmt == 0o120000 and follow_symlinks:
            return self._fs.isdir(self.path)
        return fmt == 0o040000

    def is_file(self, *, follow_symlinks: bool = True) -> bool:
        fmt = self._mode()
        if fmt == 0o120000 and follow_symlinks:
            return self._fs.isfile(self.path)
        return fmt == 0o100000

    def is_junction(self) -> bool:
        return False

    def stat(self, *, follow_symlinks: bool = True) -> os.stat_result:
        if follow_symlinks and self.is_symlink():
            return self._fs.stat(self.path)
        return self._fs.stat_inode(self._fs.volume.inode(self._ino))

    def __fspath__(self) -> Any:
        return self.path

    def __repr__(self) -> str:
        return f"<xipfs.DirEntry {self.name!r}>"


class ScandirIterator:
    """The iterator :meth:`Filesystem.scandir` returns; also a context manager, like ``os``'s."""

    def __init__(self, fs: Filesystem, top: str, as_bytes: bool,
                 entries: list[tuple[str, tuple[int, int]]]) -> None:
        self._fs = fs
        self._top = top
        self._bytes = as_bytes
        self._it = iter(entries)

    def __iter__(self) -> ScandirIterator:
        return self

    def __next__(self) -> DirEntry:
        name, (ino, ftype) = next(self._it)
        path = _join(self._top, name)
        if self._bytes:
            return DirEntry(self._fs, os.fsencode(name), os.fsencode(path), ino, ftype)
        return DirEntry(self._fs, name, path, ino, ftype)

    def close(self) -> None:
        self._it = iter(())

    def __enter__(self) -> ScandirIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open(image: PathArg | Device, mode: str = "r", *, xip: bool | None = None,  # noqa: A001
         cache_bytes: int | None = None) -> Filesystem:
    """Open an ext2 image.

    ``image`` is a path (an image file, a block device, a DAX device), a POSIX shared-memory
    name, or a :class:`~xipfs.device.Device`. Memory-backed storage (tmpfs, hugetlbfs, DAX,
    shared memory) is read in place (``fs.is_xip``); anything else goes through a bounded page
    cache of ``cache_bytes``. ``xip`` forces either path.
    """
    if mode not in ("r", "rb"):
        raise ValueError(f"mode {mode!r}: this version of xipfs opens images read-only ('r')")
    owns = not isinstance(image, Device)
    device = open_device(image, readonly=True, xip=xip, cache_bytes=cache_bytes)
    return Filesystem(device, "r", owns_device=owns)
