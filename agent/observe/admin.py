"""The agent's HTTP endpoints, on the ports Istio uses.

* metrics, ``0.0.0.0:15020``: ``GET /metrics`` and ``GET /stats/prometheus``
  (Prometheus text format of the agent's private registry);
* readiness, ``0.0.0.0:15021``: ``GET /healthz/ready`` -> 200 when
  ``readiness()`` returns ``(True, reason)``, else 503 with the reason;
* admin, ``127.0.0.1:15000``: ``GET /config_dump`` (JSON, private keys
  scrubbed), ``GET|POST /logging`` (levels), ``POST /quitquitquit``.

A deliberately tiny HTTP/1.1 server on ``asyncio.start_server``: GET and
POST only, bodies only by ``Content-Length``, at most 16 KiB per request,
one request per connection (``Connection: close``). Malformed input gets a
specific 4xx and the connection is closed; nothing a client sends can stop
the server or reach another connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from prometheus_client import generate_latest
from prometheus_client.registry import Collector

from agent.observe.metrics import WithoutCreated

log = logging.getLogger(__name__)

MAX_REQUEST = 16 * 1024
REQUEST_TIMEOUT = 10.0
MAX_CONNECTIONS = 64           # per listener; more are closed at once
LINGER_SECONDS = 1.0           # after an error: how long unread input is drained
LINGER_BYTES = 256 * 1024      # ... and at most how much
BUSY_RETRY_SECONDS = 0.1       # a port held by the agent being taken over: retried this often
BUSY_LOG_SECONDS = 30.0        # ... and the wait logged this often

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 431: "Request Header Fields Too Large",
           500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
           505: "HTTP Version Not Supported"}

TEXT = "text/plain; charset=utf-8"
# The classic text format every Prometheus (and Istio's metrics merging)
# understands; our metric names are all legacy-valid, so the body is
# identical to what newer prometheus-client labels ``version=1.0.0``.
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
JSON = "application/json"

# ---------------------------------------------------------------------------
# HTTP plumbing


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Request:
    method: str
    path: str
    query: list[tuple[str, str]]
    headers: dict[str, str]
    body: bytes = b""


@dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: dict[str, str] = field(default_factory=dict)
    after: Callable[[], Any] | None = None   # run once the response has been written


def text(status: int, message: str) -> Response:
    return Response(status, (message.rstrip("\n") + "\n").encode())


def json_response(status: int, value: Any) -> Response:
    return Response(status, (json.dumps(value, indent=2, sort_keys=True, default=str) + "\n").encode(),
                    JSON)


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Request line and headers (without the final blank line); raises HttpError(400...)."""
    try:
        text_head = head.decode("ascii")
    except UnicodeDecodeError:
        raise HttpError(400, "request head is not ASCII") from None
    lines = text_head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not all(parts):
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not version.startswith("HTTP/"):
        raise HttpError(400, "malformed request line: no HTTP version")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(505, f"{version} is not supported (HTTP/1.0 or HTTP/1.1 only)")
    if not method.isalpha() or not method.isupper():
        raise HttpError(400, "malformed request method")
    if not target.startswith("/"):
        raise HttpError(400, "request target must be an absolute path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or any(c in name for c in " \t"):
            raise HttpError(400, "malformed header line")
        name = name.lower()
        value = value.strip()
        if name in headers:
            if name in ("content-length", "host", "transfer-encoding"):
                if name == "content-length" and headers[name] == value:
                    continue
                raise HttpError(400, f"duplicate {name} header")
            headers[name] = f"{headers[name]}, {value}"
        else:
            headers[name] = value
    return method, target, headers


async def read_request(reader: asyncio.StreamReader, limit: int = MAX_REQUEST) -> Request:
    buf = bytearray()
    while True:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            break
        if len(buf) >= limit:
            raise HttpError(431, f"request head exceeds {limit} bytes")
        chunk = await reader.read(limit - len(buf) + 4)
        if not chunk:
            if not buf:
                raise ConnectionResetError("client closed without a request")
            raise HttpError(400, "incomplete request head")
        buf += chunk
    if end + 4 > limit:
        raise HttpError(431, f"request head exceeds {limit} bytes")
    method, target, headers = parse_head(bytes(buf[:end]))
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported; send Content-Length")
    length = 0
    if "content-length" in headers:
        value = headers["content-length"]
        if not value.isdigit() or len(value) > 10:
            raise HttpError(400, "invalid Content-Length")
        length = int(value)
    if end + 4 + length > limit:
        raise HttpError(413, f"request exceeds {limit} bytes")
    body = bytes(buf[end + 4:])
    if len(body) > length:
        raise HttpError(400, "more data than Content-Length (one request per connection)")
    if len(body) < length:
        try:
            body += await reader.readexactly(length - len(body))
        except asyncio.IncompleteReadError:
            raise HttpError(400, "body shorter than Content-Length") from None
    try:
        split = urlsplit(target)
        query = parse_qsl(split.query, keep_blank_values=True, strict_parsing=False,
                          max_num_fields=64)
    except ValueError as exc:
        raise HttpError(400, f"malformed request target: {exc}") from None
    return Request(method, split.path, query, headers, body)


def encode_response(resp: Response) -> bytes:
    reason = REASONS.get(resp.status, "Unknown")
    head = [f"HTTP/1.1 {resp.status} {reason}", f"Content-Type: {resp.content_type}",
            f"Content-Length: {len(resp.body)}", "Connection: close", "Cache-Control: no-store"]
    head += [f"{k}: {v}" for k, v in resp.headers.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + resp.body


Route = Callable[[Request], "Response | Awaitable[Response]"]


class HttpListener:
    """One listening socket with a fixed route table ``{path: {method: handler}}``."""

    def __init__(self, name: str, addr: tuple[str, int], routes: dict[str, dict[str, Route]],
                 timeout: float = REQUEST_TIMEOUT, max_connections: int = MAX_CONNECTIONS) -> None:
        self.name = name
        self.addr = addr
        self.routes = routes
        self.timeout = timeout
        self.max_connections = max_connections
        self.server: asyncio.base_events.Server | None = None
        self._clients: set[asyncio.Task] = set()
        self._background: set[asyncio.Future] = set()

    @property
    def port(self) -> int:
        assert self.server is not None and self.server.sockets
        return self.server.sockets[0].getsockname()[1]

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, self.addr[0], self.addr[1],
                                                 limit=MAX_REQUEST + 1024, reuse_address=True)

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for task in list(self._clients):
            task.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self.server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 1.0)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None         # asyncio.start_server runs each client in a task
        if len(self._clients) >= self.max_connections:
            writer.transport.abort()
            return
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            writer.transport.abort()
            raise
        except Exception:          # never let one client take the listener down
            log.exception("%s listener: unexpected error", self.name)
            writer.transport.abort()
        finally:
            self._clients.discard(task)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(read_request(reader), self.timeout)
        except TimeoutError:
            await self._send(writer, text(408, "request not received in time"), reader)
            return
        except HttpError as exc:
            await self._send(writer, text(exc.status, exc.message), reader)
            return
        except (ConnectionError, OSError):
            writer.transport.abort()
            return
        resp = await self._dispatch(request)
        await self._send(writer, resp)
        if resp.after is not None:
            try:
                result = resp.after()
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._background.add(task)      # keep a reference until it finishes
                    task.add_done_callback(self._background.discard)
            except Exception:
                log.exception("%s listener: post-response action failed", self.name)

    async def _dispatch(self, request: Request) -> Response:
        if request.method not in ("GET", "POST"):
            return Response(405, f"method {request.method} is not allowed (GET or POST)\n".encode(),
                            headers={"Allow": "GET, POST"})
        methods = self.routes.get(request.path)
        if methods is None:
            return text(404, f"no such endpoint {request.path!r} on the {self.name} port")
        handler = methods.get(request.method)
        if handler is None:
            allow = ", ".join(sorted(methods))
            return Response(405, f"{request.path} accepts {allow}, not {request.method}\n".encode(),
                            headers={"Allow": allow})
        try:
            resp = handler(request)
            if inspect.isawaitable(resp):
                resp = await resp
            return resp
        except HttpError as exc:
            return Response(exc.status, (exc.message + "\n").encode(), headers=exc.headers)
        except Exception as exc:
            log.exception("%s listener: %s %s failed", self.name, request.method, request.path)
            return text(500, f"internal error: {type(exc).__name__}")

    @staticmethod
    async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After an error response to a request not read in full: send FIN, then
        discard what the client still sends (bounded) so that closing does not
        reset the connection and destroy the response before the client reads it."""
        if writer.can_write_eof():
            writer.write_eof()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LINGER_SECONDS
        discarded = 0
        while discarded < LINGER_BYTES:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                chunk = await asyncio.wait_for(reader.read(65536), remaining)
            except (TimeoutError, ConnectionError, OSError):
                return
            if not chunk:
                return
            discarded += len(chunk)

    async def _send(self, writer: asyncio.StreamWriter, resp: Response,
                    reader: asyncio.StreamReader | None = None) -> None:
        try:
            writer.write(encode_response(resp))
            await asyncio.wait_for(writer.drain(), self.timeout)
            if reader is not None:
                await self._linger(reader, writer)
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), self.timeout)
        except (TimeoutError, ConnectionError, OSError):
            writer.transport.abort()


# ---------------------------------------------------------------------------
# config_dump scrubbing (pure)

REDACTED = "[redacted]"
SECRET_KEY_PATTERNS = ("private_key*", "*key*pem*", "*private*key*", "privatekey*")


def _secret_key(name: str) -> bool:
    lowered = name.lower().replace("-", "_")
    return any(fnmatch.fnmatchcase(lowered, p) for p in SECRET_KEY_PATTERNS)


def scrub(value: Any) -> Any:
    """A JSON-ready copy of ``value`` with private keys replaced by ``"[redacted]"``.

    Keys named like ``private_key*`` / ``*key*pem*`` are redacted whatever
    their value; any string (or bytes) containing ``PRIVATE KEY`` is
    redacted wherever it is. Unknown objects become their ``str()`` first,
    so they are checked too.
    """
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = str(k)
            out[key] = REDACTED if _secret_key(key) else scrub(v)
        return out
    if isinstance(value, (list, tuple, set, frozenset)):
        return [scrub(v) for v in value]
    if isinstance(value, (bool, int, float)) or value is None:
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        value = bytes(value).decode("utf-8", "replace")
    text_value = value if isinstance(value, str) else str(value)
    return REDACTED if "PRIVATE KEY" in text_value.upper() else text_value


# ---------------------------------------------------------------------------
# logging levels

LEVELS = {"trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO,
          "warn": logging.WARNING, "warning": logging.WARNING, "error": logging.ERROR,
          "critical": logging.CRITICAL, "off": logging.CRITICAL + 10}
SHOWN_LOGGERS = ("agent", "access", "cni")


def _level_name(level: int) -> str:
    return "off" if level > logging.CRITICAL else logging.getLevelName(level).lower()


def logging_levels() -> dict:
    """The root level and the effective level of the agent's loggers."""
    manager = logging.Logger.manager
    names = sorted(n for n, lg in list(manager.loggerDict.items())
                   if isinstance(lg, logging.Logger)
                   and any(n == p or n.startswith(p + ".") for p in SHOWN_LOGGERS))
    return {"level": _level_name(logging.getLogger().getEffectiveLevel()),
            "loggers": {n: _level_name(logging.getLogger(n).getEffectiveLevel()) for n in names}}


def apply_logging(query: list[tuple[str, str]]) -> dict:
    """``level=debug`` sets the root; ``<logger>=<level>`` one known logger. All or nothing."""
    if not query:
        raise HttpError(400, "give level=<level> or <logger>=<level>; levels: " + ", ".join(LEVELS))
    changes: list[tuple[str, int]] = []
    known = logging.Logger.manager.loggerDict
    for name, level_name in query:
        level = LEVELS.get(level_name.lower())
        if level is None:
            raise HttpError(400, f"unknown level {level_name!r} for {name!r}; levels: " + ", ".join(LEVELS))
        if name == "level":
            changes.append(("", level))
        elif name in known:
            changes.append((name, level))
        else:
            raise HttpError(400, f"unknown logger {name!r}")
    for name, level in changes:
        logging.getLogger(name or None).setLevel(level)
    return logging_levels()


# ---------------------------------------------------------------------------
# The agent's three listeners

Readiness = Callable[[], "tuple[bool, str] | Awaitable[tuple[bool, str]]"]


async def _maybe_await(value):
    return await value if inspect.isawaitable(value) else value


class AdminServer:
    """Metrics (15020), readiness (15021) and admin (127.0.0.1:15000) listeners."""

    def __init__(self, metrics_registry: Collector, readiness: Readiness,
                 config_dump: Callable[[], Any], shutdown: Callable[[], Any],
                 metrics_addr: tuple[str, int] = ("0.0.0.0", 15020),
                 ready_addr: tuple[str, int] = ("0.0.0.0", 15021),
                 admin_addr: tuple[str, int] = ("127.0.0.1", 15000),
                 before_scrape: Callable[[], None] | None = None,
                 request_timeout: float = REQUEST_TIMEOUT) -> None:
        self.registry = metrics_registry
        self.readiness = readiness
        self.config_dump = config_dump
        self.shutdown = shutdown
        self.before_scrape = before_scrape
        metrics_routes: dict[str, Route] = {"GET": self._metrics}
        self.listeners = {
            "metrics": HttpListener("metrics", metrics_addr, {
                "/metrics": metrics_routes, "/stats/prometheus": metrics_routes},
                timeout=request_timeout),
            "ready": HttpListener("readiness", ready_addr, {"/healthz/ready": {"GET": self._ready}},
                                  timeout=request_timeout),
            "admin": HttpListener("admin", admin_addr, {
                "/": {"GET": self._index},
                "/config_dump": {"GET": self._config_dump},
                "/logging": {"GET": self._get_logging, "POST": self._post_logging},
                "/quitquitquit": {"POST": self._quit},
            }, timeout=request_timeout),
        }
        self._quitting = False

    @property
    def ports(self) -> dict[str, int]:
        return {name: lst.port for name, lst in self.listeners.items()}

    async def start(self, retry_busy: bool = False, stop: asyncio.Event | None = None) -> None:
        """Bind the three listeners.

        ``retry_busy``: a port still in use is retried every 0.1 s until it
        is free or ``stop`` is set, instead of failing at once. An agent that
        takes a node over from a running one needs this (docs/ARCHITECTURE.md,
        "Agent upgrade"): the old agent closes these ports only once the new
        one has bound the control socket, a moment later. SO_REUSEPORT was
        the alternative, rejected: the agent runs on the host network, and two
        agents in one reuseport group would split the kubelet's probes and
        Prometheus' scrapes between them by connection hash. The new pod's
        readiness could be answered by the old agent, and two processes'
        counters would alternate in one time series. This way exactly one
        agent answers on the node's ports at any moment. (An agent from before
        handovers holds them until it exits; the wait is logged.)
        """
        started = []
        try:
            for lst in self.listeners.values():
                await self._bind(lst, retry_busy, stop)
                started.append(lst)
        except BaseException:
            for lst in started:
                await lst.close()
            raise

    @staticmethod
    async def _bind(lst: HttpListener, retry_busy: bool, stop: asyncio.Event | None) -> None:
        loop = asyncio.get_running_loop()
        waiting_since = logged = None
        while True:
            try:
                await lst.start()
                if waiting_since is not None:
                    log.info("%s listener: %s:%d bound after %.1f s", lst.name, *lst.addr,
                             loop.time() - waiting_since)
                return
            except OSError as exc:
                if not retry_busy or exc.errno != errno.EADDRINUSE:
                    raise
            if stop is not None and stop.is_set():
                return
            now = loop.time()
            if waiting_since is None:
                waiting_since = now
            if logged is None or now - logged >= BUSY_LOG_SECONDS:
                log.info("%s listener: %s:%d is still in use (the agent this one takes over from?); "
                         "retrying", lst.name, *lst.addr)
                logged = now
            await asyncio.sleep(BUSY_RETRY_SECONDS)

    async def close(self) -> None:
        await asyncio.gather(*(lst.close() for lst in self.listeners.values()))

    # -- handlers ----------------------------------------------------------

    def _metrics(self, request: Request) -> Response:
        if self.before_scrape is not None:
            try:
                self.before_scrape()
            except Exception:
                log.exception("metrics: before_scrape failed; serving the counters as they are")
        return Response(200, generate_latest(WithoutCreated(self.registry)), PROMETHEUS_TEXT)

    async def _ready(self, request: Request) -> Response:
        try:
            ready, reason = await _maybe_await(self.readiness())
        except Exception as exc:
            return text(503, f"readiness check failed: {type(exc).__name__}: {exc}")
        return text(200 if ready else 503, str(reason) or ("ready" if ready else "not ready"))

    def _index(self, request: Request) -> Response:
        return text(200, "GET /config_dump\nGET /logging\nPOST /logging?level=<level>|<logger>=<level>\n"
                         "POST /quitquitquit")

    async def _config_dump(self, request: Request) -> Response:
        return json_response(200, scrub(await _maybe_await(self.config_dump())))

    def _get_logging(self, request: Request) -> Response:
        return json_response(200, logging_levels())

    def _post_logging(self, request: Request) -> Response:
        return json_response(200, apply_logging(request.query))

    def _quit(self, request: Request) -> Response:
        resp = text(200, "OK")
        if not self._quitting:
            self._quitting = True
            resp.after = self.shutdown
        return resp
