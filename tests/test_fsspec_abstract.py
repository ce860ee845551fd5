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

#: (format, where the suite works, data path): ext2 at the image root in place (XIP), ext4 in
#: a nested directory named with a leading "/" (listings name it without: the ``zip``
#: convention, which ``fs_sanitize_path`` applies to the suite's expectations), and ext4
#: through the page cache (``xip=False``: ``get_file`` reads through a buffer, not views).
CASES = {"ext2-root-xip": ("ext2", "", True),
         "ext4-abs-xip": ("ext4", "/deep/er", True),
         "ext4-root-pagecache": ("ext4", "", False)}


@pytest.fixture(scope="module")
def shm() -> Iterator[str]:
    with shm_dir("fss-abstract-") as d:
        yield d


class Ext2Fixtures(abstract.AbstractFixtures):
    """The suite's fixtures for an image: one image per class and case."""

    @pytest.fixture(scope="class", params=list(CASES))
    @classmethod
    def case(cls, request: Any) -> tuple[str, str, bool]:
        return CASES[request.param]

    @pytest.fixture(scope="class")
    @classmethod
    def fs(cls, case: tuple[str, str, bool], shm: str) -> Iterator[Ext2FileSystem]:
        fstype, _, xip = case
        img = mkfs(os.path.join(shm, f"{cls.__name__}-{fstype}-{xip}.img"), "16M", bs=4096,
                   fstype=fstype)
        # auto_mkdir as fsspec's own LocalFileSystem fixture: the suite writes into new directories
        fs = fsspec.filesystem(fstype, fo=img, mode="r+", auto_mkdir=True, xip=xip,
                               skip_instance_cache=True)
        assert fs.xipfs.is_xip is xip
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
    def fs_path(self, case: tuple[str, str, bool]) -> str:
        return case[1]

    @pytest.fixture
    def fs_sanitize_path(self) -> Any:
        return lambda path: path.lstrip("/")


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
