"""Source trees for the image tests: a seeded-random generator, a hypothesis strategy, a recorder.

``build_tree(root, seed)`` writes a tree that exercises every corner of ext2 that ``mke2fs -d``
can copy: long and non-UTF-8 names, files of every interesting size around the direct/indirect
boundaries of all block sizes, sparse files with holes at the indirect-block boundaries, fast and
slow symlinks (59/60/61 bytes), dangling/relative/absolute symlinks and loops, hard links, FIFOs,
device nodes (old and new encodings), sockets, user/trusted/security xattrs and POSIX ACLs (in the
inode and spilling into an xattr block), setuid/setgid/sticky modes, 32-bit uids and negative
times.

``record_tree(root)`` walks a source tree with ``os.lstat``/``os.readlink``/``os.listxattr`` and
returns what an image built from it must show. Paths are bytes, relative to the tree root and
spelled ``b"/a/b"`` (the root is ``b"/"``), so names that are not UTF-8 survive unchanged.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import stat
import struct
from dataclasses import dataclass, field

try:  # the strategy is optional: the generator works without hypothesis
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

BLOCK_SIZES = (1024, 2048, 4096)
#: 2030-01-01. Every atime is set here: later than every mtime and ctime and in the future, so
#: reading the source (mke2fs, the recorder) never moves it under relatime.
ATIME = 1_893_456_000
#: Fixed mtimes used by the generator (all within the signed 32-bit range ext2 stores, and below
#: ATIME: relatime would move an atime that is not later than the mtime).
MTIMES = (0, 1, 1_000_000_000, 1_234_567_890, ATIME - 1, -100_000_000, -(2**31))
#: The largest time ext2 stores, used as an atime (mtime one second earlier).
TIME_MAX = 2**31 - 1

KINDS = {
    stat.S_IFDIR: "dir", stat.S_IFREG: "reg", stat.S_IFLNK: "lnk", stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock",
}


def apb(bs: int) -> int:
    """Block addresses per indirect block."""
    return bs // 4


def indirect_starts(bs: int) -> tuple[int, int, int]:
    """First file block mapped through the single, double and triple indirect block."""
    a = apb(bs)
    return 12, 12 + a, 12 + a + a * a


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """A ``system.posix_acl_*`` value in the kernel's xattr wire format (version 2)."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", t, p, i) for t, p, i in entries)


ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20
NOID = 0xFFFFFFFF
ACL_ACCESS = posix_acl([(ACL_USER_OBJ, 6, NOID), (ACL_USER, 4, 1000), (ACL_GROUP_OBJ, 4, NOID),
                        (ACL_GROUP, 6, 2000), (ACL_MASK, 6, NOID), (ACL_OTHER, 0, NOID)])
ACL_DEFAULT = posix_acl([(ACL_USER_OBJ, 7, NOID), (ACL_USER, 5, 1001), (ACL_GROUP_OBJ, 5, NOID),
                         (ACL_MASK, 5, NOID), (ACL_OTHER, 5, NOID)])


# -- writing a tree -----------------------------------------------------------------------------
class TreeBuilder:
    """Writes entries under ``root``; metadata (owners, modes, times) is applied by :meth:`finish`.

    Owners, modes and times are set last, children before parents, so that nothing done later
    (creating an entry, setting an ACL, chown clearing setuid) changes them again.
    """

    def __init__(self, root: str | bytes, rng: random.Random) -> None:
        self.root = os.fsencode(root)
        self.rng = rng
        self.owners: dict[bytes, tuple[int, int]] = {}
        self.modes: dict[bytes, int] = {}
        self.mtimes: dict[bytes, int] = {}
        self.atimes: dict[bytes, int] = {}
        os.makedirs(self.root, exist_ok=True)

    def p(self, rel: str | bytes) -> bytes:
        rel = os.fsencode(rel)
        return self.root + b"/" + rel.lstrip(b"/") if rel.strip(b"/") else self.root

    def data(self, n: int) -> bytes:
        """``n`` random bytes (never a whole zero block, so mke2fs keeps every block)."""
        return self.rng.randbytes(n)

    def dir(self, rel: str | bytes, mode: int | None = None) -> bytes:
        path = self.p(rel)
        os.makedirs(path, exist_ok=True)
        if mode is not None:
            self.modes[path] = mode
        return path

    def file(self, rel: str | bytes, data: bytes | int = 0, mode: int | None = None) -> bytes:
        path = self.p(rel)
        if isinstance(data, int):
            data = self.data(data)
        with open(path, "wb") as f:
            f.write(data)
        if mode is not None:
            self.modes[path] = mode
        return path

    def sparse(self, rel: str | bytes, size: int, pieces: list[tuple[int, int]]) -> bytes:
        """A file of ``size`` bytes holding random data only at ``(offset, length)`` pieces."""
        path = self.p(rel)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for off, n in pieces:
                os.pwrite(fd, self.data(n), off)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return path

    def symlink(self, rel: str | bytes, target: str | bytes) -> bytes:
        path = self.p(rel)
        os.symlink(os.fsencode(target), path)
        return path

    def hardlink(self, rel: str | bytes, existing: str | bytes) -> bytes:
        path = self.p(rel)
        os.link(self.p(existing), path, follow_symlinks=False)
        return path

    def fifo(self, rel: str | bytes) -> bytes:
        path = self.p(rel)
        os.mkfifo(path, 0o644)
        return path

    def device(self, rel: str | bytes, kind: int, major: int, minor: int) -> bytes:
        path = self.p(rel)
        os.mknod(path, kind | 0o640, os.makedev(major, minor))
        return path

    def sock(self, rel: str | bytes) -> bytes:
        path = self.p(rel)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.bind(path)
        finally:
            s.close()
        return path

    def xattr(self, rel: str | bytes, name: str, value: bytes) -> None:
        os.setxattr(self.p(rel), name, value, follow_symlinks=False)

    def owner(self, rel: str | bytes, uid: int, gid: int) -> None:
        self.owners[self.p(rel)] = (uid, gid)

    def mode(self, rel: str | bytes, mode: int) -> None:
        self.modes[self.p(rel)] = mode

    def mtime(self, rel: str | bytes, mtime: int, atime: int = ATIME) -> None:
        self.mtimes[self.p(rel)] = mtime
        self.atimes[self.p(rel)] = atime

    def finish(self) -> None:
        """Owners, then modes, then times; deepest paths first, the root last."""
        for path, (uid, gid) in self.owners.items():
            os.chown(path, uid, gid, follow_symlinks=False)
        for path, mode in self.modes.items():
            os.chmod(path, mode)
        paths = [self.root]
        for top, dirs, files in os.walk(self.root):
            paths.extend(os.path.join(top, n) for n in dirs + files)
        paths.sort(key=lambda p: (-p.count(b"/"), p))
        for i, path in enumerate(paths):
            mtime = self.mtimes.get(path, 1_500_000_000 + 37 * i)
            os.utime(path, (self.atimes.get(path, ATIME), mtime), follow_symlinks=False)


def _names_long() -> list[bytes]:
    """Names at the 255-byte limit and others that break naive code."""
    return [
        b"L" * 255,
        "é".encode() * 127 + b"x",                    # 255 bytes of 2-byte UTF-8
        "😀".encode() * 63 + b"abc",                   # 255 bytes of 4-byte UTF-8
        "漢".encode() * 85,                            # 255 bytes of 3-byte UTF-8
        b"M" * 254,
        b"bad-\xff\xfe-utf8",                          # not UTF-8
        b"latin1-caf\xe9",                             # Latin-1, not UTF-8
        b"\x80",                                       # a lone continuation byte
        b"\xed\xa0\x80surrogate",                      # an encoded surrogate (invalid UTF-8)
        "café".encode(),                               # NFC ...
        "cafe\u0301".encode(),                         # ... and NFD: two different names
        b"Case", b"case", b"with space", b" lead-space", b"trail-space ", b"new\nline",
        b"tab\tchar", b"back\\slash", b"colon:semi;", b"-dash", b".hidden", b"...", b"a",
        b"quote\"s'", b"star*?[glob]", b"\x01ctrl", b"\x7fdel",
    ]


def build_tree(root: str | bytes, seed: int = 1234, *, random_files: int = 60, big: bool = True) -> None:
    """Write the standard test tree under ``root`` (deterministic for a given ``seed``).

    ``big=False`` leaves out the files of more than 300 KiB of data (about 1.5 MiB in all).
    """
    rng = random.Random(seed)
    b = TreeBuilder(root, rng)

    # -- sizes around every block-size boundary ------------------------------------------------
    b.dir("sizes")
    b.file("empty", 0)
    sizes = {1, 2, 59, 60, 61, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537}
    for bs in BLOCK_SIZES:
        ind, dind, _ = indirect_starts(bs)
        sizes |= {bs - 1, bs, bs + 1, ind * bs - 1, ind * bs, ind * bs + 1}
        sizes.add(dind * bs + 1)                     # one byte into the double-indirect range
    for n in sorted(sizes):
        if big or n <= 300 * 1024:
            b.file(f"sizes/f{n}", n)
    if big:
        b.file("sizes/big-6MiB", 6 * 1024 * 1024 + 333)   # double-indirect at every block size
    text = "line one\nligne deux é\r\nthird\rfourth 漢字\n" * 300
    b.file("sizes/text.txt", text.encode())

    # -- sparse files: holes at the indirect-block boundaries of every block size -------------
    b.dir("sparse")
    for bs in BLOCK_SIZES:
        ind, dind, tind = indirect_starts(bs)
        blocks = [0, 11, ind, ind + 1, dind - 1, dind, dind + 1]
        if bs == 1024:                               # triple indirect: 64 MiB of holes, cheap
            blocks += [tind - 1, tind, tind + 2]
        pieces = [(blk * bs, bs) for blk in blocks]
        end = (blocks[-1] + 1) * bs
        b.sparse(f"sparse/holes-bs{bs}", end + 5 * bs + 123, pieces)   # ends in a hole
        b.sparse(f"sparse/holes-bs{bs}-dataend", end - bs // 2, pieces)  # ends mid data block
    b.sparse("sparse/all-hole", 3 * 1024 * 1024 + 1, [])
    b.sparse("sparse/leading-hole", 300 * 1024 + 17, [(300 * 1024, 17)])
    b.sparse("sparse/partial-blocks", 200_000, [(5000, 100), (70_001, 3000), (199_990, 10)])
    b.sparse("sparse/hole-in-middle", 64 * 1024 * 3, [(0, 65536), (2 * 65536, 65536)])

    # -- names --------------------------------------------------------------------------------
    b.dir("names")
    for name in _names_long():
        b.file(b"names/" + name, rng.randrange(0, 3000))
    b.dir(b"names/" + "Ünïcødé-dir-😀".encode())
    b.file(b"names/" + "Ünïcødé-dir-😀".encode() + b"/inner \xff", 10)
    b.dir("names/many")                               # > 12 blocks of entries at 1 KiB
    for i in range(420):
        name = f"entry-{i:04d}-" + "x" * (i % 50) + ("-ü" if i % 7 == 0 else "")
        b.file(f"names/many/{name}", i % 5)
    deep = "deep"
    for i in range(24):
        deep += f"/level{i:02d}"
    b.dir(deep)
    b.file(deep + "/bottom", b"the bottom\n")

    # -- symlinks -----------------------------------------------------------------------------
    b.dir("links")
    b.file("links/target", b"target data\n")
    for n in (1, 2, 30, 58, 59, 60, 61, 62, 100, 500, 1000, 1023):
        # a path to "target" of exactly n bytes ("././/target"), dangling filler when n < 7
        k, odd = divmod(n - 6, 2)
        t = "./" * k + "/" * odd + "target" if n >= 8 else "t" * n
        b.symlink(f"links/len{n}", t)
    b.symlink("links/len-utf8", "ünïcødé-ziel-" + "😀" * 5)
    b.symlink("links/len-bad-bytes", b"bad\xff\xfetarget")
    b.symlink("links/dangling", "does/not/exist")
    b.symlink("links/dangling-abs", "/no/such/path/anywhere")
    b.symlink("links/rel-file", "../sizes/f1")
    b.symlink("links/abs-file", "/sizes/f1")
    b.symlink("links/rel-dir", "../names")
    b.symlink("links/abs-dir", "/deep/level00/level01")
    b.symlink("links/dot", ".")
    b.symlink("links/dotdot", "..")
    b.symlink("links/root", "/")
    b.symlink("links/to-link", "rel-file")
    b.symlink("links/to-dir-link", "rel-dir")
    b.symlink("links/slash-end", "../names/")
    b.symlink("links/messy", ".//..//sizes/./f2")
    b.symlink("links/up-through", "rel-dir/../sizes/f1")
    b.symlink("links/loop-self", "loop-self")
    b.symlink("links/loop-a", "loop-b")
    b.symlink("links/loop-b", "loop-a")
    b.symlink("links/loop-dir", "loop-dir/x")
    b.symlink("links/slow-dir", "./" * 40 + "../deep/level00")
    b.dir("links/chain")                              # 41 links: the kernel follows at most 40
    b.file("links/chain/end", b"end of chain\n")
    for i in range(41):
        b.symlink(f"links/chain/l{i:02d}", f"l{i + 1:02d}" if i < 40 else "end")
    b.dir("links/sub")
    b.symlink("links/sub/up2", "../../links/sub/..")
    b.dir("dots")                                     # '.' and trailing '/' demand a directory
    b.file("dots/file", b"a file\n")
    b.symlink("dots/file-slash", "file/")             # ENOTDIR, like "file/"
    b.symlink("dots/file-dot", "file/.")              # ENOTDIR
    b.symlink("dots/file-dot-dot", "./file/./.")      # ENOTDIR
    b.symlink("dots/dir-slash", "../names/")          # fine: a directory
    b.symlink("dots/dir-dot", "../names/./.")
    b.symlink("dots/link-dot", "dir-slash/.")         # follows dir-slash, then '.'
    b.symlink("dots/dangling-dot", "nothing/.")       # ENOENT
    b.dir("walk/a/b")                                 # symlinks to dirs without cycles (followlinks)
    b.file("walk/a/f", 3)
    b.file("walk/a/b/g", 4)
    b.symlink("walk/to-hard", "../hard")
    b.symlink("walk/a/to-other", "../../hard/other")
    b.symlink("walk/a/b/to-file", "../f")

    # -- hard links ---------------------------------------------------------------------------
    b.dir("hard")
    b.dir("hard/other")
    b.file("hard/a", 5000)
    b.hardlink("hard/a2", "hard/a")
    b.hardlink("hard/other/a3", "hard/a")
    b.file("hard/empty", 0)
    b.hardlink("hard/empty2", "hard/empty")
    b.symlink("hard/sym", "a")          # (mke2fs -d does not keep hard links to symlinks)
    b.fifo("hard/fifo")
    b.hardlink("hard/fifo2", "hard/fifo")
    b.file("hard/xattr", 100)
    b.xattr("hard/xattr", "user.shared", b"by every link")
    b.hardlink("hard/other/xattr2", "hard/xattr")

    # -- special files ------------------------------------------------------------------------
    b.dir("special")
    b.fifo("special/fifo")
    b.device("special/null", stat.S_IFCHR, 1, 3)
    b.device("special/zero-dev", stat.S_IFCHR, 0, 0)
    b.device("special/chr-255", stat.S_IFCHR, 255, 255)    # largest old-encoding numbers
    b.device("special/chr-256", stat.S_IFCHR, 256, 1)      # needs the new encoding
    b.device("special/chr-max", stat.S_IFCHR, 4095, 0xFFFFF)
    b.device("special/sda1", stat.S_IFBLK, 8, 1)
    b.device("special/blk-big", stat.S_IFBLK, 259, 70000)
    b.sock("special/socket")

    # -- extended attributes ------------------------------------------------------------------
    b.dir("xattr")
    b.file("xattr/small", 10)
    b.xattr("xattr/small", "user.a", b"1")
    b.file("xattr/empty-value", 10)
    b.xattr("xattr/empty-value", "user.empty", b"")
    b.file("xattr/binary", 10)
    b.xattr("xattr/binary", "user.bin", bytes(range(256))[:200])
    b.file("xattr/large", 10)
    b.xattr("xattr/large", "user.large", b"L" * 700)     # only an xattr block holds it
    b.file("xattr/spill", 10)                              # more than the inode body holds
    for i in range(20):
        b.xattr("xattr/spill", f"user.attr{i:02d}", bytes([65 + i]) * (i + 3))
    b.file("xattr/long-name", 10)
    b.xattr("xattr/long-name", "user." + "n" * 200, b"v")
    b.xattr("xattr/long-name", "user.ünï", "välue".encode())
    b.file("xattr/namespaces", 10)
    b.xattr("xattr/namespaces", "trusted.t", b"trusted value")
    b.xattr("xattr/namespaces", "security.s", b"security value")
    b.xattr("xattr/namespaces", "user.u", b"user value")
    b.file("xattr/acl", 10)
    b.xattr("xattr/acl", "system.posix_acl_access", ACL_ACCESS)
    b.dir("xattr/acl-dir")
    b.xattr("xattr/acl-dir", "system.posix_acl_default", ACL_DEFAULT)
    b.xattr("xattr/acl-dir", "user.on-a-dir", b"dir value")
    b.symlink("xattr/symlink", "small")
    b.xattr("xattr/symlink", "trusted.on-a-symlink", b"link value")
    b.fifo("xattr/fifo")
    b.xattr("xattr/fifo", "trusted.on-a-fifo", b"fifo value")
    b.file("xattr/same1", 1)
    b.file("xattr/same2", 1)
    for rel in ("xattr/same1", "xattr/same2"):     # identical sets: a shareable block
        for i in range(6):
            b.xattr(rel, f"user.same{i}", b"S" * 60)

    # -- modes, owners, times -----------------------------------------------------------------
    b.dir("modes")
    for mode in (0o4755, 0o2755, 0o6711, 0o1644, 0o7777, 0o000, 0o777, 0o600, 0o444):
        b.file(f"modes/m{mode:04o}", 3, mode=mode)
    b.dir("modes/sticky-dir", mode=0o1777)
    b.dir("modes/setgid-dir", mode=0o2750)
    b.dir("modes/closed-dir", mode=0o000)
    b.file("modes/closed-dir/inside", 7)
    owners = [(0, 0), (1000, 1000), (65534, 65534), (65535, 1), (65536, 65537),
              (100_000, 200_000), (4_000_000_000, 4_000_000_001)]
    for uid, gid in owners:
        rel = f"modes/own-{uid}-{gid}"
        b.file(rel, 1)
        b.owner(rel, uid, gid)
    b.symlink("modes/own-link", "m0777")
    b.owner("modes/own-link", 1234, 5678)
    b.owner("modes/sticky-dir", 4321, 8765)
    for t in MTIMES:
        rel = f"modes/time{t}"
        b.file(rel, 1)
        b.mtime(rel, t)
    b.file("modes/time-max")
    b.mtime("modes/time-max", TIME_MAX - 1, TIME_MAX)
    b.mtime("modes/own-link", 1_111_111_111)
    b.mtime("modes/sticky-dir", 999_999_999)

    # -- a seeded-random part -----------------------------------------------------------------
    random_tree(b, "rand", random_files)
    b.finish()


_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.,+=@~ äöüßé€漢字😀"


def random_name(rng: random.Random, taken: set[bytes]) -> bytes:
    while True:
        r = rng.random()
        if r < 0.05:
            byte_values = [c for c in range(1, 256) if c != 0x2F]
            name = bytes(rng.choice(byte_values) for _ in range(rng.randint(1, 12)))
        elif r < 0.1:
            name = ("".join(rng.choice(_ALPHABET) for _ in range(80)).encode() * 4)[:255]
        else:
            name = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(1, 40))).encode()
        name = name[:255]
        if name not in (b".", b"..") and name not in taken and b"/" not in name:
            taken.add(name)
            return name


def random_tree(b: TreeBuilder, top: str, n_files: int) -> None:
    """``n_files`` random entries under ``top``: files, dirs, symlinks, hard links, xattrs."""
    rng = b.rng
    dirs: list[bytes] = [os.fsencode(top)]
    b.dir(top)
    taken: dict[bytes, set[bytes]] = {dirs[0]: set()}
    files: list[bytes] = []
    for _ in range(n_files):
        parent = rng.choice(dirs)
        name = random_name(rng, taken[parent])
        rel = parent + b"/" + name
        r = rng.random()
        if r < 0.15:
            b.dir(rel)
            dirs.append(rel)
            taken[rel] = set()
            continue
        if r < 0.25:
            depth = parent.count(b"/") + 1
            other = rng.choice(dirs + files)
            b.symlink(rel, b"../" * depth + other if rng.random() < 0.7 else b"/" + other)
            continue
        if r < 0.3 and files:
            b.hardlink(rel, rng.choice(files))
            continue
        size = rng.choice([0, rng.randint(1, 100), rng.randint(100, 5000), rng.randint(5000, 150_000)])
        b.file(rel, size, mode=rng.choice([0o644, 0o600, 0o755, 0o4755]))
        files.append(rel)
        if rng.random() < 0.3:
            b.xattr(rel, "user.r", b.data(rng.randint(0, 300)))


# -- hypothesis: small random trees ------------------------------------------------------------
if st is not None:
    _name = st.binary(min_size=1, max_size=40).filter(
        lambda n: b"/" not in n and b"\0" not in n and n not in (b".", b".."))
    _node = st.deferred(lambda: st.one_of(
        st.tuples(st.just("reg"), st.integers(0, 70_000), st.sampled_from([0o644, 0o4755, 0o600])),
        st.tuples(st.just("sparse"), st.integers(1, 400_000), st.lists(st.integers(0, 390), max_size=4)),
        st.tuples(st.just("lnk"), st.binary(min_size=1, max_size=120).filter(lambda t: b"\0" not in t)),
        st.tuples(st.just("fifo")),
        st.tuples(st.just("xattr"), st.integers(0, 60_000), st.binary(max_size=200)),
        st.tuples(st.just("dir"), st.dictionaries(_name, _node, max_size=4)),
    ))
    #: A tree: ``{name: node}``; a node is ``("reg", size, mode)``, ``("sparse", size, [KiB...])``,
    #: ``("lnk", target)``, ``("fifo",)``, ``("xattr", size, value)`` or ``("dir", {...})``.
    #: (Not ``lost+found`` at the top: ``mke2fs -d`` refuses a tree whose lost+found is not a
    #: directory.)
    tree_specs = st.dictionaries(_name.filter(lambda n: n != b"lost+found"), _node, min_size=1, max_size=6)
else:  # pragma: no cover
    tree_specs = None


def build_spec(root: str | bytes, spec: dict, seed: int = 0) -> None:
    """Write a tree drawn from :data:`tree_specs` under ``root``."""
    b = TreeBuilder(root, random.Random(seed))

    def walk(rel: bytes, nodes: dict) -> None:
        for name, node in nodes.items():
            path = rel + b"/" + name if rel else name
            kind = node[0]
            if kind == "reg":
                b.file(path, node[1], mode=node[2])
            elif kind == "sparse":
                b.sparse(path, node[1], [(k * 1024, 1024) for k in node[2] if (k + 1) * 1024 <= node[1]])
            elif kind == "lnk":
                b.symlink(path, node[1])
            elif kind == "fifo":
                b.fifo(path)
            elif kind == "xattr":
                b.file(path, node[1])
                b.xattr(path, "user.h", node[2])
            else:
                b.dir(path)
                walk(path, node[1])

    walk(b"", spec)
    b.finish()


# -- recording what an image must show ---------------------------------------------------------
@dataclass
class Node:
    """One entry of a source tree, as ``os`` sees it."""

    path: bytes                        # b"/a/b"
    src: bytes                         # absolute source path
    kind: str                          # dir reg lnk fifo chr blk sock
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int
    atime: int
    mtime: int
    ctime: int
    rdev: int
    src_ino: int
    target: bytes | None = None
    sha256: str | None = None
    xattrs: dict[str, bytes] = field(default_factory=dict)
    children: list[bytes] = field(default_factory=list)


def record_tree(root: str | bytes) -> dict[bytes, Node]:
    """Everything ``os`` shows of the tree under ``root``, keyed by ``b"/rel/path"``."""
    root = os.fsencode(root).rstrip(b"/")
    out: dict[bytes, Node] = {}

    def visit(src: bytes, rel: bytes) -> None:
        st_ = os.lstat(src)
        kind = KINDS[stat.S_IFMT(st_.st_mode)]
        node = Node(
            path=rel, src=src, kind=kind, mode=st_.st_mode, uid=st_.st_uid, gid=st_.st_gid,
            size=st_.st_size, nlink=st_.st_nlink, atime=st_.st_atime_ns // 10**9,
            mtime=st_.st_mtime_ns // 10**9, ctime=st_.st_ctime_ns // 10**9,
            rdev=st_.st_rdev if kind in ("chr", "blk") else 0, src_ino=st_.st_ino)
        node.xattrs = {n: os.getxattr(src, n, follow_symlinks=False)
                       for n in os.listxattr(src, follow_symlinks=False)}
        if kind == "lnk":
            node.target = os.readlink(src)
        elif kind == "reg":
            h = hashlib.sha256()
            with open(src, "rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
            node.sha256 = h.hexdigest()
        elif kind == "dir":
            node.children = sorted(os.listdir(src))
        out[rel] = node
        if kind == "dir":
            for name in node.children:
                visit(src + b"/" + name, (rel if rel != b"/" else b"") + b"/" + name)

    visit(root, b"/")
    return out


def data_ranges(path: str | bytes) -> list[tuple[int, int]]:
    """``[(start, end)]`` data ranges of a source file per SEEK_DATA/SEEK_HOLE."""
    out = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, end))
            pos = end
    finally:
        os.close(fd)
    return out


# -- checking a filesystem against a record ----------------------------------------------------
#: Names mke2fs adds to the root of every image it builds from a source tree.
IMAGE_ROOT_EXTRA = (b"lost+found",)


def _join(top: bytes, name: bytes) -> bytes:
    return (top if top != b"/" else b"") + b"/" + name


def check_names(fs, nodes: dict[bytes, Node], root_extra=IMAGE_ROOT_EXTRA) -> None:
    """listdir (bytes and str) and scandir of every directory against the source names."""
    for path, node in nodes.items():
        if node.kind != "dir":
            continue
        expected = set(node.children) | (set(root_extra) if path == b"/" else set())
        names = fs.listdir(path)
        assert len(names) == len(set(names)), f"duplicate names in {path!r}"
        assert set(names) == expected, path
        assert all(isinstance(n, bytes) for n in names)
        str_names = fs.listdir(os.fsdecode(path))
        assert str_names == [os.fsdecode(n) for n in names], path
        with fs.scandir(path) as it:
            entries = list(it)
        assert [e.name for e in entries] == names, path
        for e in entries:
            assert e.path == _join(path, e.name)
            child = nodes.get(e.path)
            if child is None:
                continue
            assert e.is_symlink() == (child.kind == "lnk"), e.path
            assert e.is_dir(follow_symlinks=False) == (child.kind == "dir"), e.path
            assert e.is_file(follow_symlinks=False) == (child.kind == "reg"), e.path
            assert e.inode() == fs.lstat(e.path).st_ino, e.path
            assert e.stat(follow_symlinks=False) == fs.lstat(e.path), e.path
            assert os.fspath(e) == e.path


def check_lstat(fs, nodes: dict[bytes, Node], bs: int, *, times: bool = True, inline: bool = False) -> None:
    """lstat of every entry: type, mode, owner, size, links, times (seconds), rdev. With
    ``inline`` (ext4 inline_data) a small directory may live in its inode (size 60 and up)."""
    dev = None
    for path, node in nodes.items():
        st_ = fs.lstat(path)
        assert stat.S_IFMT(st_.st_mode) == stat.S_IFMT(node.mode), path
        assert st_.st_blksize == bs
        assert fs.stat(path, follow_symlinks=False) == st_, path
        dev = st_.st_dev if dev is None else dev
        assert st_.st_dev == dev
        extra_links = 1 if path == b"/" else 0           # lost+found
        assert st_.st_nlink == node.nlink + extra_links, path
        if node.kind in ("reg", "lnk"):
            assert st_.st_size == node.size, path
        elif node.kind == "dir":
            assert st_.st_size > 0 and (st_.st_size % bs == 0 or inline and st_.st_size < bs), path
        else:
            assert st_.st_size == 0, path
        assert st_.st_rdev == node.rdev, path
        if path == b"/":                                 # mke2fs makes the root itself
            continue
        assert st_.st_mode == node.mode, path
        assert (st_.st_uid, st_.st_gid) == (node.uid, node.gid), path
        if times:                                        # mke2fs -d stores whole seconds
            assert st_.st_mtime_ns == node.mtime * 10**9, path
            assert st_.st_atime_ns == node.atime * 10**9, path
            assert st_.st_ctime_ns == node.ctime * 10**9, path
            assert st_.st_mtime == node.mtime, path


def check_hardlinks(fs, nodes: dict[bytes, Node]) -> None:
    """Names of one source inode share one image inode; different ones never do."""
    groups: dict[int, list[bytes]] = {}
    for path, node in nodes.items():
        groups.setdefault(node.src_ino, []).append(path)
    seen: dict[int, int] = {}
    for src_ino, paths in groups.items():
        inos = {fs.lstat(p).st_ino for p in paths}
        assert len(inos) == 1, paths
        ino = inos.pop()
        assert ino not in seen, (paths, seen.get(ino))
        seen[ino] = src_ino
        if nodes[paths[0]].kind != "dir":
            assert fs.lstat(paths[0]).st_nlink == len(paths), paths


def check_symlinks(fs, nodes: dict[bytes, Node]) -> None:
    for path, node in nodes.items():
        if node.kind == "lnk":
            assert fs.readlink(path) == node.target, path
            assert fs.readlink(os.fsdecode(path)) == os.fsdecode(node.target), path
            assert fs.islink(path)


def check_xattrs(fs, nodes: dict[bytes, Node]) -> None:
    for path, node in nodes.items():
        if path == b"/":
            continue
        names = fs.listxattr(path, follow_symlinks=False)
        assert sorted(names) == sorted(node.xattrs), path
        for name, value in node.xattrs.items():
            assert fs.getxattr(path, name, follow_symlinks=False) == value, (path, name)


def check_content(fs, nodes: dict[bytes, Node]) -> None:
    for path, node in nodes.items():
        if node.kind == "reg":
            data = fs.read_bytes(path)
            assert len(data) == node.size, path
            assert hashlib.sha256(data).hexdigest() == node.sha256, path


def check_against_tree(fs, nodes: dict[bytes, Node], bs: int, *, xattrs: bool = True,
                       root_extra=IMAGE_ROOT_EXTRA, inline: bool = False) -> None:
    """Everything xipfs shows of ``fs`` against the recorded source tree (``inline``: an
    inline_data image Linux wrote, see :func:`check_lstat`)."""
    check_names(fs, nodes, root_extra)
    check_lstat(fs, nodes, bs, inline=inline, times=not inline)
    check_hardlinks(fs, nodes)
    check_symlinks(fs, nodes)
    check_content(fs, nodes)
    if xattrs:
        check_xattrs(fs, nodes)


def check_against_kernel(fs, snapshot: dict[bytes, dict]) -> None:
    """Everything xipfs shows against the kernel's view of the same image (a mount snapshot)."""
    fields = ("st_mode", "st_ino", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks",
              "st_rdev", "st_atime_ns", "st_mtime_ns", "st_ctime_ns")
    for path, rec in snapshot.items():
        want = rec["stat"]
        got = fs.lstat(path)
        for f in fields:
            assert getattr(got, f) == getattr(want, f), (path, f, getattr(got, f), getattr(want, f))
        got_x = {n: fs.getxattr(path, n, follow_symlinks=False)
                 for n in fs.listxattr(path, follow_symlinks=False)}
        assert got_x == rec["xattrs"], path
        if "target" in rec:
            assert fs.readlink(path) == rec["target"], path
        if "names" in rec:
            assert set(fs.listdir(path)) == rec["names"], path
        if "sha256" in rec:
            assert hashlib.sha256(fs.read_bytes(path)).hexdigest() == rec["sha256"], path
    assert set(snapshot) == set(_all_paths(fs))


def _all_paths(fs) -> list[bytes]:
    out = [b"/"]
    for top, dirs, files in fs.walk(b"/"):
        out.extend(_join(top, n) for n in dirs + files)
    return out
