"""ambient-cni: environment and config handling, and the real plugin process
against a stand-in agent on a Unix socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cni.config import CniError, parse_cni_args, parse_config, parse_environment, result_addresses

PREV_100 = {"cniVersion": "1.0.0", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/x"}],
            "ips": [{"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 0}]}
PREV_031 = {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "198.18.0.6/24", "gateway": "198.18.0.1"}]}


def env(command="ADD", **extra):
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/x",
         "CNI_IFNAME": "eth0", "CNI_PATH": "/usr/lib/cni",
         "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web;K8S_POD_UID=u1"}
    e.update(extra)
    return {k: v for k, v in e.items() if v is not None}


def config(sock="/run/x/agent.sock", state="file:/tmp/state.json", prev=PREV_100, version="1.0.0", **extra):
    c = {"cniVersion": version, "name": "lab", "type": "ambient-cni", "agent_socket": sock, "state": state}
    if prev is not None:
        c["prevResult"] = prev
    c.update(extra)
    return json.dumps(c).encode()


def test_cni_args():
    assert parse_cni_args("IgnoreUnknown=1;K8S_POD_NAME=a;X=") == {"IgnoreUnknown": "1", "K8S_POD_NAME": "a", "X": ""}
    assert parse_cni_args("") == {}
    with pytest.raises(CniError) as err:
        parse_cni_args("K8S_POD_NAME")
    assert err.value.code == 7


@pytest.mark.parametrize("environ, code, message", [
    (env(command=None), 7, "CNI_COMMAND"),
    (env(command="REBOOT"), 7, "CNI_COMMAND"),
    (env(CNI_CONTAINERID=None), 7, "CNI_CONTAINERID"),
    (env(CNI_IFNAME=""), 7, "CNI_IFNAME"),
    (env(CNI_NETNS=None), 7, "CNI_NETNS"),
    (env(CNI_NETNS="relative"), 7, "absolute"),
    (env(CNI_ARGS="K8S_POD_NAME=web"), 7, "K8S_POD_NAMESPACE"),
    (env(CNI_ARGS="garbage"), 7, "CNI_ARGS is malformed"),
])
def test_bad_environment(environ, code, message):
    with pytest.raises(CniError) as err:
        parse_environment(environ)
    assert err.value.code == code and message in err.value.msg + err.value.details


def test_del_needs_no_netns_and_version_needs_nothing():
    assert parse_environment(env("DEL", CNI_NETNS=None)).netns == ""
    assert parse_environment({"CNI_COMMAND": "VERSION"}).command == "VERSION"


@pytest.mark.parametrize("data, command, code, message", [
    (b"{not json", "ADD", 6, "not valid JSON"),
    (b"[]", "ADD", 6, "JSON object"),
    (config(version="0.2.0"), "ADD", 1, "unsupported cniVersion"),
    (config(sock=None), "ADD", 4, "agent_socket"),
    (config(sock="relative.sock"), "ADD", 4, "absolute path"),
    (config(state="kube"), "ADD", 4, "file:PATH"),
    (config(prev=None), "ADD", 4, "chained plugin"),
    (config(exclude_namespaces="kube-system"), "ADD", 4, "exclude_namespaces"),
    (config(agent_timeout_seconds=0), "ADD", 4, "agent_timeout_seconds"),
    (config(agent_timeout_seconds=True), "ADD", 4, "agent_timeout_seconds"),
    (config(prev=[1]), "ADD", 4, "prevResult must be an object"),
])
def test_bad_config(data, command, code, message):
    with pytest.raises(CniError) as err:
        parse_config(data, command)
    assert err.value.code == code and message in err.value.msg


def test_del_accepts_a_config_without_prev_result():
    assert parse_config(config(prev=None), "DEL").prev_result is None


@pytest.mark.parametrize("prev, ips, gateways", [
    (PREV_100, ["198.18.0.5/24"], ["198.18.0.1"]),
    (PREV_031, ["198.18.0.6/24"], ["198.18.0.1"]),
    ({"cniVersion": "0.4.0", "ips": [{"version": "4", "address": "198.18.0.7/24"},
                                      {"version": "6", "address": "fd00:198:18::7/64", "gateway": "fd00:198:18::1"}]},
     ["198.18.0.7/24", "fd00:198:18::7/64"], ["fd00:198:18::1"]),
    ({"cniVersion": "1.0.0"}, [], []),
])
def test_prev_result_addresses(prev, ips, gateways):
    assert result_addresses(prev) == (ips, gateways)


# --- the real plugin process ----------------------------------------------------

class StandInAgent:
    """A Unix-socket server answering like the node agent, recording requests."""

    def __init__(self, path: str, reply=None, delay: float = 0.0) -> None:
        self.path = path
        self.reply = reply or (lambda req: {"ok": True, "enrolled": True, "reason": "test"})
        self.delay = delay
        self.requests: list[dict] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                data = conn.makefile("rb").readline()
                req = json.loads(data)
                self.requests.append(req)
                time.sleep(self.delay)
                try:
                    conn.sendall(json.dumps(self.reply(req)).encode() + b"\n")
                except BrokenPipeError:
                    pass   # the plugin gave up waiting, as it should for a hung agent

    def close(self):
        self.sock.close()


def write_state(path: Path, ns_labels: dict) -> None:
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"kind": "Namespace", "metadata": {"name": "mesh", "labels": ns_labels}},
        {"kind": "Pod", "metadata": {"name": "web", "namespace": "mesh", "uid": "u1"}, "spec": {"nodeName": "n1"}},
    ]}))


def run_plugin(stdin: bytes, environ: dict) -> tuple[int, dict | None, float]:
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cni.plugin"], input=stdin, capture_output=True,
                          env={**environ, "PATH": os.environ["PATH"], "PYTHONPATH": str(Path(__file__).parents[2])},
                          timeout=30)
    elapsed = time.monotonic() - start
    out = json.loads(done.stdout) if done.stdout.strip() else None
    return done.returncode, out, elapsed


@pytest.fixture
def setup(tmp_path):
    sock = str(tmp_path / "agent.sock")
    state = tmp_path / "state.json"
    return sock, state


def test_add_enrolled_pod_asks_the_agent_and_returns_prev_result_unchanged(setup):
    sock, state = setup
    write_state(state, {"istio.io/dataplane-mode": "ambient"})
    agent = StandInAgent(sock)
    try:
        code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env())
    finally:
        agent.close()
    assert code == 0
    assert out == PREV_100
    [req] = agent.requests
    assert req == {"op": "cni-add", "namespace": "mesh", "name": "web", "uid": "u1", "container_id": "c1",
                   "netns": "/run/netns/x", "interface": "eth0", "ips": ["198.18.0.5/24"],
                   "gateways": ["198.18.0.1"]}


def test_add_result_is_in_the_configs_version(setup):
    sock, state = setup
    write_state(state, {})
    code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}", prev=PREV_031, version="0.3.1"), env())
    assert code == 0 and out["cniVersion"] == "0.3.1" and out["ips"] == PREV_031["ips"]


def test_pod_outside_the_mesh_never_waits_on_a_missing_agent(setup):
    sock, state = setup
    write_state(state, {})
    code, out, elapsed = run_plugin(config(sock=sock, state=f"file:{state}"), env())
    assert code == 0 and out == PREV_100
    assert elapsed < 2.0


def test_pod_outside_the_mesh_does_not_wait_on_a_hung_agent(setup):
    sock, state = setup
    write_state(state, {})
    agent = StandInAgent(sock, delay=3.0)
    try:
        code, out, elapsed = run_plugin(config(sock=sock, state=f"file:{state}"), env())
    finally:
        agent.close()
    assert code == 0 and out == PREV_100
    assert elapsed < 2.5      # bounded by the 200 ms budget plus interpreter start


def test_enrolled_pod_with_agent_down_fails_with_try_again_later(setup):
    sock, state = setup
    write_state(state, {"istio.io/dataplane-mode": "ambient"})
    code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env())
    assert code == 1
    assert out["code"] == 11 and out["msg"] == "ambient node agent unreachable"
    assert sock in out["details"] and out["cniVersion"] == "1.0.0"


def test_agent_refusal_is_passed_on(setup):
    sock, state = setup
    write_state(state, {"istio.io/dataplane-mode": "ambient"})
    agent = StandInAgent(sock, reply=lambda req: {"ok": False, "error": "capture failed: no such netns"})
    try:
        code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env())
    finally:
        agent.close()
    assert code == 1 and out["code"] == 11 and "no such netns" in out["details"]


def test_pod_missing_from_state_in_an_ambient_namespace_waits(setup):
    sock, state = setup
    state.write_text(json.dumps({"kind": "List", "items": [
        {"kind": "Namespace", "metadata": {"name": "mesh", "labels": {"istio.io/dataplane-mode": "ambient"}}}]}))
    code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env())
    assert code == 1 and out["code"] == 11 and "not yet in the cluster state" in out["msg"]


def test_garbage_and_missing_environment_are_specific_errors(setup):
    sock, state = setup
    code, out, _ = run_plugin(b"\x00garbage", env())
    assert code == 1 and out["code"] == 6
    code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env(CNI_CONTAINERID=None))
    assert code == 1 and out["code"] == 7 and "CNI_CONTAINERID" in out["msg"]


def test_del_succeeds_with_the_agent_down_and_informs_it_when_up(setup):
    sock, state = setup
    code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}", prev=None), env("DEL", CNI_NETNS=None))
    assert (code, out) == (0, None)
    agent = StandInAgent(sock, reply=lambda req: {"ok": True})
    try:
        code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env("DEL"))
    finally:
        agent.close()
    assert (code, out) == (0, None)
    assert agent.requests == [{"op": "cni-del", "namespace": "mesh", "name": "web", "uid": "u1", "container_id": "c1"}]


def test_version_and_check(setup):
    sock, state = setup
    code, out, _ = run_plugin(b"", {"CNI_COMMAND": "VERSION"})
    assert code == 0 and "1.0.0" in out["supportedVersions"] and "0.3.1" in out["supportedVersions"]
    write_state(state, {"istio.io/dataplane-mode": "ambient"})
    enrolled = {"ok": True, "pods": [{"namespace": "mesh", "name": "web", "enrolled": True}]}
    agent = StandInAgent(sock, reply=lambda req: enrolled)
    try:
        code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env("CHECK"))
        assert (code, out) == (0, None)
        enrolled["pods"][0]["enrolled"] = False
        code, out, _ = run_plugin(config(sock=sock, state=f"file:{state}"), env("CHECK"))
        assert code == 1 and out["code"] == 100
    finally:
        agent.close()
