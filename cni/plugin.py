"""ambient-cni: the chained CNI plugin that enrols pods with the node agent.

It runs once per pod sandbox operation, so it imports little (json, os,
socket, sys, time and the pure enrolment rule) and decides fast:

* ADD: read the pod and its namespace (from the Kubernetes API with
  ``"state": "kube"``, or from a cluster state file with ``file:PATH``) and
  apply the enrolment rule. A pod that must be in the mesh is only let through
  once the node agent confirms it (connection, request, answer: all within
  ``agent_timeout_seconds``); otherwise the ADD fails with code 11 and the
  runtime retries, so the pod's traffic never flows uncaptured. A pod
  outside the mesh is reported to the agent with a 200 ms budget whose
  failure is ignored (the agent learns its namespace, so a label added
  later can enrol it), and never waits on the agent.
  Either way the result is ``prevResult``, unchanged.
* DEL: tell the agent, best effort, within the same 200 ms; DEL succeeds
  even if the agent is gone or hung (the spec wants DEL to succeed when
  there is nothing left to undo, a hung agent must not stall pod teardown,
  and the agent forgets pods whose namespace has vanished on its own).
* CHECK: a pod that must be in the mesh must be listed enrolled by the
  agent, asked within the same 200 ms.
* Any command without ``K8S_POD_NAMESPACE`` or ``K8S_POD_NAME`` in
  ``CNI_ARGS`` is not for a Kubernetes pod (podman passes only the name):
  it succeeds, ADD with ``prevResult`` untouched, as istio-cni does.

Errors are CNI error objects on stdout with exit status 1, and are written
to stderr and to ``log_file`` (if configured; also when the failure comes
before the configuration could be validated). Every call logs one line to
``log_file``.
"""

from __future__ import annotations

import json
import os
import sys
import time

from agent import controlclient
from agent.enrol.rule import EnrolmentDecision, decide, pod_namespace
from cni.config import (
    CURRENT_VERSION,
    ERR_INTERNAL,
    ERR_INVALID_CONFIG,
    ERR_IO,
    ERR_NOT_ENROLLED,
    ERR_TRY_AGAIN_LATER,
    STATE_KUBE,
    CniError,
    Environment,
    PluginConfig,
    add_result,
    log_file_hint,
    not_a_kubernetes_pod,
    parse_config,
    parse_environment,
    pod_addresses,
    render,
    version_result,
)

# The whole budget (connect, request, answer) of every agent call that must
# not hold a pod up: telling the agent about a pod outside the mesh, DEL
# (pod teardown must not wait on a hung agent) and CHECK. Only the ADD of a
# pod that must be in the mesh waits longer (``agent_timeout_seconds``).
# The agent answers from memory: 1-2 ms on loopback when it is healthy.
NOTIFY_BUDGET_SECONDS = 0.2
# A status reply lists every pod on the node; anything bigger is not an agent.
MAX_REPLY_BYTES = 16 * 1024 * 1024


# -- talking to the agent ----------------------------------------------------------

class AgentError(Exception):
    """The agent could not be asked or did not answer; the message says which step failed."""


def agent_call(path: str, request: dict, timeout: float) -> dict:
    """Send one request line, read one reply line, all within ``timeout`` seconds.

    The agent's own control client (``agent/controlclient.py``, stdlib only):
    one budget covers connect, send and receive together (a per-operation
    timeout would let a slow agent stretch 200 ms into 600), and the reply is
    bounded by ``MAX_REPLY_BYTES``.
    """
    try:
        return controlclient.call(path, request, timeout, MAX_REPLY_BYTES)
    except controlclient.ControlCallError as exc:      # timeouts too
        raise AgentError(str(exc)) from None
    except OSError as exc:                              # connect's own error
        raise AgentError(f"connect {path}: {exc.strerror or exc}") from None


# -- logging -----------------------------------------------------------------------

class Log:
    """Errors to stderr (the runtime shows it), everything to ``log_file`` if set.

    Several plugin processes may append to the same file at once: each line
    is one ``write`` on an ``O_APPEND`` descriptor, so lines never interleave.
    A log that cannot be written never fails the plugin.
    """

    def __init__(self, env: Environment | None = None) -> None:
        self.path: str | None = None
        self.unwritable = False
        self.context = ""
        if env is not None and env.command != "VERSION":
            self.context = f"{env.command} {env.pod_key} {env.container_id[:12]}"

    def info(self, message: str) -> None:
        self._file(message)

    def error(self, message: str) -> None:
        prefix = f"ambient-cni: {self.context}" if self.context else "ambient-cni"
        sys.stderr.write(f"{prefix}: {message}\n")
        self._file(message)

    def _file(self, message: str) -> None:
        if not self.path:
            return
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        line = f"{stamp} ambient-cni[{os.getpid()}] {self.context}: {message}\n".encode(errors="replace")
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        except OSError as exc:
            sys.stderr.write(f"ambient-cni: cannot write log {self.path}: {exc.strerror}\n")
            self.path = None      # say it once
            self.unwritable = True


# -- the cluster state ---------------------------------------------------------------

def _find(items, namespace: str, name: str) -> tuple[dict | None, dict | None]:
    """The Pod ``namespace/name`` and the Namespace ``namespace`` among ``items``.

    A later item replaces an earlier one, as in ``agent.state.model``.
    """
    pod = ns = None
    for item in items:
        meta = item.get("metadata") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            continue
        kind = item.get("kind")
        if kind == "Pod":
            if meta.get("name") == name and pod_namespace(item) == namespace:
                pod = item
        elif kind == "Namespace" and meta.get("name") == namespace:
            ns = item
    return pod, ns


def read_pod(config: PluginConfig, env: Environment) -> tuple[dict | None, dict | None]:
    """The pod and its Namespace object (None: absent), from the API or the state file."""
    if config.state == STATE_KUBE:
        return read_pod_from_api(config, env)
    return read_pod_from_file(config, env)


def read_pod_from_api(config: PluginConfig, env: Environment) -> tuple[dict | None, dict | None]:
    """GET the pod and its namespace (``cni.kube``, stdlib only).

    An API that cannot be asked fails the ADD with code 11, as an unreadable
    state file does: nothing can tell whether the pod must be captured. The
    one exception is a pod of an excluded namespace: the rule never enrols
    it whatever its labels, so it needs no answer (and kube-system's pods,
    the API server's own network among them, do not wait for the API).
    """
    from cni.kube import KubeError, read_pod_and_namespace
    assert config.kubeconfig is not None, "parse_config: a kube state always has a kubeconfig"
    try:
        return read_pod_and_namespace(config.kubeconfig, env.pod_namespace, env.pod_name,
                                      config.api_timeout_seconds)
    except KubeError as exc:
        if env.pod_namespace in config.exclude_namespaces:
            return None, None
        raise CniError(ERR_TRY_AGAIN_LATER, "Kubernetes API unreachable", str(exc)) from None


def read_pod_from_file(config: PluginConfig, env: Environment) -> tuple[dict | None, dict | None]:
    """The pod and its Namespace object from the cluster state file (None: absent).

    The lab writes JSON, scanned here directly; anything else (YAML written
    by hand) goes through ``agent.state.model``, imported only then because
    it pulls in dataclasses and, for YAML, PyYAML.
    """
    path = config.state_path
    assert path is not None, "parse_config: a file state always has a path"
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, "cluster state unreadable",
                       f"{path}: {exc.strerror or exc}") from None
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("kind"), str):
        items = doc.get("items") if doc["kind"].endswith("List") else [doc]
        if isinstance(items, list):
            return _find(items, env.pod_namespace, env.pod_name)
    from agent.state.model import StateError, load_state_text
    try:
        state = load_state_text(data.decode("utf-8", "replace"))
    except (StateError, ValueError, RecursionError) as exc:
        # ValueError, RecursionError: a number too long for int() or nesting
        # too deep for the parser (JSON or YAML); an answer, not a traceback.
        raise CniError(ERR_TRY_AGAIN_LATER, "cluster state unreadable",
                       f"{path}: {type(exc).__name__ + ': ' if not isinstance(exc, StateError) else ''}"
                       f"{str(exc)[:300]}") from None
    return state.pod(env.pod_namespace, env.pod_name), state.namespace(env.pod_namespace)


def enrolment(config: PluginConfig, env: Environment) -> EnrolmentDecision:
    """The rule's answer for the pod of this invocation.

    Kubernetes creates the Pod object before the kubelet asks for a sandbox,
    so a pod missing from the state (or present only as an older pod of the
    same name, with another uid) means the state has not caught up yet. The
    rule is then applied to what is known, the namespace:

    * namespace in the mesh: code 11, "pod not yet known". The runtime
      retries; guessing "not enrolled" would start a pod of a mesh
      namespace uncaptured (and the pod's own labels might still opt it
      out, which only its record can tell).
    * otherwise: not enrolled. Only a pod label could still enrol it, and
      failing every pod of every unlabelled namespace while the state lags
      would make the whole node depend on the state writer.
    """
    pod, namespace = read_pod(config, env)
    if pod is not None and env.pod_uid:
        meta = pod.get("metadata")
        state_uid = meta.get("uid") if isinstance(meta, dict) else None
        if state_uid and state_uid != env.pod_uid:
            pod = None
    if pod is not None:
        return decide(pod, namespace, config.exclude_namespaces)
    stand_in = {"metadata": {"namespace": env.pod_namespace, "name": env.pod_name}}
    by_namespace = decide(stand_in, namespace, config.exclude_namespaces)
    if by_namespace.enrolled:
        raise CniError(ERR_TRY_AGAIN_LATER, f"pod {env.pod_key} not yet known",
                       f"no record of pod {env.pod_key} (uid {env.pod_uid or '?'}) in "
                       f"{config.state_path or 'the Kubernetes API'} yet, and its {by_namespace.reason}")
    return EnrolmentDecision(False, f"pod not in the cluster state; {by_namespace.reason}")


# -- commands --------------------------------------------------------------------------

def cmd_add(config: PluginConfig, env: Environment, log: Log) -> dict:
    ips, gateways = pod_addresses(config.prev_result or {})
    request = {"op": "cni-add", "namespace": env.pod_namespace, "name": env.pod_name,
               "uid": env.pod_uid, "container_id": env.container_id, "netns": env.netns,
               "interface": env.ifname, "ips": ips, "gateways": gateways}
    decision = enrolment(config, env)

    if not decision.enrolled:
        # The agent refuses a cni-add without an address; nothing to tell it then.
        if ips:
            try:
                agent_call(config.agent_socket, request, quick_budget(config))
            except AgentError as exc:
                log.info(f"agent not informed (ignored, the pod does not need it): {exc}")
        log.info(f"not enrolled: {decision.reason}")
        return add_result(config)

    if not ips:
        raise CniError(ERR_INVALID_CONFIG, "prevResult has no pod address to capture",
                       "the plugins before ambient-cni gave the pod's interface no address")
    try:
        reply = agent_call(config.agent_socket, request, config.agent_timeout_seconds)
    except AgentError as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, "ambient node agent unreachable", str(exc)) from None
    if reply.get("ok") is not True:
        raise CniError(ERR_TRY_AGAIN_LATER, "ambient node agent did not enrol the pod",
                       str(reply.get("error") or f"the agent answered {json.dumps(reply)[:300]}"))
    if reply.get("enrolled") is False:
        # The agent is the authority on capture: it may have seen a newer
        # state (a label just removed). Not an error for the pod.
        log.info(f"the rule says enrol ({decision.reason}) but the agent did not: {reply.get('reason')}")
    else:
        log.info(f"enrolled: {decision.reason}")
    return add_result(config)


def quick_budget(config: PluginConfig) -> float:
    """The agent budget of a call that must not hold a pod up (see NOTIFY_BUDGET_SECONDS)."""
    return min(NOTIFY_BUDGET_SECONDS, config.agent_timeout_seconds)


def cmd_del(config: PluginConfig, env: Environment, log: Log) -> None:
    request = {"op": "cni-del", "namespace": env.pod_namespace, "name": env.pod_name,
               "uid": env.pod_uid, "container_id": env.container_id}
    try:
        reply = agent_call(config.agent_socket, request, quick_budget(config))
    except AgentError as exc:
        log.error(f"agent not informed (DEL succeeds anyway): {exc}")
        return
    if reply.get("ok") is not True:
        log.error(f"agent refused the DEL (DEL succeeds anyway): {reply.get('error') or reply}")
    else:
        log.info("agent informed")


def _listed(pods, env: Environment) -> dict | None:
    """The agent's entry for this pod: by uid when both sides know it, else by name."""
    for entry in pods if isinstance(pods, list) else []:
        if not isinstance(entry, dict):
            continue
        if env.pod_uid and entry.get("uid"):
            if entry["uid"] == env.pod_uid:
                return entry
        elif entry.get("namespace") == env.pod_namespace and entry.get("name") == env.pod_name:
            return entry
    return None


def cmd_check(config: PluginConfig, env: Environment, log: Log) -> None:
    decision = enrolment(config, env)
    if not decision.enrolled:
        log.info(f"not in the mesh, nothing to check: {decision.reason}")
        return
    try:
        status = agent_call(config.agent_socket, {"op": "status"}, quick_budget(config))
    except AgentError as exc:
        raise CniError(ERR_TRY_AGAIN_LATER, "ambient node agent unreachable", str(exc)) from None
    if status.get("ok") is not True:
        raise CniError(ERR_TRY_AGAIN_LATER, "ambient node agent status failed",
                       str(status.get("error") or status))
    entry = _listed(status.get("pods"), env)
    if entry is None:
        raise CniError(ERR_NOT_ENROLLED, f"pod {env.pod_key} must be in the mesh but the agent does not know it",
                       f"rule: {decision.reason}")
    if entry.get("enrolled") is not True:
        raise CniError(ERR_NOT_ENROLLED, f"pod {env.pod_key} must be in the mesh but is not captured",
                       f"rule: {decision.reason}; agent: {entry.get('reason') or 'not enrolled'}")
    log.info("enrolled, as it must be")


# -- entry point ------------------------------------------------------------------------

def run(environ, read_stdin) -> tuple[int, dict | None]:
    """The whole plugin as a function: (exit status, JSON object to print or None).

    ``read_stdin`` is called only for commands that take a configuration
    (VERSION run by hand must not wait for a terminal's end of file).
    """
    version = CURRENT_VERSION
    log = Log()
    log.context = str(environ.get("CNI_COMMAND", ""))[:16]     # until the environment is validated
    data = b""
    try:
        if environ.get("CNI_COMMAND") in ("ADD", "DEL", "CHECK"):
            # Read before the environment is validated: a bad environment is
            # then still logged to the configured log_file.
            try:
                data = read_stdin()
            except OSError as exc:
                raise CniError(ERR_IO, "cannot read the network configuration from stdin",
                               str(exc.strerror or exc)) from None
        env = parse_environment(environ)
        if env.command == "VERSION":
            return 0, version_result()
        log = Log(env)
        config = parse_config(data, env.command)
        version = config.cni_version
        log.path = config.log_file
        why_not = not_a_kubernetes_pod(env)
        if why_not:
            log.info(why_not)
            return 0, (add_result(config) if env.command == "ADD" else None)
        if env.command == "ADD":
            return 0, cmd_add(config, env, log)
        if env.command == "DEL":
            cmd_del(config, env, log)
        else:
            cmd_check(config, env, log)
        return 0, None
    except CniError as err:
        _log_failure(log, data, f"error {err.code}: {err}")
        return 1, err.to_json(version)
    except Exception as exc:   # a bug: still answer in CNI's terms, with the traceback on stderr
        import traceback
        traceback.print_exc()
        internal = CniError(ERR_INTERNAL, "ambient-cni internal error", f"{type(exc).__name__}: {exc}")
        _log_failure(log, data, f"error {internal.code}: {internal}")
        return 1, internal.to_json(version)


def _log_failure(log: Log, data: bytes, message: str) -> None:
    """A failure to stderr and to ``log_file``, even one raised before the config was validated."""
    if not log.path and not log.unwritable and data:
        log.path = log_file_hint(data)
    log.error(message)


def main() -> int:
    code, output = run(os.environ, sys.stdin.buffer.read)
    if output is not None:
        sys.stdout.write(render(output))
        sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
