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

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..device import Device
    from .bmap import BlockMapping
    from .volume import Volume


def needs_recovery(raw_super: bytes) -> bool:
    """Whether the superblock says a journal holds transactions not yet in place."""
    return bool(L.SUPERBLOCK.codes["s_feature_incompat"].unpack_from(
        raw_super, L.SUPERBLOCK.offsets["s_feature_incompat"])[0] & L.INCOMPAT_RECOVER)


def _journal(device: Device, verify: bool) -> tuple[Volume, Callable[[int], bytes], int, BlockMapping]:
    """The volume as the image stands, and a reader of its journal's blocks (by the inode)."""
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

    return vol, journal_block, nblocks, jmap


def recover_in_place(device: Device, verify: bool) -> None:
    """Replay the journal into the image, as Linux does at a read-write mount and e2fsck -p
    before it checks: the blocks, then the journal emptied (``s_start`` 0, the next sequence),
    then needs_recovery cleared (every store a whole block or superblock, each sealed)."""
    from .journal import apply, recover, recovered_superblock

    vol, journal_block, nblocks, jmap = _journal(device, verify)
    bs = vol.bs
    overlay = recover(journal_block, bs, fs_blocks_count=vol.sb.s_blocks_count, journal_blocks=nblocks)
    apply(overlay, lambda blk, data: device.write(data, blk * bs))
    device.write(recovered_superblock(journal_block(0), overlay), jmap.bmap(0) * bs)
    from .super import parse_superblock as parse_fs_superblock
    from .super import seal_superblock

    raw = bytearray(device.view(L.SUPERBLOCK_OFFSET, L.SUPERBLOCK_SIZE))
    sb = parse_fs_superblock(bytes(raw), device.size, verify=False)
    L.SUPERBLOCK.pack_field(raw, "s_feature_incompat", sb.s_feature_incompat & ~L.INCOMPAT_RECOVER)
    seal_superblock(sb, raw)
    device.write(bytes(raw), L.SUPERBLOCK_OFFSET)
    device.flush()


def journal_is_empty(vol: Volume) -> bool:
    """Whether the journal holds nothing to replay (``s_start`` 0): the only state in which a
    writer that does not journal may change the image."""
    from .journal import parse_superblock

    sb = vol.sb
    node = vol.inode(sb.s_journal_inum)
    pblk = node.map.bmap(0)
    if not pblk:
        raise CorruptImageError("the journal's first block is a hole", f"journal inode {sb.s_journal_inum}")
    return parse_superblock(bytes(vol.device.view(pblk * vol.bs, vol.bs)), verify=vol.verify).start == 0


def replay_journal(device: Device, verify: bool) -> Device:
    """``device`` as it is once its journal is replayed (itself when there is nothing to
    replay): the journal is read through its inode as the image stands, as e2fsck reads it."""
    from ..device.overlay import OverlayDevice
    from .journal import recover

    vol, journal_block, nblocks, _ = _journal(device, verify)
    bs = vol.bs
    overlay = recover(journal_block, bs, fs_blocks_count=vol.sb.s_blocks_count, journal_blocks=nblocks)
    vol.forget_cached()
    if not overlay.blocks:
        return device
    return OverlayDevice(device, overlay.blocks, bs)
