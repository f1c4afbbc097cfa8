"""HBONE's pure decisions: authority parsing, request checks, headers, routes."""

import pytest

from agent.proxy import hbone
from agent.proxy.route import resolve
from agent.state.model import ClusterState

POD_IPS = ["198.18.1.5", "fd00:198:18::5"]


@pytest.mark.parametrize("headers, expected", [
    ([(":method", "CONNECT"), (":authority", "198.18.1.5:8080")], hbone.ConnectTarget("198.18.1.5", 8080)),
    ([(b":method", b"CONNECT"), (b":authority", b"[fd00:198:18::5]:443")], hbone.ConnectTarget("fd00:198:18::5", 443)),
    ([(":method", "GET"), (":authority", "198.18.1.5:8080")], hbone.Refusal(400, "method GET is not CONNECT")),
    ([(":authority", "198.18.1.5:8080")], hbone.Refusal(400, "method (none) is not CONNECT")),
    ([(":method", "CONNECT"), (":authority", "198.18.1.6:8080")],
     hbone.Refusal(400, "authority 198.18.1.6 is not an address of this pod")),
    ([(":method", "CONNECT"), (":authority", "api.backend:8080")],
     hbone.Refusal(400, "authority 'api.backend:8080' does not name an IP address")),
    ([(":method", "CONNECT"), (":authority", "198.18.1.5")], hbone.Refusal(400, "authority '198.18.1.5' has no port")),
    ([(":method", "CONNECT"), (":authority", "198.18.1.5:0")], hbone.Refusal(400, "authority '198.18.1.5:0' has an invalid port")),
    ([(":method", "CONNECT"), (":authority", "198.18.1.5:70000")], hbone.Refusal(400, "authority '198.18.1.5:70000' has an invalid port")),
    ([(":method", "CONNECT"), (":authority", "[fd00:198:18::5:443")], hbone.Refusal(400, "authority '[fd00:198:18::5:443' is not [ip]:port")),
    ([(":method", "CONNECT"), (":authority", "198.18.1.5:15008")], hbone.Refusal(400, "port 15008 belongs to the mesh agent")),
    ([(":method", "CONNECT"), (":authority", "198.18.1.5:15001")], hbone.Refusal(400, "port 15001 belongs to the mesh agent")),
])
def test_check_connect(headers, expected):
    assert hbone.check_connect(headers, POD_IPS) == expected


def test_connect_request_headers_carry_forwarded_baggage_and_traceparent():
    workload = hbone.workload_metadata({"metadata": {"name": "web-1", "namespace": "frontend",
                                                      "labels": {"app": "web", "version": "v2"}}})
    headers = dict(hbone.connect_request_headers(hbone.ConnectTarget("198.18.1.5", 8080),
                                                 ("198.18.0.2", 40000), workload))
    assert headers[":method"] == "CONNECT" and headers[":authority"] == "198.18.1.5:8080"
    assert headers["forwarded"] == 'for="198.18.0.2:40000"'
    assert headers["baggage"] == ("k8s.cluster.name=Kubernetes,k8s.namespace.name=frontend,"
                                  "k8s.pod.name=web-1,service.name=web,service.version=v2")
    version, trace, span, flags = headers["traceparent"].split("-")
    assert (version, len(trace), len(span), flags) == ("00", 32, 16, "01")
    v6 = dict(hbone.connect_request_headers(hbone.ConnectTarget("fd00:198:18::5", 80), ("fd00:198:18::2", 1), None))
    assert v6[":authority"] == "[fd00:198:18::5]:80" and "baggage" not in v6


@pytest.mark.parametrize("labels, service, revision", [
    ({"service.istio.io/canonical-name": "c", "app.kubernetes.io/name": "k", "app": "a"}, "c", "latest"),
    ({"app.kubernetes.io/name": "k", "app": "a", "app.kubernetes.io/version": "1"}, "k", "1"),
    ({"app": "a", "version": "v3"}, "a", "v3"),
    ({"service.istio.io/canonical-revision": "r"}, "pod-x", "r"),
    ({}, "pod-x", "latest"),
])
def test_canonical_service_follows_istio_label_order(labels, service, revision):
    meta = hbone.workload_metadata({"metadata": {"name": "pod-x", "namespace": "n", "labels": labels}})
    assert (meta["canonical_service"], meta["canonical_revision"]) == (service, revision)


def state():
    return ClusterState.from_items([
        {"kind": "Namespace", "metadata": {"name": "mesh", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"kind": "Namespace", "metadata": {"name": "plain"}},
        {"kind": "Pod", "metadata": {"name": "api", "namespace": "mesh", "labels": {"app": "api"}},
         "spec": {"serviceAccountName": "api-sa", "containers": [{"ports": [{"name": "http", "containerPort": 8080}]}]},
         "status": {"phase": "Running", "podIPs": [{"ip": "198.18.1.5"}]}},
        {"kind": "Pod", "metadata": {"name": "legacy", "namespace": "plain", "labels": {"app": "legacy"}},
         "spec": {}, "status": {"phase": "Running", "podIPs": [{"ip": "198.18.1.6"}]}},
        {"kind": "Pod", "metadata": {"name": "pending", "namespace": "mesh", "labels": {"app": "idle"}},
         "spec": {}, "status": {"phase": "Pending"}},
        {"kind": "Service", "metadata": {"name": "api", "namespace": "mesh"},
         "spec": {"clusterIP": "198.19.128.10", "selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": "http"}]}},
        {"kind": "Service", "metadata": {"name": "legacy", "namespace": "plain"},
         "spec": {"clusterIP": "198.19.128.11", "selector": {"app": "legacy"}, "ports": [{"port": 80, "targetPort": 9090}]}},
        {"kind": "Service", "metadata": {"name": "idle", "namespace": "mesh"},
         "spec": {"clusterIP": "198.19.128.12", "selector": {"app": "idle"}, "ports": [{"port": 80}]}},
    ])


@pytest.mark.parametrize("ip, port, kind, target, identity", [
    ("198.18.1.5", 8080, "hbone", ("198.18.1.5", 8080), "spiffe://cluster.local/ns/mesh/sa/api-sa"),
    ("198.18.1.6", 9090, "passthrough", ("198.18.1.6", 9090), ""),
    ("198.19.128.10", 80, "hbone", ("198.18.1.5", 8080), "spiffe://cluster.local/ns/mesh/sa/api-sa"),
    ("198.19.128.11", 80, "passthrough", ("198.18.1.6", 9090), ""),
    ("198.19.128.10", 81, "no-endpoint", ("198.19.128.10", 81), ""),
    ("198.19.128.12", 80, "no-endpoint", ("198.19.128.12", 80), ""),
    ("203.0.113.7", 443, "passthrough", ("203.0.113.7", 443), ""),
])
def test_routes(ip, port, kind, target, identity):
    route = resolve(state(), ip, port, "cluster.local")
    assert (route.kind, (route.ip, route.port), route.identity) == (kind, target, identity)
