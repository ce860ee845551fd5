"""The file device and its page cache: the classic path for storage that is not memory.

A disk file or a block device cannot be addressed by the CPU, so the filesystem reaches it the
way Linux did before XIP: through a page cache. :class:`FileDevice` only knows ``pread`` and
``pwrite``; :class:`PageCache` keeps a bounded set of pages in memory, serves views and copies
from them, and writes dirty pages back on eviction and on :meth:`PageCache.flush`. It is also
the baseline the XIP path is measured against.
"""

from __future__ import annotations

import os
import stat
import threading
from collections import OrderedDict

from .base import Device

#: Unit of the page cache. Large enough that a big read is a few dozen calls, a multiple of
#: every ext2 block size Linux mounts.
PAGE_SIZE = 64 * 1024
#: Default bound of the page cache.
DEFAULT_CACHE_BYTES = 64 * 1024 * 1024


class FileDevice(Device):
    """Storage reached with ``pread``/``pwrite`` only (no ``direct_access``)."""

    kind = "file"

    def __init__(self, path: str | os.PathLike[str], *, readonly: bool = False) -> None:
        self._fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        try:
            st = os.fstat(self._fd)
            size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self._fd, 0, os.SEEK_END)
            if stat.S_ISBLK(st.st_mode):
                self.kind = "block device"
        except BaseException:
            os.close(self._fd)
            raise
        super().__init__(size, readonly, os.fspath(path))

    def read_into(self, dst: memoryview, offset: int) -> None:
        self.check_range(offset, len(dst))
        done = 0
        while done < len(dst):
            n = os.preadv(self._fd, [dst[done:]], offset + done)
            if n <= 0:
                raise OSError(5, "short read from device", self.name)
            done += n

    def view(self, offset: int, length: int) -> memoryview:
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return memoryview(buf)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.readonly:
            raise OSError(30, "device is read-only", self.name)
        self.check_range(offset, len(data))
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, offset)
            view = view[n:]
            offset += n

    def flush(self) -> None:
        if not self.readonly:
            os.fsync(self._fd)

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PageCache(Device):
    """A bounded write-back cache of ``PAGE_SIZE`` pages in front of a :class:`FileDevice`.

    Views returned by :meth:`view` point into a cached page and must not be kept across calls
    that may evict it; the filesystem layer copies what it keeps.
    """

    is_xip = False

    def __init__(self, device: Device, capacity: int = DEFAULT_CACHE_BYTES) -> None:
        super().__init__(device.size, device.readonly, device.name)
        self.kind = device.kind
        self.device = device
        self.max_pages = max(4, capacity // PAGE_SIZE)
        #: Pages: a bytearray each, or slices of one readahead buffer (a remote device's).
        self._pages: OrderedDict[int, bytearray | memoryview] = OrderedDict()
        self._dirty: set[int] = set()
        self.hits = 0
        self.misses = 0
        self._lock = threading.RLock()          # readers of file data take no filesystem lock
        #: A device that reads ahead (remote) says how much to fetch on a miss.
        self._readahead = getattr(device, "readahead", None)
        #: Reads at least this large skip the cache there (a window of readahead: nothing to gain).
        self._direct_min = getattr(device, "readahead_max", 0) or (1 << 62)

    def _page(self, index: int) -> bytearray | memoryview:
        """The cached page ``index``, read from the device on a miss (LRU order)."""
        with self._lock:
            return self._page_locked(index)

    def _page_locked(self, index: int) -> bytearray | memoryview:
        pages = self._pages
        page = pages.get(index)
        if page is not None:
            pages.move_to_end(index)
            self.hits += 1
            return page
        self.misses += 1
        start = index * PAGE_SIZE
        if self._readahead is not None:
            return self._fill_ahead(index)
        page = bytearray(PAGE_SIZE)
        length = min(PAGE_SIZE, self.size - start)
        self.device.read_into(memoryview(page)[:length], start)
        pages[index] = page
        if len(pages) > self.max_pages:
            self._evict()
        return page

    def _fill_ahead(self, index: int) -> bytearray | memoryview:
        """A miss on a device that reads ahead (remote): fill the pages it asks for, up to the
        next cached one and a quarter of the cache, with one read into one buffer whose pages
        are slices (one allocation, the fewest system calls)."""
        start = index * PAGE_SIZE
        pages = self._pages
        want = self._readahead(start, min(PAGE_SIZE, self.size - start), index - 1 in pages)
        limit = max(1, min(-(-want // PAGE_SIZE), self.max_pages // 4))
        count = 1
        while count < limit and index + count not in pages:
            count += 1
        end = min(self.size, start + count * PAGE_SIZE)
        buf = memoryview(bytearray(count * PAGE_SIZE))
        self.device.read_into(buf[:end - start], start)
        for i in range(count):
            pages[index + i] = buf[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
        if len(pages) > self.max_pages:
            self._evict()
        return buf[:PAGE_SIZE]

    def _evict(self) -> None:
        """Drop least recently used pages. A dirty one first sends *every* dirty page back.

        Writing one dirty page alone would put on disk a state no sequence of whole steps
        ever had (one page from after a change, its partner from before). Writing them all
        puts a state the filesystem really was in between two stores, which its careful
        ordering makes repairable; only a kill during the write-back itself can tear it.
        """
        while len(self._pages) > self.max_pages:
            index, page = next(iter(self._pages.items()))
            if index in self._dirty:
                self._write_back_all()
            del self._pages[index]

    def _write_back_all(self) -> None:
        for index in sorted(self._dirty):
            self._write_back(index, self._pages[index])

    def _write_back(self, index: int, page: bytearray) -> None:
        start = index * PAGE_SIZE
        self.device.write(memoryview(page)[:min(PAGE_SIZE, self.size - start)], start)
        self._dirty.discard(index)

    def view(self, offset: int, length: int) -> memoryview:
        self.check_range(offset, length)
        index, within = divmod(offset, PAGE_SIZE)
        if within + length <= PAGE_SIZE:
            return memoryview(self._page(index))[within:within + length]
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return memoryview(buf)

    def read_into(self, dst: memoryview, offset: int) -> None:
        n = len(dst)
        self.check_range(offset, n)
        if n >= self._direct_min and self.readonly and self._readahead is not None:
            self._read_direct(dst, offset)
            return
        done = 0
        while done < n:
            index, within = divmod(offset + done, PAGE_SIZE)
            chunk = min(n - done, PAGE_SIZE - within)
            dst[done:done + chunk] = memoryview(self._page(index))[within:within + chunk]
            done += chunk

    def _read_direct(self, dst: memoryview, offset: int) -> None:
        """A read as large as a readahead window, on a read-only device that reads ahead
        (remote): the bytes of pages not cached go from the device straight into ``dst`` (one
        copy, one request per run, nothing cached or evicted); cached pages come from the cache."""
        n = len(dst)
        pages = self._pages
        done = 0
        while done < n:
            index, within = divmod(offset + done, PAGE_SIZE)
            chunk = min(n - done, PAGE_SIZE - within)
            page = pages.get(index)
            if page is not None:
                dst[done:done + chunk] = memoryview(page)[within:within + chunk]
                done += chunk
                continue
            end = done + chunk
            while end < n and (offset + end) // PAGE_SIZE not in pages:
                end = min(n, end + PAGE_SIZE)
            self.device.read_into(dst[done:end], offset + done)
            done = end

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.readonly:
            raise OSError(30, "device is read-only", self.name)
        src = memoryview(data).cast("B")
        n = len(src)
        self.check_range(offset, n)
        done = 0
        with self._lock:
            while done < n:
                index, within = divmod(offset + done, PAGE_SIZE)
                chunk = min(n - done, PAGE_SIZE - within)
                memoryview(self._page_locked(index))[within:within + chunk] = src[done:done + chunk]
                self._dirty.add(index)
                done += chunk

    def flush(self) -> None:
        """Write every dirty page back, then fsync the device."""
        with self._lock:
            self._write_back_all()
        self.device.flush()

    def fileno(self) -> int:
        return self.device.fileno()

    def close(self) -> None:
        if not self.readonly:
            self.flush()
        self._pages.clear()
        self.device.close()
