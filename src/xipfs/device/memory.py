"""The memory device: CPU-addressable storage mapped once, read and written in place.

This is the seed's ``direct_access`` step. The whole image is one shared mapping; a block is a
memoryview slice of it, with no copy. A device opened read-only is mapped ``PROT_READ``, so a
stray write raises ``TypeError`` in Python instead of reaching the storage.
"""

from __future__ import annotations

import contextlib
import mmap
import os

from ..errors import CorruptImageError
from .base import SECTOR_SIZE, Device

try:  # the module behind multiprocessing.shared_memory; absent on some platforms
    import _posixshmem
except ImportError:  # pragma: no cover - Linux always has it
    _posixshmem = None


#: Fills at least this large go through pwrite on tmpfs (see MemoryDevice.write_new): from
#: one page up, a pwrite (about 2.5 us here) beats the fault of a first store (about 3.6 us).
PWRITE_MIN = 4096


class MemoryDevice(Device):
    """A shared mapping of memory-backed storage (tmpfs, hugetlbfs, DAX, POSIX shm, anonymous)."""

    is_xip = True

    def __init__(
        self,
        mapping: mmap.mmap,
        *,
        fd: int = -1,
        name: str = "<memory>",
        kind: str = "memory",
        readonly: bool = False,
    ) -> None:
        super().__init__(len(mapping), readonly, name)
        self.kind = kind
        self._mmap = mapping
        self._fd = fd
        #: The whole storage as one memoryview; every view handed out is a slice of it.
        self.buffer = memoryview(mapping)
        self._pwrite_ok = fd >= 0 and kind in ("tmpfs", "shm", "ramfs")

    # -- constructors ---------------------------------------------------------------------
    @classmethod
    def from_fd(cls, fd: int, *, size: int | None = None, readonly: bool = False,
                name: str = "<fd>", kind: str = "memory") -> MemoryDevice:
        """Map ``size`` bytes (default: the file's size) of an open descriptor; takes ownership of ``fd``."""
        try:
            if size is None:
                size = os.fstat(fd).st_size or os.lseek(fd, 0, os.SEEK_END)
            if size <= 0:
                raise CorruptImageError("image too small to hold a superblock", f"{name}: 0 bytes")
            prot = mmap.PROT_READ if readonly else mmap.PROT_READ | mmap.PROT_WRITE
            mapping = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=prot)
        except BaseException:
            os.close(fd)
            raise
        return cls(mapping, fd=fd, name=name, kind=kind, readonly=readonly)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], *, readonly: bool = False,
                  kind: str = "memory", size: int | None = None) -> MemoryDevice:
        """Map a file (on tmpfs, hugetlbfs or a DAX mount) or a DAX character device."""
        fd = os.open(path, os.O_RDONLY if readonly else os.O_RDWR)
        return cls.from_fd(fd, size=size, readonly=readonly, name=os.fspath(path), kind=kind)

    @classmethod
    def from_shm(cls, name: str, *, readonly: bool = False, create_size: int | None = None) -> MemoryDevice:
        """Attach a POSIX shared-memory object by name (``"img"`` or ``"/img"``).

        With ``create_size`` the object is created (or resized) to that many bytes first.
        """
        shm_name = "/" + name.lstrip("/")
        flags = os.O_RDONLY if readonly else os.O_RDWR
        if create_size is not None:
            flags = os.O_RDWR | os.O_CREAT
        if _posixshmem is not None:
            fd = _posixshmem.shm_open(shm_name, flags, 0o600)
        else:  # pragma: no cover
            fd = os.open("/dev/shm" + shm_name, flags, 0o600)
        if create_size is not None:
            try:
                os.ftruncate(fd, create_size)
            except BaseException:
                os.close(fd)
                raise
        return cls.from_fd(fd, readonly=readonly, name=shm_name, kind="shm")

    @classmethod
    def anonymous(cls, size: int) -> MemoryDevice:
        """Private anonymous memory of ``size`` bytes (zeroed), shared only with forked children."""
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_SHARED | mmap.MAP_ANONYMOUS)
        return cls(mapping, name="<anonymous>", kind="anonymous")

    # -- the contract ---------------------------------------------------------------------
    def direct_access(self, sector: int, count: int | None = None) -> memoryview:
        """The seed's ``direct_access``: sectors (512 bytes) ``[sector, sector+count)`` in place.

        With ``count=None`` the view runs to the end of the device, which is what the kernel
        operation reports as "contiguously accessible". Valid until the device is closed and
        the view released.
        """
        offset = sector * SECTOR_SIZE
        length = self.size - offset if count is None else count * SECTOR_SIZE
        self.check_range(offset, length)
        return self.buffer[offset:offset + length]

    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_range(offset, length)
        return self.buffer[offset:offset + length]

    def peek(self, offset: int, length: int) -> bytes:
        """A few bytes straight from the mapping, as ``bytes`` (the cheapest look at storage
        another process may be changing; ``offset`` is trusted)."""
        return self._mmap[offset:offset + length]

    def read_into(self, dst: memoryview, offset: int) -> None:
        n = len(dst)
        if offset < 0 or offset + n > self.size:
            self.check_range(offset, n)
        dst[:] = self.buffer[offset:offset + n]

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.readonly:
            raise OSError(30, "device is read-only", self.name)
        n = len(data)
        if offset < 0 or offset + n > self.size:
            self.check_range(offset, n)
        self.buffer[offset:offset + n] = data

    def write_new(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Fill freshly allocated blocks. On tmpfs, large fills go through ``pwrite``.

        Storing through the mapping into pages never touched costs one page fault per page,
        while tmpfs's own write path allocates them without one: ``pwrite`` into the image
        file reaches the same shared pages (one copy, coherent with every mapping) about 1.4x
        faster for one page and 1.7x for large fills. Overwrites keep using the mapping.
        """
        n = len(data)
        if n < PWRITE_MIN or not self._pwrite_ok:
            self.write(data, offset)
            return
        if self.readonly:
            raise OSError(30, "device is read-only", self.name)
        if offset < 0 or offset + n > self.size:
            self.check_range(offset, n)
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    def flush(self) -> None:
        if not self.readonly and self._fd >= 0:
            self._mmap.flush()

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        if self._mmap is None:
            return
        self.buffer.release()
        # If callers still hold views into the storage, close() refuses; the mapping then
        # stays until they are released (the mmap object unmaps itself when the last view
        # goes), so no view can ever point at unmapped memory.
        with contextlib.suppress(BufferError):
            self._mmap.close()
        self._mmap = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
