"""A tiny TCP peer run inside lab pods by the tests (never by the product).

serve PORT BANNER [--host H]   accept forever; each connection gets
                               "BANNER peer=IP:PORT local=IP:PORT\\n" and
                               then an echo of everything it sends
connect HOST PORT MESSAGE [--mark N] [--timeout S]
                               print the banner line and the echoed message;
                               on failure print "ERROR <errno name>" and exit 2
"""

import argparse
import errno
import socket
import sys
import threading


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
    h = sub.add_parser("chat")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("--timeout", type=float, default=10.0)
    args = p.parse_args()
    return {"serve": serve, "connect": connect, "chat": chat}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
