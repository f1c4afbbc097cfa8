"""Slow and silent clients: 1,000 TCP connections that never send a byte.

On 15008 each used to cost ~325 KB (asyncio's TLS buffers, allocated at
accept) and stay open for ever; now a connection holds only its socket
until its ClientHello, at most ``first_byte_seconds`` (5 s), and is then
reset (issue 11, item 2). On 15006 a STRICT pod refuses plaintext at once;
a pod that accepts plaintext holds a silent connection like any TCP proxy,
at a small bounded cost. Memory and fds are read from /proc.
"""

from __future__ import annotations

import errno
import selectors
import socket
import time

from tests.hostile.conftest import APP_PORT, OPEN_PORT, many
from tests.lab.conftest import wait_for

FIRST_BYTE_SECONDS = 5.0          # agent.proxy.forward.HandshakeLimits.first_byte_seconds


def open_silent(hostile, ip: str, port: int, count: int, reset_ok: bool = False) -> list[socket.socket]:
    """``count`` connections, each connected and then silent (``reset_ok``: or reset already)."""
    socks = []
    for _ in range(count):
        sock = hostile.socket()
        sock.setblocking(False)
        rc = sock.connect_ex((ip, port))
        assert rc in (0, errno.EINPROGRESS), errno.errorcode.get(rc)
        socks.append(sock)
    sel = selectors.DefaultSelector()
    for sock in socks:
        sel.register(sock, selectors.EVENT_WRITE)
    pending, deadline = len(socks), time.monotonic() + 20
    while pending and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            sel.unregister(key.fileobj)
            pending -= 1
            err = key.fileobj.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            assert not err or (reset_ok and err == errno.ECONNRESET), \
                f"connect failed: {errno.errorcode.get(err, err)}"
    sel.close()
    assert not pending, f"{pending} of {count} connections did not complete"
    return socks


def ended(sock: socket.socket) -> bool:
    """The agent closed or reset this connection."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:           # ECONNRESET (or the reset already reported at connect)
        return True


def test_1000_silent_connections_to_15008_are_cheap_and_closed_after_the_first_byte_timeout(hostile, probe):
    count = 1000
    with many(open_silent(hostile, hostile.server_ip, 15008, count)) as socks:
        wait_for(lambda: hostile.agent.sample().fds >= probe.fds + count - 2, 4.0, "the agent to accept them")
        held = hostile.agent.sample()
        accepted = held.fds - probe.fds
        per_connection_kb = (held.rss_kb - probe.rss_kb) / accepted
        assert per_connection_kb < 50, f"{per_connection_kb:.1f} KB of agent RSS per silent connection"
        started = time.monotonic()
        wait_for(lambda: all(ended(s) for s in socks), FIRST_BYTE_SECONDS + 10, "the agent to close them")
        assert time.monotonic() - started <= FIRST_BYTE_SECONDS + 10
    hostile.agent.wait_fds(probe.fds + 5)
    access, other = hostile.agent.split(hostile.agent.log_since(probe))
    refused = [line for line in access if "no TLS ClientHello within" in line]
    assert len(refused) == count                          # the access log: one line each
    assert len(other) <= 5, other[:10]                    # the agent's log: one line for the problem
    print(f"15008: {per_connection_kb:.1f} KB RSS per silent connection ({held.rss_kb - probe.rss_kb} KB "
          f"for {accepted} held at once), all closed by the first-byte timeout")


def test_silent_plaintext_to_a_strict_pod_is_refused_at_once(hostile, probe):
    count = 500
    accepts = hostile.app_accepts()
    with many(open_silent(hostile, hostile.server_ip, APP_PORT, count, reset_ok=True)) as socks:
        wait_for(lambda: all(ended(s) for s in socks), 10.0, "the agent to refuse them")
    hostile.agent.wait_fds(probe.fds + 5)
    assert hostile.app_accepts() == accepts
    access, other = hostile.agent.split(hostile.agent.log_since(probe))
    assert sum(1 for line in access if "direction=inbound" in line and "outcome=refused" in line) == count
    assert len(other) <= 5, other[:10]


def test_silent_plaintext_to_a_permissive_pod_costs_little_and_is_released(hostile, probe):
    count = 500
    with many(open_silent(hostile, hostile.web_ip, OPEN_PORT, count)) as socks:
        wait_for(lambda: hostile.open_count.exists() and hostile.open_count.stat().st_size >= count, 10.0,
                 "the application to see every connection")
        held = hostile.agent.sample()
        per_connection_kb = (held.rss_kb - probe.rss_kb) / count
        assert per_connection_kb < 50, f"{per_connection_kb:.1f} KB of agent RSS per spliced idle connection"
        assert held.fds - probe.fds <= 2 * count + 10            # the client's socket and the app's
        assert not any(ended(s) for s in socks)                  # held, like any TCP proxy would
        print(f"15006: {per_connection_kb:.1f} KB RSS per idle spliced connection")
    hostile.agent.wait_fds(probe.fds + 5)
