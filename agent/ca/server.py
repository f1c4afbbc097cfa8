"""`ambient-agent ca`: a CA speaking Istio's certificate API (istiod's port 15012).

Node agents ask it for their pods' workload certificates. Each request
goes through, in order:

1. authentication: ``authorization: Bearer <token>`` -> the caller's node
   and service account (UNAUTHENTICATED otherwise; UNAVAILABLE when the
   token cannot be checked now, e.g. the Kubernetes API is down). Tokens
   come from a file (lab) or are reviewed by Kubernetes (``--tokens kube``,
   ``agent.ca.kubeauth``);
2. authorisation (``agent.ca.rules.authorise``): a node agent's
   ``ImpersonatedIdentity`` request metadata names a SPIFFE ID of this trust
   domain whose service account runs in a pod on the caller's node; any
   other service account may have only its own identity, and only while a
   pod running as it is on its node (PERMISSION_DENIED otherwise);
3. the CSR: well formed, self-signed, allowed key, and asking for exactly
   that SPIFFE ID (INVALID_ARGUMENT otherwise);
4. signing: a leaf for the SPIFFE ID with the requested lifetime, clamped
   to the maximum; the response is the leaf, the intermediates, the root.

Every refusal is logged once, with its reason and the caller.

The root bundle that node agents and workloads must trust is
``<ca-dir>/root-cert.pem``; ``--root-cert-out`` also copies it elsewhere.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from agent.ca.authn import (
    AuthConfigError,
    AuthenticationError,
    AuthenticationUnavailable,
    Authenticator,
    ServiceAccount,
    TokenFileAuthenticator,
    bearer_token,
    parse_service_account,
)
from agent.ca.material import DirectorySigningSource, SigningMaterial, SigningMaterialSource, write_public_file
from agent.ca.rules import AuthorisationError, CsrError, TtlError, authorise, clamp_ttl, validate_csr
from agent.identity import pki
from agent.identity.proto import IMPERSONATED_IDENTITY, ca_pb2, ca_pb2_grpc
from agent.identity.spiffe import DEFAULT_TRUST_DOMAIN, check_trust_domain
from agent.state.model import ClusterState
from agent.state.source import open_state_source

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:15012"
DEFAULT_TTL = 24 * 3600
DEFAULT_MAX_TTL = 48 * 3600
DEFAULT_SERVING_NAMES = ("localhost", "127.0.0.1")
# The serving certificate is made at start-up; a CA running longer than
# this needs a restart (or the issue that adds reloadable credentials).
SERVING_VALIDITY = dt.timedelta(days=365)
# Requests are a CSR and a little metadata; refuse anything bigger early.
MAX_REQUEST_BYTES = 64 * 1024


class Refusal(Exception):
    """A request the CA will not serve: the gRPC status and the reason returned to the caller."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# The node agent's service account as the chart names it (release
# "ambient-agent" in istio-system); the chart passes the real one.
DEFAULT_NODE_AGENT_ACCOUNT = "istio-system/ambient-agent"
TOKENS_KUBE = "kube"


@dataclass
class CaConfig:
    ca_dir: str
    tokens: str                                  # token file path, or "kube" (TokenReview)
    state: str                                   # state source URL, file:PATH
    listen: str = DEFAULT_LISTEN
    trust_domain: str = DEFAULT_TRUST_DOMAIN
    default_ttl: int = DEFAULT_TTL               # seconds, when a request asks for 0
    max_ttl: int = DEFAULT_MAX_TTL               # seconds
    serving_names: tuple[str, ...] = DEFAULT_SERVING_NAMES
    root_cert_out: str | None = None
    state_poll_interval: float = 0.2
    kubeconfig: str | None = None                # --tokens kube: None means in-cluster
    audience: str = "istio-ca"                   # --tokens kube: the token audience required
    node_agent_account: str = DEFAULT_NODE_AGENT_ACCOUNT   # NAMESPACE/NAME that may impersonate


def _impersonated(request: ca_pb2.IstioCertificateRequest) -> str | None:
    value = request.metadata.fields.get(IMPERSONATED_IDENTITY) if request.HasField("metadata") else None
    if value is None:
        return None
    if value.WhichOneof("kind") != "string_value":
        raise Refusal(grpc.StatusCode.INVALID_ARGUMENT,
                      f"metadata {IMPERSONATED_IDENTITY} must be a string SPIFFE ID, "
                      f"not a {value.WhichOneof('kind') or 'unset value'}")
    return value.string_value or None


class CertificateService(ca_pb2_grpc.IstioCertificateServiceServicer):
    """The gRPC service: the request pipeline above, over injectable parts."""

    def __init__(self, material: SigningMaterial, authenticator: Authenticator,
                 state: Callable[[], ClusterState], trust_domain: str,
                 default_ttl: int = DEFAULT_TTL, max_ttl: int = DEFAULT_MAX_TTL,
                 clock: Callable[[], dt.datetime] = pki.utcnow,
                 node_agent: ServiceAccount | None = None) -> None:
        self.material = material
        self.authenticator = authenticator
        self.node_agent = node_agent
        self.state = state
        self.trust_domain = trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.clock = clock

    async def CreateCertificate(self, request: ca_pb2.IstioCertificateRequest,
                                context: grpc.aio.ServicerContext) -> ca_pb2.IstioCertificateResponse:
        caller = "unauthenticated caller"
        try:
            try:
                token = bearer_token(context.invocation_metadata())
                who = await self.authenticator.authenticate(token)
            except AuthenticationError as exc:
                raise Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc)) from None
            except AuthenticationUnavailable as exc:
                # Not a verdict on the token: the caller should retry, not give up.
                raise Refusal(grpc.StatusCode.UNAVAILABLE, str(exc)) from None
            caller = who.describe()
            try:
                identity = authorise(who, _impersonated(request), self.state(), self.trust_domain,
                                     self.node_agent)
            except AuthorisationError as exc:
                raise Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc)) from None
            try:
                csr = validate_csr(request.csr, identity)
                ttl = clamp_ttl(request.validity_duration, self.default_ttl, self.max_ttl)
            except (CsrError, TtlError) as exc:
                raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{identity.uri}: {exc}") from None
        except Refusal as refusal:
            log.warning("refused certificate to %s from %s: %s: %s", caller, context.peer(),
                        refusal.code.name, refusal.message)
            await context.abort(refusal.code, refusal.message)
            raise AssertionError("unreachable: abort raises") from refusal  # pragma: no cover

        leaf = pki.sign_workload(csr.public_key(), identity.uri, self.material.cert,
                                 self.material.key, self.clock(), dt.timedelta(seconds=ttl))
        log.info("issued %s to %s: serial %x, valid until %s (%d s; %d s requested)", identity.uri,
                 caller, leaf.serial_number, leaf.not_valid_after_utc.isoformat(), ttl,
                 request.validity_duration)
        chain = [pki.certificate_pem(leaf).decode("ascii")] + self.material.issuer_chain_pem()
        return ca_pb2.IstioCertificateResponse(cert_chain=chain)


class CaServer:
    """The CA process: signing material, authentication, cluster state, TLS gRPC server."""

    def __init__(self, config: CaConfig, *, material_source: SigningMaterialSource | None = None,
                 authenticator: Authenticator | None = None) -> None:
        self.config = config
        self._material_source = material_source or DirectorySigningSource(config.ca_dir, config.trust_domain)
        self._authenticator = authenticator
        # file:PATH or kube[:KUBECONFIG] (pods from the API, for the "pod on
        # the caller's node" check); a bare `kube` uses --kubeconfig, else
        # in-cluster config. The kube source's first load() waits for sync.
        self._source = open_state_source(config.state, kubeconfig=config.kubeconfig, kinds=("pods",))
        self._state = ClusterState.from_items([])
        self._server: grpc.aio.Server | None = None
        self._owned_authenticator: Authenticator | None = None
        self._watcher: asyncio.Task | None = None
        self.material: SigningMaterial | None = None
        self.port = 0

    @property
    def root_pem(self) -> bytes:
        """The trust bundle clients must use to verify this CA and its leaves."""
        if self.material is None:
            raise RuntimeError("the CA has not been started")
        return self.material.roots_pem()

    def _set_state(self, state: ClusterState) -> None:
        self._state = state
        log.info("cluster state %s: %d pods", state.resource_version or "(unversioned)", len(state.pods))

    async def start(self) -> None:
        """Load everything, then listen; any problem raises before the port opens."""
        if not self.config.max_ttl > 0:
            raise ValueError(f"max TTL must be positive, not {self.config.max_ttl}")
        if not self.config.default_ttl > 0:
            raise ValueError(f"default TTL must be positive, not {self.config.default_ttl}")
        if self.config.default_ttl > self.config.max_ttl:
            log.warning("default TTL %d s is above the maximum %d s: certificates get %d s",
                        self.config.default_ttl, self.config.max_ttl, self.config.max_ttl)
        check_trust_domain(self.config.trust_domain)
        try:
            node_agent = parse_service_account(self.config.node_agent_account)
        except ValueError as exc:
            raise AuthConfigError(f"node agent service account: {exc}") from None
        # Cheap checks first, so a typo in a flag does not leave a new root behind.
        authenticator = self._authenticator
        if authenticator is None:
            authenticator = self._owned_authenticator = self._make_authenticator()
        # The kube source's first load waits for its first full sync: off the event loop.
        self._state = await asyncio.to_thread(self._source.load)
        self.material = self._material_source.load()

        serving_key = pki.generate_key()
        now = pki.utcnow()
        serving = pki.sign_serving(serving_key.public_key(), list(self.config.serving_names),
                                   self.material.cert, self.material.key, now, SERVING_VALIDITY)
        chain = pki.certificate_pem(serving) + b"".join(
            pki.certificate_pem(c) for c in self.material.issuer_chain()[:-1])
        credentials = grpc.ssl_server_credentials([(pki.private_key_pem(serving_key), chain)])

        service = CertificateService(self.material, authenticator, lambda: self._state,
                                     self.config.trust_domain, self.config.default_ttl,
                                     self.config.max_ttl, node_agent=node_agent)
        server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", MAX_REQUEST_BYTES),
            # A second CA on the same port must fail, not share the port silently.
            ("grpc.so_reuseport", 0),
        ])
        ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(service, server)
        try:
            port = server.add_secure_port(self.config.listen, credentials)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.config.listen}: {exc}") from None
        if not port:
            raise OSError(f"cannot listen on {self.config.listen}")
        await server.start()
        self._server, self.port = server, port
        self._watcher = asyncio.ensure_future(
            self._source.watch(self._set_state, self.config.state_poll_interval))
        if self.config.root_cert_out:
            write_public_file(self.config.root_cert_out, self.root_pem)
        root = self.material.root
        log.info("CA for trust domain %s listening on %s (port %d), signing as %s, root %s "
                 "(bundle in %s)", self.config.trust_domain, self.config.listen, port,
                 self.material.cert.subject.rfc4514_string(), root.subject.rfc4514_string(),
                 self.config.root_cert_out or f"{self.config.ca_dir}/root-cert.pem")

    def _make_authenticator(self) -> Authenticator:
        if self.config.tokens == TOKENS_KUBE:
            from agent.ca.kubeauth import TokenReviewAuthenticator, api_client
            return TokenReviewAuthenticator(api_client(self.config.kubeconfig), self.config.audience)
        return TokenFileAuthenticator(self.config.tokens)

    async def stop(self, grace: float | None = None) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            try:
                await self._watcher
            except asyncio.CancelledError:
                pass
            self._watcher = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for owned in (self._owned_authenticator, self._source):
            close = getattr(owned, "close", None)     # the kube ones hold connections and threads
            if close is not None:
                await asyncio.to_thread(close)
        self._owned_authenticator = None

    async def run(self, grace: float = 5.0) -> None:
        """Start, serve until SIGTERM or SIGINT, then stop (in-flight requests get ``grace`` seconds)."""
        await self.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        try:
            await stopping.wait()
            log.info("CA stopping")
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop(grace)

