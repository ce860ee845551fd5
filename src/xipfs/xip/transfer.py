"""sendfile: file data from the image to a socket (the seed's ``xip_file_sendfile``).

On a memory device the image file *is* the storage, so every run of a file's blocks goes to the
socket with ``os.sendfile`` from the image's descriptor: the kernel copies from the very pages
that hold the data into the socket, and nothing passes through Python memory. Holes are sent
from one small shared buffer of zeros.

On the file device that would be wrong: the library's page cache may hold dirty pages that are
not yet written back, so the image file is stale. There the bytes are read through the page
cache (``Volume.read_into``) into one reused, bounded buffer and sent from it.

The socket side follows ``socket.socket.sendfile``: sockets with a timeout wait for
writability with that timeout (``TimeoutError``), non-blocking sockets (timeout 0) are refused
with ``ValueError``, partial sends are resumed.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import sys
from typing import TYPE_CHECKING, Any

from ..extfs.data import read_into, windowed_segments

if TYPE_CHECKING:
    from ..extfs.inode import Inode
    from ..extfs.volume import Volume

#: Most bytes asked of one ``os.sendfile`` call (CPython caps at 1 GiB too, bpo-38319).
SENDFILE_MAX = 1 << 30
#: Bytes of file runs resolved at once, under the volume lock.
WINDOW = 64 << 20
#: Size of the buffer the file-device path reads into and sends from.
COPY_CHUNK = 1 << 20
#: Errors of ``os.sendfile`` that mean "this descriptor cannot be spliced from" (a DAX
#: character device, hugetlbfs...): send views of the mapping instead.
_NO_SENDFILE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})

_ZEROS = memoryview(bytes(64 * 1024))


def send_file(vol: Volume, node: Inode, sock: Any, offset: int = 0, count: int | None = None) -> int:
    """Send ``count`` bytes (to EOF if None) of ``node`` from byte ``offset`` to ``sock``; bytes sent.

    Never sends past EOF: an ``offset`` at or past it sends nothing and returns 0, ``count=0``
    returns 0. ``ValueError`` for a negative ``offset``/``count`` or a non-blocking socket
    (timeout 0, as ``socket.sendfile``), ``TypeError`` for something that is not a socket.
    A socket with a timeout raises ``TimeoutError`` when it stays unwritable that long; a
    blocking socket waits. Errors of the socket (``BrokenPipeError``...) propagate, possibly
    after part of the data went out.

    Concurrency: the runs of blocks are resolved under ``vol.lock`` (a window at a time) and
    clipped to the size the file has then; the bytes themselves are sent without the lock, as
    reads are everywhere in xipfs, so a writer changing the same bytes meanwhile may be seen.
    """
    _check_args(offset, count)
    sink = _Sink(sock)
    try:
        with vol.lock:
            size = node.size
        end = size if count is None else min(size, offset + count)
        if offset >= end:
            return 0
        dev = vol.device
        if dev.is_xip:
            return _send_xip(vol, node, sink, offset, end)
        return _send_copy(vol, node, sink, offset, end)
    finally:
        sink.close()


def _check_args(offset: Any, count: Any) -> None:
    """Integers, not negative (``socket.sendfile`` would also refuse 0; ``os.sendfile`` sends 0)."""
    if not isinstance(offset, int):
        raise TypeError(f"offset must be an integer, not {type(offset).__name__}")
    if count is not None and not isinstance(count, int):
        raise TypeError(f"count must be an integer or None, not {type(count).__name__}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0 (got {offset})")
    if count is not None and count < 0:
        raise ValueError(f"count must be >= 0 (got {count})")


# -- the memory device: straight from the storage ---------------------------------------------
def _send_xip(vol: Volume, node: Inode, sink: _Sink, pos: int, end: int) -> int:
    """Send ``[pos, end)`` run by run: ``os.sendfile`` from the image, or views of the mapping."""
    dev = vol.device
    fd = -1 if sink.tls else dev.fileno()
    sent = 0
    for _, length, where in windowed_segments(vol, node, pos, end, WINDOW):
        if where < 0:
            sink.send_zeros(length)
        elif fd >= 0:
            try:
                sink.send_from_fd(fd, where + dev.base_offset, length)
            except _CannotSplice:
                fd = -1                      # nothing of this run went out: send it as a view
                sink.send_view(dev.view(where, length))
        else:
            sink.send_view(dev.view(where, length))
        sent += length
    return sent


# -- the file device: through the page cache --------------------------------------------------
def _send_copy(vol: Volume, node: Inode, sink: _Sink, pos: int, end: int) -> int:
    """Send ``[pos, end)`` through ``read_into`` (dirty cached pages included), a chunk at a time."""
    buf = memoryview(bytearray(min(COPY_CHUNK, end - pos)))
    start = pos
    while pos < end:
        piece = buf[:min(len(buf), end - pos)]
        with vol.lock:                       # one chunk is one consistent state of the file
            n = read_into(vol, node, piece, pos)
        if n <= 0:
            break                            # the file shrank below pos meanwhile
        sink.send_view(piece[:n])
        pos += n
    return pos - start


# -- the socket side ----------------------------------------------------------------------------
class _CannotSplice(Exception):
    """``os.sendfile`` refused the source descriptor before sending anything."""


class _Sink:
    """A stream socket with ``socket.sendfile``'s rules: timeouts, partial sends, no non-blocking."""

    def __init__(self, sock: Any) -> None:
        fileno = getattr(sock, "fileno", None)
        if fileno is None or not callable(getattr(sock, "send", None)):
            raise TypeError(f"sendfile needs a socket (fileno() and send()), not {type(sock).__name__}")
        self.fd = fileno()
        if not isinstance(self.fd, int) or self.fd < 0:
            raise OSError(errno.EBADF, "socket is closed")
        kind = getattr(sock, "type", socket.SOCK_STREAM)
        if not kind & socket.SOCK_STREAM:
            raise ValueError("only SOCK_STREAM type sockets are supported")
        gettimeout = getattr(sock, "gettimeout", None)
        self.timeout: float | None = gettimeout() if gettimeout is not None else None
        if self.timeout == 0:
            raise ValueError("non-blocking sockets are not supported")
        self.sock = sock
        ssl = sys.modules.get("ssl")
        #: TLS must go through ``send`` (os.sendfile would bypass the encryption).
        self.tls = ssl is not None and isinstance(sock, ssl.SSLSocket)
        self._selector: selectors.BaseSelector | None = None

    def _wait(self, timeout: float | None) -> None:
        """Until the socket is writable; ``TimeoutError`` after ``timeout`` seconds (None: forever)."""
        if self._selector is None:
            self._selector = selectors.PollSelector() if hasattr(selectors, "PollSelector") \
                else selectors.SelectSelector()
            self._selector.register(self.fd, selectors.EVENT_WRITE)
        if not self._selector.select(timeout) and timeout is not None:
            raise TimeoutError("timed out")

    def send_from_fd(self, fd: int, offset: int, n: int) -> None:
        """All ``n`` bytes of ``fd`` from ``offset`` with ``os.sendfile``, resuming partial sends."""
        sent_any = False
        while n > 0:
            if self.timeout:
                self._wait(self.timeout)
            try:
                sent = os.sendfile(self.fd, fd, offset, min(n, SENDFILE_MAX))
            except BlockingIOError:
                if not self.timeout:
                    self._wait(None)         # fd made non-blocking behind the socket's back
                continue
            except OSError as err:
                if not sent_any and err.errno in _NO_SENDFILE:
                    raise _CannotSplice from err
                raise
            if sent == 0:
                raise OSError(errno.EIO, "image ended before the file's data", str(fd))
            sent_any = True
            offset += sent
            n -= sent

    def send_view(self, view: memoryview) -> None:
        """All of ``view`` with ``sock.send`` (which applies the socket's timeout), resuming partial sends."""
        send = self.sock.send
        while len(view):
            try:
                sent = send(view[:SENDFILE_MAX])
            except BlockingIOError:
                self._wait(None)
                continue
            view = view[sent:]

    def send_zeros(self, n: int) -> None:
        """``n`` zero bytes (a hole) from the shared zero buffer."""
        step = len(_ZEROS)
        while n > 0:
            k = min(n, step)
            self.send_view(_ZEROS[:k])
            n -= k

    def close(self) -> None:
        if self._selector is not None:
            self._selector.close()
            self._selector = None
