"""`ambient-agent run` defaults that depend on where it runs."""

import pytest

from agent.cli import build_parser


@pytest.mark.parametrize("env,expected", [
    ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, "kube"),
    ({}, "file:/run/ambient-agent/state.json"),
])
def test_state_source_defaults_to_the_api_inside_a_cluster(monkeypatch, env, expected):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert build_parser().parse_args(["run", "--node", "n1"]).state == expected


def test_explicit_state_wins(monkeypatch):
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert build_parser().parse_args(["run", "--node", "n1", "--state", "file:/x"]).state == "file:/x"
