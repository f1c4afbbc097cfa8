"""Start-up cost of the installed ambient-cni plugin, per invocation.

    .venv/bin/python -m bench.cni_start [--runs 50] [--onefile]

Installs the PyInstaller onedir bundle (``make cni-plugin``) with
``ambient-agent install-cni --once`` into a temporary bin/conf dir, then times
(wall clock, fork to exit) VERSION and ADD runs of the installed plugin:
ADD with ``"state": "kube"`` against the test-only API server over HTTPS and ADD with a
``file:`` state, both against a stand-in agent on a Unix socket answering
"enrolled". For comparison: the venv's console script (a Python start), and
with ``--onefile`` a onefile build of the same plugin (it unpacks itself to
/tmp on every run). Prints p50/p99 in milliseconds and writes nothing else.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lab.cnichain import plugin_config  # noqa: E402
from bench.cni_fixtures import AMBIENT, ENROLLED, FLANNEL, PREV_100, FakeAgent  # noqa: E402
from lab.kubeapi import objects  # noqa: E402
from lab.kubeapi import server as kubeapi_server  # noqa: E402
from lab.kubeapi.server import KubeApiServer  # noqa: E402


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def timed(cmd: list[str], env: dict, stdin: bytes, runs: int) -> tuple[list[float], list[float]]:
    """(wall ms, CPU ms user+sys of the plugin and its children) per run.

    CPU time is the steadier figure on a shared machine: wall time includes
    waiting for a core."""
    wall, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(cmd, input=stdin, env=env, capture_output=True)
        wall.append((time.perf_counter() - start) * 1000)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append((after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000)
        if done.returncode != 0:
            raise SystemExit(f"{cmd[0]} failed: {done.stdout!r} {done.stderr!r}")
    return wall, cpu


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--onefile", action="store_true", help="also build and time a onefile bundle")
    args = ap.parse_args()
    subprocess.run(["make", "-s", "cni-plugin"], cwd=REPO, check=True)
    # The stand-in API server writes headers and body in two sends; with
    # Nagle on, the body waits for the plugin's delayed ACK (40 ms per GET).
    # The real API server (Go net/http) sets TCP_NODELAY on every connection.
    kubeapi_server._Handler.disable_nagle_algorithm = True
    rows = []
    with tempfile.TemporaryDirectory(prefix="cni-bench-") as tmp, KubeApiServer(tls=True) as api:
        tmp = Path(tmp)
        bin_dir, conf_dir = tmp / "bin", tmp / "net.d"
        bin_dir.mkdir()
        conf_dir.mkdir()
        (conf_dir / "10-flannel.conflist").write_bytes(FLANNEL)
        (tmp / "token").write_text(api.token)
        (tmp / "ca.crt").write_bytes(api.ca_pem)         # HTTPS, verified, as on a cluster
        sock = str(tmp / "agent.sock")
        subprocess.run([sys.executable, "-m", "agent.cli", "install-cni", "--once",
                        "--cni-bin-dir", str(bin_dir), "--cni-conf-dir", str(conf_dir),
                        "--plugin-source", str(REPO / "build/cni/ambient-cni"), "--agent-socket", sock,
                        "--kube-server", api.url, "--token-file", str(tmp / "token"),
                        "--ca-file", str(tmp / "ca.crt")], cwd=REPO, check=True, capture_output=True)
        api.create(objects.namespace("mesh", AMBIENT))
        pod = objects.pod("web", "mesh")
        pod["metadata"]["uid"] = "u1"
        api.create(pod)
        state = tmp / "state.json"
        state.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": [
            objects.namespace("mesh", AMBIENT), pod]}))
        conflist = json.loads((conf_dir / "10-flannel.conflist").read_bytes())
        kube_conf = plugin_config(conflist, len(conflist["plugins"]) - 1, PREV_100)
        file_conf = dict(kube_conf, state=f"file:{state}")
        file_conf.pop("kubeconfig")
        add_env = {"CNI_COMMAND": "ADD", "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/p",
                   "CNI_IFNAME": "eth0", "CNI_PATH": str(bin_dir),
                   "CNI_ARGS": "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web;K8S_POD_UID=u1"}
        agent = FakeAgent(sock, ENROLLED)
        plugins = {"onedir (installed)": [str(bin_dir / "ambient-cni")],
                   "venv console script": [str(REPO / ".venv/bin/ambient-cni")]}
        if args.onefile:
            work = tmp / "onefile"
            # The same Analysis as cni/ambient-cni.spec, packed as one file.
            spec = (REPO / "cni/ambient-cni.spec").read_text().replace("ROOT = os.path.dirname(SPECPATH)",
                                                                      f"ROOT = {str(REPO)!r}")
            spec = spec[:spec.index("exe = EXE(")] + (
                "exe = EXE(pyz, a.scripts, a.binaries, a.datas, [], name='ambient-cni', debug=False,\n"
                "          strip=False, upx=False, console=True)\n")
            work.mkdir()
            (work / "onefile.spec").write_text(spec)
            subprocess.run([str(REPO / ".venv/bin/python"), "-m", "PyInstaller", "--noconfirm", "--log-level",
                            "ERROR", "--distpath", str(work / "dist"), "--workpath", str(work / "build"),
                            str(work / "onefile.spec")], check=True)
            plugins["onefile"] = [str(work / "dist" / "ambient-cni")]
        try:
            for name, cmd in plugins.items():
                for what, env, stdin in (("VERSION", {"CNI_COMMAND": "VERSION"}, b""),
                                         ("ADD kube", add_env, json.dumps(kube_conf).encode()),
                                         ("ADD file", add_env, json.dumps(file_conf).encode())):
                    timed(cmd, env, stdin, 3)                    # warm the page cache
                    wall, cpu = timed(cmd, env, stdin, args.runs)
                    rows.append((name, what, statistics.median(wall), percentile(wall, 0.99),
                                 statistics.median(cpu)))
        finally:
            agent.close()
    print(f"{'plugin':<22} {'call':<9} {'p50 ms':>8} {'p99 ms':>8} {'cpu p50':>8}   ({args.runs} runs each, "
          f"load {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    for name, what, p50, p99, cpu in rows:
        print(f"{name:<22} {what:<9} {p50:8.1f} {p99:8.1f} {cpu:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
