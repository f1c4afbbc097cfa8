"""Reading AuthorizationPolicy and PeerAuthentication objects: what is rejected, and why."""

from __future__ import annotations

import pytest

from agent.policy.engine import PolicySet
from agent.policy.model import Rejection, StringMatch
from agent.policy.parse import parse_authorization_policy, parse_peer_authentication


def ap(spec, name="p", ns="backend", version="security.istio.io/v1"):
    meta = {"name": name}
    if ns is not None:
        meta["namespace"] = ns
    return {"apiVersion": version, "kind": "AuthorizationPolicy", "metadata": meta, "spec": spec}


def pa(spec, name="p", ns="backend"):
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def rule_from(**source):
    return {"rules": [{"from": [{"source": source}]}]}


def rule_to(**operation):
    return {"rules": [{"to": [{"operation": operation}]}]}


def rule_when(**condition):
    return {"rules": [{"when": [condition]}]}


BAD_AUTHORIZATION = [
    ("bad CIDR", rule_from(ipBlocks=["198.18.0.0/33"]),
     "spec.rules[0].from[0].source.ipBlocks[0]: bad CIDR range '198.18.0.0/33'"),
    ("netmask CIDR", rule_from(ipBlocks=["198.18.0.0/255.255.0.0"]), "bad CIDR range"),
    ("bad address", rule_from(notIpBlocks=["198.18.0.256"]), "notIpBlocks[0]: bad IP address '198.18.0.256'"),
    ("bad IPv6", rule_from(ipBlocks=["fd00:198:18::/129"]), "bad CIDR range 'fd00:198:18::/129'"),
    ("bad remoteIpBlocks", rule_from(remoteIpBlocks=["x"]), "remoteIpBlocks[0]: bad IP address"),
    ("unknown action", {"action": "allow", "rules": [{}]}, "spec.action: unknown action a string ('allow')"),
    ("action of the wrong type", {"action": 1}, "spec.action: unknown action a number (1)"),
    ("principal with spiffe://", rule_from(principals=["spiffe://cluster.local/ns/a/sa/b"]),
     "malformed principal 'spiffe://cluster.local/ns/a/sa/b': principals are written without 'spiffe://'"),
    ("principal with an inner wildcard", rule_from(principals=["cluster.local/*/sa/b"]),
     "malformed principal 'cluster.local/*/sa/b': '*' may only be"),
    ("principal wildcards at both ends", rule_from(notPrincipals=["*foo*"]), "malformed principal '*foo*'"),
    ("principal with whitespace", rule_from(principals=["cluster.local/ns/a/sa/b "]), "contains whitespace"),
    ("empty principal", rule_from(principals=[""]), "principals[0]: empty value not allowed"),
    ("principals not a list", rule_from(principals="cluster.local/ns/a/sa/b"),
     "principals: must be a list of strings, not a string"),
    ("namespace inner wildcard", rule_from(namespaces=["a*b"]), "bad value 'a*b'"),
    ("numeric port", rule_to(ports=[8080]), 'ports[0]: must be a string, not a number (8080) (write "8080")'),
    ("named port", rule_to(ports=["http"]), "ports[0]: bad port 'http'"),
    ("port out of range", rule_to(notPorts=["70000"]), "notPorts[0]: bad port '70000'"),
    ("port range", rule_to(ports=["8000-9000"]), "bad port '8000-9000'"),
    ("empty from", {"rules": [{"from": []}]}, "spec.rules[0].from: `from` must not be empty"),
    ("empty to", {"rules": [{"to": []}]}, "spec.rules[0].to: `to` must not be empty"),
    ("from without source", {"rules": [{"from": [{}]}]}, "from[0].source: required"),
    ("null from entry", {"rules": [{"from": [None]}]}, "`from` entries must not be null"),
    ("empty source", {"rules": [{"from": [{"source": {}}]}]}, "`source` must not be empty"),
    ("empty operation", {"rules": [{"to": [{"operation": {}}]}]}, "`operation` must not be empty"),
    ("rules not a list", {"rules": {"from": []}}, "spec.rules: must be a list, not a map"),
    ("null rule", {"rules": [None]}, "spec.rules[0]: a rule must not be null"),
    ("misspelt rules", {"rule": [{}]}, "spec.rule: unknown field"),
    ("misspelt source field", rule_from(principal=["x"]), "source.principal: unknown field"),
    ("condition without key", rule_when(values=["x"]), "when[0].key: required"),
    ("condition without values", rule_when(key="source.ip"),
     "at least one of `values` or `notValues` must be set for key source.ip"),
    ("unknown condition key", rule_when(key="source.user", values=["x"]), "unknown attribute 'source.user'"),
    ("destination.namespace condition", rule_when(key="destination.namespace", values=["x"]),
     "attribute destination.namespace is replaced by metadata.namespace"),
    ("destination.labels condition", rule_when(key="destination.labels[app]", values=["x"]),
     "replaced by the workload selector"),
    ("bad destination.port value", rule_when(key="destination.port", values=["x"]), "bad port 'x'"),
    ("bad source.ip value", rule_when(key="source.ip", notValues=["198.18.0.0/40"]), "bad CIDR range"),
    ("header condition without a name", rule_when(key="request.headers", values=["x"]),
     "bad key 'request.headers'"),
    ("serviceAccounts with principals", rule_from(serviceAccounts=["a/b"], principals=["x"]),
     "cannot set serviceAccounts with namespaces or principals"),
    ("serviceAccounts wildcard", rule_from(serviceAccounts=["a/*"]), "wildcard not allowed in 'a/*'"),
    ("serviceAccounts too many slashes", rule_from(notServiceAccounts=["a/b/c"]),
     "expected 'serviceAccount' or 'namespace/serviceAccount', found 'a/b/c'"),
    ("serviceAccounts empty namespace", rule_from(serviceAccounts=["/b"]), "found '/b'"),
    ("too many serviceAccounts", rule_from(serviceAccounts=[f"ns/sa{i}" for i in range(17)]),
     "may not have more than 16 values"),
    ("selector labels not a map", {"selector": {"matchLabels": ["app"]}},
     "spec.selector.matchLabels: must be a map of strings, not a list"),
    ("selector label value a number", {"selector": {"matchLabels": {"version": 1}}},
     "spec.selector.matchLabels.version: must be a string, not a number (1)"),
    ("selector wildcard", {"selector": {"matchLabels": {"app": "a*"}}}, "wildcards are not supported"),
    ("selector and targetRefs", {"selector": {"matchLabels": {"app": "a"}},
                                 "targetRefs": [{"kind": "Service", "name": "a"}]},
     "only one of targetRefs or selector can be set"),
    ("targetRef without kind", {"targetRef": {"name": "a"}}, "spec.targetRef.kind: required"),
    ("CUSTOM without provider", {"action": "CUSTOM", "rules": [{}]}, "a CUSTOM policy needs provider.name"),
    ("provider without CUSTOM", {"action": "DENY", "provider": {"name": "x"}, "rules": [{}]},
     "only allowed with the CUSTOM action, not DENY"),
    ("DENY without rules", {"action": "DENY"}, "a DENY policy without rules is meaningless"),
    ("spec not a map", ["rules"], "spec: must be a map, not a list"),
]


@pytest.mark.parametrize("spec, reason", [pytest.param(s, r, id=i) for i, s, r in BAD_AUTHORIZATION])
def test_authorization_policy_rejections(spec, reason):
    policy, rejection, _ = parse_authorization_policy(ap(spec))
    assert rejection is not None, "accepted"
    assert (rejection.kind, rejection.namespace, rejection.name) == ("AuthorizationPolicy", "backend", "p")
    assert reason in rejection.reason
    assert policy.broken == rejection.reason


BAD_PEER_AUTHENTICATION = [
    ("unknown mode", {"mtls": {"mode": "STRIKT"}}, "spec.mtls.mode: unknown mTLS mode a string ('STRIKT')"),
    ("lower-case mode", {"mtls": {"mode": "strict"}}, "unknown mTLS mode"),
    ("mtls not a map", {"mtls": "STRICT"}, "spec.mtls: must be a map, not a string"),
    ("port level without selector", {"mtls": {"mode": "STRICT"}, "portLevelMtls": {"80": {"mode": "PERMISSIVE"}}},
     "mesh/namespace peer authentication cannot have port level mTLS"),
    ("empty port level", {"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {}},
     "must have at least one element"),
    ("port zero", {"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"0": {"mode": "STRICT"}}},
     "spec.portLevelMtls.0: port must be a number in 1..65535"),
    ("named port", {"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"http": {"mode": "STRICT"}}},
     "port must be a number"),
    ("bad port mode", {"selector": {"matchLabels": {"app": "a"}}, "portLevelMtls": {"80": {"mode": "OFF"}}},
     "spec.portLevelMtls.80.mode: unknown mTLS mode"),
    ("unknown field", {"mtls": {"mode": "STRICT"}, "targetRef": {"kind": "Service", "name": "a"}},
     "spec.targetRef: unknown field"),
    ("bad selector", {"selector": {"matchLabels": "app=a"}}, "spec.selector.matchLabels: must be a map"),
]


@pytest.mark.parametrize("spec, reason", [pytest.param(s, r, id=i) for i, s, r in BAD_PEER_AUTHENTICATION])
def test_peer_authentication_rejections(spec, reason):
    policy, rejection, reports = parse_peer_authentication(pa(spec))
    assert rejection is not None, "accepted"
    assert rejection.kind == "PeerAuthentication"
    assert reason in rejection.reason
    assert policy.mode == "STRICT" and policy.broken
    assert any("read as STRICT" in line for line in reports)


# Istio's documented examples, and the forms they take; all accepted.
GOOD = [
    ap({}),
    ap(None),
    ap({"rules": [{}]}),
    ap({"action": "DENY", "rules": [{}]}),
    ap({"selector": {"matchLabels": {"app": "httpbin", "version": "v1"}},
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/sleep"]}},
                            {"source": {"namespaces": ["test"]}}],
                   "to": [{"operation": {"methods": ["GET"], "paths": ["/info*"]}},
                          {"operation": {"methods": ["POST"], "paths": ["/data"]}}],
                   "when": [{"key": "request.auth.claims[iss]", "values": ["https://accounts.google.com"]}]}]}),
    ap({"action": "DENY", "rules": [{"from": [{"source": {"notNamespaces": ["foo"], "notIpBlocks":
                                                          ["198.18.0.0/16", "fd00:198:18::1"]}}]}]}),
    ap({"action": "AUDIT", "rules": [{"to": [{"operation": {"paths": ["/user/profile/*"]}}]}]}),
    ap({"action": "CUSTOM", "provider": {"name": "my-custom-authz"},
        "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]}),
    ap({"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
        "rules": [{}]}),
    ap({"rules": [{"from": [{"source": {"serviceAccounts": ["frontend/website", "api"]}}],
                   "to": [{"operation": {"ports": ["8080"], "notPorts": ["9090"]}}],
                   "when": [{"key": "destination.port", "values": ["8080"]},
                            {"key": "source.serviceAccount", "notValues": ["x/y"]},
                            {"key": "remote.ip", "values": ["198.18.0.1"]},
                            {"key": "experimental.envoy.filters.a.b[c]", "values": ["d"]}]}]}),
    ap({"rules": [{}]}, version="security.istio.io/v1beta1"),
    pa({"mtls": {"mode": "STRICT"}}),
    pa({}),
    pa({"selector": {"matchLabels": {"app": "a"}}, "mtls": {"mode": "UNSET"},
        "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}, 9090: {"mode": "STRICT"}}}),
]


def test_documented_forms_are_accepted():
    policies = PolicySet.from_objects(GOOD)
    assert policies.rejections == []


def test_every_problem_of_an_object_is_reported_once():
    _, rejection, _ = parse_authorization_policy(ap({
        "action": "DENY",
        "rules": [{"from": [{"source": {"ipBlocks": ["198.18.0.0/33"], "principals": ["spiffe://x"]}}],
                   "to": [{"operation": {"ports": [80]}}], "when": [{"key": "nope", "values": ["x"]}]}]}))
    parts = rejection.reason.split("; ")
    assert len(parts) == 4, parts
    for words in ("ipBlocks[0]: bad CIDR range", "principals[0]: malformed principal",
                  "ports[0]: must be a string", "when[0].key: unknown attribute 'nope'"):
        assert sum(words in part for part in parts) == 1, (words, parts)


def test_a_bad_object_never_stops_the_others():
    objects = [ap({"rules": [{"from": []}]}, name="bad"), ap({"rules": [{}]}, name="good"),
               pa({"mtls": {"mode": "nope"}}, name="badpa"), pa({"mtls": {"mode": "STRICT"}}, name="goodpa", ns="x")]
    policies = PolicySet.from_objects(objects)
    assert [(r.kind, r.name) for r in policies.rejections] == [("AuthorizationPolicy", "bad"),
                                                               ("PeerAuthentication", "badpa")]
    assert {p.name: p.broken is None for p in policies.authorization} == {"bad": False, "good": True}
    assert {p.name: p.mode for p in policies.peer_authentication} == {"badpa": "STRICT", "goodpa": "STRICT"}


@pytest.mark.parametrize("spec, effect", [
    ({"rules": [{"from": []}]}, "counts as an ALLOW policy that allows nothing for namespace backend (fail closed)"),
    ({"action": "DENY", "rules": [{"from": []}]}, "a DENY policy that denies every connection to namespace backend"),
    ({"action": "CUSTOM", "rules": [{}]}, "a CUSTOM policy that denies every connection"),
    ({"action": "AUDIT", "rules": [{"from": []}]}, "never changes a decision: no effect"),
    ({"action": "MAYBE"}, "its action cannot be read, so it policy that denies every connection"),
    ({"selector": {"matchLabels": [1]}, "rules": [{}]}, "allows nothing for namespace backend"),
    ({"selector": {"matchLabels": {"app": "api"}}, "rules": [{"from": []}]},
     "allows nothing for selector app=api in namespace backend"),
])
def test_rejected_policies_report_their_fail_closed_effect(spec, effect):
    policies = PolicySet.from_objects([ap(spec)])
    assert len(policies.rejections) == 1
    assert any(effect in line for line in policies.reports), policies.reports


def test_rejected_root_policy_is_mesh_wide():
    policies = PolicySet.from_objects([ap({"rules": [{"from": []}]}, ns="istio-system")])
    assert any("allows nothing for the whole mesh" in line for line in policies.reports)


def test_rejected_waypoint_policy_has_no_local_effect():
    policies = PolicySet.from_objects([ap({"targetRefs": [{"name": "x"}]})])
    assert "spec.targetRefs[0].kind: required" in policies.rejections[0].reason
    assert policies.reports == []
    assert policies.policies_for("backend", {}) == []


def test_namespace_defaults_and_other_objects():
    objects = [ap({}, ns=None), {"apiVersion": "example.com/v1", "kind": "AuthorizationPolicy",
                                 "metadata": {"name": "foreign", "namespace": "backend"}, "spec": {"x": 1}},
               {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
                "metadata": {"name": "jwt", "namespace": "backend"}, "spec": {}},
               {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}]
    policies = PolicySet.from_objects(objects)
    assert [p.key for p in policies.authorization] == ["default/p"]
    assert policies.rejections == [] and policies.peer_authentication == []


def test_unsupported_api_version():
    _, rejection, _ = parse_authorization_policy(ap({}, version="security.istio.io/v2"))
    assert "unsupported apiVersion a string ('security.istio.io/v2')" in rejection.reason


def test_duplicates_are_reported():
    policies = PolicySet.from_objects([ap({}, name="same"), ap({"rules": [{}]}, name="same")])
    assert len(policies.authorization) == 1 and policies.authorization[0].rules
    assert any("appears twice" in line for line in policies.reports)


@pytest.mark.parametrize("text, kind, value", [
    ("cluster.local/ns/a/sa/b", "exact", "cluster.local/ns/a/sa/b"),
    ("cluster.local/ns/a/*", "prefix", "cluster.local/ns/a/"),
    ("*/sa/b", "suffix", "/sa/b"),
    ("*", "presence", ""),
])
def test_string_match_forms(text, kind, value):
    policy, rejection, _ = parse_authorization_policy(ap(rule_from(principals=[text])))
    assert rejection is None
    match = policy.rules[0].sources[0].principals[0]
    assert match == StringMatch(kind, value, text)


def test_cluster_local_principal_is_the_mesh_trust_domain():
    policy, _, _ = parse_authorization_policy(ap(rule_from(principals=["cluster.local/ns/a/*", "*/sa/b"])),
                                              trust_domain="example.org")
    exact, suffix = policy.rules[0].sources[0].principals
    assert exact.value == "example.org/ns/a/" and suffix.value == "/sa/b"


def test_l7_parts_are_stripped_from_deny_rules():
    policy, rejection, reports = parse_authorization_policy(ap({
        "action": "DENY",
        "rules": [{"from": [{"source": {"requestPrincipals": ["*"], "namespaces": ["a"]}}],
                   "to": [{"operation": {"methods": ["GET"]}}],
                   "when": [{"key": "request.headers[x]", "values": ["1"]},
                            {"key": "destination.port", "values": ["80"]}]}]}))
    assert rejection is None
    rule = policy.rules[0]
    assert [s.namespaces[0].text for s in rule.sources] == ["a"]
    assert rule.operations[0].ports == () and rule.operations[0].not_ports == ()     # empty: matches any
    assert [c.key for c in rule.conditions] == ["destination.port"]
    assert reports == ["AuthorizationPolicy backend/p rule 0: HTTP attributes (requestPrincipals, methods, "
                       "request.headers[x]) cannot be checked at L4 by the node agent: the DENY rule is enforced "
                       "without them (broader: it denies more connections)"]


def test_peer_authentication_levels():
    def level(obj, root="istio-system"):
        return parse_peer_authentication(obj, root)[0].level
    assert level(pa({}, ns="istio-system")) == "mesh"
    assert level(pa({})) == "namespace"
    assert level(pa({"selector": {}})) == "namespace"
    assert level(pa({"selector": {"matchLabels": {}}})) == "namespace"
    assert level(pa({"selector": {"matchLabels": {"app": "a"}}})) == "workload"
    assert level(pa({"selector": {"matchLabels": {"app": "a"}}}, ns="istio-system")) == "ignored"
    assert level(pa({}, ns="mesh-root"), root="mesh-root") == "mesh"


def test_rejection_str():
    assert str(Rejection("AuthorizationPolicy", "backend", "p", "why")) == "AuthorizationPolicy backend/p: why"
