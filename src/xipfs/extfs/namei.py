"""Names: create, link, unlink, rename, in the order that keeps a killed writer repairable.

Each operation is a short sequence of writes to memory that outlives the process. The order is
chosen so that every prefix of the sequence leaves an image ``e2fsck -p`` repairs on its own
(checked against e2fsck 1.47): a new inode carries no links until its directory entry exists,
a dying inode loses its links before its entry, blocks are freed last. At worst a kill leaks
blocks or inodes, or leaves a link count e2fsck fixes. A rename within one directory is one
store when the new name fits the old entry's record. The exceptions: moving a directory to
another parent, a directory rename whose new name does not fit in place, and a directory
replacing another: ext2 has no single store for those, so a kill inside their few writes
(microseconds) needs ``e2fsck -y``, as with Linux's own ext2. Likewise an htree split (a
leaf or index block moving half its entries to a new block, or the root moving into a new
level): from the store that links the new block until the store that trims the old one, the
index and the blocks disagree (a block not referenced yet, or entries in two blocks), which
``e2fsck -p`` refuses and ``e2fsck -y`` repairs without loss by rebuilding the index.
"""

from __future__ import annotations

import errno
import functools
import os
import random
import struct
import time
from collections.abc import Callable
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFLNK, S_IFMT, S_IFREG, S_ISDIR, S_ISLNK
from typing import TYPE_CHECKING

from ..errors import CorruptImageError, fs_error
from . import casefold, htree, orphans
from . import data as D
from . import layout as L
from .csum import crc32c_raw, inode_seed
from .dir import (
    DIR_TAIL,
    HTREE_LOOKUP_BLOCKS,
    DirSpace,
    FoldedEntries,
    check_casefold,
    dir_blocks,
    dir_end,
    empty_dir_block,
    encode_entry,
    folding,
    htree_lookup,
    indexes_dirs,
    insert_into_block,
    is_casefolded,
    leaf_entries,
    make_indexed_dir,
    pack_leaf,
    rec_len_of,
    remove_from_block,
    seal_leaf,
    split_by_hash,
)
from .dirhash import hash_version, hasher
from .extent import inode_root
from .inline import move_out_dir
from .inode import Inode, encode_direct_run, encode_new_inode, encode_rdev, seal_fresh
from .watch import STAMP_LEN, STAMP_OFFSET, TRIES, WriterWatch
from .xattr import drop_xattrs

if TYPE_CHECKING:
    from .volume import Volume

LINK_MAX = 32000            # Linux EXT2_LINK_MAX
#: Linux EXT4_LINK_MAX: an ext4 directory's subdirectories (with dir_nlink, indexed: no limit).
EXT4_LINK_MAX = 65000
#: Symlinks followed while resolving one path before ELOOP (Linux: 40).
MAX_SYMLINKS = 40
NAME_MAX = 255
PATH_MAX = 4096
_DIRECT = struct.Struct("<15I")


def check_name(name: bytes) -> None:
    if not name or name in (b".", b".."):
        raise fs_error(errno.EEXIST if name else errno.ENOENT)
    if len(name) > 255:
        raise fs_error(errno.ENAMETOOLONG)
    if b"/" in name or b"\0" in name:
        raise fs_error(errno.EINVAL)


def check_new_name(vol: Volume, d: Inode, name: bytes) -> None:
    """A name about to go into directory ``d``: EINVAL where ``d`` is casefolded under the
    strict encoding and ``name`` is not valid UTF-8 (Linux ``ext4_add_entry``)."""
    if (is_casefolded(vol, d) and vol.sb.s_encoding_flags & casefold.STRICT
            and not casefold.is_valid(name)):
        raise OSError(errno.EINVAL, f"{os.fsdecode(name)!r} is not valid UTF-8, which the strict "
                      f"encoding of casefolded directory inode {d.ino} requires")


def _stored_name(vol: Volume, d: Inode, name: bytes) -> bytes:
    """The name as stored of the entry a lookup of ``name`` finds in ``d`` (in a casefolded
    directory it may be spelt otherwise); ``name`` itself elsewhere."""
    entries = vol.dir_index(d).entries
    if isinstance(entries, FoldedEntries):
        stored = entries.stored(os.fsdecode(name))
        if stored is not None:
            return os.fsencode(stored)
    return name


# -- directory entries --------------------------------------------------------------------------

def _dblock(d: Inode, space: DirSpace, lblk: int) -> int:
    """The device block of directory block ``lblk`` (remembered: directories rarely move)."""
    pblk = space.device_blocks.get(lblk)
    if pblk is None:
        pblk = space.device_blocks[lblk] = d.map.bmap(lblk)
    return pblk


def dir_space(vol: Volume, d: Inode) -> DirSpace:
    space = vol.spaces.get(d.ino)
    if space is None:
        if is_casefolded(vol, d):
            check_casefold(vol, d)
        if d.flags & L.FL_INLINE_DATA:           # ext4: its entries into a block before a change
            move_out_dir(vol, d)
        vol.dir_index(d)                     # validates the directory first
        space = vol.spaces[d.ino] = DirSpace(dir_blocks(vol, d), dir_end(vol))
    return space


def _dir_store(vol: Volume, d: Inode, pblk: int, writes: list[tuple[int, bytes]]) -> None:
    """Apply ``writes`` (offset in the block, bytes) to directory block ``pblk`` of ``d``, in
    the order given, each a store of its own that leaves a valid block; with metadata_csum the
    checksum tail last. A kill between leaves a block that "passes checks but fails checksum",
    which e2fsck -p repairs by itself (checked by tests/test_crash.py)."""
    bs = vol.bs
    dev = vol.device
    base = pblk * bs
    for off, chunk in writes:
        dev.write(chunk, base + off)
    if vol.sb.metadata_csum:
        end = bs - 12
        crc = crc32c_raw(inode_seed(vol.sb.csum_seed, d.ino, d.generation), dev.view(base, end))
        dev.write(DIR_TAIL + crc.to_bytes(4, "little"), base + end)


def keeps_index(vol: Volume, d: Inode) -> bool:
    """Whether directory ``d``'s htree is kept up to date as it changes (Linux ext4's way): it
    is indexed, the filesystem has dir_index, and it is an ext4 image (extents or
    metadata_csum). On ext2 without checksums a change drops the flag instead, as Linux's
    ext2 driver does (:func:`_unindex`)."""
    return bool(d.flags & L.FL_INDEX) and indexes_dirs(vol)


def _unindex(vol: Volume, d: Inode) -> None:
    """Before a directory whose index is not kept changes: drop its htree index flag, as
    Linux ext2 does.

    Stored first, so no image ever has an index that disagrees with the entries.
    """
    if d.flags & L.FL_INDEX and vol.sb.metadata_csum:
        # its index blocks would become leaves without tails
        raise OSError(errno.EROFS, f"changing indexed directory inode {d.ino} under metadata_csum "
                      "without the dir_index feature")
    if d.flags & L.FL_INDEX:
        d.flags &= ~L.FL_INDEX
        vol.write_inode(d)


# -- htree directories: the index kept as Linux ext4_dx_add_entry keeps it ----------------------
#: Where dx_root_info's hash_version lies in block 0 of an indexed directory.
_ROOT_HASH_VERSION_AT = 24 + L.DX_ROOT_INFO.offsets["hash_version"]


@functools.cache
def _cached_hasher(version: int, seed: bytes, casefolded: bool = False) -> Callable[[bytes], tuple[int, int]]:
    """The directory hash for ``version`` and ``s_hash_seed`` (of the folded names in a
    casefolded directory), remembering recent names: a leaf that splits sorts names mostly
    added just before, whose hashes are then not computed again."""
    name_hash = hasher(version, seed)
    return functools.lru_cache(maxsize=1 << 16)(folding(name_hash) if casefolded else name_hash)


class _Dx:
    """One indexed directory being changed: its geometry, checksum seed, hash, and block I/O."""

    __slots__ = ("vol", "d", "space", "bs", "end", "seed", "verify_seed", "hash")

    def __init__(self, vol: Volume, d: Inode, space: DirSpace) -> None:
        self.vol, self.d, self.space = vol, d, space
        self.bs = vol.bs
        self.end = dir_end(vol)
        sb = vol.sb
        #: The inode's checksum seed, for what is written (None without metadata_csum), and for
        #: what is read when the volume verifies checksums.
        self.seed = inode_seed(sb.csum_seed, d.ino, d.generation) if sb.metadata_csum else None
        self.verify_seed = self.seed if vol.verify else None
        # dx_root_info's hash_version, after "." and ".." (the probe that follows checks the root)
        self.hash = _cached_hasher(hash_version(self.read(0)[_ROOT_HASH_VERSION_AT], sb.s_flags),
                                   bytes(sb.s_hash_seed), is_casefolded(vol, d))

    def read(self, lblk: int) -> memoryview:
        """Directory block ``lblk`` as it is now."""
        pblk = _dblock(self.d, self.space, lblk)
        if not pblk:
            raise CorruptImageError(f"hole at block {lblk} of a directory", f"directory inode {self.d.ino}")
        return self.vol.device.view(pblk * self.bs, self.bs)

    def probe(self, h: int) -> tuple[list[tuple[htree.DxNode, int]], int]:
        """The index path and the leaf for hash ``h`` (index blocks cached in ``d._dx``)."""
        d = self.d
        if d._dx is None:
            d._dx = {}
        sb = self.vol.sb
        return htree.dx_probe(self.read, h, bs=self.bs, nblocks=d.size // self.bs,
                              metadata_csum=sb.metadata_csum, large_dir=self.vol.large_dir,
                              csum_seed=self.verify_seed, ino=d.ino, cache=d._dx)

    def store(self, lblk: int, block: bytes) -> None:
        """Write directory block ``lblk`` whole, in one store."""
        self.vol.device.write(block, _dblock(self.d, self.space, lblk) * self.bs)
        self.space.scan(lblk, self.read(lblk))

    def append(self, block: bytes) -> int:
        """Add a block holding ``block`` at the directory's end (written before it is linked;
        the block map and i_size reach the image in the inode's one store); its number."""
        vol, d, bs = self.vol, self.d, self.bs
        lblk = d.size // bs
        if not d.map.assign(lblk, lblk + 1, lambda lb, n, pb: vol.device.write(block, pb * bs)):
            raise fs_error(errno.ENOSPC)
        D.set_size(vol, d, d.size + bs)
        vol.write_inode(d)
        self.space.scan(lblk, self.read(lblk))
        return lblk

    def index_changed(self) -> None:
        """An index block changed: what the node cache holds is stale."""
        if self.d._dx is not None:
            self.d._dx.clear()


def _dx_add(vol: Volume, d: Inode, space: DirSpace, name: bytes, ino: int, ftype: int) -> None:
    """Insert ``name -> ino`` into indexed directory ``d`` through its index (Linux
    ``ext4_dx_add_entry``): into the leaf its hash belongs to when it fits there; else the
    leaf splits (``do_split``), after the index block above it splits or, at the root, the
    tree grows a level, when that block is full. ENOSPC when the tree is full at its deepest.

    Every store leaves an index every name is found through: a new block is complete before
    anything points to it, then the one store of the parent switches to it, then the old
    block sheds what moved (until then it holds copies the index no longer leads to).
    """
    dx = space.dx
    if not isinstance(dx, _Dx) or dx.d is not d:      # made once per directory being changed
        dx = space.dx = _Dx(vol, d, space)
    h = dx.hash(name)[0]
    need = rec_len_of(len(name))
    for _ in range(12):            # each round splits one index block, or ends: 3 levels at most
        frames, leaf = dx.probe(h)
        if leaf >= len(space.tail):
            raise CorruptImageError(f"htree leaf {leaf} past the directory's end", f"directory inode {d.ino}")
        tail_at, slack = space.tail[leaf]
        if slack >= need or space.gap[leaf] >= need:
            pblk = _dblock(d, space, leaf)
            at = tail_at if slack >= need else None
            new_off, writes = insert_into_block(dx.read(leaf), dx.end, at, name, ino, ftype)
            _dir_store(vol, d, pblk, writes)
            if at is not None:
                space.appended(leaf, new_off, name, need)
            else:
                space.scan(leaf, dx.read(leaf))
            return
        node, at = frames[-1]
        if node.count >= node.limit:
            _dx_grow(dx, frames)
        elif _dx_split_leaf(dx, node, at, leaf, h, (name, ino, ftype)):
            return
    raise CorruptImageError("htree insert did not settle", f"directory inode {d.ino}")


def _dx_split_leaf(dx: _Dx, node: htree.DxNode, at: int, leaf: int, h: int,
                   new: tuple[bytes, int, int]) -> bool:
    """Split full leaf ``leaf`` (entry ``at`` of index block ``node``) as ``do_split`` does,
    the new entry ``new`` going into the half its hash ``h`` belongs to; False when it did
    not fit there (the caller goes round again)."""
    bs, end = dx.bs, dx.end
    live = leaf_entries(dx.read(leaf), end)
    if len(live) < 2:
        raise CorruptImageError(f"htree leaf {leaf} full with {len(live)} entries",
                                f"directory inode {dx.d.ino}")
    keep, move, hash2, continued = split_by_hash(live, [e[3] for e in live], dx.hash, bs)
    placed = True
    if h >= hash2:
        block2 = pack_leaf([*move, new], end, bs)
        if block2 is None:
            block2, placed = pack_leaf(move, end, bs), False
        block1 = pack_leaf(keep, end, bs)
    else:
        block1 = pack_leaf([*keep, new], end, bs)
        if block1 is None:
            block1, placed = pack_leaf(keep, end, bs), False
        block2 = pack_leaf(move, end, bs)
    if block1 is None or block2 is None:
        raise CorruptImageError(f"htree leaf {leaf} does not split", f"directory inode {dx.d.ino}")
    vol, d = dx.vol, dx.d
    new_leaf = dx.append(seal_leaf(vol, d, block2))             # 1. the upper half, unreferenced
    hashes, blocks = htree.insert_entry(node, at, hash2 + continued, new_leaf)
    dx.store(node.lblk, htree.rewrite_index(dx.read(node.lblk), node, hashes, blocks, dx.seed))
    dx.index_changed()                                            # 2. the index leads there
    dx.store(leaf, seal_leaf(vol, d, block1))                     # 3. the old leaf sheds it
    return placed


def _dx_grow(dx: _Dx, frames: list[tuple[htree.DxNode, int]]) -> None:
    """Make room in the full index block above a leaf (Linux ``ext4_dx_add_entry``): split the
    lowest full block whose parent has room, or, all full up to the root, move the root's
    entries into a new node one level down; ENOSPC past the deepest tree allowed."""
    k = len(frames) - 1
    while k > 0 and frames[k - 1][0].count >= frames[k - 1][0].limit:
        k -= 1
    bs, seed = dx.bs, dx.seed
    if k == 0:
        root = frames[0][0]
        if root.indirect_levels >= htree.max_depth(dx.vol.large_dir):
            raise OSError(errno.ENOSPC, f"directory inode {dx.d.ino}: its index is full")
        child = dx.append(htree.new_node(bs, htree.node_limit(bs, seed is not None), root.hashes,
                                         root.blocks, seed))
        dx.store(0, htree.rewrite_index(dx.read(0), root, [], [child], seed, levels=root.indirect_levels + 1))
    else:
        node, _ = frames[k]
        parent, pat = frames[k - 1]
        (kh, kb), (mh, mb), hash2 = htree.split_node(node)
        sibling = dx.append(htree.new_node(bs, node.limit, mh, mb, seed))
        hashes, blocks = htree.insert_entry(parent, pat, hash2, sibling)
        dx.store(parent.lblk, htree.rewrite_index(dx.read(parent.lblk), parent, hashes, blocks, seed))
        dx.index_changed()
        dx.store(node.lblk, htree.rewrite_index(dx.read(node.lblk), node, kh, kb, seed))
    dx.index_changed()


def _touch_dir(vol: Volume, d: Inode, store: bool) -> None:
    """A directory changed: new mtime and ctime, stored now or (times only) at the next sync."""
    d.mtime_ns = d.ctime_ns = time.time_ns()
    if store:
        vol.write_inode(d)
    else:
        vol.touch(d)


def add_entry(vol: Volume, d: Inode, name: bytes, ino: int, mode: int, key: str | None = None) -> None:
    """Insert ``name -> ino`` into directory ``d`` (reusing free space, else a new block).

    ``key`` is ``name`` decoded, when the caller has it already.
    """
    bs = vol.bs
    space = dir_space(vol, d)
    check_new_name(vol, d, name)
    ftype = L.IFMT_TO_FT.get(S_IFMT(mode), 0) if vol.filetype else 0
    if d.flags & L.FL_INDEX:
        if keeps_index(vol, d):               # never into an index block: through the index
            _dx_add(vol, d, space, name, ino, ftype)
            _entry_added(vol, d, name, ino, ftype, key)
            return
        _unindex(vol, d)
    need = (len(name) + 11) & ~3                # rec_len_of, inline: this is the create hot path
    lblk, kind = space.find_slot(need)
    if lblk < 0 and make_indexed_dir(vol, d, space):   # ext4: a full one-block directory gets an htree
        return add_entry(vol, d, name, ino, mode, key)   # ... and the name goes in through it
    if lblk < 0:
        lblk = d.size // bs
        block = seal_leaf(vol, d, encode_block(dir_end(vol), name, ino, ftype).ljust(bs, b"\0"))
        got = d.map.assign(lblk, lblk + 1, lambda lb, n, pb: vol.device.write(block, pb * bs))
        if not got:
            raise fs_error(errno.ENOSPC)
        D.set_size(vol, d, d.size + bs)
        pblk = _dblock(d, space, lblk)
        space.scan(lblk, vol.device.view(pblk * bs, bs))
    else:
        pblk = _dblock(d, space, lblk)
        buf = vol.device.view(pblk * bs, bs)
        at = space.tail[lblk][0] if kind == "tail" else None
        new_off, writes = insert_into_block(buf, dir_end(vol), at, name, ino, ftype)
        _dir_store(vol, d, pblk, writes)
        if kind == "tail":             # the new entry is now the block's last: no rescan needed
            space.appended(lblk, new_off, name, need)
        else:
            space.scan(lblk, vol.device.view(pblk * bs, bs))
    _touch_dir(vol, d, store=kind == "")
    index = d._dir
    if index is not None:
        index.entries[os.fsdecode(name) if key is None else key] = (ino, ftype)
        index.changed()


def _entry_added(vol: Volume, d: Inode, name: bytes, ino: int, ftype: int, key: str | None) -> None:
    """After a name went into an indexed directory: times, and the in-memory name index."""
    _touch_dir(vol, d, store=False)
    index = d._dir
    if index is not None:
        index.entries[os.fsdecode(name) if key is None else key] = (ino, ftype)
        index.changed()


def encode_block(bs: int, name: bytes, ino: int, ftype: int) -> bytes:
    return encode_entry(ino, bs, name, ftype).ljust(bs, b"\0")


def remove_entry(vol: Volume, d: Inode, name: bytes) -> None:
    """Delete entry ``name`` of ``d`` from its block (an htree's index stays as it is, as in
    Linux ``ext4_delete_entry``)."""
    space = dir_space(vol, d)
    if not keeps_index(vol, d):
        _unindex(vol, d)
    lblk, off = space.where.pop(name)
    bs = vol.bs
    pblk = _dblock(d, space, lblk)
    kept, writes = remove_from_block(vol.device.view(pblk * bs, bs), dir_end(vol), off)
    _dir_store(vol, d, pblk, writes)
    space.removed(lblk, vol.device.view(pblk * bs, bs), kept)
    _touch_dir(vol, d, store=False)
    index = d._dir
    if index is not None:
        index.entries.pop(os.fsdecode(name), None)
        index.changed()


def set_entry(vol: Volume, d: Inode, name: bytes, ino: int, mode: int) -> None:
    """Point the existing entry ``name`` at ``ino`` (one small write, as ``ext2_set_link``)."""
    space = dir_space(vol, d)
    if not keeps_index(vol, d):
        _unindex(vol, d)
    lblk, off = space.where[name]
    pblk = _dblock(d, space, lblk)
    ftype = L.IFMT_TO_FT.get(S_IFMT(mode), 0) if vol.filetype else 0
    _dir_store(vol, d, pblk, [(off + 7, bytes([ftype])), (off, ino.to_bytes(4, "little"))])
    _touch_dir(vol, d, store=False)
    if d._dir is not None:
        d._dir.entries[os.fsdecode(name)] = (ino, ftype)


def rename_in_place(vol: Volume, d: Inode, old: bytes, new: bytes) -> bool:
    """Rename an entry within its own record, in one store; False when the new name won't fit.

    One store makes the old name go and the new one appear together, so no instant shows
    both (a directory with two names) or neither (an unconnected directory). Never in a
    directory whose index is kept: the new name has another hash, hence maybe another leaf.
    """
    if keeps_index(vol, d):
        return False
    space = dir_space(vol, d)
    lblk, off = space.where[old]
    bs = vol.bs
    pblk = _dblock(d, space, lblk)
    rec_len = struct.unpack_from("<H", vol.device.view(pblk * bs + off + 4, 2))[0] or bs
    if rec_len_of(len(new)) > rec_len:
        return False
    _unindex(vol, d)
    ftype = vol.device.view(pblk * bs + off + 7, 1)[0]
    _dir_store(vol, d, pblk, [(off + 6, bytes([len(new), ftype]) + new)])
    space.scan(lblk, vol.device.view(pblk * bs, bs))
    space.where.pop(old, None)
    _touch_dir(vol, d, store=False)
    index = d._dir
    if index is not None:
        index.entries[os.fsdecode(new)] = index.entries.pop(os.fsdecode(old))
        index.changed()
    return True


def set_dotdot(vol: Volume, d: Inode, parent: int) -> None:
    """Point ``..`` of ``d`` at ``parent``; in an htree's root under metadata_csum, the root
    stored whole with its dx tail checksum redone (the root is no leaf)."""
    if d.flags & L.FL_INLINE_DATA:
        move_out_dir(vol, d)
    pblk = d.map.bmap(0)
    bs = vol.bs
    if d.flags & L.FL_INDEX and vol.sb.metadata_csum:
        block = bytearray(vol.device.view(pblk * bs, bs))
        root = htree.parse_root(block, bs=bs, metadata_csum=True, large_dir=vol.large_dir)
        block[12:16] = parent.to_bytes(4, "little")
        seed = inode_seed(vol.sb.csum_seed, d.ino, d.generation)
        vol.device.write(htree.rewrite_index(block, root, root.hashes, root.blocks, seed), pblk * bs)
    else:
        _dir_store(vol, d, pblk, [(12, parent.to_bytes(4, "little"))])
    if d._dir is not None:
        d._dir.parent = parent


# -- inodes -------------------------------------------------------------------------------------

def new_inode(vol: Volume, parent: Inode, mode: int, uid: int, gid: int, name: bytes | None = None) -> Inode:
    """Allocate and write a fresh inode with no links yet (``name``: what it will be called,
    which spreads top-level directories over the flex groups as Linux does).

    It becomes live when a name links to it. Until it is written, its slot holds zeros or a
    deleted inode, which e2fsck -p treats as free: a kill in between only leaks the bit.
    """
    ino = vol.ialloc.alloc(parent.ino, S_IFMT(mode) == S_IFDIR, name)
    isize = vol.isize
    node = Inode(vol, ino, vol.zero_inode)
    now = time.time_ns()
    node.mode = mode
    node.uid, node.gid = uid, gid
    node.atime_ns = node.mtime_ns = node.ctime_ns = now
    node.generation = random.getrandbits(32)
    node.flags = inherited_flags(vol, parent, mode)
    if isize >= 160:
        node.extra_isize = 32
        node.crtime_ns = now
    if vol.extents and S_IFMT(mode) in (S_IFREG, S_IFDIR):   # ext4: mapped by an extent tree
        node.flags |= L.FL_EXTENTS
        node.i_block = inode_root()
    vol.write_inode(node)
    vol.remember(node)
    return node


#: Flags a new inode takes from its directory (Linux ``EXT2_FL_INHERITED``, ``EXT4_FL_INHERITED``:
#: secrm, unrm, compr, sync, nodump, noatime, nocompr, journal_data, notail, dirsync; ext2's
#: comprblk; ext4's dax, projinherit and casefold).
_INHERITED_EXT2 = 0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x200 | 0x400 | 0x4000 | 0x8000 | 0x10000
_INHERITED_EXT4 = (0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x400 | 0x4000 | 0x8000 | 0x10000
                   | L.FL_DAX | 0x20000000 | L.FL_CASEFOLD)
#: What a regular file keeps of them (not dirsync, topdir, casefold, projinherit); other
#: non-directories keep only nodump and noatime (``ext4_mask_flags``).
_REG_DROPS = 0x10000 | 0x20000 | L.FL_CASEFOLD | 0x20000000
_OTHER_KEEPS = 0x40 | 0x80


def inherited_flags(vol: Volume, d: Inode, mode: int) -> int:
    """The flags a new inode of ``mode`` takes from directory ``d``, as Linux gives them."""
    flags = d.flags & (_INHERITED_EXT4 if vol.extents else _INHERITED_EXT2)
    if not flags:
        return 0
    fmt = S_IFMT(mode)
    if fmt == S_IFDIR:
        return flags
    if fmt == S_IFREG:
        return flags & ~_REG_DROPS
    return flags & _OTHER_KEEPS


def create(vol: Volume, d: Inode, name: bytes, mode: int, uid: int, gid: int, *,
           rdev: tuple[int, int] | None = None, target: bytes | None = None,
           content: memoryview | None = None) -> Inode:
    """Make a new file, directory, symlink or device node ``name`` in directory ``d``.

    ``content`` (regular files) is written before the name appears, so a new file is never
    seen empty; ENOSPC when it does not fit whole.
    """
    check_name(name)
    if os.fsdecode(name) in vol.dir_index(d).entries:
        raise fs_error(errno.EEXIST)
    check_new_name(vol, d, name)
    is_dir = S_IFMT(mode) == S_IFDIR
    if is_dir and dir_links_full(vol, d):
        raise fs_error(errno.EMLINK)
    if content is not None and 0 < len(content) <= L.N_DIRECT * vol.bs:
        return vol.inode(create_small(vol, d, name, mode, uid, gid, content))
    node = new_inode(vol, d, mode, uid, gid, name)
    try:
        _fill_new(vol, d, node, is_dir, rdev, target, content)
        add_entry(vol, d, name, node.ino, mode)
    except BaseException:
        _discard(vol, node, is_dir)
        raise
    node.links = 2 if is_dir else 1
    vol.write_links(node)                     # the name exists: now the inode counts it
    if is_dir:
        inc_dir_links(vol, d)
        vol.write_inode(d)
    return node


def _fill_new(vol: Volume, d: Inode, node: Inode, is_dir: bool, rdev: tuple[int, int] | None,
              target: bytes | None, content: memoryview | None = None) -> None:
    bs = vol.bs
    fmt = S_IFMT(node.mode)
    if content:
        if D.write(vol, node, content, 0) < len(content):
            raise fs_error(errno.ENOSPC)
        return                                   # D.write stored the inode
    if is_dir:
        block = seal_leaf(vol, node, empty_dir_block(dir_end(vol), node.ino, d.ino, vol.filetype)
                          .ljust(bs, b"\0"))
        if not node.map.assign(0, 1, lambda lb, n, pb: vol.device.write(block, pb * bs)):
            raise fs_error(errno.ENOSPC)
        D.set_size(vol, node, bs)
    elif fmt == S_IFLNK:
        assert target is not None
        if len(target) < 60:
            node.i_block = target.ljust(60, b"\0")
            node.size = len(target)
            node.reset_map()
        else:
            if len(target) >= bs:
                raise fs_error(errno.ENAMETOOLONG)
            if vol.extents:                      # a slow symlink's one block, by extent on ext4
                node.flags |= L.FL_EXTENTS
                node.i_block = inode_root()
                node.reset_map()
            block = target.ljust(bs, b"\0")
            if not node.map.assign(0, 1, lambda lb, n, pb: vol.device.write(block, pb * bs)):
                raise fs_error(errno.ENOSPC)
            node.size = len(target)
            node.reset_map()
    elif fmt in (S_IFCHR, S_IFBLK) and rdev is not None:
        node.i_block = encode_rdev(*rdev)
    else:
        return                                  # a plain file, FIFO or socket: nothing more yet
    vol.write_inode(node)


def create_small(vol: Volume, d: Inode, name: bytes, mode: int, uid: int, gid: int,
                 content: memoryview, key: str | None = None) -> int:
    """Make regular file ``name`` with ``content`` (it fits the direct blocks); its number.

    ``create`` in one lean pass, for the many-small-files case: inode bit, data blocks, data,
    the whole inode in one store (no links yet), the entry, then the link count. The caller
    has checked the name is free.
    """
    check_new_name(vol, d, name)
    bs = vol.bs
    n = len(content)
    count = -(-n // bs)
    ino = vol.ialloc.alloc(d.ino, False)
    vol.forget(ino)                                      # a free inode someone looked at
    try:
        runs = vol.balloc.alloc(vol.inode_group_goal(ino, True), count, whole=True)
    except BaseException:
        vol.ialloc.free(ino, False)
        raise
    if len(runs) == 1 and runs[0][1] == count:           # the usual case: one run
        pblk = runs[0][0]
        blocks = range(pblk, pblk + count)
        vol.device.write_new(content, pblk * bs)
    else:
        if sum(c for _, c in runs) < count:
            for pblk, c in runs:
                vol.balloc.free(pblk, c)
            vol.ialloc.free(ino, False)
            raise fs_error(errno.ENOSPC)
        blocks = []
        pos = 0
        for pblk, c in runs:
            vol.device.write_new(content[pos:pos + c * bs], pblk * bs)
            blocks.extend(range(pblk, pblk + c))
            pos += c * bs
    if n % bs:                                           # zero the tail of the last block
        vol.device.write_new(bytes(bs - n % bs), blocks[-1] * bs + n % bs)
    flags = inherited_flags(vol, d, mode) if d.flags else 0
    if vol.extents and len(runs) <= 4:           # ext4: the runs as the root's extents
        i_block = inode_root(((0, count, runs[0][0]),) if len(runs) == 1 else _file_runs(runs))
        flags |= L.FL_EXTENTS
    elif len(runs) == 1:
        i_block = encode_direct_run(blocks[0], count)
    else:
        i_block = _DIRECT.pack(*blocks, *([0] * (15 - len(blocks))))
    at = vol.inode_offset(ino)
    raw = encode_new_inode(vol.isize, mode, uid, gid, n, count * (bs // 512), i_block,
                           time.time_ns(), random.getrandbits(32), flags=flags)
    unlinked, linked = seal_fresh(vol, ino, raw)
    vol.device.write(unlinked, at)
    try:
        add_entry(vol, d, name, ino, mode, key)
    except BaseException:
        _discard(vol, vol.inode(ino), False)
        raise
    if linked is raw:                            # no checksum: the link count alone
        vol.device.write(b"\1\0", at + 26)
    else:                                        # the name exists: now the inode counts it
        vol.device.write(linked, at)
    return ino


def _file_runs(runs: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Device runs ``(first block, count)`` of a new file as ``(file block, count, first block)``."""
    out = []
    lblk = 0
    for pblk, n in runs:
        out.append((lblk, n, pblk))
        lblk += n
    return out


def has_block_map(vol: Volume, node: Inode) -> bool:
    """True when ``i_block`` holds block pointers (not a fast symlink's text or a device number)."""
    fmt = S_IFMT(node.mode)
    if fmt in (S_IFREG, S_IFDIR):
        return True
    if fmt == S_IFLNK:
        return node.blocks - (vol.bs // 512 if node.file_acl else 0) > 0
    return False


def _discard(vol: Volume, node: Inode, is_dir: bool) -> None:
    """Undo a half-made inode (nothing links to it yet)."""
    node.dtime = int(time.time()) & 0xFFFFFFFF
    if node.blocks and has_block_map(vol, node):
        D.drop_blocks(vol, node, 0)
    node.mode = 0
    vol.write_inode(node)
    vol.ialloc.free(node.ino, is_dir)
    vol.forget(node.ino)


def link(vol: Volume, node: Inode, d: Inode, name: bytes) -> None:
    check_name(name)
    if os.fsdecode(name) in vol.dir_index(d).entries:
        raise fs_error(errno.EEXIST)
    check_new_name(vol, d, name)
    if node.is_dir:
        raise fs_error(errno.EPERM)
    if node.links >= link_max(vol):
        raise fs_error(errno.EMLINK)
    node.links += 1                      # a link count too high is what e2fsck -p fixes
    node.ctime_ns = time.time_ns()
    vol.write_inode(node)
    try:
        add_entry(vol, d, name, node.ino, node.mode)
    except BaseException:
        node.links -= 1
        vol.write_inode(node)
        raise


def drop_link(vol: Volume, node: Inode) -> None:
    """One name of ``node`` is going: lower its link count; at zero it dies (data freed later).

    Refused, before anything changes, when the inode is damaged: a named inode with no links
    (e2fsck counts it free, its blocks may be another file's), or one whose block pointers
    lead outside the data area (freeing them would free metadata).
    """
    if node.links == 0:
        raise CorruptImageError(f"inode {node.ino} is named in a directory but has link count 0",
                                f"inode {node.ino}")
    if (node.is_dir or node.links == 1) and has_block_map(vol, node):
        node.map.runs(0, node.map.nblocks)        # checks every pointer up to i_size
    now = time.time_ns()
    node.ctime_ns = now
    if node.is_dir or node.links <= 1:
        node.links = 0
        node.dtime = (now // 1_000_000_000) & 0xFFFFFFFF
    else:
        node.links -= 1
    vol.write_inode(node)


def release(vol: Volume, node: Inode, force: bool = False) -> None:
    """Free the blocks, xattr block and inode of a dead inode (links 0, dtime set).

    While something still uses it (``orphans.is_open``) it waits as an orphan, unless ``force``.
    """
    if not force and orphans.is_open(vol, node.ino):
        vol.orphans.add(node.ino)        # freed when the last file object closes
        return
    drop_xattrs(vol, node)               # first: its EA inodes (ea_inode) wait unnamed till then
    if has_block_map(vol, node):
        D.drop_blocks(vol, node, 0)
    vol.ialloc.free(node.ino, S_IFMT(node.mode) == S_IFDIR)
    vol.forget(node.ino)


def unlink(vol: Volume, d: Inode, name: bytes) -> None:
    node = _child(vol, d, name)
    if node.is_dir:
        raise fs_error(errno.EISDIR)
    drop_link(vol, node)
    remove_entry(vol, d, _stored_name(vol, d, name))
    if node.links == 0:
        release(vol, node)
    vol.names_changed()


def rmdir(vol: Volume, d: Inode, name: bytes) -> None:
    if name in (b".", b".."):
        raise fs_error(errno.EINVAL if name == b"." else errno.ENOTEMPTY)
    node = _child(vol, d, name)
    if not node.is_dir:
        raise fs_error(errno.ENOTDIR)
    if vol.dir_index(node).entries:
        raise fs_error(errno.ENOTEMPTY)
    drop_link(vol, node)
    remove_entry(vol, d, _stored_name(vol, d, name))
    dec_dir_links(d)
    vol.write_inode(d)
    release(vol, node)
    vol.spaces.pop(node.ino, None)
    vol.names_changed()


def _dir_nlink(vol: Volume, d: Inode) -> bool:
    """Whether ``d``'s link count may overflow to 1 (dir_nlink, and an htree Linux sees)."""
    return vol.sb.has_ro_compat(L.RO_COMPAT_DIR_NLINK) and keeps_index(vol, d)


def link_max(vol: Volume) -> int:
    """Most links an inode may have: 32,000 on ext2 (``EXT2_LINK_MAX``), 65,000 on ext4
    (extents or dir_nlink: ``EXT4_LINK_MAX``)."""
    if vol.extents or vol.sb.has_ro_compat(L.RO_COMPAT_DIR_NLINK):
        return EXT4_LINK_MAX
    return LINK_MAX


def dir_links_full(vol: Volume, d: Inode) -> bool:
    """Whether directory ``d`` can take no more subdirectories (EMLINK): at :func:`link_max`,
    but no limit for an indexed directory with dir_nlink (Linux ``EXT4_DIR_LINK_MAX``)."""
    return d.links >= link_max(vol) and not _dir_nlink(vol, d)


def inc_dir_links(vol: Volume, d: Inode) -> None:
    """A subdirectory joined ``d``: one more link, or (dir_nlink) 1 once past 65,000 and from
    then on (Linux ``ext4_inc_count``). The caller stores the inode."""
    d.links += 1
    if _dir_nlink(vol, d) and (d.links > EXT4_LINK_MAX or d.links == 2):
        d.links = 1


def dec_dir_links(d: Inode) -> None:
    """A subdirectory left ``d``: one link fewer, never below 2; a count of 1 (too many to
    count) stays 1 (Linux ``ext4_dec_count``). The caller stores the inode."""
    if d.links > 2:
        d.links -= 1


def _child(vol: Volume, d: Inode, name: bytes) -> Inode:
    if len(name) > 255:
        raise fs_error(errno.ENAMETOOLONG)
    entry = vol.dir_index(d).entries.get(os.fsdecode(name))
    if entry is None:
        raise fs_error(errno.ENOENT)
    return vol.inode(entry[0])


def is_ancestor(vol: Volume, a: Inode, d: Inode) -> bool:
    """True when directory ``a`` is ``d`` or contains it (walking ``..`` up to the root)."""
    seen = set()
    cur = d
    while True:
        if cur.ino == a.ino:
            return True
        if cur.ino == L.ROOT_INO or cur.ino in seen:
            return False
        seen.add(cur.ino)
        cur = vol.inode(vol.dir_index(cur).parent)


def rename(vol: Volume, sd: Inode, sname: bytes, dd: Inode, dname: bytes) -> None:
    """Move ``sd/sname`` to ``dd/dname``, replacing what is there (POSIX ``rename``)."""
    src = _child(vol, sd, sname)
    check_name(dname)
    entry = vol.dir_index(dd).entries.get(os.fsdecode(dname))
    dst = vol.inode(entry[0]) if entry else None
    if dst is not None and dst.ino == src.ino:
        return                  # also a rename to another case of itself, as in Linux (the VFS)
    if dst is None:
        check_new_name(vol, dd, dname)
    sname = _stored_name(vol, sd, sname)     # casefolded: the entries as stored
    if dst is not None:
        dname = _stored_name(vol, dd, dname)
    if dst is not None and dst.is_dir and is_ancestor(vol, dst, sd):
        raise fs_error(errno.ENOTEMPTY)        # the target contains the source
    moving_dir = src.is_dir
    if moving_dir:
        if is_ancestor(vol, src, dd):
            raise fs_error(errno.EINVAL)
        if dst is not None:
            if not dst.is_dir:
                raise fs_error(errno.ENOTDIR)
            if vol.dir_index(dst).entries:
                raise fs_error(errno.ENOTEMPTY)
        elif dd.ino != sd.ino and dir_links_full(vol, dd):
            raise fs_error(errno.EMLINK)
    elif dst is not None and dst.is_dir:
        raise fs_error(errno.EISDIR)
    now = time.time_ns()
    if dst is not None:
        drop_link(vol, dst)                  # the replaced inode dies first: a kill here leaves
        set_entry(vol, dd, dname, src.ino, src.mode)   # an entry to a dead inode (e2fsck -p)
        remove_entry(vol, sd, sname)
    elif sd.ino != dd.ino or not rename_in_place(vol, sd, sname, dname):
        add_entry(vol, dd, dname, src.ino, src.mode)
        remove_entry(vol, sd, sname)
    src.ctime_ns = now
    vol.write_inode(src)
    if moving_dir and sd.ino != dd.ino:
        set_dotdot(vol, src, dd.ino)
        dec_dir_links(sd)
        vol.write_inode(sd)
        if dst is None:
            inc_dir_links(vol, dd)
            vol.write_inode(dd)
    if dst is not None:
        if dst.is_dir:
            if sd.ino == dd.ino:
                dec_dir_links(dd)
                vol.write_inode(dd)
            vol.spaces.pop(dst.ino, None)
        if dst.links == 0:
            release(vol, dst)
    vol.names_changed()


def exchange(vol: Volume, sd: Inode, sname: bytes, dd: Inode, dname: bytes) -> None:
    """Swap what ``sd/sname`` and ``dd/dname`` name, both names staying (``renameat2``'s
    ``RENAME_EXCHANGE``, Linux ``ext4_cross_rename``): each entry points at the other's inode;
    a directory that changes parent has its ``..`` follow, and so do the parents' link counts
    when a directory and a non-directory trade places."""
    a, b = _child(vol, sd, sname), _child(vol, dd, dname)
    if a.ino == b.ino:
        return
    sname, dname = _stored_name(vol, sd, sname), _stored_name(vol, dd, dname)
    crossing = sd.ino != dd.ino
    if crossing and ((a.is_dir and is_ancestor(vol, a, dd)) or (b.is_dir and is_ancestor(vol, b, sd))):
        raise fs_error(errno.EINVAL)             # a directory into its own subtree
    gain = lose = None
    if crossing and a.is_dir != b.is_dir:        # the parent that takes the directory gains a link
        gain, lose = (dd, sd) if a.is_dir else (sd, dd)
        if dir_links_full(vol, gain):
            raise fs_error(errno.EMLINK)
    set_entry(vol, sd, sname, b.ino, b.mode)
    set_entry(vol, dd, dname, a.ino, a.mode)
    a.ctime_ns = b.ctime_ns = time.time_ns()
    vol.write_inode(a)
    vol.write_inode(b)
    if crossing:
        if a.is_dir:
            set_dotdot(vol, a, dd.ino)
        if b.is_dir:
            set_dotdot(vol, b, sd.ino)
        if gain is not None and lose is not None:
            inc_dir_links(vol, gain)
            dec_dir_links(lose)
            vol.write_inode(gain)
            vol.write_inode(lose)
    vol.names_changed()


# -- looking names up (what Linux does in namei.c: the path walk) ------------------------------
def readlink(vol: Volume, node: Inode) -> bytes:
    """The target of symlink ``node`` (fast: in ``i_block``; slow: in its first block; ext4
    inline: in ``i_block`` and the inode's ``system.data``)."""
    size = node.size
    where = f"symlink inode {node.ino}"
    acl_blocks = vol.bs * vol.sb.cluster_ratio // 512 if node.file_acl else 0
    if node.flags & L.FL_INLINE_DATA and vol.inode_formats & L.FL_INLINE_DATA:
        if not 0 < size < vol.bs:
            raise CorruptImageError(f"symlink length {size} invalid", where)
        target = D.read_bytes(vol, node, 0, size)
    elif 0 < size < 60 and node.blocks - acl_blocks == 0:
        target = node.i_block[:size]
    else:
        node.check_format()
        if size == 0 or size >= vol.bs:
            raise CorruptImageError(f"symlink length {size} invalid", where)
        target = D.read_bytes(vol, node, 0, size)
        if node.map.bmap(0) == 0:
            raise CorruptImageError("slow symlink without a data block", where)
    if b"\0" in target:
        raise CorruptImageError("symlink target contains a NUL byte", where)
    return target


def resolve(vol: Volume, path: str, follow: bool = True) -> Inode:
    """The inode ``path`` names (absolute from the image root; relative means the same).

    Symlinks in the middle are always followed, the last one only with ``follow``; a
    trailing slash demands a directory. Errors are the ``OSError`` that ``os`` raises.
    Resolved paths are remembered, and a path whose directory was resolved before costs
    one lookup in that directory.
    """
    watch = vol.watch                     # inline: this is every lookup's first step
    if watch is not None and (watch.peek(STAMP_OFFSET, STAMP_LEN) != watch.stamp or not watch.quiet):
        return _resolve_following(vol, path, follow, watch)
    ino = vol.paths.get((path, follow))
    if ino is not None:
        return vol.inode(ino)
    return _resolve_new(vol, path, follow)


def _resolve_following(vol: Volume, path: str, follow: bool, watch: WriterWatch) -> Inode:
    """``resolve`` while a writer in another process is mounted, or after one was."""
    for _ in range(TRIES):
        watch.follow()
        try:
            return _resolve(vol, path, follow)
        except CorruptImageError:
            if not watch.busy():
                raise
        # a directory or inode read while a writer elsewhere was changing it: read it again
    raise OSError(errno.EAGAIN, "the image kept changing under a writer in another process", path)


def _resolve(vol: Volume, path: str, follow: bool) -> Inode:
    ino = vol.paths.get((path, follow))
    return vol.inode(ino) if ino is not None else _resolve_new(vol, path, follow)


def _resolve_new(vol: Volume, path: str, follow: bool) -> Inode:
    """A path not resolved before: one lookup when its directory was, else the whole walk."""
    node = _child_of_known(vol, path, follow)
    if node is None:
        node = _walk(vol, path, follow)
    vol.paths[path, follow] = node.ino
    return node


def _child_of_known(vol: Volume, path: str, follow: bool) -> Inode | None:
    """``path`` looked up in its directory when that directory resolved before, else None."""
    head, sep, tail = path.rpartition("/")
    if not tail or tail == "." or tail == ".." or not sep or head.endswith("/"):
        return None
    pino = vol.paths.get((head or "/", True))
    if pino is None:
        if head.count("/") > 64 or not head:
            return None
        try:
            parent = resolve(vol, head, True)
        except OSError:
            return None                    # the full walk names the error with the full path
    else:
        parent = vol.inode(pino)
    index = parent._dir                    # an indexed directory: one dict access
    if index is not None:
        entry = index.entries.get(tail)
    elif S_ISDIR(parent.mode):
        entry = lookup(vol, parent, tail)
    else:
        return None
    if entry is None:
        return None
    child = vol.inode(entry[0])
    if not child.links and (not child.mode or child.dtime):     # vol.live_inode's rule, inline
        raise CorruptImageError(f"entry {tail!r} points to deleted inode {entry[0]}",
                                f"directory inode {parent.ino}")
    if follow and S_ISLNK(child.mode):
        return None
    return child


def lookup(vol: Volume, d: Inode, name: str) -> tuple[int, int] | None:
    """``(inode, file type)`` of ``name`` in directory ``d``: from its in-memory index, or, for
    a large indexed directory not read yet, through its htree (a few blocks)."""
    index = d._dir
    if index is None:
        flags = d.flags
        if flags & L.FL_INDEX and vol.readonly and d.size >= HTREE_LOOKUP_BLOCKS * vol.bs:
            return htree_lookup(vol, d, name)
        index = vol.dir_index(d)
    return index.entries.get(name)


def _walk(vol: Volume, path: str, follow: bool) -> Inode:
    if not path:
        raise fs_error(errno.ENOENT, path)
    # No PATH_MAX here: Linux limits the path a caller passes (the facade checks that),
    # not one a door assembled or symlinks built up; NAME_MAX is each lookup's limit.
    root = vol.root
    pending = components(path)
    # The directories walked through: ".." goes back one, as in Linux, whatever the
    # on-disk ".." entry says (a damaged one cannot send a lookup elsewhere).
    stack = [root]
    links = 0
    while pending:
        name = pending.pop()
        cur = stack[-1]
        if not cur.is_dir:
            raise fs_error(errno.ENOTDIR, path)
        if name == ".":
            continue
        if name == "..":
            if len(stack) > 1:
                stack.pop()
            continue
        entry = lookup(vol, cur, name)
        if entry is None:
            if len(name) > NAME_MAX // 4 and len(os.fsencode(name)) > NAME_MAX:
                raise fs_error(errno.ENAMETOOLONG, path)
            raise fs_error(errno.ENOENT, path)
        child = vol.live_inode(entry[0], name, f"directory inode {cur.ino}")
        if S_ISLNK(child.mode) and (pending or follow):
            links += 1
            if links > MAX_SYMLINKS:
                raise fs_error(errno.ELOOP, path)
            target = os.fsdecode(readlink(vol, child))
            if target.startswith("/"):
                del stack[1:]
            pending.extend(components(target))
            continue
        stack.append(child)
    return stack[-1]


def name_moved(vol: Volume, path: str, node: Inode) -> bool:
    """After a read through ``path`` by a reader of shared memory: True if a writer elsewhere
    may have changed the image meanwhile and ``path``, read again from storage, no longer
    names ``node`` (a name read torn or stale). Raises FileNotFoundError when it names
    nothing now."""
    if vol.watch is None or not vol.watch.busy():
        return False
    vol.forget_cached()
    return resolve(vol, path, True).ino != node.ino


def components(path: str) -> list[str]:
    """The names of ``path`` in reverse order (a stack), ``.`` kept; a trailing slash is a final
    ``.``, which makes the lookup demand a directory and follow a symlink there, as in Linux."""
    names = [c for c in path.split("/") if c]
    if path.endswith("/") and names:
        names.append(".")
    names.reverse()
    return names
