"""Dask arrays over a file in an image, each chunk a numpy view of the storage itself.

:func:`map_array` builds the graph: a task per chunk that carries only ``(image name, path,
byte offset, shape, dtype, slices)``, never data. On a worker the task maps the file once (an
:class:`xipfs.Mapping` of the image on memory storage: the node's one copy of the image,
shared with every other worker there) and returns a numpy view into that mapping, so a chunk
is never read into private memory or pickled: it comes into being on the worker that uses it,
from the node's copy. The scheduler runs what consumes a chunk where the chunk is, so a
reduction moves only partial results between workers (a task that needs chunks of several
workers still receives them as Dask sends any array: a copy).

The image is opened by name with :func:`xipfs.dask.image` (a shared-memory name such as
``"data"`` or an absolute path), so deliver it first (:func:`xipfs.dask.deliver`), or name an
image every worker can open. Needs numpy and dask (the ``dask`` extra).
"""

from __future__ import annotations

import itertools
import math
import threading
from typing import Any

import numpy as np

__all__ = ["map_array", "forget"]

#: (image path, file path) -> uint8 array over this process's mapping of the whole file.
_maps: dict[tuple[str, str], np.ndarray] = {}
_lock = threading.Lock()


def _whole_file(image: str, path: str) -> np.ndarray:
    """This process's read-only mapping of ``path`` in image ``image``, as bytes (mapped once)."""
    from ..dask import image as open_image
    from ..dask import image_path

    key = (image_path(image), path)
    arr = _maps.get(key)
    if arr is None:
        with _lock:
            arr = _maps.get(key)
            if arr is None:
                m = open_image(image).mmap(path)
                arr = _maps[key] = np.frombuffer(m, dtype=np.uint8)
    return arr


def forget(image_file: str | None = None) -> None:
    """Drop this process's cached mappings (of the image at path ``image_file``, or of all);
    they are unmapped when the last chunk viewing them goes."""
    with _lock:
        for key in [k for k in _maps if image_file is None or k[0] == image_file]:
            del _maps[key]


def load_chunk(image: str, path: str, offset: int, shape: tuple[int, ...], dtype: str,
               index: tuple[slice, ...] = ()) -> np.ndarray:
    """One chunk: ``shape`` items of ``dtype`` from byte ``offset`` of ``path``, then ``index``
    (a view of the mapping: no copy; read-only)."""
    whole = _whole_file(image, path)
    dt = np.dtype(dtype)
    nbytes = math.prod(shape) * dt.itemsize
    if offset < 0 or offset + nbytes > len(whole):
        raise ValueError(f"{nbytes} bytes from offset {offset} do not fit in {path!r} "
                         f"({len(whole)} bytes) of image {image!r}")
    arr = np.ndarray(shape, dtype=dt, buffer=whole, offset=offset)
    return arr[index] if index else arr


def _shape_of(image: str, path: str, dtype: np.dtype, shape: Any, offset: int) -> tuple[int, ...]:
    """``shape`` as a tuple; None means as many items as fit in the file (read here, once)."""
    if shape is None:
        from ..dask import image as open_image

        size = open_image(image).stat(path).st_size
        return ((size - offset) // dtype.itemsize,)
    if isinstance(shape, int):
        return (shape,)
    return tuple(int(n) for n in shape)


def map_array(image: str, path: str, dtype: Any = "uint8", shape: Any = None, offset: int = 0,
              chunks: Any = "auto") -> Any:
    """A dask array of ``shape`` items of ``dtype`` stored C-ordered in file ``path`` of image
    ``image`` from byte ``offset``; each chunk a view of the image's mapping on its worker.

    ``shape`` None: a 1-D array of as many items as fit (the file's size is read here, so the
    image must be open-able where this runs). ``chunks`` as for :func:`dask.array.from_array`.
    """
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    dt = np.dtype(dtype)
    shape_t = _shape_of(image, path, dt, shape, offset)
    if any(n < 0 for n in shape_t):
        raise ValueError(f"negative dimension in shape {shape_t}")
    chunks_t = da.core.normalize_chunks(chunks, shape_t, dtype=dt)
    row_bytes = math.prod(shape_t[1:]) * dt.itemsize
    name = "xipfs-map-" + tokenize(image, path, dt.str, shape_t, offset, chunks_t)
    bounds = [list(itertools.accumulate(c, initial=0)) for c in chunks_t]
    dsk: dict[Any, Any] = {}
    for idx in itertools.product(*(range(len(c)) for c in chunks_t)):
        if not shape_t:
            dsk[(name,)] = (load_chunk, image, path, offset, (), dt.str)
            continue
        r0, r1 = bounds[0][idx[0]], bounds[0][idx[0] + 1]
        rest = tuple(slice(bounds[a][i], bounds[a][i + 1]) for a, i in enumerate(idx) if a)
        full = all(s.start == 0 and s.stop == n for s, n in zip(rest, shape_t[1:], strict=True))
        dsk[(name, *idx)] = (load_chunk, image, path, offset + r0 * row_bytes,
                             (r1 - r0, *shape_t[1:]), dt.str, () if full else (slice(None), *rest))
    graph = HighLevelGraph.from_collections(name, dsk, dependencies=())
    meta = np.empty((0,) * len(shape_t), dtype=dt)
    return da.Array(graph, name, chunks_t, meta=meta)
