"""The kube source watches ServiceEntry and WorkloadEntry (networking.istio.io)
with the same rules as the other Istio kinds: v1, else v1beta1, else v1alpha3;
CRDs absent is "none"; a refusal (RBAC) keeps the source unsynced."""

import pytest

from agent.state import serviceentry
from agent.state.model import StateError
from lab.kubeapi import objects
from tests.kubeapi.test_kube_source import source_for, wait_for  # noqa: F401  (fixture)


def populate(api, version="v1"):
    api.create(objects.namespace("shop", {"istio.io/dataplane-mode": "ambient"}))
    api.create(objects.service_entry("ext", "shop", ["api.example.com"], version=version,
                                     workloadSelector={"labels": {"app": "vm"}}))
    api.create(objects.workload_entry("vm", "shop", "198.18.9.1", version=version,
                                      labels={"app": "vm"}, serviceAccount="vm"))


def test_entries_are_listed_and_watched(kubeapi, source_for):
    populate(kubeapi)
    src = source_for()
    state = src.load()
    assert set(state.service_entry_views) == {("shop", "ext")}
    assert state.workload_entry_views[("shop", "vm")].service_account == "vm"
    assert serviceentry.resolve_host(state, "api.example.com")[0].startswith("240.240.")
    kinds = src.sync_status()["kinds"]
    assert kinds["serviceentries"]["served_version"] == "v1" and kinds["workloadentries"]["synced"]
    # A malformed entry arriving by watch is ignored with a reason; the rest stands.
    kubeapi.create(objects.service_entry("bad", "shop", ["not a host"]))
    wait_for(lambda: any("ServiceEntry shop/bad" in e for e in src.load().errors), what="the bad entry")
    assert set(src.load().service_entry_views) == {("shop", "ext")}


def test_v1alpha3_only_is_used(kubeapi, source_for):
    kubeapi.set_networking_versions({"v1alpha3"})
    populate(kubeapi, version="v1alpha3")
    src = source_for()
    assert ("shop", "ext") in src.load().service_entry_views
    assert src.sync_status()["kinds"]["serviceentries"]["served_version"] == "v1alpha3"


def test_absent_crds_are_no_entries_and_found_later(kubeapi, source_for):
    kubeapi.set_networking_versions(())
    src = source_for()
    assert src.load().service_entry_views == {} and src.synced
    assert src.sync_status()["kinds"]["workloadentries"]["absent"]
    kubeapi.set_networking_versions({"v1", "v1beta1", "v1alpha3"})
    populate(kubeapi)
    wait_for(lambda: src.load().service_entry_views, what="the CRD to be found")


@pytest.mark.parametrize("path", ["/apis/networking.istio.io/v1/serviceentries",
                                  "/apis/networking.istio.io/v1/workloadentries"])
def test_forbidden_entries_keep_the_source_unsynced(kubeapi, source_for, path):
    populate(kubeapi)
    kubeapi.refused[path] = 403
    src = source_for(sync_timeout=0.5)
    with pytest.raises(StateError, match="HTTP 403"):
        src.load()
    assert not src.synced
