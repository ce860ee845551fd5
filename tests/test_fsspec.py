"""The fsspec filesystem ``ext2``, through fsspec's public API only.

Images are made by ``mke2fs -t ext2 -d`` from a known tree on /dev/shm; fsspec's own
LocalFileSystem on that tree is the oracle for listings, and ``e2fsck -fn`` and ``debugfs``
for what was written. Reads run on the memory device (XIP) and on the page-cache path.
"""

from __future__ import annotations

import errno
import gc
import io
import os
import pickle
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

fsspec = pytest.importorskip("fsspec")

from e2fs import assert_fsck_clean, debugfs_cat, mkfs  # noqa: E402
from write_util import shm_dir  # noqa: E402

BIG = 3 * (1 << 20) + 12345
CSV = b"a,b,c\n1,2,x\n3,4,y\n5,6,z\n"


def _tree(root: str) -> None:
    """The known tree: nested directories, sizes around block edges, links, an empty directory."""
    def put(rel: str, data: bytes) -> None:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    put("data/x.csv", CSV)
    put("data/y.csv", CSV.replace(b"x", b"w"))
    put("data/big.bin", bytes(range(256)) * (BIG // 256) + b"\x07" * (BIG % 256))
    put("hello.txt", b"hello\nworld\n")
    put("empty", b"")
    for n in (1, 4095, 4096, 4097, 70_000):
        put(f"sizes/f{n}", os.urandom(n))
    put("deep/a/b/c/leaf.txt", b"leaf\n" * 100)
    os.makedirs(os.path.join(root, "emptydir"))
    os.symlink("../hello.txt", os.path.join(root, "data/link"))
    os.symlink("a/b", os.path.join(root, "deep/dirlink"))
    os.symlink("nowhere", os.path.join(root, "dangling"))
    os.link(os.path.join(root, "hello.txt"), os.path.join(root, "hardlink.txt"))
    os.chmod(os.path.join(root, "hello.txt"), 0o640)


@pytest.fixture(scope="module")
def shm() -> Iterator[str]:
    with shm_dir("fss-test-") as d:
        yield d


@pytest.fixture(scope="module")
def src(shm: str) -> str:
    root = os.path.join(shm, "src")
    _tree(root)
    return root


@pytest.fixture(scope="module")
def master(shm: str, src: str) -> str:
    return mkfs(os.path.join(shm, "master.img"), "32M", bs=4096, src=src)


@pytest.fixture
def img(shm: str, master: str, request: Any) -> Iterator[str]:
    """A fresh copy of the image for one test."""
    path = os.path.join(shm, f"t-{request.node.name[:40].replace('/', '_')}.img")
    shutil.copyfile(master, path)
    yield path
    os.unlink(path)


@pytest.fixture(autouse=True)
def fresh_instances() -> Iterator[None]:
    """No instance (and so no attachment) outlives a test: the cache is cleared, the rest collected."""
    Ext2 = fsspec.get_filesystem_class("ext2")
    Ext2.clear_instance_cache()
    yield
    Ext2.clear_instance_cache()
    gc.collect()


@pytest.fixture(params=[None, False], ids=["xip", "pagecache"])
def rfs(request: Any, img: str) -> Any:
    fs = fsspec.filesystem("ext2", fo=img, xip=request.param)
    assert fs.xipfs.is_xip is (request.param is None)
    yield fs
    fs.close()


def local_rel(local: Any, root: str, infos: Any) -> dict[str, dict]:
    """LocalFileSystem results keyed by the path relative to ``root``."""
    items = infos.items() if isinstance(infos, dict) else ((i["name"], i) for i in infos)
    return {os.path.relpath(name, root): info for name, info in items}


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def same_entry(mine: dict, theirs: dict, name: str, src: str) -> None:
    for key in ("type", "islink", "mode", "uid", "gid", "nlink", "destination"):
        assert mine.get(key) == theirs.get(key), (name, key, mine, theirs)
    if not os.path.isdir(os.path.join(src, name)):   # directory sizes are each filesystem's own
        assert mine["size"] == theirs["size"], (name, mine, theirs)
    assert int(mine["mtime"]) == int(theirs["mtime"]), name
    assert set(mine) == set(theirs), name


# -- registration, URLs, instance sharing ------------------------------------------------------------
def test_registered_and_shared(img: str) -> None:
    cls = fsspec.get_filesystem_class("ext2")
    assert cls.protocol == "ext2"
    a = fsspec.filesystem("ext2", fo=img)
    b = fsspec.filesystem("ext2", fo=img)
    assert a is b
    fs, path = fsspec.core.url_to_fs(f"ext2://data/x.csv::{img}")
    assert isinstance(fs, cls) and path == "data/x.csv"
    assert fs.cat_file(path) == CSV
    assert fs._strip_protocol("ext2:///data/x.csv") == "data/x.csv"
    assert pickle.loads(pickle.dumps(fs)).cat_file("data/x.csv") == CSV
    assert fs.fsid.startswith("ext2-") and fs.fsid == a.fsid
    with pytest.raises(ValueError):
        fsspec.filesystem("ext2", fo=img, mode="w")


def test_chained_open_and_open_files(img: str) -> None:
    with fsspec.open(f"ext2://data/x.csv::{img}", "rt") as f:
        assert f.read() == CSV.decode()
    with fsspec.open(f"ext2:///hello.txt::{img}", "rb") as f:
        assert f.readline() == b"hello\n"
    files = fsspec.open_files(f"ext2://data/*.csv::{img}")
    assert sorted(of.path for of in files) == ["data/x.csv", "data/y.csv"]
    with files[0] as f:
        assert f.read() == CSV


def test_shared_memory_name(img: str) -> None:
    """A POSIX shared-memory name and its /dev/shm path are one image with one attachment."""
    name = f"fss-test-{os.getpid()}"
    shutil.copyfile(img, f"/dev/shm/{name}")
    try:
        w = fsspec.filesystem("ext2", fo=f"/{name}", mode="r+")
        r = fsspec.filesystem("ext2", fo=f"/dev/shm/{name}")
        w.pipe_file("via-name", b"1")
        assert r.cat_file("via-name") == b"1"     # the reader reads through the one writer
        with fsspec.open(f"ext2://via-name::/{name}") as f:
            assert f.read() == b"1"
        w.close()
        r.close()
        assert_fsck_clean(f"/dev/shm/{name}")
    finally:
        os.unlink(f"/dev/shm/{name}")


# -- listings against LocalFileSystem on the source tree ---------------------------------------------
def test_ls_and_info_match_local(rfs: Any, src: str) -> None:
    local = fsspec.filesystem("file")
    for top, dirs, _ in os.walk(src):
        rel = os.path.relpath(top, src)
        rel = "" if rel == "." else rel
        theirs = local_rel(local, src, local.ls(top, detail=True))
        mine = {i["name"]: i for i in rfs.ls(rel, detail=True)}
        if not rel:
            del mine["lost+found"]
        assert sorted(mine) == sorted(theirs)
        assert rfs.ls(rel, detail=False) == sorted([*mine, *(["lost+found"] if not rel else [])])
        for name in mine:
            same_entry(mine[name], theirs[name], name, src)
            if os.path.exists(os.path.join(src, name)):
                same_entry(rfs.info(name), local.info(os.path.join(src, name)) | {"name": name}, name, src)
        assert all(not d.startswith(".") for d in dirs)
    info = rfs.info("data/link")                        # info follows, the ls entry does not
    assert (info["type"], info["islink"], info["size"]) == ("file", True, 12)
    assert info["destination"] == "../hello.txt"
    assert rfs.ls("data/x.csv") == [rfs.info("data/x.csv")]
    assert rfs.info("")["type"] == "directory" and rfs.info("/")["name"] == ""
    assert rfs.info("hardlink.txt")["nlink"] == 2 and rfs.info("hello.txt")["mode"] & 0o777 == 0o640


def test_find_glob_walk_du_match_local(rfs: Any, src: str) -> None:
    local = fsspec.filesystem("file")

    def rel(paths: list[str]) -> list[str]:
        return sorted(os.path.relpath(p, src) for p in paths)

    mine = [p for p in rfs.find("") if not p.startswith("lost+found")]
    assert mine == rel(local.find(src))
    assert rfs.find("", withdirs=True, maxdepth=2) == sorted(   # the root is "" here, "." there
        ["lost+found", *rel(local.find(src, withdirs=True, maxdepth=2))[1:]])
    assert rfs.find("data/x.csv") == ["data/x.csv"]
    for pattern in ("**/*.txt", "data/*.csv", "sizes/f409?", "deep/**", "*"):
        mine = [p for p in rfs.glob(pattern) if not p.startswith("lost+found")]
        assert mine == rel(local.glob(os.path.join(src, pattern))), pattern
    walked = {top: (sorted(d), sorted(f)) for top, d, f in rfs.walk("deep")}
    theirs = {os.path.relpath(top, src): (sorted(d), sorted(f))
              for top, d, f in local.walk(os.path.join(src, "deep"))}
    assert walked == theirs
    assert rfs.du("data") == local.du(os.path.join(src, "data"))
    assert rfs.du("sizes", total=False) == {os.path.relpath(k, src): v for k, v in
                                             local.du(os.path.join(src, "sizes"), total=False).items()}
    assert rfs.size("data/big.bin") == BIG


def test_missing_and_links(rfs: Any) -> None:
    with pytest.raises(FileNotFoundError) as err:
        rfs.info("data/nope.csv")
    assert err.value.filename == "data/nope.csv"
    with pytest.raises(FileNotFoundError):
        rfs.ls("nope")
    with pytest.raises(FileNotFoundError):
        rfs.info("dangling")                          # as LocalFileSystem: info follows the link
    assert rfs.lexists("dangling") and not rfs.exists("dangling") and rfs.islink("dangling")
    assert rfs.isdir("deep/dirlink") and not rfs.isfile("deep/dirlink")
    assert rfs.isfile("data/link") and not rfs.isdir("data/x.csv") and not rfs.exists("nope")
    assert [e["name"] for e in rfs.ls("deep/dirlink")] == ["deep/dirlink/c"]
    with pytest.raises(NotADirectoryError):
        rfs.info("data/x.csv/inside")
    with pytest.raises(FileNotFoundError):
        rfs.cat_file("nope")
    with pytest.raises(IsADirectoryError):
        rfs.cat_file("data")


# -- reading ---------------------------------------------------------------------------------------
def test_cat_file_ranges(rfs: Any, src: str) -> None:
    with open(os.path.join(src, "data/big.bin"), "rb") as f:
        data = f.read()
    n = len(data)
    for start, end in [(None, None), (0, 10), (5, None), (None, 100), (-100, None), (-100, -10),
                       (4090, 4100), (n - 1, n + 10), (n + 5, None), (10, 5), (0, -n - 1),
                       (1 << 20, 2 << 20), (-(n + 50), 3)]:
        lo = None if start is None else start
        expected = data[slice(lo, end)] if not (start is not None and start < 0 and -start > n) \
            else data[0:end]
        assert rfs.cat_file("data/big.bin", start, end) == expected, (start, end)
    assert rfs.cat_file("empty") == b""
    assert rfs.cat_file("data/link") == b"hello\nworld\n"
    assert rfs.cat_ranges(["data/x.csv", "hello.txt"], [0, 6], [5, None]) == [b"a,b,c", b"world\n"]
    assert rfs.cat("data/*.csv") == {"data/x.csv": CSV, "data/y.csv": CSV.replace(b"x", b"w")}
    assert rfs.head("hello.txt", 5) == b"hello" and rfs.tail("hello.txt", 6) == b"world\n"
    local = fsspec.filesystem("file")
    for off, length in [(3, 5), (0, 7), (10, 100)]:
        assert rfs.read_block("data/x.csv", off, length, delimiter=b"\n") == local.read_block(
            os.path.join(src, "data/x.csv"), off, length, delimiter=b"\n")


def test_open_read_seek(rfs: Any, src: str) -> None:
    with open(os.path.join(src, "data/big.bin"), "rb") as f:
        data = f.read()
    with rfs.open("data/big.bin", "rb") as f:
        assert f.size == len(data) and f.info()["size"] == len(data)
        assert f.read(10) == data[:10]
        assert f.seek(-20, os.SEEK_END) == len(data) - 20
        assert f.read() == data[-20:]
        f.seek(4000)
        buf = bytearray(200)
        assert f.readinto(buf) == 200 and buf == data[4000:4200]
        assert f.tell() == 4200
        f.seek(0)
        assert f.read() == data
        assert f.read() == b""
    with rfs.open("hello.txt", "r") as f:
        assert list(f) == ["hello\n", "world\n"]
    with pytest.raises(IsADirectoryError):
        rfs.open("deep", "rb")


def test_mmap_is_the_file(rfs: Any, src: str) -> None:
    with open(os.path.join(src, "sizes/f70000"), "rb") as f:
        data = f.read()
    with rfs.mmap("sizes/f70000") as m:
        assert len(m) == len(data) and m[:] == data
        assert m.is_xip is rfs.xipfs.is_xip


def test_get_recursive(rfs: Any, src: str, shm: str) -> None:
    dest = os.path.join(shm, "got")
    try:
        rfs.get("deep", dest + "/", recursive=True)
        assert read(os.path.join(dest, "deep/a/b/c/leaf.txt")) == b"leaf\n" * 100
        rfs.get("sizes/", os.path.join(dest, "sizes"), recursive=True)
        for n in (1, 4095, 4096, 4097, 70_000):
            assert read(os.path.join(src, f"sizes/f{n}")) == read(os.path.join(dest, f"sizes/f{n}"))
        rfs.get("d*/*.csv", os.path.join(dest, "csv") + "/")
        assert sorted(os.listdir(os.path.join(dest, "csv"))) == ["x.csv", "y.csv"]
        rfs.get("data/big.bin", os.path.join(dest, "big.bin"))
        assert os.path.getsize(os.path.join(dest, "big.bin")) == BIG
        out = io.BytesIO()
        rfs.get_file("data/x.csv", out)
        assert out.getvalue() == CSV
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_readonly_instance_refuses_writes(img: str) -> None:
    fs = fsspec.filesystem("ext2", fo=img)
    for call in (lambda: fs.pipe_file("x", b"1"), lambda: fs.open("x", "wb"), lambda: fs.mkdir("d"),
                 lambda: fs.rm("hello.txt"), lambda: fs.touch("t"), lambda: fs.mv("hello.txt", "h")):
        with pytest.raises(OSError) as err:
            call()
        assert err.value.errno == errno.EROFS
    assert fs.cat_file("hello.txt") == b"hello\nworld\n"


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_invalid_open_modes_are_value_errors(img: str, mode: str) -> None:
    """As LocalFileSystem: a mode open() does not know is ValueError, never a silent read (or,
    on a read-only instance, EROFS)."""
    fs = fsspec.filesystem("ext2", fo=img, mode=mode)
    for bad in ("q", "qb", "rw", "rb+b", "wa", "ab+x"):
        with pytest.raises(ValueError, match="invalid mode"):
            fs.open("hello.txt", bad)
    assert fs.cat_file("hello.txt") == b"hello\nworld\n"
    fs.close()


# -- writing ---------------------------------------------------------------------------------------
def test_write_operations_leave_a_clean_image(img: str, src: str, shm: str) -> None:
    fs = fsspec.filesystem("ext2", fo=img, mode="r+")
    fs.pipe_file("new.txt", b"new\n")
    fs.makedirs("p")
    fs.pipe({"p/one": b"1", "p/two": b"22"})
    with pytest.raises(FileExistsError):
        fs.pipe_file("new.txt", b"again", mode="create")
    fs.mkdir("m/n/o")
    with pytest.raises(FileExistsError):
        fs.mkdir("m/n")
    fs.makedirs("m/n", exist_ok=True)
    with pytest.raises(FileExistsError):
        fs.makedirs("m/n")
    with pytest.raises(FileNotFoundError):
        fs.mkdir("q/r", create_parents=False)
    with fs.open("m/n/o/w.bin", "wb") as f:
        f.write(b"x" * 100_000)
        f.write(memoryview(bytes(range(256)) * 40_000))
    with fs.open("m/n/o/w.bin", "ab") as f:
        f.write(b"tail")
    with fs.open("text.txt", "w") as f:
        f.write("line 1\nline 2\n")
    with pytest.raises(FileExistsError):
        fs.open("text.txt", "xb")
    with fs.open("text.txt", "r+b") as f:
        f.seek(5)
        f.write(b"X")
    fs.touch("touched")
    fs.touch("text.txt", truncate=False)
    fs.makedirs("copy")
    fs.cp_file("data/big.bin", "copy/big.bin")
    fs.cp_file("text.txt", "text2.txt")
    fs.copy("deep", "deep2", recursive=True)
    fs.mv("hello.txt", "m")                             # into a directory, as shutil.move
    fs.mv("deep2/a", "renamed")                         # a whole directory in one step
    fs.mv(["data/x.csv", "data/y.csv"], ["x2.csv", "y2.csv"])
    fs.rm("sizes", recursive=True)
    fs.rm("deep/dirlink")                               # the link, not what it points to
    with pytest.raises(ValueError):
        fs.rm("deep")
    with pytest.raises(OSError) as err:
        fs.rmdir("deep")
    assert err.value.errno == errno.ENOTEMPTY
    fs.rm("m/n/o/*.bin")
    fs.rmdir("emptydir")
    fs.put(os.path.join(src, "deep"), "put", recursive=True)
    fs.put_file(os.path.join(src, "data/big.bin"), "put/big.bin")

    expect = {
        "new.txt": b"new\n", "p/one": b"1", "p/two": b"22", "text.txt": b"line X\nline 2\n",
        "text2.txt": b"line X\nline 2\n", "touched": b"", "m/hello.txt": b"hello\nworld\n",
        "x2.csv": CSV, "renamed/b/c/leaf.txt": b"leaf\n" * 100, "put/a/b/c/leaf.txt": b"leaf\n" * 100,
    }
    for path, data in expect.items():
        assert fs.cat_file(path) == data, path
    big = read(os.path.join(src, "data/big.bin"))
    assert fs.cat_file("copy/big.bin") == big and fs.cat_file("put/big.bin") == big
    for gone in ("sizes", "hello.txt", "data/x.csv", "deep2/a", "emptydir", "m/n/o/w.bin", "deep/dirlink"):
        assert not fs.lexists(gone), gone
    assert fs.isdir("deep/a/b") and fs.ls("m/n/o") == []
    fs.close()
    assert_fsck_clean(img)
    for path, data in expect.items():                   # debugfs, not xipfs, reads them back
        assert debugfs_cat(img, "/" + path) == data, path


def test_every_write_is_synced_for_other_processes(img: str) -> None:
    """Between operations the image is consistent: e2fsck finds nothing, another process reads it."""
    fs = fsspec.filesystem("ext2", fo=img, mode="r+")
    fs.pipe_file("a.txt", b"alpha")
    fs.rm("sizes", recursive=True)
    f = fs.open("b.txt", "wb")                          # the last change: a file's close syncs
    f.write(b"beta" * 5000)
    f.close()
    assert_fsck_clean(img)
    code = ("import fsspec, sys; fs = fsspec.filesystem('ext2', fo=sys.argv[1], mode=sys.argv[2]); "
            "print(fs.cat_file('a.txt').decode(), len(fs.cat_file('b.txt')), fs.exists('sizes'))")

    def other_process(mode: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, img, mode], capture_output=True, text=True)

    out = other_process("r")
    assert out.stdout.split() == ["alpha", "20000", "False"], out.stderr
    busy = other_process("r+")                          # one writer at a time
    assert busy.returncode != 0 and "busy" in busy.stderr.lower(), busy.stderr
    fs.close()
    assert other_process("r+").returncode == 0


def test_close_and_instance_cache(img: str) -> None:
    fs = fsspec.filesystem("ext2", fo=img, mode="r+")
    with fsspec.filesystem("ext2", fo=img, mode="r+") as same:
        assert same is fs
        f = same.open("left-open.txt", "wb")
        f.write(b"flushed at close")
    assert f.closed                                     # closing the filesystem closed the file
    with pytest.raises(ValueError):
        fs.cat_file("left-open.txt")
    assert_fsck_clean(img)
    again = fsspec.filesystem("ext2", fo=img, mode="r+")
    assert again is not fs and again.cat_file("left-open.txt") == b"flushed at close"
    again.close()
    again.close()


def test_writers_in_threads_share_one_attachment(img: str) -> None:
    """fsspec makes one instance per thread: every ``r+`` instance writes through one mount."""
    reader = fsspec.filesystem("ext2", fo=img)
    assert reader.cat_file("hello.txt") == b"hello\nworld\n"
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            fs = fsspec.filesystem("ext2", fo=img, mode="r+")
            for k in range(20):
                fs.pipe_file(f"t{i}-{k}", str(k).encode())
            fs.close()
        except BaseException as err:                    # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert_fsck_clean(img)
    assert sorted(reader.glob("t*")) == sorted(f"t{i}-{k}" for i in range(4) for k in range(20))
    assert reader.cat_file("t3-19") == b"19"


def test_transaction(img: str) -> None:
    fs = fsspec.filesystem("ext2", fo=img, mode="r+")
    with fs.transaction:
        with fs.open("tx.txt", "wb") as f:
            f.write(b"committed")
        assert not fs.exists("tx.txt")
    assert fs.cat_file("tx.txt") == b"committed"
    with pytest.raises(RuntimeError), fs.transaction:
        with fs.open("tx2.txt", "wb") as f:
            f.write(b"discarded")
        raise RuntimeError
    assert not fs.exists("tx2.txt") and sorted(fs.ls("", detail=False)) == sorted(
        ["data", "deep", "dangling", "empty", "emptydir", "hardlink.txt", "hello.txt", "lost+found",
         "sizes", "tx.txt"])
    fs.close()
    assert_fsck_clean(img)


def test_pandas_round_trip(img: str) -> None:
    pd = pytest.importorskip("pandas")
    df = pd.read_csv(f"ext2://data/x.csv::{img}")
    assert list(df.columns) == ["a", "b", "c"] and df["b"].sum() == 12
    df["d"] = df["a"] * 10
    df.to_csv(f"ext2://out/y.csv::{img}", index=False,
              storage_options={"ext2": {"mode": "r+", "auto_mkdir": True}})
    back = pd.read_csv(f"ext2://out/y.csv::{img}")
    assert back.equals(df)
    # the r+ instance pandas made lives in fsspec's cache: clearing it closes the image
    fsspec.get_filesystem_class("ext2").clear_instance_cache()
    gc.collect()
    assert_fsck_clean(img)
    assert debugfs_cat(img, "/out/y.csv") == df.to_csv(index=False).encode()


# -- images that are not local ----------------------------------------------------------------------
def test_remote_and_file_object_images(img: str) -> None:
    with open(img, "rb") as f:
        raw = f.read()
    mem = fsspec.filesystem("memory")
    mem.pipe_file("/fss-test/image.ext2", raw)
    try:
        fs = fsspec.filesystem("ext2", fo="memory://fss-test/image.ext2")
        assert fs.cat_file("data/x.csv") == CSV and fs.xipfs.is_xip
        with fsspec.open("ext2://hello.txt::memory://fss-test/image.ext2") as f:
            assert f.read() == b"hello\nworld\n"
        with pytest.raises(ValueError):
            fsspec.filesystem("ext2", fo="memory://fss-test/image.ext2", mode="r+")
        fs.close()
    finally:
        mem.rm("/fss-test", recursive=True)
    obj = fsspec.filesystem("ext2", fo=io.BytesIO(raw))
    assert obj.cat_file("data/y.csv", 0, 5) == b"a,b,c"
    obj.close()


def test_ukey_checksum_modified(img: str, src: str) -> None:
    fs = fsspec.filesystem("ext2", fo=img, mode="r+")
    key, check = fs.ukey("hello.txt"), fs.checksum("hello.txt")
    assert fs.ukey("hello.txt") == key and fs.ukey("hardlink.txt") == key
    assert int(fs.modified("hello.txt").timestamp()) == int(os.stat(os.path.join(src, "hello.txt")).st_mtime)
    assert fs.created("hello.txt").tzinfo is not None
    fs.pipe_file("hello.txt", b"changed")
    assert fs.ukey("hello.txt") != key and fs.checksum("hello.txt") != check
    with pytest.raises(NotImplementedError):
        fs.sign("hello.txt")
    fs.close()


def test_mapper_and_emptying_the_image(img: str) -> None:
    fs = fsspec.filesystem("ext2", fo=img, mode="r+")
    m = fs.get_mapper("store")
    m["a/b/0.0"] = b"chunk"
    assert dict(m) == {"a/b/0.0": b"chunk"} and "a/b/1.0" not in m
    with pytest.raises(KeyError):
        m["a/b/1.0"]
    fs.rm("", recursive=True)                           # everything but lost+found, which fsck wants
    assert fs.ls("", detail=False) == ["lost+found"]
    fs.close()
    assert_fsck_clean(img)


def test_rm_to_a_depth_keeps_what_lies_deeper(img: str) -> None:
    """``rm(maxdepth=)`` removes what lies within the depth and leaves the directories that
    still hold something (fsspec's base class stopped with ENOTEMPTY, half done); emptying the
    root to a depth keeps lost+found."""
    fs = fsspec.filesystem("ext2", fo=img, mode="r+")
    fs.rm("deep", recursive=True, maxdepth=1)
    assert fs.find("deep", withdirs=True) == ["deep", "deep/a", "deep/a/b", "deep/a/b/c",
                                              "deep/a/b/c/leaf.txt"]     # deep/dirlink went
    fs.rm("deep", recursive=True, maxdepth=10)
    assert not fs.exists("deep")
    with pytest.raises(ValueError):
        fs.rm("emptydir", maxdepth=1)
    fs.rm("", recursive=True, maxdepth=1)                 # files and emptydir go, full directories stay
    assert fs.ls("", detail=False) == ["data", "lost+found", "sizes"]
    assert fs.find("sizes") == [f"sizes/f{n}" for n in (1, 4095, 4096, 4097, 70_000)]
    fs.close()
    assert_fsck_clean(img)


def test_invalidate_cache_sees_another_process(img: str) -> None:
    reader = fsspec.filesystem("ext2", fo=img)
    assert reader.cat_file("hello.txt") == b"hello\nworld\n"
    code = ("import fsspec, sys; fs = fsspec.filesystem('ext2', fo=sys.argv[1], mode='r+'); "
            "fs.pipe_file('hello.txt', b'rewritten by another process'); fs.pipe_file('new', b'n'); "
            "fs.close()")
    subprocess.run([sys.executable, "-c", code, img], check=True)
    reader.invalidate_cache()
    assert reader.cat_file("hello.txt") == b"rewritten by another process"
    assert reader.cat_file("new") == b"n"


def test_close_all_releases_images_written_through_urls(tmp_path):
    """A URL chain opened ``r+`` makes its own cached instance; ``close_all`` closes every one,
    so the image is clean and unlocked again (xipfs.check takes a reader's lock)."""
    import xipfs

    Ext2FileSystem = fsspec.get_filesystem_class("ext2")  # noqa: N806 - a class
    img = os.path.join("/dev/shm", f"xipfs-fsspec-closeall-{os.getpid()}.img")
    try:
        xipfs.mkfs(img, 8 << 20)
        with fsspec.open(f"ext2://a.txt::{img}", "wb", ext2={"mode": "r+"}) as f:
            f.write(b"hello")
        with pytest.raises(OSError) as err:
            xipfs.check(img)
        assert err.value.errno == errno.EBUSY
        Ext2FileSystem.close_all()
        assert xipfs.check(img) == []
        assert_fsck_clean(img)
        with xipfs.open(img) as fs:
            assert fs.read_bytes("/a.txt") == b"hello"
    finally:
        Ext2FileSystem.clear_instance_cache()
        if os.path.exists(img):
            os.unlink(img)
