"""The ``xipfs`` command: make, pack, inspect and change ext2 images like a directory tree.

Subcommands follow the Unix tools they echo (mke2fs, dumpe2fs -h, ls, cat, cp, mkdir, rm, mv,
ln, chmod, chown, touch, stat, df, tree, e2fsck -n) and the e2tools convention ``IMAGE:PATH``
for a path inside an image. Writing commands open the image ``"r+"`` (one writer at a time),
reading ones read-only. User errors print one line ``xipfs: COMMAND: WHAT: WHY`` on stderr and
exit 1 (2 for usage errors); ``--debug`` shows the traceback instead.

One module per family of subcommands (``make``, ``show``, ``edit``, ``run``), what they share
in ``common``, the output formats in ``format``, the main job in ``demo``; the parser and the
entry points here.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from importlib import import_module

from .. import __version__
from .common import (
    BROKEN_PIPE_STATUS,
    CliError,
    Context,
    _exit_code,
    _flush_stdout,
    _silence_stdout,
    add_where,
    any_spec,
    image_spec,
    reason,
    terminal_width,
)

__all__ = ["main", "main_exit", "build_parser", "image_spec", "any_spec", "BROKEN_PIPE_STATUS"]

# -- the parser ---------------------------------------------------------------------------------
EPILOG = """\
IMAGE:PATH names a path inside an image (an image file, a block device, a POSIX
shared-memory name such as /data for /dev/shm/data, or for reading a URL such as
https://host/a.img, read lazily by range requests). Paths inside are absolute from the
image root. In cp and mv either side may be local; ./a:b is always a local path.

examples:
  xipfs pack ./site /dev/shm/site.img          # a directory tree -> an image in memory
  xipfs check /dev/shm/site.img
  xipfs ls -l /dev/shm/site.img:/static
  xipfs cat /dev/shm/site.img:/index.html
  xipfs cp -rp ./extra /dev/shm/site.img:/     # local -> image
  xipfs run /dev/shm/app.img:/site-packages myapp --port 8000
  xipfs parts disk.img                         # its partitions, as sfdisk -l
  xipfs ls https://host/site.img:/static       # a remote image, read by range requests
  xipfs fetch https://host/site.img /site      # copied into shared memory /dev/shm/site
  xipfs ls --partition 2 disk.img:/etc         # inside partition 2

A whole disk (MBR or GPT; 'xipfs parts' lists it): --partition N picks a partition,
--offset BYTES a filesystem at that byte; Android sparse images are read as they are.

Run 'xipfs COMMAND --help' for a command's options. --quiet turns progress bars off (they
show only on a terminal); --debug shows tracebacks instead of one-line errors.
"""

#: The families of subcommands: the module that makes them, its function that adds their
#: parsers, and their names. A command imports its own family's module only.
FAMILIES = (
    ("make", "_add_make", ("mkfs", "pack", "unpack")),
    ("show", "_add_inspect", ("info", "ls", "cat", "stat", "df", "tree", "check")),
    ("edit", "_add_change", ("cp", "mv", "mkdir", "rm", "ln", "chmod", "chown", "touch")),
    ("run", "_add_exec", ("run", "mount")),
    ("disk", "_add_disk", ("parts", "unsparse")),
    ("fetch", "_add_fetch", ("fetch",)),
)

#: Subcommands that open images and so take --partition and --offset.
WHERE_COMMANDS = ("info", "ls", "cat", "stat", "df", "tree", "check", "unpack", "cp", "mv", "mkdir", "rm",
                  "ln", "chmod", "chown", "touch", "run", "mount")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Wraps prose paragraphs to the terminal; keeps indented lines (examples) as written."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: int | None = None) -> None:
        if width is None:             # argparse would import shutil for this on every command
            width = terminal_width() - 2
        super().__init__(prog, indent_increment, max_help_position, width)

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


def _demo(ctx: Context, args: argparse.Namespace) -> None:
    from .run import _cmd_demo

    _cmd_demo(ctx, args)


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, formatter_class=HelpFormatter)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show tracebacks instead of one-line errors")
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="no progress bars and no summaries")
    return common


class _Unused:
    """Stands for the parser of a subcommand not being run: takes its arguments, builds nothing."""

    def __getattr__(self, name: str) -> Callable[..., _Unused]:
        return lambda *args, **kwargs: self


def _subcommand(argv: list[str]) -> str | None:
    """The subcommand ``argv`` runs, when no option before it asks for the whole parser."""
    for arg in argv:
        if arg in ("-h", "--help", "--version"):
            return None
        if not arg.startswith("-"):
            return arg
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of the ``xipfs`` command, with every subcommand (``only``: with the
    one subcommand that will run, the others named but not built: a command starts faster)."""
    common = _common()
    parser = argparse.ArgumentParser(
        prog="xipfs", parents=[common], formatter_class=HelpFormatter,
        description="Make, pack, inspect and change ext2 and ext4 images (whole disks "
                    "and Android sparse images too); run and mount them in place.",
        epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"xipfs {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    def add(name: str, func: Callable[[Context, argparse.Namespace], None], summary: str, description: str,
            epilog: str | None = None, add_help: bool = True) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Unused()                      # type: ignore[return-value]
        p = sub.add_parser(name, help=summary, description=description, epilog=epilog, parents=[common],
                           formatter_class=HelpFormatter, add_help=add_help)
        p.set_defaults(func=func)
        return p

    for module, adder, names in FAMILIES:
        if only is None or only in names:
            getattr(import_module(f".{module}", __package__), adder)(add)
    for name in WHERE_COMMANDS:
        if name in sub.choices:
            add_where(sub.choices[name])
    demo = add("demo", _demo, "the main job: pack the standard library into /dev/shm and use it",
               "Pack this Python's standard library into an image in /dev/shm, check it, list it, "
               "read every file back, map the largest file in place and import a module from it.")
    demo.add_argument("--image", default=None, help="where to build the image")
    demo.add_argument("--keep", action="store_true", help="keep the image afterwards")
    parser.subcommands = list(sub.choices)       # type: ignore[attr-defined]  (the ones built)
    return parser


# -- entry points -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """Run the ``xipfs`` command with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    if argv is None:
        argv = sys.argv[1:]
    only = _subcommand(argv)
    parser = build_parser(only)
    if only is not None and not getattr(parser, "subcommands", None):
        parser = build_parser()                   # not a subcommand: the whole parser says so
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:                  # --help, --version, usage errors (2)
        return _exit_code(exc.code)
    if args.command is None:
        parser.print_help()
        return 2
    ctx = Context(args.command, getattr(args, "debug", False), getattr(args, "quiet", False),
                  partition=getattr(args, "partition", None), offset=getattr(args, "offset", None))
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
