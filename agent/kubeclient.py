"""Where the official ``kubernetes`` client connects: one rule for every user.

The kube state source and the CA's TokenReview authenticator both need an
API client configuration, chosen the same way: an explicit kubeconfig path;
without one, the in-cluster configuration when running in a pod (the kubelet
sets ``KUBERNETES_SERVICE_HOST``), else ``$KUBECONFIG`` (its first entry) or
``~/.kube/config``. Callers turn ``KubeConfigError`` into their own error
type and tune the configuration (pool size, retries) themselves.
"""

from __future__ import annotations

import os


class KubeConfigError(ValueError):
    """No usable client configuration; the message says where it was looked for and why."""


def load_configuration(kubeconfig: str | None = None, *, in_cluster: bool | None = None,
                       hint: str = ""):
    """``(kubernetes.client.Configuration, where)``; ``where`` names what was loaded.

    ``in_cluster`` True/False forces or forbids the in-cluster configuration
    when no ``kubeconfig`` is given (None: decide by KUBERNETES_SERVICE_HOST).
    ``hint`` is appended to the "does not exist" message (e.g. which flag to pass).
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig is None and (in_cluster or (in_cluster is None and os.environ.get("KUBERNETES_SERVICE_HOST"))):
        where = "in-cluster configuration"
        try:
            config.load_incluster_config(client_configuration=configuration)
        except Exception as exc:    # ConfigException: token or CA file missing
            raise KubeConfigError(f"cannot load the client configuration ({where}): "
                                  f"{' '.join(str(exc).split())}") from None
        return configuration, where
    path = (kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config"))
    path = path.split(os.pathsep)[0]
    where = f"kubeconfig {path}"
    if not os.path.exists(path):
        raise KubeConfigError(f"{where} does not exist (and not running in a pod{hint})")
    try:
        config.load_kube_config(config_file=path, client_configuration=configuration, persist_config=False)
    except Exception as exc:        # ConfigException, YAML errors, missing keys
        raise KubeConfigError(f"cannot load the client configuration ({where}): "
                              f"{' '.join(str(exc).split())}") from None
    return configuration, where
