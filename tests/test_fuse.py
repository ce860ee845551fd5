"""xipfs.fuse: an image served through FUSE, used by ordinary programs.

Every test mounts a real image in a temporary directory from a separate ``python`` process
(``xipfs.fuse.mount`` blocks while serving) and unmounts it in teardown whatever happened.
The oracles are outside the mount: the image read with xipfs, the tree it was built from,
``e2fsck -fn`` after unmounting. Skips when /dev/fuse or libfuse 3 are missing, or
when a trial mount fails.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from e2fs import assert_fsck_clean, mkfs, run
from write_util import shm_dir

import xipfs
from xipfs import fuse as xfuse
from xipfs.extfs import layout as L

MOUNT_TIMEOUT = 15.0
UID = 1000                                   # an unprivileged user for the permission tests


# -- mounting from a separate process -----------------------------------------------------------
def _wait_mounted(mp: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(mp):
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise RuntimeError(f"the server exited {proc.returncode} before mounting:\n"
                               f"{out.decode(errors='replace')}{err.decode(errors='replace')}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mp} not mounted after {MOUNT_TIMEOUT} s")
        time.sleep(0.02)


def _unmount(mp: str, proc: subprocess.Popen | None) -> None:
    """fusermount3 -u (retried while busy, then lazily), then wait for the server; kill it last."""
    for attempt in range(20):
        if not os.path.ismount(mp):
            break
        lazy = ["-z"] if attempt == 19 else []
        subprocess.run(["fusermount3", "-u", *lazy, mp], capture_output=True)
        time.sleep(0.05)
    if proc is not None:
        try:
            proc.wait(timeout=MOUNT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def mounted(image: str, mp: str, *, readonly: bool = False,
            options: Any = None) -> Iterator[subprocess.Popen]:
    """Serve ``image`` at ``mp`` from a child python for the duration of the block."""
    os.makedirs(mp, exist_ok=True)
    code = (f"import xipfs.fuse as f; f.mount({image!r}, {mp!r}, readonly={readonly!r}, "
            f"options={options!r})")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _wait_mounted(mp, proc)
        yield proc
    finally:
        _unmount(mp, proc)
        proc.output = b""                   # type: ignore[attr-defined]
        for stream in (proc.stdout, proc.stderr):
            if stream:
                proc.output += stream.read()   # type: ignore[attr-defined]
                stream.close()


@pytest.fixture(scope="module")
def fuse_ok() -> None:
    """Skip the module unless a real mount works here."""
    reason = xfuse.fuse_available()
    if reason:
        pytest.skip(f"FUSE unavailable: {reason}")
    if shutil.which("fusermount3") is None:
        pytest.skip("fusermount3 is not installed (apt-get install fuse3)")
    with shm_dir("xipfs-fusetest-") as d:
        img = os.path.join(d, "probe.img")
        xipfs.mkfs(img, 4 << 20)
        try:
            with mounted(img, os.path.join(d, "mnt"), readonly=True):
                pass
        except RuntimeError as err:
            pytest.skip(f"a trial FUSE mount failed: {err}")


@pytest.fixture
def work(fuse_ok: None, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """(a private /dev/shm directory for images, a mount point)."""
    with shm_dir("xipfs-fusetest-") as d:
        mp = str(tmp_path / "mnt")
        os.mkdir(mp)
        yield d, mp
        if os.path.ismount(mp):
            _unmount(mp, None)


# -- an image with a bit of everything ------------------------------------------------------------
MODULE = "VALUE = 42\n\ndef double(x):\n    return 2 * x\n"
SCRIPT = "#!/bin/sh\necho from-the-image \"$@\"\n"


def build_tree(root: str) -> None:
    """Files of several sizes, a sparse file, links of every kind, a FIFO, a device node,
    a package and two programs."""
    os.makedirs(f"{root}/lib/pkg")
    os.makedirs(f"{root}/bin")
    os.makedirs(f"{root}/empty")
    os.makedirs(f"{root}/deep/a/b/c")
    with open(f"{root}/lib/pkg/__init__.py", "w") as f:
        f.write(MODULE)
    with open(f"{root}/lib/pkg/data.txt", "w") as f:
        f.write("resource\n")
    with open(f"{root}/bin/hello.sh", "w") as f:
        f.write(SCRIPT)
    os.chmod(f"{root}/bin/hello.sh", 0o755)
    shutil.copy2(shutil.which("true") or "/bin/true", f"{root}/bin/true")
    rnd = os.urandom(3 << 20)
    with open(f"{root}/big.bin", "wb") as f:
        f.write(rnd)
    with open(f"{root}/sparse.bin", "wb") as f:
        f.truncate(5 << 20)
        f.seek(2 << 20)
        f.write(rnd[:100_000])
    for i in range(30):
        with open(f"{root}/deep/a/b/c/f{i}.txt", "w") as f:
            f.write(f"file {i}\n" * i)
    os.link(f"{root}/big.bin", f"{root}/deep/big-again.bin")
    os.symlink("big.bin", f"{root}/fast-link")
    os.symlink("x" * 100 + "/../big.bin", f"{root}/slow-link")
    os.symlink("lib/pkg", f"{root}/pkg-link")
    os.mkfifo(f"{root}/fifo")
    os.mknod(f"{root}/null", 0o620 | stat.S_IFCHR, os.makedev(1, 3))
    os.chmod(f"{root}/deep/a", 0o750)
    os.chown(f"{root}/deep/a/b", 1234, 5678)


@pytest.fixture
def tree_image(work: tuple[str, str], tmp_path: Any) -> tuple[str, str, str]:
    """(image made by mke2fs -d from build_tree, with an xattr added, mount point, source)."""
    d, mp = work
    src = str(tmp_path / "src")
    build_tree(src)
    img = mkfs(os.path.join(d, "tree.img"), "24M", src=src)
    with xipfs.open(img, "r+") as fs:
        fs.setxattr("/big.bin", "user.origin", b"lab")
        fs.utime("/lib/pkg/data.txt", ns=(1_600_000_000_123_456_789, 1_500_000_000_987_654_321))
    return img, mp, src


def image_listing(img: str) -> dict[str, tuple]:
    """path -> (type, mode, nlink, size, uid, gid, mtime_ns, ino, link target or content)."""
    out = {}
    with xipfs.open(img) as fs:
        for top, dirs, files in fs.walk("/"):
            for name in dirs + files:
                p = (top.rstrip("/") + "/" + name)
                st = fs.lstat(p)
                if stat.S_ISLNK(st.st_mode):
                    extra: Any = fs.readlink(p)
                elif stat.S_ISREG(st.st_mode):
                    extra = fs.read_bytes(p)
                else:
                    extra = st.st_rdev
                out[p] = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink, st.st_size,
                          st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino, extra)
    return out


def mount_listing(mp: str) -> dict[str, tuple]:
    out = {}
    for top, dirs, files in os.walk(mp):
        for name in dirs + files:
            full = os.path.join(top, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                extra: Any = os.readlink(full)
            elif stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    extra = f.read()
            else:
                extra = st.st_rdev
            out["/" + os.path.relpath(full, mp)] = (
                stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink, st.st_size,
                st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ino, extra)
    return out


# -- reading ----------------------------------------------------------------------------------
def test_tree_through_mount_is_the_image(tree_image: tuple[str, str, str], tmp_path: Any) -> None:
    """os.walk through a read-only mount sees what xipfs sees in the image; so do ls, find,
    stat, cat, cp, df and getfattr."""
    img, mp, src = tree_image
    want = image_listing(img)
    with mounted(img, mp, readonly=True) as proc:
        got = mount_listing(mp)
        assert sorted(got) == sorted(want)
        for path in want:
            assert got[path] == want[path], path
        # find: names, types, modes, links, sizes, symlink targets
        find = run(["find", mp, "-mindepth", "1", "-printf", "%P|%y|%m|%n|%s|%l\n"]).stdout.decode()
        rows = sorted(find.splitlines())
        letter = {stat.S_IFDIR: "d", stat.S_IFREG: "f", stat.S_IFLNK: "l", stat.S_IFIFO: "p",
                  stat.S_IFCHR: "c"}
        expect = sorted(f"{p[1:]}|{letter[t]}|{m:o}|{n}|{s}|{e if t == stat.S_IFLNK else ''}"
                        for p, (t, m, n, s, _u, _g, _mt, _i, e) in want.items())
        assert rows == expect
        # stat: inode numbers, links, owner, nanosecond mtime
        out = run(["stat", "-c", "%i %h %u %g %s %.9Y %F", f"{mp}/deep/a/b", f"{mp}/lib/pkg/data.txt",
                   f"{mp}/null"]).stdout.decode().split("\n")
        with xipfs.open(img) as fs:
            for line, p in zip(out, ["/deep/a/b", "/lib/pkg/data.txt", "/null"], strict=False):
                st = fs.lstat(p)
                ino, nlink, uid, gid, size, mtime = line.split()[:6]
                assert (int(ino), int(nlink), int(uid), int(gid), int(size)) == (
                    st.st_ino, st.st_nlink, st.st_uid, st.st_gid, st.st_size)
                assert mtime.replace(".", "") == str(st.st_mtime_ns)
            assert os.stat(f"{mp}/null").st_rdev == os.makedev(1, 3)
            vfs, mine = os.statvfs(mp), fs.statvfs("/")
            assert (vfs.f_blocks, vfs.f_bfree, vfs.f_files, vfs.f_ffree) == (
                mine.f_blocks, mine.f_bfree, mine.f_files, mine.f_ffree)
            assert os.listxattr(f"{mp}/big.bin") == ["user.origin"]
            assert os.getxattr(f"{mp}/big.bin", "user.origin") == b"lab"
            with pytest.raises(OSError) as exc:
                os.getxattr(f"{mp}/sparse.bin", "user.origin")
            assert exc.value.errno == errno.ENODATA
        # ls -l and cat: they run and agree
        ls = run(["ls", "-ln", f"{mp}/deep"]).stdout.decode()
        assert "big-again.bin" in ls and " 2 " in ls
        assert run(["cat", f"{mp}/fast-link"]).stdout == want["/big.bin"][-1]
        # cp -a of the whole tree out of the mount gives back the source tree
        run(["cp", "-a", f"{mp}/.", str(tmp_path / "copy")])
    assert b"Traceback" not in proc.output, proc.output.decode(errors="replace")
    for top, _dirs, files in os.walk(src):
        for name in files:
            a = os.path.join(top, name)
            b = os.path.join(tmp_path / "copy", os.path.relpath(a, src))
            sa, sb = os.lstat(a), os.lstat(b)
            assert (sa.st_mode, sa.st_size) == (sb.st_mode, sb.st_size), a
            if stat.S_ISREG(sa.st_mode):
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    assert fa.read() == fb.read(), a


def test_import_and_execute_from_the_mount(tree_image: tuple[str, str, str]) -> None:
    """python imports a package stored in the image; a script and an ELF binary run from it."""
    img, mp, _ = tree_image
    with mounted(img, mp, readonly=True):
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import pkg, importlib.resources as r; "
                "print(pkg.VALUE, pkg.double(21), pkg.__file__, "
                "r.files('pkg').joinpath('data.txt').read_text().strip())")
        out = run([sys.executable, "-B", "-c", code, f"{mp}/lib"]).stdout.decode().split()
        assert out == ["42", "42", f"{mp}/lib/pkg/__init__.py", "resource"]
        assert run([f"{mp}/bin/hello.sh", "x"]).stdout == b"from-the-image x\n"
        assert subprocess.run([f"{mp}/bin/true"]).returncode == 0


@pytest.mark.parametrize("read_path", ["splice", "pread", "copy"])
def test_read_paths_give_the_same_bytes(work: tuple[str, str], read_path: str) -> None:
    """Every way of serving reads returns the file: runs, holes, the tail, odd offsets."""
    d, mp = work
    img = os.path.join(d, "rp.img")
    xipfs.mkfs(img, 32 << 20, block_size=1024)
    data = os.urandom(3 << 20)
    with xipfs.open(img, "r+") as fs, fs.open("/f", "wb", buffering=0) as f:
        f.write(data[:1 << 20])
        f.pwrite(data[2 << 20:], 2 << 20)           # a 1 MiB hole in the middle
        f.truncate((3 << 20) + 777)                 # and a short hole at the end
    want = data[:1 << 20] + bytes(1 << 20) + data[2 << 20:] + bytes(777)
    with mounted(img, mp, readonly=True, options={"read_path": read_path}):
        with open(f"{mp}/f", "rb") as f:
            assert f.read() == want
        fd = os.open(f"{mp}/f", os.O_RDONLY)
        try:
            for off, n in [(0, 1), (4095, 10_000), ((1 << 20) - 3, 7), ((3 << 20) + 700, 4096)]:
                assert os.pread(fd, n, off) == want[off:off + n]
        finally:
            os.close(fd)


def test_readonly_mount_refuses_writes_and_writers(tree_image: tuple[str, str, str]) -> None:
    """A read-only mount gives EROFS; while it is up, no xipfs writer gets the image (EBUSY)."""
    img, mp, _ = tree_image
    with mounted(img, mp, readonly=True):
        for call in (lambda: os.open(f"{mp}/new", os.O_CREAT | os.O_WRONLY),
                     lambda: os.open(f"{mp}/big.bin", os.O_RDWR),
                     lambda: os.mkdir(f"{mp}/d"), lambda: os.unlink(f"{mp}/big.bin"),
                     lambda: os.chmod(f"{mp}/big.bin", 0o600),
                     lambda: os.setxattr(f"{mp}/big.bin", "user.x", b"1")):
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.EROFS
        assert "ro" in _mount_options(mp)
        with pytest.raises(OSError) as exc:
            xipfs.open(img, "r+")
        assert exc.value.errno == errno.EBUSY
    assert_fsck_clean(img)


def _mount_options(mp: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == os.path.realpath(mp):
                return fields[5].split(",")
    return []


# -- writing ----------------------------------------------------------------------------------
def test_changes_through_the_mount_land_in_the_image(work: tuple[str, str]) -> None:
    """cp, mkdir, mv, ln, ln -s, chmod, truncate, touch, rm, mkfifo, xattrs, renameat2 flags and
    a file unlinked while open; then the unmounted image is clean and holds exactly that."""
    d, mp = work
    img = os.path.join(d, "rw.img")
    xipfs.mkfs(img, 48 << 20)
    payload = os.urandom((5 << 20) + 123)
    libc = ctypes.CDLL(None, use_errno=True)
    with mounted(img, mp) as proc:
        assert "rw" in _mount_options(mp)
        with open(f"{d}/payload", "wb") as f:
            f.write(payload)
        run(["cp", f"{d}/payload", f"{mp}/copied.bin"])
        run(["mkdir", "-p", f"{mp}/a/b/c"])
        with open(f"{mp}/a/note.txt", "w") as f:
            f.write("hello\n")
        run(["mv", f"{mp}/a/note.txt", f"{mp}/a/b/moved.txt"])
        run(["ln", f"{mp}/copied.bin", f"{mp}/a/hard.bin"])
        run(["ln", "-s", "../copied.bin", f"{mp}/a/soft"])
        run(["chmod", "640", f"{mp}/a/b/moved.txt"])
        run(["truncate", "-s", "100000", f"{mp}/a/hard.bin"])
        run(["touch", "-m", "-d", "@1500000000.123456789", f"{mp}/a/b/moved.txt"])
        run(["mkfifo", f"{mp}/a/fifo"])
        os.umask(0o022)
        with open(f"{mp}/umasked", "w"):
            pass
        os.mkdir(f"{mp}/gone")
        with open(f"{mp}/gone/x", "w") as f:
            f.write("x")
        run(["rm", "-r", f"{mp}/gone"])
        os.setxattr(f"{mp}/copied.bin", "user.tag", b"v1")
        os.setxattr(f"{mp}/copied.bin", "user.drop", b"x")
        os.removexattr(f"{mp}/copied.bin", "user.drop")
        with open(f"{mp}/x1", "w") as f:
            f.write("1")
        with open(f"{mp}/x2", "w") as f:
            f.write("2" * 5000)
        assert libc.renameat2(-100, f"{mp}/x1".encode(), -100, f"{mp}/x2".encode(), 1) == -1
        assert ctypes.get_errno() == errno.EEXIST               # RENAME_NOREPLACE
        for _ in range(2):                                      # RENAME_EXCHANGE, and back
            assert libc.renameat2(-100, f"{mp}/x1".encode(), -100, f"{mp}/x2".encode(), 2) == 0
            with open(f"{mp}/x1") as f1, open(f"{mp}/x2") as f2:
                assert len(f1.read()) + len(f2.read()) == 5001
        with open(f"{mp}/x1") as f1:
            assert f1.read() == "1"
        assert libc.renameat2(-100, f"{mp}/x1".encode(), -100, f"{mp}/x2".encode(), 4) == -1
        assert ctypes.get_errno() == errno.EINVAL               # RENAME_WHITEOUT: unsupported
        assert libc.renameat2(-100, f"{mp}/x1".encode(), -100, f"{mp}/x3".encode(), 1) == 0
        # a file unlinked while open keeps working until closed, and leaves nothing behind
        fd = os.open(f"{mp}/tmpfile", os.O_CREAT | os.O_RDWR, 0o600)
        os.write(fd, b"abc")
        os.unlink(f"{mp}/tmpfile")
        os.write(fd, b"def")
        assert os.fstat(fd).st_size == 6
        assert os.pread(fd, 6, 0) == b"abcdef"
        os.close(fd)
        # O_TRUNC, ftruncate, pwrite past EOF (a hole), fsync
        with open(f"{mp}/x2", "wb") as f:
            f.write(b"new")
        fd = os.open(f"{mp}/holey", os.O_CREAT | os.O_WRONLY, 0o644)
        os.pwrite(fd, b"end", 3 << 20)
        os.ftruncate(fd, (3 << 20) + 2)
        os.fsync(fd)
        os.close(fd)
        assert os.stat(f"{mp}/a/hard.bin").st_size == 100000
    assert b"Traceback" not in proc.output, proc.output.decode(errors="replace")
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert sorted(fs.listdir("/")) == sorted(
            ["lost+found", "copied.bin", "a", "umasked", "x2", "x3", "holey"])
        assert fs.read_bytes("/copied.bin") == payload[:100000]
        assert fs.stat("/a/hard.bin").st_ino == fs.stat("/copied.bin").st_ino
        assert fs.stat("/copied.bin").st_nlink == 2
        assert fs.readlink("/a/soft") == "../copied.bin"
        st = fs.stat("/a/b/moved.txt")
        assert (stat.S_IMODE(st.st_mode), st.st_mtime_ns) == (0o640, 1_500_000_000_123_456_789)
        assert st.st_atime_ns > 1_600_000_000 * 10**9          # touch -m left atime alone (OMIT)
        assert fs.read_text("/a/b/moved.txt") == "hello\n"
        assert stat.S_ISFIFO(fs.lstat("/a/fifo").st_mode)
        assert stat.S_IMODE(fs.stat("/umasked").st_mode) == 0o644
        assert fs.listxattr("/copied.bin") == ["user.tag"]
        assert fs.getxattr("/copied.bin", "user.tag") == b"v1"
        assert fs.read_bytes("/x2") == b"new" and fs.read_bytes("/x3") == b"1"
        assert fs.read_bytes("/holey") == bytes(3 << 20) + b"en"
        assert fs.isdir("/a/b/c")


def test_chmod_through_the_mount_rewrites_the_access_acl(work: tuple[str, str]) -> None:
    """cp -a stores an access ACL; a later chmod on the mount must carry it along, as the kernel
    does on tmpfs (else the ACL would grant what the mode refuses)."""
    import struct
    acl = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in (
        (1, 6, 0xFFFFFFFF), (2, 6, 1000), (4, 4, 0xFFFFFFFF), (0x10, 6, 0xFFFFFFFF), (0x20, 4, 0xFFFFFFFF)))
    d, mp = work
    ref = os.path.join(d, "ref")
    open(ref, "wb").close()
    try:
        os.setxattr(ref, "system.posix_acl_access", acl)
    except OSError as err:
        pytest.skip(f"tmpfs here keeps no POSIX ACLs: {err}")
    os.chmod(ref, 0o640)
    img = os.path.join(d, "acl.img")
    xipfs.mkfs(img, 8 << 20)
    with mounted(img, mp):
        open(f"{mp}/f", "wb").close()
        os.setxattr(f"{mp}/f", "system.posix_acl_access", acl)
        os.chmod(f"{mp}/f", 0o640)
    with xipfs.open(img) as fs:
        assert fs.getxattr("/f", "system.posix_acl_access") == os.getxattr(ref, "system.posix_acl_access")
        assert fs.stat("/f").st_mode == os.stat(ref).st_mode
    assert_fsck_clean(img)


def test_new_files_belong_to_the_caller_and_permissions_hold(work: tuple[str, str]) -> None:
    """With allow_other, another user's new files are theirs, and the kernel enforces modes."""
    d, mp = work
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    img = os.path.join(d, "perm.img")
    xipfs.mkfs(img, 8 << 20)
    with mounted(img, mp, options="allow_other"):
        os.mkdir(f"{mp}/pub", 0o777)
        os.chmod(f"{mp}/pub", 0o1777)
        with open(f"{mp}/private", "w") as f:
            f.write("root only\n")
        os.chmod(f"{mp}/private", 0o600)
        # the child reaches the mount through an inherited descriptor: the temporary
        # directories above it are root's alone
        as_user = ("import os, sys\n"
                   f"os.setgroups([]); os.setgid({UID}); os.setuid({UID})\n"
                   "os.fchdir(int(sys.argv[1]))\n"
                   "open('pub/mine', 'w').write('ok')\n"
                   "os.mkdir('pub/dir')\n"
                   "os.symlink('mine', 'pub/lnk')\n"
                   "for p in ('private', 'newfile'):\n"
                   "    try:\n"
                   "        open(p, 'a')\n"
                   "    except PermissionError:\n"
                   "        print('denied', p)\n")
        root = os.open(mp, os.O_RDONLY | os.O_DIRECTORY)
        try:
            proc = subprocess.run([sys.executable, "-c", as_user, str(root)], pass_fds=(root,),
                                  capture_output=True, timeout=60)
        finally:
            os.close(root)
        assert proc.returncode == 0, proc.stderr.decode()
        out = proc.stdout.decode().split("\n")
        assert out[:2] == ["denied private", "denied newfile"]
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        for p in ("/pub/mine", "/pub/dir", "/pub/lnk"):
            st = fs.lstat(p)
            assert (st.st_uid, st.st_gid) == (UID, UID), p
        assert fs.read_bytes("/pub/mine") == b"ok"
        assert not fs.exists("/newfile")


# -- ending -----------------------------------------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_and_leaves_a_clean_image(work: tuple[str, str], sig: int) -> None:
    """SIGTERM/SIGINT to the server unmounts and closes the image clean, even with a file of
    the mount still open (unlinked: the inode lives on, nameless, until the kernel forgets it)."""
    d, mp = work
    img = os.path.join(d, "sig.img")
    xipfs.mkfs(img, 8 << 20)
    with mounted(img, mp) as proc:
        with open(f"{mp}/kept", "w") as f:
            f.write("kept\n")
        fd = os.open(f"{mp}/open-unlinked", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            os.write(fd, b"x" * 10000)
            os.unlink(f"{mp}/open-unlinked")
            assert sorted(os.listdir(mp)) == ["kept", "lost+found"]
            assert os.fstat(fd).st_nlink == 0 and os.pread(fd, 3, 9997) == b"xxx"
            proc.send_signal(sig)
            assert proc.wait(timeout=MOUNT_TIMEOUT) == 0, proc.stderr.read().decode() if proc.stderr else ""
            assert not os.path.ismount(mp)
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert sorted(fs.listdir("/")) == ["kept", "lost+found"]
        assert fs.read_bytes("/kept") == b"kept\n"


def test_background_mount_returns_when_live(work: tuple[str, str]) -> None:
    """foreground=False returns once mounted; errors before that are raised to the caller."""
    d, mp = work
    img = os.path.join(d, "bg.img")
    xipfs.mkfs(img, 8 << 20)
    with pytest.raises(FileNotFoundError):
        xfuse.mount(os.path.join(d, "missing.img"), mp, foreground=False)
    assert not os.path.ismount(mp)
    xfuse.mount(img, mp, foreground=False)
    try:
        assert os.path.ismount(mp)
        with open(f"{mp}/bg", "w") as f:
            f.write("bg")
    finally:
        _unmount(mp, None)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while True:                             # the server closes the image after the unmount
        try:
            with xipfs.open(img, "r+") as fs:
                assert fs.read_bytes("/bg") == b"bg"
            break
        except OSError as err:
            if err.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    assert_fsck_clean(img)


# -- the pieces ---------------------------------------------------------------------------------
def test_options() -> None:
    """-o style options parse; libfuse gets mount options only (xipfs keeps its own)."""
    assert xfuse.parse_options("ro, allow_other,max_read=65536") == {
        "ro": True, "allow_other": True, "max_read": "65536"}
    assert xfuse.parse_options(["ro", "a=1,b"]) == {"ro": True, "a": "1", "b": True}
    assert xfuse.parse_options(None) == {}
    ro = xfuse.fuse_options("/dev/shm/x,y.img", True, {"allow_other": True, "read_path": "copy",
                                                        "attr_timeout": "5", "use_ino": True})
    assert ro == {"fsname": "xipfs:/dev/shm/x,y.img", "subtype": "xipfs", "default_permissions": True,
                  "ro": True, "allow_other": True}
    assert xfuse._escape("xipfs:/dev/shm/x,y.img") == "xipfs:/dev/shm/x\\,y.img"
    assert "ro" not in xfuse.fuse_options("img", False, {})
    with pytest.raises(NotADirectoryError):
        xfuse.mount("img", "/nonexistent/mountpoint")


def test_libfuse3_is_loaded_by_its_soname() -> None:
    """libfuse 2 beside libfuse 3 (fuse2fs installs it) is never picked: its options differ."""
    if xfuse.fuse_available() and "libfuse" in (xfuse.fuse_available() or ""):
        pytest.skip("libfuse 3 is not installed")
    lib = xfuse._libfuse()
    assert os.path.basename(lib._name).startswith("libfuse3")
    assert 300 <= lib.fuse_version() < 400


def test_operations_without_a_mount(tmp_path: Any) -> None:
    """The operations by inode on their own: what the kernel would mostly catch first is right,
    node 1 is the root, and an unlinked inode lives until the kernel forgets it."""
    img = str(tmp_path / "ops.img")
    xipfs.mkfs(img, 8 << 20, block_size=1024)
    with xipfs.open(img, "r+") as fs:
        # an image written through the page-cache device cannot be read by descriptor
        assert (xfuse.Operations(fs).image_fd >= 0) == fs.is_xip
        ops = xfuse.Operations(fs, read_path="copy")
        node, fh = ops.create(1, b"a", 0o640, os.O_RDWR | os.O_CREAT, 1000, 100)
        assert (node.mode, node.uid, node.gid) == (0o100640, 1000, 100)      # exactly as sent
        assert ops.write(fh, b"hello", 0) == (5, False)
        assert ops.write(fh, b"!", 3000) == (1, False)      # a hole of two blocks
        with pytest.raises(FileExistsError):
            ops.create(1, b"a", 0o600, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0, 0)
        d = ops.mkdir(1, b"d", 0o777, 0, 0)
        assert d.mode == 0o40777                             # no umask of the server's
        ops.create(d.ino, b"b", 0o600, os.O_WRONLY, 0, 0)
        with pytest.raises(OSError) as exc:
            ops.rename(1, b"a", d.ino, b"b", xfuse.RENAME_NOREPLACE)
        assert exc.value.errno == errno.EEXIST
        with pytest.raises(FileNotFoundError):             # both names must exist, as in Linux
            ops.rename(1, b"a", d.ino, b"c", xfuse.RENAME_EXCHANGE)
        with pytest.raises(OSError) as exc:
            ops.rename(1, b"a", d.ino, b"b", 4)             # RENAME_WHITEOUT: not carried
        assert exc.value.errno == errno.EINVAL
        ops.rename(1, b"a", d.ino, b"c", xfuse.RENAME_NOREPLACE)
        dh = ops.opendir(d.ino)
        names = {name: ino for name, ino, _ in ops.readdir(dh, 0)}
        assert sorted(names) == [b".", b"..", b"b", b"c"]
        assert names[b"."] == d.ino and names[b".."] == 2
        assert [n for n, _, _ in ops.readdir(dh, 3)] == [b"c"]
        ops.release(dh)
        assert ops.read_segments(fh, 4096, 0) == [(1024, ops.read_segments(fh, 1, 0)[0][1]),
                                                  (1024, -1), (953, ops.read_segments(fh, 1, 2048)[0][1])]
        assert ops.read_segments(fh, 10, 3001) == []
        buf = bytearray(10)
        assert ops.read_into(fh, memoryview(buf), 0) == 10 and bytes(buf) == b"hello" + bytes(5)
        assert ops.link(node.ino, 1, b"again").ino == node.ino
        assert ops.getattr(node.ino).links == 2
        ops.unlink(1, b"again")
        ops.unlink(d.ino, b"c")                         # open and known: it lives, nameless
        assert ops.getattr(node.ino).links == 0
        ops.setattr(node.ino, xfuse.SET_SIZE | xfuse.SET_MTIME, size=2, mtime_ns=5_000_000_007)
        st = ops.getattr(node.ino)
        assert (st.size, st.mtime_ns) == (2, 5_000_000_007)
        ops.release(fh)
        assert fh not in ops.handles
        assert ops.getattr(node.ino).links == 0         # the kernel still knows it
        ops.forget(node.ino, 2)                         # created and linked: two references
        with pytest.raises(OSError) as exc:
            ops.getattr(node.ino)
        assert exc.value.errno == errno.ESTALE
        with pytest.raises(FileNotFoundError):
            ops.lookup(1, b"missing")
        with pytest.raises(OSError) as exc:
            ops.lookup(1, b"x" * 256)
        assert exc.value.errno == errno.ENAMETOOLONG
        b = ops.open(ops.lookup(d.ino, b"b").ino, os.O_RDWR)
        for mode in (0, 1, 3):                          # plain, KEEP_SIZE, PUNCH_HOLE|KEEP_SIZE
            with pytest.raises(OSError) as exc:
                ops.fallocate(b, mode, 0, 4096)
            assert exc.value.errno == errno.EOPNOTSUPP
        ops.close_all()
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        ops = xfuse.Operations(fs)
        b = ops.lookup(ops.lookup(1, b"d").ino, b"b").ino
        for call in (lambda: ops.mkdir(1, b"x", 0o755, 0, 0), lambda: ops.open(b, os.O_RDWR),
                     lambda: ops.setattr(b, xfuse.SET_MODE, mode=0o700),
                     lambda: ops.create(1, b"y", 0o644, os.O_WRONLY, 0, 0)):
            with pytest.raises(OSError) as exc:
                call()
            assert exc.value.errno == errno.EROFS
        assert ops.image_fd >= 0 and ops.splice           # read-only: libfuse reads the file


# -- as Linux does it (each failed with the high-level door) ---------------------------------
def test_hard_links_are_one_inode(work: tuple[str, str]) -> None:
    """After ``ln a b``: a shows two links, chmod of b is seen through a, and what is written
    through b is read through a descriptor and a mapping of a opened before."""
    import mmap
    d, mp = work
    img = os.path.join(d, "links.img")
    xipfs.mkfs(img, 8 << 20)
    with mounted(img, mp):
        with open(f"{mp}/a", "wb") as f:
            f.write(b"A" * 8192)
        fd = os.open(f"{mp}/a", os.O_RDONLY)
        m = mmap.mmap(fd, 8192, prot=mmap.PROT_READ)
        try:
            assert os.pread(fd, 4, 0) == b"AAAA" and m[:4] == b"AAAA"
            os.link(f"{mp}/a", f"{mp}/b")
            assert os.stat(f"{mp}/a").st_nlink == 2
            assert os.stat(f"{mp}/a").st_ino == os.stat(f"{mp}/b").st_ino
            os.chmod(f"{mp}/b", 0o600)
            assert stat.S_IMODE(os.stat(f"{mp}/a").st_mode) == 0o600
            with open(f"{mp}/b", "r+b") as f:
                f.write(b"BBBB")
            assert os.pread(fd, 4, 0) == b"BBBB" and m[:4] == b"BBBB"
            os.unlink(f"{mp}/b")
            assert os.stat(f"{mp}/a").st_nlink == 1
        finally:
            m.close()
            os.close(fd)
    assert_fsck_clean(img)


def test_modes_are_the_callers_not_the_servers(work: tuple[str, str]) -> None:
    """The kernel applied the caller's umask; a server started under umask 077 adds nothing."""
    d, mp = work
    img = os.path.join(d, "umask.img")
    xipfs.mkfs(img, 8 << 20)
    old = os.umask(0o077)
    try:
        ctx = mounted(img, mp)
        proc = ctx.__enter__()
    finally:
        os.umask(old)
    try:
        code = ("import os, sys; os.umask(int(sys.argv[2], 8)); d = sys.argv[1]\n"
                "os.mkdir(d + '/dir'); os.close(os.open(d + '/file', os.O_CREAT | os.O_WRONLY, 0o777))\n"
                "os.mkfifo(d + '/fifo', 0o777)\n"
                "print(*[oct(os.stat(d + '/' + n).st_mode & 0o7777) for n in ('dir', 'file', 'fifo')])")
        for umask, want in (("0", "0o777 0o777 0o777"), ("022", "0o755 0o755 0o755")):
            sub = os.path.join(mp, "u" + umask)
            os.mkdir(sub)
            out = subprocess.run([sys.executable, "-c", code, sub, umask], capture_output=True, text=True)
            assert out.stdout.split() == want.split(), out.stderr
    finally:
        ctx.__exit__(None, None, None)
    assert proc.returncode == 0
    assert_fsck_clean(img)


def test_deep_trees_have_no_path_limit(work: tuple[str, str]) -> None:
    """Linux limits the path of each call, not the depth of the tree: 17 levels of 250-byte
    names are made relative to a directory descriptor, and a missing name there is ENOENT."""
    d, mp = work
    img = os.path.join(d, "deep.img")
    xipfs.mkfs(img, 16 << 20)
    with mounted(img, mp):
        fd = os.open(mp, os.O_RDONLY)
        try:
            for level in range(17):
                name = f"{level:02d}" + "d" * 248
                os.mkdir(name, dir_fd=fd)
                new = os.open(name, os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = new
            with pytest.raises(FileNotFoundError):
                os.stat("missing", dir_fd=fd)
            with open(os.open("leaf", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd), "w") as f:
                f.write("deep")
            with pytest.raises(OSError) as exc:
                os.stat("x" * 256, dir_fd=fd)
            assert exc.value.errno == errno.ENAMETOOLONG
        finally:
            os.close(fd)
    assert_fsck_clean(img)


def test_flags_fallocate_and_a_full_direct_write(work: tuple[str, str]) -> None:
    """lsattr/chattr through the mount (FS_IOC_GETFLAGS/SETFLAGS), immutable enforced; punching
    a hole is EOPNOTSUPP as on ext2; an O_DIRECT write that fills the image writes what fits."""
    import fcntl
    import struct as st
    d, mp = work
    img = os.path.join(d, "flags.img")
    xipfs.mkfs(img, 2 << 20)
    with mounted(img, mp):
        path = f"{mp}/f"
        with open(path, "wb") as f:
            f.write(b"x" * 5000)
        out = subprocess.run(["chattr", "+A", path], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        out = subprocess.run(["lsattr", path], capture_output=True, text=True)
        assert out.returncode == 0 and out.stdout.split()[0].count("A") == 1, out
        fd = os.open(path, os.O_RDONLY)
        try:
            flags = st.unpack("i", fcntl.ioctl(fd, xfuse.FS_IOC_GETFLAGS & 0xFFFFFFFF, b"\0" * 4))[0]
        finally:
            os.close(fd)
        assert flags & 0x80                                  # FS_NOATIME_FL
        subprocess.run(["chattr", "+i", path], check=True)
        with pytest.raises(PermissionError):
            os.open(path, os.O_WRONLY | os.O_APPEND)
        with pytest.raises(PermissionError):
            os.unlink(path)
        subprocess.run(["chattr", "-i", path], check=True)
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(path, os.O_RDWR)
        try:
            res = libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096))   # PUNCH_HOLE|KEEP_SIZE
            assert res == -1 and ctypes.get_errno() == errno.EOPNOTSUPP
        finally:
            os.close(fd)
        buf = mmap_buffer(4 << 20)
        fd = os.open(f"{mp}/big", os.O_CREAT | os.O_WRONLY | os.O_DIRECT, 0o644)
        try:
            try:
                n = os.write(fd, buf)
            except OSError as err:
                assert err.errno == errno.ENOSPC
            else:
                assert 0 < n < len(buf)
                assert os.fstat(fd).st_size == n
        finally:
            os.close(fd)
    assert_fsck_clean(img)


def mmap_buffer(size: int) -> memoryview:
    """A page-aligned buffer (O_DIRECT needs one)."""
    import mmap
    m = mmap.mmap(-1, size)
    m.write(b"y" * size)
    return memoryview(m)


def test_image_that_can_only_be_read_mounts_read_only(work: tuple[str, str]) -> None:
    """An image with a feature xipfs does not write (lazy_bg, say) is served read-only, with a
    warning."""
    d, mp = work
    img = mkfs(os.path.join(d, "lazy.img"), "8M")
    run(["debugfs", "-w", "-R", "feature lazy_bg", img])
    with mounted(img, mp) as proc:
        assert "ro" in _mount_options(mp)
        with pytest.raises(OSError) as exc:
            os.mkdir(f"{mp}/x")
        assert exc.value.errno == errno.EROFS
    assert b"mounting read-only" in proc.output


def test_an_ext4_image_mounts_read_write(work: tuple[str, str], tmp_path: Any) -> None:
    """An ext4 image (mke2fs -t ext4 defaults: extents, 64bit, flex_bg, checksums, journal) is
    served read-write: the mount shows what xipfs reads, and a tree copied in, appends, renames
    and removals through it leave an image e2fsck finds clean and xipfs reads back."""
    d, mp = work
    src = str(tmp_path / "src")
    build_tree(src)
    img = os.path.join(d, "tree.ext4")
    mkfs(img, "32M", src=src, fstype="ext4")
    want = image_listing(img)
    with mounted(img, mp):
        got = mount_listing(mp)
        assert sorted(got) == sorted(want)
        for path in want:
            assert got[path] == want[path], path
        run(["cp", "-a", src, os.path.join(mp, "copy")])
        for k in range(50):
            for name in ("a", "b"):
                with open(os.path.join(mp, f"log-{name}"), "ab") as f:
                    f.write(bytes([k]) * 3000)
        os.rename(os.path.join(mp, "log-a"), os.path.join(mp, "copy", "moved"))
        fd = os.open(os.path.join(mp, "prealloc"), os.O_CREAT | os.O_RDWR, 0o644)
        try:                                        # ext4: unwritten extents, as Linux's ext4
            os.posix_fallocate(fd, 0, 3 << 20)
            assert os.fstat(fd).st_size == 3 << 20
            libc = ctypes.CDLL(None, use_errno=True)
            assert libc.fallocate(fd, 1, ctypes.c_long(3 << 20), ctypes.c_long(1 << 20)) == 0   # KEEP_SIZE
            assert os.fstat(fd).st_size == 3 << 20
            assert libc.fallocate(fd, 3, ctypes.c_long(0), ctypes.c_long(4096)) == -1     # PUNCH_HOLE
            assert ctypes.get_errno() == errno.EOPNOTSUPP
            os.pwrite(fd, b"middle", 1 << 20)
        finally:
            os.close(fd)
        shutil.rmtree(os.path.join(mp, "copy", sorted(os.listdir(os.path.join(mp, "copy")))[0]),
                      ignore_errors=True)
        after = mount_listing(mp)
    assert_fsck_clean(img)

    def no_mtime(listing: dict[str, tuple]) -> dict[str, tuple]:     # the kernel's cache keeps its own
        return {p: v[:6] + v[7:] for p, v in listing.items()}
    assert no_mtime(image_listing(img)) == no_mtime(after)
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/log-b") == b"".join(bytes([k]) * 3000 for k in range(50))
        want = bytearray(3 << 20)
        want[1 << 20:(1 << 20) + 6] = b"middle"
        assert fs.read_bytes("/prealloc") == want
        extents = fs._inode("/prealloc").map.extents
        bs = fs.volume.bs
        assert any(e.unwritten for e in extents) and extents[-1].lblk + extents[-1].count >= (4 << 20) // bs


@pytest.mark.parametrize("writeback", ["1", "0"])
def test_appends_in_turns_land_once(work: tuple[str, str], writeback: str) -> None:
    """O_APPEND writes to several files in turns land exactly once: with the writeback cache
    the kernel applies O_APPEND and sends page writes at offsets, which the door must take as
    given (appending them again duplicated data); without it the door appends at EOF."""
    d, mp = work
    img = mkfs(os.path.join(d, "app.img"), "16M")
    want = {name: bytearray() for name in ("a", "b", "c")}
    with mounted(img, mp, options={"writeback_cache": writeback}):
        for k in range(40):
            for name, data in want.items():
                piece = bytes([k]) * (1000 + 97 * k)
                with open(os.path.join(mp, name), "ab") as f:
                    f.write(piece)
                data += piece
        for name, data in want.items():
            assert os.stat(os.path.join(mp, name)).st_size == len(data)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        for name, data in want.items():
            assert fs.read_bytes("/" + name) == data, name


def test_exchange_between_indexed_directories(work: tuple[str, str]) -> None:
    """RENAME_EXCHANGE as Linux's ext4: a directory and a file trade parents between two htree
    directories ('..' and link counts follow), two files swap; a directory into its own
    subtree is EINVAL; e2fsck finds the image clean."""
    d, _ = work
    img = os.path.join(d, "exchange.img")
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", img, "64M"])
    with xipfs.open(img, "r+") as fs:
        for top in ("A", "B"):
            fs.mkdir("/" + top)
            for i in range(800):                            # past one block: an htree
                fs.write_bytes(f"/{top}/file-{i:04d}", top.encode())
        fs.makedirs("/A/sub/deep")
        ops = xfuse.Operations(fs)
        a, b = fs.stat("/A").st_ino, fs.stat("/B").st_ino
        ops.rename(a, b"sub", b, b"file-0400", xfuse.RENAME_EXCHANGE)
        ops.rename(a, b"file-0001", b, b"file-0002", xfuse.RENAME_EXCHANGE)
        assert fs.read_bytes("/A/sub") == b"B" and fs.isdir("/B/file-0400/deep")
        assert fs.read_bytes("/A/file-0001") == b"B" and fs.read_bytes("/B/file-0002") == b"A"
        assert fs.stat("/B/file-0400/..").st_ino == b
        assert (fs.stat("/A").st_nlink, fs.stat("/B").st_nlink) == (2, 3)
        with pytest.raises(OSError) as exc:
            ops.rename(b, b"file-0400", fs.stat("/B/file-0400").st_ino, b"deep", xfuse.RENAME_EXCHANGE)
        assert exc.value.errno == errno.EINVAL
        vol = fs.volume
        pair = [vol.inode(fs.stat(p).st_ino) for p in ("/A/file-0003", "/B/file-0004")]
        for node in pair:                                   # both inodes' ctime moves
            node.ctime_ns = 0
            vol.write_inode(node)
        ops.rename(a, b"file-0003", b, b"file-0004", xfuse.RENAME_EXCHANGE)
        assert fs.stat("/A/file-0003").st_ctime_ns > 0 and fs.stat("/B/file-0004").st_ctime_ns > 0
        fs.nodes.set_flags(vol.inode(b), L.FL_APPEND)      # the target loses its name: not append-only
        with pytest.raises(OSError) as exc:
            ops.rename(a, b"file-0005", b, b"file-0006", xfuse.RENAME_EXCHANGE)
        assert exc.value.errno == errno.EPERM
        fs.nodes.set_flags(vol.inode(b), 0)
    assert_fsck_clean(img)
