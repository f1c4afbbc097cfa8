"""ambient-agent command line: one entry point, one sub-command per job.

Sub-commands register themselves through small ``add_parser`` functions in
their own modules, so that importing the CLI stays cheap and each feature
owns its flags.
"""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambient-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    sub = parser.add_subparsers(dest="command", required=True)

    from agent import daemon, status
    from agent.ca import cli as ca_cli
    from agent.capture import cli as capture_cli
    from agent.policy import cli as policy_cli
    from cni import installer as cni_installer

    daemon.add_parser(sub)
    capture_cli.add_parser(sub)
    ca_cli.add_parser(sub)
    policy_cli.add_parser(sub)
    status.add_parser(sub)
    cni_installer.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The format below uses none of a record's caller, thread or process
    # fields: not collecting them (the logging docs' "Optimization") takes a
    # fifth off every line, and the access log writes one per connection.
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
