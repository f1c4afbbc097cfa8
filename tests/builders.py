"""Kubernetes objects for the tests, built one way.

The unit tests feed the agent's pure modules (enrolment rule, cluster model,
policy engine, CA rules, routes, metrics labels) the objects the API server
would send. Each field is set only when a test gives it, so a test states
exactly what its object has, and a missing field stays missing (several
tests are about exactly that: no service account, no pod IP yet, no labels).

The lab tests describe their cluster as a manifest (``manifest()``: YAML
text, what ``Lab.up`` reads) made of the same objects; most start from
``MESH``: an ambient namespace with a client pod on node1 and a server pod
on node2.

``lab/kubeapi/objects.py`` builds fuller objects (containers, conditions,
host IP) for the stand-in API server, whose client validates required
fields.
"""

from __future__ import annotations

from collections.abc import Sequence

import yaml

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def pod(name: str, namespace: str, *, node: str | None = None, ips: Sequence[str] = (),
        uid: str | None = None, labels: dict | None = None, annotations: dict | None = None,
        sa: str | None = None, phase: str | None = None, host_network: bool | None = None,
        owners: list | None = None, containers: list | None = None) -> dict:
    """A Pod. ``ips`` become ``status.podIPs`` and, as Kubernetes sets it, ``status.podIP``
    (the first); ``sa`` is ``spec.serviceAccountName``; ``owners`` ``metadata.ownerReferences``."""
    meta: dict = {"name": name, "namespace": namespace}
    for key, value in (("uid", uid), ("labels", labels), ("annotations", annotations),
                       ("ownerReferences", owners)):
        if value is not None:
            meta[key] = value
    spec: dict = {}
    for key, value in (("nodeName", node), ("serviceAccountName", sa), ("hostNetwork", host_network),
                       ("containers", containers)):
        if value is not None:
            spec[key] = value
    obj = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}
    status: dict = {}
    if phase is not None:
        status["phase"] = phase
    if ips:
        status["podIP"] = ips[0]
        status["podIPs"] = [{"ip": ip} for ip in ips]
    if status:
        obj["status"] = status
    return obj


def namespace(name: str, labels: dict | None = None) -> dict:
    meta: dict = {"name": name}
    if labels is not None:
        meta["labels"] = labels
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def object_list(*items: dict, resource_version: str | None = None) -> dict:
    """A ``v1 List``, the shape of a ``file:`` cluster state."""
    out: dict = {"apiVersion": "v1", "kind": "List"}
    if resource_version is not None:
        out["metadata"] = {"resourceVersion": resource_version}
    out["items"] = list(items)
    return out


def service(name: str, namespace: str, *, selector: dict, ports: list[dict]) -> dict:
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": selector, "ports": ports}}


def strict_mtls(namespace: str, name: str = "default") -> dict:
    """A PeerAuthentication requiring mTLS for the namespace."""
    return {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
            "metadata": {"name": name, "namespace": namespace}, "spec": {"mtls": {"mode": "STRICT"}}}


def allow_from(name: str, namespace: str, *, app: str, principal: str, port: str) -> dict:
    """An ALLOW AuthorizationPolicy: ``principal`` may reach pods labelled ``app`` on ``port``."""
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"matchLabels": {"app": app}}, "action": "ALLOW",
                     "rules": [{"from": [{"source": {"principals": [principal]}}],
                                "to": [{"operation": {"ports": [port]}}]}]}}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:      # no &id001 anchors for shared label dicts
        return True


def manifest(*objects: dict) -> str:
    """The objects as one multi-document YAML text, in order (the lab creates pods in that order)."""
    return yaml.dump_all(objects, Dumper=_Dumper, sort_keys=False)


MESH_NAMESPACE = namespace("mesh", AMBIENT)
MESH_CLIENT = pod("client", "mesh", node="node1", sa="client")
MESH_SERVER = pod("server", "mesh", node="node2", sa="server")
MESH = (MESH_NAMESPACE, MESH_CLIENT, MESH_SERVER)
