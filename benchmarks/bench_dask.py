"""Dask benchmark: 4 workers reading a dataset of many files from one image shared by the node.

A dataset of many files (4,096 of 256 KiB, 1 GiB; ``--quick``: 512, 128 MiB) is written to a
tmpfs directory and packed by ``mke2fs -d`` into an image beside it; nginx serves both on
loopback. A LocalCluster of 4 worker processes (one thread each) gets the image with
:func:`xipfs.dask.deliver` from nginx (through :func:`xipfs.fetch`; from the local path
where that is missing): the first worker fetches it into shared memory, the others attach.

Timed, interleaved, the same dask.bag pass over every file (``cat_file`` of each, the sum of
the lengths) through three doors:

* ours: ``ext2://`` on the delivered image (``fsspec.filesystem("ext2", fo="/NAME")``, XIP),
  delivered with ``populate=True`` (each worker maps the whole image as it attaches);
* tmpfs: ``fsspec.filesystem("file")`` on the directory the image was packed from;
* HTTP: ``fsspec.filesystem("http")`` fetching each file from nginx, as a cluster without a
  shared image would.

Memory, from ``/proc/PID/smaps`` of each worker: the PSS of the image's mappings, summed over
the workers (PSS splits a shared page between the processes mapping it, so the sum is what the
node holds), after the timed passes and after every worker has read every file. The network:
bytes nginx served to deliver the image (once for the node) and per HTTP pass.

Standalone: ``.venv/bin/python benchmarks/bench_dask.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

from bench_read import BLOCK_SIZE, Config, make_image
from common import GIB, MIB, Case, Row, Section, measure

TESTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
WORKERS = 4
FILE_SIZE = 256 * 1024
#: Targets of issue 17 (4 workers on one node).
TARGET_SPEED = 1.0          # ext2:// at least as fast as the tmpfs directory
TARGET_COPIES = 1.25        # summed PSS of what they read, in copies


def _dataset(root: str, nfiles: int) -> tuple[str, list[str]]:
    """``nfiles`` files of FILE_SIZE (distinct slices of a random pool) under ``root/src/dNN``."""
    src = os.path.join(root, "dask-src")
    pool = os.urandom(16 * MIB + FILE_SIZE)
    names = []
    for i in range(nfiles):
        rel = f"d{i // 256:02d}/f{i:05d}"
        path = os.path.join(src, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        start = (i * 7919 * 4096) % (16 * MIB)
        with open(path, "wb") as f:
            f.write(pool[start:start + FILE_SIZE])
        names.append(rel)
    return src, names


@contextlib.contextmanager
def _nginx(root: str) -> Iterator[Any]:
    """nginx serving ``root`` (tests/nginx_util.py), or None where it cannot run."""
    sys.path.insert(0, TESTS)
    try:
        import nginx_util
    except ImportError:
        yield None
        return
    finally:
        sys.path.remove(TESTS)
    try:
        server = nginx_util.start_nginx(root, os.path.join(root, "nginx-work"))
    except BaseException as exc:           # pytest.skip outside pytest: no nginx here
        if type(exc).__name__ != "Skipped":
            raise
        yield None
        return
    try:
        yield server
    finally:
        server.stop()


def _pass(client: Any, paths: list[str], read: Callable[[list[str]], int], parts: int) -> int:
    """One dask.bag pass: every file read once by one of the workers; the bytes read."""
    import dask.bag as db

    bag = db.from_sequence(paths, npartitions=parts)
    return client.compute(bag.map_partitions(lambda ps: [read(list(ps))]).sum(), sync=True)


def _readers(name: str, src: str, base_url: str | None) -> dict[str, Callable[[list[str]], int]]:
    """A function per door reading a batch of files on a worker (pickled by value)."""
    def ext2(paths: list[str], fo: str = "/" + name) -> int:
        import fsspec
        fs = fsspec.filesystem("ext2", fo=fo)
        return sum(len(fs.cat_file(p)) for p in paths)

    def tmpfs(paths: list[str], src: str = src) -> int:
        import fsspec
        fs = fsspec.filesystem("file")
        return sum(len(fs.cat_file(f"{src}/{p}")) for p in paths)

    def http(paths: list[str], base: str | None = base_url) -> int:
        import fsspec
        fs = fsspec.filesystem("http")
        return sum(len(fs.cat_file(f"{base}/{p}")) for p in paths)

    def ext2_into(paths: list[str], fo: str = "/" + name) -> int:
        import fsspec
        fs = fsspec.filesystem("ext2", fo=fo)
        buf = bytearray(FILE_SIZE)
        total = 0
        for p in paths:
            with fs.open(p, "rb") as f:
                total += f.readinto(buf)
        return total

    def tmpfs_into(paths: list[str], src: str = src) -> int:
        import fsspec
        fs = fsspec.filesystem("file")
        buf = bytearray(FILE_SIZE)
        total = 0
        for p in paths:
            with fs.open(f"{src}/{p}", "rb") as f:
                total += f.readinto(buf)
        return total

    out = {"ext2": ext2, "tmpfs": tmpfs, "ext2 readinto": ext2_into, "tmpfs readinto": tmpfs_into}
    if base_url is not None:
        out["http"] = http
    return out


def _copies(client: Any, name: str, read_bytes: int) -> tuple[float, float, dict[str, Any]]:
    """Summed PSS and RSS of the image's mappings over the workers, in copies of ``read_bytes``."""
    import xipfs.dask as xd

    mem = xd.worker_memory(client, name)
    pss = sum(m["pss"] for m in mem.values())
    rss = sum(m["rss"] for m in mem.values())
    return pss / read_bytes, rss / read_bytes, mem


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def bench_dask(root: str, cfg: Config) -> Section:
    from distributed import Client, LocalCluster

    import xipfs.dask as xd

    quick = cfg.big_bytes < GIB
    nfiles = 512 if quick else 4096
    repeat = cfg.repeat_big              # 5 quick, 7 full (1 GiB passes: about 2 s each)
    total = nfiles * FILE_SIZE
    src, names = _dataset(root, nfiles)
    img = os.path.join(root, "dask.ext2")
    make_image(src, img, nfiles + nfiles // 256 + 1, nfiles * (FILE_SIZE // BLOCK_SIZE))
    size = os.path.getsize(img)
    section = Section(f"Dask: {WORKERS} workers read {nfiles} files of {FILE_SIZE // 1024} KiB "
                      f"({total // MIB} MiB) from one shared image, a tmpfs directory, or HTTP per file")
    name = f"xipfs-bench-{uuid.uuid4().hex[:8]}"
    with _nginx(root) as server, \
            LocalCluster(n_workers=WORKERS, threads_per_worker=1, processes=True,
                         dashboard_address=":0", memory_limit=0) as cluster, Client(cluster) as client:
        source = img
        try:
            import xipfs.tools.fetch  # noqa: F401
            if server is not None:
                source = server.url(os.path.basename(img))
        except ImportError:
            section.notes.append("xipfs.fetch is missing: the image was delivered from its local path.")
        if server is not None:
            server.mark()
        t0 = time.perf_counter()
        xd.deliver(client, source, name, populate=True)
        delivered_in = time.perf_counter() - t0
        section.notes.append(f"Delivered with populate=True (each worker maps every page of the image "
                             f"as it attaches, no page fault in the passes): {delivered_in:.2f} s for "
                             f"fetch, check and attach of {WORKERS} workers.")
        if server is not None and source != img:
            served = server.body_bytes()
            section.notes.append(
                f"Network: delivering the {size / MIB:.0f} MiB image to the {WORKERS} workers moved "
                f"{served / MIB:.1f} MiB from nginx ({served / size:.2f}x the image; target: once per "
                f"node) in {delivered_in:.2f} s: {_verdict(served < 1.05 * size)}.")
        try:
            paths = list(names)
            base_url = server.url(os.path.basename(src)) if server is not None else None
            readers = _readers(name, src, base_url)
            parts = 8 * WORKERS
            for door, read in readers.items():                 # correctness, untimed
                got = _pass(client, paths, read, parts)
                if got != total:
                    raise AssertionError(f"{door}: read {got} bytes, not {total}")
            cases = [Case(door, (lambda _, read=read: _pass(client, paths, read, parts)), total, "GiB/s")
                     for door, read in readers.items()]
            if server is not None:
                server.mark()
            m = measure(cases, repeat, warmup=1)
            section.raw += list(m.values())
            section.rows.append(Row("dask.bag cat_file of every file: ext2:// on the shared image vs "
                                    "the tmpfs directory", m["ext2"], m["tmpfs"], TARGET_SPEED))
            section.rows.append(Row("the same with open().readinto(a reused buffer): ext2:// vs the "
                                    "tmpfs directory", m["ext2 readinto"], m["tmpfs readinto"]))
            if "http" in m:
                section.rows.append(Row("the same: ext2:// vs HTTP per file (nginx, fsspec http)",
                                        m["ext2"], m["http"]))
                per_pass = server.body_bytes() / (repeat + 1)         # the warm-up pass too
                section.notes.append(
                    "cat_file allocates a 256 KiB bytes per file on both sides; Dask starts workers "
                    "with MALLOC_TRIM_THRESHOLD_=65536, so each is a fresh mmap: the tmpfs side's "
                    "read() faults its pages in one by one in the kernel's copy, ours asks for the "
                    "zero-filled bytes and makes its pages present with one madvise("
                    "MADV_POPULATE_WRITE) before the copy (xipfs._fresh). The readinto row reads "
                    "into one reused buffer instead.")
                section.notes.append(f"Network: an HTTP pass moves the dataset again each time "
                                     f"({per_pass / MIB:.0f} MiB per pass).")
            pss, rss, _ = _copies(client, name, total)
            section.notes.append(
                f"Memory after the timed passes (each file read by one worker per pass, by whichever "
                f"the scheduler chose): summed PSS of the image's mappings over the {WORKERS} workers "
                f"{pss * total / MIB:.0f} MiB = {pss:.2f} copies of the {total // MIB} MiB read (summed "
                f"RSS {rss:.2f} copies); target <= {TARGET_COPIES} copies: {_verdict(pss <= TARGET_COPIES)}.")

            def read_all(name: str = name, paths: list[str] = paths) -> int:
                fs = xd.image(name)
                return sum(len(fs.read_bytes("/" + p)) for p in paths)

            t0 = time.perf_counter()
            got = client.run(read_all)
            took = time.perf_counter() - t0
            if set(got.values()) != {total}:
                raise AssertionError(f"read_all: {got}")
            pss, rss, _ = _copies(client, name, total)
            section.notes.append(
                f"Memory when every worker has read every file ({WORKERS} x {total // MIB} MiB in "
                f"{took:.2f} s): summed PSS {pss:.2f} copies, summed RSS {rss:.2f} copies (each worker "
                f"maps all of it; the node holds it once); target <= {TARGET_COPIES} copies: "
                f"{_verdict(pss <= TARGET_COPIES)}.")
        finally:
            xd.release(client, name)
    section.notes.append(
        f"4 worker processes on {os.cpu_count()} CPUs; {parts} bag partitions per pass. Timings are "
        "provisional where other work loads the machine: the ratio of medians is what to read.")
    return section


BENCHMARKS: dict[str, Callable[[str, Config], Section]] = {"dask": bench_dask}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    import run

    run.BENCHMARKS.setdefault("dask", bench_dask)     # until run.py registers it
    sys.exit(run.main(["--only", "dask", *sys.argv[1:]]))
