"""Directories: linear entries, checked the way Linux ``ext2_check_folio`` checks them.

An htree-indexed directory (dir_index, also built by Linux on ext2 images) is read through its
linear entries: the index hides in entries that parse as unused space. A directory is indexed
by name once, on first use, so that each later lookup is one dict access.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
from collections.abc import Callable, Iterable, Iterator
from itertools import chain
from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L
from .casefold import STRICT, UTF8_12_1, fold, fold_str, hash_key
from .csum import crc32c_raw, inode_seed
from .dirhash import DX_HASH_TEA, hash_version, hasher
from .htree import candidate_blocks, new_root, root_limit

if TYPE_CHECKING:
    from .inode import Inode
    from .volume import Volume

_DIRENT = L.DIRENT.struct.unpack_from
_HEADER = L.DIRENT_HEADER
#: Where an entry's rec_len is, and the one-field stores the write side makes in place.
_REC_LEN_AT = L.DIRENT.offsets["rec_len"]
_PACK_REC_LEN = L.DIRENT.codes["rec_len"].pack
_PACK_INODE = L.DIRENT.codes["inode"].pack
_PACK_REC_LEN_INTO = L.DIRENT.codes["rec_len"].pack_into
#: ``.`` or ``..`` as a 12-byte entry (for an inline directory, which stores only the parent).
_DOT_ENTRY = struct.Struct(L.DIRENT.struct.format + "4s")


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

    def changed(self) -> None:
        """An entry was added, removed or renamed: the name list is built again when asked."""
        self._names = None

    def get(self, name: str) -> tuple[int, int] | None:
        return self.entries.get(name)


class FoldedEntries(dict):  # type: ignore[type-arg]
    """The entries of a casefolded directory: ``get`` and ``in`` find a name as Linux does
    there (byte for byte, or by casefolded name when both fold; the first entry in directory
    order that matches); :meth:`stored` names the entry found. ``[]`` stays exact."""

    __slots__ = ("_folded", "_alike", "strict")

    def __init__(self, entries: dict[str, tuple[int, int]], strict: bool = False) -> None:
        super().__init__(entries)
        #: folded name -> the stored name it finds (built on the first lookup)
        self._folded: dict[str, str] | None = None
        #: two entries fold alike (the map holds only the first): a removal then rebuilds it
        self._alike = False
        #: the image's encoding is strict: a name that does not fold is EINVAL
        self.strict = strict

    def _by_folded(self) -> dict[str, str]:
        folded = self._folded
        if folded is None:
            folded = {}
            self._alike = False
            for name in self:
                self._note(folded, name)
            self._folded = folded
        return folded

    def _note(self, folded: dict[str, str], name: str) -> None:
        """Map ``name``'s folded form to it unless an earlier entry holds that form already."""
        key = fold_str(name)
        if key is None:
            return
        if key in folded:
            self._alike = True
        else:
            folded[key] = name

    def _forget(self, name: str) -> None:
        """Drop ``name`` from the folded map: only its own key, unless another entry folds alike
        (which the removal may uncover, so the map is built again on the next lookup)."""
        folded = self._folded
        if folded is None:
            return
        key = fold_str(name)
        if key is not None and folded.get(key) == name:
            if self._alike:
                self._folded = None
            else:
                del folded[key]

    def stored(self, name: str) -> str | None:
        """The stored name of the entry a lookup of ``name`` finds, or None."""
        key = fold_str(name)
        if key is None:                      # Linux cannot fold it: only the very bytes match
            if self.strict:
                raise unfoldable(os.fsencode(name))
            return name if dict.__contains__(self, name) else None
        return self._by_folded().get(key)

    def get(self, name: str, default: tuple[int, int] | None = None) -> tuple[int, int] | None:  # type: ignore[override]
        stored = self.stored(name)
        return default if stored is None else dict.get(self, stored, default)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.stored(name) is not None

    def __setitem__(self, name: str, entry: tuple[int, int]) -> None:
        folded = self._folded
        if folded is not None and not dict.__contains__(self, name):
            self._note(folded, name)
        super().__setitem__(name, entry)

    # one removal costs one fold, not a rebuild of the map on the next lookup (rm -r of a large
    # directory would fold every name left once per name removed)
    def __delitem__(self, name: str) -> None:
        self._forget(name)
        super().__delitem__(name)

    def pop(self, name: str, *default: object) -> object:  # type: ignore[override]
        self._forget(name)
        return super().pop(name, *default)

    def popitem(self) -> tuple[str, tuple[int, int]]:
        self._folded = None
        return super().popitem()

    def clear(self) -> None:
        self._folded = None
        super().clear()

    def update(self, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        self._folded = None
        super().update(*args, **kwargs)  # type: ignore[arg-type]

    def setdefault(self, name: str, entry: tuple[int, int]) -> tuple[int, int]:  # type: ignore[override]
        self._folded = None
        return super().setdefault(name, entry)


class RefusedEntries(dict):  # type: ignore[type-arg]
    """The entries of a casefolded directory xipfs cannot match names in as Linux does (an
    unknown encoding): listed as they are, a lookup raises ``error``."""

    __slots__ = ("error",)

    def __init__(self, entries: dict[str, tuple[int, int]], error: OSError) -> None:
        super().__init__(entries)
        self.error = error

    def get(self, name: str, default: tuple[int, int] | None = None) -> tuple[int, int] | None:  # type: ignore[override]
        raise OSError(self.error.errno, self.error.strerror)

    def __contains__(self, name: object) -> bool:
        raise OSError(self.error.errno, self.error.strerror)


def unfoldable(name: bytes) -> OSError:
    """EINVAL for a name Linux cannot fold, looked up in a casefolded directory of an image
    with the strict encoding (``generic_ci_d_hash`` fails the lookup itself)."""
    return OSError(errno.EINVAL, f"{os.fsdecode(name)!r} is not valid UTF-8, which a casefolded "
                   "directory under the strict encoding cannot look up")


def is_casefolded(vol: Volume, d: Inode) -> bool:
    """Whether names in directory ``d`` match without regard to case (the casefold flag, on an
    image with the casefold feature; Linux reads the flag only there)."""
    return bool(d.flags & L.FL_CASEFOLD and vol.inode_formats & L.FL_CASEFOLD)


def folding(name_hash: Callable[[bytes], tuple[int, int]]) -> Callable[[bytes], tuple[int, int]]:
    """``name_hash`` as a casefolded directory applies it: to the folded name, or to the bytes
    as they are where Linux cannot fold them."""
    return lambda name: name_hash(hash_key(name))


def check_casefold(vol: Volume, d: Inode) -> None:
    """Refuse what xipfs cannot look up as Linux would in casefolded directory ``d``: an encoding
    other than utf8-12.1 (Linux refuses to mount it). Encrypted names (a siphash htree) are
    refused with every encrypted inode, ENOKEY from ``Inode.check_format`` as its blocks are read."""
    encoding = vol.sb.s_encoding
    if encoding != UTF8_12_1:
        raise OSError(errno.EOPNOTSUPP, f"directory inode {d.ino} is casefolded with encoding "
                      f"{encoding}, which neither Linux nor xipfs knows (utf8-12.1 is 1)")


#: The rec_len of an entry packed against the next, by name length (none for an empty name,
#: whose 8 bytes are below the 12 every entry needs).
_PACKED_LEN = (-1, *((n + 11) & -4 for n in range(1, 256)))

_FS_ENCODING = sys.getfilesystemencoding()
_FS_ERRORS = sys.getfilesystemencodeerrors()


def index_directory(blocks: Iterable[tuple[int, memoryview]], bs: int, inodes_count: int,
                    filetype: bool, ino: int) -> DirIndex:
    """Parse and index the blocks ``(file block, view)`` of directory ``ino`` in one pass.

    Checks every rule Linux checks before it trusts a directory block (rec_len alignment,
    bounds and minimum size, inode range), and that ``.`` and ``..`` lead the directory.
    A directory as Linux and mke2fs write it is indexed by a lean loop that checks in bulk;
    anything unusual is parsed again by the careful one, which names the problem.
    """
    if not (filetype and _FS_ENCODING == "utf-8"):
        return _index_careful(blocks, bs, inodes_count, filetype, ino)
    blocks = iter(blocks)
    seen_blocks: list[tuple[int, memoryview]] = []
    index = _index_fast(blocks, seen_blocks, inodes_count, ino)
    if index is None:               # the blocks read so far, then the rest
        return _index_careful(chain(seen_blocks, blocks), bs, inodes_count, filetype, ino)
    return index


def _index_fast(blocks: Iterable[tuple[int, memoryview]], seen_blocks: list[tuple[int, memoryview]],
                inodes_count: int, ino: int) -> DirIndex | None:
    """The common case of :func:`index_directory`, or None when anything is unusual.

    Per entry only what cannot be checked afterwards: an entry whose rec_len is not its packed
    length (the last of a block, or one after a deleted name) is checked whole, every block must
    end exactly on an entry, and the inode range is checked. Names are checked in bulk at the
    end: none empty, none ``.``/``..`` past the first two, no ``/`` or NUL, all ASCII, no
    duplicates (the careful parse decodes and resolves those as Linux does).
    """
    entries: dict[str, tuple[int, int]] = {}
    unpack = _DIRENT
    packed = _PACKED_LEN
    live = 0
    for lblk, buf in blocks:
        seen_blocks.append((lblk, buf))
        text = str(buf, "latin-1")
        pos = 0
        end = len(buf)
        if end == 65536:
            return None                  # a 64 KiB block may spell its whole-block rec_len as 0
        try:
            while pos < end:
                child, rec_len, name_len, ftype = unpack(buf, pos)
                if rec_len != packed[name_len] and (
                        rec_len < 12 or rec_len & 3 or pos + rec_len > end or rec_len < name_len + 8):
                    return None
                if child:
                    if child > inodes_count:
                        return None
                    entries[text[pos + 8:pos + 8 + name_len]] = (child, ftype)
                    live += 1
                pos += rec_len
        except struct.error:
            return None                  # an entry header past the block's end
        if pos != end:
            return None
    if live != len(entries) or live < 2:
        return None
    it = iter(entries)
    if next(it) != "." or next(it) != ".." or entries["."][0] != ino or "" in entries:
        return None
    del entries["."]
    parent = entries.pop("..")[0]
    if "." in entries or ".." in entries:
        return None
    names = "".join(entries)
    if "/" in names or "\0" in names or not names.isascii():
        return None
    return DirIndex(entries, parent)


def _index_careful(blocks: Iterable[tuple[int, memoryview]], bs: int, inodes_count: int,
                   filetype: bool, ino: int) -> DirIndex:
    """:func:`index_directory` entry by entry, naming the first problem it meets."""
    entries: dict[str, tuple[int, int]] = {}
    unpack = _DIRENT
    enc, errors = _FS_ENCODING, _FS_ERRORS
    seen = 0          # live entries so far: the first two must be "." and ".."
    parent = 0
    utf8 = enc == "utf-8"
    for lblk, buf in blocks:
        # One decode per block: in latin-1 every byte is one character, so a name is a slice,
        # and an ASCII name (nearly all of them) is already the right str.
        text = str(buf, "latin-1") if utf8 else ""
        pos = 0
        end = len(buf)                  # bs, or a region of an inline directory
        while pos < end:
            if pos + 12 > end:
                raise CorruptImageError("directory entry header crosses the block end",
                                        _where(ino, lblk, pos))
            child, rec_len, name_len, ftype = unpack(buf, pos)
            if rec_len < 12 or rec_len & 3 or pos + rec_len > end or rec_len < ((8 + name_len + 3) & ~3):
                if end == 65536 and rec_len in (0, 65535) and pos == 0:
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
                if utf8:
                    key = text[pos + 8:pos + 8 + name_len]
                    if not key.isascii():
                        key = str(buf[pos + 8:pos + 8 + name_len], enc, errors)
                else:
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


# -- the write side -----------------------------------------------------------------------------

def rec_len_of(name_len: int) -> int:
    """Space an entry with a name of ``name_len`` bytes needs (8-byte header, 4-byte aligned)."""
    return (_HEADER + name_len + 3) & ~3


class DirSpace:
    """Where a directory's entries are and where new ones fit, for inserting without rescans.

    Per block: the offset of its last entry and the slack after that entry's name (where
    appends go), and the largest gap elsewhere in the block (after deletions). Entries are
    located by name, so removing one costs one block scan, as in Linux.
    """

    def __init__(self, blocks: Iterable[tuple[int, memoryview]], bs: int) -> None:
        self.bs = bs
        self.tail: list[tuple[int, int]] = []     # per block: (offset of last entry, slack)
        self.gap: list[int] = []                   # per block: largest free gap before the tail
        self.where: dict[bytes, tuple[int, int]] = {}
        self.full = 0                              # blocks below this have no room at all
        self.device_blocks: dict[int, int] = {}    # directory block -> device block
        self.dx: object = None                     # an indexed directory's state (namei._Dx)
        for lblk, buf in blocks:
            self.scan(lblk, buf)

    def appended(self, lblk: int, off: int, name: bytes, used: int) -> None:
        """An entry of ``used`` bytes just went into the tail slack of block ``lblk``."""
        slack = self.tail[lblk][1]
        self.tail[lblk] = (off, slack - used)
        self.where[name] = (lblk, off)

    def scan(self, lblk: int, buf: memoryview | bytes) -> None:
        """(Re)learn block ``lblk``: its entries, its tail slack and its largest gap."""
        self.full = min(self.full, lblk)
        bs = self.bs
        while len(self.tail) <= lblk:
            self.tail.append((0, 0))
            self.gap.append(0)
        pos, gap, last = 0, 0, (0, 0)
        while pos < bs:
            ino, rec_len, name_len, _ = _DIRENT(buf, pos)
            if bs == 65536 and rec_len in (0, 65535):
                rec_len = 65536
            free = rec_len - rec_len_of(name_len) if ino else rec_len
            if ino:
                self.where[bytes(buf[pos + 8:pos + 8 + name_len])] = (lblk, pos)
            if pos + rec_len >= bs:
                last = (pos, free)
            else:
                gap = max(gap, free)
            pos += rec_len
        self.tail[lblk] = last
        self.gap[lblk] = gap

    def relearn(self, blocks: Iterable[tuple[int, memoryview]]) -> None:
        """Forget everything and learn ``blocks`` again: the directory was laid out anew."""
        self.tail.clear()
        self.gap.clear()
        self.where.clear()
        self.device_blocks.clear()
        self.full = 0
        self.dx = None
        for lblk, buf in blocks:
            self.scan(lblk, buf)

    def removed(self, lblk: int, buf: memoryview | bytes, kept: int) -> None:
        """The entry after the one at ``kept`` was just merged into it (or, ``kept`` being 0
        and now unused, cleared in place): learn the block's new space.

        A gap in the middle only grows: no rescan (removing every name of a directory in
        order stays linear). When ``kept`` is now the last entry, its space joined the tail,
        and a gap recorded before may be that same space: the block is learnt again.
        """
        self.full = min(self.full, lblk)
        ino, rec_len, name_len, _ = _DIRENT(buf, kept)
        bs = self.bs
        if bs == 65536 and rec_len in (0, 65535):
            rec_len = 65536
        if kept + rec_len >= bs:
            self.scan(lblk, buf)
            return
        free = rec_len - rec_len_of(name_len) if ino else rec_len
        if free > self.gap[lblk]:
            self.gap[lblk] = free

    def find_slot(self, need: int) -> tuple[int, str]:
        """A block with room for ``need`` bytes: ``(block, "tail" | "gap")``, or ``(-1, "")``.

        The first such block, as Linux picks it; blocks before ``self.full`` have no room even
        for the smallest entry and are skipped.
        """
        tail, gap = self.tail, self.gap
        n = len(tail)
        start = self.full
        while start < n and tail[start][1] < 12 and gap[start] < 12:
            start += 1
        self.full = start
        for lblk in range(start, n):
            if tail[lblk][1] >= need:
                return lblk, "tail"
            if gap[lblk] >= need:
                return lblk, "gap"
        return -1, ""


def encode_entry(ino: int, rec_len: int, name: bytes, ftype: int) -> bytes:
    """An entry's header and name; a whole 64 KiB block's rec_len is stored as 65535 (Linux's
    ``ext2_rec_len_to_disk``)."""
    return L.DIRENT.struct.pack(ino, min(rec_len, 65535), len(name), ftype) + name


def empty_dir_block(bs: int, ino: int, parent: int, filetype: bool) -> bytes:
    """The first block of a new directory: ``.`` and ``..`` (Linux ``ext2_make_empty``)."""
    t = L.FT_DIR if filetype else 0
    return encode_entry(ino, 12, b".", t).ljust(12, b"\0") + \
        encode_entry(parent, bs - 12, b"..", t).ljust(bs - 12, b"\0")


def insert_into_block(buf: memoryview | bytes, bs: int, at: int | None, name: bytes, ino: int,
                      ftype: int) -> tuple[int, list[tuple[int, bytes]]]:
    """Where the new entry goes, and the writes that put it there, in a safe order.

    ``at`` is the entry whose slack to use (None: search the block for the first fit). The new
    entry is written into free space first; the old entry's rec_len shrinks (or an unused
    entry's inode number is set) last, so the entry appears in one small write.
    """
    need = rec_len_of(len(name))
    pos = 0 if at is None else at
    while pos < bs:
        cur, rec_len, name_len, _ = _DIRENT(buf, pos)
        if bs == 65536 and rec_len in (0, 65535):
            rec_len = 65536
        if cur == 0 and rec_len >= need:
            entry = encode_entry(0, rec_len, name, ftype)
            return pos, [(pos + _REC_LEN_AT, entry[_REC_LEN_AT:]), (pos, _PACK_INODE(ino))]
        used = rec_len_of(name_len)
        if cur and rec_len - used >= need:
            return pos + used, [(pos + used, encode_entry(ino, rec_len - used, name, ftype)),
                                (pos + _REC_LEN_AT, _PACK_REC_LEN(used))]
        if at is not None:
            break
        pos += rec_len
    raise CorruptImageError("directory block changed under the writer", f"offset {pos}")


def remove_from_block(buf: memoryview | bytes, bs: int,
                      off: int) -> tuple[int, list[tuple[int, bytes]]]:
    """The entry that takes the space, and the writes that delete the entry at ``off`` (Linux
    ``ext2_delete_entry``: merged into the one before, or the first one's inode cleared)."""
    if off == 0:
        return 0, [(0, _PACK_INODE(0))]
    pos = prev = 0
    while pos < off:
        prev = pos
        rec_len = _disk_rec_len(_DIRENT(buf, pos)[1], bs)
        pos += rec_len
    if pos != off:
        raise CorruptImageError("directory entry not where the index says", f"offset {off}")
    merged = _disk_rec_len(_DIRENT(buf, prev)[1], bs) + _disk_rec_len(_DIRENT(buf, off)[1], bs)
    return prev, [(prev + _REC_LEN_AT, _PACK_REC_LEN(min(merged, 65535)))]     # 65535 is 64 KiB


def leaf_entries(buf: memoryview | bytes, end: int) -> list[tuple[bytes, int, int, int]]:
    """The live entries of a directory leaf whose entries stop at ``end``: ``(name, inode, file
    type byte, rec_len)`` in block order (Linux ``dx_make_map`` takes those with an inode and a
    name)."""
    out = []
    pos = 0
    while pos < end:
        ino, rec_len, name_len, ftype = _DIRENT(buf, pos)
        rec_len = _disk_rec_len(rec_len, len(buf))
        if rec_len < 12 or pos + rec_len > len(buf):
            raise CorruptImageError(f"rec_len {rec_len} invalid", f"offset {pos}")
        if ino and name_len:
            out.append((bytes(buf[pos + 8:pos + 8 + name_len]), ino, ftype, rec_len))
        pos += rec_len
    return out


def pack_leaf(entries: Iterable[tuple[bytes, int, int]], end: int, bs: int) -> bytearray | None:
    """A directory leaf holding ``entries`` (name, inode, file type byte) packed from its start,
    the last one's rec_len reaching ``end`` (``dx_pack_dirents``); None when they do not fit.
    An empty list gives one unused entry spanning the leaf."""
    buf = bytearray(bs)
    pos = last = 0
    for name, ino, ftype in entries:
        size = rec_len_of(len(name))
        if pos + size > end:
            return None
        buf[pos:pos + 8 + len(name)] = encode_entry(ino, size, name, ftype)
        last = pos
        pos += size
    if pos == 0:
        buf[0:8] = encode_entry(0, end, b"", 0)
    else:
        _PACK_REC_LEN_INTO(buf, last + _REC_LEN_AT, min(end - last, 65535))
    return buf


def split_by_hash(live: list[tuple[bytes, int, int, int]], sizes: list[int],
                  name_hash: Callable[[bytes], tuple[int, int]], bs: int,
                  ) -> tuple[list[tuple[bytes, int, int]], list[tuple[bytes, int, int]], int, int]:
    """``do_split`` of a full leaf's ``live`` entries (``leaf_entries``) taking ``sizes`` bytes:
    ``(kept, moved, hash2, continued)``: the entries that stay, in block order, those that move
    to the new leaf, in hash order, the first moved hash and 1 when it continues the kept half's
    last hash (the index entry then says so in its low bit)."""
    order = sorted((name_hash(e[0])[0], i) for i, e in enumerate(live))
    split = split_at([sizes[i] for _, i in order], bs)
    hash2 = order[split][0]
    moved = {i for _, i in order[split:]}
    return ([e[:3] for i, e in enumerate(live) if i not in moved],
            [live[i][:3] for _, i in order[split:]], hash2, int(hash2 == order[split - 1][0]))


def split_at(sizes: list[int], bs: int) -> int:
    """Where ``do_split`` cuts a full leaf whose entries, sorted by hash, take ``sizes`` bytes
    (their rec_len): the upper entries move while each adds at most half its size past half
    the block; when that walk takes every entry (or all but the first), half by count."""
    count = len(sizes)
    moved = size = 0
    i = count - 1
    while i >= 0:
        if size + sizes[i] // 2 > bs // 2:
            break
        size += sizes[i]
        moved += 1
        i -= 1
    return count - moved if i > 0 else count // 2


def _disk_rec_len(rec_len: int, bs: int) -> int:
    """An on-disk rec_len in bytes (a 64 KiB block's whole-block entry says 0 or 65535)."""
    return bs if bs == 65536 and rec_len in (0, 65535) else rec_len


# -- a directory's blocks and their index -------------------------------------------------------
def dir_blocks(vol: Volume, node: Inode) -> Iterator[tuple[int, memoryview]]:
    """``(file block, view)`` for every block of directory ``node``; a hole is corruption.
    With metadata_csum every leaf's checksum tail is verified (htree nodes have their own)."""
    bs = vol.bs
    dev = vol.device
    seed = inode_seed(vol.csum_seed, node.ino, node.generation) if vol.verify else None
    indexed = bool(node.flags & L.FL_INDEX)
    for lblk, nblk, pblk in node.map.runs(0, node.size // bs):
        if not pblk:
            raise CorruptImageError(f"hole at block {lblk} of a directory", f"directory inode {node.ino}")
        for i in range(nblk):
            view = dev.view((pblk + i) * bs, bs)
            if seed is not None:
                verify_leaf(view, seed, bs, node.ino, lblk + i, indexed)
            yield lblk + i, view


#: The 12-byte tail that ends every directory leaf under metadata_csum (``ext4_dir_entry_tail``):
#: inode 0, rec_len 12, name_len 0, file type 0xDE, then the checksum.
DIR_TAIL = b"\0\0\0\0\x0c\0\0\xde"
_U32 = struct.Struct("<I").unpack_from


def verify_leaf(view: memoryview, seed: int, bs: int, ino: int, lblk: int, indexed: bool) -> None:
    """Check a directory leaf's checksum tail. The nodes of an htree (block 0 of an indexed
    directory, and blocks whose one entry is a fake spanning the block) carry their own."""
    if indexed and (lblk == 0 or (view[4] | view[5] << 8) in (0, bs)):
        return              # (a root made from a leaf may still hold the old tail's bytes)
    if bytes(view[bs - 12:bs - 4]) != DIR_TAIL:
        raise CorruptImageError("directory block has no checksum tail", _where(ino, lblk, bs - 12))
    if crc32c_raw(seed, view[:bs - 12]) != _U32(view, bs - 4)[0]:
        raise CorruptImageError("directory block checksum does not match", _where(ino, lblk, bs - 12))


def dir_end(vol: Volume) -> int:
    """Where a directory leaf's entries end: the block's end, or (metadata_csum) its 12-byte
    checksum tail's start."""
    return vol.bs - 12 if vol.sb.metadata_csum else vol.bs


def seal_leaf(vol: Volume, d: Inode, block: bytes | bytearray) -> bytes | bytearray:
    """A whole directory leaf of ``d`` as it is to be stored: (metadata_csum) its tail and
    checksum set over its entries (a bytearray given is set in place); else the block itself."""
    if not vol.sb.metadata_csum:
        return bytes(block)
    bs = vol.bs
    out = block if isinstance(block, bytearray) else bytearray(block)
    out[bs - 12:bs - 4] = DIR_TAIL
    seed = inode_seed(vol.sb.csum_seed, d.ino, d.generation)
    out[bs - 4:] = crc32c_raw(seed, bytes(memoryview(out)[:bs - 12])).to_bytes(4, "little")
    return out


def inline_dir_blocks(vol: Volume, node: Inode) -> Iterator[tuple[int, bytes | memoryview]]:
    """The regions of an inline directory as :func:`index_directory` reads them: ``.`` and
    ``..`` (from the parent stored in ``i_block``) with the entries of ``i_block``, then those
    of the ``system.data`` value."""
    m = node.map
    (_, n0, at0), (_, n1, at1) = m.pieces
    dev = vol.device
    head = bytes(dev.view(at0, n0))
    parent = _U32(head, 0)[0]
    dots = (_DOT_ENTRY.pack(node.ino, 12, 1, 2, b".") + _DOT_ENTRY.pack(parent, 12, 2, 2, b".."))
    yield 0, dots + head[4:]
    if n1:
        yield 1, dev.view(at1, n1)


def build_index(vol: Volume, node: Inode) -> DirIndex:
    bs = vol.bs
    where = f"directory inode {node.ino}"
    if node.flags & L.FL_INLINE_DATA and vol.inode_formats & L.FL_INLINE_DATA:
        index = index_directory(inline_dir_blocks(vol, node), bs, vol.inodes_count, vol.filetype, node.ino)
    elif node.size == 0 or node.size % bs:
        raise CorruptImageError(f"directory size {node.size} is not a multiple of the block size", where)
    else:
        index = index_directory(dir_blocks(vol, node), bs, vol.inodes_count, vol.filetype, node.ino)
    if is_casefolded(vol, node):
        try:
            check_casefold(vol, node)
        except OSError as exc:                # listed as ever; a lookup says why it cannot be
            index.entries = RefusedEntries(index.entries, exc)
        else:
            index.entries = FoldedEntries(index.entries, bool(vol.sb.s_encoding_flags & STRICT))
    if node.ino == L.ROOT_INO and index.parent != L.ROOT_INO:
        raise CorruptImageError(f"'..' of the root points to inode {index.parent}", where)
    if index.parent != node.ino:
        parent = vol.live_inode(index.parent, "..", where)
        if not parent.is_dir:
            raise CorruptImageError(f"'..' points to inode {index.parent}, not a directory", where)
    node._dir = index
    return index


#: An indexed directory of at least this many blocks is looked up through its htree while it is
#: not indexed in memory yet (a smaller one is read whole: that costs no more and serves later
#: lookups too).
HTREE_LOOKUP_BLOCKS = 8


def htree_lookup(vol: Volume, d: Inode, name: str) -> tuple[int, int] | None:
    """``(inode, file type)`` of ``name`` in indexed directory ``d``, found through its hash index
    (Linux's ``ext4_dx_find_entry``): a few blocks read, not the whole directory."""
    bs = vol.bs
    key = os.fsencode(name)
    sb = vol.sb
    m = d.map
    folded: bytes | None = None
    hashed = key
    if is_casefolded(vol, d):             # the hash is of the folded name (Linux ext4fs_dirhash)
        check_casefold(vol, d)
        folded = fold(key)
        if folded is None and sb.s_encoding_flags & STRICT:
            raise unfoldable(key)
        hashed = key if folded is None else folded
    seed = inode_seed(vol.csum_seed, d.ino, d.generation) if vol.verify else None
    dev = vol.device

    def read_block(lblk: int) -> memoryview:
        pblk = m.bmap(lblk)
        if not pblk:
            raise CorruptImageError(f"hole at block {lblk} of a directory", f"directory inode {d.ino}")
        return dev.view(pblk * bs, bs)

    nblocks = d.size // bs
    cache = d._dx
    if cache is None:
        cache = d._dx = {}
    for lblk in candidate_blocks(read_block, hashed, bs=bs, nblocks=nblocks, hash_seed=sb.s_hash_seed,
                                 s_flags=sb.s_flags, metadata_csum=sb.metadata_csum,
                                 large_dir=vol.large_dir, csum_seed=seed, ino=d.ino, cache=cache):
        buf = read_block(lblk)
        if seed is not None:
            verify_leaf(buf, seed, bs, d.ino, lblk, True)
        if hashed is not key:
            found = _scan_leaf_folded(buf, key, folded, vol, d.ino, lblk)
        else:
            found = _scan_leaf(buf, key, bs, vol, d.ino, lblk)
        if found is not None:
            return found
    return None


def _scan_leaf_folded(buf: memoryview, key: bytes, folded: bytes | None, vol: Volume, ino: int,
                      lblk: int) -> tuple[int, int] | None:
    """The first entry of a casefolded directory's leaf that Linux ``generic_ci_match`` takes for
    ``key``: the same bytes, or the same casefolded name (``folded``) when both are UTF-8."""
    try:
        live = leaf_entries(buf, dir_end(vol))
    except CorruptImageError as exc:
        raise CorruptImageError(f"htree leaf {lblk}: {exc.what} at {exc.where}",
                                f"directory inode {ino}") from None
    for name, child, ftype, _ in live:
        if name == key or (folded is not None and fold(name) == folded):
            if child > vol.inodes_count:
                raise CorruptImageError(f"entry points to inode {child} beyond the inode count",
                                        f"directory inode {ino}, block {lblk}")
            return child, ftype if vol.filetype else 0
    return None


def _scan_leaf(buf: memoryview, key: bytes, bs: int, vol: Volume, ino: int,
               lblk: int) -> tuple[int, int] | None:
    """The entry named ``key`` in one directory leaf: the name is found by ``bytes.find``, then
    the chain of ``rec_len`` is followed from the block's start to it (each step checked as
    when indexing), so a name left in the slack of a removed entry is never taken for one."""
    data = bytes(buf)
    n = len(key)
    i = data.find(key, 8)
    pos = 0
    while i >= 0:
        start = i - 8
        if not start & 3 and data[start + 6] == n:
            while pos < start:                  # the chain, from where it was left
                rec_len = data[pos + 4] | data[pos + 5] << 8
                if rec_len < 12 or rec_len & 3 or pos + rec_len > bs:
                    if bs == 65536 and rec_len in (0, 65535) and pos == 0:
                        rec_len = 65536
                    else:
                        raise CorruptImageError(_rec_len_problem(rec_len, data[pos + 6], pos, bs),
                                                _where(ino, lblk, pos))
                pos += rec_len
            if pos == start:
                child, rec_len, _, ftype = _DIRENT(data, start)
                if child and rec_len >= ((8 + n + 3) & ~3) and start + rec_len <= bs:
                    if child > vol.inodes_count:
                        raise CorruptImageError(f"entry points to inode {child} beyond the inode count",
                                                _where(ino, lblk, start))
                    return child, ftype if vol.filetype else 0
        i = data.find(key, i + 1)
    return None


# -- a full one-block directory becomes an htree ------------------------------------------------
def indexes_dirs(vol: Volume) -> bool:
    """Whether directories on ``vol`` get and keep an htree as they grow, as Linux ext4 does:
    dir_index on an ext4 image (extents or metadata_csum). ext2 drops indexes instead."""
    return vol.sb.has_compat(L.COMPAT_DIR_INDEX) and bool(vol.extents or vol.sb.metadata_csum)


#: Directories that stay linear: already indexed, inline, or hashed in ways xipfs does not.
_NOT_INDEXED = L.FL_INDEX | L.FL_INLINE_DATA | L.FL_ENCRYPT


def make_indexed_dir(vol: Volume, d: Inode, space: DirSpace) -> bool:
    """Turn one-block directory ``d``, full, into an htree as Linux ``make_indexed_dir`` does, so
    that it grows indexed: block 0 becomes the root (``.``, ``..``, dx_root_info), its entries
    split by hash into two new leaves (``do_split``). False, nothing changed, where Linux keeps
    the directory linear (no dir_index, not one block) or where xipfs cannot index it.

    The caller adds its name through the index after. Two stores once the leaves are written:
    the inode links them and takes the index flag, then block 0 becomes the root. Between the
    two every name is there twice under a root that is not one yet, which ``e2fsck -y``
    repairs without loss (as between the stores of a leaf split); any other instant is clean.
    """
    bs = vol.bs
    sb = vol.sb
    version = sb.s_def_hash_version
    if d.size != bs or d.flags & _NOT_INDEXED or not indexes_dirs(vol) or version > DX_HASH_TEA:
        return False
    pblk0 = _dblock0(vol, d, space)
    block0 = bytes(vol.device.view(pblk0 * bs, bs))
    end = dir_end(vol)
    dot, dot_rec, dot_len, _ = _DIRENT(block0, 0)
    dotdot, dotdot_rec, dotdot_len, _ = _DIRENT(block0, 12)
    if (dot != d.ino or dot_rec != 12 or dot_len != 1 or block0[8:9] != b"."
            or not dotdot or dotdot_len != 2 or block0[20:22] != b".."):
        return False
    live = leaf_entries(block0, end)[2:]
    if len(live) < 2:
        return False
    # Linux moves the entries after '..' to the start of a leaf, the last one's rec_len reaching
    # the leaf's end; then dx_make_map, dx_sort_map and do_split: the upper hashes move on.
    sizes = [e[3] for e in live]
    sizes[-1] += 12 + dotdot_rec
    name_hash = hasher(hash_version(version, sb.s_flags), sb.s_hash_seed)
    if is_casefolded(vol, d):                 # the folded names are hashed (ext4fs_dirhash)
        name_hash = folding(name_hash)
    kept, moved, hash2, continued = split_by_hash(live, sizes, name_hash, bs)
    leaf1 = pack_leaf(kept, end, bs)
    leaf2 = pack_leaf(moved, end, bs)
    if leaf1 is None or leaf2 is None:
        raise CorruptImageError("directory entries do not fit a leaf", f"directory inode {d.ino}")
    leaves = bytes(seal_leaf(vol, d, leaf1)) + bytes(seal_leaf(vol, d, leaf2))
    seed = inode_seed(sb.csum_seed, d.ino, d.generation) if sb.metadata_csum else None
    root = new_root(block0, bs, version, root_limit(bs, seed is not None), [hash2 + continued], [1, 2], seed)
    from . import data as D

    def fill(lblk: int, count: int, pblk: int) -> None:
        vol.device.write(leaves[(lblk - 1) * bs:(lblk - 1 + count) * bs], pblk * bs)
    if d.map.assign(1, 3, fill) < 2:
        D.set_size(vol, d, bs)
        D.drop_blocks(vol, d, 1)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    D.set_size(vol, d, 3 * bs)
    d.flags |= L.FL_INDEX
    vol.write_inode(d)                                  # 1. leaves linked, index on (names twice)
    vol.device.write(root, pblk0 * bs)                  # 2. block 0 is the root: a whole htree
    d._dx = None
    space.relearn(dir_blocks(vol, d))
    return True


def _dblock0(vol: Volume, d: Inode, space: DirSpace) -> int:
    pblk = space.device_blocks.get(0) or d.map.bmap(0)
    if not pblk:
        raise CorruptImageError("hole at block 0 of a directory", f"directory inode {d.ino}")
    return pblk
