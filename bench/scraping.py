"""Scrapes as a client sees them: plain-socket HTTP timed from connect to the last body byte.

Kept apart from ``probes`` so that the external checker process (``bench.checker``) needs nothing
but this module: no libvirt, no VM library.
"""

from __future__ import annotations

import gzip
import http.client
import socket
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Scrape:
    seconds: float
    wire_bytes: int  # body as sent (gzip when asked for and given)
    body: bytes  # decompressed


def scrape(port: int, *, path: str = "/metrics", use_gzip: bool = True, timeout: float = 60.0) -> Scrape:
    """One scrape on a fresh connection, as Prometheus' first request of a target is: new TCP
    connection, ``Accept-Encoding: gzip``. Timed from connect to the last body byte.

    A plain socket client: it sends the request and reads until the body is complete (by
    ``Content-Length`` or the last chunk); the response is parsed and decompressed after the
    clock stops. Python's ``http.client`` adds about 1 ms of its own parsing to every scrape,
    which would be counted as the exporter's; Prometheus' Go client does not add that.
    """
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
               "Accept: text/plain;version=0.0.4;q=1,*/*;q=0.1\r\n"
               + ("Accept-Encoding: gzip\r\n" if use_gzip else "") + "\r\n").encode("ascii")
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)
        raw = _read_response(sock)
        seconds = time.perf_counter() - started
    head, _, payload = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if headers.get("transfer-encoding", "").lower() == "chunked":
        payload = _dechunk(payload)
    elif "content-length" in headers:
        payload = payload[: int(headers["content-length"])]
    if status != 200:
        raise RuntimeError(f"GET :{port}{path} -> {status}: {payload[:200]!r}")
    body = gzip.decompress(payload) if headers.get("content-encoding") == "gzip" else payload
    return Scrape(seconds, len(payload), body)


def _read_response(sock: socket.socket) -> bytes:
    """Bytes until the response is complete: Content-Length reached, the last chunk, or EOF."""
    buffer = bytearray()
    expected: int | None = None
    chunked = False
    while True:
        data = sock.recv(1 << 18)
        if not data:
            return bytes(buffer)
        buffer += data
        if expected is None and not chunked:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                continue
            head = bytes(buffer[:end]).lower()
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip() == b"content-length":
                    expected = end + 4 + int(value)
                elif name.strip() == b"transfer-encoding" and b"chunked" in value:
                    chunked = True
        if expected is not None and len(buffer) >= expected:
            return bytes(buffer)
        if chunked and buffer.endswith(b"\r\n0\r\n\r\n"):
            return bytes(buffer)


def _dechunk(payload: bytes) -> bytes:
    out = bytearray()
    position = 0
    while True:
        line_end = payload.index(b"\r\n", position)
        size = int(payload[position:line_end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += payload[line_end + 2: line_end + 2 + size]
        position = line_end + 2 + size + 2


class KeepAliveScraper:
    """Plain scrapes on one kept-alive connection: for tight loops that watch a value."""

    def __init__(self, port: int, path: str = "/metrics") -> None:
        self.port = port
        self.path = path
        self._conn: http.client.HTTPConnection | None = None

    def get(self) -> bytes:
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                self._conn.request("GET", self.path)
                return self._conn.getresponse().read()
            except (OSError, http.client.HTTPException):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def sample_value(body: bytes, name: str, **labels: str) -> float | None:
    """Value of the sample ``name{labels}`` in an exposition, whatever the label order."""
    head = b"\n" + name.encode() + b"{"
    pairs = [f'{k}="{v}"'.encode() for k, v in labels.items()]
    at = body.find(head)
    while at >= 0:
        end = body.find(b"\n", at + 1)
        line = body[at + 1:end if end >= 0 else None]
        close = line.rfind(b"}")
        label_text = line[len(head) - 1:close]
        if len(label_text.split(b'",')) == len(pairs) and all(p in label_text for p in pairs):
            return float(line[close + 1:].split()[0])
        at = body.find(head, at + 1)
    return None


def line_value(body: bytes, prefix: bytes) -> float | None:
    """Value of the first exposition line starting with ``prefix`` (name plus ``{labels}``)."""
    at = body.find(b"\n" + prefix)
    if at < 0:
        return None
    start = at + 1 + len(prefix)
    end = body.find(b"\n", start)
    return float(body[start:end if end >= 0 else None].split()[0])


def series_count(body: bytes) -> int:
    """Samples in one exposition (every line that is neither blank nor a comment)."""
    return sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
