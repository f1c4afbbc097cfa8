"""The real ``kubectl`` binary against the stand-in API server.

Pins that the verbs our users run work end to end from a cold discovery
cache: discovery (aggregated, and the per-group-version fallback), short
names, ``label``, ``apply`` (client-side, the default), ``get -o yaml``.

kubectl is given a TLS kubeconfig with a bearer token: over plain HTTP
client-go sends no bearer token at all (pinned below).

``kubectl apply`` runs with ``--validate=false``: the stand-in publishes no
OpenAPI (``/openapi/v2`` is protobuf-only and ``/openapi/v3`` would have to
carry real schemas to honour the server-side field validation kubectl asks
for), and kubectl refuses to validate without it (pinned below). Client-side
apply itself does not need OpenAPI: for built-in kinds kubectl takes the
strategic-merge metadata from its compiled-in types (the stand-in applies the
resulting directives, see patch.py), and for the Istio kinds it sends a JSON
merge patch.
"""

from __future__ import annotations

import json

import pytest
import yaml

from lab.kubeapi import objects
from tests.kubeapi.kubectl import Kubectl, need_kubectl
from lab.kubeapi.server import KubeApiServer


@pytest.fixture(params=[True, False], ids=["aggregated", "legacy-discovery"])
def tls_api(request):
    with KubeApiServer(tls=True, aggregated_discovery=request.param) as api:
        yield api


@pytest.fixture
def kubectl(tls_api, tmp_path):
    return Kubectl(need_kubectl(), tls_api.kubeconfig(tmp_path / "kubeconfig"), tmp_path / "home")


def _seed(api):
    api.create(objects.namespace("ns1"))
    api.create(objects.pod("web-0", "ns1", ip="10.244.0.5"))
    api.create(objects.service("web", "ns1"))
    api.create(objects.authorization_policy("allow-web", "ns1"))
    api.create(objects.peer_authentication("strict", "ns1"))


def test_discovery_and_short_names(tls_api, kubectl):
    _seed(tls_api)
    out = kubectl.run("get", "po,svc,ap,pa", "-n", "ns1", "-o", "name").stdout.split()
    assert out == ["pod/web-0", "service/web", "authorizationpolicy.security.istio.io/allow-web",
                   "peerauthentication.security.istio.io/strict"]
    assert "namespace/ns1" in kubectl.run("get", "ns", "-o", "name").stdout.split()
    # The Istio kinds resolve to the preferred version, v1.
    assert tls_api.requests_matching("/apis/security.istio.io/v1/namespaces/ns1/authorizationpolicies")
    per_gv = tls_api.requests_matching("/apis/security.istio.io/v1")
    accepts = {r.headers.get("Accept", "") for r in tls_api.requests_matching("/apis")}
    assert any("g=apidiscovery.k8s.io" in a for a in accepts)
    # kubectl 1.30+ asks for v2, which the stand-in serves (1.26-1.29 ask for v2beta1 only).
    if tls_api.aggregated_discovery and any("g=apidiscovery.k8s.io;v=v2;" in a for a in accepts):
        assert per_gv == [], "aggregated discovery needs no per-group-version request"
    else:
        assert per_gv and tls_api.requests_matching("/api/v1"), "kubectl did not fall back"


def test_kubectl_over_plain_http_sends_no_token(tmp_path):
    """Why the tests use TLS: client-go drops the bearer token on plain HTTP."""
    with KubeApiServer() as api:
        k = Kubectl(need_kubectl(), api.kubeconfig(tmp_path / "kc"), tmp_path / "home")
        done = k.run("get", "ns", check=False)
        assert done.returncode != 0 and "provide credentials" in done.stderr
        assert api.requests and not any("Authorization" in r.headers for r in api.requests)


def test_a_wrong_token_is_refused(tls_api, tmp_path):
    k = Kubectl(need_kubectl(), tls_api.kubeconfig(tmp_path / "bad", token="wrong"), tmp_path / "home")
    done = k.run("get", "ns", check=False)
    assert done.returncode != 0 and "must be logged in" in done.stderr


def test_label_and_unlabel_a_namespace(tls_api, kubectl):
    tls_api.create(objects.namespace("ns1"))
    assert "labeled" in kubectl.run("label", "namespace", "ns1", "istio.io/dataplane-mode=ambient").stdout
    labels = tls_api.get("Namespace", "", "ns1")["metadata"]["labels"]
    assert labels == {"kubernetes.io/metadata.name": "ns1", "istio.io/dataplane-mode": "ambient"}
    assert tls_api.requests_matching("/api/v1/namespaces/ns1", method="PATCH")
    kubectl.run("label", "ns", "ns1", "istio.io/dataplane-mode-")
    assert "istio.io/dataplane-mode" not in tls_api.get("Namespace", "", "ns1")["metadata"]["labels"]


MANIFEST = """
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: cart, namespace: shop, labels: {app: cart}}
spec:
  containers:
  - name: app
    image: registry.example/cart:1
    env: [{name: MODE, value: a}, {name: DEBUG, value: "1"}]
---
apiVersion: v1
kind: Service
metadata: {name: cart, namespace: shop}
spec:
  selector: {app: cart}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: admin, port: 9090, targetPort: 9090}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["9090"]}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""

# The same objects edited as a user would: a label changed, an env var and a
# port dropped, the policy's rules replaced, the mTLS mode changed.
EDITED = (MANIFEST.replace("labels: {app: cart}", "labels: {app: cart, v: '2'}")
          .replace(', {name: DEBUG, value: "1"}', "")
          .replace(", {name: admin, port: 9090, targetPort: 9090}", "")
          .replace('ports: ["9090"]', 'ports: ["9091"]')
          .replace("mode: STRICT", "mode: PERMISSIVE"))


def _applied(kubectl, text):
    """kubectl apply's verdict per object: {"pod/cart": "created", ...}."""
    done = kubectl.run("apply", "--validate=false", "-f", "-", stdin=text)
    return dict(line.rsplit(" ", 1) for line in done.stdout.splitlines())


def test_apply_creates_updates_and_leaves_unchanged_the_five_kinds(tls_api, kubectl):
    names = ["namespace/shop", "pod/cart", "service/cart",
             "authorizationpolicy.security.istio.io/deny-admin",
             "peerauthentication.security.istio.io/default"]
    assert _applied(kubectl, MANIFEST) == dict.fromkeys(names, "created")
    assert _applied(kubectl, MANIFEST) == dict.fromkeys(names, "unchanged")
    assert _applied(kubectl, EDITED) == {**dict.fromkeys(names, "configured"),
                                         "namespace/shop": "unchanged"}
    pod = tls_api.get("Pod", "shop", "cart")
    assert pod["metadata"]["labels"] == {"app": "cart", "v": "2"}
    assert pod["spec"]["containers"][0]["env"] == [{"name": "MODE", "value": "a"}]
    assert tls_api.get("Service", "shop", "cart")["spec"]["ports"] == [
        {"name": "http", "port": 80, "targetPort": 8080}]
    policy = tls_api.get("AuthorizationPolicy", "shop", "deny-admin")
    assert policy["spec"]["rules"] == [{"to": [{"operation": {"ports": ["9091"]}}]}]
    assert tls_api.get("PeerAuthentication", "shop", "default")["spec"]["mtls"]["mode"] == "PERMISSIVE"
    assert tls_api.get("Namespace", "", "shop")["metadata"]["labels"]["istio.io/dataplane-mode"] == "ambient"
    # The Istio kinds were patched with merge patches, the built-in kinds strategically.
    kinds = {r.path.split("/")[-2]: r.headers["Content-Type"] for r in tls_api.requests if r.method == "PATCH"}
    assert kinds == {"pods": "application/strategic-merge-patch+json",
                     "services": "application/strategic-merge-patch+json",
                     "authorizationpolicies": "application/merge-patch+json",
                     "peerauthentications": "application/merge-patch+json"}
    stored = [tls_api.get("Service", "shop", "cart"), tls_api.get("Pod", "shop", "cart")]
    assert "$" not in json.dumps(stored)         # no patch directive was stored
    done = kubectl.run("delete", "-f", "-", stdin=EDITED)
    assert len(done.stdout.splitlines()) == 5 and "deleted" in done.stdout
    assert tls_api.get("Pod", "shop", "cart") is None and tls_api.get("Namespace", "", "shop") is None


def test_apply_without_validate_false_needs_openapi_which_the_stand_in_lacks(tls_api, kubectl):
    done = kubectl.run("apply", "-f", "-", stdin=MANIFEST, check=False)
    assert done.returncode != 0 and "failed to download openapi" in done.stderr
    assert tls_api.get("Namespace", "", "shop") is None


def test_get_pod_yaml_shows_annotations(tls_api, kubectl):
    tls_api.create(objects.pod("web-0", "ns1", annotations={"ambient.istio.io/redirection": "enabled"}))
    pod = yaml.safe_load(kubectl.run("get", "pod", "web-0", "-n", "ns1", "-o", "yaml").stdout)
    assert pod["kind"] == "Pod" and pod["metadata"]["annotations"] == {
        "ambient.istio.io/redirection": "enabled"}


def test_typed_create_sends_protobuf_which_the_stand_in_refuses(tls_api, kubectl):
    """A known limit: `kubectl create namespace` (kubectl 1.30+) encodes protobuf;
    the stand-in decodes JSON only and says so; `create -f` sends JSON."""
    done = kubectl.run("create", "namespace", "typed", check=False)
    (post,) = tls_api.requests_matching("/api/v1/namespaces", method="POST")
    if post.headers["Content-Type"] == "application/vnd.kubernetes.protobuf":
        assert done.returncode != 0 and "accepts application/json only" in done.stderr
        assert tls_api.get("Namespace", "", "typed") is None
    else:                                   # older kubectl: JSON, created
        assert done.returncode == 0, done.stderr
        kubectl.run("delete", "namespace", "typed")
    kubectl.run("create", "--validate=false", "-f", "-", stdin="apiVersion: v1\nkind: Namespace\nmetadata: {name: typed}\n")
    assert tls_api.get("Namespace", "", "typed") is not None
