"""One cluster model, whatever the source (a state file or the Kubernetes
API): namespaces, pods, services, nodes, and every other object, kept for
the features that need them (AuthorizationPolicy, EndpointSlices, ...).

Two faces, both built once per state (never per connection):

* the wire objects (dicts), as the source delivered them: ``pod()``,
  ``namespace()``, ``service()``, ``pods``, ``objects``... The state file,
  the kube source and the CNI plugin's pure rule (``agent/enrol/rule.py``,
  stdlib-only) read and write these;
* typed, immutable views with every derived fact in one place:
  ``Pod`` (identity, addresses, node, phase, workload name and metadata),
  ``Namespace``, ``Service`` and the EndpointSlices of a Service:
  ``pod_view()``, ``pod_view_by_ip()``, ``pod_views_on_node()``,
  ``pod_views_in_namespace()``, ``namespace_view()``, ``service_view()``,
  ``service_view_by_ip()``, ``ready_pods_selected_by()``,
  ``endpoint_slices_of()``. Product code reads these; each keeps its wire
  object as ``raw``. Namespace and Service views are built with the state;
  a pod's view on first use (then kept: at most one per pod and state).

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

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from agent.identity.spiffe import IdentityError, WorkloadIdentity, service_account_of, workload_entry_account

# Kubernetes puts an object without metadata.namespace in "default". (The
# CNI plugin's rule, agent/enrol/rule.py, keeps its own copy of the value:
# it must stay stdlib-only; tests/unit/test_state_views.py checks they agree.)
DEFAULT_NAMESPACE = "default"

# Kinds indexed by name; everything else goes to ``others``.
_NAMESPACED_INDEXES = {"Pod": "pods", "Service": "services"}
_CLUSTER_INDEXES = {"Namespace": "namespaces", "Node": "nodes"}

# The label the EndpointSlice controller (and any other manager) puts on a
# slice to say which Service it belongs to.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_DISCOVERY_GROUP = "discovery.k8s.io"

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
    # Typed views of namespaces and services, built with the indexes.
    namespace_views: dict[str, Namespace] = field(default_factory=dict, repr=False)
    service_views: dict[tuple[str, str], Service] = field(default_factory=dict, repr=False)
    _by_ip: dict[str, tuple[str, str]] = field(default_factory=dict, repr=False)
    _slices: dict[tuple[str, str], list[dict]] = field(default_factory=dict, repr=False)
    _service_by_ip: dict[str, Service] = field(default_factory=dict, repr=False)
    # Pod views are made on first use and kept for the life of the state:
    # a kube state of 10,000 pods is rebuilt often (coalesced watch events),
    # and building every view each time would double that work; a view is
    # still made at most once per state, never per connection.
    _pod_views: dict[tuple[str, str], Pod] = field(default_factory=dict, repr=False)
    _all_views: bool = field(default=False, repr=False)
    _in_namespace: dict[str, list[Pod]] = field(default_factory=dict, repr=False)
    _selected: dict[tuple[str, str], list[Pod]] = field(default_factory=dict, repr=False)
    # Istio networking: ServiceEntry and WorkloadEntry views by (namespace,
    # name), built with the state; malformed ones are left out (``errors``).
    service_entry_views: dict[tuple[str, str], ServiceEntry] = field(default_factory=dict, repr=False)
    workload_entry_views: dict[tuple[str, str], WorkloadEntry] = field(default_factory=dict, repr=False)
    # Facts other pure modules derive once per state, keyed by their module
    # (``agent/state/serviceentry.py``: the allocated virtual IPs).
    derived: dict = field(default_factory=dict, repr=False, compare=False)

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
                if kind == "EndpointSlice" and api_group_of(item) == _DISCOVERY_GROUP:
                    service = _dict(item["metadata"].get("labels")).get(SERVICE_NAME_LABEL)
                    if isinstance(service, str):
                        # An omitted namespace means "default", as for the Service itself.
                        state._slices.setdefault((ns or DEFAULT_NAMESPACE, service), []).append(item)
        state._index_views()
        return state

    def _index_views(self) -> None:
        self.namespace_views = {name: Namespace.from_dict(ns) for name, ns in self.namespaces.items()}
        self.service_views = {key: Service.from_dict(svc) for key, svc in self.services.items()}
        for svc in self.service_views.values():
            for ip in svc.cluster_ips:
                self._service_by_ip.setdefault(ip, svc)     # the first Service with an address has it
        self._index_istio_networking()
        # Only pods that own their address: a hostNetwork pod's IP is its
        # node's (shared by every such pod there), and a terminated pod's
        # IP may already belong to another pod. Otherwise the first pod to
        # claim an address keeps it; the clash is recorded.
        for key, pod in self.pods.items():
            if (_dict(pod.get("spec")).get("hostNetwork") is True
                    or _dict(pod.get("status")).get("phase") in _TERMINAL_PHASES):
                continue
            for ip in pod_ips(pod):
                other = self._by_ip.setdefault(ip, key)
                if other != key:
                    self.errors.append(f"Pod {key[0]}/{key[1]}: IP {ip} is already Pod {other[0]}/{other[1]}'s")

    def _index_istio_networking(self) -> None:
        for obj in self.others:
            kind = obj["kind"]
            if kind not in ("ServiceEntry", "WorkloadEntry") or api_group_of(obj) != ISTIO_NETWORKING:
                continue
            meta = obj["metadata"]
            where = f"{kind} {meta.get('namespace') or DEFAULT_NAMESPACE}/{meta['name']}"
            problem = ServiceEntry.problem(obj) if kind == "ServiceEntry" else WorkloadEntry.problem(obj)
            if problem:
                # Ignored, never fatal: one bad entry must not stop routing.
                self.errors.append(f"{where}: {problem} (ignored)")
            elif kind == "ServiceEntry":
                entry = ServiceEntry.from_dict(obj)
                self.service_entry_views[entry.key] = entry
            else:
                workload = WorkloadEntry.from_dict(obj)
                self.workload_entry_views[workload.key] = workload

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
        key = self._by_ip.get(ip)
        return self.pods[key] if key is not None else None

    # -- typed queries -------------------------------------------------------

    def pod_view(self, namespace: str, name: str) -> Pod | None:
        key = (namespace, name)
        view = self._pod_views.get(key)
        if view is None:
            raw = self.pods.get(key)
            if raw is None:
                return None
            view = self._pod_views.setdefault(key, Pod.from_dict(raw))
        return view

    @property
    def pod_views(self) -> dict[tuple[str, str], Pod]:
        """Every pod's view, keyed like ``pods`` and in its order (made on first use)."""
        if not self._all_views:
            self._pod_views = {key: self.pod_view(*key) for key in self.pods}   # type: ignore[misc]
            self._all_views = True
        return self._pod_views

    def pod_view_by_ip(self, ip: str) -> Pod | None:
        """The live, non-hostNetwork pod that owns ``ip``, if any."""
        key = self._by_ip.get(ip)
        return self.pod_view(*key) if key is not None else None

    def pod_views_in_namespace(self, namespace: str) -> list[Pod]:
        """The pods of ``namespace``, sorted by name (made once per state and namespace:
        a Service's selector is matched against them on every connection)."""
        pods = self._in_namespace.get(namespace)
        if pods is None:
            pods = self._in_namespace[namespace] = [
                self.pod_view(*key) for key in sorted(k for k in self.pods if k[0] == namespace)]  # type: ignore[misc]
        return pods

    def ready_pods_selected_by(self, service: Service) -> list[Pod]:
        """The Running pods with an address that ``service``'s selector matches, in its
        namespace, sorted by name; none for a Service without a selector. Made once
        per state and Service (routing asks on every connection)."""
        pods = self._selected.get(service.key)
        if pods is None:
            selector = service.selector
            pods = self._selected[service.key] = [
                p for p in self.pod_views_in_namespace(service.namespace)
                if p.ready and all(p.labels.get(k) == v for k, v in selector.items())] if selector else []
        return pods

    def pod_views_on_node(self, node: str) -> list[Pod]:
        """Pods scheduled to ``node`` (``spec.nodeName``), in input order."""
        return [self.pod_view(*key) for key, p in self.pods.items()   # type: ignore[misc]
                if _dict(p.get("spec")).get("nodeName") == node]

    def namespace_view(self, name: str) -> Namespace | None:
        return self.namespace_views.get(name)

    def service_view(self, namespace: str, name: str) -> Service | None:
        return self.service_views.get((namespace, name))

    def service_view_by_ip(self, ip: str) -> Service | None:
        """The Service with cluster IP ``ip`` (``clusterIP`` or one of ``clusterIPs``), if any."""
        return self._service_by_ip.get(ip)

    def endpoint_slices_of(self, namespace: str, name: str) -> list[dict]:
        """The ``discovery.k8s.io`` EndpointSlices of Service ``namespace/name``
        (same namespace, label ``kubernetes.io/service-name``), in input order."""
        return self._slices.get((namespace, name), [])

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


def _list(value) -> list:
    return value if isinstance(value, list) else []


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


# -- typed views --------------------------------------------------------------
#
# Built from a wire object once, when the state is built; never per
# connection. A field of the wrong type reads as absent, never raises: the
# objects come straight from a state file or the API.

_EMPTY: Mapping[str, str] = MappingProxyType({})
# Read-only by contract: views hand out the wire object's own label and
# annotation maps (a copy or proxy per pod would double a state build).
_NOTHING: dict = {}


def _str(value) -> str:
    return value if isinstance(value, str) else ""


def _frozen_map(value) -> Mapping:
    """A read-only view of ``value`` when it is a mapping, else an empty one."""
    return MappingProxyType(value) if isinstance(value, dict) else _EMPTY


# Istio's rules for a workload's name (pkg/kube/controllers: a pod's
# controller, with the generated suffixes taken off).
# A Job named ``<cronjob>-<8..10 digit schedule time>`` belongs to that CronJob.
_CRONJOB_JOB = re.compile(r"^(.+)-\d{8,10}$")
# The alphabet Kubernetes uses for pod-template-hash (rand.SafeEncodeString).
_TEMPLATE_HASH = re.compile(r"^(.+)-[bcdfghjklmnpqrstvwxz2456789]{5,10}$")
WORKLOAD_NAME_LABEL = "service.istio.io/workload-name"


def _controller(meta: Mapping) -> Mapping | None:
    owners = [o for o in (meta.get("ownerReferences") or []) if isinstance(o, Mapping)]
    for owner in owners:
        if owner.get("controller"):
            return owner
    return owners[0] if owners else None


def _workload_owner(meta: Mapping, labels: Mapping, pod_name: str) -> tuple[str, str]:
    owner = _controller(meta)
    kind, name = ("Pod", pod_name)
    if owner is not None and owner.get("name"):
        kind, name = owner.get("kind") or "Pod", owner["name"]
        if kind == "ReplicaSet":
            template_hash = labels.get("pod-template-hash") or ""
            if template_hash and name.endswith("-" + template_hash):
                kind, name = "Deployment", name[: -len(template_hash) - 1]
            elif not template_hash and (m := _TEMPLATE_HASH.match(name)):
                kind, name = "Deployment", m.group(1)
        elif kind == "Job" and (m := _CRONJOB_JOB.match(name)):
            kind, name = "CronJob", m.group(1)
    override = labels.get(WORKLOAD_NAME_LABEL)
    if override:
        name = override
    return (kind, name)


class Pod(NamedTuple):
    """A Pod with its derived facts. Immutable; ``raw`` is the wire object.

    A named tuple, not a frozen dataclass: a state builds one per pod
    (10,000 pods: ~30 ms for views of frozen dataclasses against ~5 ms).
    Compare pods across states by ``key`` and ``uid``, not with ``==``.
    """

    raw: dict
    namespace: str
    name: str
    uid: str
    labels: Mapping[str, str]           # read-only: the wire object's map
    annotations: Mapping[str, str]      # read-only: the wire object's map
    node_name: str
    host_network: bool
    phase: str
    ips: tuple[str, ...]
    service_account: str
    # Facts derived on first use, at most once per view: identity per trust
    # domain, the workload owner. Private to the methods below.
    derived: dict

    def __repr__(self) -> str:
        return (f"Pod({self.namespace}/{self.name}, uid={self.uid!r}, node={self.node_name!r}, "
                f"phase={self.phase!r}, ips={self.ips!r}, service_account={self.service_account!r})")

    @classmethod
    def from_dict(cls, pod: dict) -> Pod:
        # Runs for every pod of every state (10,000 pods: ~40 ms of a state
        # build), so plain dict lookups, no helpers.
        meta = pod.get("metadata")
        meta = meta if isinstance(meta, dict) else _NOTHING
        spec = pod.get("spec")
        spec = spec if isinstance(spec, dict) else _NOTHING
        status = pod.get("status")
        phase = status.get("phase") if isinstance(status, dict) else None
        ns, name, labels, annotations, node = (meta.get("namespace"), meta.get("name"), meta.get("labels"),
                                               meta.get("annotations"), spec.get("nodeName"))
        return cls(pod, ns if isinstance(ns, str) and ns else DEFAULT_NAMESPACE,
                   name if isinstance(name, str) else "", str(meta.get("uid") or ""),
                   labels if isinstance(labels, dict) else _NOTHING,
                   annotations if isinstance(annotations, dict) else _NOTHING,
                   node if isinstance(node, str) else "", spec.get("hostNetwork") is True,
                   phase if isinstance(phase, str) else "", tuple(pod_ips(pod)), service_account_of(spec), {})

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name): the pod's key in ``ClusterState.pods``."""
        return (self.namespace, self.name)

    @property
    def terminated(self) -> bool:
        """Succeeded or Failed: Kubernetes has released its addresses."""
        return self.phase in _TERMINAL_PHASES

    @property
    def ready(self) -> bool:
        """Running with an address: a Service's selector may pick it."""
        return self.phase == "Running" and bool(self.ips)

    def identity(self, trust_domain: str) -> WorkloadIdentity:
        """The SPIFFE identity the pod runs as: ``spiffe://<td>/ns/<namespace>/sa/<service account>``.

        IdentityError when a name is not a valid Kubernetes name (no CA
        would sign it). Computed once per trust domain.
        """
        memo = self.derived.get(("identity", trust_domain))
        if memo is None:
            try:
                memo = WorkloadIdentity(trust_domain, self.namespace, self.service_account)
            except IdentityError as exc:
                memo = IdentityError(f"pod {self.namespace}/{self.name or '?'}: {exc}")
            self.derived[("identity", trust_domain)] = memo
        if isinstance(memo, IdentityError):
            raise memo
        return memo

    def identity_uri(self, trust_domain: str) -> str:
        """``str(self.identity(trust_domain))``; for a pod whose names no CA
        would sign, the same URI unvalidated (what its peers are told to
        expect: no certificate will ever carry it, so a check against it fails).
        Computed once per trust domain: routing asks on every connection."""
        uri = self.derived.get(("uri", trust_domain))
        if uri is None:
            try:
                uri = self.identity(trust_domain).uri
            except IdentityError:
                uri = f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.service_account}"
            self.derived[("uri", trust_domain)] = uri
        return uri

    def container_port(self, name: object) -> int | None:
        """The number of the container port called ``name`` (first match), if any."""
        for container in _list(_dict(self.raw.get("spec")).get("containers")):
            for p in _list(_dict(container).get("ports")):
                if isinstance(p, dict) and p.get("name") == name and isinstance(p.get("containerPort"), int):
                    return p["containerPort"]
        return None

    @property
    def workload_owner(self) -> tuple[str, str]:
        """``(kind, name)`` of the workload that owns the pod, as Istio derives it.

        * label ``service.istio.io/workload-name`` wins (the owner's kind kept);
        * ReplicaSet ``<name>-<pod-template-hash>`` -> Deployment ``<name>`` (the
          ``pod-template-hash`` label decides; without it, a trailing segment in
          the hash alphabet is taken as the hash);
        * Job ``<name>-<8..10 digits>`` -> CronJob ``<name>``;
        * StatefulSet, DaemonSet, Job, any other controller -> its own name;
        * no owner -> the pod itself.
        """
        owner = self.derived.get("owner")
        if owner is None:
            owner = self.derived["owner"] = _workload_owner(_dict(self.raw.get("metadata")), self.labels,
                                                          _str(_dict(self.raw.get("metadata")).get("name")))
        return owner

    def workload_metadata(self) -> dict:
        """The workload facts HBONE baggage uses, following Istio's label rules:
        the pod is the workload (``workload_kind`` ``pod``). A new dict each call."""
        labels = self.labels
        name = _dict(self.raw.get("metadata")).get("name", "")
        canonical = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
                     or labels.get("app") or name)
        revision = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
                    or labels.get("version") or "latest")
        return {"namespace": self.namespace, "workload_name": name,
                "workload_kind": "pod", "canonical_service": canonical, "canonical_revision": revision}

    def workload_info(self) -> dict:
        """``workload_metadata`` with the workload's name and kind taken from the
        pod's owner (``workload_owner``): what metrics label. A new dict each call."""
        info = self.workload_metadata()
        kind, name = self.workload_owner
        info["workload_name"] = name or info.get("workload_name", "")
        info["workload_kind"] = kind.lower()
        return info


@dataclass(frozen=True, slots=True, eq=False)
class Namespace:
    """A Namespace: its name and labels (enrolment reads them). ``raw`` is the wire object."""

    raw: dict = field(repr=False)
    name: str
    labels: Mapping[str, str] = field(repr=False)
    annotations: Mapping[str, str] = field(repr=False)

    @classmethod
    def from_dict(cls, ns: dict) -> Namespace:
        meta = _dict(ns.get("metadata"))
        return cls(raw=ns, name=_str(meta.get("name")), labels=_frozen_map(meta.get("labels")),
                   annotations=_frozen_map(meta.get("annotations")))


@dataclass(frozen=True, slots=True, eq=False)
class Service:
    """A Service: its addresses, ports and selector. ``raw`` is the wire object."""

    raw: dict = field(repr=False)
    namespace: str
    name: str
    cluster_ips: tuple[str, ...]          # spec.clusterIP, then spec.clusterIPs
    ports: tuple[dict, ...] = field(repr=False)   # spec.ports as written (the route reads them)
    selector: Mapping[str, str] = field(repr=False)

    @classmethod
    def from_dict(cls, svc: dict) -> Service:
        meta, spec = _dict(svc.get("metadata")), _dict(svc.get("spec"))
        ips = [spec.get("clusterIP")] + list(_list(spec.get("clusterIPs")))
        return cls(raw=svc, namespace=_str(meta.get("namespace")) or DEFAULT_NAMESPACE,
                   name=_str(meta.get("name")),
                   cluster_ips=tuple(dict.fromkeys(ip for ip in ips if isinstance(ip, str) and ip)),
                   ports=tuple(p for p in _list(spec.get("ports")) if isinstance(p, dict)),
                   selector=_frozen_map(spec.get("selector")))

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def cluster_ip(self) -> str | None:
        """``spec.clusterIP`` as written (``None`` for ``"None"``-less headless or absent)."""
        value = _dict(self.raw.get("spec")).get("clusterIP")
        return value if isinstance(value, str) else None

    def tcp_port(self, port: int) -> dict | None:
        """The Service port ``port`` for TCP (a UDP port with the same number is another one)."""
        return next((p for p in self.ports if p.get("port") == port and _is_tcp(p)), None)


def _is_tcp(port: Mapping) -> bool:
    # Both Service and EndpointSlice ports default their protocol to TCP.
    return (port.get("protocol") or "TCP") == "TCP"


# -- Istio networking: ServiceEntry, WorkloadEntry -----------------------------
#
# networking.istio.io; Istio serves the same schema as v1, v1beta1 and
# v1alpha3. Unlike the views above, these are validated when the state is
# built (``problem``): an entry that Istio's validation would reject is left
# out with a reason in ``ClusterState.errors``, so routing never meets one.

ISTIO_NETWORKING = "networking.istio.io"
ISTIO_NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")
SE_RESOLUTIONS = ("NONE", "STATIC", "DNS", "DNS_ROUND_ROBIN")
SE_LOCATIONS = ("MESH_EXTERNAL", "MESH_INTERNAL")
# A DNS label (RFC 1123, lower case after normalising), and a host: labels
# joined by dots, optionally after a leading "*." (or "*" alone: any host).
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def normalise_host(name: str) -> str:
    """``Foo.Example.COM.`` -> ``foo.example.com``: how hosts are compared."""
    return name.strip().rstrip(".").lower()


def _host_problem(host) -> str:
    if not isinstance(host, str) or not host:
        return "a host is not a non-empty string"
    name = normalise_host(host)
    if name == "*":
        return ""
    labels = name[2:].split(".") if name.startswith("*.") else name.split(".")
    if len(name) > 253 or not all(_DNS_LABEL.match(label) for label in labels):
        return f"host {host!r} is not a DNS name (or *.<DNS name>)"
    return ""


def _ip_or_cidr(value) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    if not isinstance(value, str):
        return None
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        return None


def _is_ip(value) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _version_problem(obj: dict) -> str:
    version = obj.get("apiVersion")
    if not isinstance(version, str) or version.rpartition("/")[2] not in ISTIO_NETWORKING_VERSIONS:
        return f"apiVersion {version!r} is not {ISTIO_NETWORKING}/{'|'.join(ISTIO_NETWORKING_VERSIONS)}"
    return ""


def _labels_problem(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                              for k, v in value.items()):
        return f"{what} is not a map of strings"
    return ""


def _port_map_problem(value, what: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and 0 < v < 65536
            for k, v in value.items()):
        return f"{what} is not a map of port names to numbers"
    return ""


def _workload_problem(spec: dict, what: str, need_address: bool) -> str:
    """A WorkloadEntry spec, or a ServiceEntry's inline endpoint (the same schema)."""
    address = spec.get("address")
    if address is not None and not isinstance(address, str):
        return f"{what}.address is not a string"
    if need_address and not address:
        return f"{what} has no address"
    if spec.get("network") is not None and not isinstance(spec["network"], str):
        return f"{what}.network is not a string"
    try:
        workload_entry_account(spec)
    except IdentityError as exc:
        return f"{what}: {exc}"
    return (_labels_problem(spec.get("labels"), f"{what}.labels")
            or _port_map_problem(spec.get("ports"), f"{what}.ports"))


class ServicePortSpec(NamedTuple):
    """One ``spec.ports`` entry of a ServiceEntry."""

    number: int
    name: str
    protocol: str
    target_port: int | None


class WorkloadSpec(NamedTuple):
    """A WorkloadEntry's spec, or a ServiceEntry's inline endpoint (same schema)."""

    address: str
    labels: Mapping[str, str]
    service_account: str
    network: str
    ports: Mapping[str, int]


def _workload_spec(spec: dict) -> WorkloadSpec:
    return WorkloadSpec(_str(spec.get("address")), _frozen_map(spec.get("labels")),
                        workload_entry_account(spec), _str(spec.get("network")),
                        _frozen_map(spec.get("ports")))


@dataclass(frozen=True, slots=True, eq=False)
class ServiceEntry:
    """A validated ServiceEntry. ``raw`` is the wire object; hosts are normalised
    (lower case, no trailing dot); ``addresses`` are IPs or CIDRs as written."""

    raw: dict = field(repr=False)
    namespace: str
    name: str
    hosts: tuple[str, ...]
    addresses: tuple[str, ...]
    ports: tuple[ServicePortSpec, ...] = field(repr=False)
    location: str
    resolution: str
    endpoints: tuple[WorkloadSpec, ...] = field(repr=False)
    # None without workloadSelector; {} would select every workload.
    workload_selector: Mapping[str, str] | None = field(repr=False)
    # spec.exportTo as written: "." (its own namespace), "*" (every one), "~"
    # (none) or namespace names; empty means Istio's default, "*".
    export_to: tuple[str, ...] = field(default=(), repr=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @staticmethod
    def problem(obj: dict) -> str:
        """Why Istio would reject ``obj`` (the checks routing relies on), or ``""``."""
        problem = _version_problem(obj)
        if problem:
            return problem
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return "no spec"
        hosts = spec.get("hosts")
        if not isinstance(hosts, list) or not hosts:
            return "spec.hosts is empty or not a list"
        for host in hosts:
            if problem := _host_problem(host):
                return problem
        addresses = spec.get("addresses") or []
        if not isinstance(addresses, list) or not all(_ip_or_cidr(a) for a in addresses):
            return "spec.addresses holds something other than IPs and CIDRs"
        ports = spec.get("ports") or []
        if not isinstance(ports, list):
            return "spec.ports is not a list"
        for p in ports:
            number = _dict(p).get("number")
            if not isinstance(number, int) or isinstance(number, bool) or not 0 < number < 65536:
                return f"port {p!r}: number is not 1..65535"
            target = p.get("targetPort")
            if target is not None and (not isinstance(target, int) or not 0 < target < 65536):
                return f"port {number}: targetPort is not 1..65535"
            if p.get("name") is not None and not isinstance(p["name"], str):
                return f"port {number}: name is not a string"
        resolution = spec.get("resolution", "NONE")
        if resolution not in SE_RESOLUTIONS:
            return f"resolution {resolution!r} is not one of {', '.join(SE_RESOLUTIONS)}"
        location = spec.get("location", "MESH_EXTERNAL")
        if location not in SE_LOCATIONS:
            return f"location {location!r} is not one of {', '.join(SE_LOCATIONS)}"
        endpoints = spec.get("endpoints") or []
        if not isinstance(endpoints, list):
            return "spec.endpoints is not a list"
        export_to = spec.get("exportTo") or []
        if not isinstance(export_to, list) or not all(isinstance(e, str) for e in export_to):
            return "spec.exportTo is not a list of strings"
        for target in export_to:
            if target not in (".", "*", "~") and not _DNS_LABEL.match(target):
                return f"spec.exportTo: {target!r} is not '.', '*', '~' or a namespace name"
        if "~" in export_to and len(export_to) > 1:
            return "spec.exportTo: '~' (visible nowhere) cannot be combined with other entries"
        selector = spec.get("workloadSelector")
        if selector is not None:
            if endpoints:
                return "spec.endpoints and spec.workloadSelector are mutually exclusive"
            if not isinstance(selector, dict) or (problem := _labels_problem(
                    selector.get("labels"), "spec.workloadSelector.labels")):
                return problem or "spec.workloadSelector is not a map"
        for index, endpoint in enumerate(endpoints):
            if not isinstance(endpoint, dict):
                return f"spec.endpoints[{index}] is not a map"
            if problem := _workload_problem(endpoint, f"spec.endpoints[{index}]", need_address=True):
                return problem
            if resolution == "STATIC" and not _is_ip(endpoint["address"]):
                return f"spec.endpoints[{index}]: resolution STATIC needs an IP, not {endpoint['address']!r}"
        return ""

    @classmethod
    def from_dict(cls, obj: dict) -> ServiceEntry:
        """The view of an object that ``problem`` accepted."""
        meta, spec = obj["metadata"], obj["spec"]
        selector = spec.get("workloadSelector")
        return cls(raw=obj, namespace=_str(meta.get("namespace")) or DEFAULT_NAMESPACE, name=meta["name"],
                   hosts=tuple(dict.fromkeys(normalise_host(h) for h in spec["hosts"])),
                   addresses=tuple(spec.get("addresses") or ()),
                   ports=tuple(ServicePortSpec(p["number"], _str(p.get("name")),
                                               (_str(p.get("protocol")) or "TCP").upper(), p.get("targetPort"))
                               for p in spec.get("ports") or ()),
                   location=spec.get("location", "MESH_EXTERNAL"), resolution=spec.get("resolution", "NONE"),
                   endpoints=tuple(_workload_spec(e) for e in spec.get("endpoints") or ()),
                   workload_selector=None if selector is None else _frozen_map(selector.get("labels")),
                   export_to=tuple(spec.get("exportTo") or ()))

    def visible_to(self, namespace: str | None) -> bool:
        """Whether pods of ``namespace`` see this entry (``spec.exportTo``, with
        Istio's default ``defaultServiceExportTo: ["*"]``); ``None`` (no client
        known, e.g. status output) sees every entry."""
        if namespace is None or not self.export_to or "*" in self.export_to:
            return True
        return namespace in self.export_to or ("." in self.export_to and namespace == self.namespace)

    def port(self, number: int) -> ServicePortSpec | None:
        """The entry's port ``number``. Every ServiceEntry protocol rides TCP
        except UDP, which this agent does not route."""
        return next((p for p in self.ports if p.number == number and p.protocol != "UDP"), None)


@dataclass(frozen=True, slots=True, eq=False)
class WorkloadEntry:
    """A validated WorkloadEntry: a VM or other non-pod workload. ``raw`` is the wire object."""

    raw: dict = field(repr=False)
    namespace: str
    name: str
    spec: WorkloadSpec

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    @property
    def address(self) -> str:
        return self.spec.address

    @property
    def labels(self) -> Mapping[str, str]:
        return self.spec.labels

    @property
    def service_account(self) -> str:
        return self.spec.service_account

    @property
    def network(self) -> str:
        return self.spec.network

    @staticmethod
    def problem(obj: dict) -> str:
        problem = _version_problem(obj)
        if problem:
            return problem
        spec = obj.get("spec")
        if not isinstance(spec, dict):
            return "no spec"
        # Istio allows an empty address only with a network (reached through
        # that network's gateway); this agent has no east-west gateway.
        return _workload_problem(spec, "spec", need_address=True)

    @classmethod
    def from_dict(cls, obj: dict) -> WorkloadEntry:
        meta = obj["metadata"]
        return cls(raw=obj, namespace=_str(meta.get("namespace")) or DEFAULT_NAMESPACE, name=meta["name"],
                   spec=_workload_spec(obj["spec"]))


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
        without_timestamps = {
            first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
            for first, resolvers in base.yaml_implicit_resolvers.items()
        }
        _LOADER = type("StateLoader", (base,), {"yaml_implicit_resolvers": without_timestamps})
    return _LOADER
