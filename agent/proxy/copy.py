"""Bidirectional byte copy between two TCP sockets with TCP semantics kept.

* A FIN on one side becomes a shutdown(SHUT_WR) on the other (half-close),
  so request/response protocols that close their sending side still work.
* A reset on one side becomes a reset on the other (SO_LINGER 0 + close).
* Byte counters advance as data flows, not only when the connection ends.

The bytes move from callback to callback (``appsock.TcpEnd``); the only
coroutine is the one that waits for the connection's end.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from agent.proxy.appsock import Pipe, abort, wrap
from agent.proxy.counters import DirectionCounters


@dataclass
class ByteCounter:
    """Bytes moved in each direction of one connection, seen from the pod.

    ``sent`` is what the pod's application sent to its peer, ``received``
    what the peer sent back to the application.
    """
    sent: int = 0
    received: int = 0


async def start_splice(app: socket.socket, peer: socket.socket, counter: ByteCounter,
                       totals: ByteCounter | DirectionCounters | None = None) -> Pipe:
    """Start copying between two sockets; the returned pipe's ``done`` says how it ended.

    ``app`` is the socket facing the pod's application, ``peer`` the other
    side; ``totals`` is an optional aggregate counter updated alongside.
    Both sockets are closed when it ends; ``Pipe.abort`` resets both.
    """
    pipe = Pipe(counter, totals)
    try:
        app_end = await wrap(app, pipe, "sent")
    except BaseException:
        abort(peer)
        raise
    try:
        peer_end = await wrap(peer, pipe, "received")
    except BaseException:
        app_end.abort()
        raise
    app_end.attach(peer_end)
    peer_end.attach(app_end)
    pipe.ends = (app_end, peer_end)
    return pipe


async def splice(app: socket.socket, peer: socket.socket, counter: ByteCounter,
                 totals: ByteCounter | DirectionCounters | None = None) -> str:
    """``start_splice`` and wait: returns "closed" or "reset" (cancelling resets both)."""
    pipe = await start_splice(app, peer, counter, totals)
    try:
        return await asyncio.shield(pipe.done)
    except asyncio.CancelledError:
        pipe.abort()
        raise
