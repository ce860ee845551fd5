"""Inodes: the decoded on-disk inode, its one encoder, and its block map.

An :class:`Inode` is the decoded on-disk inode; ``encode_inode`` (with ``encode_new_inode`` as
its fast path for a new one) is the one way back to bytes. ``Inode.map`` is the inode's block
map, from the seam in :mod:`.bmap` (the indirect tree of :mod:`.indirect` for ext2), which hands
out *runs*: ``(file block, count, device block)`` with device block 0 for a hole.
"""

from __future__ import annotations

import errno
import functools
import stat as _stat
import struct
from stat import S_IFMT, S_IFREG, S_ISDIR, S_ISLNK, S_ISREG
from typing import TYPE_CHECKING

from ..errors import CorruptImageError
from . import layout as L
from .bmap import BlockMapping, Run, block_map
from .csum import crc32c_raw, inode_seed
from .indirect import BlockMap, consecutive_pointers

if TYPE_CHECKING:
    from .volume import Volume

#: Names other modules import from here (the block map lives in .indirect, behind .bmap).
__all__ = ["Inode", "Run", "BlockMap", "BlockMapping", "consecutive_pointers", "decode_time", "encode_time",
           "encode_direct_run", "encode_inode", "encode_new_inode", "encode_rdev"]

_BASE_UNPACK = L.INODE.struct.unpack_from
_EXTRA_UNPACK = L.INODE_EXTRA.struct.unpack_from
_LARGE_UNPACK = L.INODE_LARGE.struct.unpack_from
_AT = L.INODE_LARGE.offsets

# Writing over an inode's old bytes: the fields xipfs models, in the pieces between the ones it
# keeps (i_osd1, i_faddr, the high halves of i_blocks and i_file_acl, the checksums).
_HEAD = L.INODE.span("i_mode", "i_flags")
_MIDDLE = L.INODE.span("i_block", "i_size_high")
_MIDDLE_NO_SIZE_HIGH = L.INODE.span("i_block", "i_file_acl")     # i_size_high is i_dir_acl
_IDS_HIGH = L.INODE.span("i_uid_high", "i_gid_high")
_AT_BLOCK, _AT_IDS_HIGH, _AT_EXTRA = _AT["i_block"], _AT["i_uid_high"], _AT["i_extra_isize"]
_EXTRA_TIMES = L.INODE_LARGE.select("i_extra_isize", "i_ctime_extra", "i_mtime_extra", "i_atime_extra")
_CRTIME = L.INODE_LARGE.span("i_crtime", "i_crtime_extra")
_EXTRA_ISIZE = L.INODE_LARGE.codes["i_extra_isize"]
_CTIME_EXTRA = L.INODE_LARGE.codes["i_ctime_extra"]
_MTIME_EXTRA = L.INODE_LARGE.codes["i_mtime_extra"]

# A whole new inode over zeros: every field xipfs models, the others zero.
_FRESH_FIELDS = ("i_mode", "i_uid", "i_size", "i_atime", "i_ctime", "i_mtime", "i_dtime", "i_gid",
                 "i_links_count", "i_blocks", "i_flags", "i_block", "i_generation", "i_file_acl",
                 "i_size_high", "i_uid_high", "i_gid_high")
_FRESH_BASE = L.INODE.select(*_FRESH_FIELDS)
_FRESH_EXTRA = ("i_extra_isize", "i_ctime_extra", "i_mtime_extra", "i_atime_extra", "i_crtime",
                "i_crtime_extra")
#: A new large inode's i_extra_isize, as mke2fs sets it: through i_projid (past i_crtime_extra
#: the fields stay zero).
NEW_EXTRA_ISIZE = 32
#: Per large inode size, a whole new inode in one Struct: base, extra fields, zero padding.
_FRESH_WHOLE: dict[int, struct.Struct] = {}



def decode_time(seconds: int, extra: int | None) -> int:
    """Nanoseconds since the epoch from a 32-bit time and its optional ``_extra`` word."""
    if extra is None:
        return seconds * 1_000_000_000
    return (seconds + ((extra & 3) << 32)) * 1_000_000_000 + (extra >> 2)


def encode_time(ns: int) -> tuple[int, int]:
    """``(32-bit seconds as stored, _extra word)`` for a time in nanoseconds (ext4 encoding)."""
    sec, nsec = divmod(ns, 1_000_000_000)
    if 0 <= sec < 0x80000000:                                   # 1970..2038: the common case
        return sec, nsec << 2
    low = ((sec + 0x80000000) & 0xFFFFFFFF) - 0x80000000      # the signed 32-bit part
    epoch = ((sec - low) >> 32) & 3
    if sec < -0x80000000 or sec >= 0x80000000 * 7:             # outside 1901..2446: clamp
        low, epoch, nsec = (-0x80000000, 0, 0) if sec < 0 else (0x7FFFFFFF, 3, 999_999_999)
    return low, epoch | (nsec << 2)


#: Per count, the ``i_block`` of that many direct blocks in a row (the rest zero).
_DIRECT_RUN = [L.pointers(n, L.I_BLOCK.size) for n in range(L.N_DIRECT + 1)]


def encode_direct_run(first: int, count: int) -> bytes:
    """``i_block`` for ``count`` (at most 12) direct blocks from ``first`` on: a small file."""
    return _DIRECT_RUN[count].pack(*range(first, first + count))


def encode_inode(isize: int, mode: int, uid: int, gid: int, size: int, links: int, blocks: int,
                 i_block: bytes, *, atime_ns: int, ctime_ns: int, mtime_ns: int,
                 crtime_ns: int | None, file_acl: int = 0, generation: int = 0, flags: int = 0,
                 dtime: int = 0, base: bytes | None = None, extra_isize: int = 0) -> bytes:
    """The bytes of an inode: the one encoder (pack, mkfs, create and every inode write).

    With ``base`` (the inode's old bytes) the fields xipfs does not model are kept as they
    were, and the ``_extra`` words written are those ``extra_isize`` covers (the crtime only
    when given); without, the inode is new: zeros around the given fields, and a large inode
    gets i_extra_isize 32 with every time's nanoseconds. A 128-byte inode stores whole seconds.
    """
    a_s, a_x = _encode_time(atime_ns)
    c_s, c_x = _encode_time(ctime_ns)
    m_s, m_x = _encode_time(mtime_ns)
    if base is None:
        cr_s, cr_x = _encode_time(crtime_ns) if crtime_ns is not None else (0, 0)
        return _encode_fresh(isize, mode, uid, gid, size, dtime, links, blocks, flags, i_block,
                             generation, file_acl, a_s, a_x, c_s, c_x, m_s, m_x, cr_s, cr_x)
    raw = bytearray(base)
    _HEAD.pack_into(raw, 0, mode, uid & 0xFFFF, size & 0xFFFFFFFF, a_s, c_s, m_s, dtime,
                    gid & 0xFFFF, links, blocks, flags)
    if S_ISREG(mode) or size >> 32:         # a directory past 4 GiB (large_dir) too, as ext4_isize_set
        _MIDDLE.pack_into(raw, _AT_BLOCK, i_block, generation, file_acl, size >> 32)
    else:                                   # i_size_high is i_dir_acl elsewhere: keep it
        _MIDDLE_NO_SIZE_HIGH.pack_into(raw, _AT_BLOCK, i_block, generation, file_acl)
    _IDS_HIGH.pack_into(raw, _AT_IDS_HIGH, (uid >> 16) & 0xFFFF, (gid >> 16) & 0xFFFF)
    extra = extra_isize
    if extra >= 16:
        _EXTRA_TIMES.pack_into(raw, _AT_EXTRA, extra, c_x, m_x, a_x)
        if extra >= 24 and crtime_ns is not None:
            _CRTIME.pack_into(raw, _AT["i_crtime"], *encode_time(crtime_ns))
    elif extra:                             # a short extra area: only the words it covers
        _EXTRA_ISIZE.pack_into(raw, _AT_EXTRA, extra)
        if extra >= 8:
            _CTIME_EXTRA.pack_into(raw, _AT["i_ctime_extra"], c_x)
        if extra >= 12:
            _MTIME_EXTRA.pack_into(raw, _AT["i_mtime_extra"], m_x)
    return bytes(raw)


def encode_new_inode(isize: int, mode: int, uid: int, gid: int, size: int, blocks: int,
                     i_block: bytes, now_ns: int, generation: int, links: int = 0, flags: int = 0) -> bytes:
    """:func:`encode_inode` of a brand-new inode, all four times ``now_ns`` (the create fast
    path: one time encoding, one struct call, no decoded object until someone looks)."""
    sec, x = encode_time(now_ns)
    return _encode_fresh(isize, mode, uid, gid, size, 0, links, blocks, flags, i_block, generation, 0,
                         sec, x, sec, x, sec, x, sec, x)


def _encode_fresh(isize: int, mode: int, uid: int, gid: int, size: int, dtime: int, links: int,
                  blocks: int, flags: int, i_block: bytes, generation: int, file_acl: int,
                  a_s: int, a_x: int, c_s: int, c_x: int, m_s: int, m_x: int, cr_s: int,
                  cr_x: int) -> bytes:
    """A new inode's bytes from encoded times, in one struct call (:func:`encode_inode`'s own
    path when there is nothing to keep)."""
    head = (mode, uid & 0xFFFF, size & 0xFFFFFFFF, a_s, c_s, m_s, dtime, gid & 0xFFFF, links, blocks,
            flags, i_block, generation, file_acl, size >> 32 if S_IFMT(mode) == S_IFREG else 0,
            (uid >> 16) & 0xFFFF, (gid >> 16) & 0xFFFF)
    if isize < 160:
        return _FRESH_BASE.pack(*head).ljust(isize, b"\0")
    whole = _FRESH_WHOLE.get(isize)
    if whole is None:
        whole = _FRESH_WHOLE[isize] = _fresh_whole(isize)
    return whole.pack(*head, NEW_EXTRA_ISIZE, c_x, m_x, a_x, cr_s, cr_x)


_FRESH_INTO_BASE = _FRESH_BASE.pack_into
_FRESH_INTO_LARGE = L.INODE_LARGE.select(*_FRESH_FIELDS, *_FRESH_EXTRA).pack_into
_TIME_LIMIT = 0x80000000 * 1_000_000_000


def encode_fresh_into(buf: bytearray, at: int, isize: int, mode: int, uid: int, gid: int, size: int,
                      links: int, blocks: int, i_block: bytes, file_acl: int, atime_ns: int,
                      ctime_ns: int, mtime_ns: int) -> None:
    """A new inode (crtime its ctime, no flags, generation 0) into ``buf[at:at + isize]``, which
    holds zeros: one struct call in place, for tables built whole (pack). Times outside
    1970..2038 go through :func:`encode_inode`."""
    a, c, m = atime_ns, ctime_ns, mtime_ns
    if not (0 <= a < _TIME_LIMIT and 0 <= c < _TIME_LIMIT and 0 <= m < _TIME_LIMIT):
        buf[at:at + isize] = encode_inode(isize, mode, uid, gid, size, links, blocks, i_block,
                                          atime_ns=a, ctime_ns=c, mtime_ns=m, crtime_ns=c,
                                          file_acl=file_acl)
        return
    a_s, a_n = divmod(a, 1_000_000_000)
    c_s, c_n = divmod(c, 1_000_000_000)
    m_s, m_n = divmod(m, 1_000_000_000)
    head = (mode, uid & 0xFFFF, size & 0xFFFFFFFF, a_s, c_s, m_s, 0, gid & 0xFFFF, links, blocks, 0,
            i_block, 0, file_acl, size >> 32 if S_IFMT(mode) == S_IFREG else 0, (uid >> 16) & 0xFFFF,
            (gid >> 16) & 0xFFFF)
    if isize >= 160:
        _FRESH_INTO_LARGE(buf, at, *head, NEW_EXTRA_ISIZE, c_n << 2, m_n << 2, a_n << 2, c_s, c_n << 2)
    else:
        _FRESH_INTO_BASE(buf, at, *head)


def _fresh_whole(isize: int) -> struct.Struct:
    """The Struct of a whole new inode of ``isize`` bytes: base, extra fields, zero padding."""
    fields = L.INODE_LARGE.select(*_FRESH_FIELDS, *_FRESH_EXTRA)
    return struct.Struct(fields.format + f"{isize - fields.size}x")


def _encode_time(ns: int) -> tuple[int, int]:
    """:func:`encode_time` with the 1970..2038 case inline (packing calls it four times an inode)."""
    if 0 <= ns < 0x80000000 * 1_000_000_000:
        sec, nsec = divmod(ns, 1_000_000_000)
        return sec, nsec << 2
    return encode_time(ns)


def encode_rdev(major: int, minor: int) -> bytes:
    """``i_block`` of a device node: the old 8-bit encoding in word 0 when it fits, else the
    new one in word 1, as Linux ext2 stores it."""
    words = [0] * L.N_BLOCKS
    if major < 256 and minor < 256:
        words[0] = (major << 8) | minor
    else:
        words[1] = (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)
    return L.I_BLOCK.pack(*words)


class Inode:
    """One decoded inode. Cheap to build; the block map is made on first use."""

    __slots__ = (
        "volume", "ino", "mode", "uid", "gid", "size", "links", "blocks", "flags", "file_acl",
        "generation", "dtime", "atime_ns", "mtime_ns", "ctime_ns", "crtime_ns", "i_block",
        "extra_isize", "_map", "_stat", "_dir", "_raw", "_dx",
    )

    def __init__(self, volume: Volume, ino: int, raw: memoryview | bytes) -> None:
        # Kept only where the inode may be written back (fields xipfs does not model survive).
        self._raw = b"" if volume.readonly else bytes(raw)
        self.volume = volume
        self.ino = ino
        self._map: BlockMap | None = None
        self._stat = None
        self._dir = None
        self._dx = None              # an htree directory's index blocks, once read (dir.htree_lookup)
        self.crtime_ns = None
        if volume.isize >= 160:
            (mode, uid_lo, size_lo, atime, ctime, mtime, dtime, gid_lo, links, blocks, flags, _osd1,
             self.i_block, self.generation, file_acl, size_high, _faddr, blocks_hi, acl_high, uid_hi,
             gid_hi, _csum, extra, _csum_hi, c_x, m_x, a_x, cr, cr_x, _vh, _pid) = _LARGE_UNPACK(raw, 0)
        else:
            (mode, uid_lo, size_lo, atime, ctime, mtime, dtime, gid_lo, links, blocks, flags, _osd1,
             self.i_block, self.generation, file_acl, size_high, _faddr, blocks_hi, acl_high, uid_hi,
             gid_hi, _csum) = _BASE_UNPACK(raw, 0)
            extra = raw[128] | (raw[129] << 8) if volume.isize > 128 else 0
        self.mode = mode
        self.uid = uid_lo | (uid_hi << 16)
        self.gid = gid_lo | (gid_hi << 16)
        # Linux ext2 uses i_size_high only for regular files (it was i_dir_acl elsewhere);
        # ext4 with large_dir for directories too (``ext4_isize``).
        self.size = (size_lo | (size_high << 32) if (mode & 0o170000) == 0o100000 or volume.large_dir
                     else size_lo)
        self.links = links
        if volume.huge_file:                     # 48-bit i_blocks, in fs blocks when flagged
            blocks |= blocks_hi << 32
            if flags & L.FL_HUGE_FILE:
                blocks *= volume.bs >> 9
        self.blocks = blocks
        self.flags = flags
        self.file_acl = file_acl | (acl_high << 32) if volume.is64 else file_acl
        self.dtime = dtime
        self.extra_isize = extra
        if extra >= 16 and volume.isize >= 160:  # the common large inode: every time has _extra
            if extra & 3 or 128 + extra > volume.isize:
                raise CorruptImageError(f"i_extra_isize {extra} invalid", f"inode {ino}")
            self.atime_ns = (atime + ((a_x & 3) << 32)) * 1_000_000_000 + (a_x >> 2)
            self.mtime_ns = (mtime + ((m_x & 3) << 32)) * 1_000_000_000 + (m_x >> 2)
            self.ctime_ns = (ctime + ((c_x & 3) << 32)) * 1_000_000_000 + (c_x >> 2)
            if extra >= 24:
                self.crtime_ns = (cr + ((cr_x & 3) << 32)) * 1_000_000_000 + (cr_x >> 2)
            return
        if not extra:                            # 128-byte inodes (or no _extra): seconds only
            self.atime_ns = atime * 1_000_000_000
            self.mtime_ns = mtime * 1_000_000_000
            self.ctime_ns = ctime * 1_000_000_000
            return
        if extra & 3 or 128 + extra > volume.isize:
            raise CorruptImageError(f"i_extra_isize {extra} invalid", f"inode {ino}")
        x = _EXTRA_UNPACK(bytes(raw[128:128 + extra]).ljust(32, b"\0"), 0)
        self.atime_ns = decode_time(atime, x[4] if extra >= 16 else None)
        self.mtime_ns = decode_time(mtime, x[3] if extra >= 12 else None)
        self.ctime_ns = decode_time(ctime, x[2] if extra >= 8 else None)

    # -- writing ----------------------------------------------------------------------------
    def clip_times(self) -> None:
        """Drop the nanoseconds the inode cannot store (no ``_extra`` time fields)."""
        extra = self.extra_isize
        if extra < 16:
            if extra < 8:
                self.ctime_ns -= self.ctime_ns % 1_000_000_000
            if extra < 12:
                self.mtime_ns -= self.mtime_ns % 1_000_000_000
            self.atime_ns -= self.atime_ns % 1_000_000_000

    def encode(self) -> bytes:
        """The on-disk bytes of this inode, fields this class does not model kept as they were."""
        self.clip_times()
        self._raw = raw = encode_inode(
            len(self._raw), self.mode, self.uid, self.gid, self.size, self.links, self.blocks,
            self.i_block, atime_ns=self.atime_ns, ctime_ns=self.ctime_ns, mtime_ns=self.mtime_ns,
            crtime_ns=self.crtime_ns, file_acl=self.file_acl, generation=self.generation,
            flags=self.flags, dtime=self.dtime, base=self._raw, extra_isize=self.extra_isize)
        return raw

    def reset_map(self) -> None:
        """Forget the cached block map and stat (after the block tree or the size changed)."""
        self._map = None
        self._stat = None

    # -- type -------------------------------------------------------------------------------
    @property
    def is_dir(self) -> bool:
        return S_ISDIR(self.mode)

    @property
    def is_reg(self) -> bool:
        return S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return S_ISLNK(self.mode)

    @property
    def st_blocks(self) -> int:
        """``st_blocks`` as Linux reports it: ``i_blocks``, plus the size in sectors for a
        regular file with inline data (``ext4_file_getattr``: so that tar and rsync do not take
        it for a hole)."""
        if (self.flags & L.FL_INLINE_DATA and S_ISREG(self.mode)
                and self.volume.inode_formats & L.FL_INLINE_DATA):
            return self.blocks + ((self.size + 511) >> 9)
        return self.blocks

    @property
    def rdev(self) -> tuple[int, int]:
        """``(major, minor)`` of a character or block device, in either encoding Linux uses."""
        b0, b1 = _I_BLOCK(self.i_block)[:2]
        if b0:
            return (b0 >> 8) & 0xFF, b0 & 0xFF
        return (b1 >> 8) & 0xFFF, (b1 & 0xFF) | ((b1 >> 12) & 0xFFF00)

    def check_format(self) -> None:
        """Refuse an inode whose flags name a format its filesystem does not have (extents
        on ext2, say), and an encrypted file or directory, whose bytes are ciphertext."""
        foreign = self.flags & L.FL_FOREIGN_FORMAT & ~self.volume.inode_formats
        if foreign:
            names = [n for bit, n in L.FOREIGN_FLAG_NAMES.items() if foreign & bit]
            raise CorruptImageError(
                f"inode flag {', '.join(names)} without the filesystem feature", f"inode {self.ino}")
        if self.flags & L.FL_ENCRYPT:
            raise OSError(errno.ENOKEY, f"inode {self.ino} is encrypted (fscrypt), and xipfs holds no keys")
        if self.flags & L.FL_EXTENTS and self.flags & L.FL_INLINE_DATA:
            raise CorruptImageError("inode flagged both extents and inline data", f"inode {self.ino}")

    @property
    def map(self) -> BlockMapping:
        """The block map of the inode's scheme (created on first use): ``bmap.block_map``."""
        m = self._map
        if m is None:
            m = self._map = block_map(self)
        return m

    def __repr__(self) -> str:
        return f"<Inode {self.ino} mode={_stat.filemode(self.mode)} size={self.size}>"


_I_BLOCK = L.I_BLOCK.unpack


_CSUM_LO_AT = _AT["i_checksum_lo"]
_CSUM_HI_AT = _AT["i_checksum_hi"]
_GENERATION_AT = _AT["i_generation"]
_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from


def _has_hi(raw: bytes | memoryview) -> bool:
    """Whether the inode's ``i_extra_isize`` reaches ``i_checksum_hi`` (32-bit checksum)."""
    return len(raw) > 128 and (raw[128] | raw[129] << 8) >= 4


def _seed(vol: Volume, ino: int, raw: bytes) -> int:
    """Inode ``ino``'s checksum seed (the filesystem's, its number, its generation)."""
    return inode_seed(vol.sb.csum_seed, ino, _U32(raw, _GENERATION_AT)[0])


def inode_checksum(vol: Volume, ino: int, data: bytes) -> tuple[int, bool]:
    """``(crc32c, whether the high half is stored)`` of inode ``ino``'s bytes ``data``, with its
    checksum fields taken as zero (16 bits in a 128-byte inode, 32 when ``i_extra_isize``
    reaches ``i_checksum_hi``)."""
    has_hi = _has_hi(data)
    if has_hi:
        zeroed = (data[:_CSUM_LO_AT] + b"\0\0" + data[_CSUM_LO_AT + 2:_CSUM_HI_AT] + b"\0\0"
                  + data[_CSUM_HI_AT + 2:])
    else:
        zeroed = data[:_CSUM_LO_AT] + b"\0\0" + data[_CSUM_LO_AT + 2:]
    return crc32c_raw(_seed(vol, ino, data), zeroed), has_hi


def seal_inode(vol: Volume, ino: int, raw: bytes) -> bytes:
    """``raw`` with its checksum set (metadata_csum; else ``raw`` itself): what a writer stores."""
    if not vol.sb.metadata_csum:
        return raw
    raw = bytes(raw)
    crc, has_hi = inode_checksum(vol, ino, raw)
    return _with_checksum(raw, crc, has_hi)


_LINKS_AT = _AT["i_links_count"]


@functools.cache
def _one_link_delta(isize: int) -> int:
    """``crc32c_raw(0, X)`` for X the difference between an inode with 1 link and with 0.

    CRC is linear (``raw(s, a) ^ raw(s, b) == raw(0, a ^ b)``), so once a fresh inode's
    checksum is known, the checksum with its link count set to 1 is that XOR this constant."""
    delta = bytearray(isize)
    delta[_LINKS_AT] = 1
    return crc32c_raw(0, bytes(delta))


def _with_checksum(raw: bytes, crc: int, has_hi: bool) -> bytes:
    """``raw`` with ``crc`` in its checksum fields (whatever they held)."""
    lo = (crc & 0xFFFF).to_bytes(2, "little")
    if not has_hi:
        return raw[:_CSUM_LO_AT] + lo + raw[_CSUM_LO_AT + 2:]
    return (raw[:_CSUM_LO_AT] + lo + raw[_CSUM_LO_AT + 2:_CSUM_HI_AT]
            + (crc >> 16).to_bytes(2, "little") + raw[_CSUM_HI_AT + 2:])


def seal_fresh(vol: Volume, ino: int, raw: bytes) -> tuple[bytes, bytes]:
    """A new inode as first stored (``raw``: 0 links, checksum fields zero) and as stored once
    its name exists (1 link), both sealed: the create path's two stores for one checksum.
    Without metadata_csum: ``raw`` twice (the second store is the link count alone)."""
    if not vol.sb.metadata_csum:
        return raw, raw
    linked = raw[:_LINKS_AT] + b"\1\0" + raw[_LINKS_AT + 2:]
    has_hi = _has_hi(raw)
    crc = crc32c_raw(_seed(vol, ino, raw), raw)          # the fields are zero already: no copy
    return (_with_checksum(raw, crc, has_hi),
            _with_checksum(linked, crc ^ _one_link_delta(len(raw)), has_hi))


def verify_inode(vol: Volume, ino: int, raw: memoryview | bytes) -> None:
    """Check inode ``ino``'s checksum (metadata_csum): 16 bits in a 128-byte inode, 32 when
    ``i_extra_isize`` reaches ``i_checksum_hi``. An all-zero inode (never used) passes."""
    isize = len(raw)
    data = bytes(raw)
    stored = _U16(data, _CSUM_LO_AT)[0]
    crc, has_hi = inode_checksum(vol, ino, data)
    if has_hi:
        stored |= _U16(data, _CSUM_HI_AT)[0] << 16
    if (crc if has_hi else crc & 0xFFFF) != stored and data.count(0) != isize:
        raise CorruptImageError("inode checksum does not match", f"inode {ino}")
