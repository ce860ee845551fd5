"""Images the other ways real users get them: old revisions, no features, huge and triple-indirect
files, images written by Linux itself (htree directories), ext3/ext4 and feature flags, very big
directories, POSIX shared memory and disk files."""

from __future__ import annotations

import errno
import hashlib
import os
import pathlib
import random
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest
import treegen
from conftest import IS_ROOT, kernel_snapshot, mounted, open_image
from e2fs import assert_fsck_clean, debugfs, dumpe2fs, e2fsck, mkfs, parse_stat, run

import xipfs

pytestmark = pytest.mark.timeout(600)

BOTH = pytest.mark.parametrize("xip", [True, False], ids=["xip", "pagecache"])


@pytest.fixture(scope="module")
def small_tree(shm_dir):
    """The standard tree without its big files (about 3 MiB of data): (source, nodes)."""
    root = os.fsencode(os.path.join(shm_dir, "small-tree"))
    treegen.build_tree(root, 99, random_files=30, big=False)
    yield root, treegen.record_tree(root)
    shutil.rmtree(root)


@pytest.fixture
def workdir(shm_dir):
    path = tempfile.mkdtemp(dir=shm_dir)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def inode_flags(img: str, path: str) -> int:
    out = debugfs(img, f"stat {path}").decode(errors="replace")
    return int(re.search(r"Flags: (0x[0-9a-f]+)", out)[1], 16)


# -- old and minimal formats ---------------------------------------------------------------------
@pytest.mark.parametrize("opts, bs, isize, xattrs", [
    (("-r", "0"), 1024, None, False),
    (("-r", "0"), 4096, None, False),
    (("-O", "none"), 1024, 256, False),
    (("-O", "none"), 2048, 128, False),
    (("-O", "none,ext_attr"), 1024, 128, True),
    (("-O", "^dir_index,^resize_inode,^sparse_super"), 4096, 256, True),
], ids=["rev0-1k", "rev0-4k", "none-1k-i256", "none-2k-i128", "xattr-only-1k-i128", "no-sparse-4k"])
@BOTH
def test_old_and_minimal_formats(small_tree, workdir, opts, bs, isize, xattrs, xip):
    src, nodes = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=bs, isize=isize, extra=opts)
    assert_fsck_clean(img, exit_only=True)
    head = dumpe2fs(img, "-h")
    if opts == ("-r", "0"):
        assert re.search(r"Filesystem revision #:\s+0", head)
    with open_image(img, xip) as fs:
        if "none" in opts[1] or opts[1] == "0":
            assert fs.features == (["ext_attr"] if xattrs else [])
        treegen.check_against_tree(fs, nodes, bs, xattrs=xattrs)
        if not xattrs:                                 # without ext_attr mke2fs drops them
            assert all(fs.listxattr(p, follow_symlinks=False) == [] for p in nodes)
        assert fs.read_bytes("/links/chain/l01") == b"end of chain\n"
        data = fs.read_bytes("/sparse/holes-bs1024")
        assert hashlib.sha256(data).hexdigest() == nodes[b"/sparse/holes-bs1024"].sha256


# -- huge and triple-indirect files --------------------------------------------------------------
HUGE_SIZE = 5 * 2**30 + 123
HUGE_PIECES = [0, 2**31 - 2, 2**32 - 3, 2**32 + 4 * 2**20 + 4096 * 1037, 5 * 2**30]


@pytest.fixture(scope="module", params=[1024, 4096], ids=["bs1024", "bs4096"])
def huge_image(request, shm_dir):
    """An 8 GiB sparse image holding a sparse 5 GiB file, data across the 2 and 4 GiB marks."""
    bs = request.param
    work = tempfile.mkdtemp(dir=shm_dir)
    src = os.path.join(work, "src")
    os.mkdir(src)
    rng = random.Random(bs)
    pieces = {}
    fd = os.open(os.path.join(src, "huge"), os.O_WRONLY | os.O_CREAT, 0o644)
    for off in HUGE_PIECES:
        pieces[off] = rng.randbytes(4096)
        os.pwrite(fd, pieces[off], off)
    os.ftruncate(fd, HUGE_SIZE)
    os.close(fd)
    img = mkfs(os.path.join(work, "img"), "8G", src=src, bs=bs, extra=("-N", "256"))
    assert_fsck_clean(img, exit_only=True)
    assert "large_file" in dumpe2fs(img, "-h")
    yield img, bs, pieces
    shutil.rmtree(work)


@BOTH
def test_file_over_4GiB(huge_image, xip):
    img, bs, pieces = huge_image
    d = parse_stat(debugfs(img, "stat /huge"))
    with open_image(img, xip) as fs:
        st_ = fs.stat("/huge")
        assert st_.st_size == HUGE_SIZE == d.size
        assert st_.st_blocks == d.blockcount
        with fs.open("/huge", "rb", buffering=0) as f:
            for off, data in pieces.items():
                assert f.pread(4096, off) == data[:HUGE_SIZE - off], off
                if off == 0:
                    continue
                assert f.pread(100, off - 100) == bytes(100), off          # hole before
                f.seek(off - 7)
                buf = bytearray(4096 + 14)
                n = f.readinto(buf)
                assert n == min(len(buf), HUGE_SIZE - off + 7)
                assert bytes(buf[:n]) == _expected(pieces, off - 7, n), off
            assert f.seek(0, os.SEEK_END) == HUGE_SIZE
            assert f.read() == b""
            assert f.pread(10, HUGE_SIZE - 5) == _expected(pieces, HUGE_SIZE - 5, 10)
        runs = fs.block_runs("/huge")
        mapping = {lblk + k: p + k for lblk, n, p in runs if p for k in range(n)}
        assert mapping == d.blocks
        assert sum(n for _, n, _ in runs) == -(-HUGE_SIZE // bs)
        fd = os.open(img, os.O_RDONLY)
        try:
            for lblk, pblk in d.blocks.items():
                assert fs.get_xip_mem("/huge", lblk) == os.pread(fd, bs, pblk * bs)
        finally:
            os.close(fd)
        assert fs.get_xip_mem("/huge", (2**32 + 8192) // bs) is None


def _expected(pieces: dict[int, bytes], off: int, n: int) -> bytes:
    """Bytes ``[off, off+n)`` of the huge file (its pieces, zeros elsewhere), clipped at EOF."""
    n = max(0, min(n, HUGE_SIZE - off))
    buf = bytearray(n)
    for k, v in pieces.items():
        a, b = max(off, k), min(off + n, k + len(v))
        if a < b:
            buf[a - off:b - off] = v[a - k:b - k]
    return bytes(buf)


@BOTH
def test_triple_indirect_file(huge_image, xip):
    """Blocks mapped through the triple-indirect block (debugfs shows TIND) read right."""
    img, bs, pieces = huge_image
    out = debugfs(img, "stat /huge")
    assert b"(TIND)" in out
    d = parse_stat(out)
    tind_start = treegen.indirect_starts(bs)[2]
    beyond = sorted(lblk for lblk in d.blocks if lblk >= tind_start)
    assert len(beyond) >= 4096 // bs * 2
    with open_image(img, xip) as fs, fs.open("/huge", "rb", buffering=0) as f:
        for lblk in beyond:
            for off in (lblk * bs, lblk * bs - 3, lblk * bs + bs - 5):
                assert f.pread(bs + 9, off) == _expected(pieces, off, bs + 9), off
        assert f.pread(bs, tind_start * bs) == bytes(bs)        # first TIND block is a hole
        assert fs.get_xip_mem("/huge", tind_start) is None


# -- an image written by Linux -------------------------------------------------------------------
LINUX_TIMES_NS = {
    "t-ns": 1_234_567_890_123_456_789,
    "t-pre-1970": -1_500_000_000_999_999_999 // 10 * 10 + 7,
    "t-2038+": (2**31 + 10) * 10**9 + 5,
    "t-2242": 2**33 * 10**9 + 999_999_999,
}


def _fill_through_the_kernel(mnt: str, rng: random.Random) -> set[str]:
    """Write a varied tree through the kernel; returns the names left in /big."""
    big = os.path.join(mnt, "big")
    os.mkdir(big)
    names = set()
    for i in range(3000):
        name = f"file-{i:05d}-" + "x" * (i % 47) + ("-ü" if i % 11 == 0 else "")
        with open(os.path.join(big, name), "w") as f:
            f.write(f"{i}\n")
        names.add(name)
    for name in sorted(names)[::7]:                       # holes in the directory blocks
        os.unlink(os.path.join(big, name))
        names.discard(name)
    for name in sorted(names)[::13]:
        os.rename(os.path.join(big, name), os.path.join(big, name + ".renamed"))
        names.discard(name)
        names.add(name + ".renamed")
    data = os.path.join(mnt, "data")
    os.mkdir(data)
    with open(os.path.join(data, "seq"), "wb") as f:
        f.write(rng.randbytes(2 * 1024 * 1024 + 77))
    with open(os.path.join(data, "sparse"), "wb") as f:
        f.seek(5 * 1024 * 1024)
        f.write(b"after the hole")
        f.truncate(9 * 1024 * 1024 + 5)
    with open(os.path.join(data, "appended"), "ab") as f:
        for _ in range(50):                                # interleaved with other writes
            f.write(rng.randbytes(rng.randint(1, 20_000)))
            f.flush()
            with open(os.path.join(data, "interleave"), "ab") as g:
                g.write(rng.randbytes(3000))
    os.symlink("seq", os.path.join(data, "fast-link"))
    os.symlink("../data/" + "./" * 50 + "seq", os.path.join(data, "slow-link"))
    os.link(os.path.join(data, "seq"), os.path.join(mnt, "hard-seq"))
    os.mkfifo(os.path.join(data, "fifo"))
    os.mknod(os.path.join(data, "dev"), stat.S_IFCHR | 0o600, os.makedev(300, 70_000))
    os.setxattr(os.path.join(data, "seq"), "user.small", b"s")
    os.setxattr(os.path.join(data, "seq"), "user.big", rng.randbytes(600))
    os.setxattr(os.path.join(data, "sparse"), "trusted.t", b"trusted")
    os.chmod(os.path.join(data, "seq"), 0o4751)
    os.chown(os.path.join(data, "appended"), 100_000, 200_000)
    for d in range(30):
        os.makedirs(os.path.join(mnt, "dirs", f"d{d}", "sub"))
    for name, ns in LINUX_TIMES_NS.items():
        path = os.path.join(data, name)
        open(path, "w").close()
        os.utime(path, ns=(ns, ns))
    return names


@pytest.fixture(scope="module", params=[(1024, 256), (4096, 128)], ids=["bs1024-i256", "bs4096-i128"])
def linux_image(request, shm_dir):
    """An image filled by the kernel through a loop mount (skips when that is not possible)."""
    if not IS_ROOT:
        pytest.skip("loop-mounting an image needs root")
    bs, isize = request.param
    work = tempfile.mkdtemp(dir=shm_dir)
    img = mkfs(os.path.join(work, "img"), "64M", bs=bs, isize=isize)
    try:
        with mounted(img, "ext2", "rw") as mnt:
            names = _fill_through_the_kernel(mnt, random.Random(bs))
        assert_fsck_clean(img, exit_only=True)
        if not inode_flags(img, "/big") & 0x1000:          # the driver did not index: force it
            e2fsck(img, "-fyD")
            assert_fsck_clean(img, exit_only=True)
        with mounted(img) as mnt:                          # the kernel's view of the final image
            snapshot = kernel_snapshot(mnt)
        yield img, bs, isize, names, snapshot
    finally:
        shutil.rmtree(work)


def test_linux_image_has_an_htree(linux_image):
    img, *_ = linux_image
    assert inode_flags(img, "/big") & 0x1000                 # EXT2_INDEX_FL
    out = debugfs(img, "htree /big").decode(errors="replace")
    assert "Root node dump" in out


@BOTH
def test_linux_image_reads_like_the_kernel(linux_image, xip):
    img, bs, isize, names, snapshot = linux_image
    with open_image(img, xip) as fs:
        treegen.check_against_kernel(fs, snapshot)
        assert set(fs.listdir("/big")) == names
        for name in sorted(names)[::97]:
            i = int(name.split("-")[1])
            assert fs.read_text("/big/" + name) == f"{i}\n"
        with pytest.raises(FileNotFoundError):
            fs.stat("/big/file-00000-")                    # deleted
        assert fs.stat("/hard-seq").st_ino == fs.stat("/data/seq").st_ino
        assert fs.read_bytes("/data/slow-link") == fs.read_bytes("/data/seq")
        assert os.major(fs.lstat("/data/dev").st_rdev) == 300
        assert os.minor(fs.lstat("/data/dev").st_rdev) == 70_000
        assert fs.lstat("/dirs").st_nlink == 32


@BOTH
def test_linux_image_nanosecond_times(linux_image, xip):
    """The ext4 driver stores nanoseconds and the epoch bits past 2038 in 256-byte inodes."""
    img, bs, isize, names, snapshot = linux_image
    with open_image(img, xip) as fs:
        for name, ns in LINUX_TIMES_NS.items():
            st_ = fs.lstat("/data/" + name)
            assert st_.st_mtime_ns == snapshot[f"/data/{name}".encode()]["stat"].st_mtime_ns
            if isize == 256:
                assert st_.st_mtime_ns == ns == st_.st_atime_ns, name


# -- ext3, ext4 and feature flags ----------------------------------------------------------------
@BOTH
def test_ext3_opens_read_only(small_tree, workdir, xip):
    src, nodes = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=1024, fstype="ext3")
    assert_fsck_clean(img, exit_only=True)
    with open_image(img, xip) as fs:
        assert "has_journal" in fs.features
        assert fs.readonly
        treegen.check_against_tree(fs, nodes, 1024)
        assert ".journal" not in fs.listdir("/")


def test_ext3_is_written_while_its_journal_is_empty(small_tree, workdir):
    """An ext3 image whose journal is empty takes writes (xipfs does not journal, and leaves the
    journal as empty as it found it); e2fsck finds it clean and the journal untouched."""
    src, _ = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=1024, fstype="ext3")
    before = run(["debugfs", "-R", "logdump", img]).stdout
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/new", b"n" * 10_000)
        fs.mkdir("/dir")
        fs.unlink("/hard/a")
    assert_fsck_clean(img)
    assert run(["debugfs", "-R", "logdump", img]).stdout == before


def test_a_pending_journal_is_replayed_into_the_image_by_a_writer(small_tree, workdir):
    """needs_recovery with committed transactions, opened "r+": replayed into the image first
    (as Linux at a read-write mount), then written; the result is what e2fsck -fy replays."""
    src, _ = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=1024, fstype="ext3")
    blk = int(run(["debugfs", "-R", "bmap /hard/a 0", img]).stdout.split()[0])
    payload = os.path.join(workdir, "payload")
    with open(payload, "wb") as f:
        f.write(b"from the journal".ljust(1024, b"J"))
    run(["debugfs", "-w", "-f", "-", img], input=f"jo\njw -b {blk} {payload}\njc\n".encode())
    assert "needs_recovery" in dumpe2fs(img, "-h")
    fixed = img + ".fixed"
    shutil.copyfile(img, fixed)
    run(["e2fsck", "-fy", fixed], check=False)
    with xipfs.open(img, "r+") as fs:
        assert fs.volume.replayed
        assert fs.read_bytes("/hard/a")[:16] == b"from the journal"
    assert "needs_recovery" not in dumpe2fs(img, "-h")
    assert_fsck_clean(img)
    with xipfs.open(img) as a, xipfs.open(fixed) as b:
        assert a.read_bytes("/hard/a") == b.read_bytes("/hard/a")


@pytest.mark.parametrize("fstype, opts, feature", [
    ("ext4", (), "extent"),
    ("ext2", ("-O", "extent"), "extent"),
    ("ext2", ("-O", "flex_bg"), "flex_bg"),
    ("ext2", ("-O", "extent,64bit"), "64bit"),
    ("ext2", ("-O", "inline_data"), "inline_data"),
])
@BOTH
def test_ext4_features_are_read_and_written(small_tree, workdir, fstype, opts, feature, xip):
    """ext4's formats are read (the tree as it went in) and written (e2fsck-clean after), each
    alone on an otherwise ext2 image too; XIPFS_EXT4_WRITE=0 refuses the writing, naming why."""
    src, nodes = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=1024, fstype=fstype, extra=opts)
    assert_fsck_clean(img, exit_only=True)
    with open_image(img, xip) as fs:
        assert fs.readonly and feature in fs.features
        if feature == "inline_data":
            # mke2fs 1.47.0 -d cuts the tail of a sparse file when it makes inline_data images:
            # the image is not the tree, so the kernel's view of it is the answer
            with mounted(img) as mnt:
                treegen.check_against_kernel(fs, kernel_snapshot(mnt))
        else:
            treegen.check_against_tree(fs, nodes, 1024)
    data = os.urandom(70_000)
    with xipfs.open(img, "r+", xip=xip) as fs:
        fs.write_bytes("/written", data)
        fs.mkdir("/lost+found/d")
        fs.write_bytes("/lost+found/d/small", b"s")
    assert_fsck_clean(img)
    with open_image(img, xip) as fs:
        assert fs.read_bytes("/written") == data and fs.read_bytes("/lost+found/d/small") == b"s"
        if feature != "inline_data":
            treegen.check_against_tree(fs, nodes, 1024, root_extra=(b"lost+found", b"written"))
    code = "import sys, xipfs\ntry:\n xipfs.open(sys.argv[1], 'r+')\nexcept OSError as e:\n print(e.errno, e)"
    out = subprocess.run([sys.executable, "-c", code, img], capture_output=True, text=True, check=True,
                         env={**os.environ, "XIPFS_EXT4_WRITE": "0"}).stdout
    assert out.startswith(f"{errno.EROFS} ") and feature in out


@BOTH
def test_needs_recovery_with_an_empty_journal_reads(small_tree, workdir, xip):
    """needs_recovery over a journal with nothing in it: nothing to replay, the tree as it is."""
    src, nodes = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=1024, fstype="ext3")
    assert_fsck_clean(img, exit_only=True)
    debugfs(img, "feature needs_recovery", write=True)
    assert "needs_recovery" in dumpe2fs(img, "-h")
    with open_image(img, xip) as fs:
        assert not fs.volume.replayed
        treegen.check_against_tree(fs, nodes, 1024)


@pytest.mark.parametrize("field, value", [
    ("feature_ro_compat", "0x1003"),          # sparse_super, large_file, read-only
    ("feature_ro_compat", "0x80000003"),      # an unknown read-only-compatible bit
    ("feature_compat", "0x80000038"),         # an unknown compatible bit
])
@BOTH
def test_unknown_compatible_features_still_read(small_tree, workdir, field, value, xip):
    src, nodes = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=1024)
    assert_fsck_clean(img, exit_only=True)
    debugfs(img, f"ssv {field} {value}", write=True)
    with open_image(img, xip) as fs:
        treegen.check_against_tree(fs, nodes, 1024)
        if field == "feature_ro_compat":
            assert fs.readonly


@BOTH
def test_unknown_incompatible_feature_is_refused(small_tree, workdir, xip):
    src, _ = small_tree
    img = mkfs(os.path.join(workdir, "img"), "48M", src=src, bs=1024)
    assert_fsck_clean(img, exit_only=True)
    debugfs(img, "ssv feature_incompat 0x80000002", write=True)     # filetype + bit 31
    with pytest.raises(xipfs.UnsupportedFeatureError) as exc:
        open_image(img, xip)
    assert "31" in str(exc.value)


@BOTH
def test_meta_bg_is_read_right_or_refused(small_tree, workdir, xip):
    """meta_bg: refused by name (what the README says), or read right (what Linux ext2 does).

    300 MiB at 1 KiB blocks is 37 groups: two meta-groups, so the descriptors of groups 32-36
    live in group 32, not after the superblock; a reader that ignores meta_bg reads garbage.
    """
    src, nodes = small_tree
    img = mkfs(os.path.join(workdir, "img"), "300M", src=src, bs=1024,
               extra=("-O", "meta_bg,^resize_inode"))
    assert_fsck_clean(img, exit_only=True)
    assert "meta_bg" in dumpe2fs(img, "-h")
    try:
        fs = open_image(img, xip)
    except xipfs.UnsupportedFeatureError as err:
        assert "meta_bg" in str(err) and "meta_bg" in err.features
        return
    with fs:
        treegen.check_against_tree(fs, nodes, 1024)
        sv = fs.statvfs("/")
        assert sv.f_files == int(re.search(r"Inode count:\s+(\d+)", dumpe2fs(img, "-h"))[1])


@pytest.fixture
def loop_device(small_image):
    """The small image attached read-only to a loop device (root only)."""
    if not IS_ROOT:
        pytest.skip("losetup needs root")
    img, _ = small_image
    proc = run(["losetup", "-r", "-f", "--show", img], check=False)
    if proc.returncode != 0:
        pytest.skip(f"losetup failed: {proc.stderr.decode(errors='replace').strip()}")
    dev = proc.stdout.decode().strip()
    yield dev
    run(["losetup", "-d", dev], check=False)


def test_block_device(loop_device, small_image):
    """A block device goes through the page cache by default; the data is the same."""
    _, nodes = small_image
    with xipfs.open(loop_device) as fs:
        assert not fs.is_xip
        treegen.check_against_tree(fs, nodes, 4096)


# -- a very big directory ------------------------------------------------------------------------
N_BIG = 10_000


@pytest.fixture(scope="module")
def big_dir_image(shm_dir):
    work = tempfile.mkdtemp(dir=shm_dir)
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "big"))
    names = []
    for i in range(N_BIG):
        name = f"{i:05d}-" + "abcdefghij"[i % 10] * (i % 60) + ("-ü" if i % 9 == 0 else "")
        with open(os.path.join(src, "big", name), "w") as f:
            f.write(name)
        names.append(name)
    img = mkfs(os.path.join(work, "img"), "64M", src=src, bs=1024, extra=("-N", "12000"))
    assert_fsck_clean(img, exit_only=True)
    yield img, names
    shutil.rmtree(work)


def _check_big_dir(img: str, names: list[str], xip: bool) -> None:
    with open_image(img, xip) as fs:
        listed = fs.listdir("/big")
        assert len(listed) == N_BIG and set(listed) == set(names)
        inos = set()
        with fs.scandir("/big") as it:
            for e in it:
                st_ = fs.stat("/big/" + e.name)
                assert st_.st_ino == e.inode() and stat.S_ISREG(st_.st_mode)
                assert st_.st_size == len(e.name.encode())
                inos.add(st_.st_ino)
        assert len(inos) == N_BIG
        for name in names[::37]:
            assert fs.read_text("/big/" + name, encoding="utf-8") == name
        for name in ("00000-x", "10000-", "00001", "00001-A", names[5] + "x"):
            assert not fs.exists("/big/" + name)
        ls = debugfs(img, "ls -p /big")
        entries = re.finditer(rb"/(\d+)/[0-7]+/-?\d+/-?\d+/([^/]*)/\d*/\n", ls)
        want = {m[2].decode(): int(m[1]) for m in entries if m[2] not in (b".", b"..")}
        assert {n: fs.lstat("/big/" + n).st_ino for n in names[::101]} == {n: want[n] for n in names[::101]}


@BOTH
def test_directory_with_10000_entries(big_dir_image, xip):
    img, names = big_dir_image
    _check_big_dir(img, names, xip)


@BOTH
def test_directory_with_10000_entries_indexed_by_e2fsck(big_dir_image, workdir, xip):
    img, names = big_dir_image
    copy = os.path.join(workdir, "indexed.img")
    shutil.copyfile(img, copy)
    e2fsck(copy, "-fyD")
    assert_fsck_clean(copy, exit_only=True)
    assert inode_flags(copy, "/big") & 0x1000
    _check_big_dir(copy, names, xip)


# -- where the image lives -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_image(small_tree, shm_dir):
    src, nodes = small_tree
    img = mkfs(os.path.join(shm_dir, "small.img"), "16M", src=src, bs=4096)
    assert_fsck_clean(img, exit_only=True)
    yield img, nodes
    os.unlink(img)


def test_posix_shared_memory_by_name(small_image):
    img, nodes = small_image
    name = f"xipfs-tests-shm-{os.getpid()}"
    shm = "/dev/shm/" + name
    shutil.copyfile(img, shm)
    try:
        for spelling in (name, "/" + name):
            with xipfs.open(spelling) as fs:
                assert fs.is_xip
                treegen.check_against_tree(fs, nodes, 4096)
                mem = fs.get_xip_mem("/sizes/f4097", 1)
                assert mem is not None and mem.readonly
        with pytest.raises(ValueError):
            xipfs.open(name, xip=False)
    finally:
        os.unlink(shm)


def _fstype(path: str) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()


def test_disk_image_is_not_xip(small_image):
    img, nodes = small_image
    for base in ("/var/tmp", "/tmp", os.path.expanduser("~")):
        if os.path.isdir(base) and os.access(base, os.W_OK) and _fstype(base) not in ("tmpfs", "ramfs"):
            break
    else:
        pytest.skip("no writable directory on a disk (every candidate is tmpfs)")
    work = tempfile.mkdtemp(prefix="xipfs-tests-", dir=base)
    try:
        disk = os.path.join(work, "disk.img")
        shutil.copyfile(img, disk)
        with xipfs.open(disk) as fs:
            assert not fs.is_xip                       # auto-detected: a disk goes through the cache
            treegen.check_against_tree(fs, nodes, 4096)
            plain = fs.read_bytes("/sizes/f65537")
        for spelling in (pathlib.Path(disk), os.fsencode(disk)):
            with xipfs.open(spelling) as fs:
                assert not fs.is_xip
                assert fs.read_bytes("/sizes/f65537") == plain
        with xipfs.open(disk, xip=True) as fs:         # forced: mapped anyway
            assert fs.is_xip
            treegen.check_against_tree(fs, nodes, 4096)
            assert fs.read_bytes("/sizes/f65537") == plain
        with xipfs.open(img) as fs:                    # and the tmpfs original is XIP by itself
            assert fs.is_xip
    finally:
        shutil.rmtree(work)
