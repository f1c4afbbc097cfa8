"""Istio L4 authorization semantics: one table, one connection per case.

Every case builds a PolicySet from a few objects, evaluates one connection
and checks the decision (allowed, deciding policy and rule, words of the
reason, audit flag, mTLS mode). Addresses: 198.18.0.0/15 and fd00:198:18::/48.
"""

from __future__ import annotations

import pytest

from agent.policy.engine import PolicySet
from agent.policy.request import InboundRequest, PolicyDecision, Workload
from agent.state.model import ClusterState, Pod
from tests import builders

WEBSITE = "spiffe://cluster.local/ns/frontend/sa/website"
OTHER = "spiffe://cluster.local/ns/frontend/sa/other"
ADMIN = "spiffe://cluster.local/ns/admin/sa/admin"
BACKEND_API = "spiffe://cluster.local/ns/backend/sa/api"
FRONTEND_API = "spiffe://cluster.local/ns/frontend/sa/api"

API_IP, API_IP6, DB_IP = "198.18.1.10", "fd00:198:18::10", "198.18.1.11"
WEB_IP, STRANGER_IP = "198.18.2.10", "198.18.3.5"


def pod(namespace, name, labels, sa, *ips):
    return builders.pod(name, namespace, labels=labels, sa=sa, node="node1", phase="Running", ips=ips)


PODS = {
    "api": pod("backend", "api", {"app": "api", "version": "v1"}, "api", API_IP, API_IP6),
    "db": pod("backend", "db", {"app": "db"}, "db", DB_IP),
    "website": pod("frontend", "website", {"app": "website"}, "website", WEB_IP),
}


def ap(name, spec, ns="backend", version="v1"):
    return {"apiVersion": f"security.istio.io/{version}", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}


def pa(name, spec, ns="backend", created=None):
    meta = {"name": name, "namespace": ns}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication", "metadata": meta, "spec": spec}


def allow(name, *rules, selector=None, ns="backend", action="ALLOW"):
    spec = {"action": action, "rules": list(rules)}
    if selector is not None:
        spec["selector"] = {"matchLabels": selector}
    return ap(name, spec, ns)


def deny(name, *rules, selector=None, ns="backend"):
    return allow(name, *rules, selector=selector, ns=ns, action="DENY")


def src(**fields):
    return {"from": [{"source": fields}]}


def to(**fields):
    return {"to": [{"operation": fields}]}


def when(key, values=None, not_values=None):
    cond = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return cond


# The seed example: only frontend's website may reach app: api in backend, on port 8080.
SEED = allow("allow-website", {"from": [{"source": {"principals": ["cluster.local/ns/frontend/sa/website"]}}],
                               "to": [{"operation": {"ports": ["8080"]}}]}, selector={"app": "api"})
ALLOW_NOTHING = ap("allow-nothing", {})
DENY_ALL = ap("deny-all", {"action": "DENY", "rules": [{}]})
ALLOW_ALL = ap("allow-all", {"rules": [{}]})
STRICT_NS = pa("default", {"mtls": {"mode": "STRICT"}})
MESH_STRICT = pa("default", {"mtls": {"mode": "STRICT"}}, ns="istio-system")

ANY = object()


def case(id, objects, allowed, *, policy=ANY, rule=ANY, says=(), audit=False, mtls="PERMISSIVE",
         to_pod="api", port=8080, ident=WEBSITE, source_ip=WEB_IP, dst_ip=None, root="istio-system",
         td="cluster.local"):
    return pytest.param(objects, dict(to_pod=to_pod, port=port, ident=ident, source_ip=source_ip, dst_ip=dst_ip),
                        dict(root=root, td=td),
                        dict(allowed=allowed, policy=policy, rule=rule,
                             says=(says,) if isinstance(says, str) else says, audit=audit, mtls=mtls), id=id)


CASES = [
    # -- Istio's documented examples ------------------------------------------
    case("seed: website on 8080 is allowed", [SEED], True, policy="backend/allow-website", rule=0,
         says="allowed by ALLOW policy backend/allow-website rule 0"),
    case("seed: another service account is denied", [SEED], False, policy=None, ident=OTHER,
         says=("no ALLOW policy matches", "backend/allow-website: no rule matches")),
    case("seed: another port is denied", [SEED], False, port=9090),
    case("seed: plaintext is denied", [SEED], False, ident=None),
    case("seed: a workload it does not select is allowed by default", [SEED], True, to_pod="db", policy=None,
         says="no ALLOW policy selects backend/db: allowed by default"),
    case("allow-nothing (spec: {}) denies", [ALLOW_NOTHING], False, policy=None, says="no rules, allows nothing"),
    case("allow-nothing does not reach other namespaces", [ALLOW_NOTHING], True, to_pod="website",
         says="no ALLOW policy selects frontend/website"),
    case("deny-all (DENY rules [{}]) denies", [DENY_ALL], False, policy="backend/deny-all", rule=0,
         says="denied by DENY policy backend/deny-all rule 0"),
    case("allow-all (rules [{}]) allows", [ALLOW_ALL], True, policy="backend/allow-all", rule=0),
    case("deny-all wins over allow-all", [ALLOW_ALL, DENY_ALL], False, policy="backend/deny-all"),
    case("allow-all wins over allow-nothing", [ALLOW_NOTHING, ALLOW_ALL], True, policy="backend/allow-all"),
    case("no policy at all: allowed by default", [], True, policy=None, says="allowed by default"),
    case("DENY notPrincipals ['*'] refuses plaintext", [deny("no-plaintext", src(notPrincipals=["*"]))], False,
         ident=None, policy="backend/no-plaintext"),
    case("DENY notPrincipals ['*'] lets mTLS through", [deny("no-plaintext", src(notPrincipals=["*"]))], True),

    # -- principals ----------------------------------------------------------------
    case("principal prefix matches", [allow("p", src(principals=["cluster.local/ns/frontend/*"]))], True, ident=OTHER),
    case("principal prefix does not match another namespace",
         [allow("p", src(principals=["cluster.local/ns/frontend/*"]))], False, ident=ADMIN),
    case("principal suffix matches", [allow("p", src(principals=["*/sa/website"]))], True),
    case("principal suffix does not match", [allow("p", src(principals=["*/sa/website"]))], False, ident=OTHER),
    case("principal presence matches any mTLS peer", [allow("p", src(principals=["*"]))], True, ident=ADMIN),
    case("principal presence never matches plaintext", [allow("p", src(principals=["*"]))], False, ident=None,
         says="no ALLOW policy matches"),
    case("principals OR-ed", [allow("p", src(principals=["cluster.local/ns/admin/sa/admin", "x/ns/y/sa/z"]))],
         True, ident=ADMIN),
    case("notPrincipals excludes the listed peer", [allow("p", src(notPrincipals=["*/sa/website"]))], False),
    case("notPrincipals admits other peers", [allow("p", src(notPrincipals=["*/sa/website"]))], True, ident=OTHER),
    case("notPrincipals matches plaintext (no identity)", [allow("p", src(notPrincipals=["*/sa/website"]))], True,
         ident=None),
    case("principal 'cluster.local/...' means the mesh trust domain",
         [allow("p", src(principals=["cluster.local/ns/frontend/sa/website"]))], True,
         ident="spiffe://example.org/ns/frontend/sa/website", td="example.org"),
    case("principal of a foreign trust domain does not match",
         [allow("p", src(principals=["other.org/ns/frontend/sa/website"]))], False,
         ident="spiffe://example.org/ns/frontend/sa/website", td="example.org"),

    # -- namespaces ------------------------------------------------------------------
    case("namespaces matches the peer's namespace", [allow("n", src(namespaces=["frontend"]))], True),
    case("namespaces does not match another namespace", [allow("n", src(namespaces=["frontend"]))], False,
         ident=ADMIN),
    case("namespaces never matches plaintext", [allow("n", src(namespaces=["frontend"]))], False, ident=None),
    case("namespace prefix", [allow("n", src(namespaces=["front*"]))], True),
    case("DENY notNamespaces denies another namespace", [deny("d", src(notNamespaces=["frontend"]))], False,
         ident=ADMIN, policy="backend/d"),
    case("DENY notNamespaces spares the listed namespace", [deny("d", src(notNamespaces=["frontend"]))], True),
    case("DENY notNamespaces denies plaintext (ISTIO-SECURITY-2021-004)",
         [deny("d", src(notNamespaces=["frontend"]))], False, ident=None),

    # -- serviceAccounts ---------------------------------------------------------------
    case("serviceAccounts ns/sa matches", [allow("s", src(serviceAccounts=["frontend/website"]))], True),
    case("serviceAccounts ns/sa does not match another account",
         [allow("s", src(serviceAccounts=["frontend/website"]))], False, ident=OTHER),
    case("serviceAccounts never matches plaintext", [allow("s", src(serviceAccounts=["frontend/website"]))],
         False, ident=None),
    case("serviceAccounts bare name is in the policy's namespace", [allow("s", src(serviceAccounts=["api"]))],
         True, ident=BACKEND_API),
    case("serviceAccounts bare name is not another namespace's", [allow("s", src(serviceAccounts=["api"]))],
         False, ident=FRONTEND_API),
    case("DENY notServiceAccounts denies others", [deny("s", src(notServiceAccounts=["frontend/website"]))],
         False, ident=OTHER),
    case("DENY notServiceAccounts spares the account", [deny("s", src(notServiceAccounts=["frontend/website"]))],
         True),
    case("DENY notServiceAccounts denies plaintext", [deny("s", src(notServiceAccounts=["frontend/website"]))],
         False, ident=None),

    # -- ipBlocks ------------------------------------------------------------------------
    case("ipBlocks CIDR matches", [allow("i", src(ipBlocks=["198.18.2.0/24"]))], True, ident=None),
    case("ipBlocks CIDR does not match", [allow("i", src(ipBlocks=["198.18.2.0/24"]))], False,
         source_ip=STRANGER_IP),
    case("ipBlocks plain address matches", [allow("i", src(ipBlocks=["198.18.2.10"]))], True),
    case("ipBlocks plain address is exact", [allow("i", src(ipBlocks=["198.18.2.11"]))], False),
    case("notIpBlocks in DENY denies outside", [deny("i", src(notIpBlocks=["198.18.2.0/24"]))], False,
         source_ip=STRANGER_IP),
    case("notIpBlocks in DENY spares inside", [deny("i", src(notIpBlocks=["198.18.2.0/24"]))], True),
    case("IPv6 ipBlocks match an IPv6 source", [allow("i", src(ipBlocks=["fd00:198:18::/48"]))], True,
         source_ip="fd00:198:18::20", dst_ip=API_IP6),
    case("IPv6 ipBlocks never match an IPv4 source", [allow("i", src(ipBlocks=["fd00:198:18::/48"]))], False),
    case("an IPv4-mapped IPv6 source is its IPv4 address", [allow("i", src(ipBlocks=["198.18.2.0/24"]))], True,
         source_ip="::ffff:198.18.2.10"),

    # -- ports -------------------------------------------------------------------------------
    case("ports OR-ed", [allow("t", to(ports=["80", "8080"]))], True),
    case("ports exclude others", [allow("t", to(ports=["80", "8080"]))], False, port=9090),
    case("notPorts admits others", [allow("t", to(notPorts=["9090"]))], True),
    case("notPorts excludes the port", [allow("t", to(notPorts=["9090"]))], False, port=9090),

    # -- when -------------------------------------------------------------------------------
    case("when source.ip values", [allow("w", {"when": [when("source.ip", ["198.18.2.0/24"])]})], True),
    case("when source.ip values mismatch", [allow("w", {"when": [when("source.ip", ["198.18.2.0/24"])]})],
         False, source_ip=STRANGER_IP),
    case("when source.namespace notValues", [allow("w", {"when": [when("source.namespace", None, ["admin"])]})],
         False, ident=ADMIN),
    case("when source.principal prefix", [allow("w", {"when": [when("source.principal",
                                                                    ["cluster.local/ns/frontend/*"])]})], True),
    case("when destination.ip picks one address of the pod",
         [allow("w", {"when": [when("destination.ip", ["fd00:198:18::/48"])]})], False),
    case("when destination.ip IPv6", [allow("w", {"when": [when("destination.ip", ["fd00:198:18::10"])]})], True,
         source_ip="fd00:198:18::20", dst_ip=API_IP6),
    case("when destination.port values", [allow("w", {"when": [when("destination.port", ["8080"])]})], True),
    case("when destination.port notValues", [allow("w", {"when": [when("destination.port", None, ["8080"])]})],
         False),
    case("when source.serviceAccount", [allow("w", {"when": [when("source.serviceAccount", ["frontend/website"])]})],
         True),
    case("when values and notValues together",
         [allow("w", {"when": [when("source.principal", ["cluster.local/ns/frontend/*"], ["*/sa/website"])]})],
         False),
    case("when conditions are AND-ed",
         [allow("w", {"when": [when("destination.port", ["8080"]), when("source.namespace", ["admin"])]})], False),

    # -- combination --------------------------------------------------------------------------
    case("from entries are OR-ed",
         [allow("c", {"from": [{"source": {"principals": ["*/sa/website"]}},
                                {"source": {"namespaces": ["admin"]}}]})], True, ident=ADMIN),
    case("source fields are AND-ed",
         [allow("c", src(principals=["*/sa/website"], ipBlocks=["198.18.3.0/24"]))], False),
    case("from and to are AND-ed", [allow("c", {**src(principals=["*/sa/website"]), **to(ports=["80"])})], False),
    case("to entries are OR-ed",
         [allow("c", {"to": [{"operation": {"ports": ["80"]}}, {"operation": {"ports": ["8080"]}}]})], True),
    case("rules are OR-ed; the matching rule is named",
         [allow("c", src(namespaces=["admin"]), src(namespaces=["frontend"]))], True, policy="backend/c", rule=1),
    case("any ALLOW policy may allow", [allow("a1", src(namespaces=["admin"])), allow("a2", to(ports=["8080"]))],
         True, policy="backend/a2"),

    # -- scope --------------------------------------------------------------------------------
    case("no selector: the whole namespace", [allow("ns-wide", src(namespaces=["admin"]))], False, to_pod="db"),
    case("selector that matches nothing leaves the workload alone",
         [allow("x", src(namespaces=["admin"]), selector={"app": "nothing"})], True),
    case("selector labels are AND-ed", [allow("x", src(namespaces=["admin"]),
                                              selector={"app": "api", "version": "v2"})], True),
    case("empty selector: the whole namespace", [ap("e", {"selector": {}, "rules": [src(namespaces=["admin"])]})],
         False, to_pod="db"),
    case("root namespace without selector: the whole mesh", [ap("deny-all", {"action": "DENY", "rules": [{}]},
                                                                ns="istio-system")],
         False, to_pod="website", policy="istio-system/deny-all"),
    case("root namespace selector matches every namespace",
         [ap("api-only", {"selector": {"matchLabels": {"app": "api"}}, "action": "DENY", "rules": [{}]},
             ns="istio-system")], False, policy="istio-system/api-only"),
    case("root namespace selector spares other workloads",
         [ap("api-only", {"selector": {"matchLabels": {"app": "api"}}, "action": "DENY", "rules": [{}]},
             ns="istio-system")], True, to_pod="db"),
    case("another namespace's policy does not apply", [ap("deny-all", {"action": "DENY", "rules": [{}]},
                                                          ns="frontend")], True),
    case("configurable root namespace", [ap("deny-all", {"action": "DENY", "rules": [{}]}, ns="mesh-root")], False,
         root="mesh-root"),
    case("istio-system is not root when another is configured",
         [ap("deny-all", {"action": "DENY", "rules": [{}]}, ns="istio-system")], True, root="mesh-root"),
    case("targetRefs (waypoint) policies are not enforced here",
         [ap("waypoint", {"targetRefs": [{"kind": "Service", "group": "", "name": "api"}], "action": "DENY",
                          "rules": [{}]})], True, policy=None),

    # -- actions ------------------------------------------------------------------------------
    case("AUDIT marks a matching connection", [allow("audit", src(namespaces=["frontend"]), action="AUDIT")],
         True, audit=True, says="audited by backend/audit"),
    case("AUDIT does not change a denial", [DENY_ALL, allow("audit", {}, action="AUDIT")], False, audit=True,
         policy="backend/deny-all"),
    case("AUDIT not matching: no mark", [allow("audit", src(namespaces=["admin"]), action="AUDIT")], True,
         audit=False),
    case("AUDIT is not an ALLOW policy", [allow("audit", src(namespaces=["admin"]), action="AUDIT")], True,
         says="no ALLOW policy selects"),
    case("CUSTOM with HTTP rules denies (fail closed)",
         [ap("ext", {"action": "CUSTOM", "provider": {"name": "opa"},
                     "rules": [{"to": [{"operation": {"paths": ["/admin/*"]}}]}]})],
         False, policy="backend/ext", rule=0, says=("CUSTOM policy backend/ext", "fail closed")),
    case("CUSTOM denies only what its rules match",
         [ap("ext", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [to(ports=["9000"])]})], True),
    case("DENY wins over a matching ALLOW", [SEED, deny("d", src(principals=["*/sa/website"]))], False,
         policy="backend/d"),
    case("a DENY that does not match lets ALLOW decide", [SEED, deny("d", src(namespaces=["admin"]))], True,
         policy="backend/allow-website"),
    case("v1beta1 is read like v1", [ap("deny-all", {"action": "DENY", "rules": [{}]}, version="v1beta1")], False),

    # -- L7 attributes --------------------------------------------------------------------------
    case("ALLOW rule with methods is ignored: allows nothing",
         [allow("l7", {**src(namespaces=["frontend"]), **to(methods=["GET"])})], False,
         says="no enforceable rules, allows nothing"),
    case("ALLOW: only the L7 rule is ignored",
         [allow("l7", to(methods=["GET"]), src(namespaces=["frontend"]))], True, policy="backend/l7", rule=1),
    case("ALLOW rule with requestPrincipals is ignored",
         [allow("l7", src(namespaces=["frontend"], requestPrincipals=["*"]))], False),
    case("ALLOW rule with a request.headers condition is ignored",
         [allow("l7", {"when": [when("request.headers[x-user]", ["admin"])]})], False),
    case("DENY with methods only: the emptied `to` matches everything",
         [deny("l7", to(methods=["POST"]))], False, policy="backend/l7", rule=0),
    case("DENY with paths and ports: enforced on the ports",
         [deny("l7", to(paths=["/admin"], ports=["9090"]))], True),
    case("DENY with paths and ports: denies the port",
         [deny("l7", to(paths=["/admin"], ports=["9090"]))], False, port=9090),
    case("DENY from with requestPrincipals keeps its L4 fields",
         [deny("l7", src(requestPrincipals=["*"], namespaces=["admin"]))], True),
    case("DENY from with requestPrincipals: denies the namespace",
         [deny("l7", src(requestPrincipals=["*"], namespaces=["admin"]))], False, ident=ADMIN),
    case("DENY with remoteIpBlocks only denies everything", [deny("l7", src(remoteIpBlocks=["198.18.3.0/24"]))],
         False),
    case("DENY with an L7 condition drops the condition",
         [deny("l7", {**to(ports=["8080"]), "when": [when("request.auth.claims[iss]", ["x"])]})], False),

    # -- invalid objects: fail closed, and never stop the others ----------------------------
    case("broken ALLOW allows nothing", [allow("bad", src(ipBlocks=["198.18.0.0/33"]))], False,
         says="backend/bad: rejected, allows nothing"),
    case("broken ALLOW does not cancel a valid ALLOW", [allow("bad", src(ipBlocks=["nope"])), SEED], True,
         policy="backend/allow-website"),
    case("broken DENY denies everything it selects", [deny("bad", to(ports=["http"]))], False,
         policy="backend/bad", rule=None, says=("DENY policy backend/bad is invalid", "fail closed")),
    case("broken AUDIT has no effect", [allow("bad", to(ports=["x"]), action="AUDIT")], True, audit=False),
    case("unknown action denies", [ap("odd", {"action": "REJECT", "rules": [{}]})], False,
         says="unreadable action"),
    case("a broken policy elsewhere does not matter",
         [allow("bad", src(ipBlocks=["nope"]), ns="frontend"), SEED], True, policy="backend/allow-website"),
    case("an unreadable selector selects the whole namespace",
         [ap("bad", {"selector": {"matchLabels": ["app"]}, "rules": [{}]})], False, to_pod="db"),
    case("a malformed peer identity is denied", [], False, ident="spiffe://cluster.local/whatever",
         says="not a SPIFFE workload identity"),

    # -- PeerAuthentication ----------------------------------------------------------------------
    case("STRICT refuses plaintext", [STRICT_NS], False, ident=None, mtls="STRICT", policy="backend/default",
         says="STRICT mTLS (PeerAuthentication backend/default, namespace-wide) and the connection is plaintext"),
    case("STRICT accepts mTLS", [STRICT_NS], True, mtls="STRICT"),
    case("PERMISSIVE by default accepts plaintext", [], True, ident=None, mtls="PERMISSIVE"),
    case("PERMISSIVE explicitly", [pa("default", {"mtls": {"mode": "PERMISSIVE"}})], True, ident=None),
    case("STRICT is checked before AuthorizationPolicies", [STRICT_NS, ALLOW_ALL], False, ident=None,
         mtls="STRICT", policy="backend/default"),
    case("mesh-wide STRICT from the root namespace", [MESH_STRICT], False, ident=None, mtls="STRICT",
         policy="istio-system/default"),
    case("namespace PERMISSIVE overrides mesh STRICT",
         [MESH_STRICT, pa("default", {"mtls": {"mode": "PERMISSIVE"}})], True, ident=None),
    case("namespace UNSET inherits mesh STRICT", [MESH_STRICT, pa("default", {"mtls": {"mode": "UNSET"}})],
         False, ident=None, mtls="STRICT", policy="istio-system/default"),
    case("workload PERMISSIVE overrides namespace STRICT",
         [STRICT_NS, pa("api", {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "PERMISSIVE"}})],
         True, ident=None),
    case("workload UNSET inherits namespace STRICT",
         [STRICT_NS, pa("api", {"selector": {"matchLabels": {"app": "api"}}})], False, ident=None, mtls="STRICT"),
    case("a workload policy for other pods does not apply",
         [STRICT_NS, pa("db", {"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "PERMISSIVE"}})],
         False, ident=None, mtls="STRICT", policy="backend/default"),
    case("port-level PERMISSIVE exempts its port",
         [pa("api", {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"},
                     "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}})], True, ident=None, port=9090),
    case("port-level exemption does not cover other ports",
         [pa("api", {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"},
                     "portLevelMtls": {"9090": {"mode": "PERMISSIVE"}}})], False, ident=None, mtls="STRICT"),
    case("port-level STRICT in a PERMISSIVE workload",
         [pa("api", {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "PERMISSIVE"},
                     "portLevelMtls": {8080: {"mode": "STRICT"}}})], False, ident=None, mtls="STRICT",
         says="portLevelMtls 8080"),
    case("port-level PERMISSIVE under an inherited STRICT",
         [STRICT_NS, pa("api", {"selector": {"matchLabels": {"app": "api"}},
                                "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}})], True, ident=None),
    case("port-level UNSET inherits the workload mode",
         [pa("api", {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"},
                     "portLevelMtls": {"8080": {"mode": "UNSET"}}})], False, ident=None, mtls="STRICT",
         says="PeerAuthentication backend/api, workload"),
    case("DISABLE is enforced as PERMISSIVE", [MESH_STRICT, pa("default", {"mtls": {"mode": "DISABLE"}})], True,
         ident=None, mtls="PERMISSIVE"),
    case("an unknown mTLS mode is read as STRICT", [pa("default", {"mtls": {"mode": "STRIKT"}})], False,
         ident=None, mtls="STRICT", says="invalid so read as STRICT"),
    case("two namespace-wide policies: the oldest wins",
         [pa("newer", {"mtls": {"mode": "PERMISSIVE"}}, created="2024-05-01T00:00:00Z"),
          pa("older", {"mtls": {"mode": "STRICT"}}, created="2024-01-01T00:00:00Z")], False, ident=None,
         policy="backend/older", mtls="STRICT"),
    case("a root-namespace policy with a selector is ignored",
         [pa("sel", {"selector": {"matchLabels": {"app": "api"}}, "mtls": {"mode": "STRICT"}}, ns="istio-system")],
         True, ident=None),
]


def _request(req: dict) -> tuple[InboundRequest, Pod]:
    target = PODS[req["to_pod"]]
    return (InboundRequest(f"{target['metadata']['namespace']}/{target['metadata']['name']}", req["source_ip"],
                           40000, req["dst_ip"] or target["status"]["podIP"], req["port"], req["ident"]),
            Pod.from_dict(target))


@pytest.mark.parametrize("objects, req, config, expect", CASES)
def test_decision(objects, req, config, expect):
    state = ClusterState.from_items([*PODS.values(), *objects])
    assert not state.errors
    policies = PolicySet.from_state(state, root_namespace=config["root"], trust_domain=config["td"])
    decision = policies.evaluate(*_request(req))
    assert isinstance(decision, PolicyDecision)
    assert decision.allowed is expect["allowed"], decision.reason
    if expect["policy"] is not ANY:
        assert decision.policy == expect["policy"], decision
    if expect["rule"] is not ANY:
        assert decision.rule == expect["rule"], decision
    for words in expect["says"]:
        assert words in decision.reason, decision.reason
    assert decision.audit is expect["audit"], decision
    assert decision.mtls_mode == expect["mtls"], decision
    # explain() reaches the same decision
    explained, trace = policies.explain(*_request(req))
    assert explained == decision and trace


def test_case_count():
    assert len(CASES) >= 60


# -- reports -------------------------------------------------------------------------

def test_l7_reports_name_policy_and_rule():
    policies = PolicySet.from_objects([
        allow("l7", src(namespaces=["a"]), to(methods=["GET"], paths=["/x"])),
        deny("l7d", src(namespaces=["a"]), to(hosts=["example.test"])),
    ])
    assert policies.rejections == []
    allow_line = next(r for r in policies.reports if "backend/l7 rule 1" in r)
    assert "methods, paths" in allow_line and "ALLOW rule is ignored" in allow_line and "stricter" in allow_line
    deny_line = next(r for r in policies.reports if "backend/l7d rule 1" in r)
    assert "hosts" in deny_line and "enforced without them" in deny_line and "broader" in deny_line
    assert not any("rule 0" in r for r in policies.reports)


def test_waypoint_custom_disable_and_conflict_reports():
    policies = PolicySet.from_objects([
        ap("wp", {"targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
                  "rules": [{}]}),
        ap("ext", {"action": "CUSTOM", "provider": {"name": "opa"}, "rules": [{}]}),
        pa("off", {"mtls": {"mode": "DISABLE"}}),
        pa("a", {"mtls": {"mode": "STRICT"}}, ns="frontend", created="2024-01-01T00:00:00Z"),
        pa("b", {"mtls": {"mode": "PERMISSIVE"}}, ns="frontend", created="2024-02-01T00:00:00Z"),
    ])
    text = "\n".join(policies.reports)
    assert "AuthorizationPolicy backend/wp: targets Gateway/waypoint (a waypoint policy): not enforced" in text
    assert "AuthorizationPolicy backend/ext: CUSTOM action (provider 'opa') cannot be enforced" in text
    assert "PeerAuthentication backend/off: mTLS mode DISABLE is treated as PERMISSIVE" in text
    assert "the oldest, frontend/a, applies (frontend/b ignored)" in text
    assert policies.rejections == []


def test_request_by_namespace_and_labels():
    policies = PolicySet.from_objects([SEED])
    req = InboundRequest("backend/api-7f9", WEB_IP, 0, API_IP, 8080, OTHER)
    decision = policies.evaluate(req, Workload("backend", {"app": "api"}, "api-7f9"))
    assert not decision.allowed and "backend/api-7f9" in decision.reason
    no_workload = InboundRequest("backend/api-7f9", WEB_IP, 0, API_IP, 8080)
    assert not policies.evaluate(no_workload, None).allowed


def test_bad_request_addresses_fail_closed():
    decision = PolicySet.from_objects([]).evaluate(
        InboundRequest("backend/api", "not-an-ip", 0, API_IP, 8080), Pod.from_dict(PODS["api"]))
    assert not decision.allowed and "source IP 'not-an-ip' is not an IP address" in decision.reason


def test_explain_trace_says_why_nothing_matched():
    policies = PolicySet.from_objects([SEED])
    decision, trace = policies.explain(*_request(dict(to_pod="api", port=9090, ident=WEBSITE, source_ip=WEB_IP,
                                                      dst_ip=None)))
    assert not decision.allowed
    text = "\n".join(trace)
    assert "ALLOW backend/allow-website (selector app=api in namespace backend): does not match" in text
    assert "rule 0: to[0]: port 9090 is not in ports [8080]" in text
    assert "mTLS: PERMISSIVE" in text
