"""Huge-page benchmark (issue 15, "laid out for DAX"): what 2 MiB-aligned extents give xipfs's own
mappings on a huge-page tmpfs.

A tmpfs is mounted with ``-o huge=always`` (needs root; skipped with the reason otherwise), so
the image files on it are held in 2 MiB pages. One big file (512 MiB; 128 MiB with ``--quick``,
random data) is packed as ext4 twice, into two images on that tmpfs: once as ``pack`` lays it
out (every whole 2 MiB piece of the file on a 2 MiB-aligned block, ``fs.huge_runs`` covers it
all) and once with ``pack4(..., align=False)`` behind a small file, so that it starts off
alignment (``fs.huge_runs`` finds nothing). Each is mapped with ``fs.mmap`` (XIP: the image's
own pages stitched in, ``MAP_SHARED`` at the file's offsets in the image), and side by side:

- first touch: a fresh mapping, one byte read per 4 KiB page (numpy, strided), then closed;
- random 8-byte reads over the whole mapping, already touched (a numpy gather);
- ``/proc/self/smaps``: ``ShmemPmdMapped`` / ``FilePmdMapped`` kB of the mapping once touched.

The kernel maps a 2 MiB page of a shared file mapping with one PMD entry only when the file
offset and the virtual address agree modulo 2 MiB. The offsets are the extents' business; the
address is the mapping's: xipfs reserves the range with an anonymous ``mmap`` first, which Linux
(6.7 and later) places 2 MiB-aligned by itself only when its length is a multiple of 2 MiB, and
xipfs steers it there for other lengths (``mapping._steer``). A third case maps the aligned file
4 KiB short, a length Linux does not align, to show the steering at work.

Standalone: ``.venv/bin/python benchmarks/bench_hugepage.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
from bench_read import Config
from common import MIB, Case, Row, Section, machine_speed, measure

import xipfs
from xipfs.tools.pack4 import pack4

HUGE = 2 * MIB
#: Random 8-byte reads per sample.
READS = 1 << 20


def _hpage_pmd_size() -> int:
    """The kernel's PMD huge-page size (2 MiB on x86-64), 0 when THP is not built in."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _shmem_huge_kb() -> int:
    """``ShmemHugePages`` of /proc/meminfo: kB of tmpfs held in huge pages, machine-wide."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("ShmemHugePages:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def huge_tmpfs(path: str, size: int) -> Iterator[str | None]:
    """A tmpfs mounted at ``path`` with ``huge=always``; yields None, or why it cannot be had."""
    if os.geteuid() != 0:
        yield "mounting a tmpfs needs root"
        return
    if not _hpage_pmd_size():
        yield "the kernel has no transparent huge pages (no hpage_pmd_size)"
        return
    os.makedirs(path, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"huge=always,size={size >> 20}m", "xipfs-huge",
                           path], capture_output=True, text=True)
    if proc.returncode != 0:
        os.rmdir(path)
        yield f"mount -t tmpfs -o huge=always failed: {proc.stderr.strip() or proc.returncode}"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", path], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(path)


def pmd_mapped(lo: int, hi: int) -> dict[str, int]:
    """Rss, ShmemPmdMapped and FilePmdMapped kB of this process's mappings within ``[lo, hi)``
    (a stitched mapping is one kernel mapping per run: summed)."""
    out = {"Rss": 0, "ShmemPmdMapped": 0, "FilePmdMapped": 0, "vmas": 0}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if m:
                inside = int(m[1], 16) < hi and int(m[2], 16) > lo
                out["vmas"] += inside
                continue
            if inside:
                key, _, value = line.partition(":")
                if key in out:
                    out[key] += int(value.split()[0])
    return out


def _write_source(path: str, size: int) -> None:
    """A file of ``size`` random bytes (a random 16 MiB tiled)."""
    pattern = os.urandom(16 * MIB)
    with open(path, "wb") as f:
        for pos in range(0, size, len(pattern)):
            f.write(pattern[:min(len(pattern), size - pos)])


def bench_hugepage(root: str, cfg: Config) -> Section:
    """Section 24: the same big file packed aligned and misaligned onto a huge-page tmpfs, mapped."""
    size = min(cfg.big_bytes // 2, 512 * MIB)
    section = Section(f"24. Huge pages: a {size >> 20} MiB file of an ext4 image on a huge=always tmpfs, "
                      "2 MiB-aligned extents against misaligned ones, mapped with fs.mmap")
    mnt = os.path.join(root, "huge")
    with huge_tmpfs(mnt, 2 * size + 512 * MIB) as why:
        if why:
            section.notes.append(f"skipped: {why}")
            return section
        src = os.path.join(root, "hugesrc")
        os.makedirs(src)
        with open(os.path.join(src, "a_small"), "wb") as f:      # first in the tree: the big file
            f.write(os.urandom(5000))                           # does not start at the data's start
        _write_source(os.path.join(src, "big"), size)
        before = _shmem_huge_kb()
        images = {name: os.path.join(mnt, f"{name}.img") for name in ("aligned", "misaligned")}
        pack4(src, images["aligned"])
        pack4(src, images["misaligned"], align=False)
        huge_kb = _shmem_huge_kb() - before
        shutil.rmtree(src)                                     # its memory back before measuring
        fss = {name: xipfs.open(img) for name, img in images.items()}
        try:
            return _measure(section, cfg, fss, size, huge_kb)
        finally:
            for fs in fss.values():
                fs.close()


def _measure(section: Section, cfg: Config, fss: dict[str, Any], size: int, huge_kb: int) -> Section:
    """Check the two layouts with fs.huge_runs, then time and inspect their mappings side by side."""
    per = HUGE // 4096
    layout = {}
    for name, fs in fss.items():
        runs = fs.block_runs("/big")
        huge = sum(n for _, n, _ in fs.huge_runs("/big"))
        layout[name] = (runs, huge)
        if not fs.is_xip:
            section.notes.append(f"skipped: the {name} image is not mapped in place here")
            return section
    if layout["aligned"][1] != size // 4096 // per * per or layout["misaligned"][1]:
        raise AssertionError(f"the layouts are not what they should be: {layout}")
    short = size - 4096
    variants = {"aligned": ("aligned", None), "misaligned": ("misaligned", None),
                "aligned, mapped 4 KiB short": ("aligned", short)}

    def fresh(name: str) -> Any:
        fsname, length = variants[name]

        def setup() -> list[Any]:
            m = fss[fsname].mmap("/big", length=length)
            return [m, np.frombuffer(m, np.uint8)]
        return setup

    def touch(state: list[Any]) -> None:
        int(state[1][::4096].sum())

    def close(state: list[Any]) -> None:
        del state[1]                                      # the array first: then the mapping may go
        state[0].close()

    warm: dict[str, list[Any]] = {}                       # touched once, for the random reads
    smaps = {}
    rng = np.random.default_rng(15)
    idx = rng.integers(0, (size - 4096) // 8, READS)

    def gather(name: str) -> Any:
        return lambda _: int(warm[name][1][idx].sum())

    try:
        for name in variants:
            state = fresh(name)()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            touch(state)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            addr = state[1].ctypes.data
            smaps[name] = (addr % HUGE, state[0].runs, pmd_mapped(addr, addr + len(state[0])), faults)
            state[1] = state[1][:len(state[1]) // 8 * 8].view(np.uint64)
            warm[name] = state
            del state
        cases = []
        for name in variants:
            mapped = size if variants[name][1] is None else variants[name][1]
            cases.append(Case(f"{name}: first touch", touch, mapped, "GiB/s", fresh(name), close))
            cases.append(Case(f"{name}: random 8-byte reads", gather(name), READS, "us/call"))
        m = measure(cases, max(cfg.repeat, 9), warmup=1)
    finally:
        for state in warm.values():
            close(state)
        warm.clear()
    section.rows += [
        Row("first touch of a fresh mapping, one byte per 4 KiB page: aligned vs misaligned extents",
            m["aligned: first touch"], m["misaligned: first touch"]),
        Row("random 8-byte reads over the touched mapping (us/call = per read): aligned vs misaligned",
            m["aligned: random 8-byte reads"], m["misaligned: random 8-byte reads"]),
        Row("first touch: aligned extents mapped whole vs mapped 4 KiB short (a length Linux does "
            "not align: xipfs steers the address)", m["aligned: first touch"],
            m["aligned, mapped 4 KiB short: first touch"]),
    ]
    section.raw += list(m.values())
    for name, (runs, huge) in layout.items():
        off, nruns, pmd, faults = smaps[name]
        section.notes.append(
            f"{name}: {len(runs)} extent run(s) starting at block {runs[0][2]}, fs.huge_runs covers "
            f"{huge * 4096 >> 20} MiB; mapped at an address {off >> 10} KiB past 2 MiB, {nruns} kernel "
            f"mapping(s); after the first touch ({faults} page faults): Rss {pmd['Rss'] >> 10} MiB, "
            f"ShmemPmdMapped {pmd['ShmemPmdMapped'] >> 10} MiB, "
            f"FilePmdMapped {pmd['FilePmdMapped'] >> 10} MiB")
    off, nruns, pmd, faults = smaps["aligned, mapped 4 KiB short"]
    section.notes.append(
        f"aligned, mapped 4 KiB short: address {off >> 10} KiB past 2 MiB, {faults} page faults, "
        f"ShmemPmdMapped {pmd['ShmemPmdMapped'] >> 10} MiB of {pmd['Rss'] >> 10} MiB (Linux places an "
        "anonymous reservation 2 MiB-aligned only when its length is a multiple of 2 MiB; xipfs "
        "steers the others)")
    section.notes.append(f"the huge=always tmpfs holds the two images in {huge_kb >> 10} MiB of huge pages "
                         f"(ShmemHugePages grew by that while packing); kernel {os.uname().release}")
    if not huge_kb:
        section.notes.append("the kernel gave the tmpfs no huge pages (see /sys/kernel/mm/"
                             "transparent_hugepage/shmem_enabled: 'deny' overrides huge=always), so no "
                             "layout can be mapped with them")
    section.notes.append("ratio = misaligned time / aligned time (> 1: the aligned layout is faster); a "
                         "random-read call is one 8-byte read, 2^20 of them per sample from numpy")
    section.notes.append(machine_speed())
    return section


BENCHMARKS = {"hugepage": bench_hugepage}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "hugepage", *sys.argv[1:]]))
