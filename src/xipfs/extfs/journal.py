"""JBD2, the ext4 journal, read side: the journal superblock and recovery into an overlay.

Recovery is ``jbd2_journal_recover`` (Linux ``fs/jbd2/recovery.c``; e2fsprogs 1.47 compiles the
same file as ``e2fsck/recovery.c``) pass for pass: PASS_SCAN finds the end of the log and checks
the descriptor, revoke and commit checksums, PASS_REVOKE collects the revoke records of the
committed transactions, PASS_REPLAY takes the newest logged copy of every block not revoked by
the same or a later transaction. Nothing is written: :func:`recover` returns the replayed blocks
as an :class:`Overlay` that a reader serves in place of the image's blocks, so the image stays
byte-for-byte untouched; :func:`apply` and :func:`recovered_superblock` are the write side.

The module knows nothing of the volume: the caller maps journal block numbers to bytes (the
journal inode's block map) and says how large the filesystem and the journal inode are. All
JBD2 integers are big-endian. Anything malformed raises :class:`CorruptImageError` naming what
and where; the scan is bounded by the journal's length, so a hostile log cannot hang it.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

from ..errors import CorruptImageError, UnsupportedFeatureError
from .csum import crc32c_raw

__all__ = [
    "JBD2_MAGIC",
    "JournalSuperblock",
    "Overlay",
    "apply",
    "crc32_be",
    "parse_superblock",
    "recover",
    "recovered_superblock",
]

JBD2_MAGIC = 0xC03B3998

# h_blocktype
DESCRIPTOR_BLOCK = 1
COMMIT_BLOCK = 2
SUPERBLOCK_V1 = 3
SUPERBLOCK_V2 = 4
REVOKE_BLOCK = 5
FC_BLOCK = 6

# journal superblock features
COMPAT_CHECKSUM = 0x1
INCOMPAT_REVOKE = 0x1
INCOMPAT_64BIT = 0x2
INCOMPAT_ASYNC_COMMIT = 0x4
INCOMPAT_CSUM_V2 = 0x8
INCOMPAT_CSUM_V3 = 0x10
INCOMPAT_FAST_COMMIT = 0x20
KNOWN_COMPAT = COMPAT_CHECKSUM
KNOWN_INCOMPAT = 0x3F
KNOWN_RO_COMPAT = 0

# descriptor tag flags (the low 16 bits; tag3 stores them in a be32 whose low half is here too)
FLAG_ESCAPE = 0x1
FLAG_SAME_UUID = 0x2
FLAG_DELETED = 0x4
FLAG_LAST_TAG = 0x8

CRC32_CHKSUM = 1           # commit h_chksum_type of COMPAT_CHECKSUM (v1)
CRC32_CHKSUM_SIZE = 4
CRC32C_CHKSUM = 4          # s_checksum_type of csum v2/v3
MIN_JOURNAL_BLOCKS = 1024  # JBD2_MIN_JOURNAL_BLOCKS
DEFAULT_FC_BLOCKS = 256    # s_num_fc_blks 0 means this
SUPERBLOCK_SIZE = 1024     # sizeof(journal_superblock_t): what its checksum covers
USERS_MAX = 48
EXT4_FC_TAG_HEAD = 0x0009

_M32 = 0xFFFFFFFF
_HEADER = struct.Struct(">III")
_SB = struct.Struct(">IIIIIIIIiIII16sIIIIB3xII")   # the first 0x5C bytes of journal_superblock_t

_COMPAT_NAMES = {COMPAT_CHECKSUM: "journal_checksum"}
_INCOMPAT_NAMES = {
    INCOMPAT_REVOKE: "journal_incompat_revoke",
    INCOMPAT_64BIT: "journal_64bit",
    INCOMPAT_ASYNC_COMMIT: "journal_async_commit",
    INCOMPAT_CSUM_V2: "journal_checksum_v2",
    INCOMPAT_CSUM_V3: "journal_checksum_v3",
    INCOMPAT_FAST_COMMIT: "journal_fast_commit",
}


# -- checksums -----------------------------------------------------------------------------------
_REV8 = bytes(int(f"{i:08b}"[::-1], 2) for i in range(256))


def _rev32(x: int) -> int:
    return int(f"{x & _M32:032b}"[::-1], 2)


def crc32_be(crc: int, data: bytes | bytearray | memoryview) -> int:
    """Linux ``crc32_be``: MSB-first CRC-32 (poly 0x04C11DB7), no inversions; the v1 commit sum.

    Computed as the bit-reversal of zlib's reflected CRC over bit-reversed bytes, so it runs in C.
    """
    raw = zlib.crc32(bytes(data).translate(_REV8), _rev32(crc) ^ _M32) ^ _M32
    return _rev32(raw)


def _tid_gt(a: int, b: int) -> bool:
    """``tid_gt``: transaction IDs compare modulo 2**32 (``(int)(a - b) > 0``)."""
    d = (a - b) & _M32
    return d != 0 and d < 0x80000000


def _tid_geq(a: int, b: int) -> bool:
    """``tid_geq``: ``(int)(a - b) >= 0``."""
    return ((a - b) & _M32) < 0x80000000


# -- the journal superblock ----------------------------------------------------------------------
def _uuid_str(u: bytes) -> str:
    h = u.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _feature_names(bits: int, table: dict[int, str], kind: str) -> list[str]:
    return [table.get(1 << n, f"FEATURE_{kind}{n}") for n in range(32) if bits >> n & 1]


class JournalSuperblock(NamedTuple):
    """The journal superblock (log block 0), fields as stored; the features as a v2 journal sees them."""

    blocktype: int           #: 3 (v1) or 4 (v2)
    blocksize: int
    maxlen: int              #: journal length in blocks, the superblock included
    first: int               #: first log block (1)
    sequence: int            #: first transaction ID expected in the log
    start: int               #: log block of that transaction; 0 = the journal is empty
    errno: int               #: signed; nonzero makes e2fsck set ERROR_FS
    feature_compat: int
    feature_incompat: int
    feature_ro_compat: int
    uuid: bytes
    nr_users: int
    dynsuper: int
    max_transaction: int
    max_trans_data: int
    checksum_type: int
    num_fc_blks: int         #: as stored (0 means 256 when fast_commit is on)
    head: int                #: s_head, kept by Linux 6.x (0 from older writers)
    checksum: int
    users: tuple[bytes, ...] = ()
    checksum_ok: bool = True  #: the v2/v3 superblock checksum matches (True without csum v2/v3)

    # -- features (v1 superblocks have none: jbd2_format_support_feature) --
    @property
    def version(self) -> int:
        """1 or 2: the superblock format."""
        return 1 if self.blocktype == SUPERBLOCK_V1 else 2

    def _incompat(self, bit: int) -> bool:
        return self.version >= 2 and bool(self.feature_incompat & bit)

    @property
    def has_revoke(self) -> bool:
        """INCOMPAT_REVOKE: the log may hold revoke blocks (recovery reads them regardless)."""
        return self._incompat(INCOMPAT_REVOKE)

    @property
    def is_64bit(self) -> bool:
        """INCOMPAT_64BIT: tags and revoke records carry 64-bit block numbers."""
        return self._incompat(INCOMPAT_64BIT)

    @property
    def async_commit(self) -> bool:
        """INCOMPAT_ASYNC_COMMIT: a bad commit checksum does not mark the transaction failed."""
        return self._incompat(INCOMPAT_ASYNC_COMMIT)

    @property
    def csum_v1(self) -> bool:
        """COMPAT_CHECKSUM: commit blocks carry a crc32_be of their descriptors and data."""
        return self.version >= 2 and bool(self.feature_compat & COMPAT_CHECKSUM)

    @property
    def csum_v2(self) -> bool:
        """INCOMPAT_CSUM_V2: crc32c block checksums, 16-bit in the tags."""
        return self._incompat(INCOMPAT_CSUM_V2)

    @property
    def csum_v3(self) -> bool:
        """INCOMPAT_CSUM_V3: crc32c block checksums, 32-bit in 16-byte tag3 tags."""
        return self._incompat(INCOMPAT_CSUM_V3)

    @property
    def csum_v2or3(self) -> bool:
        """Descriptor, revoke and commit blocks end in a crc32c; so does the superblock."""
        return self.csum_v2 or self.csum_v3

    @property
    def fast_commit(self) -> bool:
        """INCOMPAT_FAST_COMMIT: the last ``fc_blocks`` blocks are the fast-commit area."""
        return self._incompat(INCOMPAT_FAST_COMMIT)

    @property
    def fc_blocks(self) -> int:
        """Blocks of the fast-commit area (0 without fast_commit)."""
        if not self.fast_commit:
            return 0
        return self.num_fc_blks or DEFAULT_FC_BLOCKS

    @property
    def last(self) -> int:
        """One past the last log block (``j_last``): the log wraps from here to ``first``."""
        return self.maxlen - self.fc_blocks

    @property
    def csum_seed(self) -> int:
        """J = crc32c_raw(~0, uuid), the seed of every v2/v3 block checksum."""
        return crc32c_raw(_M32, self.uuid)

    @property
    def tag_bytes(self) -> int:
        """``journal_tag_bytes``: 16 with csum v3, else 8, +4 with 64bit, +2 with csum v2."""
        if self.csum_v3:
            return 16
        return 8 + (4 if self.is_64bit else 0) + (2 if self.csum_v2 else 0)

    @property
    def needs_recovery(self) -> bool:
        """``s_start != 0``: the log holds transactions not yet checkpointed."""
        return self.start != 0

    def feature_names(self) -> list[str]:
        """The feature names dumpe2fs prints (unknown bits as ``FEATURE_<C|I|R><bit>``)."""
        return (_feature_names(self.feature_compat, _COMPAT_NAMES, "C")
                + _feature_names(self.feature_incompat, _INCOMPAT_NAMES, "I")
                + _feature_names(self.feature_ro_compat, {}, "R"))

    def listed_fc_blocks(self, fs_fast_commit: bool | None) -> int:
        """The fast-commit length dumpe2fs lists: s_num_fc_blks (0: 256) when the filesystem has
        fast_commit (None: when the journal has its bit), else 0."""
        if fs_fast_commit is None:
            return self.fc_blocks
        return (self.num_fc_blks or DEFAULT_FC_BLOCKS) if fs_fast_commit else 0

    def describe(self, fs_block_size: int | None = None,
                 fs_fast_commit: bool | None = None) -> list[tuple[str, str]]:
        """The Journal section of ``dumpe2fs -h`` (e2p_list_journal_super, 1.47) as (label, value).

        ``fs_fast_commit``: the filesystem's fast_commit feature, which is what dumpe2fs sizes the
        fast-commit area by (the journal's own bit is set only while Linux has it mounted);
        None: the journal's bit."""
        fc_blocks = self.listed_fc_blocks(fs_fast_commit)
        out: list[tuple[str, str]] = []
        names = self.feature_names()
        out.append(("Journal features", " ".join(names) if names else "(none)"))
        size = (self.blocksize // 1024) * self.maxlen
        out.append(("Total journal size", f"{size}k" if size < 8192 else f"{size >> 10}M"))
        if fs_block_size is not None and fs_block_size != self.blocksize:
            out.append(("Journal block size", str(self.blocksize)))
        out.append(("Total journal blocks", str(self.maxlen)))
        out.append(("Max transaction length", str(self.maxlen - fc_blocks)))
        out.append(("Fast commit length", str(fc_blocks)))
        if self.first != 1:
            out.append(("Journal first block", str(self.first)))
        out.append(("Journal sequence", f"0x{self.sequence:08x}"))
        out.append(("Journal start", str(self.start)))
        if self.nr_users != 1:
            out.append(("Journal number of users", str(self.nr_users)))
        if self.feature_compat & COMPAT_CHECKSUM:
            out.append(("Journal checksum type", "crc32"))
        if self.feature_incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3):
            out.append(("Journal checksum type", "crc32c" if self.checksum_type == CRC32C_CHKSUM
                        else "unknown"))
            out.append(("Journal checksum", f"0x{self.checksum:08x}"))
        if self.nr_users > 1 or (self.users and any(self.users[0])):
            for i, u in enumerate(self.users[:min(self.nr_users, USERS_MAX)]):
                out.append(("Journal users" if i == 0 else "", _uuid_str(u)))
        if self.errno:
            out.append(("Journal errno", str(self.errno)))
        return out


def superblock_checksum(block: bytes | bytearray | memoryview) -> int:
    """crc32c_raw(~0, jsb[0:1024] with s_checksum zeroed): the v2/v3 journal superblock checksum."""
    b = bytes(block[:SUPERBLOCK_SIZE])
    return crc32c_raw(_M32, b[:0xFC] + b"\0\0\0\0" + b[0x100:])


def parse_superblock(block: bytes | bytearray | memoryview, *, verify: bool = True) -> JournalSuperblock:
    """Parse log block 0; with ``verify``, refuse what e2fsck and Linux refuse before replaying.

    Checked here (the superblock alone): magic, a v1/v2 block type, unknown incompat or ro_compat
    features, csum v2 and v3 together or with v1, a checksum type other than crc32c, the
    superblock checksum. The geometry (block size, lengths, start) is checked by :func:`recover`,
    which knows the filesystem.
    """
    where = "journal superblock"
    if len(block) < SUPERBLOCK_SIZE:
        raise CorruptImageError(f"journal superblock is {len(block)} bytes, less than 1024", where)
    b = bytes(block[:SUPERBLOCK_SIZE])
    (magic, blocktype, _seq, blocksize, maxlen, first, sequence, start, errno_, compat, incompat,
     ro_compat, uuid, nr_users, dynsuper, max_trans, max_data, csum_type, num_fc, head) = _SB.unpack_from(b)
    checksum = struct.unpack_from(">I", b, 0xFC)[0]
    users = tuple(b[0x100 + 16 * i:0x110 + 16 * i] for i in range(USERS_MAX))
    jsb = JournalSuperblock(blocktype, blocksize, maxlen, first, sequence, start, errno_, compat, incompat,
                            ro_compat, uuid, nr_users, dynsuper, max_trans, max_data, csum_type, num_fc,
                            head, checksum, users)
    if jsb.csum_v2or3:
        jsb = jsb._replace(checksum_ok=superblock_checksum(b) == checksum)
    if not verify:
        return jsb
    if magic != JBD2_MAGIC:
        raise CorruptImageError(f"bad journal superblock magic 0x{magic:08x}", where)
    if blocktype not in (SUPERBLOCK_V1, SUPERBLOCK_V2):
        raise CorruptImageError(f"journal superblock has block type {blocktype} (not 3 or 4)", where)
    if jsb.version >= 2:
        if incompat & ~KNOWN_INCOMPAT:
            raise UnsupportedFeatureError(f"journal has unknown incompat features 0x{incompat:x}",
                                          tuple(_feature_names(incompat & ~KNOWN_INCOMPAT, {}, "I")))
        if ro_compat & ~KNOWN_RO_COMPAT:
            raise UnsupportedFeatureError(f"journal has unknown ro_compat features 0x{ro_compat:x}",
                                          tuple(_feature_names(ro_compat, {}, "R")))
        if jsb.csum_v2 and jsb.csum_v3:
            raise CorruptImageError("journal has both checksum v2 and v3", where)
        if jsb.csum_v2or3 and jsb.csum_v1:
            raise CorruptImageError("journal has checksum v1 and v2/v3", where)
        if jsb.csum_v2or3:
            if csum_type != CRC32C_CHKSUM:
                raise CorruptImageError(f"journal checksum type {csum_type} is not crc32c (4)", where)
            if not jsb.checksum_ok:
                raise CorruptImageError(f"journal superblock checksum 0x{checksum:08x} does not match", where)
    return jsb


def _check_geometry(jsb: JournalSuperblock, fs_block_size: int, journal_blocks: int) -> None:
    """The checks of e2fsck_journal_load and Linux journal_check_superblock on the lengths."""
    where = "journal superblock"
    if jsb.blocksize != fs_block_size:
        raise CorruptImageError(f"journal block size {jsb.blocksize} is not the filesystem's {fs_block_size}",
                                where)
    if jsb.maxlen > journal_blocks:
        raise CorruptImageError(f"journal claims {jsb.maxlen} blocks, its inode has {journal_blocks}", where)
    if jsb.maxlen < MIN_JOURNAL_BLOCKS:
        raise CorruptImageError(f"journal of {jsb.maxlen} blocks is shorter than {MIN_JOURNAL_BLOCKS}", where)
    if jsb.fast_commit and jsb.maxlen - jsb.fc_blocks < MIN_JOURNAL_BLOCKS:
        raise CorruptImageError(f"journal of {jsb.maxlen} blocks cannot hold {jsb.fc_blocks} fast-commit "
                                "blocks", where)
    if jsb.first == 0 or jsb.first >= jsb.last:
        raise CorruptImageError(f"journal first block {jsb.first} outside 1..{jsb.last - 1}", where)
    if jsb.start and not jsb.first <= jsb.start < jsb.last:
        raise CorruptImageError(f"journal start {jsb.start} outside the log {jsb.first}..{jsb.last - 1}",
                                where)
    if jsb.nr_users > 1:
        raise UnsupportedFeatureError(f"journal shared by {jsb.nr_users} filesystems")


# -- the overlay ---------------------------------------------------------------------------------
class Overlay(Mapping[int, bytes]):
    """The result of recovery: fs block -> its replayed contents, and where the log ended.

    A reader serves ``overlay[b]`` for every block ``b in overlay`` and the image otherwise.
    """

    def __init__(self, blocks: dict[int, bytes], start_sequence: int, end_sequence: int,
                 head_block: int = 0, failed_commit: int | None = None,
                 bad_blocks: tuple[tuple[int, int], ...] = (), replays: int = 0, revokes: int = 0,
                 revoke_hits: int = 0) -> None:
        self.blocks = blocks
        #: s_sequence: the first transaction of the log
        self.start_sequence = start_sequence
        #: the first transaction not replayed (info.end_transaction)
        self.end_sequence = end_sequence
        #: log block after the last good commit (Linux s_head)
        self.head_block = head_block
        #: a transaction whose commit checksum failed (e2fsck marks fs errors)
        self.failed_commit = failed_commit
        #: (fs block, log block) of data blocks skipped for a bad tag checksum, in log order
        self.bad_blocks = bad_blocks
        self.replays = replays              #: block copies taken (a block logged twice counts twice)
        self.revokes = revokes              #: revoke records read
        self.revoke_hits = revoke_hits      #: logged blocks skipped because revoked

    def __repr__(self) -> str:
        return (f"Overlay({len(self.blocks)} blocks, sequence {self.start_sequence}.."
                f"{self.end_sequence}, replays={self.replays}, revokes={self.revokes})")

    def __getitem__(self, block: int) -> bytes:
        return self.blocks[block]

    def __iter__(self) -> Iterator[int]:
        return iter(self.blocks)

    def __len__(self) -> int:
        return len(self.blocks)

    @property
    def transactions(self) -> int:
        """How many transactions were replayed."""
        return (self.end_sequence - self.start_sequence) & _M32

    @property
    def next_sequence(self) -> int:
        """The s_sequence to store after applying: end + 1, invalidating every old commit."""
        return (self.end_sequence + 1) & _M32

    @property
    def clean(self) -> bool:
        """No data block was skipped and no commit failed: e2fsck would report no journal error."""
        return not self.bad_blocks and self.failed_commit is None


# -- recovery ------------------------------------------------------------------------------------
_SCAN, _REVOKE, _REPLAY = 0, 1, 2
_PASS_NAMES = ("scan", "revoke", "replay")


class _Info:
    """recovery_info plus what the passes hand on (revoke table, replayed blocks, errors)."""

    def __init__(self) -> None:
        self.start = 0
        self.end = 0            # 0 = not known yet (the C code's sentinel, kept: tid 0 behaves alike)
        self.head = 0
        self.failed_commit: int | None = None
        self.revoked: dict[int, int] = {}
        self.blocks: dict[int, bytes] = {}
        self.bad: list[tuple[int, int]] = []
        self.replays = self.revokes = self.revoke_hits = 0


class _Recovery:
    def __init__(self, read: Callable[[int], bytes], jsb: JournalSuperblock, fs_blocks_count: int) -> None:
        self.read_fn = read
        self.jsb = jsb
        self.bs = jsb.blocksize
        self.first = jsb.first
        self.last = jsb.last
        self.total = jsb.maxlen
        self.ring = jsb.last - jsb.first
        self.fs_blocks = fs_blocks_count
        self.tag_bytes = jsb.tag_bytes
        self.csum = jsb.csum_v2or3
        self.tail = 4 if self.csum else 0
        self.seed = jsb.csum_seed if self.csum else 0

    # -- reading the log --
    def read(self, i: int) -> bytes:
        if i >= self.total:
            raise CorruptImageError("journal log runs past the journal's end", f"journal block {i}")
        data = self.read_fn(i)
        if len(data) != self.bs:
            raise CorruptImageError(f"journal block is {len(data)} bytes, not {self.bs}",
                                    f"journal block {i}")
        return bytes(data)

    def wrap(self, v: int) -> int:
        return v - self.ring if v >= self.last else v

    # -- checksums --
    def block_tail_ok(self, buf: bytes) -> bool:
        """jbd2_descriptor_block_csum_verify (descriptor and revoke blocks)."""
        if not self.csum:
            return True
        want = struct.unpack_from(">I", buf, self.bs - 4)[0]
        return crc32c_raw(self.seed, buf[:-4] + b"\0\0\0\0") == want

    def commit_ok(self, buf: bytes) -> bool:
        """jbd2_commit_block_csum_verify: h_chksum[0] over the whole block with it zeroed."""
        if not self.csum:
            return True
        want = struct.unpack_from(">I", buf, 16)[0]
        return crc32c_raw(self.seed, buf[:16] + b"\0\0\0\0" + buf[20:]) == want

    def tag_ok(self, buf: bytes, off: int, data: bytes, seq: int) -> bool:
        """jbd2_block_tag_csum_verify: crc32c(J, be32 seq || logged block), 32 (tag3) or 16 bits."""
        if not self.csum:
            return True
        c = crc32c_raw(crc32c_raw(self.seed, struct.pack(">I", seq)), data)
        if self.jsb.csum_v3:
            return struct.unpack_from(">I", buf, off + 12)[0] == c
        return struct.unpack_from(">H", buf, off + 4)[0] == c & 0xFFFF

    def count_tags(self, buf: bytes) -> int:
        size = self.bs - self.tail
        off, nr = 12, 0
        while off + self.tag_bytes <= size:
            flags = struct.unpack_from(">H", buf, off + 6)[0]
            nr += 1
            off += self.tag_bytes
            if not flags & FLAG_SAME_UUID:
                off += 16
            if flags & FLAG_LAST_TAG:
                break
        return nr

    # -- one pass (do_one_pass) --
    def one_pass(self, info: _Info, pas: int) -> None:
        jsb = self.jsb
        next_id = jsb.sequence
        block = jsb.start
        head_block = block
        crc32_sum = _M32
        need_check_commit_time = False
        last_commit_time = 0
        consumed = 0            # log blocks stepped over: a real log is never longer than the ring
        if pas == _SCAN:
            info.start = next_id
        while True:
            if pas != _SCAN and _tid_geq(next_id, info.end):
                break
            cur = block
            buf = self.read(cur)
            if consumed > self.ring:
                raise CorruptImageError("journal log is longer than the journal",
                                        f"transaction {next_id}, journal block {cur}")
            block = self.wrap(block + 1)
            consumed += 1
            magic, btype, seq = _HEADER.unpack_from(buf)
            if magic != JBD2_MAGIC or seq != next_id:
                break
            where = f"transaction {next_id}, journal block {cur}"

            if btype == DESCRIPTOR_BLOCK:
                if not self.block_tail_ok(buf):
                    if pas != _SCAN:
                        raise CorruptImageError("journal descriptor block checksum mismatch", where)
                    need_check_commit_time = True   # maybe a stale block: the commit time decides
                if pas != _REPLAY:
                    ntags = self.count_tags(buf)
                    if pas == _SCAN and jsb.csum_v1 and not need_check_commit_time and not info.end:
                        crc32_sum = crc32_be(crc32_sum, buf)      # calc_chksums
                        for _ in range(ntags):
                            io = block
                            block = self.wrap(block + 1)
                            crc32_sum = crc32_be(crc32_sum, self.read(io))
                    else:
                        block = self.wrap(block + ntags)
                    consumed += ntags
                    continue
                block, n = self.replay(info, buf, block, next_id)
                consumed += n
                continue

            if btype == COMMIT_BLOCK:
                commit_time = struct.unpack_from(">Q", buf, 0x30)[0]
                if need_check_commit_time:
                    # a bad descriptor/revoke checksum earlier in this transaction: a commit no older
                    # than the last good one means corruption; an older one, stale blocks (the end)
                    if commit_time >= last_commit_time:
                        raise CorruptImageError("journal checksum error (descriptor or revoke block)", where)
                    break
                chksum_error = False
                if pas == _SCAN and jsb.csum_v1:
                    found = struct.unpack_from(">I", buf, 16)[0]
                    ctype, csize = buf[12], buf[13]
                    if info.end:
                        info.failed_commit = info.end
                        continue                    # C: break out of the switch, not the loop
                    if not ((crc32_sum == found and ctype == CRC32_CHKSUM and csize == CRC32_CHKSUM_SIZE)
                            or (ctype == 0 and csize == 0 and found == 0)):
                        chksum_error = True
                    else:
                        crc32_sum = _M32
                if pas == _SCAN and (chksum_error or not self.commit_ok(buf)):
                    if commit_time < last_commit_time:
                        break                       # ignore_crc_mismatch: a stale commit, the end
                    info.end = next_id
                    info.head = head_block
                    if not jsb.async_commit:
                        info.failed_commit = next_id
                        continue                    # C: break out of the switch, not the loop
                if pas == _SCAN:
                    last_commit_time = commit_time
                    head_block = block
                next_id = (next_id + 1) & _M32
                continue

            if btype == REVOKE_BLOCK:
                if pas == _SCAN and not self.block_tail_ok(buf):
                    need_check_commit_time = True
                if pas == _REVOKE:
                    self.scan_revoke(info, buf, next_id, where)
                continue

            break       # any other block type (fast-commit blocks included) ends the log

        if pas == _SCAN:
            if not info.end:
                info.end = next_id
            if not info.head:
                info.head = head_block
        elif info.end != next_id:
            raise CorruptImageError(f"journal recovery pass {_PASS_NAMES[pas]} ended at transaction "
                                    f"{next_id}, expected {info.end}", "journal")

    def scan_revoke(self, info: _Info, buf: bytes, seq: int, where: str) -> None:
        rcount = struct.unpack_from(">I", buf, 12)[0]
        if rcount > self.bs - self.tail:
            raise CorruptImageError(f"journal revoke block counts {rcount} bytes, more than the block", where)
        size = 8 if self.jsb.is_64bit else 4
        fmt = ">Q" if size == 8 else ">I"
        off = 16
        while off + size <= rcount:
            blk = struct.unpack_from(fmt, buf, off)[0]
            off += size
            old = info.revoked.get(blk)
            if old is None or _tid_gt(seq, old):
                info.revoked[blk] = seq
            info.revokes += 1

    def replay(self, info: _Info, buf: bytes, block: int, seq: int) -> tuple[int, int]:
        """The REPLAY pass over one descriptor: copy each tagged block unless revoked or bad."""
        size = self.bs - self.tail
        off = 12
        n = 0
        is64 = self.jsb.is_64bit
        while off + self.tag_bytes <= size:
            blocknr, flags = struct.unpack_from(">I", buf, off)[0], struct.unpack_from(">H", buf, off + 6)[0]
            if is64:
                blocknr |= struct.unpack_from(">I", buf, off + 8)[0] << 32
            io = block
            block = self.wrap(block + 1)
            n += 1
            data = self.read(io)
            rev = info.revoked.get(blocknr)
            if rev is not None and not _tid_gt(seq, rev):
                info.revoke_hits += 1
            elif not self.tag_ok(buf, off, data, seq):
                info.bad.append((blocknr, io))      # "JBD2: Invalid checksum recovering data block"
            else:
                if blocknr >= self.fs_blocks:
                    raise CorruptImageError(f"journal tag points to block {blocknr}, outside the filesystem "
                                            f"of {self.fs_blocks} blocks",
                                            f"transaction {seq}, journal block {io}")
                if flags & FLAG_ESCAPE:
                    data = struct.pack(">I", JBD2_MAGIC) + data[4:]
                info.blocks[blocknr] = data
                info.replays += 1
            off += self.tag_bytes
            if not flags & FLAG_SAME_UUID:
                off += 16
            if flags & FLAG_LAST_TAG:
                break
        return block, n

    def check_fast_commit(self, info: _Info) -> None:
        """Refuse a fast-commit area that continues the log: its replay is logical, not by block."""
        if not self.jsb.fast_commit or self.last + 1 >= self.total:
            return
        buf = self.read(self.last + 1)
        tag, length = struct.unpack_from("<HH", buf, 0)
        if tag == EXT4_FC_TAG_HEAD and length >= 8 and struct.unpack_from("<I", buf, 8)[0] == info.end:
            raise UnsupportedFeatureError("journal holds fast commits to replay", ("journal_fast_commit",))


def recover(journal_block: Callable[[int], bytes], fs_block_size: int, *, fs_blocks_count: int,
            journal_blocks: int, superblock: JournalSuperblock | None = None) -> Overlay:
    """Replay the journal into an :class:`Overlay` (PASS_SCAN, PASS_REVOKE, PASS_REPLAY as Linux).

    ``journal_block(i)`` returns journal block ``i`` (0 is the journal superblock);
    ``fs_blocks_count`` bounds the tags; ``journal_blocks`` is the journal inode's length in
    blocks (i_size / block size), which ``s_maxlen`` may not exceed; ``superblock`` saves
    re-parsing log block 0 (pass one :func:`parse_superblock` verified). Call it when the
    filesystem has needs_recovery (Linux discards the log otherwise). ``s_start == 0`` gives an
    empty overlay. A data block whose tag checksum fails is skipped and listed in
    ``bad_blocks``; a failed commit checksum ends the log before that transaction
    (``failed_commit``); as e2fsck both leave the other blocks replayed, and the kernel would
    refuse to mount. What makes e2fsck replay nothing and Linux refuse the journal (a corrupt
    superblock, a bad descriptor or revoke checksum in a transaction whose commit is not older
    than the last, a revoke count past its block) raises CorruptImageError, as does a tag
    pointing outside the filesystem.
    """
    jsb = superblock if superblock is not None else parse_superblock(journal_block(0))
    _check_geometry(jsb, fs_block_size, journal_blocks)
    if not jsb.start:
        return Overlay({}, jsb.sequence, jsb.sequence, 0)
    rec = _Recovery(journal_block, jsb, fs_blocks_count)
    info = _Info()
    rec.one_pass(info, _SCAN)
    rec.one_pass(info, _REVOKE)
    rec.one_pass(info, _REPLAY)
    rec.check_fast_commit(info)
    return Overlay(info.blocks, info.start, info.end, info.head, info.failed_commit, tuple(info.bad),
                   info.replays, info.revokes, info.revoke_hits)


# -- the write side ------------------------------------------------------------------------------
def apply(overlay: Overlay, write_block: Callable[[int, bytes], None]) -> None:
    """Write every replayed block (ascending order) through ``write_block(fs_block, data)``.

    Afterwards, once those writes are durable, the caller finishes recovery as e2fsck does:
    write the journal superblock from :func:`recovered_superblock` (s_start = 0, s_sequence =
    ``overlay.next_sequence``, checksum redone), then clear INCOMPAT_RECOVER (needs_recovery) in
    the filesystem superblock and redo its checksum; if ``not overlay.clean`` also clear
    EXT2_VALID_FS (e2fsck forces a full check; for a failed commit it sets EXT2_ERROR_FS). Then
    re-read the superblock and group descriptors: the replay may have rewritten them.
    """
    for blk in sorted(overlay.blocks):
        write_block(blk, overlay.blocks[blk])


def recovered_superblock(block: bytes | bytearray | memoryview, overlay: Overlay) -> bytes:
    """Journal superblock block after recovery: s_start 0, s_sequence end + 1, checksum redone."""
    b = bytearray(block)
    struct.pack_into(">I", b, 0x18, overlay.next_sequence)
    struct.pack_into(">I", b, 0x1C, 0)
    jsb = parse_superblock(b, verify=False)
    if jsb.csum_v2or3:
        struct.pack_into(">I", b, 0xFC, superblock_checksum(b))
    return bytes(b)
