"""The hostile-peer suite: attacks on a running lab, with bounds from /proc.

One two-node lab for the whole suite, with the CA, STRICT PeerAuthentication
and an ALLOW policy in namespace ``mesh``:

* ``mesh/server`` (node2) runs ``app.py`` on 7080; only ``mesh/client``'s
  identity may reach it (AuthorizationPolicy), only over mTLS (STRICT);
* ``open/web`` (node2) is meshed without STRICT: plaintext reaches it
  through the agent's 15006;
* ``mesh/client`` (node1) is the legitimate meshed client, and
  ``default/outsider`` (node1, outside the mesh) is where attacks come
  from: sockets the test makes inside its network namespace.

Every attack is bounded (counts, seconds), and every test ends by checking
that the agent still serves a legitimate meshed connection. The attacked
agent is node2's; its memory (VmRSS), fd count, CPU time and log are read
from /proc and its log file around each attack.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.netns import NetnsSwitcher
from tests.builders import (AMBIENT, MESH_CLIENT, MESH_NAMESPACE, allow_from, manifest, namespace, pod,
                            strict_mtls)
from tests.hostile.h2peer import RawH2, client_context
from tests.interop.certs import CertFiles, TestPKI
from tests.lab.conftest import connect, running_lab, wait_for

HERE = Path(__file__).parent
APP = str(HERE / "app.py")
APP_PORT = 7080
OPEN_PORT = 7090
# What the agent may keep after the whole suite (peaks of 1,000 connections
# at a few KB each leave the allocator's arenas larger; not per connection).
SUITE_RSS_GROWTH_KB = 32 * 1024
CLIENT_ID = "spiffe://cluster.local/ns/mesh/sa/client"
SERVER_ID = "spiffe://cluster.local/ns/mesh/sa/server"

MANIFEST = manifest(
    MESH_NAMESPACE, namespace("open", AMBIENT), MESH_CLIENT,
    pod("server", "mesh", node="node2", sa="server", labels={"app": "server"}),
    pod("web", "open", node="node2", sa="web"),
    pod("outsider", "default", node="node1"),
    strict_mtls("mesh"),
    allow_from("server-allow-client", "mesh", app="server", principal="cluster.local/ns/mesh/sa/client",
               port="7080"),
)


# -- the attacked agent, seen from /proc -------------------------------------------------

@dataclass
class Sample:
    rss_kb: int
    fds: int
    cpu_s: float
    log_bytes: int


class AgentProbe:
    """node2's agent: memory, fds, CPU and log, read from /proc and its log file."""

    def __init__(self, lab, node: str) -> None:
        self.lab = lab
        self.node = node
        self.log_path = lab.node_dir(node) / "agent.log"

    @property
    def pid(self) -> int:
        pid = self.lab.agent_pid(self.node)
        assert pid, f"the agent of {self.node} is not running"
        return pid

    def sample(self) -> Sample:
        pid = self.pid
        rss = 0
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return Sample(rss, len(os.listdir(f"/proc/{pid}/fd")), cpu, self.log_path.stat().st_size)

    def log_since(self, before: Sample) -> list[str]:
        with open(self.log_path, "rb") as fh:
            fh.seek(before.log_bytes)
            return fh.read().decode("utf-8", "replace").splitlines()

    @staticmethod
    def split(lines: list[str]) -> tuple[list[str], list[str]]:
        """(access log lines, every other line) of ``log_since``."""
        access = [line for line in lines if " INFO access: " in line]
        return access, [line for line in lines if " INFO access: " not in line]

    def wait_fds(self, at_most: int, timeout: float = 15.0) -> None:
        fds = [0]

        def low() -> bool:
            fds[0] = self.sample().fds
            return fds[0] <= at_most
        try:
            wait_for(low, timeout, "the agent's fds to fall")
        except AssertionError:
            raise AssertionError(f"the agent holds {fds[0]} fds after {timeout:g}s, expected at most "
                                 f"{at_most}") from None


# -- the lab -------------------------------------------------------------------------------

class HostileLab:
    def __init__(self, lab, tmp: Path) -> None:
        self.lab = lab
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.server_ip = lab.pod_ip("mesh/server")
        self.web_ip = lab.pod_ip("open/web")
        self.outsider_ip = lab.pod_ip("default/outsider")
        self.agent = AgentProbe(lab, "node2")
        self.app_count = tmp / "app-accepts"
        self.open_count = tmp / "open-accepts"
        self._switcher = NetnsSwitcher()
        self._outsider_fd = os.open(lab.pod_netns("default/outsider"), os.O_RDONLY | os.O_CLOEXEC)
        # Certificates signed by the lab's own CA (the test plays a CA
        # compromise it does not need: only the certificate's contents vary).
        self.pki = TestPKI.with_ca(tmp / "pki", lab.ca_dir / "ca-cert.pem", lab.ca_dir / "ca-key.pem")
        self.client = self.pki.issue("mesh", "client")

    def start_apps(self) -> None:
        self._app("mesh/server", APP_PORT, self.app_count)
        self._app("open/web", OPEN_PORT, self.open_count)

    def _app(self, pod: str, port: int, count: Path) -> None:
        proc = self.lab.exec(pod, [sys.executable, APP, "serve", str(port), str(count)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        line = proc.stdout.readline().strip()
        assert line == "ready", f"app in {pod} did not start: {line} {proc.stderr.read()}"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        self._switcher.close()
        os.close(self._outsider_fd)

    # -- attackers' sockets, inside default/outsider's network namespace ----------------

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        return self._switcher.socket(self._outsider_fd, family)

    def dial(self, ip: str, port: int, timeout: float = 5.0) -> socket.socket:
        sock = self.socket()
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def h2(self, certs: CertFiles | None = None, **tls) -> RawH2:
        """An HTTP/2 connection to mesh/server's 15008, by default as mesh/client."""
        certs = certs or self.client
        ctx = client_context(certs.chain_path, certs.key_path, self.lab.ca_root, **tls)
        sock = self.dial(self.server_ip, 15008)
        return RawH2(ctx.wrap_socket(sock))

    # -- what the application saw, and the legitimate path -----------------------------

    def app_accepts(self) -> int:
        return self.app_count.stat().st_size if self.app_count.exists() else 0

    def assert_mesh_serves(self, what: str = "") -> None:
        """A legitimate meshed connection still works: mesh/client -> mesh/server over HBONE."""
        before = self.app_accepts()
        ok, banner = connect(self.lab, "mesh/client", self.server_ip, APP_PORT, "still-serving", timeout=10)
        assert ok, f"after {what or 'the attack'}: a legitimate meshed connection failed: {banner}"
        assert banner.startswith("app "), banner
        assert self.app_accepts() == before + 1


@pytest.fixture(scope="session")
def hostile(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("hostile tests need root (they run a pod lab)")
    with running_lab("hs", MANIFEST) as lab:
        h = HostileLab(lab, tmp_path_factory.mktemp("hostile"))
        try:
            h.start_apps()
            h.assert_mesh_serves("start-up")
            start = h.agent.sample()
            yield h
            # The whole suite's bounds: after every attack the agent is back
            # to (nearly) the fds it started with, and its memory grew by no
            # more than the allocator keeps of the peaks (1,000 connections).
            h.agent.wait_fds(start.fds + 5)
            end = h.agent.sample()
            print(f"\nhostile suite: node2 agent RSS {start.rss_kb // 1024} -> {end.rss_kb // 1024} MiB, "
                  f"fds {start.fds} -> {end.fds}, CPU {end.cpu_s - start.cpu_s:.1f} s, "
                  f"log +{(end.log_bytes - start.log_bytes) // 1024} KiB")
            if os.environ.get("HOSTILE_DUMP_LOG"):
                print("\n".join(h.agent.split(h.agent.log_since(start))[1]))
            assert end.rss_kb - start.rss_kb < SUITE_RSS_GROWTH_KB, (start, end)
        finally:
            h.close()


@pytest.fixture
def probe(hostile):
    """The attacked agent before the test; after it, it must still serve the mesh."""
    before = hostile.agent.sample()
    yield before
    hostile.assert_mesh_serves()


@contextlib.contextmanager
def many(items):
    """Close every socket of ``items`` on the way out, whatever happened."""
    try:
        yield items
    finally:
        for sock in items:
            with contextlib.suppress(OSError):
                sock.close()
