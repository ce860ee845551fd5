"""pack -t ext4 laid out for DAX (issue 15): ``dax=True`` / ``--dax`` flags every directory and
regular file with EXT4_DAX_FL (what ``chattr +x`` sets; symlinks and devices never carry it), the
image stays e2fsck-clean and Linux shows the flag; every packed file that holds a whole 2 MiB
piece starts 2 MiB-aligned (``fs.huge_runs`` covers all its whole pieces), with or without
``dax``; ``dax`` is refused on ext2 and with blocks other than the page size."""

from __future__ import annotations

import mmap
import os
import shutil
import stat
import tempfile

import pytest
from conftest import mounted
from e2fs import SHM, assert_fsck_clean, debugfs, run

import xipfs
from xipfs import cli
from xipfs.tools.pack4 import FL_DAX, pack4

MIB = 1 << 20
#: Blocks in 2 MiB at 4 KiB.
PER = (2 * MIB) // 4096
#: path -> size of the regular files of the tree (names sort so that a small file comes first).
FILES = {"/a_small": 5000, "/b_mid": 3 * MIB + 123, "/d/big": 9 * MIB + 7, "/d/e/exact": 2 * MIB,
         "/d/under": 2 * MIB - 4096, "/z_after": 70_000}
DIRS = ["/", "/d", "/d/e", "/lost+found"]


@pytest.fixture
def work(request):
    path = os.path.join(SHM, "packdax-" + request.node.name.replace("/", "_")[:60])
    shutil.rmtree(path, ignore_errors=True)
    src = os.path.join(path, "src")
    os.makedirs(os.path.join(src, "d", "e"))
    for name, size in FILES.items():
        with open(src + name, "wb") as f:
            f.write(os.urandom(size))
    os.symlink("a_small", os.path.join(src, "short_link"))
    os.symlink("x" * 100, os.path.join(src, "d", "long_link"))       # a block of its own
    os.mkfifo(os.path.join(src, "fifo"))
    yield path, src
    shutil.rmtree(path, ignore_errors=True)


def _flags(img: str, paths: list[str]) -> dict[str, int]:
    """i_flags of each path, as ``debugfs stat`` prints them (one debugfs run)."""
    out = debugfs(img, *[f'stat "{p}"' for p in paths]).decode(errors="replace")
    flags: dict[str, int] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("debugfs: stat "):
            current = line[len('debugfs: stat "'):-1]
        elif current is not None and "Flags: 0x" in line:
            flags[current] = int(line.split("Flags: ")[1].split()[0], 16)
            current = None
    assert set(flags) == set(paths), out
    return flags


def _assert_huge(fs: xipfs.Filesystem, path: str, size: int) -> None:
    """Every whole 2 MiB piece of ``path`` is in a run ``fs.huge_runs`` reports."""
    whole = size // 4096 // PER * PER
    assert sum(n for _, n, _ in fs.huge_runs(path)) == whole, (path, fs.block_runs(path))


def test_dax_flags_every_directory_and_regular_file(work):
    """``dax=True``: EXT4_DAX_FL on directories (new files inherit it under Linux) and regular
    files, never on symlinks or FIFOs; e2fsck finds the image clean and xipfs reads it back."""
    path, src = work
    img = os.path.join(path, "dax.img")
    xipfs.pack(src, img, fs_type="ext4", dax=True)
    assert_fsck_clean(img)
    flags = _flags(img, [*DIRS, *FILES, "/short_link", "/d/long_link", "/fifo"])
    for p in [*DIRS, *FILES]:
        assert flags[p] & FL_DAX, (p, hex(flags[p]))
    for p in ("/short_link", "/d/long_link", "/fifo"):
        assert not flags[p] & FL_DAX, (p, hex(flags[p]))
    with xipfs.open(img) as fs:
        for p in FILES:
            with open(src + p, "rb") as f:
                assert fs.read_bytes(p) == f.read(), p
        assert fs.readlink("/d/long_link") == "x" * 100
        assert stat.S_ISFIFO(fs.lstat("/fifo").st_mode)


def test_no_dax_flag_without_dax_but_aligned_all_the_same(work):
    """Without ``dax`` no inode carries the flag, and the big files are 2 MiB-aligned anyway."""
    path, src = work
    img = os.path.join(path, "plain.img")
    xipfs.pack(src, img, fs_type="ext4")
    flags = _flags(img, [*DIRS, *FILES])
    assert not any(f & FL_DAX for f in flags.values()), flags
    with xipfs.open(img) as fs:
        for p, size in FILES.items():
            _assert_huge(fs, p, size)


def test_huge_runs_cover_every_big_packed_file(work):
    """Each file that holds a whole 2 MiB piece starts at a 2 MiB-aligned block even when a small
    file comes first in the tree; the blocks skipped are filled by what follows (the image grows
    by less than 2 MiB over the unaligned layout, and a small file later in the tree sits before
    the big ones)."""
    path, src = work
    img, loose = os.path.join(path, "aligned.img"), os.path.join(path, "loose.img")
    aligned = xipfs.pack(src, img, fs_type="ext4", dax=True)
    unaligned = pack4(src, loose, align=False)
    assert_fsck_clean(img)
    assert_fsck_clean(loose)
    assert aligned.size - unaligned.size < 2 * MIB
    with xipfs.open(img) as fs:
        for p, size in FILES.items():
            _assert_huge(fs, p, size)
            if size >= 2 * MIB:
                assert fs.block_runs(p)[0][2] % PER == 0, (p, fs.block_runs(p))
        first_big = min(fs.block_runs(p)[0][2] for p, size in FILES.items() if size >= 2 * MIB)
        assert fs.block_runs("/z_after")[0][2] < first_big          # it filled the skipped blocks
    with xipfs.open(loose) as fs:                                   # the unaligned layout is not
        assert any(fs.huge_runs(p) == [] for p, size in FILES.items() if size >= 2 * MIB)


def test_a_tight_size_packs_unaligned_rather_than_failing(work):
    """With a ``size`` that holds the tree but not its alignment, pack aligns what room allows
    (the biggest files first, here not all) rather than failing: clean, every byte back."""
    path, src = work
    loose = os.path.join(path, "loose.img")
    size = pack4(src, loose, align=False, extra=0).size
    for _ in range(64):                         # the smallest size (64 KiB steps) it fits unaligned
        try:
            pack4(src, loose, align=False, size=size)
            break
        except OSError:
            size += 64 << 10
    img = os.path.join(path, "tight.img")
    xipfs.pack(src, img, fs_type="ext4", size=size, dax=True)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert any(fs.huge_runs(p) == [] for p, n in FILES.items() if n >= 2 * MIB)
        for p in FILES:
            with open(src + p, "rb") as f:
                assert fs.read_bytes(p) == f.read(), p


def _dax_inode_mounts(img: str) -> bool:
    """Whether Linux loop-mounts ``img`` with ``-o dax=inode`` here (as root; else False)."""
    if os.geteuid() != 0:
        return False
    mnt = tempfile.mkdtemp(prefix="xipfs-daxmnt-")
    try:
        proc = run(["mount", "-o", "loop,ro,dax=inode", "-t", "ext4", img, mnt], check=False, timeout=60)
        if proc.returncode == 0:
            run(["umount", mnt], timeout=60)
        return proc.returncode == 0
    finally:
        os.rmdir(mnt)


def test_linux_shows_the_dax_flag(work):
    """A Linux loop mount with ``dax=inode`` (plain ``ro`` if that is refused) lists every file
    and directory with ``x`` in ``lsattr`` (a loop device has no DAX, so Linux does not map them
    with DAX; the flag is what a DAX device would honour)."""
    path, src = work
    img = os.path.join(path, "dax.img")
    xipfs.pack(src, img, fs_type="ext4", dax=True)
    options = "ro,dax=inode" if _dax_inode_mounts(img) else "ro"
    with mounted(img, "ext4", options) as mnt:
        paths = [mnt + p for p in [*DIRS, *FILES]]
        out = run(["lsattr", "-d", *paths]).stdout.decode()
        lines = out.splitlines()
        assert len(lines) == len(paths), out
        for line in lines:
            assert "x" in line.split()[0], line


def test_cli_pack_dax(work, capsys):
    """``xipfs pack -t ext4 --dax`` sets the flag; ``--dax`` without ``-t ext4`` is a usage error."""
    path, src = work
    img = os.path.join(path, "cli.img")
    assert cli.main(["pack", "-t", "ext4", "--dax", src, img]) == 0
    assert_fsck_clean(img)
    flags = _flags(img, ["/", "/d/big"])
    assert all(f & FL_DAX for f in flags.values())
    capsys.readouterr()
    ext2 = os.path.join(path, "cli2.img")
    assert cli.main(["pack", "--dax", src, ext2]) == 2
    err = capsys.readouterr().err
    assert "--dax" in err and "ext4" in err
    assert not os.path.exists(ext2)


def test_dax_refused_on_ext2_and_small_blocks(work):
    """``dax=True`` on ext2 (no such flag) or with blocks unlike the page size (Linux turns DAX
    off) is a ValueError, before the image is touched."""
    path, src = work
    img = os.path.join(path, "no.img")
    with pytest.raises(ValueError, match="dax"):
        xipfs.pack(src, img, dax=True)
    with pytest.raises(ValueError, match="dax"):
        xipfs.pack(src, img, fs_type="ext2", dax=True)
    if mmap.PAGESIZE != 1024:
        with pytest.raises(ValueError, match="dax"):
            xipfs.pack(src, img, fs_type="ext4", dax=True, block_size=1024)
    assert not os.path.exists(img)


@pytest.mark.parametrize("bs", [1024, 4096])
def test_alignment_with_other_block_sizes(work, bs):
    """2 MiB alignment holds in blocks of any size (2048 blocks of 1 KiB)."""
    path, src = work
    img = os.path.join(path, f"bs{bs}.img")
    xipfs.pack(src, img, fs_type="ext4", block_size=bs)
    assert_fsck_clean(img)
    per = 2 * MIB // bs
    with xipfs.open(img) as fs:
        for p, size in FILES.items():
            whole = size // bs // per * per
            assert sum(n for _, n, _ in fs.huge_runs(p)) == whole, (p, fs.block_runs(p))


def test_xipfs_writes_inherit_the_dax_flag(work, monkeypatch):
    """Files and directories xipfs makes under a DAX directory take the flag, as Linux's
    (``EXT4_FL_INHERITED``); symlinks and other non-directories do not."""
    from xipfs.extfs import layout as L

    monkeypatch.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.EXT4_INCOMPAT_WRITABLE)
    monkeypatch.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.EXT4_RO_COMPAT_WRITABLE)
    path, src = work
    img = os.path.join(path, "dax.img")
    xipfs.pack(src, img, fs_type="ext4", dax=True)
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/d/new", b"y" * 100)                # the create fast path
        fs.mkdir("/d/newdir")
        fs.write_bytes("/d/newdir/deep", os.urandom(3 * MIB))
        fs.symlink("new", "/d/ln")
        fs.mkfifo("/d/pipe")
    assert_fsck_clean(img)
    flags = _flags(img, ["/d/new", "/d/newdir", "/d/newdir/deep", "/d/ln", "/d/pipe"])
    for p in ("/d/new", "/d/newdir", "/d/newdir/deep"):
        assert flags[p] & FL_DAX, (p, hex(flags[p]))
    for p in ("/d/ln", "/d/pipe"):
        assert not flags[p] & FL_DAX, (p, hex(flags[p]))
