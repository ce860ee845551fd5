"""Large reads into fresh mappings (xipfs._fresh): where glibc's mmap threshold is fixed (Dask's
workers), a file read as bytes is filled after one madvise; the bytes must be exactly the file's."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import xipfs
from xipfs import _fresh

KIB = 1024


@pytest.mark.parametrize("environ, want", [
    ({}, 0),
    ({"MALLOC_TRIM_THRESHOLD_": "65536"}, 128 * KIB),            # Dask's nanny sets this
    ({"MALLOC_MMAP_THRESHOLD_": "1048576"}, 1024 * KIB),
    ({"MALLOC_TOP_PAD_": "0", "MALLOC_MMAP_THRESHOLD_": "0x40000"}, 256 * KIB),
    ({"MALLOC_MMAP_THRESHOLD_": "junk"}, 128 * KIB),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=65536"}, 128 * KIB),
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0:glibc.malloc.mmap_threshold=200000"}, 200000),
    ({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}, 0),      # leaves the threshold dynamic
])
def test_the_fixed_threshold_is_read_from_the_environment(environ: dict[str, str], want: int) -> None:
    if not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("not glibc")
    assert _fresh._fixed_mmap_threshold(environ) == want


def _image(path: str) -> dict[str, bytes]:
    """An image with a contiguous large file, one with holes, one written in pieces between
    other files (fragmented), and a small one; what each should read as."""
    xipfs.mkfs(path, 32 << 20, block_size=4096)
    want = {}
    with xipfs.open(path, "r+") as fs:
        want["/whole"] = os.urandom(256 * KIB + 123)
        fs.write_bytes("/whole", want["/whole"])
        holey = bytearray(1024 * KIB)
        with fs.open("/holey", "wb") as f:
            for at in (0, 300 * KIB, 900 * KIB):
                piece = os.urandom(40 * KIB)
                f.seek(at)
                f.write(piece)
                holey[at:at + len(piece)] = piece
            f.truncate(len(holey))
        want["/holey"] = bytes(holey)
        pieces = []
        with fs.open("/fragmented", "wb") as f:
            for i in range(6):
                piece = os.urandom(64 * KIB)
                f.write(piece)
                f.flush()
                fs.write_bytes(f"/between{i}", os.urandom(8 * KIB))
                pieces.append(piece)
        want["/fragmented"] = b"".join(pieces)
        want["/small"] = b"small file"
        fs.write_bytes("/small", want["/small"])
    return want


CHILD = r"""
import hashlib, json, sys
import xipfs
from xipfs import _fresh
out = {"fresh_min": _fresh.FRESH_MIN, "files": {}}
with xipfs.open(sys.argv[1]) as fs:
    for name in sys.argv[2:]:
        data = fs.read_bytes(name)
        with fs.open(name, "rb", buffering=0) as f:
            part = f.pread(len(data) - 5, 5)
        again = bytes(data)                 # an ordinary bytes made from it
        out["files"][name] = [hashlib.sha256(data).hexdigest(), hashlib.sha256(part).hexdigest(),
                              type(data) is bytes, hash(data) == hash(again), len(data)]
print(json.dumps(out))
"""


@pytest.mark.parametrize("environ", [{"MALLOC_TRIM_THRESHOLD_": "65536"}, {}],
                         ids=["fixed-threshold", "dynamic"])
def test_reads_in_a_process_with_a_fixed_threshold_are_exact(tmp_path: object, environ: dict) -> None:
    import hashlib
    import json

    img = os.path.join("/dev/shm", f"xipfs-fresh-{os.getpid()}.img")
    try:
        want = _image(img)
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.pop("GLIBC_TUNABLES", None)
        env.update(environ)
        proc = subprocess.run([sys.executable, "-c", CHILD, img, *want], env=env, text=True,
                              capture_output=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        if environ and os.confstr("CS_GNU_LIBC_VERSION"):
            assert got["fresh_min"] == 128 * KIB
        elif not environ:
            assert got["fresh_min"] == 0
        for name, data in want.items():
            digest, part, exact_type, same_hash, size = got["files"][name]
            assert size == len(data), name
            assert digest == hashlib.sha256(data).hexdigest(), name
            assert part == hashlib.sha256(data[5:]).hexdigest(), name
            assert exact_type and same_hash, name
    finally:
        if os.path.exists(img):
            os.unlink(img)


def test_copy_out_in_this_process_matches_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fill itself, forced on here: views of every alignment and size around a page."""
    if not os.confstr("CS_GNU_LIBC_VERSION"):
        pytest.skip("not glibc")
    monkeypatch.setattr(_fresh, "FRESH_MIN", 1)
    src = os.urandom(3 * 4096 + 77)
    view = memoryview(src)
    for lo in (0, 1, 4095, 4096):
        for n in (1, 2, 4095, 4096, 4097, 8192 + 5):
            piece = view[lo:lo + n]
            assert _fresh.copy_out(piece) == bytes(piece)
    parts = [view[:100], bytes(5000), view[100:9000], bytes(3)]
    assert _fresh.join_out(parts, sum(map(len, parts))) == b"".join(parts)
