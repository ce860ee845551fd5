"""Remote images read lazily: a read-only device over HTTP range requests (or any fsspec URL).

Only the bytes asked for cross the network, through the bounded :class:`~.file.PageCache`,
with readahead that grows while reads stay sequential (Linux's ondemand readahead: a small
first window, doubled on every sequential miss up to a cap, back to small on a seek). Reads as
large as a window go from the socket straight into the caller's buffer, and a sequential run's
request asks for as much again as the run has read, streamed into the next reads: requests
double, as curl makes one, instead of one per read.
http and https use one keep-alive ``http.client`` connection per device (the standard library
alone); other schemes (``s3://``, ``gs://``, ``file://``, chains) go through fsspec. A server
that goes away gives an ``OSError`` after a bounded wait and a few retries, never a hang; one
that answers a range request with the whole object gives ``OSError(EOPNOTSUPP)``.
"""

from __future__ import annotations

import base64
import errno
import http.client
import os
import re
import socket
import threading
import time
import urllib.parse
import weakref
from collections.abc import Iterator
from typing import Any

from .base import Device

#: Seconds a connect or a read may wait on the server (``XIPFS_REMOTE_TIMEOUT``).
DEFAULT_TIMEOUT = float(os.environ.get("XIPFS_REMOTE_TIMEOUT", "30"))
#: Attempts of one range request on a broken connection (reconnecting between them).
DEFAULT_RETRIES = 3
#: Readahead: the first window on a miss, and the cap it doubles up to on sequential reads.
READAHEAD_MIN = 64 * 1024
READAHEAD_MAX = 8 * 1024 * 1024
#: A read of at least STREAM_MIN bytes that continues a sequential run asks for as much more
#: as the run read, up to STREAM_AHEAD, and leaves it streaming for the next reads.
STREAM_MIN = 256 * 1024
STREAM_AHEAD = 64 * 1024 * 1024
#: Redirects followed when a remote image is opened (then its final place is read).
MAX_REDIRECTS = 5
#: Page cache in front of a remote device.
REMOTE_CACHE_BYTES = 64 * 1024 * 1024

_TRANSIENT = (ConnectionError, http.client.HTTPException, socket.timeout, TimeoutError, OSError)


class RemoteInfo:
    """What the store says about an object: size, validators (ETag / Last-Modified), checksum."""

    def __init__(self, size: int, etag: str | None = None, last_modified: str | None = None,
                 md5: bytes | None = None, sha256: bytes | None = None) -> None:
        self.size = size
        self.etag = etag
        self.last_modified = last_modified
        self.md5 = md5
        self.sha256 = sha256

    def validator(self) -> str:
        """One string that changes when the object changes (ETag, else Last-Modified, and size)."""
        return f"{self.size}|{self.etag or ''}|{self.last_modified or ''}"


#: Server-side encryption under which an S3 ETag is not the object's MD5.
_SSE_NOT_MD5 = ("aws:kms", "aws:kms:dsse")


def _s3_etag_is_md5(headers: Any) -> bool:
    """An S3 answer (``x-amz-*`` headers) whose ETag S3 makes the MD5: not under SSE-KMS or
    SSE-C. Other servers' ETags are opaque."""
    if not any(k.lower().startswith("x-amz-") for k in headers):
        return False
    sse = (headers.get("x-amz-server-side-encryption") or "").lower()
    return sse not in _SSE_NOT_MD5 and not headers.get("x-amz-server-side-encryption-customer-algorithm")


def _md5_of_etag(etag: str | None) -> bytes | None:
    """An S3-style ETag that is a plain MD5 (32 hex digits, not a multipart ``-N`` one)."""
    if not etag:
        return None
    tag = etag.strip().removeprefix("W/").strip('"')
    if re.fullmatch(r"[0-9a-fA-F]{32}", tag):
        return bytes.fromhex(tag)
    return None


def _digests(headers: Any, body: bytes) -> tuple[bytes | None, bytes | None]:
    """``(md5, sha256)`` of the whole object from Content-MD5, Digest or Repr-Digest headers,
    when given (a Content-MD5 that is the MD5 of ``body``, the range answered, is not)."""
    md5 = sha = None
    cmd5 = headers.get("Content-MD5")
    if cmd5:
        import hashlib

        md5 = _b64(cmd5, 16)
        if md5 == hashlib.md5(body).digest():        # noqa: S324  (a checksum, not security)
            md5 = None
    for name in ("Digest", "Repr-Digest", "x-goog-hash"):
        value = headers.get(name) or ""
        for part in value.split(","):
            algo, _, val = part.strip().partition("=")
            val = val.strip().strip(":")
            if algo.lower() == "md5" and md5 is None:
                md5 = _b64(val, 16)
            elif algo.lower() in ("sha-256", "sha256") and sha is None:
                sha = _b64(val, 32)
    return md5, sha


def _b64(text: str, size: int) -> bytes | None:
    """A base64 digest of ``size`` bytes, or None (a header of another length checks nothing)."""
    try:
        digest = base64.b64decode(text.strip(), validate=True)
    except ValueError:
        return None
    return digest if len(digest) == size else None


# -- sources: where the bytes come from --------------------------------------------------------
class Source:
    """A remote object read by byte ranges."""

    url: str
    info: RemoteInfo

    def read_into(self, dst: memoryview, offset: int) -> None:
        """Fill ``dst`` with the object's bytes from ``offset`` (one range request)."""
        raise NotImplementedError

    def stream(self, offset: int, chunk: int, if_range: str | None = None) -> Iterator[memoryview]:
        """The object from ``offset`` to its end, in pieces of at most ``chunk`` bytes."""
        size = self.info.size
        buf = bytearray(chunk)
        view = memoryview(buf)
        while offset < size:
            n = min(chunk, size - offset)
            self.read_into(view[:n], offset)
            yield view[:n]
            offset += n

    def close(self) -> None:
        """Drop connections."""


def _forget_connections_after_fork() -> None:
    """A forked child must not talk on its parent's connections (their streams would mix)."""
    for source in list(_SOURCES):
        source._conn = None               # the child's copy of the socket is dropped unclosed
        source._stream = None
        source._lock = threading.Lock()


_SOURCES: weakref.WeakSet[HttpSource] = weakref.WeakSet()
os.register_at_fork(after_in_child=_forget_connections_after_fork)


class HttpSource(Source):
    """An http(s) object over one keep-alive connection (``http.client``), reconnected on need."""

    def __init__(self, url: str, *, timeout: float = DEFAULT_TIMEOUT, retries: int = DEFAULT_RETRIES,
                 headers: dict[str, str] | None = None, need_ranges: bool = True) -> None:
        self.url = url
        self._headers = {"User-Agent": "xipfs", **(headers or {})}
        parts = self._aim(url)
        if parts.username:
            token = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(token.encode()).decode()
        self.timeout = timeout
        self.retries = max(1, retries)
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.RLock()     # reentrant: a failed attempt drops the connection under it
        #: ``[response, position, end]`` of an answer still streaming (a sequential reader's).
        self._stream: list[Any] | None = None
        self._last_end = -1
        self._run = 0                     # bytes read in a row up to _last_end
        _SOURCES.add(self)
        self.requests = 0
        #: False when the server answers ranges with the whole object (only ``need_ranges=False``).
        self.ranges = True
        self._need_ranges = need_ranges
        try:
            self.info = self._probe()
        except BaseException:
            self.close()                   # a 404 or a refusal: no socket left for the collector
            raise

    def _aim(self, url: str) -> urllib.parse.SplitResult:
        """Send the next requests to ``url`` (the one given, or where it redirected)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        if getattr(self, "_host", parts.hostname) != parts.hostname:
            self._headers.pop("Authorization", None)      # credentials stay with their host
        #: Where requests go: the URL given, or where it redirected to.
        self.location = url
        self._https = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port
        self._target = urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, ""))
        return parts

    # -- connections -------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                import ssl

                self._conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                                         context=ssl.create_default_context())
            else:
                self._conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout)
        return self._conn

    def _drop(self) -> None:
        self._stream = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _request(self, method: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """One request on the kept connection; a connection the server closed is reopened once."""
        if self._stream is not None:      # an answer not read to its end: only a new connection
            self._drop()
        self.requests += 1
        for fresh in (False, True):
            conn = self._connection()
            try:
                conn.request(method, self._target, headers={**self._headers, **headers})
                return conn.getresponse()
            except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
                self._drop()
                if fresh:
                    raise
            except BaseException:         # a timeout midway: the connection's state is unknown
                self._drop()
                raise
        raise AssertionError("unreachable")

    def _retrying(self, what: str, fn: Any) -> Any:
        """``fn()`` with bounded retries on network errors; a clear OSError when they run out."""
        delay = 0.1
        last: BaseException | None = None
        for attempt in range(self.retries):
            try:
                return fn()
            except _TRANSIENT as err:
                if isinstance(err, OSError) and not _transient_oserror(err):
                    raise
                last = err
                with self._lock:          # not under another thread's request
                    self._drop()
                if attempt + 1 < self.retries:
                    time.sleep(delay)
                    delay *= 4
        code = errno.ETIMEDOUT if isinstance(last, (socket.timeout, TimeoutError)) else (
            getattr(last, "errno", None) or errno.EIO)
        raise OSError(code, f"{what}: the server did not answer after {self.retries} attempts "
                      f"({type(last).__name__}: {last or 'connection closed'})", self.url) from last

    # -- the object -----------------------------------------------------------------------------
    def _probe(self) -> RemoteInfo:
        """Size, validators and checksum: one ``Range: bytes=0-0`` GET (HEAD is often not signed)."""
        def ask() -> RemoteInfo:
            with self._lock:
                resp = self._request("GET", {"Range": "bytes=0-0"})
                for _ in range(MAX_REDIRECTS):
                    where = resp.getheader("Location")
                    if resp.status not in (301, 302, 303, 307, 308) or not where:
                        break
                    resp.read()
                    self._drop()
                    self._aim(urllib.parse.urljoin(self.location, where))
                    resp = self._request("GET", {"Range": "bytes=0-0"})
                body = b""
                if resp.status == 200:       # no range support: the whole object is coming
                    size = _length_of(resp)
                    self._drop()             # without reading it
                    if self._need_ranges or size is None:
                        raise RangeUnsupported(self.url, size)
                    self.ranges = False
                else:
                    body = resp.read()
                    self._check_status(resp)
                    size = _total_of(resp.getheader("Content-Range"))
                    if size is None:
                        raise OSError(errno.EPROTO, "a 206 answer without Content-Range", self.url)
                md5, sha = _digests(resp.headers, body)
                etag = resp.getheader("ETag")
                return RemoteInfo(size, etag, resp.getheader("Last-Modified"),
                                  md5 or (_md5_of_etag(etag) if _s3_etag_is_md5(resp.headers) else None),
                                  sha)
        return self._retrying("asking for the size", ask)

    def _check_status(self, resp: http.client.HTTPResponse) -> None:
        if resp.status in (200, 206):
            return
        code = {404: errno.ENOENT, 410: errno.ENOENT, 401: errno.EACCES, 403: errno.EACCES,
                416: errno.EINVAL}.get(resp.status, errno.EIO)
        raise OSError(code, f"HTTP {resp.status} {resp.reason}", self.url)

    def read_into(self, dst: memoryview, offset: int) -> None:
        """``dst`` read straight from the socket: from the answer still streaming when it goes
        on from there, else by a range request. When this read continues a sequential run, the
        request asks for as much again as the run has read (up to :data:`STREAM_AHEAD`), left
        streaming for the next reads: a sequential reader makes a request per 64 MiB, as curl
        makes one, not one per read, and a reader that jumps away leaves unread at most as much
        as it read (dropped with the connection)."""
        n = len(dst)
        if n == 0:
            return

        def fetch() -> None:
            with self._lock:
                run = self._run if offset == self._last_end else 0
                got = self._from_stream(dst, offset)
                if got < n:
                    start = offset + got
                    end = offset + n
                    if run and n >= STREAM_MIN:
                        end = min(self.info.size, end + min(run, STREAM_AHEAD))
                    resp = self._request("GET", {"Range": f"bytes={start}-{end - 1}",
                                                 **self._if_match()})
                    try:
                        self._check_range_answer(resp, start, end - start)
                        _read_exactly(resp, dst[got:])
                    except BaseException:
                        self._drop()
                        raise
                    if end > offset + n:
                        self._stream = [resp, offset + n, end]
                self._last_end = offset + n
                self._run = run + n
        self._retrying(f"reading bytes {offset}..{offset + n}", fetch)

    def _from_stream(self, dst: memoryview, offset: int) -> int:
        """Bytes of ``dst`` read from the answer still streaming, if it is at ``offset`` (0
        otherwise, and an answer elsewhere is dropped with its connection)."""
        stream = self._stream
        if stream is None:
            return 0
        resp, pos, end = stream
        if pos != offset:
            self._drop()
            return 0
        got = min(len(dst), end - pos)
        try:
            _read_exactly(resp, dst[:got])
        except BaseException:
            self._drop()
            raise
        stream[1] = pos + got
        if pos + got == end:
            self._stream = None             # read whole: the connection is free again
        return got

    def _if_match(self) -> dict[str, str]:
        etag = self.info.etag if hasattr(self, "info") else None
        return {"If-Match": etag} if etag and not etag.startswith("W/") else {}

    def _check_range_answer(self, resp: http.client.HTTPResponse, offset: int, n: int) -> None:
        if resp.status == 412:
            resp.read()
            raise OSError(errno.ESTALE, "the remote image changed while it was read (ETag differs)",
                          self.url)
        if resp.status == 200:
            raise RangeUnsupported(self.url, self.info.size)
        self._check_status(resp)
        got = resp.getheader("Content-Range") or ""
        if not got.startswith(f"bytes {offset}-{offset + n - 1}/"):
            raise OSError(errno.EPROTO, f"asked for bytes {offset}-{offset + n - 1}, got {got!r}",
                          self.url)

    def stream(self, offset: int, chunk: int, if_range: str | None = None) -> Iterator[memoryview]:
        """The object from ``offset`` on, in one request (``If-Range``: the whole object again if
        it changed, which the caller sees as :class:`Restarted`)."""
        size = self.info.size
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        if offset and if_range:
            headers["If-Range"] = if_range
        with self._lock:
            def start() -> http.client.HTTPResponse:
                resp = self._request("GET", headers)
                if resp.status not in (200, 206):
                    resp.read()
                self._check_status(resp)
                return resp
            resp = self._retrying("starting the download", start)
            try:
                if offset and resp.status == 200:
                    raise Restarted(_length_of(resp))
                buf = bytearray(chunk)
                view = memoryview(buf)
                pos = offset
                while pos < size:
                    n = resp.readinto(view[:min(chunk, size - pos)])
                    if not n:
                        raise OSError(errno.EIO, f"the server closed the download at byte {pos} of "
                                      f"{size}", self.url)
                    pos += n
                    yield view[:n]
            except BaseException:
                self._drop()
                raise
            if not resp.isclosed():
                resp.read()


def _transient_oserror(err: OSError) -> bool:
    """Network errors worth a retry (not, say, a name that does not resolve)."""
    if isinstance(err, (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException)):
        return True
    return err.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE, errno.ETIMEDOUT,
                         errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED)


def _read_exactly(resp: http.client.HTTPResponse, dst: memoryview) -> None:
    done = 0
    while done < len(dst):
        n = resp.readinto(dst[done:])
        if not n:
            raise ConnectionError(f"the server closed the connection after {done} of {len(dst)} bytes")
        done += n


def _total_of(content_range: str | None) -> int | None:
    m = re.fullmatch(r"bytes (?:\d+-\d+|\*)/(\d+)", (content_range or "").strip())
    return int(m[1]) if m else None


def _length_of(resp: http.client.HTTPResponse) -> int | None:
    length = resp.getheader("Content-Length")
    return int(length) if length and length.isdigit() else None


class RangeUnsupported(OSError):
    """The server sent the whole object to a range request: it cannot be read lazily."""

    def __init__(self, url: str, size: int | None) -> None:
        super().__init__(errno.EOPNOTSUPP, "the server does not support range requests (it answered "
                         "a range with the whole object); 'xipfs fetch' copies the image whole", url)
        self.size = size


class Restarted(Exception):
    """A resumed download found the object changed (``If-Range`` failed): start again."""

    def __init__(self, size: int | None) -> None:
        super().__init__(size)
        self.size = size


class FsspecSource(Source):
    """Any fsspec URL (``s3://``, ``gs://``, ``file://``, chains), read with ``cat_file`` ranges."""

    def __init__(self, url: str, fs: Any = None, path: str | None = None, **storage_options: Any) -> None:
        """``url`` resolved by fsspec, or the filesystem ``fs`` and ``path`` in it, given."""
        self.url = url
        if fs is None:
            try:
                from fsspec.core import url_to_fs
            except ImportError as err:
                raise OSError(errno.EPROTONOSUPPORT, "this URL needs fsspec (pip install "
                              "'xipfs[remote]')", url) from err
            try:
                fs, path = url_to_fs(url, **storage_options)
            except (ValueError, ImportError) as err:
                raise OSError(errno.EPROTONOSUPPORT, f"cannot open this URL: {err}", url) from err
        self.fs, self.path = fs, path
        self.requests = 0
        try:
            meta = self.fs.info(self.path)
        except FileNotFoundError:
            raise FileNotFoundError(errno.ENOENT, "no such remote object", url) from None
        if meta.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, "is a directory, not an image", url)
        etag = meta.get("ETag") or meta.get("etag")
        modified = meta.get("LastModified") or meta.get("mtime") or meta.get("updated")
        self.info = RemoteInfo(int(meta["size"]), etag, None if modified is None else str(modified),
                               _fsspec_md5(self.fs, meta, etag))

    def read_into(self, dst: memoryview, offset: int) -> None:
        n = len(dst)
        self.requests += 1
        data = self.fs.cat_file(self.path, start=offset, end=offset + n)
        if len(data) != n:
            raise OSError(errno.EIO, f"short read: {len(data)} of {n} bytes at {offset}", self.url)
        dst[:] = data


def _fsspec_md5(fs: Any, meta: dict[str, Any], etag: str | None) -> bytes | None:
    """The object's MD5 from an fsspec ``info``: GCS's ``md5Hash``, or an S3 ETag that S3 made
    the MD5 (not under SSE-KMS)."""
    if isinstance(meta.get("md5Hash"), str):
        return _b64(meta["md5Hash"], 16)
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    kms = meta.get("SSEKMSKeyId") or str(meta.get("ServerSideEncryption") or "").lower() in _SSE_NOT_MD5
    if any(p in ("s3", "s3a") for p in protocols) and not kms:
        return _md5_of_etag(etag)
    return None


def open_source(url: str, *, timeout: float = DEFAULT_TIMEOUT, need_ranges: bool = True,
                **storage_options: Any) -> Source:
    """The source for ``url``: http(s) with the standard library, anything else through fsspec."""
    scheme = url.partition("://")[0].lower() if "::" not in url else ""
    if scheme in ("http", "https") and not storage_options:
        return HttpSource(url, timeout=timeout, need_ranges=need_ranges)
    return FsspecSource(url, **storage_options)


# -- the device ------------------------------------------------------------------------------------
class RemoteDevice(Device):
    """A read-only remote image: ``read_into`` issues range requests, with ondemand readahead.

    Put a :class:`~.file.PageCache` in front of it (``open_remote`` does): the cache asks
    :meth:`readahead` how many pages to fill on a miss and fills them with one request.
    """

    kind = "remote"

    def __init__(self, source: Source, *, readahead_min: int = READAHEAD_MIN,
                 readahead_max: int = READAHEAD_MAX) -> None:
        super().__init__(source.info.size, True, source.url)
        self.source = source
        self.readahead_min = readahead_min
        self.readahead_max = max(readahead_min, readahead_max)
        self._window = readahead_min
        self._next = -1                 # where a sequential reader's next miss would start

    def readahead(self, offset: int, length: int, after_cached: bool = False) -> int:
        """How many bytes to fetch for a miss of ``length`` bytes at ``offset`` (ondemand).

        Sequential, so the window doubles: right where the last fetch ended, or right after a
        cached page (Linux's context readahead: a reader walking through cached pages).
        """
        if offset == self._next or (after_cached and self._next >= 0):
            self._window = min(self._window * 2, self.readahead_max)
        else:
            self._window = self.readahead_min
        return min(max(length, self._window), self.size - offset)

    def read_into(self, dst: memoryview, offset: int) -> None:
        """One range request for ``dst``; the readahead state notes where it ended."""
        self.check_range(offset, len(dst))
        self.source.read_into(dst, offset)
        self._next = offset + len(dst)

    def view(self, offset: int, length: int) -> memoryview:
        buf = bytearray(length)
        self.read_into(memoryview(buf), offset)
        return memoryview(buf)

    def write(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        raise OSError(errno.EROFS, "a remote image is read-only", self.name)

    def close(self) -> None:
        self.source.close()


def open_remote(url: str, *, readonly: bool = True, cache_bytes: int | None = None,
                timeout: float = DEFAULT_TIMEOUT, **storage_options: Any) -> Device:
    """A remote image behind a page cache with readahead; ``readonly=False`` is refused (EROFS)."""
    if not readonly:
        raise OSError(errno.EROFS, "a remote image is read-only (xipfs fetch copies it to memory "
                      "storage, where it can be written)", url)
    from .file import PageCache

    device = RemoteDevice(open_source(url, timeout=timeout, **storage_options))
    return PageCache(device, REMOTE_CACHE_BYTES if cache_bytes is None else cache_bytes)


def open_remote_target(fo: str, protocol: str | None, options: dict[str, Any] | None,
                       cache_bytes: int | None = None) -> Device:
    """The lazy device of an fsspec chain's target (``ext2://x::https://host/img``): http(s)
    without options through the standard library, anything else through its fsspec filesystem."""
    if protocol in (None, "http", "https") and not options and fo.startswith(("http://", "https://")):
        return open_remote(fo, cache_bytes=cache_bytes)
    from .file import PageCache

    if protocol is None:                       # a URL fsspec resolves itself (s3://, a chain)
        source = FsspecSource(fo, **(options or {}))
    else:
        import fsspec

        fs = fsspec.filesystem(protocol, **(options or {}))
        source = FsspecSource(fo, fs, fs._strip_protocol(fo))
    device = RemoteDevice(source)
    return PageCache(device, REMOTE_CACHE_BYTES if cache_bytes is None else cache_bytes)
