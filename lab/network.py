"""The lab's network builder: the underlay, the nodes and their CNI configuration.

Namespaces: ``alab-<lab>-wire`` (the underlay bridge ``wire``, one veth port
per node) and ``alab-<lab>-n<i>`` per node (``eth0`` on the wire, the pods'
``cni0`` bridge, routes to the other nodes' pod subnets). Nothing is created
in the root namespace. Layout: docs/ARCHITECTURE.md "Lab layout".
"""

from __future__ import annotations

import copy
import logging
import os
import sys
from pathlib import Path

from pyroute2 import IPRoute

from lab import cnichain, model, sysops
from lab.store import LabError, LabSettings, LabStore, substitute, write_json

log = logging.getLogger(__name__)

SYSTEM_CNI_DIR = "/usr/lib/cni"
SYSTEM_PLUGINS = ("bridge", "host-local", "loopback", "portmap")
NETWORK_NAME = "ambient-lab"
WIRE_BRIDGE = "wire"


class NetworkBuilder:
    """Creates the lab's underlay and nodes, each step recorded in the store first."""

    def __init__(self, store: LabStore, settings: LabSettings) -> None:
        self.store = store
        self.settings = settings

    def ensure_lab(self) -> None:
        """The lab's record, CNI bin dir, underlay and cgroup root (idempotent)."""
        st = self.store
        st.root.mkdir(parents=True, exist_ok=True)
        if not st.exists():
            st.allocate(WIRE_BRIDGE)
        with st.locked():
            self.link_bin()
            with st.records() as rec:
                wire = rec["wire"]
                if not wire["ready"]:
                    self.build_wire(wire["netns"])
                    wire["ready"] = True
            sysops.cgroup_create(st.cgroup_root)

    def link_bin(self) -> None:
        """``<lab>/cni/bin``: the CNI_PATH every node's plugins are found in."""
        bin_dir = self.store.bin_dir
        bin_dir.mkdir(parents=True, exist_ok=True)
        links = {p: f"{SYSTEM_CNI_DIR}/{p}" for p in SYSTEM_PLUGINS}
        # The venv's console script (not resolved: its shebang is the venv python).
        links["ambient-cni"] = str(Path(sys.executable).parent / "ambient-cni")
        links.update(self.settings.cni_bin)
        for name, target in links.items():
            if "/" in name or not name:
                raise LabError(f"invalid CNI plugin name {name!r}")
            link = bin_dir / name
            tmp = bin_dir / f".{name}.tmp"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(os.path.abspath(target), tmp)
            os.replace(tmp, link)

    def build_wire(self, netns: str) -> None:
        # Recorded before creation: an existing one is ours, left by a crash.
        sysops.remove_netns(netns)
        sysops.create_netns(netns)
        with IPRoute(netns=netns) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            ipr.link("add", ifname=WIRE_BRIDGE, kind="bridge")
            ipr.link("set", index=ipr.link_lookup(ifname=WIRE_BRIDGE)[0], state="up")

    def add_wire_address(self, ip: str) -> None:
        """Give the underlay bridge one more address (the CA listens on it)."""
        with IPRoute(netns=self.store.read_records()["wire"]["netns"]) as ipr:
            idx = ipr.link_lookup(ifname=WIRE_BRIDGE)[0]
            have = {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
            if ip not in have:
                ipr.addr("add", index=idx, address=ip, prefixlen=model.UNDERLAY_PREFIXLEN)

    def add_node(self, node: str) -> None:
        st = self.store
        with st.locked():
            with st.records() as rec:
                n = rec["nodes"].get(node)
                if n is None:
                    free = sorted(set(range(model.MAX_NODES)) - {x["index"] for x in rec["nodes"].values()})
                    if not free:
                        raise LabError(f"lab {st.name} already has {model.MAX_NODES} nodes; "
                                       f"cannot add node {node}")
                    i, slot = free[0], rec["slot"]
                    n = rec["nodes"][node] = {
                        "index": i, "netns": model.node_netns(st.name, i),
                        "underlay_ip": model.underlay_ip(slot, i),
                        "pod_subnet": model.pod_subnet(slot, i),
                        "gateway": model.pod_gateway(slot, i),
                        "wire_port": f"n{i}", "ready": False,
                    }
                    if self.settings.dual_stack:
                        n.update(underlay_ip6=model.underlay_ip6(slot, i),
                                 pod_subnet6=model.pod_subnet6(slot, i),
                                 gateway6=model.pod_gateway6(slot, i))
            if n["ready"]:
                return
            self.build_node(node, n, rec["wire"]["netns"])
            with st.records() as rec:
                rec["nodes"][node]["ready"] = True
            log.info("lab %s: node %s in %s, underlay %s, pods %s", st.name, node,
                     n["netns"], n["underlay_ip"], n["pod_subnet"])

    def build_node(self, node: str, n: dict, wire: str) -> None:
        """The node's namespace, its underlay port, directories and conflist.

        Runs from scratch even after a crash half-way: a recorded node that is
        not ready has no pods yet, so its namespace can simply be recreated.
        """
        st = self.store
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
        if n.get("underlay_ip6"):
            sysops.setup_ipv6(path)   # before eth0 gets its address: no DAD
        with IPRoute(netns=n["netns"]) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
            eth0 = ipr.link_lookup(ifname="eth0")[0]
            ipr.addr("add", index=eth0, address=n["underlay_ip"], prefixlen=model.UNDERLAY_PREFIXLEN)
            if n.get("underlay_ip6"):
                ipr.addr("add", index=eth0, address=n["underlay_ip6"], prefixlen=model.UNDERLAY6_PREFIXLEN)
            ipr.link("set", index=eth0, state="up")
        sysops.enable_ip_forward(path)
        for d in (st.node_dir(node), st.conflist_path(node).parent, st.ipam_dir(node)):
            d.mkdir(parents=True, exist_ok=True)
        write_json(st.conflist_path(node), self.conflist(node, n))
        sysops.cgroup_create(f"{st.cgroup_root}/{node}")

        def mutate(items: list[dict]) -> None:
            given = model.find(items, "Node", "", node)   # keep labels of a rebuilt node
            model.upsert(items, model.node_object(node, n["underlay_ip"], n["pod_subnet"], given,
                                                  n.get("pod_subnet6"), n.get("underlay_ip6")))
        st.update_state(mutate)

    def conflist(self, node: str, n: dict) -> dict:
        st, cfg = self.store, self.settings
        ranges: list[list[dict]] = [[{"subnet": n["pod_subnet"]}]]
        routes: list[dict] = [{"dst": "0.0.0.0/0"}]
        if n.get("pod_subnet6"):
            ranges.append([{"subnet": n["pod_subnet6"]}])
            routes.append({"dst": "::/0"})
        plugins: list[dict] = [{
            "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": False,
            "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": ranges,
                     "routes": routes, "dataDir": str(st.ipam_dir(node))},
        }]
        if cfg.ambient_cni:
            plugins.append({"type": "ambient-cni", "agent_socket": st.agent_socket(node),
                            "state": f"file:{st.state_path}",
                            "exclude_namespaces": ["kube-system"]})
        values = {"node": node, "lab_dir": str(st.dir), "node_dir": str(st.node_dir(node)),
                  "state": st.state_path}
        plugins.extend(substitute(copy.deepcopy(p), values) for p in cfg.cni_plugins)
        return cnichain.validate_conflist({"cniVersion": "1.0.0", "name": NETWORK_NAME,
                                           "plugins": plugins})

    def sync_routes(self) -> None:
        """Every node reaches every other node's pod subnet via its underlay address."""
        rec = self.store.read_records()
        ready = {k: v for k, v in rec["nodes"].items() if v["ready"]}
        for name, n in ready.items():
            with IPRoute(netns=n["netns"]) as ipr:
                for other, o in ready.items():
                    if other != name:
                        ipr.route("replace", dst=o["pod_subnet"], gateway=o["underlay_ip"])
                        if n.get("underlay_ip6") and o.get("pod_subnet6") and o.get("underlay_ip6"):
                            ipr.route("replace", dst=o["pod_subnet6"], gateway=o["underlay_ip6"])
