"""Where the library once differed from Linux, each call checked against the kernel itself.

The oracle is a tmpfs directory under /dev/shm (the VFS rules are the same for every
filesystem) or an ext2 image loop-mounted by Linux (ext2's own rules), never xipfs:

* extended attributes by file type: ``user.*`` only on regular files and directories (EPERM to
  change, ENODATA to read elsewhere, ``xattr_permission``), no POSIX ACL on a symlink, a default
  ACL only on a directory, an absent ACL removed without error, XATTR_CREATE/REPLACE ignored
  for ACLs; following a symlink or not;
* ``link`` of a symlink: ``follow_symlinks`` as ``os.link`` takes it;
* an xattr block only one inode uses is rewritten in place, so removing an attribute or
  ``chmod`` of a file with an ACL works on a completely full filesystem (as Linux's ext2);
* ENAMETOOLONG only for the path a caller passes (PATH_MAX 4096 with the NUL), never for one
  built by following symlinks, nor for one a door passes on.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import sys
import tempfile

import pytest
from e2fs import SHM, assert_fsck_clean, debugfs_r, memory_image, mkfs, run
from write_util import IS_ROOT, attempt, err_key, umask

import xipfs
from xipfs.extfs import namei
from xipfs.extfs.namei import resolve

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux")

KINDS = ["file", "dir", "fifo", "chr", "blk", "sock", "symlink", "dangling"]


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


U = 0xFFFFFFFF
#: An ACL that says more than the mode (a named user, so a mask), and one that does not.
ACL = _acl((1, 6, U), (2, 4, 1000), (4, 4, U), (0x10, 4, U), (0x20, 4, U))
PLAIN_ACL = _acl((1, 6, U), (4, 4, U), (0x20, 4, U))
XATTRS = [("user.x", b"v"), ("trusted.x", b"v"), ("security.x", b"v"),
          ("system.posix_acl_access", ACL), ("system.posix_acl_default", ACL),
          ("system.posix_acl_access", PLAIN_ACL), ("system.other", b"v")]


class OsSide:
    """The calls on a real directory (paths as the image sees them)."""

    def __init__(self, root: str) -> None:
        self.root = root

    def p(self, path: str) -> str:
        return self.root + path

    def make(self, kind: str, path: str) -> None:
        p = self.p(path)
        if kind == "file":
            open(p, "wb").close()
        elif kind == "dir":
            os.mkdir(p)
        elif kind == "fifo":
            os.mkfifo(p)
        elif kind in ("chr", "blk"):
            os.mknod(p, (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | 0o644, os.makedev(1, 3))
        elif kind == "sock":
            os.mknod(p, stat.S_IFSOCK | 0o644)
        else:
            os.symlink("file" if kind == "symlink" else "nowhere", p)

    def symlink(self, target: str, path: str) -> None:
        os.symlink(target, self.p(path))

    def link(self, src: str, dst: str, **kw) -> None:
        os.link(self.p(src), self.p(dst), **kw)

    def __getattr__(self, name: str):
        call = getattr(os, name)
        return lambda path, *a, **kw: call(self.p(path), *a, **kw)


class XipSide:
    """The same calls on an image."""

    def __init__(self, fs: xipfs.Filesystem) -> None:
        self.fs = fs

    def make(self, kind: str, path: str) -> None:
        fs = self.fs
        if kind == "file":
            fs.write_bytes(path, b"")
        elif kind == "dir":
            fs.mkdir(path)
        elif kind == "fifo":
            fs.mkfifo(path)
        elif kind in ("chr", "blk"):
            fs.mknod(path, (stat.S_IFCHR if kind == "chr" else stat.S_IFBLK) | 0o644, os.makedev(1, 3))
        elif kind == "sock":
            fs.mknod(path, stat.S_IFSOCK | 0o644)
        else:
            fs.symlink("file" if kind == "symlink" else "nowhere", path)

    def __getattr__(self, name: str):
        return getattr(self.fs, name)


def outcome(call) -> str:
    """``ok``, ``ok:<value or names>`` or the errno name."""
    value, err = attempt(call)
    if err is not None:
        return errno.errorcode[err.errno]
    if isinstance(value, list):
        return f"ok:{sorted(v for v in value if not v.startswith('security.selinux'))}"
    return "ok" if value is None else f"ok:{value!r}"


def xattr_matrix(side, kind: str) -> list[str]:
    """Every xattr call on one file type, following symlinks and not, in a fixed order."""
    rows = []
    side.make("file", f"/{kind}-target")
    for i, (name, value) in enumerate(XATTRS):
        for follow in (True, False):
            d = f"/{kind}-{i}-{int(follow)}"
            side.mkdir(d)
            side.make("file", f"{d}/file")
            p = f"{d}/{kind}"
            side.make(kind, p)
            rows.append(f"{kind} {name} {len(value)} follow={follow}: "
                        + xattr_row(side, p, name, value, follow))
    return rows


def xattr_row(side, p: str, name: str, value: bytes, follow: bool) -> str:
    """The outcomes of one sequence of xattr calls on ``p``."""
    kw = {"follow_symlinks": follow}
    return " ".join([
                outcome(lambda: side.getxattr(p, name, **kw)),
                outcome(lambda: side.removexattr(p, name, **kw)),
                outcome(lambda: side.setxattr(p, name, value, **kw)),
                outcome(lambda: side.setxattr(p, name, value, os.XATTR_CREATE, **kw)),
                outcome(lambda: side.getxattr(p, name, **kw)),
                outcome(lambda: side.listxattr(p, **kw)),
                outcome(lambda: side.removexattr(p, name, **kw)),
                outcome(lambda: side.setxattr(p, name, value, os.XATTR_REPLACE, **kw)),
                outcome(lambda: side.removexattr(p, name, **kw)),
                f"mode={stat.filemode(side.lstat(p).st_mode)}"])


@pytest.mark.skipif(not IS_ROOT, reason="device nodes and trusted.* need root")
@pytest.mark.parametrize("kind", KINDS)
def test_xattrs_by_file_type(kind: str) -> None:
    """Every xattr call on every file type answers as tmpfs does: user.* only on regular
    files and directories, POSIX ACL rules, security.* and trusted.* everywhere (root)."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp, umask(0o022):
        os.mkdir(f"{tmp}/ref")
        want = xattr_matrix(OsSide(f"{tmp}/ref"), kind)
        img = mkfs(f"{tmp}/img", "8M", bs=1024)
        with xipfs.open(img, "r+") as fs:
            got = xattr_matrix(XipSide(fs), kind)
        assert got == want
        assert_fsck_clean(img)


@pytest.mark.skipif(not IS_ROOT, reason="loop mounts need root")
def test_user_xattrs_already_on_a_symlink_as_linux_ext2() -> None:
    """An image that holds user.* attributes on a symlink and a FIFO (debugfs puts them
    there): Linux's ext2 lists them, reads them as ENODATA and refuses to remove them (EPERM);
    trusted.* there reads and goes normally. The image is the oracle mounted by Linux."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        img = mkfs(f"{tmp}/img", "4M", bs=1024)
        debugfs_r(img, "symlink /s target", write=True)
        with xipfs.open(img, "r+") as fs:
            fs.mkfifo("/p")
        cmds = "".join(f"ea_set {p} {n} abc\n" for p in ("/s", "/p") for n in ("user.u", "trusted.t"))
        run(["debugfs", "-w", "-f", "-", img], input=cmds.encode())
        kernel_img = f"{tmp}/kernel.img"
        shutil.copyfile(img, kernel_img)

        def calls(side) -> list[str]:
            return calls_on(side, "/s") + calls_on(side, "/p")

        def calls_on(side, p: str) -> list[str]:
            return [outcome(lambda: side.listxattr(p, follow_symlinks=False)),
                        outcome(lambda: side.getxattr(p, "user.u", follow_symlinks=False)),
                        outcome(lambda: side.getxattr(p, "trusted.t", follow_symlinks=False)),
                        outcome(lambda: side.removexattr(p, "user.u", follow_symlinks=False)),
                        outcome(lambda: side.setxattr(p, "user.u", b"x", follow_symlinks=False)),
                        outcome(lambda: side.removexattr(p, "trusted.t", follow_symlinks=False)),
                        outcome(lambda: side.listxattr(p, follow_symlinks=False))]

        with loop_mounted(kernel_img) as mnt:
            want = calls(OsSide(mnt))
        assert want[0] == "ok:['trusted.t', 'user.u']" and want[1] == "ENODATA"
        with xipfs.open(img, "r+") as fs:
            got = calls(XipSide(fs))
        assert got == want
        assert_fsck_clean(img)
        assert_fsck_clean(kernel_img)


@pytest.mark.parametrize("how", ["default", "follow", "nofollow"])
@pytest.mark.parametrize("src", ["/sym", "/dangling", "/dirsym", "/file"])
def test_link_a_symlink(src: str, how: str) -> None:
    """``link`` takes ``follow_symlinks`` as ``os.link`` does on Linux: left out, it does what
    os.link does on this Python (link(2): the symlink itself, before 3.14); True follows the
    symlink (linkat with AT_SYMLINK_FOLLOW), False does not."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        ref = f"{tmp}/ref"
        os.mkdir(ref)
        img = mkfs(f"{tmp}/img", "4M", bs=1024)

        def setup(side) -> None:
            side.make("file", "/file")
            side.mkdir("/dir")
            side.symlink("file", "/sym")
            side.symlink("nowhere", "/dangling")
            side.symlink("dir", "/dirsym")

        def shape(side) -> tuple:
            st = side.lstat("/new")
            return (stat.S_IFMT(st.st_mode), st.st_nlink, side.lstat(src).st_nlink,
                    side.lstat("/file").st_nlink)

        kw = {} if how == "default" else {"follow_symlinks": how == "follow"}
        ours = OsSide(ref)
        setup(ours)
        dirfd = os.open(ref, os.O_RDONLY | os.O_DIRECTORY)
        try:
            if how == "follow":   # a dir fd makes os.link call linkat(AT_SYMLINK_FOLLOW) on any Python
                _, want_err = attempt(lambda: os.link(src.lstrip("/"), "new", src_dir_fd=dirfd,
                                                      dst_dir_fd=dirfd, follow_symlinks=True))
            else:
                _, want_err = attempt(lambda: os.link(ref + src, ref + "/new", **kw))
        finally:
            os.close(dirfd)
        want = None if want_err else shape(ours)
        with xipfs.open(img, "r+") as fs:
            side = XipSide(fs)
            setup(side)
            _, got_err = attempt(lambda: fs.link(src, "/new", **kw))
            got = None if got_err else shape(side)
        assert err_key(got_err) == err_key(want_err)
        assert got == want
        assert_fsck_clean(img)


# -- a full filesystem ------------------------------------------------------------------------------
def fill_up(write) -> None:
    """Call ``write(chunk)`` (it returns what it wrote) until nothing more fits."""
    for size in (1 << 20, 1 << 16, 4096, 1024):
        while True:
            try:
                if write(b"\x5a" * size) < size:
                    break
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                break


def fill_to_the_last_block(side) -> None:
    """A big file until it stops growing, then one-block files into what is left (a block
    the big file could not use for want of an indirect block)."""
    with side.open("/fill", "wb", buffering=0) as f:
        fill_up(f.write)
    for i in range(1000):
        _, err = attempt(lambda i=i: side.write_bytes(f"/small{i}", b"s"))
        if err is not None:
            assert err.errno == errno.ENOSPC, err
            return


def full_fs_calls(side, bs: int) -> list[str]:
    """Attribute changes that need no new block when an unshared xattr block is changed in place."""
    return [outcome(lambda: side.removexattr("/x", "user.a")),
            outcome(lambda: side.setxattr("/x", "user.b", b"B" * 40)),
            outcome(lambda: side.getxattr("/x", "user.b")),
            outcome(lambda: side.listxattr("/x")),
            outcome(lambda: side.chmod("/acl", 0o640)),
            outcome(lambda: side.getxattr("/acl", "system.posix_acl_access")),
            outcome(lambda: stat.filemode(side.lstat("/acl").st_mode)),
            outcome(lambda: side.removexattr("/acl", "system.posix_acl_access")),
            outcome(lambda: side.setxattr("/acl", "system.posix_acl_access", ACL)),
            outcome(lambda: side.setxattr("/x", "user.new", b"n" * (bs - 40))),   # does not fit
            outcome(lambda: side.removexattr("/x", "user.b")),             # the last one: block freed
            outcome(lambda: side.listxattr("/x"))]


@pytest.mark.skipif(not IS_ROOT, reason="loop mounts need root")
@pytest.mark.parametrize("bs", [1024, 4096])
def test_xattr_changes_on_a_full_filesystem(bs: int) -> None:
    """With not one block free, removing an xattr, replacing one and chmod of a file with an
    ACL work, as on Linux's ext2 (the block only this inode uses is rewritten in place);
    the image stays e2fsck-clean. Linux, on a loop mount of the same image, is the oracle."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        img = mkfs(f"{tmp}/img", "2M", bs=bs, extra=("-m", "0"))
        with xipfs.open(img, "r+") as fs:
            fs.write_bytes("/x", b"x")
            fs.setxattr("/x", "user.a", b"A" * 30)
            fs.setxattr("/x", "user.b", b"b" * 40)
            fs.write_bytes("/acl", b"acl")
            fs.setxattr("/acl", "system.posix_acl_access", ACL)
        kernel_img = f"{tmp}/kernel.img"
        shutil.copyfile(img, kernel_img)
        with loop_mounted(kernel_img) as mnt:
            fill_to_the_last_block(WriteOsSide(mnt))
            os.sync()
            kernel_free = os.statvfs(mnt).f_bfree
            want = full_fs_calls(OsSide(mnt), bs)
        assert_fsck_clean(kernel_img)
        assert want[0] == "ok" and want[4] == "ok", want       # Linux manages on a full fs
        with xipfs.open(img, "r+") as fs:
            fill_to_the_last_block(fs)
            assert fs.statvfs("/").f_bfree == 0 == kernel_free
            got = full_fs_calls(XipSide(fs), bs)
            fs.sync()
            assert_fsck_clean(img)
        assert got == want
        assert_fsck_clean(img)


@pytest.mark.parametrize("full", [False, True])
def test_shared_xattr_block_is_copied(full: bool) -> None:
    """A block two inodes share (pack makes them, as Linux's ext2 does) is not changed in
    place: the changed inode gets a new block (ENOSPC when none is free, nothing changed)
    and the other keeps its attributes."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        src = f"{tmp}/src"
        os.mkdir(src)
        for name in ("a", "b"):
            with open(f"{src}/{name}", "wb") as f:
                f.write(name.encode())
            os.setxattr(f"{src}/{name}", "user.one", b"1")
            os.setxattr(f"{src}/{name}", "user.two", b"2")
        img = f"{tmp}/img"
        xipfs.pack(src, img, size=2 << 20, block_size=1024)
        with xipfs.open(img, "r+") as fs:
            assert resolve(fs.volume, "/a").file_acl == resolve(fs.volume, "/b").file_acl
            if full:
                with fs.open("/fill", "wb", buffering=0) as f:
                    fill_up(f.write)
            _, err = attempt(lambda: fs.removexattr("/a", "user.one"))
            assert err_key(err) == (("OSError", errno.ENOSPC) if full else None)
            assert fs.listxattr("/a") == (["user.one", "user.two"] if full else ["user.two"])
            assert fs.listxattr("/b") == ["user.one", "user.two"]
            fs.sync()
            assert_fsck_clean(img)
        assert_fsck_clean(img)


# -- ENAMETOOLONG -------------------------------------------------------------------------------------
NAME = "n" * 250


@pytest.mark.parametrize("length", [4095, 4096])
@pytest.mark.parametrize("call", ["stat", "mkdir", "open", "unlink", "setxattr", "link_dst"])
def test_path_max_is_the_callers_path(call: str, length: int) -> None:
    """A missing name at the end of a path of 4095 bytes (16 levels of 250-byte names) is
    ENOENT, at the end of one of 4096 bytes ENAMETOOLONG (PATH_MAX counts the NUL), whatever
    the call, as on tmpfs (called there with a relative path of the same length)."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        ref = f"{tmp}/ref"
        os.mkdir(ref)
        img = mkfs(f"{tmp}/img", "4M", bs=1024)
        top = "/" + "/".join([NAME] * 16)                        # 4016 bytes
        path = top + "/" + "m" * (length - len(top) - 1)
        assert len(path) == length
        rel = path[1:] + "m"                                     # the same length, from ref
        calls = {
            "stat": (lambda fs: fs.stat(path), lambda: os.stat(rel)),
            "mkdir": (lambda fs: fs.mkdir(path), lambda: os.mkdir(rel)),
            "open": (lambda fs: fs.open(path, "rb").close(), lambda: open(rel, "rb").close()),  # noqa: SIM115
            "unlink": (lambda fs: fs.unlink(path), lambda: os.unlink(rel)),
            "setxattr": (lambda fs: fs.setxattr(path, "user.a", b"1"),
                         lambda: os.setxattr(rel, "user.a", b"1")),
            "link_dst": (lambda fs: fs.link("/f", path), lambda: os.link("f", rel)),
        }
        mine, theirs = calls[call]
        cwd = os.getcwd()
        try:
            os.chdir(ref)
            open("f", "wb").close()
            for _ in range(16):
                os.mkdir(NAME)
                os.chdir(NAME)
            os.chdir(ref)
            _, want = attempt(theirs)
        finally:
            os.chdir(cwd)
        with xipfs.open(img, "r+") as fs:
            fs.write_bytes("/f", b"")
            fs.makedirs(top)
            _, got = attempt(lambda: mine(fs))
        assert err_key(got) == err_key(want)
        if length == 4096:
            assert err_key(want) == ("OSError", errno.ENAMETOOLONG)
        elif call in ("mkdir", "link_dst"):
            assert want is None                      # a long but legal path: made
        else:
            assert err_key(want) == ("FileNotFoundError", errno.ENOENT)


def test_deep_tree_through_symlinks() -> None:
    """17 levels of 250-byte names (4267 bytes from the root) are made and used with short
    paths through symlinks, as on tmpfs: only the caller's path is limited, not the one
    following symlinks builds. The absolute path is ENAMETOOLONG on both."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp, umask(0o022):
        ref = f"{tmp}/ref"
        os.mkdir(ref)
        img = mkfs(f"{tmp}/img", "8M", bs=4096)
        top15 = "/" + "/".join([NAME] * 15)                   # 3765 bytes
        made = f"/s/{NAME}/{NAME}/made"
        deep = top15 + f"/{NAME}" * 2                          # 4267 bytes

        def steps(side) -> list[str]:
            out = []
            for i in range(1, 16):
                out.append(outcome(lambda i=i: side.mkdir("/" + "/".join([NAME] * i))))
            out.append(outcome(lambda: side.symlink(top15[1:], "/s")))      # a 3764-byte target
            out.append(outcome(lambda: side.mkdir(f"/s/{NAME}")))
            out.append(outcome(lambda: side.mkdir(f"/s/{NAME}/{NAME}")))
            out.append(outcome(lambda: side.write_bytes(f"/s/{NAME}/{NAME}/f", b"deep")))
            out.append(outcome(lambda: side.stat(f"/s/{NAME}/{NAME}/f").st_size))
            out.append(outcome(lambda: side.stat(f"/s/{NAME}/{NAME}/missing")))
            # a dangling symlink whose target, joined to its directory, is over 4096 bytes:
            # creating through it follows, and makes the file in the 17th level
            out.append(outcome(lambda: side.symlink(f"{NAME}/{NAME}/made", top15 + "/dl")))
            out.append(outcome(lambda: side.write_bytes(top15 + "/dl", b"made")))
            out.append(outcome(lambda: side.read_bytes(made)))
            out.append(outcome(lambda: side.stat(deep)))                   # the caller's path: too long
            out.append(outcome(lambda: side.listdir(f"/s/{NAME}")))
            return out

        want = steps(WriteOsSide(ref))
        assert "ENAMETOOLONG" in want and want.count("ok") >= 18, want
        with xipfs.open(img, "r+") as fs:
            got = steps(fs)
            assert got == want
            # an internal lookup (a door passes the path on) is not limited either
            assert resolve(fs.volume, deep + "/f").size == 4
            fs.path_max = None
            assert fs.read_bytes(deep + "/f") == b"deep"
        assert_fsck_clean(img)


def test_deep_tree_with_the_ext2_layer() -> None:
    """The facade has no working directory nor ``dir_fd``, so a path past PATH_MAX from the
    root cannot be named to it; the ext2 layer makes such a tree from parent inodes (as a
    door would), and e2fsck finds it clean."""
    with tempfile.TemporaryDirectory(dir=SHM) as tmp:
        img = mkfs(f"{tmp}/img", "8M", bs=1024)
        with xipfs.open(img, "r+") as fs:
            vol = fs.volume
            node = vol.root
            with vol.lock:
                for _ in range(17):
                    node = namei.create(vol, node, NAME.encode(), 0o040755, 0, 0)
            path = f"/{NAME}" * 17
            assert resolve(vol, path).ino == node.ino
            _, err = attempt(lambda: fs.stat(path))
            assert err_key(err) == ("OSError", errno.ENAMETOOLONG)
        assert_fsck_clean(img)


class WriteOsSide(OsSide):
    """:class:`OsSide` with the file calls of the facade."""

    def open(self, p: str, mode: str, buffering: int = -1):
        return open(self.p(p), mode, buffering=buffering)  # noqa: SIM115

    def write_bytes(self, p: str, data: bytes) -> int:
        with open(self.p(p), "wb") as f:
            return f.write(data)

    def read_bytes(self, p: str) -> bytes:
        with open(self.p(p), "rb") as f:
            return f.read()


# -- tools --------------------------------------------------------------------------------------------
class loop_mounted:  # noqa: N801  (used as a context manager, like a function)
    """Loop-mount ``img`` read-write as ext2 with ACLs and user xattrs; skip when impossible."""

    def __init__(self, img: str) -> None:
        self.img = img
        self.mnt = ""

    def __enter__(self) -> str:
        self.mnt = tempfile.mkdtemp(prefix="xipfs-mnt-", dir=SHM)
        proc = run(["mount", "-t", "ext2", "-o", "loop,acl,user_xattr", self.img, self.mnt],
                   check=False, timeout=60)
        if proc.returncode != 0:
            os.rmdir(self.mnt)
            pytest.skip(f"mount -o loop failed: {proc.stderr.decode(errors='replace').strip()}")
        return self.mnt

    def __exit__(self, *exc: object) -> None:
        run(["umount", self.mnt], timeout=60)
        os.rmdir(self.mnt)


@pytest.mark.parametrize("mode", [0o6755, 0o6745, 0o4700, 0o2710, 0o2700])
@pytest.mark.parametrize("owner", [(-1, -1), (5, -1), (-1, 5), (0, 0)])
@pytest.mark.parametrize("kind", ["file", "dir"])
def test_chown_drops_set_id_bits(kind: str, owner: tuple[int, int], mode: int) -> None:
    """``chown`` takes S_ISUID, and S_ISGID with group execute, from a non-directory, as
    ``os.chown`` does on Linux (for root too, and with both ids -1)."""
    if not IS_ROOT and owner != (-1, -1):
        pytest.skip("giving a file away needs root")
    with tempfile.TemporaryDirectory(dir=SHM) as d:
        p = os.path.join(d, "x")
        os.mkdir(p) if kind == "dir" else open(p, "w").close()
        os.chmod(p, mode)
        os.chown(p, *owner)
        want = stat.S_IMODE(os.stat(p).st_mode)
    with xipfs.open(memory_image(1 << 20), "r+") as fs:
        fs.mkdir("/x") if kind == "dir" else fs.write_bytes("/x", b"")
        fs.chmod("/x", mode)
        fs.chown("/x", *owner)
        assert stat.S_IMODE(fs.stat("/x").st_mode) == want
