"""`--state kube` wired into the CA (in-process and as a process) and the agent's CLI."""

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.ca.server import CaServer
from agent.identity.client import CaClient, CaError
from tests.identity.conftest import API_URI, PODS, TOKENS, WEB_URI, Env, free_port, new_csr, pod

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def env(tmp_path):
    e = Env(tmp_path)
    e.write_tokens(TOKENS)
    return e


def test_ca_with_kube_state_authorises_from_api_pods(kubeapi, kubeconfig, env):
    for p in PODS:
        kubeapi.create(p)

    async def scenario():
        server = CaServer(env.config(state=f"kube:{kubeconfig}"))
        await server.start()
        try:
            async def ask(uri):
                async with CaClient(f"127.0.0.1:{server.port}", server.root_pem,
                                    lambda: "token-node-a") as client:
                    return await client.create_certificate(new_csr(uri), 3600, uri)

            assert len(await ask(API_URI)) == 2          # api-0 runs on node-a in the API
            with pytest.raises(CaError):
                await ask(WEB_URI)                       # web-0 runs on node-b
            # A pod scheduled to node-a later, seen through the watch.
            kubeapi.create(pod("web-1", "frontend", "node-a", "web"))
            deadline = time.monotonic() + 10
            while server._state.pod("frontend", "web-1") is None:
                assert time.monotonic() < deadline, "the watch did not deliver the new pod"
                await asyncio.sleep(0.05)
            assert len(await ask(WEB_URI)) == 2
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_ca_with_a_bare_kube_uses_its_kubeconfig_flag(kubeapi, kubeconfig, env):
    kubeapi.create(PODS[0])

    async def scenario():
        server = CaServer(env.config(state="kube", kubeconfig=kubeconfig))
        await server.start()
        try:
            assert server._state.pod("backend", "api-0") is not None
        finally:
            await server.stop(0)

    asyncio.run(scenario())


def test_ca_process_with_state_kube(kubeapi, kubeconfig, env, tmp_path):
    for p in PODS:
        kubeapi.create(p)
    port = free_port()
    bundle = tmp_path / "root.pem"
    log_path = tmp_path / "ca.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "agent.ca.cli", "ca", "--ca-dir", env.ca_dir,
                                 "--tokens", env.tokens, "--state", f"kube:{kubeconfig}",
                                 "--listen", f"127.0.0.1:{port}", "--root-cert-out", str(bundle)],
                                cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not bundle.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)

        async def request():
            async with CaClient(f"127.0.0.1:{port}", bundle.read_bytes(), lambda: "token-node-a") as c:
                return await c.create_certificate(new_csr(API_URI), 3600, API_URI)

        assert len(asyncio.run(request())) == 2
    finally:
        proc.terminate()
        proc.wait(10)
    output = log_path.read_text()
    assert "first sync complete" in output
    assert kubeapi.requests_matching("/api/v1/pods", watch=True)
    # The CA reads pods only (its RBAC grants nothing else).
    assert {r.path for r in kubeapi.requests} == {"/api/v1/pods"}


def test_agent_run_with_an_unusable_kubeconfig_exits_with_a_clear_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "agent.cli", "run", "--node", "n1",
                          "--state", f"kube:{tmp_path}/missing", "--run-dir", str(tmp_path / "run")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1, out.stderr
    assert f"kubeconfig {tmp_path}/missing does not exist" in out.stderr


def test_policy_explain_reads_the_api(kubeapi, kubeconfig):
    from lab.kubeapi import objects
    kubeapi.create(objects.pod("api", "backend", ip="198.18.1.10", labels={"app": "api"}, service_account="api"))
    kubeapi.create(objects.pod("website", "frontend", ip="198.18.2.10", labels={"app": "website"},
                               service_account="website"))
    kubeapi.create(objects.authorization_policy("allow-website", "backend",
                                                principals=["cluster.local/ns/frontend/sa/website"]))
    out = subprocess.run([sys.executable, "-m", "agent.cli", "policy", "explain", "--state", f"kube:{kubeconfig}",
                          "--from", "frontend/website", "--to", "backend/api:8080"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "ALLOWED: frontend/website -> backend/api:8080" in out.stdout
    assert "allowed by ALLOW policy backend/allow-website rule 0" in out.stdout
