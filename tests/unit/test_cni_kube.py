"""ambient-cni with ``"state": "kube"``: the installed plugin as a child
process reading the pod and its namespace over real HTTP(S) from the
test-only API server (lab/kubeapi), and a stand-in node agent."""

from __future__ import annotations

import json

import pytest

from lab.kubeapi import objects
from lab.kubeapi.server import KubeApiServer
from tests.unit.test_cni_plugin import AMBIENT, PREV_100, Lab

UID = "0d7c1f0a-5b7e-4c39-9a57-3c1b2c6e1f00"


class KubeLab(Lab):
    def __init__(self, tmp_path, api: KubeApiServer) -> None:
        super().__init__(tmp_path)
        self.api = api
        self.kubeconfig = api.kubeconfig(tmp_path / "kubeconfig")

    def config(self, prev=PREV_100, version="1.0.0", **fields) -> bytes:
        fields.setdefault("state", "kube")
        fields.setdefault("kubeconfig", self.kubeconfig)
        fields.setdefault("api_timeout_seconds", 2)
        return super().config(prev, version, **fields)

    def env(self, command="ADD", namespace="mesh", uid=UID, **extra) -> dict:
        args = f"IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME=web;K8S_POD_UID={uid}"
        return super().env(command, CNI_ARGS=args, **extra)

    def add(self, namespace="mesh", **fields):
        return self.run(self.config(**fields), self.env(namespace=namespace))

    def objects(self, ns_labels=None, pod_labels=None, namespace="mesh") -> None:
        self.api.create(objects.namespace(namespace, ns_labels))
        pod = objects.pod("web", namespace, labels=pod_labels or {"app": "web"})
        pod["metadata"]["uid"] = UID
        self.api.create(pod)


@pytest.fixture
def api():
    with KubeApiServer() as server:
        yield server


@pytest.fixture
def lab(tmp_path, api):
    lab = KubeLab(tmp_path, api)
    yield lab
    for agent in lab.agents:
        agent.close()


def test_pod_of_a_mesh_namespace_is_enrolled_through_the_agent(lab, api):
    lab.objects(ns_labels=AMBIENT)
    agent = lab.agent()
    result = lab.add()
    assert result.code == 0 and result.out == PREV_100, result
    assert [r["op"] for r in agent.requests] == ["cni-add"]
    asked = [r.path for r in api.requests]
    assert "/api/v1/namespaces/mesh/pods/web" in asked and "/api/v1/namespaces/mesh" in asked


def test_pod_labelled_ambient_in_a_plain_namespace_waits_for_the_agent(lab):
    lab.objects(pod_labels=AMBIENT)
    result = lab.add(agent_timeout_seconds=0.3)          # no agent at all
    assert result.code == 1 and result.out["code"] == 11, result
    assert "agent unreachable" in result.out["msg"]


def test_pod_outside_the_mesh_passes_without_an_agent(lab):
    lab.objects()
    result = lab.add()
    assert result.code == 0 and result.out == PREV_100, result
    assert result.stderr == ""


def test_pod_not_yet_in_the_api_of_a_mesh_namespace_is_retried(lab, api):
    api.create(objects.namespace("mesh", AMBIENT))
    lab.agent()
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11, result
    assert "not yet known" in result.out["msg"] and "Kubernetes API" in result.out["details"]


def test_an_older_pod_of_the_same_name_counts_as_unknown(lab):
    lab.objects(ns_labels=AMBIENT)
    lab.agent()
    result = lab.run(lab.config(), lab.env(uid="another-uid"))
    assert result.code == 1 and result.out["code"] == 11 and "not yet known" in result.out["msg"]


@pytest.mark.parametrize("trouble", ["stopped", "http500", "unauthorized"])
def test_unreachable_api_fails_closed_with_try_again(lab, api, tmp_path, trouble):
    lab.objects(ns_labels=AMBIENT)
    agent = lab.agent()
    if trouble == "stopped":
        api.stop()
    elif trouble == "http500":
        api.fail_next.append(("/api/v1/namespaces/mesh/pods/web", 500))
    else:
        lab.kubeconfig = api.kubeconfig(tmp_path / "bad-kubeconfig", token="wrong")
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11, result
    assert result.out["msg"] == "Kubernetes API unreachable"
    assert agent.requests == []                          # never let through, never enrolled blind
    if trouble == "unauthorized":
        assert "HTTP 401" in result.out["details"]


def test_unreachable_api_does_not_block_an_excluded_namespace(lab, api):
    api.stop()
    result = lab.add(namespace="kube-system")
    assert result.code == 0 and result.out == PREV_100, result


def test_a_kubeconfig_that_is_not_json_is_reported(lab, tmp_path):
    (tmp_path / "yaml-kubeconfig").write_text("apiVersion: v1\nkind: Config\n")
    lab.kubeconfig = str(tmp_path / "yaml-kubeconfig")
    lab.objects(ns_labels=AMBIENT)
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11
    assert "not a JSON object" in result.out["details"]


def test_check_reads_the_api_and_asks_the_agent(lab):
    lab.objects(ns_labels=AMBIENT)
    agent = lab.agent(reply={"ok": True, "pods": [{"namespace": "mesh", "name": "web", "uid": UID,
                                                   "enrolled": False, "reason": "capture lost"}]})
    result = lab.run(lab.config(), lab.env("CHECK"))
    assert result.code == 1 and result.out["code"] == 100, result     # must be meshed, is not
    assert agent.requests == [{"op": "status"}]


def test_del_needs_no_api(lab, api):
    agent = lab.agent(reply={"ok": True})
    api.stop()
    result = lab.run(lab.config(prev=None), lab.env("DEL"))
    assert result.code == 0 and result.out is None, result
    assert agent.requests[0]["op"] == "cni-del"


# -- HTTPS with the kubeconfig's CA, as install-cni writes it -------------------------------

def _install_cni_kubeconfig(tmp_path, server: str, ca_pem: bytes, token: str) -> str:
    from cni.install import kubeconfig
    path = tmp_path / "tls-kubeconfig"
    path.write_text(json.dumps(kubeconfig(server, ca_pem, token)))
    return str(path)


@pytest.fixture
def tls_api():
    with KubeApiServer(tls=True) as server:
        yield server


def test_https_with_the_embedded_ca(tmp_path, tls_api):
    lab = KubeLab(tmp_path, tls_api)
    lab.kubeconfig = _install_cni_kubeconfig(tmp_path, tls_api.url, tls_api.ca_pem, tls_api.token)
    assert tls_api.url.startswith("https://")
    lab.objects(ns_labels=AMBIENT)
    agent = lab.agent()
    try:
        result = lab.add()
    finally:
        agent.close()
    assert result.code == 0, result
    assert [r["op"] for r in agent.requests] == ["cni-add"]


def test_https_with_a_foreign_ca_is_refused(tmp_path, tls_api):
    other_ca = KubeApiServer(tls=True).ca_pem                 # never started: only its CA is used
    lab = KubeLab(tmp_path, tls_api)
    lab.kubeconfig = _install_cni_kubeconfig(tmp_path, tls_api.url, other_ca, tls_api.token)
    lab.objects(ns_labels=AMBIENT)
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11
    assert "CERTIFICATE_VERIFY_FAILED" in result.out["details"]
