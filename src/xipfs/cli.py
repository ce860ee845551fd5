"""The ``xipfs`` command: subcommands over images."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import XipfsError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="xipfs", description="Execute-in-place ext2 images.")
    parser.add_argument("--version", action="version", version=f"xipfs {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser("demo", help="build an image in /dev/shm with mke2fs -d and read it in place")
    demo.add_argument("--image", default=None, help="where to build the image")
    demo.add_argument("--keep", action="store_true", help="keep the image afterwards")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        if args.command == "demo":
            from . import demo as _demo

            return _demo.run(args.image or _demo.DEFAULT_IMAGE, args.keep)
    except (OSError, XipfsError) as err:
        if args.debug:
            raise
        print(f"xipfs: {err}", file=sys.stderr)
        return 1
    return 0
