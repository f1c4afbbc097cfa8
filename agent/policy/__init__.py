"""Istio L4 authorization for the node agent: AuthorizationPolicy and PeerAuthentication.

Modules (all pure except ``cli``; nothing heavy is imported here, the CLI
imports this package on every start):

* ``model``: the values (rules, matchers, scopes, policies) and how they match;
* ``parse``: ``security.istio.io/v1`` and ``v1beta1`` objects -> model, with
  ``Rejection`` and report lines;
* ``request``: ``InboundRequest`` and ``PolicyDecision``, the contract the
  data plane (``agent/proxy/forward.py``) imports;
* ``engine``: ``PolicySet.from_state(state).evaluate(InboundRequest, pod) -> PolicyDecision``;
* ``hook``: ``make_hook``, the data plane's ``DataPlane.policy``: finds the
  destination pod in the current state, evaluates, fails closed;
* ``cli``: ``ambient-agent policy check|explain``.

Choices made where Istio is silent, ambiguous, or ztunnel differs from the docs:

* Invalid objects are rejected one by one (one ``Rejection`` naming every
  problem); others are unaffected. Istio's webhook would have refused them,
  so there is no Istio behaviour to copy: the node agent takes the stricter
  reading. A rejected ALLOW allows nothing but still counts as an ALLOW
  policy for the workloads it selects; a rejected DENY (including Istio's
  "DENY without rules"), CUSTOM, or policy with an unreadable action denies
  every connection to them; a rejected AUDIT has no effect; a selector that
  cannot be read selects the whole namespace (the whole mesh from the root
  namespace); a rejected waypoint (targetRefs) policy has no local effect.
  A rejected PeerAuthentication is STRICT at its level, without port-level
  settings.
* Validation follows Istio's webhook and CRD schema and adds: unknown
  fields, wrong types (``ports: [8080]``), ``*`` anywhere but the whole
  value or one end, principals with ``spiffe://``, whitespace.
* Plaintext (no peer identity) never matches principals, namespaces or
  serviceAccounts, and always matches their ``not*`` forms
  (ISTIO-SECURITY-2021-004; ztunnel's rbac behaves the same).
* L7 attributes: an ALLOW rule using one is dropped (stricter); DENY, AUDIT
  and CUSTOM rules lose only those attributes and a ``from``/``to`` entry or
  condition left empty matches every connection (broader), which is what
  istiod's message promises. (ztunnel itself skips an empty match, so a
  DENY ``to: [{operation: {methods: [...]}}]`` denies nothing there; we
  follow the documented "more restrictive" intent.)
* CUSTOM cannot be delegated from a node agent: it is enforced as a DENY of
  what its rules match (L7 parts dropped, so in practice every connection to
  the workloads it selects); with no rules it never applies, as in Istio.
  ztunnel ignores CUSTOM; we fail closed instead.
* ``when: source.serviceAccount`` is evaluated (it is L4 information;
  ztunnel treats it as L7). A bare ``serviceAccounts`` entry (no ``ns/``)
  is in the policy's namespace, as Istio reads it.
* Principals in the ``cluster.local`` trust domain mean the mesh's trust
  domain (Istio's trust-domain bundle rewrite).
* A selector in the root namespace matches workloads of every namespace
  (Istio's documentation); without a selector a root policy is mesh-wide.
* PeerAuthentication: workload > namespace > root namespace, UNSET
  inherits, several at one level: the oldest creationTimestamp (then name)
  wins; DISABLE is enforced as PERMISSIVE (reported); portLevelMtls needs a
  non-empty selector (Istio rejects it otherwise, so do we); a selector PA
  in the root namespace is ignored (istiod's ambient conversion does so).
  The STRICT check comes before every AuthorizationPolicy.
* A missing ``metadata.namespace`` is ``default``. IPv4-mapped IPv6
  connection addresses are compared as IPv4. A source identity that is not
  a SPIFFE workload ID, an unknown destination pod (hook) or an engine
  error deny.
"""
