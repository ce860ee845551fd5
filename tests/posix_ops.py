"""Scripted syscall scenarios for tests/test_fuse_posix.py: a recorder and a few libc calls.

A scenario is a function ``scenario(t: Tracer)`` run in a forked child whose working directory
is a fresh directory on the file system under test. Each ``t.do(fn, *args)`` runs one call and
records its outcome (a value, ``ok`` or an errno name) and then the state of the watched names:
``lstat``'s file type and permission bits, link count, owner, group and size (and the device
number of device nodes). Times are recorded only as relations: which of mtime and ctime moved
during the step (``times=True``), or whether a time equals the value just set. Two traces of
the same scenario, from two file systems, are then compared entry by entry.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import os
import pickle
import select
import signal
import stat
import struct
import time
import traceback
from collections.abc import Callable
from typing import Any

#: How long a step that records time relations waits first, so that a clock with a coarse tick
#: moves between the state before and after.
TICK = 0.01
SCENARIO_TIMEOUT = 30.0
#: The atime and mtime of set-up files (2001-09-09).
GIVEN_TIME = 1_000_000_000 * 10**9

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]


def _check(ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


# -- calls Python's os module does not offer ----------------------------------------------------
def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """The raw fallocate(2) (glibc does not emulate it, unlike posix_fallocate)."""
    _check(_libc.fallocate(fd, mode, offset, length))


def renameat2(old: str, new: str, flags: int) -> None:
    _check(_libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags))


def utimensat(path: str, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
    """utimensat(2) with (sec, nsec) pairs; nsec may be UTIME_NOW or UTIME_OMIT."""
    times = (_Timespec * 2)(_Timespec(*atime), _Timespec(*mtime))
    _check(_libc.utimensat(AT_FDCWD, os.fsencode(path), times, 0))


def getflags(path: str) -> str:
    """FS_IOC_GETFLAGS (what ``lsattr -d`` shows) as a hex string."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        raw = fcntl.ioctl(fd, FS_IOC_GETFLAGS, bytes(8))
    finally:
        os.close(fd)
    return hex(struct.unpack("<i", raw[:4])[0])


def setflags(path: str, flags: int) -> None:
    """FS_IOC_SETFLAGS (``chattr``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("<i", flags).ljust(8, b"\0"))
    finally:
        os.close(fd)


def creat(path: str, mode: int = 0o644, flags: int = os.O_WRONLY | os.O_CREAT, data: bytes = b"",
          dir_fd: int | None = None) -> None:
    """open(path, flags, mode), write ``data``, close."""
    fd = os.open(path, flags, mode, dir_fd=dir_fd)
    try:
        if data:
            os.write(fd, data)
    finally:
        os.close(fd)


def given_file(path: str, mode: int = 0o644, data: bytes = b"") -> None:
    """Set-up (not a step): a file with exactly ``mode``, whatever umask the server applies,
    and fixed times, so that a late write-back cannot move them during the steps."""
    creat(path, mode, data=data)
    os.chmod(path, mode)
    os.utime(path, ns=(GIVEN_TIME, GIVEN_TIME))


def given_dir(path: str, mode: int = 0o755) -> None:
    """Set-up (not a step): a directory with exactly ``mode``."""
    os.mkdir(path, mode)
    os.chmod(path, mode)


def read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_at(path: str, data: bytes, offset: int) -> int:
    fd = os.open(path, os.O_WRONLY)
    try:
        return os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def brief(st: os.stat_result) -> tuple:
    """What a trace keeps of a stat: type and mode bits (octal), links, owner, group, size."""
    out: tuple = (oct(st.st_mode), st.st_nlink, st.st_uid, st.st_gid, st.st_size)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        out += (f"rdev {os.major(st.st_rdev)},{os.minor(st.st_rdev)}",)
    return out


def lbrief(path: str, dir_fd: int | None = None) -> tuple:
    return brief(os.lstat(path, dir_fd=dir_fd))


# -- recording ------------------------------------------------------------------------------------
def show(value: Any) -> Any:
    """A result as the trace keeps it: short bytes as they are, long ones by digest."""
    if value is None:
        return "ok"
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value)
        digest = hashlib.sha1(value).hexdigest()[:12]
        return value if len(value) <= 48 else f"{len(value)} bytes sha1:{digest}"
    if isinstance(value, os.stat_result):
        return brief(value)
    if isinstance(value, (list, tuple)):
        return type(value)(show(v) for v in value)
    return value


class Tracer:
    """Runs the steps of one scenario and records them."""

    def __init__(self) -> None:
        self.trace: list[dict[str, Any]] = []
        self.names: tuple[str, ...] = ()

    def watch(self, *names: str) -> None:
        """The names whose state is recorded after every step."""
        self.names = names

    def _stats(self) -> dict[str, Any]:
        out = {}
        for name in self.names:
            try:
                out[name] = brief(os.lstat(name))
            except OSError as e:
                out[name] = errno.errorcode.get(e.errno, str(e.errno))
        return out

    def _times(self) -> dict[str, tuple[int, int] | None]:
        out: dict[str, tuple[int, int] | None] = {}
        for name in self.names:
            try:
                st = os.lstat(name)
                out[name] = (st.st_mtime_ns, st.st_ctime_ns)
            except OSError:
                out[name] = None
        return out

    def do(self, fn: Callable[..., Any], *args: Any, label: str | None = None, times: bool = False,
           alt: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Run ``fn(*args, **kwargs)`` and record it; returns its value (None on an error).

        ``times``: also record which of mtime ("m") and ctime ("c") of each watched name moved.
        ``alt``: ``{"driver": outcome}``: what another Linux driver for the same image is known
        to answer instead (the comparison accepts it, and says so).
        """
        before = self._times() if times else None
        if times:
            time.sleep(TICK)
        value = None
        try:
            value = fn(*args, **kwargs)
            result = show(value)
        except OSError as e:
            result = errno.errorcode.get(e.errno, str(e.errno)) if e.errno else repr(e)
        entry: dict[str, Any] = {"step": label or _label(fn, args, kwargs), "result": result,
                                 "stat": self._stats()}
        if before is not None:
            after = self._times()
            entry["times"] = {n: _moved(before[n], after[n]) for n in self.names}
        if alt:
            entry["alt"] = alt
        self.trace.append(entry)
        return value

    def note(self, label: str, value: Any) -> None:
        """Record a value computed by the scenario itself (no watched state)."""
        self.trace.append({"step": label, "result": show(value), "stat": {}})

    def become(self, uid: int, gid: int) -> None:
        """Drop to ``uid``/``gid`` with no supplementary groups (for the rest of the scenario)."""
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
        self.note(f"now uid {uid} gid {gid}, no supplementary groups", "ok")

    def umask(self, mask: int) -> None:
        os.umask(mask)
        self.note(f"umask {mask:03o}", "ok")


def _moved(a: tuple[int, int] | None, b: tuple[int, int] | None) -> str:
    if a is None or b is None:
        return "-"
    return ("m" if a[0] != b[0] else "") + ("c" if a[1] != b[1] else "") or "="


def _label(fn: Callable[..., Any], args: tuple, kwargs: dict) -> str:
    def arg(v: Any) -> str:
        if isinstance(v, int) and not isinstance(v, bool) and v >= 64:
            return oct(v) if v < 0o10000 else hex(v)       # modes in octal, fds in decimal
        if isinstance(v, str) and len(v) > 24:
            return f"<{len(v)}-char {v[:6]}...>"
        if isinstance(v, (bytes, bytearray)) and len(v) > 24:
            return f"<{len(v)} bytes>"
        return repr(v)
    parts = [arg(a) for a in args] + [f"{k}={arg(v)}" for k, v in kwargs.items()]
    return f"{getattr(fn, '__name__', 'call')}({', '.join(parts)})"


# -- running a scenario in a child process ----------------------------------------------------------
def run_scenario(scenario: Callable[[Tracer], None], cwd: str) -> list[dict[str, Any]]:
    """Run ``scenario`` in a forked child (umask 022, working directory ``cwd``); its trace.

    An exception that escapes the scenario ends the trace with its type and errno, so both sides
    still compare. A child that hangs past SCENARIO_TIMEOUT is killed and the trace says so.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the child: never returns
        status = 0
        try:
            os.close(r)
            os.umask(0o022)
            os.chdir(cwd)
            t = Tracer()
            try:
                scenario(t)
            except Exception as e:                   # recorded, not raised: the parent compares
                where = traceback.extract_tb(e.__traceback__)[-1]
                code = errno.errorcode.get(getattr(e, "errno", None) or 0, "")
                t.trace.append({"step": f"scenario stopped at line {where.lineno}: {where.line}",
                                "result": f"{type(e).__name__} {code}".strip(), "stat": {}})
            with os.fdopen(w, "wb") as f:
                f.write(pickle.dumps(t.trace))
        except BaseException:
            status = 1
            traceback.print_exc()
        finally:
            os._exit(status)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + SCENARIO_TIMEOUT
    with os.fdopen(r, "rb") as f:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([f], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return [{"step": "scenario timed out", "result": f"no answer in {SCENARIO_TIMEOUT} s",
                         "stat": {}}]
            chunk = os.read(f.fileno(), 1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if status != 0 or not chunks:
        return [{"step": "scenario child failed", "result": f"wait status {status}", "stat": {}}]
    return pickle.loads(b"".join(chunks))


# -- comparing two traces --------------------------------------------------------------------------
def same(ours: dict[str, Any], base: dict[str, Any], base_driver: str) -> str | None:
    """None when ``ours`` matches ``base``; else what differs. A step another Linux driver is
    known to answer differently (``alt``: ``{driver: result}``, or ``{driver: {"times": ...}}``
    for time relations) also matches that answer when the baseline came from another driver."""
    if ours["step"] != base["step"]:
        return "different step"
    why = None
    if ours["result"] != base["result"]:
        why = "result"
    elif ours["stat"] != base["stat"]:
        why = "state"
    elif ours.get("times") != base.get("times"):
        why = "times"
    if why is None:
        return None
    for driver, answer in (base.get("alt") or {}).items():
        if driver == base_driver:
            continue
        if isinstance(answer, dict) and "times" in answer:
            if why == "times" and ours.get("times") == answer["times"]:
                return None
        elif why == "result" and ours["result"] == answer:
            return None
    return why


def compare(ours: list[dict[str, Any]], base: list[dict[str, Any]], base_driver: str,
            names: tuple[str, str] = ("xipfs", "linux")) -> str | None:
    """None when the traces agree; else both traces step by step, differences marked ``!!``
    (with the watched names whose state differs, or all of them for a different result)."""
    bad = []
    lines = []
    for i in range(max(len(ours), len(base))):
        a = ours[i] if i < len(ours) else None
        b = base[i] if i < len(base) else None
        why = "missing step" if a is None or b is None else same(a, b, base_driver)
        step = (b or a or {}).get("step", "?")
        if not why:
            assert a is not None and b is not None
            if a["result"] != b["result"] or a.get("times") != b.get("times"):
                lines.append(f"   #{i} {step}: {names[1]} {b['result']!r} {b.get('times', '')}, "
                             f"{names[0]} {a['result']!r} {a.get('times', '')}: as another "
                             f"driver answers ({b['alt']})")
            else:
                lines.append(f"   #{i} {step}: {b['result']!r}")
            continue
        bad.append(i)
        lines.append(f"!! #{i} {step}    <- differs: {why}")
        keys = sorted({*(a or {}).get("stat", {}), *(b or {}).get("stat", {})})
        if why == "state":
            keys = [k for k in keys if a["stat"].get(k) != b["stat"].get(k)]
        for name, e in ((names[1], b), (names[0], a)):
            if e is None:
                lines.append(f"     {name:6}: (no such step)")
                continue
            state = {k: e["stat"].get(k) for k in keys} if why != "times" else {}
            extra = f"  times moved: {e['times']}" if "times" in e else ""
            extra += f"  (other drivers: {e['alt']})" if e.get("alt") else ""
            step_text = f"[at: {e['step']}] " if why == "different step" else ""
            lines.append(f"     {name:6}: {step_text}{e['result']!r}  {state}{extra}")
    if not bad:
        return None
    return f"{len(bad)} step(s) differ: {bad}\n" + "\n".join(lines)
