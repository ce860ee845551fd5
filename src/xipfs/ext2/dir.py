"""Directories: linear entries, checked the way Linux ``ext2_check_folio`` checks them.

An htree-indexed directory (dir_index, also built by Linux on ext2 images) is read through its
linear entries: the index hides in entries that parse as unused space. A directory is indexed
by name once, on first use, so that each later lookup is one dict access.
"""

from __future__ import annotations

import os

from ..errors import CorruptImageError
from . import layout as L

_DIRENT = L.DIRENT.struct.unpack_from


class DirIndex:
    """The entries of one directory: ``{name: (inode, file type)}`` in on-disk order."""

    __slots__ = ("entries", "parent", "_names")

    def __init__(self, entries: dict[str, tuple[int, int]], parent: int) -> None:
        self.entries = entries
        self.parent = parent
        self._names: list[str] | None = None

    def names(self) -> list[str]:
        """Entry names other than ``.`` and ``..``, in on-disk order (a fresh list)."""
        if self._names is None:
            self._names = list(self.entries)
        return list(self._names)

    def get(self, name: str) -> tuple[int, int] | None:
        return self.entries.get(name)


def parse_block(buf: memoryview | bytes, bs: int, inodes_count: int, filetype: bool,
                where: str, out: list[tuple[bytes, int, int]]) -> None:
    """Append ``(name, inode, file type)`` for each live entry of one directory block."""
    pos = 0
    while pos < bs:
        if pos + 12 > bs:
            raise CorruptImageError("directory entry header crosses the block end", f"{where} offset {pos}")
        ino, rec_len, name_len, ftype = _DIRENT(buf, pos)
        if bs == 65536 and rec_len in (0, 65535):
            rec_len = 65536
        if rec_len < 12 or rec_len & 3:
            raise CorruptImageError(f"rec_len {rec_len} invalid", f"{where} offset {pos}")
        if pos + rec_len > bs:
            raise CorruptImageError(f"rec_len {rec_len} crosses the block end", f"{where} offset {pos}")
        if rec_len < ((8 + name_len + 3) & ~3):
            raise CorruptImageError(f"rec_len {rec_len} too short for name length {name_len}",
                                    f"{where} offset {pos}")
        if ino:
            if ino > inodes_count:
                raise CorruptImageError(f"entry points to inode {ino} beyond the inode count",
                                        f"{where} offset {pos}")
            if name_len == 0:
                raise CorruptImageError("entry with an empty name", f"{where} offset {pos}")
            out.append((bytes(buf[pos + 8:pos + 8 + name_len]), ino, ftype if filetype else 0))
        pos += rec_len


def build_index(raw_entries: list[tuple[bytes, int, int]], ino: int) -> DirIndex:
    """Index parsed entries by name, checking the ``.`` and ``..`` that must lead a directory."""
    where = f"directory inode {ino}"
    if len(raw_entries) < 2 or raw_entries[0][0] != b"." or raw_entries[1][0] != b"..":
        raise CorruptImageError("directory does not start with '.' and '..'", where)
    if raw_entries[0][1] != ino:
        raise CorruptImageError(f"'.' points to inode {raw_entries[0][1]}", where)
    parent = raw_entries[1][1]
    entries: dict[str, tuple[int, int]] = {}
    decode = os.fsdecode
    for name, child, ftype in raw_entries[2:]:
        if name == b"." or name == b".." or b"/" in name or b"\0" in name:
            raise CorruptImageError(f"invalid entry name {name!r}", where)
        key = decode(name)
        if key not in entries:  # a duplicate name is corruption; the first one wins, as in Linux
            entries[key] = (child, ftype)
    return DirIndex(entries, parent)
