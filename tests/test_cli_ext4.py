"""The ``xipfs`` command on ext4 images and whole disks, run as users run it (``python -m xipfs``).

Oracles outside xipfs: mke2fs -t ext4 makes the images (defaults and variants), sfdisk the
partition tables (GPT, and dos with logical partitions), img2simg/simg2img the Android sparse
images, dumpe2fs -h the superblock fields. A filesystem read through ``--partition N`` or
``--offset BYTES`` must read exactly as the same bytes cut out into an image of their own.
The commands run in parallel (each is a fresh interpreter) to keep the module quick.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from e2fs import SHM, assert_fsck_clean, dumpe2fs_header, run
from e2fs import mkfs as mke2fs

MiB = 1 << 20
SECTOR = 512
BIG = bytes(range(256)) * 600 + b"end"       # a few blocks, not a multiple of any block size

#: mke2fs -t ext4 variants: the options, and the size.
VARIANTS = {
    "default": ((), "32M"),
    "4k-orphan-seed": (("-b", "4096", "-O", "orphan_file,metadata_csum_seed"), "32M"),
    "bigalloc": (("-b", "4096", "-O", "bigalloc", "-C", "16384"), "64M"),
    "meta_bg": (("-O", "meta_bg,^resize_inode"), "32M"),
    "no-journal-128": (("-I", "128", "-O", "^has_journal,^metadata_csum,uninit_bg"), "32M"),
}

#: dumpe2fs -h fields that ``xipfs info`` prints for ext4, and must print the same.
DUMPE2FS_KEYS = (
    "Filesystem volume name", "Filesystem UUID", "Filesystem features", "Filesystem flags",
    "Filesystem state", "Errors behavior", "Inode count", "Block count", "Reserved block count",
    "Overhead clusters", "Free blocks", "Free inodes", "First block", "Block size", "Cluster size",
    "Group descriptor size", "Reserved GDT blocks", "Blocks per group", "Clusters per group",
    "Inodes per group", "Inode blocks per group", "First meta block group", "Flex block group size",
    "Filesystem created", "Last mount time", "Last write time", "Mount count", "Maximum mount count",
    "Last checked", "Lifetime writes", "First inode", "Inode size", "Required extra isize",
    "Desired extra isize", "Journal inode", "Default directory hash", "Directory Hash Seed",
    "Journal backup", "Checksum type", "Checksum", "Checksum seed", "Orphan file inode",
    "Journal features", "Total journal size", "Total journal blocks", "Max transaction length",
    "Fast commit length", "Journal sequence", "Journal start",
)
#: ``info --json`` keys that name where the filesystem was read from, not what it holds.
PLACE_KEYS = {"image", "image_size", "storage", "xip", "partition", "offset"}


def needs(tool: str):
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} is not installed")


# -- running the command ------------------------------------------------------------------------
def xipfs(*argv: object) -> subprocess.CompletedProcess:
    """``python -m xipfs ARGV`` in a child process (bytes out)."""
    return subprocess.run([sys.executable, "-m", "xipfs", *map(str, argv)], capture_output=True, timeout=60)


def ok(*argv: object) -> bytes:
    proc = xipfs(*argv)
    assert proc.returncode == 0 and proc.stderr == b"", (argv, proc.returncode, proc.stderr.decode())
    return proc.stdout


def ok_all(*argvs: tuple[object, ...]) -> list[bytes]:
    """Several commands at once (each must succeed quietly); their outputs in order."""
    with ThreadPoolExecutor(4) as pool:
        return list(pool.map(lambda a: ok(*a), argvs))


def fails(*argv: object, status: int = 1) -> str:
    """A command that must fail with one ``xipfs: COMMAND: ...`` line; that line."""
    proc = xipfs(*argv)
    err = proc.stderr.decode()
    assert proc.returncode == status, (argv, proc.returncode, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert re.match(r"^xipfs: [a-z]+: .+", err), err
    return err.strip()


# -- images -------------------------------------------------------------------------------------
def build_src(root: str) -> None:
    os.makedirs(os.path.join(root, "etc", "deep"))
    with open(os.path.join(root, "etc", "hostname"), "w") as f:
        f.write("disk\n")
    with open(os.path.join(root, "etc", "deep", "note.md"), "w") as f:
        f.write("# note\n")
    with open(os.path.join(root, "big.bin"), "wb") as f:
        f.write(BIG)
    open(os.path.join(root, "empty"), "wb").close()
    os.symlink("etc/hostname", os.path.join(root, "link"))


FILES = ("/etc/hostname", "/etc/deep/note.md", "/big.bin", "/empty")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A directory for the module's images (in /dev/shm: read in place) and the source tree."""
    path = os.path.join(SHM, f"xipfs-cli4-{os.getpid()}")
    os.makedirs(path)
    build_src(os.path.join(path, "src"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def variants(work):
    """Every mke2fs variant, made from the source tree: {name: image path}."""
    out = {}
    for name, (opts, size) in VARIANTS.items():
        out[name] = mke2fs(os.path.join(work, f"{name}.img"), size, fstype="ext4", extra=opts,
                           src=os.path.join(work, "src"))
    return out


def sfdisk(disk: str, script: str) -> dict:
    run(["sfdisk", "-q", disk], input=script.encode())
    return json.loads(run(["sfdisk", "--json", disk]).stdout)["partitiontable"]


def cut(disk: str, start: int, size: int, dest: str) -> str:
    """Bytes ``[start, start+size)`` of ``disk`` as an image of their own."""
    with open(disk, "rb") as f:
        f.seek(start)
        data = f.read(size)
    with open(dest, "wb") as f:
        f.write(data)
    return dest


@pytest.fixture(scope="module")
def gpt(work):
    """A GPT disk: partition 1 ext4 made in place (mke2fs -E offset), 3 an ext2 image put in with dd."""
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk is not installed")
    disk = os.path.join(work, "gpt.img")
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    sfdisk(disk, 'label: gpt\nstart=2048, size=16M, type=L, name="root fs"\nsize=4M, type=U\nsize=20M\n')
    mke2fs(disk, "16M", fstype="ext4", extra=("-E", f"offset={2048 * SECTOR}"), src=os.path.join(work, "src"))
    ext2 = mke2fs(os.path.join(work, "p3.img"), "20M", fstype="ext2", src=os.path.join(work, "src"))
    run(["dd", f"if={ext2}", f"of={disk}", "bs=1M", f"seek={(2048 + 32768 + 8192) * SECTOR // MiB}",
         "conv=notrunc", "status=none"])
    return disk


@pytest.fixture(scope="module")
def dos(work):
    """A dos disk: primary 1, extended 2 holding logical 5 and 6; ext4 in logical 6."""
    if shutil.which("sfdisk") is None:
        pytest.skip("sfdisk is not installed")
    disk = os.path.join(work, "dos.img")
    with open(disk, "wb") as f:
        f.truncate(64 * MiB)
    sfdisk(disk, "label: dos\nstart=2048,size=16M,type=83,bootable\nstart=34816,size=40M,type=5\n"
                 "start=36864,size=10M,type=83\nstart=59392,size=12M,type=83\n")
    mke2fs(disk, "12M", fstype="ext4", extra=("-E", f"offset={59392 * SECTOR}"),
           src=os.path.join(work, "src"))
    return disk


@pytest.fixture(scope="module")
def sparse_gpt(work, gpt):
    """The GPT disk as an Android sparse image."""
    if shutil.which("img2simg") is None:
        pytest.skip("img2simg is not installed")
    out = os.path.join(work, "gpt.simg")
    run(["img2simg", gpt, out])
    return out


# -- what a filesystem reads as -----------------------------------------------------------------
def reading(image: str, *where: object) -> dict[str, object]:
    """What ls, cat, stat, info and check say of the filesystem (place-independent parts only)."""
    ls, cat, st, info, check = ok_all(
        ("ls", "-laR", "--json", *where, f"{image}:/"),
        ("cat", *where, *(f"{image}:{p}" for p in FILES)),
        ("stat", "--json", *where, *(f"{image}:{p}" for p in (*FILES, "/link", "/etc"))),
        ("info", "--json", *where, image),
        ("check", "--json", *where, image))
    stats = json.loads(st)
    for rec in stats:
        rec.pop("image")
    info_d = {k: v for k, v in json.loads(info).items() if k not in PLACE_KEYS}
    check_d = json.loads(check)
    check_d.pop("image")
    return {"ls": json.loads(ls), "cat": cat, "stat": stats, "info": info_d, "check": check_d}


def test_partition_and_offset_read_as_the_partition_alone(gpt, work):
    table = json.loads(run(["sfdisk", "--json", gpt]).stdout)["partitiontable"]
    p1 = table["partitions"][0]
    plain = cut(gpt, p1["start"] * SECTOR, p1["size"] * SECTOR, os.path.join(work, "p1.img"))
    want = reading(plain)
    assert want["cat"] == b"disk\n# note\n" + BIG and want["check"]["clean"]
    assert want["info"]["type"] == "ext4"
    assert reading(gpt, "--partition", "1") == want
    assert reading(gpt, f"--offset={p1['start'] * SECTOR}") == want
    # the ext2 filesystem put into partition 3 with dd; sector and p-number forms of the options
    p3 = table["partitions"][2]
    ext2 = os.path.join(work, "p3.img")
    ls_plain, ls_part, ls_off, info_part = ok_all(
        ("ls", "-lR", ext2), ("ls", "-lR", "--partition", "p3", gpt),
        ("ls", "-lR", "--offset", f"{p3['start']}s", gpt),
        ("info", "--partition", "3", gpt))
    assert ls_plain == ls_part == ls_off and b"hostname" in ls_plain
    assert f"Image:                    {gpt}, partition 3 ".encode() in info_part
    assert b"Filesystem type" not in info_part                       # ext2 output as before


def test_logical_partition_of_a_dos_disk(dos, work):
    table = json.loads(run(["sfdisk", "--json", dos]).stdout)["partitiontable"]
    p6 = next(p for p in table["partitions"] if p["node"].endswith("6"))
    plain = cut(dos, p6["start"] * SECTOR, p6["size"] * SECTOR, os.path.join(work, "p6.img"))
    want = reading(plain)
    assert reading(dos, "--partition", "6") == want
    line = fails("ls", "--partition", "2", dos)
    assert line == (f"xipfs: ls: {dos} (partition 2): partition 2 is an extended partition, "
                    "a container of others")


def test_sparse_disk_reads_as_the_raw_one(sparse_gpt, gpt):
    want = reading(gpt, "--partition", "1")
    assert reading(sparse_gpt, "--partition", "1") == want
    off = 2048 * SECTOR
    assert ok("cat", "--offset", off, f"{sparse_gpt}:/big.bin") == BIG


def test_missing_partition_lists_those_there_are(gpt, variants):
    line = fails("ls", "--partition", "7", f"{gpt}:/")
    assert line == (f"xipfs: ls: {gpt}: no partition 7 on this gpt disk; it has partitions "
                    "1 (Linux filesystem, 16M), 2 (EFI System, 4.0M), 3 (Linux filesystem, 20M)")
    assert "no partition 9" in fails("check", "--partition", "9", gpt)
    img = variants["default"]
    assert "no partition table, so no partition 1" in fails("info", "--partition", "1", img)
    assert "bad magic" in fails("info", "--partition", "2", gpt)
    assert "outside the image" in fails("info", "--offset", "1G", gpt)
    proc = xipfs("ls", "--partition", "1", "--offset", "0", gpt)
    assert proc.returncode == 2 and b"not allowed with argument" in proc.stderr
    proc = xipfs("ls", "--partition", "x", gpt)
    assert proc.returncode == 2 and b"invalid partition" in proc.stderr


# -- parts --------------------------------------------------------------------------------------
def _sfdisk_rows(text: str) -> list[list[str]]:
    """The partition rows of ``sfdisk -l`` (or ``xipfs parts``): Device, Start, End, Sectors."""
    rows = []
    for line in text.splitlines():
        cells = line.replace(" * ", " ").split()
        if cells and re.fullmatch(r".*\d", cells[0]) and len(cells) > 4 and cells[1].isdigit():
            rows.append(cells[:4])
    return rows


def _compare_with_sfdisk(image: str, raw: str) -> None:
    mine, text = ok_all(("parts", "--json", image), ("parts", image))
    mine = json.loads(mine)
    ref = json.loads(run(["sfdisk", "--json", raw]).stdout)["partitiontable"]
    assert mine["label"] == ref["label"] and mine["disk_id"] == ref["id"]
    assert mine["sector_size"] == ref["sectorsize"]
    assert len(mine["partitions"]) == len(ref["partitions"])
    for p, r in zip(mine["partitions"], ref["partitions"], strict=True):
        assert p["node"][len(image):] == r["node"][len(raw):]
        assert (p["start"], p["sectors"], p["type"]) == (r["start"], r["size"], r["type"])
        assert p["end"] == r["start"] + r["size"] - 1 and p["offset"] == r["start"] * SECTOR
        assert p["name"] == r.get("name", "") and p["uuid"] == r.get("uuid")
        assert p["bootable"] == r.get("bootable", False)
    sf = [row[1:] for row in _sfdisk_rows(run(["sfdisk", "-l", raw]).stdout.decode())]
    assert [row[1:] for row in _sfdisk_rows(text.decode())] == sf
    assert f"Disklabel type: {ref['label']}\nDisk identifier: {ref['id']}\n".encode() in text


@needs("sfdisk")
def test_parts_matches_sfdisk(gpt, dos):
    _compare_with_sfdisk(gpt, gpt)
    _compare_with_sfdisk(dos, dos)
    d = json.loads(ok("parts", "--json", gpt))
    assert [p["filesystem"] for p in d["partitions"]] == ["ext4", None, "ext2"]
    text = ok("parts", dos).decode()
    assert re.search(r"^\S+2\s+34816\s+116735\s+81920\s+40M\s+5 Extended$", text, re.M), text
    assert re.search(r"^\S+1\s+\*\s+2048\s", text, re.M), text


@needs("img2simg")
def test_parts_of_a_sparse_image(sparse_gpt, gpt):
    _compare_with_sfdisk(sparse_gpt, gpt)
    assert b"an Android sparse image" in ok("parts", sparse_gpt)


def test_parts_without_a_partition_table(variants):
    img = variants["default"]
    text, js = ok_all(("parts", img), ("parts", "--json", img))
    assert text.decode().splitlines()[-1] == ("No partition table: the image holds an ext4 filesystem "
                                              "(open it without --partition)")
    d = json.loads(js)
    assert d["label"] is None and d["partitions"] == [] and d["filesystem"] == "ext4"


# -- unsparse -----------------------------------------------------------------------------------
@needs("img2simg")
@needs("simg2img")
def test_unsparse_equals_simg2img(sparse_gpt, variants, work):
    out, ref = os.path.join(work, "un.img"), os.path.join(work, "ref.img")
    run(["simg2img", sparse_gpt, ref])
    assert b"unsparsed" in ok("unsparse", sparse_gpt, out)
    with open(out, "rb") as a, open(ref, "rb") as b:
        assert a.read() == b.read()
    assert os.stat(out).st_blocks * 512 < os.stat(out).st_size     # zeros stay holes
    line = fails("unsparse", sparse_gpt, out)
    assert line == f"xipfs: unsparse: {out}: already exists (use -f to overwrite it)"
    with open(out, "r+b") as f:
        f.write(b"junk")
    assert ok("-q", "unsparse", "--force", sparse_gpt, out) == b""
    with open(out, "rb") as a, open(ref, "rb") as b:
        assert a.read() == b.read()
    raw = variants["default"]
    assert fails("unsparse", raw, os.path.join(work, "x.img")).startswith(
        f"xipfs: unsparse: {raw}: not an Android sparse image")
    assert not os.path.exists(os.path.join(work, "x.img"))
    assert "No such file" in fails("unsparse", os.path.join(work, "nope.simg"), os.path.join(work, "x.img"))
    os.unlink(out)
    os.unlink(ref)


# -- info ---------------------------------------------------------------------------------------
def _info_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            fields[key.strip()] = value.strip()
    return fields


def _int_or_none(text: str | None) -> int | None:
    return None if text is None else int(text)


def test_info_agrees_with_dumpe2fs(variants):
    names = list(variants)
    outs = ok_all(*[("info", variants[n]) for n in names], *[("info", "--json", variants[n]) for n in names])
    for i, name in enumerate(names):
        img = variants[name]
        ref = dumpe2fs_header(img)
        mine = _info_fields(outs[i].decode())
        shown = [k for k in DUMPE2FS_KEYS if k in ref]
        assert {k: mine.get(k) for k in shown} == {k: ref[k] for k in shown}, name
        extra = [k for k in DUMPE2FS_KEYS if k in mine and k not in ref]
        assert not extra, (name, extra)
        d = json.loads(outs[len(names) + i])
        assert d["type"] == "ext4" and d["features"] == ref["Filesystem features"].split()
        assert d["desc_size"] == int(ref.get("Group descriptor size", 32))
        assert d["reserved_gdt_blocks"] == int(ref.get("Reserved GDT blocks", 0))
        assert d["flex_bg_size"] == _int_or_none(ref.get("Flex block group size"))
        assert d["cluster_size"] == int(ref.get("Cluster size", ref["Block size"]))
        assert d["hash_version"] == ref["Default directory hash"]
        assert d["hash_seed"] == ref["Directory Hash Seed"]
        assert d["checksum_type"] == ref.get("Checksum type")
        seed = ref.get("Checksum seed")
        assert d["checksum_seed"] == (int(seed, 16) if seed else None)
        assert d["orphan_file_inode"] == _int_or_none(ref.get("Orphan file inode"))
        assert d["needs_recovery"] is False and mine["Needs recovery"] == "no"
        if d["writable"]:
            assert mine["Writable"] == "yes" and d["readonly_reason"] is None
        else:
            assert d["readonly_reason"] == mine["Writable"].removeprefix("no: ")
        j = d["journal"]
        if "Journal inode" in ref:
            assert j["inode"] == int(ref["Journal inode"]) and j["error"] is None
            jsb = j["superblock"]
            assert jsb is not None, name
            assert f"0x{jsb['sequence']:08x}" == ref["Journal sequence"]
            assert jsb["start"] == int(ref["Journal start"])
            assert jsb["blocks"] == int(ref["Total journal blocks"])
            assert j["size"] == jsb["blocks"] * jsb["block_size"]
        else:
            assert j is None and "Journal size" not in mine


def test_info_says_when_the_journal_needs_recovery(variants, work):
    img = shutil.copyfile(variants["default"], os.path.join(work, "recover.img"))
    run(["debugfs", "-w", "-R", "feature needs_recovery", img])          # the flag over an empty journal
    empty = _info_fields(ok("info", img).decode())
    assert empty["Needs recovery"] == "yes (the journal is empty: nothing to replay)"
    assert empty["Filesystem features"] == dumpe2fs_header(img)["Filesystem features"]
    # a committed transaction in the journal (debugfs jo/jw/jc): replayed in memory, as info says
    shutil.copyfile(variants["default"], img)
    block = int(run(["debugfs", "-R", "bmap /etc/hostname 0", img]).stdout.split()[0])
    payload = os.path.join(work, "payload")
    with open(payload, "wb") as f:
        f.write(b"replayed\n".ljust(1024, b"\0"))
    run(["debugfs", "-w", "-f", "-", img], input=f"jo\njw -b {block} {payload}\njc\n".encode())
    ref = dumpe2fs_header(img)
    assert "needs_recovery" in ref["Filesystem features"].split()
    text, js = ok_all(("info", img), ("info", "--json", img))
    fields = _info_fields(text.decode())
    assert fields["Needs recovery"].startswith("yes (the journal is replayed in memory")
    d = json.loads(js)
    assert d["needs_recovery"] is True and d["journal_replayed"] is True
    assert d["journal"]["superblock"]["start"] == int(ref["Journal start"]) != 0
    assert f"0x{d['journal']['superblock']['sequence']:08x}" == ref["Journal sequence"]
    assert ok("cat", f"{img}:/etc/hostname") == b"repla"                # the replayed block, 5 bytes long
    for path in (img, payload):
        os.unlink(path)


def test_help_names_the_new_commands_and_options():
    top = ok("--help").decode()
    for name in ("parts", "unsparse"):
        assert re.search(rf"^\s+{name}\s+\S", top, re.M), name
        assert ok(name, "--help").decode().startswith(f"usage: xipfs {name}")
    for name in ("ls", "cat", "stat", "info", "check", "cp", "unpack", "run", "mount", "rm"):
        sub = ok(name, "--help").decode()
        assert "--partition N" in sub and "--offset BYTES" in sub, name
    assert "--partition" not in ok("mkfs", "--help").decode()


def test_writing_into_an_ext2_partition(gpt, work):
    disk = shutil.copyfile(gpt, os.path.join(work, "write.img"))
    start = (2048 + 32768 + 8192) * SECTOR
    ok("mkdir", "--partition", "3", f"{disk}:/new")
    ok("cp", "--partition", "3", os.path.join(work, "src", "big.bin"), f"{disk}:/new/")
    assert ok("cat", "--offset", start, f"{disk}:/new/big.bin") == BIG
    part = cut(disk, start, 20 * MiB, os.path.join(work, "write-p3.img"))
    assert_fsck_clean(part)
    ok("mkdir", "--partition", "1", f"{disk}:/ext4-too")         # the ext4 partition, as well
    assert b"ext4-too" in ok("ls", "--partition", "1", disk)
    part1 = cut(disk, 2048 * SECTOR, 16 * MiB, os.path.join(work, "write-p1.img"))
    assert_fsck_clean(part1)
    for path in (disk, part, part1):
        os.unlink(path)
