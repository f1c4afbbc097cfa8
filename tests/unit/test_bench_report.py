"""bench/report.py: summaries, rows, targets and profile parsing (pure)."""

import pytest

from bench import report


@pytest.mark.parametrize("values, median, lo, hi", [
    ([3.0, 1.0, 2.0], 2.0, 1.0, 3.0),
    ([1.0, None, 4.0], 2.5, 1.0, 4.0),
    ([5.0], 5.0, 5.0, 5.0),
])
def test_summary_is_median_with_min_max(values, median, lo, hi):
    s = report.summary(values)
    assert (s["median"], s["min"], s["max"]) == (median, lo, hi)


def test_summary_of_nothing_is_empty_not_zero():
    assert report.summary([None])["median"] is None


def test_row_ratio_and_added_are_of_medians():
    r = report.row("p99", "ms", {"mesh": [3.0, 5.0, 4.0], "baseline": [1.0, 2.0, 3.0]}, added=("mesh", "baseline"))
    assert r["ratios"]["mesh/baseline"] == 2.0
    assert r["added"] == {"of": "mesh-baseline", "value": 2.0}


@pytest.mark.parametrize("measured, goal, higher, met", [
    (0.1, 0.2, False, True), (0.3, 0.2, False, False), (60, 50, True, True), (None, 1, True, None)])
def test_target_met(measured, goal, higher, met):
    assert report.target("t", measured, goal, "x", higher)["met"] is met


def test_collapsed_top_counts_self_and_total():
    lines = ["main;loop;read 30", "main;loop;write 10", "main;loop 60", "garbage", "worker;wait 500"]
    top = report.collapsed_top(lines, thread_marker="main")
    assert top["samples"] == 100
    by = {f["function"]: f for f in top["top"]}
    assert by["loop"]["self_pct"] == 60.0 and by["loop"]["total_pct"] == 100.0
    assert by["read"]["self_pct"] == 30.0


def test_markdown_has_machine_targets_and_tables():
    results = {"mode": "short", "meta": {"date": "d", "kernel": "k"},
               "targets": [report.target("cni p99", 80.0, 100, "ms", False)],
               "scenarios": {"1_bulk": {"title": "bulk", "rows": [
                   report.row("1 stream", "MB/s", {"baseline": [10.0, 12.0], "mesh": [5.0, 6.0]})]}}}
    md = report.markdown(results)
    assert "| kernel | k |" in md
    assert "| cni p99 | 80.0 / <= 100 ms | yes |" in md
    assert "| 1 stream | MB/s | 11.0 [10.0–12.0] | 5.50 [5.00–6.00] | 0.500× |" in md
