"""Storage as KubeVirt's volume migrations meet it, on the cluster's objects: Kubernetes' PV
controller, CSI provisioner, pvc-protection and the scheduler's volume binding (which the
simulator plays), KubeVirt's volume-update validation, the workload updater's timing and the
copy bandwidth of a storage class. Each test names the source it follows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubevirt_objects import conditions, final, seconds, simulate, stamps, state_of, wait_for

from virtshift.k8s import rest
from virtshift.sim import runner

SCALE = 100
NS = "st"
SCENARIO = f"""
seed: 4
timeScale: {SCALE}
kubevirt: {{parallelMigrationsPerCluster: 20, parallelOutboundMigrationsPerNode: 5,
           workloadUpdateMethods: []}}  # the tests create the migrations, as the operator does
network: {{nodeBandwidth: 100Gi, targetPodStartup: 10s}}
storageClasses:
  - {{name: legacy-array, accessMode: ReadWriteMany, copyBandwidth: 100Gi}}
  - {{name: ceph-rbd, accessMode: ReadWriteMany, copyBandwidth: 1Gi}}
  - {{name: local-lvm, nodeLocal: true, copyBandwidth: 10Gi}}
namespaces:
  - {{name: {NS}, labels: {{storage: legacy-array}}}}
nodes:
  - generate: {{count: 4, prefix: n-, cpuModel: Skylake-Server,
               allocatable: {{cpu: "64", memory: 256Gi}}}}
vms:
  - {{name: sn-1, namespace: {NS}, node: n-1, memory: 1Gi,
     volumes: [{{name: rootdisk, claimName: sn-1-root, size: 2Gi, storageClass: local-lvm}}]}}
  - {{name: pin-1, namespace: {NS}, node: n-1, memory: 1Gi,
     volumes: [{{name: rootdisk, claimName: pin-1-root, size: 2Gi, storageClass: local-lvm}}]}}
  - {{name: wu-1, namespace: {NS}, node: n-2, memory: 1Gi,
     volumes: [{{name: rootdisk, claimName: wu-1-root, size: 2Gi, storageClass: legacy-array}}]}}
  - {{name: small-1, namespace: {NS}, node: n-2, memory: 1Gi,
     volumes: [{{name: rootdisk, claimName: small-1-root, size: 4Gi, storageClass: legacy-array}}]}}
  - {{name: odd-1, namespace: {NS}, node: n-3, memory: 1Gi, filesystems: [share],
     volumes: [{{name: rootdisk, claimName: odd-1-root, size: 2Gi, storageClass: legacy-array,
                 hotplug: true}},
               {{name: shared, claimName: odd-1-shared, size: 2Gi, storageClass: legacy-array,
                 shareable: true}},
               {{name: lun, claimName: odd-1-lun, size: 2Gi, storageClass: legacy-array,
                 lun: true}},
               {{name: share, claimName: odd-1-share, size: 2Gi, storageClass: legacy-array}}]}}
  - generate: {{count: 6, prefix: bw-, namespace: {NS}, nodes: [n-1, n-2, n-3, n-4],
               memory: [1Gi, 1Gi], storageClass: legacy-array, diskSize: 30Gi}}
"""


@pytest.fixture(scope="module")
def sim(fresh_cluster) -> Iterator[runner.Simulator]:
    yield from simulate(fresh_cluster.kube, SCENARIO)


@pytest.fixture
def kube(sim, fresh_cluster) -> rest.KubeClient:
    return fresh_cluster.kube


def claim(kube: rest.KubeClient, name: str, storage_class: str, size: str = "2Gi",
          mode: str = "ReadWriteMany", **annotations: str) -> dict[str, Any]:
    return kube.create(rest.PVCS, {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS, "annotations": annotations,
                     "labels": {"virtshift.io/source-claim": "x"}},
        "spec": {"accessModes": [mode], "storageClassName": storage_class,
                 "resources": {"requests": {"storage": size}}}})


def pvc(kube: rest.KubeClient, name: str) -> dict[str, Any] | None:
    return kube.get(rest.PVCS, name, NS)


def bound(kube: rest.KubeClient, name: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (o := pvc(kube, name)) and o.get("status", {}).get(
        "phase") == "Bound" and o, timeout)


def point(kube: rest.KubeClient, vm: str, claims: dict[str, str]) -> None:
    obj = kube.get(rest.VMS, vm, NS)
    volumes = [{**v, "persistentVolumeClaim": {**v["persistentVolumeClaim"],
                                               "claimName": claims.get(v["name"], v[
                                                   "persistentVolumeClaim"]["claimName"])}}
               for v in obj["spec"]["template"]["spec"]["volumes"]]
    kube.patch(rest.VMS, vm, {"spec": {"updateVolumesStrategy": "Migration",
                                       "template": {"spec": {"volumes": volumes}}}}, NS)


def vmi(kube: rest.KubeClient, name: str) -> dict[str, Any]:
    obj = kube.get(rest.VMIS, name, NS)
    assert obj is not None
    return obj


def volume_changing(kube: rest.KubeClient, name: str) -> dict[str, Any]:
    return wait_for(lambda: conditions(v := vmi(kube, name)).get("VolumesChange", {}).get(
        "status") == "True" and v)


def migrate(kube: rest.KubeClient, name: str, vm: str, node: str | None = None
            ) -> dict[str, Any]:
    spec: dict[str, Any] = {"vmiName": vm}
    if node:
        spec["addedNodeSelector"] = {"kubernetes.io/hostname": node}
    return kube.create(rest.VMIMS, {"apiVersion": "kubevirt.io/v1",
                                    "kind": "VirtualMachineInstanceMigration",
                                    "metadata": {"name": name, "namespace": NS},
                                    "spec": spec})


def vmims_of(kube: rest.KubeClient, vm: str) -> list[dict[str, Any]]:
    return [m for m in kube.items(rest.VMIMS, NS) if m["spec"]["vmiName"] == vm]


def events_of(kube: rest.KubeClient, name: str) -> dict[str, dict[str, Any]]:
    return {e["reason"]: e for e in kube.items(rest.EVENTS, NS)
            if e["involvedObject"]["name"] == name}


def set_workload_update(sim, kube: rest.KubeClient, methods: list[str]) -> None:
    kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"workloadUpdateStrategy": {
        "workloadUpdateMethods": methods}}}, "kubevirt")
    wait_for(lambda: (sim.kubevirt.kubevirt_spec().get("workloadUpdateStrategy") or {}).get(
        "workloadUpdateMethods") == methods)


# -- the PV controller and the provisioner -------------------------------------------------


def test_an_immediate_claim_is_provisioned_and_bound(kube) -> None:
    """pv_controller.go provisionClaim/bind (bindClaimToVolume, updateClaimStatus) and the CSI
    external-provisioner's provisionClaimOperation: an Immediate class's claim gets a
    pvc-<uid> PV with its access modes, size, claimRef and the class's reclaim policy; the
    claim gets spec.volumeName, bind-completed/bound-by-controller, phase Bound, capacity."""
    created = claim(kube, "imm-1", "ceph-rbd", "3Gi")
    done = bound(kube, "imm-1")
    ann = done["metadata"]["annotations"]
    assert ann["pv.kubernetes.io/bind-completed"] == "yes"
    assert ann["pv.kubernetes.io/bound-by-controller"] == "yes"
    assert ann["volume.kubernetes.io/storage-provisioner"] == "sim.virtshift.io/ceph-rbd"
    assert "kubernetes.io/pvc-protection" in done["metadata"]["finalizers"]
    assert done["status"]["capacity"] == {"storage": "3Gi"}
    assert done["status"]["accessModes"] == ["ReadWriteMany"]
    pv = kube.get(rest.PVS, done["spec"]["volumeName"])
    assert pv["metadata"]["name"] == f"pvc-{created['metadata']['uid']}"
    assert pv["spec"]["claimRef"]["uid"] == created["metadata"]["uid"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert pv["spec"]["capacity"] == {"storage": "3Gi"}
    assert "nodeAffinity" not in pv["spec"]
    assert pv["status"]["phase"] == "Bound"
    # Populated claims have the same shape.
    root = pvc(kube, "wu-1-root")
    assert root["metadata"]["annotations"]["pv.kubernetes.io/bind-completed"] == "yes"
    assert kube.get(rest.PVS, root["spec"]["volumeName"])["spec"]["claimRef"]["uid"] == \
        root["metadata"]["uid"]


def test_claims_that_cannot_bind_stay_pending_with_the_controllers_event(kube) -> None:
    """pv_controller.go provisionClaimOperation: an unknown class is a Warning
    ProvisioningFailed ("storageclass.storage.k8s.io \\"x\\" not found");
    WaitForFirstConsumer: Normal WaitForFirstConsumer until a pod using it is scheduled."""
    claim(kube, "nope-1", "no-such-class")
    claim(kube, "wffc-1", "local-lvm", mode="ReadWriteOnce")
    failed = wait_for(lambda: events_of(kube, "nope-1").get("ProvisioningFailed"))
    assert failed["message"] == 'storageclass.storage.k8s.io "no-such-class" not found'
    assert failed["type"] == "Warning"
    waiting = wait_for(lambda: events_of(kube, "wffc-1").get("WaitForFirstConsumer"))
    assert waiting["message"] == "waiting for first consumer to be created before binding"
    for name in ("nope-1", "wffc-1"):
        assert pvc(kube, name)["status"]["phase"] == "Pending"
        assert not pvc(kube, name)["spec"].get("volumeName")


def test_shared_nothing_binds_the_destination_on_the_target_node(sim, kube) -> None:
    """Scheduler VolumeBinding PreBind (volume.kubernetes.io/selected-node) and the
    provisioner's topology: an unbound WaitForFirstConsumer destination binds to a PV pinned
    to the node the target pod lands on. pvcprotection: the source claim is released with the source
    pod, and pv_controller.go reclaimVolume deletes its Delete PV."""
    claim(kube, "sn-1-dst", "local-lvm", mode="ReadWriteOnce")
    point(kube, "sn-1", {"rootdisk": "sn-1-dst"})
    volume_changing(kube, "sn-1")
    migrate(kube, "sn-1-move", "sn-1", node="n-3")
    assert final(kube, NS, "sn-1-move")["status"]["phase"] == "Succeeded"
    assert vmi(kube, "sn-1")["status"]["nodeName"] == "n-3"
    dst = bound(kube, "sn-1-dst")
    assert dst["metadata"]["annotations"]["volume.kubernetes.io/selected-node"] == "n-3"
    pv = kube.get(rest.PVS, dst["spec"]["volumeName"])
    assert pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"][0] == {"key": "kubernetes.io/hostname", "operator": "In",
                                   "values": ["n-3"]}
    # The source claim is free once the source pod is gone: deleting it deletes its PV.
    old_pv = pvc(kube, "sn-1-root")["spec"]["volumeName"]
    kube.delete(rest.PVCS, "sn-1-root", NS)
    wait_for(lambda: pvc(kube, "sn-1-root") is None)
    wait_for(lambda: kube.get(rest.PVS, old_pv) is None)
    # The claim the VM now runs on is protected while its pod uses it.
    kube.delete(rest.PVCS, "sn-1-dst", NS)
    wait_for(lambda: pvc(kube, "sn-1-dst")["metadata"].get("deletionTimestamp"))
    time.sleep(30 / SCALE)
    assert pvc(kube, "sn-1-dst") is not None
    assert kube.get(rest.PVS, dst["spec"]["volumeName"]) is not None


def test_a_target_pod_whose_claim_is_pinned_elsewhere_never_schedules(kube) -> None:
    """Scheduler VolumeBinding Filter: a claim bound to a PV with node affinity for n-2 keeps
    a target pod pinned to n-4 Pending (Unschedulable); migration.go handlePendingPodTimeout
    deletes it after 300 s and the VMIM fails."""
    claim(kube, "pin-1-dst", "local-lvm", mode="ReadWriteOnce",
          **{"volume.kubernetes.io/selected-node": "n-2"})
    pinned = bound(kube, "pin-1-dst")
    assert kube.get(rest.PVS, pinned["spec"]["volumeName"])["spec"]["nodeAffinity"]
    point(kube, "pin-1", {"rootdisk": "pin-1-dst"})
    volume_changing(kube, "pin-1")
    migrate(kube, "pin-1-move", "pin-1", node="n-4")
    pod = wait_for(lambda: next((p for p in kube.items(rest.PODS, NS)
                                 if p["metadata"]["annotations"].get(
                                     "kubevirt.io/migrationJobName") == "pin-1-move"
                                 and p.get("status", {}).get("conditions")), None))
    [sched] = pod["status"]["conditions"]
    assert (sched["type"], sched["status"], sched["reason"]) == \
        ("PodScheduled", "False", "Unschedulable")
    assert "didn't match PersistentVolume's node affinity" in sched["message"]
    done = final(kube, NS, "pin-1-move", timeout=30)
    assert done["status"]["phase"] == "Failed"
    assert vmi(kube, "pin-1")["status"]["nodeName"] == "n-1"
    point(kube, "pin-1", {"rootdisk": "pin-1-root"})  # cancel
    wait_for(lambda: conditions(vmi(kube, "pin-1"))["VolumesChange"]["status"] == "False")


def test_an_unbound_immediate_destination_leaves_the_target_pod_pending(kube) -> None:
    """Scheduler VolumeBinding PreFilter: "pod has unbound immediate PersistentVolumeClaims"
    (a claim of a class nobody provisions stays Pending); KubeVirt 1.9's ValidateVolumes only
    checks that the claim exists, so the migration starts and times out unschedulable."""
    claim(kube, "wu-1-nope", "no-such-class")
    point(kube, "wu-1", {"rootdisk": "wu-1-nope"})
    volume_changing(kube, "wu-1")
    migrate(kube, "wu-1-move", "wu-1")
    pod = wait_for(lambda: next((p for p in kube.items(rest.PODS, NS)
                                 if p["metadata"]["annotations"].get(
                                     "kubevirt.io/migrationJobName") == "wu-1-move"
                                 and p.get("status", {}).get("conditions")), None))
    assert "pod has unbound immediate PersistentVolumeClaims" in \
        pod["status"]["conditions"][0]["message"]
    assert final(kube, NS, "wu-1-move")["status"]["phase"] == "Failed"
    point(kube, "wu-1", {"rootdisk": "wu-1-root"})  # cancel (VolumeMigrationCancel)
    wait_for(lambda: conditions(vmi(kube, "wu-1"))["VolumesChange"]["status"] == "False")


# -- KubeVirt's volume-update validation ---------------------------------------------------


def test_filesystems_shareable_disks_and_luns_cannot_migrate(kube) -> None:
    """volume-migration.go ValidateVolumes / invalidVols.errorMessage via vm.go
    handleValidationErrors: RestartRequired "invalid volumes to update with migration:
    filesystems: [...] shareable: [...] luns: [...]"; a hotplugged volume is valid."""
    obj = kube.get(rest.VMS, "odd-1", NS)
    tmpl = obj["spec"]["template"]["spec"]
    disks = {d["name"]: d for d in tmpl["domain"]["devices"]["disks"]}
    assert disks["shared"]["shareable"] is True and "lun" in disks["lun"]
    assert tmpl["domain"]["devices"]["filesystems"] == [{"name": "share", "virtiofs": {}}]
    assert {v["name"]: v["persistentVolumeClaim"].get("hotpluggable") for v in tmpl[
        "volumes"]}["rootdisk"] is True
    for name in ("odd-1-a", "odd-1-b", "odd-1-c", "odd-1-d"):
        claim(kube, name, "ceph-rbd")
    point(kube, "odd-1", {"shared": "odd-1-b", "lun": "odd-1-c", "share": "odd-1-d"})
    vm = wait_for(lambda: "RestartRequired" in conditions(
        o := kube.get(rest.VMS, "odd-1", NS)) and o)
    assert conditions(vm)["RestartRequired"]["message"] == (
        "invalid volumes to update with migration: filesystems: [share] shareable: [shared] "
        "luns: [lun]")
    assert not vmi(kube, "odd-1")["status"].get("migratedVolumes")
    point(kube, "odd-1", {"rootdisk": "odd-1-a", "shared": "odd-1-shared",
                          "lun": "odd-1-lun", "share": "odd-1-share"})
    during = volume_changing(kube, "odd-1")
    assert [m["volumeName"] for m in during["status"]["migratedVolumes"]] == ["rootdisk"]
    point(kube, "odd-1", {"rootdisk": "odd-1-root"})  # cancel
    wait_for(lambda: conditions(vmi(kube, "odd-1"))["VolumesChange"]["status"] == "False")


def test_a_smaller_destination_fails_the_volume_migration(kube) -> None:
    """virt-launcher live-migration-source.go setMigrationResult: QEMU refuses to mirror into
    a smaller disk; the VMI's failureReason "Volume migration cannot be performed because
    the destination volume is smaller than the source volume: ..." (1.9)."""
    claim(kube, "small-1-dst", "ceph-rbd", size="1Gi")
    point(kube, "small-1", {"rootdisk": "small-1-dst"})
    volume_changing(kube, "small-1")
    migrate(kube, "small-1-move", "small-1")
    assert final(kube, NS, "small-1-move")["status"]["phase"] == "Failed"
    reason = state_of(vmi(kube, "small-1"))["failureReason"]
    assert reason.startswith("Volume migration cannot be performed because the destination "
                             "volume is smaller than the source volume: ")
    point(kube, "small-1", {"rootdisk": "small-1-root"})  # cancel: nothing retries it
    wait_for(lambda: conditions(vmi(kube, "small-1"))["VolumesChange"]["status"] == "False")


# -- timing: the workload updater and the copy bandwidth -----------------------------------


def test_the_workload_updater_waits_five_seconds_and_skips_migrating_vmis(sim, kube) -> None:
    """workload-updater.go updateVmi / defaultThrottleInterval: the sync that creates the
    kubevirt-workload-update VMIM runs 5 s after the VMI entered VolumesChange; getUpdateData
    skips a VMI with any unfinished migration (ListUnfinishedMigrations by vmiName), so an
    operator's own VMIM, created first, is the only one."""
    set_workload_update(sim, kube, ["LiveMigrate"])
    try:
        time.sleep(30 / SCALE)  # no sync already due from earlier updates
        claim(kube, "bw-5-dst", "ceph-rbd", size="30Gi")
        point(kube, "bw-5", {"rootdisk": "bw-5-dst"})
        changing = volume_changing(kube, "bw-5")
        since = seconds(conditions(changing)["VolumesChange"]["lastTransitionTime"])
        update = wait_for(lambda: next(iter(vmims_of(kube, "bw-5")), None))
        assert update["metadata"]["name"].startswith("kubevirt-workload-update-")
        done = final(kube, NS, update["metadata"]["name"], 60)
        assert done["status"]["phase"] == "Succeeded"
        # Simulated time (creationTimestamp is the API server's wall clock).
        assert 4 <= stamps(done)["Pending"] - since <= 7

        migrate(kube, "bw-6-own", "bw-6", node="nowhere")  # Scheduling for up to 300 s
        claim(kube, "bw-6-dst", "ceph-rbd", size="30Gi")
        point(kube, "bw-6", {"rootdisk": "bw-6-dst"})
        volume_changing(kube, "bw-6")
        time.sleep(60 / SCALE)
        assert [m["metadata"]["name"] for m in vmims_of(kube, "bw-6")] == ["bw-6-own"]
    finally:
        set_workload_update(sim, kube, [])


def test_concurrent_copies_into_one_class_share_its_bandwidth(sim, kube) -> None:
    """The storage class's copyBandwidth is shared by every copy writing to it: three 30Gi
    copies into ceph-rbd (1Gi/s) at once each take about three times as long as one alone."""
    def run(vms: list[str]) -> list[tuple[float, float]]:
        for vm in vms:
            claim(kube, f"{vm}-dst", "ceph-rbd", size="30Gi")
        for vm in vms:
            point(kube, vm, {"rootdisk": f"{vm}-dst"})
        for vm in vms:
            volume_changing(kube, vm)
        for vm in vms:
            migrate(kube, f"{vm}-move", vm)
        out = []
        for vm in vms:
            assert final(kube, NS, f"{vm}-move", 60)["status"]["phase"] == "Succeeded"
            state = state_of(vmi(kube, vm))
            out.append((seconds(state["startTimestamp"]), seconds(state["endTimestamp"])))
        return out

    [(start, end)] = run(["bw-1"])
    alone = end - start
    together = run(["bw-2", "bw-3", "bw-4"])
    assert 28 <= alone <= 33
    # The class is busy all along: three copies need three times one copy's class time,
    # however the wall clock staggers their starts; each one is slowed by the others.
    span = max(e for _, e in together) - min(s for s, _ in together)
    assert 2.8 * alone <= span <= 3.4 * alone, (alone, together)
    # Each overlapped the others for a while (however staggered), and was slower for it.
    assert all(e - s >= 1.2 * alone for s, e in together), (alone, together)
