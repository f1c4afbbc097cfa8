"""Where an outbound connection goes: a pure decision over the cluster state.

* A meshed pod's address: HBONE to that pod's port 15008, expecting its
  identity.
* A Service's cluster IP: one ready endpoint, the service port mapped to the
  endpoint's port; then as above, meshed or not. The endpoints come from
  the Service's EndpointSlices when it has any (what a real cluster
  provides, and all kube-proxy looks at); otherwise from the Pods its
  selector matches (Running, with an address), for states without slices.
* An address of a ServiceEntry (``spec.addresses`` or an auto-allocated
  virtual IP, ``agent/state/serviceentry.py``): ``resolution: STATIC``
  picks one of its endpoints (inline ``endpoints``, or the Pods and
  WorkloadEntries its ``workloadSelector`` matches), over HBONE when that
  endpoint is meshed; ``DNS`` and ``NONE`` pass through to the original
  destination. Only entries exported to the client's namespace count
  (``spec.exportTo``). The route names the entry and the host as its service.
* Anything else: passthrough, plain TCP to the original destination.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

from agent.enrol.rule import DATAPLANE_MODE_LABEL, MODE_AMBIENT, decide
from agent.identity.spiffe import IdentityError, WorkloadIdentity
from agent.state import serviceentry
from agent.state.model import ClusterState, Pod, Service, ServiceEntry, WorkloadSpec


@dataclass(frozen=True)
class Route:
    kind: str               # "hbone", "passthrough" or "no-endpoint"
    ip: str                 # the address to reach (endpoint or original)
    port: int               # the port the application is reached on
    # The destination's SPIFFE ID (``Pod.identity_uri``; hbone): the URI the
    # data path compares with the server certificate's SAN.
    identity: str = ""
    pod: Pod | None = None
    service: str = ""       # namespace/name when reached through a Service or ServiceEntry
    reason: str = ""
    # A ServiceEntry's host the connection was for (its ``destination_service``,
    # and the ``Forwarded: host=`` the destination reports); "" for a Service,
    # whose hostname is ``name.namespace.svc.<domain>``.
    service_host: str = ""


def is_meshed(state: ClusterState, pod: Pod) -> bool:
    # The enrolment rule reads wire objects (the CNI plugin shares it).
    return decide(pod.raw, state.namespace(pod.namespace)).enrolled


def _pod_route(state: ClusterState, pod: Pod, ip: str, port: int, trust_domain: str,
               service: str = "") -> Route:
    if is_meshed(state, pod):
        return Route("hbone", ip, port, pod.identity_uri(trust_domain), pod, service)
    return Route("passthrough", ip, port, "", pod, service, "destination is not in the mesh")


def _target_port(svc_port: dict, pod: Pod) -> int | None:
    target = svc_port.get("targetPort", svc_port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    return pod.container_port(target)


def _is_tcp(port: dict) -> bool:
    # Both Service and EndpointSlice ports default their protocol to TCP.
    return (port.get("protocol") or "TCP") == "TCP"


def _pick(candidates: list, salt: int):
    # Spread connections over endpoints; the salt varies per connection.
    return candidates[zlib.crc32(f"{salt}".encode()) % len(candidates)]


# -- endpoints from EndpointSlices ---------------------------------------------

# Slices come straight from a state file or the API: a field of the wrong
# type must read as absent, never raise in the middle of a connection.

def _dicts(value) -> list[dict]:
    """The mappings in ``value`` when it is a list, else none."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _strings(value) -> list[str]:
    """The non-empty strings in ``value`` when it is a list, else none."""
    return [v for v in value if isinstance(v, str) and v] if isinstance(value, list) else []


def _mapping(value) -> dict:
    return value if isinstance(value, dict) else {}


def _slice_port(eps: dict, svc_port: dict) -> int | None:
    """The endpoint port that serves ``svc_port`` in this slice, if any.

    The controller names each slice port after the service port it serves
    (a single-port Service may leave both unnamed), so names, not numbers,
    tie the two together: the number is the resolved targetPort, which may
    differ from slice to slice while a named targetPort changes in a rollout.
    The connection being routed is TCP, so UDP and SCTP ports never serve it.
    """
    wanted = svc_port.get("name") or ""
    for p in _dicts(eps.get("ports")):
        number = p.get("port")
        # A slice port without a number means "all ports"; only headless,
        # port-less Services use that, and they have no cluster IP to route.
        if ((p.get("name") or "") == wanted and _is_tcp(p)
                and isinstance(number, int) and 0 < number < 65536):
            return number
    return None


def _endpoint_ready(endpoint: dict) -> bool:
    # The API documents an absent `ready` as true. `serving` and
    # `terminating` are not consulted: a terminating endpoint is never
    # `ready`, and falling back to serving-but-terminating endpoints when
    # nothing is ready (what kube-proxy does) is not implemented yet.
    return _mapping(endpoint.get("conditions")).get("ready") is not False


def _endpoint_pod(state: ClusterState, endpoint: dict, address: str, ns: str) -> Pod | None:
    """The pod behind an endpoint address: its targetRef, else whoever owns the address.

    The pod decides HBONE or plain TCP, and which identity to expect. A
    targetRef is believed only while that pod still holds the address: a
    slice can lag a pod restart, and the identity that answers is the one
    of the pod that owns the address now. Endpoints of pods on other nodes
    are found too (``nodeName`` is not needed: the state is cluster-wide).
    """
    ref = _mapping(endpoint.get("targetRef"))
    if ref.get("kind") == "Pod" and isinstance(ref.get("name"), str):
        pod = state.pod_view(ref.get("namespace") or ns, ref["name"])
        if pod is not None and address in pod.ips:
            return pod
    return state.pod_view_by_ip(address)


def _slice_route(state: ClusterState, ns: str, slices: list[dict], ip: str, svc_port: dict,
                 trust_domain: str, salt: int, service: str) -> Route:
    # kube-proxy programs each family from the slices of that family: an
    # IPv6 cluster IP leads to IPv6 endpoints. FQDN slices carry names, not
    # addresses, and never match.
    family = "IPv6" if ":" in ip else "IPv4"
    candidates: dict[tuple[str, int], dict] = {}
    ready_without_port = False
    for s in slices:
        if s.get("addressType") != family:
            continue
        port = _slice_port(s, svc_port)
        for endpoint in _dicts(s.get("endpoints")):
            addresses = _strings(endpoint.get("addresses"))
            if not addresses or not _endpoint_ready(endpoint):
                continue
            if port is None:
                ready_without_port = True
                continue
            # The addresses of one endpoint are fungible, and the API lets
            # consumers use only the first (kubernetes/kubernetes#106267).
            # Keyed by address and port, an endpoint listed by two slices
            # (as happens while the controller moves it) counts once.
            candidates.setdefault((addresses[0], port), endpoint)
    if not candidates:
        if ready_without_port:
            reason = (f"service {service}: no TCP endpoint port named "
                      f"{svc_port.get('name') or '(unnamed)'!r}")
        else:
            reason = f"service {service} has no ready {family} endpoint"
        return Route("no-endpoint", ip, svc_port["port"], service=service, reason=reason)
    # Sorted, so the choice depends on the salt alone, not on slice order.
    (address, port), endpoint = _pick(sorted(candidates.items(), key=lambda c: c[0]), salt)
    pod = _endpoint_pod(state, endpoint, address, ns)
    if pod is None:
        # Not a pod we know (an external backend, a VM, a pod the state has
        # not caught up with): it cannot speak HBONE as far as we know.
        return Route("passthrough", address, port, service=service,
                     reason="endpoint is not a known pod")
    return _pod_route(state, pod, address, port, trust_domain, service)


# -- endpoints from the selector ------------------------------------------------

def _selector_route(state: ClusterState, svc: Service, ip: str, svc_port: dict,
                    trust_domain: str, salt: int, service: str) -> Route:
    port = svc_port["port"]
    candidates = state.ready_pods_selected_by(svc)
    if not candidates:
        return Route("no-endpoint", ip, port, service=service,
                     reason=f"service {service} has no ready endpoint")
    chosen = _pick(candidates, salt)
    target = _target_port(svc_port, chosen)
    if target is None:
        return Route("no-endpoint", ip, port, service=service,
                     reason=f"service {service}: target port {svc_port.get('targetPort')!r} not found")
    family_v6 = ":" in ip
    addr = next((a for a in chosen.ips if (":" in a) == family_v6), chosen.ips[0])
    return _pod_route(state, chosen, addr, target, trust_domain, service)


# -- ServiceEntry destinations ---------------------------------------------------

def workload_meshed(spec: WorkloadSpec) -> bool:
    """A WorkloadEntry (or inline endpoint) speaks HBONE when it runs as a service
    account and carries the ambient label (``istio.io/dataplane-mode=ambient``)."""
    return bool(spec.service_account) and spec.labels.get(DATAPLANE_MODE_LABEL) == MODE_AMBIENT


def _workload_uri(trust_domain: str, namespace: str, service_account: str) -> str:
    try:
        return WorkloadIdentity(trust_domain, namespace, service_account).uri
    except IdentityError:        # no certificate will carry it: the check fails, as for pods
        return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _entry_candidates(state: ClusterState, entry: ServiceEntry,
                      v6: bool) -> list[tuple[str, WorkloadSpec | None, Pod | None]]:
    """(address, WorkloadSpec or None, Pod or None) for each endpoint of a STATIC entry."""
    out: list[tuple[str, WorkloadSpec | None, Pod | None]] = []
    if entry.workload_selector is None:
        for spec in entry.endpoints:
            out.append((spec.address, spec, None))
        return out
    selector = entry.workload_selector
    for pod in state.pod_views_in_namespace(entry.namespace):
        if pod.ready and all(pod.labels.get(k) == v for k, v in selector.items()):
            out.append((next((a for a in pod.ips if (":" in a) == v6), pod.ips[0]), None, pod))
    for (ns, _), we in sorted(state.workload_entry_views.items()):
        if ns == entry.namespace and all(we.labels.get(k) == v for k, v in selector.items()):
            out.append((we.address, we.spec, None))
    return out


def _service_entry_route(state: ClusterState, entry: ServiceEntry, host: str, ip: str, port: int,
                         trust_domain: str, salt: int) -> Route:
    # Like istiod's services for ztunnel: a ServiceEntry host is a service
    # named after the entry, in its namespace, with the host as its hostname.
    return replace(_entry_route(state, entry, host, ip, port, trust_domain, salt),
                   service=f"{entry.namespace}/{entry.name}", service_host=host)


def _entry_route(state: ClusterState, entry: ServiceEntry, host: str, ip: str, port: int,
                 trust_domain: str, salt: int) -> Route:
    where = f"ServiceEntry {entry.namespace}/{entry.name} ({host})"
    if entry.resolution != "STATIC":
        # DNS: the application resolved the host itself (the DNS proxy does not
        # answer for these) and connected to the real address; NONE: the same.
        return Route("passthrough", ip, port, reason=f"{where}: resolution {entry.resolution}")
    se_port = entry.port(port)
    if se_port is None and entry.ports:
        return Route("no-endpoint", ip, port, reason=f"{where} has no TCP port {port}")
    candidates = _entry_candidates(state, entry, ":" in ip)
    if not candidates:
        return Route("no-endpoint", ip, port, reason=f"{where} has no endpoint")
    # Sorted, so the choice depends on the salt alone, not on input order.
    address, spec, pod = _pick(sorted(candidates, key=lambda c: c[0]), salt)
    # Istio: the endpoint's port named like the service port, else targetPort, else the port.
    target = port
    if se_port is not None:
        target = (spec.ports.get(se_port.name) if spec is not None and se_port.name else None) \
            or se_port.target_port or port
    if spec is not None and workload_meshed(spec):
        return Route("hbone", address, target, _workload_uri(trust_domain, entry.namespace, spec.service_account),
                     reason=where)
    pod = pod or state.pod_view_by_ip(address)
    if pod is not None:
        return _pod_route(state, pod, address, target, trust_domain)
    return Route("passthrough", address, target, reason=f"{where}: endpoint is not in the mesh")


def resolve(state: ClusterState, ip: str, port: int, trust_domain: str, salt: int = 0,
            namespace: str | None = None) -> Route:
    """Where a connection to ``ip:port`` goes. ``namespace``: the client pod's,
    for ServiceEntry visibility (``exportTo``); None sees every entry."""
    pod = state.pod_view_by_ip(ip)      # never a hostNetwork pod: they share the node's address
    if pod is not None:
        return _pod_route(state, pod, ip, port, trust_domain)
    svc = state.service_view_by_ip(ip)
    if svc is not None:
        ns, name = svc.key
        service = f"{ns}/{name}"
        # The connection is TCP: a UDP port with the same number (DNS's 53)
        # is another service port, served by other endpoint ports.
        svc_port = svc.tcp_port(port)
        if svc_port is None:
            return Route("no-endpoint", ip, port, service=service,
                         reason=f"service {service} has no TCP port {port}")
        # Like kube-proxy: once a Service has slices they are the whole
        # truth (they also cover selector-less Services and endpoints that
        # are not pods); the selector is the fallback for states without.
        slices = state.endpoint_slices_of(ns, name)
        if slices:
            return _slice_route(state, ns, slices, ip, svc_port, trust_domain, salt, service)
        return _selector_route(state, svc, ip, svc_port, trust_domain, salt, service)
    entry = serviceentry.entry_for_ip(state, ip, namespace)
    if entry is not None:
        return _service_entry_route(state, *entry, ip, port, trust_domain, salt)
    return Route("passthrough", ip, port, reason="destination outside the cluster")
