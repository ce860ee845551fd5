"""Choosing a device for an image: memory (XIP) where the storage is memory, file otherwise."""

from __future__ import annotations

import ctypes
import errno
import os
import stat

from .._libc import libc
from .base import Device
from .file import FileDevice, PageCache
from .memory import MemoryDevice

#: Filesystems whose file pages *are* the storage: mapping them maps the storage itself.
MEMORY_FILESYSTEMS = frozenset({"tmpfs", "hugetlbfs", "ramfs", "shm"})


def mount_of(path: str | os.PathLike[str]) -> tuple[str, str, frozenset[str]]:
    """``(mount point, filesystem type, mount and super options)`` of the mount holding ``path``.

    Matched by device number against ``/proc/self/mountinfo``, so bind mounts resolve right.
    Returns ``("", "", frozenset())`` where mountinfo is not available.
    """
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return "", "", frozenset()
    want = f"{os.major(dev)}:{os.minor(dev)}"
    real = os.path.realpath(path)
    best: tuple[str, str, frozenset[str]] = ("", "", frozenset())
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 6 or fields[2] != want:
            continue
        point = fields[4].replace("\\040", " ")
        if not (real == point or real.startswith(point.rstrip("/") + "/")):
            continue
        if len(point) >= len(best[0]):
            rest = right.split()
            fstype = rest[0] if rest else ""
            opts = set(fields[5].split(","))
            if len(rest) >= 3:
                opts.update(rest[2].split(","))
            best = (point, fstype, frozenset(opts))
    return best


def dax_char_device(st: os.stat_result) -> bool:
    """True when ``st`` describes a device-DAX character device (``/dev/daxX.Y``)."""
    if not stat.S_ISCHR(st.st_mode):
        return False
    link = f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/subsystem"
    return os.path.basename(os.path.realpath(link)) == "dax"


#: statfs ``f_type`` of the memory filesystems, known without reading the mount table.
_MEMORY_MAGIC = {0x01021994: "tmpfs", 0x958458F6: "hugetlbfs", 0x858458F6: "ramfs"}


_statfs = libc.statfs                      # looked up once, at import, not on the first open
_statfs.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
_statfs.restype = ctypes.c_int
_StatfsBuffer = ctypes.c_char * 512              # struct statfs is 120 bytes on 64-bit Linux


def _fs_magic(path: str | os.PathLike[str]) -> int | None:
    """``statfs(2)``'s ``f_type`` for ``path`` (its first field), or None where unavailable."""
    buf = _StatfsBuffer()
    if _statfs(os.fsencode(path), buf) != 0:
        return None
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def storage_kind(path: str | os.PathLike[str]) -> str:
    """What backs ``path``: "tmpfs", "hugetlbfs", "dax" (memory) or "file" / "block device"."""
    st = os.stat(path)
    if dax_char_device(st):
        return "dax"
    if stat.S_ISBLK(st.st_mode):
        return "block device"
    if stat.S_ISREG(st.st_mode):
        kind = _MEMORY_MAGIC.get(_fs_magic(path) or 0)
        if kind is not None:                 # the common case, in one system call
            return kind
    _, fstype, opts = mount_of(path)
    if fstype in MEMORY_FILESYSTEMS:
        return fstype
    if "dax" in opts or "dax=always" in opts:
        return "dax"
    return "file"


def _dax_size(st: os.stat_result) -> int | None:
    try:
        with open(f"/sys/dev/char/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/size") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def looks_like_shm_name(image: str, *, bare: bool = True) -> bool:
    """``"/name"`` (or, with ``bare``, ``"name"``) with no other slash: a POSIX shared-memory name.

    Only used for strings that are not an existing path.
    """
    if image.startswith("/"):
        return len(image) > 1 and "/" not in image[1:]
    return bare and bool(image) and "/" not in image


def looks_like_url(text: str) -> bool:
    """``scheme://...`` or an fsspec chain (``proto::url``): a remote image, read lazily.
    (String tests, not ``re``: a plain open does not import it.)"""
    for sep in ("://", "::"):
        head, found, _ = text.partition(sep)
        if found and head[:1].isalpha() and all(c.isalnum() or c in "+.-_" for c in head):
            return True
    return False


def _check_image_file(path: str) -> None:
    """Refuse what cannot hold an image before opening it: a directory, and a FIFO, socket or
    character device other than DAX (opening a FIFO would wait for a writer forever)."""
    st = os.stat(path)
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not an image", path)
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode) or dax_char_device(st)):
        raise OSError(errno.ENODEV, "not an image: a regular file, a block device or a DAX device "
                      "is needed", path)


def open_device(image: str | os.PathLike[str] | Device, *, readonly: bool,
                xip: bool | None = None, cache_bytes: int | None = None) -> Device:
    """Open ``image`` on the right device.

    ``image`` is a path (file, block device or DAX device), a POSIX shared-memory name, a URL
    (``https://``, ``s3://``, an fsspec chain: read-only, fetched lazily by range requests), or an
    already opened :class:`Device`. Memory-backed storage gets a :class:`MemoryDevice` (XIP);
    anything else a :class:`FileDevice` behind a :class:`PageCache`. ``xip=True``/``False``
    overrides the choice (``True`` maps any regular file).
    """
    if isinstance(image, Device):
        if xip is True and not image.is_xip:
            raise ValueError(f"xip=True needs a memory device, got {image!r}")
        return image
    path = os.fspath(image)
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if looks_like_url(path) and not os.path.exists(path):
        if xip is True:
            raise ValueError(f"xip=True needs memory storage; {path} is remote (xipfs.fetch copies it)")
        from .remote import open_remote  # http.client and friends: only for a URL

        return open_remote(path, readonly=readonly, cache_bytes=cache_bytes)
    if not os.path.exists(path) and looks_like_shm_name(path):
        if xip is False:
            raise ValueError("a POSIX shared-memory object is memory; it has no file path (xip=False)")
        return MemoryDevice.from_shm(path, readonly=readonly)
    _check_image_file(path)
    kind = storage_kind(path)
    use_memory = kind in ("tmpfs", "hugetlbfs", "ramfs", "shm", "dax") if xip is None else xip
    if use_memory:
        st = os.stat(path)
        size = _dax_size(st) if stat.S_ISCHR(st.st_mode) else None
        return MemoryDevice.from_path(path, readonly=readonly, kind=kind, size=size)
    device = FileDevice(path, readonly=readonly)
    if cache_bytes is None:
        return PageCache(device)
    return PageCache(device, cache_bytes)


#: ``sparse.SPARSE_MAGIC``, here so that a plain image does not import the sparse reader.
_SPARSE_MAGIC = 0xED26FF3A


def open_container(image: str | os.PathLike[str] | Device, *, readonly: bool, xip: bool | None = None,
                   cache_bytes: int | None = None, partition: int | None = None,
                   offset: int | None = None) -> Device:
    """:func:`open_device`, then what the bytes are: an Android sparse image is read through its
    chunk table (read-only), and ``partition`` (numbered as Linux numbers ``loop0pN``) or
    ``offset`` (bytes) picks a filesystem out of a whole disk, as a window of the one device,
    still XIP when the disk is in memory."""
    if partition is not None and offset is not None:
        raise ValueError("give partition or offset, not both")
    owns = not isinstance(image, Device)
    device = open_device(image, readonly=readonly, xip=xip, cache_bytes=cache_bytes)
    try:
        if device.size >= 4 and int.from_bytes(bytes(device.view(0, 4)), "little") == _SPARSE_MAGIC:
            from .sparse import SparseDevice  # the formats of whole disks: imported when met

            if not readonly:
                raise OSError(errno.EROFS, f"{device.name}: an Android sparse image is read-only "
                              "(xipfs unsparse writes the raw image)")
            device = SparseDevice(device, close_source=owns)
            owns = True
        if partition is not None or offset:
            from .window import WindowDevice
        if partition is not None:
            from .parttable import partitions

            part = partitions(device).number(partition)
            if part.extended:
                raise OSError(errno.EINVAL, f"partition {partition} is an extended partition, "
                              "a container of others")
            return WindowDevice(device, part.start, part.size, close_parent=owns,
                                name=f"{device.name}, partition {partition}")
        if offset:
            if not 0 <= offset < device.size:
                raise ValueError(f"offset {offset} is outside the image ({device.size} bytes)")
            return WindowDevice(device, offset, close_parent=owns, name=f"{device.name} at {offset}")
        return device
    except BaseException:
        if owns:
            device.close()
        raise
