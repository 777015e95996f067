"""``libvirt-blockjob-exporter status``: the active block jobs as a terminal table, or as JSON.

Two sources, one document (``exporter.status``), so the command, the status page and scripts agree:

* libvirt itself, read-only: a read-only connection and the exporter's own reads (``XMLDesc``,
  ``blockJobInfo``), twice a poll interval apart, since a rate (and so an ETA) needs two samples
  of a job's cursor. Never anything else: the same guest-safety rules as the exporter.
* a running exporter's ``status.json``: no libvirt access at all (for an operator who may not
  open the socket, or a remote host), and it also carries the exporter's policy and health.
  Basic auth and a private CA as the exporter's web config may require. Redirects are not
  followed: urllib would send the login on to wherever one points (another host, plain http).

What a source answers is data, never markup or terminal control: names are shown through rich's
``Text`` (no markup parsed) with non-printable characters escaped, and an exporter's answer is
read only up to a bound (size, nesting, finite numbers): a broken or hostile answer is an error
message and exit status 1, never a traceback.

``--watch`` outlives a failed read: the error takes the table's place until a read succeeds
again, because an exporter or libvirtd restarting is what one may be watching for.
"""

from __future__ import annotations

import base64
import json
import ssl
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Callable, TextIO

from . import __version__
from .configfile import open_file, read_bounded
from .status import MAX_BYTES, build_status

HTTP_TIMEOUT_SECONDS = 10.0
BAR_WIDTH = 20
PIPE_WIDTH = 160  # columns when the output is not a terminal: a row per job, whatever the names
MAX_PASSWORD_FILE_BYTES = 4096
MAX_DEPTH = 32  # JSON nesting of an exporter's answer; a status document needs far less
MAX_LOCATION_CHARS = 512  # of a refused redirect's target, in the error message


class SourceError(Exception):
    """The source cannot be read; the message says why (exit status 1)."""


def _shown(value: Any) -> str:
    """Non-printable characters escaped as in a Python literal: a newline or a terminal escape in a
    domain name must not forge rows or rewrite the terminal."""
    text = "" if value is None else str(value)
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "\u2014"
    s = max(0, round(seconds))
    d, h, m, r = s // 86400, s % 86400 // 3600, s % 3600 // 60, s % 60
    if d:
        return f"{d}d {h}h"
    if h:
        return f"{h}h {m:02d}m"
    return f"{m}m {r:02d}s" if m else f"{r}s"


# ----------------------------------------------------------------------------- sources


def status_url(url: str) -> str:
    """The ``status.json`` of an exporter given by its base URL, its ``status.json`` or its default
    telemetry path ``/metrics`` (what a Prometheus target list holds); a path prefix is kept."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path
    if path.endswith(".json"):
        return url
    if path.rstrip("/").endswith("/metrics"):
        path = path.rstrip("/")[: -len("metrics")]
    path = path if path.endswith("/") else path + "/"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path + "status.json", "", ""))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Follows no redirect: urllib's would copy the Authorization header to the new URL, whatever its
    host or scheme. urllib then raises the 3xx as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:32]} is out of range")
    return value


def _check_depth(doc: Any) -> None:
    """ValueError for nesting deeper than ``MAX_DEPTH``: printing or rendering a deeper document could
    exhaust the recursion limit. Iterative, so the check itself cannot."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


class LibvirtSource:
    """Reads the host through a read-only connection kept open between reads."""

    def __init__(self, uri: str, poll_interval: float) -> None:
        self.uri = uri
        self.poll_interval = poll_interval
        self._read: Callable[[], None] | None = None
        self._context = None
        self._state = None

    def __enter__(self) -> "LibvirtSource":
        from .state import State

        self._state = State()
        self._open()
        return self

    def __exit__(self, *exc) -> None:
        self._close(*exc)

    def _open(self) -> None:
        try:
            # Imported here: only libvirt_host imports libvirt, and the URL source needs none.
            from .libvirt_host import reading
        except ImportError as err:  # no libvirt-python
            raise SourceError(f"cannot read {self.uri}: {err}") from None
        context = reading(self.uri, self._state)
        try:
            self._read = context.__enter__()
        except Exception as err:  # libvirtError, ConnectionError
            raise SourceError(f"cannot read block jobs from {self.uri}: {err}") from None
        self._context = context

    def _close(self, *exc) -> None:
        context, self._context, self._read = self._context, None, None
        if context is not None:
            context.__exit__(*(exc or (None, None, None)))

    def read(self) -> None:
        """One full read; after a failed one the next connects again (``--watch`` retries)."""
        if self._read is None:
            self._open()
        try:
            self._read()
        except Exception as err:  # libvirtError: libvirtd went away
            try:
                self._close()
            except Exception:  # closing a dead connection may fail too
                pass
            raise SourceError(f"cannot read block jobs from {self.uri}: {err}") from None

    def first(self) -> dict[str, Any]:
        """Two reads a poll interval apart: the second gives every moving job a rate."""
        self.read()
        time.sleep(self.poll_interval)
        return self.next()

    def next(self) -> dict[str, Any]:
        self.read()
        snap = self._state.snapshot()
        return build_status(snap, now=time.time(), uri=self.uri, read_only=True,
                            poll_interval=self.poll_interval, version=__version__)


class ExporterSource:
    """Reads a running exporter's ``status.json`` (it measured the rates already)."""

    def __init__(self, url: str, username: str | None, password: str | None, ca_file: str | None) -> None:
        self.url = status_url(url)
        self._headers = {"Accept": "application/json", "User-Agent": f"libvirt-blockjob-exporter/{__version__}"}
        if username is not None:
            token = base64.b64encode(f"{username}:{password or ''}".encode("utf-8")).decode("ascii")
            self._headers["Authorization"] = f"Basic {token}"
        try:
            if ca_file:
                with open_file(ca_file):  # OpenSSL would wait on a FIFO for ever
                    pass
            self._tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        except (OSError, ssl.SSLError) as err:
            raise SourceError(f"cannot use --exporter.ca-file {ca_file}: {err}") from None
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.HTTPSHandler(context=self._tls))

    def __enter__(self) -> "ExporterSource":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def first(self) -> dict[str, Any]:
        return self.next()

    def next(self) -> dict[str, Any]:
        request = urllib.request.Request(self.url, headers=self._headers)
        try:
            with self._opener.open(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
                body = response.read(MAX_BYTES * 2 + 1)
        except urllib.error.HTTPError as err:
            if 300 <= err.code < 400:
                location = (err.headers.get("Location") or "nowhere")[:MAX_LOCATION_CHARS]
                raise SourceError(f"{self.url}: HTTP {err.code} redirects to {location}; redirects are not "
                                  "followed (they would carry the login): give --exporter.url as the exporter's "
                                  "own URL") from None
            hint = " (give --exporter.username and --exporter.password-file)" if err.code == 401 else ""
            raise SourceError(f"{self.url}: HTTP {err.code} {err.reason}{hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise SourceError(f"cannot reach {self.url}: {getattr(err, 'reason', err)}") from None
        if len(body) > MAX_BYTES * 2:
            raise SourceError(f"{self.url}: answer larger than {MAX_BYTES * 2} bytes; not a status document")
        try:
            doc = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
            _check_depth(doc)
            if not isinstance(doc, dict) or not isinstance(doc["jobs"]["shown"], list):
                raise ValueError("no jobs")
        except (ValueError, KeyError, TypeError, RecursionError) as err:
            raise SourceError(f"{self.url}: not a status document ({err})") from None
        return doc


# ----------------------------------------------------------------------------- rendering


def render(doc: dict[str, Any], source: str):
    """The terminal view of a status document: a summary line and the table of active jobs.
    SourceError for a document it cannot show (an exporter's answer is not trusted to be well-formed)."""
    try:
        return _render(doc, source)
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as err:
        raise SourceError(f"{source}: not a status document ({type(err).__name__}: {err})") from None


def _render(doc: dict[str, Any], source: str):
    from rich.console import Group
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    conn = doc.get("connection") or {}
    jobs = doc["jobs"]
    now = float(doc.get("now") or time.time())
    state = Text("connected", style="bold green") if conn.get("connected") else Text("not connected", style="bold red")
    head = Text.assemble(
        (_shown(source), "bold"), " ", state,
        f"  {_shown(conn.get('mode', ''))}, {conn.get('domains', 0)} running domains, "
        f"{jobs.get('total', 0)} active block jobs")
    if conn.get("unresponsive_total"):
        head.append(f", {conn['unresponsive_total']} unresponsive: "
                    + ", ".join(_shown(d) for d in conn.get("unresponsive", [])), style="yellow")
    table = Table(box=None, header_style="bold", pad_edge=False, expand=False)
    for column, justify in (("DOMAIN", "left"), ("DISK", "left"), ("TYPE", "left"), ("PROGRESS", "left"),
                            ("%", "right"), ("RATE", "right"), ("ETA", "right"), ("CAP", "right"),
                            ("SINCE", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "DOMAIN", overflow="fold",
                         min_width=24 if column == "DOMAIN" else None)
    for job in jobs["shown"]:
        percent = float(job.get("percent") or 0.0)
        if job.get("stalled"):
            rate = Text("stalled", style="yellow")
        elif job.get("rate") is None:
            rate = Text("measuring", style="dim")
        else:
            rate = Text(f"{_bytes(float(job['rate']))}/s")
        eta = "ready" if job.get("ready") else _duration(job.get("eta_seconds"))
        cap = f"{_bytes(float(job['bandwidth']))}/s" if job.get("bandwidth") else "unlimited"
        since = _duration(now - float(job["started"])) if job.get("started") else "\u2014"
        table.add_row(Text(_shown(job.get("domain"))), Text(_shown(job.get("disk"))), Text(_shown(job.get("type"))),
                      ProgressBar(total=100.0, completed=min(100.0, max(0.0, percent)), width=BAR_WIDTH),
                      f"{percent:.1f}", rate, eta, cap, since)
    parts: list = [head, table if jobs["shown"] else Text("No active block jobs.", style="dim")]
    more = int(jobs.get("total", 0)) - len(jobs["shown"])
    if more > 0:
        parts.append(Text(f"{more} more jobs not shown", style="dim"))
    recent = (doc.get("outcomes") or {}).get("recent") or []
    if recent:
        last = recent[0]
        style = {"completed": "green", "failed": "bold red", "canceled": "yellow"}.get(last.get("outcome"), "")
        parts.append(Text.assemble(
            "last outcome: ", (_shown(last.get("outcome")), style), " ",
            _shown(f"{last.get('type')} on {last.get('domain')}/{last.get('disk')}, "),
            _duration(now - float(last.get("time") or now)), " ago"))
    return Group(*parts)


def _print_json(doc: dict[str, Any], out: TextIO) -> None:
    out.write(json.dumps(doc, sort_keys=True) + "\n")  # ASCII only: safe on any terminal
    out.flush()


def run_status(args, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The command; 0, or 1 with the reason on stderr when the source cannot be read (with ``--watch``,
    only its first read: later failures are shown and retried)."""
    from rich.console import Console

    out = out or sys.stdout
    err = err or sys.stderr
    try:
        if args.exporter_url:
            password = None
            if args.exporter_password_file:
                password = _read_password(args.exporter_password_file)
            source: Any = ExporterSource(args.exporter_url, args.exporter_username, password, args.exporter_ca_file)
            label = args.exporter_url
        else:
            source = LibvirtSource(args.uri, args.poll_interval)
            label = args.uri
        console = Console(file=out, highlight=False, soft_wrap=False,
                          width=None if out.isatty() else PIPE_WIDTH)
        with source:
            doc = source.first()
            if not args.watch:
                if args.output == "json":
                    _print_json(doc, out)
                else:
                    console.print(render(doc, label))
                return 0
            _watch(source, doc, label, args.output, args.poll_interval, console, out, err)
    except SourceError as e:
        print(f"libvirt-blockjob-exporter status: {_shown(e)}", file=err)
        return 1
    except KeyboardInterrupt:
        return 0


def _watch(source, doc: dict[str, Any], label: str, output: str, interval: float, console, out: TextIO,
           err: TextIO) -> None:
    """Refreshes until Ctrl-C. A failed read shows its error (stderr with JSON, so stdout stays one
    document a line) with the time of the last good read, and the next interval tries again. rich's
    ``Live`` draws a non-terminal only when it stops, so there every frame is printed instead."""
    from rich.live import Live
    from rich.text import Text

    last_good = time.time()

    def failed(e: SourceError) -> str:
        when = time.strftime("%H:%M:%S", time.localtime(last_good))
        return f"{_shown(e)} (last good read at {when}; retrying every {interval:g}s)"

    if output == "json":  # one document a line
        _print_json(doc, out)
        while True:
            time.sleep(interval)
            try:
                doc = source.next()
            except SourceError as e:
                print(f"libvirt-blockjob-exporter status: {failed(e)}", file=err, flush=True)
                continue
            last_good = time.time()
            _print_json(doc, out)

    def frame():
        nonlocal last_good
        try:
            view = render(source.next(), label)
        except SourceError as e:
            return Text(failed(e), style="bold red")
        last_good = time.time()
        return view

    view = render(doc, label)
    if console.is_terminal and not console.is_dumb_terminal:
        with Live(view, console=console, auto_refresh=False, transient=False) as live:
            while True:
                time.sleep(interval)
                live.update(frame(), refresh=True)
    console.print(view)
    while True:
        time.sleep(interval)
        view = frame()
        console.line()
        console.print(view)


def _read_password(path: str) -> str:
    try:
        raw = read_bounded(path, MAX_PASSWORD_FILE_BYTES)
    except OSError as e:
        raise SourceError(f"cannot read --exporter.password-file: {e}") from None
    if raw is None:
        raise SourceError(f"--exporter.password-file {path} is longer than {MAX_PASSWORD_FILE_BYTES} bytes")
    return raw.decode("utf-8", "replace").rstrip("\r\n")
