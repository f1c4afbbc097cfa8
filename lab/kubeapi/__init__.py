"""A stand-in Kubernetes API server for development: tests and benchmarks.

Never imported by the product (``agent/``, ``cni/``). It lets tests and
``bench/`` drive the official ``kubernetes`` client and the real kubectl
against an API server whose behaviour they control. Usage and limits:
tests/kubeapi/README.md; protocol details: the docstring of ``server.py``.
"""
