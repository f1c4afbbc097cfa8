"""The local pod lab against the real kernel and the real CNI plugins (root only).

Every test builds its own lab (name ``t`` + 6 hex digits) and a fixture takes
it down even when the test fails. No test needs the real node agent: agents
are off, or played by ``fake_agent.py``; fake CNI plugins are small scripts
written into the test's temporary directory.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute

from lab import Lab, ManifestError, model, sysops
from lab import lab as lab_module

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root")

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
FAKE_AGENT = HERE / "fake_agent.py"

ECHO_SERVER = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.listen(16)
    print("ready", flush=True)
    while True:
        c, peer = s.accept()
        with c:
            data = c.recv(1000)
            c.sendall(data + b" from " + peer[0].encode())
""")

ECHO_CLIENT = textwrap.dedent("""
    import socket, sys
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    s.sendall(sys.argv[3].encode())
    print(s.recv(1000).decode())
""")

# A CNI plugin for the tests: logs every call, passes prevResult through,
# and fails ADD with code 11 ("try again later") for the pods and the number
# of times its configuration says (fail_times < 0: always).
FAKE_PLUGIN = """#!{python}
import json, os, sys
conf = json.load(sys.stdin)
cmd = os.environ["CNI_COMMAND"]
args = dict(kv.split("=", 1) for kv in os.environ.get("CNI_ARGS", "").split(";") if kv)
pod = args.get("K8S_POD_NAME")
entry = {{"tag": conf.get("tag"), "cmd": cmd, "pod": pod, "prev": "prevResult" in conf,
          "container": os.environ.get("CNI_CONTAINERID"), "netns": os.environ.get("CNI_NETNS"),
          "ifname": os.environ.get("CNI_IFNAME"), "path": os.environ.get("CNI_PATH"),
          "args": os.environ.get("CNI_ARGS"), "version": conf.get("cniVersion"),
          "name": conf.get("name"), "self_netns": os.readlink("/proc/self/ns/net")}}
with open(conf["log"], "a") as f:
    f.write(json.dumps(entry) + "\\n")
if cmd == "ADD":
    fail_pods = conf.get("fail_pods")
    if fail_pods is None or pod in fail_pods:
        counter = os.path.join(conf["state_dir"], f"{{conf.get('tag')}}-{{pod}}.count")
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, "w").write(str(n + 1))
        limit = conf.get("fail_times", 0)
        if limit < 0 or n < limit:
            print(json.dumps({{"cniVersion": conf["cniVersion"], "code": 11,
                              "msg": "agent not ready", "details": f"attempt {{n + 1}}"}}))
            sys.exit(1)
    print(json.dumps(conf["prevResult"]))
sys.exit(0)
"""


def new_name() -> str:
    return "t" + secrets.token_hex(3)


def leftovers(lab: Lab) -> list[str]:
    """Everything of this lab that is still on the machine."""
    out = []
    pattern = model.lab_netns_pattern(lab.name)
    out += [f"netns {n}" for n in sysops.list_netns() if pattern.match(n)]
    for path in (lab.cgroup_root, lab.pin_root, str(lab.dir)):
        if os.path.exists(path):
            out.append(path)
    return out


def ipam_leases(lab: Lab, node: str) -> list[str]:
    d = lab.ipam_dir(node) / lab_module.NETWORK_NAME
    if not d.is_dir():
        return []
    return sorted(p.name for p in d.iterdir() if _is_ip(p.name))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


def links(netns_path: str) -> list[str]:
    with IPRoute(netns=os.path.basename(netns_path)) as ipr:
        return sorted(link.get("ifname") for link in ipr.get_links())


def netns_id(path: str) -> str:
    return f"net:[{os.stat(path).st_ino}]"


@pytest.fixture
def make_lab():
    labs: list[Lab] = []

    def make(**kwargs) -> Lab:
        kwargs.setdefault("start_agents", False)
        kwargs.setdefault("ambient_cni", False)
        kwargs.setdefault("pod_timeout", 10.0)
        kwargs.setdefault("ca", False)          # the CA is exercised by the product tests
        lab = Lab(new_name(), **kwargs)
        labs.append(lab)
        return lab

    yield make
    for lab in labs:
        lab.down()
        assert leftovers(lab) == []


@pytest.fixture
def fake_plugin(tmp_path):
    """``(cni_bin, plugin entry factory, read log)`` for a logging fake plugin."""
    path = tmp_path / "fake-cni"
    path.write_text(FAKE_PLUGIN.format(python=sys.executable))
    path.chmod(0o755)
    log = tmp_path / "cni.log"
    state = tmp_path / "cni-state"
    state.mkdir()

    def entry(tag: str, **extra) -> dict:
        return {"type": "fake", "tag": tag, "log": str(log), "state_dir": str(state), **extra}

    def calls() -> list[dict]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    return {"fake": str(path)}, entry, calls


def start_server(lab: Lab, pod: str, port: int) -> subprocess.Popen:
    proc = lab.exec(pod, [sys.executable, "-c", ECHO_SERVER, str(port)],
                    stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def echo(lab: Lab, pod: str, ip: str, port: int, message: str) -> str:
    done = lab.run(pod, [sys.executable, "-c", ECHO_CLIENT, ip, str(port), message], timeout=20)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


# --- a two-node cluster shared by the read-only tests -----------------------

CLUSTER = """
apiVersion: v1
kind: Namespace
metadata:
  name: mesh
  labels: {istio.io/dataplane-mode: ambient}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: mesh, labels: {app: client}}
spec: {nodeName: node-a, serviceAccountName: client-sa}
---
apiVersion: v1
kind: Pod
metadata: {name: server, namespace: apps, labels: {app: server}}
spec: {nodeName: node-b}
---
apiVersion: v1
kind: Pod
metadata: {name: neighbour, namespace: apps}
spec: {nodeName: node-a}
---
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: kube-system}
spec: {nodeName: node-b, hostNetwork: true}
---
apiVersion: v1
kind: Service
metadata: {name: server, namespace: apps}
spec:
  selector: {app: server}
  ports: [{port: 7000}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: apps}
spec: {action: ALLOW}
"""


@pytest.fixture(scope="module")
def cluster():
    lab = Lab(new_name(), start_agents=False, ambient_cni=False, pod_timeout=10.0)
    try:
        report = lab.up(CLUSTER)
        assert report["failed"] == {}
        servers = [start_server(lab, "apps/server", 7000), start_server(lab, "apps/neighbour", 7000)]
        yield lab
        for s in servers:
            s.kill()
            s.wait()
    finally:
        lab.down()
        assert leftovers(lab) == []


def test_pods_get_addresses_in_their_nodes_subnets(cluster):
    st = cluster.status()
    subnets = {n["name"]: ipaddress.ip_network(n["pod_subnet"]) for n in st["nodes"]}
    assert sorted(subnets) == ["node-a", "node-b"] == cluster.nodes
    assert subnets["node-a"] != subnets["node-b"]
    for key in ("mesh/client", "apps/neighbour", "apps/server"):
        pod = cluster.pod(key)
        ip = ipaddress.ip_address(cluster.pod_ip(key))
        assert ip in subnets[pod["spec"]["nodeName"]]
        assert ip != next(subnets[pod["spec"]["nodeName"]].hosts())   # .1 is cni0


def test_state_file_is_a_cluster(cluster):
    doc = json.loads(Path(cluster.state_path).read_text())
    assert doc["kind"] == "List" and int(doc["metadata"]["resourceVersion"]) > 1
    items = doc["items"]

    def get(kind, ns, name):
        obj = model.find(items, kind, ns, name)
        assert obj is not None, (kind, ns, name)
        return obj

    for node in ("node-a", "node-b"):
        n = get("Node", "", node)
        assert n["status"]["addresses"][0] == {"type": "InternalIP", "address": cluster.node_ip(node)}
    for key in ("mesh/client", "apps/server", "apps/neighbour"):
        ns, name = key.split("/")
        pod = get("Pod", ns, name)
        st = pod["status"]
        assert st["phase"] == "Running"
        assert st["podIPs"] == [{"ip": st["podIP"]}]
        assert st["hostIP"] == cluster.node_ip(pod["spec"]["nodeName"])
        assert pod["metadata"]["uid"] and pod["metadata"]["resourceVersion"]
    # Namespaces a real cluster would have, declared or not, and their accounts.
    assert get("Namespace", "", "mesh")["metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    for ns in ("apps", "default", "kube-system"):
        get("Namespace", "", ns)
        get("ServiceAccount", ns, "default")
    get("ServiceAccount", "mesh", "client-sa")
    assert get("Pod", "apps", "server")["spec"]["serviceAccountName"] == "default"
    # Other kinds are kept as given; Services get a ClusterIP from the lab's range.
    assert get("AuthorizationPolicy", "apps", "allow-client")["spec"] == {"action": "ALLOW"}
    svc = get("Service", "apps", "server")
    rec = json.loads(cluster.lab_json.read_text())
    assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in ipaddress.ip_network(rec["service_cidr"])


def test_host_network_pod_uses_its_node(cluster):
    pod = cluster.pod("kube-system/probe")
    assert pod["status"]["podIP"] == cluster.node_ip("node-b") == pod["status"]["hostIP"]
    assert cluster.pod_netns("kube-system/probe") == cluster.node_netns("node-b")
    done = cluster.run("kube-system/probe", ["readlink", "/proc/self/ns/net"])
    assert done.stdout.strip() == netns_id(cluster.node_netns("node-b"))


@pytest.mark.parametrize("client, server", [
    ("mesh/client", "apps/server"),       # across nodes, over the underlay
    ("mesh/client", "apps/neighbour"),    # same node, through cni0
])
def test_pod_to_pod_tcp(cluster, client, server):
    reply = echo(cluster, client, cluster.pod_ip(server), 7000, "hello")
    # No masquerading anywhere: the server sees the client pod's own address.
    assert reply == f"hello from {cluster.pod_ip(client)}"


def test_exec_runs_in_the_pods_netns_and_cgroup(cluster):
    proc = cluster.exec("apps/server", ["sleep", "30"])
    try:
        cgroup = Path(f"/proc/{proc.pid}/cgroup").read_text()
        line = [x for x in cgroup.splitlines() if x.startswith("0::")][0]
        expected = "/" + os.path.relpath(cluster.pod_cgroup("apps/server"), sysops.CGROUP_V2)
        assert line == f"0::{expected}"
        assert expected.endswith("/node-b/apps_server")
        assert os.readlink(f"/proc/{proc.pid}/ns/net") == netns_id(cluster.pod_netns("apps/server"))
        assert str(proc.pid) in Path(cluster.pod_cgroup("apps/server"), "cgroup.procs").read_text().split()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("node", ["node-b", "node-a"])
def test_node_exec_reaches_a_pod(cluster, node):
    # What a kubelet's health probe does: connect from the node's own network.
    ip = cluster.pod_ip("apps/server")
    done = cluster.node_run(node, [sys.executable, "-c", ECHO_CLIENT, ip, "7000", "probe"], timeout=20)
    assert done.returncode == 0, done.stderr
    # Same node: straight out of cni0; other node: over the underlay from eth0.
    gateway = str(next(ipaddress.ip_network(cluster.status()["nodes"][1]["pod_subnet"]).hosts()))
    source = gateway if node == "node-b" else cluster.node_ip("node-a")
    assert done.stdout.strip() == f"probe from {source}"


def test_nodes_forward_inside_their_own_namespace(cluster):
    for node in cluster.nodes:
        done = cluster.node_run(node, ["cat", "/proc/sys/net/ipv4/ip_forward"])
        assert done.stdout.strip() == "1"


# --- labs of their own ----------------------------------------------------------

PAIR = """
kind: Pod
metadata: {name: one, namespace: apps, labels: {v: "1"}}
spec: {nodeName: n1}
---
kind: Pod
metadata: {name: two, namespace: apps}
spec: {nodeName: n2}
"""


def test_labels_apply_and_resource_versions(make_lab):
    lab = make_lab()
    lab.up(PAIR)

    def rv(obj=None):
        doc = json.loads(Path(lab.state_path).read_text())
        if obj is None:
            return int(doc["metadata"]["resourceVersion"])
        return model.find(doc["items"], *obj)["metadata"]["resourceVersion"]

    before, two_rv = rv(), rv(("Pod", "apps", "two"))
    lab.set_labels("Namespace", None, "apps", {"istio.io/dataplane-mode": "ambient"})
    assert rv() == before + 1
    assert model.find(json.loads(Path(lab.state_path).read_text())["items"], "Namespace", "", "apps")[
        "metadata"]["labels"] == {"istio.io/dataplane-mode": "ambient"}
    assert rv(("Pod", "apps", "two")) == two_rv     # untouched objects keep their version
    lab.set_labels("Pod", "apps", "one", {"v": None, "w": "2"})
    assert lab.pod("apps/one")["metadata"]["labels"] == {"w": "2"}
    assert rv() == before + 2
    with pytest.raises(KeyError):
        lab.set_labels("Pod", "apps", "missing", {"a": "b"})

    # Applying more: a new pod on a new node, and new labels for an existing pod.
    ip_one = lab.pod_ip("apps/one")
    report = lab.apply(PAIR.replace('v: "1"', 'v: "3"') + textwrap.dedent("""
        ---
        kind: Pod
        metadata: {name: three, namespace: apps}
        spec: {nodeName: n3}
        """))
    assert report["created"] == ["apps/three"] and "apps/one" in report["updated"]
    assert lab.pod("apps/one")["metadata"]["labels"] == {"v": "3"}
    assert lab.pod_ip("apps/one") == ip_one
    assert lab.nodes == ["n1", "n2", "n3"]
    # The new node routes to the old ones and back.
    start_server(lab, "apps/one", 7001)
    assert echo(lab, "apps/three", ip_one, 7001, "hi") == f"hi from {lab.pod_ip('apps/three')}"

    with pytest.raises(ManifestError, match="already runs on node n1"):
        lab.apply("kind: Pod\nmetadata: {name: one, namespace: apps}\nspec: {nodeName: n2}\n")


def test_delete_pod_runs_del_and_releases_everything(make_lab, fake_plugin):
    cni_bin, entry, calls = fake_plugin
    lab = make_lab(cni_bin=cni_bin, cni_plugins=[entry("first"), entry("second")])
    lab.up(PAIR)
    ip = lab.pod_ip("apps/one")
    assert ipam_leases(lab, "n1") == [ip]
    netns, cgroup = lab.pod_netns("apps/one"), lab.pod_cgroup("apps/one")
    sleeper = lab.exec("apps/one", ["sleep", "100"])

    assert lab.delete_pod("apps", "one") == []
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert ipam_leases(lab, "n1") == []
    assert not os.path.exists(netns) and not os.path.exists(cgroup)
    with pytest.raises(KeyError):
        lab.pod("apps/one")
    assert links(lab.node_netns("n1")) == ["cni0", "eth0", "lo"]    # host veth gone too
    dels = [(c["tag"], c["prev"]) for c in calls() if c["pod"] == "one" and c["cmd"] == "DEL"]
    assert dels == [("second", True), ("first", True)]     # reverse order, final ADD result
    assert lab.pod_ip("apps/two")


def test_cni_chain_execution_and_retry(make_lab, fake_plugin):
    cni_bin, entry, calls = fake_plugin
    lab = make_lab(cni_bin=cni_bin, cni_plugins=[entry("first"), entry("second", fail_times=2)])
    t0 = time.monotonic()
    report = lab.up("kind: Pod\nmetadata: {name: web, namespace: apps}\nspec: {nodeName: n1}\n")
    assert report["failed"] == {} and report["created"] == ["apps/web"]
    assert time.monotonic() - t0 < 8
    assert lab.pod("apps/web")["status"]["phase"] == "Running"

    log = [c for c in calls() if c["pod"] == "web"]
    assert [(c["tag"], c["cmd"], c["prev"]) for c in log] == [
        ("first", "ADD", True), ("second", "ADD", True),     # attempt 1: second fails ...
        ("second", "DEL", False), ("first", "DEL", False),   # ... and the chain is undone
        ("first", "ADD", True), ("second", "ADD", True),
        ("second", "DEL", False), ("first", "DEL", False),
        ("first", "ADD", True), ("second", "ADD", True),     # attempt 3 succeeds
    ]
    attempts = [c["container"] for c in log if c["tag"] == "first" and c["cmd"] == "ADD"]
    assert len(set(attempts)) == 3 and all(len(c) == 64 for c in attempts)   # a new sandbox each time
    uid = lab.pod("apps/web")["metadata"]["uid"]
    node_ns = netns_id(lab.node_netns("n1"))
    for c in log:
        assert c["self_netns"] == node_ns                  # plugins run in the node's network
        assert c["netns"] == lab.pod_netns("apps/web")
        assert c["ifname"] == "eth0" and c["path"] == str(lab.bin_dir)
        assert (c["version"], c["name"]) == ("1.0.0", "ambient-lab")
        assert c["args"] == (f"IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web;"
                             f"K8S_POD_INFRA_CONTAINER_ID={c['container']};K8S_POD_UID={uid}")
    # Only the successful attempt's lease is left.
    assert ipam_leases(lab, "n1") == [lab.pod_ip("apps/web")]
    conflist = json.loads(lab.conflist_path("n1").read_text())
    assert [p["type"] for p in conflist["plugins"]] == ["bridge", "fake", "fake"]
    assert conflist["plugins"][0]["ipam"]["dataDir"] == str(lab.ipam_dir("n1"))


def test_pod_fails_after_timeout_and_partial_add_is_undone(make_lab, fake_plugin):
    cni_bin, entry, calls = fake_plugin
    lab = make_lab(cni_bin=cni_bin, pod_timeout=1.5,
                   cni_plugins=[entry("gate", fail_times=-1, fail_pods=["bad"])])
    t0 = time.monotonic()
    report = lab.up(PAIR.replace("two", "bad").replace("n2", "n1"))
    assert time.monotonic() - t0 < 6
    assert report["created"] == ["apps/one"]
    assert list(report["failed"]) == ["apps/bad"] and "CNI error 11" in report["failed"]["apps/bad"]
    bad = lab.pod("apps/bad")
    assert bad["status"]["phase"] == "Failed"
    assert "agent not ready" in bad["status"]["message"]
    with pytest.raises(Exception):
        lab.pod_ip("apps/bad")
    assert sum(1 for c in calls() if c["pod"] == "bad" and c["cmd"] == "ADD") >= 2
    # The bridge's part of each attempt is gone: no lease, no veth.
    assert ipam_leases(lab, "n1") == [lab.pod_ip("apps/one")]
    assert links(lab.pod_netns("apps/bad")) == ["lo"]
    assert len([n for n in links(lab.node_netns("n1")) if n.startswith("veth")]) == 1   # only one's
    assert {p["name"]: p["phase"] for p in lab.status()["pods"]} == {"one": "Running", "bad": "Failed"}


def test_missing_node_name_is_an_error_naming_the_pod(make_lab):
    lab = make_lab()
    with pytest.raises(ManifestError, match="apps/orphan has no spec.nodeName"):
        lab.up("kind: Pod\nmetadata: {name: orphan, namespace: apps}\nspec: {}\n")
    assert not lab.dir.exists()


def test_down_removes_everything(make_lab):
    lab = make_lab()
    lab.up(PAIR)
    in_pod = lab.exec("apps/one", ["sleep", "100"])
    on_node = lab.node_exec("n2", ["sleep", "100"])
    assert leftovers(lab) != []
    assert lab.down() == []
    assert in_pod.wait(timeout=5) == -signal.SIGKILL and on_node.wait(timeout=5) == -signal.SIGKILL
    assert leftovers(lab) == []
    assert not os.path.exists(lab.cgroup_root)
    assert lab.down() == []            # idempotent
    assert Lab.down_by_name(lab.name) == []


CRASHER = """
import sys, time
sys.path.insert(0, {repo!r})
from lab import Lab
lab = Lab({name!r}, start_agents=False, ambient_cni=False, pod_timeout=600,
          cni_bin={cni_bin!r}, cni_plugins=[{plugin!r}])
lab.up({good!r})
sleeper = lab.exec("apps/one", ["sleep", "600"])
print(sleeper.pid, flush=True)
lab.apply({stuck!r})     # retries for ten minutes: the test kills us first
"""


def test_down_after_a_crash(tmp_path, fake_plugin):
    cni_bin, entry, calls = fake_plugin
    name = new_name()
    script = CRASHER.format(repo=str(REPO), name=name, cni_bin=cni_bin,
                            plugin=entry("gate", fail_times=-1, fail_pods=["stuck"]),
                            good=PAIR,
                            stuck="kind: Pod\nmetadata: {name: stuck, namespace: apps}\nspec: {nodeName: n2}\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    lab = Lab(name)
    try:
        sleeper = int(proc.stdout.readline())
        deadline = time.monotonic() + 30
        while sum(1 for c in calls() if c["pod"] == "stuck" and c["cmd"] == "ADD") < 2:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        proc.kill()
        proc.wait()
        assert leftovers(lab) != []
        assert os.path.exists(f"/proc/{sleeper}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        problems = Lab.down_by_name(name)
    assert problems == []
    assert leftovers(lab) == []
    deadline = time.monotonic() + 5
    while sysops.proc_running(sleeper):     # an orphan now: init reaps it
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_two_labs_coexist(make_lab):
    a, b = make_lab(), make_lab()
    a.up(PAIR)
    b.up(PAIR)
    slots = [json.loads(x.lab_json.read_text())["slot"] for x in (a, b)]
    assert slots[0] != slots[1]
    assert a.pod_ip("apps/one") != b.pod_ip("apps/one")
    assert a.node_netns("n1") != b.node_netns("n1")
    for lab in (a, b):
        start_server(lab, "apps/one", 7002)
        assert echo(lab, "apps/two", lab.pod_ip("apps/one"), 7002, "x") == f"x from {lab.pod_ip('apps/two')}"
    listed = {x["name"] for x in Lab.list_labs()}
    assert {a.name, b.name} <= listed
    assert a.down() == []
    assert leftovers(a) == [] and leftovers(b) != []
    assert echo(b, "apps/two", b.pod_ip("apps/one"), 7002, "y") == f"y from {b.pod_ip('apps/two')}"


def test_agents_start_stop_and_report_enrolment(make_lab, monkeypatch):
    monkeypatch.setattr(lab_module, "AGENT_GRACE", 0.5)
    lab = make_lab(start_agents=True, ambient_cni=False,
                   agent_command=[sys.executable, str(FAKE_AGENT)])
    lab.up("kind: Namespace\nmetadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}\n---\n"
           + PAIR + "---\nkind: Pod\nmetadata: {name: m, namespace: mesh}\nspec: {nodeName: n2}\n")
    pids = {n: lab.agent_pid(n) for n in lab.nodes}
    assert all(pids.values()) and len(set(pids.values())) == 2
    pid = pids["n1"]
    assert os.readlink(f"/proc/{pid}/ns/net") == netns_id(lab.node_netns("n1"))
    cg = [x for x in Path(f"/proc/{pid}/cgroup").read_text().splitlines() if x.startswith("0::")][0]
    assert cg == f"0::/ambient-lab-{lab.name}/n1/_agent"
    assert lab.agent_request("n1", {"op": "status"})["node"] == "n1"

    pods = {p["name"]: p for p in lab.status()["pods"]}
    assert (pods["m"]["enrolled"], pods["one"]["enrolled"]) == (True, False)
    assert all(n["agent"]["ready"] for n in lab.status()["nodes"])

    assert lab.stop_agent("n1") is True
    assert lab.agent_pid("n1") is None and not sysops.proc_running(pid)
    assert lab.status()["nodes"][0]["agent"]["running"] is False
    new_pid = lab.start_agent("n1", extra_args=["--ignore-term"])
    assert new_pid != pid and lab.agent_pid("n1") == new_pid
    # down escalates to SIGKILL for an agent that ignores SIGTERM.
    assert lab.down() == []
    assert not sysops.proc_running(new_pid) and not sysops.proc_running(pids["n2"])


def test_agent_that_dies_at_start_is_reported(make_lab):
    lab = make_lab(start_agents=True, agent_command=[sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"])
    with pytest.raises(lab_module.LabError, match="exited with status 3(.|\n)*boom"):
        lab.up(PAIR)


def test_context_manager_takes_the_lab_down():
    with Lab(new_name(), start_agents=False, ambient_cni=False) as lab:
        lab.up(PAIR)
        assert lab.pod_ip("apps/two")
    assert leftovers(lab) == []
