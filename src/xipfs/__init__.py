"""xipfs: execute-in-place ext2 and ext4 for Python.

Open a real ext2 image and read it in place: on memory storage (tmpfs, hugetlbfs, DAX, POSIX
shared memory) file data is copied once, straight from the storage into your buffer, with no
page cache in between. Anything else is read through a bounded page cache, the classic path.

    >>> import xipfs
    >>> with xipfs.open("/dev/shm/image.ext2") as fs:
    ...     fs.listdir("/")
    ...     data = fs.read_bytes("/etc/hostname")
"""

from .device import Device, FileDevice, MemoryDevice, PageCache, open_device
from .errors import CorruptImageError, UnsupportedFeatureError, XipfsError
from .extfs.mkfs import mkfs
from .fs import DirEntry, Filesystem, check, open  # noqa: A004 - xipfs.open is the entry point, like io.open
from .importer import install, run_module, uninstall
from .tools.pack import PackResult, pack
from .tools.unpack import UnpackResult, unpack
from .xip.file import XipFile
from .xip.mapping import Mapping, map_budget, set_map_budget

__version__ = "0.1.0"

install()          # sys.path entries naming an image (/dev/shm/app.img/lib) import in place


def __getattr__(name: str) -> object:
    """``xipfs.Problem`` on first use: the checker is imported only by those who check."""
    if name == "Problem":
        from .extfs.check import Problem

        return Problem
    if name in ("partitions", "unsparse"):        # whole disks and sparse images, on first use
        from . import device

        return getattr(device, name)
    raise AttributeError(f"module 'xipfs' has no attribute {name!r}")

__all__ = [
    "partitions",
    "unsparse",
    "CorruptImageError",
    "Device",
    "DirEntry",
    "FileDevice",
    "Filesystem",
    "Mapping",
    "MemoryDevice",
    "PackResult",
    "PageCache",
    "Problem",
    "UnpackResult",
    "UnsupportedFeatureError",
    "XipFile",
    "XipfsError",
    "check",
    "map_budget",
    "mkfs",
    "open",
    "install",
    "open_device",
    "pack",
    "run_module",
    "set_map_budget",
    "uninstall",
    "unpack",
]
