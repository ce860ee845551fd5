"""The block map on its own (``Inode.map``: runs, assign, truncate), on images in anonymous memory.

Files are laid out across every part of the indirect tree: the direct blocks, the single-,
double- and triple-indirect ranges, with holes between and runs that cross each boundary
(also the boundary between two children of a double or triple block). The oracles are outside
the code under test:

* the tree as stored: an independent walk of ``i_block`` and the indirect blocks in the image's
  bytes (``stored_tree``), which ``debugfs stat`` must agree with (data and IND/DIND/TIND);
* a model of the runs made from that walk (every run merged, holes included);
* ``e2fsck -fn`` on the image written out to /dev/shm (block bitmaps, i_blocks, i_size).
"""

from __future__ import annotations

import random
import struct

import pytest
from e2fs import MemoryImage, debugfs_stat

from xipfs.extfs import data as D
from xipfs.extfs import namei

BLOCK_SIZES = (1024, 4096)
REG = 0o100644
Run = tuple[int, int, int]


# -- the image -------------------------------------------------------------------------------
def bounds(img: MemoryImage) -> tuple[int, int, int]:
    """First file block of the single-, double- and triple-indirect ranges."""
    apb = img.bs // 4
    return 12, 12 + apb, 12 + apb + apb * apb


def new_file(img: MemoryImage, name: str):  # noqa: ANN201 - an Inode
    return namei.create(img.vol, img.vol.root, name.encode(), REG, 0, 0)


# -- the oracles -------------------------------------------------------------------------------
def stored_tree(img: MemoryImage, ino: int) -> tuple[dict[int, int], dict[int, tuple[int, int]]]:
    """The block tree of inode ``ino`` read from the image bytes, independently of BlockMap:
    ({file block: device block}, {indirect block: (level, first file block it covers)})."""
    bs, apb = img.bs, img.bs // 4
    raw = bytes(img.dev.view(img.vol.inode_offset(ino), 128))
    words = struct.unpack_from("<15I", raw, 40)
    data = {i: p for i, p in enumerate(words[:12]) if p}
    meta: dict[int, tuple[int, int]] = {}

    def walk(ptr: int, level: int, base: int) -> None:
        if not ptr:
            return
        meta[ptr] = (level, base)
        entries = struct.unpack(f"<{apb}I", bytes(img.dev.view(ptr * bs, bs)))
        child = apb ** (level - 1)
        for i, e in enumerate(entries):
            if e:
                if level == 1:
                    data[base + i] = e
                else:
                    walk(e, level - 1, base + i * child)

    base, span = 12, apb
    for level in (1, 2, 3):
        walk(words[11 + level], level, base)
        base += span
        span *= apb
    return data, meta


def _append(out: list[Run], lb: int, n: int, pb: int) -> None:
    if out:
        plb, pn, ppb = out[-1]
        if plb + pn == lb and ((ppb == 0 and pb == 0) or (ppb and pb == ppb + pn)):
            out[-1] = (plb, pn + n, ppb)
            return
    out.append((lb, n, pb))


def model_runs(data: dict[int, int], first: int, last: int) -> list[Run]:
    """The runs of ``[first, last)`` by the map ``data``: maximal, holes included."""
    out: list[Run] = []
    pos = first
    for lb in sorted(k for k in data if first <= k < last):
        if lb > pos:
            _append(out, pos, lb - pos, 0)
        _append(out, lb, 1, data[lb])
        pos = lb + 1
    if pos < last:
        _append(out, pos, last - pos, 0)
    return out


def assert_debugfs_agrees(path: str, ino: int, data: dict[int, int], meta: dict, bs: int) -> None:
    d = debugfs_stat(path, ino)
    assert d.blocks == data, "debugfs maps the file otherwise"
    assert sorted(d.meta) == sorted(meta), "debugfs sees other indirect blocks"
    assert d.blockcount == (len(data) + len(meta)) * (bs // 512)


def expand(runs: list[tuple[int, int]]) -> list[int]:
    return [p + i for p, n in runs for i in range(n)]


# -- building files ----------------------------------------------------------------------------
def pattern(lblk: int, bs: int) -> bytes:
    return struct.pack("<II", lblk, 0x5A5A5A5A) * (bs // 8)


def assign(img: MemoryImage, node, first: int, last: int) -> list[Run]:  # noqa: ANN001
    """``node.map.assign(first, last)``, each new block filled with its pattern; i_size grows to
    cover it and the inode is stored (what ``data.write`` does). Returns the fill calls."""
    bs = img.bs
    calls: list[Run] = []

    def fill(lb: int, n: int, pb: int) -> None:
        calls.append((lb, n, pb))
        img.dev.write(b"".join(pattern(lb + i, bs) for i in range(n)), pb * bs)

    got = node.map.assign(first, last, fill)
    assert got == last - first
    if last * bs > node.size:
        D.set_size(img.vol, node, last * bs)
    img.vol.write_inode(node)
    return calls


def layout(img: MemoryImage) -> tuple[list[tuple[int, int]], int]:
    """Ranges mapped (crossing every boundary of the tree, holes between) and the file's size
    in blocks (a hole at the end)."""
    s, d, t = bounds(img)
    apb = img.bs // 4
    ranges = [(0, 3), (5, s + 2), (d - 2, d + 3), (d + apb - 1, d + apb + 2), (d + 5 * apb, d + 5 * apb + 1),
              (t - 2, t + 2), (t + apb * apb - 1, t + apb * apb + 1)]
    return ranges, t + apb * apb + 5


def sparse_file(img: MemoryImage, name: str = "f"):  # noqa: ANN201 - an Inode
    node = new_file(img, name)
    ranges, size = layout(img)
    for a, b in ranges:
        assign(img, node, a, b)
    D.set_size(img.vol, node, size * img.bs)
    img.vol.write_inode(node)
    return node


def query_ranges(img: MemoryImage, nblocks: int, rnd: random.Random) -> list[tuple[int, int]]:
    """Ranges starting and ending on each side of every boundary, and random ones."""
    s, d, t = bounds(img)
    apb = img.bs // 4
    marks = sorted({0, 1, 3, 5, 11, s, s + 1, s + 2, d - 2, d, d + 3, d + apb - 1, d + apb, d + apb + 2,
                    t - 2, t, t + 1, t + 2, t + apb * apb - 1, t + apb * apb, nblocks - 1, nblocks,
                    nblocks + 7})
    out = [(a, b) for a in marks for b in marks if a < b]
    out += [(a, a + 1) for a in marks]
    for _ in range(100):
        a = rnd.randrange(nblocks)
        out.append((a, a + rnd.choice([1, 2, 7, apb, 5 * apb, nblocks])))
    return out


# -- runs ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_runs_over_every_level_with_holes(mem_image, bs: int) -> None:
    img = mem_image(bs)
    node = sparse_file(img)
    data, meta = stored_tree(img, node.ino)
    ranges, size = layout(img)
    assert sorted(data) == [lb for a, b in ranges for lb in range(a, b)]
    assert {level for level, _ in meta.values()} == {1, 2, 3}
    path = img.check()
    assert_debugfs_agrees(path, node.ino, data, meta, bs)
    # every block holds what fill wrote for it
    for lb, pb in data.items():
        assert bytes(img.dev.view(pb * bs, 8)) == pattern(lb, bs)[:8], lb
    m = node.map
    assert m.nblocks == size
    rnd = random.Random(bs)
    for a, b in query_ranges(img, size, rnd):
        want = model_runs(data, a, min(b, size))
        assert m.runs(a, b) == want, (a, b)
        node.reset_map()                          # and from a cold map (nothing cached)
        assert node.map.runs(a, b) == want, (a, b)
        m = node.map
    for lb in [*data, *(lb + 1 for lb in data), size - 1, size, size + 100, -1]:
        assert m.bmap(lb) == (data.get(lb, 0) if 0 <= lb < size else 0), lb


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_whole_file_runs(mem_image, bs: int) -> None:
    """runs(0, EOF) of a large file (the whole-file cache), then parts of it cut from that cache."""
    img = mem_image(bs)
    node = sparse_file(img)
    data, _ = stored_tree(img, node.ino)
    size = node.map.nblocks
    whole = node.map.runs(0, size)
    assert whole == model_runs(data, 0, size)
    assert sum(n for _, n, _ in whole) == size
    assert all(a[0] + a[1] == b[0] for a, b in zip(whole, whole[1:], strict=False))
    for a, b in query_ranges(img, size, random.Random(bs + 1)):
        assert node.map.runs(a, b) == model_runs(data, a, min(b, size)), (a, b)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_runs_past_eof_with_a_limit(mem_image, bs: int) -> None:
    """With ``limit`` (the write path looking past EOF) the part past EOF is one hole."""
    img = mem_image(bs)
    node = new_file(img, "f")
    assign(img, node, 0, 20)
    data, _ = stored_tree(img, node.ino)
    m = node.map
    assert m.runs(15, 40) == model_runs(data, 15, 20)
    assert m.runs(15, 40, 40) == model_runs(data, 15, 40)
    assert m.runs(15, 40, 30) == model_runs(data, 15, 30)
    assert m.runs(25, 40, 40) == [(25, 15, 0)]
    assert m.runs(25, 40) == []


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_contiguous_file_is_one_run(mem_image, bs: int) -> None:
    """A file written in one go on an empty image: its data is one run, whatever the range,
    also when the indirect block sits elsewhere."""
    img = mem_image(bs)
    node = new_file(img, "small")
    assign(img, node, 0, 7)
    (lb, n, p), = node.map.runs(0, 7)
    assert (lb, n) == (0, 7) and p
    assert node.map.runs(2, 5) == [(2, 3, p + 2)]
    data, _ = stored_tree(img, node.ino)
    assert data == {i: p + i for i in range(7)}
    big = new_file(img, "big")
    n = 12 + (img.bs // 4) + 40
    assign(img, big, 0, n)
    data, meta = stored_tree(img, big.ino)
    assert sorted(level for level, _ in meta.values()) == [1, 1, 2]
    assert big.map.runs(0, n) == model_runs(data, 0, n)
    assert len(big.map.runs(0, n)) <= 3
    img.check()


# -- assign --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_assign_fills_holes_and_keeps_what_is_mapped(mem_image, bs: int) -> None:
    img = mem_image(bs)
    node = sparse_file(img)
    before, meta_before = stored_tree(img, node.ino)
    s, d, t = bounds(img)
    apb = img.bs // 4
    free0 = img.vol.balloc.free_blocks()
    blocks0 = node.blocks
    for a, b in [(1, s + 4), (d - 4, d + apb + 4), (t - 3, t + 3)]:
        holes = {lb for lb in range(a, b) if lb not in before}
        calls = assign(img, node, a, b)
        filled = [lb + i for lb, n, _ in calls for i in range(n)]
        assert sorted(filled) == sorted(holes), (a, b)      # fill saw each hole once, nothing else
        data, meta = stored_tree(img, node.ino)
        for lb, pb in before.items():
            assert data[lb] == pb, lb                         # mapped blocks stay where they were
        assert {lb: data[lb] for lb in holes} == {lb + i: pb + i for lb, n, pb in calls for i in range(n)}
        assert set(data) == set(before) | holes
        before = data
    data, meta = stored_tree(img, node.ino)
    new_meta = set(meta) - set(meta_before)
    new_data = len(data) - sum(b - a for a, b in layout(img)[0])
    assert img.vol.balloc.free_blocks() == free0 - new_data - len(new_meta)
    assert node.blocks == blocks0 + (new_data + len(new_meta)) * (bs // 512)
    assert node.blocks == (len(data) + len(meta)) * (bs // 512)
    assert node.map.runs(0, node.map.nblocks) == model_runs(data, 0, node.map.nblocks)
    for lb, pb in data.items():
        assert bytes(img.dev.view(pb * bs, 8)) == pattern(lb, bs)[:8], lb
    path = img.check()
    assert_debugfs_agrees(path, node.ino, data, meta, bs)


@pytest.mark.parametrize("bs", BLOCK_SIZES)
def test_assign_extends_the_file(mem_image, bs: int) -> None:
    """Assign past EOF, into each next level of the tree in turn (a new file, then growing)."""
    img = mem_image(bs)
    node = new_file(img, "grow")
    s, d, t = bounds(img)
    free0 = img.vol.balloc.free_blocks()
    stops = [5, s + 1, d + 1, d + (img.bs // 4) + 1]
    start = 0
    for stop in stops:
        calls = assign(img, node, start, stop)
        assert [lb + i for lb, n, _ in calls for i in range(n)] == list(range(start, stop))
        start = stop
    calls = assign(img, node, t, t + 2)                       # a hole, then the triple range
    data, meta = stored_tree(img, node.ino)
    assert sorted(data) == [*range(stops[-1]), t, t + 1]
    assert sorted(level for level, _ in meta.values()) == [1, 1, 1, 1, 2, 2, 3]
    assert node.size == (t + 2) * bs
    assert img.vol.balloc.free_blocks() == free0 - len(data) - len(meta)
    assert node.map.runs(0, t + 2) == model_runs(data, 0, t + 2)
    path = img.check()
    assert_debugfs_agrees(path, node.ino, data, meta, bs)


@pytest.mark.parametrize("bs", [1024])
def test_assign_out_of_space_maps_a_prefix(mem_image, bs: int) -> None:
    """When the blocks run out, assign returns how many it mapped: those are linked, nothing
    else is, and no block is lost (the free count matches what the file holds)."""
    img = mem_image(bs, 1 << 20)
    vol = img.vol
    node = new_file(img, "f")
    free0 = vol.balloc.free_blocks()
    got = node.map.assign(0, free0 + 10, lambda lb, n, pb: None)
    assert 0 < got < free0
    D.set_size(vol, node, got * bs)
    vol.write_inode(node)
    data, meta = stored_tree(img, node.ino)
    assert sorted(data) == list(range(got))
    assert vol.balloc.free_blocks() == free0 - len(data) - len(meta)
    assert node.blocks == (len(data) + len(meta)) * (bs // 512)
    img.check()


# -- truncate ------------------------------------------------------------------------------------
def truncate_points(img: MemoryImage) -> list[int]:
    s, d, t = bounds(img)
    apb = img.bs // 4
    return [0, 2, 6, 12, 13, d - 1, d, d + 1, d + apb, d + apb + 1, d + 3 * apb, t - 1, t, t + 1,
            t + apb * apb, t + apb * apb + 1, t + apb * apb + 3]


@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("where", range(17))
def test_truncate_frees_exactly_past_the_cut(mem_image, bs: int, where: int) -> None:
    img = mem_image(bs)
    vol = img.vol
    node = sparse_file(img)
    keep = truncate_points(img)[where]
    data, meta = stored_tree(img, node.ino)
    free0 = vol.balloc.free_blocks()
    want = ({pb for lb, pb in data.items() if lb >= keep}
            | {p for p, (_, base) in meta.items() if base >= keep})
    freed = node.map.truncate(keep)                          # what data.drop_blocks does
    got = expand(freed)
    assert sorted(got) == sorted(want), f"keep {keep}"        # each block once, none other
    vol.write_inode(node)
    for pblk, count in freed:
        vol.balloc.free(pblk, count)
    node.reset_map()
    D.set_size(vol, node, keep * bs)
    vol.write_inode(node)
    after, meta_after = stored_tree(img, node.ino)
    assert after == {lb: pb for lb, pb in data.items() if lb < keep}
    assert meta_after == {p: v for p, v in meta.items() if v[1] < keep}
    assert vol.balloc.free_blocks() == free0 + len(want)
    assert node.blocks == (len(after) + len(meta_after)) * (bs // 512)
    assert node.map.runs(0, keep) == model_runs(after, 0, keep)
    path = img.check(f"t{keep}")
    assert_debugfs_agrees(path, node.ino, after, meta_after, bs)
