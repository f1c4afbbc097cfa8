"""The user's own commands, with the real ``kubectl``, against real node agents.

What a user of this product types is ``kubectl label namespace NS
istio.io/dataplane-mode=ambient``. Here the real kubectl binary (see
tests/kubeapi/kubectl.py for which one) talks to the stand-in API server
(lab/kubeapi) that two lab node agents watch (``--state kube:KUBECONFIG``),
with real pods, real eBPF capture and HBONE between the agents, as in
tests/lab/test_kube.py. Each command's effect is checked on real state and
real traffic:

1. ``kubectl label namespace shop istio.io/dataplane-mode=ambient``: the
   running pods join the mesh (captured by the agents, annotated, and their
   traffic goes through the agents);
2. ``kubectl get pod -o yaml`` shows ``ambient.istio.io/redirection: enabled``;
3. ``kubectl apply -f`` a DENY AuthorizationPolicy: the connection already
   open between the pods is closed and a new one is refused;
4. ``kubectl label namespace shop istio.io/dataplane-mode-``: the pods are
   released (not captured, annotation removed, traffic bypasses the agents, so
   the DENY policy no longer applies to it).

kubectl runs inside the lab's underlay network namespace, where the API
server listens, over TLS with a bearer token (client-go sends no token over
plain HTTP). ``kubectl apply`` runs with ``--validate=false``: the stand-in
publishes no OpenAPI, which kubectl's client-side validation needs; on a real
cluster the flag is not needed. Apply itself works without OpenAPI (see
tests/kubeapi/test_kubectl_verbs.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agent.netns import NetnsSwitcher, open_netns
from lab import model, sysops
from lab.kubeapi.server import KubeApiServer
from lab.lab import Lab
from tests.kubeapi.kubectl import Kubectl, need_kubectl
from tests.lab.conftest import connect, counters, unique_name, wait_for
from tests.lab.kube_mirror import KubeMirror

PEER = str(Path(__file__).with_name("peer.py"))
REDIRECTION = "ambient.istio.io/redirection"
PORT = 7272

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node1, serviceAccountName: client}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: shop, labels: {app: server}}
spec: {nodeName: node2, serviceAccountName: server}
"""

DENY_CLIENT = """
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: shop}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    kubectl_binary = need_kubectl()
    work = tmp_path_factory.mktemp("kubectl")
    kubeconfig = str(work / "kubeconfig")
    lab = Lab(unique_name("kctl"), pod_timeout=20.0, start_agents=False,
              agent_args=["--state", f"kube:{kubeconfig}", "--reconcile-seconds", "0.5"])
    switcher = NetnsSwitcher()
    api = mirror = None
    try:
        lab.up(CLUSTER)            # pods outside the mesh: no agent needed yet
        lab.start_ca()
        # HTTPS on the underlay (the CA's address), so the certificate names it.
        api = KubeApiServer(bookmark_interval=0.5, tls=True, host=lab.ca_address.rpartition(":")[0])
        wire = sysops.netns_path(model.wire_netns(lab.name))
        fd = open_netns(wire)
        try:
            switcher.run(fd, api.start)
        finally:
            os.close(fd)
        api.kubeconfig(kubeconfig)
        mirror = KubeMirror(lab.state_path, api).__enter__()
        for node in lab.nodes:
            lab.start_agent(node)
        lab.start_agents = True
        yield lab, api, Kubectl(kubectl_binary, kubeconfig, work / "home", netns_path=wire)
    finally:
        if mirror is not None:
            mirror.__exit__(None, None, None)
        lab.down()
        if api is not None:
            api.stop()
        switcher.close()


def _enrolled(lab, node, pod) -> bool:
    status = lab.agent_request(node, {"op": "status"})
    return any(f"{p['namespace']}/{p['name']}" == pod and p["enrolled"] for p in status["pods"])


def _annotation(api, ns, name):
    return ((api.get("Pod", ns, name) or {}).get("metadata") or {}).get("annotations", {}).get(REDIRECTION)


def _outbound(lab, pod) -> int:
    """Outbound connections the agent counted for ``pod`` (0 when it does not know it)."""
    status = lab.agent_request("node1", {"op": "status"})
    ns, name = pod.split("/")
    if not any(p["namespace"] == ns and p["name"] == name for p in status["pods"]):
        return 0
    return counters(lab, "node1", pod, "outbound")["connections"]


def _open_chat(lab, server_ip) -> subprocess.Popen:
    chat = lab.exec("shop/client", [sys.executable, PEER, "chat", server_ip, str(PORT)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert chat.stdout.readline().startswith("shop-server "), "no banner on the chat connection"
    chat.stdin.write("one\n")
    chat.stdin.flush()
    assert chat.stdout.readline().strip() == "one"
    return chat


def _chat_closed(chat) -> bool:
    try:
        chat.stdin.write("again\n")
        chat.stdin.flush()
    except BrokenPipeError:
        return True
    return chat.stdout.readline().strip() in ("EOF", "", "ERROR ECONNRESET")


def test_label_apply_get_unlabel_with_the_real_kubectl(cluster, servers):
    lab, api, kubectl = cluster
    servers(lab).serve("shop/server", PORT, "shop-server")
    server_ip = lab.pod_ip("shop/server")
    assert not _enrolled(lab, "node1", "shop/client") and _annotation(api, "shop", "client") is None
    chat = None
    try:
        # 1. The product's used-by line: running pods join the mesh.
        done = kubectl.run("label", "namespace", "shop", "istio.io/dataplane-mode=ambient")
        assert done.stdout.strip() == "namespace/shop labeled"
        wait_for(lambda: _enrolled(lab, "node1", "shop/client"), what="shop/client captured")
        wait_for(lambda: _enrolled(lab, "node2", "shop/server"), what="shop/server captured")
        wait_for(lambda: _annotation(api, "shop", "client") == "enabled", what="shop/client annotated")
        wait_for(lambda: _annotation(api, "shop", "server") == "enabled", what="shop/server annotated")
        before = _outbound(lab, "shop/client")
        ok, banner = connect(lab, "shop/client", server_ip, PORT, "via-the-mesh")
        assert ok, banner
        assert _outbound(lab, "shop/client") == before + 1, "the connection did not pass the agent"

        # 2. What the user reads back.
        pod = yaml.safe_load(kubectl.run("get", "pod", "client", "-n", "shop", "-o", "yaml").stdout)
        assert pod["metadata"]["annotations"][REDIRECTION] == "enabled"
        assert pod["metadata"]["name"] == "client" and pod["spec"]["nodeName"] == "node1"
        listed = kubectl.run("get", "po", "-n", "shop", "-o", "name").stdout.split()
        assert listed == ["pod/client", "pod/server"]

        # 3. A DENY policy closes the connection that is already open.
        chat = _open_chat(lab, server_ip)
        done = kubectl.run("apply", "--validate=false", "-f", "-", stdin=DENY_CLIENT)
        assert done.stdout.strip() == "authorizationpolicy.security.istio.io/deny-client created"
        assert kubectl.run("get", "ap", "-n", "shop", "-o", "name").stdout.split() == [
            "authorizationpolicy.security.istio.io/deny-client"]
        wait_for(lambda: _chat_closed(chat), timeout=10, what="the denied open connection to close")
        ok, result = connect(lab, "shop/client", server_ip, PORT, "denied", timeout=3)
        assert not ok, result

        # 4. Out of the mesh again: released, unmarked, and past the agents.
        done = kubectl.run("label", "namespace", "shop", "istio.io/dataplane-mode-")
        assert done.stdout.strip() == "namespace/shop unlabeled"
        wait_for(lambda: not _enrolled(lab, "node1", "shop/client"), what="shop/client released")
        wait_for(lambda: not _enrolled(lab, "node2", "shop/server"), what="shop/server released")
        wait_for(lambda: _annotation(api, "shop", "client") is None, what="annotation removed")
        wait_for(lambda: _annotation(api, "shop", "server") is None, what="annotation removed")
        pod = yaml.safe_load(kubectl.run("get", "pod", "client", "-n", "shop", "-o", "yaml").stdout)
        assert REDIRECTION not in (pod["metadata"].get("annotations") or {})
        before = _outbound(lab, "shop/client")
        # Plaintext, not captured: the DENY policy (still there) is not on this path.
        ok, banner = connect(lab, "shop/client", server_ip, PORT, "outside")
        assert ok and banner.startswith("shop-server"), banner
        assert _outbound(lab, "shop/client") == before, "a released pod's traffic still passed the agent"
    finally:
        if chat is not None:
            chat.kill()
            chat.wait()
        kubectl.run("delete", "authorizationpolicy", "deny-client", "-n", "shop", "--ignore-not-found",
                    check=False)
        kubectl.run("label", "namespace", "shop", "istio.io/dataplane-mode-", check=False)
