"""Extract a tree from an ext2 image into a real directory, safely: ``xipfs.unpack``.

Safety comes from the kernel, not from string checks alone: every entry is created relative to
an open descriptor of its directory (``openat``-style calls with ``dir_fd=``), with
``O_NOFOLLOW``/``O_EXCL``, and a name is always one path component. So nothing the image
contains (names with ``/`` or ``..``, absolute or escaping symlinks, a symlink and a file of
the same name, a directory linked twice) and nothing already in the destination (a planted
symlink) can make a write land outside ``dest_dir``. Symlink targets are data, never followed.

Speed: file data goes from the image to the new file in the kernel (``copy_file_range``: no
page faults on the mapping, no Python buffer; a plain write from the image's view where that is
not possible), one ``open``/copy/``futimens``/``close`` per file; holes stay holes (the block
map says where they are). Plain files with one link and no xattrs whose blocks lie in a row (at
most 12 direct blocks, or those and one indirect block up to 1 MiB: most files) are made
straight from their raw inode, a directory's worth at a time, by the walking thread and a helper
thread together when there are many; large files are copied by a second thread while the walk
goes on.
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import stat
import sys
import threading
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFREG, S_IFSOCK, S_ISREG

from ..device import MemoryDevice
from ..errors import CorruptImageError, XipfsError
from ..extfs import layout as L
from ..extfs.inode import Inode
from ..extfs.namei import readlink, resolve
from ..extfs.volume import Volume
from ..extfs.xattr import read_xattrs
from ..fs import Filesystem, PathArg, current_umask
from ..fs import open as open_image
from ..progress import Progress, ProgressArg, progress_bar
from . import no_gc

__all__ = ["UnpackResult", "unpack"]

_O_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_O_PATH_DIR = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

#: Errors about one entry of the destination: reported in ``skipped``, the rest goes on.
#: Anything else (ENOSPC, EIO, EMFILE, ...) stops the extraction.
_ENTRY_ERRNOS = frozenset({
    errno.EPERM, errno.EACCES, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
    errno.ENAMETOOLONG, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTEMPTY, errno.EBUSY,
    errno.ETXTBSY, errno.EROFS, errno.ENOENT, errno.EMLINK, errno.ERANGE, errno.E2BIG,
})
#: Files this large are copied by a second thread while the walk goes on (the copy runs in the
#: kernel without the GIL, so it overlaps the Python work of the small files around it). On
#: the stdlib image 1 MiB gains as much as 128 KiB on an idle machine (about a tenth) and costs
#: less on a busy one, where a second thread competes for the cores.
_BACKGROUND_MIN = 1 << 20
#: Largest piece written from a view of the image when copy_file_range cannot be used.
_PIECE = 16 << 20
#: copy_file_range cannot be used between these two files: fall back to writing from the image.
_NO_CFR = frozenset({errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS, errno.EBADF,
                     errno.EIO})

_IBODY_MAGIC = L.XATTR_IBODY_HEADER.struct.unpack_from
#: Block pointers read as a native array only where native is the on-disk little-endian.
_LITTLE = sys.byteorder == "little"
#: In-inode xattrs start at ``_IBODY + i_extra_isize`` and need ``_IBODY_END + i_extra_isize``
#: bytes of inode for their magic.
_IBODY = L.INODE.size
_IBODY_END = L.INODE.size + L.XATTR_IBODY_HEADER.size
_DIRENT = L.DIRENT.struct.unpack_from
_I_BLOCK = L.I_BLOCK.unpack
#: The fields of a large inode the lean path of small files reads.
_LEAN_INODE = L.INODE_LARGE.select(
    "i_mode", "i_uid", "i_size", "i_atime", "i_mtime", "i_gid", "i_links_count", "i_flags",
    "i_block", "i_file_acl", "i_size_high", "i_uid_high", "i_gid_high", "i_extra_isize",
    "i_mtime_extra", "i_atime_extra").unpack_from
_NS = 1_000_000_000


@dataclass
class UnpackResult:
    """What :func:`unpack` extracted, and what it left out and why.

    ``files``, ``symlinks``, ``others`` (FIFOs, sockets, device nodes): inodes made;
    ``hardlinks``: names beyond an inode's first (made with ``link``); ``dirs``: directories,
    the extracted one included; ``bytes``: file data written; ``skipped``: ``(image path, reason)``.
    """

    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    others: int = 0
    bytes: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)


def unpack(image: PathArg | Filesystem, dest_dir: PathArg, path: PathArg = "/", *,
           progress: ProgressArg = None) -> UnpackResult:
    """Extract ``path`` of ``image`` into ``dest_dir`` (created if missing); returns the counts.

    ``image`` is an image path, a shared-memory name (opened read-only) or an open
    :class:`~xipfs.Filesystem`. A directory's contents go into ``dest_dir`` (which also gets
    the directory's mode, owner, times and xattrs when ``unpack`` created it); a file, symlink
    or special file goes to ``dest_dir/<its name>``. An empty ``/lost+found`` at the image root
    is left out. Existing entries of the destination are replaced (never written through),
    existing directories merged. Ownership is kept when running as root, device nodes are made
    only by root; what cannot be made is reported in ``skipped``, as are entries of the image
    that are unsafe or damaged. An error that is not about one entry (no space, an I/O error)
    stops the extraction and is raised; the file being written then is removed.
    """
    with no_gc():
        if isinstance(image, Filesystem):
            return _Unpacker(image, progress).run(dest_dir, path)
        with open_image(image) as fs:
            return _Unpacker(fs, progress).run(dest_dir, path)


def _join(top: str, name: str) -> str:
    return top + name if top.endswith("/") else top + "/" + name


def _reason(err: OSError) -> str:
    if isinstance(err, XipfsError):
        return str(err)
    return err.strerror or str(err)


class _Frame:
    """A directory being filled: its descriptor, the entries left, what to set when it is done."""

    __slots__ = ("fd", "entries", "node", "path", "rel", "gid", "set_meta", "batched", "batch")

    def __init__(self, fd: int, entries: list[tuple[str, tuple[int, int]]], node: Inode, path: str,
                 rel: tuple[str, ...], gid: int, set_meta: bool) -> None:
        self.fd = fd
        self.entries = entries
        self.node = node
        self.path = path            # in the image, for messages
        self.rel = rel              # names from dest_dir down to here
        self.gid = gid              # the group a new entry gets here (setgid directories)
        self.set_meta = set_meta
        self.batched = False        # its small plain files made already (:meth:`_Unpacker._lean_batch`)
        self.batch: _Batch | None = None    # or being made by the helper thread meanwhile


class _Unpacker:
    """One extraction: the image side, the destination side, and the counts."""

    def __init__(self, fs: Filesystem, progress: ProgressArg) -> None:
        self.fs = fs
        self.vol: Volume = fs.volume
        self.bs = self.vol.bs
        self.device = fs.device
        self.result = UnpackResult()
        self.skipped = self.result.skipped
        self.progress_arg = progress
        self.bar: Progress | None = None
        self.root = os.geteuid() == 0
        self.uid, self.egid = os.geteuid(), os.getegid()
        self.umask = current_umask()
        #: inode -> (directory names from dest_dir, name) of its first extracted name.
        self.links: dict[int, tuple[tuple[str, ...], str]] = {}
        self.dirs_seen: set[int] = set()
        # The image's descriptor for copy_file_range: where reading it is the same as reading
        # the filesystem's own view (a shared mapping of it, or nothing cached that is dirty).
        self.src_fd = -1
        try:
            fd = self.device.fileno()
        except (OSError, AttributeError, NotImplementedError):
            fd = -1
        if fd >= 0 and (self.device.is_xip or fs.readonly):
            self.src_fd = fd
        self.root_fd = -1
        self.copier: _Copier | None = None
        #: Small plain files are made straight from the raw inode (large inodes only).
        self.lean = self.vol.isize >= 160
        #: The whole image as one view when it is mapped memory (inodes read in place).
        self.whole: memoryview | None = self.device.buffer if type(self.device) is MemoryDevice else None
        self.helper: _Helper | None = None
        self.cores: int | None = None

    # -- the whole job ----------------------------------------------------------------------
    def run(self, dest_dir: PathArg, path: PathArg) -> UnpackResult:
        p = os.fsdecode(os.fspath(path)) or "/"
        node = resolve(self.vol, p, p.endswith("/") or p.strip("/") == "")
        dest = os.fspath(dest_dir)
        created = not os.path.lexists(dest)
        os.makedirs(dest, exist_ok=True)
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._start_progress(node)
            gid = self._new_gid(os.fstat(self.root_fd))
            if node.is_dir:
                top = "/" + p.strip("/") if p.strip("/") else "/"
                self.dirs_seen.add(node.ino)
                self.result.dirs += 1
                frame = _Frame(self.root_fd, self._entries(node, top), node, top, (), gid, created)
            else:
                name = p.rstrip("/").rpartition("/")[2]
                frame = _Frame(self.root_fd, [(name, (node.ino, 0))], node, p.rpartition("/")[0] or "/",
                               (), gid, False)
            self._fill(frame)
        except BaseException:
            if self.copier is not None:         # the first error is the one to see
                with contextlib.suppress(BaseException):
                    self.copier.close()
            raise
        else:
            if self.copier is not None:
                self.copier.close()
        finally:
            if self.helper is not None:
                self.helper.close()
            os.close(self.root_fd)
            if self.bar is not None:
                self.bar.close()
        return self.result

    def _start_progress(self, node: Inode) -> None:
        bar = progress_bar(self.progress_arg, 0, "unpack", "B")
        if type(bar) is Progress:            # nobody is watching: no counting pass
            return
        self.bar = bar
        bar.add_total(self._total_bytes(node))

    def _total_bytes(self, top: Inode) -> int:
        """File bytes below ``top`` (each inode once): the total of the progress bar."""
        total = 0
        seen: set[int] = set()
        stack = [top]
        vol = self.vol
        while stack:
            node = stack.pop()
            if node.ino in seen:
                continue
            seen.add(node.ino)
            if node.is_reg:
                total += node.size
            elif node.is_dir:
                try:
                    entries = vol.dir_index(node).entries.values()
                    stack.extend(vol.inode(ino) for ino, _ in entries)
                except OSError:
                    continue
        return total

    # -- the image side ---------------------------------------------------------------------
    def _entries(self, node: Inode, path: str) -> list[tuple[str, tuple[int, int]]]:
        """The entries of directory ``node``, last first (taken with ``pop``); damaged ones are
        reported and left out."""
        try:
            items = list(self.vol.dir_index(node).entries.items())
        except CorruptImageError as err:
            self.skipped.append((path, f"{err} (salvaging the valid entries)"))
            items = self._salvage(node, path)
        if path == "/" and node.ino == L.ROOT_INO:
            items = [(n, e) for n, e in items if not (n == "lost+found" and self._empty_dir(e[0]))]
        items.reverse()
        return items

    def _empty_dir(self, ino: int) -> bool:
        try:
            node = self.vol.inode(ino)
            return node.is_dir and not self.vol.dir_index(node).entries
        except OSError:
            return False

    def _salvage(self, node: Inode, path: str) -> list[tuple[str, tuple[int, int]]]:
        """The valid entries of a damaged directory, every invalid one reported."""
        vol = self.vol
        bs = self.bs
        out: dict[str, tuple[int, int]] = {}
        skip = self.skipped
        try:
            runs = node.map.runs(0, node.size // bs)
        except OSError as err:
            skip.append((path, f"directory unreadable: {_reason(err)}"))
            return []
        live = 0
        for lblk, count, pblk in runs:
            if not pblk:
                continue
            for i in range(count):
                buf = vol.device.view((pblk + i) * bs, bs)
                pos = 0
                while pos + 12 <= bs:
                    ino, rec_len, name_len, ftype = _DIRENT(buf, pos)
                    if rec_len < 12 or rec_len & 3 or pos + rec_len > bs or 8 + name_len > rec_len:
                        skip.append((path, f"directory block {lblk + i}: entry at offset {pos} is "
                                           "damaged; the rest of the block is left out"))
                        break
                    if ino:
                        raw = bytes(buf[pos + 8:pos + 8 + name_len])
                        live += 1
                        if live <= 2 and raw == (b"." if live == 1 else b".."):
                            pass
                        elif (not raw or b"/" in raw or b"\0" in raw or raw in (b".", b"..")
                              or ino > vol.inodes_count):
                            skip.append((_join(path, os.fsdecode(raw)),
                                         f"invalid directory entry {raw!r} -> inode {ino}"))
                        else:
                            name = os.fsdecode(raw)
                            if name in out:
                                skip.append((_join(path, name), "duplicate name in the directory"))
                            else:
                                out[name] = (ino, ftype if vol.filetype else 0)
                    pos += rec_len
        return list(out.items())

    def _has_xattrs(self, node: Inode) -> bool:
        """Whether ``node`` has extended attributes (cheap: an xattr block, or the in-inode magic)."""
        if node.file_acl:
            return True
        extra = node.extra_isize
        vol = self.vol
        if not extra or _IBODY_END + extra > vol.isize:
            return False
        group, index = divmod(node.ino - 1, vol.ipg)
        off = vol.groups[group].inode_table * self.bs + index * vol.isize + _IBODY + extra
        return _IBODY_MAGIC(vol.device.view(off, L.XATTR_IBODY_HEADER.size), 0)[0] == L.XATTR_MAGIC

    # -- the walk ---------------------------------------------------------------------------
    def _fill(self, first: _Frame) -> None:
        """Extract every entry below ``first``: depth first, a directory's metadata after its contents."""
        stack = [first]
        try:
            while stack:
                frame = stack[-1]
                child = self._fill_some(frame)
                if child is not None:
                    stack.append(child)
                else:
                    stack.pop()
                    self._finish_dir(frame)
        except BaseException:
            if self.helper is not None:         # its files are in these directories: it stops first
                self.helper.close()
            for frame in stack:                 # an error that stops everything: no fd leaks
                if frame.fd != self.root_fd:
                    os.close(frame.fd)
            raise

    def _fill_some(self, frame: _Frame) -> _Frame | None:
        """Extract the entries of ``frame`` up to its next subdirectory, which is returned (or None)."""
        vol = self.vol
        inode = vol.inode
        result = self.result
        skipped = self.skipped
        links = self.links
        bar = self.bar
        if self.lean and not frame.batched:
            frame.batched = True
            self._lean_batch(frame)
        entries = frame.entries
        while entries:
            name, (ino, ftype) = entries.pop()
            if "/" in name or "\0" in name or name == "." or name == ".." or not name:
                skipped.append((_join(frame.path, name), "unsafe name"))
                continue
            try:
                node = inode(ino)
                mode = node.mode
                if node.links == 0 and (mode == 0 or node.dtime):
                    raise CorruptImageError(f"entry points to deleted inode {ino}")
                fmt = S_IFMT(mode)
                if fmt == S_IFDIR:
                    child = self._enter_dir(frame, name, node)
                    if child is not None:
                        return child
                    continue
                if node.links > 1:
                    first_name = links.get(ino)
                    if first_name is not None and self._link(frame, name, first_name):
                        result.hardlinks += 1
                        continue
                if fmt == S_IFREG:
                    self._file(frame, name, node)
                    result.files += 1
                    result.bytes += node.size
                    if bar is not None:
                        bar.update(node.size)
                elif fmt == S_IFLNK:
                    self._symlink(frame, name, node)
                    result.symlinks += 1
                elif fmt in (S_IFIFO, S_IFSOCK, S_IFCHR, S_IFBLK):
                    if not self._special(frame, name, node, fmt):
                        continue
                    result.others += 1
                else:
                    skipped.append((_join(frame.path, name), f"unknown file type 0o{fmt:o}"))
                    continue
                if node.links > 1 and ino not in links:
                    links[ino] = (frame.rel, name)
            except OSError as err:
                self._entry_failed(frame, name, err)
        return None

    def _entry_failed(self, frame: _Frame, name: str, err: OSError) -> None:
        if not _is_entry_error(err):
            raise err
        self.skipped.append((_join(frame.path, name), _reason(err)))

    # -- the destination side ---------------------------------------------------------------
    def _new_gid(self, st: os.stat_result) -> int:
        """The group a new entry gets in a directory with status ``st``."""
        return st.st_gid if st.st_mode & stat.S_ISGID else self.egid

    def _replace(self, dfd: int, name: str) -> None:
        """Make room for a new entry ``name``: remove what is there unless it is a directory."""
        try:
            os.unlink(name, dir_fd=dfd)
        except IsADirectoryError:
            raise FileExistsError(errno.EEXIST, "a directory of that name is in the way") from None
        except PermissionError as err:      # Linux says EPERM for unlink of a directory
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                raise err from None
            if stat.S_ISDIR(st.st_mode):
                raise FileExistsError(errno.EEXIST, "a directory of that name is in the way") from None
            raise

    def _lean_batch(self, frame: _Frame) -> None:
        """Make the small plain files of ``frame`` (most of a tree) before anything else there:
        each decoded straight from its raw inode (:meth:`_lean_job`), then made, by this thread
        and a helper thread together when there are many (:class:`_Helper`: the helper starts
        at once, the walk goes on, and the rest is made here when the directory is done); the
        other entries stay in ``frame.entries`` for the general path."""
        rest: list[tuple[str, tuple[int, int]]] = []
        jobs: list[tuple] = []
        job_of = self._lean_job
        for entry in frame.entries:
            name, (ino, ftype) = entry
            if ftype > L.FT_REG or "/" in name or "\0" in name or name in (".", "..") or not name:
                rest.append(entry)
                continue
            try:
                job = job_of(name, ino)
            except OSError as err:
                self._entry_failed(frame, name, err)
                continue
            if job is None:
                rest.append(entry)
            else:
                jobs.append(job)
        frame.entries = rest
        if not jobs:
            return
        if len(jobs) >= _HELPER_MIN and self._helper_ok():
            if self.helper is None:
                self.helper = _Helper()
            frame.batch = self.helper.submit(self._make_lean, frame.fd, frame.gid, jobs)
            return                              # made meanwhile; done when the directory is
        failures: list[tuple[str, OSError]] = []
        self._count(frame, _make_all(self._make_lean, frame.fd, frame.gid, iter(jobs), failures), failures)

    def _count(self, frame: _Frame, done: tuple[int, int], failures: list[tuple[str, OSError]]) -> None:
        """Add ``(files, bytes)`` made in ``frame`` to the counts; report its failures."""
        result = self.result
        result.files += done[0]
        result.bytes += done[1]
        if self.bar is not None:
            self.bar.update(done[1])
        for name, err in failures:
            self._entry_failed(frame, name, err)

    def _complete(self, frame: _Frame) -> None:
        """The helper's batch of ``frame`` made whole: what it has not taken is made here."""
        batch, frame.batch = frame.batch, None
        assert batch is not None and self.helper is not None
        failures: list[tuple[str, OSError]] = []
        self._count(frame, self.helper.finish(batch, failures), failures)

    def _helper_ok(self) -> bool:
        """Whether a second thread can make files beside this one (two cores to run on)."""
        if self.cores is None:
            try:
                self.cores = len(os.sched_getaffinity(0))
            except (AttributeError, OSError):
                self.cores = os.cpu_count() or 1
        return self.cores > 1

    def _lean_job(self, name: str, ino: int) -> tuple | None:
        """What making file ``name`` (inode ``ino``) takes, when it is the common case: a plain
        file of at most 12 blocks in one run, one link, no xattrs, decoded straight from its raw
        inode (no Inode object); None when it is anything else (the general path takes it, and
        checks it). A run outside the data area raises."""
        vol = self.vol
        bs = self.bs
        if not 0 < ino <= vol.inodes_count:
            return None
        group, index = divmod(ino - 1, vol.ipg)
        isize = vol.isize
        at = vol.itable_at[group] + index * isize
        raw = self.whole                                # the mapped image: no view to make
        if raw is None or at + isize > len(raw):
            raw, at = vol.device.view(at, isize), 0
        (mode, uid_lo, size_lo, atime, mtime, gid_lo, links, flags, i_block, file_acl, size_high,
         uid_hi, gid_hi, extra, m_x, a_x) = _LEAN_INODE(raw, at)
        if (not S_ISREG(mode) or links != 1 or file_acl or flags & L.FL_FOREIGN_FORMAT
                or extra < 16 or extra & 3 or _IBODY_END + extra > isize
                or _IBODY_MAGIC(raw, at + _IBODY + extra)[0] == L.XATTR_MAGIC):
            return None
        size = size_lo | (size_high << 32)
        n = -(-size // bs)
        first = 0
        if n > L.N_DIRECT:
            src: int | tuple[tuple[int, int, int], ...] | None = self._indirect_pieces(i_block, n, size, ino)
            if src is None:
                return None
        elif n:
            words = _I_BLOCK(i_block)
            first = words[0]
            if not first or words[n - 1] != first + n - 1 or (
                    n > 2 and words[:n] != tuple(range(first, first + n))):
                return None
            vol.check_data_run(first, n, ino)
            src = first * bs
        else:
            src = 0
        atime_ns = (atime + ((a_x & 3) << 32)) * _NS + (a_x >> 2)
        mtime_ns = (mtime + ((m_x & 3) << 32)) * _NS + (m_x >> 2)
        uid, gid = uid_lo | (uid_hi << 16), gid_lo | (gid_hi << 16)
        return name, mode, size, src, uid, gid, atime_ns, mtime_ns

    def _indirect_pieces(self, i_block: bytes, n: int, size: int,
                         ino: int) -> tuple[tuple[int, int, int], ...] | None:
        """The data pieces ``(image offset, file offset, length)`` of a file of ``n`` blocks
        mapped by 12 direct blocks in a row and one indirect block of pointers in a row (what
        mke2fs -d and pack make of a file up to 4 MiB), or None when the map is anything else
        (or the file is copied in the background: the general path takes it)."""
        bs = self.bs
        m = n - L.N_DIRECT
        if m > bs // 4 or size >= _BACKGROUND_MIN or not _LITTLE:
            return None
        words = _I_BLOCK(i_block)
        first, ind = words[0], words[L.IND_BLOCK]
        if (not first or not ind or words[L.DIND_BLOCK] or words[L.TIND_BLOCK] or words[11] != first + 11
                or words[:12] != tuple(range(first, first + 12))):
            return None
        vol = self.vol
        vol.check_data_run(ind, 1, ino, "indirect block")
        ptrs = array("I")
        ptrs.frombytes(vol.device.view(ind * bs, m * 4))
        start = ptrs[0]
        if not start or ptrs[m - 1] != start + m - 1 or (
                m > 2 and ptrs != array("I", range(start, start + m))):
            return None
        vol.check_data_run(first, L.N_DIRECT, ino)
        vol.check_data_run(start, m, ino)
        direct = L.N_DIRECT * bs
        if start == first + L.N_DIRECT:
            return ((first * bs, 0, size),)
        return ((first * bs, 0, direct), (start * bs, direct, size - direct))

    def _make_lean(self, dfd: int, gid_here: int, job: tuple) -> None:
        """Make one file of a :meth:`_lean_job` in directory ``dfd``: create, copy, owner and
        mode where they differ from what creating gave, times; removed again if that fails."""
        name, mode, size, src, uid, gid, atime_ns, mtime_ns = job
        try:
            fd = os.open(name, _O_CREATE, mode & 0o777, dir_fd=dfd)
        except FileExistsError:
            self._replace(dfd, name)
            fd = os.open(name, _O_CREATE, mode & 0o777, dir_fd=dfd)
        done = False
        try:
            if type(src) is not int:                    # a larger file: its pieces
                for at, dst, k in src:
                    self._copy_run(fd, at, dst, k)
            elif size:
                self._copy_run(fd, src, 0, size)
            if self.root and (uid != self.uid or gid != gid_here):
                os.fchown(fd, uid, gid)
            perm = mode & 0o7777
            if perm != perm & 0o777 & ~self.umask:
                os.fchmod(fd, perm)
            os.utime(fd, ns=(atime_ns, mtime_ns))
            done = True
        finally:
            os.close(fd)
            if not done:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dfd)

    def _file(self, frame: _Frame, name: str, node: Inode) -> None:
        dfd = frame.fd
        mode = node.mode
        size = node.size
        # the image side first: a damaged block map is found before anything is created
        pieces = self._pieces(node) if size else []
        try:
            fd = os.open(name, _O_CREATE, mode & 0o777, dir_fd=dfd)
        except FileExistsError:
            self._replace(dfd, name)
            fd = os.open(name, _O_CREATE, mode & 0o777, dir_fd=dfd)
        done = handed_over = False
        try:
            if size >= _BACKGROUND_MIN:
                self._background().submit(fd, dfd, name, pieces, node, frame.gid, frame.path)
                handed_over = True
                return
            if size:
                self._copy(fd, pieces, size)
            self._file_meta(fd, node, frame.gid, frame.path, name)
            done = True
        finally:
            if not handed_over:
                os.close(fd)
                if not done:                    # no half-written file stays behind
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dfd)

    def _file_meta(self, fd: int, node: Inode, gid_here: int, top: str, name: str) -> None:
        """After the data (a write by a non-root user clears set-id bits and capabilities): owner,
        mode, xattrs, times."""
        perm = node.mode & 0o7777
        if self.root and (node.uid != self.uid or node.gid != gid_here):
            os.fchown(fd, node.uid, node.gid)   # (clears set-id bits: the mode comes after)
        if perm != perm & 0o777 & ~self.umask:
            os.fchmod(fd, perm)
        if (node.file_acl or node.extra_isize) and self._has_xattrs(node):
            self._xattrs(fd, node, _join(top, name))
        os.utime(fd, ns=(node.atime_ns, node.mtime_ns))

    def _pieces(self, node: Inode) -> list[tuple[int, int, int]]:
        """``(image offset, file offset, length)`` of every piece of data of a regular file."""
        bs = self.bs
        size = node.size
        whole = self._whole_run(node)
        if whole:
            return [(whole * bs, 0, size)]
        pieces = []
        for lblk, count, pblk in node.map.runs(0, node.map.nblocks):
            if pblk:
                start = lblk * bs
                pieces.append((pblk * bs, start, min(count * bs, size - start)))
        return pieces

    def _copy(self, fd: int, pieces: list[tuple[int, int, int]], size: int) -> None:
        """Write a file's data pieces; holes are skipped (they stay holes), the size set at the end."""
        end = 0
        for src, dst, n in pieces:
            self._copy_run(fd, src, dst, n)
            end = dst + n
        if end < size:
            os.ftruncate(fd, size)

    def _background(self) -> _Copier:
        if self.copier is None:
            self.copier = _Copier(self)
        return self.copier

    def _whole_run(self, node: Inode) -> int:
        """The first device block when all of a small file's blocks are one run, else 0.

        What the block map's own shortcut finds, without building the map (most files).
        """
        n = -(-node.size // self.bs)
        if n > L.N_DIRECT or node.flags & L.FL_FOREIGN_FORMAT or node._map is not None:
            return node.map.whole
        words = _I_BLOCK(node.i_block)
        first = words[0]
        if not first or words[n - 1] != first + n - 1 or (
                n > 2 and words[:n] != tuple(range(first, first + n))):
            return node.map.whole
        self.vol.check_data_run(first, n, node.ino)
        return first

    def _copy_run(self, fd: int, src: int, dst: int, n: int) -> None:
        """``n`` bytes from image offset ``src`` to file offset ``dst``, in the kernel when it can."""
        if self.src_fd >= 0:
            src_fd = self.src_fd
            cfr = os.copy_file_range
            try:
                while n:
                    done = cfr(src_fd, fd, n, src + self.device.base_offset, dst)
                    if done <= 0:
                        break                   # past the end of the image: the view path says why
                    src += done
                    dst += done
                    n -= done
            except OSError as err:
                if err.errno not in _NO_CFR:
                    raise
                self.src_fd = -1
        while n:                                # (a page-cache view is a copy: bounded pieces)
            view = self.device.view(src, min(n, _PIECE))
            while view:
                done = os.pwrite(fd, view, dst)
                view = view[done:]
                src += done
                dst += done
                n -= done

    def _xattrs(self, target: int | str, node: Inode, path: str) -> None:
        """Set ``node``'s xattrs on ``target`` (a descriptor or a no-follow path); failures reported."""
        follow = isinstance(target, int)         # a descriptor: nothing to follow
        for key, value in read_xattrs(self.vol, node):
            try:
                os.setxattr(target, key, value, follow_symlinks=follow)
            except OSError as err:
                if err.errno not in _ENTRY_ERRNOS and err.errno != errno.ENOSPC:
                    raise
                self.skipped.append((path, f"xattr {key}: {_reason(err)}"))

    def _enter_dir(self, frame: _Frame, name: str, node: Inode) -> _Frame | None:
        """Make (or reuse) directory ``name`` and open it, never through a symlink."""
        path = _join(frame.path, name)
        if node.ino in self.dirs_seen:
            self.skipped.append((path, f"directory inode {node.ino} already extracted "
                                       "(a directory linked twice: corrupt image)"))
            return None
        self.dirs_seen.add(node.ino)
        dfd = frame.fd
        try:
            os.mkdir(name, 0o700, dir_fd=dfd)
            made = True
        except FileExistsError:
            made = False
        try:
            fd = os.open(name, _O_DIR, dir_fd=dfd)
        except OSError as err:
            if made or err.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EACCES):
                raise
            if err.errno == errno.EACCES:        # a closed directory an earlier run made
                self._open_up(dfd, name)
            else:                                # a symlink or a file of that name: replace it
                self._replace(dfd, name)
                os.mkdir(name, 0o700, dir_fd=dfd)
                made = True
            fd = os.open(name, _O_DIR, dir_fd=dfd)
        self.result.dirs += 1
        try:
            st = os.fstat(fd)
            if not self.root and st.st_mode & 0o700 != 0o700:
                # room to work in (a strict umask, a closed directory from an earlier run);
                # the image's mode is set when the directory is done
                os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)
            entries = self._entries(node, path)
            gid = self._new_gid(st)
        except BaseException:
            os.close(fd)
            raise
        return _Frame(fd, entries, node, path, (*frame.rel, name), gid, True)

    @staticmethod
    def _open_up(dfd: int, name: str) -> None:
        """Give the owner access to directory ``name`` (a path-only descriptor needs no access;
        chmod through it reaches that very directory, never a symlink)."""
        pfd = os.open(name, _O_PATH_DIR, dir_fd=dfd)
        try:
            mode = os.fstat(pfd).st_mode
            os.chmod(f"/proc/self/fd/{pfd}", stat.S_IMODE(mode) | 0o700)
        finally:
            os.close(pfd)

    def _finish_dir(self, frame: _Frame) -> None:
        """A directory's contents are done (its helper's batch made whole first): owner, mode,
        xattrs, times; then close it."""
        fd = frame.fd
        if frame.batch is not None:
            try:
                self._complete(frame)
            except BaseException:
                if fd != self.root_fd:
                    os.close(fd)
                raise
        if fd == self.root_fd:
            if frame.set_meta:
                self._dir_meta(frame)
            return
        try:
            self._dir_meta(frame)
        except OSError as err:
            if not isinstance(err, XipfsError) and err.errno not in _ENTRY_ERRNOS:
                raise
            self.skipped.append((frame.path, _reason(err)))
        finally:
            os.close(fd)

    def _dir_meta(self, frame: _Frame) -> None:
        fd, node = frame.fd, frame.node
        if self.root:
            os.fchown(fd, node.uid, node.gid)
        os.fchmod(fd, node.mode & 0o7777)
        if self._has_xattrs(node):
            self._xattrs(fd, node, frame.path)
        os.utime(fd, ns=(node.atime_ns, node.mtime_ns))

    def _symlink(self, frame: _Frame, name: str, node: Inode) -> None:
        target = readlink(self.vol, node)
        dfd = frame.fd
        try:
            os.symlink(target, name, dir_fd=dfd)
        except FileExistsError:
            self._replace(dfd, name)
            os.symlink(target, name, dir_fd=dfd)
        self._special_meta(frame, name, node)

    def _special(self, frame: _Frame, name: str, node: Inode, fmt: int) -> bool:
        """A FIFO, socket or device node (devices as root only); False when it was skipped."""
        if fmt in (S_IFCHR, S_IFBLK) and not self.root:
            self.skipped.append((_join(frame.path, name), "device node: only root can make one"))
            return False
        dfd = frame.fd
        rdev = os.makedev(*node.rdev) if fmt in (S_IFCHR, S_IFBLK) else 0
        perm = node.mode & 0o777
        try:
            os.mknod(name, fmt | perm, rdev, dir_fd=dfd)
        except FileExistsError:
            self._replace(dfd, name)
            os.mknod(name, fmt | perm, rdev, dir_fd=dfd)
        self._special_meta(frame, name, node)
        mode = node.mode & 0o7777
        if mode != perm & ~self.umask:
            os.chmod(name, mode, dir_fd=dfd)
        return True

    def _special_meta(self, frame: _Frame, name: str, node: Inode) -> None:
        """Owner, xattrs and times of an entry that cannot be opened (symlink, FIFO, device)."""
        dfd = frame.fd
        if self.root and (node.uid != self.uid or node.gid != frame.gid):
            os.chown(name, node.uid, node.gid, dir_fd=dfd, follow_symlinks=False)
        if self._has_xattrs(node):
            # the directory by its descriptor, the last name not followed
            self._xattrs(f"/proc/self/fd/{dfd}/{name}", node, _join(frame.path, name))
        os.utime(name, ns=(node.atime_ns, node.mtime_ns), dir_fd=dfd, follow_symlinks=False)

    def _link(self, frame: _Frame, name: str, first: tuple[tuple[str, ...], str]) -> bool:
        """``name`` as another name of an inode extracted before. False when that cannot be
        done (the first name is gone; a mount point between them; no access): the entry is
        then made as a file of its own, and a link that could not be kept is reported."""
        rel, first_name = first
        dfd = frame.fd
        sfd = dfd
        opened: list[int] = []
        try:
            if rel != frame.rel:
                sfd = self.root_fd
                for part in rel:                # path-only descriptors: search access is enough
                    sfd = os.open(part, _O_PATH_DIR, dir_fd=sfd)
                    opened.append(sfd)
            return self._link_from(sfd, first_name, dfd, name)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                return False
            if err.errno not in (errno.EXDEV, errno.EMLINK, errno.EACCES, errno.EPERM):
                raise
            first_path = "/".join((*rel, first_name))
            self.skipped.append((_join(frame.path, name), f"not a hard link to {first_path!r} as in the "
                                                          f"image ({_reason(err)}): a copy of its own"))
            return False
        finally:
            for fd in opened:
                os.close(fd)

    def _link_from(self, sfd: int, src: str, dfd: int, name: str) -> bool:
        try:
            os.link(src, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileExistsError:
            self._replace(dfd, name)
            os.link(src, name, src_dir_fd=sfd, dst_dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True


class _Copier:
    """A second thread that copies the data of large files, sets their times and closes them.

    The walk hands over a file it has created (and given its owner, mode and xattrs); nothing
    it does later depends on that file's data, so the copies overlap the rest of the work.
    The first error stops the copies and is raised by :meth:`close`.
    """

    def __init__(self, unpacker: _Unpacker) -> None:
        self.unpacker = unpacker
        self.jobs: queue.Queue[tuple[int, int, str, list[tuple[int, int, int]], Inode, int, str] | None] \
            = queue.Queue(maxsize=64)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="xipfs-unpack-copy", daemon=True)
        self.thread.start()

    def submit(self, fd: int, dfd: int, name: str, pieces: list[tuple[int, int, int]], node: Inode,
               gid_here: int, top: str) -> None:
        """Copy ``pieces`` into ``fd``, give it ``node``'s metadata, close it: ``fd`` is the
        copier's once this returns. ``name`` in directory ``dfd`` (a duplicate descriptor is
        kept) goes again if that fails; ``top`` is the directory's path in the image."""
        if self.error is not None:
            self.close()                        # raises it; ``fd`` is still the caller's
        self.jobs.put((fd, os.dup(dfd), name, pieces, node, gid_here, top))

    def _run(self) -> None:
        unpacker = self.unpacker
        while True:
            job = self.jobs.get()
            if job is None:
                return
            fd, dfd, name, pieces, node, gid_here, top = job
            done = False
            try:
                if self.error is None:
                    unpacker._copy(fd, pieces, node.size)
                    unpacker._file_meta(fd, node, gid_here, top, name)
                    done = True
            except BaseException as err:  # noqa: BLE001 - handed to the walking thread
                self.error = err
            finally:
                os.close(fd)
                if not done:                    # no half-written file stays behind
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dfd)
                os.close(dfd)

    def close(self) -> None:
        """Wait for the copies handed over so far; raise the first error one of them met."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()
        if self.error is not None:
            err, self.error = self.error, None
            raise err


#: Makes one small file: ``make(directory descriptor, its group, job)``.
_Make = Callable[[int, int, tuple], None]
#: A directory with at least this many small plain files has them made by two threads.
_HELPER_MIN = 16


def _is_entry_error(err: OSError) -> bool:
    """An error of one entry (skipped and named), not of the whole unpack (raised)."""
    return isinstance(err, XipfsError) or err.errno in _ENTRY_ERRNOS


def _make_all(make: Callable[[int, int, tuple], None], dfd: int, gid: int, jobs: Iterator[tuple],
              failures: list[tuple[str, OSError]]) -> tuple[int, int]:
    """Run ``make(dfd, gid, job)`` for the jobs taken from ``jobs`` (shared with another thread:
    taking one is atomic); ``(files made, bytes)``, the entries' own failures appended to
    ``failures`` (anything else is raised)."""
    files = nbytes = 0
    for job in jobs:
        try:
            make(dfd, gid, job)
        except OSError as err:
            if not _is_entry_error(err):         # no space, an I/O error: stop, as one thread would
                raise
            failures.append((job[0], err))
            continue
        files += 1
        nbytes += job[2]
    return files, nbytes


class _Batch:
    """A directory's small files handed to the helper thread: the jobs (one shared iterator),
    where to make them, and what the helper made of them."""

    __slots__ = ("make", "jobs", "dfd", "gid", "state", "done", "files", "nbytes", "failures", "error")

    QUEUED, RUNNING, DONE = 0, 1, 2

    def __init__(self, make: _Make, jobs: list[tuple], dfd: int, gid: int) -> None:
        self.make = make
        self.jobs = iter(jobs)
        self.dfd = dfd
        self.gid = gid
        self.state = _Batch.QUEUED
        self.done = threading.Event()
        self.files = self.nbytes = 0
        self.failures: list[tuple[str, OSError]] = []
        self.error: BaseException | None = None


class _Helper:
    """A second thread that makes small files while the walk goes on.

    The walk hands over a directory's batch and carries on (decoding the next directories,
    making the other entries); the helper makes the batch's files in the order given. When the
    directory is done, :meth:`finish` makes what the helper has not taken yet (the two take
    jobs from one shared iterator: taking one is atomic) and waits for the file the helper is
    making, so the directory's descriptor and metadata stay the walk's. The system calls of one
    thread (create, copy, times, close: most of the time, run without the GIL) overlap the
    other's Python.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.work: queue.SimpleQueue[_Batch | None] = queue.SimpleQueue()
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="xipfs-unpack-files", daemon=True)
        self.thread.start()

    def submit(self, make: _Make, dfd: int, gid: int, jobs: list[tuple]) -> _Batch:
        """Start making ``jobs`` in directory ``dfd``; :meth:`finish` it before ``dfd`` closes."""
        batch = _Batch(make, jobs, dfd, gid)
        self.work.put(batch)
        return batch

    def finish(self, batch: _Batch, failures: list[tuple[str, OSError]]) -> tuple[int, int]:
        """Make what is left of ``batch`` here, wait for the helper's part; ``(files, bytes)``
        made, every entry's failure appended to ``failures``; another error raised."""
        error: BaseException | None = None
        try:
            files, nbytes = _make_all(batch.make, batch.dfd, batch.gid, batch.jobs, failures)
        except BaseException as err:  # noqa: BLE001 - raised once the helper's part is done
            files, nbytes, error = 0, 0, err
        with self.lock:
            running = batch.state == _Batch.RUNNING
            if batch.state == _Batch.QUEUED:
                batch.state = _Batch.DONE           # the helper skips it
        if running:
            batch.done.wait()
        failures.extend(batch.failures)
        if error is not None:
            raise error
        if batch.error is not None:
            raise batch.error
        return files + batch.files, nbytes + batch.nbytes

    def _run(self) -> None:
        while True:
            batch = self.work.get()
            if batch is None:
                return
            with self.lock:
                if batch.state != _Batch.QUEUED or self.stopped:
                    continue
                batch.state = _Batch.RUNNING
            try:
                batch.files, batch.nbytes = _make_all(batch.make, batch.dfd, batch.gid, batch.jobs,
                                                      batch.failures)
            except BaseException as err:  # noqa: BLE001 - handed to the walking thread
                batch.error = err
            finally:
                with self.lock:
                    batch.state = _Batch.DONE
                batch.done.set()

    def close(self) -> None:
        """Stop: no batch is started any more; the one being made is finished first."""
        if not self.thread.is_alive():
            return
        with self.lock:
            self.stopped = True
        self.work.put(None)
        self.thread.join()
