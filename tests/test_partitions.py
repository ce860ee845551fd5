"""Partition tables (MBR, EBR chains, GPT) and windows onto devices (a partition as a device).

Oracles: ``sfdisk --json`` (util-linux's libfdisk) for every table, ``partx`` (libblkid, a
second parser) for the numbering, and the kernel itself through ``losetup -P`` and
``/sys/block/loopN/loopNpM/{start,size}`` where it parses partition tables (root, and a kernel
with CONFIG_MSDOS_PARTITION / CONFIG_EFI_PARTITION; skipped with the reason otherwise). Disks
are files in a private directory under /dev/shm (memory storage: the XIP path).
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import os
import shutil
import struct
import subprocess
import time
import zlib

import pytest
from corrupt_util import time_limit
from e2fs import SHM, mkfs, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import xipfs
from xipfs import CorruptImageError
from xipfs.device import MemoryDevice, open_device
from xipfs.device.parttable import PartitionTable, partitions
from xipfs.device.window import WindowDevice

MiB = 1 << 20
HAVE_SFDISK = shutil.which("sfdisk") is not None
needs_sfdisk = pytest.mark.skipif(not HAVE_SFDISK, reason="sfdisk not installed (Debian: fdisk)")
IS_ROOT = os.geteuid() == 0

DOS_SCRIPT = """label: dos
size=8M, type=83
size=8M, type=82, bootable
size=40M, type=5
size=4M, type=83
size=4M, type=83
size=4M, type=7
size=8M, type=83
"""


def gpt_script(path: str) -> str:
    """Slots 1, 2, 3 and 6 (4 and 5 left empty: numbers follow the slot, not the count)."""
    return f"""label: gpt
{path}1 : size=8M, type=L, name="root fs"
{path}2 : size=8M, type=S, name="swäp"
{path}3 : size=4M, type=U, name=esp
{path}6 : size=16M, type=L, name=data
"""


@pytest.fixture(scope="module")
def workdir():
    path = os.path.join(SHM, f"xipfs-test-partitions-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def make_disk(path: str, size: int, script: str) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", path], input=script.encode())
    return path


@pytest.fixture(scope="module")
def dos_disk(workdir):
    if not HAVE_SFDISK:
        pytest.skip("sfdisk not installed (Debian: fdisk)")
    return make_disk(os.path.join(workdir, "dos.img"), 64 * MiB, DOS_SCRIPT)


@pytest.fixture(scope="module")
def gpt_disk(workdir):
    if not HAVE_SFDISK:
        pytest.skip("sfdisk not installed (Debian: fdisk)")
    path = os.path.join(workdir, "gpt.img")
    return make_disk(path, 64 * MiB, gpt_script(path))


def sfdisk_json(path: str) -> dict:
    return json.loads(run(["sfdisk", "--json", path]).stdout)["partitiontable"]


def node_number(node: str) -> int:
    digits = ""
    for ch in reversed(node):
        if not ch.isdigit():
            break
        digits = ch + digits
    return int(digits)


def assert_matches_sfdisk(table: PartitionTable, path: str) -> None:
    want = sfdisk_json(path)
    ssz = want.get("sectorsize", 512)
    assert table.label == want["label"]
    assert table.sector_size == ssz
    assert table.disk_id == want["id"]
    got = {p.number: p for p in table}
    assert sorted(got) == sorted(node_number(p["node"]) for p in want["partitions"])
    for w in want["partitions"]:
        p = got[node_number(w["node"])]
        assert (p.start, p.size, p.type) == (w["start"] * ssz, w["size"] * ssz, w["type"].upper()
                                             if table.label == "gpt" else w["type"])
        assert p.name == w.get("name", "")
        assert p.guid == w.get("uuid", "")


def partx_pairs(path: str) -> dict[int, dict[str, str]]:
    if shutil.which("partx") is None:
        pytest.skip("partx not installed (util-linux)")
    out = run(["partx", "-P", "-o", "NR,START,SECTORS,UUID", path]).stdout.decode()
    rows = {}
    for line in out.splitlines():
        fields = dict(item.split("=", 1) for item in line.split())
        fields = {k: v.strip('"') for k, v in fields.items()}
        rows[int(fields["NR"])] = fields
    return rows


def kernel_config_line(option: str) -> str | None:
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            for line in f:
                if line.startswith((f"{option}=", f"# {option} ")):
                    return line.strip()
    except OSError:
        return None
    return None


def loop_partitions(path: str, sector_size: int = 512) -> dict[int, tuple[int, int]]:
    """``{number: (start, size)}`` in 512-byte sectors, as the kernel parses the disk
    (``losetup -P``, /sys/block/loopN/loopNpM); skips with the reason where it cannot."""
    if not IS_ROOT:
        pytest.skip("losetup -P needs root")
    if shutil.which("losetup") is None:
        pytest.skip("losetup not installed")
    cmd = ["losetup", "-f", "--show", "-P", "-r"]
    if sector_size != 512:
        cmd += ["-b", str(sector_size)]
    proc = run([*cmd, path], check=False)
    if proc.returncode != 0:
        pytest.skip(f"losetup -P not allowed here: {proc.stderr.decode().strip()}")
    dev = proc.stdout.decode().strip()
    name = os.path.basename(dev)
    try:
        if shutil.which("udevadm"):
            run(["udevadm", "settle", "-t", "2"], check=False)
        found: list[str] = []
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            found = [d for d in os.listdir(f"/sys/block/{name}") if d.startswith(f"{name}p")]
            if found:
                break
            time.sleep(0.05)
        if not found:
            config = [c for c in (kernel_config_line("CONFIG_MSDOS_PARTITION"),
                                  kernel_config_line("CONFIG_EFI_PARTITION")) if c]
            why = "; ".join(config) if config else "kernel config not readable"
            pytest.skip(f"the kernel made no {name}pN partitions for the loop device ({why})")
        out = {}
        for d in found:
            base = f"/sys/block/{name}/{d}"
            with open(f"{base}/partition") as f1, open(f"{base}/start") as f2, open(f"{base}/size") as f3:
                out[int(f1.read())] = (int(f2.read()), int(f3.read()))
        return out
    finally:
        run(["losetup", "-d", dev], check=False)


# -- reading tables against sfdisk, partx and the kernel --------------------------------------
def test_dos_primaries_extended_logicals(dos_disk):
    table = partitions(dos_disk)
    assert [p.number for p in table] == [1, 2, 3, 4, 5, 6, 7]
    assert_matches_sfdisk(table, dos_disk)
    ext = table.number(3)
    assert ext.extended and ext.type == "5" and ext.type_name == "Extended"
    assert table.number(2).attributes == 0x80 and table.number(2).type_name == "Linux swap / Solaris"
    for n in (5, 6, 7):                          # the logicals lie in the extended partition
        assert ext.start < table.number(n).start and table.number(n).end <= ext.end
    assert table.number(4).start > ext.end - 1   # sfdisk put primary 4 after the extended one
    assert table.notes == []


def test_dos_numbering_matches_partx(dos_disk):
    rows = partx_pairs(dos_disk)
    table = partitions(dos_disk)
    assert sorted(rows) == [p.number for p in table]
    for p in table:
        assert (int(rows[p.number]["START"]) * 512, int(rows[p.number]["SECTORS"]) * 512) == (p.start, p.size)
        assert rows[p.number]["UUID"] == p.partuuid


def test_gpt_named_partitions(gpt_disk):
    table = partitions(gpt_disk)
    assert [p.number for p in table] == [1, 2, 3, 6]
    assert_matches_sfdisk(table, gpt_disk)
    assert [p.name for p in table] == ["root fs", "swäp", "esp", "data"]
    assert [p.type_name for p in table] == ["Linux filesystem", "Linux swap", "EFI System",
                                            "Linux filesystem"]
    assert all(p.start % MiB == 0 for p in table)            # sfdisk's 1 MiB alignment
    assert table.notes == []


def test_gpt_matches_partx(gpt_disk):
    rows = partx_pairs(gpt_disk)
    for p in partitions(gpt_disk):
        assert int(rows[p.number]["START"]) * 512 == p.start
        assert rows[p.number]["UUID"] == p.partuuid


@pytest.mark.parametrize("which", ["dos", "gpt"])
def test_numbering_matches_the_kernel(which, dos_disk, gpt_disk):
    path = dos_disk if which == "dos" else gpt_disk
    kernel = loop_partitions(path)
    table = partitions(path)
    assert sorted(kernel) == [p.number for p in table]
    for p in table:
        start, size = kernel[p.number]
        assert start * 512 == p.start
        # Linux shows an extended partition as its first 2 sectors only (msdos.c).
        assert size * 512 == (min(p.size, 1024) if p.extended else p.size)


def test_sources_path_device_bytes(dos_disk):
    by_path = partitions(dos_disk)
    with open(dos_disk, "rb") as f:
        data = f.read()
    assert partitions(data) == by_path
    dev = open_device(dos_disk, readonly=True)
    try:
        assert dev.is_xip
        assert partitions(dev) == by_path
    finally:
        dev.close()
    dev = open_device(dos_disk, readonly=True, xip=False)   # through the page cache
    try:
        assert partitions(dev) == by_path
    finally:
        dev.close()


def test_no_table(workdir):
    img = mkfs(os.path.join(workdir, "bare.img"), "4M")
    table = partitions(img)
    assert table == [] and table.label is None
    assert partitions(b"") == [] and partitions(bytes(511)) == []


@needs_sfdisk
def test_gpt_4k_sectors(workdir):
    """A GPT written for 4096-byte LBAs (sfdisk on a loop device with -b 4096)."""
    if not IS_ROOT:
        pytest.skip("a 4096-byte-sector disk is made on a loop device (root)")
    path = os.path.join(workdir, "gpt4k.img")
    with open(path, "wb") as f:
        f.truncate(64 * MiB)
    proc = run(["losetup", "-f", "--show", "-b", "4096", path], check=False)
    if proc.returncode != 0:
        pytest.skip(f"losetup -b 4096 not allowed here: {proc.stderr.decode().strip()}")
    dev = proc.stdout.decode().strip()
    try:
        run(["sfdisk", "-q", "--no-reread", "--no-tell-kernel", dev], input=gpt_script(dev).encode())
        want = sfdisk_json(dev)
    finally:
        run(["losetup", "-d", dev], check=False)
    assert want["sectorsize"] == 4096
    table = partitions(path)
    assert table.sector_size == 4096 and table.disk_id == want["id"]
    assert [(p.start, p.size, p.name) for p in table] == [
        (w["start"] * 4096, w["size"] * 4096, w.get("name", "")) for w in want["partitions"]]
    assert [p.number for p in table] == [node_number(w["node"]) for w in want["partitions"]]
    os.unlink(path)


# -- GPT backups -------------------------------------------------------------------------------
def flip(path: str, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.fixture
def gpt_copy(gpt_disk, tmp_path):
    path = str(tmp_path / "gpt.img")
    shutil.copyfile(gpt_disk, path)
    return path


@pytest.mark.parametrize("where", ["header", "entries"])
def test_gpt_bad_primary_uses_backup(gpt_copy, gpt_disk, where):
    flip(gpt_copy, 512 + 0x38 if where == "header" else 1024 + 0x40)   # disk GUID / an entry's LBA
    table = partitions(gpt_copy)
    assert list(table) == list(partitions(gpt_disk))
    assert len(table.notes) == 1 and "primary GPT header at LBA 1 is bad" in table.notes[0]
    assert ("header CRC32" if where == "header" else "entry array CRC32") in table.notes[0]
    assert "using the backup at LBA 131071" in table.notes[0]
    assert_matches_sfdisk(table, gpt_copy)       # sfdisk too falls back to the backup


def test_gpt_bad_backup_noted(gpt_copy, gpt_disk):
    flip(gpt_copy, 64 * MiB - 512 + 0x38)
    table = partitions(gpt_copy)
    assert list(table) == list(partitions(gpt_disk))
    assert table.notes and "backup GPT header at LBA 131071 is bad" in table.notes[0]


def test_gpt_both_bad(gpt_copy):
    flip(gpt_copy, 512 + 0x38)
    flip(gpt_copy, 64 * MiB - 512 + 0x38)
    with pytest.raises(CorruptImageError, match="no valid GPT.*header CRC32 mismatch"):
        partitions(gpt_copy)


def fix_gpt_crcs(buf: bytearray, header: int) -> None:
    """Recompute the entry-array CRC and the header CRC of the GPT header at byte ``header``."""
    entry_lba, count, esize = struct.unpack_from("<QII", buf, header + 0x48)
    array = bytes(buf[entry_lba * 512:entry_lba * 512 + count * esize])
    struct.pack_into("<I", buf, header + 0x58, zlib.crc32(array))
    hsize = struct.unpack_from("<I", buf, header + 0x0C)[0]
    struct.pack_into("<I", buf, header + 0x10, 0)
    struct.pack_into("<I", buf, header + 0x10, zlib.crc32(bytes(buf[header:header + hsize])))


def both_gpts(buf: bytearray, edit) -> None:
    """Apply ``edit(buf, header offset, entries offset)`` to primary and backup, fix CRCs."""
    for header in (512, len(buf) - 512):
        entry_lba = struct.unpack_from("<Q", buf, header + 0x48)[0]
        edit(buf, header, entry_lba * 512)
        fix_gpt_crcs(buf, header)


def test_gpt_structural_errors(gpt_disk):
    with open(gpt_disk, "rb") as f:
        pristine = f.read()

    def table_after(edit) -> PartitionTable:
        buf = bytearray(pristine)
        both_gpts(buf, edit)
        return partitions(buf)

    assert list(table_after(lambda b, h, e: None)) == list(partitions(gpt_disk))   # CRCs fixed right
    cases = [
        (lambda b, h, e: struct.pack_into("<I", b, h + 0x50, 0xFFFFFFFF), "no valid GPT.*entries of 128"),
        (lambda b, h, e: struct.pack_into("<I", b, h + 0x50, 0), "no valid GPT.*0 entries"),
        (lambda b, h, e: struct.pack_into("<I", b, h + 0x54, 100), "no valid GPT.*entry size 100"),
        (lambda b, h, e: struct.pack_into("<I", b, h + 0x0C, 4000), "no valid GPT.*header size 4000"),
        (lambda b, h, e: struct.pack_into("<Q", b, h + 0x30, 1 << 40), "no valid GPT.*usable LBAs"),
        (lambda b, h, e: struct.pack_into("<Q", b, e + 128 + 0x20, 2048 + 100), "partitions overlap"),
        (lambda b, h, e: struct.pack_into("<Q", b, e + 0x28, 1 << 20), "partition 1 lies past the end"),
        (lambda b, h, e: struct.pack_into("<Q", b, e + 0x28, 10), "partition 1 ends before it starts"),
        (lambda b, h, e: struct.pack_into("<Q", b, e + 0x20, 5), "partition 1 lies outside the GPT's usable"),
    ]
    for edit, message in cases:
        with pytest.raises(CorruptImageError, match=message):
            table_after(edit)


# -- MBR and EBR errors ------------------------------------------------------------------------
def mbr_entry(sector: int, slot: int) -> int:
    return sector * 512 + 0x1BE + 16 * slot


def test_dos_errors(dos_disk):
    with open(dos_disk, "rb") as f:
        pristine = f.read()
    table = partitions(pristine)
    ext = table.number(3)
    ebr1 = ext.start // 512
    ebr2 = ebr1 + struct.unpack_from("<I", pristine, mbr_entry(ebr1, 1) + 8)[0]

    def after(edit) -> PartitionTable:
        buf = bytearray(pristine)
        edit(buf)
        return partitions(buf)

    with pytest.raises(CorruptImageError, match="partition 1 lies past the end of the disk"):
        after(lambda b: struct.pack_into("<I", b, mbr_entry(0, 0) + 12, 1 << 30))
    with pytest.raises(CorruptImageError, match="primary partitions overlap"):
        after(lambda b: struct.pack_into("<I", b, mbr_entry(0, 1) + 8, 2048 + 8))
    with pytest.raises(CorruptImageError, match="extended partition chain loops"):
        after(lambda b: struct.pack_into("<I", b, mbr_entry(ebr2, 1) + 8, 0))   # back to EBR 1
    with pytest.raises(CorruptImageError, match="EBR lies past the end of the disk"):
        after(lambda b: struct.pack_into("<I", b, mbr_entry(ebr2, 1) + 8, 1 << 28))
    with pytest.raises(CorruptImageError, match="partitions overlap"):
        after(lambda b: struct.pack_into("<I", b, mbr_entry(ebr1, 0) + 12, 20000))  # logical 5 over 6
    with pytest.raises(CorruptImageError, match="does not start at LBA 1"):
        after(lambda b: b.__setitem__(mbr_entry(0, 0) + 4, 0xEE))
    # Linux's own rules: a bad boot indicator means "no table", an unsigned EBR ends the chain.
    t = after(lambda b: b.__setitem__(mbr_entry(0, 0), 0x12))
    assert t == [] and "boot indicator" in t.notes[0]
    t = after(lambda b: b.__setitem__(slice(ebr2 * 512 + 510, ebr2 * 512 + 512), b"\0\0"))
    assert [p.number for p in t] == [1, 2, 3, 4, 5] and "no 55 AA" in t.notes[0]


def test_dos_linux_ebr_rules():
    """Linux's parse_extended: data entries in any EBR slot, in order; slots 3 and 4 only when
    inside the extended partition; the link is the first extended entry of the EBR."""
    size = 64 * MiB
    buf = bytearray(size)

    def entry(sector: int, slot: int, typ: int, start: int, count: int) -> None:
        struct.pack_into("<B3sB3sII", buf, sector * 512 + 0x1BE + 16 * slot, 0, b"", typ, b"", start, count)
        buf[sector * 512 + 510:sector * 512 + 512] = b"\x55\xaa"

    ext, ext_size = 2048, 60000
    link = ext + 1000
    entry(0, 0, 0x0F, ext, ext_size)
    entry(ext, 0, 0x83, 100, 100)              # logical 5
    entry(ext, 1, 0x83, 300, 100)              # logical 6 (a second data entry, OS/2 style)
    entry(ext, 2, 0x83, 500, 100)              # logical 7 (slot 3, inside: kept)
    entry(ext, 3, 0x05, 1000, 2000)            # the link, relative to the extended partition
    entry(link, 0, 0x83, 10, 10)               # logical 8, relative to its EBR
    entry(link, 2, 0x83, 1500, 100)            # logical 9 (inside this EBR's 2000 sectors)
    entry(link, 3, 0x83, 70000, 100)           # slot 4 past the extended partition: skipped
    table = partitions(buf)
    got = [(p.number, p.start // 512, p.size // 512) for p in table if p.number >= 5]
    assert got == [(5, ext + 100, 100), (6, ext + 300, 100), (7, ext + 500, 100), (8, link + 10, 10),
                   (9, link + 1500, 100)]

    buf = bytearray(size)                      # 150 EBRs without a data partition
    entry(0, 0, 0x05, ext, 120000)
    for k in range(150):
        entry(ext + k, 1, 0x05, k + 1, 1)
    with time_limit(5, "empty EBR chain"):
        table = partitions(buf)
    assert [p.number for p in table] == [1] and "100 links" in table.notes[0]


# -- fuzzing: only CorruptImageError or a sane table, in bounded time ------------------------------
@pytest.fixture(scope="module")
def small_disks(workdir):
    if not HAVE_SFDISK:
        pytest.skip("sfdisk not installed (Debian: fdisk)")
    dos = make_disk(os.path.join(workdir, "small-dos.img"), 16 * MiB,
                    "label: dos\nsize=1M\nsize=1M\nsize=10M, type=5\nsize=1M\nsize=1M\nsize=1M\nsize=1M\n")
    path = os.path.join(workdir, "small-gpt.img")
    gpt = make_disk(path, 8 * MiB, f"label: gpt\n{path}1 : size=1M, name=a\n{path}3 : size=2M, name=b\n")
    out = {}
    for name, p in (("dos", dos), ("gpt", gpt)):
        with open(p, "rb") as f:
            out[name] = bytearray(f.read())
    t = partitions(out["dos"])
    out["dos_sectors"] = [0, *ebr_sectors(out["dos"])]
    assert len(t) == 7 and len(out["dos_sectors"]) == 4 and len(partitions(out["gpt"])) == 2
    return out


def ebr_sectors(buf: bytes) -> list[int]:
    """The sectors of the EBR chain of the first extended partition (entry 2 links)."""
    ext = next(p for p in partitions(buf) if p.extended).start // 512
    out, this = [], ext
    while this not in out:
        out.append(this)
        typ, start = buf[mbr_entry(this, 1) + 4], struct.unpack_from("<I", buf, mbr_entry(this, 1) + 8)[0]
        if typ not in (0x05, 0x0F, 0x85):
            break
        this = ext + start
    return out


def assert_sane(table: PartitionTable, size: int) -> None:
    numbers = [p.number for p in table]
    assert len(set(numbers)) == len(numbers) and all(n >= 1 for n in numbers)
    plain = sorted((p for p in table if not p.extended), key=lambda p: p.start)
    for p in table:
        assert p.start >= 0 and p.size > 0 and p.end <= size
    for a, b in zip(plain, plain[1:], strict=False):
        assert a.end <= b.start


def fuzz_once(buf: bytearray, flips: list[tuple[int, int]]) -> None:
    saved = [(o, buf[o]) for o, _ in flips]
    for o, x in flips:
        buf[o] ^= x
    try:
        with time_limit(5, "partitions() of a fuzzed disk"):
            try:
                table = partitions(buf)
            except CorruptImageError as err:
                assert err.errno == errno.EUCLEAN and err.what
                return
        assert_sane(table, len(buf))
    finally:
        for o, b in reversed(saved):
            buf[o] = b


FUZZ = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_fuzz_mbr_and_ebrs(small_disks, data):
    buf = small_disks["dos"]
    sectors = small_disks["dos_sectors"]
    flips = data.draw(st.lists(st.tuples(st.sampled_from(sectors), st.integers(0x1B8, 511),
                                         st.integers(1, 255)), min_size=1, max_size=6))
    fuzz_once(buf, [(s * 512 + o, x) for s, o, x in flips])


@FUZZ
@given(data=st.data())
def test_fuzz_gpt_raw(small_disks, data):
    buf = small_disks["gpt"]
    n = len(buf)
    where = st.one_of(st.integers(0x1B8, 512 + 92), st.integers(1024, 1024 + 4 * 128),
                      st.integers(n - 512, n - 512 + 92), st.integers(n - 33 * 512, n - 33 * 512 + 256))
    flips = data.draw(st.lists(st.tuples(where, st.integers(1, 255)), min_size=1, max_size=6))
    fuzz_once(buf, flips)


@FUZZ
@given(data=st.data())
def test_fuzz_gpt_with_good_crcs(small_disks, data):
    """Flips in the header fields and entries with the CRCs then made right: the structural checks."""
    pristine = small_disks["gpt"]
    buf = bytearray(pristine)
    flips = data.draw(st.lists(st.tuples(st.one_of(st.integers(0x0C, 0x5F), st.integers(512, 512 + 3 * 128)),
                                         st.integers(1, 255)), min_size=1, max_size=4))

    def edit(b: bytearray, header: int, entries: int) -> None:
        for o, x in flips:
            if o < 512:
                if o not in range(0x10, 0x14):           # the CRC itself is recomputed
                    b[header + o] ^= x
            elif 0 <= entries + o - 512 < len(b):
                b[entries + o - 512] ^= x

    try:
        both_gpts(buf, edit)
    except (struct.error, IndexError):
        return                                   # the edit moved the array out of reach of the fixer
    with time_limit(5, "partitions() of a fuzzed GPT"):
        try:
            table = partitions(buf)
        except CorruptImageError as err:
            assert err.errno == errno.EUCLEAN
            return
    assert_sane(table, len(buf))


# -- a partition as a device: WindowDevice ---------------------------------------------------
TREE = {"hello.txt": b"hello from a partition\n", "dir/big.bin": os.urandom(300_000)}


@pytest.fixture(scope="module")
def disk_with_fs(workdir, dos_disk):
    """The dos disk with an ext2 filesystem (made by mke2fs -d) in logical partition 6."""
    src = os.path.join(workdir, "tree")
    for name, data in TREE.items():
        os.makedirs(os.path.dirname(os.path.join(src, name)), exist_ok=True)
        with open(os.path.join(src, name), "wb") as f:
            f.write(data)
    disk = os.path.join(workdir, "disk-fs.img")
    shutil.copyfile(dos_disk, disk)
    part = partitions(disk).number(6)
    img = mkfs(os.path.join(workdir, "part6.img"), f"{part.size // 1024}k", bs=1024, src=src)
    with open(img, "rb") as f, open(disk, "r+b") as out:
        out.seek(part.start)
        out.write(f.read())
    os.unlink(img)
    return disk, part


@pytest.mark.parametrize("xip", [True, False])
def test_open_filesystem_in_partition(disk_with_fs, xip):
    disk, part = disk_with_fs
    parent = open_device(disk, readonly=True, xip=xip)
    window = WindowDevice(parent, part.start, part.size)
    try:
        assert window.is_xip is xip and window.size == part.size
        with xipfs.open(window) as fs:
            assert sorted(fs.listdir("/")) == ["dir", "hello.txt", "lost+found"]
            for name, data in TREE.items():
                assert fs.read_bytes("/" + name) == data
            assert fs.is_xip is xip
    finally:
        window.close()
        parent.close()


def test_check_filesystem_in_partition(disk_with_fs):
    disk, part = disk_with_fs
    parent = open_device(disk, readonly=True)
    window = WindowDevice(parent, part.start, part.size)
    try:
        assert xipfs.check(window) == []
    finally:
        window.close()
        parent.close()


def test_window_views_share_the_parent_mapping(workdir):
    path = os.path.join(workdir, "window-share.img")
    with open(path, "wb") as f:
        f.write(os.urandom(4 * MiB))
    parent = MemoryDevice.from_path(path, kind="tmpfs")
    off, size = 3 * 512 + MiB, 2 * MiB
    window = WindowDevice(parent, off, size)
    try:
        v = window.view(100, 16)
        parent.write(b"through-the-parent", off + 100)
        assert bytes(v) == b"through-the-pare"                             # no copy: sees it
        v[0:4] = b"XIPW"                                                       # and the other way
        assert bytes(parent.view(off + 100, 4)) == b"XIPW"
        assert window.buffer is not None and window.buffer.obj is parent.buffer.obj
        assert bytes(window.direct_access(1, 2)) == bytes(parent.view(off + 512, 1024))
        assert window.peek(100, 4) == b"XIPW"
        buf = bytearray(8)
        window.read_into(memoryview(buf), size - 8)
        assert bytes(buf) == bytes(parent.view(off + size - 8, 8))
        window.write(b"end!", size - 4)
        assert bytes(parent.view(off + size - 4, 4)) == b"end!"
        # Everything stops at the window's end, as the parent does at its own.
        for call in (lambda: window.view(size - 1, 2), lambda: window.read_into(memoryview(buf), size - 4),
                     lambda: window.write(b"xx", size - 1), lambda: window.view(-1, 1),
                     lambda: window.direct_access(size // 512, 1)):
            with pytest.raises(CorruptImageError, match="access outside the device"):
                call()
        # The descriptor is the disk's; its users add base_offset (test_ext4_read checks them).
        assert window.base_offset == off and window.raw_fileno() == parent.fileno() >= 0
        assert window.fileno() == parent.fileno()
        assert WindowDevice(parent, 0, size).fileno() == parent.fileno()
        inner = WindowDevice(window, 512, 4096)                       # a window in a window
        assert inner.base_offset == off + 512 and inner.root is parent
        assert bytes(inner.view(0, 8)) == bytes(parent.view(off + 512, 8))
        inner.close()
        del v
    finally:
        window.close()
        parent.close()


def test_window_readonly_and_bounds(workdir):
    path = os.path.join(workdir, "window-ro.img")
    with open(path, "wb") as f:
        f.write(bytes(MiB))
    parent = MemoryDevice.from_path(path, readonly=True)
    try:
        with pytest.raises(ValueError, match="does not fit"):
            WindowDevice(parent, MiB - 10, 11)
        with pytest.raises(ValueError, match="read-only"):
            WindowDevice(parent, 0, 10, readonly=False)
        window = WindowDevice(parent, 4096)
        assert window.size == MiB - 4096 and window.readonly
        with pytest.raises(OSError) as info:
            window.write(b"x", 0)
        assert info.value.errno == errno.EROFS
        window.close()
        owner = WindowDevice(MemoryDevice.from_path(path, readonly=True), 0, 512, close_parent=True)
        owner.close()
        assert owner.parent.fileno() == -1                           # closed with the window
    finally:
        parent.close()


def test_window_pins_and_locks(workdir):
    """Pins of a window are its own (inode 12 of one partition is not inode 12 of another);
    the lock is the whole image's."""
    path = os.path.join(workdir, "window-pins.img")
    with open(path, "wb") as f:
        f.truncate(4 * MiB)
    a, b = MemoryDevice.from_path(path), MemoryDevice.from_path(path)
    wa, wb, wb2 = WindowDevice(a, MiB, MiB), WindowDevice(b, MiB, MiB), WindowDevice(b, 2 * MiB, MiB)
    try:
        assert wa.pin(12)
        assert wb.pinned_elsewhere(12)              # the same partition, another open
        assert not wb2.pinned_elsewhere(12)         # another partition
        assert not b.pinned_elsewhere(12)           # the whole image
        wa.unpin(12)
        assert not wb.pinned_elsewhere(12)
        wa.lock(exclusive=True)
        with pytest.raises(OSError) as info:
            wb2.lock(exclusive=False)
        assert info.value.errno == errno.EBUSY
        assert wb.writer_elsewhere()
        wa.unlock()
    finally:
        for d in (wa, wb, wb2, a, b):
            d.close()


def test_window_writes_a_partition_in_place(disk_with_fs, tmp_path):
    """A writable window: xipfs writes the filesystem of a partition, the others stay as they were."""
    disk, part = disk_with_fs
    copy = os.path.join(os.path.dirname(disk), "disk-rw.img")
    shutil.copyfile(disk, copy)
    with open(copy, "rb") as f:
        before = f.read()
    parent = open_device(copy, readonly=False)
    window = WindowDevice(parent, part.start, part.size)
    try:
        with xipfs.open(window, "r+") as fs:
            fs.write_bytes("/new.txt", b"written in partition 6\n")
        parent.flush()
    finally:
        window.close()
        parent.close()
    with open(copy, "rb") as f:
        after = f.read()
    assert after[:part.start] == before[:part.start] and after[part.end:] == before[part.end:]
    parent = open_device(copy, readonly=True)
    window = WindowDevice(parent, part.start, part.size)
    try:
        with xipfs.open(window) as fs:
            assert fs.read_bytes("/new.txt") == b"written in partition 6\n"
        assert xipfs.check(window) == []
    finally:
        window.close()
        parent.close()
        with contextlib.suppress(OSError):
            os.unlink(copy)


def test_partition_table_lookup(dos_disk):
    table = partitions(dos_disk)
    assert table.number(5).number == 5
    with pytest.raises(LookupError, match=r"no partition 9 \(partitions: 1, 2, 3, 4, 5, 6, 7\)"):
        table.number(9)


def test_subprocess_free_of_leftover_loops():
    """No loop device of ours is left attached (every test detaches in a finally)."""
    if not IS_ROOT or shutil.which("losetup") is None:
        pytest.skip("needs root and losetup")
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert f"xipfs-test-partitions-{os.getpid()}" not in out
