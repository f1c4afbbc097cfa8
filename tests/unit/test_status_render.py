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
