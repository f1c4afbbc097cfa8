"""HBONE as ztunnel speaks it: the pure, I/O-free decisions.

HBONE is HTTP/2 ``CONNECT`` over mutual TLS 1.3 to port 15008. The client
names the original destination in ``:authority`` (``ip:port``) and sends
``forwarded``, ``baggage`` and ``traceparent``; the server answers 200
(with its own ``baggage``) and the stream then carries the TCP bytes.

Everything here takes and returns plain values so it can be table-tested;
the sockets are in ``agent/proxy/h2conn.py`` and ``agent/proxy/tunnel.py``.
"""

from __future__ import annotations

import ipaddress
import secrets
from dataclasses import dataclass

HBONE_PORT = 15008
ALPN = "h2"

# HTTP/2 settings at least as generous as ztunnel's, and bounded: what a
# peer may have in flight to us is at most these windows.
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
MAX_STREAMS_PER_CONNECTION = 100


@dataclass(frozen=True)
class Refusal:
    """An HBONE request the server turns down, and why (for the log)."""
    status: int
    reason: str


@dataclass(frozen=True)
class ConnectTarget:
    ip: str
    port: int

    @property
    def authority(self) -> str:
        return format_authority(self.ip, self.port)


def format_authority(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def parse_authority(value: str) -> ConnectTarget:
    """``ip:port`` or ``[ip6]:port``; raises ValueError with the reason."""
    if value.startswith("["):
        host, sep, port = value[1:].partition("]:")
        if not sep:
            raise ValueError(f"authority {value!r} is not [ip]:port")
    else:
        host, sep, port = value.rpartition(":")
        if not sep:
            raise ValueError(f"authority {value!r} has no port")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"authority {value!r} does not name an IP address") from None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"authority {value!r} has an invalid port")
    return ConnectTarget(str(ip), int(port))


def _header_map(headers) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers:
        if isinstance(name, bytes):
            name = name.decode("latin-1")
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        out.setdefault(name.lower(), value)
    return out


def check_connect(headers, pod_ips: list[str], agent_ports=frozenset({15001, 15006, 15008})
                  ) -> ConnectTarget | Refusal:
    """Server side: is this stream a CONNECT this pod may serve?"""
    h = _header_map(headers)
    method = h.get(":method", "")
    if method != "CONNECT":
        return Refusal(400, f"method {method or '(none)'} is not CONNECT")
    try:
        target = parse_authority(h.get(":authority", ""))
    except ValueError as exc:
        return Refusal(400, str(exc))
    if target.ip not in pod_ips:
        return Refusal(400, f"authority {target.ip} is not an address of this pod")
    if target.port in agent_ports:
        return Refusal(400, f"port {target.port} belongs to the mesh agent")
    return target


def new_traceparent() -> str:
    """A W3C traceparent for a connection that arrived without one."""
    return f"00-{secrets.token_hex(16)}-{secrets.token_hex(8)}-01"


def baggage(workload: dict | None, cluster: str = "Kubernetes") -> str:
    """ztunnel's baggage value: the workload's cluster, namespace, name, service, version."""
    if not workload:
        return ""
    parts = [f"k8s.cluster.name={cluster}"]
    for key, label in (("namespace", "k8s.namespace.name"), ("workload_kind", None),
                       ("canonical_service", "service.name"), ("canonical_revision", "service.version")):
        if key == "workload_kind":
            kind = workload.get("workload_kind", "pod")
            if workload.get("workload_name"):
                parts.append(f"k8s.{kind}.name={workload['workload_name']}")
            continue
        if workload.get(key):
            parts.append(f"{label}={workload[key]}")
    return ",".join(parts)


def connect_request_headers(target: ConnectTarget, source: tuple[str, int], source_workload: dict | None,
                            traceparent: str | None = None) -> list[tuple[str, str]]:
    """Client side: the CONNECT request for one tunnelled connection."""
    headers = [(":method", "CONNECT"), (":authority", target.authority),
               ("forwarded", f'for="{format_authority(*source)}"'),
               ("traceparent", traceparent or new_traceparent())]
    bag = baggage(source_workload)
    if bag:
        headers.append(("baggage", bag))
    return headers


def response_status(headers) -> int:
    try:
        return int(_header_map(headers).get(":status", "0"))
    except ValueError:
        return 0


def workload_metadata(pod: dict | None) -> dict:
    """The workload facts baggage and metrics use, following Istio's label rules."""
    if not pod:
        return {}
    meta = pod.get("metadata") or {}
    labels = meta.get("labels") or {}
    name = meta.get("name", "")
    canonical = (labels.get("service.istio.io/canonical-name") or labels.get("app.kubernetes.io/name")
                 or labels.get("app") or name)
    revision = (labels.get("service.istio.io/canonical-revision") or labels.get("app.kubernetes.io/version")
                or labels.get("version") or "latest")
    return {"namespace": meta.get("namespace") or "default", "workload_name": name,
            "workload_kind": "pod", "canonical_service": canonical, "canonical_revision": revision}
