"""Who may delete which claim (docs/storage-migration.md, "Ownership and deletion"), end to end:
a NodeDrain moves VMs on node-local disks with their disks (sourceClaims Keep: no policy), then
a MigrationPolicy that says sourceClaims: Delete comes to govern the same VMs, a VM is deleted
with its claims kept, the NodeDrain is deleted, and a destination left by an owner that no
longer exists is collected. Everything is read from the cluster's PersistentVolumeClaims."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import OperatorProcess, drain_body, phase_of, wait_for
from test_storage_migration import claims_of_vm, drain_state

from virtshift.domain.storage import (
    COMPLETED_ANNOTATION,
    MOVED_BY_LABEL,
    OWNER_UID_ANNOTATION,
    SOURCE_CLAIM_LABEL,
    SOURCE_UID_ANNOTATION,
    VM_LABEL,
)
from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

NS = "own"
SCENARIO = f"""
seed: 5
timeScale: 60
kubevirt: {{parallelMigrationsPerCluster: 5, parallelOutboundMigrationsPerNode: 2}}
network: {{nodeBandwidth: 10Gi, targetPodStartup: 5s}}
storageClasses:
  - {{name: local-lvm, nodeLocal: true, copyBandwidth: 1Gi}}
nodes:
  - generate: {{count: 3, prefix: node-, allocatable: {{cpu: "64", memory: 256Gi}}}}
vms:
  - generate:
      count: 3
      prefix: own-
      namespace: {NS}
      nodes: [node-1]
      memory: [1Gi, 1Gi]
      dirtyRate: [1Mi, 1Mi]
      storageClass: local-lvm
      diskSize: 2Gi
"""
TIMEOUT = 120
SNAPSHOTS = rest.Resource("snapshot.storage.k8s.io", "v1", "volumesnapshots")
# The claims collector's resync (handlers/claims.py RESYNC_SECONDS) and then some.
COLLECTOR_SECONDS = 15


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    op = OperatorProcess(fresh_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale).start()
    try:
        yield {"kube": fresh_cluster.kube, "sim": sim, "op": op, "state": {}}
    finally:
        op.stop()
        sim.stop()


def pvcs(kube: rest.KubeClient) -> dict[str, dict[str, Any]]:
    return {c["metadata"]["name"]: c for c in kube.items(rest.PVCS, namespace=NS)
            if not c["metadata"].get("deletionTimestamp")}


def annotations(pvc: dict[str, Any]) -> dict[str, str]:
    return pvc["metadata"].get("annotations") or {}


def delete_vm_keeping_claims(kube: rest.KubeClient, name: str) -> None:
    """``kubectl delete vm``: KubeVirt's VM controller stops the VMI, the garbage collector
    removes what the VM owns (its VMI, the VMI's launcher pod). No controller-manager runs
    against the test API server, so the test does the garbage collector's part. The claims
    stay: they are not owned by the VM."""
    kube.delete(rest.VMS, name, NS)
    kube.delete(rest.VMIS, name, NS)
    for pod in kube.items(rest.PODS, namespace=NS):
        if (pod["metadata"].get("labels") or {}).get("vm.kubevirt.io/name") == name:
            kube.delete(rest.PODS, pod["metadata"]["name"], NS, grace_seconds=0)


def test_a_drain_records_who_made_each_destination(env) -> None:
    kube = env["kube"]
    before = {v["metadata"]["name"]: claims_of_vm(v) for v in kube.items(rest.VMS, namespace=NS)}
    drain = kube.create(rest.NODE_DRAINS, drain_body("own-drain", nodeName="node-1"))
    wait_for(lambda: phase_of(kube, "own-drain") == "Drained", TIMEOUT,
             what=lambda: f"the drain of node-1: {drain_state(kube, 'own-drain')}")
    now = pvcs(kube)
    moved = {}
    for vm in kube.items(rest.VMS, namespace=NS):
        name = vm["metadata"]["name"]
        (volume, claim), = claims_of_vm(vm).items()
        source = before[name][volume]
        assert claim != source and source in now, name
        a = annotations(now[claim])
        assert a[MOVED_BY_LABEL] == "drain.own-drain" and a[VM_LABEL] == name
        assert a[OWNER_UID_ANNOTATION] == drain["metadata"]["uid"]
        assert a[SOURCE_CLAIM_LABEL] == source
        assert a[SOURCE_UID_ANNOTATION] == now[source]["metadata"]["uid"]
        moved[name] = (source, claim)
    # The claims collector saw every move finish and recorded it on the destination.
    wait_for(lambda: all(COMPLETED_ANNOTATION in annotations(pvcs(kube)[d])
                         for _s, d in moved.values()), COLLECTOR_SECONDS,
             what="every destination marked completed")
    env["state"]["moved"] = moved


def test_a_keep_move_of_another_owner_keeps_its_source(env) -> None:
    """The drain moved the disks under Keep (no policy governed them). A MigrationPolicy
    with sourceClaims: Delete now governs the same VMs, and their disks are in its target
    class already: neither it nor the drain deletes the sources of the drain's moves."""
    kube, moved = env["kube"], env["state"]["moved"]
    kube.create(rest.POLICIES, {
        "apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "own-delete"},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": NS}},
                 "storage": {"mode": "Always", "targetStorageClass": "local-lvm",
                             "sourceClaims": "Delete"}}})

    def counts() -> dict[str, int]:
        return (((kube.get(rest.POLICIES, "own-delete") or {}).get("status") or {}).get(
            "storage") or {}).get("counts") or {}
    wait_for(lambda: counts().get("succeeded") == len(moved), 60,
             what=lambda: f"the policy to see the moved VMs: {counts()}")
    time.sleep(5)  # passes of the policy and of the drain, each of which deleted them before
    left = pvcs(kube)
    assert {s for s, _d in moved.values()} <= set(left), sorted(left)
    assert {d for _s, d in moved.values()} <= set(left), sorted(left)


def test_a_finished_moves_claim_survives_its_vms_deletion(env) -> None:
    """own-1 is deleted with its claims kept; then the drain that moved its disk is deleted.
    The destination holds own-1's data (it ran on it after the move): it stays, and so
    does the (older) source. Nothing the drain moved is deleted when it goes."""
    kube, moved = env["kube"], env["state"]["moved"]
    kube.delete(rest.POLICIES, "own-delete")
    wait_for(lambda: kube.get(rest.POLICIES, "own-delete") is None, 30, what="the policy gone")
    delete_vm_keeping_claims(kube, "own-1")
    kube.delete(rest.NODE_DRAINS, "own-drain")
    wait_for(lambda: kube.get(rest.NODE_DRAINS, "own-drain") is None, 60,
             what="the drain's finalizer to go")
    time.sleep(COLLECTOR_SECONDS)  # the claims collector: its owner is gone now
    left = pvcs(kube)
    source, dest = moved["own-1"]
    assert dest in left and source in left, sorted(left)
    assert {c for pair in moved.values() for c in pair} <= set(left), sorted(left)


def test_a_destination_whose_owner_is_gone_is_collected_once_nothing_holds_it(env) -> None:
    """A destination of a NodeDrain that no longer exists, for a VM that runs on the
    source (a move cancelled or never begun): the claims collector deletes it, but only once
    nothing refers to it -- here a VolumeSnapshot of it, where the cluster serves them."""
    kube = env["kube"]
    vm = kube.get(rest.VMS, "own-2", NS)
    (volume, source), = claims_of_vm(vm).items()
    src = pvcs(kube)[source]
    orphan = f"{source}-vs-0rphan"[:63]
    install_volume_snapshots(env)
    kube.create(SNAPSHOTS, {
        "apiVersion": "snapshot.storage.k8s.io/v1", "kind": "VolumeSnapshot",
        "metadata": {"name": "keep-me", "namespace": NS},
        "spec": {"source": {"persistentVolumeClaimName": orphan}}})
    kube.create(rest.PVCS, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": orphan, "namespace": NS, "annotations": {
            MOVED_BY_LABEL: "drain.long-gone", OWNER_UID_ANNOTATION: "0000-gone",
            SOURCE_CLAIM_LABEL: source, SOURCE_UID_ANNOTATION: src["metadata"]["uid"],
            VM_LABEL: "own-2"}},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "local-lvm",
                 "resources": {"requests": {"storage": "2Gi"}}}})
    time.sleep(COLLECTOR_SECONDS)
    assert orphan in pvcs(kube)  # the snapshot refers to it
    kube.delete(SNAPSHOTS, "keep-me", NS)
    # Found held, a claim is looked at again after k8s.storage.HELD_SECONDS.
    wait_for(lambda: orphan not in pvcs(kube), 30 + 2 * COLLECTOR_SECONDS,
             what="the orphan destination collected")
    assert source in pvcs(kube)  # its VM runs on it
    assert claims_of_vm(kube.get(rest.VMS, "own-2", NS)) == {volume: source}
    event = wait_for(lambda: next((e for e in kube.items(rest.EVENTS, namespace=NS)
                                   if e["involvedObject"]["name"] == orphan
                                   and e["reason"] == "DestinationDeleted"), None), 15,
                     what="the Event saying why the claim went")
    assert "drain.long-gone is gone" in event["message"], event["message"]



def install_volume_snapshots(env) -> None:
    """The external-snapshotter's VolumeSnapshot CRD, reduced to what is read here."""
    kube = env["kube"]
    crd = rest.Resource("apiextensions.k8s.io", "v1", "customresourcedefinitions",
                        namespaced=False)
    kube.create(crd, {
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "volumesnapshots.snapshot.storage.k8s.io", "annotations": {
            # as the external-snapshotter's own CRD carries it (a *.k8s.io group)
            "api-approved.kubernetes.io":
                "https://github.com/kubernetes-csi/external-snapshotter/pull/814"}},
        "spec": {"group": "snapshot.storage.k8s.io", "scope": "Namespaced",
                 "names": {"plural": "volumesnapshots", "singular": "volumesnapshot",
                           "kind": "VolumeSnapshot", "listKind": "VolumeSnapshotList"},
                 "versions": [{"name": "v1", "served": True, "storage": True,
                               "schema": {"openAPIV3Schema": {
                                   "type": "object",
                                   "x-kubernetes-preserve-unknown-fields": True}}}]}})
    wait_for(lambda: _served(kube), 30, what="the VolumeSnapshot CRD served")


def _served(kube: rest.KubeClient) -> bool:
    try:
        kube.items(SNAPSHOTS, namespace=NS)
        return True
    except rest.ApiError:
        return False
