"""The block-device contract that the ext2 layer builds on.

A device is a flat run of bytes. The filesystem asks it for two things: a *view* of some bytes
(for metadata: superblock, descriptors, bitmaps, inode tables, directory and indirect blocks) and
a *copy* of some bytes into a caller's buffer (for file data). On a memory device both come
straight from the mapped storage; on a file device they go through a page cache.
"""

from __future__ import annotations

from ..errors import CorruptImageError

SECTOR_SIZE = 512


class Device:
    """Base class: size, read-only flag, and the two access paths (view and copy)."""

    #: True when views point into the storage itself (the seed's ``direct_access``).
    is_xip: bool = False
    #: What the storage is, for humans: "tmpfs", "hugetlbfs", "dax", "shm", "anonymous", "file"...
    kind: str = "?"

    def __init__(self, size: int, readonly: bool, name: str) -> None:
        self.size = size
        self.readonly = readonly
        self.name = name

    # -- the contract ---------------------------------------------------------------------
    def view(self, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset+length)`` as a memoryview (storage itself on a memory device)."""
        raise NotImplementedError

    def read_into(self, dst: memoryview, offset: int) -> None:
        """Copy ``len(dst)`` bytes from ``offset`` into ``dst``: exactly one copy."""
        raise NotImplementedError

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Store ``data`` at ``offset``."""
        raise NotImplementedError

    def flush(self) -> None:
        """Make everything written so far durable as far as the storage allows."""

    def fileno(self) -> int:
        """The descriptor of the backing file, or -1 when there is none (anonymous memory)."""
        return -1

    def close(self) -> None:
        """Release the storage. Views still held by callers stay valid until they are dropped."""

    # -- helpers ------------------------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        """Refuse any access outside the device: this is the last guard against a hostile image."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImageError(
                "access outside the device",
                f"bytes {offset}..{offset + length} of a {self.size}-byte device",
            )

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ro = "ro" if self.readonly else "rw"
        return f"<{type(self).__name__} {self.name!r} {self.kind} {self.size} bytes {ro}>"
