"""Serve an ext2 image through FUSE, so that every program can use it: ``xipfs.fuse.mount``.

``mount(image, mountpoint)`` opens the image with :func:`xipfs.open` and serves it through
libfuse 3's *low-level* API (``fuse_lowlevel.h``), bound here with ``ctypes``: Debian's
``fuse3`` gives ``libfuse3.so.3`` and ``fusermount3``; no Python package is needed. It returns
when the file system is unmounted (``fusermount3 -u MOUNTPOINT``, or SIGINT/SIGTERM/SIGHUP to
the serving process, which unmount) and then closes the image, so it is left clean for
``e2fsck -fn``.

Why the low-level API: the kernel knows a file by a node id it got from a LOOKUP of a name in a
directory. Here the node id *is* the ext2 inode number (the root, inode 2, is FUSE's node 1), so
the names of one inode are one kernel inode, as on Linux's own ext2: after ``ln a b``,
``stat a`` shows two links, ``chmod b`` is seen through ``a``, and data written through one name
is what the other's descriptors and mappings read. libfuse's high-level API (the one
``mfusepy`` binds) gives every *path* its own node, and every request a path to resolve again,
whose length it caps; ``pyfuse3`` binds the low-level API but cannot answer a read with the
image file's pages. So this module binds the C library itself, as ``mfusepy`` does.

How it is served:

* Reads come straight from the storage. Where the image is a file whose pages are the
  storage (tmpfs, POSIX shm; or any image file mounted read-only) the server only says where
  the bytes are, and libfuse splices those pages of the image file into the reply: no byte is
  copied in user space (``read_path=pread``: libfuse preads them instead). Elsewhere Python
  copies them once from the device into the reply (``read_path=copy``). Holes read as zeros.
  ``direct_io`` stays off, so the kernel's page cache serves repeats and ``mmap`` (executing
  a program from the mount) works. Requests are as large as libfuse's splice pipe allows
  (992 KiB; 1 MiB otherwise) and, as root, the mount's readahead window is raised from 128 KiB
  to 4 MiB so sequential reads send such requests (``readahead_kb=`` changes it).
* Requests are served by libfuse's worker threads (``nothreads`` for one): metadata changes
  are serialised by the filesystem's lock; the copying of spliced reads runs in C, outside the GIL.
* Permissions and the umask are the kernel's business (``default_permissions``): new files get
  exactly the mode the kernel sends, and belong to the calling process's user and group (a
  setgid directory passes its group on). ``st_ino`` is the ext2 inode number.
* An inode the kernel still knows (a LOOKUP not yet balanced by a FORGET: an open file, a
  current directory) outlives its last name, as an orphan, and is freed when the kernel
  forgets it; any left at unmount are freed then.
* ``lsattr``/``chattr`` work (``FS_IOC_GETFLAGS``/``SETFLAGS``, stored in ``i_flags``, with
  immutable and append-only enforced as Linux does). ``filefrag`` cannot: FUSE carries neither
  FIEMAP nor, outside block-device mounts, FIBMAP. ``fallocate`` makes unwritten extents on
  ext4 (mode 0 and KEEP_SIZE) and is EOPNOTSUPP otherwise, as Linux gives on ext2 (no unwritten
  extents): ``posix_fallocate`` then writes zeros instead.

Round trips are what a FUSE mount pays for, so the server asks the kernel for fewer of them:
``readdirplus`` (a listing carries every entry's attributes, so ``rm -rf`` needs no LOOKUP per
name; not once a name has left the directory since it was opened, as the listing is a snapshot
whose numbers may be other files' by then), ``writeback_cache`` (writes gather in the kernel's
page cache and come in requests of up to 1 MiB at close or sync), no FLUSH on close, O_TRUNC
inside OPEN, and set-id bits taken off by the server on write, truncate and chown
(FUSE_HANDLE_KILLPRIV_V2), so that the kernel does not ask for ``security.capability`` before
every ``write()``. libfuse 3.14 cannot ask for that last one; the server adds it to libfuse's
answer to the kernel's INIT.

The kernel's write-back ignores a short count, so a write-back request that does not fit
whole (no space left, past the largest file size) is answered ENOSPC or EFBIG, which fsync and
close then report; and it is written where it says, even through an O_APPEND handle.

Caching: nothing but this process changes the image while it is mounted (a read-write mount
holds the image's writer lock; a read-only one a *shared* lock, so no xipfs writer can change
it underneath: one that tries gets ``EBUSY``). File data is kept across opens
(``keep_cache``); names and attributes are cached for a second on a read-write mount and for
an hour on a read-only one.

Warm reads (data already in the page cache) never reach the server: the kernel copies from its
page cache, and how fast is the kernel's business. Linux 6.18 caches FUSE file data in 4 KiB
folios only, where ext4 uses folios of up to 2 MiB; so a warm sequential read through the mount
runs at 0.3-0.5x of one through a loop mount (``benchmarks/bench_fuse.py``). FUSE passthrough
cannot help: it reads a backing file at the same offsets, while a file's bytes lie at other
offsets (and in pieces) inside the image.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import itertools
import logging
import os
import platform
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .errors import CorruptImageError
from .nodes import Nodes

if TYPE_CHECKING:
    from .extfs.inode import Inode
    from .fs import Filesystem
    from .xip.file import XipFile

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
ROOT_INO = 2                     # ext2's root; FUSE calls it node 1
FUSE_ROOT_ID = 1

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2

# fuse_lowlevel.h: which fields of a SETATTR are set
SET_MODE, SET_UID, SET_GID, SET_SIZE = 1 << 0, 1 << 1, 1 << 2, 1 << 3
SET_ATIME, SET_MTIME, SET_ATIME_NOW, SET_MTIME_NOW, SET_CTIME = 1 << 4, 1 << 5, 1 << 7, 1 << 8, 1 << 10
SET_KILL_SUIDGID = 1 << 11               # the kernel's FATTR_KILL_SUIDGID (a truncate by a user)

# fuse_common.h: capabilities asked for in init
FUSE_CAP_ATOMIC_O_TRUNC = 1 << 3
FUSE_CAP_SPLICE_WRITE = 1 << 7
FUSE_CAP_IOCTL_DIR = 1 << 11
FUSE_CAP_READDIRPLUS = 1 << 13
FUSE_CAP_WRITEBACK_CACHE = 1 << 16
FUSE_INIT = 26                          # the opcode of the kernel's first request
FUSE_HANDLE_KILLPRIV_V2 = 1 << 28       # an INIT reply flag of the kernel's, unknown to libfuse 3.14

# fuse_common.h: struct fuse_buf flags and fuse_reply_data copy flags
FUSE_BUF_IS_FD = 1 << 1
FUSE_BUF_FD_SEEK = 1 << 2
FUSE_BUF_FD_RETRY = 1 << 3
FUSE_BUF_NO_SPLICE = 1 << 1
FUSE_BUF_SPLICE_MOVE = 1 << 3

# linux/fs.h: the chattr flags ioctls (the kernel sends them with a 4-byte argument)
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_IOC_FSGETXATTR = 0x801C581F          # struct fsxattr (28 bytes): the kernel asks for it
FS_IOC_FSSETXATTR = 0x401C5820          # before it changes flags
#: ``chattr`` flags and their ``fsxattr`` twins (sync, immutable, append, nodump, noatime)
_XFLAGS = ((0x8, 0x20), (0x10, 0x8), (0x20, 0x10), (0x40, 0x80), (0x80, 0x40))
_FSXATTR = struct.Struct("<5I8x")


OptionsArg = str | Iterable[str] | Mapping[str, Any] | None
#: An image path, a POSIX shared-memory name, or an open device (as for :func:`xipfs.open`).
ImageArg = Any


# -- libfuse 3 ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _libfuse() -> ctypes.CDLL:
    """libfuse 3, loaded by its soname: never libfuse 2, which ``fuse2fs`` installs beside it
    and whose ``libfuse.so.2`` takes other options and another ABI."""
    name = "libfuse3.so.3"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        found = ctypes.util.find_library("fuse3")
        if not found:
            raise ImportError("xipfs.fuse needs libfuse 3 (apt-get install fuse3): "
                              f"{name} was not found") from None
        lib = ctypes.CDLL(found)
    version = lib.fuse_version()
    if not 300 <= version < 400:
        raise ImportError(f"xipfs.fuse needs libfuse 3, and {lib._name} is version {version}")
    if not hasattr(lib, "fuse_session_new"):
        raise ImportError(f"{lib._name} has no fuse_session_new (libfuse 3.0 or newer is needed)")
    _declare(lib)
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types of the calls used, so that ctypes passes 64-bit values whole."""
    vp, u64, sz, i = ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t, ctypes.c_int
    double = ctypes.c_double
    sigs: dict[str, tuple[list[Any], Any]] = {
        "fuse_session_new": ([vp, vp, sz, vp], vp),
        "fuse_session_mount": ([vp, ctypes.c_char_p], i),
        "fuse_session_unmount": ([vp], None),
        "fuse_session_destroy": ([vp], None),
        "fuse_session_loop": ([vp], i),
        "fuse_session_fd": ([vp], i),
        "fuse_session_process_buf": ([vp, vp], None),
        "fuse_session_exit": ([vp], None),
        "fuse_set_signal_handlers": ([vp], i),
        "fuse_remove_signal_handlers": ([vp], None),
        "fuse_req_ctx": ([vp], ctypes.POINTER(_FuseCtx)),
        "fuse_req_getgroups": ([vp, i, vp], i),
        "fuse_reply_err": ([vp, i], i),
        "fuse_reply_none": ([vp], None),
        "fuse_reply_entry": ([vp, vp], i),
        "fuse_reply_create": ([vp, vp, vp], i),
        "fuse_reply_attr": ([vp, vp, double], i),
        "fuse_reply_readlink": ([vp, ctypes.c_char_p], i),
        "fuse_reply_open": ([vp, vp], i),
        "fuse_reply_write": ([vp, sz], i),
        "fuse_reply_buf": ([vp, vp, sz], i),
        "fuse_reply_data": ([vp, vp, i], i),
        "fuse_reply_statfs": ([vp, vp], i),
        "fuse_reply_xattr": ([vp, sz], i),
        "fuse_reply_ioctl": ([vp, i, vp, sz], i),
        "fuse_add_direntry": ([vp, vp, sz, ctypes.c_char_p, vp, ctypes.c_int64], sz),
        "fuse_add_direntry_plus": ([vp, vp, sz, ctypes.c_char_p, vp, ctypes.c_int64], sz),
        "fuse_lowlevel_notify_inval_inode": ([vp, u64, ctypes.c_int64, ctypes.c_int64], i),
    }
    for fname, (args, res) in sigs.items():
        fn = getattr(lib, fname)
        fn.argtypes = args
        fn.restype = res
    if lib.fuse_version() >= 312:
        lib.fuse_loop_cfg_create.restype = vp
        lib.fuse_loop_cfg_destroy.argtypes = [vp]
        lib.fuse_loop_cfg_set_max_threads.argtypes = [vp, ctypes.c_uint]
        lib.fuse_loop_cfg_set_idle_threads.argtypes = [vp, ctypes.c_uint]
        lib.fuse_loop_cfg_set_clone_fd.argtypes = [vp, ctypes.c_uint]
    lib.fuse_session_loop_mt.argtypes = [vp, vp]
    lib.fuse_session_loop_mt.restype = i


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
        _libfuse()
    except ImportError as err:
        return str(err)
    from shutil import which
    if os.geteuid() != 0 and which("fusermount3") is None:
        return "fusermount3 is not installed (apt-get install fuse3)"
    return None


class _FuseCtx(ctypes.Structure):
    _fields_ = [("uid", ctypes.c_uint32), ("gid", ctypes.c_uint32), ("pid", ctypes.c_int32),
                ("umask", ctypes.c_uint32)]


class _FuseArgs(ctypes.Structure):
    _fields_ = [("argc", ctypes.c_int), ("argv", ctypes.POINTER(ctypes.c_char_p)),
                ("allocated", ctypes.c_int)]


class _ConnInfo(ctypes.Structure):
    """``struct fuse_conn_info``: the fields before ``reserved`` are stable through libfuse 3."""
    _fields_ = [("proto_major", ctypes.c_uint), ("proto_minor", ctypes.c_uint),
                ("max_write", ctypes.c_uint), ("max_read", ctypes.c_uint),
                ("max_readahead", ctypes.c_uint), ("capable", ctypes.c_uint),
                ("want", ctypes.c_uint), ("max_background", ctypes.c_uint),
                ("congestion_threshold", ctypes.c_uint), ("time_gran", ctypes.c_uint)]


# struct stat, as the C library lays it out (x86_64, or the generic layout of aarch64/riscv64)
if platform.machine() in ("x86_64", "AMD64"):
    _STAT = struct.Struct("<QQQIIIiQqqqqqqqqq24x")     # dev ino nlink mode uid gid pad rdev size ...

    def _stat_fields(a: tuple) -> tuple:
        ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, at, mt, ct = a
        return (0, ino, nlink, mode, uid, gid, 0, rdev, size, blksize, blocks,
                at // 1_000_000_000, at % 1_000_000_000, mt // 1_000_000_000, mt % 1_000_000_000,
                ct // 1_000_000_000, ct % 1_000_000_000)
    _ST_MODE, _ST_UID, _ST_GID, _ST_SIZE, _ST_TIMES = 24, 28, 32, 48, 72
else:
    _STAT = struct.Struct("<QQIIIIQQqiiqqqqqqq8x")      # dev ino mode nlink uid gid rdev pad size ...

    def _stat_fields(a: tuple) -> tuple:
        ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, at, mt, ct = a
        return (0, ino, mode, nlink, uid, gid, rdev, 0, size, blksize, 0, blocks,
                at // 1_000_000_000, at % 1_000_000_000, mt // 1_000_000_000, mt % 1_000_000_000,
                ct // 1_000_000_000, ct % 1_000_000_000)
    _ST_MODE, _ST_UID, _ST_GID, _ST_SIZE, _ST_TIMES = 16, 24, 28, 48, 72
_ENTRY = struct.Struct(f"<QQ{_STAT.size}sdd")     # struct fuse_entry_param
_STATVFS = struct.Struct("<11Q24x")
_FH_OFFSET = 16                                   # fuse_file_info.fh
_FI_BITS = 4                                      # the bit-field word after fuse_file_info.flags
FI_WRITEPAGE, FI_DIRECT_IO, FI_KEEP_CACHE, FI_NOFLUSH = 1 << 0, 1 << 1, 1 << 2, 1 << 7
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_TIMESPEC = struct.Struct("<qq")
_BUF = struct.Struct("<QiiQiiq")                  # struct fuse_buf: size flags pad mem fd pad pos
_BUFVEC_HEAD = struct.Struct("<QQQ")              # count idx off


# -- the operations, by inode --------------------------------------------------------------------
class _Listing:
    """An open directory, its entries as they were at opendir (so offsets stay valid), and how
    many names had been removed from it then; also the handle of a FIFO or device node the
    kernel opens only to ask for its flags (no entries)."""

    __slots__ = ("node", "entries", "removals")

    def __init__(self, node: Inode, entries: list[tuple[bytes, int, int]], removals: int = 0) -> None:
        self.node = node
        self.entries = entries
        self.removals = removals


class Operations:
    """What the kernel asks of the mount, by inode number, in plain Python: each method raises
    the ``OSError`` to answer with or returns what the reply carries (the glue in
    :class:`_Session` turns them into libfuse replies; tests call them directly).

    Every inode given to the kernel in an entry (a lookup, a new name, a ``readdirplus``
    listing) is counted until the kernel forgets it (:meth:`forget`); while counted it
    outlives its last name, as a file open here does.
    """

    def __init__(self, fs: Filesystem, *, read_path: str = "splice") -> None:
        self.fs = fs
        self.nodes = nodes = Nodes(fs)
        #: Serialises the requests that change something (the filesystem's own lock).
        self.lock = nodes.lock
        self.readonly = fs.readonly
        self.timeout = RO_TIMEOUT if fs.readonly else RW_TIMEOUT
        #: open files and directories by handle number
        self.handles: dict[int, Any] = {}
        self._fh = itertools.count(1)
        #: inode -> how many times the kernel was given it and has not forgotten it yet
        self.refs: dict[int, int] = {}
        if read_path not in READ_PATHS:
            raise ValueError(f"read_path must be one of {', '.join(READ_PATHS)}, not {read_path!r}")
        #: Descriptor of the image file that reads are served from (libfuse copies or splices
        #: the bytes itself), or -1: reads are copied from the device by Python.
        self.image_fd = _readable_fd(fs) if read_path != "copy" else -1
        #: Where the filesystem starts in that file (a partition of a disk image).
        self.image_shift = fs.device.base_offset
        #: Whether libfuse should splice image pages into its replies (no copy in user space).
        self.splice = self.image_fd >= 0 and read_path == "splice"
        #: The kernel's writeback cache is on: it applies O_APPEND and writes at offsets.
        self.kernel_appends = False
        #: Handles opened with O_APPEND while the server applies it (no writeback cache): their
        #: write() requests go to EOF, the kernel's write-back of their mapped pages does not.
        self.appending: set[int] = set()
        #: directory inode -> names removed or replaced in it so far (unlink, rmdir, rename)
        self.removals: dict[int, int] = {}

    # -- inodes and the kernel's references ------------------------------------------------------
    def node(self, ino: int) -> Inode:
        """The inode of node id ``ino`` (node 1 is the root)."""
        return self.nodes.inode(ROOT_INO if ino == FUSE_ROOT_ID else ino)

    def _given(self, node: Inode) -> Inode:
        """Count one more reference the kernel holds to ``node``."""
        if self.readonly:
            return node
        ino = node.ino
        with self.lock:
            n = self.refs.get(ino)
            if n is None:
                self.refs[ino] = 1
                self.nodes.hold(node)
            else:
                self.refs[ino] = n + 1
        return node

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references to ``ino``; at none, an orphan is freed."""
        if self.readonly:
            return
        if ino == FUSE_ROOT_ID:
            ino = ROOT_INO
        with self.lock:
            n = self.refs.get(ino)
            if n is None:
                return
            if n > count:
                self.refs[ino] = n - count
                return
            del self.refs[ino]
            self.nodes.let_go(ino)

    def forget_all(self) -> None:
        """The kernel is gone: every reference with it (orphans are freed)."""
        for ino in list(self.refs):
            with contextlib.suppress(Exception):
                self.forget(ino, 1 << 62)

    # -- names --------------------------------------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> Inode:
        with self.lock:
            return self._given(self.nodes.lookup(self.node(parent), name))

    def getattr(self, ino: int) -> Inode:
        return self.node(ino)

    def readlink(self, ino: int) -> bytes:
        return self.nodes.readlink(self.node(ino))

    def mknod(self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int) -> Inode:
        fmt = stat.S_IFMT(mode) or stat.S_IFREG
        if fmt not in (stat.S_IFREG, stat.S_IFIFO, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFSOCK):
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return self._make(parent, name, fmt | (mode & 0o7777), uid, gid, rdev=rdev)

    def mkdir(self, parent: int, name: bytes, mode: int, uid: int, gid: int) -> Inode:
        return self._make(parent, name, stat.S_IFDIR | (mode & 0o7777), uid, gid)

    def symlink(self, target: bytes, parent: int, name: bytes, uid: int, gid: int) -> Inode:
        if len(target) >= PAGE:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
        return self._make(parent, name, stat.S_IFLNK | 0o777, uid, gid, target=target)

    def _make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, **kw: Any) -> Inode:
        with self.lock:
            return self._given(self.nodes.create(self.node(parent), name, mode, uid, gid, **kw))

    def unlink(self, parent: int, name: bytes) -> None:
        with self.lock:
            d = self.node(parent)
            self.nodes.unlink(d, name)
            self._removed_from(d)

    def rmdir(self, parent: int, name: bytes) -> None:
        with self.lock:
            d = self.node(parent)
            self.nodes.rmdir(d, name)
            self._removed_from(d)

    def _removed_from(self, *dirs: Inode) -> None:
        """Count a name gone from (or replaced in) each of ``dirs``: see :meth:`listing_current`."""
        for d in dirs:
            self.removals[d.ino] = self.removals.get(d.ino, 0) + 1

    def rename(self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0) -> None:
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == RENAME_NOREPLACE | RENAME_EXCHANGE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))   # no whiteouts, as ext2
        with self.lock:
            d, new_d = self.node(parent), self.node(new_parent)
            self.nodes.rename(d, name, new_d, new_name, bool(flags & RENAME_NOREPLACE),
                              bool(flags & RENAME_EXCHANGE))
            self._removed_from(d, new_d)

    def link(self, ino: int, new_parent: int, new_name: bytes) -> Inode:
        with self.lock:
            node = self.node(ino)
            self.nodes.link(node, self.node(new_parent), new_name)
            return self._given(node)

    # -- attributes -----------------------------------------------------------------------------
    def setattr(self, ino: int, to_set: int, *, mode: int = 0, uid: int = -1, gid: int = -1,
                size: int = 0, atime_ns: int = 0, mtime_ns: int = 0, ctime_ns: int = 0,
                fh: int | None = None, caller: Caller | None = None) -> Inode:
        """Change what ``to_set`` (``SET_*`` bits) names; the new attributes' inode.
        ``caller`` (None: root) matters only when set-id bits may go."""
        nodes = self.nodes
        with self.lock:
            node = self.node(ino)
            if to_set & SET_MODE:
                nodes.chmod(node, mode)
            if to_set & (SET_UID | SET_GID) or to_set == SET_CTIME:
                # chown(2); with owner and group both -1 the kernel sends ctime alone (no other
                # SETATTR does: time write-back always carries mtime), and it still drops bits
                in_group = (caller is None or not node.mode & stat.S_ISGID
                            or caller.in_group(gid if to_set & SET_GID else node.gid))
                nodes.chown(node, uid if to_set & SET_UID else -1, gid if to_set & SET_GID else -1,
                            in_group=in_group)
            if to_set & SET_SIZE:
                nodes.truncate(node, size)
                if to_set & SET_KILL_SUIDGID:
                    self.nodes.drop_setid(node, caller is None or caller.in_group(node.gid))
            times = to_set & (SET_ATIME | SET_MTIME | SET_ATIME_NOW | SET_MTIME_NOW | SET_CTIME)
            if times and to_set != SET_CTIME:
                now = time.time_ns()
                a = now if to_set & SET_ATIME_NOW else atime_ns if to_set & SET_ATIME else None
                m = now if to_set & SET_MTIME_NOW else mtime_ns if to_set & SET_MTIME else None
                c = ctime_ns if to_set & SET_CTIME else None
                nodes.setattr(node, atime_ns=a, mtime_ns=m, ctime_ns=c)
            return node

    def statfs(self) -> os.statvfs_result:
        return self.nodes.statvfs()

    def access(self, ino: int, mask: int) -> None:
        self.node(ino)
        if mask & os.W_OK and self.readonly:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    def get_flags(self, ino: int) -> int:
        return self.nodes.get_flags(self.node(ino))

    def set_flags(self, ino: int, flags: int) -> None:
        with self.lock:
            self.nodes.set_flags(self.node(ino), flags)

    # -- extended attributes (of the inode itself: the kernel resolved any symlink) -------------
    def getxattr(self, ino: int, name: bytes) -> bytes:
        return self.nodes.getxattr(self.node(ino), name)

    def listxattr(self, ino: int) -> list[str]:
        return self.nodes.listxattr(self.node(ino))

    def setxattr(self, ino: int, name: bytes, value: bytes, flags: int) -> None:
        with self.lock:
            self.nodes.setxattr(self.node(ino), name, value, flags)

    def removexattr(self, ino: int, name: bytes) -> None:
        with self.lock:
            self.nodes.removexattr(self.node(ino), name)

    # -- files ----------------------------------------------------------------------------------
    def _add(self, handle: Any) -> int:
        fh = next(self._fh)
        self.handles[fh] = handle
        return fh

    def open(self, ino: int, flags: int, caller: Caller | None = None) -> int:
        """A handle on ``ino``; an O_TRUNC open by a user (not root) drops set-id bits."""
        with self.lock:
            node = self.node(ino)
            if not node.is_reg and not node.is_dir and (flags & os.O_ACCMODE) == os.O_RDONLY:
                return self._add(_Listing(node, []))      # lsattr of a FIFO or device node
            fh = self._open_file(node, flags)
            if flags & os.O_TRUNC and _drops_setid(node, caller):
                assert caller is not None
                self.nodes.drop_setid(node, caller.in_group(node.gid))
            return fh

    def create(self, parent: int, name: bytes, mode: int, flags: int, uid: int,
               gid: int) -> tuple[Inode, int]:
        with self.lock:
            node = self._make(parent, name, stat.S_IFREG | (mode & 0o7777), uid, gid)
            try:
                return node, self._open_file(node, (flags & ~os.O_TRUNC) | os.O_RDWR)
            except BaseException:
                self.forget(node.ino, 1)
                raise

    def _open_file(self, node: Inode, flags: int) -> int:
        """A handle on regular file ``node`` that writes where it is told; an O_APPEND one is
        remembered in :attr:`appending` when the kernel does not apply O_APPEND itself."""
        fh = self._add(self.nodes.open(node, flags, positioned=True))
        if flags & os.O_APPEND and not self.kernel_appends:
            self.appending.add(fh)
        return fh

    def file(self, fh: int) -> XipFile:
        f = self.handles.get(fh)
        if f is None or isinstance(f, _Listing):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return f

    def read_into(self, fh: int, view: memoryview, offset: int) -> int:
        """Fill ``view`` from byte ``offset`` of handle ``fh``: one copy; the bytes copied."""
        return self.nodes.read_into(self.file(fh).node, view, offset)

    def read_segments(self, fh: int, size: int, offset: int) -> list[tuple[int, int]]:
        """Where the ``size`` bytes at ``offset`` of handle ``fh`` are: ``(length, byte offset in
        the image file, or -1 for a hole)`` pieces, fewer bytes at EOF."""
        node = self.file(fh).node
        end = min(offset + size, node.size)
        if end <= offset:
            return []
        return self.nodes.segments(node, offset, end)

    def write(self, fh: int, data: Any, offset: int, caller: Caller | None = None,
              whole: bool = False) -> tuple[int, bool]:
        """Write ``data`` at ``offset``: ``(bytes written, whether set-id bits were dropped)``
        (a write by a user, not root, drops them; the kernel's own write-back comes as root).
        ``whole`` (the kernel's write-back of cached pages, which ignores a short count): what
        does not fit is an error, ENOSPC or EFBIG, so that fsync and close report it."""
        f = self.file(fh)
        if not f.writable():
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        if fh in self.appending and not whole:   # O_APPEND: at EOF, found and written in one step
            with self.lock:
                n = f.pwrite(data, f.node.size)
        else:
            n = f.pwrite(data, offset)
        while whole and 0 < n < len(data):        # EFBIG at the size limit, 0 without space
            more = f.pwrite(data[n:], offset + n)
            if not more:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            n += more
        if n == 0 and len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        killed = False
        if _drops_setid(f.node, caller):
            assert caller is not None
            with self.lock:
                killed = self.nodes.drop_setid(f.node, caller.in_group(f.node.gid))
        return n, killed

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        """On an ext4 file (an extent tree), mode 0 and ``FALLOC_FL_KEEP_SIZE`` as Linux's ext4:
        unwritten extents that read as zeros. EOPNOTSUPP otherwise, as Linux gives on ext2 and
        for the modes xipfs does not do (punching holes, zeroing, collapsing ranges):
        ``posix_fallocate`` then writes zeros itself, as it does on a loop mount."""
        f = self.file(fh)
        with self.lock:
            self.nodes.fallocate(f, mode, offset, length)

    def fsync(self, fh: int | None = None) -> None:
        self.nodes.sync()

    def release(self, fh: int) -> None:
        self.appending.discard(fh)
        h = self.handles.pop(fh, None)
        if h is not None and not isinstance(h, _Listing):
            with self.lock:
                h.close()

    def opendir(self, ino: int) -> int:
        node = self.node(ino)
        with self.lock:
            return self._add(_Listing(node, self.nodes.entries(node), self.removals.get(node.ino, 0)))

    def readdir(self, fh: int, offset: int) -> list[tuple[bytes, int, int]]:
        """The entries of directory handle ``fh`` from position ``offset`` (the next one's
        position is its index + 1)."""
        h = self.handles.get(fh)
        if not isinstance(h, _Listing):
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        return h.entries[offset:]

    def listing_current(self, fh: int) -> bool:
        """Whether listing ``fh``'s entries may carry their inodes (readdirplus): no name was
        removed from the directory since opendir, else a number may be another file's by now
        (the kernel would take that file for this name, as a hard link). Under :attr:`lock`."""
        h = self.handles.get(fh)
        return isinstance(h, _Listing) and h.removals == self.removals.get(h.node.ino, 0)

    def entry_node(self, ino: int) -> Inode | None:
        """The inode to give the kernel with a current listing's entry ``ino``, or None (a free
        inode), when the kernel is to look the name up itself. Under :attr:`lock`."""
        try:
            return self.nodes.stored(ino)
        except OSError:
            return None

    def close_all(self) -> None:
        """Close every handle and drop every reference (files unlinked while open are freed)."""
        handles = list(self.handles.values())
        self.handles.clear()
        self.appending.clear()
        for h in handles:
            if not isinstance(h, _Listing):
                with contextlib.suppress(Exception):
                    h.close()
        self.forget_all()


class Caller:
    """Who made a request, asked of libfuse only when a set-id bit makes it matter (the
    common write of an ordinary file asks nothing). Root stands for CAP_FSETID."""

    __slots__ = ("_lib", "_req", "_ids")

    def __init__(self, lib: Any, req: int) -> None:
        self._lib = lib
        self._req = req
        self._ids: tuple[int, int] | None = None

    @property
    def uid(self) -> int:
        if self._ids is None:
            c = self._lib.fuse_req_ctx(self._req).contents
            self._ids = (c.uid, c.gid)
        return self._ids[0]

    def in_group(self, gid: int) -> bool:
        """Whether the caller is root or in group ``gid`` (its own or a supplementary one)."""
        if self.uid == 0:
            return True
        assert self._ids is not None
        if self._ids[1] == gid:
            return True
        out = (ctypes.c_uint32 * 256)()
        n = self._lib.fuse_req_getgroups(self._req, 256, out)
        return gid in out[:max(0, min(n, 256))]


def _drops_setid(node: Inode, caller: Caller | None) -> bool:
    """Whether a write, truncate or O_TRUNC open by ``caller`` must drop ``node``'s set-id
    bits: it has some, and the caller is not root (the kernel's own write-back comes as root)."""
    return bool(node.mode & (stat.S_ISUID | stat.S_ISGID)) and caller is not None and caller.uid != 0


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


# -- the libfuse glue ---------------------------------------------------------------------------
_REQ = ctypes.c_void_p
_INO = ctypes.c_uint64
_PTR = ctypes.c_void_p
_NAME = ctypes.c_char_p
_SIZE = ctypes.c_size_t
_OFF = ctypes.c_int64
_CB: dict[str, Any] = {               # name: (slot in struct fuse_lowlevel_ops, argument types)
    "init": (0, [_PTR, _PTR]),
    "destroy": (1, [_PTR]),
    "lookup": (2, [_REQ, _INO, _NAME]),
    "forget": (3, [_REQ, _INO, ctypes.c_uint64]),
    "getattr": (4, [_REQ, _INO, _PTR]),
    "setattr": (5, [_REQ, _INO, _PTR, ctypes.c_int, _PTR]),
    "readlink": (6, [_REQ, _INO]),
    "mknod": (7, [_REQ, _INO, _NAME, ctypes.c_uint32, ctypes.c_uint64]),
    "mkdir": (8, [_REQ, _INO, _NAME, ctypes.c_uint32]),
    "unlink": (9, [_REQ, _INO, _NAME]),
    "rmdir": (10, [_REQ, _INO, _NAME]),
    "symlink": (11, [_REQ, _NAME, _INO, _NAME]),
    "rename": (12, [_REQ, _INO, _NAME, _INO, _NAME, ctypes.c_uint]),
    "link": (13, [_REQ, _INO, _INO, _NAME]),
    "open": (14, [_REQ, _INO, _PTR]),
    "read": (15, [_REQ, _INO, _SIZE, _OFF, _PTR]),
    "write": (16, [_REQ, _INO, _PTR, _SIZE, _OFF, _PTR]),
    "release": (18, [_REQ, _INO, _PTR]),
    "fsync": (19, [_REQ, _INO, ctypes.c_int, _PTR]),
    "opendir": (20, [_REQ, _INO, _PTR]),
    "readdir": (21, [_REQ, _INO, _SIZE, _OFF, _PTR]),
    "releasedir": (22, [_REQ, _INO, _PTR]),
    "fsyncdir": (23, [_REQ, _INO, ctypes.c_int, _PTR]),
    "statfs": (24, [_REQ, _INO]),
    "setxattr": (25, [_REQ, _INO, _NAME, _PTR, _SIZE, ctypes.c_int]),
    "getxattr": (26, [_REQ, _INO, _NAME, _SIZE]),
    "listxattr": (27, [_REQ, _INO, _SIZE]),
    "removexattr": (28, [_REQ, _INO, _NAME]),
    "access": (29, [_REQ, _INO, ctypes.c_int]),
    "create": (30, [_REQ, _INO, _NAME, ctypes.c_uint32, _PTR]),
    "ioctl": (34, [_REQ, _INO, ctypes.c_uint, _PTR, _PTR, ctypes.c_uint, _PTR, _SIZE, _SIZE]),
    "forget_multi": (38, [_REQ, _SIZE, _PTR]),
    "fallocate": (40, [_REQ, _INO, ctypes.c_int, _OFF, _OFF, _PTR]),
    "readdirplus": (41, [_REQ, _INO, _SIZE, _OFF, _PTR]),
}
_N_OPS = 44                           # pointers in struct fuse_lowlevel_ops (libfuse 3.14)


class _Session:
    """One libfuse low-level session serving :class:`Operations` at a mount point.

    Every callback replies exactly once (an ``OSError`` becomes its errno; anything else is
    logged and answered with EIO), so the kernel never waits for an answer that will not come.
    """

    def __init__(self, ops: Operations, *, on_ready: Callable[[], None] | None = None) -> None:
        self.ops = ops
        self.lib = lib = _libfuse()
        self._on_ready = on_ready
        #: Set once the kernel connected (the mount went live).
        self.live = False
        #: The ``max_read`` mount option, when one was given (0: the kernel's maximum).
        self.max_read = 0
        #: Readahead window to ask for (KiB; root only), and where we are mounted.
        self.readahead_kb = 0
        self.mountpoint: str | None = None
        #: Let the kernel gather writes in its page cache (``writeback_cache``).
        self.writeback = True
        #: Take set-id bits off in the server (FUSE_HANDLE_KILLPRIV_V2; see ``_init_with_killpriv``).
        self.killpriv = True
        self._se: int | None = None
        self._zeros = ctypes.create_string_buffer(1 << 20)     # holes, for spliced replies
        self._timeout = ops.timeout
        self._reply_err = lib.fuse_reply_err
        self._entry_buf = ctypes.c_char * _ENTRY.size
        self._stat_buf = ctypes.c_char * _STAT.size
        self._callbacks: list[Any] = []
        #: Requests served, by kind, when ``XIPFS_FUSE_STATS`` names a file to write them to
        #: (JSON, at unmount): what a benchmark reads to see where the round trips go.
        self.counts: dict[str, int] | None = {} if os.environ.get("XIPFS_FUSE_STATS") else None
        #: libfuse worker threads whose Python thread state is kept between callbacks
        self._pinned: set[int] = set()
        table = (ctypes.c_void_p * _N_OPS)()
        for name, (slot, argtypes) in _CB.items():
            fn = getattr(self, "_" + name)
            guarded = fn if name in ("init", "destroy") else self._guard(fn, name)
            cb = ctypes.CFUNCTYPE(None, *argtypes)(guarded)
            self._callbacks.append(cb)
            table[slot] = ctypes.cast(cb, ctypes.c_void_p).value
        self._table = table

    def _guard(self, fn: Callable[..., None], name: str) -> Callable[..., None]:
        reply_err = self._reply_err
        pinned = self._pinned
        ident = threading.get_ident
        counts = self.counts

        def callback(req: int, *args: Any) -> None:
            if counts is not None:
                counts[name] = counts.get(name, 0) + 1
            if ident() not in pinned:
                _pin_thread_state(pinned)
            try:
                fn(req, *args)
            except OSError as err:
                code = err.errno if isinstance(err.errno, int) and err.errno > 0 else errno.EIO
                if isinstance(err, CorruptImageError):
                    log.error("%s: %s", name, err)
                reply_err(req, code)
            except BaseException:
                log.exception("%s failed", name)
                reply_err(req, errno.EIO)
        return callback

    # -- replies --------------------------------------------------------------------------------
    def _attr_bytes(self, node: Inode) -> bytes:
        a = self.ops.nodes.attrs(node)
        return _STAT.pack(*_stat_fields(a))

    def _entry(self, req: int, node: Inode, *, create_fi: int | None = None) -> None:
        ino = node.ino
        buf = self._entry_buf()
        _ENTRY.pack_into(buf, 0, FUSE_ROOT_ID if ino == ROOT_INO else ino, node.generation,
                         self._attr_bytes(node), self._timeout, self._timeout)
        if create_fi is None:
            self.lib.fuse_reply_entry(req, buf)
        else:
            self.lib.fuse_reply_create(req, buf, create_fi)

    def _ctx(self, req: int) -> tuple[int, int]:
        c = self.lib.fuse_req_ctx(req).contents
        return c.uid, c.gid

    # -- lifetime -------------------------------------------------------------------------------
    def _init(self, userdata: int, conn_p: int) -> None:
        """The kernel connected: the mount is live. libfuse wants ``max_read`` (a mount option)
        repeated here; a bigger readahead window is set here too, before the kernel takes the
        smaller of its window and ours from this reply."""
        try:
            conn = _ConnInfo.from_address(conn_p)
            if self.max_read:
                conn.max_read = self.max_read
            if self.readahead_kb and self.mountpoint and set_readahead(self.mountpoint, self.readahead_kb):
                conn.max_readahead = self.readahead_kb * 1024
            want = FUSE_CAP_ATOMIC_O_TRUNC | FUSE_CAP_IOCTL_DIR | FUSE_CAP_READDIRPLUS
            if self.ops.splice:
                want |= FUSE_CAP_SPLICE_WRITE
            if self.writeback and not self.ops.readonly:
                want |= FUSE_CAP_WRITEBACK_CACHE
            conn.want |= want & conn.capable
            # with the writeback cache the kernel turns O_APPEND into offsets itself
            self.ops.kernel_appends = bool(conn.want & FUSE_CAP_WRITEBACK_CACHE)
            conn.time_gran = 1
        except BaseException:
            log.exception("init failed")
        self.live = True
        if self._on_ready is not None:
            self._on_ready()

    def _destroy(self, userdata: int) -> None:
        """Unmounted: close what the kernel left open (a lazy unmount sends no release)."""
        try:
            self.ops.close_all()
            if self.counts is not None:
                import json
                with open(os.environ["XIPFS_FUSE_STATS"], "w") as f:
                    json.dump(self.counts, f, sort_keys=True)
        except BaseException:
            log.exception("destroy failed")

    # -- names ----------------------------------------------------------------------------------
    def _lookup(self, req: int, parent: int, name: bytes) -> None:
        try:
            node = self.ops.lookup(parent, name)
        except FileNotFoundError:                # a negative entry, cached like a positive one
            buf = self._entry_buf()
            _ENTRY.pack_into(buf, 0, 0, 0, b"", self._timeout, self._timeout)
            self.lib.fuse_reply_entry(req, buf)
            return
        self._entry(req, node)

    def _forget(self, req: int, ino: int, nlookup: int) -> None:
        try:
            self.ops.forget(ino, nlookup)
        except BaseException:
            log.exception("forget failed")
        self.lib.fuse_reply_none(req)

    def _forget_multi(self, req: int, count: int, forgets: int) -> None:
        try:
            raw = ctypes.string_at(forgets, 16 * count)
            for ino, n in struct.iter_unpack("<QQ", raw):
                self.ops.forget(ino, n)
        except BaseException:
            log.exception("forget failed")
        self.lib.fuse_reply_none(req)

    def _getattr(self, req: int, ino: int, fi: int) -> None:
        self.lib.fuse_reply_attr(req, self._attr_bytes(self.ops.getattr(ino)), self._timeout)

    def _setattr(self, req: int, ino: int, attr: int, to_set: int, fi: int) -> None:
        raw = ctypes.string_at(attr, _STAT.size)
        (mode,) = _U32.unpack_from(raw, _ST_MODE)
        (uid,) = _U32.unpack_from(raw, _ST_UID)
        (gid,) = _U32.unpack_from(raw, _ST_GID)
        (size,) = struct.unpack_from("<q", raw, _ST_SIZE)
        a_s, a_n = _TIMESPEC.unpack_from(raw, _ST_TIMES)
        m_s, m_n = _TIMESPEC.unpack_from(raw, _ST_TIMES + 16)
        c_s, c_n = _TIMESPEC.unpack_from(raw, _ST_TIMES + 32)
        fh = _U64.unpack_from(ctypes.string_at(fi + _FH_OFFSET, 8))[0] if fi else None
        node = self.ops.setattr(ino, to_set, mode=mode, uid=uid, gid=gid, size=size,
                                atime_ns=a_s * 1_000_000_000 + a_n, mtime_ns=m_s * 1_000_000_000 + m_n,
                                ctime_ns=c_s * 1_000_000_000 + c_n, fh=fh, caller=Caller(self.lib, req))
        self.lib.fuse_reply_attr(req, self._attr_bytes(node), self._timeout)

    def _readlink(self, req: int, ino: int) -> None:
        self.lib.fuse_reply_readlink(req, self.ops.readlink(ino))

    def _mknod(self, req: int, parent: int, name: bytes, mode: int, rdev: int) -> None:
        self._entry(req, self.ops.mknod(parent, name, mode, rdev, *self._ctx(req)))

    def _mkdir(self, req: int, parent: int, name: bytes, mode: int) -> None:
        self._entry(req, self.ops.mkdir(parent, name, mode, *self._ctx(req)))

    def _symlink(self, req: int, target: bytes, parent: int, name: bytes) -> None:
        self._entry(req, self.ops.symlink(target, parent, name, *self._ctx(req)))

    def _unlink(self, req: int, parent: int, name: bytes) -> None:
        self.ops.unlink(parent, name)
        self._reply_err(req, 0)

    def _rmdir(self, req: int, parent: int, name: bytes) -> None:
        self.ops.rmdir(parent, name)
        self._reply_err(req, 0)

    def _rename(self, req: int, parent: int, name: bytes, new_parent: int, new_name: bytes,
                flags: int) -> None:
        self.ops.rename(parent, name, new_parent, new_name, flags)
        self._reply_err(req, 0)

    def _link(self, req: int, ino: int, new_parent: int, new_name: bytes) -> None:
        self._entry(req, self.ops.link(ino, new_parent, new_name))

    # -- files ----------------------------------------------------------------------------------
    @staticmethod
    def _set_fh(fi: int, fh: int, bits: int) -> None:
        ctypes.c_uint64.from_address(fi + _FH_OFFSET).value = fh
        word = ctypes.c_uint32.from_address(fi + _FI_BITS)
        word.value = (word.value & ~FI_DIRECT_IO) | bits

    def _open(self, req: int, ino: int, fi: int) -> None:
        flags = ctypes.c_int.from_address(fi).value
        fh = self.ops.open(ino, flags, Caller(self.lib, req))
        self._set_fh(fi, fh, FI_KEEP_CACHE | FI_NOFLUSH)
        self.lib.fuse_reply_open(req, fi)

    def _create(self, req: int, parent: int, name: bytes, mode: int, fi: int) -> None:
        flags = ctypes.c_int.from_address(fi).value
        node, fh = self.ops.create(parent, name, mode, flags, *self._ctx(req))
        self._set_fh(fi, fh, FI_KEEP_CACHE | FI_NOFLUSH)
        self._entry(req, node, create_fi=fi)

    def _fh(self, fi: int) -> int:
        return ctypes.c_uint64.from_address(fi + _FH_OFFSET).value

    def _read(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        ops = self.ops
        fh = self._fh(fi)
        if ops.image_fd < 0:
            buf = ctypes.create_string_buffer(size)
            n = ops.read_into(fh, memoryview(buf).cast("B"), offset)
            self.lib.fuse_reply_buf(req, buf, n)
            return
        segments = ops.read_segments(fh, size, offset)
        count = max(1, len(segments))
        vec = ctypes.create_string_buffer(_BUFVEC_HEAD.size + count * _BUF.size)
        _BUFVEC_HEAD.pack_into(vec, 0, count, 0, 0)
        at = _BUFVEC_HEAD.size
        fd = ops.image_fd
        shift = ops.image_shift
        zeros = ctypes.addressof(self._zeros)
        seek = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK | FUSE_BUF_FD_RETRY
        for length, where in segments:
            if where >= 0:
                _BUF.pack_into(vec, at, length, seek, 0, 0, fd, 0, where + shift)
            else:
                _BUF.pack_into(vec, at, length, 0, 0, zeros, -1, 0, 0)
            at += _BUF.size
        if not segments:
            _BUF.pack_into(vec, at, 0, 0, 0, 0, -1, 0, 0)
        self.lib.fuse_reply_data(req, vec, FUSE_BUF_SPLICE_MOVE if ops.splice else FUSE_BUF_NO_SPLICE)

    def _write(self, req: int, ino: int, buf: int, size: int, offset: int, fi: int) -> None:
        view = memoryview((ctypes.c_char * size).from_address(buf)).cast("B")
        try:
            whole = bool(ctypes.c_uint32.from_address(fi + _FI_BITS).value & FI_WRITEPAGE)
            n, killed = self.ops.write(self._fh(fi), view, offset, Caller(self.lib, req), whole)
        finally:
            view.release()
        if killed:                               # the kernel's copy of the mode is stale now
            self._attrs_changed(ino)
        self.lib.fuse_reply_write(req, n)

    def _release(self, req: int, ino: int, fi: int) -> None:
        self.ops.release(self._fh(fi))
        self._reply_err(req, 0)

    def _fsync(self, req: int, ino: int, datasync: int, fi: int) -> None:
        self.ops.fsync()
        self._reply_err(req, 0)

    _fsyncdir = _fsync

    def _fallocate(self, req: int, ino: int, mode: int, offset: int, length: int, fi: int) -> None:
        self.ops.fallocate(self._fh(fi), mode, offset, length)
        self._reply_err(req, 0)

    # -- directories ----------------------------------------------------------------------------
    def _opendir(self, req: int, ino: int, fi: int) -> None:
        self._set_fh(fi, self.ops.opendir(ino), 0)
        self.lib.fuse_reply_open(req, fi)

    def _releasedir(self, req: int, ino: int, fi: int) -> None:
        self.ops.release(self._fh(fi))
        self._reply_err(req, 0)

    def _readdir(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        self._list(req, size, offset, fi, False)

    def _readdirplus(self, req: int, ino: int, size: int, offset: int, fi: int) -> None:
        self._list(req, size, offset, fi, True)

    def _list(self, req: int, size: int, offset: int, fi: int, plus: bool) -> None:
        ops = self.ops
        fh = self._fh(fi)
        entries = ops.readdir(fh, offset)
        buf = ctypes.create_string_buffer(size)
        with ops.lock if plus else contextlib.nullcontext():     # no name goes while listing
            pos = self._fill(req, buf, entries, offset, plus, fh)
        self.lib.fuse_reply_buf(req, buf, pos)

    def _fill(self, req: int, buf: Any, entries: list[tuple[bytes, int, int]], offset: int,
              plus: bool, fh: int) -> int:
        """Pack ``entries`` (from position ``offset``) into ``buf`` while they fit; the bytes
        used. With ``plus``, each current entry carries its attributes and counts as a lookup."""
        ops = self.ops
        size = len(buf)
        base = ctypes.addressof(buf)
        pos = 0
        lib = self.lib
        add = lib.fuse_add_direntry_plus if plus else lib.fuse_add_direntry
        record = self._entry_buf()
        stat_only = self._stat_buf()
        pack_entry, pack_stat = _ENTRY.pack_into, _STAT.pack_into
        timeout = self._timeout
        entry_node = ops.entry_node
        plus_nodes = plus and ops.listing_current(fh)         # once a reply, not once an entry
        for i, (name, ino, fmt) in enumerate(entries, offset + 1):
            node = entry_node(ino) if plus_nodes and name not in (b".", b"..") else None
            if node is not None:
                pack_entry(record, 0, ino, node.generation, self._attr_bytes(node), timeout, timeout)
                arg: Any = record
            else:
                attrs = (ino, fmt, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
                if plus:
                    pack_entry(record, 0, 0, 0, _STAT.pack(*_stat_fields(attrs)), 0.0, 0.0)
                    arg = record
                else:
                    pack_stat(stat_only, 0, *_stat_fields(attrs))
                    arg = stat_only
            n = add(req, base + pos, size - pos, name, arg, i)
            if n > size - pos:
                break
            pos += n
            if node is not None:
                ops._given(node)
        return pos

    # -- the rest -------------------------------------------------------------------------------
    def _statfs(self, req: int, ino: int) -> None:
        v = self.ops.statfs()
        raw = _STATVFS.pack(v.f_bsize, v.f_frsize, v.f_blocks, v.f_bfree, v.f_bavail, v.f_files,
                            v.f_ffree, v.f_favail, 0, v.f_flag, v.f_namemax)
        self.lib.fuse_reply_statfs(req, raw)

    def _getxattr(self, req: int, ino: int, name: bytes, size: int) -> None:
        self._sized(req, self.ops.getxattr(ino, name), size)

    def _listxattr(self, req: int, ino: int, size: int) -> None:
        self._sized(req, b"".join(os.fsencode(n) + b"\0" for n in self.ops.listxattr(ino)), size)

    def _sized(self, req: int, value: bytes, size: int) -> None:
        """The xattr reply: its length when asked (size 0), ERANGE when it does not fit."""
        if size == 0:
            self.lib.fuse_reply_xattr(req, len(value))
        elif len(value) > size:
            self._reply_err(req, errno.ERANGE)
        else:
            self.lib.fuse_reply_buf(req, value, len(value))

    def _setxattr(self, req: int, ino: int, name: bytes, value: int, size: int, flags: int) -> None:
        self.ops.setxattr(ino, name, ctypes.string_at(value, size) if size else b"", flags)
        self._attrs_changed(ino)
        self._reply_err(req, 0)

    def _removexattr(self, req: int, ino: int, name: bytes) -> None:
        self.ops.removexattr(ino, name)
        self._attrs_changed(ino)
        self._reply_err(req, 0)

    def _attrs_changed(self, ino: int) -> None:
        """The inode's attributes changed where the kernel cannot see it (ctime of a flag or
        xattr change, the mode an access ACL sets): drop its cached copy (not the data)."""
        if self._se:
            self.lib.fuse_lowlevel_notify_inval_inode(self._se, ino, -1, 0)

    def _access(self, req: int, ino: int, mask: int) -> None:
        self.ops.access(ino, mask)
        self._reply_err(req, 0)

    def _ioctl(self, req: int, ino: int, cmd: int, arg: int, fi: int, flags: int, in_buf: int,
               in_size: int, out_size: int) -> None:
        cmd &= 0xFFFFFFFF
        if cmd == FS_IOC_GETFLAGS and out_size >= 4:
            value = _U32.pack(self.ops.get_flags(ino))
            self.lib.fuse_reply_ioctl(req, 0, value, 4)
        elif cmd == FS_IOC_SETFLAGS and in_size >= 4:
            self.ops.set_flags(ino, _U32.unpack(ctypes.string_at(in_buf, 4))[0])
            self._attrs_changed(ino)
            self.lib.fuse_reply_ioctl(req, 0, None, 0)
        elif cmd == FS_IOC_FSGETXATTR and out_size >= _FSXATTR.size:
            flags = self.ops.get_flags(ino)
            xflags = sum(x for f, x in _XFLAGS if flags & f)
            self.lib.fuse_reply_ioctl(req, 0, _FSXATTR.pack(xflags, 0, 0, 0, 0), _FSXATTR.size)
        elif cmd == FS_IOC_FSSETXATTR and in_size >= _FSXATTR.size:
            xflags = _FSXATTR.unpack(ctypes.string_at(in_buf, _FSXATTR.size))[0]
            keep = self.ops.get_flags(ino) & ~sum(f for f, _ in _XFLAGS)
            self.ops.set_flags(ino, keep | sum(f for f, x in _XFLAGS if xflags & x))
            self._attrs_changed(ino)
            self.lib.fuse_reply_ioctl(req, 0, None, 0)
        else:
            self._reply_err(req, errno.ENOTTY)

    # -- serving --------------------------------------------------------------------------------
    def serve(self, mountpoint: str, options: dict[str, Any], *, threads: bool, debug: bool) -> None:
        """Mount at ``mountpoint`` with libfuse ``options`` and serve until unmounted."""
        lib = self.lib
        opts = ",".join(k if v is True else f"{k}={_escape(str(v))}" for k, v in options.items()
                        if v is not False and v is not None)
        argv_list = [b"xipfs", b"-o", opts.encode()] + ([b"-d"] if debug else [])
        argv = (ctypes.c_char_p * (len(argv_list) + 1))(*argv_list, None)
        args = _FuseArgs(len(argv_list), argv, 0)
        se = lib.fuse_session_new(ctypes.byref(args), self._table, ctypes.sizeof(self._table), None)
        if not se:
            raise RuntimeError(f"libfuse refused the mount options {opts!r} (its message is on stderr)")
        self._se = se
        try:
            if lib.fuse_set_signal_handlers(se) != 0:
                raise RuntimeError("libfuse could not install its signal handlers")
            try:
                if lib.fuse_session_mount(se, os.fsencode(mountpoint)) != 0:
                    raise RuntimeError(f"libfuse could not mount at {mountpoint} (its message is on stderr)")
                try:
                    if self.killpriv:
                        self._init_with_killpriv(se)
                    self._loop(se, threads)
                finally:
                    lib.fuse_session_unmount(se)
            finally:
                lib.fuse_remove_signal_handlers(se)
        finally:
            lib.fuse_session_destroy(se)
            self._se = None

    def _init_with_killpriv(self, se: int) -> None:
        """Answer the kernel's INIT through libfuse, adding FUSE_HANDLE_KILLPRIV_V2 to the reply.

        libfuse 3.14 cannot ask for it, and without it the kernel asks the server for
        ``security.capability`` before every ``write()`` (a round trip each). libfuse writes its
        INIT reply into a pipe put where its descriptor was; the reply goes on with the flag.
        """
        fd = self.lib.fuse_session_fd(se)
        data = os.read(fd, 1 << 20)
        opcode = struct.unpack_from("<I", data, 4)[0] if len(data) >= 40 else -1
        r, w = os.pipe()
        saved = os.dup(fd)
        try:
            if opcode == FUSE_INIT:
                os.dup2(w, fd)
            raw = ctypes.create_string_buffer(data, len(data))
            buf = ctypes.create_string_buffer(_BUF.size)
            _BUF.pack_into(buf, 0, len(data), 0, 0, ctypes.addressof(raw), -1, 0, 0)
            self.lib.fuse_session_process_buf(se, buf)
        finally:
            if opcode == FUSE_INIT:
                os.dup2(saved, fd)
            os.close(saved)
            os.close(w)
        try:
            if opcode == FUSE_INIT:
                reply = bytearray(os.read(r, 1 << 16))
                length, error = struct.unpack_from("<Ii", reply, 0)
                minor = struct.unpack_from("<I", reply, 20)[0] if len(reply) >= 32 else 0
                if error == 0 and minor >= 6:
                    flags = struct.unpack_from("<I", reply, 28)[0] | FUSE_HANDLE_KILLPRIV_V2
                    struct.pack_into("<I", reply, 28, flags)
                os.write(fd, reply)
        finally:
            os.close(r)

    def _loop(self, se: int, threads: bool) -> None:
        lib = self.lib
        if not threads:
            lib.fuse_session_loop(se)
            return
        if lib.fuse_version() >= 312:
            cfg = lib.fuse_loop_cfg_create()
            try:
                # Idle worker threads to keep: fewer makes libfuse end and start threads all the
                # time under parallel readahead (each new one needs a Python thread state).
                lib.fuse_loop_cfg_set_idle_threads(cfg, 16)
                lib.fuse_loop_cfg_set_clone_fd(cfg, 0)
                lib.fuse_session_loop_mt(se, cfg)
            finally:
                lib.fuse_loop_cfg_destroy(cfg)
        else:
            class LoopConfig(ctypes.Structure):
                _fields_ = [("clone_fd", ctypes.c_int), ("max_idle_threads", ctypes.c_uint)]
            lib.fuse_session_loop_mt(se, ctypes.addressof(LoopConfig(0, 16)))


_ensure = ctypes.pythonapi.PyGILState_Ensure
_ensure.restype = ctypes.c_int


def _pin_thread_state(pinned: set[int]) -> None:
    """Keep this libfuse worker thread's Python thread state for its next callbacks.

    ctypes makes a thread state for a callback from a thread Python did not start and drops it
    when the callback returns: about 10 us every request. One more ``PyGILState_Ensure`` here,
    never released, keeps it (one small state per worker thread, for the process's life).
    """
    _ensure()
    pinned.add(threading.get_ident())


def _escape(value: str) -> str:
    """A mount option value with libfuse's escapes for ``,`` and ``\\``."""
    return value.replace("\\", "\\\\").replace(",", "\\,")


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


#: Options that mount() takes itself (the rest go to libfuse as mount options). The cache
#: options of libfuse's high-level API are taken too: this door sets its timeouts itself.
OUR_OPTIONS = ("ro", "rw", "threads", "nothreads", "debug", "foreground", "readahead_kb", "read_path",
               "attr_timeout", "entry_timeout", "negative_timeout", "use_ino", "kernel_cache",
               "auto_cache", "max_idle_threads", "writeback_cache")


def fuse_options(image: str, readonly: bool, extra: Mapping[str, Any]) -> dict[str, Any]:
    """The libfuse mount options of a mount: ours, then the caller's (which win)."""
    opts: dict[str, Any] = {
        "fsname": "xipfs:" + image,
        "subtype": "xipfs",
        "default_permissions": True,
    }
    if readonly:
        opts["ro"] = True
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


@contextlib.contextmanager
def _default_signals() -> Any:
    """Let libfuse install its SIGINT/SIGTERM/SIGHUP handlers (it only replaces SIG_DFL), so
    each of them unmounts; put back what was there afterwards."""
    saved: dict[int, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
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
    _libfuse()
    fs = _open_image(image, readonly)
    ops = None
    try:
        ops = Operations(fs, read_path=str(opts.get("read_path", "splice")))
        for key in ("attr_timeout", "entry_timeout"):
            if key in opts:
                ops.timeout = float(opts[key])
        session = _Session(ops, on_ready=on_ready)
        name = os.fsdecode(image) if isinstance(image, (str, bytes, os.PathLike)) else repr(image)
        kwargs = fuse_options(name, fs.readonly, opts)
        if ops.splice and "max_read" not in kwargs:
            kwargs["max_read"] = splice_max_read()
        session.max_read = int(kwargs.get("max_read", 0))
        session.readahead_kb = int(opts.get("readahead_kb", READAHEAD_KB))
        session.writeback = str(opts.get("writeback_cache", "1")).lower() not in ("0", "no", "false", "off")
        session.mountpoint = os.path.realpath(mountpoint)
        threads = bool(opts.get("threads", not opts.get("nothreads", False)))
        with _default_signals():
            try:
                session.serve(mountpoint, kwargs, threads=threads, debug=bool(opts.get("debug")))
            except RuntimeError as err:
                if not session.live:
                    raise RuntimeError(f"could not mount {name} at {mountpoint}: {err}") from None
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
    readahead window, root only; default 4096), ``attr_timeout=S`` (how long the kernel may
    cache names and attributes). ``foreground=False`` serves from a background process and
    returns once the mount is live (errors before that are raised here).
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
