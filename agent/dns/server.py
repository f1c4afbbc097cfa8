"""The DNS proxy's I/O shell: one per captured pod, on the pod's port 15053.

bpf/dns.c steers the pod's port-53 queries (UDP and TCP) to the sockets
``agent.capture.inpod`` opened inside the pod's network namespace; this
serves them with the sans-IO ``Resolver`` and forwards what it does not
answer to the pod's own upstream resolvers (its /etc/resolv.conf, read from
a process of the pod: ``PodResolvConf``). Upstream sockets are made inside
the pod's namespace and carry the agent's mark (0x539), which the capture
programs exempt; so a pod reaches exactly the resolvers it would reach
without the mesh.

Bounded per pod: queries in flight (``MAX_IN_FLIGHT``; over it, SERVFAIL),
a query rate (``TokenBucket``; over it, dropped), TCP connections
(``MAX_TCP_CONNECTIONS``; over it, closed), answers buffered for a TCP client
that does not read (``MAX_TCP_BUFFERED``; over it, cut off), query size
(``MAX_QUERY_BYTES``).
One pod's flood therefore costs other pods nothing but CPU.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from agent.dns.resolver import (
    MAX_QUERY_BYTES,
    Drop,
    Forward,
    Reply,
    ResolvConf,
    Resolver,
    TokenBucket,
    matches,
    parse_resolv_conf,
    truncated,
)
from agent.netns import NetnsSwitcher

log = logging.getLogger(__name__)

AGENT_MARK = 0x539        # bpf/common.h AGENT_MARK: exempt from capture
UPSTREAM_PORT = 53
UPSTREAM_TIMEOUT = 2.0    # per upstream server and attempt (glibc's default is 5 s for all)
MAX_IN_FLIGHT = 64
MAX_TCP_CONNECTIONS = 16
TCP_IDLE_SECONDS = 10.0
MAX_TCP_BUFFERED = 256 * 1024   # answers waiting for a TCP client that does not read
QUERY_RATE = 2000.0       # queries per second per pod, bursts of QUERY_BURST
QUERY_BURST = 4000.0
RESOLV_CONF_TTL = 30.0    # re-read the pod's resolv.conf at most this often


@dataclass
class DnsCounters:
    """Queries of one pod by outcome (``Reply.outcome`` and friends)."""
    outcomes: Counter = field(default_factory=Counter)
    udp: int = 0
    tcp: int = 0

    def snapshot(self) -> dict:
        return {"udp": self.udp, "tcp": self.tcp, "outcomes": dict(sorted(self.outcomes.items()))}


class PodResolvConf:
    """The pod's /etc/resolv.conf as its processes see it.

    Read through ``/proc/<pid>/root`` of a process in the pod's network
    namespace, preferring one in another mount namespace than the agent's
    (a container's); cached for ``RESOLV_CONF_TTL``. Before any container
    runs (CNI ADD comes first) and when none can be read, the agent's own
    /etc/resolv.conf: ztunnel forwards to its own resolvers too.

    Finding that process scans the node's /proc (milliseconds on a busy
    node), so reads run on a worker thread: the event loop carrying every
    pod's traffic never waits for a scan. The pod's first query waits for
    the first read (made then, not at capture: the containers run by then);
    later, a stale answer serves while the next read runs.
    """

    def __init__(self, netns_fd: int, proc: str = "/proc", clock: Callable[[], float] = time.monotonic) -> None:
        st = os.fstat(netns_fd)
        self.netns = (st.st_dev, st.st_ino)
        self.proc = proc
        self.clock = clock
        self._cached: ResolvConf | None = None
        self._at = 0.0
        self._refreshing: asyncio.Future | None = None
        self.source = ""

    async def current(self) -> ResolvConf:
        """The pod's resolvers as last read (the first time: once read); a read
        older than ``RESOLV_CONF_TTL`` starts a new one in the background."""
        if self._cached is None:
            self._refresh()
            assert self._refreshing is not None
            try:
                await asyncio.shield(self._refreshing)     # its callback has stored the result
            except Exception as exc:     # _read handles OSError: a bug, not the pod's fault
                log.error("reading a pod's resolv.conf failed: %r", exc)
        elif self.clock() - self._at > RESOLV_CONF_TTL:
            self._refresh()
        return self._cached or ResolvConf((), ())

    def _refresh(self) -> None:
        """Read on a worker thread, unless a read is under way (event loop thread)."""
        if self._refreshing is not None:
            return
        self._at = self.clock()       # a failed read is retried after the TTL, not at every query
        self._refreshing = asyncio.get_running_loop().run_in_executor(None, self._read)

        def done(fut: asyncio.Future) -> None:
            self._refreshing = None
            if not fut.cancelled() and fut.exception() is None:
                self._store(fut.result())
        self._refreshing.add_done_callback(done)

    def _store(self, read: tuple[ResolvConf, str]) -> None:
        self._cached, self.source = read
        self._at = self.clock()

    def _read(self) -> tuple[ResolvConf, str]:
        try:
            own_mnt = os.stat(f"{self.proc}/self/ns/mnt").st_ino
        except OSError:
            own_mnt = -1
        fallback = None
        for entry in os.listdir(self.proc):
            if not entry.isdigit():
                continue
            try:
                st = os.stat(f"{self.proc}/{entry}/ns/net")
                if (st.st_dev, st.st_ino) != self.netns:
                    continue
                if os.stat(f"{self.proc}/{entry}/ns/mnt").st_ino == own_mnt:
                    fallback = fallback or entry
                    continue
                path = f"{self.proc}/{entry}/root/etc/resolv.conf"
                with open(path) as fh:
                    return parse_resolv_conf(fh.read()), path
            except OSError:
                continue
        path = f"{self.proc}/{fallback}/root/etc/resolv.conf" if fallback else "/etc/resolv.conf"
        try:
            with open(path) as fh:
                return parse_resolv_conf(fh.read()), path
        except OSError:
            return ResolvConf((), ()), ""


class PodDns:
    """The DNS proxy of one pod: its UDP and TCP sockets on port 15053."""

    def __init__(self, key: str, resolver: Resolver, udp: list[socket.socket], tcp: list[socket.socket],
                 netns_fd: int, switcher: NetnsSwitcher, counters: DnsCounters,
                 on_outcome: Callable[[str], None] = lambda outcome: None,
                 upstream: Callable[[], Awaitable[ResolvConf]] | None = None) -> None:
        self.key = key
        self.resolver = resolver
        self._udp_socks = udp
        self._tcp_socks = tcp
        self.netns_fd = netns_fd
        self.switcher = switcher
        self.counters = counters
        self.on_outcome = on_outcome
        self.upstream = upstream or PodResolvConf(netns_fd).current
        self.bucket = TokenBucket(QUERY_RATE, QUERY_BURST)
        self.in_flight = 0
        self.tcp_connections = 0
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[asyncio.AbstractServer] = []
        self._tasks: set[asyncio.Task] = set()
        self._starting: asyncio.Future | None = None

    def begin(self) -> None:
        """Start serving (from the event loop's thread); failures are logged, the pod's
        queries then find no listener and fail (the pod is not left uncaptured)."""
        self._starting = asyncio.ensure_future(self.start())

        def done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                log.error("pod %s: DNS proxy did not start: %s", self.key, task.exception())
        self._starting.add_done_callback(done)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._udp_socks:
            transport, _ = await loop.create_datagram_endpoint(lambda: _UdpServer(self), sock=sock)
            self._transports.append(transport)
        for sock in self._tcp_socks:
            self._servers.append(await asyncio.start_server(self._serve_tcp, sock=sock))

    def stop(self) -> None:
        """Stop serving and close the sockets; queries in flight are abandoned."""
        if self._starting is not None:
            self._starting.cancel()
        for transport in self._transports:
            transport.close()
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        self._transports.clear()
        self._servers.clear()

    def _count(self, outcome: str) -> None:
        self.counters.outcomes[outcome] += 1
        self.on_outcome(outcome)

    # -- one query -----------------------------------------------------------

    def query(self, wire: bytes, udp: bool, respond: Callable[[bytes], None]) -> None:
        if udp:
            self.counters.udp += 1
        else:
            self.counters.tcp += 1
        if not self.bucket.take():
            self._count("ratelimited")
            return
        decision = self.resolver.decide(wire, udp)
        if isinstance(decision, Reply):
            self._count(decision.outcome)
            respond(decision.wire)
        elif isinstance(decision, Drop):
            self._count(decision.outcome)
        elif self.in_flight >= MAX_IN_FLIGHT:
            reply = Resolver.upstream_reply(decision, None)
            self._count("overloaded")
            respond(reply.wire)
        else:
            self.in_flight += 1
            task = asyncio.ensure_future(self._forward(decision, udp, respond))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _forward(self, fwd: Forward, udp: bool, respond: Callable[[bytes], None]) -> None:
        try:
            answer = None
            for server in (await self.upstream()).nameservers[:3]:      # glibc's MAXNS
                try:
                    answer = await (self._ask_udp(server, fwd) if udp else self._ask_tcp(server, fwd))
                    if answer is not None and udp and truncated(answer):
                        # The upstream's answer did not fit in UDP: ask again over TCP, and
                        # pass the whole answer on if it fits in the client's UDP size;
                        # else the truncated one, and the client asks us over TCP.
                        whole = await self._ask_tcp(server, fwd)
                        if whole is not None and len(whole) <= fwd.max_udp:
                            answer = whole
                except (TimeoutError, OSError) as exc:
                    log.debug("pod %s: upstream %s for %s: %s", self.key, server, fwd.question, exc)
                    answer = None
                if answer is not None:
                    break
            reply = Resolver.upstream_reply(fwd, answer)
            self._count(reply.outcome)
            respond(reply.wire)
        finally:
            self.in_flight -= 1

    def _upstream_socket(self, server: str, kind: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in server else socket.AF_INET
        sock = self.switcher.socket_here(self.netns_fd, family, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def _ask_udp(self, server: str, fwd: Forward) -> bytes | None:
        loop = asyncio.get_running_loop()
        with self._upstream_socket(server, socket.SOCK_DGRAM) as sock:
            # UDP: connect() only sets the peer and a datagram on a fresh socket
            # is sent whole at once (or raises): neither needs the event loop.
            sock.connect((server, UPSTREAM_PORT))
            sock.send(fwd.query)
            async with asyncio.timeout(UPSTREAM_TIMEOUT):      # one deadline, no extra task
                while True:
                    data = await loop.sock_recv(sock, 65535)
                    if matches(fwd, data):
                        return data     # anything else (a stray or late datagram) is ignored

    async def _ask_tcp(self, server: str, fwd: Forward) -> bytes | None:
        loop = asyncio.get_running_loop()
        with self._upstream_socket(server, socket.SOCK_STREAM) as sock:
            async def exchange() -> bytes:
                await loop.sock_connect(sock, (server, UPSTREAM_PORT))
                await loop.sock_sendall(sock, len(fwd.query).to_bytes(2, "big") + fwd.query)
                size = int.from_bytes(await _recv_exactly(loop, sock, 2), "big")
                return await _recv_exactly(loop, sock, size)
            return await asyncio.wait_for(exchange(), UPSTREAM_TIMEOUT)

    # -- TCP clients ---------------------------------------------------------

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.tcp_connections >= MAX_TCP_CONNECTIONS:
            self._count("tcp_refused")
            writer.close()
            return
        self.tcp_connections += 1
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_SECONDS)
                size = int.from_bytes(head, "big")
                if size > MAX_QUERY_BYTES:
                    self.counters.tcp += 1
                    self._count("formerr")
                    break       # a query this long is no query: drop the connection
                wire = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_SECONDS)
                self.query(wire, False, lambda out: _write_bounded(writer, out))
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.tcp_connections -= 1
            writer.close()


def _write_bounded(writer: asyncio.StreamWriter, wire: bytes) -> None:
    """One answer on a TCP connection; a client that sends queries without reading
    the answers is cut off once ``MAX_TCP_BUFFERED`` bytes wait for it."""
    if writer.is_closing():
        return
    writer.write(len(wire).to_bytes(2, "big") + wire)
    if writer.transport.get_write_buffer_size() > MAX_TCP_BUFFERED:
        writer.transport.abort()


async def _recv_exactly(loop: asyncio.AbstractEventLoop, sock: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ConnectionError("upstream closed the connection")
        buf += chunk
    return buf


class _UdpServer(asyncio.DatagramProtocol):
    def __init__(self, pod: PodDns) -> None:
        self.pod = pod
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        transport = self.transport

        def respond(wire: bytes) -> None:
            if transport is not None and not transport.is_closing():
                transport.sendto(wire, addr)
        self.pod.query(data, True, respond)

    def error_received(self, exc: Exception) -> None:
        log.debug("pod %s: DNS socket: %s", self.pod.key, exc)
