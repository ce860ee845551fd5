"""The ext4 directory hash (htree names), exactly as Linux ``ext4fs_dirhash`` computes it.

Versions: legacy (0), half_md4 (1), tea (2) and their unsigned-char variants (3, 4, 5). The
signed variants read each name byte as a signed char, which is what x86 Linux wrote before the
superblock recorded the choice; ``s_flags`` now says which (:func:`hash_version`). Both
``ext2fs_dirhash`` (e2fsprogs) and Linux clear the low bit of the major hash; Linux alone then
moves 0xFFFFFFFE (its end-of-directory cookie) to 0xFFFFFFFC, and so does :func:`dirhash`, as
lookups must hash the way the kernel that inserted the names did.

Speed: the name is read a 32-bit big-endian word at a time (``str2hashbuf`` builds exactly
those words, the signed variant subtracts a carry per high-bit byte), the transforms are
unrolled, and the seeded start state is prepared once per (version, seed) by :func:`hasher`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from functools import lru_cache

from ..errors import UnsupportedFeatureError

__all__ = [
    "DX_HASH_LEGACY", "DX_HASH_HALF_MD4", "DX_HASH_TEA", "DX_HASH_LEGACY_UNSIGNED",
    "DX_HASH_HALF_MD4_UNSIGNED", "DX_HASH_TEA_UNSIGNED", "DX_HASH_SIPHASH",
    "EXT2_FLAGS_SIGNED_HASH", "EXT2_FLAGS_UNSIGNED_HASH", "HTREE_EOF_32BIT", "HASH_NAMES",
    "hash_version", "seed_words", "hasher", "dirhash",
]

DX_HASH_LEGACY = 0
DX_HASH_HALF_MD4 = 1
DX_HASH_TEA = 2
DX_HASH_LEGACY_UNSIGNED = 3
DX_HASH_HALF_MD4_UNSIGNED = 4
DX_HASH_TEA_UNSIGNED = 5
DX_HASH_SIPHASH = 6
#: ``s_flags`` bits that record how the directory hash reads name bytes.
EXT2_FLAGS_SIGNED_HASH = 0x1
EXT2_FLAGS_UNSIGNED_HASH = 0x2
#: Linux ``EXT4_HTREE_EOF_32BIT``: a major hash of ``EOF << 1`` is stored as ``(EOF - 1) << 1``.
HTREE_EOF_32BIT = 0x7FFFFFFF
#: Names as dumpe2fs prints them and ``debugfs dx_hash -h`` takes them.
HASH_NAMES = {0: "legacy", 1: "half_md4", 2: "tea", 3: "legacy_unsigned", 4: "half_md4_unsigned",
              5: "tea_unsigned", 6: "siphash"}

_M = 0xFFFFFFFF
_DEFAULT_SEED = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_EOF_HASH = (HTREE_EOF_32BIT << 1) & _M
_EOF_REPLACEMENT = ((HTREE_EOF_32BIT - 1) << 1) & _M
_K2 = 0x5A827999
_K3 = 0x6ED9EBA1
_TEA_DELTA = 0x9E3779B9
#: The TEA round constants: ``sum`` after each of the 16 rounds.
_TEA_SUMS = tuple((_TEA_DELTA * i) & 0xFFFFFFFF for i in range(1, 17))
#: Per count of words, the Struct reading that many big-endian words.
_BE = [struct.Struct(f">{n}I") for n in range(9)]
#: Bit 7 of every byte of a k-byte big-endian value (k = 0..4).
_HIGH = [int.from_bytes(b"\x80" * k, "big") for k in range(5)]
#: ``c * 7152373`` of the legacy hash, per byte value, read signed and unsigned.
_LEGACY_MUL_S = tuple(((c - 256 if c >= 128 else c) * 7152373) & _M for c in range(256))
_LEGACY_MUL_U = tuple((c * 7152373) & _M for c in range(256))


def hash_version(root_version: int, s_flags: int) -> int:
    """The version to hash with: the root's ``hash_version``, +3 (unsigned) when ``s_flags``
    has EXT2_FLAGS_UNSIGNED_HASH, as Linux ``dx_probe`` and e2fsprogs decide it."""
    if root_version <= DX_HASH_TEA and s_flags & EXT2_FLAGS_UNSIGNED_HASH:
        return root_version + 3
    return root_version


def seed_words(seed: bytes | bytearray | memoryview | Sequence[int] | None) -> tuple[int, int, int, int]:
    """``s_hash_seed`` (its 16 on-disk bytes or 4 words) as 4 words; all zero (or None) means
    the default MD4 start state, as in Linux and e2fsprogs."""
    if seed is None:
        return _DEFAULT_SEED
    if isinstance(seed, (bytes, bytearray, memoryview)):
        if len(seed) != 16:
            raise ValueError(f"s_hash_seed is 16 bytes, not {len(seed)}")
        words = struct.unpack("<4I", seed)
    else:
        words = tuple(int(w) & _M for w in seed)
        if len(words) != 4:
            raise ValueError(f"s_hash_seed is 4 words, not {len(words)}")
    if not any(words):
        return _DEFAULT_SEED
    return words  # type: ignore[return-value]


def _words(name: bytes, off: int, remaining: int, num: int, signed: bool) -> list[int]:
    """``str2hashbuf(name + off, remaining, num)``: ``num`` words of the next chunk."""
    pad = remaining | (remaining << 8)
    pad |= pad << 16
    n = remaining if remaining < 4 * num else 4 * num
    full = n >> 2
    words = list(_BE[full].unpack_from(name, off))
    if signed:
        words = [(w - ((w & 0x80808080) << 1)) & _M for w in words]
    if full < num:
        rem = n & 3
        if rem:
            u = int.from_bytes(name[off + 4 * full:off + n], "big")
            if signed:
                u -= (u & _HIGH[rem]) << 1
            words.append(((pad << (8 * rem)) + u) & _M)
        else:
            words.append(pad)
        words.extend([pad] * (num - full - 1))
    return words


def _half_md4(name: bytes, seed: tuple[int, int, int, int], signed: bool) -> tuple[int, int]:
    """half_md4 over 32-byte chunks: (buf[1], buf[2])."""
    b0, b1, b2, b3 = seed
    length = len(name)
    off = 0
    while True:
        x0, x1, x2, x3, x4, x5, x6, x7 = _words(name, off, length - off, 8, signed)
        a, b, c, d = b0, b1, b2, b3
        # round 1: F(x, y, z) = z ^ (x & (y ^ z))
        t = (a + (d ^ (b & (c ^ d))) + x0) & _M
        a = ((t << 3) | (t >> 29)) & _M
        t = (d + (c ^ (a & (b ^ c))) + x1) & _M
        d = ((t << 7) | (t >> 25)) & _M
        t = (c + (b ^ (d & (a ^ b))) + x2) & _M
        c = ((t << 11) | (t >> 21)) & _M
        t = (b + (a ^ (c & (d ^ a))) + x3) & _M
        b = ((t << 19) | (t >> 13)) & _M
        t = (a + (d ^ (b & (c ^ d))) + x4) & _M
        a = ((t << 3) | (t >> 29)) & _M
        t = (d + (c ^ (a & (b ^ c))) + x5) & _M
        d = ((t << 7) | (t >> 25)) & _M
        t = (c + (b ^ (d & (a ^ b))) + x6) & _M
        c = ((t << 11) | (t >> 21)) & _M
        t = (b + (a ^ (c & (d ^ a))) + x7) & _M
        b = ((t << 19) | (t >> 13)) & _M
        # round 2: G(x, y, z) = (x & y) + ((x ^ y) & z)
        t = (a + ((b & c) + ((b ^ c) & d)) + x1 + _K2) & _M
        a = ((t << 3) | (t >> 29)) & _M
        t = (d + ((a & b) + ((a ^ b) & c)) + x3 + _K2) & _M
        d = ((t << 5) | (t >> 27)) & _M
        t = (c + ((d & a) + ((d ^ a) & b)) + x5 + _K2) & _M
        c = ((t << 9) | (t >> 23)) & _M
        t = (b + ((c & d) + ((c ^ d) & a)) + x7 + _K2) & _M
        b = ((t << 13) | (t >> 19)) & _M
        t = (a + ((b & c) + ((b ^ c) & d)) + x0 + _K2) & _M
        a = ((t << 3) | (t >> 29)) & _M
        t = (d + ((a & b) + ((a ^ b) & c)) + x2 + _K2) & _M
        d = ((t << 5) | (t >> 27)) & _M
        t = (c + ((d & a) + ((d ^ a) & b)) + x4 + _K2) & _M
        c = ((t << 9) | (t >> 23)) & _M
        t = (b + ((c & d) + ((c ^ d) & a)) + x6 + _K2) & _M
        b = ((t << 13) | (t >> 19)) & _M
        # round 3: H(x, y, z) = x ^ y ^ z
        t = (a + (b ^ c ^ d) + x3 + _K3) & _M
        a = ((t << 3) | (t >> 29)) & _M
        t = (d + (a ^ b ^ c) + x7 + _K3) & _M
        d = ((t << 9) | (t >> 23)) & _M
        t = (c + (d ^ a ^ b) + x2 + _K3) & _M
        c = ((t << 11) | (t >> 21)) & _M
        t = (b + (c ^ d ^ a) + x6 + _K3) & _M
        b = ((t << 15) | (t >> 17)) & _M
        t = (a + (b ^ c ^ d) + x1 + _K3) & _M
        a = ((t << 3) | (t >> 29)) & _M
        t = (d + (a ^ b ^ c) + x5 + _K3) & _M
        d = ((t << 9) | (t >> 23)) & _M
        t = (c + (d ^ a ^ b) + x0 + _K3) & _M
        c = ((t << 11) | (t >> 21)) & _M
        t = (b + (c ^ d ^ a) + x4 + _K3) & _M
        b = ((t << 15) | (t >> 17)) & _M
        b0 = (b0 + a) & _M
        b1 = (b1 + b) & _M
        b2 = (b2 + c) & _M
        b3 = (b3 + d) & _M
        off += 32
        if off >= length:
            return b1, b2


def _tea(name: bytes, seed: tuple[int, int, int, int], signed: bool) -> tuple[int, int]:
    """TEA over 16-byte chunks: (buf[0], buf[1])."""
    h0, h1 = seed[0], seed[1]
    length = len(name)
    off = 0
    while True:
        a, b, c, d = _words(name, off, length - off, 4, signed)
        b0, b1 = h0, h1
        for s in _TEA_SUMS:     # one mask per step: + and ^ keep the low 32 bits exact
            b0 = (b0 + (((b1 << 4) + a) ^ (b1 + s) ^ ((b1 >> 5) + b))) & _M
            b1 = (b1 + (((b0 << 4) + c) ^ (b0 + s) ^ ((b0 >> 5) + d))) & _M
        h0 = (h0 + b0) & _M
        h1 = (h1 + b1) & _M
        off += 16
        if off >= length:
            return h0, h1


def _legacy(name: bytes, mul: tuple[int, ...]) -> int:
    """``dx_hack_hash``: the ext3 hash of the first htree code, one byte at a time."""
    h0, h1 = 0x12A3FE2D, 0x37ABE8F9
    for ch in name:
        h = (h1 + (h0 ^ mul[ch])) & _M
        if h & 0x80000000:
            h -= 0x7FFFFFFF
        h1, h0 = h0, h
    return (h0 << 1) & _M


def _finish(h: int) -> int:
    h &= 0xFFFFFFFE
    return _EOF_REPLACEMENT if h == _EOF_HASH else h


@lru_cache(maxsize=64)
def _make_hasher(version: int, seed: tuple[int, int, int, int]) -> Callable[[bytes], tuple[int, int]]:
    if version in (DX_HASH_LEGACY, DX_HASH_LEGACY_UNSIGNED):
        mul = _LEGACY_MUL_S if version == DX_HASH_LEGACY else _LEGACY_MUL_U

        def legacy(name: bytes) -> tuple[int, int]:
            return _finish(_legacy(name, mul)), 0
        return legacy
    if version in (DX_HASH_HALF_MD4, DX_HASH_HALF_MD4_UNSIGNED):
        signed = version == DX_HASH_HALF_MD4

        def half_md4(name: bytes) -> tuple[int, int]:
            if not name:
                return _finish(seed[1]), seed[2]
            h, minor = _half_md4(name, seed, signed)
            return _finish(h), minor
        return half_md4
    if version in (DX_HASH_TEA, DX_HASH_TEA_UNSIGNED):
        signed = version == DX_HASH_TEA

        def tea(name: bytes) -> tuple[int, int]:
            if not name:
                return _finish(seed[0]), seed[1]
            h, minor = _tea(name, seed, signed)
            return _finish(h), minor
        return tea
    if version == DX_HASH_SIPHASH:
        raise UnsupportedFeatureError("siphash directory hash (casefolded encrypted directories)",
                                      ("casefold", "encrypt"))
    raise ValueError(f"unknown directory hash version {version}")


def hasher(version: int, seed: bytes | Sequence[int] | None = None) -> Callable[[bytes], tuple[int, int]]:
    """A function ``name -> (major hash, minor hash)`` for ``version`` (0..5, already made
    unsigned by :func:`hash_version`) and ``s_hash_seed``; built once per (version, seed)."""
    return _make_hasher(version, seed_words(seed))


def dirhash(name: bytes, version: int, seed: bytes | Sequence[int] | None = None) -> tuple[int, int]:
    """``(major, minor)`` hash of ``name`` as Linux ``ext4fs_dirhash`` (major's bit 0 clear,
    0xFFFFFFFE moved to 0xFFFFFFFC; minor 0 for legacy)."""
    return _make_hasher(version, seed_words(seed))(bytes(name))
