"""Partition tables: where the filesystems of a whole-disk image lie (MBR, EBR chains, GPT).

Partitions are numbered as Linux numbers ``loop0pN`` (block/partitions/msdos.c and efi.c):
MBR primaries by slot (1-4), logical partitions of an extended partition from 5 in the order
of its EBR chain, GPT entries by slot index + 1 with empty slots skipped. Sizes and starts are
in bytes. Anything that does not add up (a partition past the end of the disk, two that
overlap, an EBR chain that loops, GPT checksums that fail with no valid backup, absurd entry
counts) raises :class:`~xipfs.errors.CorruptImageError` naming what is wrong; reading is
bounded in time and memory whatever the bytes say.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable
from typing import NamedTuple

from ..errors import CorruptImageError
from .base import SECTOR_SIZE, Device
from .file import FileDevice
from .sparse import SparseDevice, is_sparse

__all__ = ["Partition", "PartitionTable", "partitions", "GPT_TYPE_NAMES", "MBR_TYPE_NAMES"]

#: MBR types of an extended partition (DOS, W95 LBA, Linux), as ``is_extended_partition``.
EXTENDED_TYPES = frozenset({0x05, 0x0F, 0x85})
#: MBR type of the protective entry in front of a GPT.
GPT_PROTECTIVE = 0xEE
#: Linux's DISK_MAX_PARTS: partition numbers stop below this.
MAX_PARTITIONS = 256
#: Linux's parse_extended gives up after this many EBR links without a logical partition.
MAX_EMPTY_LINKS = 100
#: Largest GPT entry array read (Linux's bound is KMALLOC_MAX_SIZE; sfdisk writes 16 KiB).
MAX_ENTRY_ARRAY = 4 << 20
GPT_SIGNATURE = b"EFI PART"
GPT_HEADER_MIN = 92
GPT_ENTRY_MIN = 128

_MBR_ENTRY = struct.Struct("<B3sB3sII")           # status, CHS, type, CHS, LBA start, sectors
_GPT_HEADER = struct.Struct("<8sIIIIQQQQ16sQIII")  # the 92 bytes of a GPT header
_GPT_ENTRY = struct.Struct("<16s16sQQQ72s")        # the 128 bytes of an entry

#: Names sfdisk gives the common MBR types (``sfdisk --label dos -T``).
MBR_TYPE_NAMES = {
    0x00: "Empty", 0x01: "FAT12", 0x04: "FAT16 <32M", 0x05: "Extended", 0x06: "FAT16",
    0x07: "HPFS/NTFS/exFAT", 0x0B: "W95 FAT32", 0x0C: "W95 FAT32 (LBA)", 0x0E: "W95 FAT16 (LBA)",
    0x0F: "W95 Ext'd (LBA)", 0x82: "Linux swap / Solaris", 0x83: "Linux", 0x85: "Linux extended",
    0x8E: "Linux LVM", 0xA5: "FreeBSD", 0xEE: "GPT", 0xEF: "EFI (FAT-12/16/32)",
    0xFD: "Linux raid autodetect",
}

#: Names sfdisk gives well-known GPT partition type GUIDs (``sfdisk --label gpt -T``).
GPT_TYPE_NAMES = {
    "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
    "024DEE41-33E7-11D3-9D69-0008C781F39F": "MBR partition scheme",
    "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
    "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
    "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
    "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery environment",
    "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
    "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
    "3B8F8425-20E0-4F3B-907F-1A25A76F98E8": "Linux server data",
    "44479540-F297-41B2-9AF7-D131D5F0458A": "Linux root (x86)",
    "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
    "69DAD710-2CE4-4E3C-B16C-21A1D49ABED3": "Linux root (ARM)",
    "B921B045-1DF0-41C3-AF44-4C6F280D3FAE": "Linux root (ARM-64)",
    "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
    "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
    "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
    "CA7D7CCB-63ED-4C53-861C-1742536059CC": "Linux LUKS",
    "8DA63339-0007-60C0-C436-083AC8230908": "Linux reserved",
    "48465300-0000-11AA-AA11-00306543ECAC": "Apple HFS/HFS+",
    "516E7CB4-6ECF-11D6-8FF8-00022D09712B": "FreeBSD data",
}


class Partition(NamedTuple):
    """One partition of a disk image: where it lies (bytes) and what its table says of it."""

    #: The number Linux gives it (``loop0pN``).
    number: int
    #: Byte offset of its first byte in the disk image.
    start: int
    #: Its length in bytes.
    size: int
    #: As sfdisk shows it: an MBR id in hex ("83", "5") or a GPT type GUID (upper case).
    type: str
    #: The GPT partition name ("" on an MBR disk).
    name: str = ""
    #: The GPT unique partition GUID, upper case ("" on an MBR disk).
    guid: str = ""
    #: Linux's PARTUUID: the GPT GUID in lower case, or ``<disk id>-<number>`` on an MBR disk.
    partuuid: str = ""
    #: GPT attribute bits, or the MBR status byte (0x80: active).
    attributes: int = 0
    #: An MBR extended partition: the container of the logical ones, no filesystem of its own.
    extended: bool = False

    @property
    def end(self) -> int:
        """Byte offset just past its last byte."""
        return self.start + self.size

    @property
    def type_name(self) -> str:
        """What sfdisk calls its type ("Linux", "Linux filesystem"), or "" when not well known."""
        if len(self.type) == 36:
            return GPT_TYPE_NAMES.get(self.type, "")
        return MBR_TYPE_NAMES.get(int(self.type, 16), "")


class PartitionTable(list):
    """The partitions of a disk image in number order, with what the table says of itself."""

    def __init__(self, parts: list[Partition], *, label: str | None = None, disk_id: str = "",
                 sector_size: int = SECTOR_SIZE, notes: list[str] | None = None) -> None:
        super().__init__(sorted(parts, key=lambda p: p.number))
        #: "dos", "gpt", or None when the image has no partition table.
        self.label = label
        #: sfdisk's disk identifier: "0x1234abcd" (MBR) or the disk GUID (GPT).
        self.disk_id = disk_id
        #: Bytes per LBA of the table (512; 4096 for a GPT written for 4Kn disks).
        self.sector_size = sector_size
        #: What was odd but readable (a bad primary GPT replaced by its backup, say).
        self.notes: list[str] = notes or []

    def number(self, n: int) -> Partition:
        """Partition ``n`` (Linux's numbering); ``LookupError`` naming the ones there are."""
        for p in self:
            if p.number == n:
                return p
        have = ", ".join(str(p.number) for p in self) or "none"
        raise LookupError(f"no partition {n} (partitions: {have})")


class _Reader:
    """Bounded reads of the disk image, whatever it is (path, device or bytes)."""

    def __init__(self, source: str | os.PathLike[str] | Device | bytes | bytearray | memoryview) -> None:
        self._owned: Device | None = None
        self._data: memoryview | None = None
        self._device: Device | None = None
        if isinstance(source, Device):
            self._device = source
            self.size = source.size
        elif isinstance(source, (bytes, bytearray, memoryview)):
            self._data = memoryview(source).cast("B")
            self.size = len(self._data)
        else:
            self._owned = self._device = SparseDevice(source) if is_sparse(source) else \
                FileDevice(source, readonly=True)
            self.size = self._owned.size
        self.name = self._device.name if self._device is not None else "<bytes>"

    def read(self, offset: int, length: int, what: str) -> bytes:
        """``length`` bytes at ``offset``; past the end of the disk is a corrupt table."""
        if offset < 0 or offset + length > self.size:
            raise CorruptImageError(f"{what} lies past the end of the disk",
                                    f"bytes {offset}..{offset + length} of a {self.size}-byte disk")
        if self._data is not None:
            return bytes(self._data[offset:offset + length])
        buf = bytearray(length)
        assert self._device is not None
        self._device.read_into(memoryview(buf), offset)
        return bytes(buf)

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


def partitions(source: str | os.PathLike[str] | Device | bytes | bytearray | memoryview) -> PartitionTable:
    """The partitions of a disk image (a path, a Device or its bytes), numbered as Linux does.

    A path to an Android sparse image is read through its chunk table. An image with no
    partition table (a bare filesystem) gives an empty table (``label`` None).
    """
    reader = _Reader(source)
    try:
        return _read_table(reader)
    finally:
        reader.close()


def _mbr_entries(sector: bytes) -> list[tuple[int, int, int, int]]:
    """The four ``(status, type, first sector, sectors)`` entries of an MBR or EBR."""
    out = []
    for i in range(4):
        status, _, typ, _, start, count = _MBR_ENTRY.unpack_from(sector, 0x1BE + 16 * i)
        out.append((status, typ, start, count))
    return out


def _read_table(r: _Reader) -> PartitionTable:
    if r.size < SECTOR_SIZE:
        return PartitionTable([])
    mbr = r.read(0, SECTOR_SIZE, "MBR")
    if mbr[510:512] != b"\x55\xaa":
        return PartitionTable([])
    entries = _mbr_entries(mbr)
    protective = [e for e in entries if e[1] == GPT_PROTECTIVE]
    if protective:
        if not any(e[2] == 1 for e in protective):
            raise CorruptImageError("protective MBR entry (type ee) does not start at LBA 1",
                                    f"{r.name}: starts at LBA {protective[0][2]}")
        return _gpt(r)
    for slot, (status, *_rest) in enumerate(entries, 1):
        if status not in (0x00, 0x80):
            # Linux: 55 AA with such a boot indicator is a FAT boot sector or garbage, no table.
            return PartitionTable([], notes=[f"sector 0 ends in 55 AA but entry {slot} has boot "
                                             f"indicator {status:#04x}: not a partition table"])
    return _dos(r, mbr, entries)


# -- MBR and extended partitions ----------------------------------------------------------------
def _dos(r: _Reader, mbr: bytes, entries: list[tuple[int, int, int, int]]) -> PartitionTable:
    disk_sectors = r.size // SECTOR_SIZE
    disksig = struct.unpack_from("<I", mbr, 0x1B8)[0]
    parts: list[Partition] = []
    notes: list[str] = []

    def add(number: int, status: int, typ: int, start: int, count: int, extended: bool = False) -> None:
        if start + count > disk_sectors:
            raise CorruptImageError(f"partition {number} lies past the end of the disk",
                                    f"sectors {start}..{start + count} of {disk_sectors}")
        parts.append(Partition(number, start * SECTOR_SIZE, count * SECTOR_SIZE, f"{typ:x}",
                               partuuid=f"{disksig:08x}-{number:02x}", attributes=status,
                               extended=extended))

    following = 5
    for slot, (status, typ, start, count) in enumerate(entries, 1):
        if not count:
            continue
        if typ in EXTENDED_TYPES:
            add(slot, status, typ, start, count, extended=True)
            following = _logicals(r, start, count, following, disksig, add, notes)
        else:
            add(slot, status, typ, start, count)
    _check_overlaps([p for p in parts if p.number <= 4], "primary partitions")
    _check_overlaps([p for p in parts if not p.extended], "partitions")
    return PartitionTable(parts, label="dos", disk_id=f"0x{disksig:08x}", notes=notes)


def _logicals(r: _Reader, first: int, first_size: int, number: int, disksig: int,
              add: Callable[[int, int, int, int, int], None],
              notes: list[str]) -> int:
    """Follow the EBR chain of the extended partition at sector ``first`` as Linux's
    parse_extended does; the next free partition number."""
    disk_sectors = r.size // SECTOR_SIZE
    this, this_size = first, first_size
    seen: set[int] = set()
    empty = 0
    while True:
        empty += 1
        if empty > MAX_EMPTY_LINKS:
            notes.append(f"EBR chain of the extended partition at sector {first} followed "
                         f"{MAX_EMPTY_LINKS} links without a logical partition; Linux stops there too")
            return number
        if number >= MAX_PARTITIONS:
            notes.append(f"more than {MAX_PARTITIONS - 1} partitions; Linux stops at that number too")
            return number
        if this in seen:
            raise CorruptImageError("extended partition chain loops",
                                    f"EBR at sector {this} is reached twice")
        seen.add(this)
        if this >= disk_sectors:
            raise CorruptImageError("EBR lies past the end of the disk",
                                    f"sector {this} of {disk_sectors}")
        ebr = r.read(this * SECTOR_SIZE, SECTOR_SIZE, "EBR")
        if ebr[510:512] != b"\x55\xaa":
            if this != first:
                notes.append(f"EBR at sector {this} has no 55 AA signature: the chain ends there "
                             "(as in Linux)")
            return number
        entries = _mbr_entries(ebr)
        for i, (status, typ, start, count) in enumerate(entries):
            if not count or typ in EXTENDED_TYPES:
                continue
            where = this + start
            if i >= 2 and (start + count > this_size or where < first or where + count > first + first_size):
                continue                       # Linux: entries 3 and 4 often hold garbage
            add(number, status, typ, where, count)
            empty = 0
            number += 1
            if number == MAX_PARTITIONS:
                notes.append(f"more than {MAX_PARTITIONS - 1} partitions; Linux stops at that number too")
                return number
        link = next(((t, s, c) for _, t, s, c in entries if c and t in EXTENDED_TYPES), None)
        if link is None:
            return number
        this, this_size = first + link[1], link[2]


def _check_overlaps(parts: list[Partition], what: str) -> None:
    ordered = sorted(parts, key=lambda p: (p.start, p.number))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if b.start < a.end:
            raise CorruptImageError(f"{what} overlap",
                                    f"partition {a.number} (bytes {a.start}..{a.end}) and "
                                    f"partition {b.number} (bytes {b.start}..{b.end})")


# -- GPT ----------------------------------------------------------------------------------------
class _Gpt(NamedTuple):
    ssz: int
    lba: int
    alternate: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entry_size: int
    entries: bytes


class _BadGpt(Exception):
    """One GPT header (with its entry array) fails a check; the message says which."""


def _guid(raw: bytes) -> str:
    """A GUID as stored (``bytes_le``: its first three fields little-endian), in upper case."""
    a, b, c = struct.unpack_from("<IHH", raw)
    return f"{a:08X}-{b:04X}-{c:04X}-{raw[8:10].hex().upper()}-{raw[10:16].hex().upper()}"


def _read_gpt(r: _Reader, lba: int, ssz: int) -> _Gpt:
    """The GPT header at ``lba`` and its entry array, checked as Linux's is_gpt_valid does."""
    last_lba = r.size // ssz - 1
    if lba < 1 or lba > last_lba:
        raise _BadGpt(f"header LBA {lba} is outside the disk (last LBA {last_lba})")
    raw = r.read(lba * ssz, ssz, "GPT header")
    (sig, _rev, hsize, hcrc, _res, my_lba, alternate, first_usable, last_usable, disk_guid,
     entry_lba, count, esize, acrc) = _GPT_HEADER.unpack_from(raw)
    if sig != GPT_SIGNATURE:
        raise _BadGpt("no 'EFI PART' signature")
    if not GPT_HEADER_MIN <= hsize <= ssz:
        raise _BadGpt(f"header size {hsize} is not within {GPT_HEADER_MIN}..{ssz}")
    if zlib.crc32(raw[:16] + b"\0\0\0\0" + raw[20:hsize]) != hcrc:
        raise _BadGpt("header CRC32 mismatch")
    if my_lba != lba:
        raise _BadGpt(f"header says it is at LBA {my_lba}, read at LBA {lba}")
    if first_usable > last_lba or last_usable > last_lba or last_usable < first_usable:
        raise _BadGpt(f"usable LBAs {first_usable}..{last_usable} do not fit a disk whose last LBA "
                      f"is {last_lba}")
    if esize < GPT_ENTRY_MIN or esize > 4096 or esize & (esize - 1):
        raise _BadGpt(f"entry size {esize} (128, or 128 times a power of two up to 4096)")
    if count == 0 or count * esize > MAX_ENTRY_ARRAY:
        raise _BadGpt(f"{count} entries of {esize} bytes (an array of 1..{MAX_ENTRY_ARRAY} bytes)")
    if entry_lba < 1 or (entry_lba * ssz + count * esize) > r.size:
        raise _BadGpt(f"entry array at LBA {entry_lba} ({count * esize} bytes) runs past the disk")
    array = r.read(entry_lba * ssz, count * esize, "GPT entry array")
    if zlib.crc32(array) != acrc:
        raise _BadGpt("entry array CRC32 mismatch")
    return _Gpt(ssz, lba, alternate, first_usable, last_usable, _guid(disk_guid), esize, array)


def _gpt(r: _Reader) -> PartitionTable:
    if r.size < 2 * SECTOR_SIZE:
        raise CorruptImageError("protective MBR but no room for a GPT header", f"{r.size}-byte disk")
    ssz = SECTOR_SIZE
    if r.size >= 2 * 4096 and r.read(SECTOR_SIZE, 8, "GPT header") != GPT_SIGNATURE and \
            r.read(4096, 8, "GPT header") == GPT_SIGNATURE:
        ssz = 4096                          # a GPT written for 4Kn disks (4096-byte LBAs)
    notes: list[str] = []
    try:
        table = _read_gpt(r, 1, ssz)
    except _BadGpt as primary_error:
        table = _backup_gpt(r, ssz, str(primary_error))
        ssz = table.ssz
        notes.append(f"primary GPT header at LBA 1 is bad ({primary_error}); using the backup at "
                     f"LBA {table.lba} (Linux itself does so only with the 'gpt' boot option)")
    else:
        try:
            _read_gpt(r, table.alternate, ssz)
        except _BadGpt as backup_error:
            notes.append(f"backup GPT header at LBA {table.alternate} is bad ({backup_error}); "
                         "using the primary")
    return PartitionTable(_gpt_entries(r, table, ssz), label="gpt", disk_id=table.disk_guid,
                          sector_size=ssz, notes=notes)


def _backup_gpt(r: _Reader, ssz: int, why: str) -> _Gpt:
    """The backup GPT in the last LBA (512-byte LBAs, then 4096), when the primary is bad."""
    problems = []
    for size in dict.fromkeys((ssz, 4096)):
        if r.size < 2 * size:
            continue
        try:
            return _read_gpt(r, r.size // size - 1, size)
        except _BadGpt as err:
            problems.append(f"{size}-byte LBAs: {err}")
    raise CorruptImageError("no valid GPT", f"{r.name}: primary header at LBA 1: {why}; backup header "
                            f"at the last LBA: {'; '.join(problems) or 'disk too small'}")


def _gpt_entries(r: _Reader, table: _Gpt, ssz: int) -> list[Partition]:
    last_lba = r.size // ssz - 1
    parts = []
    array = table.entries
    for index in range(len(array) // table.entry_size):
        off = index * table.entry_size
        if not any(array[off:off + 16]):
            continue
        type_guid, part_guid, first, last, attrs, raw_name = _GPT_ENTRY.unpack_from(array, off)
        number = index + 1
        if last < first:
            raise CorruptImageError(f"partition {number} ends before it starts",
                                    f"GPT entry {number}: LBAs {first}..{last}")
        if last > last_lba:
            raise CorruptImageError(f"partition {number} lies past the end of the disk",
                                    f"GPT entry {number}: LBAs {first}..{last}, last LBA {last_lba}")
        if first < table.first_usable or last > table.last_usable:
            raise CorruptImageError(f"partition {number} lies outside the GPT's usable area",
                                    f"GPT entry {number}: LBAs {first}..{last}, usable "
                                    f"{table.first_usable}..{table.last_usable}")
        guid = _guid(part_guid)
        parts.append(Partition(number, first * ssz, (last - first + 1) * ssz, _guid(type_guid),
                               name=_utf16_name(raw_name), guid=guid, partuuid=guid.lower(),
                               attributes=attrs))
    _check_overlaps(parts, "partitions")
    return parts


def _utf16_name(raw: bytes) -> str:
    """A GPT name: UTF-16LE up to the first NUL (a bad surrogate shows as U+FFFD)."""
    for i in range(0, len(raw), 2):
        if raw[i] == 0 and raw[i + 1] == 0:
            raw = raw[:i]
            break
    return raw.decode("utf-16-le", errors="replace")
