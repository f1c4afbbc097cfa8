"""Connection handling for one enrolled pod's listeners.

Until the HBONE data path lands (issue 3) captured connections are
forwarded to their original destination in plaintext, so that capture is
observable end to end:

* outbound (15001): original destination from the orig_dst map, a new
  connection from inside the pod's namespace (marked, so not captured again);
* inbound (15006): original destination = the accepted socket's local
  address (sk_lookup does not rewrite packets); the agent connects to the
  app from inside the pod, which sk_lookup lets through because the source
  is the pod's own address;
* HBONE (15008): accepted and counted, then closed — TLS and HTTP/2 CONNECT
  termination is issue 3. Nothing is forwarded from here yet.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Callable

from agent.capture.datapath import (AGENT_MARK, HBONE_PORT, INBOUND_PORT, OUTBOUND_PORT,
                                    CaptureDatapath)
from agent.capture.inpod import PodListeners
from agent.netns import NetnsSwitcher
from agent.proxy.copy import ByteCounter, abort, splice
from agent.proxy.counters import DirectionCounters, PodCounters

log = logging.getLogger(__name__)

# Ports of the agent itself: forwarding to them would loop back into the agent.
AGENT_PORTS = frozenset({OUTBOUND_PORT, INBOUND_PORT, HBONE_PORT})


class PodProxy:
    """Accept loops and forwarding for one pod."""

    def __init__(self, pod: str, listeners: PodListeners, datapath: CaptureDatapath,
                 switcher: NetnsSwitcher, counters: PodCounters,
                 connect_timeout: float = 5.0) -> None:
        self.pod = pod
        self.listeners = listeners
        self.datapath = datapath
        self.switcher = switcher
        self.counters = counters
        self.connect_timeout = connect_timeout
        self._tasks: set[asyncio.Task] = set()
        self._accepting: list[asyncio.Task] = []

    def start(self) -> None:
        for sock in self.listeners.outbound:
            self._accepting.append(asyncio.ensure_future(self._accept(sock, self._outbound)))
        self._accepting.append(asyncio.ensure_future(self._accept(self.listeners.inbound, self._inbound)))
        self._accepting.append(asyncio.ensure_future(self._accept(self.listeners.hbone, self._hbone)))

    async def stop_accepting(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        self._accepting.clear()

    async def drain(self, deadline: float) -> None:
        """Let open connections finish until ``deadline`` seconds, then cut them."""
        if self._tasks:
            _done, pending = await asyncio.wait(set(self._tasks), timeout=deadline)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

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
                log.warning("pod %s: accept failed: %s", self.pod, exc)
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            task = asyncio.ensure_future(self._guard(handle, conn, peer))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _guard(self, handle, conn: socket.socket, peer) -> None:
        try:
            await handle(conn, peer)
        except asyncio.CancelledError:
            abort(conn)
            raise
        except Exception:   # one bad connection never affects the others
            log.exception("pod %s: connection from %s failed", self.pod, peer)
            abort(conn)

    async def _connect_from_pod(self, family: int, dst: tuple[str, int]) -> socket.socket:
        """A connection that starts inside the pod's namespace, exempt from capture."""
        loop = asyncio.get_running_loop()
        sock = await loop.run_in_executor(
            None, self.switcher.socket, self.listeners.netns_fd, family)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, AGENT_MARK)
            sock.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(sock, dst), self.connect_timeout)
        except BaseException:
            sock.close()
            raise
        return sock

    async def _forward(self, conn: socket.socket, dst: tuple[str, int],
                       counters: DirectionCounters, label: str) -> None:
        family = socket.AF_INET6 if ":" in dst[0] else socket.AF_INET
        counters.connections += 1
        try:
            upstream = await self._connect_from_pod(family, dst)
        except (OSError, asyncio.TimeoutError) as exc:
            counters.failed += 1
            log.info("pod %s: %s to %s:%d failed: %s", self.pod, label, dst[0], dst[1],
                     exc or "timed out")
            abort(conn)    # the app sees a reset, as it would from an unreachable peer
            return
        counters.active += 1
        try:
            conn_bytes = ByteCounter()
            # splice's first socket faces the pod's application: the accepted
            # one outbound, the one the agent opened to the app inbound.
            app, peer = (conn, upstream) if label == "outbound" else (upstream, conn)
            outcome = await splice(app, peer, conn_bytes, counters)
        finally:
            counters.active -= 1
        log.debug("pod %s: %s to %s:%d %s, %d bytes sent, %d received", self.pod, label,
                  dst[0], dst[1], outcome, conn_bytes.sent, conn_bytes.received)

    async def _outbound(self, conn: socket.socket, peer) -> None:
        dst = self.datapath.original_destination(self.listeners.cookie, peer[0], peer[1])
        if dst is None:
            self.counters.outbound.failed += 1
            log.warning("pod %s: outbound connection from %s:%d has no original destination",
                        self.pod, peer[0], peer[1])
            abort(conn)
            return
        await self._forward(conn, (dst.ip, dst.port), self.counters.outbound, "outbound")

    async def _inbound(self, conn: socket.socket, peer) -> None:
        local_ip, port = conn.getsockname()[:2]
        if port in AGENT_PORTS:
            self.counters.inbound.failed += 1
            log.warning("pod %s: refused inbound to agent port %d from %s", self.pod, port, peer[0])
            abort(conn)
            return
        # Policy (issue 4) hooks in here, before the app connection is made.
        await self._forward(conn, (local_ip, port), self.counters.inbound, "inbound")

    async def _hbone(self, conn: socket.socket, peer) -> None:
        # HBONE termination (mTLS + HTTP/2 CONNECT) is issue 3. Until then the
        # listener proves steering: count and close, forward nothing.
        self.counters.hbone.connections += 1
        log.info("pod %s: HBONE connection from %s:%d (HBONE not implemented yet: closed)",
                 self.pod, peer[0], peer[1])
        conn.close()
