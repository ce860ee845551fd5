"""A read-only device that shows some blocks changed in memory over another device.

A journal that needs recovery is replayed into such an overlay (``extfs/journal.py``): the
image stays byte for byte as it is, so several readers can share it, and each sees the
recovered filesystem. Blocks outside the overlay are the parent's own views (in place on a
memory device); a range that touches a replayed block is assembled in a private buffer.
"""

from __future__ import annotations

import errno
from bisect import bisect_left
from collections.abc import Mapping

from .base import Device


class OverlayDevice(Device):
    """``parent`` with the blocks of ``blocks`` (block number -> ``block_size`` bytes) replaced."""

    def __init__(self, parent: Device, blocks: Mapping[int, bytes], block_size: int) -> None:
        super().__init__(parent.size, True, f"{parent.name} (journal replayed in memory)")
        self.parent = parent
        self.block_size = block_size
        self.blocks = dict(blocks)
        self._sorted = sorted(self.blocks)
        self.kind = parent.kind
        self.is_xip = parent.is_xip

    def _touched(self, offset: int, length: int) -> list[int]:
        bs = self.block_size
        first, last = offset // bs, (offset + length - 1) // bs
        i = bisect_left(self._sorted, first)
        out = []
        while i < len(self._sorted) and self._sorted[i] <= last:
            out.append(self._sorted[i])
            i += 1
        return out

    def view(self, offset: int, length: int) -> memoryview:
        if length <= 0:
            return self.parent.view(offset, length)
        touched = self._touched(offset, length)
        if not touched:
            return self.parent.view(offset, length)
        buf = bytearray(self.parent.view(offset, length))
        self._patch(buf, offset, touched)
        return memoryview(bytes(buf))

    def peek(self, offset: int, length: int) -> bytes:
        """A copy of the bytes (what a reader watching for writers elsewhere compares)."""
        return bytes(self.view(offset, length))

    def read_into(self, dst: memoryview, offset: int) -> None:
        self.parent.read_into(dst, offset)
        touched = self._touched(offset, len(dst)) if len(dst) else []
        if touched:
            self._patch(dst, offset, touched)

    def _patch(self, buf: bytearray | memoryview, offset: int, touched: list[int]) -> None:
        bs = self.block_size
        end = offset + len(buf)
        for blk in touched:
            a, b = max(blk * bs, offset), min((blk + 1) * bs, end)
            buf[a - offset:b - offset] = self.blocks[blk][a - blk * bs:b - blk * bs]

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise OSError(errno.EROFS, "an image whose journal was replayed in memory is read-only")

    write_new = write

    def fileno(self) -> int:
        return -1            # a descriptor would show the blocks as they are, not as replayed

    def lock(self, exclusive: bool) -> None:
        self.parent.lock(exclusive)

    def unlock(self) -> None:
        self.parent.unlock()

    def writer_elsewhere(self) -> bool:
        return self.parent.writer_elsewhere()

    def close(self) -> None:
        self.parent.close()
