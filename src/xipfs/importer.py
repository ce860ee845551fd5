"""Import Python code in place from ext2 images: a path hook, its finder and loader.

A ``sys.path`` entry that names an image, optionally followed by a directory inside it
(``/dev/shm/app.img/site-packages``, split the way ``zipimport`` splits ``app.zip/lib``), makes
the modules and packages in that directory importable with nothing extracted. Sources and
``__pycache__`` bytecode are read straight from the image; ``importlib.resources`` and
``importlib.metadata`` see data files and ``*.dist-info`` in it. Nothing is ever written to
the image (no ``.pyc`` writing).

    >>> import sys
    >>> from xipfs import importer
    >>> importer.install()                    # done by ``import xipfs`` too
    >>> sys.path.insert(0, "/dev/shm/app.img/site-packages")
    >>> import tqdm                           # tqdm.__file__ points into the image

Each image is opened once per process (read-only) and shared by every finder on it;
``importlib.invalidate_caches()`` drops the directory listings and notices a changed image.
Plain files and directories are read here, with ``pread``, by a lean reader that imports
nothing (a miss is a dictionary lookup, a module one ``pread`` of its ``.pyc``); the format
layer is loaded only for what needs it (a symlink, inline data, resources opened as files, an
image needing journal recovery or using meta_bg, encryption or casefold).

Limits: the interpreter's built-in traceback printer (``sys.excepthook``, Python 3.11, 3.12) reads
source lines from real files only, so an uncaught exception shows no source lines for frames
in an image (``traceback`` and ``inspect`` do show them, through the loader's
``get_source``); ``importlib.resources`` cannot read a *namespace* package spread over an
image (Python's namespace reader wants real directories); an extension module is copied into
a memory file to be loaded, and the shared libraries it finds through ``$ORIGIN`` are not.
"""

from __future__ import annotations

import _frozen_importlib_external as _bx  # the loaders' shared logic, always loaded
import _imp
import errno
import io
import os
import posixpath
import stat
import sys
from _frozen_importlib import ModuleSpec, _call_with_frames_removed  # always loaded
from _thread import RLock, allocate_lock

from .errors import CorruptImageError, XipfsError, fs_error

# ``typing``, ``threading``, ``contextlib``, ``struct`` and the format layer cost more to import
# than a small package takes to import from an image: none is imported here.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterator
    from typing import Any

# The format layer is imported when something beyond plain files and directories is needed
# (a symlink, inline data, resources opened as files, an unusual image): ``_Image.fs``.
read_bytes: Any = None
resolve: Any = None


_loading = 0


class _Loading:
    """The context of :func:`loading`."""

    def __enter__(self) -> None:
        global _loading
        _loading += 1

    def __exit__(self, *exc: object) -> None:
        global _loading
        _loading -= 1
        if not _loading:
            _forget_declined_entries()


def _forget_declined_entries() -> None:
    """Drop the ``sys.path_importer_cache`` entries that remember an image entry as
    unimportable (None): the hook declined it while xipfs loaded, or was not installed yet."""
    for entry, finder in list(sys.path_importer_cache.items()):
        if finder is None and isinstance(entry, str) and find_image(entry) is not None:
            sys.path_importer_cache.pop(entry, None)


def loading() -> _Loading:
    """While xipfs imports its own modules: :func:`path_hook` declines image entries (those
    imports walk ``sys.path``, which may hold one, and the hook would need the very modules being
    imported), and the None that leaves in ``sys.path_importer_cache`` is dropped after, as
    :func:`install` drops it."""
    return _Loading()


def _load_format() -> None:
    """Import what reading an image needs and bind the few functions the loaders call (the
    first use of the format layer does this, outside every lock of this module)."""
    global read_bytes, resolve
    with loading():
        from .device.memory import MemoryDevice  # noqa: F401 - imported here, used by _Image
        from .extfs.data import read_bytes
        from .extfs.namei import resolve
        from .fs import Filesystem  # noqa: F401 - imported here, used by _Image

__all__ = [
    "ImageResourceReader",
    "ImageTraversable",
    "XipLoader",
    "XipMetadataFinder",
    "XipPathFinder",
    "entry_path",
    "find_image",
    "install",
    "invalidate_caches",
    "path_hook",
    "run_module",
    "uninstall",
]

_EXT2_MAGIC = b"\x53\xef"
_EXT2_MAGIC_AT = 1024 + 56          # s_magic in the superblock
_SUPERBLOCK = (1024, 1024)          # (offset, size): compared to notice a changed image
_FT_REG, _FT_DIR = 1, 2
#: FileFinder's order: extension modules (None), then source (True), then sourceless bytecode.
_SUFFIXES = (*((s, None) for s in _imp.extension_suffixes()), (".py", True), (".pyc", False))
_INITS = tuple(("__init__" + suffix, source) for suffix, source in _SUFFIXES)
#: The listing of what is not a directory (missing, a file): no module there, and a name under
#: it is not "missing from a directory" but an error the format layer names exactly.
_NOT_DIR: dict[str, tuple[int, int]] = {}
_TAG = sys.implementation.cache_tag
_MAGIC_WORD = int.from_bytes(_bx.MAGIC_NUMBER, sys.byteorder)
_NO_PYC = (None,) * 4


# -- the import path's own reader -----------------------------------------------------------------
class _Decline(Exception):
    """The lean reader leaves this to the format layer (a symlink, inline data, an odd image)."""


#: Incompatible features the lean reader reads: filetype, extents, 64bit, mmp, flex_bg,
#: ea_inode, csum_seed, largedir, inline_data (an inline inode is declined on its own). Any other
#: (compression, needs_recovery, journal_dev, meta_bg, dirdata, encrypt, casefold) is left to the
#: format layer, which replays, refuses or handles it.
_LEAN_INCOMPAT = 0x2 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x2000 | 0x4000 | 0x8000
_INCOMPAT_FILETYPE, _INCOMPAT_64BIT = 0x2, 0x80
_EXTENTS_FL, _INLINE_DATA_FL, _ENCRYPT_FL = 0x80000, 0x10000000, 0x800
_EXTENT_MAGIC = 0xF30A
_NOT_BLOCK_MAPPED = _EXTENTS_FL | _INLINE_DATA_FL | _ENCRYPT_FL
_LITTLE = sys.byteorder == "little"           # the reader decodes through native 32-bit views
_ONE_LEAF = _EXTENT_MAGIC | 1 << 16               # an extent header with one entry
#: A decoded inode: ``(mode, size, flags, mtime seconds, mtime nanoseconds, i_block words)``.
_Node = tuple
_ROOT_INO = 2


class _Reader:
    """The least of ext2/ext3/ext4 an import needs, read with ``pread`` from the image file:
    directory listings and regular files by inode number, and a source's mtime and size.

    Opening costs nothing beyond the superblock already read to recognise the image; a group
    descriptor, an inode-table block or an extent block is read the first time it is needed
    and kept, and decoded through 32-bit views (no per-field slicing). Checksums are not
    verified (the format layer does; ``zipimport`` leaves CRCs unchecked too); every number is
    range-checked, so a damaged image raises CorruptImageError, never an IndexError or a hang.
    Anything else raises :class:`_Decline` and is done by the format layer.
    """

    def __init__(self, fd: int, sb: bytes, file_size: int) -> None:
        if not _LITTLE or len(sb) < 1024 or sb[56:58] != _EXT2_MAGIC:
            raise _Decline
        w = memoryview(sb).cast("I")              # the superblock as 32-bit words
        incompat = w[24]
        if incompat & ~_LEAN_INCOMPAT:
            raise _Decline
        log = w[6]
        if log > 6:
            raise _Decline
        self.bs = bs = 1024 << log
        self.inodes_count = w[0]
        blocks = w[1]
        wide = bool(incompat & _INCOMPAT_64BIT)
        if wide:
            blocks |= w[84] << 32                 # s_blocks_count_hi
        self.blocks = min(blocks, file_size // bs) if file_size else blocks
        self.ipg = w[10]
        self.isize = isize = w[22] & 0xFFFF if w[19] else 128      # s_inode_size if s_rev_level
        desc = w[63] >> 16 if wide else 32        # s_desc_size
        if (not self.ipg or isize < 128 or isize > bs or isize & (isize - 1)
                or desc < 32 or desc > 1024 or desc & (desc - 1)):
            raise _Decline
        self.desc = desc
        self.gdt = (w[5] + 1) * bs                # the group descriptors follow the superblock
        self.filetype = bool(incompat & _INCOMPAT_FILETYPE)
        self.extra = isize > 128                  # inodes with i_extra_isize (nanosecond times)
        self._tables: dict[int, int] = {}         # group -> first block of its inode table
        self._itable: dict[int, Any] = {}         # block -> that inode-table block as 32-bit words
        self._inodes: dict[int, _Node] = {}
        self.fd = fd                              # owned from here on: closed with the reader

    def __del__(self) -> None:
        fd = getattr(self, "fd", -1)
        if fd >= 0 and os is not None:
            self.fd = -1
            os.close(fd)

    def forget(self) -> None:
        """Drop what was read (the image may have been written since)."""
        self._tables = {}
        self._itable = {}
        self._inodes = {}

    def _pread(self, length: int, block: int, what: str, number: int) -> bytes:
        """``length`` bytes at block ``block``; CorruptImageError where they lie past the image
        (``what`` and ``number`` name them: "the data of inode", 12)."""
        if block * self.bs + length <= self.blocks * self.bs:
            data = os.pread(self.fd, length, block * self.bs)
            if len(data) == length:
                return data
        raise CorruptImageError(f"{what} {number} at block {block} lies past the end of the image")

    def _words(self, block: int, what: str, number: int) -> Any:
        """Block ``block`` as little-endian 32-bit words."""
        return memoryview(self._pread(self.bs, block, what, number)).cast("I")

    def _table(self, group: int) -> int:
        table = self._tables.get(group)
        if table is None:
            raw = os.pread(self.fd, self.desc, self.gdt + group * self.desc)
            if len(raw) != self.desc:
                raise CorruptImageError(f"the descriptor of group {group} lies past the end of the image")
            words = memoryview(raw).cast("I")
            table = words[2]                      # bg_inode_table, and its high half in 64-byte ones
            if self.desc >= 64:
                table |= words[10] << 32
            self._tables[group] = table
        return table

    def inode(self, ino: int) -> _Node:
        """``(mode, size, flags, mtime seconds, mtime nanoseconds, i_block as 15 words)`` of a
        live inode."""
        node = self._inodes.get(ino)
        if node is not None:
            return node
        if not 0 < ino <= self.inodes_count:
            raise CorruptImageError(f"inode number {ino} is out of range (1..{self.inodes_count})")
        group, index = divmod(ino - 1, self.ipg)
        block, offset = divmod(self._table(group) * self.bs + index * self.isize, self.bs)
        w = self._itable.get(block)
        if w is None:
            w = self._itable[block] = self._words(block, "the inode table of group", group)
        at = offset >> 2
        head = w[at]
        mode = head & 0xFFFF
        if w[at + 6] >> 16 == 0 and (mode == 0 or w[at + 5]):    # no links, and deleted or never used
            raise CorruptImageError(f"a directory entry points to deleted inode {ino}")
        secs = w[at + 4]
        if secs >= 0x80000000:
            secs -= 0x100000000
        nsec = 0
        if self.extra and w[at + 32] & 0xFFFF >= 12:           # i_extra_isize covers i_mtime_extra
            extra = w[at + 34]
            secs += (extra & 3) << 32
            nsec = extra >> 2
        node = (mode, w[at + 1] | w[at + 27] << 32, w[at + 8], secs, nsec, w[at + 10:at + 25])
        self._inodes[ino] = node
        return node

    # -- block maps -------------------------------------------------------------------------
    def _runs(self, ino: int, node: _Node) -> list[tuple[int, int, int]]:
        """``(file block, count, image block or -1 for zeros)`` runs of the inode's data."""
        flags = node[2]
        if flags & (_INLINE_DATA_FL | _ENCRYPT_FL):
            raise _Decline
        if flags & _EXTENTS_FL:
            runs: list[tuple[int, int, int]] = []
            self._extents(node[5], 5, runs, ino)
            return runs
        return self._indirect(node[5], -(-node[1] // self.bs), ino)

    def _extents(self, w: Any, depth_left: int, runs: list[tuple[int, int, int]], ino: int) -> None:
        """Collect the runs of the extent node ``w`` (32-bit words: header, then 3 per entry)."""
        head = w[0]
        count, depth = head >> 16, w[1] >> 16
        if head & 0xFFFF != _EXTENT_MAGIC:
            raise CorruptImageError("bad extent header magic", f"inode {ino}")
        if depth > depth_left or 3 + 3 * count > len(w):
            raise CorruptImageError("bad extent header (depth or entry count)", f"inode {ino}")
        for at in range(3, 3 + 3 * count, 3):
            if depth == 0:
                length = w[at + 1] & 0xFFFF
                start = (w[at + 1] >> 16) << 32 | w[at + 2]
                if length > 32768:                  # unwritten: reads as zeros
                    runs.append((w[at], length - 32768, -1))
                else:
                    runs.append((w[at], length, start))
            else:
                child = (w[at + 2] & 0xFFFF) << 32 | w[at + 1]
                self._extents(self._words(child, "an extent block of inode", ino), depth - 1, runs, ino)

    def _indirect(self, iblock: Any, nblocks: int, ino: int) -> list[tuple[int, int, int]]:
        ptrs = iblock[:min(12, nblocks)].tolist()
        per = self.bs // 4
        todo = nblocks - len(ptrs)
        for level in (1, 2, 3):
            if todo <= 0:
                break
            got = self._tree(iblock[11 + level], level, min(todo, per ** level), ino)
            ptrs += got
            todo -= len(got)
        runs: list[tuple[int, int, int]] = []
        for lblk, blk in enumerate(ptrs):
            start = blk or -1
            if runs:
                first, count, where = runs[-1]
                if (where + count == start if where >= 0 else start == -1):
                    runs[-1] = (first, count + 1, where)
                    continue
            runs.append((lblk, 1, start))
        return runs

    def _tree(self, block: int, level: int, want: int, ino: int) -> list[int]:
        """The first ``want`` pointers below indirect block ``block`` of depth ``level``."""
        if block == 0:
            return [0] * want
        w = self._words(block, "an indirect block of inode", ino)
        if level == 1:
            return w[:want].tolist()
        span = (self.bs // 4) ** (level - 1)
        out: list[int] = []
        for ptr in w[:-(-want // span)].tolist():
            out += self._tree(ptr, level - 1, min(span, want - len(out)), ino)
        return out

    # -- what the importer asks ---------------------------------------------------------------
    def data(self, ino: int, node: _Node | None = None) -> bytes | bytearray:
        """The content of inode ``ino``: one ``pread`` for a file stored in one run, and one
        ``preadv`` for the usual ext2 layout of a larger one (a bytearray then)."""
        if node is None:
            node = self.inode(ino)
        size = node[1]
        if size == 0:
            return b""
        bs = self.bs
        if size > self.blocks * bs:          # damaged, or sparse beyond reason for a module
            raise CorruptImageError(f"size {size} is more than the whole image holds "
                                    f"({self.blocks * bs} bytes)", f"inode {ino}")
        flags = node[2]
        iblock = node[5]
        if not flags & _NOT_BLOCK_MAPPED:
            if size <= bs * 12:                      # direct blocks only: one run, nearly always
                first = iblock[0]
                last = (size - 1) // bs
                if first and iblock[last] == first + last and iblock[:last + 1].tolist() == list(
                        range(first, first + last + 1)):
                    return self._pread(size, first, "the data of inode", ino)
            elif size <= bs * (12 + bs // 4):
                out = self._ext2_span(iblock, size)
                if out is not None:
                    return out
        elif flags & _EXTENTS_FL and not flags & (_INLINE_DATA_FL | _ENCRYPT_FL):
            head = iblock[0]
            if head == _ONE_LEAF and iblock[3] == 0 and (iblock[1] >> 16) == 0:   # one extent from 0
                length = iblock[4] & 0xFFFF
                if length <= 32768 and length * bs >= size:
                    return self._pread(size, (iblock[4] >> 16) << 32 | iblock[5], "the data of inode", ino)
        runs = self._runs(ino, node)
        out = bytearray(size)
        view = memoryview(out)
        for first, count, where in runs:
            at = first * bs
            if where < 0 or at >= size:
                continue
            length = min(count * bs, size - at)
            part = view[at:at + length]
            if where + count > self.blocks or os.preadv(self.fd, [part], where * bs) != length:
                raise CorruptImageError(f"the data of inode {ino} at block {where} lies past the end of "
                                        "the image")
        return out

    def _ext2_span(self, iblock: Any, size: int) -> bytearray | None:
        """A file of 13 to 12 + bs/4 blocks laid out as ``mke2fs -d`` lays it (12 data blocks,
        the indirect block, the rest of the data, all in a row) read by one ``preadv`` that puts
        the indirect block aside and checks it afterwards; None for any other layout."""
        first = iblock[0]
        bs = self.bs
        blocks = -(-size // bs)
        if (not first or iblock[12] != first + 12 or first + blocks + 1 > self.blocks
                or iblock[:12].tolist() != list(range(first, first + 12))):
            return None
        out = bytearray(size)
        view = memoryview(out)
        pointers = bytearray(bs)
        if os.preadv(self.fd, [view[:12 * bs], pointers, view[12 * bs:]], first * bs) != size + bs:
            return None
        rest = blocks - 12
        if memoryview(pointers).cast("I")[:rest].tolist() != list(range(first + 13, first + 13 + rest)):
            return None
        return out

    def file(self, ino: int) -> _Node:
        """The inode of a regular file (a symlink or anything else is declined)."""
        node = self.inode(ino)
        if node[0] & 0xF000 != 0x8000:
            raise _Decline
        return node

    def listing(self, ino: int) -> dict[str, tuple[int, int]]:
        """``{name: (inode, file type)}`` of directory ``ino``, without ``.`` and ``..``."""
        node = self.inode(ino)
        if node[0] & 0xF000 != 0x4000:
            raise _Decline
        raw = self.data(ino, node)
        bs = self.bs
        if len(raw) % bs:
            raise CorruptImageError("directory size is not a whole number of blocks", f"inode {ino}")
        w = memoryview(raw).cast("I")
        text = str(raw, "latin-1")                # names sliced from one decoded copy
        mask = 0xFF if self.filetype else 0xFFFF  # name_len is 8 bits when file types follow it
        entries: dict[str, tuple[int, int]] = {}
        try:
            for base in range(0, len(raw), bs):
                pos, end = base, base + bs
                while pos < end:
                    word = w[(pos >> 2) + 1]          # rec_len, name_len, file type
                    rec_len = word & 0xFFFF
                    name_len = (word >> 16) & mask
                    if rec_len < 8 or rec_len & 3 or pos + rec_len > end or name_len + 8 > rec_len:
                        rec_len = _odd_entry(rec_len, name_len, pos, base, bs, ino)
                    child = w[pos >> 2]
                    if child:
                        entries[text[pos + 8:pos + 8 + name_len]] = (child, word >> 24)
                    pos += rec_len
        except IndexError:
            raise CorruptImageError("a directory entry header crosses the end of the directory",
                                    f"inode {ino}") from None
        if entries:
            top = max(entries.values())[0]
            if top > self.inodes_count:
                raise CorruptImageError(f"directory entry names inode {top}, past the last "
                                        f"({self.inodes_count})", f"inode {ino}")
        entries.pop(".", None)
        entries.pop("..", None)
        if entries:
            if not self.filetype:
                entries = {name: (entry[0], 0) for name, entry in entries.items()}
            if not "".join(entries).isascii():        # UTF-8 names, as os.listdir decodes them
                entries = {name.encode("latin-1").decode("utf-8", "surrogateescape"): entry
                           for name, entry in entries.items()}
        return entries


def _odd_entry(rec_len: int, name_len: int, pos: int, base: int, bs: int, ino: int) -> int:
    """The rec_len of an entry that fails the quick checks: a 64 KiB block's whole-block entry
    (rec_len written as 0 or 65535), or CorruptImageError."""
    if bs == 65536 and rec_len in (0, 65535) and pos == base and name_len + 8 <= bs:
        return bs
    raise CorruptImageError(f"bad directory entry at byte {pos - base} of block {base // bs} "
                            f"(rec_len {rec_len}, name_len {name_len})", f"inode {ino}")


# -- images: opened once per process ----------------------------------------------------------
class _Image:
    """One image file, opened read-only once and shared by every finder and loader on it.

    Directory listings are kept per directory (``{name: (inode, file type)}``), so a finder,
    the loaders of its modules and their ``__pycache__`` each cost one directory read. Plain
    files and directories are read by the lean :class:`_Reader` (``pread``, nothing else
    imported); the full :class:`~xipfs.fs.Filesystem` (``fs``) is opened the first time
    something else is needed: a symlink, inline data, resources opened as files.
    """

    def __init__(self, real: str, probe: _Probe | None = None) -> None:
        self.real = real
        #: Serialises the uses of the format layer (the volume's caches are plain dicts).
        self.lock = RLock()
        self._fs: Any = None
        self.reader: _Reader | None = None
        self._signature: tuple[Any, ...] | None = None
        self._dirs: dict[str, dict[str, tuple[int, int]]] = {}
        self._open(probe)

    @property
    def key(self) -> tuple[int, int]:
        """``(st_dev, st_ino)`` of the image file: what the process-wide registry knows it by."""
        assert self._signature is not None
        return self._signature[0], self._signature[1]

    def _open(self, probe: _Probe | None = None) -> None:
        """Start reading the image (the descriptor of ``probe`` is kept: no second open)."""
        if probe is None:
            probe = _probe(self.real)
        fd, signature = probe
        try:
            reader: _Reader | None = _Reader(fd, signature[4], signature[2])
        except _Decline:
            reader = None
        self.reader = reader                     # the old reader closes with its last user
        self._dirs = {}
        self._signature = signature
        self._fs = None                          # the old Filesystem goes with its last user
        if reader is None:                       # the format layer reads it (``fs``, on first use)
            os.close(fd)

    @property
    def fs(self) -> Any:
        """The image opened read-only by the format layer (on first use)."""
        fs = self._fs
        if fs is None:
            if resolve is None:
                _load_format()
            with self.lock:
                fs = self._fs
                if fs is None:
                    fs = self._fs = _open_fs(self.real)
        return fs

    def refresh(self, forget: bool = True, probe: _Probe | None = None) -> None:
        """Reopen the image when its file or superblock changed; else, with ``forget``, drop
        what was read (listings, inodes) so that changes made through a mapping show.

        ``probe`` is the image file already opened (and is consumed): no second open."""
        with self.lock:
            if probe is None:
                try:
                    probe = _probe(self.real)
                except OSError:
                    return              # gone: keep serving what is mapped, as an open file does
            if probe[1] != self._signature:
                self._open(probe)
                return
            os.close(probe[0])
            if forget:
                self._dirs = {}
                if self.reader is not None:
                    self.reader.forget()
                if self._fs is not None:
                    self._fs.volume.forget_cached()

    # -- reading, through the cached listings -------------------------------------------------
    def entries(self, directory: str) -> dict[str, tuple[int, int]]:
        """``{name: (inode, file type)}`` of ``directory`` (absolute in the image); {} if it is none."""
        listing = self._dirs.get(directory)
        if listing is None:
            listing = self._dirs[directory] = self._list(directory)
        return listing

    def _list(self, directory: str) -> dict[str, tuple[int, int]]:
        reader = self.reader
        if reader is not None:
            try:
                if directory == "/":
                    return reader.listing(_ROOT_INO)
                head, _, name = directory.rpartition("/")
                if name and name != "." and name != "..":
                    entry = self.entries(head or "/").get(name)
                    if entry is None:
                        return _NOT_DIR
                    if entry[1] == _FT_DIR or entry[1] == 0:
                        return reader.listing(entry[0])
                    if entry[1] == _FT_REG:
                        return _NOT_DIR
            except _Decline:
                pass
        with self.lock:
            vol = self.fs.volume
            try:
                node = resolve(vol, directory, True)
                return vol.dir_index(node).entries if node.is_dir else _NOT_DIR
            except XipfsError:
                raise
            except OSError:
                return _NOT_DIR

    def kind(self, path: str) -> str:
        """"d" (directory), "f" (regular file) or "" (anything else, or nothing) at ``path``."""
        head, _, name = path.rpartition("/")
        entry = self.entries(head or "/").get(name)
        if entry is None:
            return ""
        return self.entry_kind(entry, path)

    def entry_kind(self, entry: tuple[int, int], path: str) -> str:
        """:meth:`kind` of ``path`` whose entry in its directory's listing is ``entry``."""
        ftype = entry[1]
        if ftype == _FT_REG:
            return "f"
        if ftype == _FT_DIR:
            return "d"
        reader = self.reader
        if reader is not None:              # an image without file types, or a symlink
            mode = reader.inode(entry[0])[0]
            if not stat.S_ISLNK(mode):
                return "d" if stat.S_ISDIR(mode) else "f" if stat.S_ISREG(mode) else ""
        with self.lock:
            try:
                mode = self.fs.stat(path).st_mode
            except XipfsError:
                raise
            except OSError:
                return ""
        return "d" if stat.S_ISDIR(mode) else "f" if stat.S_ISREG(mode) else ""

    def _lean(self, path: str) -> tuple[int, tuple[int, int, int, int, int, bytes]] | None:
        """``(inode number, inode)`` of regular file ``path`` by the lean reader, None where the
        format layer must answer; FileNotFoundError for a name missing from a directory."""
        reader = self.reader
        if reader is None:
            return None
        head, _, name = path.rpartition("/")
        listing = self._dirs.get(head or "/")
        if listing is None:
            listing = self.entries(head or "/")
        entry = listing.get(name)
        if entry is None:
            if listing is _NOT_DIR or not name or name == "." or name == "..":
                return None
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        try:
            return entry[0], reader.file(entry[0])
        except _Decline:
            return None

    def file(self, path: str) -> Any:
        """The format layer's inode of regular file ``path``; the ``OSError`` that ``os`` raises
        where there is none."""
        with self.lock:
            vol = self.fs.volume
            node = resolve(vol, path, True)
            if not node.is_reg:
                raise fs_error(errno.EISDIR if node.is_dir else errno.ENXIO, path)
            return node

    def read(self, path: str) -> bytes:
        """The content of regular file ``path`` in the image (one ``pread`` for nearly every file)."""
        lean = self._lean(path)
        if lean is not None:
            try:
                data = self.reader.data(*lean)      # type: ignore[union-attr]
            except _Decline:
                pass
            else:
                return data if type(data) is bytes else bytes(data)
        node = self.file(path)
        with self.lock:
            return read_bytes(self.fs.volume, node, 0, node.size)

    def mtime_size(self, path: str) -> tuple[float, int]:
        """``(st_mtime, st_size)`` of regular file ``path``, ``st_mtime`` computed as ``os.stat`` does."""
        lean = self._lean(path)
        if lean is not None:
            node = lean[1]
            return node[3] + node[4] * 1e-9, node[1]
        node = self.file(path)
        sec, nsec = divmod(node.mtime_ns, 1_000_000_000)
        return sec + nsec * 1e-9, node.size

    def bytecode(self, directory: str, source: str, cached: str) -> tuple[bytes, int, int] | None:
        """``(pyc bytes, source mtime in seconds, source size)`` for source file ``source`` of
        ``directory`` and ``__pycache__/cached`` beside it; None when either is not a plain
        file the lean reader reads (the caller then takes the general path)."""
        reader = self.reader
        if reader is None:
            return None
        entry = self.entries(directory).get(source)
        pyc = self.entries(directory + "/__pycache__" if directory != "/" else "/__pycache__").get(cached)
        if entry is None or pyc is None:
            return None
        try:
            node = reader.file(entry[0])
            data = reader.data(pyc[0], reader.file(pyc[0]))
        except _Decline:
            return None
        return data, node[3], node[1]


def _open_fs(real: str) -> Any:
    """The image file ``real`` opened read-only by the format layer, mapped whatever the storage."""
    from .device.memory import MemoryDevice
    from .fs import Filesystem
    from .fs import open as open_fs
    fd, signature = _probe(real)
    try:
        device = MemoryDevice.from_fd(fd, size=signature[2] or None, readonly=True, name=real, kind="image")
    except (OSError, ValueError):   # from_fd has closed fd
        return open_fs(real, "r")
    return Filesystem(device, "r")


#: An image file opened for reading: ``(descriptor, signature)``.
_Probe = tuple


def _signature(path: str, fd: int | None = None) -> tuple[Any, ...]:
    """What tells that an image changed: its identity, size, mtime and superblock bytes
    (of the file ``path`` names now, or of the open descriptor ``fd``)."""
    own = fd is None
    if own:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)   # a FIFO must not block
    try:
        return _fd_signature(fd)
    finally:
        if own:
            os.close(fd)


def _fd_signature(fd: int) -> tuple[Any, ...]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, os.pread(fd, _SUPERBLOCK[1], _SUPERBLOCK[0])


def _probe(path: str, st: os.stat_result | None = None) -> _Probe:
    """Open the file ``path`` for reading and take its signature (the caller owns the descriptor);
    ``st`` is its ``os.stat`` just taken, if any (no ``fstat`` then)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)   # a FIFO must not block
    try:
        if st is None:
            return fd, _fd_signature(fd)
        return fd, (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                    os.pread(fd, _SUPERBLOCK[1], _SUPERBLOCK[0]))
    except BaseException:
        os.close(fd)
        raise


def _is_ext2_signature(signature: tuple[Any, ...]) -> bool:
    sb = signature[4]
    return sb[_EXT2_MAGIC_AT - _SUPERBLOCK[0]:_EXT2_MAGIC_AT - _SUPERBLOCK[0] + 2] == _EXT2_MAGIC


#: The images opened in this process, by ``(st_dev, st_ino)`` of the image file.
_images: dict[tuple[int, int], _Image] = {}
_images_lock = allocate_lock()


def _image(path: str, probe: _Probe | None = None) -> _Image:
    """The shared :class:`_Image` of the image file ``path`` (one per file, whatever names it).

    ``probe`` is the file already opened (consumed); a known image is checked for changes with it.
    """
    if probe is None:
        probe = _probe(path)
    key = probe[1][0], probe[1][1]
    with _images_lock:
        image = _images.get(key)
        if image is None:
            image = _images[key] = _Image(path, probe)
            return image
    image.refresh(forget=False, probe=probe)    # a new path entry: notice an image changed in place
    _register(image)
    return image


def _register(image: _Image) -> None:
    """Know ``image`` by its file's current identity (which a reopen may have changed)."""
    with _images_lock:
        _images.setdefault(image.key, image)


def _reset_locks_after_fork() -> None:
    global _images_lock
    _images_lock = allocate_lock()
    for image in _images.values():
        image.lock = RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_locks_after_fork)


# -- which path entries are images ------------------------------------------------------------
def _ext2_probe(path: str, st: os.stat_result | None = None) -> _Probe | None:
    """The regular file ``path`` (whose ``os.stat`` is ``st``) opened with its signature when it
    carries the ext2 superblock magic (the caller then owns the descriptor), else None."""
    try:
        probe = _probe(path, st)
    except OSError:
        return None
    if _is_ext2_signature(probe[1]):
        return probe
    os.close(probe[0])
    return None


def _shm_file(name: str) -> str | None:
    """``/dev/shm/NAME`` for a path ``/NAME`` that looks like a POSIX shared-memory name."""
    if len(name) > 1 and name[0] == "/" and "/" not in name[1:]:
        return "/dev/shm" + name
    return None


def find_image(entry: str) -> tuple[str, str, str] | None:
    """Split a path entry into ``(image as named, image file, directory inside)``, or None.

    Walks up ``entry`` as ``zipimport`` does until a prefix exists: it must be a regular file
    that is an ext2 image (or a ``/NAME`` that exists only as the shared-memory object
    ``/dev/shm/NAME``); the rest is the directory inside, ``""`` for the root.
    """
    found = _locate(entry)
    if found is None:
        return None
    os.close(found[3][0])
    return found[:3]


def _is_clean_absolute(path: str) -> bool:
    """True when ``os.path.abspath(path)`` is ``path`` (most entries): no call needed."""
    return path[:1] == "/" and path[-1:] != "/" and "//" not in path and "/." not in path


def _locate(entry: str) -> tuple[str, str, str, _Probe] | None:
    """:func:`find_image` and the image file opened (the caller owns its descriptor)."""
    path = entry if _is_clean_absolute(entry) else os.path.abspath(entry) if entry else os.getcwd()
    rest: list[str] = []
    while True:
        try:
            st = os.stat(path)
        except (OSError, ValueError):
            shm = _shm_file(path)
            if shm is not None:
                try:
                    shm_st = os.stat(shm)
                    probe = _ext2_probe(shm, shm_st) if stat.S_ISREG(shm_st.st_mode) else None
                except OSError:
                    probe = None
                if probe is not None:
                    return path, shm, "/".join(reversed(rest)), probe
            head, _, tail = path.rpartition("/")     # os.path.split of a normalised path
            if not tail:
                return None
            rest.append(tail)
            path = head or "/"
            continue
        probe = _ext2_probe(path, st) if stat.S_ISREG(st.st_mode) else None
        if probe is None:
            return None
        return path, path, "/".join(reversed(rest)), probe


#: Images found through path entries, by the name the entries give them: a package's
#: ``__path__`` entry inside a known image costs no system call (dropped by invalidate_caches).
_known: dict[str, _Image] = {}


def _known_image(path: str) -> tuple[str, _Image, str] | None:
    """``(image as named, image, directory inside)`` when absolute ``path`` is in a known image."""
    for named, image in _known.items():
        if path.startswith(named) and (len(path) == len(named) or path[len(named)] == "/"):
            return named, image, path[len(named):].strip("/")
    return None


def path_hook(entry: str) -> XipPathFinder:
    """The ``sys.path_hooks`` callable: a finder for an image entry, ImportError for anything else."""
    if not isinstance(entry, str):
        raise ImportError("not an ext2 image path")
    if _loading:                        # our own first imports walk sys.path: not now
        raise ImportError("xipfs is loading its reader", path=entry)
    if _known:
        hit = _known_image(entry if _is_clean_absolute(entry) else os.path.abspath(entry) if entry
                           else os.getcwd())
        if hit is not None:
            named, image, inner = hit
            return XipPathFinder(image, named, inner)
    found = _locate(entry)
    if found is None:
        raise ImportError("not an ext2 image path", path=entry)
    named, real, inner, probe = found
    try:
        image = _image(real, probe)
        if image.reader is None:
            image.fs                    # noqa: B018 - the format layer reads this one: open it now
    except OSError as err:
        raise ImportError(f"cannot open ext2 image {named!r}: {err}", path=entry) from err
    _known[named] = image
    return XipPathFinder(image, named, inner)


path_hook.__xipfs_hook__ = True  # type: ignore[attr-defined]


# -- the finder ---------------------------------------------------------------------------------
class XipPathFinder:
    """Finds modules in one directory of an image (``importlib.abc.PathEntryFinder`` protocol).

    The directory is listed once (like ``FileFinder``) and the listing kept until
    :meth:`invalidate_caches`.
    """

    def __init__(self, image: _Image, named: str, inner: str) -> None:
        self._image = image
        self.image = named                        # the image as the path entry names it
        self.inner = "/" + inner.strip("/")        # the directory inside, absolute in the image
        self.path = named + self.inner.rstrip("/")  # the directory as a path entry
        self._prefix = self.inner.rstrip("/") + "/"  # what names in the directory start with

    def __repr__(self) -> str:
        return f"XipPathFinder({self.path!r})"

    def _join(self, name: str) -> str:
        return self._prefix + name

    # -- the PathEntryFinder protocol -------------------------------------------------------
    def find_spec(self, fullname: str, target: object = None) -> ModuleSpec | None:
        """A spec for ``fullname`` in this directory: package, module, namespace portion or None.

        The order is ``FileFinder``'s: a directory with ``__init__`` is a package; else a module
        file (an extension module, ``NAME.py``, or a sourceless ``NAME.pyc``); else the
        directory is a portion of a namespace package (a spec with no loader and
        ``submodule_search_locations``).
        """
        tail = fullname.rpartition(".")[2]
        image = self._image
        entries = image._dirs.get(self.inner)
        if entries is None:
            entries = image.entries(self.inner)
        prefix = self._prefix
        namespace = None
        entry = entries.get(tail)
        if entry is not None and image.entry_kind(entry, prefix + tail) == "d":
            base = prefix + tail
            inside = image.entries(base)
            for name, source in _INITS:
                entry = inside.get(name)
                if entry is not None and image.entry_kind(entry, f"{base}/{name}") == "f":
                    return self._spec(fullname, f"{base}/{name}", source, base)
            namespace = base
        for suffix, source in _SUFFIXES:
            name = tail + suffix
            entry = entries.get(name)
            if entry is not None and image.entry_kind(entry, prefix + name) == "f":
                return self._spec(fullname, prefix + name, source, None)
        if namespace is not None:
            spec = ModuleSpec(fullname, None)
            spec.submodule_search_locations = [self.image + namespace]
            return spec
        return None

    def _spec(self, fullname: str, inner: str, source: bool | None, package: str | None) -> ModuleSpec:
        origin = self.image + inner
        if source is None:
            loader: Any = _ExtensionLoader(self._image, self.image, fullname, origin)
        else:
            cls = XipLoader if source else _SourcelessLoader
            loader = cls(self._image, self.image, fullname, origin, package is not None)
        spec = ModuleSpec(fullname, loader, origin=origin, is_package=package is not None)
        spec.has_location = True
        if source and sys.pycache_prefix is None and not sys.flags.optimize and _TAG is not None:
            head, _, name = origin.rpartition("/")       # what cache_from_source computes, made short
            spec.cached = f"{head}/__pycache__/{name[:-3]}.{_TAG}.pyc"
        if package is not None:
            spec.submodule_search_locations = [self.image + package]
        return spec

    def iter_modules(self, prefix: str = "") -> Iterator[tuple[str, bool]]:
        """``(prefix + name, is package)`` for the modules of this directory, as ``pkgutil``
        lists a directory (``pkgutil.iter_modules`` and ``walk_packages`` call this)."""
        image = self._image
        seen: set[str] = set()
        for name in sorted(image.entries(self.inner)):
            path = self._join(name)
            kind = image.kind(path)
            if kind == "d":
                if "." in name or not any(image.kind(f"{path}/__init__{sfx}") == "f" for sfx, _ in _SUFFIXES):
                    continue
                modname, ispkg = name, True
            elif kind == "f":
                sfx = next((sfx for sfx, _ in _SUFFIXES if name.endswith(sfx)), None)
                modname, ispkg = (name[:-len(sfx)] if sfx else ""), False
                if not modname or "." in modname or modname == "__init__":
                    continue
            else:
                continue
            if modname not in seen:
                seen.add(modname)
                yield prefix + modname, ispkg

    def invalidate_caches(self) -> None:
        """Drop the directory listings (and what the image remembers); see a changed image."""
        _known.clear()
        self._image.refresh()
        _register(self._image)

    # -- importlib.metadata ---------------------------------------------------------------------
    def distributions(self, name: str | None) -> Iterator[Any]:
        """The ``*.dist-info`` / ``*.egg-info`` of this directory for ``name`` (all when None)."""
        want = _normalize(name) if name else None
        for child in list(self._image.entries(self.inner)):
            low = child.lower()
            if not low.endswith((".dist-info", ".egg-info")):
                continue
            if want is not None and _normalize(low.rpartition(".")[0].partition("-")[0]) != want:
                continue
            yield _distribution_class()(ImageTraversable(self._image, self.image, self._join(child)))


def _normalize(name: str) -> str:
    """PEP 503 normalisation with underscores, as ``importlib.metadata`` matches names: runs of
    "-", "_" and "." become one "_" (without a regular expression: compiling one costs more
    than a first import from an image saves)."""
    name = name.lower().translate(_SEPARATORS)
    while "__" in name:
        name = name.replace("__", "_")
    return name


_SEPARATORS = str.maketrans("-.", "__")


# -- loaders --------------------------------------------------------------------------------
class _ImageData:
    """Reading files of one image by their full names ("<image>/<path inside>")."""

    def __init__(self, image: _Image, named: str) -> None:
        self._image = image
        self._named = named
        self._prefix = named + "/"

    def _inner(self, path: Any) -> str:
        if type(path) is str and path.startswith(self._prefix):    # the usual case, made short
            return path[len(self._named):]
        p = os.fspath(path)
        if isinstance(p, bytes):
            p = os.fsdecode(p)
        if p.startswith(self._prefix):
            return "/" + p[len(self._prefix):]
        if not os.path.isabs(p):                  # relative names are inside the image, as zipimport does
            return "/" + p
        raise FileNotFoundError(errno.ENOENT, f"not inside the image {self._named!r}", p)

    def get_data(self, path: Any) -> bytes:
        """The bytes of file ``path`` ("<image>/<path inside>", or relative to the image root)."""
        return self._image.read(self._inner(path))

    def path_stats(self, path: str) -> dict[str, Any]:
        """``{"mtime", "size"}`` of a source file, from the image's inode (for pyc validation)."""
        mtime, size = self._image.mtime_size(self._inner(path))
        return {"mtime": mtime, "size": size}


class XipLoader(_ImageData, _bx.SourceLoader):
    """Loads one source module of an image (``importlib.abc.SourceLoader`` semantics).

    Bytecode comes from ``__pycache__`` in the image when the ``.pyc`` is valid (magic number,
    flags, and the source's mtime and size from the image, or its hash), else from compiling
    the source. ``set_data`` writes nothing: an image is never changed by importing from it.
    """

    def __init__(self, image: _Image, named: str, fullname: str, origin: str, package: bool) -> None:
        self._image = image             # _ImageData.__init__, inline: one loader per module
        self._named = named
        self._prefix = named + "/"
        self.name = fullname
        self.path = origin
        self._package = package

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} from {self.path!r}>"

    def __eq__(self, other: object) -> bool:
        return (type(other) is type(self) and self.name == other.name  # type: ignore[attr-defined]
                and self.path == other.path)  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((self.name, self.path))

    def _check(self, fullname: str | None) -> None:
        # "__main__": linecache asks by __name__, which runpy sets to "__main__".
        if fullname is not None and fullname != self.name and fullname != "__main__":
            raise ImportError(f"loader for {self.name} cannot handle {fullname}", name=fullname)

    def get_filename(self, fullname: str | None = None) -> str:
        """``__file__`` of the module: ``<image>/<path inside>``."""
        self._check(fullname)
        return self.path

    def is_package(self, fullname: str | None = None) -> bool:
        self._check(fullname)
        return self._package

    def set_data(self, path: str, data: bytes, *, _mode: int = 0o666) -> None:
        """Writing bytecode: never done, the image stays as it is."""

    def _cache_bytecode(self, source_path: str, cache_path: str, data: bytes) -> None:
        raise NotImplementedError   # SourceLoader.get_code skips writing on this

    def get_code(self, fullname: str | None = None) -> Any:
        """The module's code, from its ``__pycache__`` bytecode in the image when that is a
        timestamp pyc matching the source's mtime and size (found in the cached listings, read
        with one ``pread``, validated against the inode already decoded); anything else (a
        hash-based or stale pyc, none, ``-O``, ``sys.pycache_prefix``) as ``SourceLoader`` does."""
        self._check(fullname)
        if sys.pycache_prefix is None and not sys.flags.optimize and _TAG is not None:
            path = self.path
            directory, _, name = path[len(self._named):].rpartition("/")
            if name[-3:] == ".py":
                cached = f"{name[:-3]}.{_TAG}.pyc"
                found = self._image.bytecode(directory or "/", name, cached)
                if found is not None:
                    data, mtime, size = found
                    head = memoryview(data)[:16].cast("I") if len(data) > 16 else _NO_PYC
                    # magic, flags (0: a timestamp pyc), the source's mtime and size
                    if (head[0] == _MAGIC_WORD and head[1] == 0 and head[2] == mtime & 0xFFFFFFFF
                            and head[3] == size & 0xFFFFFFFF):
                        return _bx._compile_bytecode(
                            memoryview(data)[16:], name=self.name,
                            bytecode_path=f"{self._named}{directory}/__pycache__/{cached}", source_path=path)
        return super().get_code(self.name)

    def get_resource_reader(self, fullname: str | None = None) -> ImageResourceReader:
        """A reader (``TraversableResources`` protocol) of the module's directory in the image."""
        directory = posixpath.dirname(self._inner(self.path))
        return ImageResourceReader(ImageTraversable(self._image, self._named, directory))


class _SourcelessLoader(XipLoader):
    """Loads a module that is only a ``NAME.pyc`` in the image, as ``SourcelessFileLoader`` does."""

    def get_code(self, fullname: str) -> Any:
        path = self.get_filename(fullname)
        data = self.get_data(path)
        details = {"name": fullname, "path": path}
        _bx._classify_pyc(data, fullname, details)
        return _bx._compile_bytecode(memoryview(data)[16:], name=fullname, bytecode_path=path)

    def get_source(self, fullname: str) -> None:
        self._check(fullname)
        return None


class _ExtensionLoader(_ImageData):
    """Loads an extension module of an image: ``dlopen`` needs a file, so its bytes are copied
    into an anonymous memory file (``memfd``) and loaded from there; ``__file__`` still points
    into the image. Shared libraries it needs through ``$ORIGIN`` are not found this way."""

    def __init__(self, image: _Image, named: str, fullname: str, origin: str) -> None:
        super().__init__(image, named)
        self.name = fullname
        self.path = origin

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} from {self.path!r}>"

    def create_module(self, spec: ModuleSpec) -> Any:
        data = self.get_data(self.path)
        try:
            fd = os.memfd_create(posixpath.basename(self.path), os.MFD_CLOEXEC)
        except (AttributeError, OSError) as err:
            raise ImportError(f"cannot load extension module {self.name!r} from an ext2 image: no "
                              f"memory file to load it from ({err})", name=self.name, path=self.path) from err
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            shadow = ModuleSpec(spec.name, self, origin=f"/proc/self/fd/{fd}")
            try:
                module = _call_with_frames_removed(_imp.create_dynamic, shadow)
            except ImportError as err:
                raise ImportError(
                    f"cannot load extension module {self.name!r} from the ext2 image {self._named!r}: "
                    f"{err}. An extension loaded from an image cannot find shared libraries beside it "
                    "(through $ORIGIN, as numpy.libs); install such packages on disk",
                    name=self.name, path=self.path) from err
        finally:
            os.close(fd)
        module.__file__ = self.path
        return module

    def exec_module(self, module: Any) -> None:
        _call_with_frames_removed(_imp.exec_dynamic, module)

    def is_package(self, fullname: str | None = None) -> bool:
        return False

    def get_code(self, fullname: str | None = None) -> None:
        return None

    def get_source(self, fullname: str | None = None) -> None:
        return None

    def get_filename(self, fullname: str | None = None) -> str:
        return self.path


# -- importlib.resources ----------------------------------------------------------------------
class ImageTraversable:
    """A file or directory inside an image (``importlib.resources.abc.Traversable`` protocol).

    Also what :class:`ImageDistribution` locates files with. ``str()`` is the full name,
    ``<image>/<path inside>``; it is not an OS path, so there is no ``__fspath__``.
    """

    def __init__(self, image: _Image, named: str, inner: str) -> None:
        self._image = image
        self._named = named
        self.inner = "/" + inner.strip("/")

    def __repr__(self) -> str:
        return f"ImageTraversable({str(self)!r})"

    def __str__(self) -> str:
        return self._named + self.inner.rstrip("/")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageTraversable) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def _child(self, inner: str) -> ImageTraversable:
        return ImageTraversable(self._image, self._named, inner)

    @property
    def name(self) -> str:
        return posixpath.basename(self.inner)

    @property
    def parent(self) -> ImageTraversable:
        return self._child(posixpath.dirname(self.inner))

    def iterdir(self) -> Iterator[ImageTraversable]:
        image = self._image
        listing = image.entries(self.inner) if image.reader is not None else _NOT_DIR
        if listing is not _NOT_DIR:
            names = list(listing)                         # on-disk order, as os.listdir
        else:
            with image.lock:
                names = image.fs.listdir(self.inner)      # the errors of os.listdir
        base = self.inner.rstrip("/")
        return iter([self._child(base + "/" + n) for n in names])

    def _mode(self) -> int:
        """``st_mode`` of this path (symlinks followed), 0 where there is nothing."""
        image = self._image
        reader = image.reader
        if reader is not None:
            head, _, name = self.inner.rpartition("/")
            entry: tuple[int, int] | None = (_ROOT_INO, _FT_DIR)
            if name:
                listing = image.entries(head or "/")
                entry = listing.get(name)
                if entry is None and listing is not _NOT_DIR and name != "." and name != "..":
                    return 0
            if entry is not None:
                mode = reader.inode(entry[0])[0]
                if mode & 0xF000 != 0xA000:               # not a symlink: answered here
                    return mode
        with image.lock:
            try:
                return image.fs.stat(self.inner).st_mode
            except OSError:
                return 0

    def is_dir(self) -> bool:
        return stat.S_ISDIR(self._mode())

    def is_file(self) -> bool:
        return stat.S_ISREG(self._mode())

    def exists(self) -> bool:
        return self._mode() != 0

    def joinpath(self, *descendants: Any) -> ImageTraversable:
        """The path below this one (names split on "/"; ".." stays inside the image)."""
        parts = [self.inner]
        for d in descendants:
            d = os.fspath(d)
            parts.append(os.fsdecode(d) if isinstance(d, bytes) else d)
        return self._child(posixpath.normpath(posixpath.join(*parts)))

    def __truediv__(self, child: Any) -> ImageTraversable:
        return self.joinpath(child)

    def read_bytes(self) -> bytes:
        return self._image.read(self.inner)

    def read_text(self, encoding: str | None = None, errors: str | None = None) -> str:
        """The file decoded with universal newlines, as ``open(mode="r").read()`` returns it."""
        data = self._image.read(self.inner)
        if encoding is None:            # the locale's encoding, as TextIOWrapper picks it
            return io.TextIOWrapper(io.BytesIO(data), errors=errors).read()
        text = data.decode(encoding, errors or "strict")
        return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text

    def open(self, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        """``"rb"``: a binary file object reading from the image; ``"r"``: text over it."""
        if mode not in ("r", "rb"):
            raise ValueError(f"invalid mode {mode!r}: an image is read-only here (use 'r' or 'rb')")
        with self._image.lock:
            raw = self._image.fs.open(self.inner, "rb")
        if mode == "rb":
            return raw
        return io.TextIOWrapper(raw, *args, **kwargs)


class ImageResourceReader:
    """The resource reader of a package in an image (``TraversableResources`` protocol)."""

    def __init__(self, root: ImageTraversable) -> None:
        self._root = root

    def files(self) -> ImageTraversable:
        return self._root

    def open_resource(self, resource: str) -> Any:
        return self._root.joinpath(resource).open("rb")

    def resource_path(self, resource: str) -> str:
        raise FileNotFoundError(errno.ENOENT, "resources in an ext2 image have no file-system path",
                                str(self._root.joinpath(resource)))

    def is_resource(self, path: str) -> bool:
        return self._root.joinpath(path).is_file()

    def contents(self) -> Iterator[str]:
        return (item.name for item in self._root.iterdir())


# -- importlib.metadata -----------------------------------------------------------------------
_DIST_CLASS: Any = None


def _distribution_class() -> Any:
    """``ImageDistribution``: made on first use, so importing xipfs does not load importlib.metadata."""
    global _DIST_CLASS
    if _DIST_CLASS is None:
        import importlib.metadata as md

        class ImageDistribution(md.Distribution):
            """A distribution whose ``*.dist-info`` (or ``*.egg-info``) directory is in an image."""

            def __init__(self, path: ImageTraversable) -> None:
                self._path = path

            def __repr__(self) -> str:
                return f"<ImageDistribution {str(self._path)!r}>"

            def read_text(self, filename: str) -> str | None:
                here = self._path
                if here._image.kind(here.inner) == "f":
                    if filename != "PKG-INFO":
                        return None               # an egg-info *file* is only PKG-INFO
                    path = here
                else:
                    path = here.joinpath(filename)
                try:
                    return path.read_text(encoding="utf-8")
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError):
                    return None

            def locate_file(self, path: Any) -> ImageTraversable:
                return self._path.parent.joinpath(path)

            @property
            def _normalized_name(self) -> str:
                stem = self._path.name
                base, _, ext = stem.rpartition(".")
                if ext in ("dist-info", "egg-info"):
                    return _normalize(base.partition("-")[0])
                return super()._normalized_name

        ImageDistribution.__module__ = __name__
        _DIST_CLASS = ImageDistribution
    return _DIST_CLASS


def __getattr__(name: str) -> Any:
    if name == "ImageDistribution":
        return _distribution_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _finder_for(entry: Any) -> XipPathFinder | None:
    """The image finder of path entry ``entry`` (made and cached if need be), or None."""
    if not isinstance(entry, str):
        return None
    cache = sys.path_importer_cache
    if entry in cache:
        finder = cache[entry]
        return finder if isinstance(finder, XipPathFinder) else None
    try:
        finder = path_hook(entry)
    except ImportError:
        return None
    cache[entry] = finder
    return finder


class XipMetadataFinder:
    """On ``sys.meta_path``: answers ``importlib.metadata`` for the image entries of ``sys.path``.

    It finds no modules (the path hook does that); ``find_distributions(context)`` yields an
    ``ImageDistribution`` for each matching ``*.dist-info`` in an image directory of
    ``context.path``.
    """

    @classmethod
    def find_spec(cls, fullname: str, path: object = None, target: object = None) -> None:
        return None

    @classmethod
    def find_distributions(cls, context: Any = None) -> Iterator[Any]:
        name = getattr(context, "name", None)
        paths = getattr(context, "path", None)
        if paths is None:
            paths = sys.path
        for entry in list(paths):
            finder = _finder_for(entry)
            if finder is not None:
                yield from finder.distributions(name)

    @classmethod
    def invalidate_caches(cls) -> None:
        invalidate_caches()


# -- install / uninstall ----------------------------------------------------------------------
def _is_our_hook(hook: object) -> bool:
    return bool(getattr(hook, "__xipfs_hook__", False))


def _is_our_metadata_finder(finder: object) -> bool:
    return (isinstance(finder, type) and finder.__name__ == XipMetadataFinder.__name__
            and getattr(finder, "__module__", None) == __name__)


def install() -> None:
    """Make image entries of ``sys.path`` importable (idempotent).

    Puts :func:`path_hook` first in ``sys.path_hooks``, forgets ``sys.path_importer_cache``
    entries that remembered an image entry as unimportable (None), and adds the metadata
    finder to ``sys.meta_path`` (before ``PathFinder``, so ``importlib.metadata`` prefers a
    distribution in an image on ``sys.path`` to an installed one of the same name).
    """
    if not any(_is_our_hook(h) for h in sys.path_hooks):
        sys.path_hooks.insert(0, path_hook)
    _forget_declined_entries()
    if not any(_is_our_metadata_finder(f) for f in sys.meta_path):
        # Before PathFinder: a distribution in an image on sys.path wins over an installed one
        # of the same name, as the image's modules do when the image comes first on sys.path.
        from _frozen_importlib_external import PathFinder
        where = sys.meta_path.index(PathFinder) if PathFinder in sys.meta_path else len(sys.meta_path)
        sys.meta_path.insert(where, XipMetadataFinder)


def uninstall() -> None:
    """Undo :func:`install`: no more imports from images (modules already imported stay)."""
    sys.path_hooks[:] = [h for h in sys.path_hooks if not _is_our_hook(h)]
    _known.clear()
    for entry, finder in list(sys.path_importer_cache.items()):
        if isinstance(finder, XipPathFinder):
            sys.path_importer_cache.pop(entry, None)
    sys.meta_path[:] = [f for f in sys.meta_path if not _is_our_metadata_finder(f)]


def invalidate_caches() -> None:
    """Drop every image finder's listing and notice changed images (``importlib.invalidate_caches``)."""
    _known.clear()
    with _images_lock:
        images = list(_images.values())
    for image in images:
        image.refresh()
        _register(image)


# -- running a module from an image -----------------------------------------------------------
def entry_path(entry: str) -> str:
    """The ``sys.path`` entry for ``IMAGE``, ``IMAGE:DIR`` or ``IMAGE/DIR``.

    ``IMAGE:DIR`` applies when the text before the first ":" names an existing file or a
    ``/dev/shm`` name; a shared-memory name ``NAME`` (not a path here) becomes ``/NAME``.
    """
    head, sep, tail = entry.partition(":")
    if sep and head:
        image = head if os.path.isfile(head) else _shm_name_path(head)
        if image is not None:
            inner = tail.strip("/")
            return f"{image}/{inner}" if inner else image
    return _shm_name_path(entry) or entry


def _shm_name_path(name: str) -> str | None:
    """``/NAME`` when ``name`` (``NAME`` or ``/NAME``) is not a path but a /dev/shm object."""
    if not name or os.path.exists(name):
        return None
    bare = name[1:] if name.startswith("/") else name
    if not bare or "/" in bare or not os.path.isfile("/dev/shm/" + bare):
        return None
    return "/" + bare


def run_module(entry: str, module: str, args: list[str]) -> None:
    """Run ``module`` from an image like ``python -m``: ``entry`` (``IMAGE[:DIR]``) first on
    ``sys.path``, ``sys.argv = [<module file>, *args]``, ``__name__ == "__main__"``.

    Exceptions (``SystemExit`` too) propagate. ``sys.path`` and ``sys.argv`` are restored after.
    """
    import runpy
    path = entry_path(entry)
    if find_image(path) is None:
        raise FileNotFoundError(errno.ENOENT, "no ext2 image in this path", entry)
    install()
    saved_path, saved_argv = sys.path[:], sys.argv[:]
    sys.path.insert(0, path)
    sys.argv = [path, *args]      # runpy puts the module's file in sys.argv[0]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.path[:] = saved_path
        sys.argv = saved_argv
