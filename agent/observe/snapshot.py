"""What a node agent is doing, as one immutable value (issue 13, item 1).

The node agent (agent/daemon.py) takes a ``NodeSnapshot`` of itself: its
pods (the lifecycle core's records, agent/enrol/lifecycle.py), their
counters and recent connections, the open problems, the cluster state it
acts on, its BPF, certificate and HBONE pool figures. The two views people
and tools read are built from that value alone, never from the agent's
internals: ``status()`` (the control socket's ``status`` request, read by
``ambient-agent status``, agent/status.py) and ``config_dump()`` (the admin
port's ``/config_dump``). Both are pure, so their layout is tested
without an agent (tests/unit/test_status_render.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from agent.state.model import ClusterState


@dataclass(frozen=True)
class PodSnapshot:
    """One pod the agent knows (a record), with what its proxy counted."""
    namespace: str
    name: str
    uid: str
    ips: tuple[str, ...]
    netns: str
    netns_cookie: int
    enrolled: bool
    reason: str
    identity: str                  # "" when not enrolled
    counters: dict = field(default_factory=dict)
    connections: tuple[dict, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class NodeSnapshot:
    node: str
    pid: int
    handover: str | None           # what a handover in progress says, None without one
    state_url: str
    state: ClusterState
    synced: bool
    sync_status: dict | None       # the kube source's sync figures; None for a file
    pods: tuple[PodSnapshot, ...]  # sorted by key
    problems: dict[str, str]       # pods that must be in the mesh but are not captured
    pin_dir: str
    cgroup: str
    bpf_attached: bool
    netns_captured: tuple[int, ...]
    capture_counters: dict
    hbone_connections: int
    hbone_opened: int
    certificates: tuple[dict, ...]
    trust_bundle: dict | None
    policy_rejections: tuple[str, ...] = ()
    policy_reports: tuple[str, ...] = ()
    dns: dict = field(default_factory=dict)   # the DNS proxy: setting and per-pod query counters

    def status(self) -> dict:
        """The control socket's ``status`` answer (``ambient-agent status``)."""
        return {"ok": True, "node": self.node, "pid": self.pid,
                **({"handover": self.handover} if self.handover is not None else {}),
                "pods": [{"namespace": p.namespace, "name": p.name, "uid": p.uid, "ips": list(p.ips),
                          "netns": p.netns, "enrolled": p.enrolled, "reason": p.reason,
                          "identity": p.identity, "counters": p.counters, "connections": list(p.connections)}
                         for p in self.pods],
                "state_version": self.state.resource_version,
                "not_captured": [{"pod": k, "problem": v} for k, v in sorted(self.problems.items())],
                "capture": self.capture_counters,
                "hbone_pool": {"connections": self.hbone_connections, "opened": self.hbone_opened},
                "certificates": list(self.certificates),
                "trust_bundle": self.trust_bundle, "dns": self.dns}

    def config_dump(self) -> dict:
        """Everything the agent believes, for /config_dump (no private keys: none are in a snapshot)."""
        state = self.state
        views = state.pod_views
        return {
            "node": self.node,
            "pid": self.pid,
            "state_source": {"url": self.state_url, "version": state.resource_version, "synced": self.synced,
                             **({"sync": self.sync_status} if self.sync_status is not None else {})},
            "workloads": [{"namespace": ns, "name": name, "node": (p.get("spec") or {}).get("nodeName"),
                           "ips": [i.get("ip") for i in (p.get("status") or {}).get("podIPs") or []],
                           "service_account": views[(ns, name)].service_account}
                          for (ns, name), p in sorted(state.pods.items())],
            "services": [{"namespace": ns, "name": name, "cluster_ip": (svc.get("spec") or {}).get("clusterIP")}
                         for (ns, name), svc in sorted(state.services.items())],
            "policies": {"rejected": list(self.policy_rejections), "reports": list(self.policy_reports)},
            "certificates": list(self.certificates),
            "trust_bundle": self.trust_bundle,
            "enrolled": [{"pod": p.key, "netns": p.netns, "netns_cookie": p.netns_cookie, "ips": list(p.ips),
                          "enrolled": p.enrolled} for p in self.pods],
            "not_captured": dict(sorted(self.problems.items())),
            "bpf": {"pin_dir": self.pin_dir, "cgroup": self.cgroup, "attached": self.bpf_attached,
                    "netns_captured": list(self.netns_captured) if self.bpf_attached else [],
                    "counters": self.capture_counters if self.bpf_attached else {}},
            "dns": self.dns,
        }
