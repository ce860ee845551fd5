"""Pass 1b: mark every block pass 1 found claimed; when some block is claimed twice (or is
metadata and claimed), say by which inodes (e2fsck's pass1b.c, without the cloning)."""

from __future__ import annotations

from itertools import chain, compress

from .. import layout as L
from . import problems as P
from .context import (
    FL_EXTENTS,
    FL_INLINE_DATA,
    FT_OF_TYPE,
    I_BLOCK,
    I_DIND,
    I_FILE_ACL,
    I_FLAGS,
    I_MODE,
    INODE,
    Context,
    ranges,
)
from .ext4 import extent_blocks
from .pass1 import symlink_maps_blocks
from .walk import COLLECT, walk


def run(c: Context) -> None:
    """Mark the claimed blocks in ``used``; report the blocks claimed more than once."""
    used = c.used
    claims = c.claims
    expect = used.count(1) + len(claims)
    for b in claims:
        used[b] = 1
    ones = b"\1" * c.apb
    for a, k in c.runs:
        used[a:a + k] = ones[:k] if k <= c.apb else b"\1" * k
        expect += k
    if used.count(1) == expect:
        return
    meta = c.meta
    seen = bytearray(meta)
    dups = set()
    for b in chain(claims, *(range(a, a + k) for a, k in c.runs)):
        if seen[b]:
            dups.add(b)
        else:
            seen[b] = 1
    for ino in compress(range(len(c.iused)), c.iused):
        mine = sorted({b for b in owned_blocks(c, ino) if b in dups})
        if mine:
            shared = [b for b in mine if meta[b]]
            if shared:
                c.report(P.DUP_BLOCKS_METADATA, ino, mine[0], blocks=ranges(mine), metadata=ranges(shared))
            else:
                c.report(P.DUP_BLOCKS, ino, mine[0], blocks=ranges(mine))


def owned_blocks(c: Context, ino: int) -> list[int]:
    """The blocks pass 1 counted as claimed by inode ``ino`` (walked again, quietly)."""
    t = c.inode_view(ino)
    if t is None:
        return []
    v = INODE.unpack_from(t, 0)
    acl = v[I_FILE_ACL]
    out = [acl] if acl and c.fdb <= acl < c.nblocks else []
    if ino == L.RESIZE_INO:
        dind = v[I_DIND]
        return out + ([dind] if dind else [])
    ft = FT_OF_TYPE[v[I_MODE] >> 12]
    if c.extents and v[I_FLAGS] & FL_EXTENTS:
        return out + extent_blocks(c, bytes(t))
    if c.inline and v[I_FLAGS] & FL_INLINE_DATA:
        return out
    if ino < c.first_ino and ino != L.ROOT_INO:
        mapped = ft == L.FT_REG or ino == 1
    else:
        mapped = ft in (L.FT_REG, L.FT_DIR) or (ft == L.FT_SYMLINK and symlink_maps_blocks(v))
    if mapped:
        out += walk(c, ino, v[I_BLOCK], ft or L.FT_REG, COLLECT).blocks or []
    return out
