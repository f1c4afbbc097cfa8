"""lab.cnichain: what a runtime hands each CNI plugin, and what it makes of the answer."""

import copy
import json

import pytest

from lab import cnichain
from lab.cnichain import CNIError, Sandbox

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "ambient-lab",
    "plugins": [
        {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"}},
        {"type": "ambient-cni", "agent_socket": "/x/agent.sock"},
        {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False}},
    ],
}

BRIDGE_RESULT = {
    "cniVersion": "1.0.0",
    "interfaces": [
        {"name": "cni0", "mac": "aa:aa:aa:aa:aa:01"},
        {"name": "veth1234", "mac": "aa:aa:aa:aa:aa:02"},
        {"name": "eth0", "mac": "aa:aa:aa:aa:aa:03", "sandbox": "/run/netns/p1"},
    ],
    "ips": [
        {"interface": 2, "address": "198.18.1.5/24", "gateway": "198.18.1.1"},
        {"interface": 0, "address": "198.18.1.1/24"},
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
}

SANDBOX = Sandbox(container_id="c0ffee", netns="/run/netns/alab-t-p1", namespace="apps",
                  name="web-0", uid="1234-abcd")


@pytest.mark.parametrize("index, prev, runtime, expect", [
    # The first plugin of an ADD has no prevResult at all.
    (0, None, None, {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local"},
                     "cniVersion": "1.0.0", "name": "ambient-lab"}),
    # Later plugins get the previous result.
    (1, BRIDGE_RESULT, None, {"type": "ambient-cni", "agent_socket": "/x/agent.sock",
                              "cniVersion": "1.0.0", "name": "ambient-lab",
                              "prevResult": BRIDGE_RESULT}),
    # runtimeConfig carries only capabilities the plugin declared as true.
    (2, BRIDGE_RESULT, {"portMappings": [{"hostPort": 80}], "bandwidth": {"x": 1}, "other": 1},
     {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False},
      "cniVersion": "1.0.0", "name": "ambient-lab", "prevResult": BRIDGE_RESULT,
      "runtimeConfig": {"portMappings": [{"hostPort": 80}]}}),
    # No matching runtime values: no runtimeConfig key.
    (2, None, {"other": 1}, {"type": "portmap", "capabilities": {"portMappings": True, "bandwidth": False},
                             "cniVersion": "1.0.0", "name": "ambient-lab"}),
])
def test_plugin_config_injection(index, prev, runtime, expect):
    before = copy.deepcopy(CONFLIST)
    assert cnichain.plugin_config(CONFLIST, index, prev, runtime) == expect
    assert CONFLIST == before   # the conflist itself is never modified


def test_list_version_and_name_win_over_the_entry():
    conflist = {"cniVersion": "1.0.0", "name": "net",
                "plugins": [{"type": "x", "cniVersion": "0.3.1", "name": "other",
                             "prevResult": {"stale": True}}]}
    conf = cnichain.plugin_config(conflist, 0, None)
    assert (conf["cniVersion"], conf["name"]) == ("1.0.0", "net")
    assert "prevResult" not in conf


def test_prev_result_is_a_copy():
    prev = copy.deepcopy(BRIDGE_RESULT)
    conf = cnichain.plugin_config(CONFLIST, 1, prev)
    conf["prevResult"]["ips"].clear()
    assert prev == BRIDGE_RESULT


@pytest.mark.parametrize("prev", [BRIDGE_RESULT, None])
def test_del_runs_in_reverse_and_every_plugin_gets_the_final_result(prev):
    steps = cnichain.del_configs(CONFLIST, prev)
    assert [t for t, _ in steps] == ["portmap", "ambient-cni", "bridge"]
    for _, conf in steps:
        assert conf.get("prevResult") == prev
        assert conf["cniVersion"] == "1.0.0" and conf["name"] == "ambient-lab"


@pytest.mark.parametrize("args, expect", [
    (("apps", "web-0", "c0ffee", "1234-abcd"),
     "IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web-0;"
     "K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1234-abcd"),
    (("kube-system", "a.b", "0" * 64, "u"),
     "IgnoreUnknown=1;K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=a.b;"
     f"K8S_POD_INFRA_CONTAINER_ID={'0' * 64};K8S_POD_UID=u"),
])
def test_cni_args(args, expect):
    assert cnichain.cni_args(*args) == expect


@pytest.mark.parametrize("bad", ["a;b", "a=b"])
def test_cni_args_refuses_separators(bad):
    with pytest.raises(ValueError):
        cnichain.cni_args("ns", bad, "c", "u")


def test_plugin_env_sets_the_six_variables_and_drops_stale_ones():
    env = cnichain.plugin_env("ADD", SANDBOX, "/lab/cni/bin",
                              {"PATH": "/usr/bin", "CNI_COMMAND": "DEL", "CNI_ARGS": "stale"})
    assert env == {
        "PATH": "/usr/bin",
        "CNI_COMMAND": "ADD",
        "CNI_CONTAINERID": "c0ffee",
        "CNI_NETNS": "/run/netns/alab-t-p1",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": "/lab/cni/bin",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=apps;K8S_POD_NAME=web-0;"
                    "K8S_POD_INFRA_CONTAINER_ID=c0ffee;K8S_POD_UID=1234-abcd",
    }


def _j(obj) -> bytes:
    return json.dumps(obj).encode()


ERROR_11 = {"cniVersion": "1.0.0", "code": 11, "msg": "agent not ready", "details": "dial: refused"}


@pytest.mark.parametrize("command, rc, out, err, expect", [
    ("ADD", 0, _j(BRIDGE_RESULT), b"", BRIDGE_RESULT),
    ("ADD", 0, b"  " + _j(BRIDGE_RESULT) + b"\n", b"noise", BRIDGE_RESULT),
    ("DEL", 0, b"", b"", None),
    ("DEL", 0, b"\n", b"", None),
    ("CHECK", 0, b"", b"", None),
])
def test_parse_success(command, rc, out, err, expect):
    assert cnichain.parse_output("p", command, rc, out, err) == expect


@pytest.mark.parametrize("command, rc, out, err, code, msg, details", [
    # The spec's way: error object on stdout, non-zero exit.
    ("ADD", 1, _j(ERROR_11), b"", 11, "agent not ready", "dial: refused"),
    # An error object is an error even with exit status 0.
    ("ADD", 0, _j(ERROR_11), b"", 11, "agent not ready", "dial: refused"),
    # No details in the object: stderr stands in.
    ("DEL", 1, _j({"code": 7, "msg": "bad config"}), b"line 3: oops", 7, "bad config", "line 3: oops"),
    # A crash without an error object.
    ("ADD", 2, b"", b"panic: nil map", cnichain.CODE_EXEC_FAILED, "plugin exited with status 2",
     "panic: nil map"),
    ("ADD", -9, b"", b"", cnichain.CODE_EXEC_FAILED, "plugin exited with status -9", ""),
    # Garbage on success, or nothing at all for ADD.
    ("ADD", 0, b"not json", b"", cnichain.CODE_DECODE_FAILURE, "plugin printed invalid JSON", "not json"),
    ("ADD", 0, b"", b"", cnichain.CODE_DECODE_FAILURE, "ADD printed no result object", ""),
    ("ADD", 0, b"[1, 2]", b"", cnichain.CODE_DECODE_FAILURE, "ADD printed no result object", "[1, 2]"),
    # A code that is not a number.
    ("ADD", 1, _j({"code": "eleven", "msg": "m"}), b"", cnichain.CODE_EXEC_FAILED, "m", ""),
])
def test_parse_errors(command, rc, out, err, code, msg, details):
    with pytest.raises(CNIError) as info:
        cnichain.parse_output("ambient-cni", command, rc, out, err)
    e = info.value
    assert (e.code, e.msg, e.details, e.plugin, e.command) == (code, msg, details, "ambient-cni", command)
    assert str(code) in str(e) and "ambient-cni" in str(e)
    assert e.to_dict()["code"] == code


@pytest.mark.parametrize("result, ips, gateways", [
    (BRIDGE_RESULT, ["198.18.1.5/24"], ["198.18.1.1"]),
    ({"ips": [{"address": "198.18.2.2/24", "gateway": "198.18.2.1"}]}, ["198.18.2.2/24"], ["198.18.2.1"]),
    ({"interfaces": [{"name": "eth0", "sandbox": "/n"}],
      "ips": [{"interface": 0, "address": "198.18.2.2/24", "gateway": "198.18.2.1"},
              {"interface": 0, "address": "fd00:198:18::2/64", "gateway": "fd00:198:18::1"}]},
     ["198.18.2.2/24", "fd00:198:18::2/64"], ["198.18.2.1", "fd00:198:18::1"]),
    ({}, [], []),
    (None, [], []),
])
def test_sandbox_addresses(result, ips, gateways):
    assert cnichain.sandbox_ips(result) == ips
    assert cnichain.sandbox_gateways(result) == gateways
    assert cnichain.strip_prefix(ips) == [ip.split("/")[0] for ip in ips]


@pytest.mark.parametrize("conflist, problem", [
    ([], "JSON object"),
    ({"name": "n", "plugins": [{"type": "x"}]}, "cniVersion"),
    ({"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "name"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": []}, "plugins"),
    ({"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": "cni0"}]}, "type"),
])
def test_validate_conflist(conflist, problem):
    with pytest.raises(ValueError, match=problem):
        cnichain.validate_conflist(conflist)


def test_loopback_network_is_valid():
    assert cnichain.validate_conflist(cnichain.LOOPBACK_CONFLIST)["plugins"] == [{"type": "loopback"}]


DUAL_STACK = {
    "cniVersion": "1.0.0", "name": "ambient-lab",
    "plugins": [
        {"type": "bridge", "bridge": "cni0",
         "ipam": {"type": "host-local", "dataDir": "/d",
                  "ranges": [[{"subnet": "198.18.1.0/24"}], [{"subnet": "fd00:198:18:1::/64"}]],
                  "routes": [{"dst": "0.0.0.0/0"}, {"dst": "::/0"}]}},
        {"type": "ambient-cni", "agent_socket": "/x/agent.sock"},
    ],
}


@pytest.mark.parametrize("families, ranges, routes", [
    (["IPv6"], [[{"subnet": "fd00:198:18:1::/64"}]], [{"dst": "::/0"}]),
    (["IPv4"], [[{"subnet": "198.18.1.0/24"}]], [{"dst": "0.0.0.0/0"}]),
    (["IPv4", "IPv6"], DUAL_STACK["plugins"][0]["ipam"]["ranges"], DUAL_STACK["plugins"][0]["ipam"]["routes"]),
])
def test_restrict_families_keeps_only_the_ranges_and_routes_of_those_families(families, ranges, routes):
    before = copy.deepcopy(DUAL_STACK)
    out = cnichain.restrict_families(DUAL_STACK, families)
    assert out["plugins"][0]["ipam"] == {"type": "host-local", "dataDir": "/d", "ranges": ranges, "routes": routes}
    assert out["plugins"][1:] == DUAL_STACK["plugins"][1:]      # the rest of the chain as it was
    assert before == DUAL_STACK                                  # a copy: the node's conflist is untouched


def test_restrict_families_refuses_to_leave_no_range():
    ipv4_only = copy.deepcopy(DUAL_STACK)
    ipv4_only["plugins"][0]["ipam"]["ranges"] = [[{"subnet": "198.18.1.0/24"}]]
    with pytest.raises(ValueError, match="no range of IPv6"):
        cnichain.restrict_families(ipv4_only, ["IPv6"])
    # A plugin without host-local IPAM is left alone.
    other = {"cniVersion": "1.0.0", "name": "n", "plugins": [{"type": "x", "ipam": {"type": "dhcp"}}]}
    assert cnichain.restrict_families(other, ["IPv6"]) == other
