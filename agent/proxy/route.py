"""Where an outbound connection goes: a pure decision over the cluster state.

* A meshed pod's address: HBONE to that pod's port 15008, expecting its
  identity.
* A Service's cluster IP: one ready endpoint (a Running pod matching the
  selector, with an address), the service port mapped to the target port;
  then as above, meshed or not.
* Anything else: passthrough, plain TCP to the original destination.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from agent.enrol.rule import decide
from agent.state.model import ClusterState, pod_ips


@dataclass(frozen=True)
class Route:
    kind: str               # "hbone", "passthrough" or "no-endpoint"
    ip: str                 # the address to reach (endpoint or original)
    port: int               # the port the application is reached on
    identity: str = ""      # expected SPIFFE identity of the destination (hbone)
    pod: dict | None = None
    service: str = ""       # namespace/name when reached through a Service
    reason: str = ""


def spiffe_id(pod: dict, trust_domain: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    return (f"spiffe://{trust_domain}/ns/{meta.get('namespace') or 'default'}"
            f"/sa/{spec.get('serviceAccountName') or spec.get('serviceAccount') or 'default'}")


def is_meshed(state: ClusterState, pod: dict) -> bool:
    ns = (pod.get("metadata") or {}).get("namespace") or "default"
    return decide(pod, state.namespace(ns)).enrolled


def _pod_route(state: ClusterState, pod: dict, ip: str, port: int, trust_domain: str,
               service: str = "") -> Route:
    if is_meshed(state, pod):
        return Route("hbone", ip, port, spiffe_id(pod, trust_domain), pod, service)
    return Route("passthrough", ip, port, "", pod, service, "destination is not in the mesh")


def _target_port(svc_port: dict, pod: dict) -> int | None:
    target = svc_port.get("targetPort", svc_port.get("port"))
    if isinstance(target, int):
        return target
    if isinstance(target, str) and target.isdigit():
        return int(target)
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == target and isinstance(p.get("containerPort"), int):
                return p["containerPort"]
    return None


def _ready(pod: dict) -> bool:
    status = pod.get("status") or {}
    return status.get("phase") == "Running" and bool(pod_ips(pod))


def resolve(state: ClusterState, ip: str, port: int, trust_domain: str, salt: int = 0) -> Route:
    pod = state.pod_by_ip(ip)
    if pod is not None and not (pod.get("spec") or {}).get("hostNetwork"):
        return _pod_route(state, pod, ip, port, trust_domain)
    for (ns, name), svc in state.services.items():
        spec = svc.get("spec") or {}
        vips = [spec.get("clusterIP")] + list(spec.get("clusterIPs") or [])
        if ip not in vips:
            continue
        svc_port = next((p for p in spec.get("ports") or [] if p.get("port") == port), None)
        if svc_port is None:
            return Route("no-endpoint", ip, port, service=f"{ns}/{name}",
                         reason=f"service {ns}/{name} has no port {port}")
        selector = spec.get("selector") or {}
        candidates = []
        if selector:
            for (pns, _), p in sorted(state.pods.items()):
                labels = (p.get("metadata") or {}).get("labels") or {}
                if pns == ns and _ready(p) and all(labels.get(k) == v for k, v in selector.items()):
                    candidates.append(p)
        if not candidates:
            return Route("no-endpoint", ip, port, service=f"{ns}/{name}",
                         reason=f"service {ns}/{name} has no ready endpoint")
        # Spread connections over endpoints; the salt varies per connection.
        chosen = candidates[zlib.crc32(f"{salt}".encode()) % len(candidates)]
        target = _target_port(svc_port, chosen)
        if target is None:
            return Route("no-endpoint", ip, port, service=f"{ns}/{name}",
                         reason=f"service {ns}/{name}: target port {svc_port.get('targetPort')!r} not found")
        family_v6 = ":" in ip
        addr = next((a for a in pod_ips(chosen) if (":" in a) == family_v6), pod_ips(chosen)[0])
        return _pod_route(state, chosen, addr, target, trust_domain, f"{ns}/{name}")
    return Route("passthrough", ip, port, reason="destination outside the cluster")
