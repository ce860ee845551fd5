"""Android sparse images: SparseDevice reads the raw image through the chunk table, unsparse()
writes it out. Oracles: ``img2simg`` makes the sparse images, ``simg2img`` expands them (Debian
android-sdk-libsparse-utils); images built by hand here (DONT_CARE and CRC32 chunks, which
img2simg does not write) are checked against simg2img too, so the builder is not its own judge.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import zlib

import pytest
from corrupt_util import time_limit
from e2fs import SHM, mkfs, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xipfs
from xipfs import CorruptImageError
from xipfs.device import MemoryDevice
from xipfs.device.parttable import partitions
from xipfs.device.sparse import SparseDevice, is_sparse, unsparse
from xipfs.device.window import WindowDevice

HAVE_TOOLS = shutil.which("img2simg") is not None and shutil.which("simg2img") is not None
NO_TOOLS = "img2simg/simg2img not installed (Debian: android-sdk-libsparse-utils)"
needs_tools = pytest.mark.skipif(not HAVE_TOOLS, reason=NO_TOOLS)
MiB = 1 << 20
PATTERN = b"\xde\xad\xbe\xef"


# -- building sparse images by hand --------------------------------------------------------------
def build_sparse(chunks: list[tuple], blk: int = 4096, *, file_hdr: int = 28, chunk_hdr: int = 12,
                 checksum: int | bool = 0, total_blks: int | None = None) -> tuple[bytes, bytes]:
    """``(sparse image, the raw image it stands for)`` from chunks ``("raw", data)``,
    ``("fill", value, blocks)``, ``("skip", blocks)`` and ``("crc", value or None for right)``.
    ``checksum=True`` puts the right image checksum in the header."""
    body = bytearray()
    raw = bytearray()
    count = 0
    pad = bytes(chunk_hdr - 12)
    for c in chunks:
        count += 1
        if c[0] == "raw":
            data = c[1]
            assert len(data) % blk == 0
            body += struct.pack("<HHII", 0xCAC1, 0, len(data) // blk, chunk_hdr + len(data)) + pad + data
            raw += data
        elif c[0] == "fill":
            body += struct.pack("<HHII", 0xCAC2, 0, c[2], chunk_hdr + 4) + pad + struct.pack("<I", c[1])
            raw += struct.pack("<I", c[1]) * (c[2] * blk // 4)
        elif c[0] == "skip":
            body += struct.pack("<HHII", 0xCAC3, 0, c[1], chunk_hdr) + pad
            raw += bytes(c[1] * blk)
        else:
            value = zlib.crc32(raw) if c[1] is None else c[1]
            body += struct.pack("<HHII", 0xCAC4, 0, 0, chunk_hdr + 4) + pad + struct.pack("<I", value)
    blocks = len(raw) // blk if total_blks is None else total_blks
    image_crc = zlib.crc32(raw) if checksum is True else int(checksum)
    header = struct.pack("<IHHHHIIII", 0xED26FF3A, 1, 0, file_hdr, chunk_hdr, blk, blocks, count, image_crc)
    return header + bytes(file_hdr - 28) + bytes(body), bytes(raw)


def mixed_chunks(rnd: random.Random, blk: int = 4096) -> list[tuple]:
    return [("raw", rnd.randbytes(3 * blk)), ("fill", 0x01020304, 2), ("skip", 5), ("crc", None),
            ("raw", rnd.randbytes(blk)), ("fill", 0, 3), ("raw", rnd.randbytes(2 * blk)),
            ("skip", 1), ("fill", 0xEFBEADDE, 4), ("crc", None)]


def device_of(data: bytes) -> MemoryDevice:
    dev = MemoryDevice.anonymous(len(data))
    dev.write(data, 0)
    return dev


@pytest.fixture(scope="module")
def workdir():
    path = os.path.join(SHM, f"xipfs-test-sparse-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


# -- an ext2 image through img2simg ----------------------------------------------------------------
@pytest.fixture(scope="module")
def tree(workdir):
    src = os.path.join(workdir, "tree")
    rnd = random.Random(7)
    files = {
        "hello.txt": b"hello, sparse world\n",
        "random.bin": rnd.randbytes(700_000),
        "pattern.bin": PATTERN * (300_000 // 4),           # whole blocks of it: FILL chunks
        "sub/small.txt": b"x" * 5000,
    }
    for name, data in files.items():
        os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    with open(os.path.join(src, "holes.bin"), "wb") as f:   # a file with a hole in the middle
        f.write(b"start")
        f.seek(3 * MiB)
        f.write(b"end")
    with open(os.path.join(src, "holes.bin"), "rb") as f:
        files["holes.bin"] = f.read()
    return src, files


@pytest.fixture(scope="module", params=[4096, 1024])
def sparse_image(request, workdir, tree):
    if not HAVE_TOOLS:
        pytest.skip(NO_TOOLS)
    bs = request.param
    src, _ = tree
    raw = mkfs(os.path.join(workdir, f"raw-{bs}.img"), "24M", bs=bs, src=src)
    sparse = os.path.join(workdir, f"sparse-{bs}.simg")
    run(["img2simg", raw, sparse, str(bs)])
    with open(raw, "rb") as f:
        data = f.read()
    return raw, sparse, data


@needs_tools
@pytest.mark.parametrize("xip", [None, False])
def test_reads_equal_the_raw_image(sparse_image, xip):
    _, sparse, data = sparse_image
    dev = SparseDevice(sparse, xip=xip)
    try:
        assert dev.size == len(data) and dev.readonly and dev.fileno() == -1
        kinds = {c.type for c in dev.chunks}
        assert {"raw", "fill"} <= kinds
        assert any(c.type == "fill" and c.source == struct.unpack("<I", PATTERN)[0] for c in dev.chunks)
        assert bytes(dev.view(0, dev.size)) == data
        buf = bytearray(dev.size)
        dev.read_into(memoryview(buf), 0)
        assert buf == data
        rnd = random.Random(3)
        edges = [c.start for c in dev.chunks]
        for _ in range(1500):
            if rnd.random() < 0.5:
                off = max(0, rnd.choice(edges) + rnd.randrange(-9000, 9000))
            else:
                off = rnd.randrange(dev.size)
            n = rnd.randrange(min(200_000, dev.size - min(off, dev.size)) + 1)
            off = min(off, dev.size - n)
            assert bytes(dev.view(off, n)) == data[off:off + n], (off, n)
        with pytest.raises(CorruptImageError, match="access outside the device"):
            dev.view(dev.size - 1, 2)
    finally:
        dev.close()


@needs_tools
def test_views_of_raw_chunks_are_the_mapping(sparse_image):
    _, sparse, data = sparse_image
    dev = SparseDevice(sparse)
    try:
        assert isinstance(dev.source, MemoryDevice)               # /dev/shm: mapped
        raw = max((c for c in dev.chunks if c.type == "raw"), key=lambda c: c.length)
        v = dev.view(raw.start + 10, raw.length - 20)
        assert v.obj is dev.source.buffer.obj                    # a slice of the mapping: no copy
        assert bytes(v) == data[raw.start + 10:raw.start + raw.length - 10]
        assert v.readonly
        across = dev.view(raw.start + raw.length - 8, 16)        # two chunks: a buffer made for it
        assert across.obj is not dev.source.buffer.obj and bytes(across) == data[
            raw.start + raw.length - 8:raw.start + raw.length + 8]
        del v, across
    finally:
        dev.close()


@needs_tools
def test_xipfs_reads_a_sparse_image(sparse_image, tree):
    _, sparse, _ = sparse_image
    _, files = tree
    dev = SparseDevice(sparse)
    try:
        with xipfs.open(dev) as fs:
            assert sorted(fs.listdir("/")) == ["hello.txt", "holes.bin", "lost+found", "pattern.bin",
                                               "random.bin", "sub"]
            for name, data in files.items():
                assert fs.read_bytes("/" + name) == data
            with pytest.raises(OSError) as info:
                fs.write_bytes("/nope", b"x")
            assert info.value.errno in (errno.EROFS, errno.EBADF)
        assert xipfs.check(dev) == []
    finally:
        dev.close()


@needs_tools
def test_unsparse_equals_simg2img(sparse_image, workdir):
    raw, sparse, data = sparse_image
    theirs = os.path.join(workdir, "simg2img.out")
    mine = os.path.join(workdir, "unsparse.out")
    run(["simg2img", sparse, theirs])
    assert unsparse(sparse, mine) == len(data)
    with open(theirs, "rb") as f1, open(mine, "rb") as f2:
        assert f1.read() == f2.read() == data
    st = os.stat(mine)
    assert st.st_size == len(data) and st.st_blocks * 512 < len(data) // 2     # the zeros are holes
    os.unlink(theirs)
    os.unlink(mine)


@needs_tools
def test_sparse_disk_with_partitions(workdir, tree):
    """A whole-disk image, sparse: its partition table and the ext2 filesystem of a partition."""
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk not installed (Debian: fdisk)")
    src, files = tree
    disk = os.path.join(workdir, "disk.img")
    with open(disk, "wb") as f:
        f.truncate(40 * MiB)
    run(["sfdisk", "-q", disk], input=f"label: gpt\n{disk}2 : size=30M, type=L, name=rootfs\n".encode())
    part = partitions(disk).number(2)
    img = mkfs(os.path.join(workdir, "p2.img"), f"{part.size // 1024}k", bs=4096, src=src)
    with open(img, "rb") as f, open(disk, "r+b") as out:
        out.seek(part.start)
        out.write(f.read())
    sparse = os.path.join(workdir, "disk.simg")
    run(["img2simg", disk, sparse])
    dev = SparseDevice(sparse)
    try:
        table = partitions(dev)
        assert list(table) == list(partitions(disk)) == list(partitions(sparse))
        assert table.number(2).name == "rootfs"
        window = WindowDevice(dev, part.start, part.size)
        with xipfs.open(window) as fs:
            assert fs.read_bytes("/random.bin") == files["random.bin"]
        window.close()
    finally:
        dev.close()


# -- chunks img2simg does not write ------------------------------------------------------------------
@pytest.mark.parametrize("headers", [(28, 12), (32, 16)])
def test_hand_built_chunks(workdir, headers):
    file_hdr, chunk_hdr = headers
    rnd = random.Random(11)
    sparse_bytes, raw = build_sparse(mixed_chunks(rnd), file_hdr=file_hdr, chunk_hdr=chunk_hdr, checksum=True)
    path = os.path.join(workdir, f"hand-{file_hdr}.simg")
    with open(path, "wb") as f:
        f.write(sparse_bytes)
    assert is_sparse(path) and is_sparse(sparse_bytes) and not is_sparse(raw) and not is_sparse(b"")
    for xip in (None, False):
        dev = SparseDevice(path, xip=xip)
        try:
            assert [c.type for c in dev.chunks] == ["raw", "fill", "don't care", "raw", "fill", "raw",
                                                    "don't care", "fill"]
            assert bytes(dev.view(0, dev.size)) == raw
            for off in range(0, len(raw) - 7, 509):
                assert bytes(dev.view(off, 7)) == raw[off:off + 7]
            dev.verify()
            with pytest.raises(OSError) as info:
                dev.write(b"x", 0)
            assert info.value.errno == errno.EROFS
        finally:
            dev.close()
    mine = os.path.join(workdir, "hand.out")
    assert unsparse(path, mine) == len(raw)
    with open(mine, "rb") as f:
        assert f.read() == raw
    if HAVE_TOOLS:                                    # libsparse reads the hand-built image alike
        theirs = os.path.join(workdir, "hand.simg2img")
        run(["simg2img", path, theirs])
        with open(theirs, "rb") as f:
            assert f.read() == raw
        os.unlink(theirs)
    os.unlink(mine)


@pytest.mark.parametrize("which", ["chunk", "header"])
def test_crc_mismatch(workdir, which):
    rnd = random.Random(5)
    chunks = mixed_chunks(rnd)
    if which == "chunk":
        chunks[3] = ("crc", 0x12345678)
        sparse_bytes, _ = build_sparse(chunks)
        match = "CRC32 chunk 3 after 40960 bytes: stored 0x12345678"
    else:
        sparse_bytes, _ = build_sparse(chunks, checksum=0x9ABCDEF0)
        match = "the header's image checksum .* stored 0x9abcdef0"
    path = os.path.join(workdir, f"badcrc-{which}.simg")
    with open(path, "wb") as f:
        f.write(sparse_bytes)
    dev = SparseDevice(path)
    try:
        bytes(dev.view(0, dev.size))              # reads do not check: they are random access
        with pytest.raises(CorruptImageError, match=match):
            dev.verify()
    finally:
        dev.close()
    out = os.path.join(workdir, "badcrc.out")
    with pytest.raises(CorruptImageError, match=match):
        unsparse(path, out)
    assert not os.path.exists(out)


def test_sparse_device_over_a_device():
    sparse_bytes, raw = build_sparse([("skip", 2), ("raw", b"abcd" * 1024), ("fill", 7, 1)])
    source = device_of(sparse_bytes)
    dev = SparseDevice(source)
    assert bytes(dev.view(0, dev.size)) == raw
    dev.close()
    assert source.fileno() == -1 and bytes(source.view(0, 4)) == sparse_bytes[:4]   # not closed
    source.close()


# -- corruption ------------------------------------------------------------------------------------
def _edit(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


BASE, _ = build_sparse([("raw", bytes(range(256)) * 32), ("fill", 5, 2), ("skip", 3), ("crc", None)],
                       blk=2048)
C1 = 28 + 12 + 8192                      # the second chunk header
CORRUPTIONS = [
    (lambda d: _edit(d, 0, "<I", 0xED26FF3B), "bad magic"),
    (lambda d: _edit(d, 4, "<H", 2), "major version 2"),
    (lambda d: _edit(d, 8, "<H", 20), "header sizes too small"),
    (lambda d: _edit(d, 10, "<H", 8), "header sizes too small"),
    (lambda d: _edit(d, 12, "<I", 2046), "block size is not a positive multiple of 4"),
    (lambda d: _edit(d, 12, "<I", 0), "block size is not a positive multiple of 4"),
    (lambda d: _edit(d, 16, "<I", 100), "chunks do not cover the image"),
    (lambda d: _edit(d, 16, "<I", 5), "more blocks than the header's total"),
    (lambda d: _edit(d, 20, "<I", 1 << 30), "more chunks than its file can hold"),
    (lambda d: _edit(d, 20, "<I", 5), "runs past the end of the file"),
    (lambda d: _edit(d, 28, "<H", 0xCAC9), "unknown sparse chunk type 0xcac9"),
    (lambda d: _edit(d, 28 + 4, "<I", 5), "chunk size does not match its type"),
    (lambda d: _edit(d, 28 + 8, "<I", 12 + 4096), "chunk size does not match its type"),
    (lambda d: _edit(d, C1 + 8, "<I", 20), "chunk size does not match its type"),
    (lambda d: _edit(d, len(d) - 16 + 4, "<I", 1), "CRC32 chunk claims output blocks"),
    (lambda d: d[:-3], "runs past the end of the file"),
    (lambda d: d[:20], "truncated: the header runs past the end"),
]


@pytest.mark.parametrize("case", range(len(CORRUPTIONS)))
def test_corrupt_chunk_tables(case):
    edit, message = CORRUPTIONS[case]
    good = SparseDevice(device_of(BASE), close_source=True)
    good.close()
    with pytest.raises(CorruptImageError, match=message) as info:
        SparseDevice(device_of(edit(BASE)), close_source=True)
    assert info.value.errno == errno.EUCLEAN


FUZZ_BASE, _ = build_sparse(mixed_chunks(random.Random(2), 512), blk=512)


def _chunk_header_offsets(data: bytes) -> list[int]:
    out, pos = [], 28
    for _ in range(struct.unpack_from("<I", data, 20)[0]):
        out.append(pos)
        pos += struct.unpack_from("<I", data, pos + 8)[0]
    return out


FUZZ_HEADERS = _chunk_header_offsets(FUZZ_BASE)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_headers(data):
    """Flipped bytes in the file header and the chunk headers: CorruptImageError or an image
    that reads end to end, within bounded time."""
    where = st.one_of(st.integers(0, 27),
                      st.tuples(st.sampled_from(FUZZ_HEADERS), st.integers(0, 15)).map(sum))
    flips = data.draw(st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=4))
    buf = bytearray(FUZZ_BASE)
    for o, x in flips:
        buf[o] ^= x
    with time_limit(5, "SparseDevice of a fuzzed image"):
        try:
            dev = SparseDevice(device_of(bytes(buf)), close_source=True)
        except CorruptImageError as err:
            assert err.errno == errno.EUCLEAN and err.what
            return
        try:
            head = min(dev.size, 1 << 20)
            assert len(bytes(dev.view(0, head))) == head
            tail = min(dev.size, 4096)
            assert len(bytes(dev.view(dev.size - tail, tail))) == tail
            if dev.size <= 64 << 20:
                try:
                    dev.verify()
                except CorruptImageError as err:
                    assert "CRC32" in err.what
        finally:
            dev.close()
