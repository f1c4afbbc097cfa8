"""The local pod lab: a kubelet and a container runtime made of namespaces.

A lab is a handful of "nodes" (network namespaces joined by an underlay
bridge) running "pods" (network namespaces wired by the node's real CNI
chain, each with its own cgroup v2 directory), plus the cluster state file
the agent reads. Layout and addressing: docs/ARCHITECTURE.md "Lab layout"
and ``lab/model.py``.

``Lab`` is a thin facade over the lab's roles, one module each:

- ``lab.store``: ``LabStore``, the records (``lab.json``), the cluster state
  file, paths and the lock;
- ``lab.network``: ``NetworkBuilder``, the underlay, nodes, conflists, routes;
- ``lab.kubelet``: ``PodRuntime``, pods (sandbox, CNI ADD/DEL with the
  kubelet's retries) and commands run in pods and nodes;
- ``lab.supervisor``: ``AgentSupervisor``, the mesh CA and the node agents;
- ``lab.teardown``: ``teardown_lab``, removing all of it.

Crash safety: every namespace, cgroup, process and directory is written to
``lab.json`` *before* it is created, so ``down`` (or ``Lab.down_by_name``
from another process) can remove all of it even if the process that built
the lab died half-way.
"""

from __future__ import annotations

import copy
import json
import logging
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from lab import DEFAULT_ROOT, model, sysops
from lab.kubelet import PodRuntime, RunnerFactory
from lab.model import ManifestError
from lab.network import NETWORK_NAME, NetworkBuilder
from lab.runtime import CniRunner
from lab.store import LabError, LabSettings, LabStore
from lab.supervisor import AgentSupervisor
from lab.teardown import teardown_lab

__all__ = ["AGENT_GRACE", "NETWORK_NAME", "Lab", "LabError"]

log = logging.getLogger(__name__)

AGENT_GRACE = 5.0            # SIGTERM, then SIGKILL after this many seconds (read when a Lab is made)


class _Setting:
    """An attribute of ``Lab`` kept in its ``LabSettings``, so every role sees a change."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: "Lab | None", owner: type | None = None) -> Any:
        if obj is None:
            return self
        return getattr(obj.settings, self.name)

    def __set__(self, obj: "Lab", value: Any) -> None:
        setattr(obj.settings, self.name, value)


class Lab:
    """One lab: create with ``up``, inspect and poke, remove with ``down``."""

    agent_args = _Setting()
    pod_timeout = _Setting()
    ambient_cni = _Setting()
    cni_bin = _Setting()
    cni_plugins = _Setting()
    cni_timeout = _Setting()
    agent_ready_timeout = _Setting()
    agent_command = _Setting()
    ca = _Setting()
    dual_stack = _Setting()

    def __init__(self, name: str, root: str | Path = DEFAULT_ROOT, agent_args: Sequence[str] = (),
                 start_agents: bool = True, pod_timeout: float = 30.0, ambient_cni: bool = True,
                 *, cni_bin: Mapping[str, str] | None = None,
                 cni_plugins: Sequence[Mapping] = (), cni_timeout: float = 30.0,
                 agent_ready_timeout: float = 60.0,
                 agent_command: Sequence[str] | None = None, ca: bool = True,
                 cni_runner: RunnerFactory = CniRunner, dual_stack: bool = False) -> None:
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
        ``python -m agent.cli``; tests substitute a stand-in). ``cni_runner``
        makes a node's CNI runner from (bin dir, node netns, timeout); the
        benchmarks pass one that times every call. ``dual_stack``: nodes
        created afterwards also carry IPv6 (underlay and a second host-local
        range, addresses in ``lab/model.py``), so pods get an IPv4 and an IPv6
        address, and dual-stack Services a second cluster IP. A pod annotated
        ``lab.ambient-agent/ip-families: IPv6`` is IPv6-only there (the CNI
        chain runs with the IPv6 range alone; ``lab.model.pod_ip_families``).
        """
        self.settings = LabSettings(
            agent_args=list(agent_args), pod_timeout=float(pod_timeout), ambient_cni=ambient_cni,
            cni_bin=dict(cni_bin or {}), cni_plugins=[copy.deepcopy(dict(p)) for p in cni_plugins],
            cni_timeout=cni_timeout, agent_ready_timeout=agent_ready_timeout,
            agent_command=list(agent_command or (sys.executable, "-m", "agent.cli")), ca=ca,
            agent_grace=AGENT_GRACE, dual_stack=dual_stack)
        self.start_agents = start_agents
        self.store = LabStore(name, root)
        self.network = NetworkBuilder(self.store, self.settings)
        self.pods = PodRuntime(self.store, self.settings, cni_runner)
        self.agents = AgentSupervisor(self.store, self.settings, self.network, self.pods.spawn)

    def __repr__(self) -> str:
        return f"Lab({self.name!r}, root={str(self.root)!r})"

    def __enter__(self) -> "Lab":
        return self

    def __exit__(self, *exc: object) -> None:
        problems = self.down()
        for p in problems:
            log.warning("lab %s down: %s", self.name, p)

    # --- names and paths (the store's) ----------------------------------------

    @property
    def name(self) -> str:
        return self.store.name

    @property
    def root(self) -> Path:
        return self.store.root

    @property
    def dir(self) -> Path:
        return self.store.dir

    @property
    def cgroup_root(self) -> str:
        return self.store.cgroup_root

    @property
    def pin_root(self) -> str:
        return self.store.pin_root

    @property
    def state_path(self) -> str:
        return self.store.state_path

    @property
    def lab_json(self) -> Path:
        return self.store.lab_json

    @property
    def bin_dir(self) -> Path:
        return self.store.bin_dir

    @property
    def ca_dir(self) -> Path:
        return self.store.ca_dir

    def node_dir(self, node: str) -> Path:
        return self.store.node_dir(node)

    def conflist_path(self, node: str) -> Path:
        return self.store.conflist_path(node)

    def ipam_dir(self, node: str) -> Path:
        return self.store.ipam_dir(node)

    def agent_socket(self, node: str) -> str:
        return self.store.agent_socket(node)

    def pin_dir(self, node: str) -> str:
        return self.store.pin_dir(node)

    def exists(self) -> bool:
        return self.store.exists()

    @property
    def nodes(self) -> list[str]:
        return self.store.nodes

    def _update_state(self, fn: Callable[[list[dict]], object]) -> None:
        """Change the cluster state file as the API server would (``LabStore.update_state``)."""
        self.store.update_state(fn)

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
        self.network.ensure_lab()
        rec = self.store.read_records()
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
            self.network.add_node(node)
        self.network.sync_routes()
        updated = self._apply_objects(objs)
        if self.start_agents:
            if self.ca and self.ca_pid() is None:
                self.start_ca()
            for node in self.nodes:
                if self.agent_pid(node) is None:
                    self.start_agent(node)
        rec = self.store.read_records()
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
                for o, err in zip(todo, ex.map(self.pods.create_pod_reporting, todo)):
                    if err:
                        failed[model.pod_key(o["metadata"]["namespace"], o["metadata"]["name"])] = err
        created = [model.pod_key(o["metadata"]["namespace"], o["metadata"]["name"]) for o in todo]
        return {"nodes": self.nodes, "created": [k for k in created if k not in failed],
                "updated": updated, "failed": failed}

    apply = up

    def _apply_objects(self, objs: list[dict]) -> list[str]:
        """Write every non-pod object (and metadata of existing pods) to the state."""
        rec = self.store.read_records()
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
                    model.upsert(items, model.node_object(name, n["underlay_ip"], n["pod_subnet"], o,
                                                          n.get("pod_subnet6"), n.get("underlay_ip6")))
                    continue
                if kind == "Service":
                    self._assign_cluster_ip(o, items, rec)
                old = model.find(items, kind, ns, name)
                if old is not None and old["metadata"].get("creationTimestamp"):
                    o["metadata"].setdefault("creationTimestamp", old["metadata"]["creationTimestamp"])
                model.upsert(items, copy.deepcopy(o))
            for o in model.implicit_objects(objs, items):
                model.upsert(items, o)

        self.store.update_state(mutate)
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
        dual = any(n.get("pod_subnet6") for n in rec["nodes"].values())
        if dual and model.wants_dual_stack(spec):
            # As the API server with IPv4 as the primary family: a second cluster IP.
            old_ips = (old or {}).get("spec", {}).get("clusterIPs") or []
            ip6 = next((x for x in old_ips if ":" in x), None)
            if ip6 is None:
                used6 = [x for o in items if o.get("kind") == "Service"
                         for x in (o.get("spec", {}).get("clusterIPs") or []) if ":" in x]
                ip6 = model.allocate_cluster_ip(model.service_cidr6(rec["slot"]), used6)
            spec["clusterIPs"] = [ip, ip6]
            spec["ipFamilies"] = ["IPv4", "IPv6"]
        elif model.wants_dual_stack(spec) and spec.get("ipFamilyPolicy") == "RequireDualStack":
            raise ManifestError(f"Service {svc['metadata']['name']} requires dual-stack; "
                                "make the lab with dual_stack=True")

    def set_labels(self, kind: str, ns: str | None, name: str, labels: Mapping[str, str | None]) -> None:
        """Change labels on an object in the state file (``None`` removes a label)."""
        namespace = "" if kind in model.CLUSTER_SCOPED else (ns or "default")

        def mutate(items: list[dict]) -> None:
            obj = model.find(items, kind, namespace, name)
            if obj is None:
                where = f"{namespace}/{name}" if namespace else name
                raise KeyError(f"no {kind} {where} in lab {self.name}")
            model.apply_labels(obj, dict(labels))

        self.store.update_state(mutate)

    # --- pods (the pod runtime's) -----------------------------------------------

    def delete_pod(self, namespace: str, name: str) -> list[str]:
        """Remove a pod: kill its processes, CNI DEL, netns and cgroup, state entry."""
        return self.pods.delete_pod(namespace, name)

    def pod(self, ns_name: str) -> dict:
        """The pod's object in the state file."""
        return self.pods.pod(ns_name)

    def pod_ip(self, ns_name: str) -> str:
        return self.pods.pod_ip(ns_name)

    def pod_netns(self, ns_name: str) -> str:
        """``/run/netns/…`` of the pod (its node's for a hostNetwork pod)."""
        return self.pods.pod_netns(ns_name)

    def pod_cgroup(self, ns_name: str) -> str:
        return self.store.pod_record(ns_name)["cgroup"]

    def node_netns(self, node: str) -> str:
        return self.pods.node_netns(node)

    def node_ip(self, node: str) -> str:
        return self.store.node_record(node)["underlay_ip"]

    def exec(self, ns_name: str, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command inside the pod: its network namespace and its cgroup."""
        return self.pods.exec(ns_name, argv, **popen_kwargs)

    def node_exec(self, node: str, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command in the node's network namespace (probes, tcpdump), cgroup ``<node>/_host``."""
        return self.pods.node_exec(node, argv, **popen_kwargs)

    def wire_exec(self, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command in the underlay's namespace (packet captures on the ``wire`` bridge)."""
        return self.pods.wire_exec(argv, **popen_kwargs)

    def run(self, ns_name: str, argv: Any, timeout: float | None = 30.0, check: bool = False,
            input: str | bytes | None = None, **popen_kwargs: Any) -> subprocess.CompletedProcess:
        """``subprocess.run`` inside the pod; output captured as text by default."""
        return PodRuntime.run(lambda kw: self.exec(ns_name, argv, **kw), argv, timeout, check, input,
                              popen_kwargs)

    def node_run(self, node: str, argv: Any, timeout: float | None = 30.0, check: bool = False,
                 input: str | bytes | None = None, **popen_kwargs: Any) -> subprocess.CompletedProcess:
        return PodRuntime.run(lambda kw: self.node_exec(node, argv, **kw), argv, timeout, check, input,
                              popen_kwargs)

    # --- node agents and the CA (the supervisor's) ---------------------------------

    def start_agent(self, node: str, extra_args: Sequence[str] = ()) -> int:
        """Start the node's agent in the node's namespace; wait until it answers."""
        return self.agents.start_agent(node, extra_args)

    def upgrade_agent(self, node: str, extra_args: Sequence[str] = ()) -> int:
        """Start a second agent for ``node`` while its agent runs: an upgrade on a node.

        The new agent asks the running one to hand the node over (same run
        dir, pin dir and pods; docs/ARCHITECTURE.md, "Agent upgrade"). Returns
        the new agent's pid once it answers on the control socket, that is
        once it has taken the node over; the old agent is then draining and
        exits after its ``--drain-seconds``. The old one stays recorded under
        ``previous_agents`` until then, so that ``down`` stops it in any case.
        """
        return self.agents.upgrade_agent(node, extra_args)

    def previous_agent_pids(self, node: str) -> list[int]:
        """Agents of ``node`` replaced by ``upgrade_agent`` that still run (draining)."""
        return self.agents.previous_agent_pids(node)

    def stop_agent(self, node: str, sig: int = signal.SIGTERM, wait: bool = True) -> bool:
        """Signal the node's agent; with ``wait``, SIGKILL it after 5 s and reap it.

        Returns True when the agent is gone.
        """
        return self.agents.stop_agent(node, sig, wait)

    def agent_pid(self, node: str) -> int | None:
        """The pid of the node's running agent, or None."""
        return self.agents.agent_pid(node)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until every running node agent has read the current cluster state.

        Agents poll the state file; traffic sent right after a pod is created
        would otherwise race them (and be passed through, correctly, to an
        address the agent does not know yet).
        """
        self.agents.settle(timeout)

    def agent_request(self, node: str, obj: dict, timeout: float = 5.0) -> dict:
        """One request on the node agent's control socket (one JSON line each way)."""
        return self.agents.agent_request(node, obj, timeout)

    @property
    def ca_address(self) -> str:
        return self.agents.ca_address

    @property
    def ca_root(self) -> str:
        """The trust bundle: the CA's root certificate, written when it starts."""
        return self.agents.ca_root

    def start_ca(self) -> int:
        """Start the CA in the wire namespace, on the underlay; wait until it listens."""
        return self.agents.start_ca()

    def ca_pid(self) -> int | None:
        return self.agents.ca_pid()

    def stop_ca(self, sig: int = signal.SIGTERM) -> bool:
        return self.agents.stop_ca(sig)

    # --- status -----------------------------------------------------------------

    def status(self) -> dict:
        """Nodes, agents and pods, with enrolment from the agents that answer."""
        rec = self.store.read_records()
        state = self.store.read_state()
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

        Returns the problems met (empty when everything went away); the order
        is in ``lab.teardown``.
        """
        return teardown_lab(self.store, self.agents, self.pods)
