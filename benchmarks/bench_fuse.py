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

Sections 18-20 (``--only fusetar,fusersync,fuserm``) copy a real tree instead: ``tar x`` of the
standard library (no site-packages, no ``__pycache__``), ``rsync -aHAX`` of it, and ``rm -rf`` of
it, each into a fresh empty image on /dev/shm mounted read-write, through xipfs and by Linux's
ext2 on a loop device, the unmount timed with the command (see ``Target.unmount``).

Needs root (loop mounts, dropping caches), /dev/fuse and libfuse 3; otherwise the section says
why it was skipped. Standalone: ``.venv/bin/python benchmarks/bench_fuse.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
import shutil
import stat
import statistics
import struct
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_read import Config  # noqa: E402
from common import MIB, Case, Row, Section, measure, time_sample  # noqa: E402
from stdlib_tree import image_size  # noqa: E402

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


#: Mount options of the copy rows (``XIPFS_BENCH_FUSE_OPTIONS="writeback_cache=0"`` to compare).
COPY_OPTIONS = xfuse.parse_options(os.environ.get("XIPFS_BENCH_FUSE_OPTIONS", ""))


class Server:
    """``xipfs.fuse.mount(img, mp, readonly=True, options=...)`` in a child process."""

    def __init__(self, img: str, mp: str, options: dict[str, Any], readonly: bool = True) -> None:
        os.makedirs(mp, exist_ok=True)
        self.mp = mp
        code = (f"import xipfs.fuse as f; f.mount({img!r}, {mp!r}, readonly={readonly!r}, "
                f"options={options!r})")
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


# -- copying a tree in and out: tar x, rsync -aHAX, rm -rf --------------------------------------
#: Timed rounds of the copy rows (fewer with --quick or a smaller --repeat): an xipfs sample
#: takes seconds.
COPY_REPEAT = 5
COPY_REPEAT_QUICK = 3
#: The issue's target: each within 4x of the loop mount.
COPY_TARGET = 0.25
#: ``mke2fs`` with what ``xipfs.mkfs`` makes by default: 4 KiB blocks, 256-byte inodes,
#: sparse_super, large_file, filetype, ext_attr, dir_index, and no resize_inode.
MKE2FS = ["mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-I", "256", "-O", "^resize_inode"]

_COPY_SOURCES: dict[str, tuple[str, str, int, int]] = {}


def copy_source(root: str) -> tuple[str, str, int, int]:
    """``(tree, tarball, entries, bytes)``: this Python's standard library without site-packages
    and ``__pycache__``, copied to ``root``, and a tar of it whose members start with ``stdlib/``."""
    if root not in _COPY_SOURCES:
        parent = os.path.join(root, "copy-src")
        tree = os.path.join(parent, "stdlib")
        shutil.copytree(sysconfig.get_paths()["stdlib"], tree, symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages", "__pycache__"))
        entries = data = 0
        for top, dirs, files in os.walk(tree):
            entries += len(dirs) + len(files)
            data += sum(os.lstat(os.path.join(top, f)).st_size for f in files)
        tar = os.path.join(root, "stdlib.tar")
        subprocess.run(["tar", "cf", tar, "-C", parent, "stdlib"], check=True)
        _COPY_SOURCES[root] = (tree, tar, entries, data)
    return _COPY_SOURCES[root]


class Target:
    """A fresh empty file system mounted read-write at ``mp``: ``xipfs`` (an image made by
    ``xipfs.mkfs``, served by ``xipfs.fuse.mount`` from a child process) or ``loop`` (an image
    of the same size made by mke2fs, mounted by Linux with ``mount -o loop -t ext2``)."""

    def __init__(self, kind: str, root: str, size: int) -> None:
        self.kind = kind
        self.size = size
        self.img = os.path.join(root, f"copy-{kind}.ext2")
        self.mp = os.path.join(root, f"copy-{kind}-mnt")
        self.server: Server | None = None
        #: per sample: seconds of the command, seconds of the unmount
        self.split: list[tuple[float, float]] = []

    def mount(self) -> None:
        """Untimed: a new image, mounted."""
        if self.kind == "xipfs":
            xipfs.mkfs(self.img, self.size)
            self.server = Server(self.img, self.mp, dict(COPY_OPTIONS), readonly=False)
        else:
            subprocess.run([*MKE2FS, self.img, f"{self.size >> 10}k"], check=True,
                           stdout=subprocess.DEVNULL)
            os.makedirs(self.mp, exist_ok=True)
            subprocess.run(["mount", "-o", "loop", "-t", "ext2", self.img, self.mp], check=True,
                           capture_output=True)

    def unmount(self) -> None:
        """Timed: until everything is in the image. Loop: ``umount`` (writes back the dirty
        pages and inodes, releases the loop device). xipfs: ``fusermount3 -u`` and the server's
        exit (it closes the image clean)."""
        command = ["fusermount3", "-u", self.mp] if self.kind == "xipfs" else ["umount", self.mp]
        for _ in range(200):                      # busy right after the last close: retry
            if subprocess.run(command, capture_output=True).returncode == 0:
                break
            time.sleep(0.005)
        else:
            raise RuntimeError(f"could not unmount {self.mp}")
        if self.server is not None:
            self.server.proc.wait(timeout=MOUNT_TIMEOUT)
            if self.server.proc.stderr:
                self.server.proc.stderr.close()
            self.server = None

    def cleanup(self) -> None:
        """Unmount if a sample failed half way; the image stays for checking."""
        if os.path.ismount(self.mp):
            if self.server is not None:
                self.server.stop()
                self.server = None
            else:
                subprocess.run(["umount", "-l", self.mp], capture_output=True)

    def timed(self, command: list[str]) -> None:
        """Run ``command`` (it must succeed), then unmount; remember both times."""
        t0 = time.perf_counter()
        proc = subprocess.run(command, capture_output=True)
        t1 = time.perf_counter()
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} on {self.kind} exited {proc.returncode}: "
                               f"{proc.stderr.decode(errors='replace')[-2000:]}")
        self.unmount()
        self.split.append((t1 - t0, time.perf_counter() - t1))


def image_tree(img: str) -> tuple[int, int]:
    """``(entries, bytes of regular files)`` under the image's ``/stdlib`` (0, 0 when absent)."""
    entries = data = 0
    with xipfs.open(img) as fs:
        if not fs.exists("/stdlib"):
            return 0, 0
        for top, dirs, files in fs.walk("/stdlib"):
            entries += len(dirs) + len(files)
            for name in files:
                st = fs.lstat(f"{top}/{name}")
                data += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return entries, data


def fsck_state(img: str) -> str:
    proc = subprocess.run(["e2fsck", "-fn", img], capture_output=True)
    return "clean" if proc.returncode == 0 else f"NOT CLEAN (e2fsck -fn exited {proc.returncode})"


def machine_speed() -> str:
    """This machine's Python and syscall speed, to read the ratios by: both sides of a copy row
    pay kernel round trips, and the xipfs side pays Python for each request."""
    n = 1_000_000
    t0 = time.perf_counter_ns()
    for _ in range(n):
        pass
    loop = (time.perf_counter_ns() - t0) / n
    m = 100_000
    t0 = time.perf_counter_ns()
    for _ in range(m):
        os.getppid()
    getppid = (time.perf_counter_ns() - t0) / m
    t0 = time.perf_counter_ns()
    for _ in range(m):
        os.stat("/dev/shm")
    stat_ns = (time.perf_counter_ns() - t0) / m
    return (f"Machine speed during this section: empty Python loop {loop:.0f} ns/iteration, "
            f"os.getppid() {getppid:.0f} ns, os.stat on tmpfs {stat_ns:.0f} ns; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}.")


def copy_unavailable(tools: tuple[str, ...]) -> str | None:
    reason = unavailable()
    if reason:
        return reason
    for tool in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed" + (" (apt-get install rsync)" if tool == "rsync" else "")
    return None


def bench_copy(root: str, cfg: Config, op: str) -> Section:
    """One of the copy rows: ``op`` is ``tar``, ``rsync`` or ``rm``."""
    number, what = {"tar": ("18", "tar x of"), "rsync": ("19", "rsync -aHAX of"),
                    "rm": ("20", "rm -rf of")}[op]
    section = Section(f"{number}. {what} the standard library (no site-packages, no __pycache__) "
                      "on a read-write FUSE mount (xipfs.fuse) vs a loop mount by Linux's ext2, "
                      "image on /dev/shm, unmount included")
    reason = copy_unavailable(("tar", "mke2fs", "e2fsck") + (("rsync",) if op == "rsync" else ()))
    if reason:
        section.notes.append(f"skipped: {reason}")
        return section
    tree, tar, entries, data = copy_source(root)
    size = image_size(data, entries)
    targets = [Target("xipfs", root, size), Target("loop", root, size)]
    quick = cfg.big_bytes < 1 << 30
    repeat = min(cfg.repeat_cold, COPY_REPEAT_QUICK if quick else COPY_REPEAT)

    def case(t: Target) -> Case:
        extract = ["tar", "xf", tar, "-C", t.mp]
        if op == "tar":
            command, prepare = extract, None
        elif op == "rsync":
            command, prepare = ["rsync", "-aHAX", tree, t.mp + "/"], None
        else:
            command, prepare = ["rm", "-rf", os.path.join(t.mp, "stdlib")], extract

        def setup() -> None:
            t.mount()
            if prepare is not None:                   # rm: the tree first, written back
                subprocess.run(prepare, check=True)
                subprocess.run(["sync", "-f", t.mp], check=True)

        return Case(f"{t.kind} {op}", lambda _: t.timed(command), entries, "us/file", setup=setup,
                    teardown=lambda _: t.cleanup())

    cases = [case(t) for t in targets]
    try:
        for c in cases:                               # untimed first round, then check it
            time_sample(c)
        found = {t.kind: (image_tree(t.img), fsck_state(t.img)) for t in targets}
        want = (0, 0) if op == "rm" else (entries, data)
        for t in targets:
            if found[t.kind][0] != want:
                raise AssertionError(f"{op} on {t.kind}: the image holds {found[t.kind][0]} "
                                     f"(entries, bytes) under /stdlib, expected {want}")
            t.split.clear()
        m = measure(cases, repeat, warmup=0)
    finally:
        for t in targets:
            t.cleanup()
            with contextlib.suppress(OSError):
                os.unlink(t.img)
    label = {"tar": f"tar x of a tarball ({entries} files and directories, {data / MIB:.0f} MiB) "
                    "into an empty mount, then unmount",
             "rsync": f"rsync -aHAX of the tree ({entries} entries, {data / MIB:.0f} MiB) from "
                      "tmpfs into an empty mount, then unmount",
             "rm": f"rm -rf of the extracted tree ({entries} entries), then unmount"}[op]
    section.rows.append(Row(label, m[f"xipfs {op}"], m[f"loop {op}"], COPY_TARGET))
    split = "; ".join(
        f"{t.kind}: command {statistics.median(s for s, _ in t.split):.3f} s, unmount "
        f"{statistics.median(u for _, u in t.split):.3f} s" for t in targets)
    section.notes.append(
        f"Each sample: a new image of {size >> 20} MiB (xipfs.mkfs, or mke2fs with the same "
        "features: 4 KiB blocks, 256-byte inodes, no resize_inode) mounted untimed"
        + (", the tree extracted into it by tar and written back with `sync -f`, untimed"
           if op == "rm" else "")
        + "; timed: the command, then the unmount (loop: `umount`, which writes back dirty pages "
        "and inodes; xipfs: `fusermount3 -u` and the server's exit, which closes the image "
        f"clean). Medians of the two parts: {split}.")
    section.notes.append("Checked after an untimed first round: the images hold "
                         + ("nothing under /stdlib" if op == "rm" else "every entry and byte")
                         + "; e2fsck -fn: " + ", ".join(f"{k} {v[1]}" for k, v in found.items())
                         + ".")
    section.notes.append("FUSE mount: read-write, the server's defaults (multithreaded).")
    section.notes.append(machine_speed())
    section.raw += list(m.values())
    return section


BENCHMARKS = {
    "fuse": bench_fuse,
    "fusetar": partial(bench_copy, op="tar"),
    "fusersync": partial(bench_copy, op="rsync"),
    "fuserm": partial(bench_copy, op="rm"),
}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "fuse", *sys.argv[1:]]))
