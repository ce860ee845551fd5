"""The child program of ``test_crash.py``: changes an ext2 image with xipfs until it is killed.

Run with the project's Python; the parent kills it with SIGKILL at a moment of its choosing and
then checks the image. Three modes:

``random IMG LOG STATUS SEED [--file-device] [--fill]``
    Random operations forever from ``random.Random(SEED)``: files of 0..300 KiB written in
    pieces (crossing the indirect and double-indirect boundaries of 1 KiB blocks), overwrites,
    appends, writes past EOF, truncates both ways, mkdir/rmdir, unlink, renames of files within
    and across directories (replacing a file at the target sometimes), renames of directories
    within their parent, rarely a directory moved to another parent (the documented exception),
    hard links, short and long symlinks, setxattr/removexattr, chmod and utime. Every so often
    it writes a *durable* file ``/durable/<seq>-<sha256 of the content>``, makes it durable
    (``f.fsync()`` or ``fs.sync()``) and only then appends its name to LOG, fsync'ed with
    ``os.fsync``. The memory device (``/dev/shm``) is the default; ``--file-device`` opens the
    image with ``xip=False`` (page cache: only what ``sync`` wrote survives a kill). ``--fill``
    starts from a nearly full image and lets operations run out of space (ENOSPC), freeing a few
    files now and then.

    Every regular file outside ``/durable`` holds only zeros and its *tag* byte, which is part of
    its name (``f<seq>.<tag as 2 hex digits>``), so a block that leaks from another file shows.
    STATUS is a small file in ``/dev/shm`` this mode keeps up to date with plain stores into a
    shared mapping (they survive SIGKILL): which operation was running and how many device
    writes had been made, so the parent can tell where a kill landed.

``script IMG [--trace OUT]``
    A fixed sequence of operations (:func:`script_ops`), ending with ``fs.close()``. With the
    environment variable ``XIPFS_CRASH_AFTER_WRITES=N`` the process kills itself with SIGKILL
    just before device write N+1 (after N writes). ``--trace`` records every device write
    (operation, offset, length) to OUT as JSON, with the final path of each inode and directory
    block, and replays the stores onto a copy of the starting image to show that every store
    reached the image through ``MemoryDevice.write``/``write_new`` (nothing bypasses them).

``sweep IMG PRISTINE``
    A fork server for the sweep over every N: for each number N read from stdin it makes IMG a
    copy of PRISTINE again, forks a child that runs ``script`` and kills itself after N device
    writes (the same hook as ``XIPFS_CRASH_AFTER_WRITES``), and answers ``N killed``, ``N done``
    (the script ended first) or ``N failed STATUS`` on stdout.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import signal
import struct
import sys
import time
from collections.abc import Callable

import xipfs
from xipfs.device import MemoryDevice

MAX_FILE = 300 * 1024
ROOT = "/w"                 # the random operations work below this directory
DURABLE = "/durable"        # durable files only (never touched by the random operations)
CRASH_ENV = "XIPFS_CRASH_AFTER_WRITES"

# -- the status block (random mode) -----------------------------------------------------------
#: ops started, ops finished, device writes, device writes when the current op started,
#: current op code, phase (0 idle, 1 inside an operation, 2 inside a sync)
STATUS = struct.Struct("<QQQQII")
PHASE_IDLE, PHASE_OP, PHASE_SYNC = 0, 1, 2

OPS = ("create", "overwrite", "append", "pwrite_hole", "truncate", "mkdir", "rmdir", "unlink",
       "rename_file", "rename_dir", "move_dir", "link", "symlink", "setxattr", "removexattr",
       "chmod", "utime", "durable", "sync")
OP_CODE = {name: i for i, name in enumerate(OPS)}
#: How often each operation is picked.
WEIGHTS = {"create": 14, "overwrite": 8, "append": 6, "pwrite_hole": 4, "truncate": 8, "mkdir": 5,
           "rmdir": 4, "unlink": 8, "rename_file": 9, "rename_dir": 3, "move_dir": 1, "link": 4,
           "symlink": 5, "setxattr": 5, "removexattr": 3, "chmod": 3, "utime": 3, "durable": 5,
           "sync": 1}


def read_status(path: str) -> dict[str, object]:
    """The status block as a dict (for the parent, after the kill)."""
    with open(path, "rb") as f:
        started, finished, writes, op_writes, code, phase = STATUS.unpack(f.read(STATUS.size))
    return {"ops_started": started, "ops_finished": finished, "writes": writes,
            "writes_into_op": writes - op_writes, "op": OPS[code] if code < len(OPS) else "?",
            "phase": ("idle", "op", "sync")[phase] if phase < 3 else "?"}


class Status:
    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(fd, 4096)
        self.map = mmap.mmap(fd, 4096, flags=mmap.MAP_SHARED)
        os.close(fd)
        self.started = self.finished = self.writes = self.op_writes = 0
        self.code = 0
        self.phase = PHASE_IDLE
        self.store()

    def store(self) -> None:
        STATUS.pack_into(self.map, 0, self.started, self.finished, self.writes, self.op_writes,
                         self.code, self.phase)

    def begin(self, op: str) -> None:
        self.started += 1
        self.code = OP_CODE[op]
        self.op_writes = self.writes
        self.phase = PHASE_OP
        self.store()

    def end(self) -> None:
        self.finished += 1
        self.phase = PHASE_IDLE
        self.store()

    def in_sync(self, on: bool) -> None:
        self.phase = PHASE_SYNC if on else PHASE_OP
        self.store()


# -- hooks on the device ----------------------------------------------------------------------
def hook_memory_writes(before: Callable[[object, int, str], None]) -> None:
    """Call ``before(data, offset, method)`` ahead of every store into a memory device.

    Stores go through ``MemoryDevice.write`` and, for freshly allocated blocks,
    ``MemoryDevice.write_new`` (which may store through ``pwrite`` instead of the mapping and
    may call ``write`` itself: such a store counts once). ``--trace`` checks that nothing else
    changes the image.
    """
    original = MemoryDevice.write
    original_new = getattr(MemoryDevice, "write_new", None)
    inside = [False]

    def write(self: MemoryDevice, data: bytes | bytearray | memoryview, offset: int) -> None:
        if not inside[0]:
            before(data, offset, "write")
        original(self, data, offset)

    def write_new(self: MemoryDevice, data: bytes | bytearray | memoryview, offset: int) -> None:
        if inside[0]:
            original_new(self, data, offset)
            return
        before(data, offset, "write_new")
        inside[0] = True
        try:
            original_new(self, data, offset)
        finally:
            inside[0] = False

    MemoryDevice.write = write  # type: ignore[method-assign]
    if original_new is not None:
        MemoryDevice.write_new = write_new  # type: ignore[method-assign]


def crash_after(n: int) -> None:
    """SIGKILL this process just before device write ``n + 1``."""
    count = 0

    def before(data: object, offset: int, method: str) -> None:
        nonlocal count
        if count == n:
            os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(60)          # never reached: SIGKILL is not deferred
        count += 1

    hook_memory_writes(before)


# -- random mode ------------------------------------------------------------------------------
def tag_of(name: str) -> int | None:
    """The tag byte of a file name ``f<seq>.<hh>`` (None for any other name)."""
    if name.startswith("f") and len(name) > 3 and name[-3] == ".":
        try:
            return int(name[-2:], 16)
        except ValueError:
            return None
    return None


class RandomWorker:
    def __init__(self, fs: xipfs.Filesystem, rng: random.Random, log: str, status: Status) -> None:
        self.fs = fs
        self.rng = rng
        self.status = status
        self.log_fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.seq = 0
        self.ntag = 0
        self.bs = fs.block_size
        apb = self.bs // 4
        #: sizes that straddle the indirect and double-indirect boundaries
        self.edges = [12 * self.bs, (12 + apb) * self.bs]
        self.files: list[str] = []
        self.dirs: list[str] = [ROOT]
        self.links: list[str] = []
        self.durables = 0

    # helpers
    def name(self, prefix: str) -> str:
        self.seq += 1
        return f"{prefix}{self.seq}"

    def new_tag(self) -> int:
        self.ntag += 1
        return self.ntag % 255 + 1            # 1..255, never 0 (zeros are holes)

    def moved(self, old: str, new: str) -> None:
        """Directory ``old`` is now ``new``: rename everything below it in the lists."""
        def fix(path: str) -> str:
            return new + path[len(old):] if path == old or path.startswith(old + "/") else path
        self.files = [fix(p) for p in self.files]
        self.dirs = [fix(p) for p in self.dirs]
        self.links = [fix(p) for p in self.links]

    def size_goal(self) -> int:
        rng = self.rng
        r = rng.random()
        if r < 0.4:
            return min(MAX_FILE, rng.choice(self.edges) + rng.randint(-3 * self.bs, 3 * self.bs))
        if r < 0.55:
            return rng.randint(0, 4 * self.bs)
        return rng.randint(0, MAX_FILE)

    def free_fraction(self) -> float:
        # live counts (statvfs reports the superblock's counts, refreshed only by sync)
        vol = self.fs.volume
        return vol.balloc.free_blocks() / vol.sb.s_blocks_count

    def pick_file(self) -> str | None:
        return self.rng.choice(self.files) if self.files else None

    def write_tagged(self, f, tag: int, pos: int, n: int) -> None:
        """Write ``n`` tag bytes at ``pos`` in one to three pieces."""
        pieces = self.rng.randint(1, 3)
        cuts = sorted(self.rng.randint(0, n) for _ in range(pieces - 1))
        bounds = [0, *cuts, n]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if b > a:
                f.pwrite(bytes([tag]) * (b - a), pos + a)

    # the operations
    def op_create(self) -> None:
        tag = self.new_tag()
        d = self.rng.choice(self.dirs)
        path = f"{d}/{self.name('f')}.{tag:02x}"
        self.files.append(path)
        with self.fs.open(path, "xb", buffering=0) as f:
            self.write_tagged(f, tag, 0, self.size_goal())

    def op_overwrite(self) -> None:
        path = self.pick_file()
        if path is None:
            return
        size = self.fs.stat(path).st_size
        pos = self.rng.randint(0, size)
        n = self.rng.randint(0, min(MAX_FILE - pos, 64 * 1024)) if pos < MAX_FILE else 0
        with self.fs.open(path, "r+b", buffering=0) as f:
            self.write_tagged(f, tag_of(path.rsplit("/", 1)[1]), pos, n)

    def op_append(self) -> None:
        path = self.pick_file()
        if path is None:
            return
        size = self.fs.stat(path).st_size
        if size >= MAX_FILE:
            return
        n = self.rng.randint(1, min(MAX_FILE - size, 3 * self.bs + 17))
        with self.fs.open(path, "ab", buffering=0) as f:
            f.write(bytes([tag_of(path.rsplit("/", 1)[1])]) * n)

    def op_pwrite_hole(self) -> None:
        path = self.pick_file()
        if path is None:
            return
        size = self.fs.stat(path).st_size
        if size >= MAX_FILE - 1:
            return
        pos = self.rng.randint(size + 1, MAX_FILE - 1)
        n = self.rng.randint(1, min(MAX_FILE - pos, 2 * self.bs))
        with self.fs.open(path, "r+b", buffering=0) as f:
            f.pwrite(bytes([tag_of(path.rsplit("/", 1)[1])]) * n, pos)

    def op_truncate(self) -> None:
        path = self.pick_file()
        if path is None:
            return
        size = self.fs.stat(path).st_size
        if self.rng.random() < 0.6:
            new = self.rng.randint(0, size)
            if self.rng.random() < 0.5:
                new = min(size, max(0, self.rng.choice(self.edges) + self.rng.randint(-2, 2) * self.bs
                                    + self.rng.randint(0, self.bs - 1)))
        else:
            new = self.rng.randint(size, MAX_FILE)
        if self.rng.random() < 0.5:
            self.fs.truncate(path, new)
        else:
            with self.fs.open(path, "r+b", buffering=0) as f:
                f.truncate(new)

    def op_mkdir(self) -> None:
        parents = [d for d in self.dirs if d.count("/") < 5]
        path = f"{self.rng.choice(parents)}/{self.name('d')}"
        self.fs.mkdir(path)
        self.dirs.append(path)

    def op_rmdir(self) -> None:
        empty = [d for d in self.dirs if d != ROOT and not self.fs.listdir(d)]
        if not empty:
            return
        path = self.rng.choice(empty)
        self.fs.rmdir(path)
        self.dirs.remove(path)

    def op_unlink(self) -> None:
        # fast symlinks (target below 60 bytes) stay: unlinking one makes xipfs raise
        # (namei.release reads the target in i_block as block pointers; see test_crash.py)
        pool = self.files + [p for p in self.links if len(self.fs.readlink(p)) >= 60]
        if not pool:
            return
        path = self.rng.choice(pool)
        self.fs.unlink(path)
        (self.files if path in self.files else self.links).remove(path)

    def op_rename_file(self) -> None:
        path = self.pick_file()
        if path is None:
            return
        tag = tag_of(path.rsplit("/", 1)[1])
        d = path.rsplit("/", 1)[0] if self.rng.random() < 0.5 else self.rng.choice(self.dirs)
        target = f"{d}/{self.name('f')}.{tag:02x}"
        if self.rng.random() < 0.3:
            # replace a file: a victim of the same tag (so every name keeps telling its tag)
            with self.fs.open(target, "xb", buffering=0) as f:
                self.write_tagged(f, tag, 0, self.rng.randint(0, 20 * self.bs))
            self.files.append(target)
        self.fs.rename(path, target)
        self.files.remove(path)
        if target not in self.files:
            self.files.append(target)

    def op_rename_dir(self) -> None:
        cands = [d for d in self.dirs if d != ROOT]
        if not cands:
            return
        path = self.rng.choice(cands)
        parent = path.rsplit("/", 1)[0]
        target = f"{parent}/{self.name('d')}"
        self.fs.rename(path, target)
        self.moved(path, target)

    def op_move_dir(self) -> None:
        cands = [d for d in self.dirs if d != ROOT]
        if not cands:
            return
        path = self.rng.choice(cands)
        parent = path.rsplit("/", 1)[0]
        targets = [d for d in self.dirs if d != parent and not (d + "/").startswith(path + "/")
                   and d.count("/") < 5]
        if not targets:
            return
        target = f"{self.rng.choice(targets)}/{self.name('d')}"
        self.fs.rename(path, target)
        self.moved(path, target)

    def op_link(self) -> None:
        path = self.pick_file()
        if path is None:
            return
        tag = tag_of(path.rsplit("/", 1)[1])
        target = f"{self.rng.choice(self.dirs)}/{self.name('f')}.{tag:02x}"
        self.fs.link(path, target)
        self.files.append(target)

    def op_symlink(self) -> None:
        rng = self.rng
        if rng.random() < 0.5:
            target = "t" * rng.randint(1, 59)
        else:
            target = "/".join(["long"] * (rng.randint(60, min(self.bs - 1, 900)) // 5 + 1))
            target = target[:rng.randint(60, min(self.bs - 1, 900))]
        path = f"{rng.choice(self.dirs)}/{self.name('s')}"
        self.fs.symlink(target, path)
        self.links.append(path)

    def op_setxattr(self) -> None:
        pool = self.files + self.dirs
        path = self.rng.choice(pool)
        have = self.fs.listxattr(path)
        if len(have) >= 3 and self.rng.random() < 0.7:
            name = self.rng.choice(have)
        else:
            name = f"user.k{self.rng.randint(0, 5)}"
        self.fs.setxattr(path, name, self.rng.randbytes(self.rng.randint(0, 120)))

    def op_removexattr(self) -> None:
        pool = self.files + self.dirs
        path = self.rng.choice(pool)
        have = self.fs.listxattr(path)
        if have:
            self.fs.removexattr(path, self.rng.choice(have))

    def op_chmod(self) -> None:
        pool = self.files + self.dirs
        path = self.rng.choice(pool)
        mode = 0o700 | self.rng.randint(0, 0o77) if path in self.dirs else self.rng.randint(0o400, 0o777)
        self.fs.chmod(path, mode)

    def op_utime(self) -> None:
        pool = self.files + self.dirs + self.links
        path = self.rng.choice(pool)
        t = self.rng.randint(0, 2**31 - 1) * 1_000_000_000 + self.rng.randint(0, 999_999_999)
        self.fs.utime(path, ns=(t, t + 1), follow_symlinks=path not in self.links)

    def op_sync(self) -> None:
        self.status.in_sync(True)
        self.fs.sync()
        self.status.in_sync(False)

    def op_durable(self) -> None:
        if self.durables >= 150:
            return
        rng = self.rng
        size = rng.choice([rng.randint(0, 3 * self.bs), rng.randint(0, 40 * 1024),
                           12 * self.bs + rng.randint(-100, 100)])
        content = rng.randbytes(size)
        self.durables += 1
        name = f"{self.durables:05d}-{hashlib.sha256(content).hexdigest()}"
        path = f"{DURABLE}/{name}"
        try:
            with self.fs.open(path, "xb", buffering=0) as f:
                # written in pieces, out of order, through a detour of wrong bytes and a truncate
                cuts = sorted(rng.randint(0, size) for _ in range(rng.randint(0, 3)))
                bounds = [0, *cuts, size]
                pieces = list(zip(bounds[:-1], bounds[1:], strict=True))
                rng.shuffle(pieces)
                for a, b in pieces:
                    # a write that runs out of space stores what fits and says how much
                    if b > a and (f.pwrite(b"\xee" * (b - a), a) < b - a
                                  or f.pwrite(content[a:b], a) < b - a):
                        raise OSError(errno.ENOSPC, "short write")
                if rng.random() < 0.3:
                    f.truncate(size + rng.randint(0, 5000))
                    f.truncate(size)
                self.status.in_sync(True)
                if rng.random() < 0.5:
                    f.fsync()
                else:
                    self.fs.sync()
                self.status.in_sync(False)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            return
        os.write(self.log_fd, (name + "\n").encode())
        os.fsync(self.log_fd)

    def run(self, fill: bool) -> None:
        names = list(WEIGHTS)
        weights = [WEIGHTS[n] for n in names]
        low = 0.0 if fill else 0.3
        while True:
            op = self.rng.choices(names, weights)[0]
            if not fill and self.free_fraction() < low and op in ("create", "append", "overwrite",
                                                                   "pwrite_hole", "link"):
                op = "unlink" if self.files else "rmdir"
            self.status.begin(op)
            try:
                getattr(self, "op_" + op)()
            except OSError as err:
                if err.errno != errno.ENOSPC or isinstance(err, xipfs.XipfsError):
                    raise
                if fill and self.files and self.rng.random() < 0.5:
                    # make room again: drop a few files
                    for path in self.rng.sample(self.files, min(4, len(self.files))):
                        self.fs.unlink(path)
                        self.files.remove(path)
            self.status.end()


def main_random(argv: list[str]) -> None:
    img, log, status_path, seed = argv[:4]
    file_device = "--file-device" in argv
    fill = "--fill" in argv
    status = Status(status_path)

    def count(data: object, offset: int, method: str) -> None:
        status.writes += 1
        status.store()

    hook_memory_writes(count)
    fs = xipfs.open(img, "r+", xip=False if file_device else None)
    assert fs.is_xip is not file_device
    rng = random.Random(int(seed))
    for d in (ROOT, DURABLE):
        if not fs.exists(d):
            fs.mkdir(d)
    fs.sync()
    worker = RandomWorker(fs, rng, log, status)
    if fill:
        # start near full, so that the operations run out of space within the first few ms
        while worker.free_fraction() > 0.12:
            tag = worker.new_tag()
            path = f"{ROOT}/{worker.name('f')}.{tag:02x}"
            with fs.open(path, "xb", buffering=0) as f:
                f.write(bytes([tag]) * MAX_FILE)
            worker.files.append(path)
    print("ready", flush=True)
    worker.run(fill)


# -- script mode --------------------------------------------------------------------------------
#: The script writes 0xa5, 0x5a and 0xc3 into /f1 (later /d1/f1, /d2/victim, /d2/big), 0x11
#: into the first /d2/victim and 0x22 into /d2/g (also /d1/g2).


def script_ops(fs_box: list, img: str) -> list[tuple[str, Callable[[], None]]]:
    """The scripted sequence: ``(label, action)``; ``fs_box[0]`` is the open filesystem."""

    def fs() -> xipfs.Filesystem:
        return fs_box[0]

    def mount() -> None:
        fs_box[0] = xipfs.open(img, "r+")

    with open(img, "rb") as f:              # the block size, before the image is mounted
        f.seek(1024 + 24)
        block_size = 1024 << struct.unpack("<I", f.read(4))[0]

    def bs() -> int:
        return block_size

    def pwrite(path: str, data: bytes, pos: int) -> None:
        with fs().open(path, "r+b", buffering=0) as f:
            f.pwrite(data, pos)

    def create() -> None:
        fs().open("/f1", "xb", buffering=0).close()

    def write_direct() -> None:
        pwrite("/f1", b"\xa5" * (10 * bs() + 100), 0)

    def write_indirect() -> None:          # from direct blocks into the single-indirect block
        pwrite("/f1", b"\x5a" * (3 * bs()), 11 * bs() - 300)

    def write_dindirect() -> None:         # a hole, then across into the double-indirect tree
        b = bs()
        pwrite("/f1", b"\xc3" * (2 * b), (12 + b // 4) * b - b // 2)

    def append() -> None:                  # one fill of 256 KiB and more (MemoryDevice.write_new)
        with fs().open("/f1", "ab", buffering=0) as f:
            f.write(b"\xa5" * (256 * 1024 + bs() + 10))

    def write_file(path: str, byte: int, n: int) -> Callable[[], None]:
        return lambda: fs().write_bytes(path, bytes([byte]) * n)

    def mkdir(path: str) -> Callable[[], None]:
        return lambda: fs().mkdir(path)

    def rename(a: str, b: str) -> Callable[[], None]:
        return lambda: fs().rename(a, b)

    def unlink(path: str) -> Callable[[], None]:
        return lambda: fs().unlink(path)

    def truncate(path: str, n: Callable[[], int]) -> Callable[[], None]:
        return lambda: fs().truncate(path, n())

    def symlink_long() -> None:
        fs().symlink("/".join(["x" * 9] * 40)[:min(bs() - 1, 399)], "/d1/long")

    def symlink_short() -> None:
        fs().symlink("../f9", "/d1/short")

    def setxattr(path: str, name: str, n: int) -> Callable[[], None]:
        return lambda: fs().setxattr(path, name, bytes(range(n)))

    def removexattr(path: str, name: str) -> Callable[[], None]:
        return lambda: fs().removexattr(path, name)

    def link(a: str, b: str) -> Callable[[], None]:
        return lambda: fs().link(a, b)

    def rmdir(path: str) -> Callable[[], None]:
        return lambda: fs().rmdir(path)

    def chmod() -> None:
        fs().chmod("/d1/g2", 0o640)

    def utime() -> None:
        fs().utime("/d1/g2", ns=(1_000_000_123, 2_000_000_456))

    def sync() -> None:
        fs().sync()

    def close() -> None:
        fs().close()

    return [
        ("mount", mount),
        ("create", create),
        ("write-direct", write_direct),
        ("write-indirect", write_indirect),
        ("write-dindirect", write_dindirect),
        ("append", append),
        ("mkdir", mkdir("/d1")),
        ("mkdir-2", mkdir("/d2")),
        ("mkdir-nested", mkdir("/d1/sub")),
        ("rename-file-across", rename("/f1", "/d1/f1")),
        ("create-victim", write_file("/d2/victim", 0x11, 3000)),
        ("rename-file-replacing", rename("/d1/f1", "/d2/victim")),
        ("rename-file-within", rename("/d2/victim", "/d2/big")),
        ("truncate-down", truncate("/d2/big", lambda: 5 * bs() + 7)),
        ("truncate-up", truncate("/d2/big", lambda: 40 * bs() + 3)),
        ("create-small", write_file("/d2/g", 0x22, 2 * bs() + 1)),
        ("symlink-long", symlink_long),
        ("symlink-short", symlink_short),
        ("setxattr", setxattr("/d2/g", "user.a", 40)),
        ("setxattr-2", setxattr("/d2/g", "user.b", 100)),
        ("removexattr", removexattr("/d2/g", "user.a")),
        ("link", link("/d2/g", "/d1/g2")),
        ("unlink-one-of-two", unlink("/d2/g")),
        ("unlink", unlink("/d2/big")),
        ("mkdir-empty", mkdir("/d2/empty")),
        ("rmdir", rmdir("/d2/empty")),
        ("chmod", chmod),
        ("utime", utime),
        ("rename-dir-within", rename("/d1/sub", "/d1/sub2")),
        ("move-dir-across", rename("/d1/sub2", "/d2/sub3")),
        ("sync", sync),
        ("unmount", close),
    ]


def run_script(img: str, trace: list | None = None) -> None:
    box: list = [None]
    ops = script_ops(box, img)
    current = ["?"]
    if trace is not None:
        def record(data: object, offset: int, method: str) -> None:
            trace.append((current[0], offset, bytes(data), method))
        hook_memory_writes(record)
    for label, action in ops:
        current[0] = label
        action()


def final_names(img: str) -> dict[str, dict[int, str]]:
    """Which path each inode, and each block of a directory or symlink, has at the end."""
    inodes: dict[int, str] = {}
    blocks: dict[int, str] = {}
    with xipfs.open(img) as fs:
        for top, dirs, files in fs.walk("/"):
            inodes[fs.stat(top).st_ino] = top
            for lblk, count, pblk in fs.block_runs(top):
                for i in range(count):
                    blocks[pblk + i] = f"{top} (directory block {lblk + i})"
            for name in dirs + files:
                path = top.rstrip("/") + "/" + name
                inodes.setdefault(fs.lstat(path).st_ino, path)
    return {"inodes": inodes, "blocks": blocks}


def main_script(argv: list[str]) -> None:
    img = argv[0]
    n = os.environ.get(CRASH_ENV)
    if "--trace" in argv:
        out = argv[argv.index("--trace") + 1]
        with open(img, "rb") as f:
            shadow = bytearray(f.read())
        trace: list = []
        run_script(img, trace)
        for _, offset, data, _ in trace:
            shadow[offset:offset + len(data)] = data
        with open(img, "rb") as f:
            replay_matches = f.read() == bytes(shadow)
        with open(out, "w") as f:
            json.dump({"writes": [(label, offset, len(data)) for label, offset, data, _ in trace],
                       "methods": [method for *_, method in trace],
                       "replay_matches": replay_matches, "names": final_names(img)}, f)
        return
    if n is not None:
        crash_after(int(n))
    run_script(img)


def sparse_chunks(path: str, chunk: int = 64 * 1024) -> tuple[int, list[tuple[int, bytes]]]:
    """The size of file ``path`` and its chunks that are not all zeros."""
    with open(path, "rb") as f:
        data = f.read()
    zero = bytes(chunk)
    return len(data), [(i, data[i:i + chunk]) for i in range(0, len(data), chunk)
                       if data[i:i + chunk] != zero[:len(data[i:i + chunk])]]


def restore(img: str, size: int, chunks: list[tuple[int, bytes]]) -> None:
    """Make ``img`` a copy of the pristine image again: drop every page, rewrite what is not zero.

    Much cheaper than copying 16 MiB (tmpfs gives the pages back and hands out zeros).
    """
    fd = os.open(img, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, 0)
        os.ftruncate(fd, size)
        for offset, data in chunks:
            os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def main_sweep(argv: list[str]) -> None:
    img, pristine = argv[:2]
    size, chunks = sparse_chunks(pristine)
    for line in sys.stdin:
        n = int(line)
        restore(img, size, chunks)
        pid = os.fork()
        if pid == 0:
            try:
                crash_after(n)
                run_script(img)
            except BaseException:
                import traceback

                traceback.print_exc()
                os._exit(3)
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
            reply = f"{n} killed"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            reply = f"{n} done"
        else:
            reply = f"{n} failed {status}"
        print(reply, flush=True)


def main(argv: list[str]) -> None:
    mode, rest = argv[0], argv[1:]
    {"random": main_random, "script": main_script, "sweep": main_sweep}[mode](rest)


if __name__ == "__main__":
    main(sys.argv[1:])
