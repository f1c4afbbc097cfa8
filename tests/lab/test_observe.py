"""Metrics, readiness and admin of real node agents after known traffic."""

from __future__ import annotations

import json
import re
import sys

import pytest

from agent.lab.lab import Lab
from tests.lab.conftest import running_lab, agent_pod, connect, settle, unique_name, wait_for

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d9f8b6c5d-abcde
  namespace: shop
  labels: {app: web, version: v1, pod-template-hash: 7d9f8b6c5d}
  ownerReferences: [{apiVersion: apps/v1, kind: ReplicaSet, name: web-7d9f8b6c5d, controller: true, uid: r1}]
spec: {nodeName: node1, serviceAccountName: web}
---
apiVersion: v1
kind: Pod
metadata: {name: cart-0, namespace: shop, labels: {app: cart, version: v2}}
spec: {nodeName: node2, serviceAccountName: cart}
"""

FETCH = """
import sys, urllib.request, urllib.error
req = urllib.request.Request(sys.argv[1], method=sys.argv[2] if len(sys.argv) > 2 else "GET")
try:
    with urllib.request.urlopen(req, timeout=5) as r:
        print(r.status); print(r.read().decode())
except urllib.error.HTTPError as e:
    print(e.code); print(e.read().decode())
"""


@pytest.fixture(scope="module")
def lab():
    with running_lab("obs", MANIFEST) as lab:
        yield lab


def fetch(lab, node, url, method="GET"):
    done = lab.node_run(node, [sys.executable, "-c", FETCH, url, method], timeout=20)
    status, _, body = done.stdout.partition("\n")
    return int(status), body


def series(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_istio_metrics_from_both_reporters(lab, servers):
    srv = servers(lab)
    srv.serve("shop/cart-0", 9000, "cart")
    ok, banner = connect(lab, "shop/web-7d9f8b6c5d-abcde", lab.pod_ip("shop/cart-0"), 9000, "x" * 100)
    assert ok, banner
    common = dict(source_workload="web", source_workload_namespace="shop",
                  source_principal="spiffe://cluster.local/ns/shop/sa/web", source_app="web", source_version="v1",
                  source_canonical_service="web", source_canonical_revision="v1",
                  destination_workload="cart-0", destination_workload_namespace="shop",
                  destination_principal="spiffe://cluster.local/ns/shop/sa/cart", destination_app="cart",
                  destination_version="v2", request_protocol="tcp", response_flags="-",
                  connection_security_policy="mutual_tls")
    for node, reporter in (("node1", "source"), ("node2", "destination")):
        def scraped():
            status, text = fetch(lab, node, "http://127.0.0.1:15020/metrics")
            assert status == 200
            return text if series(text, "istio_tcp_connections_closed_total", reporter=reporter, **common) >= 1 else None
        text = wait_for(scraped, timeout=10, what=f"{reporter} metrics")
        assert series(text, "istio_tcp_connections_opened_total", reporter=reporter, **common) == 1
        # Istio's names from the destination's point of view: received = client -> server.
        assert series(text, "istio_tcp_received_bytes_total", reporter=reporter, **common) == 100
        assert series(text, "istio_tcp_sent_bytes_total", reporter=reporter, **common) >= 100 + len("cart ")
        assert "_created" not in text
        status, same = fetch(lab, node, "http://127.0.0.1:15020/stats/prometheus")
        assert status == 200 and "istio_tcp_connections_opened_total" in same
        assert series(text, "ambient_agent_enrolled_pods") == 1
        assert series(text, "ambient_agent_ca_requests_total", result="ok") >= 1


def test_denied_plaintext_is_counted_with_the_deny_flag(lab, servers):
    srv = servers(lab)
    srv.serve("shop/cart-0", 9001, "cart")
    lab.apply("""
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: shop}
spec: {mtls: {mode: STRICT}}
---
apiVersion: v1
kind: Pod
metadata: {name: legacy, namespace: default}
spec: {nodeName: node1}
""")
    settle(lab)
    ok, _ = connect(lab, "default/legacy", lab.pod_ip("shop/cart-0"), 9001, "x", timeout=3)
    assert not ok
    status, text = fetch(lab, "node2", "http://127.0.0.1:15020/metrics")
    assert series(text, "istio_tcp_connections_failed_total", reporter="destination", response_flags="DENY",
                  destination_workload="cart-0", connection_security_policy="unknown",
                  source_workload="legacy") == 1


def test_readiness_and_config_dump(lab):
    status, body = fetch(lab, "node1", "http://127.0.0.1:15021/healthz/ready")
    assert status == 200, body
    status, body = fetch(lab, "node1", "http://127.0.0.1:15000/config_dump")
    assert status == 200
    assert "PRIVATE KEY" not in body
    dump = json.loads(body)
    assert dump["node"] == "node1"
    assert any(c["identity"] == "spiffe://cluster.local/ns/shop/sa/web" and c["state"] == "valid"
               for c in dump["certificates"])
    assert dump["bpf"]["attached"] is True and dump["bpf"]["netns_captured"]
    assert {"pod": "shop/web-7d9f8b6c5d-abcde"}.items() <= next(
        e for e in dump["enrolled"] if e["pod"] == "shop/web-7d9f8b6c5d-abcde").items()
    status, body = fetch(lab, "node1", "http://127.0.0.1:15000/logging?agent.proxy=debug", "POST")
    assert status == 200, body


def test_readiness_waits_for_certificates_of_new_identities(lab):
    lab.stop_ca()
    lab.start_agents = False             # up() would bring the CA straight back
    try:
        lab.up("""
apiVersion: v1
kind: Pod
metadata: {name: newcomer, namespace: shop}
spec: {nodeName: node1, serviceAccountName: newcomer}
""")
        status, body = fetch(lab, "node1", "http://127.0.0.1:15021/healthz/ready")
        assert status == 503 and "spiffe://cluster.local/ns/shop/sa/newcomer" in body, (status, body)
    finally:
        lab.start_agents = True
        lab.start_ca()
    wait_for(lambda: fetch(lab, "node1", "http://127.0.0.1:15021/healthz/ready")[0] == 200, timeout=30,
             what="readiness once the certificate arrives")
