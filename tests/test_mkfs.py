"""mkfs: images e2fsck finds clean for every block and inode size, 1 MiB to 64 GiB, and Linux mounts."""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from e2fs import dumpe2fs, fsck

import xipfs
from xipfs.device import MemoryDevice

SHM = "/dev/shm"


@pytest.fixture
def image():
    path = f"{SHM}/xipfs-test-mkfs-{os.getpid()}.img"
    yield path
    if os.path.exists(path):
        os.unlink(path)


@pytest.mark.parametrize("bs", [1024, 2048, 4096])
@pytest.mark.parametrize("isize", [128, 256])
@pytest.mark.parametrize("size", [1 << 20, 5_000_000, 64 << 20, 1 << 30])
def test_clean_for_every_geometry(image, bs, isize, size):
    xipfs.mkfs(image, size, block_size=bs, inode_size=isize)
    rc, out = fsck(image)
    assert rc == 0, out
    with xipfs.open(image) as fs:
        assert fs.block_size == bs and sorted(fs.listdir("/")) == ["lost+found"]
        assert fs.stat("/lost+found").st_mode == 0o040700
        assert fs.stat("/").st_nlink == 3


def test_64_gib_sparse(image):
    xipfs.mkfs(image, 64 << 30)
    assert os.stat(image).st_blocks * 512 < 64 << 20      # only metadata takes memory
    rc, out = fsck(image)
    assert rc == 0, out
    info = dumpe2fs(image, "-h")
    assert "Block count:              16777216" in info


def test_defaults_match_mke2fs_conventions(image):
    xipfs.mkfs(image, 64 << 20, label="demo", uuid="12345678-1234-5678-1234-567812345678")
    info = dumpe2fs(image, "-h")
    feats = next(line for line in info.splitlines() if line.startswith("Filesystem features:"))
    assert set(feats.split(":", 1)[1].split()) == {"ext_attr", "dir_index", "filetype", "sparse_super",
                                                   "large_file"}
    assert "Block size:               4096" in info and "Inode size:\t          256" in info
    assert "Filesystem volume name:   demo" in info
    assert "12345678-1234-5678-1234-567812345678" in info
    assert "Filesystem state:         clean" in info
    assert "Maximum mount count:      -1" in info


def test_features_and_inodes(image):
    xipfs.mkfs(image, 16 << 20, features=["^dir_index", "^ext_attr"], inodes=1000)
    info = dumpe2fs(image, "-h")
    assert "dir_index" not in info and "ext_attr" not in info
    count = int(next(line for line in info.splitlines() if line.startswith("Inode count:")).split()[-1])
    assert 1000 <= count < 1100
    assert fsck(image)[0] == 0
    xipfs.mkfs(image, 16 << 20, features="none")
    assert fsck(image)[0] == 0
    with pytest.raises(ValueError, match="resize_inode"):
        xipfs.mkfs(image, 16 << 20, features=["resize_inode"])


def test_bad_parameters(image):
    with pytest.raises(ValueError):
        xipfs.mkfs(image, 20 << 10, block_size=4096)           # too small
    with pytest.raises(ValueError):
        xipfs.mkfs(image, 8 << 20, block_size=3000)
    with pytest.raises(ValueError):
        xipfs.mkfs(image, 8 << 20, inode_size=100)
    with pytest.raises(ValueError):
        xipfs.mkfs(image)                                      # a new file needs a size


def test_reformat_existing_file_and_device(image):
    with open(image, "wb") as f:
        f.write(os.urandom(8 << 20))                           # old garbage everywhere
    xipfs.mkfs(image)                                          # size taken from the file
    assert fsck(image)[0] == 0
    with open(image, "r+b") as f:
        f.write(os.urandom(8 << 20))
    dev = MemoryDevice.from_path(image)
    xipfs.mkfs(dev)                                            # an open device: zeroes what it uses
    dev.close()
    assert fsck(image)[0] == 0


def test_shared_memory_target():
    name = f"/xipfs-test-mkfs-shm-{os.getpid()}"
    try:
        xipfs.mkfs(name, 8 << 20)
        with xipfs.open(name, "r+") as fs:
            assert fs.is_xip and fs.device.kind == "shm"
            fs.write_bytes("/hello", b"hi")
        assert fsck("/dev/shm" + name)[0] == 0
        with xipfs.open(name[1:]) as fs:                       # Python's SharedMemory style name
            assert fs.read_bytes("/hello") == b"hi"
    finally:
        os.unlink("/dev/shm" + name)


def test_preallocate(image):
    """``preallocate=True`` reserves every page now (st_blocks covers the size); the image is
    the same clean filesystem, and a size tmpfs cannot hold fails with ENOSPC naming it."""
    xipfs.mkfs(image, 64 << 20)
    assert os.stat(image).st_blocks * 512 < 8 << 20            # sparse by default
    xipfs.mkfs(image, 64 << 20, preallocate=True)
    assert os.stat(image).st_blocks * 512 >= 64 << 20
    assert fsck(image)[0] == 0
    with xipfs.open(image, "r+") as fs:
        fs.write_bytes("/f", b"x" * 100_000)
    assert fsck(image)[0] == 0
    # Refused before a page is taken: filling tmpfs (which is memory) to find out would wake
    # the OOM killer on a busy machine.
    free = os.statvfs(SHM).f_bavail * os.statvfs(SHM).f_frsize
    used_before = _shm_used()
    with pytest.raises(OSError) as err:
        xipfs.mkfs(image, free + (1 << 30), preallocate=True)
    assert err.value.errno == errno.ENOSPC and image in str(err.value)
    assert _shm_used() - used_before < 256 << 20


def _shm_used() -> int:
    st = os.statvfs(SHM)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def test_anonymous_memory():
    dev = MemoryDevice.anonymous(4 << 20)
    xipfs.mkfs(dev, block_size=1024)
    with xipfs.open(dev, "r+") as fs:
        fs.write_bytes("/f", b"x" * 5000)
        assert fs.read_bytes("/f") == b"x" * 5000
    dev.close()


def test_linux_mounts_it(image, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    xipfs.mkfs(image, 32 << 20)
    with xipfs.open(image, "r+") as fs:
        fs.makedirs("/a/b")
        fs.write_bytes("/a/b/data", b"0123456789" * 1000)
        fs.symlink("a/b/data", "/link")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    done = subprocess.run(["mount", "-o", "loop", "-t", "ext2", image, str(mnt)], capture_output=True)
    if done.returncode:
        pytest.skip(f"mount failed here: {done.stderr.decode().strip()}")
    try:
        assert (mnt / "a" / "b" / "data").read_bytes() == b"0123456789" * 1000
        assert os.readlink(mnt / "link") == "a/b/data"
        (mnt / "from-linux").write_bytes(b"written by the kernel")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert fsck(image)[0] == 0
    with xipfs.open(image) as fs:
        assert fs.read_bytes("/from-linux") == b"written by the kernel"


def test_statvfs_follows_writes(image):
    xipfs.mkfs(image, 16 << 20)
    with xipfs.open(image, "r+") as fs:
        before = fs.statvfs()
        assert not before.f_flag & os.ST_RDONLY
        fs.write_bytes("/f", b"x" * (1 << 20))
        after = fs.statvfs()
        assert before.f_bfree - after.f_bfree == (1 << 20) // 4096 + 1     # data + indirect block
        assert before.f_ffree - after.f_ffree == 1
    with xipfs.open(image) as fs:
        assert fs.statvfs().f_bfree == after.f_bfree and fs.statvfs().f_flag & os.ST_RDONLY
    out = dumpe2fs(image, "-h")
    assert f"Free blocks:              {after.f_bfree}" in out
