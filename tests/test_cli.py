"""The ``xipfs`` command, through its entry point: output, exit codes, errors, and clean images.

Most tests call ``cli.main(argv)`` in-process and read stdout/stderr with capsys; a few run
``python -m xipfs`` to prove the console path (exit codes, no tracebacks, a closed pipe).
Every writing command is followed by ``e2fsck -fn``. Oracles outside xipfs: e2fsprogs
(mke2fs -d, dumpe2fs, e2fsck), GNU chmod/numfmt/date on local files, the local tree itself.
"""

from __future__ import annotations

import importlib
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest
from e2fs import SHM, assert_fsck_clean, debugfs_r, dumpe2fs_header
from e2fs import mkfs as mke2fs

import xipfs
from xipfs import cli
from xipfs.cli import format as F

ERROR_LINE = re.compile(r"^xipfs: [a-z]+: .+: .+$")
BIG = bytes(range(256)) * 800 + b"tail"          # 204804 bytes: more than one copy chunk at 1 KiB blocks
README_TIMES = (1_500_000_000_123_456_789, 1_600_000_000_987_654_321)
#: What mke2fs -d keeps of README_TIMES: whole seconds.
README_MTIME_S = 1_600_000_000 * 10**9


def has_module(name: str) -> bool:
    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


# -- fixtures -----------------------------------------------------------------------------------
@pytest.fixture
def shm(tmp_path):
    """A private directory in /dev/shm (images there are read in place), removed afterwards."""
    path = os.path.join(SHM, f"xipfs-cli-{os.getpid()}-{tmp_path.name}")
    os.makedirs(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def build_src(root) -> None:
    """A small local tree: files, an empty one, a binary one, hidden, symlinks, non-ASCII names."""
    os.makedirs(root / "docs" / "deep")
    (root / "docs" / "readme.txt").write_text("read me\n")
    (root / "docs" / "deep" / "note.md").write_text("# note\n")
    (root / "bin.dat").write_bytes(BIG)
    (root / "empty").write_bytes(b"")
    (root / ".hidden").write_text("h\n")
    (root / "héllo wörld.txt").write_text("non-ascii\n")
    os.symlink("docs/readme.txt", root / "link")
    os.chmod(root / "bin.dat", 0o640)
    os.chmod(root / "docs" / "deep", 0o750)
    os.utime(root / "docs" / "readme.txt", ns=README_TIMES)


@pytest.fixture
def src(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    build_src(root)
    return root


@pytest.fixture
def img(shm, src):
    """The source tree in an image made by mke2fs -d (1 KiB blocks, 256-byte inodes), in /dev/shm."""
    return mke2fs(os.path.join(shm, "t.img"), "8M", bs=1024, isize=256, src=str(src))


@pytest.fixture
def disk_img(tmp_path, src):
    """The same tree on a disk file (the page-cache path)."""
    return mke2fs(str(tmp_path / "disk.img"), "8M", bs=4096, src=str(src))


@pytest.fixture
def empty(shm):
    """An empty image made by xipfs.mkfs."""
    path = os.path.join(shm, "empty.img")
    xipfs.mkfs(path, 8 << 20)
    return path


def x(capsys, *argv: str) -> tuple[int, str, str]:
    """Run ``xipfs ARGV`` in-process: (exit status, stdout, stderr)."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys, *argv: str) -> str:
    """Run a command that must succeed quietly on stderr; its stdout."""
    rc, out, err = x(capsys, *argv)
    assert rc == 0, f"xipfs {' '.join(map(str, argv))} -> {rc}\n{err}"
    assert err == ""
    return out


def write(capsys, image: str, *argv: str) -> str:
    """A writing command that must succeed and leave ``image`` clean for e2fsck."""
    out = ok(capsys, *argv)
    assert_fsck_clean(image)
    return out


def fails(capsys, *argv: str, status: int = 1) -> str:
    """Run a command that must fail with one error line; that line."""
    rc, _, err = x(capsys, *argv)
    assert rc == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def pyx(*argv: str, **kw) -> subprocess.CompletedProcess:
    """``python -m xipfs ARGV`` in a child process."""
    return subprocess.run([sys.executable, "-m", "xipfs", *map(str, argv)], capture_output=True,
                          timeout=60, **kw)


# -- help -------------------------------------------------------------------------------------
def test_help_lists_every_command_and_each_has_its_own(capsys):
    out = ok(capsys, "--help")
    for name in ("mkfs", "pack", "unpack", "info", "ls", "cat", "cp", "mkdir", "rm", "mv", "ln", "chmod",
                 "chown", "touch", "stat", "df", "tree", "check", "run", "mount"):
        assert re.search(rf"^\s+{name}\s+\S", out, re.M), name
        sub = ok(capsys, name, "--help")
        assert sub.startswith(f"usage: xipfs {name}")
        assert "--debug" in sub and "--quiet" in sub
    assert "examples:" in out and "IMAGE:PATH" in out
    assert ok(capsys, "--version").strip() == f"xipfs {xipfs.__version__}"
    rc, out, _ = x(capsys)
    assert rc == 2 and "usage:" in out


def test_commands_import_only_what_they_need(img):
    """``--help`` imports no part of the format layer, ``ls`` only the read path: no tools, no
    doors, no dataclasses/json/shutil (the command's start-up time is mostly imports)."""
    def imported(*argv: str) -> set[str]:
        proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "xipfs", *argv],
                              capture_output=True, timeout=60)
        assert proc.returncode == 0, proc.stderr.decode()
        return {line.split("|")[-1].strip() for line in proc.stderr.decode().splitlines()
                if line.startswith("import time:")}
    helped = imported("--help")
    assert not helped & {"xipfs.fs", "xipfs.extfs", "xipfs.tools", "dataclasses", "json", "shutil"}
    listed = imported("ls", f"{img}:/")
    assert "xipfs.fs" in listed
    assert not listed & {"xipfs.tools", "xipfs.tools.pack", "xipfs.extfs.mkfs", "xipfs.fuse",
                         "xipfs.fsspec_fs", "xipfs.extfs.check", "dataclasses", "json", "shutil"}
    # only the family of the command runs: no other subcommand's module is imported
    assert not listed & {"xipfs.cli.make", "xipfs.cli.edit", "xipfs.cli.run", "xipfs.cli.disk",
                         "xipfs.cli.fetch"}
    checked = imported("check", img)
    assert "xipfs.extfs.check" in checked and not checked & {"xipfs.cli.edit", "xipfs.fs", "dataclasses"}


def test_every_subcommand_is_in_its_family():
    """A command builds its family's parsers only: the table must name every subcommand."""
    from xipfs.cli import FAMILIES, build_parser

    families = {name for _, _, names in FAMILIES for name in names}
    assert set(build_parser().subcommands) == families | {"demo"}
    for name in families:
        assert build_parser(name).subcommands == [name]


def test_usage_errors_exit_2(capsys, img):
    rc, _, err = x(capsys, "ls")
    assert rc == 2 and "required" in err
    rc, _, err = x(capsys, "frobnicate")
    assert rc == 2 and "invalid choice" in err
    line = fails(capsys, "cat", img, status=2)
    assert line == f"xipfs: cat: {img}: expected IMAGE:PATH (a path inside an image)"
    assert "invalid mode" in fails(capsys, "chmod", "u+q", f"{img}:/empty", status=2)
    new = os.path.join(os.path.dirname(img), "n.img")
    assert "invalid size" in fails(capsys, "mkfs", new, "12Q", status=2)
    assert "invalid date" in fails(capsys, "touch", "-d", "someday", f"{img}:/empty", status=2)
    assert_fsck_clean(img)


# -- reading ----------------------------------------------------------------------------------
def test_ls_names_long_all_recursive(capsys, img, src):
    assert ok(capsys, "ls", img).split("\n")[:-1] == sorted(
        ["bin.dat", "docs", "empty", "héllo wörld.txt", "link", "lost+found"])
    assert ok(capsys, "ls", f"{img}:/docs") == "deep\nreadme.txt\n"
    names = ok(capsys, "ls", "-a", f"{img}:/").split()
    assert names[:3] == [".", "..", ".hidden"]
    long = ok(capsys, "ls", "-l", f"{img}:/").splitlines()
    assert long[0].startswith("total ")
    by_name = {line.split(maxsplit=8)[8]: line for line in long[1:]}
    assert by_name["link -> docs/readme.txt"].startswith("lrwxrwxrwx 1 root")
    assert by_name["bin.dat"].startswith("-rw-r----- 1 ") and f" {len(BIG)} " in by_name["bin.dat"]
    assert by_name["docs"].startswith("drwxr-xr-x 3 ")
    assert " 201K " in ok(capsys, "ls", "-lh", f"{img}:/bin.dat")
    # a file operand prints itself; -d lists a directory itself
    assert ok(capsys, "ls", f"{img}:/docs/readme.txt") == "/docs/readme.txt\n"
    assert ok(capsys, "ls", "-d", f"{img}:/docs") == "/docs\n"
    two = ok(capsys, "ls", "-l", f"{img}:/empty", f"{img}:/bin.dat").splitlines()   # one aligned group
    assert len(two) == 2 and len({line.index(" /") for line in two}) == 1
    # -R: a header per directory, depth first
    rec = ok(capsys, "ls", "-R", f"{img}:/docs")
    assert rec == "/docs:\ndeep\nreadme.txt\n\n/docs/deep:\nnote.md\n"
    # several operands: files first, then each directory under a header
    both = ok(capsys, "ls", f"{img}:/empty", f"{img}:/docs/deep")
    assert both == "/empty\n\n/docs/deep:\nnote.md\n"


def test_ls_json(capsys, img):
    entries = json.loads(ok(capsys, "ls", "--json", "-R", f"{img}:/docs"))
    assert [e["path"] for e in entries] == ["/docs/deep", "/docs/readme.txt", "/docs/deep/note.md"]
    for e in entries:
        assert tuple(e) == F.ENTRY_KEYS
    readme = entries[1]
    assert readme["type"] == "file" and readme["size"] == 8 and readme["permissions"] == "0644"
    assert readme["mtime_ns"] == README_MTIME_S
    assert readme["mtime"] == "2020-09-13T12:26:40.000000000Z"
    assert entries[0]["type"] == "dir" and entries[0]["permissions"] == "0750"
    link = json.loads(ok(capsys, "ls", "--json", f"{img}:/link"))
    assert link[0]["type"] == "symlink" and link[0]["target"] == "docs/readme.txt"


def test_cat_is_binary_safe_and_concatenates(capsysbinary, img):
    rc = cli.main(["cat", f"{img}:/bin.dat", f"{img}:/link", f"{img}:/empty"])
    out, err = capsysbinary.readouterr()
    assert rc == 0 and err == b""
    assert out == BIG + b"read me\n"


def test_cat_goes_on_after_an_error(capsysbinary, img):
    rc = cli.main(["cat", f"{img}:/docs", f"{img}:/docs/readme.txt"])
    out, err = capsysbinary.readouterr()
    assert rc == 1 and out == b"read me\n"
    assert err.decode() == f"xipfs: cat: {img}:/docs: Is a directory\n"


def test_info_agrees_with_dumpe2fs(capsys, img):
    d = dumpe2fs_header(img)
    text = ok(capsys, "info", img)
    fields = dict(line.split(":", 1) for line in text.splitlines())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    for key in ("Filesystem UUID", "Filesystem features", "Filesystem state", "Inode count", "Block count",
                "Reserved block count", "Free blocks", "Free inodes", "First block", "Block size",
                "Inode size", "Blocks per group", "Inodes per group", "Inode blocks per group",
                "Filesystem created", "Mount count", "Maximum mount count", "Errors behavior"):
        assert fields[key] == d[key], key
    assert "read in place (XIP)" in fields["Storage"]
    info = json.loads(ok(capsys, "info", "--json", img))
    assert info["uuid"] == d["Filesystem UUID"] and info["blocks_count"] == int(d["Block count"])
    assert info["features"] == d["Filesystem features"].split()
    assert info["xip"] is True and info["writable"] is True and info["readonly_reason"] is None
    assert {"image", "label", "state", "free_blocks", "free_inodes", "groups", "created"} <= set(info)


def test_info_on_the_page_cache_path(capsys, disk_img):
    info = json.loads(ok(capsys, "info", "--json", disk_img))
    assert info["xip"] is False and info["storage"].endswith("page cache") and info["block_size"] == 4096


def test_df(capsys, img, disk_img):
    rows = json.loads(ok(capsys, "df", "--json", img, disk_img))
    assert [r["image"] for r in rows] == [img, disk_img]
    with xipfs.open(img) as fs:
        sv = fs.statvfs("/")
    r = rows[0]
    assert r["size"] == sv.f_blocks * sv.f_frsize and r["available"] == sv.f_bavail * sv.f_frsize
    assert r["used"] + sv.f_bfree * sv.f_frsize == r["size"]
    assert r["inodes_used"] == sv.f_files - sv.f_ffree and 0 < r["use_percent"] <= 100
    lines = ok(capsys, "df", img).splitlines()
    assert lines[0].split() == ["Filesystem", "Size", "Used", "Avail", "Use%"]
    assert lines[1].split() == [img, F.human_size(r["size"]), F.human_size(r["used"]),
                                F.human_size(r["available"]), f"{r['use_percent']}%"]
    assert ok(capsys, "df", "-i", img).splitlines()[1].split()[1:4] == [
        str(r["inodes"]), str(r["inodes_used"]), str(r["inodes_free"])]


def test_stat_text_and_json(capsys, img):
    out = ok(capsys, "stat", f"{img}:/docs/readme.txt").splitlines()
    assert out[0] == f"  File: {img}:/docs/readme.txt"
    assert out[1].startswith("  Size: 8 ") and out[1].endswith("regular file")
    assert out[3].startswith("Access: (0644/-rw-r--r--)  Uid: (    0/    root)")
    assert re.fullmatch(r"Modify: 2020-09-1[34] \d\d:\d\d:40\.000000000 [+-]\d{4}", out[5])
    with xipfs.open(img) as fs:                        # ext4's i_crtime, as stat(1) shows it
        birth = fs.birthtime_ns("/docs/readme.txt")
    assert out[-1] == (" Birth: -" if birth is None else f" Birth: {F.stat_time(birth)}")
    link = ok(capsys, "stat", f"{img}:/link").splitlines()
    assert link[0] == f"  File: {img}:/link -> docs/readme.txt" and link[1].endswith("symbolic link")
    recs = json.loads(ok(capsys, "stat", "--json", "-L", f"{img}:/link", f"{img}:/empty"))
    assert [r["type"] for r in recs] == ["file", "file"] and recs[0]["size"] == 8
    assert set(recs[0]) == set(F.ENTRY_KEYS) | {"image"} and recs[0]["image"] == img


def test_tree(capsys, img):
    out = ok(capsys, "tree", img)
    assert out == (f"{img}\n"
                   "├── bin.dat\n"
                   "├── docs\n"
                   "│\u00a0\u00a0 ├── deep\n"
                   "│\u00a0\u00a0 │\u00a0\u00a0 └── note.md\n"
                   "│\u00a0\u00a0 └── readme.txt\n"
                   "├── empty\n"
                   "├── héllo wörld.txt\n"
                   "├── link -> docs/readme.txt\n"
                   "└── lost+found\n"
                   "\n"
                   "4 directories, 6 files\n")              # as tree 2.x: the top counts
    assert ok(capsys, "tree", "-d", f"{img}:/docs").endswith("deep\n\n2 directories\n")
    assert ok(capsys, "tree", "-L", "1", f"{img}:/docs").endswith("readme.txt\n\n2 directories, 1 file\n")


# -- making -----------------------------------------------------------------------------------
def test_mkfs_options_reach_the_superblock(capsys, shm):
    path = os.path.join(shm, "m.img")
    uuid = "0b7a4c6e-4f7e-4a55-9a59-2f4b1f2b7f10"
    out = ok(capsys, "mkfs", "-b", "1024", "-I", "128", "-N", "256", "-L", "mylabel", "-U", uuid,
             "-O", "^dir_index", path, "4M")
    assert out.startswith(f"{path}: ext2, 1024-byte blocks, 4096 blocks (4.0M)")
    assert os.path.getsize(path) == 4 << 20
    assert_fsck_clean(path)
    d = dumpe2fs_header(path)
    assert d["Block size"] == "1024" and d["Inode size"] == "128" and d["Inode count"] == "256"
    assert d["Filesystem volume name"] == "mylabel" and d["Filesystem UUID"] == uuid
    assert "dir_index" not in d["Filesystem features"].split()
    # an existing filesystem is kept unless -F
    line = fails(capsys, "mkfs", path, "4M")
    assert line == f"xipfs: mkfs: {path}: already holds an ext2 filesystem (use -F to make a new one over it)"
    assert ok(capsys, "-q", "mkfs", "-F", "--preallocate", path, "2M") == ""
    assert os.path.getsize(path) == 2 << 20
    assert_fsck_clean(path)
    assert "too small" in fails(capsys, "mkfs", os.path.join(shm, "tiny.img"), "10K")


# -- changing ---------------------------------------------------------------------------------
def test_cp_round_trip_local_image_local(capsys, empty, src, tmp_path):
    write(capsys, empty, "cp", "-rp", src, f"{empty}:/")
    back = tmp_path / "back"
    ok(capsys, "cp", "-rp", f"{empty}:/src", back)
    for top, dirs, files in os.walk(src):
        rel = os.path.relpath(top, src)
        for name in dirs + files:
            a, b = os.path.join(top, name), os.path.join(back, rel, name)
            sa, sb = os.lstat(a), os.lstat(b)
            assert sa.st_mode == sb.st_mode, name
            if stat.S_ISLNK(sa.st_mode):
                assert os.readlink(a) == os.readlink(b)
                continue
            assert sa.st_mtime_ns == sb.st_mtime_ns, name
            if stat.S_ISREG(sa.st_mode):
                with open(a, "rb") as fa, open(b, "rb") as fb:
                    assert fa.read() == fb.read(), name
    with xipfs.open(empty) as fs:
        st = fs.stat("/src/docs/readme.txt")
        assert (st.st_atime_ns, st.st_mtime_ns) == README_TIMES
        assert stat.S_IMODE(fs.stat("/src/docs/deep").st_mode) == 0o750


def test_cp_modes_without_p_follow_the_umask(capsys, empty, src, tmp_path):
    old = os.umask(0o027)
    try:
        write(capsys, empty, "cp", src / "docs" / "readme.txt", src / "bin.dat", f"{empty}:/")
        ok(capsys, "cp", f"{empty}:/readme.txt", tmp_path / "r.txt")
    finally:
        os.umask(old)
    with xipfs.open(empty) as fs:
        assert stat.S_IMODE(fs.stat("/readme.txt").st_mode) == 0o640
        assert stat.S_IMODE(fs.stat("/bin.dat").st_mode) == 0o640
        assert fs.stat("/readme.txt").st_mtime_ns != README_TIMES[1]
        assert fs.read_bytes("/bin.dat") == BIG
    assert (tmp_path / "r.txt").read_text() == "read me\n"


def test_cp_directory_needs_r(capsys, img, tmp_path):
    line = fails(capsys, "cp", f"{img}:/docs", tmp_path / "d")
    assert line == f"xipfs: cp: {img}:/docs: -r not specified; omitting directory"
    assert not (tmp_path / "d").exists()


def test_cp_reads_a_fifo_unless_recursive(capsys, empty, tmp_path):
    """Like cp: a named FIFO given as a source is read (its contents become a file); with -r
    a FIFO is made anew."""
    import threading

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "wb") as f:
            f.write(b"through a pipe\n" * 1000)

    writer = threading.Thread(target=feed)
    writer.start()
    write(capsys, empty, "cp", fifo, f"{empty}:/copied")
    writer.join()
    write(capsys, empty, "cp", "-r", fifo, f"{empty}:/node")
    with xipfs.open(empty) as fs:
        assert fs.read_bytes("/copied") == b"through a pipe\n" * 1000
        assert stat.S_ISFIFO(fs.lstat("/node").st_mode)


def test_image_name_with_a_colon(capsys, shm, empty):
    """An image whose file name has a colon is still an image for info, check and ls."""
    odd = os.path.join(shm, "a:b.img")
    shutil.copy(empty, odd)
    assert "Filesystem UUID" in ok(capsys, "info", odd)
    assert "clean" in ok(capsys, "check", odd)
    assert "lost+found" in ok(capsys, "ls", f"{odd}:/")


def test_cp_image_to_image(capsys, img, empty):
    write(capsys, img, "cp", "-r", f"{img}:/docs", f"{img}:/docs2")         # the same image
    write(capsys, empty, "cp", "-rp", f"{img}:/docs", f"{img}:/link", f"{empty}:/")  # another image
    write(capsys, empty, "cp", f"{img}:/link", f"{empty}:/followed")
    assert_fsck_clean(img)
    with xipfs.open(img) as a, xipfs.open(empty) as b:
        assert a.read_bytes("/docs2/deep/note.md") == b"# note\n"
        assert b.read_bytes("/docs/deep/note.md") == b"# note\n"
        assert b.readlink("/link") == "docs/readme.txt"         # -r copies a symlink as a symlink
        assert b.read_bytes("/followed") == b"read me\n"        # without -r it is followed
        assert not b.islink("/followed")
        assert b.stat("/docs/readme.txt").st_mtime_ns == README_MTIME_S
    assert "into itself" in fails(capsys, "cp", "-r", f"{img}:/docs", f"{img}:/docs/deep")
    # a whole image merged into a directory; one entry cannot be made, the rest is copied
    write(capsys, empty, "mkdir", "-p", f"{empty}:/all/link")
    line = fails(capsys, "cp", "-r", f"{img}:/", f"{empty}:/all")
    assert line == (f"xipfs: cp: {empty}:/all/link: cannot overwrite directory with non-directory "
                    f"'{img}:/link'")
    assert_fsck_clean(empty)
    with xipfs.open(empty) as b:
        assert b.read_bytes("/all/bin.dat") == BIG and b.read_bytes("/all/docs/deep/note.md") == b"# note\n"
        assert b.isdir("/all/link") and b.isdir("/all/lost+found")     # what comes after it too
    line = fails(capsys, "cp", f"{img}:/empty", f"{img}:/empty")
    assert line.endswith("are the same file")
    line = fails(capsys, "cp", f"{img}:/empty", f"{img}:/bin.dat", f"{img}:/empty")
    assert line == f"xipfs: cp: {img}:/empty: target is not a directory"
    assert_fsck_clean(img)


def test_rm(capsys, img):
    assert fails(capsys, "rm", f"{img}:/docs") == f"xipfs: rm: {img}:/docs: Is a directory (use -r)"
    assert fails(capsys, "rm", f"{img}:/nope") == f"xipfs: rm: {img}:/nope: No such file or directory"
    write(capsys, img, "rm", "-f", f"{img}:/nope", f"{img}:/empty")
    write(capsys, img, "rm", "-r", f"{img}:/docs", f"{img}:/link")
    assert "root directory" in fails(capsys, "rm", "-r", f"{img}:/")
    with xipfs.open(img) as fs:
        assert sorted(fs.listdir("/")) == [".hidden", "bin.dat", "héllo wörld.txt", "lost+found"]


def test_mkdir(capsys, empty):
    write(capsys, empty, "mkdir", f"{empty}:/a", f"{empty}:/b")
    write(capsys, empty, "mkdir", "-p", f"{empty}:/a/x/y/z", f"{empty}:/a")
    write(capsys, empty, "mkdir", "-m", "700", f"{empty}:/private")
    assert fails(capsys, "mkdir", f"{empty}:/a").endswith(":/a: File exists")
    assert fails(capsys, "mkdir", f"{empty}:/q/r").endswith("No such file or directory")
    with xipfs.open(empty) as fs:
        assert fs.isdir("/a/x/y/z") and fs.isdir("/b")
        assert stat.S_IMODE(fs.stat("/private").st_mode) == 0o700


def test_mv(capsys, img, empty):
    write(capsys, img, "mv", f"{img}:/docs/readme.txt", f"{img}:/docs/deep")     # into a directory
    write(capsys, img, "mv", f"{img}:/docs/deep", f"{img}:/moved")               # rename a directory
    write(capsys, img, "mv", f"{img}:/empty", f"{img}:/bin.dat", f"{img}:/moved")
    write(capsys, img, "mv", f"{img}:/moved", f"{empty}:/elsewhere")             # across images
    assert_fsck_clean(empty)
    with xipfs.open(img) as fs:
        assert not fs.exists("/moved") and not fs.exists("/empty")
    with xipfs.open(empty) as fs:
        assert sorted(fs.listdir("/elsewhere")) == ["bin.dat", "empty", "note.md", "readme.txt"]
        assert fs.read_bytes("/elsewhere/bin.dat") == BIG
        assert fs.stat("/elsewhere/readme.txt").st_mtime_ns == README_MTIME_S
    assert "Invalid argument" in fails(capsys, "mv", f"{empty}:/elsewhere", f"{empty}:/elsewhere/x")


def test_ln(capsys, img):
    write(capsys, img, "ln", "-s", "../bin.dat", f"{img}:/docs/bin")
    write(capsys, img, "ln", f"{img}:/bin.dat", f"{img}:/hard")
    write(capsys, img, "ln", "/empty", f"{img}:/docs")                 # into a directory
    write(capsys, img, "ln", "-sf", "readme.txt", f"{img}:/docs/empty")
    with xipfs.open(img) as fs:
        assert fs.readlink("/docs/bin") == "../bin.dat" and fs.read_bytes("/docs/bin") == BIG
        assert fs.stat("/hard").st_ino == fs.stat("/bin.dat").st_ino and fs.stat("/hard").st_nlink == 2
        assert fs.readlink("/docs/empty") == "readme.txt"
    assert fails(capsys, "ln", "-s", "x", f"{img}:/hard").endswith("File exists")


CHMOD_SPECS = ["u+x", "go-w", "a=rX", "u=rwx,g=rx,o=", "+x", "a-w", "=r", "g+s", "u+s,o+t", "o=u",
               "g=o", "755", "0644", "4755", "00755", "ug+rw,o-rwx", "u-x,g+w", "a+X", "u=g", "+t"]


@pytest.mark.parametrize("start", [0o100644, 0o100755, 0o040755, 0o042755])
def test_chmod_modes_match_gnu_chmod(tmp_path, start):
    """apply_mode against GNU chmod on real files and directories (umask 022)."""
    old = os.umask(0o022)
    try:
        for spec in CHMOD_SPECS:
            p = tmp_path / "f"
            if stat.S_ISDIR(start):
                p.mkdir()
            else:
                p.touch()
            os.chmod(p, stat.S_IMODE(start))
            subprocess.run(["chmod", spec, str(p)], check=True)
            want = stat.S_IMODE(os.stat(p).st_mode)
            assert F.apply_mode(spec, start, 0o022) == want, (spec, oct(start))
            (p.rmdir if stat.S_ISDIR(start) else p.unlink)()
    finally:
        os.umask(old)


def test_chmod_and_chown(capsys, img):
    write(capsys, img, "chmod", "u+x,go-r", f"{img}:/bin.dat", f"{img}:/link")
    write(capsys, img, "chmod", "-R", "a+rX,o-w", f"{img}:/docs")
    with xipfs.open(img) as fs:
        assert stat.S_IMODE(fs.stat("/bin.dat").st_mode) == 0o700
        # through the link 0644 became 0700; then a+rX adds x everywhere, as u has it
        assert stat.S_IMODE(fs.stat("/docs/readme.txt").st_mode) == 0o755
        assert stat.S_IMODE(fs.stat("/docs/deep").st_mode) == 0o755
    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody' here")
    group = F.group_name(nobody.pw_gid)
    write(capsys, img, "chown", f"nobody:{group}", f"{img}:/bin.dat")
    write(capsys, img, "chown", "1234:5678", f"{img}:/empty")
    write(capsys, img, "chown", "-R", "nobody:", f"{img}:/docs")
    write(capsys, img, "chown", ":0", f"{img}:/docs/deep")
    write(capsys, img, "chown", "-h", "4321", f"{img}:/link")
    with xipfs.open(img) as fs:
        assert (fs.stat("/bin.dat").st_uid, fs.stat("/bin.dat").st_gid) == (nobody.pw_uid, nobody.pw_gid)
        assert (fs.stat("/empty").st_uid, fs.stat("/empty").st_gid) == (1234, 5678)
        assert (fs.stat("/docs/deep/note.md").st_uid, fs.stat("/docs/deep/note.md").st_gid) == (
            nobody.pw_uid, nobody.pw_gid)                # "nobody:" is nobody's login group
        assert (fs.stat("/docs/deep").st_uid, fs.stat("/docs/deep").st_gid) == (nobody.pw_uid, 0)
        assert fs.lstat("/link").st_uid == 4321 and fs.stat("/link").st_uid == nobody.pw_uid
    assert ok(capsys, "ls", "-l", f"{img}:/empty").split()[2:4] == ["1234", "5678"]
    assert "invalid user" in fails(capsys, "chown", "no-such-user-here", f"{img}:/empty", status=2)


def test_touch(capsys, img):
    before = time.time_ns()
    write(capsys, img, "touch", f"{img}:/new", f"{img}:/empty")
    write(capsys, img, "touch", "-d", "2021-03-04T05:06:07.123456789Z", f"{img}:/dated")
    write(capsys, img, "touch", "-m", "-d", "@1000000000.5", f"{img}:/dated")
    write(capsys, img, "touch", "-c", f"{img}:/not-made")
    write(capsys, img, "touch", "-a", "-d", "@5", f"{img}:/docs/readme.txt")
    with xipfs.open(img) as fs:
        assert fs.stat("/new").st_size == 0 and fs.stat("/new").st_mtime_ns >= before - 10**9
        assert fs.stat("/empty").st_mtime_ns >= before - 10**9
        st = fs.stat("/dated")
        assert st.st_atime_ns == 1_614_834_367_123_456_789
        assert st.st_mtime_ns == 1_000_000_000_500_000_000
        assert not fs.exists("/not-made")
        assert fs.stat("/docs/readme.txt").st_atime_ns == 5 * 10**9
        assert fs.stat("/docs/readme.txt").st_mtime_ns == README_MTIME_S


def test_names_that_are_not_utf8(capsysbinary, empty, tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    (d / os.fsdecode(b"bad\xff")).write_bytes(b"x")
    assert cli.main(["cp", "-r", str(d), f"{empty}:/w"]) == 0
    assert cli.main(["ls", f"{empty}:/w"]) == 0
    out, err = capsysbinary.readouterr()
    assert out == b"bad\xff\n" and err == b""
    assert cli.main(["ls", "--json", f"{empty}:/w"]) == 0
    assert json.loads(capsysbinary.readouterr()[0])[0]["name"] == os.fsdecode(b"bad\xff")
    assert_fsck_clean(empty)


# -- user errors: one line, exit 1 ------------------------------------------------------------
def test_error_lines(capsys, img, shm, tmp_path):
    missing = os.path.join(shm, "missing.img")
    assert fails(capsys, "ls", missing) == f"xipfs: ls: {missing}: No such file or directory"
    assert fails(capsys, "ls", f"{img}:/nope") == f"xipfs: ls: {img}:/nope: No such file or directory"
    assert fails(capsys, "cat", f"{img}:/empty/x") == f"xipfs: cat: {img}:/empty/x: Not a directory"
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"\0" * 65536)
    assert fails(capsys, "info", junk) == (f"xipfs: info: {junk}: corrupt image: bad magic 0x0000, "
                                           "not an ext2/3/4 filesystem (superblock)")
    assert ERROR_LINE.match(fails(capsys, "ls", tmp_path))      # a directory is no image
    line = fails(capsys, "cp", tmp_path / "none", f"{img}:/x")
    assert line == f"xipfs: cp: {tmp_path / 'none'}: No such file or directory"
    line = fails(capsys, "cp", tmp_path / "none", f"{missing}:/x")
    assert line == f"xipfs: cp: {missing}: No such file or directory"
    line = fails(capsys, "cp", img, tmp_path / "a", status=2)
    assert line == "xipfs: cp: no IMAGE:PATH operand (for local files use the system's own command)"


def test_error_no_space(capsys, shm, tmp_path):
    small = os.path.join(shm, "small.img")
    xipfs.mkfs(small, 256 << 10, block_size=1024)
    big = tmp_path / "big"
    big.write_bytes(os.urandom(400 << 10))
    assert fails(capsys, "cp", big, f"{small}:/big") == f"xipfs: cp: {small}:/big: No space left on device"
    assert_fsck_clean(small)


def test_error_corrupt_directory(capsys, shm):
    path = mke2fs(os.path.join(shm, "c.img"), "1M", bs=1024)
    with xipfs.open(path) as fs:
        root_block = fs.block_runs("/")[0][2]
    with open(path, "r+b") as f:                        # rec_len 0 in the root's first entry
        f.seek(root_block * 1024 + 4)
        f.write(b"\0\0")
    line = fails(capsys, "ls", path)
    assert line.startswith(f"xipfs: ls: {path}: corrupt image: ")


def test_error_read_only_image_and_locked_image(capsys, shm):
    j = mke2fs(os.path.join(shm, "j.img"), "8M", fstype="ext4", extra=("-O", "quota"))
    assert fails(capsys, "mkdir", f"{j}:/x").startswith(
        f"xipfs: mkdir: {j}: image can only be opened read-only: read-only compatible feature quota")
    assert "lost+found" in ok(capsys, "ls", j)            # reading is fine
    locked = os.path.join(shm, "l.img")
    xipfs.mkfs(locked, 1 << 20)
    with xipfs.open(locked, "r+"):
        line = fails(capsys, "touch", f"{locked}:/f")
        assert line.startswith(f"xipfs: touch: {locked}: image is in use by this process")
    write(capsys, locked, "touch", f"{locked}:/f")


def test_error_permission_immutable_image(capsys, empty):
    """An image the kernel refuses to open for writing (chattr +i stops even root)."""
    if subprocess.run(["chattr", "+i", empty], capture_output=True).returncode != 0:
        pytest.skip("chattr +i does not work here")
    try:
        assert fails(capsys, "mkdir", f"{empty}:/x") == f"xipfs: mkdir: {empty}: Operation not permitted"
        assert "lost+found" in ok(capsys, "ls", empty)
    finally:
        subprocess.run(["chattr", "-i", empty], check=True)
    assert_fsck_clean(empty)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a child as another user")
def test_error_permission(shm):
    path = os.path.join(shm, "p.img")
    xipfs.mkfs(path, 1 << 20)
    os.chmod(path, 0o600)
    os.chmod(shm, 0o755)
    nobody = pwd.getpwnam("nobody") if "nobody" in {p.pw_name for p in pwd.getpwall()} else None
    if nobody is None:
        pytest.skip("no user 'nobody'")
    try:
        subprocess.run([sys.executable, "-c", "import xipfs"], user=nobody.pw_uid, group=nobody.pw_gid,
                       extra_groups=[], cwd="/", check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"user 'nobody' cannot run this Python: {err}")
    proc = pyx("ls", path, user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[], cwd="/")
    assert proc.returncode == 1
    assert proc.stderr.decode() == f"xipfs: ls: {path}: Permission denied\n"


# -- the console path -------------------------------------------------------------------------
def test_python_m_xipfs(img, tmp_path):
    proc = pyx("ls", "-l", f"{img}:/docs")
    assert proc.returncode == 0 and b"readme.txt" in proc.stdout and proc.stderr == b""
    proc = pyx("cat", f"{img}:/bin.dat")
    assert proc.returncode == 0 and proc.stdout == BIG
    proc = pyx("ls", f"{img}:/nope")
    assert proc.returncode == 1 and proc.stdout == b""
    assert proc.stderr.decode() == f"xipfs: ls: {img}:/nope: No such file or directory\n"
    proc = pyx("--debug", "ls", f"{img}:/nope")
    assert proc.returncode == 1 and b"Traceback" in proc.stderr and b"FileNotFoundError" in proc.stderr
    proc = pyx("ls", "--bogus", img)
    assert proc.returncode == 2 and b"usage:" in proc.stderr and b"Traceback" not in proc.stderr


def test_closed_pipe_exits_quietly(shm):
    path = os.path.join(shm, "pipe.img")
    xipfs.mkfs(path, 8 << 20)
    with xipfs.open(path, "r+") as fs:
        fs.write_bytes("/big", os.urandom(4 << 20))
    proc = subprocess.Popen([sys.executable, "-m", "xipfs", "cat", f"{path}:/big"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert len(proc.stdout.read(10)) == 10
    proc.stdout.close()
    err = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=60) == cli.BROKEN_PIPE_STATUS
    assert err == b""


# -- the format helpers -----------------------------------------------------------------------
def test_human_size_rounds_like_gnu():
    values = [0, 1, 1023, 1024, 1025, 1536, 10239, 10240, 10241, 1048575, 1048576, 5 << 30, (1 << 40) - 1]
    want = subprocess.run(["numfmt", "--to=iec", "--round=up", *map(str, values)], capture_output=True,
                          text=True, check=True).stdout.split()
    assert [F.human_size(v) for v in values] == want


def test_parse_size_and_date():
    assert F.parse_size("4096") == 4096
    assert F.parse_size("64M") == 64 << 20 and F.parse_size("1.5G") == 3 << 29
    assert F.parse_size("8KiB") == 8192
    for bad in ("", "M", "-1", "1X", "0"):
        with pytest.raises(ValueError):
            F.parse_size(bad)
    for text in ("2020-01-02T03:04:05.5Z", "2021-06-07 08:09:10", "2022-02-03", "2020-01-02T03:04:05+02:00"):
        want = subprocess.run(["date", "-d", text, "+%s%N"], capture_output=True, text=True,
                              check=True).stdout
        assert F.parse_date(text) == int(want), text
    assert F.parse_date("@1234567890.25") == 1_234_567_890_250_000_000
    assert F.parse_date("2020-01-02T03:04:05.123456789Z") == 1_577_934_245_123_456_789


def test_parse_owner():
    assert F.parse_owner("0:0") == (0, 0)
    assert F.parse_owner("root") == (0, -1)
    assert F.parse_owner(":root") == (-1, 0)
    assert F.parse_owner("root:") == (0, pwd.getpwnam("root").pw_gid)
    assert F.parse_owner("+7:+8") == (7, 8)
    with pytest.raises(ValueError):
        F.parse_owner(":")


def test_columns_fill_top_to_bottom():
    names = ["a", "bb", "ccc", "d", "ee", "f", "g"]
    assert F.columns(names, 12) == ["a    d   g", "bb   ee", "ccc  f"]
    assert F.columns(names, 9) == ["a    ee", "bb   f", "ccc  g", "d"]
    assert F.columns(names, 1) == names


def test_image_operands():
    spec = cli.any_spec("./a:b")
    assert spec.image is None and spec.path == "./a:b"
    assert cli.any_spec("/no/such/file:/x").image is None
    assert cli.image_spec("/no/such:x").image == "/no/such" and cli.image_spec("/no/such:x").path == "/x"
    assert cli.image_spec("img", "/").path == "/"


# -- the subcommands over modules written in parallel -------------------------------------------
def needs(module: str):
    return pytest.mark.skipif(not has_module(module), reason=f"{module} not there yet")


@needs("xipfs.extfs.check")
def test_check_clean_and_damaged(capsys, img):
    out = ok(capsys, "check", img)
    assert out.startswith(f"{img}: clean, ")
    doc = json.loads(ok(capsys, "check", "--json", img))
    assert doc == {"image": img, "clean": True, "count": 0, "problems": []}
    debugfs_r(img, "sif /empty links_count 5", write=True)
    rc, out, err = x(capsys, "check", img)
    assert rc == 1 and err == "" and "problem" in out.splitlines()[-1]
    rc, out, _ = x(capsys, "check", "--json", img)
    doc = json.loads(out)
    assert rc == 1 and doc["clean"] is False and doc["count"] == len(doc["problems"]) > 0
    assert {"code", "message", "ino", "block", "path"} <= set(doc["problems"][0])


@needs("xipfs.tools.pack")
def test_pack_then_list_and_unpack(capsys, shm, src, tmp_path):
    image = os.path.join(shm, "p.img")
    out = ok(capsys, "pack", src, image)
    assert out.startswith(f"packed {src} into {image}: ")
    assert_fsck_clean(image)
    assert "readme.txt" in ok(capsys, "ls", f"{image}:/docs")
    assert ok(capsys, "-q", "pack", "--size", "4M", "--label", "lbl", src, image) == ""
    assert json.loads(ok(capsys, "info", "--json", image))["label"] == "lbl"
    assert "No such file or directory" in fails(capsys, "pack", tmp_path / "none", image)
    if has_module("xipfs.tools.unpack"):
        dest = tmp_path / "out"
        ok(capsys, "-q", "unpack", f"{image}:/docs", dest)
        assert (dest / "readme.txt").read_text() == "read me\n"


@needs("xipfs.tools.unpack")
def test_unpack(capsys, img, tmp_path):
    dest = tmp_path / "u"
    out = ok(capsys, "unpack", img, dest)
    assert out.startswith(f"unpacked {img} into {dest}")
    assert (dest / "bin.dat").read_bytes() == BIG and os.readlink(dest / "link") == "docs/readme.txt"
    assert "No such file or directory" in fails(capsys, "unpack", f"{img}:/nope", tmp_path / "v")


@needs("xipfs.importer")
def test_run_a_module_from_an_image(capsys, empty, tmp_path):
    pkg = tmp_path / "lib" / "hello_cli_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "__main__.py").write_text("import sys\nprint('hello', sys.argv[1:])\nsys.exit(3)\n")
    write(capsys, empty, "cp", "-r", tmp_path / "lib", f"{empty}:/lib")
    proc = pyx("run", f"{empty}:/lib", "hello_cli_pkg", "a", "-b")
    assert proc.stdout == b"hello ['a', '-b']\n" and proc.returncode == 3
    proc = pyx("run", f"{empty}:/lib", "no_such_module_here")
    assert proc.returncode == 1 and b"Traceback" not in proc.stderr
    assert ERROR_LINE.match(proc.stderr.decode().strip())
    # the program's own error: its traceback from its own frames, with source lines from the image
    (pkg / "__main__.py").write_text("def f():\n    raise ValueError('boom')\nf()\n")
    write(capsys, empty, "cp", pkg / "__main__.py", f"{empty}:/lib/hello_cli_pkg/")
    proc = pyx("run", f"{empty}:/lib", "hello_cli_pkg")
    err = proc.stderr.decode()
    assert proc.returncode == 1 and err.startswith("Traceback (most recent call last):\n  File ")
    assert "/lib/hello_cli_pkg/__main__.py\", line 2, in f\n    raise ValueError('boom')\n" in err
    assert "cli.py" not in err and err.endswith("ValueError: boom\n")


@needs("xipfs.fuse")
@pytest.mark.skipif(not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"), reason="no FUSE here")
def test_mount_read_only(img, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "xipfs", "mount", "-f", "-o", "ro", img, str(mnt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            if os.path.ismount(mnt) or proc.poll() is not None:
                break
            time.sleep(0.05)
        if not os.path.ismount(mnt):
            pytest.skip(f"mount did not come up: {proc.stderr.read().decode(errors='replace')[-500:]}")
        assert (mnt / "docs" / "readme.txt").read_text() == "read me\n"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True)
        proc.communicate(timeout=30)            # waits, and closes its pipes
    assert_fsck_clean(img)
