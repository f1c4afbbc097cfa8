"""The application behind the hostile suite's pods (run inside a lab pod).

serve PORT COUNT_FILE   accept forever; each connection gets a banner line
                        ("app peer=IP:PORT local=IP:PORT") and then an echo
                        of what it sends. Every accept appends one byte to
                        COUNT_FILE, so the test can tell how many connections
                        the agent really opened to the application.

One thread, ``selectors``: it holds thousands of idle connections cheaply.
"""

import os
import selectors
import socket
import sys


def serve(port: int, count_file: str) -> None:
    counter = os.open(count_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    lst = socket.socket()
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind(("0.0.0.0", port))
    lst.listen(4096)
    lst.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(lst, selectors.EVENT_READ)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            if sock is lst:
                while True:
                    try:
                        conn, peer = lst.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    os.write(counter, b"x")
                    local = conn.getsockname()
                    try:
                        conn.send(f"app peer={peer[0]}:{peer[1]} local={local[0]}:{local[1]}\n".encode())
                    except OSError:
                        conn.close()
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                continue
            try:
                data = sock.recv(65536)
            except OSError:
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


if __name__ == "__main__":
    serve(int(sys.argv[2]), sys.argv[3]) if sys.argv[1] == "serve" else sys.exit(f"usage: {__doc__}")
