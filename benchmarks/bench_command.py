"""The command's start-up (issue 16): ``xipfs --help`` and ``xipfs ls IMAGE:PATH`` as a user
runs them, a fresh process each, bytecode cached, against ``python -c pass``.

The target is "under 50 ms above ``python -c pass``": each row's baseline is the interpreter's
own start (measured in the same rounds) plus 50 ms, so a ratio of 1.0x or more passes. The
image is the standard library packed by xipfs (ls of one directory of it) on /dev/shm.

Standalone: ``.venv/bin/python benchmarks/bench_command.py [--quick] [--repeat N]``.
"""

from __future__ import annotations

import os
import subprocess
import sys

from bench_read import Config
from common import Case, Measurement, Row, Section, measure

import xipfs

#: What the command may add to the interpreter's start (issue 16's target).
ALLOWANCE_NS = 50_000_000


def _env() -> dict[str, str]:
    """The environment a user has: bytecode written and read (some CI images turn it off)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}


def bench_command(root: str, cfg: Config) -> Section:
    py = sys.executable
    xipfs_cmd = os.path.join(os.path.dirname(py), "xipfs")
    if not os.path.exists(xipfs_cmd):                 # no console script: the module then
        xipfs_cmd_argv = [py, "-m", "xipfs"]
    else:
        xipfs_cmd_argv = [xipfs_cmd]
    src = os.path.dirname(os.__file__)
    img = os.path.join(root, "stdlib.img")
    xipfs.pack(src, img, exclude=["site-packages", "__pycache__"])
    env = _env()
    subprocess.run([py, "-m", "compileall", "-q", os.path.dirname(xipfs.__file__)], env=env,
                   stdout=subprocess.DEVNULL, check=False)     # bytecode cached, as after a run

    def run(argv: list[str]) -> object:
        return lambda _state: subprocess.run(argv, env=env, stdout=subprocess.DEVNULL,
                                             stderr=subprocess.DEVNULL, check=True)

    cases = [
        Case("python -c pass", run([py, "-c", "pass"]), 1, "ms/call"),
        Case("xipfs --help", run([*xipfs_cmd_argv, "--help"]), 1, "ms/call"),
        Case("xipfs ls IMAGE:/json", run([*xipfs_cmd_argv, "ls", f"{img}:/json"]), 1, "ms/call"),
    ]
    m = measure(cases, max(9, cfg.repeat_cold * 3), warmup=2)
    base = m["python -c pass"]
    allowed = Measurement("python -c pass + 50 ms", [s + ALLOWANCE_NS for s in base.samples_ns], 1, "ms/call")
    section = Section("25. The command's start-up: a fresh process each, bytecode cached")
    section.rows += [
        Row("xipfs --help, within 50 ms of python -c pass", m["xipfs --help"], allowed, 1.0),
        Row("xipfs ls IMAGE:PATH, within 50 ms of python -c pass", m["xipfs ls IMAGE:/json"], allowed, 1.0),
    ]
    for name in ("xipfs --help", "xipfs ls IMAGE:/json"):
        extra = (m[name].median_ns - base.median_ns) / 1e6
        section.notes.append(f"{name}: {extra:.1f} ms above python -c pass (medians)")
    section.raw += [*m.values(), allowed]
    os.unlink(img)
    return section


BENCHMARKS = {"command": bench_command}


if __name__ == "__main__":          # benchmarks/ is sys.path[0] when run as a script
    from run import main

    sys.exit(main(["--only", "command", *sys.argv[1:]]))
