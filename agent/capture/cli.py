"""`ambient-agent capture teardown`: remove a node's capture for good.

The agent never does this itself: its BPF programs and pins outlive it on
purpose, so that enrolled pods fail closed while it restarts. Uninstalling
from a node is the one time they must go; run this there (as root, with the
node's bpffs and cgroup v2 visible) after the agent has stopped.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from agent.capture.datapath import DEFAULT_CGROUP
    p = sub.add_parser("capture", help="manage the node's BPF capture outside the agent")
    csub = p.add_subparsers(dest="capture_command", required=True)
    t = csub.add_parser("teardown", help="detach the agent's BPF programs and remove its pins")
    t.add_argument("--pin-dir", default="/sys/fs/bpf/ambient-agent", help="the agent's --pin-dir")
    t.add_argument("--cgroup", default=DEFAULT_CGROUP, help="the agent's --cgroup")
    t.set_defaults(func=_teardown)


def _teardown(args: argparse.Namespace) -> int:
    from agent.capture.datapath import teardown
    problems = teardown(args.pin_dir, args.cgroup)
    for problem in problems:
        log.error("%s", problem)
    if not problems:
        log.info("capture removed: programs detached from %s, pins under %s deleted", args.cgroup, args.pin_dir)
    return 1 if problems else 0
