"""Connections of one workload pair share one Istio label set (memory per idle connection)."""

from agent.observe.metrics import Metrics
from agent.proxy.counters import ConnectionLog, PodCounters
from agent.proxy.forward import DataPlane, PodProxy
from agent.proxy.tunnel import HbonePool
from agent.state.model import ClusterState


def pod(ns, name, uid, app):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"namespace": ns, "name": name, "uid": uid,
                                                            "labels": {"app": app}},
            "spec": {"nodeName": "n1", "serviceAccountName": name}}


def test_label_sets_are_shared_per_pair_and_rebuilt_with_the_state():
    holder = {"state": ClusterState.from_items([pod("a", "web", "1", "web"), pod("b", "api", "2", "api")])}
    plane = DataPlane(state=lambda: holder["state"], trust_domain="cluster.local", tls=None,
                      pool=HbonePool(), log=ConnectionLog(), metrics=Metrics().tcp)
    proxy = PodProxy("a/web", "spiffe://cluster.local/ns/a/sa/web", ["198.18.0.2"], {}, listeners=None,
                     datapath=None, switcher=None, counters=PodCounters(), plane=plane)

    def labels():
        st = holder["state"]
        return proxy._labels("source", st.pod("a", "web"), "spiffe://cluster.local/ns/a/sa/web",
                             st.pod("b", "api"), "spiffe://cluster.local/ns/b/sa/api", mtls=True)

    first, second = labels(), labels()
    assert first is second and first["destination_app"] == "api"
    # A new state (the destination pod relabelled) gives a new, correct set.
    holder["state"] = ClusterState.from_items([pod("a", "web", "1", "web"), pod("b", "api", "2", "api-v2")])
    third = labels()
    assert third is not first and third["destination_app"] == "api-v2" and first["destination_app"] == "api"
