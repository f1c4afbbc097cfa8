"""SPIFFE IDs: strict parsing, construction and a pod's identity."""

import pytest

from agent.identity.spiffe import IdentityError, WorkloadIdentity, identity_of_pod, parse_spiffe_uri

VALID = [
    ("spiffe://cluster.local/ns/default/sa/default", ("cluster.local", "default", "default")),
    ("spiffe://cluster.local/ns/backend/sa/api", ("cluster.local", "backend", "api")),
    ("spiffe://example.org/ns/a-b/sa/sa.with.dots", ("example.org", "a-b", "sa.with.dots")),
    ("spiffe://td_1-x.y/ns/n1/sa/s-2", ("td_1-x.y", "n1", "s-2")),
    ("spiffe://x/ns/" + "n" * 63 + "/sa/s", ("x", "n" * 63, "s")),
]

INVALID = [
    (None, "must be a string"),
    (b"spiffe://cluster.local/ns/a/sa/b", "must be a string"),
    ("", "is empty"),
    ("http://cluster.local/ns/a/sa/b", "does not start with 'spiffe://'"),
    ("SPIFFE://cluster.local/ns/a/sa/b", "does not start with"),
    ("spiffe:///ns/a/sa/b", "has no trust domain"),
    ("spiffe://cluster.local", "has no path"),
    ("spiffe://cluster.local/", "has no path"),
    ("spiffe://Cluster.Local/ns/a/sa/b", "lower-case letters"),
    ("spiffe://cluster.local:443/ns/a/sa/b", "must not hold user info or a port"),
    ("spiffe://user@cluster.local/ns/a/sa/b", "must not hold user info or a port"),
    ("spiffe://cluster.local/ns/a/sa/b/", "path must be exactly"),
    ("spiffe://cluster.local//ns/a/sa/b", "path must be exactly"),
    ("spiffe://cluster.local/ns/a/sa", "path must be exactly"),
    ("spiffe://cluster.local/sa/b/ns/a", "path must be exactly"),
    ("spiffe://cluster.local/ns/a/sa/b/extra/c", "path must be exactly"),
    ("spiffe://cluster.local/ns//sa/b", "namespace must be a non-empty string"),
    ("spiffe://cluster.local/ns/a/sa/", "service account must be a non-empty string"),
    ("spiffe://cluster.local/ns/Upper/sa/b", "is not a DNS-1123 label"),
    ("spiffe://cluster.local/ns/a.b/sa/c", "is not a DNS-1123 label"),
    ("spiffe://cluster.local/ns/" + "n" * 64 + "/sa/b", "is not a DNS-1123 label"),
    ("spiffe://cluster.local/ns/a/sa/-b", "is not a DNS-1123 subdomain"),
    ("spiffe://cluster.local/ns/a/sa/b?x=1", "must not contain a query"),
    ("spiffe://cluster.local/ns/a/sa/b#f", "must not contain a fragment"),
    ("spiffe://cluster.local/ns/a%2Fb/sa/c", "must not contain percent-encoding"),
    ("spiffe://cluster.local/ns/a/sa/" + "b" * 2100, "characters long"),
    (" spiffe://cluster.local/ns/a/sa/b", "does not start with"),
]


@pytest.mark.parametrize("uri,parts", VALID)
def test_valid_ids_parse_and_round_trip(uri, parts):
    identity = parse_spiffe_uri(uri)
    assert (identity.trust_domain, identity.namespace, identity.service_account) == parts
    assert identity.uri == uri
    assert str(identity) == uri


@pytest.mark.parametrize("uri,message", INVALID)
def test_invalid_ids_are_refused_with_a_specific_message(uri, message):
    with pytest.raises(IdentityError) as err:
        parse_spiffe_uri(uri)
    assert message in str(err.value)
    assert isinstance(err.value, ValueError)


def test_identity_is_validated_on_construction_and_hashable():
    with pytest.raises(IdentityError, match="trust domain"):
        WorkloadIdentity("", "a", "b")
    with pytest.raises(IdentityError, match="namespace"):
        WorkloadIdentity("cluster.local", "A", "b")
    a = WorkloadIdentity("cluster.local", "a", "b")
    assert {a: 1}[WorkloadIdentity("cluster.local", "a", "b")] == 1
    with pytest.raises(AttributeError):
        a.namespace = "c"


@pytest.mark.parametrize("pod,td,expected", [
    ({"metadata": {"name": "p", "namespace": "backend"}, "spec": {"serviceAccountName": "api"}},
     "cluster.local", "spiffe://cluster.local/ns/backend/sa/api"),
    ({"metadata": {"name": "p", "namespace": "backend"}, "spec": {}},
     "cluster.local", "spiffe://cluster.local/ns/backend/sa/default"),
    ({"metadata": {"name": "p"}, "spec": {"serviceAccountName": "x"}},
     "example.org", "spiffe://example.org/ns/default/sa/x"),
    ({"metadata": {"name": "p", "namespace": "n"}},
     "cluster.local", "spiffe://cluster.local/ns/n/sa/default"),
])
def test_identity_of_pod(pod, td, expected):
    assert identity_of_pod(pod, td).uri == expected


@pytest.mark.parametrize("pod,message", [
    ("not a pod", "pod must be an object"),
    ({"metadata": {"name": "p", "namespace": "n"}, "spec": {"serviceAccountName": "Bad_SA"}},
     "pod n/p: service account 'Bad_SA'"),
])
def test_identity_of_bad_pod(pod, message):
    with pytest.raises(IdentityError, match=message):
        identity_of_pod(pod)
