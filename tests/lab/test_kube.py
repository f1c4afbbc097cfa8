"""The node agents on the Kubernetes API: real pods, real eBPF, HBONE, and a
stand-in API server (lab/kubeapi) speaking the real list/watch protocol to
the official client in the agents (``--state kube:KUBECONFIG``).

The lab plays kubelet and container runtime and its state file is copied
into the API server (``KubeMirror``); label changes are made in the API, as
``kubectl label`` would. The API server listens on the lab's underlay (the
agents run in their nodes' network namespaces, where the host's loopback is
not reachable).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from agent.netns import NetnsSwitcher, open_netns
from lab import model, sysops
from lab.kubeapi.server import KubeApiServer
from lab.lab import Lab
from tests.lab.conftest import agent_pod, connect, counters, unique_name, wait_for
from tests.lab.kube_mirror import KubeMirror
from tests.lab.test_observe import fetch

REDIRECTION = "ambient.istio.io/redirection"

BASE = """
apiVersion: v1
kind: Namespace
metadata:
  name: mesh
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: plain}
spec: {nodeName: node1, serviceAccountName: plain-client}
---
apiVersion: v1
kind: Pod
metadata: {name: other, namespace: plain}
spec: {nodeName: node2}
"""

MESH_PODS = """
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mesh}
spec: {nodeName: node1, serviceAccountName: client}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mesh}
spec: {nodeName: node2, serviceAccountName: server}
---
apiVersion: v1
kind: Pod
metadata: {name: shortlived, namespace: mesh}
spec: {nodeName: node1}
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kubeconfig = str(tmp_path_factory.mktemp("kube") / "kubeconfig")
    lab = Lab(unique_name("kube"), pod_timeout=20.0, start_agents=False,
              agent_args=["--state", f"kube:{kubeconfig}", "--reconcile-seconds", "0.5"])
    api = KubeApiServer(bookmark_interval=0.5)
    switcher = NetnsSwitcher()
    mirror = None
    try:
        lab.up(BASE)               # nodes and pods outside the mesh: no agent needed yet
        lab.start_ca()
        # The API server's socket is made in the underlay's namespace, on the CA's address.
        api._host = lab.ca_address.rpartition(":")[0]
        fd = open_netns(sysops.netns_path(model.wire_netns(lab.name)))
        try:
            switcher.run(fd, api.start)
        finally:
            os.close(fd)
        api.kubeconfig(kubeconfig)
        mirror = KubeMirror(lab.state_path, api).__enter__()
        for node in lab.nodes:
            lab.start_agent(node)
        lab.start_agents = True
        lab.apply(MESH_PODS)
        yield lab, api, mirror
    finally:
        if mirror is not None:
            mirror.__exit__(None, None, None)
        lab.down()
        api.stop()
        switcher.close()


def annotation(api, ns, name):
    pod = api.get("Pod", ns, name)
    return ((pod or {}).get("metadata") or {}).get("annotations", {}).get(REDIRECTION)


def enrolled(lab, node, pod):
    status = lab.agent_request(node, {"op": "status"})
    return any(f"{p['namespace']}/{p['name']}" == pod and p["enrolled"] for p in status["pods"])


@pytest.fixture
def echo(cluster, servers):
    lab, _, _ = cluster
    srv = servers(lab)
    srv.serve("mesh/server", 7171, "meshed")
    return lab.pod_ip("mesh/server")


def meshed(lab, pod, ip):
    before = counters(lab, "node1", pod, "outbound")["connections"]
    ok, banner = connect(lab, pod, ip, 7171, "via-kube")
    assert ok, banner
    assert counters(lab, "node1", pod, "outbound")["connections"] == before + 1
    return banner


def test_agents_follow_the_api_and_mark_the_pods_they_capture(cluster, echo):
    lab, api, mirror = cluster
    assert enrolled(lab, "node1", "mesh/client") and enrolled(lab, "node2", "mesh/server")
    wait_for(lambda: annotation(api, "mesh", "client") == "enabled", what="annotation on mesh/client")
    wait_for(lambda: annotation(api, "mesh", "server") == "enabled", what="annotation on mesh/server")
    assert annotation(api, "plain", "client") is None
    meshed(lab, "mesh/client", echo)
    # The agents list and then watch; nothing is polled.
    assert api.requests_matching("/api/v1/pods", watch=True)
    assert mirror.errors == []
    # /config_dump names the source and its per-kind sync state.
    dump = json.loads(fetch(lab, "node1", "http://127.0.0.1:15000/config_dump")[1])
    src = dump["state_source"]
    assert src["url"].startswith("kube:") and src["synced"] is True
    assert src["sync"]["synced"] is True


def test_namespace_label_in_the_api_enrols_a_running_pod_then_releases_it(cluster, echo):
    lab, api, _ = cluster
    api.patch("Namespace", "", "plain", {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    try:
        wait_for(lambda: enrolled(lab, "node1", "plain/client"), what="plain/client captured")
        wait_for(lambda: annotation(api, "plain", "client") == "enabled", what="annotation set")
        assert agent_pod(lab, "node1", "plain/client")["identity"] == \
            "spiffe://cluster.local/ns/plain/sa/plain-client"
        meshed(lab, "plain/client", echo)
    finally:
        api.patch("Namespace", "", "plain", {"metadata": {"labels": {"istio.io/dataplane-mode": None}}})
    wait_for(lambda: not enrolled(lab, "node1", "plain/client"), what="plain/client released")
    wait_for(lambda: annotation(api, "plain", "client") is None, what="annotation removed")


def test_watch_drop_and_410_relist_lose_no_change(cluster, echo):
    lab, api, _ = cluster
    lists_before = len(api.requests_matching("/api/v1/pods", watch=False))
    api.compact()                       # every version the agents hold is now too old
    api.drop_watches(abrupt=True)
    # A change made while the watches are down: only a relist can deliver it.
    api.patch("Pod", "plain", "client", {"metadata": {"labels": {"istio.io/dataplane-mode": "ambient"}}})
    try:
        wait_for(lambda: enrolled(lab, "node1", "plain/client"), what="change seen after relist")
        assert len(api.requests_matching("/api/v1/pods", watch=False)) >= lists_before + 2  # both agents
        meshed(lab, "plain/client", echo)
    finally:
        api.patch("Pod", "plain", "client", {"metadata": {"labels": {"istio.io/dataplane-mode": None}}})
    wait_for(lambda: not enrolled(lab, "node1", "plain/client"), what="release after the relist")


def test_deleted_pod_is_forgotten(cluster):
    lab, api, _ = cluster
    assert enrolled(lab, "node1", "mesh/shortlived")
    lab.delete_pod("mesh", "shortlived")
    wait_for(lambda: api.get("Pod", "mesh", "shortlived") is None, what="pod gone from the API")
    status = lab.agent_request("node1", {"op": "status"})
    assert "mesh/shortlived" not in {f"{p['namespace']}/{p['name']}" for p in status["pods"]}


def test_capture_lost_with_the_node_state_is_restored_and_the_mark_stays_true(cluster, echo):
    lab, api, _ = cluster
    lab.stop_agent("node1")
    done = subprocess.run([sys.executable, "-m", "agent.cli", "capture", "teardown",
                           "--pin-dir", lab.pin_dir("node1")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(lab.node_dir("node1") / "pods")
    # The mark now lies: the pod is annotated but nothing captures it.
    assert annotation(api, "mesh", "client") == "enabled"
    lab.start_agent("node1")
    wait_for(lambda: enrolled(lab, "node1", "mesh/client"), what="mesh/client captured again")
    assert annotation(api, "mesh", "client") == "enabled"
    meshed(lab, "mesh/client", echo)
