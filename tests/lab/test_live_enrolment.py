"""Live enrolment: running pods the agent never heard about through CNI.

A pod started while its node's agent was down, or whose capture was lost
(records and BPF state wiped, as after a node reboot), must be found by its
IP and captured; damaged BPF state of a captured pod must be put back. Real
pods, real CNI chain, real eBPF, HBONE between two node agents.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest

from agent.capture import bpfsys
from tests.builders import MESH_CLIENT, MESH_NAMESPACE, MESH_SERVER, manifest, namespace
from tests.lab.conftest import agent_pod, connect, counters, running_lab, settle, wait_for

MANIFEST = manifest(MESH_NAMESPACE, namespace("plain"), MESH_CLIENT, MESH_SERVER)

LATE = """
apiVersion: v1
kind: Pod
metadata: {name: late, namespace: plain}
spec: {nodeName: node1, serviceAccountName: late}
"""


@pytest.fixture(scope="module")
def lab():
    with running_lab("live", MANIFEST, agent_args=["--reconcile-seconds", "0.5"]) as lab:
        yield lab


@pytest.fixture
def echo(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7070, "meshed")
    return lab.pod_ip("mesh/server")


def _known(lab, node, pod):
    status = lab.agent_request(node, {"op": "status"})
    return any(f"{p['namespace']}/{p['name']}" == pod for p in status["pods"])


def _meshed_connection(lab, pod, ip):
    """A connection from ``pod`` that must travel through the agents (HBONE)."""
    before = counters(lab, "node1", pod, "outbound")["connections"]
    ok, banner = connect(lab, pod, ip, 7070, "through-the-mesh")
    assert ok, banner
    assert counters(lab, "node1", pod, "outbound")["connections"] == before + 1


def test_pod_started_while_agent_was_down_joins_the_mesh_by_namespace_label(lab, echo):
    assert lab.stop_agent("node1")
    lab.start_agents = False    # keep it down while the pod starts
    try:
        lab.apply(LATE)         # CNI tells nobody: the agent is down, the pod is outside the mesh
    finally:
        lab.start_agents = True
        lab.start_agent("node1")
    settle(lab)
    assert not _known(lab, "node1", "plain/late")

    lab.set_labels("Namespace", None, "plain", {"istio.io/dataplane-mode": "ambient"})
    try:
        wait_for(lambda: _known(lab, "node1", "plain/late") and agent_pod(lab, "node1", "plain/late")["enrolled"],
                 what="the running pod found by its IP and captured")
        pod = agent_pod(lab, "node1", "plain/late")
        assert pod["ips"] == [lab.pod_ip("plain/late")]
        assert pod["identity"] == "spiffe://cluster.local/ns/plain/sa/late"
        _meshed_connection(lab, "plain/late", echo)
    finally:
        lab.set_labels("Namespace", None, "plain", {"istio.io/dataplane-mode": None})
    wait_for(lambda: not agent_pod(lab, "node1", "plain/late")["enrolled"], what="release by label")
    # Released: plaintext again (mesh/server accepts it, PERMISSIVE), past the agent.
    ok, banner = connect(lab, "plain/late", echo, 7070, "outside")
    assert ok, banner
    assert counters(lab, "node1", "plain/late", "outbound")["connections"] == 1


def test_capture_comes_back_after_records_and_bpf_state_are_wiped(lab, echo):
    """Like a node reboot: no records, no pinned BPF state; the pod is still there."""
    lab.stop_agent("node1")
    # The uninstall command: detaches node1's programs and drops its pins.
    done = subprocess.run([sys.executable, "-m", "agent.cli", "capture", "teardown",
                           "--pin-dir", lab.pin_dir("node1")], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert not os.path.exists(lab.pin_dir("node1"))
    shutil.rmtree(lab.node_dir("node1") / "pods")
    lab.start_agent("node1")
    wait_for(lambda: _known(lab, "node1", "mesh/client") and agent_pod(lab, "node1", "mesh/client")["enrolled"],
             what="mesh/client captured again")
    _meshed_connection(lab, "mesh/client", echo)
    status = lab.agent_request("node1", {"op": "status"})
    assert status["not_captured"] == []


def test_damaged_capture_is_restored_while_the_agent_runs(lab, echo):
    cookie = _cookie(lab, "mesh/client")
    link = os.path.join(lab.pin_dir("node1"), f"link_{cookie}")
    fd = bpfsys.obj_get(os.path.join(lab.pin_dir("node1"), "pod_config"))
    try:
        assert bpfsys.map_delete(fd, ctypes.c_uint64(cookie)), "pod_config had no entry to delete"
        os.unlink(link)
        wait_for(lambda: os.path.exists(link) and cookie in _enrolled_cookies(fd),
                 what="the agent restoring the pod's BPF state")
    finally:
        os.close(fd)
    assert agent_pod(lab, "node1", "mesh/client")["enrolled"]
    _meshed_connection(lab, "mesh/client", echo)


def _enrolled_cookies(fd: int) -> set[int]:
    return {int(k.value) for k in bpfsys.map_keys(fd, ctypes.c_uint64)}


def _cookie(lab, pod: str) -> int:
    for rec in lab.node_dir("node1").joinpath("pods").glob("*.json"):
        data = json.loads(rec.read_text())
        if f"{data['namespace']}/{data['name']}" == pod:
            return int(data["netns_cookie"])
    raise AssertionError(f"no record for {pod}")


def test_a_pod_that_cannot_be_found_is_reported_until_it_can(lab, echo):
    """Never a silent bypass: a meshed pod whose namespace cannot be found is
    listed by `status` (and counted in ambient_agent_pods_not_captured)."""
    from pyroute2 import IPRoute

    ip = lab.pod_ip("mesh/client")
    name = os.path.basename(lab.pod_netns("mesh/client"))
    lab.stop_agent("node1")
    shutil.rmtree(lab.node_dir("node1") / "pods")
    with IPRoute(netns=name) as ipr:
        (addr,) = [a for a in ipr.get_addr(family=2) if a.get_attr("IFA_ADDRESS") == ip]
        index, prefixlen = addr["index"], addr["prefixlen"]
        (default,) = ipr.get_default_routes(family=2)
        gateway = default.get_attr("RTA_GATEWAY")
        ipr.addr("del", index=index, address=ip, prefixlen=prefixlen)
    try:
        lab.start_agent("node1")
        status = wait_for(lambda: (lambda s: s if s["not_captured"] else None)(
            lab.agent_request("node1", {"op": "status"})), what="mesh/client reported")
        assert status["not_captured"] == [
            {"pod": "mesh/client", "problem": f"no network namespace on this node holds {ip}"}]
    finally:
        with IPRoute(netns=name) as ipr:
            ipr.addr("add", index=index, address=ip, prefixlen=prefixlen)
            ipr.route("replace", dst="default", gateway=gateway, oif=index)
    wait_for(lambda: _known(lab, "node1", "mesh/client") and agent_pod(lab, "node1", "mesh/client")["enrolled"],
             what="mesh/client captured once its address is back")
    assert lab.agent_request("node1", {"op": "status"})["not_captured"] == []
    _meshed_connection(lab, "mesh/client", echo)
