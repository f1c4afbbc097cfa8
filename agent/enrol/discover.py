"""Finding a running pod's network namespace without CNI.

CNI ADD tells the agent where a new pod lives. A pod that was already
running when it joined the mesh (a namespace label flipped), or whose
capture was lost (agent restarted with its records gone, node rebooted,
BPF state wiped), has to be found: the agent looks for the network
namespace that holds the pod's IP.

Candidates are the namespaces pinned under ``/run/netns`` and
``/var/run/netns`` (where CNI runtimes such as containerd and CRI-O pin pod
sandboxes, and where the lab pins its pods) and those of every process in
``/proc`` (each pod sandbox has at least its pause process). A namespace is
read from inside (``/proc/thread-self/net/*`` on the switcher's thread after
``setns``), so pinned namespaces without a process work too.

The parsers of the ``/proc/net`` files are pure and tested on text; the
scan is the thin shell around them.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.netns import NetnsError, NetnsSwitcher, open_netns, refused_netns

log = logging.getLogger(__name__)

PINNED_NETNS_DIRS = ("/run/netns", "/var/run/netns")


# -- pure parsers of /proc/net files ------------------------------------------------

def local_ipv4(fib_trie: str) -> set[str]:
    """The IPv4 addresses assigned in a namespace, from ``/proc/net/fib_trie``.

    An address is a leaf (``|-- A.B.C.D``) followed by a ``/32 host LOCAL``
    line. Loopback (127/8) is left out: every namespace has it.
    """
    found: set[str] = set()
    leaf = None
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|-- "):
            leaf = text[4:].strip()
            continue
        if leaf and text.startswith("/32 host LOCAL"):
            try:
                addr = ipaddress.IPv4Address(leaf)
            except ValueError:
                continue
            if not addr.is_loopback:
                found.add(str(addr))
    return found


def local_ipv6(if_inet6: str) -> set[str]:
    """Global IPv6 addresses from ``/proc/net/if_inet6`` (no loopback, no link-local)."""
    found: set[str] = set()
    for line in if_inet6.splitlines():
        parts = line.split()
        if len(parts) < 6 or len(parts[0]) != 32:
            continue
        try:
            addr = ipaddress.IPv6Address(bytes.fromhex(parts[0]))
        except ValueError:
            continue
        if addr.is_loopback or addr.is_link_local:
            continue
        found.add(str(addr))
    return found


def default_gateway_v4(route: str) -> list[str]:
    """Gateways of IPv4 default routes, from ``/proc/net/route`` (little-endian hex)."""
    gateways = []
    for line in route.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 8:
            continue
        try:
            dest, gw, mask = (int(parts[i], 16) for i in (1, 2, 7))
        except ValueError:
            continue
        if dest == 0 and mask == 0 and gw:
            ip = socket.inet_ntoa(struct.pack("<I", gw))
            if ip not in gateways:
                gateways.append(ip)
    return gateways


def default_gateway_v6(ipv6_route: str) -> list[str]:
    """Gateways of IPv6 default routes, from ``/proc/net/ipv6_route``."""
    gateways = []
    for line in ipv6_route.splitlines():
        parts = line.split()
        if len(parts) < 10 or parts[1] != "00" or int(parts[0], 16) != 0:
            continue
        try:
            gw = ipaddress.IPv6Address(bytes.fromhex(parts[4]))
        except ValueError:
            continue
        if not gw.is_unspecified and str(gw) not in gateways:
            gateways.append(str(gw))
    return gateways


@dataclass(frozen=True)
class NetnsView:
    """What one network namespace holds, as far as enrolment cares."""
    path: str                       # a path that opens it (pinned name preferred)
    addresses: frozenset[str]
    gateways: tuple[str, ...] = ()


@dataclass
class PodNetns:
    path: str
    ips: list[str]
    gateways: list[str] = field(default_factory=list)


def match(views: Iterable[NetnsView], pod_ips: Iterable[str]) -> PodNetns | str | None:
    """The namespace holding the pod's IPs: a PodNetns, None if none does,
    or an error message when the answer is ambiguous (two namespaces claim
    the pod's IP: capturing either could steer another pod's traffic).
    """
    wanted = {str(ipaddress.ip_address(ip)) for ip in pod_ips}
    if not wanted:
        return None
    hits = [v for v in views if wanted & v.addresses]
    if not hits:
        return None
    paths = {v.path for v in hits}
    if len(paths) > 1:
        return f"IP {', '.join(sorted(wanted))} is held by {len(paths)} network namespaces: {', '.join(sorted(paths))}"
    view = hits[0]
    return PodNetns(view.path, sorted(wanted & view.addresses, key=lambda ip: ":" in ip), list(view.gateways))


# -- the scan -------------------------------------------------------------------------

def _candidates(proc: str = "/proc", pinned_dirs=PINNED_NETNS_DIRS) -> dict[tuple[int, int], str]:
    """One path per network namespace on the host, pinned names first.

    ``proc`` is the host's /proc: in a container without hostPID the host's
    is mounted elsewhere (the chart mounts it at /host/proc).
    """
    seen: dict[tuple[int, int], str] = {}
    own = os.stat("/proc/self/ns/net")
    skip = (own.st_dev, own.st_ino)
    paths: list[str] = []
    for directory in pinned_dirs:
        try:
            paths += [os.path.join(directory, n) for n in sorted(os.listdir(directory))]
        except OSError:
            continue
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        pids = []
    paths += [f"{proc}/{pid}/ns/net" for pid in pids]
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue          # a process that exited, a stale pin
        key = (st.st_dev, st.st_ino)
        if key != skip and key not in seen:
            seen[key] = path
    return seen


def _read_inside() -> tuple[str, str, str, str]:
    texts = []
    for name in ("fib_trie", "if_inet6", "route", "ipv6_route"):
        try:
            with open(f"/proc/thread-self/net/{name}") as fh:
                texts.append(fh.read())
        except OSError:
            texts.append("")       # no IPv6 in this namespace, for example
    return texts[0], texts[1], texts[2], texts[3]


def scan(switcher: NetnsSwitcher, proc: str = "/proc",
         pinned_dirs=PINNED_NETNS_DIRS) -> list[NetnsView]:
    """Every network namespace on the host but ours and the node's, with its addresses.

    Each candidate is opened by ``open_netns``, as a CNI ADD's path is: a
    FIFO or a regular file dropped in a pinned directory is skipped without
    blocking, and the node's own namespace is never taken for a pod's.
    """
    views = []
    refused = refused_netns(proc)
    for path in _candidates(proc, pinned_dirs).values():
        try:
            fd = open_netns(path, refused=refused)
        except NetnsError as exc:
            log.debug("skipping %s", exc)
            continue
        try:
            fib, inet6, route, route6 = switcher.run(fd, _read_inside)
        except OSError as exc:
            log.debug("cannot read network namespace %s: %s", path, exc)
            continue
        finally:
            os.close(fd)
        addresses = frozenset(local_ipv4(fib) | local_ipv6(inet6))
        if addresses:
            views.append(NetnsView(path, addresses,
                                   tuple(default_gateway_v4(route) + default_gateway_v6(route6))))
    return views
