"""ext4 read in place, beyond the generated-tree suite (which runs on nine mke2fs variants):
what Linux itself writes (a large htree directory, unwritten extents, values in their own
inodes), checksums caught and skipped, per-file refusals, and the doors and containers.

The oracles are a Linux loop mount (the kernel writes the image, and reads it back for the
expected answer), e2fsprogs, sfdisk and img2simg.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import struct
import subprocess
import sys

import pytest
from conftest import IS_ROOT, mounted
from e2fs import SHM, debugfs_r, mkfs, run

import xipfs
from xipfs.extfs import layout as L

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    d = tmp_path_factory.mktemp("ext4", numbered=True)
    path = os.path.join(SHM, f"xipfs-ext4-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)
    del d


def _small_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "d"), exist_ok=True)
    with open(os.path.join(root, "hello"), "wb") as f:
        f.write(b"hello ext4\n")
    with open(os.path.join(root, "big"), "wb") as f:
        f.write(os.urandom(3 << 20))
    for i in range(40):
        with open(os.path.join(root, "d", f"f{i}"), "wb") as f:
            f.write(b"x" * i)


@pytest.fixture(scope="module")
def linux_image(work):
    """An ext4 image written by Linux: a directory of 30,000 names (an htree of two levels), a
    fallocated file written in part (unwritten extents), an xattr value in its own inode."""
    if not IS_ROOT:
        pytest.skip("the image is written through a loop mount, which needs root")
    img = mkfs(os.path.join(work, "linux.img"), "160M", extra=("-N", "40000", "-O", "ea_inode"),
               fstype="ext4")
    with mounted(img, options="rw") as mnt:
        os.mkdir(os.path.join(mnt, "many"))
        for i in range(30000):
            open(os.path.join(mnt, "many", f"entry-{i:05d}-{'x' * (i % 40)}"), "w").close()
        for i in range(500, 30000, 1000):        # removed: their names stay in the slack
            os.unlink(os.path.join(mnt, "many", f"entry-{i:05d}-{'x' * (i % 40)}"))
        fd = os.open(os.path.join(mnt, "prealloc"), os.O_CREAT | os.O_WRONLY)
        os.posix_fallocate(fd, 0, 1 << 20)
        os.pwrite(fd, b"W" * 5000, 300_000)
        os.pwrite(fd, b"V" * 10, 900_000)
        os.close(fd)
        with open(os.path.join(mnt, "xattrs"), "w") as f:
            f.write("x")
        os.setxattr(os.path.join(mnt, "xattrs"), "user.large", b"L" * 30000)
        os.setxattr(os.path.join(mnt, "xattrs"), "user.small", b"s")
        with open(os.path.join(mnt, "prealloc"), "rb") as f:
            want = f.read()
    return img, want


def test_htree_lookup_reads_a_few_blocks(linux_image):
    img, _ = linux_image
    with xipfs.open(img) as fs:
        d = fs.volume.inode(fs.stat("/many").st_ino)
        assert d.flags & L.FL_INDEX
        for i in range(1, 30000, 997):
            name = f"/many/entry-{i:05d}-{'x' * (i % 40)}"
            assert fs.stat(name).st_size == 0
        with pytest.raises(FileNotFoundError):
            fs.stat("/many/entry-00001-")
        for i in range(500, 30000, 1000):      # a removed entry's name is no entry
            with pytest.raises(FileNotFoundError):
                fs.stat(f"/many/entry-{i:05d}-{'x' * (i % 40)}")
        assert d._dir is None                  # found through the index, never read whole
        names = fs.listdir("/many")
        assert len(names) == 29970 and len(set(names)) == 29970
    with mounted(img) as mnt:
        assert sorted(os.listdir(os.path.join(mnt, "many"))) == sorted(names)


def test_unwritten_extents_read_as_zeros(linux_image):
    img, want = linux_image
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/prealloc") == want
        assert want[300_000:305_000] == b"W" * 5000 and want[:100] == bytes(100)
        runs = fs.block_runs("/prealloc")
        assert any(p == 0 for _, _, p in runs)          # the unwritten parts are no storage
        assert fs.get_xip_mem("/prealloc", 0) is None


def test_xattr_values_in_their_own_inodes(linux_image):
    img, _ = linux_image
    with xipfs.open(img) as fs:
        assert fs.getxattr("/xattrs", "user.large") == b"L" * 30000
        assert sorted(fs.listxattr("/xattrs")) == ["user.large", "user.small"]


def _ext4_image(work: str, name: str, *extra: str) -> str:
    src = os.path.join(work, name + "-src")
    if not os.path.isdir(src):
        _small_tree(src)
    return mkfs(os.path.join(work, name + ".img"), "64M", src=src, extra=extra, fstype="ext4")


def _inode_offset(img: str, path: str) -> int:
    out = debugfs_r(img, f"imap {path}").decode()
    blk, off = (int(x, 0) for x in re.search(r"block (\d+), offset (0x[0-9a-f]+)", out).groups())
    bs = int(re.search(r"Block size:\s+(\d+)", run(["dumpe2fs", "-h", img]).stdout.decode())[1])
    return blk * bs + off


def _flip(img: str, offset: int) -> None:
    with open(img, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


@pytest.mark.parametrize("what", ["superblock", "descriptor", "inode", "dir-leaf"])
def test_checksums_caught_and_skipped(work, what):
    img = _ext4_image(work, f"csum-{what}")
    with xipfs.open(img) as fs:
        dino = fs.stat("/d").st_ino
        runs = fs.block_runs("/d")
        bs = fs.block_size
    if what == "superblock":
        _flip(img, 1024 + L.SUPERBLOCK.offsets["s_mtime"])          # not a field anything checks
    elif what == "descriptor":
        _flip(img, (1 if bs == 1024 else 0) * bs + bs + L.GROUP_DESC.offsets["bg_used_dirs_count"])
    elif what == "inode":
        _flip(img, _inode_offset(img, "/hello") + L.INODE.offsets["i_mtime"])
    else:
        _flip(img, runs[0][2] * bs + 40)                              # inside a name
    with pytest.raises(xipfs.CorruptImageError) as exc, xipfs.open(img) as fs:
        fs.read_bytes("/hello")
        fs.listdir("/d")
    assert "checksum" in str(exc.value)
    with xipfs.open(img, verify=False) as fs:                     # forensic reading
        assert fs.read_bytes("/hello") == b"hello ext4\n"
        assert fs.stat("/d").st_ino == dino


def test_encrypted_file_refused_by_itself(work):
    img = _ext4_image(work, "encrypt")
    run(["tune2fs", "-O", "encrypt", img])
    debugfs_r(img, "set_inode_field /hello flags 0x80800", write=True)
    with xipfs.open(img, verify=False) as fs:
        with pytest.raises(OSError) as exc:
            fs.read_bytes("/hello")
        assert exc.value.errno == errno.ENOKEY
        assert len(fs.read_bytes("/big")) == 3 << 20             # the rest reads as ever


def test_partitions_and_offsets_are_windows_of_one_mapping(work):
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk (Debian: fdisk) is not installed")
    disk = os.path.join(work, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(100 << 20)
    run(["sfdisk", "-q", disk], input=b"label: gpt\nsize=40M, type=L, name=root\ntype=L, name=data\n")
    parts = xipfs.partitions(disk)
    assert [p.number for p in parts] == [1, 2] and parts[0].name == "root"
    src = os.path.join(work, "csum-none-src")
    _small_tree(src)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-d", src, "-E", f"offset={parts[1].start}", disk,
         str(parts[1].size // 1024) + "k"])
    with xipfs.open(disk, partition=2) as fs:
        assert fs.is_xip
        assert fs.read_bytes("/hello") == b"hello ext4\n"
        view = fs.get_xip_mem("/hello", 0)
        pblk = fs.block_runs("/hello")[0][2]
        bs = fs.block_size
    with open(disk, "rb") as f:
        f.seek(parts[1].start + pblk * bs)
        assert f.read(11) == bytes(view[:11])
    with xipfs.open(disk, offset=parts[1].start) as fs:
        assert sorted(fs.listdir("/")) == ["big", "d", "hello", "lost+found"]
    with pytest.raises(LookupError):
        xipfs.open(disk, partition=3)


def test_sparse_image_reads_like_the_raw_one(work):
    if shutil.which("img2simg") is None:
        pytest.skip("img2simg (Debian: android-sdk-libsparse-utils) is not installed")
    img = _ext4_image(work, "sparse")
    simg = img + ".simg"
    run(["img2simg", img, simg])
    with xipfs.open(img) as raw, xipfs.open(simg) as sp:
        for path in ("/hello", "/big", "/d/f33"):
            assert sp.read_bytes(path) == raw.read_bytes(path)
        assert sp.listdir("/d") == raw.listdir("/d")
    with pytest.raises(OSError) as exc:
        xipfs.open(simg, "r+")
    assert exc.value.errno == errno.EROFS
    xipfs.unsparse(simg, img + ".raw")
    with open(img, "rb") as a, open(img + ".raw", "rb") as b:
        assert hashlib.sha256(a.read()).digest() == hashlib.sha256(b.read()).digest()


def test_fsspec_ext4_protocol(work):
    fsspec = pytest.importorskip("fsspec")
    img = _ext4_image(work, "fsspec")
    with fsspec.open(f"ext4://hello::{img}", "rb") as f:
        assert f.read() == b"hello ext4\n"
    fs = fsspec.filesystem("ext4", fo=img)
    assert sorted(fs.ls("/d", detail=False)) == sorted(f"d/f{i}" for i in range(40))


def test_import_from_an_ext4_image(work):
    src = os.path.join(work, "py-src")
    os.makedirs(os.path.join(src, "pkg4"), exist_ok=True)
    with open(os.path.join(src, "pkg4", "__init__.py"), "w") as f:
        f.write("VALUE = 'from ext4'\n")
    img = mkfs(os.path.join(work, "py.img"), "16M", src=src, fstype="ext4")
    out = subprocess.run([sys.executable, "-c", "import xipfs, sys; sys.path.insert(0, sys.argv[1]); "
                          "import pkg4; print(pkg4.VALUE, pkg4.__file__)", img + "/"],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith("from ext4 ")


def test_writing_a_feature_xipfs_does_not_write_is_refused_naming_it(work, monkeypatch):
    """An image with a feature xipfs reads but does not write (quota, say) opens read-only only,
    and so does every ext4 image with XIPFS_EXT4_WRITE=0, the switch back to read-only ext4."""
    img = _ext4_image(work, "rw", "-O", "quota")
    with pytest.raises(OSError) as exc:
        xipfs.open(img, "r+")
    assert exc.value.errno == errno.EROFS and "quota" in str(exc.value)
    plain = _ext4_image(work, "plain")
    monkeypatch.setenv("XIPFS_EXT4_WRITE", "0")
    out = subprocess.run([sys.executable, "-c", "import sys, xipfs\ntry:\n xipfs.open(sys.argv[1], 'r+')\n"
                          "except OSError as e:\n print(e.errno, e)", plain],
                         capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"{errno.EROFS} ") and "extent" in out


def test_casefolded_directory_looked_up_as_linux(work):
    """A directory made casefolded by Linux (chattr +F): names match there without regard to
    case, elsewhere exactly (tests/test_casefold.py has the rest)."""
    img = os.path.join(work, "casefold.img")
    mkfs(img, "32M", extra=("-O", "casefold"), fstype="ext4")
    if not IS_ROOT:
        pytest.skip("the casefolded directory is made through a loop mount")
    with mounted(img, options="rw") as mnt:
        os.mkdir(os.path.join(mnt, "ci"))
        r = subprocess.run(["chattr", "+F", os.path.join(mnt, "ci")], capture_output=True)
        if r.returncode:
            pytest.skip(f"chattr +F failed: {r.stderr.decode().strip()}")
        open(os.path.join(mnt, "ci", "Name"), "w").close()
        open(os.path.join(mnt, "plain"), "w").close()
    with xipfs.open(img) as fs:
        assert fs.stat("/plain").st_size == 0
        assert fs.stat("/ci/name").st_ino == fs.stat("/ci/NAME").st_ino == fs.stat("/ci/Name").st_ino
        assert fs.listdir("/ci") == ["Name"]
        with pytest.raises(FileNotFoundError):
            fs.stat("/PLAIN")


def test_checksum_seed_struct():
    """The raw CRC32C chains, as every checksum of ext4 relies on."""
    from xipfs.extfs.csum import crc32c_raw

    assert crc32c_raw(0xFFFFFFFF, b"123456789") ^ 0xFFFFFFFF == 0xE3069283
    assert crc32c_raw(crc32c_raw(7, b"abc"), memoryview(b"def")) == crc32c_raw(7, bytearray(b"abcdef"))
    assert struct.calcsize("<I") == 4


def _digest(path: str) -> bytes:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).digest()


def _snapshot(fs) -> dict:
    out = {}
    for top, dirs, files in fs.walk("/"):
        for name in dirs + files:
            p = top.rstrip("/") + "/" + name
            st = fs.lstat(p)
            out[p] = (st.st_mode, st.st_size, st.st_nlink,
                      fs.read_bytes(p) if name in files and not fs.islink(p) else None)
    return out


@pytest.mark.parametrize("csum", [False, True], ids=["plain", "csum-v3"])
def test_journal_replayed_in_memory_as_e2fsck_replays_it(work, csum):
    """Committed transactions (data blocks, a directory block, an inode table block, a revoked
    block) are seen as e2fsck -fy puts them in place, and the image is not written."""
    img = _ext4_image(work, f"journal-{csum}")
    bs = int(re.search(r"Block size:\s+(\d+)", run(["dumpe2fs", "-h", img]).stdout.decode())[1])
    small = int(debugfs_r(img, "bmap /hello 0").split()[0])
    big = int(debugfs_r(img, "bmap /big 3").split()[0])
    gone = int(debugfs_r(img, "bmap /big 5").split()[0])
    payload = os.path.join(work, f"payload-{csum}")
    with open(payload, "wb") as f:
        f.write(b"replayed text\n".ljust(bs, b"R") + b"B" * bs)
    revoked = payload + ".r"
    with open(revoked, "wb") as f:
        f.write(b"never seen".ljust(bs, b"N"))
    script = [f"jo{' -c' if csum else ''}", f"jw -b {small},{big} {payload}", "jc",
              f"jo{' -c' if csum else ''}", f"jw -b {gone} {revoked}", "jc",
              f"jo{' -c' if csum else ''}", f"jw -r {gone}", "jc"]
    run(["debugfs", "-w", "-f", "-", img], input="\n".join(script).encode())
    assert "needs_recovery" in run(["dumpe2fs", "-h", img]).stdout.decode()
    before = _digest(img)
    fixed = img + ".fixed"
    shutil.copyfile(img, fixed)
    subprocess.run(["e2fsck", "-fy", fixed], capture_output=True)
    with xipfs.open(fixed) as fs:
        want = _snapshot(fs)
    for xip in (True, False):
        with xipfs.open(img, xip=xip) as fs:
            assert fs.volume.replayed
            assert fs.read_bytes("/hello") == b"replayed text\n"[:11]
            assert _snapshot(fs) == want
    assert _digest(img) == before                  # nothing written


# -- damaged ext4 metadata: only CorruptImageError and the ordinary os errors -------------------
def _metadata_ranges(img: str, paths: list[str]) -> list[tuple[int, int]]:
    """Byte ranges of an ext4 image's metadata: superblock, descriptors, the inodes of ``paths``,
    their directory and extent-tree blocks."""
    dump = run(["dumpe2fs", img]).stdout.decode()
    bs = int(re.search(r"Block size:\s+(\d+)", dump)[1])
    gdt = int(re.search(r"Primary superblock at \d+, Group descriptors at (\d+)", dump)[1])
    out = [(1024, 1024 + 0x200), (gdt * bs, gdt * bs + 256)]
    for p in paths:
        off = _inode_offset(img, p)
        out.append((off, off + 256))
        text = debugfs_r(img, f'stat "{p}"').decode()
        for m in re.finditer(r"\(ETB\d+\):(\d+)", text):
            out.append((int(m[1]) * bs, int(m[1]) * bs + 128))
        if "Type: directory" in text:
            for m in list(re.finditer(r"\((\d+)(?:-\d+)?\):(\d+)", text))[:3]:
                out.append((int(m[2]) * bs, int(m[2]) * bs + bs))
    return out


@pytest.mark.parametrize("features", ["^metadata_csum", "metadata_csum", "inline_data,^metadata_csum"])
def test_fuzz_ext4_metadata(work, features):
    """Random bytes in the superblock, descriptors, inodes, directory blocks (an htree among
    them) and extent-tree blocks: only CorruptImageError, UnsupportedFeatureError and the
    ordinary os errors come out, every variant ends within seconds."""
    from corrupt_util import Hang, exercise

    src = os.path.join(work, "fuzz-src")
    if not os.path.isdir(src):
        _small_tree(src)
        os.makedirs(os.path.join(src, "many"))
        for i in range(1500):
            open(os.path.join(src, "many", f"n{i:05d}"), "w").close()
        with open(os.path.join(src, "sparse"), "wb") as f:
            for i in range(300):
                f.seek(i * 8192)
                f.write(b"s" * 100)
    img = mkfs(os.path.join(work, f"fuzz-{features}.img"), "32M", bs=1024, src=src,
               extra=("-O", features), fstype="ext4")
    run(["e2fsck", "-fyD", img], check=False)           # the big directory gets its htree
    ranges = _metadata_ranges(img, ["/", "/d", "/many", "/sparse", "/big", "/hello"])
    with open(img, "rb") as f:
        base = f.read()
    rnd = random.Random(hash(features) & 0xFFFF)
    failures = []
    fd = os.open(img, os.O_RDWR)
    try:
        for i in range(40):
            a, b = rnd.choice(ranges)
            flips = [(rnd.randrange(a, b), rnd.randrange(256)) for _ in range(rnd.choice((1, 2, 4)))]
            for off, v in flips:
                os.pwrite(fd, bytes([v]), off)
            try:
                exercise(img, i % 2 == 0, seconds=10)
            except (Hang, AssertionError, Exception) as err:  # noqa: B014 - report every kind
                failures.append(f"variant {i} {flips}: {type(err).__name__}: {err}")
            finally:
                for off, _ in flips:
                    os.pwrite(fd, base[off:off + 1], off)
    finally:
        os.close(fd)
    assert not failures, "\n".join(failures[:5])


def test_inline_data_without_its_attribute(work):
    """An inline file whose system.data attribute is gone: corruption, named."""
    img = mkfs(os.path.join(work, "inline-bad.img"), "16M", extra=("-O", "inline_data,^metadata_csum"),
               fstype="ext4")
    if not IS_ROOT:
        pytest.skip("the inline file is written through a loop mount")
    with mounted(img, options="rw") as mnt, open(os.path.join(mnt, "f"), "w") as f:
        f.write("y" * 100)
    off = _inode_offset(img, "/f")
    with open(img, "r+b") as f:                          # the in-inode xattr magic, gone
        f.seek(off + 128 + struct.unpack("<H", _read(img, off + 128, 2))[0])
        f.write(b"\0\0\0\0")
    with xipfs.open(img) as fs, pytest.raises(xipfs.CorruptImageError) as exc:
        fs.read_bytes("/f")
    assert "system.data" in str(exc.value)


def _read(path: str, off: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


def test_a_partition_is_mapped_sent_and_copied_in_place(work):
    """fs.mmap, sendfile and unpack of a partition use the disk's descriptor at the partition's
    place (base_offset), and give the partition's bytes."""
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk (Debian: fdisk) is not installed")
    import socket

    disk = os.path.join(work, "disk2.img")
    with open(disk, "wb") as f:
        f.truncate(80 << 20)
    run(["sfdisk", "-q", disk], input=b"label: dos\nsize=20M, type=83\ntype=83\n")
    part = xipfs.partitions(disk)[1]
    src = os.path.join(work, "part-src")
    _small_tree(src)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "4096", "-d", src, "-E", f"offset={part.start}", disk,
         str(part.size // 1024) + "k"])
    with open(os.path.join(src, "big"), "rb") as f:
        want = f.read()
    with xipfs.open(disk, partition=2) as fs:
        assert fs.device.base_offset == part.start and fs.device.fileno() >= 0
        with fs.mmap("/big") as m:
            assert m.is_xip and bytes(m) == want
        a, b = socket.socketpair()
        try:
            got = bytearray()
            import threading
            t = threading.Thread(target=lambda: fs.sendfile(a, "/big") and a.shutdown(socket.SHUT_WR))
            t.start()
            while len(got) < len(want):
                chunk = b.recv(1 << 20)
                if not chunk:
                    break
                got += chunk
            t.join()
            assert bytes(got) == want
        finally:
            a.close()
            b.close()
        out = os.path.join(work, "part-out")
        xipfs.unpack(fs, out)
        with open(os.path.join(out, "big"), "rb") as f:
            assert f.read() == want


def test_birthtime_is_the_inodes_crtime(work):
    img = _ext4_image(work, "crtime")
    text = debugfs_r(img, "stat /hello").decode()
    secs, extra = (int(x, 16) for x in re.search(r"crtime: 0x([0-9a-f]+):([0-9a-f]+)", text).groups())
    with xipfs.open(img) as fs:
        assert fs.birthtime_ns("/hello") == (secs + ((extra & 3) << 32)) * 10**9 + (extra >> 2)
    small = mkfs(os.path.join(work, "crtime128.img"), "8M", isize=128, fstype="ext4")
    with xipfs.open(small) as fs:
        assert fs.birthtime_ns("/") is None


def test_bigalloc_with_1k_blocks(work):
    """1 KiB blocks with 16 KiB clusters: the first data block is 0, and the descriptors follow
    the superblock at block 1 (ext2fs_descriptor_block_loc2)."""
    src = os.path.join(work, "ba-src")
    _small_tree(src)
    img = mkfs(os.path.join(work, "ba1k.img"), "64M", bs=1024, src=src,
               extra=("-O", "bigalloc", "-C", "16384"), fstype="ext4")
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/hello") == b"hello ext4\n"
        with open(os.path.join(src, "big"), "rb") as f:
            assert fs.read_bytes("/big") == f.read()
        sv = fs.statvfs("/")
    assert xipfs.check(img) == []
    if IS_ROOT:
        with mounted(img) as mnt:
            k = os.statvfs(mnt)
        assert (sv.f_blocks, sv.f_bfree, sv.f_bavail) == (k.f_blocks, k.f_bfree, k.f_bavail)


def test_a_refused_writer_does_not_replay_the_journal(work):
    """Opening with "r+" an image xipfs may not write (a feature it does not write: quota) fails
    with EROFS and leaves a pending journal, and every other byte, as they were."""
    img = _ext4_image(work, "refused", "-O", "quota")
    blk = int(debugfs_r(img, "bmap /hello 0").split()[0])
    bs = int(re.search(r"Block size:\s+(\d+)", run(["dumpe2fs", "-h", img]).stdout.decode())[1])
    payload = os.path.join(work, "refused-payload")
    with open(payload, "wb") as f:
        f.write(b"j" * bs)
    run(["debugfs", "-w", "-f", "-", img], input=f"jo\njw -b {blk} {payload}\njc\n".encode())
    before = _digest(img)
    with pytest.raises(OSError) as exc:
        xipfs.open(img, "r+")
    assert exc.value.errno == errno.EROFS
    assert _digest(img) == before
