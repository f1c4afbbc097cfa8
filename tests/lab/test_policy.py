"""L4 authorization in the data path: Istio's seed example, end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.builders import AMBIENT, allow_from, manifest, namespace, pod, strict_mtls
from tests.lab.conftest import agent_pod, connect, running_lab, settle, wait_for

HERE = Path(__file__).parent
MANIFEST = manifest(
    namespace("frontend", AMBIENT), namespace("backend", AMBIENT),
    pod("website", "frontend", node="node1", sa="website"),
    pod("intruder", "frontend", node="node1", sa="other"),
    pod("legacy", "default", node="node1"),
    pod("api", "backend", node="node2", sa="api", labels={"app": "api"}),
    allow_from("api-allow-website", "backend", app="api", principal="cluster.local/ns/frontend/sa/website",
               port="8080"),
    strict_mtls("backend"),
)

DENY_WEBSITE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-allow-website, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/frontend/sa/someone-else"]}}]
    to: [{operation: {ports: ["8080"]}}]
"""


@pytest.fixture(scope="module")
def lab():
    with running_lab("pol", MANIFEST) as lab:
        yield lab


def outcomes(lab, port):
    return [r["outcome"] for r in agent_pod(lab, "node2", "backend/api")["connections"]
            if r["destination"].endswith(f":{port}")]


def test_seed_example_allows_only_the_website_on_8080(lab, servers):
    srv = servers(lab)
    srv.serve("backend/api", 8080, "api")
    srv.serve("backend/api", 9090, "admin")
    api = lab.pod_ip("backend/api")
    ok, banner = connect(lab, "frontend/website", api, 8080, "hello")
    assert ok, banner
    # Another service account in the same namespace: denied (HBONE 401).
    ok, result = connect(lab, "frontend/intruder", api, 8080, "hello", timeout=3)
    assert not ok, result
    # The allowed identity on another port: denied.
    ok, result = connect(lab, "frontend/website", api, 9090, "hello", timeout=3)
    assert not ok, result
    # Plaintext from outside the mesh under STRICT: refused.
    ok, result = connect(lab, "default/legacy", api, 8080, "hello", timeout=3)
    assert not ok, result
    assert len([o for o in outcomes(lab, 8080) if o.startswith("refused: 401")]) == 1
    assert len([o for o in outcomes(lab, 9090) if o.startswith("refused: 401")]) == 1
    plaintext = [r for r in agent_pod(lab, "node2", "backend/api")["connections"]
                 if r["protocol"] == "TCP" and r["outcome"].startswith("refused")]
    assert plaintext and "STRICT" in plaintext[-1]["outcome"], plaintext
    assert agent_pod(lab, "node2", "backend/api")["counters"]["hbone"]["failed"] >= 2


def test_policy_explain_reads_the_same_state(lab):
    cmd = [sys.executable, "-m", "agent.cli", "policy", "explain", "--state", f"file:{lab.state_path}",
           "--from", "frontend/intruder", "--to", "backend/api:8080"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert "DENY" in done.stdout.upper() or "denied" in done.stdout, done.stdout + done.stderr
    done = subprocess.run(cmd[:-4] + ["--from", "frontend/website", "--to", "backend/api:8080"],
                          capture_output=True, text=True, timeout=30)
    assert "allow" in done.stdout.lower(), done.stdout + done.stderr


def test_a_policy_change_closes_a_connection_it_now_denies(lab, servers):
    srv = servers(lab)
    srv.serve("backend/api", 8080, "api")
    chat = lab.exec("frontend/website", [sys.executable, str(HERE / "peer.py"), "chat",
                                         lab.pod_ip("backend/api"), "8080"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert chat.stdout.readline().startswith("api ")
        chat.stdin.write("one\n")
        chat.stdin.flush()
        assert chat.stdout.readline().strip() == "one"
        lab.apply(DENY_WEBSITE)
        # The open connection is closed once the agent sees the new policy.
        def closed():
            chat.stdin.write("again\n")
            chat.stdin.flush()
            return chat.stdout.readline().strip() in ("EOF", "", "ERROR ECONNRESET")
        wait_for(closed, timeout=10, what="the denied connection to be closed")
        ok, result = connect(lab, "frontend/website", lab.pod_ip("backend/api"), 8080, "new", timeout=3)
        assert not ok, result
    finally:
        chat.kill()
        chat.wait()
        lab.apply(MANIFEST)
        settle(lab)


AUDIT_WEBSITE = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-website, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: AUDIT
  rules:
  - from: [{source: {principals: ["cluster.local/ns/frontend/sa/website"]}}]
"""


def test_audit_marks_the_record_without_changing_the_decision(lab, servers):
    srv = servers(lab)
    srv.serve("backend/api", 8080, "api")
    lab.apply(AUDIT_WEBSITE)
    settle(lab)
    api = lab.pod_ip("backend/api")

    def audited():
        ok, banner = connect(lab, "frontend/website", api, 8080, "audit-me")
        assert ok, banner
        recs = [r for r in agent_pod(lab, "node2", "backend/api")["connections"]
                if r["destination"].endswith(":8080") and r["outcome"] == "closed"]
        return recs[-1] if recs and recs[-1]["audit"] else None
    rec = wait_for(audited, timeout=10, what="an audited record")
    assert "allowed by ALLOW policy backend/api-allow-website" in rec["policy"]
    assert "audit-website" in rec["policy"]
    ok, _ = connect(lab, "frontend/intruder", api, 8080, "still-denied", timeout=3)
    assert not ok


def test_status_command_shows_pods_identities_and_denials(lab):
    done = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--run-dir", str(lab.node_dir("node2"))],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "node node2"
    api = next(line for line in lines if line.startswith("backend/api "))
    assert "spiffe://cluster.local/ns/backend/sa/api" in api and " yes " in api
    assert any("refused: 401" in line for line in lines), done.stdout
    as_json = subprocess.run([sys.executable, "-m", "agent.cli", "status", "--json", "--run-dir",
                              str(lab.node_dir("node2"))], capture_output=True, text=True, timeout=30)
    import json
    assert json.loads(as_json.stdout)["node"] == "node2"
