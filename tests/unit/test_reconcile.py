"""Reconciling captured pods with the enrolment rule."""

import pytest

from agent.enrol.reconcile import AddAction, add_action, desired, plan
from agent.enrol.records import PodRecord
from agent.state.model import ClusterState


def record(name, enrolled, uid="u-" + "x"):
    return PodRecord(namespace="app", name=name, uid=uid, container_id="c", netns=f"/run/netns/{name}",
                     ips=["198.18.0.9"], gateways=["198.18.0.1"], enrolled=enrolled)


def state(ns_labels, pods):
    items = [{"kind": "Namespace", "metadata": {"name": "app", "labels": ns_labels}}]
    for name, uid, labels in pods:
        items.append({"kind": "Pod", "metadata": {"name": name, "namespace": "app", "uid": uid, "labels": labels}})
    return ClusterState.from_items(items)


AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def test_label_added_enrols_and_label_removed_releases():
    s = state(AMBIENT, [("a", "u-x", {}), ("b", "u-x", {"istio.io/dataplane-mode": "none"})])
    changes = plan([record("a", False), record("b", True)], s)
    assert [(c.record.name, c.enrol) for c in changes] == [("a", True), ("b", False)]
    assert "opted out" in changes[1].reason


def test_nothing_to_do_when_in_line():
    s = state(AMBIENT, [("a", "u-x", {})])
    assert plan([record("a", True)], s) == []


def test_pod_unknown_to_the_state_keeps_its_capture():
    # Releasing a pod the state lost would let its traffic out uncaptured.
    assert plan([record("gone", True)], state({}, [])) == []


def test_a_different_pod_with_the_same_name_is_not_this_one():
    s = state(AMBIENT, [("a", "u-new", {})])
    assert desired(s, "app", "a", "u-old") is None
    assert plan([record("a", False, uid="u-old")], s) == []
    assert desired(s, "app", "a", "u-new").enrolled


# A CNI ADD compares namespaces by identity (device, inode), never by path (issue 11).
NS_A, NS_B = (4, 4026532001), (4, 4026532002)


@pytest.mark.parametrize("captured_in, requested, enrol, action", [
    (None, NS_A, True, AddAction.CAPTURE),
    (None, NS_A, False, AddAction.RECORD),
    # /run/netns/x and /var/run/netns/x, or the same sandbox with a new uid:
    # the listeners stay (a second set in the same namespace would collide).
    (NS_A, NS_A, True, AddAction.KEEP),
    # A new sandbox: the new capture is made before the old one goes.
    (NS_A, NS_B, True, AddAction.MOVE),
    (NS_A, NS_A, False, AddAction.RELEASE),
    (NS_A, NS_B, False, AddAction.RELEASE),
])
def test_a_repeated_cni_add_keeps_or_moves_the_capture_by_namespace_identity(captured_in, requested, enrol, action):
    assert add_action(captured_in, requested, enrol) is action
