"""A read-only attachment of an image in shared memory while a writer in another process changes it.

The reader caches names and inodes. When the superblock shows that a writer is mounted, or has
been since, it reads them again; copies are checked against the inode afterwards, and names
read while the writer was busy are read again. A reader must never return one file's bytes
under another file's name, nor a CorruptImageError for a healthy image.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from e2fs import SHM, assert_fsck_clean, debugfs_r

import xipfs

SIZES = (100, 4096, 20000, 300000)
SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")


@pytest.fixture
def img(tmp_path) -> Iterator[str]:
    path = os.path.join(SHM, f"xipfs-sw-{os.getpid()}-{tmp_path.name}.img")
    xipfs.mkfs(path, 64 << 20)
    yield path
    os.unlink(path)


def in_writer(img: str, code: str) -> None:
    """Run ``code`` with ``w``, the image opened for writing, in another process."""
    subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {SRC!r}); import xipfs\n"
                    f"with xipfs.open({img!r}, 'r+') as w:\n    {code}"], check=True, timeout=60)


def test_replaced_file_is_gone_not_another_files_data(img: str) -> None:
    """The writer deletes /A and writes /B, which takes A's inode and blocks."""
    with xipfs.open(img, "r+") as w:
        w.write_bytes("/A", b"A" * 8192)
    with xipfs.open(img) as r:
        assert r.read_bytes("/A") == b"A" * 8192
        ino = r.stat("/A").st_ino
        in_writer(img, "w.unlink('/A'); w.write_bytes('/B', b'B' * 8192)")
        assert r.stat("/B").st_ino == ino                  # the inode was reused
        for call in (r.read_bytes, r.stat, r.mmap):
            with pytest.raises(FileNotFoundError):
                call("/A")
        assert not r.exists("/A")
        assert r.read_bytes("/B") == b"B" * 8192
    assert_fsck_clean(img)


def test_truncated_and_regrown_file_reads_as_it_is_now(img: str) -> None:
    with xipfs.open(img, "r+") as w:
        w.write_bytes("/C", b"C" * 65536)
    with xipfs.open(img) as r:
        assert r.stat("/C").st_size == 65536
        in_writer(img, "w.truncate('/C', 0); w.write_bytes('/D', b'D' * 65536); "
                       "f = w.open('/C', 'ab'); f.write(b'c' * 100); f.close()")
        assert r.read_bytes("/C") == b"c" * 100
        assert bytes(r.mmap("/C")) == b"c" * 100
    assert_fsck_clean(img)


def _content(name: str, version: int, size: int) -> bytes:
    return random.Random(f"{name}/{version}").randbytes(size)


def _write_constantly(img: str, seconds: float, seed: int) -> None:
    """Create, replace and delete files named ``f<N>.<version>`` under /d for ``seconds``."""
    rng = random.Random(seed)
    live: list[str] = []
    serial = 0
    end = time.monotonic() + seconds
    with xipfs.open(img, "r+") as w:
        w.mkdir("/d")
        while time.monotonic() < end:
            if live and rng.random() < 0.45:
                w.unlink("/d/" + live.pop(rng.randrange(len(live))))
            else:
                serial += 1
                name = f"f{serial}.{rng.randrange(1000)}"
                size = rng.choice(SIZES)
                try:
                    w.write_bytes("/d/" + name, _content(name, 0, size))
                except OSError:                              # full: make room
                    w.unlink("/d/" + name)
                    for old in live[::2]:
                        w.unlink("/d/" + old)
                    live = live[1::2]
                    continue
                live.append(name)
            if rng.random() < 0.1:
                w.sync()


def _read_constantly(img: str, seconds: float, seed: int, out: multiprocessing.Queue) -> None:
    rng = random.Random(seed)
    bad: list[str] = []
    reads = 0
    end = time.monotonic() + seconds
    with xipfs.open(img) as r:
        while time.monotonic() < end:
            try:
                names = r.listdir("/d")
            except FileNotFoundError:
                continue
            except OSError as err:
                if isinstance(err, xipfs.CorruptImageError):
                    bad.append(f"listdir: {err}")
                continue
            for name in rng.sample(names, min(5, len(names))):
                try:
                    data = r.read_bytes("/d/" + name) if rng.random() < 0.5 else bytes(r.mmap("/d/" + name))
                except (FileNotFoundError, BlockingIOError):
                    continue                                # deleted, or changing too fast: fine
                except OSError as err:
                    bad.append(f"{name}: {err!r}")
                    continue
                reads += 1
                if len(data) not in SIZES or data != _content(name, 0, len(data)):
                    bad.append(f"{name}: {len(data)} bytes that are not its own")
    out.put((reads, bad))


def test_readers_never_see_another_files_bytes_while_a_writer_works(img: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    out: multiprocessing.Queue = ctx.Queue()
    with xipfs.open(img, "r+") as w:
        w.write_bytes("/ready", b"")
    writer = ctx.Process(target=_write_constantly, args=(img, 6.0, 1))
    writer.start()
    time.sleep(0.3)
    readers = [ctx.Process(target=_read_constantly, args=(img, 5.0, 10 + i, out)) for i in range(2)]
    for p in readers:
        p.start()
    results = [out.get(timeout=120) for _ in readers]
    for p in [*readers, writer]:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert sum(reads for reads, _ in results) > 50
    assert [b for _, bad in results for b in bad] == []
    assert_fsck_clean(img)


def test_an_image_left_not_clean_keeps_the_readers_caches(img: str) -> None:
    """A writer that was killed leaves the state "not clean"; with nobody holding the writer's
    lock the reader still trusts its caches (else every lookup would read directories anew).
    A writer that mounts later is noticed; so is one that leaves."""
    with xipfs.open(img, "r+") as w:
        w.write_bytes("/a", b"a")
    debugfs_r(img, "ssv state 0", write=True)
    with xipfs.open(img) as r:
        forgets = []
        real = r.volume.forget_cached
        r.volume.forget_cached = lambda: (forgets.append(1), real())[1]   # type: ignore[method-assign]
        for _ in range(3):
            assert r.read_bytes("/a") == b"a"
        assert forgets == []
        in_writer(img, "w.write_bytes('/a', b'new')")
        assert r.read_bytes("/a") == b"new" and forgets
