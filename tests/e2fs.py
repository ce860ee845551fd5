"""e2fsprogs for the tests: the one place that runs mke2fs, e2fsck, debugfs and dumpe2fs.

Every tool runs under ``timeout`` (e2fsck can loop on a damaged image) in the C locale (the
tests read the tools' English output), with its output captured. Images are built here too:
``mkfs`` (mke2fs, optionally ``-d`` from a tree) and ``memory_image`` (``xipfs.mkfs`` on
anonymous memory, for the unit tests of the format layer), and ``write_out`` puts a device's
bytes in a file for the tools to read.

Imported by name from any test module (``pythonpath = ["tests"]`` in pyproject.toml).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
#: Seconds a tool may run before ``timeout`` kills it (exit status 124).
TOOL_TIMEOUT = 120
FSCK_TIMEOUT = 120

#: Lines ``e2fsck -fn`` prints for a clean filesystem; anything else is a problem it found.
#: "last write/mount time is in the future (by less than a day)" is no problem of the image:
#: e2fsck compares with time(2), which glibc reads from the coarse clock, up to a tick behind
#: the clock_gettime(2) time a writer stores; just after a second boundary they differ by one.
_CLEAN_LINE = re.compile(
    r"^(e2fsck \d[\d.]* \(.*\)|Pass \d[A-Z]?: .*|.*: \d+/\d+ files \(.*\), \d+/\d+ blocks"
    r"|Superblock last (write|mount) time is in the future\."
    r"|\s*\(by less than a day, probably due to the hardware clock being incorrectly set\)"
    r"|\s*)$")


# -- running a tool -----------------------------------------------------------------------------
def run(cmd: list[str], *, timeout: int = TOOL_TIMEOUT, check: bool = True, input: bytes | None = None,  # noqa: A002
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run a tool under ``timeout`` in the C locale (``env`` adds variables); raise with its
    output when ``check`` and it fails. stdout and stderr are bytes."""
    proc = subprocess.run(["timeout", str(timeout), *cmd], input=input, capture_output=True,
                          env={**os.environ, "LC_ALL": "C", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                             f"{proc.stdout.decode(errors='replace')}"
                             f"{proc.stderr.decode(errors='replace')}")
    return proc


# -- mke2fs -------------------------------------------------------------------------------------
def mkfs(img: str, size: str, *, bs: int | None = None, isize: int | None = None,
         src: str | bytes | None = None, extra: tuple[str, ...] = (), fstype: str = "ext2",
         env: dict[str, str] | None = None) -> str:
    """``mke2fs -q -F -t TYPE [-b BS] [-I IS] [EXTRA] [-d SRC] IMG SIZE``; returns ``img``.

    mke2fs warns on stderr about 128-byte inodes and y2038; only its exit status matters.
    """
    cmd = ["mke2fs", "-q", "-F", "-t", fstype]
    if bs:
        cmd += ["-b", str(bs)]
    if isize:
        cmd += ["-I", str(isize)]
    cmd += list(extra)
    if src is not None:
        cmd += ["-d", os.fsdecode(src)]
    cmd += [img, size]
    run(cmd, timeout=300, env=env)
    return img


# -- e2fsck -------------------------------------------------------------------------------------
def e2fsck(img: str, *opts: str, timeout: int = FSCK_TIMEOUT) -> tuple[int, str]:
    """``e2fsck OPTS IMG`` under ``timeout``: (exit status, stdout and stderr). 124: it hung."""
    proc = run(["e2fsck", *opts, img], timeout=timeout, check=False)
    return proc.returncode, (proc.stdout + proc.stderr).decode(errors="replace")


def fsck(img: str, *extra: str, timeout: int = FSCK_TIMEOUT) -> tuple[int, str]:
    """``e2fsck -fn [EXTRA] IMG``: (exit status, output); 0 means clean."""
    return e2fsck(img, "-fn", *extra, timeout=timeout)


def fsck_problems(out: str) -> list[str]:
    """The lines of e2fsck output that are not part of a clean run."""
    return [line for line in out.splitlines() if not _CLEAN_LINE.match(line)]


def assert_fsck_clean(img: str, *extra: str, exit_only: bool = False) -> None:
    """``e2fsck -fn`` exits 0 and (unless ``exit_only``) prints nothing but a clean run's lines."""
    rc, out = fsck(img, *extra)
    if exit_only:
        assert rc == 0, f"e2fsck -fn {img} exited {rc}:\n{out}"
        return
    problems = fsck_problems(out)
    if rc == 0 and not problems:
        return
    header = run(["dumpe2fs", "-h", img], check=False).stdout.decode(errors="replace")
    times = "\n".join(line for line in header.splitlines() if "time" in line.lower() or "state" in line)
    raise AssertionError(f"e2fsck -fn {' '.join(extra)} {img} exited {rc} at {time.time():.3f}:\n"
                         f"{out}\n{times}")


# -- dumpe2fs -----------------------------------------------------------------------------------
def dumpe2fs(img: str, *opts: str) -> str:
    """``dumpe2fs [OPTS] IMG``'s stdout (``-h``: the superblock only)."""
    return run(["dumpe2fs", *opts, img]).stdout.decode(errors="replace")


def dumpe2fs_header(img: str) -> dict[str, str]:
    """The superblock as ``dumpe2fs -h`` prints it: {field: value}."""
    fields = {}
    for line in dumpe2fs(img, "-h").splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


# -- debugfs ------------------------------------------------------------------------------------
def debugfs(img: str, *cmds: str, write: bool = False) -> bytes:
    """Run debugfs commands on ``img`` (one process for all of them, ``-f``: each command's
    output follows a ``debugfs: CMD`` line); raw stdout. ``write``: opened read-write."""
    with tempfile.NamedTemporaryFile("w", suffix=".cmds", dir=SHM, delete=False) as f:
        f.write("\n".join(cmds) + "\n")
        name = f.name
    try:
        return run(["debugfs", *(["-w"] if write else []), "-f", name, img]).stdout
    finally:
        os.unlink(name)


def debugfs_r(img: str, request: str, *, write: bool = False) -> bytes:
    """``debugfs [-w] -R REQUEST IMG``: one request, its raw stdout (no echo line)."""
    return run(["debugfs", *(["-w"] if write else []), "-R", request, img]).stdout


def debugfs_cat(img: str, path: str) -> bytes:
    return debugfs_r(img, f'cat "{path}"')


@dataclass
class DInode:
    """One inode as ``debugfs stat`` prints it."""

    ino: int
    type: str
    mode: int
    links: int
    blockcount: int
    size: int
    uid: int
    gid: int
    file_acl: int
    #: logical block -> physical block, data blocks only
    blocks: dict[int, int] = field(default_factory=dict)
    #: the IND/DIND/TIND blocks
    meta: list[int] = field(default_factory=list)
    fast_link: bool = False
    #: i_flags (ext4: 0x80000 extents, 0x10000000 inline data)
    flags: int = 0

    @property
    def inline(self) -> bool:
        return bool(self.flags & 0x10000000)


_STAT_RE = {
    "head": re.compile(rb"Inode: (\d+)\s+Type: (.+?)\s+Mode:\s+(\d+)"),
    "user": re.compile(rb"User:\s+(-?\d+)\s+Group:\s+(-?\d+).*?Size: (\d+)"),
    "acl": re.compile(rb"File ACL: (\d+)"),
    "links": re.compile(rb"Links: (\d+)\s+Blockcount: (\d+)"),
}
_BLOCK_RE = re.compile(rb"\((\d+)(?:-(\d+))?\):(\d+)(?:-(\d+))?|\((?:IND|DIND|TIND|ETB\d+)\):(\d+)")
#: ``ls -p``: /inode/mode/uid/gid/name/size/ (debugfs prints uids >= 2^31 as negative numbers)
LS_P_RE = re.compile(rb"/(\d+)/([0-7]+)/(-?\d+)/(-?\d+)/([^/]*)/(\d*)/\n")


def parse_stat(text: bytes) -> DInode:
    """A ``debugfs stat`` report as a :class:`DInode`."""
    head = _STAT_RE["head"].search(text)
    user = _STAT_RE["user"].search(text)
    links = _STAT_RE["links"].search(text)
    acl = _STAT_RE["acl"].search(text)
    node = DInode(ino=int(head[1]), type=head[2].decode(), mode=int(head[3], 8), links=int(links[1]),
                  blockcount=int(links[2]), size=int(user[3]), uid=int(user[1]) & 0xFFFFFFFF,
                  gid=int(user[2]) & 0xFFFFFFFF,
                  file_acl=int(acl[1]) if acl else 0)
    node.fast_link = b"Fast link dest:" in text
    flags = re.search(rb"Flags: (0x[0-9a-f]+)", text)
    node.flags = int(flags[1], 16) if flags else 0
    for title in (b"BLOCKS:\n", b"EXTENTS:\n"):        # block-mapped, or extents (ETB: tree blocks)
        if title not in text:
            continue
        section = text.split(title, 1)[1].split(b"TOTAL:", 1)[0]
        for m in _BLOCK_RE.finditer(section):
            if m[5] is not None:
                node.meta.append(int(m[5]))
                continue
            lo = int(m[1])
            hi = int(m[2]) if m[2] else lo
            p = int(m[3])
            for i in range(hi - lo + 1):
                node.blocks[lo + i] = p + i
    return node


def debugfs_stat(img: str, spec: str | int) -> DInode:
    """``debugfs stat`` of a path, or of an inode number."""
    return parse_stat(debugfs_r(img, f"stat <{spec}>" if isinstance(spec, int) else f'stat "{spec}"'))


def debugfs_ls(img: str, spec: str | int) -> dict[bytes, tuple[int, int]]:
    """``debugfs ls -p`` of a directory (path or inode number): {name: (inode, mode)}, with
    ``.`` and ``..``."""
    out = debugfs_r(img, f"ls -p <{spec}>" if isinstance(spec, int) else f'ls -p "{spec}"')
    return {m[5]: (int(m[1]), int(m[2], 8)) for m in LS_P_RE.finditer(out) if int(m[1])}


# -- images in memory ---------------------------------------------------------------------------
def memory_image(size: int, bs: int = 4096, **mkfs_options: Any) -> Any:
    """A new ext2 filesystem (``xipfs.mkfs``) on ``size`` bytes of anonymous memory: the device."""
    import xipfs

    dev = xipfs.MemoryDevice.anonymous(size)
    xipfs.mkfs(dev, block_size=bs, **mkfs_options)
    return dev


def write_out(dev: Any, path: str) -> str:
    """Copy every byte of device ``dev`` into the file ``path`` (for e2fsprogs); returns ``path``."""
    with open(path, "wb") as f:
        f.write(dev.view(0, dev.size))
    return path


class MemoryImage:
    """:func:`memory_image` opened for writing: ``dev``, ``fs`` (``xipfs.open(dev, "r+")``),
    ``vol`` (its Volume), ``bs``; ``check()`` puts it before e2fsck."""

    def __init__(self, size: int, bs: int = 4096, *, workdir: str = SHM, **mkfs_options: Any) -> None:
        import xipfs

        self.bs = bs
        self.workdir = workdir
        self.dev = memory_image(size, bs, **mkfs_options)
        self.fs = xipfs.open(self.dev, "r+")
        self.vol = self.fs.volume

    def check(self, name: str = "img") -> str:
        """Sync, write the image out to ``WORKDIR/NAME.img``, assert ``e2fsck -fn`` finds it
        clean (no output but a clean run's); the file's path, for debugfs."""
        self.fs.sync()
        path = write_out(self.dev, os.path.join(self.workdir, f"{name}.img"))
        assert_fsck_clean(path)
        return path

    def reopen(self) -> Any:
        """A second, read-only Filesystem on the same memory (nothing cached): what is stored."""
        import xipfs

        self.fs.sync()
        return xipfs.open(self.dev, "r")

    def close(self) -> None:
        self.fs.close()
        self.dev.close()
