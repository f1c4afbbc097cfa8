"""The local pod lab: nodes and pods as network namespaces, a real CNI chain,
and the cluster state file the agent reads. See ``agent.lab.lab.Lab``.

Names are imported lazily: ``agent.cli`` imports ``agent.lab.cli`` on every
start (the agent's included), and pyroute2 alone costs ~100 ms.
"""

__all__ = ["CNIError", "DEFAULT_ROOT", "Lab", "LabError", "ManifestError"]

DEFAULT_ROOT = "/run/ambient-lab"


def __getattr__(name: str):
    if name == "CNIError":
        from agent.lab.cnichain import CNIError
        return CNIError
    if name in ("Lab", "LabError"):
        from agent.lab import lab
        return getattr(lab, name)
    if name == "ManifestError":
        from agent.lab.model import ManifestError
        return ManifestError
    raise AttributeError(f"module 'agent.lab' has no attribute {name!r}")
