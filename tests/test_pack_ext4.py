"""xipfs.pack(fs_type="ext4"): the generated tree packed as ext4 (1 KiB and 4 KiB blocks, with and
without metadata_csum) is e2fsck-clean, reads back exactly (xipfs and a Linux mount), maps each
file of one run as one extent, and Linux can write into it."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import treegen
from conftest import kernel_snapshot, mounted
from e2fs import assert_fsck_clean, debugfs, dumpe2fs_header, mkfs

import xipfs

#: (block size, inode size, features)
PARAMS = [(1024, 256, None), (4096, 256, None), (4096, 256, "^metadata_csum"), (1024, 128, None)]
IDS = ["bs1024", "bs4096", "bs4096-nocsum", "bs1024-i128"]


@pytest.fixture
def work(shm_dir, request):
    path = os.path.join(shm_dir, "pack4-" + request.node.name.replace("/", "_")[:60])
    os.makedirs(path)
    yield path
    try:
        for top, _, names in os.walk(path):                 # every image a test leaves is clean
            for name in names:
                if name.endswith(".img"):
                    assert_fsck_clean(os.path.join(top, name))
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_times_ns(fs: xipfs.Filesystem, nodes: dict[bytes, treegen.Node], isize: int) -> None:
    """Every time kept to the nanosecond in large inodes (seconds in 128-byte ones)."""
    unit = 1 if isize > 128 else 10**9
    for path, node in nodes.items():
        src = os.lstat(node.src)
        got = fs.lstat(path)
        want = tuple(t // unit * unit for t in (src.st_mtime_ns, src.st_atime_ns, src.st_ctime_ns))
        assert (got.st_mtime_ns, got.st_atime_ns, got.st_ctime_ns) == want, path


def _extents(img: str, inos: list[int]) -> dict[int, list[tuple[int, int, int, int]]]:
    """``debugfs ex`` of each inode: [(level, first file block, first device block, length)]."""
    out = debugfs(img, *[f"ex <{i}>" for i in inos]).decode(errors="replace")
    result: dict[int, list] = {}
    current: list | None = None
    for line in out.splitlines():
        if line.startswith("debugfs: ex <"):
            current = result.setdefault(int(line[len("debugfs: ex <"):-1]), [])
            continue
        m = re.match(r"\s*(\d+)/\s*\d+\s+\d+/\s*\d+\s+(\d+) -\s*\d+\s+(\d+)(?: -\s*\d+)?\s+(\d+)", line)
        if m and current is not None:
            current.append(tuple(int(x) for x in m.groups()))
    return result


@pytest.mark.parametrize(("bs", "isize", "features"), PARAMS, ids=IDS)
def test_generated_tree_round_trips(tree_src, work, bs, isize, features):
    """The standard tree packs e2fsck-clean and reads back exactly: names, kinds, modes, owners,
    nanosecond times, xattrs, hard links, device numbers, symlinks, contents, holes."""
    src, nodes = tree_src
    img = os.path.join(work, "t.img")
    result = xipfs.pack(src, img, fs_type="ext4", block_size=bs, inode_size=isize, features=features)
    assert result.skipped == []
    assert result.size == os.path.getsize(img)
    assert_fsck_clean(img)
    head = dumpe2fs_header(img)
    feats = head["Filesystem features"].split()
    assert {"extent", "flex_bg", "has_journal", "64bit", "orphan_file"} <= set(feats)
    assert ("metadata_csum" in feats) == (features is None)
    assert int(head["Block size"]) == bs and int(head["Inode size"]) == isize
    with xipfs.open(img) as fs:
        assert fs.volume.sb.s_feature_incompat & 0x40                 # extents
        treegen.check_names(fs, nodes)
        treegen.check_lstat(fs, nodes, bs, times=False)
        treegen.check_hardlinks(fs, nodes)
        treegen.check_symlinks(fs, nodes)
        treegen.check_content(fs, nodes)
        treegen.check_xattrs(fs, nodes)
        _check_times_ns(fs, nodes, isize)
        root, src_root = fs.lstat("/"), os.lstat(src)
        assert (root.st_mode, root.st_uid, root.st_gid) == (src_root.st_mode, src_root.st_uid,
                                                            src_root.st_gid)
        for path, node in nodes.items():                            # holes stay holes
            if node.kind == "reg":
                assert fs.lstat(path).st_blocks <= os.lstat(node.src).st_blocks + 8 + 2 * bs // 512, path
    kinds = [n.kind for n in nodes.values()]
    assert result.dirs == kinds.count("dir") + 1                    # + lost+found
    assert result.symlinks == kinds.count("lnk")
    assert result.files == len({n.src_ino for n in nodes.values() if n.kind == "reg"})


@pytest.mark.parametrize("bs", [1024, 4096])
def test_files_of_one_run_are_one_extent(tree_src, work, bs):
    """debugfs sees every dense file as one extent run (split only where a run passes the
    journal or a group's metadata, or at 32768 blocks), and sparse files' data as extents."""
    src, nodes = tree_src
    img = os.path.join(work, "e.img")
    xipfs.pack(src, img, fs_type="ext4", block_size=bs)
    regular = [p for p, n in nodes.items() if n.kind == "reg" and n.size]
    with xipfs.open(img) as fs:
        inos = {p: fs.lstat(p).st_ino for p in regular}
    ext = _extents(img, sorted(set(inos.values())))
    split = 0
    for path in regular:
        node = nodes[path]
        runs = ext[inos[path]]
        assert all(level == 0 for level, *_ in runs), path
        dense = os.lstat(node.src).st_blocks * 512 >= node.size
        assert runs or not dense, path
        if dense:
            assert runs[0][1] == 0 and sum(n for *_, n in runs) == -(-node.size // bs), path
            joined = all(a[2] + a[3] == b[2] for a, b in zip(runs, runs[1:], strict=False))
            if len(runs) == 1 or joined:
                continue
            split += 1                                          # crosses a metadata or journal gap
    assert split <= 2


def test_extent_tree_blocks(work):
    """A file with more extents than the inode holds gets leaf blocks (and an index level at
    1 KiB blocks: 400 extents > 4 leaves of 84); a big directory spans many blocks."""
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "many"))
    with open(os.path.join(src, "frag"), "wb") as f:
        for i in range(400):
            f.seek(i * 8192)
            f.write(b"%05d" % i * 100)
    for i in range(700):
        open(os.path.join(src, "many", f"entry-with-a-long-name-{i:04d}"), "wb").close()
    for bs, depth in ((1024, 2), (4096, 1)):
        img = os.path.join(work, f"x{bs}.img")
        xipfs.pack(src, img, fs_type="ext4", block_size=bs)
        assert_fsck_clean(img)
        out = debugfs(img, "ex /frag").decode()
        assert f" 0/ {depth} " in out
        with xipfs.open(img) as fs, open(os.path.join(src, "frag"), "rb") as f:
            assert fs.read_bytes("/frag") == f.read()
            assert len(fs.listdir("/many")) == 700
            assert fs.lstat("/many").st_size >= 6 * bs


@pytest.mark.root
def test_linux_reads_the_packed_image(tree_src, work):
    """Linux's ext4 (read-only loop mount) sees what xipfs sees."""
    src, nodes = tree_src
    img = os.path.join(work, "m.img")
    xipfs.pack(src, img, fs_type="ext4")
    with mounted(img, "ext4") as where:
        snap = kernel_snapshot(where)
    with xipfs.open(img) as fs:
        treegen.check_against_kernel(fs, snap)
    assert set(snap) == {b"/", b"/lost+found"} | set(nodes)


@pytest.mark.root
@pytest.mark.parametrize("bs", [1024, 4096])
def test_linux_writes_into_the_packed_image(tree_src, work, bs):
    """Linux mounts the image read-write and writes into it (new files, appends, removals,
    renames); the image stays e2fsck-clean and xipfs reads the result."""
    src, _ = tree_src
    img = os.path.join(work, "w.img")
    xipfs.pack(src, img, fs_type="ext4", block_size=bs, extra=4 << 20)
    with mounted(img, "ext4", options="rw") as where:
        os.makedirs(os.path.join(where, "new/dir"))
        with open(os.path.join(where, "new/dir/file"), "wb") as f:
            f.write(os.urandom(300_000))
        with open(os.path.join(where, "sizes/f1"), "ab") as f:
            f.write(b"appended")
        shutil.rmtree(os.path.join(where, "rand"))
        os.rename(os.path.join(where, "deep"), os.path.join(where, "new/deep"))
        os.setxattr(os.path.join(where, "new/dir/file"), "user.k", b"v")
        with open(os.path.join(where, "new/dir/file"), "rb") as f:
            data = f.read()
        with open(os.path.join(where, "sizes/f1"), "rb") as f:
            f1 = f.read()
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/new/dir/file") == data
        assert fs.read_bytes("/sizes/f1") == f1
        assert fs.getxattr("/new/dir/file", "user.k") == b"v"
        assert not fs.exists("/rand") and fs.isdir("/new/deep")


def test_geometry_as_mke2fs(tree_src, work):
    """At a given size the filesystem is mke2fs -t ext4's (-m 0, upstream features): the same
    blocks, inodes, groups, reserved GDT, journal and orphan file."""
    src, _ = tree_src
    ours, theirs = os.path.join(work, "ours.img"), os.path.join(work, "theirs.img")
    size = 48 << 20
    xipfs.pack(src, ours, fs_type="ext4", size=size, block_size=4096)
    mkfs(theirs, "48M", bs=4096, src=src, fstype="ext4",
         extra=("-m", "0", "-O", "orphan_file,metadata_csum_seed"))
    a, b = dumpe2fs_header(ours), dumpe2fs_header(theirs)
    for key in ("Filesystem features", "Block count", "Inode count", "Blocks per group", "Inodes per group",
                "Reserved GDT blocks", "Inode blocks per group", "Flex block group size",
                "Journal size", "Reserved block count", "First inode", "Required extra isize",
                "Default mount options", "Journal inode", "Orphan file inode"):
        assert a.get(key) == b.get(key), key
    assert int(a["Free blocks"]) >= int(b["Free blocks"]) - 16        # no more room taken than mke2fs
    assert a["Free inodes"] == b["Free inodes"]


def test_sizes_targets_and_errors(tree_src, work):
    """size= and extra= work as for ext2; a device target; ENOSPC before the image is touched;
    bad types and features are refused."""
    src, nodes = tree_src
    img = os.path.join(work, "s.img")
    auto = xipfs.pack(src, img, fs_type="ext4")
    roomy = xipfs.pack(src, img, fs_type="ext4", extra=32 << 20)
    assert auto.size < roomy.size and roomy.size >= auto.bytes + (32 << 20)
    with open(img, "rb") as f:
        before = f.read()
    with pytest.raises(OSError) as err:
        xipfs.pack(src, img, fs_type="ext4", size=8 << 20)
    assert err.value.errno == 28
    with open(img, "rb") as f:
        assert f.read() == before
    with pytest.raises(ValueError):
        xipfs.pack(src, img, fs_type="ext3")
    with pytest.raises(ValueError):
        xipfs.pack(src, img, features="^metadata_csum")
    with pytest.raises(ValueError):
        xipfs.pack(src, img, fs_type="ext4", features="bigalloc")
    from xipfs.device import MemoryDevice

    dev = MemoryDevice.anonymous(64 << 20)
    try:
        result = xipfs.pack(src, dev, fs_type="ext4", label="tree",
                            uuid="0b6f3c51-7b5e-4a41-9a4a-8f3c6c2b0d11")
        assert result.size == 64 << 20
        path = os.path.join(work, "dev.img")
        with open(path, "wb") as f:
            f.write(dev.view(0, 64 << 20))
    finally:
        dev.close()
    head = dumpe2fs_header(path)
    assert head["Filesystem volume name"] == "tree"
    assert head["Filesystem UUID"] == "0b6f3c51-7b5e-4a41-9a4a-8f3c6c2b0d11"
    with xipfs.open(path) as fs:
        treegen.check_content(fs, nodes)


def test_cli_pack_type_ext4(tree_src, work):
    """``xipfs pack -t ext4`` (and -O) makes the ext4 image; -t ext2 stays the default."""
    src, nodes = tree_src
    img = os.path.join(work, "c.img")
    proc = subprocess.run([sys.executable, "-m", "xipfs", "pack", "-t", "ext4", "-O", "^metadata_csum",
                           "--block-size", "1024", os.fsdecode(src), img], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    head = dumpe2fs_header(img)
    assert "extent" in head["Filesystem features"] and "metadata_csum" not in head["Filesystem features"]
    with xipfs.open(img) as fs:
        treegen.check_content(fs, nodes)
    plain = os.path.join(work, "p.img")
    subprocess.run([sys.executable, "-m", "xipfs", "pack", os.fsdecode(src), plain], check=True,
                   capture_output=True)
    assert "extent" not in dumpe2fs_header(plain)["Filesystem features"]
    assert stat.S_ISREG(os.stat(plain).st_mode)


def test_changed_and_vanished_files_compile_and_exclude(work):
    """As for ext2: files that change or vanish while packing are packed empty (their blocks
    left free) and reported; compile= adds bytecode; exclude= leaves entries out; progress
    counts the bytes."""
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "skip"))
    for name in ("a", "b", "c", "d"):
        with open(os.path.join(src, name), "wb") as f:
            f.write(name.encode() * 10000)
    with open(os.path.join(src, "mod.py"), "w") as f:
        f.write("X = 42\n")
    img = os.path.join(work, "c.img")
    calls = []

    def meddle(done: int, total: int) -> None:            # called after each file is copied
        calls.append((done, total))
        if len(calls) == 1:
            with open(os.path.join(src, "c"), "ab") as f:
                f.write(b"more")
            os.unlink(os.path.join(src, "d"))

    result = xipfs.pack(src, img, fs_type="ext4", progress=meddle, compile=True, exclude=["skip"])
    reasons = dict(result.skipped)
    assert "changed" in reasons[os.path.join(src, "c")]
    assert "vanished" in reasons[os.path.join(src, "d")]
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/a") == b"a" * 10000 and fs.read_bytes("/b") == b"b" * 10000
        assert fs.read_bytes("/c") == b"" and fs.read_bytes("/d") == b""
        assert fs.lstat("/c").st_blocks == 0
        assert not fs.exists("/skip")
        assert [n for n in fs.listdir("/__pycache__") if n.startswith("mod.")]
    assert calls[-1][1] == result.bytes and all(d <= t for d, t in calls)


VARIANTS = ["^has_journal", "^flex_bg,^64bit", "meta_bg", "^metadata_csum,uninit_bg", "^orphan_file"]


@pytest.mark.parametrize("features", VARIANTS)
def test_feature_variants(tree_src, work, features):
    """Other feature sets (as -O gives them) pack clean and read back."""
    src, nodes = tree_src
    img = os.path.join(work, "v.img")
    xipfs.pack(src, img, fs_type="ext4", block_size=1024, features=features)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        treegen.check_names(fs, nodes)
        treegen.check_content(fs, nodes)
        treegen.check_xattrs(fs, nodes)


def test_tiny_tree_without_journal(work):
    """A tree too small for a journal (under 2048 blocks, as mke2fs) gets neither journal nor
    orphan file, and its inodes start at 12."""
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "d"))
    with open(os.path.join(src, "d", "f"), "wb") as f:
        f.write(b"tiny")
    img = os.path.join(work, "t.img")
    xipfs.pack(src, img, fs_type="ext4")
    assert_fsck_clean(img)
    feats = dumpe2fs_header(img)["Filesystem features"].split()
    assert "has_journal" not in feats and "orphan_file" not in feats
    with xipfs.open(img) as fs:
        assert fs.lstat("/d").st_ino == 12 and fs.read_bytes("/d/f") == b"tiny"
