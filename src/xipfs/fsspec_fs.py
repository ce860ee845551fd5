"""An fsspec filesystem over ext2 images: protocol ``ext2`` (the ``fsspec`` extra).

Any fsspec-aware library (pandas, pyarrow, dask, xarray) reads and writes files inside an image::

    fsspec.open("ext2://data/x.csv::/dev/shm/data.img")              # chained URL, read-only
    fs = fsspec.filesystem("ext2", fo="/dev/shm/data.img", mode="r+")
    pd.read_csv("ext2://data/x.csv::/dev/shm/data.img")
    df.to_csv("ext2://out.csv::/dev/shm/data.img", storage_options={"ext2": {"mode": "r+"}})

It follows fsspec's own archive filesystems (``zip``, ``tar``): ``fo`` names the image, paths
inside are relative to its root (``"data/x.csv"``; a leading ``/`` and ``ext2://`` are
stripped), ``target_protocol``/``target_options`` say how to reach ``fo``.

Where the image can be:

* a local path or a POSIX shared-memory name (``"/name"``): opened with :func:`xipfs.open`, so
  an image on memory storage is read and written in place (XIP), anything else through
  xipfs's page cache. ``xip=`` and ``cache_bytes=`` are passed on.
* a URL anywhere else fsspec reaches (``https://``, ``s3://``, ``gs://``): read lazily, only
  the blocks asked for, by range requests through xipfs's page cache with readahead (http and
  https with the standard library; see :mod:`xipfs.device.remote`); a ``memory://`` image or
  an open file object is read whole into anonymous memory once (then read in place).
  Read-only: ``mode="r+"`` is refused (``ValueError``); write an image where it can be
  changed in place.

Sharing and lifetime: all instances in a process that name the same image (the same file, by
device and inode, or the same shared-memory object) share one attachment, whatever their
arguments or thread, so there is one writer per image and readers see its changes at once.
``mode="r+"`` mounts the image for writing (an exclusive lock, as :func:`xipfs.open`); every
write-side operation, and the close of every file opened for writing, ends with a sync, so
another process sees a consistent image between operations (its caches permitting). ``close()``
(or ``with fs:``, or exit of the process) closes the files still open for writing, writes
everything back and marks the image clean: ``e2fsck -fn`` finds it clean and another process
may open it for writing. A closed instance leaves fsspec's instance cache, so the next
``fsspec.filesystem(...)`` with the same arguments makes a fresh one. A read-only attachment
caches metadata; ``invalidate_cache()`` drops it to see changes made by another process.
``xip=``/``cache_bytes=`` take effect when an image is first attached in the process. An
``"r+"`` instance pickled to another process (dask, multiprocessing) tries to open the image
for writing there, and fails with EBUSY while this process holds it: one writer per image.
In a URL, ``mode="r+"`` goes in the protocol's own options, as for ``zip``:
``fsspec.open("ext2://x::/dev/shm/img", "wb", ext2={"mode": "r+"})``.

Data paths: ``cat_file`` copies once, from the storage into the ``bytes`` it returns;
``open(path, "rb")`` is an :class:`io.BufferedReader` over xipfs's file object, whose whole
``read()`` (and any read larger than its buffer) also copies once; ``get_file`` writes the
file's runs of blocks straight from the storage to the local file (holes stay holes);
``cp_file`` copies storage to storage. For no copy at all, ``fs.mmap(path)`` is an
:class:`xipfs.Mapping` (buffer protocol: ``numpy.frombuffer``, ``memoryview``), the storage
itself on a memory device.

Listings mirror :class:`fsspec.implementations.local.LocalFileSystem`: ``info`` keys ``name``,
``size``, ``type`` ("file", "directory", "other"), ``created`` (ext2 keeps no birth time: the
ctime, as LocalFileSystem on Linux), ``islink``, ``mode``, ``uid``, ``gid``, ``mtime``,
``ino``, ``nlink`` and ``destination`` for symlinks. ``info`` follows a symlink (a dangling
one is FileNotFoundError), an ``ls`` entry describes the link itself (type "other", the size of
its target), so ``walk``/``find`` do not descend into linked directories.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import hashlib
import io
import os
import shutil
import stat
import threading
import weakref
from collections.abc import Callable, Iterator
from glob import has_magic
from typing import Any

try:
    import fsspec
    from fsspec.callbacks import DEFAULT_CALLBACK
    from fsspec.implementations.local import LocalFileOpener, LocalFileSystem
    from fsspec.spec import AbstractFileSystem
    from fsspec.utils import isfilelike, tokenize
except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
    raise ImportError("xipfs.fsspec_fs needs fsspec: pip install xipfs[fsspec]") from exc

from .device import Device, MemoryDevice
from .device.detect import looks_like_shm_name
from .errors import CorruptImageError, fs_error
from .fs import Filesystem
from .fs import open as xipfs_open
from .xip.mapping import Mapping

__all__ = ["Ext2FileSystem", "Ext2File", "Ext2RandomFile", "Ext2WriteFile"]

#: Files up to this size are copied in one piece; larger ones in pieces of this size.
CHUNK = 4 << 20
#: Bytes of a file's runs resolved at once (under the volume lock) when copying from storage.
WINDOW = 64 << 20
_LOCAL_PROTOCOLS = (None, "file", "local")


# -- the images this process has attached -----------------------------------------------------
class _Image:
    """One image attached in this process, shared by every instance that names it.

    ``writer`` is the ``"r+"`` Filesystem while any ``"r+"`` instance is open; reads go to it
    then, so readers see every change. Without a writer, reads go to ``reader`` (read-only,
    opened on first use). When the last writer closes, its Filesystem is unmounted (written
    back, marked clean, unlocked) at once, and kept until the last instance goes, because files
    opened through it may still be read.
    """

    def __init__(self, key: Any, opener: Callable[[str], Filesystem], source: str,
                 can_write: bool, device: Device | None = None) -> None:
        self.key = key
        self.source = source
        self.pid = os.getpid()
        self._opener = opener
        self._can_write = can_write
        self._device = device
        self.lock = threading.RLock()
        self.reader: Filesystem | None = None
        self.writer: Filesystem | None = None
        self._retired: list[Filesystem] = []
        self.users = 0
        self.writers = 0
        #: Files open for writing: closed (flushed) when their instance or the process closes.
        self.handles: weakref.WeakSet[_WriteSide] = weakref.WeakSet()
        self.closed = False

    def acquire(self, writable: bool) -> None:
        with self.lock:
            if writable:
                if not self._can_write:
                    raise ValueError(f"mode='r+' needs an image on local storage or in shared memory; "
                                     f"{self.source!r} is not (use mode='r', or copy it there first)")
                if self.writer is None:
                    self.writer = self._opener("r+")
                self.writers += 1
            elif self.writer is None and self.reader is None:
                self.reader = self._opener("r")      # errors (missing, corrupt) show up now
            self.users += 1

    def for_reading(self) -> Filesystem:
        fs = self.writer
        if fs is not None:
            return fs
        fs = self.reader
        if fs is None:
            with self.lock:
                if self.writer is not None:
                    return self.writer
                if self.reader is None:
                    self.reader = self._opener("r")
                fs = self.reader
        return fs

    def release(self, writable: bool) -> None:
        with self.lock:
            if self.closed:
                return
            self.users -= 1
            if writable:
                self.writers -= 1
                if self.writers == 0 and self.writer is not None:
                    self._retire_writer()
            if self.users <= 0:
                self.close()

    def _retire_writer(self) -> None:
        """Unmount the writer now (the image is clean and unlocked); close its device later."""
        writer, self.writer = self.writer, None
        assert writer is not None
        try:
            writer.unmount()
        finally:
            self._retired.append(writer)
            if self.reader is not None:          # it cached the image as it was before
                self.reader.forget_cached()

    def close(self) -> None:
        """Close every Filesystem of this image (the process ends, or no instance is left)."""
        with self.lock:
            if self.closed:
                return
            for f in list(self.handles):
                with contextlib.suppress(Exception):
                    f.close()
            self.closed = True
            with _IMAGES_LOCK:
                if _IMAGES.get(self.key) is self:
                    del _IMAGES[self.key]
            todo = [fs for fs in (self.writer, self.reader, *self._retired) if fs is not None]
            self.writer = self.reader = None
            self._retired = []
            try:
                for fs in todo:
                    fs.close()
            finally:
                if self._device is not None:
                    self._device.close()


_IMAGES: dict[Any, _Image] = {}
_IMAGES_LOCK = threading.RLock()


def _close_all() -> None:
    """At exit: every image this process attached is written back and marked clean."""
    for image in list(_IMAGES.values()):
        if image.pid == os.getpid():
            with contextlib.suppress(Exception):
                image.close()


def _forget_after_fork() -> None:
    """A forked child must not write through (or unmount) its parent's attachments."""
    _IMAGES.clear()


atexit.register(_close_all)
os.register_at_fork(after_in_child=_forget_after_fork)


def _local_source(fo: Any, target_protocol: str | None) -> str | None:
    """The local path or shared-memory name ``fo`` names, or None when it is elsewhere."""
    if isinstance(fo, fsspec.core.OpenFile):
        return fo.path if isinstance(fo.fs, LocalFileSystem) else None
    if isinstance(fo, LocalFileOpener):
        return fo.path
    if not isinstance(fo, (str, os.PathLike)) or target_protocol not in _LOCAL_PROTOCOLS:
        return None
    path = os.fspath(fo)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    proto, sep, rest = path.partition("://")
    if sep:
        return LocalFileSystem._strip_protocol(path) if proto in ("file", "local") else None
    if "::" in path:
        return None
    return path


def _identity(source: str) -> Any:
    """What makes two names the same image: device and inode (a shm name is its /dev/shm file)."""
    path = source
    if not os.path.exists(path) and looks_like_shm_name(path):
        path = "/dev/shm/" + path.lstrip("/")
    try:
        st = os.stat(path)
    except OSError:
        return ("name", os.path.abspath(source))   # opening it will raise the real error
    return ("inode", st.st_dev, st.st_ino)


def _download(fo: Any, target_protocol: str | None, target_options: dict | None) -> MemoryDevice:
    """Read a remote image (or a file object) whole into anonymous memory, once."""
    if isinstance(fo, (str, os.PathLike)):
        fo = fsspec.open(os.fspath(fo), "rb", protocol=target_protocol, **(target_options or {}))
    ctx = fo if isinstance(fo, fsspec.core.OpenFile) else contextlib.nullcontext(fo)
    with ctx as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(0)
        if size <= 0:
            raise CorruptImageError("image too small to hold a superblock", f"{fo!r}: 0 bytes")
        dev = MemoryDevice.anonymous(size)
        try:
            view = dev.buffer
            done = 0
            readinto = getattr(f, "readinto", None)
            while done < size:
                if readinto is not None:
                    n = readinto(view[done:])
                else:
                    piece = f.read(min(CHUNK, size - done))
                    n = len(piece)
                    view[done:done + n] = piece
                if not n:
                    raise CorruptImageError(f"image ended at byte {done} of {size}", repr(fo))
                done += n
        except BaseException:
            dev.close()
            raise
    return dev


def _remote(fo: Any, target_protocol: str | None, target_options: dict | None,
            cache_bytes: int | None) -> Device:
    """A remote image named by a URL, read lazily (range requests, the page cache); a file
    object, an fsspec OpenFile or a ``memory://`` image (in memory already), read whole into
    anonymous memory, where it is read in place."""
    memory = target_protocol == "memory" or str(fo).startswith("memory://")
    if isinstance(fo, (str, os.PathLike)) and not memory:
        from .device.remote import open_remote_target

        return open_remote_target(os.fspath(fo), target_protocol, target_options, cache_bytes)
    return _download(fo, target_protocol, target_options)


def _attach(fo: Any, writable: bool, target_protocol: str | None, target_options: dict | None,
            open_kw: dict[str, Any]) -> _Image:
    """The shared attachment of image ``fo`` (made on first use), with one more user."""
    source = _local_source(fo, target_protocol)
    with _IMAGES_LOCK:
        if source is not None:
            key = (*_identity(source), open_kw.get("partition"), open_kw.get("offset"))
            image = _IMAGES.get(key)
            if image is None or image.closed or image.pid != os.getpid():
                def opener(mode: str, source: str = source) -> Filesystem:
                    return xipfs_open(source, mode, **open_kw)
                image = _IMAGES[key] = _Image(key, opener, source, True)
        else:
            if writable:
                raise ValueError(f"mode='r+' needs an image on local storage or in shared memory; "
                                 f"{fo!r} is not (use mode='r', or copy it there first)")
            if isinstance(fo, (str, os.PathLike, fsspec.core.OpenFile)):
                key = ("remote", tokenize(fo, target_protocol, target_options, sorted(open_kw.items())))
            else:
                key = ("object", id(fo), object())     # a file object: never shared
            image = _IMAGES.get(key)
            if image is None or image.closed or image.pid != os.getpid():
                dev = _remote(fo, target_protocol, target_options, open_kw.get("cache_bytes"))

                container = {k: v for k, v in open_kw.items() if k in ("partition", "offset", "verify")}

                def opener(mode: str, dev: Device = dev, kw: dict = container) -> Filesystem:
                    return xipfs_open(dev, mode, **kw)
                image = _IMAGES[key] = _Image(key, opener, repr(fo), False, dev)
        try:
            image.acquire(writable)
        except BaseException:
            if image.users == 0:
                image.close()
            raise
    return image


# -- errors --------------------------------------------------------------------------------------
def _fix(err: OSError) -> OSError:
    """Name the path in ``err`` as fsspec does (relative to the image root, no leading '/')."""
    for attr in ("filename", "filename2"):
        value = getattr(err, attr)
        if isinstance(value, str) and value.startswith("/"):
            setattr(err, attr, value[1:])
    return err


def _info(name: str, st: os.stat_result, link: bool, size: int | None = None,
          destination: str | None = None) -> dict[str, Any]:
    """An info dict with LocalFileSystem.info's keys, from ``st``."""
    fmt = stat.S_IFMT(st.st_mode)
    kind = "directory" if fmt == stat.S_IFDIR else "file" if fmt == stat.S_IFREG else "other"
    out = {"name": name, "size": st.st_size if size is None else size, "type": kind,
           "created": st.st_ctime, "islink": link, "mode": st.st_mode, "uid": st.st_uid,
           "gid": st.st_gid, "mtime": st.st_mtime, "ino": st.st_ino, "nlink": st.st_nlink}
    if link:
        out["destination"] = destination
    return out


def _mode_chars(mode: str) -> set[str]:
    """The letters of a binary file mode, checked as ``open`` checks them (ValueError if invalid)."""
    chars = set(mode)
    if len(chars) != len(mode) or chars - set("rwaxb+") or len(chars & set("rwax")) != 1:
        raise ValueError(f"invalid mode: {mode!r}")
    return chars


def _join(parent: str, name: str) -> str:
    return f"{parent}/{name}" if parent else name


# -- the filesystem ------------------------------------------------------------------------------
class Ext2FileSystem(AbstractFileSystem):
    """Files inside an ext2 image as an fsspec filesystem (protocol ``ext2``).

    ``fo``: the image (a path, a shared-memory name, an fsspec URL or open file); ``mode``:
    ``"r"`` or ``"r+"``; ``target_protocol``/``target_options``: how to reach a remote ``fo``;
    ``auto_mkdir``: make missing parent directories when opening a file for writing (as
    LocalFileSystem's option); ``xip``/``cache_bytes``/``partition``/``offset``/``verify``:
    passed to :func:`xipfs.open`.
    """

    protocol = "ext2"
    root_marker = ""

    def __init__(self, fo: Any = "", mode: str = "r", target_protocol: str | None = None,
                 target_options: dict | None = None, auto_mkdir: bool = False,
                 xip: bool | None = None, cache_bytes: int | None = None, partition: int | None = None,
                 offset: int | None = None, verify: bool | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mode not in ("r", "r+"):
            raise ValueError(f"mode {mode!r} not understood (use 'r' or 'r+')")
        if isinstance(fo, str) and not fo:
            raise ValueError("fo: name the ext2 image (a path, a shared-memory name or a URL)")
        self.fo = fo
        self.mode = mode
        self.target_protocol = target_protocol
        self.target_options = target_options
        self.auto_mkdir = auto_mkdir
        options = (("xip", xip), ("cache_bytes", cache_bytes), ("partition", partition), ("offset", offset),
                   ("verify", verify))
        self._open_kw = {k: v for k, v in options if v is not None}
        self._local = threading.local()
        self._closed = False
        self._image = _attach(fo, mode == "r+", target_protocol, target_options, self._open_kw)

    # -- paths -----------------------------------------------------------------------------------
    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        return super()._strip_protocol(path).lstrip("/")

    # -- which Filesystem serves this instance -----------------------------------------------------
    def _live_image(self) -> _Image:
        image = self._image
        if self._closed:
            raise ValueError(f"{self!r} is closed")
        if image.closed or image.pid != os.getpid():       # after fork, or closed at exit
            self._image = image = _attach(self.fo, self.mode == "r+", self.target_protocol,
                                          self.target_options, self._open_kw)
        return image

    def _reader(self) -> Filesystem:
        image = self._image
        if self._closed or image.closed or image.pid != os.getpid():
            image = self._live_image()
        return image.for_reading()

    def _writer(self, path: str = "") -> Filesystem:
        if self.mode != "r+":
            raise OSError(errno.EROFS, "image opened read-only: pass mode='r+' (in a URL: "
                          "storage_options={'ext2': {'mode': 'r+'}})", path)
        writer = self._live_image().writer
        assert writer is not None
        return writer

    @contextlib.contextmanager
    def _writing(self, path: str = "") -> Iterator[Filesystem]:
        """The writer, errors named as fsspec does, and a sync at the end of the outermost change."""
        writer = self._writer(path)
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        try:
            yield writer
        except OSError as err:
            raise _fix(err) from None
        finally:
            local.depth = depth
            if depth == 0:
                writer.sync()

    def _after_write(self, writer: Filesystem) -> None:
        """A file opened for writing closed: sync, unless a larger change is still going on."""
        if not getattr(self._local, "depth", 0):
            writer.sync()

    @property
    def xipfs(self) -> Filesystem:
        """The :class:`xipfs.Filesystem` serving this instance now (the writer while there is one)."""
        return self._reader()

    @property
    def fsid(self) -> str:
        return f"ext2-{self._reader().uuid}"

    # -- listing -----------------------------------------------------------------------------------
    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        """Entries of directory ``path`` (sorted by name); ``[info(path)]`` for anything else."""
        p = self._strip_protocol(path)
        fs = self._reader()
        try:
            if not fs.isdir("/" + p):
                info = self.info(p)
                return [info] if detail else [info["name"]]
            with fs.scandir("/" + p) as it:
                entries = sorted(it, key=lambda e: e.name)
            if not detail:
                return [_join(p, e.name) for e in entries]
            return [self._entry_info(fs, _join(p, e.name), e) for e in entries]
        except OSError as err:
            raise _fix(err) from None

    @staticmethod
    def _entry_info(fs: Filesystem, name: str, entry: Any) -> dict[str, Any]:
        """A directory entry described as LocalFileSystem's ``ls`` does: the entry itself."""
        st = entry.stat(follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            return _info(name, st, False)
        try:
            size = fs.stat(entry.path).st_size
        except OSError:
            size = 0
        return _info(name, st, True, size, fs.readlink(entry.path))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        """Details of ``path`` (following a symlink), with LocalFileSystem.info's keys."""
        p = self._strip_protocol(path)
        fs = self._reader()
        try:
            st = fs.lstat("/" + p)
            if not stat.S_ISLNK(st.st_mode):
                return _info(p, st, False)
            return _info(p, fs.stat("/" + p), True, destination=fs.readlink("/" + p))
        except OSError as err:
            raise _fix(err) from None

    def exists(self, path: str, **kwargs: Any) -> bool:
        """Whether ``path`` names something, following symlinks (as ``os.path.exists``)."""
        try:
            return self._reader().exists("/" + self._strip_protocol(path))
        except OSError:
            return False

    def lexists(self, path: str, **kwargs: Any) -> bool:
        """Whether ``path`` names something, a dangling symlink included."""
        try:
            return self._reader().lexists("/" + self._strip_protocol(path))
        except OSError:
            return False

    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a directory (or a symlink to one)."""
        try:
            return self._reader().isdir("/" + self._strip_protocol(path))
        except OSError:
            return False

    def isfile(self, path: str) -> bool:
        """Whether ``path`` is a regular file (or a symlink to one)."""
        try:
            return self._reader().isfile("/" + self._strip_protocol(path))
        except OSError:
            return False

    def islink(self, path: str) -> bool:
        """Whether ``path`` is a symlink."""
        try:
            return self._reader().islink("/" + self._strip_protocol(path))
        except OSError:
            return False

    def modified(self, path: str) -> datetime.datetime:
        """Last modification time (UTC)."""
        return datetime.datetime.fromtimestamp(self.info(path)["mtime"], tz=datetime.timezone.utc)

    def created(self, path: str) -> datetime.datetime:
        """The inode change time (UTC): ext2 keeps no birth time (LocalFileSystem on Linux does the same)."""
        return datetime.datetime.fromtimestamp(self.info(path)["created"], tz=datetime.timezone.utc)

    def ukey(self, path: str) -> str:
        """Changes when the file does: image, inode, size, mtime and ctime in nanoseconds."""
        p = self._strip_protocol(path)
        fs = self._reader()
        try:
            st = fs.stat("/" + p)
        except OSError as err:
            raise _fix(err) from None
        key = f"{fs.uuid}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
        return hashlib.sha256(key.encode()).hexdigest()

    def invalidate_cache(self, path: str | None = None) -> None:
        """Forget cached metadata of a read-only attachment (to see another process's changes)."""
        super().invalidate_cache(path)
        image = self._image
        if not image.closed and image.writer is None and image.reader is not None:
            image.reader.forget_cached()

    # -- reading -----------------------------------------------------------------------------------
    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """Bytes ``[start, end)`` of file ``path`` (negative: from the end), copied once."""
        p = self._strip_protocol(path)
        try:
            if start is None and end is None:          # the whole file: no file object
                return self._reader().read_bytes("/" + p)
            with self._reader().open("/" + p, "rb", buffering=0) as f:
                size = f.size
                lo = 0 if start is None else start if start >= 0 else max(0, size + start)
                hi = size if end is None else end if end >= 0 else size + end
                if hi <= lo:
                    return b""
                return f.pread(min(hi, size) - lo, lo)
        except OSError as err:
            raise _fix(err) from None

    def _open(self, path: str, mode: str = "rb", block_size: int | None = None, autocommit: bool = True,
              cache_options: dict | None = None, **kwargs: Any) -> Any:
        """A binary file object: :class:`Ext2File` to read, :class:`Ext2WriteFile` to write
        (:class:`Ext2RandomFile` for the ``+`` modes)."""
        p = self._strip_protocol(path)
        chars = _mode_chars(mode)
        if not chars & set("wax+"):
            try:
                raw = self._reader().open("/" + p, "rb", buffering=0)
            except OSError as err:
                raise _fix(err) from None
            return Ext2File(raw, self, p, _buffer_size(block_size))
        return self._open_write(p, mode, block_size, autocommit)

    def _open_write(self, p: str, mode: str, block_size: int | None, autocommit: bool) -> _WriteSide:
        writer = self._writer(p)
        chars = _mode_chars(mode)
        target = None
        if not autocommit:
            if not chars & set("wx") or "+" in chars:
                raise ValueError(f"mode {mode!r} cannot be deferred to a transaction (use 'wb')")
            if "x" in chars and writer.lexists("/" + p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), p)
            head, _, tail = p.rpartition("/")
            target, p = p, _join(head, f".{tail}.fsspec-{os.getpid()}-{id(object()):x}")
            mode = "wb"
        try:
            if self.auto_mkdir and "r" not in chars and "/" in p:
                writer.makedirs("/" + p.rpartition("/")[0], exist_ok=True)
            raw = writer.open("/" + p, mode if "b" in mode else mode + "b", buffering=0)
        except OSError as err:
            raise _fix(err) from None
        cls = Ext2RandomFile if "+" in chars else Ext2WriteFile
        f = cls(raw, self, p, _buffer_size(block_size), target)
        self._image.handles.add(f)
        return f

    def mmap(self, path: str, access: str = "r", offset: int = 0, length: int | None = None) -> Mapping:
        """Map file ``path``: :meth:`xipfs.Filesystem.mmap` (no copy on a memory device)."""
        p = self._strip_protocol(path)
        fs = self._writer(p) if access != "r" else self._reader()
        try:
            return fs.mmap("/" + p, access, offset, length)
        except OSError as err:
            raise _fix(err) from None

    def get_file(self, rpath: str, lpath: Any, callback: Any = DEFAULT_CALLBACK, outfile: Any = None,
                 **kwargs: Any) -> None:
        """Copy file ``rpath`` out of the image to local ``lpath`` (or the open ``outfile``)."""
        if outfile is None and isfilelike(lpath):
            outfile = lpath
        elif outfile is None and self.isdir(rpath):
            os.makedirs(lpath, exist_ok=True)
            return
        p = self._strip_protocol(rpath)
        fs = self._reader()
        try:
            with fs.open("/" + p, "rb", buffering=0) as src:
                size = src.size
                callback.set_size(size)
                if outfile is not None:
                    for _, length, view in _pieces(fs, p, src, size):
                        outfile.write(view if view is not None else bytes(length))
                        callback.relative_update(length)
                    return
                lpath = os.fspath(lpath)
                os.makedirs(os.path.dirname(lpath) or ".", exist_ok=True)
                fd = os.open(lpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
                try:
                    for off, length, view in _pieces(fs, p, src, size):
                        if view is not None:            # holes are left as holes
                            _pwrite_all(fd, view, off)
                        callback.relative_update(length)
                    os.ftruncate(fd, size)
                finally:
                    os.close(fd)
        except OSError as err:
            raise _fix(err) from None

    # -- writing -----------------------------------------------------------------------------------
    def pipe_file(self, path: str, value: Any, mode: str = "overwrite", **kwargs: Any) -> None:
        """Make file ``path`` hold ``value`` (``mode="create"``: FileExistsError if it exists)."""
        p = self._strip_protocol(path)
        with self._writing(p) as w:
            if mode == "create" and w.lexists("/" + p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), p)
            self._make_parent(w, p)
            w.write_bytes("/" + p, value)

    def put_file(self, lpath: Any, rpath: str, callback: Any = DEFAULT_CALLBACK, mode: str = "overwrite",
                 **kwargs: Any) -> None:
        """Copy local file ``lpath`` into the image as ``rpath`` (parent directories made)."""
        p = self._strip_protocol(rpath)
        with self._writing(p) as w:
            if mode == "create" and w.lexists("/" + p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), p)
            if os.path.isdir(lpath):
                w.makedirs("/" + p, exist_ok=True)
                return
            if "/" in p:
                w.makedirs("/" + p.rpartition("/")[0], exist_ok=True)
            with open(lpath, "rb", buffering=0) as src:
                size = os.fstat(src.fileno()).st_size
                callback.set_size(size)
                if size <= CHUNK:
                    data = src.readall()
                    w.write_bytes("/" + p, data)
                    callback.relative_update(len(data))
                    return
                buf = memoryview(bytearray(CHUNK))
                with w.open("/" + p, "wb", buffering=0) as dst:
                    while n := src.readinto(buf):
                        _write_all(dst, buf[:n])
                        callback.relative_update(n)

    def cp_file(self, path1: str, path2: str, **kwargs: Any) -> None:
        """Copy file ``path1`` to ``path2`` inside the image (storage to storage); a directory is made."""
        s, d = self._strip_protocol(path1), self._strip_protocol(path2)
        with self._writing(s) as w:
            if w.isdir("/" + s):
                w.makedirs("/" + d, exist_ok=True)
                return
            if w.exists("/" + d) and w.stat("/" + s).st_ino == w.stat("/" + d).st_ino:
                raise shutil.SameFileError(f"{s!r} and {d!r} are the same file")
            self._make_parent(w, d)
            with w.open("/" + s, "rb", buffering=0) as src:
                size = src.size
                if size <= CHUNK:
                    w.write_bytes("/" + d, src.read())
                    return
                with w.open("/" + d, "wb", buffering=0) as dst:
                    for off, _, view in _pieces(w, s, src, size):
                        if view is not None:           # holes are left as holes
                            dst.seek(off)
                            _write_all(dst, view)
                    dst.truncate(size)

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Make directory ``path`` (FileExistsError if it exists); parents too unless told not to."""
        p = self._strip_protocol(path)
        with self._writing(p) as w:
            if w.lexists("/" + p):
                raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), p)
            if create_parents:
                w.makedirs("/" + p, **kwargs)
            else:
                w.mkdir("/" + p, **kwargs)

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Make directory ``path`` and the missing ones above it, like ``os.makedirs``."""
        p = self._strip_protocol(path)
        with self._writing(p) as w:
            if not p:
                if not exist_ok:
                    raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), p)
                return
            w.makedirs("/" + p, exist_ok=exist_ok)

    def rmdir(self, path: str) -> None:
        """Remove the empty directory ``path``."""
        p = self._strip_protocol(path)
        with self._writing(p) as w:
            w.rmdir("/" + p)

    def rm_file(self, path: str) -> None:
        """Remove ``path`` (a file, a symlink, or an empty directory)."""
        p = self._strip_protocol(path)
        with self._writing(p) as w:
            if w.isdir("/" + p) and not w.islink("/" + p):
                w.rmdir("/" + p)
            else:
                w.unlink("/" + p)

    _rm = rm_file

    def rm(self, path: Any, recursive: bool = False, maxdepth: int | None = None) -> None:
        """Remove files, symlinks and (with ``recursive``) directory trees; globs are expanded.

        A directory without ``recursive`` is a ValueError, as for LocalFileSystem. With
        ``maxdepth``, what lies within that depth goes, and a directory only if that leaves it
        empty (fsspec's base class stops at the first such directory, ENOTEMPTY, half done).
        """
        with self._writing() as w:
            if maxdepth is not None:
                self._rm_within(w, path, recursive, maxdepth)
                return
            paths = path if isinstance(path, list) else [path]
            targets: list[str] = []
            for p in self._strip_protocol(paths):
                targets.extend(self.expand_path(p) if has_magic(p) else [p])
            removed: list[str] = []
            for p in sorted(set(targets)):
                if any(p.startswith(r + "/") for r in removed):
                    continue                            # went with a tree removed before
                if w.isdir("/" + p) and not w.islink("/" + p):
                    if not recursive:
                        raise ValueError(f"Cannot delete directory {p!r}, set recursive=True")
                    self._rmtree(w, p)
                    removed.append(p)
                else:
                    w.unlink("/" + p)

    def _rm_within(self, w: Filesystem, path: Any, recursive: bool, maxdepth: int) -> None:
        """``rm`` to ``maxdepth``: deepest first, directories that still hold something stay
        (and the root's ``lost+found``, as ``_rmtree`` keeps it)."""
        for p in reversed(self.expand_path(path, recursive=recursive, maxdepth=maxdepth)):
            if p == "lost+found" and "" in self._strip_protocol(path if isinstance(path, list) else [path]):
                continue
            if not w.isdir("/" + p) or w.islink("/" + p):
                w.unlink("/" + p)
            elif not recursive:
                raise ValueError(f"Cannot delete directory {p!r}, set recursive=True")
            elif p and not w.listdir("/" + p):
                w.rmdir("/" + p)

    @staticmethod
    def _rmtree(w: Filesystem, p: str) -> None:
        """Remove the tree at ``p`` bottom-up, never following symlinks.

        The root itself stays, emptied but for ``lost+found`` (e2fsck wants it there).
        """
        if not p:
            for name in w.listdir("/"):
                if name == "lost+found":
                    continue
                if w.isdir("/" + name) and not w.islink("/" + name):
                    Ext2FileSystem._rmtree(w, name)
                else:
                    w.unlink("/" + name)
            return
        for top, dirs, files in w.walk("/" + p, topdown=False):
            base = top.rstrip("/")
            for name in files:
                w.unlink(f"{base}/{name}")
            for name in dirs:
                full = f"{base}/{name}"
                if w.islink(full):
                    w.unlink(full)
                else:
                    w.rmdir(full)
        w.rmdir("/" + p)

    def mv(self, path1: Any, path2: Any, recursive: bool = False, maxdepth: int | None = None,
           **kwargs: Any) -> None:
        """Rename inside the image (files and whole directories, one step each).

        Into ``path2`` when it is a directory, as ``shutil.move`` (LocalFileSystem) does; a
        list or glob of sources goes into directory ``path2`` (made if missing); two lists are
        renamed pairwise. With ``auto_mkdir`` the destination's missing parents are made first,
        as LocalFileSystem does; without, a missing parent is FileNotFoundError.
        """
        with self._writing() as w:
            if isinstance(path1, list) and isinstance(path2, list):
                if len(path1) != len(path2):
                    raise ValueError("mv: the two lists differ in length")
                for s, d in zip(self._strip_protocol(path1), self._strip_protocol(path2), strict=True):
                    self._make_parent(w, d)
                    self._move(w, s, d, into=False)
                return
            if isinstance(path1, list) or has_magic(path1):
                sources = self.expand_path(path1)
                d = self._strip_protocol(path2)
                w.makedirs("/" + d, exist_ok=True)
                for s in sources:
                    if not any(s.startswith(o + "/") for o in sources if o != s):
                        self._move(w, s, d, into=True)
                return
            d = self._strip_protocol(path2)
            self._make_parent(w, d)
            self._move(w, self._strip_protocol(path1), d, into=True)

    @staticmethod
    def _move(w: Filesystem, s: str, d: str, into: bool) -> None:
        if s == d:
            return
        if into and w.isdir("/" + d):
            d = _join(d, s.rpartition("/")[2])
        w.rename("/" + s, "/" + d)

    def touch(self, path: str, truncate: bool = True, **kwargs: Any) -> None:
        """Create an empty file, or set its times to now (and empty it when ``truncate``)."""
        p = self._strip_protocol(path)
        with self._writing(p) as w:
            self._make_parent(w, p)
            if not w.exists("/" + p):
                w.write_bytes("/" + p, b"")
                return
            w.utime("/" + p)
            if truncate:
                w.truncate("/" + p, 0)

    def _make_parent(self, w: Filesystem, p: str) -> None:
        if self.auto_mkdir and "/" in p:
            w.makedirs("/" + p.rpartition("/")[0], exist_ok=True)

    # -- batches: one sync at the end ----------------------------------------------------------------
    def put(self, lpath: Any, rpath: Any, recursive: bool = False, **kwargs: Any) -> None:
        """Copy local files into the image (fsspec's ``put``), with one sync at the end."""
        with self._writing():
            super().put(lpath, rpath, recursive=recursive, **kwargs)

    def copy(self, path1: Any, path2: Any, recursive: bool = False, **kwargs: Any) -> None:
        """Copy inside the image (fsspec's ``copy``), with one sync at the end."""
        with self._writing(), self._rooted():
            super().copy(path1, path2, recursive=recursive, **kwargs)

    def get(self, rpath: Any, lpath: Any, recursive: bool = False, **kwargs: Any) -> None:
        """Copy files out of the image (fsspec's ``get``), laid out as for other filesystems."""
        with self._rooted():
            super().get(rpath, lpath, recursive=recursive, **kwargs)

    @contextlib.contextmanager
    def _rooted(self) -> Iterator[None]:
        """Let ``expand_path`` give ``/``-rooted names while ``get``/``copy`` lay out targets.

        fsspec's ``other_paths`` drops the top directory of root-relative names ("data" ->
        "dest/x" instead of "dest/data/x" when ``dest`` exists; fsspec issue #1244, which zip
        and tar share); with a leading ``/`` it lays them out as for every other filesystem.
        """
        local = self._local
        depth = getattr(local, "rooted", 0)
        local.rooted = depth + 1
        try:
            yield
        finally:
            local.rooted = depth

    def expand_path(self, path: Any, recursive: bool = False, maxdepth: int | None = None,
                    **kwargs: Any) -> list[str]:
        """fsspec's ``expand_path``; ``/``-rooted names inside ``get``/``copy`` (see ``_rooted``)."""
        local = self._local
        if not getattr(local, "rooted", 0) or getattr(local, "expanding", False):
            return super().expand_path(path, recursive=recursive, maxdepth=maxdepth, **kwargs)
        local.expanding = True                  # the base class calls itself: root names once
        try:
            out = super().expand_path(path, recursive=recursive, maxdepth=maxdepth, **kwargs)
        finally:
            local.expanding = False
        return ["/" + p for p in out]

    def pipe(self, path: Any, value: Any = None, **kwargs: Any) -> None:
        """Write one or many files (fsspec's ``pipe``), with one sync at the end."""
        with self._writing():
            super().pipe(path, value, **kwargs)

    # -- lifetime ------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Write everything back now (free counts, backups, flush); a no-op on a read-only instance."""
        if self.mode == "r+":
            self._writer().sync()

    def close(self) -> None:
        """Close files still open for writing here, release the image (written back and marked
        clean when no other ``"r+"`` instance uses it) and leave fsspec's instance cache."""
        if self._closed:
            return
        self._closed = True
        image = self._image
        for f in list(image.handles):
            if f.fs is self:
                with contextlib.suppress(Exception):
                    f.close()
        cls = type(self)
        with cls._instantiation_lock:
            if cls._cache.get(self._fs_token) is self:
                del cls._cache[self._fs_token]
        if image.pid == os.getpid():
            image.release(self.mode == "r+")

    @classmethod
    def close_all(cls) -> None:
        """Close every cached instance: each image written through them (URL chains such as
        ``pandas.to_csv("ext2://x.csv::img", ...)`` make their own) is written back, marked
        clean and unlocked, as at process exit."""
        with cls._instantiation_lock:
            instances = list(cls._cache.values())
        for fs in instances:
            fs.close()

    def __enter__(self) -> Ext2FileSystem:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:  # noqa: SIM105  (a plain try: at interpreter exit ``contextlib`` may be gone already)
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<Ext2FileSystem {self._image.source!r} mode={self.mode!r}{state}>"

    __str__ = __repr__


# -- copying runs of blocks ------------------------------------------------------------------------
def _pieces(fs: Filesystem, p: str, src: Any, size: int) -> Iterator[tuple[int, int, memoryview | None]]:
    """``(offset, length, view or None for a hole)`` covering file ``p``'s first ``size`` bytes.

    On a memory device a view is the storage itself (no copy); elsewhere the data is read
    through the page cache into one reused buffer, a piece at a time.
    """
    if fs.is_xip:
        yield from fs.iter_views("/" + p, size, WINDOW)
        return
    buf = memoryview(bytearray(min(CHUNK, max(size, 1))))
    pos = 0
    while pos < size:
        n = src.preadv([buf[:min(len(buf), size - pos)]], pos)
        if n <= 0:
            return
        yield pos, n, buf[:n]
        pos += n


def _pwrite_all(fd: int, view: memoryview, off: int) -> None:
    while len(view):
        n = os.pwrite(fd, view, off)
        view = view[n:]
        off += n


def _write_all(f: Any, view: memoryview) -> None:
    while len(view):
        n = f.write(view)
        if not n:
            raise fs_error(errno.ENOSPC, f.name)
        view = view[n:]


def _buffer_size(block_size: int | None) -> int:
    """The buffer of a file object: fsspec's ``block_size`` when given, else 64 KiB."""
    if block_size and block_size > 0:
        return block_size
    return max(io.DEFAULT_BUFFER_SIZE, 64 * 1024)


# -- file objects ----------------------------------------------------------------------------------
class Ext2File(io.BufferedReader):
    """A file of the image open for reading: :class:`io.BufferedReader` over :class:`xipfs.XipFile`.

    ``read()`` of the rest, and any read larger than the buffer, copy once from the storage
    into the returned bytes; ``readinto`` once into your buffer. ``size`` and ``info()`` as on
    fsspec's own file objects.
    """

    def __init__(self, raw: Any, fs: Ext2FileSystem, path: str, buffer_size: int) -> None:
        super().__init__(raw, buffer_size)
        self.fs = fs
        self.path = path

    @property
    def size(self) -> int:
        return self.raw.size

    def info(self) -> dict[str, Any]:
        return self.fs.info(self.path)

    def __repr__(self) -> str:
        return f"<Ext2File {self.path!r}>"


class _WriteSide:
    """What the files open for writing share: their close syncs the image; transactions.

    Opened with ``autocommit=False`` (inside ``fs.transaction``), a file is written under a
    hidden temporary name in the same directory and renamed over its target by ``commit()``
    (``discard()`` removes it).
    """

    raw: Any
    closed: bool

    def __init__(self, raw: Any, fs: Ext2FileSystem, path: str, buffer_size: int,
                 target: str | None = None) -> None:
        super().__init__(raw, buffer_size)  # type: ignore[call-arg]
        self.fs = fs
        self.path = path
        self.target = target
        self.autocommit = target is None

    @property
    def size(self) -> int:
        self.flush()  # type: ignore[attr-defined]
        return self.raw.size

    def info(self) -> dict[str, Any]:
        return self.fs.info(self.path)

    def close(self) -> None:
        if self.closed:
            return
        try:
            super().close()  # type: ignore[misc]
        finally:
            fs = self.fs
            fs._image.handles.discard(self)
            writer = fs._image.writer
            if writer is not None:
                fs._after_write(writer)

    def commit(self) -> None:
        """Put a transaction's file in place: rename it over its target."""
        self.close()
        if self.target is not None:
            with self.fs._writing(self.target) as w:
                w.rename("/" + self.path, "/" + self.target)

    def discard(self) -> None:
        """Drop a transaction's file."""
        self.close()
        if self.target is not None:
            with self.fs._writing(self.path) as w:
                w.unlink("/" + self.path)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path!r}>"


class Ext4FileSystem(Ext2FileSystem):
    """The same, as protocol ``ext4`` (either protocol opens either format: the superblock says
    which it is)."""

    protocol = "ext4"


class Ext2WriteFile(_WriteSide, io.BufferedWriter):
    """A file of the image open for writing (``wb``, ``ab``, ``xb``): :class:`io.BufferedWriter`.

    A write larger than the buffer goes straight from your buffer into the storage (one copy).
    """


class Ext2RandomFile(_WriteSide, io.BufferedRandom):
    """A file of the image open for reading and writing (``r+b``, ``w+b``, ``a+b``, ``x+b``)."""
