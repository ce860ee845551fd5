"""``xipfs fetch URL DEST``: copy a remote image into memory storage, to be read in place."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from .common import CliError, Context, emit


def cmd_fetch(ctx: Context, args: argparse.Namespace) -> None:
    from ..tools.fetch import destination, fetch

    try:
        target = destination(args.dest, args.url)
        n = fetch(args.url, args.dest, progress=ctx.progress, resume=not args.restart)
    except OSError as err:
        from .common import reason

        name = err.filename if isinstance(err.filename, str) else args.url
        raise CliError(name, reason(err), code=err.errno) from err
    if not ctx.quiet:
        from .format import human_size

        emit(f"fetched {args.url} into {target}: {n} bytes ({human_size(n)}) this time")


def _add_fetch(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("fetch", cmd_fetch, "copy a remote image into memory storage (tmpfs, shared memory)",
            "Copy the image at URL (https://, http://, s3://, gs://, file://, an fsspec chain) to "
            "DEST, to be read in place: a path (on tmpfs for XIP), a shared-memory name such as "
            "/models (/dev/shm/models), or a directory (the URL's last name in it). The copy is "
            "written under a temporary name beside DEST (.NAME.xipfs-part) and renamed when whole, "
            "so a reader never attaches half an image; an interrupted fetch continues from there "
            "if the remote object has not changed (its ETag or Last-Modified), and starts again if "
            "it has. The result is checked against the size and, when the store gives one, a "
            "checksum (an S3 ETag that is an MD5, Content-MD5, Digest).",
            "examples:\n  xipfs fetch https://example.org/site.img /dev/shm/site.img\n"
            "  xipfs fetch s3://bucket/models.img /models\n  xipfs ls /models:/")
    p.add_argument("url", metavar="URL", help="the remote image")
    p.add_argument("dest", metavar="DEST", help="a path, a shared-memory name (/name) or a directory")
    p.add_argument("--restart", action="store_true",
                   help="start again from the first byte, even if a partial copy is there")
