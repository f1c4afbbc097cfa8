"""bench/soak.py's pure parts: slopes after the warm-up, the verdict, the report."""

from dataclasses import asdict

import pytest

from bench.soak import Sample, markdown, slope, slopes, verdict

LIMITS = {"rss_kb_per_min": 64.0, "fds_per_min": 1.0, "log_kb_per_min": 4.0}


def series(rss_per_min: float, warm: float = 0.0, minutes: int = 30) -> list[Sample]:
    """Samples every 10 s; RSS climbs 2 MiB/min during ``warm`` minutes, then ``rss_per_min``."""
    out = []
    for i in range(minutes * 6 + 1):
        m = i / 6
        rss = 50_000 + 2048 * min(m, warm) + rss_per_min * max(0.0, m - warm)
        out.append(Sample(m, int(rss), 40 + i % 3, m * 20, m * 4000, 0.5, m * 4000 - 0.5))
    return out


def test_slope_is_least_squares_per_minute():
    assert slope([(0, 1), (1, 3), (2, 5)]) == pytest.approx(2.0)
    assert slope([(0, 1)]) is None and slope([(1, 1), (1, 2)]) is None


def test_the_warm_up_is_left_out():
    samples = series(rss_per_min=0.0, warm=6.0)
    assert slopes(samples, 0.0)["rss_kb"] > 100           # the warm-up dominates ...
    assert abs(slopes(samples, 10.0)["rss_kb"]) < 1.0     # ... and is left out
    assert abs(slopes(samples, 10.0)["fds"]) < 0.05


def result(rss_per_min: float, churn_errors=0, stream_errors=0) -> dict:
    samples = series(rss_per_min, warm=6.0)
    return {"slopes": {"node1": slopes(samples, 10.0), "node2": slopes(samples, 10.0)},
            "samples": {"node1": [asdict(s) for s in samples], "node2": [asdict(s) for s in samples]},
            "load": {"churn": {"connections": 360000, "seconds": 1800, "rate": 200.0, "errors": churn_errors,
                               "late": 0, "exchange": {"p50": 2.0, "p99": 9.0}},
                     "stream": {"requests": 36000, "seconds": 1800, "errors": stream_errors,
                                "p50": 1.0, "p99": 5.0}},
            "limits": LIMITS,
            "meta": {"minutes": 30, "warmup_minutes": 10, "rate": 200, "concurrency": 32, "stream_rate": 20,
                     "sample_seconds": 10, "lab": "b000000", "date": "today", "machine": "test",
                     "agent_args": "(none)"}}


def test_flat_only_without_growth_and_errors():
    assert verdict(result(0.0), LIMITS) == []
    assert verdict(result(200.0), LIMITS) == ["node1: RSS grows 200.0 KiB/min (limit 64)",
                                              "node2: RSS grows 200.0 KiB/min (limit 64)"]
    assert verdict(result(0.0, churn_errors=3), LIMITS) == ["connection churn: 3 errors"]
    assert verdict(result(0.0, stream_errors=1), LIMITS) == ["long-lived stream: 1 errors, 36000 requests"]


def test_the_report_states_the_verdict_and_every_slope():
    r = result(0.0)
    r["problems"] = verdict(r, LIMITS)
    text = markdown(r)
    assert "**Verdict: flat.**" in text
    assert text.count("| node1 |") == 2 and "4000.0" in text     # the access log's slope is shown apart
