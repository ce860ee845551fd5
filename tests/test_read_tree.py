"""Read the generated tree back through xipfs from every image geometry, on both devices.

Each test runs for every block size (1024/2048/4096) x inode size (128/256) and for both the
memory (XIP) device and the file device with its page cache, and compares what xipfs reads with
the source tree, with debugfs, with the image bytes and with the kernel.
"""

from __future__ import annotations

import array
import errno
import hashlib
import io
import mmap
import os
import random
import re
import shutil
import stat
import tempfile

import numpy as np
import pytest
import treegen
from conftest import BLOCK_SIZES, INODE_SIZES, kernel_resolve, mounted, open_image
from e2fs import assert_fsck_clean, debugfs, mkfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xipfs

pytestmark = pytest.mark.timeout(600)

#: Files bigger than this are read whole only once (read_bytes); other readers sample them.
FULL_READ_LIMIT = 8 * 1024 * 1024


@pytest.fixture
def fs(tree_image, xip):
    with open_image(tree_image.path, xip) as f:
        yield f


def regular(tree_image):
    return [(p, n) for p, n in tree_image.tree.items() if n.kind == "reg"]


def source_bytes(node) -> bytes:
    with open(node.src, "rb") as f:
        return f.read()


def join(top: bytes, name: bytes) -> bytes:
    return (top if top != b"/" else b"") + b"/" + name


# -- names and metadata -------------------------------------------------------------------------
def test_fixture_is_sane(tree_image):
    """debugfs sees exactly the source tree (plus lost+found): the image holds what we think."""
    paths = set(tree_image.debugfs.paths)
    assert paths == set(tree_image.tree) | {b"/lost+found"}


def test_listdir_and_scandir(fs, tree_image):
    treegen.check_names(fs, tree_image.tree)


def test_str_names_match_os(fs, tree_image):
    """str paths and names use the filesystem encoding (surrogateescape) exactly like ``os``."""
    for path, node in tree_image.tree.items():
        if node.kind == "dir" and path != b"/":
            want = set(os.listdir(os.fsdecode(node.src)))
            assert set(fs.listdir(os.fsdecode(path))) == want
            for name in want:
                assert fs.lstat(os.fsdecode(path) + "/" + name).st_ino == fs.lstat(
                    path + b"/" + os.fsencode(name)).st_ino


def test_lstat_matches_source(fs, tree_image):
    # (the inline_data image is written by cp -a on a mount, so its ctimes are the copy's)
    inline = tree_image.kind == "ext4-inline"
    treegen.check_lstat(fs, tree_image.tree, tree_image.bs, inline=inline, times=not inline)


def test_hard_links_share_an_inode(fs, tree_image):
    treegen.check_hardlinks(fs, tree_image.tree)
    a = fs.lstat(b"/hard/a")
    assert a.st_nlink == 3
    assert a.st_ino == fs.lstat(b"/hard/other/a3").st_ino == fs.lstat("/hard/a2").st_ino
    assert fs.read_bytes(b"/hard/a") == fs.read_bytes(b"/hard/other/a3")


def test_device_numbers(fs, tree_image):
    want = {"null": (1, 3), "zero-dev": (0, 0), "chr-255": (255, 255), "chr-256": (256, 1),
            "chr-max": (4095, 0xFFFFF), "sda1": (8, 1), "blk-big": (259, 70000)}
    for name, (major, minor) in want.items():
        st_ = fs.lstat("/special/" + name)
        assert (os.major(st_.st_rdev), os.minor(st_.st_rdev)) == (major, minor), name
    assert stat.S_ISBLK(fs.lstat("/special/sda1").st_mode)
    assert stat.S_ISCHR(fs.lstat("/special/null").st_mode)
    assert stat.S_ISFIFO(fs.lstat("/special/fifo").st_mode)
    assert stat.S_ISSOCK(fs.lstat("/special/socket").st_mode)
    assert fs.lstat("/special/fifo").st_rdev == 0


def test_inodes_match_debugfs(fs, tree_image):
    """Inode numbers by name, i_blocks (st_blocks), links, size, mode and owner per debugfs."""
    dbg = tree_image.debugfs
    for path, ino in dbg.paths.items():
        st_ = fs.lstat(path)
        d = dbg.inodes[ino]
        assert st_.st_ino == ino, path
        inline_sectors = (d.size + 511) >> 9 if d.inline and d.type == "regular" else 0
        assert st_.st_blocks == d.blockcount + inline_sectors, path     # (as ext4_file_getattr)
        assert st_.st_nlink == d.links, path
        assert st_.st_size == d.size, path
        assert stat.S_IMODE(st_.st_mode) == d.mode & 0o7777, path
        assert (st_.st_uid, st_.st_gid) == (d.uid, d.gid), path
    for dir_ino, entries in dbg.dirs.items():
        path = next(p for p, i in dbg.paths.items() if i == dir_ino)
        with fs.scandir(path) as it:
            assert sorted((e.name, e.inode()) for e in it) == sorted(entries), path


def test_fast_and_slow_symlinks(fs, tree_image):
    """Targets of every length, and that debugfs agrees which links are fast (< 60 bytes)."""
    treegen.check_symlinks(fs, tree_image.tree)
    dbg = tree_image.debugfs
    for n in (1, 2, 30, 58, 59, 60, 61, 62, 100, 500, 1000, 1023):
        path = f"/links/len{n}".encode()
        target = fs.readlink(path)
        assert len(target) == n
        assert target == tree_image.tree[path].target
        assert dbg.inodes[dbg.paths[path]].fast_link == (n < 60), n
        assert fs.lstat(path).st_size == n
    # a fast symlink whose xattrs sit in a block (i_blocks != 0) is still fast
    assert dbg.inodes[dbg.paths[b"/xattr/symlink"]].fast_link
    assert fs.readlink("/xattr/symlink") == "small"
    assert fs.readlink(b"/links/len-bad-bytes") == b"bad\xff\xfetarget"
    assert fs.readlink("/links/len-bad-bytes") == os.fsdecode(b"bad\xff\xfetarget")


def test_xattrs(fs, tree_image):
    treegen.check_xattrs(fs, tree_image.tree)
    assert fs.getxattr("/xattr/large", "user.large") == b"L" * 700
    assert fs.getxattr("/xattr/large", b"user.large") == b"L" * 700
    assert fs.getxattr("/xattr/acl", "system.posix_acl_access") == treegen.ACL_ACCESS
    assert fs.getxattr("/xattr/acl-dir", "system.posix_acl_default") == treegen.ACL_DEFAULT
    assert len(fs.listxattr("/xattr/spill")) == 20
    # following a symlink gives the target's attributes
    assert fs.listxattr("/xattr/symlink") == fs.listxattr("/xattr/small")
    assert fs.getxattr("/xattr/symlink", "trusted.on-a-symlink", follow_symlinks=False) == b"link value"
    with pytest.raises(OSError) as exc:
        fs.getxattr("/xattr/small", "user.missing")
    assert exc.value.errno == errno.ENODATA
    # every name of a hard link shows the same attributes
    assert fs.getxattr("/hard/other/xattr2", "user.shared") == b"by every link"


def test_xattr_block_is_used_when_the_inode_is_full(tree_image):
    """The fixture really spills: the 'spill' and 'large' files have an xattr block."""
    dbg = tree_image.debugfs
    for path in (b"/xattr/spill", b"/xattr/large"):
        assert dbg.inodes[dbg.paths[path]].file_acl != 0


# -- file data ----------------------------------------------------------------------------------
def test_read_bytes(fs, tree_image):
    for path, node in regular(tree_image):
        data = fs.read_bytes(path)
        assert len(data) == node.size, path
        assert hashlib.sha256(data).hexdigest() == node.sha256, path
    assert fs.read_bytes("/links/rel-file") == fs.read_bytes("/sizes/f1")
    assert fs.read_bytes("/links/abs-file") == fs.read_bytes("/sizes/f1")
    assert fs.read_bytes("/links/messy") == fs.read_bytes("/sizes/f2")


def test_readinto_odd_chunks(fs, tree_image):
    rng = random.Random(7)
    chunks = [1, 2, 3, 7, 511, 1023, 1025, 4093, 4097, 65537, 300_001, 1_048_583]
    for path, node in regular(tree_image):
        if node.size > FULL_READ_LIMIT:
            continue
        want = source_bytes(node)
        got = bytearray()
        with fs.open(path, "rb", buffering=0) as f:
            assert isinstance(f, xipfs.XipFile)
            while True:
                kind = rng.randrange(4)
                n = rng.choice(chunks)
                if kind == 0:
                    buf = bytearray(n)
                    k = f.readinto(buf)
                    got += buf[:k]
                elif kind == 1:                       # a slice of a bigger buffer
                    big = bytearray(n + 10)
                    k = f.readinto(memoryview(big)[5:5 + n])
                    assert big[:5] == bytes(5) and big[5 + n:] == bytes(5)
                    got += big[5:5 + k]
                elif kind == 2:                       # a typed buffer (cast to bytes)
                    arr = array.array("I", bytes(4 * (n // 4 + 1)))
                    k = f.readinto(arr)
                    got += arr.tobytes()[:k]
                else:
                    npa = np.zeros(n, dtype=np.uint8)
                    k = f.readinto(npa)
                    got += npa[:k].tobytes()
                if k == 0:
                    break
                assert f.tell() == len(got)
        assert bytes(got) == want, path


def test_buffered_reader_mirrors_builtin_open(fs, tree_image):
    """The same random mix of read/read1/peek/readline/seek on xipfs and on the source file."""
    rng = random.Random(11)
    for path, node in regular(tree_image):
        if node.size > FULL_READ_LIMIT:
            continue
        with fs.open(path, "rb") as f, open(node.src, "rb") as g:
            assert isinstance(f, io.BufferedReader)
            for _ in range(40):
                op = rng.randrange(6)
                n = rng.choice([0, 1, 5, 4096, 10_000, 70_000])
                if op == 0:
                    assert f.read(n) == g.read(n), path
                elif op == 1:                         # read1: any prefix, one raw read at most
                    got = f.read1(n)
                    assert len(got) <= n and (got or not n or g.peek(1) == b""), path
                    assert got == g.read(len(got)), path
                elif op == 2:
                    off = rng.randrange(0, node.size + 10)
                    assert f.seek(off) == g.seek(off)
                elif op == 3:
                    assert f.readline(n or -1) == g.readline(n or -1), path
                elif op == 4:
                    whence = rng.choice([os.SEEK_CUR, os.SEEK_END])
                    off = rng.randrange(-min(node.size, 5000), 100)
                    if whence == os.SEEK_CUR:
                        off = max(off, -g.tell())
                    assert f.seek(off, whence) == g.seek(off, whence)
                else:
                    assert f.tell() == g.tell()
            assert f.read() == g.read(), path


def test_text_modes(fs, tree_image):
    node = tree_image.tree[b"/sizes/text.txt"]
    with open(node.src, encoding="utf-8") as g:
        want = g.read()
    assert fs.read_text("/sizes/text.txt", encoding="utf-8") == want
    with fs.open("/sizes/text.txt", encoding="utf-8") as f, open(node.src, encoding="utf-8") as g:
        assert f.readlines() == g.readlines()
    with fs.open("/sizes/text.txt", "r", encoding="utf-8", newline="") as f, \
            open(node.src, encoding="utf-8", newline="") as g:
        assert list(f) == list(g)
    with fs.open("/sizes/text.txt", "rt", encoding="latin-1") as f:
        assert f.read() == source_bytes(node).decode("latin-1").replace("\r\n", "\n").replace("\r", "\n")


def test_pread_random_offsets(fs, tree_image):
    rng = random.Random(3)
    for path, node in regular(tree_image):
        fd = os.open(node.src, os.O_RDONLY)
        try:
            with fs.open(path, "rb", buffering=0) as f:
                f.seek(min(node.size, 17))
                pos = f.tell()
                for _ in range(25):
                    off = rng.choice([0, rng.randrange(0, node.size + 1), node.size, node.size + 5,
                                      max(0, node.size - 1)])
                    n = rng.choice([0, 1, 13, 1024, 4096, 50_000, 3_000_000])
                    assert f.pread(n, off) == os.pread(fd, n, off), (path, off, n)
                    assert f.tell() == pos
        finally:
            os.close(fd)


def _hole_edges(tree_image, path: bytes) -> list[int]:
    """File blocks where the image switches between data and hole (per debugfs)."""
    dbg = tree_image.debugfs
    blocks = dbg.inodes[dbg.paths[path]].blocks
    size = tree_image.tree[path].size
    nblocks = -(-size // tree_image.bs)
    return [b for b in range(1, nblocks) if (b in blocks) != (b - 1 in blocks)]


def test_readv_across_holes(fs, tree_image):
    bs = tree_image.bs
    sparse = [p for p, n in regular(tree_image) if p.startswith(b"/sparse/")]
    assert sparse
    for path in sparse:
        node = tree_image.tree[path]
        edges = _hole_edges(tree_image, path)
        if path.startswith(b"/sparse/holes-bs"):
            assert edges, path                          # the fixture really has holes
        fd = os.open(node.src, os.O_RDONLY)
        try:
            with fs.open(path, "rb", buffering=0) as f:
                for edge in edges + [-(-node.size // bs)]:
                    start = max(0, edge * bs - 5)
                    sizes = [3, bs, 7, 2 * bs + 1, 1]
                    bufs = [bytearray(n) for n in sizes]
                    bufs[2] = memoryview(bytearray(7))
                    f.seek(start)
                    n = f.readv(bufs)
                    want = os.pread(fd, sum(sizes), start)
                    assert n == len(want), (path, edge)
                    assert b"".join(bytes(b) for b in bufs)[:n] == want, (path, edge)
                    assert f.tell() == start + n
                    bufs2 = [bytearray(k) for k in reversed(sizes)]
                    want2 = os.pread(fd, sum(sizes), start + 1)
                    n2 = f.preadv(bufs2, start + 1)
                    assert n2 == len(want2) and b"".join(bufs2)[:n2] == want2, (path, edge)
                    assert f.tell() == start + n           # preadv leaves the position alone
        finally:
            os.close(fd)


def test_big_sparse_file_reads_as_zeros_in_holes(fs, tree_image):
    """The 64 MiB triple-indirect file: data where written, zeros in every hole."""
    path = b"/sparse/holes-bs1024"
    node = tree_image.tree[path]
    data = fs.read_bytes(path)
    assert hashlib.sha256(data).hexdigest() == node.sha256
    for start, end in treegen.data_ranges(node.src):
        with open(node.src, "rb") as g:
            g.seek(start)
            assert data[start:end] == g.read(end - start)
    _, dind, tind = treegen.indirect_starts(1024)
    with fs.open(path, "rb", buffering=0) as f:
        assert f.pread(1024, (tind - 3) * 1024) == bytes(1024)      # a hole just before TIND
        assert f.pread(1024, (tind - 1) * 1024) == data[(tind - 1) * 1024:tind * 1024] != bytes(1024)


# -- the block map and get_xip_mem -------------------------------------------------------------
def _check_runs(runs, nblocks: int) -> dict[int, int]:
    """Runs tile [0, nblocks) in order, maximally merged; returns {file block: device block}."""
    pos = 0
    mapping: dict[int, int] = {}
    prev = None
    for lblk, count, pblk in runs:
        assert lblk == pos and count > 0, runs
        if prev is not None:
            _, pcount, ppblk = prev
            mergeable = (ppblk == 0 and pblk == 0) or (ppblk and pblk == ppblk + pcount)
            assert not mergeable, (prev, (lblk, count, pblk))
        if pblk:
            for k in range(count):
                mapping[lblk + k] = pblk + k
        prev = (lblk, count, pblk)
        pos += count
    assert pos == nblocks
    return mapping


def test_block_runs_match_debugfs(fs, tree_image):
    dbg = tree_image.debugfs
    bs = tree_image.bs
    for path, ino in dbg.paths.items():
        d = dbg.inodes[ino]
        st_ = fs.lstat(path)
        if stat.S_ISLNK(st_.st_mode):
            continue
        runs = fs.block_runs(path)
        if not (stat.S_ISREG(st_.st_mode) or stat.S_ISDIR(st_.st_mode)) or d.inline:
            assert runs == [], path                 # (inline data: in the inode, in no block)
            continue
        mapping = _check_runs(runs, -(-st_.st_size // bs))
        assert mapping == d.blocks, path
    assert fs.block_runs("/links/rel-file") == fs.block_runs("/sizes/f1")   # follows symlinks
    # and debugfs's own "blocks" command: every block of the inode in file order, indirect
    # blocks included (those are the IND/DIND/TIND entries of debugfs stat)
    paths = [p for p, n in regular(tree_image) if p.startswith((b"/sparse/", b"/sizes/f2"))]
    out = debugfs(tree_image.path, *(f"blocks <{dbg.paths[p]}>" for p in paths))
    lists = re.split(rb"^debugfs: blocks <\d+>\n", out, flags=re.M)[1:]
    assert len(lists) == len(paths)
    for path, text in zip(paths, lists, strict=True):
        meta = set(dbg.inodes[dbg.paths[path]].meta)
        listed = [int(b) for b in text.split()]
        want = [b for b in listed if b not in meta]
        assert len(want) + len(meta) == len(listed), path
        got = [p + k for _, n, p in fs.block_runs(path) if p for k in range(n)]
        assert got == want, path


def _sample_blocks(blocks: dict[int, int], nblocks: int, rng: random.Random) -> list[int]:
    if nblocks <= 80:
        return list(range(nblocks))
    pick = set(range(16)) | set(range(nblocks - 4, nblocks))
    for b in blocks:
        pick |= {b - 1, b, b + 1}
    pick |= {rng.randrange(nblocks) for _ in range(20)}
    return sorted(b for b in pick if 0 <= b < nblocks)[:400]


def _address(view) -> int:
    return np.frombuffer(view, dtype=np.uint8).ctypes.data


def test_get_xip_mem(fs, tree_image, xip):
    """Each file block is the image's block (by debugfs); holes and EOF give None.

    On the memory device the view is the storage itself: read-only, backed by the mmap, at the
    block's address in the mapping.
    """
    dbg = tree_image.debugfs
    bs = tree_image.bs
    rng = random.Random(5)
    fd = os.open(tree_image.path, os.O_RDONLY)
    try:
        for path, node in regular(tree_image):
            if dbg.inodes[dbg.paths[path]].inline:  # data in the inode, not in a block
                with pytest.raises(OSError) as exc:
                    fs.get_xip_mem(path, 0)
                assert exc.value.errno == errno.EOPNOTSUPP
                continue
            blocks = dbg.inodes[dbg.paths[path]].blocks
            nblocks = -(-node.size // bs)
            for lblk in _sample_blocks(blocks, nblocks, rng):
                mem = fs.get_xip_mem(path, lblk)
                pblk = blocks.get(lblk)
                if pblk is None:
                    assert mem is None, (path, lblk)
                    continue
                assert isinstance(mem, memoryview) and mem.nbytes == bs, (path, lblk)
                assert mem == os.pread(fd, bs, pblk * bs), (path, lblk)
                if xip:
                    assert mem.readonly
                    assert isinstance(mem.obj, mmap.mmap)
                    base = _address(memoryview(mem.obj))
                    assert _address(mem) - base == pblk * bs, (path, lblk)
            assert fs.get_xip_mem(path, nblocks) is None
            assert fs.get_xip_mem(path, nblocks + 100_000) is None
    finally:
        os.close(fd)
    with pytest.raises(OSError) as exc:
        fs.get_xip_mem("/sizes/f1", 0, create=True)
    assert exc.value.errno == errno.EROFS


def test_xip_mem_view_cannot_change_the_filesystem(fs, tree_image, xip):
    """A view handed out by get_xip_mem must not let a caller change what later reads return.

    On the memory device the view is read-only (PROT_READ). On the file device it must be too:
    the filesystem is read-only, and the page cache page it points into serves later reads.
    """
    path = "/sizes/f4096"
    before = fs.read_bytes(path)
    mem = fs.get_xip_mem(path, 0)
    try:
        mem[0] = (mem[0] + 1) & 0xFF
    except TypeError:
        pass                                             # read-only view: fine
    else:
        changed = fs.read_bytes(path) != before
        mem[0] = before[0]                               # put it back for the other tests
        assert not changed, "writing into a get_xip_mem view changed the data xipfs reads"
        pytest.fail("get_xip_mem returned a writable view of a read-only filesystem")


def test_views_outlive_close(tree_image, xip):
    """README: views handed out stay valid after fs.close() (the mapping goes with the last one)."""
    fs = open_image(tree_image.path, xip)
    want = fs.read_bytes("/sizes/f4097")
    views = [fs.get_xip_mem("/sizes/f4097", i) for i in range(-(-4097 // tree_image.bs))]
    fs.close()
    assert b"".join(bytes(v) for v in views)[:4097] == want
    for v in views:
        v.release()


# -- paths --------------------------------------------------------------------------------------
def _probe_paths(tree: dict, rng: random.Random) -> list[bytes]:
    paths = set(tree)
    for path, node in tree.items():
        paths.add(path + b"/")
        paths.add(path + b"/.")
        paths.add(path + b"/..")
        if node.kind == "lnk":
            paths |= {path + b"/x", path + b"/../sizes/f1", path + b"//", path + b"/../..", path + b"/./",
                      path + b"/f1", path + b"/level01", path + b"/bottom"}
    paths |= {b"/", b"//", b"/.", b"/..", b"/../..", b"///sizes//f1", b"./sizes/./f1", b"sizes/f1",
              b"/sizes/f1/..", b"/sizes/../sizes/f1", b"/nope", b"/nope/", b"/nope/..",
              b"/names/" + b"x" * 255, b"/names/" + b"x" * 256, b"/" + b"y" * 256 + b"/z",
              b"/links/chain/l00", b"/links/chain/l01", b"/links/chain/l40",
              b"/links/rel-dir/many/entry-0001-x", b"/links/dotdot/links/dotdot/sizes/f1",
              b"/links/dot/dot/dot/target", b"/links/sub/up2/target", b"/links/root/links/root/",
              b"/links/abs-dir/../../deep/level00/level01/level02"}
    # random walks through the tree, mixing real names, '.', '..' and symlinks
    names = sorted({p.rsplit(b"/", 1)[1] for p in tree if p != b"/"})
    for _ in range(400):
        comps = []
        for _ in range(rng.randint(1, 7)):
            r = rng.random()
            comps.append(b".." if r < 0.15 else b"." if r < 0.2 else rng.choice(names))
        p = b"/".join(comps)
        paths.add(p if rng.random() < 0.5 else b"/" + p)
        cur = rng.choice(sorted(tree))
        paths.add(cur + b"/" + b"/".join(comps[:2]))
    return sorted(paths)


def _has_dot(path: bytes) -> bool:
    """True for paths with a '.' component or through the /dots symlinks (see below)."""
    comps = path.split(b"/")
    return b"." in comps or b"dots" in comps


def _compare_with_kernel(fs, tree_image, probes: list[bytes]) -> list:
    tree = tree_image.tree
    kernel = kernel_resolve(tree_image.src, probes)
    by_src_ino = {}
    for path, node in tree.items():
        by_src_ino.setdefault(node.src_ino, path)
    mismatches = []
    for path in probes:
        for follow, want in zip((True, False), kernel[path], strict=True):
            try:
                st_ = fs.stat(path) if follow else fs.lstat(path)
                got = ("ok", stat.S_IFMT(st_.st_mode), st_.st_ino)
            except OSError as err:
                got = ("err", err.errno)
            if want[0] == "ok":
                same = fs.lstat(by_src_ino[want[2]]).st_ino
                want = ("ok", stat.S_IFMT(want[1]), same)
            if got != want:
                mismatches.append((path, "stat" if follow else "lstat", got, want))
    return mismatches


def test_path_resolution_matches_kernel(fs, tree_image):
    """stat and lstat of ~2500 paths resolve to the same inode or errno as the kernel's.

    The kernel resolves in the source tree under chroot, so absolute symlinks resolve inside the
    tree exactly as they do inside the image. Paths with '.' components are the next test's.
    """
    probes = [p for p in _probe_paths(tree_image.tree, random.Random(13)) if not _has_dot(p)]
    assert len(probes) > 1500
    mismatches = _compare_with_kernel(fs, tree_image, probes)
    assert not mismatches, f"{len(mismatches)} of {2 * len(probes)}: {mismatches[:20]}"


def test_dot_components_match_kernel(fs, tree_image):
    """Paths with '.' components, and symlinks whose target ends in '/' or '/.'.

    For the kernel a '.' component, like a trailing slash, needs the directory before it to be a
    directory ('file/.' is ENOTDIR) and makes a symlink before it be followed (lstat('link/.')
    is the target directory), also inside a symlink's target.
    """
    probes = [p for p in _probe_paths(tree_image.tree, random.Random(13)) if _has_dot(p)]
    assert len(probes) > 500
    mismatches = _compare_with_kernel(fs, tree_image, probes)
    assert not mismatches, f"{len(mismatches)} of {2 * len(probes)}: {mismatches[:20]}"


def test_dot_and_trailing_slash_need_a_directory(fs):
    """The same rules, spelled out (the kernel gives ENOTDIR for each of these)."""
    for path in ("/sizes/f1/.", "/dots/file/.", "/dots/file-slash", "/dots/file-dot",
                 "/dots/file-dot-dot", "/special/fifo/.", "/links/rel-file/."):
        with pytest.raises(NotADirectoryError):
            fs.stat(path)
    with pytest.raises(FileNotFoundError):
        fs.stat("/dots/dangling-dot")
    # lstat of 'link/.' is the directory the link points to, not the link
    assert stat.S_ISDIR(fs.lstat("/links/rel-dir/.").st_mode)
    assert fs.lstat("/links/rel-dir/.").st_ino == fs.stat("/names").st_ino
    assert fs.stat("/dots/link-dot").st_ino == fs.stat("/dots/dir-dot").st_ino == fs.stat("/names").st_ino


def test_scandir_follows_like_the_kernel(fs, tree_image):
    """DirEntry.is_dir()/is_file() with follow_symlinks resolve symlinks as the kernel does."""
    tree = tree_image.tree
    links = [p for p, n in tree.items() if n.kind == "lnk" and not _has_dot(p)]
    kernel = kernel_resolve(tree_image.src, links)
    for path in links:
        top, name = path.rsplit(b"/", 1)
        entry = next(e for e in fs.scandir(top or b"/") if e.name == name)
        want = kernel[path][0]
        is_dir = want[0] == "ok" and stat.S_ISDIR(want[1])
        is_file = want[0] == "ok" and stat.S_ISREG(want[1])
        assert entry.is_dir() == is_dir, path
        assert entry.is_file() == is_file, path
        assert fs.isdir(path) == is_dir and fs.isfile(path) == is_file, path
        assert fs.exists(path) == (want[0] == "ok"), path
        assert fs.lexists(path) and fs.islink(path)


_WALK_CHILD = r"""
import os, pickle, sys
root, tops = pickle.load(sys.stdin.buffer)
os.chroot(root)
os.chdir("/")
out = {}
for top, topdown, followlinks in tops:
    out[(top, topdown, followlinks)] = [(t, sorted(d), sorted(f))
                                        for t, d, f in os.walk(top, topdown, None, followlinks)]
sys.stdout.buffer.write(pickle.dumps(out))
"""


def _kernel_walk(tree_image, cases):
    """os.walk for each ``(top, topdown, followlinks)``, run in the chroot'ed source tree."""
    import pickle
    import subprocess
    import sys

    if os.geteuid() != 0:
        pytest.skip("chroot needs root")
    proc = subprocess.run([sys.executable, "-c", _WALK_CHILD], input=pickle.dumps((tree_image.src, cases)),
                          capture_output=True, check=True, timeout=120)
    return pickle.loads(proc.stdout)


def _compare_walks(fs, tree_image, cases) -> None:
    kernel = _kernel_walk(tree_image, cases)
    for top, topdown, followlinks in cases:
        want = kernel[(top, topdown, followlinks)]
        got = [(t, sorted(d), sorted(f)) for t, d, f in fs.walk(top, topdown, followlinks=followlinks)]
        if top == b"/":                                   # mke2fs adds lost+found
            want = [(t, sorted(d + [b"lost+found"]) if t == b"/" else d, f) for t, d, f in want]
            want.append((b"/lost+found", [], []))
        assert sorted(got) == sorted(want), (top, topdown, followlinks)
        order = [t for t, _, _ in got]
        for t in order:                                   # parents before children (or after)
            parent = t.rsplit(b"/", 1)[0] or b"/"
            if t != top and parent in order:
                before = order.index(parent) < order.index(t)
                assert before == topdown, (t, parent)


def test_walk_matches_os_walk(fs, tree_image):
    """fs.walk against os.walk run by the kernel in the chroot'ed source tree."""
    _compare_walks(fs, tree_image, [(b"/", True, False), (b"/", False, False), (b"/links", True, False),
                                    (b"/walk", True, False), (b"/walk", False, False)])
    # pruning dirs in place stops the descent (topdown)
    seen = []
    for t, dirs, _ in fs.walk("/"):
        seen.append(t)
        dirs[:] = [d for d in dirs if d != "names"]
    assert "/names" not in seen and "/names/many" not in seen and "/sizes" in seen


def test_walk_followlinks_through_a_dag(fs, tree_image):
    """followlinks=True where symlinks make a DAG, not a cycle: /hard/other is reached both as
    /walk/a/to-other and as /walk/to-hard/other. The image is clean (e2fsck), so walking it must
    not report corruption. fs.walk may skip a directory it already walked through a symlink (its
    docstring says so), but what it yields must be what os.walk yields for that directory, and
    every directory os.walk reaches must be walked under one name at least."""
    cases = [(b"/walk", True, True), (b"/walk", False, True)]
    kernel = _kernel_walk(tree_image, cases)
    for top, topdown, followlinks in cases:
        want = {t: (sorted(d), sorted(f)) for t, d, f in kernel[(top, topdown, followlinks)]}
        got = list(fs.walk(top, topdown, followlinks=followlinks))
        for t, d, f in got:
            assert want[t] == (sorted(d), sorted(f)), t
        assert {fs.stat(t).st_ino for t, _, _ in got} == {fs.stat(t).st_ino for t in want}


def test_empty_path_is_enoent(fs):
    """``os.stat("")`` raises FileNotFoundError; xipfs promises the errors of ``os``."""
    for fn in (fs.stat, fs.lstat, fs.listdir, fs.read_bytes):
        with pytest.raises(FileNotFoundError):
            fn("")
    assert not fs.exists("")


def test_errno_of_bad_paths(fs):
    def err(fn, *args):
        with pytest.raises(OSError) as exc:
            fn(*args)
        return exc.value

    e = err(fs.open, "/sizes", "rb")
    assert isinstance(e, IsADirectoryError) and e.errno == errno.EISDIR
    assert err(fs.read_bytes, "/sizes").errno == errno.EISDIR
    assert err(fs.open, "/links/rel-dir", "rb", 0).errno == errno.EISDIR
    for path in ("/links/loop-self", "/links/loop-a", "/links/loop-dir", "/links/chain/l00",
                 "/links/loop-self/x", "/links/loop-a/"):
        assert err(fs.stat, path).errno == errno.ELOOP, path
        assert not fs.exists(path)
    assert err(fs.open, "/links/loop-a", "rb").errno == errno.ELOOP
    assert err(fs.read_bytes, "/links/chain/l00").errno == errno.ELOOP
    assert fs.read_bytes("/links/chain/l01") == b"end of chain\n"      # exactly 40 links
    assert fs.lexists("/links/loop-self") and fs.islink("/links/loop-self")
    assert stat.S_ISLNK(fs.lstat("/links/loop-self").st_mode)
    for path in ("/sizes/f1/", "/sizes/f1/x", "/sizes/f1/..", "/links/rel-file/", "/special/fifo/x",
                 "/special/fifo/"):
        e = err(fs.stat, path)
        assert isinstance(e, NotADirectoryError) and e.errno == errno.ENOTDIR, path
    assert err(fs.listdir, "/sizes/f1").errno == errno.ENOTDIR
    assert err(fs.scandir, "/sizes/f1").errno == errno.ENOTDIR
    assert err(fs.listdir, "/links/rel-file").errno == errno.ENOTDIR
    for path in ("/nope", "/nope/x", "/links/dangling", "/links/dangling-abs", "/sizes/nope/..",
                 "/links/dangling/"):
        e = err(fs.stat, path)
        assert isinstance(e, FileNotFoundError) and e.errno == errno.ENOENT, path
    assert err(fs.open, "/links/dangling", "rb").errno == errno.ENOENT
    assert err(fs.stat, "/" + "n" * 256).errno == errno.ENAMETOOLONG
    assert err(fs.stat, "/" + "n" * 255).errno == errno.ENOENT
    assert err(fs.readlink, "/sizes/f1").errno == errno.EINVAL
    assert err(fs.readlink, "/nope").errno == errno.ENOENT
    assert err(fs.getxattr, "/nope", "user.x").errno == errno.ENOENT
    assert err(fs.open, "/sizes/f1", "wb").errno == errno.EROFS
    assert err(fs.open, "/sizes/f1", "r+").errno == errno.EROFS
    assert isinstance(err(fs.open, "/special/fifo", "rb"), OSError)
    # the error carries the path, like os
    assert err(fs.stat, "/nope/x").filename in ("/nope/x", b"/nope/x")


def test_name_too_long_counts_bytes(fs):
    """NAME_MAX is 255 *bytes*: a 128-character name of 2-byte UTF-8 is too long (the kernel
    says ENAMETOOLONG), while the 255-byte names of the tree are found."""
    for name in ("é" * 128, "😀" * 64, "漢" * 86):
        assert len(name.encode()) > 255 and len(name) <= 255
        for spelling in ("/names/" + name, os.fsencode("/names/" + name)):
            with pytest.raises(OSError) as exc:
                fs.stat(spelling)
            assert exc.value.errno == errno.ENAMETOOLONG, name
    assert fs.lstat("/names/" + "é" * 127 + "x").st_size >= 0
    assert fs.lstat(b"/names/" + "😀".encode() * 63 + b"abc").st_size >= 0


def test_trailing_slash_and_dotdot_after_symlinks(fs):
    assert fs.stat("/links/rel-dir/").st_ino == fs.stat("/names").st_ino
    assert fs.lstat("/links/rel-dir/").st_ino == fs.stat("/names").st_ino   # the slash follows
    assert stat.S_ISLNK(fs.lstat("/links/rel-dir").st_mode)
    # '..' after a symlink is the parent of the target, not of the link
    assert fs.stat("/links/abs-dir/..").st_ino == fs.stat("/deep/level00").st_ino
    assert fs.stat("/links/rel-dir/..").st_ino == fs.stat("/").st_ino
    assert fs.stat("/links/slow-dir/level01/..").st_ino == fs.stat("/deep/level00").st_ino
    assert fs.listdir("/links/dotdot/links/dot") == fs.listdir("/links")
    assert fs.read_bytes("/links/up-through") == fs.read_bytes("/sizes/f1")
    assert fs.stat("/..").st_ino == fs.stat("/").st_ino == 2


def test_tiny_page_cache(tree_image):
    """The file device with a 4-page cache: every read evicts; nothing read may change."""
    with xipfs.open(tree_image.path, xip=False, cache_bytes=1) as fs:
        assert not fs.is_xip
        treegen.check_against_tree(fs, tree_image.tree, tree_image.bs,
                                   inline=tree_image.kind == "ext4-inline")
        rng = random.Random(17)
        for path, node in regular(tree_image):
            if node.size > FULL_READ_LIMIT or node.size < 100_000:
                continue
            want = source_bytes(node)
            with fs.open(path, "rb", buffering=0) as f:
                for _ in range(30):
                    off = rng.randrange(node.size)
                    n = rng.choice([1, 4095, 65537, 200_000])
                    assert f.pread(n, off) == want[off:off + n], (path, off, n)


# -- the whole image against the kernel ---------------------------------------------------------
def test_everything_matches_the_kernel_mount(fs, tree_image):
    """lstat (inode, blocks, nanosecond times...), xattrs, targets, names and data as Linux reads them."""
    treegen.check_against_kernel(fs, tree_image.kernel)


def test_statvfs(fs, tree_image):
    sv = fs.statvfs("/")
    assert sv.f_bsize == sv.f_frsize == tree_image.bs
    assert sv.f_flag & os.ST_RDONLY
    assert sv.f_namemax == 255
    with mounted(tree_image.path) as mnt:
        k = os.statvfs(mnt)
    for name in ("f_bsize", "f_bfree", "f_bavail", "f_files", "f_ffree", "f_favail", "f_namemax",
                 "f_fsid"):
        assert getattr(sv, name) == getattr(k, name), name
    # counted as the ext4 driver counts (reserved GDT blocks and a journal included), which
    # mounts ext2 and ext3 too on current kernels (Linux's own ext2 driver left the reserved
    # GDT blocks out of its overhead)
    assert sv.f_blocks == k.f_blocks
    assert fs.statvfs("/sizes") == sv


# -- hypothesis: small random trees, every geometry ----------------------------------------------
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(spec=treegen.tree_specs, bs=st.sampled_from(BLOCK_SIZES), isize=st.sampled_from(INODE_SIZES))
def test_random_trees(shm_dir, spec, bs, isize):
    work = tempfile.mkdtemp(dir=shm_dir)
    try:
        src = os.path.join(work, "src")
        treegen.build_spec(src, spec)
        nodes = treegen.record_tree(src)
        img = mkfs(os.path.join(work, "img"), "16M", src=src, bs=bs, isize=isize)
        assert_fsck_clean(img, exit_only=True)
        for xip in (True, False):
            with open_image(img, xip) as fs:
                treegen.check_against_tree(fs, nodes, bs)
    finally:
        shutil.rmtree(work)
