"""The control-socket client (agent/controlclient.py, behind agent.control.request):
one deadline for the whole call and a reply size limit, against real Unix
sockets that misbehave."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import threading
import time
from typing import Callable

import pytest

from agent import control, controlclient
from agent.controlclient import ControlCallError, ControlTimeout


@pytest.fixture
def sock_dir():
    # Short: a Unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    directory = tempfile.mkdtemp(prefix="ctl-", dir="/tmp")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@contextlib.contextmanager
def peer(path: str, behave: Callable[[socket.socket, threading.Event], None]):
    """A Unix socket server at ``path`` that treats each connection with ``behave``."""
    stop = threading.Event()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(8)
    server.settimeout(0.05)
    conns: list[socket.socket] = []

    def serve():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (socket.timeout, OSError):
                continue
            conns.append(conn)
            threading.Thread(target=_run, args=(behave, conn, stop), daemon=True).start()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        server.close()
        for conn in conns:
            conn.close()


def _run(behave, conn, stop):
    try:
        behave(conn, stop)
    except OSError:
        pass            # the client went away, as it should
    finally:
        conn.close()


def _read_line(conn: socket.socket) -> bytes:
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


def never_answers(conn, stop):
    _read_line(conn)
    stop.wait(30)


def trickles(conn, stop):
    # One byte every 50 ms and never a newline: each recv succeeds well within
    # a per-operation timeout, so only a deadline for the whole call ends it.
    _read_line(conn)
    while not stop.wait(0.05):
        conn.sendall(b" ")


def floods(conn, stop):
    _read_line(conn)
    block = b"x" * 65536
    while not stop.is_set():
        conn.sendall(block)


def answers(reply: bytes):
    def behave(conn, stop):
        _read_line(conn)
        conn.sendall(reply)
    return behave


def closes(conn, stop):
    _read_line(conn)


@pytest.mark.parametrize("behave, timeout, error, message", [
    (never_answers, 0.5, ControlTimeout, "no answer from {path} within 0.5 s"),
    (trickles, 0.5, ControlTimeout, "no answer from {path} within 0.5 s"),
    (closes, 5.0, ControlCallError, "{path} closed the connection without answering"),
    (answers(b"[1, 2]\n"), 5.0, ControlCallError, "answered with something other than a JSON object"),
    (answers(b"{not json\n"), 5.0, ControlCallError, "answered with something other than a JSON object"),
    (answers(b"[" * 100000 + b"\n"), 5.0, ControlCallError, "something other than a JSON object"),
])
def test_a_misbehaving_agent_ends_the_call_with_a_specific_error(sock_dir, behave, timeout, error, message):
    path = os.path.join(sock_dir, "agent.sock")
    with peer(path, behave):
        start = time.monotonic()
        with pytest.raises(error) as caught:
            control.request(path, {"op": "status"}, timeout)
        took = time.monotonic() - start
    assert message.format(path=path) in str(caught.value)
    assert took < timeout + 1.0
    if error is ControlTimeout:
        assert took >= timeout - 0.05
        assert isinstance(caught.value, TimeoutError) and isinstance(caught.value, OSError)


def test_a_reply_over_the_limit_is_cut_off(sock_dir):
    path = os.path.join(sock_dir, "agent.sock")
    with peer(path, floods):
        with pytest.raises(ControlCallError, match=r"sent more than 100000 bytes without a newline"):
            control.request(path, {"op": "status"}, 5.0, max_reply=100_000)
        # The default limit holds too (16 MiB): the call ends, it does not grow forever.
        start = time.monotonic()
        with pytest.raises(ControlCallError, match=f"sent more than {controlclient.MAX_REPLY_BYTES} bytes"):
            control.request(path, {"op": "status"}, 30.0)
        assert time.monotonic() - start < 30


def test_a_long_line_with_its_newline_in_the_same_read_is_still_over_the_limit(sock_dir):
    path = os.path.join(sock_dir, "agent.sock")
    with peer(path, answers(b'{"pad": "' + b"y" * 5000 + b'"}\n')):
        with pytest.raises(ControlCallError, match="more than 1000 bytes"):
            control.request(path, {"op": "status"}, 5.0, max_reply=1000)
        assert control.request(path, {"op": "status"}, 5.0, max_reply=6000) == {"pad": "y" * 5000}


def test_a_good_answer_is_returned_and_only_its_first_line_counts(sock_dir):
    path = os.path.join(sock_dir, "agent.sock")
    with peer(path, answers(b'{"ok": true, "pid": 7}\n{"ignored": 1}\n')):
        assert control.request(path, {"op": "status"}, 5.0) == {"ok": True, "pid": 7}


def test_no_agent_keeps_connects_own_error(sock_dir):
    # The daemon tells "no agent" (no socket, or nobody listening) from a
    # wedged agent by these exceptions.
    path = os.path.join(sock_dir, "agent.sock")
    with pytest.raises(FileNotFoundError):
        control.request(path, {"op": "status"}, 1.0)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(path)
    dead.close()                        # the file stays, nobody listens
    with pytest.raises(ConnectionRefusedError):
        control.request(path, {"op": "status"}, 1.0)


def test_connect_to_an_agent_that_never_accepts_fails_at_once(sock_dir):
    # A Unix socket whose accept queue is full refuses a connect with a
    # timeout (a non-blocking one underneath) at once, EAGAIN: connect never
    # waits, and the daemon takes the error for a wedged agent (OSError).
    path = os.path.join(sock_dir, "agent.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(0)
    queued = []
    try:
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            queued.append(s)
            try:
                s.connect(path)
            except BlockingIOError:
                break
        start = time.monotonic()
        with pytest.raises(BlockingIOError):
            control.request(path, {"op": "status"}, 5.0)
        assert time.monotonic() - start < 1.0
    finally:
        for s in queued:
            s.close()
        server.close()
