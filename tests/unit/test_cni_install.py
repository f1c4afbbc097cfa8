"""Chaining ambient-cni into primary CNI configs (cni.install, pure): the
shapes flannel, calico, cilium and the reference bridge plugin write."""

from __future__ import annotations

import json

import pytest

from bench.cni_fixtures import FLANNEL
from cni.config import parse_config
from cni.install import (PLUGIN_TYPE, Restore, api_server_url, decode_records, encode_records,
                         is_candidate, kubeconfig, pick_primary, plan_install, plan_uninstall,
                         plugin_entry)

ENTRY = plugin_entry("/var/run/ambient-agent/agent.sock", "kube", "/etc/cni/net.d/ambient-cni-kubeconfig")


def dumps(obj, indent=None) -> bytes:
    return json.dumps(obj, indent=indent).encode()


CALICO = dumps({"name": "k8s-pod-network", "cniVersion": "0.3.1", "plugins": [
    {"type": "calico", "log_level": "info", "datastore_type": "kubernetes", "nodename": "node1",
     "mtu": 0, "ipam": {"type": "calico-ipam"}, "policy": {"type": "k8s"},
     "kubernetes": {"kubeconfig": "/etc/cni/net.d/calico-kubeconfig"}},
    {"type": "bandwidth", "capabilities": {"bandwidth": True}},
    {"type": "portmap", "snat": True, "capabilities": {"portMappings": True}}]}, indent=2)
CILIUM_LIST = dumps({"cniVersion": "0.3.1", "name": "cilium", "plugins": [
    {"type": "cilium-cni", "enable-debug": False, "log-file": "/var/run/cilium/cilium-cni.log"}]}, indent=2)
CILIUM_CONF = dumps({"cniVersion": "0.3.1", "name": "cilium", "type": "cilium-cni",
                     "enable-debug": False}, indent=2)
BRIDGE_CONF = b'{\n  "cniVersion": "1.0.0",\n  "name": "mynet",\n  "type": "bridge",\n  "bridge": "cni0",\n' \
              b'  "isGateway": true,\n  "ipMasq": true,\n  "ipam": {"type": "host-local", "subnet": "10.22.0.0/16"}\n}\n'
GARBAGE = b'{"cniVersion": "0.3.1", "name": "cbr0", "plugins": [{"type": "flannel"'


def apply(files: dict, plan) -> dict:
    out = dict(files)
    out.update(plan.writes)
    for name in plan.removes:
        out.pop(name, None)
    return out


# -- choosing the primary config ----------------------------------------------------------

@pytest.mark.parametrize("names,primary", [
    (["10-flannel.conflist"], "10-flannel.conflist"),
    (["10-calico.conflist", "calico-kubeconfig"], "10-calico.conflist"),
    (["05-cilium.conflist", "10-flannel.conflist"], "05-cilium.conflist"),
    (["05-cilium.conf", "05-cilium.conflist"], "05-cilium.conf"),   # libcni's order too
    (["99-loopback.conf", "10-bridge.conf"], "10-bridge.conf"),
    (["ambient-cni-kubeconfig", "ambient-cni.restore", ".10-flannel.conflist.tmp-1", "10-flannel.conflist"],
     "10-flannel.conflist"),
    (["README", "calico-kubeconfig", "x.json.bak"], None),
    ([], None),
    (["Z.conf", "a.conf"], "Z.conf"),                                 # byte order: upper case first
])
def test_primary_is_the_first_config_by_name(names, primary):
    assert pick_primary(names) == primary


@pytest.mark.parametrize("name,ok", [("10-x.conf", True), ("10-x.conflist", True), ("x.json", False),
                                     (".x.conf", False), ("ambient-cni.conflist", False),
                                     ("x.conf.bak", False)])
def test_candidates(name, ok):
    assert is_candidate(name) is ok


# -- installing into each shape -----------------------------------------------------------

@pytest.mark.parametrize("name,data,target,types", [
    ("10-flannel.conflist", FLANNEL, "10-flannel.conflist", ["flannel", "portmap", PLUGIN_TYPE]),
    ("10-calico.conflist", CALICO, "10-calico.conflist", ["calico", "bandwidth", "portmap", PLUGIN_TYPE]),
    ("05-cilium.conflist", CILIUM_LIST, "05-cilium.conflist", ["cilium-cni", PLUGIN_TYPE]),
    ("05-cilium.conf", CILIUM_CONF, "05-cilium.conflist", ["cilium-cni", PLUGIN_TYPE]),
    ("10-bridge.conf", BRIDGE_CONF, "10-bridge.conflist", ["bridge", PLUGIN_TYPE]),
], ids=["flannel", "calico", "cilium-conflist", "cilium-conf", "bridge-conf"])
def test_install_chains_last_and_uninstall_restores_bytes(name, data, target, types):
    files = {name: data, "calico-kubeconfig": b"x"}
    plan = plan_install(files, ENTRY, [])
    assert plan.status == "installed" and plan.primary == name
    after = apply(files, plan)
    doc = json.loads(after[target])
    assert [p["type"] for p in doc["plugins"]] == types
    assert doc["plugins"][-1] == ENTRY
    original = json.loads(data)
    assert (doc["cniVersion"], doc["name"]) == (original["cniVersion"], original["name"])
    if name != target:
        assert name not in after                       # the .conf is replaced by the .conflist
        assert plan.removes == [name]
        wrapped = dict(original)
        del wrapped["cniVersion"], wrapped["name"]
        assert doc["plugins"][0] == wrapped
    else:
        assert doc["plugins"][:-1] == original["plugins"]

    # What the runtime hands our plugin from that list parses in kube mode.
    conf = dict(doc["plugins"][-1], cniVersion=doc["cniVersion"], name=doc["name"],
                prevResult={"cniVersion": doc["cniVersion"], "ips": []})
    parsed = parse_config(dumps(conf), "ADD")
    assert (parsed.state, parsed.kubeconfig) == ("kube", ENTRY["kubeconfig"])

    # Idempotent: a second pass changes nothing.
    again = plan_install(after, ENTRY, plan.records)
    assert again.status == "unchanged" and not again.changes

    undo = plan_uninstall(after, plan.records)
    restored = apply(after, undo)
    assert restored == files                           # byte for byte, .conf back, .conflist gone
    assert undo.records == []


def test_a_different_entry_of_ours_is_replaced_and_the_original_kept():
    first = plan_install({"10-flannel.conflist": FLANNEL}, ENTRY, [])
    files = apply({"10-flannel.conflist": FLANNEL}, first)
    changed = dict(ENTRY, agent_socket="/run/other.sock")
    plan = plan_install(files, changed, first.records)
    assert plan.status == "updated"
    files = apply(files, plan)
    plugins = json.loads(files["10-flannel.conflist"])["plugins"]
    assert [p["type"] for p in plugins] == ["flannel", "portmap", PLUGIN_TYPE]
    assert plugins[-1]["agent_socket"] == "/run/other.sock"
    assert apply(files, plan_uninstall(files, plan.records)) == {"10-flannel.conflist": FLANNEL}


def test_already_installed_without_a_record_is_left_unchanged_and_uninstall_strips_it():
    installed = dumps({"name": "cbr0", "cniVersion": "0.3.1",
                       "plugins": [{"type": "flannel"}, {"type": "portmap"}, ENTRY]})
    plan = plan_install({"10-flannel.conflist": installed}, ENTRY, [])
    assert plan.status == "unchanged" and not plan.changes
    undo = plan_uninstall({"10-flannel.conflist": installed}, [])
    plugins = json.loads(undo.writes["10-flannel.conflist"])["plugins"]
    assert [p["type"] for p in plugins] == ["flannel", "portmap"]


def test_our_entry_not_last_is_moved_last():
    mixed = dumps({"name": "n", "cniVersion": "1.0.0", "plugins": [{"type": "bridge"}, ENTRY, {"type": "portmap"}]})
    plan = plan_install({"10-x.conflist": mixed}, ENTRY, [])
    assert plan.status == "updated"
    types = [p["type"] for p in json.loads(plan.writes["10-x.conflist"])["plugins"]]
    assert types == ["bridge", "portmap", PLUGIN_TYPE]


def test_a_rewrite_by_the_primary_cni_is_chained_again_and_becomes_the_new_original():
    files = {"10-flannel.conflist": FLANNEL}
    first = plan_install(files, ENTRY, [])
    rewritten = FLANNEL.replace(b'"hairpinMode": true', b'"hairpinMode": false')
    assert rewritten != FLANNEL
    plan = plan_install({"10-flannel.conflist": rewritten}, ENTRY, first.records)
    assert plan.status == "installed"
    files = apply({"10-flannel.conflist": rewritten}, plan)
    assert len(plan.records) == 1 and plan.records[0].original == rewritten
    assert apply(files, plan_uninstall(files, plan.records)) == {"10-flannel.conflist": rewritten}


def test_cilium_rewriting_its_conf_after_the_wrap_is_wrapped_again():
    files = {"05-cilium.conf": CILIUM_CONF}
    first = plan_install(files, ENTRY, [])
    files = apply(files, first)
    newer = CILIUM_CONF.replace(b'"enable-debug": false', b'"enable-debug": true')
    files["05-cilium.conf"] = newer                 # cilium-agent restarted and wrote it again
    plan = plan_install(files, ENTRY, first.records)
    assert plan.status == "installed" and plan.primary == "05-cilium.conf"
    files = apply(files, plan)
    assert set(files) == {"05-cilium.conflist"}
    assert json.loads(files["05-cilium.conflist"])["plugins"][0]["enable-debug"] is True
    assert apply(files, plan_uninstall(files, plan.records)) == {"05-cilium.conf": newer}


def test_uninstall_keeps_a_conf_the_primary_rewrote_meanwhile():
    files = {"05-cilium.conf": CILIUM_CONF}
    first = plan_install(files, ENTRY, [])
    files = apply(files, first)
    files["05-cilium.conf"] = b'{"cniVersion": "0.3.1", "name": "cilium", "type": "cilium-cni"}'
    restored = apply(files, plan_uninstall(files, first.records))
    assert restored == {"05-cilium.conf": b'{"cniVersion": "0.3.1", "name": "cilium", "type": "cilium-cni"}'}


def test_uninstall_after_a_foreign_edit_removes_only_our_entry():
    files = {"10-calico.conflist": CALICO}
    first = plan_install(files, ENTRY, [])
    files = apply(files, first)
    edited = json.loads(files["10-calico.conflist"])
    edited["plugins"][0]["mtu"] = 1400
    files["10-calico.conflist"] = dumps(edited)
    undo = plan_uninstall(files, first.records)
    plugins = json.loads(apply(files, undo)["10-calico.conflist"])["plugins"]
    assert [p["type"] for p in plugins] == ["calico", "bandwidth", "portmap"]
    assert plugins[0]["mtu"] == 1400


@pytest.mark.parametrize("data,why", [
    (GARBAGE, "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[1, 2]", "not an object"),
    (dumps({"cniVersion": "0.2.0", "name": "n", "plugins": [{"type": "bridge"}]}), "cniVersion '0.2.0'"),
    (dumps({"name": "n", "plugins": [{"type": "bridge"}]}), "cniVersion None"),
    (dumps({"cniVersion": "1.0.0", "plugins": [{"type": "bridge"}]}), "no network 'name'"),
    (dumps({"cniVersion": "1.0.0", "name": "n", "plugins": []}), "non-empty list"),
    (dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [{"bridge": 1}]}), "plugins[0] has no string 'type'"),
    (dumps({"cniVersion": "1.0.0", "name": "n", "plugins": [ENTRY]}), "lists only ambient-cni"),
])
def test_an_unusable_primary_is_left_alone_with_the_reason(data, why):
    plan = plan_install({"10-flannel.conflist": data}, ENTRY, [])
    assert plan.status == "refused" and not plan.changes
    assert why in plan.message and "10-flannel.conflist" in plan.message


@pytest.mark.parametrize("data,why", [
    (dumps({"cniVersion": "1.0.0", "name": "n"}), "no plugin 'type'"),
    (dumps({"cniVersion": "1.0.0", "name": "n", "type": PLUGIN_TYPE}), "not a primary one"),
])
def test_an_unusable_conf_is_left_alone(data, why):
    plan = plan_install({"10-x.conf": data}, ENTRY, [])
    assert plan.status == "refused" and why in plan.message and not plan.changes


def test_wrapping_never_overwrites_a_foreign_conflist():
    files = {"10-x.conf": BRIDGE_CONF, "10-x.conflist": FLANNEL}
    plan = plan_install(files, ENTRY, [])
    assert plan.status == "refused" and "10-x.conflist" in plan.message and not plan.changes


def test_an_empty_directory_waits():
    plan = plan_install({}, ENTRY, [])
    assert plan.status == "waiting" and not plan.changes


def test_uninstall_with_nothing_installed_is_clean():
    assert plan_uninstall({"10-flannel.conflist": FLANNEL}, []).status == "clean"


def test_uninstall_when_the_file_vanished_only_forgets_the_record():
    first = plan_install({"10-flannel.conflist": FLANNEL}, ENTRY, [])
    undo = plan_uninstall({}, first.records)
    assert not undo.writes and not undo.removes and undo.records == []


# -- records and kubeconfig ---------------------------------------------------------------

def test_records_round_trip_exact_bytes():
    records = [Restore("05-cilium.conf", b"\x00\xffodd bytes\n", "05-cilium.conflist", b"{}\n"),
               Restore("10-f.conflist", FLANNEL, "10-f.conflist", CALICO)]
    assert decode_records(encode_records(records)) == records


@pytest.mark.parametrize("data", [b"", b"{", b'{"records": [{"original_name": "../x"}]}',
                                  b'{"records": [{"original_name": "a", "original": "!!", '
                                  b'"written_name": "a", "written": ""}]}'])
def test_damaged_records_are_reported(data):
    with pytest.raises(ValueError, match="restore record is damaged"):
        decode_records(data)


@pytest.mark.parametrize("host,port,url", [("10.96.0.1", "443", "https://10.96.0.1:443"),
                                           ("fd00::1", "443", "https://[fd00::1]:443")])
def test_api_server_url(host, port, url):
    assert api_server_url(host, port) == url


def test_api_server_url_needs_the_service_env():
    with pytest.raises(ValueError, match="--kube-server"):
        api_server_url("", "")


def test_kubeconfig_embeds_token_and_ca():
    kc = kubeconfig("https://10.96.0.1:443", b"-----BEGIN CERTIFICATE-----\n", "tok")
    assert kc["current-context"] == "ambient-cni"
    assert kc["users"][0]["user"]["token"] == "tok"
    assert kc["clusters"][0]["cluster"]["server"] == "https://10.96.0.1:443"
