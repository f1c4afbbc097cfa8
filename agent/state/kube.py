"""The Kubernetes API state source: list then watch, like a client-go informer.

Same contract as ``agent/state/file.py``'s ``FileStateSource`` (``load()``,
``async watch(on_change, interval)``), same ``ClusterState`` model: one
model, two sources. Watched kinds (``AGENT_KINDS``; the CA watches only
pods, ``CA_KINDS``; Nodes are available with ``kinds=``): Namespaces, Pods
(every node: the data path resolves destination pods by IP), Services,
EndpointSlices, Istio's AuthorizationPolicy and PeerAuthentication
(security.istio.io v1, falling back to v1beta1) and ServiceEntry and
WorkloadEntry (networking.istio.io v1, then v1beta1, then v1alpha3); every
version answering 404 means the
CRDs are not installed, which is not an error: the kind counts as synced and
empty and is tried again every ``crd_retry_interval`` seconds, so CRDs
installed later are picked up). Any other refusal (403 from missing RBAC)
keeps that kind, and so the source, unsynced: policies that cannot be read
must not look like "no policies".

Per kind, one daemon thread (the official client is synchronous):

1. LIST (paged) and *replace* the kind's store with the result, so objects
   deleted while no watch was open disappear;
2. WATCH from the list's resourceVersion with ``allowWatchBookmarks`` and
   ``timeoutSeconds`` (streams are renewed from the last version seen,
   bookmarks included, without relisting);
3. a 410 Gone (ERROR event or HTTP status) means the version left the
   server's history: relist (counted in ``relists``);
4. any other failure (connection refused or reset, 5xx, a bad event) is
   counted, logged once per distinct message, and retried after a capped
   exponential backoff with jitter (``backoff_min`` .. ``backoff_max``); a
   broken watch resumes from its last version, a broken list relists.

Threads only mutate their kind's store under a lock and wake the asyncio
loop through ``call_soon_threadsafe``; the loop coalesces a burst of events
into one ``ClusterState`` rebuild (rebuilds at least ``coalesce`` seconds
apart, and spaced so they take at most a fifth of the loop's time), so
10,000 ADDED events cost a few rebuilds, not 10,000.

Stored objects carry ``kind`` and ``apiVersion`` (list items come without
them and get the list's) and are trimmed (``trim_object``): no
``metadata.managedFields``, no kubectl last-applied annotation, pod status
reduced to phase/podIP/podIPs/hostIP/conditions, container specs reduced to
what routing and identity read (name, ports), no pod volumes, node status
reduced to addresses/conditions.

Measured memory budget (``bench/kube_sync.py``: 10,000 realistic pods with
managedFields, the last-applied annotation, env, volumes, probes and full
container statuses, served by the test API server from another process on
loopback; RSS growth of the measuring process after GC, stores plus the
built ``ClusterState``, minus an empty cluster's sync; 2 shared cores):
about 80 MiB per 10,000 pods (77-83 MiB, ~8 KiB a pod), plus ~26 MiB fixed
for the client's lazily imported API modules. Untrimmed and unpacked (all
raw pages kept until the end) the same sync grew RSS by 273 MiB. First sync
4.9-8.5 s for 10,000 pods (most of it JSON decoding in this process); one
rebuild of the ClusterState 50-130 ms. See MEMORY_PER_10K_PODS.

Readiness: ``synced`` is True once every kind has completed its first full
list; ``load()`` waits for that the first time it is called (up to
``sync_timeout``), afterwards it never blocks. ``sync_status()`` gives what
metrics need (per-kind resourceVersion, relists, errors, last event time).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from agent.kubeclient import KubeConfigError, load_configuration
from agent.state.model import ClusterState, StateError

log = logging.getLogger(__name__)

# Measured by bench/kube_sync.py (see the module docstring): RSS growth for
# 10,000 pods after the first sync, in MiB, and the sync time on this
# project's CI machine kind (2 cores, loopback API server).
MEMORY_PER_10K_PODS = ("about 80 MiB RSS for 10,000 pods (measured 77-83 MiB, ~8 KiB a pod) on top "
                       "of ~26 MiB fixed (the client's lazily loaded API modules, threads); first "
                       "sync of 10,000 pods 4.9-8.5 s, dominated by JSON decoding; one ClusterState "
                       "rebuild 50-130 ms")

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
ISTIO_SECURITY = "security.istio.io"
ISTIO_NETWORKING = "networking.istio.io"
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"


class KubeError(StateError):
    """A Kubernetes API request failed (the message says which and why)."""


# -- trimming (pure) ------------------------------------------------------------

_POD_STATUS_KEEP = ("phase", "podIP", "podIPs", "hostIP", "conditions")
_CONTAINER_KEEP = ("name", "ports", "restartPolicy")
_POD_SPEC_DROP = ("volumes", "tolerations", "affinity", "securityContext", "imagePullSecrets",
                  "dnsConfig", "readinessGates", "topologySpreadConstraints", "overhead")
_NODE_STATUS_KEEP = ("addresses", "conditions")


def trim_object(obj: dict) -> dict:
    """A copy of ``obj`` without what no consumer reads (pure; ``obj`` is untouched).

    Only what is big and unused goes: everything the enrolment rule, routing,
    identity and policy code read (labels, annotations, ``spec.nodeName``,
    ``hostNetwork``, ``serviceAccountName``, container ports, pod IPs and
    phase, services, endpoint slices, policies) stays.
    """
    out = dict(obj)
    meta = out.get("metadata")
    if isinstance(meta, dict):
        meta = dict(meta)
        meta.pop("managedFields", None)
        annotations = meta.get("annotations")
        if isinstance(annotations, dict) and LAST_APPLIED in annotations:
            meta["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
        out["metadata"] = meta
    kind = out.get("kind")
    if kind == "Pod":
        status = out.get("status")
        if isinstance(status, dict):
            out["status"] = {k: status[k] for k in _POD_STATUS_KEEP if k in status}
        spec = out.get("spec")
        if isinstance(spec, dict):
            spec = {k: v for k, v in spec.items() if k not in _POD_SPEC_DROP}
            for key in ("containers", "initContainers"):
                if isinstance(spec.get(key), list):
                    spec[key] = [{k: c[k] for k in _CONTAINER_KEEP if k in c} if isinstance(c, dict) else c
                                 for c in spec[key]]
            spec.pop("ephemeralContainers", None)
            out["spec"] = spec
    elif kind == "Node":
        status = out.get("status")
        if isinstance(status, dict):
            out["status"] = {k: status[k] for k in _NODE_STATUS_KEEP if k in status}
    return out


# -- backoff (pure apart from the random source) ---------------------------------

class Backoff:
    """Capped exponential backoff with jitter: delays in [d/2, d], d doubling to ``maximum``."""

    def __init__(self, minimum: float = 0.2, maximum: float = 30.0,
                 rand: Callable[[], float] = random.random) -> None:
        self.minimum, self.maximum, self._rand = minimum, maximum, rand
        self.failures = 0

    def next(self) -> float:
        ceiling = min(self.maximum, self.minimum * (2 ** self.failures))
        self.failures += 1
        return ceiling * (0.5 + 0.5 * self._rand())

    def reset(self) -> None:
        self.failures = 0


# -- watched kinds ------------------------------------------------------------------

@dataclass(frozen=True)
class WatchedKind:
    name: str                   # the resource (plural) name, used in logs and status
    kind: str
    group: str                  # "" for the core group
    versions: tuple[str, ...]   # tried in order; all 404 = not installed (only if optional)
    optional: bool = False


KNOWN_KINDS = (
    WatchedKind("namespaces", "Namespace", "", ("v1",)),
    WatchedKind("nodes", "Node", "", ("v1",)),
    WatchedKind("pods", "Pod", "", ("v1",)),
    WatchedKind("services", "Service", "", ("v1",)),
    WatchedKind("endpointslices", "EndpointSlice", "discovery.k8s.io", ("v1",)),
    WatchedKind("authorizationpolicies", "AuthorizationPolicy", ISTIO_SECURITY, ("v1", "v1beta1"), True),
    WatchedKind("peerauthentications", "PeerAuthentication", ISTIO_SECURITY, ("v1", "v1beta1"), True),
    WatchedKind("serviceentries", "ServiceEntry", ISTIO_NETWORKING, ("v1", "v1beta1", "v1alpha3"), True),
    WatchedKind("workloadentries", "WorkloadEntry", ISTIO_NETWORKING, ("v1", "v1beta1", "v1alpha3"), True),
)
_BY_NAME = {k.name: k for k in KNOWN_KINDS}

# What the node agent reads (enrolment, routing, policy). Not Nodes: no
# agent code reads them, and the chart's RBAC does not grant them (a kind
# the API forbids never syncs, and the source would never be ready).
AGENT_KINDS = ("namespaces", "pods", "services", "endpointslices", "authorizationpolicies",
               "peerauthentications", "serviceentries", "workloadentries")
# What the CA reads: the pods on the caller's node.
CA_KINDS = ("pods",)
WATCHED_KINDS = tuple(_BY_NAME[n] for n in AGENT_KINDS)


def watched_kinds(kinds) -> tuple[WatchedKind, ...]:
    """``WatchedKind``s from kinds or their resource names (``"pods"``)."""
    out = []
    for k in kinds:
        if isinstance(k, WatchedKind):
            out.append(k)
        elif k in _BY_NAME:
            out.append(_BY_NAME[k])
        else:
            raise ValueError(f"unknown kind {k!r} for the kube state source; known: "
                             f"{', '.join(_BY_NAME)}")
    if not out:
        raise ValueError("the kube state source needs at least one kind to watch")
    return tuple(out)


@dataclass
class KindStatus:
    """What one kind's loop has done: read by ``sync_status()`` (and the metrics)."""
    synced: bool = False
    resource_version: str = ""
    served_version: str | None = None   # the API version in use; None while a CRD is absent
    absent: bool = False                # an optional kind whose CRD is not installed
    lists: int = 0
    relists: int = 0                    # lists after a 410 Gone
    watches: int = 0
    errors: int = 0
    last_error: str = ""
    last_event_time: float = 0.0        # wall clock of the last event or bookmark
    objects: int = 0


class _Gone(Exception):
    """The resourceVersion is no longer in the server's history (410)."""


class _Absent(Exception):
    """Every version of an optional kind answered 404."""


@dataclass
class _Waiter:
    loop: asyncio.AbstractEventLoop
    event: asyncio.Event
    pending: bool = False


class KubeStateSource:
    """The cluster state from the Kubernetes API (see the module docstring)."""

    def __init__(self, kubeconfig: str | None = None, *, in_cluster: bool | None = None,
                 kinds=WATCHED_KINDS, watch_timeout: int = 300,
                 backoff_min: float = 0.2, backoff_max: float = 30.0, crd_retry_interval: float = 60.0,
                 coalesce: float = 0.05, sync_timeout: float = 60.0, page_size: int = 500,
                 connect_timeout: float = 5.0, request_timeout: float = 30.0) -> None:
        self.kinds = kinds = watched_kinds(kinds)
        self.watch_timeout = watch_timeout
        self.backoff_min, self.backoff_max = backoff_min, backoff_max
        self.crd_retry_interval = crd_retry_interval
        self.coalesce = coalesce
        self.sync_timeout = sync_timeout
        self.page_size = page_size
        self.connect_timeout, self.request_timeout = connect_timeout, request_timeout
        self.api_client, self.description = _api_client(kubeconfig, in_cluster)
        self._lock = threading.Lock()
        self._stores: dict[str, dict[tuple[str, str], dict]] = {k.name: {} for k in kinds}
        self.status: dict[str, KindStatus] = {k.name: KindStatus() for k in kinds}
        self._generation = 0                # bumped by every store change
        self._built: tuple[int, ClusterState] | None = None
        self._build_seconds = 0.0           # how long the last ClusterState build took
        self._reported_errors: set[str] = set()
        self._stop = threading.Event()
        self._synced = threading.Event()
        self._threads: list[threading.Thread] = []
        self._responses: set = set()        # open watch responses, closed by close()
        self._waiters: list[_Waiter] = []
        self._first_load = True
        self._logged: dict[str, str] = {}   # kind -> last error message logged

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        """Start the list/watch threads (idempotent; ``load()`` and ``watch()`` call it)."""
        with self._lock:
            if self._threads or self._stop.is_set():
                return
            for kind in self.kinds:
                t = threading.Thread(target=self._run_kind, args=(kind,), daemon=True,
                                     name=f"kube-{kind.name}")
                self._threads.append(t)
        for t in self._threads:
            t.start()

    def close(self) -> None:
        """Stop every thread and close the client's connections."""
        self._stop.set()
        with self._lock:
            responses = list(self._responses)
        for resp in responses:
            _close_response(resp)
        for t in self._threads:
            t.join(5)
        self.api_client.close()

    @property
    def synced(self) -> bool:
        """True once every kind has completed a full list (it stays True across relists)."""
        return self._synced.is_set()

    def wait_synced(self, timeout: float | None = None) -> bool:
        self.start()
        return self._synced.wait(timeout)

    def sync_status(self) -> dict:
        """Per-kind sync state for metrics and status output (a copy)."""
        with self._lock:
            kinds = {name: dict(vars(st)) for name, st in self.status.items()}
        last = max((k["last_event_time"] for k in kinds.values()), default=0.0)
        return {"synced": self.synced, "source": self.description, "last_event_time": last,
                "kinds": kinds}

    # -- the FileStateSource contract ------------------------------------------------

    def load(self) -> ClusterState:
        """The current state; the first call waits for the first full sync.

        Raises ``StateError`` when the first sync does not finish within
        ``sync_timeout`` (the message carries the errors seen), or, later,
        while still not synced. Never blocks after the first call.
        """
        self.start()
        if self._first_load:
            self._first_load = False
            if not self._synced.wait(self.sync_timeout):
                raise StateError(f"Kubernetes API {self.description}: not synced after "
                                 f"{self.sync_timeout:g} s ({self._unsynced_reasons()})")
        if not self.synced:
            raise StateError(f"Kubernetes API {self.description}: not synced yet "
                             f"({self._unsynced_reasons()})")
        return self._snapshot()[1]

    async def watch(self, on_change: Callable[[ClusterState], None], interval: float = 0.2) -> None:
        """Call ``on_change`` with each new state, once synced. Runs until cancelled.

        ``interval`` is accepted for the source contract; changes are pushed,
        not polled, and a burst is coalesced over ``coalesce`` seconds.
        The state ``load()`` returned last is not reported again.
        """
        waiter = _Waiter(asyncio.get_running_loop(), asyncio.Event())
        with self._lock:
            self._waiters.append(waiter)
            reported = self._built[0] if self._built is not None else None
        waiter.event.set()      # report the state present now, if synced and new
        self.start()
        try:
            while True:
                await waiter.event.wait()
                # Let the burst land, and keep rebuilds (which hold the
                # loop: ~50-130 ms for 10,000 pods) to a fifth of its time
                # under sustained churn.
                await asyncio.sleep(max(self.coalesce, 4 * self._build_seconds))
                with self._lock:
                    waiter.pending = False
                    waiter.event.clear()
                if not self.synced:
                    continue
                generation, state = self._snapshot()
                if generation == reported:
                    continue
                reported = generation
                try:
                    on_change(state)
                except Exception:   # a consumer's bug must not stop the watch
                    log.exception("applying cluster state (resourceVersion %s) failed",
                                  state.resource_version)
        finally:
            with self._lock:
                self._waiters.remove(waiter)

    # -- writes --------------------------------------------------------------------------

    def annotate_pod(self, namespace: str, name: str, annotations: dict[str, str | None]) -> dict:
        """Merge-patch the pod's annotations (``None`` deletes a key); returns the patched pod.

        Raises ``KubeError`` saying what failed (not found, forbidden, unreachable).
        """
        from kubernetes import client
        for key, value in annotations.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, str)):
                raise ValueError(f"annotation {key!r}={value!r}: keys and values must be strings "
                                 "(None deletes)")
        body = {"metadata": {"annotations": dict(annotations)}}
        try:
            resp = client.CoreV1Api(self.api_client).patch_namespaced_pod(
                name, namespace, body, _content_type="application/merge-patch+json",
                _preload_content=False, _request_timeout=(self.connect_timeout, self.request_timeout))
            # _preload_content=False: the raw urllib3 response, not the V1Pod the types promise.
            return json.loads(cast(Any, resp).data)
        except Exception as exc:
            raise KubeError(f"annotate pod {namespace}/{name} via {self.description}: "
                            f"{_describe(exc)}") from None

    async def annotate_pod_async(self, namespace: str, name: str,
                                 annotations: dict[str, str | None]) -> dict:
        """``annotate_pod`` off the event loop (the client blocks for up to ``request_timeout``)."""
        return await asyncio.to_thread(self.annotate_pod, namespace, name, annotations)

    # -- snapshot ------------------------------------------------------------------------

    def _snapshot(self) -> tuple[int, ClusterState]:
        with self._lock:
            if self._built is not None and self._built[0] == self._generation:
                return self._built
            generation = self._generation
            items = [o for k in self.kinds for o in self._stores[k.name].values()]
            versions = [st.resource_version for st in self.status.values()]
        # All kinds share etcd's revision counter: the newest one names the state.
        numeric = [int(v) for v in versions if v.isdigit()]
        started = time.perf_counter()
        state = ClusterState.from_items(items, str(max(numeric)) if numeric else "")
        self._build_seconds = time.perf_counter() - started
        # Each problem once, not on every rebuild while the object stays bad.
        for err in set(state.errors) - self._reported_errors:
            log.warning("cluster state from %s: skipped %s", self.description, err)
        self._reported_errors = set(state.errors)
        with self._lock:
            if self._built is None or self._built[0] < generation:
                self._built = (generation, state)
        return generation, state

    def _changed(self) -> None:
        """A store changed (called with the lock held): wake every watcher, once per burst."""
        self._generation += 1
        for w in self._waiters:
            if not w.pending:
                w.pending = True
                try:
                    w.loop.call_soon_threadsafe(w.event.set)
                except RuntimeError:        # the loop is closed
                    pass

    def _unsynced_reasons(self) -> str:
        with self._lock:
            parts = [f"{name}: {st.last_error or 'listing'}" for name, st in self.status.items()
                     if not st.synced]
        return "; ".join(parts) or "synced"

    # -- one kind's list/watch loop (a thread) -----------------------------------------

    def _run_kind(self, kind: WatchedKind) -> None:
        backoff = Backoff(self.backoff_min, self.backoff_max)
        st = self.status[kind.name]
        rv: str | None = None       # None: a list is needed
        version = kind.versions[0]
        gone_in_a_row = 0
        while not self._stop.is_set():
            try:
                if rv is None:
                    try:
                        version, rv = self._list(kind)
                    except _Absent:
                        self._set_absent(kind)
                        backoff.reset()
                        self._stop.wait(self.crd_retry_interval)
                        continue
                    backoff.reset()
                events = self._watch(kind, version, rv)
                rv = self.status[kind.name].resource_version or rv
                gone_in_a_row = 0
                if events == 0 and not self._stop.is_set():
                    # A stream that ended without a single event or bookmark
                    # may be a server ending watches at once: do not spin.
                    self._stop.wait(backoff.next())
                else:
                    backoff.reset()
            except Exception as exc:    # the loop must survive anything the network does
                if self._stop.is_set():
                    return
                if isinstance(exc, _Gone) or _status_of(exc) == 410:
                    # 410 as an ERROR event or as the watch's HTTP status.
                    with self._lock:
                        st.relists += 1
                    log.info("kube %s: resourceVersion %s expired (410 Gone), relisting", kind.name, rv)
                    rv = None
                    gone_in_a_row += 1
                    if gone_in_a_row > 1:
                        # A fresh list's version already too old: do not hammer the server.
                        self._stop.wait(backoff.next())
                    continue
                message = _describe(exc)
                if _status_of(exc) == 404 and kind.optional:
                    rv = None           # the CRD went away under the watch: list again
                with self._lock:
                    st.errors += 1
                    st.last_error = message
                delay = backoff.next()
                if self._logged.get(kind.name) != message:
                    self._logged[kind.name] = message
                    log.warning("kube %s via %s: %s (retrying in %.1f s)", kind.name, self.description,
                                message, delay)
                self._stop.wait(delay)

    def _list(self, kind: WatchedKind) -> tuple[str, str]:
        """List (every page) and replace the store; returns (API version used, resourceVersion)."""
        for version in kind.versions:
            try:
                items, rv = self._list_version(kind, version)
            except Exception as exc:
                if kind.optional and _status_of(exc) == 404:
                    continue
                raise
            api_version = f"{kind.group}/{version}" if kind.group else version
            store = {_key(obj): obj for obj in items}
            with self._lock:
                st = self.status[kind.name]
                self._stores[kind.name] = store
                first = not st.synced
                st.synced, st.absent, st.served_version = True, False, version
                st.resource_version, st.lists, st.objects = rv, st.lists + 1, len(store)
                st.last_error = ""
                self._logged.pop(kind.name, None)
                self._mark_synced()
                self._changed()
            if first:
                log.info("kube %s: listed %d (%s, resourceVersion %s)", kind.name, len(store),
                         api_version, rv)
            return version, rv
        raise _Absent()

    def _set_absent(self, kind: WatchedKind) -> None:
        with self._lock:
            st = self.status[kind.name]
            was_absent = st.absent and st.synced
            had = bool(self._stores[kind.name])
            self._stores[kind.name] = {}
            st.synced, st.absent, st.served_version, st.objects = True, True, None, 0
            st.resource_version = ""
            self._mark_synced()
            if had or not was_absent:
                self._changed()
        if not was_absent:
            log.info("kube %s: %s %s is not served (CRD not installed); checking again every %g s",
                     kind.name, kind.group, "/".join(kind.versions), self.crd_retry_interval)

    def _mark_synced(self) -> None:
        # With the lock held, before _changed(): a woken watcher must see it.
        if not self._synced.is_set() and all(s.synced for s in self.status.values()):
            self._synced.set()
            log.info("kube state source %s: first sync complete", self.description)

    def _list_func(self, kind: WatchedKind, version: str):
        from kubernetes import client
        if kind.group == "":
            core = client.CoreV1Api(self.api_client)
            return {"namespaces": core.list_namespace, "nodes": core.list_node,
                    "pods": core.list_pod_for_all_namespaces,
                    "services": core.list_service_for_all_namespaces}[kind.name], ()
        if kind.group == "discovery.k8s.io":
            return client.DiscoveryV1Api(self.api_client).list_endpoint_slice_for_all_namespaces, ()
        return (client.CustomObjectsApi(self.api_client).list_cluster_custom_object,
                (kind.group, version, kind.name))

    def _list_version(self, kind: WatchedKind, version: str) -> tuple[list, str]:
        """Every page, each trimmed as it arrives (never all raw pages at once)."""
        func, args = self._list_func(kind, version)
        api_version = f"{kind.group}/{version}" if kind.group else version
        items: list = []
        token = None
        while True:
            kwargs = {"limit": self.page_size, "_preload_content": False,
                      "_request_timeout": (self.connect_timeout, self.request_timeout)}
            if token:
                kwargs["_continue"] = token
            try:
                resp = func(*args, **kwargs)
            except Exception as exc:
                if _status_of(exc) == 410 and token:
                    # The continue token expired mid-list: start over.
                    items, token = [], None
                    continue
                raise
            body = json.loads(resp.data)
            page = body.get("items") or []
            if not isinstance(page, list):
                raise ValueError(f"{kind.name} list: items is not an array")
            items.extend(_compact_page(page, kind.kind, api_version))
            meta = body.get("metadata") or {}
            del body, page
            token = meta.get("continue")
            if not token:
                return items, str(meta.get("resourceVersion") or "")

    def _watch(self, kind: WatchedKind, version: str, rv: str) -> int:
        """One watch stream from ``rv`` until it ends; returns the number of events (bookmarks too)."""
        from kubernetes.watch.watch import iter_resp_lines
        func, args = self._list_func(kind, version)
        api_version = f"{kind.group}/{version}" if kind.group else version
        resp = func(*args, watch=True, resource_version=rv, allow_watch_bookmarks=True,
                    timeout_seconds=self.watch_timeout, _preload_content=False,
                    # The server ends the stream at timeoutSeconds; a read
                    # timeout beyond that catches a dead connection.
                    _request_timeout=(self.connect_timeout, self.watch_timeout + 30))
        st = self.status[kind.name]
        with self._lock:
            self._responses.add(resp)
            st.watches += 1
        count = 0
        try:
            for line in iter_resp_lines(resp):
                if self._stop.is_set():
                    break
                if not line or line.isspace():
                    continue
                event = json.loads(line)
                etype, obj = event.get("type"), event.get("object")
                if etype == "ERROR":
                    code = obj.get("code") if isinstance(obj, dict) else None
                    if code == 410:
                        raise _Gone()
                    message = obj.get("message") if isinstance(obj, dict) else obj
                    raise _WatchError(code, f"watch error event: {code} {message}")
                if not isinstance(obj, dict) or not isinstance(obj.get("metadata"), dict):
                    raise ValueError(f"{kind.name} watch: {etype} event without an object")
                new_rv = str(obj["metadata"].get("resourceVersion") or "")
                count += 1
                with self._lock:
                    st.last_event_time = time.time()
                    if new_rv:
                        st.resource_version = new_rv
                    if etype == "BOOKMARK":
                        continue
                    obj.setdefault("kind", kind.kind)
                    obj.setdefault("apiVersion", api_version)
                    key = _key(obj)
                    store = self._stores[kind.name]
                    if etype in ("ADDED", "MODIFIED"):
                        store[key] = trim_object(obj)
                    elif etype == "DELETED":
                        store.pop(key, None)
                    else:
                        raise ValueError(f"{kind.name} watch: unknown event type {etype!r}")
                    st.objects = len(store)
                    self._changed()
        finally:
            with self._lock:
                self._responses.discard(resp)
            _close_response(resp)
        return count


class _WatchError(Exception):
    def __init__(self, code, message: str) -> None:
        super().__init__(message)
        self.status = code


def _compact_page(page: list, kind: str, api_version: str) -> list[dict]:
    """The page's objects, with kind/apiVersion filled in, trimmed, in fresh memory.

    A trimmed object would otherwise keep pieces of the parsed page alive
    (labels, conditions) scattered between the freed rest, and pymalloc
    cannot give such fragmented arenas back; one JSON round trip of the
    trimmed page packs the kept objects together (and makes repeated keys
    shared strings). Measured: see MEMORY_PER_10K_PODS.
    """
    kept = []
    for item in page:
        if isinstance(item, dict):
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
            kept.append(trim_object(item))
    return json.loads(json.dumps(kept))


def _key(obj: dict) -> tuple[str, str]:
    # A malformed object is stored too: ClusterState.from_items skips it
    # and says why, which beats failing the whole kind.
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = {}
    return (meta.get("namespace") or "", meta.get("name") or "")


def _status_of(exc: BaseException) -> int | None:
    status = getattr(exc, "status", None)
    return status if isinstance(status, int) else None


def _describe(exc: BaseException) -> str:
    """A one-line reason: the API's Status message when there is one."""
    status = _status_of(exc)
    body = getattr(exc, "body", None)
    if status and body:
        try:
            doc = json.loads(body)
            return f"HTTP {status} {doc.get('reason') or ''}: {doc.get('message') or ''}".strip()
        except (ValueError, TypeError, AttributeError):
            pass
    if status:
        return f"HTTP {status}: {getattr(exc, 'reason', '') or exc}"
    text = " ".join(str(exc).split())
    # urllib3 wraps the interesting part ("Connection refused") deep inside.
    if "Connection refused" in text:
        return "connection refused"
    return f"{type(exc).__name__}: {text[:300]}"


def _close_response(resp) -> None:
    try:
        resp.close()
        resp.release_conn()
    except Exception:
        pass


def _api_client(kubeconfig: str | None, in_cluster: bool | None):
    """An ApiClient and a description, from a kubeconfig path, in-cluster, or the defaults
    (``agent.kubeclient``)."""
    try:
        from kubernetes import client
    except ImportError as exc:
        raise StateError(f"the kube state source needs the kubernetes client ({exc})") from None
    try:
        cfg, where = load_configuration(kubeconfig, in_cluster=in_cluster)
    except KubeConfigError as exc:
        raise StateError(f"kube state source: {exc}") from None
    cfg.connection_pool_maxsize = len(KNOWN_KINDS) + 4
    cfg.retries = False
    return client.ApiClient(cfg), f"{cfg.host} ({where})"
