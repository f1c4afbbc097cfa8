"""The CA over real gRPC and TLS on loopback: issuance, TTLs, every refusal, signing material."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from google.protobuf import struct_pb2

from agent.ca.material import CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT
from agent.identity import pki
from agent.identity.client import CaClient, CaError, StatusCode
from agent.identity.proto import ca_pb2

from .conftest import (API_URI, PODS, WEB_URI, client_for, make_ca_cert, new_csr, pod, raw_call,
                       running_ca, verify_chain)


def run(coro, timeout=30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_issues_a_workload_certificate(env, tmp_path):
    async def scenario():
        async with running_ca(env.config()) as server, client_for(server) as client:
            key = pki.generate_key()
            before = time.time()
            chain = await client.create_certificate(new_csr(API_URI, key), 3600, API_URI)
            return chain, server.root_pem, key, before

    chain, root_pem, key, before = run(scenario())
    assert len(chain) == 2                                   # leaf, root (self-signed CA)
    leaf = verify_chain(chain, root_pem, tmp_path)
    assert x509.load_pem_x509_certificate(chain[-1].encode()) == x509.load_pem_x509_certificate(root_pem)

    assert pki.same_public_key(leaf.public_key(), key.public_key())
    assert leaf.subject == x509.Name([])
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and list(san.value) == [x509.UniformResourceIdentifier(API_URI)]
    bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    nb, na = leaf.not_valid_before_utc.timestamp(), leaf.not_valid_after_utc.timestamp()
    assert before - 62 <= nb <= before - 58                  # backdated one minute
    assert before + 3598 <= na <= before + 3605              # the requested hour


@pytest.mark.parametrize("requested,config,expected", [
    (0, {}, 24 * 3600),                                      # 0: the default
    (4, {}, 4),
    (10 * 24 * 3600, {}, 48 * 3600),                         # clamped to the default maximum
    (7200, {"max_ttl": 600}, 600),
    (0, {"default_ttl": 300, "max_ttl": 600}, 300),
])
def test_ttl_is_honoured_and_clamped(env, requested, config, expected):
    async def scenario():
        async with running_ca(env.config(**config)) as server, client_for(server) as client:
            now = time.time()
            chain = await client.create_certificate(new_csr(API_URI), requested, API_URI)
            return now, x509.load_pem_x509_certificate(chain[0].encode())

    now, leaf = run(scenario())
    assert abs(leaf.not_valid_after_utc.timestamp() - (now + expected)) < 5


def _request(csr: str, impersonate=None, validity: int = 3600) -> ca_pb2.IstioCertificateRequest:
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=validity)
    if impersonate is not None:
        value = (struct_pb2.Value(string_value=impersonate) if isinstance(impersonate, str)
                 else struct_pb2.Value(number_value=impersonate))
        req.metadata.CopyFrom(struct_pb2.Struct(fields={"ImpersonatedIdentity": value}))
    return req


BEARER_A = (("authorization", "Bearer token-node-a"),)

REFUSALS = [
    # name, metadata, request factory, status, message fragment
    ("unknown token", (("authorization", "Bearer nope"),),
     lambda: _request(new_csr(API_URI), API_URI), grpc.StatusCode.UNAUTHENTICATED, "unknown bearer token"),
    ("missing token", (), lambda: _request(new_csr(API_URI), API_URI),
     grpc.StatusCode.UNAUTHENTICATED, "no 'authorization: Bearer <token>' metadata"),
    ("basic auth", (("authorization", "Basic dXNlcjpwdw=="),), lambda: _request(new_csr(API_URI), API_URI),
     grpc.StatusCode.UNAUTHENTICATED, "scheme 'Basic' is not supported"),
    ("empty bearer", (("authorization", "Bearer "),), lambda: _request(new_csr(API_URI), API_URI),
     grpc.StatusCode.UNAUTHENTICATED, "empty token"),
    ("no impersonation", BEARER_A, lambda: _request(new_csr(API_URI)),
     grpc.StatusCode.PERMISSION_DENIED, "did not name the identity it requests"),
    ("pod on another node", BEARER_A, lambda: _request(new_csr(WEB_URI), WEB_URI),
     grpc.StatusCode.PERMISSION_DENIED,
     "node 'node-a' runs no pod with service account 'web' in namespace 'frontend', so its agent "
     "may not have identity spiffe://cluster.local/ns/frontend/sa/web"),
    ("other trust domain", BEARER_A,
     lambda: _request(new_csr("spiffe://evil.org/ns/backend/sa/api"), "spiffe://evil.org/ns/backend/sa/api"),
     grpc.StatusCode.PERMISSION_DENIED, "is in trust domain 'evil.org'; this CA signs only for 'cluster.local'"),
    ("not a SPIFFE ID", BEARER_A, lambda: _request(new_csr(API_URI), "backend/api"),
     grpc.StatusCode.PERMISSION_DENIED, "not an Istio SPIFFE ID"),
    ("non-string impersonation", BEARER_A, lambda: _request(new_csr(API_URI), 42),
     grpc.StatusCode.INVALID_ARGUMENT, "must be a string SPIFFE ID, not a number_value"),
    ("CSR for another identity", BEARER_A, lambda: _request(new_csr(WEB_URI), API_URI),
     grpc.StatusCode.INVALID_ARGUMENT,
     "asks for subjectAltName ['spiffe://cluster.local/ns/frontend/sa/web']; "
     "expected exactly ['spiffe://cluster.local/ns/backend/sa/api']"),
    ("garbage CSR", BEARER_A, lambda: _request("-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
                                               "-----END CERTIFICATE REQUEST-----\n", API_URI),
     grpc.StatusCode.INVALID_ARGUMENT, "CSR is not a PEM certificate request"),
    ("no CSR", BEARER_A, lambda: _request("", API_URI), grpc.StatusCode.INVALID_ARGUMENT, "no CSR"),
    ("negative validity", BEARER_A, lambda: _request(new_csr(API_URI), API_URI, validity=-5),
     grpc.StatusCode.INVALID_ARGUMENT, "must not be negative"),
]


def test_refusals_have_exact_status_and_are_logged_once(env, caplog):
    async def scenario():
        outcomes = []
        async with running_ca(env.config()) as server:
            for name, metadata, make, _, _ in REFUSALS:
                caplog.clear()
                try:
                    await raw_call(server, make(), metadata)
                    outcomes.append((name, None, None, []))
                except grpc.aio.AioRpcError as exc:
                    logged = [r.getMessage() for r in caplog.records if "refused certificate" in r.getMessage()]
                    outcomes.append((name, exc.code(), exc.details(), logged))
        return outcomes

    with caplog.at_level(logging.INFO, logger="agent.ca"):
        outcomes = run(scenario())
    for (name, _, _, code, fragment), (_, got_code, details, logged) in zip(REFUSALS, outcomes):
        assert got_code == code, f"{name}: {got_code} {details}"
        assert fragment in details, f"{name}: {details!r}"
        assert len(logged) == 1 and fragment in logged[0] and code.name in logged[0], f"{name}: {logged}"
        assert "token-node-a" not in details and "token-node-a" not in logged[0]   # secrets stay secret


def test_client_maps_errors_and_verifies_the_ca(env):
    async def scenario():
        async with running_ca(env.config()) as server:
            async with client_for(server, token="token-node-b") as client:
                with pytest.raises(CaError) as err:
                    await client.create_certificate(new_csr(API_URI), 60, API_URI)
                assert err.value.code == StatusCode.PERMISSION_DENIED
                assert "node 'node-b'" in err.value.message
                # node-b's agent gets its own pod's identity
                assert await client.create_certificate(new_csr(WEB_URI), 60, WEB_URI)

            # A client trusting another root must not talk to this CA at all.
            stranger = pki.certificate_pem(pki.create_root("stranger", pki.utcnow())[0])
            async with CaClient(f"127.0.0.1:{server.port}", stranger, lambda: "token-node-a",
                                timeout=3) as client:
                with pytest.raises(CaError) as err:
                    await client.create_certificate(new_csr(API_URI), 60, API_URI)
                assert err.value.code == StatusCode.UNAVAILABLE

            # By name (localhost is in the serving certificate by default).
            async with CaClient(f"localhost:{server.port}", server.root_pem, lambda: "token-node-a") as c:
                assert await c.create_certificate(new_csr(API_URI), 60, API_URI)

            # No root yet (the agent started before the CA wrote it): fail, never use public roots.
            async with CaClient(f"127.0.0.1:{server.port}", b"", lambda: "token-node-a") as c:
                with pytest.raises(CaError, match="no root certificate") as err:
                    await c.create_certificate(new_csr(API_URI), 60, API_URI)
                assert err.value.code == StatusCode.UNAVAILABLE
                await c.set_root_pem(server.root_pem)
                assert await c.create_certificate(new_csr(API_URI), 60, API_URI)

            def broken_provider():
                raise OSError("token file gone")

            async with CaClient(f"127.0.0.1:{server.port}", server.root_pem, broken_provider) as c:
                with pytest.raises(CaError, match="token file gone") as err:
                    await c.create_certificate(new_csr(API_URI), 60, API_URI)
                assert err.value.code == StatusCode.UNAUTHENTICATED

    run(scenario())


def test_state_and_tokens_are_reloaded(env):
    new_uri = "spiffe://cluster.local/ns/jobs/sa/runner"

    async def scenario():
        async with running_ca(env.config()) as server, client_for(server) as client:
            with pytest.raises(CaError) as err:
                await client.create_certificate(new_csr(new_uri), 60, new_uri)
            assert err.value.code == StatusCode.PERMISSION_DENIED

            env.write_state(PODS + [pod("runner-0", "jobs", "node-a", "runner")], version=2)
            for _ in range(100):
                await asyncio.sleep(0.05)
                try:
                    await client.create_certificate(new_csr(new_uri), 60, new_uri)
                    break
                except CaError:
                    continue
            else:
                pytest.fail("the new pod's identity was never authorised")

            env.write_tokens({"token-node-c": "node-c"})          # token-node-a revoked
            with pytest.raises(CaError) as err:
                await client.create_certificate(new_csr(API_URI), 60, API_URI)
            assert err.value.code == StatusCode.UNAUTHENTICATED

    run(scenario())


def test_restart_reuses_the_root(env, tmp_path):
    async def issue():
        async with running_ca(env.config()) as server, client_for(server) as client:
            return server.root_pem, await client.create_certificate(new_csr(API_URI), 60, API_URI)

    root1, _ = run(issue())
    root2, chain2 = run(issue())
    assert root1 == root2
    verify_chain(chain2, root1, tmp_path)


def test_existing_cacerts_with_an_intermediate(env, tmp_path):
    """Istio's plug-in CA layout: ca-cert is an intermediate signed by root-cert."""
    root_key, int_key = pki.generate_key(), pki.generate_key()
    root = make_ca_cert("Root CA", root_key, None, None, days=3650)
    inter = make_ca_cert("Intermediate CA", int_key, root, root_key)
    ca_dir = tmp_path / "plugged"
    ca_dir.mkdir()
    (ca_dir / CA_CERT).write_bytes(pki.certificate_pem(inter))
    (ca_dir / CA_KEY).write_bytes(pki.private_key_pem(int_key))
    (ca_dir / ROOT_CERT).write_bytes(pki.certificate_pem(root))
    (ca_dir / CERT_CHAIN).write_bytes(pki.certificate_pem(inter) + pki.certificate_pem(root))

    async def scenario():
        # The client trusts only the root: the serving certificate must chain through the intermediate.
        async with running_ca(env.config(ca_dir=str(ca_dir))) as server, client_for(server) as client:
            assert server.root_pem == pki.certificate_pem(root)
            return await client.create_certificate(new_csr(API_URI), 60, API_URI)

    chain = run(scenario())
    certs = [x509.load_pem_x509_certificate(c.encode()) for c in chain]
    assert len(certs) == 3 and certs[1] == inter and certs[2] == root
    assert certs[0].issuer == inter.subject
    verify_chain(chain, pki.certificate_pem(root), tmp_path)
    assert sorted(p.name for p in ca_dir.iterdir() if not p.name.startswith(".")) == sorted(
        [CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN])             # nothing was written or replaced
