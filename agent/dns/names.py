"""What a mesh name resolves to, read from the cluster model (pure)."""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from agent.state.model import ClusterState

# Istio's per-pod switch (istio-cni, Istio 1.25): "true" or "false" overrides
# the node's setting for this pod; anything else leaves it (Go's ParseBool).
DNS_CAPTURE_ANNOTATION = "ambient.istio.io/dns-capture"
_TRUE = ("1", "t", "T", "TRUE", "true", "True")
_FALSE = ("0", "f", "F", "FALSE", "false", "False")


def capture_wanted(node_default: bool, annotations: Mapping[str, str] | None) -> bool:
    """Whether a pod's DNS is captured: its annotation if it says, else the node's ``--dns-capture``."""
    value = (annotations or {}).get(DNS_CAPTURE_ANNOTATION)
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    return node_default


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def service_addresses(state: ClusterState, namespace: str, name: str) -> tuple[str, ...] | None:
    """A Service's addresses for DNS: its cluster IPs, or for a headless one
    (``clusterIP: None``) the addresses of its ready pods; None if there is no such Service."""
    svc = state.service_view(namespace, name)
    if svc is None:
        return None
    ips = tuple(ip for ip in svc.cluster_ips if _is_ip(ip))
    if ips:
        return ips
    if svc.cluster_ip == "None" or "None" in svc.cluster_ips:
        return tuple(ip for pod in state.ready_pods_selected_by(svc) for ip in pod.ips)
    return ()
