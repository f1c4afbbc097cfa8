"""The node agent as the benchmark runs it: ``python -m agent.cli`` plus two
benchmark-only switches. Never used by the product.

1. iptables capture (scenario 5). The product learns an outbound
   connection's original destination only from its eBPF ``orig_dst`` map;
   a connection that iptables REDIRECTed to the outbound listener has no
   entry there, so the unmodified agent resets it ("no original destination
   recorded"). To compare the two capture mechanisms on the *same* listener
   and the same forwarding code, this launcher adds the classic fallback:
   when the map has no entry, ask the accepted socket for
   ``SO_ORIGINAL_DST`` (netfilter conntrack's answer after REDIRECT). The
   eBPF path is unchanged: the fallback runs only on a map miss, and the
   per-connection cost on the eBPF path is one ContextVar set.

2. HBONE pooling off (scenario 3). ``SIGUSR1`` turns on a mode in which every
   outbound HBONE stream gets its own fresh mTLS connection, closed when the
   stream ends (a GOAWAY right after the CONNECT), so the benchmark can show
   what the pool saves; ``SIGUSR2`` turns pooling back on. The handlers only
   set a flag; the pooled path is untouched while the flag is off.
"""

from __future__ import annotations

import contextvars
import signal
import socket
import struct
import sys

from agent.capture import datapath as _datapath
from agent.proxy import forward as _forward
from agent.proxy import tunnel as _tunnel

SO_ORIGINAL_DST = 80          # <linux/netfilter_ipv4.h>, level SOL_IP
_accepted: contextvars.ContextVar = contextvars.ContextVar("bench_accepted", default=None)
_no_pool = {"on": False}

_orig_outbound = _forward.PodProxy._outbound
_orig_lookup = _datapath.CaptureDatapath.original_destination
_orig_stream = _tunnel.HbonePool.stream


async def _outbound(self, conn, peer):
    _accepted.set(conn)      # this task's own context: no cross-connection leaks
    return await _orig_outbound(self, conn, peer)


def _original_destination(self, netns, peer_ip, peer_port):
    found = _orig_lookup(self, netns, peer_ip, peer_port)
    if found is not None:
        return found
    conn = _accepted.get()
    if conn is None or conn.family != socket.AF_INET:
        return None
    try:
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:          # not REDIRECTed (no conntrack entry): ENOENT
        return None
    port, = struct.unpack_from("!H", raw, 2)
    ip = socket.inet_ntoa(raw[4:8])
    return _datapath.OriginalDestination(ip, port)


async def _stream(self, key, ctx, dial, headers):
    if not _no_pool["on"]:
        return await _orig_stream(self, key, ctx, dial, headers)
    conn = await self._dial(key, ctx, dial)
    self.connections_opened += 1
    try:
        result = await conn.open_stream(headers)
    except BaseException:
        conn.close()
        raise
    conn.goaway()            # closes the connection once this one stream ends
    return result


def _set_no_pool(sig, _frame) -> None:
    _no_pool["on"] = sig == signal.SIGUSR1


def install() -> None:
    _forward.PodProxy._outbound = _outbound
    _datapath.CaptureDatapath.original_destination = _original_destination
    _tunnel.HbonePool.stream = _stream
    signal.signal(signal.SIGUSR1, _set_no_pool)
    signal.signal(signal.SIGUSR2, _set_no_pool)


def main() -> int:
    install()
    from agent.cli import main as agent_main
    return agent_main()


if __name__ == "__main__":
    sys.exit(main())
