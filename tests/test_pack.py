"""xipfs.pack: trees of every kind packed into images that e2fsck finds clean and that read back
exactly (names, data, modes, owners, nanosecond times, links, xattrs, holes), with each file's
data in one run."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import marshal
import os
import shutil
import stat
import sys
import sysconfig

import pytest
import treegen
from conftest import kernel_snapshot, mounted
from e2fs import assert_fsck_clean

import xipfs
from xipfs.device import MemoryDevice

IMAGE_PARAMS = [(1024, 128), (2048, 256), (4096, 128), (4096, 256)]


@pytest.fixture
def work(shm_dir, request):
    path = os.path.join(shm_dir, "pack-" + request.node.name.replace("/", "_")[:60])
    os.makedirs(path)
    yield path
    try:
        for top, _, names in os.walk(path):                 # every image a test leaves is clean
            for name in names:
                if name.endswith(".img"):
                    assert_fsck_clean(os.path.join(top, name), exit_only=True)
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_times_ns(fs: xipfs.Filesystem, nodes: dict[bytes, treegen.Node], isize: int) -> None:
    """Every time kept to the nanosecond (mke2fs -d keeps seconds; pack keeps what the inode
    can: nanoseconds in large inodes, seconds in 128-byte ones), the source's ctime included."""
    unit = 1 if isize > 128 else 10**9
    for path, node in nodes.items():
        src = os.lstat(node.src)
        got = fs.lstat(path)
        want = tuple(t // unit * unit for t in (src.st_mtime_ns, src.st_atime_ns, src.st_ctime_ns))
        assert (got.st_mtime_ns, got.st_atime_ns, got.st_ctime_ns) == want, path


def _pack_and_check(src: bytes, img: str, nodes: dict, bs: int, isize: int, **kw) -> xipfs.PackResult:
    result = xipfs.pack(src, img, block_size=bs, inode_size=isize, **kw)
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img) as fs:
        treegen.check_names(fs, nodes)
        treegen.check_lstat(fs, nodes, bs, times=False)
        treegen.check_hardlinks(fs, nodes)
        treegen.check_symlinks(fs, nodes)
        treegen.check_content(fs, nodes)
        treegen.check_xattrs(fs, nodes)
        _check_times_ns(fs, nodes, isize)
        root = fs.lstat("/")
        src_root = os.lstat(src)
        assert (root.st_mode, root.st_uid, root.st_gid) == (src_root.st_mode, src_root.st_uid,
                                                            src_root.st_gid)
    return result


@pytest.mark.parametrize(("bs", "isize"), IMAGE_PARAMS, ids=[f"bs{b}-i{i}" for b, i in IMAGE_PARAMS])
def test_generated_tree_round_trips(tree_src, work, bs, isize):
    """The standard generated tree (every kind of entry, names, sizes, holes at the indirect
    boundaries, xattrs and ACLs, hard links) packs clean and reads back exactly."""
    src, nodes = tree_src
    img = os.path.join(work, "t.img")
    result = _pack_and_check(src, img, nodes, bs, isize)
    assert result.skipped == []
    kinds = [n.kind for n in nodes.values()]
    assert result.dirs == kinds.count("dir") + 1                 # + lost+found
    assert result.symlinks == kinds.count("lnk")
    others = {n.src_ino for n in nodes.values() if n.kind in ("fifo", "chr", "blk", "sock")}
    assert result.others == len(others)
    regular = {n.src_ino for n in nodes.values() if n.kind == "reg"}
    assert result.files == len(regular)
    names = sum(1 for n in nodes.values() if n.kind != "dir")
    assert result.hardlinks == names - len(regular) - len(others) - result.symlinks
    assert result.size == os.path.getsize(img)


def test_files_are_contiguous_and_sparse_files_stay_sparse(tree_src, work):
    """Each file's data is one run of device blocks (holes aside); holes stay holes."""
    src, nodes = tree_src
    img = os.path.join(work, "t.img")
    xipfs.pack(src, img)
    with xipfs.open(img) as fs:
        for path, node in nodes.items():
            if node.kind != "reg" or node.size == 0:
                continue
            runs = [r for r in fs.block_runs(path) if r[2]]
            dev_runs = []
            for lblk, n, pblk in runs:                   # join runs continuing on the device
                if dev_runs and dev_runs[-1][1] == pblk and dev_runs[-1][2] == lblk:
                    dev_runs[-1] = (dev_runs[-1][0], pblk + n, lblk + n)
                else:
                    dev_runs.append((pblk, pblk + n, lblk + n))
            src_blocks = os.lstat(node.src).st_blocks
            if src_blocks * 512 >= node.size:            # dense: a single run
                assert len(dev_runs) == 1, (path, runs)
            else:                                        # sparse: no more data than the source
                assert fs.lstat(path).st_blocks <= src_blocks + 16 * (4096 // 512) + 8, path


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_trees(work, seed):
    """Seeded random trees (names, sizes, nesting) pack clean at the size pack picks."""
    src = os.fsencode(os.path.join(work, "src"))
    rng = treegen.random.Random(seed)
    b = treegen.TreeBuilder(src, rng)
    treegen.random_tree(b, "", 150)
    b.finish()
    nodes = treegen.record_tree(src)
    bs = (1024, 2048, 4096)[seed % 3]
    _pack_and_check(src, os.path.join(work, "r.img"), nodes, bs, 256)


def test_stdlib_tree(work):
    """A real tree: this Python's standard library (site-packages left out)."""
    stdlib = sysconfig.get_paths()["stdlib"]
    src = os.path.join(work, "stdlib")
    shutil.copytree(stdlib, src, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter"))
    img = os.path.join(work, "std.img")
    result = xipfs.pack(src, img)
    assert result.skipped == []
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img) as fs:
        count = 0
        for top, dirs, files in os.walk(src):
            rel = os.path.relpath(top, src)
            inner = "/" if rel == "." else "/" + rel
            extra = ["lost+found"] if inner == "/" else []
            assert sorted(fs.listdir(inner)) == sorted(dirs + files + extra)
            for name in files:
                p = os.path.join(top, name)
                if os.path.islink(p):
                    assert fs.readlink(inner.rstrip("/") + "/" + name) == os.readlink(p)
                    continue
                with open(p, "rb") as f:
                    assert fs.read_bytes(inner.rstrip("/") + "/" + name) == f.read(), p
                count += 1
        assert count == result.files


def test_size_and_extra(tree_src, work):
    """size=None fits the tree plus ``extra``; an explicit size too small is ENOSPC before the
    target is touched; an int ``extra`` is bytes."""
    src, nodes = tree_src
    img = os.path.join(work, "a.img")
    small = xipfs.pack(src, img, extra=0.0)
    with xipfs.open(img) as fs:
        tight = fs.statvfs("/").f_bfree
    roomy = xipfs.pack(src, img, extra=64 << 20)
    with xipfs.open(img) as fs:
        assert fs.statvfs("/").f_bfree * 4096 >= 64 << 20
        assert fs.statvfs("/").f_bavail == fs.statvfs("/").f_bfree     # no root-reserved blocks
    assert roomy.size > small.size and tight * 4096 < 8 << 20
    with open(img, "wb") as f:
        f.write(b"keep me")
    with pytest.raises(OSError) as err:
        xipfs.pack(src, img, size=small.size // 4)
    assert err.value.errno == errno.ENOSPC
    with open(img, "rb") as f:
        assert f.read() == b"keep me"
    xipfs.pack(src, img, size=small.size + (16 << 20))
    assert os.path.getsize(img) == small.size + (16 << 20)
    assert_fsck_clean(img, exit_only=True)


def test_targets_shm_name_and_device(tree_src, work):
    src, nodes = tree_src
    name = f"/xipfs-pack-test-{os.getpid()}"
    try:
        xipfs.pack(src, name, block_size=4096)
        with xipfs.open(name) as fs:
            treegen.check_content(fs, nodes)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink("/dev/shm" + name)
    dev = MemoryDevice.anonymous(64 << 20)
    try:
        xipfs.pack(src, dev)
        with xipfs.open(dev) as fs:
            treegen.check_content(fs, nodes)
    finally:
        dev.close()


def test_non_memory_target_and_reuse_of_old_bytes(tree_src, work, tmp_path):
    """A disk file goes through the classic path; a reused device shows no old bytes past EOF."""
    src, nodes = tree_src
    img = str(tmp_path / "disk.img")
    xipfs.pack(src, img)
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img, xip=False) as fs:
        treegen.check_content(fs, nodes)
    dev = MemoryDevice.anonymous(64 << 20)
    try:
        dev.write(b"\xee" * (64 << 20), 0)
        xipfs.pack(src, dev)
        with xipfs.open(dev) as fs:
            for path, node in nodes.items():
                if node.kind == "reg" and node.size % 4096:
                    end = (node.size - 1) // 4096
                    lblk, n, pblk = next(r for r in fs.block_runs(path) if r[0] <= end < r[0] + r[1])
                    if not pblk:
                        continue                         # the file ends in a hole
                    last = pblk + end - lblk
                    tail = bytes(dev.view(last * 4096 + node.size % 4096, 4096 - node.size % 4096))
                    assert tail == bytes(len(tail)), path
    finally:
        dev.close()


def test_changed_and_vanished_files_are_reported(work):
    """Files that change or vanish after the scan are packed empty and named in ``skipped``."""
    src = os.path.join(work, "src")
    os.makedirs(src)
    for name in ("a", "b", "c", "d"):
        with open(os.path.join(src, name), "wb") as f:
            f.write(name.encode() * 10000)
    img = os.path.join(work, "c.img")
    calls = []

    def meddle(done: int, total: int) -> None:            # called after each file is copied
        calls.append((done, total))
        if len(calls) == 1:
            with open(os.path.join(src, "c"), "ab") as f:
                f.write(b"more")
            os.unlink(os.path.join(src, "d"))

    result = xipfs.pack(src, img, progress=meddle)
    reasons = dict(result.skipped)
    assert "changed" in reasons[os.path.join(src, "c")]
    assert "vanished" in reasons[os.path.join(src, "d")]
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/a") == b"a" * 10000 and fs.read_bytes("/b") == b"b" * 10000
        assert fs.read_bytes("/c") == b"" and fs.read_bytes("/d") == b""
        assert fs.lstat("/c").st_blocks == 0
    assert calls[-1][1] == 40000 and all(d <= t for d, t in calls)


def test_progress_counts_bytes(tree_src, work):
    src, nodes = tree_src
    seen = []
    result = xipfs.pack(src, os.path.join(work, "p.img"), progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1] == (result.bytes, result.bytes)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_compile_adds_valid_bytecode(work):
    """``compile=True``: a timestamp pyc beside each module, valid for the source as stored,
    naming the path inside the image; a module that does not compile is reported."""
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "pkg"))
    with open(os.path.join(src, "pkg", "__init__.py"), "w") as f:
        f.write("VALUE = 41 + 1\n")
    with open(os.path.join(src, "pkg", "broken.py"), "w") as f:
        f.write("def (:\n")
    img = os.path.join(work, "c.img")
    result = xipfs.pack(src, img, compile=True)
    assert [p for p, _ in result.skipped] == [os.path.join(src, "pkg", "broken.py") + " (bytecode)"]
    assert_fsck_clean(img, exit_only=True)
    tag = sys.implementation.cache_tag
    from importlib._bootstrap_external import _validate_timestamp_pyc

    with xipfs.open(img) as fs:
        assert fs.listdir("/pkg/__pycache__") == [f"__init__.{tag}.pyc"]
        pyc = fs.read_bytes(f"/pkg/__pycache__/__init__.{tag}.pyc")
        assert pyc[:4] == importlib.util.MAGIC_NUMBER
        st = fs.stat("/pkg/__init__.py")
        _validate_timestamp_pyc(pyc, int(st.st_mtime), st.st_size, "pkg", {})
        code = marshal.loads(pyc[16:])
        assert code.co_filename == "/pkg/__init__.py"
        ns: dict = {}
        exec(code, ns)
        assert ns["VALUE"] == 42


def test_source_lost_found_and_image_inside_tree(work):
    """A lost+found in the tree is the image's lost+found; the image inside the tree is left out."""
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "lost+found"))
    with open(os.path.join(src, "lost+found", "kept"), "wb") as f:
        f.write(b"x")
    img = os.path.join(src, "self.img")
    assert xipfs.pack(src, img).skipped == []            # made after the scan: not seen
    result = xipfs.pack(src, img)                        # there now: left out, and said so
    assert result.skipped == [(img, "the image being written")]
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img) as fs:
        assert fs.lstat("/lost+found").st_ino == 11
        assert fs.read_bytes("/lost+found/kept") == b"x"
        assert "self.img" not in fs.listdir("/")


def test_exclude_patterns(work):
    """Patterns match names anywhere, or paths from the top; excluded directories are not entered."""
    src = os.path.join(work, "src")
    for rel in ("a/site-packages/x.py", "a/keep.py", "a/keep.o", "build/tmp/junk", "build/out", "top.o"):
        os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
        with open(os.path.join(src, rel), "w") as f:
            f.write(rel)
    img = os.path.join(work, "e.img")
    xipfs.pack(src, img, exclude=["site-packages", "*.o", "build/tmp"])
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img) as fs:
        found = sorted(top.rstrip("/") + "/" + n for top, _, files in fs.walk("/") for n in files)
    assert found == ["/a/keep.py", "/build/out"]


def test_bad_sources(work):
    with pytest.raises(FileNotFoundError):
        xipfs.pack(os.path.join(work, "missing"), os.path.join(work, "x.img"))
    path = os.path.join(work, "file")
    open(path, "w").close()
    with pytest.raises(NotADirectoryError):
        xipfs.pack(path, os.path.join(work, "x.img"))
    assert not os.path.exists(os.path.join(work, "x.img"))


def test_large_directory_and_triple_indirect(work):
    """A directory past the direct blocks, and a sparse file reaching the triple indirect
    block with 1 KiB blocks."""
    src = os.path.join(work, "src")
    os.makedirs(os.path.join(src, "many"))
    for i in range(600):
        open(os.path.join(src, "many", f"entry-with-a-longish-name-{i:05}"), "w").close()
    with open(os.path.join(src, "far"), "wb") as f:
        f.write(b"start")
        f.seek((12 + 256 + 256 * 256 + 5) * 1024)
        f.write(b"end")
    img = os.path.join(work, "l.img")
    xipfs.pack(src, img, block_size=1024)
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img) as fs:
        assert len(fs.listdir("/many")) == 600
        assert fs.lstat("/many").st_size > 12 * 1024
        with fs.open("/far", "rb") as f:
            assert f.read(5) == b"start"
            f.seek((12 + 256 + 256 * 256 + 5) * 1024)
            assert f.read() == b"end"
        assert fs.lstat("/far").st_blocks <= 2 * 8 + 3 * 2     # two tmpfs pages, three map blocks


@pytest.mark.root
def test_linux_mounts_packed_image(tree_src, work):
    """Linux's own ext2 reads the packed image as xipfs does (loop mount; skipped without)."""
    src, nodes = tree_src
    img = os.path.join(work, "m.img")
    xipfs.pack(src, img)
    with mounted(img, "ext2") as where:
        snap = kernel_snapshot(where)
    with xipfs.open(img) as fs:
        treegen.check_against_kernel(fs, snap)
    assert stat.S_ISDIR(snap[b"/lost+found"]["stat"].st_mode)


@pytest.mark.parametrize("bs", [1024, 4096])
def test_pack_then_unpack_gives_the_tree_back(tree_src, work, bs):
    """pack, then unpack: the same names, kinds, contents, modes, owners, nanosecond times,
    hard-link groups, symlink targets, xattrs and holes as the source."""
    src, nodes = tree_src
    img = os.path.join(work, "rt.img")
    xipfs.pack(src, img, block_size=bs)
    dest = os.path.join(work, "out")
    result = xipfs.unpack(img, dest)
    assert result.skipped == []
    back = treegen.record_tree(dest)
    assert set(back) == set(nodes)
    groups_src: dict[int, set] = {}
    groups_back: dict[int, set] = {}
    for path, node in nodes.items():
        got = back[path]
        assert (got.kind, got.size, got.mode, got.uid, got.gid, got.rdev, got.target, got.sha256,
                got.xattrs) == (node.kind, node.size, node.mode, node.uid, node.gid, node.rdev,
                                node.target, node.sha256, node.xattrs), path
        a, b = os.lstat(node.src), os.lstat(got.src)
        if node.kind != "lnk":                       # symlink times: lutimes is best effort
            assert (b.st_mtime_ns, b.st_atime_ns) == (a.st_mtime_ns, a.st_atime_ns), path
        if node.kind == "reg":
            assert b.st_blocks <= a.st_blocks + 8, path        # holes stay holes
            groups_src.setdefault(node.src_ino, set()).add(path)
            groups_back.setdefault(got.src_ino, set()).add(path)
    assert sorted(map(sorted, groups_src.values())) == sorted(map(sorted, groups_back.values()))


def test_repacking_replaces_the_image_whole(work):
    """A new image replaces the old one in one rename: a mapping of the old image keeps its
    bytes, a pack that fails half-way leaves the old image as it was, and no file is left over."""
    src = os.path.join(work, "src")
    os.makedirs(src)
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"old" * 5000)
    img = os.path.join(work, "r.img")
    xipfs.pack(src, img)
    os.chmod(img, 0o640)
    old = xipfs.open(img)
    m = old.mmap("/f")
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"new" * 5000)
    for i in range(100):                                 # enough files for the progress to run
        with open(os.path.join(src, f"g{i}"), "wb") as f:
            f.write(b"x")

    def fail(done: int, total: int) -> None:
        if done > 15000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        xipfs.pack(src, img, progress=fail)
    assert sorted(os.listdir(work)) == ["r.img", "src"]
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/f") == b"old" * 5000
    xipfs.pack(src, img)
    assert os.stat(img).st_mode & 0o777 == 0o640
    assert bytes(m[:6]) == b"oldold"                      # the old image, still mapped, unchanged
    m.close()
    old.close()
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/f") == b"new" * 5000
    assert_fsck_clean(img, exit_only=True)


def test_64k_blocks_with_many_entries(work):
    """A directory of several 64 KiB blocks: only an entry that fills a whole block stores its
    rec_len as 0; the last entry of a fuller block stores its real length."""
    src = os.path.join(work, "many64")
    os.makedirs(os.path.join(src, "d"))
    for i in range(3000):
        with open(os.path.join(src, "d", f"file-with-a-long-name-{i}"), "w") as f:
            f.write(str(i))
    img = os.path.join(work, "p64.img")
    xipfs.pack(src, img, block_size=65536)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert len(fs.listdir("/d")) == 3000
        assert fs.read_text("/d/file-with-a-long-name-2999") == "2999"


# -- many files: copied first, the inodes made after ---------------------------------------------

def _many_files(src: str, count: int = 160, size: int = 40_000) -> dict[str, bytes]:
    """``count`` files of ``size`` bytes (a few MiB), each its own bytes, some in a
    subdirectory; name -> content."""
    os.makedirs(os.path.join(src, "sub"))
    out = {}
    for i in range(count):
        name = f"sub/f{i:03d}" if i % 3 == 0 else f"f{i:03d}"
        data = (f"{i:05d}".encode() * (size // 5 + 1))[:size - i]
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
        out[name] = data
    return out


@pytest.mark.parametrize("fs_type", ["ext2", "ext4"])
def test_many_files_arrive_exactly(work, fs_type):
    """A tree of a few MiB: every file arrives exactly and the image is e2fsck-clean."""
    src = os.path.join(work, "src")
    files = _many_files(src)
    img = os.path.join(work, "p.img")
    result = xipfs.pack(src, img, fs_type=fs_type, progress=False)
    assert not result.skipped and result.files == len(files)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        for name, data in files.items():
            assert fs.read_bytes("/" + name) == data, name


@pytest.mark.parametrize("fs_type", ["ext2", "ext4"])
def test_changed_and_vanished_first_middle_and_last(work, monkeypatch, fs_type):
    """Files that vanish or change after the scan, the first, one in the middle and the last:
    packed empty (their inodes made again after the others), their blocks free, reported once."""
    import xipfs.tools.pack as pack_mod
    import xipfs.tools.pack4 as pack4_mod

    src = os.path.join(work, "src")
    files = _many_files(src)
    mod = pack4_mod if fs_type == "ext4" else pack_mod
    number = mod._number
    first, middle, last = "sub/f000", "f100", "f158"

    def meddle(root, result):                         # after the scan, before any copy
        nodes = number(root, result)
        os.unlink(os.path.join(src, first))
        os.unlink(os.path.join(src, last))
        with open(os.path.join(src, middle), "ab") as f:
            f.write(b"more")
        return nodes

    monkeypatch.setattr(mod, "_number", meddle)
    img = os.path.join(work, "v.img")
    result = xipfs.pack(src, img, fs_type=fs_type, progress=False)
    reasons = [(os.path.relpath(path, src), why) for path, why in result.skipped]
    assert sorted(reasons) == sorted([(first, "vanished while packing: packed empty"),
                                      (last, "vanished while packing: packed empty"),
                                      (middle, "changed while packing: packed empty")])
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        for name, data in files.items():
            if name in (first, middle, last):
                assert fs.read_bytes("/" + name) == b"" and fs.lstat("/" + name).st_blocks == 0
            else:
                assert fs.read_bytes("/" + name) == data, name
