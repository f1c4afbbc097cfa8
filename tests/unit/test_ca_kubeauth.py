"""TokenReview decisions, pure: which reviews authenticate whom, on which node; the review cache."""

import pytest

from agent.ca.authn import AuthenticationError, Caller, ServiceAccount
from agent.ca.kubeauth import (EXTRA_NODE_NAME, EXTRA_POD_NAME, EXTRA_POD_UID, ReviewCache,
                               TokenIdentity, pod_node, review_identity)

AUD = "istio-ca"
AGENT = ServiceAccount("istio-system", "ambient-agent")


def status(username="system:serviceaccount:istio-system:ambient-agent", audiences=(AUD,),
           extra=None, authenticated=True, **more):
    doc = {"authenticated": authenticated, "audiences": list(audiences),
           "user": {"username": username, "uid": "sa-uid", "groups": ["system:serviceaccounts"],
                    "extra": extra if extra is not None else {EXTRA_POD_NAME: ["agent-x"],
                                                              EXTRA_POD_UID: ["pod-uid"]}}}
    doc.update(more)
    return doc


BOUND_TO_NODE = {EXTRA_NODE_NAME: ["node-a"], EXTRA_POD_NAME: ["agent-x"], EXTRA_POD_UID: ["pod-uid"]}

ACCEPTED = [
    # status, expected TokenIdentity
    (status(), TokenIdentity(AGENT, "sa-uid", None, "agent-x", "pod-uid")),
    (status(extra=BOUND_TO_NODE), TokenIdentity(AGENT, "sa-uid", "node-a", "agent-x", "pod-uid")),
    (status(extra={EXTRA_NODE_NAME: ["node-a"]}), TokenIdentity(AGENT, "sa-uid", "node-a", None, None)),
    (status(extra={EXTRA_POD_NAME: ["agent-x"]}), TokenIdentity(AGENT, "sa-uid", None, "agent-x", None)),
    (status(extra={EXTRA_POD_NAME: "agent-x"}), TokenIdentity(AGENT, "sa-uid", None, "agent-x", None)),
    (status(audiences=["other", AUD]), TokenIdentity(AGENT, "sa-uid", None, "agent-x", "pod-uid")),
    (status("system:serviceaccount:backend:api"),
     TokenIdentity(ServiceAccount("backend", "api"), "sa-uid", None, "agent-x", "pod-uid")),
]


@pytest.mark.parametrize("doc,expected", ACCEPTED)
def test_review_accepted(doc, expected):
    assert review_identity(doc, AUD) == expected


REFUSED = [
    # status, error fragment
    (None, "returned no status"),
    ({}, "token not authenticated by the Kubernetes API server"),
    (status(authenticated=False, error="token has expired"),
     "token not authenticated by the Kubernetes API server: token has expired"),
    (status(authenticated="true"), "not authenticated"),           # only a JSON true counts
    (status(audiences=["kubernetes"]), "not valid for audience 'istio-ca' (its reviewed audiences: ['kubernetes'])"),
    (status(audiences=[]), "not valid for audience 'istio-ca'"),
    ({"authenticated": True, "user": {"username": "system:serviceaccount:a:b"}}, "not valid for audience"),
    (status(username="alice"), "token belongs to 'alice', not a service account"),
    (status(username="system:node:node-a"), "not a service account"),
    (status(username="system:serviceaccount:backend"), "is not a valid service account"),
    (status(username="system:serviceaccount:Backend:api"), "not a DNS-1123 label"),
    (status(username="system:serviceaccount:backend:api:x"), "not a DNS-1123 subdomain"),
    ({"authenticated": True, "audiences": [AUD]}, "no user information"),
    (status(extra={}), "is not bound to a pod"),
    (status(extra={"authentication.kubernetes.io/credential-id": ["JTI=x"]}), "is not bound to a pod"),
    (status(extra={EXTRA_POD_NAME: ["a", "b"]}), "must hold exactly one non-empty string"),
    (status(extra={EXTRA_NODE_NAME: [""]}), "must hold exactly one non-empty string"),
    (status(extra={EXTRA_NODE_NAME: ["node-a"], EXTRA_POD_UID: [1]}), "must hold exactly one"),
    (status(extra=["x"]), "user extra is not an object"),
]


@pytest.mark.parametrize("doc,fragment", REFUSED)
def test_review_refused(doc, fragment):
    with pytest.raises(AuthenticationError) as err:
        review_identity(doc, AUD)
    assert fragment in str(err.value)


def test_audience_is_configurable():
    assert review_identity(status(audiences=["mesh"]), "mesh").service_account == AGENT
    with pytest.raises(AuthenticationError, match="audience 'mesh'"):
        review_identity(status(), "mesh")


def agent_pod(uid="pod-uid", node="node-a", sa="ambient-agent"):
    spec = {"nodeName": node} if node else {}
    if sa is not None:
        spec["serviceAccountName"] = sa
    return {"metadata": {"name": "agent-x", "namespace": "istio-system", "uid": uid}, "spec": spec}


BOUND = TokenIdentity(AGENT, "sa-uid", None, "agent-x", "pod-uid")
BOUND_NO_UID = TokenIdentity(AGENT, "sa-uid", None, "agent-x", None)

POD_NODE = [
    # identity, pod, expected node or error fragment
    (BOUND, agent_pod(), "node-a"),
    (BOUND_NO_UID, agent_pod(uid="anything"), "node-a"),
    (BOUND, agent_pod(uid="other-uid"),
     "pod istio-system/agent-x has UID 'other-uid', not the 'pod-uid' the token is bound to"),
    (BOUND, agent_pod(node=None), "is not scheduled to a node"),
    (BOUND, agent_pod(sa="web"), "runs as service account 'web', not 'ambient-agent'"),
    (BOUND, agent_pod(sa=None), "runs as service account 'default'"),
    (TokenIdentity(ServiceAccount("ns", "default"), "", None, "p", None),
     {"metadata": {}, "spec": {"nodeName": "node-b"}}, "node-b"),
    (BOUND, None, "could not be read"),
    (BOUND, {"metadata": "x", "spec": []}, "has UID None"),
]


@pytest.mark.parametrize("identity,pod,expected", POD_NODE)
def test_pod_node(identity, pod, expected):
    if expected.startswith("node-"):
        assert pod_node(pod, identity) == expected
    else:
        with pytest.raises(AuthenticationError) as err:
            pod_node(pod, identity)
        assert expected in str(err.value)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_cache_keeps_positive_reviews_for_its_ttl_by_token_hash():
    clock = Clock()
    cache = ReviewCache(ttl=60, size=10, clock=clock)
    caller = Caller("node-a", "test", AGENT)
    cache.put("secret-token", caller)
    assert cache.get("secret-token") is caller
    assert cache.get("secret-token2") is None
    # The token itself is never stored: only its digest.
    assert all(isinstance(k, bytes) and len(k) == 32 and b"secret" not in k for k in cache._entries)
    clock.now += 59.9
    assert cache.get("secret-token") is caller
    clock.now += 0.1
    assert cache.get("secret-token") is None
    assert len(cache) == 0


def test_cache_is_bounded_oldest_first():
    cache = ReviewCache(ttl=60, size=3, clock=Clock())
    for i in range(5):
        cache.put(f"t{i}", Caller(f"node-{i}", "test"))
    assert len(cache) == 3
    assert [cache.get(f"t{i}") is None for i in range(5)] == [True, True, False, False, False]
    cache.put("t2", Caller("node-2b", "test"))               # refreshed: now the newest
    cache.put("t5", Caller("node-5", "test"))
    assert cache.get("t3") is None and cache.get("t2").node == "node-2b"


def test_cache_disabled():
    cache = ReviewCache(ttl=0)
    cache.put("t", Caller("node-a", "test"))
    assert cache.get("t") is None and len(cache) == 0
