"""File mappings (``fs.mmap``, ``fs.map_array``, ``xipfs.mapping``).

What the tests hold the design to:

* content: a mapping shows exactly the file (holes as zeros), whatever the size, the block
  size, the device, the offset and the length; bad arguments fail as ``mmap.mmap`` fails;
* no copy on XIP: stores through a ``"w"`` mapping are in the image file at once, and stores
  into the image reach a mapping at once;
* safety: ``"r"`` mappings refuse writes, ``close()`` refuses while views exist, nothing the
  Python code can do crashes the interpreter;
* holes get blocks before a ``"w"`` mapping can write into them; size changes and unlinks
  while mapped behave as documented; copies write back on ``flush()``/``close()``;
* the kernel-mapping budget, and that every mapping gives its share back;
* several processes share one copy of a mapped file (PSS), see each other's stores, and a
  writer never frees or reuses the blocks of a file another process maps (pins).
"""

from __future__ import annotations

import contextlib
import errno
import gc
import hashlib
import json
import mmap
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator

import e2fs
import pytest

import xipfs

PAGE = mmap.PAGESIZE
MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "map_worker.py")
SRC = os.path.dirname(os.path.dirname(os.path.abspath(xipfs.__file__)))
SMAPS = "/proc/self/smaps_rollup"


# -- content ---------------------------------------------------------------------------------
def _sparse(size: int, pieces: list[tuple[int, int]]) -> bytes:
    out = bytearray(size)
    for off, n in pieces:
        out[off:off + n] = os.urandom(n)
    return bytes(out)


#: Pieces of /sparse (everything else is a hole: at the start, between pieces, at the end).
SPARSE_PIECES = [(70_000, 5000), (300_000, 200_000), (700_000, 10)]
SPARSE_SIZE = 1_000_000
CONTENT = {
    "/one": os.urandom(1),
    "/page": os.urandom(PAGE),
    "/page1": os.urandom(PAGE + 1),
    "/big": os.urandom(5 * MiB),                 # indirect and double-indirect blocks
    "/sparse": _sparse(SPARSE_SIZE, SPARSE_PIECES),
}


def write_file(fs: xipfs.Filesystem, path: str, data: bytes, pieces=None) -> None:
    """Write ``data`` to ``path``; with ``pieces`` only those ranges (the rest stays holes)."""
    if pieces is None:
        fs.write_bytes(path, data)
        return
    with fs.open(path, "wb", buffering=0) as f:
        for off, n in pieces:
            f.seek(off)
            f.write(data[off:off + n])
        f.truncate(len(data))


def populate(fs: xipfs.Filesystem) -> None:
    for path, data in CONTENT.items():
        write_file(fs, path, data, SPARSE_PIECES if path == "/sparse" else None)
    fs.write_bytes("/empty", b"")
    fs.mkdir("/dir")


# -- images and tools ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shm() -> Iterator[str]:
    """A private directory in /dev/shm for this module's images."""
    path = tempfile.mkdtemp(prefix="xipfs-mapping-", dir="/dev/shm")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def images(shm: str) -> dict[int, str]:
    """Block size -> an image holding CONTENT (never changed by the tests)."""
    out = {}
    for bs in (1024, 2048, 4096):
        img = os.path.join(shm, f"content-{bs}.img")
        xipfs.mkfs(img, 32 * MiB, block_size=bs)
        with xipfs.open(img, "r+") as fs:
            populate(fs)
        out[bs] = img
    return out


@pytest.fixture
def new_image(shm: str, request: pytest.FixtureRequest) -> Iterator:
    """``new_image(size, bs)``: a fresh empty image; after the test, ``e2fsck -fn`` must find
    it clean (whatever the test did to it), then it is removed."""
    made: list[str] = []

    def make(size: int = 16 * MiB, bs: int = 4096) -> str:
        img = os.path.join(shm, f"{request.node.name[:60]}-{len(made)}.img".replace("/", "_"))
        xipfs.mkfs(img, size, block_size=bs)
        made.append(img)
        return img

    yield make
    gc.collect()                       # mappings dropped without close() give everything back
    try:
        for img in made:
            if os.path.exists(img) and shutil.which("e2fsck"):
                assert_fsck_clean(img)
    finally:
        for img in made:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(img)


@pytest.fixture(autouse=True)
def budget_restored() -> Iterator[None]:
    """Every test leaves the process-wide mapping budget as it found it."""
    old = xipfs.map_budget()
    yield
    xipfs.set_map_budget(max_maps=old["max_maps"], min_run_bytes=old["min_run_bytes"])


def assert_fsck_clean(img: str) -> None:
    if shutil.which("e2fsck") is None:
        pytest.skip("e2fsck (e2fsprogs) is not installed")
    e2fs.assert_fsck_clean(img, exit_only=True)


def device_offset(fs: xipfs.Filesystem, path: str, pos: int) -> int:
    """Byte offset in the image of byte ``pos`` of ``path`` (which must not be in a hole)."""
    bs = fs.block_size
    blk = pos // bs
    for lblk, count, pblk in fs.block_runs(path):
        if lblk <= blk < lblk + count:
            assert pblk, f"byte {pos} of {path} is in a hole"
            return (pblk + blk - lblk) * bs + pos % bs
    raise AssertionError(f"byte {pos} of {path} is past its blocks")


def holes(fs: xipfs.Filesystem, path: str) -> list[tuple[int, int]]:
    """``(first block, count)`` of every hole of ``path`` inside its size."""
    nblocks = -(-fs.stat(path).st_size // fs.block_size)
    out, pos = [], 0
    for lblk, count, pblk in fs.block_runs(path):
        if lblk > pos:
            out.append((pos, lblk - pos))
        if not pblk:
            out.append((lblk, count))
        pos = lblk + count
    if pos < nblocks:
        out.append((pos, nblocks - pos))
    return out


def bfree(fs: xipfs.Filesystem) -> int:
    return fs.statvfs("/").f_bfree


def used() -> int:
    return xipfs.map_budget()["used"]


def fragment(fs: xipfs.Filesystem, path: str, blocks: int) -> bytes:
    """Write ``path`` one block at a time, interleaved with another file: runs of one block."""
    data = os.urandom(blocks * fs.block_size)
    bs = fs.block_size
    with fs.open(path, "wb", buffering=0) as f, fs.open(path + ".other", "wb", buffering=0) as g:
        for i in range(blocks):
            f.write(data[i * bs:(i + 1) * bs])
            g.write(b"o" * bs)
    return data


def run_child(code: str, timeout: int = 60) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (xipfs importable); its result, output as text."""
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=env)


class Worker:
    """A ``map_worker.py`` child: maps (or copies) a file of an image and answers commands."""

    def __init__(self, img: str, path: str, mode: str = "map") -> None:
        env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen([sys.executable, WORKER, img, path, mode], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        ready = self._line().split()
        assert ready[0] == "ready", ready
        self.is_xip = ready[1] == "1"
        self.length = int(ready[2])

    def _line(self, timeout: float = 60) -> str:
        if not select.select([self.proc.stdout], [], [], timeout)[0]:
            self.kill()
            raise AssertionError("worker did not answer in time")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise AssertionError(f"worker died ({self.proc.returncode}): {self.proc.stderr.read()}")
        return line.strip()

    def ask(self, command: str) -> str:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._line()

    def read(self, off: int, n: int) -> bytes:
        return bytes.fromhex(self.ask(f"read {off} {n}").split()[1] if n else "")

    def pss_kb(self) -> int:
        return int(self.ask("pss").split()[1])

    def sha(self) -> str:
        return self.ask("sha").split()[1]

    def stop(self) -> int:
        """Ask it to exit; its exit status."""
        self.proc.stdin.write("exit\n")
        self.proc.stdin.close()
        rc = self.proc.wait(30)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@contextlib.contextmanager
def workers(img: str, path: str, mode: str = "map", n: int = 1) -> Iterator[list[Worker]]:
    """``n`` live workers; any still running at the end are killed."""
    live: list[Worker] = []
    try:
        for _ in range(n):
            live.append(Worker(img, path, mode))
        yield live
    finally:
        for w in live:
            w.kill()


# -- 1. content ------------------------------------------------------------------------------
#: How an image is opened: (block size, xip) and whether its 4096-byte-block mappings are XIP.
SETUPS = {"xip-4k": (4096, None), "file-4k": (4096, False), "xip-1k": (1024, None),
          "xip-2k": (2048, None)}


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("path", list(CONTENT))
def test_mapping_shows_the_file(images, setup, path):
    """Every byte through a mapping equals the file (holes as zeros); it is XIP exactly on a
    memory device with page-sized blocks, a copy on the file device and with 1K/2K blocks."""
    xipfs.set_map_budget(min_run_bytes=0)       # even the short runs of /sparse are stitched
    bs, xip = SETUPS[setup]
    with xipfs.open(images[bs], xip=xip) as fs, fs.mmap(path) as m:
        assert len(m) == len(CONTENT[path])
        assert m[:] == CONTENT[path]
        assert m.is_xip is (setup == "xip-4k")
        assert not m.writable
        assert isinstance(m, mmap.mmap)


@pytest.mark.parametrize("setup", ["xip-4k", "file-4k", "xip-1k"])
@pytest.mark.parametrize(("path", "offset", "length"), [
    ("/big", PAGE, None), ("/big", 3 * PAGE, 1), ("/big", 256 * PAGE, 100_000),
    ("/big", 5 * MiB - PAGE, PAGE), ("/page1", PAGE, None), ("/sparse", 16 * PAGE, 300_000),
    ("/sparse", 73 * PAGE, PAGE + 1), ("/sparse", 200 * PAGE, None),
])
def test_offset_and_length(images, setup, path, offset, length):
    """``offset``/``length`` select exactly that part of the file, as ``mmap.mmap`` does."""
    xipfs.set_map_budget(min_run_bytes=0)
    bs, xip = SETUPS[setup]
    data = CONTENT[path]
    want = data[offset:] if length is None else data[offset:offset + length]
    with xipfs.open(images[bs], xip=xip) as fs, fs.mmap(path, offset=offset, length=length) as m:
        assert m.offset == offset
        assert len(m) == len(want)
        assert m[:] == want


@pytest.mark.parametrize(("path", "kwargs", "exc", "code"), [
    ("/big", {"offset": 1}, ValueError, None),
    ("/big", {"offset": PAGE + 512}, ValueError, None),
    ("/big", {"offset": -PAGE}, ValueError, None),
    ("/big", {"offset": 6 * MiB}, ValueError, None),
    ("/big", {"length": 5 * MiB + 1}, ValueError, None),
    ("/big", {"offset": PAGE, "length": 5 * MiB}, ValueError, None),
    ("/big", {"length": -1}, ValueError, None),
    ("/big", {"length": 0}, ValueError, None),
    ("/page", {"offset": PAGE}, ValueError, None),
    ("/big", {"access": "x"}, ValueError, None),
    ("/empty", {}, ValueError, None),
    ("/dir", {}, OSError, errno.EISDIR),
    ("/", {}, OSError, errno.EISDIR),
    ("/missing", {}, OSError, errno.ENOENT),
    ("/dir/missing", {}, OSError, errno.ENOENT),
    ("/one/x", {}, OSError, errno.ENOTDIR),
])
def test_bad_arguments(images, path, kwargs, exc, code):
    """Bad offsets and lengths raise ValueError like ``mmap.mmap``; an empty file ValueError;
    directories EISDIR; missing paths ENOENT. Nothing is left held in the budget."""
    before = used()
    with xipfs.open(images[4096]) as fs:
        with pytest.raises(exc) as info:
            fs.mmap(path, **kwargs)
        if code is not None:
            assert info.value.errno == code
    assert used() == before


# -- 2. no copy ------------------------------------------------------------------------------
def test_writes_through_a_mapping_are_in_the_image_at_once(new_image):
    """A store into an XIP "w" mapping is in the image file at the block's device offset at
    once (no flush), so the mapping is the storage, not a copy of it."""
    img = new_image()
    data = os.urandom(64 * PAGE + 100)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
        fd = os.open(img, os.O_RDONLY)
        try:
            with fs.mmap("/f", "w") as m:
                assert m.is_xip and m.writable
                for pos in (0, PAGE - 2, 10 * PAGE + 7, 40 * PAGE, len(data) - 5):
                    new = os.urandom(5)
                    m[pos:pos + 5] = new
                    assert os.pread(fd, 5, device_offset(fs, "/f", pos)) == new
                    assert fs.read_bytes("/f")[pos:pos + 5] == new
        finally:
            os.close(fd)
    assert_fsck_clean(img)


def test_stores_into_the_file_show_in_a_mapping_at_once(new_image):
    """A read-only XIP mapping sees ``pwrite`` through a file object and stores into the image
    file itself the moment they happen, with no new mapping."""
    img = new_image()
    data = os.urandom(32 * PAGE)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
        with fs.mmap("/f") as m, fs.open("/f", "r+b", buffering=0) as f:
            assert m.is_xip
            f.pwrite(b"through a file", 5 * PAGE - 3)
            assert m[5 * PAGE - 3:5 * PAGE + 11] == b"through a file"
            fd = os.open(img, os.O_WRONLY)
            try:
                os.pwrite(fd, b"raw store", device_offset(fs, "/f", 20 * PAGE + 1))
            finally:
                os.close(fd)
            assert m[20 * PAGE + 1:20 * PAGE + 10] == b"raw store"


# -- 3. read-only safety ---------------------------------------------------------------------
@pytest.mark.parametrize("bs", [4096, 1024], ids=["xip", "copy"])
def test_read_only_mapping_refuses_writes(images, bs):
    """An "r" mapping, XIP or copy, is read-only everywhere: slices, items, write() and its
    memoryview all refuse (TypeError), and the content stays."""
    with xipfs.open(images[bs]) as fs, fs.mmap("/page1") as m:
        assert m.is_xip is (bs == 4096)
        with pytest.raises(TypeError):
            m[0:1] = b"x"
        with pytest.raises(TypeError):
            m[0] = 1
        with pytest.raises(TypeError):
            m.write(b"x")
        with memoryview(m) as view:
            assert view.readonly
            with pytest.raises(TypeError):
                view[0] = 1
        with pytest.raises(OSError):
            m.resize(10)
        assert m[:] == CONTENT["/page1"]


@pytest.mark.parametrize("bs", [4096, 1024], ids=["xip", "copy"])
def test_read_only_arrays_refuse_writes(images, bs):
    """numpy arrays over an "r" mapping (frombuffer, map_array) are not writeable."""
    np = pytest.importorskip("numpy")
    with xipfs.open(images[bs]) as fs:
        with fs.mmap("/page1") as m:
            arr = np.frombuffer(m, dtype=np.uint8)
            assert not arr.flags.writeable
            with pytest.raises(ValueError):
                arr[0] = 1
            del arr
        arr = fs.map_array("/page1", "uint8")
        with pytest.raises(ValueError):
            arr[:] = 0
        assert arr.tobytes() == CONTENT["/page1"]


def test_close_refused_while_a_view_exists(images):
    """``close()`` raises BufferError while a memoryview exists and unmaps nothing (the view
    still reads the file); once released, close works and gives the budget back."""
    before = used()
    with xipfs.open(images[4096]) as fs:
        m = fs.mmap("/big")
        assert used() == before + m.runs
        view = memoryview(m)
        with pytest.raises(BufferError):
            m.close()
        assert not m.closed
        assert used() == before + m.runs
        assert view[-PAGE:] == CONTENT["/big"][-PAGE:]
        view.release()
        m.close()
        assert m.closed
        m.close()                               # twice is fine
        assert used() == before
        with pytest.raises(ValueError):
            m[0:1]


def test_read_only_filesystem_refuses_writable_mappings(images):
    """A filesystem opened "r" gives only "r" mappings: access="w" is EROFS (XIP and copy)."""
    for bs, xip in ((4096, None), (4096, False), (1024, None)):
        with xipfs.open(images[bs], xip=xip) as fs:
            with pytest.raises(OSError) as info:
                fs.mmap("/page", "w")
            assert info.value.errno == errno.EROFS


RISKY = """
    import gc, os, xipfs
    img = {img!r}
    xipfs.set_map_budget(min_run_bytes=0)
    fs = xipfs.open(img, "r+")
    data = os.urandom(300_000)
    fs.write_bytes("/r", data)

    # a view outlives its mapping's last name and a refused close
    m = fs.mmap("/r")
    v = memoryview(m)
    try:
        m.close()
    except BufferError:
        pass
    del m; gc.collect()
    assert v[:] == data
    v.release(); gc.collect()

    # a shrink under a read-only mapping: every page still readable (zeros past the end)
    m = fs.mmap("/r")
    fs.truncate("/r", 5000)
    assert m[:5000] == data[:5000] and m[5000:] == bytes(len(data) - 5000)
    fs.write_bytes("/r", data)                # grow again: new blocks, the old mapping is safe
    assert m[5000:] == bytes(len(data) - 5000)
    m.close()

    # closed mappings raise, never touch memory
    m = fs.mmap("/r", "w")
    m[0:3] = b"abc"
    m.close()
    for op in (lambda: m[0], lambda: m[0:1], lambda: m.flush(), lambda: m.write(b"x")):
        try:
            op()
        except ValueError:
            pass
        else:
            raise AssertionError("a closed mapping answered")

    # numpy over a mapping the code no longer names, and after the filesystem closes
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        arr = np.frombuffer(fs.mmap("/r"), dtype=np.uint8)
        gc.collect()
        assert arr.tobytes()[3:] == data[3:]
        a2 = fs.map_array("/r", "uint16", offset=10)
    m3 = fs.mmap("/r")
    fs.unlink("/r")
    fs.close()
    assert m3[3:] == data[3:]                 # pages stay mapped after close
    if np is not None:
        assert a2.tobytes() == data[10:10 + 2 * ((len(data) - 10) // 2)]
        int(arr.sum()), int(a2.sum())
        del arr, a2
    m3.close()
    gc.collect()
    print("ok")
"""


def test_risky_sequences_do_not_crash(new_image):
    """Views outliving close attempts, shrinks under a mapping, closed mappings, arrays
    outliving their mapping's name and the filesystem: a child runs them all and exits 0."""
    img = new_image()
    proc = run_child(RISKY.format(img=img))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith("ok")


# -- 4. holes --------------------------------------------------------------------------------
def test_writable_mapping_gives_holes_blocks_first(new_image):
    """A "w" mapping over a sparse file allocates zeroed blocks for the holes in its range
    (and only there) before mapping; holes read as zeros; stores into former holes land in the
    file; e2fsck is clean afterwards."""
    img = new_image()
    size = 300 * PAGE
    pieces = [(0, 5000), (40 * PAGE + 100, 3000), (200 * PAGE, 10)]
    data = bytearray(_sparse(size, pieces))
    with xipfs.open(img, "r+") as fs:
        write_file(fs, "/s", bytes(data), pieces)
        assert holes(fs, "/s")
        with fs.mmap("/s", "w", offset=32 * PAGE, length=64 * PAGE) as m:
            assert m.is_xip
            inside = [(b, n) for b, n in holes(fs, "/s") if b < 96 and b + n > 32]
            assert inside == []
            assert (2, 30) in holes(fs, "/s")           # before the range: still a hole
            assert m[:] == data[32 * PAGE:96 * PAGE]
            m[0:4] = b"hole"                              # block 32 was a hole
            data[32 * PAGE:32 * PAGE + 4] = b"hole"
        assert fs.read_bytes("/s") == data
        with fs.mmap("/s", "w") as m:
            assert holes(fs, "/s") == []
            assert m[:] == data
            m[-1:] = b"z"                                 # the last block was a hole
            data[-1:] = b"z"
        assert fs.read_bytes("/s") == data
        assert fs.stat("/s").st_size == size
    assert_fsck_clean(img)


def test_read_only_mapping_leaves_holes_alone(new_image):
    """An "r" mapping of a sparse file allocates nothing: the holes stay holes."""
    img = new_image()
    with xipfs.open(img, "r+") as fs:
        write_file(fs, "/sparse", CONTENT["/sparse"], SPARSE_PIECES)
        before, free = fs.block_runs("/sparse"), bfree(fs)
        with fs.mmap("/sparse") as m:
            assert m[:] == CONTENT["/sparse"]
        assert fs.block_runs("/sparse") == before
        assert bfree(fs) == free


# -- 5. size changes -------------------------------------------------------------------------
def _shrink(fs: xipfs.Filesystem, path: str, how: str) -> None:
    if how == "fs.truncate":
        fs.truncate(path, 10)
    elif how == "f.truncate":
        with fs.open(path, "r+b", buffering=0) as f:
            f.truncate(10)
    elif how == "open-wb":
        fs.open(path, "wb").close()
    else:
        fs.write_bytes(path, b"short")


SHRINKS = ["fs.truncate", "f.truncate", "open-wb", "write_bytes"]


@pytest.mark.parametrize("xip", [None, False], ids=["xip", "copy"])
@pytest.mark.parametrize("how", SHRINKS)
def test_shrink_refused_under_a_writable_mapping(new_image, how, xip):
    """With a live "w" mapping, every way of shrinking the file raises EBUSY and changes
    nothing: size, blocks, content, and the mapping keeps working."""
    img = new_image()
    data = os.urandom(20 * PAGE + 1)
    with xipfs.open(img, "r+", xip=xip) as fs:
        fs.write_bytes("/f", data)
        runs = fs.block_runs("/f")
        with fs.mmap("/f", "w") as m:
            with pytest.raises(OSError) as info:
                _shrink(fs, "/f", how)
            assert info.value.errno == errno.EBUSY
            assert fs.stat("/f").st_size == len(data)
            assert fs.block_runs("/f") == runs
            assert fs.read_bytes("/f") == data
            assert m[:] == data
            m[-1:] = b"!"
        assert fs.read_bytes("/f") == data[:-1] + b"!"
        fs.truncate("/f", 10)                   # no mapping left: allowed again
    assert_fsck_clean(img)


@pytest.mark.parametrize(("size", "offset"), [(5000, 0), (0, 0), (3 * PAGE, 0), (10 * PAGE + 1, 8 * PAGE),
                                              (2 * PAGE, 8 * PAGE), (15 * PAGE + 7, 8 * PAGE)])
@pytest.mark.parametrize("how", ["fs.truncate", "f.truncate"])
def test_shrink_under_a_read_only_mapping(new_image, size, offset, how):
    """With a live "r" XIP mapping the shrink succeeds; the mapping keeps its length, its
    bytes before the new end stay, the ones after read zeros (their blocks are freed)."""
    img = new_image()
    data = os.urandom(20 * PAGE + 123)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
        free = bfree(fs)
        with fs.mmap("/f", offset=offset) as m:
            assert m.is_xip
            if how == "fs.truncate":
                fs.truncate("/f", size)
            else:
                with fs.open("/f", "r+b", buffering=0) as f:
                    f.truncate(size)
            assert fs.stat("/f").st_size == size
            assert bfree(fs) > free
            assert len(m) == len(data) - offset
            keep = max(0, size - offset)
            assert m[:keep] == data[offset:offset + keep]
            assert m[keep:] == bytes(len(m) - keep)
    assert_fsck_clean(img)


def test_shrink_by_open_wb_under_a_read_only_mapping(new_image):
    """Re-creating a mapped file ("wb", then new content) leaves the old "r" mapping reading
    zeros, never the new content's blocks."""
    img = new_image()
    old, new = os.urandom(16 * PAGE), os.urandom(16 * PAGE)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", old)
        with fs.mmap("/f") as m:
            with fs.open("/f", "wb") as f:
                f.write(new)
            assert fs.read_bytes("/f") == new
            assert m[:] == bytes(len(old))
    assert_fsck_clean(img)


def test_shrink_under_a_read_only_copy_keeps_its_first_bytes(images, new_image):
    """A copy-backed "r" mapping is private memory: a shrink succeeds and its first bytes stay."""
    img = new_image(bs=1024)
    data = os.urandom(40_000)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
        with fs.mmap("/f") as m:
            assert not m.is_xip
            fs.truncate("/f", 1000)
            assert m[:1000] == data[:1000]
            assert len(m) == len(data)
    assert_fsck_clean(img)


@pytest.mark.parametrize("access", ["r", "w"])
def test_growing_a_mapped_file_keeps_the_mapping(new_image, access):
    """Appending to a mapped file leaves the mapping's length and bytes as they were; a new
    mapping shows the whole grown file."""
    img = new_image()
    data, more = os.urandom(10 * PAGE + 5), os.urandom(30 * PAGE)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
        with fs.mmap("/f", access) as m:
            with fs.open("/f", "ab") as f:
                f.write(more)
            fs.truncate("/f", 100 * PAGE)
            assert len(m) == len(data)
            assert m[:] == data
            with fs.mmap("/f") as m2:
                assert m2[:] == data + more + bytes(100 * PAGE - len(data) - len(more))
    assert_fsck_clean(img)


@pytest.mark.parametrize("end", ["close", "gc"])
@pytest.mark.parametrize("kind", ["xip-r", "xip-w", "copy"])
def test_unlinked_mapped_file_lives_until_its_mapping_goes(new_image, kind, end):
    """Unlinking a mapped file removes the name at once; the mapping still reads the old
    content, and the blocks are freed only when the mapping is closed or collected."""
    img = new_image(bs=1024 if kind == "copy" else 4096)
    data = os.urandom(300_000)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
        blocks = fs.stat("/f").st_blocks * 512 // fs.block_size
        m = fs.mmap("/f", "w" if kind == "xip-w" else "r")
        assert m.is_xip is (kind != "copy")
        free = bfree(fs)
        fs.unlink("/f")
        assert not fs.exists("/f")
        assert m[:] == data
        fs.sync()
        assert bfree(fs) == free
        if end == "close":
            m.close()
        else:
            del m
            gc.collect()
        assert bfree(fs) == free + blocks
    assert_fsck_clean(img)


def test_refused_shrink_changes_no_mapping(new_image):
    """An "r" mapping made before a "w" mapping of the same file: the shrink is refused (EBUSY)
    and must change nothing, including what the "r" mapping reads."""
    img = new_image()
    data = os.urandom(8 * PAGE)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
        with fs.mmap("/f") as ro, fs.mmap("/f", "w"):
            with pytest.raises(OSError) as info:
                fs.truncate("/f", 10)
            assert info.value.errno == errno.EBUSY
            assert fs.read_bytes("/f") == data
            assert ro[:] == data


def test_close_with_a_live_mapping_of_an_unlinked_file(new_image):
    """A mapping of an unlinked file outlives ``fs.close()`` (views stay valid after close); the
    blocks must not be given to a file written in a later session while it is mapped."""
    img = new_image(size=4 * MiB)
    old = os.urandom(64 * 1024)
    fs = xipfs.open(img, "r+")
    fs.write_bytes("/a", old)
    m = fs.mmap("/a")
    try:
        fs.unlink("/a")
        fs.close()
        with xipfs.open(img, "r+") as fs2:
            fs2.write_bytes("/b", os.urandom(len(old)))
        assert m[:] == old
    finally:
        m.close()


# -- 6. writable copies ----------------------------------------------------------------------
@pytest.mark.parametrize("where", ["file-device", "1k-blocks"])
def test_writable_copy_writes_back_on_flush_and_close(new_image, where):
    """A "w" mapping that is a copy (file device, or blocks below a page) changes the file
    only on ``flush()`` and ``close()``, and then exactly by what was stored."""
    img = new_image(bs=1024 if where == "1k-blocks" else 4096)
    data = os.urandom(50_000)
    xip = False if where == "file-device" else None
    with xipfs.open(img, "r+", xip=xip) as fs:
        fs.write_bytes("/f", data)
        want = bytearray(data)
        m = fs.mmap("/f", "w")
        assert not m.is_xip and m.writable
        m[10:20] = b"0123456789"
        want[10:20] = b"0123456789"
        assert fs.read_bytes("/f") == data              # not before flush
        m.flush()
        assert fs.read_bytes("/f") == want
        m[-4:] = b"tail"
        want[-4:] = b"tail"
        assert fs.read_bytes("/f") == want[:-4] + data[-4:]
        m.close()
        assert fs.read_bytes("/f") == want
        assert fs.stat("/f").st_size == len(data)
    with xipfs.open(img, xip=xip) as fs:
        assert fs.read_bytes("/f") == want
    assert_fsck_clean(img)


def test_writable_copy_array_is_refused(new_image):
    """``map_array(access="w")`` where the mapping would be a copy (file device): nothing could
    write the copy back when the array goes, so it is refused (EOPNOTSUPP) instead of losing
    stores; the budget is untouched and a writable ``fs.mmap`` still works."""
    pytest.importorskip("numpy")
    img = new_image()
    with xipfs.open(img, "r+", xip=False) as fs:
        fs.write_bytes("/f", bytes(8192))
        used = xipfs.map_budget()["used"]
        with pytest.raises(OSError) as err:
            fs.map_array("/f", "uint8", access="w")
        assert err.value.errno == errno.EOPNOTSUPP
        assert xipfs.map_budget()["used"] == used
        with fs.mmap("/f", "w") as m:
            m[:] = bytes([7]) * 8192
        assert fs.read_bytes("/f") == bytes([7]) * 8192


def test_writable_copy_closes_after_the_filesystem(new_image):
    """A writable copy mapping can still be closed once its filesystem is closed."""
    img = new_image()
    fs = xipfs.open(img, "r+", xip=False)
    fs.write_bytes("/f", bytes(10_000))
    m = fs.mmap("/f", "w")
    m[:3] = b"xyz"
    fs.close()
    with contextlib.suppress(OSError):
        m.close()
    assert m.closed


# -- 7. the budget ---------------------------------------------------------------------------
def test_over_budget_file_maps_as_a_copy(new_image):
    """A file with more runs than the budget allows maps as a copy with the same content; with
    room it is stitched and holds one kernel mapping per run; the budget is shared by all
    live mappings and given back on close and on garbage collection."""
    img = new_image()
    with xipfs.open(img, "r+") as fs:
        data = fragment(fs, "/frag", 48)
        runs = len(fs.block_runs("/frag"))
        assert runs > 16                                # alternating blocks: many short runs
        base = used()
        xipfs.set_map_budget(max_maps=base + runs - 1, min_run_bytes=0)
        with fs.mmap("/frag") as m:
            assert not m.is_xip and m[:] == data and used() == base
        xipfs.set_map_budget(max_maps=base + runs + 10)
        m1 = fs.mmap("/frag")
        assert m1.is_xip and m1.runs == runs and m1[:] == data
        assert used() == base + runs
        with fs.mmap("/frag") as m2:                    # no room left for a second one
            assert not m2.is_xip and m2[:] == data
        m1.close()
        assert used() == base
        m3 = fs.mmap("/frag")
        assert m3.is_xip
        del m3
        gc.collect()
        assert used() == base


def test_short_runs_map_as_a_copy_unless_min_run_bytes_is_zero(new_image):
    """With the default min_run_bytes (16 KiB) a file of one-block runs is copied, a file of
    one run of one block is not; with min_run_bytes=0 the fragmented file is stitched."""
    img = new_image()
    with xipfs.open(img, "r+") as fs:
        data = fragment(fs, "/frag", 24)
        assert xipfs.map_budget()["min_run_bytes"] == 16 * 1024
        with fs.mmap("/frag") as m:
            assert not m.is_xip and m[:] == data
        with fs.mmap("/frag.other") as m:              # fragmented the same way
            assert not m.is_xip
        fs.write_bytes("/small", b"s" * 100)
        with fs.mmap("/small") as m:
            assert m.is_xip
        xipfs.set_map_budget(min_run_bytes=0)
        with fs.mmap("/frag") as m:
            assert m.is_xip and m.runs == len(fs.block_runs("/frag")) > 1 and m[:] == data


def test_budget_arguments():
    """The default is a quarter of vm.max_map_count (at most 16,384) and 16 KiB runs;
    negative budgets are refused; map_budget reports what set_map_budget set."""
    with contextlib.suppress(OSError), open("/proc/sys/vm/max_map_count") as f:
        assert xipfs.map_budget()["max_maps"] == min(16384, int(f.read()) // 4)
    assert xipfs.map_budget()["min_run_bytes"] == 16 * 1024
    with pytest.raises(ValueError):
        xipfs.set_map_budget(max_maps=-1)
    with pytest.raises(ValueError):
        xipfs.set_map_budget(min_run_bytes=-1)
    xipfs.set_map_budget(max_maps=123, min_run_bytes=4096)
    got = xipfs.map_budget()
    assert got["max_maps"] == 123 and got["min_run_bytes"] == 4096


EXHAUST = """
    import ctypes, json, mmap, os, sys, xipfs
    img = {img!r}
    xipfs.set_map_budget(max_maps=1 << 20, min_run_bytes=0)
    fs = xipfs.open(img)
    data = fs.read_bytes("/frag")
    runs = len(fs.block_runs("/frag"))
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    with open("/proc/sys/vm/max_map_count") as f:
        limit = int(f.read())
    with open("/proc/self/maps") as f:
        have = len(f.readlines())
    k = (limit - have - runs // 2) // 2              # leave room for half the runs only
    filler = mmap.mmap(-1, 2 * k * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(filler))
    for i in range(k):                               # every other page read-only: 2 VMAs each
        libc.mprotect(base + 2 * i * mmap.PAGESIZE, mmap.PAGESIZE, mmap.PROT_READ)
    before = xipfs.map_budget()["used"]
    result = {{}}
    try:
        m = fs.mmap("/frag")
        result = {{"is_xip": m.is_xip, "same": m[:] == data, "used": xipfs.map_budget()["used"] - before}}
        m.close()
    except Exception as err:
        result = {{"error": repr(err)}}
    result["left"] = xipfs.map_budget()["used"] - before
    print(json.dumps(result))
"""


def test_kernel_out_of_mappings_falls_back_to_a_copy(new_image):
    """When the kernel runs out of mappings half way through stitching, the mapping is a copy
    with the same content and the budget is whole again (run in a child: it uses up the
    process's mappings)."""
    img = new_image()
    with xipfs.open(img, "r+") as fs:
        fragment(fs, "/frag", 200)
    proc = run_child(EXHAUST.format(img=img))
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got == {"is_xip": False, "same": True, "used": 0, "left": 0}


# -- 8. map_array ----------------------------------------------------------------------------
@pytest.mark.parametrize(("dtype", "shape", "offset"), [
    ("uint8", None, 0), ("float32", (256, 64), PAGE), ("int32", 1000, 5000), ("<u2", (10, 10), 4097),
    (">f8", None, 12345), ("uint64", 3, 5 * MiB - 24),
])
@pytest.mark.parametrize("bs", [4096, 1024], ids=["xip", "copy"])
def test_map_array_values(images, dtype, shape, offset, bs):
    """``map_array`` gives exactly the values ``numpy.frombuffer`` reads from the file's bytes,
    for any dtype, shape and offset (page-aligned or not); the array is read-only."""
    np = pytest.importorskip("numpy")
    data = CONTENT["/big"]
    dt = np.dtype(dtype)
    count = (len(data) - offset) // dt.itemsize if shape is None else int(np.prod(shape))
    want = np.frombuffer(data, dtype=dt, count=count, offset=offset)
    with xipfs.open(images[bs]) as fs:
        arr = fs.map_array("/big", dtype, shape=shape, offset=offset)
        assert arr.dtype == dt
        assert arr.shape == (tuple(shape) if isinstance(shape, tuple) else (count,))
        assert arr.tobytes() == want.tobytes()
        assert not arr.flags.writeable
        assert arr.base.is_xip is (bs == 4096)


def test_map_array_writable(new_image):
    """``map_array(access="w")`` on XIP: stores into the array are in the file at once."""
    np = pytest.importorskip("numpy")
    img = new_image()
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", bytes(16 * PAGE))
        arr = fs.map_array("/f", "<u4", shape=(10, 10), offset=2 * PAGE + 8, access="w")
        assert arr.flags.writeable and arr.base.is_xip
        arr[:] = np.arange(100, dtype="<u4").reshape(10, 10)
        got = fs.read_bytes("/f")
        assert got[2 * PAGE + 8:2 * PAGE + 408] == np.arange(100, dtype="<u4").tobytes()
        assert got[:2 * PAGE + 8] == bytes(2 * PAGE + 8)
        del arr
        gc.collect()


def test_map_array_bad_arguments(images):
    """An array that would not fit in the file, or a negative offset, is a ValueError."""
    pytest.importorskip("numpy")
    with xipfs.open(images[4096]) as fs:
        with pytest.raises(ValueError):
            fs.map_array("/page", "uint32", shape=1025)
        with pytest.raises(ValueError):
            fs.map_array("/page", "uint8", shape=10, offset=PAGE - 9)
        with pytest.raises(ValueError):
            fs.map_array("/page", "uint8", shape=1, offset=-1)
        with pytest.raises(OSError):
            fs.map_array("/missing")


# -- 9. sharing across processes -------------------------------------------------------------
SHARED_SIZE = 256 * MiB


def _summed_pss(img: str, mode: str) -> tuple[int, list[Worker]]:
    with workers(img, "/big", mode, 4) as ws:
        total = sum(w.pss_kb() for w in ws)          # all four alive and touched
        assert [w.stop() for w in ws] == [0] * 4
        return total, ws


@pytest.mark.skipif(not os.path.exists(SMAPS), reason="no /proc/self/smaps_rollup")
def test_four_processes_share_one_copy(shm, record_property):
    """Four processes mapping a 256 MiB file hold about one copy between them (summed PSS
    under 1.5x the file); four reading it into their own buffers hold about four."""
    img = os.path.join(shm, "shared.img")
    xipfs.mkfs(img, SHARED_SIZE + 40 * MiB)
    try:
        with xipfs.open(img, "r+") as fs:
            chunk = os.urandom(16 * MiB)
            with fs.open("/big", "wb", buffering=0) as f:
                for _ in range(SHARED_SIZE // len(chunk)):
                    f.write(chunk)
        mapped, ws = _summed_pss(img, "map")
        assert all(w.is_xip and w.length == SHARED_SIZE for w in ws)
        copied, _ = _summed_pss(img, "copy")
        idle, _ = _summed_pss(img, "idle")
    finally:
        os.unlink(img)
    mib = SHARED_SIZE // MiB
    print(f"\n4 processes x {mib} MiB file: summed PSS mapped {mapped / 1024:.0f} MiB, "
          f"copied {copied / 1024:.0f} MiB, idle {idle / 1024:.0f} MiB")
    record_property("pss_mapped_mib", round(mapped / 1024))
    record_property("pss_copied_mib", round(copied / 1024))
    record_property("pss_idle_mib", round(idle / 1024))
    assert mapped < 1.5 * SHARED_SIZE // 1024
    assert copied > 3.5 * SHARED_SIZE // 1024


def test_image_by_shared_memory_name():
    """An image made as a POSIX shared-memory object ("/name") is opened by that name in
    another process, which maps (XIP) exactly the file written here."""
    name = f"/xipfs-test-{os.getpid()}"
    assert not os.path.exists(name)
    xipfs.mkfs(name, 16 * MiB)
    try:
        assert os.path.exists("/dev/shm" + name)
        data = os.urandom(3 * MiB + 5)
        with xipfs.open(name, "r+") as fs:
            assert fs.is_xip
            fs.write_bytes("/f", data)
        with workers(name, "/f") as (w,):
            assert w.is_xip and w.length == len(data)
            assert w.sha() == hashlib.sha256(data).hexdigest()
            assert w.stop() == 0
    finally:
        os.unlink("/dev/shm" + name)


# -- 10. coherence and pins across processes -------------------------------------------------
FILE = 64 * PAGE


def _writer_image(new_image) -> tuple[str, bytes]:
    img = new_image()
    data = os.urandom(FILE)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/f", data)
    return img, data


def test_writer_and_reader_processes_see_each_others_stores(new_image):
    """A writer (this process, "r+") and a reader child ("r") map the same file: the writer's
    stores through its mapping and its file objects show in the child's mapping, and stores
    the child makes into the image show in the writer's mapping, with no remapping."""
    img, data = _writer_image(new_image)
    with xipfs.open(img, "r+") as fs, workers(img, "/f") as (child,):
        assert child.is_xip
        assert child.read(0, 16) == data[:16]
        with fs.mmap("/f", "w") as m:
            for pos in (0, PAGE - 3, 33 * PAGE + 17, FILE - 8):
                m[pos:pos + 8] = b"WRITER%02d" % (pos % 100)
                assert child.read(pos, 8) == b"WRITER%02d" % (pos % 100)
            with fs.open("/f", "r+b", buffering=0) as f:
                f.pwrite(b"via pwrite", 10 * PAGE - 5)
            assert child.read(10 * PAGE - 5, 10) == b"via pwrite"
            where = device_offset(fs, "/f", 50 * PAGE + 1)
            assert child.ask(f"poke {where} {b'from child'.hex()}") == "ok"
            assert m[50 * PAGE + 1:50 * PAGE + 11] == b"from child"
        assert child.stop() == 0
    assert_fsck_clean(img)


@pytest.mark.parametrize("how", ["unlink", "rename"])
def test_another_process_mapping_pins_the_file(new_image, how):
    """While a child maps the file: shrinking it is EBUSY; unlink (or a rename over it) takes
    the name but frees no block, not even at sync; a new file never shows in the child's
    mapping; once the child has exited, the next sync frees the blocks; e2fsck is clean."""
    img, data = _writer_image(new_image)
    with xipfs.open(img, "r+") as fs, workers(img, "/f") as (child,):
        blocks = fs.stat("/f").st_blocks * 512 // fs.block_size
        for shrink in (lambda: fs.truncate("/f", 0), lambda: fs.open("/f", "wb")):
            with pytest.raises(OSError) as info:
                shrink()
            assert info.value.errno == errno.EBUSY
        assert fs.read_bytes("/f") == data
        free = bfree(fs)
        if how == "unlink":
            fs.unlink("/f")
        else:
            fs.write_bytes("/g", os.urandom(FILE))
            free -= blocks
            fs.rename("/g", "/f")
        assert bfree(fs) == free
        fs.sync()
        assert bfree(fs) == free
        new = os.urandom(FILE)
        fs.write_bytes("/h", new)                   # same size: would take the freed blocks
        free -= blocks
        assert child.sha() == hashlib.sha256(data).hexdigest()
        assert child.read(0, 32) == data[:32]
        assert child.stop() == 0
        assert bfree(fs) == free                    # exited, but nobody freed it yet
        fs.sync()
        assert bfree(fs) == free + blocks
    assert_fsck_clean(img)


def test_writer_closing_while_mapped_elsewhere_keeps_the_file(new_image):
    """If the writer closes while another process still maps an unlinked file, the file is kept
    as /lost+found/#<inode> (the image is clean) and the child still reads it."""
    img, data = _writer_image(new_image)
    with workers(img, "/f") as (child,):
        with xipfs.open(img, "r+") as fs:
            ino = fs.stat("/f").st_ino
            fs.unlink("/f")
        assert_fsck_clean(img)
        with xipfs.open(img) as fs:
            assert f"#{ino}" in fs.listdir("/lost+found")
            assert fs.read_bytes(f"/lost+found/#{ino}") == data
        assert child.sha() == hashlib.sha256(data).hexdigest()
        assert child.stop() == 0
    assert_fsck_clean(img)


def test_pin_lasts_until_the_last_mapping_goes(new_image):
    """Another attachment's mappings pin the file until the last one of them is closed or
    collected; a copy-backed mapping pins nothing."""
    img, data = _writer_image(new_image)
    with xipfs.open(img, "r+") as fs, xipfs.open(img) as other:
        m1 = other.mmap("/f")
        m2 = other.mmap("/f", offset=PAGE)
        assert m1.is_xip and m2.is_xip
        m1.close()
        with pytest.raises(OSError) as info:
            fs.truncate("/f", PAGE)
        assert info.value.errno == errno.EBUSY
        del m2
        gc.collect()
        fs.truncate("/f", PAGE)
        with xipfs.open(img, xip=False) as copying, copying.mmap("/f") as m3:
            assert not m3.is_xip
            fs.truncate("/f", 10)
            assert m3[:10] == data[:10]
    assert_fsck_clean(img)


def test_shrink_refused_for_another_mapping_changes_no_local_mapping(new_image):
    """A local "r" mapping and a mapping in another attachment: the shrink is refused (EBUSY)
    and the local mapping must still read the file."""
    img, data = _writer_image(new_image)
    with xipfs.open(img, "r+") as fs, xipfs.open(img) as other, fs.mmap("/f") as local, \
            other.mmap("/f"):
        with pytest.raises(OSError) as info:
            fs.truncate("/f", 10)
        assert info.value.errno == errno.EBUSY
        assert fs.read_bytes("/f") == data
        assert local[:] == data


def test_reader_attached_earlier_never_maps_another_files_blocks(new_image):
    """A reader attachment that looked the file up before the writer unlinked it and gave its
    blocks to a new file must not map the new file's data under the old name."""
    img, data = _writer_image(new_image)
    with xipfs.open(img, "r+") as fs, xipfs.open(img) as reader:
        assert reader.stat("/f").st_size == FILE
        runs = fs.block_runs("/f")
        fs.unlink("/f")
        fs.sync()
        new = os.urandom(FILE)
        fs.write_bytes("/g", new)
        if fs.block_runs("/g") != runs:
            pytest.skip("the allocator did not reuse the blocks")
        try:
            m = reader.mmap("/f")
        except FileNotFoundError:
            return
        with m:
            assert m[:] != new


FORKED = """
    import errno, os, xipfs
    img = {img!r}
    writer, reader = xipfs.open(img, "r+"), xipfs.open(img)
    m = reader.mmap("/f")
    assert m.is_xip
    pid = os.fork()
    if pid == 0:                                  # a forked worker done with its inherited copy
        m.close()
        os._exit(0)
    os.waitpid(pid, 0)
    try:
        writer.truncate("/f", 0)
        print("shrunk")
    except OSError as err:
        print("EBUSY" if err.errno == errno.EBUSY else repr(err))
"""


def test_forked_child_closing_its_copy_keeps_the_parents_pin(new_image):
    """A process maps a file and forks; the child closes its inherited copy of the mapping and
    exits. The parent still maps the file, so a writer's shrink must stay refused (EBUSY)."""
    img, _ = _writer_image(new_image)
    proc = run_child(FORKED.format(img=img))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["EBUSY"]


def test_writer_closing_without_lost_found_leaves_a_clean_image(new_image):
    """The writer closes while another attachment maps an unlinked file, and the image has no
    /lost+found: the image must still be clean (the blocks kept by a name, not leaked)."""
    img, data = _writer_image(new_image)
    with xipfs.open(img, "r+") as fs:
        fs.rmdir("/lost+found")
    with xipfs.open(img) as other, other.mmap("/f") as m:
        with xipfs.open(img, "r+") as fs:
            fs.unlink("/f")
        assert m[:] == data
        assert_fsck_clean(img)


def test_mappings_of_aligned_runs_start_2mib_aligned(tmp_path):
    """A mapping whose file has 2 MiB-aligned runs is placed so that they can be mapped with
    2 MiB pages (address and image offset equal modulo 2 MiB), whatever its length: Linux
    aligns an anonymous reservation by itself only when its length is a multiple of 2 MiB."""
    from xipfs.xip.mapping import HUGE, _address

    img = os.path.join(e2fs.SHM, f"xipfs-steer-{os.getpid()}.img")
    xipfs.mkfs(img, 64 << 20, block_size=4096)
    try:
        with xipfs.open(img, "r+") as fs:
            fs.write_bytes("/big", os.urandom((12 << 20) - 4096))
            assert fs.huge_runs("/big")
            for k in range(1, 8):
                length = (12 << 20) - 4096 * k
                with fs.mmap("/big", "r", 0, length) as m:
                    assert m.is_xip and _address(m) % HUGE == 0, (k, hex(_address(m)))
                    assert m[:length] == fs.read_bytes("/big")[:length]
        e2fs.assert_fsck_clean(img)
    finally:
        os.unlink(img)


def test_mappings_in_a_partition_follow_its_place_in_the_disk(tmp_path):
    """A filesystem 1 MiB into a disk (where MBR and GPT put the first partition): the mapping is
    placed so that address and place in the disk file agree modulo 2 MiB, where 2 MiB pages
    can map the file's runs."""
    from xipfs.xip.mapping import HUGE, _address

    fsimg = str(tmp_path / "fs.img")
    xipfs.mkfs(fsimg, 64 << 20, block_size=4096)
    with xipfs.open(fsimg, "r+", xip=True) as fs:
        fs.write_bytes("/big", os.urandom((12 << 20) - 4096))
    e2fs.assert_fsck_clean(fsimg)
    disk = os.path.join(e2fs.SHM, f"xipfs-steer-part-{os.getpid()}.img")
    try:
        with open(disk, "wb") as out, open(fsimg, "rb") as src:
            out.truncate(1 << 20)
            out.seek(1 << 20)
            shutil.copyfileobj(src, out)
        with xipfs.open(disk, offset=1 << 20) as fs:
            first = fs.block_runs("/big")[0][2] * 4096 + (1 << 20)     # in the disk file
            for k in (1, 3):
                with fs.mmap("/big", "r", 0, (12 << 20) - 4096 * k) as m:
                    assert m.is_xip and (_address(m) - first) % HUGE == 0, (k, hex(_address(m)), first)
    finally:
        os.unlink(disk)

