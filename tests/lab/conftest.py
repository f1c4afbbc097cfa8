"""Fixtures for end-to-end tests in a real pod lab (root, real kernel objects).

Every lab gets a unique name and is torn down afterwards, also when the
test fails; the session finaliser checks that nothing was left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lab.lab import Lab

PEER = str(Path(__file__).with_name("peer.py"))


def unique_name(prefix: str = "t") -> str:
    return prefix + secrets.token_hex(3)


@pytest.fixture(scope="session", autouse=True)
def _must_be_root():
    if os.geteuid() != 0:
        pytest.fail("lab tests need root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")


class PodServers:
    """Background peer.py servers started in pods; stopped at teardown."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: list[subprocess.Popen] = []

    def serve(self, pod: str, port: int, banner: str, host: str = "0.0.0.0") -> subprocess.Popen:
        proc = self.lab.exec(pod, [sys.executable, PEER, "serve", str(port), banner, "--host", host],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise AssertionError(f"server in {pod} did not start: {line} {proc.stderr.read()}")
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def connect(lab: Lab, pod: str, host: str, port: int, message: str = "hello",
            mark: int = 0, timeout: float = 5.0, node: str | None = None,
            half_close: bool = True) -> tuple[bool, str]:
    """Run peer.py connect in a pod (or a node); (succeeded, banner or error name)."""
    argv = [sys.executable, PEER, "connect", host, str(port), message, "--timeout", str(timeout)]
    if mark:
        argv += ["--mark", hex(mark)]
    if not half_close:
        argv.append("--no-half-close")
    done = (lab.node_run(node, argv, timeout=timeout + 10) if node
            else lab.run(pod, argv, timeout=timeout + 10))
    lines = done.stdout.splitlines()
    if done.returncode != 0:
        return False, (lines[0] if lines else done.stderr.strip())
    assert lines[1] == message, f"echo mismatch: {lines}"
    return True, lines[0]


def agent_pod(lab: Lab, node: str, pod: str) -> dict:
    status = lab.agent_request(node, {"op": "status"})
    assert status["ok"], status
    ns, name = pod.split("/")
    for p in status["pods"]:
        if p["namespace"] == ns and p["name"] == name:
            return p
    raise AssertionError(f"agent of {node} does not know {pod}: {json.dumps(status)}")


def records(lab: Lab, node: str, pod: str, destination: str) -> list[dict]:
    """The connection records the node's agent keeps for ``pod`` to ``destination`` ("ip:port", "[ip6]:port")."""
    return [r for r in agent_pod(lab, node, pod)["connections"] if r["destination"] == destination]


def pod_ip6(lab: Lab, pod: str) -> str:
    """The pod's one IPv6 address (a dual-stack lab's pod)."""
    ips = [x["ip"] for x in lab.pod(pod)["status"]["podIPs"] if ":" in x["ip"]]
    assert len(ips) == 1, lab.pod(pod)["status"]
    return ips[0]


def counters(lab: Lab, node: str, pod: str, direction: str) -> dict:
    return agent_pod(lab, node, pod)["counters"][direction]


def wait_for(predicate, timeout: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def settle(lab: Lab, timeout: float = 10.0) -> None:
    """Wait until every node agent has read the lab's current cluster state."""
    lab.settle(timeout)


@contextlib.contextmanager
def running_lab(prefix: str, manifest: str, **lab_args):
    """A uniquely named lab built from ``manifest``, agents settled; always torn down.
    ``lab_args`` go to ``Lab`` (``dual_stack=True``, ``agent_args=[...]``)."""
    lab = Lab(unique_name(prefix), **{"pod_timeout": 20.0, **lab_args})
    try:
        lab.up(manifest)
        settle(lab)
        yield lab
    finally:
        lab.down()


def resolv_container(lab: Lab, pod: str, resolv_conf) -> subprocess.Popen:
    """A pod's "container" for DNS tests: a process of the pod in a private mount
    namespace that sees ``resolv_conf`` as /etc/resolv.conf (lab pods share the
    host's files). Run commands in it with ``nsenter -t <pid> -m``; the agent
    reads the pod's resolv.conf through it too. The caller kills it."""
    holder = lab.exec(pod, ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            f"mount --bind {resolv_conf} /etc/resolv.conf && echo ready && exec sleep 600"],
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() != "ready":
        holder.kill()
        raise AssertionError(f"no container in {pod}: {holder.stderr.read()}")
    return holder


@contextlib.contextmanager
def private_datapath(prefix: str, ip4: str, ip6: str):
    """The real capture programs loaded into a fresh cgroup and pin directory,
    and a fresh network namespace holding a pod's two addresses on lo (no
    dummy driver on this kernel): ``(datapath, netns name, cgroup)``. Every
    piece is removed afterwards, and the teardown must report no problem."""
    from agent.capture.datapath import BPFFS, DEFAULT_CGROUP, CaptureDatapath, teardown

    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)

    name = unique_name(prefix)
    cgroup = f"{DEFAULT_CGROUP}/{name}"
    pin_dir = f"{BPFFS}/{name}"
    os.mkdir(cgroup)
    dp = CaptureDatapath(pin_dir, cgroup)
    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        ip("-n", name, "addr", "add", f"{ip4}/32", "dev", "lo")
        ip("-n", name, "addr", "add", f"{ip6}/128", "dev", "lo", "nodad")
        dp.load()
        yield dp, name, cgroup
    finally:
        dp.close()
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
        problems = teardown(pin_dir, cgroup)
        os.rmdir(cgroup)
        assert problems == []


@pytest.fixture
def servers():
    holder: list[PodServers] = []

    def make(lab: Lab) -> PodServers:
        s = PodServers(lab)
        holder.append(s)
        return s

    yield make
    for s in holder:
        s.stop()
