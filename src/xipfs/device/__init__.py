"""Block devices: where the bytes of an image live (the seed's ``direct_access`` step).

Knows bytes and blocks, nothing of ext2; and the containers around a filesystem (partition
tables, Android sparse images).
"""

from .base import SECTOR_SIZE, Device
from .detect import open_container, open_device, storage_kind
from .file import FileDevice, PageCache
from .memory import MemoryDevice

#: Imported on first use (most programs never open a whole disk or a sparse image).
_LAZY = {"Partition": "parttable", "PartitionTable": "parttable", "partitions": "parttable",
         "SparseDevice": "sparse", "is_sparse": "sparse", "unsparse": "sparse",
         "WindowDevice": "window"}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), name)

__all__ = [
    "SECTOR_SIZE",
    "Device",
    "FileDevice",
    "MemoryDevice",
    "PageCache",
    "Partition",
    "PartitionTable",
    "SparseDevice",
    "WindowDevice",
    "is_sparse",
    "open_container",
    "open_device",
    "partitions",
    "storage_kind",
    "unsparse",
]
