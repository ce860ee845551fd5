"""Real-world images for the tests: made by mke2fs, filled by Linux through a loop mount with
real programs (tar, cp -a, git, a venv, ln, mkfifo, mknod, xattrs, chattr, sparse and
preallocated files), and the views of a tree that xipfs and the kernel are compared by.

Used by tests/test_real_images.py and tests/test_hostile_cli.py, and by hand for longer
campaigns (``python tests/realimg_util.py KIND IMG`` builds one image).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

from e2fs import SHM, mkfs, run

#: ``(id, mke2fs -t, block size, size, extra mke2fs options)``: the kinds of image built here.
KINDS: dict[str, tuple[str, int, str, tuple[str, ...]]] = {
    "ext4": ("ext4", 4096, "64M", ()),
    "ext4-1k": ("ext4", 1024, "96M", ()),
    "ext4-2k": ("ext4", 2048, "96M", ()),
    "ext4-64k": ("ext4", 65536, "128M", ()),
    "ext4-fc-stable-largedir": ("ext4", 4096, "64M", ("-O", "fast_commit,stable_inodes,large_dir")),
    "ext4-inline": ("ext4", 4096, "64M", ("-O", "inline_data")),
    "ext4-ea_inode": ("ext4", 4096, "64M", ("-O", "ea_inode")),
    "ext4-mmp": ("ext4", 4096, "64M", ("-O", "mmp")),
    "ext4-quota": ("ext4", 4096, "64M", ("-O", "quota,project", "-I", "256")),
    "ext4-meta_bg": ("ext4", 1024, "96M", ("-O", "meta_bg,^resize_inode")),
    "ext4-bigalloc": ("ext4", 4096, "128M", ("-O", "bigalloc", "-C", "16384")),
    "ext4-nocsum": ("ext4", 4096, "64M", ("-O", "^metadata_csum,^64bit,uninit_bg")),
    "ext3": ("ext3", 4096, "64M", ()),
    "ext3-1k": ("ext3", 1024, "96M", ()),
    "ext2": ("ext2", 4096, "64M", ()),
    "ext2-i128": ("ext2", 1024, "96M", ("-I", "128")),
    # older and odder layouts mke2fs still makes
    "ext2-rev0": ("ext2", 1024, "96M", ("-r", "0")),
    "ext2-nofiletype": ("ext2", 4096, "64M", ("-O", "^filetype,^dir_index")),
    "ext4-nojournal-sparse_super2": ("ext4", 4096, "64M", ("-O", "^has_journal,sparse_super2",
                                                           "-E", "num_backup_sb=1")),
    "ext4-small-groups": ("ext4", 1024, "96M", ("-g", "1024", "-N", "6000")),
    "ext4-no-flex-no-sparse": ("ext4", 4096, "64M", ("-O", "^flex_bg,^sparse_super,^resize_inode")),
    "ext4-csum_seed-128": ("ext4", 4096, "64M", ("-O", "metadata_csum_seed", "-I", "128")),
}

PY = sys.executable
#: Times to set by hand: before 1970, after 2038, with nanoseconds (extra-isize inodes only).
ODD_TIMES_NS = (-1_234_567_891_234_567_890 // 1000, 2_500_000_000_123_456_789, 1_700_000_000_999_999_999)


def sh(cmd: list[str] | str, cwd: str | None = None, timeout: int = 300) -> None:
    """Run a command (a list, or a shell line), failing loudly."""
    proc = subprocess.run(cmd, cwd=cwd, shell=isinstance(cmd, str), capture_output=True, timeout=timeout,
                          env={**os.environ, "LC_ALL": "C"})
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stdout!r} {proc.stderr!r}")


@contextlib.contextmanager
def loop_mount(img: str, options: str = "rw", fstype: str = "ext4", offset: int = 0) -> Iterator[str]:
    """Loop-mount ``img``; raises :class:`MountError` when the kernel refuses."""
    mnt = tempfile.mkdtemp(prefix="xipfs-realimg-mnt-")
    opts = f"loop,{options}" + (f",offset={offset}" if offset else "")
    proc = run(["mount", "-o", opts, "-t", fstype, img, mnt], check=False, timeout=60)
    if proc.returncode != 0:
        os.rmdir(mnt)
        raise MountError(proc.stderr.decode(errors="replace").strip())
    try:
        yield mnt
    finally:
        unmount(mnt)


def unmount(mnt: str) -> None:
    """Unmount and remove ``mnt``; a mount busy for a moment (a program's child finishing, as
    git's) is tried again, and at last detached (``umount -l``)."""
    import time

    for _ in range(50):
        if run(["umount", mnt], timeout=60, check=False).returncode == 0:
            break
        time.sleep(0.1)
    else:
        run(["umount", "-l", mnt], timeout=60)
    os.rmdir(mnt)


class MountError(OSError):
    """``mount -o loop`` failed (no root, no loop devices, a kernel without the feature)."""


def can_loop_mount() -> str | None:
    """None when loop mounts work here, else the reason they do not."""
    if os.geteuid() != 0:
        return "loop mounts need root"
    with tempfile.TemporaryDirectory(dir=SHM) as d:
        img = os.path.join(d, "probe.img")
        mkfs(img, "4M", fstype="ext4")
        try:
            with loop_mount(img, "ro"):
                return None
        except MountError as e:
            return f"mount -o loop failed: {e}"


def populate(mnt: str, *, light: bool = False, seed: int = 1, flags: bool = True) -> None:
    """Fill a mounted filesystem through the kernel with what real programs make (``flags``:
    chattr +i +a +d +s too; off for a tree on tmpfs, which would keep files no one can remove)."""
    src = tempfile.mkdtemp(prefix="xipfs-realimg-src-", dir=SHM)
    try:
        _make_source(src, seed)
        # tar: a tarball of the source unpacked into the mount
        tarball = os.path.join(src + ".tar")
        sh(["tar", "-C", src, "-cf", tarball, "."])
        os.mkdir(os.path.join(mnt, "tarred"))
        sh(["tar", "--xattrs", "-C", os.path.join(mnt, "tarred"), "-xpf", tarball])
        os.unlink(tarball)
        sh(["cp", "-a", src + "/.", os.path.join(mnt, "copied")])
    finally:
        shutil.rmtree(src, ignore_errors=True)
    if shutil.which("git"):
        _git_repo(os.path.join(mnt, "repo"))
    if not light:                                 # with pip and setuptools (ensurepip, offline)
        sh([PY, "-m", "venv", os.path.join(mnt, "venv")])
    _special_files(mnt, flags)
    _odd_files(mnt)
    _many_names(os.path.join(mnt, "big-dir"), 400 if light else 2500)
    os.sync()


def _make_source(root: str, seed: int) -> None:
    """A small tree: text, binary, empty files, nested directories, symlinks, hard links."""
    import random

    rnd = random.Random(seed)
    for d in range(6):
        sub = os.path.join(root, f"d{d}", *(f"n{k}" for k in range(d % 3)))
        os.makedirs(sub, exist_ok=True)
        for f in range(8):
            size = rnd.choice((0, 1, 59, 60, 61, 4095, 4096, 4097, 70000, 300_000))
            with open(os.path.join(sub, f"f{f}.bin"), "wb") as fh:
                fh.write(rnd.randbytes(size))
    with open(os.path.join(root, "hello.py"), "w") as fh:
        fh.write("print('hello')\n" * 40)
    os.symlink("hello.py", os.path.join(root, "link-short"))
    os.symlink("x" * 59, os.path.join(root, "link-59"))
    os.symlink("y" * 60, os.path.join(root, "link-60"))
    os.symlink("/" + "z/" * 300, os.path.join(root, "link-long"))
    os.link(os.path.join(root, "hello.py"), os.path.join(root, "hello-hard.py"))
    os.chmod(os.path.join(root, "d1"), 0o2775)
    os.chmod(os.path.join(root, "hello.py"), 0o4755)
    os.chown(os.path.join(root, "d2"), 1000, 2000)
    os.chown(os.path.join(root, "hello.py"), 65537, 4_000_000_000)


def _git_repo(path: str) -> None:
    """A git repository with a few commits (packed and loose objects, an index)."""
    os.makedirs(path)
    env = "GIT_AUTHOR_NAME=a GIT_AUTHOR_EMAIL=a@b GIT_COMMITTER_NAME=a GIT_COMMITTER_EMAIL=a@b"
    sh("git init -q . && git config gc.autoDetach false && for i in 1 2 3; do seq $i 3000 > f$i.txt;"
       f" mkdir -p sub$i; echo $i > sub$i/x; git add -A && {env} git commit -qm c$i; done && git gc -q",
       cwd=path)


def _special_files(mnt: str, flags: bool = True) -> None:
    """FIFOs, device nodes, sockets, xattrs (user, trusted, security, ACLs), chattr flags."""
    sp = os.path.join(mnt, "special")
    os.mkdir(sp)
    sh(["mkfifo", os.path.join(sp, "fifo")])
    sh(["mknod", os.path.join(sp, "null"), "c", "1", "3"])
    sh(["mknod", os.path.join(sp, "blk"), "b", "259", "65537"])      # a large minor: new encoding
    sh(["mknod", os.path.join(sp, "bigmaj"), "c", "4095", "1048575"])
    import socket

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(os.path.join(sp, "sock"))
    sock.close()
    x = os.path.join(sp, "xattrs")
    with open(x, "w") as fh:
        fh.write("xattrs\n")
    os.setxattr(x, "user.small", b"v")
    os.setxattr(x, "user.empty", b"")
    os.setxattr(x, "trusted.t", b"trusted value")
    os.setxattr(x, "security.capability", bytes.fromhex("0100000200200000000000000000000000000000"))
    acl = bytes.fromhex("02000000" "0100060000000000" "02000600e8030000" "04000400ffffffff"
                        "10000600ffffffff" "20000400ffffffff")
    os.setxattr(x, "system.posix_acl_access", acl)
    os.setxattr(sp, "system.posix_acl_default", acl)
    big = os.path.join(sp, "bigxattr")
    with open(big, "w") as fh:
        fh.write("big\n")
    for i, size in enumerate([90 + i for i in range(12)] + [3000, 20000]):   # as many as fit
        with contextlib.suppress(OSError):                # (the last ones only with ea_inode)
            os.setxattr(big, f"user.k{i}", bytes([i]) * size)
    os.symlink("fifo", os.path.join(sp, "link-with-xattr"))
    with contextlib.suppress(OSError):
        os.setxattr(os.path.join(sp, "link-with-xattr"), "trusted.l", b"on a link", follow_symlinks=False)
    for flag in ("+i", "+a", "+d", "+s"):
        f = os.path.join(sp, f"chattr{flag[1]}")
        with open(f, "w") as fh:
            fh.write(flag)
        if flags:
            subprocess.run(["chattr", flag, f], capture_output=True, check=False)


def _odd_files(mnt: str) -> None:
    """Sparse files past 4 GiB, preallocated (unwritten) extents, odd times."""
    od = os.path.join(mnt, "odd")
    os.mkdir(od)
    sparse = os.path.join(od, "sparse-5g")
    with open(sparse, "wb") as fh:
        fh.write(b"head")
        fh.seek(1 << 20)
        fh.write(b"middle" * 1000)
        fh.seek((5 << 30) - 3)
        fh.write(b"end")
    sh(["truncate", "-s", "4G", os.path.join(od, "empty-4g")])
    fa = os.path.join(od, "falloc")
    with open(fa, "wb") as fh:
        fh.write(b"p" * 200_000)
    # fallocate(2) needs extents (ext2/ext3 refuse it): unwritten extents, blocks past EOF, a hole
    for args in (["-l", "1M"], ["-n", "-o", "1M", "-l", "256K"], ["-p", "-o", "8192", "-l", "65536"]):
        subprocess.run(["fallocate", *args, fa], capture_output=True, check=False)
    with open(fa, "r+b") as fh:
        fh.seek(300_000)
        fh.write(b"written in the middle of unwritten extents")
    for i, ns in enumerate(ODD_TIMES_NS):
        f = os.path.join(od, f"time{i}")
        with open(f, "w") as fh:
            fh.write(str(ns))
        with contextlib.suppress(OSError):
            os.utime(f, ns=(ns, ns))
    with contextlib.suppress(OSError):
        os.utime(od, ns=(ODD_TIMES_NS[1], ODD_TIMES_NS[0]))


def _many_names(path: str, count: int) -> None:
    """A directory big enough for an htree, names long and short, some removed again."""
    os.makedirs(path)
    for i in range(count):
        name = f"entry-{i:05d}-" + "n" * (i % 200)
        with open(os.path.join(path, name[:255]), "w") as fh:
            fh.write(str(i))
    for i in range(0, count, 7):
        os.unlink(os.path.join(path, (f"entry-{i:05d}-" + "n" * (i % 200))[:255]))


def build(kind: str, img: str, *, light: bool = False) -> str:
    """Make an image of ``kind`` (see :data:`KINDS`) filled through a loop mount; returns ``img``."""
    fstype, bs, size, extra = KINDS[kind]
    if bs == 65536:
        size = "256M"
    mkfs(img, size, bs=bs, extra=extra, fstype=fstype)
    with loop_mount(img, "rw") as mnt:
        populate(mnt, light=light)
    return img


# -- views of a tree ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """What both sides show of one path."""

    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    rdev: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    blocks: int
    target: bytes | None
    xattrs: tuple[tuple[str, bytes], ...]
    names: tuple[bytes, ...] | None
    sha256: str | None
    #: the inode number (hard links share it; Linux and xipfs number inodes alike)
    ino: int


def _entry(st: os.stat_result, target: bytes | None, xattrs: dict[str, bytes], names: list[bytes] | None,
           digest: str | None, *, atime: bool) -> Entry:
    return Entry(st.st_mode, st.st_uid, st.st_gid, st.st_size if not stat.S_ISDIR(st.st_mode) else 0,
                 st.st_nlink, st.st_rdev if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else 0,
                 st.st_atime_ns if atime else 0, st.st_mtime_ns, st.st_ctime_ns, st.st_blocks, target,
                 tuple(sorted(xattrs.items())), tuple(sorted(names)) if names is not None else None,
                 digest, st.st_ino)


#: Files larger than this are compared at windows (:data:`WINDOWS`), not read whole.
WHOLE = 64 << 20
WINDOW = 256 << 10


def file_digest(fh, size: int) -> str:
    """SHA-256 of a file's bytes, or of windows of it when it is large (a sparse 5 GiB file):
    its head, its first MiBs, around 4 GiB and its tail."""
    h = hashlib.sha256()
    if size <= WHOLE:
        while chunk := fh.read(1 << 22):
            h.update(chunk)
        return h.hexdigest()
    for start in (0, 1 << 20, (1 << 32) - WINDOW // 2, size - WINDOW):
        fh.seek(max(0, min(start, size - WINDOW)))
        h.update(fh.read(WINDOW))
    return h.hexdigest()


def kernel_view(mnt: str, *, atime: bool = False) -> dict[bytes, Entry]:
    """Every path under a mount as the kernel shows it."""
    root = os.fsencode(mnt)
    out: dict[bytes, Entry] = {}
    for top, dirs, files in os.walk(root):
        for name in ([b""] if top == root else []) + dirs + files:
            full = os.path.join(top, name) if name else top
            rel = full[len(root):] or b"/"
            st = os.lstat(full)
            xattrs = {n: os.getxattr(full, n, follow_symlinks=False)
                      for n in os.listxattr(full, follow_symlinks=False)}
            target = os.readlink(full) if stat.S_ISLNK(st.st_mode) else None
            names = os.listdir(full) if stat.S_ISDIR(st.st_mode) else None
            digest = None
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as fh:
                    digest = file_digest(fh, st.st_size)
            out[rel] = _entry(st, target, xattrs, names, digest, atime=atime)
    return out


def xipfs_view(fs, *, atime: bool = False) -> dict[bytes, Entry]:
    """Every path of an open xipfs filesystem, through the public API."""
    out: dict[bytes, Entry] = {}
    todo = [b"/"]
    while todo:
        rel = todo.pop()
        st = fs.lstat(rel)
        xattrs = {n: fs.getxattr(rel, n, follow_symlinks=False)
                  for n in fs.listxattr(rel, follow_symlinks=False)}
        target = fs.readlink(rel) if stat.S_ISLNK(st.st_mode) else None
        names = None
        if stat.S_ISDIR(st.st_mode):
            names = fs.listdir(rel)
            todo.extend((rel.rstrip(b"/") + b"/" + n) for n in names)
        digest = None
        if stat.S_ISREG(st.st_mode):
            with fs.open(rel, "rb") as fh:
                digest = file_digest(fh, st.st_size)
        out[rel] = _entry(st, target, xattrs, names, digest, atime=atime)
    return out


def differences(want: dict[bytes, Entry], got: dict[bytes, Entry], limit: int = 20) -> list[str]:
    """Readable differences between two views (at most ``limit``)."""
    diffs = []
    for path in sorted(set(want) | set(got)):
        a, b = want.get(path), got.get(path)
        if a == b:
            continue
        if a is None or b is None:
            diffs.append(f"{path!r}: only in {'xipfs' if a is None else 'the kernel'}")
        else:
            for f in a.__dataclass_fields__:
                if getattr(a, f) != getattr(b, f):
                    diffs.append(f"{path!r} {f}: kernel {getattr(a, f)!r} xipfs {getattr(b, f)!r}"[:300])
        if len(diffs) >= limit:
            break
    return diffs


if __name__ == "__main__":
    build(sys.argv[1], sys.argv[2], light="--light" in sys.argv)


# -- hostile images ----------------------------------------------------------------------------
#: Structures a damage round aims at.
TARGETS = ("superblock", "group descriptors", "inode table", "extent/indirect blocks", "directory blocks",
           "htree nodes", "xattr blocks", "journal superblock", "bitmaps", "anywhere")


@dataclass
class Layout:
    """Where an image's structures are: byte ranges ``(offset, length)`` per target."""

    bs: int
    size: int
    ranges: dict[str, list[tuple[int, int]]]
    #: paths of regular files, directories and symlinks (for cat, stat, ls)
    files: list[str]
    dirs: list[str]
    #: inode numbers in use (for damage through debugfs, checksums kept right)
    inodes: list[int]


def find_layout(img: str, journal_blocks: int = 0) -> Layout:
    """Locate an undamaged image's structures with dumpe2fs and debugfs (``journal_blocks``:
    the journal's first blocks too, a target of their own, for an image that needs recovery)."""
    import re

    from e2fs import debugfs, dumpe2fs, parse_stat

    text = dumpe2fs(img)
    bs = int(re.search(r"Block size:\s+(\d+)", text)[1])
    ranges: dict[str, list[tuple[int, int]]] = {t: [] for t in TARGETS}
    ranges["superblock"].append((1024, 1024))
    for m in re.finditer(r"Group descriptors at (\d+)-(\d+)", text):
        ranges["group descriptors"].append((int(m[1]) * bs, (int(m[2]) - int(m[1]) + 1) * bs))
    for m in re.finditer(r"Inode table at (\d+)-(\d+)", text):
        lo, hi = int(m[1]), min(int(m[2]), int(m[1]) + 3)    # the first blocks hold the used inodes
        ranges["inode table"].append((lo * bs, (hi - lo + 1) * bs))
    for m in re.finditer(r"(?:Block|Inode) bitmap at (\d+)", text):
        ranges["bitmaps"].append((int(m[1]) * bs, bs))
    # every inode in use: its blocks by kind
    import xipfs

    files, dirs, inos = [], [], {}
    with xipfs.open(img) as fs:
        for top, _dirs, fnames in fs.walk("/"):
            dirs.append(top)
            inos[fs.lstat(top).st_ino] = ("dir", top)
            for n in fnames:
                p = top.rstrip("/") + "/" + n
                files.append(p)
                inos.setdefault(fs.lstat(p).st_ino, ("file", p))
    inos[8] = ("journal", "<8>")
    out = debugfs(img, *(f"stat <{i}>" for i in inos))
    for part in re.split(rb"^debugfs: stat <\d+>\n", out, flags=re.M)[1:]:
        if not part.startswith(b"Inode:"):
            continue
        node = parse_stat(part)
        kind = inos.get(node.ino, ("file", ""))[0]
        for b in node.meta:
            ranges["extent/indirect blocks"].append((b * bs, bs))
        if node.file_acl:
            ranges["xattr blocks"].append((node.file_acl * bs, bs))
        if kind == "dir":
            blocks = sorted(node.blocks.values())
            target = "htree nodes" if node.flags & 0x1000 else "directory blocks"
            for i, b in enumerate(blocks[:8]):
                ranges[target if i == 0 else "directory blocks"].append((b * bs, bs))
        elif kind == "journal" and node.blocks:
            ranges["journal superblock"].append((node.blocks[0] * bs, 1024))
            if journal_blocks:                    # descriptors, revokes, commits, data
                ranges["journal blocks"] = [(node.blocks[i] * bs, bs) for i in range(1, journal_blocks)
                                            if i in node.blocks]
    size = os.path.getsize(img)
    ranges["anywhere"].append((0, min(size, 64 << 20)))
    return Layout(bs, size, {k: v for k, v in ranges.items() if v}, files, dirs, sorted(inos))


#: Fields debugfs sets (and re-seals the checksums of): ``set_super_value``, ``set_inode_field``,
#: ``set_bg``; damage that gets past the checksums of a metadata_csum image.
SB_FIELDS = ("blocks_count", "inodes_count", "first_data_block", "log_block_size", "log_cluster_size",
             "blocks_per_group", "clusters_per_group", "inodes_per_group", "inode_size", "first_ino",
             "rev_level", "feature_incompat", "feature_ro_compat", "feature_compat", "desc_size",
             "first_meta_bg", "log_groups_per_flex", "journal_inum", "orphan_file_inum",
             "reserved_gdt_blocks",
             "min_extra_isize", "want_extra_isize", "mmp_block", "usr_quota_inum", "last_orphan",
             "free_blocks_count", "free_inodes_count", "state", "hash_seed", "def_hash_version", "encoding")
INODE_FIELDS = ("mode", "size", "links_count", "blocks", "flags", "file_acl", "extra_isize", "uid",
                "block[0]", "block[1]", "block[2]", "block[3]", "block[4]", "block[5]", "block[IND]",
                "block[DIND]", "block[TIND]", "dtime", "size_high", "generation")
BG_FIELDS = ("block_bitmap", "inode_bitmap", "inode_table", "flags", "itable_unused", "free_inodes_count",
             "free_blocks_count", "used_dirs_count")


def damage_fields(img: str, layout: Layout, rnd) -> str:
    """Set a random superblock, inode or group descriptor field through ``debugfs -w`` (which
    keeps the checksums right); returns what was done."""
    nblocks = layout.size // layout.bs
    value = rnd.choice((0, 1, 2, 3, 11, 0xFFFF, 0xFFFFFFFF, 0x7FFFFFFF, rnd.getrandbits(32),
                        rnd.getrandbits(16), nblocks, nblocks + rnd.randrange(-3, 3), 2 ** rnd.randrange(40)))
    which = rnd.random()
    if which < 0.25:
        req = f"ssv {rnd.choice(SB_FIELDS)} {value}"
    elif which < 0.4:
        req = f"set_bg {rnd.randrange(2)} {rnd.choice(BG_FIELDS)} {value}"
    else:
        req = f"sif <{rnd.choice(layout.inodes)}> {rnd.choice(INODE_FIELDS)} {value}"
    run(["debugfs", "-w", "-R", req, img], check=False)
    return f"debugfs: {req}"


def damage(img: str, layout: Layout, rnd, target: str | None = None) -> str:
    """Damage ``img`` in place at a random place of ``target`` (random when None; "fields":
    through debugfs); returns a description of what was done."""
    target = target or rnd.choice([*sorted(layout.ranges), "fields", "fields"])
    if target == "fields":
        return damage_fields(img, layout, rnd)
    off, length = rnd.choice(layout.ranges[target])
    how = rnd.choice(("byte", "byte", "word", "zero", "ones", "shuffle"))
    with open(img, "r+b") as f:
        if how == "byte":
            spots = [off + rnd.randrange(min(length, 256) if rnd.random() < 0.7 else length)
                     for _ in range(rnd.randint(1, 4))]
            for s in spots:
                f.seek(s)
                f.write(bytes([rnd.randrange(256)]))
            return f"{target}: bytes at {spots}"
        if how == "word":
            s = off + (rnd.randrange(min(length, 256)) & ~3)
            f.seek(s)
            f.write(rnd.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, rnd.getrandbits(32),
                                layout.size // layout.bs, 2 ** rnd.randrange(32))).to_bytes(4, "little"))
            return f"{target}: word at {s}"
        n = rnd.randint(1, min(length, 64))
        s = off + rnd.randrange(max(1, min(length, 256) - n))
        f.seek(s)
        if how == "shuffle":
            f.seek(s)
            data = bytearray(f.read(n))
            rnd.shuffle(data)
            f.seek(s)
            f.write(data)
        else:
            f.write((b"\0" if how == "zero" else b"\xff") * n)
        return f"{target}: {n} bytes {how} at {s}"


def cli_commands(img: str, layout: Layout, dest: str, rnd) -> list[list[str]]:
    """The read-only commands a round runs on a damaged image (a sample of paths)."""
    files = rnd.sample(layout.files, min(4, len(layout.files)))
    dirs = rnd.sample(layout.dirs, min(3, len(layout.dirs)))
    return [
        ["info", img],
        ["ls", "-laR", f"{img}:/"],
        ["ls", "-l", *(f"{img}:{d}" for d in dirs)],
        ["tree", f"{img}:/"],
        ["stat", *(f"{img}:{p}" for p in files + dirs)],
        ["cat", *(f"{img}:{p}" for p in files)],
        ["df", img],
        ["check", img],
        ["unpack", img, dest],
    ]


def cli_write_commands(img: str, layout: Layout, src: str, rnd) -> list[list[str]]:
    """Commands that change a damaged image (each round runs them on its own copy, in order)."""
    files = rnd.sample(layout.files, min(3, len(layout.files)))
    dirs = [d for d in layout.dirs if d != "/"]
    some_dir = rnd.choice(dirs) if dirs else "/"
    return [
        ["mkdir", "-p", f"{img}:{some_dir}/new/deeper"],
        ["cp", src, f"{img}:{some_dir}/copied-in"],
        ["cp", "-r", os.path.dirname(src), f"{img}:/tree-in"],
        ["touch", f"{img}:{files[0]}"],
        ["chmod", "600", *(f"{img}:{p}" for p in files)],
        ["ln", "-s", "target", f"{img}:{some_dir}/symlink-in"],
        ["mv", f"{img}:{files[-1]}", f"{img}:/moved"],
        ["rm", "-rf", f"{img}:{some_dir}"],
        ["check", img],
    ]


BAD_OUTPUT = ("Traceback", "internal error", "IndexError", "struct.error", "ValueError", "KeyError",
              "RecursionError", "MemoryError", "TypeError", "AttributeError", "ZeroDivisionError",
              "OverflowError", "AssertionError", "UnboundLocalError", "NameError")


def run_cli_forked(argv: list[str], timeout: float) -> tuple[int | None, bytes]:
    """Run ``xipfs ARGV`` in a forked child (the command's own ``main``), stdout thrown away:
    ``(exit status or None when it hung and was killed, stderr)``."""
    import signal
    import time

    from xipfs.cli import main

    err = tempfile.TemporaryFile()                 # noqa: SIM115  (the child writes, the parent reads)
    pid = os.fork()
    if pid == 0:                                   # the child: the command, nothing else
        try:
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, 1)
            os.dup2(err.fileno(), 2)
            # the command's own streams on these descriptors (pytest replaces sys.stdout/err),
            # with the encodings and error handlers Python gives a process's own
            sys.stdout = open(1, "w", encoding=sys.__stdout__.encoding,       # noqa: SIM115
                              errors=sys.__stdout__.errors, closefd=False)
            sys.stderr = open(2, "w", encoding=sys.__stderr__.encoding,       # noqa: SIM115
                              errors=sys.__stderr__.errors, closefd=False)
            rc = main(["-q", *argv])
            sys.stdout.flush()
            sys.stderr.flush()
        except BaseException as e:                 # noqa: BLE001  (anything is a finding)
            import traceback

            traceback.print_exc()
            sys.stderr.write(f"escaped: {type(e).__name__}\n")
            sys.stderr.flush()
            rc = 99
        os._exit(rc)
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(st)
            break
        time.sleep(0.005)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    err.seek(0)
    return status, err.read()


def bad_result(status: int | None, stderr: bytes, command: str = "") -> str | None:
    """Why a command's result on a hostile image breaks the rule (None: it keeps it); ``check``
    may exit 1 with its findings on stdout only."""
    text = stderr.decode(errors="replace")
    if status is None:
        return "hung past the timeout"
    if status < 0:
        return f"killed by signal {-status}"
    for word in BAD_OUTPUT:
        if word in text:
            return f"stderr has {word!r}: {text.strip()[-600:]}"
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if any(not ln.startswith("xipfs") for ln in lines):
        return f"stderr line not xipfs's own: {text.strip()[-600:]}"
    if status != 0 and not lines and not (command == "check" and status == 1):
        return f"exit {status} without a message"
    return None
