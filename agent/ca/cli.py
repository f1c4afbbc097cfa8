"""`ambient-agent ca`: command-line flags of the CA server.

Importing this module is cheap (no gRPC, no cryptography): the CLI builds
every sub-command's parser on each start.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger("agent.ca.server")


def _duration(text: str) -> int:
    from agent.ca.rules import parse_duration
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ca", help="run a CA speaking Istio's certificate API (for node agents)",
        description="Signs workload certificates for node agents. The root bundle to trust is "
                    "<ca-dir>/root-cert.pem (also written to --root-cert-out if given).")
    p.add_argument("--listen", default="127.0.0.1:15012", help="host:port to serve on (default: %(default)s)")
    p.add_argument("--ca-dir", required=True,
                   help="Istio cacerts directory (ca-cert.pem, ca-key.pem, root-cert.pem, "
                        "cert-chain.pem); an empty one gets a new self-signed root")
    p.add_argument("--tokens", required=True,
                   help="'kube': review callers' projected service-account tokens with the Kubernetes "
                        "API (TokenReview); otherwise a YAML/JSON file mapping each node agent's "
                        "bearer token to its node name (the lab; use ./kube for a file named kube)")
    p.add_argument("--kubeconfig", metavar="PATH",
                   help="with --tokens kube or --state kube: kubeconfig to reach the API "
                        "(default: in-cluster configuration)")
    p.add_argument("--token-audience", default="istio-ca",
                   help="with --tokens kube: audience callers' tokens must be valid for "
                        "(default: %(default)s)")
    p.add_argument("--node-agent-service-account", default="istio-system/ambient-agent",
                   metavar="NAMESPACE/NAME",
                   help="with --tokens kube: the node agents' service account, the only one that "
                        "may request other identities (ImpersonatedIdentity) for pods on its node; "
                        "any other account gets only its own identity (default: %(default)s)")
    p.add_argument("--state", required=True,
                   help="cluster state source: file:PATH, kube (the Kubernetes API through "
                        "--kubeconfig, else in-cluster) or kube:KUBECONFIG")
    p.add_argument("--trust-domain", default="cluster.local", help="SPIFFE trust domain (default: %(default)s)")
    p.add_argument("--default-ttl", type=_duration, default="24h",
                   help="lifetime of a certificate when the request asks for none (default: 24h)")
    p.add_argument("--max-ttl", type=_duration, default="48h",
                   help="longest lifetime issued; longer requests are shortened (default: 48h)")
    p.add_argument("--san", action="append", dest="sans", metavar="NAME",
                   help="DNS name or IP address of the CA's serving certificate (repeatable; "
                        "default: localhost and 127.0.0.1)")
    p.add_argument("--root-cert-out", metavar="PATH",
                   help="also write the root bundle here (atomically) once the CA is ready")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from agent.ca.authn import AuthConfigError
    from agent.ca.material import MaterialError
    from agent.ca.server import DEFAULT_SERVING_NAMES, CaConfig, CaServer
    from agent.identity.pki import PkiError
    from agent.identity.spiffe import IdentityError
    from agent.state.model import StateError

    config = CaConfig(
        ca_dir=args.ca_dir, tokens=args.tokens, state=args.state, listen=args.listen,
        trust_domain=args.trust_domain, default_ttl=args.default_ttl, max_ttl=args.max_ttl,
        serving_names=tuple(args.sans) if args.sans else DEFAULT_SERVING_NAMES,
        root_cert_out=args.root_cert_out, kubeconfig=args.kubeconfig, audience=args.token_audience,
        node_agent_account=args.node_agent_service_account,
    )
    try:
        asyncio.run(CaServer(config).run())
    except (AuthConfigError, IdentityError, MaterialError, PkiError, StateError, OSError) as exc:
        log.error("cannot run the CA: %s", exc)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m agent.ca.cli ca ...``); ``ambient-agent ca`` is the same parser."""
    parser = argparse.ArgumentParser(prog="ambient-agent")
    parser.add_argument("--log-level", default="info", help="debug, info, warning or error")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
