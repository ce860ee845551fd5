"""Images delivered once per node to a Dask cluster, read in place by every worker there.

One image is one file, which is what makes it good to ship: a tree of many small files is a
metadata storm on a shared filesystem, one image moves as one object and is then read in place.

    >>> import xipfs.dask
    >>> xipfs.dask.deliver(client, "https://host/data.img", "data")   # once per node
    >>> def task(path):
    ...     return len(xipfs.dask.image("data").read_bytes(path))     # in place, by name
    >>> db.read_text("ext2://logs/*.txt::/data")                      # the fsspec door too

How: :class:`ImagePlugin` is a worker plugin. On each node the first worker to take a file
lock in ``/dev/shm`` fetches the image (a URL through :func:`xipfs.fetch`, or a local
path, copied) into memory storage under a POSIX shared-memory name, checks that it opens,
and renames it into place; the other workers of the node wait for that lock (at most
``timeout`` seconds, then ``TimeoutError`` naming the holder) and attach. Every worker maps the
same tmpfs pages, so the node holds one copy whatever the number of workers (their PSS, which
splits shared pages between the processes mapping them, sums to about one copy). In a worker,
:func:`image` and the ``ext2://`` door share one attachment, so one mapping of the image.
The wait is bounded by ``timeout`` seconds *without progress*: a long fetch whose partial copy
keeps growing is waited for.

Memory limits: Dask checks a worker's RSS against its ``memory_limit`` (spill at 70%, pause at
80%, the nanny restarts it at 95%), and the image pages a worker has mapped are in its RSS
although the node holds them once. By default (``unshared_memory=True``) the worker's and the
nanny's monitors count RSS without shared memory instead (:func:`unshared_rss`).

Teardown: the image is **kept** by default when workers go (a restarted worker re-attaches
without a new fetch) and unlinked on every node by :func:`release`. With ``keep=False`` it is
unlinked when the last worker of the node that attached it detaches (workers attached hold a
shared ``flock``, which the kernel drops when a process dies, so a crashed worker counts as
detached); a later worker on that node then fetches it again.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import shutil
import sys
import threading
import time
import warnings
from typing import TYPE_CHECKING, Any

try:
    from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin
except ImportError as exc:  # pragma: no cover - the extra is installed in the test environment
    raise ImportError("xipfs.dask needs dask.distributed: pip install xipfs[dask]") from exc

from ._libc import libc
from .device.detect import looks_like_url
from .errors import XipfsError
from .fs import Filesystem
from .fs import open as xipfs_open

if TYPE_CHECKING:
    from distributed import Client, Nanny, Worker

__all__ = ["ImagePlugin", "attach", "deliver", "detach", "image", "image_path", "map_array", "mapped_memory",
           "plugin_name", "populate_pages", "process_memory", "provide", "release", "unlink_local",
           "unshared_rss", "worker_memory", "UnsharedMemoryPlugin"]

SHM_DIR = "/dev/shm"
#: Seconds a worker waits for another worker of its node to fetch the image.
DEFAULT_TIMEOUT = 600.0
_POLL = 0.05
logger = logging.getLogger(__name__)

#: image path -> (what holds it open, this process's read-only Filesystem on it).
_attached: dict[str, tuple[Any, Filesystem]] = {}
#: image path -> descriptor holding this process's shared flock on the users file.
_users: dict[str, int] = {}
_lock = threading.Lock()


# -- names ------------------------------------------------------------------------------------------
def image_path(name: str) -> str:
    """Where image ``name`` lives on a node: ``/dev/shm/NAME`` for a shared-memory name
    (``"data"`` or ``"/data"``), or ``name`` itself when it is a longer absolute path."""
    if not name or name in ("/", "."):
        raise ValueError(f"not an image name: {name!r}")
    if name.startswith("/") and "/" in name[1:]:
        return os.path.normpath(name)
    if "/" in name.lstrip("/"):
        raise ValueError(f"an image name is a shared-memory name ('data') or an absolute path, "
                         f"not {name!r}")
    return os.path.join(SHM_DIR, name.lstrip("/"))


def _side_file(path: str, kind: str) -> str:
    """A hidden file next to the image: its fetch lock, users lock or partial copy."""
    head, tail = os.path.split(path)
    return os.path.join(head, f".{tail}.xipfs-{kind}")


# -- the node's copy --------------------------------------------------------------------------------
@contextlib.contextmanager
def _node_lock(path: str, timeout: float, source: str) -> Any:
    """Hold the node's exclusive fetch lock of image ``path``: wait at most ``timeout`` seconds."""
    lock_path = _side_file(path, "lock")
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            deadline = _wait_for_lock(fd, deadline, timeout, source, path)
            if _still_named(fd, lock_path):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)                      # a release unlinked it while we waited: the new one
    try:
        yield fd
    finally:
        os.close(fd)                      # drops the lock too


def _wait_for_lock(fd: int, deadline: float, timeout: float, source: str, path: str) -> float:
    """``flock(fd, LOCK_EX)``, polled until ``deadline``, which moves on while the holder's
    partial copy grows; then ``TimeoutError`` naming the holder. Returns the deadline."""
    seen = _fetched_so_far(path)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return deadline
        except BlockingIOError:
            now = time.monotonic()
            if now >= deadline:
                size = _fetched_so_far(path)
                if size != seen:                       # progress: wait another timeout
                    seen, deadline = size, now + timeout
                    continue
                holder = _read_record(fd).get("pid", "?")
                raise TimeoutError(errno.ETIMEDOUT, f"waited {timeout:g} s without progress for "
                                   f"another worker of this node (pid {holder}) to fetch {source} "
                                   f"into {path}; raise timeout= or look at that worker's log") from None
            time.sleep(_POLL)


def _part_files(path: str) -> tuple[str, ...]:
    """The partial copies a fetch into ``path`` writes: ours, and :mod:`xipfs.tools.fetch`'s inside it."""
    from .tools.fetch import part_path

    part = _side_file(path, "part")
    return part, part_path(part)


def _fetched_so_far(path: str) -> int:
    """Bytes in the partial copies of ``path`` now (how a waiting worker sees progress)."""
    total = 0
    for p in _part_files(path):
        with contextlib.suppress(OSError):
            total += os.stat(p).st_blocks * 512
    return total


def _still_named(fd: int, lock_path: str) -> bool:
    """The locked file is still the one under ``lock_path`` (not unlinked by a release)."""
    try:
        st = os.stat(lock_path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_record(fd: int) -> dict[str, Any]:
    """What the lock file says: the source of the image in place, the last holder."""
    try:
        raw = os.pread(fd, 4096, 0)
        return json.loads(raw) if raw.strip() else {}
    except (OSError, ValueError):
        return {}


def _write_record(fd: int, record: dict[str, Any]) -> None:
    data = json.dumps(record).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _is_url(source: str) -> bool:
    return looks_like_url(source) and not source.startswith(("file://", "local://"))


def _local(source: str) -> str:
    proto, sep, rest = source.partition("://")
    return rest if sep and proto in ("file", "local") else source


def _fetch(source: str, dest: str) -> None:
    """Copy image ``source`` (a URL or a local path) to ``dest``."""
    if _is_url(source):
        try:
            from .tools.fetch import fetch
        except ImportError as exc:                     # pragma: no cover - shipped together
            raise XipfsError(errno.ENOSYS, f"fetching {source} needs xipfs.fetch") from exc
        fetch(source, dest, progress=False)
        return
    shutil.copyfile(_local(source), dest)               # sendfile: no copy through Python


def _fetch_into_place(source: str, path: str) -> None:
    """Fetch ``source`` beside ``path``, check that it opens as an image, rename it into place."""
    part = _side_file(path, "part")                   # one name: a URL's fetch resumes there
    try:
        _fetch(source, part)
        xipfs_open(part).close()                       # a bad image fails here, on one worker
        os.chmod(part, 0o644)
        os.rename(part, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise


def _provide_locked(fd: int, source: str, name: str, path: str) -> bool:
    """With the node lock held: fetch ``source`` unless the node has image ``name`` already."""
    record = _read_record(fd)
    if os.path.exists(path):
        if record.get("source") not in (None, source):
            raise FileExistsError(errno.EEXIST, f"{path} holds an image of {record['source']}, "
                                  f"not of {source}; xipfs.dask.release(client, {name!r}) first", path)
        return False
    _write_record(fd, {"source": source, "pid": os.getpid(), "fetching": True})
    _fetch_into_place(source, path)
    _write_record(fd, {"source": source, "pid": os.getpid()})
    return True


def provide(source: str, name: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Make image ``name`` present on this node, fetching ``source`` if no worker did yet.

    Returns True when this process fetched it. An image already under ``name`` from another
    source is ``FileExistsError``: :func:`release` it first.
    """
    path = image_path(name)
    with _node_lock(path, timeout, source) as fd:
        return _provide_locked(fd, source, name, path)


def image(name: str) -> Filesystem:
    """This process's read-only Filesystem on image ``name`` (opened once, then cached): what
    tasks read in place. ``FileNotFoundError`` when it was not delivered to this node."""
    path = image_path(name)
    entry = _attached.get(path)
    if entry is None:
        with _lock:
            entry = _attached.get(path)
            if entry is None:
                if not os.path.exists(path):
                    raise FileNotFoundError(errno.ENOENT, f"image {name!r} is not on this node; "
                                            "xipfs.dask.deliver(client, source, name) first", path)
                entry = _attached[path] = _open_shared(path)
    return entry[1]


def _close_all_attached() -> None:
    """At exit: close what :func:`image` opened (while the modules it needs are still there)."""
    for path in list(_attached):
        _close_local(path)


atexit.register(_close_all_attached)


def _open_shared(path: str) -> tuple[Any, Filesystem]:
    """The ``ext2://`` door's attachment of ``path``, which every instance of the door naming
    this image in the process shares: one mapping of the image per worker, however tasks read
    it (a Filesystem of our own where fsspec is missing)."""
    try:
        import fsspec
    except ImportError:                                # pragma: no cover - dask needs fsspec
        fs = xipfs_open(path)
        return fs, fs
    inst = fsspec.filesystem("ext2", fo=path, skip_instance_cache=True)
    return inst, inst.xipfs


def _hold_user(path: str) -> None:
    """Count this process among the image's users on the node (a shared flock; once)."""
    with _lock:
        if path in _users:
            return
        fd = os.open(_side_file(path, "users"), os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        _users[path] = fd


def attach(source: str, name: str, timeout: float = DEFAULT_TIMEOUT, populate: bool = False) -> bool:
    """:func:`provide`, then open the image here and count this process as a user (all under
    the node lock, so nobody unlinks it in between). True when this process fetched it.

    ``populate``: map every page of the image into this process now (``MADV_POPULATE_READ``,
    about 0.1 s per GiB), so that no task pays a page fault on first touch; the worker's RSS
    then counts the whole image (its PSS, a share of it), and its page tables 2 MiB per GiB.
    """
    path = image_path(name)
    with _node_lock(path, timeout, source) as fd:
        fetched = _provide_locked(fd, source, name, path)
        _hold_user(path)
        fs = image(name)
    if populate:
        populate_pages(fs)
    return fetched


_MADV_POPULATE_READ = 22


def populate_pages(fs: Filesystem) -> bool:
    """Map every page of ``fs``'s memory device into this process now (Linux 5.14 and later;
    False where the kernel or the device cannot)."""
    from .xip.mapping import _address

    device = fs.device
    if not device.is_xip or getattr(device, "buffer", None) is None:
        return False
    madvise = libc.madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise(_address(device.buffer), device.size, _MADV_POPULATE_READ) == 0


def detach(name: str, unlink_if_last: bool = False, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Close this process's Filesystem on image ``name`` and stop counting as its user; with
    ``unlink_if_last``, unlink the image when no other process of the node uses it. Returns
    True when it unlinked the image."""
    path = image_path(name)
    _close_local(path)
    with _lock:
        fd = _users.pop(path, None)
    if fd is None:
        return False
    try:
        if not unlink_if_last:
            return False
        with _node_lock(path, timeout, "(detach)"):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # nobody else holds it shared
            except BlockingIOError:
                return False
            return _unlink_node_copy(path)
    finally:
        os.close(fd)


def _close_local(path: str) -> None:
    """Close this process's attachments of ``path``: ours and those of the ``ext2://`` door."""
    with _lock:
        entry = _attached.pop(path, None)
    arrays = sys.modules.get(__package__ + ".xip.arrays")
    if arrays is not None:
        arrays.forget(path)                            # chunks still alive keep their pages
    if entry is not None:
        with contextlib.suppress(Exception):
            entry[0].close()
    try:
        from . import fsspec_fs
    except ImportError:                                # pragma: no cover - fsspec missing
        return
    names = {path, "/" + os.path.basename(path), os.path.basename(path)} \
        if os.path.dirname(path) == SHM_DIR else {path}
    for inst in list(fsspec_fs.Ext2FileSystem._cache.values()):
        if getattr(getattr(inst, "_image", None), "source", None) in names:
            with contextlib.suppress(Exception):
                inst.close()


def _unlink_node_copy(path: str) -> bool:
    """Unlink the image and its side files (the caller holds the node lock)."""
    found = False
    part, fetch_part = _part_files(path)
    for p in (path, part, fetch_part, fetch_part + ".meta", _side_file(path, "users"),
              _side_file(path, "lock")):
        try:
            os.unlink(p)
            found = found or p == path
        except FileNotFoundError:
            pass
    return found


def unlink_local(name: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Detach here and unlink image ``name`` from this node now (processes that still map it
    keep their pages until they let go). True when it was there."""
    path = image_path(name)
    detach(name)
    with _node_lock(path, timeout, "(release)"):
        return _unlink_node_copy(path)


# -- the plugin -------------------------------------------------------------------------------------
class ImagePlugin(WorkerPlugin):
    """Worker plugin: image ``source`` present once per node under ``name``, attached by every
    worker at start (setup waits for the node's fetch, off the worker's event loop)."""

    def __init__(self, source: str, name: str, *, timeout: float = DEFAULT_TIMEOUT,
                 keep: bool = True, populate: bool = False, unshared_memory: bool = True) -> None:
        image_path(name)                               # a bad name fails at the client
        source = os.fspath(source)
        self.source = source if _is_url(source) else os.path.abspath(_local(source))
        self.name = name
        self.timeout = timeout
        self.keep = keep
        self.populate = populate
        self.unshared_memory = unshared_memory

    async def setup(self, worker: Worker) -> None:
        if self.unshared_memory:
            _count_unshared_in_worker(worker)
        await asyncio.to_thread(attach, self.source, self.name, self.timeout)
        if self.populate:
            limit = getattr(getattr(worker, "memory_manager", None), "memory_limit", None)
            size = os.path.getsize(image_path(self.name))
            if not self.unshared_memory and not _fits_rss_budget(size, limit):
                logger.warning("xipfs.dask: not populating image %s (%d bytes) in a worker whose "
                               "memory_limit is %s: Dask counts mapped image pages in its RSS",
                               self.name, size, limit)
                return
            await asyncio.to_thread(populate_pages, image(self.name))

    async def teardown(self, worker: Worker) -> None:
        await asyncio.to_thread(detach, self.name, not self.keep, self.timeout)


class UnsharedMemoryPlugin(NannyPlugin):
    """Nanny plugin: the nanny's memory monitor (which restarts a worker at 95% of its
    ``memory_limit``) counts the worker's RSS without its shared memory (see
    :func:`unshared_rss`)."""

    def setup(self, nanny: Nanny) -> None:
        _count_unshared_in_nanny(nanny)


def unshared_rss(pid: int | str = "self") -> int:
    """A process's resident memory without its resident shared memory (``VmRSS - RssShmem``
    of ``/proc/PID/status``): what Dask should count against a worker's ``memory_limit`` when
    it maps images, whose pages the node holds once and no worker can free by spilling or
    restarting. Cheap (no page walk), so fit for monitors that run ten times a second."""
    rss = shmem = 0
    with open(f"/proc/{pid}/status", "rb") as f:
        for line in f:
            if line.startswith(b"VmRSS:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith(b"RssShmem:"):
                shmem = int(line.split()[1]) * 1024
    return rss - shmem


def _count_unshared_in_worker(worker: Worker) -> None:
    """Make the worker's own memory monitor (spill at 70%, pause at 80%) and the memory it
    reports to the scheduler :func:`unshared_rss` (once per process)."""
    monitor = getattr(worker, "monitor", None)
    if monitor is None or getattr(monitor.get_process_memory, "_xipfs_unshared", False):
        return

    def get_process_memory() -> int:
        return unshared_rss()
    get_process_memory._xipfs_unshared = True          # type: ignore[attr-defined]
    monitor.get_process_memory = get_process_memory


def _count_unshared_in_nanny(nanny: Nanny) -> None:
    """Let the nanny's restart-at-95% check see :func:`unshared_rss`: its own check (raw RSS)
    runs only when the worker's unshared memory is over the limit too (once per nanny)."""
    pc = getattr(nanny, "periodic_callbacks", {}).get("memory_monitor")
    manager = getattr(nanny, "memory_manager", None)
    if pc is None or manager is None or getattr(pc.callback, "_xipfs_unshared", False):
        return
    check = pc.callback

    def memory_monitor() -> None:
        try:
            pid = nanny.process.process.pid
            fraction = unshared_rss(pid) / manager.memory_limit
        except (AttributeError, OSError, TypeError, ZeroDivisionError):
            fraction = None                            # not running: Dask's own check decides
        if fraction is not None and fraction <= manager.memory_terminate_fraction:
            return
        check()
    memory_monitor._xipfs_unshared = True              # type: ignore[attr-defined]
    pc.callback = memory_monitor


#: Share of a worker's memory_limit the image may take before Dask's memory monitor, which
#: counts the image pages a worker maps in its RSS, is warned about (it pauses a worker at 80%
#: of its limit and restarts it at 95%, though the node holds those pages once).
RSS_SHARE = 0.5


def _fits_rss_budget(size: int, limit: int | None) -> bool:
    return not limit or size <= RSS_SHARE * limit


def _warn_if_over_budget(client: Client, name: str) -> None:  # only with unshared_memory=False
    """Warn when image ``name`` is large for the workers' ``memory_limit`` (see RSS_SHARE)."""
    sizes = client.run(os.path.getsize, image_path(name))
    workers = client.scheduler_info().get("workers", {})
    tight = [w for w, size in sizes.items()
             if not _fits_rss_budget(size, workers.get(w, {}).get("memory_limit"))]
    if tight:
        size = max(sizes.values())
        limit = min(workers[w]["memory_limit"] for w in tight)
        warnings.warn(f"image {name!r} ({size} bytes) is more than {RSS_SHARE:.0%} of the memory_limit "
                      f"({limit} bytes) of {len(tight)} workers. Dask counts the image pages a worker "
                      "has mapped in its RSS (the node holds them once): a worker that reads most of "
                      "the image is paused at 80% and restarted at 95% of its limit. Give workers a "
                      "larger memory_limit (or memory_limit=0).", RuntimeWarning, stacklevel=3)


def plugin_name(name: str) -> str:
    """The name :func:`deliver` registers image ``name``'s plugin under."""
    return f"xipfs-image:{name}"


def deliver(client: Client, source: str, name: str, *, timeout: float = DEFAULT_TIMEOUT,
            keep: bool = True, populate: bool = False, unshared_memory: bool = True) -> str:
    """Deliver image ``source`` (URL or path) to every node of ``client``'s cluster under
    ``name``, now and on workers that join later; returns ``name`` once every worker attached.

    ``keep``: see the module's docstring (teardown); ``populate``: see :func:`attach`.
    ``unshared_memory``: Dask's memory monitors (the worker's spill and pause, the nanny's
    restart) count each worker's RSS without its shared memory (:func:`unshared_rss`), since
    the image pages a worker maps are the node's one copy; False leaves Dask counting them in
    every worker (and warns when the image is large for the workers' ``memory_limit``).
    Errors of any worker (the fetch, a corrupt image, the wait) are raised here.
    """
    if unshared_memory:
        client.register_plugin(UnsharedMemoryPlugin(), name="xipfs-unshared-memory")
    plugin = ImagePlugin(source, name, timeout=timeout, keep=keep, populate=populate,
                         unshared_memory=unshared_memory)
    client.register_plugin(plugin, name=plugin_name(name))
    if not unshared_memory:
        _warn_if_over_budget(client, name)
    return name


def release(client: Client, name: str, timeout: float = DEFAULT_TIMEOUT) -> dict[str, bool]:
    """Stop delivering image ``name``, detach every worker and unlink it on every node. Returns,
    per worker, whether it was the one that unlinked its node's copy."""
    with contextlib.suppress(ValueError, KeyError):    # not registered (already released)
        client.unregister_worker_plugin(plugin_name(name))
    return client.run(unlink_local, name, timeout)


def map_array(image: str, path: str, dtype: Any = "uint8", shape: Any = None, offset: int = 0,
              chunks: Any = "auto") -> Any:
    """A dask array over file ``path`` of delivered image ``image``, each chunk a view of the
    image's mapping on its worker: :func:`xipfs.xip.arrays.map_array` (needs numpy)."""
    from .xip.arrays import map_array as build

    return build(image, path, dtype, shape, offset, chunks)


# -- memory ------------------------------------------------------------------------------------------
def process_memory(pid: int | str = "self") -> dict[str, int]:
    """Bytes of ``Rss``, ``Pss``, ``Pss_Shmem`` and ``Pss_Anon`` of a process (smaps_rollup):
    PSS splits each shared page between the processes mapping it, so PSS sums over processes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("Rss", "Pss", "Pss_Shmem", "Pss_Anon", "Pss_File"):
                out[key.lower()] = int(rest.split()[0]) * 1024
    return out


def mapped_memory(path: str, pid: int | str = "self") -> dict[str, int]:
    """Bytes of ``Rss`` and ``Pss`` of a process's mappings of file ``path`` (``/proc/PID/smaps``):
    summed over the processes of a node, the PSS of an image is what the node holds of it."""
    out = {"rss": 0, "pss": 0}
    inside = False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            key, _, rest = line.partition(" ")
            if not key.endswith(":"):                   # a mapping's header line
                fields = line.split(None, 5)
                inside = len(fields) == 6 and fields[5].rstrip("\n") == path
            elif inside and key in ("Rss:", "Pss:"):
                out[key[:-1].lower()] += int(rest.split()[0]) * 1024
    return out


def worker_memory(client: Client, name: str | None = None) -> dict[str, dict[str, int]]:
    """Per worker address: :func:`process_memory`, or with ``name`` the :func:`mapped_memory`
    of image ``name`` (its Rss and Pss in that worker)."""
    if name is None:
        return client.run(process_memory)
    return client.run(mapped_memory, image_path(name))
