"""The name operations on their own (``xipfs.extfs.namei``: create, link, unlink, rmdir, rename),
on images in anonymous memory.

After each operation the image is compared with what it must hold: every path's inode number,
link count and type as a second, read-only open of the same memory sees them (nothing cached),
every directory's entries (``.`` and ``..`` included) as ``debugfs ls`` reads them from the
image written out to /dev/shm, and ``e2fsck -fn`` on that image (which recounts every link and
checks every ``..``). Refused operations change nothing at all.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable

import pytest
from e2fs import MemoryImage, debugfs_ls

from xipfs.extfs import namei
from xipfs.extfs.namei import resolve

BLOCK_SIZES = (1024, 4096)
REG = 0o100644
DIR = 0o040755
LNK = 0o120777
LONG = "a-name-long-enough-not-to-fit-where-the-old-one-was-" + "x" * 40

Snapshot = dict[str, tuple[int, int, int]]


# -- helpers ---------------------------------------------------------------------------------------
def node_at(img: MemoryImage, path: str):  # noqa: ANN201 - an Inode
    return resolve(img.vol, path, False)


def create(img: MemoryImage, path: str, mode: int = REG, **kw):  # noqa: ANN201, ANN003
    parent, _, name = path.rpartition("/")
    return namei.create(img.vol, node_at(img, parent or "/"), name.encode(), mode, 0, 0, **kw)


def errno_of(call: Callable[[], object]) -> int | None:
    try:
        call()
    except OSError as err:
        return err.errno
    return None


def snapshot(img: MemoryImage) -> Snapshot:
    """{path: (inode, links, file type)} of the whole tree, read by a fresh read-only open."""
    fs = img.reopen()
    try:
        out: Snapshot = {"/": (fs.lstat("/").st_ino, fs.lstat("/").st_nlink, stat.S_IFDIR)}
        for top, dirs, files in fs.walk("/"):
            for name in dirs + files:
                p = top.rstrip("/") + "/" + name
                st = fs.lstat(p)
                out[p] = (st.st_ino, st.st_nlink, stat.S_IFMT(st.st_mode))
        return out
    finally:
        fs.close()


def free_counts(img: MemoryImage) -> tuple[int, int]:
    st = img.fs.statvfs()
    return st.f_bfree, st.f_ffree


def check_image(img: MemoryImage, snap: Snapshot, name: str = "img") -> None:
    """e2fsck -fn clean; debugfs lists every directory of ``snap`` with exactly its children
    (same inode numbers), ``.`` itself and ``..`` its parent."""
    path = img.check(name)
    for p, (ino, _, fmt) in snap.items():
        if fmt != stat.S_IFDIR:
            continue
        listed = debugfs_ls(path, ino)
        parent = snap[os.path.dirname(p)][0] if p != "/" else ino
        want = {os.path.basename(c).encode(): v[0] for c, v in snap.items()
                if c != "/" and os.path.dirname(c) == p}
        want.update({b".": ino, b"..": parent})
        assert {n: i for n, (i, _) in listed.items()} == want, f"debugfs lists {p} otherwise"


def base_tree(img: MemoryImage) -> None:
    for p, mode in [("/d1", DIR), ("/d1/f", REG), ("/d1/sub", DIR), ("/d1/full", DIR), ("/d1/full/x", REG),
                    ("/d2", DIR), ("/d2/g", REG), ("/d2/empty", DIR), ("/d2/empty2", DIR), ("/f2", REG)]:
        create(img, p, mode)


# -- create ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_create_every_kind(mem_image, bs: int) -> None:
    img = mem_image(bs)
    root = img.vol.root
    links0 = root.links
    f = create(img, "/f")
    d = create(img, "/d", DIR)
    fast = create(img, "/fast", LNK, target=b"f")
    slow = create(img, "/slow", LNK, target=b"t" * 100)
    fifo = create(img, "/fifo", stat.S_IFIFO | 0o644)
    chr_ = create(img, "/chr", stat.S_IFCHR | 0o600, rdev=(1, 3))
    assert (f.links, d.links, fast.links, slow.links, fifo.links, chr_.links) == (1, 2, 1, 1, 1, 1)
    assert root.links == links0 + 1                      # the new directory's ".."
    inner = create(img, "/d/inner", DIR)
    assert d.links == 3 and inner.links == 2 and root.links == links0 + 1
    snap = snapshot(img)
    assert snap["/d"] == (d.ino, 3, stat.S_IFDIR) and snap["/d/inner"] == (inner.ino, 2, stat.S_IFDIR)
    assert snap["/f"] == (f.ino, 1, stat.S_IFREG) and snap["/"][1] == links0 + 1
    assert snap["/fast"][2] == snap["/slow"][2] == stat.S_IFLNK
    fs = img.reopen()
    try:
        assert fs.readlink("/fast") == "f" and fs.readlink("/slow") == "t" * 100
        assert os.major(fs.lstat("/chr").st_rdev) == 1 and os.minor(fs.lstat("/chr").st_rdev) == 3
    finally:
        fs.close()
    check_image(img, snap)


@pytest.mark.parametrize("bs", [1024])
def test_create_refusals(mem_image, bs: int) -> None:
    img = mem_image(bs)
    create(img, "/f")
    create(img, "/d", DIR)
    snap, free = snapshot(img), free_counts(img)
    assert errno_of(lambda: create(img, "/f")) == errno.EEXIST
    assert errno_of(lambda: create(img, "/d", DIR)) == errno.EEXIST
    assert errno_of(lambda: create(img, "/" + "n" * 256)) == errno.ENAMETOOLONG
    assert errno_of(lambda: namei.create(img.vol, img.vol.root, b"a/b", REG, 0, 0)) == errno.EINVAL
    d = node_at(img, "/d")
    saved = d.links
    d.links = namei.LINK_MAX                               # (in memory only)
    try:
        assert errno_of(lambda: create(img, "/d/sub", DIR)) == errno.EMLINK
    finally:
        d.links = saved
    assert snapshot(img) == snap and free_counts(img) == free
    check_image(img, snap)


# -- link, unlink, rmdir -----------------------------------------------------------------------------
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_link_and_unlink(mem_image, bs: int) -> None:
    img = mem_image(bs)
    vol = img.vol
    free0 = free_counts(img)
    create(img, "/d", DIR)
    f = create(img, "/f", content=memoryview(b"z" * (3 * bs)))
    d = node_at(img, "/d")
    namei.link(vol, f, d, b"f2")
    assert f.links == 2
    snap = snapshot(img)
    assert snap["/f"] == snap["/d/f2"] == (f.ino, 2, stat.S_IFREG)
    check_image(img, snap, "linked")
    assert errno_of(lambda: namei.link(vol, f, d, b"f2")) == errno.EEXIST
    assert errno_of(lambda: namei.link(vol, d, vol.root, b"dlink")) == errno.EPERM
    f.links = namei.LINK_MAX
    try:
        assert errno_of(lambda: namei.link(vol, f, d, b"f3")) == errno.EMLINK
    finally:
        f.links = 2
    assert snapshot(img) == snap
    assert errno_of(lambda: namei.unlink(vol, vol.root, b"d")) == errno.EISDIR
    assert errno_of(lambda: namei.unlink(vol, vol.root, b"nothing")) == errno.ENOENT
    assert snapshot(img) == snap
    namei.unlink(vol, vol.root, b"f")
    snap = snapshot(img)
    assert "/f" not in snap and snap["/d/f2"] == (f.ino, 1, stat.S_IFREG)
    check_image(img, snap, "one-left")
    namei.unlink(vol, d, b"f2")                            # the last name: inode and blocks go
    snap = snapshot(img)
    assert "/d/f2" not in snap
    blocks, inodes = free_counts(img)
    assert (blocks, inodes + 1) == (free0[0] - 1, free0[1])   # only /d (its block and inode) is left
    check_image(img, snap, "gone")


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_rmdir(mem_image, bs: int) -> None:
    img = mem_image(bs)
    vol = img.vol
    free0 = free_counts(img)
    links0 = vol.root.links
    create(img, "/d", DIR)
    create(img, "/d/e", DIR)
    create(img, "/d/f")
    d = node_at(img, "/d")
    snap = snapshot(img)
    assert errno_of(lambda: namei.rmdir(vol, vol.root, b"d")) == errno.ENOTEMPTY
    assert errno_of(lambda: namei.rmdir(vol, d, b"f")) == errno.ENOTDIR
    assert errno_of(lambda: namei.rmdir(vol, d, b".")) == errno.EINVAL
    assert errno_of(lambda: namei.rmdir(vol, d, b"..")) == errno.ENOTEMPTY
    assert errno_of(lambda: namei.rmdir(vol, d, b"none")) == errno.ENOENT
    assert snapshot(img) == snap
    namei.rmdir(vol, d, b"e")
    assert d.links == 2
    snap = snapshot(img)
    assert "/d/e" not in snap and snap["/d"][1] == 2
    check_image(img, snap, "e")
    namei.unlink(vol, d, b"f")
    namei.rmdir(vol, vol.root, b"d")
    assert vol.root.links == links0
    assert free_counts(img) == free0
    snap = snapshot(img)
    assert set(snap) == {"/", "/lost+found"}
    check_image(img, snap, "d")


# -- rename ----------------------------------------------------------------------------------------
#: name: (setup, source, target, expected): ``expected`` is an errno, or (moved {old: new}, paths
#: gone, {path: link count} afterwards, inodes freed). The tree: /d1/{f, sub/, full/x}, /d2/{g,
#: empty/, empty2/}, /f2.
RENAMES: dict[str, tuple] = {
    "file in place": (None, "/d1/f", "/d1/h", ({"/d1/f": "/d1/h"}, [], {}, 0)),
    "file, longer name": (None, "/d1/f", "/d1/" + LONG, ({"/d1/f": "/d1/" + LONG}, [], {}, 0)),
    "file to another dir": (None, "/d1/f", "/d2/f", ({"/d1/f": "/d2/f"}, [], {}, 0)),
    "file replaces a file": (None, "/d1/f", "/f2", ({"/d1/f": "/f2"}, ["/f2"], {}, 1)),
    "file replaces a file with another link": (
        ("link", "/f2", "/d2/h"), "/d1/f", "/f2", ({"/d1/f": "/f2"}, ["/f2"], {"/d2/h": 1}, 0)),
    "file onto another link of itself": (("link", "/d1/f", "/d1/hl"), "/d1/f", "/d1/hl", ({}, [], {}, 0)),
    "dir in place": (None, "/d1/sub", "/d1/s", ({"/d1/sub": "/d1/s"}, [], {}, 0)),
    "dir, longer name": (None, "/d1/sub", "/d1/" + LONG, ({"/d1/sub": "/d1/" + LONG}, [], {}, 0)),
    "dir to another parent": (None, "/d1/full", "/d2/full",
                              ({"/d1/full": "/d2/full"}, [], {"/d1": 3, "/d2": 5}, 0)),
    "dir to the root": (None, "/d1/sub", "/sub", ({"/d1/sub": "/sub"}, [], {"/d1": 3, "/": 6}, 0)),
    "dir replaces an empty dir, same parent": (
        None, "/d2/empty2", "/d2/empty", ({"/d2/empty2": "/d2/empty"}, ["/d2/empty"], {"/d2": 3}, 1)),
    "dir replaces an empty dir, other parent": (
        None, "/d1/full", "/d2/empty", ({"/d1/full": "/d2/empty"}, ["/d2/empty"], {"/d1": 3}, 1)),
    "file onto a dir": (None, "/d1/f", "/d2/empty", errno.EISDIR),
    "dir onto a file": (None, "/d1/sub", "/f2", errno.ENOTDIR),
    "dir onto a non-empty dir": (None, "/d1/sub", "/d1/full", errno.ENOTEMPTY),
    "dir into itself": (None, "/d1", "/d1/y", errno.EINVAL),
    "dir into its own subtree": (None, "/d1", "/d1/sub/y", errno.EINVAL),
    "onto an ancestor of the source": (None, "/d1/full/x", "/d1", errno.ENOTEMPTY),
    "dir into a parent at LINK_MAX": (("maxlinks", "/d2"), "/d1/sub", "/d2/sub", errno.EMLINK),
    "missing source": (None, "/d1/nothing", "/d2/x", errno.ENOENT),
}


def expected_after(before: Snapshot, moved: dict[str, str], gone: list[str],
                   links: dict[str, int]) -> Snapshot:
    after = {p: v for p, v in before.items() if p not in gone}
    for old, new in moved.items():
        for p in [p for p in after if p == old or p.startswith(old + "/")]:
            after[new + p[len(old):]] = after.pop(p)
    for p, n in links.items():
        after[p] = (after[p][0], n, after[p][2])
    return after


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("case", list(RENAMES))
def test_rename(mem_image, bs: int, case: str) -> None:
    setup, src, dst, expected = RENAMES[case]
    img = mem_image(bs)
    vol = img.vol
    base_tree(img)
    if setup and setup[0] == "link":
        namei.link(vol, node_at(img, setup[1]), node_at(img, os.path.dirname(setup[2])),
                   os.path.basename(setup[2]).encode())
    before = snapshot(img)
    free = free_counts(img)
    sd, dd = node_at(img, os.path.dirname(src)), node_at(img, os.path.dirname(dst))
    saved = None
    if setup and setup[0] == "maxlinks":
        held = node_at(img, setup[1])
        saved, held.links = held.links, namei.LINK_MAX    # (in memory only)

    def call() -> None:
        namei.rename(vol, sd, os.path.basename(src).encode(), dd, os.path.basename(dst).encode())

    try:
        err = errno_of(call)
    finally:
        if saved is not None:
            held.links = saved
    if isinstance(expected, int):
        assert err == expected
        assert snapshot(img) == before and free_counts(img) == free   # nothing changed
        check_image(img, before)
        return
    assert err is None
    moved, gone, links, freed = expected
    after = snapshot(img)
    assert after == expected_after(before, moved, gone, links)
    assert free_counts(img)[1] == free[1] + freed             # a replaced inode with no link left goes
    check_image(img, after)
