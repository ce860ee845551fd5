"""asyncio file objects (the seed's ``aio_read``/``aio_write``).

``fs.open_async(path, mode)`` works both ways aiofiles does::

    f = await fs.open_async("/a")                 # close it with: await f.close()
    async with fs.open_async("/a", "r+b") as f:   # closed at the end of the block
        data = await f.read()

Every method of :class:`AsyncXipFile` is a coroutine wrapping the same call of the synchronous
:class:`~xipfs.xip.file.XipFile` (``fs.open(path, mode, buffering=0)``), so results and errors are
the synchronous API's. Where it runs depends on the storage:

* memory device (``fs.is_xip``): an operation is a copy between memory and memory that never
  waits for I/O, so it runs inline in the coroutine. A thread would cost more than the copy.
* file device: ``pread``/``pwrite`` and page-cache misses may wait for the disk, so each call
  runs in the default executor (``asyncio.to_thread``) and the event loop keeps running.
  Calls on one file are serialised by a lock taken in the worker thread, so even a cancelled
  await cannot let two calls move the file position at once.

Binary modes only: a text mode raises ``ValueError`` (use ``"rb"``, ``"r+b"``, ``"wb"``...).
Lines can still be iterated in binary mode (``async for line in f``), ending at ``b"\\n"``.
"""

from __future__ import annotations

import asyncio
import functools
import io
import os
import threading
from collections.abc import Callable, Generator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from ..fs import Filesystem
    from .file import XipFile

T = TypeVar("T")

#: Bytes looked at per step when searching for the end of a line.
LINE_CHUNK = 8192


def open_async(fs: Filesystem, path: Any, mode: str = "rb") -> AsyncOpen:
    """The awaitable / async context manager behind ``Filesystem.open_async``.

    ``ValueError`` at once for a text mode; the file itself is opened when awaited or entered
    (on the file device in a thread, since resolving the path may read the disk).
    """
    if "b" not in mode:
        raise ValueError(f"open_async supports binary modes only (got {mode!r}; add 'b')")
    return AsyncOpen(fs, path, mode)


class AsyncOpen:
    """``await`` it for an :class:`AsyncXipFile`, or use it in ``async with`` (closes on exit)."""

    def __init__(self, fs: Filesystem, path: Any, mode: str) -> None:
        self._fs = fs
        self._path = path
        self._mode = mode
        self._file: AsyncXipFile | None = None

    async def _open(self) -> AsyncXipFile:
        fs = self._fs
        inline = fs.is_xip
        call = functools.partial(fs.open, self._path, self._mode, buffering=0)
        raw = call() if inline else await asyncio.to_thread(call)
        return AsyncXipFile(raw, inline)

    def __await__(self) -> Generator[Any, None, AsyncXipFile]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncXipFile:
        self._file = await self._open()
        return self._file

    async def __aexit__(self, *exc: object) -> None:
        if self._file is not None:
            await self._file.close()


class AsyncXipFile:
    """An open file of an image whose operations are coroutines (see the module docstring)."""

    def __init__(self, raw: XipFile, inline: bool) -> None:
        #: The synchronous file object every call goes to.
        self.raw = raw
        self._inline = inline
        self._lock = threading.Lock()

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` inline on a memory device, in a worker thread on the file device."""
        if self._inline:
            return fn(*args)
        return await asyncio.to_thread(self._locked, fn, *args)

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            return fn(*args)

    # -- reading -------------------------------------------------------------------------------
    async def read(self, size: int | None = -1) -> bytes:
        """Up to ``size`` bytes from the position (all that is left when negative or None)."""
        return await self._call(self.raw.read, size)

    async def readall(self) -> bytes:
        return await self._call(self.raw.read, -1)

    async def readinto(self, buffer: Any) -> int:
        """Fill ``buffer`` from the position; bytes read (0 at EOF)."""
        return await self._call(self.raw.readinto, buffer)

    async def pread(self, size: int, offset: int) -> bytes:
        """``size`` bytes at ``offset``; the position stays."""
        return await self._call(self.raw.pread, size, offset)

    async def readline(self, size: int = -1) -> bytes:
        """One line, ``b"\\n"`` included (at most ``size`` bytes when >= 0); ``b""`` at EOF."""
        return await self._call(self._readline, size)

    def _readline(self, limit: int) -> bytes:
        """Search forward from the position with ``pread`` and move the position past the line."""
        raw = self.raw
        if not raw.readable():
            raise io.UnsupportedOperation("File not open for reading")
        pos = raw.tell()
        parts: list[bytes] = []
        got = 0
        while limit < 0 or got < limit:
            want = LINE_CHUNK if limit < 0 else min(LINE_CHUNK, limit - got)
            data = raw.pread(want, pos + got)
            if not data:
                break
            nl = data.find(b"\n")
            if nl >= 0:
                data = data[:nl + 1]
            parts.append(data)
            got += len(data)
            if nl >= 0:
                break
        raw.seek(pos + got)
        return b"".join(parts)

    async def readlines(self) -> list[bytes]:
        return [line async for line in self]

    def __aiter__(self) -> AsyncXipFile:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line

    # -- writing -------------------------------------------------------------------------------
    async def write(self, data: Any) -> int:
        """Write ``data`` at the position (at EOF when appending); bytes written."""
        return await self._call(self.raw.write, data)

    async def pwrite(self, data: Any, offset: int) -> int:
        """Write ``data`` at ``offset``; the position stays."""
        return await self._call(self.raw.pwrite, data, offset)

    async def truncate(self, size: int | None = None) -> int:
        """Resize to ``size`` (default: the position); the new size."""
        return await self._call(self.raw.truncate, size)

    async def flush(self) -> None:
        await self._call(self.raw.flush)

    async def fsync(self) -> None:
        """Make the data and metadata durable (msync, or write-back and fsync)."""
        await self._call(self.raw.fsync)

    # -- position and lifetime -----------------------------------------------------------------
    async def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return await self._call(self.raw.seek, offset, whence)

    async def tell(self) -> int:
        return await self._call(self.raw.tell)

    async def close(self) -> None:
        await self._call(self.raw.close)

    @property
    def closed(self) -> bool:
        return self.raw.closed

    @property
    def name(self) -> str:
        return self.raw.name

    @property
    def mode(self) -> str:
        return self.raw.mode

    async def __aenter__(self) -> AsyncXipFile:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        how = "inline" if self._inline else "threads"
        return f"<xipfs.AsyncXipFile {self.raw!r} {how}>"
