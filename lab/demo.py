"""`make demo`: the product working in a two-node lab, narrated.

Creates the lab from examples/lab.yaml (agents first, then pods through the
real CNI chain), shows which pods are enrolled, sends traffic that the eBPF
programs capture, shows the agents' counters, shows that killing an agent
fails closed and that a restarted one re-adopts its pods, then tears it all
down. Nothing outside the lab's own namespaces is touched.
"""

from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.lab import Lab

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "examples" / "lab.yaml"
SERVER = ("import socket,sys\n"
          "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
          "s.bind(('0.0.0.0',8080));s.listen(8);print('ready',flush=True)\n"
          "while True:\n"
          "  c,a=s.accept();d=c.recv(4096);c.sendall(b'api saw '+d+(' from %s' % a[0]).encode());c.close()\n")
CLIENT = ("import socket,sys\n"
          "try:\n"
          "  c=socket.create_connection((sys.argv[1],8080),timeout=3);c.sendall(b'hello');print(c.recv(4096).decode())\n"
          "except OSError as e:\n"
          "  print('connection failed:',e)\n")


FETCH = ("import sys,urllib.request\n"
         "print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())\n")
DENY_OLD = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-allow-frontend, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["frontend"]}}]
    to: [{operation: {ports: ["8080"]}}]
"""


def tcp_metrics(lab: Lab, node: str) -> list[str]:
    text = lab.node_run(node, [sys.executable, "-c", FETCH, "http://127.0.0.1:15020/metrics"]).stdout
    out = []
    for line in text.splitlines():
        if line.startswith("istio_tcp_") and not line.endswith(" 0.0"):
            name = line.split("{")[0]
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line))
            out.append(f"{name}{{reporter={labels['reporter']}, {labels['source_workload']} -> "
                       f"{labels['destination_workload']}, {labels['connection_security_policy']}, "
                       f"flags={labels['response_flags']}}} {line.rsplit(' ', 1)[1]}")
    return out


def step(text: str) -> None:
    print(f"\n\033[1m==> {text}\033[0m", flush=True)


def show_counters(lab: Lab, node: str, pod: str) -> None:
    status = lab.agent_request(node, {"op": "status"})
    for p in status["pods"]:
        if f"{p['namespace']}/{p['name']}" == pod:
            c = p["counters"]
            print(f"    {node} agent, {pod}: enrolled={p['enrolled']} "
                  f"outbound={c['outbound']['connections']} conns/{c['outbound']['bytes_sent']}B sent, "
                  f"inbound={c['inbound']['connections']} conns/{c['inbound']['bytes_received']}B received, "
                  f"hbone={c['hbone']['connections']} mTLS conns/{c['hbone']['bytes_received']}B received")


def main() -> int:
    started = time.monotonic()
    lab = Lab("demo" + secrets.token_hex(2))
    try:
        step(f"creating lab {lab.name}: 2 nodes, their agents, 3 pods through bridge + host-local + ambient-cni")
        lab.up(MANIFEST)
        lab.settle()
        for pod in lab.status()["pods"]:
            print(f"    {pod['namespace']}/{pod['name']:<6} node={pod['node']} ip={pod['ip']} "
                  f"enrolled={pod['enrolled']} ({pod['reason']})")
        api_ip = lab.pod_ip("backend/api")

        step("starting a server in backend/api (port 8080)")
        server = lab.exec("backend/api", [sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
        server.stdout.readline()

        step("frontend/web (meshed) -> backend/api: captured by both agents, carried over HBONE (mTLS)")
        print("    " + lab.run("frontend/web", [sys.executable, "-c", CLIENT, api_ip]).stdout.strip())
        show_counters(lab, "node1", "frontend/web")
        show_counters(lab, "node2", "backend/api")
        for p in lab.agent_request("node1", {"op": "status"})["pods"]:
            for rec in p["connections"][-1:]:
                print(f"    node1 record: {rec['protocol']} {rec['source']} ({rec['source_identity']}) -> "
                      f"{rec['destination']} ({rec['destination_identity']}), {rec['bytes_sent']}B sent, "
                      f"{rec['bytes_received']}B received, {rec['outcome']}")

        step("packet capture on the underlay bridge while frontend/web sends a secret")
        with tempfile.TemporaryDirectory() as tmp:
            pcap = Path(tmp) / "wire.pcap"
            dump = lab.wire_exec(["tcpdump", "-i", "wire", "--immediate-mode", "-U", "-n", "-Z", "root",
                                  "-w", str(pcap), "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            secret = "TOP-SECRET-" + secrets.token_hex(4)
            lab.run("frontend/web", [sys.executable, "-c", CLIENT.replace("b'hello'", repr(secret.encode())), api_ip])
            time.sleep(0.5)
            dump.send_signal(signal.SIGINT)
            dump.wait(10)
            text = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-A"], capture_output=True, text=True).stdout
            ports = sorted(set(re.findall(r"> [\d.]+\.(\d+):", text)))
            print(f"    {len(text.splitlines())} lines captured; TCP ports seen (either end): {', '.join(ports)}; "
                  f"secret visible on the wire: {secret in text}")

        step("legacy/old (outside the mesh) -> backend/api: only the destination captures it")
        print("    " + lab.run("legacy/old", [sys.executable, "-c", CLIENT, api_ip]).stdout.strip())
        show_counters(lab, "node1", "legacy/old")
        show_counters(lab, "node2", "backend/api")

        step("policy: only the frontend namespace may reach backend/api on 8080, and only with mTLS")
        lab.apply(DENY_OLD + "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
                  "metadata: {name: default, namespace: backend}\nspec: {mtls: {mode: STRICT}}\n")
        lab.settle()
        print("    legacy/old: " + lab.run("legacy/old", [sys.executable, "-c", CLIENT, api_ip]).stdout.strip())
        print("    frontend/web: " + lab.run("frontend/web", [sys.executable, "-c", CLIENT, api_ip]).stdout.strip())
        for p in lab.agent_request("node2", {"op": "status"})["pods"]:
            for rec in p["connections"]:
                if rec["outcome"].startswith("refused"):
                    print(f"    denied {rec['source']} ({rec['source_identity'] or 'plaintext'}): {rec['outcome']}")

        step("Istio metrics that changed (node2's agent, port 15020)")
        for line in tcp_metrics(lab, "node2"):
            print("    " + line)

        step("killing node1's agent (SIGKILL): frontend/web must fail closed")
        lab.stop_agent("node1", signal.SIGKILL)
        print("    " + lab.run("frontend/web", [sys.executable, "-c", CLIENT, api_ip]).stdout.strip())

        step("restarting node1's agent: it re-adopts frontend/web from pinned BPF state")
        lab.start_agent("node1")
        print("    " + lab.run("frontend/web", [sys.executable, "-c", CLIENT, api_ip]).stdout.strip())
        show_counters(lab, "node1", "frontend/web")
        capture = lab.agent_request("node2", {"op": "status"})["capture"]
        print(f"    node2 eBPF counters: {json.dumps(capture)}")
        server.kill()
        server.wait()
    finally:
        step("tearing the lab down")
        problems = lab.down()
        for p in problems:
            print(f"    left behind: {p}")
    print(f"\ndemo finished in {time.monotonic() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
