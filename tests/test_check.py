"""``check_volume`` against ``e2fsck -fn``: clean images give no problem, damaged ones the problem
e2fsck finds, and no image makes the check crash or hang.

* clean: the standard generated tree (every kind of file, xattrs, sparse files up to the triple
  indirect block) packed by ``mke2fs -d`` at every block size and inode size, the same images
  with their directories htree-indexed by ``e2fsck -fyD`` (one and two index levels), and images
  xipfs itself wrote (files created, grown, truncated, renamed, linked, removed);
* damaged: one named damage per image (``check_util.DAMAGES``: bitmaps, free counts, link counts,
  blocks claimed twice, directory entries, connectivity, sizes, block pointers, xattrs, group
  descriptors, the resize inode...); e2fsck must report it in its own words and check_volume with
  a problem of the matching code;
* hostile: seeded random corruption of every kind of metadata, block maps that loop, directory
  trees that loop: only problems or CorruptImageError, within a time bound.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import struct
import tempfile
from collections.abc import Iterator

import check_util as ck
import corrupt_util as cu
import pytest
from e2fs import debugfs_r, e2fsck, fsck, run

import xipfs
from xipfs.device import MemoryDevice, open_device
from xipfs.extfs.check import MINOR_CODES, Problem, check_device, check_volume

pytestmark = pytest.mark.skipif(shutil.which("e2fsck") is None, reason="needs e2fsprogs")

BASE_SIZES = (1024, 4096)


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xipfs-check-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def bases(workdir: str) -> dict[int, cu.BaseImage]:
    return {bs: cu.build_image(workdir, bs) for bs in BASE_SIZES}


def assert_both_clean(path: str) -> None:
    rc, out = fsck(path)
    assert not ck.fsck_found(rc, out), f"e2fsck -fn finds problems:\n{out}"
    problems = ck.check_image(path)
    assert problems == [], problems
    # the same through the file device (page cache) and through check_device
    with xipfs.open(path, xip=False) as fs:
        assert check_volume(fs.volume, progress=False) == []
    dev = open_device(path, readonly=True)
    try:
        assert check_device(dev, progress=False) == []
    finally:
        dev.close()


# -- clean images ---------------------------------------------------------------------------------
def test_tree_images_are_clean(tree_image) -> None:
    """mke2fs -d of the standard tree, every block size and inode size: nothing to report."""
    assert_both_clean(tree_image.path)


def test_htree_indexed_images_are_clean(tree_image, workdir: str) -> None:
    """The same images with every directory of 3+ blocks htree-indexed by e2fsck -fyD."""
    path = os.path.join(workdir, f"htree-{tree_image.bs}-{tree_image.isize}.img")
    shutil.copyfile(tree_image.path, path)
    try:
        assert e2fsck(path, "-fyD")[0] in (0, 1)
        htree = debugfs_r(path, "htree /names/many").decode()
        assert "Root node dump" in htree, "no htree index was built"
        assert_both_clean(path)
    finally:
        os.unlink(path)


def test_two_level_htree_is_clean(workdir: str) -> None:
    """A directory big enough for an htree of two index levels (1 KiB blocks)."""
    src = os.path.join(workdir, "bigdir-src")
    os.makedirs(os.path.join(src, "big"))
    for i in range(4000):
        open(os.path.join(src, "big", f"a-rather-long-file-name-{i:05d}"), "wb").close()
    path = os.path.join(workdir, "bigdir.img")
    try:
        assert run(["mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-d", src, path, "16M"],
                   check=False, timeout=300).returncode == 0
        assert e2fsck(path, "-fyD")[0] in (0, 1)
        assert "Indirect levels: 1" in debugfs_r(path, "htree /big").decode()
        assert_both_clean(path)
    finally:
        shutil.rmtree(src)
        os.unlink(path)


FEATURE_VARIANTS = [("-r", "0"), ("-O", "none"), ("-O", "^filetype"), ("-O", "^sparse_super,^resize_inode"),
                    ("-O", "^ext_attr"), ("-I", "512", "-b", "2048"), ("-E", "resize=2000000", "-b", "1024"),
                    ("-b", "65536")]


@pytest.mark.parametrize("opts", FEATURE_VARIANTS, ids=[" ".join(o) for o in FEATURE_VARIANTS])
def test_feature_variants_are_clean(tree_src, workdir: str, opts: tuple[str, ...]) -> None:
    """ext2 as mke2fs makes it with features off (or revision 0), other inode and block sizes."""
    path = os.path.join(workdir, "variant.img")
    src = () if opts == ("-r", "0") else ("-d", os.fsdecode(tree_src[0]))
    try:
        proc = run(["mke2fs", "-q", "-F", "-t", "ext2", *opts, *src, path, "64M"], check=False, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert_both_clean(path)
    finally:
        os.unlink(path)


def test_file_type_without_the_feature(tree_src, workdir: str) -> None:
    """Without the filetype feature an entry's type byte must be 0: both checkers say so."""
    path = os.path.join(workdir, "noft.img")
    assert run(["mke2fs", "-q", "-F", "-t", "ext2", "-b", "1024", "-O", "^filetype", "-d",
                os.fsdecode(tree_src[0]), path, "40M"], check=False, timeout=300).returncode == 0
    try:
        with open(path, "rb") as f:
            data = bytearray(f.read())
        first = int(debugfs_r(path, "blocks /").decode().split()[0])
        pos = first * 1024
        while struct.unpack_from("<HB", data, pos + 4)[1] != 5 or data[pos + 8:pos + 13] != b"empty":
            pos += struct.unpack_from("<H", data, pos + 4)[0]
        data[pos + 7] = 1
        with open(path, "wb") as f:
            f.write(data)
        rc, out = fsck(path)
        assert rc & 4 and "has filetype set" in out, out
        assert ck.codes(ck.check_image(path)) == {"file_type"}
    finally:
        os.unlink(path)


def test_extents_flag_on_a_plain_ext2_file(workdir: str) -> None:
    """A plain file (direct blocks only) flagged EXTENTS on ext2: found by both checkers (the
    piece-at-a-time path for plain files must hand it to pass 1)."""
    src = os.path.join(workdir, "xf-src")
    os.makedirs(src, exist_ok=True)
    with open(os.path.join(src, "f"), "wb") as f:
        f.write(b"x" * 3000)
    path = os.path.join(workdir, "xf.img")
    run(["mke2fs", "-q", "-F", "-t", "ext2", "-d", src, path, "4M"], timeout=120)
    try:
        debugfs_r(path, "set_inode_field /f flags 0x80000", write=True)
        rc, out = fsck(path)
        assert rc & 4 and "EXTENTS_FL flag set" in out, out
        assert ck.codes(ck.check_image(path)) == {"bad_flags"}
    finally:
        os.unlink(path)


@pytest.mark.parametrize("bs", [1024, 4096])
def test_images_xipfs_wrote_are_clean(workdir: str, bs: int) -> None:
    """xipfs.mkfs, then files of every size written, truncated, renamed, linked and removed."""
    path = os.path.join(workdir, f"written-{bs}.img")
    xipfs.mkfs(path, 24 << 20, block_size=bs, inode_size=128 if bs == 1024 else 256)
    rnd = random.Random(bs)
    try:
        with xipfs.open(path, "r+") as fs:
            fs.makedirs("/a/b/c")
            sizes = [0, 1, 100, bs, bs + 1, 12 * bs, 13 * bs, 40 * bs]
            for i in range(200):
                fs.write_bytes(f"/a/f{i}", rnd.randbytes(rnd.choice(sizes)))
            fs.write_bytes("/a/dind", rnd.randbytes((12 + bs // 4) * bs + 1))   # into the double indirect
            for i in range(0, 200, 3):
                fs.unlink(f"/a/f{i}")
            for i in range(1, 200, 3):
                fs.rename(f"/a/f{i}", f"/a/b/g{i}")
            fs.link("/a/f2", "/a/b/c/hard")
            fs.symlink("x" * 30, "/a/fast")
            fs.symlink("y" * 300, "/a/slow")
            fs.mkfifo("/a/fifo")
            fs.setxattr("/a/f2", "user.big", b"v" * 300)
            fs.setxattr("/a/f5", "user.small", b"v")
            with fs.open("/sparse", "wb") as f:
                f.seek(5 << 20)
                f.write(b"end")
            fs.truncate("/a/f5", 3)
            fs.mkdir("/d")
            for i in range(300):
                fs.write_bytes(f"/d/n{i:04d}", b"")
            for i in range(0, 300, 2):
                fs.unlink(f"/d/n{i:04d}")
            # a volume open for writing is synced before it is checked
            assert check_volume(fs.volume, progress=False) == []
        assert_both_clean(path)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("bs", [1024, 4096])
def test_interleaved_files_are_clean(workdir: str, bs: int) -> None:
    """Files past their direct blocks whose blocks interleave (grown in turns) beside contiguous
    ones in the same piece of inode table: the whole-piece path takes some, the per-inode checks
    the others, and every block is claimed once."""
    path = os.path.join(workdir, f"interleaved-{bs}.img")
    xipfs.mkfs(path, 8 << 20, block_size=bs)
    try:
        with xipfs.open(path, "r+") as fs:
            fs.write_bytes("/whole", bytes(20 * bs))
            with fs.open("/x", "wb") as x, fs.open("/y", "wb") as y:
                for _ in range(20):
                    x.write(b"x" * bs)
                    x.flush()
                    y.write(b"y" * bs)
                    y.flush()
            fs.write_bytes("/after", bytes(30 * bs))
        blocks = [int(b) for b in debugfs_r(path, "blocks /x").split()]
        assert blocks[1] != blocks[0] + 1, "the files did not interleave"
        assert_both_clean(path)
    finally:
        os.unlink(path)


def test_base_images_are_clean(bases: dict[int, cu.BaseImage]) -> None:
    for base in bases.values():
        assert_both_clean(base.path)


# -- damaged images -------------------------------------------------------------------------------
CASES = [(bs, d) for bs in BASE_SIZES for d in ck.DAMAGES if d.block_sizes is None or bs in d.block_sizes]


@pytest.mark.parametrize(("bs", "damage"), CASES, ids=[f"bs{bs}-{d.name}" for bs, d in CASES])
def test_damage_found_by_both(bases: dict[int, cu.BaseImage], workdir: str, bs: int,
                              damage: ck.Damage) -> None:
    """e2fsck -fn reports the damage (in its words) and check_volume a problem of its kind."""
    base = bases[bs]
    path = os.path.join(workdir, f"damaged-{bs}.img")
    try:
        ck.apply_damage(base, damage, path)
    except AssertionError as err:
        pytest.skip(f"this base image has nothing to damage so: {err}")
    rc, out = fsck(path)
    assert re.search(damage.fsck, out), f"e2fsck -fn does not report {damage.fsck!r}:\n{out}"
    problems = ck.check_image(path)
    found = ck.codes(problems)
    assert found & damage.codes, f"expected one of {sorted(damage.codes)}, got {problems}"
    if found <= MINOR_CODES:
        assert rc == 0, out            # e2fsck reports these but does not count them as errors
    else:
        assert rc & (4 | 8), f"e2fsck -fn exited {rc}:\n{out}"
    for p in problems:
        assert isinstance(p, Problem) and p.code and p.message


@pytest.mark.parametrize("bs", BASE_SIZES)
def test_small_pieces_of_inode_table(bases: dict[int, cu.BaseImage], workdir: str, bs: int,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Inode tables read a few inodes at a time (reserved inodes spread over several pieces)
    give the same problems as whole groups at a time."""
    import xipfs.extfs.check as check_module

    base = bases[bs]
    path = os.path.join(workdir, f"pieces-{bs}.img")
    for damage in ck.DAMAGES[:12] + [d for d in ck.DAMAGES if "resize" in d.name or "mode" in d.name]:
        ck.apply_damage(base, damage, path)
        whole = ck.check_image(path)
        monkeypatch.setattr(check_module, "PIECE_BYTES", 4 * base.isize)
        assert ck.check_image(path) == whole, damage.name
        monkeypatch.undo()
        assert ck.codes(whole) & damage.codes


#: (what, offset in the index root block, struct code, value): count and limit at 32, the entries
#: (hash, block) from 32 (the first one's hash is the count and limit), the depth at 30.
HTREE_DAMAGES = [("limit", 32, "H", 100), ("count", 34, "H", 300), ("hash order", 48, "I", 6),
                 ("depth", 30, "B", 5), ("block past the end", 44, "I", 99)]


@pytest.fixture(scope="module")
def htree_image(bases: dict[int, cu.BaseImage], workdir: str) -> tuple[str, int]:
    """The 1 KiB base image with /dir (3 blocks) htree-indexed by e2fsck -fyD: (path, /dir's
    first block, which holds the index root)."""
    path = os.path.join(workdir, "htree-base.img")
    shutil.copyfile(bases[1024].path, path)
    assert e2fsck(path, "-fyD")[0] in (0, 1)
    assert "Root node dump" in debugfs_r(path, "htree /dir").decode()
    assert_both_clean(path)
    return path, int(debugfs_r(path, "blocks /dir").decode().split()[0])


@pytest.mark.parametrize(("what", "offset", "code", "value"), HTREE_DAMAGES,
                         ids=[d[0] for d in HTREE_DAMAGES])
def test_htree_damage_found_by_both(htree_image: tuple[str, int], workdir: str, what: str, offset: int,
                                    code: str, value: int) -> None:
    """The index root of an htree directory damaged: e2fsck and check_volume both complain."""
    src, root = htree_image
    with open(src, "rb") as f:
        data = bytearray(f.read())
    struct.pack_into("<" + code, data, root * 1024 + offset, value)
    path = os.path.join(workdir, "htree-damaged.img")
    with open(path, "wb") as f:
        f.write(data)
    rc, out = fsck(path)
    assert rc & 4 and "HTREE" in out, out
    assert "htree" in ck.codes(ck.check_image(path))


def test_problem_data(bases: dict[int, cu.BaseImage], workdir: str) -> None:
    """Problems are frozen data with the inode, the block and a path where there is one."""
    base = bases[1024]
    p = cu.Patch(base)
    p.inode("/dir/sub/deep/leaf", "links", 3)
    path = p.write(os.path.join(workdir, "links.img"))
    problems = ck.check_image(path)
    assert len(problems) == 1
    prob = problems[0]
    assert prob.code == "link_count" and prob.ino == base.ino["/dir/sub/deep/leaf"]
    assert prob.path == "/dir/sub/deep/leaf"
    assert "3" in prob.message and "1" in prob.message
    d = prob.to_dict()
    assert d == {"code": "link_count", "message": prob.message, "ino": prob.ino, "block": None,
                 "path": "/dir/sub/deep/leaf"}
    with pytest.raises(AttributeError):
        prob.code = "x"  # type: ignore[misc]


def test_problem_paths_of_directories(bases: dict[int, cu.BaseImage], workdir: str) -> None:
    base = bases[4096]
    p = cu.Patch(base)
    p.inode("/dir/sub", "size", base.inode_field("/dir/sub", "size") + 1)
    path = p.write(os.path.join(workdir, "dirsize.img"))
    (prob,) = ck.check_image(path)
    assert prob.code == "i_size" and prob.path == "/dir/sub"


def test_both_devices_agree(bases: dict[int, cu.BaseImage], workdir: str) -> None:
    """The memory device and the file device with its page cache give the same problems."""
    base = bases[1024]
    p = cu.Patch(base)
    ck.DAMAGES[0].apply(p)
    p.iblock("/small", 0, base.blocks["/big"][1])
    path = p.write(os.path.join(workdir, "two.img"))
    results = []
    for xip in (True, False):
        with xipfs.open(path, xip=xip) as fs:
            results.append(check_volume(fs.volume, progress=False))
    assert results[0] == results[1]
    assert {"dup_block", "block_bitmap_differs"} <= ck.codes(results[0])


def test_unusable_superblock_raises(bases: dict[int, cu.BaseImage]) -> None:
    base = bases[1024]
    p = cu.Patch(base)
    p.sb("magic", 0x1234)
    dev = MemoryDevice.anonymous(len(p.buf))
    dev.buffer[:] = p.buf
    with pytest.raises(xipfs.CorruptImageError):
        check_device(dev, progress=False)
    dev.close()


def test_progress_callback(bases: dict[int, cu.BaseImage]) -> None:
    seen: list[tuple[int, int]] = []
    with xipfs.open(bases[4096].path) as fs:
        assert check_volume(fs.volume, progress=lambda done, total: seen.append((done, total))) == []
    assert seen and seen[-1][0] == seen[-1][1]
    assert all(a[0] <= b[0] for a, b in zip(seen, seen[1:], strict=False))


# -- hostile images -------------------------------------------------------------------------------
def check_bounded(data: bytes | bytearray, seconds: float = 20.0) -> list[Problem] | None:
    """check_device on ``data``; None when it raised the error a broken superblock gives."""
    dev = MemoryDevice.anonymous(len(data))
    dev.buffer[:] = data
    try:
        with cu.time_limit(seconds, "check_device"):
            return check_device(dev, progress=False)
    except (xipfs.CorruptImageError, xipfs.UnsupportedFeatureError):
        return None
    finally:
        dev.close()


def metadata_regions(base: cu.BaseImage) -> list[tuple[int, int]]:
    """Byte ranges of the image that hold metadata: superblock, descriptors, bitmaps, the inodes
    in use, directory blocks, indirect blocks, the xattr block."""
    bs = base.bs
    regions = [(1024, 1024), (base.gdt_off, 32 * len(base.groups))]
    for g in base.groups:
        regions += [(g.inode_table * bs, 64 * base.isize), (g.block_bitmap * bs, bs),
                    (g.inode_bitmap * bs, bs)]
    for p in ("/", "/dir", "/dir/sub", "/lost+found"):
        regions += [(b * bs, bs) for b in base.blocks[p]]
    regions += [(b * bs, bs) for b in base.iblock("/big")[12:15] if b]
    regions.append((ck.xattr_block(base) * bs, bs))
    return [(o, n) for o, n in regions if o >= 0 and o + n <= len(base.data)]


@pytest.mark.parametrize("bs", BASE_SIZES)
def test_random_corruption_never_crashes(bases: dict[int, cu.BaseImage], bs: int) -> None:
    """Seeded random damage to every kind of metadata: problems or CorruptImageError, always
    within a time bound (never IndexError, struct.error, a hang)."""
    base = bases[bs]
    regions = metadata_regions(base)
    rnd = random.Random(20240601 + bs)
    nblocks = len(base.data) // bs
    reported = 0
    for _ in range(120):
        buf = bytearray(base.data)
        for _ in range(rnd.choice((1, 2, 4, 16))):
            off, n = rnd.choice(regions)
            pos = off + rnd.randrange(n)
            kind = rnd.random()
            if kind < 0.4:
                buf[pos] = rnd.randrange(256)
            elif kind < 0.7:
                value = rnd.choice((0, 1, 2, 11, 0xFFFFFFFF, rnd.randrange(1 << 32), rnd.randrange(nblocks)))
                struct.pack_into("<I", buf, pos & ~3, value)
            else:
                struct.pack_into("<H", buf, pos & ~1, rnd.choice((0, 1, 12, 0xFFFF, rnd.randrange(1 << 16))))
        problems = check_bounded(buf)
        reported += bool(problems)
    assert reported > 60          # most of these damages are found


def test_block_map_loops_end(bases: dict[int, cu.BaseImage]) -> None:
    """Indirect blocks that point at themselves, at every level, for two files: found, and the
    walk ends."""
    base = bases[1024]
    p = cu.Patch(base)
    ind, dind = base.iblock("/big")[12:14]
    p.fill_ind(ind, ind)
    p.fill_ind(dind, dind)
    p.iblock("/big", 14, dind)                 # the triple indirect block too
    p.iblock("/sparse", 13, dind)
    problems = check_bounded(p.buf)
    assert problems is not None and {"dup_block"} <= ck.codes(problems)


def test_directory_loop_detached_from_root(bases: dict[int, cu.BaseImage], workdir: str) -> None:
    """/dir taken out of the root and named from inside its own subdirectory: a loop of
    directories no walk from the root reaches. Reported, and the check ends."""
    base = bases[4096]
    p = cu.Patch(base)
    p.put(ck.dirent_off(base, "/", b"dir"), "I", 0)
    p.put(ck.dirent_off(base, "/dir/sub/deep", b"leaf"), "I", base.ino["/dir"])
    p.put(ck.dirent_off(base, "/dir/sub/deep", b"leaf") + 7, "B", 2)
    path = p.write(os.path.join(workdir, "loop.img"))
    rc, out = fsck(path)
    assert rc & 4, out
    problems = check_bounded(p.buf)
    assert problems is not None
    assert ck.codes(problems) & {"dir_loop", "unconnected_dir", "dotdot_mismatch"}, problems


def test_everything_claimed_by_one_directory(bases: dict[int, cu.BaseImage]) -> None:
    """A directory whose block map names the inode tables and bitmaps: metadata read as entries,
    blocks claimed twice; no crash."""
    base = bases[1024]
    p = cu.Patch(base)
    for i in range(12):
        p.iblock("/dir", i, base.groups[0].inode_table + i)
    p.inode("/dir", "size", 12 * base.bs)
    problems = check_bounded(p.buf)
    assert problems is not None and "dup_block" in ck.codes(problems)


def test_stdlib_image_is_clean(workdir: str) -> None:
    """This Python's standard library packed by mke2fs: both checkers find it clean."""
    import sysconfig

    src = os.path.join(workdir, "stdlib")
    shutil.copytree(sysconfig.get_paths()["stdlib"], src, symlinks=True,
                    ignore=shutil.ignore_patterns("site-packages", "__pycache__"))
    path = os.path.join(workdir, "stdlib.img")
    try:
        assert run(["mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-d", src, path, "300M"],
                   check=False, timeout=300).returncode == 0
        assert_both_clean(path)
    finally:
        shutil.rmtree(src)
        os.unlink(path)
