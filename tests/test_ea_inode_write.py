"""Writing ext4 ``ea_inode`` xattrs (issue 15): values too large for the inode and the xattr
block go to an inode of their own, as Linux's fs/ext4/xattr.c puts them.

On ``mke2fs -t ext4 -O ea_inode`` images (1 KiB and 4 KiB blocks, with and without
metadata_csum): large values set on files and directories (entries in the inode body and in
the block both), replaced, removed, unlinked, with ``e2fsck -fn`` clean after every step and a
read-only Linux mount reading the same values; values Linux wrote (shared EA inodes and a
shared xattr block among them) read, replaced and removed by xipfs; every prefix of the
stores of a set, a replace, a removal and an unlink repaired by e2fsck (the one documented
window: an EA inode no entry names yet, or any more, needs ``e2fsck -y``).
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import tempfile

import crash_worker as W
import pytest
from conftest import IS_ROOT
from e2fs import SHM, assert_fsck_clean, e2fsck, fsck, mkfs, run

import xipfs
from xipfs.extfs import ea_inode as EA
from xipfs.extfs import layout as L
from xipfs.extfs import xattr as X

GEOMETRIES = [("1k", ("-b", "1024")), ("4k", ("-b", "4096")),
              ("4k-nocsum", ("-b", "4096", "-O", "^metadata_csum"))]
KIB = 1024


@pytest.fixture
def writable(monkeypatch):
    """ext4 with ea_inode opens for writing (XIPFS_EXT4_WRITE=1, as test_ext4_write does)."""
    monkeypatch.setenv(L.EXT4_WRITE_ENV, "1")
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE",
                        L.INCOMPAT_WRITABLE | L.EXT4_INCOMPAT_WRITABLE | L.INCOMPAT_EA_INODE)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.EXT4_RO_COMPAT_WRITABLE)


@pytest.fixture
def image():
    """A factory of ``mke2fs -t ext4 -O ea_inode`` images in /dev/shm, removed afterwards."""
    made = []

    def make(opts: tuple[str, ...], size: str = "16M") -> str:
        img = os.path.join(SHM, f"xipfs-eainode-{os.getpid()}-{len(made)}.img")
        made.append(img)
        return mkfs(img, size, extra=("-O", "ea_inode", *opts), fstype="ext4")

    yield make
    for img in made:
        for p in (img, img + ".work"):
            if os.path.exists(p):
                os.unlink(p)


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _node(fs, path: str):
    return fs.volume.inode(fs.lstat(path).st_ino)


def _places(fs, path: str) -> tuple[dict[str, int], dict[str, int]]:
    """``({name: e_value_inum} in the inode body, the same in the xattr block)``."""
    vol = fs.volume
    node = _node(fs, path)
    body = {e.key: e.inum for e in X._ibody_entries(vol, node) if e.key}
    block = {e.key: e.inum for e in X._block_entries(vol, node.file_acl) if e.key} if node.file_acl else {}
    return body, block


def _assert_ea_inode(fs, owner: str, name: str, value: bytes, refs: int = 1) -> None:
    """The EA inode holding ``owner``'s ``name`` is as Linux makes one: 0100600, EA_INODE_FL,
    one link, the value's size and bytes, the hash in i_atime, the count in ctime:l_i_version."""
    vol = fs.volume
    body, block = _places(fs, owner)
    ino = body.get(name) or block.get(name)
    assert ino
    ea = vol.inode(ino)
    raw = bytes(vol.inode_raw(ino))
    assert ea.mode == 0o100600 and ea.links == 1 and ea.size == len(value)
    assert ea.flags & L.FL_EA_INODE and ea.flags & L.FL_EXTENTS
    assert EA.stored_hash(raw) == EA.value_hash(vol, value)
    assert EA.refcount(raw) == refs


def _used_inodes(fs) -> int:
    st = fs.statvfs("/")
    return st.f_files - st.f_ffree


def _xattrs(fs, path: str) -> dict[str, bytes]:
    return {n: fs.getxattr(path, n) for n in fs.listxattr(path)}


_MOUNT_OK: list[bool] = []


def _linux_view(img: str, paths: list[str]) -> dict[str, dict[str, bytes]] | None:
    """Every xattr of ``paths`` as a read-only Linux loop mount shows them; None where no
    loop mount can be had (not root, no loop device, no ext4 driver)."""
    if not IS_ROOT or _MOUNT_OK == [False]:
        return None
    mnt = tempfile.mkdtemp(prefix="xipfs-eainode-mnt-")
    try:
        proc = run(["mount", "-o", "loop,ro", "-t", "ext4", img, mnt], check=False, timeout=60)
        if proc.returncode != 0:
            _MOUNT_OK[:] = [False]
            return None
        try:
            return {p: {n: os.getxattr(mnt + p, n, follow_symlinks=False)
                        for n in os.listxattr(mnt + p, follow_symlinks=False)} for p in paths}
        finally:
            run(["umount", mnt], timeout=60)
    finally:
        os.rmdir(mnt)


def _check(img: str, want: dict[str, dict[str, bytes]]) -> None:
    """e2fsck -fn clean, and Linux (where it can mount) reads exactly ``want``."""
    assert_fsck_clean(img)
    seen = _linux_view(img, list(want))
    if seen is not None:
        assert seen == want


@pytest.mark.parametrize("opts", [g[1] for g in GEOMETRIES], ids=[g[0] for g in GEOMETRIES])
def test_large_values_set_replaced_removed_and_unlinked(writable, image, opts):
    img = image(opts)
    f_vals = {"user.small": b"s" * 20, "user.big1": _rand(1, 10 * KIB), "user.big2": _rand(2, 20 * KIB),
              "trusted.t": _rand(3, 3000), "user.max": _rand(4, 64 * KIB)}
    d_vals = {"user.big": _rand(5, 30000), "user.mid": _rand(6, 400), "security.s": _rand(7, 9000)}
    with xipfs.open(img, "r+") as fs:
        bs = fs.volume.bs
        fs.write_bytes("/f", b"data\n")
        fs.mkdir("/d")
        base = _used_inodes(fs)
        for k, v in f_vals.items():
            fs.setxattr("/f", k, v)
        for k, v in d_vals.items():
            fs.setxattr("/d", k, v)
        assert _xattrs(fs, "/f") == f_vals and _xattrs(fs, "/d") == d_vals
        body, block = _places(fs, "/f")
        # the inode body takes the first entries (names only for EA values), the block the rest
        assert body["user.small"] == 0 and body["user.big1"] and body["user.big2"]
        assert block["user.max"]
        assert bool(block["trusted.t"]) == (bs - 56 < 3000)
        for k in ("user.big1", "user.big2", "user.max"):
            _assert_ea_inode(fs, "/f", k, f_vals[k])
        ea_count = sum(1 for p in ("/f", "/d") for part in _places(fs, p) for i in part.values() if i)
        assert _used_inodes(fs) == base + ea_count           # one EA inode per large value
        with pytest.raises(OSError) as e2big:
            fs.setxattr("/f", "user.toobig", bytes(64 * KIB + 1))
        assert e2big.value.errno == errno.E2BIG
    _check(img, {"/f": f_vals, "/d": d_vals})

    with xipfs.open(img, "r+") as fs:                          # replace and remove
        f_vals["user.big1"] = _rand(11, 12 * KIB)             # EA -> a new EA inode
        f_vals["user.max"] = b"now small"                      # EA -> in place
        f_vals["user.small"] = _rand(12, 9000)                 # in place -> EA
        del f_vals["user.big2"]
        d_vals["user.mid"] = _rand(13, 5000)
        del d_vals["user.big"]
        for k in ("user.big1", "user.max", "user.small"):
            fs.setxattr("/f", k, f_vals[k], os.XATTR_REPLACE)
        fs.removexattr("/f", "user.big2")
        fs.setxattr("/d", "user.mid", d_vals["user.mid"])
        fs.removexattr("/d", "user.big")
        assert _xattrs(fs, "/f") == f_vals and _xattrs(fs, "/d") == d_vals
        ea_count = sum(1 for p in ("/f", "/d") for part in _places(fs, p) for i in part.values() if i)
        assert _used_inodes(fs) == base + ea_count           # the dropped ones are freed
    _check(img, {"/f": f_vals, "/d": d_vals})

    with xipfs.open(img, "r+") as fs:                          # unlink frees them all
        fs.unlink("/f")
        for k in list(d_vals):
            fs.removexattr("/d", k)
        fs.rmdir("/d")
        assert _used_inodes(fs) == base - 2
    assert_fsck_clean(img)


def test_values_on_other_file_types_and_the_limits(writable, image):
    """A symlink keeps its values out of EA inodes (its i_blocks tells a fast symlink from a
    slow one); 64 KiB is the largest value, and an empty one stays in place."""
    img = image(("-b", "1024"))
    with xipfs.open(img, "r+") as fs:
        fs.symlink("target", "/l")
        fs.write_bytes("/g", b"")
        fs.setxattr("/l", "trusted.ok", b"x" * 500, follow_symlinks=False)
        with pytest.raises(OSError) as nospc:
            fs.setxattr("/l", "trusted.big", bytes(2000), follow_symlinks=False)
        assert nospc.value.errno == errno.ENOSPC
        assert fs.readlink("/l") == "target"
        fs.setxattr("/g", "user.max", _rand(9, 64 * KIB))
        assert fs.getxattr("/g", "user.max") == _rand(9, 64 * KIB)
        fs.setxattr("/g", "user.empty", b"")
        assert fs.getxattr("/g", "user.empty") == b""
    _check(img, {"/g": {"user.max": _rand(9, 64 * KIB), "user.empty": b""}})


def test_xattrs_of_an_inline_file_keep_its_data(writable, image):
    """Setting attributes on an inline-data file or directory keeps ``system.data`` (which
    holds its bytes past the first 60) in the inode body."""
    img = image(("-b", "4096", "-O", "inline_data"))
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", b"inline " * 12)
        fs.mkdir("/d")
        fs.write_bytes("/d/x", b"1")
        fs.setxattr("/f", "user.a", b"a" * 10)
        fs.setxattr("/f", "user.big", _rand(21, 8000))
        fs.setxattr("/d", "user.a", b"b" * 10)
        fs.write_bytes("/d/y", b"2")
        assert fs.read_bytes("/f") == b"inline " * 12
        assert sorted(fs.listdir("/d")) == ["x", "y"]
        assert fs.listxattr("/f") == ["user.a", "user.big"]
    _check(img, {"/f": {"user.a": b"a" * 10, "user.big": _rand(21, 8000)}, "/d": {"user.a": b"b" * 10}})


@pytest.mark.parametrize("opts", [g[1] for g in GEOMETRIES], ids=[g[0] for g in GEOMETRIES])
def test_values_linux_wrote_are_read_replaced_and_removed(writable, image, opts):
    """Linux's EA inodes (one shared by two files' equal values, reference count 2) and its
    shared xattr block naming EA inodes: xipfs reads them, and its changes keep every count."""
    if not IS_ROOT:
        pytest.skip("a read-write loop mount needs root")
    img = image(opts)
    mnt = tempfile.mkdtemp(prefix="xipfs-eainode-mnt-")
    proc = run(["mount", "-o", "loop", "-t", "ext4", img, mnt], check=False, timeout=60)
    if proc.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"mount -o loop failed: {proc.stderr.decode(errors='replace').strip()}")
    same = _rand(30, 10 * KIB)
    want = {"/a": {"user.x": _rand(31, 10 * KIB), "user.y": _rand(32, 10 * KIB), "user.same": same},
            "/b": {"user.same": same},
            # the body full of small values first: the block holds the rest, and the two
            # files' blocks are equal, so Linux shares one block (with its EA inodes' counts)
            "/c": {"user.pad": b"p" * 64, "user.pad2": b"q" * 24, "user.z": _rand(33, 10 * KIB)},
            "/e": {"user.pad": b"p" * 64, "user.pad2": b"q" * 24, "user.z": _rand(33, 10 * KIB)}}
    try:
        for path, vals in want.items():
            with open(mnt + path, "wb") as f:
                f.write(path.encode())
            for k, v in vals.items():
                os.setxattr(mnt + path, k, v)
    finally:
        run(["umount", mnt], timeout=60)
        os.rmdir(mnt)
    assert_fsck_clean(img)
    with xipfs.open(img, "r+") as fs:
        for path, vals in want.items():
            assert _xattrs(fs, path) == vals
        shared = {p: _node(fs, p).file_acl for p in ("/c", "/e")}
        assert _places(fs, "/c")[1]["user.z"] == _places(fs, "/e")[1]["user.z"]   # one EA inode
        assert _places(fs, "/a")[0]["user.same"] == _places(fs, "/b")[0]["user.same"]
        _assert_ea_inode(fs, "/a", "user.same", same, refs=2)  # Linux's hash is ours (seed S)
        _assert_ea_inode(fs, "/c", "user.z", want["/c"]["user.z"], refs=1)   # one block: one ref
        base = _used_inodes(fs)
        want["/a"]["user.x"] = _rand(34, 11 * KIB)
        fs.setxattr("/a", "user.x", want["/a"]["user.x"])
        fs.removexattr("/a", "user.y")
        fs.removexattr("/a", "user.same")                      # still /b's
        del want["/a"]["user.y"], want["/a"]["user.same"]
        want["/c"]["user.w"] = b"w" * 30                       # /c's copy of the shared block
        fs.setxattr("/c", "user.w", want["/c"]["user.w"])
        assert _xattrs(fs, "/b") == want["/b"] and _xattrs(fs, "/e") == want["/e"]
        if shared["/c"] == shared["/e"]:
            assert _node(fs, "/c").file_acl != shared["/c"] == _node(fs, "/e").file_acl
            _assert_ea_inode(fs, "/c", "user.z", want["/c"]["user.z"], refs=2)   # two blocks now
        _assert_ea_inode(fs, "/b", "user.same", same, refs=1)
        assert _used_inodes(fs) == base - 1                    # user.y's EA inode is gone
    _check(img, want)
    with xipfs.open(img, "r+") as fs:
        base = _used_inodes(fs)
        fs.unlink("/b")                                        # the last name of `same`
        fs.unlink("/e")
        fs.removexattr("/c", "user.z")                         # EA inode now only /c's: freed
        del want["/b"], want["/e"], want["/c"]["user.z"]
        assert _used_inodes(fs) == base - 4
    _check(img, want)


# -- a writer killed at every store ----------------------------------------------------------------
def _run_killed(img: str, n: int, op) -> bool:
    """Run ``op(fs)`` on ``img`` in a child killed before its device write ``n + 1``; whether
    the operation finished before that."""
    pid = os.fork()
    if pid == 0:                                               # the child: never returns
        code = 3
        try:
            with xipfs.open(img, "r+") as fs:
                W.crash_after(n)
                op(fs)
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0


def _prefixes(base: str, op, allowed: dict[str, dict[str, set[bytes]]]) -> tuple[int, list[int]]:
    """Cut ``op`` after each of its stores in turn: how many there are, and which cuts needed
    ``e2fsck -y`` (the rest ``e2fsck -p`` repaired alone). After either, the image is clean and
    every attribute reads back as one of its ``allowed`` values (old or new)."""
    work = base + ".work"
    needs_y = []
    n = 0
    while True:
        shutil.copyfile(base, work)
        if _run_killed(work, n, op):
            return n, needs_y
        rc, out = e2fsck(work, "-fp")
        if rc not in (0, 1):
            assert "Unattached inode" in out, f"cut after store {n}: e2fsck -p:\n{out}"
            needs_y.append(n)
            rc, out = e2fsck(work, "-fy")
            assert rc in (0, 1), f"cut after store {n}: e2fsck -y:\n{out}"
        rc, out = fsck(work)
        assert rc == 0, f"cut after store {n}: e2fsck -fn after the repair:\n{out}"
        with xipfs.open(work) as fs:
            for path, names in allowed.items():
                if not fs.exists(path):
                    continue
                got = _xattrs(fs, path)
                assert set(got) <= set(names), (n, path, sorted(got))
                for k, v in got.items():
                    assert v in names[k], (n, path, k, len(v))
        n += 1


def test_every_prefix_is_repaired(writable, image):
    """A set, a replace, a removal and an unlink cut after each store: e2fsck -p repairs every
    cut but those where an EA inode exists that no entry names (documented; e2fsck -y puts it
    in lost+found): one for a set or a removal, two for a replace (the new value's inode
    before the entry, the old one's after), for an unlink three and one more per further EA
    inode (from the inode's last link until its EA inodes are marked free). Nothing is lost,
    and no value reads torn."""
    base = image(("-b", "4096", "-O", "^has_journal"), size="8M")
    old, new, keep = _rand(40, 6000), _rand(42, 7000), _rand(43, 5000)
    with xipfs.open(base, "r+") as fs:
        fs.write_bytes("/f", b"f")
        fs.write_bytes("/g", b"g")
        fs.setxattr("/g", "user.v", old)
        fs.setxattr("/g", "user.keep", keep)
    allowed = {"/f": {"user.big": {_rand(41, 9000)}},
               "/g": {"user.v": {old, new}, "user.keep": {keep}}}
    ops = {
        "set": (lambda fs: fs.setxattr("/f", "user.big", _rand(41, 9000)), 1),
        "replace": (lambda fs: fs.setxattr("/g", "user.v", new), 2),
        "remove": (lambda fs: fs.removexattr("/g", "user.v"), 1),
        "unlink": (lambda fs: fs.unlink("/g"), 4),
    }
    for name, (op, windows) in ops.items():
        count, needs_y = _prefixes(base, op, allowed)
        assert count > 2, name
        assert len(needs_y) <= windows, (name, count, needs_y)
