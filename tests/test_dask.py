"""xipfs.dask on a real LocalCluster of 4 worker processes: one image per node, read in place.

One cluster for the module (starting one costs seconds). The dataset is a tree of text files
and a float64 array in a tmpfs directory, packed by ``mke2fs -d`` into an image: every result
read from the image is compared with the same computation over the directory. Memory is read
from ``/proc/PID/smaps`` of each worker (the Rss and Pss of its mappings of the image): PSS
splits each shared page between the processes that map it, so the workers' summed PSS counts
the node's one copy once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed", reason="xipfs.dask needs dask.distributed (the 'dask' extra)")
np = pytest.importorskip("numpy", reason="map_array needs numpy")

import dask.bag as db  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402
from e2fs import SHM, mkfs  # noqa: E402

import xipfs  # noqa: E402
import xipfs.dask as xd  # noqa: E402
from xipfs.xip.arrays import load_chunk, map_array  # noqa: E402

NFILES = 48
FILE_BYTES = 512 * 1024                     # text files: 24 MiB in all
ROWS, COLS = 2048, 256                      # the array: 4 MiB of float64


def _can_fork_processes() -> str | None:
    if not hasattr(os, "fork"):
        return "no fork on this platform"
    if not os.path.isdir("/dev/shm"):
        return "no /dev/shm: no shared memory to deliver images into"
    if not os.path.exists("/proc/self/smaps_rollup"):
        return "no /proc/PID/smaps_rollup to read PSS from"  # smaps came before it
    return None


pytestmark = pytest.mark.skipif(_can_fork_processes() is not None, reason=str(_can_fork_processes()))


# -- the dataset and the cluster -----------------------------------------------------------------
def _line_file(i: int) -> bytes:
    """About FILE_BYTES of numbered lines, different in every file."""
    out, n = [], 0
    while n < FILE_BYTES:
        line = f"file {i} line {len(out)} {hashlib.sha1(f'{i}-{len(out)}'.encode()).hexdigest()}\n"
        out.append(line)
        n += len(line)
    return "".join(out).encode()


@pytest.fixture(scope="module")
def dataset() -> Iterator[dict[str, Any]]:
    """A tree in a tmpfs directory and the same tree as an ext2 image beside it."""
    root = tempfile.mkdtemp(prefix="xipfs-dask-", dir=SHM)
    src = os.path.join(root, "src")
    os.makedirs(os.path.join(src, "logs"))
    os.makedirs(os.path.join(src, "arrays"))
    for i in range(NFILES):
        with open(os.path.join(src, "logs", f"f{i:03d}.txt"), "wb") as f:
            f.write(_line_file(i))
    arr = np.random.default_rng(17).standard_normal((ROWS, COLS))
    arr.tofile(os.path.join(src, "arrays", "x.f8"))
    img = mkfs(os.path.join(root, "data.ext2"), "48M", bs=4096, src=src)
    yield {"root": root, "src": src, "img": img, "array": arr}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def client() -> Iterator[Client]:
    """4 worker processes of one thread each, on this machine (one node)."""
    with LocalCluster(n_workers=4, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit=0) as cluster, Client(cluster) as c:
        yield c


@pytest.fixture(scope="module")
def delivered(client: Client, dataset: dict[str, Any]) -> Iterator[str]:
    """The image delivered to the cluster under a fresh shared-memory name."""
    name = f"xipfs-test-{uuid.uuid4().hex[:8]}"
    assert xd.deliver(client, dataset["img"], name) == name
    yield name
    xd.release(client, name)


def _files(d: dict[str, Any]) -> list[str]:
    return sorted(f"logs/{n}" for n in os.listdir(os.path.join(d["src"], "logs")))


# -- delivery ------------------------------------------------------------------------------------
def test_one_copy_per_node(client: Client, delivered: str, dataset: dict[str, Any]) -> None:
    """Every worker attached the same file (one inode), fetched by one of them."""
    path = xd.image_path(delivered)

    def where() -> tuple[int, int, int]:
        st = os.stat(path)
        return os.getpid(), st.st_ino, st.st_nlink

    seen = client.run(where)
    assert len(seen) == 4
    assert len({ino for _, ino, _ in seen.values()}) == 1
    with open(path, "rb") as a, open(dataset["img"], "rb") as b:
        assert a.read() == b.read()
    with open(os.path.join(os.path.dirname(path), f".{delivered}.xipfs-lock")) as f:
        record = f.read()
    assert f'"source": "{dataset["img"]}"' in record
    assert any(f'"pid": {pid}' in record for pid, _, _ in seen.values())
    assert not os.path.exists(os.path.join(SHM, f".{delivered}.xipfs-part"))


def test_deliver_again_is_a_no_op(client: Client, delivered: str, dataset: dict[str, Any]) -> None:
    ino = os.stat(xd.image_path(delivered)).st_ino
    xd.deliver(client, dataset["img"], delivered)
    assert os.stat(xd.image_path(delivered)).st_ino == ino


def test_another_source_under_the_same_name_is_refused(client: Client, delivered: str,
                                                       dataset: dict[str, Any]) -> None:
    other = os.path.join(dataset["root"], "other.ext2")
    shutil.copyfile(dataset["img"], other)
    with pytest.raises(FileExistsError, match="release"):
        xd.provide(other, delivered)


def test_waiting_is_bounded(dataset: dict[str, Any]) -> None:
    """A worker waiting for another one's fetch gives up after ``timeout``, naming the holder."""
    name = f"xipfs-test-wait-{uuid.uuid4().hex[:8]}"
    lock = os.path.join(SHM, f".{name}.xipfs-lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.write(fd, f'{{"pid": {os.getpid()}}}'.encode())
        with pytest.raises(TimeoutError, match=f"pid {os.getpid()}"):
            xd.attach(dataset["img"], name, timeout=0.2)
        assert not os.path.exists(xd.image_path(name))
    finally:
        os.close(fd)
        os.unlink(lock)


def test_a_fetch_in_progress_is_waited_for(dataset: dict[str, Any]) -> None:
    """The bound is on time without progress: a holder whose partial copy keeps growing for
    longer than ``timeout`` is waited for, and its image attached."""
    name = f"xipfs-test-slow-{uuid.uuid4().hex[:8]}"
    path = xd.image_path(name)
    lock = os.path.join(SHM, f".{name}.xipfs-lock")
    part = os.path.join(SHM, f".{name}.xipfs-part")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    done = threading.Event()

    def slow_fetch() -> None:
        try:
            with open(part, "wb") as f:
                for _ in range(30):                     # 3 s of progress, 3 timeouts' worth
                    f.write(b"x" * 4096)
                    f.flush()
                    time.sleep(0.1)
            shutil.copyfile(dataset["img"], part)
            os.rename(part, path)
            os.pwrite(fd, f'{{"source": "{dataset["img"]}", "pid": {os.getpid()}}}'.encode(), 0)
        finally:
            os.close(fd)
            done.set()

    holder = threading.Thread(target=slow_fetch)
    holder.start()
    try:
        # a second without progress would time out: ten times a write's gap, for loaded machines
        assert xd.provide(dataset["img"], name, timeout=1.0) is False      # attached, not fetched
        assert done.is_set()
    finally:
        holder.join()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.unlink(lock)


def test_a_corrupt_image_is_not_put_in_place(client: Client, dataset: dict[str, Any]) -> None:
    bad = os.path.join(dataset["root"], "bad.ext2")
    with open(bad, "wb") as f:
        f.write(b"\0" * (1 << 20))
    name = f"xipfs-test-bad-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(xipfs.CorruptImageError):
            xd.deliver(client, bad, name)
        assert not os.path.exists(xd.image_path(name))
        assert not os.path.exists(os.path.join(SHM, f".{name}.xipfs-part"))
    finally:
        xd.release(client, name)


def test_a_missing_source_fails_at_deliver(client: Client, dataset: dict[str, Any]) -> None:
    name = f"xipfs-test-missing-{uuid.uuid4().hex[:8]}"
    try:
        with pytest.raises(FileNotFoundError):
            xd.deliver(client, os.path.join(dataset["root"], "no-such.ext2"), name)
        assert not os.path.exists(xd.image_path(name))
    finally:
        xd.release(client, name)


def test_image_not_delivered_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="deliver"):
        xd.image(f"xipfs-test-absent-{uuid.uuid4().hex[:8]}")


@pytest.mark.parametrize("bad", ["", "/", "a/b", "../x"])
def test_bad_names(bad: str) -> None:
    with pytest.raises(ValueError):
        xd.image_path(bad)


def test_fetched_once_per_node_over_http(client: Client, dataset: dict[str, Any], tmp_path: Any) -> None:
    """From a URL: the image crosses the network once for the 4 workers (bytes at the server)."""
    pytest.importorskip("xipfs.tools.fetch", reason="xipfs.fetch (remote images) is not there yet")
    nginx_util = pytest.importorskip("nginx_util", reason="tests/nginx_util.py is not there yet")
    served = tmp_path / "served"
    served.mkdir()
    shutil.copyfile(dataset["img"], served / "data.ext2")
    with nginx_util.start_nginx(served, tmp_path / "nginx") as server:
        name = f"xipfs-test-http-{uuid.uuid4().hex[:8]}"
        try:
            xd.deliver(client, server.url("data.ext2"), name)
            size = os.path.getsize(dataset["img"])
            assert size <= server.body_bytes() <= size + 64 * 1024     # once (a probe at most)
            got = client.run(lambda: xd.image(name).read_bytes("/logs/f000.txt"))
            assert set(got.values()) == {_line_file(0)}
        finally:
            xd.release(client, name)


# -- reading in place ----------------------------------------------------------------------------
def test_tasks_read_by_name(client: Client, delivered: str, dataset: dict[str, Any]) -> None:
    files = _files(dataset)

    def digest(p: str, name: str = delivered) -> str:
        return hashlib.sha256(xd.image(name).read_bytes("/" + p)).hexdigest()

    got = client.gather(client.map(digest, files))
    want = [hashlib.sha256(Path(dataset["src"], p).read_bytes()).hexdigest() for p in files]
    assert got == want


def test_bag_over_ext2_equals_bag_over_the_directory(client: Client, delivered: str,
                                                      dataset: dict[str, Any]) -> None:
    def summary(bag: db.Bag) -> tuple[int, int, list[str]]:
        lines = bag.map(str.rstrip)
        return client.compute([lines.count(), lines.map(len).sum(),
                               lines.filter(lambda s: s.endswith("0")).topk(5)], sync=True)

    ours = summary(db.read_text(f"ext2://logs/*.txt::/{delivered}", blocksize=None))
    theirs = summary(db.read_text(os.path.join(dataset["src"], "logs", "*.txt"), blocksize=None))
    assert ours == theirs
    assert ours[0] > NFILES


def test_workers_share_one_copy(client: Client, delivered: str, dataset: dict[str, Any]) -> None:
    """Each of the 4 workers reads every file: each has all of it mapped (RSS), and their PSS
    of the image, which splits every page between the workers mapping it, sums to one copy."""
    files = ["/" + p for p in _files(dataset)]
    read = sum(os.path.getsize(dataset["src"] + p) for p in files)

    def read_all(name: str = delivered) -> int:
        fs = xd.image(name)
        return sum(len(fs.read_bytes(p)) for p in files)

    assert set(client.run(read_all).values()) == {read}
    mem = xd.worker_memory(client, delivered)
    rss = sum(m["rss"] for m in mem.values())
    pss = sum(m["pss"] for m in mem.values())
    assert rss >= 3.5 * read, mem                     # every worker has all of it mapped ...
    assert 0.9 * read <= pss <= 1.25 * read, mem      # ... and the node holds it once


# -- arrays --------------------------------------------------------------------------------------
def test_map_array_reductions_equal_numpy(client: Client, delivered: str, dataset: dict[str, Any]) -> None:
    want = dataset["array"]
    a = map_array(delivered, "arrays/x.f8", "float64", (ROWS, COLS), chunks=(512, 128))
    assert a.shape == want.shape and a.dtype == want.dtype and a.numblocks == (4, 2)
    got = client.compute([a.sum(), a.mean(axis=0), a.max(axis=1), a[100:1500:3, 7:200].std()], sync=True)
    assert np.isclose(got[0], want.sum())
    np.testing.assert_allclose(got[1], want.mean(axis=0))
    np.testing.assert_array_equal(got[2], want.max(axis=1))
    assert np.isclose(got[3], want[100:1500:3, 7:200].std())
    flat = map_array(delivered, "arrays/x.f8", "float64", chunks=100_000)
    assert flat.shape == (ROWS * COLS,)
    np.testing.assert_array_equal(client.compute(flat[::1000], sync=True), want.ravel()[::1000])
    part = xd.map_array(delivered, "arrays/x.f8", "float64", (10, COLS), offset=8 * COLS * 5, chunks=4)
    np.testing.assert_array_equal(client.compute(part, sync=True), want[5:15])


def test_fs_map_array_with_chunks_is_the_dask_array(client: Client, delivered: str,
                                                    dataset: dict[str, Any]) -> None:
    """``Filesystem.map_array(..., chunks=)`` gives the same dask array, read-only."""
    want = dataset["array"]
    with xipfs.open(delivered) as fs:
        a = fs.map_array("arrays/x.f8", "float64", (ROWS, COLS), chunks=(512, COLS))
        with pytest.raises(ValueError, match="read-only"):
            fs.map_array("arrays/x.f8", "float64", (ROWS, COLS), access="w", chunks=(512, COLS))
    assert a.numblocks == (ROWS // 512, 1)
    np.testing.assert_allclose(client.compute(a.sum(axis=1), sync=True), want.sum(axis=1))


def test_map_array_graph_carries_no_data(delivered: str, dataset: dict[str, Any]) -> None:
    a = map_array(delivered, "arrays/x.f8", "float64", (ROWS, COLS), chunks=(256, COLS))
    graph = dict(a.__dask_graph__())
    assert len(graph) == ROWS // 256
    assert len(pickle.dumps(graph)) < 8 * 1024 < a.nbytes // 100


def test_chunks_are_views_of_the_image(client: Client, delivered: str) -> None:
    """On a worker a chunk is a read-only view of the XIP mapping of the file, not a copy."""
    def look(name: str = delivered) -> tuple[bool, bool, bool]:
        chunk = load_chunk(name, "arrays/x.f8", 8 * COLS * 512, (512, COLS), "<f8")
        base = chunk
        while isinstance(base, np.ndarray) and base.base is not None:
            base = base.base
        mapping = base.obj if isinstance(base, memoryview) else base
        return chunk.flags.owndata, chunk.flags.writeable, bool(getattr(mapping, "is_xip", False))

    assert set(client.run(look).values()) == {(False, False, True)}


def test_no_chunk_crosses_between_workers(client: Client, delivered: str) -> None:
    """A reduction over a 4 MiB array moves only partial results between the workers."""
    a = map_array(delivered, "arrays/x.f8", "float64", (ROWS, COLS), chunks=(256, COLS))

    def sent(dask_worker: Any) -> int:
        return dask_worker.transfer_outgoing_bytes_total

    before = client.run(sent)
    assert np.isfinite(client.compute((a * 2 + 1).sum(), sync=True))
    after = client.run(sent)
    moved = sum(after[w] - before.get(w, 0) for w in after)
    assert moved < 256 * COLS * 8 // 4, moved             # less than a quarter of one chunk


def test_map_array_out_of_the_file_is_a_value_error(client: Client, delivered: str) -> None:
    a = map_array(delivered, "arrays/x.f8", "float64", (ROWS + 1, COLS), chunks=(ROWS + 1, COLS))
    with pytest.raises(ValueError, match="do not fit"):
        client.compute(a.sum(), sync=True)
    with pytest.raises(ValueError):
        map_array(delivered, "arrays/x.f8", "float64", (2, 2), offset=-8)


# -- teardown ------------------------------------------------------------------------------------
def test_release_unlinks_on_every_node(client: Client, dataset: dict[str, Any]) -> None:
    name = f"xipfs-test-rel-{uuid.uuid4().hex[:8]}"
    xd.deliver(client, dataset["img"], name)
    assert os.path.exists(xd.image_path(name))
    unlinked = xd.release(client, name)
    assert sorted(unlinked.values()) == [False, False, False, True]   # one node: one unlink
    assert not any(f.startswith(f".{name}") or f == name for f in os.listdir(SHM))

    def gone(name: str = name) -> str:
        try:
            xd.image(name)
        except FileNotFoundError as err:
            return type(err).__name__
        return "still there"

    assert set(client.run(gone).values()) == {"FileNotFoundError"}
    assert xd.release(client, name) == dict.fromkeys(unlinked, False)    # again: nothing to do


def test_keep_false_unlinks_with_the_last_worker(client: Client, dataset: dict[str, Any]) -> None:
    name = f"xipfs-test-nokeep-{uuid.uuid4().hex[:8]}"
    try:
        xd.deliver(client, dataset["img"], name, keep=False)
        assert os.path.exists(xd.image_path(name))
        client.unregister_worker_plugin(xd.plugin_name(name))        # every worker's teardown
        assert not os.path.exists(xd.image_path(name))
    finally:
        with contextlib.suppress(Exception):
            xd.release(client, name)


def test_populate_maps_the_whole_image_in_every_worker(client: Client, dataset: dict[str, Any]) -> None:
    """``populate=True``: every worker has every page mapped at once, in one mapping that the
    ``ext2://`` door shares; the node still holds one copy."""
    name = f"xipfs-test-pop-{uuid.uuid4().hex[:8]}"
    try:
        xd.deliver(client, dataset["img"], name, populate=True)
        size = os.path.getsize(dataset["img"])

        def through_the_door(name: str = name) -> int:
            import fsspec
            total = 0
            for i in range(NFILES):
                with fsspec.open(f"ext2://logs/f{i:03d}.txt::/{name}") as f:
                    total += len(f.read())
            return total

        assert len(set(client.run(through_the_door).values())) == 1
        mem = xd.worker_memory(client, name)
        assert all(m["rss"] >= 0.95 * size for m in mem.values()), mem
        assert all(m["rss"] <= 1.02 * size for m in mem.values()), mem    # the door shares it
        assert sum(m["pss"] for m in mem.values()) <= 1.05 * size, mem
    finally:
        xd.release(client, name)


def test_an_image_larger_than_the_memory_limit(dataset: dict[str, Any]) -> None:
    """Dask counts a worker's RSS against its memory_limit (the nanny restarts it at 95%), and
    the image pages it maps are in its RSS. By default they are not counted (the node holds them
    once): a worker with the whole image mapped, more than its limit with its own memory,
    keeps running. With unshared_memory=False, deliver warns and does not populate."""
    limit = 256 * 1024 * 1024        # a worker's own memory is 70-80 MB: under 60 % of it
    img = mkfs(os.path.join(dataset["root"], "big.ext2"), "256M", bs=4096,
               src=os.path.join(dataset["src"], "arrays"))
    size = os.path.getsize(img)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit=limit) as cluster, Client(cluster) as small:
        name = f"xipfs-test-limit-{uuid.uuid4().hex[:8]}"
        pid = list(small.run(os.getpid).values())
        try:
            xd.deliver(small, img, name, populate=True)
            mem = small.run(lambda: (xd.process_memory()["rss"], xd.unshared_rss()))
            (rss, unshared), = mem.values()
            # over the limit as Dask saw it; its own memory under the spill target (60 %)
            assert rss > limit > unshared / 0.6, mem
            time.sleep(1.0)                         # ten rounds of the nanny's memory monitor
            assert list(small.run(os.getpid).values()) == pid     # the same worker, alive
            status = small.run(lambda dask_worker: dask_worker.status.name)
            assert list(status.values()) == ["running"]            # not paused either
        finally:
            xd.release(small, name)
        name = f"xipfs-test-limit-{uuid.uuid4().hex[:8]}"
        try:
            with pytest.warns(RuntimeWarning, match="memory_limit"):
                xd.deliver(small, img, name, populate=True, unshared_memory=False)
            mem = xd.worker_memory(small, name)
            assert all(m["rss"] < 0.5 * size for m in mem.values()), mem
            cluster.scale(2)                            # a worker joining later attaches too
            small.wait_for_workers(2, timeout=60)
            inodes = small.run(lambda: (os.stat(xd.image_path(name)).st_ino,
                                        xd.image(name).stat("/x.f8").st_size))
            assert len(inodes) == 2 and len(set(inodes.values())) == 1
            assert list(inodes.values())[0][1] == ROWS * COLS * 8
        finally:
            xd.release(small, name)
