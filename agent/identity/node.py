"""A node agent's identities: CA client, certificate manager, trust bundle
and the TLS contexts the HBONE data path uses, wired together.

The CA's root file is both what the agent verifies the CA with and the
mesh trust bundle; when it changes, both follow.
"""

from __future__ import annotations

import asyncio
import logging

from agent.identity.bundle import TrustBundle, TrustBundleError
from agent.identity.client import CaClient, CaError
from agent.identity.manager import CertificateManager
from agent.identity.spiffe import parse_spiffe_uri
from agent.proxy.tls import TlsContexts

log = logging.getLogger(__name__)


class _CountingSigner:
    """The CA client, reporting each request's outcome (for the CA request metric)."""

    def __init__(self, client: CaClient, on_result) -> None:
        self.client = client
        self.on_result = on_result

    async def create_certificate(self, csr_pem: str, ttl_seconds: int, impersonate: str | None) -> list[str]:
        try:
            chain = await self.client.create_certificate(csr_pem, ttl_seconds, impersonate)
        except CaError as exc:
            self.on_result(exc.code.name.lower())
            raise
        except Exception:
            self.on_result("error")
            raise
        self.on_result("ok")
        return chain


class NodeIdentities:
    def __init__(self, ca_address: str, ca_root: str, token_file: str, trust_domain: str,
                 tmp_root: str | None = None, on_ca_result=lambda result: None) -> None:
        self.bundle = TrustBundle(ca_root)
        try:
            self.bundle.load()
        except TrustBundleError as exc:
            # Keep going: pods stay captured and fail closed until it appears.
            log.error("trust bundle not available yet: %s", exc)
        self.token_file = token_file
        root = self.bundle.pem_bytes() if self.bundle.version else b""
        self.client = CaClient(ca_address, root, self._token)
        self.bundle.on_change(lambda pem: asyncio.ensure_future(self.client.set_root_pem(pem)))
        self.manager = CertificateManager(_CountingSigner(self.client, on_ca_result), trust_domain)
        self.tls = TlsContexts(self._material, self._bundle, tmp_root)
        self._watch: asyncio.Task | None = None

    @classmethod
    def create(cls, config, on_ca_result=lambda result: None) -> NodeIdentities:
        return cls(config.ca_address, config.ca_root, config.token_file, config.trust_domain,
                   config.run_dir, on_ca_result)

    def _token(self) -> str:
        with open(self.token_file, encoding="utf-8") as fh:
            return fh.read().strip()

    async def _material(self, identity: str):
        cert = await self.manager.certificate(parse_spiffe_uri(identity))
        return cert.cert_chain_pem_bytes(), cert.key_pem_bytes(), cert.serial_number

    def _bundle(self):
        return self.bundle.version, self.bundle.pem_bytes()

    def start(self) -> None:
        self._watch = asyncio.ensure_future(self.bundle.watch())

    def track(self, identity: str) -> None:
        self.manager.track(parse_spiffe_uri(identity))

    def forget(self, identity: str) -> None:
        self.manager.forget(parse_spiffe_uri(identity))
        self.tls.forget(identity)

    def status(self) -> list[dict]:
        return self.manager.held()

    def bundle_status(self) -> dict:
        """The trust bundle in force: version and root subjects (never keys)."""
        if not self.bundle.version:
            return {"path": self.bundle.path, "version": 0, "roots": []}
        return {"path": self.bundle.path, "version": self.bundle.version,
                "roots": [{"subject": c.subject.rfc4514_string(),
                           "not_after": c.not_valid_after_utc.isoformat()}
                          for c in self.bundle.certificates()]}

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.manager.close()
        await self.client.close()
