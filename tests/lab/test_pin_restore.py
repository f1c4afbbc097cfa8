"""Deleted BPF pins are noticed while the agent runs and pinned again from the
fds it holds, so a restarted agent still finds every pod's capture state
(issue 11, item 7: "deleted map pins go unnoticed until a restart")."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.builders import MESH_CLIENT, MESH_NAMESPACE, manifest, pod
from tests.lab.conftest import connect, running_lab, wait_for

MANIFEST = manifest(MESH_NAMESPACE, MESH_CLIENT, pod("server", "mesh", node="node1", sa="server"))
DELETED = ("pod_config", "inbound_config", "listeners", "prog_sk_lookup")


@pytest.fixture
def lab():
    with running_lab("pin", MANIFEST, agent_args=["--reconcile-seconds", "0.5"]) as lab:
        yield lab


def pinned_id(path: str) -> int:
    kind = "prog" if os.path.basename(path).startswith("prog_") else "map"
    done = subprocess.run(["bpftool", "-j", kind, "show", "pinned", path], capture_output=True, text=True,
                          check=True, timeout=10)
    return json.loads(done.stdout)["id"]


def test_deleted_map_pins_are_pinned_again_from_the_agents_fds(lab, servers):
    srv = servers(lab)
    srv.serve("mesh/server", 7080, "pinned")
    server_ip = lab.pod_ip("mesh/server")
    assert connect(lab, "mesh/client", server_ip, 7080, "before")[0]
    pin_dir = lab.pin_dir("node1")
    ids = {name: pinned_id(f"{pin_dir}/{name}") for name in DELETED}
    log_path = lab.node_dir("node1") / "agent.log"
    offset = log_path.stat().st_size
    for name in DELETED:
        os.unlink(f"{pin_dir}/{name}")
    wait_for(lambda: all(os.path.exists(f"{pin_dir}/{name}") for name in DELETED), 10.0,
             "the agent to pin the deleted objects again")
    assert {name: pinned_id(f"{pin_dir}/{name}") for name in DELETED} == ids    # the same objects
    with open(log_path, "rb") as fh:
        fh.seek(offset)
        logged = fh.read().decode()
    assert logged.count("were deleted from") == 1, logged
    assert connect(lab, "mesh/client", server_ip, 7080, "after")[0]
    # The point of the pins: a restarted agent's loader reuses these maps
    # (with every pod's steering in them) instead of starting empty ones.
    lab.stop_agent("node1")
    lab.start_agent("node1")
    assert {name: pinned_id(f"{pin_dir}/{name}") for name in ("pod_config", "inbound_config", "listeners")} \
        == {name: ids[name] for name in ("pod_config", "inbound_config", "listeners")}
    wait_for(lambda: connect(lab, "mesh/client", server_ip, 7080, "restarted", timeout=3)[0], 20.0,
             "the pods to be served by the restarted agent")
