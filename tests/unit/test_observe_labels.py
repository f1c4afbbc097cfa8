"""Istio label building: workload names from owners, canonical names, unknowns, reporters."""

import pytest

from agent.observe.metrics import (TCP_LABELS, UNKNOWN, labels_for, with_flags, workload_name,
                                   workload_owner)
from tests import builders


def pod(name="p", namespace="shop", labels=None, owners=None):
    return builders.pod(name, namespace, labels=labels or {}, owners=owners, sa="sa")


def owner(kind, name, controller=True):
    return {"apiVersion": "apps/v1", "kind": kind, "name": name, "controller": controller, "uid": "u"}


@pytest.mark.parametrize("p, expected", [
    # Deployment via ReplicaSet, decided by pod-template-hash
    (pod("web-5d8f7c9b4-x2k4p", labels={"pod-template-hash": "5d8f7c9b4"},
         owners=[owner("ReplicaSet", "web-5d8f7c9b4")]), ("Deployment", "web")),
    (pod("my-api-v2-5d8f7c9b4-x2k4p", labels={"pod-template-hash": "5d8f7c9b4"},
         owners=[owner("ReplicaSet", "my-api-v2-5d8f7c9b4")]), ("Deployment", "my-api-v2")),
    # hash label present but not the suffix: a bare ReplicaSet keeps its name
    (pod("rs-abc", labels={"pod-template-hash": "zzz"}, owners=[owner("ReplicaSet", "rs-standalone")]),
     ("ReplicaSet", "rs-standalone")),
    # no hash label: a trailing segment in Kubernetes' hash alphabet is taken as the hash
    (pod("web-7c6bd-q", owners=[owner("ReplicaSet", "web-7c6bd")]), ("Deployment", "web")),
    (pod("frontend-x", owners=[owner("ReplicaSet", "frontend")]), ("ReplicaSet", "frontend")),
    (pod("db-0", owners=[owner("StatefulSet", "db")]), ("StatefulSet", "db")),
    (pod("node-exp-abcde", owners=[owner("DaemonSet", "node-exp")]), ("DaemonSet", "node-exp")),
    (pod("migrate-xyz", owners=[owner("Job", "migrate")]), ("Job", "migrate")),
    (pod("backup-28401234-abc", owners=[owner("Job", "backup-28401234")]), ("CronJob", "backup")),
    (pod("lonely"), ("Pod", "lonely")),
    (pod("lonely", owners=[]), ("Pod", "lonely")),
    # the controller reference wins over other owners
    (pod("db-0", owners=[owner("Thing", "other", controller=False), owner("StatefulSet", "db")]),
     ("StatefulSet", "db")),
    # without a controller flag, the first owner
    (pod("db-0", owners=[owner("StatefulSet", "db", controller=False)]), ("StatefulSet", "db")),
    # Istio's explicit override label
    (pod("db-0", labels={"service.istio.io/workload-name": "billing"}, owners=[owner("StatefulSet", "db")]),
     ("StatefulSet", "billing")),
    (None, ("Pod", "")),
])
def test_workload_owner(p, expected):
    assert workload_owner(p) == expected
    assert workload_name(p) == expected[1]


WEB = pod("web-5d8f7c9b4-x2k4p", "shop",
          labels={"app": "web", "version": "v2", "pod-template-hash": "5d8f7c9b4"},
          owners=[owner("ReplicaSet", "web-5d8f7c9b4")])
DB = pod("db-0", "data", labels={"service.istio.io/canonical-name": "database",
                                 "service.istio.io/canonical-revision": "14"},
         owners=[owner("StatefulSet", "db")])
BARE = pod("toolbox", "default")
WEB_ID = "spiffe://cluster.local/ns/shop/sa/web"
DB_ID = "spiffe://cluster.local/ns/data/sa/db"


def test_full_label_set_outbound_mtls():
    labels = labels_for("source", WEB, WEB_ID, DB, DB_ID, "data/db", True, "-")
    assert tuple(labels) == TCP_LABELS
    assert labels == {
        "reporter": "source",
        "source_workload": "web", "source_canonical_service": "web", "source_canonical_revision": "v2",
        "source_workload_namespace": "shop", "source_principal": WEB_ID, "source_app": "web",
        "source_version": "v2", "source_cluster": "Kubernetes",
        "destination_service": "db.data.svc.cluster.local", "destination_service_namespace": "data",
        "destination_service_name": "db",
        "destination_workload": "db", "destination_canonical_service": "database",
        "destination_canonical_revision": "14", "destination_workload_namespace": "data",
        "destination_principal": DB_ID, "destination_app": "database", "destination_version": "14",
        "destination_cluster": "Kubernetes",
        "request_protocol": "tcp", "response_flags": "-", "connection_security_policy": "mutual_tls",
    }


@pytest.mark.parametrize("reporter", ["source", "destination"])
def test_reporter_both_sides_same_peers(reporter):
    labels = labels_for(reporter, WEB, WEB_ID, DB, DB_ID, None, True, "-")
    assert labels["reporter"] == reporter
    # the peers do not swap with the reporter
    assert labels["source_workload"] == "web" and labels["destination_workload"] == "db"


@pytest.mark.parametrize("kwargs, expected", [
    # plaintext inbound: no peer identity, no mTLS
    (dict(reporter="destination", source_pod=WEB, source_identity=None, destination_pod=DB,
          destination_identity=DB_ID, service=None, mtls=False, flags="-"),
     {"source_principal": UNKNOWN, "connection_security_policy": "unknown",
      "destination_service": UNKNOWN, "destination_service_name": UNKNOWN,
      "destination_service_namespace": UNKNOWN}),
    # unknown source pod (an address outside the cluster)
    (dict(reporter="destination", source_pod=None, source_identity="", destination_pod=DB,
          destination_identity=DB_ID, service=None, mtls=False, flags="-"),
     {"source_workload": UNKNOWN, "source_workload_namespace": UNKNOWN, "source_app": UNKNOWN,
      "source_version": UNKNOWN, "source_canonical_service": UNKNOWN,
      "source_canonical_revision": UNKNOWN, "source_cluster": UNKNOWN, "source_principal": UNKNOWN,
      "destination_cluster": "Kubernetes"}),
    # passthrough: no destination workload
    (dict(reporter="source", source_pod=WEB, source_identity=WEB_ID, destination_pod=None,
          destination_identity=None, service=None, mtls=False, flags="-"),
     {"destination_workload": UNKNOWN, "destination_principal": UNKNOWN, "destination_cluster": UNKNOWN,
      "connection_security_policy": "unknown"}),
    # policy denial
    (dict(reporter="destination", source_pod=WEB, source_identity=WEB_ID, destination_pod=DB,
          destination_identity=DB_ID, service=None, mtls=True, flags="DENY"),
     {"response_flags": "DENY", "connection_security_policy": "mutual_tls"}),
    # upstream connect failure
    (dict(reporter="source", source_pod=WEB, source_identity=WEB_ID, destination_pod=DB,
          destination_identity=DB_ID, service="data/db", mtls=True, flags="CONNECT"),
     {"response_flags": "CONNECT"}),
    # empty flags are "-"
    (dict(reporter="source", source_pod=WEB, source_identity=WEB_ID, destination_pod=DB,
          destination_identity=DB_ID, service=None, mtls=True, flags=""),
     {"response_flags": "-"}),
    # a pod without labels or owners: pod name, canonical name = pod name, revision latest
    (dict(reporter="source", source_pod=BARE, source_identity="spiffe://cluster.local/ns/default/sa/default",
          destination_pod=None, destination_identity=None, service=None, mtls=False, flags="-"),
     {"source_workload": "toolbox", "source_canonical_service": "toolbox", "source_app": "toolbox",
      "source_canonical_revision": "latest", "source_version": "latest",
      "source_workload_namespace": "default"}),
    # another cluster name
    (dict(reporter="source", source_pod=WEB, source_identity=WEB_ID, destination_pod=DB,
          destination_identity=DB_ID, service=None, mtls=True, flags="-", cluster="east"),
     {"source_cluster": "east", "destination_cluster": "east"}),
    # app.kubernetes.io labels feed the canonical names
    (dict(reporter="source", source_pod=pod("x", labels={"app.kubernetes.io/name": "shopfront",
                                                          "app.kubernetes.io/version": "1.2"}),
          source_identity=None, destination_pod=None, destination_identity=None, service=None,
          mtls=False, flags="-"),
     {"source_app": "shopfront", "source_version": "1.2", "source_canonical_service": "shopfront"}),
])
def test_label_cases(kwargs, expected):
    labels = labels_for(**kwargs)
    assert set(labels) == set(TCP_LABELS)
    assert all(isinstance(v, str) and v for v in labels.values())
    assert {k: labels[k] for k in expected} == expected


@pytest.mark.parametrize("bad", [dict(reporter="both"), dict(service="db"), dict(service="/db"),
                                 dict(service="data/")])
def test_label_errors(bad):
    args = dict(reporter="source", source_pod=WEB, source_identity=WEB_ID, destination_pod=DB,
                destination_identity=DB_ID, service=None, mtls=True, flags="-")
    args.update(bad)
    with pytest.raises(ValueError):
        labels_for(**args)


def test_no_per_connection_labels():
    assert not {"source_ip", "destination_ip", "source_port", "destination_port", "connection_id"} & set(TCP_LABELS)


def test_with_flags_copies():
    labels = labels_for("source", WEB, WEB_ID, DB, DB_ID, None, True, "-")
    denied = with_flags(labels, "DENY")
    assert denied["response_flags"] == "DENY" and labels["response_flags"] == "-"
