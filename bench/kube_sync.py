"""Memory and sync time of the kube state source for N realistic pods.

    .venv/bin/python -m bench.kube_sync [--pods 10000] [--runs 3]

The test API server (lab/kubeapi, a development tool) runs in a child process so
its own copy of the objects does not count; it serves N pods shaped like a
Deployment's pods on a real cluster (managedFields, last-applied
annotation, env, volumes, probes, container statuses), spread over 50
namespaces and 20 nodes, plus their namespaces, nodes, one Service and
EndpointSlice per namespace. This process imports the client and the
source first (that baseline is not the source's cost), then measures:

* sync time: ``KubeStateSource(...).load()`` (first full list of every kind,
  paged, trimmed, plus the ClusterState build);
* RSS growth (``VmRSS``) after the sync, with the stores and the built
  ClusterState alive, after a GC; ``pods_mib`` subtracts the growth of an
  empty cluster's sync (the client's lazily loaded modules, threads);
* one rebuild: the time ``ClusterState.from_items`` takes for the whole
  store after one pod event (what each coalesced burst costs the loop).

The result goes into agent/state/kube.py's docstring (MEMORY_PER_10K_PODS).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

_SERVER = r"""
import json, sys, time
from lab.kubeapi.server import KubeApiServer
from bench.kube_sync import realistic_objects
api = KubeApiServer(bookmark_interval=30).start()
for obj in realistic_objects(int(sys.argv[1])):
    api.create(obj)
api.kubeconfig(sys.argv[2])
print("ready", flush=True)
sys.stdin.read()      # until the parent closes stdin
api.stop()
"""


def realistic_pod(i: int, namespace: str, node: str) -> dict:
    app = f"app-{i % 97}"
    ip = f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}"
    container = {
        "name": app, "image": f"registry.example.com/team/{app}:1.{i % 7}.3",
        "imagePullPolicy": "IfNotPresent",
        "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                  {"name": "metrics", "containerPort": 9090, "protocol": "TCP"}],
        "env": [{"name": f"SETTING_{k}", "value": f"value-{k}-{i}"} for k in range(8)]
        + [{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
        "readinessProbe": {"httpGet": {"path": "/ready", "port": 8080}, "periodSeconds": 10},
        "livenessProbe": {"httpGet": {"path": "/healthz", "port": 8080}, "periodSeconds": 10},
        "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/"
                          "serviceaccount", "readOnly": True}],
        "terminationMessagePath": "/dev/termination-log", "terminationMessagePolicy": "File",
    }
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": f"{app}-7d9f8c6b5-{i:05d}", "namespace": namespace,
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5", "version": "v1",
                       "team": f"team-{i % 13}"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": json.dumps(
                    {"spec": {"containers": [{"name": app, "image": container["image"]}]}}) * 4,
                "prometheus.io/scrape": "true", "prometheus.io/port": "9090"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": f"{app}-7d9f8c6b5",
                                 "uid": "6f1c2a8e-1d2b-4c5d-9e8f-0a1b2c3d4e5f", "controller": True,
                                 "blockOwnerDeletion": True}],
            "managedFields": [
                {"manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1",
                 "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:metadata": {"f:labels": {f"f:{k}": {} for k in
                                                          ("app", "pod-template-hash", "version")}},
                              "f:spec": {"f:containers": {f'k:{{"name":"{app}"}}': {
                                  f"f:{k}": {} for k in container}}}}},
                {"manager": "kubelet", "operation": "Update", "apiVersion": "v1", "subresource": "status",
                 "time": "2026-01-01T00:00:05Z", "fieldsType": "FieldsV1",
                 "fieldsV1": {"f:status": {f"f:{k}": {} for k in
                                           ("conditions", "containerStatuses", "hostIP", "phase",
                                            "podIP", "podIPs", "startTime")}}},
            ],
        },
        "spec": {
            "nodeName": node, "serviceAccountName": app, "serviceAccount": app,
            "containers": [container], "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "schedulerName": "default-scheduler", "terminationGracePeriodSeconds": 30,
            "securityContext": {"runAsNonRoot": True},
            "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300},
                            {"key": "node.kubernetes.io/unreachable", "operator": "Exists",
                             "effect": "NoExecute", "tolerationSeconds": 300}],
            "volumes": [{"name": "kube-api-access", "projected": {"defaultMode": 420, "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                                            "fieldRef": {"fieldPath": "metadata.namespace"}}]}}]}}],
        },
        "status": {
            "phase": "Running", "hostIP": "172.18.0.2", "podIP": ip, "podIPs": [{"ip": ip}],
            "startTime": "2026-01-01T00:00:01Z", "qosClass": "Burstable",
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:03Z"}
                           for t in ("Initialized", "Ready", "ContainersReady", "PodScheduled")],
            "containerStatuses": [{"name": app, "ready": True, "restartCount": 0, "started": True,
                                   "image": container["image"], "imageID": "sha256:" + "ab" * 32,
                                   "containerID": "containerd://" + f"{i:064x}",
                                   "state": {"running": {"startedAt": "2026-01-01T00:00:02Z"}}}],
        },
    }


def realistic_objects(pods: int):
    namespaces = [f"team-ns-{n}" for n in range(50)]
    for ns in namespaces:
        yield {"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": ns, "labels": {"istio.io/dataplane-mode": "ambient"}}}
        yield {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": ns},
               "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "app-1"},
                        "ports": [{"port": 80, "targetPort": "http", "protocol": "TCP"}]}}
        yield {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
               "metadata": {"name": "web-x", "namespace": ns,
                            "labels": {"kubernetes.io/service-name": "web"}},
               "addressType": "IPv4", "endpoints": [], "ports": [{"port": 8080}]}
    for n in range(20):
        yield {"apiVersion": "v1", "kind": "Node", "metadata": {"name": f"node-{n}"},
               "status": {"addresses": [{"type": "InternalIP", "address": f"172.18.0.{n + 2}"}],
                          "images": [{"names": [f"registry.example.com/img-{k}"], "sizeBytes": 1 << 20}
                                     for k in range(30)]}}
    for i in range(pods):
        yield realistic_pod(i, namespaces[i % len(namespaces)], f"node-{i % 20}")


def rss_kib() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def one_run(pods: int) -> dict:
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = os.path.join(tmp, "kubeconfig")
        server = subprocess.Popen([sys.executable, "-c", _SERVER, str(pods), kubeconfig], cwd=repo,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            if server.stdout.readline().strip() != "ready":
                raise RuntimeError("the test API server did not start")
            # The measurement runs in a fresh interpreter too, so each run
            # starts from the same baseline.
            out = subprocess.run([sys.executable, "-m", "bench.kube_sync", "--measure", kubeconfig],
                                 cwd=repo, check=True, capture_output=True, text=True).stdout
            return json.loads(out.strip().splitlines()[-1])
        finally:
            server.stdin.close()
            server.wait(30)


def measure(kubeconfig: str) -> dict:
    import kubernetes.client  # noqa: F401  (import cost is not the source's)

    from agent.state.kube import KubeStateSource
    from agent.state.model import ClusterState
    gc.collect()
    before = rss_kib()
    t0 = time.perf_counter()
    src = KubeStateSource(kubeconfig, sync_timeout=600, crd_retry_interval=600)
    state = src.load()
    sync = time.perf_counter() - t0
    gc.collect()
    after = rss_kib()
    t1 = time.perf_counter()
    ClusterState.from_items(list(state.objects), state.resource_version)
    rebuild = time.perf_counter() - t1
    result = {"pods": len(state.pods), "sync_s": round(sync, 3), "rss_growth_mib": round((after - before) / 1024, 1),
              "rebuild_s": round(rebuild, 4)}
    src.close()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pods", type=int, default=10000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--measure", metavar="KUBECONFIG", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure)))
        return 0
    # An empty cluster's sync: the fixed cost (the client's lazily imported
    # API modules and models, threads, connections), not the pods'.
    empty = one_run(0)
    print(json.dumps(empty))
    runs = [one_run(args.pods) for _ in range(args.runs)]
    for r in runs:
        r["pods_mib"] = round(r["rss_growth_mib"] - empty["rss_growth_mib"], 1)
        print(json.dumps(r))
    for key in ("sync_s", "rss_growth_mib", "pods_mib", "rebuild_s"):
        values = [r[key] for r in runs]
        print(f"{key}: median {statistics.median(values)} (min {min(values)}, max {max(values)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
