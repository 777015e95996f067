"""Every flag value is bounded: a bad one is exit 2 with a message, never a traceback or a dead thread."""

from __future__ import annotations

import pytest

from exporter.cli import build_parser, main, policy_main


def parse_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "argv,message",
    [
        # accepted before, and the poller thread died silently
        (["--poll.interval", "1000y"], "argument --poll.interval: bad duration '1000y': must be at most 1h"),
        (["--poll.interval", "10ms"], "argument --poll.interval: '10ms' is below the minimum of 0.05s"),
        (["--poll.interval", "fast"], "argument --poll.interval: bad duration 'fast': expected a number and a unit "
                                      "(ms, s, m, h, d, w, y) from largest to smallest, such as 500ms, 1.5m, 1h30m"),
        (["--inventory.refresh-interval", "2d"],
         "argument --inventory.refresh-interval: bad duration '2d': must be at most 1d"),
        (["--state.retention", "31d"], "argument --state.retention: bad duration '31d': must be at most 30d"),
        (["--state.retention", "0.5s"], "argument --state.retention: '0.5s' is below the minimum of 1s"),
        (["--state.file", "x" * 5000], "argument --state.file: longer than 4096 characters"),
        (["--poll.call-budget", "100001"], "argument --poll.call-budget: '100001' is not a whole number from 0 to 100000"),
        (["--poll.call-budget", "-1"], "argument --poll.call-budget: '-1' is not a whole number from 0 to 100000"),
        (["--poll.call-budget", "1e9"], "argument --poll.call-budget: '1e9' is not a whole number from 0 to 100000"),
        (["--state.file", "/tmp/a\nb"], "argument --state.file: '/tmp/a\\nb' contains a control character"),
        (["--alertmanager.resolve-after", "1" + "0" * 400 + "y"],
         "argument --alertmanager.resolve-after: bad duration '1000000000000000000000000000000000000...': expected "
         "a number and a unit (ms, s, m, h, d, w, y) from largest to smallest, such as 500ms, 1.5m, 1h30m"),
        (["--alertmanager.resolve-after", "8d"],
         "argument --alertmanager.resolve-after: bad duration '8d': must be at most 7d"),
        # a traceback before
        (["--alertmanager.url", "http://h:abc/"],
         "argument --alertmanager.url: Port could not be cast to integer value as 'abc'"),
        (["--alertmanager.url", "http://h:99999/"], "argument --alertmanager.url: Port out of range 0-65535"),
        (["--alertmanager.url", "http://[::1/"], "argument --alertmanager.url: Invalid IPv6 URL"),
        (["--alertmanager.url", "ftp://h/"], "argument --alertmanager.url: 'ftp://h/' must be an http(s) URL"),
        (["--alertmanager.url", "http://h/\nx"], "argument --alertmanager.url: 'http://h/\\nx' contains a control character"),
        (["--libvirt.uri", "qemu:///" + "x" * 5000], "argument --libvirt.uri: longer than 4096 characters"),
        (["--web.telemetry-path", "/me trics"],
         "argument --web.telemetry-path: '/me trics' must start with /, not be / (the landing page) and hold no spaces"),
        (["--web.telemetry-path", "/status.json"],
         "argument --web.telemetry-path: '/status.json' is taken (the status page's data and the health check)"),
        (["--web.listen-address", ":" + "9" * 5000], "argument --web.listen-address: longer than 4096 characters"),
        (["--policy.file", "x" * 5000], "argument --policy.file: longer than 4096 characters"),
        (["--web.config.file", "a\x00b"], "argument --web.config.file: 'a\\x00b' contains a control character"),
        (["--policy.fleet.host-id", "h" * 254], f"argument --policy.fleet.host-id: {'h' * 254!r}: must be 1 to 253 characters"),
        (["--policy.fleet.host-id", "a b"], "argument --policy.fleet.host-id: 'a b': must be printable, without spaces"),
        (["--policy.fleet.host-id", ""], "argument --policy.fleet.host-id: '': must be 1 to 253 characters"),
        (["--alertmanager.label", "cluster"], "argument --alertmanager.label: 'cluster': expected NAME=VALUE, "
                                              "e.g. cluster=eu-1"),
        (["--alertmanager.label", "bad-name=x"], "argument --alertmanager.label: invalid label name 'bad-name'"),
        (["--alertmanager.label", "__meta=x"], "argument --alertmanager.label: invalid label name '__meta'"),
        (["--alertmanager.label", "severity=info"],
         "argument --alertmanager.label: label 'severity' is set by the notifier and cannot be overridden"),
        (["--alertmanager.label", "cluster="],
         "argument --alertmanager.label: label 'cluster': the value must have 1 to 1024 characters"),
        (["--alertmanager.label", "cluster=" + "x" * 1025],
         "argument --alertmanager.label: label 'cluster': the value must have 1 to 1024 characters"),
    ],
)
def test_bad_flag_values_exit_2(capsys, argv, message):
    assert parse_error(capsys, argv) == f"libvirt-blockjob-exporter: error: {message}"


def test_good_flag_values():
    args = build_parser().parse_args(["--poll.interval", "1.5s", "--inventory.refresh-interval", "1d",
                                      "--alertmanager.url", "https://am.example:9093/prefix",
                                      "--alertmanager.resolve-after", "1.5m"])
    assert (args.poll_interval, args.inventory_interval, args.alertmanager_resolve_after) == (1.5, 86400, 90)
    assert args.alertmanager_url == "https://am.example:9093/prefix"
    assert args.alertmanager_labels is None
    args = build_parser().parse_args(["--alertmanager.label", "cluster=eu=1", "--alertmanager.label", "env=prod"])
    assert args.alertmanager_labels == [("cluster", "eu=1"), ("env", "prod")]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--alertmanager.label", "env=a"], "--alertmanager.label needs --alertmanager.url"),
        (["--alertmanager.url", "http://am:9093", "--alertmanager.label", "env=a", "--alertmanager.label", "env=b"],
         "--alertmanager.label: each label once"),
        (["--alertmanager.url", "http://am:9093", *[a for i in range(17) for a in ("--alertmanager.label", f"l{i}=v")]],
         "--alertmanager.label: at most 16"),
    ],
)
def test_alertmanager_labels_checked_together_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"libvirt-blockjob-exporter: error: {message}"


@pytest.mark.parametrize(
    "argv,message",
    [
        (["check", "x" * 5000], "argument file: longer than 4096 characters"),
        (["plan", "--policy.file", "p.yml", "--libvirt.uri", "nope"],
         "argument --libvirt.uri: 'nope' is not a libvirt URI (e.g. qemu:///system)"),
        (["plan", "--policy.file", "x" * 5000], "argument --policy.file: longer than 4096 characters"),
    ],
)
def test_policy_subcommand_flags_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        policy_main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(f" error: {message}")
