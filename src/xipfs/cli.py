"""The ``xipfs`` command: make, pack, inspect and change ext2 images like a directory tree.

Subcommands follow the Unix tools they echo (mke2fs, dumpe2fs -h, ls, cat, cp, mkdir, rm, mv,
ln, chmod, chown, touch, stat, df, tree, e2fsck -n) and the e2tools convention ``IMAGE:PATH``
for a path inside an image. Writing commands open the image ``"r+"`` (one writer at a time),
reading ones read-only. User errors print one line ``xipfs: COMMAND: WHAT: WHY`` on stderr and
exit 1 (2 for usage errors); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import dataclasses
import errno
import os
import posixpath
import shutil
import stat
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import __version__
from . import cli_format as F
from .errors import XipfsError
from .fs import current_umask

CHUNK = 1 << 20
#: Exit status after stdout went away (``xipfs cat ... | head``): 128 + SIGPIPE, as a shell shows.
BROKEN_PIPE_STATUS = 141


# -- errors -------------------------------------------------------------------------------------
class CliError(Exception):
    """A user error, printed as ``xipfs: COMMAND: WHAT: WHY``; exits with ``status``."""

    def __init__(self, what: str, why: str, status: int = 1, code: int | None = None) -> None:
        super().__init__(f"{what}: {why}" if what else why)
        self.what = what
        self.why = why
        self.status = status
        #: The errno behind it, when an OSError was.
        self.errno = code


def reason(err: OSError) -> str:
    """The WHY of an OSError: its strerror, or the whole message of xipfs's own errors."""
    if isinstance(err, XipfsError):
        return str(err)
    return err.strerror or str(err)


# -- IMAGE:PATH ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Spec:
    """One operand: ``image`` None for a local path; ``path`` is inside the image otherwise."""

    text: str
    image: str | None
    path: str


def _shm_exists(name: str) -> bool:
    from .device.detect import looks_like_shm_name

    return looks_like_shm_name(name) and os.path.exists("/dev/shm/" + name.lstrip("/"))


def is_image_name(text: str) -> bool:
    """True if ``text`` names an image: an existing file or device, or an existing shm name."""
    if not text:
        return False
    try:
        st = os.stat(text)
    except (OSError, ValueError):
        return _shm_exists(text)
    return stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)


def _image_split(arg: str) -> tuple[str, str] | None:
    """``(image, path)`` at the first ``:`` whose left side names an image, or None."""
    pos = arg.find(":")
    while pos > 0:
        if is_image_name(arg[:pos]):
            return arg[:pos], arg[pos + 1:]
        pos = arg.find(":", pos + 1)
    return None


def _inner(path: str) -> str:
    return path if path.startswith("/") else "/" + path


def image_spec(arg: str, default: str | None = None) -> Spec:
    """An operand that must be ``IMAGE[:PATH]`` (``default`` is the path when there is none)."""
    if default is not None and ":" in arg and is_image_name(arg):
        return Spec(arg, arg, default)          # an image whose own name has a colon
    split = _image_split(arg)
    if split is None and ":" in arg:
        image, _, path = arg.partition(":")
        split = (image, path)
    if split is None:
        if default is None:
            raise CliError(arg, "expected IMAGE:PATH (a path inside an image)", status=2)
        return Spec(arg, arg, default)
    image, path = split
    if not image:
        raise CliError(arg, "expected IMAGE:PATH (no image before ':')", status=2)
    return Spec(arg, image, _inner(path))


def any_spec(arg: str) -> Spec:
    """An operand that is ``IMAGE:PATH`` when its left side names an image, a local path otherwise.

    ``./a:b`` and ``../a:b`` are always local.
    """
    if not arg.startswith(("./", "../")):
        split = _image_split(arg)
        if split is not None:
            return Spec(arg, split[0], _inner(split[1]))
    return Spec(arg, None, arg)


def where(err: OSError, spec: Spec, local: tuple[str, ...] = ()) -> str:
    """The WHAT of an error met while working on ``spec``: ``IMAGE:PATH`` or the local path."""
    if isinstance(err, XipfsError):
        return spec.image or spec.text
    name = err.filename
    if name is None:
        return spec.text
    name = os.fsdecode(name)
    if spec.image is None or name == spec.image or any(name == p or name.startswith(p.rstrip("/") + "/")
                                                       for p in local):
        return name
    return f"{spec.image}:{name}"


@contextlib.contextmanager
def about(spec: Spec, local: tuple[str, ...] = ()) -> Iterator[None]:
    """Turn an OSError inside the block into a :class:`CliError` naming ``spec``'s path."""
    try:
        yield
    except (CliError, BrokenPipeError):
        raise
    except OSError as err:
        raise CliError(where(err, spec, local), reason(err), code=err.errno) from err


# -- a run of one command -----------------------------------------------------------------------
class Context:
    """What one command run shares: its name, flags, exit status and the images it opened."""

    def __init__(self, command: str, debug: bool = False, quiet: bool = False) -> None:
        self.command = command
        self.debug = debug
        self.quiet = quiet
        self.status = 0
        self._open: dict[str, Any] = {}

    @property
    def progress(self) -> bool | None:
        """``progress=`` for library calls: off with --quiet, automatic otherwise."""
        return False if self.quiet else None

    def report(self, err: CliError) -> None:
        """Print ``err`` as one line on stderr and remember the exit status."""
        _flush_stdout()
        print(f"xipfs: {self.command}: {err}", file=sys.stderr)
        self.status = max(self.status, err.status)

    @contextlib.contextmanager
    def each(self, spec: Spec | None = None) -> Iterator[None]:
        """Report an error in the block and go on with the next operand (as ``rm a b`` does)."""
        try:
            if spec is None:
                yield
            else:
                with about(spec):
                    yield
        except CliError as err:
            if self.debug:
                raise
            self.report(err)

    def fs(self, image: str, writable: bool = False) -> Any:
        """The image opened ``"r+"`` or read-only; one open per image for the whole run."""
        key = os.path.realpath(image) if os.path.exists(image) else image
        fs = self._open.get(key)
        if fs is not None and not (writable and fs.readonly):
            return fs
        if fs is not None:                          # read-only so far: reopen for writing
            del self._open[key]
            fs.close()
        if not os.path.exists(image) and not _shm_exists(image):
            raise CliError(image, os.strerror(errno.ENOENT), code=errno.ENOENT)
        if os.path.isdir(image):
            raise CliError(image, os.strerror(errno.EISDIR), code=errno.EISDIR)
        from .fs import open as xipfs_open

        try:
            fs = xipfs_open(image, "r+" if writable else "r")
        except OSError as err:
            raise CliError(image, reason(err), code=err.errno) from err
        except ValueError as err:
            raise CliError(image, str(err)) from err
        self._open[key] = fs
        return fs

    def tree(self, spec: Spec, writable: bool = False) -> Tree:
        """The local filesystem or the image ``spec`` names, for copies and walks."""
        if spec.image is None:
            return Tree(None, None)
        return Tree(self.fs(spec.image, writable), spec.image)

    def close_all(self) -> None:
        """Close every image (writing everything back); a failure is an error of the run."""
        failed: CliError | None = None
        for key, fs in reversed(list(self._open.items())):
            try:
                fs.close()
            except OSError as err:
                failed = failed or CliError(key, reason(err), code=err.errno)
        self._open.clear()
        if failed is not None:
            raise failed


class Tree:
    """One side of a copy or walk: the local filesystem (``os``) or an image, with the same calls.

    Every call turns an OSError into a :class:`CliError` naming the path as the user wrote it
    (``IMAGE:PATH`` or the local path).
    """

    def __init__(self, fs: Any, image: str | None) -> None:
        self.fs = fs
        self.image = image
        self.ops: Any = fs if fs is not None else os

    @property
    def local(self) -> bool:
        return self.fs is None

    def same(self, other: Tree) -> bool:
        return self.fs is other.fs

    def spec(self, path: str) -> Spec:
        return Spec(path if self.image is None else f"{self.image}:{path}", self.image, path)

    def show(self, path: str) -> str:
        return self.spec(path).text

    def call(self, path: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        with about(self.spec(path)):
            return fn(*args, **kw)

    def join(self, top: str, name: str) -> str:
        return posixpath.join(top, name)

    # the os calls, each naming its path in errors
    def lstat(self, p: str) -> os.stat_result:
        return self.call(p, self.ops.lstat, p)

    def stat(self, p: str) -> os.stat_result:
        return self.call(p, self.ops.stat, p)

    def listdir(self, p: str) -> list[str]:
        return sorted(self.call(p, self.ops.listdir, p))

    def readlink(self, p: str) -> str:
        return self.call(p, self.ops.readlink, p)

    def lexists(self, p: str) -> bool:
        return self.call(p, self.ops.path.lexists if self.local else self.fs.lexists, p)

    def exists(self, p: str) -> bool:
        return self.call(p, self.ops.path.exists if self.local else self.fs.exists, p)

    def isdir(self, p: str) -> bool:
        return self.call(p, self.ops.path.isdir if self.local else self.fs.isdir, p)

    def mkdir(self, p: str, mode: int = 0o777) -> None:
        self.call(p, self.ops.mkdir, p, mode)

    def makedirs(self, p: str, mode: int = 0o777) -> None:
        self.call(p, self.ops.makedirs, p, mode, exist_ok=True)

    def symlink(self, target: str, p: str) -> None:
        self.call(p, self.ops.symlink, target, p)

    def link(self, src: str, p: str) -> None:
        self.call(p, self.ops.link, src, p)

    def mknod(self, p: str, mode: int, rdev: int) -> None:
        self.call(p, self.ops.mknod, p, mode, rdev)

    def unlink(self, p: str) -> None:
        self.call(p, self.ops.unlink, p)

    def rmdir(self, p: str) -> None:
        self.call(p, self.ops.rmdir, p)

    def rename(self, src: str, dst: str) -> None:
        self.call(src, self.ops.rename, src, dst)

    def chmod(self, p: str, mode: int) -> None:
        self.call(p, self.ops.chmod, p, mode)

    def chown(self, p: str, uid: int, gid: int, follow: bool = True) -> None:
        self.call(p, self.ops.chown, p, uid, gid, follow_symlinks=follow)

    def utime(self, p: str, ns: tuple[int, int], follow: bool = True) -> None:
        self.call(p, self.ops.utime, p, ns=ns, follow_symlinks=follow)

    def open_read(self, p: str) -> Any:
        if self.local:
            return self.call(p, builtins.open, p, "rb", buffering=0)
        return self.call(p, self.fs.open, p, "rb", buffering=0)

    def open_write(self, p: str, mode: str = "wb") -> Any:
        if self.local:
            return self.call(p, builtins.open, p, mode, buffering=0)
        return self.call(p, self.fs.open, p, mode, buffering=0)

    def walk_paths(self, top: str, follow_top: bool = True) -> Iterator[tuple[str, os.stat_result]]:
        """``(path, lstat)`` of ``top`` and everything below it, parents first; symlinks not followed."""
        st = self.stat(top) if follow_top else self.lstat(top)
        yield top, st
        if stat.S_ISDIR(st.st_mode):
            for name in self.listdir(top):
                yield from self.walk_paths(self.join(top, name), follow_top=False)


# -- output -------------------------------------------------------------------------------------
def emit(text: str = "", end: str = "\n") -> None:
    """Print a line on stdout; names that are not valid UTF-8 go out as their original bytes."""
    out = sys.stdout
    try:
        out.write(text + end)
    except UnicodeEncodeError:
        data = (text + end).encode(out.encoding or "utf-8", "surrogateescape")
        buf = getattr(out, "buffer", None)
        if buf is None:
            out.write(data.decode(out.encoding or "utf-8", "replace"))
            return
        out.flush()
        buf.write(data)
        buf.flush()


def _flush_stdout() -> None:
    with contextlib.suppress(ValueError, AttributeError):
        sys.stdout.flush()


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def _silence_stdout() -> None:
    """After EPIPE: point stdout at /dev/null so the interpreter's final flush stays quiet."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _lazy(module: str, name: str, what: str) -> Any:
    """``xipfs.<module>.<name>``, imported when a subcommand needs it (a clear error when absent)."""
    import importlib

    try:
        mod = importlib.import_module(f"xipfs.{module}")
    except ModuleNotFoundError as err:
        if err.name and (err.name == f"xipfs.{module}" or f"xipfs.{module}".startswith(err.name + ".")):
            raise CliError("", f"{what} is not available in this installation (no xipfs.{module})") from err
        raise CliError("", f"{what} needs {err.name!r}: {err} (pip install 'xipfs[all]')") from err
    return getattr(mod, name)


# -- mkfs ---------------------------------------------------------------------------------------
def _holds_ext2(image: str) -> bool:
    """True if ``image`` exists and its superblock magic says ext2/3/4."""
    path = image if os.path.exists(image) or not _shm_exists(image) else "/dev/shm/" + image.lstrip("/")
    try:
        with builtins.open(path, "rb") as f:
            f.seek(1024 + 56)
            return f.read(2) == b"\x53\xef"
    except OSError:
        return False


def cmd_mkfs(ctx: Context, args: argparse.Namespace) -> None:
    from .ext2.mkfs import mkfs

    image = args.image
    spec = Spec(image, None, image)
    size = _size_arg(args.size, "size") if args.size else None
    if args.label is not None and len(args.label.encode()) > 16:
        raise CliError(args.label, "volume label longer than 16 bytes", status=2)
    if not args.force and _holds_ext2(image):
        raise CliError(image, "already holds an ext2 filesystem (use -F to make a new one over it)")
    features = [f for f in args.features.split(",") if f] if args.features else None
    with about(spec):
        try:
            mkfs(image, size, block_size=args.block_size, inode_size=args.inode_size, inodes=args.inodes,
                 label=args.label, uuid=args.uuid, features=features, preallocate=args.preallocate)
        except ValueError as err:
            raise CliError(image, str(err)) from err
    if not ctx.quiet:
        fs = ctx.fs(image)
        sb = fs.volume.sb
        label = f", label {sb.label!r}" if sb.label else ""
        emit(f"{image}: ext2, {sb.block_size}-byte blocks, {sb.s_blocks_count} blocks "
             f"({F.human_size(sb.s_blocks_count * sb.block_size)}), {sb.s_inodes_count} inodes, "
             f"{F.plural(sb.groups, 'block group', 'block groups')}{label}, UUID {sb.uuid}")


def _size_arg(text: str, what: str) -> int:
    try:
        return F.parse_size(text)
    except ValueError as err:
        raise CliError(text, f"invalid {what}: {err}", status=2) from None


def _extra_arg(text: str) -> float | int:
    """``--extra``: a fraction (``0.1``), a percentage (``10%``), or bytes with a suffix (``64M``)."""
    try:
        if text.endswith("%"):
            value: float | int = float(text[:-1]) / 100
        elif text[-1:].isalpha():
            value = F.parse_size(text)
        else:
            value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid room {text!r} (e.g. 0.1, 10% or 64M)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must not be negative")
    return value


# -- pack / unpack ------------------------------------------------------------------------------
def cmd_pack(ctx: Context, args: argparse.Namespace) -> None:
    pack = _lazy("pack", "pack", "pack")
    image = args.image
    if not os.path.isdir(args.src):
        code = errno.ENOTDIR if os.path.exists(args.src) else errno.ENOENT
        raise CliError(args.src, os.strerror(code), code=code)
    size = _size_arg(args.size, "size") if args.size else None
    with about(Spec(image, None, image)):
        try:
            result = pack(args.src, image, size=size, block_size=args.block_size, inode_size=args.inode_size,
                          extra=args.extra, label=args.label, uuid=args.uuid, progress=ctx.progress,
                          compile=args.compile, exclude=args.exclude)
        except ValueError as err:
            raise CliError(image, str(err)) from err
    for path, why in result.skipped:
        ctx.report(CliError(os.fsdecode(path), f"not packed: {why}"))
    if not ctx.quiet:
        emit(f"packed {args.src} into {image}: {_counts(result)}, image {F.human_size(result.size)}")


def _counts(result: Any) -> str:
    """``"12 files, 3 directories, 1 symlink, 40K of data"`` from a pack or unpack result."""
    parts = [F.plural(result.files, "file", "files"), F.plural(result.dirs, "directory", "directories"),
             F.plural(result.symlinks, "symlink", "symlinks")]
    if result.hardlinks:
        parts.append(F.plural(result.hardlinks, "hard link", "hard links"))
    if result.others:
        parts.append(F.plural(result.others, "other", "others"))
    return ", ".join(parts) + f", {F.human_size(result.bytes)} of data"


def cmd_unpack(ctx: Context, args: argparse.Namespace) -> None:
    unpack = _lazy("unpack", "unpack", "unpack")
    spec = image_spec(args.image, "/")
    ctx.fs(spec.image)                          # the one-line errors for a missing or bad image
    with about(spec, local=(args.dest, os.path.abspath(args.dest))):
        result = unpack(spec.image, args.dest, spec.path, progress=ctx.progress)
    for path, why in result.skipped:
        ctx.report(CliError(f"{spec.image}:{os.fsdecode(path)}", f"not unpacked: {why}"))
    if not ctx.quiet:
        emit(f"unpacked {spec.text} into {args.dest}: {_counts(result)}")


# -- info / df / check --------------------------------------------------------------------------
_ERRORS_BEHAVIOR = {1: "Continue", 2: "Remount read-only", 3: "Panic"}


def _storage(fs: Any, image: str) -> str:
    from .device.detect import storage_kind

    try:
        kind = storage_kind(image) if os.path.exists(image) else "shm"
    except OSError:
        kind = "unknown"
    path = "read in place (XIP)" if fs.is_xip else "page cache"
    return f"{kind}, {path}"


def info_dict(fs: Any, image: str) -> dict[str, Any]:
    """What ``xipfs info --json`` prints (keys documented in the command's help)."""
    sb = fs.volume.sb
    f = sb.fields
    state = "clean" if f["s_state"] & 1 else "not clean"
    if f["s_state"] & 2:
        state += " with errors"
    return {
        "image": image, "image_size": fs.device.size, "storage": _storage(fs, image), "xip": fs.is_xip,
        "label": sb.label, "uuid": sb.uuid, "revision": f["s_rev_level"], "features": sb.features,
        "state": state, "errors_behavior": _ERRORS_BEHAVIOR.get(f["s_errors"], str(f["s_errors"])),
        "inodes_count": f["s_inodes_count"], "blocks_count": f["s_blocks_count"],
        "reserved_blocks": f["s_r_blocks_count"], "free_blocks": f["s_free_blocks_count"],
        "free_inodes": f["s_free_inodes_count"], "first_data_block": f["s_first_data_block"],
        "block_size": sb.block_size, "inode_size": sb.inode_size, "first_inode": sb.first_ino,
        "blocks_per_group": f["s_blocks_per_group"], "inodes_per_group": f["s_inodes_per_group"],
        "inode_blocks_per_group": sb.itable_blocks, "groups": sb.groups,
        "created": f["s_mkfs_time"] or None, "mounted": f["s_mtime"] or None,
        "written": f["s_wtime"] or None, "checked": f["s_lastcheck"] or None,
        "mount_count": f["s_mnt_count"], "max_mount_count": f["s_max_mnt_count"],
        "writable": not sb.readonly_reason, "readonly_reason": sb.readonly_reason or None,
    }


def cmd_info(ctx: Context, args: argparse.Namespace) -> None:
    spec = image_spec(args.image, "/")
    fs = ctx.fs(spec.image)
    d = info_dict(fs, spec.image)
    if args.json:
        emit(F.to_json(d))
        return
    rev = {0: "0 (original)", 1: "1 (dynamic)"}.get(d["revision"], str(d["revision"]))
    rows = [
        ("Filesystem volume name", d["label"] or "<none>"), ("Filesystem UUID", d["uuid"]),
        ("Filesystem revision #", rev), ("Filesystem features", " ".join(d["features"]) or "(none)"),
        ("Filesystem state", d["state"]), ("Errors behavior", d["errors_behavior"]),
        ("Inode count", d["inodes_count"]), ("Block count", d["blocks_count"]),
        ("Reserved block count", d["reserved_blocks"]), ("Free blocks", d["free_blocks"]),
        ("Free inodes", d["free_inodes"]), ("First block", d["first_data_block"]),
        ("Block size", d["block_size"]), ("Inode size", d["inode_size"]), ("First inode", d["first_inode"]),
        ("Blocks per group", d["blocks_per_group"]), ("Inodes per group", d["inodes_per_group"]),
        ("Inode blocks per group", d["inode_blocks_per_group"]), ("Block groups", d["groups"]),
        ("Filesystem created", F.ctime_text(d["created"] or 0)),
        ("Last mount time", F.ctime_text(d["mounted"] or 0)),
        ("Last write time", F.ctime_text(d["written"] or 0)),
        ("Mount count", d["mount_count"]), ("Maximum mount count", d["max_mount_count"]),
        ("Last checked", F.ctime_text(d["checked"] or 0)),
        ("Image", f"{d['image']} ({d['image_size']} bytes, {F.human_size(d['image_size'])})"),
        ("Storage", d["storage"]),
        ("Writable", "yes" if d["writable"] else f"no: {d['readonly_reason']}"),
    ]
    for key, value in rows:
        emit(f"{key + ':':<26}{value}")


def df_dict(fs: Any, image: str) -> dict[str, Any]:
    """One row of ``xipfs df --json`` (keys documented in the command's help)."""
    sv = fs.statvfs("/")
    bs = sv.f_frsize
    used = (sv.f_blocks - sv.f_bfree) * bs
    avail = sv.f_bavail * bs
    iused = sv.f_files - sv.f_ffree
    return {
        "image": image, "label": fs.label, "block_size": bs, "size": sv.f_blocks * bs, "used": used,
        "available": avail, "use_percent": -(-used * 100 // (used + avail)) if used + avail else 0,
        "inodes": sv.f_files, "inodes_used": iused, "inodes_free": sv.f_ffree,
        "inodes_use_percent": -(-iused * 100 // sv.f_files) if sv.f_files else 0,
    }


def cmd_df(ctx: Context, args: argparse.Namespace) -> None:
    rows = []
    for arg in args.images:
        with ctx.each():
            spec = image_spec(arg, "/")
            rows.append(df_dict(ctx.fs(spec.image), spec.image))
    if args.json:
        emit(F.to_json(rows))
        return
    if args.inodes:
        head = ("Filesystem", "Inodes", "IUsed", "IFree", "IUse%")
        cells = [(r["image"], str(r["inodes"]), str(r["inodes_used"]), str(r["inodes_free"]),
                  f"{r['inodes_use_percent']}%") for r in rows]
    else:
        size = F.human_size if args.human else (lambda n: str(-(-n // 1024)))
        head = ("Filesystem", "Size" if args.human else "1K-blocks", "Used", "Avail", "Use%")
        cells = [(r["image"], size(r["size"]), size(r["used"]), size(r["available"]), f"{r['use_percent']}%")
                 for r in rows]
    if not rows:
        return
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(5)]
    for c in [head, *cells]:
        emit(f"{c[0]:<{widths[0]}} " + " ".join(f"{v:>{w}}" for v, w in zip(c[1:], widths[1:], strict=True)))


def _problem_dict(p: Any) -> dict[str, Any]:
    if hasattr(p, "to_dict"):
        return p.to_dict()
    return dataclasses.asdict(p)


def cmd_check(ctx: Context, args: argparse.Namespace) -> None:
    from .ext2.check import MINOR_CODES
    from .fs import check

    spec = image_spec(args.image, "/")
    with about(spec):                      # the device, not a Volume: damaged descriptors too
        problems = check(spec.image, progress=ctx.progress)
    if args.json:
        emit(F.to_json({"image": spec.image, "clean": not problems, "count": len(problems),
                        "problems": [_problem_dict(p) for p in problems]}))
    else:
        for p in problems:
            extra = f" ({p.path})" if getattr(p, "path", None) and p.path not in p.message else ""
            emit(f"{p.code}: {p.message}{extra}")
        if problems:
            emit(f"{spec.image}: {F.plural(len(problems), 'problem', 'problems')} found")
        else:
            fs = ctx.fs(spec.image)
            sb = fs.volume.sb
            sv = fs.statvfs("/")
            used = sb.s_blocks_count - sum(g.free_blocks for g in fs.volume.groups)
            emit(f"{spec.image}: clean, {sv.f_files - sv.f_ffree}/{sv.f_files} files, "
                 f"{used}/{sb.s_blocks_count} blocks")
    if any(p.code not in MINOR_CODES for p in problems):   # as e2fsck -n: lagging counts are not errors
        ctx.status = max(ctx.status, 1)


# -- ls / tree / stat / cat ---------------------------------------------------------------------
def _follow_if_dir(tree: Tree, path: str, st: os.stat_result) -> os.stat_result:
    """A command-line symlink to a directory lists the directory (as ls without -l does)."""
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(CliError):
            target = tree.stat(path)
            if stat.S_ISDIR(target.st_mode):
                return target
    return st


def _target(tree: Tree, path: str, st: os.stat_result) -> str | None:
    if not stat.S_ISLNK(st.st_mode):
        return None
    try:
        return tree.readlink(path)
    except CliError:
        return "?"


#: One line of ``ls``: (shown name, path, lstat or None when not needed, the side it is on).
Item = tuple[str, str, "os.stat_result | None", Tree]


class Lister:
    """``ls``: collects what to print, in the order GNU ls prints it."""

    def __init__(self, ctx: Context, args: argparse.Namespace) -> None:
        self.ctx = ctx
        self.args = args
        self.now = time.time()
        self.records: list[dict[str, Any]] = []
        self.sections = 0
        self.wide = _stdout_is_terminal() and not args.long
        self.needs_stat = args.long or args.json or args.recursive

    def entries(self, tree: Tree, path: str) -> list[Item]:
        """The entries of directory ``path``, sorted, hidden ones as -a says."""
        names = [n for n in tree.listdir(path) if self.args.all or not n.startswith(".")]
        out: list[Item] = []
        if self.args.all:
            out.append((".", path, tree.stat(path) if self.needs_stat else None, tree))
            parent = posixpath.dirname(path.rstrip("/")) or "/"
            out.append(("..", parent, tree.stat(parent) if self.needs_stat else None, tree))
        for name in names:
            full = tree.join(path, name)
            st = None
            if self.needs_stat:
                st = self._lstat_or_report(tree, full)
                if st is None:
                    continue
            out.append((name, full, st, tree))
        return out

    def _lstat_or_report(self, tree: Tree, path: str) -> os.stat_result | None:
        st = None
        with self.ctx.each():
            st = tree.lstat(path)
        return st

    def show(self, items: list[Item], directory: bool) -> None:
        """Print one group of names (a directory's entries, or the operands that are not listed)."""
        if self.args.json:
            self.records += [F.entry_dict(full, st, _target(tree, full, st)) for name, full, st, tree in items
                             if name not in (".", "..") and st is not None]
            return
        if self.args.long:
            if directory:
                total = sum(st.st_blocks for _, _, st, _ in items if st is not None) // 2
                emit(f"total {F.human_size(total * 1024) if self.args.human else total}")
            rows = []
            for name, full, st, tree in items:
                target = _target(tree, full, st)
                rows.append((st, name + (f" -> {target}" if target is not None else "")))
            for line in F.ls_long_lines(rows, self.args.human, self.now):
                emit(line)
        elif self.wide:
            for line in F.columns([name for name, _, _, _ in items], shutil.get_terminal_size().columns):
                emit(line)
        else:
            for name, _, _, _ in items:
                emit(name)

    def directory(self, tree: Tree, path: str, header: bool) -> None:
        if not self.args.json:
            if self.sections:
                emit()
            if header:
                emit(f"{path}:")
        self.sections += 1
        items = self.entries(tree, path)
        self.show(items, True)
        if self.args.recursive:
            for name, full, st, _ in items:
                if name not in (".", "..") and st is not None and stat.S_ISDIR(st.st_mode):
                    with self.ctx.each():
                        self.directory(tree, full, True)


def cmd_ls(ctx: Context, args: argparse.Namespace) -> None:
    lister = Lister(ctx, args)
    files: list[Item] = []
    dirs: list[tuple[Tree, str]] = []
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg, "/")
            tree = ctx.tree(spec)
            st = tree.lstat(spec.path)
            if not args.long and not args.directory:
                st = _follow_if_dir(tree, spec.path, st)
            if stat.S_ISDIR(st.st_mode) and not args.directory:
                dirs.append((tree, spec.path))
            else:
                files.append((spec.path, spec.path, st, tree))
    if files:                          # operands that are not listed as directories come first
        lister.show(files, False)
        lister.sections += 1
    header = len(files) + len(dirs) > 1 or args.recursive
    for tree, path in dirs:
        with ctx.each(tree.spec(path)):
            lister.directory(tree, path, header)
    if args.json:
        emit(F.to_json(lister.records))


def cmd_tree(ctx: Context, args: argparse.Namespace) -> None:
    spec = image_spec(args.path, "/")
    tree = ctx.tree(spec)
    st = tree.stat(spec.path)
    counts = [0, 0]                                     # directories, files
    emit(spec.text)
    if stat.S_ISDIR(st.st_mode):
        _tree_below(ctx, tree, spec.path, "", 1, args, counts)
    emit()
    summary = F.plural(counts[0], "directory", "directories")
    if not args.dirs_only:
        summary += ", " + F.plural(counts[1], "file", "files")
    emit(summary)


def _tree_below(ctx: Context, tree: Tree, path: str, prefix: str, depth: int, args: argparse.Namespace,
                counts: list[int]) -> None:
    """The lines of ``tree(1)`` below ``path``: entries sorted, ``├──``/``└──`` branches."""
    if args.level is not None and depth > args.level:
        return
    items = []
    for name in tree.listdir(path):
        if not args.all and name.startswith("."):
            continue
        full = tree.join(path, name)
        st = tree.lstat(full)
        is_dir = stat.S_ISDIR(_follow_if_dir(tree, full, st).st_mode)
        if args.dirs_only and not is_dir:
            continue
        items.append((name, full, st, is_dir))
    for i, (name, full, st, is_dir) in enumerate(items):
        last = i == len(items) - 1
        target = _target(tree, full, st)
        emit(prefix + ("└── " if last else "├── ") + name + (f" -> {target}" if target is not None else ""))
        counts[0 if is_dir else 1] += 1
        if stat.S_ISDIR(st.st_mode):
            with ctx.each():
                _tree_below(ctx, tree, full, prefix + ("    " if last else "│   "), depth + 1, args, counts)


def cmd_stat(ctx: Context, args: argparse.Namespace) -> None:
    records = []
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec)
            st = tree.stat(spec.path) if args.dereference else tree.lstat(spec.path)
            target = _target(tree, spec.path, st)
            if args.json:
                rec = F.entry_dict(spec.path, st, target)
                rec["image"] = spec.image
                records.append(rec)
            else:
                _print_stat(spec.text, st, target)
    if args.json:
        emit(F.to_json(records))


def _print_stat(shown: str, st: os.stat_result, target: str | None) -> None:
    """The lines ``stat(1)`` prints for one file."""
    name = shown + (f" -> {target}" if target is not None else "")
    emit(f"  File: {name}")
    emit(f"  Size: {st.st_size:<10}\tBlocks: {st.st_blocks:<10} IO Block: {st.st_blksize:<6} "
         f"{F.stat_type_name(st.st_mode, st.st_size)}")
    dev = f"Device: {st.st_dev:x}h/{st.st_dev}d\tInode: {st.st_ino:<11} Links: {st.st_nlink}"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        dev += f"     Device type: {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
    emit(dev)
    emit(f"Access: ({stat.S_IMODE(st.st_mode):04o}/{stat.filemode(st.st_mode)})  "
         f"Uid: ({st.st_uid:5}/{F.user_name(st.st_uid):>8})   "
         f"Gid: ({st.st_gid:5}/{F.group_name(st.st_gid):>8})")
    emit(f"Access: {F.stat_time(st.st_atime_ns)}")
    emit(f"Modify: {F.stat_time(st.st_mtime_ns)}")
    emit(f"Change: {F.stat_time(st.st_ctime_ns)}")
    emit(" Birth: -")


def cmd_cat(ctx: Context, args: argparse.Namespace) -> None:
    _flush_stdout()
    out = getattr(sys.stdout, "buffer", None)
    buf = memoryview(bytearray(CHUNK))
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec)
            with tree.open_read(spec.path) as f, about(spec):
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    if out is not None:
                        out.write(buf[:n])
                    else:
                        sys.stdout.write(bytes(buf[:n]).decode("utf-8", "surrogateescape"))
    if out is not None:
        out.flush()


# -- cp / mv ------------------------------------------------------------------------------------
class Copier:
    """Copies between two :class:`Tree` sides the way ``cp`` does (``-r``, ``-p``)."""

    def __init__(self, ctx: Context, recursive: bool, preserve: bool, bar: Any) -> None:
        self.ctx = ctx
        self.recursive = recursive
        self.preserve = preserve
        self.bar = bar
        self.umask = current_umask()
        self.failed = False

    def copy(self, src: Tree, sp: str, dst: Tree, dp: str, top: bool = True) -> None:
        """Copy ``sp`` to ``dp`` (its new name); errors below the top are reported and skipped."""
        st = src.stat(sp) if top and not self.recursive else src.lstat(sp)
        if stat.S_ISDIR(st.st_mode):
            if not self.recursive:
                raise CliError(src.show(sp), "-r not specified; omitting directory")
            self._copy_dir(src, sp, st, dst, dp)
        elif stat.S_ISLNK(st.st_mode):
            self._replace(dst, dp, st, src.show(sp))
            dst.symlink(src.readlink(sp), dp)
            self._finish(dst, dp, st, False, follow=False)
        elif stat.S_ISREG(st.st_mode) or (top and not self.recursive and not stat.S_ISSOCK(st.st_mode)):
            self._copy_file(src, sp, st, dst, dp)   # cp reads a named FIFO or device unless -r
        else:                                       # FIFO, socket, device node: made anew
            self._replace(dst, dp, st, src.show(sp))
            dst.mknod(dp, stat.S_IFMT(st.st_mode) | 0o600, st.st_rdev)
            self._finish(dst, dp, st, True)

    def _replace(self, dst: Tree, dp: str, st: os.stat_result, shown: str) -> None:
        """Make room at ``dp`` for a symlink or device node (an existing directory stays)."""
        if dst.lexists(dp):
            if stat.S_ISDIR(dst.lstat(dp).st_mode):
                raise CliError(dst.show(dp), f"cannot overwrite directory with non-directory {shown!r}")
            dst.unlink(dp)

    def _copy_dir(self, src: Tree, sp: str, st: os.stat_result, dst: Tree, dp: str) -> None:
        if src.same(dst):
            a, b = posixpath.normpath(sp), posixpath.normpath(dp)
            if b == a or b.startswith(a.rstrip("/") + "/"):
                raise CliError(src.show(sp), f"cannot copy a directory into itself, {dst.show(dp)!r}")
        new = not dst.lexists(dp)
        if new:
            dst.mkdir(dp, 0o700)
        elif not dst.isdir(dp):
            raise CliError(dst.show(dp), f"cannot overwrite non-directory with directory {src.show(sp)!r}")
        for name in src.listdir(sp):
            with self.ctx.each():
                try:
                    self.copy(src, src.join(sp, name), dst, dst.join(dp, name), top=False)
                except CliError:
                    self.failed = True
                    raise
        self._finish(dst, dp, st, new)

    def _copy_file(self, src: Tree, sp: str, st: os.stat_result, dst: Tree, dp: str) -> None:
        new = True
        if dst.lexists(dp):
            try:
                dst_st = dst.stat(dp)
            except CliError:                     # a dangling symlink: open creates its target
                dst_st = None
            if dst_st is not None:
                if stat.S_ISDIR(dst_st.st_mode):
                    raise CliError(dst.show(dp),
                                   f"cannot overwrite directory with non-directory {src.show(sp)!r}")
                if src.same(dst) and dst_st.st_ino == st.st_ino:
                    raise CliError(src.show(sp), f"{src.show(sp)!r} and {dst.show(dp)!r} are the same file")
                new = False
        if not dst.local and st.st_size <= CHUNK:        # small into an image: one lean write
            with src.open_read(sp) as fin:
                data = src.call(sp, fin.read)
            dst.call(dp, dst.fs.write_bytes, dp, data)
            self.bar.update(len(data))
            self._finish(dst, dp, st, new)
            return
        with src.open_read(sp) as fin, dst.open_write(dp) as fout:
            buf = memoryview(bytearray(min(CHUNK, max(st.st_size, 1))))
            while True:
                n = src.call(sp, fin.readinto, buf)
                if not n:
                    break
                done = 0
                while done < n:
                    wrote = dst.call(dp, fout.write, buf[done:n])
                    if not wrote:
                        raise CliError(dst.show(dp), os.strerror(errno.ENOSPC), code=errno.ENOSPC)
                    done += wrote
                self.bar.update(n)
        self._finish(dst, dp, st, new)

    def _finish(self, dst: Tree, dp: str, st: os.stat_result, new: bool, follow: bool = True) -> None:
        """Mode for a new file (as the umask allows, unless -p); with -p also owner and times."""
        if self.preserve:
            try:
                dst.chown(dp, st.st_uid, st.st_gid, follow=follow)
            except CliError as err:
                if not (dst.local and err.errno == errno.EPERM):   # as cp -p: not root, keep ours
                    raise
        if follow and (new or self.preserve):
            mode = stat.S_IMODE(st.st_mode)
            dst.chmod(dp, mode if self.preserve else mode & 0o777 & ~self.umask)
        if self.preserve:
            dst.utime(dp, (st.st_atime_ns, st.st_mtime_ns), follow=follow)


def _bytes_to_copy(tree: Tree, path: str, recursive: bool) -> int:
    """File data below ``path`` (for the progress bar); 0 where it cannot be read."""
    total = 0
    try:
        if not recursive:
            st = tree.stat(path)
            return st.st_size if stat.S_ISREG(st.st_mode) else 0
        for _, st in tree.walk_paths(path, follow_top=False):
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    except CliError:
        pass
    return total


def _sources_and_target(ctx: Context, paths: list[str], writable_sources: bool
                        ) -> tuple[list[tuple[Spec, Tree]], Spec, Tree, bool]:
    """Parse ``SRC... DEST`` with either side an image; open DEST's image for writing first."""
    specs = [any_spec(a) for a in paths]
    if all(s.image is None for s in specs):
        for arg in paths:
            head, sep, _ = arg.partition(":")
            if sep and head and not arg.startswith(("./", "../")) and not os.path.exists(head):
                raise CliError(head, os.strerror(errno.ENOENT), code=errno.ENOENT)
        raise CliError("", "no IMAGE:PATH operand (for local files use the system's own command)", status=2)
    dest = specs[-1]
    dst_tree = ctx.tree(dest, writable=True)
    sources = [(s, ctx.tree(s, writable=writable_sources)) for s in specs[:-1]]
    dest_is_dir = dst_tree.isdir(dest.path)
    if len(sources) > 1 and not dest_is_dir:
        raise CliError(dest.text, "target is not a directory", code=errno.ENOTDIR)
    return sources, dest, dst_tree, dest_is_dir


def _target_path(spec: Spec, dest: Spec, dest_is_dir: bool) -> str:
    if not dest_is_dir:
        return dest.path
    name = posixpath.basename(spec.path.rstrip("/"))
    return posixpath.join(dest.path, name) if name else dest.path


def cmd_cp(ctx: Context, args: argparse.Namespace) -> None:
    sources, dest, dst_tree, dest_is_dir = _sources_and_target(ctx, [*args.sources, args.dest], False)
    from .progress import progress_bar

    total = sum(_bytes_to_copy(t, s.path, args.recursive) for s, t in sources)
    with progress_bar(ctx.progress, total, "cp", "B") as bar:
        copier = Copier(ctx, args.recursive, args.preserve, bar)
        for spec, tree in sources:
            with ctx.each():
                copier.copy(tree, spec.path, dst_tree, _target_path(spec, dest, dest_is_dir))


def cmd_mv(ctx: Context, args: argparse.Namespace) -> None:
    sources, dest, dst_tree, dest_is_dir = _sources_and_target(ctx, [*args.sources, args.dest], True)
    from .progress import progress_bar

    for spec, tree in sources:
        with ctx.each():
            target = _target_path(spec, dest, dest_is_dir)
            if tree.same(dst_tree):
                tree.rename(spec.path, target)
                continue
            # another image or the local side: copy everything with its metadata, then remove
            with progress_bar(ctx.progress, _bytes_to_copy(tree, spec.path, True), "mv", "B") as bar:
                copier = Copier(ctx, True, True, bar)
                copier.copy(tree, spec.path, dst_tree, target)
            if copier.failed:
                raise CliError(spec.text, "not removed: it was not copied whole")
            _remove(ctx, tree, spec.path, recursive=True)


# -- mkdir / rm / ln / chmod / chown / touch ----------------------------------------------------
def cmd_mkdir(ctx: Context, args: argparse.Namespace) -> None:
    mode = _mode_arg(args.mode, 0o40777) if args.mode is not None else None   # as chmod, from a=rwx
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec, writable=True)
            if args.parents:
                tree.makedirs(spec.path)
            else:
                tree.mkdir(spec.path)
            if mode is not None:
                tree.chmod(spec.path, mode)


def _mode_arg(text: str, mode: int) -> int:
    try:
        return F.apply_mode(text, mode, current_umask())
    except ValueError as err:
        raise CliError("", str(err), status=2) from None


def _remove(ctx: Context, tree: Tree, path: str, recursive: bool) -> None:
    st = tree.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        tree.unlink(path)
        return
    if not recursive:
        raise CliError(tree.show(path), "Is a directory (use -r)", code=errno.EISDIR)
    for name in tree.listdir(path):
        with ctx.each():
            _remove(ctx, tree, tree.join(path, name), True)
    tree.rmdir(path)


def cmd_rm(ctx: Context, args: argparse.Namespace) -> None:
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            if posixpath.normpath(spec.path) == "/":
                raise CliError(spec.text, "refusing to remove the root directory")
            tree = ctx.tree(spec, writable=True)
            try:
                _remove(ctx, tree, spec.path, args.recursive)
            except CliError as err:
                if args.force and err.errno == errno.ENOENT:
                    continue
                raise


def cmd_ln(ctx: Context, args: argparse.Namespace) -> None:
    link = image_spec(args.link)
    tree = ctx.tree(link, writable=True)
    target = args.target
    split = _image_split(target)
    if split is not None:
        if os.path.realpath(split[0]) != os.path.realpath(link.image or ""):
            if not args.symbolic:
                raise CliError(target, "cannot hard-link across images", code=errno.EXDEV)
        else:
            target = _inner(split[1])
    path = link.path
    if tree.isdir(path):
        path = tree.join(path, posixpath.basename(target.rstrip("/")) or "link")
    if args.force and tree.lexists(path) and not stat.S_ISDIR(tree.lstat(path).st_mode):
        tree.unlink(path)
    if args.symbolic:
        tree.symlink(target, path)
    else:
        tree.link(_inner(target), path)


def _walk_for_change(ctx: Context, tree: Tree, path: str, recursive: bool) -> Iterator[str]:
    """``path``, then with ``recursive`` everything below it (symlinks met on the way not entered)."""
    yield path
    if recursive and stat.S_ISDIR(tree.stat(path).st_mode):
        for name in tree.listdir(path):
            full = tree.join(path, name)
            st = None
            with ctx.each():
                st = tree.lstat(full)
            if st is not None and stat.S_ISDIR(st.st_mode):
                yield from _walk_for_change(ctx, tree, full, True)
            elif st is not None:
                yield full


def cmd_chmod(ctx: Context, args: argparse.Namespace) -> None:
    umask = current_umask()
    try:
        F.apply_mode(args.mode, 0o100644, umask)         # reject a bad mode before any change
    except ValueError as err:
        raise CliError("", str(err), status=2) from None
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec, writable=True)
            for path in _walk_for_change(ctx, tree, spec.path, args.recursive):
                with ctx.each():
                    st = tree.lstat(path)
                    if stat.S_ISLNK(st.st_mode):
                        if path != spec.path:            # found while recursing: left alone
                            continue
                        st = tree.stat(path)
                    tree.chmod(path, F.apply_mode(args.mode, st.st_mode, umask))


def cmd_chown(ctx: Context, args: argparse.Namespace) -> None:
    try:
        uid, gid = F.parse_owner(args.owner)
    except ValueError as err:
        raise CliError("", str(err), status=2) from None
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec, writable=True)
            for path in _walk_for_change(ctx, tree, spec.path, args.recursive):
                with ctx.each():
                    tree.chown(path, uid, gid, follow=not args.no_dereference)


def cmd_touch(ctx: Context, args: argparse.Namespace) -> None:
    when = time.time_ns()
    if args.date is not None:
        try:
            when = F.parse_date(args.date)
        except ValueError as err:
            raise CliError("", str(err), status=2) from None
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec, writable=True)
            if not tree.exists(spec.path):
                if args.no_create:
                    continue
                tree.open_write(spec.path, "ab").close()
            st = tree.stat(spec.path)
            both = args.atime_only == args.mtime_only           # neither or both of -a, -m
            atime = when if both or args.atime_only else st.st_atime_ns
            mtime = when if both or args.mtime_only else st.st_mtime_ns
            tree.utime(spec.path, (atime, mtime))


# -- run / mount --------------------------------------------------------------------------------
def cmd_run(ctx: Context, args: argparse.Namespace) -> None:
    run_module = _lazy("importer", "run_module", "run")
    spec = image_spec(args.image, "/")
    fs = ctx.fs(spec.image)
    with about(spec):
        if not stat.S_ISDIR(fs.stat(spec.path).st_mode):
            raise CliError(spec.text, os.strerror(errno.ENOTDIR), code=errno.ENOTDIR)
    ctx.close_all()                                  # the importer opens the image itself
    entry = spec.image if spec.path == "/" else f"{spec.image}:{spec.path}"
    try:
        run_module(entry, args.module, list(args.args))
    except SystemExit as exc:
        ctx.status = _exit_code(exc.code)
    except ImportError as err:
        if not _module_not_found(err, args.module):
            _program_error(ctx, err)
            return
        raise CliError(spec.text, str(err)) from err
    except Exception as err:                   # the program's own error: its traceback, as python -m shows
        _program_error(ctx, err)


def _module_not_found(err: ImportError, module: str) -> bool:
    """True when MODULE itself could not be found or run (python -m says so in one line too).

    Such errors come from runpy (the innermost frame is runpy's), or name MODULE or a parent.
    """
    wanted = module.split(".")
    parents = {".".join(wanted[:i]) for i in range(1, len(wanted) + 1)}
    if isinstance(err, ModuleNotFoundError) and err.name in parents:
        return True
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename in ("<frozen runpy>", _runpy_file())


def _runpy_file() -> str:
    import runpy

    return runpy.__file__ or ""


def _program_error(ctx: Context, err: BaseException) -> None:
    """Print the traceback of the program run, from its own frames on (as python -m does)."""
    import traceback

    from . import importer

    ours = {__file__, importer.__file__, _runpy_file(), "<frozen runpy>"}
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None and tb.tb_frame.f_code.co_filename in ours:
        tb = tb.tb_next
    _flush_stdout()
    traceback.print_exception(type(err), err, tb if not ctx.debug else err.__traceback__)
    ctx.status = 1


def cmd_mount(ctx: Context, args: argparse.Namespace) -> None:
    mount = _lazy("fuse", "mount", "mount")
    opts = [o for o in ",".join(args.options).split(",") if o]
    readonly = "ro" in opts
    rest = [o for o in opts if o not in ("ro", "rw")]
    spec = image_spec(args.image, "/")
    ctx.fs(spec.image)                              # one-line errors for a missing or corrupt image
    ctx.close_all()
    if not os.path.isdir(args.mountpoint):
        code = errno.ENOTDIR if os.path.exists(args.mountpoint) else errno.ENOENT
        raise CliError(args.mountpoint, os.strerror(code), code=code)
    with about(spec, local=(args.mountpoint, os.path.abspath(args.mountpoint))):
        mount(spec.image, args.mountpoint, readonly=readonly, foreground=args.foreground,
              options=rest or None)


# -- the parser ---------------------------------------------------------------------------------
EPILOG = """\
IMAGE:PATH names a path inside an image (an image file, a block device, or a POSIX
shared-memory name such as /data for /dev/shm/data). Paths inside are absolute from the
image root. In cp and mv either side may be local; ./a:b is always a local path.

examples:
  xipfs pack ./site /dev/shm/site.img          # a directory tree -> an image in memory
  xipfs check /dev/shm/site.img
  xipfs ls -l /dev/shm/site.img:/static
  xipfs cat /dev/shm/site.img:/index.html
  xipfs cp -rp ./extra /dev/shm/site.img:/     # local -> image
  xipfs run /dev/shm/app.img:/site-packages myapp --port 8000

Run 'xipfs COMMAND --help' for a command's options. --quiet turns progress bars off (they
show only on a terminal); --debug shows tracebacks instead of one-line errors.
"""

ENTRY_KEYS_HELP = ("JSON: a list of entries with the keys " + ", ".join(F.ENTRY_KEYS)
                   + " (type: file, dir, symlink, fifo, socket, char, block; times ISO 8601 UTC "
                   "and *_ns integers; rdev [major, minor] or null; target null unless a symlink).")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps indented lines (examples) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        import textwrap

        out = []
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if any(line.startswith(" ") or line.endswith(":") for line in lines):
                out.append("\n".join(indent + line for line in lines))
            else:
                out.append(textwrap.fill(" ".join(lines), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars and no summaries")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``xipfs`` command, with every subcommand."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="xipfs", parents=[common], formatter_class=HelpFormatter,
        description="Make, pack, inspect and change ext2 images; run and mount them in place.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"xipfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def add(name: str, func: Callable[[Context, argparse.Namespace], None], summary: str, description: str,
            epilog: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=description, epilog=epilog, parents=[common],
                           formatter_class=HelpFormatter, add_help=add_help)
        p.set_defaults(func=func)
        return p

    _add_make(add)
    _add_inspect(add)
    _add_change(add)
    _add_exec(add)
    demo = add("demo", _cmd_demo, "the main job: pack the standard library into /dev/shm and use it",
               "Pack this Python's standard library into an image in /dev/shm, check it, list it, "
               "read every file back, map the largest file in place and import a module from it.")
    demo.add_argument("--image", default=None, help="where to build the image")
    demo.add_argument("--keep", action="store_true", help="keep the image afterwards")
    return parser


def _add_make(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("mkfs", cmd_mkfs, "make a new ext2 filesystem (like mke2fs)",
            "Make an empty ext2 filesystem on IMAGE (a file, created or resized; a block device; a "
            "shared-memory name) without e2fsprogs.",
            "SIZE is bytes, or with a K, M, G, T suffix (powers of 1024). Without SIZE an existing "
            "file keeps its size.\n\nexamples:\n  xipfs mkfs /dev/shm/data.img 1G\n"
            "  xipfs mkfs -b 1024 -I 128 -L small -O ^dir_index small.img 8M")
    p.add_argument("image", metavar="IMAGE", help="a file, a block device or a shared-memory name")
    p.add_argument("size", metavar="SIZE", nargs="?", help="bytes, or with a K, M, G, T suffix")
    p.add_argument("-b", dest="block_size", type=int, default=4096, metavar="BLOCK_SIZE",
                   help="block size in bytes (1024, 2048, 4096, ...; default 4096)")
    p.add_argument("-I", dest="inode_size", type=int, default=256, metavar="INODE_SIZE",
                   help="inode size in bytes (128 or 256; default 256)")
    p.add_argument("-N", dest="inodes", type=int, default=None, metavar="INODES", help="number of inodes")
    p.add_argument("-L", dest="label", default=None, metavar="LABEL", help="volume label (up to 16 bytes)")
    p.add_argument("-U", dest="uuid", default=None, metavar="UUID", help="filesystem UUID (default: random)")
    p.add_argument("-O", dest="features", default=None, metavar="FEATURES",
                   help="features, comma separated: ^name drops a default one, 'none' all of them")
    p.add_argument("-F", "--force", action="store_true", help="make it even over an existing filesystem")
    p.add_argument("--preallocate", action="store_true",
                   help="reserve all the image's memory now (no ENOSPC surprises on tmpfs later)")

    p = add("pack", cmd_pack, "build an image from a directory tree",
            "Build IMAGE from the tree SRC: files, directories, symlinks, hard links, device nodes, "
            "owners, modes, nanosecond times and xattrs; each file's data in one run.",
            "Files that change or vanish while packing are reported and the exit status is 1 "
            "(as tar does).\n\nexamples:\n  xipfs pack ./site /dev/shm/site.img\n"
            "  xipfs pack --size 1G --label app --compile ./venv/lib /dev/shm/app.img")
    p.add_argument("src", metavar="SRC", help="the directory tree to pack")
    p.add_argument("image", metavar="IMAGE", help="the image to make (a file or a shared-memory name)")
    p.add_argument("--size", default=None,
                   help="image size (K/M/G suffixes); default: what SRC needs + --extra")
    p.add_argument("--block-size", type=int, default=4096, help="block size in bytes (default 4096)")
    p.add_argument("--inode-size", type=int, default=256, help="inode size in bytes (default 256)")
    p.add_argument("--extra", type=_extra_arg, default=0.1,
                   help="free room when the size is computed: a fraction of what SRC needs (0.1, "
                        "10%%) or bytes (64M); default 0.1")
    p.add_argument("--label", default=None, help="volume label")
    p.add_argument("--uuid", default=None, help="filesystem UUID (default: random)")
    p.add_argument("--compile", action="store_true", help="add a .pyc for every .py (as py_compile would)")
    p.add_argument("--exclude", metavar="PATTERN", action="append", default=[],
                   help="leave out entries whose name, or path from the top of SRC, matches the glob "
                        "PATTERN (repeatable; e.g. --exclude '*.o' --exclude build/tmp)")

    p = add("unpack", cmd_unpack, "extract an image (or a directory of it) into a local directory",
            "Extract IMAGE[:PATH] into DEST. Nothing is written outside DEST; ownership is kept "
            "only when run as root; hard links stay links.",
            "example:\n  xipfs unpack /dev/shm/site.img:/static ./static")
    p.add_argument("image", metavar="IMAGE[:PATH]", help="the image, or a directory or file in it")
    p.add_argument("dest", metavar="DEST", help="the local directory to extract into (made if missing)")


def _add_inspect(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("info", cmd_info, "show the superblock (like dumpe2fs -h)",
            "Show an image's superblock: geometry, counts, features, state, times, storage.",
            "JSON keys: image, image_size, storage, xip, label, uuid, revision, features, state, "
            "errors_behavior, inodes_count, blocks_count, reserved_blocks, free_blocks, "
            "free_inodes, first_data_block, block_size, inode_size, first_inode, blocks_per_group, "
            "inodes_per_group, inode_blocks_per_group, groups, created, mounted, written, "
            "checked (epoch seconds or null), mount_count, max_mount_count, writable, "
            "readonly_reason.")
    p.add_argument("image", metavar="IMAGE", help="the image to show")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = add("ls", cmd_ls, "list directory contents (like ls)",
            "List the entries of directories inside images (names sorted; dotfiles with -a).",
            ENTRY_KEYS_HELP + "\n\nexamples:\n  xipfs ls -l /dev/shm/site.img:/static\n"
            "  xipfs ls -laR --json site.img | jq '.[].path'", add_help=False)
    p.add_argument("paths", metavar="IMAGE[:PATH]", nargs="+", help="what to list (default PATH: /)")
    p.add_argument("-l", dest="long", action="store_true",
                   help="long listing: mode, links, owner, size, time")
    p.add_argument("-a", "--all", action="store_true", help="show entries starting with '.', and . and ..")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    p.add_argument("-d", "--directory", action="store_true", help="list directories themselves")
    p.add_argument("-h", "--human-readable", dest="human", action="store_true", help="sizes like 4.0K, 13M")
    p.add_argument("--json", action="store_true", help="one JSON list of entries")
    p.add_argument("--help", action="help", help="show this help message and exit")

    p = add("cat", cmd_cat, "write files to standard output",
            "Write the contents of files inside images to standard output, byte for byte.",
            "example:\n  xipfs cat /dev/shm/site.img:/index.html | head")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")

    p = add("stat", cmd_stat, "show a file's inode (like stat)",
            "Show what the inode of each path says, as stat(1) prints it (a symlink itself unless -L).",
            ENTRY_KEYS_HELP + " Each entry also has 'image'.")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")
    p.add_argument("-L", "--dereference", action="store_true", help="follow symlinks")
    p.add_argument("--json", action="store_true", help="one JSON list of entries")

    p = add("df", cmd_df, "show free space (like df -h)",
            "Show each image's size, used and available space (or inodes with -i).",
            "JSON: a list with the keys image, label, block_size, size, used, available (bytes), "
            "use_percent, inodes, inodes_used, inodes_free, inodes_use_percent.")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="images to show")
    p.add_argument("-i", "--inodes", action="store_true", help="inodes instead of blocks")
    p.add_argument("-k", dest="human", action="store_false", default=True,
                   help="1K blocks instead of 4.0K, 13M")
    p.add_argument("--json", action="store_true", help="one JSON list")

    p = add("tree", cmd_tree, "show a directory tree (like tree)",
            "Show the tree below a directory inside an image, with the count line at the end.")
    p.add_argument("path", metavar="IMAGE[:PATH]", help="the directory to show (default PATH: /)")
    p.add_argument("-a", "--all", action="store_true", help="show entries starting with '.'")
    p.add_argument("-d", dest="dirs_only", action="store_true", help="directories only")
    p.add_argument("-L", dest="level", type=int, default=None, metavar="LEVEL", help="descend LEVEL levels")

    p = add("check", cmd_check, "check an image's consistency (like e2fsck -fn)",
            "Check an image read-only, the way e2fsck's passes do: superblock and descriptors, "
            "bitmaps, free counts, link counts, directories, blocks claimed twice, sizes. Exit "
            "status 0 when clean, 1 when problems were found.",
            "JSON keys: image, clean, count, problems (each: code, message, ino, block, path).")
    p.add_argument("image", metavar="IMAGE", help="the image to check (opened read-only)")
    p.add_argument("--json", action="store_true", help="one JSON object")


def _add_change(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("cp", cmd_cp, "copy files into, out of and between images (like cp)",
            "Copy SRC to DEST, or SRCs into the directory DEST. Either side may be IMAGE:PATH or a "
            "local path (image to image works too, the same image or another).",
            "examples:\n  xipfs cp notes.txt data.img:/docs/\n  xipfs cp -rp data.img:/docs ./docs-copy\n"
            "  xipfs cp -r a.img:/lib b.img:/lib")
    p.add_argument("sources", metavar="SRC", nargs="+", help="IMAGE:PATH or a local path")
    p.add_argument("dest", metavar="DEST", help="IMAGE:PATH or a local path")
    p.add_argument("-r", "-R", "--recursive", dest="recursive", action="store_true", help="copy directories")
    p.add_argument("-p", "--preserve", action="store_true", help="keep mode, owner and times")

    p = add("mv", cmd_mv, "move or rename (like mv)",
            "Rename SRC to DEST, or move SRCs into the directory DEST. Within one image this is a "
            "rename; between images (or with a local side) a copy with metadata, then a removal.")
    p.add_argument("sources", metavar="SRC", nargs="+", help="IMAGE:PATH or a local path")
    p.add_argument("dest", metavar="DEST", help="IMAGE:PATH or a local path")

    p = add("mkdir", cmd_mkdir, "make directories (like mkdir)", "Make directories inside images.")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")
    p.add_argument("-p", "--parents", action="store_true",
                   help="make parents as needed; no error if it exists")
    p.add_argument("-m", "--mode", default=None, help="mode of the new directory (octal or symbolic)")

    p = add("rm", cmd_rm, "remove files or directories (like rm)", "Remove entries inside images.")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")
    p.add_argument("-r", "-R", "--recursive", dest="recursive", action="store_true",
                   help="remove directories and what they hold")
    p.add_argument("-f", "--force", action="store_true", help="no error for paths that do not exist")

    p = add("ln", cmd_ln, "make links (like ln)",
            "Make LINK a hard link to TARGET (a path in the same image), or with -s a symbolic link "
            "whose text is TARGET.",
            "examples:\n  xipfs ln -s ../lib/libz.so.1 app.img:/bin/libz.so\n"
            "  xipfs ln app.img:/a app.img:/b")
    p.add_argument("target", metavar="TARGET", help="a path in LINK's image; with -s any text")
    p.add_argument("link", metavar="IMAGE:LINK", help="the link to make (inside it, if a directory)")
    p.add_argument("-s", "--symbolic", action="store_true", help="make a symbolic link")
    p.add_argument("-f", "--force", action="store_true", help="replace an existing LINK")

    p = add("chmod", cmd_chmod, "change permission bits (like chmod)",
            "Change the mode of paths inside images: octal (755) or symbolic (u+x,go-w, a=rX).")
    p.add_argument("mode", metavar="MODE", help="octal (755) or symbolic ([ugoa][-+=][rwxXst], ...)")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")
    p.add_argument("-R", "--recursive", action="store_true", help="change everything below too")

    p = add("chown", cmd_chown, "change owner and group (like chown)",
            "Change owner and group of paths inside images. USER and GROUP are numbers or names "
            "from this machine's passwd and group.",
            "examples:\n  xipfs chown 1000:1000 app.img:/data\n  xipfs chown -R www-data: app.img:/srv",
            add_help=False)
    p.add_argument("owner", metavar="USER[:GROUP]", help="USER, USER:GROUP, USER: (login group), :GROUP")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")
    p.add_argument("-R", "--recursive", action="store_true", help="change everything below too")
    p.add_argument("-h", "--no-dereference", action="store_true",
                   help="change symlinks, not what they point to")
    p.add_argument("--help", action="help", help="show this help message and exit")

    p = add("touch", cmd_touch, "create files or set their times (like touch)",
            "Set access and modification times (to now, or -d DATE); create empty files that do not exist.",
            "DATE is ISO 8601 (2024-05-01, 2024-05-01T12:00:00.5+02:00; local time without a "
            "zone) or @SECONDS since the epoch.")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")
    p.add_argument("-d", "--date", default=None, help="use DATE instead of now")
    p.add_argument("-c", "--no-create", action="store_true", help="do not create missing files")
    p.add_argument("-a", dest="atime_only", action="store_true", help="change the access time only")
    p.add_argument("-m", dest="mtime_only", action="store_true", help="change the modification time only")


def _add_exec(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("run", cmd_run, "run a Python module from an image (like python -m)",
            "Run MODULE from IMAGE (or the directory DIR inside it) as python -m would, importing "
            "straight from the image.",
            "example:\n  xipfs run /dev/shm/app.img:/site-packages http.server 8000")
    p.add_argument("image", metavar="IMAGE[:DIR]", help="the image, or the directory in it to import from")
    p.add_argument("module", metavar="MODULE", help="the module to run as __main__")
    p.add_argument("args", metavar="ARGS", nargs=argparse.REMAINDER, help="its arguments (sys.argv[1:])")

    p = add("mount", cmd_mount, "serve an image through FUSE",
            "Mount IMAGE on MOUNTPOINT through FUSE, so every program can use it; unmount with "
            "fusermount3 -u MOUNTPOINT (or Ctrl-C with -f).",
            "example:\n  xipfs mount -o ro /dev/shm/app.img /mnt/app")
    p.add_argument("image", metavar="IMAGE", help="the image to serve")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                   help="mount options, comma separated (ro for read-only)")
    p.add_argument("-f", "--foreground", action="store_true", help="stay in the foreground")


def _cmd_demo(ctx: Context, args: argparse.Namespace) -> None:
    from . import demo as _demo

    ctx.status = _demo.run(args.image or _demo.DEFAULT_IMAGE, args.keep)


# -- entry points -------------------------------------------------------------------------------
def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run the ``xipfs`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                  # --help, --version, usage errors (2)
        return _exit_code(exc.code)
    if args.command is None:
        parser.print_help()
        return 2
    ctx = Context(args.command, getattr(args, "debug", False), getattr(args, "quiet", False))
    try:
        try:
            args.func(ctx, args)
        finally:
            ctx.close_all()
        _flush_stdout()
    except BrokenPipeError:
        _silence_stdout()
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        if ctx.debug:
            raise
        _flush_stdout()
        print(f"xipfs: {ctx.command}: interrupted", file=sys.stderr)
        return 130
    except CliError as err:
        if ctx.debug:
            raise
        ctx.report(err)
    except OSError as err:                     # not wrapped on the way: still one line
        if ctx.debug:
            raise
        what = os.fsdecode(err.filename) if err.filename is not None else ""
        ctx.report(CliError(what, reason(err)))
    except Exception as err:                   # a bug of xipfs: say so, in one line
        if ctx.debug:
            raise
        ctx.report(CliError("internal error",
                            f"{type(err).__name__}: {err} (run with --debug for the traceback)"))
    return ctx.status


def main_exit() -> None:
    """The console script: run :func:`main` and exit with its status."""
    sys.exit(main())
