"""Reading ``security.istio.io`` AuthorizationPolicy and PeerAuthentication objects.

Pure. Each object is read on its own: a bad one is rejected with every
problem found (``Rejection``) and never affects the others. Validation
follows Istio's own (istiod's webhook and the CRD schema) where it has a
rule, plus the checks a policy engine needs to be sure it reads the object
as its author meant:

* unknown fields are rejected (Kubernetes would prune them silently, which
  for ``rule:`` instead of ``rules:`` turns a policy into allow-nothing);
* wrong types are rejected (``ports: [8080]``: Istio's schema wants strings);
* string values with a ``*`` anywhere but the whole value, its start or its
  end are rejected (Istio would read them as exact strings that never
  match); principals written with ``spiffe://`` are rejected (Istio
  compares without it, so they could never match).

A rejected object keeps a fail-closed meaning (see ``AuthorizationPolicy``
and ``PeerAuthentication`` in ``model``): its action and scope are read as
far as they can be; a selector that cannot be read selects every workload
of the namespace (of the mesh, from the root namespace).

L7-only attributes (hosts, methods, paths, request principals, remote IP
blocks, ``when`` keys other than source/destination IP, port, namespace,
principal, service account) cannot be seen by a node agent. As ztunnel does:
an ALLOW rule using any of them is dropped (the policy allows less); DENY,
AUDIT and CUSTOM rules are kept without them (they match more, and a
``from``/``to`` entry left empty matches any connection). Both are reported
per rule.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass

from agent.policy.model import (
    ACTIONS,
    ALLOW,
    AUDIT,
    AUTHORIZATION_POLICY,
    CUSTOM,
    DENY,
    DISABLE,
    L4_CONDITION_KEYS,
    MTLS_MODES,
    PEER_AUTHENTICATION,
    PERMISSIVE,
    STRICT,
    UNSET,
    AuthorizationPolicy,
    Condition,
    Operation,
    PeerAuthentication,
    Rejection,
    Rule,
    Scope,
    ServiceAccountMatch,
    Source,
    StringMatch,
)
from agent.state.model import api_group_of

GROUP = "security.istio.io"
VERSIONS = ("v1", "v1beta1")
KINDS = (AUTHORIZATION_POLICY, PEER_AUTHENTICATION)
DEFAULT_NAMESPACE = "default"
CLUSTER_LOCAL = "cluster.local"

_SPEC_FIELDS = ("selector", "targetRef", "targetRefs", "rules", "action", "provider")
_RULE_FIELDS = ("from", "to", "when")
_CONDITION_FIELDS = ("key", "values", "notValues")
_TARGET_REF_FIELDS = ("group", "kind", "name", "namespace")
_PA_SPEC_FIELDS = ("selector", "mtls", "portLevelMtls")

# `when` keys Istio accepts that only a proxy reading the request can evaluate.
_L7_CONDITION_EXACT = ("remote.ip", "request.auth.principal", "request.auth.audiences",
                       "request.auth.presenter", "connection.sni")
_L7_CONDITION_MAPS = ("request.headers", "request.experimental.inline.headers", "request.auth.claims")
_MAP_KEY = re.compile(r"[^\[\]]+\[[^\[\]]+\]")
_PORT = re.compile(r"[0-9]+")
_PREFIX_LEN = re.compile(r"[0-9]{1,3}")
_MAX_SERVICE_ACCOUNTS = 16


def _describe(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, str):
        return f"a string ({value!r})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a map"
    return type(value).__name__


class _Problems:
    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(f"{path}: {message}" if path else message)

    def __bool__(self) -> bool:
        return bool(self.items)

    def text(self) -> str:
        return "; ".join(self.items)

    def mapping(self, value, path: str, allowed: tuple[str, ...]) -> dict | None:
        """``value`` as a map with only ``allowed`` keys (None when absent or not a map)."""
        if value is None:
            return None
        if not isinstance(value, dict):
            self.add(path, f"must be a map, not {_describe(value)}")
            return None
        for key in value:
            if key not in allowed:
                self.add(f"{path}.{key}" if path else str(key), "unknown field")
        return value

    def strings(self, value, path: str, example: str = "") -> list[str]:
        """A list of non-empty strings; problems recorded, bad entries dropped."""
        if value is None:
            return []
        if not isinstance(value, list):
            self.add(path, f"must be a list of strings, not {_describe(value)}")
            return []
        out = []
        for i, item in enumerate(value):
            if isinstance(item, str) and item:
                out.append(item)
            elif item == "":
                self.add(f"{path}[{i}]", "empty value not allowed")
            else:
                hint = f" (write {example.format(item)})" if example and isinstance(item, int) \
                    and not isinstance(item, bool) else ""
                self.add(f"{path}[{i}]", f"must be a string, not {_describe(item)}{hint}")
        return out


# -- values ---------------------------------------------------------------------

def _string_match(text: str, path: str, problems: _Problems, principal: bool = False) -> StringMatch | None:
    if text != text.strip() or any(c.isspace() for c in text):
        problems.add(path, f"{text!r} contains whitespace")
        return None
    if principal and text.lower().startswith("spiffe://"):
        problems.add(path, f"malformed principal {text!r}: principals are written without 'spiffe://' "
                           f"(e.g. {CLUSTER_LOCAL}/ns/NAMESPACE/sa/SERVICE_ACCOUNT)")
        return None
    if text == "*":
        return StringMatch("presence", "", text)
    stars = text.count("*")
    if stars == 0:
        return StringMatch("exact", text, text)
    if stars == 1 and text.startswith("*"):
        return StringMatch("suffix", text[1:], text)
    if stars == 1 and text.endswith("*"):
        return StringMatch("prefix", text[:-1], text)
    what = "malformed principal" if principal else "bad value"
    problems.add(path, f"{what} {text!r}: '*' may only be the whole value, its first or its last character")
    return None


def _principal(text: str, path: str, problems: _Problems, trust_domain: str) -> StringMatch | None:
    match = _string_match(text, path, problems, principal=True)
    # Istio reads the trust domain "cluster.local" in a principal as "this
    # mesh's trust domain" (pilot's trust domain bundle does the rewrite).
    if match is not None and trust_domain != CLUSTER_LOCAL and match.kind in ("exact", "prefix") \
            and match.value.startswith(CLUSTER_LOCAL + "/"):
        value = trust_domain + match.value[len(CLUSTER_LOCAL):]
        match = StringMatch(match.kind, value, match.text)
    return match


def _network(text: str, path: str, problems: _Problems):
    """A CIDR range or a plain address (a /32 or /128), as Istio reads ipBlocks."""
    address, slash, length = text.partition("/")
    kind = "bad CIDR range" if slash else "bad IP address"
    try:
        if "%" in address:
            raise ValueError("zones are not allowed")
        ip = ipaddress.ip_address(address)
    except ValueError as exc:
        reason = str(exc) if "zones" in str(exc) else f"{address!r} is not an IPv4 or IPv6 address"
        problems.add(path, f"{kind} {text!r}: {reason}")
        return None
    if not slash:
        return ipaddress.ip_network(ip)
    if not _PREFIX_LEN.fullmatch(length) or int(length) > ip.max_prefixlen:
        problems.add(path, f"{kind} {text!r}: the prefix length must be a number from 0 to {ip.max_prefixlen}")
        return None
    return ipaddress.ip_network(f"{ip}/{int(length)}", strict=False)


def _port(text: str, path: str, problems: _Problems) -> int | None:
    if not _PORT.fullmatch(text) or int(text) > 65535:
        problems.add(path, f"bad port {text!r}: a number from 0 to 65535")
        return None
    return int(text)


def _service_accounts(values: list[str], path: str, problems: _Problems, namespace: str):
    if len(values) > _MAX_SERVICE_ACCOUNTS:
        problems.add(path, f"may not have more than {_MAX_SERVICE_ACCOUNTS} values")
    out = []
    for i, text in enumerate(values):
        where = f"{path}[{i}]"
        if "*" in text:
            problems.add(where, f"wildcard not allowed in {text!r}")
        elif text.count("/") > 1 or len(text) > 320 or any(c.isspace() for c in text):
            problems.add(where, f"expected 'serviceAccount' or 'namespace/serviceAccount', found {text!r}")
        else:
            ns, slash, sa = text.rpartition("/")
            if slash and (not ns or not sa):
                problems.add(where, f"expected 'serviceAccount' or 'namespace/serviceAccount', found {text!r}")
            else:
                # Istio: a bare name is a service account of the policy's namespace.
                out.append(ServiceAccountMatch(ns if slash else namespace, sa))
    return tuple(out)


def _each(values, convert):
    return tuple(v for v in (convert(text, i) for i, text in enumerate(values)) if v is not None)


# -- rule clauses: `from` sources and `to` operations, one table each ------------

# (reader, the field's strings, the field's path) -> the model's tuple of matches
_Convert = Callable[["_PolicyReader", list[str], str], tuple]


def _per_value(convert: Callable[[_PolicyReader, str, str], object]) -> _Convert:
    """A field converter from ``convert(reader, text, path)`` for one value; bad values are dropped."""
    return lambda reader, values, path: _each(values, lambda text, n: convert(reader, text, f"{path}[{n}]"))


_principals = _per_value(lambda r, text, path: _principal(text, path, r.problems, r.trust_domain))
_matches = _per_value(lambda r, text, path: _string_match(text, path, r.problems))
_networks = _per_value(lambda r, text, path: _network(text, path, r.problems))
_ports = _per_value(lambda r, text, path: _port(text, path, r.problems))


def _accounts(reader: _PolicyReader, values: list[str], path: str) -> tuple:
    return _service_accounts(values, path, reader.problems, reader.namespace)


@dataclass(frozen=True)
class _Field:
    """One key of a ``source`` or ``operation``.

    ``attr`` is the model field it fills; L7 keys have none (a node agent
    cannot see them: the rule reports them) and ``convert`` only validates.
    ``example`` says how a number should be written, for the type error."""
    key: str
    attr: str | None
    convert: _Convert | None = None
    example: str = ""


@dataclass(frozen=True)
class _Clause:
    list_key: str                     # `from` or `to` in the rule
    entry_key: str                    # `source` or `operation` in each entry
    fields: tuple[_Field, ...]        # in the order their problems are reported
    build: Callable[..., object]      # the model type, called with each L4 field's attr
    conflict: Callable[[dict[str, list[str]]], str] = lambda values: ""


def _source_conflict(values: dict[str, list[str]]) -> str:
    if (values["serviceAccounts"] or values["notServiceAccounts"]) and (
            values["principals"] or values["notPrincipals"] or values["namespaces"] or values["notNamespaces"]):
        return "cannot set serviceAccounts with namespaces or principals"
    return ""


_SOURCE = _Clause("from", "source", (
    _Field("principals", "principals", _principals),
    _Field("notPrincipals", "not_principals", _principals),
    _Field("namespaces", "namespaces", _matches),
    _Field("notNamespaces", "not_namespaces", _matches),
    _Field("serviceAccounts", "service_accounts", _accounts),
    _Field("notServiceAccounts", "not_service_accounts", _accounts),
    _Field("ipBlocks", "ip_blocks", _networks),
    _Field("notIpBlocks", "not_ip_blocks", _networks),
    _Field("requestPrincipals", None),
    _Field("notRequestPrincipals", None),
    _Field("remoteIpBlocks", None, _networks),
    _Field("notRemoteIpBlocks", None, _networks),
), Source, _source_conflict)

_OPERATION = _Clause("to", "operation", (
    _Field("ports", "ports", _ports, example='"{}"'),
    _Field("notPorts", "not_ports", _ports, example='"{}"'),
    _Field("hosts", None),
    _Field("notHosts", None),
    _Field("methods", None),
    _Field("notMethods", None),
    _Field("paths", None),
    _Field("notPaths", None),
), Operation)


# -- AuthorizationPolicy ----------------------------------------------------------

class _PolicyReader:
    def __init__(self, obj: dict, namespace: str, name: str, root_namespace: str, trust_domain: str) -> None:
        self.obj = obj
        self.namespace = namespace
        self.name = name
        self.root = namespace == root_namespace
        self.trust_domain: str = trust_domain
        self.problems: _Problems = _Problems()
        self.reports: list[str] = []
        self.key = f"{AUTHORIZATION_POLICY} {namespace}/{name}"

    def read(self) -> tuple[AuthorizationPolicy, Rejection | None, list[str]]:
        p = self.problems
        _check_version(self.obj, p)
        spec = self.obj.get("spec")
        if spec is None:
            spec = {}
        spec = p.mapping(spec, "spec", _SPEC_FIELDS)
        if spec is None:
            spec = {}
            action = "UNKNOWN"
        else:
            action = self._action(spec)
        scope = self._scope(spec)
        provider = self._provider(spec, action)
        rules, ignored = self._rules(spec, action)

        if p:
            reason = p.text()
            self.reports = []          # rule-level notes mean nothing for a rejected policy
            policy = AuthorizationPolicy(self.namespace, self.name, action, scope, (), provider, broken=reason)
            if not scope.waypoint:
                self.reports.append(f"{self.key}: rejected; {_fail_closed_effect(action, scope)}")
            return policy, Rejection(AUTHORIZATION_POLICY, self.namespace, self.name, reason), self.reports
        if scope.waypoint:
            self.reports.append(f"{self.key}: targets {self._targets(spec)} (a waypoint policy): not enforced "
                                "by the node agent")
        elif action == CUSTOM:
            effect = (f"connections its rules match are denied (fail closed) for {scope.describe()}" if rules
                      else "it has no enforceable rules, so it never applies")
            self.reports.append(f"{self.key}: CUSTOM action (provider {provider!r}) cannot be enforced by a "
                                f"node agent: {effect}")
        policy = AuthorizationPolicy(self.namespace, self.name, action, scope, rules, provider, ignored=ignored)
        return policy, None, self.reports

    # -- parts --

    def _action(self, spec: dict) -> str:
        action = spec.get("action")
        if action is None:
            return ALLOW                   # Istio's default
        if isinstance(action, str) and action in ACTIONS:
            return action
        self.problems.add("spec.action", f"unknown action {_describe(action)}; expected one of "
                                         f"{', '.join(ACTIONS)}")
        return "UNKNOWN"

    def _scope(self, spec: dict) -> Scope:
        p = self.problems
        has_selector = spec.get("selector") is not None
        has_ref = spec.get("targetRef") is not None
        has_refs = spec.get("targetRefs") not in (None, [])      # Istio: an empty list is no target
        if has_ref and has_refs:
            p.add("spec", "only one of targetRef or targetRefs can be set")
        if has_selector and (has_ref or has_refs):
            p.add("spec", "only one of targetRefs or selector can be set")
        if has_ref:
            self._target_ref(spec["targetRef"], "spec.targetRef")
        if has_refs:
            refs = spec["targetRefs"]
            if not isinstance(refs, list):
                p.add("spec.targetRefs", f"must be a list, not {_describe(refs)}")
            else:
                if len(refs) > 16:
                    p.add("spec.targetRefs", "may not have more than 16 entries")
                for i, ref in enumerate(refs):
                    self._target_ref(ref, f"spec.targetRefs[{i}]")
        if has_selector:
            labels = _selector(spec["selector"], "spec.selector", p)
            # A selector that cannot be read selects the whole namespace: the
            # broader scope is the stricter reading of a rejected policy.
            return Scope(self.namespace, labels, root=self.root)
        if has_ref or has_refs:
            return Scope(self.namespace, None, root=self.root, waypoint=True)
        return Scope(self.namespace, None, root=self.root)

    def _target_ref(self, ref, path: str) -> None:
        ref = self.problems.mapping(ref, path, _TARGET_REF_FIELDS)
        if ref is None:
            return
        for key in ("kind", "name"):
            if not isinstance(ref.get(key), str) or not ref.get(key):
                self.problems.add(f"{path}.{key}", "required (a non-empty string)")

    def _targets(self, spec: dict) -> str:
        refs = spec.get("targetRefs") or [spec.get("targetRef")]
        return ", ".join(f"{r.get('kind')}/{r.get('name')}" for r in refs if isinstance(r, dict))

    def _provider(self, spec: dict, action: str) -> str | None:
        provider = spec.get("provider")
        if provider is None:
            if action == CUSTOM:
                self.problems.add("spec.provider", "a CUSTOM policy needs provider.name")
            return None
        provider = self.problems.mapping(provider, "spec.provider", ("name",))
        if action not in (CUSTOM, "UNKNOWN"):
            self.problems.add("spec.provider", f"only allowed with the CUSTOM action, not {action}")
        if provider is None:
            return None
        name = provider.get("name")
        if not isinstance(name, str) or not name:
            self.problems.add("spec.provider.name", "required (a non-empty string)")
            return None
        return name

    def _rules(self, spec: dict, action: str) -> tuple[tuple[Rule, ...], tuple[tuple[int, str], ...]]:
        p = self.problems
        rules = spec.get("rules")
        if rules is None or rules == []:
            if action == DENY:
                p.add("spec.rules", "a DENY policy without rules is meaningless (it never matches); "
                                    "add an empty rule {} to deny every connection")
            return (), ()
        if not isinstance(rules, list):
            p.add("spec.rules", f"must be a list, not {_describe(rules)}")
            return (), ()
        out: list[Rule] = []
        ignored: list[tuple[int, str]] = []
        for index, raw in enumerate(rules):
            path = f"spec.rules[{index}]"
            if raw is None:
                p.add(path, "a rule must not be null (write {} for a rule that matches everything)")
                continue
            raw = p.mapping(raw, path, _RULE_FIELDS)
            if raw is None:
                continue
            l7: list[str] = []
            sources = self._clauses(_SOURCE, raw, path, l7)
            operations = self._clauses(_OPERATION, raw, path, l7)
            conditions = self._conditions(raw, path, l7)
            if l7:
                names = ", ".join(dict.fromkeys(l7))
                if action == ALLOW:
                    why = f"HTTP attributes ({names}) cannot be checked at L4"
                    ignored.append((index, why))
                    self.reports.append(
                        f"{self.key} rule {index}: {why} by the node agent: the ALLOW rule is ignored "
                        "(stricter: it allows nothing; use a waypoint for HTTP rules)")
                    continue
                verb = {DENY: "denies", AUDIT: "audits", CUSTOM: "denies"}.get(action, "matches")
                self.reports.append(
                    f"{self.key} rule {index}: HTTP attributes ({names}) cannot be checked at L4 by the node "
                    f"agent: the {action} rule is enforced without them (broader: it {verb} more connections)")
            out.append(Rule(index, sources, operations, conditions))
        return tuple(out), tuple(ignored)

    def _list(self, raw: dict, key: str, path: str) -> list | None:
        value = raw.get(key)
        if value is None:
            return None
        if not isinstance(value, list):
            self.problems.add(f"{path}.{key}", f"must be a list, not {_describe(value)}")
            return None
        if not value and key != "when":
            self.problems.add(f"{path}.{key}", f"`{key}` must not be empty (leave it out to match any)")
            return None
        return value

    def _clauses(self, clause: _Clause, raw: dict, path: str, l7: list[str]) -> tuple | None:
        """The rule's ``from`` (or ``to``) list read as ``clause`` says; L7 keys used go into ``l7``."""
        entries = self._list(raw, clause.list_key, path)
        if entries is None:
            return None
        p = self.problems
        keys = tuple(f.key for f in clause.fields)
        out = []
        for i, entry in enumerate(entries):
            where = f"{path}.{clause.list_key}[{i}]"
            if entry is None:
                p.add(where, f"`{clause.list_key}` entries must not be null")
                continue
            entry = p.mapping(entry, where, (clause.entry_key,))
            if entry is None:
                continue
            body = entry.get(clause.entry_key)
            where = f"{where}.{clause.entry_key}"
            if body is None:
                p.add(where, "required")
                continue
            body = p.mapping(body, where, keys)
            if body is None:
                continue
            values = {f.key: p.strings(body.get(f.key), f"{where}.{f.key}", f.example) for f in clause.fields}
            if not any(body.get(k) for k in body):
                p.add(where, f"`{clause.entry_key}` must not be empty")
            conflict = clause.conflict(values)
            if conflict:
                p.add(where, conflict)
            for f in clause.fields:
                if f.attr is None and f.convert is not None:     # validated like Istio, never used
                    f.convert(self, values[f.key], f"{where}.{f.key}")
            l7.extend(f.key for f in clause.fields if f.attr is None and values[f.key])
            out.append(clause.build(**{f.attr: f.convert(self, values[f.key], f"{where}.{f.key}")
                                       for f in clause.fields if f.attr is not None and f.convert is not None}))
        return tuple(out)

    def _conditions(self, raw: dict, path: str, l7: list[str]) -> tuple[Condition, ...]:
        entries = self._list(raw, "when", path) or []
        p = self.problems
        out = []
        for i, entry in enumerate(entries):
            where = f"{path}.when[{i}]"
            if entry is None:
                p.add(where, "a condition must not be null")
                continue
            entry = p.mapping(entry, where, _CONDITION_FIELDS)
            if entry is None:
                continue
            key = entry.get("key")
            if not isinstance(key, str) or not key:
                p.add(f"{where}.key", f"required (a non-empty string), not {_describe(key)}")
                continue
            values = p.strings(entry.get("values"), f"{where}.values", '"{}"')
            not_values = p.strings(entry.get("notValues"), f"{where}.notValues", '"{}"')
            if not entry.get("values") and not entry.get("notValues"):
                p.add(where, f"at least one of `values` or `notValues` must be set for key {key}")
            problem = _condition_key_problem(key)
            if problem:
                p.add(f"{where}.key", problem)
                continue
            if key not in L4_CONDITION_KEYS:
                if key == "remote.ip":
                    for field_name, vals in (("values", values), ("notValues", not_values)):
                        _each(vals, lambda t, n, f=field_name, w=where: _network(t, f"{w}.{f}[{n}]", p))
                l7.append(key)
                continue
            out.append(Condition(key, self._condition_values(key, values, f"{where}.values"),
                                 self._condition_values(key, not_values, f"{where}.notValues")))
        return tuple(out)

    def _condition_values(self, key: str, values: list[str], path: str) -> tuple:
        p = self.problems
        if key in ("source.ip", "destination.ip"):
            return _each(values, lambda t, n: _network(t, f"{path}[{n}]", p))
        if key == "destination.port":
            return _each(values, lambda t, n: _port(t, f"{path}[{n}]", p))
        if key == "source.principal":
            return _each(values, lambda t, n: _principal(t, f"{path}[{n}]", p, self.trust_domain))
        if key == "source.serviceAccount":
            return _service_accounts(values, path, p, self.namespace)
        return _each(values, lambda t, n: _string_match(t, f"{path}[{n}]", p))


def _condition_key_problem(key: str) -> str:
    """Why Istio refuses ``key`` as a condition, or "" when it accepts it."""
    if key in L4_CONDITION_KEYS or key in _L7_CONDITION_EXACT:
        return ""
    for prefix in _L7_CONDITION_MAPS + ("experimental.envoy.filters.",):
        if key.startswith(prefix):
            return "" if _MAP_KEY.fullmatch(key) else f"bad key {key!r}: should have the form {prefix}[name]"
    if key == "destination.namespace":
        return f"attribute {key} is replaced by metadata.namespace"
    if key.startswith("destination.labels"):
        return f"attribute {key} is replaced by the workload selector"
    if key in ("destination.name", "destination.user"):
        return f"deprecated attribute {key}: only supported in v1alpha1"
    return f"unknown attribute {key!r}"


def _fail_closed_effect(action: str, scope: Scope) -> str:
    where = scope.describe()
    if action == ALLOW:
        return f"it counts as an ALLOW policy that allows nothing for {where} (fail closed)"
    if action == AUDIT:
        return "an AUDIT policy never changes a decision: no effect"
    what = {DENY: "a DENY", CUSTOM: "a CUSTOM"}.get(action, "its action cannot be read, so it")
    return f"{what} policy that denies every connection to {where} (fail closed)"


def _selector(value, path: str, problems: _Problems) -> dict | None:
    """The selector's labels; None (the whole namespace) if it cannot be read."""
    selector = problems.mapping(value, path, ("matchLabels",))
    if selector is None:
        return None
    labels = selector.get("matchLabels")
    if labels is None:
        return {}
    if not isinstance(labels, dict):
        problems.add(f"{path}.matchLabels", f"must be a map of strings, not {_describe(labels)}")
        return None
    ok = True
    for key, val in labels.items():
        if not isinstance(key, str) or not key:
            problems.add(f"{path}.matchLabels", f"label keys must be non-empty strings, not {_describe(key)}")
            ok = False
        elif not isinstance(val, str):
            problems.add(f"{path}.matchLabels.{key}", f"must be a string, not {_describe(val)}")
            ok = False
        elif "*" in key or "*" in val:
            problems.add(f"{path}.matchLabels.{key}", "wildcards are not supported in selectors")
            ok = False
    return dict(labels) if ok else None


def _check_version(obj: dict, problems: _Problems) -> None:
    version = obj.get("apiVersion")
    if not isinstance(version, str) or version.rpartition("/")[2] not in VERSIONS:
        problems.add("apiVersion", f"unsupported apiVersion {_describe(version)}; expected "
                                   f"{', '.join(GROUP + '/' + v for v in VERSIONS)}")


def namespace_and_name(obj: dict) -> tuple[str, str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    namespace = meta.get("namespace")
    if not isinstance(namespace, str) or not namespace:
        namespace = DEFAULT_NAMESPACE
    name = meta.get("name")
    if not isinstance(name, str):
        name = "<unnamed>"
    return namespace, name


def parse_authorization_policy(obj: dict, root_namespace: str = "istio-system",
                               trust_domain: str = CLUSTER_LOCAL
                               ) -> tuple[AuthorizationPolicy, Rejection | None, list[str]]:
    """(the policy, its rejection if any, report lines). A rejected policy comes back ``broken``."""
    namespace, name = namespace_and_name(obj)
    return _PolicyReader(obj, namespace, name, root_namespace, trust_domain).read()


# -- PeerAuthentication -----------------------------------------------------------

def _mode(value, path: str, problems: _Problems) -> str:
    mtls = problems.mapping(value, path, ("mode",))
    if mtls is None:
        return UNSET
    mode = mtls.get("mode")
    if mode is None:
        return UNSET
    if isinstance(mode, str) and mode in MTLS_MODES:
        return mode
    problems.add(f"{path}.mode", f"unknown mTLS mode {_describe(mode)}; expected one of {', '.join(MTLS_MODES)}")
    return STRICT


def parse_peer_authentication(obj: dict, root_namespace: str = "istio-system"
                              ) -> tuple[PeerAuthentication, Rejection | None, list[str]]:
    """(the policy, its rejection if any, report lines). A rejected one comes back ``broken``, as STRICT."""
    namespace, name = namespace_and_name(obj)
    key = f"{PEER_AUTHENTICATION} {namespace}/{name}"
    p = _Problems()
    reports: list[str] = []
    _check_version(obj, p)
    spec = obj.get("spec")
    spec = p.mapping({} if spec is None else spec, "spec", _PA_SPEC_FIELDS) or {}
    labels = _selector(spec["selector"], "spec.selector", p) if spec.get("selector") is not None else {}
    unreadable_selector = spec.get("selector") is not None and labels is None
    mode = _mode(spec.get("mtls"), "spec.mtls", p)

    port_modes: dict[int, str] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None:
        if not isinstance(raw_ports, dict):
            p.add("spec.portLevelMtls", f"must be a map of port to mtls settings, not {_describe(raw_ports)}")
        elif not raw_ports:
            p.add("spec.portLevelMtls", "port level mTLS, if defined, must have at least one element")
        else:
            if not labels and not unreadable_selector:
                p.add("spec.portLevelMtls", "mesh/namespace peer authentication cannot have port level mTLS "
                                            "(portLevelMtls needs a workload selector)")
            for port, setting in raw_ports.items():
                number = port if isinstance(port, int) and not isinstance(port, bool) else (
                    int(port) if isinstance(port, str) and _PORT.fullmatch(port) else None)
                if number is None or not 1 <= number <= 65535:
                    p.add(f"spec.portLevelMtls.{port}", "port must be a number in 1..65535")
                    continue
                port_modes[number] = _mode(setting, f"spec.portLevelMtls.{port}", p)

    if unreadable_selector:
        labels = {}     # the stricter reading: every workload of the namespace
    if namespace == root_namespace:
        level = "workload-in-root" if labels else "mesh"
    else:
        level = "workload" if labels or unreadable_selector else "namespace"
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    created = meta.get("creationTimestamp") if isinstance(meta.get("creationTimestamp"), str) else None

    if level == "workload-in-root":
        reports.append(f"{key}: a PeerAuthentication with a selector in the root namespace {root_namespace} "
                       "is ignored in ambient mode (mesh-wide policies take no selector)")
        level = "ignored"
    if p:
        reason = p.text()
        if level != "ignored":
            reports.append(f"{key}: rejected; read as STRICT for its {level} scope (fail closed)")
        return (PeerAuthentication(namespace, name, level, STRICT, labels, {}, created, broken=reason),
                Rejection(PEER_AUTHENTICATION, namespace, name, reason), reports)
    if mode == DISABLE or DISABLE in port_modes.values():
        reports.append(f"{key}: mTLS mode DISABLE is treated as PERMISSIVE (the node agent accepts both "
                       "plaintext and mTLS; it cannot turn mTLS off)")
    return PeerAuthentication(namespace, name, level, mode, labels, port_modes, created), None, reports


def effective_mode(mode: str) -> str:
    """The mode a node agent enforces: DISABLE behaves as PERMISSIVE."""
    return PERMISSIVE if mode == DISABLE else mode


def is_security_object(obj: dict) -> bool:
    """An AuthorizationPolicy or PeerAuthentication of the ``security.istio.io`` group."""
    return obj.get("kind") in KINDS and api_group_of(obj) == GROUP
