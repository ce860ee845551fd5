"""The block-device layer: memory devices (direct_access), the file device and its page cache."""

from __future__ import annotations

import os
import subprocess

import pytest
from e2fs import mkfs

import xipfs
from xipfs.device import FileDevice, MemoryDevice, PageCache, open_device, storage_kind
from xipfs.device.file import PAGE_SIZE


@pytest.fixture
def shm_file(tmp_path_factory):
    path = f"/dev/shm/xipfs-test-dev-{os.getpid()}"
    data = os.urandom(3 * PAGE_SIZE + 1234)
    with open(path, "wb") as f:
        f.write(data)
    yield path, data
    os.unlink(path)


@pytest.fixture
def disk_file(tmp_path):
    path = tmp_path / "disk.bin"
    data = os.urandom(5 * PAGE_SIZE + 77)
    path.write_bytes(data)
    return str(path), data


def test_direct_access_is_the_storage(shm_file):
    path, data = shm_file
    dev = MemoryDevice.from_path(path, readonly=False)
    view = dev.direct_access(2, 3)              # sectors 2..4: bytes 1024..2560
    assert bytes(view) == data[1024:2560]
    view[0:4] = b"XIPF"                          # a write through the view lands in the file
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.pread(fd, 4, 1024) == b"XIPF"
    finally:
        os.close(fd)
    del view
    dev.close()


def test_readonly_device_gives_readonly_views(shm_file):
    path, data = shm_file
    with MemoryDevice.from_path(path, readonly=True) as dev:
        view = dev.view(0, 16)
        assert view.readonly
        with pytest.raises(TypeError):
            view[0] = 1
        with pytest.raises(OSError):
            dev.write(b"x", 0)
        del view


def test_views_outlive_close_safely(shm_file):
    path, data = shm_file
    dev = MemoryDevice.from_path(path, readonly=True)
    view = dev.view(100, 50)
    dev.close()                                  # must not unmap under a live view
    assert bytes(view) == data[100:150]


def test_out_of_range_is_refused(shm_file):
    path, _ = shm_file
    with MemoryDevice.from_path(path, readonly=True) as dev:
        for off, n in ((dev.size - 1, 2), (-1, 1), (dev.size, 1)):
            with pytest.raises(xipfs.CorruptImageError):
                dev.view(off, n)
            with pytest.raises(xipfs.CorruptImageError):
                dev.read_into(memoryview(bytearray(n)), off)


def test_shm_and_anonymous():
    name = f"xipfs-test-shm-{os.getpid()}"
    dev = MemoryDevice.from_shm(name, create_size=8192)
    try:
        dev.write(b"hello", 4096)
        other = MemoryDevice.from_shm("/" + name, readonly=True)
        assert bytes(other.view(4096, 5)) == b"hello"
        assert other.kind == "shm" and other.is_xip
        other.close()
    finally:
        dev.close()
        os.unlink("/dev/shm/" + name)
    anon = MemoryDevice.anonymous(1 << 20)
    anon.write(b"abc", 10)
    assert bytes(anon.view(9, 5)) == b"\0abc\0"
    anon.close()


def test_file_device_and_page_cache(disk_file):
    path, data = disk_file
    dev = FileDevice(path, readonly=False)
    assert not dev.is_xip
    assert not hasattr(dev, "direct_access")
    cache = PageCache(dev, capacity=4 * PAGE_SIZE)
    buf = bytearray(len(data))
    cache.read_into(memoryview(buf), 0)
    assert buf == data
    assert bytes(cache.view(PAGE_SIZE - 5, 10)) == data[PAGE_SIZE - 5:PAGE_SIZE + 5]
    # write-back: nothing reaches the file until flushed or evicted
    cache.write(b"Z" * 10, PAGE_SIZE - 5)
    with open(path, "rb") as f:
        assert f.read()[PAGE_SIZE - 5:PAGE_SIZE + 5] == data[PAGE_SIZE - 5:PAGE_SIZE + 5]
    cache.flush()
    with open(path, "rb") as f:
        assert f.read()[PAGE_SIZE - 5:PAGE_SIZE + 5] == b"Z" * 10
    # bounded: reading everything keeps at most max_pages pages
    cache.read_into(memoryview(buf), 0)
    assert len(cache._pages) <= cache.max_pages
    cache.close()


def test_detection(shm_file, disk_file):
    shm_path, _ = shm_file
    disk_path, _ = disk_file
    assert storage_kind(shm_path) == "tmpfs"
    assert open_device(shm_path, readonly=True).is_xip
    if storage_kind(disk_path) in ("tmpfs", "ramfs"):
        pytest.skip("the temporary directory is itself on tmpfs here")
    dev = open_device(disk_path, readonly=True)
    assert not dev.is_xip and dev.kind == "file"
    dev.close()
    forced = open_device(disk_path, readonly=True, xip=True)
    assert forced.is_xip
    forced.close()
    plain = open_device(shm_path, readonly=True, xip=False)
    assert not plain.is_xip
    plain.close()


def test_block_device_goes_through_the_page_cache(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to attach a loop device")
    img = tmp_path / "loop.img"
    img.write_bytes(b"\0" * (1 << 20))
    try:
        loop = subprocess.run(["losetup", "-f", "--show", str(img)], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"losetup unavailable: {err}")
    try:
        assert storage_kind(loop) == "block device"
        dev = open_device(loop, readonly=True)
        assert not dev.is_xip and dev.size == 1 << 20
        dev.close()
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


@pytest.fixture
def hugetlbfs(tmp_path):
    """A hugetlbfs mount with a few 2 MiB pages reserved (root only), restored afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to reserve huge pages and mount hugetlbfs")
    knob = "/proc/sys/vm/nr_hugepages"
    try:
        with open(knob) as f:
            before = int(f.read())
        with open(knob, "w") as f:
            f.write(str(before + 4))
        with open(knob) as f:
            if int(f.read()) < before + 4:
                pytest.skip("the kernel could not reserve huge pages")
    except OSError as err:
        pytest.skip(f"huge pages unavailable: {err}")
    mnt = tmp_path / "huge"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "hugetlbfs", "none", str(mnt)], capture_output=True)
    if done.returncode:
        with open(knob, "w") as f:
            f.write(str(before))
        pytest.skip(f"cannot mount hugetlbfs: {done.stderr.decode().strip()}")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)
    with open(knob, "w") as f:
        f.write(str(before))


def test_image_on_hugetlbfs_is_xip(hugetlbfs, tmp_path):
    import mmap

    src = tmp_path / "tree"
    src.mkdir()
    (src / "f").write_bytes(b"huge pages\n" * 1000)
    raw = tmp_path / "raw.img"
    mkfs(str(raw), "4M", bs=4096, src=str(src))
    data = raw.read_bytes()
    path = hugetlbfs / "image"
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, len(data))                   # 4 MiB: two huge pages
        with mmap.mmap(fd, len(data)) as m:           # hugetlbfs has no write(2): fill it mapped
            m[:] = data
    finally:
        os.close(fd)
    assert storage_kind(path) == "hugetlbfs"
    with xipfs.open(path) as fs:
        assert fs.is_xip and fs.device.kind == "hugetlbfs"
        assert fs.read_bytes("/f") == b"huge pages\n" * 1000
    os.unlink(path)
