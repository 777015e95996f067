"""Start block pulls from a YAML policy (``--policy.file``); dry run unless ``--policy.enforce``.

``config`` parses the file, ``decide`` is the pure decision function, ``space`` estimates disk
space from the image files, ``engine`` is the thin stateful layer the exporter drives, and
``commands`` backs ``policy check`` / ``policy plan``. See docs/policy.md.
"""

from .config import (
    Limits,
    Match,
    Policy,
    PolicyError,
    Problem,
    PullAction,
    Rule,
    When,
    Window,
    load_policy,
    parse_policy,
)
from .decide import Decision, DiskHistory, DiskSpace, History, Plan, evaluate
from .engine import PolicyEngine, format_plan_table

__all__ = [
    "Decision",
    "DiskHistory",
    "DiskSpace",
    "History",
    "Limits",
    "Match",
    "Plan",
    "Policy",
    "PolicyEngine",
    "PolicyError",
    "Problem",
    "PullAction",
    "Rule",
    "When",
    "Window",
    "evaluate",
    "format_plan_table",
    "load_policy",
    "parse_policy",
]
