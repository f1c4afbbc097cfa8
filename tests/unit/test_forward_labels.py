"""Connections of one workload pair share one Istio label set (memory per idle connection)."""

from agent.observe.metrics import Metrics
from agent.proxy.counters import ConnectionLog, PodCounters
from agent.proxy.forward import DataPlane, PodProxy
from agent.proxy.tunnel import HbonePool
from agent.state.model import ClusterState
from tests import builders


def pod(ns, name, uid, app):
    return builders.pod(name, ns, uid=uid, labels={"app": app}, node="n1", sa=name)


def test_label_sets_are_shared_per_pair_and_rebuilt_with_the_state():
    holder = {"state": ClusterState.from_items([pod("a", "web", "1", "web"), pod("b", "api", "2", "api")])}
    plane = DataPlane(state=lambda: holder["state"], trust_domain="cluster.local", tls=None,
                      pool=HbonePool(), log=ConnectionLog(), metrics=Metrics().tcp)
    proxy = PodProxy("a/web", "spiffe://cluster.local/ns/a/sa/web", ["198.18.0.2"], {}, listeners=None,
                     datapath=None, switcher=None, counters=PodCounters(), plane=plane)

    def labels():
        st = holder["state"]
        return proxy._labels("source", st.pod_view("a", "web"), "spiffe://cluster.local/ns/a/sa/web",
                             st.pod_view("b", "api"), "spiffe://cluster.local/ns/b/sa/api", mtls=True)

    first, second = labels(), labels()
    assert first is second and first["destination_app"] == "api"
    # A new state (the destination pod relabelled) gives a new, correct set.
    holder["state"] = ClusterState.from_items([pod("a", "web", "1", "web"), pod("b", "api", "2", "api-v2")])
    third = labels()
    assert third is not first and third["destination_app"] == "api-v2" and first["destination_app"] == "api"


def test_inbound_service_per_port_and_named_host_cached_with_the_state():
    api = pod("b", "api", "2", "api")
    api["spec"]["containers"] = [{"name": "c", "ports": [{"name": "http", "containerPort": 9000}]}]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "b", "name": "api"},
           "spec": {"selector": {"app": "api"}, "ports": [{"port": 80, "targetPort": "http"}]}}
    alias = {"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": "b", "name": "alias"},
             "spec": {"selector": {"app": "api"}, "ports": [{"port": 8080, "targetPort": 9000}]}}
    holder = {"state": ClusterState.from_items([api, svc])}
    plane = DataPlane(state=lambda: holder["state"], trust_domain="cluster.local", tls=None,
                      pool=HbonePool(), log=ConnectionLog(), metrics=Metrics().tcp)
    proxy = PodProxy("b/api", "spiffe://cluster.local/ns/b/sa/api", ["198.18.0.3"], {}, listeners=None,
                     datapath=None, switcher=None, counters=PodCounters(), plane=plane)
    assert proxy._inbound_service(9000) == ("b/api", "")
    assert proxy._inbound_service(9001) == ("", "")
    # The label sets differ per Service: the cache key carries it.
    st = holder["state"]
    with_svc = proxy._labels("destination", None, None, st.pod_view("b", "api"), proxy.identity,
                             proxy._inbound_service(9000)[0], mtls=True)
    without = proxy._labels("destination", None, None, st.pod_view("b", "api"), proxy.identity,
                            proxy._inbound_service(9001)[0], mtls=True)
    assert with_svc["destination_service"] == "api.b.svc.cluster.local"
    assert with_svc["destination_service_name"] == "api" and with_svc["destination_service_namespace"] == "b"
    assert without["destination_service"] == "unknown" and without["destination_service_name"] == "unknown"
    # A second Service on the same port: ambiguous, unless the client named one.
    holder["state"] = ClusterState.from_items([api, svc, alias])
    assert proxy._inbound_service(9000) == ("", "")
    assert proxy._inbound_service(9000, "alias.b.svc.cluster.local") == ("b/alias", "")
    # A ServiceEntry selecting the pod: its host is the destination_service.
    entry = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"namespace": "b", "name": "api-se"},
             "spec": {"hosts": ["api.example.internal"], "resolution": "STATIC",
                      "ports": [{"number": 80, "name": "http", "targetPort": 9000}],
                      "workloadSelector": {"labels": {"app": "api"}}}}
    holder["state"] = ClusterState.from_items([api, entry])
    service, host = proxy._inbound_service(9000)
    assert (service, host) == ("b/api-se", "api.example.internal")
    labels = proxy._labels("destination", None, None, holder["state"].pod_view("b", "api"), proxy.identity,
                           service, mtls=True, service_host=host)
    assert labels["destination_service"] == "api.example.internal"
    assert labels["destination_service_name"] == "api-se" and labels["destination_service_namespace"] == "b"


def test_outbound_connect_names_the_service_as_ztunnel():
    from agent.proxy import hbone
    from agent.proxy.forward import _forwarded_for, _with_service_host
    from agent.proxy.route import Route
    headers = hbone.connect_request_headers(hbone.ConnectTarget("198.18.0.3", 9000), ("198.18.0.2", 40000), None)
    named = dict(_with_service_host(headers, Route("hbone", "198.18.0.3", 9000, service="b/api"), "cluster.local"))
    assert named["forwarded"] == 'for="198.18.0.2:40000";host=api.b.svc.cluster.local'
    entry = Route("hbone", "198.18.0.3", 9000, service="b/api-se", service_host="api.example.internal")
    assert dict(_with_service_host(headers, entry, "cluster.local"))["forwarded"] == \
        'for="198.18.0.2:40000";host=api.example.internal'
    assert _forwarded_for(named["forwarded"]) == ("198.18.0.2", 40000)     # the source still parses
    assert hbone.check_connect(list(named.items()), ["198.18.0.3"]) == hbone.ConnectTarget("198.18.0.3", 9000)
