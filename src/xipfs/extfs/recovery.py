"""Opening an image whose journal needs recovery: the replay, in memory.

Linux replays the journal at mount, e2fsck before it checks; both write the journal's blocks
into the image. A reader here must not write, and several may share the image, so the replay
is an :class:`~xipfs.device.overlay.OverlayDevice` over it: the recovered blocks in private
memory, every other block read in place as ever.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import CorruptImageError, UnsupportedFeatureError
from . import layout as L
from .journal import recover

if TYPE_CHECKING:
    from ..device import Device


def needs_recovery(raw_super: bytes) -> bool:
    """Whether the superblock says a journal holds transactions not yet in place."""
    return bool(L.SUPERBLOCK.codes["s_feature_incompat"].unpack_from(
        raw_super, L.SUPERBLOCK.offsets["s_feature_incompat"])[0] & L.INCOMPAT_RECOVER)


def replay_journal(device: Device, verify: bool) -> Device:
    """``device`` as it is once its journal is replayed (itself when there is nothing to
    replay): the journal is read through its inode as the image stands, as e2fsck reads it."""
    from ..device.overlay import OverlayDevice
    from .volume import Volume

    vol = Volume(device, readonly=True, verify=verify, recover=False)
    sb = vol.sb
    if not sb.has_compat(L.COMPAT_HAS_JOURNAL) or not sb.s_journal_inum:
        raise CorruptImageError("needs_recovery is set but there is no journal inode", "superblock")
    if sb.s_journal_dev or any(bytes(sb.s_journal_uuid)):
        raise UnsupportedFeatureError("the journal to replay is on another device (an external journal)",
                                      ("needs_recovery",))
    journal = vol.inode(sb.s_journal_inum)
    bs = vol.bs
    nblocks = journal.size // bs
    jmap = journal.map
    where = f"journal inode {sb.s_journal_inum}"

    def journal_block(i: int) -> bytes:
        if not 0 <= i < nblocks:
            raise CorruptImageError(f"journal block {i} is past the journal's {nblocks} blocks", where)
        pblk = jmap.bmap(i)
        if not pblk:
            raise CorruptImageError(f"hole at block {i} of the journal", where)
        return bytes(device.view(pblk * bs, bs))

    overlay = recover(journal_block, bs, fs_blocks_count=sb.s_blocks_count, journal_blocks=nblocks)
    vol.forget_cached()
    if not overlay.blocks:
        return device
    return OverlayDevice(device, overlay.blocks, bs)
