"""Connection handling for one enrolled pod's listeners.

* outbound (15001): the original destination comes from the orig_dst map;
  ``route.resolve`` says how to reach it: HBONE to a meshed pod (directly
  or behind a Service), plain TCP otherwise. Every connection the agent
  makes starts inside the pod's network namespace and carries the agent's
  mark, so it is not captured again.
* inbound plaintext (15006): the original destination is the accepted
  socket's local address (sk_lookup does not rewrite); the policy hook
  decides with no peer identity, then the agent connects to the app from
  inside the pod (sk_lookup lets that through: source = the pod itself).
* HBONE (15008): mutual TLS with this pod's certificate, then one HTTP/2
  CONNECT stream per tunnelled connection: checked, authorised by the
  policy hook with the peer's identity, connected to the app, answered 200.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.capture.datapath import AGENT_MARK, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT, CaptureDatapath
from agent.capture.inpod import PodListeners
from agent.netns import NetnsSwitcher
from agent.observe.metrics import TcpMetrics, labels_for
from agent.observe.problems import ProblemLog
from agent.observe.service import forwarded_host, forwarded_with_host, inbound_service, service_hostname
from agent.policy.request import InboundRequest, PolicyDecision, allow_all
from agent.proxy import hbone
from agent.proxy.appsock import LINGER_RESET, Pipe, set_nodelay
from agent.proxy.copy import ByteCounter, abort, start_splice
from agent.proxy.counters import ConnectionLog, DirectionCounters, PodCounters
from agent.proxy.h2conn import H2Connection, H2Stream
from agent.proxy.result import ConnectionResult
from agent.proxy.route import Route, resolve
from agent.proxy.tls import TlsContexts, check_client_identity
from agent.proxy.tunnel import HbonePool, PoolKey, start_bridge
from agent.state.model import ClusterState, Pod

log = logging.getLogger(__name__)

AGENT_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT})


@dataclass
class DataPlane:
    """What every pod's proxy shares on this node."""
    state: Callable[[], ClusterState]
    trust_domain: str
    tls: TlsContexts | None
    pool: HbonePool
    log: ConnectionLog
    policy: Callable[[InboundRequest], PolicyDecision] = allow_all
    connect_timeout: float = 5.0
    metrics: TcpMetrics | None = None              # Istio's istio_tcp_* series
    access: Callable[[object], None] | None = None  # access log sink, one line per connection
    handshakes: HandshakeLimits = field(default_factory=lambda: HandshakeLimits())
    # Refused and failed connections: every one in the access log, each
    # distinct problem once a minute in this log (issue 11, item 7).
    problems: ProblemLog = field(default_factory=lambda: ProblemLog(log))


@dataclass
class HandshakeLimits:
    """What unauthenticated peers can make the agent hold on 15008 (issue 11, item 2).

    A TLS server transport allocates its buffers (asyncio: 256 KiB each) the
    moment it is created, before a byte arrives; a silent TCP connection
    used to cost ~325 KB until the agent ran out of memory. Now an accepted
    connection first waits, holding only its socket, until the peer sends
    its ClientHello (at most ``first_byte_seconds``, at most ``waiting``
    such connections per pod). Only then does TLS start, with at most
    ``per_pod`` handshakes in flight per pod and ``per_node`` per node; a
    connection over a limit is reset at once (the peer may retry).
    """
    first_byte_seconds: float = 5.0
    waiting: int = 1024
    per_pod: int = 64
    per_node: int = 256
    in_flight: int = 0        # node-wide handshakes now


class PodProxy:
    """Accept loops and forwarding for one pod."""

    def __init__(self, pod: str, identity: str, pod_ips: list[str], workload: dict,
                 listeners: PodListeners, datapath: CaptureDatapath, switcher: NetnsSwitcher,
                 counters: PodCounters, plane: DataPlane) -> None:
        self.pod = pod
        self.identity = identity
        self.pod_ips = pod_ips
        self.workload = workload
        self.listeners = listeners
        self.datapath = datapath
        self.switcher = switcher
        self.counters = counters
        self.plane = plane
        self._tasks: set[asyncio.Task] = set()      # connections being set up
        self._accepting: list[asyncio.Task] = []
        self._servers: set[H2Connection] = set()
        self._label_state: ClusterState | None = None
        self._label_cache: dict[tuple, dict] = {}
        self._service_state: ClusterState | None = None
        self._service_cache: dict[tuple, tuple[str, str]] = {}   # (port, named host) -> ("ns/name", SE host)
        self._hbone_waiting = 0        # accepted on 15008, no ClientHello yet
        self._hbone_handshaking = 0
        # Open connections (no task of their own: their pipe's end finishes
        # their result) and, for inbound ones, what they were authorised as,
        # so that a policy change can close those the new policy denies.
        self._open: dict[Pipe, InboundRequest | None] = {}

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        for sock in self.listeners.outbound:
            self._accepting.append(asyncio.ensure_future(self._accept(sock, self._outbound)))
        for inbound, hbone_sock in ((self.listeners.inbound, self.listeners.hbone),
                                    (self.listeners.inbound6, self.listeners.hbone6)):
            if inbound is not None and hbone_sock is not None:   # the IPv6 pair may be absent
                self._accepting.append(asyncio.ensure_future(self._accept(inbound, self._inbound)))
                self._accepting.append(asyncio.ensure_future(self._accept(hbone_sock, self._hbone)))

    async def stop_accepting(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting.clear()
        self.plane.pool.retire_source(self.listeners.cookie)
        for conn in list(self._servers):
            conn.goaway()        # HTTP/2 GOAWAY: peers open no new streams here

    def open_connections(self) -> int:
        return len(self._open) + len(self._tasks)

    async def drain(self, deadline: float) -> None:
        """Let open connections finish until ``deadline`` seconds, then cut them (reset)."""
        waiting = set(self._tasks) | {pipe.done for pipe in self._open}
        if waiting:
            _done, _pending = await asyncio.wait(waiting, timeout=deadline)
            for task in self._tasks:
                task.cancel()
            for pipe in list(self._open):
                pipe.abort()
            await asyncio.gather(*self._tasks, *(p.done for p in list(self._open)), return_exceptions=True)
        for conn in list(self._servers):
            conn.close()

    async def _accept(self, listener: socket.socket, handle: Callable) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except asyncio.CancelledError:
                raise
            except OSError as exc:
                if listener.fileno() < 0:
                    return
                self.plane.problems.report(logging.WARNING, ("accept", self.pod, str(exc.errno)),
                                           "pod %s: accept failed: %s", self.pod, exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            if listener is not self.listeners.hbone and listener is not self.listeners.hbone6:
                # An application's connection: from accept on, a close by the
                # kernel (the agent died) resets it instead of ending it with a
                # FIN that the application could take for a complete stream.
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            self._spawn(self._guard(handle, conn, peer))

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, handle, conn: socket.socket, peer) -> None:
        try:
            await handle(conn, peer)
        except asyncio.CancelledError:
            abort(conn)
            raise
        except Exception as exc:   # one bad connection never affects the others
            self.plane.problems.report(logging.ERROR, ("bug", self.pod, type(exc).__name__),
                                       "pod %s: connection from %s failed", self.pod, peer, exc_info=True)
            abort(conn)

    # -- metrics -----------------------------------------------------------

    def _own_pod(self) -> Pod | None:
        ns, _, name = self.pod.partition("/")
        return self.plane.state().pod_view(ns, name)

    def _labels(self, reporter: str, source_pod, source_id, dest_pod, dest_id, service: str = "",
                mtls: bool = False, service_host: str = "") -> dict | None:
        """Istio's label set for a connection, shared by every connection that has it.

        A set is 19 strings in a dict (~1.2 KB) held by the connection's result
        and meter for its whole life; the connections of one pair of workloads
        share one, cached for the current cluster state (label sets are never
        changed once made). Bounded: a state with more distinct pairs than
        ``_LABEL_CACHE`` starts the cache afresh.
        """
        if self.plane.metrics is None:
            return None
        state = self.plane.state()
        if state is not self._label_state or len(self._label_cache) >= _LABEL_CACHE:
            self._label_state, self._label_cache = state, {}
        key = (reporter, _pod_key(source_pod), source_id, _pod_key(dest_pod), dest_id, service, service_host, mtls)
        labels = self._label_cache.get(key)
        if labels is None:
            labels = self._label_cache[key] = labels_for(
                reporter, source_pod, source_id or None, dest_pod, dest_id or None, service or None, mtls,
                domain=self.plane.trust_domain, service_host=service_host or None)
        return labels

    def _inbound_service(self, port: int, host: str = "") -> tuple[str, str]:
        """The service an inbound connection to ``port`` was for, as (``namespace/name``,
        ServiceEntry host or ""), ``("", "")`` if none (``agent/observe/service.py``),
        cached per state like the label sets: the answer depends on the port and on the
        service hostname the client's proxy named (``Forwarded: host=``), nothing else."""
        state = self.plane.state()
        if state is not self._service_state or len(self._service_cache) >= _LABEL_CACHE:
            self._service_state, self._service_cache = state, {}
        key = (port, host)
        found = self._service_cache.get(key)
        if found is None:
            own = self._own_pod()
            found = self._service_cache[key] = inbound_service(
                state, own.raw if own is not None else None, port, host, self.plane.trust_domain) or ("", "")
        return found

    # -- policy changes ----------------------------------------------------

    def _track(self, result: ConnectionResult, pipe: Pipe, counted: ByteCounter,
               request: InboundRequest | None = None) -> None:
        """The connection is open: its pipe's end finishes the result."""
        self._open[pipe] = request
        pipe.done.add_done_callback(lambda _f: self._open.pop(pipe, None))
        result.track(pipe, counted)

    def revalidate(self) -> int:
        """Close open inbound connections that the current policy denies; returns how many."""
        closed = 0
        for pipe, request in list(self._open.items()):
            if request is None or pipe.done.done():
                continue
            decision = self.plane.policy(request)
            if not decision.allowed:
                log.info("pod %s: closing inbound %s:%d -> %s:%d (%s): policy now denies it: %s",
                         self.pod, request.source_ip, request.source_port, request.destination_ip,
                         request.destination_port, request.source_identity or "plaintext", decision.reason)
                pipe.abort()
                closed += 1
        return closed

    # -- helpers -----------------------------------------------------------

    async def _dial_peer(self, dst: tuple[str, int]) -> socket.socket:
        """An HBONE connection to a peer agent (closed normally: TLS and HTTP/2 end it)."""
        return await self._connect_from_pod(dst, app=False)

    async def _connect_from_pod(self, dst: tuple[str, int], app: bool = True) -> socket.socket:
        """A connection that starts inside the pod's namespace, exempt from capture.

        ``app``: it carries an application's bytes, so a crash of the agent
        must reset it rather than end it (SO_LINGER 0 until an orderly close).
        """
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        sock = self.switcher.socket_here(self.listeners.netns_fd, family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
            if app:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            sock.setblocking(False)
            async with asyncio.timeout(self.plane.connect_timeout):   # no extra task, unlike wait_for
                await loop.sock_connect(sock, dst)
        except BaseException:
            sock.close()
            raise
        return sock

    def _result(self, direction: str, protocol: str, counters: DirectionCounters, source,
                destination=("0.0.0.0", 0), **kw) -> ConnectionResult:
        return ConnectionResult(self.plane, self.pod, direction, protocol, counters, source,
                                destination, **kw)

    # -- outbound ----------------------------------------------------------

    async def _outbound(self, conn: socket.socket, peer) -> None:
        # The application's own address: its socket is bound to the pod's IP
        # unless it talked to loopback, which is never captured.
        source = (_same_family(self.pod_ips, peer[0]), peer[1])
        own = self._own_pod()
        result = self._result("outbound", "TCP", self.counters.outbound, source,
                              labels=self._labels("source", own, self.identity, None, None))
        dst = self.datapath.original_destination(self.listeners.cookie, peer[0], peer[1])
        if dst is None:
            result.fail("no original destination recorded")
            abort(conn)
            return
        result.destination = (dst.ip, dst.port)
        route = resolve(self.plane.state(), dst.ip, dst.port, self.plane.trust_domain, salt=peer[1],
                        namespace=self.pod.partition("/")[0])
        # ztunnel: destination_principal is a known destination workload's
        # identity, meshed or not; unknown only outside the cluster.
        dest_id = route.identity or (route.pod.identity_uri(self.plane.trust_domain) if route.pod else "")
        result.labels = self._labels("source", own, self.identity, route.pod, dest_id, route.service,
                                     mtls=route.kind == "hbone", service_host=route.service_host)
        if route.kind == "no-endpoint":
            result.fail(route.reason)
            abort(conn)
            return
        if route.kind == "passthrough":
            await self._plain(conn, (route.ip, route.port), result)
            return
        result.protocol = "HBONE"
        result.source_identity, result.destination_identity = self.identity, route.identity
        await self._outbound_hbone(conn, route, source, result)

    async def _outbound_hbone(self, conn, route, source, result: ConnectionResult) -> None:
        target = hbone.ConnectTarget(route.ip, route.port)
        try:
            if self.plane.tls is None:
                raise ConnectionError("no CA configured: this agent cannot speak HBONE")
            # One deadline for the certificate, the pooled (or new) connection
            # and the CONNECT's answer; asyncio.timeout adds no task per call.
            async with asyncio.timeout(self.plane.connect_timeout):
                ctx = await self.plane.tls.context(self.identity, server_side=False)
                key = PoolKey(self.identity, route.identity, (route.ip, HBONE_PORT), self.listeners.cookie)
                headers = hbone.connect_request_headers(target, source, self.workload)
                if route.service:
                    headers = _with_service_host(headers, route, self.plane.trust_domain)
                stream, response = await self.plane.pool.stream(key, ctx, self._dial_peer, headers)
        except (TimeoutError, OSError, ConnectionError) as exc:
            result.fail(str(exc) or type(exc).__name__)
            abort(conn)
            return
        status = hbone.response_status(response)
        if status != 200:
            stream.reset()
            result.refuse(f"status {status}")
            abort(conn)
            return
        counted = ByteCounter()
        pipe = await start_bridge(conn, stream, counted, self.counters.outbound, sock_is_app=True)
        self._track(result, pipe, counted)

    async def _plain(self, conn, dst, result: ConnectionResult, app_is_client: bool = True,
                     request: InboundRequest | None = None) -> None:
        try:
            upstream = await self._connect_from_pod(dst)
        except (TimeoutError, OSError) as exc:
            result.fail(str(exc) or "timed out")
            abort(conn)    # the app sees a reset, as from an unreachable peer
            return
        counted = ByteCounter()
        # splice's first socket faces the pod's application.
        app, other = (conn, upstream) if app_is_client else (upstream, conn)
        pipe = await start_splice(app, other, counted, result.counters)
        self._track(result, pipe, counted, request)

    # -- inbound plaintext -------------------------------------------------

    async def _inbound(self, conn: socket.socket, peer) -> None:
        local_ip, port = conn.getsockname()[:2]
        result = self._result("inbound", "TCP", self.counters.inbound, peer, (local_ip, port),
                              app_is_source=False)
        if port in AGENT_PORTS:
            # Not in the metrics: ztunnel refuses a call to its own ports before
            # it builds a connection result (log_early_deny).
            result.refuse(f"port {port} belongs to the mesh agent")
            abort(conn)
            return
        service, service_host = self._inbound_service(port)
        result.labels = self._labels("destination", self.plane.state().pod_view_by_ip(peer[0]), None,
                                     self._own_pod(), self.identity, service, service_host=service_host)
        request = InboundRequest(self.pod, peer[0], peer[1], local_ip, port, None)
        decision = result.decision = self.plane.policy(request)
        if not decision.allowed:
            result.refuse(decision.reason)
            abort(conn)
            return
        await self._plain(conn, (local_ip, port), result, app_is_client=False, request=request)

    # -- inbound HBONE -----------------------------------------------------

    async def _hbone(self, conn: socket.socket, peer) -> None:
        loop = asyncio.get_running_loop()
        # One result for the TLS connection itself: it records only a refusal
        # (each stream on an accepted connection gets its own result).
        result = self._result("hbone", "HBONE", self.counters.hbone, peer, (self.pod_ips[0], HBONE_PORT))
        if self.plane.tls is None:
            result.refuse("no CA configured")
            abort(conn)
            return
        try:
            ctx = await asyncio.wait_for(self.plane.tls.context(self.identity, server_side=True),
                                         self.plane.connect_timeout)
        except (TimeoutError, OSError) as exc:
            result.refuse(f"no certificate for {self.identity} yet ({exc or 'timed out'})")
            abort(conn)
            return
        trust_domain = self.plane.trust_domain
        refusal: list[str] = []

        def verify(transport) -> str:
            try:
                return check_client_identity(transport.get_extra_info("ssl_object"), trust_domain)
            except Exception as exc:      # H2Connection refuses the peer; the record says why
                refusal.append(str(exc) or type(exc).__name__)
                raise

        name = f"pod {self.pod} hbone from {peer[0]}:{peer[1]}"
        set_nodelay(conn)        # asyncio leaves Nagle on for proto-0 sockets (appsock.set_nodelay)
        refused = await self._admit_handshake(conn)
        if refused:
            result.refuse(refused)
            abort(conn)
            return
        limits = self.plane.handshakes
        limits.in_flight += 1
        self._hbone_handshaking += 1
        try:
            transport, _proto = await loop.connect_accepted_socket(
                lambda: H2Connection(client_side=False, on_request=self._hbone_stream_for(peer), name=name,
                                     verify=verify),
                sock=conn, ssl=ctx, ssl_handshake_timeout=self.plane.connect_timeout)
        except (TimeoutError, OSError, ConnectionError) as exc:
            result.refuse(f"TLS handshake failed: {exc or 'timed out'}")
            return
        finally:
            limits.in_flight -= 1
            self._hbone_handshaking -= 1
        # The transport's protocol, not the returned one: uvloop returns its
        # SSLProtocol there for accepted sockets (asyncio returns ours, and its
        # transport forgets ours once the connection is lost: a refused peer).
        proto = transport.get_protocol()
        if not isinstance(proto, H2Connection):
            proto = _proto
        if not isinstance(proto, H2Connection) or proto.closed:
            # Refused by verify (a certificate without exactly one SPIFFE
            # identity of our trust domain) or gone at once: one record either way.
            if refusal:
                result.refuse(f"peer identity: {refusal[0]}")
            else:
                result.fail("connection closed right after the TLS handshake")
            return
        self._servers.add(proto)
        try:
            await proto.serve()
        finally:
            self._servers.discard(proto)

    async def _admit_handshake(self, conn: socket.socket) -> str:
        """Wait for the peer's first bytes, then take a handshake slot; "" or why not."""
        limits = self.plane.handshakes
        if self._hbone_waiting >= limits.waiting:
            return f"{limits.waiting} connections of this pod already wait for a TLS ClientHello"
        loop = asyncio.get_running_loop()
        readable = loop.create_future()
        fd = conn.fileno()
        self._hbone_waiting += 1
        def wake() -> None:
            if not readable.done():
                readable.set_result(True)
        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(readable, limits.first_byte_seconds)
        except TimeoutError:
            return f"no TLS ClientHello within {limits.first_byte_seconds:g}s"
        finally:
            loop.remove_reader(fd)
            self._hbone_waiting -= 1
        if self._hbone_handshaking >= limits.per_pod:
            return f"{limits.per_pod} TLS handshakes of this pod already in flight"
        if limits.in_flight >= limits.per_node:
            return f"{limits.per_node} TLS handshakes of this node already in flight"
        return ""

    def _hbone_stream_for(self, peer):
        async def handle(stream: H2Stream) -> None:
            await self._hbone_stream(stream, peer)
        return handle

    async def _hbone_stream(self, stream: H2Stream, peer) -> None:
        source_id = stream.conn.peer_identity
        headers = dict(stream.request_headers)
        # The peer's agent connects from inside the client pod, so the TCP peer
        # address is the client's and cannot be chosen by the client. The
        # forwarded header is only believed when it names that same address
        # (it then adds the application's port); policy never trusts it alone.
        claimed = _forwarded_for(headers.get("forwarded", ""))
        source = claimed if claimed and claimed[0] == peer[0] else (peer[0], peer[1])
        result = self._result("hbone", "HBONE", self.counters.hbone, source, (self.pod_ips[0], 0),
                              source_identity=source_id, destination_identity=self.identity,
                              app_is_source=False, count=False)
        checked = hbone.check_connect(stream.request_headers, self.pod_ips)
        if isinstance(checked, hbone.Refusal):
            # Not in the metrics: ztunnel answers a malformed CONNECT before it
            # builds a connection result (log_early_deny).
            stream.respond(checked.status, end=True)
            result.refuse(f"{checked.status} {checked.reason}")
            return
        service, service_host = self._inbound_service(checked.port, forwarded_host(headers.get("forwarded", "")))
        result.labels = self._labels("destination", self.plane.state().pod_view_by_ip(source[0]), source_id,
                                     self._own_pod(), self.identity, service, mtls=True, service_host=service_host)
        dst = result.destination = (checked.ip, checked.port)
        request = InboundRequest(self.pod, source[0], source[1], checked.ip, checked.port, source_id)
        decision = result.decision = self.plane.policy(request)
        if not decision.allowed:
            stream.respond(401, end=True)
            result.refuse(f"401 {decision.reason}")
            return
        try:
            app = await self._connect_from_pod(dst)
        except (TimeoutError, OSError) as exc:
            stream.respond(503, end=True)
            result.decision = None
            result.refuse(f"503 app unreachable: {exc or 'timed out'}")
            return
        except asyncio.CancelledError:
            result.refuse("stream reset by the client before the application was reached")
            raise
        bag = hbone.baggage(self.workload)
        stream.respond(200, [("baggage", bag)] if bag else [])
        counted = ByteCounter()
        pipe = await start_bridge(app, stream, counted, self.counters.hbone, sock_is_app=True)
        self._track(result, pipe, counted, request)


_LABEL_CACHE = 1024


def _pod_key(pod: Pod | None) -> tuple | None:
    return (pod.namespace, pod.name, pod.uid) if pod is not None else None


def _with_service_host(headers: list[tuple[str, str]], route: Route, domain: str) -> list[tuple[str, str]]:
    """The CONNECT headers with ``host=<service hostname>`` in ``forwarded``, as
    ztunnel's outbound ``build_forwarded`` writes it: the destination then
    reports the Service (or ServiceEntry host) the client addressed
    (``agent/observe/service.py``)."""
    ns, _, name = route.service.partition("/")
    host = route.service_host or service_hostname(ns, name, domain)
    return [(k, forwarded_with_host(v, host)) if k == "forwarded" else (k, v) for k, v in headers]


def _same_family(pod_ips: list[str], peer_ip: str) -> str:
    """The pod's first address of ``peer_ip``'s family (an IPv6 connection's
    peer on [::1]:15001 is ::1, not the pod's IPv4 address); else ``peer_ip``."""
    v6 = ":" in peer_ip
    return next((ip for ip in pod_ips if (":" in ip) == v6), peer_ip)


def _forwarded_for(value: str) -> tuple[str, int] | None:
    """The client address from ``forwarded: for="ip:port"``, if well formed."""
    for part in value.split(";"):
        key, _, val = part.strip().partition("=")
        if key.lower() == "for":
            try:
                target = hbone.parse_authority(val.strip('"'))
            except ValueError:
                return None
            return target.ip, target.port
    return None
