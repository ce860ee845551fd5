"""The ext4 directory hash against its oracle, ``debugfs dx_hash`` (e2fsprogs ``ext2fs_dirhash``).

All six versions (legacy, half_md4, tea, signed and unsigned), names of random bytes (high-bit
bytes included, where signed and unsigned differ) of every length 1..255, several seeds (the
all-zero one meaning the default). Thousands of names go to one debugfs run (``-f``), which
needs no image for ``dx_hash``. ``-h`` is given as a number: 1.47.0's ``e2p_string2hash``
knows no ``*_unsigned`` names and ``atoi`` silently turns them into 0 (legacy).

Names cannot hold NUL, newline or CR (debugfs reads its commands a line at a time); ``"`` is
doubled inside the quotes, ``--`` ends the options (a name may start with ``-``).
"""

from __future__ import annotations

import os
import random
import re
import tempfile
import time
import uuid

import pytest
from e2fs import SHM, run
from hypothesis import given, settings
from hypothesis import strategies as st

from xipfs.errors import UnsupportedFeatureError
from xipfs.extfs.dirhash import (
    DX_HASH_HALF_MD4,
    DX_HASH_LEGACY,
    DX_HASH_LEGACY_UNSIGNED,
    DX_HASH_SIPHASH,
    DX_HASH_TEA,
    dirhash,
    hash_version,
    hasher,
    seed_words,
)

SEEDS = [
    bytes(16),                                              # all zero: the default MD4 state
    bytes(range(1, 17)),
    bytes.fromhex("38e9a671f46e4ac3932046f921ac4f8f"),      # as mke2fs makes them
    b"\xff" * 16,
    bytes(12) + b"\x00\x00\x00\x80",                        # one word set: not the default
]
_ALLOWED = bytes(b for b in range(1, 256) if b not in (0x0A, 0x0D))
_RESULT = re.compile(rb"^Hash of (.*) is 0x([0-9a-f]+) \(minor 0x([0-9a-f]+)\)$")


def quote(name: bytes) -> bytes:
    """``name`` inside debugfs's double quotes, where ``""`` stands for one ``"``."""
    return name.replace(b'"', b'""')


def oracle(queries: list[tuple[int, bytes, bytes]]) -> list[tuple[int, int]]:
    """``(major, minor)`` per ``(version, seed, name)``, from one ``debugfs -f`` run."""
    lines = [b'dx_hash -h %d -s %s -- "%s"' % (v, str(uuid.UUID(bytes=seed)).encode(), quote(name))
             for v, seed, name in queries]
    with tempfile.NamedTemporaryFile("wb", suffix=".cmds", dir=SHM, delete=False) as f:
        f.write(b"\n".join(lines) + b"\n")
    try:
        out = run(["debugfs", "-f", f.name]).stdout
    finally:
        os.unlink(f.name)
    got = [m for m in (_RESULT.match(line) for line in out.split(b"\n")) if m]
    assert len(got) == len(queries), out[-2000:]
    res = []
    for (_, _, name), m in zip(queries, got, strict=True):
        assert m[1] == name
        res.append((int(m[2], 16), int(m[3], 16)))
    return res


def linux(major: int) -> int:
    """e2fsprogs' major hash as Linux stores it (0xFFFFFFFE is the kernel's EOF cookie)."""
    return 0xFFFFFFFC if major == 0xFFFFFFFE else major


def random_names(rng: random.Random, count: int) -> list[bytes]:
    names = [bytes(rng.choice(_ALLOWED) for _ in range(n)) for n in range(1, 256)]   # every length
    for n in (1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 63, 64, 65, 255):               # chunk edges
        names.append(bytes(rng.randrange(0x80, 0x100) for _ in range(n)))            # all high bytes
        names.append(b"x" * n)
    names += [bytes([b]) for b in _ALLOWED]                                           # every byte
    while len(names) < count:
        names.append(bytes(rng.choice(_ALLOWED) for _ in range(rng.choice((rng.randint(1, 40),
                                                                         rng.randint(1, 255))))))
    return names


def test_all_versions_against_debugfs() -> None:
    rng = random.Random(20240611)
    names = random_names(rng, 900)
    queries = [(v, seed, name) for seed in SEEDS for v in range(6) for name in names]
    want = oracle(queries)
    bad = []
    for (v, seed, name), (major, minor) in zip(queries, want, strict=True):
        got = dirhash(name, v, seed)
        if got != (linux(major), minor):
            bad.append((v, seed.hex(), name, got, (major, minor)))
    assert not bad, bad[:5]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=255).map(lambda b: bytes(c for c in b if c not in (0, 10, 13))
                                                        or b"_"), min_size=1, max_size=40),
       st.binary(min_size=16, max_size=16))
def test_hypothesis_against_debugfs(names: list[bytes], seed: bytes) -> None:
    queries = [(v, seed, name) for v in range(6) for name in names]
    for (v, _, name), (major, minor) in zip(queries, oracle(queries), strict=True):
        assert dirhash(name, v, seed) == (linux(major), minor), (v, name)


def test_signedness_matters() -> None:
    """A high-bit byte hashes differently read signed and unsigned; ASCII does not."""
    for v in (DX_HASH_LEGACY, DX_HASH_HALF_MD4, DX_HASH_TEA):
        assert dirhash(b"caf\xc3\xa9", v) != dirhash(b"caf\xc3\xa9", v + 3)
        assert dirhash(b"cafe", v) == dirhash(b"cafe", v + 3)


def test_known_values() -> None:
    assert dirhash(b"hello", DX_HASH_HALF_MD4) == (0x1746DA32, 0x420013B5)
    assert dirhash(b"hello", DX_HASH_TEA, bytes(range(1, 17))) == (0x1A5692B6, 0x2FD9857D)
    assert dirhash(b"hello", DX_HASH_HALF_MD4, bytes(16)) == dirhash(b"hello", DX_HASH_HALF_MD4, None)
    assert dirhash(b"hello", DX_HASH_LEGACY, b"\x01" * 16) == dirhash(b"hello", DX_HASH_LEGACY)  # no seed


def test_eof_hash_moved_as_linux_does() -> None:
    """These names' legacy hash is 0xFFFFFFFE: e2fsprogs keeps it, Linux stores 0xFFFFFFFC."""
    queries = [(v, bytes(16), name) for name in (b"c7gVk1", b"c7gV1k") for v in (0, 3)]
    for (v, _, name), (major, minor) in zip(queries, oracle(queries), strict=True):
        assert (major, minor) == (0xFFFFFFFE, 0)
        assert dirhash(name, v) == (0xFFFFFFFC, 0)


def test_hash_version_from_flags() -> None:
    assert hash_version(0, 0x1) == 0
    assert hash_version(1, 0x2) == 4
    assert hash_version(2, 0x2) == 5
    assert hash_version(2, 0x3) == 5            # Linux tests the unsigned flag first
    assert hash_version(1, 0) == 1              # neither flag: signed, as x86 Linux
    assert hash_version(DX_HASH_SIPHASH, 0x2) == DX_HASH_SIPHASH


def test_seed_words() -> None:
    assert seed_words(bytes(16)) == seed_words(None) == seed_words((0, 0, 0, 0))
    assert seed_words(bytes(range(1, 17)))[0] == 0x04030201
    assert seed_words((1, 2, 3, 4)) == (1, 2, 3, 4)
    with pytest.raises(ValueError):
        seed_words(b"short")


def test_unsupported_versions() -> None:
    with pytest.raises(UnsupportedFeatureError):
        hasher(DX_HASH_SIPHASH)
    with pytest.raises(ValueError):
        hasher(7)
    assert dirhash(b"x" * 255, DX_HASH_LEGACY_UNSIGNED)[1] == 0


def test_speed() -> None:
    """A 20-byte name hashes in well under 100 us with every version (a loose bound, CI is slow)."""
    name = b"some_file_name_20byt"
    for v in range(6):
        h = hasher(v, SEEDS[2])
        t0 = time.perf_counter()
        for _ in range(2000):
            h(name)
        assert (time.perf_counter() - t0) / 2000 < 100e-6, v
