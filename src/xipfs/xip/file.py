"""File objects: the seed's file operations (read, write, readv, writev, pread, pwrite).

:class:`XipFile` follows :class:`io.RawIOBase`. Every read copies once, from the device straight
into the caller's buffer (``readinto``, ``readv``) or into the one ``bytes`` object returned
(``read``, ``pread``); every write copies once, from the caller's buffer into the storage.
Nothing passes through an intermediate page.
"""

from __future__ import annotations

import errno
import io
import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..extfs import data as _data
from ..extfs import orphans
from ..extfs.data import read_bytes, read_into
from ..extfs.mount import sync

if TYPE_CHECKING:
    from ..extfs.inode import Inode
    from ..extfs.volume import Volume


class XipFile(io.RawIOBase):
    """A regular file of an image (``buffering=0`` returns this).

    ``readable``/``writable``/``append`` come from the open mode; writes need a filesystem
    opened with ``"r+"``.
    """

    def __init__(self, volume: Volume, inode: Inode, name: str, mode: str = "rb", *,
                 readable: bool = True, writable: bool = False, append: bool = False) -> None:
        self._volume = volume
        self._inode = inode
        self._pos = 0
        self._readable = readable
        self._writable = writable
        self._append = append
        self.name = name
        self.mode = mode
        # Only a writable filesystem can unlink a file while it is open: count opens there.
        self._tracked = not volume.readonly
        if self._tracked:
            orphans.opened(volume, inode)

    @property
    def node(self) -> Inode:
        """The inode this file reads and writes (stays the same if the name goes)."""
        return self._inode

    def close(self) -> None:
        if self._tracked and not self.closed:
            try:
                super().close()
            finally:
                orphans.closed(self._volume, self._inode)
        else:
            super().close()

    def sendfile(self, sock: Any, offset: int = 0, count: int | None = None) -> int:
        """Send ``count`` bytes (to EOF if None) from byte ``offset`` to socket ``sock``.

        Straight from storage (``os.sendfile`` from the image for each run of blocks), zeros for
        holes; like ``socket.sendfile``: returns bytes sent, moves the file position past them.
        """
        self._check_open()
        if not self._readable:
            raise io.UnsupportedOperation("not readable")
        from .transfer import send_file
        sent = send_file(self._volume, self._inode, sock, offset, count)
        self._pos = offset + sent
        return sent

    # -- io.RawIOBase -------------------------------------------------------------------------
    def readable(self) -> bool:
        self._check_open()
        return self._readable

    def seekable(self) -> bool:
        self._check_open()
        return True

    def writable(self) -> bool:
        self._check_open()
        return self._writable

    def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the current position; bytes read (0 at EOF)."""
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        with memoryview(buffer) as view:
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            n = read_into(self._volume, self._inode, view, self._pos)
        self._pos += n
        return n

    def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the current position (all that is left when negative)."""
        if self.closed:
            raise ValueError("I/O operation on closed file.")
        if not self._readable:
            raise io.UnsupportedOperation("File not open for reading")
        if size is None or size < 0:
            size = self._inode.size - self._pos
        data = read_bytes(self._volume, self._inode, self._pos, size)
        self._pos += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._check_open()
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._inode.size + offset
        else:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        if pos < 0:
            raise OSError(22, "Invalid argument")
        self._pos = pos
        return pos

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def fileno(self) -> int:
        raise io.UnsupportedOperation("a file inside an image has no file descriptor")

    def isatty(self) -> bool:
        self._check_open()
        return False

    # -- the seed's other read operations -----------------------------------------------------
    def pread(self, size: int, offset: int) -> bytes:
        """Like ``os.pread``: ``size`` bytes at ``offset``, the file position left alone."""
        self._check_read_fd()
        if offset < 0:
            raise OSError(22, "Invalid argument")
        return read_bytes(self._volume, self._inode, offset, size)

    def readv(self, buffers: Iterable[Any]) -> int:
        """Like ``os.readv``: fill each buffer in turn from the current position; bytes read."""
        self._check_read_fd()
        total = 0
        for buffer in buffers:
            with memoryview(buffer) as view:
                if view.format != "B" or view.ndim != 1:
                    view = view.cast("B")
                want = len(view)
                n = read_into(self._volume, self._inode, view, self._pos)
            self._pos += n
            total += n
            if n < want:
                break
        return total

    def preadv(self, buffers: Iterable[Any], offset: int) -> int:
        """Like ``os.preadv``: ``readv`` at ``offset``, the file position left alone."""
        self._check_read_fd()
        saved = self._pos
        self._pos = offset
        try:
            return self.readv(buffers)
        finally:
            self._pos = saved

    # -- the write side -----------------------------------------------------------------------
    def write(self, data: Any) -> int:
        """Write ``data`` at the current position (at EOF in append mode); bytes written.

        Copies once, into the storage. When space runs out part-way, writes what fits and
        returns that count; ``OSError(ENOSPC)`` only when nothing fits.
        """
        self._check_writable()
        vol = self._volume
        with memoryview(data) as view:
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            with vol.lock:
                if self._append:
                    self._pos = self._inode.size
                n = _data.write(vol, self._inode, view, self._pos)
        self._pos += n
        return n

    def pwrite(self, data: Any, offset: int) -> int:
        """Like ``os.pwrite``: write at ``offset`` without moving the file position.

        As on Linux, a file opened for appending writes at EOF whatever the offset.
        """
        self._check_writable()
        if offset < 0:
            raise OSError(22, "Invalid argument")
        vol = self._volume
        with memoryview(data) as view:
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            with vol.lock:
                return _data.write(vol, self._inode, view, self._inode.size if self._append else offset)

    def writev(self, buffers: Iterable[Any]) -> int:
        """Like ``os.writev``: write each buffer in turn; total bytes written."""
        total = 0
        for buffer in buffers:
            n = self.write(buffer)
            total += n
            if n < memoryview(buffer).nbytes:
                break
        return total

    def truncate(self, size: int | None = None) -> int:
        """Resize the file to ``size`` (default: the current position); the position stays."""
        self._check_writable()
        if size is None:
            size = self._pos
        vol = self._volume
        with vol.lock:
            _data.truncate(vol, self._inode, size)
        return size

    def fallocate(self, offset: int, length: int, keep_size: bool = False) -> None:
        """Reserve blocks that read as zeros for ``[offset, offset+length)``, growing the file
        to cover it (``keep_size``, ext4 only: the size stays, as ``FALLOC_FL_KEEP_SIZE``)."""
        self._check_writable()
        vol = self._volume
        with vol.lock:
            _data.fallocate(vol, self._inode, offset, length, keep_size=keep_size)

    def fsync(self) -> None:
        """Make this file's data and the metadata durable (msync, or write-back and fsync)."""
        self._check_open()
        sync(self._volume)

    def _check_writable(self) -> None:
        self._check_open()
        if not self._writable:
            raise io.UnsupportedOperation("File not open for writing")

    @property
    def size(self) -> int:
        """The file's size in bytes."""
        return self._inode.size

    def _check_read_fd(self) -> None:
        """The ``os``-style reads fail as ``os.pread`` does on a descriptor not open for reading."""
        self._check_open()
        if not self._readable:
            raise OSError(errno.EBADF, "Bad file descriptor: not open for reading", self.name)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file.")

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"pos={self._pos}"
        return f"<xipfs.XipFile name={self.name!r} mode={self.mode!r} {state}>"
