"""Routing a Service's cluster IP through its EndpointSlices (discovery.k8s.io/v1).

Every case is a base cluster plus a few extra objects (slices, services),
one connection, and the route it must take. A case with a single possible
endpoint must route the same way whatever the per-connection salt.
"""

import pytest

from agent.proxy.route import resolve
from agent.state.model import ClusterState
from tests import builders

TD = "cluster.local"
API_ID = "spiffe://cluster.local/ns/mesh/sa/api-sa"
CANARY_ID = "spiffe://cluster.local/ns/mesh/sa/canary-sa"

SVC_V4 = "198.19.128.10"
SVC_V6 = "fd00:198:18:ffff::10"


def pod(name, ns, ips, sa="default", labels=None, phase="Running"):
    return builders.pod(name, ns, ips=ips, sa=sa, labels=labels or {}, phase=phase,
                        containers=[{"ports": [{"name": "http", "containerPort": 8080}]}])


def service(name, ports, ns="mesh", ips=(SVC_V4,), selector=None):
    spec = {"clusterIP": ips[0], "clusterIPs": list(ips), "ports": ports}
    if selector:
        spec["selector"] = selector
    return {"kind": "Service", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def eps(name, svc, endpoints, ports, ns="mesh", family="IPv4", group="discovery.k8s.io/v1"):
    return {"apiVersion": group, "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
            "addressType": family, "endpoints": endpoints, "ports": ports}


def ep(address, ready=True, ref=None, node="node-a"):
    """An endpoint; ``ready=None`` leaves the condition out, ``ref`` is ns/name of a Pod."""
    endpoint = {"addresses": [address], "conditions": {} if ready is None else {"ready": ready},
                "nodeName": node}
    if ref:
        ns, name = ref.split("/")
        endpoint["targetRef"] = {"kind": "Pod", "namespace": ns, "name": name}
    return endpoint


HTTP = [{"name": "http", "port": 80, "targetPort": "http"}]
HTTP_EP = [{"name": "http", "port": 8080, "protocol": "TCP"}]


def cluster(*extra):
    return ClusterState.from_items([
        {"kind": "Namespace", "metadata": {"name": "mesh", "labels": {"istio.io/dataplane-mode": "ambient"}}},
        {"kind": "Namespace", "metadata": {"name": "plain"}},
        pod("api-1", "mesh", ["198.18.1.5", "fd00:198:18::5"], "api-sa", {"app": "api"}),
        pod("canary-1", "mesh", ["198.18.1.7"], "canary-sa", {"app": "canary"}),
        pod("legacy-1", "plain", ["198.18.1.6"], labels={"app": "legacy"}),
        *extra,
    ])


# (id, extra objects, destination, expected (kind, ip, port, identity), reason contains)
CASES = [
    ("slices preferred over selector",
     [service("api", HTTP, selector={"app": "api"}),
      eps("api-x1", "api", [ep("198.18.1.7", ref="mesh/canary-1")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.7", 8080, CANARY_ID), ""),
    ("no slice: selector fallback",
     [service("api", HTTP, selector={"app": "api"})],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("not-ready endpoint skipped",
     [service("api", HTTP),
      eps("api-x1", "api", [ep("198.18.1.7", ready=False, ref="mesh/canary-1"),
                            ep("198.18.1.5", ref="mesh/api-1")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("absent ready condition means ready",
     [service("api", HTTP),
      eps("api-x1", "api", [ep("198.18.1.5", ready=None, ref="mesh/api-1")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("named port: http maps by name, not by order",
     [service("api", [{"name": "http", "port": 80, "targetPort": "web"},
                      {"name": "metrics", "port": 9090, "targetPort": 9091}]),
      eps("api-x1", "api", [ep("198.18.1.5")],
          [{"name": "metrics", "port": 9191, "protocol": "TCP"}, {"name": "http", "port": 8081}])],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8081, API_ID), ""),
    ("named port: metrics maps by name",
     [service("api", [{"name": "http", "port": 80, "targetPort": "web"},
                      {"name": "metrics", "port": 9090, "targetPort": 9091}]),
      eps("api-x1", "api", [ep("198.18.1.5")],
          [{"name": "metrics", "port": 9191, "protocol": "TCP"}, {"name": "http", "port": 8081}])],
     (SVC_V4, 9090), ("hbone", "198.18.1.5", 9191, API_ID), ""),
    ("unnamed single port matches the unnamed slice port",
     [service("api", [{"port": 80, "targetPort": 8080}]),
      eps("api-x1", "api", [ep("198.18.1.5")], [{"name": "", "port": 8082, "protocol": "TCP"}])],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8082, API_ID), ""),
    ("UDP service port with the same number is not the TCP one",
     [service("dns", [{"name": "dns", "port": 53, "protocol": "UDP"},
                      {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]),
      eps("dns-x1", "dns", [ep("198.18.2.53")],
          [{"name": "dns", "port": 5353, "protocol": "UDP"}, {"name": "dns-tcp", "port": 5354, "protocol": "TCP"}])],
     (SVC_V4, 53), ("passthrough", "198.18.2.53", 5354, ""), "not a known pod"),
    ("UDP slice port skipped even when the name matches",
     [service("api", HTTP),
      eps("api-x1", "api", [ep("198.18.1.5")], [{"name": "http", "port": 8080, "protocol": "UDP"}])],
     (SVC_V4, 80), ("no-endpoint", SVC_V4, 80, ""), "no TCP endpoint port named 'http'"),
    ("UDP-only service port",
     [service("dns", [{"name": "dns", "port": 53, "protocol": "UDP"}]),
      eps("dns-x1", "dns", [ep("198.18.2.53")], [{"name": "dns", "port": 53, "protocol": "UDP"}])],
     (SVC_V4, 53), ("no-endpoint", SVC_V4, 53, ""), "has no TCP port 53"),
    ("IPv6 cluster IP uses the IPv6 slice",
     [service("api", HTTP, ips=(SVC_V4, SVC_V6)),
      eps("api-v4", "api", [ep("198.18.1.5", ref="mesh/api-1")], HTTP_EP),
      eps("api-v6", "api", [ep("fd00:198:18::5", ref="mesh/api-1")], HTTP_EP, family="IPv6")],
     (SVC_V6, 80), ("hbone", "fd00:198:18::5", 8080, API_ID), ""),
    ("IPv4 cluster IP of the same service uses the IPv4 slice",
     [service("api", HTTP, ips=(SVC_V4, SVC_V6)),
      eps("api-v6", "api", [ep("fd00:198:18::5", ref="mesh/api-1")], HTTP_EP, family="IPv6"),
      eps("api-v4", "api", [ep("198.18.1.5", ref="mesh/api-1")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("IPv6 cluster IP with only an IPv4 slice",
     [service("api", HTTP, ips=(SVC_V6,)),
      eps("api-v4", "api", [ep("198.18.1.5", ref="mesh/api-1")], HTTP_EP)],
     (SVC_V6, 80), ("no-endpoint", SVC_V6, 80, ""), "no ready IPv6 endpoint"),
    ("endpoint without a known pod: passthrough",
     [service("ext", HTTP),
      eps("ext-x1", "ext", [ep("198.18.9.9")], HTTP_EP)],
     (SVC_V4, 80), ("passthrough", "198.18.9.9", 8080, ""), "not a known pod"),
    ("targetRef to a meshed pod: hbone with its identity",
     [service("api", HTTP),
      eps("api-x1", "api", [ep("198.18.1.7", ref="mesh/canary-1")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.7", 8080, CANARY_ID), ""),
    ("no targetRef: the pod is found by address",
     [service("api", HTTP),
      eps("api-x1", "api", [ep("198.18.1.5")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("stale targetRef: the pod that owns the address decides",
     [service("api", HTTP),
      eps("api-x1", "api", [ep("198.18.1.5", ref="plain/legacy-1")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("targetRef to an unmeshed pod: passthrough",
     [service("legacy", HTTP, ns="plain"),
      eps("legacy-x1", "legacy", [ep("198.18.1.6", ref="plain/legacy-1")], HTTP_EP, ns="plain")],
     (SVC_V4, 80), ("passthrough", "198.18.1.6", 8080, ""), "not in the mesh"),
    ("no ready endpoints: no-endpoint with a reason",
     [service("api", HTTP, selector={"app": "api"}),
      eps("api-x1", "api", [ep("198.18.1.5", ready=False, ref="mesh/api-1")], HTTP_EP)],
     (SVC_V4, 80), ("no-endpoint", SVC_V4, 80, ""), "service mesh/api has no ready IPv4 endpoint"),
    ("FQDN slice ignored, yet it stops the selector fallback",
     [service("api", HTTP, selector={"app": "api"}),
      eps("api-x1", "api", [{"addresses": ["api.example.test"]}], HTTP_EP, family="FQDN")],
     (SVC_V4, 80), ("no-endpoint", SVC_V4, 80, ""), "no ready IPv4 endpoint"),
    ("slices of another service ignored",
     [service("api", HTTP, selector={"app": "api"}),
      eps("other-x1", "other", [ep("198.18.1.7", ref="mesh/canary-1")], HTTP_EP)],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("slices of a same-named service in another namespace ignored",
     [service("api", HTTP, selector={"app": "api"}),
      eps("api-x1", "api", [ep("198.18.1.6")], HTTP_EP, ns="plain")],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
    ("EndpointSlice-kind object of another API group ignored",
     [service("api", HTTP, selector={"app": "api"}),
      eps("api-x1", "api", [ep("198.18.1.7")], HTTP_EP, group="example.test/v1")],
     (SVC_V4, 80), ("hbone", "198.18.1.5", 8080, API_ID), ""),
]


@pytest.mark.parametrize("extra, dest, expected, reason", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_endpointslice_routes(extra, dest, expected, reason):
    state = cluster(*extra)
    for salt in range(16):
        route = resolve(state, *dest, TD, salt=salt)
        assert (route.kind, route.ip, route.port, route.identity) == expected, f"salt {salt}"
        assert reason in route.reason
        if route.kind != "no-endpoint":
            assert route.service.endswith("/" + extra[0]["metadata"]["name"])


def test_endpoint_choice_is_spread_by_salt():
    # Two ready endpoints, one of them listed by two slices (the controller
    # moving it): both are chosen, each salt always the same one.
    state = cluster(service("api", HTTP),
                    eps("api-x1", "api", [ep("198.18.1.5", ref="mesh/api-1"),
                                          ep("198.18.1.7", ref="mesh/canary-1")], HTTP_EP),
                    eps("api-x2", "api", [ep("198.18.1.7", ref="mesh/canary-1")], HTTP_EP))
    chosen = {salt: resolve(state, SVC_V4, 80, TD, salt=salt).ip for salt in range(64)}
    assert set(chosen.values()) == {"198.18.1.5", "198.18.1.7"}
    assert all(resolve(state, SVC_V4, 80, TD, salt=s).ip == ip for s, ip in chosen.items())
    # The slice order in the state does not change the choice.
    reordered = cluster(service("api", HTTP),
                        eps("api-x2", "api", [ep("198.18.1.7", ref="mesh/canary-1")], HTTP_EP),
                        eps("api-x1", "api", [ep("198.18.1.7", ref="mesh/canary-1"),
                                              ep("198.18.1.5", ref="mesh/api-1")], HTTP_EP))
    assert all(resolve(reordered, SVC_V4, 80, TD, salt=s).ip == ip for s, ip in chosen.items())


def test_malformed_slice_fields_read_as_absent():
    # Slices come from a state file or the API; wrong types must not raise.
    state = cluster(service("api", HTTP, selector={"app": "api"}),
                    {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                     "metadata": {"name": "api-x1", "namespace": "mesh",
                                  "labels": {"kubernetes.io/service-name": "api"}},
                     "addressType": "IPv4", "endpoints": ["198.18.1.5", {"addresses": "198.18.1.5"},
                                                          {"addresses": [7]}],
                     "ports": None})
    route = resolve(state, SVC_V4, 80, TD)
    assert (route.kind, route.reason) == ("no-endpoint", "service mesh/api has no ready IPv4 endpoint")
