"""JBD2 recovery (xipfs.extfs.journal) against e2fsck's replay of real ext4 journals.

The journals are written by debugfs (``jo [-c] [-v 2]``, ``jw -b BLOCKS FILE``, ``jw -r BLOCKS``,
``jc``), which leaves needs_recovery set without replaying; ``e2fsck -fy`` is the oracle.

How the overlay is compared with e2fsck: the transactions only log blocks that are free in a
fresh, clean filesystem, so ``e2fsck -fy`` has nothing to repair and the only blocks it writes
are the replayed ones, the primary superblock (needs_recovery cleared, times, counts) and the
journal superblock (s_start 0, s_sequence end + 1). So, with D the blocks e2fsck changed and O the
overlay blocks whose contents differ from the image's: D minus {superblock, journal superblock}
must be exactly O, every overlay block must read in e2fsck's image as in the overlay (also those
equal to the old contents), and e2fsck's journal superblock must equal ``recovered_superblock``.
A missed, extra, stale or wrongly escaped block each breaks one of these.

debugfs cannot wrap the circular log (a transaction that does not fit before the end is ENOSPC),
so the wrapped logs here are debugfs's logs rotated: every log block moved by the same offset
around the ring s_first..s_maxlen and s_start moved with it (no checksum covers a log position).
"""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from e2fs import SHM, dumpe2fs_header, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xipfs.errors import CorruptImageError, UnsupportedFeatureError
from xipfs.extfs import journal as J
from xipfs.extfs.csum import crc32c_raw

MAGIC = struct.pack(">I", J.JBD2_MAGIC)
INCOMPAT_RECOVER = 0x4


# -- images --------------------------------------------------------------------------------------
@dataclass
class Img:
    """An ext4 image file with the journal inode's block map (from debugfs)."""

    path: str
    bs: int
    blocks_count: int
    jmap: list[int]           # journal logical block -> physical block

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            return f.read()

    def reader(self, data: bytes | None = None) -> Callable[[int], bytes]:
        data = self.read() if data is None else data
        bs, jmap = self.bs, self.jmap
        return lambda i: data[jmap[i] * bs:(jmap[i] + 1) * bs]

    def jblock(self, i: int, data: bytes | None = None) -> bytes:
        return self.reader(data)(i)

    def put_jblocks(self, blocks: dict[int, bytes]) -> None:
        with open(self.path, "r+b") as f:
            for i, buf in blocks.items():
                assert len(buf) == self.bs
                f.seek(self.jmap[i] * self.bs)
                f.write(buf)

    def recover(self, data: bytes | None = None, **kw) -> J.Overlay:
        return J.recover(self.reader(data), self.bs, fs_blocks_count=self.blocks_count,
                         journal_blocks=len(self.jmap), **kw)

    def jsb(self, data: bytes | None = None) -> J.JournalSuperblock:
        return J.parse_superblock(self.jblock(0, data))

    @property
    def sb_block(self) -> int:
        return 1 if self.bs == 1024 else 0

    def copy(self, path: str) -> Img:
        shutil.copyfile(self.path, path)
        return Img(path, self.bs, self.blocks_count, list(self.jmap))


def make_image(workdir: str, name: str, bs: int, features: str) -> Img:
    """A small ext4 image with a 1024-block journal, one block group (no backup superblocks)."""
    path = os.path.join(workdir, name)
    size_kib = 8192 if bs == 1024 else 16384
    run(["mke2fs", "-q", "-F", "-t", "ext4", "-b", str(bs), "-O", features, "-J", f"size={bs // 1024}",
         path, f"{size_kib}k"])
    jmap = [int(x) for x in run(["debugfs", "-R", "blocks <8>", path]).stdout.split()]
    assert len(jmap) == 1024
    return Img(path, bs, size_kib * 1024 // bs, jmap)


def free_blocks(img: Img, n: int) -> list[int]:
    """n free blocks from the upper half of the filesystem (above all metadata and the journal)."""
    out = run(["debugfs", "-R", f"ffb {n} {img.blocks_count // 2}", img.path]).stdout.decode()
    blocks = [int(x) for x in out.split(":")[1].split()]
    assert len(blocks) == n and min(blocks) > max(img.jmap)
    return blocks


def data_file(workdir: str, name: str, nblocks: int, bs: int, *, magic: bool = False) -> str:
    """A file of distinct blocks (block k says (name, k)); with ``magic`` block 0 starts with the
    JBD2 magic, so journalling it needs an escape."""
    path = os.path.join(workdir, name)
    with open(path, "wb") as f:
        for k in range(nblocks):
            blk = (f"{name}:{k}:".encode() * bs)[:bs]
            if magic and k == 0:
                blk = MAGIC + blk[4:]
            f.write(blk)
    return path


def journal_cmds(img: Img, cmds: list[str], *, csum: str = "") -> None:
    """``jo CSUM``, the jw commands, ``jc`` in one debugfs -w run; fail on any error message."""
    script = os.path.join(os.path.dirname(img.path), "cmds")
    with open(script, "w") as f:
        f.write("\n".join([f"jo {csum}".strip(), *cmds, "jc"]) + "\n")
    proc = run(["debugfs", "-w", "-f", script, img.path])
    err = proc.stderr.decode()
    assert "journal" not in err.lower().replace("debugfs", ""), err
    assert dumpe2fs_header(img.path)["Filesystem features"].split().count("needs_recovery") == 1


# -- the oracle ------------------------------------------------------------------------------------
def changed_blocks(a: bytes, b: bytes, bs: int) -> set[int]:
    assert len(a) == len(b)
    return {i for i in range(len(a) // bs) if a[i * bs:(i + 1) * bs] != b[i * bs:(i + 1) * bs]}


def run_e2fsck(img: Img, workdir: str) -> tuple[bytes, str]:
    """``e2fsck -fy`` on a copy: (the replayed image, e2fsck's output)."""
    path = os.path.join(workdir, "fsck.img")
    shutil.copyfile(img.path, path)
    # -s KILL: e2fsck ignores SIGTERM while it replays (a looping log would never end)
    proc = run(["timeout", "-s", "KILL", "25", "e2fsck", "-fy", path], check=False, timeout=30)
    out = (proc.stdout + proc.stderr).decode(errors="replace")
    assert proc.returncode in (0, 1), out
    with open(path, "rb") as f:
        return f.read(), out


def assert_like_e2fsck(img: Img, workdir: str, ov: J.Overlay, *, jsb_too: bool = True) -> str:
    """The overlay applied to the image is what e2fsck -fy made of it (see the module docstring)."""
    before = img.read()
    after, out = run_e2fsck(img, workdir)
    bs = img.bs
    meta = {img.sb_block, img.jmap[0]}
    ours = {b for b, d in ov.items() if before[b * bs:(b + 1) * bs] != d}
    assert changed_blocks(before, after, bs) - meta == ours - meta, out
    for b, d in ov.items():
        assert after[b * bs:(b + 1) * bs] == d, b
    sb = after[1024:2048]
    assert not struct.unpack_from("<I", sb, 0x60)[0] & INCOMPAT_RECOVER
    if jsb_too:
        assert img.jblock(0, after) == J.recovered_superblock(img.jblock(0, before), ov), out
    return out


def block_at(img: Img, b: int, data: bytes | None = None) -> bytes:
    data = img.read() if data is None else data
    return data[b * img.bs:(b + 1) * img.bs]


def log_blocks(img: Img, data: bytes | None = None) -> Iterator[tuple[int, int, int, bytes]]:
    """(log block, type, sequence, bytes) of the blocks of the log that start with the magic."""
    rd = img.reader(data)
    for i in range(1, len(img.jmap)):
        buf = rd(i)
        if buf[:4] == MAGIC:
            _, btype, seq = struct.unpack_from(">III", buf)
            yield i, btype, seq, buf


# -- checksum helpers for crafting corrupt logs --------------------------------------------------
def fix_tail(buf: bytes, seed: int) -> bytes:
    """Redo a descriptor/revoke block's tail checksum."""
    return buf[:-4] + struct.pack(">I", crc32c_raw(seed, buf[:-4] + b"\0" * 4))


def fix_commit(buf: bytes, seed: int) -> bytes:
    return buf[:16] + struct.pack(">I", crc32c_raw(seed, buf[:16] + b"\0" * 4 + buf[20:])) + buf[20:]


def fix_jsb(buf: bytes) -> bytes:
    return buf[:0xFC] + struct.pack(">I", J.superblock_checksum(buf)) + buf[0x100:]


def patch(buf: bytes, off: int, fmt: str, value: int) -> bytes:
    b = bytearray(buf)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture
def workdir() -> Iterator[str]:
    d = tempfile.mkdtemp(prefix="xipfs-jbd2-", dir=SHM)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


#: (block size, mke2fs -O, jo options, journal features expected, tag bytes)
CONFIGS = [
    pytest.param(1024, "metadata_csum,64bit", "-c", {"journal_checksum_v3", "journal_64bit"}, 16,
                 id="1k-v3-64"),
    pytest.param(4096, "metadata_csum,^64bit", "-c", {"journal_checksum_v3"}, 16, id="4k-v3-32"),
    pytest.param(1024, "metadata_csum,^64bit", "-c -v 2", {"journal_checksum_v2"}, 10, id="1k-v2-32"),
    pytest.param(4096, "metadata_csum,64bit", "-c -v 2", {"journal_checksum_v2", "journal_64bit"}, 14,
                 id="4k-v2-64"),
    pytest.param(1024, "^metadata_csum,64bit", "", {"journal_64bit"}, 12, id="1k-none-64"),
    pytest.param(4096, "^metadata_csum,^64bit", "", set(), 8, id="4k-none-32"),
    pytest.param(1024, "^metadata_csum,^64bit", "-c", {"journal_checksum"}, 8, id="1k-v1crc32-32"),
]


def write_scenario(img: Img, workdir: str, csum: str) -> dict[str, list[int]]:
    """Six transactions (and an uncommitted seventh) covering escapes, revokes, rewrites and a
    transaction of several descriptor blocks. Returns the blocks used, by role."""
    bs = img.bs
    a, b, c, d, f, *e = free_blocks(img, 5 + 150)
    F = data_file(workdir, "F", 3, bs, magic=True)
    G = data_file(workdir, "G", 2, bs)
    H = data_file(workdir, "H", len(e), bs, magic=True)
    K = data_file(workdir, "K", 1, bs, magic=True)
    L = data_file(workdir, "L", 1, bs)
    journal_cmds(img, [
        f"jw -b {a},{b},{c} {F}",                      # T1: a is escaped
        f"jw -r {b}",                                  # T2: revokes b (logged in T1)
        f"jw -b {d},{c} {G}",                          # T3: c rewritten
        f"jw -b {','.join(map(str, e))} {H}",          # T4: 150 blocks, several descriptors
        f"jw -r {e[0]},{e[1]}",                        # T5: revokes two of them
        f"jw -b {e[1]} {K}",                           # T6: e1 logged again after its revoke
        f"jw -c -b {f} {L}",                           # T7: never committed
    ], csum=csum)
    return {"a": [a], "b": [b], "c": [c], "d": [d], "e": e, "f": [f]}


# -- real journals against e2fsck ------------------------------------------------------------------
@pytest.mark.parametrize(("bs", "features", "csum", "jfeatures", "tag_bytes"), CONFIGS)
def test_replay_matches_e2fsck(workdir: str, bs: int, features: str, csum: str, jfeatures: set[str],
                               tag_bytes: int) -> None:
    img = make_image(workdir, "img", bs, features)
    roles = write_scenario(img, workdir, csum)
    jsb = img.jsb()
    assert set(jsb.feature_names()) - {"journal_incompat_revoke"} == jfeatures
    assert jsb.tag_bytes == tag_bytes and jsb.start == 1 and jsb.sequence == 1
    ov = img.recover()
    a, b, c, d, e = roles["a"][0], roles["b"][0], roles["c"][0], roles["d"][0], roles["e"]
    if "journal_checksum" in jfeatures:
        # debugfs's v1 commit sum also covers the revoke blocks, recovery's does not: T2 (a revoke)
        # fails its commit check, in e2fsck as here, and only T1 is replayed
        assert (ov.end_sequence, ov.failed_commit, set(ov)) == (2, 2, {a, b, c})
        assert_like_e2fsck(img, workdir, ov)
        return
    assert (ov.start_sequence, ov.end_sequence, ov.transactions, ov.next_sequence) == (1, 7, 6, 8)
    assert ov.clean and ov.revokes == 3 and ov.revoke_hits == 3
    assert set(ov) == {a, c, d, *e[1:]}                 # b and e0 revoked, f never committed
    assert ov[a][:4] == MAGIC and ov[a][4:8] == b"F:0:"  # escape undone
    assert ov[c].startswith(b"G:1:") and ov[d].startswith(b"G:0:")
    assert ov[e[1]] == MAGIC + (b"K:0:" * bs)[4:bs]     # T6 after the T5 revoke
    assert all(ov[x].startswith(f"H:{k}:".encode()) for k, x in enumerate(e) if k > 1)
    out = assert_like_e2fsck(img, workdir, ov)
    assert "recovering journal" in out


def test_v1_checksums(workdir: str) -> None:
    """COMPAT_CHECKSUM (crc32_be over descriptor and data blocks) on transactions without revokes,
    then a flipped data byte: the commit check fails and the replay stops before it."""
    img = make_image(workdir, "img", 4096, "^metadata_csum,^64bit")
    blocks = free_blocks(img, 40)
    F = data_file(workdir, "F", 20, 4096, magic=True)
    journal_cmds(img, [f"jw -b {','.join(map(str, blocks[k:k + 20]))} {F}" for k in (0, 10, 20)], csum="-c")
    assert img.jsb().csum_v1
    ov = img.recover()
    assert (ov.end_sequence, ov.clean, set(ov)) == (4, True, set(blocks))
    assert_like_e2fsck(img, workdir, ov)
    i, _ = find(img, J.DESCRIPTOR_BLOCK, 2)
    buf = img.jblock(i + 3)
    ov, out = corrupt_and_compare(img, workdir, {i + 3: buf[:100] + b"?" + buf[101:]})
    assert ov is not None and (ov.end_sequence, ov.failed_commit, set(ov)) == (2, 2, set(blocks[:20]))
    assert "transaction 2 was corrupt" in out


def test_apply_then_clear_equals_e2fsck(workdir: str) -> None:
    """The read-write path: apply(), recovered_superblock(), needs_recovery cleared -> e2fsck's image
    but for the superblock fields e2fsck also touches, and a clean e2fsck -fn."""
    img = make_image(workdir, "img", 1024, "metadata_csum,64bit")
    write_scenario(img, workdir, "-c")
    ov = img.recover()
    ours = img.copy(os.path.join(workdir, "ours.img"))
    with open(ours.path, "r+b") as f:
        def write_block(blk: int, buf: bytes) -> None:
            f.seek(blk * img.bs)
            f.write(buf)
        J.apply(ov, write_block)
        write_block(img.jmap[0], J.recovered_superblock(img.jblock(0), ov))
        f.seek(1024)
        sb = bytearray(f.read(1024))
        struct.pack_into("<I", sb, 0x60, struct.unpack_from("<I", sb, 0x60)[0] & ~INCOMPAT_RECOVER)
        struct.pack_into("<I", sb, 0x3FC, crc32c_raw(0xFFFFFFFF, bytes(sb[:0x3FC])))
        f.seek(1024)
        f.write(sb)
    after, _ = run_e2fsck(img, workdir)
    assert changed_blocks(ours.read(), after, img.bs) <= {img.sb_block}
    proc = run(["e2fsck", "-fn", ours.path], check=False)
    assert proc.returncode == 0, proc.stdout.decode()


def test_no_recovery_needed(workdir: str) -> None:
    img = make_image(workdir, "img", 4096, "metadata_csum,64bit")
    ov = img.recover()
    assert len(ov) == 0 and ov.end_sequence == img.jsb().sequence == 1 and ov.next_sequence == 2


def test_describe_like_dumpe2fs(workdir: str) -> None:
    for bs, features, csum in ((1024, "metadata_csum,64bit", "-c"), (4096, "^metadata_csum", "-c")):
        img = make_image(workdir, f"img{bs}", bs, features)
        blk = free_blocks(img, 1)[0]
        journal_cmds(img, [f"jw -r {blk}"], csum=csum)
        hdr = dumpe2fs_header(img.path)
        got = img.jsb().describe(bs)
        keys = list(hdr)
        assert [k for k, _ in got] == keys[keys.index("Journal features"):]
        for k, v in got:
            assert hdr[k] == v, k


# -- wrapping ----------------------------------------------------------------------------------------
def rotate_log(img: Img, shift: int) -> None:
    """Move every block of the log ``shift`` places around the ring s_first..s_maxlen."""
    jsb = img.jsb()
    ring = jsb.last - jsb.first
    rd = img.reader()
    old = {i: rd(i) for i in range(jsb.first, jsb.last)}
    new = {jsb.first + (i - jsb.first + shift) % ring: buf for i, buf in old.items()}
    start = jsb.first + (jsb.start - jsb.first + shift) % ring
    new[0] = rd(0)
    new[0] = patch(new[0], 0x1C, ">I", start)
    if jsb.csum_v2or3:
        new[0] = fix_jsb(new[0])
    img.put_jblocks(new)


@pytest.mark.parametrize(("bs", "features", "csum"), [(1024, "metadata_csum,64bit", "-c"),
                                                       (4096, "metadata_csum,^64bit", "-c -v 2"),
                                                       (1024, "^metadata_csum,^64bit", "")])
def test_wrapped_log(workdir: str, bs: int, features: str, csum: str) -> None:
    img = make_image(workdir, "img", bs, features)
    write_scenario(img, workdir, csum)
    ov0 = img.recover()
    used = ov0.head_block - 1
    assert used > 150
    jsb = img.jsb()
    ring = jsb.last - jsb.first
    for shift in (ring - used // 2, ring - used + 1, ring - 2):   # wrap mid-way, at the end, at once
        rotate_log(img, shift)
        ov = img.recover()
        assert dict(ov) == dict(ov0) and ov.end_sequence == ov0.end_sequence
        assert ov.head_block == jsb.first + (ov0.head_block - jsb.first + shift) % ring
        rotate_log(img, ring - shift)
    rotate_log(img, ring - used // 2)
    assert_like_e2fsck(img, workdir, img.recover())


def test_sequence_wraps_past_2_32(workdir: str) -> None:
    """Transaction IDs 0xfffffffe, 0xffffffff, 0, 1: revokes and the end compare modulo 2**32."""
    img = make_image(workdir, "img", 1024, "metadata_csum,64bit")
    img.put_jblocks({0: patch(img.jblock(0), 0x18, ">I", 0xFFFFFFFE)})   # no csum yet: none to fix
    x, y, z = free_blocks(img, 3)
    F = data_file(workdir, "F", 2, 1024, magic=True)
    journal_cmds(img, [f"jw -b {x},{y} {F}", f"jw -b {z},{x} {F}", f"jw -r {x},{y}", f"jw -b {y} {F}"],
                 csum="-c")
    ov = img.recover()
    assert (ov.start_sequence, ov.end_sequence, ov.next_sequence) == (0xFFFFFFFE, 2, 3)
    assert set(ov) == {y, z} and ov[y][:4] == MAGIC      # x revoked by tid 0 > 0xffffffff
    assert_like_e2fsck(img, workdir, ov)


# -- 64-bit tags -------------------------------------------------------------------------------------
def test_64bit_tag_high_bits(workdir: str) -> None:
    """blocknr_high is read (a filesystem past 2**32 blocks), and bounded by the block count."""
    img = make_image(workdir, "img", 1024, "metadata_csum,64bit")
    x = free_blocks(img, 1)[0]
    F = data_file(workdir, "F", 1, 1024)
    journal_cmds(img, [f"jw -b {x} {F}"], csum="-c")
    jsb = img.jsb()
    (i, _, _, desc), = [t for t in log_blocks(img) if t[1] == J.DESCRIPTOR_BLOCK]
    img.put_jblocks({i: fix_tail(patch(desc, 12 + 8, ">I", 3), jsb.csum_seed)})
    rd = img.reader()
    ov = J.recover(rd, 1024, fs_blocks_count=1 << 40, journal_blocks=1024)
    assert set(ov) == {(3 << 32) | x}
    with pytest.raises(CorruptImageError, match="outside the filesystem"):
        img.recover()


# -- corruption ----------------------------------------------------------------------------------------
@pytest.fixture
def v3img(workdir: str) -> tuple[Img, dict[str, list[int]]]:
    img = make_image(workdir, "img", 1024, "metadata_csum,64bit")
    return img, write_scenario(img, workdir, "-c")


JSB_CORRUPTIONS = [
    ("magic", lambda b: patch(b, 0, ">I", 0xC03B3999), "magic"),
    ("blocktype", lambda b: fix_jsb(patch(b, 4, ">I", 1)), "block type"),
    ("blocksize", lambda b: fix_jsb(patch(b, 0xC, ">I", 2048)), "block size"),
    ("maxlen>inode", lambda b: fix_jsb(patch(b, 0x10, ">I", 1025)), "inode has"),
    ("maxlen<1024", lambda b: fix_jsb(patch(b, 0x10, ">I", 1000)), "shorter"),
    ("first=0", lambda b: fix_jsb(patch(b, 0x14, ">I", 0)), "first block"),
    ("first>=maxlen", lambda b: fix_jsb(patch(b, 0x14, ">I", 1024)), "first block"),
    ("start>=maxlen", lambda b: fix_jsb(patch(b, 0x1C, ">I", 1024)), "journal start"),
    ("start<first", lambda b: fix_jsb(patch(patch(b, 0x14, ">I", 5), 0x1C, ">I", 2)), "journal start"),
    ("checksum", lambda b: patch(b, 0xFC, ">I", 0), "checksum"),
    ("v2+v3", lambda b: fix_jsb(patch(b, 0x28, ">I", 0x1F)), "v2 and v3"),
    ("v1+v3", lambda b: fix_jsb(patch(b, 0x24, ">I", 1)), "v1"),
    ("csum type", lambda b: fix_jsb(patch(b, 0x50, ">B", 1)), "checksum type"),
    ("short", lambda b: b[:512], "less than 1024"),
]


@pytest.mark.parametrize(("name", "mutate", "match"), JSB_CORRUPTIONS, ids=[c[0] for c in JSB_CORRUPTIONS])
def test_bad_journal_superblock(v3img: tuple[Img, dict], name: str, mutate: Callable[[bytes], bytes],
                                match: str) -> None:
    img, _ = v3img
    jsb0 = img.jblock(0)
    bad = mutate(jsb0)
    rd = img.reader()
    with pytest.raises(CorruptImageError, match=match):
        J.recover(lambda i: bad if i == 0 else rd(i), 1024, fs_blocks_count=img.blocks_count,
                  journal_blocks=len(img.jmap))


def test_unknown_journal_features(v3img: tuple[Img, dict]) -> None:
    img, _ = v3img
    for off, bits in ((0x28, 0x40), (0x2C, 0x1)):
        bad = fix_jsb(patch(img.jblock(0), off, ">I", struct.unpack_from(">I", img.jblock(0), off)[0] | bits))
        with pytest.raises(UnsupportedFeatureError):
            J.parse_superblock(bad)
    # a v1 superblock has no features: its feature words are ignored, as the kernel does
    v1 = patch(img.jblock(0), 4, ">I", J.SUPERBLOCK_V1)
    assert J.parse_superblock(v1).tag_bytes == 8 and not J.parse_superblock(v1).csum_v3


def corrupt_and_compare(img: Img, workdir: str, blocks: dict[int, bytes]) -> tuple[J.Overlay | None, str]:
    """Write corrupted log blocks; recover; compare with e2fsck. A raise must mean that e2fsck
    replayed nothing (it failed before PASS_REPLAY)."""
    img.put_jblocks(blocks)
    try:
        ov = img.recover()
    except CorruptImageError:
        before = img.read()
        after, out = run_e2fsck(img, workdir)
        candidates = set(range(img.blocks_count // 2, img.blocks_count))
        assert not changed_blocks(before, after, img.bs) & candidates, out
        return None, out
    return ov, assert_like_e2fsck(img, workdir, ov, jsb_too=ov.clean)


def find(img: Img, btype: int, seq: int) -> tuple[int, bytes]:
    return next((i, buf) for i, t, s, buf in log_blocks(img) if t == btype and s == seq)


def test_bad_commit_checksum_ends_replay(workdir: str, v3img: tuple[Img, dict]) -> None:
    img, roles = v3img
    i, buf = find(img, J.COMMIT_BLOCK, 3)
    ov, out = corrupt_and_compare(img, workdir, {i: patch(buf, 16, ">I", 0xDEADBEEF)})
    assert ov is not None and ov.end_sequence == 3 and ov.failed_commit == 3
    assert set(ov) == {roles["a"][0], roles["c"][0]}           # T1 only (b revoked by T2)
    assert "transaction 3 was corrupt" in out


def test_bad_data_checksum_skips_block(workdir: str, v3img: tuple[Img, dict]) -> None:
    img, roles = v3img
    i, desc = find(img, J.DESCRIPTOR_BLOCK, 3)                   # T3: d, c
    data_i = i + 2                                               # c's copy
    buf = img.jblock(data_i)
    ov, out = corrupt_and_compare(img, workdir, {data_i: b"X" + buf[1:]})
    assert ov is not None and ov.bad_blocks == ((roles["c"][0], data_i),) and not ov.clean
    assert ov.end_sequence == 7 and ov[roles["c"][0]].startswith(b"F:2:")   # T1's copy stays
    assert "checksum" in out.lower()
    # (e2fsck's error path leaves s_sequence as it was, not end + 1: recovered_superblock does not
    # copy that, as an old sequence lets stale commits look valid to a later recovery)


def test_bad_descriptor_checksum(workdir: str, v3img: tuple[Img, dict]) -> None:
    """A bad descriptor checksum in a transaction whose commit is not older than the previous one:
    corruption (e2fsck replays nothing, Linux refuses the journal)."""
    img, _ = v3img
    i, desc = find(img, J.DESCRIPTOR_BLOCK, 3)
    ov, out = corrupt_and_compare(img, workdir, {i: patch(desc, 16 * 3, ">B", desc[48] ^ 1)})
    assert ov is None and "checksum error" in out.lower()


def test_stale_descriptor_ends_log(workdir: str, v3img: tuple[Img, dict]) -> None:
    """The same bad descriptor followed by a commit older than the last good one: stale blocks of
    an earlier journal (lazy init), the end of the log."""
    img, roles = v3img
    i, desc = find(img, J.DESCRIPTOR_BLOCK, 3)
    ci, commit = find(img, J.COMMIT_BLOCK, 3)
    seed = img.jsb().csum_seed
    old = fix_commit(patch(commit, 0x30, ">Q", 1000), seed)
    ov, _ = corrupt_and_compare(img, workdir, {i: patch(desc, 48, ">B", desc[48] ^ 1), ci: old})
    assert ov is not None and ov.end_sequence == 3 and ov.clean
    assert set(ov) == {roles["a"][0], roles["c"][0]}


def test_truncated_descriptor(workdir: str, v3img: tuple[Img, dict]) -> None:
    """A descriptor whose tags are cut off (zeroed, LAST_TAG lost; checksum made valid) skips the
    wrong number of blocks: its transaction never finds its commit and the log ends before it."""
    img, roles = v3img
    i, desc = find(img, J.DESCRIPTOR_BLOCK, 3)
    cut = fix_tail(desc[:12 + 16 + 16] + bytes(1024 - 44), img.jsb().csum_seed)
    ov, _ = corrupt_and_compare(img, workdir, {i: cut})
    assert ov is not None and ov.end_sequence == 3 and set(ov) == {roles["a"][0], roles["c"][0]}


def test_revoke_count_overflow(workdir: str, v3img: tuple[Img, dict]) -> None:
    img, _ = v3img
    i, rev = find(img, J.REVOKE_BLOCK, 2)
    bad = fix_tail(patch(rev, 12, ">I", 1021), img.jsb().csum_seed)
    ov, _ = corrupt_and_compare(img, workdir, {i: bad})
    assert ov is None


def test_tag_outside_filesystem(workdir: str, v3img: tuple[Img, dict]) -> None:
    img, _ = v3img
    i, desc = find(img, J.DESCRIPTOR_BLOCK, 3)
    img.put_jblocks({i: fix_tail(patch(desc, 12, ">I", img.blocks_count), img.jsb().csum_seed)})
    with pytest.raises(CorruptImageError, match="outside the filesystem"):
        img.recover()


def test_self_looping_log_is_bounded(workdir: str) -> None:
    """Every log block a descriptor of the same transaction with one tag: e2fsck 1.47.0 steps over
    the ring forever (and ignores SIGTERM meanwhile); here the scan stops once the log is longer
    than the journal."""
    img = make_image(workdir, "img", 1024, "^metadata_csum")
    desc = struct.pack(">IIIIHH", J.JBD2_MAGIC, J.DESCRIPTOR_BLOCK, 1, 500, 0,
                       J.FLAG_SAME_UUID | J.FLAG_LAST_TAG).ljust(1024, b"\0")
    blocks = {i: desc for i in range(1, 1024)}
    blocks[0] = patch(img.jblock(0), 0x1C, ">I", 1)
    img.put_jblocks(blocks)
    t = time.monotonic()
    with pytest.raises(CorruptImageError, match="longer than the journal"):
        img.recover()
    assert time.monotonic() - t < 2


def test_short_journal_read(v3img: tuple[Img, dict]) -> None:
    img, _ = v3img
    rd = img.reader()
    with pytest.raises(CorruptImageError, match="bytes, not 1024"):
        J.recover(lambda i: rd(i)[:100] if i == 5 else rd(i), 1024, fs_blocks_count=img.blocks_count,
                  journal_blocks=1024)


def synthetic(maxlen: int, bs: int, blocks: dict[int, bytes], *, incompat: int = 0) -> Callable[[int], bytes]:
    """A journal in memory, no checksums: superblock fields as given, log blocks from ``blocks``."""
    jsb = struct.pack(">IIIIIIIIiIII16sI", J.JBD2_MAGIC, J.SUPERBLOCK_V2, 0, bs, maxlen, 1, 1, 1, 0, 0,
                      incompat, 0, b"u" * 16, 1).ljust(bs, b"\0")
    zero = bytes(bs)
    return lambda i: jsb if i == 0 else blocks.get(i, zero)


def header(btype: int, seq: int, body: bytes, bs: int) -> bytes:
    return (struct.pack(">III", J.JBD2_MAGIC, btype, seq) + body).ljust(bs, b"\0")


def test_descriptor_running_past_the_journal() -> None:
    """64 KiB blocks hold 8190 tags: more than a 1024-block ring, so one wrap leaves the next block
    past s_maxlen, where Linux's jread fails (EFSCORRUPTED)."""
    bs = 65536
    tag = struct.pack(">IHH", 7, 0, J.FLAG_SAME_UUID)
    rd = synthetic(1024, bs, {1: header(J.DESCRIPTOR_BLOCK, 1, tag * 8000, bs)})
    with pytest.raises(CorruptImageError, match="past the journal's end"):
        J.recover(rd, bs, fs_blocks_count=100, journal_blocks=1024)


def test_fast_commit_area() -> None:
    """Fast commits continuing the log are refused (their replay is logical); stale ones are not."""
    bs = 1024
    tag = struct.pack(">IHH", 10, 0, J.FLAG_SAME_UUID | J.FLAG_LAST_TAG)
    blocks = {1: header(J.DESCRIPTOR_BLOCK, 1, tag, bs), 2: b"d" * bs, 3: header(J.COMMIT_BLOCK, 1, b"", bs)}
    for tid, refused in ((2, True), (1, False)):
        blocks[1300 - 256 + 1] = struct.pack("<HHII", J.EXT4_FC_TAG_HEAD, 8, 0, tid).ljust(bs, b"\0")
        rd = synthetic(1300, bs, blocks, incompat=J.INCOMPAT_FAST_COMMIT)
        if refused:
            with pytest.raises(UnsupportedFeatureError):
                J.recover(rd, bs, fs_blocks_count=100, journal_blocks=1300)
        else:
            assert dict(J.recover(rd, bs, fs_blocks_count=100, journal_blocks=1300)) == {10: b"d" * bs}
    with pytest.raises(CorruptImageError, match="fast-commit"):
        J.recover(synthetic(1200, bs, blocks, incompat=J.INCOMPAT_FAST_COMMIT), bs, fs_blocks_count=100,
                  journal_blocks=1200)


def test_crc32_be() -> None:
    def ref(crc: int, data: bytes) -> int:
        for byte in data:
            crc ^= byte << 24
            for _ in range(8):
                crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
        return crc
    for n, seed in ((0, 0), (1, 0xFFFFFFFF), (7, 0x12345678), (300, 0xFFFFFFFF)):
        data = bytes((i * 37 + n) & 0xFF for i in range(n))
        assert J.crc32_be(seed, data) == ref(seed, data)


# -- fuzzing ------------------------------------------------------------------------------------------
@dataclass
class FuzzBase:
    img: Img
    jblocks: list[bytes]      # the journal as written (block 0: the superblock)
    used: int                 # log blocks 1..used: the log and a little past its end
    structural: list[int]     # descriptor, revoke and commit blocks


@pytest.fixture(scope="module", params=["v3", "nocsum"])
def fuzz_base(request: pytest.FixtureRequest) -> Iterator[FuzzBase]:
    d = tempfile.mkdtemp(prefix="xipfs-jbd2-fuzz-", dir=SHM)
    try:
        v3 = request.param == "v3"
        img = make_image(d, "base.img", 1024, "metadata_csum,64bit" if v3 else "^metadata_csum,64bit")
        write_scenario(img, d, "-c" if v3 else "")
        rd = img.reader()
        used = img.recover().head_block + 2
        yield FuzzBase(img, [rd(i) for i in range(1024)], used, [i for i, *_ in log_blocks(img)])
    finally:
        shutil.rmtree(d, ignore_errors=True)


#: (aim at a descriptor/revoke/commit block?, position, xor mask)
mutations = st.lists(st.tuples(st.booleans(), st.integers(0, 10**9), st.integers(1, 255)),
                     min_size=1, max_size=6)


def mutate(base: FuzzBase, muts: list[tuple[bool, int, int]]) -> dict[int, bytes]:
    """XOR bytes of the log: anywhere in blocks 1..used, or in the structural blocks, mostly in
    their first 96 bytes (headers and the first tags)."""
    out: dict[int, bytes] = {}
    for aim, pos, x in muts:
        if aim:
            i = base.structural[pos // 1024 % len(base.structural)]
            off = pos % 1024 if pos & 1 else pos % 96
        else:
            i, off = 1 + pos // 1024 % base.used, pos % 1024
        b = bytearray(out.get(i, base.jblocks[i]))
        b[off] ^= x
        out[i] = bytes(b)
    return out


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=mutations)
def test_fuzz_never_crashes(fuzz_base: FuzzBase, muts: list[tuple[bool, int, int]]) -> None:
    """Flipped bytes give an overlay or CorruptImageError, never another exception or a hang."""
    blocks = list(fuzz_base.jblocks)
    for i, buf in mutate(fuzz_base, muts).items():
        blocks[i] = buf
    img = fuzz_base.img
    try:
        ov = J.recover(blocks.__getitem__, 1024, fs_blocks_count=img.blocks_count, journal_blocks=1024)
    except (CorruptImageError, UnsupportedFeatureError):
        return
    assert all(0 <= b < img.blocks_count and len(d) == 1024 for b, d in ov.items())


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(muts=mutations)
def test_fuzz_against_debugfs_journal_run(fuzz_base: FuzzBase, workdir: str,
                                          muts: list[tuple[bool, int, int]]) -> None:
    """Differential: debugfs ``jr`` (e2fsck's recovery.c without the rest of e2fsck) replays the
    same blocks, or nothing when we call the log corrupt before PASS_REPLAY."""
    img = fuzz_base.img
    work = img.copy(os.path.join(workdir, "f.img"))
    work.put_jblocks(mutate(fuzz_base, muts))
    before = work.read()
    try:
        ov: J.Overlay | None = work.recover(before)
        err = ""
    except CorruptImageError as e:
        ov, err = None, str(e)
    if "outside the filesystem" in err:
        return                                  # debugfs writes the other blocks (and past EOF)
    lowest_free = img.blocks_count // 2
    if ov is not None and any(b < lowest_free for b in ov):
        return                                  # a flipped tag hits metadata or the journal itself
    proc = run(["timeout", "-s", "KILL", "8", "debugfs", "-w", "-R", "jr", work.path], check=False,
               timeout=10)
    assert proc.returncode not in (124, 137) or "longer than the journal" in err
    after = work.read()
    changed = {b for b in changed_blocks(before, after, img.bs) if b >= lowest_free}
    if ov is None:
        assert not changed, err
        return
    bs = img.bs
    assert changed == {b for b, d in ov.items() if before[b * bs:(b + 1) * bs] != d}
    for b, d in ov.items():
        assert after[b * bs:(b + 1) * bs] == d
