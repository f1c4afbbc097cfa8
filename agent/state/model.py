"""One cluster model, whatever the source (a lab's state file now, the
Kubernetes API later): namespaces, pods, services, nodes, and every other
object kept for the features that need them (policies, EndpointSlices).

Pure: built from a list of Kubernetes objects (dicts). A malformed item is
recorded in ``errors`` and skipped; it never fails the whole state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field


class StateError(ValueError):
    """The cluster state could not be read (the message says why)."""


@dataclass
class ClusterState:
    resource_version: str = ""
    namespaces: dict[str, dict] = field(default_factory=dict)
    pods: dict[tuple[str, str], dict] = field(default_factory=dict)
    services: dict[tuple[str, str], dict] = field(default_factory=dict)
    nodes: dict[str, dict] = field(default_factory=dict)
    others: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _by_ip: dict[str, dict] = field(default_factory=dict, repr=False)

    @classmethod
    def from_items(cls, items, resource_version: str = "") -> "ClusterState":
        state = cls(resource_version=str(resource_version or ""))
        for index, item in enumerate(items or []):
            problem = _problem(item)
            if problem:
                state.errors.append(f"item {index}: {problem}")
                continue
            kind = item["kind"]
            meta = item["metadata"]
            name = meta["name"]
            if kind == "Namespace":
                state.namespaces[name] = item
            elif kind == "Node":
                state.nodes[name] = item
            elif kind == "Pod":
                ns = meta.get("namespace") or "default"
                state.pods[(ns, name)] = item
                for ip in pod_ips(item):
                    state._by_ip[ip] = item
            elif kind == "Service":
                state.services[(meta.get("namespace") or "default", name)] = item
            else:
                state.others.append(item)
        return state

    def pod(self, namespace: str, name: str) -> dict | None:
        return self.pods.get((namespace, name))

    def namespace(self, name: str) -> dict | None:
        return self.namespaces.get(name)

    def service(self, namespace: str, name: str) -> dict | None:
        return self.services.get((namespace, name))

    def pods_on_node(self, node: str) -> list[dict]:
        return [p for p in self.pods.values() if (p.get("spec") or {}).get("nodeName") == node]

    def pod_by_ip(self, ip: str) -> dict | None:
        return self._by_ip.get(ip)

    def objects_of_kind(self, kind: str, api_group: str | None = None) -> list[dict]:
        """Other objects of a kind, optionally of one API group (``security.istio.io``)."""
        out = []
        for obj in self.others:
            if obj.get("kind") != kind:
                continue
            if api_group is not None and str(obj.get("apiVersion", "")).split("/")[0] != api_group:
                continue
            out.append(obj)
        return out


def _problem(item) -> str:
    if not isinstance(item, dict):
        return f"not an object but {type(item).__name__}"
    if not isinstance(item.get("kind"), str) or not item["kind"]:
        return "no kind"
    meta = item.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str) or not meta["name"]:
        return f"{item['kind']} without metadata.name"
    for key in ("labels", "annotations"):
        if key in meta and meta[key] is not None and not isinstance(meta[key], dict):
            return f"{item['kind']} {meta['name']}: metadata.{key} is not a map"
    return ""


def pod_ips(pod: dict) -> list[str]:
    """The pod's addresses: status.podIPs, falling back to status.podIP."""
    status = pod.get("status") if isinstance(pod.get("status"), dict) else {}
    ips = [e.get("ip") for e in status.get("podIPs") or [] if isinstance(e, dict) and e.get("ip")]
    if not ips and status.get("podIP"):
        ips = [status["podIP"]]
    return ips


def load_state_text(text: str) -> ClusterState:
    """Parse a state document: JSON (a List or one object) or YAML (multi-document or a List)."""
    try:
        docs = [json.loads(text)]
    except ValueError:
        try:
            import yaml   # only for hand-written state: JSON is the fast path
            docs = [d for d in yaml.safe_load_all(text) if d is not None]
        except yaml.YAMLError as exc:
            raise StateError(f"state is neither JSON nor YAML: {exc}") from None
    items: list = []
    version = ""
    for doc in docs:
        if isinstance(doc, dict) and str(doc.get("kind", "")).endswith("List"):
            # kubectl's List and typed lists such as PodList
            if not isinstance(doc.get("items"), list):
                raise StateError(f"a {doc['kind']} without an items array")
            items.extend(doc["items"])
            version = str((doc.get("metadata") or {}).get("resourceVersion", version))
        else:
            items.append(doc)
    return ClusterState.from_items(items, version)
