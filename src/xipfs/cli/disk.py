"""Subcommands for whole disks and their containers: ``parts`` (like sfdisk -l), ``unsparse``
(like simg2img)."""

from __future__ import annotations

import argparse
import errno
import os
import stat
from collections.abc import Callable, Iterator
from typing import Any

from . import format as F
from .common import CliError, Context, Spec, _shm_exists, about, emit, reason

#: Where the ext2/3/4 superblock lies in a filesystem, and its length.
_SB_OFFSET, _SB_SIZE = 1024, 1024


def _device_path(image: str) -> str:
    """The file behind ``image`` (a path, or a POSIX shared-memory name)."""
    if os.path.exists(image) or not _shm_exists(image):
        return image
    return "/dev/shm/" + image.lstrip("/")


def _existing(image: str) -> str:
    """``image``'s file, or the one-line error a missing image or a directory gets."""
    if not os.path.exists(image) and not _shm_exists(image):
        raise CliError(image, os.strerror(errno.ENOENT), code=errno.ENOENT)
    if os.path.isdir(image):
        raise CliError(image, os.strerror(errno.EISDIR), code=errno.EISDIR)
    return _device_path(image)


def filesystem_at(device: Any, offset: int, size: int) -> str | None:
    """``"ext2"``, ``"ext3"`` or ``"ext4"`` when an ext superblock starts ``offset + 1024``, else None."""
    if size < _SB_OFFSET + _SB_SIZE or offset + _SB_OFFSET + _SB_SIZE > device.size:
        return None
    buf = bytearray(_SB_SIZE)
    try:
        device.read_into(memoryview(buf), offset + _SB_OFFSET)
    except OSError:
        return None
    if buf[56:58] != b"\x53\xef":
        return None
    return F.ext_kind(int.from_bytes(buf[92:96], "little"), int.from_bytes(buf[96:100], "little"),
                      int.from_bytes(buf[100:104], "little"))


def _node(image: str, number: int) -> str:
    """The name sfdisk gives partition ``number`` of ``image`` (``d.img1``, ``loop0p1``)."""
    return f"{image}{'p' if image[-1:].isdigit() else ''}{number}"


# -- parts --------------------------------------------------------------------------------------
def parts_dict(image: str, device: Any, table: Any) -> dict[str, Any]:
    """What ``xipfs parts --json`` prints (keys documented in the command's help)."""
    ssz = table.sector_size
    rows = []
    for p in table:
        rows.append({
            "number": p.number, "node": _node(image, p.number), "start": p.start // ssz,
            "end": (p.end - 1) // ssz, "sectors": p.size // ssz, "offset": p.start, "size": p.size,
            "type": p.type, "type_name": p.type_name or None, "name": p.name, "uuid": p.guid or None,
            "partuuid": p.partuuid or None, "attributes": p.attributes,
            "bootable": table.label == "dos" and bool(p.attributes & 0x80), "extended": p.extended,
            "filesystem": None if p.extended else filesystem_at(device, p.start, p.size),
        })
    return {
        "image": image, "size": device.size, "sectors": device.size // ssz, "sector_size": ssz,
        "sparse": getattr(device, "kind", "") == "sparse", "label": table.label,
        "disk_id": table.disk_id or None, "notes": list(table.notes), "partitions": rows,
        "filesystem": filesystem_at(device, 0, device.size) if table.label is None else None,
    }


def _mib(n: int) -> str:
    """A disk size the way sfdisk's header prints it: ``64 MiB``, ``1.5 GiB``."""
    text = F.human_size(n)
    return f"{text} B" if text[-1:].isdigit() else f"{text[:-1]} {text[-1]}iB"


def cmd_parts(ctx: Context, args: argparse.Namespace) -> None:
    from ..device import open_container, partitions

    image = args.image
    spec = Spec(image, image, "/")
    path = _existing(image)
    with about(spec):
        try:
            device = open_container(path, readonly=True)
        except ValueError as err:
            raise CliError(image, str(err)) from err
        try:
            d = parts_dict(image, device, partitions(device))
        finally:
            device.close()
    if args.json:
        emit(F.to_json(d))
        return
    ssz = d["sector_size"]
    sparse = " (an Android sparse image, read through its chunk table)" if d["sparse"] else ""
    emit(f"Disk {image}: {_mib(d['size'])}, {d['size']} bytes, {d['sectors']} sectors{sparse}")
    emit(f"Units: sectors of 1 * {ssz} = {ssz} bytes")
    if d["label"] is None:
        fs = f": the image holds an {d['filesystem']} filesystem (open it without --partition)" \
            if d["filesystem"] else ""
        emit(f"No partition table{fs}")
        for note in d["notes"]:
            emit(f"Note: {note}")
        return
    emit(f"Disklabel type: {d['label']}")
    emit(f"Disk identifier: {d['disk_id']}")
    rows = d["partitions"]
    if rows:
        emit()
        dos = d["label"] == "dos"
        head = ["Device", *(["Boot"] if dos else []), "Start", "End", "Sectors", "Size",
                *(["Id"] if dos else []), "Type"]
        names = not dos and any(r["name"] for r in rows)
        if names:
            head.append("Name")
        cells = []
        for r in rows:
            typ = r["type_name"] or ("unknown" if dos else r["type"])
            cells.append([r["node"], *(["*" if r["bootable"] else ""] if dos else []), str(r["start"]),
                          str(r["end"]), str(r["sectors"]), F.human_size(r["size"]),
                          *([r["type"]] if dos else []), typ, *([r["name"]] if names else [])])
        right = {"Start", "End", "Sectors", "Size", "Id"}
        last = len(head) - 1
        widths = [max(len(c[i]) for c in [head, *cells]) for i in range(len(head))]
        for c in [head, *cells]:
            out = [v.rjust(w) if h in right else (v if i == last else v.ljust(w))
                   for i, (v, w, h) in enumerate(zip(c, widths, head, strict=True))]
            emit(" ".join(out).rstrip())
    for note in d["notes"]:
        emit(f"Note: {note}")


# -- unsparse -----------------------------------------------------------------------------------
def cmd_unsparse(ctx: Context, args: argparse.Namespace) -> None:
    from ..device import SparseDevice, is_sparse, unsparse
    from ..progress import progress_bar

    src, dest = args.src, args.dest
    src_spec = Spec(src, None, src)
    path = _existing(src)
    with about(src_spec):
        if not is_sparse(path):
            raise CliError(src, "not an Android sparse image (no sparse magic; it is raw already?)")
    if os.path.lexists(dest):
        try:
            st = os.stat(dest)
        except OSError as err:
            raise CliError(dest, reason(err), code=err.errno) from err
        if stat.S_ISDIR(st.st_mode):
            raise CliError(dest, os.strerror(errno.EISDIR), code=errno.EISDIR)
        if os.path.samefile(path, dest):
            raise CliError(dest, f"is the sparse image {src!r} itself")
        if not args.force:
            raise CliError(dest, "already exists (use -f to overwrite it)", code=errno.EEXIST)
    with about(src_spec, local=(dest, os.path.abspath(dest))):
        dev = SparseDevice(path)
        try:
            with progress_bar(ctx.progress, dev.size, "unsparse", "B") as bar:
                pieces = dev.pieces

                def counted() -> Iterator[tuple[int, int, memoryview | None]]:
                    for piece in pieces():
                        bar.update(piece[1])
                        yield piece

                dev.pieces = counted  # type: ignore[method-assign]
                size = unsparse(dev, dest)
            chunks = len(dev.chunks)
        finally:
            dev.close()
    if not ctx.quiet:
        emit(f"unsparsed {src} into {dest}: {size} bytes ({F.human_size(size)}), "
             f"{F.plural(chunks, 'chunk', 'chunks')}")


def _add_disk(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("parts", cmd_parts, "list a disk image's partitions (like sfdisk -l)",
            "List the partitions of a whole-disk image (MBR with logical partitions, or GPT; an "
            "Android sparse image too), numbered as Linux numbers loop0pN: the N that --partition "
            "takes. Start, End and Sectors are in sectors, as sfdisk prints them.",
            "JSON keys: image, size (bytes), sectors, sector_size, sparse, label (dos, gpt or null "
            "without a partition table), disk_id, notes, filesystem (of a bare image: ext2, ext3, "
            "ext4 or null), partitions (each: number, node, start, end, sectors, offset and size in "
            "bytes, type, type_name, name, uuid, partuuid, attributes, bootable, extended, "
            "filesystem).\n\nexamples:\n  xipfs parts disk.img\n  xipfs ls --partition 2 disk.img:/etc")
    p.add_argument("image", metavar="IMAGE", help="the disk image (or a sparse image of one)")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = add("unsparse", cmd_unsparse, "write the raw image of an Android sparse image (like simg2img)",
            "Write the raw image that the Android sparse image SRC describes to DEST, byte for byte "
            "what simg2img writes; runs of zeros stay holes in DEST. CRC32 chunks and the image "
            "checksum are checked; on a mismatch DEST is removed.",
            "xipfs reads sparse images in place without this (every reading command takes them); "
            "unsparse is for tools that need the raw bytes.\n\nexample:\n"
            "  xipfs unsparse system.simg system.img")
    p.add_argument("src", metavar="SRC", help="the sparse image")
    p.add_argument("dest", metavar="DEST", help="the raw image to write (a file or a block device)")
    p.add_argument("-f", "-F", "--force", dest="force", action="store_true",
                   help="overwrite DEST if it exists")
