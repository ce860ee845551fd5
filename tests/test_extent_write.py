"""The write side of the extent tree (``ExtentMap.assign``/``truncate``) through the public API.

ext4 images open read-only today, so these tests widen the writable feature masks (they are
read at ``xipfs.open`` time). Files come from ``mke2fs -d`` (they have extents already: a
file xipfs creates itself gets an indirect map). After each scenario: ``e2fsck -fn`` is clean,
xipfs reads back a model, ``debugfs ex`` shows the tree expected and, as root, a loop mount
reads the same bytes. The crash tests record every device store of one tree change and run
``e2fsck -p`` on the image after each prefix of them: it must repair every one alone.
"""

from __future__ import annotations

import errno
import os
import random
import re
import shutil

import pytest
from conftest import IS_ROOT, mounted
from e2fs import SHM, debugfs_r, e2fsck, fsck_problems, mkfs, run

import xipfs
from xipfs.extfs import data as D
from xipfs.extfs import layout as L
from xipfs.extfs import namei

FEATURES = "^has_journal,^metadata_csum,^orphan_file,^resize_inode"
#: e2fsck's offers to rebuild a sparse tree: not errors (PR_NOT_A_FIX), Linux's trees get them too.
#: A line of ``debugfs ex``: level/depth, entry/entries, logical range, physical (range), length, flags.
_EX_LINE = re.compile(r"\s*(\d+)/\s*(\d+)\s+(\d+)/\s*(\d+)\s+(\d+) -\s*(\d+)\s+(\d+)(?: -\s*\d+)?"
                      r"\s+(\d+)\s*(\w*)")
_OPTIMIZE = re.compile(r"extent tree \(at level \d+\) could be (narrower|shorter)\.\s+Optimize\? no")


@pytest.fixture(autouse=True)
def ext4_writable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let xipfs open these ext4 images for writing."""
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE",
                        L.INCOMPAT_WRITABLE | L.INCOMPAT_EXTENTS | L.INCOMPAT_64BIT | L.INCOMPAT_FLEX_BG)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.RO_COMPAT_HUGE_FILE
                        | L.RO_COMPAT_DIR_NLINK | L.RO_COMPAT_EXTRA_ISIZE)


@pytest.fixture
def workdir():
    """A directory in shared memory (fast for the tools), removed afterwards."""
    path = os.path.join(SHM, f"xipfs-extw-{os.getpid()}-{random.getrandbits(32):08x}")
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_image(workdir: str, files: dict[str, bytes | list[tuple[int, bytes]]], *, bs: int = 1024,
               size: str = "16M", features: str = FEATURES) -> str:
    """An ext4 image holding ``files`` (bytes, or ``(offset, bytes)`` pieces of a sparse file)."""
    src = os.path.join(workdir, "src")
    os.makedirs(src, exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(src, name), "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                for off, piece in content:
                    f.seek(off)
                    f.write(piece)
    return mkfs(os.path.join(workdir, "img"), size, bs=bs, src=src, fstype="ext4",
                extra=("-O", features))


def fsck_clean(img: str, *, optimize_ok: bool = True) -> None:
    """``e2fsck -fn`` finds nothing (offers to make a sparse tree narrower aside, if allowed)."""
    rc, out = e2fsck(img, "-fn")
    problems = [p for p in fsck_problems(out) if p.strip()]
    if optimize_ok:
        problems = [p for p in problems if not _OPTIMIZE.search(p)]
    assert rc == 0 and not problems, out


def tree(img: str, path: str) -> tuple[int, list[tuple[int, int, int, bool]], list[int]]:
    """``debugfs ex``: (depth, leaf extents ``(lblk, len, pblk, uninit)``, entries per level)."""
    out = debugfs_r(img, f'ex "{path}"').decode()
    depth = 0
    leaves: list[tuple[int, int, int, bool]] = []
    per_level: dict[int, int] = {}
    for line in out.splitlines()[1:]:
        m = _EX_LINE.match(line)
        if not m:
            continue
        level, depth = int(m[1]), int(m[2])
        if int(m[3]) == 1:
            per_level[level] = per_level.get(level, 0) + int(m[4])
        if level == depth:
            leaves.append((int(m[5]), int(m[8]), int(m[7]), m[9] == "Uninit"))
    return depth, leaves, [per_level.get(i, 0) for i in range(depth + 1)]


def linux_reads(img: str, models: dict[str, bytes | bytearray]) -> None:
    """As root: a loop mount reads every file as the model says."""
    if not IS_ROOT:
        return
    with mounted(img) as mnt:
        for path, want in models.items():
            with open(mnt + path, "rb") as f:
                assert f.read() == bytes(want), path


def interleave(fs: xipfs.Filesystem, models: dict[str, bytearray], rounds: int, rnd: random.Random,
               size: tuple[int, int] = (1, 1024)) -> None:
    """Append to every file in turn (each file's blocks come out interleaved with the others')."""
    for _ in range(rounds):
        for path, model in models.items():
            piece = rnd.randbytes(rnd.randint(*size))
            with fs.open(path, "ab") as f:
                f.write(piece)
            model += piece


def sparse(count: int, start: int = 0, step: int = 2, bs: int = 1024) -> list[tuple[int, bytes]]:
    """A sparse file of ``count`` one-block extents, ``step`` blocks apart from block ``start``."""
    return [((start + i * step) * bs, bytes([i % 251 + 1]) * bs) for i in range(count)]


def model_of(pieces: list[tuple[int, bytes]]) -> bytearray:
    out = bytearray()
    for off, piece in pieces:
        out[len(out):off] = bytes(max(0, off - len(out)))
        out[off:off + len(piece)] = piece
    return out


# -- growing trees ----------------------------------------------------------------------------------
def test_interleaved_appends_grow_depth_1_and_2(workdir):
    """Four files appended a block at a time in turn: every block its own extent, trees of depth
    1 then 2 (root splits, leaf splits, new leaves), one file kept sequential merges into one."""
    img = make_image(workdir, {n: b"" for n in "abcd"} | {"seq": b""})
    rnd = random.Random(5)
    models = {f"/{n}": bytearray() for n in "abcd"}
    seq = bytearray()
    with xipfs.open(img, "r+") as fs:
        interleave(fs, models, 3, rnd, (1024, 1024))            # 3 blocks each: depth 0
        for p in models:
            assert fs.read_bytes(p) == models[p]
        interleave(fs, models, 400, rnd, (1024, 1024))
        with fs.open("/seq", "ab") as f:
            for _ in range(64):
                piece = rnd.randbytes(4096)
                f.write(piece)
                seq += piece
        for p in models:
            assert fs.read_bytes(p) == models[p]
    fsck_clean(img, optimize_ok=False)
    depth, leaves, per_level = tree(img, "/a")
    assert depth == 2 and len(leaves) >= 336, per_level
    assert per_level[2] == len(leaves) and all(e[1] == 1 for e in leaves)
    depth, leaves, _ = tree(img, "/seq")
    assert depth == 0 and len(leaves) <= 2, leaves
    with xipfs.open(img) as fs:
        for p in models:
            assert fs.read_bytes(p) == models[p]
    linux_reads(img, models | {"/seq": seq})


@pytest.mark.parametrize("bs", [1024, 4096])
def test_random_writes_holes_and_merges(workdir, bs):
    """Random pwrites (into holes, over data, past EOF) on a sparse file: the tree stays valid,
    the data is the model's, and blocks written in order merge into few extents."""
    pieces = sparse(30, start=3, step=5, bs=bs)
    img = make_image(workdir, {"f": pieces, "g": b"", "h": b""}, bs=bs, size="32M")
    model = model_of(pieces)
    rnd = random.Random(bs)
    with xipfs.open(img, "r+") as fs:
        with fs.open("/f", "r+b", buffering=0) as f:
            for _ in range(300):
                off = rnd.randrange(0, 400 * bs)
                piece = rnd.randbytes(rnd.randint(1, 3 * bs))
                f.seek(off)
                f.write(piece)
                model[len(model):off] = bytes(max(0, off - len(model)))
                model[off:off + len(piece)] = piece
        assert fs.read_bytes("/f") == model
        with fs.open("/g", "r+b", buffering=0) as f:   # a block at a time: one extent grows
            for i in range(40):
                f.write(bytes([i + 1]) * bs)
        with fs.open("/h", "r+b", buffering=0) as f:   # from the end down: a new first extent each time
            for i in reversed(range(40)):
                f.seek(i * bs)
                f.write(bytes([i + 1]) * bs)
    fsck_clean(img)
    assert len(tree(img, "/g")[1]) == 1
    g = b"".join(bytes([i + 1]) * bs for i in range(40))
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/f") == model and fs.read_bytes("/g") == g and fs.read_bytes("/h") == g
    linux_reads(img, {"/f": model, "/g": g, "/h": g})


# -- unwritten extents --------------------------------------------------------------------------------
def test_writes_into_unwritten_extents(workdir):
    """debugfs fallocate makes unwritten extents; writing into them splits them, the written
    part initialized, the rest still reading zeros; filling the whole merges them back."""
    img = make_image(workdir, {"u": b"", "v": b""})
    run(["debugfs", "-w", "-R", "fallocate /u 0 299", img])
    run(["debugfs", "-w", "-R", "sif /u size 307200", img])
    assert all(e[3] for e in tree(img, "/u")[1])
    model = bytearray(300 * 1024)
    with xipfs.open(img, "r+") as fs:
        with fs.open("/u", "r+b", buffering=0) as f:
            for off, n in ((5000, 3000), (100 * 1024, 1024), (299 * 1024 + 10, 1014), (0, 10)):
                piece = os.urandom(n)
                f.seek(off)
                f.write(piece)
                model[off:off + n] = piece
        assert fs.read_bytes("/u") == model
    fsck_clean(img)
    leaves = tree(img, "/u")[1]
    written = [e for e in leaves if not e[3]]
    assert {e[0] for e in written} >= {0, 100, 299} and any(e[3] for e in leaves)
    with xipfs.open(img, "r+") as fs, fs.open("/u", "r+b", buffering=0) as f:
        piece = os.urandom(len(model))
        f.write(piece)
        model[:] = piece
    fsck_clean(img)
    leaves = tree(img, "/u")[1]
    assert not any(e[3] for e in leaves) and len(leaves) <= 4, leaves
    linux_reads(img, {"/u": model})


def test_fallocate_and_get_xip_mem_create(workdir):
    """``data.fallocate`` and ``get_xip_mem(create=True)`` fill holes with zeroed blocks."""
    img = make_image(workdir, {"f": sparse(12, start=1, step=3)})
    model = model_of(sparse(12, start=1, step=3))
    with xipfs.open(img, "r+") as fs:
        vol = fs.volume
        with vol.lock:
            node = namei.resolve(vol, "/f")
            D.fallocate(vol, node, 0, 80 * 1024)
        model += bytes(80 * 1024 - len(model))
        view = fs.get_xip_mem("/f", 79, create=True)
        assert view is not None and bytes(view) == bytes(1024)
        assert fs.read_bytes("/f") == model
    fsck_clean(img)
    depth, leaves, _ = tree(img, "/f")
    assert sum(e[1] for e in leaves) == 80


# -- truncate -----------------------------------------------------------------------------------------
def test_truncate_frees_and_collapses(workdir):
    """Cutting a depth-2 tree: partial leaves, whole subtrees dropped, the tree back in the
    inode once it fits; every block comes back (e2fsck counts them)."""
    pieces = sparse(420)
    img = make_image(workdir, {"f": pieces, "h": pieces[:100]})
    assert tree(img, "/f")[0] == 2
    model = model_of(pieces)
    with xipfs.open(img, "r+") as fs:
        free0 = fs.statvfs("/").f_bfree
        for size in (700 * 1024 + 77, 500 * 1024, 300 * 1024 + 5, 7 * 1024):
            fs.truncate("/f", size)
            del model[size:]
            assert fs.read_bytes("/f") == model
        fs.truncate("/h", 0)
        fs.truncate("/f", 0)
        assert fs.read_bytes("/f") == b""
        freed = fs.statvfs("/").f_bfree - free0
        assert freed >= 520, freed
    fsck_clean(img, optimize_ok=False)
    assert tree(img, "/f")[0] == 0 and tree(img, "/h")[0] == 0


def test_truncate_to_few_extents_moves_tree_into_inode(workdir):
    pieces = sparse(200)
    img = make_image(workdir, {"f": pieces})
    model = model_of(pieces)
    with xipfs.open(img, "r+") as fs:
        fs.truncate("/f", 6 * 1024 + 100)
        del model[6 * 1024 + 100:]
        assert fs.read_bytes("/f") == model
        with fs.open("/f", "ab") as f:                # and it grows again from there
            f.write(b"z" * 9000)
        model += b"z" * 9000
    fsck_clean(img, optimize_ok=False)
    depth, leaves, _ = tree(img, "/f")
    assert depth == 0 and len(leaves) <= 4, leaves
    linux_reads(img, {"/f": model})


# -- running out of space -----------------------------------------------------------------------------
def test_enospc_leaves_a_valid_tree(workdir):
    """Interleaved appends until the disk is full: whatever was written reads back, the trees
    (grown on the way) are valid, and e2fsck agrees with every count."""
    img = make_image(workdir, {n: b"" for n in "abc"}, size="3M")
    rnd = random.Random(7)
    models = {f"/{n}": bytearray() for n in "abc"}
    full = False
    with xipfs.open(img, "r+") as fs:
        while not full:
            for path, model in models.items():
                piece = rnd.randbytes(rnd.randint(500, 3000))
                with fs.open(path, "ab", buffering=0) as f:
                    try:
                        model += piece[:f.write(piece)]
                    except OSError as err:
                        assert err.errno == errno.ENOSPC
                        full = True
        for path, model in models.items():
            assert fs.read_bytes(path) == model
        fs.truncate("/b", 1000)                       # space comes back and can be used again
        models["/b"][1000:] = b""
        with fs.open("/c", "ab", buffering=0) as f:
            f.write(b"q" * 50000)
        models["/c"] += b"q" * 50000
    fsck_clean(img)
    assert max(tree(img, p)[0] for p in models) >= 1
    with xipfs.open(img) as fs:
        for path, model in models.items():
            assert fs.read_bytes(path) == model
    linux_reads(img, models)


# -- metadata_csum ------------------------------------------------------------------------------------
def test_metadata_csum_extent_blocks(workdir, monkeypatch):
    """With metadata_csum every new or changed extent block carries its checksum tail (and the
    rest of the write path keeps the inode, bitmap and descriptor checksums)."""
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.RO_COMPAT_METADATA_CSUM)
    img = make_image(workdir, {"f": sparse(100), "g": b""},
                     features="^has_journal,^orphan_file,^resize_inode")
    model = model_of(sparse(100))
    with xipfs.open(img, "r+") as fs:
        with fs.open("/f", "r+b", buffering=0) as f:
            for i in range(0, 200, 2):                # fill every hole: splits and merges
                f.seek(i * 1024 + 1024)
                f.write(b"h" * 1024)
                model[i * 1024 + 1024:i * 1024 + 2048] = b"h" * 1024
        fs.truncate("/f", 150 * 1024)
        del model[150 * 1024:]
    fsck_clean(img)
    with xipfs.open(img) as fs:                       # the read side checks every tail
        assert fs.read_bytes("/f") == model


# -- a writer killed at any store ---------------------------------------------------------------------
def record_stores(fs: xipfs.Filesystem) -> list[tuple[int, bytes]]:
    """From now on, every store to the device (offset, bytes), in order."""
    dev = fs.volume.device
    stores: list[tuple[int, bytes]] = []
    write, write_new = dev.write, dev.write_new

    def rec_write(data, offset):
        stores.append((offset, bytes(data)))
        write(data, offset)

    def rec_write_new(data, offset):
        stores.append((offset, bytes(data)))
        write_new(data, offset)

    dev.write, dev.write_new = rec_write, rec_write_new
    return stores


def every_prefix_repairs(workdir: str, before: bytes, stores: list[tuple[int, bytes]]) -> None:
    """The image after each prefix of ``stores`` is one ``e2fsck -p`` repairs alone."""
    path = os.path.join(workdir, "crash.img")
    for k in range(len(stores) + 1):
        image = bytearray(before)
        for off, data in stores[:k]:
            image[off:off + len(data)] = data
        with open(path, "wb") as f:
            f.write(image)
        rc, out = e2fsck(path, "-fp")
        assert rc in (0, 1), f"killed after store {k} of {len(stores)}:\n{out}"


CRASH_CASES = {
    # name: (files, operation on fs)
    "grow root": ({"f": sparse(4)}, lambda fs: _pwrite(fs, "/f", 9 * 1024, b"x" * 1024)),
    "split leaf middle": ({"f": sparse(84, step=3)},
                          lambda fs: _pwrite(fs, "/f", 1024, b"m" * 1024)),
    "new leaf past eof": ({"f": sparse(84, step=3)},
                          lambda fs: _pwrite(fs, "/f", 400 * 1024, b"e" * 1024)),
    "append depth 1": ({"f": sparse(20)}, lambda fs: fs.open("/f", "ab").write(b"a" * 3000)),
    "front of leftmost leaf": ({"f": sparse(20, start=10)}, lambda fs: _pwrite(fs, "/f", 0, b"0" * 1024)),
    "truncate collapse": ({"f": sparse(400)}, lambda fs: fs.truncate("/f", 5 * 1024)),
    "truncate middle": ({"f": sparse(400)}, lambda fs: fs.truncate("/f", 401 * 1024 + 3)),
}


def _pwrite(fs: xipfs.Filesystem, path: str, off: int, data: bytes) -> None:
    with fs.open(path, "r+b", buffering=0) as f:
        f.seek(off)
        f.write(data)


@pytest.mark.parametrize("case", list(CRASH_CASES))
def test_killed_at_any_store(workdir, case):
    files, op = CRASH_CASES[case]
    img = make_image(workdir, files, size="4M")
    with xipfs.open(img, "r+") as fs:
        fs.sync()
        with open(img, "rb") as f:
            before = f.read()
        stores = record_stores(fs)
        op(fs)
        n = len(stores)
    assert n >= 2
    fsck_clean(img)
    every_prefix_repairs(workdir, before, stores[:n])
