"""sendfile (xipfs.transfer) and asyncio file objects (xipfs.aio).

Every sendfile test reads the other end of a real socket in a thread and compares what arrived
with the bytes the file was written from; each runs on the memory device (XIP: ``os.sendfile``
from the image) and on the file device (the page-cache copy path).
"""

from __future__ import annotations

import asyncio
import errno
import io
import os
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from e2fs import assert_fsck_clean

import xipfs
from xipfs.extfs import data as ext2_data
from xipfs.xip import transfer as xfer

BIG = 5 << 20
# (file offset, bytes) written into /sparse; everything else in it is a hole.
SPARSE_PIECES = [(0, 100), (50_000, 3000), (200_000, 10)]
SPARSE_SIZE = 300_000


def _content() -> dict[str, bytes]:
    rnd = os.urandom
    sparse = bytearray(SPARSE_SIZE)
    for off, n in SPARSE_PIECES:
        sparse[off:off + n] = rnd(n)
    return {"/one": rnd(1), "/b4096": rnd(4096), "/b4097": rnd(4097), "/big": rnd(BIG),
            "/sparse": bytes(sparse), "/empty": b""}


CONTENT = _content()


@pytest.fixture(scope="module")
def shm_dir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="xipfs-transfer-", dir="/dev/shm")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", params=[1024, 4096], ids=["bs1k", "bs4k"])
def image(request: Any, shm_dir: str) -> Iterator[str]:
    """An image holding CONTENT (1 KiB blocks: /big needs double-indirect blocks)."""
    img = os.path.join(shm_dir, f"img{request.param}.ext2")
    xipfs.mkfs(img, 24 << 20, block_size=request.param)
    with xipfs.open(img, "r+") as fs:
        for path, data in CONTENT.items():
            if path != "/sparse":
                fs.write_bytes(path, data)
        with fs.open("/sparse", "wb", buffering=0) as f:
            for off, n in SPARSE_PIECES:
                f.seek(off)
                f.write(CONTENT["/sparse"][off:off + n])
            f.truncate(SPARSE_SIZE)
        assert any(not pb for _, _, pb in fs.block_runs("/sparse")), "/sparse should have holes"
    yield img
    if shutil.which("e2fsck"):                  # whatever the tests wrote, the image is clean
        assert_fsck_clean(img, exit_only=True)


@pytest.fixture(params=[True, False], ids=["xip", "filedev"])
def fs(request: Any, image: str) -> Iterator[xipfs.Filesystem]:
    f = xipfs.open(image, xip=request.param)
    assert f.is_xip == request.param
    yield f
    f.close()


@pytest.fixture
def scratch(shm_dir: str) -> Iterator[str]:
    """A path for a fresh image, removed afterwards."""
    path = os.path.join(shm_dir, f"scratch-{os.getpid()}-{time.monotonic_ns()}.ext2")
    yield path
    if os.path.exists(path):
        os.unlink(path)


# -- helpers ------------------------------------------------------------------------------------
class Reader(threading.Thread):
    """Reads one end of a socket to EOF into ``data`` (slowly with ``delay``)."""

    def __init__(self, sock: socket.socket, chunk: int = 1 << 20, delay: float = 0.0) -> None:
        super().__init__(daemon=True)
        self.sock, self.chunk, self.delay = sock, chunk, delay
        self.data = bytearray()
        self.start()

    def run(self) -> None:
        while True:
            piece = self.sock.recv(self.chunk)
            if not piece:
                break
            self.data += piece
            if self.delay:
                time.sleep(self.delay)

    def result(self) -> bytes:
        self.join(10)
        assert not self.is_alive(), "reader did not finish"
        return bytes(self.data)


def send(send_fn: Callable[[socket.socket], int], pair: tuple[socket.socket, socket.socket] | None = None,
         **reader: Any) -> tuple[int, bytes]:
    """Run ``send_fn(sock)`` with a reader on the other end; (its result, the bytes received)."""
    a, b = pair or socket.socketpair()
    r = Reader(b, **reader)
    try:
        n = send_fn(a)
    finally:
        a.close()
    got = r.result()
    b.close()
    return n, got


def expected(path: str, offset: int, count: int | None) -> bytes:
    data = CONTENT[path]
    return data[offset:] if count is None else data[offset:offset + count]


class Dribble:
    """A socket whose ``send`` sends at most ``limit`` bytes: forces partial sends on the copy path."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self._sock, self.limit, self.calls = sock, limit, 0
        self.type = sock.type

    def fileno(self) -> int:
        return self._sock.fileno()

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def send(self, data: Any) -> int:
        self.calls += 1
        return self._sock.send(memoryview(data)[:self.limit])


# -- sendfile: content ------------------------------------------------------------------------
CASES = [
    ("/one", 0, None), ("/b4096", 0, None), ("/b4097", 0, None), ("/sparse", 0, None),
    ("/big", 0, None), ("/big", 12_345, 1_000_000), ("/big", 3 << 20, None),
    ("/sparse", 40_000, 20_000), ("/sparse", 199_990, 50_000), ("/b4097", 4000, 10**9),
    ("/b4097", 4096, None), ("/b4097", 5000, None), ("/b4097", 4097, 5), ("/big", 100, 0),
    ("/empty", 0, None),
]


@pytest.mark.parametrize(("path", "offset", "count"), CASES)
def test_sendfile_content(fs: xipfs.Filesystem, path: str, offset: int, count: int | None) -> None:
    n, got = send(lambda s: fs.sendfile(s, path, offset, count))
    want = expected(path, offset, count)
    assert n == len(want)
    assert got == want


def test_sendfile_moves_the_file_position(fs: xipfs.Filesystem) -> None:
    with fs.open("/b4097", "rb", buffering=0) as f:
        n, got = send(lambda s: f.sendfile(s, 10, 100))
        assert (n, got, f.tell()) == (100, CONTENT["/b4097"][10:110], 110)
        assert f.read(5) == CONTENT["/b4097"][110:115]


def test_sendfile_tcp(fs: xipfs.Filesystem) -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
    n, got = send(lambda s: fs.sendfile(s, "/big", 7, None), (conn, client))
    assert n == BIG - 7 and got == CONTENT["/big"][7:]


# -- sendfile: partial sends, timeouts, non-blocking sockets ----------------------------------
def test_partial_sendfile_calls_resume(monkeypatch: pytest.MonkeyPatch, image: str) -> None:
    """os.sendfile sending at most 777 bytes a call: every byte still arrives once, in order."""
    real = os.sendfile
    calls = []

    def short(out: int, in_fd: int, offset: int, count: int) -> int:
        calls.append(count)
        return real(out, in_fd, offset, min(count, 777))

    monkeypatch.setattr(os, "sendfile", short)
    with xipfs.open(image) as fs:
        n, got = send(lambda s: fs.sendfile(s, "/sparse", 0, None))
    assert got == CONTENT["/sparse"] and n == SPARSE_SIZE
    assert len(calls) > sum(k for _, k in SPARSE_PIECES) // 777


def test_partial_socket_sends_resume(fs: xipfs.Filesystem) -> None:
    """``sock.send`` taking at most 333 bytes (copy path, holes): every byte arrives once."""
    a, b = socket.socketpair()
    d = Dribble(a, 333)
    n, got = send(lambda _: fs.sendfile(d, "/sparse", 1, 20_000), (a, b))
    assert got == CONTENT["/sparse"][1:20_001] and n == 20_000
    assert d.calls >= 15_000 // 333          # all but the first block are holes or copies


def small_buffers(a: socket.socket, b: socket.socket) -> tuple[socket.socket, socket.socket]:
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return a, b


def test_slow_reader_with_timeout(fs: xipfs.Filesystem) -> None:
    """A socket with a timeout is non-blocking underneath: real partial sends, waited for."""
    a, b = small_buffers(*socket.socketpair())
    a.settimeout(5)
    n, got = send(lambda s: fs.sendfile(s, "/sparse", 0, 120_000), (a, b), chunk=4000, delay=0.001)
    assert n == 120_000 and got == CONTENT["/sparse"][:120_000]


def test_fd_made_nonblocking_behind_the_socket(fs: xipfs.Filesystem) -> None:
    """Timeout None but O_NONBLOCK on the descriptor: EAGAIN is waited out, not raised."""
    a, b = small_buffers(*socket.socketpair())
    os.set_blocking(a.fileno(), False)
    assert a.gettimeout() is None
    n, got = send(lambda s: fs.sendfile(s, "/sparse", 0, 60_000), (a, b), chunk=4000, delay=0.001)
    assert n == 60_000 and got == CONTENT["/sparse"][:60_000]


def test_timeout_when_nobody_reads(fs: xipfs.Filesystem) -> None:
    a, b = small_buffers(*socket.socketpair())
    a.settimeout(0.2)
    with a, b, pytest.raises(TimeoutError):
        fs.sendfile(a, "/big")


def test_nonblocking_socket_is_refused(fs: xipfs.Filesystem) -> None:
    """As socket.sendfile: ValueError for a socket with timeout 0, before anything is sent."""
    a, b = socket.socketpair()
    a.setblocking(False)
    with a, b:
        with pytest.raises(ValueError, match="non-blocking"):
            fs.sendfile(a, "/b4097")
        b.setblocking(False)
        with pytest.raises(BlockingIOError):
            b.recv(1)


def test_bad_arguments(fs: xipfs.Filesystem) -> None:
    a, b = socket.socketpair()
    with a, b:
        with pytest.raises(ValueError):
            fs.sendfile(a, "/b4097", -1)
        with pytest.raises(ValueError):
            fs.sendfile(a, "/b4097", 0, -1)
        with pytest.raises(TypeError):
            fs.sendfile(a, "/b4097", 0.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="socket"):
        fs.sendfile(object(), "/b4097")
    with pytest.raises(OSError) as err:
        fs.sendfile(a, "/b4097")              # closed
    assert err.value.errno == errno.EBADF
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(ValueError):
        fs.sendfile(udp, "/b4097")
    with pytest.raises(FileNotFoundError):
        fs.sendfile(a, "/missing")


def test_broken_pipe(fs: xipfs.Filesystem) -> None:
    a, b = socket.socketpair()
    b.close()
    with a, pytest.raises(BrokenPipeError):
        fs.sendfile(a, "/big")


# -- sendfile: where the bytes come from -------------------------------------------------------
def test_xip_sends_without_a_python_copy(monkeypatch: pytest.MonkeyPatch, image: str) -> None:
    """On the memory device no byte of file data passes through Python: every copy path fails,
    and the socket's ``send`` is used for holes only (data goes with ``os.sendfile``)."""
    with xipfs.open(image) as fs:
        assert fs.is_xip

        def boom(*_: Any) -> None:
            raise AssertionError("file data copied through Python")

        for obj, name in ((ext2_data, "read_into"), (ext2_data, "read_bytes"),
                          (xfer, "read_into"), (xipfs.xip.file, "read_into"),
                          (xipfs.xip.file, "read_bytes"), (fs.device, "read_into")):
            monkeypatch.setattr(obj, name, boom)
        a, b = socket.socketpair()
        d = Dribble(a, 1 << 30)
        d.send = boom  # type: ignore[method-assign]
        n, got = send(lambda _: fs.sendfile(d, "/big", 0, None), (a, b))
        assert n == BIG and got == CONTENT["/big"]
        n, got = send(lambda s: fs.sendfile(s, "/sparse", 0, None))
        assert got == CONTENT["/sparse"]


def test_xip_falls_back_to_views_when_sendfile_is_refused(monkeypatch: pytest.MonkeyPatch,
                                                          image: str) -> None:
    """EINVAL from os.sendfile (a DAX device, hugetlbfs): the run goes out as a view of the mapping."""
    def refuse(*_: Any) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", refuse)
    with xipfs.open(image) as fs:
        n, got = send(lambda s: fs.sendfile(s, "/big", 5, None))
    assert n == BIG - 5 and got == CONTENT["/big"][5:]


def test_xip_on_anonymous_memory(scratch: str) -> None:
    """A memory device without a descriptor sends views of the mapping."""
    dev = xipfs.device.MemoryDevice.anonymous(8 << 20)
    xipfs.mkfs(dev, block_size=1024)
    with xipfs.open(dev, "r+") as fs:
        fs.write_bytes("/f", CONTENT["/b4097"])
        n, got = send(lambda s: fs.sendfile(s, "/f", 1, None))
    dev.close()
    assert n == 4096 and got == CONTENT["/b4097"][1:]


def test_file_device_sends_unwritten_pages(scratch: str) -> None:
    """Written through the page cache and not synced: the image file is stale, the socket is not."""
    xipfs.mkfs(scratch, 16 << 20, block_size=4096)
    with xipfs.open(scratch, "r+") as fs:
        fs.write_bytes("/f", bytes(300_000))
    new = os.urandom(300_000)
    fs = xipfs.open(scratch, "r+", xip=False)
    try:
        with fs.open("/f", "r+b", buffering=0) as f:
            f.write(new)
        with fs.open("/g", "wb") as f:
            f.write(new[::-1])
        assert fs.read_bytes("/f") == new
        n, got = send(lambda s: fs.sendfile(s, "/f"))
        assert n == len(new) and got == new
        n, got = send(lambda s: fs.sendfile(s, "/g", 10, 1000))
        assert got == new[::-1][10:1010]
    finally:
        fs.close()


def test_xip_sees_writes_at_once(scratch: str) -> None:
    xipfs.mkfs(scratch, 16 << 20, block_size=4096)
    with xipfs.open(scratch, "r+") as fs:
        assert fs.is_xip
        data = os.urandom(70_000)
        with fs.open("/f", "wb") as f:
            f.write(data)
        n, got = send(lambda s: fs.sendfile(s, "/f"))
        assert got == data


# -- asyncio ------------------------------------------------------------------------------------
@pytest.fixture(params=[True, False], ids=["xip", "filedev"])
def rwfs(request: Any, scratch: str) -> Iterator[xipfs.Filesystem]:
    xipfs.mkfs(scratch, 16 << 20, block_size=1024)
    f = xipfs.open(scratch, "r+", xip=request.param)
    yield f
    f.close()


def test_async_file_operations(rwfs: xipfs.Filesystem) -> None:
    data = os.urandom(100_000)

    async def main() -> None:
        async with rwfs.open_async("/a", "w+b") as f:
            assert await f.write(data) == len(data)
            assert await f.tell() == len(data)
            assert await f.seek(10) == 10
            assert await f.read(5) == data[10:15]
            assert await f.pread(7, 50_000) == data[50_000:50_007]
            assert await f.tell() == 15
            assert await f.pwrite(b"XYZ", 2) == 3
            buf = bytearray(6)
            assert await f.seek(0) == 0
            assert await f.readinto(buf) == 6 and bytes(buf) == data[:2] + b"XYZ" + data[5:6]
            assert await f.seek(-4, os.SEEK_END) == len(data) - 4
            assert await f.read() == data[-4:]
            assert await f.read() == b""
            assert await f.truncate(1000) == 1000
            await f.flush()
            await f.fsync()
        assert f.closed
        f = await rwfs.open_async("/a")
        assert await f.readall() == data[:2] + b"XYZ" + data[5:1000]
        await f.close()
        with pytest.raises(ValueError):
            await f.read()

    asyncio.run(main())
    assert rwfs.read_bytes("/a") == data[:2] + b"XYZ" + data[5:1000]


def test_async_lines_and_errors(rwfs: xipfs.Filesystem) -> None:
    text = b"one\ntwo\n" + b"x" * 20_000 + b"\nlast"

    async def main() -> None:
        async with rwfs.open_async("/t", "wb") as f:
            await f.write(text)
            with pytest.raises(io.UnsupportedOperation):
                await f.read()
            with pytest.raises(io.UnsupportedOperation):
                await f.readline()
        async with rwfs.open_async("/t", "rb") as f:
            assert [line async for line in f] == text.splitlines(keepends=True)
            await f.seek(0)
            assert await f.readline(2) == b"on"
            assert await f.readline() == b"e\n"
            assert await f.tell() == 4
            with pytest.raises(io.UnsupportedOperation):
                await f.write(b"no")
        with pytest.raises(FileNotFoundError):
            await rwfs.open_async("/missing")
        with pytest.raises(IsADirectoryError):
            async with rwfs.open_async("/", "rb"):
                pass

    asyncio.run(main())
    with pytest.raises(ValueError, match="binary"):
        rwfs.open_async("/t", "r")


def test_async_on_memory_uses_no_thread(monkeypatch: pytest.MonkeyPatch, scratch: str) -> None:
    xipfs.mkfs(scratch, 16 << 20, block_size=4096)

    def no_thread(*_: Any, **__: Any) -> None:
        raise AssertionError("a thread was used on the memory device")

    monkeypatch.setattr(asyncio, "to_thread", no_thread)
    monkeypatch.setattr(asyncio.BaseEventLoop, "run_in_executor", no_thread)
    seen: set[int] = set()

    async def main(fs: xipfs.Filesystem) -> None:
        async with fs.open_async("/a", "w+b") as f:
            await f.write(b"abc" * 1000)
            seen.add(threading.get_ident())
            assert await f.pread(3, 3) == b"abc"
            await f.seek(0)
            assert len(await f.read()) == 3000

    with xipfs.open(scratch, "r+") as fs, pytest.MonkeyPatch.context() as mp:
        assert fs.is_xip
        orig = xipfs.xip.file.read_into              # the copy every file read makes

        def spy(*args: Any) -> int:
            seen.add(threading.get_ident())
            return orig(*args)

        mp.setattr(xipfs.xip.file, "read_into", spy)
        asyncio.run(main(fs))
    assert seen == {threading.get_ident()}


def test_async_on_file_device_keeps_the_loop_running(scratch: str) -> None:
    xipfs.mkfs(scratch, 16 << 20, block_size=4096)
    with xipfs.open(scratch, "r+", xip=False) as fs, pytest.MonkeyPatch.context() as mp:
        fs.write_bytes("/a", b"q" * 10_000)
        orig = xipfs.xip.file.read_into              # the copy every file read makes
        threads: set[int] = set()

        def slow(*args: Any) -> int:                 # a device that takes its time
            threads.add(threading.get_ident())
            time.sleep(0.3)
            return orig(*args)

        mp.setattr(xipfs.xip.file, "read_into", slow)

        async def main() -> int:
            ticks = 0
            done = False

            async def ticker() -> None:
                nonlocal ticks
                while not done:
                    ticks += 1
                    await asyncio.sleep(0.01)

            t = asyncio.create_task(ticker())
            async with fs.open_async("/a") as f:
                buf = bytearray(10_000)
                assert await f.readinto(buf) == 10_000 and buf == b"q" * 10_000
            done = True
            await t
            return ticks

        ticks = asyncio.run(main())
    assert ticks >= 10, ticks
    assert threads and threading.get_ident() not in threads
