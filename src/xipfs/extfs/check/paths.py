"""Paths for the report: each problem about an inode gets the path of a name it has, found
through the parents and names pass 2 recorded (one more read of the directories for the rest)."""

from __future__ import annotations

from .. import layout as L
from .context import Context
from .problems import Problem

_DIRENT = L.DIRENT.struct.unpack_from


def add_paths(c: Context) -> None:
    """Give each problem about an inode the path of a name it has (when one is found)."""
    wanted = {p.ino for p in c.problems if p.ino is not None and p.path is None}
    if not wanted or not len(c.parent):          # pass 2 has not run: no names to give
        return
    found: dict[int, str] = {}
    for ino in wanted:
        path = dir_path(c, ino)
        if path is not None:
            found[ino] = path
    rest = wanted - set(found)
    if rest:
        find_names(c, rest, found)
    c.problems = [Problem(p.code, p.message, p.ino, p.block, found.get(p.ino))
                  if p.ino in found else p for p in c.problems]


def dir_path(c: Context, ino: int) -> str | None:
    """The path of directory ``ino`` through the parents found in pass 2."""
    if ino == L.ROOT_INO:
        return "/"
    parts = []
    seen = set()
    while ino != L.ROOT_INO:
        name = c.names.get(ino)
        if name is None or ino in seen:
            return None
        seen.add(ino)
        parts.append(name.decode("utf-8", "surrogateescape"))
        ino = c.parent[ino]
    return "/" + "/".join(reversed(parts))


def find_names(c: Context, inos: set[int], found: dict[int, str]) -> None:
    """Look for directory entries naming ``inos`` (one more read of the directories)."""
    bs = c.bs
    for d in c.dirs:
        top = dir_path(c, d.ino)
        if top is None:
            continue
        for _lblk, pblk in d.blocks:
            buf = bytes(c.block(pblk))
            pos = 0
            while pos <= bs - 8:
                d_ino, rec_len, nlen, _ft = _DIRENT(buf, pos)
                if rec_len < 12 or pos + rec_len > bs or nlen + 8 > rec_len:
                    break
                if d_ino in inos and d_ino not in found:
                    name = buf[pos + 8:pos + 8 + nlen]
                    if name not in (b".", b".."):
                        found[d_ino] = top.rstrip("/") + "/" + name.decode("utf-8", "surrogateescape")
                pos += rec_len
        if len(found) >= len(inos):
            return
