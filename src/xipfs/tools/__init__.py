"""Tools over whole images: ``pack`` (a directory tree into an image, laid out whole),
``unpack`` (an image into a directory tree, safely) and ``fetch`` (a remote image into memory
storage, resumable and verified)."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def no_gc() -> Iterator[None]:
    """The cyclic garbage collector off for a whole-tree job: a tree's worth of nodes, stat
    results and tuples (none in a cycle, all freed by their counts) would start it every few
    hundred entries, each pass walking everything made so far (a sixth of pack's time)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
