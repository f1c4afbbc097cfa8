"""Istio-compatible TCP metrics and the agent's own health metrics.

Everything lives on a private ``CollectorRegistry`` (never the process-wide
default one), so several agents, or tests, can share a process.

TCP metrics use exactly ztunnel's names and label set, so Istio dashboards
and Kiali work unchanged:

    istio_tcp_connections_opened_total   istio_tcp_connections_closed_total
    istio_tcp_sent_bytes_total           istio_tcp_received_bytes_total
    istio_tcp_connections_failed_total

Byte direction follows Istio (and ztunnel): ``istio_tcp_received_bytes_total``
counts what the *destination received* (request bytes, source -> destination)
and ``istio_tcp_sent_bytes_total`` what the *destination sent back* (response
bytes, destination -> source), for both reporters. The API here takes bytes
as ``ConnectionRecord`` does (``sent`` = source -> destination) and does the
mapping, so callers never need to think about it.

Cardinality is bounded: labels name workloads, identities and services,
never a connection, an address or a port number.

Label values follow ztunnel: ``*_app``/``*_version`` are the canonical
service/revision, ``source_principal`` is set only from a verified mTLS peer
identity, anything unknown is ``"unknown"``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.state.model import Pod

UNKNOWN = "unknown"
DEFAULT_CLUSTER = "Kubernetes"
DEFAULT_DOMAIN = "cluster.local"

REPORTERS = ("source", "destination")

# Response flags ztunnel uses (plus Envoy's TLS one the brief asks for).
FLAG_NONE = "-"
FLAG_DENY = "DENY"                    # authorization policy refused the connection
FLAG_CONNECT = "CONNECT"              # the upstream (or HBONE CONNECT) failed
FLAG_TLS_FAILURE = "TLS_FAILURE"      # mTLS handshake or identity check failed

MUTUAL_TLS = "mutual_tls"

# Istio's label set, in ztunnel's order. Every TCP series carries all of them.
TCP_LABELS: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_canonical_service", "source_canonical_revision",
    "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_cluster",
    "destination_service", "destination_service_namespace", "destination_service_name",
    "destination_workload", "destination_canonical_service", "destination_canonical_revision",
    "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_cluster",
    "request_protocol", "response_flags", "connection_security_policy",
)

# ---------------------------------------------------------------------------
# Workload names (pure)

# The rules themselves live with the typed pod (``agent.state.model.Pod``:
# ``workload_owner``, ``workload_metadata``, ``workload_info``), computed once
# per pod and state. These accept a ``Pod`` or a wire object (tests, callers
# that hold one).

def _view(pod: Pod | Mapping | None) -> Pod | None:
    if not pod:
        return None
    return pod if isinstance(pod, Pod) else Pod.from_dict(dict(pod))


def workload_owner(pod: Pod | Mapping | None) -> tuple[str, str]:
    """``(kind, name)`` of the workload that owns ``pod``, as Istio derives it (``Pod.workload_owner``)."""
    view = _view(pod)
    return view.workload_owner if view is not None else ("Pod", "")


def workload_name(pod: Pod | Mapping | None) -> str:
    """The owning workload's name (Deployment, StatefulSet, ...); see ``workload_owner``."""
    return workload_owner(pod)[1]


def workload_info(pod: Pod | Mapping | None) -> dict:
    """The workload facts metrics label (``Pod.workload_info``); ``{}`` for no pod."""
    view = _view(pod)
    return view.workload_info() if view is not None else {}


# ---------------------------------------------------------------------------
# Labels (pure)

def _v(value) -> str:
    return str(value) if value not in (None, "") else UNKNOWN


def _side(prefix: str, pod: Pod | Mapping | None, cluster: str) -> dict[str, str]:
    info = workload_info(pod)
    known = bool(info)
    return {
        f"{prefix}_workload": _v(info.get("workload_name")),
        f"{prefix}_canonical_service": _v(info.get("canonical_service")),
        f"{prefix}_canonical_revision": _v(info.get("canonical_revision")),
        f"{prefix}_workload_namespace": _v(info.get("namespace")),
        f"{prefix}_app": _v(info.get("canonical_service")),
        f"{prefix}_version": _v(info.get("canonical_revision")),
        f"{prefix}_cluster": _v(cluster) if known else UNKNOWN,
    }


def labels_for(reporter: str, source_pod: Pod | Mapping | None, source_identity: str | None,
               destination_pod: Pod | Mapping | None, destination_identity: str | None,
               service: str | None, mtls: bool, flags: str = FLAG_NONE,
               cluster: str = DEFAULT_CLUSTER, domain: str = DEFAULT_DOMAIN,
               service_host: str | None = None) -> dict[str, str]:
    """The full Istio label set for one connection (pure; every value a string).

    ``reporter``: ``"source"`` (the agent serving the client pod, outbound)
    or ``"destination"`` (the agent serving the server pod, inbound/HBONE).
    ``source_identity``: the SPIFFE URI of the client, only when it is known
    (our own pod's identity as source reporter, or the verified mTLS peer as
    destination reporter); plaintext inbound passes ``None``.
    ``service``: ``"namespace/name"`` of the Service the client addressed, or None.
    ``service_host``: for a ServiceEntry, the host the client addressed
    (``service`` is then the entry's ``namespace/name``): as istiod tells
    ztunnel, the entry's host is the ``destination_service``, its name and
    namespace the other two labels. None: a Service, ``name.namespace.svc.<domain>``.
    ``flags``: ``"-"`` or an Envoy-style response flag (``DENY``, ``CONNECT``, ...).
    """
    if reporter not in REPORTERS:
        raise ValueError(f"reporter must be one of {REPORTERS}, not {reporter!r}")
    labels: dict[str, str] = {"reporter": reporter}
    labels.update(_side("source", source_pod, cluster))
    labels["source_principal"] = _v(source_identity)
    svc_ns = svc_name = None
    if service:
        svc_ns, sep, svc_name = service.partition("/")
        if not sep or not svc_ns or not svc_name:
            raise ValueError(f"service must be 'namespace/name', not {service!r}")
    labels["destination_service"] = (service_host or f"{svc_name}.{svc_ns}.svc.{domain}") if service else UNKNOWN
    labels["destination_service_namespace"] = _v(svc_ns)
    labels["destination_service_name"] = _v(svc_name)
    labels.update(_side("destination", destination_pod, cluster))
    labels["destination_principal"] = _v(destination_identity)
    labels["request_protocol"] = "tcp"
    labels["response_flags"] = flags or FLAG_NONE
    labels["connection_security_policy"] = MUTUAL_TLS if mtls else UNKNOWN
    return {name: labels[name] for name in TCP_LABELS}


def flags_for_outcome(outcome: str, policy: str = "") -> str:
    """The response flag for a ``ConnectionRecord`` outcome (pure).

    ``closed``/``reset`` -> ``-``; a policy refusal (HBONE ``401``, or an
    inbound refusal whose reason is the record's policy decision) -> ``DENY``;
    TLS/certificate problems -> ``TLS_FAILURE``; any other refusal or
    failure -> ``CONNECT`` (ztunnel's "could not establish the connection").
    """
    word, sep, reason = (outcome or "").partition(":")
    word, reason = word.strip(), reason.strip()
    if not sep or word not in ("refused", "failed"):
        return FLAG_NONE
    if reason.startswith("401") or (policy and word == "refused" and reason == policy.strip()):
        return FLAG_DENY
    lowered = reason.lower()
    if any(s in lowered for s in ("tls", "certificate", "no ca configured", "ssl")):
        return FLAG_TLS_FAILURE
    return FLAG_CONNECT


def with_flags(labels: Mapping[str, str], flags: str) -> dict[str, str]:
    """The same labels with another ``response_flags`` value."""
    out = dict(labels)
    out["response_flags"] = flags or FLAG_NONE
    return out


# ---------------------------------------------------------------------------
# TCP metrics (data path API)

class TcpMetrics:
    """Istio's TCP counters. Every method is cheap, thread-safe and never raises
    for label problems (missing labels become ``"unknown"``, extra ones are ignored)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        names = list(TCP_LABELS)
        # prometheus-client appends "_total" to counters: these are the bare names.
        self._opened = Counter("istio_tcp_connections_opened", "Total TCP connections opened",
                               names, registry=registry)
        self._closed = Counter("istio_tcp_connections_closed", "Total TCP connections closed",
                               names, registry=registry)
        self._sent = Counter("istio_tcp_sent_bytes", "Bytes sent during response (destination to source)",
                             names, registry=registry)
        self._received = Counter("istio_tcp_received_bytes",
                                 "Bytes received during request (source to destination)",
                                 names, registry=registry)
        self._failed = Counter("istio_tcp_connections_failed", "Total TCP connections that failed",
                               names, registry=registry)
        self._live: dict[int, ConnectionMeter] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _values(labels: Mapping[str, str]) -> list[str]:
        return [str(labels.get(name) or UNKNOWN) for name in TCP_LABELS]

    def opened(self, labels: Mapping[str, str]) -> None:
        self._opened.labels(*self._values(labels)).inc()

    def add_bytes(self, labels: Mapping[str, str], sent: int, received: int) -> None:
        """Add bytes moved so far: ``sent`` source -> destination, ``received`` back.

        (Istio names these from the destination's side: ``sent`` here goes to
        ``istio_tcp_received_bytes_total``, ``received`` to ``istio_tcp_sent_bytes_total``.)
        """
        values = self._values(labels)
        if sent > 0:
            self._received.labels(*values).inc(sent)
        if received > 0:
            self._sent.labels(*values).inc(received)

    def closed(self, labels: Mapping[str, str]) -> None:
        self._closed.labels(*self._values(labels)).inc()

    def failed(self, labels: Mapping[str, str]) -> None:
        self._failed.labels(*self._values(labels)).inc()

    # -- live connections ---------------------------------------------------

    def _open(self, labels: Mapping[str, str]) -> None:
        """ztunnel's ``ConnectionResultBuilder::build``: ``opened`` counts the
        connection with ``response_flags="-"`` (its flag is not known yet), and
        both byte series exist from then on, at 0 (``get_or_create``), so that
        ``rate()`` sees the first bytes of a pair instead of a series that
        starts at its first value."""
        values = self._values(labels)
        self._opened.labels(*values).inc()
        self._received.labels(*values)
        self._sent.labels(*values)

    def ended_early(self, labels: Mapping[str, str], flags: str) -> None:
        """A connection that ended before carrying bytes, with ``flags``.

        ztunnel's semantics (``src/proxy/metrics.rs``, ``ConnectionResult::
        record_internal``): it was opened (counted with ``-``), it is closed
        with its flag, and a failure flag (anything but ``-``) also counts
        it in ``istio_tcp_connections_failed_total``. Connections ztunnel
        refuses before it builds a result (a malformed CONNECT, a call to
        the agent's own ports) are not counted at all: callers pass no
        labels for those.
        """
        self._open(labels)
        flagged = with_flags(labels, flags)
        self.closed(flagged)
        if (flags or FLAG_NONE) != FLAG_NONE:
            self.failed(flagged)

    def connection(self, labels: Mapping[str, str],
                   totals: Callable[[], tuple[int, int]] | None = None) -> ConnectionMeter:
        """Count an opened connection (see ``_open``) and return its meter.

        ``totals`` returns the connection's cumulative ``(sent, received)``
        (source -> destination first); with it, ``sync_live()`` (called by
        the admin server before every scrape) advances the byte counters of
        long connections without any work on the data path.
        """
        meter = ConnectionMeter(self, labels, totals)
        self._open(meter.labels)
        if totals is not None:
            with self._lock:
                self._live[id(meter)] = meter
        return meter

    def sync_live(self) -> None:
        """Bring every live connection's byte counters up to date."""
        with self._lock:
            meters = list(self._live.values())
        for meter in meters:
            meter.sync()

    def live_connections(self) -> int:
        with self._lock:
            return len(self._live)

    def _forget(self, meter: ConnectionMeter) -> None:
        with self._lock:
            self._live.pop(id(meter), None)


class ConnectionMeter:
    """One connection's metrics: converts cumulative byte totals into counter increments."""

    def __init__(self, metrics: TcpMetrics, labels: Mapping[str, str],
                 totals: Callable[[], tuple[int, int]] | None) -> None:
        self.metrics = metrics
        # Shared, not copied: the data path passes one label set to every
        # connection of a workload pair, and never changes a set once made.
        self.labels = labels
        self._totals = totals
        self._sent = 0
        self._received = 0
        self._done = False
        self._lock = threading.Lock()

    def update(self, sent_total: int, received_total: int) -> None:
        """Record cumulative totals; only the growth since the last call is added."""
        with self._lock:
            if self._done:
                return
            ds, dr = max(sent_total - self._sent, 0), max(received_total - self._received, 0)
            self._sent += ds
            self._received += dr
        self.metrics.add_bytes(self.labels, ds, dr)

    def sync(self) -> None:
        if self._totals is not None:
            try:
                sent, received = self._totals()
            except Exception:        # a metrics source never breaks a scrape
                return
            self.update(sent, received)

    def fail(self, flags: str = FLAG_CONNECT) -> None:
        """The connection did not work out: closed with ``flags`` and counted as failed."""
        with self._lock:
            done = self._done
        self.close(flags)
        if not done:
            self.metrics.failed(with_flags(self.labels, flags))

    def close(self, flags: str | None = None, sent_total: int | None = None,
              received_total: int | None = None) -> None:
        """Final bytes, then ``closed`` (with ``flags`` if given). Idempotent."""
        if sent_total is not None or received_total is not None:
            self.update(sent_total if sent_total is not None else self._sent,
                        received_total if received_total is not None else self._received)
        else:
            self.sync()
        with self._lock:
            if self._done:
                return
            self._done = True
        self.metrics._forget(self)
        labels = with_flags(self.labels, flags) if flags is not None else self.labels
        self.metrics.closed(labels)


# ---------------------------------------------------------------------------
# Agent health

PACKAGE = "ambient-agent"


def agent_version() -> str:
    """This agent's version: the installed package's (``pyproject.toml``), or ``unknown``
    when run from a tree or bundle without package metadata."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version(PACKAGE)
    except (ImportError, PackageNotFoundError, ValueError):
        return UNKNOWN


class _LastSync:
    """``ambient_agent_state_last_sync_timestamp_seconds``: absent until the first sync.

    A plain gauge would read 0 before the first success, which an alert on
    ``time() - metric`` takes for "55 years ago"; absent is what
    ``absent(...)`` and Prometheus' staleness handle.
    """
    NAME = "ambient_agent_state_last_sync_timestamp_seconds"
    HELP = "Unix time the cluster state was last applied successfully (absent before the first sync)"

    def __init__(self) -> None:
        self.value: float | None = None

    def describe(self):
        return [GaugeMetricFamily(self.NAME, self.HELP)]

    def collect(self):
        if self.value is not None:
            yield GaugeMetricFamily(self.NAME, self.HELP, value=self.value)


class AgentMetrics:
    """The node agent's own health: gauges it sets, counters it bumps."""

    def __init__(self, registry: CollectorRegistry, clock: Callable[[], float] = time.time,
                 process: bool = True, version: str | None = None) -> None:
        self.registry = registry
        self._clock = clock
        self.enrolled_pods = Gauge("ambient_agent_enrolled_pods", "Pods captured by this agent",
                                   registry=registry)
        self.listeners = Gauge("ambient_agent_listeners", "Open in-pod listeners by kind",
                               ["kind"], registry=registry)
        self.bpf_programs = Gauge("ambient_agent_bpf_programs_attached", "BPF programs attached",
                                  registry=registry)
        # Set once per start (the one compile, agent/capture/loader.py); 0 until then.
        self.bpf_compile_seconds = Gauge(
            "ambient_agent_bpf_compile_seconds",
            "Seconds BCC took to compile the capture programs at this agent's start", registry=registry)
        self.bpf_loader_seconds = Gauge(
            "ambient_agent_bpf_loader_seconds",
            "Seconds the BPF loader process took at this agent's start (compile, attach, pin)",
            registry=registry)
        self.certificate_expiration = Gauge(
            "ambient_agent_certificate_expiration_timestamp_seconds",
            "Unix time the workload certificate of an identity expires (its notAfter)",
            ["identity"], registry=registry)
        # Deprecated (issue 12): a countdown gauge, which Prometheus' naming
        # guidance advises against. Kept for one release beside the timestamp.
        self.certificate_expiry = Gauge(
            "ambient_agent_certificate_expiry_seconds",
            "DEPRECATED, removed in the next release: use "
            "ambient_agent_certificate_expiration_timestamp_seconds - time(). "
            "Seconds until the workload certificate expires (negative: expired)",
            ["identity"], registry=registry)
        self.ca_requests = Counter("ambient_agent_ca_requests", "Certificate requests to the CA by result",
                                   ["result"], registry=registry)
        self.dns_queries = Counter("ambient_agent_dns_queries", "DNS queries of captured pods by outcome "
                                   "(local, nodata, forwarded, servfail, formerr, ...)", ["outcome"],
                                   registry=registry)
        self.state_sync_ok = Gauge("ambient_agent_state_sync_ok",
                                   "1 if the last cluster state load succeeded, else 0", registry=registry)
        # Deprecated (issue 12): reads 0 before the first sync. Kept for one release.
        self.state_sync_lag = Gauge("ambient_agent_state_sync_lag_seconds",
                                    "DEPRECATED, removed in the next release: use time() - "
                                    "ambient_agent_state_last_sync_timestamp_seconds. "
                                    "Seconds since the cluster state was last applied (0 before the first sync)",
                                    registry=registry)
        self.last_sync = _LastSync()
        registry.register(self.last_sync)
        self.pods_not_captured = Gauge(
            "ambient_agent_pods_not_captured",
            "Pods of this node the enrolment rule puts in the mesh that the agent could not capture "
            "(alert on > 0: their traffic is not meshed)", registry=registry)
        self.policy_rejected = Gauge("ambient_agent_policy_objects_rejected",
                                     "Policy objects rejected by the parser in the current state",
                                     registry=registry)
        self._last_sync: float | None = None
        self.state_sync_lag.set_function(self._lag)
        self._identities: set[str] = set()
        self.process = ProcessCollector(registry=registry) if process else None
        self.version = agent_version() if version is None else version
        # What Istio's ztunnel dashboard reads for its version panel
        # (ztunnel: src/metrics/meta.rs, "build" in the istio_ namespace).
        self.istio_build = Gauge("istio_build", "Istio component build info", ["component", "tag"],
                                 registry=registry)
        self.istio_build.labels("ztunnel", self.version).set(1)
        self.build_info = Gauge("ambient_agent_build_info", "This agent's build: always 1, the version as a label",
                                ["version"], registry=registry)
        self.build_info.labels(self.version).set(1)

    def _lag(self) -> float:
        return 0.0 if self._last_sync is None else max(self._clock() - self._last_sync, 0.0)

    def state_synced(self, ok: bool = True) -> None:
        """A cluster state load finished (``ok``) or failed; lag counts from the last success."""
        self.state_sync_ok.set(1 if ok else 0)
        if ok:
            self._last_sync = self.last_sync.value = self._clock()

    def bpf_loaded(self, compile_seconds: float | None, loader_seconds: float | None) -> None:
        """The start-up load's durations (None: not known, the gauge stays as it is)."""
        if compile_seconds is not None:
            self.bpf_compile_seconds.set(compile_seconds)
        if loader_seconds is not None:
            self.bpf_loader_seconds.set(loader_seconds)

    def set_listeners(self, counts: Mapping[str, int]) -> None:
        for kind, n in counts.items():
            self.listeners.labels(kind).set(n)

    def dns_query(self, outcome: str) -> None:
        """``outcome``: a bounded word from the DNS proxy (agent/dns)."""
        self.dns_queries.labels(outcome or UNKNOWN).inc()

    def ca_request(self, result: str) -> None:
        """``result``: a bounded word such as ``ok``, ``error``, ``timeout``, ``denied``."""
        self.ca_requests.labels(result or UNKNOWN).inc()

    def set_certificates(self, not_after: Mapping[str, float | None]) -> None:
        """Identity URI -> certificate ``not_after`` (Unix time; None: none yet).

        The series set is replaced: identities no longer held disappear.
        """
        for identity in (self._identities - set(not_after)) | {i for i, e in not_after.items() if e is None}:
            for gauge in (self.certificate_expiration, self.certificate_expiry):
                try:
                    gauge.remove(identity)
                except KeyError:
                    pass
        for identity, expiry in not_after.items():
            if expiry is None:
                continue
            self.certificate_expiration.labels(identity).set(expiry)

            def seconds_left(expiry: float = expiry) -> float:
                return expiry - self._clock()
            self.certificate_expiry.labels(identity).set_function(seconds_left)
        self._identities = {i for i, e in not_after.items() if e is not None}


class WithoutCreated:
    """A read-only view of a registry without the ``*_created`` series.

    prometheus-client adds a ``<name>_created`` timestamp to every counter
    child; Istio's endpoints have none, and they double the scrape size.
    ``generate_latest(WithoutCreated(registry))`` drops them without the
    process-wide ``disable_created_metrics()`` switch.
    """

    def __init__(self, registry: Collector) -> None:
        self.registry = registry

    def collect(self):
        for family in self.registry.collect():
            created = family.name + "_created"
            if any(s.name == created for s in family.samples):
                family.samples = [s for s in family.samples if s.name != created]
            yield family


class Metrics:
    """Both metric sets on one private registry: what the agent creates once."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Callable[[], float] = time.time,
                 process: bool = True, version: str | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self.tcp = TcpMetrics(self.registry)
        self.agent = AgentMetrics(self.registry, clock=clock, process=process, version=version)
