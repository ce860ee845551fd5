"""xipfs.unpack: trees come back exactly (names, data, holes, modes, owners, nanosecond times,
hard links, symlink targets, special files, xattrs), and no image, however hostile, and no
destination, however booby-trapped, makes it write outside ``dest_dir``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable

import pytest
import treegen
from e2fs import assert_fsck_clean, debugfs_r, mkfs, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xipfs
from xipfs.tools.unpack import UnpackResult, unpack

#: The module (``xipfs.unpack`` is the function).
unpack_mod = sys.modules[unpack.__module__]

IS_ROOT = os.geteuid() == 0
#: Atimes in the future: reading the trees to compare them never moves them (relatime).
FUTURE = 1_900_000_000


@pytest.fixture
def work(shm_dir, request):
    path = os.path.join(shm_dir, "unpack-" + request.node.name.replace("/", "_")[:60])
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def small_tree(shm_dir):
    """The standard generated tree without its big files: (source root, recorded nodes)."""
    root = os.fsencode(os.path.join(shm_dir, "unpack-tree"))
    treegen.build_tree(root, 4242, random_files=40, big=False)
    yield root, treegen.record_tree(root)
    shutil.rmtree(root, ignore_errors=True)


# -- comparing trees ----------------------------------------------------------------------------
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _meta(st: os.stat_result, nlink: bool) -> tuple:
    kind = stat.S_IFMT(st.st_mode)
    size = st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else 0
    rdev = st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else 0
    return (st.st_mode, st.st_uid, st.st_gid, size, st.st_mtime_ns, st.st_atime_ns, rdev,
            st.st_nlink if nlink and kind != stat.S_IFDIR else 0)


def image_snapshot(fs: xipfs.Filesystem, top: bytes = b"/", *, nlink: bool = True) -> dict[bytes, tuple]:
    """``{relative path: (metadata, content, xattrs, inode)}`` of a subtree of an image."""
    out: dict[bytes, tuple] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = fs.lstat(path)
        xattrs = {n: fs.getxattr(path, n, follow_symlinks=False)
                  for n in fs.listxattr(path, follow_symlinks=False)}
        kind = stat.S_IFMT(st.st_mode)
        content = None
        if kind == stat.S_IFREG:
            content = _sha(fs.read_bytes(path))
        elif kind == stat.S_IFLNK:
            content = fs.readlink(path)
        out[rel] = (_meta(st, nlink), content, xattrs, st.st_ino)
        if kind == stat.S_IFDIR:
            for name in fs.listdir(path):
                if path == b"/" and name == b"lost+found" and not fs.listdir(b"/lost+found"):
                    continue
                visit(path.rstrip(b"/") + b"/" + name, rel + b"/" + name)

    visit(top, b"")
    return out


def dest_snapshot(dest: str | bytes, *, nlink: bool = True) -> dict[bytes, tuple]:
    """The same record of a real directory tree (each entry's status taken before reading it)."""
    out: dict[bytes, tuple] = {}

    def visit(path: bytes, rel: bytes) -> None:
        st = os.lstat(path)
        xattrs = {n: os.getxattr(path, n, follow_symlinks=False)
                  for n in os.listxattr(path, follow_symlinks=False)}
        kind = stat.S_IFMT(st.st_mode)
        content = None
        if kind == stat.S_IFREG:
            with open(path, "rb") as f:
                content = _sha(f.read())
        elif kind == stat.S_IFLNK:
            content = os.readlink(path)
        out[rel] = (_meta(st, nlink), content, xattrs, st.st_ino)
        if kind == stat.S_IFDIR:
            for name in sorted(os.listdir(path)):
                visit(path + b"/" + name, rel + b"/" + name)

    visit(os.fsencode(dest), b"")
    return out


def link_groups(snap: dict[bytes, tuple]) -> set[frozenset[bytes]]:
    """The hard-link structure: sets of paths that are one inode (directories left out)."""
    groups: dict[int, set[bytes]] = {}
    for rel, (meta, *_rest, ino) in snap.items():
        if not stat.S_ISDIR(meta[0]):
            groups.setdefault(ino, set()).add(rel)
    return {frozenset(g) for g in groups.values()}


def assert_same_tree(want: dict[bytes, tuple], got: dict[bytes, tuple], *, root_meta: bool = True) -> None:
    assert sorted(got) == sorted(want)
    for rel in want:
        w, g = want[rel][:3], got[rel][:3]
        if rel == b"" and not root_meta:
            w, g = w[1:], g[1:]
        assert g == w, rel
    assert link_groups(got) == link_groups(want)


def tree_snapshot(fs_or_dest, **kw) -> dict[bytes, tuple]:
    return image_snapshot(fs_or_dest, **kw) if isinstance(fs_or_dest, xipfs.Filesystem) else \
        dest_snapshot(fs_or_dest, **kw)


def outside_state(parent: str, dest: str) -> dict[bytes, tuple]:
    """Everything under ``parent`` except ``dest``: to show that unpacking left it alone."""
    state: dict[bytes, tuple] = {}
    for top, dirs, files in os.walk(os.fsencode(parent)):
        if top == os.fsencode(dest) or top.startswith(os.fsencode(dest) + b"/"):
            dirs[:] = []
            continue
        for name in dirs + files:
            p = os.path.join(top, name)
            if p == os.fsencode(dest):
                continue
            st = os.lstat(p)
            data = None
            if stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
            elif stat.S_ISLNK(st.st_mode):
                data = os.readlink(p)
            state[p] = (st.st_mode, st.st_mtime_ns, st.st_ino, data)
    return state


# -- building images with the write API ----------------------------------------------------------
def write_image(img: str, build, size: int = 16 << 20, **kw) -> str:
    """``xipfs.mkfs`` an image, let ``build(fs)`` fill it, check it with ``e2fsck -fn``."""
    xipfs.mkfs(img, size, **kw)
    with xipfs.open(img, "r+") as fs:
        build(fs)
    assert_fsck_clean(img)
    return img


def rich_tree(fs: xipfs.Filesystem) -> None:
    """Every kind of entry, with odd nanosecond times, owners, modes and xattrs."""
    fs.mkdir("/d", 0o755)
    fs.mkdir("/d/sub")
    fs.write_bytes("/d/small", b"small file\n")
    fs.write_bytes("/d/sub/empty", b"")
    big = os.urandom(300_000)                          # copied by the second thread
    fs.write_bytes("/d/big", big)
    fs.write_bytes("/d/mid", os.urandom(70_000))
    with fs.open("/d/sparse", "wb", buffering=0) as f:     # holes at both ends and between
        f.pwrite(b"x" * 5000, 1 << 20)
        f.pwrite(b"y" * 10, (3 << 20) + 77)
        f.truncate(5 << 20)
    with fs.open("/d/all-hole", "wb", buffering=0) as f:
        f.truncate(2 << 20)
    fs.link("/d/small", "/d/sub/small-link")
    fs.link("/d/big", "/big-link")
    fs.symlink("/etc/passwd", "/d/abs-link")           # kept as data, never followed
    fs.symlink("../../outside", "/d/sub/up-link")
    fs.symlink("small", "/d/rel-link")
    fs.mknod("/d/fifo", stat.S_IFIFO | 0o640)
    fs.link("/d/fifo", "/d/sub/fifo-link")
    fs.mknod("/d/sock", stat.S_IFSOCK | 0o600)
    fs.mknod("/d/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    fs.mknod("/d/blk", stat.S_IFBLK | 0o600, os.makedev(259, 70000))
    fs.write_bytes("/d/modes", b"m")
    fs.chmod("/d/modes", 0o4751)
    fs.write_bytes("/d/sticky", b"s")
    fs.chmod("/d/sticky", 0o1600)
    fs.mkdir("/d/closed")
    fs.write_bytes("/d/closed/inside", b"inside a 000 directory")
    fs.chmod("/d/closed", 0)
    fs.mkdir("/d/setgid")
    fs.chmod("/d/setgid", 0o2775)
    fs.chown("/d/setgid", 0, 4321)
    fs.write_bytes("/d/setgid/f", b"g")
    fs.chown("/d/small", 1000, 1001)
    fs.chown("/d/sub/up-link", 4_000_000_000, 7, follow_symlinks=False)
    fs.chown("/d/fifo", 5, 6)
    fs.setxattr("/d/small", "user.a", b"value a")
    fs.setxattr("/d/small", "user.empty", b"")
    fs.setxattr("/d/modes", "user.m", b"in the inode of a small file")
    fs.setxattr("/d", "user.dir", b"on a directory")
    fs.setxattr("/d/big", "user.big", b"B" * 900)      # in an xattr block
    fs.setxattr("/d/big", "trusted.t", b"trusted")
    fs.setxattr("/d/rel-link", "trusted.l", b"on a symlink", follow_symlinks=False)
    fs.setxattr("/d/fifo", "trusted.f", b"on a fifo")
    fs.write_bytes("/" + "ü" * 127, b"long non-ASCII name")
    fs.write_bytes("/d/" + "L" * 255, b"255 bytes of name")
    times = {"/d": 11, "/d/sub": 12, "/d/small": 13, "/d/big": 14, "/d/sparse": 15, "/d/fifo": 16,
             "/d/abs-link": 17, "/d/sub/up-link": 18, "/d/closed": 19, "/d/setgid": 20, "/": 21,
             "/d/null": 22, "/d/sock": 23}
    for path, k in times.items():
        fs.utime(path, ns=(FUTURE * 10**9 + k * 1_000_003, 1_234_567_890 * 10**9 + k * 123_456_789),
                 follow_symlinks=False)


# -- raw editing of directory entries (what the write API refuses to make) -------------------------
def edit_entry(img: str, directory: str, name: bytes, *, new_name: bytes | None = None,
               new_ino: int | None = None) -> None:
    """Rename (same length) or repoint the entry ``name`` of ``directory`` in the raw image."""
    with xipfs.open(img) as fs:
        bs = fs.block_size
        blocks = [pb + i for _, n, pb in fs.block_runs(directory) for i in range(n)]
    with open(img, "r+b") as f:
        for blk in blocks:
            f.seek(blk * bs)
            buf = bytearray(f.read(bs))
            pos = 0
            while pos < bs:
                ino, rec_len, name_len, _ = struct.unpack_from("<IHBB", buf, pos)
                if ino and bytes(buf[pos + 8:pos + 8 + name_len]) == name:
                    if new_name is not None:
                        assert len(new_name) == len(name)
                        buf[pos + 8:pos + 8 + name_len] = new_name
                    if new_ino is not None:
                        struct.pack_into("<I", buf, pos, new_ino)
                    f.seek(blk * bs)
                    f.write(buf)
                    return
                pos += rec_len
    raise AssertionError(f"no entry {name!r} in {directory}")


def reasons(result: UnpackResult) -> str:
    return "\n".join(f"{p}: {r}" for p, r in result.skipped)


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize(("bs", "isize"), [(1024, 128), (4096, 256)])
def test_mke2fs_tree_round_trips(small_tree, work, bs, isize):
    """The generated tree (every kind of entry, long and non-UTF-8 names, sizes around every block
    boundary, holes, hard links, xattrs and ACLs, owners, modes) packed by ``mke2fs -d`` comes back
    exactly; ``lost+found`` is left out; the counts are right."""
    src, nodes = small_tree
    img = mkfs(os.path.join(work, "t.img"), "24M", bs=bs, isize=isize, src=src)
    dest = os.path.join(work, "out")
    result = unpack(img, dest, progress=False)
    assert result.skipped == [], reasons(result)
    assert_same_tree(dest_snapshot(src), dest_snapshot(dest), root_meta=False)
    kinds = [n.kind for n in nodes.values()]
    inodes = {n.src_ino: n.kind for n in nodes.values()}
    assert result.dirs == kinds.count("dir")
    assert result.files == list(inodes.values()).count("reg")
    assert result.symlinks == kinds.count("lnk")
    assert result.others + result.hardlinks + result.files + result.symlinks + result.dirs == len(nodes)
    assert result.bytes == sum(n.size for n in nodes.values() if n.kind == "reg" and n.nlink == 1) + \
        sum({n.src_ino: n.size for n in nodes.values() if n.kind == "reg" and n.nlink > 1}.values())


@pytest.mark.parametrize("background", [0, 1 << 60], ids=["all-in-thread", "no-thread"])
@pytest.mark.parametrize("xip", [True, False], ids=["xip", "pagecache"])
def test_write_api_tree_round_trips_to_the_nanosecond(work, monkeypatch, xip, background):
    """An image made with the write API comes back exactly, times to the nanosecond, from either
    device, with the data copied in the walking thread or in the copier thread."""
    monkeypatch.setattr(unpack_mod, "_BACKGROUND_MIN", background)
    img = write_image(os.path.join(work, "w.img"), rich_tree)
    dest = os.path.join(work, "out")
    with xipfs.open(img, xip=xip) as fs:
        result = unpack(fs, dest, progress=False)
        want = image_snapshot(fs)
    assert result.skipped == [], reasons(result)
    assert_same_tree(want, dest_snapshot(dest))       # the root too: dest was made by unpack
    assert (result.files, result.hardlinks, result.symlinks, result.others) == (12, 3, 3, 4)
    assert result.dirs == 5


def test_sparse_files_stay_sparse(work):
    """Holes in the image are holes in the extracted file: only the data blocks take space."""
    img = write_image(os.path.join(work, "s.img"), rich_tree)
    dest = os.path.join(work, "out")
    unpack(img, dest, progress=False)
    assert os.lstat(os.path.join(dest, "d/all-hole")).st_blocks == 0
    st = os.lstat(os.path.join(dest, "d/sparse"))
    assert st.st_size == 5 << 20
    assert st.st_blocks * 512 <= 4 * 4096, "the holes of d/sparse were written as zeros"
    ranges = treegen.data_ranges(os.path.join(dest, "d/sparse"))
    assert ranges[0][0] == 1 << 20 and ranges[-1][1] <= (3 << 20) + 4096


def test_progress_reports_bytes(work):
    img = write_image(os.path.join(work, "p.img"), rich_tree)
    calls = []
    result = unpack(img, os.path.join(work, "out"), progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1] == (result.bytes, result.bytes)
    assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:], strict=False))


def test_unsynced_changes_of_an_open_writer_are_extracted(work):
    """From a filesystem open for writing on the page-cache path, what is written but not yet
    synced is what comes out (never the stale bytes on disk)."""
    img = os.path.join(work, "rw.img")
    xipfs.mkfs(img, 8 << 20)
    with xipfs.open(img, "r+", xip=False) as fs:
        fs.write_bytes("/f", b"new data " * 10_000)
        fs.write_bytes("/big", b"B" * 400_000)
        dest = os.path.join(work, "out")
        unpack(fs, dest, progress=False)
    with open(os.path.join(dest, "f"), "rb") as f:
        assert f.read() == b"new data " * 10_000
    with open(os.path.join(dest, "big"), "rb") as f:
        assert f.read() == b"B" * 400_000


@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(spec=treegen.tree_specs, bs=st.sampled_from([1024, 4096]))
def test_random_trees_round_trip(shm_dir, spec, bs):
    """Random small trees (binary names, sparse files, symlinks, FIFOs, xattrs, nesting)."""
    work = tempfile.mkdtemp(dir=shm_dir)
    try:
        src = os.path.join(work, "src")
        treegen.build_spec(src, spec)
        img = mkfs(os.path.join(work, "img"), "8M", src=src, bs=bs)
        result = unpack(img, os.path.join(work, "out"), progress=False)
        assert result.skipped == [], reasons(result)
        assert_same_tree(dest_snapshot(src), dest_snapshot(os.path.join(work, "out")), root_meta=False)
    finally:
        shutil.rmtree(work)


@pytest.mark.parametrize("background", [0, 1 << 60], ids=["in-thread", "no-thread"])
def test_an_error_that_stops_everything_is_raised_and_leaks_nothing(work, monkeypatch, background):
    """A destination error that is not about one entry (here ENOSPC) ends the extraction with that
    error, from either thread; no descriptor stays open and the half-written file is gone."""
    monkeypatch.setattr(unpack_mod, "_BACKGROUND_MIN", background)
    img = write_image(os.path.join(work, "e.img"), rich_tree)
    _no_space_for(monkeypatch, lambda n: n >= 300_000)
    _unpack_stops_cleanly(img, os.path.join(work, "out"), "big")


def _no_space_for(monkeypatch: pytest.MonkeyPatch, hit: Callable[[int], bool]) -> None:
    """Make unpack's copy of a run of ``n`` bytes fail with ENOSPC where ``hit(n)``."""
    real = unpack_mod._Unpacker._copy_run

    def copy_run(self, fd, src_off, dst, n):
        if hit(n):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, fd, src_off, dst, n)

    monkeypatch.setattr(unpack_mod._Unpacker, "_copy_run", copy_run)


def _unpack_stops_cleanly(img: str, dest: str, name: str) -> None:
    """Unpacking ``img`` into ``dest`` raises ENOSPC, leaves no descriptor open and no ``d/name``."""
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError) as info:
        unpack(img, dest, progress=False)
    assert info.value.errno == errno.ENOSPC
    assert set(os.listdir("/proc/self/fd")) == fds
    assert not os.path.exists(os.path.join(dest, "d", name))


# -- what is extracted, and where -----------------------------------------------------------------
def test_a_subdirectory_a_file_and_a_symlink(work):
    img = write_image(os.path.join(work, "p.img"), rich_tree)
    with xipfs.open(img) as fs:
        want = image_snapshot(fs, b"/d/sub", nlink=False)
    dest = os.path.join(work, "sub")
    unpack(img, dest, "/d/sub", progress=False)
    assert_same_tree(want, dest_snapshot(dest, nlink=False))

    unpack(img, os.path.join(work, "one"), "/d/small", progress=False)
    assert os.listdir(os.path.join(work, "one")) == ["small"]
    with open(os.path.join(work, "one", "small"), "rb") as f:
        assert f.read() == b"small file\n"

    result = unpack(img, os.path.join(work, "one"), "/d/abs-link", progress=False)
    assert os.readlink(os.path.join(work, "one", "abs-link")) == "/etc/passwd"
    assert result.symlinks == 1 and result.dirs == 0

    with pytest.raises(FileNotFoundError):
        unpack(img, os.path.join(work, "none"), "/no/such", progress=False)


def test_an_existing_destination_keeps_its_own_metadata(work):
    img = write_image(os.path.join(work, "m.img"), rich_tree)
    dest = os.path.join(work, "existing")
    os.mkdir(dest, 0o711)
    os.setxattr(dest, "user.mine", b"1")
    unpack(img, dest, "/d", progress=False)
    assert stat.S_IMODE(os.lstat(dest).st_mode) == 0o711
    assert os.listxattr(dest) == ["user.mine"]
    with xipfs.open(img) as fs:
        want = fs.lstat("/d")
    fresh = os.path.join(work, "fresh")
    unpack(img, fresh, "/d", progress=False)
    st = os.lstat(fresh)
    assert (st.st_mode, st.st_mtime_ns, st.st_atime_ns) == (want.st_mode, want.st_mtime_ns, want.st_atime_ns)
    assert os.listxattr(fresh) == ["user.dir"]


def test_extracting_over_an_existing_tree(work):
    """Files are replaced (never written through a symlink already there), directories merged,
    a symlink where the image has a directory replaced by the directory, other entries kept; a
    directory where the image has a file is reported and left alone."""
    img = write_image(os.path.join(work, "o.img"), rich_tree)
    parent = os.path.join(work, "area")
    outside = os.path.join(parent, "outside")
    os.makedirs(outside)
    with open(os.path.join(outside, "secret"), "wb") as f:
        f.write(b"keep me")
    dest = os.path.join(parent, "dest")
    os.makedirs(os.path.join(dest, "d"))
    with open(os.path.join(dest, "d", "mid"), "wb") as f:           # an old file: replaced
        f.write(b"old")
    os.symlink(os.path.join(outside, "secret"), os.path.join(dest, "d", "modes"))   # traps
    os.symlink(os.path.join(outside, "secret"), os.path.join(dest, "d", "small"))   # (hard linked)
    os.symlink(outside, os.path.join(dest, "d", "sub"))              # a trap for a directory
    os.symlink(outside, os.path.join(dest, "d", "rel-link"))         # a symlink over a symlink
    os.mkdir(os.path.join(dest, "d", "fifo"))                        # in the way
    with open(os.path.join(dest, "d", "fifo", "x"), "wb") as f:
        f.write(b"x")
    with open(os.path.join(dest, "mine"), "wb") as f:                # not in the image: kept
        f.write(b"mine")
    before = outside_state(parent, dest)

    result = unpack(img, dest, progress=False)

    assert outside_state(parent, dest) == before
    assert [p for p, _ in result.skipped] == ["/d/fifo"], reasons(result)
    with open(os.path.join(dest, "d", "small"), "rb") as f:
        assert f.read() == b"small file\n"
    assert not os.path.islink(os.path.join(dest, "d", "small"))
    with open(os.path.join(dest, "d", "modes"), "rb") as f:
        assert f.read() == b"m"
    sub = os.path.join(dest, "d", "sub")
    assert os.path.isdir(sub) and not os.path.islink(sub)
    assert os.path.getsize(os.path.join(dest, "d", "mid")) == 70_000
    assert os.readlink(os.path.join(dest, "d", "rel-link")) == "small"
    assert os.path.exists(os.path.join(dest, "mine"))
    # the hard link to the fifo could not go where the fifo was refused: it is a fifo itself
    assert stat.S_ISFIFO(os.lstat(os.path.join(dest, "d", "sub", "fifo-link")).st_mode)


@pytest.mark.skipif(not IS_ROOT, reason="mounting needs root")
def test_hard_links_across_a_mount_point_become_copies(work):
    """A destination directory that is a mount point: the link that cannot cross it is a copy,
    and says so in ``skipped``."""
    img = write_image(os.path.join(work, "x.img"), rich_tree)
    dest = os.path.join(work, "out")
    os.makedirs(os.path.join(dest, "d", "sub"))
    if run(["mount", "-t", "tmpfs", "none", os.path.join(dest, "d", "sub")], check=False).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        result = unpack(img, dest, progress=False)
        why = dict(result.skipped)
        assert "a copy of its own" in why["/d/small"], reasons(result)
        for path in ("d/small", "d/sub/small-link"):
            with open(os.path.join(dest, path), "rb") as f:
                assert f.read() == b"small file\n"
    finally:
        run(["umount", os.path.join(dest, "d", "sub")], check=False)


# -- hostile images --------------------------------------------------------------------------------
def _hostile(work: str, build, edit) -> tuple[str, str, str, dict]:
    img = write_image(os.path.join(work, "h.img"), build)
    edit(img)
    parent = os.path.join(work, "area")
    outside = os.path.join(parent, "outside")
    os.makedirs(outside)
    with open(os.path.join(outside, "victim"), "wb") as f:
        f.write(b"untouched")
    dest = os.path.join(parent, "dest")
    return img, parent, dest, outside_state(parent, dest)


@pytest.mark.parametrize("bad", [b"../../evil", b"a/../../b1", b"/tmp/evil", b"..", b".", b"a\0b",
                                 b"../outside"])
def test_bad_names_are_reported_and_nothing_escapes(work, bad):
    """Names with '/' or NUL, and '.'/'..' after the first two entries: the entry is reported,
    the directory's good entries are still extracted, nothing appears outside."""
    placeholder = b"Q" * len(bad)

    def build(fs):
        fs.mkdir("/sub")
        fs.write_bytes("/sub/good1", b"1")
        fs.write_bytes("/sub/" + placeholder.decode(), b"evil data")
        fs.mkdir("/sub/" + placeholder.decode() + "d")
        fs.write_bytes("/sub/good2", b"2")

    img, parent, dest, before = _hostile(work, build, lambda img: edit_entry(img, "/sub", placeholder,
                                                                              new_name=bad))
    result = unpack(img, dest, progress=False)
    assert outside_state(parent, dest) == before
    extracted = sorted(os.listdir(os.path.join(dest, "sub")))
    assert extracted == sorted(["good1", "good2", placeholder.decode() + "d"])
    assert any(path.startswith("/sub") and repr(bad) in why for path, why in result.skipped), reasons(result)
    assert all(not f.startswith(b"evil") for f in os.listdir(os.fsencode(parent)))


def test_duplicate_names_symlink_then_file_or_directory(work):
    """A symlink pointing outside, then a file and a directory of the same name: the first entry
    wins (as in Linux), nothing is written through the symlink."""
    def build(fs):
        outside = os.path.join(work, "area", "outside")
        fs.symlink(outside + "/victim", "/esc")
        fs.symlink(outside, "/dsc")
        fs.write_bytes("/QQQ", b"through the link?")
        fs.mkdir("/RRR")
        fs.write_bytes("/RRR/victim", b"through the dir link?")
        fs.write_bytes("/RRR/new", b"new file")

    def edit(img):
        edit_entry(img, "/", b"QQQ", new_name=b"esc")
        edit_entry(img, "/", b"RRR", new_name=b"dsc")

    img, parent, dest, before = _hostile(work, build, edit)
    unpack(img, dest, progress=False)
    assert outside_state(parent, dest) == before
    assert os.readlink(os.path.join(dest, "esc")).endswith("/outside/victim")
    assert os.readlink(os.path.join(dest, "dsc")).endswith("/outside")


def test_absolute_and_escaping_symlinks_are_data(work):
    """Symlinks to absolute paths and up out of the tree are made as they are and never followed,
    not even by a later entry below a name of the same spelling."""
    def build(fs):
        fs.mkdir("/a")
        fs.symlink("/", "/a/root")
        fs.symlink("../../../../..", "/a/up")
        fs.symlink(os.path.join(work, "area", "outside"), "/a/out")
        fs.mkdir("/b")
        fs.write_bytes("/b/victim", b"a file named like the one outside")

    img, parent, dest, before = _hostile(work, build, lambda img: None)
    unpack(img, dest, progress=False)
    assert outside_state(parent, dest) == before
    assert os.readlink(os.path.join(dest, "a", "root")) == "/"
    assert os.readlink(os.path.join(dest, "a", "up")) == "../../../../.."


def test_a_directory_linked_twice_or_into_itself(work):
    """Directory hard links (a cycle, and the root under a subdirectory) are reported; the walk
    ends."""
    def build(fs):
        fs.makedirs("/a/b")
        fs.write_bytes("/a/b/f", b"f")

    def edit(img):
        debugfs_r(img, "link /a /a/b/loop", write=True)
        debugfs_r(img, "link / /a/rootlink", write=True)

    img, parent, dest, before = _hostile(work, build, edit)
    result = unpack(img, dest, progress=False)
    assert outside_state(parent, dest) == before
    why = dict(result.skipped)
    assert "linked twice" in why["/a/b/loop"] and "linked twice" in why["/a/rootlink"]
    assert sorted(os.listdir(os.path.join(dest, "a", "b"))) == ["f"]


def test_entries_pointing_to_free_or_impossible_inodes(work):
    def build(fs):
        fs.write_bytes("/ok", b"ok")
        fs.write_bytes("/free", b"x")
        fs.write_bytes("/huge", b"y")

    def edit(img):
        edit_entry(img, "/", b"free", new_ino=500)          # never used
        edit_entry(img, "/", b"huge", new_ino=0x7FFFFFFF)   # beyond the inode count

    img, parent, dest, before = _hostile(work, build, edit)
    result = unpack(img, dest, progress=False)
    assert outside_state(parent, dest) == before
    assert sorted(os.listdir(dest)) == ["ok"]
    why = reasons(result)
    assert "/free: corrupt image" in why and "deleted inode 500" in why
    assert "/huge" in why


def test_a_damaged_block_map_is_reported_and_leaves_no_file(work):
    def build(fs):
        fs.write_bytes("/ok", b"ok")
        fs.write_bytes("/bad", b"z" * 10_000)

    def edit(img):
        out = debugfs_r(img, "imap /bad").decode()
        found = re.search(r"located at block (\d+), offset (0x[0-9a-f]+)", out)
        blk, off = int(found[1]), int(found[2], 16)
        with open(img, "r+b") as f:
            f.seek(blk * 4096 + off + 40 + 4)                 # i_block[1]: far past the end
            f.write(struct.pack("<I", 0x0FFFFFFF))

    img, parent, dest, before = _hostile(work, build, edit)
    result = unpack(img, dest, progress=False)
    assert outside_state(parent, dest) == before
    assert sorted(os.listdir(dest)) == ["ok"]
    assert "/bad" in dict(result.skipped) and "corrupt image" in dict(result.skipped)["/bad"]


# -- rights ---------------------------------------------------------------------------------------
@pytest.mark.skipif(not IS_ROOT, reason="needs root to become another user")
def test_as_an_ordinary_user(work):
    """Without root: ownership is not kept, device nodes and trusted.* xattrs are reported and
    skipped, everything else comes back, closed directories included (also when extracting
    over the tree a first run made)."""
    img = write_image(os.path.join(work, "u.img"), rich_tree)
    area = tempfile.mkdtemp(prefix="xipfs-unpack-user-", dir="/dev/shm")
    try:
        os.chmod(area, 0o755)
        shutil.copy(img, os.path.join(area, "u.img"))
        os.chmod(os.path.join(area, "u.img"), 0o644)
        os.mkdir(os.path.join(area, "out"))
        os.chown(os.path.join(area, "out"), 65534, 65534)
        code = ("import os, sys, json; from xipfs.tools.unpack import unpack; "     # (imports while root)
                "os.setgroups([]); os.setgid(65534); os.setuid(65534); "
                "r = unpack(sys.argv[1], sys.argv[2], progress=False); "
                "again = unpack(sys.argv[1], sys.argv[2], progress=False); "   # over it: 000 dirs
                "assert sorted(again.skipped) == sorted(r.skipped), again.skipped; "
                "print(json.dumps([r.files, r.others, r.skipped]))")
        proc = subprocess.run([sys.executable, "-c", code, os.path.join(area, "u.img"),
                               os.path.join(area, "out", "x")], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        files, others, skipped = json.loads(proc.stdout)
        why = {p: r for p, r in skipped}
        assert "root" in why["/d/null"] and "root" in why["/d/blk"]
        assert "trusted.t" in why["/d/big"] and "trusted.l" in why["/d/rel-link"]
        assert files == 12 and others == 2
        out = os.path.join(area, "out", "x")
        st = os.lstat(os.path.join(out, "d", "small"))
        assert (st.st_uid, st.st_gid) == (65534, 65534)
        assert stat.S_IMODE(os.lstat(os.path.join(out, "d", "modes")).st_mode) == 0o4751
        assert stat.S_IMODE(os.lstat(os.path.join(out, "d", "closed")).st_mode) == 0
        with open(os.path.join(out, "d", "closed", "inside"), "rb") as f:   # (we are root again)
            assert f.read() == b"inside a 000 directory"
        assert os.getxattr(os.path.join(out, "d", "small"), "user.a") == b"value a"
    finally:
        shutil.rmtree(area, ignore_errors=True)


# -- small files made by two threads --------------------------------------------------------------
def _many_small(src: str, count: int = 120) -> None:
    """A directory of ``count`` small files (0 to 12 blocks; modes with set-id bits; times to
    the nanosecond), a few other entries among them."""
    d = os.path.join(src, "d")
    os.makedirs(d)
    for i in range(count):
        path = os.path.join(d, f"f{i:03d}")
        with open(path, "wb") as f:
            f.write(bytes([i % 251]) * (i * 397 % 49000))
        os.chmod(path, (0o4755, 0o600, 0o644, 0o2750)[i % 4])
        os.utime(path, ns=(FUTURE * 10**9 + i, 1_600_000_000 * 10**9 + i * 7))
    os.symlink("f001", os.path.join(d, "link"))
    os.link(os.path.join(d, "f002"), os.path.join(d, "hard"))
    os.mkdir(os.path.join(d, "sub"))


def _helpers(monkeypatch, how: str) -> None:
    """Small files made by two threads (every directory's batch handed to the helper thread,
    the rest made by the walk when the directory is done) or by the walking thread alone."""
    monkeypatch.setattr(unpack_mod, "_HELPER_MIN", 1 if how == "two-threads" else 1 << 60)


HELPERS = ["two-threads", "one-thread"]


@pytest.mark.parametrize("how", HELPERS)
def test_many_small_files_come_back_exactly(work, monkeypatch, how):
    """A directory of many small plain files (made by the walking thread and a helper thread
    together, or by the walking thread alone) comes back exactly: data, modes with set-id bits,
    nanosecond times; the links and the subdirectory beside them too."""
    _helpers(monkeypatch, how)
    src = os.path.join(work, "src")
    _many_small(src)
    img = os.path.join(work, "m.img")
    xipfs.pack(src, img)
    dest = os.path.join(work, "out")
    with xipfs.open(img) as fs:
        result = unpack(fs, dest, progress=False)
        want = image_snapshot(fs)
    assert result.skipped == [], reasons(result)
    assert_same_tree(want, dest_snapshot(dest))
    assert (result.files, result.hardlinks, result.symlinks) == (120, 1, 1)


@pytest.mark.parametrize("how", HELPERS)
def test_small_file_failures_on_either_side(work, monkeypatch, how):
    """One small file in the way (a directory of its name in the destination) is reported and
    the others made; an error that stops everything (ENOSPC) is raised from either thread, no
    descriptor stays open and no half-made file stays behind."""
    _helpers(monkeypatch, how)
    src = os.path.join(work, "src")
    _many_small(src)
    img = os.path.join(work, "m.img")
    xipfs.pack(src, img)
    dest = os.path.join(work, "out")
    os.makedirs(os.path.join(dest, "d", "f007"))
    result = unpack(img, dest, progress=False)
    assert [(p, "in the way" in r) for p, r in result.skipped] == [("/d/f007", True)]
    assert result.files == 119
    with open(os.path.join(dest, "d", "f008"), "rb") as f:
        assert f.read() == bytes([8]) * (8 * 397 % 49000)

    _no_space_for(monkeypatch, lambda n: n == 50 * 397 % 49000)
    _unpack_stops_cleanly(img, os.path.join(work, "out2"), "f050")


@pytest.mark.parametrize("where", ["first", "last"])
def test_small_file_in_the_way_first_or_last(work, where):
    """A directory in the way of the first or the last small file of a directory (whichever
    thread takes it): reported with its reason, the rest made."""
    src = os.path.join(work, "src")
    _many_small(src)
    img = os.path.join(work, "m.img")
    xipfs.pack(src, img)
    dest = os.path.join(work, "out")
    name = "f000" if where == "first" else "f119"
    os.makedirs(os.path.join(dest, "d", name, "keep"))
    result = unpack(img, dest, progress=False)
    assert result.skipped == [(f"/d/{name}", "a directory of that name is in the way")]
    assert result.files == 119 and os.path.isdir(os.path.join(dest, "d", name, "keep"))


@pytest.mark.parametrize("maker", ["mke2fs", "pack"])
def test_files_with_one_indirect_block_come_back_exactly(work, maker):
    """Files of 13 blocks up to 1 MiB (12 direct blocks and one indirect block: the indirect
    block between the two parts of the data as mke2fs -d lays it out, before all of it as pack
    does), one with a hole in its indirect part, come back exactly."""
    src = os.path.join(work, "src")
    os.makedirs(src)
    sizes = [12 * 4096 + 1, 13 * 4096, 20 * 4096 - 3, 300_001, (1 << 20) - 1, 1 << 20]
    for i, size in enumerate(sizes):
        with open(os.path.join(src, f"f{i}"), "wb") as f:
            f.write(bytes([i + 1]) * size)
    with open(os.path.join(src, "holey"), "wb") as f:
        f.write(b"a" * 60_000)
        f.seek(200_000)
        f.write(b"b" * 10_000)
    img = os.path.join(work, "i.img")
    if maker == "mke2fs":
        mkfs(img, "16M", bs=4096, isize=256, src=os.fsencode(src))
    else:
        xipfs.pack(src, img)
    dest = os.path.join(work, "out")
    with xipfs.open(img) as fs:
        result = unpack(fs, dest, progress=False)
        want = image_snapshot(fs)
    assert result.skipped == [], reasons(result)
    assert_same_tree(want, dest_snapshot(dest))
    assert result.files == len(sizes) + 1
