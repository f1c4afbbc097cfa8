"""Dual-stack pods end to end (issue 14, point 1), in a lab made with ``dual_stack=True``.

Pods get an IPv4 address and an IPv6 one (a second host-local range inside
fd00:198:18::/48), the underlay carries both families, and every check of
the IPv4 suites that matters for IPv6 is repeated over IPv6: HBONE with an
IPv6 ``:authority``, a dual-stack Service, ``ipBlocks``/``destination.ip``,
probes from the node, discovery, and the peers in the connection records.
"""

from __future__ import annotations

import ipaddress
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.builders import MESH_CLIENT, MESH_NAMESPACE, manifest, pod, service
from tests.lab.conftest import (
    agent_pod,
    connect,
    counters,
    pod_ip6,
    records,
    running_lab,
    settle,
    unique_name,
    wait_for,
)
from tests.lab.test_observe import fetch, series

SERVER_ID = "spiffe://cluster.local/ns/mesh/sa/server"
DUAL_SERVICE = service("server", "mesh", selector={"app": "server"}, ports=[{"port": 80, "targetPort": 7080}])
DUAL_SERVICE["spec"]["ipFamilyPolicy"] = "PreferDualStack"
MANIFEST = manifest(
    MESH_NAMESPACE, MESH_CLIENT,
    pod("server", "mesh", node="node2", sa="server", labels={"app": "server"}),
    DUAL_SERVICE,
    pod("outsider", "default", node="node1"),
    pod("peer", "default", node="node2"),
)
LAB_V6 = ipaddress.ip_network("fd00:198:18::/48")


@pytest.fixture(scope="module")
def lab():
    with running_lab("ds", MANIFEST, dual_stack=True) as lab:
        yield lab


def test_pods_get_an_ipv4_and_an_ipv6_address_and_the_underlay_carries_both(lab):
    for name, node in (("mesh/client", "node1"), ("mesh/server", "node2"), ("default/peer", "node2")):
        status = lab.pod(name)["status"]
        v4, v6 = [x["ip"] for x in status["podIPs"]]
        assert status["podIP"] == v4 and ipaddress.ip_address(v4) in ipaddress.ip_network("198.18.0.0/15")
        rec = lab.store.node_record(node)
        assert ipaddress.ip_address(v6) in ipaddress.ip_network(rec["pod_subnet6"])
        assert ipaddress.ip_network(rec["pod_subnet6"]).subnet_of(LAB_V6)
    node = next(o for o in json.loads(Path(lab.state_path).read_text())["items"]
                if o["kind"] == "Node" and o["metadata"]["name"] == "node1")
    assert [ipaddress.ip_network(c).version for c in node["spec"]["podCIDRs"]] == [4, 6]
    # Node to node over the IPv6 underlay: node1 -> node2's pod subnet route.
    done = lab.node_run("node1", ["ip", "-6", "route", "get", pod_ip6(lab, "mesh/server")], check=True)
    assert lab.store.node_record("node2")["underlay_ip6"] in done.stdout


def test_discovery_finds_the_pod_by_its_ipv6_address(lab):
    # The agent records both families of the pod and steers both: its record
    # lists the IPv6 address too. (These pods came through CNI ADD, and have
    # IPv4 as well; the scan that finds a pod's netns by an IPv6 address alone
    # is tested with IPv6-only pods in test_ipv6_only.py.)
    for name, node in (("mesh/client", "node1"), ("mesh/server", "node2")):
        p = agent_pod(lab, node, name)
        assert p["enrolled"], p
        assert pod_ip6(lab, name) in p["ips"], p


def test_ipv6_pod_to_pod_goes_over_hbone_and_no_plaintext_crosses_the_wire(lab, servers, tmp_path):
    srv = servers(lab)
    srv.serve("mesh/server", 7080, "app", host="::")
    srv.serve("default/peer", 7081, "plain", host="::")
    client6, server6 = pod_ip6(lab, "mesh/client"), pod_ip6(lab, "mesh/server")
    pcap = tmp_path / "wire6.pcap"
    dump = lab.wire_exec(["tcpdump", "-i", "wire", "--immediate-mode", "-U", "-n", "-Z", "root",
                          "-w", str(pcap), "ip6 and tcp"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)   # tcpdump has no readiness signal; give it time to attach
        marker = "PLAINTEXT6-MARKER-" + unique_name()
        ok, banner = connect(lab, "mesh/client", server6, 7080, marker)
        assert ok, banner
        assert f"local={server6}:7080" in banner, banner
        control = "CONTROL6-MARKER-" + unique_name()
        ok, banner = connect(lab, "default/outsider", pod_ip6(lab, "default/peer"), 7081, control)
        assert ok, banner
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
    read = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-A"], capture_output=True, text=True)
    text = read.stdout
    assert control in text, (dump.stderr.read().decode(), read.stderr)   # the capture can fail
    assert marker not in text
    ports = set()
    for line in text.splitlines():
        if " IP6 " in line and " > " in line:
            src, dst = line.split(" IP6 ", 1)[1].split(": ")[0].split(" > ")
            s_ip, s_port = src.rsplit(".", 1)
            d_ip, d_port = dst.rsplit(".", 1)
            if {s_ip, d_ip} == {client6, server6}:
                ports.add(d_port if d_ip == server6 else s_port)
    assert ports == {"15008"}, ports
    # Both agents record the IPv6 peers: the client's as source, [server]:7080 as destination.
    out = records(lab, "node1", "mesh/client", f"[{server6}]:7080")[-1]
    assert out["protocol"] == "HBONE" and out["destination_identity"] == SERVER_ID, out
    assert out["source"].startswith(f"[{client6}]:"), out
    inbound = wait_for(lambda: records(lab, "node2", "mesh/server", f"[{server6}]:7080"),
                       what="the server's record of the IPv6 stream")[-1]
    assert inbound["protocol"] == "HBONE" and inbound["source"].startswith(f"[{client6}]:"), inbound


def test_metrics_name_the_ipv6_peers_workloads(lab, servers):
    """Both reporters resolve the IPv6 peer address to its pod (labels from the right peer)."""
    srv = servers(lab)
    srv.serve("mesh/server", 7082, "metrics", host="::")
    ok, banner = connect(lab, "mesh/client", pod_ip6(lab, "mesh/server"), 7082, "y" * 64)
    assert ok, banner
    common = dict(source_workload="client", source_workload_namespace="mesh",
                  source_principal="spiffe://cluster.local/ns/mesh/sa/client",
                  destination_workload="server", destination_workload_namespace="mesh",
                  destination_principal=SERVER_ID, connection_security_policy="mutual_tls")
    for node, reporter in (("node1", "source"), ("node2", "destination")):
        def scraped(node=node, reporter=reporter):
            status, text = fetch(lab, node, "http://127.0.0.1:15020/metrics")
            assert status == 200
            return series(text, "istio_tcp_received_bytes_total", reporter=reporter, **common) >= 64
        wait_for(scraped, timeout=10, what=f"{reporter} metrics of the IPv6 connection")


def test_dual_stack_service_reaches_the_ipv6_endpoint_over_hbone(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7080, "svc", host="::")
    svc = next(i for i in json.loads(Path(lab.state_path).read_text())["items"]
               if i["kind"] == "Service" and i["metadata"]["name"] == "server")
    v4, v6 = svc["spec"]["clusterIPs"]
    assert svc["spec"]["clusterIP"] == v4 and svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"]
    assert ipaddress.ip_address(v6) in LAB_V6
    ok, banner = connect(lab, "mesh/client", v6, 80, "via-service6")
    assert ok, banner
    assert banner.startswith("svc ") and f"local={pod_ip6(lab, 'mesh/server')}:7080" in banner, banner
    rec = records(lab, "node1", "mesh/client", f"[{v6}]:80")[-1]
    assert rec["protocol"] == "HBONE" and rec["destination_identity"] == SERVER_ID, rec
    # The IPv4 cluster IP of the same Service still picks the IPv4 endpoint.
    ok, banner = connect(lab, "mesh/client", v4, 80, "via-service4")
    assert ok and banner.split("local=")[1].removeprefix("::ffff:") == f"{lab.pod_ip('mesh/server')}:7080", banner


def test_ipblocks_and_destination_ip_match_ipv6(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7090, "blocks", host="::")
    srv.serve("mesh/server", 7091, "dest", host="::")
    client6, server6 = pod_ip6(lab, "mesh/client"), pod_ip6(lab, "mesh/server")
    lab.apply(f"""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-v6-client, namespace: mesh}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  action: DENY
  rules:
  - from: [{{source: {{ipBlocks: ["{client6}/128"]}}}}]
    to: [{{operation: {{ports: ["7090"]}}}}]
  - to: [{{operation: {{ports: ["7091"]}}}}]
    when: [{{key: destination.ip, values: ["{ipaddress.ip_network(server6 + '/64', strict=False)}"]}}]
""")
    settle(lab)
    try:
        # The IPv6 client address is in the block: denied; over IPv4 the same pod is not.
        ok, result = connect(lab, "mesh/client", server6, 7090, "x", timeout=3)
        assert not ok, result
        ok, banner = connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7090, "x")
        assert ok, banner
        # destination.ip: the IPv6 destination matches the /64, the IPv4 one does not.
        ok, result = connect(lab, "mesh/client", server6, 7091, "x", timeout=3)
        assert not ok, result
        ok, banner = connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7091, "x")
        assert ok, banner
        denied = [r for r in agent_pod(lab, "node2", "mesh/server")["connections"]
                  if r["destination"] in (f"[{server6}]:7090", f"[{server6}]:7091")]
        assert {r["destination"] for r in denied if r.get("outcome") != "ok"} == {
            f"[{server6}]:7090", f"[{server6}]:7091"}, denied
    finally:
        lab.apply("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-v6-client, namespace: mesh}
spec: {selector: {matchLabels: {app: nobody}}, action: DENY, rules: [{}]}
""")
        settle(lab)


def test_ipv6_probes_from_the_node_bypass_capture(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 8081, "probe-target", host="::")
    server6 = pod_ip6(lab, "mesh/server")
    before = counters(lab, "node2", "mesh/server", "inbound")
    # The kubelet probes from the node: the source is the pod's IPv6 gateway (cni0).
    ok, banner = connect(lab, None, server6, 8081, "probe", node="node2")
    assert ok, banner
    assert f"peer={lab.store.node_record('node2')['gateway6']}:" in banner, banner
    assert counters(lab, "node2", "mesh/server", "inbound") == before
    # The same port from another node over IPv6 is captured (plaintext inbound).
    ok, banner = connect(lab, None, server6, 8081, "remote", node="node1")
    assert ok, banner
    assert counters(lab, "node2", "mesh/server", "inbound")["connections"] == before["connections"] + 1
    rec = records(lab, "node2", "mesh/server", f"[{server6}]:8081")[-1]
    assert rec["source"].startswith(f"[{lab.store.node_record('node1')['underlay_ip6']}]:"), rec
