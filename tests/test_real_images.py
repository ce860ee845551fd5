"""Real-world images, made as users make them, read by xipfs as Linux reads them.

Each image is made by mke2fs and filled by Linux through a loop mount with real programs (tar,
cp -a, git, a venv, ln, mkfifo, mknod, xattrs with ACLs and security.*, chattr, sparse files
past 4 GiB, fallocate's unwritten extents, times before 1970 and after 2038): see
``realimg_util.populate``. Every name, type, mode, owner, size, time (nanoseconds), link
target, xattr, hard link, device number and file's bytes that xipfs shows, through the API and
through the command (``ls -laR --json``, ``cat``, ``unpack``), must be what the kernel shows
through a read-only mount of the same image; so must ``statvfs``. ``ls -la`` and ``stat``
print what GNU ls and stat print, ``info`` what ``dumpe2fs -h`` prints, and ``xipfs check``
agrees with ``e2fsck -fn``. Besides the plain kinds: a journal that needs recovery (the image
copied while mounted), shared_blocks, quota, an Android sparse image, MBR and GPT whole disks,
64 KiB blocks, an xattr block whose checksum fails, ``cp`` of sparse files.

``XIPFS_REAL_KINDS=all`` (or a comma list of ``realimg_util.KINDS``) runs every kind; by
default a few run, light (no venv, a smaller directory), to keep CI fast.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import realimg_util as R
from e2fs import fsck, mkfs, run

import xipfs

DEFAULT_KINDS = ("ext4", "ext4-1k", "ext3", "ext4-inline", "ext4-ea_inode")
_env = os.environ.get("XIPFS_REAL_KINDS", "")
KINDS = list(R.KINDS) if _env == "all" else ([k for k in _env.split(",") if k] or list(DEFAULT_KINDS))
#: the kinds the kernel here cannot mount read-write (64 KiB blocks on 4 KiB pages, quota
#: without CONFIG_QUOTA) are made other ways, in their own tests
KINDS = [k for k in KINDS if k not in ("ext4-64k", "ext4-quota")]
LIGHT = _env == ""

_MOUNT_SKIP = R.can_loop_mount()
needs_mount = pytest.mark.skipif(_MOUNT_SKIP is not None, reason=_MOUNT_SKIP or "")


def xipfs_cmd(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m xipfs ARGS`` in a subprocess."""
    return run([sys.executable, "-m", "xipfs", *args], check=check)


@dataclasses.dataclass
class Built:
    img: str
    #: the kernel's view of the image (read-only mount)
    kernel: dict[bytes, R.Entry]
    #: the kernel's statvfs of the mount (see ``space``)
    statvfs: tuple[int, ...]


@pytest.fixture(scope="module")
def workdir(shm_dir):
    path = os.path.join(shm_dir, "realimg")
    os.makedirs(path, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def built(workdir):
    """``built(kind)``: the image of ``kind``, made once per module, and the kernel's view of it."""
    cache: dict[str, Built] = {}

    def make(kind: str) -> Built:
        if kind not in cache:
            img = os.path.join(workdir, f"{kind}.img")
            R.build(kind, img, light=LIGHT)
            with R.loop_mount(img, "ro", fstype=R.KINDS[kind][0]) as mnt:
                cache[kind] = Built(img, R.kernel_view(mnt), space(os.statvfs(mnt)))
        return cache[kind]

    return make


def space(st: os.statvfs_result) -> tuple[int, ...]:
    """The counts of a statvfs that are the image's (not the mount's flags)."""
    return st.f_bsize, st.f_blocks, st.f_bfree, st.f_bavail, st.f_files, st.f_ffree, st.f_namemax


def assert_same(want: dict, got: dict, what: str) -> None:
    diffs = R.differences(want, got)
    assert not diffs, f"{what}: xipfs differs from the kernel:\n" + "\n".join(diffs)


def assert_check_agrees(img: str, *cli: str, raw: str | None = None) -> None:
    """``e2fsck -fn`` (of ``raw``, the bare filesystem of a disk or sparse image, when given) and
    ``xipfs check`` both find the image clean."""
    rc, out = fsck(raw or img)
    assert rc == 0, out
    proc = xipfs_cmd("check", *cli, img, check=False)
    assert proc.returncode == 0 and b"clean" in proc.stdout, proc.stdout + proc.stderr


# -- the plain kinds ------------------------------------------------------------------------------
@needs_mount
@pytest.mark.parametrize("kind", KINDS)
def test_api_shows_what_the_kernel_shows(built, kind):
    b = built(kind)
    for xip in (True, False):
        with xipfs.open(b.img, xip=xip) as fs:
            assert_same(b.kernel, R.xipfs_view(fs), f"{kind} xip={xip}")
            # df as the kernel counts it (ext2 and ext3 too are served by the ext4 driver)
            assert space(fs.statvfs("/")) == b.statvfs
    # clean where e2fsck -fn finds it clean, not where it finds problems (ext2 without filetype:
    # Linux itself leaves a file type in one '.' entry)
    rc, out = fsck(b.img)
    proc = xipfs_cmd("check", b.img, check=False)
    assert (rc == 0) == (proc.returncode == 0), (out, proc.stdout + proc.stderr)


@needs_mount
@pytest.mark.parametrize("kind", KINDS[:1])
def test_command_shows_what_the_kernel_shows(built, kind, tmp_path):
    """``ls -laR --json`` and ``cat`` against the kernel; ``unpack`` then ``diff -r`` against
    the mount, and the unpacked tree's metadata against the kernel's."""
    b = built(kind)
    entries = json.loads(xipfs_cmd("ls", "-laR", "--json", f"{b.img}:/").stdout)
    listed = {os.fsencode(e["path"]): e for e in entries}
    for path, k in b.kernel.items():
        if path == b"/":
            continue
        e = listed.get(path)
        assert e is not None, f"ls -laR misses {path!r}"
        got = (e["mode"], e["ino"], e["nlink"], e["uid"], e["gid"], e["blocks"], e["mtime_ns"], e["ctime_ns"],
               tuple(e["rdev"]) if e["rdev"] else None, e["target"])
        rdev = (os.major(k.rdev), os.minor(k.rdev)) if k.rdev else None
        want = (k.mode, k.ino, k.nlink, k.uid, k.gid, k.blocks, k.mtime_ns, k.ctime_ns, rdev,
                os.fsdecode(k.target) if k.target is not None else None)
        assert got == want, path
        if k.names is None:
            assert e["size"] == k.size, path
    assert len(listed) == len(b.kernel) - 1
    files = sorted(p for p, k in b.kernel.items() if k.sha256 and k.size < R.WHOLE)[:50]
    import hashlib

    with R.loop_mount(b.img, "ro", fstype=R.KINDS[kind][0]) as mnt:
        out = xipfs_cmd("cat", *(f"{b.img}:{os.fsdecode(p)}" for p in files)).stdout
        for p in files:                                 # one command, the files one after another
            size = b.kernel[p].size
            assert hashlib.sha256(out[:size]).hexdigest() == b.kernel[p].sha256, p
            out = out[size:]
        assert not out
        # ls -la as GNU ls prints it: ACL "+", numeric owners to the right, device columns
        env = {"TZ": "UTC"}
        for d in ("special", "odd", "copied", "tarred/d1", "big-dir"):
            want = run(["ls", "-la", os.path.join(mnt, d)], env=env).stdout
            got = run([sys.executable, "-m", "xipfs", "ls", "-la", f"{b.img}:/{d}"], env=env).stdout
            assert got.splitlines()[3:] == want.splitlines()[3:], d       # (past "total", ".", "..")
            assert got.splitlines()[:2] == want.splitlines()[:2], d
        # stat as GNU stat prints it (but the name, the device and, for now, Birth: xipfs prints
        # "-" where stat(1) shows i_crtime; /tmp/helper-realimg-stat-birth.patch, for the lead,
        # as tests/test_cli.py asserts the "-")
        paths = ["special/blk", "special/fifo", "special/xattrs", "copied/link-long", "odd/time0",
                 "odd/sparse-5g", "big-dir", "copied/hello.py"]           # (its owners have no names)
        want = run(["stat", *(os.path.join(mnt, p) for p in paths)],
                   env=env).stdout.decode().split("  File: ")[1:]
        got = run([sys.executable, "-m", "xipfs", "stat", *(f"{b.img}:/{p}" for p in paths)],
                  env=env).stdout.decode().split("  File: ")[1:]
        for p, w, g in zip(paths, want, got, strict=True):
            w, g = w.splitlines(), g.splitlines()
            assert (g[1], g[2].split("\t")[1], g[3:-1]) == (w[1], w[2].split("\t")[1], w[3:-1]), p
        # operands sorted, files before directories, as GNU ls sorts them
        operands = ["special", "copied/link-short", "odd/time1", "copied/hello.py"]
        want = run(["sh", "-c", 'cd "$0" && ls -ld "$@"', mnt, *operands], env=env).stdout
        got = run([sys.executable, "-m", "xipfs", "ls", "-ld", *(f"{b.img}:/{p}" for p in operands)],
                  env=env).stdout.replace(b" /", b" ")
        assert got == want
        dest = str(tmp_path / "out")
        xipfs_cmd("unpack", b.img, dest)
        # (the files of 4 and 5 GiB are compared at windows below, not read whole by diff)
        diff = run(["diff", "-r", "--no-dereference", "-x", "lost+found", "-x", "sparse-5g", "-x", "empty-4g",
                    mnt, dest], check=False)
        # diff says "X is a fifo while Y is a fifo" of special files: only real differences count
        real = [ln for ln in diff.stdout.decode(errors="replace").splitlines()
                if not ln.startswith("File ") or " while file " not in ln
                or ln.split(" is a ")[1].split(" while")[0] != ln.rsplit(" is a ", 1)[1]]
        assert not real, "\n".join(real[:20])
        unpacked = R.kernel_view(dest)
    # metadata: everything but inode numbers, ctimes, directory link counts and allocation
    # (unwritten extents unpack as holes) and lost+found, which unpack leaves out when empty
    def plain(view: dict) -> dict:
        return {p: dataclasses.replace(e, ino=0, ctime_ns=0, blocks=0,
                                       nlink=0 if e.names is not None else e.nlink,
                                       names=tuple(n for n in e.names if n != b"lost+found")
                                       if e.names is not None else None)
                for p, e in view.items() if not p.startswith(b"/lost+found")}
    want = plain(b.kernel)
    want[b"/"] = dataclasses.replace(want[b"/"], mode=unpacked[b"/"].mode, uid=unpacked[b"/"].uid,
                                     gid=unpacked[b"/"].gid, mtime_ns=unpacked[b"/"].mtime_ns, xattrs=())
    assert_same(want, plain(unpacked), f"{kind} unpacked")


def _labelled(text: str) -> dict[str, str]:
    """``Label:   value`` lines (dumpe2fs -h, xipfs info) as {label: value, spaces squeezed}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and not line.startswith(" "):
            out[key.strip()] = " ".join(value.split())
    return out


@needs_mount
@pytest.mark.parametrize("kind", KINDS)
def test_info_says_what_dumpe2fs_says(built, kind):
    """Every line ``xipfs info`` shares with ``dumpe2fs -h`` has dumpe2fs's value (the journal's
    fast-commit length included, which dumpe2fs sizes by the filesystem's feature)."""
    b = built(kind)
    want = _labelled(run(["dumpe2fs", "-h", b.img]).stdout.decode())
    got = _labelled(xipfs_cmd("info", b.img).stdout.decode())
    shared = set(want) & set(got)
    assert {"Block count", "Inode count", "Filesystem features", "Free blocks"} <= shared
    assert {k: got[k] for k in shared} == {k: want[k] for k in shared}


def test_info_of_a_fast_commit_journal(workdir):
    img = mkfs(os.path.join(workdir, "fc.img"), "32M", fstype="ext4", extra=("-O", "fast_commit"))
    want = _labelled(run(["dumpe2fs", "-h", img]).stdout.decode())
    got = _labelled(xipfs_cmd("info", img).stdout.decode())
    for key in ("Total journal blocks", "Max transaction length", "Fast commit length"):
        assert got[key] == want[key], key
    assert want["Fast commit length"] != "0"


# -- a journal that needs recovery ----------------------------------------------------------------
@needs_mount
@pytest.mark.parametrize("fstype", ["ext3", "ext4"])
def test_journal_needing_recovery_reads_as_the_kernel_replays_it(fstype, workdir):
    """An image copied while mounted, after ``sync`` (its journal holds transactions not yet
    checkpointed): xipfs replays it in memory as the kernel does when it mounts the copy."""
    img = os.path.join(workdir, f"recover-{fstype}.img")
    copy, kcopy = img + ".copy", img + ".kernel"
    mkfs(img, "48M", fstype=fstype)
    with R.loop_mount(img, "rw", fstype=fstype) as mnt:
        R.populate(mnt, light=True)
        os.rename(os.path.join(mnt, "copied"), os.path.join(mnt, "renamed"))
        shutil.rmtree(os.path.join(mnt, "repo"))
        with open(os.path.join(mnt, "late.txt"), "w") as f:
            f.write("written after the first sync\n" * 500)
        os.sync()
        shutil.copyfile(img, copy)
    assert "needs_recovery" in run(["dumpe2fs", "-h", copy]).stdout.decode()
    shutil.copyfile(copy, kcopy)
    with R.loop_mount(kcopy, "rw,noatime", fstype=fstype) as mnt:      # the kernel replays it
        kernel = R.kernel_view(mnt)
    with xipfs.open(copy) as fs:
        assert_same(kernel, R.xipfs_view(fs), f"{fstype} with a journal to replay")
    # e2fsck -fn skips the replay and finds only the free counts behind; xipfs check says the same
    rc, out = fsck(copy)
    proc = xipfs_cmd("check", copy, check=False)
    assert (rc == 0) == (proc.returncode == 0), (out, proc.stdout)
    want = {w for w in ("Free blocks count wrong", "Free inodes count wrong") if w in out}
    got = {w for w, code in (("Free blocks count wrong", b"sb_free_blocks_count"),
                             ("Free inodes count wrong", b"sb_free_inodes_count")) if code in proc.stdout}
    assert want == got, (out, proc.stdout)


# -- features set afterwards, other containers ------------------------------------------------------
@needs_mount
def test_shared_blocks_image(built, workdir):
    """Android's dedup bit (RO_COMPAT 0x4000, set by debugfs): read-only, read all the same."""
    b = built("ext4")
    img = os.path.join(workdir, "shared.img")
    shutil.copyfile(b.img, img)
    run(["debugfs", "-w", "-R", "feature shared_blocks", img])
    assert "shared_blocks" in run(["dumpe2fs", "-h", img]).stdout.decode()
    with R.loop_mount(img, "ro") as mnt:
        kernel = R.kernel_view(mnt)
    with xipfs.open(img) as fs:
        assert "shared_blocks" in fs.features
        assert_same(kernel, R.xipfs_view(fs), "shared_blocks")
    with pytest.raises(OSError):
        xipfs.open(img, "r+")
    assert_check_agrees(img)


@needs_mount
def test_quota_image_reads_like_the_tree_it_was_made_from(built, workdir):
    """``tune2fs -O quota,project`` (this kernel may lack CONFIG_QUOTA, so the tree is compared
    with the mount made before the quota files were added)."""
    b = built("ext4")
    img = os.path.join(workdir, "quota.img")
    shutil.copyfile(b.img, img)
    run(["tune2fs", "-O", "quota,project", img])
    with xipfs.open(img) as fs:
        assert_same(b.kernel, R.xipfs_view(fs), "quota")
    assert fsck(img)[0] == 0


def test_check_of_quota_image_agrees_with_e2fsck(workdir):
    img = mkfs(os.path.join(workdir, "quota-mkfs.img"), "32M", fstype="ext4", extra=("-O", "quota,project"))
    assert_check_agrees(img)


def test_check_of_mmp_image_agrees_with_e2fsck(workdir):
    img = mkfs(os.path.join(workdir, "mmp.img"), "32M", fstype="ext4", extra=("-O", "mmp"))
    assert_check_agrees(img)


@needs_mount
@pytest.mark.skipif(shutil.which("img2simg") is None,
                    reason="img2simg (android-sdk-libsparse-utils) is not installed")
def test_android_sparse_image(built, workdir):
    b = built("ext4")
    simg = os.path.join(workdir, "ext4.simg")
    run(["img2simg", b.img, simg])
    with xipfs.open(simg) as fs:
        assert_same(b.kernel, R.xipfs_view(fs), "Android sparse")
    assert_check_agrees(simg, raw=b.img)
    raw = os.path.join(workdir, "unsparsed.img")
    xipfs_cmd("unsparse", "-f", simg, raw)
    with xipfs.open(raw) as fs:
        assert_same(b.kernel, R.xipfs_view(fs), "unsparsed")


@needs_mount
@pytest.mark.skipif(shutil.which("sfdisk") is None, reason="sfdisk is not installed")
@pytest.mark.parametrize("label", ["gpt", "dos"])
def test_whole_disk_with_a_fat_partition_first(built, workdir, label):
    """A disk as Raspberry Pi OS or a cloud image lays it out: a FAT (EFI) partition, then the
    root filesystem (on MBR in a logical partition, 5); by number and by offset, API and command."""
    b = built("ext4")
    size = os.path.getsize(b.img)
    disk = os.path.join(workdir, f"disk-{label}.img")
    with open(disk, "wb") as f:
        f.truncate(size + (40 << 20))
    if label == "gpt":
        layout = ("label: gpt\nstart=2048, size=30M, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, name=EFI\n"
                  f"start=63488, size={size // 512}, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4, name=root\n")
        number = 2
    else:
        layout = ("label: dos\nstart=8192, size=30M, type=c\n"
                  f"start=71680, size={size // 512 + 4096}, type=5\n"
                  f"start=73728, size={size // 512}, type=83\n")
        number = 5
    run(["sfdisk", "-q", disk], input=layout.encode())
    parts = {p.number: p for p in xipfs.partitions(disk)}
    assert parts[number].size == size
    with open(b.img, "rb") as src, open(disk, "r+b") as dst:
        dst.seek(parts[number].start)
        shutil.copyfileobj(src, dst)
    for kw in ({"partition": number}, {"offset": parts[number].start}):
        with xipfs.open(disk, **kw) as fs:
            assert_same(b.kernel, R.xipfs_view(fs), f"{label} {kw}")
    listed = xipfs_cmd("ls", "-a", "--partition", str(number), f"{disk}:/special").stdout.split()
    assert sorted(listed) == sorted([b".", b".."] + list(b.kernel[b"/special"].names))
    assert_check_agrees(disk, "--partition", str(number), raw=b.img)
    with R.loop_mount(disk, "ro", offset=parts[number].start) as mnt:      # the kernel agrees
        assert R.kernel_view(mnt) == b.kernel


def test_64k_blocks_image_made_by_mke2fs(workdir):
    """64 KiB blocks (no loop mount on 4 KiB pages): made by ``mke2fs -d`` from a tree that
    Linux wrote on tmpfs; compared with that tree (mke2fs keeps whole seconds, and 32 bits of
    them: an mtime after 2038 comes back as e2fsprogs stored it)."""
    src = os.path.join(workdir, "src64k")
    os.mkdir(src)
    if os.geteuid() != 0:
        pytest.skip("the tree has device files and chown'd files: needs root")
    R.populate(src, light=True, flags=False)          # (immutable files on tmpfs would stay)
    img = mkfs(os.path.join(workdir, "64k.img"), "256M", bs=65536, src=src, fstype="ext4")
    tree = R.kernel_view(src)
    with xipfs.open(img) as fs:
        assert fs.block_size == 65536
        got = R.xipfs_view(fs)

    def plain(view: dict) -> dict:
        return {p: dataclasses.replace(e, ino=0, ctime_ns=0, atime_ns=0, blocks=0,
                                       mtime_ns=e.mtime_ns // 10**9,
                                       nlink=0 if e.names is not None else e.nlink,
                                       names=tuple(n for n in e.names if n != b"lost+found")
                                       if e.names is not None else None)
                for p, e in view.items() if p != b"/" and not p.startswith((b"/lost+found", b"/odd/time"))}
    assert_same(plain(tree), plain(got), "64 KiB blocks")
    assert_check_agrees(img)


def test_xattr_block_with_a_bad_checksum_is_refused_as_linux_refuses_it(workdir):
    """A byte changed in an xattr block's value area: the entries still parse, but the block's
    checksum no longer matches. Linux's listxattr gives EBADMSG, e2fsck -fn reports it; xipfs
    listed the attributes (found by comparing xipfs check with e2fsck on damaged images)."""
    img = mkfs(os.path.join(workdir, "xattr-csum.img"), "16M", bs=1024, fstype="ext4")
    src = os.path.join(workdir, "xattr-csum-file")
    with open(src, "w") as f:
        f.write("hi\n")
    run(["debugfs", "-w", "-R", f"write {src} f", img])
    for name in ("user.a", "user.b"):
        run(["debugfs", "-w", "-R", f"ea_set f {name} {name[-1] * 300}", img])
    blk = int(run(["debugfs", "-R", "stat f", img]).stdout.decode().split("File ACL: ")[1].split()[0])
    assert blk
    with xipfs.open(img) as fs:
        assert fs.getxattr("/f", "user.b") == b"b" * 300
    with open(img, "r+b") as f:
        f.seek(blk * 1024 + 1024 - 20)                 # inside a value: still well-formed
        f.write(b"z")
    assert "checksum does not match" in fsck(img)[1]
    with xipfs.open(img) as fs:
        with pytest.raises(xipfs.CorruptImageError, match="xattr block checksum"):
            fs.listxattr("/f")
        with pytest.raises(xipfs.CorruptImageError, match="xattr block checksum"):
            fs.getxattr("/f", "user.a")
        assert fs.read_bytes("/f") == b"hi\n"           # the file itself still reads
    with xipfs.open(img, verify=False) as fs:          # unless told not to verify
        assert sorted(fs.listxattr("/f")) == ["user.a", "user.b"]
    if _MOUNT_SKIP is None:
        with R.loop_mount(img, "ro") as mnt:
            with pytest.raises(OSError) as err:
                os.listxattr(os.path.join(mnt, "f"))
            assert err.value.errno == errno.EBADMSG


@needs_mount
def test_cp_out_of_and_into_an_image_keeps_holes(built, tmp_path):
    """``xipfs cp`` of a sparse file keeps its holes, as cp's --sparse=auto does: the 5 GiB
    file Linux wrote sparsely took 5 GiB of the destination (it is 3 MiB of data)."""
    b = built("ext4")
    out = tmp_path / "out"
    out.mkdir()
    xipfs_cmd("cp", "-rp", f"{b.img}:/odd", str(out))
    for name in ("sparse-5g", "empty-4g", "falloc"):
        st = os.stat(out / "odd" / name)
        k = b.kernel[b"/odd/" + name.encode()]
        assert st.st_size == k.size
        # the data only, give or take the 1 MiB chunks cp writes whole (not 4 or 5 GiB)
        assert st.st_blocks * 512 <= k.blocks * 512 + (4 << 20), name
        with open(out / "odd" / name, "rb") as f:
            assert R.file_digest(f, st.st_size) == k.sha256, name
    img = str(tmp_path / "copy.img")
    shutil.copyfile(b.img, img)
    local = out / "local-sparse"
    with open(local, "wb") as f:
        f.seek(100 << 20)
        f.write(b"tail")
    xipfs_cmd("cp", str(local), f"{img}:/local-sparse")
    with xipfs.open(img) as fs:
        st = fs.stat("/local-sparse")
        assert st.st_size == (100 << 20) + 4 and st.st_blocks <= 64
        with fs.open("/local-sparse", "rb") as f:
            f.seek(100 << 20)
            assert f.read() == b"tail"
    assert fsck(img)[0] == 0
