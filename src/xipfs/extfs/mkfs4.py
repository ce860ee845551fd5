"""mkfs -t ext4: a new ext4 filesystem, block for block what ``mke2fs -t ext4`` (e2fsprogs 1.47) makes.

The geometry follows ``ext2fs_initialize`` (groups, inodes per group filling whole table blocks,
reserved GDT blocks for online growth, a runt last group dropped), the sizes follow mke2fs.conf
(floppy / small / default / big / huge by filesystem size) and the placement follows
``ext2fs_allocate_tables`` (flex_bg packing), then mke2fs's order: root, lost+found, the resize
inode (7), the journal (8, at the middle of the filesystem) and the orphan file (12). Every
checksum is set; groups are flagged BLOCK_UNINIT / INODE_UNINIT / ITABLE_ZEROED as mke2fs flags
them. Zero blocks of a fresh (all-zero) image are not written; on a device that may hold old data
the inode tables, the journal and the blocks mke2fs wipes are zeroed explicitly.
"""

from __future__ import annotations

import os
import platform
import struct
import sys
import uuid as uuidlib
from array import array
from bisect import bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ..device import Device
from . import layout as L
from .csum import crc16, crc32c_raw, inode_seed
from .super import group_has_super, write_seconds

#: ``mke2fs -t ext4`` of e2fsprogs 1.47 (upstream mke2fs.conf): compat 0x103C, incompat 0x22C2,
#: ro_compat 0x46B. (Debian's /etc/mke2fs.conf leaves out orphan_file and metadata_csum_seed.)
DEFAULT_FEATURES = ("has_journal", "ext_attr", "resize_inode", "dir_index", "orphan_file", "filetype",
                    "extent", "64bit", "flex_bg", "metadata_csum_seed", "sparse_super", "large_file",
                    "huge_file", "dir_nlink", "extra_isize", "metadata_csum")
#: What this mkfs makes: name -> (word, bit).
FEATURES = {
    "has_journal": ("co", L.COMPAT_HAS_JOURNAL), "ext_attr": ("co", L.COMPAT_EXT_ATTR),
    "resize_inode": ("co", L.COMPAT_RESIZE_INODE), "dir_index": ("co", L.COMPAT_DIR_INDEX),
    "orphan_file": ("co", 0x1000),
    "filetype": ("in", L.INCOMPAT_FILETYPE), "meta_bg": ("in", L.INCOMPAT_META_BG),
    "extent": ("in", L.INCOMPAT_EXTENTS), "64bit": ("in", L.INCOMPAT_64BIT),
    "flex_bg": ("in", L.INCOMPAT_FLEX_BG), "metadata_csum_seed": ("in", L.INCOMPAT_CSUM_SEED),
    "large_dir": ("in", L.INCOMPAT_LARGEDIR),
    "sparse_super": ("ro", L.RO_COMPAT_SPARSE_SUPER), "large_file": ("ro", L.RO_COMPAT_LARGE_FILE),
    "huge_file": ("ro", L.RO_COMPAT_HUGE_FILE), "uninit_bg": ("ro", L.RO_COMPAT_GDT_CSUM),
    "dir_nlink": ("ro", L.RO_COMPAT_DIR_NLINK), "extra_isize": ("ro", L.RO_COMPAT_EXTRA_ISIZE),
    "metadata_csum": ("ro", L.RO_COMPAT_METADATA_CSUM),
}
_ALIASES = {"extents": "extent", "gdt_csum": "uninit_bg", "csum_seed": "metadata_csum_seed"}

#: ``new_inode(mode, size, blocks_512, flags, i_block, links)``: a new inode's bytes, as mke2fs writes it.
NewInode = Callable[[int, int, int, int, bytes, int], bytearray]

LOST_FOUND_INO = 11
ORPHAN_INO = 12
ORPHAN_MAGIC = 0x0B10CA04
JBD2_MAGIC = 0xC03B3998
_EXT_MAGIC = 0xF30A
_MAX_EXTENT = 32768
_BG_ITABLE_ZEROED = 0x4
_U32 = "I" if array("I").itemsize == 4 else "L"
#: Blocks written per call when a run is built in a reused buffer.
_CHUNK_BLOCKS = 16


def feature_set(features: Iterable[str] | str | None) -> set[str]:
    """The feature names to make: the 1.47 default changed by ``features`` ("^name" drops one,
    "none" all); ValueError for a feature this mkfs cannot make."""
    names = set(DEFAULT_FEATURES)
    given = [features] if isinstance(features, str) else list(features or ())
    for f in given:
        for item in (x.strip() for x in f.split(",")):
            if not item:
                continue
            if item == "none":
                names = set()
                continue
            drop = item.startswith("^")
            name = item[1:] if drop else item
            name = _ALIASES.get(name, name)
            if name not in FEATURES:
                raise ValueError(f"feature {name!r}: xipfs mkfs -t ext4 makes only "
                                 + ", ".join(sorted(FEATURES)))
            if drop:
                names.discard(name)
            else:
                names.add(name)
                if name == "meta_bg" and "resize_inode" not in given_names(given):
                    names.discard("resize_inode")     # as -O meta_bg,^resize_inode
    if "metadata_csum" in names:
        names.discard("uninit_bg")                 # metadata_csum supersedes it (as mke2fs)
    elif "metadata_csum_seed" not in given_names(given):
        names.discard("metadata_csum_seed")        # a default that needs metadata_csum
    if "has_journal" not in names:
        names.discard("orphan_file")               # mke2fs drops it without a journal
    for need, what in (("extent", "xipfs mkfs -t ext4 makes extent-mapped files (use -t ext2)"),
                       ("filetype", "xipfs writes typed directory entries")):
        if need not in names:
            raise ValueError(f"feature {need!r} cannot be dropped: {what}")
    if "meta_bg" in names and "resize_inode" in names:
        raise ValueError("the resize_inode and meta_bg features are not compatible")
    if "resize_inode" in names and "sparse_super" not in names:
        raise ValueError("resize_inode needs sparse_super (drop it with ^resize_inode)")
    if "metadata_csum_seed" in names and "metadata_csum" not in names:
        raise ValueError("metadata_csum_seed needs metadata_csum")
    return names


def given_names(given: list[str]) -> set[str]:
    """The feature names asked for explicitly (without "^")."""
    return {_ALIASES.get(x.strip(), x.strip()) for f in given for x in f.split(",") if x.strip()}


def feature_words(names: set[str]) -> tuple[int, int, int]:
    """``(compat, incompat, ro_compat)`` of a feature set."""
    words = {"co": 0, "in": 0, "ro": 0}
    for name in names:
        kind, bit = FEATURES[name]
        words[kind] |= bit
    return words["co"], words["in"], words["ro"]


def size_type(size: int) -> str:
    """mke2fs.conf's size type of a filesystem of ``size`` bytes."""
    if size < 3 << 20:
        return "floppy"
    if size < 512 << 20:
        return "small"
    if size < 4 << 40:
        return "default"
    return "big" if size < 16 << 40 else "huge"


#: Block size and inode ratio per size type (upstream mke2fs.conf).
SIZE_TYPES = {"floppy": (1024, 8192), "small": (1024, 4096), "default": (4096, 16384),
              "big": (4096, 32768), "huge": (4096, 65536)}


def default_journal_blocks(blocks: int) -> int:
    """``ext2fs_default_journal_size``: journal blocks by filesystem blocks (0: too small for one)."""
    if blocks < 2048:
        return 0
    if blocks < 32768:
        return 1024
    if blocks < 256 * 1024:
        return 4096
    if blocks < 512 * 1024:
        return 8192
    if blocks < 4096 * 1024:
        return 16384
    if blocks < 8192 * 1024:
        return 32768
    if blocks < 16384 * 1024:
        return 65536
    if blocks < 32768 * 1024:
        return 131072
    return 262144


def default_orphan_blocks(blocks: int) -> int:
    """``ext2fs_default_orphan_file_blocks``: 32 to 512 blocks, 1/4096 of the filesystem between."""
    if blocks < 128 * 1024:
        return 32
    if blocks < 2 * 1024 * 1024:
        return blocks // 4096
    return 512


@dataclass
class Geometry4:
    """Where everything of the new filesystem goes (blocks are filesystem block numbers)."""

    bs: int
    blocks: int
    first_data_block: int
    bpg: int
    groups: int
    ipg: int
    isize: int
    desc_size: int
    desc_blocks: int
    itable_blocks: int
    reserved_gdt: int
    r_blocks: int
    features: set[str]
    log_flex: int
    first_meta_bg: int = 0
    block_bitmap: list[int] = field(default_factory=list)
    inode_bitmap: list[int] = field(default_factory=list)
    inode_table: list[int] = field(default_factory=list)

    @property
    def sparse(self) -> bool:
        return "sparse_super" in self.features

    def group_start(self, g: int) -> int:
        return self.first_data_block + g * self.bpg

    def group_blocks(self, g: int) -> int:
        return min(self.bpg, self.blocks - self.group_start(g))

    def has_super(self, g: int) -> bool:
        return group_has_super(g, self.sparse)

    def super_and_gdt(self, g: int) -> list[tuple[int, int]]:
        """``(start, count)`` runs of group ``g``'s superblock copy, descriptors and reserved GDT."""
        first = self.group_start(g)
        sup = self.has_super(g)
        out = []
        if sup:
            out.append((first, 1))
        dpb = self.bs // self.desc_size
        meta_bg = "meta_bg" in self.features
        if not meta_bg:
            if sup:
                out.append((first + 1, self.desc_blocks + self.reserved_gdt))
        else:
            if sup and self.first_meta_bg:
                out.append((first + 1, self.first_meta_bg))
            m, k = divmod(g, dpb)
            if m >= self.first_meta_bg and k in (0, 1, dpb - 1):
                out.append((first + sup, 1))
        return [(a, n) for a, n in out if n]


class Space:
    """The used blocks of the filesystem being made: sorted, merged ``[start, end)`` runs, with
    the searches of e2fsprogs' allocator (``ext2fs_get_free_blocks2``, ``find_first_zero``)."""

    def __init__(self, first: int, count: int) -> None:
        self.first = first
        self.count = count
        self.s: list[int] = []
        self.e: list[int] = []

    def mark(self, a: int, n: int) -> None:
        """Mark ``n`` blocks from ``a`` used."""
        if n <= 0:
            return
        s, e = self.s, self.e
        b = a + n
        i = bisect_right(s, a)
        if i and e[i - 1] >= a:
            i -= 1
            a = s[i]
            b = max(b, e[i])
        j = i
        while j < len(s) and s[j] <= b:
            b = max(b, e[j])
            j += 1
        s[i:j] = [a]
        e[i:j] = [b]

    def used_run(self, a: int, n: int) -> tuple[int, int] | None:
        """The first used run that meets ``[a, a+n)``, as ``(start, end)``, or None."""
        i = bisect_right(self.s, a) - 1
        if i >= 0 and self.e[i] > a:
            return self.s[i], self.e[i]
        i += 1
        if i < len(self.s) and self.s[i] < a + n:
            return self.s[i], self.e[i]
        return None

    def first_free(self, a: int, last: int) -> int | None:
        """The first free block in ``[a, last]``."""
        i = bisect_right(self.s, a) - 1
        if i >= 0 and self.e[i] > a:
            a = self.e[i]
        return a if a <= last else None

    def get_free_blocks(self, start: int, finish: int, num: int) -> int | None:
        """``ext2fs_get_free_blocks2``: the first start position from ``start`` (not reaching
        ``finish``; wrapping when ``finish <= start``) of ``num`` free blocks."""
        b = start or self.first
        if not finish:
            finish = start
        num = max(num, 1)
        wrapped = False
        while True:
            if b + num - 1 >= self.count:
                if finish > start or wrapped:
                    return None
                b, wrapped = self.first, True
                if b == finish:
                    return None
            run = self.used_run(b, num)
            if run is None:
                return b
            nb = run[1]
            if b < finish <= nb:
                return None
            b = nb

    def used_in(self, a: int, b: int) -> int:
        """How many blocks of ``[a, b)`` are used."""
        s, e = self.s, self.e
        i = max(bisect_right(s, a) - 1, 0)
        n = 0
        while i < len(s) and s[i] < b:
            lo, hi = max(s[i], a), min(e[i], b)
            if hi > lo:
                n += hi - lo
            i += 1
        return n

    def runs_in(self, a: int, b: int) -> Iterable[tuple[int, int]]:
        """The used runs clipped to ``[a, b)``."""
        s, e = self.s, self.e
        i = max(bisect_right(s, a) - 1, 0)
        while i < len(s) and s[i] < b:
            lo, hi = max(s[i], a), min(e[i], b)
            if hi > lo:
                yield lo, hi
            i += 1


def _reserved_gdt(blocks: int, first: int, bpg: int, dpb: int, desc_blocks: int, bs: int) -> int:
    """``calc_reserved_gdt_blocks``: room for 1024 x the filesystem (at most 2^32 blocks)."""
    max_blocks = 0xFFFFFFFF
    if blocks < max_blocks // 1024:
        max_blocks = blocks * 1024
    rsv_groups = -(-(max_blocks - first) // bpg)
    rsv = -(-rsv_groups // dpb) - desc_blocks
    return max(0, min(rsv, bs // 4))


def plan4(size: int, *, block_size: int | None = None, inode_size: int | None = None,
          inodes: int | None = None, inode_ratio: int | None = None,
          features: Iterable[str] | str | set[str] | None = None, reserved_percent: float = 5.0,
          flex_bg_size: int = 16) -> Geometry4:
    """The geometry of an ext4 filesystem of ``size`` bytes, as ``ext2fs_initialize`` works it
    out from mke2fs's parameters (ValueError when it cannot be made)."""
    names = set(features) if isinstance(features, set) else feature_set(features)
    stype = size_type(size)
    bs = block_size or SIZE_TYPES[stype][0]
    if bs not in (1024, 2048, 4096, 8192, 16384, 32768, 65536):
        raise ValueError(f"block size {bs}: must be a power of two from 1024 to 65536")
    isize = inode_size or 256
    if isize < 128 or isize > bs or isize & (isize - 1):
        raise ValueError(f"inode size {isize}: must be a power of two from 128 to the block size")
    ratio = inode_ratio or SIZE_TYPES[stype][1]
    if ratio < bs and inode_ratio is None:
        ratio = bs
    if not 1024 <= ratio <= 67108864:
        raise ValueError(f"inode ratio {ratio}: must be 1024 to 64 MiB")
    if flex_bg_size < 1 or flex_bg_size & (flex_bg_size - 1):
        raise ValueError(f"flex_bg size {flex_bg_size}: must be a power of two")
    if not 0 <= reserved_percent <= 50:
        raise ValueError(f"reserved blocks {reserved_percent}%: must be 0 to 50")
    limit = (1 << 48) - 1 if "64bit" in names else 0xFFFFFFFF
    blocks0 = min(size // bs, limit)
    if blocks0 > 0xFFFFFFFF:
        names.discard("resize_inode")           # as mke2fs: no online growth past 2^32 blocks
    fdb = 1 if bs == 1024 else 0
    inodes_param = inodes if inodes is not None else blocks0 * bs // ratio
    if inodes_param * isize >= blocks0 * bs:
        raise ValueError(f"{inodes_param} inodes of {isize} bytes do not fit in {size} bytes")
    r_param = int(reserved_percent * blocks0 / 100.0)
    desc_size = 64 if "64bit" in names else 32
    dpb = bs // desc_size
    bpg = min(bs * 8, 65528)
    blocks = blocks0
    r_blocks = r_param
    first_ino = L.GOOD_OLD_FIRST_INO
    ipb = bs // isize
    while True:
        groups = -(-(blocks - fdb) // bpg)
        if groups <= 0:
            raise ValueError(f"{size} bytes is too small for an ext4 filesystem")
        desc_blocks = -(-groups // dpb)
        total = max(inodes_param, first_ino + 1)
        ipg = -(-total // groups)
        if ipg > bs * 8:
            if bpg >= 256:
                bpg -= 8
                blocks, r_blocks = blocks0, r_param
                continue
            raise ValueError("too many inodes for the filesystem")
        ipg = min(ipg, 65536 - ipb)
        while True:
            itb = -(-ipg * isize // bs)
            ipg2 = itb * bs // isize
            ipg2 = max(ipg2, 8) & ~7
            itb = -(-ipg2 * isize // bs)
            if ipg2 * groups > 0xFFFFFFFF:
                ipg -= 1
                continue
            break
        ipg = ipg2
        if ipg * groups < first_ino + 1:
            raise ValueError(f"{size} bytes is too small for an ext4 filesystem: {ipg * groups} inodes")
        rsv = (_reserved_gdt(blocks, fdb, bpg, dpb, desc_blocks, bs)
               if "resize_inode" in names else 0)
        if rsv + desc_blocks > bpg * 3 // 4 and "resize_inode" in names:
            names.discard("resize_inode")       # ext2fs_initialize switches to meta_bg
            names.add("meta_bg")
            rsv = 0
        overhead = 3 + itb + rsv + (1 if "meta_bg" in names else desc_blocks)
        if overhead > bpg:
            raise ValueError("too many inodes for the block groups")
        overhead = 2 + itb
        if group_has_super(groups - 1, "sparse_super" in names):
            overhead += 1 + desc_blocks + rsv
        rem = (blocks - fdb) % bpg
        if groups == 1 and rem and rem < overhead:
            raise ValueError(f"{size} bytes is too small for an ext4 filesystem with {bs}-byte blocks")
        if rem and rem < overhead + 50:
            blocks -= rem
            pct = 100.0 * r_param / blocks0
            r_blocks = int(pct * blocks / 100.0)
            continue
        break
    log_flex = flex_bg_size.bit_length() - 1 if "flex_bg" in names else 0
    return Geometry4(bs, blocks, fdb, bpg, groups, ipg, isize, desc_size, desc_blocks, itb, rsv,
                     r_blocks, names, log_flex)


class _Maker:
    """One run of mkfs: the allocator state, the group counters and the writes."""

    def __init__(self, dev: Device, geo: Geometry4, zeroed: bool, now: int) -> None:
        self.dev = dev
        #: New blocks of a memory image go in through pwrite (no page fault per page)
        self._write = getattr(dev, "write_new", dev.write) if zeroed else dev.write
        self.geo = geo
        self.zeroed = zeroed
        self.now = now
        self.written = 0
        self.space = Space(geo.first_data_block, geo.blocks)
        n = geo.groups
        self.free = [0] * n
        self.flags = [0] * n
        self.unused = [0] * n
        self.free_inodes = [geo.ipg] * n
        self.dirs = [0] * n
        self.used_inodes: list[int] = []
        self.csum = "metadata_csum" in geo.features
        self.gdt_csum = self.csum or "uninit_bg" in geo.features
        self.seed = 0

    # -- writes ---------------------------------------------------------------------------------
    def write(self, data: bytes, offset: int) -> None:
        self._write(data, offset)
        self.written += len(data)

    def zero(self, blk: int, count: int) -> None:
        """Zero ``count`` blocks from ``blk`` unless the image is known all zeros."""
        if self.zeroed or count <= 0:
            return
        bs = self.geo.bs
        chunk = bytes(min(count * bs, 1 << 20))
        pos, end = blk * bs, (blk + count) * bs
        while pos < end:
            n = min(len(chunk), end - pos)
            self.write(chunk[:n], pos)
            pos += n

    def write_block(self, blk: int, data: bytes) -> None:
        """Write a block, skipped when it is all zeros on a zeroed image."""
        if self.zeroed and not any(data):
            return
        self.write(data, blk * self.geo.bs)

    # -- allocation (ext2fs_block_alloc_stats and friends) ------------------------------------
    def group_of(self, blk: int) -> int:
        return (blk - self.geo.first_data_block) // self.geo.bpg

    def claim(self, blk: int, n: int) -> None:
        """Take ``n`` blocks from ``blk``: used, counted out of their groups' free blocks, and
        those groups' BLOCK_UNINIT cleared."""
        self.space.mark(blk, n)
        while n:
            g = self.group_of(blk)
            take = min(n, self.geo.group_start(g) + self.geo.group_blocks(g) - blk)
            self.free[g] -= take
            self.flags[g] &= ~L.BG_BLOCK_UNINIT
            blk += take
            n -= take

    def new_block(self, goal: int) -> int:
        """``ext2fs_new_block2``: the first free block from ``goal``, wrapping to the start."""
        geo = self.geo
        if not goal or goal >= geo.blocks:
            goal = geo.first_data_block
        b = self.space.first_free(goal, geo.blocks - 1)
        if b is None and goal != geo.first_data_block:
            b = self.space.first_free(geo.first_data_block, goal - 1)
        if b is None:
            raise ValueError("the filesystem is full")
        return b

    def new_range(self, goal: int, length: int) -> tuple[int, int]:
        """``ext2fs_new_range`` (no flags): the first free run from ``goal``, up to ``length``."""
        geo = self.geo
        start = self.space.first_free(goal, geo.blocks - 1)
        if start is None:
            start = self.space.first_free(geo.first_data_block, geo.blocks - 1)
            if start is None:
                raise ValueError("the filesystem is full")
        end = min(start + length, geo.blocks)
        run = self.space.used_run(start, end - start)
        if run is not None:
            end = run[0]
        return start, end - start

    def take(self, goal: int, count: int) -> list[int]:
        """``count`` blocks taken one by one as ``ext2fs_new_block2(goal = the last one)`` takes
        them: the free blocks from ``goal`` on, in order (wrapping to the start)."""
        out: list[int] = []
        goal = goal if 0 < goal < self.geo.blocks else self.geo.first_data_block
        while len(out) < count:
            p, n = self.new_range(goal, count - len(out))
            self.claim(p, n)
            out.extend(range(p, p + n))
            goal = p + n if p + n < self.geo.blocks else self.geo.first_data_block
        return out

    def write_runs(self, blocks: list[int], data: bytes) -> None:
        """Write ``data`` (one block per entry of ``blocks``) run by run."""
        bs = self.geo.bs
        for lblk, n, pblk in _runs(blocks):
            self.write(data[lblk * bs:(lblk + n) * bs], pblk * bs)

    def alloc_inode(self, ino: int, directory: bool = False) -> None:
        """``ext2fs_inode_alloc_stats2`` of a new inode."""
        ipg = self.geo.ipg
        g, idx = divmod(ino - 1, ipg)
        self.used_inodes.append(ino)
        self.free_inodes[g] -= 1
        if directory:
            self.dirs[g] += 1
        self.flags[g] &= ~L.BG_INODE_UNINIT
        if self.gdt_csum:
            first_unused = ipg - self.unused[g] + g * ipg + 1
            if ino >= first_unused:
                self.unused[g] = g * ipg + ipg - ino

    # -- the steps of mke2fs ------------------------------------------------------------------------
    def initialize(self) -> None:
        """``ext2fs_initialize``: group counters; superblock, descriptors, reserved GDT marked."""
        geo = self.geo
        flex = geo.log_flex != 0
        reserved = L.GOOD_OLD_FIRST_INO
        for g in range(geo.groups):
            if self.gdt_csum:
                if g != geo.groups - 1:
                    self.flags[g] |= L.BG_BLOCK_UNINIT
                self.flags[g] |= L.BG_INODE_UNINIT
                n = geo.ipg
                if reserved:
                    if n > reserved:
                        n -= reserved
                        reserved = 0
                    else:
                        reserved -= n
                        n = 0
                self.unused[g] = n
            used = 0
            for a, k in geo.super_and_gdt(g):
                self.space.mark(a, k)
                used += k
            free = geo.group_blocks(g) - used - (0 if flex else 2 + geo.itable_blocks)
            self.free[g] = free

    def allocate_tables(self) -> None:
        """``ext2fs_allocate_tables``: bitmaps and inode tables, packed per flex group."""
        geo = self.geo
        sp = self.space
        ipb = geo.itable_blocks
        F = 1 << geo.log_flex if geo.log_flex else 0
        for g in range(geo.groups):
            group_blk = geo.group_start(g)
            last_blk = group_blk + geo.group_blocks(g) - 1
            if not F:
                bb = sp.get_free_blocks(group_blk, last_blk, 1)
                self._must(bb, g)
                sp.mark(bb, 1)
                ib = sp.get_free_blocks(group_blk, last_blk, 1)
                self._must(ib, g)
                sp.mark(ib, 1)
                it = sp.get_free_blocks(group_blk, last_blk, ipb)
                self._must(it, g)
                sp.mark(it, ipb)
            else:
                last_grp = min(g | (F - 1), geo.groups - 1)
                rem = last_grp - g + 1
                table_offset = F
                prev = 0
                if g % F:
                    prev = geo.block_bitmap[g - 1] + 1
                elif last_grp == geo.groups - 1:
                    table_offset = last_grp & (F - 1)
                    table_offset = table_offset + 1 if table_offset else F
                start = self._flexbg_offset(g, prev, rem, 1)
                last_blk = geo.group_start(last_grp) + geo.group_blocks(last_grp) - 1
                bb = sp.get_free_blocks(start, last_blk, 1)
                if bb is None:
                    bb = sp.get_free_blocks(group_blk, last_blk, 1)
                self._must(bb, g)
                self._take_table(bb, 1)
                prev = geo.inode_bitmap[g - 1] + 1 if g % F else bb + table_offset
                start = self._flexbg_offset(g, prev, rem, 1)
                ib = sp.get_free_blocks(start, last_blk, 1)
                if ib is None:
                    ib = sp.get_free_blocks(group_blk, last_blk, 1)
                self._must(ib, g)
                self._take_table(ib, 1)
                prev = geo.inode_table[g - 1] + ipb if g % F else ib + table_offset
                start = self._flexbg_offset(g, prev, rem, ipb)
                it = sp.get_free_blocks(start, last_blk, ipb)
                self._must(it, g)
                self._take_table(it, ipb)
            geo.block_bitmap.append(bb)
            geo.inode_bitmap.append(ib)
            geo.inode_table.append(it)

    def _must(self, blk: int | None, g: int) -> None:
        if blk is None:
            raise ValueError(f"no room for the bitmaps and inode table of group {g}")

    def _take_table(self, blk: int, n: int) -> None:
        """A flex_bg table's blocks: used, out of the free count of the group holding them."""
        self.claim(blk, n)

    def _flexbg_offset(self, g: int, start: int, rem: int, elem: int) -> int:
        """``flexbg_offset``: where the next table of a flex group should start."""
        geo = self.geo
        sp = self.space
        F = 1 << geo.log_flex
        size = min(rem * elem, geo.bpg // 4)
        if start and start < geo.blocks:
            b = sp.get_free_blocks(start, start + size, elem)
            if b is not None:
                return b
        first = geo.group_start(F * (g // F))
        last_grp = min(g | (F - 1), geo.groups - 1)
        last_blk = geo.group_start(last_grp) + geo.group_blocks(last_grp) - 1
        for a, n in ((first, size), (first, elem), (0, elem)):
            b = sp.get_free_blocks(a, last_blk, n)
            if b is not None:
                return b
        return 0

    def overhead(self) -> int:
        """Clusters in use after the tables are placed (``ext2fs_count_used_clusters``)."""
        return self.space.used_in(self.geo.first_data_block, self.geo.blocks)


def _extent_root(extents: list[tuple[int, int, int]], depth: int = 0) -> bytes:
    """A 60-byte ``i_block`` holding up to four leaf extents ``(lblk, len, pblk)``."""
    out = struct.pack("<HHHHI", _EXT_MAGIC, len(extents), 4, depth, 0)
    for lblk, n, pblk in extents:
        out += struct.pack("<IHHI", lblk, n, pblk >> 32, pblk & 0xFFFFFFFF)
    return out.ljust(60, b"\0")


def _dir_tail(seed: int, block: bytearray) -> None:
    """Store a directory leaf's checksum tail (``ext4_dir_entry_tail``)."""
    bs = len(block)
    block[bs - 12:bs - 4] = b"\0\0\0\0\x0c\0\0\xde"
    struct.pack_into("<I", block, bs - 4, crc32c_raw(seed, bytes(block[:bs - 12])))


def _dirent(ino: int, rec_len: int, name: bytes, ftype: int) -> bytes:
    return struct.pack("<IHBB", ino, rec_len, len(name), ftype) + name


def _set_bits(bits: bytearray, lo: int, hi: int) -> None:
    """Set bits ``[lo, hi)`` of a bitmap."""
    if hi <= lo:
        return
    a, b = (lo + 7) // 8, hi // 8
    if a <= b:
        bits[a:b] = b"\xff" * (b - a)
        for i in range(lo, min(a * 8, hi)):
            bits[i >> 3] |= 1 << (i & 7)
        for i in range(max(b * 8, lo), hi):
            bits[i >> 3] |= 1 << (i & 7)
    else:
        for i in range(lo, hi):
            bits[i >> 3] |= 1 << (i & 7)


def format_device4(dev: Device, *, block_size: int | None = None, inode_size: int | None = None,
                   inodes: int | None = None, inode_ratio: int | None = None, label: str | None = None,
                   uuid: str | None = None, hash_seed: str | None = None,
                   features: Iterable[str] | str | None = None, journal_size: int | None = None,
                   orphan_file_size: int | None = None, reserved_percent: float = 5.0,
                   flex_bg_size: int = 16, now: int | None = None, zeroed: bool = False,
                   size: int | None = None) -> Geometry4:
    """Write a new ext4 filesystem over ``dev`` (its first ``size`` bytes; default all of it).

    ``zeroed``: the device is known to read all zeros (a fresh file or shared-memory object),
    so zero blocks are not written. ``journal_size`` is in bytes (None: mke2fs's default by
    size; 0: no journal); ``now`` is the creation time in seconds (default: $SOURCE_DATE_EPOCH
    or the clock).
    """
    size = dev.size if size is None else size
    feats = feature_set(features)
    if journal_size == 0:
        feats.discard("has_journal")
        feats.discard("orphan_file")
    geo = plan4(size, block_size=block_size, inode_size=inode_size, inodes=inodes,
                inode_ratio=inode_ratio, features=feats, reserved_percent=reserved_percent,
                flex_bg_size=flex_bg_size)
    feats = geo.features
    bs = geo.bs
    jblocks = 0
    if "has_journal" in feats:
        jblocks = default_journal_blocks(geo.blocks) if journal_size is None else journal_size // bs
        if journal_size is not None and not 1024 <= jblocks <= 10240000:
            raise ValueError(f"journal of {journal_size} bytes: must be 1024 to 10240000 blocks")
        if jblocks > geo.blocks // 2:
            raise ValueError(f"journal of {jblocks} blocks is too big for a {geo.blocks}-block filesystem")
        if not jblocks:
            feats.discard("has_journal")
            feats.discard("orphan_file")
    if now is None:
        env = os.environ.get("SOURCE_DATE_EPOCH")
        now = int(env) if env and env.isdigit() else write_seconds()
    if label is not None and len(label.encode("utf-8")) > 16:
        raise ValueError("volume label longer than 16 bytes")
    fs_uuid = uuidlib.UUID(uuid) if uuid else uuidlib.uuid4()
    seed_uuid = uuidlib.UUID(hash_seed) if hash_seed else uuidlib.uuid4()
    m = _Maker(dev, geo, zeroed, now)
    m.seed = crc32c_raw(0xFFFFFFFF, fs_uuid.bytes)
    compat, incompat, ro = feature_words(feats)
    m.initialize()
    m.allocate_tables()
    overhead = m.overhead()
    _write(m, fs_uuid, seed_uuid, label, jblocks, orphan_file_size, overhead, compat, incompat, ro)
    return geo


def _write(m: _Maker, fs_uuid: uuidlib.UUID, seed_uuid: uuidlib.UUID, label: str | None, jblocks: int,
           orphan_file_size: int | None, overhead: int, compat: int, incompat: int, ro: int) -> None:
    geo, bs, feats = m.geo, m.geo.bs, m.geo.features
    now = m.now
    csum = m.csum
    S = m.seed
    isize = geo.isize
    large = isize >= 160
    extents = "extent" in feats
    # -- mke2fs wipes: the start of the device (zap_sector 2..7, and ours the boot area) and the
    #    last 64 KiB-aligned stretch; then the inode tables, all marked ITABLE_ZEROED
    if not m.zeroed:
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
        m.flags[g] |= _BG_ITABLE_ZEROED
    inodes: dict[int, bytearray] = {}

    def new_inode(mode: int, size: int, blocks_512: int, flags: int, i_block: bytes, links: int) -> bytearray:
        raw = bytearray(isize)
        L.INODE.struct.pack_into(raw, 0, *_inode_values(mode, size, now, links, blocks_512, flags, i_block))
        if large:
            struct.pack_into("<H", raw, 128, 32)
            struct.pack_into("<i", raw, 0x90, now)
        return raw

    # reserved inodes always carry checksums (write_reserved_inodes)
    if csum:
        for ino in range(1, L.GOOD_OLD_FIRST_INO):
            inodes[ino] = bytearray(isize)
    # root and lost+found (ext2fs_mkdir): blocks from the start of flex group 0
    goal = geo.group_start(0)
    root_blk = m.new_block(goal)
    m.claim(root_blk, 1)
    nlf = min(12, max(2, 16384 // bs))
    lf_blocks = m.take(root_blk, nlf)
    tail = 12 if csum else 0
    ft = L.FT_DIR
    root = bytearray(_dirent(2, 12, b".", ft).ljust(12, b"\0") + _dirent(2, 12, b"..", ft).ljust(12, b"\0")
                     + _dirent(LOST_FOUND_INO, bs - 24 - tail, b"lost+found", ft)).ljust(bs, b"\0")
    if csum:
        _dir_tail(inode_seed(S, 2, 0), root)
    m.write_block(root_blk, bytes(root))
    lf0 = bytearray(_dirent(LOST_FOUND_INO, 12, b".", ft).ljust(12, b"\0")
                    + _dirent(2, bs - 12 - tail, b"..", ft)).ljust(bs, b"\0")
    empty = bytearray(_dirent(0, bs - tail, b"", 0)).ljust(bs, b"\0")
    if csum:
        lseed = inode_seed(S, LOST_FOUND_INO, 0)
        _dir_tail(lseed, lf0)
        _dir_tail(lseed, empty)
    m.write_runs(lf_blocks, bytes(lf0) + bytes(empty) * (nlf - 1))
    dflag = L.FL_EXTENTS if extents else 0
    inodes[2] = new_inode(0o40755, bs, bs // 512, dflag, _runs_root([(0, 1, root_blk)]), 3)
    m.alloc_inode(2, directory=True)
    inodes[LOST_FOUND_INO] = new_inode(0o40700, nlf * bs, nlf * bs // 512, dflag,
                                       _runs_root(_runs(lf_blocks)), 2)
    m.alloc_inode(LOST_FOUND_INO, directory=True)
    for ino in range(3, L.GOOD_OLD_FIRST_INO):
        m.alloc_inode(ino)
    # the bad blocks inode: times only (ext2fs_update_bb_inode)
    bad = inodes.setdefault(1, bytearray(isize))
    struct.pack_into("<iii", bad, 8, now, now, now)
    m.alloc_inode(1)
    # resize inode (ext2fs_create_resize_inode)
    if "resize_inode" in feats:
        _resize_inode(m, inodes)
    # journal (ext2fs_add_journal_inode3)
    jnl_blocks = b""
    if jblocks:
        jnl_blocks = _journal(m, inodes, jblocks, fs_uuid, new_inode)
        overhead += jblocks
    overhead += geo.first_data_block
    # orphan file (ext2fs_create_orphan_file)
    if "orphan_file" in feats:
        n = default_orphan_blocks(geo.blocks) if orphan_file_size is None else -(-orphan_file_size // bs)
        _orphan_file(m, inodes, n, new_inode)
    # inodes, with their checksums
    for ino in sorted(inodes):
        raw = inodes[ino]
        if csum:
            _inode_csum(raw, inode_seed(S, ino, 0), isize)
        g, idx = divmod(ino - 1, geo.ipg)
        m.write(bytes(raw), geo.inode_table[g] * bs + idx * isize)
    _finish(m, fs_uuid, seed_uuid, label, jnl_blocks, overhead, compat, incompat, ro)


def _inode_values(mode: int, size: int, now: int, links: int, blocks_512: int, flags: int,
                  i_block: bytes) -> tuple[int, ...]:
    """The 128-byte inode's fields, in INODE order, of an inode mke2fs writes."""
    return (mode, 0, size & 0xFFFFFFFF, now, now, now, 0, 0, links, blocks_512 & 0xFFFFFFFF, flags, 0,
            i_block, 0, 0, size >> 32, 0, blocks_512 >> 32, 0, 0, 0, 0)


def _runs(blocks: list[int]) -> list[tuple[int, int, int]]:
    """Contiguous ``(lblk, len, pblk)`` runs of a list of device blocks."""
    out: list[tuple[int, int, int]] = []
    for i, b in enumerate(blocks):
        if out and out[-1][2] + out[-1][1] == b and out[-1][1] < _MAX_EXTENT:
            lb, n, pb = out[-1]
            out[-1] = (lb, n + 1, pb)
        else:
            out.append((i, 1, b))
    return out


def _runs_root(runs: list[tuple[int, int, int]]) -> bytes:
    if len(runs) > 4:
        raise ValueError("directory too fragmented for an in-inode extent tree")
    return _extent_root(runs)


def _inode_csum(raw: bytearray, seed: int, isize: int) -> None:
    """Store an inode's checksum (``ext2fs_inode_csum_set``)."""
    extra = struct.unpack_from("<H", raw, 128)[0] if isize > 128 else 0
    has_hi = extra >= 4
    raw[0x7C:0x7E] = b"\0\0"
    if has_hi:
        raw[0x82:0x84] = b"\0\0"
    crc = crc32c_raw(seed, bytes(raw))
    struct.pack_into("<H", raw, 0x7C, crc & 0xFFFF)
    if has_hi:
        struct.pack_into("<H", raw, 0x82, crc >> 16)


def _resize_inode(m: _Maker, inodes: dict[int, bytearray]) -> None:
    """Inode 7, block-mapped: a double-indirect block whose entries are the primary reserved GDT
    blocks, each listing its backups in the groups holding superblock copies."""
    geo, bs = m.geo, m.geo.bs
    sb_blk = geo.first_data_block
    goal = sb_blk + geo.desc_blocks + geo.reserved_gdt + 2 + geo.itable_blocks
    dind = m.new_block(goal)
    m.claim(dind, 1)
    apb = bs // 4
    backups = [g for g in range(1, geo.groups) if geo.has_super(g)]
    dbuf = [0] * apb
    rsv = geo.reserved_gdt
    first_rsv = sb_blk + 1 + geo.desc_blocks
    nblocks = 1 + rsv * (1 + len(backups))
    for i in range(rsv):
        dbuf[(geo.desc_blocks + i) % apb] = first_rsv + i
    # reserved GDT block i lists its backups: word j of every block is backup j's copy, written
    # a chunk of blocks at a time through one buffer (no fresh memory to fault in)
    chunk = bytearray(min(rsv, _CHUNK_BLOCKS) * bs)
    words = memoryview(chunk).cast("I") if sys.byteorder == "little" else None
    entry = struct.Struct(f"<{len(backups)}I")
    for lo in range(0, rsv, _CHUNK_BLOCKS):
        n = min(_CHUNK_BLOCKS, rsv - lo)
        for j, g in enumerate(backups):
            first = first_rsv + lo + g * geo.bpg
            if words is not None:
                words[j:n * apb:apb] = array(_U32, range(first, first + n))
        if words is None:
            for i in range(n):
                entry.pack_into(chunk, i * bs, *[first_rsv + lo + i + g * geo.bpg for g in backups])
        m.write(bytes(chunk[:n * bs]) if n * bs < len(chunk) else chunk, (first_rsv + lo) * bs)
    del words
    m.write(struct.pack(f"<{apb}I", *dbuf), dind * bs)
    size = (apb * apb + apb + L.N_DIRECT) * bs
    i_block = struct.pack("<15I", *([0] * L.DIND_BLOCK + [dind, 0]))
    raw = bytearray(geo.isize)
    L.INODE.struct.pack_into(raw, 0, *_inode_values(0o100600, size, m.now, 1, nblocks * (bs // 512), 0,
                                                    i_block))
    if geo.isize >= 160:
        struct.pack_into("<H", raw, 128, 32)
        struct.pack_into("<i", raw, 0x90, m.now)
    inodes[L.RESIZE_INO] = raw


def _journal(m: _Maker, inodes: dict[int, bytearray], jblocks: int, fs_uuid: uuidlib.UUID,
             new_inode: NewInode) -> bytes:
    """Inode 8: ``jblocks`` blocks from the middle of the filesystem, its JBD2 superblock in
    block 0 (v2, no features: the kernel sets them); returns ``s_jnl_blocks``."""
    geo, bs = m.geo, m.geo.bs
    goal = _midpoint_goal(m)
    start = m.space.first_free(goal, geo.blocks - 1)
    pblk = goal if start is None else start
    runs: list[tuple[int, int, int]] = []
    left = jblocks
    lblk = 0
    leaf: int | None = None
    while left:
        p, n = m.new_range(pblk, min(left, _MAX_EXTENT))
        m.claim(p, n)
        runs.append((lblk, n, p))
        if len(runs) == 5 and leaf is None:
            leaf = m.new_block(runs[0][2] - 1)         # extent_node_split: before the first extent
            m.claim(leaf, 1)
        lblk += n
        left -= n
        pblk = p + n
        if pblk >= geo.blocks:
            pblk = geo.first_data_block
    for _, n, p in runs:
        m.zero(p, n)
    flags = L.FL_EXTENTS
    blocks_512 = (jblocks + (1 if leaf is not None else 0)) * (bs // 512)
    if leaf is None:
        i_block = _extent_root(runs)
    else:
        # the root turned index keeps the bytes of the leaf entries it had (as e2fsprogs leaves them)
        i_block = (struct.pack("<HHHHI", _EXT_MAGIC, 1, 4, 1, 0)
                   + struct.pack("<IIHH", 0, leaf & 0xFFFFFFFF, leaf >> 32, 0) + _extent_root(runs[:4])[24:])
        emax = (bs - 12) // 12
        if len(runs) > emax:
            raise ValueError("journal too fragmented")
        node = bytearray(struct.pack("<HHHHI", _EXT_MAGIC, len(runs), emax, 0, 0))
        for lb, n, p in runs:
            node += struct.pack("<IHHI", lb, n, p >> 32, p & 0xFFFFFFFF)
        node = node.ljust(bs, b"\0")
        if m.csum:
            struct.pack_into("<I", node, 12 + 12 * emax,
                             crc32c_raw(inode_seed(m.seed, L.JOURNAL_INO, 0), bytes(node[:12 + 12 * emax])))
        m.write(bytes(node), leaf * bs)
    raw = new_inode(0o100600, jblocks * bs, blocks_512, flags, i_block, 1)
    inodes[L.JOURNAL_INO] = raw
    jsb = struct.pack(">IIIIIIIIIIII16sI", JBD2_MAGIC, 4, 0, bs, jblocks, 1, 1, 0, 0, 0, 0, 0,
                      fs_uuid.bytes, 1).ljust(bs, b"\0")
    m.write(jsb, runs[0][2] * bs)
    size = jblocks * bs
    return i_block + struct.pack("<II", size >> 32, size & 0xFFFFFFFF)


def _midpoint_goal(m: _Maker) -> int:
    """``get_midpoint_journal_block``: the first block of the freest group near the middle."""
    geo = m.geo
    group = m.group_of((geo.blocks - geo.first_data_block) // 2)
    flex = 1 << geo.log_flex
    if geo.log_flex and group > flex:
        group &= ~(flex - 1)
        while group < geo.groups and m.free[group] == 0:
            group += 1
        if group == geo.groups:
            group = 0
        start = group
    else:
        start = group - 1 if group > 0 else group
    end = group + 1 if group + 1 < geo.groups else group
    best = start
    for i in range(start + 1, end + 1):
        if m.free[i] > m.free[best]:
            best = i
    return geo.group_start(best)


def _orphan_file(m: _Maker, inodes: dict[int, bytearray], n: int, new_inode: NewInode) -> None:
    """Inode 12: ``n`` blocks from the first free one, each empty with its tail (magic and
    checksum over the physical block number)."""
    bs = m.geo.bs
    blocks = m.take(0, n)
    runs = _runs(blocks)
    if len(runs) > 4:
        raise ValueError("orphan file too fragmented for an in-inode extent tree")
    body = bytes(bs - 8)
    oseed = crc32c_raw(m.seed, struct.pack("<II", ORPHAN_INO, 0))
    chunk = bytearray(min(n, _CHUNK_BLOCKS) * bs)
    tail = struct.Struct("<II")
    for _, count, pblk in runs:
        for lo in range(0, count, _CHUNK_BLOCKS):
            k = min(_CHUNK_BLOCKS, count - lo)
            for i in range(k):
                b = pblk + lo + i
                c = crc32c_raw(crc32c_raw(oseed, b.to_bytes(8, "little")), body) if m.csum else 0
                tail.pack_into(chunk, i * bs + bs - 8, ORPHAN_MAGIC, c)
            m.write(bytes(chunk[:k * bs]) if k * bs < len(chunk) else chunk, (pblk + lo) * bs)
    m.alloc_inode(ORPHAN_INO)
    inodes[ORPHAN_INO] = new_inode(0o100600, n * bs, n * (bs // 512), L.FL_EXTENTS,
                                   _extent_root(runs), 1)


def _finish(m: _Maker, fs_uuid: uuidlib.UUID, seed_uuid: uuidlib.UUID, label: str | None,
            jnl_blocks: bytes, overhead: int, compat: int, incompat: int, ro: int) -> None:
    """Bitmaps, descriptors and superblocks (``ext2fs_close``)."""
    geo, bs = m.geo, m.geo.bs
    S = m.seed
    csum = m.csum
    ipg = geo.ipg
    by_group: dict[int, list[int]] = {}
    for ino in m.used_inodes:
        by_group.setdefault((ino - 1) // ipg, []).append((ino - 1) % ipg)
    descs = []
    free_total = 0
    for g in range(geo.groups):
        start = geo.group_start(g)
        nblocks = geo.group_blocks(g)
        free_b = nblocks - m.space.used_in(start, start + nblocks)
        free_total += free_b
        flags = m.flags[g]
        bb_csum = ib_csum = 0
        if not (m.gdt_csum and flags & L.BG_BLOCK_UNINIT):
            bits = bytearray(bs)
            for a, b in m.space.runs_in(start, start + nblocks):
                _set_bits(bits, a - start, b - start)
            _set_bits(bits, nblocks, bs * 8)
            m.write_block(geo.block_bitmap[g], bytes(bits))
            if csum:
                bb_csum = crc32c_raw(S, bytes(bits[:geo.bpg // 8]))
        if not (m.gdt_csum and flags & L.BG_INODE_UNINIT):
            bits = bytearray(bs)
            for idx in by_group.get(g, ()):
                bits[idx >> 3] |= 1 << (idx & 7)
            _set_bits(bits, ipg, bs * 8)
            m.write_block(geo.inode_bitmap[g], bytes(bits))
            if csum:
                ib_csum = crc32c_raw(S, bytes(bits[:ipg // 8]))
        bb, ib, it = geo.block_bitmap[g], geo.inode_bitmap[g], geo.inode_table[g]
        unused = m.unused[g] if m.gdt_csum else 0
        d = bytearray(L.GROUP_DESC.pack({
            "bg_block_bitmap": bb & 0xFFFFFFFF, "bg_inode_bitmap": ib & 0xFFFFFFFF,
            "bg_inode_table": it & 0xFFFFFFFF, "bg_free_blocks_count": free_b & 0xFFFF,
            "bg_free_inodes_count": m.free_inodes[g] & 0xFFFF, "bg_used_dirs_count": m.dirs[g] & 0xFFFF,
            "bg_flags": flags, "bg_block_bitmap_csum_lo": bb_csum & 0xFFFF,
            "bg_inode_bitmap_csum_lo": ib_csum & 0xFFFF, "bg_itable_unused": unused & 0xFFFF}))
        if geo.desc_size >= 64:
            d += L.GROUP_DESC_HI.pack({
                "bg_block_bitmap_hi": bb >> 32, "bg_inode_bitmap_hi": ib >> 32, "bg_inode_table_hi": it >> 32,
                "bg_free_blocks_count_hi": free_b >> 16, "bg_free_inodes_count_hi": m.free_inodes[g] >> 16,
                "bg_used_dirs_count_hi": m.dirs[g] >> 16, "bg_itable_unused_hi": unused >> 16,
                "bg_block_bitmap_csum_hi": bb_csum >> 16, "bg_inode_bitmap_csum_hi": ib_csum >> 16})
            d += bytes(geo.desc_size - 64)
        if csum:
            c = crc32c_raw(S, g.to_bytes(4, "little") + bytes(d[:0x1E]) + b"\0\0" + bytes(d[0x20:]))
            struct.pack_into("<H", d, 0x1E, c & 0xFFFF)
        elif m.gdt_csum:
            c = crc16(crc16(crc16(0xFFFF, fs_uuid.bytes), g.to_bytes(4, "little")), d[:0x1E])
            if geo.desc_size > 32:
                c = crc16(c, d[0x20:])
            struct.pack_into("<H", d, 0x1E, c)
        descs.append(bytes(d))
    gdt = b"".join(descs)
    dpb = bs // geo.desc_size
    r = geo.r_blocks
    free_inodes = sum(m.free_inodes)
    f = {
        "s_inodes_count": geo.groups * ipg, "s_blocks_count": geo.blocks & 0xFFFFFFFF,
        "s_r_blocks_count": r & 0xFFFFFFFF, "s_free_blocks_count": free_total & 0xFFFFFFFF,
        "s_free_inodes_count": free_inodes, "s_first_data_block": geo.first_data_block,
        "s_log_block_size": bs.bit_length() - 11, "s_log_frag_size": bs.bit_length() - 11,
        "s_blocks_per_group": geo.bpg, "s_frags_per_group": geo.bpg, "s_inodes_per_group": ipg,
        "s_wtime": m.now & 0xFFFFFFFF, "s_max_mnt_count": -1, "s_magic": L.EXT2_MAGIC, "s_state": 1,
        "s_errors": 1, "s_lastcheck": m.now & 0xFFFFFFFF, "s_rev_level": 1,
        "s_first_ino": L.GOOD_OLD_FIRST_INO, "s_inode_size": geo.isize, "s_feature_compat": compat,
        "s_feature_incompat": incompat, "s_feature_ro_compat": ro, "s_uuid": fs_uuid.bytes,
        "s_volume_name": (label or "").encode("utf-8")[:16], "s_reserved_gdt_blocks": geo.reserved_gdt,
        "s_hash_seed": seed_uuid.bytes, "s_def_hash_version": 1, "s_default_mount_opts": 0x0C,
        "s_first_meta_bg": geo.first_meta_bg, "s_mkfs_time": m.now & 0xFFFFFFFF,
        "s_flags": 0x1 if platform.machine() in ("x86_64", "i386", "i686", "AMD64") else 0x2,
        "s_overhead_clusters": overhead,
    }
    if "64bit" in geo.features:
        f.update(s_blocks_count_hi=geo.blocks >> 32, s_r_blocks_count_hi=r >> 32,
                 s_free_blocks_hi=free_total >> 32, s_desc_size=geo.desc_size)
    if geo.isize >= 160:
        f.update(s_min_extra_isize=32, s_want_extra_isize=32)
    if geo.log_flex:
        f["s_log_groups_per_flex"] = geo.log_flex
    if csum:
        f["s_checksum_type"] = 1
    if "metadata_csum_seed" in geo.features:
        f["s_checksum_seed"] = S
    if jnl_blocks:
        f.update(s_journal_inum=L.JOURNAL_INO, s_jnl_backup_type=1, s_jnl_blocks=jnl_blocks)
    if "orphan_file" in geo.features:
        f["s_orphan_file_inum"] = ORPHAN_INO
    # descriptors: the primary and every backup (classic GDT, or meta_bg's three copies)
    copies = [g for g in range(geo.groups) if geo.has_super(g)]
    meta_bg = "meta_bg" in geo.features
    classic = geo.desc_blocks if not meta_bg else geo.first_meta_bg
    for i in range(classic):
        blk = gdt[i * bs:(i + 1) * bs].ljust(bs, b"\0")
        for g in copies:
            m.write(blk, (geo.group_start(g) + 1 + i) * bs)
    if meta_bg:
        for i in range(geo.first_meta_bg, geo.desc_blocks):
            blk = gdt[i * bs:(i + 1) * bs].ljust(bs, b"\0")
            for g in (i * dpb, i * dpb + 1, i * dpb + dpb - 1):
                if g < geo.groups:
                    m.write(blk, (geo.group_start(g) + (1 if geo.has_super(g) else 0)) * bs)
    # superblocks: backups first (state without VALID), then the primary
    f["s_kbytes_written"] = (m.written + (len(copies) + 1) * 1024) >> 10
    sb = bytearray(L.SUPERBLOCK.pack(f))
    backup = bytearray(sb)
    L.SUPERBLOCK.pack_field(backup, "s_state", 0)
    for g in copies[1:]:
        L.SUPERBLOCK.pack_field(backup, "s_block_group_nr", min(g, 0xFFFF))
        L.SUPERBLOCK.pack_field(backup, "s_checksum", crc32c_raw(0xFFFFFFFF, bytes(backup[:0x3FC]))
                                if csum else 0)
        m.write(bytes(backup), geo.group_start(g) * bs)
    if csum:
        L.SUPERBLOCK.pack_field(sb, "s_checksum", crc32c_raw(0xFFFFFFFF, bytes(sb[:0x3FC])))
    m.write(bytes(sb), L.SUPERBLOCK_OFFSET)
    m.dev.flush()
