"""The filesystem facade: ``xipfs.open()`` and an ``os``-like API over an ext2 image.

Names, arguments, return types and errors follow the ``os`` module, so code written for a
directory tree works on an image: ``fs.listdir``, ``fs.scandir``, ``fs.stat``, ``fs.walk``,
``fs.open`` and so on. Paths are absolute inside the image; a relative path is taken from the
image root.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import functools
import io
import os
import sys
import time
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING, Any

from .device import Device
from .device.detect import open_container
from .errors import CorruptImageError, XipfsError, fs_error, named
from .extfs import data as _data
from .extfs import layout as L
from .extfs import namei
from .extfs.data import get_xip_mem, read_bytes, windowed_segments
from .extfs.groups import statfs_overhead
from .extfs.indirect import HUGE_PAGE
from .extfs.inode import Inode, Run
from .extfs.mount import sync, unmount
from .extfs.namei import PATH_MAX, name_moved, readlink, resolve
from .extfs.volume import Volume
from .extfs.xattr import get_xattr, read_xattrs
from .nodes import Nodes
from .progress import ProgressArg
from .xip.file import XipFile
from .xip.mapping import PAGE, Mapping, detach, map_file

if TYPE_CHECKING:
    from .extfs.check import Problem

PathArg = str | bytes | os.PathLike

_MISSING = (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.ENAMETOOLONG)

#: What ``os.link`` does on Linux when ``follow_symlinks`` is not given. Python 3.14 calls
#: ``linkat(AT_SYMLINK_FOLLOW)``: the symlink's target gets the name. Before, it called
#: ``link(2)``, which on Linux gives the new name to the symlink itself (python/cpython#81793).
LINK_FOLLOWS_SYMLINKS = sys.version_info >= (3, 14)


def _fspath(path: PathArg) -> tuple[str, bool]:
    """``(path as str, whether the caller used bytes)``."""
    p = os.fspath(path)
    if isinstance(p, bytes):
        return os.fsdecode(p), True
    return p, False


def _join(top: str, name: str) -> str:
    return top + name if top.endswith("/") else top + "/" + name


#: A str path shorter than this many characters is under PATH_MAX in any encoding (4 bytes a
#: character at most): the hot paths (stat, open, read_bytes) take it without ``_fspath``'s checks.
SHORT_PATH = PATH_MAX // 4


class Filesystem:
    """An ext2 image opened with :func:`xipfs.open`. Use it as a context manager."""

    def __init__(self, device: Device, mode: str = "r", *, owns_device: bool = True,
                 lock: bool = False, verify: bool = True) -> None:
        self.device = device
        self.mode = mode
        self._owns_device = owns_device
        try:
            if lock and mode == "r":
                device.lock(exclusive=False)
            self.volume = Volume(device, readonly=mode == "r", verify=verify)
        except BaseException:
            if owns_device:
                with contextlib.suppress(OSError):   # the reason it failed is what to report
                    device.close()
            raise
        self._dev_id = int.from_bytes(bytes(self.volume.sb.s_uuid[:4]), "little")
        #: The same filesystem by inode number (what the FUSE mount drives; changes go
        #: through it from here too).
        self.nodes = Nodes(self)
        #: Owner of new files: the effective user and group when the image was opened.
        self._owner = (os.geteuid(), os.getegid())
        #: The longest path a call takes, in bytes with the NUL (Linux's PATH_MAX, enforced as
        #: ``getname`` does): ENAMETOOLONG beyond. A door that passes on paths assembled
        #: elsewhere (a FUSE mount gets paths from the mount's root, as deep as the tree)
        #: sets it to None; paths built inside (symlinks followed) are never limited.
        self.path_max: int | None = PATH_MAX

    @functools.cached_property
    def _umask(self) -> int:
        """The process umask when this filesystem first created something (as ``open`` uses it)."""
        return current_umask()

    # -- what this is -------------------------------------------------------------------------
    @property
    def is_xip(self) -> bool:
        """True when file data is read in place from memory storage (no page cache)."""
        return self.device.is_xip

    @property
    def readonly(self) -> bool:
        return self.volume.readonly

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
    def _fspath(self, path: PathArg) -> tuple[str, bool]:
        """``(path as str, whether the caller used bytes)``; ENAMETOOLONG for a path Linux
        would refuse before looking at it (``path_max`` bytes or more with the NUL)."""
        p, as_bytes = _fspath(path)
        limit = self.path_max
        if limit is not None and len(p) >= limit // 4 and len(os.fsencode(p)) >= limit:
            raise fs_error(errno.ENAMETOOLONG, p)
        return p, as_bytes

    def _inode(self, path: PathArg, follow: bool = True) -> Inode:
        p, _ = self._fspath(path)
        return resolve(self.volume, p, follow)

    def _dir(self, path: PathArg) -> Inode:
        node = self._inode(path)
        if not node.is_dir:
            raise fs_error(errno.ENOTDIR, os.fspath(path))
        return node

    def listdir(self, path: PathArg = "/") -> list[Any]:
        """Names in directory ``path`` (not ``.`` and ``..``), in on-disk order, like ``os.listdir``."""
        names = self.volume.dir_index(self._dir(path)).names()
        if self._fspath(path)[1]:
            return [os.fsencode(n) for n in names]
        return names

    def scandir(self, path: PathArg = "/") -> ScandirIterator:
        """Entries of directory ``path`` as :class:`DirEntry` objects, like ``os.scandir``."""
        p, as_bytes = self._fspath(path)
        node = self._dir(p)
        return ScandirIterator(self, p, as_bytes, list(self.volume.dir_index(node).entries.items()))

    def walk(self, top: PathArg = "/", topdown: bool = True, onerror: Any = None,
             followlinks: bool = False) -> Iterator[tuple[Any, list[Any], list[Any]]]:
        """Directory tree generator, like ``os.walk``.

        A directory that contains itself by its real names means the image links a directory
        into itself (ext2 has no directory hard links): that raises :class:`CorruptImageError`.
        A followed symlink back to an ancestor is skipped, so no walk runs forever.
        """
        try:
            start = self.stat(top).st_ino
        except OSError as err:
            if onerror is not None and not isinstance(err, XipfsError):
                onerror(err)
                return
            raise
        stack: list[Any] = [(top, frozenset({start}))]
        while stack:
            top, ancestors = stack.pop()
            if ancestors is None:               # bottom-up: the entry to yield after its children
                yield top
                continue
            dirs, nondirs, subdirs = [], [], []
            try:
                with self.scandir(top) as it:
                    for entry in it:
                        try:
                            is_dir = entry.is_dir()
                        except OSError as err:
                            if isinstance(err, XipfsError):
                                raise
                            is_dir = False
                        (dirs if is_dir else nondirs).append(entry.name)
                        if is_dir:
                            subdirs.append(entry)
            except OSError as err:
                if isinstance(err, XipfsError):
                    raise
                if onerror is not None:
                    onerror(err)
                continue
            into = {}
            for entry in subdirs:
                link = entry.is_symlink()
                if link and not followlinks:
                    continue
                ino = entry.stat().st_ino if link else entry.inode()
                if ino in ancestors:
                    if link:                    # a symlink back up the tree: do not loop
                        continue
                    raise CorruptImageError(f"directory cycle: {os.fsdecode(entry.path)!r} is inode "
                                            f"{ino}, one of its own ancestors",
                                            f"directory {os.fsdecode(top)!r}")
                into[entry.name] = (entry.path, ancestors | {ino})
            if topdown:
                yield top, dirs, nondirs
                for name in reversed(dirs):       # the caller may have pruned ``dirs``
                    if name in into:
                        stack.append(into[name])
            else:
                stack.append(((top, dirs, nondirs), None))
                stack.extend(reversed([into[n] for n in dirs if n in into]))

    # -- metadata -----------------------------------------------------------------------------
    def stat(self, path: PathArg, *, follow_symlinks: bool = True) -> os.stat_result:
        """``os.stat_result`` of ``path`` (nanosecond times in ``st_*_ns``), like ``os.stat``."""
        if isinstance(path, str) and len(path) < SHORT_PATH:     # the hot path: no checks needed
            node = resolve(self.volume, path, follow_symlinks)
        else:
            node = self._inode(path, follow_symlinks)
        st = node._stat
        return st if st is not None else self.stat_inode(node)

    def birthtime_ns(self, path: PathArg, *, follow_symlinks: bool = True) -> int | None:
        """When ``path`` was created, in nanoseconds (ext4's ``i_crtime``, what ``statx`` calls
        ``stx_btime``; ``os.stat_result`` has no field for it on Linux), None where the inode
        does not record it (ext2, 128-byte inodes)."""
        return self._inode(path, follow_symlinks).crtime_ns

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
                a / 1e9, m / 1e9, c / 1e9, a, m, c, self.volume.bs, node.st_blocks, rdev))
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
        p, as_bytes = self._fspath(path)
        node = resolve(self.volume, p, False)
        if not node.is_symlink:
            raise fs_error(errno.EINVAL, p)
        target = readlink(self.volume, node)
        return target if as_bytes else os.fsdecode(target)

    def getxattr(self, path: PathArg, attribute: str | bytes, *, follow_symlinks: bool = True) -> bytes:
        """The value of extended attribute ``attribute``, like ``os.getxattr`` (ENODATA if absent)."""
        p, _ = self._fspath(path)
        node = resolve(self.volume, p, follow_symlinks)
        try:
            return get_xattr(self.volume, node, os.fsdecode(attribute))
        except OSError as err:
            raise named(err, p) from None

    def listxattr(self, path: PathArg = "/", *, follow_symlinks: bool = True) -> list[str]:
        """Names of the extended attributes of ``path``, like ``os.listxattr``."""
        return [key for key, _ in read_xattrs(self.volume, self._inode(path, follow_symlinks))]

    def statvfs(self, path: PathArg = "/") -> os.statvfs_result:
        """Filesystem totals, like ``os.statvfs`` (counted the way Linux ext2 counts them)."""
        self._inode(path)
        sb = self.volume.sb
        overhead, reserve = statfs_overhead(self.volume)
        groups = self.volume.groups             # live counts, summed as Linux's statfs does
        bfree = sum(gd.free_blocks for gd in groups) * sb.cluster_ratio
        ffree = sum(gd.free_inodes for gd in groups)
        bavail = max(0, bfree - sb.s_r_blocks_count - reserve)
        uuid = bytes(sb.s_uuid)
        fsid = int.from_bytes(uuid[:8], "little") ^ int.from_bytes(uuid[8:], "little")
        flags = os.ST_NOSUID | (os.ST_RDONLY if self.readonly else 0)
        return os.statvfs_result((
            sb.block_size, sb.block_size, sb.s_blocks_count - overhead, bfree, bavail,
            sb.s_inodes_count, ffree, ffree, flags, 255, fsid))

    # -- data ---------------------------------------------------------------------------------
    def open(self, path: PathArg, mode: str = "r", buffering: int = -1, encoding: str | None = None,
             errors: str | None = None, newline: str | None = None) -> IO[Any]:
        """Open a file of the image, like the built-in ``open`` (all its modes)."""
        if mode == "rb" and buffering == 0:          # the hot path: no parsing, no lock
            p = path if isinstance(path, str) and len(path) < SHORT_PATH else self._fspath(path)[0]
            node = resolve(self.volume, p, True)
            if (node.mode & 0o170000) == 0o100000:
                return XipFile(self.volume, node, p)
            return self._open_raw(p, mode, True, False, False, False, False)
        chars = set(mode)
        if (not mode or len(chars) != len(mode) or chars - set("rwaxbt+")
                or len(chars & set("rwax")) != 1 or ("t" in chars and "b" in chars)):
            raise ValueError(f"invalid mode: {mode!r}")
        binary = "b" in chars
        if binary and (encoding is not None or errors is not None or newline is not None):
            raise ValueError("binary mode doesn't take an encoding, errors or newline argument")
        plus = "+" in chars
        readable = "r" in chars or plus
        writable = bool(chars & set("wax")) or plus
        raw = self._open_raw(path, mode, readable, writable, "a" in chars, "w" in chars,
                             "x" in chars, create=bool(chars & set("wax")))
        if buffering == 0:
            if not binary:
                raw.close()
                raise ValueError("can't have unbuffered text I/O")
            return raw
        line_buffering = buffering == 1 and not binary
        size = buffering if buffering > 1 else max(io.DEFAULT_BUFFER_SIZE, self.volume.bs)
        if readable and writable:
            buffered: Any = io.BufferedRandom(raw, size)
        elif writable:
            buffered = io.BufferedWriter(raw, size)
        else:
            buffered = io.BufferedReader(raw, size)
        if binary:
            return buffered
        text = io.TextIOWrapper(buffered, io.text_encoding(encoding), errors, newline,
                                line_buffering=line_buffering)
        text.mode = mode  # type: ignore[misc]
        return text

    def _open_raw(self, path: PathArg, mode: str, readable: bool, writable: bool, append: bool,
                  trunc: bool, excl: bool, create: bool = False) -> XipFile:
        p, _ = self._fspath(path)
        vol = self.volume
        if writable and vol.readonly:
            raise fs_error(errno.EROFS, p)
        if not create:
            node = resolve(vol, p, True)
        else:
            with vol.lock:
                if excl and self.lexists(p):          # O_EXCL: even a dangling symlink counts
                    raise fs_error(errno.EEXIST, p)
                try:
                    node = resolve(vol, p, True)
                except FileNotFoundError:
                    node = self._create(p, 0o100000 | (0o666 & ~self._umask))
        if not node.is_reg:
            if node.is_dir:
                raise fs_error(errno.EISDIR, p)
            raise fs_error(errno.ENXIO, p)
        if trunc and node.size:
            with vol.lock:
                _data.truncate(vol, node, 0)
        f = XipFile(vol, node, p, mode, readable=readable, writable=writable, append=append)
        if append:
            f.seek(0, os.SEEK_END)
        return f

    def mmap(self, path: PathArg, access: str = "r", offset: int = 0, length: int | None = None) -> Mapping:
        """Map file ``path`` into memory: the storage itself on a memory device (``is_xip``).

        ``access`` is ``"r"`` (read-only buffers; writes raise ``TypeError``) or ``"w"`` (needs
        ``"r+"``; holes get blocks first). ``offset`` is a multiple of the page size and
        ``offset + length`` stays within the file, as for :func:`mmap.mmap`. Elsewhere (the
        file device, blocks below a page, a file too fragmented for the budget) the mapping
        is a private copy with ``is_xip`` False, written back by ``flush()``/``close()``.
        """
        p, _ = self._fspath(path)
        vol = self.volume
        for attempt in range(2):
            try:
                node = resolve(vol, p, True)
            except OSError as err:
                raise named(err, p) from None
            try:
                return map_file(vol, node, p, access, offset, length)
            except FileNotFoundError:
                if attempt:                   # a writer elsewhere deleted what the cache held:
                    raise                     # the caches are dropped, look the name up again
        raise AssertionError("unreachable")

    def map_array(self, path: PathArg, dtype: Any = "uint8", shape: Any = None, offset: int = 0,
                  access: str = "r", chunks: Any = None) -> Any:
        """A numpy array over a mapping of ``path`` from byte ``offset`` (no copy on XIP).

        ``shape`` None means as many items as fit; any ``offset`` works (the mapping starts at
        the page below it). The array keeps the mapping alive; read-only unless ``access="w"``.
        Needs numpy (the ``numpy`` extra).

        ``chunks``: a dask array instead (the ``dask`` extra), each chunk a view of the mapping
        made on the worker that computes it; workers open the image by its name (a shared-memory
        name or a path: deliver it to them first with :func:`xipfs.dask.deliver`).
        """
        import numpy as np
        dt = np.dtype(dtype)
        if chunks is not None:
            if access != "r":
                raise ValueError("a dask array over an image is read-only (access='r')")
            name = self.device.name        # what the workers open: an absolute path, or a shm name
            if self.device.base_offset or not (os.path.exists(name) or name.startswith("/")):
                raise ValueError(f"a dask array needs an image the workers can open by name, not {name!r}")
            from .xip.arrays import map_array as dask_map_array
            p = self._fspath(path)[0]
            if shape is None:              # from the open image, not a second attachment
                shape = ((self.stat(p).st_size - offset) // dt.itemsize,)
            return dask_map_array(os.path.abspath(name) if os.path.exists(name) else name, p, dt, shape,
                                  offset, chunks)
        start = offset - offset % PAGE
        node = self._inode(path)
        if shape is None:
            count = (node.size - offset) // dt.itemsize
            shape = (count,)
        elif isinstance(shape, int):
            shape = (shape,)
        nbytes = int(np.prod(shape)) * dt.itemsize
        if offset < 0 or offset + nbytes > node.size:
            raise ValueError(f"{nbytes} bytes from offset {offset} do not fit in a {node.size}-byte file")
        m = self.mmap(path, access, start, offset + nbytes - start)
        if m.writable and not m.is_xip:      # nothing would write a copy back when it goes
            m.close()
            raise OSError(errno.EOPNOTSUPP, "a writable array needs an XIP mapping here; use "
                          "fs.mmap(path, 'w') and flush() it", path)
        return np.ndarray(shape, dtype=dt, buffer=m, offset=offset - start)

    def open_async(self, path: PathArg, mode: str = "rb") -> Any:
        """An asyncio file object on ``path`` (``async with fs.open_async(p) as f: await f.read()``).

        The seed's ``aio_read``/``aio_write``: on a memory device a copy needs no thread; on the
        file device the I/O runs off the event loop.
        """
        from .xip.aio import open_async
        return open_async(self, path, mode)

    def sendfile(self, sock: Any, path: PathArg, offset: int = 0, count: int | None = None) -> int:
        """Send file ``path`` (``count`` bytes from ``offset``; to EOF if None) to socket ``sock``."""
        with self.open(path, "rb", buffering=0) as f:
            return f.sendfile(sock, offset, count)

    def read_bytes(self, path: PathArg) -> bytes:
        """The whole content of file ``path`` (one copy)."""
        p = path if isinstance(path, str) and len(path) < SHORT_PATH else self._fspath(path)[0]
        vol = self.volume
        for _ in range(8):
            node = resolve(vol, p, True)
            if not node.is_reg:
                raise fs_error(errno.EISDIR if node.is_dir else errno.ENXIO, p)
            data = read_bytes(vol, node, 0, node.size)
            if not name_moved(vol, p, node):
                return data
            # the name was read while a writer in another process moved it: read it again
        raise OSError(errno.EAGAIN, "the image kept changing under a writer in another process", p)

    def read_text(self, path: PathArg, encoding: str | None = None, errors: str | None = None) -> str:
        """The content of file ``path`` decoded as text (universal newlines, like ``pathlib``)."""
        with self.open(path, "r", encoding=encoding, errors=errors) as f:
            return f.read()

    # -- changing the image (os names, os errors) ---------------------------------------------
    def _writable(self, path: object = None) -> Volume:
        vol = self.volume
        if vol.readonly:
            raise fs_error(errno.EROFS, path)
        return vol

    def _parent(self, p: str) -> tuple[Inode, bytes]:
        """The directory that holds ``p``'s last name, and that name (as bytes)."""
        parent, tail = self._parent_str(p)
        return parent, os.fsencode(tail)

    def _parent_str(self, p: str) -> tuple[Inode, str]:
        """The directory that holds ``p``'s last name, and that name."""
        head, _, tail = p.rstrip("/").rpartition("/")
        if not tail:
            raise fs_error(errno.EBUSY if p.strip("/") == "" else errno.ENOENT, p)
        try:
            parent = resolve(self.volume, head or "/", True)
        except OSError as err:                # named by the whole path, as os names it
            raise named(err, p) from None
        if not parent.is_dir:
            raise fs_error(errno.ENOTDIR, p)
        return parent, tail

    def _create(self, p: str, mode: int, **kw: Any) -> Inode:
        """Make ``p`` (following a dangling symlink at its end, as ``open(O_CREAT)`` does)."""
        vol = self.volume
        for _ in range(40):
            parent, name = self._parent(p)
            entry = vol.dir_index(parent).entries.get(os.fsdecode(name))
            if entry is not None and (mode & 0o170000) == 0o100000:
                link = vol.inode(entry[0])
                if link.is_symlink:
                    target = os.fsdecode(readlink(vol, link))
                    p = target if target.startswith("/") else p.rstrip("/").rpartition("/")[0] + "/" + target
                    continue
            uid, gid = self._owner
            if parent.mode & 0o2000:                       # setgid directory: inherit its group
                gid = parent.gid
                if (mode & 0o170000) == 0o040000:
                    mode |= 0o2000
            try:
                return namei.create(vol, parent, name, mode, uid, gid, **kw)
            except OSError as err:
                raise named(err, p) from None
        raise fs_error(errno.ELOOP, p)

    def _named(self, call: Any, path: object, *args: Any) -> Any:
        """Run a namei operation, giving its error the path the caller used."""
        vol = self._writable(path)
        with vol.lock:
            try:
                return call(vol, *args)
            except OSError as err:
                if isinstance(err, XipfsError) or err.filename is not None:
                    raise
                raise named(err, path) from None

    def mkdir(self, path: PathArg, mode: int = 0o777) -> None:
        """Create directory ``path``, like ``os.mkdir`` (the process umask applies)."""
        p, _ = self._fspath(path)
        vol = self._writable(p)
        with vol.lock:
            # set-id bits are not taken from ``mode`` (a setgid parent passes its S_ISGID on)
            self._create(p.rstrip("/") or "/", 0o040000 | (mode & 0o1777 & ~self._umask))

    def makedirs(self, name: PathArg, mode: int = 0o777, exist_ok: bool = False) -> None:
        """Create ``name`` and the missing directories above it, like ``os.makedirs``.

        As there, ``mode`` applies to the last directory only.
        """
        p, _ = self._fspath(name)
        head, _, tail = p.rstrip("/").rpartition("/")
        if head and tail and not self.exists(head):
            with contextlib.suppress(FileExistsError):
                self.makedirs(head, exist_ok=exist_ok)
            if tail == ".":
                return
        try:
            self.mkdir(p, mode)
        except OSError:
            if not exist_ok or not self.isdir(p):
                raise

    def _remove(self, path: PathArg, op: Any) -> None:
        p, _ = self._fspath(path)
        vol = self._writable(p)
        with vol.lock:
            parent, name = self._parent(p)
            self._named(op, p, parent, name)

    def rmdir(self, path: PathArg) -> None:
        """Remove the empty directory ``path``, like ``os.rmdir``."""
        self._remove(path, namei.rmdir)

    def unlink(self, path: PathArg) -> None:
        """Remove the file ``path``, like ``os.unlink`` (a file open here lives until closed)."""
        self._remove(path, namei.unlink)

    remove = unlink

    def rename(self, src: PathArg, dst: PathArg) -> None:
        """Rename ``src`` to ``dst``, replacing ``dst`` if it exists, like ``os.rename``."""
        s, _ = self._fspath(src)
        d, _ = self._fspath(dst)
        vol = self._writable(s)
        with vol.lock:
            sparent, sname = self._parent(s)
            dparent, dname = self._parent(d)
            self._named(namei.rename, s, sparent, sname, dparent, dname)

    replace = rename

    def link(self, src: PathArg, dst: PathArg, *,
             follow_symlinks: bool = LINK_FOLLOWS_SYMLINKS) -> None:
        """Make ``dst`` a new name of the file ``src``, like ``os.link`` on Linux.

        ``follow_symlinks`` True gives the name to what a symlink ``src`` points to
        (``linkat(AT_SYMLINK_FOLLOW)``), False to the symlink itself (``link(2)`` on Linux).
        Left out, it does what ``os.link`` does on this Python: Python 3.14 and later follow,
        earlier ones link the symlink itself (:data:`LINK_FOLLOWS_SYMLINKS`).
        """
        s, _ = self._fspath(src)
        d, _ = self._fspath(dst)
        vol = self._writable(d)
        with vol.lock:
            node = resolve(vol, s, follow_symlinks)
            parent, name = self._parent(d)
            self._named(namei.link, d, node, parent, name)

    def symlink(self, src: PathArg, dst: PathArg, target_is_directory: bool = False) -> None:
        """Make ``dst`` a symbolic link to ``src``, like ``os.symlink`` (fast below 60 bytes)."""
        target = os.fsencode(src)
        if not target:
            raise fs_error(errno.ENOENT, os.fspath(dst))
        if self.path_max is not None and len(target) >= self.path_max:
            raise fs_error(errno.ENAMETOOLONG, os.fsdecode(target))   # a string like a path
        d, _ = self._fspath(dst)
        vol = self._writable(d)
        with vol.lock:
            parent, name = self._parent(d)
            self._named(lambda v, *a: namei.create(v, *a, target=target), d, parent, name,
                        0o120777, *self._owner)

    def mknod(self, path: PathArg, mode: int = 0o600, device: int = 0) -> None:
        """Create a FIFO, socket, or character/block device node, like ``os.mknod``."""
        p, _ = self._fspath(path)
        fmt = mode & 0o170000 or 0o100000
        if fmt not in (0o010000, 0o020000, 0o060000, 0o140000, 0o100000):
            raise fs_error(errno.EINVAL, p)
        vol = self._writable(p)
        rdev = (os.major(device), os.minor(device)) if fmt in (0o020000, 0o060000) else None
        with vol.lock:
            self._create(p, fmt | (mode & 0o7777 & ~self._umask), rdev=rdev)

    def mkfifo(self, path: PathArg, mode: int = 0o666) -> None:
        self.mknod(path, 0o010000 | (mode & 0o7777))

    def _on_node(self, path: PathArg, follow: bool, change: Any) -> None:
        """Run ``change(inode)`` on what ``path`` names, under the writer's lock, its errors
        named by ``path``. The changes themselves are :class:`~xipfs.nodes.Nodes`' (the facade
        by inode, which the FUSE mount uses too), so both doors change an inode one way."""
        p, _ = self._fspath(path)
        vol = self._writable(p)
        with vol.lock:
            node = resolve(vol, p, follow)
            try:
                change(node)
            except OSError as err:
                if isinstance(err, XipfsError) or err.filename is not None:
                    raise
                raise named(err, p) from None

    def chmod(self, path: PathArg, mode: int, *, follow_symlinks: bool = True) -> None:
        """Change the permission bits of ``path``, like ``os.chmod``; an access ACL follows
        the new bits, as on Linux (else it would still grant what the mode now refuses)."""
        self._on_node(path, follow_symlinks, lambda node: self.nodes.chmod(node, mode))

    def chown(self, path: PathArg, uid: int, gid: int, *, follow_symlinks: bool = True) -> None:
        """Change owner and group of ``path`` (-1 keeps one), like ``os.chown``: a file that is
        not a directory loses its set-user-id bit (and set-group-id with group execute), as on
        Linux."""
        self._on_node(path, follow_symlinks, lambda node: self.nodes.chown(node, uid, gid))

    def utime(self, path: PathArg, times: tuple[float, float] | None = None, *,
              ns: tuple[int, int] | None = None, follow_symlinks: bool = True) -> None:
        """Set access and modification times, like ``os.utime`` (nanoseconds kept on 256-byte inodes)."""
        if times is not None and ns is not None:
            raise ValueError("utime: you may specify either 'times' or 'ns' but not both")
        if ns is None:
            if times is None:
                now = time.time_ns()
                ns = (now, now)
            else:
                ns = (int(times[0] * 1e9), int(times[1] * 1e9))
        atime, mtime = ns
        self._on_node(path, follow_symlinks,
                      lambda node: self.nodes.setattr(node, atime_ns=atime, mtime_ns=mtime))

    def truncate(self, path: PathArg, length: int) -> None:
        """Resize file ``path`` to ``length`` bytes, like ``os.truncate``."""
        self._on_node(path, True, lambda node: self.nodes.truncate(node, length))

    def setxattr(self, path: PathArg, attribute: str | bytes, value: bytes, flags: int = 0, *,
                 follow_symlinks: bool = True) -> None:
        """Set extended attribute ``attribute``, like ``os.setxattr`` (XATTR_CREATE/REPLACE).

        As on Linux: ``user.*`` only on regular files and directories (EPERM elsewhere), POSIX
        ACLs set the mode bits, and none on a symlink (EOPNOTSUPP).
        """
        self._on_node(path, follow_symlinks,
                      lambda node: self.nodes.setxattr(node, attribute, value, flags))

    def removexattr(self, path: PathArg, attribute: str | bytes, *, follow_symlinks: bool = True) -> None:
        """Remove extended attribute ``attribute``, like ``os.removexattr`` (ENODATA if absent,
        but an absent POSIX ACL is removed without error, as on Linux)."""
        self._on_node(path, follow_symlinks, lambda node: self.nodes.removexattr(node, attribute))

    def write_bytes(self, path: PathArg, data: Any) -> int:
        """Create or replace file ``path`` with ``data``, like ``pathlib.Path.write_bytes``.

        A new file gets its content before its name appears (one step fewer, never seen empty).
        """
        p, _ = self._fspath(path)
        view = memoryview(data).cast("B")
        vol = self._writable(p)
        with vol.lock:
            if view.nbytes:
                parent, key = self._parent_str(p)
                if key not in vol.dir_index(parent).entries:
                    name = os.fsencode(key)
                    uid, gid = self._owner
                    if parent.mode & 0o2000:                   # setgid directory
                        gid = parent.gid
                    mode = 0o100000 | (0o666 & ~self._umask)
                    try:
                        namei.check_name(name)
                        if view.nbytes <= vol.bs * 12:          # the direct blocks: one lean pass
                            namei.create_small(vol, parent, name, mode, uid, gid, view, key)
                        else:
                            namei.create(vol, parent, name, mode, uid, gid, content=view)
                        return view.nbytes
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise named(err, p) from None
        with self.open(path, "wb", buffering=0) as f:
            done = 0
            while done < view.nbytes:
                done += f.write(view[done:])
            return done

    def write_text(self, path: PathArg, data: str, encoding: str | None = None,
                   errors: str | None = None, newline: str | None = None) -> int:
        """Create or replace file ``path`` with text, like ``pathlib.Path.write_text``."""
        with self.open(path, "w", encoding=encoding, errors=errors, newline=newline) as f:
            return f.write(data)

    def sync(self) -> None:
        """Make everything written durable: free counts, backups, msync or write-back + fsync."""
        sync(self.volume)

    # -- the XIP layer, visible ---------------------------------------------------------------
    def get_xip_mem(self, path: PathArg, pgoff: int, create: bool = False) -> memoryview | None:
        """The seed's ``get_xip_mem``: block ``pgoff`` of file ``path`` as a view of the storage.

        Returns None for a hole. On a memory device the view is the storage itself (no copy);
        on a file device it is a page of the page cache.
        """
        return get_xip_mem(self.volume, self._inode(path), pgoff, create)

    def iter_views(self, path: PathArg, size: int,
                   window: int = 64 << 20) -> Iterator[tuple[int, int, memoryview | None]]:
        """``(offset, length, view of the storage or None for a hole)`` covering the first
        ``size`` bytes of file ``path``, a ``window`` of runs at a time (memory devices: no copy).

        The runs of each window are taken under the lock, so a writer here never changes them
        half-read; a file that shrinks meanwhile ends the iteration early.
        """
        vol = self.volume
        view = vol.device.view
        for off, length, where in windowed_segments(vol, self._inode(path), 0, size, window):
            yield off, length, view(where, length) if where >= 0 else None

    def forget_cached(self) -> None:
        """Drop cached names and inodes, so a read-only attachment sees what another process's
        writer has changed since (``importlib.invalidate_caches`` does this for imports)."""
        self.volume.forget_cached()

    def unmount(self) -> None:
        """Write everything back, mark the image clean and unlock it, keeping the device open
        for views and mappings still in use; :meth:`close` releases it later."""
        detach(self.volume)
        unmount(self.volume)

    def block_runs(self, path: PathArg) -> list[Run]:
        """The runs of file ``path``: ``(file block, count, device block or 0 for a hole)``."""
        node = self._inode(path)
        if not node.is_reg and not node.is_dir:
            return []
        return node.map.runs(0, node.map.nblocks)

    def huge_runs(self, path: PathArg) -> list[Run]:
        """The parts of ``path``'s runs that a 2 MiB page can map: 2 MiB-aligned both in the
        file and in the device (with its place in a disk image), whole 2 MiB pieces, as
        ``(file block, count, device block)``. Linux's DAX maps these with huge pages."""
        per = HUGE_PAGE // self.volume.bs
        shift = self.device.base_offset // self.volume.bs
        out = []
        for lblk, count, pblk in self.block_runs(path):
            if not pblk or (pblk + shift - lblk) % per:
                continue                             # a hole, or the file and device disagree
            a = -(-lblk // per) * per
            b = (lblk + count) // per * per
            if b > a:
                out.append((a, b - a, pblk + (a - lblk)))
        return out

    # -- consistency ------------------------------------------------------------------------
    def check(self, progress: ProgressArg = None) -> list[Problem]:
        """What ``e2fsck -fn`` would find wrong with this image, as :class:`~xipfs.Problem` data
        (an empty list: clean). Read-only; a writable filesystem is synced first."""
        from .extfs.check import check_volume

        return check_volume(self.volume, progress)

    # -- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        """Write everything back, mark the image clean, release it.

        Views handed out stay valid until they are released; writable copy-backed mappings
        are written back first.
        """
        detach(self.volume)
        if self._owns_device:
            self.volume.close()
        else:
            unmount(self.volume)

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

    def _inode(self) -> Inode:
        if self._node is None:
            self._node = self._fs.volume.live_inode(self._ino, os.fsdecode(self.name),
                                                    f"directory entry {os.fsdecode(self.path)!r}")
        return self._node

    def _mode(self) -> int:
        fmt = L.FT_TO_IFMT.get(self._ftype)
        if fmt is None:
            return self._inode().mode & 0o170000
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
        return self._fs.stat_inode(self._inode())

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
         cache_bytes: int | None = None, lock: bool = False, partition: int | None = None,
         offset: int | None = None, verify: bool = True) -> Filesystem:
    """Open an ext2 or ext4 image, ``"r"`` to read or ``"r+"`` to read and write (ext2).

    ``image`` is a path (an image file, a block device, a DAX device), a POSIX shared-memory
    name, a URL (``https://``, ``s3://``... read-only, fetched lazily by range requests through
    a page cache), or a :class:`~xipfs.device.Device`. Memory-backed storage (tmpfs, hugetlbfs, DAX,
    shared memory) is read and written in place (``fs.is_xip``); anything else goes through a
    bounded page cache of ``cache_bytes``. ``xip`` forces either path.

    A whole disk: ``partition=N`` opens its partition N (MBR or GPT, numbered as Linux numbers
    ``loop0pN``; see :func:`xipfs.partitions`), ``offset=`` the filesystem at that byte. An
    Android sparse image is recognised by its magic and read through its chunk table.
    ``verify=False`` skips ext4's metadata checksums (for forensic reading of a damaged image).

    One writer at a time: ``"r+"`` takes an exclusive lock on the image and fails with
    ``OSError(EBUSY)`` naming the holder. A reader that wants a consistent image passes
    ``lock=True`` and fails the same way while a writer has it.
    """
    if mode not in ("r", "rb", "r+", "rb+", "r+b"):
        raise ValueError(f"invalid mode: {mode!r} (use 'r' or 'r+')")
    rw = "+" in mode
    owns = not isinstance(image, Device)
    device = open_container(image, readonly=not rw, xip=xip, cache_bytes=cache_bytes,
                            partition=partition, offset=offset)
    owns = owns or device is not image
    return Filesystem(device, "r+" if rw else "r", owns_device=owns, lock=lock, verify=verify)


def check(image: PathArg | Device, *, progress: ProgressArg = None, partition: int | None = None,
          offset: int | None = None) -> list[Problem]:
    """Check the ext2 image ``image`` read-only, as ``e2fsck -fn`` does; the problems found.

    Works on images too damaged to open (their group descriptors, say); only a superblock that
    describes no filesystem raises :class:`~xipfs.CorruptImageError`. Takes the reader's lock,
    so a writer in another process is not caught half-way (``OSError(EBUSY)`` then).
    """
    from .extfs.check import check_image

    return check_image(image, progress=progress, partition=partition, offset=offset)[0]


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``), 0o022 if unknown."""
    try:
        with builtins.open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022
