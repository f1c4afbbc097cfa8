"""`ambient-agent status`: what a node agent is doing, for people and machines.

Reads the agent's control socket (`status` request) and prints enrolled
pods with their identities, certificate expiry, open connections and recent
denials. ``render`` is pure, so the layout is tested without an agent.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from agent import control


def _expiry(not_after: float | None, now: float) -> str:
    if not not_after:
        return "-"
    left = not_after - now
    if left <= 0:
        return "EXPIRED"
    hours, rest = divmod(int(left), 3600)
    return f"{hours}h{rest // 60:02d}m"


def render(status: dict, now: float | None = None, denials: int = 10) -> str:
    now = time.time() if now is None else now
    certs = {c["identity"]: c for c in status.get("certificates") or []}
    lines = [f"node {status.get('node', '?')}"]
    header = ("POD", "ENROLLED", "IDENTITY", "CERT", "OPEN", "CONNS IN/OUT")
    rows = []
    for pod in status.get("pods", []):
        c = pod.get("counters", {})
        cert = certs.get(pod.get("identity") or "", {})
        state = cert.get("state", "-") if pod.get("identity") else "-"
        expiry = _expiry(cert.get("not_after"), now) if state == "valid" else state
        open_ = sum(c.get(d, {}).get("active", 0) for d in ("outbound", "inbound", "hbone"))
        conns = (f"{c.get('inbound', {}).get('connections', 0) + c.get('hbone', {}).get('connections', 0)}/"
                 f"{c.get('outbound', {}).get('connections', 0)}")
        rows.append((f"{pod['namespace']}/{pod['name']}", "yes" if pod.get("enrolled") else "no",
                     pod.get("identity") or "-", expiry, str(open_), conns))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        lines.append("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    missing = status.get("not_captured") or []
    if missing:
        lines.append("")
        lines.append("MUST BE IN THE MESH BUT NOT CAPTURED:")
        for m in missing:
            lines.append(f"  {m.get('pod')}: {m.get('problem')}")
    refused = [(pod, r) for pod in status.get("pods", []) for r in pod.get("connections", [])
               if str(r.get("outcome", "")).startswith("refused")]
    refused.sort(key=lambda pr: pr[1].get("started", 0))
    lines.append("")
    lines.append("recent denials:" if refused else "recent denials: none")
    for pod, r in refused[-denials:]:
        lines.append(f"  {pod['namespace']}/{pod['name']}: {r.get('source')} "
                     f"({r.get('source_identity') or 'plaintext'}) -> {r.get('destination')}: {r.get('outcome')}")
    return "\n".join(lines)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show what a node agent is doing")
    p.add_argument("--run-dir", default="/run/ambient-agent", help="the agent's run directory")
    p.add_argument("--json", action="store_true", help="print the agent's status as JSON")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    path = os.path.join(args.run_dir, "agent.sock")
    try:
        status = control.request(path, {"op": "status"})
    except (OSError, ValueError) as exc:
        print(f"ambient-agent status: cannot reach the agent at {path}: {exc}", file=sys.stderr)
        return 2
    if not status.get("ok"):
        print(f"ambient-agent status: {status.get('error')}", file=sys.stderr)
        return 2
    print(json.dumps(status, indent=1) if args.json else render(status))
    return 0
