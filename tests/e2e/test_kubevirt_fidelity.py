"""KubeVirt's own rules, checked on the cluster's objects: the simulator is our KubeVirt, so each
test names the KubeVirt source (file, function) whose behaviour it pins down. KubeVirt 1.9's
behaviour (the scenario default); tests/e2e/test_kubevirt_versions.py covers 1.7/1.8.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kubevirt_objects
import pytest
from kubevirt_objects import (
    POST_COPY_SLOW,
    conditions,
    seconds,
    simulate,
    stamps,
    state_of,
    wait_for,
)

from virtshift.api.units import parse_quantity
from virtshift.k8s import rest
from virtshift.sim import runner

SCALE = 100
ACCEPTS_SKYLAKE = "cpu-model-migration.node.kubevirt.io/Skylake-Server"
SCENARIO = f"""
seed: 8
timeScale: {SCALE}
kubevirt: {{parallelMigrationsPerCluster: 20, parallelOutboundMigrationsPerNode: 5}}
network: {{nodeBandwidth: 1Gi, targetPodStartup: 10s}}
storageClasses:
  - {{name: ceph-rbd, accessMode: ReadWriteMany, copyBandwidth: 1Gi}}
  - {{name: slow-rbd, accessMode: ReadWriteMany, copyBandwidth: 10Mi}}
nodes:
  - generate: {{count: 3, prefix: sky-, start: 1, cpuModel: Skylake-Server,
               allocatable: {{cpu: "64", memory: 256Gi}}}}
  - {{name: casc-1, cpuModel: Cascadelake-Server, allocatable: {{cpu: "64", memory: 256Gi}},
     labels: {{{ACCEPTS_SKYLAKE}: "true"}}}}
  - {{name: drain-1, cpuModel: Skylake-Server, allocatable: {{cpu: "64", memory: 256Gi}}}}
vms:
  - {{name: big-8g, namespace: fid, node: sky-1, memory: 8Gi, dirtyRate: 3Gi}}
  - {{name: gc-1, namespace: fid, node: sky-1, memory: 1Gi}}
  - {{name: hm-1, namespace: fid, node: sky-2, memory: 1Gi}}
  - {{name: timing-1, namespace: fid, node: sky-1, memory: 2Gi, dirtyRate: 10Mi}}
  - {{name: stuck-1, namespace: fid, node: sky-1, memory: 1Gi}}
  - {{name: pause-1, namespace: fid, node: sky-2, memory: 1Gi, dirtyRate: 3Gi,
     labels: {{migration: disrupt}}}}
  - {{name: flaky-1, namespace: fid, node: sky-3, memory: 1Gi}}
  - {{name: vol-1, namespace: fid, node: sky-1, memory: 1Gi,
     volumes: [{{name: rootdisk, claimName: vol-1-root, size: 20Gi, storageClass: ceph-rbd}}]}}
  - {{name: vol-2, namespace: fid, node: sky-1, memory: 1Gi,
     volumes: [{{name: rootdisk, claimName: vol-2-root, size: 20Gi, storageClass: ceph-rbd}}]}}
  - generate: {{count: 3, prefix: evac-, namespace: fid, nodes: [drain-1], memory: [1Gi, 1Gi]}}
  - {{name: vol-3, namespace: fid, node: sky-2, memory: 1Gi,
     volumes: [{{name: rootdisk, claimName: vol-3-root, size: 20Gi, storageClass: ceph-rbd}}]}}
  - {{name: q-1, namespace: fid, node: sky-3, memory: 64Gi, dirtyRate: 10Mi}}
  - {{name: q-2, namespace: fid, node: sky-3, memory: 1Gi}}
  - {{name: q-3, namespace: fid, node: sky-3, memory: 1Gi}}
  - {{name: never-1, namespace: fid, node: sky-2, memory: 1Gi, dirtyRate: 3Gi,
     labels: {{migration: never}}}}
  - {{name: pc-1, namespace: fid, node: sky-2, memory: 4Gi, dirtyRate: 3Gi,
     labels: {{migration: postcopy-slow}}}}
faults:
  - {{kind: failTargetPod, vm: fid/flaky-1, attempt: 1}}
  - {{kind: failTargetPod, vm: fid/flaky-1, attempt: 2}}
"""
DISRUPT = {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
           "metadata": {"name": "disrupt"},
           "spec": {"allowWorkloadDisruption": True, "allowPostCopy": False,
                    "completionTimeoutPerGiB": 5,
                    "selectors": {"virtualMachineInstanceSelector": {"migration": "disrupt"}}}}

# completionTimeoutPerGiB 0: no completion timeout, so no switch to the post-copy it allows.
NEVER = {"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
         "metadata": {"name": "never"},
         "spec": {"allowPostCopy": True, "completionTimeoutPerGiB": 0,
                  "selectors": {"virtualMachineInstanceSelector": {"migration": "never"}}}}
# POST_COPY_SLOW here: post-copy from 6 s on (4 GiB is 5 GB at 1 s per GB), then 4 GiB
# pulled at 4 MiB/s: 1024 s.


@pytest.fixture(scope="module")
def sim(fresh_cluster) -> Iterator[runner.Simulator]:
    yield from simulate(fresh_cluster.kube, SCENARIO, (DISRUPT, NEVER, POST_COPY_SLOW))


@pytest.fixture
def kube(sim, fresh_cluster) -> rest.KubeClient:
    return fresh_cluster.kube


def migrate(kube: rest.KubeClient, name: str, vmi: str, **spec: Any) -> dict[str, Any]:
    return kubevirt_objects.migrate(kube, "fid", name, vmi, **spec)


def vmim(kube: rest.KubeClient, name: str) -> dict[str, Any] | None:
    return kube.get(rest.VMIMS, name, "fid")


def final(kube: rest.KubeClient, name: str, timeout: float = 30) -> dict[str, Any]:
    return kubevirt_objects.final(kube, "fid", name, timeout)


def vmi(kube: rest.KubeClient, name: str) -> dict[str, Any]:
    obj = kube.get(rest.VMIS, name, "fid")
    assert obj is not None
    return obj


def pods_of(kube: rest.KubeClient, name: str) -> list[dict[str, Any]]:
    uid = vmi(kube, name)["metadata"]["uid"]
    return kube.items(rest.PODS, "fid", label_selector=f"kubevirt.io/created-by={uid}")


# -- timeouts (virt-launcher live-migration-source.go) ----------------------------------------


def test_non_converging_8gib_vm_runs_until_its_completion_budget(kube) -> None:
    """shouldTriggerTimeout and getVMIMigrationDataSize: 8 GiB is 8.59 GB, so the budget is
    150 x 9 = 1350 s, acting at 1351 s; a transfer that keeps moving never trips the 150 s
    progress timeout (isMigrationProgressing). Post-copy not allowed: aborted, and 1.9 says
    "Live migration has been aborted"."""
    migrate(kube, "move-big", "big-8g")
    done = final(kube, "move-big", timeout=1400 / SCALE + 20)
    assert done["status"]["phase"] == "Failed"
    state = state_of(done)
    assert state["failureReason"] == "Live migration has been aborted"
    assert state["failed"] is True and state["completed"] is True
    assert state["abortStatus"] == "Succeeded" and state["mode"] == "PreCopy"
    ran = seconds(state["endTimestamp"]) - seconds(state["startTimestamp"])
    assert 1350 < ran <= 1353, ran
    assert vmi(kube, "big-8g")["status"]["nodeName"] == "sky-1"


def test_workload_disruption_without_post_copy_pauses_the_guest(kube) -> None:
    """shouldAssistMigrationToComplete: with allowWorkloadDisruption and no post-copy KubeVirt
    suspends the guest at the completion timeout (mode Paused) and the migration completes."""
    migrate(kube, "move-pause", "pause-1")
    done = final(kube, "move-pause")
    assert done["status"]["phase"] == "Succeeded", state_of(done)
    state = state_of(done)
    assert state["mode"] == "Paused" and state["migrationPolicyName"] == "disrupt"
    assert state["migrationConfiguration"]["allowWorkloadDisruption"] is True
    ran = seconds(state["endTimestamp"]) - seconds(state["startTimestamp"])
    assert ran >= 5 * 2 + 1  # 1 GiB is 2 GB at 5 s per GB, acting one second later


def test_completion_timeout_0_never_switches_pauses_or_aborts(sim, kube) -> None:
    """shouldTriggerTimeout: acceptableCompletionTime 0 (completionTimeoutPerGiB 0) is never
    reached, so the post-copy the policy allows never starts and nothing aborts the transfer:
    far past the 301 s the default 150 s per GB would give it, a guest that dirties memory
    three times faster than the NIC sends it is still pre-copying. Only deleting the VMIM
    ends it."""
    created = migrate(kube, "move-never", "never-1")
    running = wait_for(lambda: (s := state_of(vmi(kube, "never-1"))).get("migrationUid")
                       == created["metadata"]["uid"] and s.get("startTimestamp") and s)
    assert running["migrationConfiguration"]["completionTimeoutPerGiB"] == 0
    started = seconds(running["startTimestamp"])
    wait_for(lambda: seconds(sim.clock.stamp()) - started > 450, timeout=450 / SCALE + 20)
    assert vmim(kube, "move-never")["status"]["phase"] == "Running"
    state = state_of(vmi(kube, "never-1"))
    assert state["mode"] == "PreCopy" and not state.get("failed") and not state.get("completed")
    kube.delete(rest.VMIMS, "move-never", "fid")
    state = wait_for(lambda: (s := state_of(vmi(kube, "never-1"))).get("failed") and s)
    assert state["failureReason"] == "Live migration has been aborted", state
    assert state["mode"] == "PreCopy" and state["abortStatus"] == "Succeeded"
    assert vmi(kube, "never-1")["status"]["nodeName"] == "sky-2"


# -- status timing and abort (pkg/virt-controller/watch/migration/migration.go) ---------------


def test_migration_state_appears_at_handoff_and_the_vmim_gets_a_copy_at_the_end(kube) -> None:
    """handleTargetPodHandoff writes the VMI's migrationState only once the target pod is
    ready (Scheduled); until the VMIM is final its own migrationState holds only the source
    pod (SetSourcePod); updateStatus then copies the VMI's state onto it."""
    created = migrate(kube, "move-timing", "timing-1")
    uid = created["metadata"]["uid"]
    seen: list[tuple[str, bool, set[str]]] = []

    def observe() -> bool:
        obj = vmim(kube, "move-timing") or {}
        phase = obj.get("status", {}).get("phase", "")
        on_vmi = state_of(vmi(kube, "timing-1")).get("migrationUid") == uid
        seen.append((phase, on_vmi, set(state_of(obj))))
        return phase in ("Succeeded", "Failed")

    wait_for(observe, every=0.01)
    # The state reaches the VMI only with the handoff, which follows Scheduled.
    early = [s for s in seen if s[0] in ("", "Pending", "Scheduling")]
    assert early and not any(on for _, on, _ in early)
    assert all(keys <= {"sourcePod"} for phase, _, keys in seen
               if phase not in ("Succeeded", "Failed"))
    assert any(on for phase, on, _ in seen if phase in ("PreparingTarget", "TargetReady",
                                                         "Running"))
    done = vmim(kube, "move-timing")
    assert done["status"]["phase"] == "Succeeded"
    assert state_of(done) == state_of(vmi(kube, "timing-1"))
    assert state_of(done)["migrationUid"] == uid and state_of(done)["completed"] is True


def test_deleting_before_handoff_fails_the_vmim_and_leaves_the_vmi_alone(kube) -> None:
    """updateStatus: a VMIM deleted before handoff gets migrationAbortRequested and fails
    ("Migration failed due to being canceled"); its target pod is deleted; nothing reaches the
    VMI. Once final its finalizer goes and the deletion completes."""
    before = state_of(vmi(kube, "stuck-1"))
    migrate(kube, "move-stuck", "stuck-1", addedNodeSelector={"nowhere": "true"})
    wait_for(lambda: (vmim(kube, "move-stuck") or {}).get("status", {}).get("phase")
             == "Scheduling")
    target = wait_for(lambda: [p for p in pods_of(kube, "stuck-1")
                               if "kubevirt.io/migrationJobUID" in p["metadata"]["labels"]])
    assert target[0]["spec"]["nodeSelector"]["nowhere"] == "true"
    version = vmim(kube, "move-stuck")["metadata"]["resourceVersion"]
    kube.delete(rest.VMIMS, "move-stuck", "fid")
    seen = []
    for kind, obj in kube.watch(rest.VMIMS, version, "fid", timeout_seconds=20):
        if obj["metadata"]["name"] == "move-stuck":
            seen.append(obj)
            if kind == "DELETED":
                break
    failed = [o for o in seen if o.get("status", {}).get("phase") == "Failed"]
    assert failed and "migrationAbortRequested" in conditions(failed[0])
    assert [t["phase"] for t in failed[0]["status"]["phaseTransitionTimestamps"]] == [
        "Pending", "Scheduling", "Failed"]
    uid = failed[0]["metadata"]["uid"]
    events = [e for e in kube.items(rest.EVENTS, "fid") if e["involvedObject"].get("uid") == uid]
    assert [(e["type"], e["reason"], e["message"]) for e in events] == [
        ("Warning", "FailedMigration", "Migration failed due to being canceled")]
    wait_for(lambda: not [p for p in pods_of(kube, "stuck-1")
                          if "kubevirt.io/migrationJobUID" in p["metadata"]["labels"]])
    assert state_of(vmi(kube, "stuck-1")) == before
    assert vmi(kube, "stuck-1")["status"]["nodeName"] == "sky-1"


def test_deleting_a_migration_in_post_copy_does_not_abort_it(kube) -> None:
    """KubeVirt never aborts post-copy: the guest already runs on the target. Deleting the
    VMIM (it keeps KubeVirt's finalizer) gets it migrationAbortRequested (updateStatus) and
    the VMI abortRequested (markMigrationAbortInVmiStatus); virt-handler asks virt-launcher to
    cancel (handleMigrationAbort), whose AbortJob libvirt refuses in post-copy
    (asyncMigrationAbort sets the abort status Failed, which 1.9 writes on the VMI only for a
    failed migration). The migration completes: the VMIM turns Succeeded, then its finalizer
    goes and the deletion completes; the VM is on the target."""
    created = migrate(kube, "move-pc", "pc-1")
    uid = created["metadata"]["uid"]
    wait_for(lambda: (s := state_of(vmi(kube, "pc-1"))).get("migrationUid") == uid
             and s.get("mode") == "PostCopy", timeout=30)
    running = vmim(kube, "move-pc")
    assert running["status"]["phase"] == "Running"  # the VMI says so while it runs
    version = running["metadata"]["resourceVersion"]
    kube.delete(rest.VMIMS, "move-pc", "fid")
    seen = []
    for kind, obj in kube.watch(rest.VMIMS, version, "fid", timeout_seconds=60):
        if obj["metadata"]["name"] == "move-pc":
            seen.append(obj)
            if kind == "DELETED":
                break
    phases_seen = [o.get("status", {}).get("phase") for o in seen]
    assert "Failed" not in phases_seen and phases_seen[-1] == "Succeeded", phases_seen
    done = seen[-1]
    assert "migrationAbortRequested" in conditions(done)
    state = state_of(done)
    assert (state["mode"], state["completed"], state["abortRequested"]) == (
        "PostCopy", True, True), state
    assert "failed" not in state and "abortStatus" not in state and "failureReason" not in state
    moved = vmi(kube, "pc-1")
    assert moved["status"]["nodeName"] == state["targetNode"] != "sky-2"
    assert state_of(moved) == state
    events = [e for e in kube.items(rest.EVENTS, "fid") if e["involvedObject"].get("uid") == uid]
    assert not [e for e in events if e["reason"] == "FailedMigration"], events


def test_finished_migrations_are_garbage_collected_keeping_the_five_newest(kube) -> None:
    """garbageCollectFinalizedMigrations: defaultFinalizedMigrationGarbageCollectionBuffer."""
    names = [f"gc-{i}" for i in range(7)]
    for name in names:
        migrate(kube, name, "gc-1")
        final(kube, name)
    left = wait_for(lambda: (o := [m["metadata"]["name"] for m in kube.items(rest.VMIMS, "fid")
                                   if m["spec"]["vmiName"] == "gc-1"]) and len(o) == 5 and o)
    assert sorted(left) == names[2:]


def test_the_queue_admits_the_highest_priority_first(sim, kube) -> None:
    """migration.go: a Pending VMIM that meets a full parallelMigrationsPerCluster is requeued
    after getRequeueDelayForPriority (handleTargetPodCreation); when a migration ends,
    reEnqueueHighestPriorityPendingMigrations puts back at once as many Pending VMIMs as the
    limit, highest spec.priority first (pkg/util/migrations PriorityFromMigration;
    MigrationPriorityQueue is GA in 1.9). With a limit of 1: the system-critical one takes the
    slot the moment it frees, though it is younger; the plain one the moment it frees again."""
    def limit(n: int) -> None:
        kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"configuration": {"migrations": {
            "parallelMigrationsPerCluster": n}}}}, "kubevirt")
        wait_for(lambda: sim.kubevirt.limits()[0] == n)

    limit(1)
    try:
        migrate(kube, "q-first", "q-1")  # 64 GiB: about 70 simulated seconds in flight
        wait_for(lambda: (vmim(kube, "q-first") or {}).get("status", {}).get("phase")
                 not in (None, "", "Pending"))
        migrate(kube, "q-plain", "q-2")  # older, no priority
        sim.identities.controller.create(rest.VMIMS, {
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "q-critical", "namespace": "fid"},
            "spec": {"vmiName": "q-3", "priority": "system-critical"}})
        critical, plain = stamps(final(kube, "q-critical")), stamps(final(kube, "q-plain"))
        first = stamps(vmim(kube, "q-first"))
    finally:
        limit(20)
    # At once (the stamps are whole seconds), not at a requeue 1 or 5 s later.
    assert 0 <= critical["Scheduling"] - first["Succeeded"] <= 1
    assert 0 <= plain["Scheduling"] - critical["Succeeded"] <= 1


# -- placement (migration.go createTargetPod, services/renderresources.go) -------------------


def test_host_model_requirement_stays_that_of_the_first_node(kube) -> None:
    """prepareNodeSelectorForHostCpuModel: the first move requires the source node's host
    model; later moves keep the source pod's cpu-model-migration keys, so a VM that moved to
    a Cascade Lake host still needs a node that accepts Skylake, not Cascade Lake."""
    migrate(kube, "hm-first", "hm-1", addedNodeSelector={"kubernetes.io/hostname": "casc-1"})
    assert final(kube, "hm-first")["status"]["phase"] == "Succeeded"
    assert vmi(kube, "hm-1")["status"]["nodeName"] == "casc-1"
    pod = next(p for p in pods_of(kube, "hm-1") if p["spec"].get("nodeName") == "casc-1")
    assert pod["spec"]["nodeSelector"][ACCEPTS_SKYLAKE] == "true"
    migrate(kube, "hm-second", "hm-1")
    second = wait_for(lambda: [p for p in pods_of(kube, "hm-1") if p["metadata"]["labels"].get(
        "kubevirt.io/migrationJobUID") == vmim(kube, "hm-second")["metadata"]["uid"]])[0]
    selector = second["spec"]["nodeSelector"]
    assert selector[ACCEPTS_SKYLAKE] == "true"
    assert not any("Cascadelake" in k for k in selector)
    assert selector["cpu-vendor.node.kubevirt.io/Intel"] == "true"
    assert final(kube, "hm-second")["status"]["phase"] == "Succeeded"
    assert vmi(kube, "hm-1")["status"]["nodeName"].startswith("sky-")


def test_launcher_pods_request_what_kubevirt_renders(kube) -> None:
    """renderresources.go: 1 vCPU / cpuAllocationRatio 10 = 100m; memory = the request plus
    KubeVirt's overhead (1Gi/512 + 260Mi + 8Mi per vCPU)."""
    [pod] = pods_of(kube, "flaky-1")
    requests = pod["spec"]["containers"][0]["resources"]["requests"]
    assert requests["cpu"] == "100m"
    assert parse_quantity(requests["memory"]) == 2**30 + 2**30 // 512 + 268 * 2**20
    assert pod["spec"]["nodeSelector"]["kubevirt.io/schedulable"] == "true"
    assert pod["metadata"]["annotations"]["kubevirt.io/domain"] == "flaky-1"


# -- evacuation (watch/drain/evacuation/evacuation.go) and backoff ----------------------------


def test_drain_taint_evacuates_every_vmi_with_system_critical_priority(kube) -> None:
    """vmisToMigrate: the kubevirt.io/drain NoSchedule taint makes every VMI of the node a
    candidate; with the priority queue GA (1.9) GenerateNewMigration creates one VMIM per VMI
    at once, priority system-critical, annotated kubevirt.io/evacuationMigration."""
    kube.patch(rest.NODES, "drain-1", {"spec": {"taints": [
        {"key": "kubevirt.io/drain", "effect": "NoSchedule"}]}})
    evacuations = wait_for(lambda: (o := [m for m in kube.items(rest.VMIMS, "fid")
                                          if m["spec"]["vmiName"].startswith("evac-")])
                           and len(o) == 3 and o)
    for m in evacuations:
        assert m["metadata"]["name"].startswith("kubevirt-evacuation-")
        assert m["metadata"]["annotations"]["kubevirt.io/evacuationMigration"] == "drain-1"
        assert m["spec"]["priority"] == "system-critical"
    wait_for(lambda: all(vmi(kube, f"evac-{i}")["status"]["nodeName"] != "drain-1"
                         for i in range(1, 4)))


def test_failed_evacuations_back_off_twenty_seconds_doubling(kube) -> None:
    """evacuation.go retries at once; migration.go handleMigrationBackoff holds the new VMIM
    Pending 20 s after one failure, 40 s after two (counted back to the last success)."""
    before = vmi(kube, "flaky-1")
    node = before["status"]["nodeName"]
    kube.patch(rest.VMIS, "flaky-1", {"status": {"evacuationNodeName": node}}, "fid")

    def evacuations() -> list[dict[str, Any]]:
        return sorted((m for m in kube.items(rest.VMIMS, "fid")
                       if m["spec"]["vmiName"] == "flaky-1"),
                      key=lambda m: m["metadata"]["creationTimestamp"])

    done = wait_for(lambda: (e := evacuations()) and len(e) == 3 and e[-1].get(
        "status", {}).get("phase") == "Succeeded" and e, timeout=120 / SCALE + 30)
    first, second, third = (stamps(m) for m in done)
    assert [m["status"]["phase"] for m in done] == ["Failed", "Failed", "Succeeded"]
    assert second["Scheduling"] - first["Failed"] >= 20 - 1
    assert third["Scheduling"] - second["Failed"] >= 40 - 1
    moved = vmi(kube, "flaky-1")
    assert moved["status"]["nodeName"] != node
    assert not moved["status"].get("evacuationNodeName")


# -- volume migration (watch/vm/vm.go, watch/volume-migration, workload-updater.go) ----------


def new_claim(kube: rest.KubeClient, name: str, storage_class: str) -> None:
    kube.create(rest.PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                            "metadata": {"name": name, "namespace": "fid"},
                            "spec": {"accessModes": ["ReadWriteMany"],
                                     "storageClassName": storage_class,
                                     "resources": {"requests": {"storage": "20Gi"}}}})


def point_volume(kube: rest.KubeClient, vm: str, claim: str) -> None:
    obj = kube.get(rest.VMS, vm, "fid")
    volumes = [{**v, "persistentVolumeClaim": {"claimName": claim}}
               for v in obj["spec"]["template"]["spec"]["volumes"]]
    kube.patch(rest.VMS, vm, {"spec": {"updateVolumesStrategy": "Migration",
                                       "template": {"spec": {"volumes": volumes}}}}, "fid")


def test_volume_migration_timeline_and_cancel(kube) -> None:
    """handleVolumeUpdateRequest: at the start the VMI's spec.volumes and migratedVolumes, the
    VM's volumeMigrationState and VolumesChange=True; the workload updater's VMIM carries
    kubevirt.io/volume-update-migration. Reverting the VM's volumes (VolumeMigrationCancel)
    cancels: VolumesChange=False (VolumesChangeCancellation), the VMI back on its claim, the
    unfinished migration deleted, the VM still on its node."""
    new_claim(kube, "vol-1-slow", "slow-rbd")
    point_volume(kube, "vol-1", "vol-1-slow")
    started = wait_for(lambda: (v := vmi(kube, "vol-1"))["status"].get("migratedVolumes")
                       and v)
    [moved] = started["status"]["migratedVolumes"]
    assert (moved["sourcePVCInfo"]["claimName"], moved["destinationPVCInfo"]["claimName"]) == \
        ("vol-1-root", "vol-1-slow")
    assert started["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "vol-1-slow"
    assert conditions(started)["VolumesChange"]["status"] == "True"
    vm = wait_for(lambda: (o := kube.get(rest.VMS, "vol-1", "fid"))["status"].get(
        "volumeUpdateState") and o)
    assert vm["status"]["volumeUpdateState"]["volumeMigrationState"]["migratedVolumes"][0][
        "destinationPVCInfo"]["claimName"] == "vol-1-slow"
    update = wait_for(lambda: next((m for m in kube.items(rest.VMIMS, "fid")
                                    if m["spec"]["vmiName"] == "vol-1"), None))
    assert update["metadata"]["name"].startswith("kubevirt-workload-update-")
    assert update["metadata"]["labels"]["kubevirt.io/volume-update-migration"] == "vol-1"
    assert update["spec"]["priority"] == "user-triggered"
    wait_for(lambda: (vmim(kube, update["metadata"]["name"]) or {}).get("status", {}).get(
        "phase") == "Running")
    point_volume(kube, "vol-1", "vol-1-root")  # 20Gi at 10Mi/s: still copying
    cancelled = wait_for(lambda: conditions(v := vmi(kube, "vol-1")).get(
        "VolumesChange", {}).get("status") == "False" and v)
    assert conditions(cancelled)["VolumesChange"]["reason"] == "VolumesChangeCancellation"
    assert not cancelled["status"].get("migratedVolumes")
    assert cancelled["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "vol-1-root"
    wait_for(lambda: vmim(kube, update["metadata"]["name"]) is None)
    assert vmi(kube, "vol-1")["status"]["nodeName"] == "sky-1"


def test_stopping_a_vm_mid_volume_migration_requires_manual_recovery(kube) -> None:
    """syncVolumeMigration: the VMI gone during a volume migration sets ManualRecoveryRequired
    on the VM, and startVMI refuses to start it until its volumes are reverted."""
    new_claim(kube, "vol-2-slow", "slow-rbd")
    point_volume(kube, "vol-2", "vol-2-slow")
    wait_for(lambda: vmi(kube, "vol-2")["status"].get("migratedVolumes"))
    kube.patch(rest.VMS, "vol-2", {"spec": {"runStrategy": "Halted"}}, "fid")
    vm = wait_for(lambda: "ManualRecoveryRequired" in conditions(
        o := kube.get(rest.VMS, "vol-2", "fid")) and o, timeout=60)
    assert conditions(vm)["ManualRecoveryRequired"]["reason"] == \
        "VMI was removed or was final during the volume migration"
    kube.patch(rest.VMS, "vol-2", {"spec": {"runStrategy": "Always"}}, "fid")
    time.sleep(60 / SCALE)  # a start would come after targetPodStartup (10 s)
    assert kube.get(rest.VMIS, "vol-2", "fid") is None
    point_volume(kube, "vol-2", "vol-2-root")
    wait_for(lambda: "ManualRecoveryRequired" not in conditions(
        kube.get(rest.VMS, "vol-2", "fid")))
    wait_for(lambda: (v := kube.get(rest.VMIS, "vol-2", "fid")) and v.get("status", {}).get(
        "phase") == "Running", timeout=60)


def test_without_live_migrate_in_workload_update_methods_no_migration_starts(sim, kube) -> None:
    """workload-updater.go getUpdateData: the VMIM of a volume update is created only with
    LiveMigrate in the KubeVirt CR's workloadUpdateMethods; without it the VMI waits in
    VolumesChange, and nothing says why (as in KubeVirt)."""
    def methods(value: list[str]) -> None:
        kube.patch(rest.KUBEVIRTS, "kubevirt", {"spec": {"workloadUpdateStrategy": {
            "workloadUpdateMethods": value}}}, "kubevirt")
        wait_for(lambda: (sim.kubevirt.kubevirt_spec().get("workloadUpdateStrategy") or {}).get(
            "workloadUpdateMethods") == value)

    methods([])
    try:
        new_claim(kube, "vol-3-b", "ceph-rbd")
        point_volume(kube, "vol-3", "vol-3-b")
        wait_for(lambda: conditions(vmi(kube, "vol-3")).get("VolumesChange", {}).get(
            "status") == "True")
        time.sleep(60 / SCALE)
        assert not [m for m in kube.items(rest.VMIMS, "fid") if m["spec"]["vmiName"] == "vol-3"]
    finally:
        methods(["LiveMigrate"])
    update = wait_for(lambda: next((m for m in kube.items(rest.VMIMS, "fid")
                                    if m["spec"]["vmiName"] == "vol-3"), None))
    assert final(kube, update["metadata"]["name"])["status"]["phase"] == "Succeeded"
    assert vmi(kube, "vol-3")["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == \
        "vol-3-b"
