"""IPv6-only pods in a dual-stack lab (issue 14, points 1 and 4).

The pods of ``test_dual_stack.py`` have both families, so a pod known to
the agent only by its IPv6 address was never tested there. Here pods
annotated ``lab.ambient-agent/ip-families: IPv6`` get their sandbox from
the IPv6 host-local range alone: no IPv4 address, no IPv4 route. Such a pod

* is enrolled through CNI and reached pod to pod over HBONE, with an IPv6
  ``:authority`` (the agents' connection records, a packet capture with no
  plaintext), also from a client that is IPv6-only itself;
* is found by its IPv6 address when it was running before it joined the
  mesh (its namespace labelled later: no CNI call, the agent scans the
  node's network namespaces for the address, ``agent/enrol/discover.py``),
  and again after its agent restarted with no records and no BPF state;
* resolves a ServiceEntry host (AAAA, answered by the agent through the DNS
  capture) and connects to it by name, reaching the selected IPv6-only pod
  over HBONE.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.lab import Lab
from lab.model import IP_FAMILIES_ANNOTATION
from tests.builders import AMBIENT, MESH_CLIENT, MESH_NAMESPACE, manifest, namespace, pod
from tests.lab.conftest import (
    agent_pod,
    connect,
    pod_ip6,
    records,
    resolv_container,
    running_lab,
    settle,
    unique_name,
    wait_for,
)

DNS_SERVER = str(Path(__file__).with_name("dns_server.py"))
V6_ONLY = {IP_FAMILIES_ANNOTATION: "IPv6"}
SERVER_ID = "spiffe://cluster.local/ns/mesh/sa/server"
ENTRY_HOST = "server.example.internal"
MANIFEST = manifest(
    MESH_NAMESPACE, MESH_CLIENT, namespace("plain"),
    pod("client6", "mesh", node="node1", sa="client6", annotations=V6_ONLY),
    pod("server6", "mesh", node="node2", sa="server", labels={"app": "server"}, annotations=V6_ONLY),
    pod("dns", "plain", node="node2"),
    {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
     "metadata": {"name": "server-ext", "namespace": "mesh"},
     "spec": {"hosts": [ENTRY_HOST], "resolution": "STATIC", "location": "MESH_INTERNAL",
              "ports": [{"number": 80, "name": "tcp", "protocol": "TCP", "targetPort": 7090}],
              "workloadSelector": {"labels": {"app": "server"}}}},
)
# Started while node1's agent is down, outside the mesh: no CNI ADD ever reaches an agent.
LATE6 = manifest(pod("late6", "plain", node="node1", sa="late", annotations=V6_ONLY))
V4_ONLY_NET = ipaddress.ip_network("198.18.0.0/15")
LAB_V6 = ipaddress.ip_network("fd00:198:18::/48")
VIP6_RANGE = ipaddress.ip_network("2001:2::/48")

CONNECT_BY_NAME = r"""
import json, socket, sys
name, port, message = sys.argv[1], int(sys.argv[2]), sys.argv[3]
infos = socket.getaddrinfo(name, port, socket.AF_UNSPEC, socket.SOCK_STREAM)
addrs = [ai[4][0] for ai in infos]
family, _, _, _, sockaddr = infos[0]
with socket.socket(family, socket.SOCK_STREAM) as s:
    s.settimeout(5)
    s.connect(sockaddr)
    s.sendall(message.encode() + b"\n")
    s.shutdown(socket.SHUT_WR)
    data = b""
    while chunk := s.recv(4096):
        data += chunk
print(json.dumps({"addresses": addrs, "connected": sockaddr[0], "reply": data.decode()}))
"""


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("v6only")
    procs: list[subprocess.Popen] = []
    with running_lab("v6o", MANIFEST, dual_stack=True, agent_args=["--reconcile-seconds", "1"]) as lab:
        try:
            log = tmp / "queries.log"
            log.touch()
            server = lab.exec("plain/dns", [sys.executable, DNS_SERVER, "{}", str(log)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(server)
            assert server.stdout.readline().strip() == "ready", server.stderr.read()
            # client6's "container": a private mount namespace whose /etc/resolv.conf names
            # the DNS pod's IPv6 address (the only family client6 can reach).
            conf = tmp / "resolv.conf"
            conf.write_text(f"nameserver {pod_ip6(lab, 'plain/dns')}\noptions timeout:3 attempts:2\n")
            holder = resolv_container(lab, "mesh/client6", conf)
            procs.append(holder)
            lab.container_pid = holder.pid       # type: ignore[attr-defined]
            yield lab
        finally:
            for proc in procs:
                proc.kill()
                proc.wait(10)


def _known(lab: Lab, node: str, pod_name: str) -> bool:
    status = lab.agent_request(node, {"op": "status"})
    return any(f"{p['namespace']}/{p['name']}" == pod_name for p in status["pods"])


def test_an_ipv6_only_pod_has_no_ipv4_address_or_route(lab):
    for name, node in (("mesh/client6", "node1"), ("mesh/server6", "node2")):
        status = lab.pod(name)["status"]
        v6 = pod_ip6(lab, name)
        assert status["podIP"] == v6 and [x["ip"] for x in status["podIPs"]] == [v6], status
        assert ipaddress.ip_address(v6) in ipaddress.ip_network(lab.store.node_record(node)["pod_subnet6"])
        inside = lab.run(name, ["ip", "-4", "-o", "addr", "show"], check=True).stdout
        assert [line.split()[3] for line in inside.splitlines()] == ["127.0.0.1/8"], inside
        assert lab.run(name, ["ip", "-4", "route", "show"], check=True).stdout.strip() == ""
        assert "default via" in lab.run(name, ["ip", "-6", "route", "show"], check=True).stdout
    # Pods without the annotation keep both families.
    assert [ipaddress.ip_address(x["ip"]).version
            for x in lab.pod("mesh/client")["status"]["podIPs"]] == [4, 6]


def test_ipv6_only_pod_is_enrolled_and_reached_over_hbone(lab, servers, tmp_path):
    srv = servers(lab)
    srv.serve("mesh/server6", 7080, "app6", host="::")
    server6 = pod_ip6(lab, "mesh/server6")
    p = agent_pod(lab, "node2", "mesh/server6")
    assert p["enrolled"] and p["ips"] == [server6], p
    pcap = tmp_path / "wire6.pcap"
    dump = lab.wire_exec(["tcpdump", "-i", "wire", "--immediate-mode", "-U", "-n", "-Z", "root",
                          "-w", str(pcap), "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = {}
    try:
        time.sleep(1.0)   # tcpdump has no readiness signal
        # A dual-stack client and an IPv6-only one, both on node1.
        for client in ("mesh/client", "mesh/client6"):
            markers[client] = "V6ONLY-MARKER-" + unique_name()
            ok, banner = connect(lab, client, server6, 7080, markers[client])
            assert ok, (client, banner)
            assert banner.startswith("app6 ") and f"local={server6}:7080" in banner, banner
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
    read = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-A"], capture_output=True, text=True)
    assert f"{server6}.15008" in read.stdout, (dump.stderr.read().decode(), read.stderr)   # the tunnel ...
    for marker in markers.values():
        assert marker not in read.stdout                                                   # ... held the bytes
    for client in markers:
        out = records(lab, "node1", client, f"[{server6}]:7080")[-1]
        assert out["protocol"] == "HBONE" and out["destination_identity"] == SERVER_ID, out
        assert out["source"].startswith(f"[{pod_ip6(lab, client)}]:"), out
    # The server side checked the IPv6 :authority against the pod's only address.
    inbound = wait_for(lambda: [r for r in records(lab, "node2", "mesh/server6", f"[{server6}]:7080")
                                if r["source"].startswith(f"[{pod_ip6(lab, 'mesh/client6')}]:")],
                       what="the server's record of client6's stream")[-1]
    assert inbound["protocol"] == "HBONE" and inbound["outcome"] == "closed", inbound


def test_discovery_finds_an_ipv6_only_pod_by_its_address(lab, servers):
    """plain/late6 started while node1's agent was down, in a namespace outside
    the mesh: no agent heard of it through CNI, so when the namespace joins the
    mesh the agent must find its network namespace by its only address, an
    IPv6 one (``discover.scan``/``match``), as test_live_enrolment.py does for IPv4."""
    srv = servers(lab)
    srv.serve("mesh/server6", 7081, "late-target", host="::")
    assert lab.stop_agent("node1")
    lab.start_agents = False    # keep it down while the pod starts
    try:
        lab.apply(LATE6)
    finally:
        lab.start_agents = True
        lab.start_agent("node1")
    settle(lab)
    late6, server6 = pod_ip6(lab, "plain/late6"), pod_ip6(lab, "mesh/server6")
    assert [x["ip"] for x in lab.pod("plain/late6")["status"]["podIPs"]] == [late6]
    assert not _known(lab, "node1", "plain/late6")
    lab.set_labels("Namespace", None, "plain", AMBIENT)
    try:
        wait_for(lambda: _known(lab, "node1", "plain/late6") and agent_pod(lab, "node1", "plain/late6")["enrolled"],
                 timeout=15, what="plain/late6 found by its IPv6 address and captured")
        p = agent_pod(lab, "node1", "plain/late6")
        assert p["ips"] == [late6], p
        assert p["netns"] == lab.pod_netns("plain/late6"), p
        assert p["identity"] == "spiffe://cluster.local/ns/plain/sa/late", p
        ok, banner = connect(lab, "plain/late6", server6, 7081, "found-by-v6")
        assert ok, banner
        rec = records(lab, "node1", "plain/late6", f"[{server6}]:7081")[-1]
        assert rec["protocol"] == "HBONE" and rec["destination_identity"] == SERVER_ID, rec
        assert lab.agent_request("node1", {"op": "status"})["not_captured"] == []
    finally:
        lab.set_labels("Namespace", None, "plain", {"istio.io/dataplane-mode": None})
    wait_for(lambda: not agent_pod(lab, "node1", "plain/late6")["enrolled"], what="release by label")


def test_ipv6_only_pod_resolves_a_serviceentry_host_and_connects_by_name(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server6", 7090, "by-name", host="::")
    vips = lab.agent_request("node1", {"op": "status"})["dns"]["allocated_vips"]
    _vip4, vip6 = vips[f"mesh/server-ext/{ENTRY_HOST}"]
    assert ipaddress.ip_address(vip6) in VIP6_RANGE, vips
    before = lab.agent_request("node1", {"op": "status"})["dns"]["pods"].get(
        "mesh/client6", {"outcomes": {}})["outcomes"].get("local", 0)
    # dig AAAA over UDP and TCP: the agent's answer, through the IPv6 DNS capture.
    for opts in ((), ("+tcp",)):
        done = lab.run("mesh/client6", ["nsenter", "-t", str(lab.container_pid), "-m", "--",
                                        "dig", f"@{pod_ip6(lab, 'plain/dns')}", ENTRY_HOST, "AAAA", "+short",
                                        "+time=3", "+tries=2", *opts], timeout=30)
        assert done.stdout.split() == [vip6], done.stdout + done.stderr
    # glibc, as an application would: getaddrinfo for any family, then connect to
    # the first answer; with no IPv4 source address, RFC 6724 puts the IPv6 VIP first.
    done = lab.run("mesh/client6", ["nsenter", "-t", str(lab.container_pid), "-m", "--",
                                    sys.executable, "-c", CONNECT_BY_NAME, ENTRY_HOST, "80", "hello-by-name"],
                   timeout=30)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert vip6 in got["addresses"] and got["connected"] == vip6, got
    assert got["reply"].startswith("by-name ") and f"local={pod_ip6(lab, 'mesh/server6')}:7090" in got["reply"], got
    rec = records(lab, "node1", "mesh/client6", f"[{vip6}]:80")[-1]
    assert rec["protocol"] == "HBONE" and rec["destination_identity"] == SERVER_ID, rec
    counted = lab.agent_request("node1", {"op": "status"})["dns"]["pods"]["mesh/client6"]
    assert counted["outcomes"]["local"] >= before + 3, counted


def test_capture_of_an_ipv6_only_pod_comes_back_after_records_and_bpf_state_are_wiped(lab, servers):
    """Like a node reboot (test_live_enrolment.py does it for IPv4): node1's agent
    restarts with no records and no pinned BPF state, so it must find the
    enrolled IPv6-only pod's network namespace again by its address."""
    srv = servers(lab)
    srv.serve("mesh/server6", 7082, "after-restart", host="::")
    client6, server6 = pod_ip6(lab, "mesh/client6"), pod_ip6(lab, "mesh/server6")
    lab.stop_agent("node1")
    done = subprocess.run([sys.executable, "-m", "agent.cli", "capture", "teardown",
                           "--pin-dir", lab.pin_dir("node1")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    shutil.rmtree(lab.node_dir("node1") / "pods")
    lab.start_agent("node1")
    wait_for(lambda: _known(lab, "node1", "mesh/client6") and agent_pod(lab, "node1", "mesh/client6")["enrolled"],
             timeout=15, what="mesh/client6 found by its IPv6 address and captured again")
    p = agent_pod(lab, "node1", "mesh/client6")
    assert p["ips"] == [client6] and p["netns"] == lab.pod_netns("mesh/client6"), p
    ok, banner = connect(lab, "mesh/client6", server6, 7082, "rediscovered")
    assert ok, banner
    rec = records(lab, "node1", "mesh/client6", f"[{server6}]:7082")[-1]
    assert rec["protocol"] == "HBONE" and rec["destination_identity"] == SERVER_ID, rec
    assert lab.agent_request("node1", {"op": "status"})["not_captured"] == []


def test_an_ipv6_only_pod_fails_on_a_node_without_ipv6():
    """In a lab without dual stack the annotation cannot be honoured: the pod
    fails (as a kubelet reports a sandbox it cannot create), nothing else does."""
    with Lab(unique_name("v4o"), pod_timeout=10.0, start_agents=False) as lab:
        done = lab.up(manifest(pod("six", "default", node="node1", annotations=V6_ONLY),
                               pod("four", "default", node="node1")))
        assert done["created"] == ["default/four"], done
        assert "host-local has no range of IPv6" in done["failed"]["default/six"], done
        assert lab.pod("default/six")["status"]["phase"] == "Failed"
        assert [x["ip"] for x in lab.pod("default/four")["status"]["podIPs"]] == [lab.pod_ip("default/four")]
