"""ambient-cni: the chained CNI plugin that enrols pods with the node agent.

Runs once per pod sandbox operation, so it imports little (json, os,
socket and the pure rule) and decides fast:

* ADD: if the enrolment rule says the pod belongs to the mesh, the node
  agent must confirm it captured the pod before the pod's containers start;
  if the agent cannot be reached the ADD fails with code 11 and the runtime
  retries (the pod waits, its traffic never flows uncaptured). A pod outside
  the mesh is reported to the agent with a 200 ms budget whose failure is
  ignored (so a label added later can enrol it), and never waits on it.
* DEL: best effort; the pod's resources are going away anyway.
* CHECK: a pod that should be enrolled must be enrolled.
"""

from __future__ import annotations

import json
import os
import socket
import sys

from agent.enrol.rule import decide
from cni.config import (ERR_INVALID_CONFIG, ERR_NOT_ENROLLED, ERR_TRY_AGAIN_LATER, CniError,
                        Environment, PluginConfig, add_result, parse_config, parse_environment,
                        result_addresses, version_result)

NOTIFY_BUDGET_SECONDS = 0.2


def agent_call(path: str, request: dict, timeout: float) -> dict:
    """One request/response with the node agent; raises OSError or ValueError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ValueError("the agent closed the connection without answering")
    reply = json.loads(buf)
    if not isinstance(reply, dict):
        raise ValueError(f"the agent answered {buf[:200]!r}")
    return reply


def read_pod(config: PluginConfig, env: Environment) -> tuple[dict | None, dict | None]:
    """The pod and its namespace from the cluster state file."""
    path = config.state[len("file:"):]
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, "cluster state unreadable", f"{path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
        items = doc["items"] if isinstance(doc, dict) and "items" in doc else [doc]
    except (ValueError, KeyError):
        from agent.state.model import load_state_text   # YAML state: rare, slower path
        state = load_state_text(text)
        return state.pod(env.pod_namespace, env.pod_name), state.namespace(env.pod_namespace)
    pod = namespace = None
    for item in items:
        if not isinstance(item, dict):
            continue
        meta = item.get("metadata") or {}
        if item.get("kind") == "Pod" and meta.get("name") == env.pod_name and \
                (meta.get("namespace") or "default") == env.pod_namespace:
            pod = item
        elif item.get("kind") == "Namespace" and meta.get("name") == env.pod_namespace:
            namespace = item
    return pod, namespace


def must_enrol(config: PluginConfig, env: Environment) -> bool:
    pod, namespace = read_pod(config, env)
    if pod is None:
        # Kubernetes creates the Pod object before the kubelet runs CNI, so a
        # missing pod means the state has not caught up. Decide on what we
        # know: a pod in an ambient namespace must wait for its record (code
        # 11, retried); otherwise treat it as outside the mesh.
        pod = {"metadata": {"namespace": env.pod_namespace, "name": env.pod_name}}
        if decide(pod, namespace, config.exclude_namespaces).enrolled:
            raise CniError(ERR_TRY_AGAIN_LATER, f"pod {env.pod_namespace}/{env.pod_name} not yet in the cluster state",
                           "its namespace is in the mesh; retry once the state has it")
        return False
    return decide(pod, namespace, config.exclude_namespaces).enrolled


def cmd_add(config: PluginConfig, env: Environment) -> dict:
    ips, gateways = result_addresses(config.prev_result or {})
    request = {"op": "cni-add", "namespace": env.pod_namespace, "name": env.pod_name,
               "uid": env.pod_uid, "container_id": env.container_id, "netns": env.netns,
               "interface": env.ifname, "ips": ips, "gateways": gateways}
    if not must_enrol(config, env):
        if ips:
            try:
                agent_call(config.agent_socket, request, NOTIFY_BUDGET_SECONDS)
            except (OSError, ValueError):
                pass    # informational only: this pod does not depend on the agent
        return add_result(config)
    if not ips:
        raise CniError(ERR_INVALID_CONFIG, "prevResult has no IP address to capture",
                       "the previous plugin in the chain assigned no address")
    try:
        reply = agent_call(config.agent_socket, request, config.agent_timeout_seconds)
    except (OSError, ValueError) as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, "ambient node agent unreachable",
                       f"{config.agent_socket}: {exc}") from None
    if not reply.get("ok"):
        raise CniError(ERR_TRY_AGAIN_LATER, "ambient node agent refused the pod",
                       str(reply.get("error", reply)))
    return add_result(config)


def cmd_del(config: PluginConfig, env: Environment) -> None:
    if not (env.pod_namespace and env.pod_name):
        return
    request = {"op": "cni-del", "namespace": env.pod_namespace, "name": env.pod_name,
               "uid": env.pod_uid, "container_id": env.container_id}
    try:
        agent_call(config.agent_socket, request, config.agent_timeout_seconds)
    except (OSError, ValueError) as exc:
        # DEL must succeed when there is nothing left to undo; the agent
        # drops records of vanished namespaces itself when it starts.
        print(f"ambient-cni: DEL {env.pod_namespace}/{env.pod_name}: agent unreachable: {exc}",
              file=sys.stderr)


def cmd_check(config: PluginConfig, env: Environment) -> None:
    if not must_enrol(config, env):
        return
    try:
        status = agent_call(config.agent_socket, {"op": "status"}, config.agent_timeout_seconds)
    except (OSError, ValueError) as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, "ambient node agent unreachable",
                       f"{config.agent_socket}: {exc}") from None
    for pod in status.get("pods", []):
        if pod.get("namespace") == env.pod_namespace and pod.get("name") == env.pod_name:
            if pod.get("enrolled"):
                return
            break
    raise CniError(ERR_NOT_ENROLLED, f"pod {env.pod_namespace}/{env.pod_name} should be in the mesh but is not captured")


def run(stdin: bytes, environ: dict[str, str]) -> tuple[int, dict | None]:
    """The whole plugin as a function: (exit code, JSON to print or None)."""
    version = "1.0.0"
    try:
        env = parse_environment(environ)
        if env.command == "VERSION":
            return 0, version_result()
        config = parse_config(stdin, env.command)
        version = config.cni_version
        if env.command == "ADD":
            return 0, cmd_add(config, env)
        if env.command == "DEL":
            cmd_del(config, env)
            return 0, None
        cmd_check(config, env)
        return 0, None
    except CniError as err:
        return 1, err.to_json(version)


def main() -> int:
    code, output = run(sys.stdin.buffer.read(), dict(os.environ))
    if output is not None:
        sys.stdout.write(json.dumps(output))
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
