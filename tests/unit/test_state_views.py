"""The typed cluster model: Pod, Namespace, Service views and their derived facts.

The regression this file exists for (issue 13): a pod's SPIFFE identity was
derived in four places that disagreed. ``identity_of_pod`` and the daemon's
capture read only ``serviceAccountName``; routing and ``policy explain`` fell
back to the deprecated ``serviceAccount``. A pod with only ``serviceAccount``
got a certificate for ``sa/default`` while its clients expected ``sa/X``.
Now there is one rule (``agent.identity.spiffe.service_account_of``), read by
the typed ``Pod``, and every consumer is checked against it here.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent.ca.authn import Caller
from agent.ca.rules import authorise
from agent.enrol import rule
from agent.identity.spiffe import IdentityError, WorkloadIdentity, identity_of_pod, service_account_of
from agent.observe.metrics import labels_for, workload_info, workload_owner
from agent.proxy import hbone
from agent.proxy.route import resolve
from agent.state import model
from agent.state.model import ClusterState, Namespace, Pod, Service

REPO = Path(__file__).resolve().parents[2]
TD = "cluster.local"
MESH = {"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"istio.io/dataplane-mode": "ambient"}}}


def pod(name="api", ip="198.18.7.10", namespace="shop", node="node1", phase="Running", **spec) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "labels": {"app": name}},
            "spec": {"nodeName": node, **spec},
            "status": {"phase": phase, "podIP": ip, "podIPs": [{"ip": ip}]}}


# -- one rule for the identity ------------------------------------------------------

# (spec fields, the service account Kubernetes runs the pod as)
ACCOUNTS = [
    pytest.param({"serviceAccountName": "checkout"}, "checkout", id="serviceAccountName"),
    pytest.param({"serviceAccount": "legacy"}, "legacy", id="only-the-deprecated-serviceAccount"),
    pytest.param({"serviceAccountName": "new", "serviceAccount": "old"}, "new", id="serviceAccountName-wins"),
    pytest.param({}, "default", id="neither-is-default"),
    pytest.param({"serviceAccountName": "", "serviceAccount": "legacy"}, "legacy", id="empty-name-falls-back"),
    pytest.param({"serviceAccountName": 7}, "default", id="not-a-string-reads-as-absent"),
]


@pytest.mark.parametrize("spec, account", ACCOUNTS)
def test_every_consumer_derives_the_same_identity(spec, account):
    expected = f"spiffe://{TD}/ns/shop/sa/{account}"
    raw = pod(**spec)
    state = ClusterState.from_items([MESH, raw])
    view = state.pod_view("shop", "api")
    assert service_account_of(raw["spec"]) == account
    assert view.service_account == account
    # the model's value type, the identity package's wire-object helper
    assert view.identity(TD) == WorkloadIdentity(TD, "shop", account)
    assert str(view.identity(TD)) == expected
    assert identity_of_pod(raw, TD).uri == expected
    # what a client expects when it connects to the pod over HBONE
    route = resolve(state, "198.18.7.10", 8080, TD)
    assert (route.kind, route.identity) == ("hbone", expected)
    assert route.pod is view                   # the state's view, not one built per connection
    # what the CA lets the pod's node agent have signed
    assert authorise(Caller(node="node1", principal="test"), expected, state, TD) == view.identity(TD)


def test_the_ca_refuses_the_old_wrong_identity_for_a_legacy_pod():
    """The bug, from the CA's side: the agent used to ask for sa/default for this pod."""
    state = ClusterState.from_items([MESH, pod(serviceAccount="legacy")])
    with pytest.raises(Exception, match="default"):
        authorise(Caller(node="node1", principal="test"), f"spiffe://{TD}/ns/shop/sa/default", state, TD)


def test_policy_explain_uses_the_same_identity(tmp_path):
    """``policy explain`` (a process) sends the legacy pod's identity: only sa/legacy is allowed."""
    allow = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "only-legacy", "namespace": "shop"},
             "spec": {"selector": {"matchLabels": {"app": "api"}},
                      "rules": [{"from": [{"source": {"principals": [f"{TD}/ns/shop/sa/legacy"]}}]}]}}
    items = [MESH, pod(), pod("web", "198.18.7.11", serviceAccount="legacy"), allow]
    path = tmp_path / "state.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
    result = subprocess.run([sys.executable, "-m", "agent.cli", "policy", "explain", "--state", f"file:{path}",
                             "--from", "shop/web", "--to", "shop/api:8080"],
                            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALLOWED" in result.stdout and "only-legacy" in result.stdout


def test_an_invalid_account_name_is_refused_by_the_value_type_but_still_routed():
    state = ClusterState.from_items([MESH, pod(serviceAccountName="Not_Valid")])
    view = state.pod_view("shop", "api")
    with pytest.raises(IdentityError, match="shop/api"):
        view.identity(TD)
    with pytest.raises(IdentityError):
        identity_of_pod(view.raw, TD)
    # No CA signs it, so the HBONE check against this URI fails, as it always did.
    assert resolve(state, "198.18.7.10", 8080, TD).identity == f"spiffe://{TD}/ns/shop/sa/Not_Valid"


def _string_constants(path: Path) -> set[str]:
    return {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)
            and isinstance(n.value, str)}


def _readers_of_the_account_fields() -> list[str]:
    out = []
    for path in sorted((REPO / "agent").rglob("*.py")):
        rel = str(path.relative_to(REPO))
        if rel == "agent/identity/spiffe.py" or rel.startswith("lab/"):
            continue       # the rule itself; the lab writes pods (it plays the API server)
        if {"serviceAccountName", "serviceAccount"} & _string_constants(path):
            out.append(rel)
    return out


def test_nothing_but_the_rule_reads_the_service_account_fields():
    readers = [r for r in _readers_of_the_account_fields() if r != "agent/ca/kubeauth.py"]
    assert readers == [], "use Pod.service_account / service_account_of, the one rule"


def test_the_ca_token_check_uses_the_rule_too():
    assert "agent/ca/kubeauth.py" not in _readers_of_the_account_fields()


# -- Pod ------------------------------------------------------------------------------

def test_pod_view_facts():
    raw = pod(serviceAccountName="api")
    raw["status"]["podIPs"].append({"ip": "fd00:198:18::7"})
    raw["metadata"]["annotations"] = {"a": "b"}
    view = Pod.from_dict(raw)
    assert (view.namespace, view.name, view.uid, view.node_name, view.phase) == \
        ("shop", "api", "uid-api", "node1", "Running")
    assert view.ips == ("198.18.7.10", "fd00:198:18::7") and view.key == ("shop", "api")
    assert view.ready and not view.terminated and not view.host_network
    assert dict(view.labels) == {"app": "api"} and dict(view.annotations) == {"a": "b"}
    assert view.raw is raw


def test_views_are_immutable():
    view = Pod.from_dict(pod())
    with pytest.raises(AttributeError):
        view.name = "other"          # type: ignore[misc]
    svc = Service.from_dict({"kind": "Service", "metadata": {"name": "s"}})
    with pytest.raises(dataclasses.FrozenInstanceError):
        svc.name = "other"           # type: ignore[misc]


@pytest.mark.parametrize("raw, facts", [
    pytest.param({"kind": "Pod", "metadata": {"name": "p"}}, ("default", (), "", "", False), id="bare"),
    pytest.param({"kind": "Pod", "metadata": {"name": "p"}, "spec": "x", "status": ["y"]},
                 ("default", (), "", "", False), id="wrong-types-read-as-absent"),
    pytest.param({"kind": "Pod", "metadata": {"name": "p", "namespace": "n"}, "spec": {"hostNetwork": True},
                  "status": {"phase": "Failed", "podIP": "198.18.7.12"}},
                 ("n", ("198.18.7.12",), "Failed", "", True), id="hostnetwork-failed"),
])
def test_pod_view_tolerates_odd_objects(raw, facts):
    view = Pod.from_dict(raw)
    assert (view.namespace, view.ips, view.phase, view.node_name, view.host_network) == facts
    assert view.service_account == "default"


def test_views_are_built_once_per_state():
    state = ClusterState.from_items([MESH, pod(), pod("web", "198.18.7.11", node="node2")])
    api = state.pod_view("shop", "api")
    assert state.pod_view_by_ip("198.18.7.10") is api
    assert state.pod_views_on_node("node1") == [api]
    assert state.pods_on_node("node1") == [api.raw]          # the wire face agrees
    assert state.pod_by_ip("198.18.7.10") is api.raw
    assert api.identity(TD) is api.identity(TD)               # derived once
    assert state.pod_views[("shop", "api")] is api and list(state.pod_views) == list(state.pods)
    assert isinstance(state.namespace_view("shop"), Namespace)
    assert state.namespace_view("shop").labels["istio.io/dataplane-mode"] == "ambient"


def test_terminated_and_host_network_pods_own_no_address():
    state = ClusterState.from_items([pod("done", "198.18.7.20", phase="Succeeded"),
                                     pod("host", "198.18.7.21", hostNetwork=True)])
    assert state.pod_view_by_ip("198.18.7.20") is None and state.pod_view_by_ip("198.18.7.21") is None
    assert state.pod_view("shop", "done").terminated and state.pod_view("shop", "host").host_network


# -- workload names and metadata (moved from observe/metrics and proxy/hbone) ---------------

OWNED = [
    ({"ownerReferences": [{"kind": "ReplicaSet", "name": "api-7c9d8f6b5", "controller": True}]},
     {"pod-template-hash": "7c9d8f6b5"}, ("Deployment", "api")),
    ({"ownerReferences": [{"kind": "ReplicaSet", "name": "api-7c9d8"}]}, {}, ("Deployment", "api")),
    ({"ownerReferences": [{"kind": "Job", "name": "backup-28391040"}]}, {}, ("CronJob", "backup")),
    ({"ownerReferences": [{"kind": "StatefulSet", "name": "db"}]}, {}, ("StatefulSet", "db")),
    ({}, {"service.istio.io/workload-name": "named"}, ("Pod", "named")),
    ({}, {}, ("Pod", "api")),
]


@pytest.mark.parametrize("meta, labels, owner", OWNED)
def test_workload_owner_and_info(meta, labels, owner):
    raw = pod()
    raw["metadata"].update(meta)
    raw["metadata"]["labels"] = {**labels, "app": "shop-api", "version": "v2"}
    view = Pod.from_dict(raw)
    assert view.workload_owner == owner == workload_owner(raw) == workload_owner(view)
    info = view.workload_info()
    assert info == workload_info(raw) == {"namespace": "shop", "workload_name": owner[1],
                                          "workload_kind": owner[0].lower(), "canonical_service": "shop-api",
                                          "canonical_revision": "v2"}
    # Baggage names the pod itself; proxy/hbone's copy (kept for its callers) agrees.
    assert view.workload_metadata() == hbone.workload_metadata(raw) == {
        "namespace": "shop", "workload_name": "api", "workload_kind": "pod",
        "canonical_service": "shop-api", "canonical_revision": "v2"}


def test_labels_for_take_views_and_wire_objects_alike():
    raw = pod()
    args = ("destination", None, None)
    assert labels_for(*args, Pod.from_dict(raw), "x", None, True) == labels_for(*args, raw, "x", None, True)
    assert workload_info(None) == {} and workload_owner(None) == ("Pod", "")


# -- Service and EndpointSlices --------------------------------------------------------

def test_service_view():
    raw = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
           "spec": {"clusterIP": "198.19.0.10", "clusterIPs": ["198.19.0.10", "fd00:198:19::10"],
                    "selector": {"app": "api"},
                    "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "name": "tcp-dns"}, "junk"]}}
    svc = Service.from_dict(raw)
    assert svc.cluster_ips == ("198.19.0.10", "fd00:198:19::10") and svc.key == ("shop", "api")
    assert svc.tcp_port(53) == {"port": 53, "name": "tcp-dns"} and svc.tcp_port(80) is None
    assert dict(svc.selector) == {"app": "api"} and len(svc.ports) == 2


def test_endpoint_slices_are_indexed_by_service():
    def eps(name, service, ns=None, group="discovery.k8s.io/v1"):
        meta = {"name": name, "labels": {"kubernetes.io/service-name": service}}
        if ns:
            meta["namespace"] = ns
        return {"apiVersion": group, "kind": "EndpointSlice", "metadata": meta, "addressType": "IPv4"}
    a, b = eps("api-1", "api", "shop"), eps("api-2", "api", "shop")
    other_ns, no_ns, wrong_group = eps("api-x", "api", "other"), eps("d", "api"), eps("g", "api", "shop", "x.io/v1")
    state = ClusterState.from_items([a, other_ns, b, no_ns, wrong_group])
    assert state.endpoint_slices_of("shop", "api") == [a, b]
    assert state.endpoint_slices_of("default", "api") == [no_ns]
    assert state.endpoint_slices_of("shop", "nope") == []


def test_the_default_namespace_agrees_with_the_cni_rule():
    # agent/enrol/rule.py keeps its own copy: the CNI plugin must not import the model.
    assert model.DEFAULT_NAMESPACE == rule.DEFAULT_NAMESPACE


def test_service_by_cluster_ip_first_service_wins():
    def svc(name, *ips):
        return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "shop"},
                "spec": {"clusterIP": ips[0], "clusterIPs": list(ips)}}
    state = ClusterState.from_items([svc("a", "198.19.0.1", "fd00:198:19::1"), svc("b", "198.19.0.1")])
    assert state.service_view_by_ip("198.19.0.1").name == "a"
    assert state.service_view_by_ip("fd00:198:19::1") is state.service_view("shop", "a")
    assert state.service_view_by_ip("198.19.0.2") is None


def test_ready_pods_a_selector_picks_are_sorted_and_made_once_per_state():
    selector_svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop"},
                    "spec": {"selector": {"app": "api"}}}
    bare_svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bare", "namespace": "shop"},
                "spec": {}}
    pods = [pod("b", "198.18.7.2"), pod("a", "198.18.7.1"), pod("c", "198.18.7.3", phase="Pending"),
            pod("d", "198.18.7.4", namespace="other")]
    for p in pods:
        p["metadata"]["labels"] = {"app": "api"}
    del pods[0]["status"]["podIP"], pods[0]["status"]["podIPs"]          # b: no address yet
    extra = pod("e", "198.18.7.5")
    extra["metadata"]["labels"] = {"app": "api", "tier": "x"}
    state = ClusterState.from_items([*pods, extra, selector_svc, bare_svc])
    svc, bare = state.service_view("shop", "api"), state.service_view("shop", "bare")
    chosen = state.ready_pods_selected_by(svc)
    assert [p.name for p in chosen] == ["a", "e"]                 # ready, same namespace, by name
    assert state.ready_pods_selected_by(svc) is chosen            # made once per state
    assert state.ready_pods_selected_by(bare) == []               # no selector selects nothing
    assert [p.name for p in state.pod_views_in_namespace("shop")] == ["a", "b", "c", "e"]
