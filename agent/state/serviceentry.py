"""ServiceEntry hosts and addresses: virtual-IP auto-allocation and host lookup.

Pure (no I/O), computed once per ``ClusterState`` and kept in
``state.derived``. The functions named below are a stable interface.

For the DNS proxy (``agent/dns/``)::

    from agent.state.serviceentry import resolve_host
    addresses = resolve_host(state, qname)   # qname: "api.example.com" or "api.example.com."
    # -> ["240.240.3.7", "2001:2::f0f0:307"] (str, IPv4 first, then IPv6; pick by
    #    family for A / AAAA). An empty list means "not a ServiceEntry host with an
    #    address the mesh owns": forward the query to the pod's upstream resolver.

``resolve_host`` answers, for a name (case and a trailing dot ignored):

* an exact host of some ServiceEntry, else the most specific wildcard host
  (``*.example.com`` matches ``a.example.com`` and ``a.b.example.com``, not
  ``example.com``; a bare ``*`` host is never answered from DNS: it would
  swallow every name). Between entries with the same host, the one whose
  ``namespace/name`` sorts first wins.
* with the entry's ``spec.addresses`` that are single IPs (CIDRs are kept for
  routing but are no answer), else the host's auto-allocated virtual IPs.

Auto-allocation (the algorithm Istio used in ``pilot/pkg/serviceregistry/
serviceentry`` before its allocation controller, adapted so the result does
not depend on the order entries arrive in):

* who gets one: a non-wildcard host of an entry with no ``spec.addresses`` and
  ``resolution: STATIC``. Istio also allocates for ``DNS`` entries, but in
  ambient istiod sends such an entry to ztunnel only when an egress waypoint
  serves it (it warns "dynamic DNS service entry with no egress waypoint"
  otherwise), and there is no waypoint here: so a ``DNS`` entry is answered
  by the upstream resolver and its traffic passes through to the real
  address (issue 14, point 4). ``NONE`` never gets one, as in Istio (the
  original destination would be lost);
* the range: IPv4 ``240.240.0.0/16`` (reserved Class E, never routed) and
  IPv6 ``2001:2::/48`` (RFC 5180 benchmarking), Istio's defaults. Slot ``s``
  (0 .. 65023) is ``240.240.<s // 254>.<s % 254 + 1>`` (never .0 or .255)
  and ``2001:2::f0f0:<the same two octets as one hex group>``;
* the key ``namespace/name/host``, hashed with FNV-1a (32 bit); the first slot
  is ``hash % 65024``; on a collision, double hashing with step
  ``65011 - hash % 65011`` (65011: the largest prime below 65024), then a
  linear scan if that cycle is full. Keys are placed in sorted order, so every
  node (same set of entries) computes the same addresses whatever the order of
  its watch events; an entry keeps its address while the set changes unless a
  new key that sorts before it lands on its slot.
"""

from __future__ import annotations

import ipaddress
from typing import NamedTuple

from agent.state.model import ClusterState, ServiceEntry, normalise_host

V4_RANGE = ipaddress.IPv4Network("240.240.0.0/16")
V6_RANGE = ipaddress.IPv6Network("2001:2::/48")
SLOTS = 256 * 254
_PRIME = 65011
_FNV_OFFSET, _FNV_PRIME = 0x811C9DC5, 0x01000193
_KEY = "agent.state.serviceentry"


class HostMatch(NamedTuple):
    entry: ServiceEntry
    host: str                    # the entry's host that matched (maybe "*.example.com")
    addresses: tuple[str, ...]   # the answer (may be empty: forward upstream)


class AddressIndex(NamedTuple):
    """Everything derived once per state."""

    vips: dict[tuple[str, str, str], tuple[str, str]]      # (ns, name, host) -> (v4, v6)
    exact: dict[str, list[tuple[ServiceEntry, str]]]       # host -> entries, sorted
    wildcards: list[tuple[str, ServiceEntry, str]]         # (suffix ".example.com", entry, host)
    by_ip: dict[str, list[tuple[ServiceEntry, str]]]       # a single address -> (entry, host), sorted
    by_cidr: list[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ServiceEntry, str]]


def fnv1a32(data: bytes) -> int:
    h = _FNV_OFFSET
    for byte in data:
        h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFF
    return h


def slot_addresses(slot: int) -> tuple[str, str]:
    """The (IPv4, IPv6) pair of allocation slot ``slot``."""
    if not 0 <= slot < SLOTS:
        raise ValueError(f"slot {slot} outside 0..{SLOTS - 1}")
    third, fourth = divmod(slot, 254)
    fourth += 1
    v4 = V4_RANGE.network_address + (third << 8 | fourth)
    v6 = V6_RANGE.network_address + (0xF0F0 << 16 | third << 8 | fourth)
    return str(v4), str(v6)


def allocate(keys) -> dict[str, tuple[str, str]]:
    """``key -> (IPv4, IPv6)`` for each distinct key; the same set of keys gives
    the same result in any order. More keys than slots: the last ones (in
    sorted order) get none."""
    taken: set[int] = set()
    out: dict[str, tuple[str, str]] = {}
    for key in sorted(set(keys)):
        if len(taken) >= SLOTS:
            break
        h = fnv1a32(key.encode())
        slot = h % SLOTS
        if slot in taken:
            step = _PRIME - h % _PRIME
            for i in range(1, SLOTS):
                slot = (h + i * step) % SLOTS
                if slot not in taken:
                    break
            else:
                slot = next(s for s in range(SLOTS) if s not in taken)
        taken.add(slot)
        out[key] = slot_addresses(slot)
    return out


def wants_vip(entry: ServiceEntry, host: str) -> bool:
    """Whether ``host`` of ``entry`` gets an auto-allocated address (see the module doc)."""
    return entry.resolution == "STATIC" and not entry.addresses and not host.startswith("*")


def _key(entry: ServiceEntry, host: str) -> str:
    return f"{entry.namespace}/{entry.name}/{host}"


def index(state: ClusterState) -> AddressIndex:
    """The allocation and lookup tables of ``state`` (built on first use, then kept)."""
    memo = state.derived.get(_KEY)
    if memo is not None:
        return memo
    entries = [state.service_entry_views[k] for k in sorted(state.service_entry_views)]
    keyed = {_key(e, h): (e, h) for e in entries for h in e.hosts if wants_vip(e, h)}
    allocated = allocate(keyed)
    vips = {(e.namespace, e.name, h): allocated[k] for k, (e, h) in keyed.items() if k in allocated}
    exact: dict[str, list[tuple[ServiceEntry, str]]] = {}
    wildcards: list[tuple[str, ServiceEntry, str]] = []
    by_ip: dict[str, list[tuple[ServiceEntry, str]]] = {}
    by_cidr: list = []
    for entry in entries:
        for host in entry.hosts:
            if host.startswith("*."):
                wildcards.append((host[1:], entry, host))
            elif host != "*":
                exact.setdefault(host, []).append((entry, host))
            for ip in vips.get((entry.namespace, entry.name, host), ()):
                by_ip.setdefault(ip, []).append((entry, host))
        first = entry.hosts[0]
        for address in entry.addresses:
            net = ipaddress.ip_network(address, strict=False)
            if net.num_addresses == 1:
                by_ip.setdefault(str(net.network_address), []).append((entry, first))
            else:
                by_cidr.append((net, entry, first))
    # Most specific (longest) suffix first; ties by namespace/name (already sorted).
    wildcards.sort(key=lambda w: -len(w[0]))
    memo = state.derived[_KEY] = AddressIndex(vips, exact, wildcards, by_ip, by_cidr)
    return memo


def addresses_of(state: ClusterState, entry: ServiceEntry, host: str) -> tuple[str, ...]:
    """What DNS answers for ``host`` of ``entry``: its single-IP ``spec.addresses``,
    else the host's allocated (IPv4, IPv6), else nothing. IPv4 first."""
    if entry.addresses:
        nets = (ipaddress.ip_network(a, strict=False) for a in entry.addresses)
        ips = [str(n.network_address) for n in nets if n.num_addresses == 1]
        return tuple(sorted(ips, key=lambda ip: ":" in ip))
    return index(state).vips.get((entry.namespace, entry.name, host), ())


def lookup_host(state: ClusterState, name: str, namespace: str | None = None) -> HostMatch | None:
    """The ServiceEntry host that ``name`` falls under (exact, else the most
    specific wildcard), with what DNS answers; None when no entry claims it.
    ``namespace``: the asking pod's; only entries exported to it count
    (``ServiceEntry.visible_to``). None: every entry."""
    name = normalise_host(name)
    if not name:
        return None
    idx = index(state)
    for entry, host in idx.exact.get(name, ()):
        if entry.visible_to(namespace):
            return HostMatch(entry, host, addresses_of(state, entry, host))
    for suffix, entry, host in idx.wildcards:
        if name.endswith(suffix) and len(name) > len(suffix) and entry.visible_to(namespace):
            return HostMatch(entry, host, addresses_of(state, entry, host))
    return None


def resolve_host(state: ClusterState, name: str, namespace: str | None = None) -> list[str]:
    """The addresses DNS answers for ``name`` to a pod of ``namespace`` (IPv4
    first, then IPv6); empty when the mesh has none for it, and the query goes upstream."""
    match = lookup_host(state, name, namespace)
    return list(match.addresses) if match is not None else []


def _visible(found: list[tuple[ServiceEntry, str]] | None,
             namespace: str | None) -> tuple[ServiceEntry, str] | None:
    return next((f for f in found or () if f[0].visible_to(namespace)), None)


def entry_for_ip(state: ClusterState, ip: str, namespace: str | None = None) -> tuple[ServiceEntry, str] | None:
    """The (entry, host) that owns address ``ip`` for a client in ``namespace``
    (entries not exported there are skipped; None: every entry): an allocated
    virtual IP or an address in some entry's ``spec.addresses`` (a single IP
    before a CIDR)."""
    idx = index(state)
    found = _visible(idx.by_ip.get(ip), namespace)
    if found is not None or not (idx.by_cidr or ":" in ip):
        return found
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return None
    if address.version == 6 and str(address) != ip:     # an IPv6 address not in canonical form
        found = _visible(idx.by_ip.get(str(address)), namespace)
        if found is not None:
            return found
    for net, entry, host in idx.by_cidr:
        if address.version == net.version and address in net and entry.visible_to(namespace):
            return entry, host
    return None


def allocated_vips(state: ClusterState) -> dict[str, list[str]]:
    """``"namespace/name/host" -> [IPv4, IPv6]``, for status and config_dump."""
    return {f"{ns}/{name}/{host}": list(ips) for (ns, name, host), ips in sorted(index(state).vips.items())}
