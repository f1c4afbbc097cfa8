"""Scenario 8's cluster DNS stand-in and its DNS client (run inside lab pods).

Never used by the product. Messages are built and checked with dnspython
(as the agent's proxy does); the sockets are plain stdlib, one thread,
``selectors``, like ``bench/loadgen.py``.

Subcommands (each prints one JSON object on stdout):

serve ZONE_JSON       UDP port 53 on every IPv4 address of the pod; A
                      records from ZONE_JSON (``{"name.": ["addr", ...]}``),
                      NXDOMAIN for other names. Prints ``{"ready": true}``
                      once it listens. An answer is built once per distinct
                      query (everything after the 2-byte id) and then sent
                      again with the new id: what a cluster DNS with a cache
                      (CoreDNS ``cache``) does, so the baseline's server is
                      as quick as this machine lets a Python server be.
query NAME            A queries for NAME to the first ``nameserver`` of
                      /etc/resolv.conf (as the process sees it; ``--server``
                      overrides), on ``--concurrency`` connected UDP sockets
                      (glibc's resolver connects its UDP socket too), each
                      with one query outstanding: send, wait for the reply
                      with that id, send the next. Latency runs from just
                      before ``send()`` to the reply's arrival. Every reply is
                      checked: NOERROR with exactly ``--expect`` as the A
                      record (a wrong answer counts as an error, not as a
                      latency). A query unanswered after ``--timeout`` counts
                      as a timeout and is sent again with a new id. The first
                      ``--warmup`` queries are not counted. Stops after
                      ``--count`` counted queries, or when ``--count`` is 0
                      after ``--duration`` seconds of counted queries.
"""

from __future__ import annotations

import argparse
import json
import selectors
import socket
import sys
import time

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

# Run as a script from bench/ (in a lab pod), beside loadgen.py: the same percentiles.
from loadgen import percentiles

HEADER = 12
CACHE_LIMIT = 4096


# --- server ---------------------------------------------------------------------

def build_answer(zone: dict[str, list[str]], wire: bytes) -> bytes:
    query = dns.message.from_wire(wire)
    q = query.question[0]
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA | dns.flags.RA
    name = q.name.to_text().lower()
    if name not in zone:
        response.set_rcode(dns.rcode.NXDOMAIN)
    elif q.rdtype == dns.rdatatype.A:
        rrset = response.find_rrset(response.answer, q.name, dns.rdataclass.IN, q.rdtype, create=True)
        for addr in zone[name]:
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, q.rdtype, addr), 30)
    return response.to_wire()


def serve(args) -> int:
    zone = {k.lower(): v for k, v in json.loads(args.zone).items()}
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 53))
    cache: dict[bytes, bytes] = {}
    print(json.dumps({"ready": True}), flush=True)
    while True:
        wire, peer = sock.recvfrom(4096)
        if len(wire) < HEADER or wire[2] & 0x80:
            continue
        key = wire[2:]
        tail = cache.get(key)
        if tail is None:
            try:
                tail = build_answer(zone, wire)[2:]
            except Exception:
                continue            # not a query we can parse: say nothing
            if len(cache) >= CACHE_LIMIT:
                cache.clear()
            cache[key] = tail
        sock.sendto(wire[:2] + tail, peer)


# --- client ---------------------------------------------------------------------

def resolv_conf_nameserver(path: str = "/etc/resolv.conf") -> str:
    with open(path) as fh:
        for line in fh:
            words = line.split()
            if len(words) >= 2 and words[0] == "nameserver":
                return words[1]
    raise SystemExit(f"no nameserver in {path}")


def check(reply: bytes, expect: str) -> str | None:
    """None when ``reply`` is NOERROR with exactly ``expect`` as its A records, else what is wrong."""
    try:
        msg = dns.message.from_wire(reply)
    except Exception as exc:
        return f"unparsable reply: {exc}"
    if msg.rcode() != dns.rcode.NOERROR:
        return f"rcode {dns.rcode.to_text(msg.rcode())}"
    got = sorted(r.address for rrset in msg.answer if rrset.rdtype == dns.rdatatype.A for r in rrset)
    return None if got == [expect] else f"answer {got}, expected [{expect}]"


def query(args) -> int:
    server = args.server or resolv_conf_nameserver()
    template = bytearray(dns.message.make_query(args.name, "A").to_wire())
    socks = []
    sel = selectors.DefaultSelector()
    for i in range(args.concurrency):
        s = socket.socket(socket.AF_INET6 if ":" in server else socket.AF_INET, socket.SOCK_DGRAM)
        s.connect((server, 53))
        s.setblocking(False)
        socks.append(s)
        sel.register(s, selectors.EVENT_READ, i)
    # Per socket: (id, sent at, counted) of its outstanding query, or None.
    pending: list[tuple[int, float, bool] | None] = [None] * len(socks)
    state = {"id": int.from_bytes(template[:2], "big"), "sent": 0, "counted_sent": 0}
    lat: list[float] = []
    timeouts = 0
    errors = 0
    first_error = None
    good: set[bytes] = set()            # reply bytes after the id, already checked
    measure_from: float | None = None
    last_reply = 0.0
    stop_sending = False

    def send(i: int) -> None:
        nonlocal measure_from
        counted = state["sent"] >= args.warmup
        if counted and measure_from is None:
            measure_from = time.perf_counter()
        state["id"] = (state["id"] + 1) & 0xFFFF
        template[0:2] = state["id"].to_bytes(2, "big")
        data = bytes(template)
        t0 = time.perf_counter()
        socks[i].send(data)
        pending[i] = (state["id"], t0, counted)
        state["sent"] += 1
        if counted:
            state["counted_sent"] += 1

    def may_send() -> bool:
        if stop_sending:
            return False
        if args.count:
            return state["counted_sent"] < args.count
        return measure_from is None or time.perf_counter() - measure_from < args.duration

    for i in range(len(socks)):
        send(i)
    while any(p is not None for p in pending):
        now = time.perf_counter()
        wait = min(p[1] + args.timeout for p in pending if p is not None) - now
        for key, _ in sel.select(max(0.0, wait)):
            i = key.data
            try:
                reply = socks[i].recv(4096)
            except BlockingIOError:
                continue
            except ConnectionRefusedError:      # ICMP port unreachable: no server there
                stop_sending = True
                errors += 1
                first_error = first_error or f"connection refused by {server}:53"
                pending[i] = None
                continue
            t1 = time.perf_counter()
            p = pending[i]
            if p is None or len(reply) < HEADER or int.from_bytes(reply[:2], "big") != p[0] \
                    or not reply[2] & 0x80:
                continue                         # a late answer to a query already timed out
            pending[i] = None
            body = reply[2:]
            if body not in good:
                problem = check(reply, args.expect)
                if problem is None:
                    good.add(body)
            else:
                problem = None
            if p[2]:
                last_reply = t1
                if problem is None:
                    lat.append(t1 - p[1])
                else:
                    errors += 1
                    first_error = first_error or problem
            if may_send():
                send(i)
        now = time.perf_counter()
        for i, p in enumerate(pending):
            if p is not None and now - p[1] >= args.timeout:
                pending[i] = None
                if p[2]:
                    timeouts += 1
                if may_send():
                    send(i)
    seconds = (last_reply - measure_from) if measure_from is not None and last_reply else 0.0
    out = {"server": server, "name": args.name, "concurrency": args.concurrency, "queries": len(lat),
           "timeouts": timeouts, "errors": errors, "first_error": first_error, "seconds": seconds,
           "rate": len(lat) / seconds if seconds > 0 else None, **percentiles(lat)}
    print(json.dumps(out), flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("zone", help='JSON: {"name.": ["IPv4 address", ...]}')
    q = sub.add_parser("query")
    q.add_argument("name")
    q.add_argument("--expect", required=True, help="the one A record every answer must hold")
    q.add_argument("--server", default="", help="default: the first nameserver of /etc/resolv.conf")
    q.add_argument("--count", type=int, default=1000, help="counted queries (0: run for --duration)")
    q.add_argument("--duration", type=float, default=4.0)
    q.add_argument("--warmup", type=int, default=50, help="queries sent first and not counted")
    q.add_argument("--concurrency", type=int, default=1)
    q.add_argument("--timeout", type=float, default=1.0)
    args = p.parse_args(argv)
    return {"serve": serve, "query": query}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
