"""Pass 2: every directory block (entry lengths, names, inode numbers, file types, ``.`` and
``..``, htree index structure), as e2fsck's pass2.c; it counts the references pass 4 compares
and records each directory's parent and ``..`` for pass 3.

A directory block is parsed entry by entry, then checked as a whole when it can be (every inode
in use, every file type right, no odd name): the per-entry rules run only on blocks that fail
the whole-block test.
"""

from __future__ import annotations

from array import array
from itertools import chain
from typing import Any

from .. import layout as L
from ..casefold import STRICT, fold, is_valid
from ..csum import crc32c_raw, inode_seed
from ..dir import DIR_TAIL
from ..htree import dx_csum
from . import problems as P
from .context import FT_NAMES, FT_OF_TYPE, INCOMPAT_LARGEDIR, Context, u32
from .ext4 import inline_regions

_DIRENT = L.DIRENT.struct.unpack_from
_MODE = L.INODE.codes["i_mode"].unpack_from
_DX_ROOT_INFO = L.DX_ROOT_INFO.struct.unpack_from
_DX_COUNTLIMIT = L.DX_COUNTLIMIT.struct.unpack_from     # limit, count
_DX_ENTRY = L.DX_ENTRY.struct.unpack_from               # hash, block
_GENERATION_AT = L.INODE_LARGE.offsets["i_generation"]
_BLOCK_AT = L.INODE.offsets["i_block"]
_FLAGS_AT = L.INODE.offsets["i_flags"]
#: Markers in the table of what entries should say: not file type codes.
UNUSED_INODE, BAD_NUMBER = 0xFF, 0xFE
#: per-inode "in use" byte -> UNUSED_INODE when 0.
_UNUSED_MARK = bytes([UNUSED_INODE]) + bytes(255)


def run(c: Context, bar: Any) -> None:
    """Set up the reference counts and the table of what entries should say; check every
    directory pass 1 found."""
    ninodes = c.ninodes
    n = ninodes + 1
    c.refs = array("H", bytes(2 * n))
    c.more_refs = {}
    c.parent = array("I", bytes(4 * n))
    c.dotdot = array("I", bytes(4 * n))
    c.names = {}
    # what an entry naming each inode should say: its file type (0 for an inode with bad
    # fields, as e2fsck), UNUSED_INODE for an inode not in use, BAD_NUMBER for reserved ones
    unused = int.from_bytes(c.iused.translate(_UNUSED_MARK), "little")
    expected = bytearray((int.from_bytes(c.itype, "little") | unused).to_bytes(n, "little"))
    for ino in c.bad:
        if expected[ino] != UNUSED_INODE:
            expected[ino] = 0
    expected[0] = BAD_NUMBER
    reserved = min(c.first_ino, n)
    expected[1:reserved] = bytes([BAD_NUMBER]) * (reserved - 1)
    if c.first_ino > L.ROOT_INO:
        expected[L.ROOT_INO] = UNUSED_INODE if not c.iused[L.ROOT_INO] else c.itype[L.ROOT_INO]
        if L.ROOT_INO in c.bad and c.iused[L.ROOT_INO]:
            expected[L.ROOT_INO] = 0
    c.expected = expected
    bar.add_total(len(c.dirs))
    for d in c.dirs:
        if d.inline:
            check_inline_dir(c, d.ino)
        else:
            check_dir(c, d.ino, d.blocks, d.nblocks, d.htree)
        bar.update(1)


def check_dir(c: Context, ino: int, pairs: list[tuple[int, int]], nblocks: int, htree: bool) -> None:
    """Every block of directory ``ino``: parse the entries, then check them a block at a
    time (most blocks pass a few whole-block tests; the others are checked entry by entry)."""
    bs = c.bs
    report = c.report
    dups_reported = False
    seed = None
    if c.csum:
        t = c.inode_view(ino)
        seed = inode_seed(c.csum_seed, ino, u32(t, _GENERATION_AT)) if t is not None else None
    dx = Htree(c, ino, nblocks, seed) if htree else None
    strict_cf = strict_casefolded(c, ino)
    expect = 0
    for lblk, pblk in chain(pairs, ((nblocks, 0),)):
        if lblk > expect:
            holes = f"block {expect}" if lblk == expect + 1 else f"blocks {expect}-{lblk - 1}"
            report(P.DIR_HOLE, ino, holes=holes)
        expect = lblk + 1
        if not pblk:
            break
        buf = bytes(c.block(pblk))
        if dx is not None:
            dx.classify(lblk, buf)
        if seed is not None:
            check_leaf_csum(c, ino, lblk, buf, seed, htree)
        inos, fts, names = parse_entries(c, ino, buf, bs, lblk, pblk, 0 if lblk == 0 else 2)
        if inos:
            dups_reported = check_entries(c, ino, pblk, inos, fts, names, dups_reported=dups_reported)
            if strict_cf:
                check_casefolded_names(c, ino, pblk, names)
    if dx is not None:
        dx.finish()


def parse_entries(c: Context, ino: int, buf: bytes, end: int, lblk: int, pblk: int,
                  state: int) -> tuple[list[int], bytearray, list[bytes]]:
    """The entries of one directory block (or inline region of ``end`` bytes) naming an inode:
    lengths checked, '.' and '..' checked and counted when ``state`` is 0 (the first block)."""
    inos: list[int] = []
    fts = bytearray()
    names: list[bytes] = []
    pos = 0
    if state < 2 or c.bs >= 65536:
        pos = parse_slowly(c, ino, buf, end, lblk, pblk, state, inos, fts, names)
        if pos < 0:
            return inos, fts, names
    # the hot loop: blocks under 64 KiB, past '.' and '..'
    add_ino, add_ft, add_name = inos.append, fts.append, names.append
    unpack = _DIRENT
    while pos < end:
        if end - pos < 8:
            c.report(P.DIRENT_NO_ROOM, ino, pblk, lblk=lblk, pos=pos)
            break
        d_ino, rec_len, nlen, ft = unpack(buf, pos)
        if pos + rec_len > end or rec_len < 12 or rec_len & 3 or nlen + 8 > rec_len:
            c.report(P.DIRENT_BAD_LENGTHS, ino, pblk, lblk=lblk, pos=pos, rec_len=rec_len, name_len=nlen)
            break
        if d_ino:
            add_ino(d_ino)
            add_ft(ft)
            add_name(buf[pos + 8:pos + 8 + nlen])
        pos += rec_len
    return inos, fts, names


def parse_slowly(c: Context, ino: int, buf: bytes, end: int, lblk: int, pblk: int, state: int,
                 inos: list[int], fts: bytearray, names: list[bytes]) -> int:
    """Entries one by one, every case: '.' and '..' (``state`` 0 and 1), blocks of 64 KiB and
    more (their rec_len encoding). Returns where the hot loop goes on (past '..' for blocks
    under 64 KiB), or -1 when done."""
    report = c.report
    big = c.bs >= 65536
    pos = 0
    while pos < end:
        if not big and state > 1:
            return pos
        if end - pos < 8:
            report(P.DIRENT_NO_ROOM, ino, pblk, lblk=lblk, pos=pos)
            return -1
        d_ino, rec_len, nlen, ft = _DIRENT(buf, pos)
        if big:
            rec_len = end if rec_len in (0, 65535) else (rec_len & 65532) | ((rec_len & 3) << 16)
        if pos + rec_len > end or rec_len < 12 or rec_len & 3 or nlen + 8 > rec_len:
            report(P.DIRENT_BAD_LENGTHS, ino, pblk, lblk=lblk, pos=pos, rec_len=rec_len, name_len=nlen)
            return -1
        if state > 1:
            if d_ino:
                inos.append(d_ino)
                fts.append(ft)
                names.append(buf[pos + 8:pos + 8 + nlen])
        else:
            name = buf[pos + 8:pos + 8 + nlen]
            if state == 0:
                check_dot(c, ino, d_ino, name, buf, pos)
            else:
                check_dotdot(c, ino, d_ino, name, buf, pos)
            if d_ino:
                if c.filetype and d_ino <= c.ninodes and c.expected[d_ino] == ft == L.FT_DIR \
                        and name in (b".", b".."):
                    count_ref(c, d_ino)               # a directory, as the entry says: nothing to report
                else:
                    check_entries(c, ino, pblk, [d_ino], bytearray([ft]), [name], dots=True)
        pos += rec_len
        state += 1
    return -1


def check_leaf_csum(c: Context, ino: int, lblk: int, buf: bytes, seed: int, htree: bool) -> None:
    """A directory leaf's checksum tail (metadata_csum); htree index blocks carry their own."""
    bs = c.bs
    if htree and (lblk == 0 or _DIRENT(buf, 0)[1] in (0, bs)):
        return
    if buf[bs - 12:bs - 4] != DIR_TAIL:
        c.report(P.DIR_CSUM, ino, lblk=lblk, why="no checksum tail")
    elif crc32c_raw(seed, buf[:bs - 12]) != u32(buf, bs - 4):
        c.report(P.DIR_CSUM, ino, lblk=lblk, why="checksum does not match")


def check_inline_dir(c: Context, ino: int) -> None:
    """An inline directory (inline_data): its parent in i_block, entries in i_block and the
    system.data value."""
    t = c.inode_view(ino)
    if t is None:
        return
    raw = bytes(t)
    parent = u32(raw, _BLOCK_AT)
    if parent and parent <= c.ninodes:
        c.dotdot[ino] = parent
        count_ref(c, parent)
    else:
        c.report(P.NO_DOTDOT, ino)
    count_ref(c, ino)
    dups_reported = False
    strict_cf = strict_casefolded(c, ino)
    for i, region in enumerate(inline_regions(c, ino, raw)):
        inos, fts, names = parse_entries(c, ino, region, len(region), i, 0, 2)
        if inos:
            dups_reported = check_entries(c, ino, 0, inos, fts, names, dups_reported=dups_reported)
            if strict_cf:
                check_casefolded_names(c, ino, 0, names)


def check_entries(c: Context, ino: int, pblk: int, inos: list[int], fts: bytearray, names: list[bytes],
                  dots: bool = False, dups_reported: bool = False) -> bool:
    """The entries of one directory block that name an inode (``dots``: '.' or '..'); whether a
    duplicate name has been reported in this directory now."""
    refs = c.refs
    if not dots and max(inos) <= c.ninodes:
        # the whole block at once: every inode in use and not bad, every file type right,
        # no odd name, no duplicate
        should = bytes(map(c.expected.__getitem__, inos))
        if (should == fts if c.filetype else not any(fts)) and UNUSED_INODE not in should \
                and BAD_NUMBER not in should and 0 not in should and ino not in inos \
                and L.ROOT_INO not in inos and b"." not in names and b".." not in names \
                and b"" not in names and not bad_chars(names) \
                and len(set(names)) == len(names):
            parent = c.parent
            i = should.find(L.FT_DIR)
            while i >= 0:
                d_ino = inos[i]
                if parent[d_ino]:
                    c.report(P.DIR_HARDLINK, ino, pblk, name=names[i], target=d_ino, parent=parent[d_ino])
                else:
                    parent[d_ino] = ino
                    c.names[d_ino] = names[i]
                i = should.find(L.FT_DIR, i + 1)
            done = 0
            try:
                for d_ino in inos:
                    refs[d_ino] += 1
                    done += 1
            except OverflowError:
                for d_ino in inos[done:]:
                    count_ref(c, d_ino)
            return dups_reported
    for d_ino, ft, name in zip(inos, fts, names, strict=True):
        check_entry(c, ino, pblk, d_ino, ft, name, dots)
    if not dots and not dups_reported and len(set(names)) != len(names):
        seen: set[bytes] = set()
        dup = next(n for n in names if n in seen or seen.add(n))
        c.report(P.DUP_ENTRY, ino, pblk, name=dup)
        return True
    return dups_reported


def strict_casefolded(c: Context, ino: int) -> bool:
    """Whether directory ``ino`` is casefolded on an image whose encoding is strict: where
    e2fsck checks that names are UTF-8 and unique once folded (it does not elsewhere)."""
    sb = c.sb
    if not sb.has_incompat(L.INCOMPAT_CASEFOLD) or not sb.s_encoding_flags & STRICT:
        return False
    t = c.inode_view(ino)
    return t is not None and bool(u32(t, _FLAGS_AT) & L.FL_CASEFOLD)


def check_casefolded_names(c: Context, ino: int, pblk: int, names: list[bytes]) -> None:
    """The names of one block of a strict casefolded directory (e2fsck's ``encoded_check_name``
    and its casefolding duplicate test): each valid UTF-8, no two alike once folded."""
    seen: set[bytes | None] = set()
    exact: set[bytes] = set()
    for name in names:
        if name in (b".", b".."):
            continue
        if not is_valid(name):
            c.report(P.BAD_CASEFOLDED_NAME, ino, name=name)
            continue
        key = fold(name)
        if key in seen and name not in exact:     # an exact duplicate is reported already
            c.report(P.DUP_ENTRY, ino, pblk, name=name)
        seen.add(key)
        exact.add(name)


def bad_chars(names: list[bytes]) -> bool:
    """Whether any of ``names`` holds a '/' or a NUL."""
    joined = b"".join(names)
    return b"/" in joined or b"\0" in joined


def count_ref(c: Context, d_ino: int) -> None:
    """One more entry names ``d_ino`` (past 65535 the count goes on in ``more_refs``)."""
    try:
        c.refs[d_ino] += 1
    except OverflowError:
        c.more_refs[d_ino] = c.more_refs.get(d_ino, 0) + 1


def check_entry(c: Context, ino: int, pblk: int, d_ino: int, ft: int, name: bytes, dots: bool) -> None:
    """One entry naming inode ``d_ino``, every rule (e2fsck's check_dir_block, per entry)."""
    report = c.report
    should = c.expected[d_ino] if d_ino <= c.ninodes else BAD_NUMBER
    if should == BAD_NUMBER:
        report(P.BAD_INODE_NUMBER, ino, pblk, name=name, target=d_ino)
        return
    if not dots:
        if d_ino == ino:
            report(P.LINK_TO_DOT, ino, name=name)
        if d_ino == L.ROOT_INO or len(name) <= 2:
            odd_name(c, ino, d_ino, name)
    if should == UNUSED_INODE:
        report(P.UNUSED_INODE, ino, pblk, name=name, target=d_ino)
        should = mode_type(c, d_ino)
    if b"/" in name or b"\0" in name:
        report(P.BAD_NAME, ino, name=name)
    if c.filetype:
        if ft != should:
            report(P.FILE_TYPE, ino, pblk, name=name, ft=ft, should=should,
                   should_name=FT_NAMES.get(should, "?"))
    elif ft:
        report(P.FILE_TYPE_NO_FEATURE, ino, pblk, name=name, ft=ft)
    if not dots and c.itype[d_ino] == L.FT_DIR:
        parent = c.parent
        if parent[d_ino]:
            report(P.DIR_HARDLINK, ino, pblk, name=name, target=d_ino, parent=parent[d_ino])
        else:
            parent[d_ino] = ino
            c.names[d_ino] = name
    count_ref(c, d_ino)


def check_dot(c: Context, ino: int, d_ino: int, name: bytes, buf: bytes, pos: int) -> None:
    """The first entry of a directory must be '.', naming the directory itself."""
    if not d_ino:
        c.report(P.NO_DOT, ino)
    elif name != b".":
        c.report(P.FIRST_NOT_DOT, ino, name=name)
    elif buf[pos + 9]:
        c.report(P.DOT_NOT_TERMINATED, ino)
    if d_ino != ino:
        c.report(P.DOT_POINTS_ELSEWHERE, ino, target=d_ino)


def check_dotdot(c: Context, ino: int, d_ino: int, name: bytes, buf: bytes, pos: int) -> None:
    """The second entry of a directory must be '..'; its inode is checked in pass 3."""
    if not d_ino:
        c.report(P.NO_DOTDOT, ino)
    elif name != b"..":
        c.report(P.SECOND_NOT_DOTDOT, ino, name=name)
    elif buf[pos + 10]:
        c.report(P.DOTDOT_NOT_TERMINATED, ino)
    else:
        c.dotdot[ino] = d_ino


def odd_name(c: Context, ino: int, d_ino: int, name: bytes) -> None:
    """Entries past the second: no '.', '..', empty names or links to the root."""
    if name == b".":
        c.report(P.DUP_DOT, ino)
    elif name == b"..":
        c.report(P.DUP_DOTDOT, ino)
    elif d_ino == L.ROOT_INO:
        c.report(P.LINK_TO_ROOT, ino, name=name)
    elif not name:
        c.report(P.NULL_NAME, ino)


def mode_type(c: Context, ino: int) -> int:
    """The file type code of inode ``ino``'s mode as stored (for inodes not in use)."""
    t = c.inode_view(ino)
    return FT_OF_TYPE[_MODE(t, 0)[0] >> 12] if t is not None else 0


class Htree:
    """The index of one htree directory: its root and nodes, which blocks they reference
    (e2fsck's pass 2 dx_dir checks); the first problem found is reported."""

    __slots__ = ("c", "ino", "n", "parent", "nodes", "depth", "bad", "csum", "seed")

    def __init__(self, c: Context, ino: int, nblocks: int, seed: int | None = None) -> None:
        self.c = c
        self.csum = int(c.csum)
        self.seed = seed
        self.ino = ino
        self.n = nblocks
        self.parent: dict[int, int] = {}       # block -> the index block referencing it
        self.nodes: set[int] = set()           # interior index blocks (not the root)
        self.depth = 1
        self.bad = False

    def problem(self, kind: P.ProblemKind, **fields: Any) -> None:
        if not self.bad:
            self.c.report(kind, self.ino, **fields)
        self.bad = True

    def classify(self, lblk: int, buf: bytes) -> None:
        bs = self.c.bs
        d_ino, rec_len, nlen, _ft = _DIRENT(buf, 0)
        if lblk == 0:
            zero, _hv, info_len, levels, _fl = _DX_ROOT_INFO(buf, 24)
            limit_levels = 3 if self.c.sb.has_incompat(INCOMPAT_LARGEDIR) else 2
            if zero or info_len < 8 or levels >= limit_levels:
                self.problem(P.HTREE_ROOT_NODE)
                return
            self.depth = levels + 1
            self.node(lblk, buf, 24 + info_len)
        elif d_ino == 0 and rec_len == bs and nlen == 0 and \
                _DX_COUNTLIMIT(buf, 8)[0] == (bs - 8) // 8 - self.csum:
            self.nodes.add(lblk)
            self.node(lblk, buf, 8)

    def node(self, lblk: int, buf: bytes, at: int) -> None:
        bs = self.c.bs
        if at + 8 > bs:
            self.problem(P.HTREE_ENTRIES_OUTSIDE, lblk=lblk)
            return
        limit, count = _DX_COUNTLIMIT(buf, at)
        expect = (bs - at) // 8 - self.csum
        if limit != expect:
            self.problem(P.HTREE_LIMIT, lblk=lblk, limit=limit, expect=expect)
        elif self.seed is not None and count <= limit and (
                dx_csum(buf, at, count, limit, self.seed) != u32(buf, at + 8 * limit + 4)):
            self.problem(P.HTREE_CSUM, lblk=lblk)
        if count > expect:
            self.problem(P.HTREE_COUNT, lblk=lblk, count=count, expect=expect)
            count = expect
        prev = 0
        for i in range(count):
            h, b = _DX_ENTRY(buf, at + 8 * i)
            h = (h & ~1) if i else 0
            b &= 0x0FFFFFFF
            if b >= self.n:
                self.problem(P.HTREE_PAST_END, lblk=lblk, target=b)
                continue
            if h < prev:
                self.problem(P.HTREE_HASH_ORDER, lblk=lblk)
            prev = h
            if b in self.parent or b == 0:
                self.problem(P.HTREE_TWICE, target=b)
            else:
                self.parent[b] = lblk

    def finish(self) -> None:
        if self.bad:
            return
        for b in range(1, self.n):
            p = self.parent.get(b)
            if p is None:
                self.problem(P.HTREE_UNREFERENCED, target=b)
                return
            if b in self.nodes:
                continue
            depth = 1
            while p != 0 and depth <= self.n:
                p = self.parent.get(p, 0)
                depth += 1
            if depth != self.depth:
                self.problem(P.HTREE_LEAF_DEPTH, target=b, depth=depth, expect=self.depth)
                return
