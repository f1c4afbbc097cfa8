"""Pure parts of the kube state source: trimming, backoff, source URLs."""

import copy

import pytest

from agent.state.kube import LAST_APPLIED, Backoff, trim_object
from agent.state.model import StateError
from agent.state.source import open_state_source, parse_source_url
from agent.state.file import FileStateSource

POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                 "annotations": {LAST_APPLIED: "{}", "ambient.istio.io/redirection": "enabled"},
                 "managedFields": [{"manager": "kubelet"}], "uid": "u1", "resourceVersion": "7"},
    "spec": {"nodeName": "node-a", "hostNetwork": False, "serviceAccountName": "web",
             "volumes": [{"name": "v"}], "tolerations": [{}],
             "containers": [{"name": "app", "image": "i", "env": [{"name": "A", "value": "b"}],
                             "ports": [{"name": "http", "containerPort": 8080}],
                             "resources": {"limits": {"cpu": "1"}}}],
             "initContainers": [{"name": "sidecar", "restartPolicy": "Always", "command": ["x"]}]},
    "status": {"phase": "Running", "podIP": "10.0.0.1", "podIPs": [{"ip": "10.0.0.1"}],
               "hostIP": "172.18.0.2", "conditions": [{"type": "Ready", "status": "True"}],
               "containerStatuses": [{"name": "app"}], "qosClass": "Burstable", "startTime": "t"},
}


def test_trim_pod_keeps_what_consumers_read():
    original = copy.deepcopy(POD)
    out = trim_object(POD)
    assert POD == original, "trim_object must not change its input"
    assert out["metadata"] == {"name": "web-0", "namespace": "shop", "labels": {"app": "web"},
                               "annotations": {"ambient.istio.io/redirection": "enabled"},
                               "uid": "u1", "resourceVersion": "7"}
    assert out["spec"] == {"nodeName": "node-a", "hostNetwork": False, "serviceAccountName": "web",
                           "containers": [{"name": "app",
                                           "ports": [{"name": "http", "containerPort": 8080}]}],
                           "initContainers": [{"name": "sidecar", "restartPolicy": "Always"}]}
    assert out["status"] == {k: POD["status"][k] for k in ("phase", "podIP", "podIPs", "hostIP",
                                                          "conditions")}


@pytest.mark.parametrize("obj, expected", [
    ({"kind": "Node", "metadata": {"name": "n", "managedFields": []},
      "status": {"addresses": [{"address": "1.2.3.4"}], "images": [{"names": ["x"]}], "conditions": []}},
     {"kind": "Node", "metadata": {"name": "n"},
      "status": {"addresses": [{"address": "1.2.3.4"}], "conditions": []}}),
    # Other kinds keep spec and status; only metadata noise goes.
    ({"kind": "Service", "metadata": {"name": "s", "annotations": {LAST_APPLIED: "{}"}},
      "spec": {"clusterIP": "10.96.0.1"}, "status": {"loadBalancer": {}}},
     {"kind": "Service", "metadata": {"name": "s", "annotations": {}},
      "spec": {"clusterIP": "10.96.0.1"}, "status": {"loadBalancer": {}}}),
    # Malformed shapes pass through for ClusterState to judge.
    ({"kind": "Pod", "metadata": "nope", "spec": [], "status": None},
     {"kind": "Pod", "metadata": "nope", "spec": [], "status": None}),
    ({"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": ["odd"]}},
     {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": ["odd"]}}),
])
def test_trim_other_shapes(obj, expected):
    assert trim_object(obj) == expected


def test_backoff_doubles_with_jitter_up_to_the_cap():
    top = Backoff(0.2, 30.0, rand=lambda: 1.0)
    assert [round(top.next(), 3) for _ in range(10)] == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0]
    low = Backoff(0.2, 30.0, rand=lambda: 0.0)
    assert [round(low.next(), 3) for _ in range(3)] == [0.1, 0.2, 0.4]
    low.reset()
    assert round(low.next(), 3) == 0.1


@pytest.mark.parametrize("url, expected", [
    ("kube", ("kube", None)),
    ("kube:", ("kube", None)),
    ("kube:/etc/kubeconfig", ("kube", "/etc/kubeconfig")),
    ("kube:relative/config", ("kube", "relative/config")),
    ("file:/run/state.json", ("file", "/run/state.json")),
    ("file:///run/state.json", ("file", "/run/state.json")),
])
def test_source_urls(url, expected):
    assert parse_source_url(url) == expected


@pytest.mark.parametrize("url, message", [
    ("kube://host/x", "a path, not a URL"),
    ("http://x", "expected file:PATH, kube or kube:KUBECONFIG"),
    ("file:", "needs a path"),
])
def test_bad_source_urls(url, message):
    with pytest.raises(StateError, match=message):
        parse_source_url(url)


def test_open_file_source(tmp_path):
    assert isinstance(open_state_source(f"file:{tmp_path}/s.json", watch_timeout=3), FileStateSource)


def test_kube_source_with_a_missing_kubeconfig_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(StateError, match=f"kubeconfig {tmp_path}/nope does not exist"):
        open_state_source(f"kube:{tmp_path}/nope")
    bad = tmp_path / "bad"
    bad.write_text("clusters: [")
    with pytest.raises(StateError, match="cannot load the client configuration"):
        open_state_source(f"kube:{bad}")
