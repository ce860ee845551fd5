"""Android sparse images (``img2simg``): read in place through their chunk table, or unsparsed.

A sparse image is a 28-byte header and a run of chunks, each describing some blocks of the raw
image: RAW (the bytes follow), FILL (a 4-byte value repeated), DONT_CARE (zeros, nothing
stored) and CRC32 (a checksum of everything so far). :class:`SparseDevice` reads the raw image
without expanding it: a read of RAW blocks comes straight from the sparse file (on memory
storage, a slice of its mapping), FILL and DONT_CARE bytes are made on the fly. It is read-only.
:func:`unsparse` writes the raw image, leaving DONT_CARE blocks as holes, as ``simg2img`` does.
Format: AOSP ``libsparse/sparse_format.h``.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
import zlib
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from typing import NamedTuple

from ..errors import CorruptImageError
from .base import Device
from .detect import storage_kind
from .file import FileDevice
from .memory import MemoryDevice

__all__ = ["SPARSE_MAGIC", "SparseChunk", "SparseDevice", "is_sparse", "unsparse"]

SPARSE_MAGIC = 0xED26FF3A
CHUNK_RAW = 0xCAC1
CHUNK_FILL = 0xCAC2
CHUNK_DONT_CARE = 0xCAC3
CHUNK_CRC32 = 0xCAC4
#: Bytes that follow the header of each chunk type but RAW (``chunk_sz * blk_sz``).
_PAYLOAD = {CHUNK_FILL: 4, CHUNK_DONT_CARE: 0, CHUNK_CRC32: 4}
_CHUNK_NAMES = {CHUNK_RAW: "raw", CHUNK_FILL: "fill", CHUNK_DONT_CARE: "don't care", CHUNK_CRC32: "crc32"}

_HEADER = struct.Struct("<IHHHHIIII")      # magic, major, minor, file_hdr_sz, chunk_hdr_sz, blk_sz,
HEADER_SIZE = _HEADER.size                 # total_blks, total_chunks, image_checksum (28 bytes)
_CHUNK = struct.Struct("<HHII")            # type, reserved, chunk_sz (blocks), total_sz (12 bytes)
CHUNK_HEADER_SIZE = _CHUNK.size

# Kinds of the chunk table (CRC32 chunks hold no output and are kept apart). From _ZERO up
# the bytes are zeros: DONT_CARE, and a FILL of 0 (img2simg writes zero runs so).
_RAW, _FILL, _ZERO, _ZERO_FILL = 0, 1, 2, 3
#: Unit of made-up bytes (zeros, fill patterns) and of the copies of unsparse.
_PIECE = 1 << 20
_ZEROS = bytes(_PIECE)


class SparseChunk(NamedTuple):
    """One chunk of a sparse image: where its bytes go in the raw image and where they come from."""

    type: str           # "raw", "fill", "don't care" ("crc32" chunks are in crc_chunks)
    start: int          # byte offset in the raw image
    length: int         # bytes of the raw image
    source: int         # raw: byte offset of the data in the sparse file; fill: the 32-bit value


def is_sparse(source: str | os.PathLike[str] | bytes | bytearray | memoryview) -> bool:
    """Whether ``source`` (a path, or the first bytes of a file) starts with the sparse magic."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        head = bytes(source[:4])
    else:
        with open(source, "rb") as f:
            head = f.read(4)
    return len(head) == 4 and struct.unpack("<I", head)[0] == SPARSE_MAGIC


def _open_source(path: str | os.PathLike[str], xip: bool | None) -> Device:
    """The sparse file as a device: mapped on memory storage (or with ``xip=True``), else pread."""
    use_memory = storage_kind(path) in ("tmpfs", "hugetlbfs", "ramfs", "shm", "dax") if xip is None else xip
    if use_memory:
        return MemoryDevice.from_path(path, readonly=True, kind=storage_kind(path))
    return FileDevice(path, readonly=True)


class SparseDevice(Device):
    """The raw image an Android sparse image describes, read through its chunk table (read-only)."""

    is_xip = False              # only reads inside one RAW chunk of a mapped file are the storage

    def __init__(self, source: str | os.PathLike[str] | Device, *, xip: bool | None = None,
                 close_source: bool | None = None) -> None:
        if isinstance(source, Device):
            self.source = source
            self._owns_source = bool(close_source)
        else:
            self.source = _open_source(source, xip)
            self._owns_source = True if close_source is None else close_source
        try:
            self._parse()
        except BaseException:
            if self._owns_source and not isinstance(source, Device):
                self.source.close()
            raise
        super().__init__(self.total_blocks * self.block_size, True, self.source.name)
        self.kind = "sparse"
        #: Reads of RAW data can be slices of the source's mapping.
        self._mapped = isinstance(getattr(self.source, "buffer", None), memoryview)
        self._fills: dict[int, bytes] = {}

    # -- the chunk table ----------------------------------------------------------------------
    def _read(self, offset: int, length: int, what: str) -> bytes:
        if offset + length > self.source.size:
            raise CorruptImageError(f"sparse image truncated: {what} runs past the end of the file",
                                    f"bytes {offset}..{offset + length} of a {self.source.size}-byte file")
        buf = bytearray(length)
        self.source.read_into(memoryview(buf), offset)
        return bytes(buf)

    def _parse(self) -> None:
        """Read and check the header and every chunk header (sizes as libsparse checks them)."""
        name = self.source.name
        file_size = self.source.size
        (magic, major, _minor, file_hdr, chunk_hdr, blk_sz, total_blks, total_chunks,
         checksum) = _HEADER.unpack(self._read(0, HEADER_SIZE, "the header"))
        if magic != SPARSE_MAGIC:
            raise CorruptImageError("not an Android sparse image (bad magic)", f"{name}: {magic:#010x}")
        if major != 1:
            raise CorruptImageError(f"sparse image major version {major} (only 1 is known)", name)
        if file_hdr < HEADER_SIZE or chunk_hdr < CHUNK_HEADER_SIZE:
            raise CorruptImageError("sparse image header sizes too small",
                                    f"{name}: file header {file_hdr} (>= 28), "
                                    f"chunk header {chunk_hdr} (>= 12)")
        if blk_sz == 0 or blk_sz % 4:
            raise CorruptImageError("sparse image block size is not a positive multiple of 4",
                                    f"{name}: {blk_sz}")
        room = file_size - file_hdr
        if room < 0 or total_chunks * chunk_hdr > room:
            raise CorruptImageError("sparse image claims more chunks than its file can hold",
                                    f"{name}: {total_chunks} chunks of >= {chunk_hdr} bytes in "
                                    f"{max(room, 0)} bytes")
        self.block_size = blk_sz
        self.total_blocks = total_blks
        #: The header's CRC32 of the whole raw image (0: none; img2simg writes none).
        self.image_checksum = checksum
        starts = array("Q")          # raw-image byte offset of each chunk (then the end)
        kinds = bytearray()
        sources = array("Q")         # RAW: data offset in the file; FILL: the value
        #: ``(raw bytes before it, stored CRC, chunk index)`` of each CRC32 chunk.
        self.crc_chunks: list[tuple[int, int, int]] = []
        pos = file_hdr
        block = 0
        for index in range(total_chunks):
            ctype, _res, blocks, total = _CHUNK.unpack(self._read(pos, CHUNK_HEADER_SIZE, f"chunk {index}"))
            where = f"{name}: chunk {index} ({_CHUNK_NAMES.get(ctype, hex(ctype))}) at byte {pos}"
            data = total - chunk_hdr
            expect = blocks * blk_sz if ctype == CHUNK_RAW else _PAYLOAD.get(ctype)
            if expect is None:
                raise CorruptImageError(f"unknown sparse chunk type {ctype:#06x}", where)
            if total < chunk_hdr or data != expect:
                raise CorruptImageError("sparse chunk size does not match its type",
                                        f"{where}: {total} bytes, expected {chunk_hdr + expect}")
            if pos + total > file_size:
                raise CorruptImageError("sparse chunk runs past the end of the file",
                                        f"{where}: {total} bytes, file is {file_size}")
            if ctype == CHUNK_CRC32:
                if blocks:
                    raise CorruptImageError("CRC32 chunk claims output blocks", f"{where}: {blocks}")
                stored = struct.unpack("<I", self._read(pos + chunk_hdr, 4, "a CRC32 value"))[0]
                self.crc_chunks.append((block * blk_sz, stored, index))
            else:
                if block + blocks > total_blks:
                    raise CorruptImageError("sparse chunks describe more blocks than the header's total",
                                            f"{where}: ends at block {block + blocks} of {total_blks}")
                if blocks:
                    starts.append(block * blk_sz)
                    if ctype == CHUNK_RAW:
                        kinds.append(_RAW)
                        sources.append(pos + chunk_hdr)
                    elif ctype == CHUNK_FILL:
                        value = struct.unpack("<I", self._read(pos + chunk_hdr, 4, "a fill value"))[0]
                        kinds.append(_FILL if value else _ZERO_FILL)
                        sources.append(value)
                    else:
                        kinds.append(_ZERO)
                        sources.append(0)
                block += blocks
            pos += total
        if block != total_blks:
            raise CorruptImageError("sparse chunks do not cover the image",
                                    f"{name}: chunks describe {block} blocks, header says {total_blks}")
        starts.append(block * blk_sz)
        self._starts, self._kinds, self._sources = starts, kinds, sources

    @property
    def chunks(self) -> list[SparseChunk]:
        """The chunk table (RAW, FILL and DONT_CARE chunks, in raw-image order)."""
        out = []
        for i, kind in enumerate(self._kinds):
            start, end = self._starts[i], self._starts[i + 1]
            name = "raw" if kind == _RAW else "don't care" if kind == _ZERO else "fill"
            out.append(SparseChunk(name, start, end - start, self._sources[i]))
        return out

    # -- reading --------------------------------------------------------------------------------
    def _fill_piece(self, value: int, phase: int, length: int) -> bytes | memoryview:
        """``length`` bytes of ``value`` repeated, starting ``phase`` bytes into the pattern."""
        pattern = struct.pack("<I", value)
        if length <= 4096:
            return (pattern * ((length + phase) // 4 + 1))[phase:phase + length]
        big = self._fills.get(value)
        if big is None:
            if len(self._fills) >= 8:
                self._fills.clear()
            big = self._fills[value] = pattern * (_PIECE // 4 + 1)
        return memoryview(big)[phase:phase + min(length, _PIECE)]

    def read_into(self, dst: memoryview, offset: int) -> None:
        n = len(dst)
        if offset < 0 or offset + n > self.size:
            self.check_range(offset, n)
        starts, kinds, sources = self._starts, self._kinds, self._sources
        i = bisect_right(starts, offset) - 1
        done = 0
        while done < n:
            pos = offset + done
            while starts[i + 1] <= pos:
                i += 1
            within = pos - starts[i]
            piece = min(n - done, starts[i + 1] - pos)
            kind = kinds[i]
            if kind == _RAW:
                self.source.read_into(dst[done:done + piece], sources[i] + within)
            elif kind >= _ZERO:
                for k in range(0, piece, _PIECE):
                    m = min(_PIECE, piece - k)
                    dst[done + k:done + k + m] = _ZEROS[:m]
            else:
                k = 0
                while k < piece:
                    chunk = self._fill_piece(sources[i], (within + k) % 4, piece - k)
                    dst[done + k:done + k + len(chunk)] = chunk
                    k += len(chunk)
            done += piece

    def view(self, offset: int, length: int) -> memoryview:
        """Bytes of the raw image: a slice of the mapped sparse file when they lie in one RAW
        chunk of a file on memory storage, else a buffer built for the call (read-only)."""
        if offset < 0 or length < 0 or offset + length > self.size:
            self.check_range(offset, length)
        if self._mapped and length:
            i = bisect_right(self._starts, offset) - 1
            if self._kinds[i] == _RAW and offset + length <= self._starts[i + 1]:
                return self.source.view(self._sources[i] + offset - self._starts[i], length)
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return memoryview(buf).toreadonly()

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise OSError(errno.EROFS, "a sparse image is read-only (unsparse it to write)", self.name)

    def write_new(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self.write(data, offset)

    # -- the sparse file's locks (fileno() stays -1: its bytes are not the device's) -------------
    def lock(self, exclusive: bool) -> None:
        self.source.lock(exclusive)

    def unlock(self) -> None:
        self.source.unlock()

    def writer_elsewhere(self) -> bool:
        return self.source.writer_elsewhere()

    def close(self) -> None:
        if self._owns_source:
            self._owns_source = False
            self.source.close()

    # -- checksums and unsparsing ---------------------------------------------------------------
    def pieces(self) -> Iterator[tuple[int, int, memoryview | None]]:
        """``(raw offset, length, bytes or None for zeros)`` covering the raw image in order,
        at most 1 MiB each: what :func:`unsparse` writes."""
        buf = memoryview(bytearray(_PIECE))
        for i, kind in enumerate(self._kinds):
            start, end = self._starts[i], self._starts[i + 1]
            for pos in range(start, end, _PIECE):
                n = min(_PIECE, end - pos)
                if kind >= _ZERO:
                    yield pos, n, None
                elif kind == _RAW and self._mapped:
                    yield pos, n, self.source.view(self._sources[i] + pos - start, n)
                else:
                    self.read_into(buf[:n], pos)
                    yield pos, n, buf[:n]

    def verify(self) -> None:
        """Check every CRC32 chunk and the header's image checksum (when not 0) against the data."""
        _check_crcs(self, self.pieces())


def _crc_zeros(crc: int, n: int) -> int:
    while n:
        k = min(n, _PIECE)
        crc = zlib.crc32(_ZEROS[:k], crc)
        n -= k
    return crc


def _check_crcs(dev: SparseDevice, pieces: Iterator[tuple[int, int, memoryview | None]]) -> None:
    """Consume ``pieces`` (all of the image, in order), checking the CRC32 chunks as they come."""
    marks = list(dev.crc_chunks)
    if dev.image_checksum:
        marks.append((dev.size, dev.image_checksum, -1))
    if not marks:
        for _ in pieces:
            pass
        return
    crc = 0
    k = 0
    for pos, n, data in pieces:
        while k < len(marks) and marks[k][0] <= pos:
            _check_mark(dev, marks[k], crc)
            k += 1
        crc = _crc_zeros(crc, n) if data is None else zlib.crc32(data, crc)
    for mark in marks[k:]:
        _check_mark(dev, mark, crc)


def _check_mark(dev: SparseDevice, mark: tuple[int, int, int], crc: int) -> None:
    at, stored, index = mark
    if stored != crc:
        what = f"CRC32 chunk {index}" if index >= 0 else "the header's image checksum"
        raise CorruptImageError("sparse image CRC32 mismatch",
                                f"{dev.name}: {what} after {at} bytes: stored {stored:#010x}, "
                                f"data gives {crc:#010x}")


def unsparse(src: str | os.PathLike[str] | Device | SparseDevice, dest: str | os.PathLike[str]) -> int:
    """Write the raw image of sparse image ``src`` to ``dest``; its size in bytes.

    Zeros (DONT_CARE chunks and zero FILLs) stay holes in a regular file (it is truncated first
    and sized at the end); a block device gets them written. CRC32 chunks and the header's
    image checksum are checked when present: on a mismatch ``dest`` (a regular file) is removed
    and :class:`~xipfs.errors.CorruptImageError` raised.
    """
    dev = src if isinstance(src, SparseDevice) else SparseDevice(src, close_source=True)
    try:
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        regular = stat.S_ISREG(os.fstat(fd).st_mode)
        try:
            _check_crcs(dev, _write_pieces(fd, dev.pieces(), regular))
            if regular:
                os.ftruncate(fd, dev.size)
        except BaseException:
            os.close(fd)
            if regular:
                os.unlink(dest)
            raise
        os.close(fd)
        return dev.size
    finally:
        if dev is not src:
            dev.close()


def _write_pieces(fd: int, pieces: Iterator[tuple[int, int, memoryview | None]],
                  regular: bool) -> Iterator[tuple[int, int, memoryview | None]]:
    """Write each piece at its offset (zeros only where the file is not regular), passing it on."""
    for pos, n, data in pieces:
        if data is None and regular:
            yield pos, n, data
            continue
        view = memoryview(_ZEROS)[:n] if data is None else data
        at = pos
        while view:
            done = os.pwrite(fd, view, at)
            view = view[done:]
            at += done
        yield pos, n, data
