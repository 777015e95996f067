"""``--help`` of every command is complete, and the README's flag tables match it: the same flags,
the same defaults, and every default that ``--help`` states is the README's."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from exporter.cli import build_parser, build_policy_parser, build_status_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
ROW = re.compile(r"^\s*\|\s*(`-[^|]*)\|([^|]*)\|(.*)\|\s*$")


def readme_tables() -> list[dict[str, str]]:
    """Every flag table of the README, in order: {flag: default text}, each spelling of a flag
    (``-h``, ``--help``) its own key."""
    tables: list[dict[str, str]] = []
    current: dict[str, str] | None = None
    for line in README.splitlines():
        match = ROW.match(line)
        if match is None:
            if current:
                tables.append(current)
            current = None
            continue
        current = current if current is not None else {}
        default = match.group(2).strip().strip("`")
        for flag in re.findall(r"`(-[^`]+)`", match.group(1)):
            current[flag] = default
    if current:
        tables.append(current)
    return tables


def commands() -> dict[str, argparse.ArgumentParser]:
    policy = build_policy_parser()
    subs = next(a for a in policy._actions if isinstance(a, argparse._SubParsersAction))
    return {"exporter": build_parser(), "status": build_status_parser(), "policy plan": subs.choices["plan"],
            "policy check": subs.choices["check"]}


def table_for(parser: argparse.ArgumentParser) -> dict[str, str]:
    """The README table that shares the most flags with this command (the fewest others on a tie:
    the ``policy plan`` table's flags are also the exporter's)."""
    flags = {s for a in parser._actions for s in a.option_strings}
    return max(readme_tables(), key=lambda t: (len(flags & set(t)), -len(t)))


def readme_default(action: argparse.Action, text: str):
    if text == "off":
        return False
    if text == "":
        return None
    return action.type(text) if callable(action.type) else text


@pytest.mark.parametrize("name", ["exporter", "status", "policy plan", "policy check"])
def test_help_is_complete(name):
    for action in commands()[name]._actions:
        assert action.help and action.help != argparse.SUPPRESS, \
            f"{name}: {action.option_strings or action.dest} has no help"


@pytest.mark.parametrize("name", ["exporter", "status", "policy plan"])
def test_the_readme_table_matches_help(name):
    parser = commands()[name]
    table = table_for(parser)
    options = {s: a for a in parser._actions for s in a.option_strings}
    assert set(options) == set(table), (f"{name}: --help has {sorted(set(options) - set(table))} that the README "
                                        f"lacks; the README has {sorted(set(table) - set(options))} that --help lacks")
    for flag, action in options.items():
        if flag in ("-h", "--help", "--version"):
            continue
        text = table[flag]
        default = None if action.default is argparse.SUPPRESS else action.default
        assert readme_default(action, text) == default, \
            f"{name}: the README's default of {flag} is {text!r}, --help's is {action.default!r}"
        if text in ("", "off"):
            assert "(default" not in action.help, f"{name}: {flag}'s help states a default the README does not"
        else:
            assert f"(default {text})" in action.help, f"{name}: {flag}'s help should say (default {text})"


def test_every_subcommand_is_in_the_exporters_help():
    epilog = build_parser().epilog
    for command in ("'status'", "'policy check FILE'", "'policy plan"):
        assert command in epilog
