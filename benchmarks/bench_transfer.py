"""Transfer benchmarks: sendfile of a big file to another process, and asyncio reads.

sendfile: the big file (``cfg.big_bytes``) sits in an image on /dev/shm (ours) and as a plain
file on the same tmpfs (the kernel baseline). Both are sent down the same Unix stream socket to
a reader in **another process** that receives with ``recv_into`` into one reused buffer and
discards the bytes; a sample ends when the reader acknowledges the last byte, so the figure is
end to end, not "queued in the socket buffer".

aio: ``await f.read`` / ``await f.readinto`` of the big file in 1 MiB pieces against the
synchronous ``readinto`` loop, on the memory device (inline) and the file device (threads).

Standalone: ``.venv/bin/python benchmarks/bench_transfer.py [--quick] [--only sendfile,aio]``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench_read import Config
from common import GIB, MIB, Case, Row, Section, measure

import xipfs

PATTERN = 16 * MIB
CHUNK = MIB
_HEADER = struct.Struct("<Q")

# The reader process: for each round, an 8-byte length then that many bytes, acknowledged by b"k".
READER = r"""
import socket, struct, sys
sock = socket.socket(fileno=int(sys.argv[1]))
buf = memoryview(bytearray(1 << 20))
def exactly(n):
    out = bytearray()
    while len(out) < n:
        piece = sock.recv(n - len(out))
        if not piece:
            return None
        out += piece
    return bytes(out)
while True:
    head = exactly(8)
    if head is None:
        break
    left = struct.unpack("<Q", head)[0]
    while left:
        got = sock.recv_into(buf, min(left, len(buf)))
        if not got:
            sys.exit("reader: stream ended early")
        left -= got
    sock.sendall(b"k")
"""


class Discard:
    """A reader process on the far end of a socketpair; :meth:`round` frames one transfer."""

    def __init__(self) -> None:
        self.sock, far = socket.socketpair()
        self.proc = subprocess.Popen([sys.executable, "-c", READER, str(far.fileno())],
                                     pass_fds=(far.fileno(),))
        far.close()

    def round(self, nbytes: int, send: Callable[[socket.socket], int]) -> None:
        """Announce ``nbytes``, run ``send(sock)``, wait for the reader to have them all."""
        self.sock.sendall(_HEADER.pack(nbytes))
        sent = send(self.sock)
        if sent != nbytes:
            raise AssertionError(f"sent {sent} bytes, expected {nbytes}")
        if self.sock.recv(1) != b"k":
            raise AssertionError("reader process failed")

    def close(self) -> None:
        self.sock.close()
        self.proc.wait(30)


def _make_big(root: str, size: int) -> tuple[str, str, bytes]:
    """The big file as a plain tmpfs file and inside an image (``/big``); (file, image, pattern)."""
    pattern = os.urandom(PATTERN)
    plain = os.path.join(root, "transfer-big.bin")
    img = os.path.join(root, "transfer.ext2")
    with open(plain, "wb") as f:
        for _ in range(size // PATTERN):
            f.write(pattern)
    xipfs.mkfs(img, size + size // 16 + (64 << 20))
    with xipfs.open(img, "r+") as fs, fs.open("/big", "wb", buffering=0) as f:
        for _ in range(size // PATTERN):
            f.write(pattern)
    return plain, img, pattern


def _check_sendfile(fs: Any, pattern: bytes, size: int) -> None:
    """Untimed: the first and the last MiB through sendfile equal the source."""
    for offset in (0, size - MIB):
        a, b = socket.socketpair()
        got = bytearray()

        def read(sock: socket.socket = b, into: bytearray = got) -> None:
            while piece := sock.recv(MIB):
                into += piece

        t = threading.Thread(target=read)
        t.start()
        fs.sendfile(a, "/big", offset, MIB)
        a.close()
        t.join()
        b.close()
        p = offset % PATTERN
        if bytes(got) != pattern[p:p + MIB]:
            raise AssertionError(f"sendfile ({fs!r}): wrong data at {offset}")


def _cpu_note(cases: list[Case], size: int) -> str:
    """CPU time of the sending process per GiB for one more round of each case (the reader's
    copy bounds the rates above; the sender's CPU is where zero-copy shows)."""
    parts = []
    for case in cases:
        t0 = time.process_time()
        case.fn(None)
        parts.append(f"{case.name}: {(time.process_time() - t0) * GIB / size:.2f} s")
    return "sender CPU per GiB: " + "; ".join(parts)


def bench_sendfile(root: str, cfg: Config) -> Section:
    size = cfg.big_bytes
    plain, img, pattern = _make_big(root, size)
    section = Section(f"7. sendfile of a {size >> 20} MiB file to a reader in another process "
                      "(Unix stream socket)")
    fsx = xipfs.open(img)
    fsf = xipfs.open(img, xip=False)
    sink = Discard()
    buf = memoryview(bytearray(CHUNK))
    try:
        if not fsx.is_xip:
            section.notes.append(f"WARNING: {img} did not open as XIP ({fsx!r}).")
        _check_sendfile(fsx, pattern, size)
        _check_sendfile(fsf, pattern, size)

        def ours(fs: Any) -> Callable[[Any], None]:
            return lambda _: sink.round(size, lambda s: fs.sendfile(s, "/big"))

        def kernel(_: Any) -> None:
            def send(s: socket.socket) -> int:
                with open(plain, "rb") as f:
                    return s.sendfile(f)
            sink.round(size, send)

        def copy_loop(_: Any) -> None:
            def send(s: socket.socket) -> int:
                with fsx.open("/big", "rb", buffering=0) as f:
                    total = 0
                    while n := f.readinto(buf):
                        s.sendall(buf[:n])
                        total += n
                    return total
            sink.round(size, send)

        cases = [
            Case("xip fs.sendfile", ours(fsx), size, "GiB/s"),
            Case("socket.sendfile from tmpfs", kernel, size, "GiB/s"),
            Case("file-device fs.sendfile", ours(fsf), size, "GiB/s"),
            Case("xip readinto 1 MiB + sendall", copy_loop, size, "GiB/s"),
        ]
        m = measure(cases, cfg.repeat_big, warmup=1)
        section.notes.append(_cpu_note(cases, size))
    finally:
        sink.close()
        fsx.close()
        fsf.close()
        os.unlink(img)
        os.unlink(plain)
    base = m["socket.sendfile from tmpfs"]
    section.rows += [
        Row("fs.sendfile (XIP: os.sendfile from the image)", m["xip fs.sendfile"], base, 1.0),
        Row("[file device] fs.sendfile (page cache, 1 MiB copies)", m["file-device fs.sendfile"], base),
        Row("XIP readinto 1 MiB + sendall (a copy through Python)", m["xip readinto 1 MiB + sendall"], base),
    ]
    section.raw += list(m.values())
    return section


def bench_aio(root: str, cfg: Config) -> Section:
    size = cfg.big_bytes
    plain, img, _ = _make_big(root, size)
    os.unlink(plain)
    section = Section(f"8. asyncio reads of a {size >> 20} MiB file in {CHUNK >> 20} MiB pieces")
    fsx = xipfs.open(img)
    fsf = xipfs.open(img, xip=False)
    loop = asyncio.new_event_loop()
    buf = bytearray(CHUNK)

    def sync_readinto(fs: Any) -> Callable[[Any], None]:
        def run(_: Any) -> None:
            total = 0
            with fs.open("/big", "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
            if total != size:
                raise AssertionError("short read")
        return run

    def aio(fs: Any, into: bool) -> Callable[[Any], None]:
        async def main() -> int:
            total = 0
            async with fs.open_async("/big") as f:
                if into:
                    while n := await f.readinto(buf):
                        total += n
                else:
                    while data := await f.read(CHUNK):
                        total += len(data)
            return total

        def run(_: Any) -> None:
            if loop.run_until_complete(main()) != size:
                raise AssertionError("short read")
        return run

    try:
        cases = [
            Case("xip await f.read", aio(fsx, False), size, "GiB/s"),
            Case("xip await f.readinto", aio(fsx, True), size, "GiB/s"),
            Case("xip sync readinto", sync_readinto(fsx), size, "GiB/s"),
            Case("file-device await f.readinto", aio(fsf, True), size, "GiB/s"),
            Case("file-device sync readinto", sync_readinto(fsf), size, "GiB/s"),
        ]
        m = measure(cases, cfg.repeat_big, warmup=1)
    finally:
        loop.close()
        fsx.close()
        fsf.close()
        os.unlink(img)
    sync = m["xip sync readinto"]
    section.rows += [
        Row("await f.read(1 MiB) (XIP, inline)", m["xip await f.read"], sync),
        Row("await f.readinto(1 MiB buffer) (XIP, inline)", m["xip await f.readinto"], sync),
        Row("[file device] await f.readinto (a thread per call)", m["file-device await f.readinto"],
            m["file-device sync readinto"]),
    ]
    section.raw += list(m.values())
    return section


BENCHMARKS = {"sendfile": bench_sendfile, "aio": bench_aio}


if __name__ == "__main__":          # the same as: benchmarks/run.py --only {these} [options]
    import run
    sys.exit(run.main(["--only", ",".join(BENCHMARKS), *sys.argv[1:]]))
