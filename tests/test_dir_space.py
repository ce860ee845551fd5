"""Where new directory entries go after removals (``DirSpace``), with e2fsprogs as the oracle.

Removing an entry updates the block's free-space bookkeeping incrementally
(``DirSpace.removed``) instead of rescanning the block, and rescans only when the entry that
keeps the freed space becomes the block's last one (an old gap may then be the same space as
the tail). These tests check that images stay ``e2fsck -fn`` clean and list what a Python model
says (``debugfs`` agreeing), that freed space is reused exactly where a fresh rescan says it
fits (the first fit, as Linux), and that the incremental bookkeeping never claims room that
is not there. Block sizes 1 KiB, 4 KiB and 64 KiB (whose whole-block rec_len is 0 or 65535).

At 64 KiB a new directory block and a block's lone unused whole-block entry carry a rec_len
of 65536, stored as 65535: the two tests at the end pin that down (they crashed with
``struct.error`` before); the other 64 KiB scenarios fill their directories with debugfs.
"""

from __future__ import annotations

import os
import random
import stat
import struct
from collections.abc import Iterator

import pytest
from e2fs import SHM, assert_fsck_clean, debugfs_r, fsck, run

import xipfs
from xipfs.extfs import namei
from xipfs.extfs.dir import DirSpace, insert_into_block, rec_len_of
from xipfs.extfs.dir import dir_blocks as blocks_of_dir
from xipfs.extfs.namei import resolve

BIG = 65536
SIZES = (1024, 4096, BIG)
IMAGE_BYTES = {1024: 16 << 20, 4096: 32 << 20, BIG: 64 << 20}
#: Entries that fill about this many directory blocks: fewer (and longer names) at 64 KiB,
#: where each check rescans thousands of entries.
BLOCKS = {1024: 12, 4096: 8, BIG: 3}
NEEDS = (12, 16, 20, 64, 264)
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789._-"
_DIRENT = struct.Struct("<IHBB")


# -- images -------------------------------------------------------------------------------------
@pytest.fixture
def img(tmp_path) -> Iterator[str]:
    path = os.path.join(SHM, f"xipfs-dirspace-{os.getpid()}-{tmp_path.name}.img")
    yield path
    if os.path.exists(path):
        os.unlink(path)


def make_image(path: str, bs: int) -> None:
    """``xipfs.mkfs`` at ``bs``; skips 64 KiB when e2fsck cannot open such an image at all."""
    xipfs.mkfs(path, IMAGE_BYTES[bs], block_size=bs)
    if bs == BIG:
        rc, out = fsck(path)
        if rc >= 8:             # an operational error: this e2fsck does not take 64 KiB blocks
            pytest.skip(f"e2fsck refuses a 64 KiB-block image:\n{out}")
    assert_fsck_clean(path)


def fill_dir(path: str, bs: int, entries: dict[str, str]) -> None:
    """Make ``/dir`` holding ``entries`` (name -> "f" file or "d" directory), in that order.

    Through xipfs, except at 64 KiB (xipfs cannot add a 64 KiB directory block yet): there
    debugfs (e2fsprogs) makes them.
    """
    if bs != BIG:
        with xipfs.open(path, "r+") as fs:
            fs.mkdir("/dir")
            for name, kind in entries.items():
                if kind == "d":
                    fs.mkdir(f"/dir/{name}")
                else:
                    fs.write_bytes(f"/dir/{name}", b"")
        return
    empty = path + ".empty"
    cmds = path + ".cmds"
    with open(empty, "wb"), open(cmds, "w") as f:
        f.write("mkdir /dir\ncd /dir\n")
        for name, kind in entries.items():
            f.write(f"mkdir {name}\n" if kind == "d" else f"write {empty} {name}\n")
    try:
        run(["debugfs", "-w", "-f", cmds, path])
    finally:
        os.unlink(empty)
        os.unlink(cmds)


def debugfs_listing(path: str, d: str = "/dir") -> list[tuple[int, str]]:
    """``debugfs -R "ls -l DIR"``: (inode, name) of the live entries, in on-disk order."""
    out = debugfs_r(path, f"ls -l {d}").decode()
    rows = []
    for line in out.splitlines():
        fields = line.split()
        if fields and fields[-1] not in (".", "..") and int(fields[0]):    # 0: an unused record
            rows.append((int(fields[0]), fields[-1]))
    return rows


def check_image(path: str, model: dict[str, str]) -> list[str]:
    """e2fsck clean; xipfs and debugfs both list exactly ``model``; names in on-disk order."""
    assert_fsck_clean(path)
    listed = debugfs_listing(path)
    with xipfs.open(path, "r") as fs:
        names = fs.listdir("/dir")
        assert sorted(names) == sorted(model)
        for name in names:
            st = fs.lstat(f"/dir/{name}")
            assert ("d" if stat.S_ISDIR(st.st_mode) else "f") == model[name], name
        inos = {name: fs.lstat(f"/dir/{name}").st_ino for name in names}
    assert sorted(n for _, n in listed) == sorted(model), "debugfs lists other names"
    assert {n: i for i, n in listed} == inos, "debugfs gives other inode numbers"
    return [n for _, n in listed]


# -- directory blocks, parsed here (not by xipfs) -----------------------------------------------
def records(buf, bs: int) -> list[tuple[int, int, int, int]]:
    """(offset, inode, rec_len, slack) of every record of a directory block."""
    out = []
    pos = 0
    while pos < bs:
        ino, rec_len, name_len, _ = _DIRENT.unpack_from(buf, pos)
        if bs == BIG and rec_len in (0, 65535):
            rec_len = BIG
        assert rec_len >= 12 and rec_len % 4 == 0 and pos + rec_len <= bs, (pos, rec_len)
        used = (8 + name_len + 3) & ~3 if ino else 0
        out.append((pos, ino, rec_len, rec_len - used))
        pos += rec_len
    return out


def dir_blocks(fs, path: str = "/dir") -> tuple[object, object, list]:
    vol = fs.volume
    d = resolve(vol, path)
    return vol, d, list(blocks_of_dir(vol, d))


def fresh_space(fs, path: str = "/dir") -> DirSpace:
    """What a rescan of every block of the directory says (a new ``DirSpace``)."""
    vol, _, blocks = dir_blocks(fs, path)
    return DirSpace(blocks, vol.bs)


def block_of(fs, name: str) -> int:
    return fresh_space(fs).where[name.encode()][0]


# -- names and the model ------------------------------------------------------------------------
LENGTHS = (1, 2, 3, 4, 5, 7, 8, 9, 12, 13, 16, 24, 31, 40, 57, 64, 100, 127, 180, 200, 240, 255)
LONG = tuple(n for n in LENGTHS if n >= 40)


class Namer:
    """Unique names of varied lengths (1 to 255 bytes): a base-36 counter, then padding."""

    def __init__(self, rng: random.Random, prefix: str = "", lengths: tuple = LENGTHS) -> None:
        self.rng = rng
        self.n = 0
        self.prefix = prefix
        self.lengths = lengths

    def __call__(self, length: int | None = None) -> str:
        self.n += 1
        n, tag = self.n, ""
        while n:
            n, r = divmod(n, 36)
            tag = ALPHABET[r] + tag
        tag = self.prefix + tag
        length = self.rng.choice(self.lengths) if length is None else length
        if length <= len(tag) + 1:
            return tag
        return tag + "-" + "".join(self.rng.choice(ALPHABET) for _ in range(length - len(tag) - 1))


def initial_entries(bs: int, rng: random.Random) -> dict[str, str]:
    """Enough names to fill about ``BLOCKS[bs]`` blocks; one in twenty a directory."""
    namer = Namer(rng, "i", LONG if bs == BIG else LENGTHS)
    entries: dict[str, str] = {}
    used = 24
    while used < BLOCKS[bs] * bs * 0.9:
        name = namer()
        entries[name] = "d" if rng.random() < 0.05 else "f"
        used += rec_len_of(len(name))
    return entries


def create(fs, model: dict[str, str], name: str, kind: str) -> None:
    """Create ``/dir/name`` and check it went into the first block a fresh rescan says fits
    (or, none fitting, into one new block): freed space is reused, the directory does not grow
    while it has room."""
    space = fresh_space(fs)
    want, _ = space.find_slot(rec_len_of(len(name)))
    nblocks = len(space.tail)
    if kind == "d":
        fs.mkdir(f"/dir/{name}")
    else:
        fs.write_bytes(f"/dir/{name}", b"")
    model[name] = kind
    got = block_of(fs, name)
    size = fs.stat("/dir").st_size
    if want >= 0:
        assert (got, size) == (want, nblocks * fs.block_size), f"{name!r}: first fit is block {want}"
    else:
        assert (got, size) == (nblocks, (nblocks + 1) * fs.block_size), f"{name!r}: no room, new block"


def remove(fs, model: dict[str, str], name: str) -> None:
    (fs.rmdir if model.pop(name) == "d" else fs.unlink)(f"/dir/{name}")


# -- 1. removal orders through the public API ---------------------------------------------------
@pytest.mark.parametrize("bs", SIZES)
def test_removal_orders_stay_clean(bs, img):
    """Removals in on-disk, reverse, random and every-other order, interleaved with new entries
    of varied name lengths and renames: after each phase e2fsck is clean and xipfs, debugfs and
    the model list the same names; each new entry lands where a fresh rescan says it fits."""
    rng = random.Random(bs)
    make_image(img, bs)
    model = initial_entries(bs, rng)
    fill_dir(img, bs, model)
    order = check_image(img, model)
    with xipfs.open(img, "r") as fs:
        assert fs.stat("/dir").st_size >= BLOCKS[bs] * bs - bs     # several blocks
    namer = Namer(rng, "n")
    third = len(order) // 3

    def phase(victims: list[str], every: int) -> list[str]:
        with xipfs.open(img, "r+") as fs:
            for i, name in enumerate(victims):
                remove(fs, model, name)
                if every and i % every == every - 1:
                    create(fs, model, namer(), "d" if rng.random() < 0.05 else "f")
        return check_image(img, model)

    order = phase(order[:third], 2)                        # on-disk order, from the start
    order = phase(order[-third:][::-1], 2)                 # reverse, from the end
    order = phase(rng.sample(order, len(order) // 2), 3)  # random
    order = phase(order[::2], 2)                           # every other one
    with xipfs.open(img, "r+") as fs:                      # renames to other lengths
        for name in rng.sample(order, len(order) // 4):
            new = namer()
            fs.rename(f"/dir/{name}", f"/dir/{new}")
            model[new] = model.pop(name)
    order = check_image(img, model)
    order = phase(rng.sample(order, len(order)), 0)        # everything, in random order
    assert order == []


# -- 2. freed space is found again; the gap that joined the tail ------------------------------
def two_block_dir(img: str, bs: int) -> tuple[dict[str, str], str]:
    """``/dir`` of two blocks: block 0 holds only ``.`` and ``..``, block 1 one entry (kept so
    that no 64 KiB block is a lone unused entry). Returns the model and block 1's entry."""
    make_image(img, bs)
    per_block = bs // rec_len_of(200)
    entries = {f"p{i:04d}".ljust(200, "p"): "f" for i in range(per_block + per_block // 2)}
    fill_dir(img, bs, entries)
    with xipfs.open(img, "r+") as fs:
        _, _, blocks = dir_blocks(fs)
        assert len(blocks) == 2
        first = records(blocks[1][1], bs)[0]
        keep = bytes(blocks[1][1][first[0] + 8:first[0] + 8 + 200]).decode()
        for name in list(entries):
            if name != keep:
                fs.unlink(f"/dir/{name}")
    model = {keep: "f"}
    check_image(img, model)
    return model, keep


def tail_slack(fs, lblk: int) -> int:
    return records(dir_blocks(fs)[2][lblk][1], fs.block_size)[-1][3]


def fill_tail(fs, model: dict[str, str], lblk: int, below: int, namer: Namer, cap: int) -> None:
    """Append names of up to ``cap`` bytes to block ``lblk`` until its tail has < ``below``."""
    while (slack := tail_slack(fs, lblk)) >= below:
        name = namer(min(cap, slack) - 8)
        create(fs, model, name, "f")
        assert block_of(fs, name) == lblk


@pytest.mark.parametrize("bs", SIZES)
def test_gap_joins_tail_then_old_gap_size(bs, img):
    """A gap is recorded (B removed), the block's last entry goes so the gap joins the tail (C
    removed), appends use up the tail, then an entry of B's size comes: it must go to the next
    block (a stale gap once sent it into the full block: "directory block changed under the
    writer"). Then two freed neighbours in the full block make a gap that the next entry of that
    size must fill, although the next block has room."""
    model, _ = two_block_dir(img, bs)
    big, filler = rec_len_of(200), rec_len_of(100)
    with xipfs.open(img, "r+") as fs:
        for name in ("a", "b" * 200, "c"):
            create(fs, model, name, "f")
            assert block_of(fs, name) == 0
        remove(fs, model, "b" * 200)                       # gap of 208 after "a"
        remove(fs, model, "c")                             # "a" is last: the gap is the tail now
        fill_tail(fs, model, 0, big, Namer(random.Random(1), "f"), filler)
        create(fs, model, "g" * 200, "f")                  # B's size: block 0 has no room
        assert block_of(fs, "g" * 200) == 1
        assert fs.stat("/dir").st_size == 2 * bs
        # two neighbours in the middle of the full block 0 make a gap bigger than its tail
        where = {w: n.decode() for n, w in fresh_space(fs).where.items()}
        recs = records(dir_blocks(fs)[2][0][1], bs)
        mid = [where[0, off] for off, _, rec_len, _ in recs[3:-1] if rec_len == filler]
        remove(fs, model, mid[0])
        remove(fs, model, mid[1])
        need = 2 * filler
        assert tail_slack(fs, 0) < need <= fresh_space(fs).gap[0]
        create(fs, model, "h" * (need - 8), "f")
        assert block_of(fs, "h" * (need - 8)) == 0
    check_image(img, model)


@pytest.mark.parametrize("bs", SIZES)
def test_first_entry_cleared_then_reused(bs, img):
    """Removing a block's first entry clears it in place (no entry before it to merge into);
    that space, grown by the next removal, is the first fit for a new name of its size once
    the tails are full."""
    model, keep = two_block_dir(img, bs)
    namer = Namer(random.Random(2), "z")
    with xipfs.open(img, "r+") as fs:
        fill_tail(fs, model, 0, 12, namer, 260)            # block 0 full
        for name in ("q" * 40, "r" * 60, "s" * 20):        # block 1: keep, q, r, s
            create(fs, model, name, "f")
            assert block_of(fs, name) == 1
        fill_tail(fs, model, 1, rec_len_of(200), namer, 260)
        remove(fs, model, keep)                            # offset 0 of block 1: cleared
        remove(fs, model, "q" * 40)                        # merged into the cleared entry
        create(fs, model, "t" * 200, "f")                  # fits the cleared one: 208 + 48
        assert fresh_space(fs).where[b"t" * 200] == (1, 0)
        assert fs.stat("/dir").st_size == 2 * bs
    check_image(img, model)


@pytest.mark.parametrize("bs", SIZES)
def test_block_shrinks_to_its_first_entry(bs, img):
    """Removals that leave a block's first entry alone make it span the whole block (rec_len
    65535 at 64 KiB): the block's tail is then that entry, and the next name goes right after
    it, not where a removed entry's header still lies."""
    model, keep = two_block_dir(img, bs)
    namer = Namer(random.Random(3), "y")
    with xipfs.open(img, "r+") as fs:
        fill_tail(fs, model, 0, 12, namer, 260)            # block 0 full
        for name in ("q" * 40, "r" * 60, "s" * 20):        # block 1: keep, q, r, s
            create(fs, model, name, "f")
        for name in ("r" * 60, "q" * 40, "s" * 20):        # middle, middle, then the last one
            remove(fs, model, name)
        _, _, blocks = dir_blocks(fs)
        assert records(blocks[1][1], bs) == [(0, fs.lstat(f"/dir/{keep}").st_ino, bs, bs - 208)]
        if bs == BIG:
            assert bytes(blocks[1][1][4:6]) == b"\xff\xff"
        create(fs, model, "u" * 200, "f")
        assert fresh_space(fs).where[b"u" * 200] == (1, rec_len_of(200))
    check_image(img, model)


# -- 3. the incremental bookkeeping against a rescan ---------------------------------------------
def claim_is_real(blocks: list, bs: int, space: DirSpace, lblk: int, kind: str, need: int) -> bool:
    """The slot ``find_slot`` gave really takes ``need`` bytes: ``insert_into_block`` finds it,
    and a "tail" claim names the block's real last record."""
    if lblk < 0:
        return True
    buf = blocks[lblk][1]
    at = space.tail[lblk][0] if kind == "tail" else None
    name = b"x" * (need - 8)
    try:
        off, _ = insert_into_block(buf, bs, at, name, 1, 1)
    except xipfs.CorruptImageError:
        return False
    recs = records(buf, bs)
    if kind == "tail" and recs[-1][0] != at:
        return False
    return any(o <= off and off + need <= o + r for o, _, r, _ in recs)


@pytest.mark.parametrize("bs", SIZES)
def test_incremental_space_agrees_with_rescan(bs, img):
    """After every removal in a random order (with a new entry now and then), the DirSpace kept
    up to date by removals answers ``find_slot`` as one built afresh from the blocks does, or,
    where it differs, claims only room that is really there."""
    rng = random.Random(1000 + bs)
    make_image(img, bs)
    entries = initial_entries(bs, rng)
    fill_dir(img, bs, entries)
    namer = Namer(rng, "n")
    with xipfs.open(img, "r+") as fs:
        vol, d, _ = dir_blocks(fs)
        names = [n.encode() for n in fs.listdir("/dir")]
        rng.shuffle(names)
        kinds = {n.encode(): k for n, k in entries.items()}
        for i, name in enumerate(names):
            (namei.rmdir if kinds.pop(name) == "d" else namei.unlink)(vol, d, name)
            if i % 5 == 4:
                new = namer().encode()
                namei.create(vol, d, new, 0o100644, 0, 0)
                kinds[new] = "f"
            blocks = list(blocks_of_dir(vol, d))
            inc = vol.spaces[d.ino]
            fresh = DirSpace(blocks, bs)
            for need in NEEDS:
                got, want = inc.find_slot(need), fresh.find_slot(need)
                if got != want:                  # allowed, but only when the claim is real
                    assert claim_is_real(blocks, bs, inc, *got, need), \
                        f"removal {i}: find_slot({need}) = {got} claims room that is not there"
        assert sorted(kinds) == sorted(n.encode() for n in fs.listdir("/dir"))
    assert_fsck_clean(img)


# -- 64 KiB blocks: a whole-block rec_len is stored as 65535 ---------------------------------
def test_64k_directory_gets_a_second_block(img):
    """A 64 KiB directory that outgrows its block gets a second one."""
    make_image(img, BIG)
    with xipfs.open(img, "r+") as fs:
        fs.mkdir("/dir")
        for i in range(BIG // rec_len_of(200) + 1):
            fs.write_bytes("/dir/" + f"{i:04d}".ljust(200, "x"), b"")
        assert fs.stat("/dir").st_size == 2 * BIG
    assert_fsck_clean(img)


def test_64k_emptied_block_is_reused(img):
    """A new name fits a 64 KiB block emptied by removals (its one unused entry)."""
    model, keep = two_block_dir(img, BIG)
    with xipfs.open(img, "r+") as fs:
        while records(dir_blocks(fs)[2][0][1], BIG)[-1][3] >= rec_len_of(200):   # fill block 0
            name = f"{len(model):04d}".ljust(200, "y")
            fs.write_bytes(f"/dir/{name}", b"")
            model[name] = "f"
        remove(fs, model, keep)                  # block 1: one unused entry, rec_len 65535
        fs.write_bytes("/dir/" + "w" * 200, b"")
        model["w" * 200] = "f"
    check_image(img, model)
