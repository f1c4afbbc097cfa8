"""ambient-cni as the runtime runs it: the installed console script as a
child process, a cluster state file, and a stand-in node agent on a Unix
socket (a thread of this test) that records what it is asked."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

from bench.cni_fixtures import AMBIENT, ENROLLED, PREV_100, FakeAgent
from tests import builders

PREV_031 = {"cniVersion": "0.3.1", "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p1"}],
            "ips": [{"version": "4", "address": "198.18.0.6/24", "gateway": "198.18.0.1", "interface": 0}]}
POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u1"


def plugin_command() -> list[str]:
    """The installed console script (what the lab links into CNI_PATH)."""
    script = Path(sysconfig.get_path("scripts")) / "ambient-cni"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cni.plugin"]


class Result:
    def __init__(self, done: subprocess.CompletedProcess, elapsed: float) -> None:
        self.code = done.returncode
        self.stdout = done.stdout.decode()
        self.stderr = done.stderr.decode()
        self.out = json.loads(self.stdout) if self.stdout.strip() else None
        self.elapsed = elapsed

    def __repr__(self) -> str:
        return f"Result(code={self.code}, out={self.out}, stderr={self.stderr!r}, elapsed={self.elapsed:.2f})"


class Lab:
    """Paths, a state file and a way to run the plugin, under one tmp_path."""

    def __init__(self, tmp_path: Path) -> None:
        self.dir = tmp_path
        self.sock = str(tmp_path / "agent.sock")
        self.state = tmp_path / "state.json"
        self.agents: list[FakeAgent] = []

    def write_state(self, ns_labels=None, pod_labels=None, uid="u1", pod=True, ns=True) -> None:
        items = []
        if ns:
            items.append(builders.namespace("mesh", ns_labels or {}))
        if pod:
            items.append(builders.pod("web", "mesh", uid=uid, labels=pod_labels or {}, node="node1", sa="default",
                                      phase="Pending"))
        self.state.write_text(json.dumps(builders.object_list(*items, resource_version="1")))

    def config(self, prev=PREV_100, version="1.0.0", **fields) -> bytes:
        c = {"cniVersion": version, "name": "ambient-lab", "type": "ambient-cni",
             "agent_socket": self.sock, "state": f"file:{self.state}", "exclude_namespaces": ["kube-system"]}
        if prev is not None:
            c["prevResult"] = prev
        c.update(fields)
        return json.dumps(c).encode()

    @staticmethod
    def env(command="ADD", **extra) -> dict:
        e = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/p1",
             "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": POD_ARGS}
        e.update(extra)
        return {k: v for k, v in e.items() if v is not None}

    def run(self, stdin: bytes, environ: dict, command: list[str] | None = None) -> Result:
        # Like a runtime: a minimal environment, and a working directory that
        # is not the source tree (the installed plugin must find its modules).
        start = time.monotonic()
        done = subprocess.run(command or plugin_command(), input=stdin, capture_output=True, timeout=30,
                              env={**environ, "PATH": os.environ.get("PATH", "/usr/bin:/bin")}, cwd=self.dir)
        return Result(done, time.monotonic() - start)

    def add(self, **fields) -> Result:
        return self.run(self.config(**fields), self.env())

    def agent(self, reply=ENROLLED, **kwargs) -> FakeAgent:
        agent = FakeAgent(self.sock, reply, **kwargs)
        self.agents.append(agent)
        return agent


@pytest.fixture
def lab(tmp_path):
    lab = Lab(tmp_path)
    yield lab
    for agent in lab.agents:
        agent.close()


# -- ADD ------------------------------------------------------------------------------

def test_add_enrolled_pod_asks_the_agent_and_returns_prev_result_unchanged(lab):
    lab.write_state(ns_labels=AMBIENT)
    agent = lab.agent()
    result = lab.add()
    assert result.code == 0, result
    assert result.out == PREV_100
    assert result.stderr == ""
    assert agent.requests == [{"op": "cni-add", "namespace": "mesh", "name": "web", "uid": "u1",
                               "container_id": "c1", "netns": "/run/netns/p1", "interface": "eth0",
                               "ips": ["198.18.0.5/24"], "gateways": ["198.18.0.1"]}]


def test_add_pod_labelled_ambient_in_an_unlabelled_namespace_is_enrolled(lab):
    lab.write_state(pod_labels=AMBIENT)
    lab.agent(reply={"ok": False, "error": "capture failed: netns /run/netns/p1 gone"})
    result = lab.add()
    # It must be enrolled, so the agent's refusal fails the ADD.
    assert result.code == 1 and result.out["code"] == 11, result


def test_add_result_is_in_the_configs_version(lab):
    lab.write_state(ns_labels=AMBIENT)
    agent = lab.agent()
    result = lab.add(version="0.3.1", prev=PREV_031)
    assert result.code == 0 and result.out == PREV_031
    assert agent.requests[0]["ips"] == ["198.18.0.6/24"]


def test_add_outside_the_mesh_with_no_agent_at_all_succeeds_quickly(lab):
    lab.write_state()
    result = lab.add()
    assert result.code == 0 and result.out == PREV_100, result
    assert result.elapsed < 1.0
    assert result.stderr == ""                           # not an error: nothing on stderr


def test_add_outside_the_mesh_still_informs_a_live_agent(lab):
    lab.write_state()
    agent = lab.agent(reply={"ok": True, "enrolled": False, "reason": "not labelled"})
    result = lab.add()
    assert result.code == 0 and result.out == PREV_100
    assert [r["op"] for r in agent.requests] == ["cni-add"]


def test_add_outside_the_mesh_does_not_wait_on_a_hung_agent(lab):
    lab.write_state()
    agent = lab.agent(answer=False)
    result = lab.add()
    assert result.code == 0 and result.out == PREV_100, result
    assert result.elapsed < 1.0                          # 200 ms budget plus interpreter start
    assert len(agent.requests) == 1                      # it did try


def test_add_outside_the_mesh_ignores_an_agent_refusal(lab):
    lab.write_state(ns_labels={"istio.io/dataplane-mode": "none"})
    lab.agent(reply={"ok": False, "error": "pod unknown"})
    result = lab.add()
    assert result.code == 0 and result.out == PREV_100


def test_add_in_an_excluded_namespace_is_not_enrolled(lab):
    lab.write_state(ns_labels=AMBIENT)
    result = lab.run(lab.config(exclude_namespaces=["mesh"]), lab.env())
    assert result.code == 0 and result.out == PREV_100


def test_add_enrolled_pod_with_the_agent_down_is_try_again_later(lab):
    lab.write_state(ns_labels=AMBIENT)
    result = lab.run(lab.config(version="0.4.0", prev={**PREV_100, "cniVersion": "0.4.0"}), lab.env())
    assert result.code == 1, result
    assert result.out == {"cniVersion": "0.4.0", "code": 11, "msg": "ambient node agent unreachable",
                          "details": f"connect {lab.sock}: No such file or directory"}
    assert "ambient node agent unreachable" in result.stderr


def test_add_enrolled_pod_with_a_stale_socket_is_try_again_later(lab):
    lab.write_state(ns_labels=AMBIENT)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(lab.sock)                                 # the file exists, nobody listens
    stale.close()
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11
    assert result.out["details"] == f"connect {lab.sock}: Connection refused"


def test_add_enrolled_pod_with_a_hung_agent_times_out(lab):
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(answer=False)
    result = lab.add(agent_timeout_seconds=0.5)
    assert result.code == 1 and result.out["code"] == 11, result
    assert result.out["details"] == f"no answer from {lab.sock} within 0.5 s"
    assert 0.5 <= result.elapsed < 3.0


def test_agent_refusal_is_try_again_later_with_its_message(lab):
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(reply={"ok": False, "error": "capture failed: no such netns /run/netns/p1"})
    result = lab.add()
    assert result.code == 1
    assert result.out == {"cniVersion": "1.0.0", "code": 11, "msg": "ambient node agent did not enrol the pod",
                          "details": "capture failed: no such netns /run/netns/p1"}


@pytest.mark.parametrize("raw, details", [
    (b"not json\n", "answered with something other than a JSON object: b'not json'"),
    (b"[1, 2]\n", "answered with something other than a JSON object"),
    (b"", "closed the connection without answering"),
])
def test_agent_garbage_is_try_again_later(lab, raw, details):
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(raw=raw)
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11
    assert result.out["msg"] == "ambient node agent unreachable" and details in result.out["details"]


def test_agent_that_enrolls_nothing_does_not_fail_the_pod(lab):
    # The agent is the authority (it may have seen a newer state).
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(reply={"ok": True, "enrolled": False, "reason": "label removed"})
    assert lab.add().code == 0


def test_enrolled_pod_without_an_address_is_an_invalid_config(lab):
    lab.write_state(ns_labels=AMBIENT)
    agent = lab.agent()
    result = lab.add(prev={"cniVersion": "1.0.0", "interfaces": [], "ips": []})
    assert result.code == 1 and result.out["code"] == 7
    assert "no pod address" in result.out["msg"]
    assert agent.requests == []


def test_pod_missing_from_the_state_in_an_ambient_namespace_waits(lab):
    lab.write_state(ns_labels=AMBIENT, pod=False)
    agent = lab.agent()
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11
    assert result.out["msg"] == "pod mesh/web not yet known"
    assert "namespace mesh labelled istio.io/dataplane-mode=ambient" in result.out["details"]
    assert agent.requests == []


def test_an_older_pod_of_the_same_name_counts_as_missing(lab):
    lab.write_state(ns_labels=AMBIENT, uid="u0-previous-incarnation")
    result = lab.add()
    assert result.code == 1 and result.out["msg"] == "pod mesh/web not yet known"


@pytest.mark.parametrize("ns", [True, False], ids=["unlabelled namespace", "unknown namespace"])
def test_pod_missing_from_the_state_elsewhere_is_not_enrolled(lab, ns):
    lab.write_state(pod=False, ns=ns)
    result = lab.add()
    assert result.code == 0 and result.out == PREV_100


def test_unreadable_state_is_try_again_later(lab):
    result = lab.add()                                   # no state file written
    assert result.code == 1 and result.out["code"] == 11
    assert result.out["msg"] == "cluster state unreadable"
    assert result.out["details"] == f"{lab.state}: No such file or directory"
    lab.state.write_text("{ half written")
    result = lab.add()
    assert result.out["code"] == 11 and "neither JSON" in result.out["details"]


def test_yaml_state_is_read_through_the_model(lab):
    lab.state.write_text("kind: Namespace\nmetadata:\n  name: mesh\n  labels: {istio.io/dataplane-mode: ambient}\n"
                         "---\nkind: Pod\nmetadata: {name: web, namespace: mesh, uid: u1}\n")
    agent = lab.agent()
    result = lab.add()
    assert result.code == 0, result
    assert [r["op"] for r in agent.requests] == ["cni-add"]


# -- errors before any decision ----------------------------------------------------------

@pytest.mark.parametrize("stdin", [b"\x00garbage", b"", b"{\"cniVersion\": "])
def test_garbage_stdin_is_code_6(lab, stdin):
    result = lab.run(stdin, lab.env())
    assert result.code == 1 and result.out["code"] == 6 and result.out["cniVersion"] == "1.0.0", result


def _with_raw(config: bytes, key: str, raw_json: str) -> bytes:
    """``config`` with ``"key": raw_json`` spliced in verbatim (JSON that json.dumps cannot make)."""
    return config[:-1] + f', "{key}": {raw_json}}}'.encode()


DEEP = "[" * 30000 + "]" * 30000                 # 60 KB; json.loads alone raises RecursionError
HUGE_INT = "7" * 5000                           # over CPython's 4,300-digit int limit
HOSTILE_CONFIGS = {
    "deep prevResult": ("prevResult", DEEP, "nested deeper than"),
    "deep prevResult.ips": ("prevResult", '{"cniVersion": "1.0.0", "ips": ' + DEEP + "}", "nested deeper than"),
    "5000-digit number in prevResult": (
        "prevResult", '{"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.5/24", "interface": '
        + HUGE_INT + "}]}", "more than 64 digits"),
    "5000-digit number in the config": ("agent_timeout_seconds", HUGE_INT, "more than 64 digits"),
    "5000-digit float in the config": ("agent_timeout_seconds", HUGE_INT + ".5", "more than 64 digits"),
}


@pytest.mark.parametrize("key, raw, detail", HOSTILE_CONFIGS.values(), ids=list(HOSTILE_CONFIGS))
@pytest.mark.parametrize("command", ["ADD", "CHECK", "DEL"])
def test_hostile_json_is_a_cni_error_not_a_traceback(lab, key, raw, detail, command):
    lab.write_state(ns_labels=AMBIENT)
    agent = lab.agent()
    config = lab.config(prev=None if key == "prevResult" else PREV_100)
    result = lab.run(_with_raw(config, key, raw), lab.env(command))
    assert result.code == 1, result
    assert result.out == {"cniVersion": "1.0.0", "code": 6, "msg": "network configuration refused",
                          "details": result.out["details"]}, result
    assert detail in result.out["details"]
    assert "Traceback" not in result.stderr and len(result.stderr) < 300, result.stderr
    assert agent.requests == []


@pytest.mark.parametrize("content", [
    '{"kind": "List", "items": ' + DEEP + "}",
    '{"kind": "List", "items": [{"kind": "Pod", "metadata": {"name": "web", "namespace": "mesh", '
    '"generation": ' + HUGE_INT + "}}]}",
    "kind: List\nitems: " + DEEP + "\n",
], ids=["deep JSON", "5000-digit number", "deep YAML"])
def test_hostile_state_file_is_try_again_later_not_a_traceback(lab, content):
    lab.state.write_text(content.replace("\\n", "\n"))
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11, result
    assert result.out["msg"] == "cluster state unreadable"
    assert "Traceback" not in result.stderr, result.stderr


def test_a_deeply_nested_agent_reply_is_try_again_later(lab):
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(raw=DEEP.encode() + b"\n")
    result = lab.add()
    assert result.code == 1 and result.out["code"] == 11, result
    assert "answered with something other than a JSON object" in result.out["details"]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("missing", ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_IFNAME", "CNI_NETNS"])
def test_missing_environment_is_code_4_naming_the_variable(lab, missing):
    lab.write_state(ns_labels=AMBIENT)
    result = lab.run(lab.config(), {**lab.env(), missing: ""})
    assert result.code == 1 and result.out["code"] == 4
    assert missing in result.out["msg"]


def test_unsupported_version_is_code_1(lab):
    result = lab.run(lab.config(version="0.2.0"), lab.env())
    assert result.code == 1 and result.out["code"] == 1 and "0.2.0" in result.out["msg"]


def test_chained_only(lab):
    lab.write_state(ns_labels=AMBIENT)
    result = lab.run(lab.config(prev=None), lab.env())
    assert result.code == 1 and result.out["code"] == 7 and "chained" in result.out["msg"]


# -- DEL -----------------------------------------------------------------------------------

def test_del_with_the_agent_down_succeeds(lab):
    result = lab.run(lab.config(prev=None), lab.env("DEL", CNI_NETNS=None))
    assert (result.code, result.stdout) == (0, "")
    assert "agent not informed (DEL succeeds anyway)" in result.stderr


def test_del_informs_a_live_agent(lab):
    agent = lab.agent(reply={"ok": True})
    result = lab.run(lab.config(), lab.env("DEL"))
    assert (result.code, result.stdout, result.stderr) == (0, "", "")
    assert agent.requests == [{"op": "cni-del", "namespace": "mesh", "name": "web", "uid": "u1",
                               "container_id": "c1"}]


def test_del_without_pod_identity_succeeds_without_asking(lab):
    agent = lab.agent(reply={"ok": True})
    result = lab.run(lab.config(prev=None), lab.env("DEL", CNI_ARGS=None, CNI_NETNS=None))
    assert (result.code, result.stdout) == (0, "")
    assert agent.requests == []


def test_del_succeeds_when_the_agent_refuses(lab):
    lab.agent(reply={"ok": False, "error": "boom"})
    result = lab.run(lab.config(), lab.env("DEL"))
    assert (result.code, result.stdout) == (0, "") and "boom" in result.stderr


def test_del_to_a_hung_agent_succeeds_within_the_non_mesh_budget(lab):
    # The agent accepts and never answers. agent_timeout_seconds (5 s by
    # default) is for the ADD of a mesh pod only: teardown waits 200 ms.
    log = lab.dir / "cni.log"
    agent = lab.agent(answer=False)
    result = lab.run(lab.config(log_file=str(log)), lab.env("DEL"))
    assert (result.code, result.stdout) == (0, ""), result
    assert result.elapsed < 1.0, result                  # 200 ms budget plus interpreter start
    assert len(agent.requests) == 1 and agent.requests[0]["op"] == "cni-del"
    problem = f"agent not informed (DEL succeeds anyway): no answer from {lab.sock} within 0.2 s"
    assert problem in result.stderr
    assert problem in log.read_text()


# -- VERSION -------------------------------------------------------------------------------

def test_version(lab):
    result = lab.run(b"", {"CNI_COMMAND": "VERSION"})
    assert result.code == 0
    assert result.out == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


def test_version_does_not_wait_for_stdin(lab):
    # Run by hand from a terminal, VERSION must not block reading stdin.
    proc = subprocess.Popen(plugin_command(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            env={"CNI_COMMAND": "VERSION", "PATH": os.environ.get("PATH", "")})
    try:
        assert proc.wait(timeout=10) == 0
        assert json.loads(proc.stdout.read())["cniVersion"] == "1.0.0"
    finally:
        proc.kill()
        proc.stdin.close()
        proc.stdout.close()


def test_module_entry_point(lab):
    result = lab.run(b"", {"CNI_COMMAND": "VERSION"}, command=[sys.executable, "-m", "cni.plugin"])
    assert result.code == 0 and result.out["supportedVersions"][-1] == "1.0.0"


# -- CHECK ---------------------------------------------------------------------------------

def status(*pods):
    return {"ok": True, "node": "node1", "pods": list(pods)}


def test_check_enrolled_pod_listed_enrolled(lab):
    lab.write_state(ns_labels=AMBIENT)
    agent = lab.agent(reply=status({"namespace": "mesh", "name": "web", "uid": "u1", "enrolled": True}))
    result = lab.run(lab.config(), lab.env("CHECK"))
    assert (result.code, result.stdout) == (0, ""), result
    assert agent.requests == [{"op": "status"}]


def test_check_matches_by_name_when_the_agent_has_no_uid(lab):
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(reply=status({"namespace": "mesh", "name": "web", "enrolled": True}))
    assert lab.run(lab.config(), lab.env("CHECK")).code == 0


@pytest.mark.parametrize("pods, msg", [
    ([{"namespace": "mesh", "name": "web", "uid": "u1", "enrolled": False, "reason": "capture failed"}],
     "pod mesh/web must be in the mesh but is not captured"),
    ([], "pod mesh/web must be in the mesh but the agent does not know it"),
    # The same name with another uid is an older pod, not this one.
    ([{"namespace": "mesh", "name": "web", "uid": "u0", "enrolled": True}],
     "pod mesh/web must be in the mesh but the agent does not know it"),
])
def test_check_enrolled_pod_not_captured_is_code_100(lab, pods, msg):
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(reply=status(*pods))
    result = lab.run(lab.config(), lab.env("CHECK"))
    assert result.code == 1 and result.out["code"] == 100 and result.out["msg"] == msg, result


def test_check_to_a_hung_agent_is_bounded_like_a_non_mesh_add(lab):
    lab.write_state(ns_labels=AMBIENT)
    lab.agent(answer=False)
    result = lab.run(lab.config(), lab.env("CHECK"))
    assert result.code == 1 and result.out["code"] == 11, result
    assert result.out["details"] == f"no answer from {lab.sock} within 0.2 s"
    assert result.elapsed < 1.0, result


def test_check_with_the_agent_down_is_try_again_later(lab):
    lab.write_state(ns_labels=AMBIENT)
    result = lab.run(lab.config(), lab.env("CHECK"))
    assert result.code == 1 and result.out["code"] == 11


def test_check_pod_outside_the_mesh_succeeds_without_the_agent(lab):
    lab.write_state()
    result = lab.run(lab.config(), lab.env("CHECK"))
    assert (result.code, result.stdout) == (0, "")


# -- logging -------------------------------------------------------------------------------

def test_log_file_records_every_call_and_stderr_stays_quiet(lab):
    log = lab.dir / "cni.log"
    lab.write_state(ns_labels=AMBIENT)
    lab.agent()
    assert lab.add(log_file=str(log)).code == 0
    result = lab.run(lab.config(log_file=str(log)), lab.env("DEL"))
    assert result.code == 0 and result.stderr == ""
    lines = log.read_text().splitlines()
    assert len(lines) == 2
    assert "ADD mesh/web c1: enrolled: namespace mesh labelled istio.io/dataplane-mode=ambient" in lines[0]
    assert "DEL mesh/web c1: agent informed" in lines[1]


def test_an_unwritable_log_file_does_not_fail_the_plugin(lab):
    lab.write_state()
    result = lab.add(log_file=str(lab.dir / "no-such-dir" / "cni.log"))
    assert result.code == 0 and result.out == PREV_100
    assert "cannot write log" in result.stderr


def test_an_unwritable_log_file_is_reported_once_on_a_failure_too(lab):
    lab.write_state(ns_labels=AMBIENT)                   # must be enrolled; no agent: code 11
    result = lab.add(log_file=str(lab.dir / "no-such-dir" / "cni.log"))
    assert result.code == 1 and result.out["code"] == 11, result
    assert result.stderr.count("cannot write log") == 1, result.stderr
    assert "ambient node agent unreachable" in result.stderr


def test_every_failure_goes_to_the_log_file_and_to_stdout(lab):
    # A failure before the environment is validated, one in the configuration,
    # and one from the agent: each is a CNI error on stdout and a log line.
    log = lab.dir / "cni.log"
    lab.write_state(ns_labels=AMBIENT)
    failures = [
        (lab.config(log_file=str(log)), lab.env(CNI_IFNAME="eth/0"), 4, "CNI_IFNAME is invalid"),
        (lab.config(log_file=str(log), agent_timeout_seconds=-1), lab.env(), 7, "agent_timeout_seconds"),
        (lab.config(log_file=str(log)), lab.env(), 11, "ambient node agent unreachable"),
        (lab.config(log_file=str(log), prev=None), lab.env("CHECK", CNI_ARGS="K8S_POD_NAME=web"), 7, "chained"),
    ]
    for stdin, environ, code, text in failures:
        result = lab.run(stdin, environ)
        assert result.code == 1 and result.out["code"] == code and text in result.out["msg"], result
        assert text in result.stderr
    lines = log.read_text().splitlines()
    assert len(lines) == len(failures), lines
    for line, (_, environ, code, text) in zip(lines, failures):
        assert re.search(rf"ambient-cni\[\d+\] {environ['CNI_COMMAND']}[ :]", line), line
        assert f"error {code}: " in line and text in line


# -- runtimes that are not Kubernetes -------------------------------------------------------

PODMAN_ARGS = "IgnoreUnknown=1;K8S_POD_NAME=web"      # podman 4.3's exact shape: no namespace, ever


@pytest.mark.parametrize("version, prev", [("1.0.0", PREV_100), ("0.4.0", {**PREV_031, "cniVersion": "0.4.0"}),
                                           ("0.3.1", PREV_031)])
def test_add_without_a_pod_namespace_passes_prev_result_through(lab, version, prev):
    log = lab.dir / "cni.log"
    lab.write_state(ns_labels=AMBIENT)                   # even a mesh namespace's name would not matter
    agent = lab.agent()
    result = lab.run(lab.config(version=version, prev=prev, log_file=str(log)),
                     lab.env(CNI_ARGS=PODMAN_ARGS))
    assert result.code == 0, result
    assert result.out == {**prev, "cniVersion": version}
    assert result.stderr == ""                           # not an error
    assert agent.requests == []                          # nothing the agent could do with it
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines                        # why, once
    assert "not a Kubernetes pod: CNI_ARGS has no K8S_POD_NAMESPACE" in lines[0]


@pytest.mark.parametrize("args", [None, "IgnoreUnknown=1", "K8S_POD_NAMESPACE=mesh"])
def test_add_with_no_pod_identity_at_all_passes_prev_result_through(lab, args):
    result = lab.run(lab.config(), lab.env(CNI_ARGS=args))
    assert result.code == 0 and result.out == PREV_100 and result.stderr == "", result


@pytest.mark.parametrize("command", ["CHECK", "DEL"])
def test_check_and_del_without_a_pod_namespace_succeed_without_asking(lab, command):
    log = lab.dir / "cni.log"
    lab.write_state(ns_labels=AMBIENT)
    agent = lab.agent(answer=False)
    result = lab.run(lab.config(log_file=str(log)), lab.env(command, CNI_ARGS=PODMAN_ARGS))
    assert (result.code, result.stdout, result.stderr) == (0, "", ""), result
    assert agent.requests == []
    assert "not a Kubernetes pod" in log.read_text()
