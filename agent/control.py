"""The agent's control socket: requests from the CNI plugin and from operators.

Protocol (docs/ARCHITECTURE.md): one JSON object per line each way over a
Unix stream socket that only root may use. ``parse_request`` is the pure,
table-tested part; ``ControlServer`` is the socket shell around it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from agent import boundedjson, controlclient

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024
REQUEST_TIMEOUT_SECONDS = 5.0
# Every request is a flat object of strings and lists of strings (depth 2);
# deeper nesting or long numbers are refused before json parses them
# (agent/boundedjson.py: a RecursionError used to escape, issue 11).
MAX_REQUEST_DEPTH = 8
MAX_REQUEST_DIGITS = 32


class ProtocolError(ValueError):
    """A request that cannot be understood; the message says why."""


@dataclass(frozen=True)
class CniAdd:
    namespace: str
    name: str
    uid: str
    container_id: str
    netns: str
    interface: str
    ips: tuple[str, ...]          # plain addresses, prefix length dropped
    gateways: tuple[str, ...]


@dataclass(frozen=True)
class CniDel:
    namespace: str
    name: str
    uid: str
    container_id: str


@dataclass(frozen=True)
class StatusRequest:
    pass


@dataclass(frozen=True)
class Handover:
    """A new agent on this node asks the running one to hand the node over.

    ``pid`` is the requester's process id as the kernel reports it
    (SO_PEERCRED), never a value from the request: the running agent watches
    that process to know whether the takeover is still coming.
    """
    pid: int = 0


Request = CniAdd | CniDel | StatusRequest | Handover


def _text(obj: dict, key: str, required: bool = True) -> str:
    value = obj.get(key, "")
    if not isinstance(value, str):
        raise ProtocolError(f"field {key!r} must be a string, got {type(value).__name__}")
    if required and not value:
        raise ProtocolError(f"field {key!r} is required")
    if len(value) > 4096 or "\x00" in value:
        raise ProtocolError(f"field {key!r} is not a plausible value")
    return value


def _addresses(obj: dict, key: str) -> tuple[str, ...]:
    values = obj.get(key, [])
    if not isinstance(values, list):
        raise ProtocolError(f"field {key!r} must be a list of addresses")
    out = []
    for value in values:
        if not isinstance(value, str):
            raise ProtocolError(f"field {key!r} holds a non-string {value!r}")
        try:
            out.append(str(ipaddress.ip_interface(value).ip))
        except ValueError:
            raise ProtocolError(f"field {key!r}: {value!r} is not an IP address") from None
    return tuple(out)


def parse_request(line: bytes) -> Request:
    """Decode one request line into a typed request, or raise ProtocolError."""
    try:
        obj = boundedjson.loads(line, max_bytes=MAX_REQUEST_BYTES, max_depth=MAX_REQUEST_DEPTH,
                                max_digits=MAX_REQUEST_DIGITS)
    except boundedjson.JsonLimitError as exc:
        raise ProtocolError(f"request refused: {exc}") from None
    except boundedjson.JsonError as exc:
        raise ProtocolError(f"request is not JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("request must be a JSON object")
    op = obj.get("op")
    if op == "cni-add":
        netns = _text(obj, "netns")
        if not netns.startswith("/"):
            raise ProtocolError(f"field 'netns' must be an absolute path, got {netns!r}")
        ips = _addresses(obj, "ips")
        if not ips:
            raise ProtocolError("field 'ips' is required: the pod has no address to capture")
        return CniAdd(
            namespace=_text(obj, "namespace"), name=_text(obj, "name"),
            uid=_text(obj, "uid", required=False), container_id=_text(obj, "container_id", required=False),
            netns=netns, interface=_text(obj, "interface", required=False) or "eth0",
            ips=ips, gateways=_addresses(obj, "gateways"),
        )
    if op == "cni-del":
        return CniDel(namespace=_text(obj, "namespace"), name=_text(obj, "name"),
                      uid=_text(obj, "uid", required=False),
                      container_id=_text(obj, "container_id", required=False))
    if op == "status":
        return StatusRequest()
    if op == "handover":
        return Handover()
    raise ProtocolError(f"unknown op {op!r} (expected cni-add, cni-del, status or handover)")


Handler = Callable[[Request], Awaitable[dict[str, Any]]]


def _peer_creds(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, from the kernel."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", creds)
    return pid, uid


@dataclass
class ControlServer:
    path: str
    handler: Handler
    _server: asyncio.AbstractServer | None = field(default=None, init=False)
    # (st_dev, st_ino) of the socket file this server bound: whether the path
    # still names it is how an agent learns that another one took the node.
    _bound: tuple[int, int] | None = field(default=None, init=False)

    async def start(self) -> None:
        os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            # A previous agent's socket. Either nobody listens on it any more,
            # or that agent is handing the node over to this one and waits
            # for exactly this replacement (docs/ARCHITECTURE.md, "Agent upgrade").
            os.unlink(self.path)
        old_umask = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(
                self._serve, path=self.path, limit=MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        st = os.stat(self.path)
        self._bound = (st.st_dev, st.st_ino)

    def path_state(self) -> str:
        """What the socket path names now: ``ours``, ``missing`` or ``replaced``
        (``unbound`` before ``start``)."""
        if self._bound is None:
            return "unbound"
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return "missing"
        return "ours" if (st.st_dev, st.st_ino) == self._bound else "replaced"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            pid, uid = _peer_creds(sock)
            if uid != 0:
                log.warning("control socket: refused a request from uid %d (root only)", uid)
                await self._reply(writer, {"ok": False, "error": "only root may use the agent socket"})
                return
            try:
                line = await asyncio.wait_for(reader.readline(), REQUEST_TIMEOUT_SECONDS)
            except TimeoutError:
                await self._reply(writer, {"ok": False, "error": "no request within 5 s"})
                return
            except (asyncio.LimitOverrunError, ValueError):
                await self._reply(writer, {"ok": False, "error": f"request longer than {MAX_REQUEST_BYTES} bytes"})
                return
            if not line.strip():
                return
            try:
                request = parse_request(line)
            except ProtocolError as exc:
                log.warning("control socket: bad request: %s", exc)
                await self._reply(writer, {"ok": False, "error": str(exc)})
                return
            if isinstance(request, Handover):
                request = Handover(pid=pid)
            try:
                response = await self.handler(request)
            except Exception as exc:  # one bad request never takes the agent down
                log.exception("control socket: %s failed", type(request).__name__)
                response = {"ok": False, "error": f"{type(request).__name__} failed: {exc}"}
            await self._reply(writer, response)
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, obj: dict) -> None:
        writer.write(json.dumps(obj).encode() + b"\n")
        await writer.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None


def request(path: str, obj: dict, timeout: float = 5.0,
            max_reply: int = controlclient.MAX_REPLY_BYTES) -> dict:
    """Send one request to an agent's control socket (blocking client).

    ``timeout`` bounds the whole call, connect to reply; a reply longer than
    ``max_reply`` bytes is refused. Raises connect's OSError (e.g.
    FileNotFoundError: no agent), ``controlclient.ControlTimeout`` or
    ``controlclient.ControlCallError`` (agent/controlclient.py).
    """
    return controlclient.call(path, obj, timeout, max_reply)
