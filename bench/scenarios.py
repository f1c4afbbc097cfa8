"""The benchmark scenarios. Each takes the shared lab and a Config and returns
``{"title", "rows": [report.row(...)], "notes": [...], "raw": {...}}``.

Every comparison runs its variants in the same lab, alternating: repeat r
runs them in order rotated by r, so drift on a shared machine (other jobs,
caches warming) is spread over the variants instead of favouring one.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

from bench.lab import LOADGEN, PAIRS, AgentMeter, BenchLab, idle_connections
from bench.report import row


@dataclass
class Config:
    short: bool
    repeats: int
    duration: float          # seconds per measured load run
    warmup: float
    rr_conns_fixed: int = 4  # connections sharing the fixed 1000 req/s
    rr_conns_max: int = 8    # connections in the max-rate run
    cps_concurrency: int = 8
    idle_conns: int = 1000
    cni_sequential: int = 20
    cni_batch: int = 100
    scale_pods: tuple = (1, 10, 100)
    scale_conns: tuple = (1, 64, 1024)
    dns_queries: int = 2000      # counted queries per sequential DNS run
    dns_warmup: int = 50         # queries sent first in each DNS run, not counted
    dns_concurrency: int = 8     # queries in flight in the DNS queries/s run
    dns_burst: int = 3000        # counted queries in that run: within the proxy's per-pod burst (4000)

    @classmethod
    def for_mode(cls, short: bool) -> "Config":
        if short:
            return cls(short=True, repeats=2, duration=0.8, warmup=0.15, idle_conns=64,
                       cni_sequential=3, cni_batch=10, scale_pods=(1, 10), scale_conns=(1, 64),
                       dns_queries=300, dns_warmup=20, dns_burst=1000)
        return cls(short=False, repeats=3, duration=4.0, warmup=0.5)


def alternate(variants: dict[str, Callable[[], dict]], repeats: int) -> dict[str, list[dict]]:
    names = list(variants)
    out: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            out[n].append(variants[n]())
    return out


def pick(runs: dict[str, list[dict]], *path: str) -> dict[str, list]:
    def get(d):
        for p in path:
            d = d.get(p) if isinstance(d, dict) else None
        return d
    return {n: [get(r) for r in rs] for n, rs in runs.items()}


def latency_rows(runs, prefix: str, variants=("mesh", "baseline"), under: str | None = None) -> list[dict]:
    rows = []
    for p in ("p50", "p90", "p99"):
        path = (under, p) if under else (p,)
        rows.append(row(f"{prefix} {p}", "ms", pick(runs, *path),
                        ratios=[(v, variants[-1]) for v in variants[:-1]], added=(variants[0], variants[-1])))
    return rows


# --- 0: the load generator's own ceiling --------------------------------------

def ceiling(bl: BenchLab, cfg: Config) -> dict:
    """loadgen client and server in one pod, over loopback: nothing captured, no mesh."""
    pod = "plain/client"
    port = "18080"
    server = bl.background(pod, [sys.executable, LOADGEN, "serve", port, "--host", "127.0.0.1"], ready=True)
    try:
        runs = alternate({
            "rr_max": lambda: bl.loadgen_in(pod, "rr", "127.0.0.1", port, "--rate", "0",
                                            "--conns", str(cfg.rr_conns_max), "--duration", str(cfg.duration),
                                            "--warmup", str(cfg.warmup)),
            "rr_1000": lambda: bl.loadgen_in(pod, "rr", "127.0.0.1", port, "--rate", "1000",
                                             "--conns", str(cfg.rr_conns_fixed), "--duration", str(cfg.duration),
                                             "--warmup", str(cfg.warmup)),
            "cps": lambda: bl.loadgen_in(pod, "cps", "127.0.0.1", port, "--concurrency",
                                         str(cfg.cps_concurrency), "--duration", str(cfg.duration),
                                         "--warmup", str(cfg.warmup)),
        }, cfg.repeats)
    finally:
        server.kill()
        server.wait()
    rows = [
        row("request/response max rate", "req/s", {"loopback": [r["rate"] for r in runs["rr_max"]]}, ratios=()),
        row("RR at 1000 req/s p50", "ms", {"loopback": [r["p50"] for r in runs["rr_1000"]]}, ratios=()),
        row("RR at 1000 req/s p99", "ms", {"loopback": [r["p99"] for r in runs["rr_1000"]]}, ratios=()),
        row("new connections", "conn/s", {"loopback": [r["rate"] for r in runs["cps"]]}, ratios=()),
    ]
    return {"title": "load generator ceiling (bench/loadgen.py client + echo server over loopback in one pod)",
            "rows": rows, "raw": runs,
            "notes": ["Our client and echo server are single-threaded Python (selectors). A figure "
                      "measured through the lab that approaches these is bounded by the load generator, "
                      "not by the path under test. Bulk throughput uses iperf3 (C)."]}


# --- 1: bulk throughput ---------------------------------------------------------

def bulk(bl: BenchLab, cfg: Config) -> dict:
    secs = max(1.0, cfg.duration)
    rows = []
    raw = {}
    for streams in (1, 8):
        runs = alternate({v: (lambda v=v: {"mbps": bl.iperf(v, secs, streams)}) for v in ("baseline", "mesh")},
                         cfg.repeats)
        raw[f"P{streams}"] = runs
        rows.append(row(f"iperf3 {streams} stream{'s' if streams > 1 else ''}", "MB/s",
                        pick(runs, "mbps")))
    return {"title": "bulk throughput, pod to pod across nodes (iperf3)", "rows": rows, "raw": raw,
            "notes": ["iperf3 works through the capture unchanged: its control and data connections "
                      "are captured by connect4 and carried over HBONE like any TCP connection."]}


# --- 2 + 4: request/response and agent cost --------------------------------------

def _rr_metered(bl: BenchLab, cfg: Config, variant: str, rate: float, conns: int) -> dict:
    with AgentMeter(bl.lab) as m:
        res = bl.loadgen(variant, "rr", "--rate", f"{rate:g}", "--conns", str(conns),
                         "--duration", str(cfg.duration), "--warmup", str(cfg.warmup))
    res["agent_cpu_s"] = m.cpu
    res["agent_rss_before_mb"] = m.rss_before
    res["agent_rss_peak_mb"] = m.rss_peak
    res["wall_s"] = m.seconds
    total_req = res["requests"] * (m.seconds / res["seconds"]) if res["seconds"] else 0
    cpu_all = sum(m.cpu.values())
    res["agents_cpu_s_per_1000_req"] = cpu_all / (total_req / 1000) if total_req else None
    res["agents_vcpu"] = cpu_all / m.seconds
    res["agent_vcpu_max"] = max(m.cpu.values()) / m.seconds
    busiest = max(m.cpu, key=m.cpu.get)
    res["agent_sys_share_max"] = (m.sys[busiest] / m.cpu[busiest]) if m.cpu[busiest] else None
    res["agent_rss_growth_mb_max"] = max(m.rss_peak[n] - m.rss_before[n] for n in m.cpu)
    res["agent_rss_peak_mb_max"] = max(m.rss_peak.values())
    return res


def request_response(bl: BenchLab, cfg: Config) -> tuple[dict, dict]:
    fixed = alternate({v: (lambda v=v: _rr_metered(bl, cfg, v, 1000, cfg.rr_conns_fixed))
                       for v in ("baseline", "mesh")}, cfg.repeats)
    maxr = alternate({v: (lambda v=v: _rr_metered(bl, cfg, v, 0, cfg.rr_conns_max))
                      for v in ("baseline", "mesh")}, cfg.repeats)
    rows = [row("achieved rate (target 1000)", "req/s", pick(fixed, "rate"))]
    rows += latency_rows(fixed, "1000 req/s")
    rows.append(row(f"max rate ({cfg.rr_conns_max} connections)", "req/s", pick(maxr, "rate")))
    rows += latency_rows(maxr, "max rate")
    rr = {"title": f"request/response, 1 KB each way, persistent connections "
                   f"({cfg.rr_conns_fixed} at 1000 req/s open loop; {cfg.rr_conns_max} closed loop at max rate)",
          "rows": rows, "raw": {"fixed": fixed, "max": maxr},
          "notes": ["'added' is the mesh's median minus the baseline's median for that percentile: "
                    "two node agents, HBONE mTLS and the capture on both ends."]}

    cost_rows = [
        row("both agents' CPU at 1000 req/s", "vCPU", pick(fixed, "agents_vcpu")),
        row("busiest agent's CPU at 1000 req/s", "vCPU", pick(fixed, "agent_vcpu_max")),
        row("busiest agent's CPU at 1000 req/s: kernel (system) share", "fraction",
            {"mesh": pick(fixed, "agent_sys_share_max")["mesh"]}, ratios=()),
        row("agents' CPU per 1000 requests (1000 req/s)", "CPU s", pick(fixed, "agents_cpu_s_per_1000_req")),
        row("agents' CPU per 1000 requests (max rate)", "CPU s", pick(maxr, "agents_cpu_s_per_1000_req")),
        row("busiest agent's CPU at max rate", "vCPU", pick(maxr, "agent_vcpu_max")),
        row("agent RSS at 1000 req/s (largest)", "MB", pick(fixed, "agent_rss_peak_mb_max")),
        row("agent RSS growth under 1000 req/s (largest)", "MB", pick(fixed, "agent_rss_growth_mb_max")),
    ]
    return rr, {"title": "agent cost (from /proc/<agent pid>/stat and status; both node agents)",
                "rows": cost_rows, "raw": {},
                "notes": ["In the baseline the agents run but carry none of the traffic (the pods are "
                          "not enrolled): their figures are the idle cost."]}


def idle_memory(bl: BenchLab, cfg: Config, cost: dict) -> None:
    """RSS growth of both agents per 1000 idle meshed connections (added to the cost scenario)."""
    n = cfg.idle_conns
    growth: dict[str, list] = {"baseline": [], "mesh": []}
    pids = {node: bl.lab.agent_pid(node) for node in bl.lab.nodes}
    from bench.lab import proc_rss_mb
    for r in range(max(2, cfg.repeats // 2)):
        for v in (("mesh", "baseline") if r % 2 else ("baseline", "mesh")):
            before = {k: proc_rss_mb(p) for k, p in pids.items()}
            with idle_connections(bl, v, n) as opened:
                time.sleep(0.5)
                during = {k: proc_rss_mb(p) for k, p in pids.items()}
            total = sum(during[k] - before[k] for k in pids)
            growth[v].append(total * 1000.0 / opened)
            time.sleep(0.5)
    cost["rows"].append(row(f"agents' RSS per 1000 idle connections ({n} held)", "MB", growth))
    cost["notes"].append(f"Idle connections: {n} connections opened, one 1 KB exchange each, then held; "
                         "growth of both agents' RSS summed and scaled to 1000. RSS growth is a lower "
                         "bound of what they cost: memory freed by earlier runs is reused first.")


# --- 3: new connections per second, HBONE pooling ------------------------------

def _node2_tls(bl: BenchLab) -> int:
    return bl.agent_pod("node2", "mesh/server")["counters"]["hbone"]["connections"]


def new_connections(bl: BenchLab, cfg: Config) -> dict:
    node1 = bl.lab.agent_pid("node1")

    def run(variant: str, pooled: bool = True) -> dict:
        if not pooled:
            os.kill(node1, signal.SIGUSR1)        # bench/agent_shim.py: one TLS connection per stream
        try:
            tls0 = _node2_tls(bl)
            res = bl.loadgen(variant, "cps", "--concurrency", str(cfg.cps_concurrency),
                             "--duration", str(cfg.duration), "--warmup", str(cfg.warmup))
            time.sleep(0.2)
            res["tls_handshakes"] = _node2_tls(bl) - tls0
        finally:
            if not pooled:
                os.kill(node1, signal.SIGUSR2)
        return res

    runs = alternate({"baseline": lambda: run("baseline"), "mesh": lambda: run("mesh"),
                      "mesh-no-pool": lambda: run("mesh", pooled=False)}, cfg.repeats)
    rows = [row("new connections (connect, 1 KB exchange, close)", "conn/s", pick(runs, "rate"),
                ratios=[("mesh", "baseline"), ("mesh-no-pool", "baseline"), ("mesh", "mesh-no-pool")])]
    for p in ("p50", "p99"):
        rows.append(row(f"connection + exchange {p}", "ms", pick(runs, "exchange", p),
                        ratios=[("mesh", "baseline"), ("mesh-no-pool", "baseline")], added=("mesh", "baseline")))
    rows.append(row("mTLS handshakes at node2 per run", "count",
                    {v: [r["tls_handshakes"] for r in runs[v]] for v in ("mesh", "mesh-no-pool")}, ratios=()))
    return {"title": f"new connections per second, {cfg.cps_concurrency} at a time", "rows": rows, "raw": runs,
            "notes": ["mesh: pooled HBONE (each app connection is a new HTTP/2 stream on a shared mTLS "
                      "connection); mesh-no-pool: the same agent told (SIGUSR1, bench/agent_shim.py) to open "
                      "a fresh mTLS connection per app connection, i.e. what the pool saves."]}


# --- 5: eBPF capture against iptables REDIRECT -----------------------------------

def capture_cost(bl: BenchLab, cfg: Config) -> dict:
    bl.iptables_capture("mesh/iptclient", "node1")
    before = bl.agent_pod("node1", "mesh/iptclient")["counters"]["outbound"]["connections"]

    def cps(v):
        return bl.loadgen(v, "cps", "--concurrency", "1", "--duration", str(cfg.duration),
                          "--warmup", str(cfg.warmup))

    def rr(v):
        return bl.loadgen(v, "rr", "--rate", "1000", "--conns", str(cfg.rr_conns_fixed),
                          "--duration", str(cfg.duration), "--warmup", str(cfg.warmup))

    vs = ("baseline", "mesh", "iptables")
    c = alternate({v: (lambda v=v: cps(v)) for v in vs}, cfg.repeats)
    r = alternate({v: (lambda v=v: rr(v)) for v in vs}, cfg.repeats)
    through_agent = bl.agent_pod("node1", "mesh/iptclient")["counters"]["outbound"]["connections"] - before
    ratios = [("iptables", "mesh"), ("mesh", "baseline")]
    runs_c = {"eBPF": c["mesh"], "iptables": c["iptables"], "baseline": c["baseline"]}
    runs_r = {"eBPF": r["mesh"], "iptables": r["iptables"], "baseline": r["baseline"]}
    ratios = [("iptables", "eBPF"), ("eBPF", "baseline")]
    rows = []
    for p in ("p50", "p99"):
        rows.append(row(f"connect() latency {p}", "ms", pick(runs_c, "connect", p), ratios=ratios,
                        added=("iptables", "eBPF")))
    for p in ("p50", "p99"):
        rows.append(row(f"new connection + 1 KB exchange {p}", "ms", pick(runs_c, "exchange", p),
                        ratios=ratios, added=("iptables", "eBPF")))
    rows.append(row("new connections, one at a time", "conn/s", pick(runs_c, "rate"), ratios=ratios))
    for p in ("p50", "p99"):
        rows.append(row(f"request latency at 1000 req/s {p}", "ms", pick(runs_r, p), ratios=ratios,
                        added=("iptables", "eBPF")))
    return {"title": "capture cost: eBPF (connect4 rewrite) against iptables REDIRECT, same agent listener",
            "rows": rows, "raw": {"cps": c, "rr": r, "iptables_connections_through_agent": through_agent},
            "notes": [
                "The iptables variant exists only in the benchmark: the client pod's netns is removed from "
                "node1's pod_config map (connect4 leaves it alone) and `iptables -t nat -A OUTPUT -p tcp -d "
                "198.18.0.0/16 -m mark ! --mark 0x539 -j REDIRECT --to-ports 15001` is added in its netns. "
                "The product agent cannot be driven by iptables as it stands: its outbound listener only "
                "reads the eBPF orig_dst map and resets a connection without an entry. bench/agent_shim.py "
                "adds the SO_ORIGINAL_DST fallback (used only on a map miss) so the same listener and "
                "forwarding code serve both variants.",
                f"Connections the agent accepted from the iptables pod during the runs: {through_agent} "
                "(proves the REDIRECT path went through the agent).",
                "Inbound capture at the server (sk_lookup) is the same in both variants; only the client "
                "side's redirect differs. connect() completes against the local agent listener in both."]}


# --- 6: CNI ADD latency and enrolment -------------------------------------------

def cni(bl: BenchLab, cfg: Config) -> dict:
    lab = bl.lab
    seq: dict[str, list[float]] = {"baseline": [], "mesh": []}
    plugin: dict[str, list[float]] = {"baseline": [], "mesh": []}
    made: list[tuple[str, str]] = []
    try:
        # Per-pod latency: one pod at a time, alternating a meshed and an unmeshed namespace.
        for i in range(cfg.cni_sequential):
            for v in (("mesh", "baseline") if i % 2 else ("baseline", "mesh")):
                ns = "cnim" if v == "mesh" else "cnip"
                name = f"s{i}"
                start = len(lab.cni_timings)
                res = bl.add_pods(ns, [name], "node1", meshed=(v == "mesh"))
                made.append((ns, name))
                if res["failed"]:
                    raise RuntimeError(f"pod {ns}/{name}: {res['failed']}")
                for t in lab.cni_timings[start:]:
                    if t["pod"] == f"{ns}/{name}" and t["command"] == "ADD-chain" and t["network"] == "ambient-lab":
                        seq[v].append(t["seconds"] * 1000)
                    if t["pod"] == f"{ns}/{name}" and t["plugin"] == "ambient-cni" and t["command"] == "ADD":
                        plugin[v].append(t["seconds"] * 1000)
        bl.delete_pods("cnim", [n for ns, n in made if ns == "cnim"])
        bl.delete_pods("cnip", [n for ns, n in made if ns == "cnip"])
        made.clear()
        # Enrolment of N pods at once (the lab creates up to 16 in parallel, like a busy kubelet).
        batch: dict[str, list[float]] = {"baseline": [], "mesh": []}
        batch_add: dict[str, list[float]] = {"baseline": [], "mesh": []}
        for v in ("baseline", "mesh"):
            ns = "cnibm" if v == "mesh" else "cnibp"
            names = [f"b{i}" for i in range(cfg.cni_batch)]
            start = len(lab.cni_timings)
            t0 = time.perf_counter()
            res = bl.add_pods(ns, names, "node1", meshed=(v == "mesh"))
            made += [(ns, n) for n in names]
            if res["failed"]:
                raise RuntimeError(f"batch pods failed: {res['failed']}")
            if v == "mesh":
                deadline = time.monotonic() + 60
                while True:
                    st = lab.agent_request("node1", {"op": "status"})["pods"]
                    if sum(1 for p in st if p["namespace"] == ns and p.get("enrolled")) >= len(names):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("batch pods not all enrolled within 60 s")
                    time.sleep(0.05)
            batch[v].append(time.perf_counter() - t0)
            batch_add[v] += [t["seconds"] * 1000 for t in lab.cni_timings[start:]
                             if t["command"] == "ADD-chain" and t["network"] == "ambient-lab"]
            bl.delete_pods(ns, names)
            made.clear()
    finally:
        for ns, n in made:
            try:
                lab.delete_pod(ns, n)
            except Exception:
                pass

    def pct(values: list[float], p: float) -> float | None:
        if not values:
            return None
        s = sorted(values)
        return s[max(0, min(len(s) - 1, int(round(p / 100 * len(s) + 0.5)) - 1))]

    rows = []
    for p in (50, 99):
        rows.append(row(f"CNI ADD, whole chain, one pod at a time, p{p}", "ms",
                        {v: [pct(seq[v], p)] for v in seq}, added=("mesh", "baseline")))
    for p in (50, 99):
        rows.append(row(f"ambient-cni ADD alone, p{p}", "ms", {v: [pct(plugin[v], p)] for v in plugin}))
    for p in (50, 99):
        rows.append(row(f"CNI ADD, whole chain, {cfg.cni_batch} pods at once, p{p}", "ms",
                        {v: [pct(batch_add[v], p)] for v in batch_add}, added=("mesh", "baseline")))
    rows.append(row(f"{cfg.cni_batch} pods created (mesh: and enrolled)", "s", batch))
    return {"title": "CNI ADD latency through the real chain (bridge + host-local + ambient-cni) and enrolment",
            "rows": rows, "raw": {"sequential_ms": seq, "ambient_cni_ms": plugin, "batch_add_ms": batch_add,
                                  "batch_s": batch},
            "notes": [f"One at a time: {cfg.cni_sequential} pods per variant, alternating; p50/p99 over those pods "
                      "(one value per cell). baseline = pod in a namespace outside the mesh: the same chain runs, "
                      "ambient-cni only informs the agent. Times are what the container runtime waits for "
                      "the network of the pod (the loopback network is separate and excluded).",
                      "The ambient-cni plugin is a Python process per call (interpreter start and imports "
                      "are most of its time)."]}


# --- 7: scaling -------------------------------------------------------------------

def scaling(bl: BenchLab, cfg: Config) -> dict:
    rows = []
    raw: dict = {"pods": {}, "conns": {}}
    for conns in cfg.scale_conns:
        runs = alternate({v: (lambda v=v: bl.loadgen(v, "rr", "--rate", "0", "--conns", str(conns),
                                                     "--duration", str(cfg.duration), "--warmup",
                                                     str(max(cfg.warmup, 0.5 if conns > 100 else 0)),
                                                     timeout=180))
                          for v in ("baseline", "mesh")}, cfg.repeats)
        raw["conns"][conns] = runs
        rows.append(row(f"{conns} concurrent connections: max rate", "req/s", pick(runs, "rate")))
        for p in ("p50", "p99"):
            rows.append(row(f"{conns} concurrent connections: {p}", "ms", pick(runs, p), added=("mesh", "baseline")))
    extra: list[str] = []
    for level in cfg.scale_pods:
        have = bl.enrolled_on("node1")
        want = max(0, level - have)
        if want:
            names = [f"x{len(extra) + i}" for i in range(want)]
            res = bl.add_pods("scale", names, "node1", meshed=True)
            if res["failed"]:
                raise RuntimeError(f"scale pods failed: {res['failed']}")
            extra += names
            bl.lab.settle(30.0)
        enrolled = bl.enrolled_on("node1")
        runs = alternate({v: (lambda v=v: bl.loadgen(v, "rr", "--rate", "1000", "--conns", str(cfg.rr_conns_fixed),
                                                     "--duration", str(cfg.duration), "--warmup", str(cfg.warmup)))
                          for v in ("baseline", "mesh")}, cfg.repeats)
        raw["pods"][enrolled] = runs
        for p in ("p50", "p99"):
            rows.append(row(f"{enrolled} enrolled pods on node1: 1000 req/s {p}", "ms", pick(runs, p),
                            added=("mesh", "baseline")))
    return {"title": "scaling: concurrent connections (closed loop) and enrolled pods per node",
            "rows": rows, "raw": raw,
            "notes": ["Enrolled pods beyond the client are idle; node1's agent holds listeners and BPF "
                      "entries for each. The first level counts the pods the bench itself enrolls on node1 "
                      "(the client pods)."]}


# --- 8: DNS through the agent's proxy ---------------------------------------------

DNS_KINDS = {"external": "external name (the proxy forwards it)",
             "service": "Service name (the agent answers it)"}


def dns(bl: BenchLab, cfg: Config) -> dict:
    from agent.dns.server import QUERY_BURST, QUERY_RATE
    if cfg.dns_warmup + cfg.dns_burst > QUERY_BURST:
        raise ValueError(f"{cfg.dns_warmup} + {cfg.dns_burst} queries exceed the proxy's burst of {QUERY_BURST:g}")
    # Before each in-flight run (either variant): time for the proxy's token
    # bucket to refill from empty to what the run takes, so no run meets the
    # limiter left over from the previous one.
    refill = (cfg.dns_warmup + cfg.dns_burst) / QUERY_RATE
    info = bl.dns_up()
    mesh_pod = PAIRS["mesh"][0]
    start = bl.dns_counters("node1", mesh_pod)["outcomes"]

    def run(variant: str, kind: str, *args: str) -> dict:
        before = bl.dns_counters("node1", mesh_pod)["outcomes"]
        res = bl.dns_query(variant, kind, *args)
        if res["errors"]:
            raise RuntimeError(f"{variant}, {kind} name: {res['errors']} wrong answers "
                               f"(first: {res['first_error']})")
        if not res["queries"]:
            raise RuntimeError(f"{variant}, {kind} name: no query answered ({res['timeouts']} timed out)")
        after = bl.dns_counters("node1", mesh_pod)["outcomes"]
        res["agent"] = {k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(before) | set(after))}
        # The mesh figures must be the proxy's: every counted query answered by
        # the agent itself (Service) or forwarded by it (external name).
        want = "local" if kind == "service" else "forwarded"
        if variant == "mesh" and res["agent"].get(want, 0) < res["queries"]:
            raise RuntimeError(f"mesh, {kind} name: the agent counted {res['agent']} for "
                               f"{res['queries']} answered queries: not all went through its proxy")
        if variant == "baseline" and any(res["agent"].values()):
            raise RuntimeError(f"baseline run moved the meshed pod's DNS counters: {res['agent']}")
        return res

    warm = ("--warmup", str(cfg.dns_warmup))

    def one_at_a_time(v: str, kind: str) -> dict:
        return run(v, kind, "--count", str(cfg.dns_queries), *warm)

    def in_flight(v: str, kind: str) -> dict:
        time.sleep(refill)
        return run(v, kind, "--count", str(cfg.dns_burst), "--concurrency", str(cfg.dns_concurrency), *warm)

    variants = ("baseline", "mesh")
    seq = {kind: alternate({v: partial(one_at_a_time, v, kind) for v in variants}, cfg.repeats) for kind in DNS_KINDS}
    conc = {kind: alternate({v: partial(in_flight, v, kind) for v in variants}, cfg.repeats) for kind in DNS_KINDS}
    limited = [(how, kind, i, r["agent"]["ratelimited"]) for how, runs in (("one at a time", seq), ("in flight", conc))
               for kind in DNS_KINDS for i, r in enumerate(runs[kind]["mesh"]) if r["agent"].get("ratelimited")]
    end = bl.dns_counters("node1", mesh_pod)["outcomes"]
    agent = {k: end.get(k, 0) - start.get(k, 0) for k in sorted(set(start) | set(end))}
    rows = []
    for kind, label in DNS_KINDS.items():
        rows += latency_rows(seq[kind], f"{label}, one at a time")
    for kind, label in DNS_KINDS.items():
        rows.append(row(f"{label}, {cfg.dns_concurrency} in flight", "queries/s", pick(conc[kind], "rate")))
        rows.append(row(f"{label}, {cfg.dns_concurrency} in flight, p99", "ms", pick(conc[kind], "p99"),
                        added=("mesh", "baseline")))
    timeouts = {v: sum(r["timeouts"] for runs in (*seq.values(), *conc.values()) for r in runs[v])
                for v in ("baseline", "mesh")}
    service_name, service_ip = info["names"]["service"]
    external_name, external_ip = info["names"]["external"]
    return {"title": "DNS: A queries through the agent's DNS proxy against straight to the cluster DNS",
            "rows": rows,
            "raw": {"sequential": seq, "concurrent": conc, "agent": agent, "timeouts": timeouts,
                    "ratelimited_runs": limited,
                    "server": info["server"], "names": info["names"]},
            "notes": [
                f"A cluster DNS stand-in (bench/dnsload.py serve, pod {info['server']} on node2, outside the "
                f"mesh) answers {service_name} with the Service's cluster IP {service_ip} (as CoreDNS would) "
                f"and {external_name} with {external_ip}. Both client pods on node1 see a resolv.conf naming "
                "it; the client (bench/dnsload.py query, dnspython-built queries on a connected UDP socket, "
                "as glibc uses) runs in the pod's container mount namespace and sends to that nameserver. "
                "baseline = plain/client: straight to the server. mesh = mesh/client: bpf/dns.c steers the "
                "query to the agent's proxy on 127.0.0.1:15053 in the pod's namespace, which answers the "
                "Service name from its cluster model and forwards the external name (a new marked socket "
                "per query, from the pod's namespace) to the pod's resolv.conf nameserver, i.e. the same "
                "server.",
                f"One at a time: {cfg.dns_queries} counted queries per run after {cfg.dns_warmup} not "
                "counted; send, wait for the reply, send the next; latency from just before send() to the "
                "reply. p50/p90/p99 are per run, each cell the median of the runs. In flight: "
                f"{cfg.dns_concurrency} sockets with one query outstanding each, {cfg.dns_burst} counted "
                "queries per run. Every reply is checked (NOERROR, exactly the expected address); a wrong "
                "answer fails the scenario.",
                f"The agent's counters for mesh/client over the scenario: {agent} (local = answered by "
                "the agent, forwarded = upstream's answer passed on; every mesh run is checked to have "
                f"gone through the proxy). Queries unanswered within 1 s (sent again, not counted): "
                f"baseline {timeouts['baseline']}, mesh {timeouts['mesh']}.",
                f"The proxy limits each pod to {QUERY_RATE:g} queries/s sustained, bursts of {QUERY_BURST:g} "
                "(agent/dns/server.py QUERY_RATE, QUERY_BURST); queries over it are dropped (counted as "
                "ratelimited above) and the client's wait for them shows as timeouts. Each in-flight run "
                f"({cfg.dns_warmup} + {cfg.dns_burst} queries) starts after a {refill:.2f} s pause (both "
                "variants) in which the bucket refills at least that many, so its queries/s is the proxy's "
                f"own speed; a pod asking more than {QUERY_RATE:g} queries/s for longer than the burst gets "
                f"{QUERY_RATE:g}/s from the mesh by design. Mesh runs that met the limiter anyway "
                f"(load, name, run, queries dropped): {limited or 'none'}.",
                "The stand-in server answers a repeated query from a cache of built answers (as CoreDNS's "
                "cache plugin does), so the baseline server is about as quick as a Python server can be; "
                "the forwarded figure includes that server's time in both variants."]}
