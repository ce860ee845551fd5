"""Casefolded directories (ext4 ``casefold``, ``chattr +F``): names looked up as Linux does.

Oracles: e2fsprogs' copy of the kernel's utf8-12.1 table (libext2fs, through ctypes) for the
folding of every code point; e2fsck, which hashes a casefolded htree by the folded names (``-D``
builds one, ``-fn`` checks it), for the hash; and, where the kernel has casefold support
(``/sys/fs/ext4/features/casefold``), a loop mount answering each lookup.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import random
import unicodedata

import pytest
from conftest import IS_ROOT, mounted
from e2fs import assert_fsck_clean, debugfs, debugfs_ls, debugfs_stat, e2fsck, fsck, mkfs, run

import xipfs
from xipfs.extfs import layout as L
from xipfs.extfs.casefold import fold, fold_str, hash_key, is_valid
from xipfs.extfs.check import check_image


# -- the oracle for the folding: libext2fs's utf8-12.1 table -------------------------------------
class _E2fsprogsFold:
    """``ext2fs_load_nls_table(utf8-12.1)->ops->casefold``: the kernel's table, as e2fsck uses it."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("ext2fs")
        if path is None:
            raise OSError("no libext2fs")
        lib = ctypes.CDLL(path)
        load = lib.ext2fs_load_nls_table
        load.restype = ctypes.c_void_p
        load.argtypes = [ctypes.c_int]
        self.table = load(1)
        if not self.table:
            raise OSError("libext2fs has no utf8-12.1 table")
        ops = ctypes.c_void_p.from_address(self.table + ctypes.sizeof(ctypes.c_void_p)).value
        proto = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_char_p, ctypes.c_size_t)
        self.casefold = proto(ctypes.c_void_p.from_address(ops).value)
        self.out = ctypes.create_string_buffer(4096)

    def __call__(self, name: bytes) -> bytes | None:
        n = self.casefold(self.table, name, len(name), self.out, len(self.out))
        return None if n < 0 else self.out.raw[:n]


@pytest.fixture(scope="module")
def kernel_fold() -> _E2fsprogsFold:
    try:
        return _E2fsprogsFold()
    except (OSError, AttributeError) as exc:
        pytest.skip(f"libext2fs's casefold table is not at hand: {exc}")


def _code_points() -> list[int]:
    """Every code point of planes 0, 1, 2, 3 and 14, a stride of the others (unassigned)."""
    planes = (0, 1, 2, 3, 14)
    cps = [cp for p in planes for cp in range(p << 16, (p + 1) << 16)]
    cps += range(0x40000, 0x110000, 97)
    return [cp for cp in cps if cp and not 0xD800 <= cp <= 0xDFFF]


def test_fold_is_the_kernel_table_for_every_code_point(kernel_fold):
    bad = [hex(cp) for cp in _code_points()
           if fold(chr(cp).encode()) != kernel_fold(chr(cp).encode())]
    assert not bad, f"{len(bad)} code points fold otherwise than utf8-12.1: {bad[:20]}"


def test_fold_is_the_kernel_table_for_strings(kernel_fold):
    """Marks reordered across folds, ignorables, too-new characters, Hangul, invalid bytes."""
    pool = [chr(c) for c in (*range(0x41, 0x5B), *range(0x61, 0x7B), *range(0xC0, 0x180),
                             0x130, 0x131, 0x345, 0x3A3, 0x3C2, 0x390, 0x1E9E, 0x212A, 0x212B,
                             0x1FB3, 0x1F88, 0x200B, 0xAD, 0xFE0F, 0x301, 0x316, 0x334, 0x5B0,
                             0x1AC0, 0x898, 0x10570, 0x2C2F, 0xAC00, 0xD4DB, 0x1100, 0x1161,
                             0x11A8, 0xE0001, 0x1D173, 0xDF, 0x149, 0x1F0, 0x587, 0xFB00, 0x1C5,
                             0x344, 0xF73, 0xF81, 0x1D15E, 0x2126)]
    rng = random.Random(12)
    for _ in range(20000):
        name = "".join(rng.choice(pool) for _ in range(rng.randint(1, 10))).encode()
        if rng.random() < 0.05:
            name += bytes([rng.choice((0x80, 0xC3, 0xFF))])
        assert fold(name) == kernel_fold(name), name


@pytest.mark.parametrize(("name", "folded"), [
    ("Straße", "strasse"),
    ("STRASSE", "strasse"),
    ("ǅemo", "\u01c6emo"),                          # titlecase DŽ: ǆ, not decomposed (compat)
    ("ΣΊΣΥΦΟΣ", "σι\u0301συφοσ"),                   # final sigma folds as sigma; NFD of Ί
    ("σίσυφος", "σι\u0301συφοσ"),
    ("Café", "cafe\u0301"),                         # NFC and NFD spellings fold alike
    ("Cafe\u0301", "cafe\u0301"),
    ("İ", "i\u0307"),
    ("K", "k"),                                     # KELVIN SIGN
    ("Å", "a\u030a"),                               # ANGSTROM SIGN
    ("α\u0345\u0301", "αι\u0301"),                 # ypogegrammeni folds to a class-0 iota
    ("zero\u200bwidth", "zerowidth"),               # Default_Ignorable: nothing
    ("a\u0301\u200b\u0316", "a\u0301\u0316"),       # ... which ends a run of marks
    ("a\u0301\u0316", "a\u0316\u0301"),
    ("\U00010570", "\U00010570"),                   # Vithkuqi (Unicode 14): unknown to 12.1
    ("\u1ac0\u0334", "\u1ac0\u0334"),               # a mark of 13.0: class 0 for 12.1
])
def test_fold_examples(name, folded):
    assert fold(name.encode()) == folded.encode()
    assert fold_str(name) == folded


def test_newer_unicode_data_finds_the_same_characters():
    """With Unicode data newer than the list was made from, the characters 12.1 does not know
    are found from the bitmap of what 12.1 changes: here it must give the list itself."""
    from xipfs.extfs import casefold

    listed = {cp for a, b in casefold._NEWER_THAN_121 for cp in range(a, b + 1)}
    found = {a for a, _ in casefold._newer_found()}
    if casefold._unidata() == casefold._CHECKED_UNIDATA:
        assert found == listed
    elif casefold._unidata() > casefold._CHECKED_UNIDATA:
        assert listed <= found
    else:                                       # older data knows fewer of them: none others
        assert found <= listed


def test_invalid_utf8_does_not_fold():
    for raw in (b"bad\xff", b"a\xc3", b"\xed\xa0\x80", b"\xc0\x80", b"\xf4\x90\x80\x80"):
        assert fold(raw) is None and not is_valid(raw)
        assert hash_key(raw) == raw
        assert fold_str(os.fsdecode(raw)) is None
    assert hash_key(b"ABC") == b"abc" and is_valid("é".encode())


def test_stray_continuation_bytes_fold_as_the_kernel_cursor_does():
    """utf8byte emits a continuation byte met between characters as part of the one before:
    such a name folds (and matches case-insensitively), though it is not valid UTF-8."""
    assert fold(b"O\x80") == b"o\x80" and fold_str(os.fsdecode(b"O\x80")) == os.fsdecode(b"o\x80")
    assert fold(b"\x80O") is None                       # not as the first byte
    assert fold("ß".encode() + b"\x80") == b"ss\x80"
    assert fold("é".encode() + b"\x80") == b"e\x80\xcc\x81\x80"  # once per reordering pass
    assert not is_valid(b"O\x80")                        # strict mode refuses it all the same


# -- images ----------------------------------------------------------------------------------
def _names(count: int, bad: bytes = b"bad") -> list[bytes]:
    """Stored names: mixed case, non-ASCII in NFC and NFD, final sigma, ignorables, bad UTF-8;
    no two alike once folded. (e2fsprogs 1.47.0 fails to hash a name whose UTF-8 breaks after
    its first byte, so ``e2fsck -D`` gets names that break at the first byte: ``bad``.)"""
    kinds = ("File{}_MiXeD", "Straße{}", "ǅemo{}", "ΣΊΣΥΦΟΣ{}", "Café{}", "Cafe\u0301X{}",
             "zw\u200bsp{}", "İstanbul{}", "ﬀ{}lig")
    out = [k.format(i).encode() for i in range(count // len(kinds) + 1) for k in kinds][:count - 3]
    return [*out, bad + b"\xff\xfeName", bad.upper() + b"\xff\xfeNAME", b"Stray\x80Cont"]


def _spellings(name: bytes) -> list[bytes]:
    """What a program may look ``name`` up as."""
    try:
        text = name.decode()
    except UnicodeDecodeError:
        return [name, name.upper(), name.lower(), name.swapcase()]
    out = {text, text.upper(), text.lower(), text.swapcase(), text.casefold(),
           unicodedata.normalize("NFC", text), unicodedata.normalize("NFD", text),
           unicodedata.normalize("NFD", text.upper()), text.replace("\u200b", "\u200c")}
    return sorted(s.encode() for s in out)


def _casefold_image(img: str, names: list[bytes], *, strict: bool = False) -> None:
    """An ext4 image whose /ci is casefolded (set by debugfs on the empty directory) holding
    ``names`` (empty files), indexed by ``e2fsck -D`` when large, e2fsck-clean."""
    extra = ["-O", "casefold", "-N", "16384"]
    if strict:
        extra += ["-E", "encoding=utf8,encoding_flags=strict"]
    mkfs(img, "64M", bs=4096, extra=tuple(extra), fstype="ext4")
    debugfs(img, "mkdir ci", "mkdir plain", write=True)
    flags = debugfs_stat(img, "ci").flags
    debugfs(img, f"set_inode_field ci flags {flags | L.FL_CASEFOLD:#x}", write=True)
    empty = img + ".empty"
    open(empty, "wb").close()
    cmds = ["cd ci", *(f"write {empty} {os.fsdecode(n)}" for n in names)]
    with open(img + ".cmds", "wb") as f:
        f.write(b"\n".join(os.fsencode(c) for c in cmds) + b"\n")
    run(["debugfs", "-w", "-f", img + ".cmds", img])
    os.unlink(img + ".cmds")
    os.unlink(empty)
    rc, out = e2fsck(img, "-fyD")
    assert rc in (0, 1), out
    assert_fsck_clean(img)


def _expected(names: dict[bytes, int], folder) -> dict[bytes, int]:
    """``{folded: inode}`` of the stored names, first one kept (the oracle's folding)."""
    out: dict[bytes, int] = {}
    for name, ino in names.items():
        f = folder(name)
        if f is not None:
            out.setdefault(f, ino)
    return out


def _answer(query: bytes, names: dict[bytes, int], folded: dict[bytes, int], folder) -> int | None:
    """Linux generic_ci_match: the same bytes, or both valid UTF-8 and folded alike."""
    f = folder(query)
    if f is None:
        return names.get(query)
    return folded.get(f)


def _check_lookups(fs, names: dict[bytes, int], folder, strict: bool = False) -> int:
    """Every spelling of every name looked up as Linux would: found, ENOENT, or (strict
    encoding, a name that does not fold) EINVAL."""
    folded = _expected(names, folder)
    n = 0
    queries = [(name, q) for name in names for q in _spellings(name)]
    queries += [(None, q) for q in (b"nothing", b"STRASSE999999", b"bad\xff\xfenam", b"caf\xc3\xa9",
                                    b"sTRAY\x80cONT")]
    for name, query in queries:
        want = _answer(query, names, folded, folder)
        path = "/ci/" + os.fsdecode(query)
        if strict and folder(query) is None:
            with pytest.raises(OSError) as exc:
                fs.stat(path)
            assert exc.value.errno == errno.EINVAL, query
        elif want is None:
            with pytest.raises(FileNotFoundError):
                fs.stat(path)
        else:
            assert fs.stat(path).st_ino == want, (name, query)
        n += name is not None
    return n


def _stored(img: str) -> dict[bytes, int]:
    with xipfs.open(img) as fs:
        return {os.fsencode(n): fs.stat("/ci/" + n).st_ino for n in fs.listdir("/ci")}


@pytest.fixture(scope="module")
def folder():
    try:
        return _E2fsprogsFold()
    except (OSError, AttributeError):
        return fold


@pytest.fixture(scope="module")
def small_image(tmp_path_factory):
    img = str(tmp_path_factory.mktemp("casefold") / "small.img")
    _casefold_image(img, _names(40))
    return img


@pytest.fixture(scope="module")
def htree_image(tmp_path_factory):
    img = str(tmp_path_factory.mktemp("casefold") / "htree.img")
    _casefold_image(img, _names(3000, b"\xbfbad"))
    return img


def test_linear_casefolded_directory(small_image, folder):
    assert not debugfs_stat(small_image, "ci").flags & L.FL_INDEX
    names = _stored(small_image)
    assert len(names) == 40
    with xipfs.open(small_image) as fs:
        assert _check_lookups(fs, names, folder) > 150
        assert fs.stat("/ci/STRASSE0").st_ino == fs.stat("/ci/straße0").st_ino
        with pytest.raises(FileNotFoundError):
            fs.stat("/PLAIN")                          # the root is not casefolded


def test_htree_casefolded_directory(htree_image, folder):
    """Looked up through the index (a read-only volume, directory not read whole yet: e2fsck's
    hashes of the folded names lead there), then through the directory read whole."""
    ci = debugfs_stat(htree_image, "ci")
    assert ci.flags & L.FL_INDEX and ci.flags & L.FL_CASEFOLD
    names = _stored(htree_image)
    assert len(names) == 3000
    with xipfs.open(htree_image) as fs:
        assert _check_lookups(fs, names, folder) > 10000
        assert fs.volume.inode(ci.ino)._dir is None      # never read whole: through the index
    with xipfs.open(htree_image) as fs:
        fs.listdir("/ci")
        _check_lookups(fs, names, folder)


def test_checker_passes_casefolded_directories(htree_image):
    problems, _ = check_image(htree_image)
    assert not problems


def test_casefold_images_open_read_write(tmp_path, small_image):
    img = str(tmp_path / "w.img")
    with open(small_image, "rb") as src, open(img, "wb") as dst:
        dst.write(src.read())
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/ci/Written", b"x")
    with xipfs.open(img) as fs:
        assert fs.read_bytes("/ci/WRITTEN") == b"x" and "Written" in fs.listdir("/ci")
    assert_fsck_clean(img)


def test_unknown_encoding_is_refused(tmp_path):
    img = str(tmp_path / "enc.img")
    mkfs(img, "16M", extra=("-O", "casefold,^metadata_csum"), fstype="ext4")
    debugfs(img, "mkdir ci", write=True)
    flags = debugfs_stat(img, "ci").flags
    debugfs(img, f"set_inode_field ci flags {flags | L.FL_CASEFOLD:#x}", write=True)
    with open(img, "r+b") as f:                      # s_encoding: 2, which no one defines
        f.seek(1024 + L.SUPERBLOCK.offsets["s_encoding"])
        f.write((2).to_bytes(2, "little"))
    debugfs(img, "cd ci", "mkdir x", write=True)
    with xipfs.open(img) as fs:
        with pytest.raises(OSError) as exc:
            fs.stat("/ci/x")
        assert exc.value.errno == errno.EOPNOTSUPP and "encoding" in str(exc.value)
        assert fs.listdir("/ci") == ["x"]                # listed all the same
        with pytest.raises(OSError) as exc:
            fs.stat("/ci/x")
        assert exc.value.errno == errno.EOPNOTSUPP and "encoding" in str(exc.value)


@pytest.mark.parametrize("count", [30, 2000])             # a linear directory, an htree
def test_strict_image(tmp_path, folder, count):
    img = str(tmp_path / "strict.img")
    _casefold_image(img, [n for n in _names(count) if is_valid(n)], strict=True)
    names = _stored(img)
    with xipfs.open(img) as fs:
        _check_lookups(fs, names, folder, strict=True)   # a name that does not fold: EINVAL


# -- the kernel as the oracle ------------------------------------------------------------------
def test_lookups_agree_with_linux(htree_image, small_image):
    if not os.path.exists("/sys/fs/ext4/features/casefold"):
        pytest.skip("this kernel's ext4 has no casefold support (CONFIG_UNICODE)")
    if not IS_ROOT:
        pytest.skip("loop mounts need root")
    for img in (small_image, htree_image):
        names = _stored(img)
        queries = sorted({q for n in names for q in _spellings(n)}
                         | {b"nothing", b"bad\xff\xfenam", b"caf\xc3\xa9"})
        with mounted(img) as mnt:
            linux = {}
            for q in queries:
                try:
                    linux[q] = os.stat(os.path.join(os.fsencode(mnt), b"ci", q)).st_ino
                except FileNotFoundError:
                    linux[q] = None
        with xipfs.open(img) as fs:
            for q in queries:
                try:
                    ours = fs.stat("/ci/" + os.fsdecode(q)).st_ino
                except FileNotFoundError:
                    ours = None
                assert ours == linux[q], q


def test_import_hook_reads_casefold_images_through_the_format_layer(tmp_path):
    """The import hook's lean reader declines the casefold feature; the format layer imports
    from a plain directory and from a casefolded one, where a module's file name matches
    without regard to case."""
    import subprocess
    import sys

    tree = tmp_path / "tree"
    (tree / "site").mkdir(parents=True)
    (tree / "site" / "cf_plain_mod.py").write_text("V = 1\n")
    (tree / "CiMod.py").write_text("V = 2\n")
    img = str(tmp_path / "imp.img")
    mkfs(img, "16M", src=str(tree), extra=("-O", "casefold"), fstype="ext4")
    debugfs(img, "mkdir ci", write=True)
    flags = debugfs_stat(img, "ci").flags
    debugfs(img, f"set_inode_field ci flags {flags | L.FL_CASEFOLD:#x}", "cd ci",
            f"write {tree / 'CiMod.py'} CiMod.py", write=True)
    assert_fsck_clean(img)
    code = ("import sys\nfrom xipfs import importer\nimporter.install()\n"
            f"sys.path[:0] = [{img + '/site'!r}, {img + '/ci'!r}]\n"
            "import cf_plain_mod, CiMod\nprint(cf_plain_mod.V, CiMod.V)\n"
            "import xipfs\nfs = xipfs.open(sys.argv[1])\nprint(fs.read_bytes('/ci/cimod.PY').decode())\n")
    proc = subprocess.run([sys.executable, "-c", code, img], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", "2", "V", "=", "2"]


@pytest.mark.parametrize("strict", [False, True])
def test_checker_on_names_alike_once_folded(tmp_path, strict):
    """e2fsck checks a casefolded directory's names (UTF-8, unique once folded) in strict mode
    only; so does the checker, finding what e2fsck finds."""
    img = str(tmp_path / "dups.img")
    extra = ["-O", "casefold"] + (["-E", "encoding=utf8,encoding_flags=strict"] if strict else [])
    mkfs(img, "16M", extra=tuple(extra), fstype="ext4")
    debugfs(img, "mkdir ci", write=True)
    flags = debugfs_stat(img, "ci").flags
    empty = str(tmp_path / "empty")
    open(empty, "wb").close()
    debugfs(img, f"set_inode_field ci flags {flags | L.FL_CASEFOLD:#x}", "cd ci",
            *(f"write {empty} {n}" for n in ("Foo", "foo", "Straße", "STRASSE", "ok")), write=True)
    run(["debugfs", "-w", "-R", f"write {empty} ci/" + os.fsdecode(b"bad\xffname"), img])
    problems, _ = check_image(img)
    rc, out = fsck(img)
    if not strict:
        assert rc == 0 and not problems, out
        return
    assert rc == 4 and "non-unique filename" in out and "illegal UTF-8" in out
    found = sorted((p.code, p.message.split("'")[1]) for p in problems)
    assert found == [("bad_name", "bad\\xffname"), ("dup_entry", "STRASSE"), ("dup_entry", "foo")]


# -- changes ----------------------------------------------------------------------------------------

def _copy(src: str, dst: str) -> str:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    return dst


def test_changes_in_a_casefolded_directory(tmp_path, small_image, folder):
    """Names stored as given, found by any case; a case variant of a name there is EEXIST;
    unlink and rename act on the entry a lookup finds; a new subdirectory is casefolded too;
    enough names make an htree, hashed by the folded names (e2fsck -fn checks each hash)."""
    img = _copy(small_image, str(tmp_path / "w.img"))
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/ci/NewFile", b"x")
        for dup in ("/ci/newfile", "/ci/NEWFILE", "/ci/straße0", "/ci/CAFE\u03011"):
            with pytest.raises(FileExistsError):
                fs.mkdir(dup)
        assert fs.read_bytes("/ci/NEWFILE") == b"x"
        straße = fs.stat("/ci/Straße0").st_ino
        fs.unlink("/ci/STRASSE0")                            # removes Straße0
        with pytest.raises(FileNotFoundError):
            fs.stat("/ci/straße0")
        fs.rename("/ci/FILE0_mixed", "/ci/Renamed_ẞ")       # capital sharp s
        assert fs.stat("/ci/renamed_ss").st_ino != straße
        fs.rename("/ci/ǅemo0", "/ci/ǄEMO0")                 # another case of itself: nothing
        cafe = fs.stat("/ci/café1").st_ino
        fs.rename("/ci/file1_mixed", "/ci/CAFÉ1")            # over Café1, whose name stays
        assert fs.stat("/ci/cafe\u03011").st_ino != cafe
        fs.mkdir("/ci/SubDir")
        fs.write_bytes("/ci/subdir/Inner", b"y")
        fs.mkdir("/ci/Gone_Dir")
        fs.rmdir("/ci/GONE_DIR")                            # removes Gone_Dir
        with pytest.raises(FileNotFoundError):
            fs.stat("/ci/gone_dir")
        ci = fs.volume.inode(fs.stat("/ci").st_ino)         # RENAME_EXCHANGE by other spellings
        cafe2, straße2 = fs.stat("/ci/Café2").st_ino, fs.stat("/ci/Straße2").st_ino
        fs.nodes.rename(ci, "CAFE\u03012".encode(), ci, b"STRASSE2", exchange=True)
        assert (fs.stat("/ci/café2").st_ino, fs.stat("/ci/straße2").st_ino) == (straße2, cafe2)
        assert fs.read_bytes("/CI/../ci/SUBDIR/INNER".replace("/CI/..", "")) == b"y"
        for i in range(600):
            fs.write_bytes(f"/ci/Grown_{i}_ÄÖÜ", b"z")
    assert_fsck_clean(img)
    ls = debugfs_ls(img, "ci")
    for stored in ("NewFile", "Renamed_ẞ", "ǅemo0", "Café1", "SubDir", "Grown_599_ÄÖÜ", "Café2",
                   "Straße2"):
        assert stored.encode() in ls, stored
    for gone in ("Straße0", "CAFÉ1", "ǄEMO0", "File0_MiXeD", "File1_MiXeD", "Gone_Dir", "STRASSE2"):
        assert gone.encode() not in ls, gone
    assert debugfs_stat(img, "ci").flags & L.FL_INDEX
    assert debugfs_stat(img, "ci/SubDir").flags & L.FL_CASEFOLD
    names = _stored(img)
    with xipfs.open(img) as fs:
        _check_lookups(fs, names, folder)
        assert fs.read_bytes("/ci/grown_599_äöü") == b"z"


def test_strict_encoding_refuses_names_that_are_not_utf8(tmp_path):
    img = str(tmp_path / "strict-w.img")
    _casefold_image(img, [b"Ok"], strict=True)
    with xipfs.open(img, "r+") as fs:
        for make in (lambda p: fs.write_bytes(p, b"x"), fs.mkdir):
            with pytest.raises(OSError) as exc:
                make("/ci/" + os.fsdecode(b"bad\xffname"))
            assert exc.value.errno == errno.EINVAL
        fs.write_bytes("/" + os.fsdecode(b"bad\xffname"), b"x")      # not casefolded: fine
        with pytest.raises(OSError) as exc:
            fs.rename("/" + os.fsdecode(b"bad\xffname"), "/ci/" + os.fsdecode(b"o\x80"))
        assert exc.value.errno == errno.EINVAL
    assert_fsck_clean(img)


def test_inline_casefolded_directory(tmp_path, folder):
    """A casefolded directory whose entries live in the inode (inline_data)."""
    img = str(tmp_path / "inline.img")
    mkfs(img, "16M", extra=("-O", "casefold,inline_data", "-I", "256"), fstype="ext4")
    debugfs(img, "mkdir ci", write=True)
    ci = debugfs_stat(img, "ci")
    assert ci.inline
    empty = str(tmp_path / "empty")
    open(empty, "wb").close()
    debugfs(img, f"set_inode_field ci flags {ci.flags | L.FL_CASEFOLD:#x}", "cd ci",
            f"write {empty} Straße", f"write {empty} ΣΊΣΥΦΟΣ", write=True)
    assert_fsck_clean(img)
    assert debugfs_stat(img, "ci").inline
    names = _stored(img)
    with xipfs.open(img) as fs:
        assert _check_lookups(fs, names, folder) >= 9
        assert fs.stat("/ci/STRASSE").st_ino == names["Straße".encode()]


def test_folded_entries_after_removals():
    """A removal drops only its own folded name, or uncovers the next entry folding alike."""
    from xipfs.extfs.dir import FoldedEntries

    entries = FoldedEntries({"Straße": (11, 1), "STRASSE": (12, 1), "Café": (13, 1)})
    assert entries.get("strasse") == (11, 1) and entries.stored("CAFÉ") == "Café"
    entries.pop("Straße")
    assert entries.get("strasse") == (12, 1)                 # the one folding alike, uncovered
    del entries["Café"]
    assert "café" not in entries
    entries["CAFE\u0301"] = (14, 1)
    assert entries.stored("café") == "CAFE\u0301"
    entries.pop("STRASSE")
    assert entries.get("Straße") is None and entries.get("cafe\u0301") == (14, 1)


def test_encrypted_casefolded_directory_is_refused(tmp_path):
    """Names hashed with siphash under a key: refused as every encrypted inode is (ENOKEY; an
    encrypt image opens read-only, so no change reaches it)."""
    img = str(tmp_path / "enc.img")
    mkfs(img, "16M", extra=("-O", "casefold,encrypt"), fstype="ext4")
    debugfs(img, "mkdir ci", "cd ci", "mkdir x", write=True)
    flags = debugfs_stat(img, "ci").flags
    debugfs(img, f"set_inode_field ci flags {flags | L.FL_CASEFOLD | L.FL_ENCRYPT:#x}", write=True)
    with xipfs.open(img) as fs:
        with pytest.raises(OSError) as exc:
            fs.stat("/ci/x")
        assert exc.value.errno == errno.ENOKEY and "encrypted" in str(exc.value)


def test_checker_on_names_alike_in_inline_directory(tmp_path):
    """The strict casefold checks also cover a directory whose entries live in the inode."""
    img = str(tmp_path / "inline-dups.img")
    mkfs(img, "16M", extra=("-O", "casefold,inline_data", "-I", "256", "-E",
                            "encoding=utf8,encoding_flags=strict"), fstype="ext4")
    debugfs(img, "mkdir ci", write=True)
    flags = debugfs_stat(img, "ci").flags
    empty = str(tmp_path / "empty")
    open(empty, "wb").close()
    debugfs(img, f"set_inode_field ci flags {flags | L.FL_CASEFOLD:#x}", "cd ci",
            f"write {empty} Foo", f"write {empty} foo", write=True)
    run(["debugfs", "-w", "-R", f"write {empty} ci/" + os.fsdecode(b"bad\xffname"), img])
    assert debugfs_stat(img, "ci").inline
    rc, out = fsck(img)
    assert rc == 4 and "Duplicate entry 'foo'" in out and "illegal UTF-8" in out
    problems, _ = check_image(img)
    found = sorted((p.code, p.message.split("'")[1]) for p in problems)
    assert found == [("bad_name", "bad\\xffname"), ("dup_entry", "foo")]
