"""FUSE benchmark: sequential read of a big file through ``xipfs.fuse`` against Linux's own ext2.

The same image (in /dev/shm, a file of ``cfg.big_bytes`` with random content) is mounted twice,
read-only: through FUSE by ``xipfs.fuse.mount`` in a server process, and by the kernel's ext2
driver through a loop device (``mount -o loop,ro -t ext2``). A reader in this process reads the
whole file with ``os.readv`` into one page-aligned 1 MiB buffer, as ``cat`` or ``cp`` do (both
allocate page-aligned buffers). The alignment matters: on this AMD host the kernel's copy to a
buffer 16 bytes off a 64-byte boundary runs at half speed (loop mount, warm: 7.7 against 17-19
GiB/s), and a ``bytearray`` is aligned or not depending on the state of malloc.

* cold: the page cache is dropped before each sample (``echo 3 > /proc/sys/vm/drop_caches``),
  so every byte comes through the file system: for FUSE, a request to the server per 1 MiB;
  for the loop mount, the loop device reading the image file. The loop mount's cold samples
  vary a lot on this shared machine (about 1 to 6 GiB/s from one sample to the next).
* warm: the file was read once before the sample; both are served from the page cache and the
  FUSE server gets no request at all (kernel_cache: not even a GETATTR).

Why the warm ratio is low (kernel-bound, measured on Linux 6.18): FUSE caches file data in
order-0 (4 KiB) folios -- this kernel has no large folios for FUSE, whatever the mount's
max_read/max_write -- while ext4 (which serves ext2) caches folios of up to 2 MiB. A warm read
is the kernel copying out of its page cache, and with 4 KiB folios it pays, per 4 KiB: the
batch lookup, ``folio_mark_accessed`` (on the first re-read, moving every folio to the active
LRU), and a copy from pages that the page allocator scattered in physical memory, which in this
virtual machine copy at about half the speed of contiguous ones. The section's notes give the
page-cache layout of both mounts after the run (folio sizes and physical contiguity, from
``/proc/self/pagemap`` and ``/proc/kpageflags``). The info row against a warm plain file on
tmpfs (4 KiB pages too, but physically contiguous because they were written in one go) shows
how much of the gap is contiguity.

Info rows show the other ways the server can run: one thread (``nothreads``), the kernel's
default readahead (128 KiB requests), and reads copied by Python (``read_path=copy``) or
pread by libfuse (``read_path=pread``) instead of spliced.

Needs root (loop mounts, dropping caches), /dev/fuse and libfuse 3; otherwise the section says
why it was skipped. Standalone: ``.venv/bin/python benchmarks/bench_fuse.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_read import Config  # noqa: E402
from common import MIB, Case, Row, Section, measure  # noqa: E402

import xipfs  # noqa: E402
from xipfs import fuse as xfuse  # noqa: E402

PATTERN = 16 * MIB
CHUNK = MIB
MOUNT_TIMEOUT = 20.0

#: (case name, mount options) of the FUSE servers; the first is the default configuration.
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("fuse", {}),
    ("fuse nothreads", {"nothreads": True}),
    ("fuse readahead 128 KiB", {"readahead_kb": 128}),
    ("fuse read_path=pread", {"read_path": "pread"}),
    ("fuse read_path=copy", {"read_path": "copy"}),
]
QUICK_VARIANTS = 2


def unavailable() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (loop mounts and dropping the page cache)"
    reason = xfuse.fuse_available()
    if reason:
        return reason
    for tool in ("mount", "umount", "fusermount3"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def make_image(root: str, size: int) -> tuple[str, bytes]:
    """An image holding ``/big.bin``: ``size`` bytes of a random 16 MiB pattern, each copy
    stamped with its number so no two MiB are alike. Returns (image, pattern)."""
    pattern = os.urandom(PATTERN)
    img = os.path.join(root, "fuse-bench.ext2")
    xipfs.mkfs(img, size + size // 16 + (64 << 20))
    with xipfs.open(img, "r+") as fs, fs.open("/big.bin", "wb", buffering=0) as f:
        for i in range(size // PATTERN):
            f.write(i.to_bytes(8, "little") + pattern[8:])
    return img, pattern


def expected(pattern: bytes, offset: int, n: int) -> bytes:
    """What ``make_image`` wrote at ``offset`` (within one pattern copy)."""
    i, p = divmod(offset, PATTERN)
    chunk = i.to_bytes(8, "little") + pattern[8:]
    return chunk[p:p + n]


@contextlib.contextmanager
def loop_mount(img: str, mp: str) -> Iterator[str | None]:
    """The image mounted read-only by the kernel's ext2 through a loop device; yields the error
    text instead when that fails."""
    os.makedirs(mp, exist_ok=True)
    proc = subprocess.run(["mount", "-o", "loop,ro", "-t", "ext2", img, mp], capture_output=True)
    if proc.returncode != 0:
        yield (proc.stderr or proc.stdout).decode(errors="replace").strip() or "mount failed"
        return
    try:
        yield None
    finally:
        subprocess.run(["umount", mp], capture_output=True)


class Server:
    """``xipfs.fuse.mount(img, mp, readonly=True, options=...)`` in a child process."""

    def __init__(self, img: str, mp: str, options: dict[str, Any]) -> None:
        os.makedirs(mp, exist_ok=True)
        self.mp = mp
        code = f"import xipfs.fuse as f; f.mount({img!r}, {mp!r}, readonly=True, options={options!r})"
        self.proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not os.path.ismount(mp):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"FUSE server for {mp} did not mount: {err}")
            time.sleep(0.02)

    def stop(self) -> None:
        for attempt in range(20):
            if not os.path.ismount(self.mp):
                break
            subprocess.run(["fusermount3", "-u", *(["-z"] if attempt == 19 else []), self.mp],
                           capture_output=True)
            time.sleep(0.05)
        try:
            self.proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def drop_caches() -> None:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


def reader(path: str, size: int, buf: memoryview) -> Callable[[Any], None]:
    """Read the first ``size`` bytes of ``path`` (all of it, for the big file) into ``buf`` with
    readv, as cat or cp do."""
    def read(_: Any) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            total = 0
            while total < size and (n := os.readv(fd, [buf[:size - total]])):
                total += n
        finally:
            os.close(fd)
        if total != size:
            raise AssertionError(f"{path}: read {total} bytes, expected {size}")
    return read


KPF_COMPOUND_TAIL = 1 << 16


def cache_layout(path: str) -> str:
    """How the page cache holds ``path`` (root only): how many folios and of what mean size, and
    the share of its pages physically next to the page before them. Maps the file and reads
    ``/proc/self/pagemap`` and ``/proc/kpageflags``; pages not cached are read in first."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size // mmap.PAGESIZE * mmap.PAGESIZE
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            return f"{path}: mmap failed: {os.strerror(ctypes.get_errno())}"
        try:
            for off in range(0, size, mmap.PAGESIZE):         # map every page
                ctypes.c_char.from_address(addr + off).value  # noqa: B018
            with open("/proc/self/pagemap", "rb", buffering=0) as pm:
                pm.seek(addr // mmap.PAGESIZE * 8)
                raw = pm.read(size // mmap.PAGESIZE * 8)
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    pfns = [entry & ((1 << 55) - 1) for (entry,) in struct.iter_unpack("<Q", raw)]
    folios = 0
    with open("/proc/kpageflags", "rb", buffering=0) as kf:
        for pfn in pfns:
            kf.seek(pfn * 8)
            flags = int.from_bytes(kf.read(8), "little")
            folios += not flags & KPF_COMPOUND_TAIL
    if not pfns or not any(pfns):
        return "unknown (no page frame numbers: not root?)"
    next_to = sum(b == a + 1 for a, b in zip(pfns, pfns[1:], strict=False)) / max(1, len(pfns) - 1)
    return (f"{folios} folios of {len(pfns) * mmap.PAGESIZE / folios / 1024:.0f} KiB on average, "
            f"{next_to:.0%} of pages physically next to the one before")


def check_content(path: str, pattern: bytes, size: int) -> None:
    """Untimed: the first, a middle and the last MiB of ``path`` are what was written."""
    with open(path, "rb") as f:
        for offset in (0, size // 2 + 12345, size - MIB):
            f.seek(offset)
            if f.read(MIB) != expected(pattern, offset, MIB):
                raise AssertionError(f"{path}: wrong data at {offset}")


def bench_fuse(root: str, cfg: Config) -> Section:
    size = cfg.big_bytes
    section = Section(f"16. sequential read of a {size >> 20} MiB file through the FUSE mount "
                      "(xipfs.fuse, read-only) vs a loop mount by Linux's ext2")
    reason = unavailable()
    if reason:
        section.notes.append(f"skipped: {reason}")
        return section
    img, pattern = make_image(root, size)
    buf = memoryview(mmap.mmap(-1, CHUNK))          # page-aligned, as cat and cp allocate theirs
    variants = VARIANTS if cfg.big_bytes >= 1 << 30 else VARIANTS[:QUICK_VARIANTS]
    servers: list[Server] = []
    try:
        with loop_mount(img, os.path.join(root, "loop")) as error:
            if error:
                section.notes.append(f"skipped: loop mount failed: {error}")
                return section
            paths = {"loop": os.path.join(root, "loop", "big.bin")}
            for name, options in variants:
                mp = os.path.join(root, name.replace(" ", "_").replace("=", "_"))
                servers.append(Server(img, mp, options))
                paths[name] = os.path.join(mp, "big.bin")
            for path in paths.values():
                check_content(path, pattern, size)
            cases = []
            for name, path in paths.items():
                read = reader(path, size, buf)
                cases.append(Case(f"{name} cold", read, size, "GiB/s", setup=drop_caches))
                if name in ("loop", "fuse"):
                    cases.append(Case(f"{name} warm", read, size, "GiB/s",
                                      setup=lambda read=read: read(None)))
            # context for the warm rows: the image file itself on tmpfs, whose page cache is
            # made of 4 KiB pages like FUSE's, but physically contiguous ones
            tmpfs = reader(img, size, buf)
            cases.append(Case("tmpfs file warm", tmpfs, size, "GiB/s", setup=lambda: tmpfs(None)))
            m = measure(cases, cfg.repeat_big, warmup=1)
            # the page cache as a warm sample finds it: filled by one cold read
            drop_caches()
            layout = {}
            for name in ("loop", "fuse"):
                reader(paths[name], size, buf)(None)
                layout[name] = cache_layout(paths[name])
            layout["tmpfs image file"] = cache_layout(img)
    finally:
        for server in servers:
            server.stop()
        with contextlib.suppress(OSError):
            os.unlink(img)
    section.rows += [
        Row("cold: page cache dropped before each read", m["fuse cold"], m["loop cold"], 0.5),
        Row("warm: the file already in the page cache (kernel-bound: the server is not asked; "
            "see the page-cache note)", m["fuse warm"], m["loop warm"], 0.5),
    ]
    section.rows.append(Row("[fuse] warm, against a warm plain file on tmpfs (4 KiB pages too, "
                            "but contiguous)", m["fuse warm"], m["tmpfs file warm"]))
    for name, _ in variants[1:]:
        section.rows.append(Row(f"[{name}] cold", m[f"{name} cold"], m["loop cold"]))
    section.notes.append("FUSE mounts: read-only, kernel_cache; default: multithreaded, reads "
                         "spliced from the image file by libfuse, 4 MiB readahead, requests of "
                         f"{xfuse.splice_max_read() >> 10} KiB.")
    section.notes.append("Page cache after one cold read (what a warm sample reads from): "
                         + "; ".join(f"{name}: {text}" for name, text in layout.items()) + ".")
    section.notes.append(f"Warm reads are Linux {os.uname().release} copying from its page cache: "
                         "the cost goes with the number of folios (lookup, LRU activation on the "
                         "first re-read) and with how scattered their pages are in physical memory. "
                         "Linux 6.18 gives FUSE 4 KiB folios only; no mount option or init flag the "
                         "server can set changes that (see the module docstring).")
    section.raw += list(m.values())
    return section


BENCHMARKS = {"fuse": bench_fuse}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "fuse", *sys.argv[1:]]))
