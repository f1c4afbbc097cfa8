"""Choosing the state source from its URL: ``file:PATH``, ``kube`` or ``kube:KUBECONFIG``.

* ``file:PATH`` (``file:///PATH``): a state file (``FileStateSource``);
* ``kube``: the Kubernetes API (``KubeStateSource``), in-cluster when running
  in a pod, else ``$KUBECONFIG`` or ``~/.kube/config`` (or the caller's
  ``kubeconfig`` default, e.g. the CA's ``--kubeconfig``);
* ``kube:PATH``: the Kubernetes API through that kubeconfig.

The kube source (and the ``kubernetes`` client, 150 ms to import) is only
imported when asked for.
"""

from __future__ import annotations

from agent.state.file import FileStateSource, parse_state_url
from agent.state.model import StateError

STATE_URL_HELP = ("cluster state source: file:PATH (a state file), kube (the Kubernetes API: "
                  "in-cluster, else $KUBECONFIG or ~/.kube/config) or kube:KUBECONFIG")


def parse_source_url(url: str) -> tuple[str, str | None]:
    """("file", PATH) or ("kube", KUBECONFIG or None); ``StateError`` for anything else."""
    scheme, _sep, rest = url.partition(":")
    if scheme == "kube":
        if rest.startswith("//"):
            raise StateError(f"state source {url!r}: write kube:/path/to/kubeconfig (a path, not a URL)")
        return "kube", rest or None
    return "file", parse_state_url(url)


def open_state_source(url: str, *, kubeconfig: str | None = None, **kube_options):
    """The source ``url`` names; ``kubeconfig`` is the default for a bare ``kube``.

    ``kube_options`` go to ``KubeStateSource`` (``kinds``, timeouts,
    backoff); a file source ignores them. Raises ``StateError`` for a bad URL or an unusable
    client configuration (a missing kubeconfig), never for an unreachable
    API server: that is retried in the background.
    """
    scheme, where = parse_source_url(url)
    if scheme == "file":
        assert where is not None, "parse_source_url: a file source always has a path"
        return FileStateSource(where)
    from agent.state.kube import KubeStateSource
    return KubeStateSource(where or kubeconfig, **kube_options)
