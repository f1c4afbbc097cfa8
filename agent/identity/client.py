"""Client of Istio's certificate API (our CA, or istiod): CSR in, PEM chain out.

One unary gRPC call, ``CreateCertificate``, spoken directly as gRPC over
HTTP/2 (github.com/grpc/grpc, doc/PROTOCOL-HTTP2.md) with the ``h2`` library
and the ``ssl`` module the data path already uses. grpcio is not used in the
agent: its C core costs about 17 MB resident (the cygrpc module and
libstdc++) and six threads, for a call made a few times a day per identity.
The CA server (``agent/ca/server.py``) still runs on grpcio, so every test of this client
against it is a test against an independent gRPC implementation.

Each call opens its own TLS connection and closes it afterwards: calls are
rare, nothing has to be reconnected or kept alive, and a CA that restarted
is simply reached by the next call (the certificate manager has the backoff).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import ssl
from collections.abc import Callable
from typing import cast
from urllib.parse import unquote

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from google.protobuf import struct_pb2

from agent.identity.proto import IMPERSONATED_IDENTITY, ca_pb2

log = logging.getLogger(__name__)

CREATE_CERTIFICATE = "/istio.v1.auth.IstioCertificateService/CreateCertificate"
_MAX_RESPONSE = 4 * 1024 * 1024   # gRPC's default maximum received message size


class StatusCode(enum.IntEnum):
    """gRPC status codes (github.com/grpc/grpc, doc/statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


# A response that is not HTTP 200 never reached a gRPC handler; gRPC's
# clients derive the status from the HTTP status (doc/http-grpc-status-mapping.md).
_HTTP_STATUS = {400: StatusCode.INTERNAL, 401: StatusCode.UNAUTHENTICATED,
                403: StatusCode.PERMISSION_DENIED, 404: StatusCode.UNIMPLEMENTED,
                429: StatusCode.UNAVAILABLE, 502: StatusCode.UNAVAILABLE,
                503: StatusCode.UNAVAILABLE, 504: StatusCode.UNAVAILABLE}


class CaError(Exception):
    """A CreateCertificate call failed: the gRPC status code and the CA's (or transport's) message."""

    def __init__(self, code: StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"CA address {address!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def frame_message(message: bytes) -> bytes:
    """A gRPC Length-Prefixed-Message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def unframe_message(body: bytes) -> bytes:
    """The single message of a unary response body."""
    if len(body) < 5:
        raise CaError(StatusCode.INTERNAL, f"response body of {len(body)} bytes holds no gRPC message")
    if body[0] != 0:
        # We never send grpc-accept-encoding, so a server must not compress.
        raise CaError(StatusCode.INTERNAL, "compressed response, but no compression was offered")
    length = int.from_bytes(body[1:5], "big")
    if len(body) != 5 + length:
        raise CaError(StatusCode.INTERNAL, f"response body of {len(body)} bytes does not hold exactly "
                                           f"one message of {length} bytes")
    return body[5:]


def call_status(headers: dict[str, str], trailers: dict[str, str]) -> tuple[StatusCode, str]:
    """The call's status from the response headers and trailers (or a Trailers-Only response)."""
    http = headers.get(":status", "")
    meta = trailers or headers
    if http != "200":
        code = _HTTP_STATUS.get(int(http) if http.isdigit() else 0, StatusCode.UNKNOWN)
        return code, f"HTTP status {http or 'missing'} from the CA"
    raw = meta.get("grpc-status")
    if raw is None:
        return StatusCode.INTERNAL, "the CA's response ended without a grpc-status"
    try:
        code = StatusCode(int(raw))
    except ValueError:
        code = StatusCode.UNKNOWN
    return code, unquote(meta.get("grpc-message", ""))


class CaClient:
    """Calls to the CA at ``address``, verified against ``root_pem``.

    ``token_provider`` is called for every request, so a rotating token
    (a projected service-account token) is always current.
    ``server_name`` overrides the name checked against the CA's certificate
    when ``address`` is not one of its names. An empty ``root_pem`` (the
    root file not there yet) fails calls until ``set_root_pem``.
    """

    def __init__(self, address: str, root_pem: bytes, token_provider: Callable[[], str],
                 timeout: float = 10, server_name: str | None = None) -> None:
        self.address = address
        self.timeout = timeout
        self._root_pem = root_pem
        self._token_provider = token_provider
        self._server_name = server_name
        self._context: ssl.SSLContext | None = None

    def _ssl_context(self) -> ssl.SSLContext:
        if not self._root_pem:
            # Never fall back to the system's public roots for the CA; wait
            # for the mesh root instead.
            raise CaError(StatusCode.UNAVAILABLE,
                          f"no root certificate to verify the CA at {self.address} with (yet)")
        if self._context is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies the chain and the name
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_verify_locations(cadata=self._root_pem.decode("ascii"))
            ctx.set_alpn_protocols(["h2"])
            self._context = ctx
        return self._context

    async def set_root_pem(self, root_pem: bytes) -> None:
        """Trust another CA bundle (root rotation): later calls verify with it."""
        if root_pem != self._root_pem:
            self._root_pem = root_pem
            self._context = None

    async def create_certificate(self, csr_pem: str, ttl_seconds: int,
                                 impersonate: str | None) -> list[str]:
        """The signed chain (leaf first, root last) for ``csr_pem``, or CaError."""
        try:
            token = self._token_provider()
        except Exception as exc:    # the provider is pluggable; any failure means no credentials
            raise CaError(StatusCode.UNAUTHENTICATED, f"no token to authenticate with: {exc}") from exc
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=int(ttl_seconds))
        if impersonate:
            request.metadata.CopyFrom(struct_pb2.Struct(
                fields={IMPERSONATED_IDENTITY: struct_pb2.Value(string_value=impersonate)}))
        body = await self._unary(CREATE_CERTIFICATE, request.SerializeToString(),
                                 [("authorization", f"Bearer {token}")])
        try:
            response = ca_pb2.IstioCertificateResponse.FromString(body)
        except Exception as exc:    # protobuf's DecodeError
            raise CaError(StatusCode.INTERNAL, f"CA at {self.address} sent an undecodable response: {exc}") from None
        chain = list(response.cert_chain)
        if not chain or not all(chain):
            raise CaError(StatusCode.INTERNAL,
                          f"CA at {self.address} returned an empty certificate chain or an empty entry")
        return chain

    async def _unary(self, path: str, message: bytes, metadata: list[tuple[str, str]]) -> bytes:
        context = self._ssl_context()
        try:
            return await asyncio.wait_for(self._exchange(context, path, message, metadata), self.timeout)
        except TimeoutError:
            raise CaError(StatusCode.DEADLINE_EXCEEDED,
                          f"no answer from the CA at {self.address} within {self.timeout:g} s") from None

    async def _exchange(self, context: ssl.SSLContext, path: str, message: bytes,
                        metadata: list[tuple[str, str]]) -> bytes:
        try:
            host, port = split_address(self.address)
        except ValueError as exc:
            raise CaError(StatusCode.UNAVAILABLE, str(exc)) from None
        try:
            reader, writer = await asyncio.open_connection(
                host, port, ssl=context, server_hostname=self._server_name or host)
        except (OSError, ssl.SSLError) as exc:    # refused, unreachable, certificate not trusted
            raise CaError(StatusCode.UNAVAILABLE, f"CA at {self.address}: {exc}") from None
        try:
            if writer.get_extra_info("ssl_object").selected_alpn_protocol() != "h2":
                raise CaError(StatusCode.UNAVAILABLE, f"CA at {self.address} did not agree to HTTP/2 (ALPN h2)")
            authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            return await _call(reader, writer, authority, path, message,
                               [("grpc-timeout", f"{max(1, int(self.timeout * 1000))}m"), *metadata],
                               self.address)
        except (OSError, ssl.SSLError, h2.exceptions.ProtocolError) as exc:
            raise CaError(StatusCode.UNAVAILABLE, f"CA at {self.address}: {exc!r}") from None
        finally:
            # Not writer.close(): asyncio's TLS close waits for the server's
            # close_notify, and a gRPC server (grpcio's, measured) sends none
            # while the TCP connection is open, so each call would wait out the
            # shutdown timeout. The exchange is complete (GOAWAY written), so
            # the connection is simply dropped.
            writer.transport.abort()

    async def close(self) -> None:
        """Nothing stays open between calls; kept for the callers' lifecycle."""

    async def __aenter__(self) -> CaClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


async def _call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str,
                path: str, message: bytes, metadata: list[tuple[str, str]], address: str) -> bytes:
    """One gRPC unary call on a fresh HTTP/2 connection; the response message's bytes."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    conn.send_headers(stream, [
        (":method", "POST"), (":scheme", "https"), (":path", path), (":authority", authority),
        ("te", "trailers"), ("content-type", "application/grpc"), ("user-agent", "ambient-agent"),
        *metadata,
    ])
    pending = frame_message(message)
    headers: dict[str, str] = {}
    trailers: dict[str, str] = {}
    body = bytearray()
    ended = False
    while True:
        # Send what the peer's flow-control window allows (a CSR fits the
        # initial 64 KiB window; a larger message waits for WINDOW_UPDATE).
        if pending:
            allowed = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size)
            if allowed > 0:
                chunk, pending = pending[:allowed], pending[allowed:]
                conn.send_data(stream, chunk, end_stream=not pending)
        out = conn.data_to_send()
        if out:
            writer.write(out)
            await writer.drain()
        if ended:
            conn.close_connection()
            writer.write(conn.data_to_send())
            break
        data = await reader.read(65536)
        if not data:
            raise CaError(StatusCode.UNAVAILABLE, f"CA at {address} closed the connection before answering")
        for event in conn.receive_data(data):
            # header_encoding="utf-8" (above): h2 hands over str pairs, which its types cannot say.
            if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                headers = dict(cast("list[tuple[str, str]]", event.headers))
            elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream:
                trailers = dict(cast("list[tuple[str, str]]", event.headers))
            elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                body += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, stream)
                if len(body) > _MAX_RESPONSE + 5:
                    raise CaError(StatusCode.RESOURCE_EXHAUSTED, f"CA at {address} sent more than "
                                                                 f"{_MAX_RESPONSE} bytes")
            elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                ended = True
            elif isinstance(event, h2.events.StreamReset) and event.stream_id == stream:
                raise CaError(StatusCode.UNAVAILABLE if event.error_code == 7 else StatusCode.INTERNAL,
                              f"CA at {address} reset the call (HTTP/2 error {event.error_code})")
            elif isinstance(event, h2.events.ConnectionTerminated) and not ended:
                raise CaError(StatusCode.UNAVAILABLE, f"CA at {address} closed the connection "
                                                      f"(GOAWAY, HTTP/2 error {event.error_code})")
    code, detail = call_status(headers, trailers)
    if code != StatusCode.OK:
        raise CaError(code, detail or code.name)
    return unframe_message(bytes(body))
