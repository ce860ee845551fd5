"""Run the xipfs benchmarks:  python benchmarks/run.py [--quick] [--only NAME[,NAME]] [--repeat N]

Also reached by ``./run bench`` in the repository root. Prints one Markdown table per benchmark
(ours against its baseline, the ratio, the target, PASS/FAIL) and a summary. A FAIL is reported,
never turned into a non-zero exit status. Everything is created in one scratch directory under
/dev/shm and removed at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
from bench_check import BENCHMARKS as CHECK_BENCHMARKS  # noqa: E402
from bench_command import BENCHMARKS as COMMAND_BENCHMARKS  # noqa: E402
from bench_dask import BENCHMARKS as DASK_BENCHMARKS  # noqa: E402
from bench_ext4 import BENCHMARKS as EXT4_BENCHMARKS  # noqa: E402
from bench_ext4write import BENCHMARKS as EXT4WRITE_BENCHMARKS  # noqa: E402
from bench_fsspec import BENCHMARKS as FSSPEC_BENCHMARKS  # noqa: E402
from bench_fuse import BENCHMARKS as FUSE_BENCHMARKS  # noqa: E402
from bench_hugepage import BENCHMARKS as HUGEPAGE_BENCHMARKS  # noqa: E402
from bench_import import BENCHMARKS as IMPORT_BENCHMARKS  # noqa: E402
from bench_map import BENCHMARKS as MAP_BENCHMARKS  # noqa: E402
from bench_mkfs4 import BENCHMARKS as MKFS4_BENCHMARKS  # noqa: E402
from bench_pack import BENCHMARKS as PACK_BENCHMARKS  # noqa: E402
from bench_pack4 import BENCHMARKS as PACK4_BENCHMARKS  # noqa: E402
from bench_read import BENCHMARKS as READ_BENCHMARKS  # noqa: E402
from bench_read import config  # noqa: E402
from bench_remote import BENCHMARKS as REMOTE_BENCHMARKS  # noqa: E402
from bench_transfer import BENCHMARKS as TRANSFER_BENCHMARKS  # noqa: E402
from bench_unpack import BENCHMARKS as UNPACK_BENCHMARKS  # noqa: E402
from bench_write import BENCHMARKS as WRITE_BENCHMARKS  # noqa: E402
from common import loadavg, machine_speed, print_section, print_summary  # noqa: E402

import xipfs  # noqa: E402

SCRATCH_PARENT = "/dev/shm"
BENCHMARKS = {**READ_BENCHMARKS, **WRITE_BENCHMARKS, **TRANSFER_BENCHMARKS, **MAP_BENCHMARKS,
              **PACK_BENCHMARKS, **FSSPEC_BENCHMARKS, **UNPACK_BENCHMARKS,
              **IMPORT_BENCHMARKS, **FUSE_BENCHMARKS,
              **CHECK_BENCHMARKS, **EXT4_BENCHMARKS, **MKFS4_BENCHMARKS, **PACK4_BENCHMARKS,
              **EXT4WRITE_BENCHMARKS, **HUGEPAGE_BENCHMARKS, **COMMAND_BENCHMARKS,
              **REMOTE_BENCHMARKS, **DASK_BENCHMARKS}
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def source_version() -> str:
    """``commit`` of the repository, ``+ uncommitted changes`` when src/ differs from it."""
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--", "src"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return head + (" + uncommitted changes in src/" if dirty else "")


def _on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks, which clean up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repetitions (~40 s)")
    parser.add_argument("--only", metavar="NAME", default="",
                        help=f"comma-separated benchmarks to run: {', '.join(BENCHMARKS)}")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed repetitions per measurement (default 7-15, quick 5-7)")
    parser.add_argument("--no-raw", action="store_true", help="leave out the raw measurement lists")
    args = parser.parse_args(argv)

    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    if args.repeat is not None and args.repeat < 1:
        parser.error("--repeat must be at least 1")
    if shutil.which("mke2fs") is None:
        parser.error("mke2fs not found (install e2fsprogs)")
    cfg = config(args.quick, args.repeat)

    signal.signal(signal.SIGTERM, _on_sigterm)
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    started = time.monotonic()
    print("# xipfs benchmarks\n")
    print(f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"- command: `{command.strip()}`")
    print(f"- python {platform.python_version()}, numpy {np.__version__}, xipfs {xipfs.__version__}, "
          f"kernel {platform.release()}, {os.cpu_count()} CPUs")
    print(f"- source: {source_version()}")
    print(f"- sizes: big file {cfg.big_bytes >> 20} MiB, {cfg.small_files} small files of "
          f"{cfg.small_size} B, {cfg.stat_files} files for stat/listdir; timed repetitions "
          f"{cfg.repeat_big} (big) / {cfg.repeat} (warm) / {cfg.repeat_cold} (cold), after 1 untimed round")
    print(f"- machine: {machine_speed()}")
    print(f"- load average at start: {loadavg()}", flush=True)

    sections = []
    root = tempfile.mkdtemp(prefix="xipfs-bench-", dir=SCRATCH_PARENT)
    try:
        for name in names:
            t0 = time.monotonic()
            section = BENCHMARKS[name](root, cfg)
            section.notes.append(f"({name}: {time.monotonic() - t0:.1f} s including setup)")
            print_section(section, raw=not args.no_raw)
            sections.append(section)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print_summary(sections)
    print(f"\nload average at end: {loadavg()}; total {time.monotonic() - started:.1f} s")
    print(f"machine at end: {machine_speed()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
