"""The cacerts directory: self-signed root creation and reuse, plug-in material checks."""

from __future__ import annotations

import datetime as dt
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from agent.ca.material import (CA_CERT, CA_KEY, CERT_CHAIN, ROOT_CERT, DirectorySigningSource,
                               MaterialError)
from agent.identity import pki

from .conftest import make_ca_cert


def test_empty_directory_gets_a_root_that_is_reused(tmp_path):
    ca_dir = tmp_path / "new" / "cacerts"                       # not even there yet
    material = DirectorySigningSource(str(ca_dir)).load()
    root = material.root
    assert material.cert == root and material.intermediates == ()
    assert material.issuer_chain() == [root]

    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert isinstance(root.public_key().curve, ec.SECP256R1)
    bc = root.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    assert root.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    life = root.not_valid_after_utc - root.not_valid_before_utc
    assert dt.timedelta(days=3649) < life < dt.timedelta(days=3651)
    assert pki.is_self_signed(root)

    modes = {name: stat.S_IMODE(os.stat(ca_dir / name).st_mode)
             for name in (CA_CERT, CA_KEY, ROOT_CERT, CERT_CHAIN)}
    assert modes[CA_KEY] == 0o600
    assert all(m & 0o077 == 0o044 for name, m in modes.items() if name != CA_KEY)
    assert stat.S_IMODE(os.stat(ca_dir).st_mode) == 0o700

    again = DirectorySigningSource(str(ca_dir)).load()
    assert again.root == root
    assert pki.same_public_key(again.key.public_key(), material.key.public_key())


def _plugged(tmp_path, files: dict[str, bytes]) -> str:
    ca_dir = tmp_path / "plugged"
    ca_dir.mkdir(exist_ok=True)
    for name, data in files.items():
        (ca_dir / name).write_bytes(data)
        os.chmod(ca_dir / name, 0o600)
    return str(ca_dir)


@pytest.fixture(scope="module")
def pki_tree():
    root_key, int_key, int2_key = pki.generate_key(), pki.generate_key(), pki.generate_key()
    root = make_ca_cert("Root CA", root_key, None, None, days=3650)
    inter = make_ca_cert("Intermediate CA", int_key, root, root_key)
    inter2 = make_ca_cert("Issuing CA", int2_key, inter, int_key)
    return dict(root=root, root_key=root_key, inter=inter, int_key=int_key, inter2=inter2, int2_key=int2_key)


def pem(*certs) -> bytes:
    return b"".join(pki.certificate_pem(c) for c in certs)


def test_two_level_intermediates_are_ordered(tmp_path, pki_tree):
    t = pki_tree
    ca_dir = _plugged(tmp_path, {
        CA_CERT: pem(t["inter2"]), CA_KEY: pki.private_key_pem(t["int2_key"]),
        ROOT_CERT: pem(t["root"]),
        CERT_CHAIN: pem(t["root"], t["inter"], t["inter2"]),     # any order, root included
    })
    material = DirectorySigningSource(ca_dir).load()
    assert material.issuer_chain() == [t["inter2"], t["inter"], t["root"]]


def test_root_rotation_bundle(tmp_path, pki_tree):
    t = pki_tree
    other = pki.create_root("next root", pki.utcnow())[0]
    ca_dir = _plugged(tmp_path, {
        CA_CERT: pem(t["inter"]), CA_KEY: pki.private_key_pem(t["int_key"]),
        ROOT_CERT: pem(other, t["root"]),
    })
    material = DirectorySigningSource(ca_dir).load()
    assert material.root == t["root"]
    assert material.roots_pem() == pem(other, t["root"])


def test_bad_material_is_refused(tmp_path, pki_tree):
    t = pki_tree
    stranger_root, stranger_key = pki.create_root("stranger", pki.utcnow())
    now = pki.utcnow()
    expired_key = pki.generate_key()
    expired = pki.create_root("old", now - dt.timedelta(days=20), dt.timedelta(days=10))
    leaf = pki.sign_workload(pki.generate_key().public_key(), "spiffe://cluster.local/ns/a/sa/b",
                             t["root"], t["root_key"], now, dt.timedelta(hours=1))
    cases = [
        ({CA_CERT: pem(t["inter"])}, "has ca-cert.pem but not ca-key.pem, root-cert.pem: refusing to guess"),
        ({CA_CERT: pem(t["inter"]), CA_KEY: pki.private_key_pem(t["root_key"]), ROOT_CERT: pem(t["root"])},
         "ca-key.pem is not the key of ca-cert.pem"),
        ({CA_CERT: pem(t["inter2"]), CA_KEY: pki.private_key_pem(t["int2_key"]), ROOT_CERT: pem(t["root"])},
         "is in neither root-cert.pem nor cert-chain.pem"),
        ({CA_CERT: pem(t["inter"]), CA_KEY: pki.private_key_pem(t["int_key"]), ROOT_CERT: pem(stranger_root)},
         "cannot chain"),
        ({CA_CERT: pem(expired[0]), CA_KEY: pki.private_key_pem(expired[1]), ROOT_CERT: pem(expired[0])},
         "ca-cert.pem expired at"),
        ({CA_CERT: pem(leaf), CA_KEY: pki.private_key_pem(expired_key), ROOT_CERT: pem(t["root"])},
         "is not the key of"),
        ({CA_CERT: b"junk", CA_KEY: pki.private_key_pem(t["int_key"]), ROOT_CERT: pem(t["root"])},
         "ca-cert.pem: no certificate found"),
        ({CA_CERT: pem(t["inter"]), CA_KEY: b"junk", ROOT_CERT: pem(t["root"])},
         "ca-key.pem: not an unencrypted PEM private key"),
    ]
    for index, (files, message) in enumerate(cases):
        ca_dir = tmp_path / f"case{index}"
        ca_dir.mkdir()
        for name, data in files.items():
            (ca_dir / name).write_bytes(data)
        with pytest.raises(MaterialError) as err:
            DirectorySigningSource(str(ca_dir)).load()
        assert message in str(err.value), (index, str(err.value))
        assert not (ca_dir / ROOT_CERT).exists() or files.get(ROOT_CERT), "nothing is created over bad material"


def test_a_leaf_as_ca_cert_is_not_a_ca(tmp_path, pki_tree):
    t = pki_tree
    key = pki.generate_key()
    leaf = pki.sign_workload(key.public_key(), "spiffe://cluster.local/ns/a/sa/b", t["root"], t["root_key"],
                             pki.utcnow(), dt.timedelta(hours=1))
    ca_dir = _plugged(tmp_path, {CA_CERT: pem(leaf), CA_KEY: pki.private_key_pem(key), ROOT_CERT: pem(t["root"])})
    with pytest.raises(MaterialError, match="is not a CA certificate"):
        DirectorySigningSource(ca_dir).load()
