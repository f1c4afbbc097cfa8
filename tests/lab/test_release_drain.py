"""A released pod's open connections drain (issue 13, item 1).

When the rule stops enrolling a captured pod (here: the pod opts out with
``istio.io/dataplane-mode=none``), its steering goes at once, so new
connections bypass the agent; connections the agent already carries may
finish within ``--drain-seconds`` and are then cut with a reset, never a
FIN that would pass for their end. Before, they ran on unaccounted for,
and a shutdown did not wait for them. Real pods, real eBPF, HBONE between
two node agents.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.builders import MESH_CLIENT, MESH_NAMESPACE, MESH_SERVER, manifest
from tests.lab.conftest import PEER, agent_pod, running_lab, unique_name, wait_for

DRAIN = 2.0
MANIFEST = manifest(MESH_NAMESPACE, MESH_CLIENT, MESH_SERVER)


@pytest.fixture(scope="module")
def lab():
    with running_lab("drn", MANIFEST, agent_args=["--reconcile-seconds", "0.5", "--drain-seconds", str(DRAIN)]) as lab:
        yield lab


def stream_then_release(lab, servers, port: int) -> tuple[subprocess.Popen, float]:
    """A meshed stream from mesh/client to mesh/server:``port``, then the client
    pod opts out; (the stream's process, when the agent released the pod)."""
    servers(lab).serve("mesh/server", port, "drain")
    stream = lab.exec("mesh/client", [sys.executable, PEER, "stream", lab.pod_ip("mesh/server"), str(port),
                                      "DRAIN-" + unique_name()],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert stream.stdout.readline().strip() == "started"
    time.sleep(0.5)
    assert agent_pod(lab, "node1", "mesh/client")["counters"]["outbound"]["active"] == 1
    lab.set_labels("Pod", "mesh", "client", {"istio.io/dataplane-mode": "none"})
    wait_for(lambda: not agent_pod(lab, "node1", "mesh/client")["enrolled"], what="release by the pod's opt-out")
    return stream, time.time()


def cut_at_the_drain_deadline(stream: subprocess.Popen, released: float) -> dict:
    """The stream ends with an error (never a FIN) at the end of the drain window."""
    stream.wait(timeout=DRAIN + 30)
    summary = json.loads(stream.stdout.read().strip().splitlines()[-1])
    assert not summary["ok"] and summary["error"] in ("ECONNRESET", "EPIPE"), summary
    assert released - 1.0 + DRAIN - 0.5 <= summary["at"] <= released + DRAIN + 5.0, (summary, released)
    return summary


def test_a_released_pods_open_connection_drains_then_is_cut(lab, servers):
    stream = None
    try:
        stream, released = stream_then_release(lab, servers, 7090)
        # Within the drain window the stream goes on; at its end it is cut with an error.
        assert cut_at_the_drain_deadline(stream, released)["bytes"] > 0
        assert agent_pod(lab, "node1", "mesh/client")["counters"]["outbound"]["active"] == 0
    finally:
        _stop(stream)
        lab.set_labels("Pod", "mesh", "client", {"istio.io/dataplane-mode": None})
    wait_for(lambda: agent_pod(lab, "node1", "mesh/client")["enrolled"], what="captured again")


def _stop(stream: subprocess.Popen | None) -> None:
    if stream is not None:
        if stream.poll() is None:
            stream.kill()
        stream.wait()


def test_shutdown_waits_for_a_released_pods_drain(lab, servers):
    """SIGTERM while a released pod's connection drains: the agent stays until
    that drain ends (its deadline started at the release), so the stream runs
    its full window instead of dying with the agent; then the agent exits."""
    stream = None
    try:
        stream, released = stream_then_release(lab, servers, 7091)
        lab.stop_agent("node1", signal.SIGTERM, wait=False)
        time.sleep(DRAIN / 2)
        # No captured pod has a connection: only the released pod's drain keeps it.
        assert lab.agent_pid("node1") is not None, "the agent exited without waiting for the released pod's drain"
        cut_at_the_drain_deadline(stream, released)
        wait_for(lambda: lab.agent_pid("node1") is None, timeout=15, what="the agent to exit after the drain")
    finally:
        _stop(stream)
        if lab.agent_pid("node1") is None:
            lab.start_agent("node1")
        lab.set_labels("Pod", "mesh", "client", {"istio.io/dataplane-mode": None})
    wait_for(lambda: agent_pod(lab, "node1", "mesh/client")["enrolled"], timeout=20, what="captured again")
