"""Malformed input on the node's two local interfaces: the agent's control
socket and the CNI plugin. Each gets a specific error back (a line, a CNI
error object), never a traceback, and nothing changes (issue 11, item 7)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "build" / "cni" / "ambient-cni" / "ambient-cni"
NESTED_60K = b"[" * 30000 + b"]" * 30000
HUGE = b"9" * 5000


def ask(path: str, raw: bytes, timeout: float = 10.0) -> dict:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(raw)
        return json.loads(s.makefile("rb").readline())


CONTROL = {
    "60 KB of nesting": (NESTED_60K + b"\n", "request refused: nested deeper than 8 levels"),
    "nesting inside a cni-add": (b'{"op": "cni-add", "ips": ' + b"[" * 20 + b"]" * 20 + b"}\n",
                                 "request refused: nested deeper than 8 levels"),
    "5,000-digit number": (b'{"op": "status", "n": ' + HUGE + b"}\n", "request refused: a number of more than"),
    "100 KB line": (b'{"op": "status", "pad": "' + b"x" * 100_000 + b'"}\n', "request longer than 65536 bytes"),
    "binary garbage": (bytes(range(256)).replace(b"\n", b"") + b"\n", "request is not JSON"),
    "a list": (b"[1, 2, 3]\n", "request must be a JSON object"),
    "unknown op": (b'{"op": "rm -rf /"}\n', "unknown op"),
    "cni-add with a relative netns": (b'{"op": "cni-add", "namespace": "mesh", "name": "server", '
                                      b'"netns": "../../proc/1/ns/net", "ips": ["198.18.1.2/24"]}\n',
                                      "must be an absolute path"),
}


def test_malformed_control_requests_get_a_specific_error_line(hostile, probe):
    path = hostile.lab.agent_socket("node2")
    slow = socket.socket(socket.AF_UNIX)                  # half a request, never finished
    try:
        slow.connect(path)
        slow.sendall(b'{"op": "sta')
        for name, (raw, error) in CONTROL.items():
            reply = ask(path, raw)
            assert reply.get("ok") is False and error in reply.get("error", ""), (name, reply)
        slow.settimeout(10)
        reply = json.loads(slow.makefile("rb").readline())
        assert reply == {"ok": False, "error": "no request within 5 s"}
    finally:
        slow.close()
    status = ask(path, b'{"op": "status"}\n')
    assert status["ok"] and any(p["name"] == "server" and p["enrolled"] for p in status["pods"])
    _access, other = hostile.agent.split(hostile.agent.log_since(probe))
    assert not [line for line in other if "Traceback" in line or "RecursionError" in line or " ERROR " in line], other
    assert len(other) <= len(CONTROL) + 2, other          # one warning per bad request at most


def test_a_non_root_caller_cannot_use_the_control_socket(hostile, probe):
    code = ("import socket, sys\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "try:\n    s.connect(sys.argv[1])\nexcept PermissionError:\n    print('EACCES')\n"
            "else:\n    s.sendall(b'{\"op\": \"status\"}\\n'); print(s.makefile().readline())\n")
    done = subprocess.run(["/usr/bin/python3", "-c", code, hostile.lab.agent_socket("node2")], user=65534,
                          group=65534, capture_output=True, text=True, timeout=10)
    out = done.stdout.strip()
    assert out == "EACCES" or '"only root may use the agent socket"' in out, (out, done.stderr)


@pytest.fixture(scope="module")
def plugins():
    """The plugin as the lab runs it (the venv's console script) and the
    self-contained bundle the chart installs (``make cni-plugin``)."""
    done = subprocess.run(["make", "-s", "cni-plugin"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"console script": [str(Path(sys.executable).parent / "ambient-cni")], "bundle": [str(BUNDLE)]}


def cni_config(hostile, node: str, extra: str) -> bytes:
    """node's real ambient-cni conflist entry with ``extra`` JSON members spliced in."""
    conflist = json.loads(hostile.lab.conflist_path(node).read_text())
    entry = next(p for p in conflist["plugins"] if p["type"] == "ambient-cni")
    entry = {**entry, "cniVersion": conflist["cniVersion"], "name": conflist["name"]}
    return json.dumps(entry)[:-1].encode() + b", " + extra.encode() + b"}"


CNI = {
    "60 KB of nesting in prevResult": '"prevResult": ' + NESTED_60K.decode(),
    "5,000-digit number in prevResult": ('"prevResult": {"cniVersion": "1.0.0", "ips": [{"address": '
                                         '"198.18.1.99/24", "interface": ' + HUGE.decode() + "}]}"),
    "5,000-digit timeout": '"agent_timeout_seconds": ' + HUGE.decode(),
    "2 MB of padding": '"pad": "' + "x" * (2 << 20) + '"',
}


@pytest.mark.parametrize("name", list(CNI))
@pytest.mark.parametrize("kind", ["console script", "bundle"])
def test_hostile_cni_input_is_a_cni_error_not_a_traceback(hostile, probe, plugins, kind, name):
    env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "hostile0", "CNI_IFNAME": "eth0",
           "CNI_NETNS": hostile.lab.pod_netns("mesh/server"), "CNI_PATH": str(hostile.lab.bin_dir),
           "CNI_ARGS": "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=server", "PATH": os.environ["PATH"]}
    done = subprocess.run(plugins[kind], input=cni_config(hostile, "node2", CNI[name]), env=env,
                          capture_output=True, timeout=30)
    assert done.returncode == 1, done
    out = json.loads(done.stdout)
    assert out["code"] == 6 and out["msg"] == "network configuration refused", out
    assert b"Traceback" not in done.stderr and len(done.stderr) < 400, done.stderr
    status = hostile.lab.agent_request("node2", {"op": "status"})
    assert any(p["name"] == "server" and p["enrolled"] for p in status["pods"])
