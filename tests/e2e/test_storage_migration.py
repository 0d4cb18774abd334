"""Storage moves end to end: shared-nothing migration during a NodeDrain, and live storage
migration by a MigrationPolicy (storage.mode Always), on KubeVirt's volume migration as the
simulator plays it, against a real API server (with KubeVirt's real CRD schemas where CI has
them, so every VM update virtshift writes passes KubeVirt's own schema).

What is checked is what a user would check: where the VMIs run, which claims the VMs and VMIs
point at, the claims that exist, and the CRs' status."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from operator_harness import OperatorProcess, drain_body, phase_of, wait_for

from virtshift.api.units import parse_quantity
from virtshift.domain.storage import MOVED_BY_LABEL, SOURCE_CLAIM_LABEL
from virtshift.k8s import rest
from virtshift.sim import runner
from virtshift.sim.scenario import load_scenario

# node-1: ten VMs whose disks are on node-local LVM (KubeVirt cannot live-migrate them as they
# are: DisksNotLiveMigratable); the legacy namespace's VMs are on a shared array to retire.
SCENARIO = """
seed: 11
timeScale: 60
kubevirt: {parallelMigrationsPerCluster: 5, parallelOutboundMigrationsPerNode: 2}
network: {nodeBandwidth: 10Gi, targetPodStartup: 5s}
storageClasses:
  - {name: local-lvm, nodeLocal: true, copyBandwidth: 1Gi}
  - {name: legacy-array, accessMode: ReadWriteMany, copyBandwidth: 2Gi}
  - {name: ceph-rbd, accessMode: ReadWriteMany, copyBandwidth: 2Gi}
nodes:
  - generate: {count: 4, prefix: node-, allocatable: {cpu: "64", memory: 256Gi}}
vms:
  - generate:
      count: 10
      prefix: local-
      namespace: apps
      nodes: [node-1]
      memory: [1Gi, 2Gi]
      dirtyRate: [1Mi, 10Mi]
      storageClass: local-lvm
      diskSize: 10Gi
  - generate:
      count: 6
      prefix: old-
      namespace: legacy
      nodes: [node-2, node-3]
      memory: [1Gi, 2Gi]
      dirtyRate: [1Mi, 10Mi]
      storageClass: legacy-array
      diskSize: 20Gi
"""
TIMEOUT = 120


@pytest.fixture(scope="module")
def env(fresh_cluster, tmp_path_factory) -> Iterator[dict[str, Any]]:
    scenario = load_scenario(SCENARIO)
    sim = runner.start(fresh_cluster.kube, scenario, log=lambda _m: None)
    op = OperatorProcess(fresh_cluster.kubeconfig, tmp_path_factory.mktemp("operator"),
                         scenario.time_scale).start()
    try:
        yield {"kube": fresh_cluster.kube, "sim": sim, "op": op}
    finally:
        op.stop()
        sim.stop()


def claims_of_vm(vm: dict[str, Any]) -> dict[str, str]:
    out = {}
    for v in vm["spec"]["template"]["spec"].get("volumes") or []:
        ref = v.get("persistentVolumeClaim") or {}
        if ref.get("claimName"):
            out[v["name"]] = ref["claimName"]
    return out


def claims_of_vmi(vmi: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["persistentVolumeClaim"]["claimName"]
            for v in vmi["spec"].get("volumes") or [] if v.get("persistentVolumeClaim")}


def drain_state(kube: rest.KubeClient, name: str) -> str:
    status = (kube.get(rest.NODE_DRAINS, name) or {}).get("status") or {}
    return f"{status.get('phase')} {status.get('counts')} " + "; ".join(
        f"{e['name']}: {e['phase']} {e.get('reason')} {e.get('message')}"
        for e in status.get("vms") or [])


def pvc_size(pvc: dict[str, Any]) -> float:
    return parse_quantity(pvc["spec"]["resources"]["requests"]["storage"])


def test_a_drain_moves_vms_on_node_local_disks_with_their_disks(env) -> None:
    kube = env["kube"]
    before = {v["metadata"]["name"]: v for v in kube.items(rest.VMS, namespace="apps")}
    sources = {c["metadata"]["name"]: c for c in kube.items(rest.PVCS, namespace="apps")}
    assert len(before) == 10
    vmis = kube.items(rest.VMIS, namespace="apps")
    assert all(any(c["type"] == "LiveMigratable" and c["status"] == "False"
                   and c.get("reason") == "DisksNotLiveMigratable"
                   for c in v["status"]["conditions"]) for v in vmis)

    kube.create(rest.NODE_DRAINS, drain_body("local-disks", nodeName="node-1"))
    wait_for(lambda: phase_of(kube, "local-disks") == "Drained", TIMEOUT,
             what=lambda: f"the drain of node-1 to complete: {drain_state(kube, 'local-disks')}")

    vms = {v["metadata"]["name"]: v for v in kube.items(rest.VMS, namespace="apps")}
    vmis = {v["metadata"]["name"]: v for v in kube.items(rest.VMIS, namespace="apps")}
    pvcs = {c["metadata"]["name"]: c for c in kube.items(rest.PVCS, namespace="apps")}
    for name, vm in vms.items():
        vmi = vmis[name]
        assert vmi["status"]["nodeName"] != "node-1", name
        assert vmi["status"]["phase"] == "Running", name
        old, new = claims_of_vm(before[name]), claims_of_vm(vm)
        assert new.keys() == old.keys()
        assert claims_of_vmi(vmi) == new, name  # the VMI runs on the new claims
        assert not vmi["status"].get("migratedVolumes"), name
        for volume, claim in new.items():
            assert claim != old[volume], name
            dest, src = pvcs[claim], sources[old[volume]]
            labels = dest["metadata"]["labels"]
            assert dest["metadata"]["annotations"][SOURCE_CLAIM_LABEL] == old[volume]
            assert labels[MOVED_BY_LABEL] == "drain.local-disks"
            assert pvc_size(dest) >= pvc_size(src)
            assert dest["spec"]["storageClassName"] == "local-lvm"  # no policy: same class
        assert vm["spec"]["updateVolumesStrategy"] == "Migration"

    status = kube.get(rest.NODE_DRAINS, "local-disks")["status"]
    assert status["counts"]["succeeded"] == 10 and status["counts"]["failed"] == 0, \
        drain_state(kube, "local-disks")
    for e in status["vms"]:
        assert e["mode"] == "SharedNothing", e
        assert [v["phase"] for v in e["volumes"]] == ["Completed"], e
        assert e["volumes"][0]["sizeBytes"] == 10 * 1024**3
    # Every KubeVirt migration of it ran with the disks: its VMI's migratedVolumes were set.
    migrations = kube.items(rest.VMIMS, namespace="apps")
    assert {m["spec"]["vmiName"] for m in migrations if m["status"].get("phase") ==
            "Succeeded"} == set(vms)
    kube.delete(rest.NODE_DRAINS, "local-disks")
    wait_for(lambda: kube.get(rest.NODE_DRAINS, "local-disks") is None, 30,
             what="the drain to go")
    # The moves finished: nothing is reverted, the source claims stay (no policy says Delete).
    assert claims_of_vm(kube.get(rest.VMS, "local-1", "apps")) == claims_of_vm(
        vms["local-1"])
    assert {c["metadata"]["name"] for c in kube.items(rest.PVCS, namespace="apps")} == set(
        pvcs)
