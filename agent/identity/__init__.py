"""Mesh identities on the node agent's side: SPIFFE IDs and the agent's certificates.

    spiffe.py    WorkloadIdentity, strict SPIFFE ID parsing, a pod's identity      (pure)
    pki.py       keys, CSRs, roots and leaves                                      (pure)
    client.py    CaClient for Istio's certificate API: gRPC over HTTP/2 with h2    (network)
    manager.py   CertificateManager: per-identity keys, certificates, renewal      (asyncio)
    bundle.py    TrustBundle: the root file, reloaded on change                    (files)
    node.py      a node agent's identities wired together with the TLS contexts
    proto/       the certificate API's messages, shared with the CA (generated)

The CA server that signs these certificates is its own package, ``agent.ca``;
nothing here imports it.
"""
