"""The destination reporter's Service: ztunnel's guess_inbound_service, as a table."""

import pytest

from agent.observe.service import (
    candidate_services,
    forwarded_host,
    forwarded_with_host,
    inbound_service,
    service_hostname,
)
from agent.state.model import ClusterState

API_POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"namespace": "backend", "name": "api-0", "uid": "u-api",
                 "labels": {"app": "api", "tier": "web"}},
    "spec": {"nodeName": "n1", "containers": [
        {"name": "main", "ports": [{"name": "http", "containerPort": 9000},
                                   {"name": "metrics", "containerPort": 9100},
                                   {"name": "dns", "containerPort": 5353, "protocol": "UDP"}]}]},
    "status": {"phase": "Running", "podIP": "198.18.2.10"},
}


def svc(name, ports, selector=None, ns="backend"):
    spec = {"ports": ports}
    if selector is not None:
        spec["selector"] = selector
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name}, "spec": spec}


def eps(service, endpoints, ports, ns="backend", name=None):
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"namespace": ns, "name": name or f"{service}-x",
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4", "endpoints": endpoints, "ports": ports}


API = svc("api", [{"port": 80, "targetPort": "http"}], {"app": "api"})
API_NUMERIC = svc("api-num", [{"port": 8080, "targetPort": 9000}], {"app": "api"})
METRICS = svc("api-metrics", [{"port": 9100}], {"tier": "web"})            # targetPort defaults to port
OTHER_NS = svc("api", [{"port": 80, "targetPort": 9000}], {"app": "api"}, ns="elsewhere")
OTHER_LABELS = svc("db", [{"port": 80, "targetPort": 9000}], {"app": "db"})
NO_SELECTOR_EMPTY = svc("all", [{"port": 80, "targetPort": 9000}], {})   # selects nothing
UDP_ONLY = svc("dns", [{"port": 53, "targetPort": "dns", "protocol": "UDP"}], {"app": "api"})
MANUAL = svc("legacy", [{"port": 7000}])                                 # no selector: slices
MANUAL_SLICE = eps("legacy", [{"addresses": ["198.18.2.10"]}], [{"name": "", "port": 9000}])
MANUAL_SLICE_REF = eps("legacy", [{"addresses": ["198.18.9.9"],
                                   "targetRef": {"kind": "Pod", "namespace": "backend", "name": "api-0"}}],
                       [{"port": 9000}])
MANUAL_SLICE_OTHER = eps("legacy", [{"addresses": ["198.18.2.99"], "targetRef": {"kind": "Pod", "name": "api-1"}}],
                         [{"port": 9000}])
MANUAL_SLICE_OLD_UID = eps("legacy", [{"addresses": ["198.18.2.10"],
                                       "targetRef": {"kind": "Pod", "name": "api-0", "uid": "u-gone"}}],
                           [{"port": 9000}])
MANUAL_ELSEWHERE = svc("legacy", [{"port": 7000}], ns="elsewhere")
MANUAL_SLICE_ELSEWHERE = eps("legacy", [{"addresses": ["198.18.9.9"],           # targetRef namespace: the slice's
                                         "targetRef": {"kind": "Pod", "name": "api-0"}}], [{"port": 9000}],
                             ns="elsewhere")
SELECTOR_SLICE = eps("api", [{"addresses": ["198.18.2.10"], "targetRef": {"kind": "Pod", "name": "api-0"}}],
                     [{"port": 9000}])
FWD = 'for="198.18.1.5:40000";host='


def entry(name, hosts, selector=None, ports=None, ns="backend", **spec):
    spec = {"hosts": hosts, "resolution": "STATIC",
            "ports": ports if ports is not None else [{"number": 80, "name": "http", "targetPort": 9000}], **spec}
    if selector is not None:
        spec["workloadSelector"] = {"labels": selector}
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
            "metadata": {"namespace": ns, "name": name}, "spec": spec}


SE_API = entry("api-se", ["api.example.internal"], {"app": "api"})
SE_TWO_HOSTS = entry("two", ["a.example.internal", "b.example.internal"], {"app": "api"})
SE_OTHER_NS = entry("api-se", ["api.example.internal"], {"app": "api"}, ns="elsewhere")
SE_OTHER_LABELS = entry("db-se", ["db.example.internal"], {"app": "db"})
SE_ENDPOINTS = entry("inline", ["inline.example.internal"], endpoints=[{"address": "198.18.2.10"}])
SE_NO_TARGET = entry("plain-port", ["plain.example.internal"], {"app": "api"}, ports=[{"number": 9000}])
SE_UDP = entry("udp", ["udp.example.internal"], {"app": "api"},
               ports=[{"number": 9000, "protocol": "UDP"}])

CASES = [
    # (why, services and slices, destination port, Forwarded value, expected "ns/name", ("ns/name", host) or None)
    ("named targetPort resolved on the pod", [API], 9000, "", "backend/api"),
    ("numeric targetPort", [API_NUMERIC], 9000, "", "backend/api-num"),
    ("targetPort defaults to the service port", [METRICS], 9100, "", "backend/api-metrics"),
    ("a port no Service targets", [API, METRICS], 9200, "", None),
    ("no Service at all", [], 9000, "", None),
    ("a Service of another namespace never selects the pod", [OTHER_NS], 9000, "", None),
    ("a selector that does not match", [OTHER_LABELS], 9000, "", None),
    ("an empty selector selects nothing", [NO_SELECTOR_EMPTY], 9000, "", None),
    ("a UDP service port never names a TCP connection", [UDP_ONLY], 5353, "", None),
    ("two Services target the port: ambiguous, unknown", [API, API_NUMERIC], 9000, "", None),
    ("one of two Services targets this port", [API, METRICS], 9100, "", "backend/api-metrics"),
    ("the client named its Service", [API, API_NUMERIC], 9000,
     FWD + service_hostname("backend", "api-num", "cluster.local"), "backend/api-num"),
    ("the named Service wins over the port match", [API, METRICS], 9000,
     FWD + "api-metrics.backend.svc.cluster.local", "backend/api-metrics"),
    ("a quoted host parameter", [API, API_NUMERIC], 9000,
     'for="198.18.1.5:1";host="api.backend.svc.cluster.local"', "backend/api"),
    ("a named Service that does not front the pod is ignored", [API], 9000,
     FWD + "db.backend.svc.cluster.local", "backend/api"),
    ("... and cannot make an ambiguous port resolve", [API, API_NUMERIC, OTHER_LABELS], 9000,
     FWD + "db.backend.svc.cluster.local", None),
    ("a hostname of another cluster domain does not match", [API, API_NUMERIC], 9000,
     FWD + "api.backend.svc.other.local", None),
    ("an endpoint with the pod's address but no targetRef is not the pod (as istiod)",
     [MANUAL, MANUAL_SLICE], 9000, "", None),
    ("selector-less Service through its EndpointSlice targetRef", [MANUAL, MANUAL_SLICE_REF], 9000, "",
     "backend/legacy"),
    ("a slice of another pod", [MANUAL, MANUAL_SLICE_OTHER], 9000, "", None),
    ("a slice of an earlier pod of the same name", [MANUAL, MANUAL_SLICE_OLD_UID], 9000, "", None),
    ("a targetRef without namespace is in the slice's namespace", [MANUAL_ELSEWHERE, MANUAL_SLICE_ELSEWHERE],
     9000, "", None),
    ("a selector Service's slice does not count it twice", [API, SELECTOR_SLICE], 9000, "", "backend/api"),
    ("a slice without its Service names nothing", [MANUAL_SLICE], 9000, "", None),
    # ServiceEntries: (namespace/name, host), as istiod's service per host.
    ("an entry whose workloadSelector selects the pod, by targetPort", [SE_API], 9000, "",
     ("backend/api-se", "api.example.internal")),
    ("an entry's port without targetPort targets its number", [SE_NO_TARGET], 9000, "",
     ("backend/plain-port", "plain.example.internal")),
    ("a UDP entry port never names a TCP connection", [SE_UDP], 9000, "", None),
    ("an entry of another namespace never selects the pod", [SE_OTHER_NS], 9000, "", None),
    ("an entry selecting other labels", [SE_OTHER_LABELS], 9000, "", None),
    ("an entry with inline endpoints selects no pod", [SE_ENDPOINTS], 9000, "", None),
    ("a Service and an entry on the same port: ambiguous", [API, SE_API], 9000, "", None),
    ("the client named the entry's host", [API, SE_API], 9000, FWD + "api.example.internal",
     ("backend/api-se", "api.example.internal")),
    ("two hosts of one entry on the port: ambiguous", [SE_TWO_HOSTS], 9000, "", None),
    ("... unless the client named one", [SE_TWO_HOSTS], 9000, FWD + "b.example.internal",
     ("backend/two", "b.example.internal")),
    ("a named host of an entry that does not select the pod is ignored", [API, SE_OTHER_LABELS], 9000,
     FWD + "db.example.internal", "backend/api"),
]


@pytest.mark.parametrize("why,objects,port,forwarded,expected", CASES, ids=[c[0] for c in CASES])
def test_inbound_service(why, objects, port, forwarded, expected):
    state = ClusterState.from_items([API_POD, *objects])
    assert not state.errors
    pod = state.pod("backend", "api-0")
    if isinstance(expected, str):          # a Service: no host of its own
        expected = (expected, "")
    assert inbound_service(state, pod, port, forwarded_host(forwarded), "cluster.local") == expected


def test_no_destination_pod_no_service():
    state = ClusterState.from_items([API_POD, API])
    assert inbound_service(state, None, 9000) is None


def test_candidates_are_the_pods_services_with_their_target_ports():
    state = ClusterState.from_items([API_POD, API, METRICS, OTHER_LABELS, MANUAL, MANUAL_SLICE_REF])
    assert candidate_services(state, state.pod("backend", "api-0")) == {
        ("backend", "api"): {9000}, ("backend", "api-metrics"): {9100}, ("backend", "legacy"): {9000}}


@pytest.mark.parametrize("value,host", [
    ('for="198.18.1.5:1";host=api.b.svc.cluster.local', "api.b.svc.cluster.local"),
    ('for="198.18.1.5:1"; host="x.y"', "x.y"),
    ('for="198.18.1.5:1"', ""),
    ("", ""),
    ('for="1.2.3.4:1";host=ä.example', ""),          # not ASCII: ignored, as ztunnel
    ('host=', ""),
])
def test_forwarded_host(value, host):
    assert forwarded_host(value) == host


def test_forwarded_with_host_as_ztunnel_writes_it():
    assert (forwarded_with_host('for="198.18.1.5:40000"', "api.backend.svc.cluster.local")
            == 'for="198.18.1.5:40000";host=api.backend.svc.cluster.local')
    assert forwarded_with_host('for="198.18.1.5:40000"', "") == 'for="198.18.1.5:40000"'
    assert forwarded_with_host('for="1.1.1.1:1";host=a', "b") == 'for="1.1.1.1:1";host=a'
