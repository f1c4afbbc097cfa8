"""The cluster model, the state text parser and the file state source."""

import asyncio
import json
import logging
import os

import pytest

from agent.state.file import FileStateSource, parse_state_url
from agent.state.model import ClusterState, StateError, api_group_of, load_state_text, pod_ips

NS_BACKEND = {"apiVersion": "v1", "kind": "Namespace",
              "metadata": {"name": "backend", "labels": {"istio.io/dataplane-mode": "ambient"}}}
POD_API = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "api", "namespace": "backend", "uid": "u1"},
           "spec": {"nodeName": "node1"},
           "status": {"phase": "Running", "podIP": "198.18.1.2",
                      "podIPs": [{"ip": "198.18.1.2"}, {"ip": "fd00:198:18::2"}]}}
POD_OLD = {"kind": "Pod", "metadata": {"name": "old"}, "spec": {"nodeName": "node2"},
           "status": {"podIP": "198.18.2.2"}}
SVC_API = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "backend"},
           "spec": {"clusterIP": "198.19.128.10"}}
NODE1 = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node1"}}
AUTHZ = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
         "metadata": {"name": "allow", "namespace": "backend"}}
GOOD = [NS_BACKEND, POD_API, POD_OLD, SVC_API, NODE1, AUTHZ]


def as_list(items, rv="7"):
    return json.dumps({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": rv}, "items": items})


# -- ClusterState ---------------------------------------------------------------

def test_items_are_indexed():
    state = ClusterState.from_items(GOOD, "7")
    assert state.errors == []
    assert state.resource_version == "7"
    assert state.pod("backend", "api") is POD_API
    assert state.pod("default", "old") is POD_OLD          # no metadata.namespace: "default"
    assert state.pod("backend", "nope") is None
    assert state.namespace("backend") is NS_BACKEND
    assert state.namespace("nope") is None
    assert state.service("backend", "api") is SVC_API
    assert state.node("node1") is NODE1 and list(state.nodes) == ["node1"]
    assert state.others == [AUTHZ]
    assert state.objects == GOOD
    assert state.pods_on_node("node1") == [POD_API]
    assert state.pods_on_node("node2") == [POD_OLD]
    assert state.pods_on_node("node3") == []


@pytest.mark.parametrize("kind, group, expected", [
    ("AuthorizationPolicy", None, [AUTHZ]),
    ("AuthorizationPolicy", "security.istio.io", [AUTHZ]),
    ("AuthorizationPolicy", "other.io", []),
    ("Pod", None, [POD_API, POD_OLD]),                       # kind queries span the indexes too
    ("Pod", "", [POD_API, POD_OLD]),                         # the core group is ""
    ("Service", "v1", []),                                   # "v1" is a version, not a group
    ("Gateway", None, []),
])
def test_objects_of_kind(kind, group, expected):
    assert ClusterState.from_items(GOOD).objects_of_kind(kind, group) == expected


@pytest.mark.parametrize("obj, group", [
    ({"apiVersion": "v1"}, ""), ({"apiVersion": "apps/v1"}, "apps"),
    ({"apiVersion": "security.istio.io/v1beta1"}, "security.istio.io"), ({}, ""), ({"apiVersion": 3}, ""),
])
def test_api_group_of(obj, group):
    assert api_group_of(obj) == group


BAD_ITEMS = [
    ("not an object", "not an object (str)"),
    (["a list"], "not an object (list)"),
    ({"metadata": {"name": "kindless"}}, "no kind"),
    ({"kind": "", "metadata": {"name": "x"}}, "no kind"),
    ({"kind": "Pod"}, "Pod without metadata"),
    ({"kind": "Pod", "metadata": "x"}, "Pod without metadata"),
    ({"kind": "Pod", "metadata": {}}, "Pod without metadata.name"),
    ({"kind": "Pod", "metadata": {"name": 5}}, "Pod without metadata.name"),
    ({"kind": "Pod", "metadata": {"name": "x", "namespace": 5}}, "Pod x: metadata.namespace is not a string"),
    ({"kind": "Pod", "metadata": {"name": "x", "labels": ["a"]}}, "Pod x: metadata.labels is not a map"),
    ({"kind": "Namespace", "metadata": {"name": "x", "annotations": "a"}},
     "Namespace x: metadata.annotations is not a map"),
]


@pytest.mark.parametrize("item, error", BAD_ITEMS, ids=[e for _, e in BAD_ITEMS])
def test_a_malformed_item_is_recorded_and_skipped(item, error):
    state = ClusterState.from_items([NS_BACKEND, item, POD_API])
    assert state.errors == [f"item 1: {error}"]
    assert state.objects == [NS_BACKEND, POD_API]            # the rest stands


def test_items_that_are_not_a_list():
    assert ClusterState.from_items(None).objects == []
    state = ClusterState.from_items({"kind": "Pod"})
    assert state.objects == [] and state.errors == ["items is not a list (dict)"]
    assert ClusterState.from_items(5).errors == ["items is not a list (int)"]
    assert ClusterState.from_items(iter([NS_BACKEND])).objects == [NS_BACKEND]   # any iterable


def test_a_later_duplicate_replaces_the_earlier_and_is_recorded():
    newer = {**POD_OLD, "metadata": {"name": "old", "namespace": "default", "uid": "u2"}}
    state = ClusterState.from_items([POD_OLD, NS_BACKEND, newer])
    assert state.pod("default", "old") is newer
    assert state.objects == [NS_BACKEND, newer]
    assert state.errors == ["item 2: Pod default/old again (replaces item 0)"]


def test_same_name_in_other_groups_or_namespaces_is_no_duplicate():
    gw_istio = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "g", "namespace": "a"}}
    gw_k8s = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"name": "g", "namespace": "a"}}
    pod_b = {"kind": "Pod", "metadata": {"name": "api", "namespace": "other"}}
    state = ClusterState.from_items([gw_istio, gw_k8s, POD_API, pod_b])
    assert state.errors == []
    assert state.others == [gw_istio, gw_k8s] and len(state.pods) == 2


@pytest.mark.parametrize("status, ips", [
    ({"podIPs": [{"ip": "198.18.0.5"}, {"ip": "fd00::5"}], "podIP": "198.18.0.5"}, ["198.18.0.5", "fd00::5"]),
    ({"podIP": "198.18.0.6"}, ["198.18.0.6"]),                 # older writers: podIP only
    ({"podIPs": [], "podIP": "198.18.0.7"}, ["198.18.0.7"]),
    ({"podIPs": None, "podIP": "198.18.0.8"}, ["198.18.0.8"]),
    ({"podIPs": [{"nope": 1}, "junk", {"ip": ""}], "podIP": "198.18.0.9"}, ["198.18.0.9"]),
    ({"podIPs": [{"ip": "198.18.0.4"}, {"ip": "198.18.0.4"}]}, ["198.18.0.4"]),
    ({}, []),
    ({"podIP": 5}, []),
])
def test_pod_ips(status, ips):
    assert pod_ips({"status": status}) == ips


def test_pod_ips_without_status():
    assert pod_ips({}) == [] and pod_ips({"status": "junk"}) == []


def test_pod_by_ip():
    state = ClusterState.from_items(GOOD)
    assert state.pod_by_ip("198.18.1.2") is POD_API
    assert state.pod_by_ip("fd00:198:18::2") is POD_API
    assert state.pod_by_ip("198.18.2.2") is POD_OLD           # via the podIP fallback
    assert state.pod_by_ip("198.18.9.9") is None


def test_pod_by_ip_ignores_pods_that_do_not_own_their_address():
    host = {"kind": "Pod", "metadata": {"name": "h", "namespace": "kube-system"},
            "spec": {"hostNetwork": True}, "status": {"phase": "Running", "podIP": "198.19.0.1"}}
    done = {"kind": "Pod", "metadata": {"name": "job", "namespace": "a"},
            "status": {"phase": "Succeeded", "podIP": "198.18.1.9"}}
    reuser = {"kind": "Pod", "metadata": {"name": "new", "namespace": "a"},
              "status": {"phase": "Running", "podIP": "198.18.1.9"}}
    state = ClusterState.from_items([host, done, reuser])
    assert state.pod_by_ip("198.19.0.1") is None              # the node's address, shared
    assert state.pod_by_ip("198.18.1.9") is reuser            # not the finished job
    assert state.errors == []


def test_two_live_pods_claiming_one_address_are_recorded():
    a = {"kind": "Pod", "metadata": {"name": "a", "namespace": "x"}, "status": {"podIP": "198.18.1.1"}}
    b = {"kind": "Pod", "metadata": {"name": "b", "namespace": "x"}, "status": {"podIP": "198.18.1.1"}}
    state = ClusterState.from_items([a, b])
    assert state.pod_by_ip("198.18.1.1") is a
    assert state.errors == ["Pod x/b: IP 198.18.1.1 is already Pod x/a's"]


# -- load_state_text ------------------------------------------------------------------

def test_json_list():
    state = load_state_text(as_list(GOOD, rv="42"))
    assert state.resource_version == "42"
    assert state.pod("backend", "api") == POD_API and state.namespace("backend") == NS_BACKEND
    assert state.errors == []


def test_json_single_object_and_typed_list():
    assert load_state_text(json.dumps(POD_API)).pod("backend", "api") == POD_API
    state = load_state_text(json.dumps({"kind": "PodList", "items": [POD_API, POD_OLD]}))
    assert len(state.pods) == 2


def test_json_list_with_null_items_is_empty():
    state = load_state_text('{"kind": "List", "items": null}')
    assert state.objects == [] and state.errors == []


def test_json_list_keeps_bad_items_out():
    state = load_state_text(as_list([NS_BACKEND, 17, {"kind": "Pod", "metadata": {}}]))
    assert list(state.namespaces) == ["backend"]
    assert state.errors == ["item 1: not an object (int)", "item 2: Pod without metadata.name"]


YAML_DOCS = """\
apiVersion: v1
kind: Namespace
metadata:
  name: a
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata:
  name: p
  namespace: a
  creationTimestamp: 2024-01-02T03:04:05Z
status:
  podIP: 198.18.0.9
---
# an empty document is nothing, not an error
"""


def test_yaml_multi_document():
    state = load_state_text(YAML_DOCS)
    assert state.namespace("a")["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    pod = state.pod("a", "p")
    assert state.pod_by_ip("198.18.0.9") is pod
    # Timestamps stay strings, as in the API: the state must remain JSON.
    assert pod["metadata"]["creationTimestamp"] == "2024-01-02T03:04:05Z"
    json.dumps(state.objects)


def test_yaml_list_and_documents_mixed():
    text = ("kind: List\nmetadata: {resourceVersion: '9'}\nitems:\n"
            "- {kind: Namespace, metadata: {name: a}}\n- {kind: Node, metadata: {name: n1}}\n"
            "---\nkind: Pod\nmetadata: {name: p, namespace: a}\n")
    state = load_state_text(text)
    assert state.resource_version == "9"
    assert state.namespace("a") and state.node("n1") and state.pod("a", "p")


@pytest.mark.parametrize("text, message", [
    ("", "state is empty"),
    ("  \n\t", "state is empty"),
    ("kind: [unclosed", r"state is neither JSON \(Expecting value.*\) nor YAML \(while parsing a flow sequence"),
    ('{"kind": "List", "items": [', r"neither JSON \(Expecting value: line 1 column 28"),
    ('{"kind": "List", "items": 5}', "the state: List without an items array"),
    ("[1, 2]", "the state is a list, not a Kubernetes object or List"),
    ("hello", "the state is a str, not a Kubernetes object or List"),
    ('{"metadata": {}}', "the state has no kind"),
    ("kind: Namespace\nmetadata: {name: a}\n---\n- x\n", "document 2 is a list, not"),
    ("kind: Namespace\nmetadata: {name: a}\n---\nfoo: 1\n", "document 2 has no kind"),
])
def test_an_unreadable_document_is_a_specific_error(text, message):
    with pytest.raises(StateError, match=message):
        load_state_text(text)


def test_state_error_is_a_value_error():
    assert issubclass(StateError, ValueError)


# -- parse_state_url --------------------------------------------------------------------

@pytest.mark.parametrize("url, path", [
    ("file:/x/y.json", "/x/y.json"),
    ("file:///x/y.json", "/x/y.json"),
    ("file://localhost/x/y.json", "/x/y.json"),
    ("file:relative/state.json", "relative/state.json"),
])
def test_state_urls(url, path):
    assert parse_state_url(url) == path


@pytest.mark.parametrize("url, message", [
    ("file:", "needs a path"),
    ("file://", "needs a path"),
    ("file://otherhost/x", "cannot name host 'otherhost'"),
    ("kube", "'kube' is the Kubernetes API, not a file"),
    ("kube:", "is the Kubernetes API, not a file"),
    ("http://x", "unsupported state source 'http://x'.*file:PATH, kube or kube:KUBECONFIG"),
    ("/just/a/path", "unsupported state source"),
])
def test_bad_state_urls(url, message):
    with pytest.raises(StateError, match=message):
        parse_state_url(url)


# -- FileStateSource ----------------------------------------------------------------------

class Writer:
    """Replaces the file atomically, as the lab does; every version is a new inode."""

    def __init__(self, path):
        self.path = path
        self.n = 0

    def __call__(self, text):
        self.n += 1
        tmp = f"{self.path}.tmp{self.n}"
        with open(tmp, "w") as fh:
            fh.write(text)
        os.replace(tmp, self.path)


def test_load_missing_file_is_an_empty_cluster(tmp_path):
    state = FileStateSource(str(tmp_path / "nope.json")).load()
    assert state.objects == [] and state.errors == []


def test_load_and_cache(tmp_path):
    path = tmp_path / "state.json"
    write = Writer(path)
    write(as_list(GOOD, rv="1"))
    src = FileStateSource(str(path))
    first = src.load()
    assert first.resource_version == "1" and first.pod("backend", "api") == POD_API
    assert src.load() is first                       # same version: not parsed again
    write(as_list(GOOD[:2], rv="2"))
    second = src.load()
    assert second.resource_version == "2" and len(second.pods) == 1


def test_load_errors_name_the_file(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(b"\xff\xfe not text")
    with pytest.raises(StateError, match=f"{path}: not UTF-8 text"):
        FileStateSource(str(path)).load()
    path.write_text("{ broken")
    with pytest.raises(StateError, match=f"{path}: state is neither JSON"):
        FileStateSource(str(path)).load()
    with pytest.raises(StateError, match="Is a directory"):
        FileStateSource(str(tmp_path)).load()


def run_watch(src, steps, interval=0.01, settle=0.08):
    """Run src.watch while ``steps`` (callables) are applied, settling after each."""
    seen = []

    async def main():
        task = asyncio.ensure_future(src.watch(seen.append, interval=interval))
        await asyncio.sleep(settle)
        for step in steps:
            step()
            await asyncio.sleep(settle)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
    return seen


def test_watch_reports_each_good_version_and_keeps_the_last_good_one(tmp_path, caplog):
    path = tmp_path / "state.json"
    write = Writer(path)
    src = FileStateSource(str(path))
    write(as_list(GOOD[:2], rv="1"))
    with caplog.at_level(logging.ERROR, logger="agent.state.file"):
        seen = run_watch(src, [
            lambda: write("{ broken"),
            lambda: write(as_list(GOOD, rv="2")),
            lambda: write(""),                           # a truncating writer: not an empty cluster
            lambda: write(as_list(GOOD[:1], rv="3")),
        ])
    assert [s.resource_version for s in seen] == ["1", "2", "3"]
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 2                                  # each bad version logged once, not every poll
    assert "neither JSON" in errors[0] and "state is empty" in errors[1]


def test_watch_does_not_repeat_the_version_load_returned(tmp_path):
    path = tmp_path / "state.json"
    write = Writer(path)
    write(as_list(GOOD, rv="1"))
    src = FileStateSource(str(path))
    assert src.load().resource_version == "1"
    seen = run_watch(src, [lambda: write(as_list(GOOD, rv="2"))])
    assert [s.resource_version for s in seen] == ["2"]


def test_watch_reports_a_version_someone_else_loaded_first(tmp_path):
    # The agent reloads the state on each CNI request; the watcher must still
    # report that version, or the agent would never reconcile it.
    path = tmp_path / "state.json"
    write = Writer(path)
    write(as_list(GOOD, rv="1"))
    src = FileStateSource(str(path))
    src.load()

    def write_and_load():
        write(as_list(GOOD, rv="2"))
        assert src.load().resource_version == "2"
    seen = run_watch(src, [write_and_load], interval=0.05)
    assert [s.resource_version for s in seen] == ["2"]


def test_watch_survives_a_vanished_file_and_a_failing_consumer(tmp_path, caplog):
    path = tmp_path / "state.json"
    write = Writer(path)
    write(as_list(GOOD, rv="1"))
    src = FileStateSource(str(path))
    seen = []

    def consumer(state):
        seen.append(state.resource_version)
        if state.resource_version == "1":
            raise RuntimeError("consumer bug")

    async def main():
        task = asyncio.ensure_future(src.watch(consumer, interval=0.01))
        await asyncio.sleep(0.08)
        os.unlink(path)
        await asyncio.sleep(0.08)
        write(as_list(GOOD, rv="2"))
        await asyncio.sleep(0.08)
        task.cancel()
    with caplog.at_level(logging.WARNING, logger="agent.state.file"):
        asyncio.run(main())
    assert seen == ["1", "2"]                                # no empty cluster in between
    messages = [r.getMessage() for r in caplog.records]
    assert sum("vanished; keeping" in m for m in messages) == 1
    assert any("applying cluster state" in m for m in messages)


def test_watch_logs_skipped_items_once_per_version(tmp_path, caplog):
    path = tmp_path / "state.json"
    write = Writer(path)
    write(as_list([NS_BACKEND, "junk"], rv="1"))
    src = FileStateSource(str(path))
    with caplog.at_level(logging.WARNING, logger="agent.state.file"):
        seen = run_watch(src, [])
    assert [s.errors for s in seen] == [["item 1: not an object (str)"]]
    assert sum("skipped item 1" in r.getMessage() for r in caplog.records) == 1
