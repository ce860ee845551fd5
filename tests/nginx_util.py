"""A real HTTP server for the remote-image tests: nginx on a free loopback port, as a subprocess.

nginx runs in the foreground as one process (``master_process off``) with its configuration,
logs and temporary directories under a work directory of the test. Its access log records, per
request, ``$bytes_sent`` (headers and body), ``$body_bytes_sent`` and ``$http_range``, so a test
counts the bytes that really crossed. Tests that need it call :func:`start_nginx` (or use the
``nginx`` fixture, a factory) and skip with a reason where the machine has no ``nginx``.

    server = start_nginx(served_dir, tmp_path)
    url = server.url("image.ext2")
    ...
    server.body_bytes()      # bytes of bodies sent since the start (or the last mark())
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import pytest

LOG_FORMAT = '$request_method $uri $status $bytes_sent $body_bytes_sent "$http_range"'


class LogEntry(NamedTuple):
    """One request as nginx logged it."""

    method: str
    uri: str
    status: int
    bytes_sent: int
    body_bytes_sent: int
    range: str


def nginx_binary() -> str | None:
    """Path of nginx (PATH, then /usr/sbin), or None."""
    return shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/sbin/nginx")
                                          if os.access(p, os.X_OK)), None)


def require_nginx() -> str:
    """The nginx binary, or skip the test saying why."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light): no HTTP server to test against")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Nginx:
    """A running nginx serving one directory on ``127.0.0.1:port``."""

    def __init__(self, root: Path, workdir: Path, *, ranges: bool = True, extra: str = "",
                 port: int | None = None, tls: bool = False) -> None:
        self.binary = require_nginx()
        self.root = Path(root).resolve()
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.ranges = ranges
        self.extra = extra
        self.log = self.workdir / "access.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._mark = 0
        self.port = port or 0
        #: With ``tls``: the self-signed certificate (for 127.0.0.1) a client must trust.
        self.cafile: Path | None = self._certificate() if tls else None
        self._start()

    def _certificate(self) -> Path:
        cert, key = self.workdir / "cert.pem", self.workdir / "key.pem"
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("openssl is not installed: no certificate for an https server")
        subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
                        "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True)
        return cert

    # -- life --------------------------------------------------------------------------------
    def _config(self) -> str:
        w = self.workdir
        user = "user root;" if os.geteuid() == 0 else ""
        return f"""
{user}
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/error.log warn;
events {{ worker_connections 256; }}
http {{
    types {{ application/octet-stream img ext2 ext4; }}
    default_type application/octet-stream;
    log_format counted '{LOG_FORMAT}';
    access_log {w}/access.log counted;
    client_body_temp_path {w}/body;
    proxy_temp_path {w}/proxy;
    fastcgi_temp_path {w}/fastcgi;
    uwsgi_temp_path {w}/uwsgi;
    scgi_temp_path {w}/scgi;
    sendfile on;
    keepalive_timeout 60s;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{self.port}{" ssl" if self.cafile else ""};
        {self._tls_lines()}
        root {self.root};
        {"" if self.ranges else "max_ranges 0;"}
        {self.extra}
    }}
}}
"""

    def _tls_lines(self) -> str:
        if self.cafile is None:
            return ""
        return f"ssl_certificate {self.cafile}; ssl_certificate_key {self.workdir / 'key.pem'};"

    def _start(self) -> None:
        last = ""
        with contextlib.suppress(FileNotFoundError):
            self.log.unlink()
        self._mark = 0
        for _ in range(5):
            if not self.port:
                self.port = free_port()
            conf = self.workdir / "nginx.conf"
            conf.write_text(self._config())
            self.proc = subprocess.Popen([self.binary, "-c", str(conf), "-p", str(self.workdir)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_ready():
                return
            self.proc.kill()
            _, err = self.proc.communicate()
            last = err.decode(errors="replace")
            self.port = 0
        pytest.skip(f"nginx would not start: {last.strip()[-300:]}")

    def _wait_ready(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return True
            time.sleep(0.02)
        return False

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill(self) -> None:
        """SIGKILL: the server goes away, its connections reset."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections (the kernel's backlog), nothing answers."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def restart(self) -> None:
        """Start again on the same port (after :meth:`kill`)."""
        self.kill()
        self._start()

    def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGCONT)
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self.proc = None

    # -- what crossed --------------------------------------------------------------------------
    def url(self, name: str) -> str:
        scheme = "https" if self.cafile else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{name.lstrip('/')}"

    def entries(self) -> list[LogEntry]:
        """Every request logged since the start (nginx writes a line as a request ends)."""
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            parts = line.split(" ", 5)
            if len(parts) == 6:
                out.append(LogEntry(parts[0], parts[1], int(parts[2]), int(parts[3]), int(parts[4]),
                                    parts[5].strip('"')))
        return out

    def mark(self) -> None:
        """Count from here on (:meth:`body_bytes`, :meth:`bytes_sent`, :meth:`requests`)."""
        self._mark = len(self.entries())

    def since_mark(self) -> list[LogEntry]:
        return self.entries()[self._mark:]

    def bytes_sent(self) -> int:
        """Bytes sent since the mark, headers included."""
        return sum(e.bytes_sent for e in self.since_mark())

    def body_bytes(self) -> int:
        """Bytes of bodies sent since the mark."""
        return sum(e.body_bytes_sent for e in self.since_mark())

    def requests(self) -> int:
        return len(self.since_mark())

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_nginx(root: str | os.PathLike[str], workdir: str | os.PathLike[str], *, ranges: bool = True,
                extra: str = "", tls: bool = False) -> Nginx:
    """nginx serving ``root`` on a free loopback port, its files under ``workdir``; skips the test
    when nginx is missing. ``ranges=False`` serves no ranges (``max_ranges 0``); ``tls=True``
    serves https with a self-signed certificate (``server.cafile``)."""
    return Nginx(Path(root), Path(workdir), ranges=ranges, extra=extra, tls=tls)


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[object]:
    """A factory ``nginx(root, ranges=True, extra="", tls=False)``: servers stopped at the end of
    the test."""
    servers: list[Nginx] = []

    def make(root: str | os.PathLike[str], *, ranges: bool = True, extra: str = "",
             tls: bool = False) -> Nginx:
        server = start_nginx(root, tmp_path / f"nginx{len(servers)}", ranges=ranges, extra=extra, tls=tls)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
