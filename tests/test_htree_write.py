"""Writing htree (dir_index) directories: the index kept as Linux ext4 keeps it.

Directories indexed by ``e2fsck -fyD`` (after ``mke2fs -d``) or by Linux itself (a loop mount,
root only) are changed through xipfs: thousands of names added (leaf splits, a new index level,
node splits; three levels with large_dir), names removed, renamed within and across
directories, replaced. After each scenario: ``e2fsck -fn`` is clean, the directory is still
indexed and ``debugfs -R "htree DIR"`` walks it to exactly the expected names, xipfs's own htree
lookup finds every name (and no absent one), the listing equals the model, and a Linux
read-only loop mount finds every name (root only). A writer killed after each store of a leaf
split or of a new level is repaired by e2fsck, nothing lost.

New directories on ext4 images (mke2fs's and xipfs's, 1 KiB and 4 KiB blocks) become indexed
when their one block fills, as Linux ``make_indexed_dir`` does, with the very blocks Linux
writes for the same names; they grow a second index level, and with large_dir a third; ext2
images keep them linear.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import re
import shutil
import signal
import tempfile
from collections.abc import Iterator

import pytest
from conftest import IS_ROOT, mounted
from e2fs import SHM, assert_fsck_clean, e2fsck, mkfs, run

import xipfs
from xipfs.extfs import htree, namei
from xipfs.extfs import layout as L
from xipfs.extfs.dir import htree_lookup
from xipfs.extfs.inode import Inode

pytestmark = pytest.mark.skipif(shutil.which("e2fsck") is None, reason="needs e2fsprogs")


@pytest.fixture
def writable(monkeypatch: pytest.MonkeyPatch) -> None:
    """ext4 images open for writing (issue 15 is behind a gate), large_dir too."""
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.INCOMPAT_EXTENTS | L.INCOMPAT_64BIT
                        | L.INCOMPAT_FLEX_BG | L.INCOMPAT_LARGEDIR)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED",
                        L.RO_COMPAT_SUPPORTED | L.RO_COMPAT_METADATA_CSUM | L.RO_COMPAT_HUGE_FILE
                        | L.RO_COMPAT_DIR_NLINK | L.RO_COMPAT_EXTRA_ISIZE)


@pytest.fixture
def work() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xipfs-htw-", dir=SHM)
    yield path
    shutil.rmtree(path, ignore_errors=True)


Model = dict[str, set[str]]
NO_JOURNAL = "^has_journal,^orphan_file"


def indexed_image(work: str, bs: int, *, features: str = "", dirs: dict[str, int] | None = None,
                  fstype: str = "ext4", size: str = "64M", inodes: int | None = None) -> tuple[str, Model]:
    """An image whose directories (``{name: how many files}``) e2fsck -D indexed; and its model."""
    dirs = {"d": 600, "e": 400} if dirs is None else dirs
    src = os.path.join(work, "src")
    model: Model = {}
    for d, count in dirs.items():
        os.makedirs(os.path.join(src, d))
        model[d] = {f"f{i:05d}" for i in range(count)}
        for n in model[d]:
            os.close(os.open(os.path.join(src, d, n), os.O_CREAT | os.O_WRONLY, 0o644))
    img = os.path.join(work, "img")
    feats = ",".join(f for f in (NO_JOURNAL if fstype == "ext4" else "", features) if f)
    extra = (("-O", feats) if feats else ()) + (("-N", str(inodes)) if inodes else ())
    mkfs(img, size, bs=bs, fstype=fstype, src=src, extra=extra)
    shutil.rmtree(src)
    rc, out = e2fsck(img, "-fyD")
    assert rc in (0, 1), out
    for d in dirs:
        assert _flags(img, d) & L.FL_INDEX, f"e2fsck -D did not index /{d}"
    return img, model


def _flags(img: str, d: str) -> int:
    with xipfs.open(img, "r") as fs:
        return namei.resolve(fs.volume, "/" + d).flags


_LEAF_ENTRY = re.compile(rb"(\d+) 0x[0-9a-f]{8}-[0-9a-f]{8} \(\d+\) (\S+)   ")


def debugfs_htree_names(img: str, d: str) -> list[str]:
    """The names ``debugfs -R "htree /d"`` finds walking the index to every leaf."""
    out = run(["debugfs", "-R", f"htree /{d}", img]).stdout
    assert b"Root node dump" in out
    return [os.fsdecode(m.group(2)) for m in _LEAF_ENTRY.finditer(out) if int(m.group(1))]


@contextlib.contextmanager
def linux_mount(img: str) -> Iterator[str | None]:
    """A read-only loop mount of ``img``, or None where that is not possible (not root, no
    loop devices): the Linux part of a check is left out then, the rest of the test goes on."""
    if not IS_ROOT:
        yield None
        return
    mnt = tempfile.mkdtemp(prefix="xipfs-mnt-")
    if run(["mount", "-o", "loop,ro", "-t", "ext4", img, mnt], check=False, timeout=60).returncode:
        os.rmdir(mnt)
        yield None
        return
    try:
        yield mnt
    finally:
        run(["umount", mnt], timeout=60)
        os.rmdir(mnt)


def check(img: str, model: Model, absent: tuple[str, ...] = ("absent-1", "nothere", "f99999"),
          sample: int | None = None) -> None:
    """e2fsck clean; every directory indexed, walked by debugfs and found by xipfs's htree
    lookup name by name; the listing is the model; Linux finds every name (root only).
    ``sample``: only that many names per directory are looked up one by one (big trees)."""
    assert_fsck_clean(img)
    inos: dict[str, dict[str, int]] = {}
    with xipfs.open(img, "r") as fs:
        vol = fs.volume
        for d, names in model.items():
            node = namei.resolve(vol, "/" + d)
            assert node.flags & L.FL_INDEX, f"/{d} lost its index"
            assert set(fs.listdir("/" + d)) == names
            inos[d] = {}
            picked = sorted(names) if sample is None else random.Random(d).sample(sorted(names), sample)
            for n in picked:
                found = htree_lookup(vol, node, n)
                assert found is not None, f"/{d}/{n} not found through the index"
                assert found[0] == fs.lstat(f"/{d}/{n}").st_ino
                inos[d][n] = found[0]
            for n in absent:
                assert htree_lookup(vol, node, n) is None
        for d, names in model.items():
            seen = debugfs_htree_names(img, d)
            assert sorted(seen) == sorted(names), f"debugfs htree /{d}"
    with linux_mount(img) as mnt:
        if mnt is not None:
            for d, names in model.items():
                assert set(os.listdir(os.path.join(mnt, d))) == names
                for n, ino in inos[d].items():
                    assert os.stat(os.path.join(mnt, d, n)).st_ino == ino


def levels(img: str, d: str) -> int:
    with xipfs.open(img, "r") as fs:
        vol = fs.volume
        node = namei.resolve(vol, "/" + d)
        bs = vol.bs

        def read(lblk: int) -> memoryview:
            return vol.device.view(node.map.bmap(lblk) * bs, bs)
        return htree.parse_root(read(0), bs=bs, metadata_csum=vol.sb.metadata_csum,
                                large_dir=vol.large_dir).indirect_levels


def churn(fs: xipfs.Filesystem, model: Model, rng: random.Random, adds: int) -> None:
    """Add, remove, rename within and across /d and /e, replace, mkdir and rmdir; the model follows."""
    d, e = model["d"], model["e"]
    for i in range(adds):
        n = f"n{i:05d}-" + "x" * rng.randrange(0, 80)
        fs.write_bytes(f"/d/{n}", b"")
        d.add(n)
    for n in rng.sample(sorted(d), len(d) // 3):
        fs.unlink(f"/d/{n}")
        d.discard(n)
    for n in rng.sample(sorted(d), 150):                         # within /d
        fs.rename(f"/d/{n}", f"/d/{n}-renamed")
        d.discard(n)
        d.add(f"{n}-renamed")
    for n in rng.sample(sorted(d), 100):                         # /d -> /e
        fs.rename(f"/d/{n}", f"/e/m-{n}")
        d.discard(n)
        e.add(f"m-{n}")
    for n in rng.sample(sorted(e), 60):                          # /e -> /d
        fs.rename(f"/e/{n}", f"/d/back-{n}")
        e.discard(n)
        d.add(f"back-{n}")
    names = rng.sample(sorted(d), 40)
    for a, b in zip(names[::2], names[1::2], strict=True):       # replace: b now names a's file
        fs.rename(f"/d/{a}", f"/d/{b}")
        d.discard(a)
    for i in range(30):
        fs.mkdir(f"/d/sub{i}")
        d.add(f"sub{i}")
    for i in range(0, 30, 3):
        fs.rmdir(f"/d/sub{i}")
        d.discard(f"sub{i}")
    for i in range(adds // 4):                                   # into the space removals left
        n = f"again{i:05d}"
        fs.write_bytes(f"/d/{n}", b"")
        d.add(n)


VARIANTS = {
    "1k-csum": (1024, ""),
    "4k-csum": (4096, ""),
    "1k-nocsum": (1024, "^metadata_csum"),
    "4k-nocsum": (4096, "^metadata_csum"),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_e2fsck_indexed_dirs_stay_indexed(writable: None, work: str, variant: str) -> None:
    bs, feats = VARIANTS[variant]
    img, model = indexed_image(work, bs, features=feats)
    assert levels(img, "d") == 0
    with xipfs.open(img, "r+") as fs:
        churn(fs, model, random.Random(variant), 3000 if bs == 1024 else 2500)
    check(img, model)
    if bs == 1024:          # a new level, its node split at once (the copied root was full)
        assert levels(img, "d") == 1
        out = run(["debugfs", "-R", "htree /d", img]).stdout.decode()
        assert int(re.search(r"Number of entries \(count\): (\d+)", out).group(1)) >= 2


def test_ext2_image_drops_the_index(work: str) -> None:
    """ext2 with dir_index and no checksums keeps its old behaviour: the first change drops the
    index flag (as Linux's ext2 driver does), and the directory reads linearly."""
    img, model = indexed_image(work, 1024, fstype="ext2", size="32M")
    with xipfs.open(img, "r+") as fs:
        churn(fs, model, random.Random(2), 1500)
    assert_fsck_clean(img)
    assert not _flags(img, "d") & L.FL_INDEX and not _flags(img, "e") & L.FL_INDEX
    with xipfs.open(img, "r") as fs:
        for d, names in model.items():
            assert set(fs.listdir("/" + d)) == names


@pytest.mark.parametrize("fstype", ["ext2", "ext4"])
def test_checksummed_ext2_or_plain_ext4_keeps_the_index(writable: None, work: str, fstype: str) -> None:
    """The index is kept on any image with metadata_csum, and on ext4 without it."""
    img, model = indexed_image(work, 1024, fstype=fstype, size="32M",
                               features="metadata_csum" if fstype == "ext2" else "^metadata_csum")
    with xipfs.open(img, "r+") as fs:
        churn(fs, model, random.Random(3), 1500)
    check(img, model)


def test_moved_indexed_dir_keeps_root_checksum(writable: None, work: str) -> None:
    """``..`` of an indexed directory moved to another parent: the root's dx checksum redone."""
    img, model = indexed_image(work, 1024, dirs={"d": 300, "e": 400})
    with xipfs.open(img, "r+") as fs:
        fs.rename("/e", "/d/e")
        for i in range(200):
            fs.write_bytes(f"/d/e/new{i}", b"")
    assert_fsck_clean(img)
    with xipfs.open(img, "r") as fs:
        assert namei.resolve(fs.volume, "/d/e").flags & L.FL_INDEX
        assert len(fs.listdir("/d/e")) == 600


@pytest.mark.root
def test_linux_indexed_dir(writable: None, work: str) -> None:
    """A directory Linux indexed as it grew (make_indexed_dir, splits), then changed by xipfs."""
    if not IS_ROOT:
        pytest.skip("Linux fills the directory through a loop mount, which needs root")
    img = mkfs(os.path.join(work, "img"), "64M", bs=1024, fstype="ext4", extra=("-O", NO_JOURNAL))
    model: Model = {"d": {f"linux-{i:05d}-" + "y" * (i % 50) for i in range(2500)}, "e": set()}
    with mounted(img, options="rw") as mnt:
        for d, names in model.items():
            os.mkdir(os.path.join(mnt, d))
            for n in names:
                os.close(os.open(os.path.join(mnt, d, n), os.O_CREAT | os.O_WRONLY, 0o644))
        for i in range(200):       # /e: indexed too
            os.close(os.open(os.path.join(mnt, "e", f"e{i:04d}-" + "z" * 40), os.O_CREAT | os.O_WRONLY))
            model["e"].add(f"e{i:04d}-" + "z" * 40)
    assert _flags(img, "d") & L.FL_INDEX and _flags(img, "e") & L.FL_INDEX
    with xipfs.open(img, "r+") as fs:
        churn(fs, model, random.Random(5), 2000)
    check(img, model)


def test_full_tree_is_enospc(writable: None, work: str) -> None:
    """At the deepest level allowed, a full index refuses the name with ENOSPC (as Linux:
    "Directory index full!"), and the directory stays whole. (The depth limit is lowered to
    0 here, so a full root is the end.)"""
    img, model = indexed_image(work, 1024, dirs={"d": 300, "e": 100})
    with pytest.MonkeyPatch.context() as mp, xipfs.open(img, "r+") as fs:
        mp.setattr(htree, "max_depth", lambda large_dir: 0)
        with pytest.raises(OSError) as exc:
            for i in range(5000):
                n = f"full{i:05d}-" + "q" * 30
                fs.write_bytes(f"/d/{n}", b"")
                model["d"].add(n)
        assert exc.value.errno == errno.ENOSPC
        assert not fs.exists(f"/d/{n}")
    model["d"].discard(n)
    check(img, model)


def test_dir_nlink_overflow(writable: None, work: str) -> None:
    """dir_nlink: an indexed directory's count goes to 1 past 65,000 subdirectories and stays;
    a directory without an index stops at 65,000 (EMLINK)."""
    img, model = indexed_image(work, 1024, dirs={"d": 300, "e": 100})
    with xipfs.open(img, "r+") as fs:
        vol = fs.volume
        d = namei.resolve(vol, "/d")
        real = d.links
        d.links = namei.EXT4_LINK_MAX                       # (in memory only)
        fs.mkdir("/d/sub")
        assert d.links == 1
        fs.mkdir("/d/sub2")
        fs.rmdir("/d/sub2")
        assert d.links == 1
        fs.mkdir("/plain")                                   # a new directory: no index
        plain = namei.resolve(vol, "/plain")
        plain.links = namei.EXT4_LINK_MAX
        with pytest.raises(OSError) as exc:
            fs.mkdir("/plain/sub")
        assert exc.value.errno == errno.EMLINK
        plain.links = 2
        fs.rmdir("/plain")
        assert real == 2
    model["d"].add("sub")
    check(img, model)                       # e2fsck accepts 1 on an indexed directory


# -- a writer killed between the stores of a split ---------------------------------------------
def _run_killed(img: str, name: str, after: int) -> str:
    """Add ``/d/name`` in a child that SIGKILLs itself before device store ``after + 1``:
    "killed", or "done" when the add took fewer stores."""
    pid = os.fork()
    if pid == 0:                                              # pragma: no cover (child)
        try:
            fs = xipfs.open(img, "r+")
            dev = fs.volume.device
            count = [0]
            for attr in ("write", "write_new"):
                orig = getattr(dev, attr)

                def hooked(*a: object, _orig=orig, **k: object) -> object:
                    if count[0] == after:
                        os.kill(os.getpid(), signal.SIGKILL)
                    count[0] += 1
                    return _orig(*a, **k)
                setattr(dev, attr, hooked)
            fs.write_bytes(f"/d/{name}", b"")
            os._exit(3)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed"
    assert os.WEXITSTATUS(status) == 3, "the child failed"
    return "done"


def _first_add_that(img: str, names: list[str], what: str) -> int:
    """Index of the first name whose add splits a leaf (``what="leaf"``), adds a level ("level")
    or splits an index node ("node")."""
    hit = []
    real_split, real_grow = namei._dx_split_leaf, namei._dx_grow

    def split(*a, **k):  # type: ignore[no-untyped-def]
        hit.append("leaf")
        return real_split(*a, **k)

    def grow(dx, frames):  # type: ignore[no-untyped-def]
        hit.append("level" if all(f[0].count >= f[0].limit for f in frames) else "node")
        return real_grow(dx, frames)
    with pytest.MonkeyPatch.context() as mp, xipfs.open(img, "r+") as fs:
        mp.setattr(namei, "_dx_split_leaf", split)
        mp.setattr(namei, "_dx_grow", grow)
        for i, n in enumerate(names):
            fs.write_bytes(f"/d/{n}", b"")
            if what in hit:
                return i
    raise AssertionError(f"no {what} split in {len(names)} adds")


def _split_windows(img: str, pristine: str, name: str) -> list[int]:
    """The store counts after which an add of ``/d/name`` leaves a split half done: from the
    store that links a new block to the directory up to (not including) the last store of
    that split or new level (traced in this process)."""
    shutil.copyfile(pristine, img)
    stores: list[int | None] = []          # per store: the split it belongs to
    links: list[int] = []                  # the stores that link a new block
    current: list[int | None] = [None]
    ops = [0]

    def op(real):  # type: ignore[no-untyped-def]
        def wrapped(*a, **k):  # type: ignore[no-untyped-def]
            ops[0] += 1
            current[0] = ops[0]
            try:
                return real(*a, **k)
            finally:
                current[0] = None
        return wrapped
    real_append = namei._Dx.append

    def append(self, block):  # type: ignore[no-untyped-def]
        got = real_append(self, block)
        links.append(len(stores) - 1)      # its last store: the inode, block map and size
        return got
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(namei, "_dx_split_leaf", op(namei._dx_split_leaf))
        mp.setattr(namei, "_dx_grow", op(namei._dx_grow))
        mp.setattr(namei._Dx, "append", append)
        with xipfs.open(img, "r+") as fs:
            dev = fs.volume.device
            for attr in ("write", "write_new"):
                orig = getattr(dev, attr)

                def hooked(*a: object, _orig=orig, **k: object) -> object:
                    stores.append(current[0])
                    return _orig(*a, **k)
                setattr(dev, attr, hooked)
            fs.write_bytes(f"/d/{name}", b"")
            for attr in ("write", "write_new"):
                delattr(dev, attr)
    windows = []
    for link in links:
        last = max(i for i, o in enumerate(stores) if o == stores[link])
        windows += range(link + 1, last + 1)
    return windows


@pytest.mark.parametrize("what", ["leaf", "level", "node"])
@pytest.mark.parametrize("csum", [True, False], ids=["csum", "nocsum"])
def test_kill_between_split_stores(writable: None, work: str, what: str, csum: bool) -> None:
    """Killed after each store of an add that splits: e2fsck repairs the image, every name
    there before is still there once. A kill between the new block's link and the old block's
    trimming needs ``e2fsck -y`` (as for Linux ext4 without a journal: no order makes a move
    of entries between two blocks one store); every other instant is ``e2fsck -p`` clean."""
    img, model = indexed_image(work, 1024, features="" if csum else "^metadata_csum",
                               dirs={"d": 300, "e": 100}, size="16M")
    names = [f"k{i:05d}-" + "w" * 20 for i in range(3000)]
    probe = os.path.join(work, "probe")
    shutil.copyfile(img, probe)
    at = _first_add_that(probe, names, what)
    with xipfs.open(img, "r+") as fs:                       # the image just before that add
        for n in names[:at]:
            fs.write_bytes(f"/d/{n}", b"")
    before = model["d"] | set(names[:at])
    pristine = os.path.join(work, "pristine")
    shutil.copyfile(img, pristine)
    needed_y = []
    for after in range(200):
        shutil.copyfile(pristine, img)
        if _run_killed(img, names[at], after) == "done":
            break
        rc, out = e2fsck(img, "-fp")
        if rc >= 4:
            needed_y.append(after)
            rc, out = e2fsck(img, "-fy")
            assert rc in (0, 1), out
        assert rc in (0, 1), f"killed after {after} stores: {out}"
        assert_fsck_clean(img)
        with xipfs.open(img, "r") as fs:
            got = set(fs.listdir("/d"))
        assert before <= got <= before | {names[at]}, f"killed after {after} stores"
    else:
        raise AssertionError("the add never ended")
    # the -y window: contiguous, at most the stores between the new block's link and the end
    assert needed_y == _split_windows(img, pristine, names[at])


# -- new directories become indexed (make_indexed_dir) and grow levels ---------------------------
@pytest.fixture
def ext4_writable() -> None:
    """ext4 writing, large_dir included, is on by default; the fixture only names the need."""


def new_ext4(work: str, maker: str, bs: int, features: tuple[str, ...] = (), size: int = 32 << 20,
             fstype: str = "ext4") -> str:
    """A fresh image made by ``mke2fs -t FSTYPE`` or by ``xipfs.mkfs``, ``features`` added or
    (``^name``) dropped."""
    img = os.path.join(work, "img")
    if maker == "mke2fs":
        extra = ("-O", ",".join(features)) if features else ()
        mkfs(img, f"{size >> 10}K", bs=bs, fstype=fstype, extra=extra)
    else:
        xipfs.mkfs(img, size, block_size=bs, fs_type=fstype, features=list(features) or None)
    return img


def fill(fs: xipfs.Filesystem, d: str, names: list[str]) -> None:
    for n in names:
        fs.write_bytes(f"{d}/{n}", b"")


def root_of(fs: xipfs.Filesystem, d: str) -> htree.DxNode:
    vol = fs.volume
    node = namei.resolve(vol, d)
    assert node.flags & L.FL_INDEX, f"{d} is not indexed"
    view = vol.device.view(node.map.bmap(0) * vol.bs, vol.bs)
    return htree.parse_root(view, bs=vol.bs, metadata_csum=vol.sb.metadata_csum, large_dir=vol.large_dir)


MAKERS = ["mke2fs-1k", "mke2fs-4k", "xipfs-1k", "xipfs-4k"]


@pytest.mark.parametrize("maker", MAKERS)
def test_new_dir_becomes_indexed(ext4_writable: None, work: str, maker: str) -> None:
    """A new directory fills its block and turns into an htree (root, two leaves, the hash
    version the superblock names); then grows by leaf splits, loses names and gains others:
    clean, indexed and found by xipfs, debugfs and Linux at every step."""
    tool, bs = maker.split("-")[0], 1024 if maker.endswith("1k") else 4096
    img = new_ext4(work, tool, bs)
    rng = random.Random(maker)
    names = [f"f{i:05d}" + "n" * rng.randrange(0, 40) for i in range(1200 if bs == 1024 else 2500)]
    with xipfs.open(img, "r+") as fs:
        fs.mkdir("/d")
        node = namei.resolve(fs.volume, "/d")
        i = 0
        while not node.flags & L.FL_INDEX:
            fs.write_bytes(f"/d/{names[i]}", b"")
            i += 1
        assert node.size == 3 * bs, "the first name past one block makes root and two leaves"
        root = root_of(fs, "/d")
        assert (root.count, root.blocks, root.indirect_levels) == (2, [1, 2], 0)
        assert root.hash_version == fs.volume.sb.s_def_hash_version
        fill(fs, "/d", names[i:])
        for k in range(20):
            fs.mkdir(f"/d/sub{k}")
    model = {"d": set(names) | {f"sub{k}" for k in range(20)}}
    check(img, model)
    with xipfs.open(img, "r+") as fs:
        for n in rng.sample(sorted(model["d"] - {f"sub{k}" for k in range(20)}), len(names) * 2 // 3):
            fs.unlink(f"/d/{n}")
            model["d"].discard(n)
        for k in range(0, 20, 2):
            fs.rmdir(f"/d/sub{k}")
            model["d"].discard(f"sub{k}")
    check(img, model)
    with xipfs.open(img, "r+") as fs:
        again = [f"again{i:04d}" for i in range(300)]
        fill(fs, "/d", again)
        model["d"].update(again)
    check(img, model)


def _htree_shape(img: str, d: str) -> list[tuple]:
    """What ``debugfs -R "htree /d"`` shows, inode numbers left out: every index entry (hash,
    block) and every leaf's names with their rec_len, in the order it walks them."""
    out = run(["debugfs", "-R", f"htree /{d}", img]).stdout.decode()
    shape: list[tuple] = []
    for line in out.splitlines():
        if m := re.match(r"\s*Entry #\d+: Hash (0x[0-9a-f]+), block (\d+)", line):
            shape.append(("entry", m.group(1), int(m.group(2))))
        elif m := re.match(r"Reading directory block (\d+)", line):
            shape.append(("leaf", int(m.group(1))))
        else:
            shape += [("name", e.group(2), int(e.group(1)))
                      for e in re.finditer(r"\d+ 0x[0-9a-f]{8}-[0-9a-f]{8} \((\d+)\) (\S+)", line)]
    return shape


@pytest.mark.root
@pytest.mark.parametrize("variant", ["1k-csum", "4k-csum", "4k-nocsum"])
def test_same_blocks_as_linux(ext4_writable: None, work: str, variant: str) -> None:
    """The same names created in a new directory by Linux (a loop mount) and by xipfs, on two
    copies of one image, give the same index and leaves, entry for entry: the conversion of
    the first block, the leaf splits and (1 KiB blocks) the second level."""
    if not IS_ROOT:
        pytest.skip("Linux fills the directory through a loop mount, which needs root")
    bs = 1024 if variant.startswith("1k") else 4096
    pristine = mkfs(os.path.join(work, "pristine"), "32M", bs=bs, fstype="ext4",
                    extra=() if variant.endswith("-csum") else ("-O", "^metadata_csum"))
    pad = "z" * 40 if bs == 1024 else ""            # 1 KiB: longer names, to reach a second level
    names = [f"n{i:05d}-" + "abcdefghij"[:i % 11] * (i % 5) + pad for i in range(1500)]
    linux, ours = os.path.join(work, "linux"), os.path.join(work, "ours")
    shutil.copyfile(pristine, linux)
    shutil.copyfile(pristine, ours)
    with mounted(linux, options="rw") as mnt:
        os.mkdir(os.path.join(mnt, "d"))
        for n in names:
            os.close(os.open(os.path.join(mnt, "d", n), os.O_CREAT | os.O_WRONLY, 0o644))
    with xipfs.open(ours, "r+") as fs:
        fs.mkdir("/d")
        fill(fs, "/d", names)
    assert _htree_shape(ours, "d") == _htree_shape(linux, "d")
    if bs == 1024:
        assert levels(ours, "d") == 1
    check(ours, {"d": set(names)}, sample=200)


@pytest.mark.parametrize("case", ["ext2-mke2fs", "ext2-xipfs", "ext4-no-dir_index"])
def test_stays_linear(ext4_writable: None, work: str, case: str) -> None:
    """Where Linux's driver would not index (ext2 images, as the ext2 driver; ext4 without
    dir_index) a new directory grows block by block, unindexed, as before."""
    if case == "ext4-no-dir_index":
        img = new_ext4(work, "mke2fs", 1024, ("^dir_index",))
    else:
        img = new_ext4(work, case.split("-")[1], 1024, fstype="ext2")
    names = [f"plain{i:05d}" for i in range(400)]
    with xipfs.open(img, "r+") as fs:
        fs.mkdir("/d")
        fill(fs, "/d", names)
        node = namei.resolve(fs.volume, "/d")
        assert not node.flags & L.FL_INDEX
        assert node.size > 3 * fs.volume.bs
    assert_fsck_clean(img)
    with xipfs.open(img, "r") as fs:
        assert set(fs.listdir("/d")) == set(names)


def test_second_and_third_level(ext4_writable: None, work: str) -> None:
    """1 KiB blocks, 255-byte names, large_dir: a new directory is indexed, grows a second
    index level, then a third (hard links to one file keep it quick); names removed after."""
    img = new_ext4(work, "xipfs", 1024, ("large_dir",), size=48 << 20)
    seen: list[int] = []
    names: set[str] = set()
    with xipfs.open(img, "r+") as fs:
        fs.mkdir("/d")
        fs.write_bytes("/target", b"")
        node = namei.resolve(fs.volume, "/d")
        for i in range(40000):
            n = f"{i:06d}-" + "L" * 248
            fs.link("/target", f"/d/{n}")
            names.add(n)
            if node.flags & L.FL_INDEX and (i % 50 == 0 or seen[-1:] == [1]):
                depth = root_of(fs, "/d").indirect_levels
                if seen[-1:] != [depth]:
                    seen.append(depth)
                if depth == 2:
                    break
        assert seen == [0, 1, 2]
        for n in random.Random(7).sample(sorted(names), 2000):
            fs.unlink(f"/d/{n}")
            names.discard(n)
    assert levels(img, "d") == 2
    check(img, {"d": names}, sample=300)


def _conversion_stores(img: str, name: str) -> tuple[int, int]:
    """Add ``/d/name`` (the add that indexes /d) in this process, counting device stores:
    ``(link, root, flag)``, the indexes of the stores that link the two new leaves (the
    directory's inode), rewrite block 0 as the root, and set the index flag (the inode again)."""
    stores: list[tuple[int, int]] = []
    with xipfs.open(img, "r+") as fs:
        vol = fs.volume
        d = namei.resolve(vol, "/d")
        at_inode, at_root = vol.inode_offset(d.ino), d.map.bmap(0) * vol.bs
        dev = vol.device
        for attr in ("write", "write_new"):
            orig = getattr(dev, attr)

            def hooked(data, offset, *a, _orig=orig, **k):  # type: ignore[no-untyped-def]
                stores.append((offset, len(data)))
                return _orig(data, offset, *a, **k)
            setattr(dev, attr, hooked)
        fs.write_bytes(f"/d/{name}", b"")
        for attr in ("write", "write_new"):
            delattr(dev, attr)
    root = stores.index((at_root, vol.bs))
    inode_stores = [i for i, (off, _) in enumerate(stores) if off == at_inode]
    link = max(i for i in inode_stores if i < root)
    return link, root


@pytest.mark.parametrize("csum", [True, False], ids=["csum", "nocsum"])
def test_kill_while_indexing(ext4_writable: None, work: str, csum: bool) -> None:
    """A writer killed after each store of the add that indexes a full one-block directory:
    e2fsck repairs the image and every name there before is there once. Between the store that
    links the new leaves and the one that makes block 0 the root, every name is in the
    directory twice, which needs ``e2fsck -y`` (as a leaf split does); any other instant is
    ``e2fsck -p`` clean."""
    img = new_ext4(work, "mke2fs", 1024, () if csum else ("^metadata_csum",), size=8 << 20)
    names = [f"k{i:04d}-" + "w" * (i % 13) for i in range(200)]
    probe = os.path.join(work, "probe")
    with xipfs.open(img, "r+") as fs:
        fs.mkdir("/d")
    shutil.copyfile(img, probe)
    with xipfs.open(probe, "r+") as fs:
        node = namei.resolve(fs.volume, "/d")
        at = 0
        while not node.flags & L.FL_INDEX:
            fs.write_bytes(f"/d/{names[at]}", b"")
            at += 1
        at -= 1                                     # the add that indexed /d
    with xipfs.open(img, "r+") as fs:
        fill(fs, "/d", names[:at])
    before = set(names[:at])
    pristine = os.path.join(work, "pristine")
    shutil.copyfile(img, pristine)
    shutil.copyfile(pristine, probe)
    link, root = _conversion_stores(probe, names[at])
    needed_y = []
    for after in range(100):
        shutil.copyfile(pristine, img)
        if _run_killed(img, names[at], after) == "done":
            break
        rc, out = e2fsck(img, "-fp")
        if rc >= 4:
            needed_y.append(after)
            rc, out = e2fsck(img, "-fy")
        assert rc in (0, 1), f"killed after {after} stores: {out}"
        assert_fsck_clean(img)
        with xipfs.open(img, "r") as fs:
            got = fs.listdir("/d")
        assert len(got) == len(set(got)) and before <= set(got) <= before | {names[at]}, after
    else:
        raise AssertionError("the add never ended")
    assert needed_y == list(range(link + 1, root + 1))


def test_directory_past_4gib_stores_i_size_high(ext4_writable: None, work: str) -> None:
    """large_dir: a directory's size past 4 GiB keeps its high word (``i_size_high``) when the
    inode is encoded, as ``ext4_isize_set`` stores it, and reads back whole."""
    img = new_ext4(work, "xipfs", 1024, ("large_dir",), size=8 << 20)
    with xipfs.open(img, "r+") as fs:
        fs.mkdir("/d")
        vol = fs.volume
        d = namei.resolve(vol, "/d")
        real = d.size
        d.size = (5 << 30) + real                 # (in memory only: the image keeps its size)
        raw = d.encode()
        d.size = real
        d.encode()
        assert Inode(vol, d.ino, raw).size == (5 << 30) + real
    assert_fsck_clean(img)
