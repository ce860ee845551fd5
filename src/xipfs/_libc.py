"""The C library through ctypes, loaded once for the modules that need a call Python lacks
(``mmap`` at a fixed address, ``mprotect``, ``statfs``)."""

from __future__ import annotations

import ctypes

libc = ctypes.CDLL(None, use_errno=True)
