"""Metrics, readiness and admin of real node agents after known traffic."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lab.conftest import PEER, connect, running_lab, settle, wait_for

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
    denied = dict(reporter="destination", destination_workload="cart-0", connection_security_policy="unknown",
                  source_workload="legacy")
    assert series(text, "istio_tcp_connections_failed_total", response_flags="DENY", **denied) == 1
    # As ztunnel: opened with "-" (the flag is not known when a connection starts),
    # closed and failed with the flag.
    assert series(text, "istio_tcp_connections_opened_total", response_flags="-", **denied) == 1
    assert series(text, "istio_tcp_connections_opened_total", response_flags="DENY", **denied) == 0
    assert series(text, "istio_tcp_connections_closed_total", response_flags="DENY", **denied) == 1


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


def test_destination_reporter_names_the_service_as_ztunnel_does(lab, servers):
    """By the Service hostname the client's agent sends (Forwarded host=), else by the
    one Service that targets the port; never a guess between two (issue 12)."""
    srv = servers(lab)
    srv.serve("shop/cart-0", 9100, "cart")
    lab.apply("""
apiVersion: v1
kind: Service
metadata: {name: cart-api, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{port: 80, targetPort: 9100}]
""")
    settle(lab)
    cart_ip = lab.pod_ip("shop/cart-0")
    pair = dict(source_workload="web", destination_workload="cart-0", response_flags="-",
                connection_security_policy="mutual_tls")

    def vip(name):
        items = json.loads(Path(lab.state_path).read_text())["items"]
        return next(i for i in items if i["kind"] == "Service" and i["metadata"]["name"] == name)["spec"]["clusterIP"]

    def closed(node, reporter, service):
        status, text = fetch(lab, node, "http://127.0.0.1:15020/metrics")
        assert status == 200
        return series(text, "istio_tcp_connections_closed_total", reporter=reporter,
                      destination_service=service, **pair)

    def one_connection(host, port, expect):
        """``expect``: {(node, reporter): destination_service} each counted once more."""
        before = {k: closed(k[0], k[1], svc) for k, svc in expect.items()}
        ok, banner = connect(lab, "shop/web-7d9f8b6c5d-abcde", host, port, "svc-test")
        assert ok and banner.startswith("cart "), banner
        for (node, reporter), svc in expect.items():
            wait_for(lambda: closed(node, reporter, svc) == before[(node, reporter)] + 1, timeout=10,
                     what=f"{reporter} reporter on {node}: destination_service={svc}")

    cart = "cart-api.shop.svc.cluster.local"
    # Straight to the pod: the source knows no Service; the destination finds the one
    # Service whose targetPort is 9100.
    one_connection(cart_ip, 9100, {("node1", "source"): "unknown", ("node2", "destination"): cart})
    # Through the cluster IP: both reporters name it.
    one_connection(vip("cart-api"), 80, {("node1", "source"): cart, ("node2", "destination"): cart})
    # A second Service on the same pod port: the port alone is ambiguous, so unknown;
    # through either cluster IP, the Service the client used.
    lab.apply("""
apiVersion: v1
kind: Service
metadata: {name: cart-alias, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{port: 8080, targetPort: 9100}]
""")
    settle(lab)
    alias = "cart-alias.shop.svc.cluster.local"
    one_connection(cart_ip, 9100, {("node1", "source"): "unknown", ("node2", "destination"): "unknown"})
    one_connection(vip("cart-alias"), 8080, {("node1", "source"): alias, ("node2", "destination"): alias})
    one_connection(vip("cart-api"), 80, {("node1", "source"): cart, ("node2", "destination"): cart})
    status, text = fetch(lab, "node2", "http://127.0.0.1:15020/metrics")
    line = next(l for l in text.splitlines() if l.startswith("istio_tcp_connections_closed_total{")
                and f'destination_service="{alias}"' in l and 'reporter="destination"' in l)
    assert 'destination_service_name="cart-alias"' in line and 'destination_service_namespace="shop"' in line


def test_destination_principal_of_traffic_leaving_the_mesh_follows_ztunnel(lab, servers):
    """ztunnel (src/proxy/metrics.rs with_destination, src/proxy/outbound.rs): a known
    destination workload gives its identity even without mTLS; an address outside the
    cluster gives none."""
    lab.apply("""
apiVersion: v1
kind: Pod
metadata: {name: plain, namespace: default, labels: {app: plain}}
spec: {nodeName: node2, serviceAccountName: plain-sa}
""")
    settle(lab)
    srv = servers(lab)
    srv.serve("default/plain", 9200, "plain")
    outside = lab.node_exec("node2", [sys.executable, PEER, "serve", "9300", "outside"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert outside.stdout.readline().strip() == "ready"
        common = dict(reporter="source", source_workload="web", connection_security_policy="unknown",
                      response_flags="-", destination_service="unknown")

        def closed(**labels):
            status, text = fetch(lab, "node1", "http://127.0.0.1:15020/metrics")
            assert status == 200
            return series(text, "istio_tcp_connections_closed_total", **common, **labels)

        to_pod = dict(destination_workload="plain", destination_workload_namespace="default",
                      destination_principal="spiffe://cluster.local/ns/default/sa/plain-sa")
        ok, banner = connect(lab, "shop/web-7d9f8b6c5d-abcde", lab.pod_ip("default/plain"), 9200, "x")
        assert ok and banner.startswith("plain "), banner
        wait_for(lambda: closed(**to_pod) == 1, timeout=10, what="passthrough to a known pod, its identity")

        to_outside = dict(destination_workload="unknown", destination_principal="unknown")
        before = closed(**to_outside)
        ok, banner = connect(lab, "shop/web-7d9f8b6c5d-abcde", lab.node_ip("node2"), 9300, "y")
        assert ok and banner.startswith("outside "), banner
        wait_for(lambda: closed(**to_outside) == before + 1, timeout=10,
                 what="passthrough outside the cluster, no identity")
    finally:
        outside.kill()
        outside.wait()
