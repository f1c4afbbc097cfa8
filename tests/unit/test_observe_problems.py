"""Per-connection problems are logged once per distinct problem per interval;
the access log keeps one line per connection (issue 11, item 7)."""

from __future__ import annotations

import logging

from agent.observe.problems import ProblemLog, problem_key
from agent.proxy.counters import ConnectionLog, PodCounters
from agent.proxy.forward import DataPlane
from agent.proxy.result import ConnectionResult
from agent.proxy.tunnel import HbonePool
from agent.state.model import ClusterState


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(caplog, name="problems"):
    return [r.getMessage() for r in caplog.records if r.name == name]


def test_one_line_per_distinct_problem_per_interval(caplog):
    clock = Clock()
    problems = ProblemLog(logging.getLogger("problems"), interval=60.0, clock=clock)
    with caplog.at_level(logging.INFO):
        for port in range(1000):
            problems.report(logging.INFO, ("p", "refused"), "refused from port %d", port)
            problems.report(logging.INFO, ("p", "failed"), "failed from port %d", port)
        assert lines(caplog) == ["refused from port 0", "failed from port 0"]
        assert problems.suppressed == 1998
        clock.now += 61
        problems.report(logging.INFO, ("p", "refused"), "refused from port %d", 5000)
    # After the interval the next occurrence says how many were not logged,
    # and a problem that stopped gets its count (and last message) logged too.
    assert lines(caplog)[2:] == [
        "refused from port 5000 (999 more like this in the last 60s not logged)",
        "failed from port 999 (the last of 999 like this in 60s not logged)",
    ]


def test_a_repeat_after_the_interval_says_how_many_were_not_logged(caplog):
    clock = Clock()
    problems = ProblemLog(logging.getLogger("problems"), interval=60.0, clock=clock)
    with caplog.at_level(logging.INFO):
        problems.report(logging.INFO, ("a",), "a %d", 1)
        clock.now += 30
        problems.report(logging.INFO, ("b",), "b")            # sweeps at 30 s: nothing expired
        problems.report(logging.INFO, ("a",), "a %d", 2)
        clock.now += 31
        problems.report(logging.INFO, ("a",), "a %d", 3)
        clock.now += 60
        problems.report(logging.INFO, ("a",), "a %d", 4)
    assert lines(caplog) == ["a 1", "b", "a 3 (1 more like this in the last 60s not logged)", "a 4"]


def test_peer_chosen_keys_are_bounded():
    clock = Clock()
    logger = logging.getLogger("problems.bounded")
    logger.setLevel(logging.INFO)
    problems = ProblemLog(logger, interval=60.0, max_keys=10, clock=clock)
    logged = sum(problems.report(logging.INFO, ("p", f"bad authority {name}"), "x")
                 for name in (f"host-{chr(97 + i % 26)}{chr(97 + i // 26 % 26)}" for i in range(600)))
    assert logged == 11          # ten keys, then one shared line for all the others


def test_problem_key_folds_addresses_and_ports():
    assert (problem_key("hbone", "refused: 400 bad authority '198.18.0.7:81'")
            == problem_key("hbone", "refused: 400 bad authority '198.18.3.9:8080'"))
    assert problem_key("a", "x" * 1000) == ("a", "x" * 120)


def test_nothing_is_counted_when_the_level_is_off(caplog):
    problems = ProblemLog(logging.getLogger("problems.off"))
    logging.getLogger("problems.off").setLevel(logging.WARNING)
    assert not problems.report(logging.INFO, ("k",), "quiet")
    assert problems.suppressed == 0


def test_a_refused_connection_per_port_is_one_log_line_and_one_access_record_each(caplog):
    """What a slowloris or a scan makes the agent write at the default level."""
    records: list = []
    plane = DataPlane(state=lambda: ClusterState.from_items([]), trust_domain="cluster.local", tls=None,
                      pool=HbonePool(), log=ConnectionLog(), access=records.append)
    counters = PodCounters()

    def result(direction, protocol, which, src, dst):
        return ConnectionResult(plane, "mesh/server", direction, protocol, which, src, dst)

    with caplog.at_level(logging.INFO):
        for port in range(1000):
            result("hbone", "HBONE", counters.hbone, ("198.18.0.5", 30000 + port),
                   ("198.18.0.9", 15008)).refuse("no TLS ClientHello within 5s")
            result("inbound", "TCP", counters.inbound, ("198.18.0.5", 40000 + port),
                   ("198.18.0.9", 7080)).refuse(f"198.18.0.{port % 250}:{port} is not allowed by STRICT mTLS")
            result("outbound", "TCP", counters.outbound, ("198.18.0.9", 50000 + port),
                   ("198.18.0.5", 80))._finish("closed")
    assert len(records) == 3000                                        # the access log: every one
    logged = lines(caplog, "agent.proxy.forward")
    assert len(logged) == 2, logged                                    # this log: each problem once
    assert "refused: no TLS ClientHello within 5s" in logged[0]
    assert "is not allowed by STRICT mTLS" in logged[1]
    assert (counters.hbone.connections, counters.hbone.failed) == (1000, 1000)   # one result, one count
    assert (counters.outbound.connections, counters.outbound.failed) == (1000, 0)
