"""Bidirectional byte copy between two sockets with TCP semantics kept.

* A FIN on one side becomes a shutdown(SHUT_WR) on the other (half-close),
  so request/response protocols that close their sending side still work.
* A reset on one side becomes a reset on the other (SO_LINGER 0 + close).
* Byte counters advance as data flows, not only when the connection ends.
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass

from agent.proxy.appsock import AppSocket, abort  # noqa: F401  (abort is part of this module's API)



@dataclass
class ByteCounter:
    """Bytes moved in each direction of one connection, seen from the pod.

    ``sent`` is what the pod's application sent to its peer, ``received``
    what the peer sent back to the application.
    """
    sent: int = 0
    received: int = 0


class _Reset(Exception):
    pass


async def _pump(src: AppSocket, dst: AppSocket, counter: ByteCounter, attr: str, extra=None) -> None:
    while True:
        try:
            data = await src.read()
        except (ConnectionResetError, BrokenPipeError):
            raise _Reset()
        if not data:
            dst.write_eof()
            return
        try:
            await dst.write(data)
        except (ConnectionResetError, BrokenPipeError):
            raise _Reset()
        n = len(data)
        setattr(counter, attr, getattr(counter, attr) + n)
        if extra is not None:
            setattr(extra, attr, getattr(extra, attr) + n)


async def splice(app: socket.socket, peer: socket.socket, counter: ByteCounter,
                 totals: ByteCounter | None = None) -> str:
    """Copy until both directions are done; returns how it ended ("closed" or "reset").

    ``app`` is the socket facing the pod's application, ``peer`` the other
    side; ``totals`` is an optional aggregate counter updated alongside.
    Both sockets are closed on return. They are driven as asyncio
    transports (``appsock.AppSocket``): no per-read epoll registration and
    no receive buffer held by an idle connection.
    """
    try:
        app_side = await AppSocket.wrap(app)
    except BaseException:
        abort(peer)
        raise
    try:
        peer_side = await AppSocket.wrap(peer)
    except BaseException:
        app_side.abort()
        raise
    up = asyncio.ensure_future(_pump(app_side, peer_side, counter, "sent", totals))
    down = asyncio.ensure_future(_pump(peer_side, app_side, counter, "received", totals))
    outcome = "closed"
    try:
        pending = {up, down}
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.exception() is not None:
                    outcome = "reset"
                    for other in pending:
                        other.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
                    pending = set()
                    break
    except asyncio.CancelledError:
        up.cancel()
        down.cancel()
        outcome = "reset"
        raise
    finally:
        if outcome == "reset":
            app_side.abort()
            peer_side.abort()
        else:
            app_side.close()
            peer_side.close()
    return outcome
