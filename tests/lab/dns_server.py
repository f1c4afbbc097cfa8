"""A small authoritative DNS server for lab tests, playing the cluster's DNS.

``python dns_server.py ZONE_JSON LOG`` answers A and AAAA from ZONE_JSON
(``{"name.": ["addr", ...]}``; anything else NXDOMAIN) on UDP and TCP
port 53 of every address of the pod it runs in, logs ``<udp|tcp> <name>
<type>`` per query to LOG, and prints ``ready`` once it listens. Over UDP it
never sends more than 512 bytes, whatever the client's EDNS size (as a
server configured with a small UDP limit does): a longer answer goes out
empty with TC set, so clients (and the agent's proxy) must ask over TCP.
"""

from __future__ import annotations

import json
import socket
import sys
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype

UDP_LIMIT = 512


def answer(zone: dict, wire: bytes, log, how: str) -> bytes:
    query = dns.message.from_wire(wire)
    q = query.question[0]
    name = q.name.to_text().lower()
    log.write(f"{how} {name} {dns.rdatatype.to_text(q.rdtype)}\n")
    log.flush()
    response = dns.message.make_response(query)
    response.flags |= dns.flags.AA
    if name not in zone:
        response.set_rcode(dns.rcode.NXDOMAIN)
    else:
        want = 4 if q.rdtype == dns.rdatatype.A else 6 if q.rdtype == dns.rdatatype.AAAA else 0
        addrs = [a for a in zone[name] if (":" in a) == (want == 6)] if want else []
        if addrs:
            rrset = response.find_rrset(response.answer, q.name, dns.rdataclass.IN, q.rdtype, create=True)
            for a in addrs:
                rrset.add(dns.rdata.from_text(dns.rdataclass.IN, q.rdtype, a), 60)
    out = response.to_wire()
    if how == "udp" and len(out) > UDP_LIMIT:
        response.answer = []
        response.flags |= dns.flags.TC
        out = response.to_wire()
    return out


def serve_tcp(zone: dict, listener: socket.socket, log) -> None:
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                size = int.from_bytes(conn.recv(2, socket.MSG_WAITALL), "big")
                out = answer(zone, conn.recv(size, socket.MSG_WAITALL), log, "tcp")
                conn.sendall(len(out).to_bytes(2, "big") + out)
            except Exception as exc:
                log.write(f"tcp error {exc}\n")


def _bind(kind: int) -> socket.socket:
    """Port 53 on every address: IPv6 and IPv4 on one socket where the pod has IPv6."""
    try:
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", 53))
        return sock
    except OSError:
        sock.close()
    sock = socket.socket(socket.AF_INET, kind)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", 53))
    return sock


def main() -> None:
    zone = {k.lower(): v for k, v in json.loads(sys.argv[1]).items()}
    log = open(sys.argv[2], "a")  # noqa: SIM115 - open for the life of the process
    udp, tcp = _bind(socket.SOCK_DGRAM), _bind(socket.SOCK_STREAM)
    tcp.listen(16)
    threading.Thread(target=serve_tcp, args=(zone, tcp, log), daemon=True).start()
    print("ready", flush=True)
    while True:
        wire, peer = udp.recvfrom(65535)
        try:
            udp.sendto(answer(zone, wire, log, "udp"), peer)
        except Exception as exc:
            log.write(f"udp error {exc}\n")


if __name__ == "__main__":
    main()
