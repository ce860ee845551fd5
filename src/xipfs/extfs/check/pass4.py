"""Pass 4: link counts against the references pass 2 counted, and (ext4 ea_inode) the reference
counts of EA inodes against the xattr entries pass 1 counted, as e2fsck's pass4.c."""

from __future__ import annotations

from .. import layout as L
from . import problems as P
from .context import FT_NAMES, LINK_MAX, RO_COMPAT_DIR_NLINK, Context


def run(c: Context) -> None:
    """Compare every inode's i_links_count with the entries naming it (the two arrays at once
    when they agree, which is the common case)."""
    iused, itype, refs, links = c.iused, c.itype, c.refs, c.links
    # reserved inodes are not counted; neither are inodes not in use
    for ino in range(1, min(c.first_ino, c.ninodes + 1)):
        if ino != L.ROOT_INO:
            refs[ino] = links[ino] = 0
    if not iused[L.ROOT_INO]:
        refs[L.ROOT_INO] = links[L.ROOT_INO] = 0
    for ino in c.special:                       # the orphan file, quota files: in no directory
        if ino <= c.ninodes:
            refs[ino] = links[ino] = 0
    if c.ea_inodes:
        ea_inodes(c)
    if refs == links and not c.more_refs:
        return
    unused = [ino for ino in range(1, c.ninodes + 1) if refs[ino] != links[ino] and not iused[ino]]
    for ino in unused:
        refs[ino] = links[ino] = 0
    for ino in range(c.first_ino, c.ninodes + 1):
        nlinks, counted = links[ino], refs[ino] + c.more_refs.get(ino, 0)
        if counted == nlinks:
            continue
        count_problem(c, ino, nlinks, counted, itype[ino])
    if refs[L.ROOT_INO] != links[L.ROOT_INO]:
        count_problem(c, L.ROOT_INO, links[L.ROOT_INO], refs[L.ROOT_INO], itype[L.ROOT_INO])


def count_problem(c: Context, ino: int, nlinks: int, counted: int, ft: int) -> None:
    """Inode ``ino`` has ``nlinks`` links and ``counted`` directory entries name it."""
    if counted == 0:
        c.report(P.UNATTACHED_INODE, ino, type=FT_NAMES.get(ft, "?"))
        return
    if ft == L.FT_DIR and counted > LINK_MAX:
        if not c.sb.has_ro_compat(RO_COMPAT_DIR_NLINK):
            c.report(P.DIR_NLINK, ino, most=LINK_MAX)
        counted = 1
        if counted == nlinks:
            return
    c.report(P.LINK_COUNT, ino, nlinks=nlinks, counted=counted)


def ea_inodes(c: Context) -> None:
    """EA inodes no directory entry names (e2fsck's check_ea_inode): one that xattr entries name
    counts as named once, and its stored reference count must be theirs (a legacy Lustre EA
    inode, ``i_ctime == i_atime``, keeps none); one that no entry names stays unattached."""
    refs, more, seen = c.refs, c.more_refs, c.ea_inode_refs
    for ino, ea in c.ea_inodes.items():
        counted = seen.get(ino, 0)
        if not counted or ino > c.ninodes or ino in c.special or refs[ino] or more.get(ino) or (
                ino < c.first_ino and ino != L.ROOT_INO):
            continue
        refs[ino] = 1
        if ea.refcount != counted and not ea.lustre:
            c.report(P.EA_INODE_REFCOUNT, ino, refcount=ea.refcount, seen=counted)
