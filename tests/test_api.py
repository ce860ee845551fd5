"""The file objects and the os-like facade: io semantics, os names, errors and errnos."""

from __future__ import annotations

import errno
import io
import os
import shutil

import pytest
from e2fs import mkfs

import xipfs

BS = 1024
DATA = bytes(range(256)) * 300           # 76800 bytes: direct and indirect blocks at 1 KiB
TEXT = "line one\nligne deux é\r\nthird\n"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    src = tmp_path_factory.mktemp("api-src")
    (src / "data.bin").write_bytes(DATA)
    (src / "text.txt").write_bytes(TEXT.encode())
    (src / "empty").write_bytes(b"")
    (src / "dir").mkdir()
    (src / "dir" / "inner").write_bytes(b"inner\n")
    os.symlink("dir/inner", src / "link")
    os.symlink("..", src / "dir" / "up")
    os.symlink("loop2", src / "loop1")
    os.symlink("loop1", src / "loop2")
    os.mkfifo(src / "fifo")
    with open(src / "hole.bin", "wb") as f:
        f.seek(5 * BS + 3)
        f.write(b"tail")
    path = f"/dev/shm/xipfs-test-api-{os.getpid()}.img"
    mkfs(path, "4M", bs=BS, src=str(src))
    yield path
    os.unlink(path)
    shutil.rmtree(src)


@pytest.fixture(params=[True, False], ids=["xip", "pagecache"])
def fs(request, image):
    with xipfs.open(image, xip=request.param) as fs:
        assert fs.is_xip is request.param
        yield fs


def test_raw_file_follows_io(fs):
    f = fs.open("/data.bin", "rb", buffering=0)
    assert isinstance(f, io.RawIOBase) and isinstance(f, xipfs.XipFile)
    assert f.readable() and f.seekable() and not f.writable()
    assert f.read(10) == DATA[:10] and f.tell() == 10
    buf = bytearray(5000)
    assert f.readinto(buf) == 5000 and buf == DATA[10:5010]
    assert f.seek(-6, os.SEEK_END) == len(DATA) - 6
    assert f.read() == DATA[-6:]
    assert f.read(100) == b"" and f.readinto(bytearray(10)) == 0      # at EOF: 0, no error
    f.seek(len(DATA) + 100)
    assert f.read(1) == b""                                           # past EOF: still 0
    assert f.seek(3) == 3 and f.readall() == DATA[3:]
    with pytest.raises(OSError):
        f.seek(-1)
    with pytest.raises(io.UnsupportedOperation):
        f.fileno()
    f.close()
    with pytest.raises(ValueError):
        f.read()


def test_pread_readv_preadv(fs):
    with fs.open("/data.bin", "rb", buffering=0) as f:
        assert f.pread(100, 1020) == DATA[1020:1120] and f.tell() == 0
        assert f.pread(10, len(DATA) - 4) == DATA[-4:]
        bufs = [bytearray(7), bytearray(2000), memoryview(bytearray(13))]
        assert f.readv(bufs) == 2020 and f.tell() == 2020
        assert bytes(bufs[0] + bufs[1] + bufs[2]) == DATA[:2020]
        a, b = bytearray(3), bytearray(10)
        assert f.preadv([a, b], len(DATA) - 5) == 5 and f.tell() == 2020
        assert bytes(a) + bytes(b[:2]) == DATA[-5:]


def test_readinto_other_buffer_types(fs):
    import array

    with fs.open("/data.bin", "rb", buffering=0) as f:
        arr = array.array("I", bytes(400))
        assert f.readinto(arr) == 400 and arr.tobytes() == DATA[:400]


def test_holes_read_as_zeros(fs):
    expect = bytes(5 * BS + 3) + b"tail"
    assert fs.read_bytes("/hole.bin") == expect
    with fs.open("/hole.bin", "rb", buffering=0) as f:
        buf = bytearray(len(expect))
        buf[:] = b"\xff" * len(buf)
        assert f.readinto(buf) == len(expect) and buf == expect
    assert fs.get_xip_mem("/hole.bin", 0) is None
    assert bytes(fs.get_xip_mem("/hole.bin", 5))[:7] == b"\0\0\0tail"


def test_buffered_and_text_modes(fs):
    with fs.open("/data.bin") as f:                     # default "r" is text
        assert isinstance(f, io.TextIOWrapper)
    with fs.open("/data.bin", "rb") as f:
        assert isinstance(f, io.BufferedReader)
        assert f.read(3) == DATA[:3] and f.peek(1)[:1] == DATA[3:4]
        f.seek(1000)
        assert f.read() == DATA[1000:]
    with fs.open("/text.txt", encoding="utf-8") as f:
        assert f.readlines() == ["line one\n", "ligne deux é\n", "third\n"]
    with fs.open("/text.txt", "r", encoding="utf-8", newline="") as f:
        assert f.read() == TEXT
    assert fs.read_text("/text.txt", encoding="utf-8") == TEXT.replace("\r\n", "\n")
    for bad in ("rr", "rbt", "q", ""):
        with pytest.raises(ValueError):
            fs.open("/data.bin", bad)
    with pytest.raises(ValueError):
        fs.open("/text.txt", "r", buffering=0)
    for mode in ("w", "wb", "a", "r+b", "x"):
        with pytest.raises(OSError) as err:
            fs.open("/data.bin", mode)
        assert err.value.errno == errno.EROFS


@pytest.mark.parametrize("path,exc,code", [
    ("/missing", FileNotFoundError, errno.ENOENT),
    ("/data.bin/x", NotADirectoryError, errno.ENOTDIR),
    ("/data.bin/", NotADirectoryError, errno.ENOTDIR),
    ("/loop1", OSError, errno.ELOOP),
    ("/" + "n" * 256, OSError, errno.ENAMETOOLONG),
])
def test_lookup_errors(fs, path, exc, code):
    with pytest.raises(exc) as err:
        fs.stat(path)
    assert err.value.errno == code and err.value.filename == path


def test_open_errors(fs):
    with pytest.raises(IsADirectoryError):
        fs.open("/dir", "rb")
    with pytest.raises(IsADirectoryError):
        fs.read_bytes("/dir")
    with pytest.raises(OSError) as err:
        fs.open("/fifo", "rb")
    assert err.value.errno == errno.ENXIO
    with pytest.raises(NotADirectoryError):
        fs.listdir("/data.bin")
    with pytest.raises(OSError) as err:
        fs.readlink("/data.bin")
    assert err.value.errno == errno.EINVAL
    with pytest.raises(OSError) as err:
        fs.getxattr("/data.bin", "user.nothing")
    assert err.value.errno == errno.ENODATA


def test_names_and_links(fs):
    assert sorted(fs.listdir("/")) == sorted(
        ["lost+found", "data.bin", "text.txt", "empty", "dir", "link", "loop1", "loop2", "fifo", "hole.bin"])
    assert sorted(fs.listdir(b"/dir")) == [b"inner", b"up"]
    assert fs.read_bytes("/link") == b"inner\n"
    assert fs.read_bytes("dir/../link") == b"inner\n"         # relative = from the root
    assert fs.read_bytes("/dir/up/dir/inner") == b"inner\n"     # ".." is physical, after the link
    assert fs.read_bytes("/dir/up/data.bin") == DATA and fs.stat("/dir/up/..").st_ino == 2
    assert fs.readlink("/link") == "dir/inner" and fs.readlink(b"/link") == b"dir/inner"
    assert fs.islink("/link") and fs.isfile("/link") and not fs.isdir("/link")
    assert fs.exists("/dir/") and not fs.exists("/nope") and not fs.exists("/loop1")
    assert fs.lexists("/loop1")
    assert fs.stat("/link").st_ino == fs.stat("/dir/inner").st_ino != fs.lstat("/link").st_ino
    assert fs.stat("/").st_ino == 2 and fs.stat("/..").st_ino == 2


def test_scandir_and_walk(fs):
    with fs.scandir("/") as it:
        entries = {e.name: e for e in it}
    assert entries["dir"].is_dir() and not entries["dir"].is_file()
    assert entries["link"].is_symlink() and entries["link"].is_file()
    assert not entries["link"].is_file(follow_symlinks=False)
    assert entries["fifo"].stat().st_mode & 0o170000 == 0o010000
    assert entries["data.bin"].inode() == fs.stat("/data.bin").st_ino
    assert entries["dir"].path == "/dir" and os.fspath(entries["dir"]) == "/dir"
    walked = list(fs.walk("/"))
    assert walked[0][0] == "/" and ("/dir", ["up"], ["inner"]) in walked
    bottom_up = list(fs.walk("/", topdown=False))
    assert bottom_up[-1][0] == "/" and {w[0] for w in bottom_up} == {w[0] for w in walked}
    errors = []
    assert list(fs.walk("/data.bin", onerror=errors.append)) == [] and errors


def test_stat_fields(fs, image):
    st = fs.stat("/data.bin")
    assert isinstance(st, os.stat_result)
    assert st.st_size == len(DATA) and st.st_blksize == BS
    assert st.st_blocks == (len(DATA) // BS + 1) * (BS // 512)     # 75 data + 1 indirect
    assert st.st_mtime_ns // 10**9 == st.st_mtime and st.st_nlink == 1
    vfs = fs.statvfs()
    assert vfs.f_bsize == BS and vfs.f_namemax == 255 and vfs.f_flag & os.ST_RDONLY
    assert vfs.f_bfree <= vfs.f_blocks


def test_image_is_read_in_place(image):
    with xipfs.open(image) as fs:
        assert fs.is_xip
        view = fs.get_xip_mem("/data.bin", 1)
        assert view.readonly and bytes(view) == DATA[BS:2 * BS]
        runs = fs.block_runs("/data.bin")
        fd = os.open(image, os.O_RDONLY)
        try:
            assert os.pread(fd, BS, runs[0][2] * BS + BS) == bytes(view)
        finally:
            os.close(fd)
        del view


def test_modes_other_than_read_are_refused(image):
    with pytest.raises(ValueError):
        xipfs.open(image, "w")


def test_directory_block_rules_named():
    """Each rule Linux applies to a directory block is checked on its own, with its own message."""
    from xipfs.extfs.dir import encode_entry, index_directory

    bs = 1024

    def block(dotdot_rec_len: int) -> memoryview:
        raw = encode_entry(12, 12, b".", 2).ljust(12, b"\0") + encode_entry(2, dotdot_rec_len, b"..", 2)
        return memoryview(raw.ljust(bs, b"\0"))

    assert index_directory([(0, block(bs - 12))], bs, 100, True, 12).parent == 2
    for rec_len, message in ((1010, "rec_len 1010 invalid"), (8, "rec_len 8 invalid"),
                             (1016, "rec_len 1016 crosses the block end")):
        with pytest.raises(xipfs.CorruptImageError, match=message):
            index_directory([(0, block(rec_len))], bs, 100, True, 12)
