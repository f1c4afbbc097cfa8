"""The local pod lab: nodes and pods as network namespaces, a real CNI chain,
and the cluster state file the agent reads. See ``lab.lab.Lab``.

A development tool (the ``lab`` extra), not product code: the product package
(``agent``, ``cni``) never imports it. Names are imported lazily so that
``ambient-lab --help`` and the pure ``lab.model``/``lab.cnichain`` stay cheap
(pyroute2 alone costs ~100 ms).
"""

__all__ = ["CNIError", "DEFAULT_ROOT", "Lab", "LabError", "ManifestError"]

DEFAULT_ROOT = "/run/ambient-lab"


def __getattr__(name: str):
    if name == "CNIError":
        from lab.cnichain import CNIError
        return CNIError
    if name in ("Lab", "LabError"):
        from lab import lab
        return getattr(lab, name)
    if name == "ManifestError":
        from lab.model import ManifestError
        return ManifestError
    raise AttributeError(f"module 'lab' has no attribute {name!r}")
