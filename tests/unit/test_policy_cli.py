"""`ambient-agent policy check|explain` as processes: output and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests import builders

REPO = Path(__file__).resolve().parents[2]

SEED = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-website
  namespace: backend
spec:
  selector:
    matchLabels:
      app: api
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/frontend/sa/website"]
    to:
    - operation:
        ports: ["8080"]
"""

HTTP_RULE = """\
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: get-only
  namespace: backend
spec:
  rules:
  - to:
    - operation:
        methods: ["GET"]
"""

BROKEN = """\
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: broken
  namespace: backend
spec:
  action: DENY
  rules:
  - from:
    - source:
        ipBlocks: ["198.18.0.0/33"]
        principals: ["spiffe://cluster.local/ns/x/sa/y"]
    to:
    - operation:
        ports: [8080]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: backend
spec:
  mtls:
    mode: STRIKT
"""


def policy(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", "policy", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60)


def pod(namespace, name, labels, sa, ip):
    return builders.pod(name, namespace, labels=labels, sa=sa, node="node1", phase="Running", ips=[ip])


def write_state(tmp_path, *extra) -> str:
    items = [pod("backend", "api", {"app": "api"}, "api", "198.18.1.10"),
             pod("frontend", "website", {"app": "website"}, "website", "198.18.2.10"),
             pod("frontend", "other", {"app": "other"}, "other", "198.18.2.11"),
             pod("backend", "pending", {"app": "api"}, "api", "198.18.1.12"),
             *extra]
    del items[3]["status"]["podIP"], items[3]["status"]["podIPs"]
    path = tmp_path / "state.json"
    path.write_text(json.dumps(builders.object_list(*items)))
    return f"file:{path}"


def seed_objects():
    import yaml
    return list(yaml.safe_load_all(SEED))


# -- check ---------------------------------------------------------------------------

def test_check_accepts_valid_policies_and_warns(tmp_path):
    f = tmp_path / "policies.yaml"
    f.write_text(SEED + "---\n" + HTTP_RULE)
    result = policy("check", str(f))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "error:" not in result.stdout
    assert ("warning: AuthorizationPolicy backend/get-only rule 0: HTTP attributes (methods) cannot be checked "
            "at L4") in result.stdout
    assert "2 AuthorizationPolicy and 0 PeerAuthentication checked, 0 rejected, 1 warnings" in result.stdout


def test_check_prints_every_problem_and_exits_1(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text(SEED + "---\n" + BROKEN)
    result = policy("check", str(f))
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "error: AuthorizationPolicy backend/broken: " in out
    for words in ("ipBlocks[0]: bad CIDR range '198.18.0.0/33'", "malformed principal",
                  'ports[0]: must be a string, not a number (8080) (write "8080")',
                  "error: PeerAuthentication backend/default: spec.mtls.mode: unknown mTLS mode"):
        assert words in out, out
    assert "warning: AuthorizationPolicy backend/broken: rejected; a DENY policy that denies every connection" in out
    assert "2 rejected" in out


def test_check_json_list_and_skipped_items(tmp_path):
    f = tmp_path / "list.json"
    f.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        *seed_objects(), {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
                          "metadata": {"namespace": "backend"}, "spec": {}}]}))
    result = policy("check", str(f))
    assert result.returncode == 1
    assert "error: item 1: AuthorizationPolicy without metadata.name" in result.stdout


def test_check_unreadable_files_exit_2(tmp_path):
    missing = policy("check", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2 and "cannot read" in missing.stderr
    garbage = tmp_path / "garbage.yaml"
    garbage.write_text("{ not: [yaml")
    result = policy("check", str(garbage))
    assert result.returncode == 2 and "neither JSON" in result.stderr


def test_check_root_namespace_flag(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text(BROKEN.split("---\n")[0].replace("namespace: backend", "namespace: mesh-root"))
    result = policy("check", str(f), "--root-namespace", "mesh-root")
    assert result.returncode == 1
    assert "denies every connection to the whole mesh" in result.stdout


# -- explain -----------------------------------------------------------------------------

def test_explain_allowed_exit_0(tmp_path):
    state = write_state(tmp_path, *seed_objects())
    result = policy("explain", "--state", state, "--from", "frontend/website", "--to", "backend/api:8080")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ALLOWED: frontend/website -> backend/api:8080" in result.stdout
    assert "reason: allowed by ALLOW policy backend/allow-website rule 0" in result.stdout
    assert "decided by: backend/allow-website rule 0; mTLS PERMISSIVE; audit no" in result.stdout


def test_explain_denied_says_why_nothing_matched(tmp_path):
    state = write_state(tmp_path, *seed_objects())
    result = policy("explain", "--state", state, "--from", "frontend/other", "--to", "backend/api:8080")
    assert result.returncode == 1, result.stdout + result.stderr
    out = result.stdout
    assert "DENIED: frontend/other -> backend/api:8080" in out
    assert "decided by: a default" in out
    assert ("rule 0: from[0]: principal cluster.local/ns/frontend/sa/other is not in principals "
            "[cluster.local/ns/frontend/sa/website]") in out


def test_explain_plaintext_and_strict(tmp_path):
    strict = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
              "metadata": {"name": "default", "namespace": "backend"}, "spec": {"mtls": {"mode": "STRICT"}}}
    state = write_state(tmp_path, strict)
    plain = policy("explain", "--state", state, "--from", "frontend/website", "--to", "backend/api:8080",
                   "--plaintext")
    assert plain.returncode == 1
    assert "STRICT mTLS (PeerAuthentication backend/default, namespace-wide) and the connection is plaintext" \
        in plain.stdout
    mtls = policy("explain", "--state", state, "--from", "frontend/website", "--to", "backend/api:8080")
    assert mtls.returncode == 0 and "mTLS STRICT" in mtls.stdout


def test_explain_from_an_address(tmp_path):
    state = write_state(tmp_path, *seed_objects())
    result = policy("explain", "--state", state, "--from", "198.18.3.5", "--to", "backend/api:8080")
    assert result.returncode == 1
    assert "source: 198.18.3.5 (plaintext)" in result.stdout


def test_explain_reports_rejections_on_stderr(tmp_path):
    import yaml
    state = write_state(tmp_path, *yaml.safe_load_all(BROKEN))
    result = policy("explain", "--state", state, "--from", "frontend/website", "--to", "backend/api:8080")
    assert result.returncode == 1
    assert "DENY policy backend/broken is invalid" in result.stdout
    assert "warning: rejected AuthorizationPolicy backend/broken" in result.stderr


def test_explain_cannot_ask_exit_2(tmp_path):
    state = write_state(tmp_path)
    cases = [
        (["--from", "frontend/website", "--to", "backend/nope:8080"], "no pod backend/nope"),
        (["--from", "frontend/nope", "--to", "backend/api:8080"], "no pod frontend/nope"),
        (["--from", "frontend/website", "--to", "backend/api"], "expected NAMESPACE/POD:PORT"),
        (["--from", "website", "--to", "backend/api:80"], "expected NAMESPACE/POD"),
        (["--from", "frontend/website", "--to", "backend/pending:80"], "has no IP address"),
    ]
    for args, words in cases:
        result = policy("explain", "--state", state, *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert words in result.stderr, (args, result.stderr)
    bad_state = policy("explain", "--state", "etcd:x", "--from", "a/b", "--to", "c/d:1")
    assert bad_state.returncode == 2 and "unsupported state source 'etcd:x'" in bad_state.stderr
    no_config = policy("explain", "--state", "kube:/nonexistent/kubeconfig", "--from", "a/b", "--to", "c/d:1")
    assert no_config.returncode == 2 and "/nonexistent/kubeconfig does not exist" in no_config.stderr


def test_policy_is_a_registered_sub_command():
    result = subprocess.run([sys.executable, "-m", "agent.cli", "--help"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert "policy" in result.stdout
