"""Fixtures: a running stand-in API server and an official client configured for it."""

import pytest

from lab.kubeapi.server import KubeApiServer


@pytest.fixture
def kubeapi():
    with KubeApiServer(bookmark_interval=0.3) as api:
        yield api


@pytest.fixture
def kubeconfig(kubeapi, tmp_path):
    return kubeapi.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def api_client(kubeconfig):
    from kubernetes import config
    client = config.new_client_from_config(config_file=kubeconfig)
    yield client
    client.close()
