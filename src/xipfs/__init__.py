"""xipfs: execute-in-place ext2 and ext4 for Python.

Open a real ext2 image and read it in place: on memory storage (tmpfs, hugetlbfs, DAX, POSIX
shared memory) file data is copied once, straight from the storage into your buffer, with no
page cache in between. Anything else is read through a bounded page cache, the classic path.

    >>> import xipfs
    >>> with xipfs.open("/dev/shm/image.ext2") as fs:
    ...     fs.listdir("/")
    ...     data = fs.read_bytes("/etc/hostname")
"""

from .errors import CorruptImageError, UnsupportedFeatureError, XipfsError
from .importer import install, run_module, uninstall
from .importer import loading as _loading

__version__ = "0.1.0"

install()          # sys.path entries naming an image (/dev/shm/app.img/lib) import in place

#: Public names and the module each comes from, imported on first use (PEP 562): ``import
#: xipfs`` stays cheap for the command and for a process that only imports from images.
_LAZY = {
    "Device": ".device", "FileDevice": ".device", "MemoryDevice": ".device", "PageCache": ".device",
    "open_device": ".device", "partitions": ".device", "unsparse": ".device",
    "mkfs": ".extfs.mkfs",
    "DirEntry": ".fs", "Filesystem": ".fs", "check": ".fs", "open": ".fs",
    "PackResult": ".tools.pack", "pack": ".tools.pack",
    "UnpackResult": ".tools.unpack", "unpack": ".tools.unpack",
    "XipFile": ".xip.file",
    "Mapping": ".xip.mapping", "map_budget": ".xip.mapping", "set_map_budget": ".xip.mapping",
    "Problem": ".extfs.check",
    "fetch": ".tools.fetch", "RemoteDevice": ".device.remote", "open_remote": ".device.remote",
}


def __getattr__(name: str) -> object:
    """A public name on first use (its module imported then), remembered for the next."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xipfs' has no attribute {name!r}")
    with _loading():                  # an image entry on sys.path waits for these imports
        from importlib import import_module  # here: importlib's own imports cost import xipfs 0.4 ms

        value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
    "RemoteDevice",
    "UnpackResult",
    "UnsupportedFeatureError",
    "XipFile",
    "XipfsError",
    "check",
    "fetch",
    "map_budget",
    "mkfs",
    "open",
    "open_remote",
    "install",
    "open_device",
    "pack",
    "run_module",
    "set_map_budget",
    "uninstall",
    "unpack",
]
