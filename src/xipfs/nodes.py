"""The facade by inode: what Linux's VFS asks of a filesystem (``inode_operations``), for doors
that name files by inode number and a name in a directory, not by path (the FUSE door).

:class:`Nodes` wraps an open :class:`xipfs.Filesystem`. Every change runs under the volume
lock and raises the ``OSError`` that ``os`` would; nothing here applies a umask or checks
permissions (the caller, such as the kernel in front of a FUSE mount, has done both).
Directory names are ``bytes``, as the kernel passes them.
"""

from __future__ import annotations

import errno
import os
import time
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFMT, S_ISBLK, S_ISCHR, S_ISGID, S_ISUID, S_IXGRP
from typing import TYPE_CHECKING

from .errors import fs_error
from .extfs import data as _data
from .extfs import layout as L
from .extfs import namei, orphans
from .extfs.data import read_into, segments
from .extfs.namei import readlink
from .extfs.xattr import chmod as xattr_chmod
from .extfs.xattr import get_xattr, read_xattrs, remove_xattr, set_xattr
from .xip.file import XipFile

if TYPE_CHECKING:
    from .extfs.inode import Inode
    from .extfs.volume import Volume
    from .fs import Filesystem


#: Inode flags (``chattr``) Linux's ext2 shows and lets a user change (``FS_FL_USER_*``).
FLAGS_VISIBLE = 0x0003DFFF
FLAGS_MODIFIABLE = 0x000380FF
FL_IMMUTABLE = L.FL_IMMUTABLE
FL_APPEND = L.FL_APPEND
#: ``fallocate(2)``'s "do not change the size" mode.
FALLOC_FL_KEEP_SIZE = 0x01

#: ``(ino, mode, nlink, uid, gid, rdev, size, blksize, blocks, atime_ns, mtime_ns, ctime_ns)``
Attrs = tuple[int, int, int, int, int, int, int, int, int, int, int, int]


class Nodes:
    """Inode-level operations on a :class:`xipfs.Filesystem` (see the module doc)."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.volume: Volume = fs.volume
        self.lock = fs.volume.lock
        self.readonly = fs.readonly
        self.block_size = fs.block_size
        self._decode = os.fsdecode

    # -- looking ----------------------------------------------------------------------------
    def inode(self, ino: int) -> Inode:
        """Inode ``ino``; ESTALE when it is free (a number nobody may use any more)."""
        vol = self.volume
        if not 0 < ino <= vol.inodes_count:
            raise fs_error(errno.ESTALE)
        node = vol.inode(ino)
        if node.mode == 0 or (node.links == 0 and ino not in vol.orphans and not orphans.is_open(vol, ino)):
            raise fs_error(errno.ESTALE)
        return node

    def lookup(self, parent: Inode, name: bytes) -> Inode:
        """The inode ``name`` names in directory ``parent`` (ENOENT, ENOTDIR, ENAMETOOLONG)."""
        if not parent.is_dir:
            raise fs_error(errno.ENOTDIR)
        if len(name) > 255:
            raise fs_error(errno.ENAMETOOLONG)
        vol = self.volume
        if name == b".":
            return parent
        if name == b"..":
            return vol.inode(vol.dir_index(parent).parent)
        entry = vol.dir_index(parent).entries.get(self._decode(name))
        if entry is None:
            raise fs_error(errno.ENOENT)
        return vol.inode(entry[0])

    def stored(self, ino: int) -> Inode:
        """Inode ``ino`` as stored, whatever its state (a listing's entry, not yet checked)."""
        return self.volume.inode(ino)

    def hold(self, node: Inode) -> None:
        """Someone outside (the kernel, for a FUSE mount) uses ``node``: it outlives its last
        name until :meth:`let_go`, as a file open here does."""
        orphans.opened(self.volume, node)

    def let_go(self, ino: int) -> None:
        """The outside user of inode ``ino`` is gone; an orphan is freed now."""
        vol = self.volume
        orphans.closed(vol, vol.inode(ino))

    def read_into(self, node: Inode, view: memoryview, pos: int) -> int:
        """Copy file data from byte ``pos`` into ``view`` (one copy); the bytes copied."""
        return read_into(self.volume, node, view, pos)

    def segments(self, node: Inode, pos: int, end: int) -> list[tuple[int, int]]:
        """Where bytes ``[pos, end)`` of ``node`` are: ``(length, byte offset in the image, or
        -1 for a hole)`` pieces."""
        return [(length, where) for _, length, where in segments(self.volume, node, pos, end)]

    def attrs(self, node: Inode) -> Attrs:
        """The attributes of ``node`` as :data:`Attrs`."""
        mode = node.mode
        rdev = 0
        if S_ISCHR(mode) or S_ISBLK(mode):
            rdev = os.makedev(*node.rdev)
        return (node.ino, mode, node.links, node.uid, node.gid, rdev, node.size, self.block_size,
                node.st_blocks, node.atime_ns, node.mtime_ns, node.ctime_ns)

    def entries(self, d: Inode) -> list[tuple[bytes, int, int]]:
        """``(name, inode, file type)`` of every entry of directory ``d``, ``.`` and ``..``
        first; the file type is the ``S_IFMT`` bits, or 0 where the image does not record it."""
        if not d.is_dir:
            raise fs_error(errno.ENOTDIR)
        index = self.volume.dir_index(d)
        out = [(b".", d.ino, S_IFDIR), (b"..", index.parent, S_IFDIR)]
        types = _FTYPE_MODE
        enc = os.fsencode
        out.extend((enc(name), ino, types.get(ft, 0)) for name, (ino, ft) in index.entries.items())
        return out

    def readlink(self, node: Inode) -> bytes:
        if not node.is_symlink:
            raise fs_error(errno.EINVAL)
        return readlink(self.volume, node)

    # -- making names ---------------------------------------------------------------------------
    def _writable(self) -> Volume:
        if self.readonly:
            raise fs_error(errno.EROFS)
        return self.volume

    def create(self, parent: Inode, name: bytes, mode: int, uid: int, gid: int, *,
               rdev: int = 0, target: bytes | None = None) -> Inode:
        """Make ``name`` in ``parent`` with exactly ``mode`` (no umask), owned by ``uid:gid``;
        a setgid directory passes on its group (and, to a directory, its setgid bit)."""
        vol = self._writable()
        with vol.lock:
            _check_dir_writable(parent)
            fmt = S_IFMT(mode)
            if parent.mode & S_ISGID:
                gid = parent.gid
                if fmt == S_IFDIR:
                    mode |= S_ISGID
            dev = (os.major(rdev), os.minor(rdev)) if fmt in (S_IFCHR, S_IFBLK) else None
            return namei.create(vol, parent, name, mode, uid, gid, rdev=dev, target=target)

    def link(self, node: Inode, parent: Inode, name: bytes) -> None:
        vol = self._writable()
        with vol.lock:
            _check_dir_writable(parent)
            _check_mutable(node)
            namei.link(vol, node, parent, name)

    def unlink(self, parent: Inode, name: bytes) -> None:
        vol = self._writable()
        with vol.lock:
            _check_dir_writable(parent, True)
            _check_removable(self.lookup(parent, name))
            namei.unlink(vol, parent, name)

    def rmdir(self, parent: Inode, name: bytes) -> None:
        vol = self._writable()
        with vol.lock:
            _check_dir_writable(parent, True)
            if name not in (b".", b".."):
                _check_removable(self.lookup(parent, name))
            namei.rmdir(vol, parent, name)

    def rename(self, parent: Inode, name: bytes, new_parent: Inode, new_name: bytes,
               noreplace: bool = False, exchange: bool = False) -> None:
        """Move ``parent/name`` to ``new_parent/new_name`` (``noreplace``: EEXIST if taken;
        ``exchange``: swap the two, both of which must exist)."""
        vol = self._writable()
        with vol.lock:
            _check_dir_writable(parent, True)
            _check_dir_writable(new_parent, exchange)
            _check_removable(self.lookup(parent, name))
            try:
                there = self.lookup(new_parent, new_name)
            except FileNotFoundError:
                if exchange:
                    raise
                there = None
            if there is not None:
                if noreplace:
                    raise fs_error(errno.EEXIST)
                _check_removable(there)
            if exchange:
                namei.exchange(vol, parent, name, new_parent, new_name)
            else:
                namei.rename(vol, parent, name, new_parent, new_name)

    # -- attributes -----------------------------------------------------------------------------
    def chmod(self, node: Inode, mode: int) -> None:
        """The permission bits; an access ACL follows them, as on Linux."""
        vol = self._writable()
        with vol.lock:
            _check_mutable(node)
            xattr_chmod(vol, node, mode)

    def setattr(self, node: Inode, *, uid: int = -1, gid: int = -1, atime_ns: int | None = None,
                mtime_ns: int | None = None, ctime_ns: int | None = None) -> None:
        """Owner, group and times (-1/None keeps one); ctime becomes now unless given."""
        vol = self._writable()
        with vol.lock:
            _check_mutable(node)
            if uid != -1:
                node.uid = uid
            if gid != -1:
                node.gid = gid
            if atime_ns is not None:
                node.atime_ns = atime_ns
            if mtime_ns is not None:
                node.mtime_ns = mtime_ns
            node.ctime_ns = time.time_ns() if ctime_ns is None else ctime_ns
            node.clip_times()
            vol.write_inode(node)

    def chown(self, node: Inode, uid: int = -1, gid: int = -1, *, in_group: bool = True) -> None:
        """Owner and group (-1 keeps one), then the set-id bits a non-directory loses to
        chown(2) on Linux, even to root's and even with both -1 (:meth:`drop_setid`)."""
        vol = self._writable()
        with vol.lock:
            self.setattr(node, uid=uid, gid=gid)
            if not node.is_dir:
                self.drop_setid(node, in_group)

    def drop_setid(self, node: Inode, in_group: bool = True) -> bool:
        """Drop S_ISUID, and S_ISGID of a group-executable file (of any file when the caller is
        not in its group), as Linux does when a file is written or truncated by someone without
        CAP_FSETID, or given away (``setattr_should_drop_suidgid``); whether it did."""
        mode = node.mode
        kill = mode & S_ISUID
        if mode & S_ISGID and (mode & S_IXGRP or not in_group):
            kill |= S_ISGID
        if not kill:
            return False
        self.chmod(node, mode & ~kill & 0o7777)
        return True

    def truncate(self, node: Inode, size: int) -> None:
        vol = self._writable()
        if node.is_dir:
            raise fs_error(errno.EISDIR)
        if not node.is_reg:
            raise fs_error(errno.EINVAL)
        with vol.lock:
            if node.flags & (FL_IMMUTABLE | FL_APPEND):
                raise fs_error(errno.EPERM)
            _data.truncate(vol, node, size)

    def get_flags(self, node: Inode) -> int:
        """The ``chattr`` flags (``FS_IOC_GETFLAGS``)."""
        return node.flags & FLAGS_VISIBLE

    def set_flags(self, node: Inode, flags: int) -> None:
        """Set the user-modifiable ``chattr`` flags (``FS_IOC_SETFLAGS``), as Linux's ext2 does."""
        vol = self._writable()
        with vol.lock:
            node.flags = (node.flags & ~FLAGS_MODIFIABLE) | (flags & FLAGS_MODIFIABLE)
            node.ctime_ns = time.time_ns()
            vol.write_inode(node)

    # -- extended attributes --------------------------------------------------------------------
    def getxattr(self, node: Inode, name: str | bytes) -> bytes:
        return get_xattr(self.volume, node, self._decode(name))

    def listxattr(self, node: Inode) -> list[str]:
        return [k for k, _ in read_xattrs(self.volume, node)]

    def setxattr(self, node: Inode, name: str | bytes, value: bytes, flags: int = 0) -> None:
        vol = self._writable()
        with vol.lock:
            _check_mutable(node)
            set_xattr(vol, node, self._decode(name), value, flags)

    def removexattr(self, node: Inode, name: str | bytes) -> None:
        vol = self._writable()
        with vol.lock:
            _check_mutable(node)
            remove_xattr(vol, node, self._decode(name))

    # -- files ----------------------------------------------------------------------------------
    def open(self, node: Inode, flags: int, positioned: bool = False) -> XipFile:
        """A file object on regular file ``node`` for the ``os.open`` ``flags`` (O_TRUNC too).

        ``positioned``: writes go where the caller says even under O_APPEND (a FUSE kernel with
        the writeback cache applies O_APPEND itself and sends page-sized writes at offsets)."""
        acc = flags & os.O_ACCMODE
        writable = acc != os.O_RDONLY
        if node.is_dir:
            raise fs_error(errno.EISDIR)
        if not node.is_reg:
            raise fs_error(errno.ENXIO)
        if writable:
            vol = self._writable()
            if node.flags & FL_IMMUTABLE or (node.flags & FL_APPEND and not flags & os.O_APPEND):
                raise fs_error(errno.EPERM)
            if flags & os.O_TRUNC and node.size:
                with vol.lock:
                    _data.truncate(vol, node, 0)
        mode = "r+b" if acc == os.O_RDWR else "wb" if writable else "rb"
        return XipFile(self.volume, node, f"inode {node.ino}", mode,
                       readable=acc != os.O_WRONLY, writable=writable,
                       append=bool(flags & os.O_APPEND) and not positioned)

    def fallocate(self, f: XipFile, mode: int, offset: int, length: int) -> None:
        """``fallocate(2)`` on an open file, as Linux: on ext4 (an extent tree) mode 0 and
        ``FALLOC_FL_KEEP_SIZE`` make unwritten extents; any other mode, and any on ext2, is
        EOPNOTSUPP (the caller, ``posix_fallocate`` say, then writes zeros itself)."""
        if mode & ~FALLOC_FL_KEEP_SIZE or not f.node.flags & L.FL_EXTENTS:
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        if not f.writable():
            raise OSError(errno.EBADF, os.strerror(errno.EBADF))
        f.fallocate(offset, length, keep_size=bool(mode & FALLOC_FL_KEEP_SIZE))

    def sync(self) -> None:
        if not self.readonly:
            self.fs.sync()

    def statvfs(self) -> os.statvfs_result:
        return self.fs.statvfs("/")


_FTYPE_MODE = L.FT_TO_IFMT


def _check_mutable(node: Inode) -> None:
    """EPERM for an immutable inode (``chattr +i``), as Linux's VFS refuses any change to it."""
    if node.flags & FL_IMMUTABLE:
        raise fs_error(errno.EPERM)


def _check_removable(node: Inode) -> None:
    """EPERM for an immutable or append-only inode, which Linux never unlinks or renames."""
    if node.flags & (FL_IMMUTABLE | FL_APPEND):
        raise fs_error(errno.EPERM)


def _check_dir_writable(d: Inode, removing: bool = False) -> None:
    """A directory whose entries may change: not immutable; append-only takes new names only."""
    if not d.is_dir:
        raise fs_error(errno.ENOTDIR)
    if d.flags & (FL_IMMUTABLE | FL_APPEND if removing else FL_IMMUTABLE):
        raise fs_error(errno.EPERM)


__all__ = ["Nodes", "Attrs"]
