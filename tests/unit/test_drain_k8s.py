"""The NodeDrain's k8s layer without an API server: snapshots built from the caches, and the
writes of a decision, against an in-memory stand-in for the client."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from virtshift.domain.drain import ATTEMPTS_ANNOTATION, NewMigration, plan_drain
from virtshift.k8s import rest, views
from virtshift.k8s.actions import Actions, MigrationNameTaken
from virtshift.k8s.cluster import Cluster, NotSynced
from virtshift.k8s.rest import ApiError

JSON = dict[str, Any]


class FakeKube:
    """Objects by (plural, namespace, name); records every call in order."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str | None, str], JSON] = {}
        self.calls: list[tuple[str, str, str]] = []
        self.rv = 100

    def _key(self, res: rest.Resource, name: str, namespace: str | None) -> tuple:
        return res.plural, namespace if res.namespaced else None, name

    def add(self, res: rest.Resource, obj: JSON) -> JSON:
        self.rv += 1
        obj = copy.deepcopy(obj)
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.objects[self._key(res, obj["metadata"]["name"],
                               obj["metadata"].get("namespace"))] = obj
        return obj

    def get(self, res: rest.Resource, name: str, namespace: str | None = None) -> JSON | None:
        self.calls.append(("get", res.plural, name))
        obj = self.objects.get(self._key(res, name, namespace))
        return copy.deepcopy(obj) if obj else None

    def create(self, res: rest.Resource, body: JSON, namespace: str | None = None,
               **_: Any) -> JSON:
        self.calls.append(("create", res.plural, body["metadata"].get("name", "")))
        key = self._key(res, body["metadata"]["name"], body["metadata"].get("namespace"))
        if key in self.objects:
            raise ApiError(409, json.dumps({"reason": "AlreadyExists", "message": "exists"}))
        return self.add(res, body)

    def patch(self, res: rest.Resource, name: str, patch: JSON, namespace: str | None = None,
              **_: Any) -> JSON:
        self.calls.append(("patch", res.plural, name))
        obj = self.objects[self._key(res, name, namespace)]
        for section in ("labels", "annotations"):
            values = (patch.get("metadata") or {}).get(section) or {}
            current = obj["metadata"].setdefault(section, {})
            for k, v in values.items():
                if v is None:
                    current.pop(k, None)
                else:
                    current[k] = v
        return self.add(res, obj)


def node(name: str, **labels: str) -> JSON:
    return {"metadata": {"name": name, "labels": {"kubevirt.io/schedulable": "true", **labels}},
            "status": {"allocatable": {"cpu": "64", "memory": "512Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def vmi(name: str, node_name: str, migratable: bool = True, **labels: str) -> JSON:
    live = {"type": "LiveMigratable", "status": "True" if migratable else "False"}
    if not migratable:
        live |= {"reason": "HostDeviceNotLiveMigratable", "message": "has a GPU"}
    return {"metadata": {"name": name, "namespace": "ns", "labels": labels},
            "spec": {"domain": {"memory": {"guest": "2Gi"}}},
            "status": {"phase": "Running", "nodeName": node_name, "conditions": [live]}}


def policy(name: str, **spec: Any) -> JSON:
    return {"metadata": {"name": name}, "spec": spec}


def drain(name: str = "d", uid: str = "uid-1", **spec: Any) -> JSON:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
            "metadata": {"name": name, "uid": uid, "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n1", **spec}}


def cluster(*objects: tuple[rest.Resource, JSON], synced: bool = True) -> Cluster:
    kube = FakeKube()
    c = Cluster(kube)  # type: ignore[arg-type]
    caches = {rest.NODES: c.nodes, rest.VMIS: c.vmis, rest.VMS: c.vms, rest.VMIMS: c.vmims,
              rest.POLICIES: c.policies, rest.NODE_DRAINS: c.drains,
              rest.NAMESPACES: c.namespaces}
    c.namespaces.put({"metadata": {"name": "ns", "resourceVersion": "1"}})
    for res, obj in objects:
        caches[res].put(kube.add(res, obj))
    if synced:
        for inf in c._all:
            inf._synced.set()
    return c


def test_nothing_is_decided_before_the_caches_have_synced() -> None:
    """Issue 9: with the VMI cache still loading, n1 looked empty and the drain Drained."""
    c = cluster((rest.NODES, node("n1")), (rest.NODES, node("n2")),
                (rest.VMIS, vmi("a", "n1")), synced=False)
    for inf in c._all:
        if inf is not c.vmis:
            inf._synced.set()
    c.vmis.forget("ns/a")  # not listed yet
    with pytest.raises(NotSynced, match="virtualmachineinstances"):
        c.snapshot(drain())
    assert not c.synced() and c.unsynced() == ["virtualmachineinstances"]
    c.vmis.put(vmi("a", "n1") | {"metadata": {"name": "a", "namespace": "ns",
                                              "resourceVersion": "5"}})
    c.vmis._synced.set()
    assert plan_drain(c.snapshot(drain())).status.phase == "Draining"


def _migration(uid: str = "uid-1") -> NewMigration:
    return NewMigration(namespace="ns", name="vs-d-a-1-abcdef", vmi="a", attempt=1, source="n1",
                        policy="p", selector={})


def test_a_409_for_a_migration_that_is_not_this_drains_is_surfaced() -> None:
    """Issue 9: a leftover of an earlier NodeDrain of the same name is not ours."""
    c = cluster((rest.VMIS, vmi("a", "n1")))
    kube: FakeKube = c.kube  # type: ignore[assignment]
    leftover = {"metadata": {"name": "vs-d-a-1-abcdef", "namespace": "ns", "annotations": {
        views.DRAIN_UID_ANNOTATION: "uid-0"}}, "spec": {"vmiName": "a"}}
    kube.add(rest.VMIMS, leftover)
    with pytest.raises(MigrationNameTaken, match="uid-0"):
        Actions(c).create_migration(_migration(), drain())
    assert c.vmims.get("ns/vs-d-a-1-abcdef") is None  # never taken for ours


def test_a_409_for_our_own_migration_is_success() -> None:
    c = cluster((rest.VMIS, vmi("a", "n1")))
    kube: FakeKube = c.kube  # type: ignore[assignment]
    ours = {"metadata": {"name": "vs-d-a-1-abcdef", "namespace": "ns", "annotations": {
        views.DRAIN_UID_ANNOTATION: "uid-1"}}, "spec": {"vmiName": "a"}}
    kube.add(rest.VMIMS, ours)
    Actions(c).create_migration(_migration(), drain())
    assert c.vmims.get("ns/vs-d-a-1-abcdef") is not None


def test_the_vmim_exists_before_the_vmi_is_labelled_and_counted() -> None:
    """Issue 9: labelled first, a MigrationPolicy reconcile in between saw a label no
    migration pins yet and reverted it. The attempt count goes on the VMI too."""
    c = cluster((rest.VMIS, vmi("a", "n1")))
    kube: FakeKube = c.kube  # type: ignore[assignment]
    Actions(c).create_migration(_migration(), drain())
    writes = [(verb, plural) for verb, plural, _n in kube.calls if verb != "get"]
    assert writes == [("create", "virtualmachineinstancemigrations"),
                      ("patch", "virtualmachineinstances")]
    meta = c.vmis.get("ns/a")["metadata"]
    assert meta["labels"][views.POLICY_LABEL] == "p"
    assert meta["annotations"][ATTEMPTS_ANNOTATION] == "uid-1=1"


def test_recorded_attempts_reach_the_snapshot_for_this_incarnation_only() -> None:
    counted = vmi("a", "n1")
    counted["metadata"]["annotations"] = {ATTEMPTS_ANNOTATION: "uid-1=4"}
    c = cluster((rest.NODES, node("n1")), (rest.NODES, node("n2")), (rest.VMIS, counted))
    assert c.snapshot(drain()).attempts == {"ns/a": 4}
    assert c.snapshot(drain(uid="uid-2")).attempts == {}


def test_policy_ref_overrides_the_policies_own_selection() -> None:
    matching = policy("matching", priority=100, vmSelector={"matchLabels": {"app": "db"}})
    referenced = policy("referenced", vmSelector={"matchLabels": {"app": "none"}})
    c = cluster((rest.NODES, node("n1")), (rest.NODES, node("n2")),
                (rest.VMIS, vmi("a", "n1", app="db")), (rest.POLICIES, matching),
                (rest.POLICIES, referenced))
    assert c.snapshot(drain()).rules_for("ns/a").policy == "matching"
    s = c.snapshot(drain(policyRef={"name": "referenced"}))
    assert s.rules_for("ns/a").policy == "referenced"
    assert [m.policy for m in plan_drain(s).create] == ["referenced"]


def test_the_drains_non_migratable_overrides_the_policys() -> None:
    failing = policy("strict", nonMigratable="Fail")
    c = cluster((rest.NODES, node("n1")), (rest.NODES, node("n2")),
                (rest.VMIS, vmi("gpu", "n1", migratable=False)), (rest.POLICIES, failing))
    assert plan_drain(c.snapshot(drain())).status.vms[0].phase == "Failed"
    s = c.snapshot(drain(nonMigratable="Skip"))
    assert s.rules_for("ns/gpu").non_migratable == "Skip"
    d = plan_drain(s)
    assert (d.status.vms[0].phase, d.status.phase) == ("Skipped", "Drained")
