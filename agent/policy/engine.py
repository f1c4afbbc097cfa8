"""Istio's L4 authorization decision for one inbound connection. Pure.

``PolicySet.from_state(state)`` reads every ``security.istio.io``
AuthorizationPolicy and PeerAuthentication of a ``ClusterState``;
``evaluate(InboundRequest, workload) -> PolicyDecision`` (``request.py``)
decides for the destination ``workload`` (a ``agent.state.model.Pod``, or a
``Workload``: namespace and labels), in Istio's order:

1. PeerAuthentication: STRICT and the connection has no peer identity
   (plaintext): denied. The mode is the workload policy's (its
   ``portLevelMtls`` entry for the destination port first), else the
   namespace's, else the root namespace's, each level inheriting when its
   mode is UNSET; PERMISSIVE when nothing says otherwise. Several at one
   level: the oldest (creationTimestamp, then name) wins, as in Istio.
   DISABLE is enforced as PERMISSIVE.
2. A matching DENY policy denies. CUSTOM policies are enforced as DENY
   policies (the node agent cannot call the extension, so it assumes the
   extension would refuse: fail closed).
3. No ALLOW policy selects the workload: allowed.
4. A matching ALLOW policy allows; otherwise denied.

AUDIT policies never change the decision; a match sets ``PolicyDecision.audit``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

from agent.policy.model import (
    ALLOW,
    AUDIT,
    AUTHORIZATION_POLICY,
    CUSTOM,
    DENY,
    PEER_AUTHENTICATION,
    PERMISSIVE,
    STRICT,
    UNSET,
    AuthorizationPolicy,
    Peer,
    PeerAuthentication,
    Rejection,
)
from agent.policy.parse import (
    CLUSTER_LOCAL,
    effective_mode,
    is_security_object,
    namespace_and_name,
    parse_authorization_policy,
    parse_peer_authentication,
)
from agent.policy.request import InboundRequest, PolicyDecision, Workload
from agent.state.model import Pod

DEFAULT_ROOT_NAMESPACE = "istio-system"


Destination = Pod | Workload


def _workload(workload: Destination | None) -> tuple[str, str, Mapping[str, str]]:
    """(namespace, "namespace/name" for messages, labels) of the destination."""
    if isinstance(workload, Pod):
        return workload.namespace, f"{workload.namespace}/{workload.name or '?'}", workload.labels
    if workload is None or not workload.namespace:
        raise ValueError("a request needs the destination pod, or its namespace and labels")
    labels = dict(workload.labels or {})
    shown = workload.name or ("{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}")
    return workload.namespace, f"{workload.namespace}/{shown}", labels


def _ip(text: str, what: str):
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{what} {text!r} is not an IP address") from None
    mapped = getattr(ip, "ipv4_mapped", None)
    return mapped if mapped is not None else ip


def _peer(req: InboundRequest) -> Peer:
    source, destination = _ip(req.source_ip, "source IP"), _ip(req.destination_ip, "destination IP")
    port = req.destination_port
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"destination port {port!r} is not a port number")
    if req.source_identity is None:
        return Peer(source, destination, port)
    from agent.identity.spiffe import IdentityError, parse_spiffe_uri
    try:
        ident = parse_spiffe_uri(req.source_identity)
    except IdentityError as exc:
        raise ValueError(f"source identity {req.source_identity!r} is not a SPIFFE workload identity "
                         f"({exc})") from None
    principal = f"{ident.trust_domain}/ns/{ident.namespace}/sa/{ident.service_account}"
    return Peer(source, destination, port, principal, ident.namespace, ident.service_account)


def _order(policy: AuthorizationPolicy):
    return (not policy.scope.root, policy.namespace, policy.name)


class PolicySet:
    """Every AuthorizationPolicy and PeerAuthentication of one cluster state, ready to evaluate."""

    def __init__(self, authorization: Iterable[AuthorizationPolicy] = (),
                 peer_authentication: Iterable[PeerAuthentication] = (),
                 rejections: Iterable[Rejection] = (), reports: Iterable[str] = (),
                 root_namespace: str = DEFAULT_ROOT_NAMESPACE, trust_domain: str = CLUSTER_LOCAL) -> None:
        self.authorization = sorted(authorization, key=_order)
        self.peer_authentication = list(peer_authentication)
        self.rejections: list[Rejection] = list(rejections)
        self.reports: list[str] = list(reports)
        self.root_namespace = root_namespace
        self.trust_domain = trust_domain

    @classmethod
    def from_state(cls, state, root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                   trust_domain: str = CLUSTER_LOCAL) -> PolicySet:
        return cls.from_objects(state.objects, root_namespace, trust_domain)

    @classmethod
    def from_objects(cls, objects: Iterable[dict], root_namespace: str = DEFAULT_ROOT_NAMESPACE,
                     trust_domain: str = CLUSTER_LOCAL) -> PolicySet:
        """Read the security objects among ``objects`` (others are ignored); never raises."""
        found: dict[tuple[str, str, str], tuple] = {}
        reports: list[str] = []
        for obj in objects:
            if not isinstance(obj, dict) or not is_security_object(obj):
                continue
            namespace, name = namespace_and_name(obj)
            key = (obj["kind"], namespace, name)
            if key in found:
                reports.append(f"{obj['kind']} {namespace}/{name} appears twice: the later one replaces "
                               "the earlier")
            if obj["kind"] == AUTHORIZATION_POLICY:
                found[key] = parse_authorization_policy(obj, root_namespace, trust_domain)
            else:
                found[key] = parse_peer_authentication(obj, root_namespace)
        authorization: list[AuthorizationPolicy] = []
        peer_auth: list[PeerAuthentication] = []
        rejections: list[Rejection] = []
        for (kind, _, _), (policy, rejection, lines) in found.items():
            (authorization if kind == AUTHORIZATION_POLICY else peer_auth).append(policy)
            if rejection is not None:
                rejections.append(rejection)
            reports.extend(lines)
        reports.extend(_peer_authentication_conflicts(peer_auth))
        return cls(authorization, peer_auth, rejections, reports, root_namespace, trust_domain)

    # -- queries -------------------------------------------------------------

    def policies_for(self, namespace: str, labels: Mapping[str, str]) -> list[AuthorizationPolicy]:
        """The AuthorizationPolicies that apply to a workload (waypoint policies never do)."""
        return [p for p in self.authorization if p.scope.selects(namespace, labels)]

    def mtls(self, namespace: str, labels: Mapping[str, str], port: int
             ) -> tuple[str, PeerAuthentication | None, str]:
        """(STRICT or PERMISSIVE, the PeerAuthentication that set it, a description)."""
        mode, source, detail = PERMISSIVE, None, "no PeerAuthentication applies: PERMISSIVE by default"
        for level in ("mesh", "namespace", "workload"):
            candidates = [pa for pa in self.peer_authentication
                          if pa.level == level and pa.selects(namespace, labels)]
            if not candidates:
                continue
            pa = min(candidates, key=_age)
            where = {"mesh": "mesh-wide", "namespace": "namespace-wide", "workload": "workload"}[level]
            if pa.mode != UNSET:
                mode, source = effective_mode(pa.mode), pa
                detail = f"PeerAuthentication {pa.key}, {where}"
                if pa.broken:
                    detail += ", invalid so read as STRICT"
            port_mode = pa.port_modes.get(port, UNSET)
            if port_mode != UNSET:
                mode, source = effective_mode(port_mode), pa
                detail = f"PeerAuthentication {pa.key}, portLevelMtls {port}"
        return mode, source, detail

    # -- decisions -----------------------------------------------------------

    def evaluate(self, req: InboundRequest, workload: Destination | None) -> PolicyDecision:
        return self._evaluate(req, workload, None)

    def explain(self, req: InboundRequest, workload: Destination | None) -> tuple[PolicyDecision, list[str]]:
        """The decision and how it was reached, one line per step (for people)."""
        trace: list[str] = []
        return self._evaluate(req, workload, trace), trace

    def _evaluate(self, req: InboundRequest, workload: Destination | None,
                  trace: list[str] | None) -> PolicyDecision:
        note = trace.append if trace is not None else (lambda line: None)
        try:
            namespace, who, labels = _workload(workload)
        except ValueError as exc:
            return PolicyDecision(False, f"{exc}: denied", mtls_mode=STRICT)
        labels_text = ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "none"
        note(f"destination: {who} (labels {labels_text}), {req.destination_ip} port {req.destination_port}")
        mode, pa, detail = self.mtls(namespace, labels, req.destination_port)
        try:
            peer = _peer(req)
        except ValueError as exc:
            return PolicyDecision(False, f"{exc}: denied", mtls_mode=mode)
        note(f"source: {peer.describe_source()}")
        note(f"mTLS: {mode} ({detail})")
        if mode == STRICT and peer.principal is None:
            note("AuthorizationPolicies: not evaluated (the mTLS check decided)")
            return PolicyDecision(False, f"STRICT mTLS ({detail}) and the connection is plaintext: denied",
                            pa.key if pa else None, mtls_mode=mode)

        applicable = self.policies_for(namespace, labels)
        if not applicable:
            note("AuthorizationPolicies: none selects this workload")
        results = {}
        for policy in applicable:
            matched, rule, whys = policy.match(peer)
            results[policy.key] = (matched, rule)
            if policy.broken is not None:
                state = "rejected: " + ("denies everything" if policy.denies_all else
                                        "allows nothing" if policy.action == ALLOW else "no effect")
            else:
                state = f"matches (rule {rule})" if matched else "does not match"
            note(f"{policy.action} {policy.key} ({policy.scope.describe()}): {state}")
            for why in whys:
                note(f"    {why}")

        audits = [p.key for p in applicable if p.action == AUDIT and p.broken is None
                  and results[p.key][0]]
        audited = f" (audited by {', '.join(audits)})" if audits else ""

        def decide(allowed: bool, reason: str, policy: str | None = None, rule: int | None = None):
            return PolicyDecision(allowed, reason + audited, policy, rule, bool(audits), mode)

        for policy in applicable:
            if policy.action not in (DENY, CUSTOM) and not policy.denies_all:
                continue
            matched, rule = results[policy.key]
            if not matched:
                continue
            if policy.broken is not None:
                what = f"{policy.action} policy" if policy.action != "UNKNOWN" else "policy with an unreadable action"
                return decide(False, f"{what} {policy.key} is invalid ({policy.broken}): it denies every "
                                     f"connection to {who} (fail closed)", policy.key)
            if policy.action == CUSTOM:
                return decide(False, f"CUSTOM policy {policy.key} (provider {policy.provider}) rule {rule} "
                                     "matches, and a node agent cannot ask the extension: denied (fail closed)",
                              policy.key, rule)
            return decide(False, f"denied by DENY policy {policy.key} rule {rule}", policy.key, rule)

        allows = [p for p in applicable if p.action == ALLOW]
        if not allows:
            return decide(True, f"no ALLOW policy selects {who}: allowed by default")
        for policy in allows:
            matched, rule = results[policy.key]
            if matched:
                return decide(True, f"allowed by ALLOW policy {policy.key} rule {rule}", policy.key, rule)
        summary = "; ".join(f"{p.key}: {_allow_summary(p)}" for p in allows)
        return decide(False, f"no ALLOW policy matches this connection to {who} ({summary}): denied")


def _allow_summary(policy: AuthorizationPolicy) -> str:
    if policy.broken is not None:
        return "rejected, allows nothing"
    if not policy.rules:
        return "no enforceable rules, allows nothing" if policy.ignored else "no rules, allows nothing"
    return "no rule matches"


def _age(pa: PeerAuthentication):
    return (pa.created is None, pa.created or "", pa.namespace, pa.name)


def _peer_authentication_conflicts(policies: list[PeerAuthentication]) -> list[str]:
    lines = []
    groups: dict[tuple[str, str], list[PeerAuthentication]] = {}
    for pa in policies:
        if pa.level in ("mesh", "namespace"):
            groups.setdefault((pa.level, pa.namespace), []).append(pa)
    for (level, namespace), members in sorted(groups.items()):
        if len(members) > 1:
            members.sort(key=_age)
            others = ", ".join(m.key for m in members[1:])
            lines.append(f"{PEER_AUTHENTICATION} {members[0].key}: {len(members)} {level}-wide "
                         f"PeerAuthentications in {namespace}; the oldest, {members[0].key}, applies "
                         f"({others} ignored)")
    return lines
