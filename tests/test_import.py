"""Importing Python code in place from ext2 images (src/xipfs/importer.py).

Images are made by ``mke2fs -t ext2 -d`` from trees written here or copied from installed
packages. Every in-process test restores ``sys.path``, ``sys.modules``, the path hooks, the
meta path and the importer cache afterwards; the tests that import a real installed package
(which this interpreter may already have loaded) run in a subprocess.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata as md
import importlib.resources as resources
import inspect
import linecache
import os
import pathlib
import pkgutil
import py_compile
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import threading
import traceback

import pytest
from e2fs import assert_fsck_clean, debugfs_r, mkfs

import xipfs
from xipfs import importer
from xipfs.extfs.namei import resolve

PY = sys.executable
SITE = sysconfig.get_paths()["purelib"]
TAG = sys.implementation.cache_tag


# -- helpers ------------------------------------------------------------------------------------
def write_tree(root: os.PathLike | str, files: dict[str, str | bytes]) -> str:
    """Write ``{relative path: text or bytes}`` under ``root``; returns ``root`` as str."""
    root = os.fspath(root)
    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(path, mode) as f:
            f.write(content if isinstance(content, bytes) else textwrap.dedent(content))
    return root


def pack(tree: str, img: str) -> str:
    """``mke2fs -t ext2 -b 4096 -d TREE IMG`` sized for the tree; returns ``img``."""
    total = files = 0
    for top, _, names in os.walk(tree):
        files += len(names) + 1
        total += sum(os.lstat(os.path.join(top, n)).st_size for n in names)
    blocks = total // 4096 + files * 3 + 1024
    return mkfs(img, str(blocks), bs=4096, isize=256, src=tree, extra=("-N", str(files + 64), "-m", "0"))


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_py(code: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter (the importer installed); fail with its stderr."""
    prelude = "import sys, xipfs\nfrom xipfs import importer\nimporter.install()\n"
    proc = subprocess.run([PY, "-c", prelude + textwrap.dedent(code), *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, PYTHONDONTWRITEBYTECODE="1"))
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def copy_installed(dest: str, *names: str) -> None:
    """Copy installed packages (and their dist-info) into ``dest``, keeping mtimes (valid pycs)."""
    for name in names:
        shutil.copytree(os.path.join(SITE, name), os.path.join(dest, name))
        for entry in os.listdir(SITE):
            if entry.endswith(".dist-info") and entry[:-len(".dist-info")].rpartition("-")[0].lower() == name:
                shutil.copytree(os.path.join(SITE, entry), os.path.join(dest, entry))


@pytest.fixture
def clean_import():
    """The importer installed; everything the test adds to the import system removed afterwards."""
    saved = (list(sys.path), dict(sys.modules), list(sys.path_hooks), list(sys.meta_path),
             dict(sys.path_importer_cache))
    importer.install()
    yield
    path, modules, hooks, meta, cache = saved
    sys.path[:] = path
    for name in list(sys.modules):     # xipfs's own modules stay: a second copy of a class breaks
        if name not in modules and name.split(".")[0] != "xipfs":   # isinstance for other tests
            del sys.modules[name]
    sys.path_hooks[:] = hooks
    sys.meta_path[:] = meta
    sys.path_importer_cache.clear()
    sys.path_importer_cache.update(cache)
    importlib.invalidate_caches()


@pytest.fixture
def image_of(tmp_path, clean_import):
    """``image_of(files, inner="site") -> (image, entry)``: the tree packed, ``entry`` on sys.path."""
    count = [0]

    def make(files: dict[str, str | bytes], inner: str = "site", on_path: bool = True) -> tuple[str, str]:
        count[0] += 1
        tree = write_tree(tmp_path / f"tree{count[0]}" / inner, files)
        img = pack(os.path.dirname(tree) if inner else tree, str(tmp_path / f"img{count[0]}.ext2"))
        entry = img + "/" + inner if inner else img
        if on_path:
            sys.path.insert(0, entry)
        return img, entry
    return make


def disk_and_image_error(tmp_path, files: dict[str, str], module: str) -> tuple[BaseException, BaseException]:
    """The exception ``import module`` raises from a directory and from an image of the same tree."""
    tree = write_tree(tmp_path / "errtree", files)
    img = pack(tree, str(tmp_path / "err.ext2"))
    errors = []
    for entry in (tree, img):
        sys.path.insert(0, entry)
        try:
            importlib.import_module(module)
        except BaseException as err:  # noqa: BLE001 - the very thing compared
            errors.append(err)
        else:
            errors.append(None)
        finally:
            sys.path.remove(entry)
            for name in [m for m in sys.modules if m == module or m.startswith(module.split(".")[0])]:
                del sys.modules[name]
    return errors[0], errors[1]


# -- finding images in path entries -------------------------------------------------------------
def test_find_image_splits_like_zipimport(tmp_path):
    img = pack(write_tree(tmp_path / "t", {"site/m.py": "x = 1\n"}), str(tmp_path / "a.img"))
    assert importer.find_image(img) == (img, img, "")
    assert importer.find_image(img + "/site") == (img, img, "site")
    assert importer.find_image(img + "/site/deep/er/") == (img, img, "site/deep/er")
    assert importer.find_image(str(tmp_path)) is None                 # a directory
    (tmp_path / "not.img").write_bytes(b"\0" * 8192)
    assert importer.find_image(str(tmp_path / "not.img") + "/x") is None  # not ext2
    assert importer.find_image(str(tmp_path / "missing") + "/x") is None
    with pytest.raises(ImportError):
        importer.path_hook(str(tmp_path))


def test_shared_memory_name_entry(tmp_path, clean_import):
    name = f"xipfs-imp-test-{os.getpid()}"
    shm = f"/dev/shm/{name}"
    if not os.path.isdir("/dev/shm") or os.path.exists("/" + name):
        pytest.skip("needs /dev/shm and no /NAME path")
    pack(write_tree(tmp_path / "t", {"site/shm_mod_xq.py": "WHERE = 'shm'\n"}), shm)
    try:
        assert importer.find_image(f"/{name}/site") == (f"/{name}", shm, "site")
        sys.path.insert(0, f"/{name}/site")
        mod = importlib.import_module("shm_mod_xq")
        assert mod.WHERE == "shm"
        assert mod.__file__ == f"/{name}/site/shm_mod_xq.py"
        assert importer.entry_path(name + ":site") == f"/{name}/site"
        assert importer.entry_path(shm + ":/site/") == shm + "/site"
    finally:
        os.unlink(shm)


def test_install_is_idempotent_and_uninstall_undoes_it(tmp_path, clean_import):
    img = pack(write_tree(tmp_path / "t", {"inst_mod_q.py": "V = 3\n"}), str(tmp_path / "i.img"))
    importer.install()
    importer.install()
    assert sum(getattr(h, "__xipfs_hook__", False) for h in sys.path_hooks) == 1
    assert sum(f is importer.XipMetadataFinder for f in sys.meta_path) == 1
    importer.uninstall()
    assert not any(getattr(h, "__xipfs_hook__", False) for h in sys.path_hooks)
    assert importer.XipMetadataFinder not in sys.meta_path
    sys.path.insert(0, img)
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("inst_mod_q")
    assert sys.path_importer_cache[img] is None      # remembered as "no importer"
    importer.install()                                # forgets that, so the image now imports
    assert img not in sys.path_importer_cache
    assert importlib.import_module("inst_mod_q").V == 3
    assert isinstance(sys.path_importer_cache[img], importer.XipPathFinder)


# -- modules, packages, __file__ ---------------------------------------------------------------
def test_modules_and_packages_with_file_pointing_into_the_image(image_of):
    img, entry = image_of({
        "pkg_q/__init__.py": "from . import sub\nNAME = __name__\n",
        "pkg_q/sub.py": "def f():\n    return 'sub'\n",
        "pkg_q/inner/__init__.py": "",
        "pkg_q/inner/leaf.py": "from .. import sub\nLEAF = sub.f() + '-leaf'\n",
        "plain_q.py": "X = 42\n",
    })
    pkg = importlib.import_module("pkg_q")
    assert pkg.NAME == "pkg_q" and pkg.sub.f() == "sub"
    assert pkg.__file__ == f"{entry}/pkg_q/__init__.py" == pkg.__spec__.origin
    assert pkg.__path__ == [f"{entry}/pkg_q"]
    assert pkg.__spec__.has_location and pkg.__loader__.is_package("pkg_q")
    assert pkg.__cached__ == f"{entry}/pkg_q/__pycache__/__init__.{TAG}.pyc"
    leaf = importlib.import_module("pkg_q.inner.leaf")
    assert leaf.LEAF == "sub-leaf"
    assert leaf.__file__ == f"{entry}/pkg_q/inner/leaf.py"
    plain = importlib.import_module("plain_q")
    assert plain.X == 42 and not plain.__loader__.is_package("plain_q")
    assert plain.__loader__.get_filename("plain_q") == f"{entry}/plain_q.py"
    assert plain.__loader__.get_source("plain_q") == "X = 42\n"
    assert not hasattr(plain, "__path__")
    assert isinstance(sys.path_importer_cache[entry], importer.XipPathFinder)


def test_image_root_as_entry_and_relative_entry(tmp_path, clean_import, monkeypatch):
    img = pack(write_tree(tmp_path / "t", {"rootmod_q.py": "R = 1\n"}), str(tmp_path / "r.img"))
    monkeypatch.chdir(tmp_path)
    sys.path.insert(0, "r.img")
    mod = importlib.import_module("rootmod_q")
    assert mod.R == 1 and mod.__file__ == img + "/rootmod_q.py"


def test_missing_inner_directory_finds_nothing(image_of):
    img, _ = image_of({"here_q.py": ""}, on_path=False)
    sys.path.insert(0, img + "/no/such/dir")
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("here_q")


def test_each_directory_is_listed_once(image_of, monkeypatch):
    files = {f"many_q/m{i}.py": f"I = {i}\n" for i in range(20)}
    files["many_q/__init__.py"] = ""
    img, entry = image_of(files)
    calls = []
    real = importer._Reader.listing

    def counting(self, ino):
        calls.append(ino)
        return real(self, ino)
    monkeypatch.setattr(importer._Reader, "listing", counting)
    for i in range(20):
        value = importlib.import_module(f"many_q.m{i}").I
        assert value == i
    assert calls, "the lean reader listed nothing"
    assert len(calls) == len(set(calls)), "a directory was indexed twice"


def test_threads_import_from_one_image(image_of):
    files = {f"thr_q{i}.py": f"import time\nV = {i}\n" for i in range(16)}
    image_of(files)
    results, errors = {}, []

    def work(i: int) -> None:
        try:
            results[i] = importlib.import_module(f"thr_q{i}").V
        except BaseException as err:  # noqa: BLE001
            errors.append(err)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == {i: i for i in range(16)}


def test_image_opened_once_per_process(tmp_path, clean_import):
    tree = write_tree(tmp_path / "t", {"a/once_a_q.py": "", "b/once_b_q.py": ""})
    img = pack(tree, str(tmp_path / "o.img"))
    sys.path[:0] = [img + "/a", img + "/b", img + "/./a/../b"]
    importlib.import_module("once_a_q")
    importlib.import_module("once_b_q")
    finders = [sys.path_importer_cache[e] for e in sys.path[:2]]
    assert finders[0]._image is finders[1]._image
    assert importer._image(img) is finders[0]._image


# -- namespace packages ------------------------------------------------------------------------
def test_namespace_package_split_between_image_and_directory(image_of, tmp_path):
    img, entry = image_of({"nsq/in_image.py": "WHERE = 'image'\n",
                           "nsq/deep/__init__.py": "D = 1\n"})
    disk = write_tree(tmp_path / "disk", {"nsq/on_disk.py": "WHERE = 'disk'\n"})
    sys.path.append(disk)
    ns = importlib.import_module("nsq")
    assert ns.__spec__.origin is None or ns.__spec__.origin == "namespace"
    assert list(ns.__path__) == [f"{entry}/nsq", os.path.join(disk, "nsq")]
    assert importlib.import_module("nsq.in_image").WHERE == "image"
    assert importlib.import_module("nsq.on_disk").WHERE == "disk"
    assert importlib.import_module("nsq.deep").D == 1
    assert sys.modules["nsq.in_image"].__file__ == f"{entry}/nsq/in_image.py"


def test_package_beats_module_beats_namespace(image_of):
    image_of({"order_q/__init__.py": "KIND = 'package'\n", "order_q.py": "KIND = 'module'\n",
              "order2_q/x.txt": "", "order2_q.py": "KIND = 'module'\n"})
    assert importlib.import_module("order_q").KIND == "package"
    assert importlib.import_module("order2_q").KIND == "module"


# -- source lines: inspect, linecache, tracebacks -----------------------------------------------
SOURCE_WITH_ERROR = """\
    # a comment line
    def helper(x):
        return 10 // x


    def fail():
        value = helper(0)  # the line of the call
        return value
    """


def test_inspect_getsource_and_traceback_show_image_source(image_of):
    img, entry = image_of({"srcq/__init__.py": "", "srcq/mod.py": SOURCE_WITH_ERROR})
    mod = importlib.import_module("srcq.mod")
    assert inspect.getsource(mod.helper) == "def helper(x):\n    return 10 // x\n"
    assert inspect.getsourcefile(mod.fail) == f"{entry}/srcq/mod.py"
    line = linecache.getline(mod.__file__, 7, mod.__dict__)
    assert line.strip() == "value = helper(0)  # the line of the call"
    with pytest.raises(ZeroDivisionError) as info:
        mod.fail()
    text = "".join(traceback.format_exception(info.value))
    assert f'File "{entry}/srcq/mod.py", line 7, in fail' in text
    assert "value = helper(0)  # the line of the call" in text
    assert f'File "{entry}/srcq/mod.py", line 3, in helper' in text
    assert "return 10 // x" in text
    frames = traceback.extract_tb(info.value.__traceback__)
    assert [f.lineno for f in frames[-2:]] == [7, 3]


def test_traceback_of_module_run_as_main_shows_source(tmp_path):
    tree = write_tree(tmp_path / "t", {"site/mainq/__init__.py": "",
                                       "site/mainq/__main__.py": "import traceback\ntry:\n    1 / 0\n"
                                       "except ZeroDivisionError:\n    traceback.print_exc()\n"})
    img = pack(tree, str(tmp_path / "m.img"))
    proc = run_py(f"importer.run_module({img + ':site'!r}, 'mainq', [])")
    assert f'{img}/site/mainq/__main__.py", line 3' in proc.stderr
    assert "1 / 0" in proc.stderr


def test_import_xipfs_leaves_the_format_layer_for_first_use(tmp_path):
    """``import xipfs`` installs the hook and nothing heavy; the first image entry met, or the
    first ``xipfs.open``, imports the reader, whichever comes first, even with an image entry
    at the head of ``sys.path`` while those imports walk it."""
    tree = write_tree(tmp_path / "t", {"site/lazymod.py": "X = 42\n"})
    img = pack(tree, str(tmp_path / "lazy.img"))
    run_py("""
        heavy = [m for m in ("xipfs.fs", "xipfs.extfs.volume", "xipfs.tools.pack", "dataclasses")
                 if m in sys.modules]
        assert not heavy, heavy
    """)
    for first in ("open", "import"):                 # xipfs.open first, or an import from the image
        proc = run_py(f"""
            sys.path.insert(0, {img + '/site'!r})
            if {first!r} == "open":
                assert xipfs.open({img!r}).listdir("/site") == ["lazymod.py"]
            import lazymod
            assert lazymod.X == 42 and lazymod.__file__ == {img + '/site/lazymod.py'!r}
            print("ok")
        """)
        assert proc.stdout.strip() == "ok"


# -- errors, the same as from disk ---------------------------------------------------------------
def test_syntax_error_like_disk(tmp_path, clean_import):
    files = {"synq/__init__.py": "", "synq/bad.py": "x = 1\n\ndef broken(:\n    pass\n"}
    on_disk, in_image = disk_and_image_error(tmp_path, files, "synq.bad")
    assert type(on_disk) is type(in_image) is SyntaxError
    assert (in_image.lineno, in_image.msg, in_image.offset) == (on_disk.lineno, on_disk.msg, on_disk.offset)
    assert in_image.filename == str(tmp_path / "err.ext2") + "/synq/bad.py"
    assert on_disk.filename == str(tmp_path / "errtree" / "synq" / "bad.py")
    assert in_image.text == on_disk.text == "def broken(:\n"


def test_module_not_found_like_disk(tmp_path, clean_import):
    files = {"mnfq/__init__.py": "from . import missing\n"}
    on_disk, in_image = disk_and_image_error(tmp_path, files, "mnfq")
    assert type(on_disk) is type(in_image)
    assert isinstance(in_image, ImportError)
    assert str(in_image).replace(str(tmp_path / "err.ext2"), "X") == \
        str(on_disk).replace(str(tmp_path / "errtree"), "X")
    _, nested = disk_and_image_error(tmp_path / "2", {"mnf2q/__init__.py": ""}, "mnf2q.nothing")
    assert type(nested) is ModuleNotFoundError and nested.name == "mnf2q.nothing"


def test_import_name_error_like_disk(tmp_path, clean_import):
    files = {"inq/__init__.py": "from .m import nothing\n", "inq/m.py": "something = 1\n"}
    on_disk, in_image = disk_and_image_error(tmp_path, files, "inq")
    assert type(on_disk) is type(in_image) is ImportError
    assert str(in_image) == str(on_disk).replace(str(tmp_path / "errtree"), str(tmp_path / "err.ext2"))
    assert in_image.path == str(tmp_path / "err.ext2") + "/inq/m.py"


def test_exception_at_import_time_like_disk(tmp_path, clean_import):
    files = {"boomq.py": "A = 1\nraise RuntimeError('boom at import')\n"}
    on_disk, in_image = disk_and_image_error(tmp_path, files, "boomq")
    assert type(on_disk) is type(in_image) is RuntimeError
    assert in_image.args == on_disk.args
    assert "boomq" not in sys.modules
    frames = traceback.extract_tb(in_image.__traceback__)
    assert frames[-1].filename == str(tmp_path / "err.ext2") + "/boomq.py"
    assert frames[-1].lineno == 2 and frames[-1].line == "raise RuntimeError('boom at import')"
    # importlib's own frames are trimmed as they are for a directory: no loader frame in between
    disk_frames = traceback.extract_tb(on_disk.__traceback__)
    assert [f.name for f in frames] == [f.name for f in disk_frames]


# -- bytecode -------------------------------------------------------------------------------------
def _tree_with_pyc(tmp_path, pyc_source: str, *, invalidation=py_compile.PycInvalidationMode.TIMESTAMP,
                   touch_source: bool = False) -> str:
    """A tree with ``pycq.py`` (VALUE = 'source') and a pyc in __pycache__ compiled from
    ``pyc_source`` (same length) whose header then matches the real source's mtime and size."""
    src = "VALUE = 'source'\n"
    assert len(pyc_source) == len(src)
    tree = tmp_path / "pyctree"
    path = tree / "pycq.py"
    write_tree(tree, {"pycq.py": pyc_source})
    os.utime(path, ns=(1_600_000_000_000_000_000, 1_600_000_000_000_000_000))
    py_compile.compile(str(path), doraise=True, invalidation_mode=invalidation)
    path.write_text(src)
    stamp = 1_700_000_000_000_000_000 if touch_source else 1_600_000_000_000_000_000
    os.utime(path, ns=(stamp, stamp))
    return str(tree)


def _import_value(entry: str) -> tuple[str, str]:
    sys.path.insert(0, entry)
    try:
        mod = importlib.import_module("pycq")
        return mod.VALUE, mod.__file__
    finally:
        sys.path.remove(entry)
        sys.modules.pop("pycq", None)


def test_valid_pyc_in_image_is_used(tmp_path, clean_import):
    tree = _tree_with_pyc(tmp_path, "VALUE = 'pyc!!!'\n")
    img = pack(tree, str(tmp_path / "p.img"))
    assert _import_value(tree) == ("pyc!!!", os.path.join(tree, "pycq.py"))   # the disk agrees
    assert _import_value(img) == ("pyc!!!", img + "/pycq.py")
    assert sys.modules.get("pycq") is None


def test_stale_pyc_is_ignored(tmp_path, clean_import):
    tree = _tree_with_pyc(tmp_path, "VALUE = 'stale!'\n", touch_source=True)
    img = pack(tree, str(tmp_path / "p.img"))
    assert _import_value(img)[0] == "source"


@pytest.mark.parametrize("damage", ["magic", "flags", "truncated", "empty"])
def test_bad_pyc_is_ignored(tmp_path, clean_import, damage):
    tree = _tree_with_pyc(tmp_path, "VALUE = 'bad!!!'\n")
    pyc = os.path.join(tree, "__pycache__", f"pycq.{TAG}.pyc")
    with open(pyc, "rb") as f:
        data = bytearray(f.read())
    if damage == "magic":
        data[0:2] = b"\0\0"
    elif damage == "flags":
        data[4] = 0x7F
    elif damage == "truncated":
        data = data[:12]
    else:
        data = bytearray()
    with open(pyc, "wb") as f:
        f.write(data)
    img = pack(tree, str(tmp_path / "p.img"))
    assert _import_value(img)[0] == "source"


def test_hash_based_pycs(tmp_path, clean_import):
    checked = _tree_with_pyc(tmp_path / "c", "VALUE = 'hash!!'\n",
                             invalidation=py_compile.PycInvalidationMode.CHECKED_HASH)
    unchecked = _tree_with_pyc(tmp_path / "u", "VALUE = 'hash!!'\n",
                               invalidation=py_compile.PycInvalidationMode.UNCHECKED_HASH)
    # checked: the source hash differs, so the source is used; unchecked: the pyc is trusted
    assert _import_value(pack(checked, str(tmp_path / "c.img")))[0] == "source"
    assert _import_value(pack(unchecked, str(tmp_path / "u.img")))[0] == "hash!!"
    assert _import_value(unchecked)[0] == "hash!!"     # as from a directory


def test_sourceless_pyc_module(tmp_path, clean_import):
    tree = write_tree(tmp_path / "sl", {"slq_src.py": "VALUE = 'compiled only'\n"})
    py_compile.compile(os.path.join(tree, "slq_src.py"), cfile=os.path.join(tree, "slq.pyc"), doraise=True)
    os.unlink(os.path.join(tree, "slq_src.py"))
    img = pack(tree, str(tmp_path / "sl.img"))
    sys.path.insert(0, img)
    mod = importlib.import_module("slq")
    assert mod.VALUE == "compiled only"
    assert mod.__file__ == img + "/slq.pyc"
    assert mod.__loader__.get_source("slq") is None


def test_importing_never_writes_the_image(tmp_path, clean_import, monkeypatch):
    monkeypatch.setattr(sys, "dont_write_bytecode", False)
    tree = write_tree(tmp_path / "nw", {"nwq/__init__.py": "from . import a\n", "nwq/a.py": "A = 1\n",
                                        "nwq/data.txt": "data\n"})
    img = pack(tree, str(tmp_path / "nw.img"))
    before, mtime = digest(img), os.stat(img).st_mtime_ns
    sys.path.insert(0, img)
    mod = importlib.import_module("nwq")                     # compiled from source: no pyc written
    assert resources.files(mod).joinpath("data.txt").read_text() == "data\n"
    assert sys.modules["nwq.a"].__loader__.get_code("nwq.a") is not None
    importlib.invalidate_caches()
    assert digest(img) == before and os.stat(img).st_mtime_ns == mtime
    assert_fsck_clean(img, exit_only=True)
    with xipfs.open(img) as fs:
        assert "__pycache__" not in fs.listdir("/nwq")


# -- importlib.resources ----------------------------------------------------------------------
def test_resources_from_the_image(image_of):
    blob = bytes(range(256)) * 40
    img, entry = image_of({"resq/__init__.py": "", "resq/data.txt": "hello\nworld\n",
                           "resq/sub/inner.bin": blob, "resq/sub/more.txt": "more"})
    pkg = importlib.import_module("resq")
    root = resources.files(pkg)
    assert root.is_dir() and not root.is_file()
    assert str(root) == f"{entry}/resq"
    data = root.joinpath("data.txt")
    assert data.is_file() and data.read_text() == "hello\nworld\n"
    assert (root / "sub" / "inner.bin").read_bytes() == blob
    assert root.joinpath("sub", "more.txt").read_text(encoding="utf-8") == "more"
    assert sorted(p.name for p in root.iterdir()) == ["__init__.py", "data.txt", "sub"]
    assert sorted(p.name for p in (root / "sub").iterdir()) == ["inner.bin", "more.txt"]
    with (root / "sub" / "inner.bin").open("rb") as f:
        assert f.read(10) == blob[:10]
    with data.open("r", encoding="utf-8") as f:
        assert f.readline() == "hello\n"
    assert not root.joinpath("nothing").exists()
    with pytest.raises(FileNotFoundError):
        root.joinpath("nothing").read_bytes()
    with resources.as_file(data) as real:          # a temporary real file with the same bytes
        assert os.path.isfile(real) and not str(real).startswith(img)
        assert pathlib.Path(real).read_text() == "hello\nworld\n"
    with pytest.warns(DeprecationWarning):                 # the legacy API still works
        assert resources.read_text("resq", "data.txt") == "hello\nworld\n"
    with pytest.warns(DeprecationWarning):
        assert resources.is_resource("resq", "data.txt")
    assert pkgutil.get_data("resq", "sub/more.txt") == b"more"
    assert pkg.__loader__.get_data(f"{entry}/resq/data.txt") == b"hello\nworld\n"
    assert pkg.__loader__.get_data("site/resq/data.txt") == b"hello\nworld\n"   # relative to the root
    with pytest.raises(OSError):
        pkg.__loader__.get_data("/etc/hostname")


# -- importlib.metadata -------------------------------------------------------------------------
DIST_FILES = {
    "xipdemo_q/__init__.py": "def main():\n    return 'entry point ran'\n",
    "xipdemo_q/data.txt": "payload",
    "xipdemo_q-1.2.3.dist-info/METADATA": "Metadata-Version: 2.1\nName: xipdemo-q\nVersion: 1.2.3\n"
                                          "Summary: a demo distribution in an image\nRequires-Dist: tqdm\n",
    "xipdemo_q-1.2.3.dist-info/entry_points.txt": "[console_scripts]\nxipdemo-q = xipdemo_q:main\n\n"
                                                  "[xipfs_test_group_q]\nrun = xipdemo_q:main\n",
    "xipdemo_q-1.2.3.dist-info/RECORD": "xipdemo_q/__init__.py,,\nxipdemo_q/data.txt,,\n"
                                        "xipdemo_q-1.2.3.dist-info/METADATA,,\n",
    "xipdemo_q-1.2.3.dist-info/top_level.txt": "xipdemo_q\n",
    "oldegg_q-0.5.egg-info/PKG-INFO": "Metadata-Version: 1.1\nName: oldegg-q\nVersion: 0.5\n",
}


def test_metadata_from_the_image(image_of):
    img, entry = image_of(DIST_FILES)
    assert md.version("xipdemo-q") == "1.2.3"
    assert md.version("XipDemo_Q") == "1.2.3"
    assert md.version("oldegg_q") == "0.5"
    dist = md.distribution("xipdemo-q")
    assert dist.metadata["Summary"] == "a demo distribution in an image"
    assert dist.requires == ["tqdm"]
    assert dist.read_text("top_level.txt") == "xipdemo_q\n"
    assert dist.read_text("nothing.txt") is None
    (ep,) = md.entry_points(group="xipfs_test_group_q")
    assert ep.name == "run" and ep.load()() == "entry point ran"
    assert ep.load().__module__ == "xipdemo_q"
    assert sys.modules["xipdemo_q"].__file__ == f"{entry}/xipdemo_q/__init__.py"
    assert any(e.name == "xipdemo-q" for e in md.entry_points(group="console_scripts"))
    files = {str(f): f for f in dist.files}
    assert set(files) == {"xipdemo_q/__init__.py", "xipdemo_q/data.txt", "xipdemo_q-1.2.3.dist-info/METADATA"}
    located = files["xipdemo_q/data.txt"].locate()
    assert str(located) == f"{entry}/xipdemo_q/data.txt"
    assert files["xipdemo_q/data.txt"].read_text() == "payload"
    names = [d.metadata["Name"] for d in md.distributions()]
    assert "xipdemo-q" in names and "oldegg-q" in names
    assert md.packages_distributions()["xipdemo_q"] == ["xipdemo-q"]


def test_metadata_of_an_image_not_on_sys_path_is_not_seen(image_of):
    img, entry = image_of(DIST_FILES, on_path=False)
    with pytest.raises(md.PackageNotFoundError):
        md.version("xipdemo-q")
    dists = list(md.distributions(path=[entry]))                 # an explicit path finds it
    assert [d.version for d in dists if d.metadata["Name"] == "xipdemo-q"] == ["1.2.3"]


# -- a real package, imported in a fresh interpreter -----------------------------------------
def test_real_packages_import_from_the_image_and_work(tmp_path):
    site = tmp_path / "tree" / "site"
    site.mkdir(parents=True)
    copy_installed(str(site), "tqdm", "fsspec")
    img = pack(str(tmp_path / "tree"), str(tmp_path / "real.img"))
    before = digest(img)
    proc = run_py("""
        import io, importlib.metadata as md, importlib.resources as r, inspect
        img = sys.argv[1]
        entry = img + "/site"
        sys.path.insert(0, entry)
        import tqdm, fsspec
        from fsspec.implementations.memory import MemoryFileSystem
        assert tqdm.__file__ == entry + "/tqdm/__init__.py", tqdm.__file__
        assert fsspec.__file__.startswith(entry), fsspec.__file__
        out = io.StringIO()
        assert sum(tqdm.tqdm(range(1000), file=out, mininterval=0)) == 499500
        assert "1000/1000" in out.getvalue()
        fs = MemoryFileSystem()
        fs.pipe_file("/x/data.bin", b"round trip" * 100)
        assert fs.cat_file("/x/data.bin") == b"round trip" * 100
        assert fs.ls("/x", detail=False) == ["/x/data.bin"]
        assert sys.modules["fsspec.implementations.memory"].__file__.startswith(entry)
        assert md.version("tqdm") == tqdm.__version__.split("+")[0] or md.version("tqdm")
        dist = md.distribution("tqdm")
        assert type(dist).__name__ == "ImageDistribution", dist
        assert any(e.value == "tqdm.cli:main" for e in md.entry_points(group="console_scripts"))
        assert r.files("tqdm").joinpath("completion.sh").read_text().startswith("#!")
        assert "def trange" in inspect.getsource(tqdm.std)
        print("ok", len([m for m in sys.modules if m.split(".")[0] in ("tqdm", "fsspec")]))
    """, img)
    assert proc.stdout.startswith("ok")
    assert digest(img) == before
    assert_fsck_clean(img, exit_only=True)


def test_extension_module_from_the_image(tmp_path):
    dynload = next((p for p in sys.path if p.endswith("lib-dynload")), "")
    names = [n for n in os.listdir(dynload) if n.startswith("xxlimited.")] if dynload else []
    if not names:
        pytest.skip("this Python has no xxlimited test extension")
    tree = tmp_path / "ext"
    tree.mkdir()
    shutil.copy2(os.path.join(dynload, names[0]), tree)
    img = pack(str(tree), str(tmp_path / "ext.img"))
    proc = run_py("""
        sys.path.insert(0, sys.argv[1])
        import xxlimited
        assert xxlimited.__file__ == sys.argv[1] + "/" + sys.argv[2], xxlimited.__file__
        assert xxlimited.__spec__.origin == xxlimited.__file__
        obj = xxlimited.Xxo()
        print("ok", type(obj).__name__)
    """, img, names[0])
    assert proc.stdout.split() == ["ok", "Xxo"]


def test_extension_that_cannot_load_names_the_image(tmp_path):
    """An extension dlopen refuses (here: not an ELF file; for numpy: its libraries beside it)
    raises ImportError naming the image and why, not dlopen's bare message."""
    import importlib.machinery
    tree = tmp_path / "ext"
    tree.mkdir()
    (tree / ("broken" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"not an ELF file")
    img = pack(str(tree), str(tmp_path / "ext.img"))
    proc = run_py("""
        sys.path.insert(0, sys.argv[1])
        try:
            import broken
        except ImportError as err:
            print(err.name, "|", err)
    """, img)
    name, _, message = proc.stdout.partition(" | ")
    assert name == "broken"
    assert f"from the ext2 image {img!r}" in message and "$ORIGIN" in message


# -- running a module ---------------------------------------------------------------------------
MAIN_FILES = {
    "site/appq/__init__.py": "",
    "site/appq/__main__.py": "import sys\nprint('main', __name__, sys.argv)\nsys.exit(int(sys.argv[-1]))\n",
    "site/toolq.py": "import sys\nif __name__ == '__main__':\n    print('tool', sys.argv[1:])\n",
}


def test_run_module_like_python_dash_m(tmp_path):
    tree = write_tree(tmp_path / "t", MAIN_FILES)
    img = pack(tree, str(tmp_path / "run.img"))
    proc = run_py("""
        import os
        try:
            importer.run_module(sys.argv[1], "appq", ["a", "b", "0"])
        except SystemExit as e:
            print("exit", e.code)
        importer.run_module(sys.argv[1].replace(":", "/"), "toolq", ["x"])
        assert sys.argv == ["-c", sys.argv[1]] and not any(p.startswith(sys.argv[1][:-5]) for p in sys.path)
    """, img + ":site")
    lines = proc.stdout.splitlines()
    assert lines[0] == f"main __main__ ['{img}/site/appq/__main__.py', 'a', 'b', '0']"
    assert lines[1] == "exit 0"
    assert lines[2] == "tool ['x']"


def test_run_module_refuses_what_is_not_an_image(tmp_path):
    with pytest.raises(FileNotFoundError):
        importer.run_module(str(tmp_path / "nothing.img"), "x", [])


# -- a changed image ----------------------------------------------------------------------------
def test_invalidate_caches_sees_a_changed_image(image_of):
    img, entry = image_of({"chq_a.py": "A = 1\n"})
    assert importlib.import_module("chq_a").A == 1
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("chq_b")
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/site/chq_b.py", b"B = 2\n")
    importlib.invalidate_caches()
    assert importlib.import_module("chq_b").B == 2
    assert_fsck_clean(img, exit_only=True)


def test_pkgutil_lists_modules_in_the_image(image_of):
    img, entry = image_of({"walkq/__init__.py": "", "walkq/a.py": "", "walkq/b.py": "",
                           "walkq/sub/__init__.py": "", "walkq/sub/c.py": "", "walkq/notpkg/data.txt": "",
                           "walkq/data.txt": "", "walkq/x.y.py": ""})
    pkg = importlib.import_module("walkq")
    assert [(m.name, m.ispkg) for m in pkgutil.iter_modules(pkg.__path__)] == \
        [("a", False), ("b", False), ("sub", True)]
    assert [m.name for m in pkgutil.walk_packages(pkg.__path__, "walkq.")] == \
        ["walkq.a", "walkq.b", "walkq.sub", "walkq.sub.c"]
    assert "walkq" in {m.name for m in pkgutil.iter_modules([entry])}


def test_symlinks_inside_the_image(tmp_path, clean_import):
    tree = write_tree(tmp_path / "ln", {"site/realpkg_q/__init__.py": "P = 'pkg'\n",
                                        "site/realmod_q.py": "M = 'mod'\n", "lib/shared_q.py": "S = 1\n"})
    os.symlink("realpkg_q", os.path.join(tree, "site", "linkpkg_q"))
    os.symlink("realmod_q.py", os.path.join(tree, "site", "linkmod_q.py"))
    os.symlink("../lib/shared_q.py", os.path.join(tree, "site", "shared_q.py"))
    os.symlink("site", os.path.join(tree, "site-link"))
    img = pack(tree, str(tmp_path / "ln.img"))
    sys.path.insert(0, img + "/site-link")
    assert importlib.import_module("linkpkg_q").P == "pkg"
    assert importlib.import_module("linkmod_q").M == "mod"
    assert importlib.import_module("shared_q").S == 1
    assert sys.modules["linkpkg_q"].__file__ == img + "/site-link/linkpkg_q/__init__.py"


def test_pycs_from_pack_compile_are_used(tmp_path, clean_import, monkeypatch):
    if "compile" not in inspect.signature(xipfs.pack).parameters:
        pytest.skip("xipfs.pack has no compile= yet")
    tree = write_tree(tmp_path / "pc", {"site/packq/__init__.py": "from .m import M\n",
                                        "site/packq/m.py": "M = 7\n"})
    img = str(tmp_path / "pc.img")
    xipfs.pack(tree, img, compile=True, progress=False)

    def no_compiling(self, data, path, *, _optimize=-1):
        raise AssertionError(f"compiled {path} from source: the pyc in the image was not used")
    monkeypatch.setattr(importer.XipLoader, "source_to_code", no_compiling)
    sys.path.insert(0, img + "/site")
    assert importlib.import_module("packq").M == 7
    assert_fsck_clean(img, exit_only=True)


# -- the fast paths give what the general ones give ---------------------------------------------
def test_fast_file_reads_match_the_block_map(tmp_path, clean_import):
    sizes = {"empty": 0, "one": 100, "twelve_blocks": 12 * 4096, "indirect": 13 * 4096 + 5, "big": 300_000}
    files = {f"rd/{name}.bin": os.urandom(n) for name, n in sizes.items()}
    tree = write_tree(tmp_path / "rd", files)
    img = pack(tree, str(tmp_path / "rd.img"))
    with xipfs.open(img, "r+") as fs, fs.open("/rd/sparse.bin", "wb") as f:   # a hole, then data
        f.seek(5 * 4096)
        f.write(b"tail")
    image = importer._image(img)
    vol = image.fs.volume
    for name in [*sizes, "sparse"]:
        path = f"/rd/{name}.bin"
        expected = files[f"rd/{name}.bin"] if name in sizes else bytes(5 * 4096) + b"tail"
        assert image.read(path) == expected, name
    assert resolve(vol, "/rd/one.bin").map.whole              # the common case: one pread
    assert not resolve(vol, "/rd/indirect.bin").map.whole     # needs the block map


def test_image_reached_by_two_names_is_opened_once(tmp_path, clean_import):
    tree = write_tree(tmp_path / "t", {"two_names_q.py": "N = 2\n"})
    img = pack(tree, str(tmp_path / "two.img"))
    alias = str(tmp_path / "alias.img")
    os.symlink(img, alias)
    assert importer.path_hook(img)._image is importer.path_hook(alias)._image
    assert importer._image(alias) is importer._image(img)


def test_new_entry_sees_an_image_changed_in_place(tmp_path, clean_import):
    tree = write_tree(tmp_path / "t", {"b/keep.txt": "x"})
    img = pack(tree, str(tmp_path / "ip.img"))
    sys.path.insert(0, img + "/b")
    with pytest.raises(ModuleNotFoundError):           # /b is listed now, without the module
        importlib.import_module("inplace_b_q")
    with xipfs.open(img, "r+") as fs:
        fs.write_bytes("/b/inplace_b_q.py", b"B = 2\n")
    alias = str(tmp_path / "alias.img")
    os.symlink(img, alias)
    sys.path.insert(0, alias + "/b")                    # a new entry: the path hook looks again
    assert importlib.import_module("inplace_b_q").B == 2


def test_normalize_matches_importlib_metadata():
    import re

    def reference(name: str) -> str:                    # importlib.metadata.Prepared.normalize
        return re.sub(r"[-_.]+", "-", name).lower().replace("-", "_")
    for name in ["tqdm", "Foo.Bar--baz__q", "a-_.-b", "XipDemo_Q", "__x__", "a..b", "-lead", "trail.", ""]:
        assert importer._normalize(name) == reference(name)


def test_resource_text_has_universal_newlines_like_a_file(image_of, tmp_path):
    raw = b"one\r\ntwo\rthree\n\xc3\xa9\n"
    img, entry = image_of({"nlq/__init__.py": "", "nlq/t.txt": raw})
    disk = tmp_path / "t.txt"
    disk.write_bytes(raw)
    root = resources.files(importlib.import_module("nlq"))
    for encoding in ("utf-8", "latin-1", None):
        assert root.joinpath("t.txt").read_text(encoding=encoding) == disk.read_text(encoding=encoding)
    with pytest.raises(UnicodeDecodeError):
        root.joinpath("t.txt").read_text(encoding="ascii")
    assert root.joinpath("t.txt").read_text(encoding="ascii", errors="replace") == \
        disk.read_text(encoding="ascii", errors="replace")


# -- the lean reader: plain files and directories without the format layer ----------------------
def _lean_files() -> dict[str, bytes]:
    """Files of every size class a block map has (with 1 KiB blocks: direct, the usual ext2
    single-indirect run, double indirect), a directory of several blocks, a non-ASCII name."""
    sizes = {"empty": 0, "small": 100, "one_block": 1024, "twelve": 12 * 1024, "span": 13 * 1024 + 5,
             "indirect": 200 * 1024 + 7, "double": 300 * 1024 + 3}
    files = {f"d/{name}.bin": os.urandom(n) for name, n in sizes.items()}
    files.update({f"d/many/f{i:03}.txt": f"{i}\n".encode() for i in range(150)})
    files["d/\u00fcn\u00ef.py"] = b"X = 1\n"
    return files


@pytest.mark.parametrize(("fstype", "bs", "isize", "extra"), [
    ("ext2", 1024, 256, ()), ("ext2", 4096, 256, ()), ("ext4", 1024, 256, ()), ("ext4", 4096, 256, ()),
    ("ext2", 1024, 256, ("-O", "^filetype")), ("ext2", 4096, 128, ()), ("ext4", 65536, 256, ()),
    ("ext4", 4096, 256, ("-O", "64bit,^flex_bg"))])
def test_lean_reader_reads_what_the_format_layer_reads(tmp_path, clean_import, fstype, bs, isize, extra):
    files = _lean_files()
    tree = write_tree(tmp_path / "t", files)
    img = mkfs(str(tmp_path / "l.img"), "32M", bs=bs, isize=isize, src=tree, fstype=fstype, extra=extra)
    image = importer._image(img)
    assert image.reader is not None, "the lean reader declined a plain mke2fs image"
    with xipfs.open(img) as fs:
        vol = fs.volume
        for rel, content in files.items():
            path = "/" + rel
            assert image.read(path) == content, rel
            st = fs.stat(path)
            assert image.mtime_size(path) == (st.st_mtime, st.st_size), rel
        for directory in ("/", "/d", "/d/many"):
            index = vol.dir_index(resolve(vol, directory)).entries
            assert {name: entry[0] for name, entry in image.entries(directory).items()} == \
                {name: entry[0] for name, entry in index.items()}
    assert image._fs is None, "plain files and directories needed the format layer"


def test_lean_reader_reads_holes_as_zeros(tmp_path, clean_import):
    tree = write_tree(tmp_path / "t", {"h/keep.txt": "x"})
    img = pack(tree, str(tmp_path / "h.img"))
    with xipfs.open(img, "r+") as fs, fs.open("/h/sparse.bin", "wb") as f:
        f.seek(20 * 4096)                         # past the direct blocks: a hole in the indirect map
        f.write(b"tail")
    image = importer._image(img)
    assert image.read("/h/sparse.bin") == bytes(20 * 4096) + b"tail"
    assert image._fs is None


def test_importing_from_an_image_loads_no_format_layer(tmp_path):
    """The import path reads plain files and directories itself: the format layer (and typing,
    threading, struct) stay unloaded, and the pycs in the image are used."""
    files = {"site/leanpkg/__init__.py": "from .mod import V\n", "site/leanpkg/mod.py": "V = 5\n",
             "site/leanpkg/data.txt": "payload", "site/leanpkg-1.0.dist-info/METADATA":
             "Metadata-Version: 2.1\nName: leanpkg\nVersion: 1.0\n"}
    for fstype in ("ext2", "ext4"):
        tree = write_tree(tmp_path / fstype, files)
        py_compile.compile(os.path.join(tree, "site/leanpkg/__init__.py"), doraise=True)
        py_compile.compile(os.path.join(tree, "site/leanpkg/mod.py"), doraise=True)
        img = mkfs(str(tmp_path / f"{fstype}.img"), "16M", bs=4096, isize=256, src=tree, fstype=fstype)
        proc = run_py(f"""
            def no_compiling(*args, **kwargs):
                raise AssertionError("compiled from source: the pyc in the image was not used")
            importer.XipLoader.source_to_code = no_compiling
            sys.path.insert(0, {img + '/site'!r})
            import leanpkg
            assert leanpkg.V == 5 and leanpkg.__file__ == {img + '/site/leanpkg/__init__.py'!r}
            assert leanpkg.__cached__ == {img + f'/site/leanpkg/__pycache__/__init__.{TAG}.pyc'!r}
            heavy = sorted(m for m in sys.modules if m.startswith(("xipfs.extfs", "xipfs.device", "xipfs.fs"))
                           or m in ("typing", "threading", "struct", "contextlib"))
            import importlib.metadata, importlib.resources
            assert importlib.metadata.version("leanpkg") == "1.0"
            root = importlib.resources.files(leanpkg)
            assert root.is_dir() and root.joinpath("data.txt").is_file()
            assert root.joinpath("data.txt").read_text() == "payload"
            names = sorted(p.name for p in root.iterdir())
            assert names == ["__init__.py", "__pycache__", "data.txt", "mod.py"], names
            heavy += sorted(m for m in sys.modules if m.startswith(("xipfs.extfs", "xipfs.dev", "xipfs.fs")))
            print(heavy)
        """)
        assert proc.stdout.strip() == "[]", (fstype, proc.stdout)


def test_misses_and_cached_lookups_make_no_system_call(image_of, monkeypatch):
    img, entry = image_of({"here_a_q.py": "A = 1\n", "here_b_q.py": "B = 2\n", "pkgm_q/__init__.py": ""})
    assert importlib.import_module("here_a_q").A == 1
    finder = sys.path_importer_cache[entry]
    assert finder.find_spec("pkgm_q") is not None         # its directory listed once
    calls = []

    def counting(name):
        real = getattr(os, name)
        return lambda *a, **k: calls.append(name) or real(*a, **k)
    for name in ("stat", "lstat", "fstat", "open", "pread", "preadv", "listdir", "scandir"):
        monkeypatch.setattr(os, name, counting(name))
    for name in ("absent_q", "absent_q2", "here_a_q_not", "pkgm"):
        assert finder.find_spec(name) is None
    assert finder.find_spec("pkgm_q") is not None and finder.find_spec("here_b_q") is not None
    assert calls == []
    assert importlib.import_module("here_b_q").B == 2   # its inode is in the block already read
    assert calls == ["pread"], calls                      # the file itself, nothing else


@pytest.mark.parametrize("damage", ["rec_len 0", "rec_len unaligned", "rec_len past the block",
                                    "name past the entry", "inode past the last"])
def test_damaged_directory_is_a_corrupt_image_error(tmp_path, clean_import, damage):
    tree = write_tree(tmp_path / "t", {"site/dmg_q.py": "X = 1\n"})
    img = pack(tree, str(tmp_path / "d.img"))
    block = int(debugfs_r(img, "blocks /site").split()[0])
    at = block * 4096 + 12                     # the entry "..", after "." (12 bytes)
    patch = {"rec_len 0": (4, b"\0\0"), "rec_len unaligned": (4, b"\x0d\0"),
             "rec_len past the block": (4, b"\0\x20"), "name past the entry": (6, b"\xff"),
             "inode past the last": (0, b"\xff\xff\xff\x7f")}[damage]
    with open(img, "r+b") as f:
        f.seek(at + patch[0])
        f.write(patch[1])
    sys.path.insert(0, img + "/site")
    with pytest.raises(xipfs.CorruptImageError):
        importlib.import_module("dmg_q")


def test_file_data_past_the_end_of_the_image_is_a_corrupt_image_error(tmp_path, clean_import):
    tree = write_tree(tmp_path / "t", {"site/cut_q.py": "X = 1\n" * 3000})
    img = pack(tree, str(tmp_path / "c.img"))
    block = int(debugfs_r(img, "blocks /site/cut_q.py").split()[0])
    image = importer._image(img)
    assert image.entries("/site")                 # listed while whole
    os.truncate(img, block * 4096)
    image.reader.forget()
    with pytest.raises(xipfs.CorruptImageError):
        image.read("/site/cut_q.py")


def test_a_file_larger_than_its_image_is_a_corrupt_image_error(tmp_path, clean_import):
    """A damaged i_size of terabytes is refused, not allocated (it was a MemoryError)."""
    tree = write_tree(tmp_path / "t", {"site/huge_q.py": "X = 1\n"})
    img = pack(tree, str(tmp_path / "h.img"))
    debugfs_r(img, "sif /site/huge_q.py size 0x20000000000", write=True)
    sys.path.insert(0, img + "/site")
    with pytest.raises(xipfs.CorruptImageError, match="more than the whole image holds"):
        importlib.import_module("huge_q")


def test_inline_data_and_symlinks_fall_back_to_the_format_layer(tmp_path, clean_import):
    tree = write_tree(tmp_path / "t", {"site/inl_q.py": "I = 'inline'\n",
                                       "site/big_q.py": "B = 1\n" + "#" * 9000})
    os.symlink("big_q.py", os.path.join(tree, "site", "lnk_q.py"))
    img = mkfs(str(tmp_path / "i.img"), "16M", bs=4096, isize=256, src=tree, fstype="ext4",
               extra=("-O", "inline_data"))
    sys.path.insert(0, img + "/site")
    assert importlib.import_module("inl_q").I == "inline"
    assert importlib.import_module("big_q").B == 1
    assert importlib.import_module("lnk_q").B == 1
    assert importer._image(img)._fs is not None   # inline data and the symlink took the format layer


# -- damaged images: the import hook's own reader -------------------------------------------------
DAMAGE_CHILD = r"""
import os, random, sys, xipfs
from importlib.machinery import PathFinder
src, workdir, rounds, seed0 = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
spans = [tuple(map(int, s.split(":"))) for s in sys.argv[5].split(",")]
data = open(src, "rb").read()
allowed = (ImportError, OSError, SyntaxError, ValueError, EOFError)   # what a damaged disk gives too
bad = []
for seed in range(seed0, seed0 + rounds):
    rnd = random.Random(seed)
    img = bytearray(data)
    for _ in range(rnd.choice((1, 2, 4, 16))):
        start, length = rnd.choice(spans)
        img[start + rnd.randrange(length)] = rnd.randrange(256)
    path = os.path.join(workdir, f"d{seed}.img")
    with open(path, "wb") as f:
        f.write(img)
    try:   # find and read both modules, run neither: bytecode read from the wrong blocks may crash
        spec = PathFinder.find_spec("dmgpkg_q", [path + "/site"])
        if spec is not None:              # (a namespace package's spec has no loader)
            if spec.loader is not None:
                spec.loader.get_code("dmgpkg_q")
            sub = PathFinder.find_spec("dmgpkg_q.sub", spec.submodule_search_locations)
            if sub is not None and sub.loader is not None:
                sub.loader.get_code("dmgpkg_q.sub")
                sub.loader.get_source("dmgpkg_q.sub")
    except allowed:
        pass
    except BaseException as err:
        bad.append(f"seed {seed}: {type(err).__name__}: {err}")
    finally:
        os.unlink(path)
print("\n".join(bad))
"""


@pytest.mark.parametrize("fstype", ["ext2", "ext4"])
def test_damaged_metadata_gives_import_or_os_errors(tmp_path, fstype):
    """Random bytes changed in the superblock, the descriptors, the inode table and the
    directories an import reads (the lean reader checks no checksum): finding and reading the
    modules fails with an ImportError or OSError (a file read from the wrong blocks may also
    fail to compile or unmarshal, as from a damaged disk), never with an IndexError, a
    struct.error, a MemoryError or a hang. (The modules are not run: bytecode from the wrong
    blocks can crash the interpreter, from an image as from a damaged disk.)"""
    files = {"site/dmgpkg_q/__init__.py": "A = 1\n", "site/dmgpkg_q/sub.py": "B = 2\n" * 2000,
             **{f"site/dmgpkg_q/m{i}.py": "" for i in range(40)}}
    tree = write_tree(tmp_path / "tree", files)
    for rel in ("site/dmgpkg_q/__init__.py", "site/dmgpkg_q/sub.py"):
        py_compile.compile(os.path.join(tree, rel), doraise=True)
    img = mkfs(str(tmp_path / "img"), "2M", bs=1024, isize=256, src=tree, fstype=fstype)
    with xipfs.open(img) as fs:          # where the metadata an import reads lies
        vol = fs.volume
        spans = [(1024, 1024), (2 * vol.bs if vol.bs == 1024 else vol.bs, 64),   # superblock, descriptors
                 (vol.inode_offset(1), vol.isize * 64)]
        for d in ("/", "/site", "/site/dmgpkg_q", "/site/dmgpkg_q/__pycache__"):
            node = fs._inode(d)
            spans.append((vol.inode_offset(node.ino), vol.isize))
            spans += [(pblk * vol.bs, n * vol.bs) for _, n, pblk in node.map.runs(0, node.size // vol.bs)]
        sub = fs._inode("/site/dmgpkg_q/sub.py")
        spans.append((vol.inode_offset(sub.ino), vol.isize))
    work = tmp_path / "work"
    work.mkdir()
    rounds = os.environ.get("XIPFS_DAMAGE_ROUNDS", "150")      # more for a longer search
    proc = subprocess.run([PY, "-X", "faulthandler", "-c", DAMAGE_CHILD, img, str(work), rounds, "1",
                           ",".join(f"{s}:{n}" for s, n in spans)],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "", proc.stdout[:3000]
