"""Client of Istio's certificate API (our CA, or istiod): CSR in, PEM chain out."""

from __future__ import annotations

import logging
from typing import Callable

import grpc
from google.protobuf import struct_pb2

from agent.identity.policy import IMPERSONATED_IDENTITY
from agent.identity.proto import ca_pb2, ca_pb2_grpc

log = logging.getLogger(__name__)

# The CA may be down for a while (restart, upgrade). gRPC's own reconnect
# backoff grows to two minutes by default, which would keep failing calls
# long after the CA is back; the caller (the certificate manager) has its
# own backoff, so the channel only needs to try again soon.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class CaError(Exception):
    """A CreateCertificate call failed: the gRPC status code and the CA's (or transport's) message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


class CaClient:
    """One TLS channel to the CA, verified against ``root_pem``; created on first use.

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
        self._channel: grpc.aio.Channel | None = None
        self._stub: ca_pb2_grpc.IstioCertificateServiceStub | None = None

    def _ensure_stub(self) -> ca_pb2_grpc.IstioCertificateServiceStub:
        if not self._root_pem:
            # gRPC would fall back to the system's public roots: never trust
            # those for the CA; wait for the mesh root instead.
            raise CaError(grpc.StatusCode.UNAVAILABLE,
                          f"no root certificate to verify the CA at {self.address} with (yet)")
        if self._stub is None:
            options = list(_CHANNEL_OPTIONS)
            if self._server_name:
                options.append(("grpc.ssl_target_name_override", self._server_name))
            credentials = grpc.ssl_channel_credentials(root_certificates=self._root_pem)
            self._channel = grpc.aio.secure_channel(self.address, credentials, options=options)
            self._stub = ca_pb2_grpc.IstioCertificateServiceStub(self._channel)
        return self._stub

    async def set_root_pem(self, root_pem: bytes) -> None:
        """Trust another CA bundle (root rotation): later calls use a new channel."""
        if root_pem != self._root_pem:
            self._root_pem = root_pem
            await self.close()

    async def create_certificate(self, csr_pem: str, ttl_seconds: int,
                                 impersonate: str | None) -> list[str]:
        """The signed chain (leaf first, root last) for ``csr_pem``, or CaError."""
        try:
            token = self._token_provider()
        except Exception as exc:    # the provider is pluggable; any failure means no credentials
            raise CaError(grpc.StatusCode.UNAUTHENTICATED, f"no token to authenticate with: {exc}") from exc
        request = ca_pb2.IstioCertificateRequest(csr=csr_pem, validity_duration=int(ttl_seconds))
        if impersonate:
            request.metadata.CopyFrom(struct_pb2.Struct(
                fields={IMPERSONATED_IDENTITY: struct_pb2.Value(string_value=impersonate)}))
        stub = self._ensure_stub()
        try:
            response = await stub.CreateCertificate(
                request, timeout=self.timeout, metadata=(("authorization", f"Bearer {token}"),))
        except grpc.aio.AioRpcError as exc:
            raise CaError(exc.code(), exc.details() or exc.code().name) from None
        chain = list(response.cert_chain)
        if not chain or not all(chain):
            raise CaError(grpc.StatusCode.INTERNAL,
                          f"CA at {self.address} returned an empty certificate chain or an empty entry")
        return chain

    async def close(self) -> None:
        if self._channel is not None:
            channel, self._channel, self._stub = self._channel, None, None
            await channel.close()

    async def __aenter__(self) -> "CaClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
