"""The data plane's policy hook: InboundRequest in, PolicyDecision out (agent/policy/request.py), fail closed."""

from __future__ import annotations

from agent.policy.engine import PolicySet
from agent.policy.hook import make_hook, policy_set_source
from agent.policy.request import InboundRequest, PolicyDecision
from agent.state.model import ClusterState

API = {"apiVersion": "v1", "kind": "Pod",
       "metadata": {"name": "api", "namespace": "backend", "labels": {"app": "api"}},
       "spec": {"nodeName": "node1", "serviceAccountName": "api"},
       "status": {"phase": "Running", "podIP": "198.18.1.10"}}
SEED = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-website", "namespace": "backend"},
        "spec": {"selector": {"matchLabels": {"app": "api"}},
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/frontend/sa/website"]}}],
                            "to": [{"operation": {"ports": ["8080"]}}]}]}}
WEBSITE = "spiffe://cluster.local/ns/frontend/sa/website"


def inbound(pod="backend/api", port=8080, identity=WEBSITE):
    return InboundRequest(pod, "198.18.2.10", 40000, "198.18.1.10", port, identity)


def test_hook_decides_with_the_engine():
    state = ClusterState.from_items([API, SEED])
    hook = make_hook(lambda: PolicySet.from_state(state), lambda: state)
    assert hook(inbound()) == PolicyDecision(True, "allowed by ALLOW policy backend/allow-website rule 0",
                                             "backend/allow-website", 0)
    denied = hook(inbound(port=9090))
    assert isinstance(denied, PolicyDecision) and not denied.allowed
    assert "no ALLOW policy matches this connection to backend/api" in denied.reason
    assert not hook(inbound(identity=None)).allowed


def test_hook_fails_closed():
    state = ClusterState.from_items([API])
    hook = make_hook(lambda: PolicySet.from_state(state), lambda: state)
    assert hook(inbound()).allowed
    missing = hook(inbound(pod="backend/gone"))
    assert not missing.allowed and "backend/gone is not in the cluster state" in missing.reason
    assert not hook(inbound(pod="no-slash")).allowed

    def broken():
        raise RuntimeError("boom")

    failing = make_hook(broken, lambda: state)(inbound())
    assert not failing.allowed and "policy engine error (RuntimeError: boom)" in failing.reason


def test_policy_set_source_rebuilds_only_for_a_new_state():
    states = [ClusterState.from_items([API])]
    get = policy_set_source(lambda: states[-1])
    first = get()
    assert get() is first
    states.append(ClusterState.from_items([API, SEED]))
    second = get()
    assert second is not first and [p.key for p in second.authorization] == ["backend/allow-website"]
    hook = make_hook(get, lambda: states[-1])
    assert not hook(inbound(identity=None)).allowed
