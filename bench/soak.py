"""`make soak`: does anything grow while the mesh carries steady traffic?

    python -m bench.soak [--minutes 30] [--rate 200] [--out-dir bench]

Brings up the bench lab (``bench/lab.py``: CA, two node agents, meshed
pods on two nodes) and runs, for ``--minutes``, through the mesh from
``mesh/client`` (node1) to ``mesh/server`` (node2):

* connection churn: ``--rate`` new connections per second (connect, 1 KB
  each way, close; ``bench/loadgen.py cps --rate``), at most
  ``--concurrency`` at a time;
* one long-lived connection carrying ``--stream-rate`` request/responses
  per second for the whole run (``loadgen.py rr``): it must end without
  an error.

Every ``--sample-seconds`` it reads both agents' RSS (``/proc/<pid>/status``),
fd count (``/proc/<pid>/fd``), CPU time and log size, with the log split
into access-log lines (one per connection, by design) and everything else.
After ``--warmup-minutes`` (default: the time the churn takes to open
120,000 connections, 10 minutes at 200/s, but at most half the run) the
slope of each series is fitted by least squares and reported per minute in
``soak.json`` and ``soak.md`` in ``--out-dir``. The run is "flat" when, for
both agents, RSS grows by less than ``--max-rss-slope-kb`` KiB/min, fds by
less than ``--max-fd-slope`` per minute, the log without access lines by
less than ``--max-log-slope-kb`` KiB/min, and both loads ended without
errors; the exit status is 0 only then. Not run in CI (it takes the
minutes it is given); the lab is torn down on every exit path.

Why the warm-up is long: ``h2`` remembers the last 65,536 closed streams of
every HTTP/2 connection (``MAX_CLOSED_STREAMS``): about 11 MiB per
connection and side, level only after about 90,000 streams (measured over
loopback: 22.9 MiB for both sides from 90,000 to 210,000 streams). The
pooled HBONE connection gets there after 8 minutes at 200 connections/s;
RSS grows about 1.5 MiB/min until then, so a 3-minute run is all warm-up.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.lab import ECHO_PORT, LOADGEN, REPO, BenchLab, proc_cpu_seconds

log = logging.getLogger("bench.soak")

NODES = ("node1", "node2")
WARMUP_CONNECTIONS = 120_000      # see "Why the warm-up is long" above
ACCESS_MARK = b" INFO access: "


@dataclass
class Sample:
    minute: float         # since the load started
    rss_kb: int
    fds: int
    cpu_s: float
    log_kb: float         # the whole log
    other_log_kb: float   # without access-log lines
    access_log_kb: float


class AgentWatch:
    """One agent's /proc entries and log, sampled; the log is read incrementally."""

    def __init__(self, bl: BenchLab, node: str) -> None:
        self.node = node
        self.pid = bl.lab.agent_pid(node)
        if not self.pid:
            raise RuntimeError(f"the agent of {node} is not running")
        self.log_path = bl.lab.node_dir(node) / "agent.log"
        self.offset = self.log_path.stat().st_size
        self.partial = b""
        self.other = 0
        self.access = 0
        self.samples: list[Sample] = []

    def _read_log(self) -> None:
        with open(self.log_path, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if ACCESS_MARK in line:
                self.access += len(line) + 1
            else:
                self.other += len(line) + 1

    def sample(self, minute: float) -> Sample:
        if not os.path.exists(f"/proc/{self.pid}"):
            raise RuntimeError(f"the agent of {self.node} (pid {self.pid}) died during the soak")
        rss = 0
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{self.pid}/fd"))
        self._read_log()
        s = Sample(round(minute, 3), rss, fds, proc_cpu_seconds(self.pid),
                   round((self.other + self.access) / 1024, 1), round(self.other / 1024, 1),
                   round(self.access / 1024, 1))
        self.samples.append(s)
        return s


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x (per unit of x); None with fewer than 2 points."""
    if len(points) < 2:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


SERIES = ("rss_kb", "fds", "cpu_s", "log_kb", "other_log_kb", "access_log_kb")


def slopes(samples: list[Sample], warmup_minutes: float) -> dict[str, float | None]:
    kept = [s for s in samples if s.minute >= warmup_minutes]
    return {name: slope([(s.minute, getattr(s, name)) for s in kept]) for name in SERIES}


def verdict(result: dict, limits: dict) -> list[str]:
    """What is not flat (empty: flat)."""
    problems = []
    for node, sl in result["slopes"].items():
        checks = (("rss_kb", limits["rss_kb_per_min"], "RSS", "KiB/min"),
                  ("fds", limits["fds_per_min"], "fds", "/min"),
                  ("other_log_kb", limits["log_kb_per_min"], "log (without access lines)", "KiB/min"))
        for key, limit, what, unit in checks:
            value = sl.get(key)
            if value is None:
                problems.append(f"{node}: too few samples after the warm-up for a {what} slope")
            elif value > limit:
                problems.append(f"{node}: {what} grows {value:.1f} {unit} (limit {limit:g})")
    churn, stream = result["load"].get("churn") or {}, result["load"].get("stream") or {}
    if not churn or churn.get("errors", 1):
        problems.append(f"connection churn: {churn.get('errors', 'no result')} errors")
    if not stream or stream.get("errors", 1) or not stream.get("requests"):
        problems.append(f"long-lived stream: {stream.get('errors', 'no result')} errors, "
                        f"{stream.get('requests', 0)} requests")
    return problems


def markdown(result: dict) -> str:
    m, lim = result["meta"], result["limits"]
    out = [f"# Soak: {m['minutes']:g} minutes of churn and a long-lived stream through the mesh", "",
           f"Lab `{m['lab']}`, {m['date']}, {m['machine']}. Load from `mesh/client` (node1) to "
           f"`mesh/server` (node2) over HBONE: {m['rate']:g} new connections/s (at most "
           f"{m['concurrency']} at a time) and one connection with {m['stream_rate']:g} request/responses/s "
           f"for the whole run. Samples every {m['sample_seconds']:g} s; slopes fitted by least squares "
           f"after a {m['warmup_minutes']:g}-minute warm-up. Agent arguments: {m['agent_args']}.", "",
           f"**Verdict: {'flat' if not result['problems'] else 'NOT flat'}.**"
           + ("" if not result["problems"] else " " + "; ".join(result["problems"])), ""]
    needed = WARMUP_CONNECTIONS / m["rate"] / 60.0
    if m["warmup_minutes"] < needed:
        out += [f"This warm-up is shorter than the {needed:g} minutes the churn needs to open "
                f"{WARMUP_CONNECTIONS:,} connections, after which h2's memory of closed streams "
                "(about 11 MiB per HBONE connection and side) stops growing: the RSS slope below still "
                "includes it. Run at least {:g} minutes for a verdict.".format(2 * needed), ""]
    out += [
           "## Slopes after the warm-up (per minute)", "",
           "| agent | RSS KiB/min | fds/min | log KiB/min (without access lines) | access log KiB/min | CPU s/min |",
           "|---|---|---|---|---|---|"]

    def f(v, fmt="{:.1f}"):
        return "n/a" if v is None else fmt.format(v)
    for node, sl in result["slopes"].items():
        out.append(f"| {node} | {f(sl['rss_kb'])} | {f(sl['fds'], '{:.2f}')} | {f(sl['other_log_kb'], '{:.2f}')} "
                   f"| {f(sl['access_log_kb'])} | {f(sl['cpu_s'], '{:.2f}')} |")
    out += ["", f"Limits: RSS < {lim['rss_kb_per_min']:g} KiB/min, fds < {lim['fds_per_min']:g}/min, "
                f"log without access lines < {lim['log_kb_per_min']:g} KiB/min. The access log is one line "
                "per connection by design (ztunnel's too); its slope is the connection rate times the line "
                "length.", "", "## Start and end", "",
            "| agent | RSS MiB | fds | log KiB (other / access) | CPU s |", "|---|---|---|---|---|"]
    for node, samples in result["samples"].items():
        a, b = samples[0], samples[-1]
        out.append(f"| {node} | {a['rss_kb'] / 1024:.1f} -> {b['rss_kb'] / 1024:.1f} | {a['fds']} -> {b['fds']} "
                   f"| {a['other_log_kb']:.0f} / {a['access_log_kb']:.0f} -> {b['other_log_kb']:.0f} / "
                   f"{b['access_log_kb']:.0f} | {a['cpu_s']:.1f} -> {b['cpu_s']:.1f} |")
    churn, stream = result["load"].get("churn") or {}, result["load"].get("stream") or {}
    out += ["", "## Load", "",
            f"* churn: {churn.get('connections', 0)} connections in {churn.get('seconds', 0):.0f} s "
            f"({churn.get('rate', 0):.1f}/s, target {m['rate']:g}/s), {churn.get('errors', '?')} errors, "
            f"{churn.get('late', '?')} starts late (all {m['concurrency']} busy); exchange p50/p99 "
            f"{f((churn.get('exchange') or {}).get('p50'), '{:.2f}')}/"
            f"{f((churn.get('exchange') or {}).get('p99'), '{:.2f}')} ms",
            f"* long-lived stream: {stream.get('requests', 0)} request/responses in {stream.get('seconds', 0):.0f} s, "
            f"{stream.get('errors', '?')} errors, p50/p99 {f(stream.get('p50'), '{:.2f}')}/"
            f"{f(stream.get('p99'), '{:.2f}')} ms", "",
            "Raw samples: `soak.json`."]
    return "\n".join(out)


def _load(bl: BenchLab, argv: list[str]) -> subprocess.Popen:
    proc = bl.lab.exec("mesh/client", [sys.executable, LOADGEN, *argv], stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    bl.procs.append(proc)
    return proc


def _result(proc: subprocess.Popen, what: str, timeout: float) -> dict:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        log.error("%s ended with status %s: %s", what, proc.returncode, err.strip()[-500:])
        return {"errors": f"exit {proc.returncode}: {err.strip()[-200:]}"}
    return json.loads(lines[-1])


def run(args) -> dict:
    seconds = args.minutes * 60.0
    warmup = (args.warmup_minutes if args.warmup_minutes is not None
              else min(args.minutes / 2.0, WARMUP_CONNECTIONS / args.rate / 60.0))
    bl = BenchLab(agent_args=args.agent_args)
    result: dict = {"meta": {"minutes": args.minutes, "warmup_minutes": warmup, "rate": args.rate,
                             "concurrency": args.concurrency, "stream_rate": args.stream_rate,
                             "sample_seconds": args.sample_seconds, "lab": bl.name,
                             "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                             "machine": f"{os.uname().release}, {os.cpu_count()} CPUs",
                             "agent_args": " ".join(args.agent_args) or "(none)"},
                    "limits": {"rss_kb_per_min": args.max_rss_slope_kb, "fds_per_min": args.max_fd_slope,
                               "log_kb_per_min": args.max_log_slope_kb}}
    try:
        log.info("lab %s: bringing up two nodes, CA, agents and pods", bl.name)
        bl.up()
        watches = [AgentWatch(bl, node) for node in NODES]
        server = bl.ip("mesh/server")
        log.info("soak: %g minutes, %g new connections/s, one stream at %g req/s; warm-up %g minutes",
                 args.minutes, args.rate, args.stream_rate, warmup)
        stream = _load(bl, ["rr", server, str(ECHO_PORT), "--conns", "1", "--rate", str(args.stream_rate),
                            "--duration", str(seconds), "--warmup", "0"])
        churn = _load(bl, ["cps", server, str(ECHO_PORT), "--rate", str(args.rate), "--concurrency",
                           str(args.concurrency), "--duration", str(seconds), "--warmup", "0"])
        started = time.monotonic()
        next_sample = started
        while True:
            now = time.monotonic()
            minute = (now - started) / 60.0
            if now >= next_sample:
                for w in watches:
                    s = w.sample(minute)
                    log.debug("%s %s", w.node, s)
                if int(minute * 60) % 60 < args.sample_seconds:
                    log.info("minute %.1f: %s", minute, ", ".join(
                        f"{w.node} RSS {w.samples[-1].rss_kb / 1024:.1f} MiB fds {w.samples[-1].fds}"
                        for w in watches))
                next_sample += args.sample_seconds
            if now - started >= seconds + 2 or (stream.poll() is not None and churn.poll() is not None):
                break
            time.sleep(max(0.0, min(next_sample, started + seconds + 2) - time.monotonic()))
        for w in watches:
            w.sample((time.monotonic() - started) / 60.0)
        result["load"] = {"churn": _result(churn, "connection churn", 60),
                          "stream": _result(stream, "long-lived stream", 60)}
        result["samples"] = {w.node: [asdict(s) for s in w.samples] for w in watches}
        result["slopes"] = {w.node: slopes(w.samples, warmup) for w in watches}
        result["problems"] = verdict(result, result["limits"])
    finally:
        problems = bl.close()
        if problems:
            log.warning("lab teardown: %s", "; ".join(problems))
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--warmup-minutes", type=float, default=None,
                    help="samples before this are left out of the slopes (default: the time to open "
                         "120,000 connections at --rate, at most half the run)")
    ap.add_argument("--rate", type=float, default=200.0, help="new connections per second")
    ap.add_argument("--concurrency", type=int, default=32, help="connections open at once, at most")
    ap.add_argument("--stream-rate", type=float, default=20.0,
                    help="request/responses per second on the long-lived connection")
    ap.add_argument("--sample-seconds", type=float, default=10.0)
    ap.add_argument("--max-rss-slope-kb", type=float, default=64.0, help="KiB per minute, per agent")
    ap.add_argument("--max-fd-slope", type=float, default=1.0, help="fds per minute, per agent")
    ap.add_argument("--max-log-slope-kb", type=float, default=4.0,
                    help="KiB per minute of log without access lines, per agent")
    ap.add_argument("--out-dir", default=str(REPO / "bench"))
    ap.add_argument("--agent-arg", action="append", dest="agent_args", default=[],
                    help="extra argument for both node agents (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main_pid = os.getpid()

    def on_term(signum, frame):
        if os.getpid() != main_pid:      # a forked helper (pyroute2): never tear the lab down from it
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_term)

    result = run(args)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / "soak.md").write_text(markdown(result) + "\n")
    for node, sl in result["slopes"].items():
        log.info("%s: RSS %+.1f KiB/min, fds %+.2f/min, log %+.2f KiB/min without access lines "
                 "(access %+.1f KiB/min)", node, sl["rss_kb"] or 0, sl["fds"] or 0, sl["other_log_kb"] or 0,
                 sl["access_log_kb"] or 0)
    if result["problems"]:
        log.error("not flat: %s", "; ".join(result["problems"]))
        return 1
    log.info("flat; results in %s", out_dir / "soak.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
