"""ambient-cni chained under a real container runtime: podman with its CNI
backend (issue 16, item 3). Skipped where podman or runc is absent.

podman (4.3, Debian) runs a busybox container on a conflist of the real
``bridge`` + ``host-local`` plugins with the installed ambient-cni bundle
chained last. What is checked:

* without any help podman passes ``K8S_POD_NAME`` only: the container
  starts, its address is the one host-local gave (podman reads it from the
  chain's final result, so ``prevResult`` went through untouched), and the
  agent is not asked;
* with ``CNI_ARGS=K8S_POD_NAMESPACE=mesh;...`` in podman's environment
  (podman appends it to its own) the pod's ADD reaches the agent with the
  namespace, podman's name and the container's address, and ``podman rm``
  sends the DEL.

The agent is this test's stand-in (``FakeAgent``): this test pins the
runtime-facing contract. Enrolment and capture by the real agent are
covered by the lab tests with the lab's own runtime (``lab/``); a
podman run against the real agent is NOT done here (partial, issue 16).

Everything is private to the test: podman's storage, run and tmp
directories, its containers.conf, the CNI config dir, a cgroup parent of
its own (removed after), a bridge and a host-local network name unique to
the run (the bridge, which the bridge plugin's DEL leaves behind, and
host-local's reservations are removed after). Addresses: 198.18.0.0/15.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.cni.test_python_free import REPO, bundle  # noqa: F401 (bundle: fixture)
from tests.unit.test_cni_plugin import FakeAgent

BUSYBOX = "/bin/busybox"
CNI_PLUGINS = "/usr/lib/cni"

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not shutil.which("podman") or not shutil.which("runc")
    or not os.path.exists(BUSYBOX) or not os.path.exists(f"{CNI_PLUGINS}/bridge"),
    reason="needs root, podman, runc, busybox-static and containernetworking-plugins")


def busybox_is_static() -> bool:
    done = subprocess.run(["file", "-L", BUSYBOX], capture_output=True, text=True)
    return "statically linked" in done.stdout or "static-pie" in done.stdout


class Podman:
    """podman with every path of its own under ``root``."""

    def __init__(self, root: Path, cni_bin: Path, conf_dir: Path, cgroup_parent: str) -> None:
        self.root = root
        self.cgroup_parent = cgroup_parent
        (root / "tmp").mkdir()
        self.conf = root / "containers.conf"
        self.conf.write_text(f"""
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
tmp_dir = "{root}/tmp"
[network]
network_backend = "cni"
cni_plugin_dirs = ["{cni_bin}", "{CNI_PLUGINS}"]
network_config_dir = "{conf_dir}"
""")
        self.storage = root / "storage.conf"
        self.storage.write_text(f'[storage]\ndriver = "vfs"\nrunroot = "{root}/run"\ngraphroot = "{root}/graph"\n')

    def __call__(self, *args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
        environ = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
                   "CONTAINERS_CONF": str(self.conf), "CONTAINERS_STORAGE_CONF": str(self.storage),
                   "HOME": str(self.root), "XDG_RUNTIME_DIR": str(self.root / "run"), **(env or {})}
        done = subprocess.run(["podman", "--root", str(self.root / "graph"), "--runroot", str(self.root / "run"),
                               "--storage-driver", "vfs", *args],
                              capture_output=True, text=True, env=environ, timeout=120)
        if check:
            assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done


def busybox_rootfs(tmp: Path) -> Path:
    """A root file system of busybox-static and the applets the test uses
    (``podman run --rootfs``: no image, so nothing in podman's image caches)."""
    root = tmp / "rootfs"
    for name in ("bin", "etc", "proc", "sys", "dev", "tmp"):
        (root / name).mkdir(parents=True)
    shutil.copy(os.path.realpath(BUSYBOX), root / "bin" / "busybox")
    for applet in ("sh", "ip", "sleep", "cat"):
        (root / "bin" / applet).symlink_to("busybox")
    return root


def test_podman_runs_containers_through_ambient_cni(bundle, tmp_path):  # noqa: F811
    if not busybox_is_static():
        pytest.skip(f"{BUSYBOX} is not statically linked")
    run_id = uuid.uuid4().hex[:8]
    net, bridge = f"ambient-{run_id}", f"amb{run_id}"
    cgroup_parent = f"/ambient-podman-{run_id}"
    cni_bin, conf_dir = tmp_path / "cni-bin", tmp_path / "net.d"
    conf_dir.mkdir()
    cni_bin.mkdir()
    sock, log = str(tmp_path / "agent.sock"), tmp_path / "ambient-cni.log"
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "mesh"}}]}))
    conflist = {"cniVersion": "0.4.0", "name": net, "plugins": [
        {"type": "bridge", "bridge": bridge, "isGateway": True, "ipMasq": False,
         "ipam": {"type": "host-local", "ranges": [[{"subnet": "198.19.77.0/24", "gateway": "198.19.77.1"}]],
                  "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(tmp_path / "host-local")}}]}
    (conf_dir / f"{net}.conflist").write_text(json.dumps(conflist))
    done = subprocess.run(
        [sys.executable, "-m", "agent.cli", "install-cni", "--once", "--cni-bin-dir", str(cni_bin),
         "--cni-conf-dir", str(conf_dir), "--plugin-source", str(bundle), "--agent-socket", sock,
         "--state", f"file:{state}", "--plugin-log-file", str(log)],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0, done.stderr

    # podman refuses a runroot of 50 characters or more: a short directory of its own.
    podman_root = Path(tempfile.mkdtemp(prefix="ambpm-", dir="/tmp"))
    podman = Podman(podman_root, cni_bin, conf_dir, cgroup_parent)
    agent = FakeAgent(sock, {"ok": True, "enrolled": False, "reason": "stand-in agent"})
    names = [f"plain-{run_id}", f"meshed-{run_id}"]
    # Shared places podman and libcni create when missing (runc's state root,
    # libcni's result cache): removed after if this test created them.
    shared = [Path("/run/runc"), Path("/var/lib/cni/results"), Path("/var/lib/cni")]
    existed = {p: p.exists() for p in shared}
    try:
        common = ["run", "-d", "--network", net, "--cgroup-parent", cgroup_parent]
        image = ["--rootfs", str(busybox_rootfs(tmp_path)), "sleep", "300"]
        podman(*common, "--name", names[0], *image)
        podman(*common, "--name", names[1], *image,
               env={"CNI_ARGS": f"K8S_POD_NAMESPACE=mesh;K8S_POD_UID=uid-{run_id}"})

        addresses = {}
        for name in names:
            inspect = json.loads(podman("inspect", name).stdout)[0]
            address = inspect["NetworkSettings"]["Networks"][net]["IPAddress"]
            assert address.startswith("198.19.77."), inspect["NetworkSettings"]
            shown = podman("exec", name, "ip", "-4", "addr", "show", "eth0").stdout
            assert f"inet {address}/24" in shown, shown
            addresses[name] = address

        adds = [r for r in agent.requests if r.get("op") == "cni-add"]
        assert len(adds) == 1, agent.requests                # the plain container asked nothing
        assert (adds[0]["namespace"], adds[0]["name"], adds[0]["uid"]) == ("mesh", names[1], f"uid-{run_id}")
        assert adds[0]["ips"] == [f"{addresses[names[1]]}/24"]

        for name in names:
            podman("rm", "-f", "-t", "0", name)
        dels = [r for r in agent.requests if r.get("op") == "cni-del"]
        assert [(r["namespace"], r["name"]) for r in dels] == [("mesh", names[1])], agent.requests
        text = log.read_text()
        assert f"ADD /{names[0]}" in text and "not a Kubernetes pod" in text, text
    finally:
        agent.close()
        for name in names:
            podman("rm", "-f", "-t", "0", name, check=False)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        for cached in Path("/var/lib/cni/results").glob(f"{net}-*"):
            cached.unlink()
        for path in shared:
            if not existed[path]:
                try:
                    path.rmdir()                         # only if empty: another user's files stay
                except OSError:
                    pass
        for ctrl in Path("/sys/fs/cgroup").iterdir():
            leftover = ctrl / cgroup_parent.lstrip("/")
            for sub in sorted(leftover.glob("**/"), key=lambda p: -len(p.parts)) if leftover.is_dir() else []:
                try:
                    sub.rmdir()
                except OSError:
                    pass
        subprocess.run(["rm", "-rf", str(podman_root)], capture_output=True)
