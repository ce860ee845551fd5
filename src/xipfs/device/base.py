"""The block-device contract that the ext2 layer builds on.

A device is a flat run of bytes. The filesystem asks it for two things: a *view* of some bytes
(for metadata: superblock, descriptors, bitmaps, inode tables, directory and indirect blocks) and
a *copy* of some bytes into a caller's buffer (for file data). On a memory device both come
straight from the mapped storage; on a file device they go through a page cache.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from ..errors import CorruptImageError

SECTOR_SIZE = 512

#: Pins are one-byte OFD locks this far into the image file (far past any image's end).
PIN_BASE = 1 << 62
_FLOCK = struct.Struct("hhqqi4x")        # struct flock: type, whence, start, len, pid


def lock_holder(fd: int) -> str:
    """Who holds a flock on the file behind ``fd``, from ``/proc/locks`` (best effort)."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:"
    pids = []
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == f"{dev}{st.st_ino}":
                    pids.append(parts[4])
    except OSError:
        pass
    if not pids:
        return "another process"
    names = []
    for pid in dict.fromkeys(pids):
        if pid == str(os.getpid()):
            names.append(f"this process (pid {pid}, another open of the same image)")
            continue
        try:
            with open(f"/proc/{pid}/comm") as f:
                names.append(f"process {pid} ({f.read().strip()})")
        except OSError:
            names.append(f"process {pid}")
    return ", ".join(names)


class Device:
    """Base class: size, read-only flag, and the two access paths (view and copy)."""

    #: True when views point into the storage itself (the seed's ``direct_access``).
    is_xip: bool = False
    #: What the storage is, for humans: "tmpfs", "hugetlbfs", "dax", "shm", "anonymous", "file"...
    kind: str = "?"
    #: Where byte 0 of this device lies in the file of ``fileno()`` (a partition's window: its
    #: start in the disk image); whoever passes device offsets to the descriptor adds it.
    base_offset: int = 0

    def __init__(self, size: int, readonly: bool, name: str) -> None:
        self.size = size
        self.readonly = readonly
        self.name = name

    # -- the contract ---------------------------------------------------------------------
    def view(self, offset: int, length: int) -> memoryview:
        """Bytes ``[offset, offset+length)`` as a memoryview (storage itself on a memory device)."""
        raise NotImplementedError

    def read_into(self, dst: memoryview, offset: int) -> None:
        """Copy ``len(dst)`` bytes from ``offset`` into ``dst``: exactly one copy."""
        raise NotImplementedError

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Store ``data`` at ``offset``."""
        raise NotImplementedError

    def write_new(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Store ``data`` into blocks just allocated (whose old content nobody may see).

        The same as :meth:`write`; a device may take a faster path for storage not yet touched.
        """
        self.write(data, offset)

    def flush(self) -> None:
        """Make everything written so far durable as far as the storage allows."""

    def fileno(self) -> int:
        """The descriptor of the backing file, or -1 when there is none (anonymous memory)."""
        return -1

    def close(self) -> None:
        """Release the storage. Views still held by callers stay valid until they are dropped."""

    def lock(self, exclusive: bool) -> None:
        """Take an advisory lock on the storage (``flock``): exclusive for a writer.

        Raises ``OSError(EBUSY)`` naming who holds a conflicting lock. Storage without a
        descriptor (anonymous memory) has nobody else to exclude.
        """
        fd = self.fileno()
        if fd < 0:
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock_holder(fd)
            what = "opened for writing" if not exclusive else "in use"
            raise OSError(errno.EBUSY, f"image is {what} by {holder}", self.name) from None

    def unlock(self) -> None:
        fd = self.fileno()
        if fd >= 0:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def writer_elsewhere(self) -> bool:
        """Whether some open of the image holds the writer's lock (an exclusive ``flock``) now:
        a probe through a new open of the same file, so this one's own lock is untouched."""
        fd = self.fileno()
        if fd < 0:
            return False
        try:
            probe = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError:
            return True                  # cannot tell: assume a writer, the safe side
        try:
            fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(probe)
        return False

    # -- pins: "this process maps inode N", visible to every process ---------------------------
    def pin(self, key: int) -> bool:
        """Announce to other processes that this one maps the blocks of ``key`` (an inode).

        A shared open-file-description lock on byte ``PIN_BASE + key`` of the image: it lives
        exactly as long as this process's descriptor, so a killed process leaves no stale pin.
        False when the storage has no descriptor or takes no locks.
        """
        return self._ofd_lock(key, fcntl.F_RDLCK)

    def unpin(self, key: int) -> None:
        self._ofd_lock(key, fcntl.F_UNLCK)

    def pinned_elsewhere(self, key: int) -> bool:
        """True when another open of the image (another process, or another attachment in
        this one) has pinned ``key``."""
        fd = self.fileno()
        if fd < 0:
            return False
        query = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, PIN_BASE + key, 1, 0)
        try:
            answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, query)
        except OSError:
            return False
        return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK

    def _ofd_lock(self, key: int, kind: int) -> bool:
        fd = self.fileno()
        if fd < 0:
            return False
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, PIN_BASE + key, 1, 0))
        except OSError:
            return False
        return True

    # -- helpers ------------------------------------------------------------------------------
    def check_range(self, offset: int, length: int) -> None:
        """Refuse any access outside the device: this is the last guard against a hostile image."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptImageError(
                "access outside the device",
                f"bytes {offset}..{offset + length} of a {self.size}-byte device",
            )

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        ro = "ro" if self.readonly else "rw"
        return f"<{type(self).__name__} {self.name!r} {self.kind} {self.size} bytes {ro}>"
