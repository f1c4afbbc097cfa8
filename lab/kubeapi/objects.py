"""Realistic Kubernetes objects for tests (the official client validates required fields)."""

from __future__ import annotations


def pod(name: str, namespace: str = "default", *, node: str = "node-a", ip: str | None = "10.244.0.5",
        labels: dict | None = None, annotations: dict | None = None, phase: str = "Running",
        service_account: str = "default") -> dict:
    status: dict = {"phase": phase, "hostIP": "172.18.0.2",
                    "conditions": [{"type": "Ready", "status": "True"}]}
    if ip:
        status["podIP"], status["podIPs"] = ip, [{"ip": ip}]
    meta: dict = {"name": name, "namespace": namespace, "labels": dict(labels or {"app": name})}
    if annotations:
        meta["annotations"] = dict(annotations)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": node, "serviceAccountName": service_account,
                     "containers": [{"name": "app", "image": "registry.example/app:1.0",
                                     "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]},
            "status": status}


def namespace(name: str, labels: dict | None = None) -> dict:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name, **(labels or {})}},
            "spec": {"finalizers": ["kubernetes"]}, "status": {"phase": "Active"}}


def service(name: str, namespace: str = "default", *, cluster_ip: str = "10.96.0.10",
            selector: dict | None = None, port: int = 80, target_port: int = 8080) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP",
                     "selector": dict(selector or {"app": name}),
                     "ports": [{"name": "http", "port": port, "targetPort": target_port, "protocol": "TCP"}]}}


def node(name: str, ip: str = "172.18.0.2") -> dict:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def endpointslice(name: str, namespace: str, service_name: str, ips: list[str], port: int = 8080) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {"kubernetes.io/service-name": service_name}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": True}} for ip in ips],
            "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}


def authorization_policy(name: str, namespace: str, *, version: str = "v1", action: str = "ALLOW",
                         principals: list[str] | None = None) -> dict:
    rules = [{"from": [{"source": {"principals": principals}}]}] if principals else []
    return {"apiVersion": f"security.istio.io/{version}", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"action": action, "rules": rules}}


def peer_authentication(name: str, namespace: str, *, version: str = "v1", mode: str = "STRICT") -> dict:
    return {"apiVersion": f"security.istio.io/{version}", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"mtls": {"mode": mode}}}


def service_entry(name: str, namespace: str, hosts: list[str], *, version: str = "v1",
                  resolution: str = "STATIC", ports: list[dict] | None = None, **spec) -> dict:
    return {"apiVersion": f"networking.istio.io/{version}", "kind": "ServiceEntry",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"hosts": hosts, "resolution": resolution,
                     "ports": ports if ports is not None else [{"number": 80, "name": "http", "protocol": "TCP"}],
                     **spec}}


def workload_entry(name: str, namespace: str, address: str, *, version: str = "v1", **spec) -> dict:
    return {"apiVersion": f"networking.istio.io/{version}", "kind": "WorkloadEntry",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"address": address, **spec}}
