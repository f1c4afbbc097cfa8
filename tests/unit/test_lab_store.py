"""lab.store: the lab's records and cluster state file, without namespaces or root."""

from __future__ import annotations

import json

import pytest

from lab import model
from lab.store import LabError, LabStore


def _pod(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "ns1", "labels": labels or {}},
            "spec": {"nodeName": "node1"}}


@pytest.fixture
def store(tmp_path):
    s = LabStore("unit", tmp_path)
    s.dir.mkdir()
    return s


def _state(store: LabStore) -> dict:
    return json.loads(open(store.state_path).read())


def _rv(doc: dict, name: str) -> str:
    return model.find(doc["items"], "Pod", "ns1", name)["metadata"]["resourceVersion"]


@pytest.mark.parametrize("change,a_changes,b_changes,list_changes", [
    (lambda items: None, False, False, False),                                   # nothing: no write
    (lambda items: model.upsert(items, _pod("a", {"v": "2"})), True, False, True),
    (lambda items: model.remove(items, "Pod", "ns1", "b"), False, None, True),    # b gone
    (lambda items: model.upsert(items, _pod("c")), False, False, True),           # a new object
])
def test_a_write_bumps_the_list_version_and_only_the_changed_objects(store, change, a_changes, b_changes, list_changes):
    store.update_state(lambda items: (model.upsert(items, _pod("a")), model.upsert(items, _pod("b"))))
    before = _state(store)
    store.update_state(change)
    after = _state(store)
    assert (after["metadata"]["resourceVersion"] != before["metadata"]["resourceVersion"]) is list_changes
    assert (_rv(after, "a") != _rv(before, "a")) is a_changes
    if b_changes is None:
        assert model.find(after["items"], "Pod", "ns1", "b") is None
    else:
        assert (_rv(after, "b") != _rv(before, "b")) is b_changes
    for o in after["items"]:        # the API server's fields, set once
        assert o["metadata"]["uid"] and o["metadata"]["creationTimestamp"]


def test_records_are_read_modify_write_and_a_missing_lab_is_an_error(store, tmp_path):
    with pytest.raises(LabError, match="does not exist"):
        store.read_records()
    store.lab_json.write_text(json.dumps({"nodes": {"b": {"index": 1}, "a": {"index": 0}}, "pods": {}}))
    with store.records() as rec:
        rec["pods"]["ns1/x"] = {"phase": "Pending"}
    store.set_pod_record("ns1/x", phase="Running")
    store.set_pod_record("ns1/unknown", phase="Running")     # no such pod: nothing written for it
    assert store.read_records()["pods"] == {"ns1/x": {"phase": "Running"}}
    assert store.nodes == ["a", "b"]                         # by index, not by name
    with pytest.raises(KeyError, match="no node 'c'"):
        store.node_record("c")
    with pytest.raises(LabError, match="does not exist"):
        with LabStore("other", tmp_path).locked():
            pass
