"""The per-pod DNS shell's bounds: a flood is rate limited, forwards in flight
are capped (SERVFAIL beyond), and outcomes are counted. No sockets: queries
are fed to ``PodDns.query`` as the UDP protocol does."""

from __future__ import annotations

import asyncio

import dns.message
import dns.rcode

from agent.dns import server
from agent.dns.resolver import ResolvConf, Resolver, TokenBucket
from agent.dns.server import DnsCounters, PodDns


async def no_resolvers() -> ResolvConf:
    return ResolvConf((), ())


def make(upstream=no_resolvers) -> tuple[PodDns, list[bytes], list[str]]:
    outcomes: list[str] = []
    pod = PodDns("shop/web", Resolver("shop", lambda ns, name: ("198.19.0.10",) if name == "web" else None),
                 [], [], -1, None, DnsCounters(), outcomes.append, upstream)   # type: ignore[arg-type]
    return pod, [], outcomes


def test_a_flood_is_rate_limited_per_pod():
    pod, replies, outcomes = make()
    pod.bucket = TokenBucket(server.QUERY_RATE, server.QUERY_BURST, clock=lambda: 0.0)   # no refill meanwhile
    wire = dns.message.make_query("web.shop.svc.cluster.local.", "A").to_wire()
    n = int(server.QUERY_BURST) + 50
    for _ in range(n):
        pod.query(wire, True, replies.append)
    assert len(replies) == pod.counters.outcomes["local"] == server.QUERY_BURST
    assert pod.counters.outcomes["ratelimited"] == n - len(replies) > 0
    assert pod.counters.udp == n and outcomes.count("ratelimited") == n - len(replies)


def test_forwards_in_flight_are_capped_and_failures_are_servfail():
    async def scenario():
        pod, replies, _ = make()          # no upstream resolver at all
        for i in range(server.MAX_IN_FLIGHT + 10):
            pod.query(dns.message.make_query(f"n{i}.example.", "A").to_wire(), True, replies.append)
        assert pod.in_flight == server.MAX_IN_FLIGHT
        assert pod.counters.outcomes["overloaded"] == 10
        await asyncio.sleep(0.05)
        assert pod.in_flight == 0
        return pod, replies
    pod, replies = asyncio.run(scenario())
    assert len(replies) == server.MAX_IN_FLIGHT + 10
    assert all(dns.message.from_wire(r).rcode() == dns.rcode.SERVFAIL for r in replies)
    assert pod.counters.outcomes["servfail"] == server.MAX_IN_FLIGHT
