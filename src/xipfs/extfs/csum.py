"""The checksum primitives of ext4 and JBD2: raw CRC32C and the CRC16 of ``uninit_bg``.

Every metadata checksum of ext4 and of the journal is ``crc32c_raw(seed, bytes)``: reflected
Castagnoli with the register started at ``seed`` and no final inversion (Linux ``crc32c()``,
e2fsprogs ``ext2fs_crc32c_le``), so it chains: ``raw(raw(s, a), b) == raw(s, a + b)``.
google-crc32c computes the standard (inverted) CRC in C; the raw form is that with both
inversions undone.
"""

from __future__ import annotations

import struct

from google_crc32c import extend as _extend

_MASK = 0xFFFFFFFF
_INO_GEN = struct.Struct("<II").pack


def crc32c_raw(seed: int, data: bytes | bytearray | memoryview) -> int:
    """CRC32C of ``data`` with the register started at ``seed`` and no final XOR."""
    if type(data) is not bytes:                 # google-crc32c takes bytes only
        data = bytes(data)
    return _extend(seed ^ _MASK, data) ^ _MASK


def inode_seed(fs_seed: int, ino: int, generation: int) -> int:
    """The seed of every checksum that belongs to inode ``ino`` (the inode, its extent blocks,
    its directory blocks): the filesystem's seed, then the inode number and generation."""
    return crc32c_raw(fs_seed, _INO_GEN(ino, generation))      # raw(raw(S, ino), gen), in one call


def _crc16_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0xA001 if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_CRC16 = _crc16_table()


def crc16(crc: int, data: bytes | bytearray | memoryview) -> int:
    """CRC-16 (reflected 0xA001, no final XOR) as ``ext2fs_crc16``: the descriptor checksum of
    ``uninit_bg``/``gdt_csum`` images, started at 0xFFFF by the caller."""
    table = _CRC16
    for b in bytes(data):
        crc = (crc >> 8) ^ table[(crc ^ b) & 0xFF]
    return crc
