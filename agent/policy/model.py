"""Istio L4 authorization, as values: what ``parse`` builds and ``engine`` evaluates.

Pure and small. Every matcher answers one question, "why does this
connection *not* match?", with ``None`` for "it matches": the same code
decides and explains (``ambient-agent policy explain``).

Matching follows Istio (and ztunnel, its L4 enforcer):

* values inside one field are OR-ed, fields of one ``source``/``operation``
  are AND-ed; a rule matches when any ``from`` entry, any ``to`` entry and
  every ``when`` condition match; an absent list matches anything;
* string values: ``abc`` exact, ``abc*`` prefix, ``*abc`` suffix, ``*``
  presence (any non-empty value);
* principals are compared without ``spiffe://``:
  ``cluster.local/ns/frontend/sa/website``;
* a plaintext connection has no principal, namespace or service account: it
  never matches ``principals``/``namespaces``/``serviceAccounts`` and always
  matches ``notPrincipals``/``notNamespaces``/``notServiceAccounts`` (Istio's
  security bulletin ISTIO-SECURITY-2021-004 documents this; ztunnel's rbac
  compares against an empty value in the same way). ``notPrincipals: ["*"]``
  is therefore "plaintext only", the documented way to refuse plaintext.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
ACTIONS = (ALLOW, DENY, AUDIT, CUSTOM)

UNSET, DISABLE, PERMISSIVE, STRICT = "UNSET", "DISABLE", "PERMISSIVE", "STRICT"
MTLS_MODES = (UNSET, DISABLE, PERMISSIVE, STRICT)

AUTHORIZATION_POLICY = "AuthorizationPolicy"
PEER_AUTHENTICATION = "PeerAuthentication"


@dataclass(frozen=True)
class Rejection:
    """An object that could not be understood, and why (every problem found)."""
    kind: str
    namespace: str
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}: {self.reason}"


# -- the connection as policies see it ----------------------------------------

@dataclass(frozen=True)
class Peer:
    source_ip: IPAddress
    destination_ip: IPAddress
    destination_port: int
    principal: str | None = None          # "td/ns/NS/sa/SA"; None: plaintext
    namespace: str | None = None
    service_account: str | None = None

    def describe_source(self) -> str:
        return f"{self.source_ip} as {self.principal}" if self.principal else f"{self.source_ip} (plaintext)"


# -- value matchers -----------------------------------------------------------

@dataclass(frozen=True)
class StringMatch:
    """Istio's string value: exact, ``prefix*``, ``*suffix`` or ``*`` (presence)."""
    kind: str             # "exact" | "prefix" | "suffix" | "presence"
    value: str            # the part compared (without the '*')
    text: str             # as written in the policy

    def matches(self, candidate: str | None) -> bool:
        if not candidate:
            return False
        if self.kind == "presence":
            return True
        if self.kind == "prefix":
            return candidate.startswith(self.value)
        if self.kind == "suffix":
            return candidate.endswith(self.value)
        return candidate == self.value

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ServiceAccountMatch:
    """``ns/sa`` (or ``sa``, read in the policy's namespace); exact, no wildcards."""
    namespace: str
    name: str

    def matches(self, namespace: str | None, name: str | None) -> bool:
        return namespace == self.namespace and name == self.name

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


def _fmt(values) -> str:
    return "[" + ", ".join(str(v) for v in values) + "]"


def _field(positive, negative, value, present: bool, what: str, pos_name: str, neg_name: str,
           test) -> str | None:
    """One field pair (``x``/``notX``): None when it matches, else why not."""
    if positive and not any(test(m) for m in positive):
        if not present:
            return f"plaintext connection has no {what} ({pos_name} {_fmt(positive)})"
        return f"{what} {value} is not in {pos_name} {_fmt(positive)}"
    if negative and any(test(m) for m in negative):
        return f"{what} {value} is in {neg_name} {_fmt(negative)}"
    return None


# -- rule parts -----------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()
    ip_blocks: tuple[IPNetwork, ...] = ()
    not_ip_blocks: tuple[IPNetwork, ...] = ()

    def mismatch(self, peer: Peer) -> str | None:
        checks = (
            _field(self.principals, self.not_principals, peer.principal, peer.principal is not None,
                   "principal", "principals", "notPrincipals", lambda m: m.matches(peer.principal)),
            _field(self.namespaces, self.not_namespaces, peer.namespace, peer.namespace is not None,
                   "namespace", "namespaces", "notNamespaces", lambda m: m.matches(peer.namespace)),
            _field(self.service_accounts, self.not_service_accounts,
                   f"{peer.namespace}/{peer.service_account}", peer.service_account is not None,
                   "service account", "serviceAccounts", "notServiceAccounts",
                   lambda m: m.matches(peer.namespace, peer.service_account)),
            _field(self.ip_blocks, self.not_ip_blocks, peer.source_ip, True, "source IP",
                   "ipBlocks", "notIpBlocks", lambda n: _in(peer.source_ip, n)),
        )
        return next((c for c in checks if c), None)


@dataclass(frozen=True)
class Operation:
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()

    def mismatch(self, peer: Peer) -> str | None:
        return _field(self.ports, self.not_ports, peer.destination_port, True, "port",
                      "ports", "notPorts", lambda p: p == peer.destination_port)


# `when` keys evaluated at L4 (ztunnel's list plus source.serviceAccount, which
# is as much a property of the peer certificate as source.namespace).
L4_CONDITION_KEYS = ("source.ip", "source.namespace", "source.principal", "source.serviceAccount",
                     "destination.ip", "destination.port")


@dataclass(frozen=True)
class Condition:
    key: str                       # one of L4_CONDITION_KEYS
    values: tuple = ()             # StringMatch | ServiceAccountMatch | IPNetwork | int
    not_values: tuple = ()

    def mismatch(self, peer: Peer) -> str | None:
        key = self.key
        value: object
        if key == "source.ip":
            value, present, test = peer.source_ip, True, lambda n: _in(peer.source_ip, n)
        elif key == "destination.ip":
            value, present, test = peer.destination_ip, True, lambda n: _in(peer.destination_ip, n)
        elif key == "destination.port":
            value, present, test = peer.destination_port, True, lambda p: p == peer.destination_port
        elif key == "source.principal":
            value, present, test = peer.principal, peer.principal is not None, lambda m: m.matches(peer.principal)
        elif key == "source.namespace":
            value, present, test = peer.namespace, peer.namespace is not None, lambda m: m.matches(peer.namespace)
        else:   # source.serviceAccount
            value, present = f"{peer.namespace}/{peer.service_account}", peer.service_account is not None
            test = lambda m: m.matches(peer.namespace, peer.service_account)   # noqa: E731
        why = _field(self.values, self.not_values, value, present, key, "values", "notValues", test)
        return f"when {key}: {why}" if why else None


@dataclass(frozen=True)
class Rule:
    """One enforceable rule; ``sources``/``operations`` None: ``from``/``to`` absent."""
    index: int
    sources: tuple[Source, ...] | None = None
    operations: tuple[Operation, ...] | None = None
    conditions: tuple[Condition, ...] = ()

    def mismatch(self, peer: Peer) -> str | None:
        if self.sources is not None:
            whys = [s.mismatch(peer) for s in self.sources]
            if all(whys):
                return "; ".join(f"from[{i}]: {w}" for i, w in enumerate(whys))
        if self.operations is not None:
            whys = [o.mismatch(peer) for o in self.operations]
            if all(whys):
                return "; ".join(f"to[{i}]: {w}" for i, w in enumerate(whys))
        for condition in self.conditions:
            why = condition.mismatch(peer)
            if why:
                return why
        return None


def _in(ip: IPAddress, network: IPNetwork) -> bool:
    return ip.version == network.version and ip in network


# -- scope ------------------------------------------------------------------------

@dataclass(frozen=True)
class Scope:
    """Which workloads a policy applies to.

    ``labels`` None: no selector (the whole namespace; the whole mesh from
    the root namespace). A selector in the root namespace matches workloads
    in every namespace (Istio's documented rule). ``waypoint``: the policy
    names ``targetRef(s)`` and is for a waypoint, never for the node agent.
    """
    namespace: str
    labels: Mapping[str, str] | None = None
    root: bool = False
    waypoint: bool = False

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.waypoint:
            return False
        if not self.root and namespace != self.namespace:
            return False
        return self.labels is None or all(labels.get(k) == v for k, v in self.labels.items())

    def describe(self) -> str:
        if self.waypoint:
            return "waypoint (targetRefs)"
        where = "every namespace" if self.root else f"namespace {self.namespace}"
        if self.labels is None:
            return "the whole mesh" if self.root else where
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.labels.items())) or "<any>"
        return f"selector {labels} in {where}"


# -- policies -----------------------------------------------------------------------

@dataclass(frozen=True)
class AuthorizationPolicy:
    """One policy, ready to evaluate.

    ``broken``: the object was rejected (the reason); it is kept with its
    fail-closed meaning: a broken ALLOW allows nothing but still counts as
    an ALLOW policy for the workloads it selects; a broken DENY, CUSTOM or
    policy of unknown action denies every connection to them; a broken
    AUDIT does nothing. ``ignored``: (rule index, why) for ALLOW rules
    dropped because they need L7 attributes.
    """
    namespace: str
    name: str
    action: str                     # ALLOW, DENY, AUDIT, CUSTOM or "UNKNOWN" (broken only)
    scope: Scope
    rules: tuple[Rule, ...] = ()
    provider: str | None = None
    broken: str | None = None
    ignored: tuple[tuple[int, str], ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def denies_all(self) -> bool:
        """A broken policy whose fail-closed meaning is "deny everything it selects"."""
        return self.broken is not None and self.action in (DENY, CUSTOM, "UNKNOWN")

    def match(self, peer: Peer) -> tuple[bool, int | None, list[str]]:
        """(matched, index of the first matching rule, why each rule did not match)."""
        if self.broken is not None:
            if self.denies_all:
                return True, None, []
            return False, None, [f"rejected ({self.broken}): matches nothing"]
        whys = [f"rule {i}: ignored ({why})" for i, why in self.ignored]
        for rule in self.rules:
            why = rule.mismatch(peer)
            if why is None:
                return True, rule.index, whys
            whys.append(f"rule {rule.index}: {why}")
        if not self.rules and not self.ignored:
            whys.append("no rules: matches nothing")
        return False, None, sorted(whys, key=_rule_order)


def _rule_order(line: str) -> int:
    try:
        return int(line.split(":", 1)[0].split()[1])
    except (IndexError, ValueError):
        return -1


@dataclass(frozen=True)
class PeerAuthentication:
    """One PeerAuthentication; ``level``: "mesh", "namespace", "workload" or "ignored".

    A broken (rejected) one is kept as STRICT at its level, without
    port-level settings: the stricter reading of an object nobody can read.
    """
    namespace: str
    name: str
    level: str
    mode: str = UNSET
    labels: Mapping[str, str] | None = None
    port_modes: Mapping[int, str] = field(default_factory=dict)
    created: str | None = None       # creationTimestamp; the oldest wins a tie
    broken: str | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def selects(self, namespace: str, labels: Mapping[str, str]) -> bool:
        if self.level == "mesh":
            return True
        if self.level == "namespace":
            return namespace == self.namespace
        if self.level == "workload":
            return namespace == self.namespace and all(labels.get(k) == v for k, v in (self.labels or {}).items())
        return False
