"""The NodeDrain's k8s layer against the real API server (KubeVirt's CRDs installed, no
simulator): snapshots built from the watch caches, and the writes of a decision."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import wait_for

from virtshift.domain.drain import ATTEMPTS_ANNOTATION, NewMigration, plan_drain
from virtshift.k8s import rest, views
from virtshift.k8s.actions import Actions, MigrationNameTaken
from virtshift.k8s.cluster import Cluster, NotSynced

JSON = dict[str, Any]


@pytest.fixture
def env(cluster, unique) -> Iterator[dict[str, Any]]:
    """A namespace and two nodes of this test's own, and an operator-side Cluster (not yet
    started: some tests look at it before its caches sync)."""
    kube = cluster.kube
    ns, n1, n2 = f"k8s-{unique}", f"n1-{unique}", f"n2-{unique}"
    kube.create(rest.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                  "metadata": {"name": ns}})
    for name in (n1, n2):
        kube.create(rest.NODES, {"apiVersion": "v1", "kind": "Node", "metadata": {
            "name": name, "labels": {"kubevirt.io/schedulable": "true",
                                     "kubernetes.io/hostname": name}}})
        kube.patch(rest.NODES, name, {"status": {
            "allocatable": {"cpu": "64", "memory": "512Gi"},
            "conditions": [{"type": "Ready", "status": "True"}]}}, subresource="status")
        taints = [t for t in (kube.get(rest.NODES, name).get("spec") or {}).get("taints") or []
                  if t["key"] != "node.kubernetes.io/not-ready"]
        kube.patch(rest.NODES, name, {"spec": {"taints": taints or None}})
    c = Cluster(kube)
    yield {"kube": kube, "ns": ns, "n1": n1, "n2": n2, "cluster": c, "unique": unique}
    c.stop()
    for name in (n1, n2):
        kube.delete(rest.NODES, name)


def add_vmi(env: dict[str, Any], name: str, node: str, migratable: bool = True,
            annotations: dict[str, str] | None = None, **labels: str) -> JSON:
    live: JSON = {"type": "LiveMigratable", "status": "True" if migratable else "False"}
    if not migratable:
        live |= {"reason": "HostDeviceNotLiveMigratable", "message": "has a GPU"}
    env["kube"].create(rest.VMIS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": env["ns"], "labels": labels,
                     "annotations": annotations or {}},
        "spec": {"domain": {"devices": {}, "memory": {"guest": "2Gi"}}}})
    # The VMI has no status subresource (KubeVirt's CRD): status goes with the object.
    return env["kube"].patch(rest.VMIS, name, {"status": {
        "phase": "Running", "nodeName": node, "conditions": [live]}}, env["ns"])


def add_policy(env: dict[str, Any], name: str, **spec: Any) -> str:
    full = f"{name}-{env['unique']}"
    env["kube"].create(rest.POLICIES, {"apiVersion": "virtshift.io/v1alpha1",
                                       "kind": "MigrationPolicy", "metadata": {"name": full},
                                       "spec": spec})
    return full


def drain(env: dict[str, Any], uid: str = "uid-1", **spec: Any) -> JSON:
    return {"apiVersion": "virtshift.io/v1alpha1", "kind": "NodeDrain",
            "metadata": {"name": f"d-{env['unique']}", "uid": uid, "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": env["n1"], **spec}}


def started(env: dict[str, Any]) -> Cluster:
    c: Cluster = env["cluster"]
    c.start()
    return c


def migration(env: dict[str, Any], vmi: str = "a") -> NewMigration:
    return NewMigration(namespace=env["ns"], name=f"vs-d-{vmi}-1-abcdef", vmi=vmi, attempt=1,
                        source=env["n1"], policy="p", selector={})


def test_nothing_is_decided_before_the_caches_have_synced(env) -> None:
    """Issue 9: with the VMI cache still loading, n1 looked empty and the drain Drained."""
    add_vmi(env, "a", env["n1"])
    c: Cluster = env["cluster"]
    with pytest.raises(NotSynced, match="virtualmachineinstances"):
        c.snapshot(drain(env))
    assert not c.synced()
    started(env)
    wait_for(lambda: c.vmis.get(f"{env['ns']}/a"), timeout=10)
    assert plan_drain(c.snapshot(drain(env))).status.phase == "Draining"


def test_a_409_for_a_migration_that_is_not_this_drains_is_surfaced(env) -> None:
    """Issue 9: a leftover of an earlier NodeDrain of the same name is not ours."""
    add_vmi(env, "a", env["n1"])
    c = started(env)
    name = migration(env).name
    env["kube"].create(rest.VMIMS, {
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name, "namespace": env["ns"],
                     "annotations": {views.DRAIN_UID_ANNOTATION: "uid-0"}},
        "spec": {"vmiName": "a"}})
    with pytest.raises(MigrationNameTaken, match="uid-0"):
        Actions(c).create_migration(migration(env), drain(env))
    labels = env["kube"].get(rest.VMIS, "a", env["ns"])["metadata"].get("labels") or {}
    assert views.POLICY_LABEL not in labels  # never taken for ours


def test_a_409_for_our_own_migration_is_success(env) -> None:
    add_vmi(env, "a", env["n1"])
    c = started(env)
    Actions(c).create_migration(migration(env), drain(env))
    Actions(c).create_migration(migration(env), drain(env))  # made before a restart
    assert len(env["kube"].items(rest.VMIMS, env["ns"])) == 1


def test_the_vmim_exists_before_the_vmi_is_labelled_and_counted(env) -> None:
    """Issue 9: labelled first, a MigrationPolicy reconcile in between saw a label no
    migration pins yet and reverted it. The attempt count goes on the VMI too (it outlives the
    VMIMs KubeVirt collects)."""
    add_vmi(env, "a", env["n1"])
    c = started(env)
    Actions(c).create_migration(migration(env), drain(env))
    vmim = env["kube"].get(rest.VMIMS, migration(env).name, env["ns"])
    vmi = env["kube"].get(rest.VMIS, "a", env["ns"])
    # etcd revisions are one sequence across resources: the VMIM was written first.
    assert int(vmim["metadata"]["resourceVersion"]) < int(vmi["metadata"]["resourceVersion"])
    assert vmi["metadata"]["labels"][views.POLICY_LABEL] == "p"
    assert vmi["metadata"]["annotations"][ATTEMPTS_ANNOTATION] == "uid-1=1"


def test_recorded_attempts_reach_the_snapshot_for_this_incarnation_only(env) -> None:
    add_vmi(env, "a", env["n1"], annotations={ATTEMPTS_ANNOTATION: "uid-1=4"})
    c = started(env)
    key = f"{env['ns']}/a"
    assert c.snapshot(drain(env)).attempts == {key: 4}
    assert c.snapshot(drain(env, uid="uid-2")).attempts == {}


def test_policy_ref_overrides_the_policies_own_selection(env) -> None:
    matching = add_policy(env, "matching", priority=100,
                          vmSelector={"matchLabels": {"app": f"db-{env['unique']}"}})
    referenced = add_policy(env, "referenced", vmSelector={"matchLabels": {"app": "none"}})
    add_vmi(env, "a", env["n1"], app=f"db-{env['unique']}")
    c = started(env)
    key = f"{env['ns']}/a"
    assert c.snapshot(drain(env)).rules_for(key).policy == matching
    s = c.snapshot(drain(env, policyRef={"name": referenced}))
    assert s.rules_for(key).policy == referenced
    assert [m.policy for m in plan_drain(s).create] == [referenced]
    for name in (matching, referenced):
        env["kube"].delete(rest.POLICIES, name)


def test_the_drains_non_migratable_overrides_the_policys(env) -> None:
    strict = add_policy(env, "strict", nonMigratable="Fail", namespaceSelector={
        "matchLabels": {"kubernetes.io/metadata.name": env["ns"]}})
    add_vmi(env, "gpu", env["n1"], migratable=False)
    c = started(env)
    key = f"{env['ns']}/gpu"
    assert c.snapshot(drain(env)).rules_for(key).policy == strict
    assert plan_drain(c.snapshot(drain(env))).status.vms[0].phase == "Failed"
    env["kube"].patch(rest.NODES, env["n1"], {"spec": {"unschedulable": True}})  # as cordoned
    wait_for(lambda: (c.nodes.get(env["n1"])["spec"] or {}).get("unschedulable"), timeout=10)
    s = c.snapshot(drain(env, nonMigratable="Skip"))
    assert s.rules_for(key).non_migratable == "Skip"
    d = plan_drain(s)
    assert (d.status.vms[0].phase, d.status.phase) == ("Skipped", "Drained")
    env["kube"].delete(rest.POLICIES, strict)
