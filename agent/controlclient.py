"""The one client of the agent's control socket: one JSON line each way.

Used by everything that asks a node agent something: ``ambient-agent
status``, a new agent asking the running one to hand over, the lab, and the
CNI plugin. Two bounds, so that a wedged or hostile peer cannot hang or
bloat the caller:

- one deadline for the whole call (connect, send and receive together): a
  per-operation timeout would let a peer that trickles a byte now and then
  stretch the call without end;
- a limit on the reply's size: the reply is read until its newline, and a
  peer that sends more than ``max_reply`` bytes without one is cut off.

Errors keep their kind, so callers can tell "no agent here" from "an agent
that does not answer": the OSError of ``connect`` itself is raised as it is
(FileNotFoundError: no socket; ConnectionRefusedError: a socket file nobody
listens on), everything after it as ``ControlCallError`` (a
ConnectionError) and running out of time as ``ControlTimeout`` (also a
TimeoutError). Messages name the socket and say what happened, ready to be
shown to a person.

Standard library only, and cheap to import: the CNI plugin imports it on
every pod start (list it in the Makefile's CNI_SOURCES).
"""

from __future__ import annotations

import json
import socket
import time

# A status reply of a node with a few thousand pods is a few MB.
MAX_REPLY_BYTES = 16 * 1024 * 1024
_CHUNK = 65536


class ControlCallError(ConnectionError):
    """The exchange with the agent failed after connecting (the message says how)."""


class ControlTimeout(ControlCallError, TimeoutError):
    """The agent did not answer within the call's deadline."""


def call(path: str, request: dict, timeout: float, max_reply: int = MAX_REPLY_BYTES) -> dict:
    """Send ``request`` as one line to the socket at ``path``; the reply object.

    Everything happens within ``timeout`` seconds. Raises connect's OSError,
    ControlTimeout, or ControlCallError (closed without answering, a reply
    over ``max_reply`` bytes, a reply that is not one JSON object).
    """
    deadline = time.monotonic() + timeout

    def remaining(what: str) -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise ControlTimeout(f"{what} within {timeout:g} s")
        return left

    line = bytearray()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
        s.settimeout(remaining(f"connect {path}: no answer"))
        try:
            s.connect(path)
        except TimeoutError:
            raise ControlTimeout(f"connect {path}: no answer within {timeout:g} s") from None
        no_answer = f"no answer from {path}"
        try:
            s.settimeout(remaining(no_answer))
            s.sendall(json.dumps(request).encode() + b"\n")
            while True:
                s.settimeout(remaining(no_answer))
                chunk = s.recv(_CHUNK)
                if not chunk:
                    break
                end = chunk.find(b"\n")
                line += chunk if end < 0 else chunk[:end]
                if len(line) > max_reply:
                    raise ControlCallError(f"{path} sent more than {max_reply} bytes without a newline")
                if end >= 0:
                    break
        except TimeoutError:
            raise ControlTimeout(f"{no_answer} within {timeout:g} s") from None
        except ControlCallError:
            raise
        except OSError as exc:
            raise ControlCallError(f"talking to {path}: {exc.strerror or exc}") from None
    if not line.strip():
        raise ControlCallError(f"{path} closed the connection without answering")
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError):     # RecursionError: nesting deeper than ~1000
        reply = None
    if not isinstance(reply, dict):
        raise ControlCallError(f"{path} answered with something other than a JSON object: "
                               f"{bytes(line[:200])!r}")
    return reply
