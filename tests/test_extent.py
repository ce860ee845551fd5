"""The ext4 extent tree, read side (``extfs.extent``), against e2fsprogs and Linux.

Images come from ``mke2fs -t ext4 -d`` (with ``debugfs -w`` to fragment free space) and from
Linux itself on a loop mount (interleaved appenders, fallocate, a 1 GiB sparse file). The
expected answer is ``debugfs ex`` (every leaf extent, every tree block) and the file's bytes
(``debugfs cat``, or read through the mount). :class:`ExtentMap` is driven through a small
stand-in inode whose volume maps the real image (``MemoryDevice``): nothing of the format is
mocked.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import pytest
from e2fs import SHM, debugfs_cat, debugfs_r, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xipfs import CorruptImageError, MemoryDevice
from xipfs.extfs.csum import crc32c_raw, inode_seed
from xipfs.extfs.extent import (
    EXT_MAGIC,
    Extent,
    ExtentMap,
    extent_block_csum,
    extent_runs,
    extents_to_runs,
    walk_extents,
)

IS_ROOT = os.geteuid() == 0


# -- reading an image without the rest of xipfs -------------------------------------------------
@dataclass
class Super:
    bs: int
    blocks_count: int
    first_data_block: int
    fs_seed: int | None             # S of §7, None without metadata_csum


def read_super(img: str) -> Super:
    with open(img, "rb") as f:
        sb = f.read(2048)[1024:]
    lo, first, log = struct.unpack_from("<I4xII", sb, 4)[0], *struct.unpack_from("<II", sb, 20)
    incompat, ro_compat = struct.unpack_from("<II", sb, 0x60)
    hi = struct.unpack_from("<I", sb, 0x150)[0] if incompat & 0x80 else 0
    seed = None
    if ro_compat & 0x400:                                     # metadata_csum
        seed = (struct.unpack_from("<I", sb, 0x270)[0] if incompat & 0x2000
                else crc32c_raw(0xFFFFFFFF, sb[0x68:0x78]))
    return Super(1024 << log, lo | hi << 32, first, seed)


@dataclass
class Node:
    """The stand-in inode: what ExtentMap reads of an inode."""

    volume: Vol
    ino: int
    size: int
    i_block: bytes
    generation: int
    flags: int


@dataclass
class Vol:
    """The stand-in volume: the real image mapped by MemoryDevice, and its geometry."""

    device: MemoryDevice
    bs: int
    blocks_count: int
    first_data_block: int
    csum_seed: int | None = None
    checked: list = field(default_factory=list)

    def check_data_run(self, pblk: int, count: int, ino: int, what: str = "data block") -> None:
        self.checked.append((what, pblk, count))
        if pblk <= self.first_data_block or pblk + count > self.blocks_count:
            raise CorruptImageError(f"{what} {pblk} outside the device", f"inode {ino}")

    def read_block(self, blk: int) -> memoryview:
        return self.device.view(blk * self.bs, self.bs)


def open_vol(img: str, *, verify: bool = True) -> Vol:
    sb = read_super(img)
    return Vol(MemoryDevice.from_path(img, readonly=True), sb.bs, sb.blocks_count, sb.first_data_block,
               sb.fs_seed if verify else None)


def inode_of(vol: Vol, img: str, path: str) -> Node:
    """The inode of ``path``, found by ``debugfs imap`` and decoded from the image bytes."""
    out = debugfs_r(img, f'imap "{path}"').decode()
    m = re.search(r"Inode (\d+) .*\n\s*located at block (\d+), offset 0x([0-9a-f]+)", out)
    assert m, out
    raw = bytes(vol.device.view(int(m[2]) * vol.bs + int(m[3], 16), 128))
    size = struct.unpack_from("<I", raw, 4)[0] | struct.unpack_from("<I", raw, 0x6C)[0] << 32
    flags = struct.unpack_from("<I", raw, 0x20)[0]
    return Node(vol, int(m[1]), size, raw[0x28:0x64], struct.unpack_from("<I", raw, 0x64)[0], flags)


_EX_LINE = re.compile(r"^\s*(\d+)/\s*(\d+)\s+\d+/\s*\d+\s+(\d+)\s+-\s+(\d+)\s+"
                      r"(\d+)(?:\s+-\s+(\d+))?\s+(\d+)\s*(.*)$")


def debugfs_extents(img: str, path: str) -> tuple[int, list[Extent], set[int]]:
    """``debugfs ex``: (depth, leaf extents, tree blocks)."""
    out = debugfs_r(img, f'ex "{path}"').decode()
    depth, leaves, nodes = 0, [], set()
    for line in out.splitlines()[1:]:
        m = _EX_LINE.match(line)
        assert m, line
        level, depth = int(m[1]), int(m[2])
        lo, hi, phys, length = int(m[3]), int(m[4]), int(m[5]), int(m[7])
        if level < depth:
            nodes.add(phys)
        else:
            assert hi - lo + 1 == length
            leaves.append(Extent(lo, length, phys, "Uninit" in m[8]))
    return depth, leaves, nodes


def read_via_runs(m: ExtentMap, vol: Vol, size: int) -> bytes:
    """The file's bytes as a reader would get them: one copy per run, zeros for holes."""
    bs = vol.bs
    parts = []
    for _lblk, count, pblk in m.runs(0, m.nblocks):
        parts.append(bytes(vol.device.view(pblk * bs, count * bs)) if pblk else bytes(count * bs))
    return b"".join(parts)[:size]


def digest_via_runs(m: ExtentMap, vol: Vol, size: int) -> str:
    """sha256 of the file through the runs without holding it (for the 1 GiB sparse file)."""
    h = hashlib.sha256()
    bs = vol.bs
    left = size
    zero = bytes(1 << 20)
    for _lblk, count, pblk in m.runs(0, m.nblocks):
        n = min(count * bs, left)
        if pblk:
            h.update(vol.device.view(pblk * bs, n))
        else:
            while n:
                k = min(n, len(zero))
                h.update(zero[:k])
                n -= k
                left -= k
            continue
        left -= n
    return h.hexdigest()


def check_runs_consistent(m: ExtentMap, seed: int) -> None:
    """runs() of random ranges agrees with a block-by-block answer from the extents."""
    n = m.nblocks
    truth = {}
    for e in m.extents:
        for k in range(min(e.count, max(0, n - e.lblk))):
            truth[e.lblk + k] = 0 if e.unwritten else e.pblk + k
    rng = random.Random(seed)
    probes = [(0, n), (0, 1), (max(0, n - 1), n + 5)]
    probes += [tuple(sorted((rng.randrange(n + 2), rng.randrange(n + 2)))) for _ in range(40)] if n else []
    for first, last in probes:
        runs = m.runs(first, last)
        pos = first
        for lblk, count, pblk in runs:
            assert lblk == pos and count > 0
            for k in range(count):
                assert truth.get(lblk + k, 0) == (pblk + k if pblk else 0)
            pos += count
        assert pos == max(first, min(last, n)) or (first >= min(last, n) and runs == [])
    for lblk in rng.sample(range(n), min(n, 50)):
        assert m.bmap(lblk) == truth.get(lblk, 0)
    assert m.bmap(n) == 0 and m.bmap(-1) == 0


def check_against_debugfs(img: str, vol: Vol, path: str, content: bytes | None = None) -> ExtentMap:
    node = inode_of(vol, img, path)
    assert node.flags & 0x80000, f"{path}: not extent-mapped"
    m = ExtentMap(node)
    depth, leaves, nodes = debugfs_extents(img, path)
    assert m.depth == depth, path
    assert m.extents == leaves, path
    assert set(m.tree_blocks) == nodes and len(m.tree_blocks) == len(nodes), path
    data = read_via_runs(m, vol, node.size)
    assert data == (debugfs_cat(img, path) if content is None else content), path
    whole_run = [r for r in m.runs(0, m.nblocks)]
    assert m.whole == (whole_run[0][2] if len(whole_run) == 1 else 0)
    check_runs_consistent(m, node.ino)
    return m


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="xipfs-extent-", dir=SHM)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# -- images from mke2fs -d ----------------------------------------------------------------------
def _sparse(path: str, islands: int, bs: int, gap: int, tail: int | None = None) -> None:
    rng = random.Random(islands)
    with open(path, "wb") as f:
        for k in range(islands):
            f.seek((1 + k * gap) * bs)
            f.write(rng.randbytes(bs))
        if tail:
            f.truncate(tail)


@pytest.fixture(scope="module", params=[1024, 4096], ids=["1k", "4k"])
def mkfs_image(request, workdir):
    bs = request.param
    src = os.path.join(workdir, f"src{bs}")
    os.makedirs(src)
    rng = random.Random(bs)
    files = {"empty": b"", "byte": b"x", "one_block": rng.randbytes(bs), "small": rng.randbytes(3 * bs + 5),
             "zeros_inside": rng.randbytes(bs) + bytes(3 * bs) + rng.randbytes(100),
             "contig": rng.randbytes(40 * bs + 1)}
    for name, data in files.items():
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    _sparse(os.path.join(src, "sparse400"), 400, bs, 3)                # depth 2 on 1K blocks
    _sparse(os.path.join(src, "sparse10"), 10, bs, 50, tail=5 << 20)   # depth 1, hole at the end
    _sparse(os.path.join(src, "sparse3"), 3, bs, 7)                    # depth 0, holes between
    for i in range(60):
        with open(os.path.join(src, f"s{i:02d}"), "wb") as f:
            f.write(rng.randbytes(3 * bs))
    img = os.path.join(workdir, f"mkfs{bs}.img")
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(bs), "-d", src, img, "16M"])
    # fragment the free space, then write a file into the gaps (debugfs allocates first-fit)
    frag = os.path.join(workdir, f"frag{bs}")
    with open(frag, "wb") as f:
        f.write(rng.randbytes(100 * bs))
    cmds = "".join(f"rm /s{i:02d}\n" for i in range(0, 60, 2)) + f"write {frag} /frag\n"
    subprocess.run(["debugfs", "-w", "-f", "-", img], input=cmds.encode(), capture_output=True, check=True)
    run(["e2fsck", "-fn", img])
    return img, bs, files


@pytest.mark.parametrize("path", ["empty", "byte", "one_block", "small", "zeros_inside", "contig",
                                  "sparse400", "sparse10", "sparse3", "frag", "s01"])
def test_mkfs_files_match_debugfs(mkfs_image, path):
    img, bs, files = mkfs_image
    vol = open_vol(img)
    m = check_against_debugfs(img, vol, "/" + path, files.get(path))
    if path == "empty":
        assert m.extents == [] and m.nblocks == 0 and m.runs(0, 10) == [] and m.whole == 0
    if path in ("one_block", "small", "contig", "s01"):
        assert m.depth == 0 and m.whole and m.tree_blocks == []
    if path == "sparse400":
        assert m.depth == (2 if bs == 1024 else 1)
    if path == "sparse10":
        assert m.depth == 1 and m.runs(m.nblocks - 1, m.nblocks)[0][2] == 0
    if path == "frag":
        assert len(m.extents) > 4 and m.whole == 0
    if path == "zeros_inside":          # mke2fs -d skips all-zero blocks: holes in a plain file
        assert [r[2] == 0 for r in m.runs(0, m.nblocks)] == [False, True, False]


def test_mkfs_every_extent_block_checksum(mkfs_image):
    """metadata_csum (mke2fs 1.47's default): every extent block's tail checks out, and one
    flipped byte anywhere in the covered range is refused."""
    img, bs, _ = mkfs_image
    vol = open_vol(img)
    assert vol.csum_seed is not None, "mke2fs default without metadata_csum?"
    for path in ("/sparse400", "/sparse10", "/frag"):
        node = inode_of(vol, img, path)
        seed = inode_seed(vol.csum_seed, node.ino, node.generation)
        m = ExtentMap(node)
        assert m.tree_blocks
        for blk in m.tree_blocks:
            b = vol.read_block(blk)
            emax = struct.unpack_from("<H", b, 4)[0]
            assert struct.unpack_from("<I", b, 12 + 12 * emax)[0] == extent_block_csum(seed, b)
        with open(img, "rb") as f:
            image = bytearray(f.read())
        blk = m.tree_blocks[-1]
        emax = struct.unpack_from("<H", image, blk * bs + 4)[0]
        for off in (8, random.Random(blk).randrange(12, 12 + 12 * emax)):   # eh_generation, an entry
            image[blk * bs + off] ^= 0x10
            with pytest.raises(CorruptImageError, match=f"extent block {blk} .*checksum"):
                walk_extents(node.i_block, _reader(image, bs), nblocks_device=vol.blocks_count,
                             first_data_block=vol.first_data_block, csum_seed=seed, where=f"inode {node.ino}")
            image[blk * bs + off] ^= 0x10


def _reader(image: bytearray | bytes, bs: int):
    mv = memoryview(image)
    return lambda blk: mv[blk * bs:(blk + 1) * bs]


def test_csum_seed_from_superblock(mkfs_image, workdir):
    """metadata_csum_seed: S comes from s_checksum_seed, so a new UUID leaves extent blocks valid."""
    img, bs, _ = mkfs_image
    img2 = os.path.join(workdir, f"seed{bs}.img")
    shutil.copy(img, img2)
    run(["tune2fs", "-O", "metadata_csum_seed", img2])
    run(["tune2fs", "-U", "random", img2])
    vol = open_vol(img2)
    node = inode_of(vol, img2, "/sparse400")
    m = ExtentMap(node)                                 # verified with s_checksum_seed
    assert m.tree_blocks
    with open(img2, "rb") as f:
        uuid = f.read(2048)[1024 + 0x68:1024 + 0x78]
    with pytest.raises(CorruptImageError, match="checksum"):
        ExtentMap(node, csum_seed=crc32c_raw(0xFFFFFFFF, uuid))


# -- images written by Linux -----------------------------------------------------------------------
@dataclass
class LinuxImage:
    img: str
    digests: dict[str, tuple[int, str]]      # path -> (size, sha256) read through the mount
    deep: list[str]


def _digest(path: str) -> tuple[int, str]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return os.path.getsize(path), h.hexdigest()


N_APPENDERS = 6
ROUNDS = 700


@pytest.fixture(scope="module")
def linux_image(workdir):
    if not IS_ROOT:
        pytest.skip("loop-mounting an image needs root")
    img = os.path.join(workdir, "linux.img")
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", img, "64M"])
    proc = subprocess.run(["mount", "-o", "loop,nodelalloc", img, mnt], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot loop-mount ext4: {proc.stderr.decode().strip()}")
    digests = {}
    try:
        # mballoc keeps a growing file contiguous (per-inode preallocation); with a huge
        # mb_stream_req every request takes the shared group preallocation, so interleaved
        # appenders really interleave (else the sparse file below still makes depth 2)
        source = run(["findmnt", "-no", "SOURCE", mnt]).stdout.decode().strip()
        dev = os.path.basename(os.path.realpath(source))
        knob = f"/sys/fs/ext4/{dev}/mb_stream_req"
        if os.path.exists(knob):
            with open(knob, "w") as f:
                f.write("1000000")
        names = [f"/app{i}" for i in range(N_APPENDERS)]
        fds = [os.open(mnt + n, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for n in names]
        rng = random.Random(1)
        buf = rng.randbytes(4096 * 4)
        try:
            for k in range(ROUNDS):
                for i, fd in enumerate(fds):
                    os.write(fd, buf[(k + i) % 4 * 4096:][:4096])
        finally:
            for fd in fds:
                os.close(fd)
        # every other block: one extent per block whatever the allocator does
        with open(mnt + "/alternate", "wb") as f:
            for k in range(1200):
                f.seek(2 * k * 1024)
                f.write(rng.randbytes(1024))
        # fallocate, then writes into part of it: unwritten extents split around written ones
        fd = os.open(mnt + "/falloc", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.posix_fallocate(fd, 0, 1 << 20)
            os.pwrite(fd, rng.randbytes(3000), 0)
            os.pwrite(fd, rng.randbytes(10 << 10), 100 << 10)
            os.pwrite(fd, rng.randbytes(5), (1 << 20) - 5)
        finally:
            os.close(fd)
        with open(mnt + "/keepsize", "wb") as f:          # unwritten blocks past EOF
            f.write(rng.randbytes(5000))
        run(["fallocate", "-n", "-o", "8192", "-l", "65536", mnt + "/keepsize"])
        run(["fallocate", "-l", "200k", mnt + "/allunwritten"])
        # ~1 GiB, sparse: a few extents far apart
        with open(mnt + "/huge", "wb") as f:
            f.truncate(1 << 30)
            for off in (0, 123 << 20, 512 << 20, (1 << 30) - 4096 - 7):
                f.seek(off)
                f.write(rng.randbytes(4096))
        with open(mnt + "/contig", "wb") as f:
            f.write(rng.randbytes(3 << 20))
        os.sync()
        for name in [*names, "/alternate", "/falloc", "/keepsize", "/allunwritten", "/huge", "/contig"]:
            digests[name] = _digest(mnt + name)
    finally:
        run(["umount", mnt])
    run(["e2fsck", "-fn", img])
    return LinuxImage(img, digests, names)


def test_linux_trees_match_debugfs(linux_image):
    img = linux_image.img
    vol = open_vol(img)
    depths = {}
    for path, (size, digest) in linux_image.digests.items():
        node = inode_of(vol, img, path)
        assert node.size == size
        if path == "/huge":
            m = ExtentMap(node)
            assert (m.depth, m.extents) == debugfs_extents(img, path)[:2]
            assert digest_via_runs(m, vol, size) == digest
            assert len(m.runs(0, m.nblocks)) <= 16
            check_runs_consistent(m, 7)
        else:
            m = check_against_debugfs(img, vol, path)
            assert hashlib.sha256(read_via_runs(m, vol, size)).hexdigest() == digest
        depths[path] = m.depth
    assert max(depths.values()) == 2, depths
    assert depths["/alternate"] == 2


def test_linux_unwritten_extents_read_as_zeros(linux_image):
    img = linux_image.img
    vol = open_vol(img)
    for path in ("/falloc", "/keepsize", "/allunwritten"):
        node = inode_of(vol, img, path)
        m = ExtentMap(node)
        assert m.unwritten, path
        for e in m.unwritten:
            for k in range(e.count):
                assert m.bmap(e.lblk + k) == 0
    node = inode_of(vol, img, "/allunwritten")
    m = ExtentMap(node)
    assert all(e.unwritten for e in m.extents) and m.whole == 0
    assert m.runs(0, m.nblocks) == [(0, m.nblocks, 0)]
    keep = ExtentMap(inode_of(vol, img, "/keepsize"))
    assert keep.extents[-1].lblk + keep.extents[-1].count > keep.nblocks   # past EOF
    assert keep.runs(0, 10 ** 6) == keep.runs(0, keep.nblocks)            # clipped to EOF
    past = keep.runs(keep.nblocks, keep.nblocks + 80, keep.nblocks + 80)
    assert past and all(p == 0 for _, _, p in past)
    falloc = ExtentMap(inode_of(vol, img, "/falloc"))
    kinds = [e.unwritten for e in falloc.extents]
    assert True in kinds and False in kinds


def test_linux_depth2_checksums(linux_image):
    """Linux gives inodes random generations: the inode seed must use it."""
    img = linux_image.img
    vol = open_vol(img)
    gens = set()
    for path in linux_image.deep + ["/alternate"]:
        node = inode_of(vol, img, path)
        gens.add(node.generation)
        m = ExtentMap(node)
        seed = inode_seed(vol.csum_seed, node.ino, node.generation)
        for blk in m.tree_blocks:
            b = vol.read_block(blk)
            assert struct.unpack_from("<I", b, 12 + 12 * struct.unpack_from("<H", b, 4)[0])[0] \
                == extent_block_csum(seed, b)
        if m.tree_blocks:
            with pytest.raises(CorruptImageError, match="checksum"):
                ExtentMap(node, csum_seed=vol.csum_seed ^ 1)
    assert gens != {0}


def test_resize_and_writes_refused(linux_image):
    img = linux_image.img
    vol = open_vol(img)
    m = ExtentMap(inode_of(vol, img, "/contig"))
    n = m.nblocks
    before = m.runs(0, n)
    m.resize(n // 2)
    assert m.runs(0, n) == extents_to_runs(m.extents, n // 2)
    m.resize(n)
    assert m.runs(0, n) == before
    m.resize(n + 100)
    assert m.runs(n, n + 100) == [(n, 100, 0)] and m.bmap(n + 5) == 0
    with pytest.raises(OSError) as e:
        m.assign(0, 1, lambda *a: None)
    assert e.value.errno == errno.EROFS
    with pytest.raises(OSError) as e:
        m.truncate(0)
    assert e.value.errno == errno.EROFS


# -- corruption -------------------------------------------------------------------------------------
@dataclass
class Tree:
    """A real depth-2 tree (the root, its depth-1 index blocks, leaves) in a mutable image copy."""

    image: bytearray
    bs: int
    root: bytearray
    blocks_count: int
    first_data_block: int
    seed: int | None
    where: str

    def walk(self, *, csum: bool = False):
        return walk_extents(bytes(self.root), _reader(self.image, self.bs), nblocks_device=self.blocks_count,
                            first_data_block=self.first_data_block, csum_seed=self.seed if csum else None,
                            where=self.where)

    def entry_at(self, blk: int | None, i: int) -> int:
        """Byte offset of entry ``i`` of node ``blk`` (None: the root) in its buffer."""
        return 12 + 12 * i if blk is None else blk * self.bs + 12 + 12 * i

    def buf(self, blk: int | None) -> bytearray:
        return self.root if blk is None else self.image

    def hdr(self, blk: int | None) -> int:
        return 0 if blk is None else blk * self.bs

    def child(self, blk: int | None, i: int) -> int:
        lo, hi = struct.unpack_from("<IH", self.buf(blk), self.entry_at(blk, i) + 4)
        return hi << 32 | lo

    def put(self, blk: int | None, off: int, fmt: str, *vals: int) -> None:
        """Patch a node and keep its checksum right (so the structural check is what fires)."""
        struct.pack_into(fmt, self.buf(blk), off, *vals)
        if blk is not None and self.seed is not None:
            b = memoryview(self.image)[blk * self.bs:(blk + 1) * self.bs]
            emax = struct.unpack_from("<H", b, 4)[0]
            struct.pack_into("<I", b, 12 + 12 * emax, extent_block_csum(self.seed, b))


@pytest.fixture(scope="module")
def depth2(workdir):
    """A file of 400 one-block islands on a 1K-block image: mke2fs -d gives it a depth-2 tree."""
    src = os.path.join(workdir, "src-depth2")
    os.makedirs(src)
    _sparse(os.path.join(src, "sparse400"), 400, 1024, 3)
    img = os.path.join(workdir, "depth2.img")
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", "-d", src, img, "8M"])
    vol = open_vol(img)
    node = inode_of(vol, img, "/sparse400")
    seed = inode_seed(vol.csum_seed, node.ino, node.generation)
    with open(img, "rb") as f:
        image = f.read()
    expect = ExtentMap(node)
    assert expect.depth == 2 and len(expect.tree_blocks) > 3
    return image, 1024, node, vol, seed, expect


@pytest.fixture
def tree(depth2):
    image, bs, node, vol, seed, _ = depth2
    return Tree(bytearray(image), bs, bytearray(node.i_block), vol.blocks_count, vol.first_data_block,
                seed, f"inode {node.ino}")


def test_tree_unchanged_walks(tree, depth2):
    expect = depth2[5]
    assert tree.walk(csum=True).extents == expect.extents
    assert ("extent block", expect.tree_blocks[0], 1) in depth2[3].checked   # ExtentMap asked the volume
    seen = []
    result = walk_extents(bytes(tree.root), _reader(tree.image, tree.bs), nblocks_device=tree.blocks_count,
                          verify=lambda blk, b: seen.append((blk, bytes(b[:2]))))
    assert seen == [(b, b"\x0a\xf3") for b in expect.tree_blocks] and result.blocks == expect.tree_blocks
    runs = extent_runs(bytes(tree.root), _reader(tree.image, tree.bs), nblocks_device=tree.blocks_count)
    assert runs == extents_to_runs(depth2[5].extents)


def _raises(tree: Tree, match: str) -> CorruptImageError:
    with pytest.raises(CorruptImageError, match=match) as e:
        tree.walk(csum=True)
    assert e.value.where == tree.where
    return e.value


def test_corrupt_bad_magic(tree):
    mid = tree.child(None, 0)
    tree.put(mid, tree.hdr(mid), "<H", 0xF30B)
    _raises(tree, f"extent block {mid} .*bad magic")
    tree.root[0] = 0
    _raises(tree, "extent tree root: bad magic")


def test_corrupt_depth(tree):
    struct.pack_into("<H", tree.root, 6, 6)
    _raises(tree, "depth 6 deeper than 5")
    struct.pack_into("<H", tree.root, 6, 3)                 # root says 3, child says 1
    _raises(tree, "depth 1, its parent says 2")
    struct.pack_into("<H", tree.root, 6, 2)
    mid = tree.child(None, 0)
    leaf = tree.child(mid, 0)
    tree.put(leaf, tree.hdr(leaf) + 6, "<H", 1)             # a leaf claiming to be an index
    _raises(tree, f"extent block {leaf} \\(depth 0\\): depth 1, its parent says 0")


def test_corrupt_cycles(tree, depth2):
    mid = tree.child(None, 0)
    tree.put(mid, tree.entry_at(mid, 1) + 4, "<IH", mid & 0xFFFFFFFF, mid >> 32)   # points to itself
    _raises(tree, f"extent block {mid} .*index 1 points to extent block {mid}, already in the tree")
    fresh = Tree(bytearray(depth2[0]), tree.bs, bytearray(depth2[2].i_block), tree.blocks_count,
                 tree.first_data_block, tree.seed, tree.where)
    leaf0 = fresh.child(mid, 0)
    fresh.put(mid, fresh.entry_at(mid, 1) + 4, "<IH", leaf0, 0)                  # two parents, one leaf
    _raises(fresh, f"index 1 points to extent block {leaf0}, already in the tree")


def test_corrupt_shared_leaf_same_range(tree):
    """Two index entries pointing to one leaf are refused even when the ranges would fit."""
    mid = tree.child(None, 0)
    leaf0 = tree.child(mid, 0)
    lblk0 = struct.unpack_from("<I", tree.image, tree.entry_at(mid, 0))[0]
    tree.put(leaf0, tree.hdr(leaf0) + 2, "<H", 1)                  # leaf 0: one 1-block extent
    tree.put(mid, tree.entry_at(mid, 1), "<IIH", lblk0 + 1, leaf0, 0)
    _raises(tree, f"index 1 points to extent block {leaf0}, already in the tree")


def test_corrupt_order_and_overlap(tree):
    mid = tree.child(None, 0)
    leaf = tree.child(mid, 0)
    e1 = bytes(tree.image[tree.entry_at(leaf, 1):tree.entry_at(leaf, 2)])
    e2 = bytes(tree.image[tree.entry_at(leaf, 2):tree.entry_at(leaf, 3)])
    tree.put(leaf, tree.entry_at(leaf, 1), "12s12s", e2, e1)                     # swapped
    _raises(tree, "overlaps or precedes")
    tree.put(leaf, tree.entry_at(leaf, 1), "12s12s", e1, e2)
    lblk1 = struct.unpack_from("<I", e1)[0]
    tree.put(leaf, tree.entry_at(leaf, 1), "<IH", lblk1, 5)                     # runs into extent 2
    _raises(tree, "overlaps or precedes")
    tree.put(leaf, tree.entry_at(leaf, 1), "12s", e1)
    i1 = struct.unpack_from("<I", tree.image, tree.entry_at(mid, 1))[0]
    tree.put(mid, tree.entry_at(mid, 1), "<I", 0)                               # index out of order
    _raises(tree, "not after the one before")
    tree.put(mid, tree.entry_at(mid, 1), "<I", i1)
    last = struct.unpack_from("<H", tree.image, tree.hdr(leaf) + 2)[0] - 1      # leaf past its range
    lb = struct.unpack_from("<I", tree.image, tree.entry_at(leaf, last))[0]
    tree.put(leaf, tree.entry_at(leaf, last) + 4, "<H", i1 - lb + 1)
    _raises(tree, "past its index's range")


def test_corrupt_index_start(tree):
    mid = tree.child(None, 0)
    i1 = struct.unpack_from("<I", tree.image, tree.entry_at(mid, 1))[0]
    tree.put(mid, tree.entry_at(mid, 1), "<I", i1 - 1)
    _raises(tree, "first extent starts at file block")


def test_corrupt_past_device(tree):
    mid = tree.child(None, 0)
    leaf = tree.child(mid, 0)
    tree.put(leaf, tree.entry_at(leaf, 0) + 6, "<HI", 0, tree.blocks_count - 1)   # len 1: last block, valid
    tree.walk(csum=True)
    tree.put(leaf, tree.entry_at(leaf, 0) + 4, "<H", 2)                          # ...then one past the end
    _raises(tree, "outside the device")
    tree.put(leaf, tree.entry_at(leaf, 0) + 4, "<HHI", 1, 1, 5)                  # 48-bit: start_hi
    _raises(tree, "outside the device")
    tree.put(leaf, tree.entry_at(leaf, 0) + 6, "<HI", 0, tree.first_data_block)
    _raises(tree, "outside the device")
    tree.put(mid, tree.entry_at(mid, 2) + 4, "<IH", tree.blocks_count, 0)        # index past the end
    _raises(tree, "outside the device")


def test_corrupt_entries_and_max(tree):
    mid = tree.child(None, 0)
    entries, emax = struct.unpack_from("<HH", tree.image, tree.hdr(mid) + 2)
    tree.put(mid, tree.hdr(mid) + 2, "<H", emax + 1)
    _raises(tree, "more than eh_max")
    tree.put(mid, tree.hdr(mid) + 2, "<H", entries)
    struct.pack_into("<HH", tree.root, 2, 5, 4)
    _raises(tree, "5 entries, more than eh_max 4")
    struct.pack_into("<HH", tree.root, 2, 1, 5)
    _raises(tree, "eh_max 5, expected 4")
    struct.pack_into("<HH", tree.root, 2, 1, 0)
    _raises(tree, "eh_max 0")
    struct.pack_into("<HH", tree.root, 2, 1, 3)                 # e2fsck's tolerance: max-2..max
    tree.walk(csum=True)


def test_corrupt_zero_length(tree):
    mid = tree.child(None, 0)
    leaf = tree.child(mid, 1)
    tree.put(leaf, tree.entry_at(leaf, 3) + 4, "<H", 0)
    _raises(tree, "length 0")
    tree.put(leaf, tree.entry_at(leaf, 3) + 4, "<H", 32768 + 1)                 # unwritten, length 1
    ext = tree.walk(csum=True).extents
    assert sum(e.unwritten for e in ext) == 1


def test_corrupt_tree_block_is_data(tree):
    mid = tree.child(None, 0)
    leaf = tree.child(mid, 0)
    tree.put(leaf, tree.entry_at(leaf, 0) + 6, "<HI", 0, mid)
    _raises(tree, f"extent block {mid} is also a data block")


def test_corrupt_checksum_each_node(tree):
    mid = tree.child(None, 0)
    for blk in (mid, tree.child(mid, 0), tree.child(mid, 2)):
        b = tree.hdr(blk)
        emax = struct.unpack_from("<H", tree.image, b + 4)[0]
        tree.image[b + 12 + 12 * emax] ^= 0x80
        _raises(tree, f"extent block {blk} .*checksum")
        tree.walk()                                     # without a seed: fine
        tree.image[b + 12 + 12 * emax] ^= 0x80


def test_short_or_garbage_root():
    def boom(blk):
        raise AssertionError("read")

    for root in (b"", b"\x0a\xf3", bytes(60), b"\xff" * 60):
        with pytest.raises(CorruptImageError):
            walk_extents(root, boom, nblocks_device=100)
    empty = struct.pack("<HHHHI", EXT_MAGIC, 0, 4, 0, 0) + bytes(48)
    assert walk_extents(empty, boom, nblocks_device=100).extents == []


def test_extent_map_refuses_corrupt_inode(tree, depth2):
    _, _, node, vol, _, _ = depth2
    struct.pack_into("<H", tree.root, 6, 7)
    bad = Node(vol, node.ino, node.size, bytes(tree.root), node.generation, node.flags)
    with pytest.raises(CorruptImageError, match=f"inode {node.ino}"):
        ExtentMap(bad)


def _valid(tree_result, blocks_count: int, first_data: int) -> None:
    pos = 0
    for e in tree_result.extents:
        assert e.count > 0 and e.lblk >= pos and e.lblk + e.count <= 1 << 32
        assert first_data < e.pblk and e.pblk + e.count <= blocks_count
        pos = e.lblk + e.count
    assert len(set(tree_result.blocks)) == len(tree_result.blocks)


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_extent_blocks(depth2, data):
    """Random bytes flipped in the root and the tree's blocks: a CorruptImageError or a valid
    answer, quickly, never another exception."""
    image, bs, node, vol, seed, expect = depth2
    img = bytearray(image)
    root = bytearray(node.i_block)
    nodes = [None, *expect.tree_blocks]
    for _ in range(data.draw(st.integers(1, 6))):
        blk = data.draw(st.sampled_from(nodes))
        if blk is None:
            off = data.draw(st.integers(0, 59))
            root[off] ^= data.draw(st.integers(1, 255))
        else:
            off = data.draw(st.integers(0, min(bs, 12 + 12 * 84 + 4) - 1))
            img[blk * bs + off] ^= data.draw(st.integers(1, 255))
    csum = data.draw(st.booleans())
    t0 = time.perf_counter()
    try:
        result = walk_extents(bytes(root), _reader(img, bs), nblocks_device=vol.blocks_count,
                              first_data_block=vol.first_data_block, csum_seed=seed if csum else None,
                              where="fuzz")
    except CorruptImageError as e:
        assert e.where == "fuzz"
    else:
        _valid(result, vol.blocks_count, vol.first_data_block)
        extents_to_runs(result.extents, 1 << 20)
    assert time.perf_counter() - t0 < 1.0
