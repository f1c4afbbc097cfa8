"""A test-only Kubernetes API server that speaks the real wire protocol.

Never imported by product code: it lets tests drive the agent's kube state
source (and the CA's TokenReview authentication) through the official
``kubernetes`` Python client against a server whose behaviour the test
controls (dropped watches, compacted history, absent CRDs, tokens).

What is implemented, following the Kubernetes API conventions
(https://kubernetes.io/docs/reference/using-api/api-concepts/):

* one global, monotonically increasing resourceVersion; objects get
  ``metadata.resourceVersion``, ``uid`` and ``creationTimestamp`` on create;
* LIST of namespaced and all-namespaces paths, GET of one object, with
  ``fieldSelector`` (metadata.name, metadata.namespace, spec.nodeName; ``=``,
  ``==``, ``!=``), ``labelSelector`` (``=``, ``==``, ``!=``, ``in``,
  ``notin``, exists, ``!`` not-exists), ``limit``/``continue`` (pages of a
  snapshot taken at the first page, expired by ``compact()`` with 410), and
  ``resourceVersion``/``resourceVersionMatch=Exact`` (410 when compacted);
* WATCH (``watch=true|1``) as a chunked stream of one JSON event per line,
  replaying history after ``resourceVersion`` (or synthetic ADDED events for
  the current objects when it is unset or ``0``), an ERROR event with a 410
  Status when the version is older than the compacted history, BOOKMARK
  events when ``allowWatchBookmarks`` is set, ``timeoutSeconds``; objects
  that stop (or start) matching a selector leave (enter) the watch as
  DELETED (ADDED), as on a real server;
* POST (create, JSON bodies), PATCH (JSON merge patch; strategic merge patch
  with its list directives for the built-in kinds, see patch.py, and 415 for
  custom resources as on a real server; ``null`` deletes a key; a no-op patch
  does not bump the resourceVersion), DELETE;
* TokenReview (authentication.k8s.io/v1) with the real audience semantics;
* bearer-token authentication of every request (401 otherwise) except
  ``/version``, which is public as on a real cluster;
* what ``kubectl`` reads first (discovery.py): ``/version``, ``/api``,
  ``/apis`` (aggregated discovery v2 when the Accept header asks for it, else
  ``APIVersions``/``APIGroupList``), ``/apis/<group>``, ``/api/v1`` and
  ``/apis/<group>/<version>``, with short names (po, ns, svc, no, ap, pa)
  and categories;
* security.istio.io v1/v1beta1 and networking.istio.io v1/v1beta1/v1alpha3
  (ServiceEntry ``se``, WorkloadEntry ``we``) resources that answer 404 (and
  leave discovery) while the test says their CRD version is absent;
* every request body is read before the answer, on error paths too, so a
  keep-alive connection never parses body bytes as the next request.

``KubeApiServer(tls=True)`` serves HTTPS with a throw-away CA that
``kubeconfig()`` writes as certificate-authority-data. kubectl needs it:
client-go sends no bearer token over plain HTTP.

Partial, on purpose: no PUT, no JSON patch (415), no protobuf bodies (415:
``kubectl create namespace`` sends protobuf; ``apply``/``create -f`` send
JSON), no OpenAPI (``kubectl apply`` needs ``--validate=false``), no
``fieldValidation`` (ignored), no ``dryRun`` (400), no Table responses
(kubectl falls back to its own printers), no managedFields/server-side
apply, no admission, no cascading deletes, no generateName.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from lab.kubeapi import discovery
from lab.kubeapi.patch import PatchError, strategic_merge_patch


@dataclass(frozen=True)
class Resource:
    group: str          # "" for the core group
    version: str
    plural: str
    kind: str
    namespaced: bool
    custom: bool = False    # custom resources keep kind/apiVersion on list items
    short_names: tuple[str, ...] = ()       # discovery: `kubectl get po`
    categories: tuple[str, ...] = ()        # discovery: `kubectl get all`
    verbs: tuple[str, ...] = ("create", "delete", "get", "list", "patch", "watch")

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def store_key(self) -> tuple[str, str]:
        # One store per group and resource: the v1 and v1beta1 Istio
        # resources are the same objects served at two versions.
        return (self.group, self.plural)


_ISTIO_CATEGORIES = ("istio-io", "security-istio-io")
_NETWORKING_CATEGORIES = ("istio-io", "networking-istio-io")
# Stored and served resources. Within a group the first version listed is
# the preferred one in discovery (v1 before v1beta1, as on a real server).
RESOURCES = [
    Resource("", "v1", "pods", "Pod", True, short_names=("po",), categories=("all",)),
    Resource("", "v1", "namespaces", "Namespace", False, short_names=("ns",)),
    Resource("", "v1", "services", "Service", True, short_names=("svc",), categories=("all",)),
    Resource("", "v1", "nodes", "Node", False, short_names=("no",)),
    Resource("discovery.k8s.io", "v1", "endpointslices", "EndpointSlice", True),
    Resource("security.istio.io", "v1", "authorizationpolicies", "AuthorizationPolicy", True, True,
             short_names=("ap",), categories=_ISTIO_CATEGORIES),
    Resource("security.istio.io", "v1beta1", "authorizationpolicies", "AuthorizationPolicy", True, True,
             short_names=("ap",), categories=_ISTIO_CATEGORIES),
    Resource("security.istio.io", "v1", "peerauthentications", "PeerAuthentication", True, True,
             short_names=("pa",), categories=_ISTIO_CATEGORIES),
    Resource("security.istio.io", "v1beta1", "peerauthentications", "PeerAuthentication", True, True,
             short_names=("pa",), categories=_ISTIO_CATEGORIES),
    *(Resource("networking.istio.io", version, plural, kind, True, True, short_names=(short,),
               categories=_NETWORKING_CATEGORIES)
      for plural, kind, short in (("serviceentries", "ServiceEntry", "se"),
                                  ("workloadentries", "WorkloadEntry", "we"))
      for version in ("v1", "v1beta1", "v1alpha3")),
]
# Served but not stored: only listed in discovery (TokenReview is create-only).
_DISCOVERY_ONLY = [
    Resource("authentication.k8s.io", "v1", "tokenreviews", "TokenReview", False, verbs=("create",)),
]
_BY_PATH = {(r.group, r.version, r.plural): r for r in RESOURCES}
_BY_KIND = {}
for _r in RESOURCES:
    _BY_KIND.setdefault(_r.kind, _r)
    _BY_KIND.setdefault(_r.plural, _r)

ISTIO_GROUP = "security.istio.io"
ISTIO_NETWORKING_GROUP = "networking.istio.io"
NETWORKING_VERSIONS = ("v1", "v1beta1", "v1alpha3")


class ApiError(Exception):
    """An API error answered as a ``Status`` object."""

    def __init__(self, code: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.code, self.reason, self.message = code, reason, message

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}


@dataclass
class Event:
    rv: int
    store_key: tuple[str, str]
    type: str           # ADDED, MODIFIED, DELETED
    obj: dict
    old: dict | None    # the previous version (MODIFIED), for selector transitions


@dataclass
class TokenInfo:
    username: str
    uid: str = ""
    groups: list[str] = field(default_factory=list)
    audiences: list[str] = field(default_factory=list)
    extra: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RequestRecord:
    method: str
    path: str
    query: dict[str, str]
    time: float
    headers: dict[str, str] = field(default_factory=dict)     # Accept, Content-Type, User-Agent

    @property
    def watch(self) -> bool:
        return self.query.get("watch") in ("true", "1")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# -- selectors (pure) ----------------------------------------------------------

def _split_top(text: str) -> list[str]:
    """Split on commas outside parentheses (``a in (x,y),b``)."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text: str):
    """A predicate over a labels dict; raises ApiError 400 on bad syntax."""
    tests = []
    for term in _split_top(text or ""):
        words = term.split(None, 1)
        if len(words) == 2 and words[1].split(None, 1)[0] in ("in", "notin"):
            key = words[0]
            op, rest = words[1].split(None, 1) if len(words[1].split(None, 1)) == 2 else (words[1], "")
            rest = rest.strip()
            if not (rest.startswith("(") and rest.endswith(")")):
                raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
            values = {v.strip() for v in rest[1:-1].split(",") if v.strip()}
            if op == "in":
                tests.append(lambda l, k=key, vs=values: l.get(k) in vs)
            else:
                tests.append(lambda l, k=key, vs=values: l.get(k) not in vs)
        elif "!=" in term:
            k, v = (s.strip() for s in term.split("!=", 1))
            tests.append(lambda l, k=k, v=v: l.get(k) != v)
        elif "==" in term or "=" in term:
            k, v = (s.strip() for s in term.replace("==", "=", 1).split("=", 1))
            tests.append(lambda l, k=k, v=v: l.get(k) == v)
        elif term.startswith("!"):
            tests.append(lambda l, k=term[1:].strip(): k not in l)
        elif " " not in term:
            tests.append(lambda l, k=term: k in l)
        else:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: {term!r}")
    return lambda labels: all(t(labels or {}) for t in tests)


_FIELDS = {
    "metadata.name": lambda o: o["metadata"].get("name", ""),
    "metadata.namespace": lambda o: o["metadata"].get("namespace", ""),
    "spec.nodeName": lambda o: (o.get("spec") or {}).get("nodeName", ""),
}


def parse_field_selector(text: str, resource: Resource):
    tests = []
    for term in _split_top(text or ""):
        if "!=" in term:
            k, v = term.split("!=", 1)
            neg = True
        elif "=" in term:
            k, v = term.replace("==", "=", 1).split("=", 1)
            neg = False
        else:
            raise ApiError(400, "BadRequest", f"invalid selector: {term!r}; can't understand it")
        k, v = k.strip(), v.strip()
        getter = _FIELDS.get(k)
        if getter is None or (k == "spec.nodeName" and resource.kind != "Pod"):
            raise ApiError(400, "BadRequest",
                           f'field label not supported: {k}')
        tests.append(lambda o, g=getter, v=v, neg=neg: (g(o) == v) != neg)
    return lambda obj: all(t(obj) for t in tests)


# -- patches (pure) ------------------------------------------------------------

def merge_patch(target, patch):
    """RFC 7386 JSON merge patch (strategic merge patch equals it for maps)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# -- the server ----------------------------------------------------------------

class KubeApiServer:
    """The API server; ``with KubeApiServer() as api:`` starts and stops it."""

    def __init__(self, *, token: str = "test-client-token", bookmark_interval: float = 1.0,
                 default_watch_timeout: float = 1800.0,
                 api_audiences: tuple[str, ...] = ("https://kubernetes.default.svc.cluster.local",),
                 host: str = "127.0.0.1", port: int = 0, tls: bool = False,
                 aggregated_discovery: bool = True, git_version: str = "v1.33.0") -> None:
        self.client_tokens = {token}
        # Discovery as kubectl reads it (see discovery.py): aggregated when the
        # client asks for it, unless turned off to exercise the fallback.
        self.aggregated_discovery = aggregated_discovery
        self.git_version = git_version
        self.token = token
        self.bookmark_interval = bookmark_interval
        self.default_watch_timeout = default_watch_timeout
        self.api_audiences = list(api_audiences)
        self._host, self._port = host, port
        # HTTPS like a real API server: a throw-away CA signs a serving
        # certificate for the host; kubeconfig() hands the CA to the client.
        self.ca_pem: bytes | None = None
        self._tls_context = _tls_context(self, host) if tls else None
        self._cond = threading.Condition()
        self._rv = 0
        self._stores: dict[tuple[str, str], dict[tuple[str, str], dict]] = {}
        self._history: list[Event] = []
        self._compacted = 0             # events with rv <= this are forgotten
        self._drop_gen = 0
        self._stopping = False
        self._snapshots: dict[str, tuple[int, list[dict]]] = {}
        self._tokens: dict[str, TokenInfo] = {}
        self._istio_versions = {"v1", "v1beta1"}
        self._networking_versions = set(NETWORKING_VERSIONS)
        self._watch_sockets: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.requests: list[RequestRecord] = []
        self.fail_next: list[tuple[str, int]] = []     # (path prefix, HTTP code) to fail once
        self.refused: dict[str, int] = {}               # path prefix -> HTTP code, until allowed

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> "KubeApiServer":
        api = self

        class Handler(_Handler):
            server_api = api

        self._server = (_TlsHttpServer if self._tls_context else ThreadingHTTPServer)(
            (self._host, self._port), Handler)
        self._server.tls_context = self._tls_context
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kubeapi",
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self._close_watch_sockets()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def __enter__(self) -> "KubeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"{'https' if self._tls_context else 'http'}://{self._host}:{self.port}"

    def kubeconfig(self, path: str | os.PathLike, token: str | None = None) -> str:
        """Write a kubeconfig for this server (the official client loads it); returns the path."""
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "test",
            "clusters": [{"name": "test", "cluster": self._cluster_entry()}],
            "users": [{"name": "test", "user": {"token": token if token is not None else self.token}}],
            "contexts": [{"name": "test", "context": {"cluster": "test", "user": "test"}}],
        }
        with open(path, "w") as fh:
            json.dump(doc, fh)      # JSON is YAML: the client's loader reads it
        return str(path)

    def _cluster_entry(self) -> dict:
        entry = {"server": self.url}
        if self.ca_pem is not None:
            entry["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return entry

    # -- test controls ---------------------------------------------------------

    @property
    def resource_version(self) -> int:
        with self._cond:
            return self._rv

    def _resource_for(self, obj_or_kind) -> Resource:
        if isinstance(obj_or_kind, dict):
            kind = obj_or_kind.get("kind")
            group = (obj_or_kind.get("apiVersion") or "v1").rpartition("/")[0]
            for r in RESOURCES:
                if r.kind == kind and r.group == group:
                    return r
            raise KeyError(f"no resource for {obj_or_kind.get('apiVersion')} {kind}")
        return _BY_KIND[obj_or_kind]

    def create(self, obj: dict) -> dict:
        return self._create(self._resource_for(obj), copy.deepcopy(obj))

    def update(self, obj: dict) -> dict:
        """Replace an object (no resourceVersion precondition); emits MODIFIED."""
        r = self._resource_for(obj)
        meta = obj["metadata"]
        ns = meta.get("namespace", "default") if r.namespaced else ""
        with self._cond:
            store = self._stores.setdefault(r.store_key, {})
            old = store.get((ns, meta["name"]))
            if old is None:
                raise KeyError(f"{r.kind} {ns}/{meta['name']} does not exist")
            new = copy.deepcopy(obj)
            for keep in ("uid", "creationTimestamp"):
                new["metadata"][keep] = old["metadata"][keep]
            if r.namespaced:
                new["metadata"]["namespace"] = ns
            return self._store_modified(r, ns, meta["name"], old, new)

    def patch(self, kind: str, namespace: str, name: str, patch: dict) -> dict:
        r = self._resource_for(kind)
        return self._patch(r, namespace if r.namespaced else "", name, patch)

    def delete(self, kind: str, namespace: str, name: str) -> dict:
        r = self._resource_for(kind)
        return self._delete(r, namespace if r.namespaced else "", name)

    def get(self, kind: str, namespace: str, name: str) -> dict | None:
        r = self._resource_for(kind)
        with self._cond:
            obj = self._stores.get(r.store_key, {}).get((namespace if r.namespaced else "", name))
            return copy.deepcopy(obj) if obj is not None else None

    def drop_watches(self, abrupt: bool = False) -> None:
        """End every open watch stream: cleanly (the chunked body ends) or abruptly (socket reset)."""
        if abrupt:
            # Reset first, so no stream gets to end cleanly.
            self._close_watch_sockets()
        with self._cond:
            self._drop_gen += 1
            self._cond.notify_all()

    def compact(self) -> int:
        """Forget all history: a watch or Exact list from an older version gets 410 Gone."""
        with self._cond:
            self._compacted = self._rv
            self._history.clear()
            self._snapshots.clear()
            return self._compacted

    def set_crds_present(self, present: bool) -> None:
        """All Istio CRDs (security and networking) installed or not."""
        self.set_istio_versions({"v1", "v1beta1"} if present else set())
        self.set_networking_versions(NETWORKING_VERSIONS if present else ())

    def set_networking_versions(self, versions) -> None:
        """Which networking.istio.io versions are served (the rest answer 404)."""
        with self._cond:
            self._networking_versions = set(versions)
            self._cond.notify_all()

    def set_istio_versions(self, versions) -> None:
        """Which security.istio.io versions are served (the rest answer 404)."""
        with self._cond:
            self._istio_versions = set(versions)
            self._cond.notify_all()     # a removed CRD ends its own watches (see _watch)

    def add_token(self, token: str, username: str, uid: str = "", groups=(), audiences=None,
                  extra: dict[str, list[str]] | None = None) -> None:
        """A token TokenReview accepts; ``audiences`` default to the API server's."""
        self._tokens[token] = TokenInfo(username, uid, list(groups),
                                        list(audiences) if audiences is not None else list(self.api_audiences),
                                        {k: list(v) for k, v in (extra or {}).items()})

    def add_pod_token(self, token: str, namespace: str, service_account: str, pod_name: str,
                      pod_uid: str, node_name: str | None = None, audiences=None) -> None:
        """A bound service-account token with the extras real clusters add."""
        extra = {"authentication.kubernetes.io/pod-name": [pod_name],
                 "authentication.kubernetes.io/pod-uid": [pod_uid]}
        if node_name:
            extra["authentication.kubernetes.io/node-name"] = [node_name]
        self.add_token(token, f"system:serviceaccount:{namespace}:{service_account}",
                       uid=str(uuid.uuid4()),
                       groups=["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                               "system:authenticated"],
                       audiences=audiences, extra=extra)

    def requests_matching(self, path: str, *, method: str = "GET", watch: bool | None = None
                          ) -> list[RequestRecord]:
        return [r for r in list(self.requests)
                if r.path == path and r.method == method and (watch is None or r.watch == watch)]

    # -- storage -----------------------------------------------------------------

    def _next_rv(self) -> int:
        self._rv += 1
        return self._rv

    def _create(self, r: Resource, obj: dict) -> dict:
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ApiError(422, "Invalid", f"{r.kind} is invalid: metadata.name: Required value")
        if r.namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        obj["kind"], obj["apiVersion"] = r.kind, r.api_version
        key = (meta.get("namespace", ""), meta["name"])
        with self._cond:
            store = self._stores.setdefault(r.store_key, {})
            if key in store:
                raise ApiError(409, "AlreadyExists",
                               f'{r.plural} "{meta["name"]}" already exists')
            meta["uid"] = meta.get("uid") or str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["resourceVersion"] = str(self._next_rv())
            store[key] = obj
            self._history.append(Event(self._rv, r.store_key, "ADDED", obj, None))
            self._cond.notify_all()
            return copy.deepcopy(obj)

    def _store_modified(self, r: Resource, ns: str, name: str, old: dict, new: dict) -> dict:
        # caller holds the lock
        new["kind"], new["apiVersion"] = old["kind"], old["apiVersion"]
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if new == old:
            return copy.deepcopy(old)       # a no-op write does not bump the version
        new["metadata"]["resourceVersion"] = str(self._next_rv())
        self._stores[r.store_key][(ns, name)] = new
        self._history.append(Event(self._rv, r.store_key, "MODIFIED", new, old))
        self._cond.notify_all()
        return copy.deepcopy(new)

    def _patch(self, r: Resource, ns: str, name: str, patch: dict, strategic: bool = False) -> dict:
        if not isinstance(patch, dict):
            raise ApiError(400, "BadRequest", "the patch is not a JSON object")
        with self._cond:
            old = self._stores.get(r.store_key, {}).get((ns, name))
            if old is None:
                raise ApiError(404, "NotFound", f'{r.plural} "{name}" not found')
            if strategic:
                try:
                    new = strategic_merge_patch(r.kind, old, patch)
                except PatchError as exc:
                    raise ApiError(400, "BadRequest", f"{r.kind} {name}: {exc}") from None
            else:
                new = merge_patch(old, patch)
            if isinstance(new.get("metadata"), dict):
                # merge_patch shares untouched subtrees with `old`, which
                # history still holds: the metadata about to be stamped
                # must be this version's own.
                new["metadata"] = dict(new["metadata"])
            meta = new.get("metadata")
            if not isinstance(meta, dict) or meta.get("name") != name or (
                    r.namespaced and meta.get("namespace") != ns):
                raise ApiError(422, "Invalid", f"{r.kind} {name}: a patch cannot change metadata.name "
                                               "or metadata.namespace")
            for key in ("labels", "annotations"):
                values = meta.get(key)
                if values is not None and (not isinstance(values, dict)
                                           or not all(isinstance(v, str) for v in values.values())):
                    raise ApiError(422, "Invalid", f"{r.kind} {name}: metadata.{key} must map "
                                                   "strings to strings")
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            return self._store_modified(r, ns, name, old, new)

    def _delete(self, r: Resource, ns: str, name: str) -> dict:
        with self._cond:
            store = self._stores.get(r.store_key, {})
            old = store.pop((ns, name), None)
            if old is None:
                raise ApiError(404, "NotFound", f'{r.plural} "{name}" not found')
            # The DELETED event carries the object at the deletion's version.
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self._next_rv())
            self._history.append(Event(self._rv, r.store_key, "DELETED", gone, None))
            self._cond.notify_all()
            return copy.deepcopy(gone)

    def discoverable(self) -> list[Resource]:
        """What discovery lists now (absent Istio CRD versions are left out)."""
        with self._cond:
            return [r for r in RESOURCES + _DISCOVERY_ONLY if self._served(r)]

    def _served(self, r: Resource) -> bool:
        if r.group == ISTIO_NETWORKING_GROUP:
            return r.version in self._networking_versions
        return r.group != ISTIO_GROUP or r.version in self._istio_versions

    def _close_watch_sockets(self) -> None:
        with self._cond:
            socks = list(self._watch_sockets)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # -- rendering -----------------------------------------------------------------

    @staticmethod
    def _render(r: Resource, obj: dict, in_list: bool = False) -> dict:
        # Shallow: stored objects are never mutated in place (writes store
        # new dicts), and the result is serialised right away.
        out = dict(obj)
        if in_list and not r.custom:
            # Built-in list items carry no kind/apiVersion on the wire.
            out.pop("kind", None)
            out.pop("apiVersion", None)
        else:
            out["kind"], out["apiVersion"] = r.kind, r.api_version
        return out

    def list_objects(self, r: Resource, ns: str | None, query: dict[str, str]) -> dict:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), r)
        limit = int(query.get("limit") or 0)
        token = query.get("continue")
        with self._cond:
            rv_param = query.get("resourceVersion")
            if query.get("resourceVersionMatch") == "Exact" and rv_param:
                if int(rv_param) < self._compacted:
                    raise ApiError(410, "Expired", f"too old resource version: {rv_param} "
                                                   f"({self._compacted})")
                if int(rv_param) != self._rv:
                    # Only the current version is kept as a full snapshot here.
                    raise ApiError(410, "Expired", f"resource version {rv_param} is not the current "
                                                   f"one ({self._rv}); this server serves Exact only "
                                                   "at the current version")
            if token:
                snap = self._snapshots.get(token)
                if snap is None:
                    raise ApiError(410, "Expired", "The provided continue parameter is too old to "
                                                   "display a consistent list result. You can start a "
                                                   "new list without the continue parameter.")
                rv, items = snap
            else:
                rv = self._rv
                items = [o for (ons, _), o in sorted(self._stores.get(r.store_key, {}).items())
                         if (ns is None or ons == ns)
                         and labels(o["metadata"].get("labels")) and fields(o)]
            meta = {"resourceVersion": str(rv)}
            if limit and len(items) > limit:
                page, rest = items[:limit], items[limit:]
                nxt = base64.urlsafe_b64encode(os.urandom(12)).decode()
                self._snapshots[nxt] = (rv, rest)
                meta["continue"] = nxt
                meta["remainingItemCount"] = len(rest)
                items = page
            rendered = [self._render(r, o, in_list=True) for o in items]
        return {"kind": f"{r.kind}List", "apiVersion": r.api_version, "metadata": meta,
                "items": rendered}


class _TlsHttpServer(ThreadingHTTPServer):
    tls_context = None

    def get_request(self):
        sock, addr = super().get_request()
        # The handshake runs in the request's thread (on first read), so a
        # slow client cannot stall the accept loop.
        return self.tls_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr


def _tls_context(api: "KubeApiServer", host: str):
    import datetime
    import ipaddress
    import ssl
    import tempfile

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubeapi-test-ca")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([san, x509.DNSName("kubernetes.default.svc")]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    api.ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as tmp:
        cert_path, key_path = os.path.join(tmp, "tls.crt"), os.path.join(tmp, "tls.key")
        with open(cert_path, "wb") as fh:
            fh.write(cert.public_bytes(serialization.Encoding.PEM))
        with open(key_path, "wb") as fh:
            fh.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two sends; with Nagle the body would wait
    # for the client's delayed ACK (40 ms a request). The real API server
    # (Go net/http) sets TCP_NODELAY on every connection too.
    disable_nagle_algorithm = True
    server_api: KubeApiServer

    def log_message(self, fmt, *args) -> None:     # quiet: tests read api.requests
        pass

    # -- plumbing ------------------------------------------------------------------

    def _send_json(self, code: int, body: dict, content_type: str = "application/json") -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _take_body(self) -> bytes:
        """Read the whole request body off the connection, whatever the route.

        Every request's body is consumed before any answer: a response sent
        while body bytes are still unread would leave them to be parsed as
        the next request on a keep-alive connection (a desync).
        """
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            body = b""
            while True:
                line = self.rfile.readline(1024)
                try:
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                except ValueError:
                    self.close_connection = True        # lost in the stream: answer, then close
                    raise ApiError(400, "BadRequest", "malformed chunked request body") from None
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass        # trailers
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            # No way to find the end of the body: answer, then close.
            self.close_connection = True
            raise ApiError(400, "BadRequest", "invalid Content-Length")
        return self.rfile.read(length) if length else b""

    def _read_body(self) -> bytes:
        return self._body

    def _json_body(self):
        try:
            return json.loads(self._read_body() or b"null")
        except ValueError as exc:
            raise ApiError(400, "BadRequest", f"the request body is not JSON: {exc}") from None

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def _dispatch(self, method: str) -> None:
        api = self.server_api
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        api.requests.append(RequestRecord(method, parts.path, query, time.time(), {
            k: self.headers[k] for k in ("Accept", "Content-Type", "User-Agent") if k in self.headers}))
        self._body = b""
        try:
            self._body = self._take_body()
            if parts.path == "/version" and method == "GET":
                # Public, as on a real cluster (the system:public-info-viewer role).
                return self._send_json(200, discovery.version_info(api.git_version))
            auth = self.headers.get("Authorization", "")
            if not (auth.startswith("Bearer ") and auth[7:] in api.client_tokens):
                raise ApiError(401, "Unauthorized", "Unauthorized")
            for prefix, code in list(api.refused.items()):
                if parts.path.startswith(prefix):
                    raise ApiError(code, "ServiceUnavailable" if code == 503 else "InternalError",
                                   f"refused by the test ({code})")
            for i, (prefix, code) in enumerate(list(api.fail_next)):
                if parts.path.startswith(prefix):
                    del api.fail_next[i]
                    raise ApiError(code, "InternalError" if code >= 500 else "BadRequest",
                                   f"injected failure {code}")
            self._route(method, parts.path, query)
        except ApiError as err:
            self._send_json(err.code, err.status())
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True
        except Exception as exc:        # a bug here must not hang or desync the client
            self.close_connection = True
            try:
                self._send_json(500, ApiError(500, "InternalError",
                                              f"stand-in server error: {exc!r}").status())
            except OSError:
                pass

    def _route(self, method: str, path: str, query: dict[str, str]) -> None:
        api = self.server_api
        segs = [s for s in path.split("/") if s]
        if method == "GET" and (segs in (["api"], ["apis"]) or (segs[:1] == ["apis"] and len(segs) == 2)):
            return self._discovery_root(segs)
        if segs[:1] == ["api"] and len(segs) >= 2:
            group, version, rest = "", segs[1], segs[2:]
        elif segs[:1] == ["apis"] and len(segs) >= 3:
            group, version, rest = segs[1], segs[2], segs[3:]
        else:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if (group, version) == ("authentication.k8s.io", "v1") and rest == ["tokenreviews"]:
            if method != "POST":
                raise ApiError(405, "MethodNotAllowed", "tokenreviews only support create")
            return self._send_json(201, self._token_review(self._json_body()))
        if not rest:
            return self._discovery(group, version)
        ns = None
        if rest[0] == "namespaces" and len(rest) >= 3:
            ns, rest = rest[1], rest[2:]
        plural, name = rest[0], (rest[1] if len(rest) > 1 else None)
        if len(rest) > 2:
            raise ApiError(404, "NotFound", "subresources are not served by this test server")
        r = _BY_PATH.get((group, version, plural))
        if r is None or not api._served(r) or (ns is not None and not r.namespaced):
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        if r.namespaced and name is not None and ns is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        key_ns = ns if r.namespaced else ""
        if method != "GET" and "dryRun" in query:
            # Honest refusal rather than a write the client believes was not made.
            raise ApiError(400, "BadRequest", "dryRun is not implemented by this test server")
        if method == "GET" and name is None:
            if query.get("watch") in ("true", "1"):
                return self._watch(r, ns, query)
            return self._send_json(200, api.list_objects(r, ns, query))
        if method == "GET":
            with api._cond:
                stored = api._stores.get(r.store_key, {}).get((key_ns, name))
                obj = KubeApiServer._render(r, stored) if stored is not None else None
            if obj is None:
                raise ApiError(404, "NotFound", f'{r.plural} "{name}" not found')
            return self._send_json(200, obj)
        if method == "POST" and name is None:
            ctype = (self.headers.get("Content-Type") or "application/json").split(";")[0].strip()
            if ctype != "application/json":
                # kubectl's typed commands (`kubectl create namespace`) send
                # protobuf; this server decodes JSON only (apply/create -f send JSON).
                raise ApiError(415, "UnsupportedMediaType",
                               f"this test server accepts application/json only (got {ctype!r})")
            body = self._json_body()
            if not isinstance(body, dict):
                raise ApiError(400, "BadRequest", "the body is not an object")
            if r.namespaced:
                body.setdefault("metadata", {}).setdefault("namespace", ns)
                if body["metadata"]["namespace"] != ns:
                    raise ApiError(400, "BadRequest", "the namespace of the object does not match "
                                                      "the namespace on the request")
            if r.kind == "Namespace" and isinstance(body.get("metadata"), dict):
                # What the real server's defaulting adds to every namespace.
                meta = body["metadata"]
                meta["labels"] = {**(meta.get("labels") or {}),
                                  "kubernetes.io/metadata.name": meta.get("name", "")}
                body.setdefault("spec", {"finalizers": ["kubernetes"]})
                body.setdefault("status", {"phase": "Active"})
            created = api._create(r, body)
            return self._send_json(201, KubeApiServer._render(r, created))
        if method == "PATCH" and name is not None:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype not in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
                raise ApiError(415, "UnsupportedMediaType",
                               f"the body of the request was in an unknown format - accepted media "
                               f"types include: application/merge-patch+json, "
                               f"application/strategic-merge-patch+json (got {ctype!r})")
            if ctype == "application/strategic-merge-patch+json" and r.custom:
                # As the real server: custom resources have no Go types to
                # take patch strategies from (kubectl sends them merge patches).
                raise ApiError(415, "UnsupportedMediaType",
                               "strategic merge patch is not supported for custom resources; "
                               "use application/merge-patch+json")
            patched = api._patch(r, key_ns, name, self._json_body(),
                                 strategic=ctype == "application/strategic-merge-patch+json")
            return self._send_json(200, KubeApiServer._render(r, patched))
        if method == "DELETE" and name is not None:
            gone = api._delete(r, key_ns, name)
            return self._send_json(200, KubeApiServer._render(r, gone))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    def _discovery(self, group: str, version: str) -> None:
        doc = discovery.resource_list(group, version, self.server_api.discoverable())
        if doc is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        self._send_json(200, doc)

    def _discovery_root(self, segs: list[str]) -> None:
        """``/api``, ``/apis`` (aggregated when asked for and enabled) and ``/apis/<group>``."""
        api = self.server_api
        served = api.discoverable()
        if len(segs) == 2:
            groups = discovery.group_list(served)["groups"]
            found = [g for g in groups if g["name"] == segs[1]]
            if not found:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._send_json(200, {"kind": "APIGroup", "apiVersion": "v1", **found[0]})
        core = segs == ["api"]
        if api.aggregated_discovery and discovery.wants_aggregated(self.headers.get("Accept", "")):
            return self._send_json(200, discovery.aggregated(served, core=core),
                                   content_type=discovery.AGGREGATED_V2)
        host = self.headers.get("Host") or f"{api._host}:{api.port}"
        self._send_json(200, discovery.api_versions(host) if core else discovery.group_list(served))

    # -- token review ---------------------------------------------------------------

    def _token_review(self, body) -> dict:
        api = self.server_api
        # Like a real server, a body without kind/apiVersion takes the
        # endpoint's (the official client omits them unless set).
        if not isinstance(body, dict) or body.get("kind", "TokenReview") != "TokenReview":
            raise ApiError(400, "BadRequest", "the body is not a TokenReview")
        spec = body.get("spec") or {}
        token, wanted = spec.get("token") or "", list(spec.get("audiences") or [])
        status: dict = {"user": {}}
        info = api._tokens.get(token)
        # Unset spec.audiences means the API server's own audiences.
        target = wanted or api.api_audiences
        if info is None:
            status.update(authenticated=False,
                          error="[invalid bearer token, token lookup failed]")
        else:
            matched = [a for a in target if a in info.audiences]
            if not matched:
                status.update(authenticated=False,
                              error=f"[invalid bearer token, token audiences {json.dumps(info.audiences)} "
                                    f"is invalid for the target audiences {json.dumps(target)}]")
            else:
                user = {"username": info.username, "uid": info.uid, "groups": info.groups}
                if info.extra:
                    user["extra"] = info.extra
                status.update(authenticated=True, user=user, audiences=matched)
        return {"kind": "TokenReview", "apiVersion": "authentication.k8s.io/v1",
                "metadata": {"creationTimestamp": None}, "spec": spec, "status": status}

    # -- watch ------------------------------------------------------------------

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _event(self, etype: str, obj: dict) -> None:
        self._chunk(json.dumps({"type": etype, "object": obj}).encode() + b"\n")

    def _watch(self, r: Resource, ns: str | None, query: dict[str, str]) -> None:
        api = self.server_api
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = parse_field_selector(query.get("fieldSelector", ""), r)

        def matches(obj) -> bool:
            return (obj is not None and (ns is None or obj["metadata"].get("namespace") == ns)
                    and labels(obj["metadata"].get("labels")) and fields(obj))

        bookmarks = query.get("allowWatchBookmarks") in ("true", "1")
        timeout = float(query.get("timeoutSeconds") or api.default_watch_timeout)
        deadline = time.monotonic() + timeout
        rv_param = query.get("resourceVersion") or "0"
        try:
            since = int(rv_param)
        except ValueError:
            raise ApiError(400, "BadRequest", f"invalid resourceVersion {rv_param!r}") from None
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True
        with api._cond:
            api._watch_sockets.add(self.connection)
            gen = api._drop_gen
            pending: list[tuple[str, dict]] = []
            if since == 0:
                # Unset or "0": the current objects as ADDED, then changes.
                since = api._rv
                for _, obj in sorted(api._stores.get(r.store_key, {}).items()):
                    if matches(obj):
                        pending.append(("ADDED", KubeApiServer._render(r, obj)))
                gone = False
            else:
                gone = since < api._compacted
            # The position in the history of the first event after `since`.
            pos = next((i for i, e in enumerate(api._history) if e.rv > since), len(api._history))
            hist_base = api._compacted
        try:
            if gone:
                self._event("ERROR", ApiError(410, "Expired",
                                              f"too old resource version: {since} "
                                              f"({hist_base})").status())
                return
            last_bookmark = time.monotonic()
            while True:
                for etype, obj in pending:
                    self._event(etype, obj)
                pending = []
                with api._cond:
                    while True:
                        if api._stopping or api._drop_gen != gen or not api._served(r):
                            return
                        if api._compacted != hist_base:
                            # History was forgotten under us: re-find our place,
                            # or tell the client it must relist.
                            if since < api._compacted:
                                gone = True
                                break
                            hist_base = api._compacted
                            pos = next((i for i, e in enumerate(api._history) if e.rv > since),
                                       len(api._history))
                        if pos < len(api._history):
                            break
                        now = time.monotonic()
                        if now >= deadline:
                            return
                        if bookmarks and now - last_bookmark >= api.bookmark_interval:
                            break
                        wait = deadline - now
                        if bookmarks:
                            wait = min(wait, api.bookmark_interval - (now - last_bookmark))
                        api._cond.wait(max(0.0, min(wait, 0.5)))
                    if gone:
                        pending = []
                    else:
                        for e in api._history[pos:]:
                            since = e.rv
                            if e.store_key != r.store_key:
                                continue
                            was, now_match = matches(e.old), matches(e.obj)
                            if e.type == "MODIFIED" and was and not now_match:
                                pending.append(("DELETED", KubeApiServer._render(r, e.obj)))
                            elif e.type == "MODIFIED" and now_match and not was:
                                pending.append(("ADDED", KubeApiServer._render(r, e.obj)))
                            elif now_match:
                                pending.append((e.type, KubeApiServer._render(r, e.obj)))
                        pos = len(api._history)
                        current = api._rv
                if gone:
                    self._event("ERROR", ApiError(410, "Expired",
                                                  f"too old resource version: {since}").status())
                    return
                if bookmarks and not pending and time.monotonic() - last_bookmark >= api.bookmark_interval:
                    self._event("BOOKMARK", {"kind": r.kind, "apiVersion": r.api_version,
                                             "metadata": {"resourceVersion": str(current),
                                                          "creationTimestamp": None}})
                    since = max(since, current)
                    last_bookmark = time.monotonic()
        finally:
            with api._cond:
                api._watch_sockets.discard(self.connection)
            try:
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except OSError:
                pass
