"""What every ``xipfs`` subcommand shares: ``IMAGE:PATH`` arguments, a run's open images
and its one-line errors (:class:`Context`), a tree that is an image or a local directory
(:class:`Tree`), and output that survives a closed pipe."""

from __future__ import annotations

import argparse
import builtins
import contextlib
import errno
import os
import posixpath
import re
import stat
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from ..errors import XipfsError

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
class Spec(NamedTuple):
    """One operand: ``image`` None for a local path; ``path`` is inside the image otherwise."""

    text: str
    image: str | None
    path: str


def _shm_exists(name: str) -> bool:
    from ..device.detect import looks_like_shm_name

    return looks_like_shm_name(name) and os.path.exists("/dev/shm/" + name.lstrip("/"))


#: A remote image: ``scheme://host[:port]/path`` with no ':' in its path (what follows a ':'
#: there is the PATH inside the image), after any fsspec chain prefixes (``simplecache::``).
_URL_IMAGE = re.compile(r"(?:[A-Za-z][\w+.\-]*(?:://[^:]*)?::)*[A-Za-z][A-Za-z0-9+.\-]*://[^/:]*(?::\d+)?/[^:]*")


def terminal_width() -> int:
    """What ``shutil.get_terminal_size().columns`` gives, without importing shutil: $COLUMNS
    when a positive number, else the terminal's width, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
        if columns > 0:
            return columns
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def is_url(text: str) -> bool:
    """True if ``text`` names a remote image by URL (``https://host/a.img``, ``s3://b/a.img``)."""
    return bool(_URL_IMAGE.fullmatch(text))


def is_image_name(text: str) -> bool:
    """True if ``text`` names an image: an existing file or device, an existing shm name, a URL."""
    if not text:
        return False
    try:
        st = os.stat(text)
    except (OSError, ValueError):
        return _shm_exists(text) or is_url(text)
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

    def __init__(self, command: str, debug: bool = False, quiet: bool = False, *,
                 partition: int | None = None, offset: int | None = None) -> None:
        self.command = command
        self.debug = debug
        self.quiet = quiet
        self.status = 0
        #: ``--partition N`` / ``--offset BYTES``: where the filesystem lies in every image named.
        self.partition = partition
        self.offset = offset
        self._open: dict[str, Any] = {}

    @property
    def where(self) -> dict[str, int | None]:
        """``partition=`` and ``offset=`` for the library's open and check."""
        return {"partition": self.partition, "offset": self.offset}

    def shown(self, image: str) -> str:
        """``image`` as errors about opening it name it: with its partition or offset, if any."""
        if self.partition is not None:
            return f"{image} (partition {self.partition})"
        if self.offset:
            return f"{image} (offset {self.offset})"
        return image

    def check_partition(self, image: str) -> None:
        """With ``--partition N``: a :class:`CliError` listing the partitions when N is not one."""
        if self.partition is None:
            return
        from ..device import partitions

        try:
            table = partitions(image if os.path.exists(image) else "/dev/shm/" + image.lstrip("/"))
        except OSError as err:
            raise CliError(image, reason(err), code=err.errno) from err
        if table.label is None:
            raise CliError(image, f"no partition table, so no partition {self.partition} "
                                  "(a bare filesystem: leave out --partition)")
        if any(p.number == self.partition for p in table):
            return
        have = ", ".join(f"{p.number} ({p.type_name or p.type}, {_human(p.size)})" for p in table)
        raise CliError(image, f"no partition {self.partition} on this {table.label} disk; it has "
                              + (f"partitions {have}" if have else "no partitions"))

    def open_error(self, image: str, err: Exception) -> CliError:
        """The one-line error for ``err`` met opening ``image`` (with --partition/--offset named)."""
        if isinstance(err, OSError):
            return CliError(self.shown(image), reason(err), code=err.errno)
        return CliError(self.shown(image), str(err.args[0]) if err.args else str(err))

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
        remote = not os.path.exists(image) and is_url(image)
        if not remote and not os.path.exists(image) and not _shm_exists(image):
            raise CliError(image, os.strerror(errno.ENOENT), code=errno.ENOENT)
        if os.path.isdir(image):
            raise CliError(image, os.strerror(errno.EISDIR), code=errno.EISDIR)
        from ..fs import open as xipfs_open

        if not remote:
            self.check_partition(image)
        try:
            fs = xipfs_open(image, "r+" if writable else "r", **self.where)
        except (OSError, ValueError, LookupError) as err:
            raise self.open_error(image, err) from err
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


# -- --partition / --offset -------------------------------------------------------------------
def partition_arg(text: str) -> int:
    """``--partition``: a partition number as Linux numbers it (``2``; ``p2`` and ``loop0p2`` too)."""
    m = re.fullmatch(r"(?:.*p)?(\d+)", text.strip())
    if not m or not 1 <= int(m[1]) < 256:
        raise argparse.ArgumentTypeError(f"invalid partition {text!r} (a number from 1, as in loop0p1)")
    return int(m[1])


def offset_arg(text: str) -> int:
    """``--offset``: bytes (``1048576``), with a K/M/G suffix (``1M``), or 512-byte sectors (``2048s``)."""
    t = text.strip()
    try:
        if t.lower().endswith("s") and t[:-1].isdigit():
            return int(t[:-1]) * 512
        if t.isdigit():
            return int(t)
        from .format import parse_size

        return parse_size(t)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid offset {text!r} (bytes, with a K/M/G suffix, or sectors as 2048s)") from None


def add_where(p: argparse.ArgumentParser) -> None:
    """Give a subcommand ``--partition N`` and ``--offset BYTES`` (one or the other)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("--partition", type=partition_arg, default=None, metavar="N",
                   help="use partition N of a whole-disk image (MBR or GPT, numbered as Linux "
                        "numbers loop0pN; see 'xipfs parts'); applies to every image named")
    g.add_argument("--offset", type=offset_arg, default=None, metavar="BYTES",
                   help="use the filesystem that starts at byte BYTES (K/M/G suffixes, or 2048s "
                        "for sectors of 512 bytes); applies to every image named")


def _human(n: int) -> str:
    from .format import human_size

    return human_size(n)


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


def _exit_code(code: object) -> int:
    """The exit status a ``SystemExit`` code stands for (a message is printed, then 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1
