"""``xipfs.check`` on ext4 against ``e2fsck -fn``: clean images give no problem, damaged ones the
problem e2fsck finds.

* clean: a small tree (a fragmented sparse file with an extent tree, an htree directory, slow and
  fast symlinks) packed by ``mke2fs -t ext4 -d`` with the defaults and the usual variants (1 KiB
  and 4 KiB blocks, 128-byte inodes, no 64bit/flex_bg, meta_bg, bigalloc, inline_data, uninit_bg,
  metadata_csum_seed); with root, also an image Linux wrote through a loop mount (thousands of
  files, an htree directory, interleaved appends and punched holes for deep extent trees,
  fallocated unwritten extents);
* damaged: one damage per image (extent trees, checksums, htree, inline data, group
  descriptors, the journal superblock): e2fsck must report it in its own words and the check
  with a problem of the matching code.
"""

from __future__ import annotations

import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from e2fs import debugfs_r, e2fsck, fsck, mkfs, run

import xipfs

pytestmark = pytest.mark.skipif(shutil.which("e2fsck") is None, reason="needs e2fsprogs")

IS_ROOT = os.geteuid() == 0
_CLEAN = re.compile(r"^(e2fsck \d|Pass \d|.*: \d+/\d+ files .*blocks$|$)")


def fsck_found(rc: int, out: str) -> bool:
    """Whether e2fsck reported any problem (an error exit, or a message it does not count)."""
    return bool(rc) or any(not _CLEAN.match(line) for line in out.splitlines())


def codes(path: str) -> set[str]:
    return {p.code for p in xipfs.check(path, progress=False)}


def assert_both_clean(path: str) -> None:
    rc, out = fsck(path)
    assert not fsck_found(rc, out), f"e2fsck -fn finds problems:\n{out}"
    problems = xipfs.check(path, progress=False)
    assert problems == [], problems[:10]


def build_src(root: str) -> None:
    """A small tree with what ext4 stores differently: a fragmented file, an htree directory..."""
    os.makedirs(os.path.join(root, "dir"))
    os.makedirs(os.path.join(root, "many"))
    os.makedirs(os.path.join(root, "tiny"))
    with open(os.path.join(root, "frag"), "wb") as f:
        for i in range(40):                  # 40 extents: a tree block below the root
            f.seek(i * 65536)
            f.write(bytes([i + 1]) * 3000)
    for i in range(30):
        with open(os.path.join(root, "dir", f"entry_{i:03d}_" + "x" * 22), "w") as f:
            f.write("hi")
    for i in range(500):
        open(os.path.join(root, "many", f"a-rather-long-file-name-{i:05d}"), "w").close()
    with open(os.path.join(root, "tiny", "a"), "w") as f:
        f.write("a")
    with open(os.path.join(root, "small"), "w") as f:
        f.write("small")
    with open(os.path.join(root, "big"), "wb") as f:
        f.write(os.urandom(300_000))
    os.symlink("t" * 100, os.path.join(root, "slow"))
    os.symlink("fast", os.path.join(root, "fast"))


@pytest.fixture(scope="module")
def workdir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="xipfs-check4-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def src(workdir: str) -> str:
    root = os.path.join(workdir, "src")
    build_src(root)
    return root


# -- clean images ---------------------------------------------------------------------------------
#: (48 MiB is mke2fs's "small" type: 1 KiB blocks unless -b says otherwise)
VARIANTS = [("-b", "4096"), ("-b", "1024"), ("-b", "4096", "-I", "128"), ("-O", "^64bit,^flex_bg"),
            ("-O", "meta_bg,^resize_inode"), ("-b", "4096", "-O", "bigalloc", "-C", "65536"),
            ("-O", "bigalloc", "-C", "16384"), ("-b", "4096", "-O", "inline_data"), ("-O", "inline_data"),
            ("-O", "^metadata_csum,uninit_bg"), ("-O", "metadata_csum_seed"),
            ("-b", "2048", "-O", "^has_journal")]


@pytest.mark.parametrize("opts", VARIANTS, ids=[" ".join(o) for o in VARIANTS])
def test_mke2fs_variants_are_clean(src: str, workdir: str, opts: tuple[str, ...]) -> None:
    """mke2fs -t ext4 -d, defaults and variants, then htree-indexed by e2fsck -fyD: nothing."""
    path = os.path.join(workdir, "variant.img")
    try:
        mkfs(path, "48M", src=src, extra=opts, fstype="ext4")
        assert_both_clean(path)
        assert e2fsck(path, "-fyD")[0] in (0, 1)
        assert_both_clean(path)
    finally:
        os.unlink(path)


_KERNEL_SCRIPT = r"""
set -e
cp -a "$SRC"/. "$MNT"/
mkdir "$MNT/huge"
for i in $(seq 1 2500); do echo $i > "$MNT/huge/file-with-a-longish-name-$i"; done
rm -f "$MNT"/huge/file-with-a-longish-name-1[0-9]*
python3 - "$MNT" <<'PY'
import os, sys
m = sys.argv[1]
fs = [open(f"{m}/inter{i}", "ab") for i in range(6)]
for r in range(300):
    for f in fs:
        f.write(os.urandom(4096)); f.flush(); os.fsync(f.fileno())
for f in fs:
    f.close()
with open(f"{m}/falloc", "wb") as f:
    os.posix_fallocate(f.fileno(), 0, 3 << 20)
    f.seek(1 << 20); f.write(b"x" * 10000)
with open(f"{m}/punched", "wb") as f:
    f.write(os.urandom(3000 * int(os.environ["BS"])))
PY
sync
for i in $(seq 0 2 2998); do fallocate -p -o $((i*BS)) -l $BS "$MNT/punched"; done
printf abc > "$MNT/keep"
fallocate -n -l 2M "$MNT/keep"
ln -s "$(python3 -c 'print("x"*200)')" "$MNT/slowlink"
"""


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="a loop mount needs root")
@pytest.mark.parametrize("bs", [1024, 4096])
def test_kernel_written_image_is_clean(src: str, workdir: str, bs: int) -> None:
    """Written by Linux: many files, an htree directory, depth-2 extent trees, unwritten extents."""
    path = os.path.join(workdir, f"kernel-{bs}.img")
    mnt = os.path.join(workdir, "mnt")
    os.makedirs(mnt, exist_ok=True)
    mkfs(path, "96M", bs=bs, fstype="ext4")
    try:
        run(["mount", "-o", "loop", path, mnt])
        try:
            env = {**os.environ, "SRC": src, "MNT": mnt, "BS": str(bs)}
            run(["bash", "-c", _KERNEL_SCRIPT], timeout=600, env=env)
        finally:
            run(["umount", mnt])
        ex = debugfs_r(path, "ex /punched").decode()
        assert re.search(r"^ ?[01]/ ?2 ", ex, re.M), "no depth-2 extent tree"
        assert_both_clean(path)
    finally:
        os.unlink(path)


# -- damaged images -------------------------------------------------------------------------------
@dataclass
class Base:
    path: str
    bs: int


def _base(workdir: str, src: str, name: str, bs: int, extra: tuple[str, ...]) -> Base:
    path = os.path.join(workdir, name + ".img")
    mkfs(path, "32M", src=src, bs=bs, extra=extra, fstype="ext4")
    assert e2fsck(path, "-fyD")[0] in (0, 1)
    return Base(path, bs)


@pytest.fixture(scope="module")
def bases(workdir: str, src: str) -> dict[str, Base]:
    return {"csum": _base(workdir, src, "csum", 4096, ()),
            "plain": _base(workdir, src, "plain", 1024, ("-O", "^metadata_csum")),
            "inline": _base(workdir, src, "inline", 1024, ("-O", "inline_data,^metadata_csum"))}


def dbg(path: str, request: str) -> str:
    return debugfs_r(path, request).decode()


def tree_block(path: str, file: str) -> int:
    """The first extent tree block below the root of ``file`` (debugfs ``ex``)."""
    m = re.search(r"^ ?0/ ?\d+ +1/ *\d+ +\d+ - +\d+ +(\d+)", dbg(path, f"ex {file}"), re.M)
    assert m, dbg(path, f"ex {file}")
    return int(m.group(1))


def file_block(path: str, file: str, lblk: int = 0) -> int:
    return int(dbg(path, f"bmap {file} {lblk}").split()[0])


def inode_off(path: str, file: str, bs: int) -> int:
    m = re.search(r"located at block (\d+), offset 0x([0-9a-f]+)", dbg(path, f"imap {file}"))
    assert m
    return int(m.group(1)) * bs + int(m.group(2), 16)


def gdt_off(path: str, bs: int, group: int) -> int:
    """Byte offset of ``group``'s descriptor (64 bytes with 64bit, as these images have)."""
    return (1 if bs > 1024 else 2) * bs + 64 * group


def patch(path: str, off: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        f.write(data)


def xor(path: str, off: int, mask: int = 0x5A) -> None:
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ mask]))


def debugfs_w(path: str, request: str) -> None:
    debugfs_r(path, request, write=True)


def _extent_magic(p: str, bs: int) -> None:
    patch(p, tree_block(p, "/frag") * bs, b"\0\0")


def _extent_order(p: str, bs: int) -> None:
    blk = tree_block(p, "/frag")
    off = blk * bs + 12 + 12 * 3                     # the fourth leaf entry starts where the second does
    with open(p, "rb") as f:
        f.seek(blk * bs + 12 + 12)
        second = f.read(4)
    patch(p, off, second)


def _extent_past_end(p: str, bs: int) -> None:
    blk = tree_block(p, "/frag")
    patch(p, blk * bs + 12 + 12 * 2 + 8, struct.pack("<I", 10 ** 8))      # ee_start_lo


def _root_magic(p: str, bs: int) -> None:
    debugfs_w(p, "sif /big block[0] 0")


def _inode_csum(p: str, bs: int) -> None:
    xor(p, inode_off(p, "/small", bs) + 8)                                  # i_atime


def _extent_csum(p: str, bs: int) -> None:
    blk = tree_block(p, "/frag")
    xor(p, blk * bs + 12 + 12 * ((bs - 12) // 12))


def _dir_csum(p: str, bs: int) -> None:
    xor(p, file_block(p, "/dir") * bs + bs - 2)


def _gdt_csum(p: str, bs: int) -> None:
    xor(p, gdt_off(p, bs, 0) + 0x1E)


def _sb_csum(p: str, bs: int) -> None:
    xor(p, 1024 + 0x3FC)


def _htree_limit(p: str, bs: int) -> None:
    patch(p, file_block(p, "/many") * bs + 0x20, struct.pack("<H", 100))


def _htree_csum(p: str, bs: int) -> None:
    blk = file_block(p, "/many")
    with open(p, "rb") as f:
        f.seek(blk * bs + 0x20)
        limit = struct.unpack("<H", f.read(2))[0]
    xor(p, blk * bs + 0x20 + 8 * limit + 4)


def _inline_dir_size(p: str, bs: int) -> None:
    debugfs_w(p, "sif /tiny size 200")


def _uninit_without_csum(p: str, bs: int) -> None:
    off = gdt_off(p, bs, 1) + 0x12
    patch(p, off, struct.pack("<H", 1))


def _itable_unused(p: str, bs: int) -> None:
    free = int(re.search(r"Free inodes: +(\d+)", run(["dumpe2fs", "-h", p]).stdout.decode()).group(1))
    debugfs_w(p, f"set_bg 0 itable_unused {free + 5}")


def _block_bitmap_csum(p: str, bs: int) -> None:
    """The descriptor's block bitmap checksum changed, its own checksum redone (so only the
    bitmap's sum is wrong)."""
    from xipfs.extfs.groups import desc_checksum
    from xipfs.extfs.super import parse_superblock

    with open(p, "rb") as f:
        f.seek(1024)
        sb = parse_superblock(f.read(1024), os.path.getsize(p))
    off = gdt_off(p, bs, 0)
    with open(p, "r+b") as f:
        f.seek(off)
        d = bytearray(f.read(sb.desc_size))
        d[0x18] ^= 0xFF
        struct.pack_into("<H", d, 0x1E, desc_checksum(sb, 0, bytes(d)))
        f.seek(off)
        f.write(d)


def _one_extent_past_end(p: str, bs: int) -> None:
    debugfs_w(p, "sif /big block[5] 100000000")                         # the root's ee_start_lo


def _one_extent_i_blocks(p: str, bs: int) -> None:
    debugfs_w(p, "sif /big blocks 10")


def _one_extent_size(p: str, bs: int) -> None:
    debugfs_w(p, "sif /big size 1000")


def _one_extent_shared(p: str, bs: int) -> None:
    debugfs_w(p, f"sif /small block[5] {file_block(p, '/big', 1)}")


def _journal_magic(p: str, bs: int) -> None:
    patch(p, file_block(p, "<8>") * bs, b"\0\0\0\0")


@dataclass
class Damage:
    name: str
    base: str
    apply: Callable[[str, int], None]
    codes: frozenset[str]
    fsck: str


DAMAGES = [
    Damage("extent block magic", "plain", _extent_magic, frozenset({"bad_extent"}), r"extent"),
    Damage("extents out of order", "plain", _extent_order, frozenset({"bad_extent"}),
           r"extent|out of order|overlap"),
    Damage("extent past the end", "plain", _extent_past_end, frozenset({"bad_extent"}),
           r"invalid physical block|extent"),
    # a file whose one extent is in the inode: checked with its whole inode table piece at once
    Damage("one extent in the inode past the end", "plain", _one_extent_past_end, frozenset({"bad_extent"}),
           r"extent|[Ii]llegal|invalid"),
    Damage("i_blocks of a one-extent file", "plain", _one_extent_i_blocks, frozenset({"i_blocks"}),
           r"i_blocks is \d+, should be"),
    Damage("i_size below a one-extent file's blocks", "plain", _one_extent_size, frozenset({"i_size"}),
           r"i_size is 1000, should be"),
    Damage("one-extent files sharing a block", "plain", _one_extent_shared, frozenset({"dup_block"}),
           r"Multiply-claimed"),
    Damage("extent root magic in the inode", "plain", _root_magic, frozenset({"bad_extent"}),
           r"extent header|extent"),
    Damage("inode checksum", "csum", _inode_csum, frozenset({"inode_csum"}),
           r"checksum does not match inode"),
    Damage("extent block checksum", "csum", _extent_csum, frozenset({"extent_csum"}),
           r"checksum does not match extent"),
    Damage("directory leaf checksum", "csum", _dir_csum, frozenset({"dir_csum"}), r"fails checksum"),
    Damage("group descriptor checksum", "csum", _gdt_csum, frozenset({"group_desc_csum"}),
           r"descriptor checksums? (are|is) invalid|checksum is 0x"),
    Damage("superblock checksum", "csum", _sb_csum, frozenset({"superblock_csum"}),
           r"[Ss]uperblock checksum does not match"),
    Damage("htree root limit", "csum", _htree_limit, frozenset({"htree"}), r"HTREE|has bad limit"),
    Damage("htree root checksum", "csum", _htree_csum, frozenset({"htree"}), r"HTREE|htree|checksum"),
    Damage("inline directory size", "inline", _inline_dir_size, frozenset({"i_size"}),
           r"i_size is 200, should be"),
    Damage("uninit flag without gdt_csum", "plain", _uninit_without_csum, frozenset({"group_desc_uninit"}),
           r"marked uninitialized without feature set"),
    Damage("itable_unused above the free inodes", "csum", _itable_unused, frozenset({"itable_unused"}),
           r"itable unused count|unused inodes count"),
    Damage("block bitmap checksum", "csum", _block_bitmap_csum, frozenset({"bitmap_csum"}),
           r"block bitmap does not match checksum"),
    Damage("journal superblock magic", "csum", _journal_magic, frozenset({"journal"}),
           r"invalid journal|journal superblock"),
]


@pytest.mark.parametrize("damage", DAMAGES, ids=[d.name for d in DAMAGES])
def test_damage_found_by_both(bases: dict[str, Base], workdir: str, damage: Damage) -> None:
    """e2fsck -fn and the check both find the damage, of the same kind."""
    base = bases[damage.base]
    assert_both_clean(base.path)
    path = os.path.join(workdir, "damaged.img")
    shutil.copyfile(base.path, path)
    try:
        damage.apply(path, base.bs)
        rc, out = fsck(path)
        assert fsck_found(rc, out), "e2fsck -fn finds nothing"
        assert re.search(damage.fsck, out), out
        found = codes(path)
        assert found & damage.codes, (found, out)
    finally:
        os.unlink(path)


# -- ea_inode: xattr values in inodes of their own ------------------------------------------------
KIB = 1024


def _ea_writable() -> pytest.MonkeyPatch:
    """ext4 with ea_inode opened for writing (as test_ea_inode_write's ``writable`` fixture)."""
    from xipfs.extfs import layout as L

    mp = pytest.MonkeyPatch()
    mp.setenv(L.EXT4_WRITE_ENV, "1")
    mp.setattr(L, "INCOMPAT_WRITABLE", L.INCOMPAT_WRITABLE | L.EXT4_INCOMPAT_WRITABLE | L.INCOMPAT_EA_INODE)
    mp.setattr(L, "RO_COMPAT_SUPPORTED", L.RO_COMPAT_SUPPORTED | L.EXT4_RO_COMPAT_WRITABLE)
    return mp


def _xipfs_ea_image(path: str, bs: int) -> str:
    """``mke2fs -O ea_inode``, then xipfs sets values of 5 to 60 KiB (in the inode body, and in
    the xattr block behind small values), replaces one and removes one."""
    mkfs(path, "16M", bs=bs, extra=("-O", "ea_inode"), fstype="ext4")
    mp = _ea_writable()
    try:
        with xipfs.open(path, "r+") as fs:
            for i, kib in enumerate((5, 12, 30, 60)):
                p = f"/f{i}"
                with fs.open(p, "wb") as f:
                    f.write(b"data" * (i + 1))
                fs.setxattr(p, "user.big", os.urandom(kib * KIB))
            fs.setxattr("/f1", "user.more", os.urandom(20 * KIB))
            with fs.open("/blk", "wb") as f:
                f.write(b"blk")
            fs.setxattr("/blk", "user.pad", b"p" * 64)            # the body full: the block next
            fs.setxattr("/blk", "user.pad2", b"q" * 24)
            fs.setxattr("/blk", "user.inblock", os.urandom(9 * KIB))
            fs.mkdir("/d")
            fs.setxattr("/d", "user.big", os.urandom(20 * KIB))
            fs.setxattr("/f0", "user.big", os.urandom(7 * KIB))    # replaced: a new EA inode
            fs.removexattr("/f2", "user.big")                      # removed: its EA inode freed
    finally:
        mp.undo()
    return path


def _linux_ea_image(path: str, bs: int, mnt: str) -> str | None:
    """``mke2fs -O ea_inode`` written by Linux through a loop mount (one value shared by two files,
    one xattr block shared by two files naming an EA inode); None when it cannot be mounted."""
    if not IS_ROOT:
        return None
    mkfs(path, "16M", bs=bs, extra=("-O", "ea_inode"), fstype="ext4")
    if run(["mount", "-o", "loop", "-t", "ext4", path, mnt], check=False, timeout=60).returncode:
        return None
    try:
        same = os.urandom(10 * KIB)
        for name in "abcde":
            with open(os.path.join(mnt, name), "w") as f:
                f.write(name * 100)
        os.setxattr(os.path.join(mnt, "a"), "user.big", b"x" * 10000)
        os.setxattr(os.path.join(mnt, "a"), "user.same", same)
        os.setxattr(os.path.join(mnt, "b"), "user.same", same)
        for name in "ce":
            p = os.path.join(mnt, name)
            os.setxattr(p, "user.pad", b"p" * 64)
            os.setxattr(p, "user.pad2", b"q" * 24)
            os.setxattr(p, "user.z", b"z" * 10000)
        os.setxattr(os.path.join(mnt, "d"), "user.huge", os.urandom(60 * KIB))
        os.mkdir(os.path.join(mnt, "dir"))
        os.setxattr(os.path.join(mnt, "dir"), "user.big", os.urandom(30 * KIB))
    finally:
        run(["umount", mnt], timeout=60)
    return path


def _ea_names(path: str, file: str) -> dict[str, int]:
    """``{xattr name: EA inode}`` of ``file``'s entries whose values are in EA inodes."""
    from xipfs.extfs import xattr as X

    with xipfs.open(path) as fs:
        vol = fs.volume
        node = vol.inode(fs.lstat(file).st_ino)
        entries = X._ibody_entries(vol, node)
        if node.file_acl:
            entries += X._block_entries(vol, node.file_acl)
        return {e.key: e.inum for e in entries if e.key and e.inum}


@pytest.fixture(scope="module")
def ea_bases(workdir: str) -> dict[str, str]:
    """The images the ea_inode damages start from: xipfs-written, and Linux-written if it can."""
    mnt = os.path.join(workdir, "ea-mnt")
    os.makedirs(mnt, exist_ok=True)
    out = {"xipfs": _xipfs_ea_image(os.path.join(workdir, "ea-xipfs.img"), 4096)}
    linux = _linux_ea_image(os.path.join(workdir, "ea-linux.img"), 4096, mnt)
    if linux is not None:
        out["linux"] = linux
    return out


@pytest.mark.parametrize("bs", [1024, 4096])
def test_ea_inode_xipfs_written_is_clean(workdir: str, bs: int) -> None:
    """EA inodes xipfs wrote (in the body and the block, replaced, removed): nothing, as e2fsck."""
    path = _xipfs_ea_image(os.path.join(workdir, f"ea-xipfs-{bs}.img"), bs)
    try:
        assert _ea_names(path, "/blk").keys() == {"user.inblock"}
        assert_both_clean(path)
    finally:
        os.unlink(path)


@pytest.mark.parametrize("bs", [1024, 4096])
def test_ea_inode_linux_written_is_clean(workdir: str, bs: int) -> None:
    """EA inodes Linux wrote (shared values, a shared block naming one): nothing, as e2fsck."""
    mnt = os.path.join(workdir, "ea-mnt")
    os.makedirs(mnt, exist_ok=True)
    path = _linux_ea_image(os.path.join(workdir, f"ea-linux-{bs}.img"), bs, mnt)
    if path is None:
        pytest.skip("no read-write loop mount (needs root, a loop device and ext4)")
    try:
        assert _ea_names(path, "/a")["user.same"] == _ea_names(path, "/b")["user.same"]
        assert_both_clean(path)
    finally:
        os.unlink(path)


def _fix_inode_csum(path: str, ino: int) -> None:
    """Recompute inode ``ino``'s checksum after its bytes were changed (debugfs -n: it reads the
    inode despite the checksum)."""
    run(["debugfs", "-w", "-n", "-R", f"sif <{ino}> checksum calc", path], check=False)


def _set_entry_inum(path: str, owner: str, name: str, inum: int) -> None:
    """Point ``owner``'s in-inode entry ``name`` (``user.``) at inode ``inum``."""
    ino = _ino(path, owner)
    off = inode_off(path, owner, 4096)
    with open(path, "r+b") as f:
        f.seek(off)
        raw = bytearray(f.read(256))
        pos = 128 + struct.unpack_from("<H", raw, 128)[0] + 4
        while struct.unpack_from("<I", raw, pos)[0]:
            nlen = raw[pos]
            if raw[pos + 16:pos + 16 + nlen] == name.encode():
                struct.pack_into("<I", raw, pos + 4, inum)
                break
            pos += (16 + nlen + 3) & ~3
        else:
            raise AssertionError(f"no entry {name} in {owner}")
        f.seek(off)
        f.write(raw)
    _fix_inode_csum(path, ino)


def _ino(path: str, file: str) -> int:
    return int(re.search(r"Inode: (\d+)", dbg(path, f"stat {file}")).group(1))


def _ea_refcount_bytes(p: str, base: str) -> None:
    """The reference count's low half (l_i_version) written as bytes, the checksum redone."""
    ino = _ea_names(p, "/b" if base == "linux" else "/f1")["user.same" if base == "linux" else "user.big"]
    patch(p, inode_off(p, f"<{ino}>", 4096) + 0x24, struct.pack("<I", 7))
    _fix_inode_csum(p, ino)


def _ea_refcount_ctime(p: str, base: str) -> None:
    ino = _ea_names(p, "/d" if base == "linux" else "/f3")["user.huge" if base == "linux" else "user.big"]
    debugfs_w(p, f"sif <{ino}> ctime 5")                  # the count's high half


def _ea_no_flag(p: str, base: str) -> None:
    ino = _ea_names(p, "/d" if base == "linux" else "/f3")["user.huge" if base == "linux" else "user.big"]
    debugfs_w(p, f"sif <{ino}> flags 0x80000")            # extents only


def _ea_no_flag_block(p: str, base: str) -> None:
    ino = _ea_names(p, "/c" if base == "linux" else "/blk")["user.z" if base == "linux" else "user.inblock"]
    debugfs_w(p, f"sif <{ino}> flags 0x80000")


def _ea_value_hash(p: str, base: str) -> None:
    ino = _ea_names(p, "/dir" if base == "linux" else "/d")["user.big"]
    debugfs_w(p, f"sif <{ino}> atime 12345")              # i_atime: the value's hash


def _ea_at_regular_file(p: str, base: str) -> None:
    other = _ino(p, "/e" if base == "linux" else "/f2")
    _set_entry_inum(p, "/dir" if base == "linux" else "/d", "big", other)


def _ea_outside(p: str, base: str) -> None:
    _set_entry_inum(p, "/dir" if base == "linux" else "/d", "big", 5)


@dataclass
class EaDamage:
    name: str
    apply: Callable[[str, str], None]
    codes: frozenset[str]
    fsck: str


EA_DAMAGES = [
    EaDamage("refcount low half", _ea_refcount_bytes, frozenset({"ea_inode_refcount"}),
             r"Extended attribute inode \d+ ref count is 7, should be"),
    EaDamage("refcount high half", _ea_refcount_ctime, frozenset({"ea_inode_refcount"}),
             r"Extended attribute inode \d+ ref count is 2147483648\d, should be 1"),
    EaDamage("EA_INODE flag cleared", _ea_no_flag, frozenset({"ea_inode_flag", "unattached_inode"}),
             r"missing EA_INODE flag(.|\n)*Unattached inode"),
    EaDamage("EA_INODE flag cleared, entry in a block", _ea_no_flag_block,
             frozenset({"ea_inode_flag", "unattached_inode"}),
             r"missing EA_INODE flag(.|\n)*Unattached inode"),
    EaDamage("value hash", _ea_value_hash, frozenset({"ea_inode_hash"}),
             r"has a hash \(\d+\) which is invalid"),
    EaDamage("entry at a regular file", _ea_at_regular_file, frozenset({"bad_ea_inode", "unattached_inode"}),
             r"has illegal extended attribute value inode \d+(.|\n)*Unattached inode"),
    EaDamage("entry at a reserved inode", _ea_outside, frozenset({"bad_ea_inode"}),
             r"has illegal extended attribute value inode 5"),
]


@pytest.mark.parametrize("base", ["xipfs", "linux"])
@pytest.mark.parametrize("damage", EA_DAMAGES, ids=[d.name for d in EA_DAMAGES])
def test_ea_inode_damage_found_by_both(ea_bases: dict[str, str], workdir: str, damage: EaDamage,
                                       base: str) -> None:
    """e2fsck -fn and the check both find a damaged EA inode or entry, of the same kind."""
    if base not in ea_bases:
        pytest.skip("no read-write loop mount (needs root, a loop device and ext4)")
    assert_both_clean(ea_bases[base])
    path = os.path.join(workdir, "ea-damaged.img")
    shutil.copyfile(ea_bases[base], path)
    try:
        damage.apply(path, base)
        rc, out = fsck(path)
        assert fsck_found(rc, out), "e2fsck -fn finds nothing"
        assert re.search(damage.fsck, out), out
        found = codes(path)
        assert damage.codes <= found, (found, out)
    finally:
        os.unlink(path)


def test_ea_inode_size_mismatch(ea_bases: dict[str, str], workdir: str) -> None:
    """An EA inode whose i_size is not its entry's value size (Linux refuses the value;
    e2fsck 1.47.0 does not look): that one problem, nothing else follows from it."""
    path = os.path.join(workdir, "ea-damaged.img")
    shutil.copyfile(ea_bases["xipfs"], path)
    try:
        ino = _ea_names(path, "/d")["user.big"]
        debugfs_w(path, f"sif <{ino}> size {20 * KIB - 100}")      # still in its last block
        assert [p.code for p in xipfs.check(path, progress=False)] == ["ea_inode_size"]
    finally:
        os.unlink(path)


def test_xattr_block_checksum(workdir: str) -> None:
    """A byte changed where no entry looks (between the entries and the values) leaves the xattr
    block sound but its checksum wrong: e2fsck reports it, and so does the check."""
    path = os.path.join(workdir, "xattr-csum.img")
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", path, "16M"])
    src = os.path.join(workdir, "hi")
    with open(src, "w") as f:
        f.write("hi\n")
    debugfs_r(path, f"write {src} f", write=True)
    for name, ch in (("user.a", "a"), ("user.b", "b")):       # too big for the inode: a block
        debugfs_r(path, f"ea_set f {name} {ch * 300}", write=True)
    with xipfs.open(path) as fs:
        blk = fs.volume.inode(fs.stat("/f").st_ino).file_acl
    assert blk and codes(path) == set()
    with open(path, "r+b") as f:
        f.seek(blk * 1024 + 200)
        f.write(b"Z")
    rc, out = fsck(path)
    assert "checksum does not match" in out
    assert codes(path) == {"xattr_block"}


def test_journal_superblock_checksum(workdir: str) -> None:
    """A journal superblock with checksum v3 (as Linux leaves it after a mount) is clean; one
    byte changed in it, e2fsck calls it corrupt, and so does the check."""
    from xipfs.extfs.journal import superblock_checksum

    path = os.path.join(workdir, "jsb.img")
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", "1024", path, "32M"])
    with xipfs.open(path) as fs:
        at = fs.volume.inode(8).map.bmap(0) * 1024
    with open(path, "r+b") as f:
        f.seek(at)
        jsb = bytearray(f.read(1024))
        jsb[0x28:0x2C] = (int.from_bytes(jsb[0x28:0x2C], "big") | 0x10).to_bytes(4, "big")   # csum v3
        jsb[0x50] = 4                                                                       # crc32c
        jsb[0xFC:0x100] = superblock_checksum(jsb).to_bytes(4, "big")
        f.seek(at)
        f.write(jsb)
    assert not fsck_found(*fsck(path)) and codes(path) == set()
    with open(path, "r+b") as f:
        f.seek(at + 0x120)
        f.write(b"Z")
    rc, out = fsck(path)
    assert "Journal superblock is corrupt" in out
    assert codes(path) == {"journal"}


@pytest.mark.parametrize("field", ["uid 5", "gid 5", "mode 0100644", "links_count 1", "file_acl 100",
                                   "flags 0x10000000"])                   # 0x10000000: inline data
def test_bad_blocks_inode_that_looks_invalid(workdir: str, field: str) -> None:
    """Inode 1 lists bad blocks and nothing else: a mode, owner, group, link, xattr block or
    inline data there is e2fsck's "The bad block inode looks invalid", and the check's reserved_inode."""
    path = os.path.join(workdir, "badino.img")
    run(["mke2fs", "-q", "-F", "-t", "ext4", path, "16M"])
    debugfs_r(path, f"sif <1> {field}", write=True)
    assert "bad block inode looks invalid" in fsck(path)[1]
    assert codes(path) == {"reserved_inode"}
