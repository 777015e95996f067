"""Command line: the exporter itself, and the ``policy check`` / ``policy plan`` tools.

Start-up does not wait for libvirt: an unreachable URI is logged, ``libvirt_blockjob_up`` is 0
and the exporter keeps retrying, because on a hypervisor the exporter and libvirtd start and
restart independently. Flags, web config and policy are checked before anything starts: a bad one
is a clear message and exit status 2 (flags) or 1 (files).
"""

from __future__ import annotations

import argparse
import logging
import re
import signal
import sys
import threading
import urllib.parse
from typing import Sequence

from . import __version__
from .durations import parse_duration
from .logsetup import LEVELS, setup_logging

log = logging.getLogger("exporter")

DEFAULT_URI = "qemu:///system"
DEFAULT_CALL_BUDGET = 80
DEFAULT_STATE_FILE = "/var/lib/libvirt-blockjob-exporter/state.json"
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MAX_FLAG_CHARS = 4096  # any flag value; a path or URL is far shorter
MAX_ALERT_LABELS = 16
MIN_LIBVIRT_WATCH_SECONDS = 1.0  # each refresh of `status --watch` from libvirt re-reads every domain and disk


def _bounded(check):
    """A flag type: ``check(text)`` after the length bound, its ValueError an argparse error (exit 2)."""
    def parse(text: str):
        if len(text) > MAX_FLAG_CHARS:
            raise argparse.ArgumentTypeError(f"longer than {MAX_FLAG_CHARS} characters")
        if any(ord(c) < 32 or ord(c) == 127 for c in text):
            raise argparse.ArgumentTypeError(f"{text!r} contains a control character")
        try:
            return check(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
    return parse


def _duration_flag(minimum: float, maximum: float):
    def duration(text: str) -> float:
        seconds = parse_duration(text, maximum)
        if seconds < minimum:
            raise ValueError(f"{text!r} is below the minimum of {minimum:g}s")
        return seconds
    return _bounded(duration)


def _count_flag(minimum: int, maximum: int):
    def count(text: str) -> int:
        if not text.strip().isdigit() or not minimum <= int(text) <= maximum:
            raise ValueError(f"{text!r} is not a whole number from {minimum} to {maximum}")
        return int(text)
    return _bounded(count)


@_bounded
def _uri_flag(text: str) -> str:
    if not _URI.match(text):
        raise ValueError(f"{text!r} is not a libvirt URI (e.g. qemu:///system)")
    return text


@_bounded
def _listen_flag(text: str) -> str:
    from .web import parse_listen_address

    parse_listen_address(text)
    return text


@_bounded
def _telemetry_path_flag(text: str) -> str:
    if not text.startswith("/") or text == "/" or any(c.isspace() for c in text):
        raise ValueError(f"{text!r} must start with /, not be / (the landing page) and hold no spaces")
    if text in ("/status.json", "/-/healthy"):
        raise ValueError(f"{text!r} is taken (the status page's data and the health check)")
    return text


@_bounded
def _url_flag(text: str) -> str:
    parts = urllib.parse.urlsplit(text)  # ValueError for a bad IPv6 literal
    parts.port  # ValueError for a port that is not a number from 0 to 65535
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{text!r} must be an http(s) URL")
    return text


@_bounded
def _exporter_url_flag(text: str) -> str:
    # Checked first, and the URL not echoed: the message must not show the password.
    if "@" in urllib.parse.urlsplit(text).netloc:
        raise ValueError("a URL with a login (user:password@) would show it to every user; give "
                         "--exporter.username and --exporter.password-file instead")
    return _url_flag(text)


_path_flag = _bounded(lambda text: text)


@_bounded
def _alert_label_flag(text: str) -> tuple[str, str]:
    from .alertmanager import label_problem

    name, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r}: expected NAME=VALUE, e.g. cluster=eu-1")
    problem = label_problem(name, value)
    if problem:
        raise ValueError(problem)
    return name, value


@_bounded
def _host_id_flag(text: str) -> str:
    from .policy.fleet import host_id_problem

    problem = host_id_problem(text)
    if problem:
        raise ValueError(f"{text!r}: {problem}")
    return text


def build_parser() -> argparse.ArgumentParser:
    from .web import DEFAULT_LISTEN_ADDRESS

    parser = argparse.ArgumentParser(
        prog="libvirt-blockjob-exporter",
        description="Prometheus exporter for libvirt block jobs (pull, copy, commit, backup).",
        epilog="Subcommands (each with --help): 'status' shows the active block jobs with progress, rate and ETA; "
               "'policy check FILE' validates a policy file; "
               "'policy plan --policy.file FILE [--libvirt.uri URI]' shows what the policy would do now.",
    )
    parser.add_argument("--libvirt.uri", dest="uri", default=DEFAULT_URI, type=_uri_flag,
                        help=f"libvirt connection URI (default {DEFAULT_URI}); read-only unless --policy.enforce")
    parser.add_argument("--web.listen-address", dest="listen_address", default=DEFAULT_LISTEN_ADDRESS,
                        type=_listen_flag, help=f"address to serve metrics on (default {DEFAULT_LISTEN_ADDRESS})")
    parser.add_argument("--web.telemetry-path", dest="telemetry_path", default="/metrics",
                        type=_telemetry_path_flag, help="path under which to expose metrics (default /metrics)")
    parser.add_argument("--web.config.file", dest="web_config_file", default=None, type=_path_flag,
                        help="exporter-toolkit web config file enabling TLS and/or basic auth")
    parser.add_argument("--poll.interval", dest="poll_interval", default=1.0, type=_duration_flag(0.05, 3600),
                        help="how often the disks with a job are read (default 1s)")
    parser.add_argument("--poll.call-budget", dest="call_budget", default=DEFAULT_CALL_BUDGET,
                        type=_count_flag(0, 100_000),
                        help="libvirt calls per second for finding jobs started by others and renewing the domain "
                             "XML: disks with a job are read every interval whatever it is; of what is left, at most "
                             "half re-reads XML, and the rest sweeps the other disks round-robin "
                             f"(libvirt_blockjob_discovery_interval_seconds); 0 reads every disk every interval "
                             f"(default {DEFAULT_CALL_BUDGET})")
    parser.add_argument("--inventory.refresh-interval", dest="inventory_interval", default=30.0,
                        type=_duration_flag(1.0, 86400),
                        help="how often the domain list is read and each domain's XML (its disks and backing chains) "
                             "is re-read, besides event-driven refreshes; the re-reads are spread over the poll "
                             "cycles within the call budget (default 30s)")
    parser.add_argument("--collector.chain-depth.min-depth", dest="chain_depth_min", default=0,
                        type=_count_flag(0, 1000),
                        help="export libvirt_blockjob_backing_chain_depth only for disks with at least this many "
                             "backing images, and libvirt_blockjob_disks_by_backing_depth for all: bounds the "
                             "series of a host with many flat disks; 0 exports every disk (default 0)")
    parser.add_argument("--state.file", dest="state_file", default=DEFAULT_STATE_FILE, type=_path_flag,
                        help="where the jobs being tracked are kept across restarts, so that a job that ends while "
                             f"the exporter is down is still counted; '' keeps nothing (default {DEFAULT_STATE_FILE})")
    parser.add_argument("--state.retention", dest="state_retention", default=3600.0,
                        type=_duration_flag(1.0, 30 * 86400),
                        help="how long the series of a domain that is gone are kept; a domain back within it keeps "
                             "its counters (default 1h)")
    parser.add_argument("--policy.file", dest="policy_file", default=None, type=_path_flag,
                        help="YAML policy that starts block pulls (dry run unless --policy.enforce)")
    parser.add_argument("--policy.enforce", dest="policy_enforce", action="store_true",
                        help="let the policy start pulls (opens a read-write libvirt connection)")
    parser.add_argument("--policy.fleet.host-id", dest="fleet_host_id", default=None, type=_host_id_flag,
                        help="this host's identity in the policy's fleet budget (ZooKeeper); unique per host and "
                             "the same across restarts, so a restarted exporter takes its pulls back "
                             "(the host name when not given)")
    parser.add_argument("--alertmanager.url", dest="alertmanager_url", default=None, type=_url_flag,
                        help="also post block-job failures straight to this Alertmanager (v2 API)")
    parser.add_argument("--alertmanager.resolve-after", dest="alertmanager_resolve_after", default=300.0,
                        type=_duration_flag(1.0, 7 * 86400),
                        help="direct alerts resolve themselves after this (default 5m)")
    parser.add_argument("--alertmanager.label", dest="alertmanager_labels", action="append", default=None,
                        type=_alert_label_flag, metavar="NAME=VALUE",
                        help="add this label to every direct alert, e.g. cluster=eu-1 for routing; repeatable, "
                             f"at most {MAX_ALERT_LABELS} (none by default)")
    parser.add_argument("--log.level", dest="log_level", default="info", choices=LEVELS,
                        help=f"log messages at this level and above: {', '.join(LEVELS)} (default info)")
    parser.add_argument("--log.format", dest="log_format", default="text", choices=("text", "json"),
                        help="log as text or as one JSON object a line (default text)")
    parser.add_argument("--version", action="version", version=f"libvirt-blockjob-exporter {__version__}",
                        help="print the version and exit")
    return parser


@_bounded
def _user_flag(text: str) -> str:
    if ":" in text:
        raise ValueError("a basic auth username cannot hold ':'")
    return text


def build_status_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="libvirt-blockjob-exporter status",
        description="Show the active block jobs with progress bars, rate and ETA, read from libvirt (read-only: "
                    "XMLDesc and blockJobInfo, read twice a poll interval apart for the rates) or from a running "
                    "exporter's status.json. Exit 0, or 1 when the source cannot be read.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--libvirt.uri", dest="uri", default=DEFAULT_URI, type=_uri_flag,
                        help=f"read this libvirt URI over a read-only connection (default {DEFAULT_URI})")
    source.add_argument("--exporter.url", dest="exporter_url", default=None, type=_exporter_url_flag,
                        help="read a running exporter instead, e.g. https://host:9478/ (its status.json; a URL "
                             "ending in /metrics means that exporter); no user:password@ in it, redirects are "
                             "not followed")
    parser.add_argument("--exporter.username", dest="exporter_username", default=None, type=_user_flag,
                        help="basic auth username for --exporter.url")
    parser.add_argument("--exporter.password-file", dest="exporter_password_file", default=None, type=_path_flag,
                        help="file holding the basic auth password for --exporter.url (not a flag: flags are "
                             "visible to every user)")
    parser.add_argument("--exporter.ca-file", dest="exporter_ca_file", default=None, type=_path_flag,
                        help="CA certificate(s) to verify an https --exporter.url with, besides the system's")
    parser.add_argument("--poll.interval", dest="poll_interval", default=1.0, type=_duration_flag(0.1, 3600),
                        help="time between the two libvirt reads a rate needs, and between refreshes with --watch; "
                             f"0.1s to 1h, at least {MIN_LIBVIRT_WATCH_SECONDS:g}s with --watch from libvirt (each "
                             "refresh reads every domain and disk) (default 1s)")
    parser.add_argument("--watch", action="store_true",
                        help="refresh in place until interrupted (Ctrl-C); a failed read is shown and retried, "
                             "only a failed first read ends it (exit 1); each refresh is printed anew when the "
                             "output is not a terminal")
    parser.add_argument("--output", dest="output", default="table", choices=("table", "json"),
                        help="a table for people, or the status document as JSON for scripts, one a line with "
                             "--watch (default table)")
    return parser


def status_main(argv: Sequence[str]) -> int:
    parser = build_status_parser()
    args = parser.parse_args(list(argv))
    if args.exporter_url is None and (args.exporter_username or args.exporter_password_file or args.exporter_ca_file):
        parser.error("--exporter.username, --exporter.password-file and --exporter.ca-file need --exporter.url")
    if (args.exporter_username is None) != (args.exporter_password_file is None):
        parser.error("--exporter.username and --exporter.password-file go together")
    if args.watch and args.exporter_url is None and args.poll_interval < MIN_LIBVIRT_WATCH_SECONDS:
        parser.error(f"--watch from libvirt reads every domain and disk at each refresh: --poll.interval must be "
                     f"at least {MIN_LIBVIRT_WATCH_SECONDS:g}s (or read a running exporter with --exporter.url)")
    from .status_cli import run_status

    # The connection's own retry warnings would say "(retrying)"; the command reports failures itself.
    logging.getLogger("exporter").setLevel(logging.ERROR)
    return run_status(args)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "policy":
        return policy_main(argv[1:])
    if argv and argv[0] == "status":
        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.policy_enforce and not args.policy_file:
        build_parser().error("--policy.enforce needs --policy.file")
    args.alertmanager_labels = args.alertmanager_labels or []
    names = [name for name, _ in args.alertmanager_labels]
    if len(names) > MAX_ALERT_LABELS:
        build_parser().error(f"--alertmanager.label: at most {MAX_ALERT_LABELS}")
    if len(set(names)) < len(names):
        build_parser().error("--alertmanager.label: each label once")
    if names and not args.alertmanager_url:
        build_parser().error("--alertmanager.label needs --alertmanager.url")
    setup_logging(args.log_level, args.log_format)
    return run_exporter(args)


def run_exporter(args: argparse.Namespace) -> int:
    from .collector import BlockJobCollector
    from .libvirt_host import LibvirtHost
    from .selfstats import SelfStats
    from .state import State
    from .statefile import JobsFile
    from .status import StatusSource
    from .web import WebServer
    from .webconfig import WebConfigError, load_web_config

    try:
        web_config = load_web_config(args.web_config_file) if args.web_config_file else None
    except WebConfigError as err:
        print(f"invalid --web.config.file:\n{err}", file=sys.stderr)
        return 1
    state = State(retention=args.state_retention)
    jobs_file = JobsFile(args.state_file) if args.state_file else None
    if jobs_file is not None:
        jobs_file.restore(state)
    stats = SelfStats()
    engine = notifier = None
    if args.alertmanager_url:
        from .alertmanager import AlertmanagerNotifier

        notifier = AlertmanagerNotifier(args.alertmanager_url, resolve_after_seconds=args.alertmanager_resolve_after,
                                        instance=args.listen_address, extra_labels=dict(args.alertmanager_labels))

    def on_outcomes(outcomes) -> None:
        for outcome in outcomes:
            if notifier is not None and outcome.outcome == "failed":
                notifier.notify_failure(outcome.domain, outcome.disk, outcome.job_type, outcome.wall)
            if engine is not None:
                engine.on_outcome(outcome.domain, outcome.disk, outcome.job_type, outcome.outcome, outcome.wall)

    def after_cycle() -> None:
        if jobs_file is not None:
            jobs_file.save(state)
        if engine is not None:
            engine.evaluate_and_act(state.snapshot())

    host = LibvirtHost(uri=args.uri, state=state, stats=stats, poll_interval=args.poll_interval,
                       inventory_interval=args.inventory_interval, call_budget=args.call_budget,
                       read_only=not args.policy_enforce, on_outcomes=on_outcomes, after_cycle=after_cycle)
    collector = BlockJobCollector(state, stats, __version__, min_depth=args.chain_depth_min)
    if args.policy_file:
        from .policy.config import PolicyError
        from .policy.engine import PolicyEngine
        from .policy.fleet import FleetError

        try:  # before anything starts: a bad file stops the exporter here
            engine = PolicyEngine(args.policy_file, enforcing=args.policy_enforce, host=host.actions,
                                  host_id=args.fleet_host_id, on_fleet_change=host.request_cycle)
        except (PolicyError, FleetError) as err:  # unreadable files included
            print(f"invalid --policy.file, refusing to start:\n{err}", file=sys.stderr)
            return 1
        collector.add_extra("policy", engine.metric_families)
    if notifier is not None:
        collector.add_extra("alertmanager", notifier.metric_families)

    status = StatusSource(state, stats, uri=args.uri, read_only=not args.policy_enforce,
                          poll_interval=args.poll_interval, version=__version__, policy=engine)
    try:
        server = WebServer(args.listen_address, args.telemetry_path, collector.exposition,
                           web_config=web_config, version=__version__, status=status.json)
        server.start()
    except (OSError, ValueError, WebConfigError) as err:
        print(str(err), file=sys.stderr)
        return 1
    host_addr, port = server.bound_address[:2]
    log.info("libvirt-blockjob-exporter %s listening on %s:%s%s, libvirt %s (%s)", __version__, host_addr, port,
             args.telemetry_path, args.uri, "read-write, policy enforcing" if args.policy_enforce else "read-only")

    stop = threading.Event()

    def on_stop(signum, _frame) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    def on_hup(_signum, _frame) -> None:
        if engine is None:
            log.info("SIGHUP: no --policy.file to reload")
            return
        threading.Thread(target=lambda: (engine.reload(), host.request_cycle()), name="policy-reload",
                         daemon=True).start()

    for signum, handler in ((signal.SIGTERM, on_stop), (signal.SIGINT, on_stop), (signal.SIGHUP, on_hup)):
        signal.signal(signum, handler)
    if notifier is not None:
        notifier.start()
    if engine is not None:
        engine.start()
    host.start()
    _wait_for_signals(stop)
    server.shutdown()
    host.stop()
    if engine is not None:
        engine.stop()
    if notifier is not None:
        notifier.stop()
    log.info("stopped")
    return 0


def _wait_for_signals(stop: threading.Event) -> None:
    """Block the main thread until ``stop``, running signal handlers as soon as a signal arrives.

    Python runs handlers only in the main thread, and a wait there is interrupted only if the kernel
    delivers the signal to that thread, which with our other threads it often does not. The wakeup
    fd is written whichever thread takes the signal, so select() returns at once.
    """
    import select
    import socket

    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        while not stop.is_set():
            select.select([reader], [], [], 60)
            try:
                while reader.recv(512):
                    pass
            except BlockingIOError:
                pass
    finally:
        signal.set_wakeup_fd(previous)
        reader.close()
        writer.close()


def build_policy_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="libvirt-blockjob-exporter policy",
                                     description="Check a policy file, or show what it would do on this host now.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a policy file; exit 0 if valid, 1 with every error",
                           description="Validate a policy file: exit 0 if valid, 1 with every problem and its line.")
    check.add_argument("file", type=_path_flag, help="the policy file (YAML)")
    plan = sub.add_parser("plan", help="what the policy would decide now on this host",
                          description="Print what the policy would decide now on this host, as a dry run with "
                                      "no history; never starts anything.")
    plan.add_argument("--policy.file", dest="policy_file", required=True, type=_path_flag,
                      help="the policy file (YAML); required")
    plan.add_argument("--libvirt.uri", dest="uri", default=DEFAULT_URI, type=_uri_flag,
                      help=f"read this libvirt URI over a read-only connection (default {DEFAULT_URI})")
    return parser


def policy_main(argv: Sequence[str]) -> int:
    args = build_policy_parser().parse_args(list(argv))
    from .policy.commands import policy_check, policy_plan

    return policy_check(args.file) if args.command == "check" else policy_plan(args.policy_file, args.uri)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
