"""Serve an ext2 image through FUSE, so that every program can use it: ``xipfs.fuse.mount``.

``mount(image, mountpoint)`` opens the image with :func:`xipfs.open` and serves it with libfuse 3
through ``mfusepy`` (the ``fuse`` extra: ``pip install xipfs[fuse]``; Debian's ``fuse3`` gives
``libfuse3`` and ``fusermount3``). It returns when the file system is unmounted (``fusermount3
-u MOUNTPOINT``, or SIGINT/SIGTERM/SIGHUP to the serving process, which unmount) and then closes
the image, so it is left clean for ``e2fsck -fn``.

How it is served:

* Reads come straight from the storage. Where the image is a file whose pages are the
  storage (tmpfs, POSIX shm; or any image file mounted read-only) the server only says where
  the bytes are, and libfuse splices those pages of the image file into the reply: no byte is
  copied in user space (``read_path=pread``: libfuse preads them instead). Elsewhere Python
  copies them once from the device into libfuse's buffer (``read_path=copy``). Holes read as
  zeros. ``direct_io`` stays off, so the kernel's page cache serves repeats and ``mmap``
  (executing a program from the mount) works. Requests are as large as libfuse's splice pipe
  allows (992 KiB; 1 MiB otherwise) and, as root, the mount's readahead window is raised from
  128 KiB to 4 MiB so sequential reads send such requests (``readahead_kb=`` changes it).
* Requests are served by libfuse's worker threads (``nothreads`` for one): metadata changes
  are serialised by the volume lock, the handle table by its own lock, and the copying of
  spliced reads runs in C, outside the GIL.
* Permissions are the kernel's business (``default_permissions``): xipfs checks none. New files
  belong to the calling process's user and group (a setgid directory passes its group on) and
  get exactly the mode the kernel sends.
* ``st_ino`` is the ext2 inode number (``use_ino``). A file unlinked while open is renamed to
  ``.fuse_hiddenNNN`` in its directory until its last close (libfuse's way: ``fstat`` on it
  keeps working, which ``hard_remove`` would break); libfuse removes any still there when it
  unmounts, before the image is closed.

Caching (nothing but this process changes the image while it is mounted):

* read-write: the process holds the image's writer lock, so every change goes through the
  mount and the kernel sees it. Attributes and names are cached for a second; file data is
  kept across opens unless the file's size or mtime changed (``auto_cache``), which keeps two
  hard links of one file (two kernel inodes under FUSE) from serving each other stale pages.
* read-only: the mount takes a *shared* lock on the image (``xipfs.open(..., lock=True)``), so
  no xipfs writer can change it underneath (one that tries gets ``EBUSY``; mounting while a
  writer has it fails the same way). The image is then immutable: names, attributes and data
  are cached for an hour (``kernel_cache``).

Warm reads (data already in the page cache) never reach the server, not even as a GETATTR: the
kernel copies from its page cache, and how fast is the kernel's business. Linux 6.18 caches FUSE
file data in 4 KiB folios only (large folios for FUSE, without writeback cache and sized by
``min(max_read, max_write)``, were proposed upstream in August 2025 and are not in it), where
ext4 uses folios of up to 2 MiB; so a warm sequential read through the mount runs at 0.3-0.5x
of one through a loop mount (``benchmarks/bench_fuse.py``). No mount option or init flag
changes that, and FUSE passthrough cannot help: it reads a backing file at the same offsets,
while a file's bytes lie at other offsets (and in pieces) inside the image.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import logging
import os
import posixpath
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import CorruptImageError
from .ext2.xattr import chmod as xattr_chmod

if TYPE_CHECKING:
    from .ext2.inode import Inode
    from .file import XipFile
    from .fs import Filesystem

__all__ = ["Operations", "mount", "fuse_available"]

log = logging.getLogger("xipfs.fuse")

#: Attribute/entry cache timeouts (seconds) for read-write and read-only mounts.
RW_TIMEOUT = 1.0
RO_TIMEOUT = 3600.0

#: Readahead window of the mount (KiB). The kernel's default, 128 KiB, caps every read request
#: at 128 KiB; with 4 MiB it sends requests of ``max_read`` (about 1 MiB), which makes cold
#: sequential reads about 1.8x as fast here (16 MiB is slower again). Set through sysfs, so
#: only when serving as root.
READAHEAD_KB = 4096
PAGE = 4096

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

OptionsArg = str | Iterable[str] | Mapping[str, Any] | None
#: An image path, a POSIX shared-memory name, or an open device (as for :func:`xipfs.open`).
ImageArg = Any


def _import_mfusepy() -> Any:
    """The ``mfusepy`` module, or an ImportError that says what to install."""
    try:
        import mfusepy
    except ImportError as err:
        raise ImportError("xipfs.fuse needs mfusepy: pip install xipfs[fuse] "
                          "(and libfuse 3: apt-get install fuse3)") from err
    except OSError as err:                  # mfusepy found no libfuse
        raise ImportError(f"xipfs.fuse needs libfuse 3 (apt-get install fuse3): {err}") from err
    return mfusepy


def fuse_available() -> str | None:
    """None when FUSE mounts can work here, else the reason they cannot."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
    except OSError as err:
        return f"/dev/fuse cannot be opened: {err}"
    os.close(fd)
    try:
        _import_mfusepy()
    except ImportError as err:
        return str(err)
    from shutil import which
    if os.geteuid() != 0 and which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


# -- the handle table -------------------------------------------------------------------------
class Handle:
    """An open file of the mount: the xipfs file object and the inode it reads."""

    __slots__ = ("file", "node", "writable")

    def __init__(self, file: XipFile, node: Inode, writable: bool) -> None:
        self.file = file
        self.node = node
        self.writable = writable


def _errors(method: Callable[..., Any]) -> Callable[..., Any]:
    """Give libfuse an errno for every failure: OSErrors keep theirs, bugs become EIO (logged)."""
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except CorruptImageError as err:
            log.error("%s: %s", method.__name__, err)
            raise
        except OSError as err:
            if not isinstance(err.errno, int) or err.errno <= 0:
                log.exception("%s failed without an errno", method.__name__)
                raise OSError(errno.EIO, os.strerror(errno.EIO)) from err
            raise
        except Exception as err:
            log.exception("%s failed", method.__name__)
            raise OSError(errno.EIO, os.strerror(errno.EIO)) from err
    return wrapper


def _caller() -> tuple[int, int]:
    """``(uid, gid)`` of the process that made the current FUSE request (ours outside one)."""
    try:
        import mfusepy
        uid, gid, _ = mfusepy.fuse_get_context()
        return uid, gid
    except Exception:                         # no request in progress
        return os.geteuid(), os.getegid()


class Operations:
    """FUSE operations (the mfusepy interface) on a :class:`xipfs.Filesystem`.

    Paths are the ones FUSE gives (absolute inside the image); ``fh`` is a handle number from
    :meth:`open`/:meth:`create`. ``path`` may be None for a file unlinked while open (the
    handle then names it). Every metadata operation runs under the volume lock, so a lookup
    never sees a change half done; reads of file data take no lock.
    """

    use_ns = True                             # times in nanoseconds, both ways
    #: libfuse's ``read_buf`` is served (by the FUSE glue) when the image file can be read by
    #: descriptor; None leaves it unregistered.
    read_buf: Any = None

    def __init__(self, fs: Filesystem, *, on_ready: Callable[[], None] | None = None,
                 read_path: str = "splice") -> None:
        self.fs = fs
        self.volume = fs.volume
        self._vlock = fs.volume.lock
        self.readonly = fs.readonly
        self.handles: dict[int, Handle] = {}
        #: Descriptor of the image file that reads are served from (libfuse copies or splices
        #: the bytes itself), or -1: reads are copied from the device by Python.
        if read_path not in READ_PATHS:
            raise ValueError(f"read_path must be one of {', '.join(READ_PATHS)}, not {read_path!r}")
        self.image_fd = _readable_fd(fs) if read_path != "copy" else -1
        #: Whether libfuse should splice image pages into its replies (no copy in user space).
        self.splice = self.image_fd >= 0 and read_path == "splice"
        if self.image_fd >= 0:
            self.read_buf = True
        self._next_fh = 1
        self._fh_lock = threading.Lock()
        self._on_ready = on_ready
        #: Set once the kernel connected (the mount went live).
        self.live = False
        #: The ``max_read`` mount option, when one was given (0: the kernel's maximum).
        self.max_read = 0
        #: Readahead window to ask for (KiB; root only), and where we are mounted.
        self.readahead_kb = 0
        self.mountpoint: str | None = None

    # -- lifetime -------------------------------------------------------------------------------
    def init_with_config(self, conn: Any, config: Any) -> None:
        """The kernel connected: the mount is live. libfuse wants ``max_read`` (a mount option)
        repeated here; a bigger readahead window is set here too, before the kernel takes the
        smaller of its window and ours from this reply."""
        if conn is not None:
            if self.max_read:
                conn.max_read = self.max_read
            if self.readahead_kb and self.mountpoint and set_readahead(self.mountpoint, self.readahead_kb):
                conn.max_readahead = self.readahead_kb * 1024
            if self.splice and conn.capable & FUSE_CAP_SPLICE_WRITE:
                conn.want |= FUSE_CAP_SPLICE_WRITE
        self.live = True
        if self._on_ready is not None:
            self._on_ready()

    def destroy(self, path: str) -> None:
        """Unmounted: close what the kernel left open (a lazy unmount sends no release)."""
        self.close_all()

    def close_all(self) -> None:
        """Close every handle (files unlinked while open are freed with their last one)."""
        with self._fh_lock:
            handles = list(self.handles.values())
            self.handles.clear()
        for h in handles:
            with contextlib.suppress(Exception):
                h.file.close()

    # -- helpers --------------------------------------------------------------------------------
    def _handle(self, fh: int | None) -> Handle | None:
        return None if fh is None else self.handles.get(fh)

    def _open_handle(self, fh: int) -> Handle:
        h = self.handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return h

    def _node(self, path: str | None, fh: int | None = None) -> Inode:
        """The inode ``path`` names (without following a final symlink), or that of handle ``fh``."""
        h = self._handle(fh)
        if h is not None:
            return h.node
        if path is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return self.volume.resolve(path, False)

    def _add(self, file: XipFile, node: Inode, writable: bool) -> int:
        with self._fh_lock:
            fh = self._next_fh
            self._next_fh += 1
            self.handles[fh] = Handle(file, node, writable)
        return fh

    def _writable(self) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def _own(self, path: str) -> None:
        """Give the new ``path`` to the calling user (and group, unless a setgid parent set it).

        xipfs makes it owned by this process's user and group (``_open_image`` runs as that).
        """
        uid, gid = _caller()
        if (uid, gid) == (os.geteuid(), os.getegid()):
            return
        parent = self.volume.resolve(posixpath.dirname(path) or "/", True)
        if parent.mode & stat.S_ISGID:
            gid = -1
        self.fs.chown(path, uid, gid, follow_symlinks=False)

    def _make(self, path: str, make: Callable[[], None]) -> None:
        """Run ``make``, which creates ``path``, and give the new entry to the calling user."""
        self._writable()
        with self._vlock:
            make()
            self._own(path)

    def _change(self, path: str | None, fh: int | None, change: Callable[[Inode], None]) -> None:
        """Apply ``change`` to the inode of ``path`` or handle ``fh`` and store it (new ctime)."""
        self._writable()
        with self._vlock:
            node = self._node(path, fh)
            change(node)
            node.ctime_ns = time.time_ns()
            self.volume.write_inode(node)

    # -- attributes -----------------------------------------------------------------------------
    @_errors
    def getattr(self, path: str | None, fh: int | None = None) -> dict[str, int]:
        with self._vlock:
            st = self.fs.stat_inode(self._node(path, fh))
        return {
            "st_mode": st.st_mode, "st_ino": st.st_ino, "st_nlink": st.st_nlink,
            "st_uid": st.st_uid, "st_gid": st.st_gid, "st_size": st.st_size,
            "st_atime": st.st_atime_ns, "st_mtime": st.st_mtime_ns, "st_ctime": st.st_ctime_ns,
            "st_blocks": st.st_blocks, "st_blksize": st.st_blksize, "st_rdev": st.st_rdev,
        }

    @_errors
    def access(self, path: str, amode: int) -> int:
        with self._vlock:
            self.volume.resolve(path, False)
        if amode & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return 0

    @_errors
    def readlink(self, path: str) -> str:
        with self._vlock:
            return self.fs.readlink(path)

    @_errors
    def statfs(self, path: str) -> dict[str, int]:
        with self._vlock:
            v = self.fs.statvfs("/")
        return {"f_bsize": v.f_bsize, "f_frsize": v.f_frsize, "f_blocks": v.f_blocks,
                "f_bfree": v.f_bfree, "f_bavail": v.f_bavail, "f_files": v.f_files,
                "f_ffree": v.f_ffree, "f_favail": v.f_favail, "f_namemax": v.f_namemax,
                "f_flag": v.f_flag}

    # -- directories ----------------------------------------------------------------------------
    @_errors
    def readdir(self, path: str, fh: int | None = None) -> list[tuple[str, dict[str, int], int]]:
        fs = self.fs
        with self._vlock:
            here = self.volume.resolve(path, True)
            up = self.volume.resolve(posixpath.dirname(path) or "/", True) if path != "/" else here
            out = [(".", {"st_mode": stat.S_IFDIR, "st_ino": here.ino}, 0),
                   ("..", {"st_mode": stat.S_IFDIR, "st_ino": up.ino}, 0)]
            with fs.scandir(path) as it:
                for entry in it:
                    if entry.is_symlink():
                        fmt = stat.S_IFLNK
                    elif entry.is_dir(follow_symlinks=False):
                        fmt = stat.S_IFDIR
                    elif entry.is_file(follow_symlinks=False):
                        fmt = stat.S_IFREG
                    else:
                        fmt = stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode)
                    out.append((entry.name, {"st_mode": fmt, "st_ino": entry.inode()}, 0))
        return out

    @_errors
    def mkdir(self, path: str, mode: int) -> int:
        self._make(path, lambda: self.fs.mkdir(path, mode))
        return 0

    @_errors
    def rmdir(self, path: str) -> int:
        self.fs.rmdir(path)
        return 0

    @_errors
    def fsyncdir(self, path: str | None, datasync: int, fh: int | None) -> int:
        self.fs.sync()
        return 0

    # -- names ----------------------------------------------------------------------------------
    @_errors
    def unlink(self, path: str) -> int:
        self.fs.unlink(path)
        return 0

    @_errors
    def rename(self, old: str, new: str, flags: int = 0) -> int:
        if flags & ~RENAME_NOREPLACE:
            raise OSError(errno.EINVAL, "xipfs supports only RENAME_NOREPLACE")
        self._writable()
        with self._vlock:
            if flags & RENAME_NOREPLACE and self.fs.lexists(new):
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), new)
            self.fs.rename(old, new)
        return 0

    @_errors
    def link(self, target: str, source: str) -> int:
        """Make ``target`` a new name of ``source`` (mfusepy's argument order)."""
        self.fs.link(source, target, follow_symlinks=False)
        return 0

    @_errors
    def symlink(self, target: str, source: str) -> int:
        """Make ``target`` a symlink whose content is ``source`` (mfusepy's argument order)."""
        self._make(target, lambda: self.fs.symlink(source, target))
        return 0

    @_errors
    def mknod(self, path: str, mode: int, dev: int) -> int:
        self._make(path, lambda: self.fs.mknod(path, mode, dev))
        return 0

    # -- changing attributes --------------------------------------------------------------------
    @_errors
    def chmod(self, path: str | None, mode: int, fh: int | None = None) -> int:
        self._writable()
        with self._vlock:
            xattr_chmod(self.volume, self._node(path, fh), mode)     # an access ACL follows
        return 0

    @_errors
    def chown(self, path: str | None, uid: int, gid: int, fh: int | None = None) -> int:
        def change(node: Inode) -> None:
            if uid != -1:
                node.uid = uid
            if gid != -1:
                node.gid = gid
        self._change(path, fh, change)
        return 0

    @_errors
    def utimens(self, path: str | None, times: tuple[int | None, int | None] | None = None,
                fh: int | None = None) -> int:
        """Set (atime, mtime) in ns; None in either keeps it (UTIME_OMIT); ``times`` None is now."""
        now = time.time_ns()
        atime, mtime = (now, now) if times is None else times

        def change(node: Inode) -> None:
            if atime is not None:
                node.atime_ns = atime
            if mtime is not None:
                node.mtime_ns = mtime
            node.clip_times()
        self._change(path, fh, change)
        return 0

    @_errors
    def truncate(self, path: str | None, length: int, fh: int | None = None) -> int:
        self._writable()
        h = self._handle(fh)
        if h is not None and h.writable:
            h.file.truncate(length)
        elif path is None:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        else:
            self.fs.truncate(path, length)
        return 0

    # -- extended attributes (of the inode itself: FUSE resolved any symlink already) -----------
    @_errors
    def getxattr(self, path: str, name: str, position: int = 0) -> bytes:
        with self._vlock:
            return self.fs.getxattr(path, name, follow_symlinks=False)

    @_errors
    def listxattr(self, path: str) -> list[str]:
        with self._vlock:
            return self.fs.listxattr(path, follow_symlinks=False)

    @_errors
    def setxattr(self, path: str, name: str, value: bytes, options: int, position: int = 0) -> int:
        self.fs.setxattr(path, name, value, options, follow_symlinks=False)
        return 0

    @_errors
    def removexattr(self, path: str, name: str) -> int:
        self.fs.removexattr(path, name, follow_symlinks=False)
        return 0

    # -- files ----------------------------------------------------------------------------------
    def _open(self, path: str, flags: int) -> int:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable:
            self._writable()
        with self._vlock:
            f = self.fs.open(path, "r+b" if writable else "rb", buffering=0)
            try:
                node = self.volume.resolve(path, True)     # the inode f reads (same lock, same cache)
                if flags & os.O_TRUNC and writable and node.size:
                    f.truncate(0)
            except BaseException:
                f.close()
                raise
        return self._add(f, node, writable)

    @_errors
    def open(self, path: str, flags: int) -> int:
        return self._open(path, flags)

    @_errors
    def create(self, path: str, mode: int, flags: int = os.O_RDWR) -> int:
        self._writable()
        with self._vlock:
            if not self.fs.lexists(path):
                self.fs.mknod(path, stat.S_IFREG | (mode & 0o7777))
                self._own(path)
            elif flags & os.O_EXCL:
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), path)
            return self._open(path, (flags & ~os.O_ACCMODE) | os.O_RDWR)

    @_errors
    def read(self, path: str | None, size: int, offset: int, fh: int) -> bytes:
        """``size`` bytes at ``offset`` as ``bytes`` (the buffer-filling path is :func:`read_into`)."""
        return self.volume.read_bytes(self._open_handle(fh).node, offset, size)

    def read_into(self, fh: int, view: memoryview, offset: int) -> int:
        """Fill ``view`` (libfuse's reply buffer) from byte ``offset`` of handle ``fh``: one copy."""
        return self.volume.read_into(self._open_handle(fh).node, view, offset)

    def read_segments(self, fh: int, size: int, offset: int) -> list[tuple[int, int]]:
        """Where the ``size`` bytes at ``offset`` of handle ``fh`` are: ``(length, byte offset in
        the image file, or -1 for a hole)`` pieces, fewer bytes at EOF."""
        node = self._open_handle(fh).node
        end = min(offset + size, node.size)
        if end <= offset:
            return []
        return [(length, where) for _, length, where in self.volume.segments(node, offset, end)]

    @_errors
    def write(self, path: str | None, data: Any, offset: int, fh: int) -> int:
        h = self._open_handle(fh)
        if not h.writable:
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        n = h.file.pwrite(data, offset)
        if n == 0 and data:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    @_errors
    def flush(self, path: str | None, fh: int) -> int:
        """close() of one descriptor: nothing to do (writes are in the image; ext2 does not
        sync on close either). ``fsync`` makes them durable."""
        return 0

    @_errors
    def fsync(self, path: str | None, datasync: int, fh: int) -> int:
        self.fs.sync()
        return 0

    @_errors
    def release(self, path: str | None, fh: int) -> int:
        with self._fh_lock:
            h = self.handles.pop(fh, None)
        if h is not None:
            with self._vlock:
                h.file.close()
        return 0


#: How reads are served (the ``read_path`` option): "splice" -- libfuse splices the image file's
#: pages into the reply, so no byte is copied in user space; "pread" -- libfuse preads them into
#: its buffer; "copy" -- Python copies from the device (the only way for storage without a
#: file, or an image written through the page-cache device). The first two fall back to "copy"
#: where the image file cannot be read directly.
READ_PATHS = ("splice", "pread", "copy")


def splice_max_read() -> int:
    """The largest request whose reply fits libfuse's splice pipe (``pipe-max-size`` less the
    header pages libfuse reserves), at most 1 MiB; bigger replies fall back to a copy."""
    try:
        with open("/proc/sys/fs/pipe-max-size") as f:
            pipe_max = int(f.read())
    except (OSError, ValueError):
        pipe_max = 1 << 20
    return max(PAGE, min(1 << 20, (pipe_max - 8 * PAGE) // PAGE * PAGE))


def _readable_fd(fs: Filesystem) -> int:
    """The image file's descriptor when reading it gives what the device holds, else -1.

    True of memory storage with a file (tmpfs, POSIX shm, ramfs: the mapping and the file are
    the same pages) and of a read-only image elsewhere (no write-back cache in between).
    """
    dev = fs.device
    fd = dev.fileno()
    if fd < 0:
        return -1
    if dev.is_xip:
        return fd if getattr(dev, "kind", "") in ("tmpfs", "shm", "ramfs") else -1
    return fd if fs.readonly else -1


FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
FUSE_BUF_FD_RETRY = 1 << 3
FUSE_CAP_SPLICE_WRITE = 1 << 7


class _FuseBuf(ctypes.Structure):
    _fields_ = [("size", ctypes.c_size_t), ("flags", ctypes.c_int), ("mem", ctypes.c_void_p),
                ("fd", ctypes.c_int), ("pos", ctypes.c_int64)]


_BUFVEC_HEAD = 3 * ctypes.sizeof(ctypes.c_size_t)      # count, idx, off; then fuse_buf[count]
_libc = ctypes.CDLL(None, use_errno=True)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_libc.calloc.restype = ctypes.c_void_p
_libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]


def _bufvec(segments: list[tuple[int, int]], fd: int) -> int:
    """A malloc'ed ``struct fuse_bufvec`` for ``segments`` (libfuse frees it, and the zeroed
    buffers of holes, with ``free``): image pieces are (fd, position) buffers; 0 on ENOMEM."""
    count = max(1, len(segments))
    addr = _libc.malloc(_BUFVEC_HEAD + count * ctypes.sizeof(_FuseBuf))
    if not addr:
        return 0
    head = (ctypes.c_size_t * 3).from_address(addr)
    head[0], head[1], head[2] = count, 0, 0
    bufs = (_FuseBuf * count).from_address(addr + _BUFVEC_HEAD)
    if not segments:                                    # EOF: one empty memory buffer
        bufs[0].size, bufs[0].flags, bufs[0].mem, bufs[0].fd, bufs[0].pos = 0, 0, None, -1, 0
        return addr
    seek = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY
    for i, (length, where) in enumerate(segments):
        b = bufs[i]
        b.size = length
        if where >= 0:
            b.flags, b.mem, b.fd, b.pos = seek, None, fd, where
        else:
            b.flags, b.fd, b.pos = 0, -1, 0
            b.mem = _libc.calloc(1, length)
            if not b.mem:                               # give back what we took: ENOMEM
                for j in range(i):
                    if not bufs[j].flags & FUSE_BUF_IS_FD:
                        _libc.free(ctypes.c_void_p(bufs[j].mem))
                _libc.free(ctypes.c_void_p(addr))
                return 0
    return addr


# -- the libfuse glue ---------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _fuse_class() -> type:
    """mfusepy's FUSE class with the calls it simplifies too far done in full: reads fill
    libfuse's buffer and writes take from it directly (no ``bytes`` in between); reads can be
    answered with the image file's pages (``read_buf``); rename keeps its flags; chmod, chown,
    utimens and truncate keep the file handle; utimens understands UTIME_NOW/UTIME_OMIT."""
    mfusepy = _import_mfusepy()
    char_arrays: dict[int, Any] = {}

    def buffer(buf: Any, size: int) -> memoryview:
        """libfuse's ``size``-byte buffer at ``buf`` as a memoryview (no copy)."""
        array = char_arrays.get(size)
        if array is None:
            array = char_arrays[size] = ctypes.c_char * size
        return memoryview(array.from_address(ctypes.addressof(buf.contents))).cast("B")

    class XipFUSE(mfusepy.FUSE):
        def read(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            with buffer(buf, size) as view:
                return self.operations.read_into(fip.contents.fh, view, offset)

        def write(self, path: bytes | None, buf: Any, size: int, offset: int, fip: Any) -> int:
            with buffer(buf, size) as view:
                return self.operations.write(self._decode(path), view, offset, fip.contents.fh)

        def read_buf(self, path: bytes | None, bufpp: Any, size: int, offset: int, fip: Any) -> int:
            ops = self.operations
            addr = _bufvec(ops.read_segments(fip.contents.fh, size, offset), ops.image_fd)
            if not addr:
                return -errno.ENOMEM
            ctypes.cast(bufpp, ctypes.POINTER(ctypes.c_void_p))[0] = addr
            return 0

        def _decode(self, path: bytes | None) -> str | None:
            return None if path is None else path.decode(self.encoding, self.errors)

        @staticmethod
        def _fh(fip: Any) -> int | None:
            return fip.contents.fh if fip else None

        def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
            return self.operations.rename(self._decode(old), self._decode(new), flags)

        def chmod_fuse_3(self, path: bytes | None, mode: int, fip: Any) -> int:
            return self.operations.chmod(self._decode(path), mode, self._fh(fip))

        def chown_fuse_3(self, path: bytes | None, uid: int, gid: int, fip: Any) -> int:
            if uid == (1 << 32) - 1:
                uid = -1
            if gid == (1 << 32) - 1:
                gid = -1
            return self.operations.chown(self._decode(path), uid, gid, self._fh(fip))

        def truncate_fuse_3(self, path: bytes | None, length: int, fip: Any) -> int:
            return self.operations.truncate(self._decode(path), length, self._fh(fip))

        def utimens_fuse_3(self, path: bytes | None, buf: Any, fip: Any) -> int:
            times = None
            if buf:
                times = (_timespec_ns(buf.contents.actime), _timespec_ns(buf.contents.modtime))
            return self.operations.utimens(self._decode(path), times, self._fh(fip))

    return XipFUSE


def _timespec_ns(ts: Any) -> int | None:
    """A utimens timespec in ns; None for UTIME_OMIT, now for UTIME_NOW."""
    if ts.tv_nsec == UTIME_OMIT:
        return None
    if ts.tv_nsec == UTIME_NOW:
        return time.time_ns()
    return ts.tv_sec * 1_000_000_000 + ts.tv_nsec


# -- options --------------------------------------------------------------------------------
def parse_options(options: OptionsArg) -> dict[str, Any]:
    """``-o`` style options (``"ro,allow_other"``, a list, or a dict) as ``{name: value or True}``."""
    if options is None:
        return {}
    if isinstance(options, Mapping):
        return dict(options)
    items = options.split(",") if isinstance(options, str) else [
        part for opt in options for part in str(opt).split(",")]
    out: dict[str, Any] = {}
    for item in items:
        item = item.strip()
        if not item:
            continue
        key, eq, value = item.partition("=")
        out[key] = value if eq else True
    return out


#: Options that mount() takes itself (the rest go to libfuse).
OUR_OPTIONS = ("ro", "rw", "threads", "nothreads", "debug", "foreground", "readahead_kb", "read_path")


def fuse_options(image: str, readonly: bool, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The libfuse options of a mount: ours, then the caller's (which win)."""
    timeout = RO_TIMEOUT if readonly else RW_TIMEOUT
    opts: dict[str, Any] = {
        "fsname": "xipfs:" + image.replace("\\", "\\\\").replace(",", "\\,"),
        "subtype": "xipfs",
        "default_permissions": True,
        "use_ino": True,
        "attr_timeout": timeout,
        "entry_timeout": timeout,
        "negative_timeout": timeout,
        # Idle worker threads to keep: fewer makes libfuse end and start threads all the time
        # under parallel readahead (and each new one needs a Python thread state and a pipe).
        # Setting it also keeps libfuse 3.14 from warning about an unset maximum.
        "max_idle_threads": 16,
    }
    if readonly:
        opts["ro"] = True
        opts["kernel_cache"] = True
    else:
        opts["auto_cache"] = True
    for key, value in extra.items():
        if key in OUR_OPTIONS:
            continue
        opts[key] = value
    return opts


def _mount_device(mountpoint: str) -> str | None:
    """``major:minor`` of the file system mounted at ``mountpoint`` (the last one stacked there),
    from ``/proc/self/mountinfo``: no stat, which would wait for the mount being set up."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                    found = fields[2]
    except OSError:
        return None
    return found


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space)."""
    if "\\" not in field:
        return field
    return field.encode().decode("unicode_escape").encode("latin-1").decode(errors="surrogateescape")


def set_readahead(mountpoint: str, kb: int) -> bool:
    """Set the readahead window of the mount at ``mountpoint`` (root only); whether it worked."""
    dev = _mount_device(mountpoint)
    if dev is None:
        return False
    try:
        with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
            f.write(str(kb))
    except OSError:
        return False
    return True


# -- mounting -------------------------------------------------------------------------------
def _open_image(image: Any, readonly: bool) -> Filesystem:
    """Open ``image`` for serving: read-only with a shared lock, or read-write (falling back to
    read-only, with a warning, when the image or its storage can only be read)."""
    import xipfs
    old = os.umask(0)                  # the kernel already applied the caller's umask
    try:
        if readonly:
            return xipfs.open(image, "r", lock=True)
        try:
            return xipfs.open(image, "r+")
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            log.warning("%s: %s; mounting read-only", image, err.strerror or err)
            print(f"xipfs: {image}: {err.strerror or err}; mounting read-only", file=sys.stderr)
            return xipfs.open(image, "r", lock=True)
    finally:
        os.umask(old)


@contextlib.contextmanager
def _default_signals() -> Any:
    """Let libfuse install its SIGINT/SIGTERM/SIGHUP handlers (it only replaces SIG_DFL), so
    each of them unmounts; put back what was there afterwards."""
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(ValueError, OSError):
                saved[sig] = signal.signal(sig, signal.SIG_DFL)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(sig, handler)


def _serve(image: Any, mountpoint: str, readonly: bool, opts: dict[str, Any],
           on_ready: Callable[[], None] | None = None) -> None:
    """Open the image, serve it until unmounted, close it (clean) whatever happened."""
    fuse_cls = _fuse_class()
    fs = _open_image(image, readonly)
    ops = None
    try:
        ops = Operations(fs, on_ready=on_ready, read_path=str(opts.get("read_path", "splice")))
        name = os.fsdecode(image) if isinstance(image, (str, bytes, os.PathLike)) else repr(image)
        kwargs = fuse_options(name, fs.readonly, opts)
        if ops.splice and "max_read" not in kwargs:
            kwargs["max_read"] = splice_max_read()
        ops.max_read = int(kwargs.get("max_read", 0))
        ops.readahead_kb = int(opts.get("readahead_kb", READAHEAD_KB))
        ops.mountpoint = os.path.realpath(mountpoint)
        threads = bool(opts.get("threads", not opts.get("nothreads", False)))
        with _default_signals():
            try:
                fuse_cls(ops, mountpoint, foreground=True, nothreads=not threads,
                         debug=bool(opts.get("debug")), **kwargs)
            except RuntimeError as err:
                # libfuse reports an exit by SIGINT/SIGTERM/SIGHUP as a failure (status 8);
                # once the mount was live, any end of the loop is the end of the mount.
                if not ops.live:
                    raise RuntimeError(f"libfuse could not mount {name} at {mountpoint} (status "
                                       f"{err}; its message is on stderr)") from None
    finally:
        try:
            if ops is not None:
                ops.close_all()
        finally:
            _close_uninterrupted(fs)


def _close_uninterrupted(fs: Filesystem) -> None:
    """Close the image with SIGINT/SIGTERM/SIGHUP held back, so a signal arriving now cannot
    leave it half written; one that came meanwhile is delivered afterwards."""
    sigs = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    except (OSError, ValueError):
        old = None
    try:
        fs.close()
    finally:
        if old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)


def mount(image: ImageArg, mountpoint: str | os.PathLike[str], *, readonly: bool = False,
          foreground: bool = True, options: OptionsArg = None) -> None:
    """Serve the ext2 ``image`` at ``mountpoint`` through FUSE.

    Blocks until unmounted (``fusermount3 -u MOUNTPOINT``, or SIGINT/SIGTERM/SIGHUP), then
    closes the image clean. ``readonly`` (or ``ro`` in ``options``) serves it read-only;
    an image that can only be read is mounted read-only with a warning. ``options`` are FUSE
    mount options (``"allow_other,max_read=131072"``, a list, or a dict), passed to libfuse,
    plus these of xipfs: ``nothreads`` (serve one request at a time), ``read_path=splice|pread
    |copy`` (how reads are answered, see the module doc), ``readahead_kb=N`` (the mount's
    readahead window, root only; default 4096). ``foreground=False`` serves from a background
    process and returns once the mount is live (errors before that are raised here).
    """
    opts = parse_options(options)
    readonly = readonly or bool(opts.get("ro"))
    mp = os.fspath(mountpoint)
    if not os.path.isdir(mp):
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), mp)
    if foreground:
        _serve(image, mp, readonly, opts)
    else:
        _serve_in_background(image, mp, readonly, opts)


# -- background serving -----------------------------------------------------------------------
_CHILD = "import sys, xipfs.fuse as f; f._child_main(sys.argv[1:])"


def _serve_in_background(image: Any, mountpoint: str, readonly: bool, opts: dict[str, Any]) -> None:
    """Start a detached ``python`` serving the mount; return when it reports the mount live."""
    import json
    if not isinstance(image, (str, bytes, os.PathLike)):
        raise TypeError("foreground=False needs an image path or shared-memory name")
    r, w = os.pipe()
    try:
        args = json.dumps({"image": os.fsdecode(image), "mountpoint": os.path.abspath(mountpoint),
                           "readonly": readonly, "options": opts, "fd": w})
        env = dict(os.environ)
        pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        subprocess.Popen([sys.executable, "-c", _CHILD, args], pass_fds=(w,), env=env,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as reply:
        message = reply.read().decode(errors="replace")
    if message != "ok":
        code, _, text = message.partition(":")
        if code.isdigit():
            raise OSError(int(code), text)
        raise RuntimeError(f"xipfs mount server exited before mounting {mountpoint}: "
                           f"{text or message or 'no reason given'}")


def _child_main(argv: list[str]) -> None:
    """The background server: serve, tell the parent when live or why it failed."""
    import json
    spec = json.loads(argv[0])
    fd = spec["fd"]

    def tell(message: str) -> None:
        nonlocal fd
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.write(fd, message.encode())
                os.close(fd)
            fd = -1

    try:
        _serve(spec["image"], spec["mountpoint"], spec["readonly"], spec["options"],
               on_ready=lambda: tell("ok"))
    except OSError as err:
        tell(f"{err.errno or 0}:{err}")
        raise SystemExit(1) from None
    except Exception as err:                  # the parent raises it; no traceback here too
        tell(f"x:{err}")
        raise SystemExit(1) from None
    finally:
        tell("x:the server stopped before the mount went live")
