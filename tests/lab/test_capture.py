"""Capture, end to end: real pods, real CNI chain, real eBPF, two node agents.

Until HBONE lands, the agent forwards captured connections in plaintext
and counts them; these tests read those counters from the agents.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from tests.builders import MESH_CLIENT, MESH_NAMESPACE, MESH_SERVER, manifest, namespace, pod
from tests.lab.conftest import agent_pod, connect, counters, running_lab, wait_for

MANIFEST = manifest(
    MESH_NAMESPACE, namespace("plain"), MESH_CLIENT, MESH_SERVER,
    pod("neighbour", "mesh", node="node1"),
    pod("optout", "mesh", node="node1", labels={"istio.io/dataplane-mode": "none"}),
    pod("client", "plain", node="node1"),
    pod("server", "plain", node="node2"),
)


@pytest.fixture(scope="module")
def lab():
    with running_lab("cap", MANIFEST) as lab:
        yield lab


def node_of(pod: str) -> str:
    return {"mesh/client": "node1", "mesh/neighbour": "node1", "mesh/optout": "node1",
            "plain/client": "node1", "mesh/server": "node2", "plain/server": "node2"}[pod]


def test_enrolment_follows_istio_rule(lab):
    assert agent_pod(lab, "node1", "mesh/client")["enrolled"] is True
    assert agent_pod(lab, "node2", "mesh/server")["enrolled"] is True
    optout = agent_pod(lab, "node1", "mesh/optout")
    assert optout["enrolled"] is False and "none" in optout["reason"]
    assert agent_pod(lab, "node1", "plain/client")["enrolled"] is False


def test_outbound_capture_recovers_the_original_destination(lab, servers):
    srv = servers(lab)
    ip = lab.pod_ip("plain/server")
    srv.serve("plain/server", 8080, "port-8080")
    srv.serve("plain/server", 9090, "port-9090")
    before = counters(lab, "node1", "mesh/client", "outbound")
    ok, banner = connect(lab, "mesh/client", ip, 9090, "x" * 1000)
    assert ok, banner
    assert banner.startswith("port-9090 ")          # the port the app asked for
    assert f"local={ip}:9090" in banner              # and the address
    ok, banner = connect(lab, "mesh/client", ip, 8080, "y")
    assert ok and banner.startswith("port-8080 "), banner
    after = counters(lab, "node1", "mesh/client", "outbound")
    assert after["connections"] == before["connections"] + 2
    # peer.py sends its banner (~60 bytes) and echoes the message.
    assert after["bytes_sent"] - before["bytes_sent"] == 1001
    assert after["bytes_received"] - before["bytes_received"] >= 1001 + 2 * 40
    # The agent connects from inside the client pod: the server sees the pod's address.
    assert f"peer={lab.pod_ip('mesh/client')}:" in banner


def test_inbound_capture_hands_connections_to_the_agent(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7070, "app")
    before = counters(lab, "node2", "mesh/server", "inbound")
    ok, banner = connect(lab, "plain/client", lab.pod_ip("mesh/server"), 7070, "ping")
    assert ok, banner
    after = counters(lab, "node2", "mesh/server", "inbound")
    assert after["connections"] == before["connections"] + 1
    assert after["bytes_received"] - before["bytes_received"] == 4
    # The app sees the connection come from inside its own pod (the agent).
    assert f"peer={lab.pod_ip('mesh/server')}:" in banner


def test_port_15008_reaches_the_hbone_listener(lab):
    before = counters(lab, "node2", "mesh/server", "hbone")
    ok, result = connect(lab, "plain/client", lab.pod_ip("mesh/server"), 15008, "z", timeout=3)
    # Plain TCP to 15008 reaches the HBONE listener, which wants TLS: refused.
    assert not ok
    after = counters(lab, "node2", "mesh/server", "hbone")
    assert after["connections"] == before["connections"] + 1


def test_meshed_to_meshed_travels_over_hbone_with_both_identities(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7071, "both")
    in_before = counters(lab, "node2", "mesh/server", "inbound")
    ok, banner = connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7071, "hi")
    assert ok, banner
    client_id = "spiffe://cluster.local/ns/mesh/sa/client"
    server_id = "spiffe://cluster.local/ns/mesh/sa/server"
    out = agent_pod(lab, "node1", "mesh/client")
    assert out["identity"] == client_id
    [rec] = [r for r in out["connections"] if r["destination"].endswith(":7071")]
    assert (rec["direction"], rec["protocol"], rec["outcome"]) == ("outbound", "HBONE", "closed")
    assert (rec["source_identity"], rec["destination_identity"]) == (client_id, server_id)
    assert rec["bytes_sent"] == 2
    inbound = agent_pod(lab, "node2", "mesh/server")
    [rec] = [r for r in inbound["connections"] if r["destination"].endswith(":7071")]
    assert (rec["direction"], rec["protocol"], rec["outcome"]) == ("hbone", "HBONE", "closed")
    assert (rec["source_identity"], rec["destination_identity"]) == (client_id, server_id)
    assert rec["source"].startswith(lab.pod_ip("mesh/client") + ":")   # from the forwarded header
    # It arrived over 15008, not as plaintext.
    assert counters(lab, "node2", "mesh/server", "inbound") == in_before


def test_pods_outside_the_mesh_are_untouched(lab, servers):
    srv = servers(lab)
    srv.serve("plain/server", 6060, "plain")
    before = lab.agent_request("node1", {"op": "status"})["capture"]
    ok, banner = connect(lab, "plain/client", lab.pod_ip("plain/server"), 6060, "hi")
    assert ok, banner
    # The server sees the real client address: nothing stood in between.
    assert f"peer={lab.pod_ip('plain/client')}:" in banner
    assert counters(lab, "node1", "plain/client", "outbound")["connections"] == 0
    # An opted-out pod in an ambient namespace is untouched too.
    ok, banner = connect(lab, "mesh/optout", lab.pod_ip("plain/server"), 6060, "hi")
    assert ok and f"peer={lab.pod_ip('mesh/optout')}:" in banner
    after = lab.agent_request("node1", {"op": "status"})["capture"]
    assert after["outbound_captured"] == before["outbound_captured"]


def test_agent_marked_sockets_are_exempt(lab, servers):
    srv = servers(lab)
    srv.serve("plain/server", 6061, "direct")
    before = counters(lab, "node1", "mesh/client", "outbound")
    ok, banner = connect(lab, "mesh/client", lab.pod_ip("plain/server"), 6061, "m", mark=0x539)
    assert ok, banner
    assert f"peer={lab.pod_ip('mesh/client')}:" in banner
    assert counters(lab, "node1", "mesh/client", "outbound")["connections"] == before["connections"]


def test_traffic_inside_a_pod_is_not_captured(lab, servers):
    srv = servers(lab)
    ip = lab.pod_ip("mesh/client")
    srv.serve("mesh/client", 5050, "self")
    out_before = counters(lab, "node1", "mesh/client", "outbound")
    in_before = counters(lab, "node1", "mesh/client", "inbound")
    for host in (ip, "127.0.0.1"):
        ok, banner = connect(lab, "mesh/client", host, 5050, "me")
        assert ok, (host, banner)
    assert counters(lab, "node1", "mesh/client", "outbound") == out_before
    assert counters(lab, "node1", "mesh/client", "inbound") == in_before


def test_health_probes_from_the_node_bypass_capture(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 8081, "probe-target")
    before = counters(lab, "node2", "mesh/server", "inbound")
    # The kubelet probes from the node's network namespace (the pod's gateway address).
    ok, banner = connect(lab, None, lab.pod_ip("mesh/server"), 8081, "probe", node="node2")
    assert ok, banner
    assert "peer=" in banner and f"peer={lab.pod_ip('mesh/server')}:" not in banner
    assert counters(lab, "node2", "mesh/server", "inbound") == before
    # The same port from another node is captured.
    ok, banner = connect(lab, None, lab.pod_ip("mesh/server"), 8081, "remote", node="node1")
    assert ok, banner
    assert counters(lab, "node2", "mesh/server", "inbound")["connections"] == before["connections"] + 1


def test_each_agent_only_knows_its_own_nodes_pods(lab):
    for node in ("node1", "node2"):
        status = lab.agent_request(node, {"op": "status"})
        pods = {f"{p['namespace']}/{p['name']}" for p in status["pods"]}
        expected = {p for p in ("mesh/client", "mesh/neighbour", "mesh/optout", "plain/client",
                                "mesh/server", "plain/server") if node_of(p) == node}
        assert pods == expected


def test_enrol_and_release_at_run_time_by_label(lab, servers):
    srv = servers(lab)
    srv.serve("plain/server", 6062, "flip")
    ip = lab.pod_ip("plain/server")
    lab.set_labels("Pod", "plain", "client", {"istio.io/dataplane-mode": "ambient"})
    try:
        wait_for(lambda: agent_pod(lab, "node1", "plain/client")["enrolled"], what="enrolment")
        ok, banner = connect(lab, "plain/client", ip, 6062, "in")
        assert ok, banner
        assert counters(lab, "node1", "plain/client", "outbound")["connections"] >= 1
    finally:
        lab.set_labels("Pod", "plain", "client", {"istio.io/dataplane-mode": None})
    wait_for(lambda: not agent_pod(lab, "node1", "plain/client")["enrolled"], what="release")
    before = counters(lab, "node1", "plain/client", "outbound")
    ok, banner = connect(lab, "plain/client", ip, 6062, "out")
    assert ok and f"peer={lab.pod_ip('plain/client')}:" in banner
    assert counters(lab, "node1", "plain/client", "outbound") == before


def _mapped_libraries(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {os.path.basename(line.split()[5]) for line in f if len(line.split()) >= 6}


def _bpftool(*args: str) -> dict:
    done = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True, timeout=10)
    return json.loads(done.stdout)


def test_agents_never_map_bcc_or_llvm(lab, servers):
    # BCC compiles in a short-lived loader process; the agents only hold
    # pinned objects through bpf(), so LLVM never stays in the agents' memory.
    for node in ("node1", "node2"):
        libs = _mapped_libraries(lab.agent_pid(node))
        assert any(lib.startswith("libbpf.so") for lib in libs)   # the bpf() shell it does use
        heavy = sorted(lib for lib in libs if lib.startswith(("libbcc", "libLLVM", "libclang")))
        assert heavy == [], f"agent of {node} maps {heavy}"
    # ... and capture works in both directions with what the loader pinned.
    srv = servers(lab)
    srv.serve("plain/server", 6065, "no-llvm")
    before = counters(lab, "node1", "mesh/client", "outbound")
    ok, banner = connect(lab, "mesh/client", lab.pod_ip("plain/server"), 6065, "x")
    assert ok and banner.startswith("no-llvm "), banner
    assert counters(lab, "node1", "mesh/client", "outbound")["connections"] == before["connections"] + 1
    srv.serve("mesh/server", 7072, "inbound")
    before = counters(lab, "node2", "mesh/server", "inbound")
    ok, banner = connect(lab, "plain/client", lab.pod_ip("mesh/server"), 7072, "y")
    assert ok, banner
    assert counters(lab, "node2", "mesh/server", "inbound")["connections"] == before["connections"] + 1


def test_restart_points_every_pinned_link_at_the_new_sk_lookup_program(lab, servers):
    pin_dir = lab.pin_dir("node2")
    links = sorted(e for e in os.listdir(pin_dir) if e.startswith("link_"))
    assert links, "node2 has enrolled pods, so it has sk_lookup links"
    old = _bpftool("prog", "show", "pinned", f"{pin_dir}/prog_sk_lookup")["id"]
    assert {_bpftool("link", "show", "pinned", f"{pin_dir}/{e}")["prog_id"] for e in links} == {old}

    assert lab.stop_agent("node2")
    lab.start_agent("node2")
    new = _bpftool("prog", "show", "pinned", f"{pin_dir}/prog_sk_lookup")["id"]
    assert new != old
    assert sorted(e for e in os.listdir(pin_dir) if e.startswith("link_")) == links
    assert {_bpftool("link", "show", "pinned", f"{pin_dir}/{e}")["prog_id"] for e in links} == {new}
    assert not [e for e in os.listdir(pin_dir) if "_staged" in e]
    srv = servers(lab)
    srv.serve("mesh/server", 7073, "after-restart")
    before = counters(lab, "node2", "mesh/server", "inbound")
    ok, banner = connect(lab, "plain/client", lab.pod_ip("mesh/server"), 7073, "z")
    assert ok, banner
    assert counters(lab, "node2", "mesh/server", "inbound")["connections"] == before["connections"] + 1


def test_agent_death_fails_closed_and_restart_readopts(lab, servers):
    srv = servers(lab)
    srv.serve("plain/server", 6063, "outside")
    srv.serve("mesh/neighbour", 6064, "meshed-app")
    outside = lab.pod_ip("plain/server")
    meshed = lab.pod_ip("mesh/neighbour")
    assert connect(lab, "mesh/neighbour", outside, 6063)[0]

    assert lab.stop_agent("node1", signal.SIGKILL)
    # Outbound from an enrolled pod: refused, never sent around the agent.
    ok, result = connect(lab, "mesh/neighbour", outside, 6063, timeout=3)
    assert (ok, result) == (False, "ERROR ECONNREFUSED")
    # Inbound to the app's port: refused, never delivered unauthenticated.
    ok, result = connect(lab, "plain/server", meshed, 6064, timeout=3)
    assert not ok and result in ("ERROR ECONNREFUSED", "ERROR ECONNRESET"), result
    # A pod outside the mesh on the same node still works.
    assert connect(lab, "plain/client", outside, 6063)[0]

    lab.start_agent("node1")
    assert agent_pod(lab, "node1", "mesh/neighbour")["enrolled"] is True
    ok, banner = connect(lab, "mesh/neighbour", outside, 6063)
    assert ok, banner
    ok, banner = connect(lab, "plain/server", meshed, 6064)
    assert ok, banner
    assert counters(lab, "node1", "mesh/neighbour", "outbound")["connections"] == 1
    assert counters(lab, "node1", "mesh/neighbour", "inbound")["connections"] == 1
