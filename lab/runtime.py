"""Running CNI plugins the way a container runtime does (the I/O shell).

The plugins run inside the *node's* network namespace, which is the
"host" network as far as they are concerned: the bridge plugin creates
``cni0`` and the host end of the pod's veth there, and moves the other end
into ``CNI_NETNS``. Each plugin gets its configuration on stdin and the
``CNI_*`` environment; what it prints is parsed by ``cnichain``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from typing import Mapping

from lab import cnichain
from lab.cnichain import CNIError, Sandbox
from lab.sysops import child_setup

log = logging.getLogger(__name__)


class CniRunner:
    """Executes network configuration lists for pods of one node."""

    def __init__(self, cni_path: str, host_netns: str, timeout: float = 30.0,
                 base_env: Mapping[str, str] | None = None) -> None:
        self.cni_path = cni_path          # CNI_PATH: ':'-separated plugin directories
        self.host_netns = host_netns      # /run/netns/<node netns>
        self.timeout = timeout
        self.base_env = dict(os.environ if base_env is None else base_env)

    def find_plugin(self, plugin_type: str) -> str:
        if "/" in plugin_type or plugin_type in ("", ".", ".."):
            raise CNIError(cnichain.CODE_INVALID_CONFIG, f"invalid plugin type {plugin_type!r}")
        for d in self.cni_path.split(":"):
            path = os.path.join(d, plugin_type)
            if d and os.path.isfile(path) and os.access(path, os.X_OK):
                return path
        raise CNIError(cnichain.CODE_EXEC_FAILED,
                       f"failed to find plugin {plugin_type!r} in path {self.cni_path}",
                       plugin=plugin_type)

    def exec_plugin(self, command: str, config: dict, sandbox: Sandbox) -> dict | None:
        """Run one plugin once; its result, or ``CNIError``."""
        plugin_type = config.get("type", "")
        binary = self.find_plugin(plugin_type)
        env = cnichain.plugin_env(command, sandbox, self.cni_path, self.base_env)
        try:
            netns_fd = os.open(self.host_netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise CNIError(cnichain.CODE_EXEC_FAILED,
                           f"node network namespace {self.host_netns}: {exc.strerror}",
                           plugin=plugin_type, command=command) from None
        try:
            proc = subprocess.run(
                [binary], input=json.dumps(config).encode(), capture_output=True,
                env=env, cwd="/", timeout=self.timeout,
                preexec_fn=child_setup(netns_fd=netns_fd))
        except subprocess.TimeoutExpired:
            raise CNIError(cnichain.CODE_EXEC_FAILED, f"plugin timed out after {self.timeout:g}s",
                           plugin=plugin_type, command=command) from None
        except (OSError, subprocess.SubprocessError) as exc:
            raise CNIError(cnichain.CODE_EXEC_FAILED, f"cannot run plugin: {exc}",
                           plugin=plugin_type, command=command) from None
        finally:
            os.close(netns_fd)
        if proc.stderr.strip():
            log.debug("%s %s stderr: %s", plugin_type, command,
                      proc.stderr.decode("utf-8", "replace").strip())
        return cnichain.parse_output(plugin_type, command, proc.returncode, proc.stdout, proc.stderr)

    def add_network(self, conflist: dict, sandbox: Sandbox,
                    runtime_config: Mapping | None = None) -> dict:
        """ADD every plugin in order, each seeing the previous one's result."""
        cnichain.validate_conflist(conflist)
        prev: dict | None = None
        for i in range(len(conflist["plugins"])):
            conf = cnichain.plugin_config(conflist, i, prev, runtime_config)
            prev = self.exec_plugin("ADD", conf, sandbox)
        assert prev is not None
        return prev

    def del_network(self, conflist: dict, sandbox: Sandbox, prev_result: dict | None,
                    runtime_config: Mapping | None = None) -> list[CNIError]:
        """DEL every plugin, last first; returns the failures instead of stopping.

        libcni stops at the first failing DEL and lets the runtime retry; the
        lab is tearing down for good, so it tries every plugin and reports.
        """
        cnichain.validate_conflist(conflist)
        errors: list[CNIError] = []
        for _type, conf in cnichain.del_configs(conflist, prev_result, runtime_config):
            try:
                self.exec_plugin("DEL", conf, sandbox)
            except CNIError as exc:
                log.warning("CNI DEL %s/%s: %s", sandbox.namespace, sandbox.name, exc)
                errors.append(exc)
        return errors
