"""DNS capture (bpf/dns.c) case by case on the real kernel.

One process in a network namespace of the test's own plays both the pod's
application and the agent's DNS listeners (UDP and TCP on 127.0.0.1:15053,
UDP on [::1]:15053). Its port-53 queries must reach those listeners:
unconnected UDP through sendmsg4/6, connected UDP (as glibc's resolver
sends) and TCP through connect4/6; the listener's answer must come back
with the resolver's address as its source (recvmsg4/6), or a resolver
would drop it. Not captured: other ports, loopback resolvers, sockets with
the agent's mark, and pods whose pod_config has no POD_DNS.

The loader attaches the programs to a fresh cgroup v2 directory of the
test's own, and only that process is moved into it. Netns, cgroup, pins and
the process are removed afterwards, also on failure.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab.conftest import private_datapath

POD_IP4 = "198.18.78.2"
POD_IP6 = "fd00:198:18::78:2"
RESOLVER4 = "198.18.78.53"
RESOLVER6 = "fd00:198:18::78:53"

POD = r"""
import json, select, socket, sys
u4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u4.bind(("127.0.0.1", 15053))
u6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
u6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1); u6.bind(("::1", 15053))
t4 = socket.socket(); t4.bind(("127.0.0.1", 15053)); t4.listen(8)
probe = socket.socket()
print(json.dumps({"cookie": int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, 71, 8), "little")}), flush=True)

def run(kind, family, host, port, mark):
    s = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET,
                      socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(1)
    if mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, 0x539)
    try:
        if kind == "udp":
            s.sendto(b"query", (host, port))
        elif kind == "udp-connected":
            s.connect((host, port)); s.send(b"query")
        else:
            s.connect((host, port))
    except OSError as exc:
        return {"error": exc.errno}
    if kind == "tcp":
        ready, _, _ = select.select([t4], [], [], 1)
        if not ready:
            return {"none": True}
        t4.accept()[0].close()
        return {"listener": "tcp"}
    ready, _, _ = select.select([u4, u6], [], [], 1)
    if not ready:
        return {"none": True}
    data, peer = ready[0].recvfrom(100)
    ready[0].sendto(b"answer", peer)
    data, source = s.recvfrom(100)
    return {"listener": "u4" if ready[0] is u4 else "u6", "source": [source[0], source[1]], "data": data.decode()}

for line in sys.stdin:
    print(json.dumps([run(*case) for case in json.loads(line)]), flush=True)
"""

CAPTURED = [
    # (kind, family, resolver, port, agent mark) -> what must happen
    (("udp", 4, RESOLVER4, 53, False), {"listener": "u4", "source": [RESOLVER4, 53]}),
    (("udp-connected", 4, RESOLVER4, 53, False), {"listener": "u4", "source": [RESOLVER4, 53]}),
    (("udp", 6, RESOLVER6, 53, False), {"listener": "u6", "source": [RESOLVER6, 53]}),
    (("udp-connected", 6, RESOLVER6, 53, False), {"listener": "u6", "source": [RESOLVER6, 53]}),
    (("udp", 6, f"::ffff:{RESOLVER4}", 53, False), {"listener": "u4", "source": [f"::ffff:{RESOLVER4}", 53]}),
    (("udp-connected", 6, f"::ffff:{RESOLVER4}", 53, False),
     {"listener": "u4", "source": [f"::ffff:{RESOLVER4}", 53]}),
    (("tcp", 4, RESOLVER4, 53, False), {"listener": "tcp"}),
]
NOT_CAPTURED = [
    ("udp", 4, RESOLVER4, 5353, False),        # not DNS
    ("udp", 4, RESOLVER4, 53, True),           # the agent's own upstream query (its mark)
    ("udp", 6, RESOLVER6, 53, True),
    ("udp", 4, "127.0.0.1", 53, False),        # a resolver inside the pod
    ("tcp", 4, RESOLVER4, 53, True),
]


@pytest.fixture
def pod():
    """(datapath, the pod process, its netns cookie, ask(cases) -> results)."""
    with private_datapath("ambient-test-dns-", POD_IP4, POD_IP6) as (dp, name, cgroup):
        proc = subprocess.Popen(["ip", "netns", "exec", name, sys.executable, "-c", POD],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()
            assert first, proc.stderr.read()
            cookie = json.loads(first)["cookie"]
            with open(f"{cgroup}/cgroup.procs", "w") as f:
                f.write(str(proc.pid))

            def ask(cases):
                proc.stdin.write(json.dumps(cases) + "\n")
                proc.stdin.flush()
                line = proc.stdout.readline()
                assert line, proc.stderr.read()
                return json.loads(line)
            yield dp, cookie, ask
        finally:
            proc.kill()
            proc.wait(10)


def _captured(result: dict) -> bool:
    return "listener" in result


def test_port_53_goes_to_the_dns_listener_and_replies_come_from_the_resolver(pod):
    dp, cookie, ask = pod
    dp.set_outbound(cookie, [POD_IP4, POD_IP6], dns=True)
    results = ask([case for case, _ in CAPTURED])
    for (case, want), got in zip(CAPTURED, results, strict=True):
        assert {k: got.get(k) for k in want} == want, (case, got)
    stats = dp.stats()
    assert stats["dns_udp_captured"] == 6 and stats["dns_tcp_captured"] == 1, stats
    assert stats["outbound_captured"] == 0, stats      # DNS over TCP is not sent to 15001

    results = ask(NOT_CAPTURED)
    assert [_captured(r) for r in results] == [False] * len(NOT_CAPTURED), list(zip(NOT_CAPTURED, results, strict=True))
    assert dp.stats()["dns_udp_captured"] == 6


def test_a_pod_without_dns_capture_is_untouched(pod):
    dp, cookie, ask = pod
    dp.set_outbound(cookie, [POD_IP4, POD_IP6], dns=False)
    results = ask([case for case, _ in CAPTURED])
    assert [_captured(r) for r in results] == [False] * len(CAPTURED), results
    stats = dp.stats()
    assert stats["dns_udp_captured"] == 0 and stats["dns_tcp_captured"] == 0, stats
    # Its TCP to port 53 is an ordinary captured connection (to the outbound listener).
    assert stats["outbound_captured"] == 1, stats

    dp.set_outbound(cookie, [POD_IP4, POD_IP6], dns=True)      # switched on for a running pod
    got = ask([CAPTURED[0][0]])[0]
    assert got.get("source") == [RESOLVER4, 53], got
