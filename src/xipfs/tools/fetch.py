"""``xipfs fetch``: copy a remote image into memory storage, for execute-in-place.

The copy is written under a temporary name beside the destination (``.NAME.xipfs-part``) and
renamed when it is whole and verified, so a reader never attaches half an image. An interrupted
fetch continues from what is there with a range request, if the object has not changed since
(its ETag or Last-Modified, remembered beside the part); a changed object starts again. The
result is checked against the size and, when the store gives one, a checksum (an S3 ETag that is
an MD5, ``Content-MD5``, ``Digest``/``Repr-Digest``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
from typing import Any

from ..device.detect import looks_like_shm_name
from ..device.remote import DEFAULT_TIMEOUT, RemoteInfo, Restarted, Source, open_source
from ..progress import ProgressArg, progress_bar

#: Bytes per piece of a download (one write to the destination, one progress step).
CHUNK = 4 * 1024 * 1024
#: Where POSIX shared-memory objects live as files (``/models`` is ``/dev/shm/models``).
SHM_DIR = "/dev/shm"
PART_SUFFIX = ".xipfs-part"


def destination(dest: str | os.PathLike[str], url: str = "") -> str:
    """The file ``dest`` names: a path, a shm name (``/models`` with no other slash, not an
    existing path: ``/dev/shm/models``), or an existing directory (the URL's last name in it)."""
    path = os.fspath(dest)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if looks_like_shm_name(path, bare=False) and not os.path.exists(path):
        return os.path.join(SHM_DIR, path[1:])
    if os.path.isdir(path):
        name = url.split("::")[-1].rstrip("/").rpartition("/")[2].partition("?")[0]
        if not name:
            raise IsADirectoryError(errno.EISDIR, "a directory; name the file to fetch into", path)
        return os.path.join(path, name)
    return path


def part_path(target: str) -> str:
    """The temporary name a fetch into ``target`` writes (beside it, hidden)."""
    head, tail = os.path.split(target)
    return os.path.join(head, f".{tail}{PART_SUFFIX}")


def fetch(url: str, dest: str | os.PathLike[str], *, progress: ProgressArg = None,
          resume: bool = True, timeout: float = DEFAULT_TIMEOUT) -> int:
    """Copy the remote image ``url`` to ``dest`` (a path on tmpfs, or a shm name such as
    ``/models``); the number of bytes fetched by this call (less than the size after a resume).

    Raises ``OSError`` naming the URL when the server fails, or ``OSError(EIO)`` when the copy
    does not match the size or checksum the store gave (the partial copy is then removed).
    ``OSError(EBUSY)`` when another process is fetching into the same destination.
    """
    target = destination(dest, url)
    part = part_path(target)
    for attempt in range(2):
        source = open_source(url, timeout=timeout, need_ranges=False)
        try:
            return _fetch_into(source, url, target, part, progress, resume)
        except _Changed:
            if attempt:
                raise
        finally:
            source.close()
    raise AssertionError("unreachable")


def _fetch_into(source: Source, url: str, target: str, part: str, progress: ProgressArg,
                resume: bool) -> int:
    info = source.info
    meta = part + ".meta"
    fd = _open_locked(part, target)
    try:
        have = os.fstat(fd).st_size
        same = resume and getattr(source, "ranges", True) and _read_meta(meta) == _meta_text(url, info)
        offset = have if same and have <= info.size else 0
        if offset == 0:
            os.ftruncate(fd, 0)
            _write_meta(meta, url, info)
        fetched = _download(source, info, fd, offset, progress, target) if offset < info.size else 0
        _verify(fd, info, part)
        os.fsync(fd)
        os.rename(part, target)          # still locked: no other fetch takes this part meanwhile
        _remove(meta)
    finally:
        os.close(fd)
    return fetched


def _open_locked(part: str, target: str) -> int:
    """``part`` opened (created if need be) and locked for this fetch; EBUSY while another holds
    it. A part another fetch renamed into place between our open and our lock is let go, and a
    new one made (it would otherwise be the finished image, written again)."""
    while True:
        fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OSError(errno.EBUSY, "another process is fetching into this destination", target) from None
        try:
            if os.path.samestat(os.stat(part), os.fstat(fd)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _download(source: Source, info: RemoteInfo, fd: int, offset: int, progress: ProgressArg,
              target: str) -> int:
    """Append the object from ``offset`` to ``fd``; bytes fetched. A changed object restarts."""
    with progress_bar(progress, info.size, f"fetch {os.path.basename(target)}") as bar:
        bar.update(offset)
        try:
            return _append(source, info, fd, offset, bar)
        except Restarted:
            os.ftruncate(fd, 0)
            raise _Changed() from None


class _Changed(OSError):
    """The object changed between two fetches; the part was emptied (``fetch`` starts again)."""

    def __init__(self) -> None:
        super().__init__(errno.ESTALE, "the remote object changed during the fetch")


def _append(source: Source, info: RemoteInfo, fd: int, offset: int, bar: Any) -> int:
    validator = info.etag if info.etag and not info.etag.startswith("W/") else info.last_modified
    done = 0
    pos = offset
    with contextlib.closing(source.stream(offset, CHUNK, validator)) as pieces:
        for piece in pieces:       # an interruption closes the download's connection at once
            _pwrite_all(fd, piece, pos)
            pos += len(piece)
            done += len(piece)
            bar.update(len(piece))
    return done


def _pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    while data:
        n = os.pwrite(fd, data, pos)
        data = data[n:]
        pos += n


def _verify(fd: int, info: RemoteInfo, part: str) -> None:
    """The copy has the size the store gave, and its checksum when there is one."""
    size = os.fstat(fd).st_size
    problem = None
    if size != info.size:
        problem = f"got {size} bytes, the store says {info.size}"
    elif info.md5 is not None or info.sha256 is not None:
        algo, want = ("sha256", info.sha256) if info.sha256 is not None else ("md5", info.md5)
        got = _hash_file(fd, algo)
        if got != want:
            problem = f"{algo} {got.hex()} differs from the store's {want.hex() if want else '?'}"
    if problem is not None:
        os.ftruncate(fd, 0)
        _remove(part)
        _remove(part + ".meta")
        raise OSError(errno.EIO, f"the fetched image is not the remote one: {problem}", part)


def _hash_file(fd: int, algo: str) -> bytes:
    h = hashlib.new(algo)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    pos = 0
    while True:
        n = os.preadv(fd, [view], pos)
        if n <= 0:
            return h.digest()
        h.update(view[:n])
        pos += n


def _meta_text(url: str, info: RemoteInfo) -> str:
    return f"{url}\n{info.validator()}\n"


def _read_meta(meta: str) -> str | None:
    try:
        with open(meta, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _write_meta(meta: str, url: str, info: RemoteInfo) -> None:
    with open(meta, "w", encoding="utf-8") as f:
        f.write(_meta_text(url, info))


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
