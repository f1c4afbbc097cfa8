"""Stand-ins for what surrounds the ambient-cni plugin on a node, shared by
its tests (tests/unit/test_cni_*.py) and ``bench/cni_start.py``.

Here rather than in a test module so that bench/ imports no test module.
Never used by the product.
"""

from __future__ import annotations

import json
import socket
import threading

# A flannel conflist as flannel's DaemonSet writes it (the primary plugin
# ambient-cni is chained into), as the bytes found on disk.
FLANNEL = json.dumps({"name": "cbr0", "cniVersion": "0.3.1", "plugins": [
    {"type": "flannel", "delegate": {"hairpinMode": True, "isDefaultGateway": True}},
    {"type": "portmap", "capabilities": {"portMappings": True}}]}, indent=2).encode()

# The result of the plugins before ambient-cni in the chain (CNI 1.0.0).
PREV_100 = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "aa:00:00:00:00:01"},
                           {"name": "veth1", "mac": "aa:00:00:00:00:02"},
                           {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/run/netns/p1"}],
            "ips": [{"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}

AMBIENT = {"istio.io/dataplane-mode": "ambient"}
ENROLLED = {"ok": True, "enrolled": True, "reason": "namespace mesh labelled istio.io/dataplane-mode=ambient"}


class FakeAgent:
    """Answers one JSON line per connection like the node agent; records requests.

    ``reply`` is a dict or a function of the request; ``raw`` bytes are sent
    instead when given; ``answer=False`` reads the request and then holds the
    connection open without a word (a hung agent).
    """

    def __init__(self, path: str, reply=ENROLLED, raw: bytes | None = None, answer: bool = True) -> None:
        self.reply = reply if callable(reply) else (lambda req: reply)
        self.raw = raw
        self.answer = answer
        self.requests: list = []
        self.held: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(16)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return                          # closed by close()
            line = conn.makefile("rb").readline()
            try:
                request = json.loads(line)
            except ValueError:
                request = line
            self.requests.append(request)
            if not self.answer:
                self.held.append(conn)
                continue
            try:
                conn.sendall(self.raw if self.raw is not None else json.dumps(self.reply(request)).encode() + b"\n")
            except OSError:
                pass                            # the plugin gave up waiting
            conn.close()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept()
        self.listener.close()
        self.thread.join(5)
        for conn in self.held:
            conn.close()
