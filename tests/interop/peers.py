"""Independent HBONE peers for interop tests (test-only; no product code).

Peers:

* :func:`nghttpx_hbone_server` -- nghttpx ``--http2-proxy`` terminating mTLS 1.3
  (ALPN h2, client certificate verified against a CA), forwarding each HTTP/2
  CONNECT as an HTTP/1 CONNECT to a private tinyproxy, which dials the target.
  nghttpx only checks the client chain (no SAN authorisation) and never passes
  a client's half-close (END_STREAM) on: through it, close the stream or the
  session yourself once you have read what you expect.
* :func:`node_hbone_server` -- Node's http2 server (``node_hbone_server.js``):
  mTLS 1.3, logs the client's SPIFFE SAN and the HBONE headers per stream,
  propagates half-close both ways.
* :func:`node_hbone_client` -- Node's http2 client (``node_hbone_client.js``),
  run to completion; returns its JSON result.
* :func:`echo_server` -- threaded TCP echo in *this* process, recording peers.

Every process is started through ``spawn(argv, **popen_kwargs) -> Popen``
(default :class:`subprocess.Popen`).  Product tests pass a function that starts
the process inside a lab pod's network namespace, e.g.
``functools.partial(lab.exec, "default/client")``.  ``spawn`` must return the
Popen of the peer process itself (exec it, no wrapping shell): it is stopped
through that handle only (terminate, wait, kill).  The peers are single
processes (nghttpx runs with ``--single-process``, tinyproxy with ``-d``).

Readiness never needs a connection from the test process: servers are ready
when their own log says so (nghttpx "Listening on", tinyproxy "Starting main
loop", node ``{"ready": PORT}``), so this works for peers in any namespace.
The log/temp files live in a fresh directory removed on exit; the spawned
process must share the test's filesystem (network namespaces do).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from .certs import CertFiles

__all__ = [
    "HERE", "NODE", "NGHTTPX", "TINYPROXY", "Spawn",
    "free_port", "hostport", "echo_server", "EchoServer",
    "nghttpx_hbone_server", "NghttpxServer",
    "node_hbone_server", "NodeServer", "node_hbone_client",
    "PeerStartError",
]

HERE = Path(__file__).resolve().parent
NODE_CLIENT_JS = str(HERE / "node_hbone_client.js")
NODE_SERVER_JS = str(HERE / "node_hbone_server.js")
NODE = os.environ.get("NODE") or shutil.which("node") or "node"
NGHTTPX = shutil.which("nghttpx") or "/usr/sbin/nghttpx"
TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"

Spawn = Callable[..., subprocess.Popen]


class PeerStartError(RuntimeError):
    """A peer exited or did not report readiness in time; carries its log."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` in this network namespace."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def hostport(host: str, port: int) -> str:
    """``ip:port``, with brackets for IPv6 (the HBONE ``:authority`` form)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stop(proc: subprocess.Popen | None, timeout: float = 5.0) -> None:
    if proc is None or proc.poll() is not None:
        if proc is not None:
            proc.wait()
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _wait_for_log(proc: subprocess.Popen, path: Path, pattern: str, timeout: float,
                  what: str, extra_logs: Sequence[Path] = ()) -> re.Match:
    rx = re.compile(pattern, re.M)
    deadline = time.monotonic() + timeout
    while True:
        text = _read(path)
        m = rx.search(text)
        if m:
            return m
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.poll() is not None else f"not ready in {timeout}s"
            logs = "\n".join(f"--- {p.name}\n{_read(p)}" for p in (path, *extra_logs))
            raise PeerStartError(f"{what} {state}\n{logs}")
        time.sleep(0.02)


# --------------------------------------------------------------------------- echo


@dataclass
class EchoServer:
    host: str
    port: int
    peers: list = field(default_factory=list)      # (ip, port) of each accepted connection
    received: list = field(default_factory=list)   # bytes received, one entry per connection

    @property
    def address(self) -> str:
        return hostport(self.host, self.port)


@contextlib.contextmanager
def echo_server(host: str = "127.0.0.1", port: int = 0) -> Iterator[EchoServer]:
    """TCP echo (exact bytes, no banner) in this process; a peer's FIN is echoed as FIN."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lst.bind((host, port))
    lst.listen(64)
    lst.settimeout(0.1)
    srv = EchoServer(host, lst.getsockname()[1])
    stop = threading.Event()
    conns: list[socket.socket] = []
    threads: list[threading.Thread] = []
    lock = threading.Lock()

    def handle(conn: socket.socket, index: int) -> None:
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    conn.shutdown(socket.SHUT_WR)
                    return
                with lock:
                    srv.received[index] += data
                conn.sendall(data)
        except OSError:
            return

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, peer = lst.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            conn.settimeout(None)
            with lock:
                srv.peers.append(peer[:2])
                srv.received.append(b"")
                conns.append(conn)
                index = len(srv.received) - 1
            t = threading.Thread(target=handle, args=(conn, index), daemon=True)
            threads.append(t)
            t.start()

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield srv
    finally:
        stop.set()
        acceptor.join(2)
        lst.close()
        with lock:
            for c in conns:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                c.close()
        for t in threads:
            t.join(2)


# --------------------------------------------------------------------------- nghttpx


@dataclass
class NghttpxServer:
    host: str
    port: int
    backend_port: int          # tinyproxy's port on 127.0.0.1 (in the peer's namespace)
    dir: Path
    nghttpx: subprocess.Popen
    tinyproxy: subprocess.Popen

    def nghttpx_log(self) -> str:
        return _read(self.dir / "nghttpx.log")

    def access_log(self) -> str:
        return _read(self.dir / "access.log")

    def tinyproxy_log(self) -> str:
        return _read(self.dir / "tinyproxy.log")

    def log(self) -> str:
        return (f"--- nghttpx\n{self.nghttpx_log()}--- access\n{self.access_log()}"
                f"--- tinyproxy\n{self.tinyproxy_log()}")


def tinyproxy_conf(port: int, logfile: str, pidfile: str, target_ports: Iterable[int]) -> str:
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Allow 127.0.0.1",
        "Timeout 600",
        "MaxClients 100",
        f'LogFile "{logfile}"',
        "LogLevel Info",
        f'PidFile "{pidfile}"',
        "DisableViaHeader Yes",
    ]
    # no ConnectPort line at all = CONNECT to any port
    lines += [f"ConnectPort {int(p)}" for p in target_ports]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def nghttpx_hbone_server(cert_files: CertFiles, client_ca_path: str,
                         listen: tuple[str, int] = ("0.0.0.0", 15008),
                         target_ports: Iterable[int] = (), *,
                         spawn: Spawn = subprocess.Popen, backend_port: int | None = None,
                         ready_timeout: float = 10.0,
                         extra_args: Sequence[str] = ()) -> Iterator[NghttpxServer]:
    """nghttpx (HTTP/2 CONNECT over mTLS 1.3) in front of a private tinyproxy.

    ``target_ports``: the ports tinyproxy may CONNECT to (empty = any).
    ``backend_port``: tinyproxy's port on 127.0.0.1 where the peers run; by
    default a port free in *this* namespace (fine for a fresh pod namespace).
    Ready when nghttpx logs "Listening on" (no probe from the test process).
    """
    tmp = Path(tempfile.mkdtemp(prefix="hbone-nghttpx-"))
    ng = tp = None
    try:
        backend_port = backend_port or free_port()
        conf = tmp / "tinyproxy.conf"
        conf.write_text(tinyproxy_conf(backend_port, str(tmp / "tinyproxy.log"),
                                       str(tmp / "tinyproxy.pid"), target_ports))
        with open(tmp / "tinyproxy.out", "wb") as out:
            tp = spawn([TINYPROXY, "-d", "-c", str(conf)], stdin=subprocess.DEVNULL,
                       stdout=out, stderr=subprocess.STDOUT)
        _wait_for_log(tp, tmp / "tinyproxy.log", r"Starting main loop", ready_timeout,
                      "tinyproxy", [tmp / "tinyproxy.out"])

        host, port = listen
        argv = [
            NGHTTPX, "--conf=/dev/null", "--single-process", "--http2-proxy",
            f"--frontend={host},{port}",
            f"--backend=127.0.0.1,{backend_port}",
            "--verify-client", f"--verify-client-cacert={client_ca_path}",
            "--tls-min-proto-version=TLSv1.3", "--tls-max-proto-version=TLSv1.3",
            "--npn-list=h2", "--no-ocsp",
            f"--accesslog-file={tmp / 'access.log'}",
            '--accesslog-format=$remote_addr "$request" $status $alpn $ssl_protocol',
            *extra_args,
            cert_files.key_path, cert_files.chain_path,
        ]
        with open(tmp / "nghttpx.log", "wb") as out:
            ng = spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        _wait_for_log(ng, tmp / "nghttpx.log", r"Listening on .*, tls", ready_timeout,
                      "nghttpx", [tmp / "tinyproxy.log"])
        yield NghttpxServer(host, port, backend_port, tmp, ng, tp)
    finally:
        _stop(ng)
        _stop(tp)
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- node


@dataclass
class NodeServer:
    host: str
    port: int
    dir: Path
    proc: subprocess.Popen

    def log(self) -> str:
        """stdout (JSON lines) and stderr of the server."""
        return _read(self.dir / "server.out") + _read(self.dir / "server.err")

    def records(self) -> list[dict]:
        """Parsed stdout lines except ``{"ready": ...}``: stream records and tls_error lines."""
        out = []
        for line in _read(self.dir / "server.out").splitlines():
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if "ready" not in obj:
                    out.append(obj)
        return out

    def streams(self) -> list[dict]:
        return [r for r in self.records() if "authority" in r]

    def wait_records(self, n: int, timeout: float = 5.0, key: str = "authority") -> list[dict]:
        """Wait until at least ``n`` records containing ``key`` were logged."""
        deadline = time.monotonic() + timeout
        while True:
            recs = [r for r in self.records() if key in r]
            if len(recs) >= n or time.monotonic() > deadline:
                return recs
            time.sleep(0.02)


@contextlib.contextmanager
def node_hbone_server(cert_files: CertFiles, client_ca_path: str,
                      listen: tuple[str, int] = ("0.0.0.0", 15008), *,
                      allow_prefixes: Iterable[str] = (), spawn: Spawn = subprocess.Popen,
                      ready_timeout: float = 10.0) -> Iterator[NodeServer]:
    """Node's HBONE server; ``listen`` port 0 picks one (see ``.port``)."""
    tmp = Path(tempfile.mkdtemp(prefix="hbone-node-"))
    proc = None
    try:
        host, port = listen
        argv = [NODE, NODE_SERVER_JS, "--listen", hostport(host, port),
                "--ca", client_ca_path, "--cert", cert_files.chain_path, "--key", cert_files.key_path]
        for p in allow_prefixes:
            argv += ["--allow-prefix", p]
        with open(tmp / "server.out", "wb") as out, open(tmp / "server.err", "wb") as err:
            proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        m = _wait_for_log(proc, tmp / "server.out", r'^\{"ready":(\d+)\}', ready_timeout,
                          "node_hbone_server", [tmp / "server.err"])
        yield NodeServer(host, int(m.group(1)), tmp, proc)
    finally:
        _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


def node_hbone_client(connect: tuple[str, int] | str, authority: str, ca_path: str,
                      cert_files: CertFiles | None = None, *, expect_san: str | None = None,
                      message: str | None = None, read_bytes: int | None = None,
                      timeout_ms: int = 5000, forwarded: str | None = None,
                      baggage: str | None = None, traceparent: str | None = None,
                      spawn: Spawn = subprocess.Popen) -> dict:
    """Run the Node HBONE client once; its JSON result plus ``returncode`` and ``stderr``.

    ``returncode``: 0 = status 200, 1 = another status, 2 = TLS/connection
    error or timeout (``error`` says which), None = it had to be killed.
    ``cert_files=None`` sends no client certificate.
    """
    target = connect if isinstance(connect, str) else hostport(*connect)
    argv = [NODE, NODE_CLIENT_JS, "--connect", target, "--authority", authority,
            "--ca", ca_path, "--timeout-ms", str(timeout_ms)]
    if cert_files is not None:
        argv += ["--cert", cert_files.chain_path, "--key", cert_files.key_path]
    for flag, value in (("--expect-san", expect_san), ("--message", message),
                        ("--read-bytes", read_bytes), ("--forwarded", forwarded),
                        ("--baggage", baggage), ("--traceparent", traceparent)):
        if value is not None:
            argv += [flag, str(value)]
    proc = spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout_ms / 1000 + 5)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        return {"error": "node_hbone_client did not exit", "returncode": None, "stderr": err}
    lines = out.strip().splitlines()
    try:
        result = json.loads(lines[-1])
    except (IndexError, ValueError):
        result = {"error": f"no JSON result: {out!r}"}
    result["returncode"] = proc.returncode
    result["stderr"] = err
    return result
