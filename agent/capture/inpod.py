"""Per-pod capture: the agent's listeners inside a pod's network namespace.

For each enrolled pod the agent holds, inside the pod's namespace:

* outbound 127.0.0.1:15001 (and [::1]:15001 when the pod has IPv6
  loopback), where connect4/6 send the pod's outbound connections;
* inbound 127.0.0.1:15006 (plaintext) and 127.0.0.1:15008 (HBONE), where
  sk_lookup hands connections arriving at the pod's addresses; and for a
  pod with IPv6 loopback the same two on [::1], for its IPv6 addresses
  (``bpf_sk_assign`` only hands a connection to a socket of its family).

Inbound listeners are bound to loopback on purpose: they are reachable only
through sk_lookup steering, so when the agent is gone they disappear from
the sockhash and the pod's ports refuse connections (fail closed).

Every listener is SO_REUSEPORT, so that during an upgrade a second agent can
open its own set beside the running agent's (the same ports in the same
namespace; both run as root, which the kernel requires of a reuseport
group) and take over without a moment in which a port has no listener
(docs/ARCHITECTURE.md, "Agent upgrade"). The kernel spreads new connections
over a group by hash, so the old agent must close its listeners once the new
ones are in place; ``tcp_migrate_req=1`` in the pod's namespace makes that
close move the connections still waiting in the old listeners' accept
queues (and half-open ones) to the new listener instead of resetting them.

Order matters. Enrol: listeners, then inbound steering, then the outbound
switch (pod_config), so no captured connection ever finds no listener
while the agent is alive. Release: the reverse.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field

from agent.capture.datapath import (
    DNS_PORT,
    HBONE_PORT,
    INBOUND_PORT,
    LISTENER_HBONE,
    LISTENER_INBOUND,
    OUTBOUND_PORT,
    CaptureDatapath,
)
from agent.netns import NetnsSwitcher, netns_cookie, open_netns

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 1024

# Per network namespace (Linux >= 5.14, Documentation/networking/ip-sysctl.rst):
# a closing SO_REUSEPORT listener hands its pending connections to another
# listener of its group instead of resetting them. Written from the netns
# thread: /proc/sys/net resolves to the namespace of the thread that opens it.
MIGRATE_REQ_SYSCTL = "sys/net/ipv4/tcp_migrate_req"


@dataclass
class PodListeners:
    netns_fd: int
    cookie: int
    outbound: list[socket.socket]
    inbound: socket.socket
    hbone: socket.socket
    inbound6: socket.socket | None = None    # [::1]:15006, when the pod has IPv6
    hbone6: socket.socket | None = None      # [::1]:15008
    # DNS (UDP and TCP on 127.0.0.1 and [::1] port 15053), opened once the pod's
    # DNS is to be captured (want_dns, set_dns); dns_enabled: its queries are
    # steered to them (set before enable()).
    dns: list[socket.socket] = field(default_factory=list)
    dns_enabled: bool = False

    def all(self) -> list[socket.socket]:
        return [*self.outbound, self.inbound, self.hbone,
                *(s for s in (self.inbound6, self.hbone6) if s is not None), *self.dns]

    def for_ip(self, ip: str) -> tuple[socket.socket, socket.socket]:
        """(inbound, hbone) listeners that connections to ``ip`` are handed to.

        An IPv6 address in a pod without IPv6 listeners gets the IPv4 ones:
        sk_assign then fails and sk_lookup drops (fail closed, never bypass).
        """
        if ":" in ip and self.inbound6 is not None and self.hbone6 is not None:
            return self.inbound6, self.hbone6
        return self.inbound, self.hbone


def _listen(family: int, addr: str, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # A new agent binds the same ports while this one still listens (upgrade).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((addr, port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def enable_request_migration(proc_dirs: tuple[str, ...]) -> str | None:
    """Set ``tcp_migrate_req=1`` in the calling thread's network namespace.

    Runs inside the pod's namespace (on the netns thread). ``proc_dirs`` are
    tried in order: the agent's own /proc first; in a container that is not
    privileged the runtime mounts /proc/sys read-only, and the host's procfs
    (``--host-proc``, where the chart mounts /proc/sys/net writable) resolves
    /proc/sys/net by the opening thread's namespace just the same. Returns
    None once it is set, else why it could not be.
    """
    problems = []
    for proc in proc_dirs:
        path = os.path.join(proc, MIGRATE_REQ_SYSCTL)
        try:
            with open(path) as fh:
                if fh.read().strip() == "1":
                    return None
            with open(path, "w") as fh:
                fh.write("1")
            return None
        except OSError as exc:
            problems.append(f"{path}: {exc.strerror or exc}")
    return "; ".join(problems) or "no procfs to write it in"


def _open_listeners(proc_dirs: tuple[str, ...] = ("/proc",)
                    ) -> tuple[list[socket.socket], socket.socket, socket.socket, str | None]:
    """Runs inside the pod's namespace (on the netns thread)."""
    migration = enable_request_migration(proc_dirs)
    made: list[socket.socket] = []
    try:
        made.append(_listen(socket.AF_INET, "127.0.0.1", OUTBOUND_PORT))
        try:
            made.append(_listen(socket.AF_INET6, "::1", OUTBOUND_PORT))
        except OSError as exc:
            # No IPv6 loopback in this pod: IPv6 connects it makes are still
            # rewritten by connect6 and then refused, never leaked.
            log.debug("no IPv6 outbound listener: %s", exc)
        inbound = _listen(socket.AF_INET, "127.0.0.1", INBOUND_PORT)
        made.append(inbound)
        hbone = _listen(socket.AF_INET, "127.0.0.1", HBONE_PORT)
        made.append(hbone)
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made[:-2], inbound, hbone, migration


def _open_listeners6() -> tuple[socket.socket | None, socket.socket | None]:
    """[::1]:15006 and [::1]:15008, or (None, None) without IPv6 loopback (netns thread)."""
    try:
        inbound6 = _listen(socket.AF_INET6, "::1", INBOUND_PORT)
    except OSError as exc:
        log.debug("no IPv6 inbound listeners: %s", exc)
        return None, None
    try:
        return inbound6, _listen(socket.AF_INET6, "::1", HBONE_PORT)
    except OSError:
        inbound6.close()
        raise


def _open_dns() -> list[socket.socket]:
    """The DNS listeners: UDP and TCP on 127.0.0.1:15053, and on [::1] when there (netns thread)."""
    made: list[socket.socket] = []
    try:
        for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            try:
                udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                udp.bind((addr, DNS_PORT))
                udp.setblocking(False)
            except OSError as exc:
                udp.close()
                if family == socket.AF_INET6:
                    log.debug("no IPv6 DNS listener: %s", exc)
                    break
                raise
            made.append(udp)
            made.append(_listen(family, addr, DNS_PORT))
    except OSError:
        for sock in made:
            sock.close()
        raise
    return made


class InPodCapture:
    """Turns pods' capture on and off; owns their listeners."""

    def __init__(self, datapath: CaptureDatapath, switcher: NetnsSwitcher,
                 host_proc: str = "/proc") -> None:
        self.datapath = datapath
        self.switcher = switcher
        self.host_proc = host_proc   # for open_netns: the node's namespace is never a pod's
        self._proc_dirs = tuple(dict.fromkeys(("/proc", host_proc.rstrip("/") or "/")))

    def open(self, netns_path: str) -> PodListeners:
        """Validate the namespace at ``netns_path`` and open the pod's listeners in it."""
        return self.listen(open_netns(netns_path, self.host_proc), netns_path)

    def listen(self, netns_fd: int, netns_path: str) -> PodListeners:
        """Open the pod's listeners in the namespace ``netns_fd`` (from ``open_netns``).

        The fd is taken over: kept in the PodListeners, or closed on failure.
        """
        try:
            outbound, inbound, hbone, migration = self.switcher.run(
                netns_fd, lambda: _open_listeners(self._proc_dirs))
        except OSError as exc:
            os.close(netns_fd)
            raise OSError(exc.errno, f"open listeners in {netns_path}: {exc.strerror}") from None
        try:
            inbound6, hbone6 = self.switcher.run(netns_fd, _open_listeners6)
        except OSError as exc:
            for sock in (*outbound, inbound, hbone):
                sock.close()
            os.close(netns_fd)
            raise OSError(exc.errno, f"open IPv6 listeners in {netns_path}: {exc.strerror}") from None
        if migration is not None:
            # Capture does not depend on it; only an upgrade of the agent
            # would reset the connections then waiting in the old listeners.
            log.warning("network namespace %s: cannot set net.ipv4.tcp_migrate_req=1 (%s); an agent "
                        "upgrade may reset connections still queued in its listeners", netns_path, migration)
        return PodListeners(netns_fd, netns_cookie(inbound), outbound, inbound, hbone, inbound6, hbone6)

    def enable(self, listeners: PodListeners, ips: list[str], probe_sources: list[str]) -> None:
        dp = self.datapath
        for ip in ips:
            inbound, hbone = listeners.for_ip(ip)
            dp.set_listener(ip, LISTENER_INBOUND, inbound)
            dp.set_listener(ip, LISTENER_HBONE, hbone)
            dp.set_inbound(ip, probe_sources)
        dp.attach_netns(listeners.cookie, listeners.netns_fd)
        dp.set_outbound(listeners.cookie, ips, dns=listeners.dns_enabled)

    def want_dns(self, listeners: PodListeners, wanted: bool) -> None:
        """Before ``enable``: whether the pod's DNS is to be captured (the node's
        ``--dns-capture`` or the pod's annotation); its DNS listeners are opened
        here if so. If they cannot be, its DNS stays uncaptured (``POD_DNS``
        unset, logged); its TCP is captured."""
        if wanted:
            try:
                self._dns_listeners(listeners)
            except OSError as exc:
                log.warning("pod network namespace %s: no DNS listeners, DNS not captured: %s",
                            listeners.cookie, exc)
        listeners.dns_enabled = wanted and bool(listeners.dns)

    def set_dns(self, listeners: PodListeners, ips: list[str], wanted: bool) -> None:
        """Steer a captured pod's DNS to its DNS listeners, or stop (its pod's
        ``dns-capture`` annotation changed). Listeners are opened first when the
        pod has none: on failure nothing changes."""
        if wanted:
            self._dns_listeners(listeners)
        self.datapath.set_outbound(listeners.cookie, ips, dns=wanted)
        listeners.dns_enabled = wanted

    def _dns_listeners(self, listeners: PodListeners) -> None:
        """Open the pod's DNS listeners unless it has them (from the first time it wanted them)."""
        if not listeners.dns:
            listeners.dns = self.switcher.run(listeners.netns_fd, _open_dns)

    def disable(self, cookie: int, ips: list[str]) -> None:
        dp = self.datapath
        dp.clear_outbound(cookie)
        dp.detach_netns(cookie)
        for ip in ips:
            dp.clear_inbound(ip)

    @staticmethod
    def close(listeners: PodListeners) -> None:
        for sock in listeners.all():
            sock.close()
        try:
            os.close(listeners.netns_fd)
        except OSError:
            pass
