"""Helm chart (charts/ambient-agent) and Dockerfile checks with real tools.

Tools: `helm` (`make chart-tools` puts the official static binary in
.tools/bin) and `kubernetes-validate` (PyPI, in .venv). `make test` installs
both first; run alone, these tests skip, saying why, only when a tool is
absent. helm runs with HOME and XDG_* in a temporary directory, so it neither
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
EXTRAS = {"metrics.podMonitor.enabled": "true", "metrics.dashboard.enabled": "true"}

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
}
CA_CLUSTER_RULES = {
    ("authentication.k8s.io", "tokenreviews", "create", ()),
    ("", "pods", "get", ()), ("", "pods", "list", ()), ("", "pods", "watch", ()),
}
CA_NAMESPACE_RULES = {("", "secrets", "get", ("cacerts",))}
AGENT_CAPS = {"NET_ADMIN", "SYS_ADMIN", "BPF", "PERFMON", "SYS_PTRACE"}
AGENT_HOSTPATHS = {"/sys/fs/bpf", "/sys/fs/cgroup", "/proc", "/proc/sys/net", "/var/run/netns",
                   "/var/run/ambient-agent", "/lib/modules", "/usr/src", "/opt/cni/bin", "/etc/cni/net.d"}
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


def _template(env: dict, values: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    return _helm(env, "template", RELEASE, str(CHART), "--namespace", NAMESPACE,
                 *_set_args(values or {}), check=check)


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

@pytest.mark.parametrize("values", [{}, EXTRAS], ids=["defaults", "podmonitor+dashboard"])
def test_helm_lint_strict(helm_env, values):
    proc = _helm(helm_env, "lint", "--strict", str(CHART), "--namespace", NAMESPACE, *_set_args(values))
    assert "0 chart(s) failed" in proc.stdout


def test_default_render_kinds(default_docs):
    kinds = sorted(d["kind"] for d in default_docs)
    assert kinds == sorted(["ServiceAccount", "ServiceAccount", "ClusterRole", "ClusterRole",
                            "ClusterRoleBinding", "ClusterRoleBinding", "Role", "RoleBinding",
                            "DaemonSet", "Deployment", "Service"])


def test_extras_render_podmonitor_and_dashboard(extras_docs):
    kinds = [d["kind"] for d in extras_docs]
    assert kinds.count("PodMonitor") == 1
    _one(extras_docs, "ConfigMap", f"{RELEASE}-ambient-agent-dashboard")


def test_schema_rejects_bad_values(helm_env):
    for bad in ({"agent.privileged": "maybe"}, {"agnet.capabilities": "{NET_ADMIN}"},
                {"agent.capabilities": "{CAP_ALL}"}, {"ca.port": "70000"}):
        proc = _template(helm_env, bad, check=False)
        assert proc.returncode != 0, f"schema accepted {bad}"
        assert "schema" in proc.stderr.lower(), proc.stderr


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
    out = _helm(helm_env, "template", RELEASE, str(chart), "--namespace", NAMESPACE,
                "--show-only", "templates/notes-render.yaml").stdout
    notes = yaml.safe_load(out)["data"]["notes"]
    assert "not implemented" not in notes.lower() and "Not yet run on a real cluster" in notes
    assert "install-cni" in notes and "chains ambient-cni last" in notes and "does not exist yet" not in notes
    assert f"Secret \"cacerts\" in {NAMESPACE}" in notes


# --- schema validation of every rendered resource ------------------------------------------------

@pytest.mark.parametrize("values", [{}, EXTRAS], ids=["defaults", "podmonitor+dashboard"])
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
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
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
    assert sc["privileged"] is False and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert set(sc["capabilities"]["add"]) == AGENT_CAPS
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"


def test_no_privileged_container_anywhere(default_docs, extras_docs):
    for doc in default_docs + extras_docs:
        spec = doc.get("spec", {}).get("template", {}).get("spec")
        if not spec:
            continue
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c.get("securityContext", {})
            assert sc.get("privileged") is not True, f"{doc['kind']}/{c['name']} is privileged"
            if c["name"] != "agent":
                assert sc.get("capabilities", {}).get("drop") == ["ALL"]
                assert not sc.get("capabilities", {}).get("add"), f"{c['name']} adds capabilities"


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
    assert parsed.exclude_namespaces == ["kube-system"]


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
    for name in ("lib-modules", "usr-src"):
        assert mounts[name]["mountPath"] == vols[name]["hostPath"]["path"]
    (src,) = vols["istio-token"]["projected"]["sources"]
    assert src["serviceAccountToken"]["audience"] == "istio-ca"
    args = _container(pod, "agent")["args"]
    token_file = args[args.index("--token-file") + 1]
    assert token_file == f'{mounts["istio-token"]["mountPath"]}/{src["serviceAccountToken"]["path"]}'


# --- content: RBAC and the CA ---------------------------------------------------------------------

def test_rbac_exactly_as_designed(default_docs):
    agent = _one(default_docs, "ClusterRole", f"{RELEASE}-ambient-agent")
    assert _rules(agent) == AGENT_RULES
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
    assert "/lib/modules" in text and "/usr/src" in text and "linux-headers" in text
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
