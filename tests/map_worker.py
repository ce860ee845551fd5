"""The child program of ``test_mapping.py``: one process that maps (or copies) a file of an image.

``map_worker.py IMG PATH MODE`` opens IMG read-only with ``xipfs.open`` (a path or a POSIX
shared-memory name) and, by MODE:

``map``   maps PATH with ``fs.mmap`` and touches every page of the mapping;
``copy``  reads PATH into a ``bytearray`` of its own (every page of it written);
``idle``  does nothing more (the baseline of a process that has imported xipfs).

It then prints ``ready IS_XIP LENGTH`` and answers one command per line on stdin:

``pss``            ``pss KB``: the ``Pss:`` line of ``/proc/self/smaps_rollup``;
``read OFF N``     ``data HEX``: N bytes from OFF of the mapping (or the copy);
``sha``            ``sha HEX``: the SHA-256 of the whole mapping (or copy);
``poke OFF HEX``   stores bytes straight into the image file at byte OFF (``os.pwrite``), as a
                   second writer of the storage would; answers ``ok``;
``exit``           exits with status 0.

Only the standard library and xipfs, so an idle worker stays small next to what it maps.
"""

from __future__ import annotations

import hashlib
import os
import sys

import xipfs

PAGE = 4096


def pss_kb() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    raise RuntimeError("no Pss: line in /proc/self/smaps_rollup")


def prepare(fs: xipfs.Filesystem, path: str, mode: str) -> tuple[object, bool]:
    """The buffer the commands read: a touched mapping, a private copy, or nothing."""
    if mode == "map":
        m = fs.mmap(path)
        with memoryview(m) as view:
            sum(view[::PAGE])                   # one read per page: every page faulted in
        return m, m.is_xip
    if mode == "copy":
        size = fs.stat(path).st_size
        buf = bytearray(size)
        with fs.open(path, "rb", buffering=0) as f:
            f.readinto(buf)
        return buf, False
    return b"", False


def main() -> int:
    img, path, mode = sys.argv[1:4]
    fs = xipfs.open(img)
    buf, is_xip = prepare(fs, path, mode)
    print(f"ready {int(is_xip)} {len(buf)}", flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "pss":
            print(f"pss {pss_kb()}", flush=True)
        elif cmd == "read":
            off, n = int(args[0]), int(args[1])
            print(f"data {bytes(buf[off:off + n]).hex()}", flush=True)
        elif cmd == "sha":
            print(f"sha {hashlib.sha256(buf).hexdigest()}", flush=True)
        elif cmd == "poke":
            target = img if os.path.exists(img) else "/dev/shm/" + img.lstrip("/")
            fd = os.open(target, os.O_WRONLY)
            try:
                os.pwrite(fd, bytes.fromhex(args[1]), int(args[0]))
            finally:
                os.close(fd)
            print("ok", flush=True)
        elif cmd == "exit":
            break
        else:
            print(f"error unknown command {cmd!r}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
