"""Enrolment through the CNI chain when things go wrong, and clean removal."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time

import pytest

from lab import sysops
from lab.lab import Lab
from tests.lab.conftest import agent_pod, unique_name

NAMESPACES = """
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
"""


def pod_yaml(ns: str, name: str, node: str = "node1") -> str:
    return f"""
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}}}
spec: {{nodeName: {node}}}
"""


@pytest.fixture
def lab():
    lab = Lab(unique_name("enr"), pod_timeout=3.0)
    try:
        lab.up(NAMESPACES + "---" + pod_yaml("plain", "first"))
        yield lab
    finally:
        lab.down()


def test_enrolled_pod_waits_for_its_agent_and_others_do_not(lab):
    lab.start_agents = False      # up() would otherwise start the agent again
    lab.stop_agent("node1")
    started = time.monotonic()
    report = lab.up(pod_yaml("plain", "outside"))
    assert report["failed"] == {}
    assert time.monotonic() - started < 3.0          # never waited on the missing agent

    report = lab.up(pod_yaml("mesh", "meshed"))
    message = report["failed"]["mesh/meshed"]
    assert "ambient node agent unreachable" in message, message
    assert lab.pod("mesh/meshed")["status"]["phase"] == "Failed"

    # Once the agent is back, a new pod waits through the retries and starts captured.
    lab.pod_timeout = 20.0
    timer = threading.Timer(1.0, lab.start_agent, args=("node1",))
    timer.start()
    try:
        report = lab.up(pod_yaml("mesh", "patient"))
    finally:
        timer.join()
    assert report["failed"] == {}, report
    assert agent_pod(lab, "node1", "mesh/patient")["enrolled"] is True


def test_garbage_on_the_agent_socket_gets_an_error_and_harms_nothing(lab):
    path = lab.agent_socket("node1")
    replies = []
    for payload in (b"\xff\xfe\x00garbage\n", b"[1,2,3]\n", b'{"op": "cni-add", "namespace": 5}\n',
                    b'{"op": "cni-add", "namespace": "a", "name": "b", "netns": "/nonexistent", "ips": ["198.18.9.9/24"]}\n',
                    b"x" * 200_000 + b"\n"):
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(path)
            try:
                s.sendall(payload)
                replies.append(json.loads(s.makefile("rb").readline()))
            except (BrokenPipeError, ConnectionResetError):
                replies.append({"ok": False, "error": "closed"})
    assert all(r["ok"] is False for r in replies), replies
    assert "not JSON" in replies[0]["error"]
    assert "must be a JSON object" in replies[1]["error"]
    assert "field 'netns' is required" in replies[2]["error"]
    assert "not in the cluster state" in replies[3]["error"]
    # The agent is alive and still serves its pods.
    assert lab.agent_request("node1", {"op": "status"})["ok"]
    assert agent_pod(lab, "node1", "plain/first")["enrolled"] is False


def test_the_agent_socket_is_root_only(lab):
    path = lab.agent_socket("node1")
    assert os.stat(path).st_mode & 0o777 == 0o600
    code = (
        "import os, socket\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.connect({path!r}); print('connected')\n"
        "except PermissionError:\n"
        "    print('refused')\n"
    )
    import sys
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=10)
    assert out.stdout.strip() == "refused", out


def _attached_program_ids() -> set[int]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", sysops.CGROUP_V2],
                         capture_output=True, text=True, check=True)
    return {entry["id"] for entry in json.loads(out.stdout.strip() or "[]")}


def _pinned_program_ids(pin_dir: str) -> set[int]:
    ids = set()
    for name in ("prog_connect4", "prog_connect6", "prog_sockops"):
        out = subprocess.run(["bpftool", "-j", "prog", "show", "pinned", f"{pin_dir}/{name}"],
                             capture_output=True, text=True, check=True)
        ids.add(json.loads(out.stdout)["id"])
    return ids


def test_lab_down_leaves_nothing_behind():
    lab = Lab(unique_name("dwn"), pod_timeout=10.0)
    try:
        lab.up(NAMESPACES + "---" + pod_yaml("mesh", "a") + "---" + pod_yaml("mesh", "b", "node2"))
        ours = _pinned_program_ids(lab.pin_dir("node1")) | _pinned_program_ids(lab.pin_dir("node2"))
        assert ours <= _attached_program_ids()
        netns = [lab.pod_netns("mesh/a"), lab.node_netns("node1")]
        pins, cgroups, lab_dir = lab.pin_root, lab.cgroup_root, lab.dir
        # An agent that dies does not stop down from cleaning up.
        lab.stop_agent("node2", signal.SIGKILL)
    finally:
        problems = lab.down()
    assert problems == []
    assert not (ours & _attached_program_ids())
    assert not any(os.path.exists(p) for p in netns)
    assert not [n for n in sysops.list_netns() if lab.name in n]
    assert not os.path.exists(pins)
    assert not os.path.exists(cgroups)
    assert not os.path.exists(lab_dir)
