"""`ambient-agent policy`: check policy files offline, explain one decision.

Importing this module is cheap (argparse only); the engine is imported when
a sub-command runs.

Exit codes:

* ``policy check FILE``: 0 every AuthorizationPolicy and PeerAuthentication
  is accepted (warnings may be printed), 1 at least one object (or a list
  item) would be rejected, 2 the file cannot be read or parsed.
* ``policy explain``: 0 the connection is allowed, 1 it is denied, 2 the
  question cannot be asked (bad arguments, unreadable state, unknown pod,
  pod without an IP).
"""

from __future__ import annotations

import argparse
import sys

EXIT_OK, EXIT_REJECTED, EXIT_DENIED, EXIT_ERROR = 0, 1, 1, 2


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="check Istio security policies offline, explain a decision",
                       description="Istio AuthorizationPolicy and PeerAuthentication, as the node agent "
                                   "enforces them (L4).")
    commands = p.add_subparsers(dest="policy_command", required=True)

    check = commands.add_parser(
        "check", help="validate a YAML/JSON file of policies",
        description="Print every problem of every AuthorizationPolicy and PeerAuthentication in FILE "
                    "(YAML documents, a List, or JSON), and warnings for what the node agent does not "
                    "enforce. Exit 0: all accepted; 1: something would be rejected; 2: unreadable file.")
    check.add_argument("file", metavar="FILE")
    _common(check)
    check.set_defaults(func=_check)

    explain = commands.add_parser(
        "explain", help="explain the decision for one connection between two pods",
        description="Evaluate a connection from one pod to another pod's port against the policies of a "
                    "cluster state. Exit 0: allowed; 1: denied; 2: the question cannot be asked.")
    explain.add_argument("--state", required=True,
                         help="cluster state source: file:PATH, kube or kube:KUBECONFIG")
    explain.add_argument("--from", dest="source", required=True, metavar="NS/POD|IP",
                         help="the client pod, or an IP address (a plaintext client outside the mesh)")
    explain.add_argument("--to", dest="destination", required=True, metavar="NS/POD:PORT",
                         help="the server pod and the port connected to")
    explain.add_argument("--plaintext", action="store_true",
                         help="the client connects without mTLS (no peer identity)")
    _common(explain)
    explain.set_defaults(func=_explain)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root-namespace", default="istio-system",
                   help="Istio's root namespace: its policies apply mesh-wide (default: %(default)s)")
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default: %(default)s)")


# -- check ------------------------------------------------------------------------

def _check(args: argparse.Namespace) -> int:
    from agent.policy.engine import PolicySet
    from agent.policy.model import AUTHORIZATION_POLICY, PEER_AUTHENTICATION
    from agent.policy.parse import GROUP, KINDS, is_security_object
    from agent.state.model import StateError, api_group_of, load_state_text

    try:
        with open(args.file, "rb") as fh:
            text = fh.read().decode("utf-8")
        state = load_state_text(text)
    except OSError as exc:
        print(f"error: cannot read {args.file}: {exc.strerror}", file=sys.stderr)
        return EXIT_ERROR
    except UnicodeDecodeError as exc:
        print(f"error: {args.file}: not UTF-8 text ({exc.reason} at byte {exc.start})", file=sys.stderr)
        return EXIT_ERROR
    except StateError as exc:
        print(f"error: {args.file}: {exc}", file=sys.stderr)
        return EXIT_ERROR

    problems = 0
    for err in state.errors:
        print(f"error: {err}")
        problems += 1
    for obj in state.objects:
        if obj["kind"] in KINDS and api_group_of(obj) != GROUP:
            print(f"warning: {obj['kind']} {obj['metadata']['name']} has apiVersion "
                  f"{obj.get('apiVersion')!r}, not {GROUP}: ignored")
        elif api_group_of(obj) == GROUP and obj["kind"] not in KINDS:
            print(f"warning: {obj['kind']} {obj['metadata']['name']}: not checked (the node agent reads only "
                  f"{', '.join(KINDS)})")
    policies = PolicySet.from_objects(state.objects, args.root_namespace, args.trust_domain)
    for rejection in policies.rejections:
        print(f"error: {rejection}")
        problems += 1
    for line in policies.reports:
        print(f"warning: {line}")
    checked = [o for o in state.objects if is_security_object(o)]
    counts = {k: sum(1 for o in checked if o["kind"] == k) for k in (AUTHORIZATION_POLICY, PEER_AUTHENTICATION)}
    print(f"{args.file}: {counts[AUTHORIZATION_POLICY]} AuthorizationPolicy and {counts[PEER_AUTHENTICATION]} "
          f"PeerAuthentication checked, {len(policies.rejections)} rejected, {len(policies.reports)} warnings")
    return EXIT_REJECTED if problems else EXIT_OK


# -- explain ----------------------------------------------------------------------

class _Usage(Exception):
    pass


def _pod(state, text: str, what: str):
    """The typed ``agent.state.model.Pod`` named ``text`` (NAMESPACE/POD)."""
    namespace, slash, name = text.partition("/")
    if not slash or not namespace or not name:
        raise _Usage(f"{what} {text!r}: expected NAMESPACE/POD")
    pod = state.pod_view(namespace, name)
    if pod is None:
        raise _Usage(f"{what}: no pod {namespace}/{name} in the cluster state")
    return pod


def _address(pod, text: str, family: int | None = None) -> str:
    import ipaddress

    ips = pod.ips
    if not ips:
        raise _Usage(f"pod {text} has no IP address yet (status.podIP)")
    if family is not None:
        for ip in ips:
            try:
                if ipaddress.ip_address(ip).version == family:
                    return ip
            except ValueError:
                continue
    return ips[0]


def _explain(args: argparse.Namespace) -> int:
    import ipaddress

    from agent.policy.engine import PolicySet
    from agent.policy.request import InboundRequest
    from agent.state.model import StateError
    from agent.state.source import open_state_source

    try:
        source = open_state_source(args.state)
        try:
            state = source.load()
        finally:
            close = getattr(source, "close", None)     # the kube source's threads and connections
            if close is not None:
                close()
        target, colon, port_text = args.destination.rpartition(":")
        if not colon or not port_text.isdigit() or int(port_text) > 65535:
            raise _Usage(f"--to {args.destination!r}: expected NAMESPACE/POD:PORT")
        dst_pod = _pod(state, target, "--to")
        dst_ip = _address(dst_pod, target)
        family = ipaddress.ip_address(dst_ip).version if ":" in dst_ip or "." in dst_ip else None
        identity = None
        try:
            src_ip = str(ipaddress.ip_address(args.source))
            source_text = src_ip
        except ValueError:
            src_pod = _pod(state, args.source, "--from")
            src_ip = _address(src_pod, args.source, family)
            source_text = args.source
            if not args.plaintext:
                identity = src_pod.identity_uri(args.trust_domain)
    except (_Usage, StateError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR

    policies = PolicySet.from_state(state, args.root_namespace, args.trust_domain)
    request = InboundRequest(target, src_ip, 0, dst_ip, int(port_text), identity)
    decision, trace = policies.explain(request, dst_pod)
    print(f"{'ALLOWED' if decision.allowed else 'DENIED'}: {source_text} -> {args.destination}")
    print(f"reason: {decision.reason}")
    print(f"decided by: {decision.policy or 'a default'}"
          + (f" rule {decision.rule}" if decision.rule is not None else "")
          + f"; mTLS {decision.mtls_mode}; audit {'yes' if decision.audit else 'no'}")
    print("evaluation:")
    for line in trace:
        print(f"  {line}")
    for rejection in policies.rejections:
        print(f"warning: rejected {rejection}", file=sys.stderr)
    for line in policies.reports:
        print(f"warning: {line}", file=sys.stderr)
    return EXIT_OK if decision.allowed else EXIT_DENIED
