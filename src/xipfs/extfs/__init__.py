"""The ext2 format: on-disk structures, superblock, inodes and block maps, directories, xattrs.

Knows devices, nothing of file objects or users.
"""

from .volume import Volume

__all__ = ["Volume"]
