"""fsspec's own conformance suite (``fsspec.tests.abstract``) against the ``ext2://`` door.

Each test class runs on a fresh writable image in /dev/shm, made by ``mke2fs`` (ext2, and
ext4 with its default features: extents, checksums, htree, a journal), shared by the tests of
that class as fsspec's memory filesystem shares its store; the suite's fixtures remove what
each test made. At the end of the class the instance is closed and ``e2fsck -fn`` must find
the image clean. LocalFileSystem on pytest's tmpdir is the other side of ``get`` and ``put``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

fsspec = pytest.importorskip("fsspec")
abstract = pytest.importorskip("fsspec.tests.abstract")

from e2fs import assert_fsck_clean, mkfs  # noqa: E402
from write_util import shm_dir  # noqa: E402

from xipfs.fsspec_fs import Ext2FileSystem  # noqa: E402

FORMATS = ("ext2", "ext4")


@pytest.fixture(scope="module")
def shm() -> Iterator[str]:
    with shm_dir("fss-abstract-") as d:
        yield d


class Ext2Fixtures(abstract.AbstractFixtures):
    """The suite's fixtures for an image: one image per class and format, paths from its root."""

    @pytest.fixture(scope="class", params=FORMATS)
    @classmethod
    def fs(cls, request: Any, shm: str) -> Iterator[Ext2FileSystem]:
        fstype = request.param
        img = mkfs(os.path.join(shm, f"{cls.__name__}-{fstype}.img"), "16M", bs=4096,
                   fstype=fstype)
        fs = fsspec.filesystem(fstype, fo=img, mode="r+", auto_mkdir=True,
                               skip_instance_cache=True)
        try:
            yield fs
        finally:
            fs.close()
        assert_fsck_clean(img)
        os.unlink(img)

    @pytest.fixture
    def fs_join(self) -> Any:
        return lambda *parts: "/".join(p for p in parts if p)

    @pytest.fixture
    def fs_path(self) -> str:
        return ""


class TestExt2Copy(abstract.AbstractCopyTests, Ext2Fixtures):
    pass


class TestExt2Get(abstract.AbstractGetTests, Ext2Fixtures):
    pass


class TestExt2Put(abstract.AbstractPutTests, Ext2Fixtures):
    pass


class TestExt2Open(abstract.AbstractOpenTests, Ext2Fixtures):
    pass


class TestExt2Pipe(abstract.AbstractPipeTests, Ext2Fixtures):
    pass
