"""The DNS proxy's decisions, without I/O (sans-IO, like h11).

A query's wire bytes go in; out comes one of:

* ``Reply``: answer the client with these bytes (a mesh name, or an error);
* ``Forward``: send the query, unchanged, to the pod's upstream resolver;
  the shell then calls ``upstream_reply`` with what came back (or nothing);
* ``Drop``: say nothing (not a query at all: a response, or too short to
  carry an id).

What is answered here, as Istio's DNS proxy does (ztunnel ``dns/server.rs``):
A and AAAA for ``ServiceEntry`` hosts (exact or wildcard) that have an
address (their own or an auto-allocated virtual IP), and for
``<svc>.<ns>.svc.<cluster domain>`` and for the short forms a
pod's search path turns into queries or that a client sends as they are:
``<svc>.<ns>.svc``, ``<svc>.<ns>`` (only when that Service exists) and
``<svc>`` (a Service in the pod's own namespace). A headless Service
answers with its ready pods' addresses. A name the mesh knows but that has
no address of the asked family gets an empty NOERROR answer (NODATA), so
the client does not go on to ask the upstream for a cluster name. Every
other name, and every other record type, is forwarded.

Messages are parsed and built with dnspython, never by hand. A built
answer is kept per pod (``ANSWER_CACHE`` of them, keyed by the query's bytes
after its id and by transport) until the cluster state changes: the same
query bytes always get the same answer but for the id, which is put in. A
pod asks for the same few names again and again; building one costs about
0.15 ms of dnspython, a cached one a dictionary lookup.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

# Istio's DNS proxy answers with a 30 s TTL: short enough that a Service
# change is seen soon, long enough to spare the proxy.
ANSWER_TTL = 30
# A DNS message over TCP is at most 65535 bytes; a query is small. Anything
# longer than this is refused before it is parsed.
MAX_QUERY_BYTES = 4096
# The client's UDP payload size without EDNS (RFC 1035 4.2.1).
CLASSIC_UDP_PAYLOAD = 512
HEADER_BYTES = 12
# Built answers kept per pod (then the cache starts afresh), and the longest
# query whose answer is kept: memory per pod stays under ~100 KB.
ANSWER_CACHE = 256
CACHED_QUERY_BYTES = 512

# Looks a Service up: (namespace, name) -> its addresses (the cluster IPs,
# or a headless Service's ready pod addresses), or None when there is no
# such Service.
ServiceLookup = Callable[[str, str], "Sequence[str] | None"]
# Looks a ServiceEntry host up (exact or wildcard): name -> its addresses (the
# entry's, or its auto-allocated virtual IPs); empty when the mesh has none.
HostLookup = Callable[[str], "Sequence[str]"]


@dataclass(frozen=True)
class Reply:
    wire: bytes
    outcome: str          # "local", "nodata", "formerr", "notimp", "servfail", "forwarded"


@dataclass(frozen=True)
class Forward:
    query: bytes          # the client's query, to send upstream unchanged
    id: int
    question: str         # for logs
    max_udp: int = CLASSIC_UDP_PAYLOAD   # the most a UDP answer to the client may carry


@dataclass(frozen=True)
class Drop:
    outcome: str          # "dropped"


Decision = Reply | Forward | Drop


@dataclass(frozen=True)
class ResolvConf:
    """The parts of a pod's /etc/resolv.conf the proxy uses."""
    nameservers: tuple[str, ...]
    search: tuple[str, ...]


def parse_resolv_conf(text: str) -> ResolvConf:
    """``nameserver`` and ``search``/``domain`` lines, as glibc reads them (the last search line wins)."""
    servers: list[str] = []
    search: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if not words:
            continue
        if words[0] == "nameserver" and len(words) > 1:
            try:
                servers.append(str(ipaddress.ip_address(words[1].split("%", 1)[0])))
            except ValueError:
                continue
        elif words[0] in ("search", "domain"):
            search = [w.rstrip(".").lower() for w in words[1:]]
    return ResolvConf(tuple(servers), tuple(search))


def _split(qname: dns.name.Name) -> list[str]:
    return [label.decode("ascii", "replace").lower() for label in qname.relativize(dns.name.root).labels]


class Resolver:
    """One pod's view: its namespace, the cluster domain, and a Service lookup."""

    def __init__(self, namespace: str, lookup: ServiceLookup, cluster_domain: str = "cluster.local",
                 hosts: HostLookup | None = None, generation: Callable[[], object] | None = None) -> None:
        self.namespace = namespace
        self.lookup = lookup
        self.hosts = hosts
        # What the lookups read (the cluster state): built answers are dropped
        # when it is another object. None: nothing is cached.
        self.generation = generation
        self._cache: dict[tuple[bytes, bool], Reply] = {}
        self._cache_of: object = None
        self.cluster_domain = cluster_domain.strip(".").lower()
        self._domain_labels = self.cluster_domain.split(".") if self.cluster_domain else []

    # -- names ---------------------------------------------------------------

    def mesh_addresses(self, labels: list[str]) -> Sequence[str] | None:
        """The addresses of the Service a query name means, or None when it is no mesh name."""
        d = self._domain_labels
        if d and len(labels) == 3 + len(d) and labels[2:3] == ["svc"] and labels[3:] == d:
            return self.lookup(labels[1], labels[0])          # svc.ns.svc.<domain>
        if len(labels) == 3 and labels[2] == "svc":
            return self.lookup(labels[1], labels[0])          # svc.ns.svc
        if len(labels) == 2:
            return self.lookup(labels[1], labels[0])          # svc.ns (None unless it exists)
        if len(labels) == 1:
            return self.lookup(self.namespace, labels[0])     # svc, in the pod's namespace
        return None

    # -- queries -------------------------------------------------------------

    def decide(self, wire: bytes, udp: bool) -> Decision:
        """What to do with one query from the pod (``udp``: it came over UDP)."""
        if self.generation is None or not HEADER_BYTES <= len(wire) <= CACHED_QUERY_BYTES:
            return self._decide(wire, udp)
        generation = self.generation()
        if generation is not self._cache_of:
            self._cache.clear()
            self._cache_of = generation
        key = (wire[2:], udp)
        hit = self._cache.get(key)
        if hit is not None:
            return Reply(wire[:2] + hit.wire[2:], hit.outcome)
        decision = self._decide(wire, udp)
        if isinstance(decision, Reply) and decision.outcome in ("local", "nodata"):
            if len(self._cache) >= ANSWER_CACHE:
                self._cache.clear()
            self._cache[key] = decision
        return decision

    def _decide(self, wire: bytes, udp: bool) -> Decision:
        if len(wire) < HEADER_BYTES:
            return Drop("dropped")
        if wire[2] & 0x80:
            return Drop("dropped")      # a response sent to us: never answer one (no loops)
        if len(wire) > MAX_QUERY_BYTES:
            return Reply(_error_header(wire, dns.rcode.FORMERR), "formerr")
        try:
            query = dns.message.from_wire(wire, ignore_trailing=False)
        except dns.exception.DNSException:
            return Reply(_error_header(wire, dns.rcode.FORMERR), "formerr")
        except Exception:
            return Reply(_error_header(wire, dns.rcode.FORMERR), "formerr")
        if query.opcode() != dns.opcode.QUERY:
            return Reply(_response(query, dns.rcode.NOTIMP).to_wire(), "notimp")
        if len(query.question) != 1:
            return Reply(_response(query, dns.rcode.FORMERR).to_wire(), "formerr")
        q = query.question[0]
        if q.rdclass == dns.rdataclass.IN and q.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            addresses = self.mesh_addresses(_split(q.name))
            if addresses is None and self.hosts is not None:
                # A ServiceEntry host (agent/state/serviceentry.py): answered only when
                # the mesh has an address for it; else the upstream resolver's.
                addresses = self.hosts(q.name.to_text(omit_final_dot=True).lower()) or None
            if addresses is not None:
                return self._answer(query, q, addresses, udp)
        return Forward(wire, query.id, f"{q.name} {dns.rdatatype.to_text(q.rdtype)}", _udp_limit(query))

    def _answer(self, query: dns.message.Message, q: dns.rrset.RRset, addresses: Sequence[str],
                udp: bool) -> Reply:
        want = 4 if q.rdtype == dns.rdatatype.A else 6
        chosen = [a for a in addresses if _version(a) == want]
        response = _response(query, dns.rcode.NOERROR)
        response.flags |= dns.flags.AA
        if chosen:
            rrset = response.find_rrset(response.answer, q.name, dns.rdataclass.IN, q.rdtype, create=True)
            kind = dns.rdtypes.IN.A.A if want == 4 else dns.rdtypes.IN.AAAA.AAAA
            for address in chosen:
                rrset.add(kind(dns.rdataclass.IN, q.rdtype, address), ANSWER_TTL)
        limit = _udp_limit(query) if udp else 65535
        try:
            wire = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            # Too many addresses for the client's UDP size: TC, so it asks over TCP.
            response = _response(query, dns.rcode.NOERROR)
            response.flags |= dns.flags.AA | dns.flags.TC
            wire = response.to_wire()
        return Reply(wire, "local" if chosen else "nodata")

    # -- upstream ------------------------------------------------------------

    @staticmethod
    def upstream_reply(forward: Forward, reply: bytes | None) -> Reply:
        """The client's answer from what the upstream said (None: nothing usable arrived)."""
        if reply is None or len(reply) < HEADER_BYTES or int.from_bytes(reply[:2], "big") != forward.id \
                or not reply[2] & 0x80:
            return Reply(_error_header(forward.query, dns.rcode.SERVFAIL), "servfail")
        return Reply(reply, "forwarded")


def truncated(reply: bytes) -> bool:
    """The upstream's UDP reply has TC set: ask again over TCP."""
    return len(reply) >= HEADER_BYTES and bool(reply[2] & 0x02)


def matches(forward: Forward, reply: bytes) -> bool:
    """A UDP datagram is the answer to this query (id and QR), not a stray or spoofed one."""
    return len(reply) >= HEADER_BYTES and int.from_bytes(reply[:2], "big") == forward.id and bool(reply[2] & 0x80)


def _udp_limit(query: dns.message.Message) -> int:
    """The client's UDP payload size: its EDNS size (at least 512), else 512."""
    return max(query.payload, CLASSIC_UDP_PAYLOAD) if query.edns >= 0 else CLASSIC_UDP_PAYLOAD


def _version(address: str) -> int:
    try:
        return ipaddress.ip_address(address).version
    except ValueError:
        return 0


def _response(query: dns.message.Message, rcode: dns.rcode.Rcode) -> dns.message.Message:
    response = dns.message.make_response(query)
    response.flags |= dns.flags.RA
    response.set_rcode(rcode)
    return response


def _error_header(wire: bytes, rcode: dns.rcode.Rcode) -> bytes:
    """A bare response (header only) to a query that cannot be parsed or answered:
    the client's id and RD bit, QR and RA set, no sections."""
    flags = 0x8000 | 0x0080 | (int.from_bytes(wire[2:4], "big") & 0x0100) | (rcode & 0xF)
    return wire[:2] + flags.to_bytes(2, "big") + bytes(8)


class TokenBucket:
    """Queries per second for one pod: ``rate`` a second, bursts up to ``burst``."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._tokens = burst
        self._at = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True
