"""`ambient-agent install-cni` as a process on temporary CNI dirs: install,
a primary CNI rewriting its file, an unparseable primary, SIGTERM with
--uninstall-on-exit restoring the original bytes."""

from __future__ import annotations

import json
import os
import shutil
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
        log_path = tmp_path / f"install-cni-{len(procs)}.log"      # one per installer
        log = open(log_path, "wb")
        proc = subprocess.Popen(node.args("--poll-interval", "0.2", *extra), stdout=log, stderr=log, cwd=REPO)
        proc.log_path = log_path
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


def test_two_installers_during_an_upgrade_only_the_newest_acts_and_the_last_uninstalls(node, daemon, tmp_path):
    """The chart surges the DaemonSet: a new pod's install-cni starts beside the old one's."""
    (node.conf / "10-flannel.conflist").write_bytes(FLANNEL)
    old = daemon("--uninstall-on-exit")
    wait_for(node.chained, what="the old installer chains ambient-cni")
    old_link = os.readlink(node.bin / "ambient-cni")
    # The new version's bundle differs: two managing installers would swap the link every round.
    v2 = tmp_path / "bundle-v2"
    shutil.copytree(node.bundle, v2, symlinks=True)
    (v2 / "_internal" / "libpython3.11.so.1.0").write_bytes(b"lib v2")
    args = node.args("--poll-interval", "0.2", "--uninstall-on-exit")
    args[args.index("--plugin-source") + 1] = str(v2)
    log = open(tmp_path / "install-cni-v2.log", "wb")
    new = subprocess.Popen(args, stdout=log, stderr=log, cwd=REPO)
    try:
        wait_for(lambda: os.readlink(node.bin / "ambient-cni") != old_link, what="the new bundle linked")
        new_link = os.readlink(node.bin / "ambient-cni")
        time.sleep(1.0)                          # several rounds of both
        assert os.readlink(node.bin / "ambient-cni") == new_link
        assert b"a newer install-cni manages this node; standing by" in old.log_path.read_bytes()
        # The old pod goes: nothing is uninstalled, not even for a moment.
        old.send_signal(signal.SIGTERM)
        assert old.wait(10) == 0
        assert node.chained() and os.readlink(node.bin / "ambient-cni") == new_link
        assert (node.conf / "ambient-cni-kubeconfig").exists()
        assert b"ambient-cni stays installed" in old.log_path.read_bytes()
        # The last one out restores the node.
        new.send_signal(signal.SIGTERM)
        assert new.wait(10) == 0
    finally:
        if new.poll() is None:
            new.kill()
            new.wait(5)
    assert (node.conf / "10-flannel.conflist").read_bytes() == FLANNEL
    assert sorted(p.name for p in node.conf.iterdir()) == ["10-flannel.conflist"]
    assert sorted(p.name for p in node.bin.iterdir()) == ["bridge"]


def test_when_the_newest_installer_leaves_first_the_older_one_takes_the_node_back(node, daemon):
    """A rollback, or the new pod deleted while the old one still runs."""
    (node.conf / "10-flannel.conflist").write_bytes(FLANNEL)
    older = daemon("--uninstall-on-exit")
    wait_for(node.chained, what="chained")
    newer = daemon("--uninstall-on-exit")
    wait_for(lambda: b"standing by" in older.log_path.read_bytes(), what="the older installer stands by")
    newer.send_signal(signal.SIGTERM)
    assert newer.wait(10) == 0
    assert node.chained()
    wait_for(lambda: b"this one takes over" in older.log_path.read_bytes(), what="the older one takes over")
    (node.bin / "ambient-cni").unlink()       # and it manages the node again: repairs
    wait_for(lambda: (node.bin / "ambient-cni").is_symlink(), what="plugin reinstalled by the older one")
    older.send_signal(signal.SIGTERM)
    assert older.wait(10) == 0
    assert (node.conf / "10-flannel.conflist").read_bytes() == FLANNEL
    assert sorted(p.name for p in node.conf.iterdir()) == ["10-flannel.conflist"]
