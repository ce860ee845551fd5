"""Differential POSIX conformance of the FUSE door: every scenario against Linux's own ext2.

In the spirit of pjdfstest (not available here): a table of small scripted syscall scenarios
(tests/posix_ops.py records them), each run twice, in a fresh directory on the xipfs FUSE mount
(read-write, the image on /dev/shm) and in one on a loop mount of an ext2 image made by mke2fs
with ``xipfs.mkfs``'s defaults (4 KiB blocks, 256-byte inodes, sparse_super, large_file,
filetype, ext_attr, dir_index, no resize_inode; the same size). Each step's outcome (a value or
an errno name) and the mode, links, owner, group and size of the watched names after it must be
the same; times only as relations ("ctime moved").

Which Linux driver serves the loop mount is recorded in every failure message: a kernel built
with CONFIG_EXT4_USE_FOR_EXT2 (this machine's) mounts ext2 with the ext4 driver, which answers a
few calls differently from fs/ext2 (hole punching, RENAME_EXCHANGE, oversized xattrs). Those
steps name fs/ext2's answer too (``alt``), and xipfs may give either; everything else is
compared with what the loop mount actually did.

The xipfs server is started by ``xipfs.fuse.mount(img, mp, foreground=False,
options="allow_other")`` under umask 077, so a server that applied its own umask shows; the
loop mount lets every user in too, hence allow_other. Root only (loop mounts, other users).
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import posix_ops as P
import pytest
from e2fs import dumpe2fs, fsck, mkfs
from posix_ops import Tracer, creat, given_dir, given_file, lbrief

import xipfs
from xipfs import fuse as xfuse

BIG = 64 << 20
SMALL = 4 << 20                    # runs out of space part-way through an 8 MiB write
NOBODY = 65534
OTHER_GROUP = 65533                # a group the unprivileged user is not in
SERVER_UMASK = 0o077
MOUNT_TIMEOUT = 15.0


# -- the two mounts ---------------------------------------------------------------------------------
@dataclass
class Side:
    name: str
    img: str
    mp: str
    driver: str = "xipfs"


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, timeout=60)


def _loop_driver(mp: str) -> str:
    """``ext4`` when the ext4 driver serves the loop mount (CONFIG_EXT4_USE_FOR_EXT2), else ``ext2``."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == mp:
                source = fields[fields.index("-") + 2]
                dev = os.path.basename(source)
                return "ext4" if os.path.isdir(f"/sys/fs/ext4/{dev}") else "ext2"
    return "unknown"


def _holders(path: str) -> list[int]:
    """Processes with ``path`` open."""
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                    pids.append(int(pid))
                    break
        except OSError:
            continue
    return pids


def _unmount(side: Side) -> None:
    """Unmount; for xipfs, wait until the server let go of the image (it closes it clean)."""
    command = ["fusermount3", "-u", side.mp] if side.driver == "xipfs" else ["umount", side.mp]
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while os.path.ismount(side.mp):
        if _run(command).returncode != 0:
            if time.monotonic() > deadline:
                _run(command[:-1] + ["-z" if side.driver == "xipfs" else "-l", side.mp])
                break
            time.sleep(0.05)
    while side.driver == "xipfs" and _holders(side.img) and time.monotonic() < deadline:
        time.sleep(0.05)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root (loop mounts, other users)"
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse does not exist"
    for tool in ("fusermount3", "mke2fs", "e2fsck", "mount", "umount"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return xfuse.fuse_available()


@pytest.fixture(scope="module")
def sides() -> Iterator[dict[str, tuple[Side, Side]]]:
    """``{"big": (xipfs, linux), "small": (xipfs, linux)}``, mounted for the module."""
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    work = tempfile.mkdtemp(prefix="xipfs-posix-", dir="/dev/shm")
    mounted: list[Side] = []
    pairs: dict[str, tuple[Side, Side]] = {}
    try:
        for kind, size in (("big", BIG), ("small", SMALL)):
            ours = Side("xipfs", f"{work}/{kind}-xipfs.img", f"{work}/{kind}-xipfs")
            linux = Side("linux", f"{work}/{kind}-linux.img", f"{work}/{kind}-linux")
            for s in (ours, linux):
                os.mkdir(s.mp)
            mkfs(linux.img, f"{size >> 10}k", bs=4096, isize=256, extra=("-O", "^resize_inode"))
            proc = _run(["mount", "-o", "loop", "-t", "ext2", linux.img, linux.mp])
            if proc.returncode != 0:
                pytest.skip(f"mount -o loop failed: {proc.stderr.decode(errors='replace').strip()}")
            mounted.append(linux)
            linux.driver = _loop_driver(linux.mp)
            xipfs.mkfs(ours.img, size)
            old = os.umask(SERVER_UMASK)
            try:
                xfuse.mount(ours.img, ours.mp, foreground=False, options="allow_other")
            except (OSError, RuntimeError) as err:
                pytest.skip(f"the xipfs FUSE mount failed: {err}")
            finally:
                os.umask(old)
            mounted.append(ours)
            pairs[kind] = (ours, linux)
        yield pairs
    finally:
        for s in mounted:
            if os.path.ismount(s.mp):
                _unmount(s)
        shutil.rmtree(work, ignore_errors=True)


def _features(img: str) -> tuple[str, str]:
    out = dumpe2fs(img, "-h")
    lines = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    return (" ".join(sorted(lines.get("Filesystem features", "").split())),
            " ".join(sorted(lines.get("Default mount options", "").split())))


# -- the scenarios ----------------------------------------------------------------------------------
SCENARIOS: dict[str, tuple[Callable[[Tracer], None], str]] = {}


def scenario(name: str, image: str = "big") -> Callable[[Callable[[Tracer], None]], Callable[[Tracer], None]]:
    def register(fn: Callable[[Tracer], None]) -> Callable[[Tracer], None]:
        SCENARIOS[name] = (fn, image)
        return fn
    return register


def _modes(mask: int) -> Callable[[Tracer], None]:
    def run(t: Tracer) -> None:
        t.umask(mask)
        t.watch(".", "f", "x", "d", "ds", "dg", "p", "p2", "l", "c")
        t.do(creat, "f", 0o666)
        t.do(creat, "x", 0o777, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        t.do(os.mkdir, "d", 0o777)
        t.do(os.mkdir, "ds", 0o1777)
        t.do(os.mkdir, "dg", 0o2777)           # S_ISGID of mkdir's mode comes from the parent only
        t.do(os.mkfifo, "p", 0o666)
        t.do(os.mknod, "p2", stat.S_IFIFO | 0o644)
        t.do(os.symlink, "f", "l")
        t.do(os.mknod, "c", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return run


for _mask in (0o000, 0o022, 0o077):
    scenario(f"create-modes-umask-{_mask:03o}")(_modes(_mask))


@scenario("setgid-directory-inheritance")
def _sgid_dir(t: Tracer) -> None:
    t.watch("g", "g/f", "g/sub", "g/sub/f2", "g2", "g2/fu", "g2/du", "g/fu")
    given_dir("g")
    given_dir("g2")
    t.do(os.chown, "g", 0, NOBODY)
    t.do(os.chmod, "g", 0o2775)
    t.do(os.chown, "g2", 0, OTHER_GROUP)
    t.do(os.chmod, "g2", 0o2777)
    t.do(creat, "g/f", 0o2755)                # root: CAP_FSETID keeps S_ISGID
    t.do(os.mkdir, "g/sub", 0o755)            # a new directory inherits the group and S_ISGID
    t.do(creat, "g/sub/f2", 0o644)
    t.become(NOBODY, NOBODY)
    t.do(creat, "g/fu", 0o2775)               # a member of the directory's group: S_ISGID kept
    t.do(creat, "g2/fu", 0o2755)              # not a member: the group is inherited, S_ISGID not
    t.do(os.mkdir, "g2/du", 0o755)


@scenario("chmod-chown-setid-as-user")
def _setid_user(t: Tracer) -> None:
    t.watch("f0", "f1", "rf")
    given_file("f0", 0o644)
    os.chown("f0", NOBODY, 0)
    given_file("f1", 0o644)
    os.chown("f1", NOBODY, NOBODY)
    given_file("rf", 0o644)
    t.become(NOBODY, NOBODY)
    t.do(os.chmod, "f0", 0o2755)              # not in group 0: S_ISGID dropped silently
    t.do(os.chmod, "f1", 0o2755)
    t.do(os.chmod, "f1", 0o6755)
    t.do(os.chown, "f1", NOBODY, -1, times=True)   # to itself: allowed, clears S_ISUID/S_ISGID
    t.do(os.chmod, "f1", 0o6755)
    t.do(os.chown, "f1", -1, NOBODY)
    t.do(os.chown, "f1", -1, 0)               # not a member: EPERM
    t.do(os.chown, "f1", 0, -1)
    t.do(os.chmod, "rf", 0o600)
    t.do(os.chown, "rf", NOBODY, -1)
    t.do(os.utime, "rf", ns=(10**9, 10**9))   # not the owner: EPERM
    t.do(os.utime, "rf")                       # no write permission either: EACCES


@scenario("chown-as-root-clears-setid")
def _chown_root(t: Tracer) -> None:
    t.watch("c1", "c2", "c3", "c4", "d")
    for name, mode in (("c1", 0o6755), ("c2", 0o2755), ("c3", 0o2745), ("c4", 0o4700)):
        creat(name, 0o600)
        os.chmod(name, mode)
    given_dir("d")
    os.chmod("d", 0o6755)
    t.do(os.chown, "c1", -1, -1, times=True)   # even a chown that changes nothing
    t.do(os.chown, "c2", NOBODY, NOBODY)
    t.do(os.chown, "c3", NOBODY, NOBODY)      # S_ISGID without group exec stays
    t.do(os.chown, "c4", 0, 0)
    t.do(os.chown, "d", NOBODY, NOBODY)       # directories keep theirs


@scenario("write-truncate-clears-setid")
def _write_setid(t: Tracer) -> None:
    t.watch("w1", "w2", "w3", "w4", "w5")
    for name, mode, owner in (("w1", 0o6755, NOBODY), ("w2", 0o2745, NOBODY), ("w3", 0o6777, 0),
                              ("w4", 0o6755, 0), ("w5", 0o6755, NOBODY)):
        creat(name, 0o600, data=b"0123456789")
        os.chown(name, owner, owner)
        os.chmod(name, mode)
    t.do(P.write_at, "w4", b"root", 0)        # root (CAP_FSETID) keeps them
    t.become(NOBODY, NOBODY)
    t.do(P.write_at, "w1", b"user", 0)
    t.do(P.write_at, "w2", b"user", 0)        # S_ISGID without group exec stays
    t.do(P.write_at, "w3", b"user", 0)
    t.do(os.truncate, "w5", 3)


@scenario("deep-tree-long-names")
def _deep(t: Tracer) -> None:
    name = "d" * 250
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(17):
        os.mkdir(name, dir_fd=fd)
        os.chmod(name, 0o755, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    t.do(os.stat, "missing", dir_fd=fd)                        # ENOENT, not ENAMETOOLONG
    t.do(creat, "x" * 255, dir_fd=fd)
    t.do(lbrief, "x" * 255, dir_fd=fd)
    t.do(creat, "y" * 256, dir_fd=fd)
    t.do(os.stat, "y" * 256, dir_fd=fd)
    t.do(os.mkdir, "z" * 256, dir_fd=fd)
    t.do(lbrief, ".", dir_fd=fd)
    t.do(lbrief, "..", dir_fd=fd)
    os.close(fd)
    head = "/".join([name] * 16)                               # 4015 bytes
    t.do(os.stat, head + "/" + "m" * 79, label="stat(<path of 4095 bytes, last name missing>)")
    t.do(os.stat, head + "/" + "m" * 80, label="stat(<path of 4096 bytes>)")
    t.do(lbrief, head, label="lstat(<16 levels, 4015 bytes>)")
    for _ in range(17):                                        # the same made by chdir
        given_dir("e" * 250)
        os.chdir("e" * 250)
    t.do(os.stat, "missing")
    t.do(creat, "f" * 255, 0o640)
    t.do(lbrief, "f" * 255)
    t.do(os.rename, "f" * 255, "g" * 256)
    t.do(lbrief, ".")
    t.do(lbrief, "..")


@scenario("hard-links")
def _links(t: Tracer) -> None:
    data = b"0123456789" * 410
    given_file("a", 0o644, data=data)
    given_dir("dir")
    os.symlink("a", "sl")
    t.watch("a", "b", "c", "hl")
    fd_a = os.open("a", os.O_RDWR)
    m = mmap.mmap(fd_a, 4096, mmap.MAP_SHARED, mmap.PROT_READ)
    t.note("mmap of a, bytes 98..108, before", m[98:108])
    t.do(os.pread, fd_a, 10, 98)
    t.do(os.link, "a", "b", times=True)
    t.do(os.chmod, "b", 0o600)
    fd_b = os.open("b", os.O_WRONLY)
    t.do(os.pwrite, fd_b, b"HELLO", 100)
    t.do(os.pread, fd_a, 10, 98, label="pread(fd opened on a before the write, 10, 98)")
    t.note("mmap of a, bytes 98..108, after the write through b", m[98:108])
    t.do(P.read_file, "a")
    t.do(lambda: os.fstat(fd_a).st_nlink, label="fstat(fd on a).st_nlink")
    t.do(os.rename, "a", "b")                 # two names of one inode: nothing happens
    t.do(os.link, "b", "c")
    t.do(os.unlink, "a", times=True)
    t.do(lambda: os.fstat(fd_a).st_nlink, label="fstat(fd on a).st_nlink")
    t.do(os.link, "dir", "dl")
    t.do(os.link, "missing", "m2")
    t.do(os.link, "b", "c")
    t.do(os.link, "sl", "hl", follow_symlinks=False)
    t.do(os.readlink, "hl")
    m.close()
    os.close(fd_a)
    os.close(fd_b)


@scenario("rename")
def _rename(t: Tracer) -> None:
    given_file("f1", data=b"one")
    given_file("f2", data=b"two")
    given_file("f3")
    for d in ("d1", "d2", "d3", "d4", "d4/sub", "p1", "p2", "p1/c", "e1", "e2"):
        given_dir(d)
    given_file("d3/x")
    t.watch(".", "f1", "f2", "d1", "d2", "d3", "p1", "p2", "p2/c")
    t.do(os.rename, "f1", "f2", times=True)
    t.do(P.read_file, "f2")
    t.do(os.rename, "d1", "d2")
    t.do(os.rename, "f2", "d3")
    t.do(os.rename, "d2", "f3")
    t.do(os.rename, "d2", "d3")
    t.do(os.rename, "d4", "d4/sub/x")
    t.do(os.rename, "d4", "d4")
    t.do(os.rename, ".", "x")
    t.do(os.rename, "missing", "x")
    t.do(os.rename, "p1/c", "p2/c", times=True)
    t.do(lambda: os.stat("p2/c/..").st_ino == os.stat("p2").st_ino, label="p2/c/.. is p2")
    t.do(P.renameat2, "f3", "f2", P.RENAME_NOREPLACE)
    t.do(P.renameat2, "f3", "new", P.RENAME_NOREPLACE)

    def exchange() -> tuple[bool, bool]:
        P.renameat2("e1", "new", P.RENAME_EXCHANGE)
        return os.path.isdir("new"), os.path.isfile("e1")

    t.do(exchange, label="renameat2(e1, new, RENAME_EXCHANGE): new is a dir, e1 a file",
         alt={"ext2": "EINVAL"})                # fs/ext2 knows only RENAME_NOREPLACE

    def cross() -> tuple[bool, bool, bool, int, int]:
        P.renameat2("p2/c", "e1", P.RENAME_EXCHANGE)      # a directory and a file trade parents
        return (os.path.isfile("p2/c"), os.path.isdir("e1"),
                os.stat("e1/..").st_ino == os.stat(".").st_ino, os.stat("p2").st_nlink,
                os.stat(".").st_nlink)

    t.do(cross, label="renameat2(p2/c, e1, RENAME_EXCHANGE): parents, '..' and link counts",
         times=True, alt={"ext2": "EINVAL"})
    t.do(P.renameat2, "e1", "e1/x", P.RENAME_EXCHANGE, alt={"ext2": "EINVAL"})
    t.do(P.renameat2, "e1", "gone", P.RENAME_EXCHANGE)


@scenario("remove-and-make-errors")
def _errors(t: Tracer) -> None:
    given_dir("d")
    given_file("d/f")
    given_file("f")
    t.watch(".", "d", "f", "d/f")
    t.do(os.rmdir, "d")
    t.do(os.unlink, "d")
    t.do(os.link, "d", "e")
    t.do(os.rmdir, "f")
    t.do(os.rmdir, ".")
    t.do(os.rmdir, "missing")
    t.do(os.mkdir, "d")
    t.do(os.mkdir, "f/x")
    t.do(creat, "f/x")
    t.do(os.stat, "f/")
    t.do(creat, "d/", 0o644)
    t.do(os.symlink, "x", "f")
    t.do(os.mkfifo, "d")
    t.do(os.unlink, "d/f", times=True)
    t.do(os.rmdir, "d", times=True)


@scenario("xattrs")
def _xattrs(t: Tracer) -> None:
    given_file("f")
    os.mkfifo("p")
    os.chmod("p", 0o644)
    os.symlink("f", "l")
    given_dir("d")
    t.watch("f", "p", "l", "d")
    t.do(os.setxattr, "f", "user.a", b"1", times=True)
    t.do(os.getxattr, "f", "user.a")
    t.do(lambda: sorted(os.listxattr("f")), label="listxattr(f)")
    t.do(os.setxattr, "p", "user.a", b"1")
    t.do(os.getxattr, "p", "user.a")
    t.do(os.setxattr, "l", "user.a", b"1", follow_symlinks=False)
    t.do(os.getxattr, "l", "user.a", follow_symlinks=False)
    t.do(lambda: sorted(os.listxattr("l", follow_symlinks=False)), label="listxattr(l, nofollow)")
    t.do(os.setxattr, "d", "user.a", b"dir")
    t.do(os.setxattr, "f", "user.a", b"2", os.XATTR_CREATE)
    t.do(os.setxattr, "f", "user.b", b"2", os.XATTR_REPLACE)
    t.do(os.removexattr, "f", "user.missing")
    t.do(os.setxattr, "f", "trusted.t", b"t")
    t.do(os.setxattr, "l", "trusted.t", b"t", follow_symlinks=False)
    t.do(os.setxattr, "f", "user.big", b"v" * 3000)
    t.do(os.setxattr, "f", "user.huge", b"v" * 5000, alt={"ext2": "ERANGE"})
    t.do(os.removexattr, "f", "user.a", times=True)
    t.do(lambda: sorted(os.listxattr("f")), label="listxattr(f)")
    t.become(NOBODY, NOBODY)
    t.do(os.setxattr, "f", "user.c", b"1")


@scenario("truncate-utimes-chown-times")
def _times(t: Tracer) -> None:
    given_file("f", data=b"x" * 100)
    os.symlink("f", "l")
    t.watch("f", "l")
    t.do(os.truncate, "f", 50, times=True)
    # the same size: ext4 marks mtime and ctime whenever the file does not shrink, fs/ext2 only
    # when the size changes (POSIX requires it only then)
    t.do(os.truncate, "f", 50, times=True, alt={"ext2": {"times": {"f": "=", "l": "="}}})
    fd = os.open("f", os.O_RDWR)
    t.do(os.ftruncate, fd, 50, times=True)
    t.do(os.ftruncate, fd, 5000, times=True)
    t.do(os.pread, fd, 8, 4990)
    os.close(fd)
    t.do(os.utime, "f", ns=(1_000_000_123, 2_000_000_456), times=True)
    t.do(lambda: (os.stat("f").st_atime_ns, os.stat("f").st_mtime_ns), label="atime, mtime")
    t.do(os.utime, "f", times=True)
    t.do(lambda: os.stat("f").st_mtime_ns > 2_000_000_456, label="mtime now")
    t.do(P.utimensat, "f", (0, P.UTIME_OMIT), (3, 789), times=True)
    t.do(lambda: (os.stat("f").st_atime_ns == 1_000_000_123, os.stat("f").st_mtime_ns),
         label="atime kept, mtime set")
    t.do(os.utime, "l", ns=(5, 6), follow_symlinks=False, times=True)
    t.do(lambda: os.lstat("l").st_mtime_ns, label="lstat(l).st_mtime_ns")
    t.do(os.chown, "f", 0, 0, times=True)
    t.do(os.chmod, "f", 0o644, times=True)
    t.do(os.rename, "f", "g", times=True)
    t.do(lambda: lbrief("g"), label="lstat(g)")


@scenario("open-flags")
def _open_flags(t: Tracer) -> None:
    given_file("f", data=b"0123456789")
    given_file("empty")
    os.symlink("target", "dangling")
    given_dir("d")
    t.watch("f", "empty", "target", "d")
    t.do(creat, "f", 0o600, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    t.do(creat, "dangling", 0o600, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    t.do(creat, "dangling", 0o600, os.O_WRONLY | os.O_CREAT)     # creates the target
    t.do(creat, "f", 0o600, os.O_WRONLY | os.O_TRUNC, times=True)
    t.do(creat, "empty", 0o600, os.O_WRONLY | os.O_TRUNC, times=True)
    fd = os.open("f", os.O_WRONLY | os.O_APPEND)
    t.do(os.write, fd, b"ab")
    os.lseek(fd, 0, os.SEEK_SET)
    t.do(os.write, fd, b"cd")
    t.do(os.pwrite, fd, b"ZZ", 0)              # O_APPEND wins over the offset on Linux
    os.close(fd)
    t.do(P.read_file, "f")
    t.do(creat, "f", 0o600, os.O_RDONLY | os.O_DIRECTORY)
    t.do(creat, "d", 0o600, os.O_WRONLY)
    t.do(creat, "d", 0o600, os.O_WRONLY | os.O_CREAT)
    t.do(creat, "dangling", 0o600, os.O_RDONLY | os.O_NOFOLLOW)
    t.do(creat, "new0", 0, os.O_RDWR | os.O_CREAT | os.O_EXCL, data=b"w")
    t.do(lbrief, "new0")
    os.chmod("f", 0o444)
    t.do(creat, "f", 0o600, os.O_WRONLY)       # root
    os.chmod(".", 0o777)
    t.become(NOBODY, NOBODY)
    t.do(creat, "f", 0o600, os.O_WRONLY)
    t.do(creat, "mine", 0o640, data=b"u")
    t.do(lbrief, "mine")


@scenario("sticky-directory")
def _sticky(t: Tracer) -> None:
    given_dir("st")
    os.chmod("st", 0o1777)
    given_file("st/rf", 0o666)
    t.watch("st", "st/rf", "st/uf")
    t.become(NOBODY, NOBODY)
    t.do(os.unlink, "st/rf")
    t.do(os.rename, "st/rf", "st/x")
    t.do(P.write_at, "st/rf", b"w", 0)
    t.do(creat, "st/uf", 0o600)
    t.do(os.rename, "st/uf", "st/rf")
    t.do(os.unlink, "st/uf")


@scenario("times-after-write-back")
def _write_back(t: Tracer) -> None:
    def write_and_stat(name: str) -> tuple[int, int]:
        creat(name, 0o644, data=b"data")
        st = os.stat(name)
        return st.st_mtime_ns, st.st_ctime_ns

    def drop_and_compare(name: str, before: tuple[int, int]) -> tuple[bool, bool]:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")                        # forget dentries and inodes: stat asks again
        st = os.stat(name)
        return st.st_mtime_ns == before[0], st.st_ctime_ns == before[1]

    for name in ("a", "b"):
        before = write_and_stat(name)
        time.sleep(P.TICK)
        t.do(drop_and_compare, name, before,
             label=f"write {name}, close, stat; drop cached inodes: mtime, ctime the same")
    fd = os.open("a", os.O_WRONLY)
    os.write(fd, b"more")
    st = os.fstat(fd)
    os.fsync(fd)
    time.sleep(P.TICK)
    t.do(lambda: (os.fstat(fd).st_mtime_ns == st.st_mtime_ns, os.fstat(fd).st_ctime_ns == st.st_ctime_ns),
         label="write, fstat, fsync: mtime, ctime the same")
    os.close(fd)


@scenario("o-direct-out-of-space", image="small")
def _o_direct(t: Tracer) -> None:
    size = 8 << 20
    buf = mmap.mmap(-1, size)                  # page-aligned, as O_DIRECT wants
    buf.write(b"\xa5" * size)
    free0 = os.statvfs(".").f_bfree
    fd = os.open("big", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)

    def write(view: memoryview) -> str:
        try:
            n = os.write(fd, view)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            return "ran out (ENOSPC or a short count)"
        return "complete" if n == len(view) else "ran out (ENOSPC or a short count)"

    t.do(write, memoryview(buf), label="write(O_DIRECT, 8 MiB) on a 4 MiB file system")
    t.do(lambda: os.fstat(fd).st_size % 4096 == 0 and os.fstat(fd).st_size < size,
         label="size is whole blocks and short of 8 MiB")
    t.do(write, memoryview(buf)[:1 << 20], label="write(O_DIRECT, 1 MiB) again")
    os.close(fd)
    t.do(os.unlink, "big")

    def freed() -> bool:
        deadline = time.monotonic() + 1.0       # FUSE sends FORGET asynchronously
        while os.statvfs(".").f_bfree != free0 and time.monotonic() < deadline:
            time.sleep(0.01)
        return os.statvfs(".").f_bfree == free0

    t.do(freed, label="free blocks back (within 1 s)")
    buf.close()


@scenario("fallocate")
def _fallocate(t: Tracer) -> None:
    given_file("f", data=b"x" * 16384)
    t.watch("f")
    fd = os.open("f", os.O_RDWR)

    def punch() -> tuple:
        blocks = os.fstat(fd).st_blocks
        P.fallocate(fd, P.FALLOC_FL_PUNCH_HOLE | P.FALLOC_FL_KEEP_SIZE, 4096, 4096)
        return (os.pread(fd, 4096, 4096) == bytes(4096), os.pread(fd, 4, 8192),
                blocks - os.fstat(fd).st_blocks)

    t.do(punch, label="fallocate(PUNCH_HOLE|KEEP_SIZE, 4096, 4096): hole reads 0, next, blocks freed",
         alt={"ext2": errno.errorcode[errno.EOPNOTSUPP]})
    t.do(P.fallocate, fd, 0, 0, 1 << 20)       # no fallocate for files without extents
    t.do(P.fallocate, fd, P.FALLOC_FL_KEEP_SIZE, 0, 1 << 20)
    t.do(P.fallocate, fd, P.FALLOC_FL_PUNCH_HOLE, 0, 4096)       # PUNCH_HOLE needs KEEP_SIZE
    os.close(fd)


@scenario("inode-flags-ioctl")
def _flags(t: Tracer) -> None:
    given_file("f", data=b"abc")
    given_dir("d")
    t.watch("f", "d")
    t.do(P.getflags, "f")
    t.do(P.getflags, "d")
    # chattr +A (noatime). Linux moves ctime. With FUSE's writeback cache the kernel keeps a
    # regular file's ctime itself and takes none from the server, and nothing in the kernel
    # moves it for FS_IOC_SETFLAGS: the one known difference of that cache (README, FUSE).
    t.do(P.setflags, "f", 0x80, times=True, alt={"xipfs-writeback-cache": {"times": {"f": "=", "d": "="}}})
    t.do(P.getflags, "f")
    t.do(P.setflags, "f", 0x20)                # +a (append only)
    t.do(creat, "f", 0o644, os.O_WRONLY)
    t.do(creat, "f", 0o644, os.O_WRONLY | os.O_APPEND, data=b"d")
    t.do(os.truncate, "f", 0)
    t.do(os.unlink, "f")
    t.do(P.setflags, "f", 0x10)                # +i (immutable)
    t.do(P.getflags, "f")
    t.do(os.chmod, "f", 0o600)
    t.do(os.rename, "f", "g")
    t.do(os.link, "f", "h")
    t.do(os.utime, "f", ns=(1, 1))
    t.do(P.setflags, "f", 0)
    t.do(P.getflags, "f")
    t.do(P.setflags, "d", 0x80)
    t.do(P.getflags, "d")
    t.do(P.read_file, "f")


@scenario("symlinks")
def _symlinks(t: Tracer) -> None:
    t.watch("s1", "s2", "s3")
    t.do(os.symlink, "x" * 50, "s1")           # fast (in the inode)
    t.do(os.symlink, "y" * 200, "s2")          # slow (a block)
    t.do(os.symlink, "z" * 4095, "s3")
    t.do(os.symlink, "z" * 4096, "s4")
    t.do(os.readlink, "s2")
    t.do(os.symlink, "s5", "s5")
    t.do(os.stat, "s5")
    t.do(os.chmod, "s1", 0o600, follow_symlinks=False)


# -- the tests ---------------------------------------------------------------------------------------
def test_same_format(sides: dict[str, tuple[Side, Side]]) -> None:
    """Like with like: the loop image has the features and default mount options of xipfs.mkfs."""
    for ours, linux in sides.values():
        assert _features(ours.img) == _features(linux.img)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(sides: dict[str, tuple[Side, Side]], name: str) -> None:
    """The scenario's trace on the xipfs mount equals the one on Linux's loop mount."""
    fn, image = SCENARIOS[name]
    ours, linux = sides[image]
    traces = {}
    for side in (linux, ours):
        cwd = os.path.join(side.mp, name)
        os.mkdir(cwd)
        os.chmod(cwd, 0o777)
        traces[side.name] = P.run_scenario(fn, cwd)
    diff = P.compare(traces["xipfs"], traces["linux"], linux.driver)
    assert diff is None, (f"{name}: xipfs differs from Linux (loop mount served by the "
                          f"{linux.driver} driver)\n{diff}")


def test_images_clean_after_unmount(sides: dict[str, tuple[Side, Side]]) -> None:
    """After every scenario, both images unmount and ``e2fsck -fn`` finds them clean."""
    failures = []
    for pair in sides.values():
        for side in pair:
            _unmount(side)
            assert not os.path.ismount(side.mp)
            rc, out = fsck(side.img)
            if rc != 0:
                failures.append(f"{side.name} {side.img}: e2fsck -fn exited {rc}\n" + out[-3000:])
    assert not failures, "\n".join(failures)
