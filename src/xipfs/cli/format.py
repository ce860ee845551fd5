"""Text in and out for the ``xipfs`` command: sizes, modes, owners, dates, ls/stat lines, JSON.

Kept apart from :mod:`xipfs.cli` so the commands read as what they do; everything here is pure
(no image access) and follows the Unix tools the commands echo (GNU ls, stat, df, chmod, chown,
touch).
"""

from __future__ import annotations

import functools
import grp
import math
import os
import pwd
import re
import stat
import time
from typing import Any

# -- sizes ------------------------------------------------------------------------------------
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtpe]?)(i?b?)\s*", re.I)
_UNITS = "KMGTPE"


def parse_size(text: str) -> int:
    """Bytes from ``"64M"``, ``"1.5G"``, ``"512KiB"``, ``"4096"`` (powers of 1024; no suffix: bytes)."""
    m = _SIZE_RE.fullmatch(text)
    if not m or (m[3] and not m[2] and m[3].lower() != "b"):
        raise ValueError(f"invalid size {text!r} (use a number of bytes or K, M, G, T suffixes)")
    value = float(m[1]) if "." in m[1] else int(m[1])
    power = _UNITS.index(m[2].upper()) + 1 if m[2] else 0
    size = int(value * (1024 ** power))
    if size <= 0:
        raise ValueError(f"invalid size {text!r}: must be above zero")
    return size


def human_size(n: int) -> str:
    """A size the way ``ls -h`` and ``df -h`` print it: ``"812"``, ``"4.0K"``, ``"13M"`` (rounded up)."""
    if n < 1024:
        return str(n)
    value = float(n)
    for unit in _UNITS:
        value /= 1024
        if value < 10:
            shown = math.ceil(value * 10) / 10
            if shown < 10:
                return f"{shown:.1f}{unit}"
            value = shown
        shown_int = math.ceil(value)
        if shown_int < 1024:
            return f"{shown_int}{unit}"
    return f"{math.ceil(value)}E"


# -- modes --------------------------------------------------------------------------------------
TYPE_NAMES = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFSOCK: "socket", stat.S_IFCHR: "char", stat.S_IFBLK: "block",
}
_STAT_TYPE_NAMES = {
    stat.S_IFREG: "regular file", stat.S_IFDIR: "directory", stat.S_IFLNK: "symbolic link",
    stat.S_IFIFO: "fifo", stat.S_IFSOCK: "socket", stat.S_IFCHR: "character special file",
    stat.S_IFBLK: "block special file",
}


def type_name(mode: int) -> str:
    """Short kind of an inode for JSON: file, dir, symlink, fifo, socket, char, block."""
    return TYPE_NAMES.get(stat.S_IFMT(mode), "unknown")


def stat_type_name(mode: int, size: int) -> str:
    """The kind as ``stat(1)`` names it ("regular empty file", "directory", ...)."""
    if stat.S_ISREG(mode) and size == 0:
        return "regular empty file"
    return _STAT_TYPE_NAMES.get(stat.S_IFMT(mode), "weird file")


_MODE_CLAUSE = re.compile(r"([ugoa]*)((?:[-+=](?:[ugo]|[rwxXst]*))+)")
_MODE_ACTION = re.compile(r"([-+=])([ugo]|[rwxXst]*)")
_WHO_BITS = {"u": 0o4700, "g": 0o2070, "o": 0o1007, "a": 0o7777}
_PERM_BITS = {"r": 0o444, "w": 0o222, "x": 0o111, "s": 0o6000, "t": 0o1000}


def apply_mode(spec: str, mode: int, umask: int = 0o022) -> int:
    """The permission bits ``chmod SPEC`` gives a file of ``mode``: octal, or symbolic like ``u+x,go-w``.

    Follows GNU chmod: no ``ugoa`` means all, except bits set in ``umask``; ``X`` is execute
    for directories and for files some class may already execute; ``=`` keeps a directory's
    set-id bits unless ``s`` is named. Raises ValueError for a malformed mode.
    """
    is_dir = stat.S_ISDIR(mode)
    perms = mode & 0o7777
    if re.fullmatch(r"[0-7]{1,5}", spec):
        value = int(spec, 8) & 0o7777
        if is_dir and len(spec) < 5:         # GNU: only 00755 (5 digits) clears a directory's set-id bits
            value |= perms & 0o6000
        return value
    for clause in spec.split(","):
        m = _MODE_CLAUSE.fullmatch(clause)
        if not m:
            raise ValueError(f"invalid mode: {spec!r}")
        who = m[1]
        if not who:
            affected = 0o7777 & ~umask
        else:
            affected = 0
            for w in who:
                affected |= _WHO_BITS[w]
        for op, what in _MODE_ACTION.findall(m[2]):
            bits = _mode_bits(what, perms, is_dir) & affected
            if op == "+":
                perms |= bits
            elif op == "-":
                perms &= ~bits
            else:
                cleared = affected & ~(0o6000 if is_dir and "s" not in what else 0)
                perms = (perms & ~cleared) | bits
    return perms


def _mode_bits(what: str, perms: int, is_dir: bool) -> int:
    """The bits a chmod action names, before it is limited to the classes it applies to."""
    if what in ("u", "g", "o"):                 # copy another class's rwx
        shift = {"u": 6, "g": 3, "o": 0}[what]
        rwx = (perms >> shift) & 0o7
        return rwx << 6 | rwx << 3 | rwx
    bits = 0
    for ch in what:
        if ch == "X":
            if is_dir or perms & 0o111:
                bits |= 0o111
        else:
            bits |= _PERM_BITS[ch]
    return bits


# -- owners -------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=256)
def user_name(uid: int) -> str:
    """This machine's name for ``uid``, or the number."""
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return str(uid)


@functools.lru_cache(maxsize=256)
def group_name(gid: int) -> str:
    """This machine's name for ``gid``, or the number."""
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return str(gid)


def _lookup_uid(text: str) -> int:
    if not text.startswith("+"):
        try:
            return pwd.getpwnam(text).pw_uid
        except KeyError:
            pass
    if text.lstrip("+").isdigit() and int(text.lstrip("+")) < 1 << 32:
        return int(text.lstrip("+"))
    raise ValueError(f"invalid user: {text!r}")


def _lookup_gid(text: str) -> int:
    if not text.startswith("+"):
        try:
            return grp.getgrnam(text).gr_gid
        except KeyError:
            pass
    if text.lstrip("+").isdigit() and int(text.lstrip("+")) < 1 << 32:
        return int(text.lstrip("+"))
    raise ValueError(f"invalid group: {text!r}")


def parse_owner(text: str) -> tuple[int, int]:
    """``(uid, gid)`` from chown's ``USER[:GROUP]``, ``USER:``, ``:GROUP`` (-1 keeps one).

    Names come from this machine's passwd and group databases; numbers are taken as they are
    (a leading ``+`` forces a number). ``USER:`` means the user's login group, as in GNU chown.
    """
    user, sep, group = text.partition(":")
    if not user and not group:
        raise ValueError(f"invalid owner: {text!r}")
    uid = _lookup_uid(user) if user else -1
    if group:
        gid = _lookup_gid(group)
    elif sep:                                        # "user:": the user's login group
        try:
            gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            raise ValueError(f"invalid owner: {text!r} (user {uid} has no login group here)") from None
    else:
        gid = -1
    return uid, gid


# -- dates --------------------------------------------------------------------------------------
_FRACTION = re.compile(r"(.*\d\d:\d\d:\d\d)[.,](\d+)(.*)")


def parse_date(text: str) -> int:
    """Nanoseconds since the epoch from ``touch -d``: ``@SECONDS[.FRACTION]`` or ISO 8601.

    ISO dates without a zone are local time, like touch's; a fraction keeps all nine digits.
    """
    t = text.strip()
    if t.startswith("@"):
        m = re.fullmatch(r"@(-?\d+)(?:\.(\d+))?", t)
        if not m:
            raise ValueError(f"invalid date {text!r}")
        frac = int((m[2] or "0")[:9].ljust(9, "0"))
        sec = int(m[1])
        return sec * 1_000_000_000 + (frac if sec >= 0 else -frac)
    frac_ns = 0
    m = _FRACTION.fullmatch(t)
    if m:
        t = m[1] + m[3]
        frac_ns = int(m[2][:9].ljust(9, "0"))
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    import datetime as _dt  # only dates given on the command line need it

    try:
        when = _dt.datetime.fromisoformat(t)
    except ValueError:
        raise ValueError(f"invalid date {text!r} (use ISO 8601 like 2024-05-01T12:00:00, "
                         "or @SECONDS)") from None
    return round(when.timestamp()) * 1_000_000_000 + frac_ns


def iso_utc(ns: int) -> str:
    """``2024-05-01T12:00:00.123456789Z`` (JSON times)."""
    sec, frac = divmod(ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{frac:09d}Z"


def stat_time(ns: int) -> str:
    """``2024-05-01 12:00:00.123456789 +0200`` (local time), as ``stat(1)`` prints times."""
    sec, frac = divmod(ns, 1_000_000_000)
    t = time.localtime(sec)
    return time.strftime("%Y-%m-%d %H:%M:%S", t) + f".{frac:09d} " + time.strftime("%z", t)


def ls_time(ns: int, now: float | None = None) -> str:
    """``May  1 12:00`` within the last six months, ``May  1  2023`` otherwise, as ``ls -l``."""
    sec = ns // 1_000_000_000
    now = time.time() if now is None else now
    t = time.localtime(sec)
    recent = now - 182.5 * 86400 < sec <= now + 60
    day = f"{t.tm_mday:2d}"
    month = time.strftime("%b", t)
    return f"{month} {day} {time.strftime('%H:%M', t)}" if recent else f"{month} {day}  {t.tm_year}"


def ctime_text(sec: int) -> str:
    """``Tue Nov 24 05:51:08 2026``, or ``n/a`` for 0 (dumpe2fs's dates)."""
    return time.ctime(sec) if sec else "n/a"


# -- entries ------------------------------------------------------------------------------------
#: The keys of an entry in ``ls --json`` and ``stat --json`` (documented in the command's help).
ENTRY_KEYS = ("path", "name", "type", "mode", "permissions", "mode_string", "ino", "nlink", "uid",
              "gid", "user", "group", "size", "blocks", "rdev", "target", "atime", "mtime", "ctime",
              "atime_ns", "mtime_ns", "ctime_ns")


def entry_dict(path: str, st: os.stat_result, target: str | None = None) -> dict[str, Any]:
    """The JSON record of one inode: the same keys for every kind (null where they do not apply)."""
    dev = stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
    name = path.rstrip("/").rpartition("/")[2] or "/"
    return {
        "path": path, "name": name, "type": type_name(st.st_mode), "mode": st.st_mode,
        "permissions": f"{stat.S_IMODE(st.st_mode):04o}", "mode_string": stat.filemode(st.st_mode),
        "ino": st.st_ino, "nlink": st.st_nlink, "uid": st.st_uid, "gid": st.st_gid,
        "user": user_name(st.st_uid), "group": group_name(st.st_gid), "size": st.st_size,
        "blocks": st.st_blocks,
        "rdev": [os.major(st.st_rdev), os.minor(st.st_rdev)] if dev else None,
        "target": target,
        "atime": iso_utc(st.st_atime_ns), "mtime": iso_utc(st.st_mtime_ns), "ctime": iso_utc(st.st_ctime_ns),
        "atime_ns": st.st_atime_ns, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
    }


def ls_long_lines(rows: list[tuple[os.stat_result, str]], human: bool = False,
                  now: float | None = None, acl: list[bool] | None = None) -> list[str]:
    """``ls -l`` lines for ``(stat, shown name)`` pairs, columns aligned as GNU ls aligns them:
    owners by name to the left and by number to the right, a device's major and minor numbers
    in columns of their own, and a ``+`` after the mode of a file with an ACL (``acl``, one flag a
    row; every mode is then 11 wide)."""
    cells = []
    devices = [(str(os.major(st.st_rdev)), str(os.minor(st.st_rdev))) for st, _ in rows
               if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)]
    major_w = max((len(a) for a, _ in devices), default=0)
    minor_w = max((len(b) for _, b in devices), default=0)
    plus = acl is not None and any(acl)
    for i, (st, shown) in enumerate(rows):
        mode = stat.filemode(st.st_mode) + (("+" if acl and acl[i] else " ") if plus else "")
        size = None if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else (
            human_size(st.st_size) if human else str(st.st_size))
        cells.append((mode, str(st.st_nlink), _owner(user_name(st.st_uid), st.st_uid),
                      _owner(group_name(st.st_gid), st.st_gid), size, st.st_rdev,
                      ls_time(st.st_mtime_ns, now), shown))
    if not cells:
        return []
    link_w = max(len(c[1]) for c in cells)
    user_w = max(len(c[2][0]) for c in cells)
    group_w = max(len(c[3][0]) for c in cells)
    size_w = max([len(c[4]) for c in cells if c[4] is not None]
                 + ([major_w + 2 + minor_w] if devices else []))
    lines = []
    for m, n, (u, u_num), (g, g_num), size, rdev, t, name in cells:
        if size is None:             # GNU ls: "%*s, %*s", right-aligned in the size column as a whole
            size = f"{os.major(rdev)}, {os.minor(rdev):>{minor_w}}"
        user = f"{u:>{user_w}}" if u_num else f"{u:<{user_w}}"
        group = f"{g:>{group_w}}" if g_num else f"{g:<{group_w}}"
        lines.append(f"{m} {n:>{link_w}} {user} {group} {size:>{size_w}} {t} {name}")
    return lines


def _owner(name: str, number: int) -> tuple[str, bool]:
    """An owner's text and whether it is the bare number (no name here), which GNU ls aligns right."""
    return name, name == str(number)


def columns(names: list[str], width: int) -> list[str]:
    """Names in columns filled top to bottom, as ``ls -C`` lays them out for a terminal."""
    if not names:
        return []
    lens = [len(n) for n in names]
    count = len(names)
    for ncols in range(min(count, max(1, width // 3)), 0, -1):
        nrows = -(-count // ncols)
        ncols = -(-count // nrows)
        widths = [max(lens[c * nrows:(c + 1) * nrows]) for c in range(ncols)]
        if sum(widths) + 2 * (ncols - 1) <= width or ncols == 1:
            lines = []
            for r in range(nrows):
                parts = []
                for c in range(ncols):
                    i = c * nrows + r
                    if i < count:
                        last = c == ncols - 1 or (c + 1) * nrows + r >= count
                        parts.append(names[i] if last else names[i].ljust(widths[c] + 2))
                lines.append("".join(parts))
            return lines
    return list(names)


def plural(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def to_json(obj: Any) -> str:
    """One JSON document, indented; names that are not valid UTF-8 keep their bytes as \\udcXX escapes."""
    import json

    return json.dumps(obj, indent=2)


# -- ext2/3/4 superblock values, as blkid and dumpe2fs name them ---------------------------------
#: Features an ext3 filesystem may have (libblkid's EXT3_FEATURE_*_SUPP); more makes it ext4.
_EXT3_INCOMPAT = 0x2 | 0x4 | 0x10          # filetype, needs_recovery, meta_bg
_EXT3_RO_COMPAT = 0x1 | 0x2 | 0x4          # sparse_super, large_file, btree_dir


def ext_kind(compat: int, incompat: int, ro_compat: int) -> str:
    """``"ext2"``, ``"ext3"`` or ``"ext4"``, decided from the feature words as blkid decides."""
    if incompat & ~_EXT3_INCOMPAT or ro_compat & ~_EXT3_RO_COMPAT:
        return "ext4"
    return "ext3" if compat & 0x4 else "ext2"


#: e2p_hash2string: the names of s_def_hash_version.
HASH_NAMES = {0: "legacy", 1: "half_md4", 2: "tea", 6: "siphash"}
#: print_super_flags: the bits of s_flags.
SUPER_FLAGS = {0x1: "signed_directory_hash", 0x2: "unsigned_directory_hash", 0x4: "test_filesystem"}


def kbytes_text(kb: int) -> str:
    """``Lifetime writes`` as dumpe2fs prints s_kbytes_written: ``282 kB``, ``13 MB``, ``2 GB``."""
    if kb < 1 << 13:
        return f"{kb} kB"
    for shift, unit in ((10, "MB"), (20, "GB"), (30, "TB")):
        if kb < 1 << (shift + 13):
            return f"{(kb + (1 << (shift - 1))) >> shift} {unit}"
    return f"{(kb + (1 << 39)) >> 40} PB"
