"""The chart's Grafana dashboard as data: every PromQL expression, ready to run.

Pure (no I/O beyond reading the JSON file). Grafana substitutes template
variables before it sends a query; `queries()` does the same with the
variables' default values (what a user sees on opening the dashboard), so a
test can hand the expressions to promtool or to a real Prometheus's HTTP API
unchanged. Used by tests/chart/test_dashboard.py (promtool) and meant for the
lab test that runs them against a Prometheus scraping lab agents.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import NamedTuple

DASHBOARD = Path(__file__).resolve().parents[2] / "charts" / "ambient-agent" / "dashboards" / "ambient-agent.json"

# Grafana's built-in interval variables, as a dashboard over a 15 s scrape
# interval would get them ($__rate_interval is at least four scrape intervals).
BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "1h"}

_VAR = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")


class Query(NamedTuple):
    panel: str
    ref_id: str
    expr: str        # after substitution
    raw: str         # as written in the dashboard


def load(path: Path = DASHBOARD) -> dict:
    return json.loads(Path(path).read_text())


def default_variables(dash: dict) -> dict[str, str]:
    """Each template variable's default as Grafana substitutes it into a query:
    "All" becomes the variable's allValue; a datasource variable is not a query value."""
    out = dict(BUILTINS)
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "datasource":
            continue
        current = var.get("current") or {}
        value = current.get("value")
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else "|".join(value)
        if value in ("$__all", "All") or value is None:
            value = var.get("allValue") or ".*"
        out[var["name"]] = str(value)
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    def one(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in variables:
            raise KeyError(f"dashboard variable ${name} has no value (expression: {expr})")
        return variables[name]
    return _VAR.sub(one, expr)


def queries(dash: dict | None = None, overrides: dict[str, str] | None = None) -> list[Query]:
    """Every target of every panel (rows included), variables substituted."""
    dash = load() if dash is None else dash
    variables = {**default_variables(dash), **(overrides or {})}
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append(Query(p["title"], t["refId"], substitute(t["expr"], variables), t["expr"]))
            walk(p.get("panels", []))
    walk(dash["panels"])
    return out
