"""Helm chart (charts/ambient-agent) and Dockerfile checks with real tools.

Tools: `helm` and `kubectl` (`make chart-tools` puts the official static
binaries in .tools/bin; a kubectl on PATH also serves) and
`kubernetes-validate` (PyPI, in .venv). `make test` installs them first; run
alone, these tests skip, saying why, only when a tool is absent. helm runs with HOME and XDG_* in a temporary directory, so it neither
reads nor writes the user's helm configuration.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "ambient-agent"
NAMESPACE = "istio-system"
RELEASE = "t"
K8S_VERSION = "1.30.0"
# The chart has no default image (none is published): every render names one.
IMAGE = {"image.repository": "registry.example/mesh/ambient-agent"}
EXTRAS = {"metrics.podMonitor.enabled": "true", "metrics.dashboard.enabled": "true"}
# Everything optional switched on at once: GKE quota and bin dir, SELinux, a
# caRoot ConfigMap, one CA replica without a budget.
PLATFORM = {"platform": "gke", "agent.seLinuxOptions.type": "spc_t", "caRoot.pem": "PEM",
            "ca.replicas": "1", "ca.podDisruptionBudget.enabled": "false"}

# The design: exactly these rules, nothing more.
AGENT_RULES = {
    ("", "pods", "get", ()), ("", "pods", "list", ()), ("", "pods", "watch", ()),
    ("", "pods", "patch", ()),
    ("", "namespaces", "get", ()), ("", "namespaces", "list", ()), ("", "namespaces", "watch", ()),
    ("", "services", "get", ()), ("", "services", "list", ()), ("", "services", "watch", ()),
    ("discovery.k8s.io", "endpointslices", "get", ()), ("discovery.k8s.io", "endpointslices", "list", ()),
    ("discovery.k8s.io", "endpointslices", "watch", ()),
    ("security.istio.io", "authorizationpolicies", "get", ()),
    ("security.istio.io", "authorizationpolicies", "list", ()),
    ("security.istio.io", "authorizationpolicies", "watch", ()),
    ("security.istio.io", "peerauthentications", "get", ()),
    ("security.istio.io", "peerauthentications", "list", ()),
    ("security.istio.io", "peerauthentications", "watch", ()),
    ("networking.istio.io", "serviceentries", "get", ()),
    ("networking.istio.io", "serviceentries", "list", ()),
    ("networking.istio.io", "serviceentries", "watch", ()),
    ("networking.istio.io", "workloadentries", "get", ()),
    ("networking.istio.io", "workloadentries", "list", ()),
    ("networking.istio.io", "workloadentries", "watch", ()),
}
CA_CLUSTER_RULES = {
    ("authentication.k8s.io", "tokenreviews", "create", ()),
    ("", "pods", "get", ()), ("", "pods", "list", ()), ("", "pods", "watch", ()),
}
CA_NAMESPACE_RULES = {("", "secrets", "get", ("cacerts",))}
# The CNI plugin's account, whose token is written onto every node: read only.
CNI_RULES = {("", "pods", "get", ()), ("", "namespaces", "get", ())}
AGENT_CAPS = {"NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_PTRACE"}
# No /lib/modules or /usr/src (issue 16): the image carries the headers BCC needs.
AGENT_HOSTPATHS = {"/sys/fs/bpf", "/sys/fs/cgroup", "/proc", "/proc/sys/net", "/var/run/netns",
                   "/var/run/ambient-agent", "/opt/cni/bin", "/etc/cni/net.d"}
ISTIO_TCP_METRICS = ("istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total",
                     "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total")


def _tool(name: str, *candidates: Path) -> str | None:
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return shutil.which(name)


HELM = _tool("helm", Path(os.environ.get("HELM", "/nonexistent")), ROOT / ".tools" / "bin" / "helm")
KVALIDATE = _tool("kubernetes-validate", ROOT / ".venv" / "bin" / "kubernetes-validate",
                  Path(sys.executable).parent / "kubernetes-validate")
KUBECTL = _tool("kubectl", Path(os.environ.get("KUBECTL", "/nonexistent")), ROOT / ".tools" / "bin" / "kubectl")


def _need(tool: str | None, name: str) -> str:
    if tool is None:
        why = f"{name} not found (run `make chart-tools`: helm into .tools/bin, kubernetes-validate into .venv)"
        print(f"SKIP tests/chart: {why}", file=sys.stderr)
        pytest.skip(why)
    return tool


@pytest.fixture(scope="session")
def helm_env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("helm-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HELM_", "XDG_"))}
    env.update(HOME=str(home), XDG_CACHE_HOME=str(home / "cache"), XDG_CONFIG_HOME=str(home / "config"),
               XDG_DATA_HOME=str(home / "data"), XDG_STATE_HOME=str(home / "state"), KUBECONFIG=os.devnull)
    return env


def _helm(env: dict, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    helm = _need(HELM, "helm")
    proc = subprocess.run([helm, *args], env=env, capture_output=True, text=True, timeout=120)
    if check and proc.returncode != 0:
        pytest.fail(f"helm {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _set_args(values: dict[str, str]) -> list[str]:
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _template(env: dict, values: dict[str, str] | None = None, check: bool = True,
              namespace: str = NAMESPACE, image: bool = True) -> subprocess.CompletedProcess:
    return _helm(env, "template", RELEASE, str(CHART), "--namespace", namespace,
                 *_set_args({**(IMAGE if image else {}), **(values or {})}), check=check)


def _docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="session")
def default_docs(helm_env) -> list[dict]:
    return _docs(_template(helm_env).stdout)


@pytest.fixture(scope="session")
def extras_docs(helm_env) -> list[dict]:
    return _docs(_template(helm_env, EXTRAS).stdout)


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
    return found[0]


def _rules(role: dict) -> set[tuple]:
    out = set()
    for r in role["rules"]:
        for g in r.get("apiGroups", []):
            for res in r.get("resources", []):
                for v in r["verbs"]:
                    out.add((g, res, v, tuple(r.get("resourceNames", ()))))
    return out


def _agent_pod(docs):
    return _one(docs, "DaemonSet")["spec"]["template"]["spec"]


def _container(pod: dict, name: str) -> dict:
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def _validate(paths: list[Path]) -> subprocess.CompletedProcess:
    kv = _need(KVALIDATE, "kubernetes-validate")
    return subprocess.run([kv, "--strict", "-k", K8S_VERSION, *map(str, paths)],
                          capture_output=True, text=True, timeout=300)


# --- helm itself -------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, EXTRAS, PLATFORM], ids=["defaults", "podmonitor+dashboard", "platform"])
def test_helm_lint_strict(helm_env, values):
    proc = _helm(helm_env, "lint", "--strict", str(CHART), "--namespace", NAMESPACE,
                 *_set_args({**IMAGE, **values}))
    assert "0 chart(s) failed" in proc.stdout


def test_default_render_kinds(default_docs):
    kinds = sorted(d["kind"] for d in default_docs)
    assert kinds == sorted(["ServiceAccount", "ServiceAccount", "ServiceAccount", "Secret",
                            "ClusterRole", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding", "ClusterRoleBinding", "ClusterRoleBinding", "Role", "RoleBinding",
                            "DaemonSet", "Deployment", "Service", "PodDisruptionBudget", "ConfigMap",
                            "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"])
    # The one ConfigMap by default is the dashboard's (README: on by default).
    _one(default_docs, "ConfigMap", f"{RELEASE}-ambient-agent-dashboard")


def test_extras_render_podmonitor_and_dashboard(extras_docs):
    kinds = [d["kind"] for d in extras_docs]
    assert kinds.count("PodMonitor") == 1
    _one(extras_docs, "ConfigMap", f"{RELEASE}-ambient-agent-dashboard")


def test_readme_and_values_agree_on_what_is_on_by_default(default_docs):
    """README's metrics paragraph names what values.yaml switches on, and nothing it leaves off."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    readme = (ROOT / "README.md").read_text()
    m = values["metrics"]
    assert m["podMonitor"]["enabled"] is False and m["dashboard"]["enabled"] is True
    assert m["scrapeAnnotations"] is True
    assert "values.yaml` enables a PodMonitor" not in readme
    assert "`metrics.podMonitor.enabled=true`" in readme          # how to switch it on
    assert "prometheus.io/scrape" in readme and "dashboard" in readme
    assert not [d for d in default_docs if d["kind"] == "PodMonitor"]


def test_schema_rejects_bad_values(helm_env):
    for bad in ({"agent.privileged": "maybe"}, {"agnet.capabilities": "{NET_ADMIN}"},
                {"agent.capabilities": "{CAP_ALL}"}, {"ca.port": "70000"},
                {"agent.hostPaths.modules": "/lib/modules"}, {"agent.seLinuxOptions.typ": "spc_t"},
                {"platform": "eks"}, {"istioCompatibility.daemonSetName": "Ztunnel"},
                {"ca.podDisruptionBudget.maxUnavailable": "0"}):
        proc = _template(helm_env, bad, check=False)
        assert proc.returncode != 0, f"schema accepted {bad}"
        assert "schema" in proc.stderr.lower(), proc.stderr


def test_image_must_be_set_with_a_clear_error(helm_env):
    """No public image exists: an install without one fails at once, saying what to set."""
    for values in ({}, {"image.repository": ""}):
        proc = _template(helm_env, values, check=False, image=False)
        assert proc.returncode != 0
        assert "set image.repository to the registry path of an image built from this repository's Dockerfile" \
            in proc.stderr.replace("\\'", "'"), proc.stderr
    # Without the schema, the template says the same.
    proc = _helm(helm_env, "template", RELEASE, str(CHART), "--skip-schema-validation", check=False)
    assert proc.returncode != 0 and "image.repository must be set" in proc.stderr, proc.stderr
    pod = _agent_pod(_docs(_template(helm_env, {"image.tag": "1.2.3"}).stdout))
    images = {c["image"] for c in pod["containers"]}
    assert images == {"registry.example/mesh/ambient-agent:1.2.3"}


def test_notes_say_what_is_untested(helm_env, tmp_path):
    # `helm template` does not print NOTES.txt and helm 3's `install --dry-run`
    # wants a cluster: render a copy of NOTES.txt as an ordinary template.
    chart = tmp_path / "ambient-agent"
    shutil.copytree(CHART, chart)
    body = (chart / "templates" / "NOTES.txt").read_text()
    (chart / "templates" / "notes-render.yaml").write_text(
        '{{- define "notes-under-test" }}' + body + '{{ end -}}\n'
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ include "notes-under-test" . | quote }}\n')
    out = _helm(helm_env, "template", RELEASE, str(chart), "--namespace", NAMESPACE, *_set_args(IMAGE),
                "--show-only", "templates/notes-render.yaml").stdout
    notes = yaml.safe_load(out)["data"]["notes"]
    assert "not implemented" not in notes.lower() and "Not yet run on a real cluster" in notes
    assert "install-cni" in notes and "chains ambient-cni last" in notes and "does not exist yet" not in notes
    assert f"Secret \"cacerts\" in {NAMESPACE}" in notes
    assert f"ConfigMap \"ambient-agent-ca-root-cert\" in {NAMESPACE}" in notes
    assert "logs ds/ztunnel -c install-cni" in notes and "exec ds/ztunnel -c agent" in notes
    assert "kernel headers for" not in notes and "/lib/modules" not in notes


# --- schema validation of every rendered resource ------------------------------------------------

@pytest.mark.parametrize("values", [{}, EXTRAS, PLATFORM], ids=["defaults", "podmonitor+dashboard", "platform"])
def test_kubernetes_validate_strict(helm_env, tmp_path, values):
    _need(KVALIDATE, "kubernetes-validate")
    docs = _docs(_template(helm_env, values).stdout)
    paths = []
    for i, doc in enumerate(docs):
        # CRD-typed resources have no schema in kubernetes-validate's bundle:
        # the PodMonitor's shape is checked in test_podmonitor_shape.
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        p = tmp_path / f"{i:02d}-{doc['kind']}.yaml"
        p.write_text(yaml.safe_dump(doc))
        paths.append(p)
    assert len(paths) >= 11
    proc = _validate(paths)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count(" passed for resource ") == len(paths), proc.stdout + proc.stderr


class _StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a mapping key given twice (as kustomize and Flux do)."""


def _no_duplicates(loader, node, deep=False):
    keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {sorted(dup)}", node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

# Values whose own keys clash with the chart's: still one key each.
CLASHING = {"agent.podLabels.app\\.kubernetes\\.io/name": "mine",
            "agent.podLabels.istio\\.io/dataplane-mode": "ambient",
            "agent.podAnnotations.ambient\\.istio\\.io/redirection": "enabled",
            "ca.podLabels.app\\.kubernetes\\.io/instance": "x"}


@pytest.mark.parametrize("values", [{}, EXTRAS, PLATFORM, CLASHING], ids=["defaults", "extras", "platform", "clashing"])
def test_no_duplicate_keys_and_kustomize_builds(helm_env, tmp_path, values):
    """kustomize (and Flux's post-renderer) reject a mapping with a key twice (issue 16)."""
    text = _template(helm_env, values).stdout
    docs = [d for d in yaml.load_all(text, Loader=_StrictLoader) if d]
    assert len(docs) >= 15
    kubectl = _need(KUBECTL, "kubectl")
    (tmp_path / "rendered.yaml").write_text(text)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources: [rendered.yaml]\n"
        "commonLabels: {team: mesh}\n")
    proc = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = _docs(proc.stdout)
    assert sorted((d["kind"], d["metadata"]["name"]) for d in out) == \
        sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert all(d["metadata"]["labels"]["team"] == "mesh" for d in out)


def test_kustomize_really_rejects_duplicate_keys(tmp_path):
    """The check above can fail: the chart's old pod template (a label key twice) is refused."""
    kubectl = _need(KUBECTL, "kubectl")
    (tmp_path / "r.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n  labels:\n"
        "    app.kubernetes.io/name: a\n    app.kubernetes.io/name: a\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [r.yaml]\n")
    proc = subprocess.run([kubectl, "kustomize", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "already defined" in proc.stderr, proc.stderr
    with pytest.raises(yaml.constructor.ConstructorError):
        yaml.load((tmp_path / "r.yaml").read_text(), Loader=_StrictLoader)


def test_kubernetes_validate_catches_errors(helm_env, tmp_path, default_docs):
    """The validator really is strict: an unknown field and a wrong type fail."""
    ds = json.loads(json.dumps(_one(default_docs, "DaemonSet")))
    ds["spec"]["template"]["spec"]["hostNetwrok"] = True
    p1 = tmp_path / "unknown.yaml"
    p1.write_text(yaml.safe_dump(ds))
    ds = json.loads(json.dumps(_one(default_docs, "DaemonSet")))
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsUser"] = "0"
    p2 = tmp_path / "type.yaml"
    p2.write_text(yaml.safe_dump(ds))
    for p in (p1, p2):
        proc = _validate([p])
        assert proc.returncode != 0, f"{p.name} passed:\n{proc.stdout}"


def test_podmonitor_shape(extras_docs):
    pm = _one(extras_docs, "PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(pm["spec"]) == {"selector", "namespaceSelector", "podMetricsEndpoints"}
    assert pm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    ds = _one(extras_docs, "DaemonSet")
    pod_labels = ds["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    (ep,) = pm["spec"]["podMetricsEndpoints"]
    assert set(ep) == {"path", "interval", "relabelings"} and ep["path"] == "/metrics"
    assert re.fullmatch(r"[0-9]+(ms|s|m|h)", ep["interval"])
    # No named port to point at (see test_agent_surges_on_upgrade_without_host_ports): the
    # agent container's target, at the pod's (node's) address, port 15020, IPv4 and IPv6.
    keep, v4, v6 = ep["relabelings"]
    assert keep == {"sourceLabels": ["__meta_kubernetes_pod_container_name"], "regex": "agent", "action": "keep"}
    assert {_container(ds["spec"]["template"]["spec"], "agent")["name"]} == {keep["regex"]}
    for rule, ip, address in ((v4, "10.0.0.7", "10.0.0.7:15020"), (v6, "fd00::7", "[fd00::7]:15020")):
        assert rule["sourceLabels"] == ["__meta_kubernetes_pod_ip"] and rule["targetLabel"] == "__address__"
        m = re.fullmatch(rule["regex"], ip)
        assert m and rule["replacement"].replace("$1", m.group(1)) == address
    assert re.fullmatch(v4["regex"], "fd00::7") is None


def test_dashboard_uses_istio_metric_names(extras_docs):
    cm = _one(extras_docs, "ConfigMap", f"{RELEASE}-ambient-agent-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dash = json.loads(cm["data"]["ambient-agent.json"])
    # The ConfigMap carries the file tests/chart/test_dashboard.py evaluates with promtool.
    assert dash == json.loads((CHART / "dashboards" / "ambient-agent.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p.get("targets", []))
    for metric in ISTIO_TCP_METRICS:
        assert metric in exprs
    for label in ("reporter", "source_workload", "destination_workload"):
        assert label in exprs
    # The agent exports these names (prometheus_client adds `_total` to counters).
    src = (ROOT / "agent" / "observe" / "metrics.py").read_text()
    for metric in ISTIO_TCP_METRICS:
        assert f'"{metric.removesuffix("_total")}"' in src


# --- content: the node agent ----------------------------------------------------------------------

def test_agent_security_context(default_docs):
    pod = _agent_pod(default_docs)
    sc = _container(pod, "agent")["securityContext"]
    # SYS_ADMIN implies privilege escalation: `false` beside it would be a contradiction (issue 16).
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert "seLinuxOptions" not in sc


@pytest.mark.parametrize("values,escalation", [
    ({}, True),                                                           # SYS_ADMIN
    ({"agent.capabilities": "{NET_ADMIN,BPF,PERFMON,SYS_PTRACE}"}, False),
    ({"agent.capabilities": "{NET_ADMIN}", "agent.privileged": "true"}, True),
])
def test_allow_privilege_escalation_follows_the_capabilities(helm_env, values, escalation):
    sc = _container(_agent_pod(_docs(_template(helm_env, values).stdout)), "agent")["securityContext"]
    assert sc["allowPrivilegeEscalation"] is escalation
    # Never the combination the Kubernetes docs call contradictory.
    if sc["allowPrivilegeEscalation"] is False:
        assert not sc["privileged"] and "SYS_ADMIN" not in sc["capabilities"]["add"]


def test_no_privileged_container_anywhere(default_docs, extras_docs):
    for doc in default_docs + extras_docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("privileged") is not True, f"{doc['kind']}/{c['name']} is privileged"
            if c["name"] == "agent":
                continue
            assert sc.get("capabilities", {}).get("drop") == ["ALL"]
            assert sc.get("allowPrivilegeEscalation") is False
            # install-cni writes into host directories other users may own (issue 16): DAC_OVERRIDE, nothing else.
            expected = ["DAC_OVERRIDE"] if c["name"] == "install-cni" else None
            assert sc.get("capabilities", {}).get("add") == expected, f"{c['name']} adds capabilities"


def test_selinux_options_are_a_value(helm_env, default_docs):
    """OpenShift needs spc_t on the containers that touch the host (issue 16)."""
    pod = _agent_pod(_docs(_template(helm_env, {"agent.seLinuxOptions.type": "spc_t"}).stdout))
    for name in ("agent", "install-cni"):
        assert _container(pod, name)["securityContext"]["seLinuxOptions"] == {"type": "spc_t"}
    assert "seLinuxOptions" not in _container(_agent_pod(default_docs), "install-cni")["securityContext"]


def test_agent_command_and_env(default_docs):
    pod = _agent_pod(default_docs)
    c = _container(pod, "agent")
    assert c["command"] == ["ambient-agent"]
    args = c["args"]
    run = args.index("run")
    assert args[run + 1:run + 3] == ["--node", "$(NODE_NAME)"]
    assert args[args.index("--state") + 1] == "kube"
    assert args[args.index("--ca-address") + 1] == f"{RELEASE}-ambient-agent-ca.{NAMESPACE}.svc:15012"
    assert args[args.index("--ready-addr") + 1] == "0.0.0.0:15021"
    env = {e["name"]: e for e in c["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    cni = _container(pod, "install-cni")
    assert cni["command"] == ["ambient-agent"] and "install-cni" in cni["args"]
    _install_cni_flags_parse(cni["args"])


def _install_cni_flags_parse(args: list[str]) -> None:
    """The chart's install-cni flags are the command's real flags, with host paths in the config."""
    from agent.cli import build_parser
    parsed = build_parser().parse_args(args)
    assert parsed.command == "install-cni"
    assert (parsed.cni_bin_dir, parsed.cni_conf_dir) == ("/host/opt/cni/bin", "/host/etc/cni/net.d")
    assert parsed.plugin_source == "/opt/ambient-cni"                  # where the Dockerfile puts the bundle
    assert parsed.agent_socket == "/var/run/ambient-agent/agent.sock"  # host runDir + the agent's socket name
    assert parsed.kubeconfig_host_path == "/etc/cni/net.d/ambient-cni-kubeconfig"
    assert parsed.uninstall_on_exit and parsed.poll_interval == 1.0
    # The release's own namespace too: the CA pod's ADD needs no API call (issue 16).
    assert parsed.exclude_namespaces == ["kube-system", NAMESPACE]
    # The plugin's own account's token, from its Secret (not the agent's).
    assert (parsed.token_file, parsed.ca_file) == ("/var/run/secrets/ambient-cni/token",
                                                   "/var/run/secrets/ambient-cni/ca.crt")


def test_agent_pod_placement(default_docs):
    pod = _agent_pod(default_docs)
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]


def test_agent_probes_on_15021(default_docs):
    c = _container(_agent_pod(default_docs), "agent")
    ready = c["readinessProbe"]["httpGet"]
    assert (ready["port"], ready["path"]) == (15021, "/healthz/ready")
    live = c["livenessProbe"]
    assert (live.get("httpGet") or live.get("tcpSocket"))["port"] == 15021
    assert c["resources"]["requests"] and c["resources"]["limits"]


def test_agent_surges_on_upgrade_without_host_ports(default_docs):
    """A new agent pod starts beside the old one on each node and takes the node over."""
    ds = _one(default_docs, "DaemonSet")
    assert ds["spec"]["updateStrategy"] == {"type": "RollingUpdate",
                                            "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = ds["spec"]["template"]["spec"]
    # On the host network a declared containerPort is a hostPort: the surge pod
    # could never be scheduled beside the old one.
    assert pod["hostNetwork"] is True
    for c in pod["containers"] + pod.get("initContainers", []):
        assert "ports" not in c, f"container {c['name']} declares ports"
    args = _container(pod, "agent")["args"]
    # Drained after the handover, the old agent waits for its pod's deletion
    # instead of exiting into a restart that would take the node back.
    assert args[args.index("--after-handover") + 1] == "wait"
    from agent.cli import build_parser
    assert build_parser().parse_args(args).after_handover == "wait"     # a real flag of `run`
    drain = float(args[args.index("--drain-seconds") + 1])
    assert 0 < drain < pod["terminationGracePeriodSeconds"]
    # tcp_migrate_req in pods' namespaces: /proc/sys/net writable, the rest of /proc not.
    mounts = {m["mountPath"]: m for m in _container(pod, "agent")["volumeMounts"]}
    assert not mounts["/host/proc/sys/net"].get("readOnly") and mounts["/host/proc"]["readOnly"]
    vols = {v["name"]: v for v in pod["volumes"]}
    assert vols[mounts["/host/proc/sys/net"]["name"]]["hostPath"]["path"] == "/proc/sys/net"
    assert args[args.index("--host-proc") + 1] == "/host/proc"


def test_schema_rejects_a_bad_update_strategy(helm_env):
    for bad in ({"agent.updateStrategy.type": "Surge"}, {"agent.updateStrategy.rollingUpdate.maxSurgee": "1"}):
        proc = _template(helm_env, bad, check=False)
        assert proc.returncode != 0, f"schema accepted {bad}"


def test_agent_host_paths_and_token(default_docs):
    pod = _agent_pod(default_docs)
    vols = {v["name"]: v for v in pod["volumes"]}
    assert {v["hostPath"]["path"] for v in vols.values() if "hostPath" in v} == AGENT_HOSTPATHS
    mounts = {m["name"]: m for m in _container(pod, "agent")["volumeMounts"]}
    assert mounts["host-proc"]["mountPath"] == "/host/proc"
    assert mounts["bpffs"]["mountPath"] == "/sys/fs/bpf"
    for c in pod["containers"]:
        for m in c["volumeMounts"]:
            assert not m["mountPath"].startswith(("/lib/modules", "/usr/src")), (c["name"], m)
    (src,) = vols["istio-token"]["projected"]["sources"]
    assert src["serviceAccountToken"]["audience"] == "istio-ca"
    args = _container(pod, "agent")["args"]
    token_file = args[args.index("--token-file") + 1]
    assert token_file == f'{mounts["istio-token"]["mountPath"]}/{src["serviceAccountToken"]["path"]}'


# --- content: RBAC and the CA ---------------------------------------------------------------------

def test_rbac_exactly_as_designed(default_docs):
    agent = _one(default_docs, "ClusterRole", f"{RELEASE}-ambient-agent")
    assert _rules(agent) == AGENT_RULES
    assert _rules(_one(default_docs, "ClusterRole", f"{RELEASE}-ambient-agent-cni")) == CNI_RULES
    ca = _one(default_docs, "ClusterRole", f"{RELEASE}-ambient-agent-ca")
    assert _rules(ca) == CA_CLUSTER_RULES
    role = _one(default_docs, "Role", f"{RELEASE}-ambient-agent-ca")
    assert role["metadata"]["namespace"] == NAMESPACE
    assert _rules(role) == CA_NAMESPACE_RULES
    sas = {d["metadata"]["name"] for d in default_docs if d["kind"] == "ServiceAccount"}
    for binding in (d for d in default_docs if d["kind"] in ("ClusterRoleBinding", "RoleBinding")):
        assert binding["roleRef"]["name"] == binding["metadata"]["name"]
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["name"] in sas
        assert subject["namespace"] == NAMESPACE
    ds_sa = _agent_pod(default_docs)["serviceAccountName"]
    assert _one(default_docs, "ClusterRoleBinding", f"{RELEASE}-ambient-agent")["subjects"][0]["name"] == ds_sa
    cni_binding = _one(default_docs, "ClusterRoleBinding", f"{RELEASE}-ambient-agent-cni")
    assert cni_binding["subjects"][0]["name"] == f"{RELEASE}-ambient-agent-cni" != ds_sa


def test_only_the_agents_account_may_patch_and_only_pods(default_docs):
    """`patch` on `pods` is the narrowest grant for the redirection annotation (RBAC has no field
    rules); no other account of the chart may write anything but TokenReviews."""
    roles = {(d["kind"], d["metadata"]["name"]): _rules(d) for d in default_docs
             if d["kind"] in ("ClusterRole", "Role")}
    writers = {(k, r) for k, rules in roles.items() for r in rules
               if r[2] not in ("get", "list", "watch")}
    assert writers == {(("ClusterRole", f"{RELEASE}-ambient-agent"), ("", "pods", "patch", ())),
                       (("ClusterRole", f"{RELEASE}-ambient-agent-ca"),
                        ("authentication.k8s.io", "tokenreviews", "create", ()))}
    # What the agent really calls: a merge patch of the pod (agent/state/kube.py).
    src = (ROOT / "agent" / "state" / "kube.py").read_text()
    assert "patch_namespaced_pod(" in src and '"application/merge-patch+json"' in src
    assert not re.search(r"\b(replace|create|delete)_namespaced_pod", src)


def test_the_plugin_token_on_the_node_is_not_the_agents(default_docs):
    """install-cni writes the CNI account's token (get pods/namespaces) onto the node; the agent's
    token (patch pods) is mounted into the agent container alone (issue 16)."""
    pod = _agent_pod(default_docs)
    assert pod["automountServiceAccountToken"] is False
    vols = {v["name"]: v for v in pod["volumes"]}
    agent_mounts = {m["name"]: m for m in _container(pod, "agent")["volumeMounts"]}
    cni_mounts = {m["name"]: m for m in _container(pod, "install-cni")["volumeMounts"]}
    # The agent: the pod's own account, where the in-cluster client reads it.
    api = agent_mounts["kube-api-access"]
    assert api["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount" and api["readOnly"]
    sources = vols["kube-api-access"]["projected"]["sources"]
    assert sources[0]["serviceAccountToken"]["path"] == "token" and "audience" not in sources[0]["serviceAccountToken"]
    assert sources[1]["configMap"] == {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}
    # install-cni: only the CNI account's Secret; none of the agent's tokens.
    assert not {"kube-api-access", "istio-token"} & set(cni_mounts)
    secret_name = vols[cni_mounts["cni-token"]["name"]]["secret"]["secretName"]
    secret = _one(default_docs, "Secret", secret_name)
    assert secret["type"] == "kubernetes.io/service-account-token"
    sa = _one(default_docs, "ServiceAccount", f"{RELEASE}-ambient-agent-cni")
    assert secret["metadata"]["annotations"]["kubernetes.io/service-account.name"] == sa["metadata"]["name"]
    assert sa["metadata"]["name"] != pod["serviceAccountName"]
    args = _container(pod, "install-cni")["args"]
    assert args[args.index("--token-file") + 1] == cni_mounts["cni-token"]["mountPath"] + "/token"
    assert args[args.index("--ca-file") + 1] == cni_mounts["cni-token"]["mountPath"] + "/ca.crt"
    # The installer renders the kubeconfig from exactly these two files (real code, real files).
    from cni.installer import KubeconfigSource
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        Path(d, "token").write_text("cni-token-value\n")
        Path(d, "ca.crt").write_bytes(b"-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n")
        kubeconfig = json.loads(KubeconfigSource("https://10.0.0.1:443", f"{d}/token", f"{d}/ca.crt").render())
    assert kubeconfig["users"][0]["user"]["token"] == "cni-token-value"


def test_ca_deployment_and_service(default_docs):
    dep = _one(default_docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = _container(pod, "ca")
    assert c["args"][1] == "ca" and c["args"][c["args"].index("--listen") + 1] == "0.0.0.0:15012"
    sans = [c["args"][i + 1] for i, a in enumerate(c["args"]) if a == "--san"]
    assert f"{RELEASE}-ambient-agent-ca.{NAMESPACE}.svc" in sans
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    svc = _one(default_docs, "Service")
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 15012 and port["targetPort"] == "grpc-ca"
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == f"{RELEASE}-ambient-agent-ca"


def test_ca_runs_two_replicas_with_a_disruption_budget(default_docs, helm_env):
    """The CA is stateless (same plug-in CA from the Secret, random serials): two replicas, and a
    drain never evicts both (issue 16)."""
    dep = _one(default_docs, "Deployment")
    assert dep["spec"]["replicas"] == 2
    pdb = _one(default_docs, "PodDisruptionBudget", f"{RELEASE}-ambient-agent-ca")
    assert pdb["apiVersion"] == "policy/v1" and pdb["spec"]["maxUnavailable"] == 1
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["selector"] == dep["spec"]["selector"]
    (spread,) = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname" and spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    # Each replica copies the signing material from the Secret, so none makes up its own root.
    init = _container(dep["spec"]["template"]["spec"], "cacerts")
    assert "ca-key.pem" in init["args"][0] and "root-cert.pem" in init["args"][0]
    docs = _docs(_template(helm_env, {"ca.podDisruptionBudget.enabled": "false", "ca.replicas": "3"}).stdout)
    assert not [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    assert _one(docs, "Deployment")["spec"]["replicas"] == 3


def test_ca_trusts_exactly_the_agents_service_account_and_token_audience(default_docs):
    args = _container(_one(default_docs, "Deployment")["spec"]["template"]["spec"], "ca")["args"]
    agent_sa = _agent_pod(default_docs)["serviceAccountName"]
    assert args[args.index("--tokens") + 1] == "kube"
    assert args[args.index("--node-agent-service-account") + 1] == f"{NAMESPACE}/{agent_sa}"
    assert args[args.index("--token-audience") + 1] == "istio-ca"


# --- Dockerfile (no tools needed) -------------------------------------------------------------------

def test_dockerfile():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM debian:bookworm(-slim)?\s*$", text, re.M)
    assert "python3-bpfcc" in text
    assert re.search(r"pip install \.", text)
    # The Python-free CNI plugin bundle: frozen in a build stage, shipped where install-cni reads it.
    assert "PyInstaller" in text and "cni/ambient-cni.spec" in text
    assert "COPY --from=cni-plugin /out/ambient-cni /opt/ambient-cni" in text


@pytest.mark.parametrize("values,grace,drain", [
    ({}, 30, "25"),
    ({"agent.terminationGracePeriodSeconds": "60"}, 60, "55"),
    ({"agent.drainSeconds": "12"}, 30, "12"),
])
def test_drain_window_is_termination_grace_minus_five(helm_env, values, grace, drain):
    pod = _agent_pod(_docs(_template(helm_env, values).stdout))
    args = _container(pod, "agent")["args"]
    assert pod["terminationGracePeriodSeconds"] == grace
    assert args[args.index("--drain-seconds") + 1] == drain
    assert args[args.index("--host-proc") + 1] == "/host/proc"


# --- issue 16: what an operator meets -------------------------------------------------------------

def _pod_templates(docs):
    return {d["kind"]: d["spec"]["template"] for d in docs if d["kind"] in ("DaemonSet", "Deployment")}


@pytest.mark.parametrize("values", [{}, CLASHING], ids=["defaults", "clashing"])
def test_the_charts_own_pods_are_never_in_the_mesh(helm_env, values):
    templates = _pod_templates(_docs(_template(helm_env, values).stdout))
    assert set(templates) == {"DaemonSet", "Deployment"}
    for kind, tpl in templates.items():
        assert tpl["metadata"]["labels"]["istio.io/dataplane-mode"] == "none", kind
        assert tpl["metadata"]["annotations"]["ambient.istio.io/redirection"] == "disabled", kind


def test_user_labels_cannot_break_the_selectors(helm_env):
    docs = _docs(_template(helm_env, CLASHING).stdout)
    for d in docs:
        if d["kind"] in ("DaemonSet", "Deployment"):
            labels = d["spec"]["template"]["metadata"]["labels"]
            assert d["spec"]["selector"]["matchLabels"].items() <= labels.items(), d["kind"]


@pytest.mark.parametrize("values,namespace,quota", [
    ({}, NAMESPACE, False),
    ({"platform": "gke"}, NAMESPACE, True),
    ({"platform": "gke"}, "kube-system", False),            # kube-system admits the class anyway
    ({"resourceQuotas.enabled": "true"}, NAMESPACE, True),
    ({"platform": "gke", "resourceQuotas.enabled": "false"}, NAMESPACE, False),
])
def test_system_node_critical_quota(helm_env, values, namespace, quota):
    """GKE admits system-node-critical outside kube-system only with a ResourceQuota for it."""
    docs = _docs(_template(helm_env, values, namespace=namespace).stdout)
    quotas = [d for d in docs if d["kind"] == "ResourceQuota"]
    assert bool(quotas) is quota
    if quota:
        (q,) = quotas
        assert q["metadata"]["namespace"] == namespace and q["spec"]["hard"] == {"pods": "5000"}
        (expr,) = q["spec"]["scopeSelector"]["matchExpressions"]
        assert expr == {"operator": "In", "scopeName": "PriorityClass", "values": ["system-node-critical"]}
        assert _agent_pod(docs)["priorityClassName"] in expr["values"]


def test_gke_cni_bin_dir(helm_env):
    vols = {v["name"]: v for v in _agent_pod(_docs(_template(helm_env, {"platform": "gke"}).stdout))["volumes"]}
    assert vols["cni-bin"]["hostPath"]["path"] == "/home/kubernetes/bin"
    vols = {v["name"]: v for v in _agent_pod(_docs(_template(
        helm_env, {"platform": "gke", "installCni.cniBinDir": "/opt/x"}).stdout))["volumes"]}
    assert vols["cni-bin"]["hostPath"]["path"] == "/opt/x"


def test_ca_root_configmap_does_not_collide_with_istio(helm_env, default_docs):
    vols = {v["name"]: v for v in _agent_pod(default_docs)["volumes"]}
    default = vols["ca-root"]["configMap"]["name"]
    assert default != "istio-ca-root-cert" and default == "ambient-agent-ca-root-cert"
    docs = _docs(_template(helm_env, {"caRoot.configMapName": "mesh-root", "caRoot.pem": "PEM"}).stdout)
    vols = {v["name"]: v for v in _agent_pod(docs)["volumes"]}
    assert vols["ca-root"]["configMap"]["name"] == "mesh-root"
    assert _one(docs, "ConfigMap", "mesh-root")["data"]["root-cert.pem"].strip() == "PEM"
    # The agent reads the mounted file (--ca-root), so the name appears nowhere in its code.
    args = _container(_agent_pod(docs), "agent")["args"]
    assert args[args.index("--ca-root") + 1] == "/var/run/ambient-agent-ca/root-cert.pem"
    for path in list((ROOT / "agent").rglob("*.py")) + list((ROOT / "cni").rglob("*.py")):
        assert "istio-ca-root-cert" not in path.read_text(), path


# --- issue 12: what Istio's tools look for -----------------------------------------------------------

def test_istio_tools_recognise_the_agents(default_docs):
    """Kiali: app="ztunnel"; Istio's ztunnel dashboard: pod=~"ztunnel-.*" (DaemonSet pods are
    named <DaemonSet>-<suffix>); Istio's sample Prometheus: prometheus.io annotations."""
    ds = _one(default_docs, "DaemonSet")
    assert ds["metadata"]["name"] == "ztunnel"
    assert re.fullmatch("ztunnel-.*", ds["metadata"]["name"] + "-x7k2p")
    meta = ds["spec"]["template"]["metadata"]
    assert meta["labels"]["app"] == "ztunnel"
    assert "app" not in ds["spec"]["selector"]["matchLabels"]
    ann = meta["annotations"]
    assert (ann["prometheus.io/scrape"], ann["prometheus.io/port"], ann["prometheus.io/path"]) == \
        ("true", "15020", "/metrics")
    args = _container(ds["spec"]["template"]["spec"], "agent")["args"]
    assert args[args.index("--metrics-addr") + 1].endswith(":" + ann["prometheus.io/port"])


def test_istio_compatibility_can_be_switched_off(helm_env):
    docs = _docs(_template(helm_env, {"istioCompatibility.daemonSetName": "",
                                      "istioCompatibility.podLabels": "null",
                                      "metrics.scrapeAnnotations": "false"}).stdout)
    ds = _one(docs, "DaemonSet")
    assert ds["metadata"]["name"] == f"{RELEASE}-ambient-agent"
    assert "app" not in ds["spec"]["template"]["metadata"]["labels"]
    assert not [k for k in ds["spec"]["template"]["metadata"]["annotations"] if k.startswith("prometheus.io/")]


def test_without_install_cni_there_is_no_plugin_account(helm_env):
    docs = _docs(_template(helm_env, {"installCni.enabled": "false"}).stdout)
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert not {n for n in names if n[1].startswith(f"{RELEASE}-ambient-agent-cni")}, names
    pod = _agent_pod(docs)
    assert [c["name"] for c in pod["containers"]] == ["agent"]
    assert "cni-token" not in {v["name"] for v in pod["volumes"]}
    # An existing account instead of the chart's: named, or the render says what is missing.
    docs = _docs(_template(helm_env, {"serviceAccount.cni.create": "false", "serviceAccount.cni.name": "node-cni"}).stdout)
    assert _one(docs, "Secret")["metadata"]["annotations"]["kubernetes.io/service-account.name"] == "node-cni"
    assert _one(docs, "ClusterRoleBinding", f"{RELEASE}-ambient-agent-cni")["subjects"][0]["name"] == "node-cni"
    proc = _template(helm_env, {"serviceAccount.cni.create": "false"}, check=False)
    assert proc.returncode != 0 and "serviceAccount.cni.name must name an existing service account" in proc.stderr
