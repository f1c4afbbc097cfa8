"""Mesh identities: SPIFFE IDs, the CA (`ambient-agent ca`) and the node agent's certificates.

    spiffe.py    WorkloadIdentity, strict SPIFFE ID parsing, a pod's identity      (pure)
    policy.py    the CA's decisions: authorise, validate_csr, clamp_ttl            (pure)
    pki.py       keys, CSRs, roots and leaves                                      (pure)
    material.py  signing material from an Istio cacerts directory                  (files)
    authn.py     bearer-token authentication of node agents                        (files)
    ca.py        the gRPC CA server (Istio's IstioCertificateService)              (network)
    client.py    CaClient for that API: gRPC over HTTP/2 with h2, no grpcio        (network)
    manager.py   CertificateManager: per-identity keys, certificates, renewal      (asyncio)
    bundle.py    TrustBundle: the root file, reloaded on change                    (files)
    node.py      a node agent's identities wired together with the TLS contexts
    cli.py       the `ca` sub-command's flags
"""
