"""Repeated and hostile CNI ADDs never black-hole a pod or let it out of the mesh (issue 11).

Item 1: a second ADD for a captured pod (the same namespace under another
path, a new uid, a new sandbox) used to close the pod's listeners and open
new ones in one event-loop turn; the new sockets reused the old fd numbers
and the old accept loops' cancellation then unregistered them from epoll, so
every connection hung while `status` said enrolled. Item 3: the agent
released the capture before it looked at the new path, and took a FIFO, a
regular file or the node's own namespace for a pod's.

Real pods, real CNI chain, real eBPF, HBONE between two node agents, and
STRICT PeerAuthentication in the mesh namespace, so that a connection that
succeeds between meshed pods went through both agents, and plaintext from
outside is refused by the destination's agent only while it is captured.
The node reconciler's periodic run is pushed out of the way (1 h): nothing
may heal behind the tests' back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from lab import sysops
from lab.lab import Lab
from tests.builders import MESH_CLIENT, MESH_NAMESPACE, MESH_SERVER, manifest, namespace, pod, strict_mtls
from tests.lab.conftest import PEER, agent_pod, connect, counters, running_lab, wait_for

MANIFEST = manifest(
    MESH_NAMESPACE, namespace("plain"), MESH_CLIENT,
    pod("mover", "mesh", node="node1", sa="mover"),
    MESH_SERVER,
    pod("outsider", "plain", node="node1"),
    strict_mtls("mesh"),
)

NODE = {"mesh/client": "node1", "mesh/mover": "node1", "mesh/server": "node2", "plain/outsider": "node1"}


@pytest.fixture(scope="module")
def lab():
    with running_lab("cadd", MANIFEST, agent_args=["--reconcile-seconds", "3600"]) as lab:
        yield lab


def _record(lab: Lab, pod: str) -> dict:
    """The agent's record of the pod (what a restart would re-adopt)."""
    for path in lab.node_dir(NODE[pod]).joinpath("pods").glob("*.json"):
        data = json.loads(path.read_text())
        if f"{data['namespace']}/{data['name']}" == pod:
            return data
    raise AssertionError(f"no record for {pod}")


def _cni_add(lab: Lab, pod: str, timeout: float = 10.0, **fields) -> dict:
    """A CNI ADD as the plugin sends it, for the pod's current sandbox unless ``fields`` say otherwise."""
    rec = _record(lab, pod)
    request = {"op": "cni-add", "namespace": rec["namespace"], "name": rec["name"], "uid": rec["uid"],
               "container_id": rec["container_id"], "netns": rec["netns"], "interface": "eth0",
               "ips": rec["ips"], "gateways": rec["gateways"]}
    request.update(fields)
    return lab.agent_request(NODE[pod], request, timeout=timeout)


def _hbone_streams(lab: Lab, pod: str, port: int) -> int:
    """Connections to ``pod``:``port`` its agent took over HBONE (one CONNECT stream each)."""
    return sum(1 for r in agent_pod(lab, NODE[pod], pod)["connections"]
               if r["direction"] == "hbone" and r["protocol"] == "HBONE"
               and r["destination"].endswith(f":{port}"))


def _meshed(lab: Lab, source: str, dest: str, port: int, banner: str) -> None:
    """A connection ``source`` -> ``dest`` succeeds, leaving through ``source``'s agent
    and arriving through ``dest``'s over HBONE.

    Under STRICT only HBONE gets through: success means both pods are captured
    and both agents accept on their listeners (a black-holed pod hangs).
    """
    sent = counters(lab, NODE[source], source, "outbound")["connections"]
    streams = _hbone_streams(lab, dest, port)
    ok, got = connect(lab, source, lab.pod_ip(dest), port, "through-the-mesh")
    assert ok and got.startswith(banner + " "), f"{source} -> {dest}: {got}"
    assert counters(lab, NODE[source], source, "outbound")["connections"] == sent + 1
    wait_for(lambda: _hbone_streams(lab, dest, port) == streams + 1, timeout=5,
             what=f"{dest}'s agent to record the HBONE connection")


def _plaintext_refused(lab: Lab, dest: str, port: int) -> None:
    """Plaintext from outside the mesh reaches ``dest``'s agent, which refuses it (STRICT)."""
    before = counters(lab, NODE[dest], dest, "inbound")["connections"]
    ok, got = connect(lab, "plain/outsider", lab.pod_ip(dest), port, "plaintext", timeout=3)
    assert not ok, f"plaintext reached STRICT pod {dest}: {got}"
    wait_for(lambda: counters(lab, NODE[dest], dest, "inbound")["connections"] == before + 1,
             timeout=5, what=f"{dest}'s agent to take (and refuse) the plaintext connection")
    last = [r for r in agent_pod(lab, NODE[dest], dest)["connections"] if r["protocol"] == "TCP"][-1]
    assert last["outcome"].startswith("refused") and "STRICT" in last["outcome"], last


# -- item 1: a repeated ADD keeps or moves the capture, never black-holes it ---------------

def test_a_re_add_of_the_same_namespace_under_another_path_keeps_the_pod_working(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7070, "server")
    srv.serve("mesh/client", 7070, "client")
    rec = _record(lab, "mesh/client")
    name = os.path.basename(rec["netns"])
    # /var/run is a link to /run: one namespace, two names. Back and forth,
    # since one fd-reusing replacement is enough to black-hole the pod.
    for path in (f"/var/run/netns/{name}", f"/run/netns/{name}", f"/var/run/netns/{name}"):
        reply = _cni_add(lab, "mesh/client", netns=path)
        assert reply["ok"] is True and reply["enrolled"] is True, reply
        now = _record(lab, "mesh/client")
        assert now["netns"] == path
        assert now["netns_cookie"] == rec["netns_cookie"], "the capture was replaced, not kept"
        assert agent_pod(lab, "node1", "mesh/client")["enrolled"] is True
        _meshed(lab, "mesh/client", "mesh/server", 7070, "server")    # out of the pod
        _meshed(lab, "mesh/server", "mesh/client", 7070, "client")    # into the pod


def test_a_re_add_with_a_new_uid_keeps_the_pod_working(lab, servers):
    """A new pod object of the same name in the same sandbox, with no DEL between."""
    srv = servers(lab)
    srv.serve("mesh/server", 7071, "server")
    srv.serve("mesh/client", 7071, "client")
    before = _record(lab, "mesh/client")
    new_uid = str(uuid.uuid4())
    container = "readd-" + uuid.uuid4().hex[:12]

    def new_pod_object(items: list[dict]) -> None:
        for obj in items:
            meta = obj.get("metadata", {})
            if obj.get("kind") == "Pod" and (meta.get("namespace"), meta.get("name")) == ("mesh", "client"):
                meta["uid"] = new_uid

    lab._update_state(new_pod_object)    # the API server's side of "deleted and created again"
    reply = _cni_add(lab, "mesh/client", uid=new_uid, container_id=container)
    assert reply["ok"] is True and reply["enrolled"] is True, reply
    now = _record(lab, "mesh/client")
    assert (now["uid"], now["container_id"]) == (new_uid, container)   # this ADD's record is in effect
    assert now["netns_cookie"] == before["netns_cookie"]
    assert agent_pod(lab, "node1", "mesh/client")["uid"] == new_uid
    _meshed(lab, "mesh/client", "mesh/server", 7071, "server")
    _meshed(lab, "mesh/server", "mesh/client", 7071, "client")


def _popen_in(netns: str, cgroup: str, argv: list[str], **kwargs) -> subprocess.Popen:
    """A process in ``netns`` and ``cgroup`` (the pod's, so that lab down reaps it)."""
    fd = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return subprocess.Popen(argv, preexec_fn=sysops.child_setup(fd, cgroup), **kwargs)
    finally:
        os.close(fd)


def _connect_from(netns: str, cgroup: str, host: str, port: int, message: str) -> tuple[bool, str]:
    with _popen_in(netns, cgroup, [sys.executable, PEER, "connect", host, str(port), message,
                                   "--timeout", "5"],
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    lines = out.splitlines()
    if proc.returncode != 0:
        return False, lines[0] if lines else err.strip()
    return True, lines[0]


def _move_eth0(source: str, target: str, address: tuple[str, int, str] | None = None) -> tuple[str, int, str]:
    """Move the pod's interface between namespaces (a new sandbox for the same pod).

    Returns (ip, prefix length, gateway) read in ``source``; a move drops
    addresses and routes, so they are put back in ``target``.
    """
    from pyroute2 import IPRoute

    with IPRoute(netns=source) as ipr:
        (index,) = ipr.link_lookup(ifname="eth0")
        if address is None:
            (addr,) = ipr.get_addr(family=2, index=index)
            (default,) = ipr.get_default_routes(family=2)
            address = (addr.get_attr("IFA_ADDRESS"), addr["prefixlen"], default.get_attr("RTA_GATEWAY"))
        ipr.link("set", index=index, net_ns_fd=target)
    ip, prefixlen, gateway = address
    with IPRoute(netns=target) as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        (index,) = ipr.link_lookup(ifname="eth0")
        ipr.addr("add", index=index, address=ip, prefixlen=prefixlen)
        ipr.link("set", index=index, state="up")
        ipr.route("replace", dst="default", gateway=gateway, oif=index)
    return address


def test_a_re_add_in_a_new_namespace_moves_the_capture(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7072, "server")
    pod = "mesh/mover"
    old = _record(lab, pod)
    old_name = os.path.basename(old["netns"])
    new_name = f"alab-{lab.name}-moved"
    new_path = sysops.create_netns(new_name)
    cgroup = lab.pod_cgroup(pod)
    address = None        # the pod's address while its interface is in the new namespace
    server = None
    try:
        address = _move_eth0(old_name, new_name)
        reply = _cni_add(lab, pod, netns=new_path)
        assert reply["ok"] is True and reply["enrolled"] is True, reply
        now = _record(lab, pod)
        assert now["netns"] == new_path and now["netns_cookie"] != old["netns_cookie"]
        pins = os.listdir(lab.pin_dir("node1"))
        assert f"link_{now['netns_cookie']}" in pins and f"link_{old['netns_cookie']}" not in pins

        # Into the pod's new namespace over HBONE, and out of it through the mesh.
        server = _popen_in(new_path, cgroup, [sys.executable, PEER, "serve", "7072", "moved"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.stdout.readline().strip() == "ready"
        _meshed(lab, "mesh/client", pod, 7072, "moved")
        before = counters(lab, "node1", pod, "outbound")["connections"]
        ok, got = _connect_from(new_path, cgroup, lab.pod_ip("mesh/server"), 7072, "from-the-new-sandbox")
        assert ok and got.startswith("server "), got
        assert counters(lab, "node1", pod, "outbound")["connections"] == before + 1

        # The old namespace's listeners are closed: nobody accepts there any more.
        ok, got = connect(lab, pod, "127.0.0.1", 15008, "x", timeout=3)
        assert not ok and "ECONNREFUSED" in got, got

        # And back to the sandbox the lab made (so that it tears the pod down as
        # it made it): a second move, as good as the first.
        _move_eth0(new_name, old_name, address)
        address = None
        reply = _cni_add(lab, pod, netns=old["netns"])
        assert reply["ok"] is True and reply["enrolled"] is True, reply
        assert _record(lab, pod)["netns"] == old["netns"]
        srv.serve(pod, 7074, "back")
        srv.serve("mesh/client", 7075, "client")
        # Peers whose agents hold no pooled HBONE connection made while the
        # pod was in the other namespace: the pool (agent/proxy/tunnel.py) is
        # keyed by identities, not by the namespace a connection was dialled
        # from, so such a connection outlives the move it predates.
        _meshed(lab, "mesh/server", pod, 7074, "back")
        _meshed(lab, pod, "mesh/client", 7075, "client")
    finally:
        if server is not None:
            server.kill()
            server.wait()
        try:
            if address is not None:       # a failure left the interface in the new namespace
                _move_eth0(new_name, old_name, address)
                _cni_add(lab, pod, netns=old["netns"])
        finally:
            sysops.remove_netns(new_name)


# -- item 3: a CNI ADD whose netns is no pod's namespace changes nothing ---------------

def _bad_paths(lab: Lab, scratch: str) -> list[tuple[str, str]]:
    missing = os.path.join(scratch, "no-such-netns")
    regular = os.path.join(scratch, "hostname")
    with open(regular, "w") as f:
        f.write("node2\n")
    fifo = os.path.join(scratch, "fifo")
    os.mkfifo(fifo)
    paths = [
        (missing, "cannot open: No such file or directory"),
        (regular, "not a network namespace but a regular file"),
        (fifo, "not a network namespace but a FIFO"),
        ("/proc/self/ns/uts", "not a network namespace but a uts namespace"),
        # The node's own network: where node2's agent runs, under two names.
        (lab.node_netns("node2"), "the agent's own network namespace"),
        (f"/proc/{lab.agent_pid('node2')}/ns/net", "the agent's own network namespace"),
        # pid 1's: refused as the host's, or unreadable to the agent; never captured.
        ("/proc/1/ns/net", ""),
    ]
    own, kthreadd = os.stat("/proc/self/ns/net"), os.stat("/proc/2/ns/net")
    if (own.st_dev, own.st_ino) == (kthreadd.st_dev, kthreadd.st_ino):
        # This test runs in the machine's initial namespace, kernel threads' own.
        paths.append((f"/proc/{os.getpid()}/ns/net", "the node's host network namespace"))
    return paths


def test_a_cni_add_whose_netns_is_no_pods_network_namespace_changes_nothing(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7073, "server")
    pod = "mesh/server"
    before = _record(lab, pod)
    _meshed(lab, "mesh/client", pod, 7073, "server")
    with tempfile.TemporaryDirectory(prefix=f"{lab.name}-") as scratch:
        for path, reason in _bad_paths(lab, scratch):
            started = time.monotonic()
            # A FIFO must be refused at once: an open that waits for a writer
            # would stall the agent's event loop (data path, control socket).
            reply = _cni_add(lab, pod, netns=path, timeout=5.0)
            assert time.monotonic() - started < 5.0
            assert reply["ok"] is False, (path, reply)
            # Nothing changed: the capture itself, the enrolment, the record.
            _plaintext_refused(lab, pod, 7073)
            _meshed(lab, "mesh/client", pod, 7073, "server")
            status = agent_pod(lab, "node2", pod)
            assert status["enrolled"] is True and status["netns"] == before["netns"]
            assert _record(lab, pod) == before
            # And the answer says why.
            assert reply["error"].startswith(f"pod {pod}: network namespace {path}: "), reply
            assert reason in reply["error"], reply
