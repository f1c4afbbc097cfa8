"""The benchmark's lab: two nodes, meshed and unmeshed pods, servers, meters.

Wraps ``lab.Lab`` (the same kubelet the tests use). Everything it
starts lives in the lab's namespaces and cgroups and goes away with
``close()``, which ``bench/run.py`` calls also on failure and Ctrl-C.
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from lab.lab import Lab
from lab.runtime import CniRunner

LOADGEN = str(Path(__file__).with_name("loadgen.py"))
DNSLOAD = str(Path(__file__).with_name("dnsload.py"))
REPO = Path(__file__).resolve().parents[1]
ECHO_PORT = 8080
IPERF_PORT = 5201
POD_CIDR = "198.18.0.0/16"
AGENT_MARK = 0x539        # agent.capture.datapath.AGENT_MARK: the agent's own sockets
OUTBOUND_PORT = 15001
CLK_TCK = os.sysconf("SC_CLK_TCK")

MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: mesh}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: iptclient, namespace: mesh}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: mesh}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mesh}
spec: {nodeName: node1, serviceAccountName: client, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: iptclient, namespace: mesh}
spec: {nodeName: node1, serviceAccountName: iptclient, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: mesh}
spec: {nodeName: node2, serviceAccountName: server, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: plain}
spec: {nodeName: node1, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: plain}
spec: {nodeName: node2, containers: [{name: c, image: none}]}
"""

# Scenario 8 (DNS), added to the lab only when it runs: the cluster DNS
# stand-in (an unmeshed pod on the other node, as CoreDNS would be) and a
# Service whose name the agent answers for meshed pods. The Service selects
# no pod: its DNS answer is its cluster IP whatever its endpoints, and no
# other scenario's traffic can meet it.
DNS_POD = "plain/dns"
DNS_SERVICE = ("dnsbench", "mesh")
DNS_EXTERNAL = ("www.external.example.", "198.18.250.1")    # forwarded by the proxy; address never dialled
DNS_MANIFEST = """
apiVersion: v1
kind: Pod
metadata: {name: dns, namespace: plain}
spec: {nodeName: node2, containers: [{name: c, image: none}]}
---
apiVersion: v1
kind: Service
metadata: {name: dnsbench, namespace: mesh}
spec: {selector: {app: dnsbench}, ports: [{port: 80}]}
"""

# Who talks to whom in each variant: (client pod, server pod).
PAIRS = {
    "baseline": ("plain/client", "plain/server"),    # no agent on either side
    "mesh": ("mesh/client", "mesh/server"),          # eBPF capture + HBONE between the node agents
    "iptables": ("mesh/iptclient", "mesh/server"),   # scenario 5: iptables REDIRECT on the client side
}


class TimedCniRunner(CniRunner):
    """A CniRunner that records how long each pod's network ADD took."""

    timings: list[dict] = []        # replaced per instance of TimedLab
    lock = threading.Lock()

    def exec_plugin(self, command, config, sandbox):
        t0 = time.perf_counter()
        try:
            return super().exec_plugin(command, config, sandbox)
        finally:
            with self.lock:
                self.timings.append({"pod": f"{sandbox.namespace}/{sandbox.name}", "command": command,
                                     "plugin": config.get("type"), "network": config.get("name"),
                                     "seconds": time.perf_counter() - t0})

    def add_network(self, conflist, sandbox, runtime_config=None):
        t0 = time.perf_counter()
        try:
            return super().add_network(conflist, sandbox, runtime_config)
        finally:
            with self.lock:
                self.timings.append({"pod": f"{sandbox.namespace}/{sandbox.name}", "command": "ADD-chain",
                                     "plugin": "*", "network": conflist.get("name"),
                                     "seconds": time.perf_counter() - t0})


class TimedLab(Lab):
    """The lab, with every CNI call timed (scenario 6)."""

    def __init__(self, *a, **kw) -> None:
        self.cni_timings: list[dict] = []
        super().__init__(*a, cni_runner=self._timed_runner, **kw)

    def _timed_runner(self, bin_dir: str, netns: str, timeout: float) -> CniRunner:
        runner = TimedCniRunner(bin_dir, netns, timeout)
        runner.timings = self.cni_timings
        return runner


def proc_cpu_seconds(pid: int) -> float:
    return sum(proc_cpu_split(pid))


def proc_cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds: the system share is the kernel's work in the
    agent's syscalls (on veth a send() runs the receiver's network stack too)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK      # utime, stime


def proc_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


class AgentMeter:
    """CPU seconds used and peak RSS of each node agent over a block of work."""

    def __init__(self, lab: Lab, interval: float = 0.2) -> None:
        self.pids = {n: lab.agent_pid(n) for n in lab.nodes}
        self.interval = interval
        self.cpu: dict[str, float] = {}
        self.rss_before: dict[str, float] = {}
        self.rss_peak: dict[str, float] = {}
        self.seconds = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            for n, pid in self.pids.items():
                try:
                    self.rss_peak[n] = max(self.rss_peak.get(n, 0.0), proc_rss_mb(pid))
                except OSError:
                    pass

    def __enter__(self) -> "AgentMeter":
        self._cpu0 = {n: proc_cpu_seconds(p) for n, p in self.pids.items()}
        self._sys0 = {n: proc_cpu_split(p)[1] for n, p in self.pids.items()}
        self.rss_before = {n: proc_rss_mb(p) for n, p in self.pids.items()}
        self.rss_peak = dict(self.rss_before)
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0
        self.cpu = {n: proc_cpu_seconds(p) - self._cpu0[n] for n, p in self.pids.items()}
        self.sys = {n: proc_cpu_split(p)[1] - self._sys0[n] for n, p in self.pids.items()}
        for n, p in self.pids.items():
            self.rss_peak[n] = max(self.rss_peak.get(n, 0.0), proc_rss_mb(p))


class BenchLab:
    """The lab the scenarios share."""

    def __init__(self, name: str | None = None, agent_args: list[str] | None = None) -> None:
        self.lab = TimedLab(name or ("b" + secrets.token_hex(3)), pod_timeout=30.0,
                            agent_command=[sys.executable, "-m", "bench.agent_shim"],
                            agent_args=agent_args or ())
        self.procs: list[subprocess.Popen] = []
        self.iptables_rules: list[tuple[str, list[str]]] = []
        self.dns: dict | None = None

    @property
    def name(self) -> str:
        return self.lab.name

    def up(self) -> None:
        self.lab.up(MANIFEST)
        self.lab.settle(20.0)
        self.wait_for_certificates(30.0)
        for pod in ("plain/client", "mesh/client", "mesh/iptclient"):
            # Many short connections (scenarios 3 and 5) fill the client's
            # port range with TIME_WAIT; without reuse connect() then spends
            # milliseconds searching for a free port, in every variant alike.
            self.lab.run(pod, ["sh", "-c", "echo 1 > /proc/sys/net/ipv4/tcp_tw_reuse"], check=True)
        for pod in ("plain/server", "mesh/server"):
            self.background(pod, [sys.executable, LOADGEN, "serve", str(ECHO_PORT)], ready=True)
            self.background(pod, ["iperf3", "-s", "-p", str(IPERF_PORT)])
        time.sleep(0.3)

    def wait_for_certificates(self, timeout: float) -> None:
        """Every agent holds a valid certificate for every identity it tracks.

        Until then a meshed connection waits for its pod's certificate and
        may time out; the first measurement must not race the CA (it did on
        a loaded CI machine: a reset iperf3 control connection).
        """
        deadline = time.monotonic() + timeout
        for node in self.lab.nodes:
            while True:
                certs = self.lab.agent_request(node, {"op": "status"}).get("certificates") or []
                if certs and all(c.get("state") == "valid" for c in certs):
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the agent of {node} holds no valid certificate for every "
                                       f"identity after {timeout:g}s: {certs}")
                time.sleep(0.1)

    def background(self, pod: str, argv: list[str], ready: bool = False) -> subprocess.Popen:
        proc = self.lab.exec(pod, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        if ready:
            line = proc.stdout.readline()
            if not line.strip().startswith("{"):
                raise RuntimeError(f"{argv[0]} in {pod} did not start: {line!r}")
        return proc

    def ip(self, pod: str) -> str:
        return self.lab.pod_ip(pod)

    def loadgen(self, variant: str, mode: str, *args: str, timeout: float = 120.0) -> dict:
        client, server = PAIRS[variant]
        return self.loadgen_in(client, mode, self.ip(server), str(ECHO_PORT), *args, timeout=timeout)

    def loadgen_in(self, pod: str, mode: str, *args: str, timeout: float = 120.0) -> dict:
        done = self.lab.run(pod, [sys.executable, LOADGEN, mode, *args], timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"loadgen {mode} in {pod} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def iperf(self, variant: str, seconds: float, streams: int) -> float:
        """Receiver-side goodput in MB/s."""
        client, server = PAIRS[variant]
        argv = ["iperf3", "-c", self.ip(server), "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J",
                "-P", str(streams)]
        done = self.lab.run(client, argv, timeout=seconds + 60)
        doc = json.loads(done.stdout or "{}")
        if done.returncode != 0 or "error" in doc:
            raise RuntimeError(f"iperf3 in {client}: {doc.get('error') or done.stderr.strip()}")
        return doc["end"]["sum_received"]["bits_per_second"] / 8e6

    def agent_pod(self, node: str, pod: str) -> dict:
        ns, name = pod.split("/")
        for p in self.lab.agent_request(node, {"op": "status"})["pods"]:
            if p["namespace"] == ns and p["name"] == name:
                return p
        raise KeyError(f"agent of {node} does not know {pod}")

    # -- scenario 5: the iptables capture, only ever inside this harness ----

    def iptables_capture(self, pod: str, node: str) -> None:
        """Move ``pod``'s outbound capture from eBPF to iptables REDIRECT.

        1. remove the pod's network namespace from the node's pinned
           ``pod_config`` map, so connect4 no longer rewrites its connects;
        2. ``iptables -t nat -A OUTPUT -p tcp -d <pod cidr> -m mark ! --mark
           <agent mark> -j REDIRECT --to-ports 15001`` inside the pod's
           namespace (the agent's own upstream sockets carry the mark, as
           Istio exempts its proxy by uid/mark).
        The agent's outbound listener then learns the destination through
        SO_ORIGINAL_DST (bench/agent_shim.py).
        """
        from agent.capture import bpfsys
        from agent.netns import NetnsSwitcher, netns_cookie, open_netns
        fd = open_netns(self.lab.pod_netns(pod))
        switcher = NetnsSwitcher()
        try:
            sock = switcher.socket(fd)
            cookie = netns_cookie(sock)
            sock.close()
        finally:
            switcher.close()
            os.close(fd)
        map_fd = bpfsys.obj_get(f"{self.lab.pin_dir(node)}/pod_config")
        try:
            if not bpfsys.map_delete(map_fd, ctypes.c_uint64(cookie)):
                raise RuntimeError(f"pod {pod} (netns cookie {cookie}) was not in {node}'s pod_config map")
        finally:
            os.close(map_fd)
        rule = ["-p", "tcp", "-d", POD_CIDR, "-m", "mark", "!", "--mark", hex(AGENT_MARK),
                "-j", "REDIRECT", "--to-ports", str(OUTBOUND_PORT)]
        self.iptables_rules.append((pod, rule))
        self.lab.run(pod, ["iptables", "-w", "-t", "nat", "-A", "OUTPUT", *rule], check=True)

    def remove_iptables(self) -> list[str]:
        problems = []
        while self.iptables_rules:
            pod, rule = self.iptables_rules.pop()
            try:
                done = self.lab.run(pod, ["iptables", "-w", "-t", "nat", "-D", "OUTPUT", *rule])
                if done.returncode != 0:
                    problems.append(f"iptables -D in {pod}: {done.stderr.strip()}")
            except Exception as exc:      # the pod may already be gone with its netns (and rules)
                problems.append(f"iptables -D in {pod}: {exc}")
        return problems

    # -- scenario 8: a cluster DNS, and clients that see it in resolv.conf --

    def dns_up(self) -> dict:
        """Start the cluster DNS stand-in and give both client pods a resolv.conf naming it.

        Lab pods share the host's files, so, as in tests/lab/test_dns.py, a
        pod's "container" is a process holding a private mount namespace
        with the lab's resolv.conf bound over /etc/resolv.conf. The agent
        reads the meshed pod's upstream from there (``PodResolvConf``:
        /proc/<pid>/root of a pod process in another mount namespace), and
        the DNS client runs in that mount namespace (``nsenter -m``), as a
        container's process would. Idempotent; returns the names, addresses
        and holders. Everything goes with ``close()`` (processes) and the lab
        (the pod, the Service, the file in the lab's directory).
        """
        if self.dns is not None:
            return self.dns
        res = self.lab.up(DNS_MANIFEST)
        if res["failed"]:
            raise RuntimeError(f"DNS pod: {res['failed']}")
        self.lab.settle(20.0)
        svc, ns = DNS_SERVICE
        items = json.loads(Path(self.lab.state_path).read_text())["items"]
        svc_ip = next(i["spec"]["clusterIP"] for i in items
                      if i["kind"] == "Service" and i["metadata"]["name"] == svc
                      and i["metadata"]["namespace"] == ns)
        service_name = f"{svc}.{ns}.svc.cluster.local."
        zone = {service_name: [svc_ip], DNS_EXTERNAL[0]: [DNS_EXTERNAL[1]]}
        self.background(DNS_POD, [sys.executable, DNSLOAD, "serve", json.dumps(zone)], ready=True)
        conf = self.lab.dir / "bench-resolv.conf"
        conf.write_text(f"nameserver {self.ip(DNS_POD)}\n"
                        "search mesh.svc.cluster.local svc.cluster.local cluster.local\n"
                        "options ndots:5\n")
        holders = {}
        for pod in (PAIRS["baseline"][0], PAIRS["mesh"][0]):
            holder = self.background(pod, ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                                           f"mount --bind {conf} /etc/resolv.conf && echo '{{\"ready\": 1}}' "
                                           "&& exec sleep infinity"], ready=True)
            holders[pod] = holder.pid
        self.dns = {"server": self.ip(DNS_POD), "holders": holders,
                    "names": {"service": (service_name, svc_ip), "external": DNS_EXTERNAL}}
        return self.dns

    def dns_query(self, variant: str, kind: str, *args: str, timeout: float = 120.0) -> dict:
        """bench/dnsload.py ``query`` in the variant's client pod, in its "container" (mount namespace)."""
        dns = self.dns_up()
        pod = PAIRS[variant][0]
        name, expect = dns["names"][kind]
        argv = ["nsenter", "-t", str(dns["holders"][pod]), "-m", "--",
                sys.executable, DNSLOAD, "query", name, "--expect", expect, *args]
        done = self.lab.run(pod, argv, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"dnsload in {pod} failed ({done.returncode}): {done.stderr.strip()[-800:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def dns_counters(self, node: str, pod: str) -> dict:
        """The agent's DNS proxy counters for one pod: outcomes (local, forwarded, ratelimited, ...)."""
        status = self.lab.agent_request(node, {"op": "status"})
        return (status.get("dns") or {}).get("pods", {}).get(pod, {"outcomes": {}, "udp": 0, "tcp": 0})

    # -- pods for scaling / CNI -------------------------------------------

    def add_pods(self, namespace: str, names: list[str], node: str, meshed: bool) -> dict:
        labels = "{istio.io/dataplane-mode: ambient}" if meshed else "{}"
        docs = [f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {namespace}, labels: {labels}}}"]
        for n in names:
            docs.append(f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {n}, namespace: {namespace}}}\n"
                        f"spec: {{nodeName: {node}, containers: [{{name: c, image: none}}]}}")
        return self.lab.up("\n---\n".join(docs))

    def delete_pods(self, namespace: str, names: list[str]) -> None:
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=8) as ex:
            list(ex.map(lambda n: self.lab.delete_pod(namespace, n), names))

    def enrolled_on(self, node: str) -> int:
        return sum(1 for p in self.lab.agent_request(node, {"op": "status"})["pods"] if p.get("enrolled"))

    def close(self) -> list[str]:
        problems = self.remove_iptables() if self.lab.exists() else []
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                problems.append(f"process {proc.pid} did not exit")
        self.procs.clear()
        problems += self.lab.down()
        return problems


@contextmanager
def idle_connections(bl: BenchLab, variant: str, count: int, timeout: float = 120.0):
    """``count`` open meshed (or baseline) connections, held for the block."""
    client, server = PAIRS[variant]
    proc = bl.lab.exec(client, [sys.executable, LOADGEN, "idle", bl.ip(server), str(ECHO_PORT),
                                "--conns", str(count)],
                       stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.strip().startswith("{"):
            raise RuntimeError(f"idle connections from {client}: {line!r} {proc.stderr.read()[-500:]}")
        yield json.loads(line)["ready"]
    finally:
        try:
            proc.stdin.close()
        except OSError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
