"""The installed ambient-cni bundle under runtimes that are not Kubernetes,
and with a hung agent (issue 16, item 3).

The bundle built by ``make cni-plugin`` is installed with
``ambient-agent install-cni`` into a podman-style conflist, then run with no
Python on the machine (``test_python_free.hide_every_python``) and with
what podman 4.3 with its CNI backend really hands a plugin:

* ``CNI_ARGS=IgnoreUnknown=1;K8S_POD_NAME=<container name>``, never a
  namespace (containers/common leaves it out on purpose);
* the configuration libcni writes on stdin, for a conflist of cniVersion
  0.4.0 (podman's default network) and of 1.0.0: the entry with the list's
  ``name`` and ``cniVersion``, and ``prevResult`` from the bridge plugin in
  that version (0.4.0 lists ``ips[].version``, 1.0.0 does not); DEL and
  CHECK carry the cached result as ``prevResult`` too.

The plugin must pass ``prevResult`` through untouched, say why once in its
log, and never call the agent. Then a Kubernetes pod of a mesh namespace is
torn down (DEL) and checked (CHECK) while the agent is hung (a Unix socket
of this test that accepts and never answers): both must return within the
non-mesh budget (0.2 s, plus the bundle's start), DEL successfully, and
every failure must be in the log file as well as on stdout.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from lab.cnichain import plugin_config
from tests.cni.test_python_free import REPO, bundle, hide_every_python  # noqa: F401 (bundle: fixture)
from tests.unit.test_cni_plugin import AMBIENT, FakeAgent

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a private mount namespace")

# podman 4.3's default network (87-podman-bridge.conflist), as Debian's podman writes it.
PODMAN_040 = {"cniVersion": "0.4.0", "name": "podman", "plugins": [
    {"type": "bridge", "bridge": "cni-podman0", "isGateway": True, "ipMasq": True, "hairpinMode": True,
     "ipam": {"type": "host-local", "routes": [{"dst": "0.0.0.0/0"}],
              "ranges": [[{"subnet": "198.18.88.0/24", "gateway": "198.18.88.1"}]]}},
    {"type": "portmap", "capabilities": {"portMappings": True}},
    {"type": "firewall"},
    {"type": "tuning"}]}
PODMAN_100 = {**PODMAN_040, "cniVersion": "1.0.0", "name": "podman1"}

NETNS = "/run/netns/netns-4b1f2e9c-7a51-3f0e-a6d2-0c9e1b7d5a11"
# The bridge plugin's result, as libcni hands it to the next plugin in each version.
PREV_040 = {"cniVersion": "0.4.0",
            "interfaces": [{"name": "cni-podman0", "mac": "3a:8c:1e:55:0b:01"},
                           {"name": "veth5d2c9a41", "mac": "c6:41:7b:0e:9a:22"},
                           {"name": "eth0", "mac": "9e:2a:63:14:c8:03", "sandbox": NETNS}],
            "ips": [{"version": "4", "interface": 2, "address": "198.18.88.7/24", "gateway": "198.18.88.1"}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
PREV_100 = {"cniVersion": "1.0.0",
            "interfaces": PREV_040["interfaces"],
            "ips": [{"interface": 2, "address": "198.18.88.8/24", "gateway": "198.18.88.1"}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
CONTAINER_ID = "5d2c9a41e07b8f3c61d0a9b2e4f7c8d1a3b5e6f70819a2b3c4d5e6f708192a3b"
PODMAN_ARGS = "IgnoreUnknown=1;K8S_POD_NAME=quirky_hopper"
KUBE_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web;K8S_POD_UID=uid-web"
BOUND_SECONDS = 1.0        # the 0.2 s budget plus the bundle's start on a busy 2-core machine


def install(bundle: Path, bin_dir: Path, conf_dir: Path, conflist: dict, sock: str, state: Path,
            log: Path) -> dict:
    """install-cni chains the bundle into ``conflist``; the resulting conflist."""
    conf_dir.mkdir()
    (conf_dir / "87-podman-bridge.conflist").write_text(json.dumps(conflist, indent=2))
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "install-cni", "--once", "--cni-bin-dir", str(bin_dir),
         "--cni-conf-dir", str(conf_dir), "--plugin-source", str(bundle), "--agent-socket", sock,
         "--state", f"file:{state}", "--plugin-log-file", str(log)],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr
    installed = json.loads((conf_dir / "87-podman-bridge.conflist").read_bytes())
    assert [p["type"] for p in installed["plugins"]] == [p["type"] for p in conflist["plugins"]] + ["ambient-cni"]
    return installed


def test_installed_bundle_under_podman_and_with_a_hung_agent(bundle, tmp_path):  # noqa: F811
    bin_dir, out = tmp_path / "bin", tmp_path / "out"
    bin_dir.mkdir()
    out.mkdir()
    sock, state, log = str(tmp_path / "agent.sock"), tmp_path / "state.json", tmp_path / "ambient-cni.log"
    state.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh", "labels": AMBIENT}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "mesh", "uid": "uid-web"},
         "spec": {"nodeName": "node1"}}]}))
    lists = {"040": install(bundle, bin_dir, tmp_path / "net040", PODMAN_040, sock, state, log),
             "100": install(bundle, bin_dir, tmp_path / "net100", PODMAN_100, sock, state, log)}
    prevs = {"040": PREV_040, "100": PREV_100}

    def stdin(version: str) -> Path:
        conflist = lists[version]
        path = out / f"stdin-{version}.json"
        path.write_text(json.dumps(plugin_config(conflist, len(conflist["plugins"]) - 1, prevs[version])))
        return path

    plugin = shlex.quote(str(bin_dir / "ambient-cni"))
    calls: list[tuple[str, str, str, str]] = [
        # (tag, command, CNI_ARGS, conflist version)
        ("podman-add-040", "ADD", PODMAN_ARGS, "040"),
        ("podman-add-100", "ADD", PODMAN_ARGS, "100"),
        ("podman-check-100", "CHECK", PODMAN_ARGS, "100"),
        ("podman-del-040", "DEL", PODMAN_ARGS, "040"),
        ("hung-del-100", "DEL", KUBE_ARGS, "100"),
        ("hung-check-040", "CHECK", KUBE_ARGS, "040"),
    ]

    def invoke(tag: str, command: str, args: str, version: str) -> str:
        env = (f"CNI_COMMAND={command} CNI_CONTAINERID={CONTAINER_ID} CNI_NETNS={NETNS} CNI_IFNAME=eth0"
               f" CNI_PATH={shlex.quote(str(bin_dir))} CNI_ARGS={shlex.quote(args)}")
        o = shlex.quote(str(out / tag))
        return (f"t0=$(date +%s%N); env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin {env} {plugin} "
                f"< {shlex.quote(str(stdin(version)))} > {o}.out 2> {o}.err; echo $? > {o}.rc; "
                f"echo $(( $(date +%s%N) - t0 )) > {o}.ns\n")

    script = hide_every_python(tmp_path) + "".join(invoke(*call) for call in calls)
    agent = FakeAgent(sock, answer=False)                 # accepts, reads the request, never answers
    try:
        run = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                             capture_output=True, text=True, timeout=120)
    finally:
        agent.close()
    assert run.returncode == 0 and "no-python-here" in run.stdout, (run.returncode, run.stdout, run.stderr)

    def result(tag):
        text = (out / f"{tag}.out").read_text()
        return (int((out / f"{tag}.rc").read_text()), json.loads(text) if text.strip() else None,
                (out / f"{tag}.err").read_text(), int((out / f"{tag}.ns").read_text()) / 1e9)

    # podman: prevResult through untouched, in the list's version; nothing on stderr.
    for tag, version in (("podman-add-040", "0.4.0"), ("podman-add-100", "1.0.0")):
        rc, added, err, _ = result(tag)
        assert (rc, err) == (0, ""), (tag, added, err)
        assert added == prevs[tag[-3:]] and added["cniVersion"] == version, (tag, added)
    assert result("podman-add-040")[1]["ips"][0]["version"] == "4"
    for tag in ("podman-check-100", "podman-del-040"):
        assert result(tag)[:3] == (0, None, ""), (tag, result(tag))

    # The hung agent: DEL succeeds, CHECK fails with "try again later", both bounded.
    rc, printed, err, took = result("hung-del-100")
    assert (rc, printed) == (0, None) and took < BOUND_SECONDS, (rc, printed, err, took)
    assert f"no answer from {sock} within 0.2 s" in err
    rc, printed, err, took = result("hung-check-040")
    assert rc == 1 and took < BOUND_SECONDS, (rc, printed, err, took)
    assert printed == {"cniVersion": "0.4.0", "code": 11, "msg": "ambient node agent unreachable",
                       "details": f"no answer from {sock} within 0.2 s"}
    # Only the two Kubernetes calls reached the agent.
    assert [r["op"] for r in agent.requests] == ["cni-del", "status"]

    # The log: why, once per podman call; the hung agent's DEL problem and CHECK failure.
    lines = log.read_text().splitlines()
    assert len(lines) == len(calls), lines
    for line, (tag, command, _, _) in zip(lines, calls):
        assert f"] {command} " in line, (tag, line)
        if tag.startswith("podman"):
            assert "not a Kubernetes pod: CNI_ARGS has no K8S_POD_NAMESPACE" in line, line
    assert "agent not informed (DEL succeeds anyway): no answer from" in lines[4]
    assert "error 11: ambient node agent unreachable: no answer from" in lines[5]
