"""Live enrolment planning: pods without a CNI record, and the redirection annotation."""

import pytest

from agent.enrol.reconcile import REDIRECTION_ANNOTATION, annotation_changes, unrecorded
from agent.enrol.records import PodRecord
from agent.state.model import ClusterState
from tests import builders

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def ns(name, labels=None):
    return builders.namespace(name, labels or {})


def pod(namespace, name, node="n1", ip="198.18.1.5", uid=None, labels=None, annotations=None,
        phase="Running", host_network=False):
    return builders.pod(name, namespace, node=node, ips=[ip] if ip else (), uid=uid or f"uid-{name}",
                        labels=labels or {}, annotations=annotations or {}, phase=phase,
                        host_network=host_network)


def record(namespace, name, uid=None):
    return PodRecord(namespace, name, uid or f"uid-{name}", "c", "/run/netns/x", ["198.18.1.5"], [])


@pytest.mark.parametrize("items,records,expected", [
    # a running pod of a mesh namespace, unknown to the agent: find it
    ([ns("a", AMBIENT), pod("a", "p")], {}, ["a/p"]),
    # the pod label alone is enough
    ([ns("a"), pod("a", "p", labels=AMBIENT)], {}, ["a/p"]),
    # known already (CNI told us): nothing to find
    ([ns("a", AMBIENT), pod("a", "p")], {"a/p": record("a", "p")}, []),
    # known, but as an older pod of the same name: find the new one
    ([ns("a", AMBIENT), pod("a", "p", uid="new")], {"a/p": record("a", "p", uid="old")}, ["a/p"]),
    # another node's pod, a pod without an IP yet, a finished pod, a host-network pod
    ([ns("a", AMBIENT), pod("a", "p", node="n2")], {}, []),
    ([ns("a", AMBIENT), pod("a", "p", ip=None)], {}, []),
    ([ns("a", AMBIENT), pod("a", "p", phase="Succeeded")], {}, []),
    ([ns("a", AMBIENT), pod("a", "p", host_network=True)], {}, []),
    # not in the mesh, or opted out
    ([ns("a"), pod("a", "p")], {}, []),
    ([ns("a", AMBIENT), pod("a", "p", labels={"istio.io/dataplane-mode": "none"})], {}, []),
    ([ns("kube-system", AMBIENT), pod("kube-system", "p")], {}, []),
    ([ns("a", AMBIENT), pod("a", "p", annotations={REDIRECTION_ANNOTATION: "disabled"})], {}, []),
])
def test_unrecorded(items, records, expected):
    state = ClusterState.from_items(items)
    assert [u.key for u in unrecorded(state, "n1", records)] == expected


def test_unrecorded_carries_ips_uid_and_reason():
    state = ClusterState.from_items([ns("a", AMBIENT), pod("a", "p", ip="198.18.1.9", uid="u9")])
    (u,) = unrecorded(state, "n1", {})
    assert (u.uid, u.ips) == ("u9", ("198.18.1.9",))
    assert "namespace a labelled istio.io/dataplane-mode=ambient" in u.reason


ENABLED = {REDIRECTION_ANNOTATION: "enabled"}


@pytest.mark.parametrize("items,captured,expected", [
    ([pod("a", "p")], {"a/p"}, [("a", "p", "enabled")]),
    ([pod("a", "p", annotations=ENABLED)], {"a/p"}, []),
    # marked, but not captured (released, or capture lost): the mark goes
    ([pod("a", "p", annotations=ENABLED)], set(), [("a", "p", None)]),
    # a user's opt-out stays, captured (about to be released) or not
    ([pod("a", "p", annotations={REDIRECTION_ANNOTATION: "disabled"})], set(), []),
    ([pod("a", "p", annotations={REDIRECTION_ANNOTATION: "disabled"})], {"a/p"}, []),
    ([pod("a", "p", annotations={REDIRECTION_ANNOTATION: "bogus"})], set(), [("a", "p", None)]),
    ([pod("a", "p")], set(), []),
    # other nodes' pods are their agents' business
    ([pod("a", "p", node="n2", annotations=ENABLED)], set(), []),
])
def test_annotation_changes(items, captured, expected):
    assert annotation_changes(ClusterState.from_items(items), "n1", captured) == expected
