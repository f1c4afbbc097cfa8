"""Summaries, comparison rows, targets and the markdown report (pure, no I/O)."""

from __future__ import annotations

import statistics
from typing import Iterable, Mapping, Sequence


def summary(values: Iterable[float | None]) -> dict:
    """Median of several runs with its spread (min/max) and the runs themselves."""
    runs = [float(v) for v in values if v is not None]
    if not runs:
        return {"median": None, "min": None, "max": None, "n": 0, "runs": []}
    return {"median": statistics.median(runs), "min": min(runs), "max": max(runs),
            "n": len(runs), "runs": runs}


def ratio(a: dict, b: dict) -> float | None:
    if a.get("median") is None or not b.get("median"):
        return None
    return a["median"] / b["median"]


def row(metric: str, unit: str, runs: Mapping[str, Sequence[float | None]],
        ratios: Sequence[tuple[str, str]] = (("mesh", "baseline"),),
        added: tuple[str, str] | None = None) -> dict:
    """One comparison row: a summary per variant, ratios of medians, an optional difference.

    ``added`` = (a, b): median(a) - median(b), e.g. the latency the mesh adds.
    """
    variants = {name: summary(vals) for name, vals in runs.items()}
    out = {"metric": metric, "unit": unit, "variants": variants,
           "ratios": {f"{a}/{b}": ratio(variants[a], variants[b])
                      for a, b in ratios if a in variants and b in variants}}
    if added and added[0] in variants and added[1] in variants:
        a, b = variants[added[0]]["median"], variants[added[1]]["median"]
        out["added"] = {"of": f"{added[0]}-{added[1]}", "value": None if a is None or b is None else a - b}
    return out


def target(name: str, measured: float | None, goal: float, unit: str, higher_is_better: bool,
           note: str = "") -> dict:
    met = None if measured is None else (measured >= goal if higher_is_better else measured <= goal)
    return {"name": name, "measured": measured, "target": goal, "unit": unit,
            "comparison": ">=" if higher_is_better else "<=", "met": met, "note": note}


def fmt(v: float | None, unit: str = "") -> str:
    if v is None:
        return "n/a"
    a = abs(v)
    if a >= 1000:
        s = f"{v:,.0f}"
    elif a >= 100:
        s = f"{v:.0f}"
    elif a >= 10:
        s = f"{v:.1f}"
    elif a >= 1:
        s = f"{v:.2f}"
    else:
        s = f"{v:.3f}"
    return s


def cell(s: dict) -> str:
    if s.get("median") is None:
        return "n/a"
    if s["n"] == 1:
        return fmt(s["median"])
    return f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]"


def scenario_table(sc: dict) -> list[str]:
    rows = sc.get("rows", [])
    if not rows:
        return ["(no rows)"]
    variants: list[str] = []
    ratio_names: list[str] = []
    has_added = False
    for r in rows:
        for v in r["variants"]:
            if v not in variants:
                variants.append(v)
        for k in r["ratios"]:
            if k not in ratio_names:
                ratio_names.append(k)
        has_added = has_added or "added" in r
    head = ["metric", "unit", *variants, *ratio_names] + (["added"] if has_added else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["metric"], r["unit"]]
        cells += [cell(r["variants"][v]) if v in r["variants"] else "" for v in variants]
        cells += [fmt(r["ratios"].get(k)) + "×" if r["ratios"].get(k) is not None else "" for k in ratio_names]
        if has_added:
            a = r.get("added")
            cells.append(f"{fmt(a['value'])} ({a['of']})" if a and a["value"] is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: Mapping) -> str:
    meta = results["meta"]
    out = [f"# ambient-agent benchmark ({results['mode']} mode)", ""]
    out.append("| | |")
    out.append("|---|---|")
    for key in ("date", "git_commit", "machine", "cpu", "cpus", "kernel", "python", "bcc", "iperf3",
                "lab", "repeats", "duration_s", "load"):
        if key in meta:
            out.append(f"| {key} | {meta[key]} |")
    out += ["", "Each cell: median of the runs [min–max]; baseline and mesh runs alternate "
            "in one lab. Latencies in ms. Ratios are of medians. The machine is shared "
            "(2 vCPUs, other jobs running): absolute numbers are noisy.", ""]
    out += ["## Targets (measured / target)", "", "| target | measured / target | met | note |",
            "|---|---|---|---|"]
    for t in results.get("targets", []):
        met = {True: "yes", False: "**no**", None: "n/a"}[t["met"]]
        out.append(f"| {t['name']} | {fmt(t['measured'])} / {t['comparison']} {fmt(t['target'])} {t['unit']} "
                   f"| {met} | {t.get('note', '')} |")
    out.append("")
    for key, sc in results["scenarios"].items():
        out += [f"## {key}: {sc.get('title', '')}", ""]
        if sc.get("error"):
            out += [f"**Failed**: {sc['error']}", ""]
        out += scenario_table(sc)
        for note in sc.get("notes", []):
            out += ["", f"* {note}"]
        out.append("")
    prof = results.get("profile")
    if prof:
        out += ["## Profile of the data path (mesh)", ""]
        for note in prof.get("notes", []):
            out.append(f"* {note}")
        # Older results hold one workload (max-rate request/response) under "nodes".
        workloads = prof.get("workloads") or {"rr": {"title": "max-rate request/response",
                                                     "nodes": prof.get("nodes", {})}}
        for wl in workloads.values():
            for node, p in wl.get("nodes", {}).items():
                out += ["", f"### {wl['title']}: {node} agent ({p.get('samples', 0)} samples, "
                            f"file `{p.get('file', '')}`)", "",
                        "| self % | total % | function |", "|---|---|---|"]
                for f in p.get("top", []):
                    out.append(f"| {f['self_pct']:.1f} | {f['total_pct']:.1f} | `{f['function']}` |")
        out.append("")
    for section in ("optimisation", "closing_note"):
        text = results.get(section)
        if text:
            out += [f"## {section.replace('_', ' ').capitalize()}", "", text, ""]
    return "\n".join(out)


# Frames that only the event-loop thread has on its stack: the stock loop's
# run_forever, or (uvloop, whose loop is C) the agent's entry into it.
LOOP_MARKERS = ("run_forever", "eventloop.py")


def collapsed_top(lines: Iterable[str], limit: int = 15, thread_marker: tuple[str, ...] = LOOP_MARKERS) -> dict:
    """Top functions by self and total samples from py-spy's raw (collapsed) output.

    Each line: ``frame;frame;...;leaf COUNT`` (root first). Only stacks that
    contain ``thread_marker`` count: the agent's data path is its event-loop
    thread; idle thread-pool workers would otherwise dominate the samples
    (py-spy cannot always tell a thread blocked on a lock from a running one).
    """
    if isinstance(thread_marker, str):
        thread_marker = (thread_marker,) if thread_marker else ()
    self_counts: dict[str, int] = {}
    total_counts: dict[str, int] = {}
    samples = 0
    for line in lines:
        line = line.rstrip()
        if not line or " " not in line:
            continue
        stack, _, count = line.rpartition(" ")
        try:
            n = int(count)
        except ValueError:
            continue
        frames = [f for f in stack.split(";") if f]
        if not frames or (thread_marker and not any(m in f for f in frames for m in thread_marker)):
            continue
        samples += n
        self_counts[frames[-1]] = self_counts.get(frames[-1], 0) + n
        for f in set(frames):
            total_counts[f] = total_counts.get(f, 0) + n
    top = sorted(self_counts, key=lambda f: -self_counts[f])[:limit]
    return {"samples": samples, "top": [
        {"function": f, "self_pct": 100.0 * self_counts[f] / samples,
         "total_pct": 100.0 * total_counts[f] / samples} for f in top] if samples else []}
