"""Subcommands that look: ``info``, ``df``, ``check``, ``ls``, ``tree``, ``stat``, ``cat``."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import posixpath
import stat
import sys
import time
from collections.abc import Callable
from typing import Any

from . import format as F
from .common import (
    CHUNK,
    CliError,
    Context,
    Tree,
    _flush_stdout,
    _shm_exists,
    _stdout_is_terminal,
    about,
    emit,
    image_spec,
    is_url,
    terminal_width,
)

# -- info / df / check --------------------------------------------------------------------------
_ERRORS_BEHAVIOR = {1: "Continue", 2: "Remount read-only", 3: "Panic"}

ENTRY_KEYS_HELP = ("JSON: a list of entries with the keys " + ", ".join(F.ENTRY_KEYS)
                   + " (type: file, dir, symlink, fifo, socket, char, block; times ISO 8601 UTC "
                   "and *_ns integers; rdev [major, minor] or null; target null unless a symlink).")


def _storage(fs: Any, image: str) -> str:
    from ..device.detect import storage_kind

    try:
        kind = storage_kind(image) if os.path.exists(image) else "remote" if is_url(image) else "shm"
    except OSError:
        kind = "unknown"
    path = "read in place (XIP)" if fs.is_xip else "page cache"
    dev = fs.device
    while dev is not None and getattr(dev, "kind", "") != "sparse":
        dev = getattr(dev, "parent", None)
    if dev is not None:
        path = "an Android sparse image, read through its chunk table"
    return f"{kind}, {path}"


def _where_text(image: str, partition: int | None, offset: int | None) -> str:
    if partition is not None:
        return f"{image}, partition {partition}"
    return f"{image} at byte {offset}" if offset else image


def info_dict(fs: Any, image: str, partition: int | None = None, offset: int | None = None) -> dict[str, Any]:
    """What ``xipfs info --json`` prints (keys documented in the command's help)."""
    sb = fs.volume.sb
    f = sb.fields
    state = "clean" if f["s_state"] & 1 else "not clean"
    if f["s_state"] & 2:
        state += " with errors"
    d = {
        "image": image, "image_size": fs.device.size, "storage": _storage(fs, image), "xip": fs.is_xip,
        "label": sb.label, "uuid": sb.uuid, "revision": f["s_rev_level"], "features": sb.features,
        "state": state, "errors_behavior": _ERRORS_BEHAVIOR.get(f["s_errors"], str(f["s_errors"])),
        "inodes_count": f["s_inodes_count"], "blocks_count": f["s_blocks_count"],
        "reserved_blocks": f["s_r_blocks_count"], "free_blocks": f["s_free_blocks_count"],
        "free_inodes": f["s_free_inodes_count"], "first_data_block": f["s_first_data_block"],
        "block_size": sb.block_size, "inode_size": sb.inode_size, "first_inode": sb.first_ino,
        "blocks_per_group": f["s_blocks_per_group"], "inodes_per_group": f["s_inodes_per_group"],
        "inode_blocks_per_group": sb.itable_blocks, "groups": sb.groups,
        "created": f["s_mkfs_time"] or None, "mounted": f["s_mtime"] or None,
        "written": f["s_wtime"] or None, "checked": f["s_lastcheck"] or None,
        "mount_count": f["s_mnt_count"], "max_mount_count": f["s_max_mnt_count"],
        "writable": not sb.readonly_reason, "readonly_reason": sb.readonly_reason or None,
    }
    d.update(ext4_dict(fs))
    if is_url(image) and not sb.readonly_reason:
        d["writable"] = False
        d["readonly_reason"] = "a remote image (xipfs fetch copies it to memory storage)"
    d["partition"] = partition
    d["offset"] = fs.device.offset if partition is not None and hasattr(fs.device, "offset") else offset or 0
    return d


def ext4_dict(fs: Any) -> dict[str, Any]:
    """The ext3/ext4 part of ``xipfs info``: what ``dumpe2fs -h`` shows beyond ext2's fields."""
    from ..extfs import layout as L

    sb = fs.volume.sb
    f = sb.fields
    csum_seed = bool(f["s_feature_incompat"] & L.INCOMPAT_CSUM_SEED)
    return {
        "type": F.ext_kind(f["s_feature_compat"], f["s_feature_incompat"], f["s_feature_ro_compat"]),
        "flags": [name for bit, name in F.SUPER_FLAGS.items() if f["s_flags"] & bit],
        "cluster_size": sb.block_size * sb.cluster_ratio,
        "clusters_per_group": f["s_frags_per_group"],
        "desc_size": sb.desc_size, "reserved_gdt_blocks": f["s_reserved_gdt_blocks"],
        "first_meta_bg": f["s_first_meta_bg"],
        "flex_bg_size": 1 << f["s_log_groups_per_flex"] if f["s_log_groups_per_flex"] else None,
        "overhead_clusters": f["s_overhead_clusters"], "kbytes_written": f["s_kbytes_written"],
        "min_extra_isize": f["s_min_extra_isize"], "want_extra_isize": f["s_want_extra_isize"],
        "hash_version": F.HASH_NAMES.get(f["s_def_hash_version"], f"HASHALG_{f['s_def_hash_version']}"),
        "hash_seed": _uuid_or_none(f["s_hash_seed"]),
        "checksum_type": ("crc32c" if f["s_checksum_type"] == 1 else "unknown") if sb.metadata_csum else None,
        "checksum": f["s_checksum"] if sb.metadata_csum else None,
        "checksum_seed": f["s_checksum_seed"] if csum_seed else None,
        "csum_seed": sb.csum_seed if sb.metadata_csum else None,
        "first_orphan": f["s_last_orphan"] or None,
        "orphan_file_inode": f["s_orphan_file_inum"] or None,
        "needs_recovery": _needs_recovery_on_disk(fs),
        "journal_replayed": bool(getattr(fs.volume, "replayed", False)),
        "journal": journal_dict(fs),
    }


def _needs_recovery_on_disk(fs: Any) -> bool:
    """needs_recovery as the image's own superblock says (a reader sees the journal replayed)."""
    from ..extfs import layout as L

    vol = fs.volume
    device = vol.device.parent if getattr(vol, "replayed", False) else vol.device
    at = L.SUPERBLOCK_OFFSET + L.SUPERBLOCK.offsets["s_feature_incompat"]
    return bool(int.from_bytes(bytes(device.view(at, 4)), "little") & L.INCOMPAT_RECOVER)


def _uuid_or_none(raw: Any) -> str | None:
    import uuid

    raw = bytes(raw)
    return str(uuid.UUID(bytes=raw)) if any(raw) else None


def journal_dict(fs: Any) -> dict[str, Any] | None:
    """The journal: where it is, its size, and (when readable) its superblock; None without one."""
    from ..extfs import layout as L

    vol = fs.volume
    f = vol.sb.fields
    if not vol.sb.has_compat(L.COMPAT_HAS_JOURNAL):
        return None
    d: dict[str, Any] = {
        "inode": f["s_journal_inum"] or None, "device": f["s_journal_dev"] or None,
        "uuid": _uuid_or_none(f["s_journal_uuid"]), "backup": f["s_jnl_backup_type"] == 1,
        "size": None, "superblock": None, "error": None,
    }
    if not d["inode"]:
        d["error"] = "external journal: not in this image"
        return d
    try:
        from ..extfs.data import read_bytes

        node = vol.inode(d["inode"])
        d["size"] = node.size
        raw = read_bytes(vol, node, 0, 1024)
    except (OSError, ValueError) as err:
        d["error"] = f"journal inode {d['inode']}: {err}"
        return d
    jsb, error = _journal_superblock(raw)
    d["error"] = error
    fast_commit = vol.sb.has_compat(L.COMPAT_FAST_COMMIT)     # sizes the area, as dumpe2fs does
    if jsb is not None:
        d["superblock"] = {
            "version": jsb.version, "block_size": jsb.blocksize, "blocks": jsb.maxlen, "first": jsb.first,
            "sequence": jsb.sequence, "start": jsb.start, "errno": jsb.errno,
            "features": jsb.feature_names(), "fast_commit_blocks": jsb.listed_fc_blocks(fast_commit),
            "users": jsb.nr_users, "checksum_type": jsb.checksum_type,
            "checksum": jsb.checksum if jsb.csum_v2or3 else None, "checksum_ok": jsb.checksum_ok,
            "needs_recovery": jsb.needs_recovery,
            "lines": [list(row) for row in jsb.describe(vol.sb.block_size, fast_commit)],
        }
    return d


def _journal_superblock(raw: bytes) -> tuple[Any, str | None]:
    """The parsed journal superblock (None when the parser is not there or the block is not one)
    and why it could not be read."""
    try:
        from ..extfs import journal
    except ImportError:
        return None, None
    parse = getattr(journal, "parse_superblock", None)
    if parse is None or not hasattr(journal, "JournalSuperblock"):
        return None, None
    magic = int.from_bytes(raw[:4], "big")
    if magic != getattr(journal, "JBD2_MAGIC", 0xC03B3998):
        return None, f"no journal superblock (magic 0x{magic:08x})"
    try:
        jsb = parse(raw, verify=False)
        needed = ("version", "blocksize", "maxlen", "first", "sequence", "start", "errno", "feature_names",
                  "fc_blocks", "nr_users", "checksum_type", "checksum", "csum_v2or3", "checksum_ok",
                  "needs_recovery", "describe")
        if not all(hasattr(jsb, name) for name in needed):
            return None, None
        return jsb, None if jsb.checksum_ok else "journal superblock checksum does not match"
    except (OSError, ValueError) as err:
        return None, str(err)


def _ext4_rows(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """``xipfs info`` of an ext3/ext4 image: the rows of ``dumpe2fs -h`` in its order (those of
    ext2 too), its Journal section, then what xipfs adds."""
    j = d["journal"]
    bigalloc = "bigalloc" in d["features"]
    recovery = "yes" if d["needs_recovery"] else "no"
    jsb = j["superblock"] if j is not None else None
    if d["journal_replayed"]:
        recovery += " (the journal is replayed in memory: shown as recovered, the image untouched)"
    elif jsb is not None and jsb["start"] and not d["needs_recovery"]:
        recovery += f" (but the journal starts at block {jsb['start']})"
    elif d["needs_recovery"] and jsb is not None and not jsb["start"]:
        recovery += " (the journal is empty: nothing to replay)"
    rev = {0: "0 (original)", 1: "1 (dynamic)"}.get(d["revision"], str(d["revision"]))
    when: list[tuple[bool, str, Any]] = [
        (True, "Filesystem volume name", d["label"] or "<none>"), (True, "Filesystem UUID", d["uuid"]),
        (True, "Filesystem revision #", rev),
        (True, "Filesystem features", " ".join(d["features"]) or "(none)"),
        (True, "Filesystem type", d["type"]), (True, "Filesystem flags", " ".join(d["flags"]) or "(none)"),
        (True, "Filesystem state", d["state"]), (True, "Needs recovery", recovery),
        (True, "Errors behavior", d["errors_behavior"]),
        (True, "Inode count", d["inodes_count"]), (True, "Block count", d["blocks_count"]),
        (True, "Reserved block count", d["reserved_blocks"]),
        (bool(d["overhead_clusters"]), "Overhead clusters", d["overhead_clusters"]),
        (True, "Free blocks", d["free_blocks"]), (True, "Free inodes", d["free_inodes"]),
        (True, "First block", d["first_data_block"]), (True, "Block size", d["block_size"]),
        (bigalloc, "Cluster size", d["cluster_size"]),
        ("64bit" in d["features"], "Group descriptor size", d["desc_size"]),
        (bool(d["reserved_gdt_blocks"]), "Reserved GDT blocks", d["reserved_gdt_blocks"]),
        (True, "Blocks per group", d["blocks_per_group"]),
        (bigalloc, "Clusters per group", d["clusters_per_group"]),
        (True, "Inodes per group", d["inodes_per_group"]),
        (True, "Inode blocks per group", d["inode_blocks_per_group"]),
        (bool(d["first_meta_bg"]), "First meta block group", d["first_meta_bg"]),
        (bool(d["flex_bg_size"]), "Flex block group size", d["flex_bg_size"]),
        (True, "Block groups", d["groups"]),
        (True, "Filesystem created", F.ctime_text(d["created"] or 0)),
        (True, "Last mount time", F.ctime_text(d["mounted"] or 0)),
        (True, "Last write time", F.ctime_text(d["written"] or 0)),
        (True, "Mount count", d["mount_count"]), (True, "Maximum mount count", d["max_mount_count"]),
        (True, "Last checked", F.ctime_text(d["checked"] or 0)),
        (bool(d["kbytes_written"]), "Lifetime writes", F.kbytes_text(d["kbytes_written"])),
        (True, "First inode", d["first_inode"]), (True, "Inode size", d["inode_size"]),
        (d["inode_size"] > 128, "Required extra isize", d["min_extra_isize"]),
        (d["inode_size"] > 128, "Desired extra isize", d["want_extra_isize"]),
        (j is not None and bool(j["uuid"]), "Journal UUID", j and j["uuid"]),
        (j is not None and bool(j["inode"]), "Journal inode", j and j["inode"]),
        (j is not None and bool(j["device"]), "Journal device", f"0x{(j and j['device']) or 0:04x}"),
        (bool(d["first_orphan"]), "First orphan inode", d["first_orphan"]),
        ("dir_index" in d["features"] or d["hash_version"] != "legacy", "Default directory hash",
         d["hash_version"]),
        (bool(d["hash_seed"]), "Directory Hash Seed", d["hash_seed"]),
        (j is not None and j["backup"], "Journal backup", "inode blocks"),
        (bool(d["checksum_type"]), "Checksum type", d["checksum_type"]),
        (bool(d["checksum_type"]), "Checksum", f"0x{d['checksum'] or 0:08x}"),
        (d["checksum_seed"] is not None, "Checksum seed", f"0x{d['checksum_seed'] or 0:08x}"),
        (bool(d["orphan_file_inode"]), "Orphan file inode", d["orphan_file_inode"]),
    ]
    rows = [(key, value) for shown, key, value in when if shown]
    if j is not None and j["size"] is not None:
        rows.append(("Journal size", f"{j['size']} bytes ({F.human_size(j['size'])})"))
    if jsb is not None:
        rows += [(k, v) for k, v in jsb["lines"]]
    if j is not None and j["error"]:
        rows.append(("Journal superblock", f"unreadable: {j['error']}"))
    return rows


def _info_rows(d: dict[str, Any]) -> list[tuple[str, Any]]:
    """The rows of ``xipfs info``: ext2 as it always was, ext3/ext4 as :func:`_ext4_rows` says."""
    if d["type"] != "ext2":
        return _ext4_rows(d)
    rev = {0: "0 (original)", 1: "1 (dynamic)"}.get(d["revision"], str(d["revision"]))
    return [
        ("Filesystem volume name", d["label"] or "<none>"), ("Filesystem UUID", d["uuid"]),
        ("Filesystem revision #", rev), ("Filesystem features", " ".join(d["features"]) or "(none)"),
        ("Filesystem state", d["state"]), ("Errors behavior", d["errors_behavior"]),
        ("Inode count", d["inodes_count"]), ("Block count", d["blocks_count"]),
        ("Reserved block count", d["reserved_blocks"]), ("Free blocks", d["free_blocks"]),
        ("Free inodes", d["free_inodes"]), ("First block", d["first_data_block"]),
        ("Block size", d["block_size"]), ("Inode size", d["inode_size"]), ("First inode", d["first_inode"]),
        ("Blocks per group", d["blocks_per_group"]), ("Inodes per group", d["inodes_per_group"]),
        ("Inode blocks per group", d["inode_blocks_per_group"]), ("Block groups", d["groups"]),
        ("Filesystem created", F.ctime_text(d["created"] or 0)),
        ("Last mount time", F.ctime_text(d["mounted"] or 0)),
        ("Last write time", F.ctime_text(d["written"] or 0)),
        ("Mount count", d["mount_count"]), ("Maximum mount count", d["max_mount_count"]),
        ("Last checked", F.ctime_text(d["checked"] or 0)),
    ]


def cmd_info(ctx: Context, args: argparse.Namespace) -> None:
    spec = image_spec(args.image, "/")
    fs = ctx.fs(spec.image)
    d = info_dict(fs, spec.image, ctx.partition, ctx.offset)
    if args.json:
        emit(F.to_json(d))
        return
    rows = [
        *_info_rows(d),
        ("Image", f"{_where_text(d['image'], d['partition'], d['offset'])} "
                  f"({d['image_size']} bytes, {F.human_size(d['image_size'])})"),
        ("Storage", d["storage"]),
        ("Writable", "yes" if d["writable"] else f"no: {d['readonly_reason']}"),
    ]
    for key, value in rows:
        emit(f"{key + ':':<26}{value}" if key else f"{'':<26}{value}")


def df_dict(fs: Any, image: str) -> dict[str, Any]:
    """One row of ``xipfs df --json`` (keys documented in the command's help)."""
    sv = fs.statvfs("/")
    bs = sv.f_frsize
    used = (sv.f_blocks - sv.f_bfree) * bs
    avail = sv.f_bavail * bs
    iused = sv.f_files - sv.f_ffree
    return {
        "image": image, "label": fs.label, "block_size": bs, "size": sv.f_blocks * bs, "used": used,
        "available": avail, "use_percent": -(-used * 100 // (used + avail)) if used + avail else 0,
        "inodes": sv.f_files, "inodes_used": iused, "inodes_free": sv.f_ffree,
        "inodes_use_percent": -(-iused * 100 // sv.f_files) if sv.f_files else 0,
    }


def cmd_df(ctx: Context, args: argparse.Namespace) -> None:
    rows = []
    for arg in args.images:
        with ctx.each():
            spec = image_spec(arg, "/")
            rows.append(df_dict(ctx.fs(spec.image), spec.image))
    if args.json:
        emit(F.to_json(rows))
        return
    if args.inodes:
        head = ("Filesystem", "Inodes", "IUsed", "IFree", "IUse%")
        cells = [(r["image"], str(r["inodes"]), str(r["inodes_used"]), str(r["inodes_free"]),
                  f"{r['inodes_use_percent']}%") for r in rows]
    else:
        size = F.human_size if args.human else (lambda n: str(-(-n // 1024)))
        head = ("Filesystem", "Size" if args.human else "1K-blocks", "Used", "Avail", "Use%")
        cells = [(r["image"], size(r["size"]), size(r["used"]), size(r["available"]), f"{r['use_percent']}%")
                 for r in rows]
    if not rows:
        return
    widths = [max(len(c[i]) for c in [head, *cells]) for i in range(5)]
    for c in [head, *cells]:
        emit(f"{c[0]:<{widths[0]}} " + " ".join(f"{v:>{w}}" for v, w in zip(c[1:], widths[1:], strict=True)))


def _problem_dict(p: Any) -> dict[str, Any]:
    if hasattr(p, "to_dict"):
        return p.to_dict()
    import dataclasses

    return dataclasses.asdict(p)


def cmd_check(ctx: Context, args: argparse.Namespace) -> None:
    # extfs.check.check_image, not xipfs.check: the check reads the device only (no file
    # layer imported), and a clean image's counts are its superblock's (pass 5 compared them)
    from ..extfs.check import MINOR_CODES, check_image

    spec = image_spec(args.image, "/")
    remote = is_url(spec.image) and not os.path.exists(spec.image)
    if not remote:
        if not os.path.exists(spec.image) and not _shm_exists(spec.image):
            raise CliError(spec.image, os.strerror(errno.ENOENT), code=errno.ENOENT)
        ctx.check_partition(spec.image)
    shown = spec._replace(image=ctx.shown(spec.image))
    with about(shown):                     # the device, not a Volume: damaged descriptors too
        try:
            problems, sb = check_image(spec.image, progress=ctx.progress, **ctx.where)
        except (ValueError, LookupError) as err:
            raise ctx.open_error(spec.image, err) from err
    if args.json:
        emit(F.to_json({"image": spec.image, "clean": not problems, "count": len(problems),
                        "problems": [_problem_dict(p) for p in problems]}))
    else:
        for p in problems:
            extra = f" ({p.path})" if getattr(p, "path", None) and p.path not in p.message else ""
            emit(f"{p.code}: {p.message}{extra}")
        if problems:
            emit(f"{spec.image}: {F.plural(len(problems), 'problem', 'problems')} found")
        else:
            emit(f"{spec.image}: clean, {sb.s_inodes_count - sb.s_free_inodes_count}/{sb.s_inodes_count} "
                 f"files, {sb.s_blocks_count - sb.s_free_blocks_count}/{sb.s_blocks_count} blocks")
    if any(p.code not in MINOR_CODES for p in problems):   # as e2fsck -n: lagging counts are not errors
        ctx.status = max(ctx.status, 1)


# -- ls / tree / stat / cat ---------------------------------------------------------------------
def _follow_if_dir(tree: Tree, path: str, st: os.stat_result) -> os.stat_result:
    """A command-line symlink to a directory lists the directory (as ls without -l does)."""
    if stat.S_ISLNK(st.st_mode):
        with contextlib.suppress(CliError):
            target = tree.stat(path)
            if stat.S_ISDIR(target.st_mode):
                return target
    return st


_ACL_NAMES = frozenset(("system.posix_acl_access", "system.posix_acl_default"))


def _has_acl(tree: Tree, path: str) -> bool:
    """Whether ``path`` has a POSIX ACL (GNU ls marks its mode with ``+``); an unreadable
    attribute list counts as none, the entry is still listed."""
    try:
        return not _ACL_NAMES.isdisjoint(tree.ops.listxattr(path, follow_symlinks=False))
    except (OSError, ValueError):
        return False


def _target(tree: Tree, path: str, st: os.stat_result) -> str | None:
    if not stat.S_ISLNK(st.st_mode):
        return None
    try:
        return tree.readlink(path)
    except CliError:
        return "?"


#: One line of ``ls``: (shown name, path, lstat or None when not needed, the side it is on).
Item = tuple[str, str, "os.stat_result | None", Tree]


class Lister:
    """``ls``: collects what to print, in the order GNU ls prints it."""

    def __init__(self, ctx: Context, args: argparse.Namespace) -> None:
        self.ctx = ctx
        self.args = args
        self.now = time.time()
        self.records: list[dict[str, Any]] = []
        self.sections = 0
        self.wide = _stdout_is_terminal() and not args.long
        self.needs_stat = args.long or args.json or args.recursive

    def entries(self, tree: Tree, path: str) -> list[Item]:
        """The entries of directory ``path``, sorted, hidden ones as -a says."""
        names = [n for n in tree.listdir(path) if self.args.all or not n.startswith(".")]
        out: list[Item] = []
        if self.args.all:
            out.append((".", path, tree.stat(path) if self.needs_stat else None, tree))
            parent = posixpath.dirname(path.rstrip("/")) or "/"
            out.append(("..", parent, tree.stat(parent) if self.needs_stat else None, tree))
        for name in names:
            full = tree.join(path, name)
            st = None
            if self.needs_stat:
                st = self._lstat_or_report(tree, full)
                if st is None:
                    continue
            out.append((name, full, st, tree))
        return out

    def _lstat_or_report(self, tree: Tree, path: str) -> os.stat_result | None:
        st = None
        with self.ctx.each():
            st = tree.lstat(path)
        return st

    def show(self, items: list[Item], directory: bool) -> None:
        """Print one group of names (a directory's entries, or the operands that are not listed)."""
        if self.args.json:
            self.records += [F.entry_dict(full, st, _target(tree, full, st)) for name, full, st, tree in items
                             if name not in (".", "..") and st is not None]
            return
        if self.args.long:
            if directory:
                total = sum(st.st_blocks for _, _, st, _ in items if st is not None) // 2
                emit(f"total {F.human_size(total * 1024) if self.args.human else total}")
            rows, acl = [], []
            for name, full, st, tree in items:
                target = _target(tree, full, st)
                rows.append((st, name + (f" -> {target}" if target is not None else "")))
                acl.append(_has_acl(tree, full))
            for line in F.ls_long_lines(rows, self.args.human, self.now, acl):
                emit(line)
        elif self.wide:
            for line in F.columns([name for name, _, _, _ in items], terminal_width()):
                emit(line)
        else:
            for name, _, _, _ in items:
                emit(name)

    def directory(self, tree: Tree, path: str, header: bool) -> None:
        if not self.args.json:
            if self.sections:
                emit()
            if header:
                emit(f"{path}:")
        self.sections += 1
        items = self.entries(tree, path)
        self.show(items, True)
        if self.args.recursive:
            for name, full, st, _ in items:
                if name not in (".", "..") and st is not None and stat.S_ISDIR(st.st_mode):
                    with self.ctx.each():
                        self.directory(tree, full, True)


def cmd_ls(ctx: Context, args: argparse.Namespace) -> None:
    lister = Lister(ctx, args)
    files: list[Item] = []
    dirs: list[tuple[Tree, str]] = []
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg, "/")
            tree = ctx.tree(spec)
            st = tree.lstat(spec.path)
            if not args.long and not args.directory:
                st = _follow_if_dir(tree, spec.path, st)
            if stat.S_ISDIR(st.st_mode) and not args.directory:
                dirs.append((tree, spec.path))
            else:
                files.append((spec.path, spec.path, st, tree))
    files.sort(key=lambda item: item[0])       # each group sorted by name, as GNU ls sorts operands
    dirs.sort(key=lambda d: d[1])
    if files:                          # operands that are not listed as directories come first
        lister.show(files, False)
        lister.sections += 1
    header = len(files) + len(dirs) > 1 or args.recursive
    for tree, path in dirs:
        with ctx.each(tree.spec(path)):
            lister.directory(tree, path, header)
    if args.json:
        emit(F.to_json(lister.records))


def cmd_tree(ctx: Context, args: argparse.Namespace) -> None:
    spec = image_spec(args.path, "/")
    tree = ctx.tree(spec)
    st = tree.stat(spec.path)
    counts = [0, 0]                                     # directories, files
    emit(spec.text)
    if stat.S_ISDIR(st.st_mode):
        _tree_below(ctx, tree, spec.path, "", 1, args, counts)
        if counts[0] or counts[1]:                      # tree 2.x counts a top that lists anything
            counts[0] += 1
    emit()
    summary = F.plural(counts[0], "directory", "directories")
    if not args.dirs_only:
        summary += ", " + F.plural(counts[1], "file", "files")
    emit(summary)


def _tree_below(ctx: Context, tree: Tree, path: str, prefix: str, depth: int, args: argparse.Namespace,
                counts: list[int]) -> None:
    """The lines of ``tree(1)`` 2.x below ``path``: entries sorted, ``├──``/``└──`` branches, a
    continuing branch drawn ``│`` and two no-break spaces, as tree draws it in UTF-8."""
    if args.level is not None and depth > args.level:
        return
    items = []
    for name in tree.listdir(path):
        if not args.all and name.startswith("."):
            continue
        full = tree.join(path, name)
        st = tree.lstat(full)
        is_dir = stat.S_ISDIR(_follow_if_dir(tree, full, st).st_mode)
        if args.dirs_only and not is_dir:
            continue
        items.append((name, full, st, is_dir))
    for i, (name, full, st, is_dir) in enumerate(items):
        last = i == len(items) - 1
        target = _target(tree, full, st)
        emit(prefix + ("└── " if last else "├── ") + name + (f" -> {target}" if target is not None else ""))
        counts[0 if is_dir else 1] += 1
        if stat.S_ISDIR(st.st_mode):
            with ctx.each():
                below = prefix + ("    " if last else "│\u00a0\u00a0 ")
                _tree_below(ctx, tree, full, below, depth + 1, args, counts)


def cmd_stat(ctx: Context, args: argparse.Namespace) -> None:
    records = []
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec)
            st = tree.stat(spec.path) if args.dereference else tree.lstat(spec.path)
            target = _target(tree, spec.path, st)
            if args.json:
                rec = F.entry_dict(spec.path, st, target)
                rec["image"] = spec.image
                records.append(rec)
            else:
                _print_stat(spec.text, st, target, _birth(tree, spec.path, args.dereference))
    if args.json:
        emit(F.to_json(records))


def _birth(tree: Tree, path: str, follow: bool) -> int | None:
    """When an image's file was made (ext4's i_crtime, which stat(1) shows from statx), None
    where the inode has no such field or the file is local (os.stat has none)."""
    if tree.local:
        return None
    return tree.call(path, tree.fs.birthtime_ns, path, follow_symlinks=follow)


def _print_stat(shown: str, st: os.stat_result, target: str | None, birth_ns: int | None = None) -> None:
    """The lines ``stat(1)`` prints for one file."""
    name = shown + (f" -> {target}" if target is not None else "")
    emit(f"  File: {name}")
    emit(f"  Size: {st.st_size:<10}\tBlocks: {st.st_blocks:<10} IO Block: {st.st_blksize:<6} "
         f"{F.stat_type_name(st.st_mode, st.st_size)}")
    dev = f"Device: {st.st_dev:x}h/{st.st_dev}d\tInode: {st.st_ino:<11} Links: {st.st_nlink}"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        dev += f"     Device type: {os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
    emit(dev)
    user, group = F.user_name(st.st_uid), F.group_name(st.st_gid)
    emit(f"Access: ({stat.S_IMODE(st.st_mode):04o}/{stat.filemode(st.st_mode)})  "    # no name: as stat(1)
         f"Uid: ({st.st_uid:5}/{'UNKNOWN' if user == str(st.st_uid) else user:>8})   "
         f"Gid: ({st.st_gid:5}/{'UNKNOWN' if group == str(st.st_gid) else group:>8})")
    emit(f"Access: {F.stat_time(st.st_atime_ns)}")
    emit(f"Modify: {F.stat_time(st.st_mtime_ns)}")
    emit(f"Change: {F.stat_time(st.st_ctime_ns)}")
    emit(f" Birth: {F.stat_time(birth_ns) if birth_ns is not None else '-'}")


def cmd_cat(ctx: Context, args: argparse.Namespace) -> None:
    _flush_stdout()
    out = getattr(sys.stdout, "buffer", None)
    buf = memoryview(bytearray(CHUNK))
    for arg in args.paths:
        with ctx.each():
            spec = image_spec(arg)
            tree = ctx.tree(spec)
            with tree.open_read(spec.path) as f, about(spec):
                while True:
                    n = f.readinto(buf)
                    if not n:
                        break
                    if out is not None:
                        out.write(buf[:n])
                    else:
                        sys.stdout.write(bytes(buf[:n]).decode("utf-8", "surrogateescape"))
    if out is not None:
        out.flush()



def _add_inspect(add: Callable[..., argparse.ArgumentParser]) -> None:
    p = add("info", cmd_info, "show the superblock (like dumpe2fs -h)",
            "Show an image's superblock: geometry, counts, features, state, times, storage; for "
            "ext3/ext4 also what dumpe2fs -h shows of flex_bg, checksums, hashes, orphans and the "
            "journal, and why the image is read-only.",
            "JSON keys: image, image_size, storage, xip, label, uuid, revision, features, state, "
            "errors_behavior, inodes_count, blocks_count, reserved_blocks, free_blocks, "
            "free_inodes, first_data_block, block_size, inode_size, first_inode, blocks_per_group, "
            "inodes_per_group, inode_blocks_per_group, groups, created, mounted, written, "
            "checked (epoch seconds or null), mount_count, max_mount_count, writable, "
            "readonly_reason; for ext3/ext4 as dumpe2fs -h shows them (null where not set): type "
            "(ext2, ext3, ext4), flags, cluster_size, clusters_per_group, desc_size, "
            "reserved_gdt_blocks, first_meta_bg, flex_bg_size, overhead_clusters, kbytes_written, "
            "min_extra_isize, want_extra_isize, hash_version, hash_seed, checksum_type, checksum, "
            "checksum_seed (s_checksum_seed, with metadata_csum_seed), csum_seed (the seed in use), "
            "first_orphan, orphan_file_inode, needs_recovery (as the image says), journal_replayed "
            "(replayed in memory for reading), journal (inode, device, uuid, backup, size, error, "
            "superblock: version, block_size, blocks, first, sequence, start, errno, features, "
            "fast_commit_blocks, users, checksum_type, checksum, checksum_ok, needs_recovery, "
            "lines as dumpe2fs prints them); partition, offset (where the filesystem starts).")
    p.add_argument("image", metavar="IMAGE", help="the image to show")
    p.add_argument("--json", action="store_true", help="one JSON object")

    p = add("ls", cmd_ls, "list directory contents (like ls)",
            "List the entries of directories inside images (names sorted; dotfiles with -a).",
            ENTRY_KEYS_HELP + "\n\nexamples:\n  xipfs ls -l /dev/shm/site.img:/static\n"
            "  xipfs ls -laR --json site.img | jq '.[].path'", add_help=False)
    p.add_argument("paths", metavar="IMAGE[:PATH]", nargs="+", help="what to list (default PATH: /)")
    p.add_argument("-l", dest="long", action="store_true",
                   help="long listing: mode, links, owner, size, time")
    p.add_argument("-a", "--all", action="store_true", help="show entries starting with '.', and . and ..")
    p.add_argument("-R", "--recursive", action="store_true", help="list subdirectories too")
    p.add_argument("-d", "--directory", action="store_true", help="list directories themselves")
    p.add_argument("-h", "--human-readable", dest="human", action="store_true", help="sizes like 4.0K, 13M")
    p.add_argument("--json", action="store_true", help="one JSON list of entries")
    p.add_argument("--help", action="help", help="show this help message and exit")

    p = add("cat", cmd_cat, "write files to standard output",
            "Write the contents of files inside images to standard output, byte for byte.",
            "example:\n  xipfs cat /dev/shm/site.img:/index.html | head")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")

    p = add("stat", cmd_stat, "show a file's inode (like stat)",
            "Show what the inode of each path says, as stat(1) prints it (a symlink itself unless -L).",
            ENTRY_KEYS_HELP + " Each entry also has 'image'.")
    p.add_argument("paths", metavar="IMAGE:PATH", nargs="+", help="paths inside images")
    p.add_argument("-L", "--dereference", action="store_true", help="follow symlinks")
    p.add_argument("--json", action="store_true", help="one JSON list of entries")

    p = add("df", cmd_df, "show free space (like df -h)",
            "Show each image's size, used and available space (or inodes with -i).",
            "JSON: a list with the keys image, label, block_size, size, used, available (bytes), "
            "use_percent, inodes, inodes_used, inodes_free, inodes_use_percent.")
    p.add_argument("images", metavar="IMAGE", nargs="+", help="images to show")
    p.add_argument("-i", "--inodes", action="store_true", help="inodes instead of blocks")
    p.add_argument("-k", dest="human", action="store_false", default=True,
                   help="1K blocks instead of 4.0K, 13M")
    p.add_argument("--json", action="store_true", help="one JSON list")

    p = add("tree", cmd_tree, "show a directory tree (like tree)",
            "Show the tree below a directory inside an image, with the count line at the end.")
    p.add_argument("path", metavar="IMAGE[:PATH]", help="the directory to show (default PATH: /)")
    p.add_argument("-a", "--all", action="store_true", help="show entries starting with '.'")
    p.add_argument("-d", dest="dirs_only", action="store_true", help="directories only")
    p.add_argument("-L", dest="level", type=int, default=None, metavar="LEVEL", help="descend LEVEL levels")

    p = add("check", cmd_check, "check an image's consistency (like e2fsck -fn)",
            "Check an image read-only, the way e2fsck's passes do: superblock and descriptors, "
            "bitmaps, free counts, link counts, directories, blocks claimed twice, sizes. Exit "
            "status 0 when clean, 1 when problems were found.",
            "JSON keys: image, clean, count, problems (each: code, message, ino, block, path).")
    p.add_argument("image", metavar="IMAGE", help="the image to check (opened read-only)")
    p.add_argument("--json", action="store_true", help="one JSON object")
