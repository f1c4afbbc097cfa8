"""ambient-cni's pure input/output layer: environment, CNI_ARGS, plugin
configuration (and every error code it can produce), prevResult addresses,
results and errors."""

from __future__ import annotations

import copy
import json

import pytest

from cni.config import (ERR_DECODE, ERR_INCOMPATIBLE_VERSION, ERR_INVALID_CONFIG, ERR_INVALID_ENV, CniError,
                        add_result, log_file_hint, not_a_kubernetes_pod, parse_cni_args, parse_config,
                        parse_environment, pod_addresses, render, state_path_of, version_result)

POD_ARGS = "IgnoreUnknown=1;K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=web;K8S_POD_INFRA_CONTAINER_ID=c1;K8S_POD_UID=u1"

# prevResults as the bridge plugin (with host-local IPAM) returns them.
PREV_100 = {"cniVersion": "1.0.0",
            "interfaces": [{"name": "cni0", "mac": "aa:00:00:00:00:01"},
                           {"name": "veth1", "mac": "aa:00:00:00:00:02"},
                           {"name": "eth0", "mac": "aa:00:00:00:00:03", "sandbox": "/run/netns/p1"}],
            "ips": [{"address": "198.18.0.5/24", "gateway": "198.18.0.1", "interface": 2}],
            "routes": [{"dst": "0.0.0.0/0"}], "dns": {}}
PREV_040 = {"cniVersion": "0.4.0",
            "interfaces": [{"name": "eth0", "sandbox": "/run/netns/p1"}],
            "ips": [{"version": "4", "address": "198.18.0.7/24", "gateway": "198.18.0.1", "interface": 0},
                    {"version": "6", "address": "fd00:198:18::7/64", "gateway": "fd00:198:18::1", "interface": 0}]}
PREV_031 = {"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "198.18.0.6/24", "gateway": "198.18.0.1"}]}


def env(command="ADD", **extra):
    e = {"CNI_COMMAND": command, "CNI_CONTAINERID": "c1", "CNI_NETNS": "/run/netns/p1",
         "CNI_IFNAME": "eth0", "CNI_PATH": "/opt/cni/bin", "CNI_ARGS": POD_ARGS}
    e.update(extra)
    return {k: v for k, v in e.items() if v is not None}


def config(prev=PREV_100, version="1.0.0", **fields):
    c = {"cniVersion": version, "name": "lab", "type": "ambient-cni",
         "agent_socket": "/run/x/agent.sock", "state": "file:/run/x/state.json"}
    if prev is not None:
        c["prevResult"] = prev
    c.update(fields)
    return json.dumps({k: v for k, v in c.items() if v is not DROP}).encode()


DROP = object()


# -- CNI_ARGS ---------------------------------------------------------------------

@pytest.mark.parametrize("text, parsed", [
    ("", {}),
    (POD_ARGS, {"IgnoreUnknown": "1", "K8S_POD_NAMESPACE": "mesh", "K8S_POD_NAME": "web",
                "K8S_POD_INFRA_CONTAINER_ID": "c1", "K8S_POD_UID": "u1"}),
    ("A=1;", {"A": "1"}),                             # a trailing separator
    ("A=;B=2", {"A": "", "B": "2"}),                  # an empty value is a value
    ("A=x=y", {"A": "x=y"}),                          # only the first '=' separates
    ("Unknown=1;K8S_POD_NAME=web", {"Unknown": "1", "K8S_POD_NAME": "web"}),   # unknown keys are fine
])
def test_cni_args(text, parsed):
    assert parse_cni_args(text) == parsed


@pytest.mark.parametrize("text", ["K8S_POD_NAME", "A=1;junk", "=value"])
def test_malformed_cni_args(text):
    with pytest.raises(CniError) as err:
        parse_cni_args(text)
    assert err.value.code == ERR_INVALID_ENV == 4
    assert "CNI_ARGS" in err.value.msg and "KEY=VALUE" in err.value.details


# -- environment ---------------------------------------------------------------------

def test_add_environment():
    e = parse_environment(env())
    assert (e.command, e.container_id, e.netns, e.ifname, e.path) == ("ADD", "c1", "/run/netns/p1", "eth0",
                                                                       "/opt/cni/bin")
    assert (e.pod_namespace, e.pod_name, e.pod_uid, e.infra_container_id) == ("mesh", "web", "u1", "c1")
    assert e.pod_key == "mesh/web"


def test_version_needs_nothing_else():
    assert parse_environment({"CNI_COMMAND": "VERSION"}).command == "VERSION"


def test_del_needs_neither_netns_nor_pod_identity():
    e = parse_environment(env("DEL", CNI_NETNS=None, CNI_ARGS=None))
    assert (e.netns, e.pod_namespace, e.pod_name) == ("", "", "")
    assert parse_environment(env("DEL", CNI_NETNS="anything")).netns == "anything"


@pytest.mark.parametrize("environ, variable", [
    (env(command=None), "CNI_COMMAND"),
    (env(command="REBOOT"), "CNI_COMMAND"),
    (env(command="GC"), "CNI_COMMAND"),                # spec 1.1 verbs are not supported
    (env(CNI_CONTAINERID=None), "CNI_CONTAINERID"),
    (env("DEL", CNI_CONTAINERID=""), "CNI_CONTAINERID"),
    (env(CNI_CONTAINERID="-leading-dash"), "CNI_CONTAINERID"),
    (env(CNI_CONTAINERID="has space"), "CNI_CONTAINERID"),
    (env(CNI_CONTAINERID="a/b"), "CNI_CONTAINERID"),
    (env(CNI_IFNAME=""), "CNI_IFNAME"),
    (env("CHECK", CNI_IFNAME=None), "CNI_IFNAME"),
    (env(CNI_IFNAME="a-very-long-ifname"), "CNI_IFNAME"),
    (env(CNI_IFNAME="eth/0"), "CNI_IFNAME"),
    (env(CNI_IFNAME=".."), "CNI_IFNAME"),
    (env(CNI_NETNS=None), "CNI_NETNS"),
    (env("CHECK", CNI_NETNS=""), "CNI_NETNS"),
    (env(CNI_NETNS="relative/ns"), "CNI_NETNS"),
    (env(CNI_ARGS="garbage"), "CNI_ARGS"),
    (env("DEL", CNI_ARGS="garbage"), "CNI_ARGS"),
])
def test_bad_environment_is_code_4_naming_the_variable(environ, variable):
    with pytest.raises(CniError) as err:
        parse_environment(environ)
    assert err.value.code == ERR_INVALID_ENV
    assert variable in err.value.msg


# What runtimes pass in CNI_ARGS, and whether ambient-cni has a Kubernetes pod to decide on.
@pytest.mark.parametrize("command, args, missing", [
    ("ADD", POD_ARGS, ()),                                              # containerd, CRI-O
    ("ADD", "IgnoreUnknown=1;K8S_POD_NAME=web", ("K8S_POD_NAMESPACE",)),  # podman, exactly
    ("DEL", "IgnoreUnknown=1;K8S_POD_NAME=web", ("K8S_POD_NAMESPACE",)),
    ("CHECK", "K8S_POD_NAMESPACE=mesh", ("K8S_POD_NAME",)),
    ("ADD", "K8S_POD_NAMESPACE=mesh;K8S_POD_NAME=", ("K8S_POD_NAME",)),   # empty counts as absent
    ("ADD", None, ("K8S_POD_NAMESPACE", "K8S_POD_NAME")),               # plain libcni callers
    ("ADD", "IgnoreUnknown=1", ("K8S_POD_NAMESPACE", "K8S_POD_NAME")),
])
def test_a_runtime_without_kubernetes_pod_args_is_told_apart(command, args, missing):
    why = not_a_kubernetes_pod(parse_environment(env(command, CNI_ARGS=args)))
    if not missing:
        assert why == ""
    else:
        assert why.startswith("not a Kubernetes pod: CNI_ARGS has no " + " and no ".join(missing))
        assert why.endswith("prevResult passed through")


@pytest.mark.parametrize("data, path", [
    (b'{"log_file": "/var/log/ambient-cni.log"}', "/var/log/ambient-cni.log"),
    (b'{"cniVersion": "9.9", "log_file": "/l.log", "agent_socket": 3}', "/l.log"),  # otherwise invalid
    (b'{"log_file": "relative.log"}', None),
    (b'{"log_file": 7}', None),
    (b'{"log_file": "/a\\u0000b"}', None),
    (b'["/l.log"]', None),
    (b'{"log_file": "/l.log"', None),                                  # truncated
    (b"[" * 5000, None),                                               # hostile nesting
    (b"", None),
])
def test_log_file_hint_finds_the_log_of_a_config_that_fails(data, path):
    assert log_file_hint(data) == path


def test_accepted_container_ids_and_interface_names():
    for cid in ("a", "0123abcdef", "pod_1.x-y"):
        assert parse_environment(env(CNI_CONTAINERID=cid)).container_id == cid
    for ifname in ("eth0", "net1", "a" * 15):
        assert parse_environment(env(CNI_IFNAME=ifname)).ifname == ifname


# -- configuration ---------------------------------------------------------------------

def test_minimal_config_gets_the_defaults():
    c = parse_config(config(), "ADD")
    assert c.cni_version == "1.0.0" and c.name == "lab"
    assert c.agent_socket == "/run/x/agent.sock"
    assert (c.state, c.state_path) == ("file:/run/x/state.json", "/run/x/state.json")
    assert c.exclude_namespaces == ("kube-system",)
    assert c.agent_timeout_seconds == 5.0
    assert c.log_file is None
    assert c.prev_result == PREV_100


def test_every_field_set():
    c = parse_config(config(exclude_namespaces=["infra", "kube-system"], agent_timeout_seconds=0.5,
                            log_file="/var/log/ambient-cni.log", state="file:///s.json"), "ADD")
    assert c.exclude_namespaces == ("infra", "kube-system")
    assert c.agent_timeout_seconds == 0.5
    assert c.log_file == "/var/log/ambient-cni.log"
    assert c.state_path == "/s.json"


def test_kube_state_reads_the_kubeconfig_path():
    c = parse_config(config(state="kube", kubeconfig="/etc/cni/net.d/ambient-cni-kubeconfig",
                            api_timeout_seconds=2), "ADD")
    assert (c.state, c.state_path) == ("kube", None)
    assert c.kubeconfig == "/etc/cni/net.d/ambient-cni-kubeconfig"
    assert c.api_timeout_seconds == 2.0


def test_an_empty_exclusion_list_excludes_nothing():
    assert parse_config(config(exclude_namespaces=[]), "ADD").exclude_namespaces == ()


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
def test_supported_versions(version):
    assert parse_config(config(version=version), "ADD").cni_version == version


@pytest.mark.parametrize("data, command, code, message", [
    # 6: undecodable
    (b"{not json", "ADD", ERR_DECODE, "not valid JSON"),
    (b"\xff\xfe\x00", "ADD", ERR_DECODE, "not valid JSON"),
    (b"", "DEL", ERR_DECODE, "not valid JSON"),
    (b"[]", "ADD", ERR_DECODE, "must be a JSON object"),
    # 1: versions
    (config(version=DROP), "ADD", ERR_INCOMPATIBLE_VERSION, "config has no cniVersion"),
    (config(version="0.2.0"), "ADD", ERR_INCOMPATIBLE_VERSION, "incompatible CNI version '0.2.0'"),
    (config(version="1.1.0"), "ADD", ERR_INCOMPATIBLE_VERSION, "incompatible CNI version '1.1.0'"),
    (config(version=1), "ADD", ERR_INCOMPATIBLE_VERSION, "incompatible CNI version 1"),
    (config(version="0.3.1", prev=PREV_031), "CHECK", ERR_INCOMPATIBLE_VERSION, "does not allow CHECK"),
    # 7: invalid fields, each named
    (config(agent_socket=DROP), "ADD", ERR_INVALID_CONFIG, "'agent_socket' is required"),
    (config(agent_socket=""), "DEL", ERR_INVALID_CONFIG, "'agent_socket' must be a path"),
    (config(agent_socket=5), "ADD", ERR_INVALID_CONFIG, "'agent_socket' must be a path"),
    (config(agent_socket="relative.sock"), "ADD", ERR_INVALID_CONFIG, "'agent_socket' must be an absolute path"),
    (config(state=DROP), "ADD", ERR_INVALID_CONFIG, "'state' is required"),
    (config(state=["file:/x"]), "ADD", ERR_INVALID_CONFIG, "'state' must be file:PATH or kube"),
    (config(state="kube"), "ADD", ERR_INVALID_CONFIG, "'kubeconfig' is required"),
    (config(state="kube", kubeconfig="rel/kc"), "ADD", ERR_INVALID_CONFIG, "'kubeconfig' must be an absolute path"),
    (config(api_timeout_seconds=0), "ADD", ERR_INVALID_CONFIG, "'api_timeout_seconds' must be"),
    (config(state="k8s"), "ADD", ERR_INVALID_CONFIG, "must be file:PATH with an absolute PATH, or kube"),
    (config(state="file:relative.json"), "ADD", ERR_INVALID_CONFIG, "with an absolute PATH"),
    (config(state="/run/x/state.json"), "ADD", ERR_INVALID_CONFIG, "'state' must be file:PATH"),
    (config(exclude_namespaces="kube-system"), "ADD", ERR_INVALID_CONFIG, "'exclude_namespaces'"),
    (config(exclude_namespaces=["a", 5]), "ADD", ERR_INVALID_CONFIG, "'exclude_namespaces'"),
    (config(exclude_namespaces=[""]), "ADD", ERR_INVALID_CONFIG, "'exclude_namespaces'"),
    (config(agent_timeout_seconds=0), "ADD", ERR_INVALID_CONFIG, "'agent_timeout_seconds'"),
    (config(agent_timeout_seconds=-1), "ADD", ERR_INVALID_CONFIG, "'agent_timeout_seconds'"),
    (config(agent_timeout_seconds=301), "ADD", ERR_INVALID_CONFIG, "'agent_timeout_seconds'"),
    (config(agent_timeout_seconds="5"), "ADD", ERR_INVALID_CONFIG, "'agent_timeout_seconds'"),
    (config(agent_timeout_seconds=True), "ADD", ERR_INVALID_CONFIG, "'agent_timeout_seconds'"),
    (config(log_file="cni.log"), "ADD", ERR_INVALID_CONFIG, "'log_file' must be an absolute path"),
    (config(log_file=7), "ADD", ERR_INVALID_CONFIG, "'log_file' must be a path"),
    (config(prev=None), "ADD", ERR_INVALID_CONFIG, "chained plugin: no prevResult"),
    (config(prev=None), "CHECK", ERR_INVALID_CONFIG, "chained plugin: no prevResult"),
    (config(prev=[1]), "ADD", ERR_INVALID_CONFIG, "'prevResult' must be an object"),
])
def test_bad_config(data, command, code, message):
    with pytest.raises(CniError) as err:
        parse_config(data, command)
    assert err.value.code == code
    assert message in err.value.msg


def test_invalid_field_details_show_the_value():
    with pytest.raises(CniError) as err:
        parse_config(config(agent_timeout_seconds="5"), "ADD")
    assert err.value.details == 'agent_timeout_seconds="5"'


def test_del_needs_no_prev_result_and_ignores_a_broken_one():
    assert parse_config(config(prev=None), "DEL").prev_result is None
    assert parse_config(config(prev="garbage"), "DEL").prev_result is None


def test_check_in_0_4_0_is_allowed():
    assert parse_config(config(version="0.4.0", prev=PREV_040), "CHECK").cni_version == "0.4.0"


@pytest.mark.parametrize("url, path", [
    ("file:/a/b", "/a/b"), ("file:///a/b", "/a/b"), ("file://localhost/a/b", "/a/b"),
    ("file:a/b", None), ("file://host/a/b", None), ("kube", None), ("/a/b", None), ("file:", None),
])
def test_state_path_of(url, path):
    assert state_path_of(url) == path


# -- prevResult addresses -----------------------------------------------------------------

@pytest.mark.parametrize("prev, ips, gateways", [
    (PREV_100, ["198.18.0.5/24"], ["198.18.0.1"]),
    (PREV_040, ["198.18.0.7/24", "fd00:198:18::7/64"], ["198.18.0.1", "fd00:198:18::1"]),
    (PREV_031, ["198.18.0.6/24"], ["198.18.0.1"]),           # no interfaces, no index: the pod's
    ({"cniVersion": "1.0.0", "ips": [{"address": "198.18.0.8/24"}]}, ["198.18.0.8/24"], []),
    ({"cniVersion": "1.0.0"}, [], []),
    ({"cniVersion": "1.0.0", "ips": []}, [], []),
    # A host-side interface's address (no sandbox) is not the pod's.
    ({"interfaces": [{"name": "cni0"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
      "ips": [{"address": "198.18.0.1/24", "interface": 0},
              {"address": "198.18.0.9/24", "gateway": "198.18.0.1", "interface": 1}]},
     ["198.18.0.9/24"], ["198.18.0.1"]),
    # An index pointing nowhere is tolerated rather than dropping the address.
    ({"interfaces": [], "ips": [{"address": "198.18.0.10/24", "interface": 3}]}, ["198.18.0.10/24"], []),
    # The same gateway is listed once.
    ({"ips": [{"address": "198.18.0.2/24", "gateway": "198.18.0.1"},
              {"address": "198.18.0.3/24", "gateway": "198.18.0.1"}]},
     ["198.18.0.2/24", "198.18.0.3/24"], ["198.18.0.1"]),
])
def test_pod_addresses(prev, ips, gateways):
    assert pod_addresses(prev) == (ips, gateways)


@pytest.mark.parametrize("prev, field", [
    ({"ips": "198.18.0.5/24"}, "prevResult.ips"),
    ({"ips": ["198.18.0.5/24"]}, "prevResult.ips[0].address"),
    ({"ips": [{"gateway": "198.18.0.1"}]}, "prevResult.ips[0].address"),
    ({"ips": [{"address": "198.18.0.5/24"}, {"address": "198.18.0.6"}]}, "prevResult.ips[1].address"),
    ({"ips": [{"address": "198.18.0.300/24"}]}, "prevResult.ips[0].address"),
    ({"ips": [{"address": "198.18.0.5/33"}]}, "prevResult.ips[0].address"),
    ({"ips": [{"address": "fd00::5/129"}]}, "prevResult.ips[0].address"),
])
def test_malformed_prev_result_ips_are_code_7(prev, field):
    with pytest.raises(CniError) as err:
        pod_addresses(prev)
    assert err.value.code == ERR_INVALID_CONFIG and f"'{field}'" in err.value.msg


# -- output ------------------------------------------------------------------------------------

def test_add_result_is_prev_result_unchanged_in_the_configs_version():
    c = parse_config(config(prev=copy.deepcopy(PREV_100)), "ADD")
    assert add_result(c) == PREV_100
    c = parse_config(config(version="0.3.1", prev=copy.deepcopy(PREV_031)), "ADD")
    assert add_result(c) == PREV_031
    # prevResult may omit cniVersion; the printed result may not.
    bare = {k: v for k, v in PREV_100.items() if k != "cniVersion"}
    c = parse_config(config(prev=bare), "ADD")
    assert add_result(c) == {**bare, "cniVersion": "1.0.0"}
    assert "cniVersion" not in c.prev_result          # the input is not modified


def test_version_result():
    assert version_result() == {"cniVersion": "1.0.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0"]}


def test_error_json():
    err = CniError(11, "ambient node agent unreachable", "connect /x.sock: No such file or directory")
    assert err.to_json("0.4.0") == {"cniVersion": "0.4.0", "code": 11, "msg": "ambient node agent unreachable",
                                    "details": "connect /x.sock: No such file or directory"}
    assert CniError(4, "CNI_IFNAME is required").to_json() == {"cniVersion": "1.0.0", "code": 4,
                                                               "msg": "CNI_IFNAME is required"}
    assert str(err) == "ambient node agent unreachable: connect /x.sock: No such file or directory"


def test_render():
    text = render({"cniVersion": "1.0.0", "ips": []})
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == {"cniVersion": "1.0.0", "ips": []}


def test_config_module_stays_cheap_to_import():
    import subprocess
    import sys
    code = ("import sys; before = set(sys.modules); import cni.config; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).parents[2])).stdout
    loaded = set(eval(out))
    assert {"cni.config", "json"} <= loaded
    # Modules that cost milliseconds at every pod start; none is needed here.
    assert not loaded & {"dataclasses", "typing", "ipaddress", "inspect", "logging", "asyncio", "socket"}, out
    # agent.boundedjson (the bounded JSON parser) imports only json and re.
    ours = {"cni", "cni.config", "agent", "agent.boundedjson"}
    assert all(m.split(".")[0] in sys.stdlib_module_names for m in loaded - ours), out
