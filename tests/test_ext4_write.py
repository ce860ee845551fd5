"""Writing ext4 (issue 15, in progress): extent trees, checksums, uninit groups and new inodes
as Linux makes them. ext4 images still open read-only (the journal, htree maintenance and inline
data are not written yet); these tests widen the writable features for themselves, write
through the public API, and ask e2fsck and a Linux loop mount."""

from __future__ import annotations

import errno
import hashlib
import os

import pytest
from conftest import IS_ROOT, mounted
from e2fs import SHM, assert_fsck_clean, mkfs, run

import xipfs
from xipfs.extfs import layout as L


@pytest.fixture
def writable_ext4(monkeypatch):
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE",
                        L.INCOMPAT_WRITABLE | L.INCOMPAT_EXTENTS | L.INCOMPAT_64BIT | L.INCOMPAT_FLEX_BG)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED",
                        L.RO_COMPAT_SUPPORTED | L.RO_COMPAT_METADATA_CSUM | L.RO_COMPAT_HUGE_FILE
                        | L.RO_COMPAT_DIR_NLINK | L.RO_COMPAT_EXTRA_ISIZE)


def _tree(root: str) -> None:
    os.makedirs(os.path.join(root, "d"))
    with open(os.path.join(root, "small"), "wb") as f:
        f.write(b"hello\n")
    with open(os.path.join(root, "big"), "wb") as f:
        f.write(os.urandom(2_000_000))
    for i in range(50):
        with open(os.path.join(root, "d", f"f{i}"), "wb") as f:
            f.write(os.urandom(i * 100))


def _listing(fs) -> dict[str, tuple]:
    out = {}
    for top, dirs, files in fs.walk("/"):
        for name in dirs + files:
            p = top.rstrip("/") + "/" + name
            if p == "/lost+found":
                continue
            st = fs.lstat(p)
            data = fs.read_bytes(p) if name in files and not fs.islink(p) else b""
            out[p] = (st.st_mode, st.st_size, hashlib.sha256(data).hexdigest())
    return out


def _os_listing(root: str) -> dict[str, tuple]:
    out = {}
    for top, dirs, files in os.walk(root):
        for name in dirs + files:
            full = os.path.join(top, name)
            p = "/" + os.path.relpath(full, root)
            if p == "/lost+found":
                continue
            st = os.lstat(full)
            data = b""
            if name in files and not os.path.islink(full):
                with open(full, "rb") as f:
                    data = f.read()
            out[p] = (st.st_mode, st.st_size, hashlib.sha256(data).hexdigest())
    return out


@pytest.mark.parametrize("opts", [("-b", "1024"), ("-b", "4096"), ("-b", "4096", "-O", "^metadata_csum")],
                         ids=["1k", "4k", "4k-nocsum"])
def test_changes_on_an_ext4_image_are_e2fsck_clean_and_linux_reads_them(writable_ext4, tmp_path, opts):
    src = str(tmp_path / "src")
    _tree(src)
    img = mkfs(os.path.join(SHM, f"xipfs-w4-{os.getpid()}.img"), "64M", src=src,
               extra=("-O", "^has_journal,^orphan_file", *opts), fstype="ext4")
    try:
        with xipfs.open(img, "r+") as fs:
            fs.mkdir("/new")
            for i in range(120):
                fs.write_bytes(f"/new/f{i}", os.urandom(i * 37))
            fs.write_bytes("/new/big", os.urandom(3_000_000))
            with fs.open("/big", "r+b") as f:            # append, then write into the middle
                f.seek(0, 2)
                f.write(b"A" * 1_000_000)
                f.seek(500_000)
                f.write(b"M" * 70_000)
            for name in ("a", "b", "c"):                  # interleaved appends: deeper trees
                fs.write_bytes(f"/new/i-{name}", b"")
            for k in range(300):
                for name in ("a", "b", "c"):
                    with fs.open(f"/new/i-{name}", "ab") as f:
                        f.write(bytes([k & 0xFF]) * 1024)
            fs.truncate("/new/big", 10_000)
            for i in range(0, 120, 2):
                fs.unlink(f"/new/f{i}")
            fs.symlink("x" * 100, "/slowlink")
            fs.symlink("small", "/fastlink")
            fs.setxattr("/small", "user.a", b"b" * 300)
            fs.rename("/new/f1", "/moved")
            for i in range(20):
                fs.mkdir(f"/dir{i}")
                fs.write_bytes(f"/dir{i}/x", b"y" * 9000)
            want = _listing(fs)
        assert_fsck_clean(img)
        out = run(["debugfs", "-R", "stat /new/i-a", img]).stdout.decode()
        assert "EXTENTS:" in out
        if IS_ROOT:
            with mounted(img) as mnt:
                assert _os_listing(mnt) == want
    finally:
        os.unlink(img)


def test_linux_changes_after_ours_read_back(writable_ext4, tmp_path):
    """xipfs writes, Linux changes the image (copy in, remove, append), xipfs reads Linux's
    changes exactly and writes again; e2fsck is clean at every step."""
    if not IS_ROOT:
        pytest.skip("Linux's side goes through a loop mount, which needs root")
    src = str(tmp_path / "src")
    _tree(src)
    img = mkfs(os.path.join(SHM, f"xipfs-w4x-{os.getpid()}.img"), "64M", src=src,
               extra=("-O", "^has_journal,^orphan_file"), fstype="ext4")
    try:
        with xipfs.open(img, "r+") as fs:
            for i in range(30):
                fs.write_bytes(f"/ours{i}", os.urandom(5000 + i))
        assert_fsck_clean(img)
        with mounted(img, options="rw") as mnt:
            run(["cp", "-a", src, os.path.join(mnt, "copy")])
            os.unlink(os.path.join(mnt, "ours3"))
            with open(os.path.join(mnt, "ours4"), "ab") as f:
                f.write(b"linux" * 1000)
        assert_fsck_clean(img)
        with mounted(img) as mnt:
            want = _os_listing(mnt)
        with xipfs.open(img, "r+") as fs:
            assert _listing(fs) == want
            fs.write_bytes("/after", b"again")
            fs.unlink("/copy/big")
        assert_fsck_clean(img)
    finally:
        os.unlink(img)


def test_inline_files_move_out_when_written(writable_ext4, monkeypatch):
    """An inline file (written by Linux) that is written, appended to or truncated moves its
    bytes into a block first (ext4_convert_inline_data); its other attributes stay."""
    if not IS_ROOT:
        pytest.skip("the inline files are written by Linux through a loop mount")
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.INCOMPAT_INLINE_DATA)
    img = mkfs(os.path.join(SHM, f"xipfs-w4i-{os.getpid()}.img"), "32M",
               extra=("-O", "inline_data,^has_journal,^orphan_file"), fstype="ext4")
    try:
        with mounted(img, options="rw") as mnt:
            for name, data in (("tiny", b"t" * 40), ("mid", b"m" * 100), ("empty", b"")):
                with open(os.path.join(mnt, name), "wb") as f:
                    f.write(data)
            os.setxattr(os.path.join(mnt, "mid"), "user.x", b"keep")
        assert "Size of inline data" in run(["debugfs", "-R", "stat /mid", img]).stdout.decode()
        with xipfs.open(img, "r+") as fs:
            with fs.open("/tiny", "ab") as f:
                f.write(b"T" * 5000)
            with fs.open("/mid", "r+b") as f:
                f.seek(10)
                f.write(b"X")
            fs.truncate("/empty", 3)
            assert fs.getxattr("/mid", "user.x") == b"keep"
            assert "system.data" not in fs.listxattr("/mid")
            want = _listing(fs)
        assert_fsck_clean(img)
        with mounted(img) as mnt:
            assert _os_listing(mnt) == want
    finally:
        os.unlink(img)


@pytest.mark.parametrize("bs", [1024, 4096])
def test_large_writes_get_2mib_aligned_runs(bs):
    """A file written in one call, or fallocated, with 2 MiB or more gets runs aligned to 2 MiB
    in the file and in the image, where free space allows (what DAX maps with huge pages)."""
    dev = xipfs.MemoryDevice.anonymous(64 << 20)
    xipfs.mkfs(dev, block_size=bs)
    with xipfs.open(dev, "r+") as fs:
        fs.write_bytes("/small", b"x" * 5000)            # something before, to unalign the goal
        fs.write_bytes("/big", os.urandom(8 << 20))
        per = (2 << 20) // bs
        runs = fs.huge_runs("/big")
        assert sum(n for _, n, _ in runs) == 4 * per
        assert all(p % per == 0 and lb % per == 0 for lb, _, p in runs)
        with fs.open("/alloc", "wb", buffering=0) as f:
            f.fallocate(0, 4 << 20)
        assert sum(n for _, n, _ in fs.huge_runs("/alloc")) == 2 * per
        assert fs.huge_runs("/small") == []


def test_inline_directories_move_out_when_changed(writable_ext4, monkeypatch):
    """Directories Linux keeps inline get a block of their own before xipfs changes them
    (ext4_convert_inline_data_nolock): names added, removed, a directory moved in and out."""
    if not IS_ROOT:
        pytest.skip("the inline directories are made by Linux through a loop mount")
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.INCOMPAT_INLINE_DATA)
    img = mkfs(os.path.join(SHM, f"xipfs-w4d-{os.getpid()}.img"), "32M",
               extra=("-O", "inline_data"), fstype="ext4")
    try:
        with mounted(img, options="rw") as mnt:
            for d in ("a", "b", "c", "e"):
                os.mkdir(os.path.join(mnt, d))
                with open(os.path.join(mnt, d, "f"), "w") as f:
                    f.write("x" * 30)
        assert "Size of inline data" in run(["debugfs", "-R", "stat /a", img]).stdout.decode()
        with xipfs.open(img, "r+") as fs:
            for i in range(30):
                fs.write_bytes(f"/a/n{i}", b"y" * i)
            fs.unlink("/b/f")
            fs.rmdir("/b")
            fs.rename("/c", "/a/c-moved")
            fs.unlink("/e/f")
            want = _listing(fs)
        assert_fsck_clean(img)
        with mounted(img) as mnt:
            assert _os_listing(mnt) == want
    finally:
        os.unlink(img)


@pytest.mark.parametrize("bs", [1024, 4096])
def test_fallocate_makes_unwritten_extents_converted_as_written(writable_ext4, monkeypatch, bs, tmp_path):
    """fallocate on ext4 writes nothing: it links unwritten extents (2 MiB-aligned where the file
    is) that read as zeros, here, to e2fsck and to Linux; writes, a writable mapping and
    truncation turn them into data piece by piece, e2fsck-clean at every step."""
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.EXT4_INCOMPAT_WRITABLE)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.EXT4_RO_COMPAT_WRITABLE)
    img = mkfs(os.path.join(SHM, f"xipfs-falloc-{os.getpid()}-{bs}.img"), "64M", bs=bs, fstype="ext4")
    per = (2 << 20) // bs
    size = 8 << 20
    want = bytearray(size)
    try:
        with xipfs.open(img, "r+") as fs:
            fs.write_bytes("/before", b"x" * 5000)        # so the goal is not aligned by chance
            with fs.open("/f", "wb", buffering=0) as f:
                f.fallocate(0, size)
            ext = fs._inode("/f").map.extents
            assert ext and all(e.unwritten for e in ext)
            assert sum(e.count for e in ext) == size // bs
            assert ext[0].pblk % per == 0
            assert fs.stat("/f").st_size == size
            assert fs.stat("/f").st_blocks == size // 512
            assert fs.read_bytes("/f") == want
        assert_fsck_clean(img)
        assert "Uninit" in run(["debugfs", "-R", "ex /f", img]).stdout.decode()
        steps = [(3 * bs + 100, os.urandom(2 * bs)),        # inside: the extent splits in three
                 (0, b"head"),                              # at the start
                 (size - 10, b"0123456789")]                # up to the end
        for pos, data in steps:
            with xipfs.open(img, "r+") as fs:
                with fs.open("/f", "r+b", buffering=0) as f:
                    f.seek(pos)
                    f.write(data)
                want[pos:pos + len(data)] = data
                assert fs.read_bytes("/f") == want
            assert_fsck_clean(img)
        with xipfs.open(img, "r+") as fs:                   # through a writable mapping
            with fs.mmap("/f", "w", offset=4 << 20, length=2 << 20) as m:
                m[1 << 20:(1 << 20) + 3] = b"map"
            want[5 << 20:(5 << 20) + 3] = b"map"
            with fs.open("/f", "r+b", buffering=0) as f:
                f.truncate(6 << 20)
            del want[6 << 20:]
            assert fs.read_bytes("/f") == want
            m = fs._inode("/f").map
            assert any(e.unwritten for e in m.extents) and not all(e.unwritten for e in m.extents)
        assert_fsck_clean(img)
        with mounted(img) as mnt, open(os.path.join(mnt, "f"), "rb") as f:
            assert f.read() == want
    finally:
        os.unlink(img)


def test_hard_link_limit_is_ext4s(monkeypatch):
    """A file takes 65,000 links on ext4 (EXT4_LINK_MAX) and 32,000 on ext2 (EXT2_LINK_MAX)."""
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.EXT4_INCOMPAT_WRITABLE)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.EXT4_RO_COMPAT_WRITABLE)
    for fs_type, most in (("ext4", 65000), ("ext2", 32000)):
        dev = xipfs.MemoryDevice.anonymous(16 << 20)
        xipfs.mkfs(dev, fs_type=fs_type)
        with xipfs.open(dev, "r+") as fs:
            fs.write_bytes("/f", b"x")
            node = fs._inode("/f")
            node.links = most - 1                      # as if that many names were there
            fs.volume.write_inode(node)
            fs.link("/f", "/last")                     # the one that reaches the limit
            with pytest.raises(OSError) as err:
                fs.link("/f", "/over")
            assert err.value.errno == 31               # EMLINK
            node.links = 1                             # put it right for e2fsck
            fs.volume.write_inode(node)
            fs.unlink("/last")
        dev.close()


@pytest.mark.parametrize("bs", [1024, 4096])
def test_enospc_mid_operation_on_ext4(monkeypatch, bs):
    """A full ext4 image fails each kind of operation with ENOSPC and loses nothing: files,
    directories, fallocate (unwritten extents), slow symlinks and xattr blocks until the space
    runs out; what exists reads back, e2fsck is clean, and freed space is usable again."""
    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.EXT4_INCOMPAT_WRITABLE)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.EXT4_RO_COMPAT_WRITABLE)
    img = os.path.join(SHM, f"xipfs-enospc4-{os.getpid()}-{bs}.img")
    xipfs.mkfs(img, 4 << 20, fs_type="ext4", block_size=bs, journal_size=0)
    ops = {
        "file": lambda fs, i: fs.write_bytes(f"/f{i}", b"d" * (3 * bs + 1)),
        "dir": lambda fs, i: (fs.mkdir(f"/d{i}"), fs.write_bytes(f"/d{i}/x", b"x" * bs)),
        "fallocate": lambda fs, i: fs.open(f"/a{i}", "wb", buffering=0).fallocate(0, 5 * bs),
        "symlink": lambda fs, i: fs.symlink("t" * 200, f"/s{i}"),
        "xattr": lambda fs, i: (fs.write_bytes(f"/x{i}", b""), fs.setxattr(f"/x{i}", "user.v", b"v" * 900)),
    }
    try:
        with xipfs.open(img, "r+") as fs:
            want: dict[str, bytes] = {}
            failed = set()
            i = 0
            while len(failed) < len(ops):
                for kind, op in ops.items():
                    try:
                        op(fs, i)
                    except OSError as err:
                        assert err.errno == errno.ENOSPC, (kind, err)
                        failed.add(kind)
                i += 1
                assert i < 100_000
            for top, _dirs, files in fs.walk("/"):
                for name in files:
                    p = top.rstrip("/") + "/" + name
                    if not fs.islink(p):
                        want[p] = fs.read_bytes(p)
        assert_fsck_clean(img)
        with xipfs.open(img, "r+") as fs:
            for p, data in want.items():
                assert fs.read_bytes(p) == data
            for p in [p for p in want if p.startswith("/f")][:20]:
                fs.unlink(p)
            fs.write_bytes("/again", b"z" * (4 * bs))
            assert fs.read_bytes("/again") == b"z" * (4 * bs)
        assert_fsck_clean(img)
    finally:
        os.unlink(img)


def test_flex_bg_goals_are_linuxs(tmp_path):
    """With flex_bg, inodes and data go where Linux's ext4 puts them (find_group_orlov over flex
    groups, top-level directories spread by the hash of their name; a file's inode in its
    directory's flex group, its data from that flex group's second group): the same groups as
    a Linux mount doing the same on a copy of the image."""
    img = os.path.join(SHM, f"xipfs-flex-{os.getpid()}.img")
    xipfs.mkfs(img, 8 << 30, fs_type="ext4")           # 64 groups, 4 flex groups of 16
    twin = img + ".linux"
    names = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    try:
        with open(img, "rb") as a, open(twin, "wb") as b:   # sparse copy: the image is mostly holes
            while chunk := a.read(1 << 20):
                if chunk.count(0) == len(chunk):
                    b.seek(len(chunk), 1)
                else:
                    b.write(chunk)
            b.truncate(a.tell())
        with xipfs.open(img, "r+") as fs:
            for n in names:
                fs.mkdir("/" + n)
            fs.write_bytes("/alpha/f", b"x" * 100_000)
            ipg, bpg = fs.volume.ipg, fs.volume.bpg
            mine = {n: (fs.stat("/" + n).st_ino - 1) // ipg for n in names}
            mine_file = ((fs.stat("/alpha/f").st_ino - 1) // ipg, fs.block_runs("/alpha/f")[0][2] // bpg)
        assert len({g // 16 for g in mine.values()}) > 1                    # spread over flex groups
        assert mine_file == (mine["alpha"], mine["alpha"] + 1)
        assert_fsck_clean(img)
        if not IS_ROOT:
            pytest.skip("the comparison with Linux needs a loop mount (root)")
        with mounted(twin, options="rw") as mnt:
            for n in names:
                os.mkdir(os.path.join(mnt, n))
            with open(os.path.join(mnt, "alpha", "f"), "wb") as f:
                f.write(b"x" * 100_000)
            linux = {n: (os.stat(os.path.join(mnt, n)).st_ino - 1) // ipg for n in names}
            linux_ino = os.stat(os.path.join(mnt, "alpha", "f")).st_ino
        blk = int(run(["debugfs", "-R", "bmap /alpha/f 0", twin]).stdout.split()[0])
        assert linux == mine
        assert ((linux_ino - 1) // ipg, blk // bpg) == mine_file
    finally:
        for p in (img, twin):
            if os.path.exists(p):
                os.unlink(p)
