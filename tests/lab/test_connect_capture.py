"""The connect4/connect6 capture programs, case by case, on the real kernel.

The lab tests go through pods with IPv4 addresses only, so they never reach
connect6 (an IPv6 socket: a native IPv6 destination, or an IPv4-mapped one
from a dual-stack socket). Here one process in a network namespace of the
test's own connects to each kind of destination, and the test checks which
connects were sent to the outbound listener and which original destination
the agent reads back for each (``CaptureDatapath.original_destination``,
as the outbound listener does).

The loader attaches the programs to a fresh cgroup v2 directory of the
test's own, and only that process is moved into it: nothing else on the
machine is captured. Netns, cgroup, pins and the process are removed
afterwards, also on failure.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.lab.conftest import private_datapath

POD_IP4 = "198.18.77.2"
POD_IP6 = "fd00:198:18::77:2"

# Runs inside the pod's netns: the agent's two outbound listeners, then, on
# "go", one connect per case; prints which listener took it and the peer.
CLIENT = r"""
import json, select, socket, sys
v4 = socket.socket(socket.AF_INET); v4.bind(("127.0.0.1", 15001)); v4.listen(16)
v6 = socket.socket(socket.AF_INET6); v6.bind(("::1", 15001)); v6.listen(16)
probe = socket.socket()
print(json.dumps({"cookie": int.from_bytes(probe.getsockopt(socket.SOL_SOCKET, 71, 8), "little")}), flush=True)
sys.stdin.readline()                  # the test moved us into its cgroup: sockets made now are hooked
held, out = [], []
for family, host, port in json.loads(sys.argv[1]):
    c = socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET)
    c.settimeout(3)
    try:
        c.connect((host, port))
    except OSError as exc:
        out.append({"refused": exc.errno}); continue
    held.append(c)
    ready, _, _ = select.select([v4, v6], [], [], 3)
    if not ready:
        out.append({"connected_elsewhere": list(c.getpeername()[:2])}); continue
    conn, peer = ready[0].accept()
    held.append(conn)
    out.append({"listener": "v4" if ready[0] is v4 else "v6", "peer": [peer[0], peer[1]]})
print(json.dumps(out), flush=True)
sys.stdin.readline()
"""

# (socket family, destination, port) -> how the connect must end:
# ("captured", listener, original destination) or ("exempt", None, None).
CASES = [
    ((4, "198.18.77.9", 8080), ("captured", "v4", ("198.18.77.9", 8080))),           # connect4
    ((6, "::ffff:198.18.77.9", 8081), ("captured", "v4", ("198.18.77.9", 8081))),    # connect6, IPv4-mapped
    ((6, "fd00:198:18::99", 8082), ("captured", "v6", ("fd00:198:18::99", 8082))),   # connect6, IPv6
    ((4, POD_IP4, 15001), ("exempt", None, None)),                                    # the pod's own IPv4
    ((6, f"::ffff:{POD_IP4}", 15001), ("exempt", None, None)),                        # ... mapped
    ((6, "::ffff:127.0.0.1", 9), ("exempt", None, None)),                             # mapped loopback
    ((6, POD_IP6, 15001), ("exempt", None, None)),                                    # the pod's own IPv6
    ((6, "::1", 9), ("exempt", None, None)),                                          # IPv6 loopback
]


@pytest.fixture
def pod_netns():
    """(datapath, netns name, cgroup); the netns holds the pod's addresses."""
    with private_datapath("ambient-test-c6-", POD_IP4, POD_IP6) as made:
        yield made


def test_connect4_and_connect6_capture_exactly_what_leaves_the_pod(pod_netns):
    dp, netns, cgroup = pod_netns
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", CLIENT,
                             json.dumps([case for case, _ in CASES])],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stdout.readline()
        assert first, proc.stderr.read()
        cookie = json.loads(first)["cookie"]
        dp.set_outbound(cookie, [POD_IP4, POD_IP6])
        with open(f"{cgroup}/cgroup.procs", "w") as f:      # `ip netns exec` execs: the pid is python's
            f.write(str(proc.pid))
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
        results = json.loads(line)

        seen = []
        for ((_family, host, port), _want), got in zip(CASES, results):
            if "listener" not in got:
                seen.append(("exempt", None, None))
                continue
            orig = dp.original_destination(cookie, got["peer"][0], got["peer"][1])
            seen.append(("captured", got["listener"], (orig.ip, orig.port) if orig else None))
        assert seen == [want for _case, want in CASES], list(zip([c for c, _ in CASES], results))
        # Exempt connects were refused where nothing listens, not sent anywhere else.
        assert all(r.get("refused") for r, (_c, want) in zip(results, CASES) if want[0] == "exempt"), results
        stats = dp.stats()
        captured = sum(1 for _c, want in CASES if want[0] == "captured")
        assert (stats["outbound_captured"], stats["orig_dst_recorded"]) == (captured, captured), stats
    finally:
        proc.kill()
        proc.wait(10)
