"""Pass 1: every inode in use (type, flags, block map, block ownership, ``i_blocks``,
``i_size``, symlinks, special files, extended attributes), as e2fsck's pass1.c.

Speed: inode tables are read a piece at a time into one buffer and scanned with whole-buffer
byte operations (strided slices, ``translate``, big-integer masks) to find the inodes in use,
their types and link counts; the plain regular files among them (direct blocks only, or one
extent in the inode: most files) are checked and claimed by :mod:`.plain` a piece at a time;
only the other inodes in use are decoded, one ``struct`` call each, and their common cases (a
directory with direct blocks only, twelve direct blocks and one indirect block mapping a
contiguous run, extents all in the inode) are checked inline in :func:`scan_used`.
"""

from __future__ import annotations

import struct
import sys
from array import array
from stat import S_IFDIR, S_IFMT, S_IFREG
from typing import Any

from .. import layout as L
from . import problems as P
from .context import (
    BG_INODE_UNINIT,
    COMPAT_IMAGIC,
    FL_APPEND,
    FL_EXTENTS,
    FL_HUGE_FILE,
    FL_IMAGIC,
    FL_IMMUTABLE,
    FL_INDEX,
    FL_INLINE_DATA,
    FT_NAMES,
    FT_OF_TYPE,
    I_ATIME,
    I_ATIME_EXTRA,
    I_BLOCK,
    I_BLOCK0,
    I_BLOCKS,
    I_BLOCKS_HI,
    I_CRTIME,
    I_CRTIME_EXTRA,
    I_CTIME,
    I_CTIME_EXTRA,
    I_DIND,
    I_DIRECT,
    I_EXTRA_ISIZE,
    I_FADDR,
    I_FILE_ACL,
    I_FILE_ACL_HIGH,
    I_FLAGS,
    I_IND,
    I_LINKS_COUNT,
    I_MODE,
    I_MTIME,
    I_MTIME_EXTRA,
    I_SIZE,
    I_SIZE_HIGH,
    I_TIND,
    I_XATTR_MAGIC,
    INCOMPAT_64BIT,
    INCOMPAT_LARGEDIR,
    INODE,
    INODE_LARGE,
    QUOTA_INOS,
    RO_COMPAT_HUGE_FILE,
    Context,
    DirInfo,
    EaInode,
    nonzero_mask,
    u32,
)
from .ext4 import (
    check_inode_csums,
    check_journal,
    extent_map,
    has_extent_header,
    inline_size,
    symlink_block,
    words_extents,
)
from .plain import plain_files
from .walk import COUNT, leaf_run, walk
from .xattrs import XATTR_MAGIC, check_refcounts, inode_xattrs, xattr_block

#: high byte of i_mode -> file type code.
_FT_OF_MODE_HI = bytes([FT_OF_TYPE[b >> 4] for b in range(256)])
_U16 = struct.Struct("<H").unpack_from
#: byte offsets in an inode of what the whole-piece scans read
_MODE_AT = L.INODE.offsets["i_mode"]
_LINKS_AT = L.INODE.offsets["i_links_count"]
_DTIME_AT = L.INODE.offsets["i_dtime"]
_BLOCK_AT = L.INODE.offsets["i_block"]
_EXTRA_AT = L.INODE.size                     # i_extra_isize, in large inodes
_FAST_SYMLINK_MAX = 60                       # a target shorter than this is kept in i_block
_CSUM_LO_AT = L.INODE_LARGE.offsets["i_checksum_lo"]
_CSUM_HI_AT = L.INODE_LARGE.offsets["i_checksum_hi"]
_GENERATION_AT = L.INODE.offsets["i_generation"]
_VERSION_AT = L.INODE.offsets["i_osd1"]      # l_i_version: an EA inode's reference count, low half
FL_EA_INODE = L.FL_EA_INODE


def run(c: Context, bar: Any) -> None:
    """Scan every usable inode table, then compare xattr blocks' reference counts."""
    ninodes, ipg, isize = c.ninodes, c.ipg, c.isize
    f = c.f
    c.low_dtime_check = not any(0 < f[k] < ninodes for k in ("s_wtime", "s_mtime", "s_mkfs_time"))
    # the inode tables are read a piece at a time into one buffer
    step = max(1, min(ipg, c.piece_bytes // isize))
    table = bytearray(step * isize)
    with memoryview(table) as view:
        for g in range(c.ngroups):
            if c.it_ok[g]:
                start_of_table = c.gd[g].bg_inode_table * c.bs
                count = scanned(c, g)
                for start in range(0, count, step):
                    n = min(step, count - start)
                    c.read_into(view[:n * isize], start_of_table + start * isize)
                    scan_piece(c, g * ipg + start, table, n)
            bar.update(ipg)
    check_refcounts(c)
    check_journal(c)


def scanned(c: Context, g: int) -> int:
    """How many inodes of group ``g``'s table e2fsck reads: none in an INODE_UNINIT group, none
    past the ``itable_unused`` last ones (uninit_bg and metadata_csum only)."""
    d = c.gd[g]
    if not c.gdt_csum:
        return c.ipg
    if d.bg_flags & BG_INODE_UNINIT:
        return 0
    return c.ipg - min(d.bg_itable_unused, c.ipg)


def scan_piece(c: Context, base: int, table: bytearray, n: int) -> None:
    """Find the inodes in use among the ``n`` at the start of ``table`` (inodes ``base+1``
    on) and check each."""
    isize = c.isize
    links = nonzero_mask(table, (_LINKS_AT, _LINKS_AT + 1), isize, n)
    used = bytearray(links.to_bytes(n, "little"))
    # file types and link counts of the whole piece, without a loop over the inodes
    types = (int.from_bytes(table[_MODE_AT + 1::isize][:n].translate(_FT_OF_MODE_HI), "little")
             & links * 255).to_bytes(n, "little")
    c.itype[base + 1:base + n + 1] = types
    pairs = bytearray(2 * n)                       # the link counts' two bytes, interleaved
    pairs[0::2] = table[_LINKS_AT:n * isize:isize]
    pairs[1::2] = table[_LINKS_AT + 1:n * isize:isize]
    counts = array("H", pairs)
    if sys.byteorder != "little":
        counts.byteswap()
    c.links[base + 1:base + n + 1] = counts
    # deleted inodes: zero dtime, or a dtime that looks like an orphan list link
    modes = nonzero_mask(table, (_MODE_AT, _MODE_AT + 1), isize, n)
    dtimes = nonzero_mask(table, range(_DTIME_AT, _DTIME_AT + 4), isize, n)
    suspects = (modes & ~links) | dtimes
    if suspects:
        check_deleted(c, base, table, suspects.to_bytes(n, "little"))
    reserved = min(c.first_ino - 1 - base, n)      # inodes below s_first_ino here
    if reserved > 0:
        scan_reserved(c, base, table, used, reserved)
    c.iused[base + 1:base + n + 1] = used
    if c.csum:
        offs = (_CSUM_LO_AT, _CSUM_LO_AT + 1) + ((_CSUM_HI_AT, _CSUM_HI_AT + 1) if isize > 128 else ())
        candidates = nonzero_mask(table, offs, isize, n) | links | modes
        if candidates:
            check_inode_csums(c, base, table, candidates.to_bytes(n, "little"))
    if reserved > 0:
        used = bytearray(used)
        used[:reserved] = bytes(reserved)
        if base < L.ROOT_INO <= base + reserved and c.iused[L.ROOT_INO]:
            used[L.ROOT_INO - 1 - base] = 1
    done = plain_files(c, table, used, types)
    if done.count(1):
        used = (int.from_bytes(used, "little") & ~int.from_bytes(done, "little")).to_bytes(n, "little")
    scan_used(c, base, table, used, types)


def scan_reserved(c: Context, base: int, table: bytearray, used: bytearray, count: int) -> None:
    """Inodes below s_first_ino: in use by definition, checked by their own rules."""
    for i in range(count):
        ino = base + i + 1
        if ino == L.ROOT_INO:
            continue
        used[i] = 1
        c.links[ino] = 0
        c.itype[ino] = 0
        reserved_inode(c, ino, INODE.unpack_from(table, i * c.isize), table[i * c.isize:(i + 1) * c.isize])


def check_deleted(c: Context, base: int, table: bytes | bytearray, suspects: bytes) -> None:
    """Inodes not in use with mode but no dtime, and inodes whose dtime is an orphan link."""
    isize = c.isize
    i = suspects.find(1)
    while i >= 0:
        ino = base + i + 1
        off = i * isize
        mode = _U16(table, off + _MODE_AT)[0]
        nlinks = _U16(table, off + _LINKS_AT)[0]
        dtime = u32(table, off + _DTIME_AT)
        if dtime and c.low_dtime_check and dtime < c.ninodes:
            c.report(P.ORPHAN_DTIME, ino)
        elif not nlinks and not dtime and mode and ino >= c.first_ino:
            c.report(P.ZERO_DTIME, ino)
        if nlinks and dtime and (ino >= c.first_ino or ino == L.ROOT_INO):
            c.report(P.DTIME_SET, ino)
        i = suspects.find(1, i + 1)


def inode_struct(c: Context, extra: int) -> struct.Struct:
    """The struct that decodes a large inode whose i_extra_isize is ``extra``, up to and
    including the word where in-inode xattrs would start (index ``I_XATTR_MAGIC``)."""
    s = c.inode_structs.get(extra)
    if s is None:
        s = struct.Struct(INODE_LARGE.format + f"{_EXTRA_AT + extra - INODE_LARGE.size}xI")
        c.inode_structs[extra] = s
    return s


def scan_used(c: Context, base: int, table: bytes | bytearray, used: bytearray, types: bytes) -> None:
    """Check every inode in use of one piece of an inode table (the hot loop: the common
    cases inline, the rest in functions)."""
    isize = c.isize
    large = isize > 128
    nblocks = c.nblocks
    claims = c.claims
    extend = claims.extend
    runs = c.runs
    meta = c.meta
    fdb = c.fdb
    dirs = c.dirs
    sectors = c.bs // 512
    bs = c.bs
    max_size = c.max_file_size()
    max_ext4_size = (bs << 32) - 1
    top = isize - 128
    report = c.report
    REG, DIR, SYMLINK = L.FT_REG, L.FT_DIR, L.FT_SYMLINK
    odd_flags = FL_IMAGIC | (0 if c.extents else FL_EXTENTS) | (0 if c.inline else FL_INLINE_DATA)
    ext4_fl = (FL_EXTENTS if c.extents else 0) | (FL_INLINE_DATA if c.inline else 0)
    ratio = c.ratio
    extra_ok = -1
    unpack = (INODE_LARGE if large else INODE).unpack_from
    if large:
        # the i_extra_isize of the first inode in use: most inodes share it
        first = used.find(1)
        if first >= 0:
            e = _U16(table, first * isize + _EXTRA_AT)[0]
            if 24 <= e < top - 4 and not e & 3:
                extra_ok = e
                unpack = inode_struct(c, e).unpack_from
    i = used.find(1)
    while i >= 0:
        ino = base + i + 1
        off = i * isize
        v = unpack(table, off)
        ft = types[i]
        flags = v[I_FLAGS]
        if v[I_FADDR] or v[I_BLOCKS_HI] or v[I_FILE_ACL_HIGH] or flags & odd_flags:
            odd_fields(c, ino, v)
        if flags & FL_EA_INODE:
            ctime = v[I_CTIME]
            c.ea_inodes[ino] = EaInode(ctime << 32 | u32(table, off + _VERSION_AT), ctime == v[I_ATIME])
        nclaimed = 0                           # clusters of xattr values in EA inodes, then blocks
        if large:
            if v[I_EXTRA_ISIZE] != extra_ok:
                nclaimed = extra_space(c, ino, table, off)
            else:
                if v[I_XATTR_MAGIC] == XATTR_MAGIC:
                    nclaimed = inode_xattrs(c, ino, table[off + _EXTRA_AT + extra_ok:off + isize],
                                            u32(table, off + _GENERATION_AT))
                if (v[I_CTIME_EXTRA] | v[I_MTIME_EXTRA] | v[I_ATIME_EXTRA] | v[I_CRTIME_EXTRA]) & 3 \
                        and negative_epoch(v):
                    report(P.EXTRA_TIME, ino)
        acl = v[I_FILE_ACL]
        if acl:
            nclaimed += xattr_block(c, ino, acl, u32(table, off + _GENERATION_AT))
        nclaimed *= ratio
        if flags & ext4_fl and ft in (REG, DIR, SYMLINK):
            if ft == REG and flags & ext4_fl == FL_EXTENTS and ratio == 1 and \
                    (ext := words_extents(v, I_BLOCK0, fdb, nblocks)) is not None:
                # a file whose extents are all in the inode: most files of ext4
                last = -1
                for lblk, n, pblk, unwritten in ext:
                    runs.append((pblk, n))
                    nclaimed += n
                    if not unwritten and lblk + n > last:
                        last = lblk + n - 1
                size = v[I_SIZE] | v[I_SIZE_HIGH] << 32
                if flags & FL_INDEX:
                    report(P.HTREE_FLAG_NOT_DIR, ino)
                if last >= 0 and size < last * bs:
                    report(P.SIZE_BELOW_BLOCKS, ino, size=size, last=last)
                elif size > max_ext4_size:
                    report(P.SIZE_TOO_BIG, ino, size=size)
            else:
                nclaimed = ext4_file(c, ino, v, ft, bytes(table[off:off + isize]), nclaimed)
        elif ft in (REG, DIR):
            blk = v[I_DIRECT]
            nz = 12 - blk.count(0)
            ind = v[I_IND]
            pairs = None
            if not (ind or v[I_DIND] or v[I_TIND]) and (nz == 12 or blk.index(0) == nz) and (
                    not nz or max(blk) < nblocks):
                # direct blocks only, no holes: most files
                extend(blk[:nz])
                last = nz - 1
                nclaimed += nz
            elif ft == REG and nz == 12 and not v[I_DIND] and not v[I_TIND] and max(blk) < nblocks and \
                    fdb <= ind < nblocks and not meta[ind] and (
                        run := leaf_run(c, bytes(c.block(ind)), v[I_BLOCKS] // sectors - 13))[1]:
                # twelve direct blocks and one indirect block mapping a contiguous run
                extend(blk)
                claims.append(ind)
                runs.append(run)
                last = 11 + run[1]
                nclaimed += 13 + run[1]
            else:
                w = walk(c, ino, v[I_BLOCK], ft)
                nclaimed += w.count
                last, pairs = w.last, w.pairs
            size = v[I_SIZE]
            if ft == DIR:
                if pairs is None:
                    pairs = list(enumerate(blk[:nz]))
                dirs.append(DirInfo(ino, pairs, max(last + 1, 1), bool(flags & FL_INDEX)))
                if not nclaimed:
                    report(P.DIR_EMPTY, ino)
                if flags & FL_INDEX:
                    htree_root(c, ino, pairs[0][1] if pairs and pairs[0][0] == 0 else 0)
                if v[I_SIZE_HIGH] and not c.sb.has_incompat(INCOMPAT_LARGEDIR):
                    c.mark_bad(P.DIR_SIZE_HIGH, ino, value=v[I_SIZE_HIGH])
                if size & (bs - 1):
                    report(P.DIR_SIZE_ODD, ino, size=size)
                else:
                    nblock = size // bs
                    if nblock > last + 1 or last + 1 - nblock > c.f["s_prealloc_dir_blocks"]:
                        report(P.DIR_SIZE_BLOCKS, ino, size=size, reach=(last + 1) * bs)
            else:
                if v[I_SIZE_HIGH]:
                    size |= v[I_SIZE_HIGH] << 32
                if last >= 0 and size < last * bs:
                    report(P.SIZE_BELOW_BLOCKS, ino, size=size, last=last)
                elif size > max_size:
                    report(P.SIZE_TOO_BIG, ino, size=size)
                if flags & FL_INDEX:
                    report(P.HTREE_FLAG_NOT_DIR, ino)
        else:
            nclaimed += other_inode(c, ino, v, ft, table, off, max_size)
        if v[I_BLOCKS] != nclaimed * sectors:
            check_i_blocks(c, ino, v, nclaimed)
        i = used.find(1, i + 1)


def check_i_blocks(c: Context, ino: int, v: tuple[int, ...], nclaimed: int) -> None:
    """``i_blocks`` (in 512-byte sectors, or blocks with huge_file) against the blocks claimed."""
    iblocks = v[I_BLOCKS]
    expect = nclaimed * (c.bs // 512)
    if c.sb.has_ro_compat(RO_COMPAT_HUGE_FILE):
        iblocks |= v[I_BLOCKS_HI] << 32
        if v[I_FLAGS] & FL_HUGE_FILE:
            expect = nclaimed
    if iblocks != expect:
        c.report(P.I_BLOCKS, ino, value=iblocks, expect=expect)


def odd_fields(c: Context, ino: int, v: tuple[int, ...]) -> None:
    """Fields an ext2 inode must leave zero, and flags of other formats (a directory's
    i_size_high is checked with its size)."""
    sb = c.sb
    flags = v[I_FLAGS]
    if v[I_FADDR]:
        c.mark_bad(P.FADDR, ino, value=v[I_FADDR])
    if v[I_FILE_ACL_HIGH] and not sb.has_incompat(INCOMPAT_64BIT):
        c.mark_bad(P.FILE_ACL_HIGH, ino, value=v[I_FILE_ACL_HIGH])
    if v[I_BLOCKS_HI] and not sb.has_ro_compat(RO_COMPAT_HUGE_FILE):
        c.mark_bad(P.BLOCKS_HI, ino, value=v[I_BLOCKS_HI])
    if flags & FL_IMAGIC and not sb.has_compat(COMPAT_IMAGIC):
        c.report(P.IMAGIC_FLAG, ino)
    if flags & FL_EXTENTS and not c.extents:
        c.report(P.EXTENTS_FLAG, ino)
    if flags & FL_INLINE_DATA and not c.inline:
        c.report(P.INLINE_DATA_FLAG, ino)


def ext4_file(c: Context, ino: int, v: tuple[int, ...], ft: int, raw: bytes, nclaimed: int) -> int:
    """A file, directory or symlink with an extent tree or inline data (ext4); the blocks it
    claims, ``nclaimed`` (its xattr block) included."""
    flags = v[I_FLAGS]
    size = v[I_SIZE] | v[I_SIZE_HIGH] << 32
    if flags & FL_INDEX and ft != L.FT_DIR:
        c.report(P.HTREE_FLAG_NOT_DIR, ino)
    if flags & FL_INLINE_DATA and c.inline:
        isz = inline_size(c, ino, raw)
        if isz < 0:
            c.report(P.INLINE_NO_ATTR, ino)
        if ft == L.FT_DIR:
            c.dirs.append(DirInfo(ino, [], 0, False, inline=True))
            if isz >= 0 and size != isz:
                c.report(P.INLINE_DIR_SIZE, ino, size=size, expect=isz)
        elif ft == L.FT_SYMLINK and (v[I_SIZE_HIGH] or not size or flags & (FL_INDEX | FL_EXTENTS)
                                     or size != isz):
            c.mark_bad(P.BAD_SYMLINK, ino, size=size)
        return nclaimed
    if ft == L.FT_SYMLINK:
        if size < _FAST_SYMLINK_MAX:
            if not symlink_ok(c, v, raw, 0):
                c.mark_bad(P.BAD_SYMLINK, ino, size=size)
            return nclaimed
        m = extent_map(c, ino, raw, ft)
        blk = symlink_block(c, raw)
        buf = bytes(c.block(blk)) if blk else b""
        n = buf.find(0)
        if v[I_SIZE_HIGH] or flags & FL_INDEX or not blk or n < 0 or n != size:
            c.mark_bad(P.BAD_SYMLINK, ino, size=size)
        return nclaimed + m.count
    if not has_extent_header(raw):
        c.report(P.EXTENT_BAD, ino, why="i_block holds no extent header")
        if ft == L.FT_DIR:
            c.dirs.append(DirInfo(ino, [], 1, False))
        return nclaimed
    m = extent_map(c, ino, raw, ft)
    nclaimed += m.count
    bs = c.bs
    if ft == L.FT_DIR:
        pairs = m.pairs or []
        c.dirs.append(DirInfo(ino, pairs, max(m.last + 1, 1), bool(flags & FL_INDEX)))
        if not nclaimed and m.ok:
            c.report(P.DIR_EMPTY, ino)
        if flags & FL_INDEX:
            htree_root(c, ino, pairs[0][1] if pairs and pairs[0][0] == 0 else 0)
        if v[I_SIZE_HIGH] and not c.sb.has_incompat(INCOMPAT_LARGEDIR):
            c.mark_bad(P.DIR_SIZE_HIGH, ino, value=v[I_SIZE_HIGH])
        size = v[I_SIZE] | (v[I_SIZE_HIGH] << 32 if c.sb.has_incompat(INCOMPAT_LARGEDIR) else 0)
        if size & (bs - 1):
            c.report(P.DIR_SIZE_ODD, ino, size=size)
        elif m.ok:
            nblock = size // bs
            if nblock > m.last + 1 or m.last + 1 - nblock > c.f["s_prealloc_dir_blocks"]:
                c.report(P.DIR_SIZE_BLOCKS, ino, size=size, reach=(m.last + 1) * bs)
    else:
        if m.last_init >= 0 and size < m.last_init * bs:
            c.report(P.SIZE_BELOW_BLOCKS, ino, size=size, last=m.last_init)
        elif size > (bs << 32) - 1:
            c.report(P.SIZE_TOO_BIG, ino, size=size)
    return nclaimed


def extra_space(c: Context, ino: int, table: bytes | bytearray, off: int) -> int:
    """i_extra_isize, the xattrs in the inode body, the extra time fields (one inode); the
    clusters of the body's values in EA inodes."""
    v = INODE_LARGE.unpack_from(table, off)
    extra = v[I_EXTRA_ISIZE]
    top = c.isize - 128
    if extra and (extra < 4 or extra > top or extra & 3):
        c.report(P.EXTRA_ISIZE, ino, value=extra)
        return 0
    quota = 0
    if extra < top - 4 and u32(table, off + _EXTRA_AT + extra) == XATTR_MAGIC:
        quota = inode_xattrs(c, ino, table[off + _EXTRA_AT + extra:off + c.isize],
                             u32(table, off + _GENERATION_AT))
    if negative_epoch(v):
        c.report(P.EXTRA_TIME, ino)
    return quota


def negative_epoch(v: tuple[int, ...]) -> bool:
    """A time before 1970 stored with the epoch bits of the years 2310..2378 (e2fsck fixes
    these): ctime, mtime, atime, crtime against their extra fields."""
    return any(x & 3 == 3 and t & 0x80000000 for t, x in
               ((v[I_CTIME], v[I_CTIME_EXTRA]), (v[I_MTIME], v[I_MTIME_EXTRA]),
                (v[I_ATIME], v[I_ATIME_EXTRA]), (v[I_CRTIME], v[I_CRTIME_EXTRA])))


#: Inode 1 lists the blocks marked bad (EXT2_BAD_INO): no mode, owner, links or attributes.
_BAD_BLOCKS_INO = 1


def reserved_inode(c: Context, ino: int, v: tuple[int, ...], raw: bytes | bytearray) -> None:
    """Inodes below s_first_ino but the root: bad blocks, resize, journal, quota, unused."""
    mode, nlinks = v[I_MODE], v[I_LINKS_COUNT]
    if ino in QUOTA_INOS and c.f["s_feature_ro_compat"] & L.RO_COMPAT_QUOTA and ino in (
            c.f["s_usr_quota_inum"], c.f["s_grp_quota_inum"]) and S_IFMT(mode) == S_IFREG:
        reserved_blocks(c, ino, v, regular=True, raw=raw)   # a quota file the superblock names
        return
    if ino in QUOTA_INOS or (ino == L.JOURNAL_INO and c.f["s_journal_inum"] != L.JOURNAL_INO):
        if nlinks or v[I_BLOCKS] or v[I_BLOCK0]:
            c.report(P.RESERVED_NOT_CLEAR, ino, what="quota" if ino in QUOTA_INOS else "journal")
        return
    if ino == _BAD_BLOCKS_INO and (mode or nlinks or v[I_FILE_ACL] or v[I_FLAGS] & L.FL_INLINE_DATA
                                   or raw[2:4] != b"\0\0" or raw[24:26] != b"\0\0"):   # i_uid, i_gid
        c.report(P.BAD_BLOCKS_INODE, ino)     # e2fsck: "The bad block inode looks invalid"
        return
    if ino == L.JOURNAL_INO:
        if S_IFMT(mode) != S_IFREG:
            c.report(P.JOURNAL_NOT_REGULAR, ino)
        reserved_blocks(c, ino, v, regular=True, raw=raw)
        return
    if (ino == L.RESIZE_INO and mode and S_IFMT(mode) != S_IFREG) or (
            ino == 5 and S_IFMT(mode) == S_IFDIR) or (ino not in (5, L.RESIZE_INO) and mode):
        c.report(P.RESERVED_BAD_MODE, ino, mode=mode)
    reserved_blocks(c, ino, v, regular=S_IFMT(mode) == S_IFREG)


def reserved_blocks(c: Context, ino: int, v: tuple[int, ...], regular: bool,
                    raw: bytes | bytearray = b"") -> None:
    """The blocks of a reserved inode: the bad blocks list, the resize inode, the journal (with
    bigalloc each block of a block map counts a whole cluster, as e2fsck counts them)."""
    nclaimed = xattr_block(c, ino, v[I_FILE_ACL]) if v[I_FILE_ACL] else 0
    if raw and c.extents and v[I_FLAGS] & FL_EXTENTS:
        m = extent_map(c, ino, bytes(raw), L.FT_REG)
        nclaimed = nclaimed * c.ratio + m.count
        if v[I_BLOCKS] != nclaimed * (c.bs // 512):
            check_i_blocks(c, ino, v, nclaimed)
        return
    if ino == L.RESIZE_INO:
        w = walk(c, ino, v[I_BLOCK], L.FT_REG, COUNT)
        dind = v[I_DIND]
        nclaimed += w.count
        if w.count and c.fdb <= dind < c.nblocks:
            c.claims.append(dind)
    elif regular or ino == 1:
        nclaimed += walk(c, ino, v[I_BLOCK], L.FT_REG).count
    nclaimed *= c.ratio
    if v[I_BLOCKS] != nclaimed * (c.bs // 512) and ino != 1:
        check_i_blocks(c, ino, v, nclaimed)
    size = v[I_SIZE] | v[I_SIZE_HIGH] << 32
    if size > c.max_file_size():               # e2fsck checks every inode's size this way
        c.report(P.RESERVED_TOO_BIG, ino, size=size)


def other_inode(c: Context, ino: int, v: tuple[int, ...], ft: int, table: bytes | bytearray, off: int,
                max_size: int) -> int:
    """Symlinks, devices, fifos, sockets and invalid modes; the blocks claimed."""
    mode, flags = v[I_MODE], v[I_FLAGS]
    fsize = v[I_SIZE] | v[I_SIZE_HIGH] << 32
    blk = v[I_BLOCK]
    if ft == 0:
        c.mark_bad(P.BAD_MODE, ino, mode=mode)
    elif ft == L.FT_SYMLINK:
        if not symlink_ok(c, v, table, off):
            c.mark_bad(P.BAD_SYMLINK, ino, size=fsize)
        elif flags & (FL_IMMUTABLE | FL_APPEND):
            c.report(P.SPECIAL_IMMUTABLE, ino)
        if symlink_maps_blocks(v):
            return walk(c, ino, blk, ft).count
    else:
        if flags & (FL_INDEX | FL_EXTENTS) or (flags & (FL_IMMUTABLE | FL_APPEND) and any(blk[4:])):
            c.mark_bad(P.BAD_DEVICE, ino, type=FT_NAMES[ft])
        else:
            if flags & (FL_IMMUTABLE | FL_APPEND):
                c.report(P.SPECIAL_IMMUTABLE, ino)
            if fsize:
                c.report(P.SPECIAL_FILE_SIZE, ino, type=FT_NAMES[ft], size=fsize)
    if fsize > max_size and ft != L.FT_SYMLINK:
        c.report(P.SIZE_TOO_BIG, ino, size=fsize)
    return 0


def symlink_maps_blocks(v: tuple[int, ...]) -> bool:
    """Whether a symlink's i_block holds block numbers (ext2fs_inode_has_valid_blocks2)."""
    if not v[I_FILE_ACL]:
        return v[I_BLOCKS] != 0
    size = v[I_SIZE] | v[I_SIZE_HIGH] << 32
    return size >= _FAST_SYMLINK_MAX or (size > 4 and v[I_BLOCK0 + 1] == 0)


def symlink_ok(c: Context, v: tuple[int, ...], table: bytes | bytearray, off: int) -> bool:
    """e2fsck_pass1_check_symlink: the target's length matches i_size, no NUL inside."""
    size, size_high, flags = v[I_SIZE], v[I_SIZE_HIGH], v[I_FLAGS]
    if size_high or size == 0 or flags & FL_INDEX:
        return False
    if size < _FAST_SYMLINK_MAX:                   # fast symlink: the target in i_block
        if flags & FL_EXTENTS:
            return False
        buf = bytes(table[off + _BLOCK_AT:off + _BLOCK_AT + _FAST_SYMLINK_MAX])
    else:
        blk = v[I_BLOCK0]
        if any(v[I_BLOCK0 + 1:I_TIND + 1]) or not c.fdb <= blk < c.nblocks:
            return False
        buf = bytes(c.block(blk))
    n = buf.find(0)
    length = len(buf) if n < 0 else n
    return length < len(buf) and length == size


_DX_ROOT_INFO = L.DX_ROOT_INFO.struct.unpack_from     # reserved_zero, hash_version, info_length,
#                                                         indirect_levels, unused_flags
DX_ROOT_INFO_AT = 24                                     # after '.' and '..' in the first block


def htree_root(c: Context, ino: int, blk: int) -> None:
    """The htree root of an indexed directory (e2fsck's handle_htree)."""
    sb = c.sb
    if not sb.has_compat(L.COMPAT_DIR_INDEX):
        c.report(P.HTREE_NO_DIR_INDEX, ino)
    if not blk or not c.fdb <= blk < c.nblocks:
        c.report(P.HTREE_BAD_ROOT, ino)
        return
    zero, hash_version, info_len, levels, flags = _DX_ROOT_INFO(c.block(blk), DX_ROOT_INFO_AT)
    if zero or info_len < 8:
        c.report(P.HTREE_BAD_ROOT, ino)
    elif hash_version not in (0, 1, 2):
        c.report(P.HTREE_HASH_VERSION, ino, version=hash_version)
    elif flags & 1:
        c.report(P.HTREE_ROOT_FLAGS, ino)
    elif levels > 2 or (levels > 1 and not sb.has_incompat(INCOMPAT_LARGEDIR)):
        c.report(P.HTREE_TOO_DEEP, ino, levels=levels)
