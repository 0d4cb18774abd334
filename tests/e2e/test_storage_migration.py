"""Storage moves end to end: shared-nothing migration during a NodeDrain, and live storage
migration by a MigrationPolicy (storage.mode Always), on KubeVirt's volume migration as the
simulator plays it, against a real API server (with KubeVirt's real CRD schemas where CI has
them, so every VM update virtshift writes passes KubeVirt's own schema).

What is checked is what a user would check: where the VMIs run, which claims the VMs and VMIs
point at, the claims that exist, and the CRs' status."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
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
  - {name: slow-nfs, accessMode: ReadWriteMany, copyBandwidth: 100Mi}
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
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "policy-storage.yaml"


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


def running_claims(vmi: dict[str, Any]) -> dict[str, str]:
    """What the VMI's domain runs on: a volume it is migrating still runs on its source."""
    out = claims_of_vmi(vmi)
    for m in vmi["status"].get("migratedVolumes") or []:
        out[m["volumeName"]] = m["sourcePVCInfo"]["claimName"]
    return out


class CopySampler:
    """Samples, while storage moves run, how many VMs point at claims their VMIs do not run on
    yet (copies under way), from the cluster's VMs and VMIs."""

    def __init__(self, kube: rest.KubeClient, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.peak = 0
        self.first: float | None = None  # wall time the first copy was seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CopySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def copying(self) -> int:
        vmis = {v["metadata"]["name"]: v for v in self.kube.items(rest.VMIS,
                                                                  namespace=self.namespace)}
        return sum(1 for vm in self.kube.items(rest.VMS, namespace=self.namespace)
                   if (vmi := vmis.get(vm["metadata"]["name"])) is not None
                   and claims_of_vm(vm) != running_claims(vmi))

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self.copying()
            if n and self.first is None:
                self.first = time.monotonic()
            self.peak = max(self.peak, n)
            self._stop.wait(0.05)


def test_the_storage_example_policy_moves_the_legacy_disks_to_ceph(env) -> None:
    """examples/policy-storage.yaml, as its comments say: every disk of the namespaces
    labelled storage=legacy-array moves to ceph-rbd while the VMs run, at most four copies at
    a time, and each old claim is deleted once its VM runs on the new one."""
    kube = env["kube"]
    kube.patch(rest.NAMESPACES, "legacy", {"metadata": {"labels": {"storage": "legacy-array"}}})
    before = {v["metadata"]["name"]: claims_of_vm(v)
              for v in kube.items(rest.VMS, namespace="legacy")}
    sizes = {c["metadata"]["name"]: pvc_size(c) for c in kube.items(rest.PVCS,
                                                                     namespace="legacy")}
    policy = yaml.safe_load(EXAMPLE.read_text())
    with CopySampler(kube, "legacy") as sampler:
        kube.create(rest.POLICIES, policy)

        def moved() -> bool:
            pvcs = {c["metadata"]["name"]: c for c in kube.items(rest.PVCS, namespace="legacy")}
            vmis = {v["metadata"]["name"]: v for v in kube.items(rest.VMIS, namespace="legacy")}
            return all(running_claims(vmis[n]).get(vol) in pvcs and pvcs[running_claims(
                vmis[n])[vol]]["spec"]["storageClassName"] == "ceph-rbd"
                for n, vols in before.items() for vol in vols) and not any(
                c in pvcs for vols in before.values() for c in vols.values())
        wait_for(moved, TIMEOUT, what=lambda: f"the legacy disks on ceph-rbd, old claims gone: "
                 f"{(kube.get(rest.POLICIES, 'storage-move') or {}).get('status')}")
    assert 1 <= sampler.peak <= 4  # maxParallelCopies
    vms = {v["metadata"]["name"]: v for v in kube.items(rest.VMS, namespace="legacy")}
    vmis = {v["metadata"]["name"]: v for v in kube.items(rest.VMIS, namespace="legacy")}
    pvcs = {c["metadata"]["name"]: c for c in kube.items(rest.PVCS, namespace="legacy")}
    for name, old in before.items():
        new = claims_of_vm(vms[name])
        assert claims_of_vmi(vmis[name]) == new and vmis[name]["status"]["phase"] == "Running"
        for volume, claim in new.items():
            dest = pvcs[claim]
            assert dest["metadata"]["annotations"][SOURCE_CLAIM_LABEL] == old[volume]
            assert pvc_size(dest) >= sizes[old[volume]]
    status = wait_for(lambda: (s := (kube.get(rest.POLICIES, "storage-move") or {}).get(
        "status", {}).get("storage")) and s["counts"]["succeeded"] == len(before) and s,
        30, what="the policy's storage status")
    assert status["counts"]["failed"] == status["counts"]["copying"] == 0
    assert status["bytesMoved"] == sum(sizes[c] for vols in before.values()
                                       for c in vols.values())
    entry = status["vms"][0]
    assert entry["phase"] == "Succeeded" and entry["volumes"][0]["phase"] == "Completed"
    assert entry["volumes"][0]["durationSeconds"] > 0


def test_deleting_a_policy_halfway_puts_every_unfinished_vm_back(env) -> None:
    """Cancelling: the policy deleted while copies run; every VM whose move had not finished
    runs on its original volumes again, no destination claim is left over, the policy goes."""
    kube = env["kube"]
    before = {v["metadata"]["name"]: claims_of_vm(v)
              for v in kube.items(rest.VMS, namespace="apps")}
    claims_before = {c["metadata"]["name"] for c in kube.items(rest.PVCS, namespace="apps")}
    kube.create(rest.POLICIES, {
        "apiVersion": "virtshift.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": "to-nfs"},
        "spec": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "apps"}},
            "storage": {"targetStorageClass": "slow-nfs", "mode": "Always",
                        "maxParallelCopies": 2}}})

    def progress() -> dict[str, int]:
        return ((kube.get(rest.POLICIES, "to-nfs") or {}).get("status") or {}).get(
            "storage", {}).get("counts") or {}
    with CopySampler(kube, "apps") as sampler:
        wait_for(lambda: progress().get("succeeded", 0) >= 1 and sampler.copying() >= 1,
                 TIMEOUT, what=lambda: f"one move done and one under way: {progress()}")
        kube.delete(rest.POLICIES, "to-nfs")
        wait_for(lambda: kube.get(rest.POLICIES, "to-nfs") is None, 60,
                 what="the policy's finalizer to go")
    assert sampler.peak <= 2
    vms = {v["metadata"]["name"]: v for v in kube.items(rest.VMS, namespace="apps")}
    vmis = {v["metadata"]["name"]: v for v in kube.items(rest.VMIS, namespace="apps")}
    pvcs = {c["metadata"]["name"]: c for c in kube.items(rest.PVCS, namespace="apps")}
    finished = [n for n in vms if claims_of_vm(vms[n]) != before[n]]
    assert 1 <= len(finished) < len(vms)
    for name, vm in vms.items():
        vmi = vmis[name]
        assert vmi["status"]["phase"] == "Running"
        assert claims_of_vm(vm) == running_claims(vmi) == claims_of_vmi(vmi)  # nothing half
        if name in finished:
            assert all(pvcs[c]["spec"]["storageClassName"] == "slow-nfs"
                       for c in claims_of_vm(vm).values())
        else:
            assert claims_of_vm(vm) == before[name], name  # back on its original volumes
    # No orphan: every claim the policy made is one a VM runs on.
    used = {c for vm in vms.values() for c in claims_of_vm(vm).values()}
    made = {n for n, c in pvcs.items()
            if (c["metadata"].get("annotations") or {}).get(MOVED_BY_LABEL) == "policy.to-nfs"}
    assert made <= used and made, (made, used)
    assert set(pvcs) - made == claims_before  # the sources are kept (sourceClaims: Keep)
