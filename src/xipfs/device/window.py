"""A window onto another device: bytes ``[offset, offset+size)`` as a device of their own.

This is how a partition of a whole-disk image (``xipfs.open(image, partition=N)``) or a
filesystem at an offset is opened. Over a :class:`~xipfs.device.memory.MemoryDevice` the window
stays execute-in-place: ``buffer``, :meth:`WindowDevice.view` and
:meth:`WindowDevice.direct_access` are slices of the parent's one mapping, never copies.

The descriptor is the one thing that cannot be shifted: ``pread``, ``sendfile``,
``copy_file_range`` and ``mmap`` of the parent's file address it from the file's first byte, not
the window's. ``base_offset`` says where the window starts in that file, and every caller that
passes device offsets to ``fileno()`` adds it (``Device.base_offset`` is 0 elsewhere), so a
partition of a disk in memory is mapped, sent and copied in place like a whole image.
"""

from __future__ import annotations

import contextlib
import errno

from .base import SECTOR_SIZE, Device

__all__ = ["WindowDevice"]

#: Pin keys (inode numbers) are below 2**32; a window's pins go to its own range of keys so
#: that inode 12 of one partition is not inode 12 of another.
_PIN_KEY_BITS = 32
_PIN_SPACES = (1 << 30) - 1


class WindowDevice(Device):
    """Bytes ``[offset, offset+size)`` of ``parent`` as a device (a partition, an embedded image)."""

    #: Whether ``fileno()`` hands out the parent's descriptor even when the window does not start
    #: at byte 0 of its file (the callers then add ``base_offset`` themselves).
    shares_fileno: bool = True

    def __init__(self, parent: Device, offset: int, size: int | None = None, *,
                 readonly: bool | None = None, name: str | None = None,
                 close_parent: bool = False) -> None:
        if size is None:
            size = parent.size - offset
        if offset < 0 or size < 0 or offset + size > parent.size:
            raise ValueError(f"window {offset}..{offset + size} does not fit in the "
                             f"{parent.size}-byte device {parent.name!r}")
        if readonly is None:
            readonly = parent.readonly
        elif not readonly and parent.readonly:
            raise ValueError(f"a writable window needs a writable device; {parent.name!r} is read-only")
        nested = isinstance(parent, WindowDevice)
        super().__init__(size, readonly, name or f"{parent.name}[{offset}:{offset + size}]")
        #: The device the bytes live on.
        self.parent = parent
        #: Where the window starts in ``parent``.
        self.offset = offset
        #: Where the window starts in the file of ``raw_fileno()``.
        self.base_offset = (parent.base_offset if nested else 0) + offset
        #: The device under every window (locks, pins and the descriptor are its own).
        self.root: Device = parent.root if nested else parent
        self.kind = parent.kind
        self.is_xip = parent.is_xip
        self._close_parent = close_parent
        parent_buffer = getattr(parent, "buffer", None)
        #: Over a memory device: the window's bytes as one slice of the parent's mapping.
        self.buffer: memoryview | None = (
            parent_buffer[offset:offset + size] if isinstance(parent_buffer, memoryview) else None)

    # -- the contract ---------------------------------------------------------------------
    def view(self, offset: int, length: int) -> memoryview:
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_range(offset, length)
        if self.buffer is not None:
            return self.buffer[offset:offset + length]
        return self.parent.view(self.offset + offset, length)

    def direct_access(self, sector: int, count: int | None = None) -> memoryview:
        """Sectors (512 bytes) of the window in place, as ``MemoryDevice.direct_access``."""
        if self.buffer is None:
            raise OSError(errno.EOPNOTSUPP, "no direct access: the window is not over memory", self.name)
        offset = sector * SECTOR_SIZE
        length = self.size - offset if count is None else count * SECTOR_SIZE
        self.check_range(offset, length)
        return self.buffer[offset:offset + length]

    def peek(self, offset: int, length: int) -> bytes:
        """A few bytes straight from the storage as ``bytes`` (``offset`` is trusted)."""
        peek = getattr(self.parent, "peek", None)
        if peek is not None:
            return peek(self.offset + offset, length)
        return bytes(self.view(offset, length))

    def read_into(self, dst: memoryview, offset: int) -> None:
        n = len(dst)
        if offset < 0 or offset + n > self.size:
            self.check_range(offset, n)
        if self.buffer is not None:
            dst[:] = self.buffer[offset:offset + n]
        else:
            self.parent.read_into(dst, self.offset + offset)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "device is read-only", self.name)
        n = len(data)
        if offset < 0 or offset + n > self.size:
            self.check_range(offset, n)
        self.parent.write(data, self.offset + offset)

    def write_new(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        if self.readonly:
            raise OSError(errno.EROFS, "device is read-only", self.name)
        n = len(data)
        if offset < 0 or offset + n > self.size:
            self.check_range(offset, n)
        self.parent.write_new(data, self.offset + offset)

    def flush(self) -> None:
        self.parent.flush()

    def raw_fileno(self) -> int:
        """The descriptor of the file the window lies in (``base_offset`` bytes in), or -1."""
        return self.root.fileno()

    def fileno(self) -> int:
        """The file's descriptor when offsets in it are the window's (or callers add
        ``base_offset``: :attr:`shares_fileno`); else -1, which sends them to the views."""
        if self.base_offset == 0 or self.shares_fileno:
            return self.raw_fileno()
        return -1

    def close(self) -> None:
        if self.buffer is not None:
            with contextlib.suppress(BufferError):   # exported elsewhere: it goes with its last user
                self.buffer.release()
            self.buffer = None
        if self._close_parent:
            self._close_parent = False
            self.parent.close()

    # -- locks and pins: the root device's, whatever fileno() says ---------------------------------
    def lock(self, exclusive: bool) -> None:
        self.root.lock(exclusive)

    def unlock(self) -> None:
        self.root.unlock()

    def writer_elsewhere(self) -> bool:
        return self.root.writer_elsewhere()

    def _pin_key(self, key: int) -> int:
        if not self.base_offset:
            return key
        space = (self.base_offset // SECTOR_SIZE) % _PIN_SPACES + 1
        return (space << _PIN_KEY_BITS) | key

    def pin(self, key: int) -> bool:
        return self.root.pin(self._pin_key(key))

    def unpin(self, key: int) -> None:
        self.root.unpin(self._pin_key(key))

    def pinned_elsewhere(self, key: int) -> bool:
        return self.root.pinned_elsewhere(self._pin_key(key))
