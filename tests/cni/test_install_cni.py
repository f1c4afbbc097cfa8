"""`ambient-agent install-cni` as a process on temporary CNI dirs: install,
a primary CNI rewriting its file, an unparseable primary, SIGTERM with
--uninstall-on-exit restoring the original bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cni.install import RECORD_NAME, decode_records
from tests.unit.test_cni_install import BRIDGE_CONF, FLANNEL, GARBAGE

AGENT = [sys.executable, "-m", "agent.cli"]
REPO = Path(__file__).resolve().parents[2]


class Node:
    """A node's CNI dirs, service account and a plugin bundle, under tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.bin = tmp / "opt-cni-bin"
        self.conf = tmp / "etc-cni-net.d"
        self.bin.mkdir()
        self.conf.mkdir()
        (self.bin / "bridge").write_bytes(b"\x7fELF not ours")      # the node's other plugins stay
        sa = tmp / "sa"
        sa.mkdir()
        (sa / "token").write_text("token-1\n")
        (sa / "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n")
        self.sa = sa
        # A bundle shaped like PyInstaller's onedir output (the real one is
        # exercised in test_python_free.py; this test is about the files).
        self.bundle = tmp / "bundle"
        (self.bundle / "_internal").mkdir(parents=True)
        (self.bundle / "_internal" / "libpython3.11.so.1.0").write_bytes(b"lib")
        exe = self.bundle / "ambient-cni"
        exe.write_text("#!/bin/sh\necho '{\"cniVersion\": \"1.0.0\"}'\n")
        exe.chmod(0o755)

    def args(self, *extra: str) -> list[str]:
        return [*AGENT, "install-cni", "--cni-bin-dir", str(self.bin), "--cni-conf-dir", str(self.conf),
                "--plugin-source", str(self.bundle), "--agent-socket", "/var/run/ambient-agent/agent.sock",
                "--kube-server", "https://10.96.0.1:443", "--token-file", str(self.sa / "token"),
                "--ca-file", str(self.sa / "ca.crt"), *extra]

    def conflist(self, name="10-flannel.conflist") -> dict:
        return json.loads((self.conf / name).read_bytes())

    def chained(self, name="10-flannel.conflist") -> bool:
        try:
            plugins = self.conflist(name)["plugins"]
        except (OSError, ValueError):
            return False
        return plugins[-1]["type"] == "ambient-cni" and sum(p["type"] == "ambient-cni" for p in plugins) == 1


def wait_for(predicate, timeout=8.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def node(tmp_path):
    return Node(tmp_path)


@pytest.fixture
def daemon(node, tmp_path):
    procs = []

    def start(*extra):
        log = open(tmp_path / "install-cni.log", "wb")
        proc = subprocess.Popen(node.args("--poll-interval", "0.2", *extra), stdout=log, stderr=log, cwd=REPO)
        proc.log_path = tmp_path / "install-cni.log"
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_install_follow_rewrites_survive_garbage_and_restore_on_sigterm(node, daemon):
    (node.conf / "10-flannel.conflist").write_bytes(FLANNEL)
    proc = daemon("--uninstall-on-exit")

    wait_for(node.chained, what="ambient-cni chained into the flannel conflist")
    plugins = node.conflist()["plugins"]
    assert [p["type"] for p in plugins] == ["flannel", "portmap", "ambient-cni"]
    entry = plugins[-1]
    assert entry["agent_socket"] == "/var/run/ambient-agent/agent.sock"
    assert entry["state"] == "kube" and entry["kubeconfig"] == str(node.conf / "ambient-cni-kubeconfig")
    kubeconfig = json.loads((node.conf / "ambient-cni-kubeconfig").read_bytes())
    assert kubeconfig["users"][0]["user"]["token"] == "token-1"
    assert kubeconfig["clusters"][0]["cluster"]["server"] == "https://10.96.0.1:443"
    assert (node.conf / "ambient-cni-kubeconfig").stat().st_mode & 0o777 == 0o600
    link = node.bin / "ambient-cni"
    assert link.is_symlink() and os.access(link, os.X_OK)
    assert subprocess.run([str(link)], capture_output=True).stdout.strip() == b'{"cniVersion": "1.0.0"}'

    # flannel restarts and writes its config again, without us.
    rewritten = FLANNEL.replace(b'"hairpinMode": true', b'"hairpinMode": false')
    (node.conf / "10-flannel.conflist").write_bytes(rewritten)
    start = time.monotonic()
    wait_for(lambda: node.chained() and node.conflist()["plugins"][0]["delegate"]["hairpinMode"] is False,
             timeout=5, what="ambient-cni chained again after the rewrite")
    assert time.monotonic() - start < 3
    records = decode_records((node.conf / RECORD_NAME).read_bytes())
    assert [r.original for r in records] == [rewritten]

    # The token rotates: the plugin's kubeconfig follows.
    (node.sa / "token").write_text("token-2\n")
    wait_for(lambda: b"token-2" in (node.conf / "ambient-cni-kubeconfig").read_bytes(), what="new token")

    # Someone deletes the plugin: it comes back.
    link.unlink()
    wait_for(lambda: link.is_symlink(), what="plugin reinstalled")

    # A config that does not parse sorts first: it is reported and left alone.
    (node.conf / "00-broken.conflist").write_bytes(GARBAGE)
    wait_for(lambda: b"00-broken.conflist: not valid JSON" in proc.log_path.read_bytes(), what="error logged")
    time.sleep(0.5)
    assert (node.conf / "00-broken.conflist").read_bytes() == GARBAGE
    assert proc.poll() is None
    (node.conf / "00-broken.conflist").unlink()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    assert (node.conf / "10-flannel.conflist").read_bytes() == rewritten      # byte for byte
    assert sorted(p.name for p in node.conf.iterdir()) == ["10-flannel.conflist"]
    assert sorted(p.name for p in node.bin.iterdir()) == ["bridge"]
    log = proc.log_path.read_text()
    assert "10-flannel.conflist restored byte for byte" in log


def test_once_wraps_a_plain_conf_and_uninstall_puts_it_back(node):
    (node.conf / "10-bridge.conf").write_bytes(BRIDGE_CONF)
    (node.conf / "99-loopback.conf").write_bytes(b'{"cniVersion": "1.0.0", "name": "lo", "type": "loopback"}')
    done = subprocess.run(node.args("--once"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (node.conf / "10-bridge.conf").exists()
    assert [p["type"] for p in node.conflist("10-bridge.conflist")["plugins"]] == ["bridge", "ambient-cni"]
    bundles = [p.name for p in node.bin.iterdir() if p.name.startswith("ambient-cni-bundle-")]
    assert len(bundles) == 1

    again = subprocess.run(node.args("--once"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert again.returncode == 0 and "already chained last" in again.stderr

    undo = subprocess.run(node.args("--uninstall"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert undo.returncode == 0, undo.stderr
    assert (node.conf / "10-bridge.conf").read_bytes() == BRIDGE_CONF
    assert sorted(p.name for p in node.conf.iterdir()) == ["10-bridge.conf", "99-loopback.conf"]
    assert sorted(p.name for p in node.bin.iterdir()) == ["bridge"]


def test_once_refuses_an_unparseable_primary_and_says_why(node):
    (node.conf / "10-flannel.conflist").write_bytes(GARBAGE)
    done = subprocess.run(node.args("--once"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1
    assert "10-flannel.conflist: not valid JSON" in done.stderr and "left alone" in done.stderr
    assert (node.conf / "10-flannel.conflist").read_bytes() == GARBAGE


def test_a_new_bundle_replaces_the_old_one(node):
    (node.conf / "10-flannel.conflist").write_bytes(FLANNEL)
    assert subprocess.run(node.args("--once"), cwd=REPO, capture_output=True, timeout=60).returncode == 0
    old = os.readlink(node.bin / "ambient-cni")
    (node.bundle / "_internal" / "libpython3.11.so.1.0").write_bytes(b"lib v2")
    assert subprocess.run(node.args("--once"), cwd=REPO, capture_output=True, timeout=60).returncode == 0
    new = os.readlink(node.bin / "ambient-cni")
    assert new != old and (node.bin / new).exists() and not (node.bin / old).exists()
    assert (node.bin / Path(new).parent / "_internal" / "libpython3.11.so.1.0").read_bytes() == b"lib v2"


def test_missing_service_account_is_a_clear_error(node):
    (node.conf / "10-flannel.conflist").write_bytes(FLANNEL)
    (node.sa / "token").unlink()
    done = subprocess.run(node.args("--once"), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert done.returncode == 1 and "service account credentials" in done.stderr
    assert (node.conf / "10-flannel.conflist").read_bytes() == FLANNEL
