"""Shared pieces for the CA tests: a cluster, tokens, a CA server on loopback, chain checks.

Everything runs in-process on 127.0.0.1 with real TLS and real gRPC; each
test owns its temporary directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from agent.ca.server import CaConfig, CaServer
from agent.identity import pki
from agent.identity.client import CaClient
from agent.identity.proto import ca_pb2, ca_pb2_grpc
from tests import builders

TOKENS = {"token-node-a": "node-a", "token-node-b": "node-b"}
API_URI = "spiffe://cluster.local/ns/backend/sa/api"       # a pod on node-a
WEB_URI = "spiffe://cluster.local/ns/frontend/sa/web"      # a pod on node-b


def pod(name: str, ns: str, node: str, sa: str | None = None) -> dict:
    return builders.pod(name, ns, uid=f"uid-{ns}-{name}", node=node, sa=sa or None, phase="Running",
                        containers=[{"name": "app", "image": "app"}])


PODS = [pod("api-0", "backend", "node-a", "api"), pod("web-0", "frontend", "node-b", "web")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Env:
    root: Path

    @property
    def ca_dir(self) -> str:
        return str(self.root / "cacerts")

    @property
    def tokens(self) -> str:
        return str(self.root / "tokens.yaml")

    @property
    def state(self) -> str:
        return str(self.root / "state.json")

    def write_state(self, pods: list[dict], version: int = 1) -> None:
        doc = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": str(version)},
               "items": pods}
        tmp = self.state + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh)
        os.replace(tmp, self.state)

    def write_tokens(self, tokens: dict[str, str]) -> None:
        tmp = self.tokens + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(tokens, fh)
        os.replace(tmp, self.tokens)

    def config(self, **overrides) -> CaConfig:
        values = dict(ca_dir=self.ca_dir, tokens=self.tokens, state=f"file:{self.state}",
                      listen="127.0.0.1:0", state_poll_interval=0.05)
        values.update(overrides)
        return CaConfig(**values)


@pytest.fixture
def env(tmp_path) -> Env:
    e = Env(tmp_path)
    e.write_tokens(TOKENS)
    e.write_state(PODS)
    return e


@contextlib.asynccontextmanager
async def running_ca(config: CaConfig, **kwargs):
    server = CaServer(config, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0)


def client_for(server: CaServer, token: str = "token-node-a", **kwargs) -> CaClient:
    return CaClient(f"127.0.0.1:{server.port}", server.root_pem, lambda: token, **kwargs)


async def raw_call(server: CaServer, request: ca_pb2.IstioCertificateRequest,
                   metadata: tuple = ()) -> ca_pb2.IstioCertificateResponse:
    """A call without CaClient's conveniences (e.g. no authorization metadata at all)."""
    creds = grpc.ssl_channel_credentials(root_certificates=server.root_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", creds) as channel:
        stub = ca_pb2_grpc.IstioCertificateServiceStub(channel)
        return await stub.CreateCertificate(request, metadata=metadata, timeout=10)


def verify_chain(chain: list[str], root_pem: bytes, tmp: Path) -> x509.Certificate:
    """Verify leaf -> intermediates -> root twice: with cryptography's verifier and `openssl verify`."""
    certs = [x509.load_pem_x509_certificate(c.encode()) for c in chain]
    leaf, intermediates = certs[0], certs[1:-1]
    roots = x509.load_pem_x509_certificates(root_pem)
    assert certs[-1] in roots, "the chain must end with a root of the trust bundle"
    verifier = (PolicyBuilder().store(Store(roots)).time(pki.utcnow() + dt.timedelta(seconds=1))
                .build_client_verifier())
    verified = verifier.verify(leaf, intermediates)
    assert [s.value for s in verified.subjects] == pki.uri_sans(leaf)

    (tmp / "verify-root.pem").write_bytes(root_pem)
    (tmp / "verify-leaf.pem").write_text(chain[0])
    (tmp / "verify-untrusted.pem").write_text("".join(chain[1:-1]))
    cmd = ["openssl", "verify", "-purpose", "sslclient", "-CAfile", str(tmp / "verify-root.pem")]
    if intermediates:
        cmd += ["-untrusted", str(tmp / "verify-untrusted.pem")]
    result = subprocess.run(cmd + [str(tmp / "verify-leaf.pem")], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stdout + result.stderr
    return leaf


def new_csr(uri: str, key=None) -> str:
    return pki.build_csr(key or pki.generate_key(), uri)


def make_ca_cert(subject: str, key, issuer_cert, issuer_key, days: int = 365) -> x509.Certificate:
    """A CA certificate (self-signed when issuer_cert is None) for plug-in cacerts tests."""
    now = pki.utcnow()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                              critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    return builder.sign(issuer_key or key, hashes.SHA256())
