"""mkfs -t ext4: the image is what ``mke2fs -t ext4`` of e2fsprogs 1.47 makes, block for block.

The oracle is mke2fs itself, run with the upstream 1.47 mke2fs.conf (written here: some
distributions' /etc/mke2fs.conf leave out orphan_file and metadata_csum_seed), the same size,
UUID (-U), hash seed (-E hash_seed=) and time (E2FSPROGS_FAKE_TIME; ours: ``now=``). Every block
either side wrote must then be equal, except the superblock copies' ``s_kbytes_written`` (what
each tool counts as written) and the superblock checksum over it: those are the fields that
legitimately differ (times too, when not pinned). dumpe2fs of both must agree, group tables
included; e2fsck -fn must find ours clean; xipfs must read it; Linux must mount it read-write,
take a tree, unmount, and leave it clean (skipped without root).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import IS_ROOT, mounted
from e2fs import assert_fsck_clean, debugfs_r, dumpe2fs, dumpe2fs_header, run

import xipfs
from xipfs.extfs import layout as L
from xipfs.extfs.mkfs4 import (
    default_journal_blocks,
    default_orphan_blocks,
    feature_set,
    feature_words,
    plan4,
)

UUID = "01234567-89ab-cdef-0123-456789abcdef"
SEED = "11111111-2222-3333-4444-555555555555"
NOW = 1700000000
MIB = 1 << 20

#: The ext4 stanza of e2fsprogs 1.47's misc/mke2fs.conf.in (sizes as the file has them).
MKE2FS_CONF = """[defaults]
\tbase_features = sparse_super,large_file,filetype,resize_inode,dir_index,ext_attr
\tdefault_mntopts = acl,user_xattr
\tenable_periodic_fsck = 0
\tblocksize = 4096
\tinode_size = 256
\tinode_ratio = 16384

[fs_types]
\text4 = {
\t\tfeatures = has_journal,extent,huge_file,flex_bg,metadata_csum,metadata_csum_seed,64bit,\
dir_nlink,extra_isize,orphan_file
\t}
\tsmall = {
\t\tblocksize = 1024
\t\tinode_ratio = 4096
\t}
\tfloppy = {
\t\tblocksize = 1024
\t\tinode_ratio = 8192
\t}
\tbig = {
\t\tinode_ratio = 32768
\t}
\thuge = {
\t\tinode_ratio = 65536
\t}
"""

#: dumpe2fs -h lines that legitimately differ between two otherwise identical images.
DIFFERING = ("Lifetime writes", "Checksum")


@pytest.fixture(scope="module")
def conf(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("conf") / "mke2fs.conf"
    path.write_text(MKE2FS_CONF)
    return str(path)


@pytest.fixture
def imgs(shm_dir):
    """Paths for the reference image (mke2fs) and ours; removed afterwards."""
    a, b = os.path.join(shm_dir, "ref.img"), os.path.join(shm_dir, "ours.img")
    yield a, b
    for p in (a, b):
        if os.path.exists(p):
            os.unlink(p)


def make_pair(conf: str, ref: str, ours: str, size: int, args: tuple[str, ...] = (), **kw) -> None:
    """mke2fs -t ext4 ARGS into ``ref``, xipfs.mkfs(fs_type="ext4", **kw) into ``ours``."""
    with open(ref, "wb") as f:
        f.truncate(size)
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-U", UUID, "-E", f"hash_seed={SEED}", *args, ref],
        env={"MKE2FS_CONFIG": conf, "E2FSPROGS_FAKE_TIME": str(NOW)})
    xipfs.mkfs(ours, size, fs_type="ext4", uuid=UUID, hash_seed=SEED, now=NOW, **kw)


def _data_ranges(path: str) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    out, pos, size = [], 0, os.fstat(fd).st_size
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


def differing_blocks(ref: str, ours: str) -> list[int]:
    """Blocks that differ between the two images (either side's written extents compared),
    superblock copies differing only in s_kbytes_written and s_checksum left out."""
    assert os.path.getsize(ref) == os.path.getsize(ours)
    with open(ref, "rb") as fa, open(ours, "rb") as fb:
        sb = L.SUPERBLOCK.unpack(fa.read(2048), 1024)
        bs = 1024 << sb["s_log_block_size"]
        bad = set()
        for lo, hi in _data_ranges(ref) + _data_ranges(ours):
            lo -= lo % bs
            for pos in range(lo, hi, 1 << 22):
                n = min(1 << 22, hi - pos)
                fa.seek(pos)
                fb.seek(pos)
                x, y = fa.read(n), fb.read(n)
                if x == y:
                    continue
                for off in range(0, n, bs):
                    xb, yb = x[off:off + bs], y[off:off + bs]
                    if xb == yb:
                        continue
                    blk = (pos + off) // bs
                    at = 1024 - blk * bs if blk * bs <= 1024 < (blk + 1) * bs else 0
                    diffs = [i - at for i in range(len(xb)) if xb[i] != yb[i]]
                    if xb[at + 56:at + 58] == b"\x53\xef" and all(
                            0x178 <= i < 0x180 or 0x3FC <= i < 0x400 for i in diffs):
                        continue
                    bad.add(blk)
    return sorted(bad)


def assert_same_as_mke2fs(ref: str, ours: str) -> None:
    assert differing_blocks(ref, ours) == []
    a, b = dumpe2fs(ref).splitlines(), dumpe2fs(ours).splitlines()
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        if x != y:
            assert x.split(":")[0].strip() in DIFFERING, (x, y)
    assert_fsck_clean(ours)


# -- the image is mke2fs's ----------------------------------------------------------------------
SIZES = [
    (8 * MIB, (), {}),
    (32 * MIB, (), {}),
    (64 * MIB, (), {}),
    (256 * MIB, (), {}),
    (64 * MIB, ("-b", "4096"), {"block_size": 4096}),
    (256 * MIB, ("-b", "4096"), {"block_size": 4096}),
    (64 * MIB, ("-b", "2048"), {"block_size": 2048}),
    (3 * MIB + 12345, (), {}),
    (1 * MIB, (), {}),                              # too small for a journal: none
    (1 << 30, (), {}),
]


@pytest.mark.parametrize(("size", "args", "kw"), SIZES,
                         ids=[f"{s >> 10}K{'-' + '-'.join(a) if a else ''}" for s, a, _ in SIZES])
def test_same_as_mke2fs(conf, imgs, size, args, kw):
    make_pair(conf, *imgs, size, args, **kw)
    assert_same_as_mke2fs(*imgs)


VARIANTS = [
    (("-O", "^metadata_csum"), {"features": ["^metadata_csum"]}),
    (("-O", "^metadata_csum,uninit_bg"), {"features": ["^metadata_csum", "uninit_bg"]}),
    (("-O", "^64bit"), {"features": ["^64bit"]}),
    (("-O", "^has_journal"), {"journal_size": 0}),
    (("-I", "128"), {"inode_size": 128}),
    (("-O", "^flex_bg"), {"features": ["^flex_bg"]}),
    (("-O", "^resize_inode"), {"features": ["^resize_inode"]}),
    (("-O", "meta_bg,^resize_inode"), {"features": ["meta_bg"]}),
    (("-O", "^resize_inode,^sparse_super"), {"features": ["^resize_inode", "^sparse_super"]}),
    (("-O", "^dir_index,^orphan_file,^metadata_csum_seed"),
     {"features": "^dir_index,^orphan_file,^metadata_csum_seed"}),
    (("-J", "size=16"), {"journal_size": 16 * MIB}),
    (("-L", "label", "-m", "1", "-N", "5000"), {"label": "label", "reserved_percent": 1, "inodes": 5000}),
    (("-i", "8192", "-G", "4"), {"inode_ratio": 8192, "flex_bg_size": 4}),
]


@pytest.mark.parametrize(("args", "kw"), VARIANTS, ids=[" ".join(a) for a, _ in VARIANTS])
def test_variants_same_as_mke2fs(conf, imgs, args, kw):
    make_pair(conf, *imgs, 64 * MIB, args, **kw)
    assert_same_as_mke2fs(*imgs)


@pytest.mark.slow
@pytest.mark.parametrize("size", [4 << 30, 200 << 30, 20 << 40], ids=["4G", "200G", "20T"])
def test_big_same_as_mke2fs(conf, imgs, size):
    """4 GiB; a 1 GiB journal in eight extents under a leaf block; past 2^32 blocks (no resize
    inode, backup superblock numbers clamped to 65535). Sparse files: only metadata is written."""
    make_pair(conf, *imgs, size)
    assert differing_blocks(*imgs) == []
    a, b = dumpe2fs_header(imgs[0]), dumpe2fs_header(imgs[1])
    assert {k: v for k, v in a.items() if k not in DIFFERING} == \
        {k: v for k, v in b.items() if k not in DIFFERING}
    if size <= 200 << 30:
        assert_fsck_clean(imgs[1])


# -- the parameters as mke2fs works them out --------------------------------------------------
def test_default_features_are_147():
    assert feature_words(feature_set(None)) == (0x103C, 0x22C2, 0x46B)
    assert "metadata_csum_seed" not in feature_set("^metadata_csum")
    assert "orphan_file" not in feature_set("^has_journal")
    assert "resize_inode" not in feature_set("meta_bg")


@pytest.mark.parametrize("bad", ["^extent", "^filetype", "inline_data", "bigalloc", "quota", "encrypt",
                                 "meta_bg,resize_inode", "^sparse_super", "nonsense"])
def test_refused_features(bad, shm_dir):
    path = os.path.join(shm_dir, "refused.img")
    with pytest.raises(ValueError):
        xipfs.mkfs(path, 64 * MIB, fs_type="ext4", features=bad)
    assert not os.path.exists(path)                 # refused before anything is made


def test_sizes_by_type():
    g = plan4(256 * MIB)
    assert (g.bs, g.groups, g.ipg, g.itable_blocks, g.reserved_gdt) == (1024, 32, 2048, 512, 256)
    g = plan4(4 << 30)
    assert (g.bs, g.groups, g.ipg, g.reserved_gdt, g.r_blocks) == (4096, 32, 8192, 511, 52428)
    assert default_journal_blocks(262144) == 8192 and default_journal_blocks(1 << 20) == 16384
    assert default_orphan_blocks(1 << 20) == 256 and default_orphan_blocks(65536) == 32
    with pytest.raises(ValueError):
        plan4(60 * 1024)


def test_ext2_is_unchanged(shm_dir):
    """fs_type defaults to ext2, made as before; ext4-only options are refused for it."""
    path = os.path.join(shm_dir, "ext2.img")
    xipfs.mkfs(path, 32 * MIB)
    features = dumpe2fs_header(path)["Filesystem features"]
    assert features == "ext_attr dir_index filetype sparse_super large_file"
    with pytest.raises(TypeError):
        xipfs.mkfs(path, 32 * MIB, journal_size=0)
    with pytest.raises(ValueError):
        xipfs.mkfs(path, 32 * MIB, fs_type="xfs")


# -- reading and using it -----------------------------------------------------------------------
def test_xipfs_reads_it(shm_dir):
    path = os.path.join(shm_dir, "read.img")
    xipfs.mkfs(path, 64 * MIB, fs_type="ext4", label="data")
    with xipfs.open(path) as fs:
        assert fs.listdir("/") == ["lost+found"]
        assert fs.listdir("/lost+found") == []
        sb = fs.volume.sb
        assert sb.label == "data" and sb.metadata_csum
        assert fs.statvfs("/").f_files == sb.s_inodes_count


def test_orphan_file_size(shm_dir):
    """-E orphan_file_size (mke2fs 1.47.0 fails on it: "Could not allocate block")."""
    path = os.path.join(shm_dir, "orphan.img")
    xipfs.mkfs(path, 64 * MIB, fs_type="ext4", orphan_file_size=128 * 1024)
    assert "Size: 131072" in debugfs_r(path, "stat <12>").decode()
    assert_fsck_clean(path)


def test_journal_is_empty(shm_dir):
    path = os.path.join(shm_dir, "journal.img")
    xipfs.mkfs(path, 64 * MIB, fs_type="ext4")
    out = debugfs_r(path, "logdump").decode()
    assert out.strip() == "Journal starts at block 0, transaction 1"      # s_start 0: nothing logged
    h = dumpe2fs_header(path)
    assert h["Journal sequence"] == "0x00000001" and h["Journal start"] == "0"


def test_on_an_old_device(shm_dir):
    """A device full of old data (no zeroed= promise): tables, journal and the wiped areas are
    zeroed, and the result is the same filesystem."""
    path = os.path.join(shm_dir, "old.img")
    size = 32 * MIB
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            f.write(os.urandom(MIB))
    dev = xipfs.device.open_device(path, readonly=False)
    try:
        xipfs.mkfs(dev, fs_type="ext4", uuid=UUID, hash_seed=SEED, now=NOW)
    finally:
        dev.close()
    assert_fsck_clean(path)
    with xipfs.open(path) as fs:
        assert fs.listdir("/") == ["lost+found"]


def _tree(root: str) -> None:
    os.makedirs(os.path.join(root, "a/b/c"))
    for i in range(300):
        with open(os.path.join(root, "a", f"f{i}"), "wb") as f:
            f.write(os.urandom(i * 37))
    with open(os.path.join(root, "a/b/big"), "wb") as f:
        f.write(os.urandom(5 * MIB))
    os.symlink("b/big", os.path.join(root, "a/link"))


@pytest.mark.parametrize("kw", [{}, {"block_size": 4096}, {"features": ["^metadata_csum", "^64bit"]},
                                {"journal_size": 0, "inode_size": 128}],
                         ids=["default", "4k", "nocsum-32bit", "nojournal-128"])
def test_linux_uses_it(shm_dir, kw):
    if not IS_ROOT:
        pytest.skip("loop mounts need root")
    img = os.path.join(shm_dir, "linux.img")
    src = os.path.join(shm_dir, "src")
    _tree(src)
    xipfs.mkfs(img, 64 * MIB, fs_type="ext4", **kw)
    with xipfs.open(img) as fs:
        ours = fs.statvfs("/")
    with mounted(img, options="rw") as mnt:
        k = os.statvfs(mnt)
        assert (ours.f_blocks, ours.f_bfree, ours.f_bavail, ours.f_files, ours.f_ffree) == \
            (k.f_blocks, k.f_bfree, k.f_bavail, k.f_files, k.f_ffree)
        subprocess.run(["cp", "-a", os.path.join(src, "a"), mnt], check=True)
    assert_fsck_clean(img)
    with xipfs.open(img) as fs:
        assert sorted(fs.listdir("/")) == ["a", "lost+found"]
        assert len(fs.listdir("/a")) == 302
        with open(os.path.join(src, "a/b/big"), "rb") as f:
            assert fs.read_bytes("/a/b/big") == f.read()
        with open(os.path.join(src, "a/f299"), "rb") as f:
            assert fs.read_bytes("/a/f299") == f.read()
        assert fs.readlink("/a/link") == "b/big"
    shutil.rmtree(src)


# -- the command --------------------------------------------------------------------------------
def test_cli(shm_dir):
    img = os.path.join(shm_dir, "cli.img")
    cmd = [sys.executable, "-m", "xipfs", "mkfs", "-t", "ext4", "-U", UUID, "-E", f"hash_seed={SEED}",
           "-L", "cli", "-J", "size=4", "-O", "^metadata_csum_seed", img, "64M"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "ext4, 1024-byte blocks" in proc.stdout
    h = dumpe2fs_header(img)
    assert h["Filesystem UUID"] == UUID and h["Directory Hash Seed"] == SEED
    assert h["Filesystem volume name"] == "cli" and h["Total journal size"] == "4096k"
    assert "metadata_csum_seed" not in h["Filesystem features"]
    assert_fsck_clean(img)
    bad = subprocess.run([sys.executable, "-m", "xipfs", "mkfs", "-J", "size=4", img, "64M"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "only with -t ext4" in bad.stderr
