"""The CA (``ambient-agent ca``): signs workload certificates for node agents.

A separate process from the node agent, speaking Istio's certificate API
(``agent/identity/proto``) on grpcio. It builds on ``agent.identity`` (SPIFFE
IDs, PKI helpers, the API's messages) and on the cluster model; nothing in the
agent imports this package.

    rules.py     authorisation and CSR rules: authorise, validate_csr, clamp_ttl  (pure)
    authn.py     who is calling: bearer tokens, the lab's token file            (files)
    kubeauth.py  who is calling in a cluster: Kubernetes TokenReview             (network)
    material.py  signing material from an Istio cacerts directory                (files)
    server.py    the gRPC server (Istio's IstioCertificateService)               (network)
    cli.py       the `ca` sub-command's flags
"""
