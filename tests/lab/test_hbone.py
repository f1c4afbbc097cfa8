"""HBONE between lab pods, checked on the wire and by independent peers.

One two-node lab with its CA; pods in an ambient namespace on both nodes,
a pod outside the mesh on each.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.lab import Lab
from tests.builders import MESH_CLIENT, MESH_NAMESPACE, manifest, pod, service
from tests.interop.certs import CertFiles
from tests.interop.peers import nghttpx_hbone_server, node_hbone_client
from tests.lab.conftest import agent_pod, connect, counters, running_lab, settle, unique_name, wait_for

HERE = Path(__file__).parent
MANIFEST = manifest(
    MESH_NAMESPACE, MESH_CLIENT,
    pod("server", "mesh", node="node2", sa="server", labels={"app": "server"},
        containers=[{"name": "s", "ports": [{"name": "web", "containerPort": 7080}]}]),
    service("server", "mesh", selector={"app": "server"}, ports=[{"port": 80, "targetPort": "web"}]),
    pod("outsider", "default", node="node1"),
    pod("peer", "default", node="node2"),
)

CLIENT_ID = "spiffe://cluster.local/ns/mesh/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/mesh/sa/server"


@pytest.fixture(scope="module")
def lab():
    with running_lab("hb", MANIFEST) as lab:
        yield lab


def issue(lab: Lab, node: str, ns: str, sa: str, directory: Path) -> CertFiles:
    """A real mesh certificate from the lab CA (requested from inside the node)."""
    token = lab.node_dir(node) / "ca-token"
    uri = f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
    done = lab.node_run(node, [sys.executable, str(HERE / "issue_cert.py"), lab.ca_address, lab.ca_root,
                               str(token), uri], timeout=30, env={**os.environ, "PYTHONPATH": str(HERE.parents[1])})
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    directory.mkdir(parents=True, exist_ok=True)
    key, cert, chain = directory / f"{sa}.key", directory / f"{sa}.crt", directory / f"{sa}-chain.pem"
    key.write_text(out["key"])
    os.chmod(key, 0o600)
    cert.write_text(out["chain"][0])
    chain.write_text("".join(out["chain"][:-1]))
    return CertFiles(str(cert), str(key), str(chain), lab.ca_root, uri)


def in_pod(lab: Lab, pod: str):
    return functools.partial(lab.exec, pod)


def test_only_tls_on_15008_crosses_the_wire(lab, servers, tmp_path):
    srv = servers(lab)
    srv.serve("mesh/server", 7080, "app")
    srv.serve("default/peer", 7081, "plain")
    pcap = tmp_path / "wire.pcap"
    dump = lab.wire_exec(["tcpdump", "-i", "wire", "--immediate-mode", "-U", "-n", "-Z", "root", "-w", str(pcap), "tcp"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)   # tcpdump has no readiness signal; give it time to attach
        marker = "PLAINTEXT-MARKER-" + unique_name()
        ok, banner = connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7080, marker)
        assert ok, banner
        # Control: the same marker from a pod outside the mesh is visible.
        control = "CONTROL-MARKER-" + unique_name()
        ok, banner = connect(lab, "default/outsider", lab.pod_ip("default/peer"), 7081, control)
        assert ok, banner
        time.sleep(0.5)
    finally:
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
    read = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-A"], capture_output=True, text=True)
    text = read.stdout
    assert control in text, (dump.stderr.read().decode(), read.stderr)   # the capture saw application bytes
    assert marker not in text                   # ... but never the meshed ones
    meshed = {lab.pod_ip("mesh/client"), lab.pod_ip("mesh/server")}
    ports = set()
    for line in text.splitlines():
        if " IP " in line and " > " in line:
            src, dst = line.split(" IP ", 1)[1].split(":")[0].split(" > ")
            s_ip, s_port = src.rsplit(".", 1)
            d_ip, d_port = dst.rsplit(".", 1)
            if {s_ip, d_ip} == meshed:
                ports.add(d_port if d_ip == lab.pod_ip("mesh/server") else s_port)
    assert ports == {"15008"}, ports


def test_service_address_resolves_to_an_endpoint_over_hbone(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7080, "svc")
    vip = lab.pod("mesh/server")   # the Service's cluster IP comes from the state file
    svc = next(i for i in json.loads(Path(lab.state_path).read_text())["items"]
               if i["kind"] == "Service" and i["metadata"]["name"] == "server")
    ok, banner = connect(lab, "mesh/client", svc["spec"]["clusterIP"], 80, "via-service")
    assert ok, banner
    assert banner.startswith("svc ") and f"local={lab.pod_ip('mesh/server')}:7080" in banner
    rec = [r for r in agent_pod(lab, "node1", "mesh/client")["connections"]
           if r["destination"] == f"{svc['spec']['clusterIP']}:80"][-1]
    assert rec["protocol"] == "HBONE" and rec["destination_identity"] == SERVER_ID


def test_node_http2_client_reaches_the_app_through_15008(lab, servers, tmp_path):
    srv = servers(lab)
    srv.serve("mesh/server", 7082, "node-peer")
    certs = issue(lab, "node1", "mesh", "client", tmp_path)
    server_ip = lab.pod_ip("mesh/server")
    result = node_hbone_client((server_ip, 15008), f"{server_ip}:7082", lab.ca_root, certs,
                               expect_san=SERVER_ID, message="from-node", read_bytes=None,
                               spawn=in_pod(lab, "default/outsider"))
    assert result["returncode"] == 0, result
    assert result["status"] == 200 and result["peer_san"] == SERVER_ID
    assert result["body"].startswith("node-peer ") and result["body"].endswith("from-node")
    rec = [r for r in agent_pod(lab, "node2", "mesh/server")["connections"]
           if r["destination"].endswith(":7082")][-1]
    assert rec["source_identity"] == CLIENT_ID and rec["outcome"] == "closed"
    # Refusals, each as HBONE says: another pod's address (400), a closed port (503).
    result = node_hbone_client((server_ip, 15008), f"{lab.pod_ip('mesh/client')}:7082", lab.ca_root, certs,
                               message="x", spawn=in_pod(lab, "default/outsider"))
    assert result["status"] == 400, result
    result = node_hbone_client((server_ip, 15008), f"{server_ip}:7999", lab.ca_root, certs,
                               message="x", spawn=in_pod(lab, "default/outsider"))
    assert result["status"] == 503, result
    outcomes = [r["outcome"] for r in agent_pod(lab, "node2", "mesh/server")["connections"]]
    assert any("not an address of this pod" in o for o in outcomes)
    assert any(o.startswith("refused: 503 app unreachable") for o in outcomes)


TLS12_CLIENT = """
import socket, ssl, sys
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
ctx.maximum_version = ssl.TLSVersion.TLSv1_2
ctx.load_cert_chain(sys.argv[3], sys.argv[4])
ctx.set_alpn_protocols(["h2"])
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        with ctx.wrap_socket(s) as t:
            print("NEGOTIATED", t.version())
except (ssl.SSLError, OSError) as e:
    print("REFUSED", type(e).__name__)
"""


def test_tls12_and_foreign_certificates_are_refused(lab, tmp_path):
    certs = issue(lab, "node1", "mesh", "client", tmp_path)
    server_ip = lab.pod_ip("mesh/server")
    done = lab.run("default/outsider", [sys.executable, "-c", TLS12_CLIENT, server_ip, "15008",
                                        certs.chain_path, certs.key_path])
    assert done.stdout.startswith("REFUSED"), done.stdout + done.stderr
    from tests.interop.certs import TestPKI
    foreign = TestPKI(tmp_path / "foreign").issue("mesh", "client")
    result = node_hbone_client((server_ip, 15008), f"{server_ip}:7082", lab.ca_root, foreign,
                               message="x", spawn=in_pod(lab, "default/outsider"))
    assert result["returncode"] == 2, result
    outcomes = [r["outcome"] for r in agent_pod(lab, "node2", "mesh/server")["connections"]]
    assert any("TLS handshake failed" in o for o in outcomes), outcomes


def test_server_with_an_unexpected_identity_is_refused(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7083, "impostor")
    # The address now belongs, per the cluster state, to a workload with another identity.
    lab.set_labels("Pod", "mesh", "server", {})   # no-op write keeps the version moving
    state = json.loads(Path(lab.state_path).read_text())
    for item in state["items"]:
        if item["kind"] == "Pod" and item["metadata"]["name"] == "server":
            item["spec"]["serviceAccountName"] = "someone-else"
    tmp = Path(lab.state_path + ".edit")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, lab.state_path)
    try:
        def refused():
            ok, result = connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7083, "x", timeout=3)
            return not ok
        wait_for(refused, timeout=10, what="the client agent to see the new identity")
        outcomes = [r["outcome"] for r in agent_pod(lab, "node1", "mesh/client")["connections"]]
        assert any("not the expected spiffe://cluster.local/ns/mesh/sa/someone-else" in o for o in outcomes), outcomes
    finally:
        for item in state["items"]:
            if item["kind"] == "Pod" and item["metadata"]["name"] == "server":
                item["spec"]["serviceAccountName"] = "server"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, lab.state_path)
    wait_for(lambda: connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7083, "x")[0], timeout=10,
             what="the identity to be right again")


def test_outbound_tunnels_through_nghttpx(lab, servers, tmp_path):
    """Our outbound side against nghttpx as the HBONE server of a 'meshed' pod.

    default/peer is labelled into the mesh in the state while node2's agent
    is stopped, so nobody captures it and nghttpx answers its port 15008.
    """
    srv = servers(lab)
    srv.serve("default/peer", 7085, "behind-nghttpx")
    peer_id = "default"
    certs = issue(lab, "node2", "default", peer_id, tmp_path)
    lab.start_agents = False
    lab.stop_agent("node2")
    try:
        lab.set_labels("Pod", "default", "peer", {"istio.io/dataplane-mode": "ambient"})
        peer_ip = lab.pod_ip("default/peer")
        with nghttpx_hbone_server(certs, lab.ca_root, listen=("0.0.0.0", 15008), target_ports=[7085],
                                  spawn=in_pod(lab, "default/peer")) as nghttpx:
            # nghttpx hands the CONNECT (authority = the pod's address) to
            # tinyproxy, which connects to the app from inside the pod.
            time.sleep(1.0)   # the client's agent polls the state file every 0.2 s
            ok, banner = connect(lab, "mesh/client", peer_ip, 7085, "through-nghttpx", timeout=5,
                                 half_close=False)
        # nghttpx never ends a stream after the client's END_STREAM, so the
        # record is written when nghttpx goes away and the stream is reset.
        rec = wait_for(lambda: next((r for r in agent_pod(lab, "node1", "mesh/client")["connections"]
                                     if r["destination"] == f"{peer_ip}:7085"), None),
                       what="the connection record")
        assert rec["protocol"] == "HBONE"
        assert rec["destination_identity"] == "spiffe://cluster.local/ns/default/sa/default"
        assert ok, (banner, rec["outcome"])
        assert banner.startswith("behind-nghttpx ")
    finally:
        lab.set_labels("Pod", "default", "peer", {"istio.io/dataplane-mode": None})
        lab.start_agent("node2")
        lab.start_agents = True


def test_ca_unreachable_at_start_fails_closed_until_a_certificate_arrives(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7086, "late")
    lab.stop_ca()
    lab.start_agents = False         # up() would otherwise bring the CA back at once
    try:
        lab.up("""
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: mesh}
spec: {nodeName: node1, serviceAccountName: late}
""")
        assert agent_pod(lab, "node1", "mesh/late")["enrolled"] is True
        ok, result = connect(lab, "mesh/late", lab.pod_ip("mesh/server"), 7086, "x", timeout=8)
        assert not ok, result                 # captured, no certificate: nothing leaves
        rec = agent_pod(lab, "node1", "mesh/late")["connections"][-1]
        assert rec["outcome"].startswith("failed"), rec
    finally:
        lab.start_agents = True
        lab.start_ca()
    wait_for(lambda: connect(lab, "mesh/late", lab.pod_ip("mesh/server"), 7086, "y")[0], timeout=30,
             what="a certificate once the CA is back")
    certs = {c["identity"]: c for c in lab.agent_request("node1", {"op": "status"})["certificates"]}
    assert certs["spiffe://cluster.local/ns/mesh/sa/late"]["state"] == "valid"
    assert certs["spiffe://cluster.local/ns/mesh/sa/late"]["failures"] == 0
    bundle = lab.agent_request("node1", {"op": "status"})["trust_bundle"]
    assert bundle["version"] == 1 and bundle["roots"][0]["subject"] == "O=cluster.local"


def test_sigterm_drains_open_connections_and_refuses_new_ones(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7087, "drain")
    chat = lab.exec("mesh/client", [sys.executable, str(HERE / "peer.py"), "chat", lab.pod_ip("mesh/server"), "7087"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert chat.stdout.readline().startswith("drain ")
        chat.stdin.write("before\n")
        chat.stdin.flush()
        assert chat.stdout.readline().strip() == "before"
        pid = lab.agent_pid("node1")
        lab.stop_agent("node1", signal.SIGTERM, wait=False)
        time.sleep(1.0)
        # New connections are refused while the agent drains ...
        ok, result = connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7087, "new", timeout=3)
        assert not ok, result
        # ... and the open one keeps working until the deadline (5 s by default).
        chat.stdin.write("during\n")
        chat.stdin.flush()
        assert chat.stdout.readline().strip() == "during"
        wait_for(lambda: lab.agent_pid("node1") is None, timeout=15, what="the agent to exit")
        # After the deadline the connection is cut.
        chat.stdin.write("after\n")
        chat.stdin.flush()
        assert chat.stdout.readline().strip() in ("EOF", "", "ERROR ECONNRESET")
    finally:
        chat.kill()
        chat.wait()
        if lab.agent_pid("node1") is None:
            lab.start_agent("node1")
    assert connect(lab, "mesh/client", lab.pod_ip("mesh/server"), 7087, "again")[0]


@pytest.mark.parametrize("killed", ["node2", "node1"])
def test_a_killed_agent_resets_the_applications_instead_of_ending_their_stream(lab, killed):
    """Issue 11, item 4: the destination side's agent dying mid-transfer used to
    hand the receiving application a clean FIN after 728 MB of 1 GiB. Now the
    kernel resets the agent's application sockets (SO_LINGER 0) on both sides."""
    port = 7090 if killed == "node2" else 7091
    sink = lab.exec("mesh/server", [sys.executable, str(HERE / "peer.py"), "sink", str(port)],
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sender = None
    try:
        assert sink.stdout.readline().strip() == "ready"
        sender = lab.exec("mesh/client", [sys.executable, str(HERE / "peer.py"), "send",
                                          lab.pod_ip("mesh/server"), str(port)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert sender.stdout.readline().strip() == "connected"
        wait_for(lambda: counters(lab, "node2", "mesh/server", "hbone")["bytes_received"] > 4 << 20,
                 timeout=20, what="a few MB through the mesh")
        assert lab.stop_agent(killed, signal.SIGKILL, wait=True)
        received = json.loads(sink.communicate(timeout=30)[0].strip().splitlines()[-1])
        sent = json.loads(sender.communicate(timeout=30)[0].strip().splitlines()[-1])
        assert received["bytes"] > 0
        # Never a FIN for a cut stream: both applications see a reset.
        assert received["end"] == "ECONNRESET", received
        assert sent["end"] in ("ECONNRESET", "EPIPE"), sent
    finally:
        for proc in (sink, sender):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        if lab.agent_pid(killed) is None:
            lab.start_agent(killed)
            settle(lab)
