"""`ambient-agent status` layout."""

from agent.status import render

STATUS = {
    "ok": True, "node": "node1",
    "certificates": [{"identity": "spiffe://cluster.local/ns/mesh/sa/web", "state": "valid",
                      "not_after": 1000 + 5 * 3600 + 7 * 60}],
    "pods": [
        {"namespace": "mesh", "name": "web", "enrolled": True, "identity": "spiffe://cluster.local/ns/mesh/sa/web",
         "counters": {"outbound": {"connections": 3, "active": 1}, "inbound": {"connections": 1, "active": 0},
                      "hbone": {"connections": 2, "active": 1}},
         "connections": [
             {"outcome": "closed", "started": 1},
             {"outcome": "refused: 401 no ALLOW policy matches", "started": 5, "source": "198.18.0.9:4000",
              "source_identity": "spiffe://cluster.local/ns/x/sa/y", "destination": "198.18.0.2:8080"},
             {"outcome": "refused: STRICT mTLS", "started": 6, "source": "198.18.0.7:4001",
              "source_identity": "", "destination": "198.18.0.2:8080"}]},
        {"namespace": "legacy", "name": "old", "enrolled": False, "identity": "", "counters": {}, "connections": []},
    ],
}


def test_table_and_denials():
    text = render(STATUS, now=1000)
    lines = text.splitlines()
    assert lines[0] == "node node1"
    assert lines[1].split() == ["POD", "ENROLLED", "IDENTITY", "CERT", "OPEN", "CONNS", "IN/OUT"]
    assert lines[2].split() == ["mesh/web", "yes", "spiffe://cluster.local/ns/mesh/sa/web", "5h07m", "2", "3/3"]
    assert lines[3].split() == ["legacy/old", "no", "-", "-", "0", "0/0"]
    assert "recent denials:" in lines
    assert lines[-2].endswith("198.18.0.9:4000 (spiffe://cluster.local/ns/x/sa/y) -> 198.18.0.2:8080: "
                              "refused: 401 no ALLOW policy matches")
    assert "(plaintext)" in lines[-1] and "STRICT" in lines[-1]


def test_expired_and_empty():
    expired = dict(STATUS, certificates=[dict(STATUS["certificates"][0], not_after=10)])
    assert "EXPIRED" in render(expired, now=1000)
    assert render({"node": "n", "pods": []}).endswith("recent denials: none")


def test_pods_that_should_be_captured_but_are_not_stand_out():
    text = render(dict(STATUS, not_captured=[{"pod": "mesh/lost", "problem": "no network namespace on "
                                              "this node holds 198.18.1.9"}]), now=1000)
    lines = text.splitlines()
    at = lines.index("MUST BE IN THE MESH BUT NOT CAPTURED:")
    assert lines[at + 1] == "  mesh/lost: no network namespace on this node holds 198.18.1.9"
    assert "NOT CAPTURED" not in render(STATUS, now=1000)


# -- the views are built from a snapshot of the agent (agent/observe/snapshot.py) --------------

def _snapshot(**changes):
    from agent.observe.snapshot import NodeSnapshot, PodSnapshot
    from agent.state.model import ClusterState

    state = ClusterState.from_items([
        {"kind": "Pod", "metadata": {"name": "web", "namespace": "mesh", "uid": "u-1"},
         "spec": {"nodeName": "node1", "serviceAccount": "legacy-sa"},
         "status": {"podIPs": [{"ip": "198.18.0.2"}]}},
        {"kind": "Service", "metadata": {"name": "web", "namespace": "mesh"}, "spec": {"clusterIP": "198.19.0.10"}},
    ], resource_version="7")
    web = STATUS["pods"][0]
    pods = (PodSnapshot("legacy", "old", "u-0", ("198.18.0.3",), "/run/netns/old", 0, False, "not labelled", ""),
            PodSnapshot("mesh", "web", "u-1", ("198.18.0.2",), "/run/netns/web", 4097, True, "labelled",
                        web["identity"], web["counters"], tuple(web["connections"])))
    lost = {"mesh/lost": "no network namespace on this node holds 198.18.1.9"}
    values = {"node": "node1", "pid": 42, "handover": None, "state_url": "file:/tmp/state.json", "state": state,
              "synced": True, "sync_status": None, "pods": pods, "problems": lost, "pin_dir": "/sys/fs/bpf/x",
              "cgroup": "/sys/fs/cgroup/unified", "bpf_attached": True, "netns_captured": (4097,),
              "capture_counters": {"connect4": 3}, "hbone_connections": 1, "hbone_opened": 2,
              "certificates": tuple(STATUS["certificates"]), "trust_bundle": {"roots": 1},
              "policy_rejections": ("AuthorizationPolicy mesh/x: bad",), "policy_reports": ()}
    return NodeSnapshot(**{**values, **changes})


def test_status_from_a_snapshot_renders_like_the_agent_answer():
    status = _snapshot().status()
    assert status["ok"] and status["pid"] == 42 and "handover" not in status
    assert status["state_version"] == "7" and status["capture"] == {"connect4": 3}
    assert status["hbone_pool"] == {"connections": 1, "opened": 2}
    assert [p["name"] for p in status["pods"]] == ["old", "web"]
    assert status["pods"][1]["netns"] == "/run/netns/web" and status["pods"][1]["uid"] == "u-1"
    lines = render(status, now=1000).splitlines()
    assert lines[2].split() == ["legacy/old", "no", "-", "-", "0", "0/0"]
    assert lines[3].split() == ["mesh/web", "yes", "spiffe://cluster.local/ns/mesh/sa/web", "5h07m", "2", "3/3"]
    assert "  mesh/lost: no network namespace on this node holds 198.18.1.9" in lines
    assert _snapshot(handover="handing the node over to the agent with pid 7").status()["handover"].endswith("pid 7")


def test_config_dump_from_a_snapshot():
    dump = _snapshot().config_dump()
    assert dump["state_source"] == {"url": "file:/tmp/state.json", "version": "7", "synced": True}
    # The typed model's service account: serviceAccountName, else the deprecated serviceAccount.
    assert dump["workloads"] == [{"namespace": "mesh", "name": "web", "node": "node1", "ips": ["198.18.0.2"],
                                  "service_account": "legacy-sa"}]
    assert dump["services"] == [{"namespace": "mesh", "name": "web", "cluster_ip": "198.19.0.10"}]
    assert dump["enrolled"][1] == {"pod": "mesh/web", "netns": "/run/netns/web", "netns_cookie": 4097,
                                   "ips": ["198.18.0.2"], "enrolled": True}
    assert dump["not_captured"] == {"mesh/lost": "no network namespace on this node holds 198.18.1.9"}
    assert dump["policies"] == {"rejected": ["AuthorizationPolicy mesh/x: bad"], "reports": []}
    assert dump["bpf"]["netns_captured"] == [4097] and dump["bpf"]["counters"] == {"connect4": 3}
    detached = _snapshot(bpf_attached=False, sync_status={"pods": "synced"}).config_dump()
    assert detached["bpf"]["netns_captured"] == [] and detached["bpf"]["counters"] == {}
    assert detached["state_source"]["sync"] == {"pods": "synced"}
