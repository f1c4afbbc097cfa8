"""The CA's pure decisions: authorisation, CSR validation, TTLs and durations."""

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from agent.ca.authn import Caller, ServiceAccount, parse_service_account
from agent.ca.rules import (AuthorisationError, CsrError, TtlError, authorise, clamp_ttl,
                            parse_duration, validate_csr)
from agent.identity import pki
from agent.identity.spiffe import WorkloadIdentity
from agent.state.model import ClusterState
from tests import builders

TD = "cluster.local"


def pod(name, ns, node, sa=None, phase="Running"):
    return builders.pod(name, ns, node=node, sa=sa, phase=phase)


STATE = ClusterState.from_items([
    pod("api-1", "backend", "node-a", "api"),
    pod("web-1", "frontend", "node-b", "web"),
    pod("plain", "tools", "node-a"),                           # default service account
    pod("done", "batch", "node-a", "job", phase="Succeeded"),
    pod("broken", "batch", "node-a", "job2", phase="Failed"),
    pod("pending", "batch", "node-a", "job3", phase="Pending"),
    {"kind": "Pod", "metadata": {"name": "nowhere", "namespace": "backend"},
     "spec": {"serviceAccountName": "unscheduled"}},
])

AUTHORISE = [
    # node, impersonated, expected URI or an error fragment
    ("node-a", "spiffe://cluster.local/ns/backend/sa/api", "spiffe://cluster.local/ns/backend/sa/api"),
    ("node-a", "spiffe://cluster.local/ns/tools/sa/default", "spiffe://cluster.local/ns/tools/sa/default"),
    ("node-a", "spiffe://cluster.local/ns/batch/sa/job3", "spiffe://cluster.local/ns/batch/sa/job3"),
    ("node-b", "spiffe://cluster.local/ns/frontend/sa/web", "spiffe://cluster.local/ns/frontend/sa/web"),
    ("node-a", None, "did not name the identity"),
    ("node-a", "", "did not name the identity"),
    ("node-a", "spiffe://cluster.local/ns/frontend/sa/web",
     "node 'node-a' runs no pod with service account 'web' in namespace 'frontend'"),
    ("node-b", "spiffe://cluster.local/ns/backend/sa/api", "node 'node-b' runs no pod"),
    ("node-a", "spiffe://other.domain/ns/backend/sa/api",
     "is in trust domain 'other.domain'; this CA signs only for 'cluster.local'"),
    ("node-a", "spiffe://cluster.local/ns/backend/sa/api/x", "not an Istio SPIFFE ID"),
    ("node-a", "backend/api", "not an Istio SPIFFE ID"),
    ("node-a", "spiffe://cluster.local/ns/batch/sa/job", "runs no pod"),        # Succeeded
    ("node-a", "spiffe://cluster.local/ns/batch/sa/job2", "runs no pod"),       # Failed
    ("node-a", "spiffe://cluster.local/ns/backend/sa/unscheduled", "runs no pod"),
    ("node-c", "spiffe://cluster.local/ns/backend/sa/api", "node 'node-c' runs no pod"),
    ("node-a", "spiffe://cluster.local/ns/backend/sa/default", "runs no pod"),  # ns right, sa wrong
]


AGENT = ServiceAccount("istio-system", "ambient-agent")


def node_agent(node: str, account: ServiceAccount | None = None) -> Caller:
    """A node agent: from the lab's token file (no account) or TokenReview (the agent's account)."""
    return Caller(node=node, principal="test", service_account=account)


def check(caller, impersonated, expected, state=STATE):
    if expected.startswith("spiffe://"):
        assert authorise(caller, impersonated, state, TD, AGENT).uri == expected
    else:
        with pytest.raises(AuthorisationError) as err:
            authorise(caller, impersonated, state, TD, AGENT)
        assert expected in str(err.value)


@pytest.mark.parametrize("node,impersonated,expected", AUTHORISE)
def test_node_agent_from_the_token_file(node, impersonated, expected):
    check(node_agent(node), impersonated, expected)


@pytest.mark.parametrize("node,impersonated,expected", AUTHORISE)
def test_node_agent_by_service_account_has_the_same_rules(node, impersonated, expected):
    check(node_agent(node, AGENT), impersonated, expected)


# A caller authenticated as some service account other than the node agent's.
WORKLOAD_STATE = ClusterState.from_items(list(STATE.pods.values()) + [
    pod("api-2", "backend", "node-b", "api"),
    pod("old", "batch", "node-b", "job", phase="Succeeded"),
])

WORKLOAD = [
    # node, (namespace, service account), impersonated, expected URI or error fragment
    # Its own identity, asked for implicitly or by name, while a pod runs as it on its node.
    ("node-a", ("backend", "api"), None, "spiffe://cluster.local/ns/backend/sa/api"),
    ("node-a", ("backend", "api"), "", "spiffe://cluster.local/ns/backend/sa/api"),
    ("node-a", ("backend", "api"), "spiffe://cluster.local/ns/backend/sa/api",
     "spiffe://cluster.local/ns/backend/sa/api"),
    ("node-b", ("backend", "api"), None, "spiffe://cluster.local/ns/backend/sa/api"),
    ("node-a", ("tools", "default"), None, "spiffe://cluster.local/ns/tools/sa/default"),
    # Impersonation by anyone but the node agent: refused, even for a pod on its node.
    ("node-a", ("backend", "api"), "spiffe://cluster.local/ns/tools/sa/default",
     "service account backend/api is not the node agent's service account "
     "(istio-system/ambient-agent), so it may not impersonate"),
    ("node-a", ("backend", "api"), "spiffe://cluster.local/ns/frontend/sa/web",
     "may request only its own identity spiffe://cluster.local/ns/backend/sa/api"),
    ("node-a", ("backend", "api"), "spiffe://other.domain/ns/backend/sa/api", "may not impersonate"),
    ("node-a", ("backend", "api"), "backend/api", "may not impersonate"),
    # An account named like the agent's in another namespace is not the agent.
    ("node-a", ("default", "ambient-agent"), "spiffe://cluster.local/ns/backend/sa/api",
     "service account default/ambient-agent is not the node agent's"),
    # Its own identity, but no live pod runs as it on its node.
    ("node-b", ("tools", "default"), None,
     "node 'node-b' runs no pod with service account 'default' in namespace 'tools', so service "
     "account tools/default calling from it may not have identity spiffe://cluster.local/ns/tools/sa/default"),
    ("node-b", ("batch", "job"), None, "runs no pod"),                          # Succeeded only
    ("node-c", ("backend", "api"), None, "node 'node-c' runs no pod"),
]


@pytest.mark.parametrize("node,account,impersonated,expected", WORKLOAD)
def test_other_service_accounts_get_only_their_own_identity(node, account, impersonated, expected):
    caller = Caller(node=node, principal="test", service_account=ServiceAccount(*account))
    check(caller, impersonated, expected, WORKLOAD_STATE)


def test_without_a_configured_agent_account_no_service_account_impersonates():
    caller = Caller(node="node-a", principal="test", service_account=AGENT)
    with pytest.raises(AuthorisationError, match="may not impersonate"):
        authorise(caller, "spiffe://cluster.local/ns/backend/sa/api", STATE, TD, None)


def test_refusal_names_identity_and_node():
    with pytest.raises(AuthorisationError) as err:
        authorise(node_agent("node-b"), "spiffe://cluster.local/ns/backend/sa/api", STATE, TD)
    assert "spiffe://cluster.local/ns/backend/sa/api" in str(err.value)
    assert "node-b" in str(err.value)


def test_empty_cluster_authorises_nobody():
    with pytest.raises(AuthorisationError):
        authorise(node_agent("node-a"), "spiffe://cluster.local/ns/backend/sa/api", ClusterState(), TD)
    with pytest.raises(AuthorisationError):
        authorise(Caller("node-a", "test", ServiceAccount("backend", "api")), None, ClusterState(), TD)


@pytest.mark.parametrize("text,expected", [
    ("istio-system/ambient-agent", ServiceAccount("istio-system", "ambient-agent")),
    ("ns/sa.with.dots", ServiceAccount("ns", "sa.with.dots")),
    ("ambient-agent", "expected NAMESPACE/NAME"),
    ("/ambient-agent", "expected NAMESPACE/NAME"),
    ("istio-system/", "expected NAMESPACE/NAME"),
    ("Istio/agent", "not a DNS-1123 label"),
    ("ns/a/b", "not a DNS-1123 subdomain"),
])
def test_parse_service_account(text, expected):
    if isinstance(expected, ServiceAccount):
        assert parse_service_account(text) == expected
        assert str(expected) == text
    else:
        with pytest.raises(ValueError, match=expected):
            parse_service_account(text)


# -- CSRs -----------------------------------------------------------------------

ME = WorkloadIdentity(TD, "backend", "api")


def make_csr(key=None, names=None, subject=None) -> str:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject or x509.Name([]))
    if names is None:
        names = [x509.UniformResourceIdentifier(ME.uri)]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=True)
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM).decode()


def _der_children(der: bytes) -> list[bytes]:
    """The TLVs inside a DER SEQUENCE (enough DER for a CSR's three parts)."""
    assert der[0] == 0x30

    def read_len(buf, i):
        first = buf[i]
        if first < 0x80:
            return first, i + 1
        n = first & 0x7F
        return int.from_bytes(buf[i + 1:i + 1 + n], "big"), i + 1 + n

    length, i = read_len(der, 1)
    end, out = i + length, []
    while i < end:
        start = i
        length, j = read_len(der, i + 1)
        i = j + length
        out.append(der[start:i])
    return out


def _der_sequence(parts: list[bytes]) -> bytes:
    body = b"".join(parts)
    n = len(body)
    length = bytes([n]) if n < 0x80 else bytes([0x80 | ((n.bit_length() + 7) // 8)]) + n.to_bytes((n.bit_length() + 7) // 8, "big")
    return b"\x30" + length + body


def forged_csr() -> str:
    """A CSR whose request info (and key) comes from one key and whose signature from another."""
    a = x509.load_pem_x509_csr(make_csr().encode())
    b = x509.load_pem_x509_csr(make_csr().encode())
    info, alg, _ = _der_children(a.public_bytes(serialization.Encoding.DER))
    _, _, sig = _der_children(b.public_bytes(serialization.Encoding.DER))
    der = _der_sequence([info, alg, sig])
    return x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM).decode()


CSR_CASES = [
    ("good EC P-256", lambda: make_csr(), None),
    ("good RSA-2048", lambda: make_csr(rsa.generate_private_key(65537, 2048)), None),
    ("subject is ignored", lambda: make_csr(subject=x509.Name(
        [x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "x")])), None),
    ("empty", lambda: "", "the request has no CSR"),
    ("garbage", lambda: "hello", "not a PEM certificate request"),
    ("certificate instead of CSR", lambda: pki.certificate_pem(
        pki.create_root("x", pki.utcnow())[0]).decode(), "not a PEM certificate request"),
    ("too large", lambda: "A" * 20000, "bytes (at most"),
    ("bad signature", forged_csr, "signature does not verify"),
    ("P-384 key", lambda: make_csr(ec.generate_private_key(ec.SECP384R1())), "only P-256"),
    ("RSA-1024", lambda: make_csr(rsa.generate_private_key(65537, 1024)), "RSA-1024"),
    ("Ed25519", lambda: make_csr(ed25519.Ed25519PrivateKey.generate()), "only ECDSA P-256 and RSA"),
    ("no SAN", lambda: make_csr(names=[]), "has no subjectAltName"),
    ("other identity", lambda: make_csr(names=[x509.UniformResourceIdentifier(
        "spiffe://cluster.local/ns/backend/sa/admin")]),
     "asks for subjectAltName ['spiffe://cluster.local/ns/backend/sa/admin']"),
    ("two URIs", lambda: make_csr(names=[x509.UniformResourceIdentifier(ME.uri),
                                        x509.UniformResourceIdentifier("spiffe://cluster.local/ns/x/sa/y")]),
     "expected exactly ['spiffe://cluster.local/ns/backend/sa/api']"),
    ("extra DNS name", lambda: make_csr(names=[x509.UniformResourceIdentifier(ME.uri),
                                              x509.DNSName("api.backend.svc")]),
     "DNSName:api.backend.svc"),
    ("DNS only", lambda: make_csr(names=[x509.DNSName("api")]), "expected exactly"),
]


@pytest.mark.parametrize("name,make,error", CSR_CASES, ids=[c[0] for c in CSR_CASES])
def test_validate_csr(name, make, error):
    pem = make()
    if error is None:
        csr = validate_csr(pem, ME)
        assert pki.uri_sans(csr) == [ME.uri]
        assert validate_csr(pem.encode(), ME) is not None      # bytes work too
    else:
        with pytest.raises(CsrError) as err:
            validate_csr(pem, ME)
        assert error in str(err.value)


def test_pki_build_csr_is_accepted():
    assert validate_csr(pki.build_csr(pki.generate_key(), ME.uri), ME)


# -- TTL and durations ------------------------------------------------------------------

@pytest.mark.parametrize("requested,default,maximum,expected", [
    (0, 86400, 172800, 86400),          # 0 asks for the default
    (3600, 86400, 172800, 3600),
    (172800, 86400, 172800, 172800),
    (172801, 86400, 172800, 172800),    # clamped, not refused
    (10 ** 15, 86400, 172800, 172800),
    (0, 86400, 3600, 3600),             # the default is clamped too
    (4, 86400, 172800, 4),
])
def test_clamp_ttl(requested, default, maximum, expected):
    assert clamp_ttl(requested, default, maximum) == expected


@pytest.mark.parametrize("requested,maximum,message", [
    (-1, 100, "must not be negative"),
    (10, 0, "maximum TTL must be positive"),
])
def test_clamp_ttl_refuses(requested, maximum, message):
    with pytest.raises(TtlError, match=message):
        clamp_ttl(requested, 10, maximum)


@pytest.mark.parametrize("text,seconds", [
    ("48h", 172800), ("24h", 86400), ("30m", 1800), ("90s", 90), ("1h30m", 5400),
    ("2d", 172800), ("3600", 3600), ("1.5h", 5400), ("1500ms", 1), (" 4s ", 4),
])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "4x", "1h 30m", "-5s", "10ms", "0", "1h30", "s4"])
def test_parse_duration_refuses(text):
    with pytest.raises(ValueError):
        parse_duration(text)
