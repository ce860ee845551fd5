"""Errors raised by xipfs.

Every error is an :class:`OSError` with the errno a kernel would give, so callers can handle
xipfs the way they handle ``os``: ``except FileNotFoundError`` works, and so does checking
``err.errno``.
"""

from __future__ import annotations

import errno
import os

__all__ = [
    "XipfsError",
    "CorruptImageError",
    "UnsupportedFeatureError",
    "fs_error",
]


class XipfsError(OSError):
    """Base class of the errors that are xipfs's own (not a plain ``os`` error)."""


class CorruptImageError(XipfsError):
    """The image breaks a rule of the ext2 format; the message names what and where.

    errno is EUCLEAN ("Structure needs cleaning"), which Linux ext2/ext4 return for the same
    situations.
    """

    def __init__(self, what: str, where: str | None = None) -> None:
        msg = what if where is None else f"{what} ({where})"
        super().__init__(errno.EUCLEAN, msg)
        self.what = what
        self.where = where

    def __str__(self) -> str:
        return f"corrupt image: {self.strerror}"


class UnsupportedFeatureError(XipfsError):
    """The image uses an ext2/3/4 feature that xipfs does not implement (errno EOPNOTSUPP)."""

    def __init__(self, message: str, features: tuple[str, ...] = ()) -> None:
        super().__init__(errno.EOPNOTSUPP, message)
        self.features = features

    def __str__(self) -> str:
        return str(self.strerror)


_ERRNO_CLASSES: dict[int, type[OSError]] = {
    errno.ENOENT: FileNotFoundError,
    errno.EEXIST: FileExistsError,
    errno.ENOTDIR: NotADirectoryError,
    errno.EISDIR: IsADirectoryError,
    errno.EACCES: PermissionError,
    errno.EPERM: PermissionError,
}


def fs_error(code: int, path: object = None, path2: object = None) -> OSError:
    """Build the OSError (the right subclass) that ``os`` would raise for ``code`` on ``path``."""
    cls = _ERRNO_CLASSES.get(code, OSError)
    if path is None:
        return cls(code, os.strerror(code))
    if path2 is None:
        return cls(code, os.strerror(code), path)
    return cls(code, os.strerror(code), path, None, path2)


def named(err: OSError, path: object) -> OSError:
    """``err`` as ``os`` would raise it on ``path``; xipfs's own errors (a corrupt image, an
    unsupported feature) keep their message, which says what is wrong."""
    if isinstance(err, XipfsError) or err.errno is None:
        return err
    return fs_error(err.errno, path)
