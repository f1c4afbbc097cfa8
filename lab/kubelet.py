"""The lab's pod runtime: a kubelet and container runtime made of namespaces.

A pod is a network namespace wired by its node's real CNI chain (loopback,
then the node's conflist, with the kubelet's retry and DEL-after-failed-ADD
behaviour) and a cgroup v2 directory its processes run in. A hostNetwork pod
shares its node's namespace and gets no CNI call. A pod annotated
``lab.ambient-agent/ip-families`` gets only those families: its ADD and DEL
run a copy of the conflist restricted to them (``cnichain.restrict_families``).
Processes are started in a namespace and cgroup through ``sysops.child_setup``.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import secrets
import subprocess
import time
from typing import Any, Callable

from lab import cnichain, model, sysops
from lab.cnichain import CNIError, Sandbox
from lab.runtime import CniRunner
from lab.store import LabError, LabSettings, LabStore, now

log = logging.getLogger(__name__)

RETRY_FIRST, RETRY_MAX = 0.2, 2.0   # sandbox retry backoff (kubelet's, compressed)

# Makes the CNI runner of a node: (CNI bin dir, node netns path, timeout).
RunnerFactory = Callable[[str, str, float], CniRunner]


class PodRuntime:
    """Creates, runs commands in and removes the lab's pods."""

    def __init__(self, store: LabStore, settings: LabSettings, runner_factory: RunnerFactory = CniRunner) -> None:
        self.store = store
        self.settings = settings
        self.runner_factory = runner_factory

    # --- creating and deleting pods ----------------------------------------------

    def create_pod_reporting(self, obj: dict) -> str | None:
        """``create_pod``, with an unexpected failure turned into a Failed pod."""
        try:
            return self.create_pod(obj)
        except Exception as exc:
            key = model.pod_key(obj["metadata"]["namespace"], obj["metadata"]["name"])
            log.exception("lab %s: creating pod %s", self.store.name, key)
            try:
                return self.set_failed(key, f"pod sandbox not created: {exc}")
            except Exception:
                return f"pod sandbox not created: {exc}"

    def create_pod(self, obj: dict) -> str | None:
        """One pod, kubelet-style: sandbox, CNI ADD with retries. Returns an error or None."""
        st = self.store
        meta, spec = obj["metadata"], obj["spec"]
        ns, name, node = meta["namespace"], meta["name"], spec["nodeName"]
        key = model.pod_key(ns, name)
        host_net = bool(spec.get("hostNetwork"))
        families = model.pod_ip_families(obj)
        pod = copy.deepcopy(obj)
        pod["metadata"].setdefault("uid", model.new_uid())
        uid = pod["metadata"]["uid"]
        pod["status"] = {"phase": "Pending"}
        with st.locked():
            with st.records() as rec:
                nrec = rec["nodes"][node]
                j = rec["next_pod"]
                rec["next_pod"] = j + 1
                p = rec["pods"][key] = {
                    "index": j, "uid": uid, "node": node, "host_network": host_net,
                    "netns": None if host_net else model.pod_netns(st.name, j),
                    "cgroup": f"{st.cgroup_root}/{node}/{model.cgroup_leaf(ns, name)}",
                    "phase": "Pending", "container_id": None, "result": None,
                    "ips": [], "message": "",
                }
                if families is not None:
                    p["families"] = list(families)
            sysops.cgroup_create(p["cgroup"])
            if p["netns"]:
                sysops.create_netns(p["netns"])
                if nrec.get("pod_subnet6"):
                    sysops.setup_ipv6(sysops.netns_path(p["netns"]), forward=False)
            st.update_state(lambda items: model.upsert(items, pod))
        if host_net:
            # No sandbox network: the pod shares its node's namespace and
            # address, and the kubelet calls no CNI plugin for it.
            self.set_running(key, [nrec["underlay_ip"]], nrec)
            return None

        runner = self.runner(nrec)
        try:
            conflist = self.read_conflist(node)
        except (OSError, ValueError) as exc:
            return self.set_failed(key, f"cannot read the CNI configuration of node {node}: {exc}")
        if families is not None:
            try:
                conflist = cnichain.restrict_families(conflist, families)
            except ValueError as exc:
                return self.set_failed(key, f"annotation {model.IP_FAMILIES_ANNOTATION}: node {node}: {exc} "
                                            "(IPv6 needs a lab made with dual_stack=True)")
        netns = sysops.netns_path(p["netns"])
        timeout = self.settings.pod_timeout
        deadline = time.monotonic() + timeout
        delay, attempt = RETRY_FIRST, 0
        while True:
            attempt += 1
            sandbox = Sandbox(secrets.token_hex(32), netns, ns, name, uid)
            # Recorded before ADD: if we die during it, down can still DEL it.
            st.set_pod_record(key, container_id=sandbox.container_id)
            try:
                runner.add_network(cnichain.LOOPBACK_CONFLIST, sandbox)
                result = runner.add_network(conflist, sandbox)
                ips = cnichain.sandbox_ips(result)
                if not ips:
                    raise CNIError(cnichain.CODE_EXEC_FAILED,
                                   "the network configuration gave the pod no address")
            except CNIError as exc:
                error = exc
                log.info("lab %s: pod %s sandbox attempt %d failed: %s", st.name, key, attempt, exc)
                # Like a runtime after a failed ADD: DEL the whole chain so
                # the part of it that did run (veth, IP lease) is undone.
                runner.del_network(conflist, sandbox, None)
                st.set_pod_record(key, container_id=None)
                if time.monotonic() + delay >= deadline:
                    break
                time.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            st.set_pod_record(key, result=result)
            self.set_running(key, cnichain.strip_prefix(ips), nrec)
            log.info("lab %s: pod %s running on %s at %s", st.name, key, node, ", ".join(ips))
            return None
        runner.del_network(cnichain.LOOPBACK_CONFLIST, sandbox, None)
        return self.set_failed(
            key, f"pod sandbox not created after {attempt} attempt(s) in {timeout:g}s: {error}")

    def runner(self, nrec: dict) -> CniRunner:
        return self.runner_factory(str(self.store.bin_dir), sysops.netns_path(nrec["netns"]),
                                   self.settings.cni_timeout)

    def read_conflist(self, node: str, families: list[str] | None = None) -> dict:
        """The node's conflist; restricted to ``families`` for a single-family pod."""
        with open(self.store.conflist_path(node)) as f:
            conflist = cnichain.validate_conflist(json.load(f))
        if families is not None:
            conflist = cnichain.restrict_families(conflist, families)
        return conflist

    def set_running(self, key: str, ips: list[str], nrec: dict) -> None:
        ns, name = model.split_key(key)
        with self.store.locked():
            self.store.set_pod_record(key, phase="Running", ips=ips, message="")
            status = {
                "phase": "Running",
                "conditions": [{"type": "Ready", "status": "True"}],
                "hostIP": nrec["underlay_ip"], "hostIPs": [{"ip": nrec["underlay_ip"]}],
                "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips],
                "startTime": now(),
            }

            def mutate(items: list[dict]) -> None:
                pod = model.find(items, "Pod", ns, name)
                if pod is not None:
                    pod["status"] = status
            self.store.update_state(mutate)

    def set_failed(self, key: str, message: str) -> str:
        ns, name = model.split_key(key)
        log.warning("lab %s: pod %s failed: %s", self.store.name, key, message)
        with self.store.locked():
            self.store.set_pod_record(key, phase="Failed", message=message, container_id=None)

            def mutate(items: list[dict]) -> None:
                pod = model.find(items, "Pod", ns, name)
                if pod is not None:
                    pod["status"] = {"phase": "Failed", "reason": "FailedCreatePodSandBox",
                                     "message": message}
            self.store.update_state(mutate)
        return message

    def delete_pod(self, namespace: str, name: str) -> list[str]:
        """Remove a pod: kill its processes, CNI DEL, netns and cgroup, state entry."""
        st = self.store
        key = model.pod_key(namespace, name)
        rec = st.read_records()
        p = rec["pods"].get(key)
        if p is None:
            raise KeyError(f"no pod {key} in lab {st.name}")
        problems = self.teardown_pod(key, p, rec["nodes"])
        with st.locked():
            with st.records() as rec:
                rec["pods"].pop(key, None)
            st.update_state(lambda items: model.remove(items, "Pod", namespace, name))
        return problems

    def teardown_pod(self, key: str, p: dict, nodes: dict) -> list[str]:
        """Processes, CNI DEL, netns and cgroup of one recorded pod; the problems met."""
        problems: list[str] = []
        if not sysops.cgroup_kill(p["cgroup"]):
            problems.append(f"pod {key}: processes remain in {p['cgroup']}")
        n = nodes.get(p["node"])
        if (p.get("netns") and p.get("container_id") and n
                and sysops.netns_exists(n["netns"]) and self.store.conflist_path(p["node"]).exists()):
            ns, name = model.split_key(key)
            sandbox = Sandbox(p["container_id"], sysops.netns_path(p["netns"]), ns, name, p["uid"])
            runner = self.runner(n)
            try:
                errors = runner.del_network(self.read_conflist(p["node"], p.get("families")), sandbox,
                                            p.get("result"))
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

    # --- where pods and nodes are -------------------------------------------------

    def pod_netns(self, ns_name: str) -> str:
        """``/run/netns/…`` of the pod (its node's for a hostNetwork pod)."""
        p = self.store.pod_record(ns_name)
        if p["netns"]:
            return sysops.netns_path(p["netns"])
        return self.node_netns(p["node"])

    def node_netns(self, node: str) -> str:
        return sysops.netns_path(self.store.node_record(node)["netns"])

    def pod_ip(self, ns_name: str) -> str:
        pod = self.pod(ns_name)
        ip = pod.get("status", {}).get("podIP")
        if not ip:
            raise LabError(f"pod {ns_name} has no IP (phase {pod['status'].get('phase')})")
        return ip

    def pod(self, ns_name: str) -> dict:
        """The pod's object in the state file."""
        ns, name = model.split_key(ns_name)
        obj = model.find(self.store.read_state()["items"], "Pod", ns, name)
        if obj is None:
            raise KeyError(f"no pod {ns}/{name} in lab {self.store.name}")
        return obj

    # --- running things -------------------------------------------------------------

    @staticmethod
    def spawn(netns: str, cgroup: str, argv: Any, kwargs: dict) -> subprocess.Popen:
        """Start ``argv`` in the network namespace ``netns`` and the cgroup ``cgroup``."""
        user_preexec = kwargs.pop("preexec_fn", None)
        fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return subprocess.Popen(argv, preexec_fn=sysops.child_setup(fd, cgroup, user_preexec),
                                    **kwargs)
        finally:
            os.close(fd)

    def exec(self, ns_name: str, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command inside the pod: its network namespace and its cgroup."""
        p = self.store.pod_record(ns_name)
        return self.spawn(self.pod_netns(ns_name), p["cgroup"], argv, popen_kwargs)

    def node_exec(self, node: str, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command in the node's network namespace (probes, tcpdump).

        It runs in the cgroup ``<node>/_host`` so that ``down`` can reap it.
        """
        netns = self.node_netns(node)
        cgroup = f"{self.store.cgroup_root}/{node}/_host"
        sysops.cgroup_create(cgroup)
        return self.spawn(netns, cgroup, argv, popen_kwargs)

    def wire_exec(self, argv: Any, **popen_kwargs: Any) -> subprocess.Popen:
        """Start a command in the underlay's namespace (packet captures on the ``wire`` bridge)."""
        rec = self.store.read_records()
        cgroup = f"{self.store.cgroup_root}/_wire"
        sysops.cgroup_create(cgroup)
        return self.spawn(sysops.netns_path(rec["wire"]["netns"]), cgroup, argv, popen_kwargs)

    @staticmethod
    def run(start: Callable[[dict], subprocess.Popen], argv: Any, timeout: float | None,
            check: bool, input: Any, kw: dict) -> subprocess.CompletedProcess:
        """``subprocess.run`` over a ``start(popen_kwargs)``; output captured as text by default."""
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
