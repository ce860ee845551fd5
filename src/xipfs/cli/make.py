"""Subcommands that make images: ``mkfs``, ``pack``, ``unpack``."""

from __future__ import annotations

import argparse
import builtins
import errno
import os
from collections.abc import Callable
from typing import Any

from . import format as F
from .common import CliError, Context, Spec, _lazy, _shm_exists, about, emit, image_spec


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
    from ..extfs.mkfs import mkfs

    image = args.image
    spec = Spec(image, None, image)
    size = _size_arg(args.size, "size") if args.size else None
    if args.label is not None and len(args.label.encode()) > 16:
        raise CliError(args.label, "volume label longer than 16 bytes", status=2)
    ext4 = _ext4_options(args)
    if not args.force and _holds_ext2(image):
        raise CliError(image, "already holds an ext2 filesystem (use -F to make a new one over it)")
    features = [f for f in args.features.split(",") if f] if args.features else None
    with about(spec):
        try:
            mkfs(image, size, block_size=args.block_size, inode_size=args.inode_size, inodes=args.inodes,
                 label=args.label, uuid=args.uuid, features=features, preallocate=args.preallocate,
                 fs_type=args.fs_type, **ext4)
        except ValueError as err:
            raise CliError(image, str(err)) from err
    if not ctx.quiet:
        fs = ctx.fs(image)
        sb = fs.volume.sb
        label = f", label {sb.label!r}" if sb.label else ""
        emit(f"{image}: {args.fs_type}, {sb.block_size}-byte blocks, {sb.s_blocks_count} blocks "
             f"({F.human_size(sb.s_blocks_count * sb.block_size)}), {sb.s_inodes_count} inodes, "
             f"{F.plural(sb.groups, 'block group', 'block groups')}{label}, UUID {sb.uuid}")


#: ``-E`` options (as mke2fs names them) and how each is read.
_EXTENDED = {"hash_seed": str, "orphan_file_size": "size", "lazy_itable_init": None,
             "lazy_journal_init": None, "discard": None, "nodiscard": None}


def _ext4_options(args: argparse.Namespace) -> dict[str, Any]:
    """The ext4-only keyword arguments of :func:`xipfs.mkfs` from -J, -E, -m, -i, -G."""
    out: dict[str, Any] = {}
    given = [name for name, value in (("-J", args.journal), ("-E", args.extended), ("-m", args.reserved),
                                       ("-i", args.inode_ratio), ("-G", args.flex_bg_size))
             if value is not None]
    if args.fs_type != "ext4":
        if given:
            raise CliError(args.image, f"{', '.join(given)}: only with -t ext4", status=2)
        return out
    for item in (args.journal or "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key != "size" or not value:
            raise CliError(item, "journal option: xipfs takes only size=MiB (0: no journal)", status=2)
        try:
            out["journal_size"] = int(value) << 20
        except ValueError:
            raise CliError(item, "journal size is a whole number of MiB", status=2) from None
    for item in (args.extended or "").split(","):
        if not item:
            continue
        key, _, value = item.partition("=")
        if key not in _EXTENDED:
            raise CliError(item, "extended option: xipfs takes " + ", ".join(sorted(_EXTENDED)), status=2)
        kind = _EXTENDED[key]
        if kind is str:
            out[key] = value
        elif kind == "size":
            out[key] = _size_arg(value, key)
        # the others ask for what xipfs always does (zeroed tables and journal, no discard)
    if args.reserved is not None:
        out["reserved_percent"] = args.reserved
    if args.inode_ratio is not None:
        out["inode_ratio"] = args.inode_ratio
    if args.flex_bg_size is not None:
        out["flex_bg_size"] = args.flex_bg_size
    return out


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
    pack = _lazy("tools.pack", "pack", "pack")
    image = args.image
    if not os.path.isdir(args.src):
        code = errno.ENOTDIR if os.path.exists(args.src) else errno.ENOENT
        raise CliError(args.src, os.strerror(code), code=code)
    size = _size_arg(args.size, "size") if args.size else None
    if args.features is not None and args.fs_type != "ext4":
        raise CliError(args.features, "-O: only with -t ext4", status=2)
    if args.dax and args.fs_type != "ext4":
        raise CliError(image, "--dax: only with -t ext4 (ext2 has no DAX flag)", status=2)
    with about(Spec(image, None, image)):
        try:
            result = pack(args.src, image, size=size, block_size=args.block_size, inode_size=args.inode_size,
                          extra=args.extra, label=args.label, uuid=args.uuid, progress=ctx.progress,
                          compile=args.compile, exclude=args.exclude, fs_type=args.fs_type,
                          features=args.features, dax=args.dax)
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
    unpack = _lazy("tools.unpack", "unpack", "unpack")
    spec = image_spec(args.image, "/")
    fs = ctx.fs(spec.image)                     # the one-line errors for a missing or bad image
    with about(spec, local=(args.dest, os.path.abspath(args.dest))):
        result = unpack(fs, args.dest, spec.path, progress=ctx.progress)
    for path, why in result.skipped:
        ctx.report(CliError(f"{spec.image}:{os.fsdecode(path)}", f"not unpacked: {why}"))
    if not ctx.quiet:
        emit(f"unpacked {spec.text} into {args.dest}: {_counts(result)}")



def _add_make(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("mkfs", cmd_mkfs, "make a new ext2 or ext4 filesystem (like mke2fs)",
            "Make an empty ext2 or ext4 filesystem on IMAGE (a file, created or resized; a block "
            "device; a shared-memory name) without e2fsprogs. With -t ext4 it is what mke2fs -t ext4 "
            "of e2fsprogs 1.47 makes: journal, flex_bg, 64bit, metadata_csum, orphan file.",
            "SIZE is bytes, or with a K, M, G, T suffix (powers of 1024). Without SIZE an existing "
            "file keeps its size.\n\nexamples:\n  xipfs mkfs /dev/shm/data.img 1G\n"
            "  xipfs mkfs -b 1024 -I 128 -L small -O ^dir_index small.img 8M\n"
            "  xipfs mkfs -t ext4 /dev/shm/data4.img 4G\n"
            "  xipfs mkfs -t ext4 -J size=0 -O ^metadata_csum -E hash_seed=$(uuidgen) small4.img 64M")
    p.add_argument("image", metavar="IMAGE", help="a file, a block device or a shared-memory name")
    p.add_argument("size", metavar="SIZE", nargs="?", help="bytes, or with a K, M, G, T suffix")
    p.add_argument("-t", dest="fs_type", choices=("ext2", "ext4"), default="ext2",
                   help="filesystem type (default ext2)")
    p.add_argument("-b", dest="block_size", type=int, default=None, metavar="BLOCK_SIZE",
                   help="block size in bytes (1024, 2048, 4096, ...; default 4096, for ext4 by size as "
                        "mke2fs: 1024 below 512 MiB)")
    p.add_argument("-I", dest="inode_size", type=int, default=None, metavar="INODE_SIZE",
                   help="inode size in bytes (128 or 256; default 256)")
    p.add_argument("-J", dest="journal", default=None, metavar="size=MIB",
                   help="ext4: journal size in MiB (default by size, as mke2fs; 0: no journal)")
    p.add_argument("-E", dest="extended", default=None, metavar="OPTIONS",
                   help="ext4: extended options, comma separated: hash_seed=UUID, orphan_file_size=SIZE")
    p.add_argument("-m", dest="reserved", type=float, default=None, metavar="PERCENT",
                   help="ext4: blocks reserved for root, in percent (default 5)")
    p.add_argument("-i", dest="inode_ratio", type=int, default=None, metavar="BYTES_PER_INODE",
                   help="ext4: bytes per inode (default by size, as mke2fs)")
    p.add_argument("-G", dest="flex_bg_size", type=int, default=None, metavar="GROUPS",
                   help="ext4: block groups per flex group (default 16)")
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
            "  xipfs pack --size 1G --label app --compile ./venv/lib /dev/shm/app.img\n"
            "  xipfs pack -t ext4 ./site /dev/shm/site4.img\n"
            "  xipfs pack -t ext4 --dax ./models /dev/shm/models.img")
    p.add_argument("src", metavar="SRC", help="the directory tree to pack")
    p.add_argument("-t", "--type", dest="fs_type", choices=("ext2", "ext4"), default="ext2",
                   help="filesystem type (default ext2; ext4: mke2fs -t ext4's features and journal)")
    p.add_argument("-O", dest="features", default=None, metavar="FEATURES",
                   help="ext4: features, comma separated, as mke2fs -O (e.g. ^metadata_csum)")
    p.add_argument("--dax", action="store_true",
                   help="ext4: set the DAX flag (chattr +x) on every file and directory, for a dax=inode "
                        "mount (files of 2 MiB or more start 2 MiB-aligned either way)")
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
