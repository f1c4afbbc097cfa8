"""The benchmark's own load generator and echo server (stdlib only).

Run inside lab pods by ``bench/run.py`` (never by the product). One
process, one thread, ``selectors`` underneath: no GIL hand-offs between
threads distort the latencies it records. Its own ceiling is measured by
``bench/run.py`` straight over loopback (no capture, no mesh) and printed
next to every result, so a mesh number close to that ceiling is read as
"limited by the client", not as the mesh's figure.

Subcommands (each prints one JSON object on stdout when done):

serve PORT            echo server: every byte received is sent back
rr HOST PORT          request/response with fixed-size messages on
                      persistent connections. ``--rate R`` (open loop):
                      requests are scheduled every 1/R s round-robin over
                      the connections, independent of replies (a slow reply
                      does not delay the next request), and latency is
                      measured from the actual send; ``--rate 0`` (closed loop):
                      each connection keeps one request outstanding.
cps HOST PORT         new connections: connect, one exchange, close,
                      ``--concurrency`` at a time; reports connect latency
                      (connect() until writable) and the whole exchange.
                      ``--rate R`` (R > 0): a new connection every 1/R s,
                      still at most ``--concurrency`` at a time (a start
                      that finds them all busy is counted as ``late``).
idle HOST PORT        open ``--conns`` connections, do one exchange on each,
                      print {"ready": N}, then hold them until stdin closes.
"""

from __future__ import annotations

import argparse
import collections
import errno
import json
import os
import selectors
import socket
import sys
import time


def percentiles(values: list[float], points=(50, 90, 99)) -> dict:
    """Nearest-rank percentiles in milliseconds (values are seconds)."""
    if not values:
        return {f"p{p}": None for p in points}
    s = sorted(values)
    out = {}
    for p in points:
        rank = max(0, min(len(s) - 1, int(round(p / 100.0 * len(s) + 0.5)) - 1))
        out[f"p{p}"] = s[rank] * 1000.0
    return out


# --- server -----------------------------------------------------------------

def serve(args) -> int:
    lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((args.host, args.port))
    lst.listen(4096)
    lst.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ, None)
    print(json.dumps({"ready": True, "port": args.port}), flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is lst:
                while True:
                    try:
                        conn, _peer = lst.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:   # EMFILE and the like: keep serving the others
                        if exc.errno in (errno.EMFILE, errno.ENFILE):
                            break
                        raise
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    # Blocking sends: an echo reply is small and our clients always read.
                    conn.setblocking(True)
                    sel.register(conn, selectors.EVENT_READ, None)
                continue
            try:
                data = sock.recv(262144)
            except (ConnectionResetError, OSError):
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                continue
            try:
                sock.sendall(data)
            except OSError:
                sel.unregister(sock)
                sock.close()


# --- request/response ---------------------------------------------------------

def _connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    s = socket.create_connection((host, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    s.settimeout(None)
    return s


def rr(args) -> int:
    size = args.size
    payload = os.urandom(size)
    socks = [_connect(args.host, args.port) for _ in range(args.conns)]
    sel = selectors.DefaultSelector()
    state = {}
    for i, s in enumerate(socks):
        state[s.fileno()] = {"sock": s, "got": 0, "pending": collections.deque()}
        sel.register(s, selectors.EVENT_READ, s.fileno())
    lat: list[float] = []
    now = time.perf_counter()
    start = now
    measure_from = start + args.warmup
    end = measure_from + args.duration
    done = 0
    sent = 0
    closed_loop = args.rate <= 0
    interval = 1.0 / args.rate if not closed_loop else 0.0
    next_send = start
    rr_index = 0
    errors = 0
    if closed_loop:
        for st in state.values():
            st["pending"].append(time.perf_counter())
            st["sock"].sendall(payload)
            sent += 1
    while True:
        now = time.perf_counter()
        if now >= end:
            break
        if not closed_loop:
            while next_send <= now:
                st = state[socks[rr_index].fileno()]
                # Latency counts from the actual send: epoll's millisecond
                # timeout makes a send up to 1 ms late, which is the client's
                # artefact, not the path's. Sends stay on the fixed schedule
                # (open loop), independent of replies.
                st["pending"].append(time.perf_counter())
                st["sock"].sendall(payload)
                sent += 1
                next_send += interval
                rr_index = (rr_index + 1) % len(socks)
            timeout = max(0.0, min(next_send, end) - time.perf_counter())
        else:
            timeout = max(0.0, end - now)
        for key, _ in sel.select(timeout):
            st = state[key.data]
            try:
                data = st["sock"].recv(262144)
            except OSError:
                data = b""
            if not data:
                errors += 1
                sel.unregister(st["sock"])
                continue
            st["got"] += len(data)
            t = time.perf_counter()
            while st["got"] >= size and st["pending"]:
                st["got"] -= size
                t0 = st["pending"].popleft()
                if t0 >= measure_from:
                    lat.append(t - t0)
                    done += 1
                if closed_loop and t < end:
                    st["pending"].append(time.perf_counter())
                    st["sock"].sendall(payload)
                    sent += 1
    elapsed = time.perf_counter() - measure_from
    for s in socks:
        s.close()
    out = {"requests": done, "seconds": elapsed, "rate": done / elapsed if elapsed > 0 else 0.0,
           "conns": args.conns, "target_rate": args.rate, "size": size, "errors": errors,
           "outstanding_at_end": sum(len(st["pending"]) for st in state.values())}
    out.update(percentiles(lat))
    print(json.dumps(out), flush=True)
    return 0


# --- new connections ------------------------------------------------------------

def cps(args) -> int:
    size = args.size
    payload = os.urandom(size)
    sel = selectors.DefaultSelector()
    connect_lat: list[float] = []
    total_lat: list[float] = []
    start = time.perf_counter()
    measure_from = start + args.warmup
    end = measure_from + args.duration
    errors = 0
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET

    in_flight = [0]

    def launch() -> None:
        in_flight[0] += 1
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        t0 = time.perf_counter()
        rc = s.connect_ex((args.host, args.port))
        if rc not in (0, errno.EINPROGRESS):
            s.close()
            raise OSError(rc, os.strerror(rc))
        sel.register(s, selectors.EVENT_WRITE, {"t0": t0, "tc": None, "got": 0})

    paced = args.rate > 0
    interval = 1.0 / args.rate if paced else 0.0
    next_launch = start
    late = 0
    replace = (lambda: None) if paced else launch     # paced: the schedule starts the next one

    def start_paced() -> None:
        nonlocal next_launch, late
        now = time.perf_counter()
        while next_launch <= now:
            next_launch += interval
            if in_flight[0] < args.concurrency:
                launch()
            else:
                late += 1

    if not paced:
        for _ in range(args.concurrency):
            launch()
    while time.perf_counter() < end:
        if paced:
            start_paced()
            wait = max(0.0, min(next_launch, end) - time.perf_counter())
        else:
            wait = max(0.0, end - time.perf_counter())
        for key, _ in sel.select(wait):
            s, st = key.fileobj, key.data
            now = time.perf_counter()
            if st["tc"] is None:
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    errors += 1
                    sel.unregister(s)
                    s.close()
                    in_flight[0] -= 1
                    replace()
                    continue
                st["tc"] = now
                s.send(payload)          # 1 KB into an empty send buffer: never partial
                sel.modify(s, selectors.EVENT_READ, st)
                continue
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                errors += 1
                sel.unregister(s)
                s.close()
                in_flight[0] -= 1
                replace()
                continue
            st["got"] += len(data)
            if st["got"] >= size:
                sel.unregister(s)
                s.close()
                in_flight[0] -= 1
                if st["t0"] >= measure_from:
                    connect_lat.append(st["tc"] - st["t0"])
                    total_lat.append(now - st["t0"])
                replace()
    elapsed = time.perf_counter() - measure_from
    out = {"connections": len(total_lat), "seconds": elapsed,
           "rate": len(total_lat) / elapsed if elapsed > 0 else 0.0,
           "concurrency": args.concurrency, "errors": errors, "target_rate": args.rate, "late": late,
           "connect": percentiles(connect_lat), "exchange": percentiles(total_lat)}
    print(json.dumps(out), flush=True)
    return 0


# --- idle connections -----------------------------------------------------------

def idle(args) -> int:
    payload = b"x" * args.size
    socks = []
    for _ in range(args.conns):
        s = _connect(args.host, args.port)
        s.sendall(payload)
        got = 0
        while got < args.size:
            chunk = s.recv(65536)
            if not chunk:
                raise ConnectionError("closed during the first exchange")
            got += len(chunk)
        socks.append(s)
    print(json.dumps({"ready": len(socks)}), flush=True)
    sys.stdin.read()          # hold until the harness closes our stdin
    for s in socks:
        s.close()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("--host", default="0.0.0.0")
    for name in ("rr", "cps", "idle"):
        c = sub.add_parser(name)
        c.add_argument("host")
        c.add_argument("port", type=int)
        c.add_argument("--size", type=int, default=1024)
        c.add_argument("--duration", type=float, default=5.0)
        c.add_argument("--warmup", type=float, default=0.5)
        c.add_argument("--conns", type=int, default=1)
        c.add_argument("--rate", type=float, default=0.0)
        c.add_argument("--concurrency", type=int, default=1)
    args = p.parse_args(argv)
    return {"serve": serve, "rr": rr, "cps": cps, "idle": idle}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
