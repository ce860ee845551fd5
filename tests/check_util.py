"""Damaged images for ``test_check.py``: one named damage each, what ``e2fsck -fn`` and
``check_volume`` must then report.

The base images come from ``corrupt_util.build_image`` (``mke2fs -d`` from a small tree with every
kind of file, xattrs set by ``debugfs``; structures located with ``debugfs`` and ``dumpe2fs``,
field offsets written out independently of xipfs). Each :class:`Damage` changes one thing in a
copy of a base image through ``corrupt_util.Patch``; ``codes`` are the problem codes of which
check_volume must report at least one, ``fsck`` a regular expression e2fsck's output must match
(its own wording of the same problem).
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from dataclasses import dataclass

from corrupt_util import GD, SB, SB_OFF, BaseImage, Patch

import xipfs
from xipfs.device import open_device
from xipfs.extfs.check import Problem, check_device, check_volume

#: e2fsck's lines for a clean run (anything else is a problem it found).
_CLEAN = re.compile(r"^(e2fsck \d|Pass \d|.*: \d+/\d+ files .*blocks$|$)")


def fsck_found(rc: int, out: str) -> bool:
    """Whether e2fsck reported any problem (an error exit, or a message it does not count)."""
    return bool(rc) or any(not _CLEAN.match(line) for line in out.splitlines())


def check_image(path: str) -> list[Problem]:
    """check_volume through xipfs.open when the image opens, else check_device (descriptors too
    damaged for a Volume); both ways agree when both work."""
    try:
        fs = xipfs.open(path)
    except xipfs.CorruptImageError:
        dev = open_device(path, readonly=True)
        try:
            return check_device(dev, progress=False)
        finally:
            dev.close()
    with fs:
        return check_volume(fs.volume, progress=False)


def codes(problems: list[Problem]) -> set[str]:
    return {p.code for p in problems}


# -- finding things in a base image --------------------------------------------------------------
def dirent_off(base: BaseImage, dirpath: str, name: bytes) -> int:
    """Image offset of the live entry ``name`` in directory ``dirpath``."""
    return base.dirent(dirpath, name)[0]


def bitmap_bit(base: BaseImage, which: str, number: int) -> tuple[int, int]:
    """``(byte offset in the image, bit)`` of block or inode ``number`` in its group's bitmap."""
    if which == "block":
        g, idx = divmod(number - base.fdb, base.sb["blocks_per_group"])
        bm = base.groups[g].block_bitmap
    else:
        g, idx = divmod(number - 1, base.sb["inodes_per_group"])
        bm = base.groups[g].inode_bitmap
    return bm * base.bs + idx // 8, idx % 8


def flip_bit(p: Patch, off: int, bit: int) -> None:
    p.buf[off] ^= 1 << bit


def gd_get(p: Patch, group: int, name: str) -> int:
    off, code = GD[name]
    return p.get(p.base.gdt_off + group * 32 + off, code)


def sb_get(p: Patch, name: str) -> int:
    off, code = SB[name]
    return p.get(SB_OFF + off, code)


def used_data_block(base: BaseImage) -> int:
    """A data block of /big in group 0 or 1."""
    return base.blocks["/big"][0]


def xattr_block(base: BaseImage) -> int:
    return base.inode_field("/xf", "file_acl")


# -- the damages ----------------------------------------------------------------------------------
@dataclass
class Damage:
    name: str
    apply: Callable[[Patch], None]
    codes: frozenset[str]
    fsck: str
    #: block sizes this damage makes sense for (None: all)
    block_sizes: tuple[int, ...] | None = None


def _block_bitmap_clear(p: Patch) -> None:
    off, bit = bitmap_bit(p.base, "block", used_data_block(p.base))
    flip_bit(p, off, bit)


def _block_bitmap_set(p: Patch) -> None:
    blk = p.base.free_blocks(1)[0]
    off, bit = bitmap_bit(p.base, "block", blk)
    flip_bit(p, off, bit)


def _inode_bitmap_clear(p: Patch) -> None:
    off, bit = bitmap_bit(p.base, "inode", p.base.ino["/small"])
    flip_bit(p, off, bit)


def _group_field(name: str, delta: int, group: int = 0) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        p.gd(group, name, gd_get(p, group, name) + delta)
    return apply


def _sb_field(name: str, delta: int) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        p.sb(name, sb_get(p, name) + delta)
    return apply


def _inode_field(path: str, name: str, value: Callable[[int], int]) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        p.inode(path, name, value(p.inode_get(path, name)))
    return apply


def _hole_first(p: Patch) -> None:
    """/small's one block moved to file block 1: a hole first, the size below the block."""
    p.iblock("/small", 1, p.base.iblock("/small")[0])
    p.iblock("/small", 0, 0)


def _dup_block(p: Patch) -> None:
    p.iblock("/small", 0, p.base.blocks["/big"][1])


def _entry_inode(dirpath: str, name: bytes, ino: Callable[[BaseImage], int]) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        p.put(dirent_off(p.base, dirpath, name), "I", ino(p.base))
    return apply


def _entry_field(dirpath: str, name: bytes, offset: int, code: str, value: int) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        p.put(dirent_off(p.base, dirpath, name) + offset, code, value)
    return apply


def _entry_name(dirpath: str, name: bytes, new: bytes) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        off = dirent_off(p.base, dirpath, name)
        assert len(new) == len(name)
        p.put_bytes(off + 8, new)
    return apply


def _dotdot(dirpath: str, ino: Callable[[BaseImage], int]) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        blk = p.base.blocks[dirpath][0]
        entries = p.base.dirents(blk)
        assert entries[1][5] == b".."
        p.put(entries[1][0], "I", ino(p.base))
    return apply


def _first_entry_name(dirpath: str, new: bytes) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        blk = p.base.blocks[dirpath][0]
        p.put_bytes(blk * p.base.bs + 8, new)
    return apply


def _deleted_zero_dtime(p: Patch) -> None:
    ino = p.base.unused_inode()
    g, idx = divmod(ino - 1, p.base.sb["inodes_per_group"])
    off = p.base.groups[g].inode_table * p.base.bs + idx * p.base.isize
    p.put(off, "H", 0o100644)


def _ind_self(p: Patch) -> None:
    ind = p.base.iblock("/big")[12]
    p.ind(ind, 0, ind)


def _dind_loop(p: Patch) -> None:
    """The double indirect block lists itself (as an indirect block) after its real entry.
    (Every entry so makes e2fsck take seconds; test_check.py checks that case without it.)"""
    dind = p.base.iblock("/big")[13]
    assert dind, "no double indirect block at this block size"
    p.ind(dind, 1, dind)


def _xattr_header(offset: int, value: int) -> Callable[[Patch], None]:
    def apply(p: Patch) -> None:
        p.put(xattr_block(p.base) * p.base.bs + offset, "I", value)
    return apply


def _xattr_hash(p: Patch) -> None:
    off = xattr_block(p.base) * p.base.bs + 32 + 12          # first entry's e_hash
    p.put(off, "I", p.get(off, "I") ^ 0x5A5A)


def _inode_xattr_size(p: Patch) -> None:
    start = p.base.inode_xattr_start("/xf")
    entries = p.base.xattr_entries(start + 4, p.base.inode_off["/xf"] + p.base.isize)
    assert entries, "no xattr in the inode body"
    p.put(entries[0][0] + 8, "I", 5000)                        # e_value_size


def _resize_dind(p: Patch) -> None:
    off = p.base.gdt_off                                         # where the descriptors live
    del off
    ino_off = _inode_offset(p.base, 7)
    p.put(ino_off + 0x28 + 4 * 13, "I", 0)


def _inode_offset(base: BaseImage, ino: int) -> int:
    g, idx = divmod(ino - 1, base.sb["inodes_per_group"])
    return base.groups[g].inode_table * base.bs + idx * base.isize


def _gd_outside(p: Patch) -> None:
    p.gd(1, "block_bitmap", p.base.groups[0].first + 5)


def _gd_overlap(p: Patch) -> None:
    p.gd(1, "inode_bitmap", p.base.groups[1].block_bitmap)


def _padding(p: Patch) -> None:
    base = p.base
    last = base.groups[-1]
    n = last.last - last.first + 1
    bpg = base.sb["blocks_per_group"]
    assert n < bpg, "the last group is full"
    off = last.block_bitmap * base.bs + n // 8
    flip_bit(p, off, n % 8)


def _inode_bitmap_tail(p: Patch) -> None:
    """Clear a bit in the bytes of group 0's inode bitmap block past its inodes (mke2fs sets them)."""
    base = p.base
    assert base.sb["inodes_per_group"] // 8 < base.bs, "the inode bitmap fills its block"
    flip_bit(p, base.groups[0].inode_bitmap * base.bs + base.bs - 1, 7)


def _reserved_inode_size(p: Patch) -> None:
    """A size no block-mapped file can have on reserved inode 10 (unused by ext2)."""
    off = p.base.groups[0].inode_table * p.base.bs + 9 * p.base.sb["inode_size"]
    p.put(off + 4, "I", 0xFFFF0000)                  # i_size
    p.put(off + 108, "I", 0xA0000000)                # i_size_high


def _journal_uuid(p: Patch) -> None:
    """An external journal's UUID in the superblock of an image without has_journal."""
    p.buf[1024 + 0xD0:1024 + 0xE0] = bytes(range(1, 17))


def _dir_hole(p: Patch) -> None:
    p.iblock("/dir", 1, 0)


def _rec_len(value: int) -> Callable[[Patch], None]:
    return _entry_field("/dir", b"entry_005_" + b"x" * 22, 4, "H", value)


DAMAGES: list[Damage] = [
    Damage("block bitmap bit cleared", _block_bitmap_clear,
           frozenset({"block_bitmap_differs"}), r"Block bitmap differences: +\+"),
    Damage("block bitmap bit set", _block_bitmap_set,
           frozenset({"block_bitmap_differs"}), r"Block bitmap differences: +-"),
    Damage("inode bitmap bit cleared", _inode_bitmap_clear,
           frozenset({"inode_bitmap_differs"}), r"Inode bitmap differences: +\+"),
    Damage("group free blocks count", _group_field("free_blocks", -2),
           frozenset({"free_blocks_count"}), r"Free blocks count wrong for group #0"),
    Damage("group free inodes count", _group_field("free_inodes", 3),
           frozenset({"free_inodes_count"}), r"Free inodes count wrong for group #0"),
    Damage("group directories count", _group_field("used_dirs", 1),
           frozenset({"dirs_count"}), r"Directories count wrong for group #0"),
    Damage("superblock free blocks count", _sb_field("free_blocks_count", -7),
           frozenset({"sb_free_blocks_count"}), r"Free blocks count wrong \("),
    Damage("superblock free inodes count", _sb_field("free_inodes_count", 5),
           frozenset({"sb_free_inodes_count"}), r"Free inodes count wrong \("),
    Damage("link count too high", _inode_field("/small", "links", lambda v: v + 1),
           frozenset({"link_count"}), r"Inode \d+ ref count is 2, should be 1"),
    Damage("link count too low", _inode_field("/dir", "links", lambda v: v - 1),
           frozenset({"link_count"}), r"ref count is \d+, should be \d+"),
    Damage("block claimed by two files", _dup_block,
           frozenset({"dup_block"}), r"Multiply-claimed block"),
    Damage("entry points to a free inode", _entry_inode("/", b"small", lambda b: b.unused_inode()),
           frozenset({"unused_inode"}), r"has deleted/unused inode"),
    Damage("entry with an inode number out of range",
           _entry_inode("/", b"small", lambda b: b.sb["inodes_count"] + 9),
           frozenset({"bad_inode_number"}), r"has (bad|invalid) inode #"),
    Damage("entry links to the root", _entry_inode("/dir", b"entry_003_" + b"x" * 22, lambda b: 2),
           frozenset({"link_to_root"}), r"is a link to the root inode"),
    Damage("bad rec_len (not a multiple of 4)", _rec_len(13),
           frozenset({"bad_dir_entry"}), r"directory corrupted"),
    Damage("bad rec_len (past the block)", _rec_len(4000),
           frozenset({"bad_dir_entry"}), r"directory corrupted"),
    Damage("name_len past rec_len", _entry_field("/dir", b"entry_006_" + b"x" * 22, 6, "B", 200),
           frozenset({"bad_dir_entry"}), r"directory corrupted"),
    Damage("illegal character in a name", _entry_name("/dir", b"entry_007_" + b"x" * 22,
                                                      b"entry_007_" + b"x" * 10 + b"/" + b"x" * 11),
           frozenset({"bad_name"}), r"has illegal characters in its name"),
    Damage("duplicate name in a block", _entry_name("/dir", b"entry_008_" + b"x" * 22,
                                                    b"entry_009_" + b"x" * 22),
           frozenset({"dup_entry"}), r"Duplicate entry"),
    Damage("unreachable directory", _entry_inode("/", b"dir", lambda b: 0),
           frozenset({"unconnected_dir"}), r"Unconnected directory inode"),
    Damage("wrong '..'", _dotdot("/dir/sub/deep", lambda b: b.ino["/dir"]),
           frozenset({"dotdot_mismatch"}), r"'\.\.' in .* is .*, should be"),
    Damage("'..' missing", _dotdot("/dir/sub", lambda b: 0),
           frozenset({"bad_dotdot"}), r"Missing '\.\.'"),
    Damage("first entry is not '.'", _first_entry_name("/dir/sub", b"x"),
           frozenset({"bad_dot"}), r"First entry .* should be '\.'"),
    Damage("a second link to a directory", _entry_inode("/", b"small", lambda b: b.ino["/dir/sub"]),
           frozenset({"dir_hardlink"}), r"is a link to directory"),
    Damage("wrong file type in an entry", _entry_field("/", b"small", 7, "B", 2),
           frozenset({"file_type"}), r"has an incorrect filetype"),
    Damage("i_blocks too high", _inode_field("/big", "blocks", lambda v: v + 8),
           frozenset({"i_blocks"}), r"i_blocks is \d+, should be"),
    Damage("i_size below the blocks", _inode_field("/big", "size", lambda v: 1000),
           frozenset({"i_size"}), r"i_size is 1000, should be"),
    Damage("directory size not a block multiple", _inode_field("/dir", "size", lambda v: v + 100),
           frozenset({"i_size"}), r"i_size is \d+, should be"),
    # a small file with direct blocks only: checked with its whole inode table piece at once
    Damage("i_blocks of a small file", _inode_field("/small", "blocks", lambda v: v * 2),
           frozenset({"i_blocks"}), r"i_blocks is \d+, should be"),
    Damage("a small file's block listed twice", lambda p: p.iblock("/small", 1, p.base.iblock("/small")[0]),
           frozenset({"dup_block", "i_blocks"}), r"Multiply-claimed|i_blocks is"),
    Damage("a hole before a small file's block", _hole_first,
           frozenset({"i_size"}), r"i_size is \d+, should be"),
    Damage("block pointer out of range", lambda p: p.iblock("/small", 0, p.base.sb["blocks_count"] + 10),
           frozenset({"bad_block"}), r"illegal block"),
    Damage("indirect block out of range", lambda p: p.iblock("/big", 12, 10 ** 8),
           frozenset({"bad_block"}), r"[Ii]llegal indirect block"),
    Damage("indirect block pointing at itself", _ind_self,
           frozenset({"dup_block"}), r"Multiply-claimed block"),
    Damage("double indirect block listing itself", _dind_loop,
           frozenset({"dup_block"}), r"Multiply-claimed block",
           block_sizes=(1024,)),
    Damage("deleted inode with zero dtime", _deleted_zero_dtime,
           frozenset({"zero_dtime"}), r"Deleted inode \d+ has zero dtime"),
    Damage("in-use inode with dtime", _inode_field("/small", "dtime", lambda v: 1234567890),
           frozenset({"dtime_set"}), r"Inode \d+ is in use, but has dtime set"),
    Damage("invalid mode", _inode_field("/small", "mode", lambda v: 0o170644),
           frozenset({"bad_mode"}), r"has invalid mode"),
    Damage("fast symlink with a wrong size", _inode_field("/fast", "size", lambda v: v + 5),
           frozenset({"bad_symlink"}), r"Symlink .* is invalid"),
    Damage("fifo with a size", _inode_field("/fifo", "size", lambda v: 10),
           frozenset({"special_file_size"}), r"has non-zero size"),
    Damage("xattr block reference count", _xattr_header(4, 5),
           frozenset({"xattr_refcount"}), r"reference count 5, should be 1"),
    Damage("xattr block magic", _xattr_header(0, 0xDEADBEEF),
           frozenset({"xattr_block"}), r"has a bad extended attribute block"),
    Damage("xattr entry hash", _xattr_hash,
           frozenset({"xattr_block"}), r"has a bad extended attribute|hash"),
    Damage("xattr in the inode body runs past it", _inode_xattr_size,
           frozenset({"inode_xattr"}), r"extended attribute|value size"),
    Damage("i_extra_isize invalid", _inode_field("/small", "extra_isize", lambda v: 3),
           frozenset({"extra_isize"}), r"extra size \(3\) which is invalid"),
    Damage("directory with a hole", _dir_hole,
           frozenset({"dir_hole"}), r"has an unallocated block|hole"),
    Damage("resize inode broken", _resize_dind,
           frozenset({"resize_inode"}), r"Resize inode not valid"),
    Damage("block bitmap outside its group", _gd_outside,
           frozenset({"bad_group_descriptor"}), r"[Bb]lock bitmap|group descriptors look bad"),
    Damage("inode bitmap on the block bitmap", _gd_overlap,
           frozenset({"bad_group_descriptor", "metadata_conflict"}), r"conflicts|look bad|bitmap"),
    Damage("padding of the last block bitmap cleared", _padding,
           frozenset({"bitmap_padding"}), r"Padding at end of block bitmap is not set",
           block_sizes=(1024,)),
    Damage("padding past the inodes of an inode bitmap block cleared", _inode_bitmap_tail,
           frozenset({"bitmap_padding"}), r"Padding at end of inode bitmap is not set"),
    Damage("reserved inode 10 with a size no file can have", _reserved_inode_size,
           frozenset({"i_size"}), r"Inode 10, i_size is \d+, should be 0"),
    Damage("external journal UUID without has_journal", _journal_uuid,
           frozenset({"journal"}), r"Can't find external journal"),
    Damage("root is not a directory", _inode_field("/", "mode", lambda v: 0o100755),
           frozenset({"root_not_dir", "no_root"}), r"Root inode is not a directory"),
]


def apply_damage(base: BaseImage, damage: Damage, path: str) -> str:
    p = Patch(base)
    damage.apply(p)
    return p.write(path)


def struct_u32(data: bytes, off: int) -> int:
    return struct.unpack_from("<I", data, off)[0]
