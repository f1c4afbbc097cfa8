"""The local pod lab: a kubelet and a container runtime made of namespaces.

A lab is a handful of "nodes" (network namespaces joined by an underlay
bridge) running "pods" (network namespaces wired by the node's real CNI
chain, each with its own cgroup v2 directory), plus the cluster state file
the agent reads. Layout and addressing: docs/ARCHITECTURE.md "Lab layout"
and ``agent/lab/model.py``.

Crash safety: every namespace, cgroup, process and directory is written to
``lab.json`` *before* it is created, so ``down`` (or ``Lab.down_by_name``
from another process) can remove all of it even if the process that built
the lab died half-way.
"""

from __future__ import annotations

import copy
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from pyroute2 import IPRoute

from agent import control
from agent.lab import DEFAULT_ROOT, cnichain, model, sysops
from agent.lab.cnichain import CNIError, Sandbox
from agent.lab.model import ManifestError
from agent.lab.runtime import CniRunner

log = logging.getLogger(__name__)

BPF_BASE = "/sys/fs/bpf"
SYSTEM_CNI_DIR = "/usr/lib/cni"
SYSTEM_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
NETWORK_NAME = "ambient-lab"
CONFLIST_NAME = "10-lab.conflist"
WIRE_BRIDGE = "wire"
AGENT_GRACE = 5.0            # SIGTERM, then SIGKILL after this many seconds
RETRY_FIRST, RETRY_MAX = 0.2, 2.0   # sandbox retry backoff (kubelet's, compressed)
REPO_ROOT = Path(__file__).resolve().parents[2]


class LabError(RuntimeError):
    """The lab could not do what was asked (the message says what and why)."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _write_json(path: Path, obj: Any, mode: int = 0o644) -> None:
    """Atomic replace: readers see the old or the new file, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _fingerprint(obj: dict) -> str:
    clone = copy.deepcopy(obj)
    clone.get("metadata", {}).pop("resourceVersion", None)
    return json.dumps(clone, sort_keys=True)


def _capture_teardown() -> Callable[..., list[str]] | None:
    """The capture module's teardown, which detaches before it unpins."""
    for module in ("agent.capture.datapath", "agent.capture.loader"):
        try:
            mod = __import__(module, fromlist=["teardown"])
            return getattr(mod, "teardown")
        except Exception:   # missing module, or libbpf missing at import time
            continue
    return None


class Lab:
    """One lab: create with ``up``, inspect and poke, remove with ``down``."""

    def __init__(self, name: str, root: str | Path = DEFAULT_ROOT, agent_args: Sequence[str] = (),
                 start_agents: bool = True, pod_timeout: float = 30.0, ambient_cni: bool = True,
                 *, cni_bin: Mapping[str, str] | None = None,
                 cni_plugins: Sequence[Mapping] = (), cni_timeout: float = 30.0,
                 agent_ready_timeout: float = 60.0,
                 agent_command: Sequence[str] | None = None, ca: bool = True) -> None:
        """
        ``cni_bin`` adds (or replaces) executables in the lab's CNI bin dir,
        ``{plugin type: path}``; ``cni_plugins`` are plugin entries appended to
        each node's chain after the bridge (and ambient-cni). String values in
        them may use ``{node}``, ``{lab_dir}``, ``{node_dir}`` and ``{state}``.
        ``ca``: run the mesh CA (``ambient-agent ca``) on the underlay and give
        every agent a node token for it, so pods get workload certificates.
        Both cni options only affect nodes created afterwards (a node's conflist is
        written once, like a node's /etc/cni/net.d). ``agent_command`` is the
        program the agent's ``run --node …`` arguments are given to (default
        ``python -m agent.cli``; tests substitute a stand-in).
        """
        self.name = model.validate_lab_name(name)
        self.root = Path(root)
        self.dir = self.root / self.name
        self.agent_args = list(agent_args)
        self.start_agents = start_agents
        self.pod_timeout = float(pod_timeout)
        self.ambient_cni = ambient_cni
        self.cni_bin = dict(cni_bin or {})
        self.cni_plugins = [copy.deepcopy(dict(p)) for p in cni_plugins]
        self.cni_timeout = cni_timeout
        self.agent_ready_timeout = agent_ready_timeout
        self.agent_command = list(agent_command or (sys.executable, "-m", "agent.cli"))
        self.ca = ca
        self._ca_proc: subprocess.Popen | None = None
        self.cgroup_root = f"{sysops.CGROUP_V2}/ambient-lab-{self.name}"
        self.pin_root = f"{BPF_BASE}/ambient-lab-{self.name}"
        self._tlock = threading.RLock()
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._agents: dict[str, subprocess.Popen] = {}
        # Agents replaced by upgrade_agent, by pid, until they are reaped.
        self._previous_agents: dict[int, subprocess.Popen] = {}

    def __repr__(self) -> str:
        return f"Lab({self.name!r}, root={str(self.root)!r})"

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        problems = self.down()
        for p in problems:
            log.warning("lab %s down: %s", self.name, p)

    # --- paths ------------------------------------------------------------

    @property
    def state_path(self) -> str:
        return str(self.dir / "state.json")

    @property
    def lab_json(self) -> Path:
        return self.dir / "lab.json"

    @property
    def bin_dir(self) -> Path:
        return self.dir / "cni" / "bin"

    def node_dir(self, node: str) -> Path:
        return self.dir / "nodes" / node

    def conflist_path(self, node: str) -> Path:
        return self.dir / "cni" / node / "net.d" / CONFLIST_NAME

    def ipam_dir(self, node: str) -> Path:
        return self.dir / "ipam" / node

    def agent_socket(self, node: str) -> str:
        return str(self.node_dir(node) / "agent.sock")

    def pin_dir(self, node: str) -> str:
        return f"{self.pin_root}/{node}"

    def exists(self) -> bool:
        return self.lab_json.exists()

    @property
    def nodes(self) -> list[str]:
        if not self.exists():
            return []
        rec = self._read_records()
        return sorted(rec["nodes"], key=lambda n: rec["nodes"][n]["index"])

    # --- records and state (lab.json, state.json) --------------------------

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: threads (RLock) and processes (flock)."""
        with self._tlock:
            if self._lock_depth == 0:
                try:
                    fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                except FileNotFoundError:
                    raise LabError(f"lab {self.name!r} does not exist (no {self.dir})") from None
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._lock_fd = fd
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
                if self._lock_depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)   # releases the flock
                    self._lock_fd = None

    def _read_records(self) -> dict:
        try:
            with open(self.lab_json) as f:
                return json.load(f)
        except FileNotFoundError:
            raise LabError(f"lab {self.name!r} does not exist (no {self.lab_json})") from None

    @contextmanager
    def _records(self) -> Iterator[dict]:
        """Read-modify-write ``lab.json`` under the lab lock."""
        with self._locked():
            rec = self._read_records()
            yield rec
            _write_json(self.lab_json, rec, 0o600)

    def _read_state(self) -> dict:
        try:
            with open(self.state_path) as f:
                return json.load(f)
        except FileNotFoundError:
            return model.empty_state()

    def _update_state(self, fn: Callable[[list[dict]], object]) -> None:
        """Apply ``fn`` to the state's items; write only if something changed.

        Each write bumps the list's ``metadata.resourceVersion``; objects that
        changed get that version too, unchanged ones keep theirs.
        """
        with self._locked():
            doc = self._read_state()
            items: list[dict] = doc.setdefault("items", [])
            before = {model.obj_key(o): _fingerprint(o) for o in items}
            old_rv = {model.obj_key(o): o.get("metadata", {}).get("resourceVersion") for o in items}
            fn(items)
            rv = str(int(doc.setdefault("metadata", {}).get("resourceVersion") or 0) + 1)
            changed = set(before) != {model.obj_key(o) for o in items}
            for o in items:
                key = model.obj_key(o)
                meta = o.setdefault("metadata", {})
                meta.setdefault("uid", model.new_uid())
                meta.setdefault("creationTimestamp", _now())
                if before.get(key) != _fingerprint(o):
                    meta["resourceVersion"] = rv
                    changed = True
                elif old_rv.get(key):
                    meta["resourceVersion"] = old_rv[key]
            if not changed:
                return
            doc["metadata"]["resourceVersion"] = rv
            _write_json(Path(self.state_path), doc)

    # --- creating the lab and its nodes ------------------------------------

    def _ensure_lab(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.exists():
            self._allocate()
        with self._locked():
            self._link_bin()
            with self._records() as rec:
                wire = rec["wire"]
                if not wire["ready"]:
                    self._build_wire(wire["netns"])
                    wire["ready"] = True
            sysops.cgroup_create(self.cgroup_root)

    def _allocate(self) -> None:
        """Pick a free slot and write the first lab.json, under the machine-wide lock."""
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self.exists():
                return
            leftovers = [n for n in sysops.list_netns() if model.lab_netns_pattern(self.name).match(n)]
            if leftovers or os.path.exists(self.cgroup_root):
                raise LabError(
                    f"objects of an earlier lab {self.name!r} are still there "
                    f"({', '.join(leftovers) or self.cgroup_root}); run `ambient-agent lab down "
                    f"--name {self.name}` first")
            used = []
            for other in self.root.glob("*/lab.json"):
                try:
                    used.append(int(json.loads(other.read_text())["slot"]))
                except (OSError, ValueError, KeyError, TypeError):
                    continue
            slot = model.free_slot(used)
            self.dir.mkdir(mode=0o755, exist_ok=True)
            rec = {
                "version": 1, "name": self.name, "dir": str(self.dir), "slot": slot,
                "created": _now(), "creator_pid": os.getpid(),
                "wire": {"netns": model.wire_netns(self.name), "bridge": WIRE_BRIDGE, "ready": False},
                "cgroup_root": self.cgroup_root, "pin_root": self.pin_root,
                "service_cidr": model.service_cidr(slot),
                "nodes": {}, "pods": {}, "agents": {}, "next_pod": 1,
            }
            _write_json(self.lab_json, rec, 0o600)
            log.info("lab %s: slot %d in %s", self.name, slot, self.dir)
        finally:
            os.close(fd)

    def _link_bin(self) -> None:
        """``<lab>/cni/bin``: the CNI_PATH every node's plugins are found in."""
        self.bin_dir.mkdir(parents=True, exist_ok=True)
        links = {p: f"{SYSTEM_CNI_DIR}/{p}" for p in SYSTEM_PLUGINS}
        # The venv's console script (not resolved: its shebang is the venv python).
        links["ambient-cni"] = str(Path(sys.executable).parent / "ambient-cni")
        links.update(self.cni_bin)
        for name, target in links.items():
            if "/" in name or not name:
                raise LabError(f"invalid CNI plugin name {name!r}")
            link = self.bin_dir / name
            tmp = self.bin_dir / f".{name}.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(os.path.abspath(target), tmp)
            os.replace(tmp, link)

    def _build_wire(self, netns: str) -> None:
        # Recorded before creation: an existing one is ours, left by a crash.
        sysops.remove_netns(netns)
        sysops.create_netns(netns)
        with IPRoute(netns=netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=WIRE_BRIDGE, kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname=WIRE_BRIDGE)[0], state="up")

    def _add_node(self, node: str) -> None:
        with self._locked():
            with self._records() as rec:
                n = rec["nodes"].get(node)
                if n is None:
                    free = sorted(set(range(model.MAX_NODES)) - {x["index"] for x in rec["nodes"].values()})
                    if not free:
                        raise LabError(f"lab {self.name} already has {model.MAX_NODES} nodes; "
                                       f"cannot add node {node}")
                    i, slot = free[0], rec["slot"]
                    n = rec["nodes"][node] = {
                        "index": i, "netns": model.node_netns(self.name, i),
                        "underlay_ip": model.underlay_ip(slot, i),
                        "pod_subnet": model.pod_subnet(slot, i),
                        "gateway": model.pod_gateway(slot, i),
                        "wire_port": f"n{i}", "ready": False,
                    }
            if n["ready"]:
                return
            self._build_node(node, n, rec["wire"]["netns"])
            with self._records() as rec:
                rec["nodes"][node]["ready"] = True
            log.info("lab %s: node %s in %s, underlay %s, pods %s", self.name, node,
                     n["netns"], n["underlay_ip"], n["pod_subnet"])

    def _build_node(self, node: str, n: dict, wire: str) -> None:
        """The node's namespace, its underlay port, directories and conflist.

        Runs from scratch even after a crash half-way: a recorded node that is
        not ready has no pods yet, so its namespace can simply be recreated.
        """
        sysops.remove_netns(n["netns"])
        with IPRoute(netns=wire) as w:
            for idx in w.link_lookup(ifname=n["wire_port"]):
                w.link("del", index=idx)
        path = sysops.create_netns(n["netns"])
        # The veth is created inside the wire namespace with its peer placed
        # straight into the node: no link ever appears in the root namespace.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with IPRoute(netns=wire) as w:
                w.link("add", ifname=n["wire_port"], kind="veth",
                       peer={"ifname": "eth0", "net_ns_fd": fd})
                port = w.link_lookup(ifname=n["wire_port"])[0]
                w.link("set", index=port, master=w.link_lookup(ifname=WIRE_BRIDGE)[0], state="up")
        finally:
            os.close(fd)
        with IPRoute(netns=n["netns"]) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=n["underlay_ip"], prefixlen=model.UNDERLAY_PREFIXLEN)
            ipr.link("set", index=eth0, state="up")
        sysops.enable_ip_forward(path)
        for d in (self.node_dir(node), self.conflist_path(node).parent, self.ipam_dir(node)):
            d.mkdir(parents=True, exist_ok=True)
        _write_json(self.conflist_path(node), self._conflist(node, n))
        sysops.cgroup_create(f"{self.cgroup_root}/{node}")

        def mutate(items: list[dict]) -> None:
            given = model.find(items, "Node", "", node)   # keep labels of a rebuilt node
            model.upsert(items, model.node_object(node, n["underlay_ip"], n["pod_subnet"], given))
        self._update_state(mutate)

    def _conflist(self, node: str, n: dict) -> dict:
        plugins: list[dict] = [{
            "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": n["pod_subnet"]}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(self.ipam_dir(node))},
        }]
        if self.ambient_cni:
            plugins.append({"type": "ambient-cni", "agent_socket": self.agent_socket(node),
                            "state": f"file:{self.state_path}",
                            "exclude_namespaces": ["kube-system"]})
        values = {"node": node, "lab_dir": str(self.dir), "node_dir": str(self.node_dir(node)),
                  "state": self.state_path}
        plugins.extend(_substitute(copy.deepcopy(p), values) for p in self.cni_plugins)
        return cnichain.validate_conflist({"cniVersion": "1.0.0", "name": NETWORK_NAME,
                                           "plugins": plugins})

    def _sync_routes(self) -> None:
        """Every node reaches every other node's pod subnet via its underlay address."""
        rec = self._read_records()
        ready = {k: v for k, v in rec["nodes"].items() if v["ready"]}
        for name, n in ready.items():
            with IPRoute(netns=n["netns"]) as ipr:
                for other, o in ready.items():
                    if other != name:
                        ipr.route("replace", dst=o["pod_subnet"], gateway=o["underlay_ip"])

    # --- up / apply ---------------------------------------------------------

    def up(self, manifest: str | Path) -> dict:
        """Create (or extend) the lab from a manifest; returns what happened.

        ``{"nodes": [...], "created": [...], "updated": [...], "failed": {pod: message}}``.
        A pod whose sandbox cannot be created within ``pod_timeout`` is marked
        Failed in the state file and listed under ``failed``; it is not an
        exception, as with a kubelet.
        """
        objs = model.load_manifest(manifest)
        pods = {model.pod_key(o["metadata"]["namespace"], o["metadata"]["name"]): o
                for o in objs if o["kind"] == "Pod"}
        self._ensure_lab()
        rec = self._read_records()
        for key, o in pods.items():
            old = rec["pods"].get(key)
            if old and old["phase"] != "Failed" and old["node"] != o["spec"]["nodeName"]:
                raise ManifestError(f"Pod {key} already runs on node {old['node']}; "
                                    "delete it before moving it to another node")
        new_nodes = model.node_names(objs, known=rec["nodes"])
        if len(rec["nodes"]) + len(new_nodes) > model.MAX_NODES:
            raise ManifestError(f"a lab has at most {model.MAX_NODES} nodes; this would make "
                                f"{len(rec['nodes']) + len(new_nodes)}")
        for node in list(rec["nodes"]) + new_nodes:
            self._add_node(node)
        self._sync_routes()
        updated = self._apply_objects(objs)
        if self.start_agents:
            if self.ca and self.ca_pid() is None:
                self.start_ca()
            for node in self.nodes:
                if self.agent_pid(node) is None:
                    self.start_agent(node)
        rec = self._read_records()
        todo = []
        for key, o in pods.items():
            old = rec["pods"].get(key)
            if old is None:
                todo.append(o)
            elif old["phase"] == "Failed":
                self.delete_pod(*model.split_key(key))   # a new sandbox from scratch
                todo.append(o)
        failed: dict[str, str] = {}
        if todo:
            with ThreadPoolExecutor(max_workers=min(16, len(todo)), thread_name_prefix="lab-pod") as ex:
                for o, err in zip(todo, ex.map(self._create_pod_reporting, todo)):
                    if err:
                        failed[model.pod_key(o["metadata"]["namespace"], o["metadata"]["name"])] = err
        created = [model.pod_key(o["metadata"]["namespace"], o["metadata"]["name"]) for o in todo]
        return {"nodes": self.nodes, "created": [k for k in created if k not in failed],
                "updated": updated, "failed": failed}

    apply = up

    def _apply_objects(self, objs: list[dict]) -> list[str]:
        """Write every non-pod object (and metadata of existing pods) to the state."""
        rec = self._read_records()
        updated: list[str] = []

        def mutate(items: list[dict]) -> None:
            for o in objs:
                kind, ns, name = model.obj_key(o)
                if kind == "Pod":
                    pod = model.find(items, kind, ns, name)
                    if pod is not None:   # a pod's spec is immutable; its metadata is not
                        for field in ("labels", "annotations"):
                            pod["metadata"][field] = copy.deepcopy(o["metadata"].get(field) or {})
                        updated.append(model.pod_key(ns, name))
                    continue
                if kind == "Node":
                    n = rec["nodes"][name]
                    model.upsert(items, model.node_object(name, n["underlay_ip"], n["pod_subnet"], o))
                    continue
                if kind == "Service":
                    self._assign_cluster_ip(o, items, rec)
                old = model.find(items, kind, ns, name)
                if old is not None and old["metadata"].get("creationTimestamp"):
                    o["metadata"].setdefault("creationTimestamp", old["metadata"]["creationTimestamp"])
                model.upsert(items, copy.deepcopy(o))
            for o in model.implicit_objects(objs, items):
                model.upsert(items, o)

        self._update_state(mutate)
        return updated

    @staticmethod
    def _assign_cluster_ip(svc: dict, items: list[dict], rec: dict) -> None:
        """Give a Service a ClusterIP like the API server would (headless stays headless)."""
        spec = svc.setdefault("spec", {})
        if spec.get("clusterIP"):
            spec.setdefault("clusterIPs", [spec["clusterIP"]])
            return
        old = model.find(items, "Service", svc["metadata"]["namespace"], svc["metadata"]["name"])
        ip = (old or {}).get("spec", {}).get("clusterIP")
        if not ip or ip == "None":
            used = [o.get("spec", {}).get("clusterIP") for o in items if o.get("kind") == "Service"]
            ip = model.allocate_cluster_ip(rec["service_cidr"], [u for u in used if u])
        spec["clusterIP"] = ip
        spec["clusterIPs"] = [ip]

    # --- pods -----------------------------------------------------------------

    def _create_pod_reporting(self, obj: dict) -> str | None:
        """``_create_pod``, with an unexpected failure turned into a Failed pod."""
        try:
            return self._create_pod(obj)
        except Exception as exc:
            key = model.pod_key(obj["metadata"]["namespace"], obj["metadata"]["name"])
            log.exception("lab %s: creating pod %s", self.name, key)
            try:
                return self._set_failed(key, f"pod sandbox not created: {exc}")
            except Exception:
                return f"pod sandbox not created: {exc}"

    def _create_pod(self, obj: dict) -> str | None:
        """One pod, kubelet-style: sandbox, CNI ADD with retries. Returns an error or None."""
        meta, spec = obj["metadata"], obj["spec"]
        ns, name, node = meta["namespace"], meta["name"], spec["nodeName"]
        key = model.pod_key(ns, name)
        host_net = bool(spec.get("hostNetwork"))
        pod = copy.deepcopy(obj)
        pod["metadata"].setdefault("uid", model.new_uid())
        uid = pod["metadata"]["uid"]
        pod["status"] = {"phase": "Pending"}
        with self._locked():
            with self._records() as rec:
                nrec = rec["nodes"][node]
                j = rec["next_pod"]
                rec["next_pod"] = j + 1
                p = rec["pods"][key] = {
                    "index": j, "uid": uid, "node": node, "host_network": host_net,
                    "netns": None if host_net else model.pod_netns(self.name, j),
                    "cgroup": f"{self.cgroup_root}/{node}/{model.cgroup_leaf(ns, name)}",
                    "phase": "Pending", "container_id": None, "result": None,
                    "ips": [], "message": "",
                }
            sysops.cgroup_create(p["cgroup"])
            if p["netns"]:
                sysops.create_netns(p["netns"])
            self._update_state(lambda items: model.upsert(items, pod))
        if host_net:
            # No sandbox network: the pod shares its node's namespace and
            # address, and the kubelet calls no CNI plugin for it.
            self._set_running(key, [nrec["underlay_ip"]], nrec)
            return None

        runner = self._runner(nrec)
        try:
            conflist = self._read_conflist(node)
        except (OSError, ValueError) as exc:
            return self._set_failed(key, f"cannot read the CNI configuration of node {node}: {exc}")
        netns = sysops.netns_path(p["netns"])
        deadline = time.monotonic() + self.pod_timeout
        delay, attempt = RETRY_FIRST, 0
        while True:
            attempt += 1
            sandbox = Sandbox(secrets.token_hex(32), netns, ns, name, uid)
            # Recorded before ADD: if we die during it, down can still DEL it.
            self._set_pod_record(key, container_id=sandbox.container_id)
            try:
                runner.add_network(cnichain.LOOPBACK_CONFLIST, sandbox)
                result = runner.add_network(conflist, sandbox)
                ips = cnichain.sandbox_ips(result)
                if not ips:
                    raise CNIError(cnichain.CODE_EXEC_FAILED,
                                   "the network configuration gave the pod no address")
            except CNIError as exc:
                error = exc
                log.info("lab %s: pod %s sandbox attempt %d failed: %s", self.name, key, attempt, exc)
                # Like a runtime after a failed ADD: DEL the whole chain so
                # the part of it that did run (veth, IP lease) is undone.
                runner.del_network(conflist, sandbox, None)
                self._set_pod_record(key, container_id=None)
                if time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            self._set_pod_record(key, result=result)
            self._set_running(key, cnichain.strip_prefix(ips), nrec)
            log.info("lab %s: pod %s running on %s at %s", self.name, key, node, ", ".join(ips))
            return None
        runner.del_network(cnichain.LOOPBACK_CONFLIST, sandbox, None)
        return self._set_failed(
            key, f"pod sandbox not created after {attempt} attempt(s) in {self.pod_timeout:g}s: {error}")

    def _runner(self, nrec: dict) -> CniRunner:
        return CniRunner(str(self.bin_dir), sysops.netns_path(nrec["netns"]), self.cni_timeout)

    def _read_conflist(self, node: str) -> dict:
        with open(self.conflist_path(node)) as f:
            return cnichain.validate_conflist(json.load(f))

    def _set_pod_record(self, key: str, **fields: Any) -> None:
        with self._records() as rec:
            if key in rec["pods"]:
                rec["pods"][key].update(fields)

    def _set_running(self, key: str, ips: list[str], nrec: dict) -> None:
        ns, name = model.split_key(key)
        with self._locked():
            self._set_pod_record(key, phase="Running", ips=ips, message="")
            status = {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "hostIP": nrec["underlay_ip"], "hostIPs": [{"ip": nrec["underlay_ip"]}],
                "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
                "startTime": _now(),
            }

            def mutate(items: list[dict]) -> None:
                pod = model.find(items, "Pod", ns, name)
                if pod is not None:
                    pod["status"] = status
            self._update_state(mutate)

    def _set_failed(self, key: str, message: str) -> str:
        ns, name = model.split_key(key)
        log.warning("lab %s: pod %s failed: %s", self.name, key, message)
        with self._locked():
            self._set_pod_record(key, phase="Failed", message=message, container_id=None)

            def mutate(items: list[dict]) -> None:
                pod = model.find(items, "Pod", ns, name)
                if pod is not None:
                    pod["status"] = {"phase": "Failed", "reason": "FailedCreatePodSandBox",
                                     "message": message}
            self._update_state(mutate)
        return message

    def delete_pod(self, namespace: str, name: str) -> list[str]:
        """Remove a pod: kill its processes, CNI DEL, netns and cgroup, state entry."""
        key = model.pod_key(namespace, name)
        rec = self._read_records()
        p = rec["pods"].get(key)
        if p is None:
            raise KeyError(f"no pod {key} in lab {self.name}")
        problems = self._teardown_pod(key, p, rec["nodes"])
        with self._locked():
            with self._records() as rec:
                rec["pods"].pop(key, None)
            self._update_state(lambda items: model.remove(items, "Pod", namespace, name))
        return problems

    def _teardown_pod(self, key: str, p: dict, nodes: dict) -> list[str]:
        problems: list[str] = []
        if not sysops.cgroup_kill(p["cgroup"]):
            problems.append(f"pod {key}: processes remain in {p['cgroup']}")
        n = nodes.get(p["node"])
        if (p.get("netns") and p.get("container_id") and n
                and sysops.netns_exists(n["netns"]) and self.conflist_path(p["node"]).exists()):
            ns, name = model.split_key(key)
            sandbox = Sandbox(p["container_id"], sysops.netns_path(p["netns"]), ns, name, p["uid"])
            runner = self._runner(n)
            try:
                errors = runner.del_network(self._read_conflist(p["node"]), sandbox, p.get("result"))
                errors += runner.del_network(cnichain.LOOPBACK_CONFLIST, sandbox, None)
            except (OSError, ValueError) as exc:
                errors = [exc]
            problems += [f"pod {key}: {e}" for e in errors]
        if p.get("netns"):
            try:
                sysops.remove_netns(p["netns"])
            except OSError as exc:
                problems.append(f"pod {key}: remove netns {p['netns']}: {exc}")
        problems += sysops.cgroup_remove_tree(p["cgroup"])
        return problems

    # --- looking at pods ------------------------------------------------------

    def _pod_record(self, ns_name: str) -> dict:
        ns, name = model.split_key(ns_name)
        p = self._read_records()["pods"].get(model.pod_key(ns, name))
        if p is None:
            raise KeyError(f"no pod {ns}/{name} in lab {self.name}")
        return p

    def _node_record(self, node: str) -> dict:
        rec = self._read_records()
        n = rec["nodes"].get(node)
        if n is None:
            raise KeyError(f"no node {node!r} in lab {self.name} (nodes: {', '.join(rec['nodes']) or 'none'})")
        return n

    def pod(self, ns_name: str) -> dict:
        """The pod's object in the state file."""
        ns, name = model.split_key(ns_name)
        obj = model.find(self._read_state()["items"], "Pod", ns, name)
        if obj is None:
            raise KeyError(f"no pod {ns}/{name} in lab {self.name}")
        return obj

    def pod_ip(self, ns_name: str) -> str:
        ip = self.pod(ns_name).get("status", {}).get("podIP")
        if not ip:
            raise LabError(f"pod {ns_name} has no IP (phase {self.pod(ns_name)['status'].get('phase')})")
        return ip

    def pod_netns(self, ns_name: str) -> str:
        """``/run/netns/…`` of the pod (its node's for a hostNetwork pod)."""
        p = self._pod_record(ns_name)
        if p["netns"]:
            return sysops.netns_path(p["netns"])
        return self.node_netns(p["node"])

    def pod_cgroup(self, ns_name: str) -> str:
        return self._pod_record(ns_name)["cgroup"]

    def node_netns(self, node: str) -> str:
        return sysops.netns_path(self._node_record(node)["netns"])

    def node_ip(self, node: str) -> str:
        return self._node_record(node)["underlay_ip"]

    # --- running things -------------------------------------------------------

    def _spawn(self, netns: str, cgroup: str, argv: Any, kwargs: dict) -> subprocess.Popen:
        user_preexec = kwargs.pop("preexec_fn", None)
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return subprocess.Popen(argv, preexec_fn=sysops.child_setup(fd, cgroup, user_preexec),
                                    **kwargs)
        finally:
            os.close(fd)

    def exec(self, ns_name: str, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command inside the pod: its network namespace and its cgroup."""
        p = self._pod_record(ns_name)
        return self._spawn(self.pod_netns(ns_name), p["cgroup"], argv, popen_kwargs)

    def node_exec(self, node: str, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command in the node's network namespace (probes, tcpdump).

        It runs in the cgroup ``<node>/_host`` so that ``down`` can reap it.
        """
        netns = self.node_netns(node)
        cgroup = f"{self.cgroup_root}/{node}/_host"
        sysops.cgroup_create(cgroup)
        return self._spawn(netns, cgroup, argv, popen_kwargs)

    def wire_exec(self, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command in the underlay's namespace (packet captures on the ``wire`` bridge)."""
        rec = self._read_records()
        cgroup = f"{self.cgroup_root}/_wire"
        sysops.cgroup_create(cgroup)
        return self._spawn(sysops.netns_path(rec["wire"]["netns"]), cgroup, argv, popen_kwargs)

    def run(self, ns_name: str, argv: Any, timeout: float | None = 30.0, check: bool = False,
            input: str | bytes | None = None, **popen_kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside the pod; output captured as text by default."""
        return self._run(lambda kw: self.exec(ns_name, argv, **kw), argv, timeout, check, input,
                         popen_kwargs)

    def node_run(self, node: str, argv: Any, timeout: float | None = 30.0, check: bool = False,
                 input: str | bytes | None = None, **popen_kwargs: Any) -> subprocess.CompletedProcess:
        return self._run(lambda kw: self.node_exec(node, argv, **kw), argv, timeout, check, input,
                         popen_kwargs)

    @staticmethod
    def _run(start: Callable[[dict], subprocess.Popen], argv: Any, timeout: float | None,
             check: bool, input: Any, kw: dict) -> subprocess.CompletedProcess:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        if "encoding" not in kw and "errors" not in kw and not isinstance(input, bytes):
            kw.setdefault("text", True)
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        with start(kw) as proc:
            try:
                out, err = proc.communicate(input, timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                raise
        done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done

    # --- labels -----------------------------------------------------------------

    def set_labels(self, kind: str, ns: str | None, name: str, labels: Mapping[str, str | None]) -> None:
        """Change labels on an object in the state file (``None`` removes a label)."""
        namespace = "" if kind in model.CLUSTER_SCOPED else (ns or "default")

        def mutate(items: list[dict]) -> None:
            obj = model.find(items, kind, namespace, name)
            if obj is None:
                where = f"{namespace}/{name}" if namespace else name
                raise KeyError(f"no {kind} {where} in lab {self.name}")
            model.apply_labels(obj, dict(labels))

        self._update_state(mutate)

    # --- node agents ------------------------------------------------------------

    def start_agent(self, node: str, extra_args: Sequence[str] = ()) -> int:
        """Start the node's agent in the node's namespace; wait until it answers."""
        if self.agent_pid(node):
            raise LabError(f"the agent of node {node} is already running (pid {self.agent_pid(node)})")
        proc, log_path = self._launch_agent(node, extra_args)
        self._wait_agent_ready(node, proc, log_path)
        log.info("lab %s: agent of node %s running, pid %d", self.name, node, proc.pid)
        return proc.pid

    def upgrade_agent(self, node: str, extra_args: Sequence[str] = ()) -> int:
        """Start a second agent for ``node`` while its agent runs: an upgrade on a node.

        The new agent asks the running one to hand the node over (same run
        dir, pin dir and pods; docs/ARCHITECTURE.md, "Agent upgrade"). Returns
        the new agent's pid once it answers on the control socket, that is
        once it has taken the node over; the old agent is then draining and
        exits after its ``--drain-seconds``. The old one stays recorded under
        ``previous_agents`` until then, so that ``down`` stops it in any case.
        """
        old = self._read_records()["agents"].get(node) or {}
        if not self.agent_pid(node):
            raise LabError(f"no agent runs on node {node}: nothing to upgrade")
        with self._records() as rec:
            rec.setdefault("previous_agents", []).append(dict(old, node=node))
        old_proc = self._agents.pop(node, None)
        if old_proc is not None:
            self._previous_agents[old_proc.pid] = old_proc
        proc, log_path = self._launch_agent(node, extra_args)
        try:
            self._wait_agent_ready(node, proc, log_path, expect_pid=True)
        except LabError:
            # The old agent resumes when the new one is gone: it is the node's again.
            with self._records() as rec:
                rec["agents"][node] = {k: v for k, v in old.items()}
                rec["previous_agents"] = [a for a in rec["previous_agents"] if a.get("pid") != old.get("pid")]
            if old_proc is not None:
                self._agents[node] = self._previous_agents.pop(old_proc.pid)
            raise
        log.info("lab %s: agent of node %s upgraded: pid %s handed over to pid %d",
                 self.name, node, old.get("pid"), proc.pid)
        return proc.pid

    def previous_agent_pids(self, node: str) -> list[int]:
        """Agents of ``node`` replaced by ``upgrade_agent`` that still run (draining)."""
        if not self.exists():
            return []
        alive = []
        for a in self._read_records().get("previous_agents") or []:
            proc = self._previous_agents.get(a.get("pid"))
            if proc is not None and proc.poll() is not None:
                self._previous_agents.pop(proc.pid, None)   # reaped: no zombie left behind
            if a.get("node") == node and sysops.process_is(a.get("pid"), a.get("start_time"), str(self.dir)):
                alive.append(a["pid"])
        return alive

    def _launch_agent(self, node: str, extra_args: Sequence[str]) -> tuple[subprocess.Popen, Path]:
        n = self._node_record(node)
        node_dir = self.node_dir(node)
        node_dir.mkdir(parents=True, exist_ok=True)
        cgroup = f"{self.cgroup_root}/{node}/_agent"
        sysops.cgroup_create(cgroup)
        cmd = [*self.agent_command, "run", "--node", node,
               "--state", f"file:{self.state_path}", "--run-dir", str(node_dir),
               "--pin-dir", self.pin_dir(node), *self._ca_args(node), *self.agent_args, *extra_args]
        log_path = node_dir / "agent.log"
        with self._records() as rec:
            rec["agents"][node] = {"cmd": cmd, "cgroup": cgroup, "log": str(log_path),
                                   "pid": None, "start_time": None}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH")) if x)
        with open(log_path, "ab") as logf:
            # Its own session: a terminal's ^C to `lab up` must not kill it.
            proc = self._spawn(sysops.netns_path(n["netns"]), cgroup, cmd, dict(
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=str(node_dir), env=env, start_new_session=True))
        with self._records() as rec:
            rec["agents"][node].update(pid=proc.pid, start_time=sysops.proc_start_time(proc.pid))
        self._agents[node] = proc
        return proc, log_path

    def _wait_agent_ready(self, node: str, proc: subprocess.Popen, log_path: Path,
                          expect_pid: bool = False) -> None:
        """Until the agent answers on the control socket (``expect_pid``: the
        answer must come from ``proc``, not from an agent it takes over from)."""
        deadline = time.monotonic() + self.agent_ready_timeout
        last = "no answer yet"
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"the agent of node {node} exited with status {proc.returncode}; "
                               f"{log_path} ends with:\n{_tail_file(log_path)}")
            try:
                reply = self.agent_request(node, {"op": "status"}, timeout=1.0)
                if reply.get("ok") and (not expect_pid or reply.get("pid") == proc.pid):
                    return
                last = str(reply.get("error") or f"answered by pid {reply.get('pid')}")
            except (OSError, ValueError) as exc:
                last = str(exc)
            time.sleep(0.1)
        self.stop_agent(node)
        raise LabError(f"the agent of node {node} did not answer on {self.agent_socket(node)} "
                       f"within {self.agent_ready_timeout:g}s ({last}); {log_path} ends with:\n"
                       f"{_tail_file(log_path)}")

    # --- the mesh CA --------------------------------------------------------------

    @property
    def ca_dir(self) -> Path:
        return self.dir / "ca"

    @property
    def ca_address(self) -> str:
        return f"{model.ca_ip(self._read_records()['slot'])}:{model.CA_PORT}"

    @property
    def ca_root(self) -> str:
        """The trust bundle: the CA's root certificate, written when it starts."""
        return str(self.ca_dir / "root-cert.pem")

    def _ca_args(self, node: str) -> list[str]:
        if not self.ca:
            return []
        return ["--ca-address", self.ca_address, "--ca-root", self.ca_root,
                "--token-file", self._node_token(node)]

    def _node_token(self, node: str) -> str:
        """The node's CA token (like a projected service-account token), created once."""
        path = self.node_dir(node) / "ca-token"
        tokens_path = self.ca_dir / "tokens.json"
        with self._locked():
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(secrets.token_urlsafe(32))
            tokens = json.loads(tokens_path.read_text()) if tokens_path.exists() else {}
            tokens[path.read_text().strip()] = node
            _write_json(tokens_path, tokens, 0o600)
        return str(path)

    def start_ca(self) -> int:
        """Start the CA in the wire namespace, on the underlay; wait until it listens."""
        if self.ca_pid() is not None:
            raise LabError(f"the CA of lab {self.name} is already running (pid {self.ca_pid()})")
        rec = self._read_records()
        ip = model.ca_ip(rec["slot"])
        self.ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tokens_path = self.ca_dir / "tokens.json"
        for node in self.nodes:
            self.node_dir(node).mkdir(parents=True, exist_ok=True)
            self._node_token(node)
        wire = sysops.netns_path(rec["wire"]["netns"])
        with IPRoute(netns=rec["wire"]["netns"]) as ipr:
            idx = ipr.link_lookup(ifname=WIRE_BRIDGE)[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
            if ip not in have:
                ipr.addr("add", index=idx, address=ip, prefixlen=model.UNDERLAY_PREFIXLEN)
        cgroup = f"{self.cgroup_root}/_ca"
        sysops.cgroup_create(cgroup)
        cmd = [*self.agent_command, "ca", "--listen", f"{ip}:{model.CA_PORT}",
               "--ca-dir", str(self.ca_dir), "--tokens", str(tokens_path),
               "--state", f"file:{self.state_path}", "--san", ip, "--root-cert-out", self.ca_root]
        log_path = self.dir / "ca.log"
        with self._records() as r:
            r["ca"] = {"cmd": cmd, "cgroup": cgroup, "log": str(log_path), "pid": None, "start_time": None}
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(x for x in (str(REPO_ROOT), env.get("PYTHONPATH")) if x)
        start_offset = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as logf:
            proc = self._spawn(wire, cgroup, cmd, dict(
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                cwd=str(self.dir), env=env, start_new_session=True))
        with self._records() as r:
            r["ca"].update(pid=proc.pid, start_time=sysops.proc_start_time(proc.pid))
        self._ca_proc = proc
        deadline = time.monotonic() + self.agent_ready_timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise LabError(f"the lab CA exited with status {proc.returncode}; {log_path} ends with:\n"
                               f"{_tail_file(log_path)}")
            with open(log_path, "rb") as fh:
                fh.seek(start_offset)
                if b" listening on " in fh.read() and os.path.exists(self.ca_root):
                    log.info("lab %s: CA running at %s, pid %d", self.name, self.ca_address, proc.pid)
                    return proc.pid
            time.sleep(0.1)
        self.stop_ca()
        raise LabError(f"the lab CA did not start within {self.agent_ready_timeout:g}s; {log_path} ends with:\n"
                       f"{_tail_file(log_path)}")

    def ca_pid(self) -> int | None:
        if not self.exists():
            return None
        c = self._read_records().get("ca")
        if self._ca_proc is not None:
            self._ca_proc.poll()
        if c and c.get("pid") and sysops.process_is(c["pid"], c.get("start_time"), str(self.dir)):
            return c["pid"]
        return None

    def stop_ca(self, sig: int = signal.SIGTERM) -> bool:
        c = self._read_records().get("ca") if self.exists() else None
        if not c or not c.get("pid"):
            return True
        gone = sysops.stop_process(c["pid"], c.get("start_time"), str(self.dir), sig, AGENT_GRACE,
                                   popen=self._ca_proc)
        if gone:
            self._ca_proc = None
            with self._records() as r:
                r["ca"].update(pid=None, start_time=None)
        return gone

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, wait: bool = True) -> bool:
        """Signal the node's agent; with ``wait``, SIGKILL it after 5 s and reap it.

        Returns True when the agent is gone.
        """
        a = self._read_records()["agents"].get(node)
        if not a or not a.get("pid"):
            return True
        proc = self._agents.get(node)
        gone = sysops.stop_process(a["pid"], a.get("start_time"), str(self.dir), sig,
                                   AGENT_GRACE, popen=proc, wait=wait)
        if gone:
            self._agents.pop(node, None)
            with self._records() as rec:
                if node in rec["agents"]:
                    rec["agents"][node].update(pid=None, start_time=None)
        return gone

    def agent_pid(self, node: str) -> int | None:
        """The pid of the node's running agent, or None."""
        if not self.exists():
            return None
        a = self._read_records()["agents"].get(node)
        proc = self._agents.get(node)
        if proc is not None:
            proc.poll()   # reap it if it died, so it does not linger as a zombie
        if a and a.get("pid") and sysops.process_is(a["pid"], a.get("start_time"), str(self.dir)):
            return a["pid"]
        return None

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every running node agent has read the current cluster state.

        Agents poll the state file; traffic sent right after a pod is created
        would otherwise race them (and be passed through, correctly, to an
        address the agent does not know yet).
        """
        version = self._read_state()["metadata"]["resourceVersion"]
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            if self.agent_pid(node) is None:
                continue
            while self.agent_request(node, {"op": "status"}).get("state_version") != version:
                if time.monotonic() > deadline:
                    raise LabError(f"the agent of node {node} did not read state version {version} "
                                   f"within {timeout:g}s")
                time.sleep(0.05)

    def agent_request(self, node: str, obj: dict, timeout: float = 5.0) -> dict:
        """One request on the node agent's control socket (one JSON line each way)."""
        return control.request(self.agent_socket(node), obj, timeout)

    # --- status -----------------------------------------------------------------

    def status(self) -> dict:
        """Nodes, agents and pods, with enrolment from the agents that answer."""
        rec = self._read_records()
        state = self._read_state()
        nodes, enrolment = [], {}
        for node in self.nodes:
            n = rec["nodes"][node]
            pid = self.agent_pid(node)
            agent: dict[str, Any] = {"pid": pid, "running": pid is not None, "ready": False}
            if pid:
                try:
                    reply = self.agent_request(node, {"op": "status"}, timeout=2.0)
                    agent["ready"] = bool(reply.get("ok"))
                    for p in reply.get("pods") or []:
                        enrolment[(p.get("namespace"), p.get("name"))] = p
                except (OSError, ValueError) as exc:
                    agent["error"] = str(exc)
            nodes.append({"name": node, "netns": sysops.netns_path(n["netns"]),
                          "underlay_ip": n["underlay_ip"], "pod_subnet": n["pod_subnet"],
                          "agent": agent})
        pods = []
        for o in state.get("items", []):
            if o.get("kind") != "Pod":
                continue
            meta, st = o["metadata"], o.get("status") or {}
            key = model.pod_key(meta["namespace"], meta["name"])
            p = rec["pods"].get(key, {})
            e = enrolment.get((meta["namespace"], meta["name"]))
            pods.append({
                "namespace": meta["namespace"], "name": meta["name"], "uid": meta.get("uid"),
                "node": o["spec"].get("nodeName"), "phase": st.get("phase"),
                "ip": st.get("podIP"), "ips": [x["ip"] for x in st.get("podIPs") or []],
                "host_network": bool(o["spec"].get("hostNetwork")),
                "netns": sysops.netns_path(p["netns"]) if p.get("netns") else None,
                "message": st.get("message", ""),
                "enrolled": e.get("enrolled") if e else None,
                "reason": e.get("reason") if e else None,
            })
        return {"name": self.name, "dir": str(self.dir), "slot": rec["slot"],
                "state": self.state_path, "nodes": nodes, "pods": pods}

    @staticmethod
    def list_labs(root: str | Path = DEFAULT_ROOT) -> list[dict]:
        """The labs under ``root``: name, slot, node and pod counts."""
        out = []
        for path in sorted(Path(root).glob("*/lab.json")):
            try:
                rec = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            out.append({"name": rec.get("name", path.parent.name), "slot": rec.get("slot"),
                        "nodes": sorted(rec.get("nodes", {})), "pods": len(rec.get("pods", {})),
                        "dir": str(path.parent)})
        return out

    # --- down ---------------------------------------------------------------------

    @classmethod
    def down_by_name(cls, name: str, root: str | Path = DEFAULT_ROOT) -> list[str]:
        return cls(name, root=root).down()

    def down(self) -> list[str]:
        """Remove everything the lab created; idempotent, works after a crash.

        Returns the problems met (empty when everything went away). Order:
        agents (so nothing re-pins or re-captures), every process left in the
        lab's cgroups, CNI DEL of each pod, pod namespaces, BPF pins, node and
        wire namespaces, cgroups, the lab directory.
        """
        problems: list[str] = []
        try:
            rec: dict | None = self._read_records()
        except (LabError, OSError, ValueError):
            rec = None
        needle = str(self.dir)
        for node, a in ((rec or {}).get("agents") or {}).items():
            if a.get("pid"):
                if not sysops.stop_process(a["pid"], a.get("start_time"), needle, signal.SIGTERM,
                                           AGENT_GRACE, popen=self._agents.get(node)):
                    problems.append(f"agent of node {node} (pid {a['pid']}) did not stop")
        self._agents.clear()
        for a in (rec or {}).get("previous_agents") or []:
            if a.get("pid") and not sysops.stop_process(a["pid"], a.get("start_time"), needle, signal.SIGTERM,
                                                        AGENT_GRACE, popen=self._previous_agents.get(a["pid"])):
                problems.append(f"previous agent of node {a.get('node')} (pid {a['pid']}) did not stop")
        self._previous_agents.clear()
        ca = (rec or {}).get("ca") or {}
        if ca.get("pid") and not sysops.stop_process(ca["pid"], ca.get("start_time"), needle, signal.SIGTERM,
                                                     AGENT_GRACE, popen=self._ca_proc):
            problems.append(f"the lab CA (pid {ca['pid']}) did not stop")
        # Everything else the lab ran (pod and node commands, an agent that was
        # started but not yet recorded) lives in the lab's cgroup tree.
        if not sysops.cgroup_kill(self.cgroup_root):
            problems.append(f"processes remain in {self.cgroup_root}")

        if rec is not None:
            nodes = rec.get("nodes") or {}
            for key, p in (rec.get("pods") or {}).items():
                try:
                    problems += self._teardown_pod(key, p, nodes)
                except Exception as exc:   # keep going: the rest must still go
                    problems.append(f"pod {key}: {exc}")
            problems += self._teardown_bpf(rec)
            names = [n["netns"] for n in nodes.values()] + [rec["wire"]["netns"]]
        else:
            # No record (lab.json lost): the pattern matches only names this
            # lab can have created, never another lab's.
            problems += self._teardown_bpf(None)
            pattern = model.lab_netns_pattern(self.name)
            names = [n for n in sysops.list_netns() if pattern.match(n)]
        for ns in names:
            try:
                sysops.remove_netns(ns)
            except OSError as exc:
                problems.append(f"remove netns {ns}: {exc}")
        problems += sysops.cgroup_remove_tree(self.cgroup_root)
        problems += _remove_pin_tree(self.pin_root)
        if self.dir.exists():
            try:
                shutil.rmtree(self.dir)
            except OSError as exc:
                problems.append(f"remove {self.dir}: {exc}")
        if problems:
            log.warning("lab %s down: %d problem(s): %s", self.name, len(problems), "; ".join(problems))
        return problems

    def _teardown_bpf(self, rec: dict | None) -> list[str]:
        """Detach and unpin each node agent's BPF objects.

        Pinned cgroup programs must be detached before unpinning: a program
        attached with BPF_PROG_ATTACH stays attached (to the cgroup v2 root)
        after its pin is gone, with nothing left to find it by. The capture
        module's ``teardown`` knows the attach types and does both. Without
        that module no agent can have attached anything, so removing the pin
        files (``_remove_pin_tree``) is enough.
        """
        if not os.path.isdir(self.pin_root):
            return []
        teardown = _capture_teardown()
        if teardown is None:
            return []
        problems: list[str] = []
        agents = (rec or {}).get("agents") or {}
        for entry in sorted(os.listdir(self.pin_root)):
            pin_dir = os.path.join(self.pin_root, entry)
            if not os.path.isdir(pin_dir):
                continue
            cgroup = _flag_value((agents.get(entry) or {}).get("cmd") or [], "--cgroup")
            try:
                problems += teardown(pin_dir, cgroup) if cgroup else teardown(pin_dir)
            except Exception as exc:
                problems.append(f"BPF teardown of {pin_dir}: {exc}")
        return problems


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _remove_pin_tree(path: str) -> list[str]:
    """Unlink pins and directories left under ``path`` (bpffs allows unlink/rmdir)."""
    problems: list[str] = []
    if not os.path.isdir(path):
        return problems
    for dirpath, dirs, files in os.walk(path, topdown=False):
        for f in files:
            try:
                os.unlink(os.path.join(dirpath, f))
            except OSError as exc:
                problems.append(f"unpin {os.path.join(dirpath, f)}: {exc.strerror}")
        try:
            os.rmdir(dirpath)
        except OSError as exc:
            problems.append(f"remove {dirpath}: {exc.strerror}")
    return problems


def _substitute(value: Any, values: Mapping[str, str]) -> Any:
    if isinstance(value, str):
        return value.format_map(values)
    if isinstance(value, list):
        return [_substitute(v, values) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, values) for k, v in value.items()}
    return value


def _tail_file(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
