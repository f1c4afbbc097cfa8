"""ServiceEntry and WorkloadEntry destinations in a two-node lab (issue 14, item 4).

* a STATIC entry without addresses gets an auto-allocated virtual IP; its
  workloadSelector picks a meshed pod: a meshed client's connection to the
  virtual IP reaches that pod over HBONE (the agent's connection record, and
  a packet capture shows no plaintext marker on the wire);
* a STATIC entry selecting a WorkloadEntry that points at an unmeshed pod's
  address: reached in plaintext;
* a DNS entry passes through to the original destination even though it
  lists endpoints (a STATIC reading would send it there).

Every test runs twice (issue 14, "the same suites with IPv6 pods"): in an
IPv4 lab, and in a dual-stack lab where the client uses the entries' IPv6
addresses (the auto-allocated virtual IP from 2001:2::/48, a WorkloadEntry
at the unmeshed pod's IPv6 address, node2's IPv6 underlay address) and the
mesh must pick the selected pod's IPv6 address. IPv6-only pods resolving
an entry's host: tests/lab/test_ipv6_only.py.
"""

from __future__ import annotations

import ipaddress
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.state.model import load_state_text
from agent.state.serviceentry import V4_RANGE, V6_RANGE, resolve_host
from tests.builders import MESH_CLIENT, MESH_NAMESPACE, manifest, pod
from tests.lab.conftest import PEER, agent_pod, connect, running_lab, settle, unique_name, wait_for

DB_ID = "spiffe://cluster.local/ns/mesh/sa/db"
MANIFEST = manifest(
    MESH_NAMESPACE, MESH_CLIENT,
    pod("db", "mesh", node="node2", sa="db", labels={"app": "db"}),
    pod("legacy", "default", node="node2"),
    {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
     "metadata": {"name": "db-ext", "namespace": "mesh"},
     "spec": {"hosts": ["db.example.internal"], "resolution": "STATIC", "location": "MESH_INTERNAL",
              "ports": [{"number": 80, "name": "tcp", "protocol": "TCP", "targetPort": 7090}],
              "workloadSelector": {"labels": {"app": "db"}}}},
)


@pytest.fixture(scope="module", params=[4, 6], ids=["ipv4", "ipv6"])
def lab(request):
    family = request.param
    with running_lab(f"se{family}", MANIFEST, dual_stack=family == 6) as lab:
        lab.family = family           # type: ignore[attr-defined]
        legacy_ip = pod_ip(lab, "default/legacy")
        lab.apply(manifest(
            {"apiVersion": "networking.istio.io/v1beta1", "kind": "WorkloadEntry",
             "metadata": {"name": "legacy-vm", "namespace": "mesh"},
             "spec": {"address": legacy_ip, "labels": {"app": "legacy-vm"}, "ports": {"tcp": 7091}}},
            {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
             "metadata": {"name": "legacy-ext", "namespace": "mesh"},
             "spec": {"hosts": ["legacy.example.internal"], "resolution": "STATIC",
                      "ports": [{"number": 80, "name": "tcp", "protocol": "TCP"}],
                      "workloadSelector": {"labels": {"app": "legacy-vm"}}}},
            # DNS: passes through to the address the application chose (node2's
            # underlay address here), never to the listed endpoint.
            {"apiVersion": "networking.istio.io/v1alpha3", "kind": "ServiceEntry",
             "metadata": {"name": "outside", "namespace": "mesh"},
             "spec": {"hosts": ["outside.example.internal"], "resolution": "DNS",
                      "addresses": [node_ip(lab, "node2")],
                      "ports": [{"number": 7093, "name": "tcp", "protocol": "TCP"}],
                      "endpoints": [{"address": legacy_ip}]}},
        ))
        settle(lab)
        yield lab


def _state(lab):
    return load_state_text(Path(lab.state_path).read_text())


def pod_ip(lab, pod_name: str) -> str:
    """The pod's address of the lab's family (its IPv6 one in the dual-stack lab)."""
    ips = [x["ip"] for x in lab.pod(pod_name)["status"]["podIPs"]
           if ipaddress.ip_address(x["ip"]).version == lab.family]
    assert len(ips) == 1, lab.pod(pod_name)["status"]
    return ips[0]


def node_ip(lab, node: str) -> str:
    rec = lab.store.node_record(node)
    return rec["underlay_ip6"] if lab.family == 6 else rec["underlay_ip"]


def vip(lab, host: str) -> str:
    """The entry's address of the lab's family (resolve_host lists IPv4, then IPv6)."""
    (ip,) = [a for a in resolve_host(_state(lab), host) if ipaddress.ip_address(a).version == lab.family]
    return ip


def hostport(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _record(lab, destination: str) -> dict:
    def found():
        recs = [r for r in agent_pod(lab, "node1", "mesh/client")["connections"]
                if r["destination"] == destination]
        return recs[-1] if recs else None
    return wait_for(found, what=f"a connection record to {destination}")


def test_entries_are_valid_and_get_stable_virtual_ips(lab):
    state = _state(lab)
    assert not [e for e in state.errors if "Entry" in e], state.errors
    v4, v6 = resolve_host(state, "db.example.internal")
    assert ipaddress.ip_address(v4) in V4_RANGE and ipaddress.ip_address(v6) in V6_RANGE
    # Every node computes the same address: it depends on the entries alone.
    assert resolve_host(load_state_text(Path(lab.state_path).read_text()), "DB.example.internal.") == [v4, v6]


def test_virtual_ip_reaches_the_selected_meshed_pod_over_hbone(lab, servers, tmp_path):
    srv = servers(lab)
    srv.serve("mesh/db", 7090, "db", host="::" if lab.family == 6 else "0.0.0.0")
    address = vip(lab, "db.example.internal")
    db_ip = pod_ip(lab, "mesh/db")
    pcap = tmp_path / "wire.pcap"
    dump = lab.wire_exec(["tcpdump", "-i", "wire", "--immediate-mode", "-U", "-n", "-Z", "root", "-w", str(pcap),
                          "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)   # tcpdump has no readiness signal
        marker = "SE-MARKER-" + unique_name()
        ok, banner = connect(lab, "mesh/client", address, 80, marker)
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
    assert ok, banner
    # The selected pod's address of the VIP's family: over IPv6, its IPv6 one.
    assert banner.startswith("db ") and f"local={db_ip}:7090" in banner, banner
    rec = _record(lab, hostport(address, 80))
    assert rec["protocol"] == "HBONE" and rec["destination_identity"] == DB_ID, rec
    server = wait_for(lambda: [r for r in agent_pod(lab, "node2", "mesh/db")["connections"]
                               if r["destination"] == hostport(db_ip, 7090)],
                      what="the db pod's record of the HBONE stream")[-1]
    client_ip = pod_ip(lab, "mesh/client")
    assert server["protocol"] == "HBONE", server
    assert server["source"].startswith(f"[{client_ip}]:" if ":" in client_ip else f"{client_ip}:"), server
    text = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-A"], capture_output=True, text=True).stdout
    assert f"{db_ip}.15008" in text                     # the tunnel crossed the wire ...
    assert marker not in text                             # ... and the bytes were inside it


def test_workload_entry_at_an_unmeshed_pod_is_reached_in_plaintext(lab, servers):
    srv = servers(lab)
    srv.serve("default/legacy", 7091, "legacy", host="::" if lab.family == 6 else "0.0.0.0")
    address = vip(lab, "legacy.example.internal")
    ok, banner = connect(lab, "mesh/client", address, 80, "to-the-vm")
    assert ok, banner
    assert banner.startswith("legacy ") and f"local={pod_ip(lab, 'default/legacy')}:7091" in banner, banner
    rec = _record(lab, hostport(address, 80))
    assert rec["protocol"] == "TCP" and not rec.get("destination_identity"), rec


def test_dns_entry_passes_through_to_the_original_destination(lab):
    address = node_ip(lab, "node2")
    server = lab.node_exec("node2", [sys.executable, PEER, "serve", "7093", "node2", "--host", address],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        assert resolve_host(_state(lab), "outside.example.internal") == [address]
        ok, banner = connect(lab, "mesh/client", address, 7093, "outside")
        assert ok, banner
        assert banner.startswith("node2 ")
        rec = _record(lab, hostport(address, 7093))
        assert rec["protocol"] == "TCP", rec
    finally:
        server.kill()
        server.wait()
