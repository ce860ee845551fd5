"""htree (dir_index) lookups on real images, indexed by e2fsck -D and by Linux, and on broken ones.

The directories' blocks come from debugfs (``blocks``: the physical blocks in logical order),
read from the image file, so these tests use nothing of xipfs but the modules under test
(and ``csum.crc32c_raw`` for the checksum seeds). Every name of a directory must be in one of
the leaves :func:`candidate_blocks` yields for it; each leaf's names must hash into the range
its index entries give it (which checks dirhash and the walk together); the superblock fields
the lookup uses are compared with what ``dumpe2fs -h`` prints.

Images: one base per (block size, metadata_csum) built by ``mke2fs -d`` from a tree of random
byte names (high-bit bytes included: signed and unsigned hashes differ on them), then per
variant a copy whose hash algorithm, s_flags and seed are set with ``debugfs ssv`` and whose
directories ``e2fsck -fyD`` indexes again. The kernel writes the others (loop mount, root).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import struct
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from conftest import mounted
from e2fs import SHM, debugfs, dumpe2fs_header, e2fsck, fsck_problems, mkfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xipfs.errors import CorruptImageError
from xipfs.extfs import htree
from xipfs.extfs.csum import crc32c_raw
from xipfs.extfs.dirhash import HASH_NAMES, dirhash, hash_version

INCOMPAT_CSUM_SEED = 0x2000
INCOMPAT_LARGEDIR = 0x4000
RO_COMPAT_METADATA_CSUM = 0x400


# -- images and what the tools say about them ------------------------------------------------
@dataclass
class Super:
    """The superblock fields an htree lookup needs, read from the raw bytes."""

    bs: int
    hash_seed: bytes
    def_hash_version: int
    s_flags: int
    metadata_csum: bool
    large_dir: bool
    fs_csum_seed: int

    @classmethod
    def read(cls, img: str) -> Super:
        with open(img, "rb") as f:
            f.seek(1024)
            sb = f.read(1024)
        incompat, ro_compat = struct.unpack_from("<I", sb, 0x60)[0], struct.unpack_from("<I", sb, 0x64)[0]
        if incompat & INCOMPAT_CSUM_SEED:
            seed = struct.unpack_from("<I", sb, 0x270)[0]
        else:
            seed = crc32c_raw(0xFFFFFFFF, sb[0x68:0x78])
        return cls(1024 << struct.unpack_from("<I", sb, 0x18)[0], sb[0xEC:0xFC], sb[0xFC],
                   struct.unpack_from("<I", sb, 0x160)[0], bool(ro_compat & RO_COMPAT_METADATA_CSUM),
                   bool(incompat & INCOMPAT_LARGEDIR), seed)


@dataclass
class Dir:
    """One directory of an image: its blocks in logical order and what a lookup needs."""

    sb: Super
    ino: int
    generation: int
    blocks: list[bytes]
    _names: dict[int, set[bytes]] = field(default_factory=dict)

    def read_block(self, lblk: int) -> bytes:
        return self.blocks[lblk]

    @property
    def csum_seed(self) -> int:
        return crc32c_raw(crc32c_raw(self.sb.fs_csum_seed, struct.pack("<I", self.ino)),
                          struct.pack("<I", self.generation))

    def geometry(self, verify: bool = True) -> dict:
        """The keyword arguments of htree's walks for this directory."""
        return {"bs": self.sb.bs, "nblocks": len(self.blocks), "metadata_csum": self.sb.metadata_csum,
                "large_dir": self.sb.large_dir, "ino": self.ino,
                "csum_seed": self.csum_seed if verify and self.sb.metadata_csum else None}

    def candidates(self, name: bytes, read_block=None, verify: bool = True) -> list[int]:
        return list(htree.candidate_blocks(read_block or self.read_block, name, hash_seed=self.sb.hash_seed,
                                           s_flags=self.sb.s_flags, **self.geometry(verify)))

    def names_in(self, lblk: int) -> set[bytes]:
        """The live names of a leaf block (parsed here, independently of xipfs)."""
        if lblk not in self._names:
            buf, bs, off, names = self.blocks[lblk], self.sb.bs, 0, set()
            while off < bs:
                ino, rec_len, name_len = struct.unpack_from("<IHB", buf, off)
                assert rec_len >= 8, (lblk, off)
                if ino:
                    names.add(buf[off + 8:off + 8 + name_len])
                off += rec_len
            self._names[lblk] = names
        return self._names[lblk]


def load_dirs(img: str, paths: list[str]) -> dict[str, Dir]:
    """Each directory of ``paths`` (one debugfs run): inode, generation and its blocks' bytes."""
    out = debugfs(img, *[c for p in paths for c in (f'stat "{p}"', f'blocks "{p}"')])
    parts = out.split(b"debugfs: ")[1:]
    sb = Super.read(img)
    dirs = {}
    with open(img, "rb") as f:
        for p, stat, blocks in zip(paths, parts[0::2], parts[1::2], strict=True):
            ino = int(stat.split(b"Inode: ")[1].split()[0])
            gen = int(stat.split(b"Generation: ")[1].split()[0])
            phys = [int(b) for b in blocks.split(b"\n", 1)[1].split()]
            data = []
            for pb in phys:
                f.seek(pb * sb.bs)
                data.append(f.read(sb.bs))
            dirs[p] = Dir(sb, ino, gen, data)
    return dirs


def random_names(rng: random.Random, count: int, max_len: int = 255) -> list[bytes]:
    """``count`` distinct names of random bytes (no NUL or '/', not '.' or '..')."""
    alphabet = bytes(b for b in range(1, 256) if b != 0x2F)
    names: set[bytes] = set()
    while len(names) < count:
        n = rng.choice((rng.randint(1, 24), rng.randint(1, max_len)))
        name = bytes(rng.choice(alphabet) for _ in range(n))
        if name not in (b".", b".."):
            names.add(name)
    return sorted(names)


def check_dir(d: Dir, names: list[bytes], absent: list[bytes], verify: bool = True) -> htree.DxTree:
    """Every name in a candidate leaf, no absent one; the tree covers the directory; leaves in range."""
    missing = [n for n in names if not any(n in d.names_in(b) for b in d.candidates(n, verify=verify))]
    assert not missing, f"{len(missing)} of {len(names)} names not found, e.g. {missing[:3]}"
    for n in absent:
        assert not any(n in d.names_in(b) for b in d.candidates(n, verify=verify))
    tree = htree.walk(d.read_block, **d.geometry(verify))
    assert tree.index | set(tree.leaves) == set(range(len(d.blocks)))
    assert not tree.index & set(tree.leaves)
    assert sum(len(d.names_in(b)) for b in tree.leaves) == len(names)
    version = hash_version(tree.root.hash_version, d.sb.s_flags)
    for lblk, (lo, hi) in zip(tree.leaves, tree.ranges, strict=True):
        for n in d.names_in(lblk):
            h = dirhash(n, version, d.sb.hash_seed)[0]
            # e2fsck's rule, with room for Linux's 0xFFFFFFFE -> 0xFFFFFFFC of the last range
            assert lo & ~1 <= h <= (hi & ~1 if hi != 0xFFFFFFFF else hi), (lblk, n, hex(h), hex(lo), hex(hi))
    for lblk in tree.index:
        assert htree.is_index_block(d.blocks[lblk], lblk, d.sb.bs)
    assert htree.index_blocks(d.read_block, **d.geometry(verify)) == tree.index
    assert htree.dx_leaf_blocks(d.read_block, **d.geometry(verify)) == tree.leaves
    return tree


def check_super_against_dumpe2fs(img: str, sb: Super) -> None:
    hdr = dumpe2fs_header(img)
    assert hdr["Default directory hash"] == HASH_NAMES[sb.def_hash_version]
    if "Directory Hash Seed" in hdr:
        assert uuid.UUID(hdr["Directory Hash Seed"]) == uuid.UUID(bytes=sb.hash_seed)
    else:                                   # dumpe2fs leaves out the all-zero (default) seed
        assert sb.hash_seed == bytes(16)
    flags = hdr["Filesystem flags"].split()
    assert ("unsigned_directory_hash" in flags) == bool(sb.s_flags & 2)
    assert ("signed_directory_hash" in flags) == bool(sb.s_flags & 1)


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xipfs-htree-", dir=SHM)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- directories indexed by e2fsck -D ----------------------------------------------------------
#: directory -> how many names; 1K blocks hold "big" in a two-level tree (root + nodes)
TREE = {"big": 2500, "mid": 300}


@pytest.fixture(scope="module")
def tree_names(workdir: str) -> dict[str, list[bytes]]:
    rng = random.Random(20240611)
    src = os.path.join(workdir, "src")
    names = {}
    for d, count in TREE.items():
        names[d] = random_names(rng, count)
        top = os.fsencode(os.path.join(src, d))
        os.makedirs(top)
        for n in names[d]:
            os.close(os.open(os.path.join(top, n), os.O_CREAT | os.O_WRONLY, 0o644))
    return names


_BASES: dict[tuple[int, bool], str] = {}


def base_image(workdir: str, bs: int, csum: bool) -> str:
    if (bs, csum) not in _BASES:
        img = os.path.join(workdir, f"base-{bs}-{int(csum)}.img")
        mkfs(img, "24M", bs=bs, fstype="ext4", src=os.path.join(workdir, "src"),
             extra=() if csum else ("-O", "^metadata_csum"))
        _BASES[bs, csum] = img
    return _BASES[bs, csum]


VARIANTS = {
    # id: (block size, metadata_csum, hash algorithm, s_flags, seed or None to keep mke2fs's)
    "legacy-signed-1k-csum": (1024, True, "legacy", 1, None),
    "legacy-unsigned-4k": (4096, False, "legacy", 2, None),
    "half_md4-signed-4k": (4096, False, "half_md4", 1, None),
    "half_md4-unsigned-1k-csum": (1024, True, "half_md4", 2, None),
    "tea-signed-1k": (1024, False, "tea", 1, None),
    "tea-unsigned-4k-csum": (4096, True, "tea", 2, None),
    "half_md4-zero-seed-1k-csum": (1024, True, "half_md4", 1, "null"),
    "tea-seed-1k-csum": (1024, True, "tea", 1, "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def indexed(request, workdir: str, tree_names: dict[str, list[bytes]]) -> tuple[str, str]:
    bs, csum, alg, flags, seed = VARIANTS[request.param]
    img = os.path.join(workdir, f"{request.param}.img")
    shutil.copyfile(base_image(workdir, bs, csum), img)
    cmds = [f"ssv def_hash_version {alg}", f"ssv flags {flags}"] + ([f"ssv hash_seed {seed}"] if seed else [])
    debugfs(img, *cmds, write=True)
    rc, out = e2fsck(img, "-fyD")
    assert rc in (0, 1), out
    yield img, request.param
    os.unlink(img)


def test_e2fsck_indexed(indexed: tuple[str, str], tree_names: dict[str, list[bytes]]) -> None:
    img, variant = indexed
    bs, csum, alg, flags, seed = VARIANTS[variant]
    sb = Super.read(img)
    check_super_against_dumpe2fs(img, sb)
    assert (sb.bs, sb.metadata_csum, HASH_NAMES[sb.def_hash_version], sb.s_flags) == (bs, csum, alg, flags)
    if seed == "null":
        assert sb.hash_seed == bytes(16)
    elif seed:
        assert uuid.UUID(bytes=sb.hash_seed) == uuid.UUID(seed)
    dirs = load_dirs(img, ["/big", "/mid"])
    absent = random_names(random.Random(7), 50)
    for d, names in tree_names.items():
        tree = check_dir(dirs["/" + d], names, [n for n in absent if n not in names])
        assert tree.root.hash_version == sb.def_hash_version
    if bs == 1024:
        assert htree.walk(dirs["/big"].read_block, **dirs["/big"].geometry()).root.indirect_levels == 1


def test_signedness_is_used(workdir: str, tree_names: dict[str, list[bytes]]) -> None:
    """Looked up with the wrong signedness, names with high-bit bytes go missing."""
    img = os.path.join(workdir, "unsigned.img")
    shutil.copyfile(base_image(workdir, 1024, True), img)
    debugfs(img, "ssv flags 2", write=True)
    e2fsck(img, "-fyD")
    d = load_dirs(img, ["/big"])["/big"]
    d.sb.s_flags = 1
    lost = [n for n in tree_names["big"] if not any(n in d.names_in(b) for b in d.candidates(n))]
    assert len(lost) > len(tree_names["big"]) // 2
    assert all(any(c >= 0x80 for c in n) for n in lost)
    os.unlink(img)


# -- directories Linux indexed -----------------------------------------------------------------
LINUX_VARIANTS = {
    "half_md4-signed-csum": ("half_md4", 1, True),
    "tea-unsigned": ("tea", 2, False),
    "legacy-unsigned-csum": ("legacy", 2, True),
}


def fill_on_linux(img: str, names: list[bytes], dirname: bytes = b"d") -> None:
    with mounted(img, options="rw") as mnt:
        top = os.path.join(os.fsencode(mnt), dirname)
        os.mkdir(top)
        for n in names:
            os.close(os.open(os.path.join(top, n), os.O_CREAT | os.O_WRONLY, 0o644))
    rc, out = e2fsck(img, "-fn")
    assert rc == 0 and not fsck_problems(out), out


@pytest.mark.root
@pytest.mark.parametrize("variant", list(LINUX_VARIANTS))
def test_linux_indexed(workdir: str, variant: str) -> None:
    alg, flags, csum = LINUX_VARIANTS[variant]
    img = os.path.join(workdir, f"linux-{variant}.img")
    mkfs(img, "16M", bs=1024, fstype="ext4", extra=() if csum else ("-O", "^metadata_csum"))
    debugfs(img, f"ssv def_hash_version {alg}", f"ssv flags {flags}", write=True)
    names = random_names(random.Random(variant), 3000, max_len=100)
    try:
        fill_on_linux(img, names)
        sb = Super.read(img)
        check_super_against_dumpe2fs(img, sb)
        d = load_dirs(img, ["/d"])["/d"]
        absent = set(random_names(random.Random(1), 30)) - set(names)
        tree = check_dir(d, names, sorted(absent))
        assert HASH_NAMES[tree.root.hash_version] == alg
        assert tree.root.indirect_levels == 1
    finally:
        os.unlink(img)


@pytest.mark.root
@pytest.mark.slow
def test_linux_large_dir_three_levels(workdir: str) -> None:
    """100,000 long names in 1 KiB blocks with large_dir: Linux grows the index to 3 levels."""
    img = os.path.join(workdir, "largedir.img")
    mkfs(img, "200M", bs=1024, fstype="ext4", extra=("-O", "large_dir", "-N", "110000"))
    names = [b"%06d_" % i + b"n" * 120 for i in range(100_000)]
    try:
        fill_on_linux(img, names)
        d = load_dirs(img, ["/d"])["/d"]
        assert d.sb.large_dir
        tree = check_dir(d, names, [b"%06d_" % i + b"m" * 120 for i in range(100)])
        assert tree.root.indirect_levels == 2
        # without large_dir the same tree is too deep
        with pytest.raises(CorruptImageError, match="indirect levels"):
            htree.walk(d.read_block, **{**d.geometry(), "large_dir": False})
        t0 = time.perf_counter()
        for n in names[:2000]:
            next(iter(htree.candidate_blocks(d.read_block, n, hash_seed=d.sb.hash_seed, s_flags=d.sb.s_flags,
                                             **d.geometry())))
        print(f"3-level lookup: {(time.perf_counter() - t0) / 2000 * 1e6:.1f} us")
    finally:
        os.unlink(img)


# -- checksums -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def csum_dir(workdir: str, tree_names: dict[str, list[bytes]]) -> Dir:
    """/big of a 1K metadata_csum image, e2fsck -D indexed: a root and interior nodes."""
    img = os.path.join(workdir, "csum.img")
    shutil.copyfile(base_image(workdir, 1024, True), img)
    e2fsck(img, "-fyD")
    d = load_dirs(img, ["/big"])["/big"]
    os.unlink(img)
    assert d.sb.metadata_csum
    return d


def flipped(d: Dir, lblk: int, off: int, xor: int = 0x01):
    blocks = list(d.blocks)
    buf = bytearray(blocks[lblk])
    buf[off] ^= xor
    blocks[lblk] = bytes(buf)
    return blocks.__getitem__


def test_checksums_verify_and_flips_are_caught(csum_dir: Dir, tree_names: dict[str, list[bytes]]) -> None:
    d = csum_dir
    bs = d.sb.bs
    tree = htree.walk(d.read_block, **d.geometry())
    node = sorted(tree.index - {0})[0]
    name = tree_names["big"][0]
    root = htree.parse_root(d.blocks[0], bs=bs, metadata_csum=True)
    htree.verify_dx_csum(d.blocks[0], root, d.csum_seed)
    # where the checksum reaches: the used entries, the tail; not the unused slots
    root_tail = 32 + 8 * htree.root_limit(bs, True)
    node_tail = 8 + 8 * htree.node_limit(bs, True)
    count = struct.unpack_from("<H", d.blocks[node], 10)[0]
    for lblk, off in [(0, 36), (0, 32 + 8 * root.count - 1), (0, root_tail), (0, root_tail + 5),
                      (node, 12), (node, 8 + 8 * count - 3), (node, node_tail + 7)]:
        read = flipped(d, lblk, off)
        with pytest.raises(CorruptImageError, match="checksum"):
            htree.walk(read, **d.geometry())
        # the lookup reads the root and the node on the way to this name's leaf
        if lblk == 0:
            with pytest.raises(CorruptImageError, match="checksum"):
                d.candidates(name, read)
        # without verification only structural damage shows
        try:
            htree.walk(read, **d.geometry(verify=False))
        except CorruptImageError as err:
            assert "checksum" not in str(err)
    if count < htree.node_limit(bs, True):
        read = flipped(d, node, 8 + 8 * count + 2)         # an unused entry slot
        htree.walk(read, **d.geometry())
    # a seed of another inode fails at once
    with pytest.raises(CorruptImageError, match=r"htree root: checksum .*directory block 0"):
        htree.walk(d.read_block, **{**d.geometry(), "csum_seed": d.csum_seed ^ 1})


# -- synthetic indexes: continuation and every corruption ----------------------------------------
BS = 1024


def root_block(entries: list[tuple[int, int]], *, levels: int = 0, version: int = 1, csum: bool = False,
               info_length: int = 8, limit: int | None = None, count: int | None = None,
               reserved: int = 0, flags: int = 0) -> bytearray:
    """An htree root: '.', '..', dx_root_info, ``entries`` [(hash, block)]; the first hash is unused."""
    buf = bytearray(BS)
    struct.pack_into("<IHBB1s", buf, 0, 2, 12, 1, 2, b".")
    struct.pack_into("<IHBB2s", buf, 12, 2, BS - 12, 2, 2, b"..")
    struct.pack_into("<IBBBB", buf, 24, reserved, version, info_length, levels, flags)
    lim = (BS - 32) // 8 - csum if limit is None else limit
    struct.pack_into("<HHI", buf, 32, lim, len(entries) if count is None else count, entries[0][1])
    for i, (h, b) in enumerate(entries[1:], 1):
        struct.pack_into("<II", buf, 32 + 8 * i, h, b)
    return buf


def node_block(entries: list[tuple[int, int]], *, csum: bool = False, limit: int | None = None,
               count: int | None = None, rec_len: int = BS) -> bytearray:
    buf = bytearray(BS)
    struct.pack_into("<IHBB", buf, 0, 0, rec_len, 0, 0)
    lim = (BS - 8) // 8 - csum if limit is None else limit
    struct.pack_into("<HHI", buf, 8, lim, len(entries) if count is None else count, entries[0][1])
    for i, (h, b) in enumerate(entries[1:], 1):
        struct.pack_into("<II", buf, 8 + 8 * i, h, b)
    return buf


def reader(blocks: dict[int, bytes | bytearray], nblocks: int):
    def read(lblk: int) -> bytes:
        assert 0 <= lblk < nblocks, lblk                # the module bounds pointers before reading
        return bytes(blocks.get(lblk, bytes(BS)))
    return read


def leaves(blocks: dict[int, bytearray], h: int, nblocks: int = 20, **kw) -> list[int]:
    return list(htree.leaves_for_hash(reader(blocks, nblocks), h, bs=BS, nblocks=nblocks, **kw))


H = 0x80000000


def test_collision_continuation_one_level() -> None:
    blocks = {0: root_block([(0, 1), (H, 2), (H | 1, 3), (H + 2, 4)])}
    assert leaves(blocks, H) == [2, 3]
    assert leaves(blocks, H - 2) == [1]
    assert leaves(blocks, H + 2) == [4]
    assert leaves(blocks, 0xFFFFFFFC) == [4]
    assert leaves(blocks, 0) == [1]


def test_collision_continuation_across_nodes() -> None:
    """The continued hash is the first of the next node: the walk climbs to the root and back down."""
    blocks = {
        0: root_block([(0, 10), (H | 1, 11), (H + 8, 12)], levels=1),
        10: node_block([(0, 1), (0x100, 2), (H, 3)]),
        11: node_block([(0, 4), (H + 4, 5)]),
        12: node_block([(0, 6)]),
    }
    assert leaves(blocks, H) == [3, 4]
    assert leaves(blocks, H + 4) == [5]
    assert leaves(blocks, 0x100) == [2]
    assert leaves(blocks, H + 8) == [6]
    # lazily: a caller that stops after the first leaf never reads node 11
    read = reader({0: blocks[0], 10: blocks[10]}, 20)
    assert next(iter(htree.leaves_for_hash(read, H, bs=BS, nblocks=20))) == 3
    tree = htree.walk(reader(blocks, 20), bs=BS, nblocks=20)
    assert tree.index == {0, 10, 11, 12}
    assert tree.leaves == (1, 2, 3, 4, 5, 6)
    assert tree.ranges[2] == (H, H | 1)


def test_depth_limits() -> None:
    """indirect_levels: 1 at most, 2 with large_dir; three index levels walk fine."""
    blocks = {0: root_block([(0, 1)], levels=2), 1: node_block([(0, 2)]), 2: node_block([(0, 3)])}
    with pytest.raises(CorruptImageError, match="indirect levels"):
        leaves(blocks, 5)
    assert leaves(blocks, 5, large_dir=True) == [3]
    blocks = {0: root_block([(0, 1)], levels=3), 1: node_block([(0, 2)]), 2: node_block([(0, 3)]),
              3: node_block([(0, 4)])}
    with pytest.raises(CorruptImageError, match="indirect levels"):
        leaves(blocks, 5, large_dir=True)


def test_metadata_csum_limits() -> None:
    blocks = {0: root_block([(0, 1), (H, 2)], csum=True)}
    assert leaves(blocks, H, metadata_csum=True) == [2]
    with pytest.raises(CorruptImageError, match="limit 123, should be 124"):
        leaves(blocks, H)
    blocks = {0: root_block([(0, 1)], levels=1), 1: node_block([(0, 2)], csum=True)}
    with pytest.raises(CorruptImageError, match=r"node: limit 126, should be 127 \(directory block 1\)"):
        leaves(blocks, H)


CORRUPT = {
    # id: (blocks, regex the message must match)
    "root limit": ({0: root_block([(0, 1)], limit=100)}, "htree root: limit 100"),
    "root count 0": ({0: root_block([(0, 1)], count=0)}, "count 0"),
    "root count > limit": ({0: root_block([(0, 1)], count=125)}, "count 125 outside"),
    "node limit": ({0: root_block([(0, 1)], levels=1), 1: node_block([(0, 2)], limit=5)}, "node: limit 5"),
    "node count > limit": ({0: root_block([(0, 1)], levels=1), 1: node_block([(0, 2)], count=128)},
                           "count 128 outside"),
    "depth": ({0: root_block([(0, 1)], levels=2)}, "indirect levels"),
    "hash order root": ({0: root_block([(0, 1), (H, 2), (H - 2, 3)])}, "not in ascending order"),
    "hash order node": ({0: root_block([(0, 1)], levels=1), 1: node_block([(0, 2), (9, 3), (7, 4)])},
                        "htree node: hashes not in ascending order"),
    "node out of parent range": ({0: root_block([(0, 1), (H + 8, 2)], levels=1),
                                  1: node_block([(0, 3), (H + 12, 4)]), 2: node_block([(0, 5)])},
                                 "outside the range"),
    "info_length": ({0: root_block([(0, 1)], info_length=12)}, "info_length 12"),
    "reserved_zero": ({0: root_block([(0, 1)], reserved=1)}, "reserved_zero"),
    "hash version": ({0: root_block([(0, 1)], version=4)}, "unknown hash version 4"),
    "flags": ({0: root_block([(0, 1)], flags=1)}, "unknown flags"),
    "leaf out of range": ({0: root_block([(0, 1), (H, 25)])}, "block 25, past the directory's 20"),
    "node out of range": ({0: root_block([(0, 99)], levels=1)}, "block 99, past"),
    "leaf is root": ({0: root_block([(0, 1), (H, 0)])}, "block 0"),
    "node points to itself": ({0: root_block([(0, 1)], levels=2), 1: node_block([(0, 1)])},
                              "index cycle, entry points back to block 1"),
    "leaf is the parent node": ({0: root_block([(0, 1)], levels=2), 1: node_block([(0, 2)]),
                                 2: node_block([(0, 2)])}, "leaf entry points back to index block 2"),
    "leaf is the grandparent node": ({0: root_block([(0, 1)], levels=2), 1: node_block([(0, 2)]),
                                      2: node_block([(0, 1)])}, "leaf entry points back to index block 1"),
    "leaf is an ancestor": ({0: root_block([(0, 1)], levels=1), 1: node_block([(0, 1)])}, "index block 1"),
    "node not spanning": ({0: root_block([(0, 1)], levels=1), 1: node_block([(0, 2)], rec_len=12)},
                          "not an empty entry spanning"),
    "hole as node": ({0: root_block([(0, 1)], levels=1)}, "htree node"),
    "root without ..": ({0: root_block([(0, 1)])[:12] + bytes(BS - 12)}, "'\\.\\.'"),
}


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corruption(case: str) -> None:
    blocks, message = CORRUPT[case]
    large = case.startswith(("node points", "leaf is the"))
    with pytest.raises(CorruptImageError, match=message) as err:
        leaves(blocks, H + 6, large_dir=large)
    assert err.value.where and "directory block" in err.value.where
    with pytest.raises(CorruptImageError):
        htree.walk(reader(blocks, 20), bs=BS, nblocks=20, large_dir=large)


def test_walk_finds_shared_blocks() -> None:
    """A block referenced twice (a lookup alone cannot see it) is caught by the full walk."""
    blocks = {0: root_block([(0, 1), (H, 2)], levels=1), 1: node_block([(0, 3)]), 2: node_block([(0, 3)])}
    assert leaves(blocks, H) == [3]
    with pytest.raises(CorruptImageError, match="block 3 referenced twice"):
        htree.walk(reader(blocks, 20), bs=BS, nblocks=20)


def test_short_block_and_masked_pointers() -> None:
    with pytest.raises(CorruptImageError, match="not 1024"):
        htree.parse_root(bytes(100), bs=BS)
    # the high 4 bits of a block pointer are reserved (Linux masks them)
    blocks = {0: root_block([(0, 0x10000001), (H, 0xF0000002)])}
    assert leaves(blocks, H) == [2]
    assert leaves(blocks, 4) == [1]


def test_is_index_block() -> None:
    assert htree.is_index_block(root_block([(0, 1)]), 0, BS)
    assert htree.is_index_block(node_block([(0, 1)]), 3, BS)
    leaf = bytearray(BS)
    struct.pack_into("<IHBB4s", leaf, 0, 12, BS - 12, 4, 1, b"name")
    assert not htree.is_index_block(leaf, 3, BS)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_fuzzed_index_blocks(csum_dir: Dir, tree_names: dict[str, list[bytes]], data: st.DataObject) -> None:
    """Random damage to index blocks: a lookup ends with leaves in range or CorruptImageError."""
    d = csum_dir
    index = sorted(htree.walk(d.read_block, **d.geometry()).index)
    blocks = list(d.blocks)
    for _ in range(data.draw(st.integers(1, 4))):
        lblk = data.draw(st.sampled_from(index))
        buf = bytearray(blocks[lblk])
        off = data.draw(st.integers(0, 63) | st.integers(0, len(buf) - 1))
        buf[off] ^= data.draw(st.integers(1, 255))
        blocks[lblk] = bytes(buf)
    verify = data.draw(st.booleans())
    name = data.draw(st.sampled_from(tree_names["big"]))
    try:
        got = d.candidates(name, blocks.__getitem__, verify=verify)
        assert got and all(0 < b < len(blocks) for b in got)
    except CorruptImageError:
        pass
    with contextlib.suppress(CorruptImageError):
        htree.walk(blocks.__getitem__, **d.geometry(verify))


def test_lookup_speed(csum_dir: Dir, tree_names: dict[str, list[bytes]]) -> None:
    """A two-level lookup (root, node, hash; checksums verified) takes well under a millisecond."""
    d = csum_dir
    geo = d.geometry()
    names = tree_names["big"][:500]
    t0 = time.perf_counter()
    for n in names:
        next(iter(htree.candidate_blocks(d.read_block, n, hash_seed=d.sb.hash_seed, s_flags=d.sb.s_flags,
                                         **geo)))
    per = (time.perf_counter() - t0) / len(names)
    print(f"2-level lookup with checksums: {per * 1e6:.1f} us")
    assert per < 1e-3
