"""Zero-downtime agent upgrade on a node (issue 11, item 8).

A second agent is started on a node while its agent runs (``Lab.upgrade_agent``,
same run dir, pin dir and pods); the running one hands the node over, drains
and exits (docs/ARCHITECTURE.md, "Agent upgrade"). Meanwhile clients open new
connections in a loop, meshed (HBONE: node1's outbound listener, node2's
15008) and plaintext into the mesh (node2's 15006), and long-lived connections
stream numbered chunks whose every echoed byte is checked. The server side
(node2) is upgraded first, then the client side (node1). Everything on the wire
is captured to prove that no meshed byte left in plaintext.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from agent.capture import inpod
from agent.netns import NetnsSwitcher
from lab.lab import Lab
from tests.builders import MESH, manifest, pod
from tests.lab.conftest import PEER, agent_pod, running_lab, unique_name, wait_for

DRAIN = 8.0          # --drain-seconds of every agent in this lab

MANIFEST = manifest(*MESH, pod("outsider", "default", node="node1"))


@pytest.fixture(scope="module")
def lab():
    with running_lab("up", MANIFEST, agent_args=["--drain-seconds", str(DRAIN)]) as lab:
        yield lab


class Clients:
    """peer.py loop/stream processes in pods; every one is killed at the end."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.procs: list[subprocess.Popen] = []

    def start(self, pod: str, mode: str, host: str, port: int, marker: str, *extra: str) -> subprocess.Popen:
        proc = self.lab.exec(pod, [sys.executable, PEER, mode, host, str(port), marker, *extra],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline().strip()
        assert line == "started", f"{mode} client in {pod} did not start: {line!r} {proc.stderr.read()}"
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen, timeout: float = 30.0, stop: bool = True) -> dict:
        """Read its JSON summary; with ``stop``, tell it to stop first, else wait for its end."""
        if stop:
            try:
                proc.stdin.write("stop\n")
                proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                pass             # it has ended already
            out, err = proc.communicate(timeout=timeout)
        else:
            # Not communicate(): closing its stdin would tell it to stop.
            proc.wait(timeout=timeout)
            out, err = proc.stdout.read(), proc.stderr.read()
        assert proc.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def _ready(lab: Lab, node: str) -> tuple[int, str, int]:
    """(readiness status, reason, pid in /config_dump) as seen on the node's ports."""
    code = (
        "import json, urllib.request, urllib.error, sys\n"
        "try:\n"
        "    r = urllib.request.urlopen(f'http://{sys.argv[1]}:15021/healthz/ready', timeout=5)\n"
        "    status, reason = r.status, r.read().decode().strip()\n"
        "except urllib.error.HTTPError as e:\n"
        "    status, reason = e.code, e.read().decode().strip()\n"
        "dump = json.load(urllib.request.urlopen('http://127.0.0.1:15000/config_dump', timeout=5))\n"
        "print(json.dumps([status, reason, dump['pid']]))\n")
    done = lab.node_run(node, [sys.executable, "-c", code, lab.node_ip(node)], timeout=20)
    assert done.returncode == 0, done.stderr
    return tuple(json.loads(done.stdout))


def _drain_began(lab: Lab, node: str, new_pid: int) -> float:
    """When the old agent of ``node`` began draining for ``new_pid`` (its log line's time)."""
    needle = f"handed the node over to the agent with pid {new_pid}: draining"
    for line in (lab.node_dir(node) / "agent.log").read_text(errors="replace").splitlines():
        if needle in line:
            stamp, millis = line[:23].split(",")
            return time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
    raise AssertionError(f"the old agent of {node} never said it drains for pid {new_pid}")


def _upgrade(lab: Lab, node: str) -> tuple[int, int, float, float]:
    """Upgrade ``node``'s agent: (old pid, new pid, when it began, when the new one answered)."""
    old = lab.agent_pid(node)
    began = time.time()
    new = lab.upgrade_agent(node)
    answered = time.time()
    assert new != old and lab.agent_pid(node) == new
    return old, new, began, answered


def test_upgrade_refuses_no_connection_and_drains_the_old_agent(lab, servers, tmp_path):
    srv = servers(lab)
    srv.serve("mesh/server", 7080, "app")
    server_ip = lab.pod_ip("mesh/server")
    marker = "UPGRADE-MARKER-" + unique_name()
    control = "OUTSIDER-MARKER-" + unique_name()
    clients = Clients(lab)
    pcap = tmp_path / "wire.pcap"
    dump = lab.wire_exec(["tcpdump", "-i", "wire", "--immediate-mode", "-U", "-n", "-Z", "root",
                          "-w", str(pcap), "tcp"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)   # tcpdump has no readiness signal; give it time to attach
        # New connections for the whole test: meshed (HBONE) and plaintext into the mesh.
        meshed_loop = clients.start("mesh/client", "loop", server_ip, 7080, marker + "-loop",
                                    "--seconds", "300")
        plain_loop = clients.start("default/outsider", "loop", server_ip, 7080, control,
                                   "--seconds", "300")

        # -- the server side: node2 (inbound HBONE and plaintext listeners) --
        survivor = clients.start("mesh/client", "stream", server_ip, 7080, marker + "-s1")
        cut = clients.start("mesh/client", "stream", server_ip, 7080, marker + "-s2")
        time.sleep(1.0)
        old2, new2, began2, answered2 = _upgrade(lab, "node2")
        # Inside the old agent's drain window: the stream it carries is intact.
        s1 = clients.finish(survivor)
        assert s1["ok"], s1
        assert s1["bytes"] > 0
        # A stream still open when the drain ends is cut with an error, never a
        # FIN that would pass for its end (and not before the window is over).
        s2 = clients.finish(cut, timeout=DRAIN + 30, stop=False)
        assert not s2["ok"] and s2["error"] in ("ECONNRESET", "EPIPE"), s2
        drain2 = _drain_began(lab, "node2", new2)
        assert drain2 + DRAIN - 0.2 <= s2["at"] <= drain2 + DRAIN + 5.0, (s2, drain2)
        wait_for(lambda: old2 not in lab.previous_agent_pids("node2"), DRAIN + 20,
                 f"the old agent of node2 (pid {old2}) to exit after its drain")
        assert _ready(lab, "node2")[0::2] == (200, new2)
        assert agent_pod(lab, "node2", "mesh/server")["counters"]["hbone"]["connections"] > 0
        assert agent_pod(lab, "node2", "mesh/server")["counters"]["inbound"]["connections"] > 0

        # -- the client side: node1 (outbound listener, HBONE client pool) --
        survivor = clients.start("mesh/client", "stream", server_ip, 7080, marker + "-s3")
        cut = clients.start("mesh/client", "stream", server_ip, 7080, marker + "-s4")
        time.sleep(1.0)
        old1, new1, began1, answered1 = _upgrade(lab, "node1")
        s3 = clients.finish(survivor)
        assert s3["ok"], s3
        s4 = clients.finish(cut, timeout=DRAIN + 30, stop=False)
        assert not s4["ok"] and s4["error"] in ("ECONNRESET", "EPIPE"), s4
        drain1 = _drain_began(lab, "node1", new1)
        assert drain1 + DRAIN - 0.2 <= s4["at"] <= drain1 + DRAIN + 5.0, (s4, drain1)
        wait_for(lambda: old1 not in lab.previous_agent_pids("node1"), DRAIN + 20,
                 f"the old agent of node1 (pid {old1}) to exit after its drain")
        assert _ready(lab, "node1")[0::2] == (200, new1)
        assert agent_pod(lab, "node1", "mesh/client")["counters"]["outbound"]["connections"] > 0

        time.sleep(1.0)
        for loop_proc, what in ((meshed_loop, "meshed"), (plain_loop, "plaintext")):
            summary = clients.finish(loop_proc)
            # No connection refused, reset or stalled, at any moment.
            assert summary["failures"] == [], (what, summary["failures"][:10])
            assert summary["ok"] > 50, (what, summary["ok"])
            # ... and the loop really ran across both handovers.
            for began, answered in ((began2, answered2), (began1, answered1)):
                assert any(began <= t <= answered + 1.0 for t in summary["succeeded_at"]), (what, began)
        time.sleep(0.5)
    finally:
        clients.kill()
        dump.send_signal(signal.SIGINT)
        dump.wait(10)
    text = subprocess.run(["tcpdump", "-r", str(pcap), "-n", "-A"], capture_output=True, text=True).stdout
    assert control in text, dump.stderr.read().decode()   # the capture saw application bytes
    assert marker not in text                              # ... but never the meshed ones
    meshed = {lab.pod_ip("mesh/client"), lab.pod_ip("mesh/server")}
    ports = set()
    for line in text.splitlines():
        if " IP " in line and " > " in line:
            src, dst = line.split(" IP ", 1)[1].split(":")[0].split(" > ")
            s_ip, s_port = src.rsplit(".", 1)
            d_ip, d_port = dst.rsplit(".", 1)
            if {s_ip, d_ip} == meshed:
                ports.add(d_port if d_ip == server_ip else s_port)
    assert ports == {"15008"}, ports


def test_a_stalled_agent_is_taken_over_and_its_queued_connections_complete(lab, servers):
    """An agent that cannot answer the handover request (stopped here with
    SIGSTOP) is taken over without its consent, and no connection is lost.

    While it is stopped, connections the kernel hashes to its listeners wait
    in their accept queues. The new agent's status request times out, so it
    takes the node without a handover; once continued, the old agent finds
    its control socket replaced, lets go and drains. Every connection of the
    loop completes, the ones that waited for the stopped agent included.
    (Which agent finally accepts them depends on the event loop's order; the
    kernel's hand-over of a closed listener's queue is checked
    deterministically by the next test.)
    """
    srv = servers(lab)
    srv.serve("mesh/server", 7081, "queued")
    server_ip = lab.pod_ip("mesh/server")
    clients = Clients(lab)
    old = lab.agent_pid("node2")
    try:
        # Plaintext into the mesh: node2's 15006 listeners, old and new.
        loop = clients.start("default/outsider", "loop", server_ip, 7081, "QUEUED-" + unique_name(),
                             "--seconds", "300", "--timeout", "60", "--interval", "0.01")
        time.sleep(0.5)
        os.kill(old, signal.SIGSTOP)        # the pid the lab recorded for node2's agent
        stopped = time.time()
        try:
            new = lab.upgrade_agent("node2")
            time.sleep(1.0)                 # new connections are spread over both agents' listeners
        finally:
            os.kill(old, signal.SIGCONT)
        held = time.time() - stopped
        wait_for(lambda: old not in lab.previous_agent_pids("node2"), DRAIN + 20,
                 f"the old agent of node2 (pid {old}) to let go and exit")
        time.sleep(0.5)
        summary = clients.finish(loop, timeout=90)
    finally:
        clients.kill()
    assert summary["failures"] == [], summary["failures"][:10]
    # At least one connection sat in the stopped agent's queue for much of
    # the time it was stopped, and still completed end to end.
    assert summary["slowest"] >= held * 0.5, (summary["slowest"], held)
    assert lab.agent_pid("node2") == new


def test_closing_a_pod_listener_moves_its_queue_to_the_other_agents(tmp_path):
    """The listeners _open_listeners makes in a pod's namespace form one
    SO_REUSEPORT group across agents, and a closed one's accept queue moves to
    the others instead of being reset (tcp_migrate_req, set by the same call)."""
    name = unique_name("tmig")
    host_value = open("/proc/sys/net/ipv4/tcp_migrate_req").read()
    subprocess.run(["ip", "netns", "add", name], check=True)
    switcher = NetnsSwitcher()
    fd = -1
    made: list[socket.socket] = []
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        old_out, old_in, old_hb, problem = switcher.run(fd, inpod._open_listeners)
        assert problem is None
        made += [*old_out, old_in, old_hb]
        # A second agent's set opens beside the first (same ports, same namespace).
        new_out, new_in, new_hb, problem = switcher.run(fd, inpod._open_listeners)
        made += [*new_out, new_in, new_hb]
        assert problem is None
        value = switcher.run(fd, lambda: open("/proc/sys/net/ipv4/tcp_migrate_req").read().strip())
        assert value == "1"
        # Set in the pod's namespace only (the netns thread opened it there).
        assert open("/proc/sys/net/ipv4/tcp_migrate_req").read() == host_value
        # Connections that nobody accepts yet: the kernel spreads them over both.
        conns = []
        for i in range(40):
            c = switcher.socket(fd)
            made.append(c)
            c.settimeout(5)
            c.connect(("127.0.0.1", inpod.INBOUND_PORT))
            c.sendall(b"%d" % i)
            conns.append(c)
        time.sleep(0.2)
        old_in.close()                       # the old agent lets go
        new_in.settimeout(2)
        accepted = []
        while len(accepted) < len(conns):
            try:
                accepted.append(new_in.accept()[0])
            except TimeoutError:
                break
        made += accepted
        assert len(accepted) == len(conns)   # all of them, the old listener's too
        for a in accepted:
            a.sendall(b"ok")
        assert all(c.recv(2) == b"ok" for c in conns)
    finally:
        for sock in made:
            sock.close()
        if fd >= 0:
            os.close(fd)
        switcher.close()
        subprocess.run(["ip", "netns", "del", name], check=False)
