"""HBONE tunnels: the client connection pool and the TCP <-> stream bridge.

Outbound, streams to the same peer share TLS + HTTP/2 connections, keyed by
(source identity, destination identity, destination address), at most 100
streams each. Idle connections are closed after ``idle_timeout``; a PING
every ``keepalive_interval`` detects dead peers.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import h2.errors

from agent.proxy.appsock import Pipe, set_nodelay, wrap
from agent.proxy.copy import ByteCounter
from agent.proxy.h2conn import H2Connection, H2Stream
from agent.proxy.tls import PeerIdentityError, check_server_identity

log = logging.getLogger(__name__)


async def start_bridge(sock: socket.socket, stream: H2Stream, counter: ByteCounter,
                       totals=None, sock_is_app: bool = True) -> Pipe:
    """Start carrying bytes between a TCP socket and an HBONE stream.

    FIN -> END_STREAM and END_STREAM -> FIN (half-close); TCP reset ->
    RST_STREAM(CONNECT_ERROR) and RST_STREAM -> TCP reset (RFC 9113 8.5).
    ``sock_is_app``: the socket faces the pod's application (counted as
    "sent" when it writes); otherwise the stream does. The returned pipe's
    ``done`` resolves "closed" or "reset"; the socket is closed by then.

    The bytes move from callback to callback (``appsock``): the socket's
    reads go into h2 at once, DATA frames go to the socket from the
    connection's ``data_received``.
    """
    up_attr, down_attr = ("sent", "received") if sock_is_app else ("received", "sent")
    pipe = Pipe(counter, totals)
    try:
        tcp = await wrap(sock, pipe, up_attr)
    except BaseException:
        stream.reset(h2.errors.ErrorCodes.CONNECT_ERROR)
        raise
    tcp.attach(stream)
    stream.attach(tcp, pipe, down_attr)
    pipe.ends = (tcp, stream)
    return pipe


async def bridge(sock: socket.socket, stream: H2Stream, counter: ByteCounter,
                 totals=None, sock_is_app: bool = True) -> str:
    """``start_bridge`` and wait: returns "closed" or "reset" (cancelling resets both)."""
    pipe = await start_bridge(sock, stream, counter, totals, sock_is_app)
    try:
        return await asyncio.shield(pipe.done)
    except asyncio.CancelledError:
        pipe.abort()
        raise


@dataclass(frozen=True)
class PoolKey:
    """Which pooled connections a stream may use.

    ``source_netns`` (the cookie of the network namespace the connection is
    dialled from) is part of it because a pooled connection carries its
    source pod's address: two replicas with one identity on one node must
    not share connections, or the server would see one pod's traffic coming
    from the other, and a pod whose capture moved must not reuse
    connections from its old namespace.
    """
    source_identity: str
    destination_identity: str
    address: tuple[str, int]
    source_netns: int = 0


Dialer = Callable[[tuple[str, int]], Awaitable[socket.socket]]


@dataclass
class _Pooled:
    conn: H2Connection
    keepalive: asyncio.Task | None = None


class HbonePool:
    def __init__(self, idle_timeout: float = 60.0, keepalive_interval: float = 30.0,
                 ping_timeout: float = 10.0, connect_timeout: float = 5.0) -> None:
        self.idle_timeout = idle_timeout
        self.keepalive_interval = keepalive_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self._conns: dict[PoolKey, list[_Pooled]] = {}
        self._dialing: dict[PoolKey, asyncio.Future] = {}
        self.connections_opened = 0

    def connections(self) -> int:
        return sum(len(v) for v in self._conns.values())

    async def stream(self, key: PoolKey, ctx: ssl.SSLContext, dial: Dialer,
                     headers: list[tuple[str, str]]) -> tuple[H2Stream, list]:
        """Open a CONNECT stream to ``key.address``, reusing a pooled connection."""
        conn = await self._connection(key, ctx, dial)
        return await conn.open_stream(headers)

    async def _connection(self, key: PoolKey, ctx: ssl.SSLContext, dial: Dialer) -> H2Connection:
        while True:
            for pooled in self._conns.get(key, []):
                if pooled.conn.capacity() > 0:
                    return pooled.conn
            waiting = self._dialing.get(key)
            if waiting is None:
                break
            await asyncio.shield(waiting)     # someone is dialling this peer: share it
        fut = asyncio.get_running_loop().create_future()
        self._dialing[key] = fut
        try:
            conn = await asyncio.wait_for(self._dial(key, ctx, dial), self.connect_timeout)
            pooled = _Pooled(conn)
            self._conns.setdefault(key, []).append(pooled)
            pooled.keepalive = asyncio.ensure_future(self._maintain(key, pooled))
            self.connections_opened += 1
            return conn
        finally:
            del self._dialing[key]
            fut.set_result(None)

    async def _dial(self, key: PoolKey, ctx: ssl.SSLContext, dial: Dialer) -> H2Connection:
        loop = asyncio.get_running_loop()
        sock = await dial(key.address)
        set_nodelay(sock)        # asyncio leaves Nagle on for proto-0 sockets (appsock.set_nodelay)
        name = f"hbone {key.source_identity} -> {key.destination_identity} at {key.address[0]}:{key.address[1]}"
        try:
            # server_hostname="": no SNI (ztunnel sends none) and no hostname
            # check; the identity is checked from the URI SAN below.
            transport, conn = await loop.create_connection(
                lambda: H2Connection(client_side=True, name=name), sock=sock, ssl=ctx,
                server_hostname="")
        except BaseException:
            sock.close()
            raise
        try:
            check_server_identity(transport.get_extra_info("ssl_object"), key.destination_identity)
        except PeerIdentityError:
            transport.abort()
            raise
        return conn

    async def _maintain(self, key: PoolKey, pooled: _Pooled) -> None:
        loop = asyncio.get_running_loop()
        conn = pooled.conn
        try:
            while not conn.closed:
                tick = min(self.keepalive_interval, self.idle_timeout)
                try:
                    await asyncio.wait_for(asyncio.shield(conn.done), tick)
                    break
                except TimeoutError:
                    pass
                idle_for = loop.time() - conn.last_activity
                if not conn.streams and idle_for >= self.idle_timeout:
                    log.debug("%s: idle for %.0fs, closing", conn.name, idle_for)
                    conn.close()
                    break
                if idle_for >= self.keepalive_interval and not await conn.ping(self.ping_timeout):
                    log.info("%s: keepalive PING unanswered, closing", conn.name)
                    conn.close()
                    break
        finally:
            entries = self._conns.get(key, [])
            if pooled in entries:
                entries.remove(pooled)
            if not entries:
                self._conns.pop(key, None)

    def retire_source(self, netns: int) -> None:
        """A pod's capture ended: its pooled connections take no new streams
        (GOAWAY) and close once their open streams have finished."""
        for key, entries in list(self._conns.items()):
            if key.source_netns == netns:
                for pooled in list(entries):
                    pooled.conn.goaway()
                    entries.remove(pooled)
                if not entries:
                    self._conns.pop(key, None)

    async def close(self, graceful: bool = True) -> None:
        for entries in list(self._conns.values()):
            for pooled in list(entries):
                if graceful:
                    pooled.conn.goaway()
                else:
                    pooled.conn.close()
