"""Casefolded names as Linux compares them (ext4 ``casefold``, ``s_encoding`` 1: utf8-12.1).

Linux folds a name with ``utf8_casefold`` over its "nfdicf" table (fs/unicode, built from the
Unicode 12.1 data): each character is replaced by the NFD decomposition of its full case
folding (CaseFolding.txt statuses C and F), characters with Default_Ignorable_Code_Point are
dropped, and combining marks are put in canonical order between characters of class 0. An
invalid UTF-8 sequence makes the whole name unfoldable (it then matches only byte for byte and
is hashed as it is stored), except a stray continuation byte after the first: the kernel's
cursor (``utf8byte``) passes those through as part of the character before, and so folds such
a name (:func:`_cursor_fold` does the same, step for step).

Here that is ``unicodedata.normalize("NFD", s.casefold())`` (casefold first, then NFD; Python's
``str.casefold`` is the same per-character C+F folding) with what differs from the kernel's
table made explicit, all checked against e2fsprogs' copy of the kernel table code point by code
point (tests/test_casefold.py):

* the Default_Ignorable code points of 12.1 fold to nothing, and each ends a run of combining
  marks (the kernel does not reorder marks across one);
* characters Unicode assigned after 12.1 are unknown to the kernel: kept as they are, class 0
  (Python would fold Vithkuqi letters or reorder new marks); for Unicode data newer than the
  14.0 this table was checked with, they are found once by comparing with the set of code points
  12.1 itself changes (``_CHANGED_121``).
"""

from __future__ import annotations

import functools
import os
import re
import unicodedata

__all__ = ["fold", "fold_str", "hash_key", "is_valid", "UTF8_12_1", "STRICT"]

#: ``s_encoding`` of utf8-12.1, the one encoding Linux ext4 knows, and ``s_encoding_flags``'
#: strict bit (names that are not valid UTF-8 are refused on create).
UTF8_12_1 = 1
STRICT = 0x0001

#: Default_Ignorable_Code_Point in Unicode 12.1 (DerivedCoreProperties): folded to nothing.
_IGNORABLE = ((0xAD, 0xAD), (0x34F, 0x34F), (0x61C, 0x61C), (0x115F, 0x1160), (0x17B4, 0x17B5),
              (0x180B, 0x180E), (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x206F),
              (0x3164, 0x3164), (0xFE00, 0xFE0F), (0xFEFF, 0xFEFF), (0xFFA0, 0xFFA0),
              (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0000, 0xE0FFF))

#: Characters of Unicode 13.0 and 14.0 that Python's data folds, decomposes or gives a combining
#: class, and that the 12.1 table leaves alone (class 0).
_NEWER_THAN_121 = ((0x898, 0x89F), (0x8CA, 0x8D2), (0xC3C, 0xC3C), (0x1715, 0x1715),
                   (0x1ABF, 0x1ACE), (0x1DFA, 0x1DFA), (0x2C2F, 0x2C2F), (0xA7C0, 0xA7C0),
                   (0xA7C7, 0xA7C7), (0xA7C9, 0xA7C9), (0xA7D0, 0xA7D0), (0xA7D6, 0xA7D6),
                   (0xA7D8, 0xA7D8), (0xA7F5, 0xA7F5), (0xA82C, 0xA82C), (0x10570, 0x1057A),
                   (0x1057C, 0x1058A), (0x1058C, 0x10592), (0x10594, 0x10595), (0x10EAB, 0x10EAC),
                   (0x10F82, 0x10F85), (0x11070, 0x11070), (0x11938, 0x11938), (0x1193D, 0x1193E),
                   (0x11943, 0x11943), (0x16FF0, 0x16FF1), (0x1E2AE, 0x1E2AE))
#: The Unicode data ``_NEWER_THAN_121`` was made from (and is complete for, older data included).
_CHECKED_UNIDATA = (14, 0, 0)

#: Code points the 12.1 nfdicf table changes or gives a nonzero combining class: a bitmap
#: (bit ``cp & 7`` of byte ``cp >> 3``), zlib-compressed, base85. Only read when Python's Unicode
#: data is newer than ``_CHECKED_UNIDATA``.
_CHANGED_121 = (
    "c-rmUO=uid902gQo21DhG;0wIC}w*QiXaG;QlWMC;MYle=umIz#fy0G;6b!@BM2V!AcDuzUIg*dir~?#2f>qqP<x1&pl"
    "Csm<|0XLlIP4$_G31iCQTD<@b`nvym@c(=0ESf-Rzr}B!t{rjH98gS`9Ha;%q$sRg9}?>aVrGmzL6fj6Z%i_xZISF5h?"
    "M&p1CHm(rX#e>G0L`eqUaiUmn?;aZHhVkr!-yp<%$7r*EEp&Y{duO-RV<mTz5<?^HRtE;PxGx<>(U2L@Ko5>=LarVpZ6"
    "&^U3?UvJ8LaCEG62857@nn`N=TVFf2yS_z8bb5dji*{i2m1=sII}vlDh^db_2Jl4SP93&m2_Xv51&uV!wZG-YN4`9crr"
    "ZRPPUxri{<dy!ujt!Rw$j^aQ<+3z2|5&OcY9ckB36IR359oTM6a!C+9<+s`s2+4>Je4eV_N)Y;{9x&6L7jSs0L43wy58"
    "ZS#(-D~9tsd}F}3lsDuY+`Rs7vy{TZ#q}}SxvzRMoL&FOgZX&NGsoNQKHjdQJDN+a7sT}tmg4H+%Ft$4U4KE{iW|MylR"
    "gt;t(GOy?Pu98&z_(DIevd5#-D0K%V}lj+I1GLF!f8!Z>>H)+$kT+qOW&*vvMeeQ|bPrw9Q5qjt(8oB3{hPCfZ~6z@7G"
    "4GZtgnmnz#isns3%TU)sB$0N<8$H=D}-n3@=zjs$6T}i)ACCMk{xnpVA&vw%vK6l4A1ONa4d#E*G{&=yLZolc~=8sQKC"
    "+iOtlkiG%<e4OSdpc=9JgeVk@*d;*<Co*vW~`@lEZqKC*oCjl18eU-m}wnW`=5^ju$LzMxCFLg%QutSZ;h8%+UY_`>%("
    "IsEH8wW#`Iicuj1=pw=0;*Hfw#W-`&ry@h+Ei`&PO8Y^=OFI<S2Qw)#GKm%h~6zBj1o?2gA<v6&WkA<X6$U0v^vm;2M{"
    "O=rcn6-jflGw<p2?eI44w7c#*na!b^Q&XE>|LNjn>80`8-_8f60pq;qZi|OwTQ<*u{yx}Fo0fWJi#-99chEgETb=O4_D"
    "=->;6Ky;yxZ9GEA86v0s;W=Z>w9M<Q~+Fzs7hy8=NP?a{p?=L)vFwYQ%VRZgk7Dc2@b~zHXV$yt?%#jibg2000000002"
    "My=WKyok&e90ssI20000000000000000000000000000000000000000000000000000000000000000000000000000"
    "0000000000000000000000000000G`Cs!200000000000000000000000000002k9sdC1vP~c")


def _class(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(f"\\U{a:08x}" if a == b else f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges)


def _unidata() -> tuple[int, ...]:
    return tuple(int(p) for p in unicodedata.unidata_version.split("."))


def _newer_found() -> tuple[tuple[int, int], ...]:
    """Characters Python's (newer) Unicode data changes that 12.1 does not know: found once."""
    import base64
    import zlib

    known = zlib.decompress(base64.b85decode("".join(_CHANGED_121)))
    found: list[tuple[int, int]] = []
    for cp in range(0x80, 0x110000):
        if known[cp >> 3] >> (cp & 7) & 1 or 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        if ch.casefold() != ch or unicodedata.combining(ch) or unicodedata.normalize("NFD", ch) != ch:
            found.append((cp, cp))
    return tuple(found)


@functools.lru_cache(maxsize=1)
def _special() -> re.Pattern[str]:
    """A run of characters that do not fold as Python folds them: ignorables and too-new ones."""
    newer = _NEWER_THAN_121 if _unidata() <= _CHECKED_UNIDATA else _newer_found()
    return re.compile(f"([{_class(_IGNORABLE)}]|[{_class(newer)}])")


@functools.lru_cache(maxsize=1)
def _ignorable() -> re.Pattern[str]:
    return re.compile(f"[{_class(_IGNORABLE)}]")


def _fold_valid(name: str) -> str:
    """``name`` (valid Unicode, not all ASCII) folded as the 12.1 nfdicf table folds it."""
    special = _special()
    if special.search(name) is None:
        return unicodedata.normalize("NFD", name.casefold())
    ignorable = _ignorable()
    out = []
    # split() with a group: runs to fold at even places, one special character at odd ones; a
    # special character ends the run of marks before it (class 0, or nothing for an ignorable)
    for i, part in enumerate(special.split(name)):
        if i & 1:
            if ignorable.match(part) is None:
                out.append(part)
        elif part:
            out.append(unicodedata.normalize("NFD", part.casefold()))
    return "".join(out)


# -- names that are not UTF-8: the kernel's cursor, step for step ------------------------------
_STOPPER = 0
_MAXCCC = 254


def _clen(b: int) -> int:
    """``utf8clen``: the length of the sequence a lead byte starts (1 for anything below 0xC0)."""
    return 1 + (b >= 0xC0) + (b >= 0xE0) + (b >= 0xF0)


@functools.lru_cache(maxsize=4096)
def _leaf(seq: bytes) -> tuple[int, bytes | None] | None:
    """The 12.1 table's leaf for one sequence: ``(ccc, decomposition or None)``; None where the
    trie has none (not one valid UTF-8 character)."""
    try:
        ch = seq.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if len(ch) != 1:
        return None
    if _ignorable().match(ch):
        return _STOPPER, b""
    if _special().match(ch):                      # unassigned in 12.1: itself, class 0
        return _STOPPER, None
    folded = unicodedata.normalize("NFD", ch.casefold())
    if folded == ch:
        return unicodedata.combining(ch), None
    return unicodedata.combining(folded[0]), folded.encode("utf-8")


def _lookup(buf: bytes, i: int, limit: int | None) -> tuple[int, bytes | None] | None:
    clen = _clen(buf[i])
    if limit is not None and clen > limit or 0x80 <= buf[i] < 0xC0:
        return None
    return _leaf(buf[i:i + clen])


def _cursor_fold(src: bytes) -> bytes | None:
    """``utf8_casefold`` of a name that is not valid UTF-8, as Linux ``utf8ncursor`` and
    ``utf8byte`` produce it: None at an invalid lead sequence or a leading continuation byte;
    a continuation byte elsewhere is emitted where the cursor meets it (during a reordering
    scan, once per pass), as the kernel does."""
    if src and 0x80 <= src[0] < 0xC0:
        return None
    out = bytearray()
    buf, i = src, 0                   # u8c->s: in the name, or in a decomposition
    p: int | None = None              # u8c->p: where the name resumes after a decomposition
    ss: tuple[bytes, int] | None = None
    sp: int | None = None
    n = len(src)                      # u8c->len: bytes of the name not consumed
    slen = 0
    ccc = nccc = _STOPPER
    for _ in range(1 << 20):          # each step consumes or rescans; far more than 255 bytes need
        byte = buf[i] if i < len(buf) else 0
        if p is not None and byte == 0:
            buf, i, p = src, p, None
            byte = src[i] if i < len(src) else 0
        if p is None and (n == 0 or byte == 0):
            if ccc == _STOPPER:
                return bytes(out)
            c = _STOPPER
        elif byte & 0xC0 == 0x80:     # a continuation of the character before
            if p is None:
                n -= 1
            out.append(byte)
            i += 1
            continue
        else:
            leaf = _lookup(buf, i, n if p is None else None)
            if leaf is None:
                return None
            c, decomposition = leaf
            if decomposition is not None:
                clen = _clen(byte)
                n -= clen
                p = i + clen
                buf, i = decomposition, 0
                if not decomposition:
                    if ccc == _STOPPER:
                        continue
                    c = _STOPPER
                else:
                    first = _lookup(buf, 0, None)
                    if first is None:
                        return None
                    c = first[0]
            if buf:
                if c != _STOPPER and ccc < c < nccc:
                    nccc = c
                if c == ccc:
                    if p is None:
                        n -= 1
                    out.append(buf[i])
                    i += 1
                    continue
        # the combining class does not match: scan on, restart for the next class, or go on
        if nccc == _STOPPER:
            ccc, nccc = -1, c
            sp, ss, slen = p, (buf, i), n
            step = _clen(buf[i] if i < len(buf) else 0)
            if p is None:
                n -= step
            i += step
        elif c != _STOPPER:
            step = _clen(buf[i] if i < len(buf) else 0)
            if p is None:
                n -= step
            i += step
        elif nccc != _MAXCCC + 1:
            ccc, nccc = nccc, _MAXCCC + 1
            assert ss is not None
            (buf, i), p, n = ss, sp, slen
        else:
            ccc = nccc = _STOPPER
            sp = ss = None
            slen = 0
    return None


def fold_str(name: str) -> str | None:
    """``name`` (a decoded file name: undecodable bytes as lone surrogates) casefolded as Linux
    does (see :func:`fold`), or None where Linux cannot fold it (then it matches only byte for
    byte)."""
    if name.isascii():
        return name.lower()
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        folded = _cursor_fold(os.fsencode(name))
        return None if folded is None else os.fsdecode(folded)
    return _fold_valid(name)


def fold(name: bytes) -> bytes | None:
    """Linux ``utf8_casefold`` of a stored or looked-up name; None where it fails (invalid
    UTF-8, but for stray continuation bytes after the first byte, which it keeps)."""
    if name.isascii():
        return name.lower()
    try:
        text = name.decode("utf-8")
    except UnicodeDecodeError:
        return _cursor_fold(name)
    return _fold_valid(text).encode("utf-8")


def hash_key(name: bytes) -> bytes:
    """What a casefolded directory hashes for ``name`` (Linux ``ext4fs_dirhash``): the folded
    name, or the bytes as they are when the name is not valid UTF-8."""
    folded = fold(name)
    return name if folded is None else folded


def is_valid(name: bytes) -> bool:
    """Whether ``name`` is valid UTF-8 (``utf8_validate``; what strict mode demands on create)."""
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
