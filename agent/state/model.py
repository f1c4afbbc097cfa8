"""One cluster model, whatever the source (a lab's state file now, the
Kubernetes API later): namespaces, pods, services, nodes, and every other
object, kept for the features that need them (AuthorizationPolicy,
EndpointSlices, ...).

Pure: built from a list of Kubernetes objects (dicts). The two levels of
damage are treated differently, on purpose:

* a malformed *item* (not an object, no kind, no name) is skipped and
  described in ``ClusterState.errors``; the rest of the cluster stands;
* a malformed *document* (text that does not parse, a top-level value that
  is not a Kubernetes object or List) raises ``StateError``. Reading it as
  an empty cluster would make the agent release every captured pod, so the
  caller must keep its previous state instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from agent.enrol.rule import DEFAULT_NAMESPACE

# Kinds indexed by name; everything else goes to ``others``.
_NAMESPACED_INDEXES = {"Pod": "pods", "Service": "services"}
_CLUSTER_INDEXES = {"Namespace": "namespaces", "Node": "nodes"}

# Terminated pods keep status.podIP in the API, but Kubernetes has released
# the address and may already have given it to a new pod.
_TERMINAL_PHASES = ("Succeeded", "Failed")


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
    # Every accepted item in input order, for kind queries across indexes.
    objects: list[dict] = field(default_factory=list, repr=False)
    errors: list[str] = field(default_factory=list)
    _by_ip: dict[str, dict] = field(default_factory=dict, repr=False)

    @classmethod
    def from_items(cls, items, resource_version: str = "") -> ClusterState:
        """Index ``items``; bad ones are recorded in ``errors``, never raised.

        A later item with the same API group, kind, namespace and name
        replaces an earlier one (the replacement is recorded): a state holds
        one version of each object.
        """
        state = cls(resource_version=str(resource_version or ""))
        if items is None:
            return state
        if isinstance(items, (dict, str, bytes)) or not hasattr(items, "__iter__"):
            state.errors.append(f"items is not a list ({type(items).__name__})")
            return state
        accepted: dict[tuple[str, str, str, str], tuple[int, dict]] = {}
        for index, item in enumerate(items):
            problem = _problem(item)
            if problem:
                state.errors.append(f"item {index}: {problem}")
                continue
            key = _key(item)
            if key in accepted:
                _, kind, ns, name = key
                state.errors.append(f"item {index}: {kind} {ns + '/' if ns else ''}{name} again "
                                    f"(replaces item {accepted[key][0]})")
                del accepted[key]           # the replacement takes the later position
            accepted[key] = (index, item)

        for (_, kind, ns, name), (_, item) in accepted.items():
            state.objects.append(item)
            if kind in _NAMESPACED_INDEXES:
                getattr(state, _NAMESPACED_INDEXES[kind])[(ns, name)] = item
            elif kind in _CLUSTER_INDEXES:
                getattr(state, _CLUSTER_INDEXES[kind])[name] = item
            else:
                state.others.append(item)
        state._index_ips()
        return state

    def _index_ips(self) -> None:
        # Only pods that own their address: a hostNetwork pod's IP is its
        # node's (shared by every such pod there), and a terminated pod's
        # IP may already belong to another pod. Otherwise the first pod to
        # claim an address keeps it; the clash is recorded.
        for (ns, name), pod in self.pods.items():
            if (_dict(pod.get("spec")).get("hostNetwork") is True
                    or _dict(pod.get("status")).get("phase") in _TERMINAL_PHASES):
                continue
            for ip in pod_ips(pod):
                other = self._by_ip.setdefault(ip, pod)
                if other is not pod:
                    meta = other["metadata"]
                    self.errors.append(f"Pod {ns}/{name}: IP {ip} is already "
                                       f"Pod {meta.get('namespace') or DEFAULT_NAMESPACE}/{meta['name']}'s")

    # -- queries -------------------------------------------------------------

    def pod(self, namespace: str, name: str) -> dict | None:
        return self.pods.get((namespace, name))

    def namespace(self, name: str) -> dict | None:
        return self.namespaces.get(name)

    def service(self, namespace: str, name: str) -> dict | None:
        return self.services.get((namespace, name))

    def node(self, name: str) -> dict | None:
        return self.nodes.get(name)

    def pods_on_node(self, node: str) -> list[dict]:
        """Pods scheduled to ``node`` (``spec.nodeName``), in input order."""
        return [p for p in self.pods.values() if _dict(p.get("spec")).get("nodeName") == node]

    def pod_by_ip(self, ip: str) -> dict | None:
        """The live, non-hostNetwork pod that owns ``ip``, if any."""
        return self._by_ip.get(ip)

    def objects_of_kind(self, kind: str, api_group: str | None = None) -> list[dict]:
        """Every object of ``kind``, optionally only of one API group.

        ``api_group`` is the part of ``apiVersion`` before the slash
        (``security.istio.io`` for ``security.istio.io/v1``); the core group
        (``apiVersion: v1``) is ``""``. ``None`` matches any group.
        """
        return [o for o in self.objects
                if o["kind"] == kind and (api_group is None or api_group_of(o) == api_group)]


def _dict(value) -> dict:
    return value if isinstance(value, dict) else {}


def _key(obj: dict) -> tuple[str, str, str, str]:
    """(API group, kind, namespace, name): what makes an object unique."""
    kind, meta = obj["kind"], obj["metadata"]
    if kind in _CLUSTER_INDEXES:
        ns = ""
    elif kind in _NAMESPACED_INDEXES:
        ns = meta.get("namespace") or DEFAULT_NAMESPACE
    else:
        ns = meta.get("namespace") or ""
    return api_group_of(obj), kind, ns, meta["name"]


def _problem(item) -> str:
    """Why ``item`` cannot be indexed, or ``""`` when it can."""
    if not isinstance(item, dict):
        return f"not an object ({type(item).__name__})"
    kind = item.get("kind")
    if not isinstance(kind, str) or not kind:
        return "no kind"
    meta = item.get("metadata")
    if not isinstance(meta, dict):
        return f"{kind} without metadata"
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return f"{kind} without metadata.name"
    ns = meta.get("namespace")
    if ns is not None and not isinstance(ns, str):
        return f"{kind} {name}: metadata.namespace is not a string"
    # The enrolment rule reads labels and annotations; a list there is a
    # broken object, not an unlabelled one.
    for key in ("labels", "annotations"):
        if meta.get(key) is not None and not isinstance(meta[key], dict):
            return f"{kind} {name}: metadata.{key} is not a map"
    return ""


def api_group_of(obj: dict) -> str:
    """``security.istio.io`` for ``apiVersion: security.istio.io/v1``, ``""`` for ``v1``."""
    version = obj.get("apiVersion")
    return version.rpartition("/")[0] if isinstance(version, str) else ""


def pod_ips(pod: dict) -> list[str]:
    """The pod's addresses: ``status.podIPs``, falling back to ``status.podIP``.

    ``podIPs`` is the dual-stack list (its first entry equals ``podIP``);
    older writers set only ``podIP``.
    """
    status = _dict(pod.get("status"))
    ips: list[str] = []
    for entry in status.get("podIPs") or []:
        ip = entry.get("ip") if isinstance(entry, dict) else None
        if isinstance(ip, str) and ip and ip not in ips:
            ips.append(ip)
    if not ips and isinstance(status.get("podIP"), str) and status["podIP"]:
        ips.append(status["podIP"])
    return ips


# -- parsing ------------------------------------------------------------------

def load_state_text(text: str) -> ClusterState:
    """Parse a state document into a ``ClusterState``.

    Accepted: JSON (a ``List`` such as ``kubectl get -o json`` prints, or one
    object) and YAML (one or more documents, each an object or a ``List``).
    JSON is tried first: it is what the lab writes and much cheaper to
    parse; PyYAML is imported only for hand-written state.
    """
    if not text.strip():
        # A reader racing a non-atomic writer (`>` in a shell) sees this;
        # an empty cluster would be the wrong conclusion.
        raise StateError("state is empty (an empty cluster is `kind: List` with no items)")
    try:
        docs = [json.loads(text)]
    except ValueError as json_error:
        docs = _load_yaml(text, json_error)

    items: list = []
    version = ""
    for number, doc in enumerate(docs, 1):
        where = f"document {number}" if len(docs) > 1 else "the state"
        if not isinstance(doc, dict):
            raise StateError(f"{where} is a {type(doc).__name__}, not a Kubernetes object or List")
        kind = doc.get("kind")
        if not isinstance(kind, str) or not kind:
            raise StateError(f"{where} has no kind: not a Kubernetes object or List")
        if kind.endswith("List"):
            # kubectl's `List` and typed lists such as `PodList`
            listed = doc.get("items")
            if listed is None:
                listed = []      # Go encoders write an empty list as null
            if not isinstance(listed, list):
                raise StateError(f"{where}: {kind} without an items array")
            items.extend(listed)
            rv = _dict(doc.get("metadata")).get("resourceVersion")
            if rv is not None:
                version = str(rv)
        else:
            items.append(doc)
    return ClusterState.from_items(items, version)


def _load_yaml(text: str, json_error: ValueError) -> list:
    try:
        import yaml
    except ImportError:
        raise StateError(f"state is not JSON ({json_error}) and PyYAML is not "
                         "installed to read it as YAML") from None
    try:
        return [d for d in yaml.load_all(text, Loader=_yaml_loader(yaml)) if d is not None]
    except yaml.YAMLError as yaml_error:
        detail = " ".join(str(yaml_error).split())
        raise StateError(f"state is neither JSON ({json_error}) nor YAML ({detail})") from None


_LOADER = None


def _yaml_loader(yaml):
    """A safe loader that keeps timestamps as strings.

    PyYAML turns ``creationTimestamp: 2024-01-01T00:00:00Z`` into a datetime;
    Kubernetes objects carry them as strings, and the state must stay
    JSON-serialisable (status replies, the lab rewriting the file).
    """
    global _LOADER
    if _LOADER is None:
        base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        _LOADER = type("StateLoader", (base,), {})
        _LOADER.yaml_implicit_resolvers = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
            for first, resolvers in base.yaml_implicit_resolvers.items()
        }
    return _LOADER
