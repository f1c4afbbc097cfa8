"""Discovery and version documents of the stand-in API server (pure: no I/O).

What ``kubectl`` reads before any verb (client-go's discovery client):

* ``GET /version``: the server version (a version-dispatching kubectl, such as
  the Google Cloud SDK's, also picks its binary from it);
* ``GET /api`` and ``GET /apis`` with an Accept header asking first for
  *aggregated discovery* (``application/json;g=apidiscovery.k8s.io;v=v2;
  as=APIGroupDiscoveryList``, Kubernetes 1.30+): every group, version and
  resource in one document; a server that answers plain ``application/json``
  (``APIVersions`` / ``APIGroupList``) makes the client fall back to one
  ``APIResourceList`` per group version (``/api/v1``, ``/apis/<g>/<v>``).

Resource names, short names and categories follow the real API server and
Istio's CRDs (``ap`` and ``pa`` are the short names in Istio's
``crd-all.gen.yaml``), so ``kubectl get po``, ``kubectl label ns`` and
``kubectl get ap`` resolve as on a cluster. Verbs list only what the stand-in
implements (no ``update``/PUT, no ``deletecollection``).

Reference: https://kubernetes.io/docs/concepts/overview/kubernetes-api/#discovery-api
"""

from __future__ import annotations

from typing import Iterable

AGGREGATED_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"


def version_info(git_version: str = "v1.33.0") -> dict:
    """The ``/version`` document (``major``/``minor`` are what clients compare)."""
    major, minor = git_version.lstrip("v").split(".")[:2]
    return {"major": major, "minor": minor, "gitVersion": git_version,
            # Says plainly what answers: no real build stands behind it.
            "gitCommit": "kubeapi-test-stand-in", "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z", "goVersion": "n/a", "compiler": "n/a",
            "platform": "linux/amd64"}


def media_types(accept: str) -> list[tuple[str, dict[str, str]]]:
    """An Accept header as (type, parameters) in the client's order of preference.

    Kubernetes clients list alternatives in order and send no ``q`` weights;
    a ``q`` parameter, if any, is kept as a parameter and not used to sort.
    """
    out = []
    for item in (accept or "").split(","):
        parts = [p.strip() for p in item.split(";") if p.strip()]
        if not parts:
            continue
        params = {}
        for p in parts[1:]:
            k, _, v = p.partition("=")
            params[k.strip().lower()] = v.strip().strip('"')
        out.append((parts[0].lower(), params))
    return out


def wants_aggregated(accept: str) -> bool:
    """Whether the client's first acceptable JSON answer is aggregated discovery v2.

    The first entry the stand-in can produce wins: ``application/json`` with
    the v2 ``APIGroupDiscoveryList`` parameters, or plain ``application/json``
    (or ``*/*``). Other versions (``v2beta1``) and protobuf are skipped.
    """
    for mtype, params in media_types(accept):
        if mtype == "application/json" and params.get("g") == "apidiscovery.k8s.io":
            if params.get("v") == "v2" and params.get("as") == "APIGroupDiscoveryList":
                return True
            continue
        if mtype in ("application/json", "application/*", "*/*") and "as" not in params:
            return False
    return False


def _group_versions(resources: Iterable) -> dict[str, list[str]]:
    """group -> its versions, in the order given (the first is the preferred one)."""
    groups: dict[str, list[str]] = {}
    for r in resources:
        versions = groups.setdefault(r.group, [])
        if r.version not in versions:
            versions.append(r.version)
    return groups


def api_versions(server_address: str) -> dict:
    """``GET /api`` without aggregation: the core group's versions."""
    return {"kind": "APIVersions", "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}]}


def group_list(resources: Iterable) -> dict:
    """``GET /apis`` without aggregation: every named group and its versions."""
    groups = []
    for group, versions in _group_versions(resources).items():
        if not group:
            continue
        entries = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        groups.append({"name": group, "versions": entries, "preferredVersion": entries[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def _legacy_resource(r) -> dict:
    entry = {"name": r.plural, "singularName": r.kind.lower(), "namespaced": r.namespaced,
             "kind": r.kind, "verbs": list(r.verbs)}
    if r.short_names:
        entry["shortNames"] = list(r.short_names)
    if r.categories:
        entry["categories"] = list(r.categories)
    return entry


def resource_list(group: str, version: str, resources: Iterable) -> dict | None:
    """``GET /api/v1`` or ``/apis/<group>/<version>``; None when nothing is served there."""
    served = [r for r in resources if (r.group, r.version) == (group, version)]
    if not served:
        return None
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [_legacy_resource(r) for r in served]}


def _aggregated_resource(r) -> dict:
    entry = {"resource": r.plural,
             "responseKind": {"group": r.group, "version": r.version, "kind": r.kind},
             "scope": "Namespaced" if r.namespaced else "Cluster",
             "singularResource": r.kind.lower(), "verbs": list(r.verbs)}
    if r.short_names:
        entry["shortNames"] = list(r.short_names)
    if r.categories:
        entry["categories"] = list(r.categories)
    return entry


def aggregated(resources: Iterable, *, core: bool) -> dict:
    """Aggregated discovery v2 for ``/api`` (``core=True``) or ``/apis``."""
    resources = list(resources)
    items = []
    for group, versions in _group_versions(resources).items():
        if bool(group) == core:
            continue
        items.append({
            "metadata": {"name": group, "creationTimestamp": None},
            "versions": [{"version": v, "freshness": "Current",
                          "resources": [_aggregated_resource(r) for r in resources
                                        if (r.group, r.version) == (group, v)]}
                         for v in versions]})
    return {"kind": "APIGroupDiscoveryList", "apiVersion": "apidiscovery.k8s.io/v2",
            "metadata": {}, "items": items}
