"""xipfs.fuse under real, maintained programs: sqlite3, tar, cp -a, rsync -a, git,
``python -m compileall``, fio with verification, stress-ng's file stressors, dbench.

Each test makes a fresh ext2 or ext4 image in /dev/shm, serves it through the FUSE mount,
runs the program on the mount, unmounts, and then requires ``e2fsck -fn`` clean and the data
checked against what was put in (or the program's own verification: sqlite's
integrity_check, ``git fsck``, fio's crc32c, stress-ng's --verify). A program that is not
installed is a skip naming it (``apt-get install fio stress-ng dbench rsync``), as is a
machine where FUSE cannot mount.
"""

from __future__ import annotations

import errno
import filecmp
import mmap
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from e2fs import fsck, mkfs
from test_fuse import fuse_ok, mounted  # noqa: F401 (fuse_ok: the module's fixture)
from write_util import shm_dir

import xipfs
from xipfs import fuse as xfuse
from xipfs.extfs.data import max_file_size

KINDS = ["ext2", "ext4"]
#: e2fsck's two notes on an extent tree that would fit in fewer blocks (exit status 0). Linux's
#: ext4 leaves the same trees after the same random writes through O_DIRECT (fio randwrite into
#: a fallocated file, checked on a loop mount): FUSE's write-back sends pages as they age,
#: in the program's own order, where ext4's delayed allocation would gather them first.
_TREE_NOTE = re.compile(r"^Inode \d+ extent tree \(at level \d+\) could be (narrower|shorter)\."
                        r"  Optimize\? no$")
_CLEAN = re.compile(r"^(e2fsck \d[\d.]* \(.*\)|Pass \d[A-Z]?: .*|.*: \d+/\d+ files \(.*\), "
                    r"\d+/\d+ blocks|\s*)$")


def need(program: str) -> str:
    """The path of ``program``, or a skip naming the package to install."""
    path = shutil.which(program)
    if path is None:
        pytest.skip(f"{program} is not installed (apt-get install {program})")
    return path


def assert_clean(img: str, *, tree_notes: bool = False) -> None:
    """``e2fsck -fn`` exits 0 and prints nothing but a clean run (and, with ``tree_notes``,
    the notes on extent trees that Linux's ext4 leaves too: see ``_TREE_NOTE``)."""
    rc, out = fsck(img)
    bad = [line for line in out.splitlines()
           if not _CLEAN.match(line) and not (tree_notes and _TREE_NOTE.match(line))]
    assert rc == 0 and not bad, f"e2fsck -fn {img} exited {rc}:\n{out}"


@pytest.fixture
def shm(fuse_ok: None) -> Iterator[str]:  # noqa: F811 (the fixture imported above)
    """A private /dev/shm directory for the image, the mount point and the sources."""
    with shm_dir("xipfs-fuseprog-") as d:
        yield d


def make_image(d: str, kind: str, size: str = "64M") -> str:
    """A fresh ``kind`` image of ``size`` in ``d``."""
    return mkfs(os.path.join(d, f"{kind}.img"), size, fstype=kind)


def tool(cmd: list[str], cwd: str | None = None, timeout: int = 120,
         env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` (in the C locale); its output, or a failure showing it."""
    proc = subprocess.run(["timeout", str(timeout), *cmd], cwd=cwd, capture_output=True,
                          env={**os.environ, "LC_ALL": "C", **(env or {})})
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out}"
    return out


# -- a tree to copy -----------------------------------------------------------------------------
def build_tree(root: str) -> None:
    """Files of many sizes (empty, inline-sized, a few blocks, several MiB, sparse), nested
    directories, symlinks fast and slow, a hard link, odd modes and old times."""
    rnd = os.urandom(3 << 20)
    os.makedirs(f"{root}/a/b/c/d")
    os.makedirs(f"{root}/many")
    for i in range(300):
        with open(f"{root}/many/f{i:03}.txt", "wb") as f:
            f.write(rnd[i * 97:i * 97 + i * 13])
    with open(f"{root}/a/big.bin", "wb") as f:
        f.write(rnd)
    with open(f"{root}/a/b/sparse.bin", "wb") as f:
        f.truncate(9 << 20)
        f.seek(5 << 20)
        f.write(rnd[:70_000])
    open(f"{root}/a/b/c/empty", "wb").close()
    with open(f"{root}/a/b/c/d/script.sh", "w") as f:
        f.write("#!/bin/sh\necho hi\n")
    os.chmod(f"{root}/a/b/c/d/script.sh", 0o4755)
    os.chmod(f"{root}/a/b/c", 0o700)
    os.link(f"{root}/a/big.bin", f"{root}/a/hard.bin")
    os.symlink("big.bin", f"{root}/a/fast")
    os.symlink("x" * 200 + "/slow/target", f"{root}/a/slow")
    os.utime(f"{root}/many/f007.txt", ns=(1_000_000_123, 2_000_000_456))


def assert_same_tree(src: str, dst: str, *, dir_times: bool = True) -> None:
    """Every entry of ``src`` is in ``dst`` with the same type, mode, size, mtime (ns),
    symlink target and bytes, hard links shared; nothing extra (but lost+found). Directories'
    and symlinks' mtimes too unless not ``dir_times`` (rsync 3.2's -aH leaves both as copying
    made them, on Linux's ext2 and ext4 as here)."""
    for dirpath, dirs, files in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        other = os.path.normpath(os.path.join(dst, rel))
        names = set(os.listdir(other)) - ({"lost+found"} if rel == "." else set())
        assert names == set(dirs) | set(files), rel
        for name in dirs + files:
            a, b = os.path.join(dirpath, name), os.path.join(other, name)
            sa, sb = os.lstat(a), os.lstat(b)
            file = not os.path.isdir(a)                  # a directory's size is its blocks
            times = (file and not os.path.islink(a)) or dir_times
            assert (sa.st_mode, sa.st_size * file, sa.st_mtime_ns * times) == (
                sb.st_mode, sb.st_size * file, sb.st_mtime_ns * times), b
            if os.path.islink(a):
                assert os.readlink(a) == os.readlink(b), b
            elif os.path.isfile(a):
                assert filecmp.cmp(a, b, shallow=False), b
                assert sa.st_nlink == sb.st_nlink, b
    assert os.lstat(f"{dst}/a/big.bin").st_ino == os.lstat(f"{dst}/a/hard.bin").st_ino


@pytest.fixture
def tree(shm: str) -> str:
    src = os.path.join(shm, "src")
    build_tree(src)
    return src


# -- copying trees in and out ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_tar_cp_rsync(shm: str, tree: str, kind: str) -> None:
    """tar x into the mount and tar c out of it, cp -a and rsync -a (-H) in: every copy equal
    to the source; after unmounting e2fsck is clean and the image still holds them."""
    img = make_image(shm, kind)
    mp = os.path.join(shm, "mnt")
    out = os.path.join(shm, "out")
    os.mkdir(out)
    with mounted(img, mp):
        tool(["tar", "-C", tree, "--format=posix", "-cf", f"{shm}/in.tar", "."])
        os.mkdir(f"{mp}/tar")
        tool(["tar", "-C", f"{mp}/tar", "--same-owner", "-xpf", f"{shm}/in.tar"])
        tool(["tar", "-C", f"{mp}/tar", "--format=posix", "-cf", f"{shm}/out.tar", "."])
        tool(["tar", "-C", out, "-xpf", f"{shm}/out.tar"])
        tool(["cp", "-a", tree, f"{mp}/cp"])
        if shutil.which("rsync"):
            tool(["rsync", "-aH", f"{tree}/", f"{mp}/rsync/"])
            tool(["rsync", "-aH", "--delete", "--checksum", f"{tree}/", f"{mp}/rsync/"])
        assert_same_tree(tree, f"{mp}/tar")
        assert_same_tree(tree, f"{mp}/cp")
        assert_same_tree(tree, out)
        if shutil.which("rsync"):
            assert_same_tree(tree, f"{mp}/rsync", dir_times=False)
    assert_clean(img)
    with mounted(img, mp, readonly=True):
        assert_same_tree(tree, f"{mp}/tar")
        assert_same_tree(tree, f"{mp}/cp")
        if shutil.which("rsync"):
            assert_same_tree(tree, f"{mp}/rsync", dir_times=False)


# -- sqlite ---------------------------------------------------------------------------------------
def _fill(db: str, mode: str) -> tuple[int, int]:
    """A database in journal ``mode``: transactions of inserts, deletes, an index, VACUUM;
    integrity_check ok; (rows, bytes of blobs)."""
    con = sqlite3.connect(db)
    try:
        assert con.execute(f"pragma journal_mode={mode}").fetchone()[0] == mode
        con.execute("create table t(k integer primary key, v blob)")
        for i in range(25):
            with con:
                con.executemany("insert into t(v) values(?)",
                                [(os.urandom((i * 37 + j) % 3000),) for j in range(150)])
        with con:
            con.execute("delete from t where k % 3 = 0")
        con.execute("create index iv on t(v)")
        con.execute("vacuum")
        assert con.execute("pragma integrity_check").fetchall() == [("ok",)]
        return con.execute("select count(*), sum(length(v)) from t").fetchone()
    finally:
        con.close()


def _summary(db: str) -> tuple[tuple[str, ...], tuple[int, int]]:
    con = sqlite3.connect(db)
    try:
        return (tuple(r[0] for r in con.execute("pragma integrity_check")),
                con.execute("select count(*), sum(length(v)) from t").fetchone())
    finally:
        con.close()


@pytest.mark.parametrize("kind", KINDS)
def test_sqlite(shm: str, kind: str) -> None:
    """sqlite3 databases in rollback-journal (delete, truncate, persist) and WAL mode on the
    mount: integrity_check ok, the same rows after a remount, e2fsck clean."""
    img = make_image(shm, kind)
    mp = os.path.join(shm, "mnt")
    modes = ("delete", "truncate", "persist", "wal")
    with mounted(img, mp):
        want = {m: _fill(f"{mp}/{m}.db", m) for m in modes}
    assert_clean(img)
    with mounted(img, mp):
        for m in modes:
            assert _summary(f"{mp}/{m}.db") == (("ok",), want[m]), m
        if shutil.which("sqlite3"):
            assert tool(["sqlite3", f"{mp}/wal.db", "pragma integrity_check"]).strip() == "ok"
    assert_clean(img)


# -- git and compileall ---------------------------------------------------------------------------
def _git(*args: str, cwd: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@x", "GIT_CONFIG_NOSYSTEM": "1", "HOME": cwd}
    return tool(["git", "-c", "init.defaultBranch=main", "-c", "safe.directory=*", *args], cwd=cwd, env=env)


@pytest.mark.parametrize("kind", KINDS)
def test_git(shm: str, tree: str, kind: str) -> None:
    """A repository with a few commits cloned onto the mount, committed to there (object files
    written, renamed, packed by gc): git fsck --full --strict clean before and after a remount,
    the work tree equal to the source; e2fsck clean."""
    need("git")
    repo = os.path.join(shm, "repo")
    shutil.copytree(tree, repo, symlinks=True)
    _git("init", "-q", cwd=repo)
    _git("add", "-A", cwd=repo)
    _git("commit", "-qm", "one", cwd=repo)
    for i in range(3):
        with open(f"{repo}/many/f{i:03}.txt", "a") as f:
            f.write(f"change {i}\n")
        _git("commit", "-qam", f"change {i}", cwd=repo)
    img = make_image(shm, kind)
    mp = os.path.join(shm, "mnt")
    with mounted(img, mp):
        _git("clone", "-q", "--no-local", repo, f"{mp}/clone", cwd=shm)
        clone = f"{mp}/clone"
        _git("fsck", "--full", "--strict", cwd=clone)
        with open(f"{clone}/new.txt", "w") as f:
            f.write("made on the mount\n")
        _git("add", "new.txt", cwd=clone)
        _git("commit", "-qm", "on the mount", cwd=clone)
        _git("gc", "-q", "--prune=now", cwd=clone)
        _git("fsck", "--full", "--strict", cwd=clone)
        assert _git("status", "--porcelain", cwd=clone) == ""
    assert_clean(img)
    with mounted(img, mp):
        clone = f"{mp}/clone"
        _git("fsck", "--full", "--strict", cwd=clone)
        for name in ("a/big.bin", "a/b/sparse.bin", "many/f002.txt"):
            assert filecmp.cmp(f"{repo}/{name}", f"{clone}/{name}", shallow=False), name
        assert os.readlink(f"{clone}/a/slow") == os.readlink(f"{repo}/a/slow")
        assert _git("log", "--format=%s", "-1", cwd=clone).strip() == "on the mount"
    assert_clean(img)


@pytest.mark.parametrize("kind", KINDS)
def test_compileall(shm: str, kind: str) -> None:
    """``python -m compileall`` writes __pycache__ beside a package copied onto the mount (files
    written under temporary names and renamed into place), which then imports from there
    using those caches; e2fsck clean."""
    img = make_image(shm, kind)
    mp = os.path.join(shm, "mnt")
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with mounted(img, mp):
        shutil.copytree(os.path.join(src, "src", "xipfs"), f"{mp}/pkg/xipfs",
                        ignore=shutil.ignore_patterns("__pycache__"))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run([sys.executable, "-m", "compileall", "-q", f"{mp}/pkg"], check=True,
                       env=env, capture_output=True, timeout=120)
        caches = [f for _, _, fs in os.walk(f"{mp}/pkg") for f in fs if f.endswith(".pyc")]
        assert len(caches) >= 40
        code = ("import sys, xipfs.fuse, xipfs.extfs.extent as e; "
                "print(e.__file__, e.__cached__, sys.modules['xipfs'].__file__)")
        out = subprocess.run([sys.executable, "-B", "-c", code], cwd=f"{mp}/pkg", check=True, env=env,
                             capture_output=True, timeout=60).stdout.decode()
        assert out.startswith(f"{mp}/pkg/xipfs/extfs/extent.py"), out
    assert_clean(img)


# -- fio with verification ------------------------------------------------------------------------
FIO_JOBS = """
[global]
directory={mp}
size={size}
verify=crc32c
do_verify=1
verify_fatal=1
verify_state_save=0
ioengine=psync
direct={direct}
numjobs=2
[randwrite4k]
rw=randwrite
bs=4k
[randrw64k-fallocate]
rw=randrw
bs=64k
fallocate=native
[write1m-posix-fallocate]
rw=write
bs=1m
fallocate=posix
[randwrite-ftruncate]
rw=randwrite
bs=16k
fallocate=truncate
[randrw-any-size]
rw=randrw
bsrange=4k-1m
fallocate={keep}
"""


@pytest.mark.parametrize(("kind", "direct"), [("ext2", 0), ("ext2", 1), ("ext4", 0), ("ext4", 1)])
def test_fio_verify(shm: str, kind: str, direct: int) -> None:
    """fio's jobs (random and sequential writes of 4 KiB to 1 MiB, fallocated, posix_fallocated
    and ftruncated files, two of each at once, through the page cache and O_DIRECT) verify
    every block they wrote (crc32c); e2fsck clean after (its notes on extent trees allowed, as
    Linux's ext4 leaves them for the same writes: see ``_TREE_NOTE``)."""
    need("fio")
    img = make_image(shm, kind, "256M")
    mp = os.path.join(shm, "mnt")
    job = os.path.join(shm, "job.fio")
    with open(job, "w") as f:          # FALLOC_FL_KEEP_SIZE is EOPNOTSUPP on ext2, as on Linux
        f.write(FIO_JOBS.format(mp=mp, size="8m", direct=direct, keep="keep" if kind == "ext4" else "none"))
    with mounted(img, mp):
        out = tool(["fio", "--output-format=terse", "--terse-version=3", job], cwd=shm, timeout=180)
        rows = [line.split(";") for line in out.splitlines() if line.startswith("3;")]
        assert len(rows) == 10 and all(r[4] == "0" for r in rows), out
    assert_clean(img, tree_notes=True)


# -- stress-ng ------------------------------------------------------------------------------------
#: Not --io: its syncfs() reports the errors the kernel's FUSE client keeps for the superblock
#: when another stressor's children are killed mid-write (EINTR, EIO; the server answered
#: nothing of the kind), and --fsize's EFBIG, which Linux gives at write() instead.
STRESSORS = ["hdd", "dir", "dirdeep", "rename", "link", "symlink", "xattr", "fallocate", "seek",
             "lockf", "filename", "dentry", "open", "chmod", "utime", "fstat", "getdent",
             "copy-file", "sync-file", "inode-flags", "file-ioctl", "readahead", "fsize", "mmap",
             "chown", "access", "touch", "mknod", "flock", "lockofd", "fpunch", "iomix"]


@pytest.mark.parametrize("kind", KINDS)
def test_stress_ng(shm: str, kind: str) -> None:
    """stress-ng's file stressors, all at once (one instance each, for three seconds, with
    --verify) on the mount as their temporary directory: none fails, nothing is left behind,
    and e2fsck is clean (its notes on extent trees allowed, see ``_TREE_NOTE``)."""
    need("stress-ng")
    img = make_image(shm, kind, "512M")
    mp = os.path.join(shm, "mnt")
    known = tool(["stress-ng", "--stressors"]).split()
    chosen = [arg for s in STRESSORS if s in known for arg in (f"--{s}", "1")]
    with mounted(img, mp):
        os.mkdir(f"{mp}/tmp")
        proc = subprocess.run(["timeout", "120", "stress-ng", *chosen, "--temp-path", f"{mp}/tmp",
                               "--timeout", "3", "--verify", "--hdd-bytes", "16m",
                               "--iomix-bytes", "16m", "--seek-size", "16m", "--fallocate-bytes", "16m"],
                              cwd=shm, capture_output=True)
        out = (proc.stdout + proc.stderr).decode(errors="replace")
        assert proc.returncode in (0, 4) and not re.search(r"\] (fail|error):", out), out
        assert os.listdir(f"{mp}/tmp") == []
    assert_clean(img, tree_notes=True)


# -- dbench ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_dbench(shm: str, kind: str) -> None:
    """dbench's own load file (client.txt: creates, writes, renames, locks, unlinks by four
    clients) for a few seconds without an error; e2fsck clean."""
    need("dbench")
    loadfile = next((p for p in ("/usr/share/dbench/client.txt", "/usr/local/share/client.txt")
                     if os.path.exists(p)), None)
    if loadfile is None:
        pytest.skip("dbench's client.txt is missing")
    img = make_image(shm, kind, "256M")
    mp = os.path.join(shm, "mnt")
    with mounted(img, mp):
        out = tool(["dbench", "-c", loadfile, "-D", mp, "-t", "3", "4"], cwd=shm, timeout=120)
        assert re.search(r"Throughput [\d.]+ MB/sec", out), out
        assert "ERROR" not in out and "failed" not in out, out
    assert_clean(img)


# -- what the programs found ----------------------------------------------------------------------
def _write_then_fsync(path: str, data: bytes, offset: int) -> int:
    """pwrite then fsync ``path``: 0, or the errno either of them gave."""
    fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
        return 0
    except OSError as err:
        return err.errno
    finally:
        os.close(fd)


@pytest.mark.parametrize("kind", KINDS)
def test_written_back_pages_that_do_not_fit_are_reported(shm: str, kind: str) -> None:
    """A write gathered by the kernel's page cache that finds too little space (or passes the
    largest file size) fails at fsync with ENOSPC (EFBIG), where Linux's own ext2/ext4 fails the
    write(): the kernel ignores a short count in its write-back, so a partly written request
    was lost in silence (stress-ng --hdd on a full image, fio; found with e2fsck clean)."""
    img = mkfs(os.path.join(shm, f"{kind}.img"), "16M", fstype=kind, bs=1024)
    mp = os.path.join(shm, "mnt")
    with mounted(img, mp):
        free = os.statvfs(mp).f_bfree * 1024
        assert _write_then_fsync(f"{mp}/full", b"\x55" * (free + 8192), 0) == errno.ENOSPC
        os.unlink(f"{mp}/full")
        # Linux's s_maxbytes for 1 KiB blocks (checked on loop mounts): a byte before it fits
        limit = ((1 << 32) - 1) * 1024 if kind == "ext4" else max_file_size(1024)
        assert _write_then_fsync(f"{mp}/big", b"x", limit) == errno.EFBIG
        assert _write_then_fsync(f"{mp}/big2", b"x", limit - 1) == 0
        assert os.stat(f"{mp}/big2").st_size == limit
    assert_clean(img)


def _depth(img: str, path: str) -> int:
    """The extent tree depth of ``path`` as debugfs reads it."""
    out = subprocess.run(["debugfs", "-R", f"ex {path}", img], capture_output=True).stdout.decode()
    return int(out.splitlines()[1].split("/")[1].split()[0])


def _scatter_then_fill(write: Any, blocks: int) -> None:
    """Every other block of a fallocated file first (more extents than the inode holds), then
    the rest in order (one extent again)."""
    for b in [*range(1, blocks, 2), *range(0, blocks, 2)]:
        write(bytes([b % 251 + 1]) * 4096, b * 4096)


def test_extent_tree_moves_back_into_the_inode(shm: str) -> None:
    """A tree that grew a level while unwritten extents were split, and whose leaf then merged
    down to what the inode holds, moves back into the inode as Linux's ext4 does
    (ext4_ext_try_to_merge_up; checked on a loop mount with O_DIRECT writes): e2fsck has no
    'could be shorter' to say (fio's random writes into fallocated files left such trees)."""
    img = mkfs(os.path.join(shm, "ext4.img"), "64M", fstype="ext4")
    with xipfs.open(img, "r+") as fs, fs.open("/f", "wb", buffering=0) as f:
        f.fallocate(0, 64 * 4096)
        _scatter_then_fill(f.pwrite, 64)
    assert _depth(img, "/f") == 0
    assert_clean(img)
    if os.geteuid() != 0:
        return
    loop_img = mkfs(os.path.join(shm, "loop.img"), "64M", fstype="ext4")
    mp = os.path.join(shm, "loop")
    os.mkdir(mp)
    if subprocess.run(["mount", "-o", "loop", loop_img, mp], capture_output=True).returncode:
        return                                            # no loop devices here: xipfs alone
    try:
        fd = os.open(f"{mp}/f", os.O_CREAT | os.O_RDWR | os.O_DIRECT, 0o644)
        buf = mmap.mmap(-1, 4096)                         # O_DIRECT wants an aligned buffer
        try:
            os.posix_fallocate(fd, 0, 64 * 4096)

            def write(data: bytes, off: int) -> None:
                buf[:] = data
                os.pwrite(fd, buf, off)
            _scatter_then_fill(write, 64)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["umount", mp], check=True)
    assert _depth(loop_img, "/f") == 0


def _append_then_map(path: str) -> None:
    """8 KiB appended through an O_APPEND descriptor, then two places changed through a
    shared mapping of that same descriptor and synced."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, b"a" * 8192)
        with mmap.mmap(fd, 8192) as m:
            m[0:10] = b"B" * 10
            m[4096:4100] = b"CCCC"
            m.flush()
    finally:
        os.close(fd)


def _appenders(path: str, procs: int = 3, lines: int = 400) -> list[bytes]:
    """``procs`` processes appending numbered lines at once through O_APPEND; the lines."""
    kids = []
    for k in range(procs):
        pid = os.fork()
        if pid == 0:                                          # pragma: no cover (the child)
            code = 0
            try:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                for i in range(lines):
                    os.write(fd, b"%d %05d %s\n" % (k, i, b"x" * (i % 40)))
                os.close(fd)
            except BaseException:
                code = 1
            os._exit(code)
        kids.append(pid)
    assert all(os.waitpid(pid, 0)[1] == 0 for pid in kids)
    with open(path, "rb") as f:
        return f.read().splitlines()


@pytest.mark.parametrize("writeback", ["1", "0"])
def test_mapped_pages_of_an_append_descriptor_stay_in_place(shm: str, writeback: str) -> None:
    """Pages written through a shared mapping of an O_APPEND descriptor are written back where
    they are, as on Linux's ext4 (checked on a loop mount): without the writeback cache the
    server applies O_APPEND to write() requests, and it applied it to the kernel's write-back
    of mapped pages too, which appended them at EOF (a 16 KiB file, the changes lost).
    O_APPEND writers at once still land whole and once each."""
    img = mkfs(os.path.join(shm, "ext4.img"), "16M", fstype="ext4")
    mp = os.path.join(shm, "mnt")
    with mounted(img, mp, options={"writeback_cache": writeback}):
        _append_then_map(f"{mp}/mapped")
        got = _appenders(f"{mp}/log")
    assert_clean(img)
    with xipfs.open(img) as fs:
        data = fs.read_bytes("/mapped")
        assert fs.read_bytes("/log").splitlines() == got
    assert data == b"B" * 10 + b"a" * 4086 + b"CCCC" + b"a" * 4092
    assert len(got) == 1200 and sorted(got) == sorted(
        b"%d %05d %s" % (k, i, b"x" * (i % 40)) for k in range(3) for i in range(400))


@pytest.mark.parametrize("kind", KINDS)
def test_names_removed_during_a_listing_do_not_come_back(shm: str, kind: str) -> None:
    """A directory listed in parts while its names are removed and their inode numbers taken by
    new files elsewhere: the rest of the listing may still name them (readdir's snapshot, as
    POSIX allows), but the names resolve to nothing, as on Linux's ext4 (checked on a loop
    mount). readdirplus gave the kernel each snapshot name with the inode now under its old
    number, so ``open(d/n00202)`` read another directory's new file, and stress-ng --dirdeep's
    mkdir failed with ESTALE (a directory the kernel then knew in two places)."""
    img = mkfs(os.path.join(shm, f"{kind}.img"), "64M", fstype=kind)
    mp = os.path.join(shm, "mnt")
    with mounted(img, mp):
        d, e = f"{mp}/d", f"{mp}/e"
        os.mkdir(d)
        os.mkdir(e)
        names = [f"n{i:05d}" for i in range(1500)]
        for name in names:
            with open(f"{d}/{name}", "w") as f:
                f.write("old " + name)
        with os.scandir(d) as it:
            seen = {next(it).name for _ in range(100)}
            for name in names:
                if name not in seen:
                    os.unlink(f"{d}/{name}")
            for i in range(1500):
                with open(f"{e}/m{i:05d}", "w") as f:
                    f.write("new")
            rest = [entry.name for entry in it]
        ghosts = [name for name in rest if os.path.lexists(f"{d}/{name}")]
        assert ghosts == []
        assert sorted(os.listdir(d)) == sorted(seen)
    assert_clean(img)


def test_a_listing_goes_stale_when_a_name_leaves_or_is_replaced(tmp_path: Any) -> None:
    """The server's side of the test above, without the kernel: a directory's listing stops
    giving inodes once a name is unlinked, removed or renamed out of it, or replaced in it by a
    rename from elsewhere (the old inode freed, its number another file's to take); a name
    added keeps it current."""
    img = str(tmp_path / "ops.img")
    xipfs.mkfs(img, 8 << 20, block_size=1024)
    with xipfs.open(img, "r+") as fs:
        ops = xfuse.Operations(fs, read_path="copy")
        d, e = ops.mkdir(1, b"d", 0o755, 0, 0), ops.mkdir(1, b"e", 0o755, 0, 0)
        for parent in (d, e):
            for name in (b"a", b"b", b"c"):
                ops.release(ops.create(parent.ino, name, 0o644, os.O_WRONLY, 0, 0)[1])
        ops.mkdir(d.ino, b"sub", 0o755, 0, 0)

        def stale_after(change: Any) -> bool:
            dh = ops.opendir(d.ino)
            try:
                assert ops.listing_current(dh)
                change()
                return not ops.listing_current(dh)
            finally:
                ops.release(dh)

        assert not stale_after(lambda: ops.release(ops.create(d.ino, b"new", 0o644, os.O_WRONLY, 0, 0)[1]))
        assert stale_after(lambda: ops.rename(e.ino, b"a", d.ino, b"a"))     # d the destination
        assert stale_after(lambda: ops.rename(d.ino, b"b", e.ino, b"b"))
        assert stale_after(lambda: ops.unlink(d.ino, b"c"))
        assert stale_after(lambda: ops.rmdir(d.ino, b"sub"))
