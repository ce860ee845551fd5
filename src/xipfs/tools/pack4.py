"""pack -t ext4: build an ext4 image from a directory tree in one pass (``mke2fs -t ext4 -d``).

The tree is scanned and numbered as the ext2 pack does it (:mod:`.pack`): inodes in tree order
(root 2, lost+found 11, the orphan file 12, the tree from 13). The filesystem itself is made by
the ext4 mkfs (:mod:`..extfs.mkfs4`): its geometry, its flex_bg tables, the resize inode, the
journal at the middle and the orphan file, as ``mke2fs -t ext4`` places them; those steps are
recorded, not written, until the whole tree is laid out, so that a tree that does not fit
leaves the target untouched. The tree then goes into the free space in order: each directory's
blocks (linear, with checksum tails) followed by its files' data, every file contiguous, mapped
by extents in the inode (a leaf block after the data when a file needs more than four). A file
that holds a whole 2 MiB piece starts at a 2 MiB-aligned block (file and device agree modulo
2 MiB, as Linux's DAX and a huge-page tmpfs need to map it with 2 MiB pages); the blocks skipped
to get there are filled first by the small files and directories that follow. ``dax=True`` sets
the per-inode DAX flag (``EXT4_DAX_FL``, what ``chattr +x`` sets) on every directory and regular
file, as Linux leaves it when the flag is set on the root before the tree is copied in.
Extended attributes go in the inode when they all fit, else in a block shared by every inode
with the same set. Then the inode tables, and mkfs4's bitmaps, descriptors (uninit flags,
itable_unused, checksums) and superblocks over what the tree uses.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat as st_
import struct
import time
import uuid as uuidlib
from collections.abc import Iterable
from typing import Any, cast

from ..device import Device
from ..extfs import layout as L
from ..extfs import mkfs4 as M
from ..extfs.csum import crc32c_raw, inode_seed
from ..extfs.dir import rec_len_of
from ..extfs.extent import EXT_INIT_MAX_LEN, EXT_MAGIC, HEADER, INDEX, LEAF, ROOT_MAX_ENTRIES, inode_root
from ..extfs.indirect import HUGE_PAGE
from ..extfs.inode import encode_inode, encode_rdev
from ..extfs.xattr import build_block, split_name, xattr_to_acl
from ..progress import ProgressArg
from .pack import (
    LOST_FOUND_INO,
    PackResult,
    _Copier,
    _excluder,
    _file_blocks,
    _image_identity,
    _Node,
    _number,
    _scan,
    copy_files,
    write_image,
)
from .pack import _add_bytecode as add_bytecode

_DIRENT = L.DIRENT.struct
_HEADER = L.DIRENT_HEADER
_REC_LEN_AT = L.DIRENT.offsets["rec_len"]
_REC_LEN = L.DIRENT.codes["rec_len"]
_XENTRY = L.XATTR_ENTRY.struct
_XCSUM_AT = L.XATTR_HEADER.offsets["h_checksum"]
_XREFS_AT = L.XATTR_HEADER.offsets["h_refcount"]
_U32 = struct.Struct("<I")
_U16 = struct.Struct("<H")
_CSUM_LO = L.INODE_LARGE.offsets["i_checksum_lo"]
_CSUM_HI = L.INODE_LARGE.offsets["i_checksum_hi"]
#: i_extra_isize of every inode pack writes (in-inode xattrs start after it).
_EXTRA_ISIZE = 32
#: Linux shares one xattr block among at most this many inodes.
_XATTR_SHARE_MAX = 1024
#: ext4 link count limit (EXT4_LINK_MAX): a directory above it stores 1 (dir_nlink).
_LINK_MAX = 65000
_DIR_TAIL = b"\0\0\0\0\x0c\0\0\xde"
#: A depth-0 extent root of one extent (the usual file), and of none (an empty file).
_ROOT1 = struct.Struct("<HHHHIIHHI36x")
_ROOT0 = inode_root([])
#: ``EXT4_DAX_FL`` (``FS_DAX_FL``, ``FS_XFLAG_DAX`` in the fsxattr interface): a mount with
#: ``dax=inode`` maps the file straight from a DAX device; inherited by new files and directories.
FL_DAX = L.FL_DAX
#: Holes (blocks skipped to align a big file) the layout keeps for small things to fill; beyond
#: this the smallest is given up (it stays free space, just not filled by the pack).
_MAX_HOLES = 256


def pack4(src_dir: str | os.PathLike[str], image: str | os.PathLike[str] | Device, *,
          size: int | None = None, block_size: int = 4096, inode_size: int = 256,
          extra: float | int = 0.1, label: str | None = None, uuid: str | None = None,
          exclude: Iterable[str] = (), progress: ProgressArg = None, compile: bool = False,  # noqa: A002
          features: Iterable[str] | str | None = None, dax: bool = False,
          align: bool = True) -> PackResult:
    """:func:`.pack.pack` as ext4: mke2fs -t ext4's features (``features`` as -O changes them), journal.

    ``dax``: set the DAX flag on every directory and regular file (for a ``dax=inode`` mount;
    needs 4 KiB blocks, the page size, as Linux's DAX does). ``align=False`` lays files out with
    no 2 MiB alignment (the tightest image; the benchmarks compare the two).
    """
    src = os.fsencode(os.fspath(src_dir))
    target = image if isinstance(image, Device) else os.fsdecode(os.fspath(image))
    if label is not None and len(label.encode("utf-8")) > 16:
        raise ValueError("volume label longer than 16 bytes")
    if dax and block_size != mmap.PAGESIZE:
        raise ValueError(f"dax: needs {mmap.PAGESIZE}-byte blocks (the page size); Linux turns DAX off "
                         f"for {block_size}-byte blocks")
    feats = M.feature_set(features)
    result = PackResult(image=target.name if isinstance(target, Device) else target)
    root = _scan(src, result, _image_identity(target), _excluder(exclude))
    if compile:
        add_bytecode(root, result)
    nodes = _number(root, result)
    orphan = "orphan_file" in feats
    if orphan:
        _shift(nodes, 1)
    zeroed = _zeroed(target)
    env = os.environ.get("SOURCE_DATE_EPOCH")
    now = int(env) if env and env.isdigit() else int(time.time())
    fs_uuid = uuidlib.UUID(uuid) if uuid else uuidlib.uuid4()
    plan, layout = _fit(nodes, target.size if isinstance(target, Device) else size, block_size, inode_size,
                        extra, feats, zeroed, now, fs_uuid, orphan, align)   # ENOSPC: target untouched
    geo = plan.geo
    def build(dev: Device, fresh: bool, bar: Any) -> None:
        if zeroed and not fresh:                # not what _zeroed foresaw: no zero block may be skipped
            _zero(dev, geo.blocks * geo.bs)
        layout.write(dev, result, bar, label, dax)

    write_image(target, geo.blocks * geo.bs if size is None else size, result, progress, build)
    result.size = geo.blocks * geo.bs
    return result


def _zeroed(target: str | Device) -> bool:
    """Whether :func:`.pack._open_target` will hand out a device known to read all zeros."""
    if isinstance(target, Device):
        return False
    return not (os.path.exists(target) and not os.path.isfile(target))


def _zero(dev: Device, size: int) -> None:
    """Write zeros over the first ``size`` bytes of ``dev``."""
    chunk = bytes(1 << 20)
    for pos in range(0, size, len(chunk)):
        dev.write(chunk[:min(len(chunk), size - pos)], pos)


def _shift(nodes: list[_Node], by: int) -> None:
    """Move the tree's inode numbers from 12 on by ``by`` (room for the orphan file's inode 12)."""
    for node in nodes:
        if node.ino > LOST_FOUND_INO:
            node.ino += by
        if node.parent > LOST_FOUND_INO:
            node.parent += by


# -- planning --------------------------------------------------------------------------------

class _Recorder:
    """Stands in for the device while mkfs's steps run: keeps their writes for later."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.writes: list[tuple[bytes, int]] = []

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Keep a write (a copy of a reused buffer)."""
        self.writes.append((data if type(data) is bytes else bytes(data), offset))

    write_new = write

    def flush(self) -> None:
        """Nothing to flush."""


class _Plan:
    """mkfs4's steps (tables, resize inode, journal, orphan file) planned, their writes held back."""

    def __init__(self, geo: M.Geometry4, zeroed: bool, now: int, fs_uuid: uuidlib.UUID) -> None:
        self.geo = geo
        self.zeroed = zeroed
        self.fs_uuid = fs_uuid
        bs = geo.bs
        feats = geo.features
        jblocks = M.default_journal_blocks(geo.blocks) if "has_journal" in feats else 0
        if not jblocks:
            feats.discard("has_journal")
            feats.discard("orphan_file")
        self.rec = rec = _Recorder(geo.blocks * bs)
        m = self.m = M._Maker(cast(Device, rec), geo, zeroed, now)
        m.seed = crc32c_raw(0xFFFFFFFF, fs_uuid.bytes)
        m.initialize()
        m.allocate_tables()
        overhead = m.overhead()
        if not zeroed:                          # mke2fs's wipes and zeroed inode tables
            m.write(bytes(4096 if bs >= 4096 else 1024), 0)
            rsv = max(65536 // bs, 1)
            start = geo.blocks & ~(rsv - 1)
            if start > rsv:
                start -= rsv
            if start > 0:
                m.zero(start, geo.blocks - start)
            for g in range(geo.groups):
                m.zero(geo.inode_table[g], geo.itable_blocks)
        for g in range(geo.groups):
            m.flags[g] |= M._BG_ITABLE_ZEROED
        isize = geo.isize
        large = isize >= 160
        inodes: dict[int, bytearray] = {}

        def new_inode(mode: int, size: int, blocks_512: int, flags: int, i_block: bytes,
                      links: int) -> bytearray:
            raw = bytearray(isize)
            L.INODE.struct.pack_into(raw, 0, *M._inode_values(mode, size, now, links, blocks_512, flags,
                                                              i_block))
            if large:
                struct.pack_into("<H", raw, 128, _EXTRA_ISIZE)
                struct.pack_into("<i", raw, 0x90, now)
            return raw

        if m.csum:
            for ino in range(1, L.GOOD_OLD_FIRST_INO):
                inodes[ino] = bytearray(isize)
        for ino in range(3, L.GOOD_OLD_FIRST_INO):
            m.alloc_inode(ino)
        bad = inodes.setdefault(1, bytearray(isize))
        struct.pack_into("<iii", bad, 8, now, now, now)
        m.alloc_inode(1)
        if "resize_inode" in feats:
            M._resize_inode(m, inodes)
        self.jnl_blocks = b""
        if jblocks:
            self.jnl_blocks = M._journal(m, inodes, jblocks, fs_uuid, new_inode)
            overhead += jblocks
        self.overhead = overhead + geo.first_data_block
        if "orphan_file" in feats:
            M._orphan_file(m, inodes, M.default_orphan_blocks(geo.blocks), new_inode)
        self.inodes = inodes
        #: The free runs ``(start, end)`` the tree goes into, in block order.
        self.free: list[tuple[int, int]] = []
        pos = geo.first_data_block
        for a, b in m.space.runs_in(geo.first_data_block, geo.blocks):
            if a > pos:
                self.free.append((pos, a))
            pos = max(pos, b)
        if pos < geo.blocks:
            self.free.append((pos, geo.blocks))
        self.room = sum(b - a for a, b in self.free)


def _fit(nodes: list[_Node], size: int | None, bs: int, isize: int, extra: float | int, feats: set[str],
         zeroed: bool, now: int, fs_uuid: uuidlib.UUID, orphan: bool, align: bool) -> tuple[_Plan, _Layout]:
    """The filesystem and the tree's place in it: files 2 MiB-aligned when ``align`` and space
    allows (an image sized here grows by what alignment leaves unfilled; in a given ``size``
    too tight for that, only the biggest files are aligned, or none)."""
    pad = 0
    shifted = orphan                            # the tree's inodes moved up for the orphan file
    for _ in range(16):
        if shifted != orphan:                   # plan for the inodes the tree has with the orphan file
            _shift(nodes, 1)
            shifted = orphan
        plan = _plan(nodes, size, bs, isize, extra, feats, zeroed, now, fs_uuid, pad)
        has = "orphan_file" in plan.geo.features        # not when too small for a journal
        if has != shifted:
            _shift(nodes, 1 if has else -1)
            shifted = has
        per = HUGE_PAGE // plan.geo.bs if align else 0
        cur = _Cursor(plan.free, per, None if size is not None else plan.geo.blocks)
        try:
            layout = _Layout(plan, nodes, cur)
        except OSError as err:
            if err.errno != errno.ENOSPC or not per or size is None:
                raise
            return plan, _squeeze(plan, nodes, per)
        if not cur.over:
            return plan, layout
        _unplace(nodes)                         # the alignment did not fit: that much more room
        pad += cur.over
    raise OSError(errno.EFBIG, "cannot size an image for this tree")


def _squeeze(plan: _Plan, nodes: list[_Node], per: int) -> _Layout:
    """The layout in a size too tight to align every big file: only files of at least 2, 4, 8...
    whole 2 MiB pieces aligned (the biggest gain the most), at last none."""
    bs = plan.geo.bs
    most = max((k // per for n in nodes if n.fmt == st_.S_IFREG for _, k in _file_blocks(n, bs)), default=0)
    least = 2
    while True:
        _unplace(nodes)
        if least > most:
            return _Layout(plan, nodes, _Cursor(plan.free))
        try:
            return _Layout(plan, nodes, _Cursor(plan.free, per, least=least))
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
        least *= 2


def _unplace(nodes: list[_Node]) -> None:
    """Forget where a failed layout put the nodes' blocks."""
    for node in nodes:
        node.runs = []
        node.meta = []
        node.xattr_block = 0


def _plan(nodes: list[_Node], size: int | None, bs: int, isize: int, extra: float | int,
          feats: set[str], zeroed: bool, now: int, fs_uuid: uuidlib.UUID, pad: int = 0) -> _Plan:
    """The filesystem for the tree: ``size`` bytes, or what the tree needs plus ``extra`` (and
    ``pad`` blocks more, for what aligning big files skips)."""
    csum = "metadata_csum" in feats
    need_inodes = max(n.ino for n in nodes)
    need = _blocks_needed(nodes, bs, isize, csum)

    def attempt(nbytes: int, inodes: int | None) -> _Plan:
        geo = M.plan4(nbytes, block_size=bs, inode_size=isize, inodes=inodes, features=set(feats),
                      reserved_percent=0.0)
        ask = need_inodes + 16
        while geo.groups * geo.ipg < need_inodes:     # mke2fs rounds inodes per group down to 8s
            geo = M.plan4(nbytes, block_size=bs, inode_size=isize, inodes=ask, features=set(feats),
                          reserved_percent=0.0)
            ask += 8 * geo.groups
        return _Plan(geo, zeroed, now, fs_uuid)

    if size is not None:
        try:
            plan = attempt(size, None)
        except ValueError as err:
            raise OSError(errno.ENOSPC, f"the tree needs more than {size} bytes ({err})") from None
        if plan.room < need:
            raise OSError(errno.ENOSPC, f"the tree needs {need} blocks; a {size}-byte image has "
                                        f"{plan.room} free")
        return plan
    if isinstance(extra, float):
        spare_blocks, spare_inodes = int(need * extra), int(need_inodes * extra)
    else:
        spare_blocks, spare_inodes = -(-int(extra) // bs), int(extra) // 16384
    inodes = need_inodes + spare_inodes + 16
    want = need + spare_blocks + pad
    blocks = want + want // 32 + 64 + M.default_journal_blocks(want) + 64
    for _ in range(64):
        try:
            plan = attempt(blocks * bs, inodes)
        except ValueError:
            blocks += max(64, blocks // 8)
            continue
        if plan.room >= want:
            return plan
        blocks += want - plan.room + 16
    raise OSError(errno.EFBIG, "cannot size an image for this tree")


def _blocks_needed(nodes: list[_Node], bs: int, isize: int, csum: bool) -> int:
    """Blocks the tree takes (data, directories, long symlinks, xattr blocks, extent leaves)."""
    end = bs - 12 if csum else bs
    emax = (bs - 12) // 12
    room = isize - L.INODE.size - _EXTRA_ISIZE
    total = 0
    shared: dict[tuple, int] = {}
    inline: dict[tuple, bool] = {}
    for node in nodes:
        fmt = node.fmt
        if fmt == st_.S_IFDIR:
            node.nblocks = _dir_block_count(node, end, bs)
            total += node.nblocks + _tree_blocks(-(-node.nblocks // EXT_INIT_MAX_LEN) + 1, emax)
        elif fmt == st_.S_IFREG:
            ranges = _file_blocks(node, bs)
            n = sum(k for _, k in ranges)
            extents = sum(-(-k // EXT_INIT_MAX_LEN) for _, k in ranges)
            total += n + _tree_blocks(extents + 1, emax)
        elif fmt == st_.S_IFLNK and len(node.target) >= 60:
            total += 1
        if node.xattrs:
            fits = inline.get(node.xattrs)
            if fits is None:
                fits = inline[node.xattrs] = _ibody(node.xattrs, room) is not None
            if not fits:
                shared[node.xattrs] = shared.get(node.xattrs, 0) + 1
    total += sum(-(-users // _XATTR_SHARE_MAX) for users in shared.values())
    return total


def _dir_block_count(node: _Node, end: int, bs: int) -> int:
    """Blocks of a directory (its entries packed as :func:`_dir_blocks` packs them)."""
    n = 1
    pos = 24                                    # "." and ".."
    for name, _ in node.children:
        need = rec_len_of(len(name))
        if pos + need > end:
            n += 1
            pos = 0
        pos += need
    if node.ino == LOST_FOUND_INO:
        n = max(n, min(12, max(2, 16384 // bs)))
    return n


def _tree_blocks(extents: int, emax: int) -> int:
    """Extent tree blocks (leaves and index nodes, packed full) for ``extents`` extents."""
    n = 0
    while extents > ROOT_MAX_ENTRIES:
        extents = -(-extents // emax)
        n += extents
    return n


def _ibody(attrs: tuple[tuple[str, bytes], ...], room: int) -> bytes | None:
    """The in-inode xattr area of ``room`` bytes holding all of ``attrs``; None if they do not fit."""
    if room < 8:
        return None
    items = []
    for name, value in attrs:
        index, suffix = split_name(name)
        if index in (2, 3):
            value = xattr_to_acl(value)
        items.append((index, len(suffix), suffix, value))
    items.sort()
    need = 4 + 4 + sum(_XENTRY.size + ((n + 3) & ~3) + ((len(v) + 3) & ~3) for _, n, _, v in items)
    if need > room:
        return None
    body = bytearray(room)
    _U32.pack_into(body, 0, L.XATTR_MAGIC)
    pos = 4
    vend = room
    for index, nlen, suffix, value in items:
        vend -= (len(value) + 3) & ~3
        body[vend:vend + len(value)] = value
        _XENTRY.pack_into(body, pos, nlen, index, vend - 4 if value else 0, 0, len(value), 0)
        body[pos + _XENTRY.size:pos + _XENTRY.size + nlen] = suffix
        pos += (_XENTRY.size + nlen + 3) & ~3
    return bytes(body)


def _dir_blocks(node: _Node, bs: int, seed: int | None) -> list[bytes]:
    """A directory's blocks, entries packed in name order, with checksum tails when ``seed`` is given."""
    end = bs if seed is None else bs - 12
    blocks: list[bytearray] = []
    buf = bytearray(bs)
    pos = 0
    last = 0
    fts = L.IFMT_TO_FT
    entries = [(b".", node.ino, st_.S_IFDIR), (b"..", node.parent, st_.S_IFDIR)]
    entries += [(name, child.ino, child.fmt) for name, child in node.children]
    for name, ino, fmt in entries:
        need = rec_len_of(len(name))
        if pos + need > end:
            _REC_LEN.pack_into(buf, last + _REC_LEN_AT, _rec_len(end - last))
            blocks.append(buf)
            buf = bytearray(bs)
            pos = 0
        _DIRENT.pack_into(buf, pos, ino, need, len(name), fts[fmt])
        buf[pos + _HEADER:pos + _HEADER + len(name)] = name
        last = pos
        pos += need
    _REC_LEN.pack_into(buf, last + _REC_LEN_AT, _rec_len(end - last))
    blocks.append(buf)
    if node.ino == LOST_FOUND_INO:
        for _ in range(min(12, max(2, 16384 // bs)) - len(blocks)):
            empty = bytearray(bs)
            _DIRENT.pack_into(empty, 0, 0, _rec_len(end), 0, 0)
            blocks.append(empty)
    if seed is None:
        return [bytes(b) for b in blocks]
    out = []
    for b in blocks:
        head = bytes(b[:bs - 12])
        out.append(head + _DIR_TAIL + _U32.pack(crc32c_raw(seed, head)))
    return out


def _rec_len(n: int) -> int:
    """``rec_len`` as stored (65536 is stored as 0)."""
    return n if n < 65536 else 0


# -- layout and writing --------------------------------------------------------------------

class _Cursor:
    """Hands out the free blocks in order, run by run; with ``per`` (blocks in 2 MiB), big pieces
    of files start where the file and the device agree modulo 2 MiB, and what that skips is kept
    as holes that later small requests fill first."""

    def __init__(self, free: list[tuple[int, int]], per: int = 0, past: int | None = None,
                 least: int = 1) -> None:
        self.past = past
        self.least = least
        if past is not None:                    # measuring: room past the end, to count what is short
            free = list(free)
            if free and free[-1][1] >= past:
                free[-1] = (free[-1][0], 1 << 62)
            else:
                free.append((past, 1 << 62))
        self.free = free
        self.i = 0
        self.next, self.end = free[0] if free else (0, 0)
        self.per = per
        #: Skipped stretches ``[start, end]`` not yet filled, in the order they were made.
        self.holes: list[list[int]] = []
        #: At least the length of the longest hole (exact after a search that found none).
        self.hole_max = 0
        #: Blocks skipped for alignment in all (filled later or not).
        self.skipped = 0

    @property
    def over(self) -> int:
        """Blocks handed out past the end of the image (when measuring)."""
        past = self.past
        return max(0, self.next - past) if past is not None and self.i == len(self.free) - 1 else 0

    def take(self, n: int) -> list[tuple[int, int]]:
        """``n`` blocks as runs ``(first, count)``; ENOSPC when the image is full."""
        if n <= self.hole_max:
            for hole in self.holes:
                a, b = hole
                if b - a >= n:
                    hole[0] = a + n
                    if a + n == b:
                        self.holes.remove(hole)
                    return [(a, n)]
            self.hole_max = max((b - a for a, b in self.holes), default=0)   # now exact: none fits n
        first = self.next
        if first + n <= self.end:
            self.next = first + n
            return [(first, n)]
        runs: list[tuple[int, int]] = []
        while n:
            if self.next >= self.end:
                self._advance()
                continue
            k = min(n, self.end - self.next)
            runs.append((self.next, k))
            self.next += k
            n -= k
        return runs

    def take_file(self, lblk: int, n: int) -> list[tuple[int, int]]:
        """``n`` blocks for file blocks ``lblk`` on: as :meth:`take`, but every whole 2 MiB piece
        of the file on a 2 MiB-aligned stretch of the device (file and device block agree modulo
        ``per``) when the range holds at least ``least`` of them."""
        per = self.per
        if not per or (lblk + n) // per - -(-lblk // per) < self.least:
            return self.take(n)
        runs: list[tuple[int, int]] = []
        while n:
            if self.next >= self.end:
                self._advance()
                continue
            if -(-lblk // per) * per + per > lblk + n:  # the tail holds no whole piece
                runs += self.take(n)
                break
            skip = (lblk - self.next) % per
            if skip:
                stop = min(self.next + skip, self.end)
                self._hole(self.next, stop)
                self.next = stop
                continue
            k = min(n, self.end - self.next)
            if k < n:                           # the free run ends first: stop at a piece's end,
                k = (lblk + k) // per * per - lblk      # no piece broken across the gap
                if k <= 0:
                    self._hole(self.next, self.end)
                    self.next = self.end
                    continue
            runs.append((self.next, k))
            self.next += k
            lblk += k
            n -= k
        return runs

    def _advance(self) -> None:
        """On to the next free run; ENOSPC after the last."""
        self.i += 1
        if self.i >= len(self.free):
            raise OSError(errno.ENOSPC, "the tree does not fit in the image")
        self.next, self.end = self.free[self.i]

    def _hole(self, a: int, b: int) -> None:
        """Keep the skipped blocks ``[a, b)`` for small requests (the smallest given up past
        :data:`_MAX_HOLES`: it stays free space)."""
        self.skipped += b - a
        self.holes.append([a, b])
        self.hole_max = max(self.hole_max, b - a)
        if len(self.holes) > _MAX_HOLES:
            self.holes.remove(min(self.holes, key=lambda h: h[1] - h[0]))


def _extents(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Extents ``(file block, count, device block)`` of runs ``(file block, device block, count)``."""
    out: list[tuple[int, int, int]] = []
    for lblk, pblk, k in runs:
        if out:
            l0, n0, p0 = out[-1]
            if l0 + n0 == lblk and p0 + n0 == pblk and n0 < EXT_INIT_MAX_LEN:
                j = min(k, EXT_INIT_MAX_LEN - n0)
                out[-1] = (l0, n0 + j, p0)
                lblk, pblk, k = lblk + j, pblk + j, k - j
        while k:
            j = min(k, EXT_INIT_MAX_LEN)
            out.append((lblk, j, pblk))
            lblk, pblk, k = lblk + j, pblk + j, k - j
    return out


class _Layout:
    """Where every node's blocks go; computed whole before the image is touched."""

    def __init__(self, plan: _Plan, nodes: list[_Node], cur: _Cursor) -> None:
        self.plan = plan
        self.nodes = nodes
        geo = plan.geo
        bs = geo.bs
        if max(n.ino for n in nodes) > geo.groups * geo.ipg:
            raise OSError(errno.ENOSPC, "the tree has more entries than the image has inodes")
        self.csum = "metadata_csum" in geo.features
        emax = (bs - 12) // 12
        room = geo.isize - L.INODE.size - _EXTRA_ISIZE
        xblocks: dict[tuple, list] = {}
        #: Shared xattr blocks: [block, attributes, inodes using it].
        self.xattr_blocks: list[list] = []
        #: In-inode xattr areas by attribute set (None: they go in a block).
        self.ibodies: dict[tuple, bytes | None] = {}
        end = bs - 12 if self.csum else bs
        for node in nodes:
            if node.xattrs:
                if node.xattrs not in self.ibodies:
                    self.ibodies[node.xattrs] = _ibody(node.xattrs, room)
                if self.ibodies[node.xattrs] is None:
                    slot = xblocks.get(node.xattrs)
                    if slot is None or slot[2] >= _XATTR_SHARE_MAX:
                        slot = xblocks[node.xattrs] = [cur.take(1)[0][0], node.xattrs, 0]
                        self.xattr_blocks.append(slot)
                    slot[2] += 1
                    node.xattr_block = slot[0]
            fmt = node.fmt
            if fmt == st_.S_IFDIR:
                ranges = [(0, node.nblocks or _dir_block_count(node, end, bs))]
            elif fmt == st_.S_IFREG:
                ranges = _file_blocks(node, bs)
            elif fmt == st_.S_IFLNK and len(node.target) >= 60:
                ranges = [(0, 1)]
            else:
                continue
            nblocks = 0
            for first, n in ranges:
                if first + n > 0xFFFFFFFF:
                    raise OSError(errno.EFBIG, "a file is too large for ext4 extents",
                                  os.fsdecode(node.path or b""))
                for pblk, k in cur.take_file(first, n) if fmt == st_.S_IFREG else cur.take(n):
                    node.runs.append((first, pblk, k))
                    first += k
                nblocks += n
            node.nblocks = nblocks
            runs = node.runs
            if len(runs) == 1 and runs[0][2] <= EXT_INIT_MAX_LEN:
                continue                                # the usual file: one extent
            t = _tree_blocks(len(_extents(runs)), emax)
            if t:
                node.meta = [b for first, k in cur.take(t) for b in range(first, first + k)]

    def write(self, dev: Device, result: PackResult, bar: Any, label: str | None, dax: bool = False) -> None:
        """Write the filesystem and the tree into ``dev`` (``dax``: directories and regular files
        flagged DAX)."""
        plan = self.plan
        bs = plan.geo.bs
        zeroed = plan.zeroed
        put = dev.write_new if zeroed else dev.write
        for data, offset in plan.rec.writes:
            put(data, offset)
        plan.rec.writes = []
        S = plan.m.seed
        for blk, attrs, users in self.xattr_blocks:
            block = bytearray(build_block(list(attrs), bs))
            _U32.pack_into(block, _XREFS_AT, users)
            if self.csum:
                _U32.pack_into(block, _XCSUM_AT, crc32c_raw(S, blk.to_bytes(8, "little") + bytes(block)))
            put(block, blk * bs)
        failed = copy_files(_Copier(dev, zeroed), [n for n in self.nodes if n.fmt == st_.S_IFREG], bs, result,
                            bar)
        self._nodes(dev, put, failed, label, dax)

    def _nodes(self, dev: Device, put: Any, failed: list[_Node], label: str | None, dax: bool) -> None:
        """Every node's inode and directory blocks (the files' data copied already: each inode
        made as if its copy succeeded, the ``failed`` ones made empty after), then the rest."""
        plan = self.plan
        geo, m = plan.geo, plan.m
        bs, isize = geo.bs, geo.isize
        S = m.seed
        csum = self.csum
        nodes = self.nodes
        last_ino = max(max(n.ino for n in nodes), max(plan.inodes))
        table = bytearray(last_ino * isize)
        for ino, raw in plan.inodes.items():
            table[(ino - 1) * isize:ino * isize] = raw
        used: list[tuple[int, int]] = []
        ibody_at = L.INODE.size + _EXTRA_ISIZE
        extents_only = L.FL_EXTENTS
        extents_fl = extents_only | (FL_DAX if dax else 0)
        ipg = geo.ipg
        in_group = [0] * geo.groups                     # the tree's inodes, directories, last inode
        dirs_in = [0] * geo.groups
        top = [0] * geo.groups

        def inode(node: _Node, fmt: int, size: int, links: int, blocks: int, i_block: bytes,
                  flags: int) -> None:
            s = node.st
            at = (node.ino - 1) * isize
            table[at:at + isize] = encode_inode(
                isize, st_.S_IMODE(s.st_mode) | fmt, s.st_uid, s.st_gid, size, links, blocks, i_block,
                atime_ns=s.st_atime_ns, ctime_ns=s.st_ctime_ns, mtime_ns=s.st_mtime_ns,
                crtime_ns=s.st_ctime_ns, file_acl=node.xattr_block, flags=flags)
            if node.xattrs and not node.xattr_block:
                body = self.ibodies[node.xattrs]
                assert body is not None
                table[at + ibody_at:at + isize] = body

        for node in nodes:
            fmt = node.fmt
            ino = node.ino
            g = (ino - 1) // ipg
            in_group[g] += 1
            if ino > top[g]:
                top[g] = ino
            flags = extents_fl
            if fmt == st_.S_IFDIR:
                dirs_in[g] += 1
                data = b"".join(_dir_blocks(node, bs, inode_seed(S, ino, 0) if csum else None))
                for lblk, pblk, k in node.runs:
                    put(data[lblk * bs:(lblk + k) * bs], pblk * bs)
                size = len(data)
            elif fmt == st_.S_IFREG:
                size = len(node.data) if node.data is not None else node.st.st_size
            elif fmt == st_.S_IFLNK:
                size = len(node.target)
                flags = extents_only                    # DAX is for files and directories (as Linux)
                if node.runs:
                    put(node.target.ljust(bs, b"\0"), node.runs[0][1] * bs)
                else:
                    flags = 0
            else:
                size = 0
                flags = 0
            if flags:
                runs = node.runs
                if len(runs) == 1 and runs[0][2] <= EXT_INIT_MAX_LEN:
                    lblk, pblk, k = runs[0]
                    i_block = _ROOT1.pack(EXT_MAGIC, 1, ROOT_MAX_ENTRIES, 0, 0, lblk, k, pblk >> 32,
                                          pblk & 0xFFFFFFFF)
                    used.append((pblk, k))
                elif not runs:
                    i_block = _ROOT0
                else:
                    i_block = self._extent_tree(put, node, bs, inode_seed(S, ino, 0) if csum else 0)
                    used.extend((pblk, k) for _, pblk, k in runs)
                    used.extend((b, 1) for b in node.meta)
            elif fmt in (st_.S_IFCHR, st_.S_IFBLK):
                r = node.st.st_rdev
                i_block = encode_rdev(os.major(r), os.minor(r))
            elif fmt == st_.S_IFLNK:
                i_block = node.target.ljust(60, b"\0")
            else:
                i_block = bytes(60)
            if node.xattr_block:
                used.append((node.xattr_block, 1))
            blocks = (node.nblocks + len(node.meta) + (1 if node.xattr_block else 0)) * (bs // 512)
            links = node.links
            if fmt == st_.S_IFDIR:
                links += 1 + sum(1 for _, c in node.children if c.fmt == st_.S_IFDIR)
                if links > _LINK_MAX:
                    links = 1
            inode(node, fmt, size, links, blocks, i_block, flags)
        if failed:                                      # changed or vanished: packed empty
            gone = set()
            for node in failed:
                gone.update((pblk, k) for _, pblk, k in node.runs)
                gone.update((b, 1) for b in node.meta)
                node.runs, node.meta, node.nblocks = [], [], 0
                inode(node, node.fmt, 0, node.links, (1 if node.xattr_block else 0) * (bs // 512), _ROOT0,
                      extents_fl)
            used = [u for u in used if u not in gone]
        m.used_inodes.extend(node.ino for node in nodes)
        for g in range(geo.groups):                     # ext2fs_inode_alloc_stats2, a group at a time
            if in_group[g]:
                m.free_inodes[g] -= in_group[g]
                m.dirs[g] += dirs_in[g]
                m.flags[g] &= ~L.BG_INODE_UNINIT
                if m.gdt_csum:
                    m.unused[g] = min(m.unused[g], g * ipg + ipg - top[g])
        self._claim(used)
        if csum:
            _seal_inodes(table, last_ino, isize, S)
        per_group = geo.ipg * isize
        for g in range(-(-last_ino // geo.ipg)):
            put(table[g * per_group:(g + 1) * per_group], geo.inode_table[g] * bs)
        m.dev = dev
        m._write = put
        compat, incompat, ro = M.feature_words(geo.features)
        M._finish(m, plan.fs_uuid, uuidlib.uuid4(), label, plan.jnl_blocks, plan.overhead, compat,
                  incompat, ro)

    def _claim(self, used: list[tuple[int, int]]) -> None:
        """Mark the tree's blocks used (runs joined first: one allocator call per stretch)."""
        used.sort()
        m = self.plan.m
        start, n = -1, 0
        for a, k in used:
            if a == start + n:
                n += k
                continue
            if n:
                m.claim(start, n)
            start, n = a, k
        if n:
            m.claim(start, n)

    def _extent_tree(self, put: Any, node: _Node, bs: int, seed: int) -> bytes:
        """``i_block`` of ``node``'s extents; the tree blocks written when more than four."""
        extents = _extents(node.runs)
        if len(extents) <= ROOT_MAX_ENTRIES:
            return inode_root(extents)
        emax = (bs - 12) // 12
        entries = [LEAF.pack(lblk, n, pblk >> 32, pblk & 0xFFFFFFFF) for lblk, n, pblk in extents]
        keys = [lblk for lblk, _, _ in extents]
        blocks = iter(node.meta)
        depth = 0
        while len(entries) > ROOT_MAX_ENTRIES:
            up: list[bytes] = []
            up_keys: list[int] = []
            for i in range(0, len(entries), emax):
                chunk = entries[i:i + emax]
                blk = next(blocks)
                buf = bytearray(bs)
                HEADER.pack_into(buf, 0, EXT_MAGIC, len(chunk), emax, depth, 0)
                buf[12:12 + 12 * len(chunk)] = b"".join(chunk)
                if self.csum:
                    _U32.pack_into(buf, 12 + 12 * emax, crc32c_raw(seed, bytes(buf[:12 + 12 * emax])))
                put(buf, blk * bs)
                up.append(INDEX.pack(keys[i], blk & 0xFFFFFFFF, blk >> 32, 0))
                up_keys.append(keys[i])
            entries, keys = up, up_keys
            depth += 1
        return (HEADER.pack(EXT_MAGIC, len(entries), ROOT_MAX_ENTRIES, depth, 0)
                + b"".join(entries)).ljust(60, b"\0")


def _seal_inodes(table: bytearray, last_ino: int, isize: int, fs_seed: int) -> None:
    """Set the checksum of every inode 1..``last_ino`` in ``table`` (all zero generation)."""
    view = memoryview(table)
    for ino in range(1, last_ino + 1):
        at = (ino - 1) * isize
        crc = crc32c_raw(inode_seed(fs_seed, ino, 0), view[at:at + isize])
        _U16.pack_into(table, at + _CSUM_LO, crc & 0xFFFF)
        if isize > 128 and _U16.unpack_from(table, at + 128)[0] >= 4:
            _U16.pack_into(table, at + _CSUM_HI, crc >> 16)
