"""A migration in post-copy is never aborted, end to end: KubeVirt never aborts post-copy (the
guest already runs on the target; virt-launcher live-migration-source.go, libvirt refuses the
abort), and virtshift never asks. While the migration runs KubeVirt reports its mode only on
the VMI (the VMIM gets a copy once final), so that is where the operator reads it: neither a
MigrationPolicy's progressTimeout nor a NodeDrain deleted with cancelOnDelete deletes the
VMIM; each says in an Event that it lets the migration finish, and it does.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import OperatorProcess, drain_body, get_drain, wait_for

from virtshift.k8s import rest
from virtshift.k8s.views import ABORTED_ANNOTATION
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

SCENARIO = """
seed: 3
timeScale: 20
kubevirt: {parallelMigrationsPerCluster: 5, parallelOutboundMigrationsPerNode: 2}
network: {nodeBandwidth: 1Gi, targetPodStartup: 10s}
storageClasses: [{name: ceph-rbd, accessMode: ReadWriteMany}]
nodes:
  - generate: {count: 2, prefix: node-, cpuModel: Skylake-Server,
               allocatable: {cpu: "64", memory: 256Gi}}
vms:
  # Dirties memory three times faster than the NIC sends it: only post-copy moves it.
  - {name: hot, namespace: pc, node: node-1, memory: 4Gi, dirtyRate: 3Gi}
"""
# Post-copy from 6 s on (4 GiB is 5 GB at 1 s per GB); then 4 GiB pulled at 4 MiB/s: 1024 s of
# simulated time, 51 s of wall time.
POLICY = {"apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
          "metadata": {"name": "pc"},
          "spec": {"namespaceSelector": {"matchLabels": {"tier": "pc"}},
                   "allowPostCopy": True, "completionTimeoutPerGiB": 1,
                   "bandwidthPerMigration": "4Mi"}}


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    kube = fresh_cluster.kube
    kube.patch(rest.NAMESPACES, "pc", {"metadata": {"labels": {"tier": "pc"}}})
    op = OperatorProcess(fresh_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale, sim.metrics.url,
                         downtime_source=runner.DOWNTIME_SOURCE).start()
    try:
        yield {"kube": kube, "sim": sim, "op": op}
    finally:
        op.stop()
        sim.stop()


def events(kube: rest.KubeClient, name: str, reason: str) -> list[dict[str, Any]]:
    """Events of a cluster-scoped object (they live in the default namespace)."""
    return [e for e in kube.items(rest.EVENTS, "default",
                                  field_selector=f"involvedObject.name={name}")
            if e["reason"] == reason]


def abort_requested(kube: rest.KubeClient) -> list[str]:
    """Every sign that someone asked to abort the migration: the VMIM deleted, KubeVirt's
    migrationAbortRequested, the VMI's abortRequested, virtshift's abort record."""
    signs = []
    for m in kube.items(rest.VMIMS, "pc"):
        if m["metadata"].get("deletionTimestamp"):
            signs.append(f"{m['metadata']['name']} deleted")
        if any(c["type"] == "migrationAbortRequested"
               for c in m.get("status", {}).get("conditions") or []):
            signs.append(f"{m['metadata']['name']} migrationAbortRequested")
    vmi = kube.get(rest.VMIS, "hot", "pc")
    if (vmi["status"].get("migrationState") or {}).get("abortRequested"):
        signs.append("VMI abortRequested")
    records = (vmi["metadata"].get("annotations") or {}).get(ABORTED_ANNOTATION)
    if records:
        signs += [f"abort record {r['reason']}: {r['message']}" for r in json.loads(records)]
    return signs


def test_a_migration_in_post_copy_is_let_finish(env) -> None:
    kube = env["kube"]
    kube.create(rest.POLICIES, POLICY)
    wait_for(lambda: kube.get(rest.KUBEVIRT_POLICIES, "virtshift-pc"), what="rendered")
    kube.create(rest.NODE_DRAINS, drain_body("pc-node-1", nodeName="node-1",
                                             cancelOnDelete=True))
    [vmim] = wait_for(lambda: kube.items(rest.VMIMS, "pc"), what="the migration")
    uid = vmim["metadata"]["uid"]
    wait_for(lambda: (s := kube.get(rest.VMIS, "hot", "pc")["status"].get(
        "migrationState") or {}).get("migrationUid") == uid and s.get("mode") == "PostCopy",
        timeout=60, what="post-copy on the VMI")
    running = kube.get(rest.VMIMS, vmim["metadata"]["name"], "pc")
    assert running["status"]["phase"] == "Running"
    assert "mode" not in running["status"].get("migrationState", {})  # KubeVirt's VMIM: not yet

    # A tiny progressTimeout: shorter than the metric's sampling, so every transfer looks
    # stalled between two samples. In post-copy it must not act.
    kube.patch(rest.POLICIES, "pc", {"spec": {"progressTimeout": "1s"}})
    wait_for(lambda: events(kube, "pc", "PostCopyNotAborted") or abort_requested(kube),
             timeout=60, what="the policy's verdict on the post-copy migration")
    assert not abort_requested(kube)
    [spared] = events(kube, "pc", "PostCopyNotAborted")
    assert spared["type"] == "Normal" and vmim["metadata"]["name"] in spared["message"]
    assert "letting it finish" in spared["message"]

    # Ending the maintenance with cancelOnDelete: the migration is not aborted either, and the
    # NodeDrain waits for it to end before it uncordons the node and goes.
    kube.delete(rest.NODE_DRAINS, "pc-node-1")
    [finishing] = wait_for(lambda: events(kube, "pc-node-1", "PostCopyNotAborted")
                           or (abort_requested(kube) and [{}]), timeout=60,
                           what="the drain's verdict on the post-copy migration")
    assert not abort_requested(kube)
    assert finishing["type"] == "Normal" and vmim["metadata"]["name"] in finishing["message"]
    drain = get_drain(kube, "pc-node-1")
    assert drain is not None and drain["status"]["phase"] == "Terminating"
    ready = next(c for c in drain["status"]["conditions"] if c["type"] == "Ready")
    assert "in post-copy" in ready["message"], ready
    assert kube.get(rest.NODES, "node-1")["spec"].get("unschedulable") is True

    done = wait_for(lambda: (m := kube.get(rest.VMIMS, vmim["metadata"]["name"], "pc"))
                    and m["status"].get("phase") in ("Succeeded", "Failed") and m,
                    timeout=120, what="the migration's end")
    assert done["status"]["phase"] == "Succeeded", done["status"]
    assert done["status"]["migrationState"]["mode"] == "PostCopy"
    assert kube.get(rest.VMIS, "hot", "pc")["status"]["nodeName"] == "node-2"
    assert not abort_requested(kube)
    wait_for(lambda: get_drain(kube, "pc-node-1") is None, timeout=60, what="drain gone")
    assert not kube.get(rest.NODES, "node-1")["spec"].get("unschedulable")
