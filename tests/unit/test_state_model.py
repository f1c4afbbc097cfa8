"""The cluster model and the state file parser."""

import json
import os

import pytest

from agent.state.file import FileStateSource, parse_state_url
from agent.state.model import ClusterState, StateError, load_state_text, pod_ips

ITEMS = [
    {"kind": "Namespace", "metadata": {"name": "backend", "labels": {"istio.io/dataplane-mode": "ambient"}}},
    {"kind": "Pod", "metadata": {"name": "api", "namespace": "backend", "uid": "u1"},
     "spec": {"nodeName": "node1"}, "status": {"podIPs": [{"ip": "198.18.1.2"}, {"ip": "fd00:198:18::2"}]}},
    {"kind": "Pod", "metadata": {"name": "old"}, "spec": {"nodeName": "node2"}, "status": {"podIP": "198.18.2.2"}},
    {"kind": "Service", "metadata": {"name": "api", "namespace": "backend"}, "spec": {}},
    {"kind": "Node", "metadata": {"name": "node1"}},
    {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "p", "namespace": "backend"}},
    "not an object",
    {"metadata": {"name": "kindless"}},
    {"kind": "Pod", "metadata": {}},
    {"kind": "Pod", "metadata": {"name": "x", "labels": ["a"]}},
]


def test_items_are_indexed_and_bad_ones_recorded():
    state = ClusterState.from_items(ITEMS, "7")
    assert state.resource_version == "7"
    assert state.pod("backend", "api")["metadata"]["uid"] == "u1"
    assert state.pod("default", "old") is not None          # namespace defaults to "default"
    assert state.namespace("backend")["metadata"]["labels"]
    assert state.service("backend", "api") is not None
    assert "node1" in state.nodes
    assert [p["metadata"]["name"] for p in state.pods_on_node("node2")] == ["old"]
    assert state.pod_by_ip("fd00:198:18::2")["metadata"]["name"] == "api"
    assert state.pod_by_ip("198.18.2.2")["metadata"]["name"] == "old"
    assert [o["kind"] for o in state.objects_of_kind("AuthorizationPolicy", "security.istio.io")] == ["AuthorizationPolicy"]
    assert state.objects_of_kind("AuthorizationPolicy", "other.io") == []
    assert len(state.errors) == 4
    assert any("not an object" in e for e in state.errors)
    assert any("no kind" in e for e in state.errors)
    assert any("without metadata.name" in e for e in state.errors)
    assert any("labels is not a map" in e for e in state.errors)


@pytest.mark.parametrize("status, ips", [
    ({"podIPs": [{"ip": "198.18.0.5"}]}, ["198.18.0.5"]),
    ({"podIP": "198.18.0.6"}, ["198.18.0.6"]),
    ({"podIPs": [], "podIP": "198.18.0.7"}, ["198.18.0.7"]),
    ({}, []),
    ({"podIPs": [{"nope": 1}, "junk"]}, []),
])
def test_pod_ips(status, ips):
    assert pod_ips({"status": status}) == ips


def test_json_list_yaml_documents_and_typed_lists():
    as_json = json.dumps({"kind": "List", "metadata": {"resourceVersion": "3"}, "items": ITEMS[:2]})
    assert load_state_text(as_json).pod("backend", "api") is not None
    assert load_state_text(as_json).resource_version == "3"
    yaml_docs = "kind: Namespace\nmetadata: {name: a}\n---\nkind: Pod\nmetadata: {name: p, namespace: a}\n"
    state = load_state_text(yaml_docs)
    assert state.namespace("a") and state.pod("a", "p")
    assert load_state_text(json.dumps({"kind": "PodList", "items": [ITEMS[1]]})).pod("backend", "api")


@pytest.mark.parametrize("text, message", [
    ("kind: [unclosed", "neither JSON nor YAML"),
    ('{"kind": "List", "items": 5}', "without an items array"),
])
def test_unreadable_state_is_a_specific_error(text, message):
    with pytest.raises(StateError, match=message):
        load_state_text(text)


def test_state_urls():
    assert parse_state_url("file:/x/y.json") == "/x/y.json"
    for bad, message in [("file:", "needs a path"), ("kube", "not implemented"), ("http://x", "unsupported")]:
        with pytest.raises(StateError, match=message):
            parse_state_url(bad)


def test_file_source_follows_atomic_replacement_and_keeps_last_good_state(tmp_path):
    import asyncio
    path = tmp_path / "state.json"
    src = FileStateSource(str(path))
    assert src.load().pods == {}                      # missing file: empty cluster

    def write(text):
        tmp = tmp_path / "tmp"
        tmp.write_text(text)
        os.replace(tmp, path)

    write(json.dumps({"kind": "List", "items": ITEMS[:2]}))
    seen = []

    async def main():
        task = asyncio.ensure_future(src.watch(seen.append, interval=0.02))
        await asyncio.sleep(0.1)
        write("{ broken")
        await asyncio.sleep(0.1)
        write(json.dumps({"kind": "List", "items": ITEMS[:3]}))
        await asyncio.sleep(0.1)
        task.cancel()
    asyncio.run(main())
    assert [len(s.pods) for s in seen] == [1, 2]      # the broken version was skipped
