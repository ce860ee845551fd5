"""Subcommands that use an image in place: ``run`` (python -m from the image), ``mount``
(FUSE), ``demo`` (the main job)."""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from collections.abc import Callable

from .common import CliError, Context, _exit_code, _flush_stdout, _lazy, about, image_spec


# -- run / mount --------------------------------------------------------------------------------
def cmd_run(ctx: Context, args: argparse.Namespace) -> None:
    run_module = _lazy("importer", "run_module", "run")
    spec = image_spec(args.image, "/")
    fs = ctx.fs(spec.image)
    if ctx.partition is not None or ctx.offset:
        # the importer opens images by name; a window of a disk is not one (yet)
        raise CliError(ctx.shown(spec.image), "run imports from whole images only, not from a "
                       "partition or offset (xipfs unpack it, or dd it out to an image of its own)")
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

    from .. import importer

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
    why = ctx.fs(spec.image).volume.sb.readonly_reason    # one-line errors for a missing or bad image
    ctx.close_all()
    if not os.path.isdir(args.mountpoint):
        code = errno.ENOTDIR if os.path.exists(args.mountpoint) else errno.ENOENT
        raise CliError(args.mountpoint, os.strerror(code), code=code)
    whole = ctx.partition is None and not ctx.offset
    if not whole and not args.foreground:
        raise CliError(ctx.shown(spec.image), "mounting a partition or offset needs -f (the background "
                       "server opens the image by name)", status=2)
    with about(spec, local=(args.mountpoint, os.path.abspath(args.mountpoint))):
        if whole:
            mount(spec.image, args.mountpoint, readonly=readonly, foreground=args.foreground,
                  options=rest or None)
            return
        from ..device import open_container

        if why and not readonly:                   # said here: the server would name a device object
            print(f"xipfs: mount: {ctx.shown(spec.image)}: image can only be opened read-only: {why}; "
                  "mounting read-only", file=sys.stderr)
            readonly = True
        try:
            device = open_container(spec.image, readonly=readonly, **ctx.where)
        except OSError as err:                     # a sparse image, a read-only file: serve it read-only
            if readonly or err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise
            device = open_container(spec.image, readonly=True, **ctx.where)
        try:
            mount(device, args.mountpoint, readonly=readonly, foreground=True, options=rest or None)
        finally:
            device.close()



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
