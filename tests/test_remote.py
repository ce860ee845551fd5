"""Remote images (issue 17): read lazily over HTTP from a real nginx on loopback, and fetched.

The bytes that crossed are counted from nginx's access log (``$body_bytes_sent``), never from
xipfs's own counters. Images are made by mke2fs -d; e2fsck -fn and the local image are the
oracles.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import treegen
from e2fs import assert_fsck_clean, mkfs
from nginx_util import Nginx, nginx, start_nginx  # noqa: F401  (the fixture)

import xipfs
from xipfs.device.remote import RangeUnsupported, open_remote
from xipfs.tools.fetch import fetch, part_path

MiB = 1 << 20
SMALL = os.urandom(4096)
BIG_SPARSE = 600 * MiB


def _big_tree(root: Path) -> None:
    """A few big files (one sparse), a data file, and a small file to be read: for 1 GiB images."""
    (root / "data" / "small").mkdir(parents=True)
    (root / "data" / "small" / "four.bin").write_bytes(SMALL)
    for i in range(20):
        (root / "data" / f"f{i:02d}.txt").write_text(f"file {i}\n" * 50)
    with open(root / "sparse.bin", "wb") as f:
        f.truncate(BIG_SPARSE)
        f.seek(BIG_SPARSE // 2)
        f.write(b"middle")
    (root / "random.bin").write_bytes(os.urandom(24 * MiB))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding 1 GiB images (ext2 and ext4) of :func:`_big_tree`."""
    top = tmp_path_factory.mktemp("remote")
    tree = top / "tree"
    _big_tree(tree)
    srv = top / "srv"
    srv.mkdir()
    mkfs(str(srv / "big.ext2"), "1G", src=str(tree))
    mkfs(str(srv / "big.ext4"), "1G", src=str(tree), fstype="ext4")
    return srv


@pytest.fixture(scope="module")
def real_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The standard test tree, recorded, in ext2 and ext4 images under ``srv``."""
    top = tmp_path_factory.mktemp("remote-tree")
    src = top / "src"
    treegen.build_tree(str(src), big=True)
    srv = top / "srv"
    srv.mkdir()
    mkfs(str(srv / "tree.ext2"), "64M", bs=4096, src=str(src))
    mkfs(str(srv / "tree.ext4"), "64M", bs=4096, src=str(src), fstype="ext4")
    return srv, treegen.record_tree(str(src))


# -- reading lazily --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["big.ext2", "big.ext4"])
def test_listing_and_a_small_file_move_kilobytes(served: Path, nginx, name: str) -> None:  # noqa: F811
    server = nginx(served)
    with xipfs.open(server.url(name)) as fs:
        assert sorted(fs.listdir("/")) == ["data", "lost+found", "random.bin", "sparse.bin"]
        assert len(fs.listdir("/data")) == 21
        assert fs.read_bytes("/data/small/four.bin") == SMALL
        assert fs.readonly and not fs.is_xip
    moved = server.body_bytes()
    assert moved < 1 * MiB, f"{moved} bytes crossed for a listing and a 4 KiB file of a 1 GiB image"
    assert os.path.getsize(served / name) == 1 << 30


def _range_length(header: str) -> int:
    first, _, last = header.removeprefix("bytes=").partition("-")
    return int(last) - int(first) + 1


def test_sequential_read_grows_the_readahead(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served)
    with open(served.parent / "tree" / "random.bin", "rb") as f:
        want = hashlib.sha256(f.read()).hexdigest()
    with xipfs.open(server.url("big.ext4")) as fs:
        fs.stat("/random.bin")
        server.mark()
        source = fs.device.device.source
        before = source.requests
        h = hashlib.sha256()
        buf = bytearray(128 * 1024)
        with fs.open("/random.bin", "rb", buffering=0) as f:
            while n := f.readinto(buf):
                h.update(memoryview(buf)[:n])
        assert h.hexdigest() == want
        made = source.requests - before
        fs.close()                       # the answer still streaming ends with the connection
        _logged(server, server._mark + made)
        asked = [_range_length(e.range) for e in server.since_mark()]
        # ondemand: a small first window, then requests that double while the reads go on
        # (each asks for as much again as the run has read, left streaming for the next reads)
        assert asked[0] <= 128 * 1024 and len(asked) <= 12, asked
        assert all(b >= a for a, b in zip(asked[1:-1], asked[2:], strict=False)), asked
        # the device knows no files: what was asked past the file is at most what was read
        assert server.body_bytes() < 2 * 24 * MiB + MiB, asked
    with xipfs.open(server.url("big.ext4")) as fs:
        fs.stat("/random.bin")
        server.mark()
        assert hashlib.sha256(fs.read_bytes("/random.bin")).hexdigest() == want
        # a read that large goes straight into the caller's buffer: a request per extent
        assert server.requests() <= 4, server.since_mark()
        assert fs.read_bytes("/sparse.bin")[BIG_SPARSE // 2:BIG_SPARSE // 2 + 6] == b"middle"
        # the sparse file's holes are not fetched: it is 600 MiB, the image moved far less
        assert server.body_bytes() < 30 * MiB


def test_reads_in_every_pattern_equal_the_file(served: Path, nginx) -> None:  # noqa: F811
    """Sequential runs (streaming answers), jumps (answers dropped), small and large reads,
    two files interleaved: every byte as in the source file."""
    import random

    server = nginx(served)
    with open(served.parent / "tree" / "random.bin", "rb") as f:
        want = f.read()
    rng = random.Random(17)
    with xipfs.open(server.url("big.ext4"), cache_bytes=4 * MiB) as fs:
        f = fs.open("/random.bin", "rb", buffering=0)
        g = fs.open("/data/f07.txt", "rb", buffering=0)
        for _ in range(60):
            pos = rng.randrange(len(want))
            f.seek(pos)
            for _ in range(rng.randrange(1, 6)):          # a sequential run from there
                size = rng.choice((100, 4096, 300_000, 1 << 20, 9 << 20))
                assert f.read(size) == want[pos:pos + size], (pos, size)
                pos = min(len(want), pos + size)
            g.seek(rng.randrange(300))
            assert g.read(7) in (b"file 7\n" * 60)
        f.close()
        g.close()


@pytest.mark.parametrize("name", ["tree.ext2", "tree.ext4"])
def test_results_equal_the_local_image(real_tree: tuple[Path, dict], nginx, name: str) -> None:  # noqa: F811
    srv, nodes = real_tree
    server = nginx(srv)
    with xipfs.open(server.url(name)) as fs:
        treegen.check_against_tree(fs, nodes, 4096, xattrs=True)
    with xipfs.open(str(srv / name)) as local, xipfs.open(server.url(name)) as remote:
        assert local.statvfs("/") == remote.statvfs("/")
        for top, dirs, files in local.walk("/"):
            assert sorted(remote.listdir(top)) == sorted(dirs + files), top


def test_redirects_are_followed(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served, extra="location = /moved.img { return 302 /big.ext2; }\n"
                                 "location = /loop.img { return 301 /loop.img; }")
    with xipfs.open(server.url("moved.img")) as fs:
        assert fs.read_bytes("/data/small/four.bin") == SMALL
    with pytest.raises(OSError) as err:
        xipfs.open(server.url("loop.img"))
    assert "301" in str(err.value)


def test_opening_for_writing_is_refused(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served)
    with pytest.raises(OSError) as err:
        xipfs.open(server.url("big.ext2"), "r+")
    assert err.value.errno == errno.EROFS
    with pytest.raises(ValueError):
        xipfs.open(server.url("big.ext2"), xip=True)


def test_missing_object_and_refused_connection(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served)
    with pytest.raises(FileNotFoundError) as err:
        xipfs.open(server.url("nothing.img"))
    assert "404" in str(err.value)
    url = server.url("big.ext2")
    server.kill()
    with pytest.raises(OSError) as err:
        open_remote(url, timeout=2)
    assert err.value.errno == errno.ECONNREFUSED and url in str(err.value)


def test_server_killed_mid_read_is_a_clear_error(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served)
    fs = xipfs.open(open_remote(server.url("big.ext2"), timeout=2))
    try:
        assert fs.read_bytes("/data/small/four.bin") == SMALL
        f = fs.open("/random.bin", "rb", buffering=0)
        f.read(MiB)
        server.kill()
        with pytest.raises(OSError) as err:
            f.read(16 * MiB)                       # past what readahead brought
        assert err.value.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EIO)
        assert "did not answer" in str(err.value)
        f.close()
    finally:
        fs.close()


def test_server_killed_while_a_response_streams(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served, extra="limit_rate 8m;")      # a 24 MiB answer takes seconds
    fs = xipfs.open(open_remote(server.url("big.ext2"), timeout=2))
    try:
        fs.stat("/random.bin")
        killer = threading.Timer(0.5, server.kill)
        killer.start()
        try:
            with pytest.raises(OSError) as err:
                fs.read_bytes("/random.bin")
        finally:
            killer.join()
        assert err.value.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EIO), err.value
        assert "did not answer" in str(err.value)
    finally:
        fs.close()


def test_server_that_stops_answering_times_out(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served)
    fs = xipfs.open(open_remote(server.url("big.ext2"), timeout=1))
    try:
        fs.listdir("/")
        server.pause()                 # connections are accepted by the kernel, nothing answers
        try:
            with pytest.raises(OSError) as err:
                fs.read_bytes("/random.bin")
            assert err.value.errno == errno.ETIMEDOUT, err.value
        finally:
            server.resume()
    finally:
        fs.close()


def test_server_without_range_support(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served, ranges=False)
    with pytest.raises(OSError) as err:
        xipfs.open(server.url("big.ext2"))
    assert isinstance(err.value, RangeUnsupported) and err.value.errno == errno.EOPNOTSUPP
    assert "range" in str(err.value)
    # the probe did not download the image to find that out
    assert server.body_bytes() < 4 * MiB


def test_fsspec_chain_reads_lazily(served: Path, nginx) -> None:  # noqa: F811
    fsspec = pytest.importorskip("fsspec")
    server = nginx(served)
    url = server.url("big.ext4")
    with fsspec.open(f"ext2://data/small/four.bin::{url}", "rb") as f:
        assert f.read() == SMALL
    ext = fsspec.filesystem("ext2", fo=url)
    try:
        assert len(ext.ls("data", detail=False)) == 21
        assert ext.cat_file("data/f03.txt") == b"file 3\n" * 50
    finally:
        ext.close()
    moved = server.body_bytes()
    assert moved < 2 * MiB, f"{moved} bytes crossed"


def test_file_url_through_fsspec(served: Path) -> None:
    pytest.importorskip("fsspec")
    with xipfs.open(f"file://{served / 'big.ext2'}") as fs:
        assert fs.read_bytes("/data/small/four.bin") == SMALL
        assert fs.device.kind == "remote"


# -- fetch ------------------------------------------------------------------------------------------
@pytest.fixture
def shm_dir() -> Path:
    d = Path("/dev/shm") / f"xipfs-remote-{os.getpid()}"
    d.mkdir(exist_ok=True)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class _Stop(Exception):
    pass


def _stop_after(limit: int):
    def progress(done: int, total: int) -> None:
        if done >= limit:
            raise _Stop
    return progress


def _logged(server: Nginx, n: int) -> None:
    """Wait until nginx has logged ``n`` requests (it logs one as its connection ends)."""
    deadline = time.monotonic() + 10
    while len(server.entries()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(server.entries()) >= n, server.entries()


def test_fetch_is_identical_and_clean(real_tree: tuple[Path, dict], nginx, shm_dir: Path) -> None:  # noqa: F811
    srv, nodes = real_tree
    server = nginx(srv)
    dest = shm_dir / "tree.ext4"
    n = fetch(server.url("tree.ext4"), dest, progress=False)
    size = os.path.getsize(srv / "tree.ext4")
    assert n == size and dest.read_bytes() == (srv / "tree.ext4").read_bytes()
    assert not Path(part_path(str(dest))).exists()
    assert_fsck_clean(str(dest))
    with xipfs.open(dest) as fs:
        assert fs.is_xip
        treegen.check_content(fs, nodes)


def test_fetch_resumes_after_an_interruption(real_tree: tuple[Path, dict], nginx, shm_dir: Path) -> None:  # noqa: F811
    srv, _ = real_tree
    server = nginx(srv)
    url, dest = server.url("tree.ext2"), shm_dir / "tree.ext2"
    size = os.path.getsize(srv / "tree.ext2")
    with pytest.raises(_Stop):
        fetch(url, dest, progress=_stop_after(20 * MiB))
    part = Path(part_path(str(dest)))
    assert not dest.exists() and part.exists()          # no reader can attach half an image
    have = part.stat().st_size
    assert 20 * MiB <= have < size
    _logged(server, 2)                                  # the probe and the interrupted download
    server.mark()
    n = fetch(url, dest, progress=False)
    assert n == size - have
    assert server.body_bytes() < size - have + MiB      # the rest only, by a range request
    assert any(e.range == f"bytes={have}-" for e in server.since_mark())
    assert dest.read_bytes() == (srv / "tree.ext2").read_bytes() and not part.exists()


def test_fetch_of_a_whole_part_only_renames(real_tree: tuple[Path, dict], nginx, shm_dir: Path) -> None:  # noqa: F811
    """Killed after the last byte, before the rename: the next fetch moves nothing."""
    srv, _ = real_tree
    server = nginx(srv)
    url, dest = server.url("tree.ext2"), shm_dir / "whole.ext2"
    with pytest.raises(_Stop):
        fetch(url, dest, progress=_stop_after(MiB))
    shutil.copy(srv / "tree.ext2", part_path(str(dest)))
    _logged(server, 2)
    server.mark()
    assert fetch(url, dest, progress=False) == 0
    assert dest.read_bytes() == (srv / "tree.ext2").read_bytes()
    assert server.body_bytes() <= 1                     # the probe's one byte


def test_fetch_restarts_on_a_changed_object(real_tree: tuple[Path, dict], nginx, shm_dir: Path,  # noqa: F811
                                            tmp_path: Path) -> None:
    srv, _ = real_tree
    mine = tmp_path / "srv"
    mine.mkdir()
    shutil.copy(srv / "tree.ext2", mine / "img")
    server = nginx(mine)
    url, dest = server.url("img"), shm_dir / "img"
    with pytest.raises(_Stop):
        fetch(url, dest, progress=_stop_after(8 * MiB))
    mkfs(str(mine / "img.new"), "64M", src=str(srv.parent / "src"), fstype="ext4")
    os.utime(mine / "img.new", (time.time() + 5, time.time() + 5))
    os.replace(mine / "img.new", mine / "img")
    server.mark()
    n = fetch(url, dest, progress=False)
    assert n == os.path.getsize(mine / "img")
    assert dest.read_bytes() == (mine / "img").read_bytes()
    assert_fsck_clean(str(dest))


def test_fetch_into_shared_memory_name(real_tree: tuple[Path, dict], nginx) -> None:  # noqa: F811
    srv, nodes = real_tree
    server = nginx(srv)
    name = f"/xipfs-fetch-test-{os.getpid()}"
    try:
        fetch(server.url("tree.ext4"), name, progress=False)
        dev = xipfs.MemoryDevice.from_shm(name, readonly=True)
        with xipfs.open(dev) as fs:
            assert fs.is_xip
            treegen.check_content(fs, nodes)
    finally:
        for p in (f"/dev/shm{name}", part_path(f"/dev/shm{name}")):
            if os.path.exists(p):
                os.unlink(p)


def test_fetch_checks_the_stores_checksum(real_tree: tuple[Path, dict], nginx, shm_dir: Path,  # noqa: F811
                                          tmp_path: Path) -> None:
    import base64

    srv, _ = real_tree
    data = (srv / "tree.ext2").read_bytes()
    good = base64.b64encode(hashlib.md5(data).digest()).decode()
    bad = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    mine = tmp_path / "srv"
    mine.mkdir()
    os.link(srv / "tree.ext2", mine / "good.img") if os.stat(srv).st_dev == os.stat(mine).st_dev \
        else shutil.copy(srv / "tree.ext2", mine / "good.img")
    shutil.copy(mine / "good.img", mine / "bad.img")
    shutil.copy(mine / "good.img", mine / "part.img")
    of_range = base64.b64encode(hashlib.md5(data[:1]).digest()).decode()
    extra = (f'location = /good.img {{ add_header Content-MD5 "{good}"; }}\n'
             f'location = /bad.img {{ add_header Content-MD5 "{bad}"; }}\n'
             f'location = /part.img {{ add_header Content-MD5 "{of_range}"; }}')
    server = nginx(mine, extra=extra)
    assert fetch(server.url("good.img"), shm_dir / "good.img", progress=False) == len(data)
    # a Content-MD5 of the range answered (RFC 1864's meaning on a 206), not of the object
    assert fetch(server.url("part.img"), shm_dir / "part.img", progress=False) == len(data)
    with pytest.raises(OSError) as err:
        fetch(server.url("bad.img"), shm_dir / "bad.img", progress=False)
    assert err.value.errno == errno.EIO and "md5" in str(err.value)
    assert not (shm_dir / "bad.img").exists()


def test_fetch_from_a_server_without_ranges(real_tree: tuple[Path, dict], nginx, shm_dir: Path) -> None:  # noqa: F811
    srv, _ = real_tree
    server = nginx(srv, ranges=False)
    dest = shm_dir / "whole.img"
    assert fetch(server.url("tree.ext2"), dest, progress=False) == os.path.getsize(srv / "tree.ext2")
    assert dest.read_bytes() == (srv / "tree.ext2").read_bytes()


def test_fetch_refuses_a_second_fetcher(real_tree: tuple[Path, dict], nginx, shm_dir: Path) -> None:  # noqa: F811
    srv, _ = real_tree
    server = nginx(srv, extra="limit_rate 32m;")
    dest = shm_dir / "one.img"
    started = threading.Event()
    errors: list[BaseException] = []

    def first() -> None:
        try:
            fetch(server.url("tree.ext2"), dest, progress=lambda d, t: started.set())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=first)
    t.start()
    assert started.wait(30)
    with pytest.raises(OSError) as err:
        fetch(server.url("tree.ext2"), dest, progress=False)
    assert err.value.errno == errno.EBUSY
    t.join()
    assert not errors and dest.read_bytes() == (srv / "tree.ext2").read_bytes()


# -- the command --------------------------------------------------------------------------------------
def _xipfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xipfs", *args], capture_output=True, text=True,
                          timeout=120)


def test_command_reads_urls(served: Path, nginx, tmp_path: Path, shm_dir: Path) -> None:  # noqa: F811
    server = nginx(served)
    url = server.url("big.ext4")
    r = _xipfs("ls", url)
    assert r.returncode == 0 and r.stdout.split() == ["data", "lost+found", "random.bin", "sparse.bin"], r
    r = _xipfs("ls", f"{url}:/data/small")
    assert r.stdout.split() == ["four.bin"], r
    r = _xipfs("cat", f"{url}:/data/f01.txt")
    assert r.returncode == 0 and r.stdout == "file 1\n" * 50
    r = _xipfs("stat", f"{url}:/data/small/four.bin")
    assert r.returncode == 0 and "Size: 4096" in r.stdout, r
    r = _xipfs("info", url)
    assert r.returncode == 0 and "remote, page cache" in r.stdout
    assert "Writable:                 no" in r.stdout
    r = _xipfs("cp", f"{url}:/data/small/four.bin", str(tmp_path / "four.bin"))
    assert r.returncode == 0 and (tmp_path / "four.bin").read_bytes() == SMALL
    r = _xipfs("unpack", f"{url}:/data", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "small" / "four.bin").read_bytes() == SMALL
    r = _xipfs("cp", str(tmp_path / "four.bin"), f"{url}:/data/x")
    assert r.returncode == 1 and "read-only" in r.stderr
    before = server.body_bytes()
    r = _xipfs("check", url)                      # reads all the metadata: kept out of the sum below
    assert r.returncode == 0 and ": clean, " in r.stdout, r
    checked = server.body_bytes() - before
    r = _xipfs("ls", server.url("missing.img"))
    assert r.returncode == 1 and r.stderr.strip().endswith("HTTP 404 Not Found"), r.stderr
    # all of that, and not the image
    assert server.body_bytes() - checked < 16 * MiB


def test_command_fetch(real_tree: tuple[Path, dict], nginx, shm_dir: Path) -> None:  # noqa: F811
    srv, _ = real_tree
    server = nginx(srv)
    r = _xipfs("fetch", server.url("tree.ext2"), str(shm_dir))
    assert r.returncode == 0 and "fetched" in r.stdout, r
    assert (shm_dir / "tree.ext2").read_bytes() == (srv / "tree.ext2").read_bytes()
    r = _xipfs("ls", f"{shm_dir / 'tree.ext2'}:/")
    assert r.returncode == 0 and "sizes" in r.stdout.split()
    server.kill()
    r = _xipfs("fetch", server.url("tree.ext2"), str(shm_dir / "again.img"))
    assert r.returncode == 1 and "did not answer" in r.stderr, r.stderr


# -- odds and ends ------------------------------------------------------------------------------------
def test_http_needs_only_the_standard_library(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served)
    code = ("import sys, xipfs\n"
            f"fs = xipfs.open({server.url('big.ext2')!r})\n"
            "assert fs.read_bytes('/data/f02.txt') == b'file 2\\n' * 50\n"
            "print(sorted(m for m in ('fsspec', 'aiohttp', 'asyncio') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_a_forked_child_reads_on_its_own_connection(served: Path, nginx) -> None:  # noqa: F811
    server = nginx(served)
    with xipfs.open(server.url("big.ext2")) as fs:
        assert fs.read_bytes("/data/f00.txt") == b"file 0\n" * 50
        pid = os.fork()
        if pid == 0:                                   # the child: read while the parent does
            ok = all(fs.read_bytes(f"/data/f{i:02d}.txt") == f"file {i}\n".encode() * 50
                     for i in range(1, 20))
            os._exit(0 if ok else 1)
        with fs.open("/random.bin", "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    with open(served.parent / "tree" / "random.bin", "rb") as f:
        assert data == f.read()


@pytest.mark.parametrize(("arg", "image", "path"), [
    ("https://host/a.img", "https://host/a.img", "/"),
    ("https://host:8080/dir/a.img:/etc/x", "https://host:8080/dir/a.img", "/etc/x"),
    ("http://127.0.0.1:9/a.img:etc", "http://127.0.0.1:9/a.img", "/etc"),
    ("s3://bucket/key/a.img:/x", "s3://bucket/key/a.img", "/x"),
    ("file:///tmp/a.img:/x", "file:///tmp/a.img", "/x"),
    ("simplecache::https://host/a.img:/x", "simplecache::https://host/a.img", "/x"),
])
def test_command_operands_with_urls(arg: str, image: str, path: str) -> None:
    from xipfs.cli.common import any_spec, image_spec

    spec = image_spec(arg, "/")
    assert (spec.image, spec.path) == (image, path)
    if path != "/":
        assert any_spec(arg)[1:] == (image, path)


def test_fetch_through_fsspec(real_tree: tuple[Path, dict], shm_dir: Path) -> None:
    """Schemes other than http(s) go through fsspec: file:// here, read by ranges."""
    pytest.importorskip("fsspec")
    srv, _ = real_tree
    dest = shm_dir / "via-fsspec.img"
    assert fetch(f"file://{srv / 'tree.ext4'}", dest, progress=False) == os.path.getsize(srv / "tree.ext4")
    assert dest.read_bytes() == (srv / "tree.ext4").read_bytes()


def test_fetch_checks_an_s3_etag(real_tree: tuple[Path, dict], nginx, shm_dir: Path,  # noqa: F811
                                 tmp_path: Path) -> None:
    """An S3 answer's ETag is the MD5 (checked), except under SSE-KMS; other servers' are opaque."""
    srv, _ = real_tree
    data = (srv / "tree.ext2").read_bytes()
    good, bad = hashlib.md5(data).hexdigest(), hashlib.md5(b"other").hexdigest()
    mine = tmp_path / "srv"
    mine.mkdir()
    for name in ("good", "bad", "kms", "plain"):
        shutil.copy(srv / "tree.ext2", mine / f"{name}.img")
    s3 = "add_header x-amz-request-id test;"
    extra = "\n".join([
        f"location = /good.img {{ etag off; add_header ETag '\"{good}\"'; {s3} }}",
        f"location = /bad.img {{ etag off; add_header ETag '\"{bad}\"'; {s3} }}",
        f"location = /kms.img {{ etag off; add_header ETag '\"{bad}\"'; {s3} "
        "add_header x-amz-server-side-encryption aws:kms; }",
        f"location = /plain.img {{ etag off; add_header ETag '\"{bad}\"'; }}",
    ])
    server = nginx(mine, extra=extra)
    for name in ("good", "kms", "plain"):
        assert fetch(server.url(f"{name}.img"), shm_dir / name, progress=False) == len(data), name
    with pytest.raises(OSError) as err:
        fetch(server.url("bad.img"), shm_dir / "bad", progress=False)
    assert err.value.errno == errno.EIO and "md5" in str(err.value)


def test_https(served: Path, nginx) -> None:  # noqa: F811
    """https with the standard library's ssl: a trusted certificate reads; an untrusted one is a
    clear error at once."""
    server = nginx(served, tls=True)
    url = server.url("big.ext4")
    assert url.startswith("https://")
    code = ("import sys, xipfs\n"
            "with xipfs.open(sys.argv[1]) as fs:\n"
            "    assert fs.read_bytes('/data/small/four.bin') == bytes.fromhex(sys.argv[2])\n"
            "    assert fs.read_bytes('/data/f05.txt') == b'file 5\\n' * 50\n"
            "print('ok')\n")
    env = {**os.environ, "SSL_CERT_FILE": str(server.cafile)}
    r = subprocess.run([sys.executable, "-c", code, url, SMALL.hex()], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
    assert server.body_bytes() < MiB
    with pytest.raises(OSError) as err:              # this process does not trust the certificate
        xipfs.open(url)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or "certificate" in str(err.value).lower()
