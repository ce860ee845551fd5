"""Subcommands that change the tree: ``cp``, ``mv``, ``mkdir``, ``rm``, ``ln``, ``chmod``,
``chown``, ``touch``."""

from __future__ import annotations

import argparse
import errno
import os
import posixpath
import stat
import time
from collections.abc import Callable, Iterator
from typing import Any

from . import format as F
from .common import CHUNK, CliError, Context, Spec, Tree, _image_split, _inner, any_spec, image_spec


def _umask() -> int:
    """The process umask (``xipfs.fs.current_umask``, imported only when a command needs it)."""
    from ..fs import current_umask

    return current_umask()


# -- cp / mv ------------------------------------------------------------------------------------
class Copier:
    """Copies between two :class:`Tree` sides the way ``cp`` does (``-r``, ``-p``)."""

    def __init__(self, ctx: Context, recursive: bool, preserve: bool, bar: Any) -> None:
        self.ctx = ctx
        self.recursive = recursive
        self.preserve = preserve
        self.bar = bar
        self.umask = _umask()
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
        # a sparse source (fewer blocks than its size, as cp's --sparse=auto judges) keeps its
        # holes: a chunk of zeros is skipped over, not written (a 5 GiB sparse file out of an
        # image took 5 GiB of disk)
        sparse = st.st_blocks * 512 < st.st_size
        with src.open_read(sp) as fin, dst.open_write(dp) as fout:
            buf = memoryview(bytearray(min(CHUNK, max(st.st_size, 1))))
            zeros = bytes(len(buf)) if sparse else b""    # (bytes == bytes is a memcmp; a view's is not)
            pos = 0
            while True:
                n = src.call(sp, fin.readinto, buf)
                if not n:
                    break
                if sparse and (buf.tobytes() == zeros if n == len(buf) else buf[:n].tobytes() == zeros[:n]):
                    dst.call(dp, fout.seek, n, os.SEEK_CUR)
                else:
                    self._write_all(dst, dp, fout, buf[:n])
                pos += n
                self.bar.update(n)
            if sparse and pos:
                dst.call(dp, fout.truncate, pos)       # the size, when it ends in a hole
        self._finish(dst, dp, st, new)

    @staticmethod
    def _write_all(dst: Tree, dp: str, fout: Any, data: memoryview) -> None:
        """Write all of ``data`` (short writes continued; none at all is ENOSPC)."""
        done = 0
        while done < len(data):
            wrote = dst.call(dp, fout.write, data[done:])
            if not wrote:
                raise CliError(dst.show(dp), os.strerror(errno.ENOSPC), code=errno.ENOSPC)
            done += wrote

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
    from ..progress import progress_bar

    total = sum(_bytes_to_copy(t, s.path, args.recursive) for s, t in sources)
    with progress_bar(ctx.progress, total, "cp", "B") as bar:
        copier = Copier(ctx, args.recursive, args.preserve, bar)
        for spec, tree in sources:
            with ctx.each():
                copier.copy(tree, spec.path, dst_tree, _target_path(spec, dest, dest_is_dir))


def cmd_mv(ctx: Context, args: argparse.Namespace) -> None:
    sources, dest, dst_tree, dest_is_dir = _sources_and_target(ctx, [*args.sources, args.dest], True)
    from ..progress import progress_bar

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
        return F.apply_mode(text, mode, _umask())
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
    umask = _umask()
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
