"""Block devices: where the bytes of an image live (the seed's ``direct_access`` step).

Knows bytes and blocks, nothing of ext2.
"""

from .base import SECTOR_SIZE, Device
from .detect import open_device, storage_kind
from .file import FileDevice, PageCache
from .memory import MemoryDevice

__all__ = [
    "SECTOR_SIZE",
    "Device",
    "FileDevice",
    "MemoryDevice",
    "PageCache",
    "open_device",
    "storage_kind",
]
