"""Remote benchmark (issue 17): a 1 GiB ext4 image served by nginx on loopback, read lazily.

One image (``mke2fs -t ext4 -d`` of a tree with a 256 MiB file of random data, a 600 MiB
sparse file and a directory of small files) is served by nginx on a free loopback port
(``tests/nginx_util.py``), which logs the bytes it sends.

(a) bytes moved: ``xipfs.open(url)``, list ``/`` and ``/data``, read a 4 KiB file; counted at
    the server (``$body_bytes_sent``). Target: under 1 MiB.
(b) reading the 256 MiB file sequentially through ``xipfs.open(url)`` (a fresh device each
    sample, so nothing is cached; 8 MiB reads) against ``curl -r A-B -o /dev/null`` fetching
    the same byte range of the image (the file's first to last byte), interleaved. Target >= 0.8x.
    Also 1 MiB reads (through the page cache's readahead), for information.
(d) ``xipfs fetch URL /dev/shm/...`` against ``curl -o /dev/shm/...`` for the whole image, for
    information (ours writes a temporary name, renames, checks the size).

Standalone: ``.venv/bin/python benchmarks/bench_remote.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from bench_read import Config
from common import GIB, MIB, Case, Row, Section, measure

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

BIG = 256 * MIB
SPARSE = 600 * MIB


def _make_image(root: str) -> tuple[str, bytes]:
    """The served directory with ``big.ext4``; the 4 KiB file's content."""
    tree = os.path.join(root, "remote-tree")
    os.makedirs(os.path.join(tree, "data", "small"))
    small = os.urandom(4096)
    with open(os.path.join(tree, "data", "small", "four.bin"), "wb") as f:
        f.write(small)
    for i in range(20):
        with open(os.path.join(tree, "data", f"f{i:02d}.txt"), "w") as f:
            f.write(f"file {i}\n" * 50)
    block = os.urandom(16 * MIB)
    with open(os.path.join(tree, "big.bin"), "wb") as f:
        for _ in range(BIG // len(block)):
            f.write(block)
    with open(os.path.join(tree, "sparse.bin"), "wb") as f:
        f.truncate(SPARSE)
    srv = os.path.join(root, "remote-srv")
    os.makedirs(srv)
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", tree, os.path.join(srv, "big.ext4"), "1G"],
                   check=True, capture_output=True)
    shutil.rmtree(tree)
    return srv, small


def _file_span(image: str, path: str) -> tuple[int, int]:
    """``(first, last)`` byte of the image holding ``path``'s data (its extents' span)."""
    import xipfs
    from xipfs.extfs.data import segments
    from xipfs.fs import resolve

    with xipfs.open(image) as fs:
        node = resolve(fs.volume, path, True)
        segs = [s for s in segments(fs.volume, node, 0, node.size) if s[2] >= 0]
    return segs[0][2], max(where + length for _, length, where in segs) - 1


def bench_remote(root: str, cfg: Config) -> Section:
    from nginx_util import nginx_binary, start_nginx

    import xipfs

    section = Section("remote: a 1 GiB ext4 image over loopback HTTP (nginx), read lazily; "
                      "against curl")
    if nginx_binary() is None or shutil.which("curl") is None:
        section.notes.append("SKIPPED: needs nginx and curl")
        return section
    srv, small = _make_image(root)
    image = os.path.join(srv, "big.ext4")
    first, last = _file_span(image, "/big.bin")
    server = start_nginx(srv, os.path.join(root, "remote-nginx"))
    url = server.url("big.ext4")
    try:
        # (a) bytes moved for a listing and one small file
        server.mark()
        with xipfs.open(url) as fs:
            names = (sorted(fs.listdir("/")), len(fs.listdir("/data")))
            ok = fs.read_bytes("/data/small/four.bin") == small
        moved, requests = server.body_bytes(), server.requests()
        verdict = "PASS" if moved < MIB and ok else "FAIL"
        section.notes.append(
            f"(a) open + ls / + ls /data + read a 4 KiB file of the 1 GiB image moved {moved} bytes "
            f"of bodies ({server.bytes_sent()} with headers) in {requests} requests: target < 1 MiB: "
            f"{verdict} ({names[0]}, {names[1]} entries in /data)")

        # (b) sequential read of the 256 MiB file, against curl for the same range
        def read_with(bufsize: int) -> Callable[[Any], None]:
            buf = bytearray(bufsize)

            def run(state: Any) -> None:
                f = state[1]
                while f.readinto(buf):
                    pass
            return run

        def open_fresh() -> Any:
            fs = xipfs.open(url)
            return fs, fs.open("/big.bin", "rb", buffering=0)

        def close(state: Any) -> None:
            state[1].close()
            state[0].close()

        def curl_range(_: Any) -> None:
            subprocess.run(["curl", "-s", "-f", "-r", f"{first}-{last}", "-o", "/dev/null", url], check=True)

        span = last - first + 1
        cases = [
            Case("xipfs 8 MiB reads", read_with(8 * MIB), BIG, "MiB/s", setup=open_fresh, teardown=close),
            Case("xipfs 1 MiB reads", read_with(MIB), BIG, "MiB/s", setup=open_fresh, teardown=close),
            Case("curl -r (same range)", curl_range, BIG, "MiB/s"),
        ]
        m = measure(cases, cfg.repeat_big, warmup=1)
        section.rows.append(Row("read a 256 MiB file sequentially, 8 MiB reads (vs curl -r, same range)",
                                m["xipfs 8 MiB reads"], m["curl -r (same range)"], target=0.8))
        section.rows.append(Row("read a 256 MiB file sequentially, 1 MiB reads (vs curl -r, same range)",
                                m["xipfs 1 MiB reads"], m["curl -r (same range)"]))
        section.raw += list(m.values())
        section.notes.append(
            f"(b) the file's extents span {span} bytes of the image ({span - BIG} more than the file); "
            "curl fetches that span into /dev/null (its process start included); ours opens a fresh "
            "device per sample (untimed) and reads with readinto: 8 MiB reads go from the socket "
            "straight into the buffer (pages not cached skip the cache), 1 MiB reads go through "
            "the page cache and its readahead (64 KiB doubling to 8 MiB); on both paths a "
            "sequential run's request asks for as much again as the run has read (up to 64 MiB) "
            "and streams it into the next reads, so requests double as curl makes one.")

        # (c) fetch the whole image into /dev/shm, against curl -o
        dest_ours = os.path.join(root, "fetched-ours.img")
        dest_curl = os.path.join(root, "fetched-curl.img")

        def fetch_ours(_: Any) -> None:
            xipfs.fetch(url, dest_ours, progress=False, resume=False)

        def curl_whole(_: Any) -> None:
            subprocess.run(["curl", "-s", "-f", "-o", dest_curl, url], check=True)

        def remove(path: str) -> Callable[[Any], None]:
            return lambda _: os.path.exists(path) and os.unlink(path)

        cases = [Case("xipfs fetch", fetch_ours, GIB, "MiB/s", teardown=remove(dest_ours)),
                 Case("curl -o", curl_whole, GIB, "MiB/s", teardown=remove(dest_curl))]
        m = measure(cases, max(3, cfg.repeat_big // 2), warmup=1)
        section.rows.append(Row("fetch the 1 GiB image into /dev/shm (vs curl -o)", m["xipfs fetch"],
                                m["curl -o"]))
        section.raw += list(m.values())
        section.notes.append("(c) both write to /dev/shm; the image is sparse on the server's side "
                             "(its holes are sent as zeros). Loopback: provisional numbers on a "
                             "shared 2-core machine.")
    finally:
        server.stop()
        shutil.rmtree(srv, ignore_errors=True)
    return section


BENCHMARKS: dict[str, Callable[[str, Config], Section]] = {"remote": bench_remote}


def _standalone(argv: list[str]) -> int:
    """Run this benchmark alone (before run.py registers it): the same header-less table."""
    import argparse
    import tempfile

    from bench_read import config
    from common import print_section

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=None)
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="xipfs-bench-remote-", dir="/dev/shm")
    try:
        print_section(bench_remote(root, config(args.quick, args.repeat)), raw=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    import run

    if "remote" in run.BENCHMARKS:
        sys.exit(run.main(["--only", "remote", *sys.argv[1:]]))
    sys.exit(_standalone(sys.argv[1:]))
