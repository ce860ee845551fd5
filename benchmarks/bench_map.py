"""Mapping benchmarks: ``fs.mmap`` / ``fs.map_array``, the storage itself mapped into the process.

9. **map**: the time to make and drop a mapping (``m = fs.mmap(p); m.close()``) of the big file
   (``cfg.big_bytes``, written by xipfs in 1 MiB pieces, so it comes out in a few runs of
   contiguous blocks) and of a 1 MiB file, against ``mmap.mmap`` of a same-sized plain file on the
   same tmpfs; and the copy-backed mapping of the big file (the fallback: forced on the XIP
   filesystem with ``set_map_budget(max_maps=0)``, and on the file device) against the kernel
   reading the file into fresh private memory.
10. **mapruns**: the cost of each run. 16 MiB files in 1, 16, 256 and 4,096 runs (interleaved
    appends to two files), mapped stitched (``set_map_budget(max_maps=100000, min_run_bytes=0)``)
    and as a copy (``max_maps=0``); a straight line through the medians gives the cost per run of
    each way and the run length at which stitching a run costs as much as copying it: the value
    for ``min_run_bytes``. Also with a first touch of every page (a stitched mapping pays its page
    faults then; a copy has paid them while copying).
11. **mapsum**: ``np.add.reduce`` over the big file as ``uint64`` (memory-bound) through
    ``fs.map_array``, warm (touched before), against the same sum over an array already in memory;
    the same over the copy-backed mappings; and the first touch (page faults) of a fresh mapping
    against a fresh kernel ``mmap`` of the plain file.

Standalone: ``.venv/bin/python benchmarks/bench_map.py [--quick] [--only map,mapruns,mapsum]``.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from bench_read import Config
from common import MIB, Case, Measurement, Row, Section, measure, time_sample

import xipfs

BLOCK_SIZE = 4096
PAGE = mmap.PAGESIZE
PATTERN = 16 * MIB            # the big file is one random 16 MiB block, tiled (as in bench_read)
PIECE = MIB                   # xipfs writes the big file in pieces of this size
SMALL = MIB                   # the small mapped file
MAP_TARGET_NS = 1_000_000     # target: a mapping of the big file in under 1 ms
SAME_ORDER = 0.1              # "the same order": the 1 MiB mapping at least a tenth of the big one's time
FRAG_BYTES = 16 * MIB         # the fragmented files of section 10
FRAG_RUNS = (1, 16, 256, 4096)
SAMPLE_NS = 3_000_000         # fast cases repeat their call to fill about this much per sample


def _size(n: int) -> str:
    return f"{n >> 30} GiB" if n >= 1 << 30 and n % (1 << 30) == 0 else f"{n >> 20} MiB"


def _budget_keeper() -> tuple[Callable[[], None], Callable[[], None], Callable[[Any], None]]:
    """``(stitch, copy, restore)``: force every mapping to be stitched / copied; put back the budget."""
    saved = xipfs.map_budget()

    def stitch() -> None:
        xipfs.set_map_budget(max_maps=100_000, min_run_bytes=0)

    def copy() -> None:
        xipfs.set_map_budget(max_maps=0)

    def restore(_: Any = None) -> None:
        xipfs.set_map_budget(max_maps=saved["max_maps"], min_run_bytes=saved["min_run_bytes"])

    return stitch, copy, restore


def _target(ns: int, label: str) -> Measurement:
    """An absolute target shown as a baseline: ratio = target time / ours, so >= 1 means within it."""
    return Measurement(label, [ns], 1, "us/call")


def _numbered(cases: Sequence[Case], target_ns: int = SAMPLE_NS) -> list[Case]:
    """Give each case a call count that fills about ``target_ns`` per sample (one probe sample each)."""
    for case in cases:
        time_sample(case)                                # warm (first-touch effects out of the probe)
        once = max(1, time_sample(case))
        case.number = max(1, min(2000, target_ns // once))
    return list(cases)


def _close_quietly(m: Any) -> None:
    with contextlib.suppress(BufferError, ValueError, OSError):
        m.close()


def _verify(buf: Any, size: int, pattern: np.ndarray, what: str) -> None:
    """``buf`` (a mapping or array of ``size`` bytes) holds ``pattern`` tiled; raise otherwise."""
    data = np.frombuffer(buf, dtype=np.uint8, count=size)
    if data.size != size:
        raise AssertionError(f"{what}: {data.size} bytes, expected {size}")
    plen = len(pattern)
    for o in range(0, size, plen):
        n = min(plen, size - o)
        if not np.array_equal(data[o:o + n], pattern[:n]):
            raise AssertionError(f"{what}: wrong data in [{o}, {o + n})")


def _make_big(root: str, size: int, pattern: np.ndarray, small: bool) -> tuple[str, str, str]:
    """An image holding ``/big`` (``size`` bytes written by xipfs in 1 MiB pieces) and ``/small``
    (1 MiB), and plain tmpfs files with the same bytes; ``(image, plain big, plain small)``."""
    img = os.path.join(root, "map.ext2")
    plain_big = os.path.join(root, "map-big.bin")
    plain_small = os.path.join(root, "map-small.bin")
    xipfs.mkfs(img, size + size // 5 + 16 * MIB)
    with xipfs.open(img, "r+") as fs:
        with fs.open("/big", "wb", buffering=0) as f:
            for o in range(0, size, PIECE):
                p = o % PATTERN
                f.write(pattern[p:p + PIECE])
        if small:
            fs.write_bytes("/small", pattern[:SMALL])
    with open(plain_big, "wb", buffering=0) as f:
        for o in range(0, size, PATTERN):
            f.write(pattern[:min(PATTERN, size - o)])
    if small:
        with open(plain_small, "wb", buffering=0) as f:
            f.write(pattern[:SMALL])
    return img, plain_big, plain_small


def _unlink(*paths: str) -> None:
    for p in paths:
        if os.path.exists(p):
            os.unlink(p)


# -- 9. mapping time --------------------------------------------------------------------------
def bench_map(root: str, cfg: Config) -> Section:
    size = cfg.big_bytes
    pattern = np.frombuffer(os.urandom(PATTERN), dtype=np.uint8)
    img, plain_big, plain_small = _make_big(root, size, pattern, small=True)
    section = Section(f"9. Mapping time: fs.mmap(p) + close of a {_size(size)} file and a "
                      f"{_size(SMALL)} file; the copy fallback")
    stitch, copy, restore = _budget_keeper()
    fsx = xipfs.open(img)
    fsf = xipfs.open(img, xip=False)
    fd_big = os.open(plain_big, os.O_RDONLY)
    fd_small = os.open(plain_small, os.O_RDONLY)
    try:
        if not fsx.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP ({fsx!r}): 'ours' is not XIP here.")
        runs_big = len(fsx.block_runs("/big"))
        runs_small = len(fsx.block_runs("/small"))
        if runs_big > 16:
            section.notes.append(f"WARNING: /big is {runs_big} runs (expected at most 16).")

        # Correctness first (untimed): each kind of mapping holds the file's bytes.
        for what, fs, force in (("XIP", fsx, None), ("forced copy", fsx, copy), ("file device", fsf, None)):
            if force is not None:
                force()
            try:
                m = fs.mmap("/big")
            finally:
                restore()
            try:
                if m.is_xip != (what == "XIP"):
                    raise AssertionError(f"{what} mapping of /big: is_xip is {m.is_xip} ({m!r})")
                _verify(m, size, pattern, f"{what} mapping of /big")
            finally:
                m.close()
        with fsx.mmap("/small") as m:
            if not m.is_xip:
                raise AssertionError(f"XIP mapping of /small is a copy ({m!r})")
            _verify(m, SMALL, pattern, "XIP mapping of /small")

        def ours(fs: Any, p: str) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                fs.mmap(p).close()
            return run

        def kernel(fd: int, n: int) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                mmap.mmap(fd, n, prot=mmap.PROT_READ).close()
            return run

        big, small = _size(size), _size(SMALL)
        fast = _numbered([
            Case(f"xip fs.mmap + close, {big}", ours(fsx, "/big"), 1, "us/call"),
            Case(f"kernel mmap.mmap + close, {big} (tmpfs)", kernel(fd_big, size), 1, "us/call"),
            Case(f"xip fs.mmap + close, {small}", ours(fsx, "/small"), 1, "us/call"),
            Case(f"kernel mmap.mmap + close, {small} (tmpfs)", kernel(fd_small, SMALL), 1, "us/call"),
            Case(f"fs.block_runs (block-map walk), {big}", lambda _: fsx.block_runs("/big"), 1, "us/call"),
        ])
        m = measure(fast, cfg.repeat, warmup=1)

        def copy_close(_: Any) -> None:
            c = fsx.mmap("/big")
            if c.is_xip:
                raise AssertionError("the forced copy came out XIP")
            c.close()

        def kernel_anon(_: Any) -> None:
            buf = mmap.mmap(-1, size)
            with open(plain_big, "rb", buffering=0) as f:
                if f.readinto(buf) != size:
                    raise AssertionError("short readinto")
            buf.close()

        slow = [
            Case(f"copy: fs.mmap + close, {big}, forced on XIP", copy_close, 1, "ms/call", copy, restore),
            Case(f"copy: fs.mmap + close, {big}, file device", ours(fsf, "/big"), 1, "ms/call"),
            Case("kernel: anonymous mmap + readinto + close (tmpfs)", kernel_anon, 1, "ms/call"),
        ]
        c = measure(slow, max(3, cfg.repeat_big // 2), warmup=1)
    finally:
        restore()
        os.close(fd_big)
        os.close(fd_small)
        fsx.close()
        fsf.close()
        _unlink(img, plain_big, plain_small)

    xbig, xsmall = m[f"xip fs.mmap + close, {big}"], m[f"xip fs.mmap + close, {small}"]
    walk = m[f"fs.block_runs (block-map walk), {big}"]
    anon = c["kernel: anonymous mmap + readinto + close (tmpfs)"]
    forced = c[f"copy: fs.mmap + close, {big}, forced on XIP"]
    fdev = c[f"copy: fs.mmap + close, {big}, file device"]
    budget = _target(MAP_TARGET_NS, "target: 1 ms")
    section.rows += [
        Row(f"fs.mmap(p) + close, {big} file in {runs_big} runs (XIP), against 1 ms", xbig, budget, 1.0),
        Row(f"fs.mmap(p) + close, {big} file (XIP) vs the kernel", xbig,
            m[f"kernel mmap.mmap + close, {big} (tmpfs)"]),
        Row(f"fs.mmap(p) + close, {small} file in {runs_small} run(s) (XIP), against 1 ms", xsmall, budget,
            1.0),
        Row(f"fs.mmap(p) + close, {small} file (XIP) vs the kernel", xsmall,
            m[f"kernel mmap.mmap + close, {small} (tmpfs)"]),
        Row(f"fs.mmap(p) + close: {big} ({runs_big} runs) against {small} ({runs_small} run): the same "
            f"order (within {1 / SAME_ORDER:.0f}x)", xbig, xsmall, SAME_ORDER),
        Row(f"[copy] fs.mmap(p) + close, {big}, forced copy on XIP (set_map_budget(max_maps=0))", forced,
            anon),
        Row(f"[copy] fs.mmap(p) + close, {big}, file device (xip=False)", fdev, anon),
    ]
    section.raw += list(m.values()) + list(c.values())
    section.notes += [
        f"/big is {runs_big} runs of contiguous blocks, /small {runs_small}. The kernel rows map a plain "
        f"file of the same size on the same tmpfs (descriptor opened beforehand). Nothing is touched: "
        f"this is the cost of making and dropping the mapping.",
        f"Of the {big} mapping's {xbig.median}, the ext2 block-map walk (fs.block_runs: every block "
        f"pointer of the file is read) takes {walk.median} ({walk.median_ns / xbig.median_ns:.0%}): "
        f"the part that grows with the file's size, not its runs.",
        f"Copy fallback: {forced.median} for {big} (forced, XIP), {fdev.median} (file device), "
        f"{forced.median_ns / xbig.median_ns:.0f}x and {fdev.median_ns / xbig.median_ns:.0f}x the XIP "
        f"mapping. The baseline does the same work: the file copied into fresh private memory "
        f"(4 KiB pages, each taking a page fault).",
    ]
    return section


# -- 10. cost per run, stitching against copying -----------------------------------------------
def _fragmented(img: str, data: bytes, runs: Sequence[int]) -> None:
    """``/rN``: ``data`` in ``N`` runs, by interleaving its pieces with 1-block appends to ``/padN``
    (kept, so later files cannot fill the gaps)."""
    xipfs.mkfs(img, 120 * MIB)   # one block group: no run is cut at a group boundary
    with xipfs.open(img, "r+") as fs:
        for n in runs:
            piece = len(data) // n
            with fs.open(f"/r{n}", "wb", buffering=0) as fa, fs.open(f"/pad{n}", "wb", buffering=0) as fb:
                for i in range(n):
                    fa.write(data[i * piece:(i + 1) * piece])
                    if n > 1:
                        fb.write(data[:BLOCK_SIZE])


def _line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``(slope, intercept)`` of ``ys`` against ``xs``."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


def _kib(n: float) -> str:
    return f"{n / MIB:g} MiB" if n >= MIB else f"{n / 1024:.3g} KiB"


def bench_map_runs(root: str, cfg: Config) -> Section:
    img = os.path.join(root, "runs.ext2")
    data = os.urandom(FRAG_BYTES)
    _fragmented(img, data, FRAG_RUNS)
    counts = ", ".join(map(str, FRAG_RUNS))
    section = Section(f"10. Mapping cost per run: {_size(FRAG_BYTES)} files in {counts} runs, stitched "
                      "against copied")
    stitch, copy, restore = _budget_keeper()
    fs = xipfs.open(img)
    try:
        if not fs.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP ({fs!r}).")
        runs = {n: len(fs.block_runs(f"/r{n}")) for n in FRAG_RUNS}
        if any(runs[n] != n for n in FRAG_RUNS):
            section.notes.append(f"NOTE: the files came out in {sorted(runs.values())} runs (asked for "
                                 f"{list(FRAG_RUNS)}); the labels and the fit use the real counts.")
        for n in FRAG_RUNS:   # correctness (untimed): the file, and both kinds of mapping of it
            p = f"/r{n}"
            if fs.read_bytes(p) != data:
                raise AssertionError(f"{p}: wrong content")
            for force, xip in ((stitch, True), (copy, False)):
                force()
                try:
                    m = fs.mmap(p)
                finally:
                    restore()
                try:
                    if m.is_xip != xip or (xip and m.runs != runs[n]):
                        raise AssertionError(f"{p}: expected {'XIP' if xip else 'a copy'}, got {m!r}")
                    if m[:] != data:
                        raise AssertionError(f"{p}: wrong content through {m!r}")
                finally:
                    m.close()

        def map_close(p: str) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                fs.mmap(p).close()
            return run

        def map_touch_close(p: str) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                m = fs.mmap(p)
                a = np.frombuffer(m, dtype=np.uint8)
                np.add.reduce(a[::PAGE])          # one byte of every page: the first-touch faults
                del a
                m.close()
            return run

        cases = []
        for n in FRAG_RUNS:
            p = f"/r{n}"
            cases += [
                Case(f"stitched {n}", map_close(p), 1, "us/call", stitch, restore),
                Case(f"copied {n}", map_close(p), 1, "us/call", copy, restore),
                Case(f"stitched + touch {n}", map_touch_close(p), 1, "us/call", stitch, restore),
                Case(f"copied + touch {n}", map_touch_close(p), 1, "us/call", copy, restore),
            ]
        m = measure(_numbered(cases), cfg.repeat, warmup=1)
    finally:
        restore()
        fs.close()
        _unlink(img)

    xs = [runs[n] for n in FRAG_RUNS]
    found = []
    for touch in ("", " + touch"):
        st = [m[f"stitched{touch} {n}"].median_ns for n in FRAG_RUNS]
        cp = [m[f"copied{touch} {n}"].median_ns for n in FRAG_RUNS]
        b_s = _line(xs, st)[0]
        b_c = _line(xs, cp)[0]
        per_byte = (cp[0] - b_c * xs[0]) / FRAG_BYTES    # the one-run copy, less its run cost
        cross = (b_s - b_c) / per_byte
        found.append((b_s, b_c, per_byte, cross))
        for n, x in zip(FRAG_RUNS, xs, strict=True):
            what = "map + touch every page + close" if touch else "map + close"
            section.rows.append(Row(
                f"{what}, {_size(FRAG_BYTES)} in {x} run{'s' if x > 1 else ''} of {_kib(FRAG_BYTES / x)}: "
                "stitched vs copied",
                m[f"stitched{touch} {n}"], m[f"copied{touch} {n}"]))
    (b_s, b_c, per_byte, cross), (tb_s, tb_c, tper_byte, tcross) = found
    section.raw += list(m.values())
    section.notes += [
        "Ratio > 1: stitching is cheaper than copying for that file. Stitched: "
        "set_map_budget(max_maps=100000, min_run_bytes=0); copied: set_map_budget(max_maps=0). "
        "'touch' reads one byte of every page before the close (a stitched mapping takes its page "
        "faults there; a copy took them while copying, in the mapping time).",
        f"Fit (least squares over the medians against the run count), map + close: stitching costs "
        f"{b_s / 1e3:.2f} us per run (the one-run file: {m['stitched 1'].median}); copying costs "
        f"{per_byte:.3f} ns per byte ({per_byte * PAGE / 1e3:.2f} us per 4 KiB page) + "
        f"{b_c / 1e3:.2f} us per run.",
        f"CROSSOVER (map + close): stitching a run costs as much as copying it at "
        f"{_kib(cross)} ({cross:.0f} bytes) = (stitch per run - copy per run) / copy per byte "
        f"(min_run_bytes is {_kib(xipfs.map_budget()['min_run_bytes'])} now).",
        f"With a first touch of every page: stitching {tb_s / 1e3:.2f} us per run, copying "
        f"{tper_byte:.3f} ns per byte + {tb_c / 1e3:.2f} us per run: crossover {_kib(tcross)} "
        f"({tcross:.0f} bytes).",
    ]
    return section


# -- 11. numpy sum over a mapping --------------------------------------------------------------
def _huge_tmpfs_sum(root: str, size: int, pattern: np.ndarray, expected: int, cfg: Config) -> Row | str:
    """The XIP sum with the image on a tmpfs mounted ``huge=always`` (2 MiB pages, as pmem and
    DAX give) against an ndarray in memory: what the 4 KiB pages of /dev/shm cost. Root only."""
    if os.geteuid() != 0:
        return "needs root (mounts a tmpfs with huge=always)"
    mnt = os.path.join(root, "huge-tmpfs")
    os.makedirs(mnt, exist_ok=True)
    opts = f"size={(2 * size + size // 2 + 64 * MIB) >> 20}m,huge=always"
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", mnt], capture_output=True).returncode:
        return "mount -t tmpfs -o huge=always failed"
    try:
        img, plain_big, _ = _make_big(mnt, size, pattern, small=False)
        os.unlink(plain_big)
        with xipfs.open(img) as fs:
            arr = {"xip": fs.map_array("/big", np.uint64)}
            arr["mem"] = np.empty(size // 8, dtype=np.uint64)
            arr["mem"][:] = arr["xip"]
            if int(np.add.reduce(arr["xip"])) != expected:
                raise AssertionError("huge tmpfs mapping: wrong sum")
            names = {"xip": "warm: fs.map_array on tmpfs huge=always (XIP)",
                     "mem": "in memory: ndarray copy (np.empty), same rounds"}
            m = measure([Case(names[k], lambda _, k=k: np.add.reduce(arr[k]), size, "GiB/s") for k in names],
                        cfg.repeat, warmup=1)
            base = arr["xip"].base
            arr.clear()
            base.close()
        return Row("[huge pages] warm sum, image on a tmpfs mounted huge=always, vs the ndarray in memory",
                   m[names["xip"]], m[names["mem"]])
    finally:
        for name in os.listdir(mnt):
            os.unlink(os.path.join(mnt, name))
        subprocess.run(["umount", mnt], capture_output=True)


def _huge_kib(addr: int, nbytes: int) -> int:
    """AnonHugePages (KiB) of this process's mappings that overlap ``[addr, addr + nbytes)``."""
    total = 0
    try:
        with open("/proc/self/smaps") as f:
            inside = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo < addr + nbytes and addr < hi
                elif inside and head == "AnonHugePages:":
                    total += int(line.split()[1])
    except (OSError, ValueError):
        return 0
    return total


COLD_XIP = "cold: fresh fs.map_array(p, uint64) (XIP)"
COLD_KERNEL = "cold: fresh kernel mmap.mmap of the tmpfs file"


def bench_map_sum(root: str, cfg: Config) -> Section:
    size = cfg.big_bytes
    pattern = np.frombuffer(os.urandom(PATTERN), dtype=np.uint8)
    img, plain_big, _ = _make_big(root, size, pattern, small=False)
    section = Section(f"11. numpy sum over a mapping: np.add.reduce of a {_size(size)} file as uint64")
    expected = int(np.add.reduce(pattern.view(np.uint64))) * (size // PATTERN) % (1 << 64)
    stitch, copy, restore = _budget_keeper()
    fsx = xipfs.open(img)
    fsf = xipfs.open(img, xip=False)
    fd = os.open(plain_big, os.O_RDONLY)
    arrays: dict[str, Any] = {}
    maps: list[Any] = []
    try:
        if not fsx.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP ({fsx!r}).")
        runs = len(fsx.block_runs("/big"))
        arrays["xip"] = fsx.map_array("/big", np.uint64)
        copy()
        try:
            arrays["forced copy"] = fsx.map_array("/big", np.uint64)
        finally:
            restore()
        arrays["file-device copy"] = fsf.map_array("/big", np.uint64)
        for name, xip in (("xip", True), ("forced copy", False), ("file-device copy", False)):
            if arrays[name].base.is_xip != xip:
                raise AssertionError(f"{name}: is_xip is {arrays[name].base.is_xip} ({arrays[name].base!r})")
        kmap = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        maps.append(kmap)
        arrays["kernel mmap"] = np.frombuffer(kmap, dtype=np.uint64)
        mem = np.empty(size // 8, dtype=np.uint64)      # numpy's allocation (huge pages if THP allows)
        mem[:] = arrays["xip"]
        arrays["ndarray"] = mem
        with open(plain_big, "rb", buffering=0) as f:
            arrays["bytes"] = np.frombuffer(f.read(), dtype=np.uint64)
        # Correctness, and the first touch of every array for the warm rows.
        for name, a in arrays.items():
            _verify(a, size, pattern, name)
            got = int(np.add.reduce(a))
            if got != expected:
                raise AssertionError(f"{name}: sum {got}, expected {expected}")
        huge = {name: _huge_kib(arrays[name].ctypes.data, size)
                for name in ("ndarray", "bytes", "forced copy")}

        def total(a: Any) -> Callable[[Any], None]:
            def run(_: Any) -> None:
                np.add.reduce(a)
            return run

        labels = {
            "xip": "warm: fs.map_array(p, uint64) (XIP)",
            "ndarray": "in memory: ndarray copy (np.empty)",
            "bytes": "in memory: np.frombuffer(bytes copy)",
            "kernel mmap": "warm: kernel mmap.mmap of the tmpfs file",
            "forced copy": "warm: copy mapping, forced on XIP",
            "file-device copy": "warm: copy mapping, file device",
        }
        w = measure([Case(labels[k], total(arrays[k]), size, "GiB/s") for k in labels], cfg.repeat, warmup=1)

        def fresh_xip() -> list[Any]:
            return [fsx.map_array("/big", np.uint64)]

        def fresh_kernel() -> list[Any]:
            km = mmap.mmap(fd, size, prot=mmap.PROT_READ)
            return [km, np.frombuffer(km, dtype=np.uint64)]

        def cold_sum(state: list[Any]) -> None:
            np.add.reduce(state[-1])

        def drop(state: list[Any]) -> None:
            m = state[-1].base if len(state) == 1 else state[0]
            state.clear()
            m.close()

        cold = [
            Case(COLD_XIP, cold_sum, size, "GiB/s", fresh_xip, drop),
            Case(COLD_KERNEL, cold_sum, size, "GiB/s", fresh_kernel, drop),
        ]
        c = measure(cold, cfg.repeat_cold, warmup=1)
    finally:
        restore()
        bases = [a.base for k, a in arrays.items() if k in ("xip", "forced copy", "file-device copy")]
        arrays.clear()
        for m in bases + maps:
            _close_quietly(m)
        os.close(fd)
        fsx.close()
        fsf.close()
        _unlink(img, plain_big)

    huge_row = _huge_tmpfs_sum(root, size, pattern, expected, cfg)
    xw, nd = w[labels["xip"]], w[labels["ndarray"]]
    xc, kc = c[COLD_XIP], c[COLD_KERNEL]
    pages = size // PAGE
    section.rows += [
        Row("warm sum over fs.map_array(p, uint64) (XIP) vs an ndarray already in memory", xw, nd, 0.9),
        Row("warm sum (XIP) vs np.frombuffer of a bytes copy", xw, w[labels["bytes"]]),
        Row("warm sum (XIP) vs the kernel's mmap of the tmpfs file", xw, w[labels["kernel mmap"]]),
        Row("[copy] warm sum over the copy mapping, forced on XIP, vs the ndarray in memory",
            w[labels["forced copy"]], nd),
        Row("[copy] warm sum over the copy mapping, file device, vs the ndarray in memory",
            w[labels["file-device copy"]], nd),
        Row("cold: first sum over a fresh fs.map_array (XIP, page faults) vs a fresh kernel mmap", xc, kc),
        Row("cold: first sum (XIP) vs the warm sum (XIP)", xc, xw),
    ]
    if isinstance(huge_row, Row):
        section.rows.append(huge_row)
        section.raw += [huge_row.ours, huge_row.base]
    else:
        section.notes.append(f"Huge-page tmpfs row skipped: {huge_row}")
    section.raw += list(w.values()) + list(c.values())
    section.notes += [
        f"The same {_size(size)} of data everywhere (/big is {runs} runs); np.add.reduce of uint64, "
        f"memory-bound; every sum checked against the expected value first. Warm: each array was read "
        f"whole before timing. Cold: a fresh mapping per sample (made untimed), the first sum "
        f"pays the page faults.",
        f"First touch: {(xc.median_ns - xw.median_ns) / pages:.0f} ns per 4 KiB page on XIP, "
        f"{(kc.median_ns - w[labels['kernel mmap']].median_ns) / pages:.0f} ns on the kernel mmap "
        f"(cold sum minus warm sum, per page).",
        f"Pages: the ndarray has {huge['ndarray'] >> 10} MiB in transparent huge pages, the bytes copy "
        f"{huge['bytes'] >> 10} MiB, the forced copy mapping {huge['forced copy'] >> 10} MiB; tmpfs "
        f"(the XIP and kernel mappings) uses 4 KiB pages here.",
    ]
    return section


BENCHMARKS: dict[str, Callable[[str, Config], Section]] = {
    "map": bench_map,
    "mapruns": bench_map_runs,
    "mapsum": bench_map_sum,
}


if __name__ == "__main__":          # the same as: benchmarks/run.py --only {these} [options]
    import run
    sys.exit(run.main(["--only", ",".join(BENCHMARKS), *sys.argv[1:]]))
