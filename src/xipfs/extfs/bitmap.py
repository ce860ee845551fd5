"""Bit searches and updates on ext2 bitmaps (LSB first), at C speed where Python allows.

A search for the first byte that is not all ones (or not all zeros) is ``bytes.lstrip`` over
the rest of the bitmap: a C loop at well under a nanosecond a byte, so finding a free block
among 32,768 costs well under a microsecond, not a Python loop per bit.
"""

from __future__ import annotations


def _skip(bitmap: memoryview | bytes, start: int, end: int, fill: bytes) -> int:
    """Index of the first byte in ``[start, end)`` that is not ``fill``, or -1.

    Looks at a small window first (the answer is usually near), then at the rest.
    """
    for lo, hi in ((start, min(end, start + 64)), (start + 64, end)):
        if lo >= hi:
            break
        seg = bytes(bitmap[lo:hi])
        rest = len(seg.lstrip(fill))
        if rest:
            return lo + len(seg) - rest
    return -1


def test_bit(bitmap: memoryview | bytes, bit: int) -> bool:
    return bool(bitmap[bit >> 3] & (1 << (bit & 7)))


def find_zero(bitmap: memoryview | bytes, start: int, end: int) -> int:
    """First clear bit in ``[start, end)``, or -1."""
    if start >= end:
        return -1
    byte = start >> 3
    bits = bitmap[byte] | ((1 << (start & 7)) - 1)      # treat bits before start as set
    if bits != 0xFF:
        bit = (byte << 3) + _lowest_zero(bits)
        return bit if bit < end else -1
    byte = _skip(bitmap, byte + 1, (end + 7) >> 3, b"\xff")
    if byte < 0:
        return -1
    bit = (byte << 3) + _lowest_zero(bitmap[byte])
    return bit if bit < end else -1


def zero_run(bitmap: memoryview | bytes, start: int, end: int) -> int:
    """Length of the run of clear bits starting at ``start`` (which must be clear), up to ``end``."""
    byte = start >> 3
    bits = bitmap[byte] >> (start & 7)
    if bits:
        return min(_lowest_one(bits), end - start)
    pos = (byte + 1) << 3
    if pos >= end:
        return end - start
    byte = _skip(bitmap, byte + 1, (end + 7) >> 3, b"\x00")
    if byte < 0:
        return end - start
    stop = (byte << 3) + _lowest_one(bitmap[byte])
    return min(stop, end) - start


def set_range(bitmap: memoryview | bytearray, start: int, count: int, value: bool) -> tuple[int, bytes]:
    """Set or clear ``count`` bits from ``start``; returns ``(first byte, new bytes)`` to store.

    ``bitmap`` is only read: the caller writes the returned bytes back through its device, so
    the page cache sees the change. Done on one integer, so a long run costs no Python loop.
    """
    first, last = start >> 3, (start + count - 1) >> 3
    word = int.from_bytes(bitmap[first:last + 1], "little")
    mask = ((1 << count) - 1) << (start & 7)
    word = word | mask if value else word & ~mask
    return first, word.to_bytes(last - first + 1, "little")


def _lowest_zero(byte: int) -> int:
    return ((~byte) & (byte + 1)).bit_length() - 1


def _lowest_one(byte: int) -> int:
    return (byte & -byte).bit_length() - 1


def find_zero_high(bitmap: memoryview | bytes, end: int) -> int:
    """Highest clear bit below ``end``, or -1 (the search runs from the top down)."""
    nbytes = (end + 7) >> 3
    data = bytearray(bitmap[:nbytes])
    if end & 7:
        data[-1] |= 0xFF << (end & 7) & 0xFF         # bits at and past ``end`` count as set
    top = len(data.rstrip(b"\xff")) - 1
    if top < 0:
        return -1
    return (top << 3) + ((~data[top]) & 0xFF).bit_length() - 1
