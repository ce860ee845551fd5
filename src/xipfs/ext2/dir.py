"""Directories: linear entries, checked the way Linux ``ext2_check_folio`` checks them.

An htree-indexed directory (dir_index, also built by Linux on ext2 images) is read through its
linear entries: the index hides in entries that parse as unused space. A directory is indexed
by name once, on first use, so that each later lookup is one dict access.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

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


_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def index_directory(blocks: Iterable[tuple[int, memoryview]], bs: int, inodes_count: int,
                    filetype: bool, ino: int) -> DirIndex:
    """Parse and index the blocks ``(file block, view)`` of directory ``ino`` in one pass.

    Checks every rule Linux checks before it trusts a directory block (rec_len alignment,
    bounds and minimum size, inode range), and that ``.`` and ``..`` lead the directory.
    """
    entries: dict[str, tuple[int, int]] = {}
    unpack = _DIRENT
    enc, errors = _FS_ENCODING, _FS_ERRORS
    seen = 0          # live entries so far: the first two must be "." and ".."
    parent = 0
    for lblk, buf in blocks:
        pos = 0
        while pos < bs:
            if pos + 12 > bs:
                raise CorruptImageError("directory entry header crosses the block end",
                                        _where(ino, lblk, pos))
            child, rec_len, name_len, ftype = unpack(buf, pos)
            if rec_len < 12 or rec_len & 3 or pos + rec_len > bs or rec_len < ((8 + name_len + 3) & ~3):
                if bs == 65536 and rec_len in (0, 65535) and pos == 0:
                    rec_len = 65536
                else:
                    raise CorruptImageError(_rec_len_problem(rec_len, name_len, pos, bs),
                                            _where(ino, lblk, pos))
            if child:
                if child > inodes_count:
                    raise CorruptImageError(f"entry points to inode {child} beyond the inode count",
                                            _where(ino, lblk, pos))
                if name_len == 0:
                    raise CorruptImageError("entry with an empty name", _where(ino, lblk, pos))
                key = str(buf[pos + 8:pos + 8 + name_len], enc, errors)
                if seen >= 2:
                    if key not in entries:  # a duplicate is corruption; the first wins, as in Linux
                        if "/" in key or "\0" in key or key == "." or key == "..":
                            raise CorruptImageError(f"invalid entry name {key!r}", _where(ino, lblk, pos))
                        entries[key] = (child, ftype if filetype else 0)
                elif seen == 0:
                    if key != "." or child != ino:
                        raise CorruptImageError("directory does not start with '.' pointing to itself",
                                                f"directory inode {ino}")
                else:
                    if key != "..":
                        raise CorruptImageError("second entry of a directory is not '..'",
                                                f"directory inode {ino}")
                    parent = child
                seen += 1
            pos += rec_len
    if seen < 2:
        raise CorruptImageError("directory does not start with '.' and '..'", f"directory inode {ino}")
    return DirIndex(entries, parent)


def _where(ino: int, lblk: int, pos: int) -> str:
    return f"directory inode {ino} block {lblk} offset {pos}"


def _rec_len_problem(rec_len: int, name_len: int, pos: int, bs: int) -> str:
    if rec_len < 12 or rec_len & 3:
        return f"rec_len {rec_len} invalid"
    if pos + rec_len > bs:
        return f"rec_len {rec_len} crosses the block end"
    return f"rec_len {rec_len} too short for name length {name_len}"
