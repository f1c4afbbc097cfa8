"""Which Service an inbound connection was for, as ztunnel decides it (pure).

The destination reporter of ``istio_tcp_*`` names a Service only when it
can tell which one the client meant. ztunnel's rule (``guess_inbound_service``
in ``src/proxy.rs``, called from ``src/proxy/inbound.rs`` for HBONE and
``src/proxy/inbound_passthrough.rs`` for plaintext; read at istio/ztunnel
62d8265):

1. The candidates are the Services of the destination workload, as istiod
   lists them (``pilot/pkg/serviceregistry/ambient/workloads.go``): Services
   of the pod's namespace whose non-empty selector matches the pod's labels,
   plus selector-less Services whose EndpointSlices reference the pod
   (a Pod ``targetRef``), plus the hosts of ServiceEntries of the pod's
   namespace whose ``workloadSelector`` selects it (istiod makes one
   service per host, named after the entry, with the host as hostname).
2. If the client's proxy said which Service it addressed (the ``host=``
   parameter of the HBONE request's ``Forwarded`` header, which ztunnel's
   outbound side sets to the Service's hostname), and that hostname is one
   of the candidates, that Service. A name outside the candidates is
   ignored: a client cannot make the destination report a Service that does
   not front it.
3. Else the candidate with a port whose target port is the connection's
   destination port (a numeric ``targetPort``, or a named one resolved
   against the pod's container ports; for selector-less Services the
   EndpointSlice's port for this pod).
4. Else none: the labels stay ``unknown``.

One deliberate difference: when several candidates match in step 3,
ztunnel takes the first in its list, whose order comes from a protobuf map
(``Workload.services``) and so is arbitrary. This rule then answers
``None`` (``unknown``), never a guess that could change between restarts.
A connection that named its Service (step 2) is never ambiguous.
"""

from __future__ import annotations

from agent.state.model import ClusterState

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
_DISCOVERY_GROUP = "discovery.k8s.io"
_DEFAULT_NAMESPACE = "default"


def service_hostname(namespace: str, name: str, domain: str) -> str:
    """``name.namespace.svc.domain``: what Istio puts in ``destination_service``."""
    return f"{name}.{namespace}.svc.{domain}"


# -- the Forwarded header's host parameter (RFC 7239) ------------------------

def forwarded_host(value: str) -> str:
    """The ``host=`` parameter of a ``Forwarded`` value, unquoted; "" if none.

    Like ztunnel's ``parse_forwarded_host``: only ASCII values, the first
    ``host=`` element wins, surrounding quotes are dropped.
    """
    if not value or not value.isascii():
        return ""
    for part in value.split(";"):
        part = part.strip()
        if part.lower().startswith("host="):
            return part[5:].strip('"')
    return ""


def forwarded_with_host(value: str, host: str) -> str:
    """``value`` (``for="ip:port"``) with ``;host=<host>`` added, as ztunnel's
    ``build_forwarded`` writes it; unchanged when ``host`` is empty or the
    value already names a host."""
    if not host or forwarded_host(value):
        return value
    return f"{value};host={host}" if value else f"host={host}"


# -- candidates ----------------------------------------------------------------

def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _list(value) -> list:
    return value if isinstance(value, list) else []


def _is_tcp(port: dict) -> bool:
    return (port.get("protocol") or "TCP") == "TCP"


def _container_port(pod: dict, name: str) -> int | None:
    for container in _list(_mapping(pod.get("spec")).get("containers")):
        for p in _list(_mapping(container).get("ports")):
            p = _mapping(p)
            if p.get("name") == name and _is_tcp(p) and isinstance(p.get("containerPort"), int):
                return p["containerPort"]
    return None


def _selector_target_ports(svc: dict, pod: dict) -> set[int]:
    """The pod ports a selector Service's TCP ports send to (named ones resolved on this pod)."""
    ports: set[int] = set()
    for port in _list(_mapping(svc.get("spec")).get("ports")):
        port = _mapping(port)
        if not _is_tcp(port):
            continue
        target = port.get("targetPort", port.get("port"))   # the API defaults targetPort to port
        if isinstance(target, str) and target.isdigit():
            target = int(target)
        if isinstance(target, str):
            target = _container_port(pod, target)
        if isinstance(target, int) and not isinstance(target, bool) and 0 < target < 65536:
            ports.add(target)
    return ports


def _references(endpoint: dict, pod: dict, ns: str, name: str | None, slice_ns: str) -> bool:
    """Does a slice endpoint stand for ``pod``? As istiod's ``endpointSliceAddressIndex``:
    only by a Pod targetRef (an endpoint without one is never a pod's). An omitted
    targetRef namespace is the slice's, an omitted uid matches any."""
    ref = _mapping(endpoint.get("targetRef"))
    uid = _mapping(pod.get("metadata")).get("uid")
    return (ref.get("kind") == "Pod" and ref.get("name") == name
            and (ref.get("namespace") or slice_ns) == ns
            and (not ref.get("uid") or not uid or ref.get("uid") == uid))


def _slice_ports(state: ClusterState, pod: dict) -> dict[tuple[str, str], set[int]]:
    """Service (namespace, name) -> TCP ports of the EndpointSlices that reference ``pod``."""
    meta = _mapping(pod.get("metadata"))
    ns, name = meta.get("namespace") or _DEFAULT_NAMESPACE, meta.get("name")
    found: dict[tuple[str, str], set[int]] = {}
    for s in state.objects_of_kind("EndpointSlice", _DISCOVERY_GROUP):
        smeta = _mapping(s.get("metadata"))
        svc_name = _mapping(smeta.get("labels")).get(SERVICE_NAME_LABEL)
        if not isinstance(svc_name, str) or not svc_name or s.get("addressType") == "FQDN":
            continue
        slice_ns = smeta.get("namespace") or _DEFAULT_NAMESPACE
        if not any(_references(_mapping(e), pod, ns, name, slice_ns) for e in _list(s.get("endpoints"))):
            continue
        ports = found.setdefault((slice_ns, svc_name), set())
        for p in _list(s.get("ports")):
            p = _mapping(p)
            if _is_tcp(p) and isinstance(p.get("port"), int) and 0 < p["port"] < 65536:
                ports.add(p["port"])
    return found


def candidate_services(state: ClusterState, pod: dict) -> dict[tuple[str, str], set[int]]:
    """The Services of ``pod`` (istiod's list for its workload): (namespace, name) -> target ports."""
    meta = _mapping(pod.get("metadata"))
    ns = meta.get("namespace") or _DEFAULT_NAMESPACE
    labels = _mapping(meta.get("labels"))
    out: dict[tuple[str, str], set[int]] = {}
    for (svc_ns, svc_name), svc in state.services.items():
        selector = _mapping(_mapping(svc.get("spec")).get("selector"))
        if svc_ns == ns and selector and all(labels.get(k) == v for k, v in selector.items()):
            out[(svc_ns, svc_name)] = _selector_target_ports(svc, pod)
    for key, ports in _slice_ports(state, pod).items():
        service = state.services.get(key)
        # Selector Services are matched above (their slices only repeat it);
        # a slice whose Service is unknown names nothing we can report.
        if service is not None and key not in out and not _mapping(_mapping(service.get("spec")).get("selector")):
            out[key] = ports
    return out


# -- the rule --------------------------------------------------------------------

def entry_candidates(state: ClusterState, pod: dict) -> dict[tuple[str, str, str], set[int]]:
    """The ServiceEntry hosts of ``pod`` (istiod lists them among its workload's
    services): (namespace, name, host) -> target ports, for each entry of the
    pod's namespace whose ``workloadSelector`` selects it."""
    meta = _mapping(pod.get("metadata"))
    ns = meta.get("namespace") or _DEFAULT_NAMESPACE
    labels = _mapping(meta.get("labels"))
    out: dict[tuple[str, str, str], set[int]] = {}
    for (entry_ns, name), entry in sorted(state.service_entry_views.items()):
        selector = entry.workload_selector
        if entry_ns != ns or selector is None or not all(labels.get(k) == v for k, v in selector.items()):
            continue
        ports = {p.target_port or p.number for p in entry.ports if p.protocol != "UDP"}
        for host in entry.hosts:
            out[(entry_ns, name, host)] = ports
    return out


def inbound_service(state: ClusterState, pod: dict | None, port: int, host: str = "",
                    domain: str = "cluster.local") -> tuple[str, str] | None:
    """The service an inbound connection to ``pod:port`` was for, or None:
    ``("namespace/name", "")`` for a Service, ``("namespace/name", host)`` for
    a ServiceEntry host (the metrics' ``service`` and ``service_host``).

    ``host``: the service hostname the client's proxy named (``forwarded_host``
    of the HBONE request's ``Forwarded`` header; "" for plaintext).
    ``domain``: the cluster's DNS domain, for comparing hostnames.
    """
    if not pod:
        return None
    services = candidate_services(state, pod)
    entries = entry_candidates(state, pod)
    if host:
        for ns, name in services:
            if service_hostname(ns, name, domain) == host:
                return f"{ns}/{name}", ""
        for ns, name, entry_host in entries:
            if entry_host == host:
                return f"{ns}/{name}", entry_host
    found = [(f"{ns}/{name}", "") for (ns, name), ports in sorted(services.items()) if port in ports]
    found += [(f"{ns}/{name}", h) for (ns, name, h), ports in entries.items() if port in ports]
    return found[0] if len(found) == 1 else None
