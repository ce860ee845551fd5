"""Import benchmark: real pure-Python packages imported from an ext2 image in /dev/shm.

The tree is a copy of installed pure-Python packages (pytest with the packages it imports, tqdm,
attrs, hypothesis with sortedcontainers, fsspec) with their dist-info and valid ``__pycache__``
bytecode, put on ``sys.path`` three ways:

* ours: an ext2 image of the tree (``mke2fs -t ext2 -d``) in /dev/shm, entry ``IMAGE/site``;
* the baseline: the same tree as a directory on tmpfs (/dev/shm), the stock ``FileFinder``;
* ``zipimport``: a zip of the same tree (it ignores ``__pycache__``, so it compiles every
  module), and, for information, a zip with legacy ``NAME.pyc`` files beside the sources
  (the bytecode zipimport can use: its best case).

A sample is one fresh interpreter that imports xipfs (all sides alike), then times
``import PKG`` alone with ``time.perf_counter_ns``. Two rows per package: the whole import
(with the standard-library modules it pulls in, read from disk the same way on every side),
and the package's own modules only (those standard-library modules imported before the clock
starts). Samples are interleaved, the order rotating each round, after one untimed round. The
process CPU time of the same imports is shown for information (less sensitive to a busy machine).

Three more measurements:

* attrs (a small package), with bytecode on every side: the image against the tmpfs directory
  (target 1.0x) and against zipimport of the zip with legacy ``.pyc`` files (target 1.2x);
* the first lookup in a fresh interpreter: ``PathFinder`` meeting the entry (path hook, then
  one module that is not there), image against directory (target 1.0x);
* 32 interpreters started together, each importing pytest, hypothesis, tqdm and fsspec from one
  image, against the same from the tmpfs directory: wall time of the whole batch (target 1.2x).

Bytecode is written as a user's shell writes it (``PYTHONDONTWRITEBYTECODE`` is unset in the
samples), so xipfs's own modules and the standard library come from valid ``__pycache__`` on
every side.

Standalone: ``.venv/bin/python benchmarks/bench_import.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import compileall
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from typing import Any

from common import Measurement, Row, Section, machine_speed

PACKAGES = {  # what to time -> the installed top-level names copied into the tree
    "pytest": ("pytest", "_pytest", "pluggy", "iniconfig", "packaging", "pygments", "py"),
    "tqdm": ("tqdm",),
}
#: The small package timed against the directory and zipimport (imported as ``attr``).
SMALL = ("attr", ("attr", "attrs"))
#: What each of the ``BATCH_SIZE`` interpreters of the batch imports, and the names copied for it.
BATCH = ("pytest", "hypothesis", "tqdm", "fsspec")
BATCH_TREE = ("hypothesis", "_hypothesis_globals", "_hypothesis_ftz_detector", "_hypothesis_pytestplugin",
              "sortedcontainers", "fsspec")
BATCH_SIZE = 32

# The first lookup: PathFinder meets the entry (path hook, finder, one module not there).
FIRST = r"""
import sys, time
import xipfs
from importlib.machinery import PathFinder
entry = sys.argv[1]
t0 = time.perf_counter_ns()
spec = PathFinder.find_spec("no_such_module_xq", [entry])
t1 = time.perf_counter_ns()
assert spec is None and type(sys.path_importer_cache[entry]).__name__ in ("XipPathFinder", "FileFinder")
print(t1 - t0, t1 - t0)
"""

# One interpreter of the batch: import the set from the entry, check where it came from.
BATCH_SAMPLE = r"""
import sys
import xipfs
entry = sys.argv[1]
sys.path.insert(0, entry)
import importlib
for name in sys.argv[2].split(","):
    mod = importlib.import_module(name)
    if not mod.__file__.startswith(entry):
        sys.exit(f"{name} came from {mod.__file__}, not {entry}")
"""

# One sample: import xipfs, pre-import the given modules, time ``import PKG``; prints the wall
# and CPU nanoseconds.
SAMPLE = r"""
import importlib, sys, time
import xipfs
from xipfs import importer
importer.install()
entry, pkg, pre = sys.argv[1], sys.argv[2], sys.argv[3]
for name in filter(None, pre.split(",")):
    try:
        importlib.import_module(name)
    except Exception:
        pass
sys.path.insert(0, entry)
c0 = time.process_time_ns()
t0 = time.perf_counter_ns()
mod = importlib.import_module(pkg)
t1 = time.perf_counter_ns()
c1 = time.process_time_ns()
if not mod.__file__.startswith(entry):
    sys.exit(f"{pkg} came from {mod.__file__}, not {entry}")
print(t1 - t0, c1 - c0)
"""

# The modules ``import PKG`` brings in from outside the entry, then ";", then those from inside it.
PROBE = r"""
import importlib, sys
import xipfs
from xipfs import importer
importer.install()
entry, pkg = sys.argv[1], sys.argv[2]
sys.path.insert(0, entry)
before = set(sys.modules)
importlib.import_module(pkg)
outside, inside = [], []
for name, mod in list(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    origin = getattr(spec, "origin", None)
    if name in before or origin is None:
        continue
    (inside if origin.startswith(entry) else outside).append(name)
print(",".join(outside) + ";" + ",".join(inside))
"""


def _site_packages() -> str:
    return sysconfig.get_paths()["purelib"]


def _copy_installed(names: tuple[str, ...], dest: str) -> None:
    """Copy installed top-level packages/modules and their dist-info into ``dest`` (mtimes kept)."""
    site = _site_packages()
    for name in names:
        src = os.path.join(site, name)
        if os.path.isdir(src):
            shutil.copytree(src, os.path.join(dest, name), dirs_exist_ok=True)
        elif os.path.exists(src + ".py"):
            shutil.copy2(src + ".py", dest)
        else:
            continue                        # not installed here (an optional piece)
        dist = name.replace("_", "-").lower()
        for entry in os.listdir(site):
            low = entry.lower().replace("_", "-")
            if low.endswith(".dist-info") and low[:-len(".dist-info")].rpartition("-")[0] == dist:
                shutil.copytree(os.path.join(site, entry), os.path.join(dest, entry), dirs_exist_ok=True)


def _tree_bytes(top: str) -> tuple[int, int]:
    files = size = 0
    for d, _, names in os.walk(top):
        for n in names:
            files += 1
            size += os.lstat(os.path.join(d, n)).st_size
    return files, size


def build(root: str, name: str = "import",
          groups: tuple[tuple[str, ...], ...] = (*PACKAGES.values(), SMALL[1], BATCH_TREE)) -> dict[str, str]:
    """The tree ``NAME-tree`` in ``root`` (the installed packages ``groups`` name) and its three
    forms; returns ``{form: sys.path entry}``."""
    tree = os.path.join(root, f"{name}-tree")
    site = os.path.join(tree, "site")
    os.makedirs(site, exist_ok=True)
    for names in groups:
        _copy_installed(names, site)
    # Valid __pycache__ bytecode for every source (kept where the installed one is valid).
    compileall.compile_dir(site, quiet=2)
    files, size = _tree_bytes(tree)
    img = os.path.join(root, f"{name}.img")
    blocks = (size * 2 + files * 8192) // 4096 + 2048
    subprocess.run(["mke2fs", "-q", "-F", "-t", "ext2", "-b", "4096", "-N", str(files * 2 + 256),
                    "-m", "0", "-d", tree, img, str(blocks)], check=True, stdout=subprocess.DEVNULL)
    plain_zip = os.path.join(root, f"{name}.zip")
    pyc_zip = os.path.join(root, f"{name}-pyc.zip")
    _zip_tree(site, plain_zip, legacy_pycs=False)
    _zip_tree(site, pyc_zip, legacy_pycs=True)
    return {"image": img + "/site", "dir": site, "zip": plain_zip, "zip+pyc": pyc_zip}


def _zip_tree(site: str, dest: str, legacy_pycs: bool) -> None:
    """A zip of ``site``; with ``legacy_pycs`` each ``__pycache__`` pyc is stored as ``NAME.pyc``
    beside its source, where zipimport looks for bytecode."""
    tag = sys.implementation.cache_tag
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_STORED) as z:
        for d, dirs, names in os.walk(site):
            dirs.sort()
            rel = os.path.relpath(d, site)
            for n in sorted(names):
                arc = n if rel == "." else f"{rel}/{n}"
                if legacy_pycs and os.path.basename(d) == "__pycache__":
                    stem, _, rest = n.partition(".")
                    if rest != f"{tag}.pyc":
                        continue
                    parent = os.path.dirname(rel)
                    arc = f"{parent}/{stem}.pyc" if parent else f"{stem}.pyc"
                z.write(os.path.join(d, n), arc)


def _env() -> dict[str, str]:
    """The samples' environment: bytecode written as a user's shell writes it, no PYTHONPATH."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.pop("PYTHONPATH", None)
    return env


def _run(script: str, *args: str) -> str:
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=_env())
    if proc.returncode:
        raise RuntimeError(f"import sample failed ({args}):\n{proc.stderr}")
    return proc.stdout.strip()


def _measure(entries: dict[str, str], pkg: str, pre: str, repeat: int, label: str,
             script: str = SAMPLE) -> tuple[dict[str, Measurement], dict[str, Measurement]]:
    """Interleaved samples (one fresh interpreter each, order rotating) after one untimed round:
    ``({form: wall-clock Measurement}, {form: CPU-time Measurement})``."""
    forms = list(entries)
    for form in forms:
        _run(script, entries[form], pkg, pre)
    wall: dict[str, list[int]] = {f: [] for f in forms}
    cpu: dict[str, list[int]] = {f: [] for f in forms}
    for r in range(repeat):
        for i in range(len(forms)):
            form = forms[(r + i) % len(forms)]
            w, c = _run(script, entries[form], pkg, pre).split()
            wall[form].append(int(w))
            cpu[form].append(int(c))
    return ({f: Measurement(f"{pkg} {label}: {f}", wall[f], 1, "ms/call") for f in forms},
            {f: Measurement(f"{pkg} {label}: {f} (CPU time)", cpu[f], 1, "ms/call") for f in forms})


def _children_cpu_ns() -> int:
    """User plus system time of the waited-for child processes so far, in nanoseconds."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return int((usage.ru_utime + usage.ru_stime) * 1e9)


def _batch(entry: str) -> tuple[int, int]:
    """``(wall, CPU)`` nanoseconds of ``BATCH_SIZE`` interpreters started together: from the
    start to the last one's exit, and the CPU time they used in all."""
    env = _env()
    args = [sys.executable, "-c", BATCH_SAMPLE, entry, ",".join(BATCH)]
    c0 = _children_cpu_ns()
    t0 = time.perf_counter_ns()
    procs = [subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for _ in range(BATCH_SIZE)]
    errors = [p.communicate()[1] for p in procs]
    t1 = time.perf_counter_ns()
    c1 = _children_cpu_ns()
    for proc, err in zip(procs, errors, strict=True):
        if proc.returncode:
            raise RuntimeError(f"batch interpreter failed ({entry}):\n{err.decode(errors='replace')}")
    return t1 - t0, c1 - c0


def _measure_batch(entries: dict[str, str],
                   repeat: int) -> tuple[dict[str, Measurement], dict[str, Measurement]]:
    """Interleaved batches (order alternating) after one untimed batch per form:
    ``({form: wall time}, {form: CPU time of the batch's interpreters})``."""
    forms = list(entries)
    for form in forms:
        _batch(entries[form])
    wall: dict[str, list[int]] = {f: [] for f in forms}
    cpu: dict[str, list[int]] = {f: [] for f in forms}
    for r in range(repeat):
        for i in range(len(forms)):
            form = forms[(r + i) % len(forms)]
            w, c = _batch(entries[form])
            wall[form].append(w)
            cpu[form].append(c)
    name = f"{BATCH_SIZE} interpreters importing {', '.join(BATCH)}"
    return ({f: Measurement(f"{name}: {f}", wall[f], 1, "ms/call") for f in forms},
            {f: Measurement(f"{name}: {f} (CPU time)", cpu[f], 1, "ms/call") for f in forms})


def bench_small(section: Section, root: str, repeat: int) -> None:
    """attrs alone (a tree of just it), from the image against the tmpfs directory and zipimport
    with bytecode; and the first lookup of each entry in a fresh interpreter."""
    pkg = SMALL[0]
    entries = build(root, "small", (SMALL[1],))
    forms = {f: entries[f] for f in ("image", "dir", "zip+pyc")}
    deps, _, inside = _run(PROBE, entries["dir"], pkg).partition(";")
    own = len(inside.split(","))
    for label, pre in (("whole import", ""), ("package modules only", deps)):
        wall, cpu = _measure(forms, pkg, pre, repeat, label)
        ours = wall["image"]
        zipped, cpu_zipped, dir_ = wall["zip+pyc"], cpu["zip+pyc"], wall["dir"]
        section.rows += [
            Row(f"import attrs ({own} modules, bytecode), {label}: image vs tmpfs dir", ours, dir_, 1.0),
            Row(f"import attrs, {label}: image vs zipimport with .pyc", ours, zipped, 1.2),
            Row(f"import attrs, {label}: CPU time, image vs tmpfs dir", cpu["image"], cpu["dir"]),
            Row(f"import attrs, {label}: CPU time, image vs zipimport with .pyc", cpu["image"], cpu_zipped),
        ]
        section.raw += [*wall.values(), *cpu.values()]
    first, _ = _measure({f: entries[f] for f in ("image", "dir")}, "-", "", repeat * 2,
                        "first lookup", script=FIRST)
    section.rows.append(Row("first lookup in a fresh interpreter (path hook + one miss): image vs tmpfs dir",
                            first["image"], first["dir"], 1.0))
    section.raw += [*first.values()]


def bench_batch(section: Section, entries: dict[str, str], repeat: int) -> None:
    """``BATCH_SIZE`` interpreters importing ``BATCH`` from one image at once, against the directory."""
    batch, cpu = _measure_batch({f: entries[f] for f in ("image", "dir")}, repeat)
    section.rows += [
        Row(f"{BATCH_SIZE} interpreters at once importing {', '.join(BATCH)}: image vs tmpfs dir "
            "(wall time of the batch)", batch["image"], batch["dir"], 1.2),
        Row(f"{BATCH_SIZE} interpreters at once: CPU time of the batch, image vs tmpfs dir",
            cpu["image"], cpu["dir"]),
    ]
    section.raw += [*batch.values(), *cpu.values()]


def bench_import(root: str, cfg: Any) -> Section:
    entries = build(root)
    repeat = max(5, getattr(cfg, "repeat", 11))
    section = Section("15. Import a real package: image in /dev/shm vs a tmpfs directory and zipimport "
                      "(fresh interpreter per sample, import timed in-process)")
    files, size = _tree_bytes(os.path.join(root, "import-tree"))
    names = (*(n for v in PACKAGES.values() for n in v), *SMALL[1], *BATCH_TREE)
    section.notes.append(f"tree: {', '.join(names)} with dist-info and __pycache__: {files} files, "
                         f"{size / 2**20:.1f} MiB")
    section.notes.append(f"machine: {machine_speed()}")
    bench_small(section, root, repeat)
    bench_batch(section, entries, max(3, min(repeat, 7)))
    for pkg in PACKAGES:
        deps, _, inside = _run(PROBE, entries["dir"], pkg).partition(";")
        own = len(inside.split(","))
        for label, pre in (("whole import", ""), ("package modules only", deps)):
            wall, cpu = _measure(entries, pkg, pre, repeat, label)
            ours = wall["image"]
            section.rows += [
                Row(f"import {pkg} ({own} modules), {label}: image vs tmpfs dir", ours, wall["dir"], 1.0),
                Row(f"import {pkg}, {label}: image vs zip of the tree", ours, wall["zip"], 1.0),
                Row(f"import {pkg}, {label}: image vs zip with legacy .pyc", ours, wall["zip+pyc"]),
                Row(f"import {pkg}, {label}: CPU time, image vs tmpfs dir", cpu["image"], cpu["dir"]),
            ]
            section.raw += [*wall.values(), *cpu.values()]
    return section


BENCHMARKS = {"import": bench_import}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "import", *sys.argv[1:]]))
