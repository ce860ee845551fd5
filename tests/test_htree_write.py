"""Writing htree (dir_index) directories: the index kept as Linux ext4 keeps it.

Directories indexed by ``e2fsck -fyD`` (after ``mke2fs -d``) or by Linux itself (a loop mount,
root only) are changed through xipfs: thousands of names added (leaf splits, a new index level,
node splits; three levels with large_dir), names removed, renamed within and across
directories, replaced. After each scenario: ``e2fsck -fn`` is clean, the directory is still
indexed and ``debugfs -R "htree DIR"`` walks it to exactly the expected names, xipfs's own htree
lookup finds every name (and no absent one), the listing equals the model, and a Linux
read-only loop mount finds every name (root only). A writer killed after each store of a leaf
split or of a new level is repaired by e2fsck, nothing lost.
"""

from __future__ import annotations

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


def check(img: str, model: Model, absent: tuple[str, ...] = ("absent-1", "nothere", "f99999")) -> None:
    """e2fsck clean; every directory indexed, walked by debugfs and found by xipfs's htree
    lookup name by name; the listing is the model; Linux finds every name (root only)."""
    assert_fsck_clean(img)
    inos: dict[str, dict[str, int]] = {}
    with xipfs.open(img, "r") as fs:
        vol = fs.volume
        for d, names in model.items():
            node = namei.resolve(vol, "/" + d)
            assert node.flags & L.FL_INDEX, f"/{d} lost its index"
            assert set(fs.listdir("/" + d)) == names
            inos[d] = {}
            for n in names:
                found = htree_lookup(vol, node, n)
                assert found is not None, f"/{d}/{n} not found through the index"
                assert found[0] == fs.lstat(f"/{d}/{n}").st_ino
                inos[d][n] = found[0]
            for n in absent:
                assert htree_lookup(vol, node, n) is None
        for d, names in model.items():
            seen = debugfs_htree_names(img, d)
            assert sorted(seen) == sorted(names), f"debugfs htree /{d}"
    if IS_ROOT:
        with mounted(img) as mnt:
            for d, names in model.items():
                assert set(os.listdir(os.path.join(mnt, d))) == names
                for n in names:
                    assert os.stat(os.path.join(mnt, d, n)).st_ino == inos[d][n]


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


@pytest.mark.slow
def test_large_dir_three_levels(writable: None, work: str) -> None:
    """1 KiB blocks with large_dir: long names until the index has three levels."""
    img, model = indexed_image(work, 1024, features="large_dir", dirs={"d": 300, "e": 100}, size="160M",
                               inodes=40000)
    with xipfs.open(img, "r+") as fs:
        i = 0
        while True:
            batch = [f"{i + k:06d}-" + "L" * 240 for k in range(500)]
            for n in batch:
                fs.write_bytes(f"/d/{n}", b"")
            model["d"].update(batch)
            i += len(batch)
            node = namei.resolve(fs.volume, "/d")
            if node._dx and node._dx.get(0) and node._dx[0].indirect_levels == 2:
                break
            assert i < 36000
        for n in random.Random(3).sample(sorted(model["d"]), 3000):
            fs.unlink(f"/d/{n}")
            model["d"].discard(n)
    assert levels(img, "d") == 2
    check(img, model)


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
