"""The CA with Kubernetes authentication (`--tokens kube`): TokenReview against the test API server.

Real parts throughout: the CA serves gRPC over TLS on loopback, its
authenticator uses the official `kubernetes` client, which talks HTTP to
the stand-in API server in lab/kubeapi (TokenReview with the real
audience semantics, pod GETs). The cluster state the CA authorises against
comes from the same API server (`--state kube`, list and watch).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from agent.ca.kubeauth import TokenReviewAuthenticator
from agent.identity import pki
from agent.identity.client import CaError, StatusCode
from lab.kubeapi import objects
from lab.kubeapi.server import KubeApiServer

from .conftest import client_for, free_port, new_csr, running_ca, verify_chain

AGENT_NS, AGENT_SA = "istio-system", "ambient-agent"
API_URI = "spiffe://cluster.local/ns/backend/sa/api"          # runs on node-a
WEB_URI = "spiffe://cluster.local/ns/frontend/sa/web"         # runs on node-b
AGENT_URI = f"spiffe://cluster.local/ns/{AGENT_NS}/sa/{AGENT_SA}"


def run(coro, timeout=60):
    return asyncio.run(asyncio.wait_for(coro, timeout))


class Cluster:
    """The API server with the agents, two workloads and their tokens."""

    def __init__(self, api: KubeApiServer, tmp: Path) -> None:
        self.api = api
        self.uids: dict[str, str] = {}
        for pod in (objects.pod("agent-a", AGENT_NS, node="node-a", service_account=AGENT_SA, ip="10.0.0.2"),
                    objects.pod("agent-b", AGENT_NS, node="node-b", service_account=AGENT_SA, ip="10.0.1.2"),
                    objects.pod("api-0", "backend", node="node-a", service_account="api", ip="10.0.0.5"),
                    objects.pod("web-0", "frontend", node="node-b", service_account="web", ip="10.0.1.5")):
            created = api.create(pod)
            self.uids[pod["metadata"]["name"]] = created["metadata"]["uid"]

    def pod_token(self, token: str, namespace: str, sa: str, pod: str, *, with_node: bool,
                  audiences=("istio-ca",), uid: str | None = None) -> str:
        node = self.api.get("Pod", namespace, pod)["spec"]["nodeName"] if with_node else None
        self.api.add_pod_token(token, namespace, sa, pod, uid or self.uids[pod], node_name=node,
                               audiences=list(audiences))
        return token


@pytest.fixture
def cluster(env, tmp_path):
    with KubeApiServer() as api:
        c = Cluster(api, tmp_path)
        c.kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")
        yield c


def kube_config(env, cluster, **overrides):
    """Tokens and state both from the API server (a bare `kube` state uses the CA's --kubeconfig)."""
    values = dict(tokens="kube", state="kube", kubeconfig=cluster.kubeconfig,
                  node_agent_account=f"{AGENT_NS}/{AGENT_SA}")
    values.update(overrides)
    return env.config(**values)


def token_reviews(cluster) -> int:
    return len(cluster.api.requests_matching("/apis/authentication.k8s.io/v1/tokenreviews", method="POST"))


def test_agent_token_bound_to_its_node_gets_a_pod_certificate(env, cluster, tmp_path):
    token = cluster.pod_token("agent-a-node", AGENT_NS, AGENT_SA, "agent-a", with_node=True)

    async def scenario():
        async with running_ca(kube_config(env, cluster)) as server, \
                client_for(server, token=token) as client:
            chain = await client.create_certificate(new_csr(API_URI), 3600, API_URI)
            # Within the cache time the token is not reviewed again.
            again = await client.create_certificate(new_csr(API_URI), 3600, API_URI)
            return chain, again, server.root_pem

    chain, again, root = run(scenario())
    leaf = verify_chain(chain, root, tmp_path)
    assert pki.uri_sans(leaf) == [API_URI] and again
    assert token_reviews(cluster) == 1
    # The node came from the token's node-name extra: no pod was read.
    assert not cluster.api.requests_matching(f"/api/v1/namespaces/{AGENT_NS}/pods/agent-a")


def test_agent_token_without_node_extra_finds_its_node_through_its_pod(env, cluster, tmp_path):
    token = cluster.pod_token("agent-b-pod", AGENT_NS, AGENT_SA, "agent-b", with_node=False)

    async def scenario():
        async with running_ca(kube_config(env, cluster)) as server, \
                client_for(server, token=token) as client:
            return await client.create_certificate(new_csr(WEB_URI), 600, WEB_URI), server.root_pem

    chain, root = run(scenario())
    assert pki.uri_sans(verify_chain(chain, root, tmp_path)) == [WEB_URI]
    assert len(cluster.api.requests_matching(f"/api/v1/namespaces/{AGENT_NS}/pods/agent-b")) == 1


def test_workload_token_gets_its_own_identity_without_impersonation(env, cluster, tmp_path):
    token = cluster.pod_token("api-own", "backend", "api", "api-0", with_node=True)

    async def scenario():
        async with running_ca(kube_config(env, cluster)) as server, \
                client_for(server, token=token) as client:
            return await client.create_certificate(new_csr(API_URI), 600, None), server.root_pem

    chain, root = run(scenario())
    assert pki.uri_sans(verify_chain(chain, root, tmp_path)) == [API_URI]


def _refusal_cases(cluster):
    c = cluster
    return [
        # name, token, impersonate, csr identity, status, message fragment
        ("unknown token", "no-such-token", API_URI, API_URI, StatusCode.UNAUTHENTICATED,
         "token not authenticated by the Kubernetes API server: [invalid bearer token, token lookup failed]"),
        ("wrong audience",
         c.pod_token("agent-a-kube-aud", AGENT_NS, AGENT_SA, "agent-a", with_node=True,
                     audiences=("https://kubernetes.default.svc.cluster.local",)),
         API_URI, API_URI, StatusCode.UNAUTHENTICATED, "is invalid for the target audiences [\"istio-ca\"]"),
        ("not a service account",
         _user_token(c, "user-alice", "alice"), API_URI, API_URI, StatusCode.UNAUTHENTICATED,
         "token belongs to 'alice', not a service account"),
        ("token bound to no pod",
         _user_token(c, "legacy-sa", f"system:serviceaccount:{AGENT_NS}:{AGENT_SA}"), API_URI, API_URI,
         StatusCode.UNAUTHENTICATED, "is not bound to a pod"),
        ("workload impersonating another identity",
         c.pod_token("api-imp", "backend", "api", "api-0", with_node=True), WEB_URI, WEB_URI,
         StatusCode.PERMISSION_DENIED,
         "service account backend/api is not the node agent's service account "
         "(istio-system/ambient-agent), so it may not impersonate"),
        ("workload impersonating a pod on its own node",
         c.pod_token("web-imp", "frontend", "web", "web-0", with_node=False), AGENT_URI, AGENT_URI,
         StatusCode.PERMISSION_DENIED, "service account frontend/web is not the node agent's"),
        ("agent asking for an identity with no pod on its node",
         c.pod_token("agent-a-web", AGENT_NS, AGENT_SA, "agent-a", with_node=True), WEB_URI, WEB_URI,
         StatusCode.PERMISSION_DENIED,
         "node 'node-a' runs no pod with service account 'web' in namespace 'frontend', so its agent "
         "may not have identity spiffe://cluster.local/ns/frontend/sa/web"),
        ("pod-name extra whose pod runs on another node",
         c.pod_token("agent-b-api", AGENT_NS, AGENT_SA, "agent-b", with_node=False), API_URI, API_URI,
         StatusCode.PERMISSION_DENIED, "node 'node-b' runs no pod with service account 'api'"),
        ("token of a deleted pod whose name was reused",
         c.pod_token("agent-a-old", AGENT_NS, AGENT_SA, "agent-a", with_node=False, uid="uid-of-old-pod"),
         API_URI, API_URI, StatusCode.UNAUTHENTICATED,
         f"has UID {c.uids['agent-a']!r}, not the 'uid-of-old-pod' the token is bound to"),
        ("token bound to a pod that is gone",
         _gone_pod_token(c), API_URI, API_URI, StatusCode.UNAUTHENTICATED,
         "pod istio-system/agent-gone, which the token is bound to, does not exist"),
    ]


def _user_token(cluster, token, username):
    cluster.api.add_token(token, username, uid="u1", groups=["system:authenticated"], audiences=["istio-ca"])
    return token


def _gone_pod_token(cluster):
    # The real API server would no longer authenticate such a token; this
    # server does, which exercises the CA's own check of the pod.
    cluster.api.add_pod_token("tok-gone-pod", AGENT_NS, AGENT_SA, "agent-gone", "uid-gone",
                              audiences=["istio-ca"])
    return "tok-gone-pod"


def test_each_refusal_has_its_status_and_reason(env, cluster, caplog):
    cases = _refusal_cases(cluster)

    async def scenario():
        outcomes = []
        async with running_ca(kube_config(env, cluster)) as server:
            for name, token, impersonate, uri, _, _ in cases:
                caplog.clear()
                async with client_for(server, token=token) as client:
                    try:
                        await client.create_certificate(new_csr(uri), 600, impersonate)
                        outcomes.append((name, None, "issued", []))
                    except CaError as exc:
                        logged = [r.getMessage() for r in caplog.records
                                  if "refused certificate" in r.getMessage()]
                        outcomes.append((name, exc.code, exc.message, logged))
        return outcomes

    with caplog.at_level(logging.INFO, logger="agent.ca"):
        outcomes = run(scenario())
    for (name, token, _, _, code, fragment), (_, got, message, logged) in zip(cases, outcomes):
        assert got == code, f"{name}: {got} {message}"
        assert fragment in message, f"{name}: {message!r}"
        assert len(logged) == 1 and fragment in logged[0], f"{name}: {logged}"
        assert token not in message and token not in logged[0]       # tokens are never echoed


def test_api_server_trouble_is_unavailable_not_unauthenticated(env, cluster, caplog):
    fresh = cluster.pod_token("agent-a-fresh", AGENT_NS, AGENT_SA, "agent-a", with_node=True)
    podless = cluster.pod_token("agent-a-podless", AGENT_NS, AGENT_SA, "agent-a", with_node=False)

    async def scenario():
        async with running_ca(kube_config(env, cluster)) as server:
            async with client_for(server, token=fresh) as client:
                # An API error on the review (e.g. 500, or the CA's RBAC missing: 403).
                for code in (500, 403):
                    cluster.api.fail_next.append(("/apis/authentication.k8s.io/v1/tokenreviews", code))
                    with pytest.raises(CaError) as err:
                        await client.create_certificate(new_csr(API_URI), 600, API_URI)
                    assert err.value.code == StatusCode.UNAVAILABLE, err.value
                    assert f"Kubernetes API: HTTP {code}" in err.value.message
                # An API error on the pod lookup.
                async with client_for(server, token=podless) as other:
                    cluster.api.fail_next.append((f"/api/v1/namespaces/{AGENT_NS}/pods/agent-a", 500))
                    with pytest.raises(CaError) as err:
                        await other.create_certificate(new_csr(API_URI), 600, API_URI)
                    assert err.value.code == StatusCode.UNAVAILABLE
                    assert "cannot find the caller's node right now" in err.value.message
                    # ... and once the API answers again, the same token works.
                    assert await other.create_certificate(new_csr(API_URI), 600, API_URI)

        # The API server down: a kubeconfig pointing at a port nobody listens on.
        down = cluster.api.kubeconfig(env.root / "kubeconfig-down")
        with open(down) as fh:
            text = fh.read().replace(f":{cluster.api.port}", f":{free_port()}")
        with open(down, "w") as fh:
            fh.write(text)
        async with running_ca(kube_config(env, cluster, kubeconfig=down,
                                          state=f"kube:{cluster.kubeconfig}")) as server, \
                client_for(server, token=fresh) as client:
            started = time.monotonic()
            with pytest.raises(CaError) as err:
                await client.create_certificate(new_csr(API_URI), 600, API_URI)
            assert err.value.code == StatusCode.UNAVAILABLE
            assert "Kubernetes API unreachable" in err.value.message
            return time.monotonic() - started

    with caplog.at_level(logging.INFO, logger="agent.ca"):
        down_seconds = run(scenario())
    assert down_seconds < 10            # refused connections fail fast (the client retries 3 times)
    text = caplog.text
    assert "TokenReview failed: HTTP 500" in text
    assert "agent-a-fresh" not in text and "agent-a-podless" not in text


def test_a_pod_scheduled_later_entitles_its_node_agent(env, cluster):
    """The CA's state follows the API (watch): no restart needed for a new pod."""
    token = cluster.pod_token("agent-a-live", AGENT_NS, AGENT_SA, "agent-a", with_node=True)
    runner = "spiffe://cluster.local/ns/jobs/sa/runner"

    async def scenario():
        async with running_ca(kube_config(env, cluster)) as server, \
                client_for(server, token=token) as client:
            with pytest.raises(CaError) as err:
                await client.create_certificate(new_csr(runner), 600, runner)
            assert err.value.code == StatusCode.PERMISSION_DENIED
            cluster.api.create(objects.pod("runner-0", "jobs", node="node-a", service_account="runner",
                                           ip="10.0.0.7"))
            for _ in range(200):
                try:
                    return await client.create_certificate(new_csr(runner), 600, runner)
                except CaError as exc:
                    assert exc.code == StatusCode.PERMISSION_DENIED
                    await asyncio.sleep(0.05)
            raise AssertionError("the new pod never entitled node-a's agent")

    assert run(scenario())


def test_concurrent_requests_share_one_review_and_the_cache_expires(env, cluster):
    token = cluster.pod_token("agent-a-cache", AGENT_NS, AGENT_SA, "agent-a", with_node=True)

    async def scenario():
        from agent.ca.kubeauth import ReviewCache, api_client
        authenticator = TokenReviewAuthenticator(api_client(cluster.kubeconfig), "istio-ca",
                                                 cache=ReviewCache(ttl=0.3))
        try:
            async with running_ca(kube_config(env, cluster), authenticator=authenticator) as server, \
                    client_for(server, token=token) as client:
                csrs = [new_csr(API_URI) for _ in range(5)]
                await asyncio.gather(*(client.create_certificate(csr, 600, API_URI) for csr in csrs))
                first = token_reviews(cluster)
                await client.create_certificate(new_csr(API_URI), 600, API_URI)
                cached = token_reviews(cluster)
                await asyncio.sleep(0.4)
                await client.create_certificate(new_csr(API_URI), 600, API_URI)
                return first, cached, token_reviews(cluster)
        finally:
            authenticator.close()

    first, cached, expired = run(scenario())
    # Concurrent first requests share one review; later ones hit the cache until it expires.
    assert (first, cached, expired) == (1, 1, 2)


# -- the CA as a process ----------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]


def test_ca_process_with_kube_tokens(env, cluster, tmp_path):
    token = cluster.pod_token("agent-a-proc", AGENT_NS, AGENT_SA, "agent-a", with_node=True)
    port = free_port()
    bundle = tmp_path / "root.pem"
    log_path = tmp_path / "ca.log"
    cmd = [sys.executable, "-m", "agent.cli", "ca", "--ca-dir", env.ca_dir, "--tokens", "kube",
           "--kubeconfig", cluster.kubeconfig, "--node-agent-service-account", f"{AGENT_NS}/{AGENT_SA}",
           "--token-audience", "istio-ca", "--state", "kube",
           "--listen", f"127.0.0.1:{port}", "--root-cert-out", str(bundle)]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while not bundle.exists():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)

        async def request():
            from agent.identity.client import CaClient
            async with CaClient(f"127.0.0.1:{port}", bundle.read_bytes(), lambda: token) as client:
                chain = await client.create_certificate(new_csr(API_URI), 600, API_URI)
                with pytest.raises(CaError) as err:
                    await client.create_certificate(new_csr(WEB_URI), 600, WEB_URI)
                return chain, err.value.code

        chain, refused = run(request())
        leaf = x509.load_pem_x509_certificate(chain[0].encode())
        assert pki.uri_sans(leaf) == [API_URI] and refused == StatusCode.PERMISSION_DENIED
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=10)
    output = log_path.read_text()
    assert rc == 0, output
    assert f"issued {API_URI} to service account {AGENT_NS}/{AGENT_SA} on node 'node-a'" in output
    assert "agent-a-proc" not in output


def test_kube_tokens_outside_a_cluster_without_kubeconfig_is_a_clear_start_up_error(env, tmp_path):
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KUBERNETES_") and k != "KUBECONFIG"}
    clean["HOME"] = str(tmp_path / "home")          # no ~/.kube/config to fall back to
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "ca", "--ca-dir", env.ca_dir, "--tokens", "kube",
         "--state", f"file:{env.state}", "--listen", "127.0.0.1:0"],
        cwd=REPO, capture_output=True, text=True, timeout=30, env=clean)
    assert result.returncode == 1, result.stderr
    assert f"cannot review tokens: kubeconfig {tmp_path}/home/.kube/config does not exist (and not " \
        "running in a pod; pass --kubeconfig PATH)" in result.stderr
    assert not os.path.exists(env.ca_dir)

    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "ca", "--ca-dir", env.ca_dir, "--tokens", "kube",
         "--node-agent-service-account", "ambient-agent", "--state", f"file:{env.state}"],
        cwd=REPO, capture_output=True, text=True, timeout=30, env=clean)
    assert result.returncode == 1
    assert "node agent service account: service account 'ambient-agent': expected NAMESPACE/NAME" \
        in result.stderr
