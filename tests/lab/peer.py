"""A tiny TCP peer run inside lab pods by the tests (never by the product).

serve PORT BANNER [--host H]   accept forever; each connection gets
                               "BANNER peer=IP:PORT local=IP:PORT\\n" and
                               then an echo of everything it sends
connect HOST PORT MESSAGE [--mark N] [--timeout S]
                               print the banner line and the echoed message;
                               on failure print "ERROR <errno name>" and exit 2
loop HOST PORT MARKER --seconds S [--interval I]
                               new connections back to back for at most S seconds
                               or until a line on stdin says stop, each checked end
                               to end (banner, echo of MARKER-<n>); prints "started",
                               then one JSON summary with every failure
stream HOST PORT MARKER [--chunk N] [--interval I]
                               one long connection sending MARKER-numbered chunks
                               and checking every echoed byte, until a line on
                               stdin says stop; prints "started", then a JSON
                               summary: how it ended (clean, or which error, when)
sink PORT                      accept one connection, read until it ends, print one
                               JSON line: bytes read and how it ended ("eof" for a
                               FIN, else the error name, e.g. "ECONNRESET")
send HOST PORT                 connect and send until the connection fails; prints
                               "connected", then one JSON line with how it ended
"""

import argparse
import errno
import json
import socket
import sys
import threading
import time


def serve(args):
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((args.host, args.port))
    lst.listen(64)
    print("ready", flush=True)

    def handle(conn, peer):
        with conn:
            local = conn.getsockname()
            conn.sendall(f"{args.banner} peer={peer[0]}:{peer[1]} local={local[0]}:{local[1]}\n".encode())
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    while True:
        conn, peer = lst.accept()
        threading.Thread(target=handle, args=(conn, peer), daemon=True).start()


def connect(args):
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    if args.mark:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, args.mark)
    try:
        s.connect((args.host, args.port))
        f = s.makefile("rb")
        banner = f.readline().decode().strip()
        if not banner:
            raise ConnectionResetError(errno.ECONNRESET, "closed before the banner")
        s.sendall(args.message.encode())
        if args.no_half_close:
            # For peers that do not pass a half-close on (nghttpx): read the
            # echo by length, then close.
            echoed = f.read(len(args.message.encode())).decode()
        else:
            s.shutdown(socket.SHUT_WR)
            echoed = f.read().decode()
    except OSError as exc:
        name = errno.errorcode.get(exc.errno, "TIMEOUT" if isinstance(exc, TimeoutError) else str(exc))
        print(f"ERROR {name}", flush=True)
        return 2
    print(banner)
    print(echoed)
    return 0


def chat(args):
    """One long connection: each stdin line is sent, its echo printed."""
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    try:
        s.connect((args.host, args.port))
        f = s.makefile("rb")
        print(f.readline().decode().strip(), flush=True)
        for line in sys.stdin:
            s.sendall(line.encode())
            print(f.readline().decode().strip() or "EOF", flush=True)
    except OSError as exc:
        print(f"ERROR {errno.errorcode.get(exc.errno, str(exc))}", flush=True)
        return 2
    return 0


def _error_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno, "TIMEOUT" if isinstance(exc, TimeoutError) else str(exc))


def _one_checked_connection(args, message: bytes) -> None:
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(args.timeout)
        s.connect((args.host, args.port))
        f = s.makefile("rb")
        if not f.readline().strip():
            raise ConnectionResetError(errno.ECONNRESET, "closed before the banner")
        s.sendall(message)
        s.shutdown(socket.SHUT_WR)
        echoed = f.read()
        if echoed != message:
            raise ConnectionAbortedError(errno.ECONNABORTED, f"echo mismatch: {echoed[:80]!r}")


def loop(args):
    """Connections back to back; every one must complete end to end."""
    ok, failures, n, slowest = 0, [], 0, 0.0
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    started = time.time()
    good_at = []
    print("started", flush=True)
    while time.time() - started < args.seconds and not stop.is_set():
        n += 1
        at = time.time()
        try:
            _one_checked_connection(args, f"{args.marker}-{n}".encode())
            ok += 1
            good_at.append(round(at, 3))
            slowest = max(slowest, time.time() - at)
        except OSError as exc:
            failures.append({"at": round(at, 3), "error": _error_name(exc), "detail": str(exc)[:200]})
        time.sleep(args.interval)
    print(json.dumps({"ok": ok, "failures": failures, "started": started, "ended": time.time(),
                      "succeeded_at": good_at, "slowest": round(slowest, 3)}), flush=True)
    return 0


def stream(args):
    """One connection carrying numbered chunks until told to stop; every echoed byte checked."""
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(args.timeout)
    sent = 0
    started = time.time()
    result = {"started": started}
    try:
        s.connect((args.host, args.port))
        f = s.makefile("rb")
        if not f.readline().strip():
            raise ConnectionResetError(errno.ECONNRESET, "closed before the banner")
        print("started", flush=True)
        seq = 0
        while not stop.is_set():
            seq += 1
            head = f"{args.marker}-{seq:08d}:".encode()
            chunk = head + b"x" * (args.chunk - len(head))
            s.sendall(chunk)
            echoed = f.read(len(chunk))
            if len(echoed) < len(chunk):
                # A FIN in the middle of the stream: data silently lost.
                result.update(ok=False, error="EOF", at=time.time())
                break
            if echoed != chunk:
                result.update(ok=False, error="MISMATCH", at=time.time())
                break
            sent += len(chunk)
            time.sleep(args.interval)
        else:
            s.shutdown(socket.SHUT_WR)
            rest = f.read()
            result.update(ok=rest == b"", error=None if rest == b"" else "TRAILING", at=time.time())
    except OSError as exc:
        result.update(ok=False, error=_error_name(exc), at=time.time(), detail=str(exc)[:200])
    finally:
        s.close()
    result["bytes"] = sent
    print(json.dumps(result), flush=True)
    return 0


def sink(args):
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", args.port))
    lst.listen(1)
    print("ready", flush=True)
    conn, _ = lst.accept()
    got, end = 0, "eof"
    with conn:
        while True:
            try:
                data = conn.recv(1 << 20)
            except OSError as exc:
                end = _error_name(exc)
                break
            if not data:
                break
            got += len(data)
    print(json.dumps({"bytes": got, "end": end}), flush=True)


def send(args):
    s = socket.create_connection((args.host, args.port), timeout=10)
    print("connected", flush=True)
    chunk, sent, end = b"z" * 65536, 0, "closed"
    try:
        while True:
            sent += s.send(chunk)
    except OSError as exc:
        end = _error_name(exc)
    print(json.dumps({"bytes": sent, "end": end}), flush=True)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("port", type=int)
    s.add_argument("banner")
    s.add_argument("--host", default="0.0.0.0")
    c = sub.add_parser("connect")
    c.add_argument("host")
    c.add_argument("port", type=int)
    c.add_argument("message")
    c.add_argument("--mark", type=lambda v: int(v, 0), default=0)
    c.add_argument("--timeout", type=float, default=5.0)
    c.add_argument("--no-half-close", action="store_true")
    lp = sub.add_parser("loop")
    lp.add_argument("host")
    lp.add_argument("port", type=int)
    lp.add_argument("marker")
    lp.add_argument("--seconds", type=float, required=True)
    lp.add_argument("--interval", type=float, default=0.02)
    lp.add_argument("--timeout", type=float, default=10.0)
    st = sub.add_parser("stream")
    st.add_argument("host")
    st.add_argument("port", type=int)
    st.add_argument("marker")
    st.add_argument("--chunk", type=int, default=4096)
    st.add_argument("--interval", type=float, default=0.01)
    st.add_argument("--timeout", type=float, default=20.0)
    h = sub.add_parser("chat")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--timeout", type=float, default=10.0)
    sk = sub.add_parser("sink")
    sk.add_argument("port", type=int)
    sd = sub.add_parser("send")
    sd.add_argument("host")
    sd.add_argument("port", type=int)
    args = p.parse_args()
    return {"serve": serve, "connect": connect, "chat": chat, "loop": loop,
            "stream": stream, "sink": sink, "send": send}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
