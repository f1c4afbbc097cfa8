"""``ambient-lab …`` (or ``python -m lab …``): the local pod lab from the command line.

A development tool, installed by the ``lab`` extra (``pip install -e '.[lab]'``);
it is not part of the product package or image.

    lab up FILE [--name N] [--no-agents] [--pod-timeout S] [--agent-arg ARG]...
    lab status [--name N] [--json]
    lab exec NAMESPACE/POD [--name N] -- CMD...
    lab node-exec NODE [--name N] -- CMD...
    lab label KIND NAMESPACE/NAME key=value|key- ...
    lab delete-pod NAMESPACE/POD
    lab down [--name N]
    lab list
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys

DEFAULT_NAME = "default"

# kubectl's short names for the kinds people label in the lab.
KIND_ALIASES = {
    "ns": "Namespace", "namespace": "Namespace", "namespaces": "Namespace",
    "po": "Pod", "pod": "Pod", "pods": "Pod",
    "svc": "Service", "service": "Service", "services": "Service",
    "sa": "ServiceAccount", "serviceaccount": "ServiceAccount",
    "node": "Node", "no": "Node", "nodes": "Node",
}


def build_parser() -> argparse.ArgumentParser:
    from lab import DEFAULT_ROOT

    parser = argparse.ArgumentParser(prog="ambient-lab",
                                     description="local pod lab: nodes and pods in network namespaces")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", default=DEFAULT_NAME, help="lab name (default: %(default)s)")
    common.add_argument("--root", default=DEFAULT_ROOT, help=argparse.SUPPRESS)

    lab = parser.add_subparsers(dest="lab_command", required=True)

    up = lab.add_parser("up", parents=[common], help="create or extend a lab from a YAML manifest")
    up.add_argument("file", help="YAML manifest (Pods need spec.nodeName)")
    up.add_argument("--no-agents", action="store_true", help="do not start the node agents")
    up.add_argument("--no-ambient-cni", action="store_true",
                    help="leave ambient-cni out of the nodes' CNI chains")
    up.add_argument("--pod-timeout", type=float, default=30.0,
                    help="seconds to keep retrying a pod's CNI ADD (default: %(default)s)")
    up.add_argument("--agent-arg", action="append", default=[],
                    help="extra argument for each agent's command line (repeatable)")
    up.add_argument("--dual-stack", action="store_true",
                    help="new nodes and their pods also get IPv6 (fd00:198:18::/48)")
    up.set_defaults(func=_up)

    st = lab.add_parser("status", parents=[common], help="nodes, agents and pods")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_status)

    ex = lab.add_parser("exec", parents=[common], help="run a command inside a pod")
    ex.add_argument("target", metavar="NAMESPACE/POD")
    ex.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD...")
    ex.set_defaults(func=_exec)

    nx = lab.add_parser("node-exec", parents=[common], help="run a command in a node's namespace")
    nx.add_argument("target", metavar="NODE")
    nx.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD...")
    nx.set_defaults(func=_node_exec)

    lb = lab.add_parser("label", parents=[common], help="set (key=value) or remove (key-) labels")
    lb.add_argument("kind", help="Namespace, Pod, Service, ... (ns, po, svc)")
    lb.add_argument("target", metavar="NAMESPACE/NAME", help="a namespace's name for Namespace")
    lb.add_argument("labels", nargs="+", metavar="key=value|key-")
    lb.set_defaults(func=_label)

    dp = lab.add_parser("delete-pod", parents=[common], help="delete one pod (CNI DEL, netns, cgroup)")
    dp.add_argument("target", metavar="NAMESPACE/POD")
    dp.set_defaults(func=_delete_pod)

    dn = lab.add_parser("down", parents=[common], help="remove the lab and everything it created")
    dn.set_defaults(func=_down)

    ls = lab.add_parser("list", parents=[common], help="labs on this machine")
    ls.set_defaults(func=_list)
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


def _msg(exc: BaseException) -> str:
    # KeyError's str() is the repr of its argument; show the sentence instead.
    return str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)


def _lab(args: argparse.Namespace, **kwargs):
    from lab.lab import Lab
    return Lab(args.name, root=args.root, **kwargs)


def _split_command(args: argparse.Namespace) -> list[str]:
    """Everything after ``--``; lab options given before it still count."""
    cmd = list(args.command)
    if "--" in cmd:
        i = cmd.index("--")
        before, cmd = cmd[:i], cmd[i + 1:]
        if before:
            extra = argparse.ArgumentParser(prog="ambient-lab exec")
            extra.add_argument("--name", default=args.name)
            extra.add_argument("--root", default=args.root)
            extra.parse_args(before, namespace=args)
    if not cmd:
        raise SystemExit("ambient-lab: give the command after --")
    return cmd


def _up(args: argparse.Namespace) -> int:
    from lab.lab import LabError
    from lab.model import ManifestError
    lab = _lab(args, start_agents=not args.no_agents, pod_timeout=args.pod_timeout,
               agent_args=args.agent_arg, ambient_cni=not args.no_ambient_cni,
               dual_stack=args.dual_stack)
    try:
        report = lab.up(args.file)
    except ManifestError as exc:
        print(f"lab {args.name}: {_msg(exc)}", file=sys.stderr)
        return 1
    except (LabError, OSError) as exc:
        print(f"lab {args.name}: {exc}\n(what was created stays; `ambient-lab down "
              f"--name {args.name}` removes it)", file=sys.stderr)
        return 1
    st = lab.status()
    print(f"lab {args.name} ({lab.dir}): nodes {', '.join(report['nodes'])}")
    for p in st["pods"]:
        key = f"{p['namespace']}/{p['name']}"
        if key in report["created"]:
            print(f"  created {key} on {p['node']}: {p['ip']}")
    for key, msg in report["failed"].items():
        print(f"  FAILED  {key}: {msg}", file=sys.stderr)
    return 1 if report["failed"] else 0


def _status(args: argparse.Namespace) -> int:
    from lab.lab import LabError
    try:
        st = _lab(args).status()
    except LabError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"lab {st['name']}  slot {st['slot']}  state {st['state']}")
    rows = [("NODE", "UNDERLAY", "POD SUBNET", "AGENT")]
    for n in st["nodes"]:
        a = n["agent"]
        if a["running"]:
            agent = f"{'ready' if a['ready'] else 'not answering'} (pid {a['pid']})"
        else:
            agent = "down"
        rows.append((n["name"], n["underlay_ip"], n["pod_subnet"], agent))
    _table(rows)
    print()
    rows = [("POD", "NODE", "IP", "PHASE", "ENROLLED", "REASON")]
    for p in st["pods"]:
        enrolled = "-" if p["enrolled"] is None else ("yes" if p["enrolled"] else "no")
        reason = p["reason"] or p["message"] or ""
        rows.append((f"{p['namespace']}/{p['name']}", p["node"] or "", p["ip"] or "",
                     p["phase"] or "", enrolled, reason))
    _table(rows)
    return 0


def _table(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())


def _wait(proc: subprocess.Popen) -> int:
    # ^C reaches the command too (same foreground process group): let it
    # decide, and report its exit status the way a shell would.
    while True:
        try:
            rc = proc.wait()
            break
        except KeyboardInterrupt:
            continue
    return 128 - rc if rc < 0 else rc   # killed by signal N: 128+N, as a shell says


def _exec(args: argparse.Namespace) -> int:
    return _run_in(args, lambda lab: lab.exec)


def _node_exec(args: argparse.Namespace) -> int:
    return _run_in(args, lambda lab: lab.node_exec)


def _run_in(args: argparse.Namespace, start) -> int:
    """Run the command in ``args.target`` (a pod or a node: ``start`` picks the lab's
    ``exec`` or ``node_exec``) and exit as it does."""
    cmd = _split_command(args)
    try:
        proc = start(_lab(args))(args.target, cmd)
    except (KeyError, OSError, RuntimeError) as exc:   # RuntimeError: LabError
        print(f"lab {args.name}: {_msg(exc)}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 1
    return _wait(proc)


def _label(args: argparse.Namespace) -> int:
    from lab.model import CLUSTER_SCOPED, parse_label_args, split_key
    kind = KIND_ALIASES.get(args.kind.lower(), args.kind)
    if kind in CLUSTER_SCOPED:
        ns, name = None, args.target.rsplit("/", 1)[-1]
    else:
        ns, name = split_key(args.target)
    try:
        labels = parse_label_args(args.labels)
        _lab(args).set_labels(kind, ns, name, labels)
    except (KeyError, ValueError, RuntimeError) as exc:
        print(f"lab {args.name}: {_msg(exc)}", file=sys.stderr)
        return 1
    return 0


def _delete_pod(args: argparse.Namespace) -> int:
    from lab.model import split_key
    try:
        problems = _lab(args).delete_pod(*split_key(args.target))
    except (KeyError, ValueError, RuntimeError) as exc:
        print(f"lab {args.name}: {_msg(exc)}", file=sys.stderr)
        return 1
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if problems else 0


def _down(args: argparse.Namespace) -> int:
    from lab.lab import Lab
    problems = Lab.down_by_name(args.name, root=args.root)
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if problems else 0


def _list(args: argparse.Namespace) -> int:
    from lab.lab import Lab
    labs = Lab.list_labs(args.root)
    rows = [("LAB", "SLOT", "NODES", "PODS")]
    for lab in labs:
        rows.append((lab["name"], lab["slot"], ",".join(lab["nodes"]), lab["pods"]))
    _table(rows)
    return 0



if __name__ == "__main__":
    sys.exit(main())
